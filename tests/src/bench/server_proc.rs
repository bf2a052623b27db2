//! `corral server` as a child process, so that its CPU time and memory can
//! be read from `/proc/<pid>` without the load generator's or the agents'
//! mixed in, and so that it can be killed with SIGKILL.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};

use crate::{Api, ChildProcess, ADMIN_TOKEN};

/// A binary of this workspace built beside the running one (the bench
/// binary in `target/release`, a test in `target/debug/deps`).
pub fn sibling_binary(name: &str) -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    let found = [Some(dir), dir.parent()]
        .into_iter()
        .flatten()
        .map(|d| d.join(name))
        .find(|p| p.is_file());
    found
}

/// A `corral server` child on SQLite in `data_dir`.
pub struct ServerProcess {
    pub process: ChildProcess,
    pub http_port: u16,
    pub grpc_port: u16,
    pub data_dir: PathBuf,
    pub admin: Api,
}

impl ServerProcess {
    /// Starts the server and waits until `/readyz` answers; returns it and
    /// how long that took.
    pub async fn start(
        data_dir: &Path,
        http_port: u16,
        grpc_port: u16,
        extra_args: &[&str],
    ) -> anyhow::Result<(Self, Duration)> {
        let binary = sibling_binary("corral").ok_or_else(|| {
            anyhow!("the corral binary is not built beside this one (scripts/bench builds it)")
        })?;
        std::fs::create_dir_all(data_dir)?;
        // CORRAL_BENCH_SERVER_LOG=<filter> shows the server's log on
        // stderr (for finding where a scenario's time goes).
        let shown = std::env::var("CORRAL_BENCH_SERVER_LOG").ok();
        let log = match shown {
            Some(_) => std::process::Stdio::inherit(),
            None => std::fs::File::create(data_dir.join("server.log"))?.into(),
        };
        let started = Instant::now();
        let process = ChildProcess::spawn(
            "corral server",
            tokio::process::Command::new(binary)
                .arg("server")
                .arg("--http-addr")
                .arg(format!("127.0.0.1:{http_port}"))
                .arg("--grpc-addr")
                .arg(format!("127.0.0.1:{grpc_port}"))
                .arg("--data-dir")
                .arg(data_dir)
                .args(extra_args)
                .env("CORRAL_ADMIN_TOKEN", ADMIN_TOKEN)
                .env("RUST_LOG", shown.as_deref().unwrap_or("warn"))
                .env_remove("DATABASE_URL")
                .stdout(std::process::Stdio::null())
                .stderr(log),
        );
        let base = format!("http://127.0.0.1:{http_port}");
        let mut server = Self {
            process,
            http_port,
            grpc_port,
            data_dir: data_dir.to_path_buf(),
            admin: Api::new(&base, ADMIN_TOKEN),
        };
        let client = crate::http_client();
        let deadline = started + Duration::from_secs(300);
        loop {
            if let Ok(r) = client.get(format!("{base}/readyz")).send().await {
                if r.status().is_success() {
                    break;
                }
            }
            if let Ok(Some(status)) = server.process.child.try_wait() {
                return Err(anyhow!(
                    "corral server exited with {status}; see {}",
                    data_dir.join("server.log").display()
                ));
            }
            if Instant::now() > deadline {
                server.process.kill().await;
                return Err(anyhow!("corral server was not ready within 300 s"));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok((server, started.elapsed()))
    }

    pub fn pid(&self) -> anyhow::Result<u32> {
        self.process
            .child
            .id()
            .context("the server has already exited")
    }

    pub fn grpc_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.grpc_port)
    }

    /// SIGKILL, no shutdown.
    pub async fn kill_hard(mut self) {
        self.process.kill().await;
    }
}

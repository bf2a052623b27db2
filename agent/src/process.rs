//! The process runtime: each sandbox's main process is a plain child process
//! of the agent, with NO isolation (development only; it registers as not
//! isolated and warns at start).
//!
//! Owns `<data_dir>/processes/<id>/`: `meta.json` (the spec with its TTL
//! deadline, the pid and the process's start time, and its exit code once
//! the agent saw it exit) and the
//! main process's `stdout.log` / `stderr.log`; the process runs with that
//! directory as its working directory unless the spec names one. Each main
//! process leads its own process group (so signals reach its children and a
//! Ctrl-C at the agent's terminal does not), and a task per child reaps it.
//! `list` re-reads the meta files and checks each pid is alive and is still
//! the same process (its start time in /proc), so a restarted agent
//! re-discovers its sandboxes without touching them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

use crate::exec_io;
use crate::images;
use crate::runtime::{
    env_with_path, validate_exec, validate_sandbox_id, validate_spec, ExecOutput, ExecSpec, Phase,
    Runtime, RuntimeError, SandboxLocks, SandboxSpec, SandboxStatus,
};

/// The image every process sandbox can use: the host itself.
pub const HOST_IMAGE: &str = "host";

const KILL_WAIT: Duration = Duration::from_secs(10);
const STOP_POLL: Duration = Duration::from_millis(20);

/// What the runtime remembers about a sandbox, in `meta.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Meta {
    spec: SandboxSpec,
    /// The main process (also its process group id); 0 when never started.
    pid: i32,
    /// Its start time in clock ticks after boot (/proc/<pid>/stat field 22),
    /// so a reused pid is not mistaken for it.
    start_ticks: Option<u64>,
    exit_code: Option<i32>,
}

/// The process runtime. Two instances over the same data directory see the
/// same sandboxes.
#[derive(Debug)]
pub struct ProcessRuntime {
    data_dir: PathBuf,
    locks: SandboxLocks,
    /// Serialises meta.json rewrites between commands and reaper tasks.
    meta_lock: Arc<Mutex<()>>,
}

impl ProcessRuntime {
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        let data_dir = data_dir.into();
        let data_dir = std::path::absolute(&data_dir).unwrap_or(data_dir);
        tracing::warn!(
            data_dir = %data_dir.display(),
            "the process runtime does NOT isolate sandboxes: they run as plain processes on this host (development only)"
        );
        Self {
            data_dir,
            locks: SandboxLocks::default(),
            meta_lock: Arc::new(Mutex::new(())),
        }
    }

    /// The directory of a (validated) sandbox id.
    pub fn sandbox_dir(&self, id: &str) -> PathBuf {
        self.data_dir.join("processes").join(id)
    }

    fn read_meta(&self, id: &str) -> Result<Option<Meta>, RuntimeError> {
        read_meta(&self.sandbox_dir(id))
    }

    fn write_meta(&self, meta: &Meta) -> Result<(), RuntimeError> {
        let _g = self.meta_lock.lock().unwrap_or_else(|p| p.into_inner());
        write_meta(&self.sandbox_dir(&meta.spec.id), meta)
    }

    fn status_of(meta: &Meta) -> SandboxStatus {
        let running = meta.pid > 0 && is_alive(meta.pid, meta.start_ticks);
        SandboxStatus {
            id: meta.spec.id.clone(),
            phase: if running {
                Phase::Running
            } else {
                Phase::Stopped
            },
            exit_code: if running { None } else { meta.exit_code },
            image: meta.spec.image.clone(),
            expires_at: meta.spec.expires_at,
        }
    }

    fn current(&self, id: &str) -> Result<(Meta, SandboxStatus), RuntimeError> {
        let meta = self
            .read_meta(id)?
            .ok_or_else(|| RuntimeError::SandboxNotFound(id.to_string()))?;
        let status = Self::status_of(&meta);
        Ok((meta, status))
    }

    /// Spawns the main process and a task that reaps it and records its
    /// exit code. Updates and writes `meta`.
    fn spawn_main(&self, meta: &mut Meta) -> Result<(), RuntimeError> {
        let dir = self.sandbox_dir(&meta.spec.id);
        let log = |name: &str| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(dir.join(name))
                .map_err(|e| RuntimeError::runtime(format!("opening {name}"), e))
        };
        let spec = &meta.spec;
        let mut cmd = tokio::process::Command::new(&spec.command[0]);
        cmd.args(&spec.command[1..])
            // Never leak the agent's environment (its host token) into a
            // sandbox.
            .env_clear()
            .envs(env_pairs(&spec.env))
            .current_dir(
                spec.workdir
                    .as_deref()
                    .map(PathBuf::from)
                    .unwrap_or_else(|| dir.clone()),
            )
            .stdin(Stdio::null())
            .stdout(log("stdout.log")?)
            .stderr(log("stderr.log")?)
            .process_group(0)
            .kill_on_drop(false);
        let mut child = cmd
            .spawn()
            .map_err(|e| RuntimeError::runtime(format!("starting {}", spec.command[0]), e))?;
        let pid = child
            .id()
            .and_then(|p| i32::try_from(p).ok())
            .ok_or_else(|| RuntimeError::Runtime("the child has no pid".into()))?;
        meta.pid = pid;
        meta.start_ticks = start_ticks(pid);
        meta.exit_code = None;
        self.write_meta(meta)?;

        let (dir, lock, id) = (dir.clone(), self.meta_lock.clone(), meta.spec.id.clone());
        tokio::spawn(async move {
            let code = match child.wait().await {
                Ok(status) => exec_io::exit_code_of(status),
                Err(e) => {
                    tracing::warn!(sandbox.id = %id, error = %e, "waiting for the main process");
                    return;
                }
            };
            tracing::info!(sandbox.id = %id, pid, exit_code = code, "main process exited");
            let _g = lock.lock().unwrap_or_else(|p| p.into_inner());
            // Only if the sandbox still exists and this is still its process.
            if let Ok(Some(mut meta)) = read_meta(&dir) {
                if meta.pid == pid {
                    meta.exit_code = Some(code);
                    let _ = write_meta(&dir, &meta);
                }
            }
        });
        Ok(())
    }

    /// Signals the main process's group, if it is still that process.
    fn signal(meta: &Meta, signal: Signal) {
        if meta.pid > 1
            && is_alive(meta.pid, meta.start_ticks)
            && killpg(Pid::from_raw(meta.pid), signal).is_err()
        {
            let _ = kill(Pid::from_raw(meta.pid), signal);
        }
    }

    async fn wait_dead(meta: &Meta, wait: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if !is_alive(meta.pid, meta.start_ticks) {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(STOP_POLL).await;
        }
    }

    async fn kill_now(meta: &Meta) -> Result<(), RuntimeError> {
        Self::signal(meta, Signal::SIGKILL);
        if Self::wait_dead(meta, KILL_WAIT).await {
            Ok(())
        } else {
            Err(RuntimeError::Runtime(format!(
                "sandbox {} (pid {}) did not die after SIGKILL",
                meta.spec.id, meta.pid
            )))
        }
    }

    /// [`Runtime::stop`] with the sandbox's lock already held.
    async fn stop_locked(&self, id: &str, grace: Duration) -> Result<SandboxStatus, RuntimeError> {
        let (meta, status) = self.current(id)?;
        if status.phase != Phase::Running {
            return Ok(status);
        }
        Self::signal(&meta, Signal::SIGTERM);
        if !Self::wait_dead(&meta, grace).await {
            tracing::info!(sandbox.id = %id, ?grace, "still running after the grace period; killing");
            Self::kill_now(&meta).await?;
        }
        // The reaper records the exit code right after the process dies;
        // give it a moment so the reply carries it.
        let deadline = tokio::time::Instant::now() + Duration::from_millis(500);
        loop {
            let (meta, status) = self.current(id)?;
            if meta.exit_code.is_some() || tokio::time::Instant::now() >= deadline {
                tracing::info!(sandbox.id = %id, exit_code = ?status.exit_code, "sandbox stopped");
                return Ok(status);
            }
            tokio::time::sleep(STOP_POLL).await;
        }
    }
}

fn env_pairs(env: &BTreeMap<String, String>) -> Vec<(String, String)> {
    env_with_path(env)
        .into_iter()
        .filter_map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
        })
        .collect()
}

fn read_meta(dir: &Path) -> Result<Option<Meta>, RuntimeError> {
    match std::fs::read(dir.join("meta.json")) {
        Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
            RuntimeError::runtime(format!("reading {}", dir.join("meta.json").display()), e)
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(RuntimeError::runtime("reading meta.json", e)),
    }
}

/// Writes meta.json atomically (temp file, then rename).
fn write_meta(dir: &Path, meta: &Meta) -> Result<(), RuntimeError> {
    let bytes = serde_json::to_vec_pretty(meta)
        .map_err(|e| RuntimeError::runtime("encoding meta.json", e))?;
    let tmp = dir.join("meta.json.tmp");
    std::fs::write(&tmp, bytes).map_err(|e| RuntimeError::runtime("writing meta.json", e))?;
    std::fs::rename(&tmp, dir.join("meta.json"))
        .map_err(|e| RuntimeError::runtime("writing meta.json", e))
}

/// Parses `/proc/<pid>/stat`: (state, start time in ticks).
fn proc_stat(pid: i32) -> Option<(char, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain anything, so parse
    // from the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state is field 3 (index 0 here), starttime field 22
    // (index 19 here).
    let state = fields.first()?.chars().next()?;
    let start = fields.get(19)?.parse().ok()?;
    Some((state, start))
}

fn start_ticks(pid: i32) -> Option<u64> {
    proc_stat(pid).map(|(_, t)| t)
}

/// True when `pid` is a live (not zombie) process and, when known, the one
/// that started at `ticks`.
fn is_alive(pid: i32, ticks: Option<u64>) -> bool {
    if pid <= 0 {
        return false;
    }
    match proc_stat(pid) {
        Some((state, start)) => {
            !matches!(state, 'Z' | 'X' | 'x') && ticks.is_none_or(|t| t == start)
        }
        // No /proc: fall back to signal 0.
        None => !Path::new("/proc/self/stat").exists() && kill(Pid::from_raw(pid), None).is_ok(),
    }
}

#[async_trait]
impl Runtime for ProcessRuntime {
    fn kind(&self) -> &'static str {
        "process"
    }

    fn isolated(&self) -> bool {
        false
    }

    fn images(&self) -> Vec<String> {
        let mut images = vec![HOST_IMAGE.to_string()];
        images.extend(
            images::list(&self.data_dir)
                .into_iter()
                .filter(|i| i != HOST_IMAGE),
        );
        images
    }

    async fn create(&self, spec: &SandboxSpec) -> Result<SandboxStatus, RuntimeError> {
        validate_spec(spec)?;
        let id = &spec.id;
        let _guard = self.locks.lock(id).await;
        if let Some(meta) = self.read_meta(id)? {
            return Ok(Self::status_of(&meta));
        }
        if !self.images().contains(&spec.image) {
            return Err(RuntimeError::ImageNotFound(spec.image.clone()));
        }
        let dir = self.sandbox_dir(id);
        // A directory without meta.json is a create that died half way.
        if dir.exists() {
            let _ = std::fs::remove_dir_all(&dir);
        }
        std::fs::create_dir_all(&dir)
            .map_err(|e| RuntimeError::runtime(format!("creating {}", dir.display()), e))?;
        let mut meta = Meta {
            spec: spec.clone(),
            pid: 0,
            start_ticks: None,
            exit_code: None,
        };
        if let Err(err) = self.spawn_main(&mut meta) {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(err);
        }
        tracing::info!(sandbox.id = %id, pid = meta.pid, "sandbox created");
        Ok(Self::status_of(&meta))
    }

    async fn start(&self, id: &str) -> Result<SandboxStatus, RuntimeError> {
        validate_sandbox_id(id)?;
        let _guard = self.locks.lock(id).await;
        let (mut meta, status) = self.current(id)?;
        if status.phase == Phase::Running {
            return Ok(status);
        }
        self.spawn_main(&mut meta)?;
        tracing::info!(sandbox.id = %id, pid = meta.pid, "sandbox started");
        Ok(Self::status_of(&meta))
    }

    async fn stop(&self, id: &str, grace: Duration) -> Result<SandboxStatus, RuntimeError> {
        validate_sandbox_id(id)?;
        let _guard = self.locks.lock(id).await;
        self.stop_locked(id, grace).await
    }

    async fn stop_if_overdue(
        &self,
        id: &str,
        now: SystemTime,
        margin: Duration,
        grace: Duration,
    ) -> Result<Option<SandboxStatus>, RuntimeError> {
        validate_sandbox_id(id)?;
        let _guard = self.locks.lock(id).await;
        match self.read_meta(id)? {
            Some(meta) if Self::status_of(&meta).is_overdue(now, margin) => {
                self.stop_locked(id, grace).await.map(Some)
            }
            _ => Ok(None),
        }
    }

    async fn destroy(&self, id: &str) -> Result<SandboxStatus, RuntimeError> {
        validate_sandbox_id(id)?;
        let _guard = self.locks.lock(id).await;
        let dir = self.sandbox_dir(id);
        let image = match self.read_meta(id)? {
            Some(meta) => {
                Self::kill_now(&meta).await?;
                meta.spec.image
            }
            None => String::new(),
        };
        if dir.exists() {
            let _g = self.meta_lock.lock().unwrap_or_else(|p| p.into_inner());
            std::fs::remove_dir_all(&dir)
                .map_err(|e| RuntimeError::runtime(format!("removing {}", dir.display()), e))?;
        }
        tracing::info!(sandbox.id = %id, "sandbox destroyed");
        Ok(SandboxStatus::absent(id, &image))
    }

    async fn exec(&self, id: &str, spec: ExecSpec) -> Result<ExecOutput, RuntimeError> {
        validate_sandbox_id(id)?;
        validate_exec(&spec)?;
        let (meta, status) = self.current(id)?;
        if status.phase != Phase::Running {
            return Err(RuntimeError::InvalidState(format!(
                "sandbox {id} is not running"
            )));
        }
        let mut env = meta.spec.env.clone();
        env.extend(spec.env.clone());
        let cwd = spec
            .workdir
            .clone()
            .or_else(|| meta.spec.workdir.clone())
            .map(PathBuf::from)
            .unwrap_or_else(|| self.sandbox_dir(id));
        let mut cmd = tokio::process::Command::new(&spec.argv[0]);
        cmd.args(&spec.argv[1..])
            .env_clear()
            .envs(env_pairs(&env))
            .current_dir(cwd)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        let child = match cmd.spawn() {
            Ok(child) => child,
            // Like a shell: a command that cannot be started is an exec
            // result (127), not a runtime failure.
            Err(e) => {
                return Ok(ExecOutput {
                    exit_code: 127,
                    stderr: format!("{}: {e}\n", spec.argv[0]).into_bytes(),
                    ..Default::default()
                })
            }
        };
        let pgid = child.id().and_then(|p| i32::try_from(p).ok());
        exec_io::collect(child, spec.timeout, spec.max_output_bytes, move || {
            if let Some(pgid) = pgid.filter(|p| *p > 1) {
                let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
            }
        })
        .await
    }

    async fn list(&self) -> Result<Vec<SandboxStatus>, RuntimeError> {
        let Ok(entries) = std::fs::read_dir(self.data_dir.join("processes")) else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for entry in entries.filter_map(|e| e.ok()) {
            let Ok(id) = entry.file_name().into_string() else {
                continue;
            };
            if validate_sandbox_id(&id).is_err() {
                continue;
            }
            match self.read_meta(&id) {
                Ok(Some(meta)) => out.push(Self::status_of(&meta)),
                Ok(None) => {}
                Err(e) => tracing::warn!(sandbox.id = %id, error = %e, "unreadable sandbox meta"),
            }
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_alive_and_a_wrong_start_time_is_not() {
        let pid = i32::try_from(std::process::id()).expect("pid");
        let ticks = start_ticks(pid).expect("own start time");
        assert!(is_alive(pid, Some(ticks)));
        assert!(is_alive(pid, None));
        assert!(
            !is_alive(pid, Some(ticks + 1)),
            "a reused pid is not the same process"
        );
        assert!(!is_alive(0, None));
    }
}

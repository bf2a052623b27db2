//! `corral dev`: the whole of Corral on one machine for development. It runs
//! the control plane with SQLite in a local data directory, makes sure an
//! org named `dev` exists and mints a fresh API key for it (printed once;
//! keys are stored hashed), issues the local agent a host token (kept in the
//! agent's own data directory, as any agent keeps its credential), builds the
//! `busybox` image when the host has a static busybox, and starts
//! `corral-agent` as a child process.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use corral_actors::store::Store;

use crate::server::{Server, ServerConfig};

#[derive(clap::Args, Debug, Clone)]
pub struct DevConfig {
    #[command(flatten)]
    pub server: ServerConfig,
    /// Agent runtime: auto (runc when root and runc exist, else process),
    /// runc, process or fake.
    #[arg(long, env = "CORRAL_DEV_RUNTIME", default_value = "auto")]
    pub runtime: String,
    /// The corral-agent binary (default: next to this binary, then PATH).
    #[arg(long, env = "CORRAL_AGENT_BIN")]
    pub agent_bin: Option<PathBuf>,
}

fn agent_binary(explicit: Option<PathBuf>) -> PathBuf {
    if let Some(path) = explicit {
        return path;
    }
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join("corral-agent")))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("corral-agent"))
}

fn random_token() -> anyhow::Result<String> {
    let mut bytes = [0u8; 24];
    getrandom_fill(&mut bytes)?;
    Ok(format!(
        "cadm_{}",
        bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()
    ))
}

fn getrandom_fill(buf: &mut [u8]) -> anyhow::Result<()> {
    use std::io::Read;
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(buf))
        .context("reading /dev/urandom")
}

/// The local agent's host token: reused across restarts so the host keeps
/// its identity, issued on first start.
async fn agent_token(store: &Store, agent_dir: &Path) -> anyhow::Result<PathBuf> {
    let path = agent_dir.join("host-token");
    if path.exists() {
        let token = std::fs::read_to_string(&path)?;
        if store
            .authenticate_host_token(token.trim())
            .await
            .ok()
            .flatten()
            .is_some()
        {
            return Ok(path);
        }
    }
    let issued = store
        .create_host_token("dev-local-agent", None)
        .await
        .map_err(|e| anyhow::anyhow!("issuing the local agent's host token: {e}"))?;
    write_private(&path, &issued.secret)?;
    Ok(path)
}

/// `<data dir>/secret.key` (0600), made on first start: the key that seals
/// sandbox secret env values. Kept across restarts, or the secrets of
/// existing sandboxes could not be decrypted.
fn dev_secret_key(data_dir: &Path) -> anyhow::Result<PathBuf> {
    let path = data_dir.join("secret.key");
    if !path.exists() {
        std::fs::create_dir_all(data_dir)
            .with_context(|| format!("creating data directory {}", data_dir.display()))?;
        let key = corral_actors::secrets::SecretKey::generate()
            .map_err(|e| anyhow::anyhow!("making a secret key: {e}"))?;
        write_private(&path, &format!("{}\n", key.to_hex()))?;
    }
    Ok(path)
}

fn write_private(path: &Path, contents: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    file.write_all(contents.as_bytes())?;
    Ok(())
}

/// What `corral dev` credits its org with once: 100 units of money.
const DEV_CREDIT_MICROS: i64 = 100_000_000;

pub async fn run(mut config: DevConfig) -> anyhow::Result<()> {
    let admin_token = match config.server.admin_token.clone() {
        Some(token) => token,
        None => random_token()?,
    };
    config.server.admin_token = Some(admin_token.clone());
    if config.server.secret_key_file.is_none() {
        config.server.secret_key_file = Some(dev_secret_key(&config.server.data_dir)?);
    }
    let server = Server::start(config.server.clone()).await?;
    let store = server.control_plane.store().clone();

    let org = match store.find_org_by_name("dev").await {
        Ok(Some(org)) => org,
        _ => store
            .create_org("dev")
            .await
            .map_err(|e| anyhow::anyhow!("creating the dev org: {e}"))?,
    };
    // Credit to play with (idempotent: the same reference every start), so
    // the dev stack shows metering and the credit gate as production does.
    server
        .control_plane
        .credit(
            &org.id,
            corral_actors::actors::ledger::CreditKind::Deposit,
            DEV_CREDIT_MICROS,
            "dev-initial",
            "corral dev opening credit",
        )
        .await
        .map_err(|e| anyhow::anyhow!("crediting the dev org: {e}"))?;
    let key = store
        .create_api_key(&org.id, "corral dev")
        .await
        .map_err(|e| anyhow::anyhow!("creating an API key: {e}"))?;

    let agent_dir = config.server.data_dir.join("agent");
    std::fs::create_dir_all(&agent_dir)?;
    let token_file = agent_token(&store, &agent_dir).await?;
    let agent_bin = agent_binary(config.agent_bin.clone());

    // The busybox image, when the host has a static busybox to build it from.
    if config.runtime != "fake" && !agent_dir.join("images/busybox/rootfs").exists() {
        let built = tokio::process::Command::new(&agent_bin)
            .arg("image")
            .arg("build-busybox")
            .arg("--data-dir")
            .arg(&agent_dir)
            .stdin(Stdio::null())
            .status()
            .await;
        if !matches!(built, Ok(status) if status.success()) {
            tracing::warn!("could not build the busybox image (install busybox-static); import images with `corral-agent image import`");
        }
    }

    let mut agent = tokio::process::Command::new(&agent_bin)
        .arg("run")
        .arg("--control-plane")
        .arg(server.grpc_url())
        .arg("--token-file")
        .arg(&token_file)
        .arg("--data-dir")
        .arg(&agent_dir)
        .arg("--runtime")
        .arg(&config.runtime)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", agent_bin.display()))?;

    // Wait until the agent has registered, so the stack is ready to use.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let hosts = server.control_plane.list_hosts().await.unwrap_or_default();
        if hosts
            .iter()
            .any(|h| h.capacity.as_ref().is_some_and(|c| c.schedulable))
        {
            break;
        }
        if let Ok(Some(status)) = agent.try_wait() {
            anyhow::bail!("the agent exited during start-up ({status})");
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the agent did not register within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let url = server.http_url();
    println!();
    println!(
        "Corral is running: REST {url}, agents {}",
        server.grpc_url()
    );
    println!("Data directory: {}", config.server.data_dir.display());
    println!();
    println!("  export CORRAL_URL={url}");
    println!(
        "  export CORRAL_API_KEY={}      # org 'dev'; shown once",
        key.secret
    );
    println!("  export CORRAL_ADMIN_TOKEN={admin_token}");
    println!();
    println!("  corral sandbox create busybox -- sleep 3600");
    println!("  corral sandbox list");
    println!("  corral admin actors");
    println!();

    let control_plane = server.control_plane.clone();
    tokio::select! {
        _ = shutdown_signal() => {}
        status = agent.wait() => {
            tracing::error!(?status, "the local agent exited");
        }
        _ = control_plane.stopped() => {
            tracing::error!("the actor tree stopped after repeated failures");
        }
    }
    println!("shutting down (sandboxes keep running; they are picked up on the next start)");
    if let Some(pid) = agent.id() {
        let _ = tokio::process::Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .status()
            .await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(10), agent.wait()).await;
    server.shutdown().await;
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

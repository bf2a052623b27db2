//! The `corral-agent` binary: `run` connects a host to the control plane on a
//! chosen runtime; `image` manages the root filesystems the runc runtime
//! uses and imports them into the Docker engine for the docker runtime. Owns flag parsing, runtime selection, host capacity detection,
//! signal handling and log set-up; everything else is in the library.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand, ValueEnum};
use corral_agent::docker::{DockerConfig, DockerRuntime};
use corral_agent::fake::{FakeConfig, FakeRuntime};
use corral_agent::process::ProcessRuntime;
use corral_agent::runc::RuncRuntime;
use corral_agent::runtime::Runtime;
use corral_agent::{images, AgentConfig, WatchdogConfig};

/// jemalloc: glibc's malloc was a sixth of the CPU under load, and
/// mimalloc held a third more memory (docs/performance.md, "Optimisations").
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Debug, Parser)]
#[command(name = "corral-agent", version, about = "The Corral host agent")]
struct Cli {
    /// Log lines as `text` or `json` (levels by RUST_LOG; traces exported
    /// over OTLP when OTEL_EXPORTER_OTLP_ENDPOINT is set).
    #[arg(long, global = true, env = "CORRAL_LOG_FORMAT", default_value = "text")]
    log_format: corral_telemetry::LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Connect this host to the control plane and run sandboxes.
    Run(Box<RunArgs>),
    /// Manage the images (root filesystems) sandboxes are made from.
    #[command(subcommand)]
    Image(ImageCommand),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum RuntimeKind {
    /// runc when running as root with runc on PATH, else process.
    Auto,
    Runc,
    /// Containers of the local Docker Engine (its API socket).
    Docker,
    /// Plain processes, no isolation (development only).
    Process,
    /// In memory, runs nothing (tests and simulation).
    Fake,
}

#[derive(Debug, Args)]
struct DataDir {
    /// Where images, bundles and runtime state live.
    #[arg(
        long,
        env = "CORRAL_AGENT_DATA_DIR",
        default_value = "/var/lib/corral-agent"
    )]
    data_dir: PathBuf,
}

#[derive(Debug, Args)]
struct RunArgs {
    /// The control plane's gRPC address.
    #[arg(
        long,
        env = "CORRAL_CONTROL_PLANE",
        default_value = "http://127.0.0.1:7071"
    )]
    control_plane: String,
    /// The host token.
    #[arg(long, env = "CORRAL_HOST_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// A file holding the host token (wins over --token).
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// PEM CA certificate that signed the control plane's certificate
    /// (for an https:// control plane; default: the system's roots).
    #[arg(long, env = "CORRAL_CA_CERT")]
    ca_cert: Option<PathBuf>,
    /// PEM client certificate to present (mutual TLS).
    #[arg(long, env = "CORRAL_CLIENT_CERT", requires = "client_key")]
    client_cert: Option<PathBuf>,
    /// PEM key of `--client-cert`.
    #[arg(long, env = "CORRAL_CLIENT_KEY", requires = "client_cert")]
    client_key: Option<PathBuf>,
    #[command(flatten)]
    data_dir: DataDir,
    #[arg(long, value_enum, default_value = "auto")]
    runtime: RuntimeKind,
    /// The runc binary (default: `runc` found on PATH).
    #[arg(long)]
    runc: Option<PathBuf>,
    /// CPU capacity offered, in cores (default: the host's CPUs).
    #[arg(long)]
    cpus: Option<f64>,
    /// Memory capacity offered (default: the host's MemTotal).
    #[arg(long)]
    memory_mb: Option<u64>,
    /// The hostname reported (default: this host's name).
    #[arg(long, env = "CORRAL_AGENT_HOSTNAME")]
    hostname: Option<String>,
    /// A host label `key=value` for placement selectors and anti-affinity
    /// (e.g. `--label region=eu --label gpu=a100`); repeatable.
    #[arg(long = "label", value_parser = parse_label)]
    labels: Vec<(String, String)>,
    #[arg(long, default_value_t = 64)]
    max_concurrent_commands: usize,
    /// How often the runtime is polled for changes (and for sandboxes past
    /// their TTL), in milliseconds.
    #[arg(long, default_value_t = 1000)]
    poll_interval_ms: u64,
    /// How long past a sandbox's TTL the agent waits before stopping it
    /// itself (a backstop: the control plane normally acts first).
    #[arg(long, env = "CORRAL_AGENT_TTL_MARGIN_SECS", default_value_t = 30)]
    ttl_margin_secs: u64,
    /// Grace between SIGTERM and SIGKILL when the agent stops a sandbox past
    /// its TTL.
    #[arg(long, env = "CORRAL_AGENT_TTL_STOP_GRACE_SECS", default_value_t = 10)]
    ttl_stop_grace_secs: u64,
    /// Docker runtime: the `corral.namespace` label (and container-name
    /// prefix) that marks this agent's containers on the engine.
    #[arg(
        long,
        env = "CORRAL_AGENT_DOCKER_NAMESPACE",
        default_value = corral_agent::docker::DEFAULT_NAMESPACE
    )]
    docker_namespace: String,
    /// Docker runtime: how long a missing image may take to pull; 0 never
    /// pulls (only local images are used).
    #[arg(
        long,
        env = "CORRAL_AGENT_DOCKER_PULL_TIMEOUT_SECS",
        default_value_t = 30
    )]
    docker_pull_timeout_secs: u64,
    /// Docker runtime: the registry (`host[:port]`) to pull from (default:
    /// the engine's).
    #[arg(long, env = "CORRAL_AGENT_DOCKER_REGISTRY")]
    docker_registry: Option<String>,
    /// Fake runtime: latency added to every command, in milliseconds.
    #[arg(long, default_value_t = 0)]
    fake_latency_ms: u64,
    /// Fake runtime: probability (0..1) that a command fails.
    #[arg(long, default_value_t = 0.0)]
    fake_fail_rate: f64,
    /// Serve the agent's Prometheus metrics on this address (`GET
    /// /metrics`); off when unset.
    #[arg(long, env = "CORRAL_AGENT_METRICS_ADDR")]
    metrics_addr: Option<std::net::SocketAddr>,
}

#[derive(Debug, Subcommand)]
enum ImageCommand {
    /// Import an uncompressed rootfs tarball as image NAME.
    Import {
        name: String,
        tarball: PathBuf,
        #[command(flatten)]
        data_dir: DataDir,
    },
    /// Build the `busybox` image from a static busybox binary.
    BuildBusybox {
        #[command(flatten)]
        data_dir: DataDir,
        /// The busybox binary (default: /bin/busybox, then /usr/bin/busybox).
        #[arg(long)]
        busybox: Option<PathBuf>,
        /// Also import it into the local Docker engine as `busybox:latest`.
        #[arg(long)]
        docker: bool,
    },
    /// Import image NAME of the data directory into the local Docker engine
    /// as `NAME:latest` (for the docker runtime).
    DockerImport {
        name: String,
        #[command(flatten)]
        data_dir: DataDir,
    },
    /// List the images.
    List {
        #[command(flatten)]
        data_dir: DataDir,
    },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let format = cli.log_format;
    let result = match cli.command {
        Command::Run(args) => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("starting the async runtime")
            .and_then(|rt| {
                rt.block_on(async {
                    // Inside the runtime: the OTLP exporter's client needs it.
                    let mut telemetry = corral_telemetry::init("corral-agent", format);
                    let result = run(*args).await;
                    tokio::task::block_in_place(|| telemetry.shutdown());
                    result
                })
            }),
        Command::Image(command) => {
            let _telemetry = corral_telemetry::init_logs(format);
            image(command)
        }
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("corral-agent: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn image(command: ImageCommand) -> anyhow::Result<()> {
    match command {
        ImageCommand::Import {
            name,
            tarball,
            data_dir,
        } => {
            let root = images::import(&data_dir.data_dir, &name, &tarball)?;
            println!("imported {name} into {}", root.display());
        }
        ImageCommand::BuildBusybox {
            data_dir,
            busybox,
            docker,
        } => {
            let root = images::build_busybox(&data_dir.data_dir, busybox.as_deref())?;
            println!("busybox image at {}", root.display());
            if docker {
                docker_import(images::BUSYBOX_IMAGE, &root)?;
            }
        }
        ImageCommand::DockerImport { name, data_dir } => {
            let root = images::rootfs(&data_dir.data_dir, &name)?;
            docker_import(&name, &root)?;
        }
        ImageCommand::List { data_dir } => {
            for name in images::list(&data_dir.data_dir) {
                println!("{name}");
            }
        }
    }
    Ok(())
}

/// `docker import` of a rootfs directory as `name:latest`, through the API.
fn docker_import(name: &str, rootfs: &Path) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async {
        let docker = corral_agent::docker::connect().await?;
        corral_agent::docker::import_rootfs(&docker, name, rootfs).await
    })?;
    println!(
        "imported {name} into the Docker engine as {}",
        corral_agent::docker::docker_reference(name)
    );
    Ok(())
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let token = match (&args.token_file, &args.token) {
        (Some(file), _) => std::fs::read_to_string(file)
            .with_context(|| format!("reading the token file {}", file.display()))?
            .trim()
            .to_string(),
        (None, Some(token)) => token.trim().to_string(),
        (None, None) => {
            bail!("a host token is required: --token, CORRAL_HOST_TOKEN or --token-file")
        }
    };
    if !(0.0..=1.0).contains(&args.fake_fail_rate) {
        bail!("--fake-fail-rate must be between 0 and 1");
    }
    if let Some(addr) = args.metrics_addr {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding --metrics-addr {addr}"))?;
        tracing::info!(%addr, "serving metrics");
        tokio::spawn(async move {
            if let Err(err) = corral_agent::metrics::serve(listener).await {
                tracing::error!(error = %err, "the metrics server failed");
            }
        });
    }
    let data_dir = args.data_dir.data_dir.clone();
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("creating the data directory {}", data_dir.display()))?;

    let runtime: Arc<dyn Runtime> = match choose_runtime(args.runtime, args.runc.clone())? {
        Chosen::Runc(runc) => {
            tracing::info!(runc = %runc.display(), data_dir = %data_dir.display(), "using the runc runtime");
            // So the containers' inits become our children and their exit
            // codes can be reported.
            if let Err(e) = corral_agent::runc::become_subreaper() {
                tracing::warn!(error = %e, "exit codes of sandboxes will be unknown");
            }
            Arc::new(RuncRuntime::new(&data_dir, runc))
        }
        Chosen::Docker => {
            let config = DockerConfig {
                namespace: args.docker_namespace.clone(),
                pull_timeout: (args.docker_pull_timeout_secs > 0)
                    .then(|| Duration::from_secs(args.docker_pull_timeout_secs)),
                registry: args.docker_registry.clone(),
            };
            let docker = corral_agent::docker::connect()
                .await
                .context("--runtime docker needs a reachable Docker engine")?;
            tracing::info!(namespace = %config.namespace, pull_timeout = ?config.pull_timeout, "using the docker runtime");
            Arc::new(DockerRuntime::new(docker, config).await?)
        }
        Chosen::Process => Arc::new(ProcessRuntime::new(&data_dir)),
        Chosen::Fake => {
            tracing::info!("using the fake runtime: sandboxes are simulated, nothing runs");
            Arc::new(FakeRuntime::new(FakeConfig {
                latency: Duration::from_millis(args.fake_latency_ms),
                fail_rate: args.fake_fail_rate,
                ..FakeConfig::default()
            }))
        }
    };

    let cpu_millis = match args.cpus {
        Some(cpus) if cpus > 0.0 && cpus < 1e6 => (cpus * 1000.0).round() as u32,
        Some(cpus) => bail!("--cpus must be positive, got {cpus}"),
        None => detect_cpu_millis(),
    };
    let memory_mb = match args.memory_mb {
        Some(mb) => mb,
        None => {
            detect_memory_mb().context("reading MemTotal from /proc/meminfo (pass --memory-mb)")?
        }
    };
    let hostname = args.hostname.clone().unwrap_or_else(detect_hostname);
    tracing::info!(
        control_plane = %args.control_plane,
        hostname = %hostname,
        cpu_millis,
        memory_mb,
        runtime = runtime.kind(),
        images = ?runtime.images(),
        "starting the agent"
    );
    let config = AgentConfig {
        control_plane_url: args.control_plane.clone(),
        token,
        hostname,
        cpu_millis,
        memory_mb,
        max_concurrent_commands: args.max_concurrent_commands.max(1),
        poll_interval: Duration::from_millis(args.poll_interval_ms.max(10)),
        tls: agent_tls(&args)?,
        labels: args.labels.iter().cloned().collect(),
    };
    let watchdog = WatchdogConfig {
        ttl_margin: Duration::from_secs(args.ttl_margin_secs),
        stop_grace: Duration::from_secs(args.ttl_stop_grace_secs),
    };
    tracing::info!(
        ttl_margin = ?watchdog.ttl_margin,
        stop_grace = ?watchdog.stop_grace,
        "the TTL watchdog stops sandboxes past their TTL plus the margin"
    );
    corral_agent::run_agent_with(config, watchdog, runtime, shutdown_signal()).await?;
    tracing::info!("agent stopped; sandboxes keep running");
    Ok(())
}

enum Chosen {
    Runc(PathBuf),
    Docker,
    Process,
    Fake,
}

fn choose_runtime(kind: RuntimeKind, runc: Option<PathBuf>) -> anyhow::Result<Chosen> {
    let runc = runc.or_else(|| find_on_path("runc"));
    let root = nix::unistd::geteuid().is_root();
    Ok(match kind {
        RuntimeKind::Runc => {
            let Some(runc) = runc else {
                bail!("--runtime runc: no runc binary found on PATH (install runc or pass --runc)");
            };
            if !root {
                bail!("--runtime runc needs root");
            }
            Chosen::Runc(runc)
        }
        RuntimeKind::Docker => Chosen::Docker,
        RuntimeKind::Process => Chosen::Process,
        RuntimeKind::Fake => Chosen::Fake,
        RuntimeKind::Auto => match (root, runc) {
            (true, Some(runc)) => {
                tracing::info!("runtime auto: running as root and runc is installed, so runc");
                Chosen::Runc(runc)
            }
            (false, _) => {
                tracing::warn!(
                    "runtime auto: not running as root, so the process runtime (no isolation)"
                );
                Chosen::Process
            }
            (true, None) => {
                tracing::warn!(
                    "runtime auto: runc is not on PATH, so the process runtime (no isolation)"
                );
                Chosen::Process
            }
        },
    })
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    let paths = std::env::var_os("PATH")?;
    std::env::split_paths(&paths)
        .map(|p| p.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn detect_cpu_millis() -> u32 {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    u32::try_from(cpus)
        .unwrap_or(u32::MAX / 1000)
        .saturating_mul(1000)
}

fn detect_memory_mb() -> anyhow::Result<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo")?;
    parse_mem_total_mb(&meminfo).context("no MemTotal line")
}

fn parse_mem_total_mb(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024)
}

fn detect_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGTERM");
            None
        }
    };
    let term = async {
        match term.as_mut() {
            Some(s) => {
                s.recv().await;
            }
            None => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
        _ = term => tracing::info!("SIGTERM received"),
    }
}

/// Reads the TLS files now, so a bad path fails at start, not at each dial.
fn agent_tls(args: &RunArgs) -> anyhow::Result<corral_agent::AgentTls> {
    let read = |path: &PathBuf, what: &str| {
        std::fs::read(path).with_context(|| format!("reading the {what} {}", path.display()))
    };
    let tls = corral_agent::AgentTls {
        ca_pem: args
            .ca_cert
            .as_ref()
            .map(|p| read(p, "CA certificate"))
            .transpose()?,
        identity: match (&args.client_cert, &args.client_key) {
            (Some(cert), Some(key)) => {
                Some((read(cert, "client certificate")?, read(key, "client key")?))
            }
            _ => None,
        },
    };
    let plaintext = args.control_plane.starts_with("http://");
    if plaintext && (tls.ca_pem.is_some() || tls.identity.is_some()) {
        bail!("--ca-cert and --client-cert need an https:// control plane");
    }
    if plaintext {
        let loopback = ["http://127.", "http://localhost", "http://[::1]"]
            .iter()
            .any(|p| args.control_plane.starts_with(p));
        if !loopback {
            tracing::warn!(control_plane = %args.control_plane, "dialing the control plane in PLAINTEXT: the host token crosses the network in the clear");
        }
    }
    Ok(tls)
}

/// `key=value`, with a key of 1-63 characters of a-z, 0-9, `.`, `_`, `/`,
/// `-` (the control plane's label rules).
fn parse_label(text: &str) -> Result<(String, String), String> {
    let (key, value) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?} is not key=value"))?;
    let key_ok = !key.is_empty()
        && key.len() <= 63
        && key.as_bytes()[0].is_ascii_alphanumeric()
        && key
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._/-".contains(&b));
    if !key_ok {
        return Err(format!(
            "label key {key:?} must be 1-63 characters of a-z, 0-9, '.', '_', '/' and '-'"
        ));
    }
    if value.len() > 256 || value.chars().any(char::is_control) {
        return Err(format!(
            "label {key} must have a value of at most 256 printable bytes"
        ));
    }
    Ok((key.to_string(), value.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_total_is_read_in_megabytes() {
        let meminfo = "MemTotal:       16303948 kB\nMemFree:         1234 kB\n";
        assert_eq!(parse_mem_total_mb(meminfo), Some(15921));
        assert_eq!(parse_mem_total_mb("nothing"), None);
    }

    #[test]
    fn the_cli_parses_run_and_image_commands() {
        let cli = Cli::try_parse_from([
            "corral-agent",
            "run",
            "--token",
            "t",
            "--runtime",
            "fake",
            "--data-dir",
            "/tmp/x",
        ])
        .expect("run parses");
        assert!(matches!(cli.command, Command::Run(ref a) if a.runtime == RuntimeKind::Fake));
        assert!(
            matches!(cli.command, Command::Run(ref a) if a.ttl_margin_secs == 30 && a.ttl_stop_grace_secs == 10),
            "TTL defaults"
        );
        let cli = Cli::try_parse_from([
            "corral-agent",
            "run",
            "--token",
            "t",
            "--ttl-margin-secs",
            "5",
            "--ttl-stop-grace-secs",
            "2",
        ])
        .expect("ttl flags parse");
        assert!(
            matches!(cli.command, Command::Run(ref a) if a.ttl_margin_secs == 5 && a.ttl_stop_grace_secs == 2)
        );
        let cli = Cli::try_parse_from([
            "corral-agent",
            "image",
            "import",
            "alpine",
            "rootfs.tar",
            "--data-dir",
            "/tmp/x",
        ])
        .expect("import parses");
        assert!(
            matches!(cli.command, Command::Image(ImageCommand::Import { ref name, .. }) if name == "alpine")
        );
        assert!(Cli::try_parse_from(["corral-agent", "image", "build-busybox"]).is_ok());
        let cli = Cli::try_parse_from([
            "corral-agent",
            "run",
            "--token",
            "t",
            "--runtime",
            "docker",
            "--docker-namespace",
            "test1",
            "--docker-pull-timeout-secs",
            "0",
        ])
        .expect("docker flags parse");
        assert!(matches!(cli.command, Command::Run(ref a)
            if a.runtime == RuntimeKind::Docker
                && a.docker_namespace == "test1"
                && a.docker_pull_timeout_secs == 0));
        assert!(
            Cli::try_parse_from(["corral-agent", "image", "build-busybox", "--docker"]).is_ok()
        );
        assert!(Cli::try_parse_from(["corral-agent", "image", "docker-import", "busybox"]).is_ok());
    }
}

//! The Corral host agent: it dials out to the control plane, registers its
//! host's capacity and inventory, and runs sandbox commands on a runtime.
//!
//! - [`runtime`]: the `Runtime` trait, its types, validation and protocol
//!   conversions;
//! - [`runc`], [`docker`], [`process`], [`fake`]: the runtimes;
//! - [`images`]: the image store (root filesystems);
//! - [`connection`]: the dial-out loop, command dispatch, heartbeats, events;
//! - [`watchdog`]: the TTL backstop that stops sandboxes past their deadline
//!   (plus a margin) for the whole life of the agent, connected or not.
//!
//! The agent holds no state of its own beyond its credentials: the runtime
//! is the source of truth (TTL deadlines included), so an agent restart loses
//! nothing and never stops a sandbox by itself; only the watchdog stops
//! sandboxes, and only those past their TTL.

pub mod connection;
pub mod docker;
mod exec_io;
pub mod fake;
pub mod hardening;
pub mod images;
pub mod metrics;
pub mod process;
pub mod runc;
pub mod runtime;
pub mod watchdog;

use std::sync::Arc;
use std::time::Duration;

pub use watchdog::WatchdogConfig;

/// How the agent reaches the control plane and what it offers.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The control plane's gRPC address, e.g. `http://127.0.0.1:7071`.
    pub control_plane_url: String,
    /// The host token; sent as `authorization: Bearer <token>`.
    pub token: String,
    pub hostname: String,
    /// Capacity offered, in thousandths of a core.
    pub cpu_millis: u32,
    pub memory_mb: u64,
    /// Commands run at once; beyond it, commands are answered BUSY.
    pub max_concurrent_commands: usize,
    /// How often the runtime is listed to notice changes on its own.
    pub poll_interval: Duration,
    /// How an `https://` control plane is verified, and the certificate
    /// the agent presents (mutual TLS).
    pub tls: AgentTls,
    /// Host labels reported at registration (`--label k=v`), for placement
    /// selectors and anti-affinity.
    pub labels: std::collections::BTreeMap<String, String>,
}

/// TLS settings of the agent's dial (PEM contents, read at start-up).
#[derive(Debug, Clone, Default)]
pub struct AgentTls {
    /// The CA that signed the control plane's certificate; the system's
    /// roots when `None`.
    pub ca_pem: Option<Vec<u8>>,
    /// A client certificate and its key, for a control plane that demands
    /// one (`--client-ca`).
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl AgentTls {
    /// tonic's client TLS config for these settings.
    pub fn client_config(&self) -> tonic::transport::ClientTlsConfig {
        let mut config = tonic::transport::ClientTlsConfig::new();
        config = match &self.ca_pem {
            Some(ca) => config.ca_certificate(tonic::transport::Certificate::from_pem(ca)),
            None => config.with_native_roots(),
        };
        if let Some((cert, key)) = &self.identity {
            config = config.identity(tonic::transport::Identity::from_pem(cert, key));
        }
        config
    }
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            control_plane_url: "http://127.0.0.1:7071".into(),
            token: String::new(),
            hostname: "localhost".into(),
            cpu_millis: 1000,
            memory_mb: 1024,
            max_concurrent_commands: 64,
            poll_interval: Duration::from_secs(1),
            tls: AgentTls::default(),
            labels: Default::default(),
        }
    }
}

/// [`run_agent_with`] with the default watchdog settings (a 30 s TTL margin,
/// a 10 s stop grace).
pub async fn run_agent(
    config: AgentConfig,
    runtime: Arc<dyn runtime::Runtime>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    run_agent_with(config, WatchdogConfig::default(), runtime, shutdown).await
}

/// Runs until `shutdown` resolves; reconnects forever with backoff (base
/// 200 ms, cap 5 s, full jitter; reset after a successful register), and
/// runs the TTL watchdog every `config.poll_interval` throughout, whether a
/// control plane is reachable or not. Returns an error only for a
/// configuration that can never work (an empty token or one that cannot be
/// a header).
pub async fn run_agent_with(
    config: AgentConfig,
    watchdog: WatchdogConfig,
    runtime: Arc<dyn runtime::Runtime>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let link = Arc::new(connection::SessionLink::default());
    let _watchdog = AbortOnDrop(tokio::spawn(watchdog::run(
        runtime.clone(),
        link.clone(),
        watchdog,
        config.poll_interval,
    )));
    connection::run(config, runtime, link, shutdown).await
}

/// Ends a background task when the agent returns.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

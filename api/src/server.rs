//! Running the control plane: configuration (flags with `CORRAL_*`
//! environment fallbacks), the REST and gRPC listeners, and an orderly
//! shutdown (stop taking REST requests and drain them, then close the agent
//! streams, then stop the actor tree; LESSONS 33).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use corral_actors::actors::Timeouts;
use corral_actors::billing::BillingPolicy;
use corral_actors::store::hash_secret;
use corral_actors::{ControlPlane, ControlPlaneConfig};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::grpc::AgentGateway;
use crate::AppState;

#[derive(clap::Args, Debug, Clone)]
pub struct ServerConfig {
    /// Address of the REST API.
    #[arg(long, env = "CORRAL_HTTP_ADDR", default_value = "127.0.0.1:7070")]
    pub http_addr: SocketAddr,
    /// Address of the agent gRPC service.
    #[arg(long, env = "CORRAL_GRPC_ADDR", default_value = "127.0.0.1:7071")]
    pub grpc_addr: SocketAddr,
    /// Directory for the SQLite database (when DATABASE_URL is unset).
    #[arg(long, env = "CORRAL_DATA_DIR", default_value = ".corral")]
    pub data_dir: PathBuf,
    /// A SeaORM database URL (postgres://... or sqlite://...); defaults to
    /// SQLite in the data directory.
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: Option<String>,
    /// The platform admin token. Admin routes are closed without one.
    #[arg(long, env = "CORRAL_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// How often agents send heartbeats, in milliseconds.
    #[arg(long, env = "CORRAL_HEARTBEAT_MS", default_value_t = 2000)]
    pub heartbeat_ms: u64,
    /// How long a stopping sandbox gets before it is killed, in milliseconds.
    #[arg(long, env = "CORRAL_STOP_GRACE_MS", default_value_t = 10_000)]
    pub stop_grace_ms: u64,
    /// How long a disconnected host keeps its sandboxes before it is offline
    /// and they are lost, in milliseconds.
    #[arg(long, env = "CORRAL_OFFLINE_GRACE_MS", default_value_t = 60_000)]
    pub offline_grace_ms: u64,
    /// How often each connected host's inventory is reconciled with the
    /// database, in milliseconds.
    #[arg(long, env = "CORRAL_RECONCILE_INTERVAL_MS", default_value_t = 30_000)]
    pub reconcile_interval_ms: u64,
    /// How long an unaccounted container may stay on a host before it is
    /// destroyed, in milliseconds.
    #[arg(long, env = "CORRAL_ORPHAN_GRACE_MS", default_value_t = 60_000)]
    pub orphan_grace_ms: u64,
    /// The longest a sandbox may stay creating/starting/stopping/destroying
    /// before the step is given up, in milliseconds.
    #[arg(long, env = "CORRAL_TRANSITION_DEADLINE_MS", default_value_t = 600_000)]
    pub transition_deadline_ms: u64,
    /// How long a sandbox with nothing to do keeps its actor before it goes
    /// dormant (held by its host in a few bytes, woken from its row when
    /// something concerns it), in milliseconds; 0 keeps every actor.
    #[arg(
        long,
        env = "CORRAL_SANDBOX_DORMANT_AFTER_MS",
        default_value_t = 30_000
    )]
    pub sandbox_dormant_after_ms: u64,
    /// How often running sandboxes are charged, in milliseconds.
    #[arg(long, env = "CORRAL_BILLING_INTERVAL_MS", default_value_t = 10_000)]
    pub billing_interval_ms: u64,
    /// How long a running sandbox's usage period grows before it is
    /// written to the ledger, in milliseconds (0: every tick). The balance,
    /// the gate and the status count every tick's charge at once; this
    /// only sets how many rows the ledger gets.
    #[arg(long, env = "CORRAL_BILLING_WRITE_EVERY_MS", default_value_t = 60_000)]
    pub billing_write_every_ms: u64,
    /// At or below this balance (micro-units) an org is in `warning`.
    #[arg(
        long,
        env = "CORRAL_BILLING_WARNING_MICROS",
        default_value_t = 1_000_000
    )]
    pub billing_warning_micros: i64,
    /// How long an org without credit stays in `grace` before it is
    /// suspended, in milliseconds.
    #[arg(long, env = "CORRAL_BILLING_GRACE_MS", default_value_t = 900_000)]
    pub billing_grace_ms: u64,
    /// A create or start needs the balance, less the holds of live
    /// sandboxes, to stay at or above this (micro-units).
    #[arg(long, env = "CORRAL_BILLING_MIN_BALANCE_MICROS", default_value_t = 0)]
    pub billing_min_balance_micros: i64,
    /// The running time each live sandbox holds credit for, in milliseconds.
    #[arg(long, env = "CORRAL_BILLING_HOLD_WINDOW_MS", default_value_t = 60_000)]
    pub billing_hold_window_ms: u64,
    /// Sustained requests per second each API key (and the admin token)
    /// may make.
    #[arg(long, env = "CORRAL_RATE_LIMIT_PER_SECOND", default_value_t = 200)]
    pub rate_limit_per_second: u32,
    /// Requests a key may make in a burst before the rate applies.
    #[arg(long, env = "CORRAL_RATE_LIMIT_BURST", default_value_t = 1000)]
    pub rate_limit_burst: u32,
    /// The largest request body, in bytes.
    #[arg(long, env = "CORRAL_MAX_BODY_BYTES", default_value_t = 1 << 20)]
    pub max_body_bytes: usize,
    /// The deadline of every REST request but exec, in milliseconds.
    #[arg(long, env = "CORRAL_REQUEST_TIMEOUT_MS", default_value_t = 120_000)]
    pub request_timeout_ms: u64,
    /// How many execs may run in one sandbox at once.
    #[arg(long, env = "CORRAL_MAX_EXECS_PER_SANDBOX", default_value_t = 32)]
    pub max_execs_per_sandbox: usize,
    /// PEM certificate (chain) to serve REST and gRPC over TLS.
    #[arg(long, env = "CORRAL_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `--tls-cert`.
    #[arg(long, env = "CORRAL_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA certificate: agents must present a certificate it signed
    /// (mutual TLS on the agent service). Needs `--tls-cert`.
    #[arg(long, env = "CORRAL_CLIENT_CA")]
    pub client_ca: Option<PathBuf>,
    /// Serve plaintext on a non-loopback address anyway (tokens then cross
    /// the network in the clear; LESSONS 11).
    #[arg(long, env = "CORRAL_ALLOW_PLAINTEXT")]
    pub allow_plaintext: bool,
    /// Log lines as `text` or `json` (levels by RUST_LOG; traces exported
    /// over OTLP when OTEL_EXPORTER_OTLP_ENDPOINT is set).
    #[arg(long, env = "CORRAL_LOG_FORMAT", default_value = "text")]
    pub log_format: corral_telemetry::LogFormat,
    /// CPU kept back on every host for the system, in thousandths of a core.
    #[arg(long, env = "CORRAL_RESERVE_CPU_MILLIS", default_value_t = 0)]
    pub reserve_cpu_millis: u64,
    /// Memory kept back on every host for the system, in MiB.
    #[arg(long, env = "CORRAL_RESERVE_MEMORY_MB", default_value_t = 0)]
    pub reserve_memory_mb: u64,
    /// Reservations may reach a host's allocatable capacity times this
    /// (1.0: no overcommit).
    #[arg(long, env = "CORRAL_OVERCOMMIT", default_value_t = 1.0)]
    pub overcommit: f64,
    /// How hosts are chosen: `spread` (least loaded) or `binpack`.
    #[arg(long, env = "CORRAL_PLACEMENT_STRATEGY", default_value = "spread")]
    pub placement_strategy: String,
    /// Refuse requests that choose their own placement strategy.
    #[arg(long, env = "CORRAL_NO_STRATEGY_OVERRIDE")]
    pub no_strategy_override: bool,
    /// Hosts a create is tried on when hosts fail it (runtime errors).
    #[arg(long, env = "CORRAL_MAX_CREATE_ATTEMPTS", default_value_t = 3)]
    pub max_create_attempts: u32,
    /// File holding the key that encrypts sandbox secret env values at rest
    /// (64 hex digits; `corral dev` makes `<data dir>/secret.key`). Without
    /// one, creates with `secret_env` are refused (422 secrets_unavailable).
    #[arg(long, env = "CORRAL_SECRET_KEY_FILE")]
    pub secret_key_file: Option<PathBuf>,
    /// Let sandboxes ask for `network: host` (the host's network stack).
    /// Without it such creates are refused (403 network_not_allowed).
    #[arg(long, env = "CORRAL_ALLOW_HOST_NETWORK")]
    pub allow_host_network: bool,
}

impl ServerConfig {
    /// A config for tests and embedding: loopback, ephemeral ports.
    pub fn local(data_dir: PathBuf, admin_token: Option<String>) -> Self {
        Self {
            http_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            grpc_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            data_dir,
            database_url: None,
            admin_token,
            heartbeat_ms: 2000,
            stop_grace_ms: 10_000,
            offline_grace_ms: 60_000,
            reconcile_interval_ms: 30_000,
            orphan_grace_ms: 60_000,
            transition_deadline_ms: 600_000,
            sandbox_dormant_after_ms: 30_000,
            billing_interval_ms: 10_000,
            billing_write_every_ms: 60_000,
            billing_warning_micros: 1_000_000,
            billing_grace_ms: 900_000,
            billing_min_balance_micros: 0,
            billing_hold_window_ms: 60_000,
            rate_limit_per_second: 200,
            rate_limit_burst: 1000,
            max_body_bytes: 1 << 20,
            request_timeout_ms: 120_000,
            max_execs_per_sandbox: 32,
            tls_cert: None,
            tls_key: None,
            client_ca: None,
            allow_plaintext: false,
            log_format: corral_telemetry::LogFormat::Text,
            reserve_cpu_millis: 0,
            reserve_memory_mb: 0,
            overcommit: 1.0,
            placement_strategy: "spread".into(),
            no_strategy_override: false,
            max_create_attempts: 3,
            secret_key_file: None,
            allow_host_network: false,
        }
    }

    /// The TLS material, if TLS is configured (read and checked now).
    fn tls(&self) -> anyhow::Result<Option<crate::tls::TlsFiles>> {
        match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Ok(Some(crate::tls::TlsFiles::load(
                cert,
                key,
                self.client_ca.as_ref(),
            )?)),
            (None, None) => {
                anyhow::ensure!(
                    self.client_ca.is_none(),
                    "--client-ca needs --tls-cert and --tls-key"
                );
                let exposed: Vec<String> = [self.http_addr, self.grpc_addr]
                    .iter()
                    .filter(|a| !a.ip().is_loopback())
                    .map(ToString::to_string)
                    .collect();
                if !exposed.is_empty() {
                    anyhow::ensure!(
                        self.allow_plaintext,
                        "refusing to serve plaintext on {} (not loopback): give --tls-cert and --tls-key, or --allow-plaintext if something else encrypts the traffic",
                        exposed.join(", ")
                    );
                    tracing::warn!(addresses = %exposed.join(", "), "serving PLAINTEXT on a non-loopback address (--allow-plaintext): API keys and host tokens cross the network in the clear");
                }
                Ok(None)
            }
            _ => anyhow::bail!("--tls-cert and --tls-key go together"),
        }
    }

    fn limits(&self) -> crate::limits::LimitsConfig {
        crate::limits::LimitsConfig {
            rate_per_second: self.rate_limit_per_second,
            burst: self.rate_limit_burst,
            max_body_bytes: self.max_body_bytes,
            request_timeout: Duration::from_millis(self.request_timeout_ms),
            max_execs_per_sandbox: self.max_execs_per_sandbox,
        }
    }

    pub fn database_url(&self) -> String {
        match &self.database_url {
            Some(url) => url.clone(),
            None => format!(
                "sqlite://{}?mode=rwc",
                self.data_dir.join("corral.db").display()
            ),
        }
    }

    /// The scheduling flags, checked.
    pub fn scheduling(&self) -> anyhow::Result<corral_actors::actors::scheduler::SchedulingPolicy> {
        let strategy = corral_actors::domain::PlacementStrategy::parse(&self.placement_strategy)
            .ok_or_else(|| anyhow::anyhow!("--placement-strategy must be spread or binpack"))?;
        anyhow::ensure!(
            self.overcommit.is_finite() && (1.0..=100.0).contains(&self.overcommit),
            "--overcommit must be between 1.0 and 100.0"
        );
        anyhow::ensure!(
            (1..=20).contains(&self.max_create_attempts),
            "--max-create-attempts must be between 1 and 20"
        );
        Ok(corral_actors::actors::scheduler::SchedulingPolicy {
            reserve: corral_actors::domain::Resources {
                cpu_millis: self.reserve_cpu_millis,
                memory_mb: self.reserve_memory_mb,
            },
            overcommit: self.overcommit,
            strategy,
            allow_strategy_override: !self.no_strategy_override,
            max_create_attempts: self.max_create_attempts,
        })
    }

    fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            (100..=60_000).contains(&self.heartbeat_ms),
            "--heartbeat-ms must be between 100 and 60000"
        );
        anyhow::ensure!(
            self.stop_grace_ms <= 600_000,
            "--stop-grace-ms must be at most 600000"
        );
        for (flag, value, min, max) in [
            ("--offline-grace-ms", self.offline_grace_ms, 100, 86_400_000),
            (
                "--reconcile-interval-ms",
                self.reconcile_interval_ms,
                100,
                3_600_000,
            ),
            ("--orphan-grace-ms", self.orphan_grace_ms, 0, 86_400_000),
            (
                "--transition-deadline-ms",
                self.transition_deadline_ms,
                1_000,
                86_400_000,
            ),
            (
                "--sandbox-dormant-after-ms",
                self.sandbox_dormant_after_ms,
                0,
                86_400_000,
            ),
            (
                "--billing-interval-ms",
                self.billing_interval_ms,
                100,
                3_600_000,
            ),
            (
                "--billing-write-every-ms",
                self.billing_write_every_ms,
                0,
                86_400_000,
            ),
            (
                "--billing-grace-ms",
                self.billing_grace_ms,
                0,
                30 * 86_400_000,
            ),
            (
                "--billing-hold-window-ms",
                self.billing_hold_window_ms,
                0,
                86_400_000,
            ),
        ] {
            anyhow::ensure!(
                (min..=max).contains(&value),
                "{flag} must be between {min} and {max}"
            );
        }
        for (flag, value, min, max) in [
            (
                "--rate-limit-per-second",
                u64::from(self.rate_limit_per_second),
                1,
                1_000_000,
            ),
            (
                "--rate-limit-burst",
                u64::from(self.rate_limit_burst),
                1,
                1_000_000,
            ),
            (
                "--max-body-bytes",
                self.max_body_bytes as u64,
                1024,
                64 << 20,
            ),
            (
                "--request-timeout-ms",
                self.request_timeout_ms,
                10,
                3_600_000,
            ),
            (
                "--max-execs-per-sandbox",
                self.max_execs_per_sandbox as u64,
                1,
                10_000,
            ),
        ] {
            anyhow::ensure!(
                (min..=max).contains(&value),
                "{flag} must be between {min} and {max}"
            );
        }
        if let Some(token) = &self.admin_token {
            anyhow::ensure!(
                token.len() >= 16,
                "the admin token must be at least 16 characters"
            );
        }
        Ok(())
    }
}

/// A running server; dropping it does not stop it, [`Server::shutdown`] does.
pub struct Server {
    pub http_addr: SocketAddr,
    pub grpc_addr: SocketAddr,
    /// Whether both listeners speak TLS.
    pub tls: bool,
    pub control_plane: ControlPlane,
    shutdown: watch::Sender<bool>,
    http_task: tokio::task::JoinHandle<()>,
    grpc_task: tokio::task::JoinHandle<()>,
}

impl Server {
    pub async fn start(config: ServerConfig) -> anyhow::Result<Self> {
        config.validate()?;
        crate::tls::install_crypto_provider();
        let tls = config.tls()?;
        if config.database_url.is_none() {
            std::fs::create_dir_all(&config.data_dir).with_context(|| {
                format!("creating data directory {}", config.data_dir.display())
            })?;
        }
        let timeouts = Timeouts {
            heartbeat_interval: Duration::from_millis(config.heartbeat_ms),
            stop_grace: Duration::from_millis(config.stop_grace_ms),
            offline_grace: Duration::from_millis(config.offline_grace_ms),
            reconcile_interval: Duration::from_millis(config.reconcile_interval_ms),
            orphan_grace: Duration::from_millis(config.orphan_grace_ms),
            transition_deadline: Duration::from_millis(config.transition_deadline_ms),
            dormant_after: (config.sandbox_dormant_after_ms > 0)
                .then(|| Duration::from_millis(config.sandbox_dormant_after_ms)),
            ..Timeouts::default()
        };
        let billing = BillingPolicy {
            interval: Duration::from_millis(config.billing_interval_ms),
            write_every: Duration::from_millis(config.billing_write_every_ms),
            warning_threshold_micros: config.billing_warning_micros,
            grace: Duration::from_millis(config.billing_grace_ms),
            min_balance_micros: config.billing_min_balance_micros,
            hold_window: Duration::from_millis(config.billing_hold_window_ms),
        };
        let secret_key = config
            .secret_key_file
            .as_deref()
            .map(corral_actors::secrets::SecretKey::from_file)
            .transpose()
            .map_err(|e| anyhow::anyhow!(e))?;
        let control_plane = ControlPlane::start(ControlPlaneConfig {
            database_url: config.database_url(),
            timeouts,
            billing,
            scheduling: config.scheduling()?,
            secret_key,
        })
        .await
        .map_err(|e| anyhow::anyhow!("starting the control plane: {e:?}"))?;

        let agent_streams = crate::grpc::LiveConnections::default();
        let state = AppState {
            control_plane: control_plane.clone(),
            admin_token_hash: config.admin_token.as_deref().map(hash_secret),
            api_keys: Default::default(),
            limits: crate::limits::Limits::new(config.limits()),
            agent_streams: agent_streams.clone(),
            http_metrics: Default::default(),
            allow_host_network: config.allow_host_network,
        };
        let (shutdown, _) = watch::channel(false);

        let http_listener = TcpListener::bind(config.http_addr)
            .await
            .with_context(|| format!("binding the REST API to {}", config.http_addr))?;
        let grpc_listener = TcpListener::bind(config.grpc_addr)
            .await
            .with_context(|| format!("binding the agent service to {}", config.grpc_addr))?;
        let http_addr = http_listener.local_addr()?;
        let grpc_addr = grpc_listener.local_addr()?;

        let mut http_stop = shutdown.subscribe();
        let app = crate::rest::router(state).into_make_service_with_connect_info::<SocketAddr>();
        let stopped = async move {
            let _ = http_stop.wait_for(|stop| *stop).await;
        };
        let http_task = match &tls {
            Some(tls) => {
                use axum::serve::ListenerExt;
                // tap_io only so axum's ConnectInfo<SocketAddr> applies.
                let listener =
                    crate::tls::TlsListener::new(http_listener, tls.rest_config()?)?.tap_io(|_| {});
                tokio::spawn(async move {
                    let served = axum::serve(listener, app)
                        .with_graceful_shutdown(stopped)
                        .await;
                    if let Err(err) = served {
                        tracing::error!(error = %err, "REST server failed");
                    }
                })
            }
            None => tokio::spawn(async move {
                let served = axum::serve(http_listener, app)
                    .with_graceful_shutdown(stopped)
                    .await;
                if let Err(err) = served {
                    tracing::error!(error = %err, "REST server failed");
                }
            }),
        };

        let mut grpc_stop = shutdown.subscribe();
        let gateway = AgentGateway::new(control_plane.clone(), agent_streams).into_service();
        let grpc_tls = tls.as_ref().map(crate::tls::TlsFiles::grpc_config);
        let grpc_task = tokio::spawn(async move {
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(grpc_listener);
            let mut builder = tonic::transport::Server::builder();
            if let Some(tls) = grpc_tls {
                builder = match builder.tls_config(tls) {
                    Ok(builder) => builder,
                    Err(err) => {
                        tracing::error!(error = %err, "agent service TLS failed");
                        return;
                    }
                };
            }
            let served = builder
                .http2_keepalive_interval(Some(Duration::from_secs(10)))
                .http2_keepalive_timeout(Some(Duration::from_secs(20)))
                .add_service(gateway)
                .serve_with_incoming_shutdown(incoming, async move {
                    let _ = grpc_stop.wait_for(|stop| *stop).await;
                })
                .await;
            if let Err(err) = served {
                tracing::error!(error = %err, "agent service failed");
            }
        });

        tracing::info!(%http_addr, %grpc_addr, tls = tls.is_some(), mutual_tls = tls.as_ref().is_some_and(|t| t.client_ca_pem.is_some()), "control plane listening");
        Ok(Self {
            http_addr,
            grpc_addr,
            tls: tls.is_some(),
            control_plane,
            shutdown,
            http_task,
            grpc_task,
        })
    }

    pub fn http_url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.http_addr)
    }

    pub fn grpc_url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.grpc_addr)
    }

    /// REST first (drains in-flight requests), then agent streams, then the
    /// actor tree.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(30), self.http_task).await;
        // Streaming RPCs never finish on their own: stop the actor tree so
        // the connections close, then give the gRPC server a moment.
        self.control_plane.shutdown().await;
        let _ = tokio::time::timeout(Duration::from_secs(5), self.grpc_task).await;
    }
}

//! The agent's own measurements, served in the Prometheus text format on
//! `--metrics-addr` (`GET /metrics`): commands by kind and outcome, their
//! latency, commands in flight and whether the control-plane stream is up.
//! One set per process; label values are command kinds and outcomes only.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::LazyLock;

use corral_telemetry::prom::{self, CounterVec, HistogramVec, LATENCY_BUCKETS};

#[derive(Debug)]
pub struct AgentMetrics {
    /// Commands answered, by command and outcome (`ok` or an error code).
    pub commands: CounterVec,
    /// Time on the runtime per command.
    pub command_seconds: HistogramVec,
    pub in_flight: AtomicI64,
    /// 1 while a stream to the control plane is registered.
    pub connected: AtomicI64,
    /// Streams opened (registrations acknowledged) since the agent started.
    pub sessions: CounterVec,
}

pub static METRICS: LazyLock<AgentMetrics> = LazyLock::new(|| AgentMetrics {
    commands: CounterVec::new(
        "corral_agent_commands_total",
        "Commands answered, by command and outcome.",
        &["command", "outcome"],
    ),
    command_seconds: HistogramVec::new(
        "corral_agent_command_duration_seconds",
        "Time a command took on the runtime.",
        &["command"],
        LATENCY_BUCKETS,
    ),
    in_flight: AtomicI64::new(0),
    connected: AtomicI64::new(0),
    sessions: CounterVec::new(
        "corral_agent_sessions_total",
        "Streams to the control plane registered.",
        &[],
    ),
});

/// Everything, in the Prometheus text format.
pub fn render() -> String {
    let m = &*METRICS;
    let mut out = String::new();
    m.commands.render(&mut out);
    m.command_seconds.render(&mut out);
    m.sessions.render(&mut out);
    prom::gauge(
        &mut out,
        "corral_agent_commands_in_flight",
        "Commands running on the runtime now.",
        &[],
        &[(vec![], m.in_flight.load(Ordering::Relaxed) as f64)],
    );
    prom::gauge(
        &mut out,
        "corral_agent_connected",
        "1 while a stream to the control plane is registered.",
        &[],
        &[(vec![], m.connected.load(Ordering::Relaxed) as f64)],
    );
    out
}

/// Serves `GET /metrics` on `listener` until the process ends.
pub async fn serve(listener: tokio::net::TcpListener) -> std::io::Result<()> {
    use axum::routing::get;
    let app = axum::Router::new().route(
        "/metrics",
        get(|| async {
            (
                [(axum::http::header::CONTENT_TYPE, prom::CONTENT_TYPE)],
                render(),
            )
        }),
    );
    axum::serve(listener, app).await
}

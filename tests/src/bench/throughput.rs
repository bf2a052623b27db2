//! `throughput`: sustained sandbox creates per second through the REST API
//! (`POST /v1/sandboxes`, waiting for `running`) with 100 in-process agents
//! on the fake runtime over real gRPC on loopback. First a closed loop with
//! many concurrent clients finds the rate the control plane sustains; then
//! an open loop at half that rate measures the latency a caller sees when
//! the control plane is not saturated. On SQLite, and on PostgreSQL when
//! `CORRAL_TEST_POSTGRES_URL` names one.

use std::sync::Arc;
use std::time::{Duration, Instant};

use corral_agent::fake::FakeConfig;
use corral_agent::AgentConfig;
use reqwest::StatusCode;
use serde_json::json;
use tokio::sync::Mutex;

use super::{Params, Percentiles, Report};
use crate::{Api, InProcessAgent, TestServer};

pub const TARGET_RATE: f64 = 5_000.0;
pub const TARGET_HALF_RATE_P99_MS: f64 = 100.0;

/// Scale of one run.
#[derive(Debug, Clone)]
pub struct Shape {
    pub agents: usize,
    /// Of the closed loop.
    pub duration: Duration,
    /// Of the open loop at half the rate.
    pub half_rate_duration: Duration,
    pub concurrency: usize,
}

pub async fn run(params: &Params) -> Report {
    let shape = Shape {
        agents: 100,
        duration: Duration::from_secs(if params.quick { 5 } else { 30 }),
        // Long enough, in full, for the closed loop's sandboxes to reach
        // their first written usage period (60 s by default) while it
        // measures: the ledger's writes are part of the steady state.
        half_rate_duration: Duration::from_secs(if params.quick { 5 } else { 60 }),
        concurrency: 64,
    };
    run_with(params.quick, &shape).await
}

pub async fn run_with(quick: bool, shape: &Shape) -> Report {
    let mut report = Report::new(
        "throughput",
        quick,
        &format!(
            ">= {TARGET_RATE:.0} creates/s; p99 < {TARGET_HALF_RATE_P99_MS:.0} ms at half the max rate"
        ),
    );
    report.figure("agents", shape.agents as f64, "");
    report.figure("duration", shape.duration.as_secs_f64(), "s");
    report.figure(
        "half_rate_duration",
        shape.half_rate_duration.as_secs_f64(),
        "s",
    );
    report.figure("concurrency", shape.concurrency as f64, "");
    let sqlite = measure(&mut report, "sqlite", None, shape).await;
    let mut pass = sqlite;
    let postgres = std::env::var("CORRAL_TEST_POSTGRES_URL")
        .ok()
        .filter(|u| !u.is_empty());
    match postgres {
        Some(base) => match crate::fresh_postgres_database(&base).await {
            Ok(url) => {
                // A database of this run's own: the rows earlier runs left
                // (live sandboxes of hosts that never return, their ledgers)
                // would otherwise be reconciled and billed while this run
                // measures, which is the recovery scenario, not this one.
                // Measured whatever SQLite gave (`&&` would skip it on a miss).
                let postgres = measure(&mut report, "postgres", Some(url.clone()), shape).await;
                pass = pass && postgres;
                if let Err(err) = crate::drop_postgres_database(&base, &url).await {
                    report.note(format!("the run's database was not dropped: {err}"));
                }
            }
            Err(err) => {
                report.note(format!("PostgreSQL not measured: {err}"));
                pass = false;
            }
        },
        None => report.note(
            "PostgreSQL not measured: set CORRAL_TEST_POSTGRES_URL (scripts/bench starts a cluster when PostgreSQL is installed)",
        ),
    }
    report.pass = Some(pass);
    report
}

/// One backend; answers whether the targets were met.
async fn measure(report: &mut Report, backend: &str, url: Option<String>, shape: &Shape) -> bool {
    let server = TestServer::start_with(|c| {
        c.heartbeat_ms = 2_000;
        c.database_url = url;
        // The load generator is one API key; the per-key limit (200/s by
        // default) would otherwise be what is measured.
        c.rate_limit_per_second = super::UNLIMITED;
        c.rate_limit_burst = super::UNLIMITED;
    })
    .await;
    let (_, api) = server
        .create_org(&format!("bench-{}", corral_actors::domain::new_id("o")))
        .await;
    let mut agents = Vec::new();
    for _ in 0..shape.agents {
        let (host_id, token) = server.host_token("bench").await;
        // As a deployed agent runs (the tests' agents poll their runtime
        // five times as often): each poll lists every sandbox of the host,
        // and at 400 sandboxes an agent the simulated fleet's polls were
        // most of this process's CPU, not the control plane.
        let config = AgentConfig {
            control_plane_url: server.server.grpc_url(),
            token,
            cpu_millis: 4_000_000,
            memory_mb: 1 << 30,
            ..AgentConfig::default()
        };
        agents.push(InProcessAgent::start_config(
            &host_id,
            config,
            FakeConfig::default(),
        ));
        server.wait_host_ready(&host_id).await;
    }

    // Warm-up: connections, caches, the org's ledger actor.
    let _ = closed_loop(&api, shape.concurrency, Duration::from_millis(500)).await;

    let cpu0 = super::cpu_time(std::process::id()).unwrap_or_default();
    let (max, errors) = closed_loop(&api, shape.concurrency, shape.duration).await;
    let cpu = super::cpu_time(std::process::id())
        .unwrap_or_default()
        .saturating_sub(cpu0);
    let max_rate = max.count as f64 / shape.duration.as_secs_f64();
    // On a shared machine the rate follows whatever else runs; the CPU each
    // create costs (control plane, agents and load generator together, as
    // they share this process) does not, so it is the figure to compare.
    let per_create_ms = cpu.as_secs_f64() * 1e3 / max.count.max(1) as f64;
    report.figure(&format!("{backend}_cpu_per_create"), per_create_ms, "ms");
    report.figure(
        &format!("{backend}_process_cpu_during_max"),
        100.0 * cpu.as_secs_f64() / shape.duration.as_secs_f64(),
        "% of one core",
    );
    report.figure(&format!("{backend}_max_rate"), max_rate, "creates/s");
    report.figure(&format!("{backend}_errors"), errors as f64, "");
    report.figure(&format!("{backend}_saturated_p50"), max.p50_ms, "ms");
    report.figure(&format!("{backend}_saturated_p99"), max.p99_ms, "ms");

    let half = (max_rate / 2.0).max(1.0);
    let (at_half, half_errors) = open_loop(&api, half, shape.half_rate_duration).await;
    report.figure(&format!("{backend}_half_rate"), half, "creates/s");
    report.figure(
        &format!("{backend}_half_rate_achieved"),
        at_half.count as f64 / shape.half_rate_duration.as_secs_f64(),
        "creates/s",
    );
    report.figure(&format!("{backend}_half_rate_p50"), at_half.p50_ms, "ms");
    report.figure(&format!("{backend}_half_rate_p99"), at_half.p99_ms, "ms");
    report.figure(
        &format!("{backend}_half_rate_errors"),
        half_errors as f64,
        "",
    );

    drop(agents);
    server.server.shutdown().await;
    max_rate >= TARGET_RATE && at_half.p99_ms < TARGET_HALF_RATE_P99_MS
}

fn body() -> serde_json::Value {
    json!({
        "image": "busybox",
        "command": ["sleep", "3600"],
        "cpu_millis": 10,
        "memory_mb": 16,
    })
}

/// One create; its latency if it succeeded.
async fn create(api: &Api) -> Option<Duration> {
    let started = Instant::now();
    let (status, _) = api.post("/v1/sandboxes", body()).await;
    (status == StatusCode::CREATED).then(|| started.elapsed())
}

/// `concurrency` clients creating back to back for `duration`.
pub async fn closed_loop(
    api: &Api,
    concurrency: usize,
    duration: Duration,
) -> (Percentiles, usize) {
    let deadline = Instant::now() + duration;
    let samples = Arc::new(Mutex::new(Vec::new()));
    let errors = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let api = api.clone();
            let samples = samples.clone();
            let errors = errors.clone();
            tokio::spawn(async move {
                let mut mine = Vec::new();
                while Instant::now() < deadline {
                    match create(&api).await {
                        Some(d) => mine.push(d),
                        None => {
                            errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                }
                samples.lock().await.extend(mine);
            })
        })
        .collect();
    for w in workers {
        let _ = w.await;
    }
    let samples = samples.lock().await;
    (
        Percentiles::of(&samples),
        errors.load(std::sync::atomic::Ordering::Relaxed),
    )
}

/// Creates started at a fixed `rate` for `duration`, whatever the latency.
pub async fn open_loop(api: &Api, rate: f64, duration: Duration) -> (Percentiles, usize) {
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let deadline = Instant::now() + duration;
    let mut tasks = tokio::task::JoinSet::new();
    while Instant::now() < deadline {
        ticker.tick().await;
        let api = api.clone();
        tasks.spawn(async move { create(&api).await });
    }
    let mut samples = Vec::new();
    let mut errors = 0;
    while let Some(done) = tasks.join_next().await {
        match done {
            Ok(Some(d)) => samples.push(d),
            _ => errors += 1,
        }
    }
    (Percentiles::of(&samples), errors)
}

//! `fleet`: `corral server` (a child process) holding N agent streams, each
//! agent heartbeating every 2 s, with no other work. What it costs the
//! control plane to keep a fleet connected: CPU (from `/proc/<pid>/stat`
//! over a measured window) and resident memory.

use std::time::{Duration, Instant};

use super::server_proc::ServerProcess;
use super::sim_agent::{SimAgent, SimConfig};
use super::{cpu_time, rss_bytes, Params, Report};
use crate::free_port;

pub const TARGET_CPU_PERCENT: f64 = 50.0;
pub const TARGET_RSS_MIB: f64 = 1024.0;

pub async fn run(params: &Params) -> Report {
    let agents = if params.quick { 1_000 } else { 10_000 };
    let window = Duration::from_secs(if params.quick { 10 } else { 30 });
    run_with(params.quick, agents, window).await
}

/// Issues `count` host tokens straight into the database of `data_dir`
/// (before the server starts); returns (host id, token) pairs.
pub async fn seed_host_tokens(
    data_dir: &std::path::Path,
    count: usize,
) -> anyhow::Result<Vec<(String, String)>> {
    std::fs::create_dir_all(data_dir)?;
    let url = format!("sqlite://{}?mode=rwc", data_dir.join("corral.db").display());
    let store = corral_actors::store::Store::connect(&url)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut out = Vec::with_capacity(count);
    for i in 0..count {
        let issued = store
            .create_host_token(&format!("sim-{i}"), None)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        out.push((issued.record.host_id, issued.secret));
    }
    Ok(out)
}

/// Starts one simulated agent per token, in waves, and waits until every
/// one has registered; answers how long that took.
pub async fn connect_fleet(
    url: &str,
    tokens: &[(String, String)],
    inventories: &mut dyn FnMut(usize) -> Vec<String>,
    reconnect_delay: Duration,
) -> anyhow::Result<(Vec<SimAgent>, Duration)> {
    let started = Instant::now();
    let mut agents = Vec::with_capacity(tokens.len());
    for (i, (host_id, token)) in tokens.iter().enumerate() {
        let config = SimConfig {
            url: url.to_string(),
            token: token.clone(),
            cpu_millis: 4_000_000,
            memory_mb: 1 << 30,
            reconnect_delay,
        };
        agents.push(SimAgent::start(host_id, config, inventories(i)));
        if i % 250 == 249 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    wait_registered(&agents, 1, Duration::from_secs(600)).await?;
    Ok((agents, started.elapsed()))
}

/// Waits until every agent has registered at least `times` times.
pub async fn wait_registered(
    agents: &[SimAgent],
    times: u64,
    limit: Duration,
) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        let behind = agents.iter().filter(|a| a.registrations() < times).count();
        if behind == 0 {
            return Ok(());
        }
        if started.elapsed() > limit {
            anyhow::bail!("{behind} agents had not registered after {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub async fn run_with(quick: bool, count: usize, window: Duration) -> Report {
    let report = Report::new(
        "fleet",
        quick,
        &format!(
            "{count} agents heartbeating every 2 s: control plane < {TARGET_CPU_PERCENT:.0}% of one core, RSS < {TARGET_RSS_MIB:.0} MiB"
        ),
    );
    match measure(report.clone(), count, window).await {
        Ok(report) => report,
        Err(err) => report.skip(format!("could not run: {err:#}")),
    }
}

async fn measure(mut report: Report, count: usize, window: Duration) -> anyhow::Result<Report> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("cp");
    let tokens = seed_host_tokens(&data, count).await?;
    let (server, _) =
        ServerProcess::start(&data, free_port(), free_port(), &["--heartbeat-ms", "2000"]).await?;
    let pid = server.pid()?;
    let rss_idle = rss_bytes(pid).unwrap_or(0);
    let (agents, connect_time) = connect_fleet(
        &server.grpc_url(),
        &tokens,
        &mut |_| Vec::new(),
        Duration::from_secs(1),
    )
    .await?;
    // Let registration work (host rows, first inventories) finish.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let cpu0 = cpu_time(pid).unwrap_or_default();
    let me0 = cpu_time(std::process::id()).unwrap_or_default();
    let t0 = Instant::now();
    tokio::time::sleep(window).await;
    let elapsed = t0.elapsed().as_secs_f64();
    let cpu = (cpu_time(pid).unwrap_or_default().saturating_sub(cpu0)).as_secs_f64();
    let me = (cpu_time(std::process::id())
        .unwrap_or_default()
        .saturating_sub(me0))
    .as_secs_f64();
    let rss = rss_bytes(pid).unwrap_or(0);
    let still = agents.iter().filter(|a| a.registrations() == 1).count();

    let cpu_percent = 100.0 * cpu / elapsed;
    let rss_mib = rss as f64 / (1024.0 * 1024.0);
    report.figure("agents", count as f64, "");
    report.figure("connect_all", connect_time.as_secs_f64(), "s");
    report.figure("window", elapsed, "s");
    report.figure("cp_cpu", cpu_percent, "% of one core");
    report.figure("cp_rss", rss_mib, "MiB");
    report.figure(
        "cp_rss_idle_before_agents",
        rss_idle as f64 / 1048576.0,
        "MiB",
    );
    report.figure(
        "cp_rss_per_agent",
        (rss.saturating_sub(rss_idle)) as f64 / count as f64 / 1024.0,
        "KiB",
    );
    report.figure("agents_never_reconnected", still as f64, "");
    report.figure("load_generator_cpu", 100.0 * me / elapsed, "% of one core");
    report.pass = Some(cpu_percent < TARGET_CPU_PERCENT && rss_mib < TARGET_RSS_MIB);
    drop(agents);
    server.kill_hard().await;
    Ok(report)
}

//! `recovery`: `corral server` holding M sandboxes on H hosts is killed with
//! SIGKILL and started again on the same database. Measured from the new
//! process's start: readiness (the tree rebuilt from the database) and the
//! moment every host has dialed back in and been reconciled (its inventory
//! compared with its sandbox actors), then that no sandbox was lost.
//!
//! The rows are seeded straight into the database (creating 100,000 through
//! the API would measure `throughput` again); the simulated agents hold the
//! same sandboxes and report them at registration.

use std::time::{Duration, Instant};

use chrono::Utc;
use corral_actors::domain::SandboxState;
use corral_actors::store::{sandbox, Store};
use sea_orm::{ActiveModelTrait, EntityTrait, IntoActiveModel, TransactionTrait};

use super::fleet::{connect_fleet, wait_registered};
use super::server_proc::ServerProcess;
use super::{Params, Report};
use crate::free_port;
use reqwest::StatusCode;

pub const TARGET_SECS: f64 = 10.0;

pub async fn run(params: &Params) -> Report {
    let (sandboxes, hosts) = if params.quick {
        (10_000, 100)
    } else {
        (100_000, 1_000)
    };
    run_with(params.quick, sandboxes, hosts).await
}

pub async fn run_with(quick: bool, sandboxes: usize, hosts: usize) -> Report {
    let report = Report::new(
        "recovery",
        quick,
        &format!(
            "kill -9 with {sandboxes} sandboxes on {hosts} hosts: every host reconciled < {TARGET_SECS:.0} s after restart, none lost"
        ),
    );
    match measure(report.clone(), sandboxes, hosts).await {
        Ok(report) => report,
        Err(err) => report.skip(format!("could not run: {err:#}")),
    }
}

fn url(data: &std::path::Path) -> String {
    format!("sqlite://{}?mode=rwc", data.join("corral.db").display())
}

/// Seeds an org, `hosts` host tokens and `count` running sandboxes spread
/// over them; answers the tokens and each host's sandbox ids.
async fn seed(
    data: &std::path::Path,
    count: usize,
    hosts: usize,
) -> anyhow::Result<(Vec<(String, String)>, Vec<Vec<String>>)> {
    let e = |e: corral_actors::CorralError| anyhow::anyhow!("{e}");
    std::fs::create_dir_all(data)?;
    let store = Store::connect(&url(data)).await.map_err(e)?;
    let org = store.create_org("recovery").await.map_err(e)?;
    let mut tokens = Vec::with_capacity(hosts);
    for i in 0..hosts {
        let issued = store
            .create_host_token(&format!("sim-{i}"), None)
            .await
            .map_err(e)?;
        tokens.push((issued.record.host_id, issued.secret));
    }
    let mut per_host = vec![Vec::new(); hosts];
    let now = Utc::now();
    let rows: Vec<sandbox::Model> = (0..count)
        .map(|i| {
            let host = i % hosts;
            let id = format!("sbx_bench{i:010}");
            per_host[host].push(id.clone());
            sandbox::Model {
                id,
                command: serde_json::json!(["sleep", "3600"]),
                cpu_millis: 10,
                memory_mb: 16,
                started_at: Some(now),
                created_at: now,
                updated_at: now,
                ..sandbox::Model::for_test(&org.id, &tokens[host].0, SandboxState::Running)
            }
        })
        .collect();
    let txn = store.connection().begin().await?;
    for chunk in rows.chunks(500) {
        sandbox::Entity::insert_many(
            chunk
                .iter()
                .cloned()
                .map(|m| m.into_active_model().reset_all()),
        )
        .exec(&txn)
        .await?;
    }
    txn.commit().await?;
    Ok((tokens, per_host))
}

async fn hosts_ready(server: &ServerProcess) -> Option<usize> {
    let (status, body) = server.admin.get("/v1/admin/hosts").await;
    (status == StatusCode::OK).then(|| {
        body["hosts"]
            .as_array()
            .map_or(0, |h| h.iter().filter(|h| h["state"] == "ready").count())
    })
}

async fn wait_hosts_ready(server: &ServerProcess, hosts: usize, limit: Duration) -> bool {
    let started = Instant::now();
    while started.elapsed() < limit {
        if hosts_ready(server).await == Some(hosts) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

async fn measure(mut report: Report, count: usize, hosts: usize) -> anyhow::Result<Report> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("cp");
    let seeded = Instant::now();
    let (tokens, mut per_host) = seed(&data, count, hosts).await?;
    report.figure("seed_time", seeded.elapsed().as_secs_f64(), "s");
    let (http, grpc) = (free_port(), free_port());

    // First life: the fleet dials in and is reconciled.
    let (server, first_ready) = ServerProcess::start(&data, http, grpc, &[]).await?;
    let (agents, _) = connect_fleet(
        &server.grpc_url(),
        &tokens,
        &mut |i| std::mem::take(&mut per_host[i]),
        Duration::from_millis(200),
    )
    .await?;
    anyhow::ensure!(
        wait_hosts_ready(&server, hosts, Duration::from_secs(300)).await,
        "the hosts never all became ready the first time"
    );
    report.figure("first_start_ready", first_ready.as_secs_f64(), "s");

    // kill -9, then a new process on the same database and ports.
    server.kill_hard().await;
    let restarted = Instant::now();
    let (server, ready) = ServerProcess::start(&data, http, grpc, &[]).await?;
    let all_reconnected = wait_registered(&agents, 2, Duration::from_secs(300)).await;
    let reconnected = restarted.elapsed();
    let all_ready = wait_hosts_ready(&server, hosts, Duration::from_secs(300)).await;
    let reconciled = restarted.elapsed();

    // Nothing lost: every sandbox still running, in the database and on
    // its host.
    let store = Store::connect(&url(&data))
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let running = store
        .count_sandboxes_by_state(SandboxState::Running)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let lost = store
        .count_sandboxes_by_state(SandboxState::Lost)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let held: usize = agents.iter().map(|a| a.sandboxes()).sum();

    report.figure("sandboxes", count as f64, "");
    report.figure("hosts", hosts as f64, "");
    report.figure("restart_to_ready", ready.as_secs_f64(), "s");
    report.figure(
        "restart_to_all_agents_registered",
        reconnected.as_secs_f64(),
        "s",
    );
    report.figure(
        "restart_to_all_hosts_reconciled",
        reconciled.as_secs_f64(),
        "s",
    );
    report.figure("running_after", running as f64, "");
    report.figure("lost_after", lost as f64, "");
    report.figure("held_by_agents_after", held as f64, "");
    report.pass = Some(
        all_reconnected.is_ok()
            && all_ready
            && reconciled.as_secs_f64() < TARGET_SECS
            && running == count as u64
            && lost == 0
            && held == count,
    );
    report.note("simulated agents redial 200-300 ms after their stream ends; real agents back off with jitter up to 5 s, which adds to the time to reconnect");
    drop(agents);
    server.kill_hard().await;
    Ok(report)
}

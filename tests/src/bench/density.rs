//! `density`: M live sandboxes (created through the REST API on simulated
//! agents) held by `corral server` as a child process. Control-plane memory
//! per sandbox (RSS growth / M) once the sandboxes, with nothing more to do,
//! went dormant (after [`DORMANT_AFTER_MS`]), and the latency of
//! `GET /v1/sandboxes` (a page) and `GET /v1/sandboxes/{id}` with all of
//! them in the database.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::json;

use super::fleet::{connect_fleet, seed_host_tokens};
use super::server_proc::ServerProcess;
use super::{bounded, rss_bytes, Params, Report};
use crate::{free_port, Api};

pub const TARGET_BYTES_PER_SANDBOX: f64 = 4096.0;
pub const TARGET_QUERY_MS: f64 = 10.0;
/// The server's `--sandbox-dormant-after-ms` here: shorter than its 30 s
/// default only so that the scenario does not wait half a minute.
pub const DORMANT_AFTER_MS: u64 = 5_000;

pub async fn run(params: &Params) -> Report {
    let (sandboxes, hosts) = if params.quick {
        (10_000, 10)
    } else {
        (100_000, 100)
    };
    run_with(params.quick, sandboxes, hosts).await
}

pub async fn run_with(quick: bool, sandboxes: usize, hosts: usize) -> Report {
    let report = Report::new(
        "density",
        quick,
        &format!(
            "{sandboxes} live sandboxes: <= {:.0} KiB control-plane memory each; list and get p99 < {TARGET_QUERY_MS:.0} ms",
            TARGET_BYTES_PER_SANDBOX / 1024.0
        ),
    );
    match measure(report.clone(), sandboxes, hosts).await {
        Ok(report) => report,
        Err(err) => report.skip(format!("could not run: {err:#}")),
    }
}

async fn measure(mut report: Report, count: usize, hosts: usize) -> anyhow::Result<Report> {
    // The baseline first, while this process is quiet.
    let floor = bare_actor_bytes(count).await?;
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("cp");
    let tokens = seed_host_tokens(&data, hosts).await?;
    // One API key fills the control plane: lift the per-key rate limit.
    let dormant_after = DORMANT_AFTER_MS.to_string();
    let mut args = super::NO_RATE_LIMIT.to_vec();
    args.extend(["--sandbox-dormant-after-ms", &dormant_after]);
    let (server, _) = ServerProcess::start(&data, free_port(), free_port(), &args).await?;
    let pid = server.pid()?;
    let (agents, _) = connect_fleet(
        &server.grpc_url(),
        &tokens,
        &mut |_| Vec::new(),
        Duration::from_secs(1),
    )
    .await?;
    let (status, org) = server
        .admin
        .post("/v1/admin/orgs", json!({"name": "density", "exempt": true}))
        .await;
    anyhow::ensure!(status == StatusCode::CREATED, "creating the org: {org}");
    let key = org["api_key"]["secret"].as_str().unwrap_or_default();
    let api = Api::new(&server.admin.base, key);
    // A few creates first so one-off allocations (pools, caches, the
    // ledger actor) are not counted per sandbox.
    let warmup = create_many(&api, 200, 32).await.len();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss0 = rss_bytes(pid).unwrap_or(0);

    let started = Instant::now();
    let ids = create_many(&api, count, 64).await;
    let create_time = started.elapsed();
    let rss_created = rss_bytes(pid).unwrap_or(0);
    let created = ids.len();
    // Every sandbox runs and has nothing more to do: wait until all are
    // dormant, then until the allocator has handed back what their actors
    // held (RSS steady for two seconds).
    let deadline =
        Instant::now() + Duration::from_millis(DORMANT_AFTER_MS) + Duration::from_secs(120);
    let mut dormant = 0.0;
    while Instant::now() < deadline {
        dormant = crate::metric(&server.admin.base, "corral_sandboxes_dormant")
            .await
            .unwrap_or(0.0);
        if dormant >= (created + warmup) as f64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let all_dormant = started.elapsed();
    // jemalloc's background thread returns freed pages as they decay (over
    // about ten seconds): sample until RSS fell by less than 1% in 6 s.
    let mut samples = vec![rss_bytes(pid).unwrap_or(0)];
    let settle_until = Instant::now() + Duration::from_secs(60);
    while Instant::now() < settle_until {
        tokio::time::sleep(Duration::from_secs(2)).await;
        samples.push(rss_bytes(pid).unwrap_or(0));
        if let [.., earlier, _, _, last] = samples[..] {
            if last >= earlier - earlier / 100 {
                break;
            }
        }
    }
    let rss1 = samples.last().copied().unwrap_or(0);
    let per = rss1.saturating_sub(rss0) as f64 / created.max(1) as f64;

    // Queries, one at a time (latency, not throughput).
    let mut list = Vec::new();
    let mut list_deep = Vec::new();
    let mid = ids.get(created / 2).cloned().unwrap_or_default();
    for _ in 0..100 {
        let t = Instant::now();
        let (status, _) = api.get("/v1/sandboxes?limit=100").await;
        if status == StatusCode::OK {
            list.push(t.elapsed());
        }
        let t = Instant::now();
        let (status, _) = api
            .get(&format!("/v1/sandboxes?limit=100&after={mid}"))
            .await;
        if status == StatusCode::OK {
            list_deep.push(t.elapsed());
        }
    }
    let mut get = Vec::new();
    for i in 0..500 {
        let id = &ids[(i * 7919) % created.max(1)];
        let t = Instant::now();
        let (status, _) = api.get(&format!("/v1/sandboxes/{id}")).await;
        if status == StatusCode::OK {
            get.push(t.elapsed());
        }
    }
    let held: usize = agents.iter().map(|a| a.sandboxes()).sum();

    report.figure("sandboxes_created", created as f64, "");
    report.figure("sandboxes_on_agents", held as f64, "");
    report.figure(
        "create_rate",
        created as f64 / create_time.as_secs_f64(),
        "creates/s",
    );
    report.figure("cp_rss_before", rss0 as f64 / 1048576.0, "MiB");
    report.figure(
        "cp_rss_after_creates",
        rss_created as f64 / 1048576.0,
        "MiB",
    );
    report.figure("sandboxes_dormant", dormant, "");
    report.figure("all_dormant_after", all_dormant.as_secs_f64(), "s");
    report.figure("cp_rss_after", rss1 as f64 / 1048576.0, "MiB");
    report.figure("cp_bytes_per_sandbox", per, "B");
    report.figure("bare_actor_bytes", floor, "B");
    report.figure("per_sandbox_vs_bare_actor", per / floor.max(1.0), "x");
    report.note(format!(
        "memory per sandbox is measured once all are dormant (--sandbox-dormant-after-ms \
         {DORMANT_AFTER_MS}); a sandbox with an actor costs at least a bare ractor actor, \
         {floor:.0} B here"
    ));
    let l = report.latencies("list_first_page", &list);
    let ld = report.latencies("list_page_after_mid", &list_deep);
    let g = report.latencies("get", &get);
    report.pass = Some(
        created == count
            && dormant >= (created + warmup) as f64
            && per <= TARGET_BYTES_PER_SANDBOX
            && l.p99_ms < TARGET_QUERY_MS
            && ld.p99_ms < TARGET_QUERY_MS
            && g.p99_ms < TARGET_QUERY_MS,
    );
    if created < count {
        report.note(format!("{} creates failed", count - created));
    }
    drop(agents);
    server.kill_hard().await;
    Ok(report)
}

/// The baseline: resident memory per bare ractor actor (a `u64` for state,
/// linked to a supervisor as every sandbox actor is), `count` of them spawned
/// in this process with the same allocator and ractor as the control plane.
/// No sandbox actor can cost less; what a sandbox costs above it is its own.
pub async fn bare_actor_bytes(count: usize) -> anyhow::Result<f64> {
    use ractor::{Actor, ActorProcessingErr, ActorRef};
    struct Bare;
    impl Actor for Bare {
        type Msg = u64;
        type State = u64;
        type Arguments = ();
        async fn pre_start(&self, _: ActorRef<u64>, _: ()) -> Result<u64, ActorProcessingErr> {
            Ok(0)
        }
        async fn handle(
            &self,
            _: ActorRef<u64>,
            msg: u64,
            state: &mut u64,
        ) -> Result<(), ActorProcessingErr> {
            *state += msg;
            Ok(())
        }
    }
    let pid = std::process::id();
    let (supervisor, supervisor_done) = Actor::spawn(None, Bare, ()).await?;
    let before = rss_bytes(pid).unwrap_or(0);
    let mut actors = Vec::with_capacity(count);
    for _ in 0..count {
        let (actor, _) = Actor::spawn_linked(None, Bare, (), supervisor.get_cell()).await?;
        actors.push(actor);
    }
    // `spawn_linked` answered after each start: all wait on their mailboxes.
    let after = rss_bytes(pid).unwrap_or(0);
    drop(actors);
    supervisor
        .stop_children_and_wait(None, Some(Duration::from_secs(60)))
        .await;
    supervisor.stop(None);
    let _ = supervisor_done.await;
    Ok(after.saturating_sub(before) as f64 / count.max(1) as f64)
}

/// Creates `count` sandboxes, `concurrency` at a time; the ids created.
pub async fn create_many(api: &Api, count: usize, concurrency: usize) -> Vec<String> {
    let results = bounded(count, concurrency, |_| {
        let api = api.clone();
        async move {
            let (status, body) = api
                .post(
                    "/v1/sandboxes",
                    json!({"image": "busybox", "command": ["sleep", "3600"], "cpu_millis": 10, "memory_mb": 16}),
                )
                .await;
            (status == StatusCode::CREATED)
                .then(|| body["id"].as_str().map(str::to_string))
                .flatten()
        }
    })
    .await;
    let mut ids: Vec<String> = results.into_iter().flatten().collect();
    ids.sort();
    ids
}

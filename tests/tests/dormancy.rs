//! Dormant sandboxes: a sandbox with nothing to do gives up its actor and
//! is held by its host until something concerns it (a request, a report
//! that disagrees with its row, its TTL, its host's fate). Everything a
//! resident sandbox does, a dormant one must still do: these tests let
//! sandboxes fall asleep (after 100 ms, or 1 ms for the races) and then
//! drive them through the API, the agent and the clock, over real gRPC.

use std::time::Duration;

use corral_agent::fake::FakeConfig;
use corral_tests::{create_sandbox, id_of, wait_for, Api, TestServer};
use reqwest::StatusCode;
use serde_json::{json, Value};

const DEADLINE: Duration = Duration::from_secs(15);

fn fake() -> FakeConfig {
    FakeConfig {
        latency: Duration::ZERO,
        fail_rate: 0.0,
        images: vec!["busybox".into()],
    }
}

fn small(name: &str) -> Value {
    json!({
        "image": "busybox",
        "command": ["sleep", "600"],
        "name": name,
        "cpu_millis": 500,
        "memory_mb": 256,
    })
}

async fn start(dormant_after_ms: u64) -> TestServer {
    TestServer::start_with(|c| {
        c.sandbox_dormant_after_ms = dormant_after_ms;
        c.reconcile_interval_ms = 300;
        c.offline_grace_ms = 1_000;
    })
    .await
}

/// Whether the sandbox has an actor now (the actor tree shows what runs).
fn awake(cp: &TestServer, id: &str) -> bool {
    fn find(node: &corral_actors::tree::ActorNode, id: &str) -> bool {
        (node.kind == "sandbox" && node.id.as_deref() == Some(id))
            || node.children.iter().any(|c| find(c, id))
    }
    find(&cp.server.control_plane.actor_tree(), id)
}

async fn wait_dormant(cp: &TestServer, id: &str) {
    wait_for("the sandbox to go dormant", DEADLINE, || async {
        (!awake(cp, id)).then_some(())
    })
    .await;
}

/// One figure of the control plane's `/metrics`.
async fn metric(cp: &TestServer, name: &str) -> f64 {
    corral_tests::metric(&cp.server.http_url(), name)
        .await
        .unwrap_or_else(|| panic!("no {name} in the control plane's metrics"))
}

async fn state_becomes(api: &Api, id: &str, state: &str) -> Value {
    wait_for(&format!("the sandbox to be {state}"), DEADLINE, || async {
        let (_, s) = api.get(&format!("/v1/sandboxes/{id}")).await;
        (s["state"] == state).then_some(s)
    })
    .await
}

#[tokio::test]
async fn an_idle_sandbox_goes_dormant_and_every_request_wakes_it() {
    let cp = start(100).await;
    let agent = cp.fake_agent(4000, 4096, fake()).await;
    let (_, api) = cp.create_org("dormant").await;
    let id = id_of(&create_sandbox(&api, small("sleeper")).await);

    wait_dormant(&cp, &id).await;
    assert_eq!(metric(&cp, "corral_sandboxes_dormant").await, 1.0);
    let (status, out) = api
        .post(
            &format!("/v1/sandboxes/{id}/exec"),
            json!({"argv": ["echo", "awake"]}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{out}");
    assert_eq!(out["stdout"], "awake\n");

    wait_dormant(&cp, &id).await;
    let (status, s) = api
        .post(&format!("/v1/sandboxes/{id}/stop"), json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{s}");
    assert_eq!(s["state"], "stopped");
    assert_eq!(
        agent.runtime.phase(&id),
        Some(corral_agent::runtime::Phase::Stopped)
    );

    wait_dormant(&cp, &id).await;
    let (status, s) = api
        .post(&format!("/v1/sandboxes/{id}/start"), json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{s}");
    assert_eq!(s["state"], "running");

    wait_dormant(&cp, &id).await;
    let (status, s) = api.delete(&format!("/v1/sandboxes/{id}")).await;
    assert_eq!(status, StatusCode::OK, "{s}");
    assert_eq!(s["state"], "destroyed");
    assert!(agent.runtime.sandbox_ids().is_empty());
    assert!(metric(&cp, "corral_sandboxes_woken_total").await >= 3.0);
    assert_eq!(metric(&cp, "corral_sandboxes_dormant").await, 0.0);
}

#[tokio::test]
async fn a_dormant_sandbox_hears_what_its_host_reports() {
    let cp = start(100).await;
    let agent = cp.fake_agent(4000, 4096, fake()).await;
    let (_, api) = cp.create_org("reports").await;
    let exits = id_of(&create_sandbox(&api, small("exits")).await);
    let vanishes = id_of(&create_sandbox(&api, small("vanishes")).await);
    let stays = id_of(&create_sandbox(&api, small("stays")).await);
    for id in [&exits, &vanishes, &stays] {
        wait_dormant(&cp, id).await;
    }

    // An event the agent sends on its own.
    assert!(agent.runtime.simulate_exit(&exits, 3));
    let s = state_becomes(&api, &exits, "stopped").await;
    assert_eq!(s["exit_code"], 3);
    // An absence only the next inventory shows.
    assert!(agent.runtime.simulate_vanish(&vanishes));
    let s = state_becomes(&api, &vanishes, "lost").await;
    assert!(
        s["failure_reason"]
            .as_str()
            .is_some_and(|r| r.contains("no longer has it")),
        "{s}"
    );
    // Inventories that agree with a dormant sandbox leave it asleep.
    let woken = metric(&cp, "corral_sandboxes_woken_total").await;
    assert_eq!(woken, 2.0, "only the two that changed were woken");
    assert!(!awake(&cp, &stays));
    let (_, s) = api.get(&format!("/v1/sandboxes/{stays}")).await;
    assert_eq!(s["state"], "running");
}

#[tokio::test]
async fn a_dormant_sandbox_is_destroyed_when_its_ttl_runs_out() {
    let cp = start(100).await;
    let agent = cp.fake_agent(4000, 4096, fake()).await;
    let (_, api) = cp.create_org("ttl").await;
    let mut body = small("short-lived");
    body["ttl_seconds"] = json!(2);
    let id = id_of(&create_sandbox(&api, body).await);

    wait_dormant(&cp, &id).await;
    let (_, s) = api.get(&format!("/v1/sandboxes/{id}")).await;
    assert_eq!(s["state"], "running", "dormant before its TTL ran out");
    state_becomes(&api, &id, "destroyed").await;
    assert!(agent.runtime.sandbox_ids().is_empty());
}

#[tokio::test]
async fn a_restart_restores_idle_sandboxes_dormant_and_a_lost_host_wakes_them() {
    let cp = start(100).await;
    let agent = cp.fake_agent(4000, 4096, fake()).await;
    let (_, api) = cp.create_org("restored").await;
    let mut ids = Vec::new();
    for n in 0..3 {
        ids.push(id_of(&create_sandbox(&api, small(&format!("r{n}"))).await));
    }

    let cp = cp.restart().await;
    cp.wait_host_ready(&agent.host_id).await;
    // Restored without an actor, and the reconnect's inventory (which
    // agrees with them) did not wake them.
    assert_eq!(metric(&cp, "corral_sandboxes_dormant").await, 3.0);
    assert!(ids.iter().all(|id| !awake(&cp, id)));
    assert_eq!(metric(&cp, "corral_sandboxes_woken_total").await, 0.0);

    agent.kill();
    for id in &ids {
        let s = state_becomes(&api, id, "lost").await;
        assert_eq!(s["failure_reason"], "its host went offline");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_racing_a_sandbox_falling_asleep_are_never_lost() {
    // Actors fall asleep 1 ms after each request, and eight clients keep
    // asking four sandboxes: requests keep meeting actors that are
    // resting, being told to sleep, stopping, or gone.
    let cp = start(1).await;
    let _agent = cp.fake_agent(8000, 8192, fake()).await;
    let (_, api) = cp.create_org("races").await;
    let mut ids = Vec::new();
    for n in 0..4 {
        ids.push(id_of(
            &create_sandbox(&api, small(&format!("insomniac-{n}"))).await,
        ));
    }
    let clients: Vec<_> = (0..8usize)
        .map(|client| {
            let (api, ids) = (api.clone(), ids.clone());
            tokio::spawn(async move {
                for round in 0..60usize {
                    let id = &ids[(client + round) % ids.len()];
                    let word = format!("{client}-{round}");
                    let (status, out) = api
                        .post(
                            &format!("/v1/sandboxes/{id}/exec"),
                            json!({"argv": ["echo", word]}),
                        )
                        .await;
                    assert_eq!(status, StatusCode::OK, "{word}: {out}");
                    assert_eq!(out["stdout"], format!("{word}\n"));
                }
            })
        })
        .collect();
    for client in clients {
        client.await.expect("a client");
    }
    // Lifecycle requests race the same way, and each lands exactly once.
    for round in 0..20usize {
        let id = &ids[round % ids.len()];
        let (verb, expected) = if round % 8 < 4 {
            ("stop", "stopped")
        } else {
            ("start", "running")
        };
        let (status, s) = api
            .post(&format!("/v1/sandboxes/{id}/{verb}"), json!({}))
            .await;
        assert_eq!(status, StatusCode::OK, "round {round}: {s}");
        assert_eq!(s["state"], expected, "round {round}");
    }
    assert!(metric(&cp, "corral_sandboxes_woken_total").await >= 20.0);
}

#[tokio::test]
async fn a_suspended_org_stops_its_dormant_sandboxes() {
    let cp = TestServer::start_with(|c| {
        c.sandbox_dormant_after_ms = 100;
        c.billing_interval_ms = 100;
        c.billing_warning_micros = 2_000;
        c.billing_grace_ms = 500;
        c.billing_hold_window_ms = 0;
    })
    .await;
    let agent = cp.fake_agent(4000, 4096, fake()).await;
    // 500 mCPU at 10 micro-units per vCPU-ms: 500 micro-units a tick, so
    // the credit lasts about a second and a half after the create.
    cp.create_plan("steep", 36_000_000).await;
    let (_, api) = cp
        .create_org_with(json!({"name": "broke", "plan": "steep", "credits_micros": 8_000}))
        .await;
    let id = id_of(&create_sandbox(&api, small("spends")).await);
    wait_dormant(&cp, &id).await;
    let (_, b) = api.get("/v1/billing").await;
    assert_ne!(b["status"], "suspended", "dormant before the suspension");

    let s = state_becomes(&api, &id, "stopped").await;
    assert_eq!(s["desired_state"], "stopped");
    assert_eq!(
        agent.runtime.phase(&id),
        Some(corral_agent::runtime::Phase::Stopped)
    );
}

#[tokio::test]
async fn draining_a_host_stops_its_dormant_sandboxes() {
    let cp = start(100).await;
    let agent = cp.fake_agent(4000, 4096, fake()).await;
    let (_, api) = cp.create_org("drained").await;
    let id = id_of(&create_sandbox(&api, small("drained")).await);
    wait_dormant(&cp, &id).await;

    let (status, host) = cp
        .admin()
        .post(
            &format!("/v1/admin/hosts/{}/drain?deadline_seconds=1", agent.host_id),
            json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{host}");
    let s = state_becomes(&api, &id, "stopped").await;
    assert_eq!(s["desired_state"], "stopped");
}

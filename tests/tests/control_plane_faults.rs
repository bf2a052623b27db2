//! Failure handling of the control plane, with agents on the fake runtime
//! over real gRPC on loopback: cut streams inside and outside the offline
//! grace, sandboxes that vanish from their host, orphan containers, TTLs
//! (also while the control plane is down), transitional deadlines, and a
//! panic injected into each kind of actor. Every test asserts the final
//! state of the sandboxes, the host row and the capacity view; none sleeps
//! for a fixed time.

use std::time::Duration;

use corral_agent::fake::FakeConfig;
use corral_agent::runtime::{Phase, Runtime, SandboxSpec};
use corral_tests::{create_sandbox, id_of, wait_for, Api, TestServer};
use reqwest::StatusCode;
use serde_json::{json, Value};

const DEADLINE: Duration = Duration::from_secs(15);

fn fake() -> FakeConfig {
    FakeConfig::default()
}

fn sandbox_body(name: &str) -> Value {
    json!({
        "image": "busybox",
        "command": ["sleep", "600"],
        "name": name,
        "cpu_millis": 500,
        "memory_mb": 256,
    })
}

async fn sandbox(api: &Api, id: &str) -> Value {
    let (status, body) = api.get(&format!("/v1/sandboxes/{id}")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body
}

async fn wait_state(api: &Api, id: &str, state: &str) -> Value {
    wait_for(&format!("{id} to be {state}"), DEADLINE, || async {
        let body = sandbox(api, id).await;
        (body["state"] == state).then_some(body)
    })
    .await
}

async fn host_state(cp: &TestServer, host_id: &str) -> String {
    let (status, body) = cp.admin().get("/v1/admin/hosts").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["hosts"]
        .as_array()
        .and_then(|hosts| hosts.iter().find(|h| h["id"] == host_id))
        .and_then(|h| h["state"].as_str())
        .unwrap_or("<unknown host>")
        .to_string()
}

async fn wait_host_state(cp: &TestServer, host_id: &str, state: &str) {
    wait_for(&format!("host to be {state}"), DEADLINE, || async {
        (host_state(cp, host_id).await == state).then_some(())
    })
    .await;
}

async fn allocated_cpu(cp: &TestServer, host_id: &str) -> u64 {
    cp.server
        .control_plane
        .allocated_on(host_id)
        .await
        .expect("capacity view")
        .map(|r| r.cpu_millis)
        .unwrap_or(0)
}

/// Waits until the scheduler holds `cpu_millis` on the host (releases and
/// reservations reach it just after the row that caused them is written).
async fn wait_allocated(cp: &TestServer, host_id: &str, cpu_millis: u64) {
    wait_for(
        &format!("{cpu_millis} mCPU allocated"),
        DEADLINE,
        || async { (allocated_cpu(cp, host_id).await == cpu_millis).then_some(()) },
    )
    .await;
}

async fn exec_echo(api: &Api, id: &str) -> Value {
    let (status, out) = api
        .post(
            &format!("/v1/sandboxes/{id}/exec"),
            json!({"argv": ["echo", "alive"]}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{out}");
    out
}

#[tokio::test]
async fn a_partition_shorter_than_the_grace_loses_nothing() {
    let cp = TestServer::start_with(|c| c.offline_grace_ms = 30_000).await;
    let mut agent = cp.fake_agent(4000, 4096, fake()).await;
    let (_, api) = cp.create_org("acme").await;
    let id = id_of(&create_sandbox(&api, sandbox_body("steady")).await);

    agent.kill();
    wait_host_state(&cp, &agent.host_id, "disconnected").await;
    // Still recorded as running, and its room is still held for it.
    assert_eq!(sandbox(&api, &id).await["state"], "running");
    wait_allocated(&cp, &agent.host_id, 500).await;

    agent.revive();
    cp.wait_host_ready(&agent.host_id).await;
    assert_eq!(host_state(&cp, &agent.host_id).await, "ready");
    let row = sandbox(&api, &id).await;
    assert_eq!(row["state"], "running", "{row}");
    assert_eq!(row["failure_reason"], Value::Null);
    assert_eq!(exec_echo(&api, &id).await["stdout"], "alive\n");
    assert_eq!(agent.runtime.sandbox_ids(), vec![id.clone()]);
    wait_allocated(&cp, &agent.host_id, 500).await;
    assert_eq!(cp.server.control_plane.metrics().drift_lost.get(), 0);
}

#[tokio::test]
async fn a_host_past_its_grace_goes_offline_and_its_sandboxes_return_with_it() {
    let cp = TestServer::start_with(|c| {
        c.heartbeat_ms = 200;
        c.offline_grace_ms = 500;
    })
    .await;
    let mut agent = cp.fake_agent(4000, 4096, fake()).await;
    let (_, api) = cp.create_org("acme").await;
    let running = id_of(&create_sandbox(&api, sandbox_body("running")).await);
    let stopped = id_of(&create_sandbox(&api, sandbox_body("stopped")).await);
    let (status, body) = api
        .post(&format!("/v1/sandboxes/{stopped}/stop"), json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");

    let cut = tokio::time::Instant::now();
    agent.kill();
    wait_host_state(&cp, &agent.host_id, "disconnected").await;
    // A cut stream is noticed at once, not after heartbeats go missing.
    assert!(
        cut.elapsed() < Duration::from_secs(2),
        "{:?}",
        cut.elapsed()
    );
    wait_host_state(&cp, &agent.host_id, "offline").await;
    for id in [&running, &stopped] {
        let row = wait_state(&api, id, "lost").await;
        assert_eq!(row["failure_reason"], "its host went offline");
    }
    // Lost sandboxes hold no capacity (and are no longer billable); the
    // release reaches the scheduler right after the row is written.
    wait_for("the capacity to be released", DEADLINE, || async {
        (allocated_cpu(&cp, &agent.host_id).await == 0).then_some(())
    })
    .await;
    let (status, body) = api
        .post(
            &format!("/v1/sandboxes/{running}/exec"),
            json!({"argv": ["id"]}),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");

    // The host comes back with both containers: they are taken back as
    // they are, and converge to what their owner wants.
    agent.revive();
    cp.wait_host_ready(&agent.host_id).await;
    wait_state(&api, &running, "running").await;
    let row = wait_state(&api, &stopped, "stopped").await;
    assert_eq!(row["desired_state"], "stopped");
    assert_eq!(row["failure_reason"], Value::Null);
    assert_eq!(exec_echo(&api, &running).await["stdout"], "alive\n");
    wait_allocated(&cp, &agent.host_id, 1000).await;
    assert_eq!(agent.runtime.phase(&running), Some(Phase::Running));
    assert_eq!(agent.runtime.phase(&stopped), Some(Phase::Stopped));
    let metrics = cp.server.control_plane.metrics();
    assert_eq!(metrics.hosts_offline.get(), 1);
    assert_eq!(metrics.drift_lost.get(), 2);
}

#[tokio::test]
async fn a_sandbox_that_vanishes_from_its_host_becomes_lost() {
    let cp = TestServer::start_with(|c| c.reconcile_interval_ms = 200).await;
    let agent = cp.fake_agent(4000, 4096, fake()).await;
    let (_, api) = cp.create_org("acme").await;
    let gone = id_of(&create_sandbox(&api, sandbox_body("gone")).await);
    let kept = id_of(&create_sandbox(&api, sandbox_body("kept")).await);

    // Removed behind the control plane's back, without an event: only the
    // periodic inventory can notice.
    assert!(agent.runtime.simulate_vanish(&gone));
    let row = wait_state(&api, &gone, "lost").await;
    assert!(
        row["failure_reason"]
            .as_str()
            .is_some_and(|r| r.contains("no longer has it")),
        "{row}"
    );
    assert_eq!(sandbox(&api, &kept).await["state"], "running");
    wait_allocated(&cp, &agent.host_id, 500).await;
    assert_eq!(cp.server.control_plane.metrics().drift_lost.get(), 1);

    // A lost sandbox can only be deleted, which then succeeds.
    let (status, body) = api
        .post(&format!("/v1/sandboxes/{gone}/start"), json!({}))
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    let (status, body) = api.delete(&format!("/v1/sandboxes/{gone}")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["state"], "destroyed");
}

#[tokio::test]
async fn an_orphan_container_is_collected_after_its_grace() {
    let cp = TestServer::start_with(|c| {
        c.reconcile_interval_ms = 200;
        c.orphan_grace_ms = 300;
    })
    .await;
    let agent = cp.fake_agent(4000, 4096, fake()).await;
    let (_, api) = cp.create_org("acme").await;
    let known = id_of(&create_sandbox(&api, sandbox_body("known")).await);

    // Two containers no row accounts for: one never known, one whose row
    // says destroyed (a destroy the host never got).
    let planted = "sbx_0000000000000000000000000000beef".to_string();
    let spec = |id: &str| SandboxSpec {
        id: id.to_string(),
        image: "busybox".into(),
        command: vec!["sleep".into(), "600".into()],
        ..SandboxSpec::default()
    };
    agent
        .runtime
        .create(&spec(&planted))
        .await
        .expect("planted");
    agent.runtime.start(&planted).await.expect("planted runs");
    let destroyed = id_of(&create_sandbox(&api, sandbox_body("destroyed")).await);
    let (status, _) = api.delete(&format!("/v1/sandboxes/{destroyed}")).await;
    assert_eq!(status, StatusCode::OK);
    agent
        .runtime
        .create(&spec(&destroyed))
        .await
        .expect("resurrected");

    wait_for("the orphans to be destroyed", DEADLINE, || async {
        let ids = agent.runtime.sandbox_ids();
        (!ids.contains(&planted) && !ids.contains(&destroyed)).then_some(())
    })
    .await;
    assert_eq!(agent.runtime.sandbox_ids(), vec![known.clone()]);
    assert_eq!(sandbox(&api, &known).await["state"], "running");
    assert_eq!(sandbox(&api, &destroyed).await["state"], "destroyed");
    let metrics = cp.server.control_plane.metrics();
    assert_eq!(metrics.drift_orphans.get(), 2);
    assert_eq!(metrics.orphans_collected.get(), 2);
}

#[tokio::test]
async fn an_expired_ttl_destroys_the_sandbox() {
    let cp = TestServer::start().await;
    let agent = cp.fake_agent(4000, 4096, fake()).await;
    let (_, api) = cp.create_org("acme").await;
    let mut body = sandbox_body("short");
    body["ttl_seconds"] = json!(1);
    let created = create_sandbox(&api, body).await;
    let id = id_of(&created);
    assert!(created["expires_at"].is_string(), "{created}");
    let long = id_of(&create_sandbox(&api, sandbox_body("long")).await);

    let row = wait_state(&api, &id, "destroyed").await;
    assert_eq!(row["desired_state"], "destroyed");
    assert_eq!(agent.runtime.phase(&id), None);
    assert_eq!(sandbox(&api, &long).await["state"], "running");
    wait_allocated(&cp, &agent.host_id, 500).await;
    assert_eq!(cp.server.control_plane.metrics().ttl_expired.get(), 1);
}

#[tokio::test]
async fn a_ttl_that_runs_out_while_the_control_plane_is_down_is_enforced_on_restart() {
    let cp = TestServer::start().await;
    let agent = cp.fake_agent(4000, 4096, fake()).await;
    let (_, api) = cp.create_org("acme").await;
    let mut body = sandbox_body("short");
    body["ttl_seconds"] = json!(1);
    let created = create_sandbox(&api, body).await;
    let id = id_of(&created);
    let expires_at = created["expires_at"]
        .as_str()
        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        .expect("an expiry");

    let cp = cp
        .restart_after(async {
            wait_for(
                "the TTL to pass with no control plane",
                DEADLINE,
                || async { (chrono::Utc::now() > expires_at).then_some(()) },
            )
            .await;
        })
        .await;
    // Same addresses after the restart: the old client still reaches it.
    wait_state(&api, &id, "destroyed").await;
    wait_for("the host to drop it", DEADLINE, || async {
        agent.runtime.phase(&id).is_none().then_some(())
    })
    .await;
    wait_allocated(&cp, &agent.host_id, 0).await;
}

#[tokio::test]
async fn a_step_stuck_on_an_unreachable_host_fails_at_its_deadline() {
    let cp = TestServer::start_with(|c| {
        c.transition_deadline_ms = 1_000;
        c.offline_grace_ms = 60_000;
    })
    .await;
    let agent = cp.fake_agent(4000, 4096, fake()).await;
    let (_, api) = cp.create_org("acme").await;
    // The host takes far longer than the deadline to create, and then goes
    // away with the create in flight.
    agent.runtime.set_latency(Duration::from_secs(30));
    let (status, body) = api
        .post("/v1/sandboxes?wait=false", sandbox_body("stuck"))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let id = id_of(&body);
    wait_state(&api, &id, "creating").await;
    agent.kill();

    let row = wait_state(&api, &id, "failed").await;
    let reason = row["failure_reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("creating did not finish within 1 s"),
        "{row}"
    );
    wait_allocated(&cp, &agent.host_id, 0).await;
    assert_eq!(
        cp.server.control_plane.metrics().transitions_expired.get(),
        1
    );
}

#[tokio::test]
async fn a_panic_in_any_actor_is_survived_without_losing_state() {
    let cp = TestServer::start().await;
    let agent = cp.fake_agent(4000, 4096, fake()).await;
    let (org_id, api) = cp.create_org("acme").await;
    let id = id_of(&create_sandbox(&api, sandbox_body("sturdy")).await);
    let control = cp.server.control_plane.clone();
    let restarts = || control.metrics().actor_restarts.get();

    let check = |what: &'static str| {
        let api = api.clone();
        let id = id.clone();
        async move {
            let row = wait_for(
                &format!("the sandbox to answer after a {what} panic"),
                DEADLINE,
                || async {
                    let (status, out) = api
                        .post(
                            &format!("/v1/sandboxes/{id}/exec"),
                            json!({"argv": ["echo", "alive"]}),
                        )
                        .await;
                    (status == StatusCode::OK).then_some(out)
                },
            )
            .await;
            assert_eq!(row["stdout"], "alive\n", "{what}");
            assert_eq!(sandbox(&api, &id).await["state"], "running", "{what}");
        }
    };

    assert!(control.inject_panic("sandbox", &id));
    wait_for("the sandbox actor restart", DEADLINE, || async {
        (restarts() >= 1).then_some(())
    })
    .await;
    check("sandbox").await;

    assert!(control.inject_panic("connection", &format!("{}#1", agent.host_id)));
    wait_for("the connection restart", DEADLINE, || async {
        (restarts() >= 2).then_some(())
    })
    .await;
    cp.wait_host_ready(&agent.host_id).await;
    check("connection").await;

    assert!(control.inject_panic("host", &agent.host_id));
    wait_for("the host actor restart", DEADLINE, || async {
        (restarts() >= 3).then_some(())
    })
    .await;
    cp.wait_host_ready(&agent.host_id).await;
    check("host").await;

    // The ledger is rebuilt from its entries on next use.
    let (status, before) = api.get("/v1/billing").await;
    assert_eq!(status, StatusCode::OK, "{before}");
    assert!(control.inject_panic("ledger", &org_id));
    let after = wait_for("the ledger to answer again", DEADLINE, || async {
        let (status, body) = api.get("/v1/billing").await;
        (status == StatusCode::OK).then_some(body)
    })
    .await;
    assert_eq!(after, before);

    // One container, its room held once, the host ready, the tree whole.
    assert_eq!(agent.runtime.sandbox_ids(), vec![id.clone()]);
    wait_allocated(&cp, &agent.host_id, 500).await;
    assert_eq!(host_state(&cp, &agent.host_id).await, "ready");
    assert!(control.is_alive());
}

#[tokio::test]
async fn a_sandbox_actor_that_keeps_failing_is_given_up_not_looped() {
    let cp = TestServer::start().await;
    let agent = cp.fake_agent(4000, 4096, fake()).await;
    let (_, api) = cp.create_org("acme").await;
    let id = id_of(&create_sandbox(&api, sandbox_body("doomed")).await);
    let other = id_of(&create_sandbox(&api, sandbox_body("bystander")).await);
    let control = cp.server.control_plane.clone();

    // Three restarts are allowed in the window; the fourth failure gives up.
    for round in 1..=4u64 {
        wait_for("the sandbox actor to be back", DEADLINE, || async {
            control.inject_panic("sandbox", &id).then_some(())
        })
        .await;
        wait_for("the failure to be handled", DEADLINE, || async {
            (control.metrics().actor_restarts.get() >= round).then_some(())
        })
        .await;
    }
    let row = wait_state(&api, &id, "failed").await;
    assert!(
        row["failure_reason"]
            .as_str()
            .is_some_and(|r| r.contains("failed repeatedly")),
        "{row}"
    );
    // Its room is released; the rest of the host is untouched.
    wait_allocated(&cp, &agent.host_id, 500).await;
    assert_eq!(exec_echo(&api, &other).await["stdout"], "alive\n");
    assert!(control.is_alive());
    // Deleting the failed sandbox removes its container too.
    let (status, body) = api.delete(&format!("/v1/sandboxes/{id}")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    wait_for("its container to go", DEADLINE, || async {
        agent.runtime.phase(&id).is_none().then_some(())
    })
    .await;
    assert_eq!(agent.runtime.sandbox_ids(), vec![other]);
}

#[tokio::test]
async fn metrics_are_served_in_the_prometheus_format() {
    let cp = TestServer::start().await;
    let response = corral_tests::http_client()
        .get(format!("{}/metrics", cp.server.http_url()))
        .send()
        .await
        .expect("metrics");
    assert_eq!(response.status(), StatusCode::OK);
    let text = response.text().await.expect("text");
    assert!(
        text.contains("# TYPE corral_drift_orphans_total counter"),
        "{text}"
    );
    assert!(text.contains("corral_actor_restarts_total 0"), "{text}");
}

#[tokio::test]
async fn a_host_whose_heartbeats_stop_is_disconnected_within_three_intervals() {
    use corral_proto::pb;
    let interval = Duration::from_millis(200);
    let cp = TestServer::start_with(|c| c.heartbeat_ms = 200).await;
    let (host_id, token) = cp.host_token("silent").await;

    // A host that registers and then says nothing, with its stream open:
    // only the missing heartbeats can give it away.
    let channel = tonic::transport::Endpoint::from_shared(cp.server.grpc_url())
        .expect("endpoint")
        .connect()
        .await
        .expect("dial");
    let mut client = pb::agent_service_client::AgentServiceClient::new(channel);
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let register = pb::Register {
        runtime: "fake".into(),
        capacity: Some(pb::Capacity {
            cpu_millis: 1000,
            memory_mb: 1024,
        }),
        ..Default::default()
    };
    tx.send(pb::AgentMessage {
        request_id: 0,
        trace: None,
        payload: Some(pb::agent_message::Payload::Register(register)),
    })
    .await
    .expect("queue register");
    let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("header"),
    );
    let mut inbound = client.connect(request).await.expect("stream").into_inner();
    let ack = inbound.message().await.expect("ack").expect("an ack");
    assert!(matches!(
        ack.payload,
        Some(pb::control_message::Payload::RegisterAck(_))
    ));
    let registered = tokio::time::Instant::now();
    cp.wait_host_ready(&host_id).await;

    wait_host_state(&cp, &host_id, "disconnected").await;
    let detected = registered.elapsed();
    eprintln!("heartbeat loss detected after {detected:?} (interval {interval:?})");
    assert!(detected >= interval * 3, "{detected:?}");
    assert!(
        detected <= interval * 3 + Duration::from_millis(600),
        "{detected:?}"
    );
    // The control plane closed the stream; the host is no longer schedulable.
    let closed = tokio::time::timeout(DEADLINE, inbound.message()).await;
    assert!(matches!(closed, Ok(Ok(None)) | Ok(Err(_))), "{closed:?}");
    let capacity = cp.server.control_plane.capacity().await.expect("capacity");
    assert!(!capacity.get(&host_id).is_some_and(|c| c.schedulable));
    drop(tx);
}

#[tokio::test]
async fn a_refused_start_is_retried_until_it_works_or_its_deadline_passes() {
    let cp = TestServer::start_with(|c| c.transition_deadline_ms = 3_000).await;
    let agent = cp.fake_agent(4000, 4096, fake()).await;
    let (_, api) = cp.create_org("acme").await;
    let recovers = id_of(&create_sandbox(&api, sandbox_body("recovers")).await);
    let gives_up = id_of(&create_sandbox(&api, sandbox_body("gives-up")).await);
    for id in [&recovers, &gives_up] {
        let (status, body) = api
            .post(&format!("/v1/sandboxes/{id}/stop"), json!({}))
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }

    // The runtime refuses every command: the start is answered with the
    // host's error, and the sandbox is left starting, not stuck.
    agent.runtime.set_fail_rate(1.0);
    let (status, body) = api
        .post(&format!("/v1/sandboxes/{recovers}/start"), json!({}))
        .await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    assert_eq!(sandbox(&api, &recovers).await["state"], "starting");
    // The runtime heals: the retry finishes the start with no new request.
    agent.runtime.set_fail_rate(0.0);
    wait_state(&api, &recovers, "running").await;

    agent.runtime.set_fail_rate(1.0);
    let (status, body) = api
        .post(&format!("/v1/sandboxes/{gives_up}/start"), json!({}))
        .await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    let row = wait_state(&api, &gives_up, "failed").await;
    let reason = row["failure_reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("starting did not finish within 3 s"),
        "{row}"
    );
    wait_allocated(&cp, &agent.host_id, 500).await;
}

#[tokio::test]
async fn a_host_actor_that_keeps_failing_escalates_and_stops_the_control_plane() {
    let cp = TestServer::start().await;
    let agent = cp.fake_agent(4000, 4096, fake()).await;
    let control = cp.server.control_plane.clone();
    for round in 1..=3u64 {
        wait_for("the host actor to be back", DEADLINE, || async {
            control.inject_panic("host", &agent.host_id).then_some(())
        })
        .await;
        wait_for("the restart", DEADLINE, || async {
            (control.metrics().actor_restarts.get() >= round).then_some(())
        })
        .await;
        assert!(control.is_alive(), "restart {round} is within the budget");
    }
    // The fourth failure inside the window is one too many: the fleet
    // escalates and the root stops, so that the process can be restarted
    // and rebuilt from the database rather than loop.
    wait_for("the host actor to be back", DEADLINE, || async {
        control.inject_panic("host", &agent.host_id).then_some(())
    })
    .await;
    tokio::time::timeout(DEADLINE, control.stopped())
        .await
        .expect("the actor tree stops");
    assert!(!control.is_alive());
    let ready = corral_tests::http_client()
        .get(format!("{}/readyz", cp.server.http_url()))
        .send()
        .await
        .expect("readyz");
    assert_eq!(ready.status(), StatusCode::SERVICE_UNAVAILABLE);
    // The fake host still has nothing it should not: no sandbox was touched.
    assert!(agent.runtime.sandbox_ids().is_empty());
}

#[tokio::test]
async fn shutdown_drains_requests_in_flight() {
    let cp = TestServer::start().await;
    let agent = cp.fake_agent(4000, 4096, fake()).await;
    let (_, api) = cp.create_org("acme").await;
    agent.runtime.set_latency(Duration::from_millis(800));
    let creating = tokio::spawn({
        let api = api.clone();
        async move { api.post("/v1/sandboxes", sandbox_body("late")).await }
    });
    let id = wait_for("the create to be in flight", DEADLINE, || async {
        let (_, list) = api.get("/v1/sandboxes").await;
        list["sandboxes"][0]["id"].as_str().map(str::to_string)
    })
    .await;
    cp.server.shutdown().await;
    // The request that was in flight got its real answer, not a reset.
    let (status, body) = creating.await.expect("the create task");
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["id"], id.as_str());
    assert_eq!(body["state"], "running");
    assert_eq!(agent.runtime.phase(&id), Some(Phase::Running));
}

#[tokio::test]
async fn a_failed_top_level_actor_stops_the_tree_and_a_restart_rebuilds_it() {
    // The scheduler's view is the whole fleet's capacity: restarting it
    // alone could hand out room twice, so its failure stops the tree, the
    // process exits, and a restart rebuilds everything from the database.
    let cp = TestServer::start().await;
    let mut agent = cp.fake_agent(4000, 4096, fake()).await;
    let (_, api) = cp.create_org("acme").await;
    let id = id_of(&create_sandbox(&api, sandbox_body("survivor")).await);
    let control = cp.server.control_plane.clone();
    assert!(control.inject_panic("scheduler", ""));
    tokio::time::timeout(DEADLINE, control.stopped())
        .await
        .expect("the actor tree stops");
    assert!(!control.is_alive());
    // The host's sandbox was never touched.
    assert_eq!(agent.runtime.phase(&id), Some(Phase::Running));

    let cp = cp.restart().await;
    agent.revive();
    cp.wait_host_ready(&agent.host_id).await;
    assert_eq!(sandbox(&api, &id).await["state"], "running");
    wait_allocated(&cp, &agent.host_id, 500).await;
    assert_eq!(exec_echo(&api, &id).await["stdout"], "alive\n");
    assert_eq!(agent.runtime.sandbox_ids(), vec![id]);
}

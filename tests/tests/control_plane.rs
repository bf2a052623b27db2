//! The control plane with agents on the fake runtime over real gRPC on
//! loopback: org isolation, capacity under concurrent creates, host errors
//! and dropped streams reaching callers promptly, lifecycle, validation.

use std::time::{Duration, Instant};

use corral_agent::fake::FakeConfig;
use corral_tests::{create_sandbox, error_code, id_of, wait_for, Api, TestServer};
use reqwest::StatusCode;
use serde_json::{json, Value};

fn fake(latency_ms: u64) -> FakeConfig {
    FakeConfig {
        latency: Duration::from_millis(latency_ms),
        fail_rate: 0.0,
        images: vec!["busybox".into()],
    }
}

fn small(name: &str) -> Value {
    json!({
        "image": "busybox",
        "command": ["sleep", "600"],
        "name": name,
        "cpu_millis": 1000,
        "memory_mb": 512,
        "labels": {"suite": "control-plane"}
    })
}

#[tokio::test]
async fn sandbox_lifecycle_through_the_api() {
    let cp = TestServer::start().await;
    let _agent = cp.fake_agent(4000, 4096, fake(0)).await;
    let (_, api) = cp.create_org("acme").await;

    let sandbox = create_sandbox(&api, small("web")).await;
    assert_eq!(sandbox["state"], "running");
    assert_eq!(sandbox["desired_state"], "running");
    let id = id_of(&sandbox);

    let (status, out) = api
        .post(
            &format!("/v1/sandboxes/{id}/exec"),
            json!({"argv": ["echo", "hello"]}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{out}");
    assert_eq!(out["stdout"], "hello\n");
    assert_eq!(out["exit_code"], 0);

    let (status, stopped) = api
        .post(&format!("/v1/sandboxes/{id}/stop"), json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{stopped}");
    assert_eq!(stopped["state"], "stopped");

    let (status, body) = api
        .post(
            &format!("/v1/sandboxes/{id}/exec"),
            json!({"argv": ["echo", "x"]}),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(error_code(&body), "invalid_state");

    let (status, started) = api
        .post(&format!("/v1/sandboxes/{id}/start"), json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{started}");
    assert_eq!(started["state"], "running");

    let (status, gone) = api.delete(&format!("/v1/sandboxes/{id}")).await;
    assert_eq!(status, StatusCode::OK, "{gone}");
    assert_eq!(gone["state"], "destroyed");
    assert!(
        _agent.runtime.phase(&id).is_none(),
        "the fake host no longer has it"
    );

    // Deleting again is idempotent; starting a destroyed sandbox is refused.
    let (status, _) = api.delete(&format!("/v1/sandboxes/{id}")).await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = api
        .post(&format!("/v1/sandboxes/{id}/start"), json!({}))
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");

    // Its capacity was given back.
    let allocated = cp
        .server
        .control_plane
        .allocated_on(&_agent.host_id)
        .await
        .expect("capacity")
        .expect("host known");
    assert_eq!(allocated.cpu_millis, 0);
}

#[tokio::test]
async fn another_orgs_key_gets_404_on_every_route() {
    let cp = TestServer::start().await;
    let _agent = cp.fake_agent(4000, 4096, fake(0)).await;
    let (_, owner) = cp.create_org("owner").await;
    let (_, intruder) = cp.create_org("intruder").await;
    let id = id_of(&create_sandbox(&owner, small("private")).await);

    let get = intruder.get(&format!("/v1/sandboxes/{id}")).await;
    let start = intruder
        .post(&format!("/v1/sandboxes/{id}/start"), json!({}))
        .await;
    let stop = intruder
        .post(&format!("/v1/sandboxes/{id}/stop"), json!({}))
        .await;
    let exec = intruder
        .post(&format!("/v1/sandboxes/{id}/exec"), json!({"argv": ["id"]}))
        .await;
    let delete = intruder.delete(&format!("/v1/sandboxes/{id}")).await;
    for (route, (status, body)) in [
        ("get", get),
        ("start", start),
        ("stop", stop),
        ("exec", exec),
        ("delete", delete),
    ] {
        assert_eq!(status, StatusCode::NOT_FOUND, "{route}: {body}");
        assert_eq!(error_code(&body), "not_found", "{route}");
        assert!(!body.to_string().contains("owner"), "{route} leaks nothing");
    }
    let (_, list) = intruder.get("/v1/sandboxes").await;
    assert_eq!(list["sandboxes"], json!([]));

    // The owner's key list and keys are out of reach too.
    let (_, keys) = owner.get("/v1/api-keys").await;
    let key_id = keys["api_keys"][0]["id"]
        .as_str()
        .expect("key id")
        .to_string();
    let (status, _) = intruder.delete(&format!("/v1/api-keys/{key_id}")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // And the sandbox is untouched.
    let (status, sandbox) = owner.get(&format!("/v1/sandboxes/{id}")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(sandbox["state"], "running");
}

#[tokio::test]
async fn concurrent_creates_never_overcommit_a_host() {
    let cp = TestServer::start().await;
    // Room for exactly 4 sandboxes of 1000 mCPU (memory is not the limit).
    let agent = cp.fake_agent(4000, 64 * 1024, fake(20)).await;
    let (_, api) = cp.create_org("crowd").await;

    let attempts = 24;
    let mut tasks = Vec::new();
    for i in 0..attempts {
        let api: Api = api.clone();
        tasks.push(tokio::spawn(async move {
            api.post("/v1/sandboxes", small(&format!("s{i}"))).await
        }));
    }
    let mut created = 0;
    let mut refused = 0;
    for task in tasks {
        let (status, body) = task.await.expect("task");
        match status {
            StatusCode::CREATED => {
                assert_eq!(body["state"], "running");
                created += 1;
            }
            StatusCode::SERVICE_UNAVAILABLE => {
                assert_eq!(error_code(&body), "no_capacity", "{body}");
                let message = body["error"]["message"].as_str().unwrap_or_default();
                assert!(
                    message.contains("1000 mCPU"),
                    "says what was asked: {message}"
                );
                refused += 1;
            }
            other => panic!("unexpected {other}: {body}"),
        }
    }
    assert_eq!((created, refused), (4, attempts - 4));
    assert_eq!(
        agent.runtime.sandbox_ids().len(),
        4,
        "exactly 4 run on the host"
    );
    let capacity = cp.server.control_plane.capacity().await.expect("capacity");
    let host = &capacity[&agent.host_id];
    assert_eq!(host.allocated.cpu_millis, 4000);
    assert!(host.allocated.memory_mb <= host.allocatable.memory_mb);
}

#[tokio::test]
async fn a_host_error_reaches_the_caller_within_a_second() {
    let cp = TestServer::start().await;
    let _agent = cp.fake_agent(4000, 4096, fake(0)).await;
    let (_, api) = cp.create_org("errors").await;

    let started = Instant::now();
    let (status, body) = api
        .post(
            "/v1/sandboxes",
            json!({"image": "no-such-image", "command": ["true"]}),
        )
        .await;
    let elapsed = started.elapsed();
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(error_code(&body), "image_not_found");
    assert!(elapsed < Duration::from_secs(1), "took {elapsed:?}");

    // The sandbox is recorded as failed with the reason; capacity is free.
    let (_, list) = api.get("/v1/sandboxes?state=failed").await;
    let failed = &list["sandboxes"][0];
    assert!(failed["failure_reason"]
        .as_str()
        .is_some_and(|r| r.starts_with("image_not_found")));
    let allocated = cp
        .server
        .control_plane
        .allocated_on(&_agent.host_id)
        .await
        .expect("capacity")
        .expect("known host");
    assert_eq!(allocated.cpu_millis, 0);
}

#[tokio::test]
async fn a_dropped_agent_stream_fails_the_waiting_request_promptly() {
    let cp = TestServer::start().await;
    // Every runtime call takes a minute: the create will be in flight.
    let agent = cp.fake_agent(4000, 4096, fake(60_000)).await;
    let (_, api) = cp.create_org("dropped").await;

    let pending = tokio::spawn({
        let api = api.clone();
        async move { api.post("/v1/sandboxes", small("slow")).await }
    });
    wait_for(
        "the create to reach the host",
        Duration::from_secs(10),
        || {
            let api = api.clone();
            async move {
                let (_, list) = api.get("/v1/sandboxes?state=creating").await;
                (!list["sandboxes"].as_array()?.is_empty()).then_some(())
            }
        },
    )
    .await;

    let cut = Instant::now();
    agent.kill();
    let (status, body) = tokio::time::timeout(Duration::from_secs(5), pending)
        .await
        .expect("the caller is answered, not left waiting")
        .expect("task");
    let elapsed = cut.elapsed();
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    assert_eq!(error_code(&body), "host_disconnected");
    assert!(elapsed < Duration::from_secs(2), "took {elapsed:?}");

    // The intent survives: the sandbox is still being created, not lost.
    let (_, list) = api.get("/v1/sandboxes").await;
    assert_eq!(list["sandboxes"][0]["state"], "creating");
    assert_eq!(list["sandboxes"][0]["desired_state"], "running");
}

#[tokio::test]
async fn bad_input_gets_clear_400s() {
    let cp = TestServer::start().await;
    let (_, api) = cp.create_org("validation").await;
    let cases = [
        json!({"image": "../etc", "command": ["true"]}),
        json!({"image": "busybox", "command": []}),
        json!({"image": "busybox", "command": ["true"], "env": {"1BAD": "x"}}),
        json!({"image": "busybox", "command": ["true"], "cpu_millis": 0}),
        json!({"image": "busybox", "command": ["true"], "memory_mb": 999999999}),
        json!({"image": "busybox", "command": ["true"], "workdir": "/a/../b"}),
        json!({"image": "busybox", "command": ["true"], "name": "Not Valid"}),
        json!({"image": "busybox", "command": ["true"], "labels": {"BAD KEY": "x"}}),
        json!({"image": "busybox", "command": ["a\u{0000}b"]}),
        json!({"image": "busybox", "command": ["true"], "unknown_field": 1}),
    ];
    for case in cases {
        let (status, body) = api.post("/v1/sandboxes", case.clone()).await;
        assert!(status.is_client_error(), "{case} -> {status}");
        assert!(
            matches!(error_code(&body), "invalid_argument" | "invalid_body"),
            "{case} -> {body}"
        );
        assert!(body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()));
    }
    let (status, body) = api.post_raw("/v1/sandboxes", "{not json").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(error_code(&body), "invalid_body");

    let (status, body) = api.get("/v1/sandboxes/sbx_nope").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    let (status, _) = api.get("/v1/sandboxes?state=bogus").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    // Nothing was persisted by any of it.
    let (_, list) = api.get("/v1/sandboxes").await;
    assert_eq!(list["sandboxes"], json!([]));
}

#[tokio::test]
async fn keys_authenticate_and_revocation_is_immediate() {
    let cp = TestServer::start().await;
    let (_, api) = cp.create_org("keys").await;
    let anonymous = api.with_token("");
    let (status, body) = anonymous.get("/v1/sandboxes").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(error_code(&body), "unauthenticated");
    let (status, _) = api.with_token("ck_forged").get("/v1/sandboxes").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    // An org key is not an admin token.
    let (status, _) = api.get("/v1/admin/hosts").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    let (status, created) = api.post("/v1/api-keys", json!({"name": "second"})).await;
    assert_eq!(status, StatusCode::CREATED);
    let second = api.with_token(created["secret"].as_str().expect("secret"));
    assert_eq!(second.get("/v1/sandboxes").await.0, StatusCode::OK);
    let (_, keys) = api.get("/v1/api-keys").await;
    assert!(
        !keys
            .to_string()
            .contains(created["secret"].as_str().expect("secret")),
        "a listed key never shows its secret"
    );
    let (status, _) = api
        .delete(&format!("/v1/api-keys/{}", id_of(&created)))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        second.get("/v1/sandboxes").await.0,
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test]
async fn listing_pages_and_filters_by_label() {
    let cp = TestServer::start().await;
    let _agent = cp.fake_agent(16000, 16384, fake(0)).await;
    let (_, api) = cp.create_org("lists").await;
    let mut ids = Vec::new();
    for i in 0..5 {
        let mut body = small(&format!("n{i}"));
        body["cpu_millis"] = json!(100);
        body["memory_mb"] = json!(64);
        body["labels"] = json!({"tier": if i < 2 { "web" } else { "db" }});
        ids.push(id_of(&create_sandbox(&api, body).await));
    }
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/v1/sandboxes?limit=2&after={c}"),
            None => "/v1/sandboxes?limit=2".to_string(),
        };
        let (status, page) = api.get(&path).await;
        assert_eq!(status, StatusCode::OK);
        for s in page["sandboxes"].as_array().expect("array") {
            seen.push(id_of(s));
        }
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_string()),
            None => break,
        }
    }
    assert_eq!(seen, ids);
    let (_, web) = api.get("/v1/sandboxes?label=tier%3Dweb").await;
    assert_eq!(web["sandboxes"].as_array().map(Vec::len), Some(2));
}

#[tokio::test]
async fn operators_see_the_actor_tree_hosts_and_spec() {
    let cp = TestServer::start().await;
    let agent = cp.fake_agent(4000, 4096, fake(0)).await;
    let (org_id, api) = cp.create_org("ops").await;
    let id = id_of(&create_sandbox(&api, small("seen")).await);

    let (status, tree) = cp.admin().get("/v1/admin/actors").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(tree["kind"], "root");
    let fleet = tree["children"]
        .as_array()
        .and_then(|c| c.iter().find(|n| n["kind"] == "fleet"))
        .expect("a fleet supervisor");
    let host = fleet["children"]
        .as_array()
        .and_then(|c| c.iter().find(|n| n["id"] == agent.host_id.as_str()))
        .expect("the host's actor");
    let kinds: Vec<&str> = host["children"]
        .as_array()
        .expect("children")
        .iter()
        .filter_map(|n| n["kind"].as_str())
        .collect();
    assert!(kinds.contains(&"connection"), "{host}");
    assert!(
        host["children"]
            .as_array()
            .expect("children")
            .iter()
            .any(|n| n["id"] == id.as_str()),
        "the sandbox actor is under its host: {host}"
    );

    let (_, hosts) = cp.admin().get("/v1/admin/hosts").await;
    let row = &hosts["hosts"][0];
    assert_eq!(row["id"], agent.host_id.as_str());
    assert_eq!(row["state"], "ready");
    assert_eq!(row["capacity"]["cpu_millis"], 4000);
    assert_eq!(row["allocated"]["cpu_millis"], 1000);

    let (status, spec) = cp.admin().get("/openapi.json").await;
    assert_eq!(status, StatusCode::OK);
    assert!(spec["paths"]["/v1/sandboxes"]["post"].is_object());
    assert!(spec["paths"]["/v1/sandboxes/{id}/exec"]["post"].is_object());

    let (status, summary) = cp
        .admin()
        .post(
            &format!("/v1/admin/orgs/{org_id}/credits"),
            json!({"amount_micros": 5_000_000, "reference": "invoice-1"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{summary}");
    // The same reference again credits nothing.
    let (_, again) = cp
        .admin()
        .post(
            &format!("/v1/admin/orgs/{org_id}/credits"),
            json!({"amount_micros": 5_000_000, "reference": "invoice-1"}),
        )
        .await;
    let expected = corral_tests::TEST_CREDITS_MICROS + 5_000_000;
    assert_eq!(again["balance_micros"], expected);
    let (_, billing) = api.get("/v1/billing").await;
    assert_eq!(billing["balance_micros"], expected);
    assert_eq!(billing["status"], "active");
}

#[tokio::test]
async fn an_exit_the_agent_observes_is_recorded() {
    let cp = TestServer::start().await;
    let agent = cp.fake_agent(4000, 4096, fake(0)).await;
    let (_, api) = cp.create_org("exits").await;
    let id = id_of(&create_sandbox(&api, small("short")).await);

    agent.runtime.simulate_exit(&id, 7);
    let sandbox = wait_for("the exit to be recorded", Duration::from_secs(10), || {
        let api = api.clone();
        let id = id.clone();
        async move {
            let (_, s) = api.get(&format!("/v1/sandboxes/{id}")).await;
            (s["state"] == "stopped").then_some(s)
        }
    })
    .await;
    assert_eq!(sandbox["exit_code"], 7);
    assert_eq!(
        sandbox["desired_state"], "stopped",
        "no restart policy: it stays stopped"
    );
}

#[tokio::test]
async fn a_control_plane_restart_loses_nothing() {
    let cp = TestServer::start().await;
    let agent = cp.fake_agent(4000, 4096, fake(0)).await;
    let (_, api) = cp.create_org("restart").await;
    let running = id_of(&create_sandbox(&api, small("keeps-running")).await);
    let stopped = id_of(&create_sandbox(&api, small("stays-stopped")).await);
    let (status, _) = api
        .post(&format!("/v1/sandboxes/{stopped}/stop"), json!({}))
        .await;
    assert_eq!(status, StatusCode::OK);

    let cp = cp.restart().await;
    // The agent reconnects by itself; its inventory is reconciled.
    cp.wait_host_ready(&agent.host_id).await;
    let (status, out) = api
        .post(
            &format!("/v1/sandboxes/{running}/exec"),
            json!({"argv": ["echo", "still here"]}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{out}");
    assert_eq!(out["stdout"], "still here\n");
    let (_, s) = api.get(&format!("/v1/sandboxes/{stopped}")).await;
    assert_eq!(s["state"], "stopped");
    assert_eq!(
        agent.runtime.sandbox_ids().len(),
        2,
        "nothing was recreated or lost"
    );

    // Reservations were rebuilt: 2 of 4 slots are taken.
    let allocated = cp
        .server
        .control_plane
        .allocated_on(&agent.host_id)
        .await
        .expect("capacity")
        .expect("known host");
    assert_eq!(allocated.cpu_millis, 2000);
    // And the rebuilt actors still drive their sandboxes.
    let (status, s) = api
        .post(&format!("/v1/sandboxes/{stopped}/start"), json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{s}");
    assert_eq!(s["state"], "running");
}

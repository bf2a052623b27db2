//! Scheduling with agents on the fake runtime over real gRPC: selectors,
//! strategies and validation, per-org permission to choose the strategy,
//! private pools, operator actions (cordon,
//! drain, decommission), retries on a host that fails creates, host loss
//! with the `on_host_loss` restart policy, waiting for capacity, and a race
//! of concurrent creates that must never overfill a host.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use corral_agent::fake::FakeConfig;
use corral_tests::{error_code, id_of, wait_for, Api, InProcessAgent, TestServer};
use reqwest::StatusCode;
use serde_json::{json, Value};

fn fake() -> FakeConfig {
    FakeConfig::default()
}

fn body(name: &str, cpu: u64, mem: u64) -> Value {
    json!({
        "image": "busybox",
        "command": ["sleep", "600"],
        "name": name,
        "cpu_millis": cpu,
        "memory_mb": mem,
    })
}

async fn create(api: &Api, body: Value) -> Value {
    let (status, sandbox) = api.post("/v1/sandboxes", body).await;
    assert_eq!(status, StatusCode::CREATED, "{sandbox}");
    sandbox
}

async fn admin_host(cp: &TestServer, host: &str, verb: &str) -> (StatusCode, Value) {
    cp.admin()
        .post(&format!("/v1/admin/hosts/{host}/{verb}"), json!({}))
        .await
}

async fn wait_sandbox(api: &Api, id: &str, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
    wait_for(what, Duration::from_secs(20), || {
        let api = api.clone();
        let id = id.to_string();
        let ok = &ok;
        async move {
            let (status, sandbox) = api.get(&format!("/v1/sandboxes/{id}")).await;
            (status == StatusCode::OK && ok(&sandbox)).then_some(sandbox)
        }
    })
    .await
}

#[tokio::test]
async fn selectors_runtime_and_strategies_place_where_asked() {
    let cp = TestServer::start().await;
    let eu = cp
        .fake_agent_labeled(8000, 8192, fake(), &[("region", "eu")], None)
        .await;
    let us = cp
        .fake_agent_labeled(
            8000,
            8192,
            fake(),
            &[("region", "us"), ("gpu", "a100")],
            None,
        )
        .await;
    let (_, api) = cp.create_org("acme").await;

    let mut b = body("in-eu", 100, 64);
    b["placement"] = json!({"selector": {"region": "eu"}});
    assert_eq!(create(&api, b).await["host_id"], json!(eu.host_id));
    let mut b = body("on-gpu", 100, 64);
    b["placement"] = json!({"selector": {"gpu": "a100"}, "runtime": "fake"});
    assert_eq!(create(&api, b).await["host_id"], json!(us.host_id));

    // Nothing carries the label: no_capacity, saying what was asked.
    let mut b = body("nowhere", 100, 64);
    b["placement"] = json!({"selector": {"region": "mars"}});
    let (status, err) = api.post("/v1/sandboxes", b).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{err}");
    assert_eq!(error_code(&err), "no_capacity");
    let mut b = body("no-docker", 100, 64);
    b["placement"] = json!({"runtime": "docker"});
    let (status, err) = api.post("/v1/sandboxes", b).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{err}");

    // Binpack keeps filling the fuller host; spread goes to the emptier.
    let mut b = body("pack-1", 2000, 512);
    b["placement"] = json!({"strategy": "binpack", "selector": {"region": "eu"}});
    create(&api, b).await;
    let mut b = body("pack-2", 500, 64);
    b["placement"] = json!({"strategy": "binpack"});
    assert_eq!(create(&api, b).await["host_id"], json!(eu.host_id));
    let spread = create(&api, body("spread", 500, 64)).await;
    assert_eq!(spread["host_id"], json!(us.host_id));

    // Anti-affinity: a group spreads over both hosts even under binpack.
    let mut hosts = Vec::new();
    for i in 0..2 {
        let mut b = body(&format!("web-{i}"), 100, 64);
        b["labels"] = json!({"app": "web"});
        b["placement"] = json!({"strategy": "binpack", "spread_by": "app"});
        hosts.push(create(&api, b).await["host_id"].clone());
    }
    assert_ne!(hosts[0], hosts[1], "the group is spread: {hosts:?}");

    // Mistakes are 422 with stable codes.
    for (placement, extra, code) in [
        (json!({"strategy": "random"}), json!({}), "invalid_strategy"),
        (json!({"runtime": "kvm"}), json!({}), "invalid_runtime"),
        (
            json!({"selector": {"Bad Key": "x"}}),
            json!({}),
            "invalid_selector",
        ),
        (json!({"spread_by": "app"}), json!({}), "invalid_spread_by"),
        (
            json!({"wait_timeout_ms": 10_000_000}),
            json!({}),
            "invalid_wait_timeout",
        ),
        (
            json!({}),
            json!({"restart_policy": "always"}),
            "invalid_restart_policy",
        ),
    ] {
        let mut b = body("bad", 100, 64);
        b["placement"] = placement;
        if let Some(policy) = extra.get("restart_policy") {
            b["restart_policy"] = policy.clone();
        }
        let (status, err) = api.post("/v1/sandboxes", b).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{err}");
        assert_eq!(error_code(&err), code, "{err}");
    }

    // Host views carry labels, allocation and the sandbox count.
    let (status, list) = api.get("/v1/hosts").await;
    assert_eq!(status, StatusCode::OK, "{list}");
    let hosts = list["hosts"].as_array().expect("hosts");
    assert_eq!(hosts.len(), 2);
    let (status, view) = api.get(&format!("/v1/hosts/{}", eu.host_id)).await;
    assert_eq!(status, StatusCode::OK, "{view}");
    assert_eq!(view["labels"]["region"], "eu");
    assert_eq!(view["admin_state"], "active");
    assert_eq!(view["schedulable"], true);
    assert!(view["sandbox_count"].as_u64().unwrap_or(0) >= 3, "{view}");
    assert!(
        view["allocated"]["cpu_millis"].as_u64().unwrap_or(0) >= 2600,
        "{view}"
    );
    let (status, _) = api.get("/v1/hosts/hst_nonexistent").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

/// A `spread` create of an org that may choose: on the emptier host, where
/// the deployment's binpack would have added it to `packed`.
async fn assert_spread_chosen(api: &Api, name: &str, packed: &Value) {
    let mut b = body(name, 100, 64);
    b["placement"] = json!({"strategy": "spread"});
    let sandbox = create(api, b).await;
    assert_ne!(
        &sandbox["host_id"], packed,
        "spread was not applied: {sandbox}"
    );
}

#[tokio::test]
async fn strategy_overrides_follow_the_deployment_unless_the_org_has_its_own_permission() {
    let cp = TestServer::start_with(|c| {
        c.no_strategy_override = true;
        c.placement_strategy = "binpack".into();
    })
    .await;
    let first = cp.fake_agent(4000, 4096, fake()).await;
    let second = cp.fake_agent(4000, 4096, fake()).await;
    let (org_a, api_a) = cp.create_org("chooser").await;
    let (_, api_b) = cp.create_org("bystander").await;
    let admin = cp.admin();
    let mut spread = body("spread", 100, 64);
    spread["placement"] = json!({"strategy": "spread"});

    // The deployment forbids it: 422 before anything is stored.
    let (status, err) = api_a.post("/v1/sandboxes", spread.clone()).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{err}");
    assert_eq!(error_code(&err), "strategy_override_not_allowed");
    let (_, list) = api_a.get("/v1/sandboxes").await;
    assert_eq!(list["sandboxes"], json!([]), "{list}");
    let (_, view) = api_a.get("/v1/placement").await;
    assert_eq!(
        view,
        json!({"org_id": org_a, "private_pool_only": false,
               "allow_strategy_override": null, "strategy_override_allowed": false})
    );
    // Without a strategy of its own a create gets binpack.
    let one = create(&api_a, body("packed-1", 100, 64)).await;
    let two = create(&api_a, body("packed-2", 100, 64)).await;
    assert_eq!(one["host_id"], two["host_id"], "binpack: {one} {two}");

    // The admin allows this org, and only it, to choose.
    let path_a = format!("/v1/admin/orgs/{org_a}/placement");
    let allow = json!({"private_pool_only": false, "allow_strategy_override": true});
    let (status, err) = admin
        .put(
            &path_a,
            json!({"private_pool_only": false, "allow_strategy_override": "yes"}),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{err}");
    let (status, view) = admin.put(&path_a, allow).await;
    assert_eq!(status, StatusCode::OK, "{view}");
    assert_eq!(view["allow_strategy_override"], json!(true), "{view}");
    assert_eq!(view["strategy_override_allowed"], json!(true), "{view}");
    assert_spread_chosen(&api_a, "allowed", &one["host_id"]).await;
    let (status, err) = api_b.post("/v1/sandboxes", spread.clone()).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{err}");
    let (_, view) = api_b.get("/v1/placement").await;
    assert_eq!(view["strategy_override_allowed"], json!(false), "{view}");

    // The permission survives a control-plane restart.
    let cp = cp.restart().await;
    for host in [&first.host_id, &second.host_id] {
        cp.wait_host_ready(host).await;
    }
    assert_spread_chosen(&api_a, "after-restart", &one["host_id"]).await;

    // Back to the deployment's default: refused again.
    let (status, view) = cp
        .admin()
        .put(&path_a, json!({"private_pool_only": false}))
        .await;
    assert_eq!(status, StatusCode::OK, "{view}");
    assert_eq!(view["allow_strategy_override"], json!(null), "{view}");
    let (status, err) = api_a.post("/v1/sandboxes", spread).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{err}");
    assert_eq!(error_code(&err), "strategy_override_not_allowed");
}

#[tokio::test]
async fn an_org_can_be_denied_strategy_overrides_the_deployment_allows() {
    let cp = TestServer::start().await;
    let _agent = cp.fake_agent(4000, 4096, fake()).await;
    let (org, api) = cp.create_org("denied").await;
    let (_, other) = cp.create_org("free").await;
    let mut binpack = body("binpack", 100, 64);
    binpack["placement"] = json!({"strategy": "binpack"});
    create(&api, binpack.clone()).await;
    let (status, view) = cp
        .admin()
        .put(
            &format!("/v1/admin/orgs/{org}/placement"),
            json!({"private_pool_only": false, "allow_strategy_override": false}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{view}");
    assert_eq!(view["strategy_override_allowed"], json!(false), "{view}");
    let (status, err) = api.post("/v1/sandboxes", binpack.clone()).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{err}");
    assert_eq!(error_code(&err), "strategy_override_not_allowed");
    create(&other, binpack).await;
}

#[tokio::test]
async fn a_private_pool_takes_only_its_org() {
    let cp = TestServer::start().await;
    let (org_a, api_a) = cp.create_org("pool-owner").await;
    let (_, api_b) = cp.create_org("other").await;
    let pool = cp
        .fake_agent_labeled(64_000, 65_536, fake(), &[], Some(&org_a))
        .await;
    let shared = cp.fake_agent(2000, 2048, fake()).await;

    // A's sandboxes go to its pool first, though the pool is far bigger.
    let a1 = create(&api_a, body("a1", 1000, 256)).await;
    assert_eq!(a1["host_id"], json!(pool.host_id));
    // B never lands on A's pool, and cannot see it.
    for i in 0..2 {
        let b = create(&api_b, body(&format!("b{i}"), 1000, 256)).await;
        assert_eq!(b["host_id"], json!(shared.host_id));
    }
    let (status, err) = api_b.post("/v1/sandboxes", body("b-full", 1000, 256)).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{err}");
    assert_eq!(error_code(&err), "no_capacity");
    let (_, list) = api_b.get("/v1/hosts").await;
    let ids: Vec<&str> = list["hosts"]
        .as_array()
        .expect("hosts")
        .iter()
        .filter_map(|h| h["id"].as_str())
        .collect();
    assert_eq!(ids, vec![shared.host_id.as_str()]);
    let (status, _) = api_b.get(&format!("/v1/hosts/{}", pool.host_id)).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, view) = api_a.get(&format!("/v1/hosts/{}", pool.host_id)).await;
    assert_eq!(status, StatusCode::OK, "{view}");
    assert_eq!(view["org_id"], json!(org_a));

    // private_pool_only: never the shared fleet, even when the pool is full.
    let mut only = body("a-only", 64_000, 1024);
    only["placement"] = json!({"private_pool_only": true});
    let (status, err) = api_a.post("/v1/sandboxes", only).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{err}");
    let (status, _) = admin_host(&cp, &pool.host_id, "cordon").await;
    assert_eq!(status, StatusCode::OK);
    let mut only = body("a-only", 100, 64);
    only["placement"] = json!({"private_pool_only": true});
    let (status, err) = api_a.post("/v1/sandboxes", only).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{err}");
    assert_eq!(error_code(&err), "no_capacity");
}

#[tokio::test]
async fn an_org_can_be_required_to_use_only_its_private_pool() {
    let cp = TestServer::start().await;
    let (org_a, api_a) = cp.create_org("pool-only").await;
    let (org_b, api_b) = cp.create_org("bystander").await;
    let pool = cp
        .fake_agent_labeled(1000, 1024, fake(), &[], Some(&org_a))
        .await;
    let shared_1 = cp.fake_agent(8000, 8192, fake()).await;
    let shared_2 = cp.fake_agent(8000, 8192, fake()).await;
    let shared = [shared_1.host_id.clone(), shared_2.host_id.clone()];
    let admin = cp.admin();
    let setting = |on: bool| json!({ "private_pool_only": on });

    // Only the platform admin sets it, for an org that exists.
    let path_a = format!("/v1/admin/orgs/{org_a}/placement");
    let (status, _) = api_a.put(&path_a, setting(true)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, err) = admin
        .put(
            "/v1/admin/orgs/org_00000000deadbeef/placement",
            setting(true),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{err}");
    assert_eq!(error_code(&err), "not_found");
    let (status, err) = admin
        .put(&path_a, json!({ "private_pool_only": "yes" }))
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{err}");
    assert_eq!(error_code(&err), "invalid_body");
    let (status, view) = api_a.get("/v1/placement").await;
    assert_eq!(status, StatusCode::OK, "{view}");
    assert_eq!(view["org_id"], json!(org_a));
    assert_eq!(view["private_pool_only"], json!(false));

    // Off: a create too big for the pool goes to the shared fleet.
    let big = create(&api_a, body("a-big", 2000, 256)).await;
    assert!(
        shared.contains(&big["host_id"].as_str().unwrap_or("").to_string()),
        "{big}"
    );

    let (status, view) = admin.put(&path_a, setting(true)).await;
    assert_eq!(status, StatusCode::OK, "{view}");
    assert_eq!(view["private_pool_only"], json!(true), "{view}");
    let (_, view) = api_a.get("/v1/placement").await;
    assert_eq!(view["private_pool_only"], json!(true));
    let (_, view) = api_b.get("/v1/placement").await;
    assert_eq!(view["org_id"], json!(org_b));
    assert_eq!(view["private_pool_only"], json!(false));
    let (_, orgs) = admin.get("/v1/admin/orgs").await;
    let listed = orgs["orgs"]
        .as_array()
        .and_then(|o| o.iter().find(|o| o["id"] == json!(org_a)))
        .cloned()
        .unwrap_or_default();
    assert_eq!(listed["private_pool_only"], json!(true), "{orgs}");

    // On: creates land only on the private host...
    for i in 0..2 {
        let a = create(&api_a, body(&format!("a{i}"), 500, 256)).await;
        assert_eq!(a["host_id"], json!(pool.host_id), "{a}");
    }
    // ...and when it is full they get no_capacity though the shared hosts
    // are free; the request cannot loosen the org's setting.
    let mut loose = body("a-loose", 100, 64);
    loose["placement"] = json!({ "private_pool_only": false });
    let (status, err) = api_a.post("/v1/sandboxes", loose.clone()).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{err}");
    assert_eq!(error_code(&err), "no_capacity");
    // Another org is unaffected.
    let b = create(&api_b, body("b", 500, 256)).await;
    assert!(
        shared.contains(&b["host_id"].as_str().unwrap_or("").to_string()),
        "{b}"
    );

    // The change is audited.
    let events = wait_for("the audit event", Duration::from_secs(10), || {
        let admin = admin.clone();
        let org_a = org_a.clone();
        async move {
            let (_, body) = admin.get("/v1/admin/audit").await;
            body["events"].as_array().and_then(|events| {
                events
                    .iter()
                    .filter(|e| e["action"] == "PUT /v1/admin/orgs/{id}/placement")
                    .filter(|e| e["target_id"] == json!(org_a) && e["status"] == 200)
                    .map(|e| e["actor"].clone())
                    .next()
            })
        }
    })
    .await;
    assert_eq!(events, json!("platform-admin"));

    // The setting survives a control-plane restart.
    let cp = cp.restart().await;
    for host in [&pool.host_id, &shared[0], &shared[1]] {
        cp.wait_host_ready(host).await;
    }
    let (_, view) = api_a.get("/v1/placement").await;
    assert_eq!(view["private_pool_only"], json!(true), "{view}");
    let (status, err) = api_a.post("/v1/sandboxes", loose).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{err}");
    assert_eq!(error_code(&err), "no_capacity");

    // Cleared: the org may use the shared fleet again.
    let (status, _) = cp.admin().put(&path_a, setting(false)).await;
    assert_eq!(status, StatusCode::OK);
    let again = create(&api_a, body("a-again", 100, 64)).await;
    assert!(
        shared.contains(&again["host_id"].as_str().unwrap_or("").to_string()),
        "{again}"
    );
}

#[tokio::test]
async fn drain_moves_on_host_loss_sandboxes_stops_the_rest_then_decommission() {
    let cp = TestServer::start().await;
    let a = cp.fake_agent(4000, 4096, fake()).await;
    let b = cp.fake_agent(4000, 4096, fake()).await;
    let (_, api) = cp.create_org("acme").await;

    // Both on host a (b cordoned meanwhile).
    let (status, cordoned) = admin_host(&cp, &b.host_id, "cordon").await;
    assert_eq!(status, StatusCode::OK, "{cordoned}");
    assert_eq!(cordoned["admin_state"], "cordoned");
    assert_eq!(cordoned["schedulable"], false);
    let mut moving = body("moving", 500, 128);
    moving["restart_policy"] = json!("on_host_loss");
    let moving = create(&api, moving).await;
    let staying = create(&api, body("staying", 500, 128)).await;
    assert_eq!(moving["host_id"], json!(a.host_id));
    assert_eq!(moving["restart_policy"], "on_host_loss");
    assert_eq!(staying["host_id"], json!(a.host_id));
    let (status, _) = admin_host(&cp, &b.host_id, "uncordon").await;
    assert_eq!(status, StatusCode::OK);

    let (status, draining) = admin_host(&cp, &a.host_id, "drain").await;
    assert_eq!(status, StatusCode::OK, "{draining}");
    assert_eq!(draining["admin_state"], "draining");
    let moved = wait_sandbox(&api, &id_of(&moving), "the sandbox to run on host b", |s| {
        s["host_id"] == json!(b.host_id) && s["state"] == "running"
    })
    .await;
    assert_eq!(id_of(&moved), id_of(&moving), "same id");
    assert!(b.runtime.phase(&id_of(&moving)).is_some(), "host b runs it");
    wait_for(
        "host a to let go of it",
        Duration::from_secs(20),
        || async { a.runtime.phase(&id_of(&moving)).is_none().then_some(()) },
    )
    .await;
    let stopped = wait_sandbox(&api, &id_of(&staying), "the other sandbox to stop", |s| {
        s["state"] == "stopped"
    })
    .await;
    assert_eq!(stopped["host_id"], json!(a.host_id));

    // Nothing new goes to a draining host.
    let mut pinned = body("pinned", 100, 64);
    pinned["placement"] = json!({"strategy": "spread"});
    assert_eq!(create(&api, pinned).await["host_id"], json!(b.host_id));

    // Decommission waits for the host to be empty.
    let (status, err) = admin_host(&cp, &a.host_id, "decommission").await;
    assert_eq!(status, StatusCode::CONFLICT, "{err}");
    let (status, _) = api
        .delete(&format!("/v1/sandboxes/{}", id_of(&staying)))
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, gone) = admin_host(&cp, &a.host_id, "decommission").await;
    assert_eq!(status, StatusCode::OK, "{gone}");
    assert_eq!(gone["admin_state"], "decommissioned");
    let (_, hosts) = cp.admin().get("/v1/admin/hosts").await;
    let row = hosts["hosts"]
        .as_array()
        .expect("hosts")
        .iter()
        .find(|h| h["id"] == json!(a.host_id))
        .cloned()
        .expect("the decommissioned host is still listed");
    assert_eq!(row["admin_state"], "decommissioned");
    let (status, _) = admin_host(&cp, &a.host_id, "uncordon").await;
    assert_eq!(status, StatusCode::CONFLICT);
    let (status, _) = admin_host(&cp, "hst_nonexistent", "drain").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn a_create_the_host_fails_is_retried_on_another_host() {
    let cp = TestServer::start().await;
    // The broken host is the emptiest, so spread tries it first.
    let broken = cp
        .fake_agent(
            64_000,
            65_536,
            FakeConfig {
                fail_rate: 1.0,
                ..FakeConfig::default()
            },
        )
        .await;
    let good = cp.fake_agent(2000, 2048, fake()).await;
    let (_, api) = cp.create_org("acme").await;

    let sandbox = create(&api, body("retried", 500, 128)).await;
    assert_eq!(sandbox["state"], "running", "{sandbox}");
    assert_eq!(sandbox["host_id"], json!(good.host_id));
    assert!(broken.runtime.sandbox_ids().is_empty());
    // The broken host holds no reservation for it.
    let capacity = cp.server.control_plane.capacity().await.expect("capacity");
    assert_eq!(capacity[&broken.host_id].allocated.cpu_millis, 0);
    assert_eq!(capacity[&good.host_id].allocated.cpu_millis, 500);

    // An unknown image is the request's fault: not retried, 422.
    let mut bad = body("bad-image", 100, 64);
    bad["image"] = json!("no-such-image");
    let (status, err) = api.post("/v1/sandboxes", bad).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{err}");
    assert_eq!(error_code(&err), "image_not_found");

    // Only broken hosts left: it fails after trying them, with a reason.
    let (status, _) = admin_host(&cp, &good.host_id, "cordon").await;
    assert_eq!(status, StatusCode::OK);
    let (status, err) = api.post("/v1/sandboxes", body("doomed", 100, 64)).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{err}");
    assert_eq!(error_code(&err), "sandbox_failed");
}

#[tokio::test]
async fn a_host_lost_for_good_recreates_on_host_loss_sandboxes_elsewhere() {
    let cp = TestServer::start_with(|c| c.offline_grace_ms = 500).await;
    let a = cp.fake_agent(4000, 4096, fake()).await;
    let b = cp.fake_agent(4000, 4096, fake()).await;
    let (_, api) = cp.create_org("acme").await;
    let (status, _) = admin_host(&cp, &b.host_id, "cordon").await;
    assert_eq!(status, StatusCode::OK);
    let mut moving = body("moving", 500, 128);
    moving["restart_policy"] = json!("on_host_loss");
    let moving = id_of(&create(&api, moving).await);
    let staying = id_of(&create(&api, body("staying", 500, 128)).await);
    let (status, _) = admin_host(&cp, &b.host_id, "uncordon").await;
    assert_eq!(status, StatusCode::OK);

    // Host a stops for good.
    let a_id = a.host_id.clone();
    a.stop().await;
    let moved = wait_sandbox(&api, &moving, "the sandbox to run on host b", |s| {
        s["host_id"] == json!(b.host_id) && s["state"] == "running"
    })
    .await;
    assert_eq!(id_of(&moved), moving, "same id");
    assert!(b.runtime.phase(&moving).is_some());
    let lost = wait_sandbox(&api, &staying, "the other sandbox to be lost", |s| {
        s["state"] == "lost"
    })
    .await;
    assert_eq!(lost["restart_policy"], "never");
    let capacity = cp.server.control_plane.capacity().await.expect("capacity");
    assert_eq!(capacity[&a_id].allocated.cpu_millis, 0);
    assert_eq!(capacity[&b.host_id].allocated.cpu_millis, 500);
}

#[tokio::test]
async fn no_capacity_names_the_largest_slot_or_waits_for_one() {
    let cp = TestServer::start().await;
    let _agent = cp.fake_agent(2000, 2048, fake()).await;
    let (_, api) = cp.create_org("acme").await;
    let big = id_of(&create(&api, body("big", 1500, 1024)).await);

    let (status, err) = api.post("/v1/sandboxes", body("too-big", 1000, 256)).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{err}");
    assert_eq!(error_code(&err), "no_capacity");
    let message = err["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("1000 mCPU") && message.contains("500 mCPU"),
        "{message}"
    );

    // With a wait: it is placed once the big one goes.
    let mut waiting = body("waiting", 1000, 256);
    waiting["placement"] = json!({"wait_timeout_ms": 20_000});
    let api2 = api.clone();
    let pending = tokio::spawn(async move { api2.post("/v1/sandboxes", waiting).await });
    // It is still waiting while the big one runs.
    let (status, _) = api.get(&format!("/v1/sandboxes/{big}")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(!pending.is_finished());
    let (status, _) = api.delete(&format!("/v1/sandboxes/{big}")).await;
    assert_eq!(status, StatusCode::OK);
    let (status, placed) = pending.await.expect("the waiting create");
    assert_eq!(status, StatusCode::CREATED, "{placed}");
    assert_eq!(placed["state"], "running");

    // A short wait ends in no_capacity.
    let mut short = body("short", 1500, 256);
    short["placement"] = json!({"wait_timeout_ms": 200});
    let (status, err) = api.post("/v1/sandboxes", short).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{err}");
}

/// Many concurrent creates of random sizes over many hosts: afterwards no
/// host holds more than its allocatable capacity (by the scheduler's books
/// and by what the hosts really run), and every create either runs or got
/// `no_capacity`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_creates_never_overfill_a_host() {
    let cp = TestServer::start_with(|c| {
        c.rate_limit_per_second = 100_000;
        c.rate_limit_burst = 100_000;
    })
    .await;
    let mut agents: Vec<InProcessAgent> = Vec::new();
    for _ in 0..16 {
        agents.push(cp.fake_agent(2000, 2048, fake()).await);
    }
    let (_, api) = cp.create_org("racer").await;
    let creates = 1000;
    let gate = Arc::new(tokio::sync::Semaphore::new(64));
    let mut seed = 0x2545_f491_4f6c_dd1d_u64;
    let mut tasks = Vec::new();
    for i in 0..creates {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let cpu = 100 + (seed % 8) * 100;
        let mem = 64 + ((seed >> 8) % 8) * 64;
        let api = api.clone();
        let gate = gate.clone();
        tasks.push(tokio::spawn(async move {
            let _permit = gate.acquire().await.expect("semaphore");
            let (status, body) = api
                .post("/v1/sandboxes", body(&format!("r{i}"), cpu, mem))
                .await;
            (status, body, cpu, mem)
        }));
    }
    let mut ran = 0;
    let mut refused = 0;
    let mut by_host: HashMap<String, (u64, u64)> = HashMap::new();
    for task in tasks {
        let (status, body, cpu, mem) = task.await.expect("create task");
        match status {
            StatusCode::CREATED => {
                assert_eq!(body["state"], "running", "{body}");
                let host = body["host_id"].as_str().expect("host").to_string();
                let slot = by_host.entry(host).or_default();
                slot.0 += cpu;
                slot.1 += mem;
                ran += 1;
            }
            StatusCode::SERVICE_UNAVAILABLE => {
                assert_eq!(error_code(&body), "no_capacity", "{body}");
                refused += 1;
            }
            other => panic!("unexpected {other}: {body}"),
        }
    }
    assert_eq!(ran + refused, creates);
    assert!(ran > 0 && refused > 0, "ran {ran}, refused {refused}");
    let capacity = cp.server.control_plane.capacity().await.expect("capacity");
    for agent in &agents {
        let host = &capacity[&agent.host_id];
        assert!(
            host.allocated.cpu_millis <= host.allocatable.cpu_millis,
            "{host:?}"
        );
        assert!(
            host.allocated.memory_mb <= host.allocatable.memory_mb,
            "{host:?}"
        );
        let (cpu, mem) = by_host.get(&agent.host_id).copied().unwrap_or_default();
        assert!(
            cpu <= 2000 && mem <= 2048,
            "{} holds {cpu} mCPU {mem} MiB",
            agent.host_id
        );
        assert_eq!(host.allocated.cpu_millis, cpu);
        assert_eq!(host.allocated.memory_mb, mem);
        assert_eq!(agent.runtime.sandbox_ids().len(), host.sandboxes as usize);
    }
}

//! Tenancy, route by route: another org's key gets 404 on every id route
//! and sees nothing of ours in any list; a viewer key gets 403 on every
//! write and changes nothing (LESSONS 27).

use std::time::Duration;

use corral_agent::fake::FakeConfig;
use corral_tests::{create_sandbox, error_code, id_of, wait_for, TestServer};
use reqwest::StatusCode;
use serde_json::{json, Value};

fn fake() -> FakeConfig {
    FakeConfig {
        latency: Duration::ZERO,
        fail_rate: 0.0,
        images: vec!["busybox".into()],
    }
}

fn small() -> Value {
    json!({"image": "busybox", "command": ["sleep", "600"], "cpu_millis": 100, "memory_mb": 64})
}

#[tokio::test]
async fn another_orgs_key_finds_nothing_of_ours_on_any_route() {
    let cp = TestServer::start().await;
    let _agent = cp.fake_agent(8000, 8192, fake()).await;
    let (ours_id, ours) = cp.create_org("ours").await;
    let (_, theirs) = cp.create_org("theirs").await;
    let sandbox = create_sandbox(&ours, small()).await;
    let id = id_of(&sandbox);
    let (_, keys) = ours.get("/v1/api-keys").await;
    let key_id = keys["api_keys"][0]["id"].as_str().expect("key").to_string();
    // Give the audit log something of ours to (not) show.
    wait_for("our audit events", Duration::from_secs(10), || {
        let ours = ours.clone();
        async move {
            let (_, audit) = ours.get("/v1/audit").await;
            (!audit["events"].as_array()?.is_empty()).then_some(())
        }
    })
    .await;

    let id_routes = [
        theirs.get(&format!("/v1/sandboxes/{id}")).await,
        theirs
            .post(&format!("/v1/sandboxes/{id}/stop"), json!({}))
            .await,
        theirs
            .post(&format!("/v1/sandboxes/{id}/start"), json!({}))
            .await,
        theirs
            .post(
                &format!("/v1/sandboxes/{id}/exec"),
                json!({"argv": ["true"]}),
            )
            .await,
        theirs.delete(&format!("/v1/sandboxes/{id}")).await,
        theirs.delete(&format!("/v1/api-keys/{key_id}")).await,
    ];
    for (status, body) in id_routes {
        assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
        assert_eq!(error_code(&body), "not_found");
        assert!(
            !body.to_string().contains(&ours_id),
            "no org id leaks: {body}"
        );
    }

    // Let their probes reach the audit log before it is read.
    wait_for("their audit events", Duration::from_secs(10), || {
        let theirs = theirs.clone();
        async move {
            let (_, audit) = theirs.get("/v1/audit").await;
            (audit["events"].as_array()?.len() >= 5).then_some(())
        }
    })
    .await;
    for path in [
        "/v1/sandboxes",
        "/v1/api-keys",
        "/v1/audit",
        "/v1/billing",
        "/v1/billing/ledger",
        "/v1/usage",
    ] {
        let (status, body) = theirs.get(path).await;
        assert_eq!(status, StatusCode::OK, "{path}: {body}");
        if path == "/v1/audit" {
            // Their log holds their own probes (with the ids they typed),
            // and nothing done by us.
            let events = body["events"].as_array().cloned().unwrap_or_default();
            assert!(!events.is_empty(), "their probes are audited");
            assert!(
                events
                    .iter()
                    .all(|e| e["org_id"] != ours_id.as_str() && e["status"] == 404),
                "{body}"
            );
            continue;
        }
        let text = body.to_string();
        assert!(!text.contains(&id), "{path} shows our sandbox: {text}");
        assert!(!text.contains(&key_id), "{path} shows our key: {text}");
        assert!(!text.contains(&ours_id), "{path} shows our org: {text}");
    }

    // And nothing they tried changed anything of ours.
    let (_, row) = ours.get(&format!("/v1/sandboxes/{id}")).await;
    assert_eq!(row["state"], "running");
    assert_eq!(ours.get("/v1/sandboxes").await.0, StatusCode::OK);
}

#[tokio::test]
async fn a_viewer_key_is_refused_every_write_and_changes_nothing() {
    let cp = TestServer::start().await;
    let _agent = cp.fake_agent(8000, 8192, fake()).await;
    let (_, admin) = cp.create_org("readonly").await;
    let sandbox = create_sandbox(&admin, small()).await;
    let id = id_of(&sandbox);
    let (status, body) = admin
        .post("/v1/api-keys", json!({"name": "v", "role": "viewer"}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let viewer = admin.with_token(body["secret"].as_str().expect("secret"));
    let viewer_key = id_of(&body);

    let writes = [
        viewer.post("/v1/sandboxes", small()).await,
        viewer
            .post(&format!("/v1/sandboxes/{id}/stop"), json!({}))
            .await,
        viewer
            .post(&format!("/v1/sandboxes/{id}/start"), json!({}))
            .await,
        viewer
            .post(
                &format!("/v1/sandboxes/{id}/exec"),
                json!({"argv": ["true"]}),
            )
            .await,
        viewer.delete(&format!("/v1/sandboxes/{id}")).await,
        viewer
            .post("/v1/api-keys", json!({"name": "x", "role": "viewer"}))
            .await,
        viewer.delete(&format!("/v1/api-keys/{viewer_key}")).await,
    ];
    for (status, body) in writes {
        assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
        assert_eq!(error_code(&body), "forbidden");
    }
    // Admin routes are not for org keys of any role.
    assert_eq!(
        viewer.get("/v1/admin/orgs").await.0,
        StatusCode::UNAUTHORIZED
    );

    let (_, list) = admin.get("/v1/sandboxes").await;
    assert_eq!(list["sandboxes"].as_array().map(Vec::len), Some(1));
    assert_eq!(list["sandboxes"][0]["state"], "running");
    let (_, keys) = admin.get("/v1/api-keys").await;
    assert_eq!(keys["api_keys"].as_array().map(Vec::len), Some(2));
    assert!(keys["api_keys"]
        .as_array()
        .is_some_and(|k| k.iter().all(|k| k["revoked_at"].is_null())));
}

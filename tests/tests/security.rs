//! Security at the REST edge: key roles and expiry, the audit log and
//! request ids, rate, body, timeout and exec limits.

use std::time::Duration;

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

fn small() -> Value {
    json!({"image": "busybox", "command": ["sleep", "600"], "cpu_millis": 100, "memory_mb": 64})
}

/// Issues a key of `role` with `api` (an admin key); returns (key id, client).
async fn issue(api: &Api, role: &str) -> (String, Api) {
    let (status, body) = api
        .post("/v1/api-keys", json!({"name": role, "role": role}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["role"], role);
    (
        id_of(&body),
        api.with_token(body["secret"].as_str().expect("secret")),
    )
}

#[tokio::test]
async fn each_role_can_do_what_it_is_for_and_nothing_more() {
    let cp = TestServer::start().await;
    let _agent = cp.fake_agent(8000, 8192, fake(0)).await;
    let (_, admin) = cp.create_org("roles").await;
    let (_, developer) = issue(&admin, "developer").await;
    let (_, viewer) = issue(&admin, "viewer").await;
    let (_, billing) = issue(&admin, "billing").await;

    let sandbox = create_sandbox(&developer, small()).await;
    let id = id_of(&sandbox);
    let (status, out) = developer
        .post(
            &format!("/v1/sandboxes/{id}/exec"),
            json!({"argv": ["true"]}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{out}");
    assert_eq!(developer.get("/v1/billing").await.0, StatusCode::OK);

    for (who, api) in [
        ("developer", &developer),
        ("viewer", &viewer),
        ("billing", &billing),
    ] {
        let (status, body) = api.post("/v1/api-keys", json!({"name": "x"})).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{who}: {body}");
        assert_eq!(error_code(&body), "forbidden");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap_or("")
                .contains(who),
            "the message names the role: {body}"
        );
        assert_eq!(api.get("/v1/api-keys").await.0, StatusCode::FORBIDDEN);
        assert_eq!(api.get("/v1/audit").await.0, StatusCode::FORBIDDEN);
    }

    assert_eq!(viewer.get("/v1/sandboxes").await.0, StatusCode::OK);
    assert_eq!(
        viewer.get(&format!("/v1/sandboxes/{id}")).await.0,
        StatusCode::OK
    );
    assert_eq!(viewer.get("/v1/billing").await.0, StatusCode::OK);
    for (status, body) in [
        viewer.post("/v1/sandboxes", small()).await,
        viewer
            .post(&format!("/v1/sandboxes/{id}/stop"), json!({}))
            .await,
        viewer
            .post(
                &format!("/v1/sandboxes/{id}/exec"),
                json!({"argv": ["true"]}),
            )
            .await,
        viewer.delete(&format!("/v1/sandboxes/{id}")).await,
    ] {
        assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
        assert_eq!(error_code(&body), "forbidden");
    }

    assert_eq!(billing.get("/v1/billing").await.0, StatusCode::OK);
    assert_eq!(billing.get("/v1/usage").await.0, StatusCode::OK);
    assert_eq!(billing.get("/v1/sandboxes").await.0, StatusCode::FORBIDDEN);

    // Nothing a refused key tried changed the sandbox.
    let (_, row) = admin.get(&format!("/v1/sandboxes/{id}")).await;
    assert_eq!(row["state"], "running");
}

#[tokio::test]
async fn keys_default_to_developer_and_the_org_key_is_admin() {
    let cp = TestServer::start().await;
    let (_, admin) = cp.create_org("defaults").await;
    let (_, keys) = admin.get("/v1/api-keys").await;
    assert_eq!(keys["api_keys"][0]["role"], "admin");

    let (status, body) = admin.post("/v1/api-keys", json!({"name": "ci"})).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["role"], "developer");

    let (status, body) = admin
        .post("/v1/api-keys", json!({"name": "x", "role": "root"}))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let (status, body) = admin
        .post(
            "/v1/api-keys",
            json!({"name": "x", "expires_at": "2000-01-01T00:00:00Z"}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let (status, body) = admin
        .post(
            "/v1/api-keys",
            json!({"name": "x", "ttl_seconds": 60, "expires_at": "2999-01-01T00:00:00Z"}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let (status, body) = admin
        .post("/v1/api-keys", json!({"name": "x", "ttl_seconds": 0}))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
}

#[tokio::test]
async fn expired_keys_are_refused_like_revoked_ones() {
    let cp = TestServer::start().await;
    let (_, admin) = cp.create_org("expiry").await;
    let (status, body) = admin
        .post(
            "/v1/api-keys",
            json!({"name": "short", "role": "viewer", "ttl_seconds": 1}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert!(body["expires_at"].is_string(), "{body}");
    let short = admin.with_token(body["secret"].as_str().expect("secret"));
    assert_eq!(short.get("/v1/sandboxes").await.0, StatusCode::OK);
    let body = wait_for("the key to expire", Duration::from_secs(10), || {
        let short = short.clone();
        async move {
            let (status, body) = short.get("/v1/sandboxes").await;
            (status == StatusCode::UNAUTHORIZED).then_some(body)
        }
    })
    .await;
    assert_eq!(error_code(&body), "unauthenticated");
}

#[tokio::test]
async fn last_use_is_recorded_and_revocation_is_immediate() {
    let cp = TestServer::start().await;
    let (_, admin) = cp.create_org("usage").await;
    let (key_id, viewer) = issue(&admin, "viewer").await;
    let (_, keys) = admin.get("/v1/api-keys").await;
    let listed = |keys: &Value| {
        keys["api_keys"]
            .as_array()
            .and_then(|k| k.iter().find(|k| k["id"] == key_id.as_str()).cloned())
            .expect("listed")
    };
    assert!(listed(&keys)["last_used_at"].is_null());
    assert_eq!(viewer.get("/v1/sandboxes").await.0, StatusCode::OK);
    let (_, keys) = admin.get("/v1/api-keys").await;
    let stamped = listed(&keys)["last_used_at"].clone();
    assert!(stamped.is_string(), "{keys}");
    // A second use within the minute does not write again.
    assert_eq!(viewer.get("/v1/sandboxes").await.0, StatusCode::OK);
    let (_, keys) = admin.get("/v1/api-keys").await;
    assert_eq!(listed(&keys)["last_used_at"], stamped);

    let (status, _) = admin.delete(&format!("/v1/api-keys/{key_id}")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        viewer.get("/v1/sandboxes").await.0,
        StatusCode::UNAUTHORIZED
    );
}

async fn raw(
    method: reqwest::Method,
    url: String,
    token: &str,
    headers: &[(&str, &str)],
    body: Option<Vec<u8>>,
) -> (StatusCode, reqwest::header::HeaderMap, Value) {
    let mut request = corral_tests::http_client()
        .request(method, url)
        .bearer_auth(token);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    if let Some(body) = body {
        request = request
            .header("content-type", "application/json")
            .body(body);
    }
    let response = request.send().await.expect("the REST API answers");
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = response.bytes().await.expect("a body");
    let body = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).unwrap_or_else(|_| {
            panic!(
                "non-JSON body ({status}): {}",
                String::from_utf8_lossy(&bytes)
            )
        })
    };
    (status, headers, body)
}

#[tokio::test]
async fn every_response_has_a_request_id_and_errors_carry_it() {
    let cp = TestServer::start().await;
    let base = cp.server.http_url();
    let (status, headers, _) = raw(
        reqwest::Method::GET,
        format!("{base}/healthz"),
        "",
        &[],
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert!(headers.get("x-request-id").is_some());

    let (status, headers, body) = raw(
        reqwest::Method::GET,
        format!("{base}/v1/sandboxes"),
        "ck_wrong",
        &[("x-request-id", "client-chosen-42")],
        None,
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(headers["x-request-id"], "client-chosen-42");
    assert_eq!(body["error"]["request_id"], "client-chosen-42");

    // An id that is not a plain token is replaced, never echoed.
    let (_, headers, body) = raw(
        reqwest::Method::GET,
        format!("{base}/v1/nothing-here"),
        "",
        &[("x-request-id", "<script>alert(1)</script>")],
        None,
    )
    .await;
    let id = headers["x-request-id"].to_str().expect("ascii").to_string();
    assert!(!id.contains('<'));
    assert_eq!(body["error"]["request_id"], id.as_str());
    assert_eq!(error_code(&body), "no_route");
}

#[tokio::test]
async fn mutations_are_audited_and_only_admins_of_the_org_read_them() {
    let cp = TestServer::start().await;
    let _agent = cp.fake_agent(8000, 8192, fake(0)).await;
    let (org_id, admin) = cp.create_org("audited").await;
    let (_, other) = cp.create_org("other").await;
    let (dev_id, developer) = issue(&admin, "developer").await;
    let (viewer_id, viewer) = issue(&admin, "viewer").await;

    let base = cp.server.http_url();
    let (status, _, created) = raw(
        reqwest::Method::POST,
        format!("{base}/v1/sandboxes"),
        &developer.token,
        &[("x-request-id", "create-1")],
        Some(serde_json::to_vec(&small()).expect("json")),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let sandbox_id = id_of(&created);
    assert_eq!(
        viewer
            .delete(&format!("/v1/sandboxes/{sandbox_id}"))
            .await
            .0,
        StatusCode::FORBIDDEN
    );
    // Reads are not audited.
    assert_eq!(developer.get("/v1/sandboxes").await.0, StatusCode::OK);

    let events = wait_for("the audit events", Duration::from_secs(10), || {
        let admin = admin.clone();
        async move {
            let (status, body) = admin.get("/v1/audit").await;
            assert_eq!(status, StatusCode::OK, "{body}");
            let events = body["events"].as_array().cloned().unwrap_or_default();
            // api-keys x2 (issue), create, refused delete.
            (events.len() >= 4).then_some(events)
        }
    })
    .await;
    assert!(events.iter().all(|e| e["org_id"] == org_id.as_str()));
    assert!(events
        .iter()
        .all(|e| e["action"].as_str() != Some("GET /v1/sandboxes")));
    let create = events
        .iter()
        .find(|e| e["request_id"] == "create-1")
        .expect("the create is audited");
    assert_eq!(create["actor"], dev_id.as_str());
    assert_eq!(create["action"], "POST /v1/sandboxes");
    assert_eq!(create["target_id"], sandbox_id.as_str());
    assert_eq!(create["status"], 201);
    assert!(create["source_addr"]
        .as_str()
        .unwrap_or("")
        .starts_with("127.0.0.1:"));
    let refused = events
        .iter()
        .find(|e| e["actor"] == viewer_id.as_str())
        .expect("the refused delete is audited");
    assert_eq!(refused["action"], "DELETE /v1/sandboxes/{id}");
    assert_eq!(refused["target_id"], sandbox_id.as_str());
    assert_eq!(refused["status"], 403);

    // Pages.
    let (_, page) = admin.get("/v1/audit?limit=1").await;
    assert_eq!(page["events"].as_array().map(Vec::len), Some(1));
    let cursor = page["next_cursor"].as_str().expect("a cursor").to_string();
    let (_, next) = admin
        .get(&format!("/v1/audit?limit=1&after={cursor}"))
        .await;
    assert_ne!(next["events"][0]["id"], page["events"][0]["id"]);
    assert_eq!(
        admin.get("/v1/audit?after=abc").await.0,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        admin.get("/v1/audit?org=x").await.0,
        StatusCode::BAD_REQUEST
    );

    // Another org sees none of it; the platform admin sees it by org.
    let (_, theirs) = other.get("/v1/audit").await;
    assert_eq!(theirs["events"], json!([]));
    let (status, platform) = cp
        .admin()
        .get(&format!("/v1/admin/audit?org={org_id}"))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert!(platform["events"]
        .as_array()
        .is_some_and(|e| e.iter().any(|e| e["request_id"] == "create-1")));
    let (_, all) = cp.admin().get("/v1/admin/audit").await;
    assert!(all["events"]
        .as_array()
        .is_some_and(|e| e.iter().any(|e| e["actor"] == "platform-admin")));
    assert_eq!(
        admin.get("/v1/admin/audit").await.0,
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test]
async fn a_key_over_its_rate_is_told_to_retry_later() {
    let cp = TestServer::start_with(|c| {
        c.rate_limit_per_second = 1;
        c.rate_limit_burst = 3;
    })
    .await;
    let (_, admin) = cp.create_org("busy").await;
    let (_, other_key) = issue(&admin, "viewer").await;
    let base = cp.server.http_url();
    let mut limited = None;
    for _ in 0..5 {
        let (status, headers, body) = raw(
            reqwest::Method::GET,
            format!("{base}/v1/sandboxes"),
            &admin.token,
            // A spoofed address changes nothing: the key is the bucket.
            &[("x-forwarded-for", "10.9.8.7")],
            None,
        )
        .await;
        if status == StatusCode::TOO_MANY_REQUESTS {
            limited = Some((headers, body));
            break;
        }
    }
    let (headers, body) = limited.expect("the burst runs out");
    assert_eq!(error_code(&body), "rate_limited");
    let retry: u64 = headers["retry-after"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("seconds");
    assert!((1..=2).contains(&retry));
    // Another key has its own bucket.
    assert_eq!(other_key.get("/v1/sandboxes").await.0, StatusCode::OK);
}

#[tokio::test]
async fn large_bodies_slow_requests_and_exec_floods_are_refused() {
    let cp = TestServer::start_with(|c| {
        c.max_body_bytes = 4096;
        c.request_timeout_ms = 300;
        c.max_execs_per_sandbox = 1;
    })
    .await;
    let agent = cp.fake_agent(8000, 8192, fake(0)).await;
    let (_, admin) = cp.create_org("limits").await;
    let base = cp.server.http_url();

    let big = format!(r#"{{"name": "{}"}}"#, "a".repeat(8192));
    let (status, _, body) = raw(
        reqwest::Method::POST,
        format!("{base}/v1/api-keys"),
        &admin.token,
        &[],
        Some(big.into_bytes()),
    )
    .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    assert_eq!(error_code(&body), "payload_too_large");

    let sandbox = create_sandbox(&admin, small()).await;
    let id = id_of(&sandbox);

    // Exec is exempt from the request timeout (it has its own
    // timeout_ms), but the cap on concurrent execs applies: of two slow
    // execs at once, one runs and the other is refused.
    agent.runtime.set_latency(Duration::from_millis(1500));
    let exec = || {
        let admin = admin.clone();
        let id = id.clone();
        async move {
            admin
                .post(
                    &format!("/v1/sandboxes/{id}/exec"),
                    json!({"argv": ["true"]}),
                )
                .await
        }
    };
    let (a, b) = tokio::join!(exec(), exec());
    let mut outcomes = [a, b];
    outcomes.sort_by_key(|(status, _)| *status);
    assert_eq!(outcomes[0].0, StatusCode::OK, "{}", outcomes[0].1);
    assert_eq!(
        outcomes[1].0,
        StatusCode::TOO_MANY_REQUESTS,
        "{}",
        outcomes[1].1
    );
    assert_eq!(error_code(&outcomes[1].1), "too_many_execs");
    // The slot is free again once the exec is done.
    assert_eq!(exec().await.0, StatusCode::OK);

    // Any other route answers within the request timeout, not when the
    // host gets round to it.
    let started = std::time::Instant::now();
    let (status, body) = admin
        .post(&format!("/v1/sandboxes/{id}/stop"), json!({}))
        .await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "{body}");
    assert_eq!(error_code(&body), "request_timeout");
    assert!(started.elapsed() < Duration::from_secs(1));
}

//! Hostile input on every route that takes any: huge, empty, non-UTF-8,
//! deeply nested and wrongly typed bodies, path traversal in names and
//! images, negative and enormous resources, bad ids and query strings.
//! Every answer is a 4xx JSON error with a stable code, never a 5xx, and
//! nothing is left half-made.

use std::time::Duration;

use corral_agent::fake::FakeConfig;
use corral_tests::{create_sandbox, id_of, TestServer, ADMIN_TOKEN};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

/// Codes a client may see for bad input.
const INPUT_CODES: &[&str] = &[
    "invalid_argument",
    "invalid_body",
    "payload_too_large",
    "unsupported_media_type",
    "method_not_allowed",
    "not_found",
    "no_route",
    "invalid_request",
];

fn fake() -> FakeConfig {
    FakeConfig {
        latency: Duration::ZERO,
        fail_rate: 0.0,
        images: vec!["busybox".into()],
    }
}

struct Probe {
    client: reqwest::Client,
    base: String,
}

impl Probe {
    /// Sends it and checks the answer is a 4xx in our error shape.
    async fn refused(&self, method: Method, path: &str, token: &str, body: Option<Vec<u8>>) {
        let mut request = self
            .client
            .request(method.clone(), format!("{}{path}", self.base))
            .bearer_auth(token);
        if let Some(body) = body {
            request = request
                .header("content-type", "application/json")
                .body(body);
        }
        let response = request.send().await.expect("an answer");
        let status = response.status();
        let bytes = response.bytes().await.expect("a body");
        let shown: String = String::from_utf8_lossy(&bytes).chars().take(300).collect();
        assert!(
            status.is_client_error(),
            "{method} {path}: {status} is not a 4xx: {shown}"
        );
        let body: Value = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| panic!("{method} {path}: not JSON: {shown}"));
        let code = body["error"]["code"].as_str().unwrap_or("");
        assert!(
            INPUT_CODES.contains(&code),
            "{method} {path}: unexpected code {code:?}: {shown}"
        );
        assert!(body["error"]["request_id"].is_string(), "{shown}");
    }
}

fn hostile_bodies() -> Vec<(&'static str, Vec<u8>)> {
    let nested = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let nested_obj = format!("{}1{}", r#"{"a":"#.repeat(5000), "}".repeat(5000));
    vec![
        ("empty", Vec::new()),
        ("huge", vec![b' '; 2 << 20]),
        ("non-utf8", vec![0xff, 0xfe, 0x7b, 0x22, 0xc3, 0x28, 0x7d]),
        ("nested arrays", nested.into_bytes()),
        ("nested objects", nested_obj.into_bytes()),
        ("not an object", b"[1,2,3]".to_vec()),
        ("null", b"null".to_vec()),
        ("truncated", br#"{"name": "#.to_vec()),
        (
            "wrong types",
            br#"{"name": 5, "image": [], "argv": "x", "role": {}}"#.to_vec(),
        ),
        ("unknown fields", br#"{"zzz": 1}"#.to_vec()),
    ]
}

#[tokio::test]
async fn every_body_route_refuses_malformed_bodies_cleanly() {
    let cp = TestServer::start().await;
    let _agent = cp.fake_agent(8000, 8192, fake()).await;
    let (org_id, api) = cp.create_org("hostile").await;
    let sandbox = create_sandbox(
        &api,
        json!({"image": "busybox", "command": ["sleep", "1"], "cpu_millis": 100, "memory_mb": 64}),
    )
    .await;
    let id = id_of(&sandbox);
    let probe = Probe {
        client: corral_tests::http_client(),
        base: cp.server.http_url(),
    };
    let org_routes = [
        "/v1/sandboxes".to_string(),
        format!("/v1/sandboxes/{id}/exec"),
        "/v1/api-keys".to_string(),
    ];
    let admin_routes = [
        "/v1/admin/orgs".to_string(),
        format!("/v1/admin/orgs/{org_id}/credits"),
        "/v1/admin/plans".to_string(),
        "/v1/admin/host-tokens".to_string(),
    ];
    for (what, body) in hostile_bodies() {
        for path in &org_routes {
            eprintln!("{what} -> {path}");
            probe
                .refused(Method::POST, path, &api.token, Some(body.clone()))
                .await;
        }
        for path in &admin_routes {
            eprintln!("{what} -> {path}");
            probe
                .refused(Method::POST, path, ADMIN_TOKEN, Some(body.clone()))
                .await;
        }
        eprintln!("{what} -> billing settings");
        probe
            .refused(
                Method::PUT,
                &format!("/v1/admin/orgs/{org_id}/billing"),
                ADMIN_TOKEN,
                Some(body.clone()),
            )
            .await;
    }
    assert_no_partial_state(&cp, &api, 1).await;
}

#[tokio::test]
async fn hostile_values_names_ids_and_queries_are_refused() {
    let cp = TestServer::start().await;
    let _agent = cp.fake_agent(8000, 8192, fake()).await;
    let (_, api) = cp.create_org("values").await;
    let probe = Probe {
        client: corral_tests::http_client(),
        base: cp.server.http_url(),
    };
    let base = json!({"image": "busybox", "command": ["true"]});
    let with = |key: &str, value: Value| {
        let mut body = base.clone();
        body[key] = value;
        serde_json::to_vec(&body).expect("json")
    };
    let bad_creates = vec![
        with("name", json!("../../etc/passwd")),
        with("name", json!("a/b")),
        with("name", json!("x".repeat(10_000))),
        with("image", json!("../busybox")),
        with("image", json!("/etc/shadow")),
        with("image", json!("busybox\u{0}")),
        with("image", json!("")),
        with("workdir", json!("/tmp/../../etc")),
        with("workdir", json!("relative")),
        with("command", json!([])),
        with("command", json!(["a\u{0}b"])),
        with("command", json!(vec!["x"; 10_000])),
        with("cpu_millis", json!(-1)),
        with("cpu_millis", json!(0)),
        with("cpu_millis", json!(1e30)),
        with("cpu_millis", json!(u64::MAX)),
        with("memory_mb", json!(-512)),
        with("memory_mb", json!(u64::MAX)),
        with("memory_mb", json!(1.5)),
        with("ttl_seconds", json!(-1)),
        with("ttl_seconds", json!(u64::MAX)),
        with("env", json!({"BAD KEY": "x"})),
        with("env", json!({"A": "x".repeat(1 << 16)})),
        with("labels", json!({"../x": "y"})),
    ];
    for body in bad_creates {
        probe
            .refused(Method::POST, "/v1/sandboxes", &api.token, Some(body))
            .await;
    }
    let bad_paths = [
        (Method::GET, "/v1/sandboxes/..%2F..%2Fetc%2Fpasswd"),
        (Method::GET, "/v1/sandboxes/%FF%FE"),
        (Method::GET, "/v1/sandboxes/sbx_ZZZ"),
        (Method::DELETE, "/v1/sandboxes/%00"),
        (Method::POST, "/v1/sandboxes/../admin/orgs/stop"),
        (Method::DELETE, "/v1/api-keys/..%2F..%2F"),
        (Method::GET, "/v1/sandboxes?limit=-1"),
        (Method::GET, "/v1/sandboxes?limit=99999999999999999999999"),
        (Method::GET, "/v1/sandboxes?state=%FF"),
        (Method::GET, "/v1/sandboxes?label=novalue"),
        (Method::GET, "/v1/sandboxes?bogus=1"),
        (Method::GET, "/v1/audit?after=-"),
        (Method::GET, "/v1/billing/ledger?limit=abc"),
        (Method::GET, "/v1/usage?from=yesterday"),
        (Method::POST, "/v1/sandboxes?wait=perhaps"),
        (Method::PATCH, "/v1/sandboxes"),
    ];
    for (method, path) in bad_paths {
        let body = (method == Method::POST).then(|| serde_json::to_vec(&base).expect("json"));
        probe.refused(method, path, &api.token, body).await;
    }
    for body in [
        json!({"name": "k", "role": "superuser"}),
        json!({"name": "k", "ttl_seconds": -5}),
        json!({"name": "k", "expires_at": "not a date"}),
        json!({"name": ""}),
        json!({"name": "\u{7}bell"}),
    ] {
        probe
            .refused(
                Method::POST,
                "/v1/api-keys",
                &api.token,
                Some(serde_json::to_vec(&body).expect("json")),
            )
            .await;
    }
    for body in [
        json!({"name": "o", "credits_micros": -1}),
        json!({"name": "o", "credits_micros": i64::MAX}),
        json!({"name": "o", "plan": "../../etc"}),
    ] {
        probe
            .refused(
                Method::POST,
                "/v1/admin/orgs",
                ADMIN_TOKEN,
                Some(serde_json::to_vec(&body).expect("json")),
            )
            .await;
    }
    assert_no_partial_state(&cp, &api, 0).await;
}

/// Only the sandboxes a test made on purpose exist; only the one org key
/// and the one org per test.
async fn assert_no_partial_state(cp: &TestServer, api: &corral_tests::Api, sandboxes: usize) {
    let (status, list) = api.get("/v1/sandboxes").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        list["sandboxes"].as_array().map(Vec::len),
        Some(sandboxes),
        "{list}"
    );
    let (_, keys) = api.get("/v1/api-keys").await;
    assert_eq!(keys["api_keys"].as_array().map(Vec::len), Some(1), "{keys}");
    let (_, orgs) = cp.admin().get("/v1/admin/orgs").await;
    assert_eq!(orgs["orgs"].as_array().map(Vec::len), Some(1), "{orgs}");
}

//! Sandbox secrets and hardening options through the REST API, with an
//! in-process agent on the fake runtime: secret env values are sealed in the
//! database (no plaintext anywhere in its files), redacted in every answer,
//! and reach the agent decrypted; without a key they are refused; host
//! networking needs the operator's permission. The runc end-to-end checks
//! (the value inside the container, NoNewPrivs, seccomp, pids) are in
//! `hardening_runc.rs`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use corral_actors::secrets::SecretKey;
use corral_agent::fake::FakeConfig;
use corral_tests::{error_code, id_of, TestServer};
use reqwest::StatusCode;
use serde_json::json;

const SECRET: &str = "s3cr3t-value-that-must-never-leak";

fn fake() -> FakeConfig {
    FakeConfig {
        latency: Duration::ZERO,
        fail_rate: 0.0,
        images: vec!["busybox".into()],
    }
}

fn key_file(dir: &Path) -> PathBuf {
    let path = dir.join("secret.key");
    let key = SecretKey::generate().expect("a key");
    std::fs::write(&path, key.to_hex()).expect("write the key");
    path
}

/// Every byte of every file under `dir` (the SQLite database, its WAL).
fn all_bytes(dir: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).expect("read dir").flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(all_bytes(&path));
        } else if let Ok(bytes) = std::fs::read(&path) {
            out.extend(bytes);
        }
    }
    out
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

#[tokio::test]
async fn secret_env_is_sealed_at_rest_redacted_in_answers_and_reaches_the_agent() {
    let keys = tempfile::tempdir().expect("a temp dir");
    let key = key_file(keys.path());
    let cp = TestServer::start_with(|c| c.secret_key_file = Some(key)).await;
    let agent = cp.fake_agent(8000, 8192, fake()).await;
    let (org_id, api) = cp.create_org("secrets").await;

    let (status, created) = api
        .post(
            "/v1/sandboxes",
            json!({
                "image": "busybox",
                "command": ["sleep", "600"],
                "env": {"PLAIN": "visible"},
                "secret_env": {"API_TOKEN": SECRET},
            }),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let id = id_of(&created);
    assert_eq!(created["secret_env"], json!({"API_TOKEN": "***"}));
    assert_eq!(created["env"], json!({"PLAIN": "visible"}));
    assert!(!created.to_string().contains(SECRET), "{created}");

    // Every read path shows it redacted.
    let (_, got) = api.get(&format!("/v1/sandboxes/{id}")).await;
    assert_eq!(got["secret_env"], json!({"API_TOKEN": "***"}), "{got}");
    let (_, listed) = api.get("/v1/sandboxes").await;
    assert!(!listed.to_string().contains(SECRET), "{listed}");
    assert!(listed.to_string().contains("API_TOKEN"), "{listed}");

    // The agent got the value, decrypted, in the sandbox's env.
    let spec = agent.runtime.spec(&id).expect("the agent holds it");
    assert_eq!(spec.env.get("API_TOKEN").map(String::as_str), Some(SECRET));
    assert_eq!(spec.env.get("PLAIN").map(String::as_str), Some("visible"));
    assert!(!format!("{spec:?}").contains(SECRET), "Debug redacts");

    // The row holds a sealed value, and no file of the database holds the
    // plaintext.
    let row = cp
        .server
        .control_plane
        .store()
        .get_sandbox(&org_id, &id)
        .await
        .expect("read")
        .expect("the row");
    let sealed = row.secret_env.expect("secret_env column").to_string();
    assert!(
        sealed.contains("API_TOKEN") && sealed.contains("v1:"),
        "{sealed}"
    );
    assert!(!sealed.contains(SECRET), "{sealed}");
    assert!(!contains(&all_bytes(cp.dir.path()), SECRET));
    assert!(
        !contains(&all_bytes(cp.dir.path()), &hex_of(SECRET)),
        "not even hex-encoded"
    );
}

fn hex_of(text: &str) -> String {
    text.bytes().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test]
async fn without_a_key_secrets_are_refused_and_bad_secret_env_is_invalid() {
    let cp = TestServer::start().await;
    let agent = cp.fake_agent(8000, 8192, fake()).await;
    let (_, api) = cp.create_org("nokey").await;
    let (status, body) = api
        .post(
            "/v1/sandboxes",
            json!({"image": "busybox", "command": ["sleep", "600"], "secret_env": {"K": SECRET}}),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(error_code(&body), "secrets_unavailable");
    assert!(!body.to_string().contains(SECRET));
    assert!(
        agent.runtime.sandbox_ids().is_empty(),
        "nothing was created"
    );

    for bad in [json!({"K": "v", "1BAD": "v"}), json!({"K": "a\u{0}b"})] {
        let (status, body) = api
            .post(
                "/v1/sandboxes",
                json!({"image": "busybox", "command": ["true"], "secret_env": bad}),
            )
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(error_code(&body), "invalid_argument");
    }
    // A key in both env and secret_env is ambiguous.
    let (status, body) = api
        .post(
            "/v1/sandboxes",
            json!({"image": "busybox", "command": ["true"], "env": {"K": "a"}, "secret_env": {"K": "b"}}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
}

#[tokio::test]
async fn host_network_needs_the_operators_permission_and_options_are_kept() {
    let cp = TestServer::start().await;
    let agent = cp.fake_agent(8000, 8192, fake()).await;
    let (_, api) = cp.create_org("net").await;
    let (status, body) = api
        .post(
            "/v1/sandboxes",
            json!({"image": "busybox", "command": ["sleep", "600"], "network": "host"}),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(error_code(&body), "network_not_allowed");
    let (status, body) = api
        .post(
            "/v1/sandboxes",
            json!({"image": "busybox", "command": ["sleep", "600"], "network": "bridge"}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let (status, body) = api
        .post(
            "/v1/sandboxes",
            json!({"image": "busybox", "command": ["sleep", "600"], "pids_limit": 1}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");

    // Defaults: no network, writable root, the host's pids limit.
    let (status, plain) = api
        .post(
            "/v1/sandboxes",
            json!({"image": "busybox", "command": ["sleep", "600"]}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{plain}");
    assert_eq!(plain["network"], "none");
    assert_eq!(plain["read_only_root"], false);
    assert_eq!(plain["pids_limit"], json!(null));
    assert_eq!(plain["user_namespace"], false);
    assert_eq!(plain["secret_env"], json!({}));
    drop(agent);

    // An operator who allows it.
    let cp = TestServer::start_with(|c| c.allow_host_network = true).await;
    let agent = cp.fake_agent(8000, 8192, fake()).await;
    let (_, api) = cp.create_org("net").await;
    let (status, body) = api
        .post(
            "/v1/sandboxes",
            json!({
                "image": "busybox", "command": ["sleep", "600"], "network": "host",
                "read_only_root": true, "pids_limit": 64
            }),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["network"], "host");
    assert_eq!(body["read_only_root"], true);
    assert_eq!(body["pids_limit"], 64);
    let spec = agent.runtime.spec(&id_of(&body)).expect("held");
    assert!(spec.host_network && spec.read_only_root);
    assert_eq!(spec.pids_limit, 64);
}

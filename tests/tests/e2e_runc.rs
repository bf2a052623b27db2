//! End to end with real processes and real runc: the `corral` server and a
//! `corral-agent` on the runc runtime, talking gRPC over loopback; an org and
//! key made through the API; a busybox sandbox created, exec'd, stopped,
//! started and destroyed; the container gone from the host afterwards.
//!
//! Needs root, runc and a static busybox (scripts/install-deps installs
//! them). Without them the test says so and skips, except in CI, where it
//! fails.

use std::path::Path;
use std::time::Duration;

use corral_tests::{
    binary, create_sandbox, error_code, free_port, id_of, wait_for, Api, ChildProcess, ADMIN_TOKEN,
};
use reqwest::StatusCode;
use serde_json::json;

fn missing_prerequisite() -> Option<String> {
    if !nix_is_root() {
        return Some("not running as root".into());
    }
    if which("runc").is_none() {
        return Some("runc is not installed".into());
    }
    if !Path::new("/bin/busybox").exists() && !Path::new("/usr/bin/busybox").exists() {
        return Some("busybox-static is not installed".into());
    }
    None
}

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

fn which(name: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.exists())
    })
}

async fn runc_knows(root: &Path, id: &str) -> bool {
    let out = tokio::process::Command::new("runc")
        .arg("--root")
        .arg(root)
        .arg("list")
        .arg("--format")
        .arg("json")
        .output()
        .await
        .expect("runc list");
    String::from_utf8_lossy(&out.stdout).contains(id)
}

#[tokio::test]
async fn runc_sandbox_lifecycle_with_real_processes() {
    if let Some(reason) = missing_prerequisite() {
        assert!(
            !corral_tests::required(),
            "CI must run the runc end-to-end test: {reason}"
        );
        eprintln!("SKIPPED: runc end-to-end test: {reason}");
        return;
    }
    corral_tests::init_logging();
    let dir = tempfile::tempdir().expect("temp dir");
    let agent_dir = dir.path().join("agent");
    let (http_port, grpc_port) = (free_port(), free_port());

    let mut server = ChildProcess::spawn(
        "corral server",
        tokio::process::Command::new(binary("corral"))
            .arg("server")
            .arg("--http-addr")
            .arg(format!("127.0.0.1:{http_port}"))
            .arg("--grpc-addr")
            .arg(format!("127.0.0.1:{grpc_port}"))
            .arg("--data-dir")
            .arg(dir.path().join("cp"))
            .arg("--stop-grace-ms")
            .arg("3000")
            .env("CORRAL_ADMIN_TOKEN", ADMIN_TOKEN)
            .env_remove("DATABASE_URL"),
    );
    let base = format!("http://127.0.0.1:{http_port}");
    let admin = Api::new(&base, ADMIN_TOKEN);
    wait_for("the server to be ready", Duration::from_secs(30), || {
        let admin = admin.clone();
        async move {
            let ok = reqwest::get(format!("{}/readyz", admin.base)).await.ok()?;
            ok.status().is_success().then_some(())
        }
    })
    .await;

    // An org and its key, and a host token, through the API.
    let (status, org) = admin.post("/v1/admin/orgs", json!({"name": "e2e"})).await;
    assert_eq!(status, StatusCode::CREATED, "{org}");
    let api = Api::new(&base, org["api_key"]["secret"].as_str().expect("key"));
    let (status, token) = admin
        .post("/v1/admin/host-tokens", json!({"name": "runc-host"}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{token}");
    let host_id = token["host_id"].as_str().expect("host id").to_string();

    let built = tokio::process::Command::new(binary("corral-agent"))
        .arg("image")
        .arg("build-busybox")
        .arg("--data-dir")
        .arg(&agent_dir)
        .status()
        .await
        .expect("run corral-agent image build-busybox");
    assert!(built.success(), "the busybox image builds");

    let mut agent = ChildProcess::spawn(
        "corral-agent",
        tokio::process::Command::new(binary("corral-agent"))
            .arg("run")
            .arg("--control-plane")
            .arg(format!("http://127.0.0.1:{grpc_port}"))
            .arg("--token")
            .arg(token["token"].as_str().expect("token"))
            .arg("--data-dir")
            .arg(&agent_dir)
            .arg("--runtime")
            .arg("runc"),
    );
    wait_for("the runc host to register", Duration::from_secs(30), || {
        let admin = admin.clone();
        let host_id = host_id.clone();
        async move {
            let (_, hosts) = admin.get("/v1/admin/hosts").await;
            hosts["hosts"]
                .as_array()?
                .iter()
                .find(|h| h["id"] == host_id.as_str() && h["state"] == "ready")
                .map(|h| assert_eq!(h["runtime"], "runc"))
        }
    })
    .await;

    let sandbox = create_sandbox(
        &api,
        json!({
            "image": "busybox",
            "command": ["sh", "-c", "trap 'exit 0' TERM; while true; do sleep 1; done"],
            "env": {"GREETING": "hello from corral"},
            "cpu_millis": 500,
            "memory_mb": 64,
            "name": "e2e"
        }),
    )
    .await;
    assert_eq!(sandbox["state"], "running", "{sandbox}");
    let id = id_of(&sandbox);
    let runc_root = agent_dir.join("runc");
    assert!(runc_knows(&runc_root, &id).await, "runc runs the container");

    let exec = |argv: serde_json::Value| {
        let api = api.clone();
        let id = id.clone();
        async move {
            api.post(&format!("/v1/sandboxes/{id}/exec"), json!({"argv": argv}))
                .await
        }
    };
    let (status, out) = exec(json!(["echo", "hello"])).await;
    assert_eq!(status, StatusCode::OK, "{out}");
    assert_eq!(out["stdout"], "hello\n");
    assert_eq!(out["exit_code"], 0);
    // Isolation: its own PID namespace (the main process is PID 1) and env.
    let (_, out) = exec(json!([
        "sh",
        "-c",
        "echo $$ $GREETING; cat /proc/1/cmdline | tr '\\0' ' '"
    ]))
    .await;
    assert!(
        out["stdout"]
            .as_str()
            .is_some_and(|s| s.contains("hello from corral")),
        "{out}"
    );
    assert!(
        out["stdout"]
            .as_str()
            .is_some_and(|s| s.contains("sh -c trap")),
        "{out}"
    );
    let (_, out) = exec(json!(["sh", "-c", "exit 3"])).await;
    assert_eq!(out["exit_code"], 3);

    let (status, stopped) = api
        .post(&format!("/v1/sandboxes/{id}/stop"), json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{stopped}");
    assert_eq!(stopped["state"], "stopped");
    let (status, body) = exec(json!(["true"])).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(error_code(&body), "invalid_state");

    let (status, started) = api
        .post(&format!("/v1/sandboxes/{id}/start"), json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{started}");
    assert_eq!(started["state"], "running");
    let (_, out) = exec(json!(["echo", "again"])).await;
    assert_eq!(out["stdout"], "again\n");

    // A host error (unknown image) reaches the caller as a clear error.
    let (status, body) = api
        .post(
            "/v1/sandboxes",
            json!({"image": "no-such-image", "command": ["true"]}),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(error_code(&body), "image_not_found");

    let (status, gone) = api.delete(&format!("/v1/sandboxes/{id}")).await;
    assert_eq!(status, StatusCode::OK, "{gone}");
    assert_eq!(gone["state"], "destroyed");
    assert!(
        !runc_knows(&runc_root, &id).await,
        "the container is gone from the host"
    );
    assert!(
        !agent_dir.join("sandboxes").join(&id).exists(),
        "the bundle is gone from the host"
    );

    agent.kill().await;
    server.kill().await;
}

//! End to end with real processes and a real container runtime (runc, and
//! docker): the `corral` server and a `corral-agent` on that runtime,
//! talking gRPC over loopback; an org and key made through the API; a
//! busybox sandbox created, exec'd, stopped, started and destroyed; the
//! container gone from the host afterwards.
//!
//! Needs root, a static busybox and runc (or a Docker engine);
//! scripts/install-deps installs them. Without them the test says so and
//! skips, except in CI, where it fails.

use corral_tests::{create_sandbox, error_code, id_of, skip_without_runtime, RuncStack};
use reqwest::StatusCode;
use serde_json::json;

#[tokio::test]
async fn runc_sandbox_lifecycle_with_real_processes() {
    lifecycle("runc").await;
}

#[tokio::test]
async fn docker_sandbox_lifecycle_with_real_processes() {
    lifecycle("docker").await;
}

async fn lifecycle(runtime: &'static str) {
    if skip_without_runtime("the end-to-end lifecycle test", runtime) {
        return;
    }
    // The server, an org and its key, a host token (all through the API),
    // the busybox image, and the agent on the runtime, registered and ready.
    let stack = RuncStack::start_on(runtime, &[]).await;
    assert_eq!(stack.host().await["runtime"], runtime);
    let api = stack.api.clone();
    let runc_knows = |id: String| {
        let stack = &stack;
        async move { stack.containers().await.iter().any(|c| c.id == id) }
    };

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
    assert!(
        runc_knows(id.clone()).await,
        "the runtime runs the container"
    );

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
    assert_eq!(
        stopped["exit_code"], 0,
        "the main process's own exit: {stopped}"
    );
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
        !runc_knows(id.clone()).await,
        "the container is gone from the host"
    );
    if runtime == "runc" {
        assert!(
            !stack.bundle_dir(&id).exists(),
            "the bundle is gone from the host"
        );
    }
    stack.assert_containers(&[]).await;
}

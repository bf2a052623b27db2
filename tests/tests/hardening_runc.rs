//! Sandbox hardening with a real container runtime, observed from inside
//! the container: no new privileges, the reduced capability set, the
//! seccomp filter, no network but loopback, a read-only root when asked, the
//! pids limit bounding a fork bomb, and a secret env value that reaches the
//! process (decrypted) while the API shows `***`. The same checks run on
//! runc and on docker (docker's seccomp is the engine's default profile);
//! user namespaces (opt-in, runc only) have their own test.
//!
//! Needs root, a static busybox and runc (or a Docker engine); without them
//! the tests say so and skip, except in CI, where they fail.

use std::time::Duration;

use corral_agent::hardening::CAPABILITY_MASK;
use corral_tests::{create_sandbox, id_of, skip_without_runtime, wait_for, Api, RuncStack};
use reqwest::StatusCode;
use serde_json::{json, Value};

const SECRET: &str = "hunter2-in-the-container";

async fn exec(api: &Api, id: &str, argv: Value) -> Value {
    let (status, out) = api
        .post(&format!("/v1/sandboxes/{id}/exec"), json!({"argv": argv}))
        .await;
    assert_eq!(status, StatusCode::OK, "{out}");
    out
}

fn stdout(out: &Value) -> &str {
    out["stdout"].as_str().unwrap_or_default()
}

/// The value of `field` in /proc/self/status text.
fn status_field<'a>(status: &'a str, field: &str) -> Option<&'a str> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .map(str::trim)
}

/// Starts a stack on `runtime` whose server has a secret key.
async fn stack_with_secret_key(runtime: &'static str) -> (RuncStack, tempfile::TempDir) {
    let keys = tempfile::tempdir().expect("a temp dir");
    let key_path = keys.path().join("secret.key");
    let key = corral_actors::secrets::SecretKey::generate().expect("a key");
    std::fs::write(&key_path, key.to_hex()).expect("write the key");
    let key_path = key_path.to_string_lossy().into_owned();
    let stack =
        RuncStack::start_with_env(runtime, &[("CORRAL_SECRET_KEY_FILE", &key_path)], &[]).await;
    (stack, keys)
}

#[tokio::test]
async fn runc_sandboxes_are_confined() {
    confined("runc").await;
}

#[tokio::test]
async fn docker_sandboxes_are_confined() {
    confined("docker").await;
}

async fn confined(runtime: &'static str) {
    if skip_without_runtime("the hardening test", runtime) {
        return;
    }
    let (stack, _keys) = stack_with_secret_key(runtime).await;
    let api = stack.api.clone();

    // The main process never forks, so exhausting the pids limit below
    // cannot end it.
    let sandbox = create_sandbox(
        &api,
        json!({
            "image": "busybox",
            "command": ["sleep", "3600"],
            "secret_env": {"API_TOKEN": SECRET},
            "read_only_root": true,
            "pids_limit": 16,
        }),
    )
    .await;
    assert_eq!(sandbox["state"], "running", "{sandbox}");
    assert_eq!(sandbox["secret_env"], json!({"API_TOKEN": "***"}));
    let id = id_of(&sandbox);

    // The secret reaches the process, decrypted.
    let out = exec(&api, &id, json!(["sh", "-c", "echo \"$API_TOKEN\""])).await;
    assert_eq!(stdout(&out), format!("{SECRET}\n"), "{out}");

    // No new privileges, the reduced capability set, a seccomp filter.
    let out = exec(&api, &id, json!(["cat", "/proc/self/status"])).await;
    let status = stdout(&out);
    assert_eq!(status_field(status, "NoNewPrivs"), Some("1"), "{status}");
    assert_eq!(status_field(status, "Seccomp"), Some("2"), "{status}");
    let cap_eff = status_field(status, "CapEff")
        .and_then(|hex| u64::from_str_radix(hex, 16).ok())
        .expect("CapEff");
    assert_eq!(cap_eff, CAPABILITY_MASK, "CapEff {cap_eff:x}");
    let cap_bnd = status_field(status, "CapBnd")
        .and_then(|hex| u64::from_str_radix(hex, 16).ok())
        .expect("CapBnd");
    assert_eq!(cap_bnd, CAPABILITY_MASK, "CapBnd {cap_bnd:x}");

    // Refused by seccomp (and by the missing capability): mount, unshare.
    let out = exec(&api, &id, json!(["mount", "-t", "tmpfs", "x", "/mnt"])).await;
    assert_ne!(out["exit_code"], 0, "{out}");
    let out = exec(&api, &id, json!(["unshare", "-U", "true"])).await;
    assert_ne!(out["exit_code"], 0, "{out}");

    // No network but loopback.
    let out = exec(&api, &id, json!(["ls", "/sys/class/net"])).await;
    assert_eq!(
        stdout(&out).split_whitespace().collect::<Vec<_>>(),
        ["lo"],
        "{out}"
    );

    // The root is read-only.
    let out = exec(&api, &id, json!(["sh", "-c", "echo x > /written"])).await;
    assert_ne!(out["exit_code"], 0, "{out}");
    assert!(
        out["stderr"]
            .as_str()
            .is_some_and(|e| e.to_lowercase().contains("read-only")),
        "{out}"
    );

    // A fork bomb stops at the pids limit: 40 background sleeps in a
    // sandbox limited to 16 processes cannot all start.
    let out = exec(
        &api,
        &id,
        json!(["sh", "-c", "for i in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27 28 29 30 31 32 33 34 35 36 37 38 39 40; do sleep 2 & done; echo all-started"]),
    )
    .await;
    assert!(!stdout(&out).contains("all-started"), "{out}");
    assert!(
        out["stderr"]
            .as_str()
            .is_some_and(|e| e.to_lowercase().contains("fork")),
        "{out}"
    );
    // The sandbox survives and, once the sleepers end, works again.
    wait_for("exec to work again", Duration::from_secs(30), || {
        let api = api.clone();
        let id = id.clone();
        async move {
            let (status, out) = api
                .post(
                    &format!("/v1/sandboxes/{id}/exec"),
                    json!({"argv": ["echo", "ok"]}),
                )
                .await;
            (status == StatusCode::OK && out["stdout"] == "ok\n").then_some(())
        }
    })
    .await;
    let now = stack.sandbox(&id).await;
    assert_eq!(now["state"], "running", "{now}");

    let (status, gone) = api.delete(&format!("/v1/sandboxes/{id}")).await;
    assert_eq!(status, StatusCode::OK, "{gone}");
    stack.assert_containers(&[]).await;
}

#[tokio::test]
async fn runc_user_namespaces_map_root_to_an_unprivileged_range() {
    if skip_without_runtime("the user namespace test", "runc") {
        return;
    }
    if !corral_agent::hardening::user_namespaces_supported() {
        eprintln!("skipping the user namespace test: this kernel has no user namespaces");
        return;
    }
    let stack = RuncStack::start_on("runc", &[]).await;
    // The mapped root must be able to reach the bundle: every directory
    // above the agent's data directory needs o+x (as /var/lib has); a
    // temporary directory is 0700.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(stack.dir.path(), std::fs::Permissions::from_mode(0o711))
        .expect("chmod the stack directory");
    let api = stack.api.clone();
    let sandbox = create_sandbox(
        &api,
        json!({"image": "busybox", "command": ["sleep", "3600"], "user_namespace": true}),
    )
    .await;
    assert_eq!(sandbox["user_namespace"], true, "{sandbox}");
    let id = id_of(&sandbox);
    let out = exec(&api, &id, json!(["cat", "/proc/self/uid_map"])).await;
    let map: Vec<&str> = stdout(&out).split_whitespace().collect();
    assert_eq!(
        map,
        [
            "0",
            &corral_agent::hardening::USERNS_HOST_BASE.to_string(),
            &corral_agent::hardening::USERNS_SIZE.to_string()
        ],
        "{out}"
    );
    // Root inside is uid 0 there; the image's files (owned by host root,
    // unmapped) show as nobody and cannot be changed.
    let out = exec(&api, &id, json!(["id", "-u"])).await;
    assert_eq!(stdout(&out), "0\n", "{out}");
    let out = exec(&api, &id, json!(["sh", "-c", "echo x > /bin/written"])).await;
    assert_ne!(out["exit_code"], 0, "{out}");
    let (status, gone) = api.delete(&format!("/v1/sandboxes/{id}")).await;
    assert_eq!(status, StatusCode::OK, "{gone}");
}

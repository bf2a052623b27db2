//! Faults with real processes and real runc: `corral server` and a
//! `corral-agent` on the runc runtime as separate processes, killed with
//! SIGKILL at awkward moments and started again on the same ports and data
//! directories. Each test checks the final state of every sandbox (REST),
//! of the host row (admin API) and of the containers on the host (`runc
//! list`): exactly the expected ones, no duplicate, no orphan. An agent
//! restart and a container killed on the host also run on the docker
//! runtime (the same tests, the stack on docker).
//!
//! Needs root, runc (or a Docker engine) and a static busybox. Without them each test says so and
//! skips, except in CI, where it fails.

use std::time::{Duration, Instant};

use corral_tests::{
    create_sandbox, error_code, id_of, skip_without_runc, skip_without_runtime, wait_for, RuncStack,
};
use reqwest::StatusCode;
use serde_json::{json, Value};

/// Time for an agent or a control plane to come back and converge: the
/// agent's reconnect backoff (up to 5 s) plus the sandbox's retry.
const RECOVERY: Duration = Duration::from_secs(20);

/// A main process that ignores nothing: `sleep` as PID 1 would ignore
/// SIGTERM, so a stop would wait for the whole grace period.
fn stoppable() -> Value {
    json!(["sh", "-c", "trap 'exit 0' TERM; sleep 3600 & wait"])
}

fn sandbox_body(command: Value) -> Value {
    json!({"image": "busybox", "command": command, "cpu_millis": 100, "memory_mb": 32})
}

async fn exec(stack: &RuncStack, id: &str, argv: Value) -> (StatusCode, Value) {
    stack
        .api
        .post(
            &format!("/v1/sandboxes/{id}/exec"),
            json!({"argv": argv, "timeout_ms": 60_000}),
        )
        .await
}

async fn assert_echo_works(stack: &RuncStack, id: &str) {
    let (status, out) = exec(stack, id, json!(["echo", "still here"])).await;
    assert_eq!(status, StatusCode::OK, "{out}");
    assert_eq!(out["stdout"], "still here\n", "{out}");
    assert_eq!(out["exit_code"], 0, "{out}");
}

/// The init pid of a running container.
async fn container_pid(stack: &RuncStack, id: &str) -> i64 {
    let containers = stack.containers().await;
    let container = containers
        .iter()
        .find(|c| c.id == id)
        .unwrap_or_else(|| panic!("runc does not know {id}: {containers:?}"));
    assert_eq!(container.status, "running", "{containers:?}");
    assert!(container.pid > 0, "{containers:?}");
    container.pid
}

#[tokio::test]
async fn an_agent_restart_never_kills_sandboxes() {
    agent_restart_keeps_sandboxes("runc").await;
}

#[tokio::test]
async fn an_agent_restart_never_kills_docker_sandboxes() {
    agent_restart_keeps_sandboxes("docker").await;
}

async fn agent_restart_keeps_sandboxes(runtime: &'static str) {
    if skip_without_runtime("an_agent_restart_never_kills_sandboxes", runtime) {
        return;
    }
    let mut stack = RuncStack::start_on(runtime, &[]).await;
    let sandbox = create_sandbox(&stack.api, sandbox_body(json!(["sleep", "3600"]))).await;
    assert_eq!(sandbox["state"], "running", "{sandbox}");
    let id = id_of(&sandbox);
    let pid = container_pid(&stack, &id).await;

    stack.kill_agent().await;
    stack
        .wait_host_state("disconnected", Duration::from_secs(5))
        .await;
    assert_eq!(
        container_pid(&stack, &id).await,
        pid,
        "the container outlives its agent"
    );
    assert_eq!(stack.sandbox(&id).await["state"], "running");

    stack.start_agent().await;
    assert_echo_works(&stack, &id).await;

    let sandbox = stack.sandbox(&id).await;
    assert_eq!(sandbox["state"], "running", "{sandbox}");
    assert_eq!(sandbox["desired_state"], "running", "{sandbox}");
    assert_eq!(stack.host().await["state"], "ready");
    assert_eq!(
        container_pid(&stack, &id).await,
        pid,
        "the same process, not a new container"
    );
    stack.assert_containers(&[(&id, "running")]).await;
}

/// Creates sandboxes (`wait=false`) and kills the agent the moment
/// `began(stack, id)` exists on the host, until the kill lands while the
/// create is still in flight (row still `creating`; three tries, since the
/// create can win the race). Answers every sandbox made; the agent is left
/// dead.
async fn kill_the_agent_mid_create(
    stack: &mut RuncStack,
    began: fn(&RuncStack, &str) -> std::path::PathBuf,
    with_its_runc: bool,
) -> Vec<String> {
    let mut ids = Vec::new();
    for _ in 0..3 {
        let (status, sandbox) = stack
            .api
            .post(
                "/v1/sandboxes?wait=false",
                sandbox_body(json!(["sleep", "3600"])),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{sandbox}");
        assert!(
            sandbox["state"] == "scheduled" || sandbox["state"] == "creating",
            "wait=false answers with the intent, before the host is done: {sandbox}"
        );
        let id = id_of(&sandbox);
        ids.push(id.clone());
        let marker = began(stack, &id);
        let deadline = Instant::now() + Duration::from_secs(10);
        // Polled tightly: the window between the marker and the end of the
        // create is a few milliseconds.
        while !marker.exists() {
            assert!(Instant::now() < deadline, "the host never began {id}");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        if with_its_runc {
            stack.kill_agent_and_its_runc().await;
        } else {
            stack.kill_agent().await;
        }
        // The control plane never heard back: the create was cut short.
        if stack.sandbox(&id).await["state"] == "creating" {
            return ids;
        }
        stack.start_agent().await;
    }
    panic!("the agent was never killed while a create was in flight");
}

/// After the agent comes back, every sandbox runs, once.
async fn assert_all_running_after_restart(stack: &mut RuncStack, ids: &[String]) {
    stack.start_agent().await;
    for id in ids {
        let sandbox = stack.wait_sandbox_state(id, "running", RECOVERY).await;
        assert_eq!(sandbox["desired_state"], "running", "{sandbox}");
        assert_echo_works(stack, id).await;
    }
    assert_eq!(stack.host().await["state"], "ready");
    let expected: Vec<(&str, &str)> = ids.iter().map(|id| (id.as_str(), "running")).collect();
    stack.assert_containers(&expected).await;
}

#[tokio::test]
async fn killing_the_agent_mid_create_ends_in_the_desired_state() {
    if skip_without_runc("killing_the_agent_mid_create_ends_in_the_desired_state") {
        return;
    }
    let mut stack = RuncStack::start().await;
    // In flight from the moment the agent starts on the bundle.
    let ids = kill_the_agent_mid_create(&mut stack, |s, id| s.bundle_dir(id), false).await;
    assert_all_running_after_restart(&mut stack, &ids).await;
    for id in &ids {
        assert_eq!(stack.sandbox(id).await["failure_reason"], Value::Null);
    }
}

#[tokio::test]
async fn killing_the_agent_and_its_runc_mid_create_ends_in_the_desired_state() {
    if skip_without_runc("killing_the_agent_and_its_runc_mid_create_ends_in_the_desired_state") {
        return;
    }
    let mut stack = RuncStack::start().await;
    // runc makes the container's state directory once `runc run` is under
    // way: kill the agent and that runc together then.
    let ids = kill_the_agent_mid_create(&mut stack, |s, id| s.runc_root().join(id), true).await;
    assert_all_running_after_restart(&mut stack, &ids).await;
}

#[tokio::test]
async fn killing_the_agent_mid_exec_fails_the_exec_promptly() {
    if skip_without_runc("killing_the_agent_mid_exec_fails_the_exec_promptly") {
        return;
    }
    let mut stack = RuncStack::start().await;
    let sandbox = create_sandbox(&stack.api, sandbox_body(json!(["sleep", "3600"]))).await;
    let id = id_of(&sandbox);

    let exec_task = {
        let api = stack.api.clone();
        let id = id.clone();
        tokio::spawn(async move {
            let answer = api
                .post(
                    &format!("/v1/sandboxes/{id}/exec"),
                    json!({"argv": ["sleep", "30"], "timeout_ms": 60_000}),
                )
                .await;
            (answer, Instant::now())
        })
    };
    // runc writes the exec's pid file once the process runs in the container.
    let bundle = stack.bundle_dir(&id);
    wait_for("the exec to run", Duration::from_secs(10), || async {
        std::fs::read_dir(&bundle)
            .ok()?
            .filter_map(|e| e.ok())
            .any(|e| {
                let name = e.file_name();
                let name = name.to_string_lossy();
                name.starts_with("exec-") && name.ends_with(".pid")
            })
            .then_some(())
    })
    .await;
    assert!(!exec_task.is_finished(), "the exec is in flight");

    let killed_at = Instant::now();
    stack.kill_agent().await;
    let ((status, body), answered_at) = tokio::time::timeout(Duration::from_secs(10), exec_task)
        .await
        .expect("the exec answers once its agent is gone, not after its timeout")
        .expect("the exec task");
    let waited = answered_at.duration_since(killed_at);
    assert!(
        waited < Duration::from_secs(3),
        "the exec answered {waited:?} after the agent died"
    );
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    assert_eq!(error_code(&body), "host_disconnected", "{body}");

    stack.start_agent().await;
    assert_echo_works(&stack, &id).await;
    let sandbox = stack.sandbox(&id).await;
    assert_eq!(sandbox["state"], "running", "{sandbox}");
    assert_eq!(stack.host().await["state"], "ready");
    stack.assert_containers(&[(&id, "running")]).await;
}

#[tokio::test]
async fn killing_the_control_plane_with_operations_in_flight_loses_nothing() {
    if skip_without_runc("killing_the_control_plane_with_operations_in_flight_loses_nothing") {
        return;
    }
    let mut stack = RuncStack::start().await;
    let running = create_sandbox(&stack.api, sandbox_body(stoppable())).await;
    let deleted = create_sandbox(&stack.api, sandbox_body(stoppable())).await;
    let stopped = create_sandbox(&stack.api, sandbox_body(stoppable())).await;
    let (running, deleted, stopped) = (id_of(&running), id_of(&deleted), id_of(&stopped));

    // Fire everything, then kill the control plane at once.
    let mut created = Vec::new();
    for _ in 0..2 {
        let (status, sandbox) = stack
            .api
            .post("/v1/sandboxes?wait=false", sandbox_body(stoppable()))
            .await;
        assert_eq!(status, StatusCode::CREATED, "{sandbox}");
        created.push(id_of(&sandbox));
    }
    let (status, body) = stack
        .api
        .delete(&format!("/v1/sandboxes/{deleted}?wait=false"))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = stack
        .api
        .post(
            &format!("/v1/sandboxes/{stopped}/stop?wait=false"),
            json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    stack.kill_server().await;

    stack.start_server().await;
    stack.wait_host_state("ready", RECOVERY).await;
    let mut expected = vec![(running.as_str(), "running"), (stopped.as_str(), "stopped")];
    expected.extend(created.iter().map(|id| (id.as_str(), "running")));
    for (id, state) in &expected {
        let sandbox = stack.wait_sandbox_state(id, state, RECOVERY).await;
        assert_eq!(sandbox["desired_state"], *state, "{sandbox}");
    }
    let sandbox = stack
        .wait_sandbox_state(&deleted, "destroyed", RECOVERY)
        .await;
    assert_eq!(sandbox["desired_state"], "destroyed", "{sandbox}");
    assert!(
        !stack.bundle_dir(&deleted).exists(),
        "the deleted sandbox's bundle is gone"
    );
    for id in created.iter().chain([&running]) {
        assert_echo_works(&stack, id).await;
    }
    assert_eq!(stack.host().await["state"], "ready");
    stack.assert_containers(&expected).await;
}

#[tokio::test]
async fn a_container_killed_on_the_host_is_seen_stopped() {
    container_killed_on_the_host("runc").await;
}

#[tokio::test]
async fn a_docker_container_killed_on_the_host_is_seen_stopped() {
    container_killed_on_the_host("docker").await;
}

async fn container_killed_on_the_host(runtime: &'static str) {
    if skip_without_runtime("a_container_killed_on_the_host_is_seen_stopped", runtime) {
        return;
    }
    let stack = RuncStack::start_on(runtime, &[]).await;
    let sandbox = create_sandbox(&stack.api, sandbox_body(json!(["sleep", "3600"]))).await;
    let id = id_of(&sandbox);

    stack.runc_kill(&id, "KILL").await;
    // The agent polls every 200 ms; the event reaches the row at once.
    let sandbox = stack
        .wait_sandbox_state(&id, "stopped", Duration::from_secs(3))
        .await;
    assert_eq!(
        sandbox["exit_code"], 137,
        "killed by SIGKILL (128 + 9): {sandbox}"
    );
    assert_eq!(sandbox["desired_state"], "stopped", "{sandbox}");
    assert_eq!(stack.host().await["state"], "ready");
    stack.assert_containers(&[(&id, "stopped")]).await;
}

#[tokio::test]
async fn a_ttl_that_runs_out_with_the_control_plane_down_is_enforced_on_both_sides() {
    if skip_without_runc(
        "a_ttl_that_runs_out_with_the_control_plane_down_is_enforced_on_both_sides",
    ) {
        return;
    }
    // No margin: the host's watchdog acts as soon as the deadline passes.
    let mut stack = RuncStack::start_with_agent_env(&[("CORRAL_AGENT_TTL_MARGIN_SECS", "0")]).await;
    let mut body = sandbox_body(json!(["sleep", "3600"]));
    body["ttl_seconds"] = json!(2);
    let short = id_of(&create_sandbox(&stack.api, body).await);
    let long = id_of(&create_sandbox(&stack.api, sandbox_body(json!(["sleep", "3600"]))).await);

    // The control plane dies before the TTL runs out; the host's watchdog
    // stops the sandbox on its own, and leaves the other one alone.
    stack.kill_server().await;
    wait_for(
        "the watchdog to stop the expired sandbox",
        RECOVERY,
        || async {
            let containers = stack.containers().await;
            containers
                .iter()
                .any(|c| c.id == short && c.status == "stopped")
                .then_some(())
        },
    )
    .await;
    stack
        .assert_containers(&[(&long, "running"), (&short, "stopped")])
        .await;

    // Back up, the control plane destroys what outlived its TTL.
    stack.start_server().await;
    let row = stack
        .wait_sandbox_state(&short, "destroyed", RECOVERY)
        .await;
    assert_eq!(row["desired_state"], "destroyed", "{row}");
    let row = stack.wait_sandbox_state(&long, "running", RECOVERY).await;
    assert_eq!(row["expires_at"], Value::Null, "{row}");
    stack.assert_containers(&[(&long, "running")]).await;
    assert!(!stack.bundle_dir(&short).exists(), "its bundle is removed");
}

#[tokio::test]
async fn a_drain_deadline_kills_a_sandbox_that_ignores_sigterm() {
    if skip_without_runc("a_drain_deadline_kills_a_sandbox_that_ignores_sigterm") {
        return;
    }
    // A stop grace far beyond the test's patience: only the drain's own
    // deadline can end the sandbox in time.
    let stack = RuncStack::start_with_env("runc", &[("CORRAL_STOP_GRACE_MS", "600000")], &[]).await;
    // `sleep` as PID 1 ignores SIGTERM.
    let sandbox = create_sandbox(&stack.api, sandbox_body(json!(["sleep", "3600"]))).await;
    let id = id_of(&sandbox);
    let drain = |deadline: &str| {
        format!(
            "/v1/admin/hosts/{}/drain?deadline_seconds={deadline}",
            stack.host_id
        )
    };

    for bad in ["0", "3601", "soon"] {
        let (status, err) = stack.admin.post(&drain(bad), json!({})).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{bad}: {err}");
        assert_eq!(error_code(&err), "invalid_deadline");
    }
    assert_eq!(stack.host().await["admin_state"], "active");

    let (status, host) = stack.admin.post(&drain("2"), json!({})).await;
    assert_eq!(status, StatusCode::OK, "{host}");
    assert_eq!(host["admin_state"], "draining");
    let sandbox = stack
        .wait_sandbox_state(&id, "stopped", Duration::from_secs(30))
        .await;
    assert_eq!(
        sandbox["exit_code"], 137,
        "killed by SIGKILL at the deadline: {sandbox}"
    );
    assert_eq!(sandbox["desired_state"], "stopped", "{sandbox}");
    stack.assert_containers(&[(&id, "stopped")]).await;
}

//! The control plane and three agents as separate hosts with addresses of
//! their own: each agent runs in its own network namespace, linked to a
//! bridge that carries the control plane's gRPC address (see
//! `corral_tests::netlab`). The agents use the process runtime, whose
//! sandboxes are processes inside their host's namespace, so an exec proves
//! where a sandbox runs, and cutting a host's link cuts it off for real: no
//! stream reset, the control plane only notices the missing heartbeats.
//!
//! The control plane runs with a 200 ms heartbeat and a 3 s offline grace,
//! so a partition is noticed in about 0.7 s and a host is `offline` about
//! 3 s later (docs/failure-model.md).
//!
//! Needs root and iproute2 (`ip netns`); scripts/install-deps installs it.
//! Without them each test says so and skips, except in CI, where it fails.

use std::collections::BTreeSet;
use std::time::Duration;

use corral_tests::netlab::{skip_without_netlab, Fleet};
use corral_tests::{create_sandbox, id_of, wait_for};
use reqwest::StatusCode;
use serde_json::{json, Value};

/// The offline grace the control plane runs with.
const GRACE_MS: u64 = 3000;
/// Time for a host to come back and its sandboxes to converge: the agent
/// notices its dead stream once the link is back (TCP retransmission), then
/// redials with backoff (up to 5 s).
const RECOVERY: Duration = Duration::from_secs(20);

async fn fleet() -> Fleet {
    let grace = GRACE_MS.to_string();
    Fleet::start(
        3,
        &[
            "--heartbeat-ms",
            "200",
            "--offline-grace-ms",
            &grace,
            "--stop-grace-ms",
            "2000",
        ],
    )
    .await
}

/// Each agent offers one core; half a core each spreads six sandboxes two
/// per host (the scheduler spreads, and no host has room for a third).
fn sandbox_body() -> Value {
    json!({"image": "host", "command": ["sleep", "3600"], "cpu_millis": 500, "memory_mb": 64})
}

/// Creates `n` sandboxes; returns (id, host index) of each.
async fn spread(fleet: &Fleet, n: usize) -> Vec<(String, usize)> {
    let mut placed = Vec::new();
    for _ in 0..n {
        let sandbox = create_sandbox(&fleet.api, sandbox_body()).await;
        assert_eq!(sandbox["state"], "running", "{sandbox}");
        let id = id_of(&sandbox);
        let host = fleet.locate(&id).await;
        placed.push((id, host));
    }
    placed
}

/// The machine of host `gone` dies: its agent and everything it ran, its
/// link cut; returns once the host is `offline`.
async fn lose_for_good(fleet: &mut Fleet, gone: usize) {
    fleet.kill_agent(gone).await;
    fleet.lab.kill_all_in(gone);
    fleet.lab.partition(gone);
    fleet
        .wait_host_state(
            gone,
            "offline",
            Duration::from_millis(GRACE_MS) + Duration::from_secs(5),
        )
        .await;
}

async fn assert_all_running_where_placed(fleet: &Fleet, placed: &[(String, usize)]) {
    for (id, host) in placed {
        let sandbox = fleet.wait_sandbox_state(id, "running", RECOVERY).await;
        assert_eq!(sandbox["desired_state"], "running", "{sandbox}");
        fleet.assert_runs_on(id, *host).await;
    }
}

#[tokio::test]
async fn sandboxes_spread_over_three_hosts_and_exec_on_each() {
    if skip_without_netlab("sandboxes_spread_over_three_hosts_and_exec_on_each") {
        return;
    }
    let fleet = fleet().await;
    for i in 0..3 {
        let host = fleet.host(i).await;
        assert_eq!(host["runtime"], "process", "{host}");
    }
    let placed = spread(&fleet, 6).await;
    let hosts: BTreeSet<usize> = placed.iter().map(|(_, h)| *h).collect();
    assert_eq!(hosts.len(), 3, "every host got sandboxes: {placed:?}");
    for i in 0..3 {
        assert_eq!(
            placed.iter().filter(|(_, h)| *h == i).count(),
            2,
            "two per host: {placed:?}"
        );
    }
    // Each exec runs on the sandbox's own host, across the network.
    for (id, host) in &placed {
        fleet.assert_runs_on(id, *host).await;
        let (status, out) = fleet.exec(id, json!(["sh", "-c", "echo hi; exit 7"])).await;
        assert_eq!(status, StatusCode::OK, "{out}");
        assert_eq!(
            (out["stdout"].as_str(), out["exit_code"].as_i64()),
            (Some("hi\n"), Some(7))
        );
    }
    // A seventh does not fit anywhere.
    let (status, body) = fleet.api.post("/v1/sandboxes", sandbox_body()).await;
    assert!(
        status.is_client_error() || status.is_server_error(),
        "no room left: {status} {body}"
    );
}

#[tokio::test]
async fn a_host_cut_off_for_less_than_the_grace_loses_nothing() {
    if skip_without_netlab("a_host_cut_off_for_less_than_the_grace_loses_nothing") {
        return;
    }
    let fleet = fleet().await;
    let placed = spread(&fleet, 3).await;
    let (cut_id, cut) = placed[0].clone();

    fleet.lab.partition(cut);
    // Only the missing heartbeats tell: no reset crosses a downed link.
    fleet
        .wait_host_state(cut, "disconnected", Duration::from_secs(5))
        .await;
    let (status, body) = fleet.exec(&cut_id, json!(["true"])).await;
    assert!(
        status.is_server_error(),
        "a cut-off host cannot run an exec: {status} {body}"
    );
    for (i, _) in fleet.host_ids.iter().enumerate().filter(|(i, _)| *i != cut) {
        assert_eq!(
            fleet.host(i).await["state"],
            "ready",
            "the others stay ready"
        );
    }
    fleet.lab.heal(cut);

    // Back within the grace: it never went offline, nothing was lost.
    let host = fleet.wait_host_state(cut, "ready", RECOVERY).await;
    assert_eq!(host["state"], "ready");
    assert_all_running_where_placed(&fleet, &placed).await;
    for (id, _) in &placed {
        let sandbox = fleet.sandbox(id).await;
        assert_eq!(sandbox["failure_reason"], Value::Null, "{sandbox}");
    }
}

#[tokio::test]
async fn a_host_cut_off_past_the_grace_is_lost_then_taken_back_when_it_returns() {
    if skip_without_netlab("a_host_cut_off_past_the_grace_is_lost_then_taken_back_when_it_returns")
    {
        return;
    }
    let fleet = fleet().await;
    let placed = spread(&fleet, 6).await;
    let cut = 1;
    let (on_cut, elsewhere): (Vec<_>, Vec<_>) = placed.iter().partition(|(_, h)| *h == cut);

    fleet.lab.partition(cut);
    fleet
        .wait_host_state(
            cut,
            "offline",
            Duration::from_millis(GRACE_MS) + Duration::from_secs(5),
        )
        .await;
    for (id, _) in &on_cut {
        let sandbox = fleet
            .wait_sandbox_state(id, "lost", Duration::from_secs(5))
            .await;
        assert_eq!(sandbox["desired_state"], "running", "{sandbox}");
    }
    for (id, _) in &elsewhere {
        assert_eq!(fleet.sandbox(id).await["state"], "running");
    }
    fleet.lab.heal(cut);

    // The host returns with its sandboxes still running: they are taken
    // back (their room is still free), on the same host.
    fleet.wait_host_state(cut, "ready", RECOVERY).await;
    assert_all_running_where_placed(&fleet, &placed).await;
}

#[tokio::test]
async fn a_host_gone_for_good_leaves_its_sandboxes_lost() {
    if skip_without_netlab("a_host_gone_for_good_leaves_its_sandboxes_lost") {
        return;
    }
    let mut fleet = fleet().await;
    let placed = spread(&fleet, 3).await;
    let gone = 2;
    let (on_gone, elsewhere): (Vec<_>, Vec<_>) = placed.iter().partition(|(_, h)| *h == gone);

    lose_for_good(&mut fleet, gone).await;
    // Sandboxes with the default restart policy (never) are not recreated
    // elsewhere: they stay lost until deleted.
    for (id, _) in &on_gone {
        let sandbox = fleet
            .wait_sandbox_state(id, "lost", Duration::from_secs(5))
            .await;
        assert_eq!(sandbox["desired_state"], "running", "{sandbox}");
        assert_eq!(
            sandbox["failure_reason"], "its host went offline",
            "{sandbox}"
        );
    }
    assert_all_running_where_placed(&fleet, &elsewhere.into_iter().cloned().collect::<Vec<_>>())
        .await;
    // New sandboxes land on the hosts that are left.
    let sandbox = create_sandbox(&fleet.api, sandbox_body()).await;
    assert_ne!(fleet.locate(&id_of(&sandbox)).await, gone, "{sandbox}");
    // Deleting a lost sandbox of a host that is gone needs no host: it is
    // destroyed at once (should the host come back with its container, the
    // orphan collection removes it).
    let (id, _) = &on_gone[0];
    let (status, body) = fleet.api.delete(&format!("/v1/sandboxes/{id}")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["state"], "destroyed", "{body}");
    let sandbox = fleet.sandbox(id).await;
    assert_eq!(sandbox["desired_state"], "destroyed", "{sandbox}");
}

#[tokio::test]
async fn a_rolling_restart_of_every_agent_loses_no_sandbox() {
    if skip_without_netlab("a_rolling_restart_of_every_agent_loses_no_sandbox") {
        return;
    }
    let mut fleet = fleet().await;
    let placed = spread(&fleet, 6).await;
    for i in 0..3 {
        fleet.kill_agent(i).await;
        fleet
            .wait_host_state(i, "disconnected", Duration::from_secs(5))
            .await;
        fleet.start_agent(i).await;
        // Every sandbox is running before the next host goes down.
        assert_all_running_where_placed(&fleet, &placed).await;
    }
    for (id, _) in &placed {
        let sandbox = fleet.sandbox(id).await;
        assert_eq!(sandbox["failure_reason"], Value::Null, "{sandbox}");
        let (status, out) = fleet.exec(id, json!(["echo", "still here"])).await;
        assert_eq!(status, StatusCode::OK, "{out}");
        assert_eq!(out["stdout"], "still here\n");
    }
}

#[tokio::test]
async fn a_host_gone_for_good_has_its_on_host_loss_sandboxes_recreated_elsewhere() {
    if skip_without_netlab(
        "a_host_gone_for_good_has_its_on_host_loss_sandboxes_recreated_elsewhere",
    ) {
        return;
    }
    let mut fleet = fleet().await;
    // One per host, each recreated elsewhere should its host be lost.
    let mut placed = Vec::new();
    for _ in 0..3 {
        let mut body = sandbox_body();
        body["restart_policy"] = json!("on_host_loss");
        let sandbox = create_sandbox(&fleet.api, body).await;
        assert_eq!(sandbox["state"], "running", "{sandbox}");
        let id = id_of(&sandbox);
        let host = fleet.locate(&id).await;
        placed.push((id, host));
    }
    let gone = placed[0].1;
    let (moving, _) = placed[0].clone();
    let before = fleet.sandbox(&moving).await;

    lose_for_good(&mut fleet, gone).await;
    // Same id, a new host, running: an exec answers from another host.
    let moved = wait_for("the sandbox recreated elsewhere", RECOVERY, || {
        let (fleet, moving, before) = (&fleet, &moving, &before);
        async move {
            let sandbox = fleet.sandbox(moving).await;
            (sandbox["state"] == "running" && sandbox["host_id"] != before["host_id"])
                .then_some(sandbox)
        }
    })
    .await;
    assert_eq!(moved["restart_policy"], "on_host_loss");
    let now_on = fleet.locate(&moving).await;
    assert_ne!(now_on, gone);
    // The others stayed where they were.
    for (id, host) in &placed[1..] {
        fleet.assert_runs_on(id, *host).await;
    }
}

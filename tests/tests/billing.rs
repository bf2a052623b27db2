//! Billing end to end: metering against a price plan, the credit gate under
//! concurrent creates, the status machine from active to suspended and
//! back, exempt orgs, quotas, a control-plane restart (in process, and
//! kill -9 of the real server) in the middle of metering, and a real runc
//! sandbox charged what the plan says. The ledger is checked through the
//! API (`/v1/billing`, `/v1/billing/ledger`, `/v1/usage`) and the audit.

use std::time::Duration;

use corral_actors::billing::{MeterPhase, Plan, PRICE_DENOMINATOR};
use corral_actors::domain::Resources;
use corral_agent::fake::FakeConfig;
use corral_tests::{
    create_sandbox, error_code, id_of, skip_without_runc, wait_for, Api, InProcessAgent, RuncStack,
    TestServer,
};
use reqwest::StatusCode;
use serde_json::{json, Value};

const DEADLINE: Duration = Duration::from_secs(20);

/// One micro-unit per vCPU-millisecond, nothing for memory: easy to check.
const MILLI_PLAN: i64 = 3_600_000;

async fn milli_plan(cp: &TestServer) {
    cp.create_plan("milli", MILLI_PLAN).await;
}

/// A control plane charging every `interval_ms` and writing usage periods
/// once they are `write_every_ms` long, a fake agent, and an org `name` on
/// the milli plan with 100 M micro-units running one one-core sandbox:
/// the server, its agent, the org's API and the sandbox's id.
async fn one_metered_sandbox(
    name: &str,
    interval_ms: u64,
    write_every_ms: u64,
) -> (TestServer, InProcessAgent, Api, String) {
    let cp = TestServer::start_with(|c| {
        c.billing_interval_ms = interval_ms;
        c.billing_write_every_ms = write_every_ms;
    })
    .await;
    let agent = cp.fake_agent(8000, 8192, FakeConfig::default()).await;
    milli_plan(&cp).await;
    let (_, api) = cp
        .create_org_with(json!({"name": name, "plan": "milli", "credits_micros": 100_000_000}))
        .await;
    let id = id_of(&create_sandbox(&api, body(1000)).await);
    (cp, agent, api, id)
}

fn body(cpu_millis: u64) -> Value {
    json!({"image": "busybox", "command": ["sleep", "600"], "cpu_millis": cpu_millis, "memory_mb": 64})
}

async fn billing(api: &Api) -> Value {
    let (status, body) = api.get("/v1/billing").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body
}

async fn usage_entries(api: &Api) -> Vec<Value> {
    let mut entries = Vec::new();
    let mut after: Option<i64> = None;
    loop {
        let path = match after {
            Some(a) => format!("/v1/billing/ledger?limit=1000&after={a}"),
            None => "/v1/billing/ledger?limit=1000".to_string(),
        };
        let (status, page) = api.get(&path).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        entries.extend(page["entries"].as_array().cloned().unwrap_or_default());
        match page["next"].as_i64() {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    entries.retain(|e| e["kind"] == "usage");
    entries
}

fn micros(e: &Value, key: &str) -> i64 {
    e[key]
        .as_str()
        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        .map(|t| t.timestamp_micros())
        .unwrap_or_else(|| panic!("{key} in {e}"))
}

fn ms(e: &Value, key: &str) -> i64 {
    micros(e, key) / 1000
}

/// The usage periods of a sandbox, sorted, checked contiguous (no gap, no
/// overlap); answers (first start in ms, last end in ms, total charged,
/// metered milliseconds: each period is a whole number of them).
fn contiguous(entries: &[Value], sandbox: &str) -> (i64, i64, i64, i64) {
    let mut periods: Vec<(i64, i64, i64)> = entries
        .iter()
        .filter(|e| e["sandbox_id"] == sandbox)
        .map(|e| {
            (
                micros(e, "period_start"),
                micros(e, "period_end"),
                -e["amount_micros"].as_i64().unwrap_or(0),
            )
        })
        .collect();
    periods.sort();
    assert!(!periods.is_empty(), "no usage for {sandbox}");
    for pair in periods.windows(2) {
        assert_eq!(
            pair[0].1, pair[1].0,
            "periods must be contiguous: {periods:?}"
        );
    }
    let charged = periods.iter().map(|p| p.2).sum();
    let metered_ms = periods.iter().map(|p| (p.1 - p.0) / 1000).sum();
    (
        periods[0].0 / 1000,
        periods[periods.len() - 1].1 / 1000,
        charged,
        metered_ms,
    )
}

async fn audit_ok(cp: &TestServer) {
    let (status, audit) = cp.admin().get("/v1/admin/billing/audit").await;
    assert_eq!(status, StatusCode::OK, "{audit}");
    assert_eq!(audit["ok"], true, "{audit}");
}

#[tokio::test]
async fn running_time_is_charged_what_the_plan_says_and_stopped_time_is_free() {
    let (cp, _agent, api, id) = one_metered_sandbox("metered", 200, 600).await;
    // A second's worth of periods, then a stop.
    wait_for("a few periods to be charged", DEADLINE, || async {
        (usage_entries(&api).await.len() >= 4).then_some(())
    })
    .await;
    let (status, stopped) = api
        .post(&format!("/v1/sandboxes/{id}/stop"), json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{stopped}");
    let started_at = ms(&stopped, "started_at");
    let stopped_at = ms(&stopped, "updated_at");

    let closed = wait_for("the closing period", DEADLINE, || async {
        let entries = usage_entries(&api).await;
        let (_, end, _, _) = contiguous(&entries, &id);
        (end >= stopped_at - 5).then_some(entries)
    })
    .await;
    let (first, last, charged, metered_ms) = contiguous(&closed, &id);
    // Periods grow to the write period before they are written (but the
    // closing one, written when the sandbox stopped).
    for entry in &closed[..closed.len() - 1] {
        let span = ms(entry, "period_end") - ms(entry, "period_start");
        assert!(span >= 600, "a {span} ms period written: {entry}");
    }
    // From when it was running to when it stopped (the row's own times,
    // written a few microseconds apart from the meter's).
    assert!((first - started_at).abs() <= 5, "{first} vs {started_at}");
    assert!((last - stopped_at).abs() <= 5, "{last} vs {stopped_at}");
    // One core at one micro-unit per millisecond: the charge is the time.
    assert_eq!(charged, metered_ms);
    let after_stop = billing(&api).await;
    assert_eq!(after_stop["balance_micros"], 100_000_000 - charged);

    // Stopped time costs nothing on this plan: further ticks change nothing.
    let entries_then = closed.len();
    wait_for("more ticks to pass", DEADLINE, || async {
        let b = billing(&api).await;
        (b["burn_rate_micros_per_hour"] == 0).then_some(())
    })
    .await;
    assert_eq!(usage_entries(&api).await.len(), entries_then);
    assert_eq!(billing(&api).await["balance_micros"], 100_000_000 - charged);

    // /v1/usage reports the same.
    let (status, usage) = api.get("/v1/usage").await;
    assert_eq!(status, StatusCode::OK, "{usage}");
    assert_eq!(usage["total_micros"], charged);
    assert_eq!(usage["sandboxes"][0]["sandbox_id"], id.as_str());
    assert_eq!(usage["sandboxes"][0]["running_ms"], metered_ms);
    audit_ok(&cp).await;
}

/// Every tick's charge moves the balance at once; the ledger gets one row
/// for the period, written when it ends (here: when the sandbox stops),
/// with exactly what the ticks charged.
#[tokio::test]
async fn the_balance_moves_every_tick_and_the_ledger_gets_a_row_a_period() {
    let (cp, _agent, api, id) = one_metered_sandbox("accruing", 100, 3_600_000).await;
    wait_for("a few ticks to be charged", DEADLINE, || async {
        let balance = billing(&api).await["balance_micros"].as_i64().unwrap_or(0);
        (balance <= 100_000_000 - 500).then_some(())
    })
    .await;
    assert_eq!(usage_entries(&api).await.len(), 0, "nothing written yet");
    let (status, stopped) = api
        .post(&format!("/v1/sandboxes/{id}/stop"), json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{stopped}");
    let entries = wait_for("the closing period", DEADLINE, || async {
        let entries = usage_entries(&api).await;
        (!entries.is_empty()).then_some(entries)
    })
    .await;
    assert_eq!(entries.len(), 1, "one period: {entries:?}");
    let (first, last, charged, metered_ms) = contiguous(&entries, &id);
    assert!((first - ms(&stopped, "started_at")).abs() <= 5);
    assert!((last - ms(&stopped, "updated_at")).abs() <= 5);
    assert_eq!(charged, metered_ms);
    assert_eq!(billing(&api).await["balance_micros"], 100_000_000 - charged);
    audit_ok(&cp).await;
}

#[tokio::test]
async fn concurrent_creates_cannot_overdraw_the_balance() {
    let cp = TestServer::start().await;
    let _agent = cp.fake_agent(64_000, 65_536, FakeConfig::default()).await;
    milli_plan(&cp).await;
    // Each 1-core sandbox holds 60 s of its cost (60,000 micro-units): the
    // balance covers exactly three.
    let (_, api) = cp
        .create_org_with(json!({"name": "thrifty", "plan": "milli", "credits_micros": 180_100}))
        .await;
    let creates = (0..10).map(|_| {
        let api = api.clone();
        tokio::spawn(async move { api.post("/v1/sandboxes", body(1000)).await })
    });
    let mut created = 0;
    let mut refused = 0;
    for task in futures::future::join_all(creates).await {
        let (status, answer) = task.expect("create task");
        match status {
            StatusCode::CREATED => created += 1,
            StatusCode::PAYMENT_REQUIRED => {
                assert_eq!(error_code(&answer), "payment_required", "{answer}");
                assert!(answer["error"]["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("insufficient credit")));
                refused += 1;
            }
            other => panic!("unexpected {other}: {answer}"),
        }
    }
    assert_eq!((created, refused), (3, 7));
    let summary = billing(&api).await;
    assert_eq!(summary["usage"]["sandboxes"], 3);
    assert_eq!(summary["held_micros"], 180_000);
    // Refused creates left nothing behind.
    let (_, list) = api.get("/v1/sandboxes").await;
    assert_eq!(list["sandboxes"].as_array().map(Vec::len), Some(3));
}

#[tokio::test]
async fn running_out_of_credit_walks_warning_grace_suspension_and_a_deposit_restores() {
    let cp = TestServer::start_with(|c| {
        c.billing_interval_ms = 100;
        c.billing_warning_micros = 2_000;
        c.billing_grace_ms = 500;
        c.billing_hold_window_ms = 0;
    })
    .await;
    let _agent = cp.fake_agent(8000, 8192, FakeConfig::default()).await;
    // 100 mCPU at 10 micro-units per vCPU-ms: 100 micro-units a tick.
    cp.create_plan("steep", 36_000_000).await;
    let (org_id, api) = cp
        .create_org_with(json!({"name": "spendthrift", "plan": "steep", "credits_micros": 3_000}))
        .await;
    assert_eq!(billing(&api).await["status"], "active");
    let id = id_of(&create_sandbox(&api, body(100)).await);

    let suspended = wait_for("the org to be suspended", DEADLINE, || async {
        let b = billing(&api).await;
        (b["status"] == "suspended").then_some(b)
    })
    .await;
    assert!(
        suspended["balance_micros"].as_i64().is_some_and(|b| b <= 0),
        "{suspended}"
    );
    // Every status was passed through, in order, and recorded.
    let events = cp
        .server
        .control_plane
        .store()
        .billing_events(&org_id)
        .await
        .expect("events");
    let path: Vec<(String, String)> = events
        .iter()
        .map(|e| (e.from_status.clone(), e.to_status.clone()))
        .collect();
    assert_eq!(
        path,
        vec![
            ("active".to_string(), "warning".to_string()),
            ("warning".to_string(), "grace".to_string()),
            ("grace".to_string(), "suspended".to_string()),
        ]
    );
    // Its sandbox is stopped, and no longer charged; creates are refused.
    let row = wait_for("the sandbox to be stopped", DEADLINE, || async {
        let (_, row) = api.get(&format!("/v1/sandboxes/{id}")).await;
        (row["state"] == "stopped").then_some(row)
    })
    .await;
    assert_eq!(row["desired_state"], "stopped");
    let (status, refused) = api.post("/v1/sandboxes", body(100)).await;
    assert_eq!(status, StatusCode::PAYMENT_REQUIRED, "{refused}");
    assert!(refused["error"]["message"]
        .as_str()
        .is_some_and(|m| m.contains("suspended")));
    let (status, _) = api
        .post(&format!("/v1/sandboxes/{id}/start"), json!({}))
        .await;
    assert_eq!(status, StatusCode::PAYMENT_REQUIRED);
    assert!(cp.server.control_plane.metrics().billing_transitions.get() >= 3);

    // Credit arrives: active again, and work can resume.
    let (status, restored) = cp
        .admin()
        .post(
            &format!("/v1/admin/orgs/{org_id}/credits"),
            json!({"amount_micros": 10_000_000, "reference": "top-up-1"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{restored}");
    assert_eq!(restored["status"], "active");
    let (status, started) = api
        .post(&format!("/v1/sandboxes/{id}/start"), json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{started}");
    assert_eq!(started["state"], "running");
    audit_ok(&cp).await;
}

#[tokio::test]
async fn exempt_orgs_are_metered_but_never_gated() {
    let cp = TestServer::start_with(|c| c.billing_interval_ms = 100).await;
    let _agent = cp.fake_agent(8000, 8192, FakeConfig::default()).await;
    milli_plan(&cp).await;
    let (_, api) = cp
        .create_org_with(json!({"name": "internal", "plan": "milli", "exempt": true}))
        .await;
    assert_eq!(billing(&api).await["status"], "exempt");
    let id = id_of(&create_sandbox(&api, body(1000)).await);
    let negative = wait_for("usage to be charged", DEADLINE, || async {
        let b = billing(&api).await;
        (b["balance_micros"].as_i64().unwrap_or(0) < 0).then_some(b)
    })
    .await;
    assert_eq!(negative["status"], "exempt");
    // Still allowed to create, and the sandbox still runs.
    create_sandbox(&api, body(1000)).await;
    let (_, row) = api.get(&format!("/v1/sandboxes/{id}")).await;
    assert_eq!(row["state"], "running");
    audit_ok(&cp).await;
}

#[tokio::test]
async fn quotas_bound_sandboxes_and_resources_and_cap_the_ttl() {
    let cp = TestServer::start().await;
    let _agent = cp.fake_agent(16_000, 16_384, FakeConfig::default()).await;
    let (_, api) = cp
        .create_org_with(json!({"name": "bounded", "credits_micros": 1_000_000_000,
            "quota": {"max_sandboxes": 2, "max_cpu_millis": 1500, "max_ttl_seconds": 600}}))
        .await;
    let first = create_sandbox(&api, body(1000)).await;
    assert_eq!(
        first["ttl_seconds"], 600,
        "no TTL asked for: the quota's maximum"
    );
    let (status, refused) = api.post("/v1/sandboxes", body(1000)).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{refused}");
    assert_eq!(error_code(&refused), "quota_exceeded");
    let mut long = body(100);
    long["ttl_seconds"] = json!(601);
    let (status, refused) = api.post("/v1/sandboxes", long).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{refused}");
    create_sandbox(&api, body(500)).await;
    let (status, refused) = api.post("/v1/sandboxes", body(10)).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{refused}");
    assert!(refused["error"]["message"]
        .as_str()
        .is_some_and(|m| m.contains("live sandboxes")));
    // Deleting one gives its room back.
    let (status, _) = api
        .delete(&format!("/v1/sandboxes/{}", id_of(&first)))
        .await;
    assert_eq!(status, StatusCode::OK);
    create_sandbox(&api, body(1000)).await;
}

#[tokio::test]
async fn a_control_plane_restart_during_metering_neither_skips_nor_repeats_a_period() {
    // Written every 300 ms: the restart comes with charged time unwritten,
    // which the new control plane charges again from the last period.
    let (cp, _agent, api, id) = one_metered_sandbox("steady", 100, 300).await;
    wait_for("some periods", DEADLINE, || async {
        (usage_entries(&api).await.len() >= 3).then_some(())
    })
    .await;
    let before = usage_entries(&api).await.len();
    let cp = cp.restart().await;
    wait_for("metering to resume after the restart", DEADLINE, || async {
        (usage_entries(&api).await.len() >= before + 3).then_some(())
    })
    .await;
    let (status, stopped) = api
        .post(&format!("/v1/sandboxes/{id}/stop"), json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{stopped}");
    let stopped_at = ms(&stopped, "updated_at");
    let entries = wait_for("the closing period", DEADLINE, || async {
        let entries = usage_entries(&api).await;
        let (_, end, _, _) = contiguous(&entries, &id);
        (end >= stopped_at - 5).then_some(entries)
    })
    .await;
    // Contiguous across the restart (the downtime is charged: the sandbox
    // ran), and exactly the time at one micro-unit per millisecond.
    let (first, _, charged, metered_ms) = contiguous(&entries, &id);
    assert_eq!(charged, metered_ms);
    assert!((first - ms(&stopped, "started_at")).abs() <= 5);
    assert_eq!(billing(&api).await["balance_micros"], 100_000_000 - charged);
    audit_ok(&cp).await;
}

#[tokio::test]
async fn killing_the_server_during_metering_leaves_an_exact_ledger() {
    if skip_without_runc("killing_the_server_during_metering_leaves_an_exact_ledger") {
        return;
    }
    let mut stack = RuncStack::start_with_env(
        "runc",
        &[
            ("CORRAL_BILLING_INTERVAL_MS", "200"),
            ("CORRAL_BILLING_WRITE_EVERY_MS", "500"),
        ],
        &[],
    )
    .await;
    let mut request = body(1000);
    request["command"] = json!(["sleep", "3600"]);
    request["memory_mb"] = json!(256);
    let id = id_of(&create_sandbox(&stack.api, request).await);
    wait_for("some periods", DEADLINE, || async {
        (usage_entries(&stack.api).await.len() >= 2).then_some(())
    })
    .await;
    stack.kill_server().await;
    stack.start_server().await;
    stack.wait_host_state("ready", DEADLINE).await;
    wait_for("metering to resume after kill -9", DEADLINE, || async {
        let entries = usage_entries(&stack.api).await;
        let (_, end, _, _) = contiguous(&entries, &id);
        (end > chrono::Utc::now().timestamp_millis() - 1_000).then_some(())
    })
    .await;
    let (status, stopped) = stack
        .api
        .post(&format!("/v1/sandboxes/{id}/stop"), json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{stopped}");
    let stopped_at = ms(&stopped, "updated_at");
    let entries = wait_for("the closing period", DEADLINE, || async {
        let entries = usage_entries(&stack.api).await;
        let (_, end, _, _) = contiguous(&entries, &id);
        (end >= stopped_at - 5).then_some(entries)
    })
    .await;
    // A real runc sandbox on the default plan: charged what the plan says
    // for the time it ran, to the micro-unit (rounded down once overall).
    let (first, _, charged, metered_ms) = contiguous(&entries, &id);
    let plan = Plan {
        id: String::new(),
        name: String::new(),
        cpu_micros_per_vcpu_hour: 50_400,
        memory_micros_per_gib_hour: 16_200,
        stopped_memory_micros_per_gib_hour: 0,
    };
    let resources = Resources {
        cpu_millis: 1000,
        memory_mb: 256,
    };
    let exact = plan.cost_fraction(MeterPhase::Running, resources, metered_ms);
    assert_eq!(
        i128::from(charged),
        exact / PRICE_DENOMINATOR,
        "{}",
        serde_json::to_string(&entries).unwrap_or_default()
    );
    let started_at = ms(&stopped, "started_at");
    assert!(
        (first - started_at).abs() <= 5,
        "{first} vs {started_at}: {entries:?}"
    );
    assert!(metered_ms >= 1_000, "it ran for a while: {metered_ms} ms");
    let (status, audit) = stack.admin.get("/v1/admin/billing/audit").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(audit["ok"], true, "{audit}");
}

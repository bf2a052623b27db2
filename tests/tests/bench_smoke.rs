//! Smoke test of the benchmark harness: the cheap scenarios run through the
//! same functions as `corral-bench`, at a tiny scale, and must complete with
//! sane figures. No timing target is asserted here: performance is measured
//! by `corral-bench`, not asserted in timed tests.

use std::time::Duration;

use corral_tests::bench::{detection, placement, throughput};

#[test]
fn placement_decides_over_a_fleet() {
    let report = placement::run_with(true, 500, 2_000);
    assert!(report.skipped.is_none());
    assert_eq!(
        report.value("placed"),
        Some(2_000.0),
        "{}",
        report.summary()
    );
    assert!(report.value("decisions_per_sec").is_some_and(|r| r > 0.0));
    assert!(report.pass.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn detection_sees_a_killed_and_a_hung_agent() {
    let report = detection::run_with(true, 200, 500).await;
    let summary = report.summary();
    for figure in [
        "killed_to_disconnected",
        "disconnected_to_offline",
        "hung_to_disconnected",
    ] {
        let value = report.value(figure);
        assert!(
            value.is_some_and(|v| v >= 0.0),
            "{figure} was never seen: {summary}"
        );
    }
    serde_json::to_string(&report).expect("the report serialises");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throughput_creates_sandboxes_on_fake_agents() {
    let shape = throughput::Shape {
        agents: 3,
        duration: Duration::from_secs(1),
        half_rate_duration: Duration::from_secs(1),
        concurrency: 4,
    };
    let report = throughput::run_with(true, &shape).await;
    let summary = report.summary();
    assert!(
        report.value("sqlite_max_rate").is_some_and(|r| r > 0.0),
        "{summary}"
    );
    assert_eq!(report.value("sqlite_errors"), Some(0.0), "{summary}");
    assert!(
        report
            .value("sqlite_half_rate_p99")
            .is_some_and(|p| p > 0.0),
        "{summary}"
    );
}

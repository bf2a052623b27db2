//! Helpers shared by the runtime tests: exec requests, their output, and
//! waiting on a condition with a deadline instead of sleeping.
#![allow(dead_code)] // each test file uses a different subset

use std::future::Future;
use std::time::Duration;

use corral_agent::runtime::{ExecOutput, ExecSpec, Runtime};

pub fn exec_spec(argv: &[&str]) -> ExecSpec {
    ExecSpec {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        timeout: Duration::from_secs(20),
        ..Default::default()
    }
}

pub async fn exec(rt: &dyn Runtime, id: &str, argv: &[&str]) -> ExecOutput {
    rt.exec(id, exec_spec(argv)).await.expect("exec")
}

pub fn stdout(out: &ExecOutput) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Polls `check` every 20 ms until it holds; fails after 10 s.
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

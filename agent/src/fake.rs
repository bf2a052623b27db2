//! The in-memory runtime for tests and fleet-scale simulation. It keeps a
//! table of sandboxes and their phases, with configurable latency and random
//! failure injection, and test helpers to look inside and to make a sandbox
//! exit on its own (so the agent's poll loop reports an event). Each
//! sandbox's spec, its TTL deadline included, is kept with it in memory.
//! Cloning the handle shares the table.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;

use crate::runtime::{
    validate_exec, validate_sandbox_id, validate_spec, ExecOutput, ExecSpec, Phase, Runtime,
    RuntimeError, SandboxSpec, SandboxStatus,
};

/// How the fake behaves.
#[derive(Debug, Clone, PartialEq)]
pub struct FakeConfig {
    /// Added to every create, start, stop, destroy and exec.
    pub latency: Duration,
    /// Probability (0..1) that one of those calls fails with
    /// `RuntimeError::Runtime("injected failure")` and changes nothing.
    pub fail_rate: f64,
    /// The images it accepts.
    pub images: Vec<String>,
}

impl Default for FakeConfig {
    fn default() -> Self {
        Self {
            latency: Duration::ZERO,
            fail_rate: 0.0,
            images: vec!["busybox".to_string()],
        }
    }
}

#[derive(Debug, Clone)]
struct FakeSandbox {
    spec: SandboxSpec,
    phase: Phase,
    exit_code: Option<i32>,
}

impl FakeSandbox {
    fn status(&self) -> SandboxStatus {
        SandboxStatus {
            id: self.spec.id.clone(),
            phase: self.phase,
            exit_code: self.exit_code,
            image: self.spec.image.clone(),
            expires_at: self.spec.expires_at,
        }
    }
}

#[derive(Debug, Default)]
struct FakeState {
    config: FakeConfig,
    sandboxes: BTreeMap<String, FakeSandbox>,
}

/// A shared handle on one in-memory runtime.
#[derive(Debug, Clone, Default)]
pub struct FakeRuntime {
    state: Arc<Mutex<FakeState>>,
}

impl FakeRuntime {
    pub fn new(config: FakeConfig) -> Self {
        Self {
            state: Arc::new(Mutex::new(FakeState {
                config,
                sandboxes: BTreeMap::new(),
            })),
        }
    }

    fn state(&self) -> MutexGuard<'_, FakeState> {
        // A panic elsewhere while holding the lock leaves a usable table.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The ids of every sandbox it holds, sorted.
    pub fn sandbox_ids(&self) -> Vec<String> {
        self.state().sandboxes.keys().cloned().collect()
    }

    /// The phase of a sandbox, `None` when it does not hold it.
    pub fn phase(&self, id: &str) -> Option<Phase> {
        self.state().sandboxes.get(id).map(|s| s.phase)
    }

    /// The spec a sandbox was created with (env merged with its secret
    /// env, as the agent received it), `None` when it does not hold it.
    pub fn spec(&self, id: &str) -> Option<SandboxSpec> {
        self.state().sandboxes.get(id).map(|s| s.spec.clone())
    }

    /// Makes a running sandbox's main process "exit" with `code`, as if it
    /// ended on its own. Returns false when there is no such sandbox.
    pub fn simulate_exit(&self, id: &str, code: i32) -> bool {
        match self.state().sandboxes.get_mut(id) {
            Some(s) => {
                s.phase = Phase::Stopped;
                s.exit_code = Some(code);
                true
            }
            None => false,
        }
    }

    /// Makes a sandbox disappear, as if removed behind the agent's back.
    pub fn simulate_vanish(&self, id: &str) -> bool {
        self.state().sandboxes.remove(id).is_some()
    }

    pub fn set_latency(&self, latency: Duration) {
        self.state().config.latency = latency;
    }

    pub fn set_fail_rate(&self, fail_rate: f64) {
        self.state().config.fail_rate = fail_rate;
    }

    /// Waits the configured latency, then fails at the configured rate.
    async fn delay_and_maybe_fail(&self) -> Result<(), RuntimeError> {
        let (latency, fail_rate) = {
            let s = self.state();
            (s.config.latency, s.config.fail_rate)
        };
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        if fail_rate > 0.0 && fastrand::f64() < fail_rate {
            return Err(RuntimeError::Runtime("injected failure".into()));
        }
        Ok(())
    }

    fn existing(&self, id: &str) -> Result<SandboxStatus, RuntimeError> {
        self.state()
            .sandboxes
            .get(id)
            .map(FakeSandbox::status)
            .ok_or_else(|| RuntimeError::SandboxNotFound(id.to_string()))
    }
}

#[async_trait]
impl Runtime for FakeRuntime {
    fn kind(&self) -> &'static str {
        "fake"
    }

    fn isolated(&self) -> bool {
        // It runs nothing, so nothing escapes; the control plane schedules
        // on it as on an isolated host.
        true
    }

    fn images(&self) -> Vec<String> {
        self.state().config.images.clone()
    }

    async fn create(&self, spec: &SandboxSpec) -> Result<SandboxStatus, RuntimeError> {
        validate_spec(spec)?;
        self.delay_and_maybe_fail().await?;
        let mut state = self.state();
        if let Some(existing) = state.sandboxes.get(&spec.id) {
            return Ok(existing.status());
        }
        if !state.config.images.contains(&spec.image) {
            return Err(RuntimeError::ImageNotFound(spec.image.clone()));
        }
        let sandbox = FakeSandbox {
            spec: spec.clone(),
            phase: Phase::Running,
            exit_code: None,
        };
        let status = sandbox.status();
        state.sandboxes.insert(spec.id.clone(), sandbox);
        Ok(status)
    }

    async fn start(&self, id: &str) -> Result<SandboxStatus, RuntimeError> {
        validate_sandbox_id(id)?;
        self.delay_and_maybe_fail().await?;
        let mut state = self.state();
        let s = state
            .sandboxes
            .get_mut(id)
            .ok_or_else(|| RuntimeError::SandboxNotFound(id.to_string()))?;
        if s.phase != Phase::Running {
            s.phase = Phase::Running;
            s.exit_code = None;
        }
        Ok(s.status())
    }

    async fn stop(&self, id: &str, _grace: Duration) -> Result<SandboxStatus, RuntimeError> {
        validate_sandbox_id(id)?;
        self.delay_and_maybe_fail().await?;
        let mut state = self.state();
        let s = state
            .sandboxes
            .get_mut(id)
            .ok_or_else(|| RuntimeError::SandboxNotFound(id.to_string()))?;
        if s.phase != Phase::Stopped {
            s.phase = Phase::Stopped;
        }
        Ok(s.status())
    }

    async fn destroy(&self, id: &str) -> Result<SandboxStatus, RuntimeError> {
        validate_sandbox_id(id)?;
        self.delay_and_maybe_fail().await?;
        let removed = self.state().sandboxes.remove(id);
        let image = removed.map(|s| s.spec.image).unwrap_or_default();
        Ok(SandboxStatus::absent(id, &image))
    }

    async fn exec(&self, id: &str, spec: ExecSpec) -> Result<ExecOutput, RuntimeError> {
        validate_sandbox_id(id)?;
        validate_exec(&spec)?;
        self.delay_and_maybe_fail().await?;
        let status = self.existing(id)?;
        if status.phase != Phase::Running {
            return Err(RuntimeError::InvalidState(format!(
                "sandbox {id} is not running"
            )));
        }
        let stdout = if spec.argv.first().is_some_and(|a| a == "echo") {
            format!("{}\n", spec.argv[1..].join(" ")).into_bytes()
        } else {
            Vec::new()
        };
        let stdout_truncated = stdout.len() > spec.max_output_bytes;
        let mut stdout = stdout;
        stdout.truncate(spec.max_output_bytes);
        Ok(ExecOutput {
            exit_code: 0,
            stdout,
            stdout_truncated,
            ..Default::default()
        })
    }

    async fn list(&self) -> Result<Vec<SandboxStatus>, RuntimeError> {
        Ok(self
            .state()
            .sandboxes
            .values()
            .map(FakeSandbox::status)
            .collect())
    }

    async fn stop_if_overdue(
        &self,
        id: &str,
        now: SystemTime,
        margin: Duration,
        _grace: Duration,
    ) -> Result<Option<SandboxStatus>, RuntimeError> {
        validate_sandbox_id(id)?;
        self.delay_and_maybe_fail().await?;
        // The check and the change happen under one lock of the table, so
        // no command can come in between.
        let mut state = self.state();
        match state.sandboxes.get_mut(id) {
            Some(s) if s.status().is_overdue(now, margin) => {
                s.phase = Phase::Stopped;
                Ok(Some(s.status()))
            }
            _ => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(id: &str) -> SandboxSpec {
        SandboxSpec {
            id: id.into(),
            image: "busybox".into(),
            command: vec!["sleep".into(), "600".into()],
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn create_and_destroy_are_idempotent() {
        let rt = FakeRuntime::new(FakeConfig::default());
        let first = rt.create(&spec("sbx_a")).await.expect("create");
        assert_eq!(first.phase, Phase::Running);
        rt.stop("sbx_a", Duration::ZERO).await.expect("stop");
        let again = rt.create(&spec("sbx_a")).await.expect("create again");
        assert_eq!(
            again.phase,
            Phase::Stopped,
            "an existing id returns its status"
        );
        assert_eq!(rt.sandbox_ids(), vec!["sbx_a".to_string()]);

        let gone = rt.destroy("sbx_a").await.expect("destroy");
        assert_eq!(gone.phase, Phase::Absent);
        assert_eq!(gone.image, "busybox");
        let gone_again = rt.destroy("sbx_a").await.expect("destroy again");
        assert_eq!(gone_again.phase, Phase::Absent);
        assert!(rt.sandbox_ids().is_empty());
    }

    #[tokio::test]
    async fn stop_and_start_move_between_phases() {
        let rt = FakeRuntime::new(FakeConfig::default());
        rt.create(&spec("sbx_b")).await.expect("create");
        assert_eq!(
            rt.stop("sbx_b", Duration::ZERO).await.expect("stop").phase,
            Phase::Stopped
        );
        assert_eq!(
            rt.stop("sbx_b", Duration::ZERO).await.expect("stop").phase,
            Phase::Stopped
        );
        let exec = rt
            .exec(
                "sbx_b",
                ExecSpec {
                    argv: vec!["true".into()],
                    ..Default::default()
                },
            )
            .await;
        assert!(matches!(exec, Err(RuntimeError::InvalidState(_))));
        assert_eq!(
            rt.start("sbx_b").await.expect("start").phase,
            Phase::Running
        );
        assert_eq!(
            rt.start("sbx_b").await.expect("start").phase,
            Phase::Running
        );
        assert!(matches!(
            rt.start("sbx_nope").await,
            Err(RuntimeError::SandboxNotFound(_))
        ));
        assert!(matches!(
            rt.stop("sbx_nope", Duration::ZERO).await,
            Err(RuntimeError::SandboxNotFound(_))
        ));
    }

    #[tokio::test]
    async fn exec_echoes_and_unknown_images_are_refused() {
        let rt = FakeRuntime::new(FakeConfig::default());
        rt.create(&spec("sbx_c")).await.expect("create");
        let out = rt
            .exec(
                "sbx_c",
                ExecSpec {
                    argv: vec!["echo".into(), "hello".into(), "world".into()],
                    ..Default::default()
                },
            )
            .await
            .expect("exec");
        assert_eq!(out.stdout, b"hello world\n");
        assert_eq!(out.exit_code, 0);
        let mut other = spec("sbx_d");
        other.image = "alpine".into();
        assert!(matches!(
            rt.create(&other).await,
            Err(RuntimeError::ImageNotFound(_))
        ));
        let mut bad = spec("../x");
        bad.id = "../x".into();
        assert!(matches!(
            rt.create(&bad).await,
            Err(RuntimeError::InvalidArgument(_))
        ));
    }

    #[tokio::test]
    async fn injected_failures_change_nothing() {
        let rt = FakeRuntime::new(FakeConfig {
            fail_rate: 1.0,
            ..Default::default()
        });
        let err = rt.create(&spec("sbx_e")).await.expect_err("always fails");
        assert_eq!(err, RuntimeError::Runtime("injected failure".into()));
        assert!(rt.sandbox_ids().is_empty());
        rt.set_fail_rate(0.0);
        rt.create(&spec("sbx_e")).await.expect("create");
        rt.set_fail_rate(1.0);
        assert!(rt.destroy("sbx_e").await.is_err());
        assert_eq!(rt.phase("sbx_e"), Some(Phase::Running));
    }

    #[tokio::test]
    async fn a_simulated_exit_shows_in_the_list_with_its_code() {
        let rt = FakeRuntime::new(FakeConfig::default());
        rt.create(&spec("sbx_f")).await.expect("create");
        assert!(rt.simulate_exit("sbx_f", 7));
        let listed = rt.list().await.expect("list");
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].phase, Phase::Stopped);
        assert_eq!(listed[0].exit_code, Some(7));
        assert!(!rt.simulate_exit("sbx_nope", 1));
    }

    #[tokio::test]
    async fn only_an_overdue_running_sandbox_is_stopped_by_the_ttl_stop() {
        let rt = FakeRuntime::new(FakeConfig::default());
        let now = SystemTime::now();
        let mut expired = spec("sbx_ttl");
        expired.expires_at = Some(now - Duration::from_secs(60));
        rt.create(&expired).await.expect("create");
        rt.create(&spec("sbx_forever")).await.expect("create");
        let listed = rt.list().await.expect("list");
        assert_eq!(
            listed
                .iter()
                .find(|s| s.id == "sbx_ttl")
                .map(|s| s.expires_at),
            Some(expired.expires_at),
            "the deadline is listed"
        );
        let margin = Duration::from_secs(30);
        let none = rt
            .stop_if_overdue("sbx_forever", now, margin, Duration::ZERO)
            .await
            .expect("no ttl");
        assert_eq!(none, None);
        assert_eq!(
            rt.stop_if_overdue("sbx_ttl", now, Duration::from_secs(120), Duration::ZERO)
                .await
                .expect("inside the margin"),
            None
        );
        assert_eq!(rt.phase("sbx_ttl"), Some(Phase::Running));
        let stopped = rt
            .stop_if_overdue("sbx_ttl", now, margin, Duration::ZERO)
            .await
            .expect("overdue")
            .expect("stopped");
        assert_eq!(stopped.phase, Phase::Stopped);
        assert_eq!(stopped.expires_at, expired.expires_at);
        assert_eq!(
            rt.stop_if_overdue("sbx_ttl", now, margin, Duration::ZERO)
                .await
                .expect("already stopped"),
            None,
            "a stopped sandbox is left alone"
        );
        assert_eq!(
            rt.stop_if_overdue("sbx_nope", now, margin, Duration::ZERO)
                .await
                .expect("absent"),
            None
        );
    }

    #[tokio::test]
    async fn latency_is_applied_to_commands() {
        let rt = FakeRuntime::new(FakeConfig::default());
        rt.set_latency(Duration::from_millis(100));
        let started = std::time::Instant::now();
        rt.create(&spec("sbx_g")).await.expect("create");
        assert!(started.elapsed() >= Duration::from_millis(100));
    }
}

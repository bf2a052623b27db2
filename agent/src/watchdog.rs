//! The agent-side TTL watchdog: a backstop for the control plane's TTL.
//!
//! Owns the watchdog loop, which runs for the whole life of the agent,
//! connected or not (a control plane that is down or unreachable is exactly
//! when the backstop matters): every poll interval it lists the runtime and,
//! for each running sandbox whose TTL deadline plus the margin has passed
//! ([`overdue`], a pure function), asks the runtime to stop it
//! ([`Runtime::stop_if_overdue`]: SIGTERM, then SIGKILL after the grace; the
//! check is repeated under the sandbox's lock, so a concurrent command never
//! interleaves with it). It stops and never destroys: the sandbox's files
//! stay until the control plane destroys it.
//!
//! Reporting goes through the [`SessionLink`]: while a session is connected,
//! each stop is marked in flight in its phase table (so the session's poll
//! does not also report it as "exited") and reported once as a
//! `SandboxEvent` with reason "ttl". With no session nothing is queued: the
//! next registration's inventory shows the sandbox stopped, with its
//! deadline.
//!
//! The watchdog keeps no state beyond the ids it is stopping right now; the
//! deadlines live in the runtime with each sandbox, so a restarted agent
//! finds them again.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tracing::Instrument;

use crate::connection::SessionLink;
use crate::runtime::{Runtime, SandboxStatus};

/// How the watchdog acts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WatchdogConfig {
    /// How long past a sandbox's deadline the watchdog waits before stopping
    /// it itself, leaving the control plane time to act first.
    pub ttl_margin: Duration,
    /// Between SIGTERM and SIGKILL when the watchdog stops a sandbox.
    pub stop_grace: Duration,
}

/// Default [`WatchdogConfig::ttl_margin`].
pub const DEFAULT_TTL_MARGIN: Duration = Duration::from_secs(30);
/// Default [`WatchdogConfig::stop_grace`].
pub const DEFAULT_STOP_GRACE: Duration = Duration::from_secs(10);

impl Default for WatchdogConfig {
    fn default() -> Self {
        Self {
            ttl_margin: DEFAULT_TTL_MARGIN,
            stop_grace: DEFAULT_STOP_GRACE,
        }
    }
}

/// The ids of the sandboxes in `listed` that are overdue at `now` with
/// `margin`: running, with a TTL deadline, and `now >= deadline + margin`.
pub fn overdue(listed: &[SandboxStatus], now: SystemTime, margin: Duration) -> Vec<String> {
    listed
        .iter()
        .filter(|s| s.is_overdue(now, margin))
        .map(|s| s.id.clone())
        .collect()
}

/// Runs the watchdog forever (until its task is aborted): a check at once,
/// then one every `every`.
pub async fn run(
    runtime: Arc<dyn Runtime>,
    link: Arc<SessionLink>,
    config: WatchdogConfig,
    every: Duration,
) {
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        check_once(&runtime, &link, config).await;
    }
}

/// One pass: lists the runtime and starts a stop for every overdue sandbox
/// that is not already being stopped. The stops run as their own tasks, so
/// one slow stop (a long grace) does not hold up the others or the next
/// pass; a stop already under way runs to completion even if the watchdog
/// itself is ended.
pub async fn check_once(
    runtime: &Arc<dyn Runtime>,
    link: &Arc<SessionLink>,
    config: WatchdogConfig,
) {
    let listed = match runtime.list().await {
        Ok(listed) => listed,
        Err(e) => {
            tracing::warn!(error = %e, "the TTL watchdog could not list the runtime");
            return;
        }
    };
    let now = SystemTime::now();
    for id in overdue(&listed, now, config.ttl_margin) {
        if !link.begin_ttl_stop(&id) {
            continue;
        }
        let span = tracing::info_span!("agent.ttl_stop", sandbox.id = %id);
        let (runtime, link) = (runtime.clone(), link.clone());
        tokio::spawn(
            async move {
                let result = runtime
                    .stop_if_overdue(&id, now, config.ttl_margin, config.stop_grace)
                    .await;
                let stopped = match result {
                    Ok(Some(status)) => {
                        tracing::info!(
                            margin = ?config.ttl_margin,
                            "stopped a sandbox past its TTL"
                        );
                        Some(status)
                    }
                    Ok(None) => {
                        tracing::debug!("no longer overdue and running; left alone");
                        None
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "could not stop a sandbox past its TTL; retrying on the next pass");
                        None
                    }
                };
                link.finish_ttl_stop(&id, stopped.as_ref()).await;
            }
            .instrument(span),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::Phase;

    fn status(id: &str, phase: Phase, expires_at: Option<SystemTime>) -> SandboxStatus {
        SandboxStatus {
            id: id.into(),
            phase,
            exit_code: None,
            image: "busybox".into(),
            expires_at,
        }
    }

    const MARGIN: Duration = Duration::from_secs(30);

    fn t(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs)
    }

    #[test]
    fn a_sandbox_without_a_ttl_is_never_overdue() {
        let listed = [status("a", Phase::Running, None)];
        assert!(overdue(&listed, t(1_000_000), MARGIN).is_empty());
    }

    #[test]
    fn a_sandbox_before_its_deadline_is_not_overdue() {
        let listed = [status("a", Phase::Running, Some(t(100)))];
        assert!(overdue(&listed, t(50), MARGIN).is_empty());
        assert!(overdue(&listed, t(99), Duration::ZERO).is_empty());
    }

    #[test]
    fn a_sandbox_inside_the_margin_is_not_overdue() {
        let listed = [status("a", Phase::Running, Some(t(100)))];
        assert!(overdue(&listed, t(100), MARGIN).is_empty());
        assert!(overdue(&listed, t(129), MARGIN).is_empty());
    }

    #[test]
    fn a_running_sandbox_past_deadline_and_margin_is_overdue() {
        let listed = [
            status("a", Phase::Running, Some(t(100))),
            status("b", Phase::Running, Some(t(200))),
            status("c", Phase::Running, None),
        ];
        assert_eq!(overdue(&listed, t(130), MARGIN), vec!["a".to_string()]);
        assert_eq!(
            overdue(&listed, t(1000), MARGIN),
            vec!["a".to_string(), "b".to_string()]
        );
        assert_eq!(
            overdue(&listed, t(100), Duration::ZERO),
            vec!["a".to_string()]
        );
    }

    #[test]
    fn a_sandbox_that_is_not_running_is_never_overdue() {
        let listed = [
            status("a", Phase::Stopped, Some(t(100))),
            status("b", Phase::Created, Some(t(100))),
            status("c", Phase::Absent, Some(t(100))),
        ];
        assert!(overdue(&listed, t(10_000), MARGIN).is_empty());
    }

    #[test]
    fn a_margin_that_overflows_the_clock_never_fires() {
        let listed = [status("a", Phase::Running, Some(t(100)))];
        assert!(overdue(&listed, t(10_000), Duration::MAX).is_empty());
    }
}

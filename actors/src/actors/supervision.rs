//! Restart policy shared by the supervisors: a child may be restarted at
//! most `max_restarts` times within `period`; one more failure inside the
//! period means restarting does not help, and the supervisor escalates (or,
//! for a sandbox, gives the sandbox up) instead of looping.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::time::{Duration, Instant};

/// Restarts allowed per child within a sliding window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestartPolicy {
    pub max_restarts: usize,
    pub period: Duration,
}

impl Default for RestartPolicy {
    /// Three restarts in ten seconds, as in Erlang/OTP's spirit: enough to
    /// ride out a transient fault, few enough to stop a crash loop quickly.
    fn default() -> Self {
        Self {
            max_restarts: 3,
            period: Duration::from_secs(10),
        }
    }
}

/// The restart history of a supervisor's children.
#[derive(Debug)]
pub struct RestartBudget<K> {
    policy: RestartPolicy,
    history: HashMap<K, VecDeque<Instant>>,
}

impl<K: Eq + Hash + Clone> RestartBudget<K> {
    pub fn new(policy: RestartPolicy) -> Self {
        Self {
            policy,
            history: HashMap::new(),
        }
    }

    /// Records a failure of `child` at `now`; true if it may be restarted.
    pub fn allow_restart(&mut self, child: &K, now: Instant) -> bool {
        let window = self.history.entry(child.clone()).or_default();
        while window
            .front()
            .is_some_and(|t| now.duration_since(*t) > self.policy.period)
        {
            window.pop_front();
        }
        if window.len() >= self.policy.max_restarts {
            return false;
        }
        window.push_back(now);
        true
    }

    /// Forgets a child that ended normally.
    pub fn forget(&mut self, child: &K) {
        self.history.remove(child);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restarts_beyond_the_intensity_are_refused_until_the_period_passes() {
        let policy = RestartPolicy {
            max_restarts: 2,
            period: Duration::from_secs(10),
        };
        let mut budget = RestartBudget::new(policy);
        let t0 = Instant::now();
        assert!(budget.allow_restart(&"a", t0));
        assert!(budget.allow_restart(&"a", t0 + Duration::from_secs(1)));
        assert!(!budget.allow_restart(&"a", t0 + Duration::from_secs(2)));
        // Another child has its own budget.
        assert!(budget.allow_restart(&"b", t0 + Duration::from_secs(2)));
        // Once the first failures leave the window, restarts are allowed again.
        assert!(budget.allow_restart(&"a", t0 + Duration::from_secs(12)));
        budget.forget(&"a");
        assert!(budget.allow_restart(&"a", t0 + Duration::from_secs(12)));
    }
}

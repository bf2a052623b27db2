//! Counters of what the control plane's reconcilers and supervisors did,
//! shared by the actors that count and the `/metrics` endpoint that shows
//! them. Plain atomics: counting never waits on anything.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// One monotonically increasing counter.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    pub fn add(&self, n: i64) {
        self.0
            .fetch_add(u64::try_from(n).unwrap_or(0), Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

#[derive(Debug, Default)]
pub struct Counters {
    /// Containers found on a host that no live sandbox accounts for.
    pub drift_orphans: Counter,
    /// Sandboxes the database had as present that their host did not have.
    pub drift_lost: Counter,
    /// Sandboxes whose observed state differed from the recorded one and was
    /// taken over (stopped on its own, came back, ...).
    pub drift_corrected: Counter,
    pub orphans_collected: Counter,
    /// Actors restarted by their supervisor after a failure.
    pub actor_restarts: Counter,
    pub hosts_offline: Counter,
    /// Sandboxes whose TTL ran out.
    pub ttl_expired: Counter,
    /// Transitional states given up after their deadline.
    pub transitions_expired: Counter,
    /// Micro-units charged for usage.
    pub usage_charged_micros: Counter,
    /// Changes of an org's billing status.
    pub billing_transitions: Counter,
}

/// A cheap handle on the control plane's counters.
#[derive(Debug, Clone, Default)]
pub struct Metrics(Arc<Counters>);

impl std::ops::Deref for Metrics {
    type Target = Counters;
    fn deref(&self) -> &Counters {
        &self.0
    }
}

impl Metrics {
    /// The counters in the Prometheus text exposition format.
    pub fn render(&self) -> String {
        let c = &self.0;
        let rows: [(&str, &str, &Counter); 10] = [
            (
                "corral_drift_orphans_total",
                "Containers found on hosts that no live sandbox accounts for.",
                &c.drift_orphans,
            ),
            (
                "corral_drift_lost_total",
                "Sandboxes found missing from their host.",
                &c.drift_lost,
            ),
            (
                "corral_drift_corrected_total",
                "Sandboxes whose recorded state was corrected from what their host reported.",
                &c.drift_corrected,
            ),
            (
                "corral_orphans_collected_total",
                "Orphan containers destroyed.",
                &c.orphans_collected,
            ),
            (
                "corral_actor_restarts_total",
                "Actors restarted by their supervisor after a failure.",
                &c.actor_restarts,
            ),
            (
                "corral_hosts_offline_total",
                "Hosts that went offline after their grace period.",
                &c.hosts_offline,
            ),
            (
                "corral_ttl_expired_total",
                "Sandboxes destroyed because their TTL ran out.",
                &c.ttl_expired,
            ),
            (
                "corral_transitions_expired_total",
                "Transitional states given up after their deadline.",
                &c.transitions_expired,
            ),
            (
                "corral_usage_charged_micros_total",
                "Micro-units charged for sandbox usage.",
                &c.usage_charged_micros,
            ),
            (
                "corral_billing_transitions_total",
                "Changes of an organisation's billing status.",
                &c.billing_transitions,
            ),
        ];
        let mut out = String::new();
        for (name, help, counter) in rows {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                counter.get()
            );
        }
        out
    }
}

//! Counters of what the control plane's reconcilers and supervisors did,
//! shared by the actors that count and the `/metrics` endpoint that shows
//! them, and the [`ActorRegistry`] the supervisors keep of their children
//! (start time, org, restarts, last error) for the actor tree, and the
//! event channel the actors publish their transitions on. Plain atomics
//! and short locks: counting never waits on an actor.

use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use corral_telemetry::prom::{CounterVec, HistogramVec, LATENCY_BUCKETS};
use dashmap::DashMap;
use ractor::{ActorCell, ActorId};

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
    /// Sandbox actors that stopped to go dormant, and dormant sandboxes
    /// woken again.
    pub sandboxes_slept: Counter,
    pub sandboxes_woken: Counter,
    /// Transitional states given up after their deadline.
    pub transitions_expired: Counter,
    /// Micro-units charged for usage.
    pub usage_charged_micros: Counter,
    /// Changes of an org's billing status.
    pub billing_transitions: Counter,
    /// Periodic re-reads of an org's sandbox rows its ledger applied.
    pub ledger_resyncs: Counter,
    /// Latencies, labelled counts and gauges.
    pub timings: Timings,
    /// The actors the supervisors started, for the actor tree.
    pub registry: ActorRegistry,
    /// Sandbox and billing transitions, for live subscribers.
    pub events: crate::events::EventBus,
}

/// Latencies and labelled counters (label sets are bounded: kinds, org ids
/// the platform created).
#[derive(Debug)]
pub struct Timings {
    /// From the create request to the sandbox running.
    pub create_to_running: HistogramVec,
    /// One placement decision of the scheduler.
    pub placement: HistogramVec,
    /// Actors restarted, by kind.
    pub restarts_by_kind: CounterVec,
    /// Usage charged, by org.
    pub debits_by_org: CounterVec,
    /// Commands sent to agents that wait for their reply.
    pub pending_requests: AtomicI64,
    /// Sandboxes held dormant by their hosts (no actor).
    pub dormant_sandboxes: AtomicI64,
}

impl Default for Timings {
    fn default() -> Self {
        Self {
            create_to_running: HistogramVec::new(
                "corral_sandbox_create_to_running_seconds",
                "From a sandbox's create request to it running.",
                &[],
                LATENCY_BUCKETS,
            ),
            placement: HistogramVec::new(
                "corral_placement_seconds",
                "How long the scheduler took to place a sandbox.",
                &["outcome"],
                LATENCY_BUCKETS,
            ),
            restarts_by_kind: CounterVec::new(
                "corral_actor_restarts_by_kind_total",
                "Actors restarted by their supervisor after a failure, by kind.",
                &["kind"],
            ),
            debits_by_org: CounterVec::new(
                "corral_ledger_debits_micros_total",
                "Micro-units charged for usage, by organisation.",
                &["org"],
            ),
            pending_requests: AtomicI64::new(0),
            dormant_sandboxes: AtomicI64::new(0),
        }
    }
}

/// What the supervisors know of the actors they started, by actor id: the
/// tree dump reads it without messaging any actor. Restarts and the last
/// error are remembered by registered name across incarnations (without a
/// `#generation` suffix: a host's next connection inherits the count of
/// the one that failed).
#[derive(Debug, Default)]
pub struct ActorRegistry {
    live: DashMap<ActorId, ActorEntry>,
    history: DashMap<String, (u32, String)>,
}

#[derive(Debug, Clone)]
pub struct ActorEntry {
    pub org: Option<String>,
    pub started: Instant,
    pub restarts: u32,
    pub last_error: Option<String>,
}

impl ActorRegistry {
    /// A supervisor started `cell` (for `org`, if it belongs to one).
    pub fn started(&self, cell: &ActorCell, org: Option<&str>) {
        let (restarts, last_error) = cell
            .get_name()
            .and_then(|name| self.history.remove(history_key(&name)))
            .map_or((0, None), |(_, (n, e))| (n, Some(e)));
        self.live.insert(
            cell.get_id(),
            ActorEntry {
                org: org.map(str::to_string),
                started: Instant::now(),
                restarts,
                last_error,
            },
        );
    }

    /// `cell` failed; its supervisor may start a replacement under the
    /// same name, which inherits the count.
    pub fn failed(&self, cell: &ActorCell, error: &str) {
        let previous = self.live.remove(&cell.get_id()).map(|(_, e)| e);
        if let Some(name) = cell.get_name() {
            let restarts = previous.map_or(0, |e| e.restarts) + 1;
            let error: String = error.chars().take(512).collect();
            self.history
                .insert(history_key(&name).to_string(), (restarts, error));
        }
    }

    /// `cell` stopped for good.
    pub fn gone(&self, cell: &ActorCell) {
        self.live.remove(&cell.get_id());
        if let Some(name) = cell.get_name() {
            self.history.remove(history_key(&name));
        }
    }

    pub fn get(&self, id: ActorId) -> Option<ActorEntry> {
        self.live.get(&id).map(|e| e.clone())
    }

    pub fn len(&self) -> usize {
        self.live.len()
    }

    pub fn is_empty(&self) -> bool {
        self.live.is_empty()
    }
}

/// The name an actor's restarts are remembered under: its registered name
/// without a `#generation` suffix.
fn history_key(name: &str) -> &str {
    name.split_once('#').map_or(name, |(base, _)| base)
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
    /// A supervisor saw `cell` fail: counts the restart (in total and by
    /// kind) and remembers the error for the actor tree.
    pub fn actor_failed(&self, kind: &str, cell: &ActorCell, error: &str) {
        self.actor_restarts.inc();
        self.timings.restarts_by_kind.inc(&[kind]);
        self.registry.failed(cell, error);
    }

    /// The counters in the Prometheus text exposition format.
    pub fn render(&self) -> String {
        let c = &self.0;
        let rows: [(&str, &str, &Counter); 13] = [
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
                "corral_sandboxes_slept_total",
                "Sandbox actors that stopped to let their idle sandbox go dormant.",
                &c.sandboxes_slept,
            ),
            (
                "corral_sandboxes_woken_total",
                "Dormant sandboxes given an actor again.",
                &c.sandboxes_woken,
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
            (
                "corral_ledger_resyncs_total",
                "Periodic re-reads of an organisation's sandboxes applied by its ledger.",
                &c.ledger_resyncs,
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
        let t = &c.timings;
        t.create_to_running.render(&mut out);
        t.placement.render(&mut out);
        t.restarts_by_kind.render(&mut out);
        t.debits_by_org.render(&mut out);
        corral_telemetry::prom::gauge(
            &mut out,
            "corral_pending_requests",
            "Commands sent to agents whose reply is awaited.",
            &[],
            &[(vec![], t.pending_requests.load(Ordering::Relaxed) as f64)],
        );
        corral_telemetry::prom::gauge(
            &mut out,
            "corral_sandboxes_dormant",
            "Sandboxes held dormant by their hosts, without an actor.",
            &[],
            &[(vec![], t.dormant_sandboxes.load(Ordering::Relaxed) as f64)],
        );
        let depths = crate::mailbox::by_kind();
        for (name, help, deepest) in [
            (
                "corral_actor_mailbox_messages",
                "Messages waiting in actors' mailboxes, summed by actor kind.",
                false,
            ),
            (
                "corral_actor_mailbox_max_messages",
                "The deepest single mailbox of each actor kind.",
                true,
            ),
        ] {
            let rows: Vec<_> = depths
                .iter()
                .map(|&(kind, total, max)| {
                    (
                        vec![kind.to_string()],
                        if deepest { max } else { total } as f64,
                    )
                })
                .collect();
            corral_telemetry::prom::gauge(&mut out, name, help, &["kind"], &rows);
        }
        out
    }
}

//! The actor tree of the control plane (ARCHITECTURE.md section 3):
//!
//! ```text
//! RootSupervisor
//! ├── Scheduler                 capacity view + reservations
//! ├── OrgsSupervisor
//! │   └── LedgerActor{org}      balance, credit gate
//! └── FleetSupervisor
//!     └── HostActor{host}       host row, current connection, its sandboxes
//!         ├── ConnectionActor   owns the gRPC stream (at most one live)
//!         └── SandboxActor{sbx} one per sandbox that is not destroyed
//!                               and not dormant (see `sandbox`)
//! ```
//!
//! Each actor lives in its own module with its messages beside it.

pub mod connection;
pub mod fleet;
pub mod host;
pub mod ledger;
pub mod root;
pub mod sandbox;
pub mod scheduler;
pub mod supervision;

use std::time::Duration;

/// Deadlines of the operations sent to hosts, and the heartbeat interval.
#[derive(Debug, Clone)]
pub struct Timeouts {
    pub create: Duration,
    pub start: Duration,
    pub stop_grace: Duration,
    pub destroy: Duration,
    /// Added to an exec's own timeout for the reply to come back.
    pub exec_margin: Duration,
    pub heartbeat_interval: Duration,
    /// How long a disconnected host keeps its sandboxes before it is
    /// `offline` and they are `lost`. A partition shorter than this loses
    /// nothing.
    pub offline_grace: Duration,
    /// How often a connected host's inventory is compared with the database
    /// (both directions), besides every (re)connect.
    pub reconcile_interval: Duration,
    /// How long a container the database does not know (or knows as
    /// destroyed) may stay on a host before it is destroyed.
    pub orphan_grace: Duration,
    /// The longest a sandbox may stay in a transitional state (`creating`,
    /// `starting`, `stopping`, `destroying`) while its host is reachable;
    /// past it, the step is given up: `failed` with a reason (or `destroyed`
    /// for a destroy, whose leftovers the orphan collector removes).
    pub transition_deadline: Duration,
    /// How long a sandbox that has nothing to do (converged, no step,
    /// retry or request in flight) keeps its actor before it goes dormant:
    /// its host then holds it as a few bytes and wakes an actor from its
    /// row when something concerns it again. `None`: never dormant.
    pub dormant_after: Option<Duration>,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            create: Duration::from_secs(60),
            start: Duration::from_secs(30),
            stop_grace: Duration::from_secs(10),
            destroy: Duration::from_secs(30),
            exec_margin: Duration::from_secs(5),
            heartbeat_interval: Duration::from_secs(2),
            offline_grace: Duration::from_secs(60),
            reconcile_interval: Duration::from_secs(30),
            orphan_grace: Duration::from_secs(60),
            transition_deadline: Duration::from_secs(600),
            dormant_after: Some(Duration::from_secs(30)),
        }
    }
}

/// Waits (briefly) until no actor is registered under `name`: a killed
/// actor leaves the registry a moment after its supervisor hears of it, and
/// its replacement takes the same name.
pub(crate) async fn await_name_free(name: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while ractor::registry::where_is(name).is_some() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Registered actor names: `{prefix}{kind}:{id}`. The prefix is unique per
/// control-plane instance so that two instances in one process (tests) never
/// collide in ractor's global registry; the kind and id are what the actor
/// tree shows.
pub mod names {
    pub const ROOT: &str = "root";
    pub const SCHEDULER: &str = "scheduler";
    pub const ORGS: &str = "orgs";
    pub const FLEET: &str = "fleet";

    pub fn singleton(prefix: &str, kind: &str) -> String {
        format!("{prefix}{kind}")
    }
    pub fn host(prefix: &str, host_id: &str) -> String {
        format!("{prefix}host:{host_id}")
    }
    pub fn connection(prefix: &str, host_id: &str, generation: u64) -> String {
        format!("{prefix}connection:{host_id}#{generation}")
    }
    pub fn sandbox(prefix: &str, sandbox_id: &str) -> String {
        format!("{prefix}sandbox:{sandbox_id}")
    }
    pub fn ledger(prefix: &str, org_id: &str) -> String {
        format!("{prefix}ledger:{org_id}")
    }

    /// Splits a registered name into (kind, id) without the prefix.
    pub fn parse<'a>(prefix: &str, name: &'a str) -> (&'a str, Option<&'a str>) {
        let name = name.strip_prefix(prefix).unwrap_or(name);
        match name.split_once(':') {
            Some((kind, id)) => (kind, Some(id)),
            None => (name, None),
        }
    }
}

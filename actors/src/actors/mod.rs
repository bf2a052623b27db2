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
        }
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

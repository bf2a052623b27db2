//! The Scheduler: the control plane's view of every host's capacity, labels,
//! pool and operator state, and the reservations taken against it.
//! Placement and reservation happen in one message, so no two concurrent
//! creates can both take the last slot, and a host is never given more than
//! its allocatable capacity (what it reported, less the configured reserve,
//! times the overcommit ratio; LESSONS 20, 21).
//!
//! It also holds the orgs that require their private pool (the org-level
//! `private_pool_only`, loaded from the database at start and kept current
//! by the control plane): every placement of theirs, new or again, is made
//! as if the request had asked for it.
//!
//! The decision itself is the pure [`crate::placement::choose`].

use std::collections::{BTreeMap, HashMap, HashSet};

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use crate::domain::{HostAdminState, Placement, PlacementStrategy, Resources};
use crate::error::CorralError;
use crate::mailbox;
pub use crate::placement::HostCapacity;
use crate::placement::{self, Fleet, MapFleet, PlacementRequest, Rng};
use crate::store::sandbox;

/// How the deployment places sandboxes (`corral server` flags).
#[derive(Debug, Clone, PartialEq)]
pub struct SchedulingPolicy {
    /// Kept back on every host for the system (`--reserve-cpu-millis`,
    /// `--reserve-memory-mb`).
    pub reserve: Resources,
    /// Reservations may reach allocatable x this (`--overcommit`, >= 1.0
    /// overcommits, 1.0 by default).
    pub overcommit: f64,
    /// `--placement-strategy`.
    pub strategy: PlacementStrategy,
    /// Whether a request may choose its own strategy, for orgs without a
    /// setting of their own (`--no-strategy-override` turns it off; the API
    /// enforces it, see `ControlPlane::allows_strategy_override`).
    pub allow_strategy_override: bool,
    /// Hosts a create is tried on when hosts fail it
    /// (`--max-create-attempts`).
    pub max_create_attempts: u32,
}

impl Default for SchedulingPolicy {
    fn default() -> Self {
        Self {
            reserve: Resources::default(),
            overcommit: 1.0,
            strategy: PlacementStrategy::Spread,
            allow_strategy_override: true,
            max_create_attempts: 3,
        }
    }
}

/// What a host told the scheduler at registration.
#[derive(Debug, Clone, Default)]
pub struct HostInfo {
    /// The capacity the agent reported (before reserve and overcommit).
    pub reported: Resources,
    pub labels: BTreeMap<String, String>,
    pub runtime: String,
    pub images: Vec<String>,
    pub pool: Option<String>,
    pub admin: Option<HostAdminState>,
}

/// The anti-affinity group of a sandbox row (`key=value`), if it has one.
pub fn group_of(row: &sandbox::Model) -> Option<String> {
    request_for(row).group()
}

/// The placement request of an existing sandbox (to place it again).
pub fn request_for(row: &sandbox::Model) -> PlacementRequest {
    PlacementRequest {
        org_id: row.org_id.clone(),
        resources: Resources {
            cpu_millis: u64::try_from(row.cpu_millis).unwrap_or(0),
            memory_mb: u64::try_from(row.memory_mb).unwrap_or(0),
        },
        image: row.image.clone(),
        labels: serde_json::from_value(row.labels.clone()).unwrap_or_default(),
        placement: row
            .placement
            .clone()
            .and_then(|p| serde_json::from_value::<Placement>(p).ok())
            .unwrap_or_default(),
        ..Default::default()
    }
}

pub enum SchedulerMsg {
    /// Choose a host for the sandbox and reserve the resources on it. A
    /// sandbox that already holds a reservation moves it (kept where it was
    /// if nothing else fits).
    Place {
        sandbox_id: String,
        request: PlacementRequest,
        reply: RpcReplyPort<Result<String, CorralError>>,
    },
    /// An org's sandboxes go only to its private pool (`on`), or anywhere
    /// their requests allow.
    SetPrivatePoolOnly { org_id: String, on: bool },
    /// Give back a sandbox's reservation (idempotent).
    Release { sandbox_id: String },
    /// Re-establish a reservation known from the database (start-up).
    Restore {
        sandbox_id: String,
        host_id: String,
        resources: Resources,
        group: Option<String>,
    },
    /// Take back a sandbox that returned on `host_id` after it was lost:
    /// reserve for it there if it still fits; answers whether it did.
    Readmit {
        sandbox_id: String,
        host_id: String,
        resources: Resources,
        group: Option<String>,
        reply: RpcReplyPort<bool>,
    },
    /// A host registered (again).
    HostUp { host_id: String, info: HostInfo },
    /// A host's connection ended: no new placements.
    HostDown { host_id: String },
    /// Operators changed a host's state.
    SetAdmin {
        host_id: String,
        admin: HostAdminState,
    },
    /// What the agent reported in use.
    Usage { host_id: String, usage: Resources },
    /// A decommissioned host leaves the fleet.
    Remove { host_id: String },
    /// The capacity view of every host.
    Snapshot(RpcReplyPort<HashMap<String, HostCapacity>>),
    /// Fault injection for the supervision tests: panic in the handler.
    #[doc(hidden)]
    InjectPanic,
}

#[derive(Debug, Clone)]
struct Reservation {
    host_id: String,
    resources: Resources,
    group: Option<String>,
}

#[derive(Debug, Clone, Default)]
struct HostMeta {
    reported: Resources,
    connected: bool,
    admin: HostAdminState,
}

pub struct SchedulerState {
    policy: SchedulingPolicy,
    fleet: MapFleet,
    meta: HashMap<String, HostMeta>,
    reservations: HashMap<String, Reservation>,
    /// Orgs whose sandboxes go only to their private pool.
    pool_only: HashSet<String>,
    rng: Rng,
    /// Counts the actor's mailbox while it lives; none when the state is
    /// used without the actor (tests, the placement benchmark).
    _mailbox: Option<mailbox::Open>,
}

/// What the Scheduler starts with.
#[derive(Debug, Clone, Default)]
pub struct SchedulerArgs {
    pub policy: SchedulingPolicy,
    /// The orgs that require their private pool (from the database).
    pub private_pool_only: HashSet<String>,
}

impl SchedulerState {
    pub fn new(policy: SchedulingPolicy, seed: u64) -> Self {
        Self {
            policy,
            fleet: MapFleet::default(),
            meta: HashMap::new(),
            reservations: HashMap::new(),
            pool_only: HashSet::new(),
            rng: Rng::new(seed),
            _mailbox: None,
        }
    }

    fn host_mut(&mut self, host_id: &str) -> &mut HostCapacity {
        if !self.fleet.hosts.contains_key(host_id) {
            self.fleet.insert(host_id, HostCapacity::default());
        }
        self.fleet
            .hosts
            .get_mut(host_id)
            .expect("inserted just above")
    }

    fn refresh(&mut self, host_id: &str) {
        let meta = self.meta.entry(host_id.to_string()).or_default().clone();
        let allocatable =
            placement::allocatable(meta.reported, self.policy.reserve, self.policy.overcommit);
        let host = self.host_mut(host_id);
        host.allocatable = allocatable;
        host.schedulable = meta.connected && meta.admin == HostAdminState::Active;
    }

    fn reserve(
        &mut self,
        sandbox_id: String,
        host_id: String,
        resources: Resources,
        group: Option<String>,
    ) {
        if self.reservations.contains_key(&sandbox_id) {
            return;
        }
        let host = self.host_mut(&host_id);
        host.allocated.cpu_millis += resources.cpu_millis;
        host.allocated.memory_mb += resources.memory_mb;
        host.sandboxes += 1;
        if let Some(g) = &group {
            *host.groups.entry(g.clone()).or_default() += 1;
        }
        self.reservations.insert(
            sandbox_id,
            Reservation {
                host_id,
                resources,
                group,
            },
        );
    }

    fn release(&mut self, sandbox_id: &str) -> Option<Reservation> {
        let r = self.reservations.remove(sandbox_id)?;
        if let Some(host) = self.fleet.hosts.get_mut(&r.host_id) {
            host.allocated.cpu_millis = host
                .allocated
                .cpu_millis
                .saturating_sub(r.resources.cpu_millis);
            host.allocated.memory_mb = host
                .allocated
                .memory_mb
                .saturating_sub(r.resources.memory_mb);
            host.sandboxes = host.sandboxes.saturating_sub(1);
            if let Some(g) = &r.group {
                if let Some(n) = host.groups.get_mut(g) {
                    *n = n.saturating_sub(1);
                    if *n == 0 {
                        host.groups.remove(g);
                    }
                }
            }
        }
        Some(r)
    }

    /// The strategy a request gets: its own (the API admitted it only where
    /// the org may choose), else the deployment's.
    pub fn strategy_for(&self, placement: &Placement) -> PlacementStrategy {
        placement.strategy.unwrap_or(self.policy.strategy)
    }

    /// Sets or clears an org's requirement to use only its private pool.
    pub fn set_private_pool_only(&mut self, org_id: &str, on: bool) {
        if on {
            self.pool_only.insert(org_id.to_string());
        } else {
            self.pool_only.remove(org_id);
        }
    }

    /// Places and reserves (moving an existing reservation).
    pub fn place(
        &mut self,
        sandbox_id: &str,
        mut request: PlacementRequest,
    ) -> Result<String, CorralError> {
        request.strategy = self.strategy_for(&request.placement);
        // The org's setting is a floor: a request cannot loosen it.
        if self.pool_only.contains(&request.org_id) {
            request.placement.private_pool_only = true;
        }
        let group = request.group();
        let previous = self.release(sandbox_id);
        match placement::choose(&self.fleet, &request, &mut self.rng) {
            Ok(host_id) => {
                self.reserve(
                    sandbox_id.to_string(),
                    host_id.clone(),
                    request.resources,
                    group,
                );
                Ok(host_id)
            }
            Err(err) => {
                if let Some(r) = previous {
                    self.reserve(sandbox_id.to_string(), r.host_id, r.resources, r.group);
                }
                Err(err)
            }
        }
    }

    fn remove_host(&mut self, host_id: &str) {
        self.meta.remove(host_id);
        if let Some(host) = self.fleet.hosts.remove(host_id) {
            if let Some(org) = &host.pool {
                if let Some(pool) = self.fleet.pools.get_mut(org) {
                    pool.retain(|h| h != host_id);
                }
            }
            self.fleet.ids.retain(|h| h != host_id);
        }
    }

    fn host_up(&mut self, host_id: &str, info: HostInfo) {
        let meta = self.meta.entry(host_id.to_string()).or_default();
        meta.reported = info.reported;
        meta.connected = true;
        if let Some(admin) = info.admin {
            meta.admin = admin;
        }
        let previous_pool = self.fleet.hosts.get(host_id).and_then(|h| h.pool.clone());
        if previous_pool != info.pool {
            if let Some(org) = &previous_pool {
                if let Some(pool) = self.fleet.pools.get_mut(org) {
                    pool.retain(|h| h != host_id);
                }
            }
            if let Some(org) = &info.pool {
                self.fleet
                    .pools
                    .entry(org.clone())
                    .or_default()
                    .push(host_id.to_string());
            }
        }
        let host = self.host_mut(host_id);
        host.labels = info.labels;
        host.runtime = info.runtime;
        host.images = info.images.into_iter().collect();
        host.pool = info.pool;
        self.refresh(host_id);
    }

    pub fn snapshot(&self) -> HashMap<String, HostCapacity> {
        self.fleet.hosts.clone()
    }

    /// Every host id the fleet knows (in registration order).
    pub fn host_ids(&self) -> &[String] {
        self.fleet.ids()
    }
}

pub struct Scheduler;

impl Actor for Scheduler {
    type Msg = SchedulerMsg;
    type State = SchedulerState;
    type Arguments = SchedulerArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: SchedulerArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let mailbox = mailbox::open(myself.get_id(), "scheduler");
        let mut seed = [0u8; 8];
        getrandom::fill(&mut seed).map_err(|e| format!("getrandom: {e}"))?;
        let mut state = SchedulerState::new(args.policy, u64::from_le_bytes(seed));
        state._mailbox = Some(mailbox);
        state.pool_only = args.private_pool_only;
        Ok(state)
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        mailbox::took(myself.get_id());
        match message {
            SchedulerMsg::Place {
                sandbox_id,
                request,
                reply,
            } => {
                let _ = reply.send(state.place(&sandbox_id, request));
            }
            SchedulerMsg::Release { sandbox_id } => {
                state.release(&sandbox_id);
            }
            SchedulerMsg::SetPrivatePoolOnly { org_id, on } => {
                state.set_private_pool_only(&org_id, on);
            }
            SchedulerMsg::Restore {
                sandbox_id,
                host_id,
                resources,
                group,
            } => state.reserve(sandbox_id, host_id, resources, group),
            SchedulerMsg::Readmit {
                sandbox_id,
                host_id,
                resources,
                group,
                reply,
            } => {
                let already = state.reservations.contains_key(&sandbox_id);
                let fits = state
                    .fleet
                    .hosts
                    .get(&host_id)
                    .is_some_and(|h| resources.fits_in(h.free()));
                if !already && fits {
                    state.reserve(sandbox_id, host_id, resources, group);
                }
                let _ = reply.send(already || fits);
            }
            SchedulerMsg::HostUp { host_id, info } => state.host_up(&host_id, info),
            SchedulerMsg::HostDown { host_id } => {
                if let Some(meta) = state.meta.get_mut(&host_id) {
                    meta.connected = false;
                    state.refresh(&host_id);
                }
            }
            SchedulerMsg::SetAdmin { host_id, admin } => {
                state.meta.entry(host_id.clone()).or_default().admin = admin;
                state.refresh(&host_id);
            }
            SchedulerMsg::Usage { host_id, usage } => {
                if let Some(host) = state.fleet.hosts.get_mut(&host_id) {
                    host.usage = usage;
                }
            }
            SchedulerMsg::Remove { host_id } => state.remove_host(&host_id),
            SchedulerMsg::InjectPanic => panic!("injected fault in the scheduler"),
            SchedulerMsg::Snapshot(reply) => {
                let _ = reply.send(state.snapshot());
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn up(state: &mut SchedulerState, id: &str, cpu: u64, mem: u64) {
        state.host_up(
            id,
            HostInfo {
                reported: Resources {
                    cpu_millis: cpu,
                    memory_mb: mem,
                },
                runtime: "fake".into(),
                images: vec!["busybox".into()],
                ..Default::default()
            },
        );
    }

    fn req(cpu: u64, mem: u64) -> PlacementRequest {
        PlacementRequest {
            org_id: "org".into(),
            resources: Resources {
                cpu_millis: cpu,
                memory_mb: mem,
            },
            image: "busybox".into(),
            ..Default::default()
        }
    }

    #[test]
    fn reservations_never_exceed_allocatable() {
        let mut state = SchedulerState::new(SchedulingPolicy::default(), 1);
        up(&mut state, "a", 1000, 1000);
        let placed = (0..10)
            .filter(|i| state.place(&format!("s{i}"), req(300, 100)).is_ok())
            .count();
        assert_eq!(placed, 3);
        assert!(state.fleet.hosts["a"].allocated.cpu_millis <= 1000);
        state.release("s0");
        state.release("s0");
        assert_eq!(state.fleet.hosts["a"].allocated.cpu_millis, 600);
    }

    #[test]
    fn reserve_and_overcommit_shape_allocatable() {
        let policy = SchedulingPolicy {
            reserve: Resources {
                cpu_millis: 200,
                memory_mb: 0,
            },
            overcommit: 2.0,
            ..Default::default()
        };
        let mut state = SchedulerState::new(policy, 1);
        up(&mut state, "a", 1200, 1000);
        assert_eq!(state.fleet.hosts["a"].allocatable.cpu_millis, 2000);
        let placed = (0..10)
            .filter(|i| state.place(&format!("s{i}"), req(500, 10)).is_ok())
            .count();
        assert_eq!(placed, 4);
    }

    #[test]
    fn cordoned_and_disconnected_hosts_take_nothing_and_a_move_keeps_the_old_slot_on_failure() {
        let mut state = SchedulerState::new(SchedulingPolicy::default(), 1);
        up(&mut state, "a", 1000, 1000);
        up(&mut state, "b", 1000, 1000);
        assert!(state.place("s1", req(600, 100)).is_ok());
        let first = state.reservations["s1"].host_id.clone();
        let other = if first == "a" { "b" } else { "a" };
        // Move it: the other host takes it, the first is free again.
        let mut moving = req(600, 100);
        moving.exclude.insert(first.clone());
        assert_eq!(
            state.place("s1", moving.clone()).ok().as_deref(),
            Some(other)
        );
        assert_eq!(state.fleet.hosts[&first].allocated.cpu_millis, 0);
        // Nowhere to go: it keeps its reservation.
        if let Some(meta) = state.meta.get_mut(&first) {
            meta.admin = HostAdminState::Cordoned;
        }
        state.refresh(&first);
        let mut stuck = req(600, 100);
        stuck.exclude.insert(other.to_string());
        assert!(state.place("s1", stuck).is_err());
        assert_eq!(state.reservations["s1"].host_id, other);
        if let Some(meta) = state.meta.get_mut(other) {
            meta.connected = false;
        }
        state.refresh(other);
        assert!(state.place("s2", req(10, 10)).is_err());
    }

    #[test]
    fn an_org_that_requires_its_pool_gets_only_its_pool() {
        let mut state = SchedulerState::new(SchedulingPolicy::default(), 1);
        up(&mut state, "shared", 1000, 1000);
        state.host_up(
            "private",
            HostInfo {
                reported: Resources {
                    cpu_millis: 500,
                    memory_mb: 1000,
                },
                runtime: "fake".into(),
                images: vec!["busybox".into()],
                pool: Some("org".into()),
                ..Default::default()
            },
        );
        state.set_private_pool_only("org", true);
        assert_eq!(
            state.place("s1", req(400, 10)).ok().as_deref(),
            Some("private")
        );
        // The pool is full; the shared host is free but not for this org.
        assert!(matches!(
            state.place("s2", req(400, 10)),
            Err(CorralError::NoCapacity { .. })
        ));
        // Another org is unaffected.
        let mut other = req(400, 10);
        other.org_id = "other".into();
        assert_eq!(state.place("s3", other).ok().as_deref(), Some("shared"));
        // Cleared: the org may use the shared fleet again.
        state.set_private_pool_only("org", false);
        assert_eq!(
            state.place("s2", req(400, 10)).ok().as_deref(),
            Some("shared")
        );
    }

    #[test]
    fn a_request_without_a_strategy_gets_the_deployments() {
        let mut placement = Placement {
            strategy: Some(PlacementStrategy::Binpack),
            ..Default::default()
        };
        let state = SchedulerState::new(SchedulingPolicy::default(), 1);
        assert_eq!(state.strategy_for(&placement), PlacementStrategy::Binpack);
        placement.strategy = None;
        assert_eq!(state.strategy_for(&placement), PlacementStrategy::Spread);
        let binpack = SchedulerState::new(
            SchedulingPolicy {
                strategy: PlacementStrategy::Binpack,
                ..Default::default()
            },
            1,
        );
        assert_eq!(binpack.strategy_for(&placement), PlacementStrategy::Binpack);
    }
}

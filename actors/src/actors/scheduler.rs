//! The Scheduler: the control plane's view of every host's capacity and the
//! reservations taken against it. Placement and reservation happen in one
//! message, so no two concurrent creates can both take the last slot, and a
//! host is never given more than it reported (LESSONS 20, 21).
//!
//! The decision itself is the pure function [`choose_host`].

use std::collections::HashMap;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use crate::domain::Resources;
use crate::error::CorralError;

/// One host as the scheduler sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostCapacity {
    /// What the host reported it can give to sandboxes.
    pub allocatable: Resources,
    /// The sum of the reservations on it.
    pub allocated: Resources,
    /// False while the host is disconnected (or, later, cordoned).
    pub schedulable: bool,
}

impl HostCapacity {
    pub fn free(&self) -> Resources {
        Resources {
            cpu_millis: self
                .allocatable
                .cpu_millis
                .saturating_sub(self.allocated.cpu_millis),
            memory_mb: self
                .allocatable
                .memory_mb
                .saturating_sub(self.allocated.memory_mb),
        }
    }
}

/// Picks the host for `request` with the `spread` strategy: among the hosts
/// that can take it, the one left with the largest free share of its
/// tightest resource. Ties go to the lowest host id, so the choice is
/// deterministic. Returns the largest free slot when nothing fits.
pub fn choose_host<'a, I>(hosts: I, request: Resources) -> Result<&'a String, CorralError>
where
    I: IntoIterator<Item = (&'a String, &'a HostCapacity)>,
    I::IntoIter: Clone,
{
    let hosts = hosts.into_iter();
    let mut best: Option<(&String, u64)> = None;
    for (id, host) in hosts.clone() {
        if !host.schedulable {
            continue;
        }
        let free = host.free();
        if !request.fits_in(free) {
            continue;
        }
        // Free share after placement, in parts per million, of the tighter
        // of the two resources.
        let score = ppm(
            free.cpu_millis - request.cpu_millis,
            host.allocatable.cpu_millis,
        )
        .min(ppm(
            free.memory_mb - request.memory_mb,
            host.allocatable.memory_mb,
        ));
        let better = match best {
            None => true,
            Some((best_id, best_score)) => {
                score > best_score || (score == best_score && id < best_id)
            }
        };
        if better {
            best = Some((id, score));
        }
    }
    if let Some((id, _)) = best {
        return Ok(id);
    }
    // Nothing fits: say how close the best slot came. Only this path pays
    // for it (a second pass), not every placement.
    // The free slot closest to fitting the request: the one that covers the
    // largest share of its scarcer resource.
    let coverage = |free: Resources| -> u64 {
        let part = |have: u64, want: u64| {
            if want == 0 {
                u64::MAX
            } else {
                ppm(have, want)
            }
        };
        part(free.cpu_millis, request.cpu_millis).min(part(free.memory_mb, request.memory_mb))
    };
    let mut largest_free: Option<(Resources, u64)> = None;
    for (_, host) in hosts {
        if !host.schedulable {
            continue;
        }
        let free = host.free();
        let covers = coverage(free);
        if largest_free.is_none_or(|(_, l)| covers > l) {
            largest_free = Some((free, covers));
        }
    }
    let largest_free = largest_free.map(|(free, _)| free).unwrap_or_default();
    Err(CorralError::NoCapacity {
        requested_cpu_millis: u32::try_from(request.cpu_millis).unwrap_or(u32::MAX),
        requested_memory_mb: request.memory_mb,
        largest_free_cpu_millis: largest_free.cpu_millis,
        largest_free_memory_mb: largest_free.memory_mb,
    })
}

/// `part / whole` in parts per million (0 for an empty whole), in 64-bit
/// arithmetic unless `part` is too large for it: 128-bit division costs
/// several times more and placement runs it for every host.
fn ppm(part: u64, whole: u64) -> u64 {
    if whole == 0 {
        return 0;
    }
    match part.checked_mul(1_000_000) {
        Some(scaled) => scaled / whole,
        None => u64::try_from(u128::from(part) * 1_000_000 / u128::from(whole)).unwrap_or(u64::MAX),
    }
}

pub enum SchedulerMsg {
    /// Choose a host for the sandbox and reserve the resources on it.
    Place {
        sandbox_id: String,
        resources: Resources,
        reply: RpcReplyPort<Result<String, CorralError>>,
    },
    /// Give back a sandbox's reservation (idempotent).
    Release { sandbox_id: String },
    /// Re-establish a reservation known from the database (start-up).
    Restore {
        sandbox_id: String,
        host_id: String,
        resources: Resources,
    },
    /// Take back a sandbox that returned on `host_id` after it was lost:
    /// reserve for it there if it still fits; answers whether it did.
    Readmit {
        sandbox_id: String,
        host_id: String,
        resources: Resources,
        reply: RpcReplyPort<bool>,
    },
    /// A host registered (again) with this much allocatable capacity.
    HostUp {
        host_id: String,
        allocatable: Resources,
    },
    /// A host can take no new placements.
    HostDown { host_id: String },
    /// The capacity view of every host.
    Snapshot(RpcReplyPort<HashMap<String, HostCapacity>>),
    /// Fault injection for the supervision tests: panic in the handler.
    #[doc(hidden)]
    InjectPanic,
}

#[derive(Default)]
pub struct SchedulerState {
    hosts: HashMap<String, HostCapacity>,
    reservations: HashMap<String, (String, Resources)>,
}

impl SchedulerState {
    fn reserve(&mut self, sandbox_id: String, host_id: String, resources: Resources) {
        if self.reservations.contains_key(&sandbox_id) {
            return;
        }
        let host = self.hosts.entry(host_id.clone()).or_default();
        host.allocated.cpu_millis += resources.cpu_millis;
        host.allocated.memory_mb += resources.memory_mb;
        self.reservations.insert(sandbox_id, (host_id, resources));
    }

    fn release(&mut self, sandbox_id: &str) {
        if let Some((host_id, resources)) = self.reservations.remove(sandbox_id) {
            if let Some(host) = self.hosts.get_mut(&host_id) {
                host.allocated.cpu_millis = host
                    .allocated
                    .cpu_millis
                    .saturating_sub(resources.cpu_millis);
                host.allocated.memory_mb =
                    host.allocated.memory_mb.saturating_sub(resources.memory_mb);
            }
        }
    }
}

pub struct Scheduler;

impl Actor for Scheduler {
    type Msg = SchedulerMsg;
    type State = SchedulerState;
    type Arguments = ();

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        _args: (),
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(SchedulerState::default())
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            SchedulerMsg::Place {
                sandbox_id,
                resources,
                reply,
            } => {
                let result = choose_host(state.hosts.iter(), resources).cloned();
                if let Ok(host_id) = &result {
                    state.reserve(sandbox_id, host_id.clone(), resources);
                }
                let _ = reply.send(result);
            }
            SchedulerMsg::Release { sandbox_id } => state.release(&sandbox_id),
            SchedulerMsg::Restore {
                sandbox_id,
                host_id,
                resources,
            } => state.reserve(sandbox_id, host_id, resources),
            SchedulerMsg::Readmit {
                sandbox_id,
                host_id,
                resources,
                reply,
            } => {
                let already = state.reservations.contains_key(&sandbox_id);
                let fits = state
                    .hosts
                    .get(&host_id)
                    .is_some_and(|h| resources.fits_in(h.free()));
                if !already && fits {
                    state.reserve(sandbox_id, host_id, resources);
                }
                let _ = reply.send(already || fits);
            }
            SchedulerMsg::HostUp {
                host_id,
                allocatable,
            } => {
                let host = state.hosts.entry(host_id).or_default();
                host.allocatable = allocatable;
                host.schedulable = true;
            }
            SchedulerMsg::HostDown { host_id } => {
                if let Some(host) = state.hosts.get_mut(&host_id) {
                    host.schedulable = false;
                }
            }
            SchedulerMsg::InjectPanic => panic!("injected fault in the scheduler"),
            SchedulerMsg::Snapshot(reply) => {
                let _ = reply.send(state.hosts.clone());
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(cpu: u64, mem: u64, used_cpu: u64, used_mem: u64) -> HostCapacity {
        HostCapacity {
            allocatable: Resources {
                cpu_millis: cpu,
                memory_mb: mem,
            },
            allocated: Resources {
                cpu_millis: used_cpu,
                memory_mb: used_mem,
            },
            schedulable: true,
        }
    }

    fn req(cpu: u64, mem: u64) -> Resources {
        Resources {
            cpu_millis: cpu,
            memory_mb: mem,
        }
    }

    #[test]
    fn spread_prefers_the_least_loaded_host() {
        let hosts = HashMap::from([
            ("a".to_string(), host(4000, 4096, 3000, 1024)),
            ("b".to_string(), host(4000, 4096, 1000, 1024)),
        ]);
        assert_eq!(
            choose_host(hosts.iter(), req(500, 256)).ok(),
            Some(&"b".to_string())
        );
    }

    #[test]
    fn a_host_that_cannot_fit_is_never_chosen() {
        let hosts = HashMap::from([
            ("a".to_string(), host(1000, 1024, 900, 0)),
            ("b".to_string(), host(1000, 1024, 0, 1000)),
        ]);
        match choose_host(hosts.iter(), req(200, 100)) {
            Err(CorralError::NoCapacity {
                largest_free_cpu_millis,
                largest_free_memory_mb,
                ..
            }) => {
                assert_eq!(
                    (largest_free_cpu_millis, largest_free_memory_mb),
                    (100, 1024)
                );
            }
            other => panic!("expected no capacity, got {other:?}"),
        }
    }

    #[test]
    fn unschedulable_hosts_are_skipped() {
        let mut down = host(8000, 8192, 0, 0);
        down.schedulable = false;
        let hosts = HashMap::from([("a".to_string(), down)]);
        assert!(choose_host(hosts.iter(), req(100, 16)).is_err());
    }

    #[test]
    fn reservations_never_exceed_allocatable() {
        let mut state = SchedulerState::default();
        state.hosts.insert("a".into(), host(1000, 1000, 0, 0));
        let mut placed = 0;
        for i in 0..10 {
            if let Ok(h) = choose_host(state.hosts.iter(), req(300, 100)).cloned() {
                state.reserve(format!("s{i}"), h, req(300, 100));
                placed += 1;
            }
        }
        assert_eq!(placed, 3);
        assert!(state.hosts["a"].allocated.cpu_millis <= 1000);
        state.release("s0");
        state.release("s0");
        assert_eq!(state.hosts["a"].allocated.cpu_millis, 600);
    }
}

//! The HostActor: one per known host, the only writer of its row. It holds
//! the host's current connection (at most one; a newer one replaces an older
//! one and the older one's late disconnect is ignored by generation), routes
//! commands to it, supervises the SandboxActors placed on the host, and tells
//! the Scheduler when the host can or cannot take placements. A host becomes
//! schedulable only after its connection is stored (LESSONS 4).
//!
//! It also owns the host's side of reconciliation (LESSONS 15):
//! - on every (re)connect and every `reconcile_interval`, the host's
//!   inventory is compared with the database in both directions: each tracked
//!   sandbox is told what the host reports (absent included), and a container
//!   the database does not know, or knows as destroyed, is destroyed once it
//!   has been seen for `orphan_grace`;
//! - a disconnected host is `disconnected` at once (no placements) and
//!   `offline` after `offline_grace`, when its sandboxes become `lost`.
//!
//! A sandbox with nothing to do goes dormant (see the `sandbox` module):
//! the host keeps it as a [`Slot::Dormant`] and wakes an actor from its row
//! for whatever concerns it ([`HostMsg::Wake`], a report that disagrees
//! with the row, its TTL, the host going offline or being drained). While
//! an actor is being put to sleep, what concerns it waits in its slot, so
//! nothing sent through the host is lost.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use corral_proto::pb;
use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use tokio::sync::mpsc;

use super::connection::{ConnMsg, ConnectionActor, ConnectionArgs, HostReply};
use super::fleet::FleetMsg;
use super::sandbox::{Dormant, SandboxActor, SandboxArgs, SandboxMsg, SandboxReply, DORMANT};
use super::scheduler::{HostInfo, SchedulerMsg};
use super::supervision::{RestartBudget, RestartPolicy};
use super::{names, Timeouts};
use crate::domain::{HostAdminState, HostState, Resources, SandboxState};
use crate::error::CorralError;
use crate::mailbox::{self, Tell};
use crate::metrics::Metrics;
use crate::store::{sandbox, HostRegistration, Store};

pub enum HostMsg {
    /// The agent opened a stream and registered.
    Connected {
        registration: HostRegistration,
        inventory: Vec<pb::SandboxStatus>,
        outbound: mpsc::Sender<pb::ControlMessage>,
        reply: RpcReplyPort<Result<ActorRef<ConnMsg>, CorralError>>,
    },
    /// Connection `generation` ended.
    Disconnected {
        generation: u64,
    },
    /// The grace of the disconnect that ended `generation` ran out.
    OfflineDeadline {
        generation: u64,
    },
    /// Send a command over the current connection.
    Dispatch {
        payload: pb::control_message::Payload,
        timeout: Duration,
        reply: RpcReplyPort<HostReply>,
        /// W3C context of the caller's span, sent in the envelope.
        trace: Option<pb::TraceContext>,
    },
    /// Start the actor of a sandbox placed on this host.
    SpawnSandbox {
        row: sandbox::Model,
        insert: bool,
        /// Answered with the outcome of the sandbox's first convergence.
        waiter: Option<RpcReplyPort<SandboxReply>>,
        /// The creator's span (`Span::none()` for a restore).
        span: tracing::Span,
        reply: Option<RpcReplyPort<Result<ActorRef<SandboxMsg>, CorralError>>>,
    },
    Heartbeat(pb::Heartbeat),
    AgentEvent(pb::SandboxEvent),
    /// Time to ask the host for its inventory.
    ReconcileTick,
    /// The host's inventory, as asked at `as_of` on connection `generation`.
    Inventory {
        generation: u64,
        as_of: Instant,
        sandboxes: Vec<pb::SandboxStatus>,
    },
    /// An orphan container was destroyed (or could not be).
    OrphanCollected {
        sandbox_id: String,
        ok: bool,
    },
    /// Start the actor of a sandbox that moved here from another host
    /// (a new placement of the same sandbox), with the hosts that already
    /// failed it.
    Relocated {
        row: sandbox::Model,
        tried: std::collections::BTreeSet<String>,
        waiter: Option<RpcReplyPort<SandboxReply>>,
    },
    /// Operators changed the host's state; answers with the saved row.
    SetAdmin {
        admin: HostAdminState,
        /// For a drain: how long each stopping sandbox gets to exit before
        /// it is killed (default: the server's stop grace).
        drain_deadline: Option<Duration>,
        reply: RpcReplyPort<Result<crate::store::host::Model, CorralError>>,
    },
    /// The actor of a sandbox of this host, woken from its row if it is
    /// dormant (or has no actor, as one its supervisor gave up on).
    Wake {
        sandbox_id: String,
        reply: RpcReplyPort<Result<ActorRef<SandboxMsg>, CorralError>>,
    },
    /// A sandbox of this host read from the database at start-up: held
    /// dormant if it has nothing to do, else its actor starts.
    Restore {
        row: sandbox::Model,
    },
    /// The sandbox's actor `actor` has had nothing to do for a while.
    Resting {
        sandbox_id: String,
        actor: ActorId,
        dormant: Dormant,
    },
    /// The sandbox's actor, told to sleep, had something to do after all.
    StayedAwake {
        sandbox_id: String,
        actor: ActorId,
    },
    /// The TTL of a dormant sandbox ran out.
    Expire {
        sandbox_id: String,
    },
    /// Fault injection for the supervision tests: panic in the handler.
    #[doc(hidden)]
    InjectPanic,
}

/// A sandbox placed on this host, as the host holds it.
enum Slot {
    /// Its actor runs.
    Awake(ActorRef<SandboxMsg>),
    /// Its actor was told to sleep; what concerns the sandbox meanwhile
    /// waits here until it has stopped (or stayed awake).
    Falling {
        actor: ActorRef<SandboxMsg>,
        dormant: Dormant,
        waiting: Vec<Waiting>,
    },
    /// No actor.
    Dormant {
        dormant: Dormant,
        _held: DormantHold,
    },
}

/// Something for a sandbox whose actor is falling asleep.
enum Waiting {
    Deliver(SandboxMsg),
    Wake(RpcReplyPort<Result<ActorRef<SandboxMsg>, CorralError>>),
}

/// What a dormant sandbox holds while it is dormant, and lets go of
/// however its slot ends (woken, or the host actor gone): its place in
/// `corral_sandboxes_dormant`, and the timer that wakes it when its TTL
/// runs out.
struct DormantHold {
    metrics: Metrics,
    ttl: Option<tokio::task::AbortHandle>,
}

impl Drop for DormantHold {
    fn drop(&mut self) {
        self.metrics
            .timings
            .dormant_sandboxes
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        if let Some(ttl) = &self.ttl {
            ttl.abort();
        }
    }
}

pub struct HostArgs {
    pub host_id: String,
    pub store: Store,
    pub scheduler: ActorRef<SchedulerMsg>,
    pub orgs: ActorRef<super::ledger::OrgsMsg>,
    pub timeouts: Timeouts,
    pub prefix: String,
    pub metrics: Metrics,
    /// Where a sandbox that moves to another host goes.
    pub fleet: ActorRef<FleetMsg>,
    /// Hosts a create is tried on before it fails.
    pub max_create_attempts: u32,
}

pub struct HostActorState {
    /// Counts this actor's mailbox while the actor lives (see `mailbox`).
    _mailbox: mailbox::Open,
    args: HostArgs,
    connection: Option<(u64, ActorRef<ConnMsg>)>,
    generation: u64,
    sandboxes: HashMap<String, Slot>,
    by_actor: HashMap<ActorId, String>,
    restarts: RestartBudget<String>,
    /// Containers on the host that no sandbox row accounts for, with when
    /// they were first seen.
    orphans: HashMap<String, Instant>,
    /// Orphans with a destroy in flight.
    collecting: HashMap<String, Instant>,
    inventory_in_flight: bool,
}

impl HostActorState {
    /// The ids of the sandboxes on this host, whatever their slot (to go
    /// through while the slots change).
    fn held(&self) -> Vec<String> {
        self.sandboxes.keys().cloned().collect()
    }
}

pub struct HostActor;

impl Actor for HostActor {
    type Msg = HostMsg;
    type State = HostActorState;
    type Arguments = HostArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: HostArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let mailbox = mailbox::open(myself.get_id(), "host");
        myself.tell_every(args.timeouts.reconcile_interval, || HostMsg::ReconcileTick);
        // A host that is not connected when its actor starts (control-plane
        // start, actor restart) goes offline unless it dials in in time.
        myself.tell_after(args.timeouts.offline_grace, || HostMsg::OfflineDeadline {
            generation: 0,
        });
        Ok(HostActorState {
            _mailbox: mailbox,
            args,
            connection: None,
            generation: 0,
            sandboxes: HashMap::new(),
            by_actor: HashMap::new(),
            restarts: RestartBudget::new(RestartPolicy::default()),
            orphans: HashMap::new(),
            collecting: HashMap::new(),
            inventory_in_flight: false,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        mailbox::took(myself.get_id());
        match message {
            HostMsg::Connected {
                registration,
                inventory,
                outbound,
                reply,
            } => {
                let result = self
                    .connect(&myself, state, registration, inventory, outbound)
                    .await;
                let _ = reply.send(result);
            }
            HostMsg::Disconnected { generation } => {
                self.disconnected(&myself, state, generation).await;
            }
            HostMsg::OfflineDeadline { generation } => {
                if state.connection.is_none() && state.generation == generation {
                    self.offline(&myself, state).await;
                }
            }
            HostMsg::Dispatch {
                payload,
                timeout,
                reply,
                trace,
            } => dispatch(state, payload, timeout, reply, trace),
            HostMsg::SpawnSandbox {
                row,
                insert,
                waiter,
                reply,
                span,
            } => {
                let result = self
                    .spawn_sandbox(&myself, state, row, insert, waiter, span)
                    .await;
                if let Some(reply) = reply {
                    let _ = reply.send(result);
                }
            }
            HostMsg::Heartbeat(heartbeat) => {
                if let Some(usage) = heartbeat.usage {
                    let _ = state.args.scheduler.tell(SchedulerMsg::Usage {
                        host_id: state.args.host_id.clone(),
                        usage: Resources {
                            cpu_millis: u64::from(usage.cpu_millis),
                            memory_mb: usage.memory_mb,
                        },
                    });
                }
            }
            HostMsg::Relocated { row, tried, waiter } => {
                let id = row.id.clone();
                if let Err(err) = self
                    .spawn_sandbox_with(
                        &myself,
                        state,
                        row,
                        false,
                        Creator {
                            waiter,
                            tried,
                            span: tracing::Span::none(),
                        },
                    )
                    .await
                {
                    tracing::error!(host.id = %state.args.host_id, sandbox.id = %id, error = %err, "could not start the actor of a moved sandbox");
                }
            }
            HostMsg::SetAdmin {
                admin,
                drain_deadline,
                reply,
            } => {
                let result = self.set_admin(&myself, state, admin, drain_deadline).await;
                let _ = reply.send(result);
            }
            HostMsg::AgentEvent(event) => {
                let Some(status) = event.status else {
                    return Ok(());
                };
                if state.sandboxes.contains_key(&status.sandbox_id) {
                    self.observed(&myself, state, status, event.reason, Instant::now())
                        .await;
                } else {
                    tracing::warn!(host.id = %state.args.host_id, sandbox.id = %status.sandbox_id, "event about a sandbox this host does not hold");
                }
            }
            HostMsg::Wake { sandbox_id, reply } => {
                if let Some(Slot::Falling { waiting, .. }) = state.sandboxes.get_mut(&sandbox_id) {
                    waiting.push(Waiting::Wake(reply));
                } else {
                    let _ = reply.send(self.wake(&myself, state, &sandbox_id).await);
                }
            }
            HostMsg::Restore { row } => self.restore(&myself, state, row).await,
            HostMsg::Resting {
                sandbox_id,
                actor,
                dormant,
            } => {
                let slot = state.sandboxes.remove(&sandbox_id);
                let slot = match slot {
                    Some(Slot::Awake(sandbox)) if sandbox.get_id() == actor => {
                        let _ = sandbox.tell(SandboxMsg::Sleep);
                        Some(Slot::Falling {
                            actor: sandbox,
                            dormant,
                            waiting: Vec::new(),
                        })
                    }
                    other => other,
                };
                if let Some(slot) = slot {
                    state.sandboxes.insert(sandbox_id, slot);
                }
            }
            HostMsg::StayedAwake { sandbox_id, actor } => {
                if let Some(Slot::Falling { actor: sandbox, .. }) = state.sandboxes.get(&sandbox_id)
                {
                    if sandbox.get_id() == actor {
                        let sandbox = sandbox.clone();
                        if let Some(Slot::Falling { waiting, .. }) = state
                            .sandboxes
                            .insert(sandbox_id, Slot::Awake(sandbox.clone()))
                        {
                            hand_over(&sandbox, waiting);
                        }
                    }
                }
            }
            HostMsg::Expire { sandbox_id } => {
                if matches!(state.sandboxes.get(&sandbox_id), Some(Slot::Dormant { .. })) {
                    self.deliver(&myself, state, &sandbox_id, SandboxMsg::Expire)
                        .await;
                }
            }
            HostMsg::ReconcileTick => self.request_inventory(&myself, state),
            HostMsg::Inventory {
                generation,
                as_of,
                sandboxes,
            } => {
                state.inventory_in_flight = false;
                if state.connection.as_ref().map(|(g, _)| *g) == Some(generation) {
                    self.reconcile(&myself, state, sandboxes, as_of).await;
                }
            }
            HostMsg::OrphanCollected { sandbox_id, ok } => {
                state.collecting.remove(&sandbox_id);
                if ok {
                    state.orphans.remove(&sandbox_id);
                    state.args.metrics.orphans_collected.inc();
                    tracing::info!(host.id = %state.args.host_id, sandbox.id = %sandbox_id, "orphan container destroyed");
                }
            }
            HostMsg::InjectPanic => panic!("injected fault in host {}", state.args.host_id),
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<Self::Msg>,
        event: SupervisionEvent,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match event {
            SupervisionEvent::ActorTerminated(cell, _, reason) => {
                state.args.metrics.registry.gone(&cell);
                if let Some(id) = state.by_actor.remove(&cell.get_id()) {
                    state.restarts.forget(&id);
                    match state.sandboxes.remove(&id) {
                        Some(Slot::Falling {
                            dormant, waiting, ..
                        }) if reason.as_deref() == Some(DORMANT) => {
                            self.fell_asleep(&myself, state, id, dormant, waiting).await;
                        }
                        // Those waiting on a sandbox that was destroyed or
                        // moved see their reply dropped and look again.
                        Some(_) | None => {}
                    }
                }
            }
            SupervisionEvent::ActorFailed(cell, error) => {
                if let Some(id) = state.by_actor.remove(&cell.get_id()) {
                    state.sandboxes.remove(&id);
                    state
                        .args
                        .metrics
                        .actor_failed("sandbox", &cell, &error.to_string());
                    self.restart_sandbox(&myself, state, &id, &error.to_string())
                        .await;
                } else if let Some((generation, conn)) = &state.connection {
                    if conn.get_id() == cell.get_id() {
                        // Its pending requests failed with it (their reply
                        // ports dropped); the agent redials.
                        tracing::error!(host.id = %state.args.host_id, %error, "connection actor failed");
                        state
                            .args
                            .metrics
                            .actor_failed("connection", &cell, &error.to_string());
                        let generation = *generation;
                        self.disconnected(&myself, state, generation).await;
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }
}

/// Hands a command to the current connection, or fails it at once.
fn dispatch(
    state: &HostActorState,
    payload: pb::control_message::Payload,
    timeout: Duration,
    reply: RpcReplyPort<HostReply>,
    trace: Option<pb::TraceContext>,
) {
    match &state.connection {
        Some((_, conn)) => {
            if let Err(ractor::MessagingErr::SendErr(ConnMsg::Request { reply, .. })) =
                conn.tell(ConnMsg::Request {
                    payload,
                    timeout,
                    reply,
                    trace,
                })
            {
                let _ = reply.send(Err(CorralError::HostDisconnected));
            }
        }
        None => {
            let _ = reply.send(Err(CorralError::HostUnavailable));
        }
    }
}

/// What to do with a container the host reports that no live sandbox actor
/// of this host accounts for, given its row (if any).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unaccounted {
    /// A live sandbox of this host whose actor is missing: start its actor.
    Adopt,
    /// Unknown, destroyed, or placed on another host: an orphan.
    Orphan,
}

pub fn classify_unaccounted(row: Option<&sandbox::Model>, host_id: &str) -> Unaccounted {
    match row {
        Some(row)
            if row.host_id.as_deref() == Some(host_id)
                && row.state != SandboxState::Destroyed.as_str() =>
        {
            Unaccounted::Adopt
        }
        _ => Unaccounted::Orphan,
    }
}

/// Who is waiting on a sandbox actor being started, and what its placement
/// already learned.
struct Creator {
    /// Answered with the outcome of the first convergence.
    waiter: Option<RpcReplyPort<SandboxReply>>,
    /// Hosts that already failed (or lost) this sandbox.
    tried: std::collections::BTreeSet<String>,
    /// The creator's span: the first convergence joins its trace.
    span: tracing::Span,
}

impl HostActor {
    async fn connect(
        &self,
        myself: &ActorRef<HostMsg>,
        state: &mut HostActorState,
        registration: HostRegistration,
        inventory: Vec<pb::SandboxStatus>,
        outbound: mpsc::Sender<pb::ControlMessage>,
    ) -> Result<ActorRef<ConnMsg>, CorralError> {
        let host_id = state.args.host_id.clone();
        // The row first: a host is only visible once it is persisted, and the
        // write does not depend on the stream's lifetime (LESSONS 8).
        let row = state
            .args
            .store
            .upsert_host(&host_id, &registration)
            .await?;
        if let Some((_, old)) = state.connection.take() {
            old.stop(Some("replaced by a new connection".into()));
        }
        state.generation += 1;
        let (conn, _) = ractor::Actor::spawn_linked(
            Some(names::connection(
                &state.args.prefix,
                &host_id,
                state.generation,
            )),
            ConnectionActor,
            ConnectionArgs {
                host_id: host_id.clone(),
                generation: state.generation,
                outbound,
                host: myself.clone(),
                heartbeat_interval: state.args.timeouts.heartbeat_interval,
                metrics: state.args.metrics.clone(),
            },
            myself.get_cell(),
        )
        .await
        .map_err(|e| CorralError::Internal(format!("spawn connection: {e}")))?;
        state.args.metrics.registry.started(&conn.get_cell(), None);
        state.connection = Some((state.generation, conn.clone()));
        let _ = state.args.scheduler.tell(SchedulerMsg::HostUp {
            host_id: host_id.clone(),
            info: HostInfo {
                reported: Resources {
                    cpu_millis: registration.cpu_millis,
                    memory_mb: registration.memory_mb,
                },
                labels: registration.labels.clone(),
                runtime: registration.runtime.clone(),
                images: registration.images.clone(),
                pool: row.org_id.clone(),
                admin: Some(HostAdminState::parse(&row.admin_state).unwrap_or_default()),
            },
        });
        tracing::info!(host.id = %host_id, generation = state.generation, runtime = %registration.runtime, "host connected");
        self.reconcile(myself, state, inventory, Instant::now())
            .await;
        Ok(conn)
    }

    /// Asks the connected host for its inventory; the answer comes back as
    /// [`HostMsg::Inventory`]. At most one request is in flight.
    fn request_inventory(&self, myself: &ActorRef<HostMsg>, state: &mut HostActorState) {
        let Some((generation, _)) = state.connection.as_ref() else {
            return;
        };
        if state.inventory_in_flight {
            return;
        }
        state.inventory_in_flight = true;
        let generation = *generation;
        let as_of = Instant::now();
        let (tx, rx) = tokio::sync::oneshot::channel();
        dispatch(
            state,
            pb::control_message::Payload::Inventory(pb::InventoryRequest {}),
            state.args.timeouts.destroy,
            tx.into(),
            None,
        );
        let myself = myself.clone();
        let host_id = state.args.host_id.clone();
        tokio::spawn(async move {
            let sandboxes = match rx.await {
                Ok(Ok(pb::reply::Result::Inventory(inventory))) => inventory.sandboxes,
                Ok(Ok(_)) | Ok(Err(_)) | Err(_) => {
                    tracing::debug!(host.id = %host_id, "no inventory this round");
                    // Still answer, so the next round is not blocked; a stale
                    // generation is ignored.
                    let _ = myself.tell(HostMsg::Inventory {
                        generation: u64::MAX,
                        as_of,
                        sandboxes: Vec::new(),
                    });
                    return;
                }
            };
            let _ = myself.tell(HostMsg::Inventory {
                generation,
                as_of,
                sandboxes,
            });
        });
    }

    /// Compares what the host holds with what the control plane believes it
    /// holds, both ways.
    async fn reconcile(
        &self,
        myself: &ActorRef<HostMsg>,
        state: &mut HostActorState,
        inventory: Vec<pb::SandboxStatus>,
        as_of: Instant,
    ) {
        let host_id = state.args.host_id.clone();
        let mut reported: HashMap<String, pb::SandboxStatus> = inventory
            .into_iter()
            .map(|s| (s.sandbox_id.clone(), s))
            .collect();
        let held = state.held();
        for id in held {
            let status = reported.remove(&id).unwrap_or(pb::SandboxStatus {
                sandbox_id: id,
                phase: pb::SandboxPhase::Absent as i32,
                ..Default::default()
            });
            self.observed(myself, state, status, "inventory".into(), as_of)
                .await;
        }
        // What is left has no actor here: adopt it or treat it as an orphan.
        let now = Instant::now();
        let mut new_orphans = false;
        state.orphans.retain(|id, _| reported.contains_key(id));
        for id in reported.keys() {
            if state.orphans.contains_key(id) || state.collecting.contains_key(id) {
                continue;
            }
            let row = match state.args.store.get_sandbox_any_org(id).await {
                Ok(row) => row,
                Err(err) => {
                    tracing::warn!(host.id = %host_id, error = %err, "cannot check an unaccounted container now");
                    continue;
                }
            };
            match classify_unaccounted(row.as_ref(), &host_id) {
                Unaccounted::Adopt => {
                    if let Some(row) = row {
                        if let Err(err) = self
                            .spawn_sandbox(myself, state, row, false, None, tracing::Span::none())
                            .await
                        {
                            tracing::error!(host.id = %host_id, sandbox.id = %id, error = %err, "could not start the actor of a known sandbox");
                        }
                    }
                }
                Unaccounted::Orphan => {
                    tracing::warn!(host.id = %host_id, sandbox.id = %id, grace = ?state.args.timeouts.orphan_grace, "the host holds a container the control plane does not account for");
                    state.args.metrics.drift_orphans.inc();
                    state.orphans.insert(id.clone(), now);
                    new_orphans = true;
                }
            }
        }
        if new_orphans {
            // Look again when they are due, not only at the next round.
            myself.tell_after(state.args.timeouts.orphan_grace, || HostMsg::ReconcileTick);
        }
        self.collect_orphans(myself, state);
    }

    /// Destroys orphans that outlived their grace.
    fn collect_orphans(&self, myself: &ActorRef<HostMsg>, state: &mut HostActorState) {
        let grace = state.args.timeouts.orphan_grace;
        let due: Vec<String> = state
            .orphans
            .iter()
            .filter(|(id, seen)| seen.elapsed() >= grace && !state.collecting.contains_key(*id))
            .map(|(id, _)| id.clone())
            .collect();
        for id in due {
            state.collecting.insert(id.clone(), Instant::now());
            let (tx, rx) = tokio::sync::oneshot::channel();
            dispatch(
                state,
                pb::control_message::Payload::Destroy(pb::DestroySandbox {
                    sandbox_id: id.clone(),
                }),
                state.args.timeouts.destroy,
                tx.into(),
                None,
            );
            let myself = myself.clone();
            tokio::spawn(async move {
                let ok = matches!(rx.await, Ok(Ok(_)));
                let _ = myself.tell(HostMsg::OrphanCollected { sandbox_id: id, ok });
            });
        }
    }

    async fn disconnected(
        &self,
        myself: &ActorRef<HostMsg>,
        state: &mut HostActorState,
        generation: u64,
    ) {
        let current = matches!(&state.connection, Some((g, _)) if *g == generation);
        if !current {
            return;
        }
        state.connection = None;
        state.inventory_in_flight = false;
        state.collecting.clear();
        let host_id = state.args.host_id.clone();
        tracing::warn!(host.id = %host_id, generation, grace = ?state.args.timeouts.offline_grace, "host disconnected");
        let _ = state.args.scheduler.tell(SchedulerMsg::HostDown {
            host_id: host_id.clone(),
        });
        if let Err(err) = state
            .args
            .store
            .set_host_state(&host_id, HostState::Disconnected)
            .await
        {
            tracing::error!(host.id = %host_id, error = %err, "could not record the disconnect");
        }
        myself.tell_after(state.args.timeouts.offline_grace, move || {
            HostMsg::OfflineDeadline { generation }
        });
    }

    /// The grace ran out: the host is `offline` and its sandboxes `lost`.
    async fn offline(&self, myself: &ActorRef<HostMsg>, state: &mut HostActorState) {
        let host_id = state.args.host_id.clone();
        match state.args.store.get_host(&host_id).await {
            Ok(Some(row)) if row.state == HostState::Offline.as_str() => {}
            Ok(_) => {
                tracing::warn!(host.id = %host_id, "host offline: its grace ran out");
                state.args.metrics.hosts_offline.inc();
                if let Err(err) = state
                    .args
                    .store
                    .set_host_state(&host_id, HostState::Offline)
                    .await
                {
                    tracing::error!(host.id = %host_id, error = %err, "could not record the host offline");
                }
            }
            Err(err) => {
                tracing::error!(host.id = %host_id, error = %err, "could not read the host row");
            }
        }
        let held = state.held();
        for id in held {
            self.deliver(myself, state, &id, SandboxMsg::HostOffline)
                .await;
        }
    }

    /// Records an operator decision and applies it: the scheduler stops
    /// (or resumes) placing here, and a drain moves or stops every sandbox
    /// on the host according to its restart policy.
    async fn set_admin(
        &self,
        myself: &ActorRef<HostMsg>,
        state: &mut HostActorState,
        admin: HostAdminState,
        drain_deadline: Option<Duration>,
    ) -> Result<crate::store::host::Model, CorralError> {
        let host_id = state.args.host_id.clone();
        let row = state.args.store.set_host_admin(&host_id, admin).await?;
        let _ = state.args.scheduler.tell(SchedulerMsg::SetAdmin {
            host_id: host_id.clone(),
            admin,
        });
        tracing::info!(host.id = %host_id, admin = %admin, "host state changed by an operator");
        if admin == HostAdminState::Draining {
            let grace = drain_deadline.unwrap_or(state.args.timeouts.stop_grace);
            let held = state.held();
            for id in held {
                self.deliver(myself, state, &id, SandboxMsg::Drain { grace })
                    .await;
            }
        }
        Ok(row)
    }

    async fn restart_sandbox(
        &self,
        myself: &ActorRef<HostMsg>,
        state: &mut HostActorState,
        id: &str,
        error: &str,
    ) {
        let row = match state.args.store.get_sandbox_any_org(id).await {
            Ok(Some(row)) => row,
            Ok(None) => return,
            Err(err) => {
                // Without its row it cannot be restarted now; the next
                // inventory round adopts it again.
                tracing::error!(sandbox.id = %id, error = %err, "could not reload a failed sandbox actor's row");
                return;
            }
        };
        if state
            .restarts
            .allow_restart(&id.to_string(), Instant::now())
        {
            tracing::error!(sandbox.id = %id, %error, "sandbox actor failed; restarting it from its row");
            if let Err(err) = self
                .spawn_sandbox(myself, state, row, false, None, tracing::Span::none())
                .await
            {
                tracing::error!(sandbox.id = %id, error = %err, "could not restart sandbox actor");
            }
            return;
        }
        // Restarting does not help: give this sandbox up rather than take
        // the host down with it. Its actor is gone, so this is the last write.
        tracing::error!(sandbox.id = %id, %error, "sandbox actor keeps failing; marking the sandbox failed");
        let mut row = row;
        row.state = SandboxState::Failed.as_str().to_string();
        row.failure_reason = Some(
            "the control plane could not manage this sandbox (its actor failed repeatedly)".into(),
        );
        row.updated_at = chrono::Utc::now();
        if let Err(err) = state.args.store.save_sandbox(row).await {
            tracing::error!(sandbox.id = %id, error = %err, "could not mark the sandbox failed");
        }
        let _ = state.args.scheduler.tell(SchedulerMsg::Release {
            sandbox_id: id.to_string(),
        });
    }

    async fn spawn_sandbox(
        &self,
        myself: &ActorRef<HostMsg>,
        state: &mut HostActorState,
        row: sandbox::Model,
        insert: bool,
        waiter: Option<RpcReplyPort<SandboxReply>>,
        span: tracing::Span,
    ) -> Result<ActorRef<SandboxMsg>, CorralError> {
        let creator = Creator {
            waiter,
            tried: Default::default(),
            span,
        };
        self.spawn_sandbox_with(myself, state, row, insert, creator)
            .await
    }

    async fn spawn_sandbox_with(
        &self,
        myself: &ActorRef<HostMsg>,
        state: &mut HostActorState,
        row: sandbox::Model,
        insert: bool,
        creator: Creator,
    ) -> Result<ActorRef<SandboxMsg>, CorralError> {
        let Creator {
            waiter,
            tried,
            span,
        } = creator;
        let id = row.id.clone();
        let org_id = row.org_id.clone();
        match state.sandboxes.get(&id) {
            Some(Slot::Awake(actor) | Slot::Falling { actor, .. }) => return Ok(actor.clone()),
            // Every caller read `row` after the sandbox fell asleep (a
            // restore, a restart, a wake), so it is the latest.
            Some(Slot::Dormant { .. }) => {
                state.sandboxes.remove(&id);
            }
            None => {}
        }
        let name = names::sandbox(&state.args.prefix, &id);
        super::await_name_free(&name).await;
        let (actor, _) = ractor::Actor::spawn_linked(
            Some(name),
            SandboxActor,
            SandboxArgs {
                row,
                insert,
                store: state.args.store.clone(),
                host: myself.clone(),
                scheduler: state.args.scheduler.clone(),
                orgs: state.args.orgs.clone(),
                timeouts: state.args.timeouts.clone(),
                metrics: state.args.metrics.clone(),
                waiter,
                span,
                fleet: state.args.fleet.clone(),
                max_create_attempts: state.args.max_create_attempts,
                tried,
            },
            myself.get_cell(),
        )
        .await
        .map_err(|e| match e {
            ractor::SpawnErr::StartupFailed(inner) => {
                // The row could not be written: nothing was sent anywhere.
                CorralError::Database(inner.to_string())
            }
            other => CorralError::Internal(format!("spawn sandbox actor: {other}")),
        })?;
        state
            .args
            .metrics
            .registry
            .started(&actor.get_cell(), Some(&org_id));
        state.by_actor.insert(actor.get_id(), id.clone());
        state.sandboxes.insert(id, Slot::Awake(actor.clone()));
        Ok(actor)
    }

    /// A sandbox's report (an event, or part of an inventory taken at
    /// `as_of`) goes to its actor; a dormant sandbox is woken only if the
    /// report disagrees with its row.
    async fn observed(
        &self,
        myself: &ActorRef<HostMsg>,
        state: &mut HostActorState,
        status: pb::SandboxStatus,
        reason: String,
        as_of: Instant,
    ) {
        if let Some(Slot::Dormant { dormant, .. }) = state.sandboxes.get(&status.sandbox_id) {
            if !dormant.concerned_by(&status, as_of) {
                return;
            }
        }
        let id = status.sandbox_id.clone();
        let message = SandboxMsg::Observed {
            status,
            reason,
            as_of,
        };
        self.deliver(myself, state, &id, message).await;
    }

    /// Sends `message` to the sandbox's actor, waking it if it is dormant
    /// or holding it while it falls asleep.
    async fn deliver(
        &self,
        myself: &ActorRef<HostMsg>,
        state: &mut HostActorState,
        id: &str,
        message: SandboxMsg,
    ) {
        match state.sandboxes.get_mut(id) {
            Some(Slot::Awake(actor)) => {
                let _ = actor.tell(message);
            }
            Some(Slot::Falling { waiting, .. }) => waiting.push(Waiting::Deliver(message)),
            Some(Slot::Dormant { .. }) => match self.wake(myself, state, id).await {
                Ok(actor) => {
                    let _ = actor.tell(message);
                }
                Err(err) => {
                    tracing::error!(host.id = %state.args.host_id, sandbox.id = %id, error = %err, "could not wake a dormant sandbox");
                }
            },
            None => {}
        }
    }

    /// The actor of a sandbox of this host, started from its row unless it
    /// runs (the row is read here, after any earlier actor of it stopped,
    /// so it is the latest). A sandbox whose row is gone, destroyed or
    /// placed elsewhere is not this host's: not found.
    async fn wake(
        &self,
        myself: &ActorRef<HostMsg>,
        state: &mut HostActorState,
        id: &str,
    ) -> Result<ActorRef<SandboxMsg>, CorralError> {
        if let Some(Slot::Awake(actor) | Slot::Falling { actor, .. }) = state.sandboxes.get(id) {
            return Ok(actor.clone());
        }
        let row = state.args.store.get_sandbox_any_org(id).await?;
        // Its hold (count, timer) goes with the slot.
        if let Some(Slot::Dormant { .. }) = state.sandboxes.remove(id) {
            state.args.metrics.sandboxes_woken.inc();
        }
        match row {
            Some(row)
                if classify_unaccounted(Some(&row), &state.args.host_id) == Unaccounted::Adopt =>
            {
                let creator = Creator {
                    waiter: None,
                    tried: Default::default(),
                    span: tracing::Span::none(),
                };
                self.spawn_sandbox_with(myself, state, row, false, creator)
                    .await
            }
            _ => Err(CorralError::NotFound("sandbox")),
        }
    }

    /// A sandbox read at start-up: dormant if it has nothing to do (and
    /// sandboxes may be), else its actor starts and converges.
    async fn restore(
        &self,
        myself: &ActorRef<HostMsg>,
        state: &mut HostActorState,
        row: sandbox::Model,
    ) {
        if state.sandboxes.contains_key(&row.id) {
            return;
        }
        if state.args.timeouts.dormant_after.is_some() {
            // Its last change was when the row was written, not now.
            if let Some(dormant) = Dormant::of(&row, super::sandbox::written_at(&row)) {
                let held = self.hold(myself, state, &row.id, &dormant);
                state.sandboxes.insert(
                    row.id,
                    Slot::Dormant {
                        dormant,
                        _held: held,
                    },
                );
                return;
            }
        }
        let id = row.id.clone();
        if let Err(err) = self
            .spawn_sandbox(myself, state, row, false, None, tracing::Span::none())
            .await
        {
            tracing::error!(host.id = %state.args.host_id, sandbox.id = %id, error = %err, "could not start the actor of a restored sandbox");
        }
    }

    /// The actor of sandbox `id` stopped to go dormant: the sandbox rests
    /// here, and is woken at once if something came for it meanwhile.
    async fn fell_asleep(
        &self,
        myself: &ActorRef<HostMsg>,
        state: &mut HostActorState,
        id: String,
        dormant: Dormant,
        mut waiting: Vec<Waiting>,
    ) {
        // Reports that agree with where it rests need no actor.
        waiting.retain(|waited| match waited {
            Waiting::Deliver(SandboxMsg::Observed { status, as_of, .. }) => {
                dormant.concerned_by(status, *as_of)
            }
            _ => true,
        });
        state.args.metrics.sandboxes_slept.inc();
        let held = self.hold(myself, state, &id, &dormant);
        state.sandboxes.insert(
            id.clone(),
            Slot::Dormant {
                dormant,
                _held: held,
            },
        );
        if waiting.is_empty() {
            return;
        }
        match self.wake(myself, state, &id).await {
            Ok(actor) => hand_over(&actor, waiting),
            // Those waiting see their reply dropped; messages of the
            // host's own are sent again by the next round.
            Err(err) => {
                tracing::error!(host.id = %state.args.host_id, sandbox.id = %id, error = %err, "could not wake a sandbox that was wanted while it fell asleep");
            }
        }
    }

    /// Counts sandbox `id` dormant and sets what wakes it when its TTL
    /// runs out.
    fn hold(
        &self,
        myself: &ActorRef<HostMsg>,
        state: &HostActorState,
        id: &str,
        dormant: &Dormant,
    ) -> DormantHold {
        let metrics = state.args.metrics.clone();
        metrics
            .timings
            .dormant_sandboxes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let ttl = dormant.expires_at.map(|expires_at| {
            let delay = (expires_at - chrono::Utc::now())
                .to_std()
                .unwrap_or_default();
            let sandbox_id = id.to_string();
            myself
                .tell_after(delay, move || HostMsg::Expire { sandbox_id })
                .abort_handle()
        });
        DormantHold { metrics, ttl }
    }
}

/// The actor of the sandbox of `row`, by its registered name or woken by
/// the host the row names (if it is dormant, or its supervisor gave it up).
pub async fn sandbox_actor(
    prefix: &str,
    row: &sandbox::Model,
) -> Result<ActorRef<SandboxMsg>, CorralError> {
    if let Some(cell) = ractor::registry::where_is(names::sandbox(prefix, &row.id)) {
        return Ok(cell.into());
    }
    wake_sandbox(prefix, row).await
}

/// Asks the host the row names for the sandbox's actor ([`HostMsg::Wake`]).
pub async fn wake_sandbox(
    prefix: &str,
    row: &sandbox::Model,
) -> Result<ActorRef<SandboxMsg>, CorralError> {
    let host_id = row.host_id.as_deref().ok_or(CorralError::HostUnavailable)?;
    let host: ActorRef<HostMsg> = ractor::registry::where_is(names::host(prefix, host_id))
        .ok_or(CorralError::HostUnavailable)?
        .into();
    let sandbox_id = row.id.clone();
    match host
        .ask(
            |reply| HostMsg::Wake { sandbox_id, reply },
            Some(Duration::from_secs(10)),
        )
        .await
    {
        Ok(ractor::rpc::CallResult::Success(result)) => result,
        _ => Err(CorralError::HostUnavailable),
    }
}

/// Gives what waited for a sandbox's actor to that actor.
fn hand_over(actor: &ActorRef<SandboxMsg>, waiting: Vec<Waiting>) {
    for waited in waiting {
        match waited {
            Waiting::Deliver(message) => {
                let _ = actor.tell(message);
            }
            Waiting::Wake(reply) => {
                let _ = reply.send(Ok(actor.clone()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(host: &str, state: SandboxState) -> sandbox::Model {
        sandbox::Model::for_test("org_1", host, state)
    }

    #[test]
    fn unknown_destroyed_or_foreign_containers_are_orphans() {
        assert_eq!(classify_unaccounted(None, "h1"), Unaccounted::Orphan);
        assert_eq!(
            classify_unaccounted(Some(&row("h1", SandboxState::Destroyed)), "h1"),
            Unaccounted::Orphan
        );
        assert_eq!(
            classify_unaccounted(Some(&row("h2", SandboxState::Running)), "h1"),
            Unaccounted::Orphan
        );
        assert_eq!(
            classify_unaccounted(Some(&row("h1", SandboxState::Running)), "h1"),
            Unaccounted::Adopt
        );
        assert_eq!(
            classify_unaccounted(Some(&row("h1", SandboxState::Lost)), "h1"),
            Unaccounted::Adopt
        );
    }
}

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

use std::collections::HashMap;
use std::time::{Duration, Instant};

use corral_proto::pb;
use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use tokio::sync::mpsc;

use super::connection::{ConnMsg, ConnectionActor, ConnectionArgs, HostReply};
use super::fleet::FleetMsg;
use super::sandbox::{SandboxActor, SandboxArgs, SandboxMsg, SandboxReply};
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
    /// Fault injection for the supervision tests: panic in the handler.
    #[doc(hidden)]
    InjectPanic,
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
    sandboxes: HashMap<String, ActorRef<SandboxMsg>>,
    by_actor: HashMap<ActorId, String>,
    restarts: RestartBudget<String>,
    /// Containers on the host that no sandbox row accounts for, with when
    /// they were first seen.
    orphans: HashMap<String, Instant>,
    /// Orphans with a destroy in flight.
    collecting: HashMap<String, Instant>,
    inventory_in_flight: bool,
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
                    self.offline(state).await;
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
                let result = self.set_admin(state, admin, drain_deadline).await;
                let _ = reply.send(result);
            }
            HostMsg::AgentEvent(event) => {
                let Some(status) = event.status else {
                    return Ok(());
                };
                match state.sandboxes.get(&status.sandbox_id) {
                    Some(sandbox) => {
                        let _ = sandbox.tell(SandboxMsg::Observed {
                            status,
                            reason: event.reason,
                            as_of: Instant::now(),
                        });
                    }
                    None => {
                        tracing::warn!(host.id = %state.args.host_id, sandbox.id = %status.sandbox_id, "event about a sandbox this host does not hold");
                    }
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
            SupervisionEvent::ActorTerminated(cell, _, _) => {
                state.args.metrics.registry.gone(&cell);
                if let Some(id) = state.by_actor.remove(&cell.get_id()) {
                    state.sandboxes.remove(&id);
                    state.restarts.forget(&id);
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
        for (id, sandbox) in &state.sandboxes {
            let status = reported.remove(id).unwrap_or(pb::SandboxStatus {
                sandbox_id: id.clone(),
                phase: pb::SandboxPhase::Absent as i32,
                ..Default::default()
            });
            let _ = sandbox.tell(SandboxMsg::Observed {
                status,
                reason: "inventory".into(),
                as_of,
            });
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
    async fn offline(&self, state: &mut HostActorState) {
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
        for sandbox in state.sandboxes.values() {
            let _ = sandbox.tell(SandboxMsg::HostOffline);
        }
    }

    /// Records an operator decision and applies it: the scheduler stops
    /// (or resumes) placing here, and a drain moves or stops every sandbox
    /// on the host according to its restart policy.
    async fn set_admin(
        &self,
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
            for sandbox in state.sandboxes.values() {
                let _ = sandbox.tell(SandboxMsg::Drain { grace });
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
        if let Some(existing) = state.sandboxes.get(&id) {
            return Ok(existing.clone());
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
        state.sandboxes.insert(id, actor.clone());
        Ok(actor)
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

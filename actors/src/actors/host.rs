//! The HostActor: one per known host, the only writer of its row. It holds
//! the host's current connection (at most one; a newer one replaces an older
//! one and the older one's late disconnect is ignored by generation), routes
//! commands to it, supervises the SandboxActors placed on the host, and tells
//! the Scheduler when the host can or cannot take placements. A host becomes
//! schedulable only after its connection is stored (LESSONS 4).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use corral_proto::pb;
use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use tokio::sync::mpsc;

use super::connection::{ConnMsg, ConnectionActor, ConnectionArgs, HostReply};
use super::sandbox::{SandboxActor, SandboxArgs, SandboxMsg, SandboxReply};
use super::scheduler::SchedulerMsg;
use super::{names, Timeouts};
use crate::domain::{HostState, Resources};
use crate::error::CorralError;
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
    /// Send a command over the current connection.
    Dispatch {
        payload: pb::control_message::Payload,
        timeout: Duration,
        reply: RpcReplyPort<HostReply>,
    },
    /// Start the actor of a sandbox placed on this host.
    SpawnSandbox {
        row: sandbox::Model,
        insert: bool,
        /// Answered with the outcome of the sandbox's first convergence.
        waiter: Option<RpcReplyPort<SandboxReply>>,
        reply: Option<RpcReplyPort<Result<ActorRef<SandboxMsg>, CorralError>>>,
    },
    Heartbeat(pb::Heartbeat),
    AgentEvent(pb::SandboxEvent),
}

pub struct HostArgs {
    pub host_id: String,
    pub store: Store,
    pub scheduler: ActorRef<SchedulerMsg>,
    pub timeouts: Timeouts,
    pub prefix: String,
}

pub struct HostActorState {
    args: HostArgs,
    connection: Option<(u64, ActorRef<ConnMsg>)>,
    generation: u64,
    sandboxes: HashMap<String, ActorRef<SandboxMsg>>,
    by_actor: HashMap<ActorId, String>,
    last_heartbeat: Option<Instant>,
}

pub struct HostActor;

impl Actor for HostActor {
    type Msg = HostMsg;
    type State = HostActorState;
    type Arguments = HostArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        args: HostArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(HostActorState {
            args,
            connection: None,
            generation: 0,
            sandboxes: HashMap::new(),
            by_actor: HashMap::new(),
            last_heartbeat: None,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
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
                self.disconnected(state, generation).await;
            }
            HostMsg::Dispatch {
                payload,
                timeout,
                reply,
            } => match &state.connection {
                Some((_, conn)) => {
                    if let Err(ractor::MessagingErr::SendErr(ConnMsg::Request { reply, .. })) = conn
                        .cast(ConnMsg::Request {
                            payload,
                            timeout,
                            reply,
                        })
                    {
                        let _ = reply.send(Err(CorralError::HostDisconnected));
                    }
                }
                None => {
                    let _ = reply.send(Err(CorralError::HostUnavailable));
                }
            },
            HostMsg::SpawnSandbox {
                row,
                insert,
                waiter,
                reply,
            } => {
                let result = self
                    .spawn_sandbox(&myself, state, row, insert, waiter)
                    .await;
                if let Some(reply) = reply {
                    let _ = reply.send(result);
                }
            }
            HostMsg::Heartbeat(_heartbeat) => {
                state.last_heartbeat = Some(Instant::now());
            }
            HostMsg::AgentEvent(event) => {
                let Some(status) = event.status else {
                    return Ok(());
                };
                match state.sandboxes.get(&status.sandbox_id) {
                    Some(sandbox) => {
                        let _ = sandbox.cast(SandboxMsg::Observed {
                            status,
                            reason: event.reason,
                        });
                    }
                    None => {
                        tracing::warn!(host.id = %state.args.host_id, sandbox.id = %status.sandbox_id, "event about a sandbox this host does not hold");
                    }
                }
            }
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
                if let Some(id) = state.by_actor.remove(&cell.get_id()) {
                    state.sandboxes.remove(&id);
                }
            }
            SupervisionEvent::ActorFailed(cell, error) => {
                if let Some(id) = state.by_actor.remove(&cell.get_id()) {
                    state.sandboxes.remove(&id);
                    tracing::error!(sandbox.id = %id, %error, "sandbox actor failed; restarting it from its row");
                    match state.args.store.get_sandbox_any_org(&id).await {
                        Ok(Some(row)) => {
                            if let Err(err) =
                                self.spawn_sandbox(&myself, state, row, false, None).await
                            {
                                tracing::error!(sandbox.id = %id, error = %err, "could not restart sandbox actor");
                            }
                        }
                        Ok(None) => {}
                        Err(err) => {
                            tracing::error!(sandbox.id = %id, error = %err, "could not reload sandbox row");
                        }
                    }
                } else if let Some((generation, conn)) = &state.connection {
                    if conn.get_id() == cell.get_id() {
                        tracing::error!(host.id = %state.args.host_id, %error, "connection actor failed");
                        let generation = *generation;
                        self.disconnected(state, generation).await;
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }
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
        state
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
            },
            myself.get_cell(),
        )
        .await
        .map_err(|e| CorralError::Internal(format!("spawn connection: {e}")))?;
        state.connection = Some((state.generation, conn.clone()));
        state.last_heartbeat = Some(Instant::now());
        let _ = state.args.scheduler.cast(SchedulerMsg::HostUp {
            host_id: host_id.clone(),
            allocatable: Resources {
                cpu_millis: registration.cpu_millis,
                memory_mb: registration.memory_mb,
            },
        });
        tracing::info!(host.id = %host_id, generation = state.generation, runtime = %registration.runtime, "host connected");

        // Reconcile what the host holds with what we believe it holds.
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
            let _ = sandbox.cast(SandboxMsg::Observed {
                status,
                reason: "inventory".into(),
            });
        }
        for unknown in reported.keys() {
            tracing::warn!(host.id = %host_id, sandbox.id = %unknown, "host holds a sandbox the control plane does not track");
        }
        Ok(conn)
    }

    async fn disconnected(&self, state: &mut HostActorState, generation: u64) {
        let current = matches!(&state.connection, Some((g, _)) if *g == generation);
        if !current {
            return;
        }
        state.connection = None;
        let host_id = state.args.host_id.clone();
        tracing::warn!(host.id = %host_id, generation, "host disconnected");
        let _ = state.args.scheduler.cast(SchedulerMsg::HostDown {
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
    }

    async fn spawn_sandbox(
        &self,
        myself: &ActorRef<HostMsg>,
        state: &mut HostActorState,
        row: sandbox::Model,
        insert: bool,
        waiter: Option<RpcReplyPort<SandboxReply>>,
    ) -> Result<ActorRef<SandboxMsg>, CorralError> {
        let id = row.id.clone();
        if let Some(existing) = state.sandboxes.get(&id) {
            return Ok(existing.clone());
        }
        let (actor, _) = ractor::Actor::spawn_linked(
            Some(names::sandbox(&state.args.prefix, &id)),
            SandboxActor,
            SandboxArgs {
                row,
                insert,
                store: state.args.store.clone(),
                host: myself.clone(),
                scheduler: state.args.scheduler.clone(),
                timeouts: state.args.timeouts.clone(),
                waiter,
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
        state.by_actor.insert(actor.get_id(), id.clone());
        state.sandboxes.insert(id, actor.clone());
        Ok(actor)
    }
}

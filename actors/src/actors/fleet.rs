//! The FleetSupervisor: creates and supervises one HostActor per known host.
//! At start-up it rebuilds the fleet from the database: every known host
//! (disconnected until its agent dials in again) and every sandbox that is not
//! destroyed, with its capacity reservation restored in the Scheduler.

use std::collections::HashMap;

use corral_proto::pb;
use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use tokio::sync::mpsc;

use super::connection::ConnMsg;
use super::host::{HostActor, HostArgs, HostMsg};
use super::scheduler::SchedulerMsg;
use super::supervision::{RestartBudget, RestartPolicy};
use super::{names, Timeouts};
use crate::domain::{Resources, SandboxState};
use crate::error::CorralError;
use crate::mailbox::{self, Tell};
use crate::metrics::Metrics;
use crate::store::{HostRegistration, Store};

pub enum FleetMsg {
    /// An authenticated agent registered on a new stream.
    HostConnected {
        host_id: String,
        registration: HostRegistration,
        inventory: Vec<pb::SandboxStatus>,
        outbound: mpsc::Sender<pb::ControlMessage>,
        reply: RpcReplyPort<Result<ActorRef<ConnMsg>, CorralError>>,
    },
    /// The HostActor of a host, if the host is known.
    GetHost(String, RpcReplyPort<Option<ActorRef<HostMsg>>>),
    /// A sandbox was placed again on `host_id` (its row says so): start
    /// its actor there.
    Relocated {
        host_id: String,
        row: Box<crate::store::sandbox::Model>,
        tried: std::collections::BTreeSet<String>,
        waiter: Option<RpcReplyPort<super::sandbox::SandboxReply>>,
    },
    /// A decommissioned host's actor stops (its row stays, as history).
    Forget(String),
}

pub struct FleetArgs {
    pub store: Store,
    pub scheduler: ActorRef<SchedulerMsg>,
    pub orgs: ActorRef<super::ledger::OrgsMsg>,
    pub timeouts: Timeouts,
    pub prefix: String,
    pub metrics: Metrics,
    /// Hosts a create is tried on before it fails.
    pub max_create_attempts: u32,
}

pub struct FleetState {
    /// Counts this actor's mailbox while the actor lives (see `mailbox`).
    _mailbox: mailbox::Open,
    args: FleetArgs,
    hosts: HashMap<String, ActorRef<HostMsg>>,
    by_actor: HashMap<ActorId, String>,
    restarts: RestartBudget<String>,
}

pub struct FleetSupervisor;

impl Actor for FleetSupervisor {
    type Msg = FleetMsg;
    type State = FleetState;
    type Arguments = FleetArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: FleetArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let mailbox = mailbox::open(myself.get_id(), "fleet");
        let mut state = FleetState {
            _mailbox: mailbox,
            args,
            hosts: HashMap::new(),
            by_actor: HashMap::new(),
            restarts: RestartBudget::new(RestartPolicy::default()),
        };
        let started = std::time::Instant::now();
        // No agent is connected to a control plane that just started.
        state.args.store.disconnect_all_hosts().await?;
        for host in state.args.store.list_hosts().await? {
            if host.admin_state == crate::domain::HostAdminState::Decommissioned.as_str() {
                continue;
            }
            self.host_actor(&myself, &mut state, &host.id).await?;
        }
        let hosts_loaded = started.elapsed();
        let rows = state.args.store.load_live_sandboxes().await?;
        let (rows_loaded, sandboxes) = (started.elapsed(), rows.len());
        for row in rows {
            let Some(host_id) = row.host_id.clone() else {
                continue;
            };
            let host = self.host_actor(&myself, &mut state, &host_id).await?;
            let holds = SandboxState::parse(&row.state).is_some_and(|s| s.holds_capacity());
            if holds {
                state.args.scheduler.tell(SchedulerMsg::Restore {
                    sandbox_id: row.id.clone(),
                    host_id: host_id.clone(),
                    resources: Resources {
                        cpu_millis: u64::try_from(row.cpu_millis).unwrap_or(0),
                        memory_mb: u64::try_from(row.memory_mb).unwrap_or(0),
                    },
                    group: super::scheduler::group_of(&row),
                })?;
            }
            host.tell(HostMsg::Restore { row })?;
        }
        tracing::info!(
            hosts = state.hosts.len(),
            sandboxes,
            hosts_ms = hosts_loaded.as_millis(),
            rows_ms = (rows_loaded - hosts_loaded).as_millis(),
            total_ms = started.elapsed().as_millis(),
            "fleet rebuilt from the database; sandboxes are restored behind their hosts' mailboxes"
        );
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
            FleetMsg::HostConnected {
                host_id,
                registration,
                inventory,
                outbound,
                reply,
            } => match self.host_actor(&myself, state, &host_id).await {
                Ok(host) => {
                    // The HostActor answers the caller directly.
                    if let Err(ractor::MessagingErr::SendErr(HostMsg::Connected {
                        reply, ..
                    })) = host.tell(HostMsg::Connected {
                        registration,
                        inventory,
                        outbound,
                        reply,
                    }) {
                        let _ = reply.send(Err(CorralError::Internal("host actor gone".into())));
                    }
                }
                Err(err) => {
                    let _ = reply.send(Err(CorralError::Internal(err.to_string())));
                }
            },
            FleetMsg::GetHost(host_id, reply) => {
                let _ = reply.send(state.hosts.get(&host_id).cloned());
            }
            FleetMsg::Relocated {
                host_id,
                row,
                tried,
                waiter,
            } => match self.host_actor(&myself, state, &host_id).await {
                Ok(host) => {
                    let _ = host.tell(HostMsg::Relocated {
                        row: *row,
                        tried,
                        waiter,
                    });
                }
                Err(err) => {
                    tracing::error!(host.id = %host_id, sandbox.id = %row.id, error = %err, "no actor for the new host of a moved sandbox");
                    if let Some(waiter) = waiter {
                        let _ = waiter.send(Err(CorralError::HostUnavailable));
                    }
                }
            },
            FleetMsg::Forget(host_id) => {
                if let Some(host) = state.hosts.remove(&host_id) {
                    state.by_actor.remove(&host.get_id());
                    host.stop(Some("decommissioned".into()));
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
                state.args.metrics.registry.gone(&cell);
                if let Some(host_id) = state.by_actor.remove(&cell.get_id()) {
                    state.hosts.remove(&host_id);
                }
            }
            SupervisionEvent::ActorFailed(cell, error) => {
                if let Some(host_id) = state.by_actor.remove(&cell.get_id()) {
                    state.hosts.remove(&host_id);
                    state
                        .args
                        .metrics
                        .actor_failed("host", &cell, &error.to_string());
                    if !state
                        .restarts
                        .allow_restart(&host_id, std::time::Instant::now())
                    {
                        // Restarting does not help: escalate, and let the
                        // root stop the control plane for a clean rebuild.
                        return Err(
                            format!("host actor {host_id} keeps failing (last: {error})").into(),
                        );
                    }
                    tracing::error!(host.id = %host_id, %error, "host actor failed; restarting it");
                    // Its sandboxes were its children and stopped with it;
                    // rebuild them from their rows.
                    match self.host_actor(&myself, state, &host_id).await {
                        Ok(host) => {
                            for row in state.args.store.load_live_sandboxes().await? {
                                if row.host_id.as_deref() == Some(host_id.as_str()) {
                                    let _ = host.tell(HostMsg::Restore { row });
                                }
                            }
                        }
                        Err(err) => {
                            tracing::error!(host.id = %host_id, error = %err, "could not restart host actor")
                        }
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }
}

impl FleetSupervisor {
    async fn host_actor(
        &self,
        myself: &ActorRef<FleetMsg>,
        state: &mut FleetState,
        host_id: &str,
    ) -> Result<ActorRef<HostMsg>, ActorProcessingErr> {
        if let Some(host) = state.hosts.get(host_id) {
            return Ok(host.clone());
        }
        let name = names::host(&state.args.prefix, host_id);
        super::await_name_free(&name).await;
        let (host, _) = Actor::spawn_linked(
            Some(name),
            HostActor,
            HostArgs {
                host_id: host_id.to_string(),
                store: state.args.store.clone(),
                scheduler: state.args.scheduler.clone(),
                orgs: state.args.orgs.clone(),
                timeouts: state.args.timeouts.clone(),
                prefix: state.args.prefix.clone(),
                metrics: state.args.metrics.clone(),
                fleet: myself.clone(),
                max_create_attempts: state.args.max_create_attempts,
            },
            myself.get_cell(),
        )
        .await?;
        state.args.metrics.registry.started(&host.get_cell(), None);
        state.by_actor.insert(host.get_id(), host_id.to_string());
        state.hosts.insert(host_id.to_string(), host.clone());
        Ok(host)
    }
}

//! The RootSupervisor: starts the Scheduler, the OrgsSupervisor and the
//! FleetSupervisor (in that order: the fleet restores reservations into the
//! scheduler) and hands out their references.

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};

use super::fleet::{FleetArgs, FleetMsg, FleetSupervisor};
use super::ledger::{BillingContext, BillingHook, OrgsArgs, OrgsMsg, OrgsSupervisor};
use super::scheduler::{Scheduler, SchedulerArgs, SchedulerMsg, SchedulingPolicy};
use super::{names, Timeouts};
use crate::mailbox;
use crate::metrics::Metrics;
use crate::store::Store;

#[derive(Clone)]
pub struct TopLevel {
    pub scheduler: ActorRef<SchedulerMsg>,
    pub orgs: ActorRef<OrgsMsg>,
    pub fleet: ActorRef<FleetMsg>,
}

pub struct RootState {
    top: TopLevel,
    /// Counts the root's mailbox while it lives (see `mailbox`).
    _mailbox: mailbox::Open,
}

pub enum RootMsg {
    TopLevel(RpcReplyPort<TopLevel>),
}

pub struct RootArgs {
    pub store: Store,
    pub timeouts: Timeouts,
    pub prefix: String,
    pub metrics: Metrics,
    pub billing: crate::billing::BillingPolicy,
    pub billing_hook: std::sync::Arc<dyn BillingHook>,
    pub scheduling: SchedulingPolicy,
}

pub struct RootSupervisor;

impl Actor for RootSupervisor {
    type Msg = RootMsg;
    type State = RootState;
    type Arguments = RootArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: RootArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let mailbox = mailbox::open(myself.get_id(), "root");
        let private_pool_only = args
            .store
            .private_pool_only_orgs()
            .await?
            .into_iter()
            .collect();
        let (scheduler, _) = Actor::spawn_linked(
            Some(names::singleton(&args.prefix, names::SCHEDULER)),
            Scheduler,
            SchedulerArgs {
                policy: args.scheduling.clone(),
                private_pool_only,
            },
            myself.get_cell(),
        )
        .await?;
        let (orgs, _) = Actor::spawn_linked(
            Some(names::singleton(&args.prefix, names::ORGS)),
            OrgsSupervisor,
            OrgsArgs {
                context: BillingContext {
                    store: args.store.clone(),
                    policy: args.billing,
                    hook: args.billing_hook,
                    metrics: args.metrics.clone(),
                    prefix: args.prefix.clone(),
                    tick_writes: Default::default(),
                },
            },
            myself.get_cell(),
        )
        .await?;
        let (fleet, _) = Actor::spawn_linked(
            Some(names::singleton(&args.prefix, names::FLEET)),
            FleetSupervisor,
            FleetArgs {
                store: args.store,
                scheduler: scheduler.clone(),
                orgs: orgs.clone(),
                timeouts: args.timeouts,
                prefix: args.prefix,
                metrics: args.metrics.clone(),
                max_create_attempts: args.scheduling.max_create_attempts,
            },
            myself.get_cell(),
        )
        .await?;
        for cell in [scheduler.get_cell(), orgs.get_cell(), fleet.get_cell()] {
            args.metrics.registry.started(&cell, None);
        }
        Ok(RootState {
            top: TopLevel {
                scheduler,
                orgs,
                fleet,
            },
            _mailbox: mailbox,
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
            RootMsg::TopLevel(reply) => {
                let _ = reply.send(state.top.clone());
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<Self::Msg>,
        event: SupervisionEvent,
        _state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        // The top-level actors hold the whole system's state; if one of them
        // dies the control plane cannot go on correctly. Stop, so that the
        // process exits and is restarted, rebuilding from the database.
        match event {
            SupervisionEvent::ActorFailed(cell, error) => {
                tracing::error!(actor = ?cell.get_name(), %error, "a top-level actor failed; stopping the control plane");
                myself.stop(Some("top-level actor failed".into()));
            }
            SupervisionEvent::ActorTerminated(cell, _, reason) => {
                tracing::warn!(actor = ?cell.get_name(), ?reason, "a top-level actor stopped");
                myself.stop(Some("top-level actor stopped".into()));
            }
            _ => {}
        }
        Ok(())
    }
}

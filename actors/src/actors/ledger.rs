//! The OrgsSupervisor and one LedgerActor per organisation. The ledger actor
//! is the only writer of its org's balance: every change goes through its
//! mailbox, so checks and debits cannot race (LESSONS 24). Entries are
//! append-only with a unique idempotency key (LESSONS 23); the balance is
//! their sum, loaded at start. Amounts are integer micro-units (LESSONS 25).
//!
//! This is the minimal ledger of the walking skeleton: deposits, balance,
//! billing status and the credit gate on suspended orgs. Metering and the
//! status machine come with the billing issue.

use std::collections::HashMap;

use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use serde::Serialize;

use super::names;
use crate::domain::BillingStatus;
use crate::error::CorralError;
use crate::store::{NewLedgerEntry, Store};

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct LedgerSummary {
    pub org_id: String,
    pub balance_micros: i64,
    pub status: BillingStatus,
}

pub enum LedgerMsg {
    /// Adds credits; `reference` makes the deposit idempotent.
    Deposit {
        amount_micros: i64,
        reference: String,
        description: String,
        reply: RpcReplyPort<Result<LedgerSummary, CorralError>>,
    },
    Summary(RpcReplyPort<LedgerSummary>),
    /// May this org start new work?
    AuthorizeCreate(RpcReplyPort<Result<(), CorralError>>),
    /// Fault injection for the supervision tests: panic in the handler.
    #[doc(hidden)]
    InjectPanic,
}

pub struct LedgerArgs {
    pub org_id: String,
    pub store: Store,
}

pub struct LedgerState {
    org_id: String,
    store: Store,
    balance_micros: i64,
    status: BillingStatus,
}

impl LedgerState {
    fn summary(&self) -> LedgerSummary {
        LedgerSummary {
            org_id: self.org_id.clone(),
            balance_micros: self.balance_micros,
            status: self.status,
        }
    }
}

pub struct LedgerActor;

impl Actor for LedgerActor {
    type Msg = LedgerMsg;
    type State = LedgerState;
    type Arguments = LedgerArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        args: LedgerArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let org = args
            .store
            .get_org(&args.org_id)
            .await?
            .ok_or_else(|| format!("org {} not found", args.org_id))?;
        let balance_micros = args.store.ledger_balance(&args.org_id).await?;
        Ok(LedgerState {
            org_id: args.org_id,
            store: args.store,
            balance_micros,
            status: BillingStatus::parse(&org.billing_status).unwrap_or(BillingStatus::Active),
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            LedgerMsg::Deposit {
                amount_micros,
                reference,
                description,
                reply,
            } => {
                let result = if amount_micros <= 0 {
                    Err(CorralError::InvalidArgument(
                        "a deposit must be a positive amount".into(),
                    ))
                } else {
                    state
                        .store
                        .append_ledger_entry(NewLedgerEntry {
                            org_id: state.org_id.clone(),
                            kind: "deposit".into(),
                            amount_micros,
                            idempotency_key: format!("deposit:{}:{reference}", state.org_id),
                            sandbox_id: None,
                            description,
                        })
                        .await
                        .map(|(_, inserted)| {
                            if inserted {
                                state.balance_micros += amount_micros;
                            }
                            state.summary()
                        })
                };
                let _ = reply.send(result);
            }
            LedgerMsg::Summary(reply) => {
                let _ = reply.send(state.summary());
            }
            LedgerMsg::InjectPanic => panic!("injected fault in ledger {}", state.org_id),
            LedgerMsg::AuthorizeCreate(reply) => {
                let result = match state.status {
                    BillingStatus::Suspended => Err(CorralError::InvalidState(
                        "the organisation is suspended for lack of credits".into(),
                    )),
                    _ => Ok(()),
                };
                let _ = reply.send(result);
            }
        }
        Ok(())
    }
}

pub enum OrgsMsg {
    /// The ledger actor of an org, started on first use.
    Ledger(
        String,
        RpcReplyPort<Result<ActorRef<LedgerMsg>, CorralError>>,
    ),
}

pub struct OrgsArgs {
    pub store: Store,
    pub prefix: String,
}

pub struct OrgsState {
    args: OrgsArgs,
    ledgers: HashMap<String, ActorRef<LedgerMsg>>,
    by_actor: HashMap<ActorId, String>,
}

pub struct OrgsSupervisor;

impl Actor for OrgsSupervisor {
    type Msg = OrgsMsg;
    type State = OrgsState;
    type Arguments = OrgsArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        args: OrgsArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(OrgsState {
            args,
            ledgers: HashMap::new(),
            by_actor: HashMap::new(),
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            OrgsMsg::Ledger(org_id, reply) => {
                if let Some(ledger) = state.ledgers.get(&org_id) {
                    let _ = reply.send(Ok(ledger.clone()));
                    return Ok(());
                }
                let spawned = Actor::spawn_linked(
                    Some(names::ledger(&state.args.prefix, &org_id)),
                    LedgerActor,
                    LedgerArgs {
                        org_id: org_id.clone(),
                        store: state.args.store.clone(),
                    },
                    myself.get_cell(),
                )
                .await;
                let result = match spawned {
                    Ok((ledger, _)) => {
                        state.by_actor.insert(ledger.get_id(), org_id.clone());
                        state.ledgers.insert(org_id, ledger.clone());
                        Ok(ledger)
                    }
                    Err(err) => Err(CorralError::Database(err.to_string())),
                };
                let _ = reply.send(result);
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        _myself: ActorRef<Self::Msg>,
        event: SupervisionEvent,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        // A ledger that stops or fails is forgotten and restarted from its
        // entries on next use.
        if let SupervisionEvent::ActorTerminated(cell, ..)
        | SupervisionEvent::ActorFailed(cell, _) = event
        {
            if let Some(org_id) = state.by_actor.remove(&cell.get_id()) {
                state.ledgers.remove(&org_id);
            }
        }
        Ok(())
    }
}

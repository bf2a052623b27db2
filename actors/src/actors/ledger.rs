//! The OrgsSupervisor and one LedgerActor per organisation. The ledger actor
//! is the only writer of its org's money and billing settings: every change
//! goes through its mailbox, so checks and debits cannot race (LESSONS 24).
//!
//! It owns:
//! - the balance (the sum of the org's append-only entries, each with a
//!   unique idempotency key: LESSONS 23), in integer micro-units (LESSONS 25);
//! - the meters of the org's sandboxes: each running (or kept stopped)
//!   sandbox is charged in contiguous periods, every `interval` and at every
//!   change of what it does, told by its SandboxActor (and re-synchronised
//!   from the sandbox rows every few ticks, so a lost message costs nothing);
//!   the arithmetic is [`crate::billing`];
//! - the credit gate and quotas: a create reserves a hold (one window of its
//!   running cost) and its resources in this mailbox, so concurrent creates
//!   cannot overdraw the org or exceed its quota;
//! - the billing-status machine (active, warning, grace, suspended, exempt):
//!   each transition is persisted with the org, recorded as a billing event,
//!   logged, counted and handed to the [`BillingHook`]; a suspended org's
//!   sandboxes are stopped.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::Bound;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use serde::Serialize;

use super::names;
use super::sandbox::SandboxMsg;
use super::supervision::{RestartBudget, RestartPolicy};
use crate::billing::{self, BillingPolicy, Meter, MeterPhase, Plan, Quota, Usage, UsageCharge};
use crate::domain::{BillingStatus, DesiredState, Resources, SandboxState};
use crate::error::CorralError;
use crate::mailbox::{self, Tell};
use crate::metrics::Metrics;
use crate::store::{org, price_plan, Appended, MeteredSandbox, NewLedgerEntry, Store};

/// A change of an org's billing status, as recorded and handed to hooks.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct BillingTransition {
    pub org_id: String,
    pub from: BillingStatus,
    pub to: BillingStatus,
    pub balance_micros: i64,
    pub reason: String,
}

/// Where billing notifications go (a webhook sender, a mailer). Called from
/// the ledger actor: implementations must not block; hand work to a task.
pub trait BillingHook: Send + Sync + 'static {
    fn status_changed(&self, transition: &BillingTransition);
}

/// The default hook: the transition is logged (the ledger also records it
/// in the database and counts it).
#[derive(Debug, Default)]
pub struct LogHook;

impl BillingHook for LogHook {
    fn status_changed(&self, t: &BillingTransition) {
        tracing::info!(org.id = %t.org_id, from = %t.from, to = %t.to, balance_micros = t.balance_micros, reason = %t.reason, "billing status changed");
    }
}

/// Everything the billing of an org depends on, shared by its ledgers.
#[derive(Clone)]
pub struct BillingContext {
    pub store: Store,
    pub policy: BillingPolicy,
    pub hook: Arc<dyn BillingHook>,
    pub metrics: Metrics,
    pub prefix: String,
    /// Held by each org's tick write for as long as it runs, and taken by a
    /// starting ledger before it reads where metering resumes: a ledger
    /// restarted while its predecessor's write is in flight reads after
    /// that write, never before it (else its next charge would start at the
    /// same instant as the in-flight one, collide on the idempotency key,
    /// and leave the time between their ends uncharged).
    pub tick_writes: TickWrites,
}

/// One lock per org, shared by every incarnation of its ledger.
#[derive(Clone, Default)]
pub struct TickWrites(Arc<dashmap::DashMap<String, Arc<tokio::sync::Mutex<()>>>>);

impl TickWrites {
    fn of(&self, org_id: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.0.entry(org_id.to_string()).or_default().clone()
    }
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct LedgerSummary {
    pub org_id: String,
    pub balance_micros: i64,
    pub status: BillingStatus,
    pub exempt: bool,
    pub plan: Plan,
    pub quota: Quota,
    /// What the org's live sandboxes use.
    pub usage: Usage,
    /// What running and kept sandboxes cost now, per hour.
    pub burn_rate_micros_per_hour: i64,
    /// Credit held for the live sandboxes' next window of running.
    pub held_micros: i64,
    pub grace_deadline: Option<DateTime<Utc>>,
}

/// Kinds of credit an admin can enter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CreditKind {
    /// Money paid in (positive).
    Deposit,
    /// A correction either way.
    Adjustment,
    /// Money given back for a fault (positive).
    Refund,
}

impl CreditKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Deposit => "deposit",
            Self::Adjustment => "adjustment",
            Self::Refund => "refund",
        }
    }
}

/// What an admin may change about an org's billing.
#[derive(Debug, Clone, Default)]
pub struct BillingSettings {
    pub plan_id: Option<String>,
    pub exempt: Option<bool>,
    pub quota: Option<Quota>,
}

/// The result of the audit of one org.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct LedgerAudit {
    pub org_id: String,
    pub balance_micros: i64,
    pub entries_sum_micros: i64,
    /// Usage periods of one sandbox that overlap (a double charge).
    pub overlapping_periods: u64,
    pub ok: bool,
}

pub enum LedgerMsg {
    /// Adds (or, for an adjustment, possibly removes) credit; `reference`
    /// makes it idempotent.
    Credit {
        kind: CreditKind,
        amount_micros: i64,
        reference: String,
        description: String,
        reply: RpcReplyPort<Result<LedgerSummary, CorralError>>,
    },
    Summary(RpcReplyPort<LedgerSummary>),
    /// May this org create a sandbox of these resources? On yes, its hold
    /// and resources are reserved until [`LedgerMsg::Release`] or its end.
    AuthorizeCreate {
        sandbox_id: String,
        resources: Resources,
        ttl_seconds: Option<u64>,
        /// Answered with the TTL the sandbox gets (the quota's maximum when
        /// none was asked for and the quota has one).
        reply: RpcReplyPort<Result<Option<u64>, CorralError>>,
    },
    /// May this org start one of its stopped sandboxes?
    AuthorizeStart(RpcReplyPort<Result<(), CorralError>>),
    /// A create that was authorized did not happen.
    Release {
        sandbox_id: String,
    },
    /// What a sandbox does changed at `at` (`None`: it no longer runs nor is
    /// kept; metering ends).
    Meter {
        sandbox_id: String,
        phase: Option<MeterPhase>,
        resources: Resources,
        at: DateTime<Utc>,
    },
    /// Charge every meter up to now and re-evaluate the status.
    Tick,
    Configure {
        settings: BillingSettings,
        reply: RpcReplyPort<Result<LedgerSummary, CorralError>>,
    },
    Audit(RpcReplyPort<Result<LedgerAudit, CorralError>>),
    /// A tick's usage entries were written, all or a first part of them.
    Charged {
        due: Vec<UsageCharge>,
        written: Appended,
    },
    /// A page of the org's live sandbox rows, read beside the mailbox for
    /// a periodic re-synchronisation (sent by the ledger's own read): the
    /// rows whose ids are in `span`, for the re-read started at tick
    /// `resync`.
    Resynced {
        resync: u64,
        span: IdSpan,
        rows: Result<Vec<MeteredSandbox>, CorralError>,
    },
    /// Fault injection for the supervision tests: panic in the handler.
    #[doc(hidden)]
    InjectPanic,
}

pub struct LedgerArgs {
    pub org_id: String,
    pub context: BillingContext,
}

pub struct LedgerState {
    /// Counts this actor's mailbox while the actor lives (see `mailbox`).
    _mailbox: mailbox::Open,
    ctx: BillingContext,
    org: org::Model,
    plan: Plan,
    /// The sum of the org's ledger entries.
    balance_micros: i64,
    /// What the meters charged and did not write yet (the sum of their
    /// `unwritten_micros`): the balance the gate and the status go by is
    /// `balance_micros` less this.
    unwritten_micros: i64,
    /// In id order: a page of the periodic re-read covers a span of ids,
    /// and a map that grows never stops the mailbox to rehash (a hash map
    /// doubling from 229,376 meters held it 123-164 ms, every create of the
    /// org queued behind it).
    meters: BTreeMap<String, Meter>,
    /// What holds credit and quota.
    reservations: Reservations,
    ticks: u64,
    /// The debits of a tick being written, if one is. Creates are gated
    /// meanwhile as if they were already charged; everything that reads or
    /// moves the meters or the balance waits in `deferred`.
    writing: Option<i64>,
    deferred: std::collections::VecDeque<LedgerMsg>,
    /// While a periodic re-read of the rows is under way: the tick that
    /// started it and the sandboxes whose metering changed since. The rows
    /// are older than what the ledger heard of these, so the re-read leaves
    /// them as they are.
    resyncing: Option<(u64, HashSet<String>)>,
}

/// The sandbox ids after `after` (all from the first) up to and including
/// `through` (all to the last): what one page of a re-read covers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IdSpan {
    after: Option<String>,
    through: Option<String>,
}

impl IdSpan {
    /// The span as the bounds of a range of a map keyed by id.
    fn bounds(&self) -> (Bound<&str>, Bound<&str>) {
        (
            self.after
                .as_deref()
                .map_or(Bound::Unbounded, Bound::Excluded),
            self.through
                .as_deref()
                .map_or(Bound::Unbounded, Bound::Included),
        )
    }

    fn is_last(&self) -> bool {
        self.through.is_none()
    }
}

/// The sandboxes holding an org's credit and quota: live ones (from their
/// rows) and authorized creates whose row may not exist yet, with their
/// totals kept as they change. The quota check and the credit gate run on
/// every create; summing every reservation there made a big org's creates
/// cost O(running sandboxes) each (40,000 running: most of the ledger's
/// time, and the creates queued behind it).
#[derive(Debug, Default)]
struct Reservations {
    /// Each live sandbox's resources and the credit it holds, in id order
    /// (as the meters, for the same reasons).
    live: BTreeMap<String, (Resources, i64)>,
    /// Each authorized create's resources, held credit and authorization.
    pending: HashMap<String, (Resources, i64, Instant)>,
    /// The sums over both maps (an id in both counts twice, as it holds
    /// twice until its reservation moves to its row).
    count: u64,
    cpu_millis: u128,
    memory_mb: u128,
    held_micros: i128,
}

impl Reservations {
    fn add(&mut self, r: Resources, held: i64) {
        self.count += 1;
        self.cpu_millis += u128::from(r.cpu_millis);
        self.memory_mb += u128::from(r.memory_mb);
        self.held_micros += i128::from(held);
    }

    fn sub(&mut self, r: Resources, held: i64) {
        self.count -= 1;
        self.cpu_millis -= u128::from(r.cpu_millis);
        self.memory_mb -= u128::from(r.memory_mb);
        self.held_micros -= i128::from(held);
    }

    fn insert_live(&mut self, id: String, r: Resources, held: i64) {
        self.add(r, held);
        if let Some((old, old_held)) = self.live.insert(id, (r, held)) {
            self.sub(old, old_held);
        }
    }

    fn remove_live(&mut self, id: &str) {
        if let Some((r, held)) = self.live.remove(id) {
            self.sub(r, held);
        }
    }

    /// Drops the live reservations in `span` of the sandboxes `keep` does
    /// not name.
    fn retain_live_in(&mut self, span: &IdSpan, keep: impl Fn(&str) -> bool) {
        let dropped: Vec<String> = self
            .live
            .range::<str, _>(span.bounds())
            .filter(|(id, _)| !keep(id))
            .map(|(id, _)| id.clone())
            .collect();
        for id in dropped {
            self.remove_live(&id);
        }
    }

    fn insert_pending(&mut self, id: String, r: Resources, held: i64) {
        self.add(r, held);
        if let Some((old, old_held, _)) = self.pending.insert(id, (r, held, Instant::now())) {
            self.sub(old, old_held);
        }
    }

    fn remove_pending(&mut self, id: &str) {
        if let Some((r, held, _)) = self.pending.remove(id) {
            self.sub(r, held);
        }
    }

    /// Drops authorizations older than `ttl` whose row never came.
    fn expire_pending(&mut self, ttl: Duration) {
        let now = Instant::now();
        let expired: Vec<String> = self
            .pending
            .iter()
            .filter(|(_, (_, _, at))| now.duration_since(*at) >= ttl)
            .map(|(id, _)| id.clone())
            .collect();
        for id in expired {
            self.remove_pending(&id);
        }
    }

    /// The sandbox holds nothing any more.
    fn remove(&mut self, id: &str) {
        self.remove_live(id);
        self.remove_pending(id);
    }

    /// Every hold again, at `hold`'s prices (the plan changed).
    fn reprice(&mut self, hold: impl Fn(Resources) -> i64) {
        self.held_micros = 0;
        for (r, held) in self.live.values_mut() {
            *held = hold(*r);
            self.held_micros += i128::from(*held);
        }
        for (r, held, _) in self.pending.values_mut() {
            *held = hold(*r);
            self.held_micros += i128::from(*held);
        }
    }

    fn usage(&self) -> Usage {
        let clamp = |v: u128| u64::try_from(v).unwrap_or(u64::MAX);
        Usage {
            sandboxes: self.count,
            cpu_millis: clamp(self.cpu_millis),
            memory_mb: clamp(self.memory_mb),
        }
    }

    fn held_micros(&self) -> i64 {
        i64::try_from(self.held_micros.max(0)).unwrap_or(i64::MAX)
    }
}

/// The rows are re-read every this many ticks (metering itself follows the
/// SandboxActors' messages; the re-read only catches a lost one).
const RESYNC_EVERY_TICKS: u64 = 6;

/// Rows a page of the periodic re-read: 10-15 ms of the mailbox each for an
/// org of 300,000 sandboxes (the rows, and the range of the org's meters
/// and reservations in the page's span).
const RESYNC_PAGE: usize = 10_000;

/// After reading a page the re-read pauses this many times as long as the
/// read took.
const RESYNC_PAUSE_PER_READ: u32 = 4;

/// How long a starting ledger retries reading its sandboxes before it fails.
const RESYNC_AT_START_FOR: Duration = Duration::from_secs(30);

/// How long an authorized create keeps its reservation without a row.
const PENDING_TTL: Duration = Duration::from_secs(120);

/// What a sandbox in `state` is metered as, if at all. A sandbox being
/// stopped still runs; one being started is still stopped; one being
/// destroyed is no longer charged.
pub fn metered_phase(state: SandboxState) -> Option<MeterPhase> {
    match state {
        SandboxState::Running | SandboxState::Stopping => Some(MeterPhase::Running),
        SandboxState::Stopped | SandboxState::Starting => Some(MeterPhase::Stopped),
        _ => None,
    }
}

fn plan_of(model: price_plan::Model) -> Plan {
    Plan {
        id: model.id,
        name: model.name,
        cpu_micros_per_vcpu_hour: model.cpu_micros_per_vcpu_hour,
        memory_micros_per_gib_hour: model.memory_micros_per_gib_hour,
        stopped_memory_micros_per_gib_hour: model.stopped_memory_micros_per_gib_hour,
    }
}

fn quota_of(org: &org::Model) -> Quota {
    let limit = |v: Option<i64>| v.and_then(|v| u64::try_from(v).ok());
    Quota {
        max_sandboxes: limit(org.max_sandboxes),
        max_cpu_millis: limit(org.max_cpu_millis),
        max_memory_mb: limit(org.max_memory_mb),
        max_ttl_seconds: limit(org.max_ttl_seconds),
    }
}

fn resources_of(row: &MeteredSandbox) -> Resources {
    Resources {
        cpu_millis: u64::try_from(row.cpu_millis).unwrap_or(0),
        memory_mb: u64::try_from(row.memory_mb).unwrap_or(0),
    }
}

impl LedgerState {
    fn status(&self) -> BillingStatus {
        BillingStatus::parse(&self.org.billing_status).unwrap_or(BillingStatus::Active)
    }

    /// The credit `r` holds while it runs.
    fn hold_of(&self, r: Resources) -> i64 {
        self.plan.hold(r, self.ctx.policy.hold_window)
    }

    fn held_micros(&self) -> i64 {
        self.reservations.held_micros()
    }

    /// The balance as of the last tick: the entries less what was charged
    /// and not yet written.
    fn balance_now(&self) -> i64 {
        self.balance_micros.saturating_sub(self.unwritten_micros)
    }

    fn usage(&self) -> Usage {
        self.reservations.usage()
    }

    fn summary(&self) -> LedgerSummary {
        LedgerSummary {
            org_id: self.org.id.clone(),
            balance_micros: self.balance_now(),
            status: self.status(),
            exempt: self.org.billing_exempt,
            plan: self.plan.clone(),
            quota: quota_of(&self.org),
            usage: self.usage(),
            burn_rate_micros_per_hour: self
                .meters
                .values()
                .map(|m| self.plan.hourly(m.phase, m.resources))
                .fold(0i64, i64::saturating_add),
            held_micros: self.held_micros(),
            grace_deadline: self.org.grace_deadline,
        }
    }

    /// The credit gate: creating (or starting) is refused to a suspended
    /// org, and to one whose balance, less every hold including `extra`,
    /// would fall below the minimum.
    fn gate(&self, extra_hold: i64) -> Result<(), CorralError> {
        if self.org.billing_exempt {
            return Ok(());
        }
        if self.status() == BillingStatus::Suspended {
            return Err(CorralError::PaymentRequired(
                "the organisation is suspended for lack of credit; add credit to resume".into(),
            ));
        }
        let balance = self.balance_now().saturating_sub(self.writing.unwrap_or(0));
        let available = balance
            .saturating_sub(self.held_micros())
            .saturating_sub(extra_hold);
        let minimum = self.ctx.policy.min_balance_micros;
        if balance <= minimum || available < minimum {
            return Err(CorralError::PaymentRequired(format!(
                "insufficient credit: the balance is {} micro-units, {} are held for running \
                 sandboxes, and this needs {} more",
                balance,
                self.held_micros(),
                extra_hold
            )));
        }
        Ok(())
    }
}

pub struct LedgerActor;

impl Actor for LedgerActor {
    type Msg = LedgerMsg;
    type State = LedgerState;
    type Arguments = LedgerArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: LedgerArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let mailbox = mailbox::open(myself.get_id(), "ledger");
        let store = &args.context.store;
        let org = store
            .get_org(&args.org_id)
            .await?
            .ok_or_else(|| format!("org {} not found", args.org_id))?;
        let plan = load_plan(store, org.plan_id.as_deref()).await?;
        let state = LedgerState {
            _mailbox: mailbox,
            ctx: args.context,
            org,
            plan,
            // Read in `post_start`, after any write still in flight.
            balance_micros: 0,
            unwritten_micros: 0,
            meters: BTreeMap::new(),
            reservations: Reservations::default(),
            ticks: 0,
            writing: None,
            deferred: Default::default(),
            resyncing: None,
        };
        Ok(state)
    }

    /// Rebuilds the meters from the rows and the entries: metering resumes
    /// where the last persisted period ended, so a restart neither skips
    /// nor repeats a period. Here rather than in `pre_start` so a
    /// control-plane start rebuilds the ledgers and the fleet at once; no
    /// message is handled before this is done. A database that fails here
    /// is retried for a while rather than failing the actor at once (its
    /// supervisor would soon give up on it and stop the control plane).
    async fn post_start(
        &self,
        myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let lock = state.ctx.tick_writes.of(&state.org.id);
        let _after_writes = lock.lock().await;
        let deadline = Instant::now() + RESYNC_AT_START_FOR;
        while let Err(err) = rebuild(state).await {
            if Instant::now() >= deadline {
                return Err(err.into());
            }
            tracing::warn!(org.id = %state.org.id, error = %err, "could not read the org's sandboxes to resume metering; retrying");
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        myself.tell_every(state.ctx.policy.interval, || LedgerMsg::Tick);
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        mailbox::took(myself.get_id());
        if state.writing.is_some() && waits_for_writes(&message) {
            state.deferred.push_back(message);
            return Ok(());
        }
        self.handle_timed(&myself, message, state).await;
        while state.writing.is_none() {
            let Some(message) = state.deferred.pop_front() else {
                break;
            };
            self.handle_timed(&myself, message, state).await;
        }
        Ok(())
    }
}

/// A message that keeps the mailbox longer than this is logged (at debug):
/// every create of the org waits behind it.
const SLOW_MESSAGE: Duration = Duration::from_millis(10);

fn message_kind(message: &LedgerMsg) -> &'static str {
    match message {
        LedgerMsg::Credit { .. } => "credit",
        LedgerMsg::Summary(_) => "summary",
        LedgerMsg::AuthorizeCreate { .. } => "authorize_create",
        LedgerMsg::AuthorizeStart(_) => "authorize_start",
        LedgerMsg::Release { .. } => "release",
        LedgerMsg::Meter { .. } => "meter",
        LedgerMsg::Tick => "tick",
        LedgerMsg::Configure { .. } => "configure",
        LedgerMsg::Audit(_) => "audit",
        LedgerMsg::Charged { .. } => "charged",
        LedgerMsg::Resynced { .. } => "resynced",
        LedgerMsg::InjectPanic => "inject_panic",
    }
}

/// Whether a message must wait for a tick's writes: everything but the
/// gate (which counts the debits being written) and releasing a hold.
fn waits_for_writes(message: &LedgerMsg) -> bool {
    !matches!(
        message,
        LedgerMsg::AuthorizeCreate { .. }
            | LedgerMsg::AuthorizeStart(_)
            | LedgerMsg::Release { .. }
            | LedgerMsg::Tick
            | LedgerMsg::Charged { .. }
            | LedgerMsg::InjectPanic
    )
}

impl LedgerActor {
    async fn handle_timed(
        &self,
        myself: &ActorRef<LedgerMsg>,
        message: LedgerMsg,
        state: &mut LedgerState,
    ) {
        let (kind, started) = (message_kind(&message), Instant::now());
        self.handle_now(myself, message, state).await;
        let elapsed = started.elapsed();
        if elapsed > SLOW_MESSAGE {
            tracing::debug!(org.id = %state.org.id, message = kind, elapsed_ms = elapsed.as_millis() as u64, "slow ledger message");
        }
    }

    async fn handle_now(
        &self,
        myself: &ActorRef<LedgerMsg>,
        message: LedgerMsg,
        state: &mut LedgerState,
    ) {
        match message {
            LedgerMsg::Credit {
                kind,
                amount_micros,
                reference,
                description,
                reply,
            } => {
                let result = credit(state, kind, amount_micros, reference, description).await;
                if result.is_ok() {
                    evaluate(state, "credit").await;
                }
                let _ = reply.send(result.map(|()| state.summary()));
            }
            LedgerMsg::Summary(reply) => {
                let _ = reply.send(state.summary());
            }
            LedgerMsg::AuthorizeCreate {
                sandbox_id,
                resources,
                ttl_seconds,
                reply,
            } => {
                let hold = state.plan.hold(resources, state.ctx.policy.hold_window);
                let quota = quota_of(&state.org);
                let result = billing::check_quota(&quota, state.usage(), resources, ttl_seconds)
                    .and_then(|()| state.gate(hold))
                    .map(|()| ttl_seconds.or(quota.max_ttl_seconds));
                if result.is_ok() {
                    state
                        .reservations
                        .insert_pending(sandbox_id, resources, hold);
                }
                let _ = reply.send(result);
            }
            LedgerMsg::AuthorizeStart(reply) => {
                let _ = reply.send(state.gate(0));
            }
            LedgerMsg::Release { sandbox_id } => {
                state.reservations.remove_pending(&sandbox_id);
            }
            LedgerMsg::Meter {
                sandbox_id,
                phase,
                resources,
                at,
            } => {
                if let Some((_, touched)) = &mut state.resyncing {
                    touched.insert(sandbox_id.clone());
                }
                meter_changed(state, &sandbox_id, phase, resources, at).await;
            }
            LedgerMsg::Tick => {
                if state.writing.is_some() {
                    // The last tick is still being written; the next one
                    // charges this one's time too.
                    return;
                }
                state.ticks += 1;
                if state.ticks.is_multiple_of(RESYNC_EVERY_TICKS) && state.resyncing.is_none() {
                    start_resync(myself, state);
                }
                if !charge_meters(myself, state, Utc::now()) {
                    evaluate(state, "metering").await;
                }
            }
            LedgerMsg::Charged { due, written } => {
                state.writing = None;
                if let Some(err) = &written.failed {
                    tracing::warn!(org.id = %state.org.id, error = %err, unwritten = due.len() - written.inserted.len(), "could not persist usage; the rest is charged on the next tick");
                }
                apply_charges(state, &due, written.inserted);
                evaluate(state, "metering").await;
            }
            LedgerMsg::Configure { settings, reply } => {
                let result = configure(state, settings).await;
                if result.is_ok() {
                    evaluate(state, "settings changed").await;
                }
                let _ = reply.send(result.map(|()| state.summary()));
            }
            LedgerMsg::Audit(reply) => {
                let _ = reply.send(audit(state).await);
            }
            LedgerMsg::Resynced { resync, span, rows } => {
                // Not the re-read under way (one that failed earlier).
                let Some((current, touched)) = state.resyncing.take() else {
                    return;
                };
                if current != resync {
                    state.resyncing = Some((current, touched));
                    return;
                }
                let result = match rows {
                    Ok(rows) => reconcile(state, rows, &touched, &span).await,
                    Err(err) => Err(err),
                };
                match result {
                    Ok(()) if !span.is_last() => state.resyncing = Some((current, touched)),
                    Ok(()) => state.ctx.metrics.ledger_resyncs.inc(),
                    Err(err) => {
                        tracing::warn!(org.id = %state.org.id, error = %err, "could not re-read the org's sandboxes; metering goes on from what was heard")
                    }
                }
            }
            LedgerMsg::InjectPanic => panic!("injected fault in ledger {}", state.org.id),
        }
    }
}

async fn load_plan(store: &Store, plan_id: Option<&str>) -> Result<Plan, CorralError> {
    let id = plan_id.unwrap_or(corral_migrations::DEFAULT_PLAN_ID);
    store
        .get_plan(id)
        .await?
        .map(plan_of)
        .ok_or_else(|| CorralError::Internal(format!("price plan {id} is missing")))
}

async fn credit(
    state: &mut LedgerState,
    kind: CreditKind,
    amount_micros: i64,
    reference: String,
    description: String,
) -> Result<(), CorralError> {
    let valid = match kind {
        CreditKind::Deposit | CreditKind::Refund => amount_micros > 0,
        CreditKind::Adjustment => amount_micros != 0,
    };
    if !valid {
        return Err(CorralError::InvalidArgument(format!(
            "a {} needs a {} amount",
            kind.as_str(),
            if kind == CreditKind::Adjustment {
                "non-zero"
            } else {
                "positive"
            }
        )));
    }
    let (_, inserted) = state
        .ctx
        .store
        .append_ledger_entry(NewLedgerEntry {
            org_id: state.org.id.clone(),
            kind: kind.as_str().into(),
            amount_micros,
            idempotency_key: format!("{}:{}:{reference}", kind.as_str(), state.org.id),
            sandbox_id: None,
            description,
            period_start: None,
            period_end: None,
            carry: None,
        })
        .await?;
    if inserted {
        state.balance_micros = state.balance_micros.saturating_add(amount_micros);
    }
    Ok(())
}

/// A starting ledger's balance and meters, read after any write of its
/// predecessor (see [`TickWrites`]).
async fn rebuild(state: &mut LedgerState) -> Result<(), CorralError> {
    state.balance_micros = state.ctx.store.ledger_balance(&state.org.id).await?;
    resync(state).await
}

/// Re-reads the org's live sandboxes in the mailbox (a starting ledger:
/// nothing else is handled before it is done).
async fn resync(state: &mut LedgerState) -> Result<(), CorralError> {
    let rows = state.ctx.store.live_sandboxes_of(&state.org.id).await?;
    reconcile(state, rows, &HashSet::new(), &IdSpan::default()).await
}

/// The periodic re-read: the rows are read by a task of their own (tens of
/// thousands for a big org: long enough to stall every create behind this
/// mailbox) in pages of [`RESYNC_PAGE`] in id order, each applied in a
/// [`LedgerMsg::Resynced`] of its own (300,000 rows applied at once held
/// the mailbox, and every create behind it, 283-344 ms), with a pause after
/// each (30 pages read back to back were still a 3 s burst on two cores);
/// meanwhile the ledger notes which sandboxes it hears of.
fn start_resync(myself: &ActorRef<LedgerMsg>, state: &mut LedgerState) {
    let resync = state.ticks;
    state.resyncing = Some((resync, HashSet::new()));
    let store = state.ctx.store.clone();
    let (org_id, myself) = (state.org.id.clone(), myself.clone());
    tokio::spawn(async move {
        let mut after = None;
        loop {
            let started = Instant::now();
            let rows = store
                .live_sandboxes_page(&org_id, after.as_deref(), Some(RESYNC_PAGE as u64))
                .await;
            let read_for = started.elapsed();
            // A short page (or a failed read) is the last.
            let through = match &rows {
                Ok(rows) if rows.len() == RESYNC_PAGE => rows.last().map(|row| row.id.clone()),
                _ => None,
            };
            let span = IdSpan {
                after: after.take(),
                through: through.clone(),
            };
            let last = span.is_last();
            let sent = myself.tell(LedgerMsg::Resynced { resync, span, rows });
            if sent.is_err() || last {
                break;
            }
            after = through;
            // A background check, not a deadline: paced so that reading
            // pages keeps a reader busy a fifth of the time.
            tokio::time::sleep(read_for * RESYNC_PAUSE_PER_READ).await;
        }
    });
}

/// Brings the ledger in line with the org's live sandbox `rows`, which are
/// every live one with an id in `span`: reservations follow the rows, and
/// meters start, change phase or end as the rows say (for changes whose
/// message never arrived). The sandboxes in `touched` changed after the
/// rows were read: they are left as the ledger has them, as is everything
/// outside `span`.
async fn reconcile(
    state: &mut LedgerState,
    rows: Vec<MeteredSandbox>,
    touched: &HashSet<String>,
    span: &IdSpan,
) -> Result<(), CorralError> {
    // Applied in the mailbox: tens of thousands of rows for a big org, so
    // what already matches is left alone (no clearing and re-inserting).
    let rows: Vec<&MeteredSandbox> = rows.iter().filter(|r| !touched.contains(&r.id)).collect();
    state.reservations.expire_pending(PENDING_TTL);
    // Where each sandbox that needs a new meter resumes, in a few queries
    // rather than one per sandbox (a restart meters them all at once).
    let unmetered: Vec<String> = rows
        .iter()
        .filter(|r| !state.meters.contains_key(&r.id))
        .filter(|r| {
            SandboxState::parse(&r.state)
                .and_then(metered_phase)
                .is_some()
        })
        .map(|r| r.id.clone())
        .collect();
    let last_periods = state.ctx.store.last_usage_of(&unmetered).await?;
    let mut live: HashSet<&str> = HashSet::with_capacity(rows.len());
    let mut seen: HashSet<&str> = HashSet::with_capacity(rows.len());
    for row in rows.iter().copied() {
        // Its row exists: the reservation now follows the row.
        state.reservations.remove_pending(&row.id);
        let Some(sandbox_state) = SandboxState::parse(&row.state) else {
            continue;
        };
        if !sandbox_state.holds_capacity() {
            continue;
        }
        let resources = resources_of(row);
        let held = state.hold_of(resources);
        live.insert(&row.id);
        if state.reservations.live.get(&row.id) != Some(&(resources, held)) {
            state
                .reservations
                .insert_live(row.id.clone(), resources, held);
        }
        let Some(phase) = metered_phase(sandbox_state) else {
            continue;
        };
        seen.insert(&row.id);
        match state.meters.get(&row.id).map(|m| m.phase) {
            Some(current) if current == phase => {}
            Some(_) => {
                meter_changed(
                    state,
                    &row.id,
                    Some(phase),
                    resources_of(row),
                    row.updated_at,
                )
                .await
            }
            None => {
                let meter = resume_meter(row, phase, last_periods.get(&row.id).copied());
                state.meters.insert(row.id.clone(), meter);
            }
        }
    }
    state
        .reservations
        .retain_live_in(span, |id| live.contains(id) || touched.contains(id));
    // Meters whose sandbox is no longer running nor kept: end them at the
    // row's last change (or now, for a row that is gone).
    let ended: Vec<String> = state
        .meters
        .range::<str, _>(span.bounds())
        .map(|(id, _)| id)
        .filter(|id| !seen.contains(id.as_str()) && !touched.contains(*id))
        .cloned()
        .collect();
    if ended.is_empty() {
        return Ok(());
    }
    let changed_at: HashMap<&str, DateTime<Utc>> =
        rows.iter().map(|r| (r.id.as_str(), r.updated_at)).collect();
    for id in ended {
        let at = match changed_at.get(id.as_str()) {
            Some(at) => *at,
            // Destroyed rows are not among the live ones: read it.
            None => state
                .ctx
                .store
                .get_sandbox_any_org(&id)
                .await?
                .map_or_else(Utc::now, |r| r.updated_at),
        };
        let resources = state
            .meters
            .get(&id)
            .map(|m| m.resources)
            .unwrap_or_default();
        meter_changed(state, &id, None, resources, at).await;
    }
    Ok(())
}

/// A meter for a sandbox found running or kept: it resumes after the last
/// persisted period (with its carry), or starts when the sandbox did.
fn resume_meter(
    row: &MeteredSandbox,
    phase: MeterPhase,
    last: Option<(DateTime<Utc>, i64)>,
) -> Meter {
    let since = match phase {
        MeterPhase::Running => row.started_at.unwrap_or(row.updated_at),
        MeterPhase::Stopped => row.updated_at,
    };
    let (billed_until, carry) = billing::resume_point(last, since);
    Meter {
        sandbox_id: row.id.clone(),
        resources: resources_of(row),
        phase,
        billed_until,
        written_until: billed_until,
        unwritten_micros: 0,
        carry,
    }
}

/// A sandbox changed what it does at `at`: charge the old phase up to then,
/// then meter the new one (or stop metering).
async fn meter_changed(
    state: &mut LedgerState,
    sandbox_id: &str,
    phase: Option<MeterPhase>,
    resources: Resources,
    at: DateTime<Utc>,
) {
    if let Some(meter) = state.meters.get(sandbox_id).cloned() {
        if meter.phase == phase.unwrap_or(meter.phase) && phase.is_some() {
            return;
        }
        if let Some(charge) = meter.charge(&state.plan, at) {
            if persist_closing_charges(state, vec![charge.clone()])
                .await
                .is_err()
            {
                // Not persisted: keep the meter as it was; the next tick
                // charges the whole span again with the same key.
                return;
            }
        }
        match phase {
            Some(phase) => {
                if let Some(m) = state.meters.get_mut(sandbox_id) {
                    m.phase = phase;
                    if at > m.billed_until {
                        m.billed_until = at;
                        m.written_until = at;
                    }
                }
            }
            None => {
                state.meters.remove(sandbox_id);
                state.reservations.remove(sandbox_id);
            }
        }
    } else if let Some(phase) = phase {
        state.reservations.remove_pending(sandbox_id);
        let held = state.hold_of(resources);
        state
            .reservations
            .insert_live(sandbox_id.to_string(), resources, held);
        state.meters.insert(
            sandbox_id.to_string(),
            Meter {
                sandbox_id: sandbox_id.to_string(),
                resources,
                phase,
                billed_until: at,
                written_until: at,
                unwritten_micros: 0,
                carry: 0,
            },
        );
    } else {
        state.reservations.remove(sandbox_id);
    }
}

/// Charges every meter up to `until`, in one pass: a charge that is not
/// written yet moves its meter here; the others are written by a task of
/// their own (thousands of rows for a big org: long enough to stall every
/// create behind this mailbox) and apply when it reports back in
/// [`LedgerMsg::Charged`]. Answers whether a write was started (nothing is
/// written when nothing is due).
fn charge_meters(
    myself: &ActorRef<LedgerMsg>,
    state: &mut LedgerState,
    until: DateTime<Utc>,
) -> bool {
    let (plan, write_every) = (&state.plan, state.ctx.policy.write_every);
    let mut due = Vec::new();
    // What the gate does not count yet: the part of each due charge beyond
    // what its meter already charged unwritten.
    let mut writing = 0i64;
    for meter in state.meters.values_mut() {
        let Some(charge) = meter.unnamed_charge(plan, until) else {
            continue;
        };
        if billing::is_persisted(&charge, false, write_every) {
            writing = writing.saturating_add(charge.micros.saturating_sub(meter.unwritten_micros));
            due.push(UsageCharge {
                sandbox_id: meter.sandbox_id.clone(),
                ..charge
            });
        } else {
            let moved = meter.apply(&charge, false);
            state.unwritten_micros = state.unwritten_micros.saturating_add(moved);
        }
    }
    if due.is_empty() {
        return false;
    }
    // Free unless a successor of this ledger is still reading where to
    // resume (this one is then on its way out): then nothing is written.
    let Ok(held) = state.ctx.tick_writes.of(&state.org.id).try_lock_owned() else {
        return false;
    };
    state.writing = Some(writing);
    let store = state.ctx.store.clone();
    let myself = myself.clone();
    let org_id = state.org.id.clone();
    tokio::spawn(async move {
        let mut due = due;
        let entries = entries_in_key_order(&org_id, &mut due);
        let (count, started) = (entries.len(), std::time::Instant::now());
        let written = store
            .append_ledger_entries_resting(entries, TICK_WRITE_REST)
            .await;
        drop(held);
        tracing::debug!(org.id = %org_id, entries = count, elapsed_ms = started.elapsed().as_millis() as u64, "usage written");
        let _ = myself.tell(LedgerMsg::Charged { due, written });
    });
    true
}

/// After each statement of a tick's write, the write rests this many times
/// as long as the statement took, so that it keeps SQLite's one writer
/// busy a third of the time at most. Written back to back, a tick's 20,000-
/// 30,000 entries (the sandboxes of a 3,000-creates/s burst, a minute on)
/// took the writer for 1.3-1.8 s, every create's commits queued behind
/// their statements, and at 1,500 creates/s the queue did not drain before
/// the next tick (half-rate p99 2.4 s).
const TICK_WRITE_REST: u32 = 2;

/// What every meter owes up to `until`.
fn charges_until(state: &LedgerState, until: DateTime<Utc>) -> Vec<UsageCharge> {
    state
        .meters
        .values()
        .filter_map(|m| m.charge(&state.plan, until))
        .collect()
}

/// The entries of `due`, which this sorts in the order of their keys (the
/// sandbox ids; the meters are in that order already, so the sort is a
/// check of a sorted run, and it keeps callers free to pass any order):
/// rows in random order each dirtied a page of the idempotency-key and the
/// sandbox-period indexes of their own. In order, neighbours share them
/// (150,000 rows into SQLite: 35-41 -> 3.4-5.1 us a row, 12 -> 1 KiB of
/// write-ahead log; Python's sqlite3 on the schema). The entries are in
/// the order of `due` after the sort, as applying what was written needs.
fn entries_in_key_order(org_id: &str, due: &mut [UsageCharge]) -> Vec<NewLedgerEntry> {
    due.sort_unstable_by(|a, b| a.sandbox_id.cmp(&b.sandbox_id));
    due.iter()
        .map(|c| NewLedgerEntry {
            org_id: org_id.to_string(),
            kind: "usage".into(),
            amount_micros: -c.micros,
            idempotency_key: c.idempotency_key(),
            sandbox_id: Some(c.sandbox_id.clone()),
            description: format!(
                "{} {} ms",
                match c.phase {
                    MeterPhase::Running => "running",
                    MeterPhase::Stopped => "stopped",
                },
                (c.period_end - c.period_start).num_milliseconds()
            ),
            period_start: Some(c.period_start),
            period_end: Some(c.period_end),
            carry: Some(c.carry),
        })
        .collect()
}

/// Writes charges that close a phase (a sandbox's change, a plan change):
/// each is written whatever its length, as it records where the phase
/// ended ([`billing::is_persisted`]). What was committed is applied; the
/// rest is charged again later, under the same keys, so nothing twice.
async fn persist_closing_charges(
    state: &mut LedgerState,
    mut charges: Vec<UsageCharge>,
) -> Result<(), CorralError> {
    let entries = entries_in_key_order(&state.org.id, &mut charges);
    let written = state.ctx.store.append_ledger_entries(entries).await;
    apply_charges(state, &charges, written.inserted);
    match written.failed {
        Some(err) => {
            tracing::warn!(org.id = %state.org.id, error = %err, "could not persist usage; the rest is charged on the next tick");
            Err(err)
        }
        None => Ok(()),
    }
}

/// Applies written charges to the meters and the balance (which moves for
/// those that were new: one already written is never charged again).
fn apply_charges(state: &mut LedgerState, due: &[UsageCharge], inserted: Vec<bool>) {
    for (charge, inserted) in due.iter().zip(inserted) {
        if inserted {
            state.balance_micros = state.balance_micros.saturating_sub(charge.micros);
            state.ctx.metrics.usage_charged_micros.add(charge.micros);
            state
                .ctx
                .metrics
                .timings
                .debits_by_org
                .add(&[&state.org.id], charge.micros as f64);
        }
        if let Some(meter) = state.meters.get_mut(&charge.sandbox_id) {
            let moved = meter.apply(charge, true);
            state.unwritten_micros = state.unwritten_micros.saturating_add(moved);
        }
    }
}

/// Moves the org to the status its balance calls for, and enforces it.
async fn evaluate(state: &mut LedgerState, reason: &str) {
    let current = state.status();
    let (next, deadline) = billing::next_status(
        current,
        state.org.billing_exempt,
        state.balance_now(),
        state.org.grace_deadline,
        Utc::now(),
        &state.ctx.policy,
    );
    if next != current || deadline != state.org.grace_deadline {
        let mut org = state.org.clone();
        org.billing_status = next.as_str().to_string();
        org.grace_deadline = deadline;
        match state.ctx.store.save_org(org).await {
            Ok(saved) => state.org = saved,
            Err(err) => {
                tracing::warn!(org.id = %state.org.id, error = %err, "could not record the billing status; retrying on the next tick");
                return;
            }
        }
        if next != current {
            let transition = BillingTransition {
                org_id: state.org.id.clone(),
                from: current,
                to: next,
                balance_micros: state.balance_now(),
                reason: reason.to_string(),
            };
            if let Err(err) = state
                .ctx
                .store
                .record_billing_event(
                    &transition.org_id,
                    current,
                    next,
                    state.balance_now(),
                    reason,
                )
                .await
            {
                tracing::warn!(org.id = %state.org.id, error = %err, "could not record the billing event");
            }
            state.ctx.metrics.billing_transitions.inc();
            state.ctx.metrics.events.publish(
                &state.org.id,
                crate::events::EventKind::Billing {
                    from: current.as_str().to_string(),
                    to: next.as_str().to_string(),
                    balance_micros: state.balance_now(),
                },
            );
            state.ctx.hook.status_changed(&transition);
        }
    }
    if next == BillingStatus::Suspended {
        suspend_running(state);
    }
}

/// Stops every sandbox of a suspended org that still runs (again on every
/// tick, so one that finishes starting later is stopped too).
fn suspend_running(state: &LedgerState) {
    for meter in state
        .meters
        .values()
        .filter(|m| m.phase == MeterPhase::Running)
    {
        tracing::info!(org.id = %state.org.id, sandbox.id = %meter.sandbox_id, "stopping a sandbox of a suspended org");
        let stop = || {
            let (reply, _) = tokio::sync::oneshot::channel();
            SandboxMsg::SetDesired {
                desired: DesiredState::Stopped,
                reply: reply.into(),
                span: tracing::Span::none(),
            }
        };
        let name = names::sandbox(&state.ctx.prefix, &meter.sandbox_id);
        if let Some(cell) = ractor::registry::where_is(name) {
            let _ = ActorRef::<SandboxMsg>::from(cell).tell(stop());
            continue;
        }
        // A dormant sandbox is woken by its host (found from its row).
        let (store, prefix) = (state.ctx.store.clone(), state.ctx.prefix.clone());
        let sandbox_id = meter.sandbox_id.clone();
        tokio::spawn(async move {
            if let Ok(Some(row)) = store.get_sandbox_any_org(&sandbox_id).await {
                if let Ok(actor) = super::host::wake_sandbox(&prefix, &row).await {
                    let _ = actor.tell(stop());
                }
            }
        });
    }
}

async fn configure(state: &mut LedgerState, settings: BillingSettings) -> Result<(), CorralError> {
    let mut org = state.org.clone();
    let mut plan = state.plan.clone();
    if let Some(plan_id) = settings.plan_id {
        plan = load_plan(&state.ctx.store, Some(&plan_id)).await?;
        org.plan_id = Some(plan_id);
    }
    if let Some(exempt) = settings.exempt {
        org.billing_exempt = exempt;
    }
    if let Some(quota) = settings.quota {
        let limit = |v: Option<u64>| v.map(|v| i64::try_from(v).unwrap_or(i64::MAX));
        org.max_sandboxes = limit(quota.max_sandboxes);
        org.max_cpu_millis = limit(quota.max_cpu_millis);
        org.max_memory_mb = limit(quota.max_memory_mb);
        org.max_ttl_seconds = limit(quota.max_ttl_seconds);
    }
    if plan != state.plan {
        // Time so far is charged at the old prices (or the plan stays).
        // Written whatever their length: a restart re-prices what was not.
        let charges = charges_until(state, Utc::now());
        persist_closing_charges(state, charges).await?;
    }
    state.org = state.ctx.store.save_org(org).await?;
    state.plan = plan;
    let (plan, window) = (&state.plan, state.ctx.policy.hold_window);
    state.reservations.reprice(|r| plan.hold(r, window));
    Ok(())
}

async fn audit(state: &LedgerState) -> Result<LedgerAudit, CorralError> {
    let store = &state.ctx.store;
    let entries_sum_micros = store.ledger_balance(&state.org.id).await?;
    let mut periods: HashMap<String, Vec<billing::Period>> = HashMap::new();
    for entry in store.all_usage(&state.org.id).await? {
        if let (Some(sandbox), Some(start), Some(end)) =
            (entry.sandbox_id, entry.period_start, entry.period_end)
        {
            periods.entry(sandbox).or_default().push((start, end));
        }
    }
    let overlapping_periods = periods
        .values_mut()
        .map(|spans| billing::overlapping(spans))
        .sum();
    Ok(LedgerAudit {
        org_id: state.org.id.clone(),
        balance_micros: state.balance_micros,
        entries_sum_micros,
        overlapping_periods,
        ok: entries_sum_micros == state.balance_micros && overlapping_periods == 0,
    })
}

pub enum OrgsMsg {
    /// The ledger actor of an org (started if needed).
    Ledger(
        String,
        RpcReplyPort<Result<ActorRef<LedgerMsg>, CorralError>>,
    ),
    /// Hands a message to an org's ledger (started if needed).
    Forward { org_id: String, message: LedgerMsg },
}

pub struct OrgsArgs {
    pub context: BillingContext,
}

pub struct OrgsState {
    /// Counts this actor's mailbox while the actor lives (see `mailbox`).
    _mailbox: mailbox::Open,
    args: OrgsArgs,
    ledgers: HashMap<String, ActorRef<LedgerMsg>>,
    by_actor: HashMap<ActorId, String>,
    restarts: RestartBudget<String>,
}

pub struct OrgsSupervisor;

impl Actor for OrgsSupervisor {
    type Msg = OrgsMsg;
    type State = OrgsState;
    type Arguments = OrgsArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: OrgsArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let mailbox = mailbox::open(myself.get_id(), "orgs");
        let mut state = OrgsState {
            _mailbox: mailbox,
            args,
            ledgers: HashMap::new(),
            by_actor: HashMap::new(),
            restarts: RestartBudget::new(RestartPolicy::default()),
        };
        // Every org is metered from the start, whether or not anyone asks.
        for org in state.args.context.store.list_orgs().await? {
            ledger(&myself, &mut state, &org.id).await?;
        }
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
            OrgsMsg::Ledger(org_id, reply) => {
                let _ = reply.send(ledger(&myself, state, &org_id).await);
            }
            OrgsMsg::Forward { org_id, message } => match ledger(&myself, state, &org_id).await {
                Ok(ledger) => {
                    let _ = ledger.tell(message);
                }
                Err(err) => {
                    tracing::warn!(org.id = %org_id, error = %err, "no ledger for a billing message; the next resync covers it");
                }
            },
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
            SupervisionEvent::ActorTerminated(cell, ..) => {
                state.args.context.metrics.registry.gone(&cell);
                if let Some(org_id) = state.by_actor.remove(&cell.get_id()) {
                    state.ledgers.remove(&org_id);
                }
            }
            SupervisionEvent::ActorFailed(cell, error) => {
                if let Some(org_id) = state.by_actor.remove(&cell.get_id()) {
                    state.ledgers.remove(&org_id);
                    state
                        .args
                        .context
                        .metrics
                        .actor_failed("ledger", &cell, &error.to_string());
                    if !state.restarts.allow_restart(&org_id, Instant::now()) {
                        return Err(format!("ledger {org_id} keeps failing (last: {error})").into());
                    }
                    // Restarted at once: metering must not wait for a request.
                    tracing::error!(org.id = %org_id, %error, "ledger actor failed; restarting it from its entries");
                    if let Err(err) = ledger(&myself, state, &org_id).await {
                        tracing::error!(org.id = %org_id, error = %err, "could not restart the ledger; it starts on next use");
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }
}

async fn ledger(
    myself: &ActorRef<OrgsMsg>,
    state: &mut OrgsState,
    org_id: &str,
) -> Result<ActorRef<LedgerMsg>, CorralError> {
    if let Some(ledger) = state.ledgers.get(org_id) {
        return Ok(ledger.clone());
    }
    let name = names::ledger(&state.args.context.prefix, org_id);
    super::await_name_free(&name).await;
    let (ledger, _) = Actor::spawn_linked(
        Some(name),
        LedgerActor,
        LedgerArgs {
            org_id: org_id.to_string(),
            context: state.args.context.clone(),
        },
        myself.get_cell(),
    )
    .await
    .map_err(|err| CorralError::Database(err.to_string()))?;
    state
        .args
        .context
        .metrics
        .registry
        .started(&ledger.get_cell(), Some(org_id));
    state.by_actor.insert(ledger.get_id(), org_id.to_string());
    state.ledgers.insert(org_id.to_string(), ledger.clone());
    Ok(ledger)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::sandbox;
    use sea_orm::sqlx::{Connection, SqliteConnection};

    const DEPOSIT: i64 = 600_000;

    /// The running totals equal a sum over the reservations after every
    /// kind of change, including an id both pending and live, replaced
    /// entries, expiry and a plan change.
    #[test]
    fn reservation_totals_follow_every_change() {
        fn recount(r: &Reservations) -> (u64, u128, u128, i128) {
            let live = r.live.values().map(|(res, held)| (*res, *held));
            let pending = r.pending.values().map(|(res, held, _)| (*res, *held));
            live.chain(pending)
                .fold((0, 0, 0, 0), |(n, c, m, h), (res, held)| {
                    (
                        n + 1,
                        c + u128::from(res.cpu_millis),
                        m + u128::from(res.memory_mb),
                        h + i128::from(held),
                    )
                })
        }
        fn check(r: &Reservations) {
            assert_eq!(
                (r.count, r.cpu_millis, r.memory_mb, r.held_micros),
                recount(r)
            );
            assert_eq!(r.usage().sandboxes, r.count);
        }
        let res = |cpu, mem| Resources {
            cpu_millis: cpu,
            memory_mb: mem,
        };
        let mut r = Reservations::default();
        r.insert_pending("a".into(), res(100, 64), 10);
        r.insert_pending("b".into(), res(200, 128), 20);
        check(&r);
        assert_eq!((r.usage().cpu_millis, r.held_micros()), (300, 30));
        // "a" gets its row: both, until the pending one is removed.
        r.insert_live("a".into(), res(100, 64), 10);
        check(&r);
        assert_eq!(r.usage().sandboxes, 3);
        r.remove_pending("a");
        r.insert_live("a".into(), res(400, 64), 40);
        check(&r);
        assert_eq!((r.usage().cpu_millis, r.held_micros()), (600, 60));
        r.remove("b");
        r.remove("missing");
        check(&r);
        assert_eq!(r.usage().sandboxes, 1);
        r.insert_pending("c".into(), res(1, 1), 1);
        r.expire_pending(Duration::ZERO);
        check(&r);
        assert!(r.pending.is_empty());
        r.reprice(|res| i64::try_from(res.cpu_millis).unwrap_or(0) * 2);
        check(&r);
        assert_eq!(r.held_micros(), 800);
        r.insert_live("d".into(), res(5, 5), 5);
        r.retain_live_in(&IdSpan::default(), |id| id == "d");
        check(&r);
        assert_eq!((r.usage().cpu_millis, r.held_micros()), (5, 5));
        r.insert_live("e".into(), res(7, 7), 7);
        r.insert_live("f".into(), res(11, 11), 11);
        let d_to_e = IdSpan {
            after: Some("d".into()),
            through: Some("e".into()),
        };
        r.retain_live_in(&d_to_e, |_| false);
        check(&r);
        assert_eq!(
            r.live.keys().collect::<Vec<_>>(),
            ["d", "f"],
            "only the span's own were dropped"
        );
        r.retain_live_in(&IdSpan::default(), |_| false);
        check(&r);
        assert_eq!((r.usage(), r.held_micros()), (Usage::default(), 0));
    }

    fn running_row(org_id: &str, hours_ago: i64) -> sandbox::Model {
        let started = Utc::now() - chrono::Duration::hours(hours_ago);
        sandbox::Model {
            cpu_millis: 1_000,
            created_at: started,
            updated_at: started,
            started_at: Some(started),
            ..sandbox::Model::for_test(org_id, "hst_1", SandboxState::Running)
        }
    }

    async fn authorize(ledger: &ActorRef<LedgerMsg>) -> Result<Option<u64>, CorralError> {
        let asked = ledger.ask(
            |reply| LedgerMsg::AuthorizeCreate {
                sandbox_id: crate::domain::new_id("sbx"),
                resources: Resources {
                    cpu_millis: 100,
                    memory_mb: 64,
                },
                ttl_seconds: None,
                reply,
            },
            Some(Duration::from_secs(2)),
        );
        match asked.await {
            Ok(ractor::rpc::CallResult::Success(result)) => result,
            _ => panic!("the ledger did not answer an authorization within 2 s"),
        }
    }

    struct Org {
        _dir: tempfile::TempDir,
        url: String,
        store: Store,
        id: String,
        sandbox_id: String,
        context: BillingContext,
    }

    /// An org with a deposit and one sandbox that has run for 20 hours at
    /// one vCPU (about 1.0 M micro-units at the default plan, more than the
    /// deposit), on a SQLite file.
    async fn org_with_a_long_running_sandbox() -> Org {
        let dir = tempfile::tempdir().expect("a temp dir");
        let url = format!("sqlite://{}?mode=rwc", dir.path().join("c.db").display());
        let store = Store::connect(&url).await.expect("the store opens");
        let org = store.create_org("acme").await.expect("an org");
        store
            .append_ledger_entry(NewLedgerEntry {
                org_id: org.id.clone(),
                kind: "deposit".into(),
                amount_micros: DEPOSIT,
                idempotency_key: "deposit-1".into(),
                sandbox_id: None,
                description: "test".into(),
                period_start: None,
                period_end: None,
                carry: None,
            })
            .await
            .expect("a deposit");
        let sandbox = store
            .insert_sandbox(running_row(&org.id, 20))
            .await
            .expect("a sandbox");
        let context = BillingContext {
            store: store.clone(),
            // Ticks come from the test only.
            policy: BillingPolicy {
                interval: Duration::from_secs(3600),
                ..BillingPolicy::default()
            },
            hook: Arc::new(LogHook),
            metrics: Metrics::default(),
            prefix: "t/".into(),
            tick_writes: TickWrites::default(),
        };
        Org {
            _dir: dir,
            url,
            store,
            id: org.id,
            sandbox_id: sandbox.id,
            context,
        }
    }

    async fn start_ledger(org: &Org) -> ActorRef<LedgerMsg> {
        let (ledger, _) = Actor::spawn(
            None,
            LedgerActor,
            LedgerArgs {
                org_id: org.id.clone(),
                context: org.context.clone(),
            },
        )
        .await
        .expect("the ledger starts");
        ledger
    }

    /// Another connection holding SQLite's write lock: a tick's write waits
    /// on it (up to the 5 s busy timeout); reads go on.
    async fn lock_writes(url: &str) -> SqliteConnection {
        let mut lock = SqliteConnection::connect(url).await.expect("a connection");
        sea_orm::sqlx::query("BEGIN IMMEDIATE")
            .execute(&mut lock)
            .await
            .expect("the write lock");
        lock
    }

    async fn unlock_writes(mut lock: SqliteConnection) {
        sea_orm::sqlx::query("ROLLBACK")
            .execute(&mut lock)
            .await
            .expect("the lock released");
    }

    /// A tick's usage entries are written beside the mailbox: while the
    /// database is locked under the write, creates are still answered (and
    /// gated as if the debit had landed), and what reads the balance waits
    /// for the write, then sees it once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn creates_are_gated_during_a_tick_write_counting_its_debits() {
        let org = org_with_a_long_running_sandbox().await;
        let ledger = start_ledger(&org).await;
        assert!(
            authorize(&ledger).await.is_ok(),
            "affordable before the tick"
        );

        let lock = lock_writes(&org.url).await;
        ledger.tell(LedgerMsg::Tick).expect("a tick");
        let refused = authorize(&ledger).await;
        assert!(
            matches!(refused, Err(CorralError::PaymentRequired(_))),
            "answered during the write, counting its debit: {refused:?}"
        );
        // Asked while the write still waits on the lock.
        let (reply, summary) = ractor::concurrency::oneshot();
        ledger
            .tell(LedgerMsg::Summary(reply.into()))
            .expect("a summary request");
        unlock_writes(lock).await;
        let summary = tokio::time::timeout(Duration::from_secs(10), summary)
            .await
            .expect("a summary after the write")
            .expect("the ledger answers");
        assert!(
            summary.balance_micros < 0 && summary.balance_micros > DEPOSIT - 1_100_000,
            "the summary waited for the tick's debit: {}",
            summary.balance_micros
        );
        assert_eq!(
            org.store
                .ledger_balance(&org.id)
                .await
                .expect("the balance"),
            summary.balance_micros,
            "written once, applied once"
        );
        ledger.stop(None);
    }

    /// A ledger that dies while its tick's write waits on the database, and
    /// its successor: the successor reads where metering resumes only after
    /// that write, so its charges continue from the written period's end:
    /// no instant charged twice, none left out.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_ledger_restarted_during_its_tick_write_resumes_after_it() {
        let org = org_with_a_long_running_sandbox().await;
        let first = start_ledger(&org).await;
        let lock = lock_writes(&org.url).await;
        first.tell(LedgerMsg::Tick).expect("a tick");
        // The write is under way once the gate counts it.
        let refused = authorize(&first).await;
        assert!(matches!(refused, Err(CorralError::PaymentRequired(_))));
        first.kill();
        let successor = start_ledger(&org).await;
        // It answers nothing while the write it must follow is pending (a
        // bounded wait for something that must not happen: it can only let
        // a broken build pass, never fail a correct one).
        let (reply, early) = ractor::concurrency::oneshot();
        successor
            .tell(LedgerMsg::Summary(reply.into()))
            .expect("a summary request");
        let mut early = Box::pin(early);
        assert!(
            tokio::time::timeout(Duration::from_millis(300), &mut early)
                .await
                .is_err(),
            "the successor read the ledger before its predecessor's write ended"
        );
        unlock_writes(lock).await;
        let after_write = tokio::time::timeout(Duration::from_secs(10), early)
            .await
            .expect("a summary once the write ended")
            .expect("the ledger answers");
        assert!(after_write.balance_micros < 0, "{after_write:?}");
        // The sandbox stops: its closing charge is always written, from
        // where the successor resumed.
        successor
            .tell(sandbox_ended(&org))
            .expect("a metering change");
        let balance = summary_of(&successor).await.balance_micros;
        let mut periods: Vec<_> = org
            .store
            .all_usage(&org.id)
            .await
            .expect("the usage")
            .into_iter()
            .filter_map(|e| e.period_start.zip(e.period_end))
            .collect();
        periods.sort();
        assert_eq!(
            periods.len(),
            2,
            "the tick's and the closing one: {periods:?}"
        );
        assert_eq!(periods[0].1, periods[1].0, "contiguous: {periods:?}");
        assert_eq!(
            org.store
                .ledger_balance(&org.id)
                .await
                .expect("the balance"),
            balance
        );
        successor.stop(None);
    }
    /// Inserts `count` (a multiple of 500) rows made by `row`, in one
    /// transaction.
    async fn insert_rows(org: &Org, count: usize, row: impl Fn() -> sandbox::Model) {
        use sea_orm::{ActiveModelTrait, EntityTrait, IntoActiveModel, TransactionTrait};
        let txn = org.store.connection().begin().await.expect("a transaction");
        for _ in 0..count / 500 {
            sandbox::Entity::insert_many((0..500).map(|_| row().into_active_model().reset_all()))
                .exec(&txn)
                .await
                .expect("rows");
        }
        txn.commit().await.expect("committed");
    }

    /// Every tick before the one that starts the periodic re-read, each
    /// handled in full.
    async fn ticks_before_the_re_read(ledger: &ActorRef<LedgerMsg>) {
        for _ in 1..RESYNC_EVERY_TICKS {
            ledger.tell(LedgerMsg::Tick).expect("a tick");
            summary_of(ledger).await;
        }
    }

    /// Waits until the org's ledger applied a periodic re-read in full.
    async fn re_read_applied(org: &Org) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while org.context.metrics.ledger_resyncs.get() == 0 {
            assert!(
                Instant::now() < deadline,
                "the re-read was not applied in 30 s"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// A re-read of more rows than a page, applied page by page: changes
    /// the ledger never heard of are found in every page (the first, a
    /// middle and the last one, and a row added after the last id), and no
    /// page ends the meters of another (the last would end all of them).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_paged_re_read_finds_changes_in_every_page_and_only_those() {
        use sea_orm::sea_query::Expr;
        use sea_orm::{ColumnTrait, EntityTrait, QueryFilter};
        const RUNNING: usize = 2 * RESYNC_PAGE + RESYNC_PAGE / 2;
        let org = org_with_a_long_running_sandbox().await;
        insert_rows(&org, RUNNING, || running_row(&org.id, 20)).await;
        let ledger = start_ledger(&org).await;
        ticks_before_the_re_read(&ledger).await;
        let before = summary_of(&ledger).await;
        assert_eq!(before.usage.sandboxes, RUNNING as u64 + 1);

        // Behind the ledger's back: three rows gone (in the first, the
        // second and the last page) and one new after every other id.
        let mut ids: Vec<String> = org
            .store
            .live_sandboxes_of(&org.id)
            .await
            .expect("rows")
            .into_iter()
            .map(|row| row.id)
            .collect();
        ids.sort();
        let gone = vec![
            ids[5].clone(),
            ids[RESYNC_PAGE + 5].clone(),
            ids[RUNNING - 5].clone(),
        ];
        sandbox::Entity::update_many()
            .col_expr(
                sandbox::Column::State,
                Expr::value(SandboxState::Destroyed.as_str()),
            )
            .col_expr(sandbox::Column::UpdatedAt, Expr::value(Utc::now()))
            .filter(sandbox::Column::Id.is_in(gone.clone()))
            .exec(org.store.connection())
            .await
            .expect("destroyed");
        org.store
            .insert_sandbox(running_row(&org.id, 1))
            .await
            .expect("a new sandbox");

        ledger
            .tell(LedgerMsg::Tick)
            .expect("the tick that starts the re-read");
        re_read_applied(&org).await;
        let after = summary_of(&ledger).await;
        assert_eq!(
            after.usage.sandboxes,
            RUNNING as u64 + 1 - 3 + 1,
            "{after:?}"
        );
        let per_sandbox = before.burn_rate_micros_per_hour / (RUNNING as i64 + 1);
        assert_eq!(
            after.burn_rate_micros_per_hour,
            per_sandbox * (RUNNING as i64 - 1),
            "three meters ended, one started"
        );
        ledger.stop(None);
    }

    /// The org's sandbox ended now, as its SandboxActor tells it.
    fn sandbox_ended(org: &Org) -> LedgerMsg {
        LedgerMsg::Meter {
            sandbox_id: org.sandbox_id.clone(),
            phase: None,
            resources: Resources {
                cpu_millis: 1_000,
                memory_mb: 64,
            },
            at: Utc::now(),
        }
    }

    async fn summary_of(ledger: &ActorRef<LedgerMsg>) -> LedgerSummary {
        match ledger
            .ask(LedgerMsg::Summary, Some(Duration::from_secs(10)))
            .await
        {
            Ok(ractor::rpc::CallResult::Success(summary)) => summary,
            _ => panic!("no summary within 10 s"),
        }
    }

    /// A tick's usage entries reach the database in the order of their
    /// keys (see `charge_meters`), whatever the order of the meters.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_tick_writes_its_entries_in_the_order_of_their_keys() {
        let org = org_with_a_long_running_sandbox().await;
        for _ in 0..30 {
            org.store
                .insert_sandbox(running_row(&org.id, 20))
                .await
                .expect("a sandbox");
        }
        let ledger = start_ledger(&org).await;
        ledger.tell(LedgerMsg::Tick).expect("a tick");
        // Answered once the tick's write is applied.
        summary_of(&ledger).await;
        let keys: Vec<String> = org
            .store
            .all_usage(&org.id)
            .await
            .expect("the usage")
            .into_iter()
            .map(|entry| entry.idempotency_key)
            .collect();
        assert_eq!(keys.len(), 31, "one entry a sandbox");
        let mut sorted = keys.clone();
        sorted.sort();
        assert_eq!(keys, sorted, "written in key order");
        ledger.stop(None);
    }

    /// The periodic re-read of the rows is applied after the ledger heard
    /// of a change the rows do not show yet (the sandbox ended while its
    /// many rows were being read): the change stands; the meter is not
    /// brought back from the older row.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_change_heard_during_a_re_read_is_not_undone_by_it() {
        const CREATING: usize = 20_000;
        let org = org_with_a_long_running_sandbox().await;
        // Enough rows that reading them takes far longer than handling the
        // message that follows the tick.
        insert_rows(&org, CREATING, || {
            sandbox::Model::for_test(&org.id, "hst_1", SandboxState::Creating)
        })
        .await;
        let ledger = start_ledger(&org).await;
        ticks_before_the_re_read(&ledger).await;
        assert_eq!(org.context.metrics.ledger_resyncs.get(), 0);
        assert!(summary_of(&ledger).await.burn_rate_micros_per_hour > 0);

        // The tick that starts the re-read, and the sandbox's end right
        // behind it.
        ledger.tell(LedgerMsg::Tick).expect("a tick");
        ledger.tell(sandbox_ended(&org)).expect("a metering change");
        re_read_applied(&org).await;
        let summary = summary_of(&ledger).await;
        assert_eq!(
            summary.burn_rate_micros_per_hour, 0,
            "the ended sandbox is metered again: {summary:?}"
        );
        assert_eq!(summary.usage.sandboxes, CREATING as u64, "{summary:?}");
        ledger.stop(None);
    }
}

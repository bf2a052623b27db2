//! The SandboxActor: one per sandbox that is not destroyed, and the only
//! writer of its row. Its mailbox serialises the sandbox's lifecycle, so a
//! delete that races a create waits for it and then undoes it (LESSONS 16).
//!
//! It works like a reconciler: the row carries `desired_state` next to
//! `state`; [`SandboxActor::converge`] takes one step at a time toward the
//! desired state, persisting the intent (`creating`, `stopping`, ...) before
//! sending the command to the host and the outcome when the host answers.
//! A host fault (disconnected, timed out, busy) leaves the transitional state
//! in place and schedules another attempt; a definite refusal from the host
//! (an unknown image, a runtime error on create) fails the sandbox with a
//! reason. Execs run beside the mailbox: they do not change the lifecycle.
//!
//! It also enforces what no request asks for: the TTL (a timer at
//! `expires_at` sets the desired state to destroyed), the deadline of every
//! transitional state (`transition_deadline`), and what the host reports on
//! its own (exits, absences, a sandbox that comes back after its host was
//! offline). Observations older than the actor's last change are stale and
//! ignored, so an inventory taken before a step finished cannot undo it.
//!
//! A sandbox with nothing to do (converged; no step, retry or request in
//! flight) for [`Timeouts::dormant_after`] goes dormant: it asks its host
//! ([`HostMsg::Resting`]), which holds what may still concern it from then
//! on and answers [`SandboxMsg::Sleep`]; the actor stops unless something
//! happened in between. The host keeps a [`Dormant`] of it (a few dozen
//! bytes, against kilobytes for an actor) and wakes an actor from the row
//! when a request, a report that disagrees, the TTL or the host's own fate
//! concerns it again. Its row is the whole of its state, as it is after a
//! restart, so a woken actor is the sandbox as it was.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use chrono::Utc;
use corral_proto::pb;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tracing::Instrument;

use std::collections::BTreeSet;

use super::fleet::FleetMsg;
use super::host::HostMsg;
use super::ledger::{metered_phase, LedgerMsg, OrgsMsg};
use super::scheduler::SchedulerMsg;
use super::Timeouts;
use crate::domain::{DesiredState, ExecOutcome, ExecSpec, RestartPolicy, SandboxState};
use crate::error::{CorralError, HostErrorCode};
use crate::mailbox::{self, Tell};
use crate::metrics::Metrics;
use crate::store::{sandbox, Store};

pub type SandboxReply = Result<sandbox::Model, CorralError>;

pub enum SandboxMsg {
    /// Drive the sandbox toward its desired state; answer with the row.
    Converge(Option<RpcReplyPort<SandboxReply>>),
    /// Change the desired state, then converge.
    /// `span` is the requester's: the work done for it joins its trace
    /// (`Span::none()` when there is none).
    SetDesired {
        desired: DesiredState,
        reply: RpcReplyPort<SandboxReply>,
        span: tracing::Span,
    },
    /// Change the desired state and answer once it is persisted, then
    /// converge: a request answered without waiting is still durable.
    SetDesiredNoWait {
        desired: DesiredState,
        reply: RpcReplyPort<SandboxReply>,
        span: tracing::Span,
    },
    Exec {
        spec: ExecSpec,
        reply: RpcReplyPort<Result<ExecOutcome, CorralError>>,
        span: tracing::Span,
    },
    /// The host reported this sandbox's status (event or inventory), as it
    /// was at `as_of`.
    Observed {
        status: pb::SandboxStatus,
        reason: String,
        as_of: Instant,
    },
    /// The host's offline grace ran out.
    HostOffline,
    /// The host is being drained: move the sandbox to another host
    /// (`on_host_loss`) or stop it (`never`), killing it if it has not
    /// exited `grace` after being asked to stop.
    Drain { grace: Duration },
    /// The TTL timer fired.
    Expire,
    /// Time to see whether the sandbox has had nothing to do for
    /// [`Timeouts::dormant_after`].
    Rest,
    /// Its host agreed that it goes dormant: its actor stops, unless
    /// something concerned it since it asked.
    Sleep,
    /// Fault injection for the supervision tests: panic in the handler.
    #[doc(hidden)]
    InjectPanic,
}

pub struct SandboxArgs {
    pub row: sandbox::Model,
    /// Insert the row in `pre_start` (a new sandbox) rather than trust it.
    pub insert: bool,
    pub store: Store,
    pub host: ActorRef<HostMsg>,
    pub scheduler: ActorRef<SchedulerMsg>,
    /// Where metering changes go (to the org's ledger).
    pub orgs: ActorRef<OrgsMsg>,
    pub timeouts: Timeouts,
    pub metrics: Metrics,
    /// Answered with the outcome of the first convergence (the creator
    /// waiting for "running").
    pub waiter: Option<RpcReplyPort<SandboxReply>>,
    /// The creator's span: the first convergence joins its trace.
    pub span: tracing::Span,
    /// Where the sandbox goes when it moves to another host.
    pub fleet: ActorRef<FleetMsg>,
    /// Hosts a create is tried on before it fails.
    pub max_create_attempts: u32,
    /// Hosts that already failed this sandbox's create (or were lost or
    /// drained under it).
    pub tried: BTreeSet<String>,
}

/// Why a sandbox is being placed again.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Relocation {
    /// Its host refused the create for a reason of its own.
    CreateFailed(String),
    /// Its host went offline.
    HostLost,
    /// Its host is being drained.
    Drain,
}

pub struct SandboxActorState {
    /// Counts this actor's mailbox while the actor lives (see `mailbox`).
    _mailbox: mailbox::Open,
    row: sandbox::Model,
    store: Store,
    host: ActorRef<HostMsg>,
    scheduler: ActorRef<SchedulerMsg>,
    orgs: ActorRef<OrgsMsg>,
    timeouts: Timeouts,
    metrics: Metrics,
    /// When the actor last changed the row: observations taken before it
    /// are stale.
    last_change: Instant,
    /// Since when the sandbox has been in its current transitional state.
    transition_since: Option<Instant>,
    /// Consecutive host faults, for the retry backoff.
    faults: u32,
    retry_scheduled: bool,
    waiter: Option<RpcReplyPort<SandboxReply>>,
    /// The span of the request being served, while it is: its steps are
    /// traced under it (retries and reconciliation start traces of their
    /// own).
    parent: Option<tracing::Span>,
    fleet: ActorRef<FleetMsg>,
    max_create_attempts: u32,
    tried: BTreeSet<String>,
    /// Set by a step that decided the sandbox must go to another host.
    relocating: Option<Relocation>,
    /// How long a stop waits for the process to exit before killing it:
    /// the server's stop grace, or a drain's shorter deadline.
    stop_grace: Duration,
    /// When a request, a change or a command last concerned the sandbox
    /// (reports that agree with the row do not count): idle since then.
    touched: Instant,
    /// A [`SandboxMsg::Rest`] is on its way.
    rest_timer: bool,
    /// `touched` as it was when the actor told its host it was idle; the
    /// host's [`SandboxMsg::Sleep`] is obeyed only if it has not moved.
    resting: Option<Instant>,
    /// The TTL timer, cancelled when the actor stops (a pending timer holds
    /// the actor's cell, mailboxes and all, until it fires).
    ttl_timer: Option<tokio::task::AbortHandle>,
}

/// The reason an actor gives when it stops for its sandbox to go dormant
/// (how its host tells that from a destroy or a move).
pub const DORMANT: &str = "dormant";

/// What the host keeps of a dormant sandbox: enough to tell whether a
/// report of the host concerns it, and when its TTL runs out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dormant {
    pub state: SandboxState,
    /// The actor's last change: reports taken before it are stale.
    pub since: Instant,
    pub expires_at: Option<chrono::DateTime<Utc>>,
}

impl Dormant {
    /// The sandbox of `row` as a dormant one, if it has nothing to do: in a
    /// settled state (not a step, not waiting for one), already where it
    /// should be. `since` is when the row last changed.
    pub fn of(row: &sandbox::Model, since: Instant) -> Option<Self> {
        let state = state_of(row);
        let settled = !state.is_terminal()
            && !state.is_transitional()
            && !matches!(state, SandboxState::Pending | SandboxState::Scheduled)
            && next_step(state, desired_of(row)).is_none();
        settled.then_some(Self {
            state,
            since,
            expires_at: row.expires_at,
        })
    }

    /// Whether the host's report `status`, taken at `as_of`, needs the
    /// sandbox's actor: anything but agreement with where it rests (the
    /// decision an actor would take, [`observation`]).
    pub fn concerned_by(&self, status: &pb::SandboxStatus, as_of: Instant) -> bool {
        as_of >= self.since
            && observed_state(status.phase).is_some_and(|observed| {
                !matches!(
                    observation(self.state, observed),
                    Observation::Agrees | Observation::Nothing
                )
            })
    }
}

pub struct SandboxActor;

fn state_of(row: &sandbox::Model) -> SandboxState {
    SandboxState::parse(&row.state).unwrap_or(SandboxState::Failed)
}

fn desired_of(row: &sandbox::Model) -> DesiredState {
    DesiredState::parse(&row.desired_state).unwrap_or(DesiredState::Destroyed)
}

/// The next command to send for a sandbox in `state` that should be in
/// `desired`, with the transitional state to persist first. `None` means
/// converged (or nothing more can be done, as for a failed sandbox).
pub fn next_step(state: SandboxState, desired: DesiredState) -> Option<Step> {
    use DesiredState as D;
    use SandboxState as S;
    match (state, desired) {
        (S::Destroyed, _) => None,
        (S::Failed | S::Lost, D::Running | D::Stopped) => None,
        (_, D::Destroyed) => Some(Step::Destroy),
        (S::Pending | S::Scheduled | S::Creating, _) => Some(Step::Create),
        (S::Stopped | S::Starting, D::Running) => Some(Step::Start),
        (S::Running | S::Stopping, D::Stopped) => Some(Step::Stop),
        (S::Starting, D::Stopped) => Some(Step::Stop),
        (S::Stopping, D::Running) => Some(Step::Start),
        (S::Running, D::Running) | (S::Stopped, D::Stopped) => None,
        (S::Destroying, _) => Some(Step::Destroy),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Create,
    Start,
    Stop,
    Destroy,
}

impl Step {
    fn transitional(self) -> SandboxState {
        match self {
            Step::Create => SandboxState::Creating,
            Step::Start => SandboxState::Starting,
            Step::Stop => SandboxState::Stopping,
            Step::Destroy => SandboxState::Destroying,
        }
    }
}

fn json_map(value: &serde_json::Value) -> BTreeMap<String, String> {
    serde_json::from_value(value.clone()).unwrap_or_default()
}

/// The sandbox's secret env in plaintext, for the create message only.
fn open_secret_env(
    store: &Store,
    row: &sandbox::Model,
) -> Result<BTreeMap<String, String>, CorralError> {
    let Some(sealed) = row
        .secret_env
        .as_ref()
        .filter(|v| v.as_object().is_some_and(|m| !m.is_empty()))
    else {
        return Ok(BTreeMap::new());
    };
    let sealer = store.secrets().ok_or_else(|| {
        CorralError::InvalidState(
            "the control plane has no secret key to decrypt secret_env".into(),
        )
    })?;
    sealer.open_env(&row.id, sealed).map_err(|_| {
        CorralError::InvalidState(
            "secret_env cannot be decrypted with the configured secret key".into(),
        )
    })
}

/// The hardening options stored with the sandbox (defaults when none).
fn security_of(row: &sandbox::Model) -> crate::domain::SandboxSecurity {
    row.security
        .as_ref()
        .and_then(|v| serde_json::from_value(v.clone()).ok())
        .unwrap_or_default()
}

fn observed_state(phase: i32) -> Option<SandboxState> {
    match pb::SandboxPhase::try_from(phase).ok()? {
        pb::SandboxPhase::Running => Some(SandboxState::Running),
        pb::SandboxPhase::Stopped => Some(SandboxState::Stopped),
        pb::SandboxPhase::Created => Some(SandboxState::Creating),
        pb::SandboxPhase::Absent => Some(SandboxState::Destroyed),
        pb::SandboxPhase::Unspecified => None,
    }
}

impl Actor for SandboxActor {
    type Msg = SandboxMsg;
    type State = SandboxActorState;
    type Arguments = SandboxArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: SandboxArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let mailbox = mailbox::open(myself.get_id(), "sandbox");
        // Persist the intent before anything is sent to a host.
        let row = if args.insert {
            let row = args.store.insert_sandbox(args.row).await?;
            args.metrics.events.publish(
                &row.org_id,
                crate::events::EventKind::Sandbox {
                    sandbox_id: row.id.clone(),
                    from: None,
                    to: row.state.clone(),
                    reason: None,
                },
            );
            row
        } else {
            args.row
        };
        // A row loaded from the database last changed when it was written,
        // not now: a restart does not reset the clock of a transitional
        // state, and a report taken since that write (the one that woke a
        // dormant sandbox) is not stale.
        let written = written_at(&row);
        let transition_since = state_of(&row).is_transitional().then_some(written);
        Ok(SandboxActorState {
            _mailbox: mailbox,
            row,
            store: args.store,
            host: args.host,
            scheduler: args.scheduler,
            orgs: args.orgs,
            timeouts: args.timeouts.clone(),
            metrics: args.metrics,
            last_change: written,
            transition_since,
            faults: 0,
            retry_scheduled: false,
            waiter: args.waiter,
            parent: Some(args.span),
            fleet: args.fleet,
            max_create_attempts: args.max_create_attempts,
            tried: args.tried,
            relocating: None,
            stop_grace: args.timeouts.stop_grace,
            touched: Instant::now(),
            rest_timer: false,
            resting: None,
            ttl_timer: None,
        })
    }

    async fn post_start(
        &self,
        myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        // Start converging at once; the creator, if waiting, gets the
        // outcome of this very attempt.
        let _ = myself.tell(SandboxMsg::Converge(state.waiter.take()));
        if let Some(expires_at) = state.row.expires_at {
            let delay = (expires_at - Utc::now()).to_std().unwrap_or_default();
            let timer = myself.tell_after(delay, || SandboxMsg::Expire);
            state.ttl_timer = Some(timer.abort_handle());
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        if let Some(timer) = state.ttl_timer.take() {
            timer.abort();
        }
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        mailbox::took(myself.get_id());
        // Boxed: ractor allocates each actor's message loop once, at the
        // size of its largest handler future, for the actor's whole life.
        // Inline, this handler's (every step, host round trip and database
        // write) cost each live sandbox about 7.4 KiB of its 19; boxed it
        // exists only while a message is handled.
        Box::pin(self.on_message(myself, message, state)).await;
        Ok(())
    }
}

impl SandboxActor {
    async fn on_message(
        &self,
        myself: ActorRef<SandboxMsg>,
        message: SandboxMsg,
        state: &mut SandboxActorState,
    ) {
        if !matches!(
            message,
            SandboxMsg::Observed { .. } | SandboxMsg::Rest | SandboxMsg::Sleep
        ) {
            state.touched = Instant::now();
        }
        match message {
            SandboxMsg::Converge(reply) => {
                state.retry_scheduled = false;
                let result = self.converge(&myself, state).await;
                state.parent = None;
                if let Some(cause) = state.relocating.take() {
                    // The creator hears from the sandbox's next host.
                    self.relocate(&myself, state, cause, reply).await;
                } else if let Some(reply) = reply {
                    let _ = reply.send(result);
                }
            }
            SandboxMsg::SetDesired {
                desired,
                reply,
                span,
            } => {
                state.parent = Some(span);
                let result = match self.set_desired(state, desired).await {
                    Ok(()) => self.converge(&myself, state).await,
                    Err(e) => Err(e),
                };
                state.parent = None;
                if let Some(cause) = state.relocating.take() {
                    self.relocate(&myself, state, cause, Some(reply)).await;
                } else {
                    let _ = reply.send(result);
                }
            }
            SandboxMsg::SetDesiredNoWait {
                desired,
                reply,
                span,
            } => {
                state.parent = Some(span);
                match self.set_desired(state, desired).await {
                    Ok(()) => {
                        let _ = reply.send(Ok(state.row.clone()));
                        let _ = self.converge(&myself, state).await;
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                }
                state.parent = None;
            }
            SandboxMsg::Exec { spec, reply, span } => self.exec(state, spec, reply, span),
            SandboxMsg::Observed {
                status,
                reason,
                as_of,
            } => {
                if as_of >= state.last_change {
                    self.observe(&myself, state, status, &reason).await;
                }
            }
            SandboxMsg::HostOffline => {
                self.host_offline(state).await;
                if self.moves_on_host_loss(state) {
                    self.relocate(&myself, state, Relocation::HostLost, None)
                        .await;
                }
            }
            SandboxMsg::Drain { grace } => {
                state.stop_grace = state.stop_grace.min(grace);
                self.drain(&myself, state).await;
            }
            SandboxMsg::Expire => self.expire(&myself, state).await,
            SandboxMsg::Rest => {
                state.rest_timer = false;
                self.rest(&myself, state);
            }
            SandboxMsg::Sleep => {
                let asked = state.resting.take();
                if asked == Some(state.touched) && self.dormant(state).is_some() {
                    myself.stop(Some(DORMANT.into()));
                    return;
                }
                let _ = state.host.tell(HostMsg::StayedAwake {
                    sandbox_id: state.row.id.clone(),
                    actor: myself.get_id(),
                });
            }
            SandboxMsg::InjectPanic => panic!("injected fault in sandbox {}", state.row.id),
        }
        if state_of(&state.row).is_terminal() {
            myself.stop(Some("destroyed".into()));
            return;
        }
        self.arm_rest(&myself, state);
    }

    /// The sandbox as its host would keep it dormant, if it has nothing to
    /// do and nothing is in flight.
    fn dormant(&self, state: &SandboxActorState) -> Option<Dormant> {
        if state.retry_scheduled || state.waiter.is_some() || state.relocating.is_some() {
            return None;
        }
        Dormant::of(&state.row, state.last_change)
    }

    /// Sets a [`SandboxMsg::Rest`] for when the sandbox will have been idle
    /// for `dormant_after`, if it is idle and none is set.
    fn arm_rest(&self, myself: &ActorRef<SandboxMsg>, state: &mut SandboxActorState) {
        let Some(after) = state.timeouts.dormant_after else {
            return;
        };
        if state.rest_timer || state.resting == Some(state.touched) || self.dormant(state).is_none()
        {
            return;
        }
        state.rest_timer = true;
        let left = after.saturating_sub(state.touched.elapsed());
        myself.tell_after(left, || SandboxMsg::Rest);
    }

    /// Idle for long enough: tells the host, which answers `Sleep`.
    fn rest(&self, myself: &ActorRef<SandboxMsg>, state: &mut SandboxActorState) {
        let Some(after) = state.timeouts.dormant_after else {
            return;
        };
        if state.touched.elapsed() < after || state.resting == Some(state.touched) {
            return;
        }
        let Some(dormant) = self.dormant(state) else {
            return;
        };
        state.resting = Some(state.touched);
        let _ = state.host.tell(HostMsg::Resting {
            sandbox_id: state.row.id.clone(),
            actor: myself.get_id(),
            dormant,
        });
    }

    async fn set_desired(
        &self,
        state: &mut SandboxActorState,
        desired: DesiredState,
    ) -> Result<(), CorralError> {
        let current = state_of(&state.row);
        if desired != DesiredState::Destroyed
            && matches!(current, SandboxState::Failed | SandboxState::Lost)
        {
            return Err(CorralError::InvalidState(format!(
                "the sandbox is {current}; it can only be deleted"
            )));
        }
        if desired_of(&state.row) == DesiredState::Destroyed && desired != DesiredState::Destroyed {
            return Err(CorralError::InvalidState(
                "the sandbox is being deleted".into(),
            ));
        }
        if desired_of(&state.row) != desired {
            let mut row = state.row.clone();
            row.desired_state = desired.as_str().to_string();
            self.persist(state, row).await?;
        }
        Ok(())
    }

    /// Takes steps until converged, a host fault (retried later) or a failure.
    async fn converge(
        &self,
        myself: &ActorRef<SandboxMsg>,
        state: &mut SandboxActorState,
    ) -> Result<sandbox::Model, CorralError> {
        while let Some(step) = next_step(state_of(&state.row), desired_of(&state.row)) {
            let parent = state.parent.as_ref().and_then(tracing::Span::id);
            let span = tracing::info_span!(parent: parent, "sandbox.step", sandbox.id = %state.row.id, org.id = %state.row.org_id, host.id = state.row.host_id.as_deref().unwrap_or(""), ?step, otel.status_code = tracing::field::Empty, otel.status_message = tracing::field::Empty);
            let result = self.take_step(state, step).instrument(span.clone()).await;
            if let Err(err) = &result {
                corral_telemetry::mark_failed(&span, &err.to_string());
            }
            if let Err(err) = result {
                if state.relocating.is_some() {
                    return Err(err);
                }
                // Whatever failed (host fault, refused start or stop, the
                // database), a step left half-way is retried with backoff
                // until its deadline, then given up: nothing stays stuck.
                if state_of(&state.row).is_transitional() {
                    if self.transition_expired(state) {
                        self.give_up(state, step, &err).await;
                    } else {
                        self.schedule_retry(myself, state);
                    }
                }
                return Err(err);
            }
            state.faults = 0;
        }
        Ok(state.row.clone())
    }

    async fn take_step(
        &self,
        state: &mut SandboxActorState,
        step: Step,
    ) -> Result<(), CorralError> {
        let mut row = state.row.clone();
        if step == Step::Destroy && state_of(&row) == SandboxState::Lost {
            // Its host does not have it (or is gone): there is nothing to
            // ask the host. Should the container ever show up again, the
            // host's orphan collection removes it, as the row says destroyed.
            row.state = SandboxState::Destroyed.as_str().to_string();
            self.persist(state, row).await?;
            return Ok(());
        }
        let transitional = step.transitional();
        if state_of(&row) != transitional {
            row.state = transitional.as_str().to_string();
            row = self.persist(state, row).await?;
        }
        let secret_env = if step == Step::Create {
            match open_secret_env(&state.store, &row) {
                Ok(env) => env,
                Err(err) => {
                    // Without its secrets the sandbox cannot run as asked.
                    row.state = SandboxState::Failed.as_str().to_string();
                    row.failure_reason = Some(format!("secrets_unavailable: {err}"));
                    self.persist(state, row).await?;
                    self.release(state);
                    return Err(err);
                }
            }
        } else {
            BTreeMap::new()
        };
        let security = security_of(&row);
        let (payload, timeout) = match step {
            Step::Create => (
                pb::control_message::Payload::Create(pb::CreateSandbox {
                    sandbox_id: row.id.clone(),
                    image: row.image.clone(),
                    command: serde_json::from_value(row.command.clone()).unwrap_or_default(),
                    env: json_map(&row.env).into_iter().collect(),
                    workdir: row.workdir.clone().unwrap_or_default(),
                    cpu_millis: u32::try_from(row.cpu_millis).unwrap_or(u32::MAX),
                    memory_mb: u64::try_from(row.memory_mb).unwrap_or(0),
                    labels: json_map(&row.labels).into_iter().collect(),
                    hostname: row.name.clone().unwrap_or_else(|| row.id.clone()),
                    expires_at_unix_ms: row.expires_at.map_or(0, |t| t.timestamp_millis()),
                    secret_env: secret_env.into_iter().collect(),
                    network: security.network.as_str().to_string(),
                    read_only_root: security.read_only_root,
                    pids_limit: security.pids_limit.unwrap_or(0),
                    user_namespace: security.user_namespace,
                }),
                state.timeouts.create,
            ),
            Step::Start => (
                pb::control_message::Payload::Start(pb::StartSandbox {
                    sandbox_id: row.id.clone(),
                }),
                state.timeouts.start,
            ),
            Step::Stop => (
                pb::control_message::Payload::Stop(pb::StopSandbox {
                    sandbox_id: row.id.clone(),
                    grace_period_ms: u32::try_from(state.stop_grace.as_millis())
                        .unwrap_or(u32::MAX),
                }),
                state.stop_grace + state.timeouts.start,
            ),
            Step::Destroy => (
                pb::control_message::Payload::Destroy(pb::DestroySandbox {
                    sandbox_id: row.id.clone(),
                }),
                state.timeouts.destroy,
            ),
        };
        let result = send_to_host(&state.host, payload, timeout).await;
        match result {
            Ok(pb::reply::Result::Sandbox(status)) => {
                let observed = observed_state(status.phase);
                let now = Utc::now();
                match (step, observed) {
                    (Step::Destroy, _) => {
                        row.state = SandboxState::Destroyed.as_str().to_string();
                        self.persist(state, row).await?;
                        self.release(state);
                    }
                    (_, Some(SandboxState::Running)) => {
                        if step == Step::Create {
                            let took = (now - row.created_at).to_std().unwrap_or_default();
                            state
                                .metrics
                                .timings
                                .create_to_running
                                .observe(&[], took.as_secs_f64());
                        }
                        row.state = SandboxState::Running.as_str().to_string();
                        row.started_at = Some(now);
                        row.exit_code = None;
                        row.failure_reason = None;
                        self.persist(state, row).await?;
                    }
                    (_, Some(SandboxState::Stopped)) => {
                        row.state = SandboxState::Stopped.as_str().to_string();
                        row.exit_code = status.exit_code;
                        self.persist(state, row).await?;
                    }
                    (_, other) => {
                        return Err(CorralError::Host {
                            code: HostErrorCode::Runtime,
                            message: format!(
                                "the host answered {step:?} with phase {:?}",
                                other.map(|s| s.as_str())
                            ),
                        });
                    }
                }
                Ok(())
            }
            Ok(_) => Err(CorralError::Host {
                code: HostErrorCode::Runtime,
                message: "the host sent a reply of the wrong kind".into(),
            }),
            Err(err) if err.is_host_fault() => Err(err),
            Err(err) => {
                match step {
                    // The host failed the create for a reason of its own
                    // (not the request's): try another host.
                    Step::Create
                        if create_failure_is_the_hosts(&err)
                            && state.tried.len() + 1 < state.max_create_attempts as usize =>
                    {
                        state.relocating = Some(Relocation::CreateFailed(failure_reason(&err)));
                        return Err(err);
                    }
                    // The host refused to create it: the sandbox cannot run.
                    Step::Create => {
                        row.state = SandboxState::Failed.as_str().to_string();
                        row.failure_reason = Some(failure_reason(&err));
                        self.persist(state, row).await?;
                        self.release(state);
                    }
                    // Destroying something the host does not have is done.
                    Step::Destroy
                        if matches!(
                            err,
                            CorralError::Host {
                                code: HostErrorCode::SandboxNotFound,
                                ..
                            }
                        ) =>
                    {
                        row.state = SandboxState::Destroyed.as_str().to_string();
                        self.persist(state, row).await?;
                        self.release(state);
                        return Ok(());
                    }
                    // Start/stop/destroy refused: record why; stay where we
                    // were observed to be.
                    _ => {
                        row.failure_reason = Some(failure_reason(&err));
                        self.persist(state, row).await?;
                    }
                }
                Err(err)
            }
        }
    }

    fn exec(
        &self,
        state: &SandboxActorState,
        spec: ExecSpec,
        reply: RpcReplyPort<Result<ExecOutcome, CorralError>>,
        span: tracing::Span,
    ) {
        let current = state_of(&state.row);
        if current != SandboxState::Running {
            let _ = reply.send(Err(CorralError::InvalidState(format!(
                "the sandbox is {current}; exec needs it running"
            ))));
            return;
        }
        let host = state.host.clone();
        let timeout =
            Duration::from_millis(u64::from(spec.timeout_ms)) + state.timeouts.exec_margin;
        let payload = pb::control_message::Payload::Exec(pb::ExecRequest {
            sandbox_id: state.row.id.clone(),
            argv: spec.argv,
            env: spec.env.into_iter().collect(),
            workdir: spec.workdir.unwrap_or_default(),
            timeout_ms: spec.timeout_ms,
            max_output_bytes: spec.max_output_bytes,
        });
        tokio::spawn(
            async move {
                let result = match send_to_host(&host, payload, timeout).await {
                    Ok(pb::reply::Result::Exec(out)) => Ok(ExecOutcome {
                        exit_code: out.exit_code,
                        stdout: out.stdout,
                        stderr: out.stderr,
                        stdout_truncated: out.stdout_truncated,
                        stderr_truncated: out.stderr_truncated,
                        duration_ms: out.duration_ms,
                        timed_out: out.timed_out,
                    }),
                    Ok(_) => Err(CorralError::Host {
                        code: HostErrorCode::Runtime,
                        message: "the host sent a reply of the wrong kind".into(),
                    }),
                    Err(err) => Err(err),
                };
                let _ = reply.send(result);
            }
            .instrument(span),
        );
    }

    /// Applies a status the host reported (an event, or an inventory taken
    /// after the actor's last change). Transitional states are left to
    /// their step, which converging retries.
    async fn observe(
        &self,
        myself: &ActorRef<SandboxMsg>,
        state: &mut SandboxActorState,
        status: pb::SandboxStatus,
        reason: &str,
    ) {
        let Some(observed) = observed_state(status.phase) else {
            return;
        };
        let current = state_of(&state.row);
        let mut row = state.row.clone();
        match observation(current, observed) {
            Observation::Agrees | Observation::Transitional => {
                if next_step(current, desired_of(&row)).is_some() && !state.retry_scheduled {
                    let _ = myself.tell(SandboxMsg::Converge(None));
                }
                return;
            }
            Observation::ExitedOnItsOwn => {
                // Sandboxes have no restart policy: it stays stopped until
                // someone starts it, unless its TTL ran out (then it goes).
                tracing::info!(sandbox.id = %row.id, %reason, exit_code = ?status.exit_code, "sandbox stopped on its own");
                row.state = SandboxState::Stopped.as_str().to_string();
                row.desired_state = DesiredState::Stopped.as_str().to_string();
                row.exit_code = status.exit_code;
                if reason == "ttl" || is_expired(&row) {
                    row.desired_state = DesiredState::Destroyed.as_str().to_string();
                }
            }
            Observation::Vanished => {
                tracing::warn!(sandbox.id = %row.id, %reason, "sandbox vanished from its host");
                state.metrics.drift_lost.inc();
                row.state = SandboxState::Lost.as_str().to_string();
                row.failure_reason = Some(format!("its host no longer has it ({reason})"));
            }
            Observation::Differs => {
                tracing::warn!(sandbox.id = %row.id, recorded = %current, %observed, "the host reports another state; taking it");
                state.metrics.drift_corrected.inc();
                row.state = observed.as_str().to_string();
                if observed == SandboxState::Stopped {
                    row.exit_code = status.exit_code;
                }
            }
            Observation::CameBack => {
                if !self.readmit(state).await {
                    return;
                }
                tracing::info!(sandbox.id = %row.id, %observed, "a lost sandbox is back on its host");
                state.metrics.drift_corrected.inc();
                row.state = observed.as_str().to_string();
                row.failure_reason = None;
            }
            Observation::Unaccounted => {
                // A failed or lost sandbox that cannot be taken back still
                // has a container: remove it; the row stays as it is.
                self.discard_on_host(state);
                return;
            }
            Observation::Nothing => return,
        }
        let released = !state_of(&row).holds_capacity() && current.holds_capacity();
        if let Err(err) = self.persist(state, row).await {
            tracing::error!(sandbox.id = %state.row.id, error = %err, "could not persist an observed state");
            return;
        }
        if released {
            self.release(state);
        }
        if next_step(state_of(&state.row), desired_of(&state.row)).is_some() {
            let _ = myself.tell(SandboxMsg::Converge(None));
        }
    }

    /// Takes a lost sandbox back if its reservation can be had again on its
    /// host; otherwise its container is destroyed and it stays lost.
    async fn readmit(&self, state: &mut SandboxActorState) -> bool {
        let Some(host_id) = state.row.host_id.clone() else {
            return false;
        };
        let resources = crate::domain::Resources {
            cpu_millis: u64::try_from(state.row.cpu_millis).unwrap_or(0),
            memory_mb: u64::try_from(state.row.memory_mb).unwrap_or(0),
        };
        let sandbox_id = state.row.id.clone();
        let group = super::scheduler::group_of(&state.row);
        let admitted = matches!(
            state
                .scheduler
                .ask(
                    |reply| SchedulerMsg::Readmit {
                        sandbox_id,
                        host_id,
                        resources,
                        group,
                        reply,
                    },
                    Some(Duration::from_secs(10)),
                )
                .await,
            Ok(ractor::rpc::CallResult::Success(true))
        );
        if !admitted {
            tracing::warn!(sandbox.id = %state.row.id, "a lost sandbox came back but its room was given away; destroying its container");
            let mut row = state.row.clone();
            row.failure_reason =
                Some("its host came back after its capacity was given to other sandboxes".into());
            if self.persist(state, row).await.is_ok() {
                self.discard_on_host(state);
            }
        }
        admitted
    }

    /// The host's offline grace ran out: whatever it held is lost, and a
    /// sandbox being destroyed is destroyed (the host's orphan collection
    /// removes what is left when it returns).
    async fn host_offline(&self, state: &mut SandboxActorState) {
        let current = state_of(&state.row);
        if matches!(
            current,
            SandboxState::Failed | SandboxState::Lost | SandboxState::Destroyed
        ) {
            return;
        }
        let mut row = state.row.clone();
        if desired_of(&row) == DesiredState::Destroyed {
            row.state = SandboxState::Destroyed.as_str().to_string();
        } else {
            state.metrics.drift_lost.inc();
            row.state = SandboxState::Lost.as_str().to_string();
            row.failure_reason = Some("its host went offline".into());
        }
        match self.persist(state, row).await {
            Ok(_) => self.release(state),
            Err(err) => {
                tracing::error!(sandbox.id = %state.row.id, error = %err, "could not record the host offline")
            }
        }
    }

    fn moves_on_host_loss(&self, state: &SandboxActorState) -> bool {
        RestartPolicy::parse(&state.row.restart_policy) == Some(RestartPolicy::OnHostLoss)
            && desired_of(&state.row) != DesiredState::Destroyed
            && state_of(&state.row) != SandboxState::Failed
            && state_of(&state.row) != SandboxState::Destroyed
    }

    /// The host is drained: `on_host_loss` sandboxes move, the others stop.
    async fn drain(&self, myself: &ActorRef<SandboxMsg>, state: &mut SandboxActorState) {
        if self.moves_on_host_loss(state) {
            self.relocate(myself, state, Relocation::Drain, None).await;
            return;
        }
        self.stop_for_drain(myself, state).await;
    }

    async fn stop_for_drain(&self, myself: &ActorRef<SandboxMsg>, state: &mut SandboxActorState) {
        if desired_of(&state.row) == DesiredState::Running
            && !matches!(
                state_of(&state.row),
                SandboxState::Failed | SandboxState::Lost
            )
        {
            tracing::info!(sandbox.id = %state.row.id, "host drained; stopping the sandbox");
            if let Err(err) = self.set_desired(state, DesiredState::Stopped).await {
                tracing::error!(sandbox.id = %state.row.id, error = %err, "could not stop a sandbox of a drained host");
                return;
            }
            let _ = myself.tell(SandboxMsg::Converge(None));
        }
    }

    /// Places the sandbox again, on another host than the ones that failed
    /// it, and hands it over to that host (same id, state `scheduled`);
    /// this actor then stops. When nothing can take it, it fails (create),
    /// stays lost (host lost) or stops (drain).
    async fn relocate(
        &self,
        myself: &ActorRef<SandboxMsg>,
        state: &mut SandboxActorState,
        cause: Relocation,
        reply: Option<RpcReplyPort<SandboxReply>>,
    ) {
        let old_host = state.row.host_id.clone().unwrap_or_default();
        state.tried.insert(old_host.clone());
        let mut request = super::scheduler::request_for(&state.row);
        request.exclude = state.tried.clone();
        let sandbox_id = state.row.id.clone();
        let placed = match state
            .scheduler
            .ask(
                |reply| SchedulerMsg::Place {
                    sandbox_id,
                    request,
                    reply,
                },
                Some(Duration::from_secs(10)),
            )
            .await
        {
            Ok(ractor::rpc::CallResult::Success(result)) => result,
            _ => Err(CorralError::Internal("scheduler unavailable".into())),
        };
        let new_host = match placed {
            Ok(host) => host,
            Err(err) => {
                tracing::warn!(sandbox.id = %state.row.id, ?cause, error = %err, "no other host can take the sandbox");
                let result = match cause {
                    Relocation::CreateFailed(reason) => {
                        let mut row = state.row.clone();
                        row.state = SandboxState::Failed.as_str().to_string();
                        row.failure_reason = Some(format!(
                            "{reason} (tried {} host(s); no other host can take it: {err})",
                            state.tried.len()
                        ));
                        let saved = self.persist(state, row).await;
                        self.release(state);
                        saved
                    }
                    Relocation::HostLost => Ok(state.row.clone()),
                    Relocation::Drain => {
                        self.stop_for_drain(myself, state).await;
                        Ok(state.row.clone())
                    }
                };
                if let Some(reply) = reply {
                    let _ = reply.send(result);
                }
                return;
            }
        };
        if cause != Relocation::HostLost {
            // Whatever the old host holds of it goes (best effort; the
            // orphan collector removes what is left).
            self.discard_on_host(state);
        }
        let mut row = state.row.clone();
        row.host_id = Some(new_host.clone());
        row.state = SandboxState::Scheduled.as_str().to_string();
        row.exit_code = None;
        row.failure_reason = Some(match &cause {
            Relocation::CreateFailed(reason) => format!("moved from host {old_host}: {reason}"),
            Relocation::HostLost => format!("moved from host {old_host}: the host was lost"),
            Relocation::Drain => format!("moved from host {old_host}: the host was drained"),
        });
        if let Err(err) = self.persist(state, row).await {
            tracing::error!(sandbox.id = %state.row.id, error = %err, "could not record the new placement");
            self.release(state);
            if let Some(reply) = reply {
                let _ = reply.send(Err(err));
            }
            return;
        }
        tracing::info!(sandbox.id = %state.row.id, from = %old_host, to = %new_host, ?cause, "sandbox placed on another host");
        let _ = state.fleet.tell(FleetMsg::Relocated {
            host_id: new_host,
            row: Box::new(state.row.clone()),
            tried: state.tried.clone(),
            waiter: reply,
        });
        myself.stop(Some("moved to another host".into()));
    }

    /// The TTL ran out: the sandbox is to be destroyed.
    async fn expire(&self, myself: &ActorRef<SandboxMsg>, state: &mut SandboxActorState) {
        if !is_expired(&state.row) || desired_of(&state.row) == DesiredState::Destroyed {
            return;
        }
        tracing::info!(sandbox.id = %state.row.id, "TTL ran out; destroying the sandbox");
        state.metrics.ttl_expired.inc();
        let mut row = state.row.clone();
        row.desired_state = DesiredState::Destroyed.as_str().to_string();
        if let Err(err) = self.persist(state, row).await {
            tracing::error!(sandbox.id = %state.row.id, error = %err, "could not record the TTL expiry; retrying");
            myself.tell_after(Duration::from_secs(1), || SandboxMsg::Expire);
            return;
        }
        let _ = myself.tell(SandboxMsg::Converge(None));
    }

    fn transition_expired(&self, state: &SandboxActorState) -> bool {
        state
            .transition_since
            .is_some_and(|since| since.elapsed() >= state.timeouts.transition_deadline)
    }

    /// A step kept failing past the transitional deadline: stop retrying.
    async fn give_up(&self, state: &mut SandboxActorState, step: Step, err: &CorralError) {
        state.metrics.transitions_expired.inc();
        let mut row = state.row.clone();
        let waited = state.timeouts.transition_deadline.as_secs();
        if step == Step::Destroy {
            row.state = SandboxState::Destroyed.as_str().to_string();
            row.failure_reason = Some(format!(
                "its host did not confirm the destroy within {waited} s ({err}); \
                 the host removes it when it next reports it"
            ));
        } else {
            row.failure_reason = Some(format!(
                "{} did not finish within {waited} s: {err}",
                state_of(&row)
            ));
            row.state = SandboxState::Failed.as_str().to_string();
        }
        tracing::warn!(sandbox.id = %row.id, ?step, "transitional state past its deadline; giving up");
        if self.persist(state, row).await.is_ok() {
            self.release(state);
            if step != Step::Destroy {
                self.discard_on_host(state);
            }
        }
    }

    /// Best-effort destroy of the sandbox's container, without changing the
    /// row (whatever remains is an orphan for the host's collector).
    fn discard_on_host(&self, state: &SandboxActorState) {
        let host = state.host.clone();
        let payload = pb::control_message::Payload::Destroy(pb::DestroySandbox {
            sandbox_id: state.row.id.clone(),
        });
        let timeout = state.timeouts.destroy;
        tokio::spawn(async move {
            let _ = send_to_host(&host, payload, timeout).await;
        });
    }

    async fn persist(
        &self,
        state: &mut SandboxActorState,
        mut row: sandbox::Model,
    ) -> Result<sandbox::Model, CorralError> {
        row.updated_at = Utc::now();
        let before = state_of(&state.row);
        let saved = state.store.save_sandbox(row).await?;
        state.touched = Instant::now();
        let after = state_of(&saved);
        if after != before {
            state.last_change = Instant::now();
            state.transition_since = after.is_transitional().then(Instant::now);
            state.metrics.events.publish(
                &saved.org_id,
                crate::events::EventKind::Sandbox {
                    sandbox_id: saved.id.clone(),
                    from: Some(before.as_str().to_string()),
                    to: after.as_str().to_string(),
                    reason: saved.failure_reason.clone(),
                },
            );
        }
        let phase = metered_phase(after);
        if metered_phase(before) != phase {
            // Metering follows what was persisted, at the moment it was.
            let _ = state.orgs.tell(OrgsMsg::Forward {
                org_id: saved.org_id.clone(),
                message: LedgerMsg::Meter {
                    sandbox_id: saved.id.clone(),
                    phase,
                    resources: crate::domain::Resources {
                        cpu_millis: u64::try_from(saved.cpu_millis).unwrap_or(0),
                        memory_mb: u64::try_from(saved.memory_mb).unwrap_or(0),
                    },
                    at: saved.updated_at,
                },
            });
        }
        state.row = saved.clone();
        Ok(saved)
    }

    fn release(&self, state: &SandboxActorState) {
        let _ = state.scheduler.tell(SchedulerMsg::Release {
            sandbox_id: state.row.id.clone(),
        });
    }

    fn schedule_retry(&self, myself: &ActorRef<SandboxMsg>, state: &mut SandboxActorState) {
        state.faults = state.faults.saturating_add(1);
        if state.retry_scheduled {
            return;
        }
        state.retry_scheduled = true;
        let backoff = Duration::from_millis(500)
            .saturating_mul(1 << state.faults.min(6))
            .min(Duration::from_secs(30));
        myself.tell_after(backoff, || SandboxMsg::Converge(None));
    }
}

/// When `row` was last written, on this process's monotonic clock.
pub fn written_at(row: &sandbox::Model) -> Instant {
    let age = (Utc::now() - row.updated_at).to_std().unwrap_or_default();
    Instant::now().checked_sub(age).unwrap_or_else(Instant::now)
}

fn is_expired(row: &sandbox::Model) -> bool {
    row.expires_at.is_some_and(|t| t <= Utc::now())
}

/// How a host's report relates to the recorded state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Observation {
    /// The host agrees with the record.
    Agrees,
    /// A step is (or was) under way: converging finishes it.
    Transitional,
    /// The main process of a running sandbox ended by itself.
    ExitedOnItsOwn,
    /// The host does not have a sandbox recorded as present.
    Vanished,
    /// A settled state other than the recorded one: take the host's word.
    Differs,
    /// A lost sandbox is present again.
    CameBack,
    /// A failed or lost sandbox still has a container it cannot keep.
    Unaccounted,
    /// Nothing to do (an absent sandbox that is failed, lost or destroyed).
    Nothing,
}

/// The pure decision behind [`SandboxActor::observe`].
pub fn observation(recorded: SandboxState, observed: SandboxState) -> Observation {
    use SandboxState as S;
    let present = observed != S::Destroyed;
    match (recorded, observed) {
        (S::Destroyed, _) => Observation::Nothing,
        (S::Failed, _) if present => Observation::Unaccounted,
        (S::Lost, S::Running | S::Stopped) => Observation::CameBack,
        (S::Lost, _) if present => Observation::Unaccounted,
        (S::Failed | S::Lost, _) => Observation::Nothing,
        (r, _) if r.is_transitional() || matches!(r, S::Pending | S::Scheduled) => {
            Observation::Transitional
        }
        (r, o) if r == o => Observation::Agrees,
        (S::Running, S::Stopped) => Observation::ExitedOnItsOwn,
        (_, S::Destroyed) => Observation::Vanished,
        // Created but never started: converging starts it again.
        (_, S::Creating) => Observation::Transitional,
        _ => Observation::Differs,
    }
}

/// Whether a create the host refused says something about the host (its
/// runtime failed) rather than about the request (an unknown image, an
/// invalid argument): only the former is worth another host.
fn create_failure_is_the_hosts(err: &CorralError) -> bool {
    matches!(
        err,
        CorralError::Host {
            code: HostErrorCode::Runtime | HostErrorCode::Unsupported,
            ..
        }
    )
}

fn failure_reason(err: &CorralError) -> String {
    match err {
        CorralError::Host { code, message } => format!("{}: {message}", code.as_str()),
        other => other.to_string(),
    }
}

/// Sends a command through the sandbox's HostActor and waits for the reply,
/// bounded by `timeout` (the ConnectionActor enforces the same deadline; the
/// margin here only guards against a lost actor).
pub(crate) async fn send_to_host(
    host: &ActorRef<HostMsg>,
    payload: pb::control_message::Payload,
    timeout: Duration,
) -> Result<pb::reply::Result, CorralError> {
    let margin = Duration::from_secs(2);
    let method = command_name(&payload);
    // The client side of the command, in the caller's trace; its context
    // travels in the envelope and the agent continues it.
    let span = tracing::info_span!(
        "agent.command",
        otel.name = %format!("corral.agent.v1.AgentService/{method}"),
        otel.kind = "client",
        rpc.system = "grpc",
        rpc.service = "corral.agent.v1.AgentService",
        rpc.method = method,
        otel.status_code = tracing::field::Empty,
        otel.status_message = tracing::field::Empty,
    );
    let trace = corral_telemetry::inject(&span).map(|w| pb::TraceContext {
        traceparent: w.traceparent,
        tracestate: w.tracestate,
    });
    let result = match host
        .ask(
            |reply| HostMsg::Dispatch {
                payload,
                timeout,
                reply,
                trace,
            },
            Some(timeout + margin),
        )
        .instrument(span.clone())
        .await
    {
        Ok(ractor::rpc::CallResult::Success(result)) => result,
        Ok(ractor::rpc::CallResult::Timeout) => Err(CorralError::HostTimeout(
            u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
        )),
        Ok(ractor::rpc::CallResult::SenderError) => Err(CorralError::HostDisconnected),
        Err(_) => Err(CorralError::HostUnavailable),
    };
    if let Err(err) = &result {
        corral_telemetry::mark_failed(&span, &err.to_string());
    }
    result
}

/// The command's name as an RPC method, for span names.
fn command_name(payload: &pb::control_message::Payload) -> &'static str {
    use pb::control_message::Payload as P;
    match payload {
        P::RegisterAck(_) => "RegisterAck",
        P::Create(_) => "CreateSandbox",
        P::Start(_) => "StartSandbox",
        P::Stop(_) => "StopSandbox",
        P::Destroy(_) => "DestroySandbox",
        P::Exec(_) => "Exec",
        P::Inventory(_) => "Inventory",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use DesiredState as D;
    use SandboxState as S;

    #[test]
    fn next_step_drives_toward_the_desired_state() {
        assert_eq!(next_step(S::Scheduled, D::Running), Some(Step::Create));
        assert_eq!(next_step(S::Creating, D::Running), Some(Step::Create));
        assert_eq!(next_step(S::Running, D::Running), None);
        assert_eq!(next_step(S::Running, D::Stopped), Some(Step::Stop));
        assert_eq!(next_step(S::Stopped, D::Running), Some(Step::Start));
        assert_eq!(next_step(S::Running, D::Destroyed), Some(Step::Destroy));
        assert_eq!(next_step(S::Failed, D::Destroyed), Some(Step::Destroy));
        assert_eq!(next_step(S::Failed, D::Running), None);
        assert_eq!(next_step(S::Destroyed, D::Destroyed), None);
    }

    #[test]
    fn observations_are_classified() {
        use Observation as O;
        assert_eq!(observation(S::Running, S::Running), O::Agrees);
        assert_eq!(observation(S::Running, S::Stopped), O::ExitedOnItsOwn);
        assert_eq!(observation(S::Running, S::Destroyed), O::Vanished);
        assert_eq!(observation(S::Stopped, S::Destroyed), O::Vanished);
        assert_eq!(observation(S::Stopped, S::Running), O::Differs);
        assert_eq!(observation(S::Creating, S::Destroyed), O::Transitional);
        assert_eq!(observation(S::Stopping, S::Running), O::Transitional);
        assert_eq!(observation(S::Lost, S::Running), O::CameBack);
        assert_eq!(observation(S::Lost, S::Stopped), O::CameBack);
        assert_eq!(observation(S::Lost, S::Destroyed), O::Nothing);
        assert_eq!(observation(S::Failed, S::Running), O::Unaccounted);
        assert_eq!(observation(S::Failed, S::Destroyed), O::Nothing);
        assert_eq!(observation(S::Destroyed, S::Running), O::Nothing);
    }

    #[test]
    fn every_state_and_desire_has_a_decision() {
        // A transitional state left behind by a crash always has a next step
        // (or is settled); nothing is stuck by construction.
        for s in S::ALL {
            for d in D::ALL {
                if let Some(step) = next_step(*s, *d) {
                    assert_ne!(step.transitional(), S::Destroyed);
                }
            }
        }
        assert_eq!(next_step(S::Stopping, D::Stopped), Some(Step::Stop));
        assert_eq!(next_step(S::Starting, D::Running), Some(Step::Start));
        assert_eq!(next_step(S::Destroying, D::Destroyed), Some(Step::Destroy));
    }
}

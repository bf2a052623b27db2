//! [`ControlPlane`]: the one handle through which the REST API and the agent
//! gRPC service drive the actor tree. It validates nothing (the edge does)
//! and writes no sandbox, host or ledger row itself (their actors do); it
//! reads rows for queries and routes commands to the right actor.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use corral_proto::pb;
use dashmap::DashMap;
use ractor::rpc::CallResult;
use ractor::{Actor, ActorRef, RpcReplyPort};
use tokio::sync::mpsc;
use tracing::Instrument;

use crate::actors::connection::ConnMsg;
use crate::actors::fleet::FleetMsg;
use crate::actors::ledger::{
    BillingHook, BillingSettings, CreditKind, LedgerAudit, LedgerMsg, LedgerSummary, LogHook,
    OrgsMsg,
};
use crate::actors::root::{RootArgs, RootMsg, RootSupervisor, TopLevel};
use crate::actors::sandbox::{SandboxMsg, SandboxReply};
use crate::actors::scheduler::{HostCapacity, SchedulerMsg, SchedulingPolicy};
use crate::actors::{names, Timeouts};
use crate::billing::BillingPolicy;
use crate::domain::{
    new_id, DesiredState, ExecOutcome, ExecSpec, HostAdminState, Resources, SandboxSpec,
    SandboxState,
};
use crate::error::{CorralError, Result};
use crate::mailbox::Tell;
use crate::metrics::Metrics;
use crate::placement::PlacementRequest;
use crate::store::{sandbox, HostRegistration, SandboxFilter, Store};
use crate::tree::{self, ActorNode};

/// How the control plane is set up.
#[derive(Debug, Clone)]
pub struct ControlPlaneConfig {
    pub database_url: String,
    pub timeouts: Timeouts,
    pub billing: BillingPolicy,
    pub scheduling: SchedulingPolicy,
    /// Seals sandbox secret env values; without one, creates that carry
    /// secrets are refused.
    pub secret_key: Option<crate::secrets::SecretKey>,
}

/// A running control plane. Cheap to clone.
#[derive(Clone)]
pub struct ControlPlane {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    root: ActorRef<RootMsg>,
    top: TopLevel,
    prefix: String,
    timeouts: Timeouts,
    metrics: Metrics,
    scheduling: SchedulingPolicy,
    /// Orgs whose strategy-override permission differs from the
    /// deployment's (`scheduling.allow_strategy_override`); read on every
    /// create, so kept here rather than read from the database.
    strategy_override: DashMap<String, bool>,
    /// Becomes true when the actor tree has stopped.
    stopped: tokio::sync::watch::Receiver<bool>,
}

/// A host as operators see it.
#[derive(Debug, Clone)]
pub struct HostView {
    pub row: crate::store::host::Model,
    pub capacity: Option<HostCapacity>,
}

async fn call<M, T>(
    actor: &ActorRef<M>,
    make: impl FnOnce(RpcReplyPort<T>) -> M,
    timeout: Duration,
) -> Result<T>
where
    M: ractor::Message,
    T: Send + 'static,
{
    match actor.ask(make, Some(timeout)).await {
        Ok(CallResult::Success(value)) => Ok(value),
        Ok(CallResult::Timeout) => Err(CorralError::Internal("actor call timed out".into())),
        Ok(CallResult::SenderError) | Err(_) => {
            Err(CorralError::Internal("actor unavailable".into()))
        }
    }
}

fn where_is<M: ractor::Message>(name: &str) -> Option<ActorRef<M>> {
    ractor::registry::where_is(name).map(ActorRef::from)
}

const QUICK: Duration = Duration::from_secs(10);

impl ControlPlane {
    /// Connects the store (running migrations) and rebuilds the actor tree
    /// from it.
    pub async fn start(config: ControlPlaneConfig) -> Result<Self> {
        let store = Store::connect(&config.database_url).await?;
        let store = store.with_secret_key(config.secret_key.as_ref());
        Self::start_with_store(
            store,
            config.timeouts,
            config.billing,
            config.scheduling,
            Arc::new(LogHook),
        )
        .await
    }

    /// Starts on an open store, with a hook for billing-status changes.
    pub async fn start_with_store(
        store: Store,
        timeouts: Timeouts,
        billing: BillingPolicy,
        scheduling: SchedulingPolicy,
        billing_hook: Arc<dyn BillingHook>,
    ) -> Result<Self> {
        // The random end of the id: its start is the millisecond, which two
        // control planes started together in one process (tests) share.
        let id = new_id("cp");
        let prefix = format!("{}/", &id[id.len() - 12..]);
        let metrics = Metrics::default();
        let (root, root_task) = Actor::spawn(
            Some(names::singleton(&prefix, names::ROOT)),
            RootSupervisor,
            RootArgs {
                store: store.clone(),
                timeouts: timeouts.clone(),
                prefix: prefix.clone(),
                metrics: metrics.clone(),
                billing,
                billing_hook,
                scheduling: scheduling.clone(),
            },
        )
        .await
        .map_err(|e| CorralError::Internal(format!("could not start the actor tree: {e}")))?;
        let top = call(&root, RootMsg::TopLevel, QUICK).await?;
        let strategy_override = store.org_strategy_overrides().await?.into_iter().collect();
        let (stopped_tx, stopped) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            let _ = root_task.await;
            let _ = stopped_tx.send(true);
        });
        Ok(Self {
            inner: Arc::new(Inner {
                store,
                root,
                top,
                prefix,
                timeouts,
                metrics,
                scheduling,
                strategy_override,
                stopped,
            }),
        })
    }

    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    pub fn timeouts(&self) -> &Timeouts {
        &self.inner.timeouts
    }

    /// How this deployment places sandboxes.
    pub fn scheduling(&self) -> &SchedulingPolicy {
        &self.inner.scheduling
    }

    /// What the reconcilers and supervisors counted.
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// Makes one live actor panic, as a bug would: for the supervision
    /// tests, never reachable from the API. Answers whether the actor was
    /// found.
    #[doc(hidden)]
    pub fn inject_panic(&self, kind: &str, id: &str) -> bool {
        let prefix = &self.inner.prefix;
        let (name, sent) = match kind {
            "sandbox" => {
                let name = names::sandbox(prefix, id);
                let sent = where_is::<SandboxMsg>(&name)
                    .is_some_and(|a| a.tell(SandboxMsg::InjectPanic).is_ok());
                (name, sent)
            }
            "host" => {
                let name = names::host(prefix, id);
                let sent = where_is::<crate::actors::host::HostMsg>(&name)
                    .is_some_and(|a| a.tell(crate::actors::host::HostMsg::InjectPanic).is_ok());
                (name, sent)
            }
            "scheduler" => {
                let name = names::singleton(prefix, names::SCHEDULER);
                let sent = self
                    .inner
                    .top
                    .scheduler
                    .tell(SchedulerMsg::InjectPanic)
                    .is_ok();
                (name, sent)
            }
            "ledger" => {
                let name = names::ledger(prefix, id);
                let sent = where_is::<LedgerMsg>(&name)
                    .is_some_and(|a| a.tell(LedgerMsg::InjectPanic).is_ok());
                (name, sent)
            }
            // `id` is "host#generation" for a connection.
            "connection" => {
                let name = format!("{prefix}connection:{id}");
                let sent = where_is::<ConnMsg>(&name)
                    .is_some_and(|a| a.tell(ConnMsg::InjectPanic).is_ok());
                (name, sent)
            }
            _ => (String::new(), false),
        };
        tracing::warn!(actor = %name, sent, "fault injected");
        sent
    }

    /// Stops the actor tree (connections close; sandboxes keep running on
    /// their hosts).
    pub async fn shutdown(&self) {
        let _ = self
            .inner
            .root
            .stop_and_wait(Some("shutdown".into()), Some(Duration::from_secs(10)))
            .await;
    }

    /// Resolves when the actor tree has stopped, by a shutdown or because
    /// a supervisor escalated a failure to the root. A process should then
    /// exit so that it is restarted and rebuilt from the database.
    pub async fn stopped(&self) {
        let mut stopped = self.inner.stopped.clone();
        let _ = stopped.wait_for(|s| *s).await;
    }

    /// Whether the actor tree is alive.
    pub fn is_alive(&self) -> bool {
        matches!(
            self.inner.root.get_status(),
            ractor::ActorStatus::Running | ractor::ActorStatus::Upgrading
        )
    }

    // ---- sandboxes -----------------------------------------------------

    /// Places and creates a sandbox. With `wait`, answers once it runs (or
    /// failed); otherwise once the intent is persisted.
    pub async fn create_sandbox(
        &self,
        org_id: &str,
        spec: SandboxSpec,
        wait: bool,
    ) -> Result<sandbox::Model> {
        let sandbox_id = new_id("sbx");
        let span = tracing::info_span!(
            "sandbox.create",
            org.id = %org_id,
            sandbox.id = %sandbox_id,
            host.id = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
            otel.status_message = tracing::field::Empty,
        );
        let result = self
            .create_sandbox_in(org_id, sandbox_id, spec, wait, &span)
            .instrument(span.clone())
            .await;
        if let Err(err) = &result {
            corral_telemetry::mark_failed(&span, &err.to_string());
        }
        result
    }

    async fn create_sandbox_in(
        &self,
        org_id: &str,
        sandbox_id: String,
        mut spec: SandboxSpec,
        wait: bool,
        span: &tracing::Span,
    ) -> Result<sandbox::Model> {
        let resources = spec.resources();
        // Credit and quota first, reserved in the org's ledger: concurrent
        // creates cannot overdraw it (LESSONS 24).
        let ledger = self.ledger(org_id).await?;
        spec.ttl_seconds = call(
            &ledger,
            |reply| LedgerMsg::AuthorizeCreate {
                sandbox_id: sandbox_id.clone(),
                resources,
                ttl_seconds: spec.ttl_seconds,
                reply,
            },
            QUICK,
        )
        .await??;
        let request = PlacementRequest {
            org_id: org_id.to_string(),
            resources,
            image: spec.image.clone(),
            labels: spec.labels.clone(),
            placement: spec.placement.clone(),
            ..Default::default()
        };
        let placing = std::time::Instant::now();
        let placed = self
            .place(&sandbox_id, request)
            .instrument(tracing::info_span!("scheduler.place", sandbox.id = %sandbox_id))
            .await;
        self.inner.metrics.timings.placement.observe(
            &[if placed.is_ok() { "placed" } else { "refused" }],
            placing.elapsed().as_secs_f64(),
        );
        let host_id = match placed {
            Ok(host_id) => {
                span.record("host.id", host_id.as_str());
                host_id
            }
            Err(err) => {
                let _ = ledger.tell(LedgerMsg::Release {
                    sandbox_id: sandbox_id.clone(),
                });
                return Err(err);
            }
        };
        let (waiter, outcome) = tokio::sync::oneshot::channel();
        let spawned = self
            .spawn_sandbox(org_id, &sandbox_id, &host_id, spec, waiter.into())
            .await;
        let (_actor, row) = match spawned {
            Ok(spawned) => spawned,
            Err(err) => {
                // Nothing was persisted or sent: give the reservations back.
                let _ = ledger.tell(LedgerMsg::Release {
                    sandbox_id: sandbox_id.clone(),
                });
                let _ = self
                    .inner
                    .top
                    .scheduler
                    .tell(SchedulerMsg::Release { sandbox_id });
                return Err(err);
            }
        };
        if wait {
            let timeout = self.inner.timeouts.create + Duration::from_secs(30);
            match tokio::time::timeout(timeout, outcome).await {
                Ok(Ok(result)) => result,
                Ok(Err(_)) => Err(CorralError::Internal("sandbox actor gone".into())),
                Err(_) => Err(CorralError::HostTimeout(
                    u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
                )),
            }
        } else {
            // The intent as persisted; the actor is busy with the create.
            Ok(row)
        }
    }

    /// Places a new sandbox, waiting for capacity up to the request's
    /// `wait_timeout_ms` (polling the scheduler; each attempt is one
    /// message, so waiting creates do not hold the scheduler).
    async fn place(&self, sandbox_id: &str, request: PlacementRequest) -> Result<String> {
        let deadline = request
            .placement
            .wait_timeout_ms
            .map(|ms| tokio::time::Instant::now() + Duration::from_millis(ms));
        let mut pause = Duration::from_millis(20);
        loop {
            let placed = call(
                &self.inner.top.scheduler,
                |reply| SchedulerMsg::Place {
                    sandbox_id: sandbox_id.to_string(),
                    request: request.clone(),
                    reply,
                },
                QUICK,
            )
            .await
            .and_then(|placed| placed);
            match (placed, deadline) {
                (Err(CorralError::NoCapacity { .. }), Some(deadline))
                    if tokio::time::Instant::now() + pause < deadline =>
                {
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(500));
                }
                (placed, _) => return placed,
            }
        }
    }

    async fn spawn_sandbox(
        &self,
        org_id: &str,
        sandbox_id: &str,
        host_id: &str,
        spec: SandboxSpec,
        waiter: RpcReplyPort<SandboxReply>,
    ) -> Result<(ActorRef<SandboxMsg>, sandbox::Model)> {
        let host = call(
            &self.inner.top.fleet,
            |reply| FleetMsg::GetHost(host_id.to_string(), reply),
            QUICK,
        )
        .await?
        .ok_or(CorralError::HostUnavailable)?;
        let now = Utc::now();
        let to_json = |v: &dyn erased::Json| v.to_value();
        // Secret env values are sealed before anything is persisted.
        let secret_env = if spec.secret_env.is_empty() {
            None
        } else {
            let sealer = self.inner.store.secrets().ok_or_else(|| {
                CorralError::InvalidArgument(
                    "secret_env needs a secret key on the control plane".into(),
                )
            })?;
            Some(sealer.seal_env(sandbox_id, &spec.secret_env)?)
        };
        let security = (spec.security != crate::domain::SandboxSecurity::default())
            .then(|| serde_json::to_value(spec.security).unwrap_or_default());
        let row = sandbox::Model {
            id: sandbox_id.to_string(),
            org_id: org_id.to_string(),
            host_id: Some(host_id.to_string()),
            name: spec.name.clone(),
            image: spec.image.clone(),
            command: to_json(&spec.command),
            env: to_json(&spec.env),
            labels: to_json(&spec.labels),
            workdir: spec.workdir.clone(),
            cpu_millis: i64::from(spec.cpu_millis),
            memory_mb: i64::try_from(spec.memory_mb).unwrap_or(i64::MAX),
            ttl_seconds: spec
                .ttl_seconds
                .map(|t| i64::try_from(t).unwrap_or(i64::MAX)),
            state: SandboxState::Scheduled.as_str().to_string(),
            desired_state: DesiredState::Running.as_str().to_string(),
            failure_reason: None,
            exit_code: None,
            created_at: now,
            updated_at: now,
            started_at: None,
            // The TTL counts from the request, so the deadline is known
            // before anything runs and the host can enforce it too.
            expires_at: spec
                .ttl_seconds
                .and_then(|ttl| i64::try_from(ttl).ok())
                .map(|ttl| now + chrono::Duration::seconds(ttl)),
            restart_policy: spec.restart_policy.as_str().to_string(),
            placement: (spec.placement != crate::domain::Placement::default())
                .then(|| to_json(&spec.placement)),
            secret_env,
            security,
        };
        let actor = call(
            &host,
            |reply| crate::actors::host::HostMsg::SpawnSandbox {
                row: row.clone(),
                insert: true,
                waiter: Some(waiter),
                reply: Some(reply),
                span: tracing::Span::current(),
            },
            QUICK,
        )
        .await??;
        Ok((actor, row))
    }

    /// One of the org's sandboxes; another org's is "not found".
    pub async fn get_sandbox(&self, org_id: &str, id: &str) -> Result<sandbox::Model> {
        self.inner
            .store
            .get_sandbox(org_id, id)
            .await?
            .ok_or(CorralError::NotFound("sandbox"))
    }

    pub async fn list_sandboxes(
        &self,
        org_id: &str,
        filter: &SandboxFilter,
    ) -> Result<Vec<sandbox::Model>> {
        self.inner.store.list_sandboxes(org_id, filter).await
    }

    /// Asks the sandbox's actor, woken first if it is dormant. An actor
    /// that stops without answering (it went dormant, was destroyed or
    /// moved to another host with the request still in its mailbox) did
    /// not act on it: the request goes again, through the host the row
    /// names now. A sandbox destroyed meanwhile is `InvalidState`.
    async fn ask_sandbox<T: Send + 'static>(
        &self,
        row: &sandbox::Model,
        make: impl Fn(RpcReplyPort<T>) -> SandboxMsg,
        timeout: Duration,
    ) -> Result<T> {
        const ATTEMPTS: usize = 4;
        let prefix = &self.inner.prefix;
        let mut row = row.clone();
        let mut failure = CorralError::Internal("sandbox actor unavailable".into());
        for attempt in 0..ATTEMPTS {
            // After a first refusal the registry may still name the actor
            // that refused: ask its host.
            let actor = if attempt == 0 {
                crate::actors::host::sandbox_actor(prefix, &row).await
            } else {
                crate::actors::host::wake_sandbox(prefix, &row).await
            };
            match actor {
                Ok(actor) => match actor.ask(&make, Some(timeout)).await {
                    Ok(CallResult::Success(value)) => return Ok(value),
                    Ok(CallResult::Timeout) => {
                        return Err(CorralError::HostTimeout(
                            u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
                        ))
                    }
                    Ok(CallResult::SenderError) | Err(_) => {}
                },
                Err(err) => failure = err,
            }
            tracing::debug!(sandbox.id = %row.id, attempt, "its actor stopped before answering; asking again");
            row = self
                .inner
                .store
                .get_sandbox_any_org(&row.id)
                .await?
                .ok_or(CorralError::NotFound("sandbox"))?;
            if row.state == SandboxState::Destroyed.as_str() {
                return Err(CorralError::InvalidState("the sandbox is destroyed".into()));
            }
        }
        Err(failure)
    }

    /// Sets the desired state of one of the org's sandboxes and, with
    /// `wait`, answers once it is reached (or the attempt failed).
    pub async fn set_desired(
        &self,
        org_id: &str,
        id: &str,
        desired: DesiredState,
        wait: bool,
    ) -> Result<sandbox::Model> {
        let row = self.get_sandbox(org_id, id).await?;
        if row.state == SandboxState::Destroyed.as_str() {
            return if desired == DesiredState::Destroyed {
                Ok(row)
            } else {
                Err(CorralError::InvalidState("the sandbox is destroyed".into()))
            };
        }
        if desired == DesiredState::Running && row.state != SandboxState::Running.as_str() {
            let ledger = self.ledger(org_id).await?;
            call(&ledger, LedgerMsg::AuthorizeStart, QUICK).await??;
        }
        let timeout = match desired {
            DesiredState::Running => self.inner.timeouts.start.max(self.inner.timeouts.create),
            DesiredState::Stopped => self.inner.timeouts.stop_grace + self.inner.timeouts.start,
            DesiredState::Destroyed => self.inner.timeouts.destroy + self.inner.timeouts.stop_grace,
        };
        // The actor's own steps are bounded by the host deadlines; the
        // margin covers queueing behind an earlier operation.
        let margin = Duration::from_secs(30);
        let span = tracing::Span::current();
        let answered = if wait {
            self.ask_sandbox(
                &row,
                |reply| SandboxMsg::SetDesired {
                    desired,
                    reply,
                    span: span.clone(),
                },
                timeout + margin,
            )
            .await
        } else {
            // Answer once the intent is persisted (it may queue behind a step
            // in flight), so a crash right after the answer loses nothing.
            self.ask_sandbox(
                &row,
                |reply| SandboxMsg::SetDesiredNoWait {
                    desired,
                    reply,
                    span: span.clone(),
                },
                self.inner.timeouts.create.max(timeout) + margin,
            )
            .await
        };
        match answered {
            // A delete that lost a race with another delete is done.
            Err(CorralError::InvalidState(_)) if desired == DesiredState::Destroyed => {
                let row = self.get_sandbox(org_id, id).await?;
                if row.state == SandboxState::Destroyed.as_str() {
                    Ok(row)
                } else {
                    Err(CorralError::InvalidState(
                        "the sandbox changed while it was being deleted; try again".into(),
                    ))
                }
            }
            answered => answered?,
        }
    }

    pub async fn exec(&self, org_id: &str, id: &str, spec: ExecSpec) -> Result<ExecOutcome> {
        let row = self.get_sandbox(org_id, id).await?;
        if row.state != SandboxState::Running.as_str() {
            return Err(CorralError::InvalidState(format!(
                "the sandbox is {}; exec needs it running",
                row.state
            )));
        }
        let timeout = Duration::from_millis(u64::from(spec.timeout_ms))
            + self.inner.timeouts.exec_margin
            + Duration::from_secs(5);
        let span = tracing::Span::current();
        self.ask_sandbox(
            &row,
            |reply| SandboxMsg::Exec {
                spec: spec.clone(),
                reply,
                span: span.clone(),
            },
            timeout,
        )
        .await?
    }

    // ---- hosts ---------------------------------------------------------

    /// An authenticated agent registered; answers with the connection actor
    /// to which the stream's inbound messages must be sent.
    pub async fn host_connected(
        &self,
        host_id: &str,
        registration: HostRegistration,
        inventory: Vec<pb::SandboxStatus>,
        outbound: mpsc::Sender<pb::ControlMessage>,
    ) -> Result<ActorRef<ConnMsg>> {
        call(
            &self.inner.top.fleet,
            |reply| FleetMsg::HostConnected {
                host_id: host_id.to_string(),
                registration,
                inventory,
                outbound,
                reply,
            },
            QUICK,
        )
        .await?
    }

    pub async fn list_hosts(&self) -> Result<Vec<HostView>> {
        let rows = self.inner.store.list_hosts().await?;
        let capacity = call(&self.inner.top.scheduler, SchedulerMsg::Snapshot, QUICK).await?;
        Ok(rows
            .into_iter()
            .map(|row| {
                let capacity = capacity.get(&row.id).cloned();
                HostView { row, capacity }
            })
            .collect())
    }

    /// One host with its capacity view.
    pub async fn get_host(&self, host_id: &str) -> Result<HostView> {
        let row = self
            .inner
            .store
            .get_host(host_id)
            .await?
            .ok_or(CorralError::NotFound("host"))?;
        let capacity = self.capacity().await?.remove(host_id);
        Ok(HostView { row, capacity })
    }

    /// Cordons, uncordons or drains a host (its HostActor records it and,
    /// for a drain, moves or stops its sandboxes, each stop killing what has
    /// not exited after `drain_deadline`, default the stop grace).
    pub async fn set_host_admin(
        &self,
        host_id: &str,
        admin: HostAdminState,
        drain_deadline: Option<Duration>,
    ) -> Result<HostView> {
        let current = self.get_host(host_id).await?;
        if current.row.admin_state == HostAdminState::Decommissioned.as_str() {
            return Err(CorralError::InvalidState(
                "the host is decommissioned".into(),
            ));
        }
        let host = call(
            &self.inner.top.fleet,
            |reply| FleetMsg::GetHost(host_id.to_string(), reply),
            QUICK,
        )
        .await?
        .ok_or(CorralError::NotFound("host"))?;
        call(
            &host,
            |reply| crate::actors::host::HostMsg::SetAdmin {
                admin,
                drain_deadline,
                reply,
            },
            QUICK,
        )
        .await??;
        self.get_host(host_id).await
    }

    /// Whether `org_id`'s create requests may choose their placement
    /// strategy: its own setting, else the deployment's.
    pub fn allows_strategy_override(&self, org_id: &str) -> bool {
        self.inner
            .strategy_override
            .get(org_id)
            .map_or(self.inner.scheduling.allow_strategy_override, |on| *on)
    }

    /// Sets the org's placement settings: stored, then applied to every
    /// placement (new and again) and create request from now on. Whether
    /// its sandboxes go only to its private pool; whether its requests may
    /// choose the strategy (`None`: as the deployment says).
    pub async fn set_org_placement(
        &self,
        org_id: &str,
        private_pool_only: bool,
        allow_strategy_override: Option<bool>,
    ) -> Result<crate::store::org::Model> {
        let org = self
            .inner
            .store
            .set_org_placement(org_id, private_pool_only, allow_strategy_override)
            .await?;
        match org.allow_strategy_override {
            Some(on) => self.inner.strategy_override.insert(org.id.clone(), on),
            None => self
                .inner
                .strategy_override
                .remove(&org.id)
                .map(|(_, on)| on),
        };
        // Queued before any placement that follows this answer.
        self.inner
            .top
            .scheduler
            .tell(SchedulerMsg::SetPrivatePoolOnly {
                org_id: org.id.clone(),
                on: org.private_pool_only,
            })
            .map_err(|_| CorralError::Internal("scheduler unavailable".into()))?;
        Ok(org)
    }

    /// Removes an empty host from the fleet for good: no placements, its
    /// tokens revoked, its actor stopped. A host that still holds live
    /// sandboxes must be drained first. Answers with the revoked token ids
    /// (the caller ends their streams).
    pub async fn decommission_host(&self, host_id: &str) -> Result<(HostView, Vec<String>)> {
        let current = self.get_host(host_id).await?;
        if current.row.admin_state != HostAdminState::Decommissioned.as_str() {
            let live = self
                .inner
                .store
                .load_live_sandboxes()
                .await?
                .into_iter()
                .filter(|s| s.host_id.as_deref() == Some(host_id))
                .count();
            if live > 0 {
                return Err(CorralError::Conflict(format!(
                    "the host still holds {live} sandbox(es); drain it first"
                )));
            }
            self.inner
                .store
                .set_host_admin(host_id, HostAdminState::Decommissioned)
                .await?;
        }
        let tokens = self.inner.store.revoke_host_tokens_of(host_id).await?;
        let _ = self
            .inner
            .top
            .fleet
            .tell(FleetMsg::Forget(host_id.to_string()));
        let _ = self.inner.top.scheduler.tell(SchedulerMsg::Remove {
            host_id: host_id.to_string(),
        });
        let view = self.get_host(host_id).await?;
        Ok((view, tokens.into_iter().map(|t| t.id).collect()))
    }

    /// The scheduler's capacity view (tests check it is never exceeded).
    pub async fn capacity(&self) -> Result<std::collections::HashMap<String, HostCapacity>> {
        call(&self.inner.top.scheduler, SchedulerMsg::Snapshot, QUICK).await
    }

    // ---- billing -------------------------------------------------------

    async fn ledger(&self, org_id: &str) -> Result<ActorRef<LedgerMsg>> {
        call(
            &self.inner.top.orgs,
            |reply| OrgsMsg::Ledger(org_id.to_string(), reply),
            QUICK,
        )
        .await?
    }

    /// Credits an org (deposit, adjustment or refund); the same
    /// `reference` never credits twice.
    pub async fn credit(
        &self,
        org_id: &str,
        kind: CreditKind,
        amount_micros: i64,
        reference: &str,
        description: &str,
    ) -> Result<LedgerSummary> {
        if self.inner.store.get_org(org_id).await?.is_none() {
            return Err(CorralError::NotFound("organisation"));
        }
        let ledger = self.ledger(org_id).await?;
        call(
            &ledger,
            |reply| LedgerMsg::Credit {
                kind,
                amount_micros,
                reference: reference.to_string(),
                description: description.to_string(),
                reply,
            },
            QUICK,
        )
        .await?
    }

    pub async fn billing(&self, org_id: &str) -> Result<LedgerSummary> {
        let ledger = self.ledger(org_id).await?;
        call(&ledger, LedgerMsg::Summary, QUICK).await
    }

    /// Changes an org's plan, exemption or quota.
    pub async fn configure_billing(
        &self,
        org_id: &str,
        settings: BillingSettings,
    ) -> Result<LedgerSummary> {
        if self.inner.store.get_org(org_id).await?.is_none() {
            return Err(CorralError::NotFound("organisation"));
        }
        let ledger = self.ledger(org_id).await?;
        call(
            &ledger,
            |reply| LedgerMsg::Configure { settings, reply },
            QUICK,
        )
        .await?
    }

    /// Checks every org's ledger: the balance equals the sum of its entries
    /// and no sandbox was charged twice for any instant.
    pub async fn audit_ledgers(&self) -> Result<Vec<LedgerAudit>> {
        let mut audits = Vec::new();
        for org in self.inner.store.list_orgs().await? {
            let ledger = self.ledger(&org.id).await?;
            audits.push(call(&ledger, LedgerMsg::Audit, QUICK).await??);
        }
        Ok(audits)
    }

    // ---- operators -----------------------------------------------------

    /// Sandbox and billing transitions from now on (of every org).
    pub fn subscribe_events(&self) -> tokio::sync::broadcast::Receiver<crate::events::Event> {
        self.inner.metrics.events.subscribe()
    }

    /// The live supervision tree.
    pub fn actor_tree(&self) -> ActorNode {
        tree::snapshot(
            &self.inner.prefix,
            &self.inner.root.get_cell(),
            &self.inner.metrics.registry,
        )
    }

    /// The live supervision tree pruned to the actors `filter` asks for
    /// (and their ancestors). Reads without messaging any actor; call it
    /// off the async workers for large trees.
    pub fn actor_tree_filtered(&self, filter: &tree::TreeFilter) -> ActorNode {
        tree::filtered(
            &self.inner.prefix,
            &self.inner.root.get_cell(),
            &self.inner.metrics.registry,
            filter,
        )
    }

    /// The live supervision tree pruned by `filter`, each host annotated
    /// with its connection and operator state (`ready/active`,
    /// `disconnected/draining`, ...). The walk runs off the async workers,
    /// so a tree of 100,000 actors never holds up other requests.
    pub async fn actor_tree_with_states(&self, filter: tree::TreeFilter) -> Result<ActorNode> {
        let hosts: std::collections::HashMap<String, String> = self
            .inner
            .store
            .list_hosts()
            .await?
            .into_iter()
            .map(|h| (h.id, format!("{}/{}", h.state, h.admin_state)))
            .collect();
        let cp = self.clone();
        tokio::task::spawn_blocking(move || {
            let mut tree = cp.actor_tree_filtered(&filter);
            tree.annotate("host", &|id| hosts.get(id).cloned());
            tree
        })
        .await
        .map_err(|err| CorralError::Internal(format!("actor tree walk: {err}")))
    }

    /// Resources the scheduler has reserved on a host, if known.
    pub async fn allocated_on(&self, host_id: &str) -> Result<Option<Resources>> {
        Ok(self.capacity().await?.get(host_id).map(|c| c.allocated))
    }
}

/// Serialises the spec's collections into the row's JSON columns.
mod erased {
    pub trait Json {
        fn to_value(&self) -> serde_json::Value;
    }
    impl<T: serde::Serialize> Json for T {
        fn to_value(&self) -> serde_json::Value {
            serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
        }
    }
}

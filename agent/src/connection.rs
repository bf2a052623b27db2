//! The agent's side of the control-plane stream: dial out, register, then
//! answer commands, send heartbeats and report what the runtime did on its
//! own, until the stream ends; then back off and dial again, forever.
//!
//! Owns:
//! - the reconnect loop with exponential backoff (200 ms doubling to 5 s,
//!   full jitter, reset after a successful registration);
//! - one session per stream: the outbound mpsc that is the stream's only
//!   writer (replies, heartbeats and events all go through it), the heartbeat
//!   and poll tasks (ended with the session), and the table of last-seen
//!   sandbox phases the poll diffs against;
//! - bounded command concurrency: a command runs only if it gets a permit of
//!   the agent-wide semaphore at once, otherwise it is answered `BUSY` right
//!   away — never queued without bound, never dropped silently;
//! - the [`SessionLink`]: the agent-wide handle on the current session (if
//!   any) through which the TTL watchdog, which outlives sessions, marks its
//!   stops in the session's phase table and reports them as "ttl" events.
//!
//! A session ending drops its pending replies, not its sandboxes: runtime
//! calls already started run to completion (aborting a create half way would
//! leave debris), and running sandboxes are never touched by a disconnect or
//! an agent restart.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use corral_proto::pb;
use corral_proto::pb::agent_message::Payload as AgentPayload;
use corral_proto::pb::control_message::Payload as ControlPayload;
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tracing::Instrument;

use crate::runtime::{ExecSpec, Phase, Runtime, RuntimeError, SandboxSpec, SandboxStatus};
use crate::AgentConfig;

/// Deadline for dialing, the stream's response headers and the RegisterAck.
pub const REGISTER_TIMEOUT: Duration = Duration::from_secs(10);
/// First reconnect delay bound; doubles per failed attempt.
pub const BACKOFF_BASE: Duration = Duration::from_millis(200);
/// Largest reconnect delay bound.
pub const BACKOFF_CAP: Duration = Duration::from_secs(5);
/// Heartbeat interval when the ack leaves it at 0.
const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(5);
/// Slack in the outbound queue beyond one reply per command permit, for
/// heartbeats, events and BUSY replies.
const OUTBOUND_SLACK: usize = 256;

/// Exponential backoff with full jitter: attempt n waits a uniformly random
/// time in `[0, min(cap, base * 2^n)]`.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration) -> Self {
        Self {
            base,
            cap,
            attempt: 0,
        }
    }

    /// The upper bound of the next delay.
    pub fn ceiling(&self) -> Duration {
        let factor = 1u32 << self.attempt.min(20);
        self.base.saturating_mul(factor).min(self.cap)
    }

    /// The next delay, and one step further.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(fastrand::u64(0..=nanos))
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// Runs sessions until `shutdown` resolves. `link` is where the current
/// session is published for work that outlives sessions (the watchdog).
pub async fn run(
    config: AgentConfig,
    runtime: Arc<dyn Runtime>,
    link: Arc<SessionLink>,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    // Refuse a token that cannot be a header before dialing anything: that
    // is a configuration error, not something a retry fixes.
    let auth: tonic::metadata::MetadataValue<tonic::metadata::Ascii> =
        format!("Bearer {}", config.token)
            .parse()
            .map_err(|_| anyhow!("the host token contains characters not allowed in a header"))?;
    if config.token.is_empty() {
        bail!("the host token is empty");
    }
    let permits = Arc::new(Semaphore::new(config.max_concurrent_commands.max(1)));
    let mut backoff = Backoff::new(BACKOFF_BASE, BACKOFF_CAP);
    tokio::pin!(shutdown);
    loop {
        let session = run_session(&config, &auth, &runtime, &link, &permits, &mut backoff);
        tokio::select! {
            _ = &mut shutdown => {
                tracing::info!("shutting down the agent connection");
                return Ok(());
            }
            ended = session => match ended {
                Ok(()) => tracing::warn!("the control plane closed the stream"),
                Err(e) => tracing::warn!(error = %format!("{e:#}"), "connection to the control plane failed"),
            }
        }
        let delay = backoff.next_delay();
        tracing::info!(?delay, "reconnecting after a pause");
        tokio::select! {
            _ = &mut shutdown => return Ok(()),
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// Aborts the session's background tasks when the session ends.
struct TaskGuard(Vec<JoinHandle<()>>);

impl Drop for TaskGuard {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

/// One stream, from dialing to its end. Returns Ok when the control plane
/// ended the stream cleanly.
async fn run_session(
    config: &AgentConfig,
    auth: &tonic::metadata::MetadataValue<tonic::metadata::Ascii>,
    runtime: &Arc<dyn Runtime>,
    link: &Arc<SessionLink>,
    permits: &Arc<Semaphore>,
    backoff: &mut Backoff,
) -> anyhow::Result<()> {
    let endpoint = tonic::transport::Endpoint::from_shared(config.control_plane_url.clone())
        .context("invalid control plane URL")?
        .connect_timeout(REGISTER_TIMEOUT)
        .tcp_nodelay(true)
        // Notice a control plane that vanished without closing the socket.
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true);
    let endpoint = if config.control_plane_url.starts_with("https://") {
        endpoint
            .tls_config(config.tls.client_config())
            .context("the control plane's TLS settings")?
    } else {
        endpoint
    };
    let channel = endpoint
        .connect()
        .await
        .with_context(|| format!("dialing {}", config.control_plane_url))?;
    let mut client = pb::agent_service_client::AgentServiceClient::new(channel);

    let (tx, rx) =
        mpsc::channel::<pb::AgentMessage>(config.max_concurrent_commands + OUTBOUND_SLACK);
    // Attached before the inventory is listed, so a watchdog stop that ends
    // after the listing lands in this session's table and is reported here
    // (held until the RegisterAck, as nothing may precede the Register).
    let table = Arc::new(Mutex::new(PhaseTable::default()));
    let attached = link.attach(table.clone(), tx.clone());
    let inventory = runtime
        .list()
        .await
        .map_err(|e| anyhow!("listing the runtime's sandboxes for registration: {e}"))?;
    lock(&table).seed(&inventory);
    let register = pb::Register {
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        hostname: config.hostname.clone(),
        runtime: runtime.kind().to_string(),
        isolated: runtime.isolated(),
        capacity: Some(pb::Capacity {
            cpu_millis: config.cpu_millis,
            memory_mb: config.memory_mb,
        }),
        images: runtime.images(),
        inventory: inventory.iter().map(pb::SandboxStatus::from).collect(),
        max_concurrent_commands: u32::try_from(config.max_concurrent_commands).unwrap_or(u32::MAX),
        labels: config.labels.clone().into_iter().collect(),
    };
    // Queued before the call: the control plane may wait for it before it
    // answers the stream's headers.
    tx.send(envelope(0, None, AgentPayload::Register(register)))
        .await
        .map_err(|_| anyhow!("outbound queue closed"))?;
    let mut request = tonic::Request::new(ReceiverStream::new(rx));
    request.metadata_mut().insert("authorization", auth.clone());

    let deadline = tokio::time::Instant::now() + REGISTER_TIMEOUT;
    let response = tokio::time::timeout_at(deadline, client.connect(request))
        .await
        .context("no answer to the stream within the register deadline")?
        .map_err(|status| match status.code() {
            tonic::Code::Unauthenticated => anyhow!(
                "the control plane refused the host token: {}",
                status.message()
            ),
            _ => anyhow!("opening the stream: {status}"),
        })?;
    let mut inbound = response.into_inner();
    let first = tokio::time::timeout_at(deadline, inbound.message())
        .await
        .context("no RegisterAck within the register deadline")?
        .context("reading the RegisterAck")?
        .context("the stream ended before the RegisterAck")?;
    let ack = match first.payload {
        Some(ControlPayload::RegisterAck(ack)) => ack,
        other => bail!("expected a RegisterAck first, got {other:?}"),
    };
    tracing::info!(
        host.id = %ack.host_id,
        runtime = runtime.kind(),
        sandboxes = inventory.len(),
        "registered with the control plane"
    );
    backoff.reset();
    attached.registered().await;
    let _connected = ConnectedGauge::up();

    let heartbeat_every = match ack.heartbeat_interval_ms {
        0 => DEFAULT_HEARTBEAT,
        ms => Duration::from_millis(u64::from(ms)),
    };
    let _tasks = TaskGuard(vec![
        tokio::spawn(heartbeats(tx.clone(), table.clone(), heartbeat_every)),
        tokio::spawn(poll_events(
            tx.clone(),
            table.clone(),
            runtime.clone(),
            config.poll_interval,
        )),
    ]);
    let span = tracing::info_span!("agent.session", host.id = %ack.host_id);

    loop {
        let message = match inbound.message().await {
            Ok(Some(message)) => message,
            Ok(None) => return Ok(()),
            Err(status) => bail!("stream error: {status}"),
        };
        let request_id = message.request_id;
        let trace = message.trace;
        let command = match message.payload {
            Some(ControlPayload::RegisterAck(_)) => {
                tracing::warn!("ignoring a second RegisterAck");
                continue;
            }
            Some(command) => command,
            None => {
                tracing::warn!(request_id, "ignoring a message without a command");
                continue;
            }
        };
        if request_id == 0 {
            tracing::warn!("ignoring a command without a request id: no reply could be routed");
            continue;
        }
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tracing::warn!(request_id, "too many commands in flight; answering BUSY");
            let busy = pb::reply::Result::Error(pb::Error {
                code: pb::ErrorCode::Busy as i32,
                message: format!(
                    "the agent runs at most {} commands at once",
                    config.max_concurrent_commands
                ),
            });
            if tx
                .send(reply_envelope(request_id, trace, busy))
                .await
                .is_err()
            {
                bail!("outbound queue closed");
            }
            continue;
        };
        let sandbox_id = command_sandbox_id(&command);
        if let Some(id) = &sandbox_id {
            lock(&table).begin_command(id);
        }
        // The server side of the control plane's command: it continues the
        // trace whose context came in the envelope (else it hangs under
        // the session).
        let name = command_name(&command);
        let remote = trace
            .as_ref()
            .filter(|t| !t.traceparent.is_empty())
            .map(|t| corral_telemetry::W3c {
                traceparent: t.traceparent.clone(),
                tracestate: t.tracestate.clone(),
            });
        let parent = if remote.is_some() { None } else { span.id() };
        let command_span = tracing::info_span!(
            parent: parent,
            "agent.command",
            otel.name = %format!("corral.agent.v1.AgentService/{}", rpc_method(name)),
            otel.kind = "server",
            rpc.system = "grpc",
            rpc.service = "corral.agent.v1.AgentService",
            rpc.method = rpc_method(name),
            request_id,
            command = name,
            host.id = %ack.host_id,
            sandbox.id = sandbox_id.as_deref().unwrap_or(""),
            otel.status_code = tracing::field::Empty,
            otel.status_message = tracing::field::Empty,
        );
        if let Some(remote) = &remote {
            corral_telemetry::set_parent(&command_span, remote);
        }
        let (tx, table, runtime) = (tx.clone(), table.clone(), runtime.clone());
        let traced = command_span.clone();
        tokio::spawn(
            async move {
                let _permit = permit;
                let metrics = &*crate::metrics::METRICS;
                metrics
                    .in_flight
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let started = std::time::Instant::now();
                let runtime_span = tracing::info_span!(
                    "runtime.call",
                    otel.name = %format!("runtime {name}"),
                    runtime = runtime.kind(),
                    operation = name,
                    sandbox.id = sandbox_id.as_deref().unwrap_or(""),
                );
                let (result, status) = execute(runtime.as_ref(), command)
                    .instrument(runtime_span)
                    .await;
                metrics
                    .in_flight
                    .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                metrics
                    .command_seconds
                    .observe(&[name], started.elapsed().as_secs_f64());
                if let Some(id) = &sandbox_id {
                    lock(&table).finish_command(id, status.as_ref());
                }
                if let pb::reply::Result::Error(e) = &result {
                    let code =
                        pb::ErrorCode::try_from(e.code).map_or("unknown", |c| c.as_str_name());
                    metrics.commands.inc(&[name, code]);
                    corral_telemetry::mark_failed(&traced, &e.message);
                    tracing::info!(code = e.code, message = %e.message, "command failed");
                } else {
                    metrics.commands.inc(&[name, "ok"]);
                }
                // A closed queue means the stream ended: the reply is dropped
                // with it and the control plane fails the request itself.
                let _ = tx.send(reply_envelope(request_id, trace, result)).await;
            }
            .instrument(command_span),
        );
    }
}

/// `corral_agent_connected` is 1 while this guard lives.
struct ConnectedGauge;

impl ConnectedGauge {
    fn up() -> Self {
        let metrics = &*crate::metrics::METRICS;
        metrics.sessions.inc(&[]);
        metrics
            .connected
            .store(1, std::sync::atomic::Ordering::Relaxed);
        Self
    }
}

impl Drop for ConnectedGauge {
    fn drop(&mut self) {
        crate::metrics::METRICS
            .connected
            .store(0, std::sync::atomic::Ordering::Relaxed);
    }
}

fn lock(table: &Mutex<PhaseTable>) -> std::sync::MutexGuard<'_, PhaseTable> {
    table.lock().unwrap_or_else(|p| p.into_inner())
}

fn envelope(
    request_id: u64,
    trace: Option<pb::TraceContext>,
    payload: AgentPayload,
) -> pb::AgentMessage {
    pb::AgentMessage {
        request_id,
        trace,
        payload: Some(payload),
    }
}

fn reply_envelope(
    request_id: u64,
    trace: Option<pb::TraceContext>,
    result: pb::reply::Result,
) -> pb::AgentMessage {
    envelope(
        request_id,
        trace,
        AgentPayload::Reply(pb::Reply {
            result: Some(result),
        }),
    )
}

fn command_sandbox_id(command: &ControlPayload) -> Option<String> {
    match command {
        ControlPayload::Create(c) => Some(c.sandbox_id.clone()),
        ControlPayload::Start(c) => Some(c.sandbox_id.clone()),
        ControlPayload::Stop(c) => Some(c.sandbox_id.clone()),
        ControlPayload::Destroy(c) => Some(c.sandbox_id.clone()),
        // Execs do not change the lifecycle.
        ControlPayload::Exec(_) | ControlPayload::Inventory(_) | ControlPayload::RegisterAck(_) => {
            None
        }
    }
}

/// The command as an RPC method name, for span names.
fn rpc_method(name: &str) -> &'static str {
    match name {
        "create" => "CreateSandbox",
        "start" => "StartSandbox",
        "stop" => "StopSandbox",
        "destroy" => "DestroySandbox",
        "exec" => "Exec",
        "inventory" => "Inventory",
        _ => "RegisterAck",
    }
}

fn command_name(command: &ControlPayload) -> &'static str {
    match command {
        ControlPayload::Create(_) => "create",
        ControlPayload::Start(_) => "start",
        ControlPayload::Stop(_) => "stop",
        ControlPayload::Destroy(_) => "destroy",
        ControlPayload::Exec(_) => "exec",
        ControlPayload::Inventory(_) => "inventory",
        ControlPayload::RegisterAck(_) => "register_ack",
    }
}

/// Runs one command on the runtime. Returns the reply and, for lifecycle
/// commands that succeeded, the state they left behind.
pub async fn execute(
    runtime: &dyn Runtime,
    command: ControlPayload,
) -> (pb::reply::Result, Option<SandboxStatus>) {
    let status_reply = |r: Result<SandboxStatus, RuntimeError>| match r {
        Ok(status) => (
            pb::reply::Result::Sandbox(pb::SandboxStatus::from(&status)),
            Some(status),
        ),
        Err(e) => (pb::reply::Result::Error(pb::Error::from(&e)), None),
    };
    match command {
        ControlPayload::Create(c) => status_reply(runtime.create(&SandboxSpec::from(c)).await),
        ControlPayload::Start(s) => status_reply(runtime.start(&s.sandbox_id).await),
        ControlPayload::Stop(s) => status_reply(
            runtime
                .stop(
                    &s.sandbox_id,
                    Duration::from_millis(u64::from(s.grace_period_ms)),
                )
                .await,
        ),
        ControlPayload::Destroy(d) => status_reply(runtime.destroy(&d.sandbox_id).await),
        ControlPayload::Exec(e) => {
            let (id, spec) = ExecSpec::from_pb(e);
            match runtime.exec(&id, spec).await {
                Ok(out) => (pb::reply::Result::Exec(out.into()), None),
                Err(e) => (pb::reply::Result::Error(pb::Error::from(&e)), None),
            }
        }
        ControlPayload::Inventory(_) => match runtime.list().await {
            Ok(list) => (
                pb::reply::Result::Inventory(pb::Inventory {
                    sandboxes: list.iter().map(pb::SandboxStatus::from).collect(),
                }),
                None,
            ),
            Err(e) => (pb::reply::Result::Error(pb::Error::from(&e)), None),
        },
        ControlPayload::RegisterAck(_) => (
            pb::reply::Result::Error(pb::Error {
                code: pb::ErrorCode::InvalidArgument as i32,
                message: "a RegisterAck is not a command".into(),
            }),
            None,
        ),
    }
}

async fn heartbeats(
    tx: mpsc::Sender<pb::AgentMessage>,
    table: Arc<Mutex<PhaseTable>>,
    every: Duration,
) {
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let running = lock(&table).running();
        let beat = pb::Heartbeat {
            sandboxes_running: running,
            usage: None,
        };
        if tx
            .send(envelope(0, None, AgentPayload::Heartbeat(beat)))
            .await
            .is_err()
        {
            return;
        }
    }
}

async fn poll_events(
    tx: mpsc::Sender<pb::AgentMessage>,
    table: Arc<Mutex<PhaseTable>>,
    runtime: Arc<dyn Runtime>,
    every: Duration,
) {
    loop {
        tokio::time::sleep(every).await;
        let since = lock(&table).seq();
        let listed = match runtime.list().await {
            Ok(listed) => listed,
            Err(e) => {
                tracing::warn!(error = %e, "polling the runtime failed");
                continue;
            }
        };
        let events = lock(&table).observe(&listed, since);
        for (status, reason) in events {
            tracing::info!(sandbox.id = %status.id, phase = ?status.phase, exit_code = ?status.exit_code, reason, "sandbox changed on its own");
            let event = pb::SandboxEvent {
                status: Some(pb::SandboxStatus::from(&status)),
                reason: reason.to_string(),
            };
            if tx
                .send(envelope(0, None, AgentPayload::Event(event)))
                .await
                .is_err()
            {
                return;
            }
        }
    }
}

/// The agent-wide link between the TTL watchdog (which runs for the life of
/// the agent) and the session connected at the moment, if any.
///
/// A watchdog stop is a change nobody on the stream commanded, but it is
/// not the sandbox exiting on its own either: while it runs, the sandbox is
/// "in flight" in the session's phase table exactly like a command (so the
/// poll skips it), and when it has stopped the sandbox it is reported once
/// as a `SandboxEvent` with reason "ttl". A session attached while a stop is
/// under way inherits the in-flight mark; with no session, nothing is
/// queued (the next Register's inventory carries the outcome).
#[derive(Debug, Default)]
pub struct SessionLink {
    state: Mutex<LinkState>,
}

#[derive(Debug, Default)]
struct LinkState {
    next_session: u64,
    current: Option<Attached>,
    /// Sandboxes the watchdog is stopping right now.
    stopping: HashSet<String>,
}

#[derive(Debug)]
struct Attached {
    session: u64,
    table: Arc<Mutex<PhaseTable>>,
    tx: mpsc::Sender<pb::AgentMessage>,
    /// False until the RegisterAck: events wait in `held` until then, since
    /// the Register must be the first message on the stream.
    registered: bool,
    held: Vec<pb::SandboxEvent>,
}

/// A session's attachment to the [`SessionLink`]; detaches when dropped.
pub struct AttachedSession {
    link: Arc<SessionLink>,
    session: u64,
}

impl SessionLink {
    fn state(&self) -> std::sync::MutexGuard<'_, LinkState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes `table` and `tx` the current session's (replacing any other):
    /// stops under way are marked in flight in `table` at once.
    pub fn attach(
        self: &Arc<Self>,
        table: Arc<Mutex<PhaseTable>>,
        tx: mpsc::Sender<pb::AgentMessage>,
    ) -> AttachedSession {
        let mut state = self.state();
        state.next_session += 1;
        let session = state.next_session;
        {
            let mut t = lock(&table);
            for id in &state.stopping {
                t.begin_command(id);
            }
        }
        state.current = Some(Attached {
            session,
            table,
            tx,
            registered: false,
            held: Vec::new(),
        });
        AttachedSession {
            link: self.clone(),
            session,
        }
    }

    /// Marks `id` as being stopped by the watchdog. False when it already
    /// is (the earlier stop is still under way): the caller must not stop it
    /// again.
    pub fn begin_ttl_stop(&self, id: &str) -> bool {
        let mut state = self.state();
        if !state.stopping.insert(id.to_string()) {
            return false;
        }
        if let Some(current) = &state.current {
            lock(&current.table).begin_command(id);
        }
        true
    }

    /// Ends a watchdog stop begun with [`SessionLink::begin_ttl_stop`].
    /// `stopped` is the sandbox's status when the watchdog did stop it
    /// (`None` when it failed or found nothing to do): then the session, if
    /// any, gets one "ttl" event.
    pub async fn finish_ttl_stop(&self, id: &str, stopped: Option<&SandboxStatus>) {
        let send = {
            let mut state = self.state();
            state.stopping.remove(id);
            let Some(current) = state.current.as_mut() else {
                return;
            };
            lock(&current.table).finish_command(id, stopped);
            let Some(status) = stopped else {
                return;
            };
            let event = pb::SandboxEvent {
                status: Some(pb::SandboxStatus::from(status)),
                reason: "ttl".to_string(),
            };
            if !current.registered {
                current.held.push(event);
                return;
            }
            (current.tx.clone(), event)
        };
        send_event(&send.0, send.1).await;
    }

    /// Sandboxes the watchdog is stopping right now.
    pub fn ttl_stops_in_flight(&self) -> usize {
        self.state().stopping.len()
    }
}

impl AttachedSession {
    /// The session is registered: events may flow, starting with those held.
    pub async fn registered(&self) {
        let flush = {
            let mut state = self.link.state();
            match state.current.as_mut() {
                Some(current) if current.session == self.session => {
                    current.registered = true;
                    Some((current.tx.clone(), std::mem::take(&mut current.held)))
                }
                _ => None,
            }
        };
        if let Some((tx, held)) = flush {
            for event in held {
                send_event(&tx, event).await;
            }
        }
    }
}

impl Drop for AttachedSession {
    fn drop(&mut self) {
        let mut state = self.link.state();
        if state
            .current
            .as_ref()
            .is_some_and(|c| c.session == self.session)
        {
            state.current = None;
        }
    }
}

/// Sends an event on a session's queue; a closed queue means the session
/// ended, and the next Register's inventory carries the outcome instead.
async fn send_event(tx: &mpsc::Sender<pb::AgentMessage>, event: pb::SandboxEvent) {
    if let Some(status) = &event.status {
        tracing::info!(sandbox.id = %status.sandbox_id, reason = %event.reason, "reporting a sandbox event");
    }
    let _ = tx.send(envelope(0, None, AgentPayload::Event(event))).await;
}

/// The last phase the agent reported for a sandbox.
#[derive(Debug, Clone)]
struct Observed {
    phase: Phase,
    exit_code: Option<i32>,
    image: String,
    /// The table's sequence number when a command last set it.
    changed_at: u64,
    /// A command (or the watchdog) stopped it and has reported that: an exit
    /// code learnt afterwards is no news, not an "exited" event.
    stopped_by_command: bool,
}

/// The last-seen phase of every sandbox, which the poll diffs against to
/// find changes the runtime made on its own. Command results (and the TTL
/// watchdog's stops, through the [`SessionLink`]) update it, and sandboxes
/// with a command or a watchdog stop in flight are left to it, so a stop
/// does not also come back as an "exited" event.
#[derive(Debug, Default)]
pub struct PhaseTable {
    seq: u64,
    sandboxes: HashMap<String, Observed>,
    in_flight: HashMap<String, usize>,
}

impl PhaseTable {
    pub fn from_inventory(inventory: &[SandboxStatus]) -> Self {
        let mut table = Self::default();
        table.seed(inventory);
        table
    }

    /// Adds the sandboxes of a listing it does not know yet, as the
    /// baseline; entries a command (or the watchdog) recorded since it was
    /// made are newer and are kept.
    pub fn seed(&mut self, inventory: &[SandboxStatus]) {
        for s in inventory {
            if !self.sandboxes.contains_key(&s.id) {
                self.record(s, 0);
            }
        }
    }

    fn record(&mut self, s: &SandboxStatus, changed_at: u64) {
        self.sandboxes.insert(
            s.id.clone(),
            Observed {
                phase: s.phase,
                exit_code: s.exit_code,
                image: s.image.clone(),
                changed_at,
                stopped_by_command: false,
            },
        );
    }

    /// The current sequence number; pass it to [`PhaseTable::observe`] for a
    /// listing taken after this call.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    pub fn begin_command(&mut self, id: &str) {
        self.seq += 1;
        *self.in_flight.entry(id.to_string()).or_default() += 1;
    }

    /// Ends a command; `status` is what it left behind when it succeeded.
    pub fn finish_command(&mut self, id: &str, status: Option<&SandboxStatus>) {
        self.seq += 1;
        if let Some(n) = self.in_flight.get_mut(id) {
            *n -= 1;
            if *n == 0 {
                self.in_flight.remove(id);
            }
        }
        match status {
            Some(s) => {
                self.record(s, self.seq);
                if let Some(o) = self.sandboxes.get_mut(id) {
                    o.stopped_by_command = s.phase == Phase::Stopped;
                }
            }
            // A failed command may still have changed something: make the
            // next poll's view the new baseline rather than an event.
            None => {
                if let Some(o) = self.sandboxes.get_mut(id) {
                    o.changed_at = self.seq;
                }
            }
        }
    }

    /// Sandboxes running, as last seen.
    pub fn running(&self) -> u32 {
        let n = self
            .sandboxes
            .values()
            .filter(|o| o.phase == Phase::Running)
            .count();
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    /// Takes a listing made after `since = self.seq()` and returns the changes
    /// nobody commanded: each with its reason ("exited", "vanished",
    /// "changed"). Sandboxes a command touched since then are skipped.
    pub fn observe(
        &mut self,
        listed: &[SandboxStatus],
        since: u64,
    ) -> Vec<(SandboxStatus, &'static str)> {
        let mut events = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for s in listed {
            seen.insert(s.id.clone());
            if self.in_flight.contains_key(&s.id) {
                continue;
            }
            match self.sandboxes.get(&s.id) {
                Some(o) if o.changed_at > since => {}
                Some(o) if o.phase == s.phase && o.exit_code == s.exit_code => {}
                Some(o) => {
                    let reason = match s.phase {
                        Phase::Stopped => "exited",
                        Phase::Absent => "vanished",
                        _ => "changed",
                    };
                    // A change of exit code alone (it was learnt late) is
                    // worth telling only while stopped, and only when the
                    // stop was not already reported by a command's reply or
                    // a "ttl" event.
                    let only_code = o.phase == s.phase;
                    if !only_code || (s.phase == Phase::Stopped && !o.stopped_by_command) {
                        events.push((s.clone(), reason));
                    }
                    self.record(s, since);
                }
                // New to us (made by a command we lost track of, or by
                // hand): remember it quietly; the control plane reconciles
                // inventories.
                None => self.record(s, since),
            }
        }
        let mut vanished = Vec::new();
        let mut forget = Vec::new();
        for (id, o) in &self.sandboxes {
            if seen.contains(id) || self.in_flight.contains_key(id) || o.changed_at > since {
                continue;
            }
            if o.phase == Phase::Absent {
                // Confirmed gone by a listing newer than its destroy.
                forget.push(id.clone());
            } else {
                vanished.push(SandboxStatus::absent(id, &o.image));
            }
        }
        for id in forget {
            self.sandboxes.remove(&id);
        }
        for s in vanished {
            self.record(&s, since);
            events.push((s, "vanished"));
        }
        events
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(id: &str, phase: Phase, exit_code: Option<i32>) -> SandboxStatus {
        SandboxStatus {
            id: id.into(),
            phase,
            exit_code,
            image: "busybox".into(),
            expires_at: None,
        }
    }

    #[test]
    fn backoff_doubles_to_its_cap_with_full_jitter_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
        let mut ceilings = Vec::new();
        for _ in 0..8 {
            let ceiling = b.ceiling();
            ceilings.push(ceiling.as_millis());
            assert!(b.next_delay() <= ceiling);
        }
        assert_eq!(ceilings, vec![200, 400, 800, 1600, 3200, 5000, 5000, 5000]);
        b.reset();
        assert_eq!(b.ceiling(), Duration::from_millis(200));
        for _ in 0..100 {
            b.next_delay();
        }
        assert_eq!(
            b.ceiling(),
            Duration::from_secs(5),
            "no overflow after many attempts"
        );
    }

    #[test]
    fn an_exit_on_its_own_is_an_event_once() {
        let mut t = PhaseTable::from_inventory(&[status("a", Phase::Running, None)]);
        let since = t.seq();
        assert!(t
            .observe(&[status("a", Phase::Running, None)], since)
            .is_empty());
        let events = t.observe(&[status("a", Phase::Stopped, Some(7))], t.seq());
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].1, "exited");
        assert_eq!(events[0].0.exit_code, Some(7));
        assert!(t
            .observe(&[status("a", Phase::Stopped, Some(7))], t.seq())
            .is_empty());
        assert_eq!(t.running(), 0);
    }

    #[test]
    fn a_commanded_stop_is_not_an_event() {
        let mut t = PhaseTable::from_inventory(&[status("a", Phase::Running, None)]);
        // A poll starts, the stop runs and finishes while it lists.
        let since = t.seq();
        t.begin_command("a");
        let in_flight = t.observe(&[status("a", Phase::Stopped, None)], since);
        assert!(
            in_flight.is_empty(),
            "a sandbox with a command in flight is left alone"
        );
        t.finish_command("a", Some(&status("a", Phase::Stopped, None)));
        // A listing that began before the command finished is stale for it.
        assert!(t
            .observe(&[status("a", Phase::Running, None)], since)
            .is_empty());
        assert!(t
            .observe(&[status("a", Phase::Stopped, None)], t.seq())
            .is_empty());
    }

    #[test]
    fn an_exit_code_learnt_after_a_commanded_stop_is_not_an_exit() {
        let mut t = PhaseTable::from_inventory(&[status("a", Phase::Running, None)]);
        t.begin_command("a");
        t.finish_command("a", Some(&status("a", Phase::Stopped, None)));
        // The process runtime's reaper records the code a little later.
        assert!(t
            .observe(&[status("a", Phase::Stopped, Some(143))], t.seq())
            .is_empty());
        // Started again by hand and exiting on its own is news again.
        assert_eq!(
            t.observe(&[status("a", Phase::Running, None)], t.seq())[0].1,
            "changed"
        );
        let events = t.observe(&[status("a", Phase::Stopped, Some(1))], t.seq());
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].1, "exited");
    }

    #[test]
    fn a_vanished_sandbox_is_reported_but_a_destroyed_one_is_not() {
        let mut t = PhaseTable::from_inventory(&[
            status("a", Phase::Running, None),
            status("b", Phase::Running, None),
        ]);
        t.begin_command("b");
        t.finish_command("b", Some(&SandboxStatus::absent("b", "busybox")));
        let events = t.observe(&[], t.seq());
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].0.id, "a");
        assert_eq!(events[0].0.phase, Phase::Absent);
        assert_eq!(events[0].1, "vanished");
        assert!(t.observe(&[], t.seq()).is_empty(), "reported once");
        assert!(t.sandboxes.is_empty(), "tombstones are forgotten");
    }

    #[test]
    fn a_listing_from_before_a_destroy_does_not_resurrect_it() {
        let mut t = PhaseTable::from_inventory(&[status("a", Phase::Running, None)]);
        let since = t.seq();
        t.begin_command("a");
        t.finish_command("a", Some(&SandboxStatus::absent("a", "busybox")));
        assert!(t
            .observe(&[status("a", Phase::Running, None)], since)
            .is_empty());
        assert!(
            t.observe(&[], t.seq()).is_empty(),
            "no vanished event after a destroy"
        );
    }

    fn ttl_events(rx: &mut mpsc::Receiver<pb::AgentMessage>) -> Vec<pb::SandboxEvent> {
        let mut events = Vec::new();
        while let Ok(m) = rx.try_recv() {
            if let Some(AgentPayload::Event(e)) = m.payload {
                events.push(e);
            }
        }
        events
    }

    #[tokio::test]
    async fn a_watchdog_stop_is_one_ttl_event_and_not_an_exit() {
        let link = Arc::new(SessionLink::default());
        let table = Arc::new(Mutex::new(PhaseTable::from_inventory(&[status(
            "a",
            Phase::Running,
            None,
        )])));
        let (tx, mut rx) = mpsc::channel(16);
        let attached = link.attach(table.clone(), tx);
        attached.registered().await;

        // A poll starts, the watchdog stops the sandbox while it lists.
        let since = lock(&table).seq();
        assert!(link.begin_ttl_stop("a"));
        assert!(!link.begin_ttl_stop("a"), "one stop per sandbox at a time");
        assert!(lock(&table)
            .observe(&[status("a", Phase::Stopped, None)], since)
            .is_empty());
        link.finish_ttl_stop("a", Some(&status("a", Phase::Stopped, None)))
            .await;
        let events = ttl_events(&mut rx);
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].reason, "ttl");
        assert_eq!(
            events[0].status.as_ref().map(|s| s.phase),
            Some(pb::SandboxPhase::Stopped as i32)
        );
        // Neither a stale listing nor a fresh one turns it into an exit.
        assert!(lock(&table)
            .observe(&[status("a", Phase::Running, None)], since)
            .is_empty());
        let now = lock(&table).seq();
        assert!(lock(&table)
            .observe(&[status("a", Phase::Stopped, None)], now)
            .is_empty());
        assert_eq!(link.ttl_stops_in_flight(), 0);
    }

    #[tokio::test]
    async fn ttl_events_wait_for_the_register_ack_and_die_with_their_session() {
        let link = Arc::new(SessionLink::default());
        assert!(link.begin_ttl_stop("a"));
        // A session attaches while the stop is under way: it inherits the
        // in-flight mark, and the event waits for its registration.
        let table = Arc::new(Mutex::new(PhaseTable::default()));
        let (tx, mut rx) = mpsc::channel(16);
        let attached = link.attach(table.clone(), tx);
        lock(&table).seed(&[status("a", Phase::Running, None)]);
        let since = lock(&table).seq();
        assert!(lock(&table)
            .observe(&[status("a", Phase::Stopped, None)], since)
            .is_empty());
        link.finish_ttl_stop("a", Some(&status("a", Phase::Stopped, None)))
            .await;
        assert!(ttl_events(&mut rx).is_empty(), "held until registered");
        attached.registered().await;
        let events = ttl_events(&mut rx);
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].reason, "ttl");

        // With no session, a stop is not queued anywhere.
        drop(attached);
        assert!(link.begin_ttl_stop("b"));
        link.finish_ttl_stop("b", Some(&status("b", Phase::Stopped, None)))
            .await;
        assert!(ttl_events(&mut rx).is_empty());

        // A stop that found nothing to do is no event at all.
        let (tx, mut rx) = mpsc::channel(16);
        let table = Arc::new(Mutex::new(PhaseTable::default()));
        let attached = link.attach(table, tx);
        attached.registered().await;
        assert!(link.begin_ttl_stop("c"));
        link.finish_ttl_stop("c", None).await;
        assert!(ttl_events(&mut rx).is_empty());
    }

    #[tokio::test]
    async fn commands_are_executed_into_replies() {
        let rt = crate::fake::FakeRuntime::new(crate::fake::FakeConfig::default());
        let (reply, status) = execute(
            &rt,
            ControlPayload::Create(pb::CreateSandbox {
                sandbox_id: "sbx_1".into(),
                image: "busybox".into(),
                command: vec!["sleep".into(), "600".into()],
                ..Default::default()
            }),
        )
        .await;
        assert!(
            matches!(reply, pb::reply::Result::Sandbox(ref s) if s.phase == pb::SandboxPhase::Running as i32)
        );
        assert_eq!(status.map(|s| s.phase), Some(Phase::Running));
        let (reply, _) = execute(
            &rt,
            ControlPayload::Create(pb::CreateSandbox {
                sandbox_id: "sbx_2".into(),
                image: "nope".into(),
                command: vec!["true".into()],
                ..Default::default()
            }),
        )
        .await;
        assert!(
            matches!(reply, pb::reply::Result::Error(ref e) if e.code == pb::ErrorCode::ImageNotFound as i32)
        );
        let (reply, _) = execute(
            &rt,
            ControlPayload::Exec(pb::ExecRequest {
                sandbox_id: "sbx_1".into(),
                argv: vec!["echo".into(), "hi".into()],
                ..Default::default()
            }),
        )
        .await;
        assert!(matches!(reply, pb::reply::Result::Exec(ref e) if e.stdout == b"hi\n"));
        let (reply, _) = execute(&rt, ControlPayload::Inventory(pb::InventoryRequest {})).await;
        assert!(matches!(reply, pb::reply::Result::Inventory(ref i) if i.sandboxes.len() == 1));
        let (reply, status) = execute(
            &rt,
            ControlPayload::Destroy(pb::DestroySandbox {
                sandbox_id: "sbx_1".into(),
            }),
        )
        .await;
        assert!(
            matches!(reply, pb::reply::Result::Sandbox(ref s) if s.phase == pb::SandboxPhase::Absent as i32)
        );
        assert_eq!(status.map(|s| s.phase), Some(Phase::Absent));
    }
}

//! The dial-out loop against a scripted control plane served over real gRPC
//! on loopback: registration (token, capacity, inventory), replies routed by
//! request id with trace context copied, BUSY past the command bound, events
//! for changes the runtime made on its own (and none for commanded ones),
//! heartbeats, reconnection that keeps sandboxes, shutdown, and the TTL
//! watchdog (with and without a control plane, reported once as "ttl").

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use corral_agent::fake::{FakeConfig, FakeRuntime};
use corral_agent::runtime::{Phase, Runtime, SandboxSpec};
use corral_agent::{AgentConfig, WatchdogConfig};
use corral_proto::pb;
use corral_proto::pb::agent_message::Payload as AgentPayload;
use corral_proto::pb::control_message::Payload as ControlPayload;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

const TOKEN: &str = "host-token-0123456789";
const DEADLINE: Duration = Duration::from_secs(10);

/// One accepted stream, handed to the test to drive.
struct Session {
    register: pb::Register,
    inbound: Streaming<pb::AgentMessage>,
    outbound: mpsc::Sender<Result<pb::ControlMessage, Status>>,
}

struct ScriptedControlPlane {
    sessions: mpsc::UnboundedSender<Session>,
    refused: mpsc::UnboundedSender<()>,
    heartbeat_interval_ms: u32,
}

#[tonic::async_trait]
impl pb::agent_service_server::AgentService for ScriptedControlPlane {
    type ConnectStream = Pin<Box<dyn Stream<Item = Result<pb::ControlMessage, Status>> + Send>>;

    async fn connect(
        &self,
        request: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        let auth = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        if auth.as_deref() != Some(&format!("Bearer {TOKEN}")) {
            let _ = self.refused.send(());
            return Err(Status::unauthenticated("unknown host token"));
        }
        let mut inbound = request.into_inner();
        let first = inbound
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("no register"))?;
        let Some(AgentPayload::Register(register)) = first.payload else {
            return Err(Status::invalid_argument("first message must be Register"));
        };
        let (outbound, rx) = mpsc::channel(64);
        outbound
            .send(Ok(pb::ControlMessage {
                request_id: 0,
                trace: None,
                payload: Some(ControlPayload::RegisterAck(pb::RegisterAck {
                    host_id: "hst_test".into(),
                    heartbeat_interval_ms: self.heartbeat_interval_ms,
                })),
            }))
            .await
            .map_err(|_| Status::internal("closed"))?;
        let _ = self.sessions.send(Session {
            register,
            inbound,
            outbound,
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

struct Harness {
    url: String,
    sessions: mpsc::UnboundedReceiver<Session>,
    refused: mpsc::UnboundedReceiver<()>,
    server: tokio::task::JoinHandle<()>,
}

impl Harness {
    async fn start(heartbeat_interval_ms: u32) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (sessions_tx, sessions) = mpsc::unbounded_channel();
        let (refused_tx, refused) = mpsc::unbounded_channel();
        let service = ScriptedControlPlane {
            sessions: sessions_tx,
            refused: refused_tx,
            heartbeat_interval_ms,
        };
        let server = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(pb::agent_service_server::AgentServiceServer::new(service))
                .serve_with_incoming(TcpListenerStream::new(listener))
                .await;
        });
        Self {
            url: format!("http://{addr}"),
            sessions,
            refused,
            server,
        }
    }

    async fn next_session(&mut self) -> Session {
        tokio::time::timeout(DEADLINE, self.sessions.recv())
            .await
            .expect("the agent registers in time")
            .expect("server alive")
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.server.abort();
    }
}

struct RunningAgent {
    shutdown: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl RunningAgent {
    fn start(
        url: &str,
        token: &str,
        max_concurrent_commands: usize,
        runtime: &FakeRuntime,
    ) -> Self {
        Self::start_with(
            url,
            token,
            max_concurrent_commands,
            runtime,
            WatchdogConfig::default(),
        )
    }

    fn start_with(
        url: &str,
        token: &str,
        max_concurrent_commands: usize,
        runtime: &FakeRuntime,
        watchdog: WatchdogConfig,
    ) -> Self {
        let config = AgentConfig {
            control_plane_url: url.to_string(),
            token: token.to_string(),
            hostname: "test-host".into(),
            cpu_millis: 4000,
            memory_mb: 8192,
            max_concurrent_commands,
            poll_interval: Duration::from_millis(50),
            tls: Default::default(),
            labels: Default::default(),
        };
        let (tx, rx) = oneshot::channel();
        let shared: Arc<dyn Runtime> = Arc::new(runtime.clone());
        let task = tokio::spawn(corral_agent::run_agent_with(
            config,
            watchdog,
            shared,
            async move {
                let _ = rx.await;
            },
        ));
        Self {
            shutdown: Some(tx),
            task,
        }
    }

    async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        tokio::time::timeout(DEADLINE, &mut self.task)
            .await
            .expect("run_agent returns promptly after shutdown")
            .expect("agent task")
    }
}

impl Drop for RunningAgent {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn trace(n: u64) -> Option<pb::TraceContext> {
    Some(pb::TraceContext {
        traceparent: format!("00-{n:032x}-{n:016x}-01"),
        tracestate: "corral=test".into(),
    })
}

async fn send(session: &Session, request_id: u64, payload: ControlPayload) {
    session
        .outbound
        .send(Ok(pb::ControlMessage {
            request_id,
            trace: trace(request_id),
            payload: Some(payload),
        }))
        .await
        .expect("stream open");
}

/// Reads until a message matching `pick`, skipping the others.
async fn next_matching<T>(
    session: &mut Session,
    mut pick: impl FnMut(&pb::AgentMessage) -> Option<T>,
) -> T {
    let read = async {
        loop {
            let msg = session
                .inbound
                .message()
                .await
                .expect("stream ok")
                .expect("stream open");
            if let Some(found) = pick(&msg) {
                return found;
            }
        }
    };
    tokio::time::timeout(DEADLINE, read)
        .await
        .expect("the expected message arrives in time")
}

async fn reply(
    session: &mut Session,
    request_id: u64,
) -> (pb::reply::Result, Option<pb::TraceContext>) {
    next_matching(session, |m| match &m.payload {
        Some(AgentPayload::Reply(r)) if m.request_id == request_id => Some((
            r.result.clone().expect("reply has a result"),
            m.trace.clone(),
        )),
        _ => None,
    })
    .await
}

fn create(id: &str, image: &str) -> ControlPayload {
    ControlPayload::Create(pb::CreateSandbox {
        sandbox_id: id.into(),
        image: image.into(),
        command: vec!["sleep".into(), "600".into()],
        cpu_millis: 500,
        memory_mb: 64,
        ..Default::default()
    })
}

fn spec(id: &str) -> SandboxSpec {
    SandboxSpec {
        id: id.into(),
        image: "busybox".into(),
        command: vec!["sleep".into(), "600".into()],
        ..Default::default()
    }
}

#[tokio::test]
async fn registers_with_capacity_and_inventory_then_answers_commands_by_request_id() {
    let mut cp = Harness::start(60_000).await;
    let runtime = FakeRuntime::new(FakeConfig::default());
    runtime.create(&spec("sbx_existing")).await.expect("create");
    let agent = RunningAgent::start(&cp.url, TOKEN, 64, &runtime);
    let mut session = cp.next_session().await;

    let r = &session.register;
    assert_eq!(r.runtime, "fake");
    assert_eq!(r.hostname, "test-host");
    assert_eq!(r.agent_version, env!("CARGO_PKG_VERSION"));
    assert_eq!(r.max_concurrent_commands, 64);
    assert_eq!(r.images, vec!["busybox".to_string()]);
    let capacity = r.capacity.as_ref().expect("capacity");
    assert_eq!((capacity.cpu_millis, capacity.memory_mb), (4000, 8192));
    assert_eq!(r.inventory.len(), 1);
    assert_eq!(r.inventory[0].sandbox_id, "sbx_existing");
    assert_eq!(r.inventory[0].phase, pb::SandboxPhase::Running as i32);

    send(&session, 7, create("sbx_new", "busybox")).await;
    let (result, reply_trace) = reply(&mut session, 7).await;
    assert_eq!(
        reply_trace,
        trace(7),
        "the trace context is copied to the reply"
    );
    let pb::reply::Result::Sandbox(status) = result else {
        panic!("expected a sandbox status, got {result:?}");
    };
    assert_eq!(status.sandbox_id, "sbx_new");
    assert_eq!(status.phase, pb::SandboxPhase::Running as i32);

    send(
        &session,
        8,
        ControlPayload::Exec(pb::ExecRequest {
            sandbox_id: "sbx_new".into(),
            argv: vec!["echo".into(), "hello".into()],
            ..Default::default()
        }),
    )
    .await;
    let (result, _) = reply(&mut session, 8).await;
    assert!(
        matches!(result, pb::reply::Result::Exec(ref e) if e.stdout == b"hello\n" && e.exit_code == 0),
        "{result:?}"
    );

    // Errors are answers too, with their code.
    send(&session, 9, create("sbx_other", "no-such-image")).await;
    let (result, _) = reply(&mut session, 9).await;
    assert!(
        matches!(result, pb::reply::Result::Error(ref e) if e.code == pb::ErrorCode::ImageNotFound as i32),
        "{result:?}"
    );
    send(&session, 10, create("../etc", "busybox")).await;
    let (result, _) = reply(&mut session, 10).await;
    assert!(
        matches!(result, pb::reply::Result::Error(ref e) if e.code == pb::ErrorCode::InvalidArgument as i32),
        "{result:?}"
    );

    send(
        &session,
        11,
        ControlPayload::Inventory(pb::InventoryRequest {}),
    )
    .await;
    let (result, _) = reply(&mut session, 11).await;
    assert!(
        matches!(result, pb::reply::Result::Inventory(ref i) if i.sandboxes.len() == 2),
        "{result:?}"
    );

    send(
        &session,
        12,
        ControlPayload::Destroy(pb::DestroySandbox {
            sandbox_id: "sbx_new".into(),
        }),
    )
    .await;
    let (result, _) = reply(&mut session, 12).await;
    assert!(
        matches!(result, pb::reply::Result::Sandbox(ref s) if s.phase == pb::SandboxPhase::Absent as i32),
        "{result:?}"
    );
    assert_eq!(runtime.sandbox_ids(), vec!["sbx_existing".to_string()]);

    agent.stop().await.expect("clean shutdown");
    assert_eq!(
        runtime.phase("sbx_existing"),
        Some(Phase::Running),
        "shutdown leaves sandboxes running"
    );
}

#[tokio::test]
async fn commands_past_the_bound_are_answered_busy_at_once() {
    let mut cp = Harness::start(60_000).await;
    let runtime = FakeRuntime::new(FakeConfig::default());
    let _agent = RunningAgent::start(&cp.url, TOKEN, 1, &runtime);
    let mut session = cp.next_session().await;
    runtime.set_latency(Duration::from_secs(2));

    send(&session, 1, create("sbx_slow", "busybox")).await;
    send(&session, 2, create("sbx_fast", "busybox")).await;
    let first = next_matching(&mut session, |m| match &m.payload {
        Some(AgentPayload::Reply(r)) => Some((m.request_id, r.result.clone())),
        _ => None,
    })
    .await;
    assert_eq!(first.0, 2, "the command past the bound is answered first");
    assert!(
        matches!(first.1, Some(pb::reply::Result::Error(ref e)) if e.code == pb::ErrorCode::Busy as i32),
        "{first:?}"
    );
    let (result, _) = reply(&mut session, 1).await;
    assert!(
        matches!(result, pb::reply::Result::Sandbox(_)),
        "{result:?}"
    );
    assert_eq!(
        runtime.sandbox_ids(),
        vec!["sbx_slow".to_string()],
        "the busy command did nothing"
    );

    // With the permit back, commands run again.
    runtime.set_latency(Duration::ZERO);
    send(&session, 3, create("sbx_fast", "busybox")).await;
    let (result, _) = reply(&mut session, 3).await;
    assert!(
        matches!(result, pb::reply::Result::Sandbox(_)),
        "{result:?}"
    );
}

#[tokio::test]
async fn changes_on_its_own_are_events_and_commanded_ones_are_not() {
    let mut cp = Harness::start(60_000).await;
    let runtime = FakeRuntime::new(FakeConfig::default());
    let _agent = RunningAgent::start(&cp.url, TOKEN, 64, &runtime);
    let mut session = cp.next_session().await;
    for (i, id) in ["sbx_a", "sbx_b", "sbx_c", "sbx_d"].iter().enumerate() {
        send(&session, i as u64 + 1, create(id, "busybox")).await;
        reply(&mut session, i as u64 + 1).await;
    }

    // A commanded stop: its reply, and no event for it.
    send(
        &session,
        10,
        ControlPayload::Stop(pb::StopSandbox {
            sandbox_id: "sbx_a".into(),
            grace_period_ms: 0,
        }),
    )
    .await;
    let (result, _) = reply(&mut session, 10).await;
    assert!(
        matches!(result, pb::reply::Result::Sandbox(ref s) if s.phase == pb::SandboxPhase::Stopped as i32)
    );

    // An exit on its own, then a vanish: each an event with its reason.
    assert!(runtime.simulate_exit("sbx_b", 7));
    let event = next_matching(&mut session, |m| match &m.payload {
        Some(AgentPayload::Event(e)) => Some(e.clone()),
        _ => None,
    })
    .await;
    let status = event.status.expect("status");
    assert_eq!(
        status.sandbox_id, "sbx_b",
        "the first event is the exit, not the commanded stop"
    );
    assert_eq!(event.reason, "exited");
    assert_eq!(status.phase, pb::SandboxPhase::Stopped as i32);
    assert_eq!(status.exit_code, Some(7));

    assert!(runtime.simulate_vanish("sbx_c"));
    let event = next_matching(&mut session, |m| match &m.payload {
        Some(AgentPayload::Event(e)) => Some(e.clone()),
        _ => None,
    })
    .await;
    let status = event.status.expect("status");
    assert_eq!(status.sandbox_id, "sbx_c");
    assert_eq!(event.reason, "vanished");
    assert_eq!(status.phase, pb::SandboxPhase::Absent as i32);
    assert_eq!(status.image, "busybox");

    // A commanded destroy is not reported as vanished: the next event is
    // the exit that follows it.
    send(
        &session,
        11,
        ControlPayload::Destroy(pb::DestroySandbox {
            sandbox_id: "sbx_a".into(),
        }),
    )
    .await;
    reply(&mut session, 11).await;
    assert!(runtime.simulate_exit("sbx_d", 0));
    let event = next_matching(&mut session, |m| match &m.payload {
        Some(AgentPayload::Event(e)) => Some(e.clone()),
        _ => None,
    })
    .await;
    assert_eq!(event.status.expect("status").sandbox_id, "sbx_d");
}

#[tokio::test]
async fn heartbeats_count_running_sandboxes() {
    let mut cp = Harness::start(50).await;
    let runtime = FakeRuntime::new(FakeConfig::default());
    runtime.create(&spec("sbx_one")).await.expect("create");
    runtime.create(&spec("sbx_two")).await.expect("create");
    runtime.stop("sbx_two", Duration::ZERO).await.expect("stop");
    let _agent = RunningAgent::start(&cp.url, TOKEN, 64, &runtime);
    let mut session = cp.next_session().await;
    let beat = next_matching(&mut session, |m| match &m.payload {
        Some(AgentPayload::Heartbeat(h)) => Some(*h),
        _ => None,
    })
    .await;
    assert_eq!(beat.sandboxes_running, 1);
}

#[tokio::test]
async fn a_dropped_stream_is_redialed_and_sandboxes_keep_running() {
    let mut cp = Harness::start(60_000).await;
    let runtime = FakeRuntime::new(FakeConfig::default());
    let _agent = RunningAgent::start(&cp.url, TOKEN, 64, &runtime);
    let mut session = cp.next_session().await;
    send(&session, 1, create("sbx_keep", "busybox")).await;
    reply(&mut session, 1).await;

    // The control plane ends the stream (as on a restart).
    drop(session);
    let session = cp.next_session().await;
    assert_eq!(
        session.register.inventory.len(),
        1,
        "the new registration carries the inventory"
    );
    assert_eq!(session.register.inventory[0].sandbox_id, "sbx_keep");
    assert_eq!(
        session.register.inventory[0].phase,
        pb::SandboxPhase::Running as i32
    );
    assert_eq!(runtime.phase("sbx_keep"), Some(Phase::Running));

    // Commands work on the new stream.
    let mut session = session;
    send(
        &session,
        2,
        ControlPayload::Start(pb::StartSandbox {
            sandbox_id: "sbx_keep".into(),
        }),
    )
    .await;
    let (result, _) = reply(&mut session, 2).await;
    assert!(
        matches!(result, pb::reply::Result::Sandbox(ref s) if s.phase == pb::SandboxPhase::Running as i32)
    );
}

#[tokio::test]
async fn a_refused_token_is_retried_with_backoff_until_shutdown() {
    let mut cp = Harness::start(60_000).await;
    let runtime = FakeRuntime::new(FakeConfig::default());
    let agent = RunningAgent::start(&cp.url, "wrong-token", 64, &runtime);
    for attempt in 0..3 {
        tokio::time::timeout(DEADLINE, cp.refused.recv())
            .await
            .unwrap_or_else(|_| panic!("attempt {attempt} arrives within the backoff cap"))
            .expect("server alive");
    }
    assert!(
        cp.sessions.try_recv().is_err(),
        "a refused agent never gets a session"
    );
    agent
        .stop()
        .await
        .expect("shutdown while backing off returns Ok");
}

#[tokio::test]
async fn an_unusable_token_is_a_configuration_error() {
    let runtime: Arc<dyn Runtime> = Arc::new(FakeRuntime::new(FakeConfig::default()));
    for token in ["bad\ntoken", ""] {
        let config = AgentConfig {
            control_plane_url: "http://127.0.0.1:1".into(),
            token: token.into(),
            ..AgentConfig::default()
        };
        let result = tokio::time::timeout(
            DEADLINE,
            corral_agent::run_agent(config, runtime.clone(), std::future::pending()),
        )
        .await
        .expect("returns at once instead of retrying");
        assert!(result.is_err(), "{token:?}");
    }
}

fn unix_ms(t: SystemTime) -> i64 {
    i64::try_from(
        t.duration_since(UNIX_EPOCH)
            .expect("after the epoch")
            .as_millis(),
    )
    .expect("fits")
}

/// Polls `check` every 20 ms until it holds or the deadline passes.
async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Makes each marker exit in turn and reads events up to its "exited"
/// event; returns every event read. A barrier without sleeping: the poll
/// that reports the first marker has listed everything after the events
/// before it, and whatever else it reports is sent before the second
/// marker's event.
async fn events_through_exits(
    runtime: &FakeRuntime,
    session: &mut Session,
    markers: [&str; 2],
) -> Vec<pb::SandboxEvent> {
    let mut events = Vec::new();
    for marker in markers {
        assert!(runtime.simulate_exit(marker, 0), "{marker} exists");
        events.extend(events_until_exit_of(session, marker).await);
    }
    events
}

/// Reads events up to and including the "exited" event of `marker`.
async fn events_until_exit_of(session: &mut Session, marker: &str) -> Vec<pb::SandboxEvent> {
    let mut events = Vec::new();
    loop {
        let event = next_matching(session, |m| match &m.payload {
            Some(AgentPayload::Event(e)) => Some(e.clone()),
            _ => None,
        })
        .await;
        let done = event.reason == "exited"
            && event
                .status
                .as_ref()
                .is_some_and(|s| s.sandbox_id == marker);
        events.push(event);
        if done {
            return events;
        }
    }
}

fn is_about(event: &pb::SandboxEvent, id: &str) -> bool {
    event.status.as_ref().is_some_and(|s| s.sandbox_id == id)
}

#[tokio::test]
async fn the_watchdog_stops_an_expired_sandbox_with_no_control_plane_at_all() {
    let runtime = FakeRuntime::new(FakeConfig::default());
    let now = SystemTime::now();
    let mut expired = spec("sbx_expired");
    expired.expires_at = Some(now - Duration::from_secs(60));
    runtime.create(&expired).await.expect("create");
    let mut later = spec("sbx_later");
    later.expires_at = Some(now + Duration::from_secs(3600));
    runtime.create(&later).await.expect("create");
    runtime.create(&spec("sbx_forever")).await.expect("create");

    // Nothing listens on port 1: the agent only ever backs off and redials.
    let agent = RunningAgent::start_with(
        "http://127.0.0.1:1",
        TOKEN,
        64,
        &runtime,
        WatchdogConfig {
            ttl_margin: Duration::from_secs(1),
            stop_grace: Duration::ZERO,
        },
    );
    eventually("the watchdog stops the expired sandbox", || {
        runtime.phase("sbx_expired") == Some(Phase::Stopped)
    })
    .await;
    assert_eq!(
        runtime.sandbox_ids(),
        vec![
            "sbx_expired".to_string(),
            "sbx_forever".into(),
            "sbx_later".into()
        ],
        "the watchdog stops, it never destroys"
    );
    assert_eq!(runtime.phase("sbx_later"), Some(Phase::Running));
    assert_eq!(runtime.phase("sbx_forever"), Some(Phase::Running));
    agent.stop().await.expect("clean shutdown");

    // Nothing was queued: the next registration's inventory carries the
    // outcome (stopped, with its deadline) and no "ttl" event follows.
    let mut cp = Harness::start(60_000).await;
    let _agent = RunningAgent::start(&cp.url, TOKEN, 64, &runtime);
    let mut session = cp.next_session().await;
    let reported = session
        .register
        .inventory
        .iter()
        .find(|s| s.sandbox_id == "sbx_expired")
        .cloned()
        .expect("in the inventory");
    assert_eq!(reported.phase, pb::SandboxPhase::Stopped as i32);
    assert_eq!(
        reported.expires_at_unix_ms,
        unix_ms(expired.expires_at.expect("set"))
    );
    let events = events_through_exits(&runtime, &mut session, ["sbx_forever", "sbx_later"]).await;
    assert!(
        !events.iter().any(|e| is_about(e, "sbx_expired")),
        "no event for a stop made while disconnected: {events:?}"
    );
}

#[tokio::test]
async fn a_watchdog_stop_is_reported_once_as_ttl_and_never_as_exited() {
    let mut cp = Harness::start(60_000).await;
    let runtime = FakeRuntime::new(FakeConfig::default());
    let _agent = RunningAgent::start_with(
        &cp.url,
        TOKEN,
        64,
        &runtime,
        WatchdogConfig {
            ttl_margin: Duration::ZERO,
            stop_grace: Duration::ZERO,
        },
    );
    let mut session = cp.next_session().await;

    for (i, id) in ["sbx_marker_1", "sbx_marker_2"].iter().enumerate() {
        send(&session, 10 + i as u64, create(id, "busybox")).await;
        reply(&mut session, 10 + i as u64).await;
    }
    // Due shortly after it is created, so the create reply sees it running.
    let expires_at_unix_ms = unix_ms(SystemTime::now() + Duration::from_millis(300));
    send(
        &session,
        2,
        ControlPayload::Create(pb::CreateSandbox {
            sandbox_id: "sbx_ttl".into(),
            image: "busybox".into(),
            command: vec!["sleep".into(), "600".into()],
            expires_at_unix_ms,
            ..Default::default()
        }),
    )
    .await;
    let (result, _) = reply(&mut session, 2).await;
    let pb::reply::Result::Sandbox(created) = result else {
        panic!("expected a sandbox status, got {result:?}");
    };
    assert_eq!(created.phase, pb::SandboxPhase::Running as i32);
    assert_eq!(
        created.expires_at_unix_ms, expires_at_unix_ms,
        "the deadline comes back in the status"
    );

    let event = next_matching(&mut session, |m| match &m.payload {
        Some(AgentPayload::Event(e)) => Some(e.clone()),
        _ => None,
    })
    .await;
    assert_eq!(event.reason, "ttl", "{event:?}");
    let status = event.status.clone().expect("status");
    assert_eq!(status.sandbox_id, "sbx_ttl");
    assert_eq!(status.phase, pb::SandboxPhase::Stopped as i32);
    assert_eq!(status.expires_at_unix_ms, expires_at_unix_ms);
    assert_eq!(runtime.phase("sbx_ttl"), Some(Phase::Stopped));

    // Polls after the stop say nothing more about sbx_ttl.
    let events =
        events_through_exits(&runtime, &mut session, ["sbx_marker_1", "sbx_marker_2"]).await;
    assert!(
        !events.iter().any(|e| is_about(e, "sbx_ttl")),
        "the watchdog stop is one ttl event, not also an exit: {events:?}"
    );

    // An inventory shows it stopped, with its deadline, still there.
    send(
        &session,
        3,
        ControlPayload::Inventory(pb::InventoryRequest {}),
    )
    .await;
    let (result, _) = reply(&mut session, 3).await;
    let pb::reply::Result::Inventory(inventory) = result else {
        panic!("expected an inventory, got {result:?}");
    };
    let listed = inventory
        .sandboxes
        .iter()
        .find(|s| s.sandbox_id == "sbx_ttl")
        .expect("stopped, not destroyed");
    assert_eq!(listed.phase, pb::SandboxPhase::Stopped as i32);
    assert_eq!(listed.expires_at_unix_ms, expires_at_unix_ms);
}

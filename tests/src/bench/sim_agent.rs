//! A simulated agent: one real gRPC stream to the control plane, the real
//! protocol (register with an inventory, heartbeats at the interval the
//! control plane asks for, replies to every command), and an in-memory
//! table instead of a runtime. It is much lighter than an agent on the fake
//! runtime (no poll loop, no command semaphore), so thousands of them fit in
//! one benchmark process next to a control plane in another.
//!
//! It redials after a short fixed pause when its stream ends, so a restarted
//! control plane sees it back quickly, and it can be told to go silent
//! (keep the stream, stop heartbeating) or be killed (the stream is cut).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, Context};
use corral_proto::pb;
use corral_proto::pb::agent_message::Payload as AgentPayload;
use corral_proto::pb::control_message::Payload as ControlPayload;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;

/// How a simulated agent is set up.
#[derive(Debug, Clone)]
pub struct SimConfig {
    pub url: String,
    pub token: String,
    pub cpu_millis: u32,
    pub memory_mb: u64,
    /// Pause before redialing after the stream ends.
    pub reconnect_delay: Duration,
}

#[derive(Default)]
struct Shared {
    /// Sandbox id -> phase (`pb::SandboxPhase` as i32).
    sandboxes: Mutex<HashMap<String, i32>>,
    registrations: AtomicU64,
    silent: AtomicBool,
}

/// A running simulated agent; dropping it cuts its stream.
pub struct SimAgent {
    pub host_id: String,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl SimAgent {
    /// Starts dialing; `running` are sandboxes it already holds (reported in
    /// its registration inventory as running).
    pub fn start(host_id: &str, config: SimConfig, running: Vec<String>) -> Self {
        let shared = Arc::new(Shared::default());
        {
            let mut table = lock(&shared.sandboxes);
            for id in running {
                table.insert(id, pb::SandboxPhase::Running as i32);
            }
        }
        let task = tokio::spawn(dial_forever(config, shared.clone()));
        Self {
            host_id: host_id.to_string(),
            shared,
            task,
        }
    }

    /// How many times it has registered (received a RegisterAck).
    pub fn registrations(&self) -> u64 {
        self.shared.registrations.load(Ordering::Relaxed)
    }

    /// Keeps the stream open but stops heartbeating.
    pub fn silence(&self) {
        self.shared.silent.store(true, Ordering::Relaxed);
    }

    /// Cuts the stream at once, as a dead process would.
    pub fn kill(&self) {
        self.task.abort();
    }

    /// How many sandboxes it holds.
    pub fn sandboxes(&self) -> usize {
        lock(&self.shared.sandboxes).len()
    }
}

impl Drop for SimAgent {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

async fn dial_forever(config: SimConfig, shared: Arc<Shared>) {
    loop {
        if let Err(err) = session(&config, &shared).await {
            tracing::debug!(error = %format!("{err:#}"), "simulated agent session ended");
        }
        let jitter = Duration::from_millis(fastrand_ms(config.reconnect_delay));
        tokio::time::sleep(config.reconnect_delay + jitter).await;
    }
}

/// Up to half of `base`, pseudo-random, so thousands of agents do not
/// redial in lock step.
fn fastrand_ms(base: Duration) -> u64 {
    let half = (base.as_millis() / 2).max(1) as u64;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::from(d.subsec_nanos()));
    nanos % half
}

fn envelope(request_id: u64, payload: AgentPayload) -> pb::AgentMessage {
    pb::AgentMessage {
        request_id,
        trace: None,
        payload: Some(payload),
    }
}

fn status(id: &str, phase: i32) -> pb::SandboxStatus {
    pb::SandboxStatus {
        sandbox_id: id.to_string(),
        phase,
        exit_code: (phase == pb::SandboxPhase::Stopped as i32).then_some(0),
        image: "busybox".into(),
        expires_at_unix_ms: 0,
    }
}

async fn session(config: &SimConfig, shared: &Shared) -> anyhow::Result<()> {
    let channel = tonic::transport::Endpoint::from_shared(config.url.clone())?
        .connect_timeout(Duration::from_secs(20))
        .tcp_nodelay(true)
        .connect()
        .await
        .context("dialing")?;
    let mut client = pb::agent_service_client::AgentServiceClient::new(channel);
    let (tx, rx) = mpsc::channel::<pb::AgentMessage>(1024);
    let inventory: Vec<pb::SandboxStatus> = lock(&shared.sandboxes)
        .iter()
        .map(|(id, phase)| status(id, *phase))
        .collect();
    let register = pb::Register {
        agent_version: "sim".into(),
        hostname: "sim-host".into(),
        runtime: "fake".into(),
        isolated: false,
        capacity: Some(pb::Capacity {
            cpu_millis: config.cpu_millis,
            memory_mb: config.memory_mb,
        }),
        images: vec!["busybox".into()],
        inventory,
        max_concurrent_commands: 1024,
        labels: Default::default(),
    };
    tx.send(envelope(0, AgentPayload::Register(register)))
        .await
        .map_err(|_| anyhow!("outbound closed"))?;
    let mut request = tonic::Request::new(ReceiverStream::new(rx));
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {}", config.token).parse()?);
    let mut inbound = client.connect(request).await?.into_inner();
    let first = inbound
        .message()
        .await?
        .ok_or_else(|| anyhow!("stream ended before the ack"))?;
    let interval = match first.payload {
        Some(ControlPayload::RegisterAck(ack)) => {
            Duration::from_millis(u64::from(ack.heartbeat_interval_ms.max(100)))
        }
        other => return Err(anyhow!("expected a RegisterAck, got {other:?}")),
    };
    shared.registrations.fetch_add(1, Ordering::Relaxed);
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {
                if !shared.silent.load(Ordering::Relaxed) {
                    let running = lock(&shared.sandboxes).len();
                    let heartbeat = pb::Heartbeat {
                        sandboxes_running: u32::try_from(running).unwrap_or(u32::MAX),
                        usage: None,
                    };
                    let _ = tx.try_send(envelope(0, AgentPayload::Heartbeat(heartbeat)));
                }
            }
            message = inbound.message() => {
                let Some(message) = message? else { return Ok(()) };
                if let Some(reply) = answer(shared, message) {
                    tx.send(reply).await.map_err(|_| anyhow!("outbound closed"))?;
                }
            }
        }
    }
}

fn answer(shared: &Shared, message: pb::ControlMessage) -> Option<pb::AgentMessage> {
    use pb::reply::Result as R;
    let running = pb::SandboxPhase::Running as i32;
    let result = match message.payload? {
        ControlPayload::RegisterAck(_) => return None,
        ControlPayload::Create(c) => {
            lock(&shared.sandboxes).insert(c.sandbox_id.clone(), running);
            R::Sandbox(status(&c.sandbox_id, running))
        }
        ControlPayload::Start(s) => {
            lock(&shared.sandboxes).insert(s.sandbox_id.clone(), running);
            R::Sandbox(status(&s.sandbox_id, running))
        }
        ControlPayload::Stop(s) => {
            let stopped = pb::SandboxPhase::Stopped as i32;
            lock(&shared.sandboxes).insert(s.sandbox_id.clone(), stopped);
            R::Sandbox(status(&s.sandbox_id, stopped))
        }
        ControlPayload::Destroy(d) => {
            lock(&shared.sandboxes).remove(&d.sandbox_id);
            R::Sandbox(status(&d.sandbox_id, pb::SandboxPhase::Absent as i32))
        }
        ControlPayload::Inventory(_) => R::Inventory(pb::Inventory {
            sandboxes: lock(&shared.sandboxes)
                .iter()
                .map(|(id, phase)| status(id, *phase))
                .collect(),
        }),
        ControlPayload::Exec(_) => R::Error(pb::Error {
            code: pb::ErrorCode::Unsupported as i32,
            message: "the simulated agent does not exec".into(),
        }),
    };
    Some(envelope(
        message.request_id,
        AgentPayload::Reply(pb::Reply {
            result: Some(result),
        }),
    ))
}

//! The ConnectionActor owns one agent's gRPC stream: it is the only writer to
//! it (LESSONS 1), keeps the table of requests waiting for a reply, routes
//! every reply to its caller by request id, errors included (LESSONS 3), fails
//! each request whose deadline passes and, the moment the stream ends, every
//! request still pending (LESSONS 2). Heartbeats and agent events go to the
//! HostActor.
//!
//! Each connection has a generation number; the HostActor ignores the
//! disconnect of a connection it has already replaced (LESSONS 5).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use corral_proto::pb;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tokio::sync::mpsc;

use super::host::HostMsg;
use crate::error::CorralError;
use crate::mailbox::{self, Tell};

/// The answer to a command: the agent's reply, or why there is none.
pub type HostReply = Result<pb::reply::Result, CorralError>;

/// Added to a sweep's due time so that the deadline it checks has passed
/// when it runs (timers may fire a little early on a coarse clock).
const SWEEP_SLACK: Duration = Duration::from_millis(1);

pub enum ConnMsg {
    /// Send a command and answer `reply` with the agent's reply.
    Request {
        payload: pb::control_message::Payload,
        timeout: Duration,
        reply: RpcReplyPort<HostReply>,
        /// W3C context to send in the envelope.
        trace: Option<pb::TraceContext>,
    },
    /// A message the agent sent on the stream.
    Inbound(pb::AgentMessage),
    /// The inbound half of the stream ended (EOF or error).
    StreamEnded(String),
    /// Expire overdue requests; check heartbeats. Scheduled for the next
    /// moment one of them can be due, not on a fixed tick: an idle
    /// connection is swept about once per three heartbeat intervals rather
    /// than ten times a second, which is most of what a large fleet costs.
    /// `due` identifies the timer: only the latest one schedules the next.
    Sweep { due: Instant },
    /// Fault injection for the supervision tests: panic in the handler.
    #[doc(hidden)]
    InjectPanic,
}

pub struct ConnectionArgs {
    pub host_id: String,
    pub generation: u64,
    pub outbound: mpsc::Sender<pb::ControlMessage>,
    pub host: ActorRef<HostMsg>,
    pub heartbeat_interval: Duration,
    pub metrics: crate::metrics::Metrics,
}

struct Pending {
    reply: RpcReplyPort<HostReply>,
    deadline: Instant,
    timeout: Duration,
}

pub struct ConnectionState {
    /// Counts this actor's mailbox while the actor lives (see `mailbox`).
    _mailbox: mailbox::Open,
    host_id: String,
    generation: u64,
    outbound: mpsc::Sender<pb::ControlMessage>,
    host: ActorRef<HostMsg>,
    heartbeat_interval: Duration,
    next_request_id: u64,
    pending: HashMap<u64, Pending>,
    last_heard: Instant,
    /// When the earliest sweep already scheduled will run.
    next_sweep: Option<Instant>,
    metrics: crate::metrics::Metrics,
    /// The pending requests counted in the `pending_requests` gauge.
    counted_pending: i64,
}

impl ConnectionState {
    /// Brings the process-wide gauge of pending requests up to date with
    /// this connection's table.
    fn count_pending(&mut self) {
        let now = i64::try_from(self.pending.len()).unwrap_or(i64::MAX);
        let delta = now - self.counted_pending;
        if delta != 0 {
            self.metrics
                .timings
                .pending_requests
                .fetch_add(delta, std::sync::atomic::Ordering::Relaxed);
            self.counted_pending = now;
        }
    }

    /// The next moment something can be due: the earliest request deadline
    /// or the end of heartbeat liveness.
    fn next_due(&self) -> Instant {
        let liveness = self.last_heard + self.heartbeat_interval * 3;
        self.pending
            .values()
            .map(|p| p.deadline)
            .min()
            .map_or(liveness, |d| d.min(liveness))
    }

    /// Makes sure a sweep runs by `due`.
    fn sweep_by(&mut self, myself: &ActorRef<ConnMsg>, due: Instant) {
        if self.next_sweep.is_some_and(|at| at <= due) {
            return;
        }
        self.next_sweep = Some(due);
        let delay = due.saturating_duration_since(Instant::now()) + SWEEP_SLACK;
        myself.tell_after(delay, move || ConnMsg::Sweep { due });
    }
}

pub struct ConnectionActor;

impl Actor for ConnectionActor {
    type Msg = ConnMsg;
    type State = ConnectionState;
    type Arguments = ConnectionArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: ConnectionArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let mailbox = mailbox::open(myself.get_id(), "connection");
        let ack = pb::ControlMessage {
            request_id: 0,
            trace: None,
            payload: Some(pb::control_message::Payload::RegisterAck(pb::RegisterAck {
                host_id: args.host_id.clone(),
                heartbeat_interval_ms: u32::try_from(args.heartbeat_interval.as_millis())
                    .unwrap_or(u32::MAX),
            })),
        };
        args.outbound
            .try_send(ack)
            .map_err(|e| format!("stream closed before the register ack: {e}"))?;
        let mut state = ConnectionState {
            _mailbox: mailbox,
            host_id: args.host_id,
            generation: args.generation,
            outbound: args.outbound,
            host: args.host,
            heartbeat_interval: args.heartbeat_interval,
            next_request_id: 1,
            pending: HashMap::new(),
            last_heard: Instant::now(),
            next_sweep: None,
            metrics: args.metrics,
            counted_pending: 0,
        };
        let due = state.next_due();
        state.sweep_by(&myself, due);
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
            ConnMsg::Request {
                payload,
                timeout,
                reply,
                trace,
            } => {
                let request_id = state.next_request_id;
                state.next_request_id += 1;
                let envelope = pb::ControlMessage {
                    request_id,
                    trace,
                    payload: Some(payload),
                };
                match state.outbound.try_send(envelope) {
                    Ok(()) => {
                        let deadline = Instant::now() + timeout;
                        state.pending.insert(
                            request_id,
                            Pending {
                                reply,
                                deadline,
                                timeout,
                            },
                        );
                        state.sweep_by(&myself, deadline);
                    }
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        let _ = reply.send(Err(CorralError::HostBusy));
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => {
                        let _ = reply.send(Err(CorralError::HostDisconnected));
                        myself.stop(Some("outbound stream closed".into()));
                    }
                }
            }
            ConnMsg::Inbound(message) => {
                state.last_heard = Instant::now();
                self.route_inbound(message, state);
            }
            ConnMsg::InjectPanic => panic!("injected fault in connection {}", state.host_id),
            ConnMsg::StreamEnded(reason) => {
                tracing::info!(host.id = %state.host_id, generation = state.generation, %reason, "agent stream ended");
                myself.stop(Some(reason));
            }
            ConnMsg::Sweep { due } => {
                let now = Instant::now();
                if state.next_sweep == Some(due) {
                    state.next_sweep = None;
                }
                let overdue: Vec<u64> = state
                    .pending
                    .iter()
                    .filter(|(_, p)| p.deadline <= now)
                    .map(|(id, _)| *id)
                    .collect();
                for id in overdue {
                    if let Some(p) = state.pending.remove(&id) {
                        let ms = u64::try_from(p.timeout.as_millis()).unwrap_or(u64::MAX);
                        let _ = p.reply.send(Err(CorralError::HostTimeout(ms)));
                    }
                }
                if now.duration_since(state.last_heard) >= state.heartbeat_interval * 3 {
                    tracing::warn!(host.id = %state.host_id, "no heartbeat for three intervals; dropping the connection");
                    myself.stop(Some("heartbeat timeout".into()));
                } else {
                    let due = state.next_due();
                    state.sweep_by(&myself, due);
                }
            }
        }
        state.count_pending();
        Ok(())
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        for (_, pending) in state.pending.drain() {
            let _ = pending.reply.send(Err(CorralError::HostDisconnected));
        }
        state.count_pending();
        let _ = state.host.tell(HostMsg::Disconnected {
            generation: state.generation,
        });
        Ok(())
    }
}

impl ConnectionActor {
    fn route_inbound(&self, message: pb::AgentMessage, state: &mut ConnectionState) {
        use pb::agent_message::Payload;
        match message.payload {
            Some(Payload::Reply(reply)) => match state.pending.remove(&message.request_id) {
                Some(pending) => {
                    let result = match reply.result {
                        Some(pb::reply::Result::Error(error)) => Err(CorralError::from_host(error)),
                        Some(other) => Ok(other),
                        None => Err(CorralError::Host {
                            code: crate::error::HostErrorCode::Runtime,
                            message: "the agent sent an empty reply".into(),
                        }),
                    };
                    let _ = pending.reply.send(result);
                }
                None => {
                    tracing::debug!(host.id = %state.host_id, request_id = message.request_id, "reply to no pending request (late or unknown)");
                }
            },
            Some(Payload::Heartbeat(heartbeat)) => {
                let _ = state.host.tell(HostMsg::Heartbeat(heartbeat));
            }
            Some(Payload::Event(event)) => {
                let _ = state.host.tell(HostMsg::AgentEvent(event));
            }
            Some(Payload::Register(_)) => {
                tracing::warn!(host.id = %state.host_id, "ignoring a second register on one stream");
            }
            None => {}
        }
    }
}

//! The agent-facing gRPC service (`AgentService.Connect`). It authenticates
//! the stream by its host token (the host id comes from the token, never from
//! the agent: LESSONS 6), waits for `Register`, hands the outbound half of the
//! stream to a new ConnectionActor (its only writer) and then forwards every
//! inbound message to that actor until the stream ends.
//!
//! It also keeps the table of live streams by the token that opened them
//! ([`LiveConnections`]): revoking a token ends its streams at once, and a
//! stream ends by itself when its token expires.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use corral_actors::actors::connection::ConnMsg;
use corral_actors::mailbox::Tell;
use corral_actors::store::HostRegistration;
use corral_actors::{ControlPlane, CorralError};
use corral_proto::pb;
use futures::{Stream, StreamExt};
use ractor::ActorRef;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

/// How long an agent has to send `Register` after opening the stream.
const REGISTER_DEADLINE: Duration = Duration::from_secs(10);
/// Commands queued for one agent before the connection answers "busy".
const OUTBOUND_QUEUE: usize = 1024;

/// The agent streams open now, by the id of the host token that opened
/// them.
#[derive(Clone, Default)]
pub struct LiveConnections(Arc<Mutex<HashMap<String, Vec<ActorRef<ConnMsg>>>>>);

impl LiveConnections {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<ActorRef<ConnMsg>>>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// How many streams are open.
    pub fn count(&self) -> usize {
        self.lock().values().map(Vec::len).sum()
    }

    fn add(&self, token_id: &str, connection: ActorRef<ConnMsg>) {
        self.lock()
            .entry(token_id.to_string())
            .or_default()
            .push(connection);
    }

    fn remove(&self, token_id: &str, connection: &ActorRef<ConnMsg>) {
        let mut live = self.lock();
        if let Some(list) = live.get_mut(token_id) {
            list.retain(|c| c.get_id() != connection.get_id());
            if list.is_empty() {
                live.remove(token_id);
            }
        }
    }

    /// Ends every stream opened with `token_id` (e.g. it was revoked): the
    /// ConnectionActor stops, its pending requests fail, the host is
    /// disconnected, and the agent's redial meets the revoked token.
    /// Returns how many streams were ended.
    pub fn end_streams_of(&self, token_id: &str, reason: &str) -> usize {
        let ended = self.lock().remove(token_id).unwrap_or_default();
        for connection in &ended {
            let _ = connection.tell(ConnMsg::StreamEnded(reason.to_string()));
        }
        ended.len()
    }
}

pub struct AgentGateway {
    control_plane: ControlPlane,
    live: LiveConnections,
}

impl AgentGateway {
    pub fn new(control_plane: ControlPlane, live: LiveConnections) -> Self {
        Self {
            control_plane,
            live,
        }
    }

    pub fn into_service(self) -> pb::agent_service_server::AgentServiceServer<Self> {
        pb::agent_service_server::AgentServiceServer::new(self)
    }
}

fn status_of(err: CorralError) -> Status {
    match err {
        CorralError::Database(detail) => {
            tracing::error!(error = %detail, "database error during agent registration");
            Status::unavailable("the control plane's database is unavailable")
        }
        CorralError::Internal(detail) => {
            tracing::error!(error = %detail, "internal error during agent registration");
            Status::internal("internal error")
        }
        other => Status::unavailable(other.to_string()),
    }
}

#[tonic::async_trait]
impl pb::agent_service_server::AgentService for AgentGateway {
    type ConnectStream = Pin<Box<dyn Stream<Item = Result<pb::ControlMessage, Status>> + Send>>;

    async fn connect(
        &self,
        request: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        let token = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .ok_or_else(|| Status::unauthenticated("a host token is required"))?
            .to_string();
        let host_token = self
            .control_plane
            .store()
            .authenticate_host_token(&token)
            .await
            .map_err(status_of)?
            .ok_or_else(|| Status::unauthenticated("unknown or revoked host token"))?;
        let host_id = host_token.host_id;
        let pool = host_token.org_id;
        let token_id = host_token.id;
        let expires_at = host_token.expires_at;

        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(REGISTER_DEADLINE, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no register message in time"))??;
        let register = match first.and_then(|m| m.payload) {
            Some(pb::agent_message::Payload::Register(register)) => register,
            _ => {
                return Err(Status::invalid_argument(
                    "the first message must be register",
                ))
            }
        };
        let capacity = register.capacity.unwrap_or_default();
        let labels: std::collections::BTreeMap<String, String> =
            register.labels.into_iter().collect();
        corral_actors::domain::validate_labels(&labels)
            .map_err(|e| Status::invalid_argument(format!("host labels: {e}")))?;
        let registration = HostRegistration {
            hostname: truncate(register.hostname, 255),
            runtime: truncate(register.runtime, 16),
            isolated: register.isolated,
            cpu_millis: u64::from(capacity.cpu_millis),
            memory_mb: capacity.memory_mb,
            images: register
                .images
                .into_iter()
                .take(1000)
                .map(|i| truncate(i, 64))
                .collect(),
            agent_version: truncate(register.agent_version, 64),
            labels,
            org_id: pool,
        };

        let (outbound, outbound_rx) = mpsc::channel(OUTBOUND_QUEUE);
        let connection = self
            .control_plane
            .host_connected(&host_id, registration, register.inventory, outbound)
            .await
            .map_err(status_of)?;

        self.live.add(&token_id, connection.clone());
        // The token was checked when the stream opened; the stream does not
        // outlive it.
        let expiry = expires_at.map(|expires_at| {
            let left = (expires_at - chrono::Utc::now())
                .to_std()
                .unwrap_or(Duration::ZERO);
            let connection = connection.clone();
            tokio::spawn(async move {
                tokio::time::sleep(left).await;
                let _ = connection.tell(ConnMsg::StreamEnded("host token expired".into()));
            })
        });
        let live = self.live.clone();
        tokio::spawn(async move {
            forward_inbound(host_id, inbound, connection.clone()).await;
            live.remove(&token_id, &connection);
            if let Some(expiry) = expiry {
                expiry.abort();
            }
        });
        let stream = ReceiverStream::new(outbound_rx).map(Ok);
        Ok(Response::new(Box::pin(stream)))
    }
}

/// Feeds the agent's messages to its ConnectionActor until either side ends.
async fn forward_inbound(
    host_id: String,
    mut inbound: Streaming<pb::AgentMessage>,
    connection: ractor::ActorRef<ConnMsg>,
) {
    let reason = loop {
        match inbound.message().await {
            Ok(Some(message)) => {
                if connection.tell(ConnMsg::Inbound(message)).is_err() {
                    break "connection actor stopped".to_string();
                }
            }
            Ok(None) => break "agent closed the stream".to_string(),
            Err(status) => break format!("stream error: {}", status.message()),
        }
    };
    tracing::debug!(host.id = %host_id, %reason, "inbound stream finished");
    let _ = connection.tell(ConnMsg::StreamEnded(reason));
}

fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

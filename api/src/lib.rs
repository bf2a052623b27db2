//! The Corral control plane's edges: the REST API (axum), the agent gRPC
//! service (tonic), authentication, server start-up and the `corral` CLI.

pub mod audit;
pub mod auth;
pub mod billing;
pub mod client;
pub mod dev;
pub mod error;
pub mod events;
pub mod grpc;
pub mod limits;
pub mod observe;
pub mod rest;
pub mod server;
pub mod tls;

use std::sync::Arc;

use corral_actors::ControlPlane;

/// What every REST handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub control_plane: ControlPlane,
    /// SHA-256 of the platform admin token, if one is configured.
    pub admin_token_hash: Option<String>,
    /// API keys verified recently (see [`auth::ApiKeyCache`]).
    pub api_keys: std::sync::Arc<auth::ApiKeyCache>,
    /// Rate limits, exec caps, body limit and request timeout.
    pub limits: Arc<limits::Limits>,
    /// Live agent streams by host token, to end them on revocation.
    pub agent_streams: grpc::LiveConnections,
    /// REST latencies for `/metrics`.
    pub http_metrics: Arc<observe::HttpMetrics>,
    /// Whether sandboxes may use the host's network (`--allow-host-network`).
    pub allow_host_network: bool,
}

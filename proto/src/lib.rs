//! The agent <-> control plane protocol (`corral.agent.v1`), generated from
//! `proto/corral/agent/v1/agent.proto`. See `docs/protocol.md`.

#[allow(clippy::all, missing_docs)]
pub mod agent {
    pub mod v1 {
        tonic::include_proto!("corral.agent.v1");
    }
}

pub use agent::v1 as pb;

/// The protocol version this build speaks; sent by the agent as part of its
/// user agent and checked by nothing yet.
pub const PROTOCOL_VERSION: &str = "corral.agent.v1";

//! The core of the Corral control plane: domain types, the actor tree and
//! persistence. It knows nothing about HTTP; `corral-api` drives it through
//! [`ControlPlane`].

pub mod actors;
pub mod billing;
pub mod control_plane;
pub mod domain;
pub mod error;
pub mod events;
pub mod mailbox;
pub mod metrics;
pub mod placement;
pub mod secrets;
pub mod store;
pub mod tree;

pub use control_plane::{ControlPlane, ControlPlaneConfig, HostView};
pub use error::{CorralError, Result};

//! The one error type of the control plane's core. Every variant maps to a
//! stable error code at the REST edge (`corral-api`); the messages here are
//! written for people and never carry database or host internals.

use corral_proto::pb;

/// What went wrong, in domain terms.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CorralError {
    #[error("{0} not found")]
    NotFound(&'static str),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    InvalidState(String),
    #[error("{0}")]
    Conflict(String),
    /// The org lacks the credit (or is suspended) for this.
    #[error("{0}")]
    PaymentRequired(String),
    #[error("{0}")]
    QuotaExceeded(String),
    #[error(
        "no host has room for {requested_cpu_millis} mCPU and {requested_memory_mb} MiB \
         (largest free slot: {largest_free_cpu_millis} mCPU, {largest_free_memory_mb} MiB)"
    )]
    NoCapacity {
        requested_cpu_millis: u32,
        requested_memory_mb: u64,
        largest_free_cpu_millis: u64,
        largest_free_memory_mb: u64,
    },
    #[error("the host of this sandbox is not connected")]
    HostUnavailable,
    #[error("the host is busy; try again")]
    HostBusy,
    #[error("the host did not answer within {0} ms")]
    HostTimeout(u64),
    #[error("the host's connection ended before it answered")]
    HostDisconnected,
    #[error("{message}")]
    Host {
        code: HostErrorCode,
        message: String,
    },
    #[error("the database is unavailable")]
    Database(String),
    #[error("internal error")]
    Internal(String),
}

/// The error codes an agent can answer with (mirrors `pb::ErrorCode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostErrorCode {
    SandboxNotFound,
    ImageNotFound,
    InvalidArgument,
    InvalidState,
    Runtime,
    Unsupported,
}

impl HostErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::SandboxNotFound => "sandbox_not_found_on_host",
            Self::ImageNotFound => "image_not_found",
            Self::InvalidArgument => "invalid_argument",
            Self::InvalidState => "invalid_state",
            Self::Runtime => "runtime_error",
            Self::Unsupported => "unsupported",
        }
    }
}

impl CorralError {
    /// Maps an agent's error reply onto a domain error.
    pub fn from_host(error: pb::Error) -> Self {
        let code = match pb::ErrorCode::try_from(error.code) {
            Ok(pb::ErrorCode::Busy) => return Self::HostBusy,
            Ok(pb::ErrorCode::SandboxNotFound) => HostErrorCode::SandboxNotFound,
            Ok(pb::ErrorCode::ImageNotFound) => HostErrorCode::ImageNotFound,
            Ok(pb::ErrorCode::InvalidArgument) => HostErrorCode::InvalidArgument,
            Ok(pb::ErrorCode::InvalidState) => HostErrorCode::InvalidState,
            Ok(pb::ErrorCode::Unsupported) => HostErrorCode::Unsupported,
            Ok(pb::ErrorCode::Runtime) | Ok(pb::ErrorCode::Unspecified) | Err(_) => {
                HostErrorCode::Runtime
            }
        };
        let mut message = error.message;
        message.truncate(512);
        Self::Host { code, message }
    }

    /// Whether the failure says something about the host rather than the
    /// request (used to decide between retrying and failing the sandbox).
    pub fn is_host_fault(&self) -> bool {
        matches!(
            self,
            Self::HostUnavailable | Self::HostBusy | Self::HostTimeout(_) | Self::HostDisconnected
        )
    }
}

impl From<sea_orm::DbErr> for CorralError {
    fn from(err: sea_orm::DbErr) -> Self {
        Self::Database(err.to_string())
    }
}

impl From<ractor::RactorErr<()>> for CorralError {
    fn from(err: ractor::RactorErr<()>) -> Self {
        Self::Internal(err.to_string())
    }
}

pub type Result<T, E = CorralError> = std::result::Result<T, E>;

//! The REST edge's error type: every failure becomes an HTTP status, a stable
//! machine-readable code and a message for people, as
//! `{"error": {"code": "...", "message": "..."}}`. Internal details (database
//! messages, host internals) are logged here and never sent to clients.
//! The edge layer ([`crate::audit`]) adds the request's id to every error
//! body as `error.request_id`.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use corral_actors::error::HostErrorCode;
use corral_actors::CorralError;
use serde::Serialize;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// Sent as `Retry-After` (seconds), e.g. when rate-limited.
    pub retry_after_secs: Option<u64>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct ErrorDetail {
    /// Stable, machine-readable code, e.g. `not_found`, `no_capacity`.
    pub code: String,
    /// What went wrong, for a person.
    pub message: String,
    /// The request's id (also in the `x-request-id` header), for support.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            retry_after_secs: None,
        }
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_argument", message)
    }

    pub fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "unauthenticated",
            "a valid bearer token is required",
        )
    }

    pub fn not_found(what: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("{what} not found"),
        )
    }
}

impl From<CorralError> for ApiError {
    fn from(err: CorralError) -> Self {
        use StatusCode as S;
        match &err {
            CorralError::NotFound(what) => Self::not_found(what),
            CorralError::InvalidArgument(m) => Self::new(S::BAD_REQUEST, "invalid_argument", m),
            CorralError::InvalidState(m) => Self::new(S::CONFLICT, "invalid_state", m),
            CorralError::Conflict(m) => Self::new(S::CONFLICT, "conflict", m),
            CorralError::PaymentRequired(m) => {
                Self::new(S::PAYMENT_REQUIRED, "payment_required", m)
            }
            CorralError::QuotaExceeded(m) => Self::new(S::FORBIDDEN, "quota_exceeded", m),
            CorralError::NoCapacity { .. } => {
                Self::new(S::SERVICE_UNAVAILABLE, "no_capacity", err.to_string())
            }
            CorralError::HostUnavailable => {
                Self::new(S::SERVICE_UNAVAILABLE, "host_unavailable", err.to_string())
            }
            CorralError::HostBusy => {
                Self::new(S::SERVICE_UNAVAILABLE, "host_busy", err.to_string())
            }
            CorralError::HostTimeout(_) => {
                Self::new(S::GATEWAY_TIMEOUT, "host_timeout", err.to_string())
            }
            CorralError::HostDisconnected => {
                Self::new(S::BAD_GATEWAY, "host_disconnected", err.to_string())
            }
            CorralError::Host { code, message } => {
                let status = match code {
                    HostErrorCode::ImageNotFound | HostErrorCode::InvalidArgument => {
                        S::UNPROCESSABLE_ENTITY
                    }
                    HostErrorCode::InvalidState | HostErrorCode::SandboxNotFound => S::CONFLICT,
                    HostErrorCode::Runtime | HostErrorCode::Unsupported => S::BAD_GATEWAY,
                };
                Self::new(status, code.as_str(), message.clone())
            }
            CorralError::Database(detail) => {
                tracing::error!(error = %detail, "database error");
                Self::new(
                    S::SERVICE_UNAVAILABLE,
                    "database_unavailable",
                    "the database is unavailable; try again",
                )
            }
            CorralError::Internal(detail) => {
                tracing::error!(error = %detail, "internal error");
                Self::new(S::INTERNAL_SERVER_ERROR, "internal", "internal error")
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code.to_string(),
                message: self.message,
                request_id: None,
            },
        };
        let mut response = (self.status, Json(body)).into_response();
        if let Some(secs) = self.retry_after_secs {
            response
                .headers_mut()
                .insert(axum::http::header::RETRY_AFTER, secs.into());
        }
        response
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

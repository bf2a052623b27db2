//! The REST edge layer, in one place for every route: it gives each request
//! an id (the client's `x-request-id` if it is a sane token, else a new one)
//! and returns it in the `x-request-id` header and in every error body,
//! applies the request timeout to every route but exec, and records every
//! mutating request (POST, PUT, PATCH, DELETE) in the audit log: who (key
//! id, `platform-admin` or `anonymous`), org, action, target id, outcome
//! status, source address (the socket's peer, never a header), request id
//! and time.
//!
//! The audit write happens off the request path, so a slow or unreachable
//! database never delays an answer; a write that fails is logged.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use corral_actors::store::NewAuditEvent;
use serde_json::Value;

use crate::error::ApiError;
use crate::AppState;

pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// Bodies this layer reads back (errors and creations) are ours and small.
const MAX_REREAD_BODY: usize = 1 << 20;

/// Filled in by the auth extractors: who the caller turned out to be.
#[derive(Clone, Default)]
pub struct AuditSlot(Arc<Mutex<Option<Who>>>);

/// An actor (key id or `platform-admin`) and the org it acts for.
type Who = (String, Option<String>);

impl AuditSlot {
    pub fn set(&self, actor: String, org_id: Option<String>) {
        *self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some((actor, org_id));
    }

    fn take(&self) -> Option<Who> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
    }
}

/// The request's id, for handlers that want it.
#[derive(Clone, Debug)]
pub struct RequestId(pub String);

/// 1-128 characters of `[A-Za-z0-9._:-]`: safe to log and echo back.
fn sane_request_id(value: &str) -> bool {
    (1..=128).contains(&value.len())
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b':'))
}

fn is_mutation(method: &Method) -> bool {
    matches!(
        *method,
        Method::POST | Method::PUT | Method::PATCH | Method::DELETE
    )
}

/// Our ids are `xxx_` and hex (`sbx_...`, `key_...`, `org_...`).
fn looks_like_id(segment: &str) -> bool {
    segment.split_once('_').is_some_and(|(kind, rest)| {
        (2..=4).contains(&kind.len())
            && kind.bytes().all(|b| b.is_ascii_lowercase())
            && (8..=64).contains(&rest.len())
            && rest.bytes().all(|b| b.is_ascii_hexdigit())
    })
}

/// `("/v1/sandboxes/{id}/exec", Some("sbx_..."))` from a concrete path.
fn action_and_target(path: &str) -> (String, Option<String>) {
    let mut target = None;
    let template: Vec<&str> = path
        .split('/')
        .map(|segment| {
            if looks_like_id(segment) {
                target.get_or_insert_with(|| segment.to_string());
                "{id}"
            } else {
                segment
            }
        })
        .collect();
    (template.join("/"), target)
}

/// The id of what a 201 created: `id` at the top, or `org.id`.
fn created_id(body: &Value) -> Option<String> {
    body.get("id")
        .or_else(|| body.get("org").and_then(|o| o.get("id")))
        .and_then(Value::as_str)
        .filter(|id| looks_like_id(id))
        .map(str::to_string)
}

pub async fn edge(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let request_id = req
        .headers()
        .get(REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|v| sane_request_id(v))
        .map(str::to_string)
        .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string());
    let slot = AuditSlot::default();
    req.extensions_mut().insert(slot.clone());
    req.extensions_mut().insert(RequestId(request_id.clone()));
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let source_addr = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.to_string());

    let is_exec = path.ends_with("/exec");
    let response = if is_exec {
        next.run(req).await
    } else {
        let deadline = state.limits.config.request_timeout;
        match tokio::time::timeout(deadline, next.run(req)).await {
            Ok(response) => response,
            Err(_) => {
                tracing::warn!(%method, %path, %request_id, "request timed out");
                ApiError::new(
                    StatusCode::GATEWAY_TIMEOUT,
                    "request_timeout",
                    format!(
                        "the request took longer than {} ms; what it started may still finish",
                        deadline.as_millis()
                    ),
                )
                .into_response()
            }
        }
    };

    let status = response.status();
    let reread = status.is_client_error()
        || status.is_server_error()
        || (status == StatusCode::CREATED && is_mutation(&method));
    let (mut response, body) = if reread {
        read_back(response, &request_id).await
    } else {
        (response, None)
    };
    if let Ok(value) = HeaderValue::from_str(&request_id) {
        response.headers_mut().insert(REQUEST_ID_HEADER, value);
    }

    if is_mutation(&method) {
        let (action_path, path_target) = action_and_target(&path);
        let target_id = path_target.or_else(|| body.as_ref().and_then(created_id));
        let (actor, org_id) = slot
            .take()
            .unwrap_or_else(|| ("anonymous".to_string(), None));
        let event = NewAuditEvent {
            org_id,
            actor,
            action: format!("{method} {action_path}"),
            method: method.to_string(),
            path: path.chars().take(512).collect(),
            target_id,
            status: i32::from(status.as_u16()),
            source_addr,
            request_id,
        };
        let store = state.control_plane.store().clone();
        tokio::spawn(async move {
            let request_id = event.request_id.clone();
            if let Err(err) = store.record_audit(event).await {
                tracing::error!(%request_id, error = %err, "could not write the audit log");
            }
        });
    }
    response
}

/// Reads a small JSON body back: returns it parsed, and for errors adds
/// `error.request_id`. A body that is not ours to touch passes unchanged.
async fn read_back(response: Response, request_id: &str) -> (Response, Option<Value>) {
    let (mut parts, body) = response.into_parts();
    let bytes = match axum::body::to_bytes(body, MAX_REREAD_BODY).await {
        Ok(bytes) => bytes,
        Err(err) => {
            tracing::error!(error = %err, "could not read a response body back");
            let mut failed = ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "internal error",
            )
            .into_response();
            failed
                .headers_mut()
                .insert(REQUEST_ID_HEADER, HeaderValue::from_static("unknown"));
            return (failed, None);
        }
    };
    let is_error = parts.status.is_client_error() || parts.status.is_server_error();
    let mut value = match serde_json::from_slice::<Value>(&bytes) {
        Ok(value) => value,
        // Rejections of axum's own extractors and routers (a bad query
        // string, a wrong method) come as text or nothing: give them our
        // shape and a stable code.
        Err(_) if is_error => framework_error(parts.status, &bytes),
        Err(_) => return (Response::from_parts(parts, Body::from(bytes)), None),
    };
    if is_error {
        parts.headers.insert(
            axum::http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
    }
    if let Some(error) = value.get_mut("error").and_then(Value::as_object_mut) {
        error.insert("request_id".into(), Value::String(request_id.to_string()));
        match serde_json::to_vec(&value) {
            Ok(rewritten) => {
                parts.headers.remove(axum::http::header::CONTENT_LENGTH);
                return (
                    Response::from_parts(parts, Body::from(rewritten)),
                    Some(value),
                );
            }
            Err(_) => return (Response::from_parts(parts, Body::from(bytes)), Some(value)),
        }
    }
    (Response::from_parts(parts, Body::from(bytes)), Some(value))
}

fn framework_error(status: StatusCode, text: &[u8]) -> Value {
    let code = match status {
        StatusCode::BAD_REQUEST => "invalid_argument",
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::PAYLOAD_TOO_LARGE => "payload_too_large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        StatusCode::UNPROCESSABLE_ENTITY => "invalid_body",
        s if s.is_server_error() => "internal",
        _ => "invalid_request",
    };
    let text = String::from_utf8_lossy(text);
    let message = if text.trim().is_empty() || status.is_server_error() {
        status
            .canonical_reason()
            .unwrap_or("request failed")
            .to_string()
    } else {
        text.chars().take(256).collect()
    };
    serde_json::json!({"error": {"code": code, "message": message}})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_from_clients_must_be_plain_tokens() {
        assert!(sane_request_id("abc-123_x.y:z"));
        assert!(!sane_request_id(""));
        assert!(!sane_request_id("a b"));
        assert!(!sane_request_id("line\nbreak"));
        assert!(!sane_request_id(&"x".repeat(129)));
    }

    #[test]
    fn actions_name_the_route_and_the_target() {
        let id = "sbx_0192f0c4a1b27c3d8e9f001122334455";
        let (action, target) = action_and_target(&format!("/v1/sandboxes/{id}/exec"));
        assert_eq!(action, "/v1/sandboxes/{id}/exec");
        assert_eq!(target.as_deref(), Some(id));
        let (action, target) = action_and_target("/v1/sandboxes");
        assert_eq!(action, "/v1/sandboxes");
        assert_eq!(target, None);
        assert!(!looks_like_id("api-keys"));
    }
}

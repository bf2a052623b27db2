//! `GET /v1/events`: the caller's org's sandbox and billing transitions as
//! server-sent events, for live dashboards. Each SSE message has the event
//! kind as `event:`, the sequence number as `id:` and the JSON event as
//! `data:`; another org's events are never sent. A subscriber too slow for
//! the buffer gets a `lagged` event saying how many it missed. The request
//! must accept `text/event-stream` (406 otherwise).

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::Stream;
use tokio::sync::broadcast::error::RecvError;

use crate::auth::OrgCaller;
use crate::error::{ApiError, ErrorBody};
use crate::AppState;

fn accepts_event_stream(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|v| {
            v.split(';')
                .next()
                .is_some_and(|t| t.trim().eq_ignore_ascii_case("text/event-stream"))
        })
}

/// A stream of the org's events: `sandbox` (`sandbox_id`, `from`, `to`,
/// `reason`) and `billing` (`from`, `to`, `balance_micros`), each with
/// `seq`, `org_id` and `at`.
#[utoipa::path(get, path = "/v1/events",
    responses(
        (status = 200, description = "Server-sent events: `event: sandbox|billing|lagged`, `id: <seq>`, `data: <JSON event>`", content_type = "text/event-stream", body = String),
        (status = 406, description = "The request does not accept text/event-stream", body = ErrorBody)),
    tag = "org")]
pub async fn events(
    caller: OrgCaller,
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Response {
    if !accepts_event_stream(&headers) {
        return ApiError::new(
            StatusCode::NOT_ACCEPTABLE,
            "not_acceptable",
            "this route streams server-sent events: send Accept: text/event-stream",
        )
        .into_response();
    }
    let receiver = state.control_plane.subscribe_events();
    Sse::new(org_stream(caller.org_id, receiver))
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}

fn org_stream(
    org_id: String,
    receiver: tokio::sync::broadcast::Receiver<corral_actors::events::Event>,
) -> impl Stream<Item = Result<Event, Infallible>> {
    futures::stream::unfold((org_id, receiver), |(org_id, mut receiver)| async move {
        loop {
            match receiver.recv().await {
                Ok(event) if event.org_id == org_id => {
                    let sse = Event::default()
                        .event(event.name())
                        .id(event.seq.to_string())
                        .json_data(&event)
                        .unwrap_or_else(|_| Event::default().event("error"));
                    return Some((Ok(sse), (org_id, receiver)));
                }
                Ok(_) => continue,
                Err(RecvError::Lagged(missed)) => {
                    let sse = Event::default()
                        .event("lagged")
                        .data(format!("{{\"missed\":{missed}}}"));
                    return Some((Ok(sse), (org_id, receiver)));
                }
                Err(RecvError::Closed) => return None,
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_explicit_event_stream_is_accepted() {
        let mut h = HeaderMap::new();
        assert!(!accepts_event_stream(&h));
        h.insert(header::ACCEPT, "application/json".parse().expect("header"));
        assert!(!accepts_event_stream(&h));
        h.insert(
            header::ACCEPT,
            "application/json, text/event-stream;q=0.9"
                .parse()
                .expect("header"),
        );
        assert!(accepts_event_stream(&h));
    }
}

//! What the control plane shows of itself: the outermost REST layer opens
//! one `http.request` span per request (continuing the caller's W3C trace
//! context from `traceparent`/`tracestate`, with OpenTelemetry HTTP
//! semantic-convention attributes and the `trace_id`/`span_id` that log
//! lines carry) and times it by route template and status; `/metrics`
//! renders those latencies with the actor tree's counters and gauges read
//! at scrape time (sandboxes and hosts by state, actors by kind, open agent
//! streams, pending agent requests, balances by org).

use std::collections::BTreeMap;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use corral_actors::domain::SandboxState;
use corral_telemetry::prom::{self, HistogramVec, LATENCY_BUCKETS};
use corral_telemetry::W3c;
use tracing::Instrument;

use crate::AppState;

/// The REST API's own measurements.
#[derive(Debug)]
pub struct HttpMetrics {
    pub latency: HistogramVec,
}

impl Default for HttpMetrics {
    fn default() -> Self {
        Self {
            latency: HistogramVec::new(
                "corral_http_request_duration_seconds",
                "REST request latency by route template, method and status.",
                &["route", "method", "status"],
                LATENCY_BUCKETS,
            ),
        }
    }
}

fn remote_context(req: &Request) -> Option<W3c> {
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let traceparent = header("traceparent")?;
    Some(W3c {
        traceparent,
        tracestate: header("tracestate").unwrap_or_default(),
    })
}

/// The outermost layer: span, request log line, latency.
pub async fn http(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let started = Instant::now();
    // Route templates only: a label per concrete path would be unbounded.
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let method = req.method().to_string();
    let remote = remote_context(&req);
    let span = tracing::info_span!(
        "http.request",
        otel.name = %format!("{method} {route}"),
        otel.kind = "server",
        http.request.method = %method,
        http.route = %route,
        url.path = %req.uri().path(),
        http.response.status_code = tracing::field::Empty,
        trace_id = tracing::field::Empty,
        span_id = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
        otel.status_message = tracing::field::Empty,
    );
    if let Some(remote) = &remote {
        corral_telemetry::set_parent(&span, remote);
    }
    let (trace_id, span_id) = corral_telemetry::span_ids(&span, remote.as_ref());
    span.record("trace_id", trace_id.as_str());
    span.record("span_id", span_id.as_str());

    let response = next.run(req).instrument(span.clone()).await;
    let status = response.status();
    span.record("http.response.status_code", status.as_u16());
    if status.is_server_error() {
        corral_telemetry::mark_failed(&span, status.canonical_reason().unwrap_or("error"));
    }
    let elapsed = started.elapsed();
    span.in_scope(|| {
        tracing::info!(
            status = status.as_u16(),
            duration_ms = elapsed.as_secs_f64() * 1000.0,
            "request served"
        );
    });
    state
        .http_metrics
        .latency
        .observe(&[&route, &method, status.as_str()], elapsed.as_secs_f64());
    response
}

/// `GET /metrics`: everything in the Prometheus text format. No secrets
/// and no client-chosen strings: safe to scrape without a token.
pub async fn metrics(State(state): State<AppState>) -> Response {
    let cp = &state.control_plane;
    let mut out = cp.metrics().render();
    state.http_metrics.latency.render(&mut out);

    let store = cp.store();
    let mut sandboxes = Vec::new();
    for s in SandboxState::ALL {
        if let Ok(n) = store.count_sandboxes_by_state(*s).await {
            sandboxes.push((vec![s.as_str().to_string()], n as f64));
        }
    }
    prom::gauge(
        &mut out,
        "corral_sandboxes",
        "Sandboxes by state.",
        &["state"],
        &sandboxes,
    );
    if let Ok(hosts) = store.list_hosts().await {
        let mut by_state: BTreeMap<String, f64> = BTreeMap::new();
        for h in hosts {
            *by_state.entry(h.state).or_default() += 1.0;
        }
        let rows: Vec<_> = by_state.into_iter().map(|(s, n)| (vec![s], n)).collect();
        prom::gauge(
            &mut out,
            "corral_hosts",
            "Hosts by state.",
            &["state"],
            &rows,
        );
    }
    if let Ok(orgs) = store.list_orgs().await {
        let mut rows = Vec::new();
        for org in orgs {
            if let Ok(balance) = store.ledger_balance(&org.id).await {
                rows.push((vec![org.id], balance as f64));
            }
        }
        prom::gauge(
            &mut out,
            "corral_ledger_balance_micros",
            "Each organisation's balance in micro-units.",
            &["org"],
            &rows,
        );
    }
    prom::gauge(
        &mut out,
        "corral_agent_streams_open",
        "Agent gRPC streams open now.",
        &[],
        &[(vec![], state.agent_streams.count() as f64)],
    );
    let tree = cp.clone();
    if let Ok(kinds) = tokio::task::spawn_blocking(move || {
        let mut kinds: BTreeMap<String, f64> = BTreeMap::new();
        count_kinds(&tree.actor_tree(), &mut kinds);
        kinds
    })
    .await
    {
        let rows: Vec<_> = kinds.into_iter().map(|(k, n)| (vec![k], n)).collect();
        prom::gauge(
            &mut out,
            "corral_actors",
            "Live actors by kind.",
            &["kind"],
            &rows,
        );
    }
    (
        [(axum::http::header::CONTENT_TYPE, prom::CONTENT_TYPE)],
        out,
    )
        .into_response()
}

fn count_kinds(node: &corral_actors::tree::ActorNode, out: &mut BTreeMap<String, f64>) {
    *out.entry(node.kind.clone()).or_default() += 1.0;
    for child in &node.children {
        count_kinds(child, out);
    }
}

//! What Corral's processes (the control plane and the agent) share to be
//! observable: log set-up (`--log-format text|json`, levels by `RUST_LOG`),
//! OpenTelemetry tracing exported over OTLP when the standard `OTEL_*`
//! variables ask for it (nothing is installed otherwise), W3C trace context
//! carried in and out of spans, and the Prometheus text format ([`prom`]).

pub mod prom;

use std::collections::HashMap;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{SpanId, TraceContextExt, TraceId, TracerProvider as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{IdGenerator, RandomIdGenerator, SdkTracerProvider};
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// How log lines are written (to stderr).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human-readable lines with the span context in front.
    #[default]
    Text,
    /// One JSON object a line: `timestamp`, `level`, `fields`, `target`,
    /// `span` (the current span with its fields, `trace_id` and `span_id`
    /// among them where known) and `spans`.
    Json,
}

impl LogFormat {
    pub fn parse(value: &str) -> Option<Self> {
        match value {
            "text" => Some(Self::Text),
            "json" => Some(Self::Json),
            _ => None,
        }
    }
}

impl std::str::FromStr for LogFormat {
    type Err = String;
    fn from_str(value: &str) -> Result<Self, String> {
        Self::parse(value).ok_or_else(|| format!("unknown log format {value:?}: text or json"))
    }
}

/// Whether the `OTEL_*` variables ask for traces to be exported: an OTLP
/// endpoint is set, the SDK is not disabled and the traces exporter is not
/// `none`.
pub fn otlp_requested() -> bool {
    let set = |name: &str| std::env::var(name).is_ok_and(|v| !v.trim().is_empty());
    let disabled = std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.eq_ignore_ascii_case("true"));
    let no_exporter =
        std::env::var("OTEL_TRACES_EXPORTER").is_ok_and(|v| v.trim().eq_ignore_ascii_case("none"));
    !disabled
        && !no_exporter
        && (set("OTEL_EXPORTER_OTLP_ENDPOINT") || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
}

/// Keeps the trace exporter alive; [`Telemetry::shutdown`] (or dropping it)
/// flushes the spans not yet sent.
#[derive(Debug, Default)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Whether spans are exported.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }

    /// Sends what is buffered and stops the exporter.
    pub fn shutdown(&mut self) {
        if let Some(provider) = self.provider.take() {
            let _ = provider.force_flush();
            let _ = provider.shutdown();
        }
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Installs the global subscriber: an `EnvFilter` from `RUST_LOG` (default
/// `info`), log lines in `format` on stderr and, when [`otlp_requested`],
/// an OpenTelemetry layer exporting over OTLP/gRPC to the configured
/// endpoint under `OTEL_SERVICE_NAME` (default `service_name`). Must run
/// inside a Tokio runtime (the exporter's client needs one). An exporter
/// that cannot be built is reported on stderr and tracing goes on without
/// it.
pub fn init(service_name: &str, format: LogFormat) -> Telemetry {
    init_with(service_name, format, otlp_requested())
}

/// Logs only, never an exporter (for commands that run outside a Tokio
/// runtime).
pub fn init_logs(format: LogFormat) -> Telemetry {
    init_with("", format, false)
}

fn init_with(service_name: &str, format: LogFormat, otlp: bool) -> Telemetry {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let fmt = match format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .with_writer(std::io::stderr)
            .boxed(),
    };
    let mut telemetry = Telemetry::default();
    let otel = if otlp {
        match build_provider(service_name) {
            Ok(provider) => {
                let tracer = provider.tracer("corral");
                telemetry.provider = Some(provider);
                Some(
                    tracing_opentelemetry::layer()
                        .with_tracer(tracer)
                        .with_error_events_to_status(true),
                )
            }
            Err(err) => {
                eprintln!("OpenTelemetry export disabled: {err}");
                None
            }
        }
    } else {
        None
    };
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with(otel)
        .try_init();
    telemetry
}

fn build_provider(service_name: &str) -> Result<SdkTracerProvider, String> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .build()
        .map_err(|e| e.to_string())?;
    let name = std::env::var("OTEL_SERVICE_NAME")
        .ok()
        .filter(|n| !n.trim().is_empty())
        .unwrap_or_else(|| service_name.to_string());
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(name)
        .build();
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build())
}

/// W3C trace context as carried on the wire: `traceparent` and
/// `tracestate`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct W3c {
    pub traceparent: String,
    pub tracestate: String,
}

impl W3c {
    /// Reads the two headers from a string map (header names lower case).
    pub fn from_map(map: &HashMap<String, String>) -> Option<Self> {
        let traceparent = map.get("traceparent")?.clone();
        Some(Self {
            traceparent,
            tracestate: map.get("tracestate").cloned().unwrap_or_default(),
        })
    }

    fn to_map(&self) -> HashMap<String, String> {
        let mut map = HashMap::new();
        map.insert("traceparent".to_string(), self.traceparent.clone());
        if !self.tracestate.is_empty() {
            map.insert("tracestate".to_string(), self.tracestate.clone());
        }
        map
    }

    /// The trace id, if `traceparent` is well formed.
    pub fn trace_id(&self) -> Option<TraceId> {
        let cx = TraceContextPropagator::new().extract(&self.to_map());
        let span = cx.span();
        let sc = span.span_context();
        sc.is_valid().then(|| sc.trace_id())
    }
}

/// The W3C context of `span` to send to another process, if the span is
/// part of an exported trace (nothing when tracing is off).
pub fn inject(span: &Span) -> Option<W3c> {
    let cx = span.context();
    if !cx.span().span_context().is_valid() {
        return None;
    }
    let mut map = HashMap::new();
    TraceContextPropagator::new().inject_context(&cx, &mut map);
    W3c::from_map(&map)
}

/// Makes `span` continue the trace of `remote` (a no-op when tracing is off
/// or the context is malformed). Call before anything reads the span's
/// context.
pub fn set_parent(span: &Span, remote: &W3c) {
    let cx = TraceContextPropagator::new().extract(&remote.to_map());
    if cx.span().span_context().is_valid() {
        let _ = span.set_parent(cx);
    }
}

/// The (trace id, span id) of `span` in hex, for log correlation. With
/// tracing exported they are the exported ids; without, the trace id of the
/// `remote` parent if there is one (else a fresh one) and a fresh span id,
/// so that log lines still correlate.
pub fn span_ids(span: &Span, remote: Option<&W3c>) -> (String, String) {
    let cx = span.context();
    let otel = cx.span();
    let sc = otel.span_context();
    if sc.is_valid() {
        return (sc.trace_id().to_string(), sc.span_id().to_string());
    }
    let ids = RandomIdGenerator::default();
    let trace_id = remote
        .and_then(W3c::trace_id)
        .unwrap_or_else(|| ids.new_trace_id());
    let span_id: SpanId = ids.new_span_id();
    (trace_id.to_string(), span_id.to_string())
}

/// Marks `span` as failed (OpenTelemetry status `ERROR`) with a message.
/// The span must declare the `otel.status_code` and `otel.status_message`
/// fields (as `tracing::field::Empty`).
pub fn mark_failed(span: &Span, message: &str) {
    span.record("otel.status_code", "ERROR");
    span.record("otel.status_message", message);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_formats_parse() {
        assert_eq!(LogFormat::parse("json"), Some(LogFormat::Json));
        assert_eq!(LogFormat::parse("text"), Some(LogFormat::Text));
        assert_eq!(LogFormat::parse("xml"), None);
    }

    #[test]
    fn trace_ids_come_from_a_valid_traceparent_only() {
        let good = W3c {
            traceparent: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into(),
            tracestate: String::new(),
        };
        assert_eq!(
            good.trace_id().map(|t| t.to_string()).as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        let bad = W3c {
            traceparent: "garbage".into(),
            tracestate: String::new(),
        };
        assert_eq!(bad.trace_id(), None);
    }

    #[test]
    fn without_a_tracer_ids_follow_the_remote_parent() {
        let remote = W3c {
            traceparent: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into(),
            tracestate: String::new(),
        };
        let span = tracing::info_span!("x");
        let (trace_id, span_id) = span_ids(&span, Some(&remote));
        assert_eq!(trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(span_id.len(), 16);
        assert_eq!(inject(&span), None);
    }
}

//! Tracing for every process: a `tracing` subscriber (human-readable logs on stderr) with an
//! OpenTelemetry layer, so spans carry W3C trace and span ids, plus the helpers that carry trace
//! context across gRPC: [`traceparent`] on the sending side, [`set_parent`] on the receiving one.
//! (An OTLP exporter is configured by the observability work; spans are created either way.)

use std::collections::HashMap;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::Layer;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Keeps the tracer provider alive for the life of the process.
#[derive(Debug)]
pub struct Telemetry {
    provider: SdkTracerProvider,
}

impl Telemetry {
    /// The provider (tests attach exporters through their own provider instead).
    pub fn provider(&self) -> &SdkTracerProvider {
        &self.provider
    }
}

/// Installs the global subscriber: logs filtered by `filter` (RUST_LOG syntax) on stderr, and
/// OpenTelemetry spans for every `tracing` span.
pub fn init(filter: &str) -> Result<Telemetry, String> {
    let provider = SdkTracerProvider::builder().build();
    let tracer = provider.tracer("moe-cluster");
    let filter = tracing_subscriber::EnvFilter::try_new(filter).map_err(|e| e.to_string())?;
    // Spans reach OpenTelemetry at info level whatever the log level, so trace context always
    // propagates.
    let spans = tracing_subscriber::EnvFilter::new("info");
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(colour())
                .with_filter(filter),
        )
        .with(
            tracing_opentelemetry::layer()
                .with_tracer(tracer)
                .with_filter(spans),
        )
        .try_init()
        .map_err(|e| e.to_string())?;
    Ok(Telemetry { provider })
}

/// Colour codes only on a terminal (not in files, pipes or `kubectl logs`), and never with
/// `NO_COLOR` set (no-color.org).
fn colour() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// The W3C `traceparent` of `span` (empty when it has no valid context).
pub fn traceparent(span: &tracing::Span) -> String {
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&span.context(), &mut carrier);
    carrier.remove("traceparent").unwrap_or_default()
}

/// Makes `span` a child of the remote span named by `traceparent` (ignored when empty/invalid).
pub fn set_parent(span: &tracing::Span, traceparent: &str) {
    if traceparent.is_empty() {
        return;
    }
    let carrier: HashMap<String, String> =
        [("traceparent".to_string(), traceparent.to_string())].into();
    let cx = TraceContextPropagator::new().extract(&carrier);
    let _ = span.set_parent(cx);
}

/// Trace id (32 hex digits) of a `traceparent`, if well-formed.
pub fn trace_id(traceparent: &str) -> Option<&str> {
    let mut parts = traceparent.split('-');
    let (_, id) = (parts.next()?, parts.next()?);
    (id.len() == 32).then_some(id)
}

//! Tracing for every process: a `tracing` subscriber (human-readable logs on stderr) and, when
//! an OTLP endpoint is configured ([`config`]), an OpenTelemetry layer exporting spans over
//! OTLP/gRPC ([`export`]) with a parent-based sampler ([`sampler`]); plus the helpers that carry
//! W3C trace context across gRPC: [`traceparent`] on the sending side, [`set_parent`] on the
//! receiving one, and the families every role's `/metrics` shares ([`process`]).
//!
//! With no endpoint (or a sampler that never samples) no OpenTelemetry layer, provider or
//! exporter thread exists: spans are plain `tracing` spans, and the per-step hot-path spans,
//! at `debug` level, are disabled callsites (one branch each) unless logs ask for them.

pub mod config;
pub mod export;
pub mod process;
pub mod sampler;
pub mod store_metrics;

use std::collections::HashMap;

use opentelemetry::KeyValue;
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::Layer;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Who this process is, for the trace resource.
#[derive(Debug, Clone, Default)]
pub struct Identity {
    /// `service.name` unless `OTEL_SERVICE_NAME` says otherwise: `moe-router`,
    /// `moe-expert-node`, `moe-coordinator`.
    pub service: String,
    /// `service.instance.id` and `moe.node.id`: the node, router or coordinator id when known.
    pub instance: Option<String>,
    /// The `--otlp-endpoint` flag (wins over `OTEL_EXPORTER_OTLP_*ENDPOINT`).
    pub otlp_endpoint: Option<String>,
}

/// Keeps the exporter alive for the life of the process; flushes it when dropped.
#[derive(Debug)]
pub struct Telemetry {
    export: Option<(SdkTracerProvider, tokio::runtime::Runtime)>,
}

impl Telemetry {
    /// The provider, when spans are exported.
    pub fn provider(&self) -> Option<&SdkTracerProvider> {
        self.export.as_ref().map(|(p, _)| p)
    }

    /// Whether spans are exported.
    pub fn exporting(&self) -> bool {
        self.export.is_some()
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some((provider, runtime)) = self.export.take() {
            // Flushes what is queued (bounded by the export timeout), then stops the thread.
            let _ = provider.shutdown();
            runtime.shutdown_timeout(std::time::Duration::from_secs(1));
        }
    }
}

/// The spans and events the OpenTelemetry layer sees: spans at debug and above from our crates
/// (the per-step ones), info and above from the rest, and events at info and above.
fn exported(meta: &tracing::Metadata<'_>) -> bool {
    let ours = meta.target().starts_with("moe");
    if meta.is_span() && ours {
        *meta.level() <= tracing::Level::DEBUG
    } else {
        *meta.level() <= tracing::Level::INFO
    }
}

/// Colour codes only on a terminal (not in files, pipes or `kubectl logs`), and never with
/// `NO_COLOR` set (no-color.org).
fn colour() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// Installs the global subscriber: logs filtered by `filter` (RUST_LOG syntax) on stderr, and
/// the OTLP exporter when the environment or `who.otlp_endpoint` configures one.
pub fn init(filter: &str, who: &Identity) -> Result<Telemetry, String> {
    let filter = tracing_subscriber::EnvFilter::try_new(filter).map_err(|e| e.to_string())?;
    let logs = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(colour())
        .with_filter(filter);
    let cfg = config::from_env(who.otlp_endpoint.as_deref(), &who.service, |k| {
        std::env::var(k).ok()
    })
    .map_err(|e| e.to_string())?
    .filter(|c| !c.sampler.never_samples());
    let Some(cfg) = cfg else {
        tracing_subscriber::registry()
            .with(logs)
            .try_init()
            .map_err(|e| e.to_string())?;
        return Ok(Telemetry { export: None });
    };
    let pipeline = export::pipeline(&cfg.endpoint)?;
    let provider = SdkTracerProvider::builder()
        .with_span_processor(pipeline.processor)
        .with_sampler(sampler::MoeSampler::new(cfg.sampler))
        .with_resource(resource(&cfg, who))
        .build();
    let tracer = provider.tracer("moe-cluster");
    tracing_subscriber::registry()
        .with(logs)
        .with(
            tracing_opentelemetry::layer()
                .with_tracer(tracer)
                .with_filter(tracing_subscriber::filter::filter_fn(exported)),
        )
        .try_init()
        .map_err(|e| e.to_string())?;
    tracing::info!(endpoint = %cfg.endpoint, "exporting traces over OTLP/gRPC");
    Ok(Telemetry {
        export: Some((provider, pipeline.runtime)),
    })
}

/// The resource: the SDK's (which reads `OTEL_RESOURCE_ATTRIBUTES`), then our service name,
/// version and instance.
fn resource(cfg: &config::ExportConfig, who: &Identity) -> Resource {
    let mut b = Resource::builder();
    if let Some(name) = &cfg.service_name {
        b = b.with_service_name(name.clone());
    }
    b = b.with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")));
    if let Some(id) = &who.instance {
        b = b
            .with_attribute(KeyValue::new("service.instance.id", id.clone()))
            .with_attribute(KeyValue::new("moe.node.id", id.clone()));
    }
    b.build()
}

/// Whether `span` is recorded and sampled (false for disabled spans and when not exporting):
/// hot paths skip their child spans and trace-context encoding when it is not.
pub fn is_sampled(span: &tracing::Span) -> bool {
    !span.is_disabled() && span.context().span().span_context().is_sampled()
}

/// The W3C `traceparent` of `span` (empty when it has no valid context).
pub fn traceparent(span: &tracing::Span) -> String {
    if span.is_disabled() {
        return String::new();
    }
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

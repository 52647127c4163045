//! OTLP/gRPC span export: the SDK's batch processor (one background thread, batches of up to
//! `OTEL_BSP_MAX_EXPORT_BATCH_SIZE`, every `OTEL_BSP_SCHEDULE_DELAY`) in front of the tonic
//! exporter, which runs on a one-thread tokio runtime of its own so a slow or absent collector
//! never touches a role's runtime. Ending a span never blocks: past `OTEL_BSP_MAX_QUEUE_SIZE`
//! spans waiting, new ones are dropped and counted ([`ExportStats`]), so memory stays bounded.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use opentelemetry::Context;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, Span, SpanData, SpanExporter, SpanProcessor,
};

/// Export counters since the process started (rendered as `moe_otel_spans_*_total`).
#[derive(Debug, Default)]
pub struct ExportStats {
    /// Spans handed to the collector.
    pub exported: AtomicU64,
    /// Spans dropped because the queue was full.
    pub dropped_queue_full: AtomicU64,
    /// Spans lost because the collector refused them or could not be reached.
    pub failed: AtomicU64,
}

/// The process's export counters.
pub fn stats() -> &'static ExportStats {
    static STATS: ExportStats = ExportStats {
        exported: AtomicU64::new(0),
        dropped_queue_full: AtomicU64::new(0),
        failed: AtomicU64::new(0),
    };
    &STATS
}

/// Spans accepted but not yet handed to the exporter; never above `cap`, which is the batch
/// processor's own queue size, so that queue never drops silently.
#[derive(Debug)]
struct Queue {
    waiting: AtomicUsize,
    cap: usize,
}

/// Counts drops in front of the batch processor.
#[derive(Debug)]
pub(crate) struct CountingProcessor {
    inner: BatchSpanProcessor,
    queue: Arc<Queue>,
}

impl SpanProcessor for CountingProcessor {
    fn on_start(&self, span: &mut Span, cx: &Context) {
        self.inner.on_start(span, cx);
    }

    fn on_end(&self, span: SpanData) {
        if !span.span_context.is_sampled() {
            return;
        }
        if self.queue.waiting.fetch_add(1, Ordering::Relaxed) >= self.queue.cap {
            self.queue.waiting.fetch_sub(1, Ordering::Relaxed);
            stats().dropped_queue_full.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.inner.on_end(span);
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// Runs the real exporter on the export runtime and keeps the counters.
#[derive(Debug)]
struct CountingExporter<E> {
    inner: Arc<E>,
    queue: Arc<Queue>,
    rt: tokio::runtime::Handle,
}

impl<E: SpanExporter + 'static> SpanExporter for CountingExporter<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let n = batch.len();
        self.queue.waiting.fetch_sub(n, Ordering::Relaxed);
        let inner = self.inner.clone();
        let result = self
            .rt
            .spawn(async move { inner.export(batch).await })
            .await
            .unwrap_or_else(|e| Err(OTelSdkError::InternalFailure(e.to_string())));
        let counter = match &result {
            Ok(()) => &stats().exported,
            Err(_) => &stats().failed,
        };
        counter.fetch_add(n as u64, Ordering::Relaxed);
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.set_resource(resource);
        }
    }
}

/// The runtime the exporter's gRPC client lives on, and the processor to register.
pub(crate) struct Pipeline {
    pub runtime: tokio::runtime::Runtime,
    pub processor: CountingProcessor,
}

/// Builds the OTLP/gRPC pipeline to `endpoint` (batch settings from `OTEL_BSP_*`).
pub(crate) fn pipeline(endpoint: &str) -> Result<Pipeline, String> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("otlp-export")
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the OTLP export runtime: {e}"))?;
    let exporter = {
        let _enter = runtime.enter();
        opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .with_timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| format!("cannot build the OTLP exporter for {endpoint}: {e}"))?
    };
    let cap = config_queue_size();
    let config = BatchConfigBuilder::default()
        .with_max_queue_size(cap)
        .build();
    let queue = Arc::new(Queue {
        waiting: AtomicUsize::new(0),
        cap,
    });
    let counting = CountingExporter {
        inner: Arc::new(exporter),
        queue: queue.clone(),
        rt: runtime.handle().clone(),
    };
    let inner = BatchSpanProcessor::builder(counting)
        .with_batch_config(config)
        .build();
    Ok(Pipeline {
        runtime,
        processor: CountingProcessor { inner, queue },
    })
}

/// `OTEL_BSP_MAX_QUEUE_SIZE` as the SDK reads it (default 2048).
fn config_queue_size() -> usize {
    std::env::var("OTEL_BSP_MAX_QUEUE_SIZE")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or(opentelemetry_sdk::trace::OTEL_BSP_MAX_QUEUE_SIZE_DEFAULT)
}

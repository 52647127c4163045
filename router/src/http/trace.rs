//! The HTTP server span of a generation request, with the OpenTelemetry HTTP and GenAI semantic
//! conventions (<https://opentelemetry.io/docs/specs/semconv/gen-ai/gen-ai-spans/>): named
//! `{gen_ai.operation.name} {gen_ai.request.model}`, kind server, a child of the caller's
//! `traceparent` header when there is one. The scheduler's queue-wait and prefill spans and the
//! engine steps' links hang off it.

use axum::http::{HeaderMap, StatusCode};
use opentelemetry::{StringValue, Value};
use tracing::field::Empty;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::scheduler::FinishReason;
use crate::validation::Validated;

/// The GenAI operation of an endpoint.
#[derive(Debug, Clone, Copy)]
pub enum Operation {
    /// `/v1/completions`.
    TextCompletion,
    /// `/v1/chat/completions`.
    Chat,
}

impl Operation {
    fn name(self) -> &'static str {
        match self {
            Operation::TextCompletion => "text_completion",
            Operation::Chat => "chat",
        }
    }

    fn route(self) -> &'static str {
        match self {
            Operation::TextCompletion => "/v1/completions",
            Operation::Chat => "/v1/chat/completions",
        }
    }
}

/// Opens the request's span (a disabled span when nothing exports traces).
pub fn request_span(op: Operation, model: &str, headers: &HeaderMap) -> tracing::Span {
    let span = tracing::info_span!(
        "http.request",
        otel.name = Empty,
        otel.kind = "server",
        otel.status_code = Empty,
        http.request.method = "POST",
        http.route = op.route(),
        http.response.status_code = Empty,
        "error.type" = Empty,
        gen_ai.operation.name = op.name(),
        gen_ai.provider.name = "moe-cluster",
        gen_ai.request.model = model,
        gen_ai.request.max_tokens = Empty,
        gen_ai.request.temperature = Empty,
        gen_ai.usage.input_tokens = Empty,
        gen_ai.usage.output_tokens = Empty,
    );
    if span.is_disabled() {
        return span;
    }
    span.record("otel.name", format!("{} {model}", op.name()));
    if let Some(tp) = headers.get("traceparent").and_then(|v| v.to_str().ok()) {
        moe_meta::telemetry::set_parent(&span, tp);
    }
    span
}

/// Records what validation learned about the request.
pub fn record_request(span: &tracing::Span, v: &Validated) {
    if span.is_disabled() {
        return;
    }
    span.record("gen_ai.request.max_tokens", v.request.max_tokens as i64);
    let t = f64::from(v.request.sampler.params().temperature);
    span.record("gen_ai.request.temperature", t);
}

/// Records the answer: status, usage and finish reason.
pub fn record_finish(
    span: &tracing::Span,
    reason: FinishReason,
    prompt_tokens: usize,
    completion_tokens: usize,
) {
    if span.is_disabled() {
        return;
    }
    span.record("http.response.status_code", 200i64);
    span.record("gen_ai.usage.input_tokens", prompt_tokens as i64);
    span.record("gen_ai.usage.output_tokens", completion_tokens as i64);
    let reasons = Value::Array(vec![StringValue::from(reason.as_str())].into());
    span.set_attribute("gen_ai.response.finish_reasons", reasons);
}

/// Records a failure: its HTTP status and error type.
pub fn record_error(span: &tracing::Span, status: StatusCode, error_type: &str) {
    if span.is_disabled() {
        return;
    }
    span.record("http.response.status_code", i64::from(status.as_u16()));
    span.record("error.type", error_type.to_string());
    span.record("otel.status_code", "error");
}

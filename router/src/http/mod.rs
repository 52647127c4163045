//! The OpenAI-compatible HTTP API (axum handlers only): `/v1/completions`,
//! `/v1/chat/completions`, `/v1/models`, `/health`, `/ready`, `/metrics`. With API keys
//! configured ([`auth`]), `/v1/*` needs one; `/health` and `/ready` never do (probes), `/metrics`
//! only with [`AppState::metrics_need_key`]. JSON bodies must say `application/json`, and with
//! `--allowed-hosts` `/v1/*` answers only for those hosts ([`guard`]).

pub mod auth;
pub mod blocking;
#[cfg(test)]
mod fuzz;
mod generate;
pub mod guard;
pub mod listener;
mod stream;
mod trace;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::de::DeserializeOwned;

use crate::error::ApiError;
use crate::metrics as m;
use crate::scheduler::Scheduler;
use crate::tokenize::TextCodec;
use crate::validation::Limits;

/// Everything the handlers share.
#[derive(Clone)]
pub struct AppState {
    pub scheduler: Scheduler,
    pub codec: Arc<TextCodec>,
    pub limits: Limits,
    pub metrics: PrometheusHandle,
    /// Extra readiness check (for `moe router`: every expert node reachable).
    pub ready: Arc<dyn Fn() -> Result<(), String> + Send + Sync>,
    pub max_body_bytes: usize,
    /// Accepted API keys; `None` leaves the API open.
    pub api_keys: Option<Arc<auth::ApiKeys>>,
    /// `/metrics` on the API port needs a key too.
    pub metrics_need_key: bool,
    /// Hosts `/v1/*` answers for; `None` answers for any.
    pub allowed_hosts: Option<Arc<guard::AllowedHosts>>,
    /// Where bodies are parsed, rendered and tokenized (off the async workers, bounded).
    pub blocking: blocking::BlockingPool,
}

/// The API router.
pub fn router(state: AppState) -> Router {
    let limit = state.max_body_bytes;
    let keys = axum::middleware::from_fn_with_state(state.api_keys.clone(), auth::require);
    let hosts =
        axum::middleware::from_fn_with_state(state.allowed_hosts.clone(), guard::require_host);
    let api = Router::new()
        .route("/v1/completions", post(generate::completions))
        .route("/v1/chat/completions", post(generate::chat))
        .route("/v1/models", get(models))
        .route_layer(keys.clone())
        .route_layer(hosts);
    let mut metrics_route = Router::new().route("/metrics", get(metrics));
    if state.metrics_need_key {
        metrics_route = metrics_route.route_layer(keys);
    }
    Router::new()
        .merge(api)
        .merge(metrics_route)
        .route("/health", get(health))
        .route("/ready", get(ready))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

/// Serves the API on `listener` with the listener's limits and TLS ([`listener`]) until
/// `shutdown` resolves, then drains.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    opts: listener::ListenerOptions,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let addr: SocketAddr = listener.local_addr()?;
    let scheme = if opts.tls.is_some() { "https" } else { "http" };
    tracing::info!(%addr, scheme, model = %state.limits.model_name, "HTTP API up");
    listener::serve(listener, router(state), opts, shutdown).await
}

/// Counts a finished request by status and error type.
pub(crate) fn count(status: StatusCode, error_type: &str) {
    metrics::counter!(m::REQUESTS, "status" => status.as_u16().to_string(), "error_type" => error_type.to_string())
        .increment(1);
}

/// An error response, counted; a server-side failure's detail goes to the log, not the client.
pub(crate) fn fail(e: ApiError) -> Response {
    count(e.status(), e.error_type());
    if e.status().is_server_error() {
        tracing::warn!(status = e.status().as_u16(), error = %e, "request failed");
    }
    e.into_response()
}

/// Parses a JSON body into `T`: 415 unless it is declared JSON, 413 over the body limit, 400
/// for bad JSON or a body that could not be read (the transport's error goes to the log).
pub(crate) fn parse<T: DeserializeOwned>(
    headers: &axum::http::HeaderMap,
    body: Result<Bytes, BytesRejection>,
    limit: usize,
) -> Result<T, ApiError> {
    guard::require_json(headers)?;
    let bytes = body.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge { limit }
        } else if let Some(after) = listener::body::is_timeout(&r) {
            ApiError::RequestTimeout {
                after_ms: after.as_millis() as u64,
            }
        } else {
            tracing::debug!(error = %r, "cannot read a request body");
            ApiError::bad_request("cannot read the request body")
        }
    })?;
    serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
}

async fn models(State(s): State<AppState>) -> Response {
    axum::Json(serde_json::json!({
        "object": "list",
        "data": [{
            "id": s.limits.model_name,
            "object": "model",
            "created": crate::api::now(),
            "owned_by": "moe-cluster",
            "max_model_len": s.limits.context,
        }]
    }))
    .into_response()
}

async fn health() -> Response {
    axum::Json(serde_json::json!({"status": "ok"})).into_response()
}

async fn ready(State(s): State<AppState>) -> Response {
    if !s.scheduler.stats().alive.load(Ordering::SeqCst) {
        return ApiError::Unavailable("the engine has stopped".into()).into_response();
    }
    match (s.ready)() {
        Ok(()) => axum::Json(serde_json::json!({"status": "ready"})).into_response(),
        // Which nodes are unreachable is for the operator (logs, /metrics), not for probes.
        Err(why) => {
            tracing::info!(reason = %why, "not ready");
            ApiError::Unavailable(why).into_response()
        }
    }
}

async fn metrics(State(s): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        crate::metrics::render(&s.metrics),
    )
        .into_response()
}

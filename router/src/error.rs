//! API errors: classified once where they happen, mapped once to an HTTP status and an
//! OpenAI-style body (`{"error": {"message", "type", "param", "code"}}`), and labelled once for
//! metrics. Handlers return `Result<_, ApiError>`; nothing on a request path panics.
//!
//! What a server-side failure says to the client is stable and reveals nothing of the cluster:
//! a 503 or 500 carries its detail (node addresses, transport error chains) for the logs and
//! the scheduler only, and its body a fixed message ([`ApiError::client_message`]). A 429 says
//! when to retry (`Retry-After`).

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// Everything a request can fail with.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ApiError {
    /// The request is invalid (400).
    #[error("{message}")]
    BadRequest {
        message: String,
        param: Option<String>,
        code: Option<String>,
    },
    /// No or a wrong API key (401).
    #[error("{0}")]
    Unauthorized(String),
    /// The body is larger than the configured limit (413).
    #[error("request body exceeds the limit of {limit} bytes")]
    PayloadTooLarge { limit: usize },
    /// The body is not declared `application/json` (415).
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// The `Host` is not one this server answers for (421).
    #[error("{0}")]
    MisdirectedHost(String),
    /// The body did not arrive within the body timeout (408).
    #[error("the request body did not arrive within {after_ms} ms")]
    RequestTimeout { after_ms: u64 },
    /// The waiting queue is full (429).
    #[error("the server is at capacity ({waiting} requests waiting); retry later")]
    Overloaded { waiting: usize },
    /// Experts (or the engine) are unavailable (503).
    #[error("{0}")]
    Unavailable(String),
    /// A bug or an unexpected failure (500).
    #[error("{0}")]
    Internal(String),
}

#[derive(Serialize)]
struct Body<'a> {
    error: Detail<'a>,
}

#[derive(Serialize)]
struct Detail<'a> {
    message: String,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<&'a str>,
    code: Option<&'a str>,
}

impl ApiError {
    /// A 400 about `param`.
    pub fn invalid(param: &str, message: impl Into<String>) -> ApiError {
        ApiError::BadRequest {
            message: message.into(),
            param: Some(param.to_string()),
            code: None,
        }
    }

    /// A 400 not tied to one parameter.
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::BadRequest {
            message: message.into(),
            param: None,
            code: None,
        }
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::MisdirectedHost(_) => StatusCode::MISDIRECTED_REQUEST,
            ApiError::RequestTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            ApiError::Overloaded { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The OpenAI error type, also the `error_type` label of metrics.
    pub fn error_type(&self) -> &'static str {
        match self {
            ApiError::BadRequest { .. }
            | ApiError::PayloadTooLarge { .. }
            | ApiError::UnsupportedMediaType(_)
            | ApiError::MisdirectedHost(_)
            | ApiError::RequestTimeout { .. }
            | ApiError::Unauthorized(_) => "invalid_request_error",
            ApiError::Overloaded { .. } => "rate_limit_error",
            ApiError::Unavailable(_) => "service_unavailable",
            ApiError::Internal(_) => "server_error",
        }
    }

    /// What the client is told: the error itself for its own mistakes, a fixed sentence for
    /// the server's (their detail is for the logs).
    pub fn client_message(&self) -> String {
        match self {
            ApiError::Unavailable(_) => {
                "the service is temporarily unavailable; retry later".to_string()
            }
            ApiError::Internal(_) => "the server failed to process the request".to_string(),
            other => other.to_string(),
        }
    }

    /// Seconds a client should wait before retrying, for `Retry-After`.
    pub fn retry_after(&self) -> Option<u32> {
        match self {
            ApiError::Overloaded { .. } => Some(1),
            _ => None,
        }
    }

    /// The JSON body.
    pub fn body(&self) -> serde_json::Value {
        let (param, code) = match self {
            ApiError::BadRequest { param, code, .. } => (param.as_deref(), code.as_deref()),
            ApiError::PayloadTooLarge { .. } => (None, Some("payload_too_large")),
            ApiError::RequestTimeout { .. } => (None, Some("request_timeout")),
            ApiError::Unauthorized(_) => (None, Some("invalid_api_key")),
            ApiError::Overloaded { .. } => (None, Some("queue_full")),
            ApiError::UnsupportedMediaType(_) => (None, Some("unsupported_media_type")),
            ApiError::MisdirectedHost(_) => (None, Some("host_not_allowed")),
            _ => (None, None),
        };
        serde_json::to_value(Body {
            error: Detail {
                message: self.client_message(),
                kind: self.error_type(),
                param,
                code,
            },
        })
        .unwrap_or_default()
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.status(), axum::Json(self.body())).into_response();
        if let Some(secs) = self.retry_after() {
            resp.headers_mut()
                .insert(axum::http::header::RETRY_AFTER, secs.into());
        }
        resp
    }
}

/// Classified once: invalid input is 400, an unavailable expert 503, anything else (an internal
/// dispatch error included) 500.
impl From<moe_model::ModelError> for ApiError {
    fn from(e: moe_model::ModelError) -> ApiError {
        match e {
            moe_model::ModelError::InvalidInput(m) => ApiError::bad_request(m),
            moe_model::ModelError::Dispatch {
                class: moe_model::DispatchClass::Unavailable,
                ..
            } => ApiError::Unavailable(e.to_string()),
            moe_model::ModelError::KvCacheFull { .. } => ApiError::Unavailable(e.to_string()),
            // Internal dispatch errors, a local backend's, and everything else: not the client's
            // fault, and not a missing expert either.
            other => ApiError::Internal(other.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use moe_model::{DispatchClass, ModelError};

    fn dispatch(class: DispatchClass) -> ModelError {
        ModelError::Dispatch {
            layer: 2,
            class,
            rows: vec![0],
            reason: "node x: y".into(),
        }
    }

    #[test]
    fn server_failures_tell_the_client_nothing_of_the_cluster() {
        let why = "no live replica of expert 7 (layer 1); last failure: node 10.0.0.7:7001: \
                   Unavailable: tcp connect error: Connection refused (os error 111)";
        let e = ApiError::from(ModelError::Dispatch {
            layer: 1,
            class: DispatchClass::Unavailable,
            rows: vec![0],
            reason: why.into(),
        });
        assert!(
            e.to_string().contains("10.0.0.7"),
            "the detail is kept for the logs"
        );
        let body = e.body().to_string();
        assert!(
            !body.contains("10.0.0.7") && !body.contains("tcp connect"),
            "{body}"
        );
        assert_eq!(
            e.body()["error"]["message"],
            "the service is temporarily unavailable; retry later"
        );
        let internal = ApiError::from(dispatch(DispatchClass::Internal))
            .body()
            .to_string();
        assert!(!internal.contains("node x"), "{internal}");
    }

    #[test]
    fn a_full_queue_says_when_to_retry() {
        let resp = ApiError::Overloaded { waiting: 3 }.into_response();
        assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(
            resp.headers()
                .get(axum::http::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok()),
            Some("1")
        );
        let other = ApiError::bad_request("x").into_response();
        assert!(
            other
                .headers()
                .get(axum::http::header::RETRY_AFTER)
                .is_none()
        );
    }

    #[test]
    fn dispatch_errors_keep_their_class_and_are_never_400() {
        let unavailable = ApiError::from(dispatch(DispatchClass::Unavailable));
        assert_eq!(unavailable.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(unavailable.error_type(), "service_unavailable");
        let internal = ApiError::from(dispatch(DispatchClass::Internal));
        assert_eq!(internal.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(internal.error_type(), "server_error");
        // A local backend's failure (or the backbone's shape check) is a bug, not a 503.
        let local = ApiError::from(ModelError::Experts {
            layer: 1,
            reason: "expert 3 not loaded".into(),
        });
        assert_eq!(local.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let bad = ApiError::from(ModelError::InvalidInput("token 9999".into()));
        assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
    }
}

//! API errors: classified once where they happen, mapped once to an HTTP status and an
//! OpenAI-style body (`{"error": {"message", "type", "param", "code"}}`), and labelled once for
//! metrics. Handlers return `Result<_, ApiError>`; nothing on a request path panics.

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
            | ApiError::RequestTimeout { .. }
            | ApiError::Unauthorized(_) => "invalid_request_error",
            ApiError::Overloaded { .. } => "rate_limit_error",
            ApiError::Unavailable(_) => "service_unavailable",
            ApiError::Internal(_) => "server_error",
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
            _ => (None, None),
        };
        serde_json::to_value(Body {
            error: Detail {
                message: self.to_string(),
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
        (self.status(), axum::Json(self.body())).into_response()
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

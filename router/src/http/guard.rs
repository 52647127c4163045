//! Checks on where a request comes from and what it says it is, before any handler reads it:
//! JSON bodies must be declared `application/json` (a web page's cross-site form post can only
//! send `text/plain`, form or multipart types without a CORS preflight, so this refuses it), and
//! with `--allowed-hosts` the `Host` (or HTTP/2 `:authority`) must be one of them, which defeats
//! DNS rebinding (a hostile name resolving to this server carries its own name as the Host).

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, header};
use axum::middleware::Next;
use axum::response::Response;

use crate::error::ApiError;

/// Refuses a body not declared as JSON (415); `application/json` with parameters is fine.
pub fn require_json(headers: &HeaderMap) -> Result<(), ApiError> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let essence = ct.split(';').next().unwrap_or("").trim();
    if essence.eq_ignore_ascii_case("application/json") {
        Ok(())
    } else if ct.is_empty() {
        Err(ApiError::UnsupportedMediaType(
            "the body must be JSON sent with `Content-Type: application/json`; none was given"
                .into(),
        ))
    } else {
        Err(ApiError::UnsupportedMediaType(format!(
            "the body must be JSON sent with `Content-Type: application/json`, not `{}`",
            ct.chars().take(100).collect::<String>()
        )))
    }
}

/// Host names (optionally `name:port`) the API answers for.
#[derive(Debug, Clone)]
pub struct AllowedHosts(Vec<String>);

impl AllowedHosts {
    /// `None` when `hosts` is empty (every Host is accepted).
    pub fn new(hosts: &[String]) -> Option<Arc<AllowedHosts>> {
        let list: Vec<String> = hosts
            .iter()
            .map(|h| h.trim().to_ascii_lowercase())
            .filter(|h| !h.is_empty())
            .collect();
        (!list.is_empty()).then(|| Arc::new(AllowedHosts(list)))
    }

    /// Whether `authority` (`host[:port]`, IPv6 in brackets) is allowed: an entry with a port
    /// must match it exactly, one without matches the host on any port.
    pub fn allows(&self, authority: &str) -> bool {
        let authority = authority.trim().to_ascii_lowercase();
        let host = match authority.rfind(':') {
            Some(i) if !authority[i..].contains(']') => &authority[..i],
            _ => authority.as_str(),
        };
        self.0.iter().any(|e| *e == authority || *e == host)
    }
}

/// Middleware: 421 unless the request's authority is allowed.
pub async fn require_host(
    State(hosts): State<Option<Arc<AllowedHosts>>>,
    req: Request,
    next: Next,
) -> Response {
    use axum::response::IntoResponse;
    let Some(hosts) = hosts else {
        return next.run(req).await;
    };
    let authority = req
        .uri()
        .authority()
        .map(|a| a.as_str().to_string())
        .or_else(|| {
            req.headers()
                .get(header::HOST)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        })
        .unwrap_or_default();
    if hosts.allows(&authority) {
        next.run(req).await
    } else {
        let shown: String = authority.chars().take(100).collect();
        let e =
            ApiError::MisdirectedHost(format!("this server does not answer for host `{shown}`"));
        super::count(e.status(), e.error_type());
        e.into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn with_ct(ct: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(ct) = ct {
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_str(ct).expect("value"),
            );
        }
        h
    }

    #[test]
    fn only_json_bodies_are_read() {
        for ok in [
            "application/json",
            "application/json; charset=utf-8",
            "Application/JSON",
        ] {
            assert!(require_json(&with_ct(Some(ok))).is_ok(), "{ok}");
        }
        for bad in [
            None,
            Some("text/plain"),
            Some("application/x-www-form-urlencoded"),
            Some("multipart/form-data; boundary=x"),
            Some("application/jsonx"),
        ] {
            let e = require_json(&with_ct(bad)).expect_err("refused");
            assert_eq!(
                e.status(),
                axum::http::StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "{bad:?}"
            );
            assert_eq!(e.body()["error"]["code"], "unsupported_media_type");
        }
    }

    #[test]
    fn hosts_match_by_name_or_name_and_port() {
        let h =
            AllowedHosts::new(&["api.example.com".into(), "127.0.0.1:8000".into()]).expect("some");
        assert!(h.allows("api.example.com"));
        assert!(h.allows("API.example.com:443"));
        assert!(h.allows("127.0.0.1:8000"));
        assert!(!h.allows("127.0.0.1:8001"));
        assert!(!h.allows("127.0.0.1"));
        assert!(!h.allows("evil.example.net"));
        assert!(!h.allows("api.example.com.evil.net"));
        assert!(!h.allows(""));
        assert!(AllowedHosts::new(&[]).is_none());
        let v6 = AllowedHosts::new(&["[::1]".into()]).expect("some");
        assert!(v6.allows("[::1]:8000"));
        assert!(v6.allows("[::1]"));
    }
}

//! API keys: `Authorization: Bearer <key>` as the OpenAI SDKs send it.
//!
//! Keys come from `--api-key` / `MOE_API_KEYS` and from a key file (one key per line, blank lines
//! and `#` comments ignored) that is re-read every [`RELOAD_PERIOD`] and applied when its contents
//! change, so a rotated Kubernetes Secret takes effect without a restart; a file that turns
//! unreadable or empty keeps the keys it last gave (and says so at warn), so a half-written file
//! never locks every client out. Only SHA-256 digests of the keys are held. A presented key is
//! hashed and compared with every digest in constant time ([`subtle`]), so neither the comparison
//! nor the loop reveals how much of a key matched. Requests are counted per key under a key id, the
//! first 8 hex digits of the digest (never the key). No key, key text or digest is ever logged.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, header};
use axum::middleware::Next;
use axum::response::Response;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::error::ApiError;
use crate::metrics as m;

/// How often the key file is re-read.
pub const RELOAD_PERIOD: Duration = Duration::from_secs(1);

type KeyDigest = [u8; 32];

fn digest(key: &str) -> KeyDigest {
    Sha256::digest(key.as_bytes()).into()
}

/// The id a key is counted under: the first 8 hex digits of its SHA-256.
pub fn key_id(key: &str) -> String {
    hex8(&digest(key))
}

fn hex8(d: &KeyDigest) -> String {
    d[..4].iter().map(|b| format!("{b:02x}")).collect()
}

/// The accepted keys (their digests).
pub struct ApiKeys {
    fixed: Vec<KeyDigest>,
    file: Option<PathBuf>,
    state: RwLock<FileKeys>,
}

#[derive(Default)]
struct FileKeys {
    digests: Vec<KeyDigest>,
    /// Digest of the file's contents when it was last applied.
    contents: Option<KeyDigest>,
}

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiKeys")
            .field("keys", &self.count())
            .field("file", &self.file)
            .finish()
    }
}

/// The keys of a key file's text.
fn parse(text: &str) -> Vec<KeyDigest> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(digest)
        .collect()
}

impl ApiKeys {
    /// The keys given directly plus those of `file`. `None` when none is given and no file: the
    /// API is open. A file that cannot be read, or keys that are all blank (an unset variable in
    /// `--api-key "$KEY"`), is an error: fail closed at start-up rather than serve without the
    /// protection that was asked for.
    pub fn new(keys: &[String], file: Option<&Path>) -> Result<Option<Arc<ApiKeys>>, String> {
        let fixed: Vec<KeyDigest> = keys
            .iter()
            .map(|k| k.trim())
            .filter(|k| !k.is_empty())
            .map(digest)
            .collect();
        if keys.is_empty() && file.is_none() {
            return Ok(None);
        }
        let keys = ApiKeys {
            fixed,
            file: file.map(Path::to_path_buf),
            state: RwLock::new(FileKeys::default()),
        };
        if let Some(path) = file {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read the API key file {}: {e}", path.display()))?;
            keys.apply(&text);
        }
        if keys.count() == 0 {
            return Err(match file {
                Some(p) => format!("no API key in {} (one key per line)", p.display()),
                None => "every --api-key is empty".to_string(),
            });
        }
        Ok(Some(Arc::new(keys)))
    }

    /// How many keys are accepted.
    pub fn count(&self) -> usize {
        self.fixed.len() + self.read().digests.len()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, FileKeys> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Applies a key file's text; false when it holds no key (the old keys stay).
    fn apply(&self, text: &str) -> bool {
        let contents = digest(text);
        let digests = parse(text);
        let mut st = self.state.write().unwrap_or_else(|e| e.into_inner());
        st.contents = Some(contents);
        if digests.is_empty() {
            return false;
        }
        st.digests = digests;
        true
    }

    /// Re-reads the key file; returns whether the accepted keys changed.
    pub fn reload(&self) -> bool {
        let Some(path) = &self.file else {
            return false;
        };
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "cannot re-read the API key file; keeping its previous keys");
                return false;
            }
        };
        if self.read().contents == Some(digest(&text)) {
            return false;
        }
        if self.apply(&text) {
            tracing::info!(file = %path.display(), keys = self.count(), "API keys reloaded");
            metrics::counter!(m::API_KEY_RELOADS).increment(1);
            true
        } else {
            tracing::warn!(file = %path.display(), "the API key file holds no key; keeping its previous keys");
            false
        }
    }

    /// Re-reads the key file every [`RELOAD_PERIOD`] on the current runtime (nothing without a file).
    pub fn watch(self: &Arc<Self>) {
        if self.file.is_none() {
            return;
        }
        let keys = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(RELOAD_PERIOD);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(k) = keys.upgrade() else { return };
                // A small file; read off the runtime threads all the same.
                let _ = tokio::task::spawn_blocking(move || k.reload()).await;
            }
        });
    }

    /// The id of the key `headers` present, or the 401 to answer.
    pub fn check(&self, headers: &HeaderMap) -> Result<String, ApiError> {
        let Some(value) = headers.get(header::AUTHORIZATION) else {
            return Err(unauthorized(
                "missing",
                "You didn't provide an API key. Provide it in the Authorization header as \
                 `Authorization: Bearer YOUR_KEY`.",
            ));
        };
        let token = value
            .to_str()
            .ok()
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim)
            .filter(|t| !t.is_empty());
        let Some(token) = token else {
            return Err(unauthorized(
                "malformed",
                "The Authorization header must be `Bearer YOUR_KEY`.",
            ));
        };
        let presented = digest(token);
        let st = self.read();
        let mut found = subtle::Choice::from(0u8);
        for d in self.fixed.iter().chain(&st.digests) {
            found |= d.ct_eq(&presented);
        }
        if bool::from(found) {
            Ok(hex8(&presented))
        } else {
            Err(unauthorized("invalid", "Incorrect API key provided."))
        }
    }
}

fn unauthorized(reason: &'static str, message: &str) -> ApiError {
    metrics::counter!(m::API_AUTH_FAILURES, "reason" => reason).increment(1);
    ApiError::Unauthorized(message.to_string())
}

/// Middleware: passes requests with an accepted key (counting them under its id), answers 401
/// otherwise; passes everything when no key is configured.
pub async fn require(
    State(keys): State<Option<Arc<ApiKeys>>>,
    req: Request,
    next: Next,
) -> Response {
    if let Some(keys) = keys {
        match keys.check(req.headers()) {
            Ok(id) => metrics::counter!(m::API_KEY_REQUESTS, "key" => id).increment(1),
            Err(e) => return super::fail(e),
        }
    }
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn bearer(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(v).expect("header"),
        );
        h
    }

    #[test]
    fn no_key_and_no_file_leaves_the_api_open() {
        assert!(ApiKeys::new(&[], None).expect("ok").is_none());
    }

    #[test]
    fn keys_are_checked_and_counted_by_id() {
        let keys = ApiKeys::new(&["sk-one".into(), "sk-two".into()], None)
            .expect("ok")
            .expect("keys");
        assert_eq!(keys.check(&bearer("Bearer sk-two")), Ok(key_id("sk-two")));
        assert_eq!(key_id("sk-two").len(), 8);
        assert_ne!(key_id("sk-one"), key_id("sk-two"));
        for bad in [
            "Bearer sk-three",
            "Bearer sk-on",
            "Bearer sk-one2",
            "sk-one",
            "Basic sk-one",
        ] {
            let e = keys.check(&bearer(bad)).expect_err(bad);
            assert_eq!(e.status(), axum::http::StatusCode::UNAUTHORIZED, "{bad}");
        }
        let e = keys.check(&HeaderMap::new()).expect_err("missing");
        assert!(e.to_string().contains("didn't provide an API key"), "{e}");
        assert_eq!(e.body()["error"]["code"], "invalid_api_key");
        assert!(!format!("{keys:?}").contains("sk-"), "{keys:?}");
    }

    #[test]
    fn the_key_file_is_reloaded_when_it_changes_and_kept_when_it_breaks() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("keys");
        std::fs::write(&path, "# team a\nsk-a\n\n  sk-b  \n").expect("write");
        let keys = ApiKeys::new(&[], Some(&path)).expect("ok").expect("keys");
        assert_eq!(keys.count(), 2);
        assert!(keys.check(&bearer("Bearer sk-b")).is_ok());
        assert!(!keys.reload(), "unchanged contents change nothing");
        std::fs::write(&path, "sk-c\n").expect("write");
        assert!(keys.reload());
        assert!(
            keys.check(&bearer("Bearer sk-a")).is_err(),
            "a removed key is revoked"
        );
        assert!(keys.check(&bearer("Bearer sk-c")).is_ok());
        std::fs::write(&path, "# nothing yet\n").expect("write");
        assert!(!keys.reload());
        assert!(
            keys.check(&bearer("Bearer sk-c")).is_ok(),
            "an empty file keeps the keys"
        );
        std::fs::remove_file(&path).expect("rm");
        assert!(!keys.reload());
        assert!(
            keys.check(&bearer("Bearer sk-c")).is_ok(),
            "a missing file keeps the keys"
        );
    }

    #[test]
    fn a_key_file_without_keys_or_unreadable_fails_at_start() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("keys");
        std::fs::write(&path, "# none\n").expect("write");
        let e = ApiKeys::new(&[], Some(&path)).expect_err("empty");
        assert!(e.contains("no API key in"), "{e}");
        let e = ApiKeys::new(&[], Some(&dir.path().join("absent"))).expect_err("absent");
        assert!(e.contains("cannot read the API key file"), "{e}");
        assert!(ApiKeys::new(&["  ".into()], None).is_err());
    }
}

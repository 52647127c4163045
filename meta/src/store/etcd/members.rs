//! The etcd members one store talks to, each on its own channel, with health tracking.
//!
//! etcd-client's balanced channel keeps sending to a member that died (upstream
//! etcdv3/etcd-client#39, the workplace's STACK.md trap 11), so the store keeps one single-endpoint
//! client per member and picks the member itself: the preferred member first (the last one that
//! answered), then the other healthy ones, then the unhealthy ones. A member is marked down when a
//! request to it fails with a transport-level code (`Unavailable`, `DeadlineExceeded`, ...) or
//! passes its per-attempt deadline, and up again when a request or the health probe succeeds.
//! Every client sets `require_leader` (etcd's `hasleader` metadata), so a member cut off from
//! quorum refuses requests and cancels its watches instead of answering from a stale state.
//!
//! The probe ([`Members::probe_forever`]) reads one key serializably from every member every
//! second (jittered), so a member that came back is used again and a frozen one (SIGSTOP, a
//! partition) is noticed even when no request happens to go to it. See
//! <https://etcd.io/docs/v3.4/learning/api_guarantees/> and `rpctypes.MetadataRequireLeaderKey`.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use etcd_client::{Client, ConnectOptions, GetOptions};
use tokio::sync::watch;

use super::super::{Result, StoreError};

/// Deadline of one attempt of a unary request on one member.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_millis(1000);
/// Longest a unary request keeps trying (pass after pass over the members) before it fails
/// with `Unavailable`: an election after a leader loss takes about a second.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(5);
/// Pause between two passes over the members (jittered ±25%).
pub const PASS_BACKOFF: Duration = Duration::from_millis(150);
/// How often every member is probed (each period jittered by ±25%).
pub const PROBE_INTERVAL: Duration = Duration::from_millis(1000);
/// Consecutive failed probes that mark a member down.
pub const PROBE_FAILURES: u32 = 2;
/// HTTP/2 keep-alive ping interval and timeout on each member's connection: a frozen member's
/// streams break after at most their sum.
pub const H2_PING: (Duration, Duration) = (Duration::from_secs(2), Duration::from_secs(2));
/// Connect timeout of a member's channel.
pub const CONNECT_TIMEOUT: Duration = Duration::from_millis(1000);

/// One member.
pub struct Member {
    pub url: String,
    pub client: Client,
    /// True while the member answers.
    pub healthy: watch::Sender<bool>,
    /// Consecutive failed probes.
    probe_failures: std::sync::atomic::AtomicU32,
}

/// The members of one store.
pub struct Members {
    pub list: Vec<Member>,
    preferred: AtomicUsize,
}

/// How a failed request is to be read.
pub enum Failure {
    /// The member (its connection, or its view of quorum) failed: try another member.
    Member(String),
    /// etcd answered: the request itself failed (a missing lease, a bad argument).
    Answer(etcd_client::Error),
}

/// Whether an error says the member, not the request, is at fault (gRPC code only).
pub fn classify(e: etcd_client::Error) -> Failure {
    use tonic::Code;
    match e {
        etcd_client::Error::GRpcStatus(ref s)
            if matches!(
                s.code(),
                Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown
            ) =>
        {
            Failure::Member(e.to_string())
        }
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => {
            Failure::Member(crate::error_chain(&e))
        }
        other => Failure::Answer(other),
    }
}

/// A factor in [0.75, 1.25) from the clock's low bits (enough to keep processes apart).
pub fn jitter() -> f64 {
    let n = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    0.75 + f64::from(n % 1000) / 2000.0
}

impl Members {
    /// One lazily connecting client per endpoint (nothing is dialled here).
    pub async fn connect(endpoints: &[&str], auth: &super::EtcdAuth) -> Result<Members> {
        if endpoints.is_empty() {
            return Err(StoreError::Unavailable("no etcd endpoint given".into()));
        }
        let opts = auth.apply(
            ConnectOptions::new()
                .with_connect_timeout(CONNECT_TIMEOUT)
                .with_keep_alive(H2_PING.0, H2_PING.1)
                .with_keep_alive_while_idle(true)
                .with_require_leader(true),
        );
        let mut list = Vec::new();
        for url in endpoints {
            let client = Client::connect([*url], Some(opts.clone()))
                .await
                .map_err(|e| StoreError::Unavailable(format!("{url}: {e}")))?;
            list.push(Member {
                url: url.to_string(),
                client,
                healthy: watch::channel(true).0,
                probe_failures: Default::default(),
            });
        }
        Ok(Members {
            list,
            preferred: AtomicUsize::new(0),
        })
    }

    /// Members in the order to try them: the preferred one if healthy, the other healthy ones,
    /// then the unhealthy ones (they may have come back since).
    pub fn order(&self) -> Vec<usize> {
        let n = self.list.len();
        let p = self.preferred.load(Ordering::Relaxed) % n;
        let ring = (0..n).map(|k| (p + k) % n);
        let (mut up, down): (Vec<usize>, Vec<usize>) = ring.partition(|&i| self.is_healthy(i));
        up.extend(down);
        up
    }

    pub fn is_healthy(&self, i: usize) -> bool {
        *self.list[i].healthy.borrow()
    }

    pub fn mark_down(&self, i: usize, why: &str) {
        let m = &self.list[i];
        if m.healthy.send_replace(false) {
            tracing::warn!(member = %m.url, error = why, "etcd member unhealthy; using another");
        }
        if self.preferred.load(Ordering::Relaxed) == i
            && let Some(&next) = self.order().first()
        {
            self.preferred.store(next, Ordering::Relaxed);
        }
    }

    pub fn mark_up(&self, i: usize) {
        let m = &self.list[i];
        if !m.healthy.send_replace(true) {
            tracing::info!(member = %m.url, "etcd member healthy again");
        }
        if !self.is_healthy(self.preferred.load(Ordering::Relaxed) % self.list.len()) {
            self.preferred.store(i, Ordering::Relaxed);
        }
    }

    /// Runs `f` on the members in [`Members::order`] until one answers: each attempt has
    /// [`ATTEMPT_TIMEOUT`]; a member failure moves on to the next member, an answer (success or
    /// a request error) ends the call. When every member failed, passes again after
    /// [`PASS_BACKOFF`] until [`REQUEST_DEADLINE`], then fails with the last error.
    ///
    /// A retried request may have been applied by the member that timed out (etcd gives no
    /// exactly-once). Every caller here tolerates that: puts and deletes are idempotent, and
    /// transactions compare-and-swap, so a retry of an applied one answers `false` and the
    /// caller re-reads.
    pub async fn call<T, F, Fut>(&self, mut f: F) -> std::result::Result<(usize, T), Failure>
    where
        F: FnMut(Client) -> Fut,
        Fut: Future<Output = std::result::Result<T, etcd_client::Error>>,
    {
        let mut last = String::from("no member tried");
        let deadline = tokio::time::Instant::now() + REQUEST_DEADLINE;
        loop {
            if let Some(v) = self.pass(&mut f, &mut last).await {
                return v;
            }
            if tokio::time::Instant::now() + PASS_BACKOFF >= deadline {
                return Err(Failure::Member(format!(
                    "every etcd member failed for {REQUEST_DEADLINE:?} (last: {last})"
                )));
            }
            tokio::time::sleep(PASS_BACKOFF.mul_f64(jitter())).await;
        }
    }

    /// One pass over the members: `None` when every one failed.
    async fn pass<T, F, Fut>(
        &self,
        f: &mut F,
        last: &mut String,
    ) -> Option<std::result::Result<(usize, T), Failure>>
    where
        F: FnMut(Client) -> Fut,
        Fut: Future<Output = std::result::Result<T, etcd_client::Error>>,
    {
        for i in self.order() {
            match tokio::time::timeout(ATTEMPT_TIMEOUT, f(self.list[i].client.clone())).await {
                Ok(Ok(v)) => {
                    self.mark_up(i);
                    self.preferred.store(i, Ordering::Relaxed);
                    return Some(Ok((i, v)));
                }
                Ok(Err(e)) => match classify(e) {
                    Failure::Member(why) => {
                        self.mark_down(i, &why);
                        *last = format!("{}: {why}", self.list[i].url);
                    }
                    Failure::Answer(e) => {
                        self.mark_up(i);
                        return Some(Err(Failure::Answer(e)));
                    }
                },
                Err(_) => {
                    let why = format!("no answer within {ATTEMPT_TIMEOUT:?}");
                    self.mark_down(i, &why);
                    *last = format!("{}: {why}", self.list[i].url);
                }
            }
        }
        None
    }

    /// Probes every member every [`PROBE_INTERVAL`] (jittered) until `members` is dropped.
    pub async fn probe_forever(members: std::sync::Weak<Members>) {
        loop {
            tokio::time::sleep(PROBE_INTERVAL.mul_f64(jitter())).await;
            let Some(m) = members.upgrade() else { return };
            let probes = (0..m.list.len()).map(|i| {
                let m = Arc::clone(&m);
                async move {
                    let mut c = m.list[i].client.clone();
                    let opts = GetOptions::new().with_serializable().with_keys_only();
                    let failed = match tokio::time::timeout(
                        ATTEMPT_TIMEOUT,
                        c.get("/moe-health", Some(opts)),
                    )
                    .await
                    {
                        Ok(Ok(_)) => None,
                        Ok(Err(e)) => match classify(e) {
                            Failure::Member(why) => Some(why),
                            Failure::Answer(_) => None,
                        },
                        Err(_) => Some("health probe timed out".to_string()),
                    };
                    let failures = &m.list[i].probe_failures;
                    match failed {
                        None => {
                            failures.store(0, Ordering::Relaxed);
                            m.mark_up(i);
                        }
                        // One slow probe on a loaded machine is not a dead member: two in a
                        // row are (requests mark a member down on their first failure).
                        Some(why) => {
                            if failures.fetch_add(1, Ordering::Relaxed) + 1 >= PROBE_FAILURES {
                                m.mark_down(i, &why);
                            }
                        }
                    }
                }
            });
            futures::future::join_all(probes).await;
        }
    }
}

//! Keeping a lease alive, and telling its owner when it is lost.
//!
//! The keeper refreshes every third of the TTL on its own task; after a failed refresh it tries
//! again sooner (200 ms, jittered), since the store has by then moved to another etcd member.
//! The lease-loss policy: a lease is **lost** only when the store says it no longer exists
//! ([`StoreError::LeaseGone`]: etcd's `NotFound`, or a keep-alive answer with TTL 0). Being
//! unable to reach the store is not a loss: etcd restores leases after a restart and extends
//! them on a leader change, so a process that waits keeps its registration, and one whose lease
//! did expire learns it with certainty as soon as a member answers. [`LeaseKeeper::stale`]
//! reports the uncertain state (no refresh answered for a whole TTL) for owners that must not
//! act on a lease that may be gone (a leader's term is fenced on the store anyway).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::{LeaseId, MetaStore, Result, StoreError};

/// Wait after a failed refresh before the next attempt (jittered ±25%).
pub const RETRY_AFTER_FAILURE: Duration = Duration::from_millis(200);
/// First and largest wait between attempts to get a lease.
pub const GRANT_BACKOFF: (Duration, Duration) =
    (Duration::from_millis(100), Duration::from_secs(2));

/// A lease kept alive until dropped.
#[derive(Debug)]
pub struct LeaseKeeper {
    pub id: LeaseId,
    pub ttl: Duration,
    lost: watch::Receiver<bool>,
    stale: watch::Receiver<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl LeaseKeeper {
    /// Grants a lease of `ttl` and keeps it alive.
    pub async fn start(store: Arc<dyn MetaStore>, ttl: Duration) -> Result<LeaseKeeper> {
        // The TTL etcd grants: whole seconds, rounded up.
        let ttl = Duration::from_secs(super::etcd::ttl_secs(ttl) as u64);
        let id = store.grant(ttl).await?;
        let (lost_tx, lost) = watch::channel(false);
        let (stale_tx, stale) = watch::channel(false);
        let alive = crate::telemetry::store_metrics::LeaseAlive::new();
        let task = tokio::spawn(async move {
            let mut last_ok = tokio::time::Instant::now();
            let mut failures = 0u32;
            loop {
                let wait = if failures == 0 {
                    ttl / 3
                } else {
                    RETRY_AFTER_FAILURE.mul_f64(super::etcd::members::jitter())
                };
                tokio::time::sleep(wait).await;
                // Bounded: a refresh that hangs must not hold the next one back.
                let sent = tokio::time::Instant::now();
                let r = tokio::time::timeout(ttl, store.keep_alive(id))
                    .await
                    .unwrap_or_else(|_| Err(StoreError::Unavailable("refresh timed out".into())));
                match r {
                    Ok(()) => {
                        last_ok = sent;
                        failures = 0;
                        if stale_tx.send_replace(false) {
                            tracing::info!(lease = id, "lease refreshed again");
                        }
                    }
                    Err(StoreError::LeaseGone(_)) => break,
                    Err(e) => {
                        failures += 1;
                        tracing::warn!(lease = id, error = %e, "lease refresh failed; retrying");
                        if last_ok.elapsed() >= ttl && !stale_tx.send_replace(true) {
                            tracing::warn!(
                                lease = id,
                                "no refresh answered for a whole TTL; the lease may be gone"
                            );
                        }
                    }
                }
            }
            alive.lost();
            tracing::warn!(lease = id, "lease lost (the store no longer has it)");
            let _ = lost_tx.send(true);
        });
        Ok(LeaseKeeper {
            id,
            ttl,
            lost,
            stale,
            task,
        })
    }

    /// Grants and keeps a lease, retrying (100 ms, doubling up to 2 s, jittered) until the store
    /// grants one; `None` once `shutdown` turns true. `owner` names who asks, in the log.
    pub async fn start_retrying(
        store: &Arc<dyn MetaStore>,
        ttl: Duration,
        owner: &str,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Option<LeaseKeeper> {
        let mut backoff = GRANT_BACKOFF.0;
        loop {
            if *shutdown.borrow() {
                return None;
            }
            match LeaseKeeper::start(store.clone(), ttl).await {
                Ok(l) => return Some(l),
                Err(e) => tracing::warn!(owner, error = %e, "cannot get a lease; retrying"),
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff.mul_f64(super::etcd::members::jitter())) => {}
                _ = super::wait_until(shutdown, |s| *s) => return None,
            }
            backoff = (backoff * 2).min(GRANT_BACKOFF.1);
        }
    }

    /// Becomes true when the lease is lost (the store said it is gone).
    pub fn lost(&self) -> watch::Receiver<bool> {
        self.lost.clone()
    }

    /// True while no refresh has been answered for a whole TTL (the lease may be gone).
    pub fn stale(&self) -> watch::Receiver<bool> {
        self.stale.clone()
    }
}

impl Drop for LeaseKeeper {
    fn drop(&mut self) {
        self.task.abort();
    }
}

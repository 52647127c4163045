//! Keeping a lease alive, and telling its owner when it is lost.
//!
//! The keeper refreshes every third of the TTL on its own task (compute never runs on the async
//! workers, so heavy load does not starve it). A refresh answered "lease gone", or no successful
//! refresh for a whole TTL (etcd unreachable), marks the lease lost; the owner then stops acting
//! on what the lease stood for and registers again.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::{LeaseId, MetaStore, Result, StoreError};

/// A lease kept alive until dropped.
#[derive(Debug)]
pub struct LeaseKeeper {
    pub id: LeaseId,
    lost: watch::Receiver<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl LeaseKeeper {
    /// Grants a lease of `ttl` and keeps it alive.
    pub async fn start(store: Arc<dyn MetaStore>, ttl: Duration) -> Result<LeaseKeeper> {
        let id = store.grant(ttl).await?;
        let (tx, lost) = watch::channel(false);
        let alive = crate::telemetry::store_metrics::LeaseAlive::new();
        let task = tokio::spawn(async move {
            let mut last_ok = tokio::time::Instant::now();
            let mut iv = tokio::time::interval(ttl / 3);
            iv.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                iv.tick().await;
                match store.keep_alive(id).await {
                    Ok(()) => last_ok = tokio::time::Instant::now(),
                    Err(StoreError::LeaseGone(_)) => break,
                    Err(e) => {
                        tracing::warn!(lease = id, error = %e, "lease refresh failed");
                        if last_ok.elapsed() >= ttl {
                            break;
                        }
                    }
                }
            }
            alive.lost();
            tracing::warn!(lease = id, "lease lost");
            let _ = tx.send(true);
        });
        Ok(LeaseKeeper { id, lost, task })
    }

    /// Grants and keeps a lease, retrying (100 ms, doubling up to 2 s) until the store grants
    /// one; `None` once `shutdown` turns true. `owner` names who asks, in the log.
    pub async fn start_retrying(
        store: &Arc<dyn MetaStore>,
        ttl: Duration,
        owner: &str,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Option<LeaseKeeper> {
        let mut backoff = Duration::from_millis(100);
        loop {
            if *shutdown.borrow() {
                return None;
            }
            match LeaseKeeper::start(store.clone(), ttl).await {
                Ok(l) => return Some(l),
                Err(e) => tracing::warn!(owner, error = %e, "cannot get a lease; retrying"),
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = super::wait_until(shutdown, |s| *s) => return None,
            }
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    /// Becomes true when the lease is lost.
    pub fn lost(&self) -> watch::Receiver<bool> {
        self.lost.clone()
    }
}

impl Drop for LeaseKeeper {
    fn drop(&mut self) {
        self.task.abort();
    }
}

//! One home for membership: hold a lease, run a role's registration term under it, and apply
//! the lease-loss policy of [`super::lease`] the same way for routers, expert nodes and
//! coordinators (Dynamo issue #3493 is what happens when each role improvises it).
//!
//! [`hold`] grants a lease (retrying with jittered backoff), runs the role's `term` with it,
//! and:
//! - when the term fails with [`TermError::Retry`] (the store is unreachable, leadership
//!   ended), runs it again **under the same lease** after a jittered backoff: nothing was lost,
//!   so nothing is re-registered and no key is left behind on an abandoned lease;
//! - when the lease is lost (the store says it is gone), logs it and starts over
//!   with a new lease: the role registers again;
//! - when the term fails with [`TermError::Fatal`] (the id is held by another live process),
//!   revokes the lease and returns the error: the process should exit with it;
//! - on shutdown, revokes the lease (the role's keys vanish at once, not a TTL later).
//!
//! [`claim`] registers a key that must be this process's alone (an expert node's id).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::lease::LeaseKeeper;
use super::{Compare, KeyValue, LeaseId, MetaStore, Op, StoreError, wait_until};

/// Backoff before a failed term runs again: first, largest (each jittered ±25%).
pub const TERM_BACKOFF: (Duration, Duration) = (Duration::from_millis(200), Duration::from_secs(2));

/// Why a term ended.
#[derive(Debug, thiserror::Error)]
pub enum TermError {
    /// Try again under the same lease.
    #[error("{0}")]
    Retry(String),
    /// Give up: the process cannot take part.
    #[error("{0}")]
    Fatal(String),
}

impl From<StoreError> for TermError {
    fn from(e: StoreError) -> TermError {
        TermError::Retry(e.to_string())
    }
}

/// What a term runs with.
#[derive(Debug, Clone)]
pub struct Term {
    pub lease: LeaseId,
    /// The lease's TTL as granted.
    pub ttl: Duration,
    /// How many leases this process held before this one (0: first registration).
    pub reregistrations: u64,
    /// True while no refresh has been answered for a whole TTL.
    pub stale: watch::Receiver<bool>,
}

/// Holds a lease for `owner` and runs `term` under it until `shutdown` turns true (`Ok`), or
/// the term fails fatally (`Err`, after revoking the lease). A term that returns `Ok` ends it
/// all the same way as a shutdown.
pub async fn hold<F, Fut>(
    store: Arc<dyn MetaStore>,
    owner: &str,
    ttl: Duration,
    mut shutdown: watch::Receiver<bool>,
    mut term: F,
) -> Result<(), String>
where
    F: FnMut(Term) -> Fut,
    Fut: Future<Output = Result<(), TermError>>,
{
    let mut reregistrations = 0u64;
    loop {
        let Some(lease) = LeaseKeeper::start_retrying(&store, ttl, owner, &mut shutdown).await
        else {
            return Ok(());
        };
        let mut lost = lease.lost();
        let mut backoff = TERM_BACKOFF.0;
        tracing::info!(owner, lease = lease.id, reregistrations, "lease granted");
        loop {
            let t = Term {
                lease: lease.id,
                ttl: lease.ttl,
                reregistrations,
                stale: lease.stale(),
            };
            let ended = tokio::select! {
                r = term(t) => r,
                _ = wait_until(&mut lost, |l| *l) => break,
                _ = wait_until(&mut shutdown, |s| *s) => Ok(()),
            };
            match ended {
                Ok(()) => {
                    let _ = store.revoke(lease.id).await;
                    return Ok(());
                }
                Err(TermError::Fatal(why)) => {
                    let _ = store.revoke(lease.id).await;
                    return Err(why);
                }
                Err(TermError::Retry(why)) => {
                    tracing::warn!(owner, lease = lease.id, error = %why, "term ended; again under the same lease");
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff.mul_f64(super::etcd::members::jitter())) => {}
                _ = wait_until(&mut lost, |l| *l) => break,
                _ = wait_until(&mut shutdown, |s| *s) => {
                    let _ = store.revoke(lease.id).await;
                    return Ok(());
                }
            }
            backoff = (backoff * 2).min(TERM_BACKOFF.1);
        }
        reregistrations += 1;
        tracing::warn!(owner, lease = lease.id, "lease lost; registering again");
    }
}

/// Puts `value` at `key` under `lease` unless another lease holds the key. When another does,
/// waits up to `patience` (a process restarted within its predecessor's TTL: the old lease
/// expires meanwhile) for the key to go, then refuses with an error naming the holder.
pub async fn claim(
    store: &dyn MetaStore,
    key: &str,
    value: Vec<u8>,
    lease: LeaseId,
    patience: Duration,
) -> Result<(), TermError> {
    let deadline = tokio::time::Instant::now() + patience;
    let mut backoff = Duration::from_millis(100);
    loop {
        let put = Op::Put {
            key: key.to_string(),
            value: value.clone(),
            lease: Some(lease),
        };
        if store
            .txn(vec![Compare::Absent(key.into())], vec![put])
            .await?
        {
            return Ok(());
        }
        match store.get(key).await? {
            // Ours already (a retried claim that had applied, or a term run again): refresh it.
            Some(KeyValue { lease: l, .. }) if l == lease => {
                store.put(key, value, Some(lease)).await?;
                return Ok(());
            }
            Some(kv) => {
                if tokio::time::Instant::now() >= deadline {
                    return Err(TermError::Fatal(format!(
                        "{key} is registered under another live lease ({:x}, still alive after {patience:?}): \
                         another process runs with this id; give this one another id",
                        kv.lease
                    )));
                }
                tracing::info!(%key, holder_lease = kv.lease, "id held by another lease; waiting for it to expire");
            }
            None => continue,
        }
        tokio::time::sleep(backoff.mul_f64(super::etcd::members::jitter())).await;
        backoff = (backoff * 2).min(Duration::from_secs(1));
    }
}

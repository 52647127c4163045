//! The metadata store: the one seam through which routers, expert nodes and coordinators share
//! state. A trait with an etcd implementation (production, integration tests) and an in-memory
//! one (unit tests with a simulated clock, and the embedded default of `moe up`).
//!
//! Operations: get/put/delete, prefix list, prefix watch from a revision, leases (grant,
//! keep-alive, revoke; keys put under a lease vanish with it), and compare-and-swap transactions.
//! Leader election and fenced writes are built on the transactions ([`election`]), identically
//! for both stores. [`mirror`] turns a prefix into a live snapshot that survives reconnects by
//! re-reading the whole prefix (a missed delete cannot leave a ghost); [`placements`] follows
//! the placement through it as routers and nodes do.

pub mod election;
pub mod etcd;
pub mod lease;
pub mod memory;
pub mod mirror;
pub mod placements;
pub mod register;

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use futures::stream::BoxStream;

/// A boxed future (the trait is used as `dyn MetaStore`).
pub type BoxFut<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A lease id.
pub type LeaseId = i64;

/// Store failures.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The store cannot be reached (or answered with a transport error): retry later.
    #[error("metadata store unavailable: {0}")]
    Unavailable(String),
    /// The lease no longer exists.
    #[error("lease {0} is gone")]
    LeaseGone(LeaseId),
    /// The watch start revision was compacted away: re-list and watch again.
    #[error("revision {0} was compacted")]
    Compacted(i64),
    /// A record could not be decoded.
    #[error("bad record at {key}: {why}")]
    Decode { key: String, why: String },
}

/// Result alias.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// A stored key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    /// Revision of the last change of this key.
    pub mod_revision: i64,
    /// Lease the key lives under (0: none).
    pub lease: LeaseId,
}

/// A change under a watched prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    Put(KeyValue),
    Delete { key: String, revision: i64 },
}

/// A condition of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Compare {
    /// The key does not exist.
    Absent(String),
    /// The key holds exactly this value.
    Value(String, Vec<u8>),
    /// The key's last modification is at this revision.
    ModRevision(String, i64),
}

/// A write of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Put {
        key: String,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    },
    Delete(String),
}

/// The store seam.
pub trait MetaStore: Send + Sync + 'static {
    /// One key.
    fn get(&self, key: &str) -> BoxFut<'_, Result<Option<KeyValue>>>;
    /// Every key under `prefix`, and the store revision of that snapshot.
    fn list(&self, prefix: &str) -> BoxFut<'_, Result<(Vec<KeyValue>, i64)>>;
    /// Writes `key` (under `lease` if given); returns the new revision.
    fn put(&self, key: &str, value: Vec<u8>, lease: Option<LeaseId>) -> BoxFut<'_, Result<i64>>;
    /// Deletes `key`.
    fn delete(&self, key: &str) -> BoxFut<'_, Result<()>>;
    /// Applies `ops` atomically if every compare holds; returns whether it did.
    fn txn(&self, compares: Vec<Compare>, ops: Vec<Op>) -> BoxFut<'_, Result<bool>>;
    /// A new lease of `ttl`, rounded up to whole seconds as etcd grants it.
    fn grant(&self, ttl: Duration) -> BoxFut<'_, Result<LeaseId>>;
    /// Refreshes a lease; `Err(LeaseGone)` once it expired.
    fn keep_alive(&self, lease: LeaseId) -> BoxFut<'_, Result<()>>;
    /// Ends a lease now (its keys are deleted).
    fn revoke(&self, lease: LeaseId) -> BoxFut<'_, Result<()>>;
    /// Discards the history before `revision`: a watch from an older revision then fails with
    /// [`StoreError::Compacted`].
    fn compact(&self, revision: i64) -> BoxFut<'_, Result<()>>;
    /// Changes under `prefix` from `from_revision` on (inclusive; 0: from now, as etcd does).
    /// The stream ends or fails when the connection does; callers re-list and watch again
    /// ([`mirror`] does).
    fn watch(
        &self,
        prefix: &str,
        from_revision: i64,
    ) -> BoxFut<'_, Result<BoxStream<'static, Result<WatchEvent>>>>;
}

/// Waits until `f` holds for the watched value (false if the sender went away). Unlike
/// `Receiver::wait_for`, the future is `Send`: no borrow of the value lives across an await.
pub async fn wait_until<T>(
    rx: &mut tokio::sync::watch::Receiver<T>,
    f: impl Fn(&T) -> bool,
) -> bool {
    loop {
        let ok = f(&rx.borrow_and_update());
        if ok {
            return true;
        }
        if rx.changed().await.is_err() {
            return false;
        }
    }
}

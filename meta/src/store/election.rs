//! Leader election on the store's transactions: the leader is whoever created the election key
//! (under its lease) first; the others watch the key and try again when it is deleted (resign or
//! lease expiry).
//!
//! A term is the key's creation: a leader fences every write with
//! `Compare::ModRevision(key, revision of its campaign write)` in the same transaction. The key is
//! written once per term and never modified, so that revision names exactly one term under one
//! lease: once the lease expires (the key is deleted) or anyone re-creates the key, even a
//! coordinator with the same id, the old term's writes are refused. A campaign leads only on a
//! key it created under the lease it holds now: finding its own id under another lease (an
//! abandoned lease of its own, or a second process started with the same id) it waits for that
//! key to go like any other follower.

use std::sync::Arc;

use futures::StreamExt;

use super::{Compare, LeaseId, MetaStore, Op, Result, WatchEvent};

/// Leadership held under a lease, for one term.
#[derive(Debug, Clone)]
pub struct Leadership {
    pub key: String,
    pub id: String,
    /// Revision of the write that created the election key for this term.
    pub revision: i64,
    /// The lease the key lives under.
    pub lease: LeaseId,
}

impl Leadership {
    /// The compare that fences a write on still being the leader of this term.
    pub fn fence(&self) -> Compare {
        Compare::ModRevision(self.key.clone(), self.revision)
    }

    /// Steps down (only if this term still leads).
    pub async fn resign(&self, store: &dyn MetaStore) -> Result<()> {
        store
            .txn(vec![self.fence()], vec![Op::Delete(self.key.clone())])
            .await
            .map(|_| ())
    }
}

/// Blocks until `id` leads `key` under `lease`.
pub async fn campaign(
    store: Arc<dyn MetaStore>,
    key: &str,
    id: &str,
    lease: LeaseId,
) -> Result<Leadership> {
    let mut warned = false;
    loop {
        let put = Op::Put {
            key: key.to_string(),
            value: id.as_bytes().to_vec(),
            lease: Some(lease),
        };
        store
            .txn(vec![Compare::Absent(key.to_string())], vec![put])
            .await?;
        // Whoever holds the key now (it may be gone already, or be someone else's).
        let Some(current) = store.get(key).await? else {
            continue;
        };
        if current.lease == lease && current.value == id.as_bytes() {
            return Ok(Leadership {
                key: key.to_string(),
                id: id.to_string(),
                revision: current.mod_revision,
                lease,
            });
        }
        if current.value == id.as_bytes() && !warned {
            tracing::warn!(
                id,
                lease = current.lease,
                "the election key holds this id under another lease (an abandoned lease, or a \
                 second coordinator started with the same --id); waiting for it to go"
            );
            warned = true;
        }
        let mut events = store.watch(key, current.mod_revision + 1).await?;
        while let Some(ev) = events.next().await {
            if matches!(ev?, WatchEvent::Delete { key: ref gone, .. } if gone == key) {
                break;
            }
        }
    }
}

/// The current leader's id, if any.
pub async fn leader(store: &dyn MetaStore, key: &str) -> Result<Option<String>> {
    Ok(store
        .get(key)
        .await?
        .map(|kv| String::from_utf8_lossy(&kv.value).into_owned()))
}

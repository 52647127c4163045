//! Leader election on the store's transactions: the leader is whoever created the election key
//! (under its lease) first; the others watch the key and try again when it is deleted (resign or
//! lease expiry). A leader fences every write with `Compare::Value(key, its id)` in the same
//! transaction, so a deposed leader (lease expired, a successor elected) can never write.

use std::sync::Arc;

use futures::StreamExt;

use super::{Compare, LeaseId, MetaStore, Op, Result, WatchEvent};

/// Leadership held under a lease.
#[derive(Debug, Clone)]
pub struct Leadership {
    pub key: String,
    pub id: String,
}

impl Leadership {
    /// The compare that fences a write on still being the leader.
    pub fn fence(&self) -> Compare {
        Compare::Value(self.key.clone(), self.id.clone().into_bytes())
    }

    /// Steps down (only if still the leader).
    pub async fn resign(&self, store: &dyn MetaStore) -> Result<()> {
        store
            .txn(vec![self.fence()], vec![Op::Delete(self.key.clone())])
            .await
            .map(|_| ())
    }
}

/// Blocks until `id` leads `key` (held under `lease`).
pub async fn campaign(
    store: Arc<dyn MetaStore>,
    key: &str,
    id: &str,
    lease: LeaseId,
) -> Result<Leadership> {
    loop {
        let put = Op::Put {
            key: key.to_string(),
            value: id.as_bytes().to_vec(),
            lease: Some(lease),
        };
        if store
            .txn(vec![Compare::Absent(key.to_string())], vec![put])
            .await?
        {
            return Ok(Leadership {
                key: key.to_string(),
                id: id.to_string(),
            });
        }
        // Someone leads: wait for the key to go, then try again.
        let Some(current) = store.get(key).await? else {
            continue;
        };
        if current.value == id.as_bytes() {
            return Ok(Leadership {
                key: key.to_string(),
                id: id.to_string(),
            });
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

//! A live, reconnecting view of every key under a prefix (the linkerd `tonic-watch` pattern):
//! list the prefix, watch from the next revision, apply events; on any error back off (jittered,
//! 50 ms doubling to 2 s) and start over with a full re-list, so a delete missed while
//! disconnected cannot leave a ghost entry.
//!
//! Values are shared (`Arc<KeyValue>`): publishing the snapshot after an event copies the key
//! map's spine, never the values, so a prefix holding a large record (the placement) costs the
//! same per event as one holding small ones.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::watch;

use super::{KeyValue, MetaStore, WatchEvent};

/// A prefix's contents at a revision (`revision == 0`: not read yet).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    pub revision: i64,
    pub entries: BTreeMap<String, Arc<KeyValue>>,
}

fn jitter() -> f64 {
    let n = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    0.5 + f64::from(n % 1000) / 1000.0
}

/// Mirrors `prefix` into a watch channel until every receiver is dropped.
pub fn mirror(store: Arc<dyn MetaStore>, prefix: String) -> watch::Receiver<Arc<Snapshot>> {
    let (tx, rx) = watch::channel(Arc::new(Snapshot::default()));
    tokio::spawn(async move {
        let mut backoff = Duration::from_millis(50);
        loop {
            if tx.is_closed() {
                return;
            }
            match store.list(&prefix).await {
                Ok((kvs, rev)) => {
                    let mut snap = Snapshot {
                        revision: rev.max(1),
                        entries: kvs
                            .into_iter()
                            .map(|kv| (kv.key.clone(), Arc::new(kv)))
                            .collect(),
                    };
                    tx.send_replace(Arc::new(snap.clone()));
                    match store.watch(&prefix, rev + 1).await {
                        Ok(mut events) => {
                            backoff = Duration::from_millis(50);
                            loop {
                                let ev = tokio::select! {
                                    ev = events.next() => ev,
                                    _ = tx.closed() => return,
                                };
                                match ev {
                                    Some(Ok(WatchEvent::Put(kv))) => {
                                        snap.revision = snap.revision.max(kv.mod_revision);
                                        snap.entries.insert(kv.key.clone(), Arc::new(kv));
                                    }
                                    Some(Ok(WatchEvent::Delete { key, revision })) => {
                                        snap.revision = snap.revision.max(revision);
                                        snap.entries.remove(&key);
                                    }
                                    Some(Err(e)) => {
                                        tracing::warn!(%prefix, error = %e, "watch broke; re-listing");
                                        break;
                                    }
                                    None => break,
                                }
                                tx.send_replace(Arc::new(snap.clone()));
                            }
                        }
                        Err(e) => tracing::warn!(%prefix, error = %e, "watch failed"),
                    }
                }
                Err(e) => tracing::warn!(%prefix, error = %e, "list failed; retrying"),
            }
            tokio::time::sleep(backoff.mul_f64(jitter())).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    });
    rx
}

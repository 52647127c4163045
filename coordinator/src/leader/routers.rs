//! The leader summarises `routers/` into the one `router-versions` key expert nodes watch
//! ([`RouterVersions`]): the oldest placement version a live router routes with. Written only
//! when the summary changes (about once per rollout, when the last router switches, and when a
//! router joins or leaves), fenced by the leadership so a deposed leader cannot write a stale
//! one, and without a lease: a coordinator outage leaves the last summary in place, so nodes
//! keep serving the versions it names (memory kept longer, never a version unloaded early).

use std::sync::Arc;

use moe_meta::records::{self, Keys, RouterRecord, RouterVersions};
use moe_meta::store::mirror::{Snapshot, mirror};
use moe_meta::store::{Compare, MetaStore, Op, StoreError};

/// The summary of a `routers/` snapshot (records that do not decode are skipped, as nodes
/// skipped them when they read `routers/` themselves).
pub fn summarise(snap: &Snapshot) -> RouterVersions {
    let recs: Vec<RouterRecord> = snap
        .entries
        .iter()
        .filter_map(|(k, kv)| records::decode_or_skip::<RouterRecord>(k, &kv.value))
        .collect();
    RouterVersions::of(&recs)
}

/// Keeps `router-versions` equal to the summary of `routers/` while this term leads. Returns
/// when the fence fails (deposed), the mirror closes, or on a store error (the term's caller
/// retries).
pub async fn publish(
    store: Arc<dyn MetaStore>,
    keys: Keys,
    fence: Compare,
) -> Result<(), StoreError> {
    let mut routers = mirror(store.clone(), keys.routers());
    let key = keys.router_versions();
    let mut written: Option<RouterVersions> = match store.get(&key).await? {
        Some(kv) => records::decode_or_skip(&key, &kv.value),
        None => None,
    };
    // The mirror's first snapshot has revision > 0 once it has listed the prefix.
    loop {
        let snap = routers.borrow_and_update().clone();
        if snap.revision > 0 {
            let now = summarise(&snap);
            if written.as_ref() != Some(&now) {
                let put = Op::Put {
                    key: key.clone(),
                    value: records::encode(&now),
                    lease: None,
                };
                if !store.txn(vec![fence.clone()], vec![put]).await? {
                    tracing::info!("router versions not written: no longer leading");
                    return Ok(());
                }
                tracing::debug!(routers = now.routers, oldest = ?now.oldest, "router versions");
                written = Some(now);
            }
        }
        if routers.changed().await.is_err() {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use moe_meta::store::memory::MemStore;

    use super::*;

    fn router(id: &str, v: u64) -> Vec<u8> {
        records::encode(&RouterRecord {
            id: id.into(),
            addr: String::new(),
            placement_version: v,
        })
    }

    async fn summary(store: &Arc<dyn MetaStore>, keys: &Keys) -> Option<RouterVersions> {
        let kv = store.get(&keys.router_versions()).await.expect("get")?;
        records::decode_or_skip(&keys.router_versions(), &kv.value)
    }

    async fn eventually(
        store: &Arc<dyn MetaStore>,
        keys: &Keys,
        want: RouterVersions,
    ) -> Result<(), String> {
        for _ in 0..400 {
            if summary(store, keys).await.as_ref() == Some(&want) {
                return Ok(());
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        Err(format!("never {want:?}: {:?}", summary(store, keys).await))
    }

    #[tokio::test]
    async fn the_summary_follows_routers_and_a_deposed_leader_stops_writing() {
        let store: Arc<dyn MetaStore> = Arc::new(MemStore::start());
        let keys = Keys::new("t");
        let put = |k: String, v: Vec<u8>| Op::Put {
            key: k,
            value: v,
            lease: None,
        };
        store
            .txn(vec![], vec![put(keys.election(), b"me".to_vec())])
            .await
            .expect("elect");
        let rev = store
            .get(&keys.election())
            .await
            .expect("get")
            .expect("elected")
            .mod_revision;
        let fence = Compare::ModRevision(keys.election(), rev);
        let task = tokio::spawn(publish(store.clone(), keys.clone(), fence));
        let versions = |routers, oldest| RouterVersions { routers, oldest };
        eventually(&store, &keys, versions(0, None))
            .await
            .expect("empty");
        for (id, v) in [("r1", 4), ("r2", 3)] {
            let ops = vec![put(keys.router(id), router(id, v))];
            store.txn(vec![], ops).await.expect("put");
        }
        eventually(&store, &keys, versions(2, Some(3)))
            .await
            .expect("two");
        let ops = vec![put(keys.router("r2"), router("r2", 4))];
        store.txn(vec![], ops).await.expect("switch");
        eventually(&store, &keys, versions(2, Some(4)))
            .await
            .expect("switched");
        // Another leader: this one's next write fails its fence and it stops.
        let ops = vec![put(keys.election(), b"other".to_vec())];
        store.txn(vec![], ops).await.expect("depose");
        let ops = vec![Op::Delete(keys.router("r1"))];
        store.txn(vec![], ops).await.expect("leave");
        task.await.expect("join").expect("ends without error");
        assert_eq!(summary(&store, &keys).await, Some(versions(2, Some(4))));
    }
}

//! Following the placement as routers and nodes do: from a [`mirror`](super::mirror) of
//! `placement/`, the active and pending records, resolved from the watched
//! [`PlacementWire`] values: a delta applied to the record this follower holds, or, when it
//! lacks the delta's base (it just started, or its mirror re-listed), the whole record read once
//! from `placement-full/`. Each watched value is resolved once (by its revision).

use std::sync::Arc;

use super::mirror::Snapshot;
use super::{MetaStore, StoreError};
use crate::records::wire::{PlacementWire, Resolved, decode_wire};
use crate::records::{self, Keys, PlacementRecord};

/// A slot's new value: this, unchanged, or not resolvable now.
enum Resolve {
    Now(Option<(i64, Resolved)>),
    Same,
    Later,
}

/// The active and pending placements a follower holds.
pub struct PlacementFeed {
    store: Arc<dyn MetaStore>,
    keys: Keys,
    /// (revision of the watched key, record).
    active: Option<(i64, Resolved)>,
    pending: Option<(i64, Resolved)>,
    /// Whole records read because a delta's base was missing.
    pub full_reads: u64,
}

impl PlacementFeed {
    pub fn new(store: Arc<dyn MetaStore>, keys: Keys) -> PlacementFeed {
        PlacementFeed {
            store,
            keys,
            active: None,
            pending: None,
            full_reads: 0,
        }
    }

    /// The active record as of the last [`PlacementFeed::update`].
    pub fn active(&self) -> Option<&Resolved> {
        self.active.as_ref().map(|(_, r)| r)
    }

    /// The pending record as of the last [`PlacementFeed::update`].
    pub fn pending(&self) -> Option<&Resolved> {
        self.pending.as_ref().map(|(_, r)| r)
    }

    /// Brings both records up to `snap`. A record that cannot be resolved now (the store did
    /// not answer) keeps its previous value and is tried again at the next update; returns
    /// whether both are current.
    pub async fn update(&mut self, snap: &Snapshot) -> bool {
        let mut current = true;
        let bases: Vec<Resolved> = [self.active(), self.pending()]
            .into_iter()
            .flatten()
            .cloned()
            .collect();
        let (wire, full) = (self.keys.active(), self.keys.full_active());
        let rev = self.active.as_ref().map(|(r, _)| *r);
        match self.resolve(snap, &wire, &full, rev, &bases).await {
            Resolve::Now(next) => self.active = next,
            Resolve::Same => {}
            Resolve::Later => current = false,
        }
        let mut bases = bases;
        if let Some(a) = self.active() {
            bases.insert(0, a.clone());
        }
        let (wire, full) = (self.keys.pending(), self.keys.full_pending());
        let rev = self.pending.as_ref().map(|(r, _)| *r);
        match self.resolve(snap, &wire, &full, rev, &bases).await {
            Resolve::Now(next) => self.pending = next,
            Resolve::Same => {}
            Resolve::Later => current = false,
        }
        current
    }

    /// One slot's new value.
    async fn resolve(
        &mut self,
        snap: &Snapshot,
        wire_key: &str,
        full_key: &str,
        now: Option<i64>,
        bases: &[Resolved],
    ) -> Resolve {
        let Some(kv) = snap.entries.get(wire_key) else {
            return Resolve::Now(None);
        };
        if now == Some(kv.mod_revision) {
            return Resolve::Same;
        }
        let found = match decode_wire(wire_key, &kv.value) {
            Ok(PlacementWire::Full(rec)) => {
                let legacy = kv.value.first() == Some(&records::FORMAT);
                Some(Resolved {
                    legacy,
                    ..Resolved::new(rec)
                })
            }
            Ok(PlacementWire::Delta(d)) => bases.iter().find_map(|b| d.apply(b)),
            Err(e) => {
                tracing::warn!(error = %e, "skipping a placement record");
                return Resolve::Now(None);
            }
        };
        let found = match found {
            Some(r) => r,
            None => match self.read_full(full_key).await {
                Some(r) => r,
                None => return Resolve::Later,
            },
        };
        Resolve::Now(Some((kv.mod_revision, found)))
    }

    /// The whole record at `key` (`None`: unreadable now; absent is an empty placement slot,
    /// which a later event fills).
    async fn read_full(&mut self, key: &str) -> Option<Resolved> {
        self.full_reads += 1;
        match self.store.get(key).await {
            Ok(Some(kv)) => {
                records::decode_or_skip::<PlacementRecord>(key, &kv.value).map(Resolved::new)
            }
            Ok(None) => None,
            Err(e) => {
                tracing::warn!(%key, error = %e, "cannot read the whole placement");
                None
            }
        }
    }
}

/// Which placement record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    Active,
    Pending,
}

/// The whole `active` or `pending` record, if any and readable: from `placement-full/`, or,
/// where a coordinator of the previous format left it, the format-2 record at the watched key.
pub async fn read_whole(
    store: &dyn MetaStore,
    keys: &Keys,
    slot: Slot,
) -> Result<Option<PlacementRecord>, StoreError> {
    let (full, watched) = match slot {
        Slot::Active => (keys.full_active(), keys.active()),
        Slot::Pending => (keys.full_pending(), keys.pending()),
    };
    if let Some(kv) = store.get(&full).await? {
        return Ok(records::decode_or_skip(&kv.key, &kv.value));
    }
    Ok(store
        .get(&watched)
        .await?
        .and_then(|kv| match decode_wire(&kv.key, &kv.value) {
            Ok(PlacementWire::Full(r)) => Some(r),
            _ => None,
        }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::wire::encode_wire;
    use crate::records::{PlacedNode, encode};
    use crate::store::memory::MemStore;
    use crate::store::mirror::mirror;
    use crate::store::wait_until;

    fn rec(version: u64, nodes: usize) -> Resolved {
        let nodes = (0..nodes)
            .map(|i| PlacedNode {
                id: format!("n{i}"),
                addr: format!("n{i}:1"),
                experts: (0..40u16).map(|e| (3, e * 3 + i as u16)).collect(),
                shares: vec![],
            })
            .collect();
        Resolved::new(PlacementRecord { version, nodes })
    }

    #[tokio::test]
    async fn deltas_apply_to_what_is_held_and_a_newcomer_reads_the_whole_record() {
        let store: Arc<dyn MetaStore> = Arc::new(MemStore::start());
        let keys = Keys::new("t");
        let mut snap = mirror(store.clone(), keys.placement());
        let mut feed = PlacementFeed::new(store.clone(), keys.clone());
        let (a, b) = (rec(1, 20), rec(2, 19));
        let put = |k: String, v: Vec<u8>| {
            let s = store.clone();
            async move { s.put(&k, v, None).await.expect("put") }
        };
        put(keys.full_active(), a.bytes.to_vec()).await;
        let rev = put(keys.active(), encode_wire(&a, None)).await;
        assert!(wait_until(&mut snap, |s| s.revision >= rev).await);
        assert!(feed.update(&snap.borrow_and_update()).await);
        assert_eq!(feed.active().map(|r| r.digest), Some(a.digest));
        // The pending as a delta against the active: no whole-record read.
        put(keys.full_pending(), b.bytes.to_vec()).await;
        let wire = encode_wire(&b, Some(&a));
        assert!(wire.len() * 4 < b.bytes.len(), "{}", wire.len());
        let rev = put(keys.pending(), wire).await;
        assert!(wait_until(&mut snap, |s| s.revision >= rev).await);
        assert!(feed.update(&snap.borrow_and_update()).await);
        assert_eq!(
            feed.pending().map(|r| r.record.clone()),
            Some(b.record.clone())
        );
        assert_eq!(feed.full_reads, 0);
        // Promoted: a few bytes against the pending, applied without a read.
        put(keys.full_active(), b.bytes.to_vec()).await;
        let promote = encode_wire(&b, Some(&b));
        assert!(promote.len() < 64, "{}", promote.len());
        put(keys.active(), promote).await;
        store.delete(&keys.full_pending()).await.expect("delete");
        store.delete(&keys.pending()).await.expect("delete");
        assert!(wait_until(&mut snap, |s| !s.entries.contains_key(&keys.pending())).await);
        assert!(feed.update(&snap.borrow_and_update()).await);
        assert_eq!(feed.active().map(|r| r.digest), Some(b.digest));
        assert!(feed.pending().is_none());
        assert_eq!(feed.full_reads, 0);
        // A newcomer lacks the base: it reads the whole active once.
        let mut fresh = PlacementFeed::new(store.clone(), keys.clone());
        assert!(fresh.update(&snap.borrow()).await);
        assert_eq!(fresh.active().map(|r| r.digest), Some(b.digest));
        assert_eq!(fresh.full_reads, 1);
        // A previous coordinator's format-2 record is taken whole and marked legacy.
        let rev = put(keys.active(), encode(&*a.record)).await;
        assert!(wait_until(&mut snap, |s| s.revision >= rev).await);
        assert!(feed.update(&snap.borrow_and_update()).await);
        assert!(
            feed.active()
                .is_some_and(|r| r.legacy && r.digest == a.digest)
        );
        assert_eq!(
            read_whole(store.as_ref(), &keys, Slot::Active)
                .await
                .expect("read"),
            Some((*b.record).clone())
        );
        assert_eq!(
            read_whole(store.as_ref(), &keys, Slot::Pending)
                .await
                .expect("read"),
            None
        );
    }
}

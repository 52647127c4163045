//! The in-memory store: one process, a revision counter, leases that expire by a clock (real, or
//! simulated in tests: advance it and call [`MemStore::tick`]), and watches fed from a bounded
//! history so that a watch can start at a past revision.
//!
//! It behaves like etcd where the code relies on it: a transaction (and a lease expiry or
//! revoke, which deletes the lease's keys) is one revision, its writes share it; a write that
//! changes nothing (deleting an absent key) takes none; a watch from revision 0 starts now;
//! TTLs are whole seconds, rounded up; a watch from before the compacted (or dropped) history
//! fails with `Compacted`.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use futures::stream::BoxStream;
use tokio::sync::broadcast;

use super::*;

/// Milliseconds since an arbitrary origin.
pub trait Clock: Send + Sync + 'static {
    fn now_ms(&self) -> u64;
}

/// The wall clock.
#[derive(Debug)]
pub struct RealClock(std::time::Instant);

impl Clock for RealClock {
    fn now_ms(&self) -> u64 {
        self.0.elapsed().as_millis() as u64
    }
}

/// A clock tests move by hand.
#[derive(Debug, Default)]
pub struct SimClock(std::sync::atomic::AtomicU64);

impl SimClock {
    /// Moves time forward.
    pub fn advance(&self, d: Duration) {
        self.0
            .fetch_add(d.as_millis() as u64, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Clock for SimClock {
    fn now_ms(&self) -> u64 {
        self.0.load(std::sync::atomic::Ordering::SeqCst)
    }
}

const HISTORY: usize = 16_384;

#[derive(Default)]
struct State {
    revision: i64,
    kv: BTreeMap<String, KeyValue>,
    leases: HashMap<LeaseId, (u64, u64)>, // id → (ttl ms, deadline ms)
    next_lease: LeaseId,
    history: VecDeque<(i64, WatchEvent)>,
    /// Revisions at or below this were compacted away.
    compacted: i64,
}

/// The in-memory store (cheap to clone; clones share state).
#[derive(Clone)]
pub struct MemStore {
    state: Arc<Mutex<State>>,
    /// Every change, shared: a watcher clones only the events under its prefix.
    events: broadcast::Sender<Arc<(i64, WatchEvent)>>,
    clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for MemStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemStore").finish()
    }
}

impl MemStore {
    /// A store on the wall clock; spawns a task that expires leases (needs a tokio runtime).
    pub fn start() -> MemStore {
        let store = MemStore::with_clock(Arc::new(RealClock(std::time::Instant::now())));
        let (weak, events, clock) = (
            Arc::downgrade(&store.state),
            store.events.clone(),
            store.clock.clone(),
        );
        tokio::spawn(async move {
            let mut iv = tokio::time::interval(Duration::from_millis(50));
            loop {
                iv.tick().await;
                let Some(state) = weak.upgrade() else { return };
                MemStore {
                    state,
                    events: events.clone(),
                    clock: clock.clone(),
                }
                .tick();
            }
        });
        store
    }

    /// A store on `clock` (tests: a [`SimClock`]); call [`MemStore::tick`] to expire leases.
    pub fn with_clock(clock: Arc<dyn Clock>) -> MemStore {
        let (events, _) = broadcast::channel(HISTORY);
        MemStore {
            state: Arc::new(Mutex::new(State {
                next_lease: 1,
                ..Default::default()
            })),
            events,
            clock,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the maps half-updated in a way later
        // operations would trip on; keep serving.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn emit(&self, st: &mut State, ev: WatchEvent) {
        st.history.push_back((st.revision, ev.clone()));
        if st.history.len() > HISTORY
            && let Some((r, _)) = st.history.pop_front()
        {
            // Drop the rest of that revision too: a watch sees a revision whole or not at all.
            st.compacted = st.compacted.max(r);
            while st.history.front().is_some_and(|(f, _)| *f <= r) {
                st.history.pop_front();
            }
        }
        let _ = self.events.send(Arc::new((st.revision, ev)));
    }

    /// Applies `ops` as one revision (none if nothing changes), as an etcd transaction does.
    fn apply(&self, st: &mut State, ops: Vec<Op>) {
        let rev = st.revision + 1;
        let mut changed = false;
        for op in ops {
            match op {
                Op::Put { key, value, lease } => {
                    let kv = KeyValue {
                        key: key.clone(),
                        value,
                        mod_revision: rev,
                        lease: lease.unwrap_or(0),
                    };
                    st.kv.insert(key, kv.clone());
                    changed = true;
                    st.revision = rev;
                    self.emit(st, WatchEvent::Put(kv));
                }
                Op::Delete(key) => {
                    if st.kv.remove(&key).is_some() {
                        changed = true;
                        st.revision = rev;
                        self.emit(st, WatchEvent::Delete { key, revision: rev });
                    }
                }
            }
        }
        if changed {
            st.revision = rev;
        }
    }

    fn holds(st: &State, c: &Compare) -> bool {
        match c {
            Compare::Absent(k) => !st.kv.contains_key(k),
            Compare::Value(k, v) => st.kv.get(k).is_some_and(|kv| &kv.value == v),
            Compare::ModRevision(k, r) => st.kv.get(k).map_or(0, |kv| kv.mod_revision) == *r,
        }
    }

    /// Expires every lease whose deadline has passed, deleting its keys.
    pub fn tick(&self) {
        let now = self.clock.now_ms();
        let mut st = self.lock();
        let expired: Vec<LeaseId> = st
            .leases
            .iter()
            .filter(|(_, (_, d))| *d <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            self.drop_lease(&mut st, id);
        }
    }

    fn drop_lease(&self, st: &mut State, id: LeaseId) {
        st.leases.remove(&id);
        let keys: Vec<String> = st
            .kv
            .values()
            .filter(|kv| kv.lease == id)
            .map(|kv| kv.key.clone())
            .collect();
        self.apply(st, keys.into_iter().map(Op::Delete).collect());
    }
}

impl MetaStore for MemStore {
    fn get(&self, key: &str) -> BoxFut<'_, Result<Option<KeyValue>>> {
        let r = self.lock().kv.get(key).cloned();
        Box::pin(async move { Ok(r) })
    }

    fn list(&self, prefix: &str) -> BoxFut<'_, Result<(Vec<KeyValue>, i64)>> {
        let st = self.lock();
        let r = (
            st.kv
                .range(prefix.to_string()..)
                .take_while(|(k, _)| k.starts_with(prefix))
                .map(|(_, v)| v.clone())
                .collect(),
            st.revision,
        );
        Box::pin(async move { Ok(r) })
    }

    fn put(&self, key: &str, value: Vec<u8>, lease: Option<LeaseId>) -> BoxFut<'_, Result<i64>> {
        let mut st = self.lock();
        let r = match lease {
            Some(l) if !st.leases.contains_key(&l) => Err(StoreError::LeaseGone(l)),
            _ => {
                self.apply(
                    &mut st,
                    vec![Op::Put {
                        key: key.to_string(),
                        value,
                        lease,
                    }],
                );
                Ok(st.revision)
            }
        };
        Box::pin(async move { r })
    }

    fn delete(&self, key: &str) -> BoxFut<'_, Result<()>> {
        let mut st = self.lock();
        self.apply(&mut st, vec![Op::Delete(key.to_string())]);
        Box::pin(async { Ok(()) })
    }

    fn txn(&self, compares: Vec<Compare>, ops: Vec<Op>) -> BoxFut<'_, Result<bool>> {
        let mut st = self.lock();
        let ok = compares.iter().all(|c| Self::holds(&st, c));
        let r = match ops.iter().find_map(|o| match o {
            Op::Put { lease: Some(l), .. } if !st.leases.contains_key(l) => Some(*l),
            _ => None,
        }) {
            // etcd refuses a transaction that puts under a missing lease (NotFound).
            Some(l) if ok => Err(StoreError::LeaseGone(l)),
            _ => {
                if ok {
                    self.apply(&mut st, ops);
                }
                Ok(ok)
            }
        };
        Box::pin(async move { r })
    }

    fn grant(&self, ttl: Duration) -> BoxFut<'_, Result<LeaseId>> {
        let now = self.clock.now_ms();
        let mut st = self.lock();
        let id = st.next_lease;
        st.next_lease += 1;
        let ms = super::etcd::ttl_secs(ttl) as u64 * 1000;
        st.leases.insert(id, (ms, now + ms));
        Box::pin(async move { Ok(id) })
    }

    fn keep_alive(&self, lease: LeaseId) -> BoxFut<'_, Result<()>> {
        let now = self.clock.now_ms();
        let mut st = self.lock();
        let r = match st.leases.get_mut(&lease) {
            Some((ttl, deadline)) if *deadline > now => {
                *deadline = now + *ttl;
                Ok(())
            }
            _ => Err(StoreError::LeaseGone(lease)),
        };
        Box::pin(async move { r })
    }

    fn revoke(&self, lease: LeaseId) -> BoxFut<'_, Result<()>> {
        let mut st = self.lock();
        self.drop_lease(&mut st, lease);
        Box::pin(async { Ok(()) })
    }

    fn compact(&self, revision: i64) -> BoxFut<'_, Result<()>> {
        let mut st = self.lock();
        let r = if revision > st.revision {
            Err(StoreError::Unavailable(format!(
                "compaction at {revision} is beyond the current revision {}",
                st.revision
            )))
        } else {
            // etcd keeps the compaction revision itself readable: history from `revision` on.
            st.compacted = st.compacted.max(revision - 1);
            let keep = st.compacted;
            st.history.retain(|(r, _)| *r > keep);
            Ok(())
        };
        Box::pin(async move { r })
    }

    fn watch(
        &self,
        prefix: &str,
        from_revision: i64,
    ) -> BoxFut<'_, Result<BoxStream<'static, Result<WatchEvent>>>> {
        let st = self.lock();
        let rx = self.events.subscribe();
        let r = if from_revision > 0 && from_revision <= st.compacted {
            Err(StoreError::Compacted(st.compacted + 1))
        } else {
            // Revision 0: from now on, as etcd.
            let from = if from_revision > 0 {
                from_revision
            } else {
                st.revision + 1
            };
            let past: Vec<(i64, WatchEvent)> = st
                .history
                .iter()
                .filter(|(r, _)| *r >= from)
                .cloned()
                .collect();
            let last = st.revision;
            let prefix = prefix.to_string();
            let p2 = prefix.clone();
            let live = tokio_stream::wrappers::BroadcastStream::new(rx).filter_map(move |r| {
                let prefix = prefix.clone();
                async move {
                    match r {
                        Ok(e) if e.0 > last && key_of(&e.1).starts_with(&prefix) => {
                            Some(Ok(e.1.clone()))
                        }
                        Ok(_) => None,
                        // Fell behind the broadcast buffer: end with an error; callers re-list.
                        Err(_) => Some(Err(StoreError::Compacted(last))),
                    }
                }
            });
            let past = futures::stream::iter(
                past.into_iter()
                    .filter(move |(_, e)| key_of(e).starts_with(&p2))
                    .map(|(_, e)| Ok(e)),
            );
            Ok(past.chain(live).boxed())
        };
        Box::pin(async move { r })
    }
}

fn key_of(ev: &WatchEvent) -> &str {
    match ev {
        WatchEvent::Put(kv) => &kv.key,
        WatchEvent::Delete { key, .. } => key,
    }
}

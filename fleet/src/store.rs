//! A counting wrapper around any [`MetaStore`] (the simulator wraps the in-memory one): it counts
//! what a real etcd would carry for the fleet (write requests and their bytes, watch events and
//! their bytes as delivered to each watcher, the largest value and the largest list answer) and
//! keeps etcd's limits as the chart configures them:
//!
//! - `--max-request-bytes` (etcd's default, 1.5 MiB): a write request larger than it is refused
//!   (etcd answers `etcdserver: request is too large`; `EtcdStore` maps it to `Unavailable`);
//! - `--quota-backend-bytes` (2 GiB in `helm/moe-cluster/values.yaml`) with
//!   `--auto-compaction-mode=periodic --auto-compaction-retention=1h`: the history etcd keeps is
//!   modelled as every byte written within the retention, and a write that would take it past
//!   the quota is refused (`mvcc: database space exceeded`, etcd's NOSPACE alarm).
//!
//! The quota model is an estimate: etcd's backend also holds the live keys written before the
//! retention and bbolt's page overhead, and it is compacted in steps rather than continuously.
//! Lease expiries delete keys inside the inner store; their watch events are counted, their
//! deletes are not counted as write requests (etcd's lessor revokes them, no client writes).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use futures::stream::BoxStream;
use moe_meta::store::{
    BoxFut, Compare, KeyValue, LeaseId, MetaStore, Op, Result, StoreError, WatchEvent,
};
use tokio::time::Instant;

/// etcd's limits, as the docs and chart configure them.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest write request (etcd's `--max-request-bytes`, default 1.5 MiB).
    pub max_request_bytes: u64,
    /// Backend quota (`--quota-backend-bytes`, the chart's 2 GiB).
    pub quota_bytes: u64,
    /// History kept by periodic auto-compaction (the chart's `1h`).
    pub retention: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_request_bytes: 1536 * 1024,
            quota_bytes: 2 << 30,
            retention: Duration::from_secs(3600),
        }
    }
}

/// What the store has carried so far (every field a running total, except the maxima).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Counts {
    /// Write requests applied: puts, deletes, transactions that wrote.
    pub writes: u64,
    /// Key and value bytes of those writes.
    pub bytes_written: u64,
    /// Watch events delivered, summed over watchers.
    pub events_delivered: u64,
    /// Key and value bytes of those events, summed over watchers.
    pub bytes_delivered: u64,
    /// Largest value written.
    pub largest_value_bytes: u64,
    /// Largest list answer (key and value bytes): what a client's decode limit must allow.
    pub largest_list_bytes: u64,
    /// Gets and lists answered, and their key and value bytes (what readers pull rather than
    /// watch: the whole placement read by a process that lacks a delta's base, re-lists).
    pub reads: u64,
    pub bytes_read: u64,
    /// Lease refreshes (not writes to the key space).
    pub keep_alives: u64,
    /// Writes refused for size (`--max-request-bytes`).
    pub refused_too_large: u64,
    /// Writes refused for the quota (NOSPACE).
    pub refused_no_space: u64,
    /// Most history held within the retention, bytes.
    pub peak_history_bytes: u64,
}

impl Counts {
    /// What was carried between `before` and `self` (maxima: the later value, which covers
    /// the interval when the maxima were reset at its start).
    pub fn since(&self, before: &Counts) -> Counts {
        Counts {
            writes: self.writes - before.writes,
            bytes_written: self.bytes_written - before.bytes_written,
            events_delivered: self.events_delivered - before.events_delivered,
            bytes_delivered: self.bytes_delivered - before.bytes_delivered,
            largest_value_bytes: self.largest_value_bytes,
            largest_list_bytes: self.largest_list_bytes,
            reads: self.reads - before.reads,
            bytes_read: self.bytes_read - before.bytes_read,
            keep_alives: self.keep_alives - before.keep_alives,
            refused_too_large: self.refused_too_large - before.refused_too_large,
            refused_no_space: self.refused_no_space - before.refused_no_space,
            peak_history_bytes: self.peak_history_bytes,
        }
    }
}

#[derive(Debug, Default)]
struct Counters {
    writes: AtomicU64,
    bytes_written: AtomicU64,
    events_delivered: AtomicU64,
    bytes_delivered: AtomicU64,
    largest_value: AtomicU64,
    largest_list: AtomicU64,
    reads: AtomicU64,
    bytes_read: AtomicU64,
    keep_alives: AtomicU64,
    too_large: AtomicU64,
    no_space: AtomicU64,
    peak_history: AtomicU64,
}

/// Bytes written within the retention, oldest first.
#[derive(Debug, Default)]
struct History {
    log: VecDeque<(Instant, u64)>,
    bytes: u64,
}

/// The counting store (cheap to clone; clones share counters).
#[derive(Clone)]
pub struct CountingStore {
    inner: Arc<dyn MetaStore>,
    limits: Limits,
    counters: Arc<Counters>,
    history: Arc<Mutex<History>>,
}

impl std::fmt::Debug for CountingStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CountingStore")
            .field("counts", &self.counts())
            .finish()
    }
}

fn put_bytes(key: &str, value: &[u8]) -> u64 {
    (key.len() + value.len()) as u64
}

fn event_bytes(ev: &WatchEvent) -> u64 {
    match ev {
        WatchEvent::Put(kv) => put_bytes(&kv.key, &kv.value),
        WatchEvent::Delete { key, .. } => key.len() as u64,
    }
}

impl CountingStore {
    /// Counts what goes through to `inner`, under `limits`.
    pub fn new(inner: Arc<dyn MetaStore>, limits: Limits) -> CountingStore {
        CountingStore {
            inner,
            limits,
            counters: Arc::default(),
            history: Arc::default(),
        }
    }

    /// The totals so far.
    pub fn counts(&self) -> Counts {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Counts {
            writes: get(&c.writes),
            bytes_written: get(&c.bytes_written),
            events_delivered: get(&c.events_delivered),
            bytes_delivered: get(&c.bytes_delivered),
            largest_value_bytes: get(&c.largest_value),
            largest_list_bytes: get(&c.largest_list),
            reads: get(&c.reads),
            bytes_read: get(&c.bytes_read),
            keep_alives: get(&c.keep_alives),
            refused_too_large: get(&c.too_large),
            refused_no_space: get(&c.no_space),
            peak_history_bytes: get(&c.peak_history),
        }
    }

    /// Starts the largest-value and largest-list maxima over (at a scenario's start).
    pub fn reset_maxima(&self) {
        self.counters.largest_value.store(0, Ordering::Relaxed);
        self.counters.largest_list.store(0, Ordering::Relaxed);
    }

    /// Checks a write of `request` bytes (the largest value in it: `largest`) against the
    /// limits; on success counts it.
    fn admit(&self, request: u64, largest: u64) -> Result<()> {
        if request > self.limits.max_request_bytes {
            self.counters.too_large.fetch_add(1, Ordering::Relaxed);
            return Err(StoreError::Unavailable(format!(
                "etcdserver: request is too large ({request} bytes, limit {})",
                self.limits.max_request_bytes
            )));
        }
        let now = Instant::now();
        let mut h = self.history.lock().unwrap_or_else(|p| p.into_inner());
        while let Some(&(t, b)) = h.log.front() {
            if now.duration_since(t) < self.limits.retention {
                break;
            }
            h.log.pop_front();
            h.bytes -= b;
        }
        if h.bytes + request > self.limits.quota_bytes {
            self.counters.no_space.fetch_add(1, Ordering::Relaxed);
            return Err(StoreError::Unavailable(
                "etcdserver: mvcc: database space exceeded".into(),
            ));
        }
        h.log.push_back((now, request));
        h.bytes += request;
        self.counters
            .peak_history
            .fetch_max(h.bytes, Ordering::Relaxed);
        drop(h);
        self.counters.writes.fetch_add(1, Ordering::Relaxed);
        self.counters
            .bytes_written
            .fetch_add(request, Ordering::Relaxed);
        self.counters
            .largest_value
            .fetch_max(largest, Ordering::Relaxed);
        Ok(())
    }
}

impl MetaStore for CountingStore {
    fn get(&self, key: &str) -> BoxFut<'_, Result<Option<KeyValue>>> {
        let key = key.to_string();
        Box::pin(async move {
            let r = self.inner.get(&key).await?;
            let bytes = r.as_ref().map_or(0, |kv| put_bytes(&kv.key, &kv.value));
            self.counters.reads.fetch_add(1, Ordering::Relaxed);
            self.counters.bytes_read.fetch_add(bytes, Ordering::Relaxed);
            Ok(r)
        })
    }

    fn list(&self, prefix: &str) -> BoxFut<'_, Result<(Vec<KeyValue>, i64)>> {
        let prefix = prefix.to_string();
        Box::pin(async move {
            let r = self.inner.list(&prefix).await?;
            let bytes: u64 = r.0.iter().map(|kv| put_bytes(&kv.key, &kv.value)).sum();
            self.counters
                .largest_list
                .fetch_max(bytes, Ordering::Relaxed);
            self.counters.reads.fetch_add(1, Ordering::Relaxed);
            self.counters.bytes_read.fetch_add(bytes, Ordering::Relaxed);
            Ok(r)
        })
    }

    fn put(&self, key: &str, value: Vec<u8>, lease: Option<LeaseId>) -> BoxFut<'_, Result<i64>> {
        if let Err(e) = self.admit(put_bytes(key, &value), value.len() as u64) {
            return Box::pin(async move { Err(e) });
        }
        self.inner.put(key, value, lease)
    }

    fn delete(&self, key: &str) -> BoxFut<'_, Result<()>> {
        if let Err(e) = self.admit(key.len() as u64, 0) {
            return Box::pin(async move { Err(e) });
        }
        self.inner.delete(key)
    }

    fn txn(&self, compares: Vec<Compare>, ops: Vec<Op>) -> BoxFut<'_, Result<bool>> {
        let mut request = 0u64;
        let mut largest = 0u64;
        for c in &compares {
            request += match c {
                Compare::Absent(k) | Compare::ModRevision(k, _) => k.len() as u64,
                Compare::Value(k, v) => put_bytes(k, v),
            };
        }
        for op in &ops {
            match op {
                Op::Put { key, value, .. } => {
                    request += put_bytes(key, value);
                    largest = largest.max(value.len() as u64);
                }
                Op::Delete(key) => request += key.len() as u64,
            }
        }
        if let Err(e) = self.admit(request, largest) {
            return Box::pin(async move { Err(e) });
        }
        self.inner.txn(compares, ops)
    }

    fn grant(&self, ttl: Duration) -> BoxFut<'_, Result<LeaseId>> {
        self.inner.grant(ttl)
    }

    fn keep_alive(&self, lease: LeaseId) -> BoxFut<'_, Result<()>> {
        self.counters.keep_alives.fetch_add(1, Ordering::Relaxed);
        self.inner.keep_alive(lease)
    }

    fn revoke(&self, lease: LeaseId) -> BoxFut<'_, Result<()>> {
        self.inner.revoke(lease)
    }

    fn compact(&self, revision: i64) -> BoxFut<'_, Result<()>> {
        self.inner.compact(revision)
    }

    fn watch(
        &self,
        prefix: &str,
        from_revision: i64,
    ) -> BoxFut<'_, Result<BoxStream<'static, Result<WatchEvent>>>> {
        let prefix = prefix.to_string();
        let counters = self.counters.clone();
        Box::pin(async move {
            let events = self.inner.watch(&prefix, from_revision).await?;
            Ok(events
                .inspect(move |ev| {
                    if let Ok(ev) = ev {
                        counters.events_delivered.fetch_add(1, Ordering::Relaxed);
                        counters
                            .bytes_delivered
                            .fetch_add(event_bytes(ev), Ordering::Relaxed);
                    }
                })
                .boxed())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use moe_meta::store::memory::{MemStore, SimClock};

    fn store(limits: Limits) -> (CountingStore, MemStore) {
        let mem = MemStore::with_clock(Arc::new(SimClock::default()));
        (CountingStore::new(Arc::new(mem.clone()), limits), mem)
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn counts_writes_and_deliveries_per_watcher() {
        let (s, _) = store(Limits::default());
        let mut a = s.watch("a/", 0).await.expect("watch");
        let mut b = s.watch("a/", 0).await.expect("watch");
        s.put("a/1", vec![0; 10], None).await.expect("put");
        s.put("b/1", vec![0; 100], None).await.expect("put");
        assert!(a.next().await.is_some() && b.next().await.is_some());
        let c = s.counts();
        assert_eq!((c.writes, c.bytes_written), (2, 3 + 10 + 3 + 100));
        assert_eq!(c.largest_value_bytes, 100);
        // Two watchers of `a/` got one event each; nobody watches `b/`.
        assert_eq!((c.events_delivered, c.bytes_delivered), (2, 2 * 13));
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn refuses_large_requests_and_a_full_quota_until_history_ages_out() {
        let limits = Limits {
            max_request_bytes: 100,
            quota_bytes: 250,
            retention: Duration::from_secs(60),
        };
        let (s, mem) = store(limits);
        assert!(s.put("k", vec![0; 100], None).await.is_err(), "101 bytes");
        assert!(s.put("k", vec![0; 99], None).await.is_ok());
        assert!(s.put("k", vec![0; 99], None).await.is_ok());
        assert!(s.put("k", vec![0; 99], None).await.is_err(), "quota");
        assert_eq!(
            mem.get("k").await.expect("get").map(|kv| kv.value.len()),
            Some(99)
        );
        let c = s.counts();
        assert_eq!(
            (c.refused_too_large, c.refused_no_space, c.writes),
            (1, 1, 2)
        );
        tokio::time::advance(Duration::from_secs(61)).await;
        assert!(s.put("k", vec![0; 99], None).await.is_ok(), "compacted");
    }
}

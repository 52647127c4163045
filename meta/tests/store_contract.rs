//! The store contract, checked against both implementations: the in-memory store and a real etcd
//! on loopback.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use moe_meta::store::election::{campaign, leader};
use moe_meta::store::etcd::EtcdStore;
use moe_meta::store::memory::MemStore;
use moe_meta::store::mirror::mirror;
use moe_meta::store::{Compare, MetaStore, Op, StoreError, WatchEvent};
use moe_meta::testing::EtcdProcess;

async fn contract(store: Arc<dyn MetaStore>) {
    // put / get / list / delete
    store.put("/t/a", b"1".to_vec(), None).await.expect("put");
    store.put("/t/b", b"2".to_vec(), None).await.expect("put");
    store.put("/u/c", b"3".to_vec(), None).await.expect("put");
    assert_eq!(
        store
            .get("/t/a")
            .await
            .expect("get")
            .expect("present")
            .value,
        b"1"
    );
    let (list, rev) = store.list("/t/").await.expect("list");
    assert_eq!(
        list.iter().map(|kv| kv.key.as_str()).collect::<Vec<_>>(),
        vec!["/t/a", "/t/b"]
    );
    assert!(rev > 0);
    // watch from the listed revision + 1 sees later changes under the prefix only
    let mut w = store.watch("/t/", rev + 1).await.expect("watch");
    store.put("/u/d", b"x".to_vec(), None).await.expect("put");
    store.delete("/t/a").await.expect("delete");
    store.put("/t/c", b"4".to_vec(), None).await.expect("put");
    assert!(
        matches!(w.next().await, Some(Ok(WatchEvent::Delete { ref key, .. })) if key == "/t/a")
    );
    assert!(
        matches!(w.next().await, Some(Ok(WatchEvent::Put(ref kv))) if kv.key == "/t/c" && kv.value == b"4")
    );
    // compare-and-swap
    let cur = store.get("/t/b").await.expect("get").expect("present");
    assert!(
        !store
            .txn(
                vec![Compare::Absent("/t/b".into())],
                vec![Op::Delete("/t/b".into())]
            )
            .await
            .expect("txn")
    );
    assert!(
        store
            .txn(
                vec![Compare::ModRevision("/t/b".into(), cur.mod_revision)],
                vec![Op::Put {
                    key: "/t/b".into(),
                    value: b"5".to_vec(),
                    lease: None
                }]
            )
            .await
            .expect("txn")
    );
    assert!(
        !store
            .txn(
                vec![Compare::ModRevision("/t/b".into(), cur.mod_revision)],
                vec![Op::Put {
                    key: "/t/b".into(),
                    value: b"6".to_vec(),
                    lease: None
                }]
            )
            .await
            .expect("txn")
    );
    assert!(
        store
            .txn(vec![Compare::Value("/t/b".into(), b"5".to_vec())], vec![])
            .await
            .expect("txn")
    );
    // leases: keys vanish with a revoked lease; a gone lease cannot be refreshed
    let lease = store.grant(Duration::from_secs(5)).await.expect("grant");
    store
        .put("/t/leased", b"x".to_vec(), Some(lease))
        .await
        .expect("put");
    store.keep_alive(lease).await.expect("alive");
    store.revoke(lease).await.expect("revoke");
    assert!(store.get("/t/leased").await.expect("get").is_none());
    let r = store.keep_alive(lease).await;
    assert!(matches!(r, Err(StoreError::LeaseGone(_))), "{r:?}");
    // election: the second candidate waits until the first resigns
    let l1 = store.grant(Duration::from_secs(5)).await.expect("grant");
    let l2 = store.grant(Duration::from_secs(5)).await.expect("grant");
    let first = campaign(store.clone(), "/t/election", "one", l1)
        .await
        .expect("leads");
    let s2 = store.clone();
    let second = tokio::spawn(async move { campaign(s2, "/t/election", "two", l2).await });
    assert_eq!(
        leader(store.as_ref(), "/t/election")
            .await
            .expect("leader")
            .as_deref(),
        Some("one")
    );
    // a write fenced on the first leadership succeeds, then fails once it resigned
    assert!(
        store
            .txn(
                vec![first.fence()],
                vec![Op::Put {
                    key: "/t/x".into(),
                    value: vec![1],
                    lease: None
                }]
            )
            .await
            .expect("txn")
    );
    first.resign(store.as_ref()).await.expect("resign");
    let second = second.await.expect("join").expect("second leads");
    assert_eq!(second.id, "two");
    assert!(
        !store
            .txn(vec![first.fence()], vec![Op::Delete("/t/x".into())])
            .await
            .expect("txn"),
        "deposed leader is fenced"
    );
    one_revision_per_txn(store.as_ref()).await;
    large_prefix(store.as_ref()).await;
    watch_from_now(store.as_ref()).await;
    compaction(store.as_ref()).await;
    lease_expiry(store.as_ref()).await;
    // mirror: follows changes
    let mut m = mirror(store.clone(), "/t/".into());
    m.wait_for(|s| s.revision > 0 && s.entries.contains_key("/t/b"))
        .await
        .expect("synced");
    store.put("/t/z", b"9".to_vec(), None).await.expect("put");
    m.wait_for(|s| s.entries.contains_key("/t/z"))
        .await
        .expect("mirrored");
}

/// A prefix larger than gRPC's default 4 MiB decode limit lists and watches whole (at fleet size
/// the coordinator's `load/` list is ~4 MiB: 64 routers × 66 KiB at 384 experts).
async fn large_prefix(store: &dyn MetaStore) {
    let value = |i: usize| vec![b'a' + i as u8; 1 << 20];
    let mut w = store.watch("/big/", 0).await.expect("watch");
    for i in 0..6 {
        store
            .put(&format!("/big/{i}"), value(i), None)
            .await
            .expect("a 1 MiB put");
    }
    let (list, _) = store.list("/big/").await.expect("a 6 MiB list");
    assert_eq!(list.len(), 6);
    assert!(list.iter().enumerate().all(|(i, kv)| kv.value == value(i)));
    for i in 0..6 {
        match w.next().await {
            Some(Ok(WatchEvent::Put(kv))) => assert_eq!(kv.value, value(i)),
            other => panic!("watch event {i}: {other:?}"),
        }
    }
    for i in 0..6 {
        store.delete(&format!("/big/{i}")).await.expect("delete");
    }
}

/// A transaction's writes share one revision; a delete of an absent key takes none.
async fn one_revision_per_txn(store: &dyn MetaStore) {
    let put = |k: &str| Op::Put {
        key: k.into(),
        value: b"t".to_vec(),
        lease: None,
    };
    let (_, before) = store.list("/r/").await.expect("list");
    assert!(
        store
            .txn(
                vec![],
                vec![put("/r/a"), put("/r/b"), Op::Delete("/r/none".into())]
            )
            .await
            .expect("txn")
    );
    let (kvs, after) = store.list("/r/").await.expect("list");
    assert_eq!(after, before + 1, "one txn, one revision");
    assert!(kvs.iter().all(|kv| kv.mod_revision == after), "{kvs:?}");
    store.delete("/r/none").await.expect("delete");
    assert_eq!(store.list("/r/").await.expect("list").1, after);
}

/// A watch from revision 0 starts now: earlier changes are not replayed.
async fn watch_from_now(store: &dyn MetaStore) {
    store.put("/w/old", b"o".to_vec(), None).await.expect("put");
    let mut w = store.watch("/w/", 0).await.expect("watch");
    store.put("/w/new", b"n".to_vec(), None).await.expect("put");
    let ev = tokio::time::timeout(Duration::from_secs(5), w.next()).await;
    assert!(
        matches!(ev, Ok(Some(Ok(WatchEvent::Put(ref kv)))) if kv.key == "/w/new"),
        "{ev:?}"
    );
}

/// A watch from before a compaction fails with `Compacted` (when opened, or as its first item).
async fn compaction(store: &dyn MetaStore) {
    let r1 = store.put("/c/a", vec![1], None).await.expect("put");
    let r2 = store.put("/c/a", vec![2], None).await.expect("put");
    store.put("/c/a", vec![3], None).await.expect("put");
    // History from r1 on is still there.
    let mut w = store.watch("/c/", r1).await.expect("watch");
    let ev = tokio::time::timeout(Duration::from_secs(5), w.next()).await;
    assert!(
        matches!(ev, Ok(Some(Ok(WatchEvent::Put(ref kv)))) if kv.value == [1]),
        "{ev:?}"
    );
    store.compact(r2).await.expect("compact");
    let first = match store.watch("/c/", r1).await {
        Err(e) => Err(e),
        Ok(mut w) => tokio::time::timeout(Duration::from_secs(5), w.next())
            .await
            .expect("an answer")
            .expect("an item"),
    };
    assert!(
        matches!(first, Err(StoreError::Compacted(r)) if r == r2),
        "{first:?}"
    );
    // From the compaction revision itself it still works.
    let mut w = store.watch("/c/", r2).await.expect("watch");
    let ev = tokio::time::timeout(Duration::from_secs(5), w.next()).await;
    assert!(
        matches!(ev, Ok(Some(Ok(WatchEvent::Put(ref kv)))) if kv.value == [2]),
        "{ev:?}"
    );
}

/// A lease nobody refreshes expires on its own (whole seconds, as etcd grants; etcd raises
/// short TTLs to its minimum), taking its keys; then it cannot be refreshed.
async fn lease_expiry(store: &dyn MetaStore) {
    let lease = store.grant(Duration::from_millis(1)).await.expect("grant");
    store
        .put("/e/k", b"x".to_vec(), Some(lease))
        .await
        .expect("put");
    let mut w = store.watch("/e/", 0).await.expect("watch");
    let t0 = std::time::Instant::now();
    let ev = tokio::time::timeout(Duration::from_secs(10), w.next()).await;
    assert!(
        matches!(ev, Ok(Some(Ok(WatchEvent::Delete { ref key, .. }))) if key == "/e/k"),
        "{ev:?}"
    );
    assert!(
        t0.elapsed() >= Duration::from_millis(500),
        "a lease lives at least its whole-second TTL: {:?}",
        t0.elapsed()
    );
    let r = store.keep_alive(lease).await;
    assert!(matches!(r, Err(StoreError::LeaseGone(_))), "{r:?}");
    let r = store.put("/e/k2", vec![1], Some(lease)).await;
    assert!(matches!(r, Err(StoreError::LeaseGone(_))), "{r:?}");
}

#[tokio::test]
async fn memory_ttls_are_whole_seconds_rounded_up() {
    let clock = Arc::new(moe_meta::store::memory::SimClock::default());
    let store = MemStore::with_clock(clock.clone());
    let lease = store
        .grant(Duration::from_millis(1500))
        .await
        .expect("grant");
    store.put("/s/a", vec![1], Some(lease)).await.expect("put");
    clock.advance(Duration::from_millis(1900));
    store.tick();
    assert!(
        store.get("/s/a").await.expect("get").is_some(),
        "granted 2 s"
    );
    clock.advance(Duration::from_millis(200));
    store.tick();
    assert!(store.get("/s/a").await.expect("get").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_store_keeps_the_contract() {
    contract(Arc::new(MemStore::start())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_store_keeps_the_contract() {
    let etcd = EtcdProcess::start();
    let store = EtcdStore::connect(&etcd.url()).await.expect("connects");
    contract(Arc::new(store)).await;
}

#[tokio::test]
async fn memory_leases_expire_by_the_simulated_clock() {
    let clock = Arc::new(moe_meta::store::memory::SimClock::default());
    let store = MemStore::with_clock(clock.clone());
    let lease = store.grant(Duration::from_secs(3)).await.expect("grant");
    store.put("/n/a", vec![1], Some(lease)).await.expect("put");
    clock.advance(Duration::from_secs(2));
    store.keep_alive(lease).await.expect("refreshed in time");
    clock.advance(Duration::from_secs(2));
    store.tick();
    assert!(
        store.get("/n/a").await.expect("get").is_some(),
        "the refresh moved the deadline"
    );
    clock.advance(Duration::from_secs(2));
    store.tick();
    assert!(
        store.get("/n/a").await.expect("get").is_none(),
        "expired with its lease"
    );
    assert!(matches!(
        store.keep_alive(lease).await,
        Err(StoreError::LeaseGone(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mirror_survives_an_etcd_restart_without_ghosts() {
    let mut etcd = EtcdProcess::start();
    let store: Arc<dyn MetaStore> =
        Arc::new(EtcdStore::connect(&etcd.url()).await.expect("connects"));
    store.put("/g/a", vec![1], None).await.expect("put");
    store.put("/g/b", vec![2], None).await.expect("put");
    let mut m = mirror(store.clone(), "/g/".into());
    m.wait_for(|s| s.entries.len() == 2).await.expect("synced");
    etcd.kill();
    etcd.restart();
    // While the mirror was disconnected `b` went away and `c` came.
    let again = EtcdStore::connect(&etcd.url()).await.expect("reconnects");
    again.delete("/g/b").await.expect("delete");
    again.put("/g/c", vec![3], None).await.expect("put");
    let snap = tokio::time::timeout(
        Duration::from_secs(20),
        m.wait_for(|s| s.entries.contains_key("/g/c")),
    )
    .await
    .expect("the mirror recovers")
    .expect("open")
    .clone();
    assert!(
        !snap.entries.contains_key("/g/b"),
        "no ghost of the deleted key"
    );
}

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

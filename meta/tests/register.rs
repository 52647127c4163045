//! The one membership loop ([`hold`]) and id claims ([`claim`]) on the in-memory store: a failed
//! term runs again under the same lease, a lost lease means a new one, a shutdown revokes, and
//! an id held by another live lease is refused once the patience runs out (but taken over when
//! the holder's lease expires in time).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use moe_meta::store::MetaStore;
use moe_meta::store::lease::LeaseKeeper;
use moe_meta::store::memory::MemStore;
use moe_meta::store::register::{TermError, claim, hold};
use tokio::sync::watch;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_term_keeps_its_lease_and_a_lost_lease_registers_again() {
    let store: Arc<dyn MetaStore> = Arc::new(MemStore::start());
    let (stop, stopped) = watch::channel(false);
    // (lease, reregistrations) of every term run.
    let terms: Arc<Mutex<Vec<(i64, u64)>>> = Arc::default();
    let t = terms.clone();
    let s = store.clone();
    let task = tokio::spawn(async move {
        hold(
            s.clone(),
            "router-test",
            Duration::from_secs(1),
            stopped,
            move |term| {
                let (t, s) = (t.clone(), s.clone());
                async move {
                    let n = {
                        let mut t = t.lock().expect("lock");
                        t.push((term.lease, term.reregistrations));
                        t.len()
                    };
                    s.put("/reg/me", vec![1], Some(term.lease)).await?;
                    if n == 1 {
                        return Err(TermError::Retry("first term fails".into()));
                    }
                    std::future::pending::<()>().await;
                    Ok(())
                }
            },
        )
        .await
    });
    let wait_terms = |n: usize| {
        let terms = terms.clone();
        async move {
            for _ in 0..200 {
                if terms.lock().expect("lock").len() >= n {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            panic!("no term {n}");
        }
    };
    wait_terms(2).await;
    let first = terms.lock().expect("lock").clone();
    assert_eq!(
        first[0], first[1],
        "a failed term runs again under the same lease"
    );
    // The store drops the lease (as etcd does once it expired): a new lease, one more registration.
    store.revoke(first[0].0).await.expect("revoke");
    wait_terms(3).await;
    let third = terms.lock().expect("lock")[2];
    assert_ne!(third.0, first[0].0);
    assert_eq!(third.1, 1);
    // Shutdown revokes: the key goes at once.
    let _ = stop.send(true);
    task.await.expect("join").expect("clean stop");
    assert!(store.get("/reg/me").await.expect("get").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_id_held_by_another_live_lease_is_refused_and_taken_once_it_expires() {
    let store: Arc<dyn MetaStore> = Arc::new(MemStore::start());
    let ttl = Duration::from_secs(1);
    let holder = LeaseKeeper::start(store.clone(), ttl).await.expect("lease");
    claim(store.as_ref(), "/nodes/n0", b"a".to_vec(), holder.id, ttl)
        .await
        .expect("first claim");
    let second = store.grant(Duration::from_secs(5)).await.expect("grant");
    // The holder keeps refreshing: refused after the patience, naming the clash.
    let r = claim(store.as_ref(), "/nodes/n0", b"b".to_vec(), second, 2 * ttl).await;
    match r {
        Err(TermError::Fatal(why)) => assert!(why.contains("another live lease"), "{why}"),
        other => panic!("{other:?}"),
    }
    // Claiming again under the holder's own lease succeeds (a term run again).
    claim(store.as_ref(), "/nodes/n0", b"a".to_vec(), holder.id, ttl)
        .await
        .expect("own claim");
    // The holder dies (its keeper stops): its lease expires within the patience.
    drop(holder);
    claim(store.as_ref(), "/nodes/n0", b"b".to_vec(), second, 3 * ttl)
        .await
        .expect("taken over after the holder's lease expired");
    let kv = store.get("/nodes/n0").await.expect("get").expect("present");
    assert_eq!((kv.value, kv.lease), (b"b".to_vec(), second));
}

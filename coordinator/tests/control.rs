//! The control plane's failure scenarios on the in-memory store with a simulated clock (real
//! coordinator replicas and expert-node membership, time moved by the test): two coordinators
//! with one id, a deposed leader's fenced write, a node that cannot load, a pending orphaned by a
//! dead leader, and a burst of joins during a rollout.

pub mod sim;

use std::time::Duration;

use moe_meta::records::{self, PlacementRecord};
use moe_meta::store::Op;
use moe_meta::store::election::campaign;
use sim::{TTL, World};

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn two_coordinators_with_one_id_never_lead_together() {
    let w = World::new("same-id");
    let (a, sa, _stop_a) = w.coordinator("c");
    w.until("one leads", Duration::from_secs(5), || sa.borrow().leading)
        .await;
    let (_b, sb, _stop_b) = w.coordinator("c");
    let _nodes: Vec<_> = (0..3).map(|i| w.node(&format!("n{i}"))).collect();
    // Over several TTLs, the second never leads while the first does (it finds its own id
    // under another lease and waits), and the cluster gets its placement.
    for _ in 0..(3 * TTL.as_millis() / 100) {
        w.step().await;
        assert!(!(sa.borrow().leading && sb.borrow().leading), "two leaders");
        assert!(!sb.borrow().leading);
    }
    let st = sa.borrow().clone();
    assert!(
        w.active().await.is_some_and(|p| p.nodes.len() == 3),
        "{st:?}"
    );
    // The first dies: the second leads once the old term's lease expires.
    a.abort();
    w.until("the second leads", TTL + Duration::from_secs(1), || {
        sb.borrow().leading
    })
    .await;
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_deposed_leaders_fenced_write_is_refused() {
    let w = World::new("fence");
    let key = w.keys.election();
    let old_lease = w.store.grant(TTL).await.expect("lease");
    let old = campaign(w.store.clone(), &key, "c", old_lease)
        .await
        .expect("leads");
    let write = |v: &'static [u8]| Op::Put {
        key: w.keys.pending(),
        value: v.to_vec(),
        lease: None,
    };
    assert!(
        w.store
            .txn(vec![old.fence()], vec![write(b"1")])
            .await
            .expect("txn")
    );
    // Same id, new lease, while the old lease is still alive (an abandoned one): the campaign
    // must not take over the old term's key.
    let new_lease = w.store.grant(TTL * 10).await.expect("lease");
    let early = tokio::time::timeout(
        Duration::from_secs(1),
        campaign(w.store.clone(), &key, "c", new_lease),
    )
    .await;
    assert!(early.is_err(), "led on a key bound to an abandoned lease");
    // The old lease expires; the same id leads again under the new one: a new term.
    w.advance(TTL + Duration::from_millis(200)).await;
    let new = campaign(w.store.clone(), &key, "c", new_lease)
        .await
        .expect("leads");
    assert_ne!(new.revision, old.revision);
    assert!(
        !w.store
            .txn(vec![old.fence()], vec![write(b"2")])
            .await
            .expect("txn"),
        "the deposed term's write is refused although the id is the same"
    );
    assert!(
        w.store
            .txn(vec![new.fence()], vec![write(b"3")])
            .await
            .expect("txn")
    );
    let kv = w.store.get(&w.keys.pending()).await.expect("get");
    assert_eq!(kv.expect("written").value, b"3");
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_node_that_cannot_load_is_planned_around_within_two_rounds() {
    let w = World::new("broken");
    let (_c, s, _stop) = w.coordinator("c1");
    w.until("leads", Duration::from_secs(5), || s.borrow().leading)
        .await;
    let _good: Vec<_> = (0..3).map(|i| w.node(&format!("n{i}"))).collect();
    let _bad = w.broken_node("bad");
    w.until(
        "a placement without the broken node",
        Duration::from_secs(60),
        || s.borrow().active_version > 0,
    )
    .await;
    let active = w.active().await.expect("active");
    let ids: Vec<&str> = active.nodes.iter().map(|n| n.id.as_str()).collect();
    assert_eq!(ids, ["n0", "n1", "n2"]);
    let st = s.borrow().clone();
    assert!(
        st.rollouts <= 2,
        "{} rollouts: the failure ack ends the first, the second leaves the node out",
        st.rollouts
    );
    let (who, why) = st.excluded.first().expect("the node is reported");
    assert_eq!(who, "bad");
    assert!(why.contains("no checkpoint"), "{why}");
    // Nothing is left pending, and nothing keeps rolling out.
    for _ in 0..100 {
        w.step().await;
    }
    assert!(w.store.get(&w.keys.pending()).await.expect("get").is_none());
    assert_eq!(s.borrow().rollouts, st.rollouts);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_pending_orphaned_by_a_dead_leader_is_resolved_within_a_ttl() {
    let w = World::new("orphan");
    let (c1, s1, _stop1) = w.coordinator("c1");
    w.until("c1 leads", Duration::from_secs(5), || s1.borrow().leading)
        .await;
    let (_c2, s2, _stop2) = w.coordinator("c2");
    let _nodes: Vec<_> = (0..3).map(|i| w.node(&format!("n{i}"))).collect();
    w.until("active", Duration::from_secs(60), || {
        s1.borrow().active_version > 0
    })
    .await;
    let active = w.active().await.expect("active");
    // The leader dies right after writing a pending (a layer moved between nodes).
    c1.abort();
    let mut orphan = PlacementRecord {
        version: active.version + 1,
        ..active.clone()
    };
    let moved = orphan.nodes[0].experts.pop().expect("an expert");
    orphan.nodes[1].experts.push(moved);
    orphan.nodes[1].experts.sort();
    w.store
        .put(&w.keys.pending(), records::encode(&orphan), None)
        .await
        .expect("put");
    w.until("c2 leads", TTL + Duration::from_secs(1), || {
        s2.borrow().leading
    })
    .await;
    let mut waited = Duration::ZERO;
    while w.store.get(&w.keys.pending()).await.expect("get").is_some() {
        assert!(
            waited < TTL,
            "the orphaned pending outlived a TTL of the new term"
        );
        w.step().await;
        waited += Duration::from_millis(100);
    }
    // Deleted (the membership did not change, so the active placement stands).
    assert_eq!(w.active().await.expect("active"), active);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_burst_of_joins_during_a_rollout_converges_in_two_rollouts() {
    let w = World::new("burst");
    let (_c, s, _stop) = w.coordinator("c1");
    w.until("leads", Duration::from_secs(5), || s.borrow().leading)
        .await;
    let mut nodes: Vec<_> = (0..3).map(|i| w.node_with(&format!("n{i}"), 512)).collect();
    w.until("active over 3", Duration::from_secs(60), || {
        s.borrow().active_version > 0 && s.borrow().nodes == 3
    })
    .await;
    let before = s.borrow().rollouts;
    // A fourth node starts a rollout; ten more join, 100 ms apart, while it runs.
    nodes.push(w.node_with("n3", 512));
    w.until("a rollout is pending", Duration::from_secs(10), || {
        s.borrow().rollouts > before
    })
    .await;
    for i in 4..14 {
        nodes.push(w.node_with(&format!("n{i}"), 512));
        w.step().await;
    }
    w.until("active over 14", Duration::from_secs(60), || {
        s.borrow().nodes == 14
    })
    .await;
    let rollouts = s.borrow().rollouts - before;
    eprintln!("10 joins during a rollout: {rollouts} rollouts");
    assert!(rollouts <= 2, "{rollouts} rollouts for one burst");
    let active = w.active().await.expect("active");
    assert!(active.to_placement(&[1, 2, 3], 256).is_ok());
    // Every node holds a fair share of every layer (3 × 256 × 2 over 14 nodes: 36 or 37).
    for n in &active.nodes {
        for l in 1..=3u16 {
            let c = n.experts.iter().filter(|x| x.0 == l).count();
            assert!((36..=37).contains(&c), "{}: layer {l}: {c}", n.id);
        }
    }
}

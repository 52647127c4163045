//! The coordinator's scenarios on the in-memory store with a simulated clock: real coordinator
//! replicas and real expert-node membership (loading experts of the tiny model), time advanced
//! by hand (leases expire only when the test moves the clock).

pub mod sim;

use std::time::Duration;

use moe_meta::records::PlacementRecord;
use sim::{TTL, World};
use tokio::task::JoinHandle;

fn covers_twice(p: &PlacementRecord) {
    let placement = p
        .to_placement(&[1, 2, 3], 256)
        .expect("covers every expert");
    for l in [1, 2, 3] {
        for e in 0..256 {
            assert_eq!(placement.replicas(l, e).len(), 2, "({l}, {e})");
        }
    }
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn membership_changes_failover_and_leader_loss() {
    let w = World::new("sim");

    let (c1, s1, _stop1) = w.coordinator("c1");
    w.until("c1 leads", Duration::from_secs(5), || s1.borrow().leading)
        .await;
    let (_c2, s2, _stop2) = w.coordinator("c2");
    let mut nodes: Vec<JoinHandle<()>> = (0..4).map(|i| w.node(&format!("n{i}"))).collect();
    w.until("a placement over 4 nodes", Duration::from_secs(60), || {
        s1.borrow().active_version > 0 && s1.borrow().last_moved == 3 * 256 * 2
    })
    .await;
    let first = w.active().await.expect("active");
    assert_eq!(first.nodes.len(), 4);
    covers_twice(&first);
    assert!(!s2.borrow().leading, "one leader");

    // Settled: every node has acknowledged, and then nothing writes (a node writes each ack
    // once per term; re-writing them would keep the coordinator busy for ever).
    let mut settled = w.acked(first.version, 4).await;
    for _ in 0..100 {
        if settled.0 {
            break;
        }
        w.advance(Duration::from_millis(100)).await;
        settled = w.acked(first.version, 4).await;
    }
    assert!(settled.0, "every node acknowledges the placement");
    w.advance(Duration::from_secs(2)).await;
    assert_eq!(
        w.acked(first.version, 4).await.1,
        settled.1,
        "the store stays quiet"
    );

    // A node dies: its lease expires; the new placement drops it and re-creates only its replicas.
    let v = s1.borrow().active_version;
    let lost = first
        .nodes
        .iter()
        .find(|n| n.id == "n3")
        .expect("n3")
        .experts
        .len();
    nodes.remove(3).abort();
    w.until("re-placement without n3", Duration::from_secs(20), || {
        s1.borrow().active_version > v
    })
    .await;
    let second = w.active().await.expect("active");
    assert!(second.nodes.iter().all(|n| n.id != "n3"));
    covers_twice(&second);
    let moved = s1.borrow().last_moved;
    assert!(
        moved >= lost && moved <= lost + lost / 10,
        "moved {moved} for {lost} lost"
    );

    // A node joins: it gets a fair share and nothing else moves.
    let v = s1.borrow().active_version;
    nodes.push(w.node("n4"));
    w.until("placement with n4", Duration::from_secs(60), || {
        s1.borrow().active_version > v
    })
    .await;
    let third = w.active().await.expect("active");
    covers_twice(&third);
    let share = third
        .nodes
        .iter()
        .find(|n| n.id == "n4")
        .expect("n4")
        .experts
        .len();
    let moved = s1.borrow().last_moved;
    assert_eq!(moved, share, "only the new node's share moved");
    assert!(share >= 1536 / 4 - 1, "fair share: {share}");

    // The leader dies: the standby leads within the TTL plus a step, and handles the next change.
    c1.abort();
    w.until("c2 leads", TTL + Duration::from_secs(1), || {
        s2.borrow().leading
    })
    .await;
    let v = w.active().await.expect("active").version;
    nodes.push(w.node("n5"));
    w.until("c2 rolls out", Duration::from_secs(60), || {
        s2.borrow().active_version > v
    })
    .await;
    covers_twice(&w.active().await.expect("active"));
}

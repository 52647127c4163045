//! Load-driven rebalancing on the simulated cluster: load records written into the store as a
//! router publishes them, the leader's rounds, and real node membership acknowledging each
//! layer's rollout.

pub mod sim;

use std::time::Duration;

use moe_coordinator::RebalanceConfig;
use moe_meta::records::{self, LoadRecord, PlacementRecord};
use sim::World;

/// Layer 1 has `hot` taking 40% of its tokens, layer 2 `hot2` (if any) the same; the rest is
/// even. `per_expert` tokens for an ordinary expert.
fn loads(per_expert: u32, hot: usize, hot2: Option<usize>) -> LoadRecord {
    let skewed = |h: usize| {
        let mut c = vec![per_expert; 256];
        c[h] = per_expert * 255 * 2 / 3; // 40% of the layer
        c
    };
    LoadRecord {
        router: "r1".into(),
        window_ms: 10_000,
        layers: vec![
            (1, skewed(hot)),
            (2, hot2.map_or_else(|| vec![per_expert; 256], skewed)),
            (3, vec![per_expert; 256]),
        ],
    }
}

async fn publish(w: &World, rec: &LoadRecord) {
    w.store
        .put(&w.keys.load(&rec.router), records::encode(rec), None)
        .await
        .expect("put");
}

/// Balancedness of `layer` of `p` under the load of `rec`.
fn balance(p: &PlacementRecord, rec: &LoadRecord, layer: u16) -> f64 {
    let placement = p.to_placement(&[1, 2, 3], 256).expect("covers");
    let counts = &rec.layers.iter().find(|l| l.0 == layer).expect("layer").1;
    let loads: Vec<f64> = counts.iter().map(|&c| f64::from(c)).collect();
    moe_meta::balancedness(&placement.node_loads(layer as usize, &loads))
}

/// The experts of `layer` on each node.
fn layer(p: &PlacementRecord, l: u16) -> Vec<Vec<u16>> {
    p.nodes
        .iter()
        .map(|n| n.experts.iter().filter(|x| x.0 == l).map(|x| x.1).collect())
        .collect()
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn hot_experts_are_replicated_one_layer_at_a_time_when_the_load_says_so() {
    let w = World::new("load");
    let cfg = RebalanceConfig {
        threshold: 0.9,
        interval: Duration::from_secs(1),
        alpha: 1.0,
        min_tokens: 10_000,
        tolerance: 0.01,
        cooldown: Duration::from_secs(30),
    };
    let (_c, s, _stop) = w.coordinator_with("c", 1, cfg);
    // 3 layers × (64 experts + 16 spare) per node.
    let _nodes: Vec<_> = (0..4).map(|i| w.node_with(&format!("n{i}"), 240)).collect();
    w.until("a placement over 4 nodes", Duration::from_secs(120), || {
        s.borrow().nodes == 4 && s.borrow().active_version > 0
    })
    .await;
    let first = w.active().await.expect("active");

    // Skewed but too few tokens to judge (4,000 per layer < 10,000): measured, not acted on.
    let small = loads(10, 7, None);
    publish(&w, &small).await;
    w.until("layer 1 measured", Duration::from_secs(5), || {
        s.borrow().balancedness.get(&1).is_some_and(|&b| b < 0.7)
    })
    .await;
    w.advance(Duration::from_secs(3)).await;
    assert_eq!(w.active().await.expect("active").version, first.version);
    assert_eq!(s.borrow().rebalance_rounds, 0);

    // Enough tokens: layer 1 alone is re-placed, in one rollout; the hot expert is replicated
    // and split by shares.
    let big = loads(100, 7, None);
    assert!(balance(&first, &big, 1) < 0.7);
    publish(&w, &big).await;
    w.until("a rebalance round", Duration::from_secs(120), || {
        s.borrow().rebalance_rounds == 1
    })
    .await;
    let second = w.active().await.expect("active");
    assert_eq!(second.version, first.version + 1, "one layer, one rollout");
    assert_eq!(layer(&second, 2), layer(&first, 2));
    assert_eq!(layer(&second, 3), layer(&first, 3));
    let replicas = layer(&second, 1)
        .iter()
        .filter(|es| es.contains(&7))
        .count();
    assert!(replicas > 1, "the hot expert is replicated");
    assert!(
        balance(&second, &big, 1) > 0.99,
        "{}",
        balance(&second, &big, 1)
    );
    let r = s.borrow().last_rebalance.clone().expect("reported");
    assert_eq!((r.layer, r.version), (1, second.version));
    assert!(r.moved <= 8, "moved {}", r.moved);
    for n in &second.nodes {
        assert!(n.experts.len() <= 240, "capacity of {}", n.id);
    }

    // The load moves to layer 2: nothing happens until the cooldown ends, then layer 2 alone.
    let shifted = loads(100, 7, Some(200));
    publish(&w, &shifted).await;
    w.advance(Duration::from_secs(5)).await;
    assert_eq!(w.active().await.expect("active").version, second.version);
    w.until("the second round", Duration::from_secs(120), || {
        s.borrow().rebalance_rounds == 2
    })
    .await;
    let third = w.active().await.expect("active");
    assert_eq!(third.version, second.version + 1);
    assert_eq!(layer(&third, 1), layer(&second, 1));
    assert!(balance(&third, &shifted, 2) > 0.99);
}

//! The sanity row: the simulator at the size of the end-to-end tests (tests/e2e/cluster.rs: the
//! tiny model's 3 MoE layers × 256 experts, 2 replicas, 3 nodes, then a fourth joining, then a
//! node killed) must see what they see: one rollout per membership change, every layer spread
//! evenly, the joining node holding a fair share of every layer (±20%), a quiet store between
//! changes (only the routers' load records are written, at most one per router every 5 s), and a dead
//! node re-placed within its lease TTL plus the settle window and a rollout.

use std::time::Duration;

use moe_fleet::{FleetConfig, Scenario, simulate};

#[test]
fn four_nodes_see_what_the_end_to_end_tests_see() {
    let cfg = FleetConfig {
        nodes: 3,
        routers: 1,
        layers: 3,
        experts: 256,
        min_replicas: 2,
        steady: Duration::from_secs(60),
        ..FleetConfig::default()
    };
    let scenarios = [Scenario::Join(1), Scenario::Steady, Scenario::NodeDeath];
    let reports = simulate(&cfg, &scenarios, |_| {}).expect("simulates");
    eprintln!("{}", moe_fleet::table(&reports));
    let by = |name: &str| {
        reports
            .iter()
            .find(|r| r.scenario == name)
            .unwrap_or_else(|| panic!("{name} reported"))
    };

    let up = by("bring-up");
    assert!(up.converged, "bring-up converges");
    assert_eq!(
        up.rollouts, 1,
        "three nodes registering together: one rollout"
    );
    // 256 × 2 replicas of each layer over 3 nodes: 170 or 171 on every node.
    assert!(up.layer_counts_within_rounding && up.min_layer_share >= 170.0 / (512.0 / 3.0) - 1e-9);

    let join = by("join-1");
    assert!(
        join.converged && join.rollouts == 1,
        "one rollout for a join"
    );
    // e2e: the new node holds within ±20% of a fair share of every layer.
    assert!(join.min_layer_share >= 0.8, "{}", join.min_layer_share);
    assert!(join.max_layer_share <= 1.2, "{}", join.max_layer_share);
    assert!(join.layer_counts_within_rounding);

    let steady = by("steady");
    assert_eq!(steady.rollouts, 0);
    // Only load records: one router, at most one every 5 s (12 in 60 s, give or take the
    // edges) while its window fills, and at least one a minute.
    assert!(
        (1..=13).contains(&steady.writes),
        "steady writes: {}",
        steady.writes
    );
    assert_eq!(steady.refused_too_large + steady.refused_no_space, 0);

    let death = by("node-death");
    assert!(
        death.converged && death.rollouts == 1,
        "one rollout for a death"
    );
    let converge = death.converge_s.expect("converged");
    // Lease TTL 3 s (rounded up as etcd grants it), then the settle window (1 s), then a
    // rollout whose loads are instant.
    assert!(
        (3.0..=3.0 + 5.0).contains(&converge),
        "re-placed in {converge} s"
    );
    assert!(death.layer_counts_within_rounding);
}

//! Unit tests of the placement algorithm, including the edge cases the issue names.

use super::*;

fn zipf(n: usize, s: f64) -> Vec<f64> {
    (0..n)
        .map(|i| 1000.0 / ((i * 7919 % n) as f64 + 1.0).powf(s))
        .collect()
}

fn valid(p: &LayerPlacement, loads: &[f64], slots: &[usize]) {
    for (g, gs) in p.gpus.iter().enumerate() {
        assert!(gs.len() <= slots[g], "gpu {g} over its slots");
    }
    let mut share = vec![0.0; loads.len()];
    for gs in &p.gpus {
        for &(e, s) in gs {
            assert!((0.0..=1.0 + 1e-9).contains(&s));
            share[e as usize] += s;
        }
    }
    for (e, s) in share.iter().enumerate() {
        assert!((s - 1.0).abs() < 1e-6, "expert {e} shares sum to {s}");
    }
}

#[test]
fn skewed_loads_balance_almost_perfectly_with_a_few_spare_slots() {
    let loads = zipf(256, 1.0);
    let slots = vec![36; 8];
    let p = place_layer(&loads, &slots).expect("fits");
    valid(&p, &loads, &slots);
    assert!(
        p.balancedness(&loads) > 0.9999,
        "{}",
        p.balancedness(&loads)
    );
    let r = p.replicas(256);
    let hottest = (0..256)
        .max_by(|&a, &b| loads[a].total_cmp(&loads[b]))
        .expect("max");
    assert!(r[hottest] > 1, "the hottest expert is replicated");
}

#[test]
fn exactly_one_slot_per_expert_packs_without_replicas() {
    let loads = zipf(64, 0.6);
    let slots = vec![8; 8];
    let p = place_layer(&loads, &slots).expect("fits");
    valid(&p, &loads, &slots);
    assert!(p.replicas(64).iter().all(|&r| r == 1));
    assert!(p.balancedness(&loads) > 0.7);
}

#[test]
fn more_slots_than_needed_and_a_node_with_no_capacity() {
    let loads = zipf(32, 1.0);
    let slots = vec![40, 0, 40, 40];
    let p = place_layer(&loads, &slots).expect("fits");
    valid(&p, &loads, &slots);
    assert!(p.gpus[1].is_empty());
    // The zero-capacity GPU counts in the mean, so 3 of 4 GPUs can reach 0.75 at most.
    assert!(
        (p.balancedness(&loads) - 0.75).abs() < 1e-6,
        "{}",
        p.balancedness(&loads)
    );
    assert_eq!(
        place_layer(&loads, &[10, 10]).expect_err("too few"),
        BalanceError::TooFewSlots {
            experts: 32,
            slots: 20
        }
    );
}

#[test]
fn all_load_on_one_expert_and_a_layer_without_load() {
    let mut loads = vec![0.0; 16];
    loads[5] = 1000.0;
    let slots = vec![5; 4];
    let p = place_layer(&loads, &slots).expect("fits");
    valid(&p, &loads, &slots);
    assert_eq!(p.replicas(16)[5], 4, "one replica per GPU");
    assert!(p.balancedness(&loads) > 0.9999);
    let none = place_layer(&[0.0; 16], &slots).expect("fits");
    valid(&none, &[0.0; 16], &slots);
    assert_eq!(none.balancedness(&[0.0; 16]), 1.0);
}

#[test]
fn rebalancing_keeps_balance_and_never_moves_more_than_replanning() {
    let loads = zipf(256, 0.6);
    let slots = vec![10; 32];
    let first = place_layer(&loads, &slots).expect("fits");
    // Small drift: re-solving the shares alone is enough, nothing moves.
    let drift: Vec<f64> = loads
        .iter()
        .enumerate()
        .map(|(i, l)| l * (1.0 + 0.002 * (i % 5) as f64))
        .collect();
    let (kept, n) = rebalance_layer(&drift, &slots, &first, 0.01).expect("fits");
    assert_eq!(n, 0);
    assert!(
        kept.balancedness(&drift)
            >= place_layer(&drift, &slots)
                .expect("fits")
                .balancedness(&drift)
                - 0.01
    );
    // The hottest 10% change: swap the loads of the 26 hottest with 26 cold experts.
    let mut order: Vec<usize> = (0..256).collect();
    order.sort_by(|&a, &b| loads[b].total_cmp(&loads[a]));
    let mut next = loads.clone();
    for i in 0..26 {
        next.swap(order[i], order[255 - i]);
    }
    let scratch = place_layer(&next, &slots).expect("fits");
    let (moved, n) = rebalance_layer(&next, &slots, &first, 0.01).expect("fits");
    valid(&moved, &next, &slots);
    assert!(moved.balancedness(&next) >= scratch.balancedness(&next) - 0.01);
    assert!(
        n <= scratch.moves_from(&first),
        "{n} moves vs {} from scratch",
        scratch.moves_from(&first)
    );
}

#[test]
fn grouped_placement_keeps_groups_on_one_host() {
    let loads = zipf(256, 0.6);
    let slots = vec![10; 32];
    let p = place_grouped(&loads, &slots, 8, 8).expect("fits");
    valid(&p, &loads, &slots);
    for h in 0..4 {
        let groups: std::collections::BTreeSet<u32> = p.gpus[h * 8..(h + 1) * 8]
            .iter()
            .flatten()
            .map(|s| s.0 / 32)
            .collect();
        assert_eq!(groups.len(), 2, "host {h} holds two whole groups");
    }
}

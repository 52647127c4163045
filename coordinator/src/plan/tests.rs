//! The planner's properties: coverage, capacity, minimal moves, and joins and losses that keep
//! every MoE layer spread evenly over the nodes at every size from 2 to 64 nodes.

use super::*;

fn slots(n: usize, cap: usize) -> Vec<NodeSlot> {
    (0..n)
        .map(|i| NodeSlot {
            id: format!("n{i}"),
            addr: format!("a{i}"),
            capacity: cap,
        })
        .collect()
}

fn record(p: &Plan) -> PlacementRecord {
    PlacementRecord {
        version: 1,
        nodes: p.nodes.clone(),
    }
}

fn check_cover(p: &Plan, layers: &[usize], n: usize, replicas: usize) {
    let rec = record(p);
    let placement = rec.to_placement(layers, n).expect("covers every expert");
    for &l in layers {
        for e in 0..n {
            assert!(placement.replicas(l, e).len() >= replicas, "({l}, {e})");
        }
    }
}

#[test]
fn fresh_placement_covers_with_replicas_and_balances() {
    let p = plan(None, &slots(4, 1000), &[1, 2, 3], 256, 2).expect("fits");
    check_cover(&p, &[1, 2, 3], 256, 2);
    let loads: Vec<usize> = p.nodes.iter().map(|n| n.experts.len()).collect();
    assert!(
        loads.iter().max().expect("max") - loads.iter().min().expect("min") <= 1,
        "{loads:?}"
    );
    assert_eq!(p.moved, 3 * 256 * 2);
}

#[test]
fn a_dead_node_is_replaced_by_adding_only_its_replicas() {
    let first = plan(None, &slots(4, 1000), &[1, 2, 3], 256, 2).expect("fits");
    let lost = first.nodes[3].experts.len();
    let survivors = slots(4, 1000)[..3].to_vec();
    let next = plan(Some(&record(&first)), &survivors, &[1, 2, 3], 256, 2).expect("fits");
    check_cover(&next, &[1, 2, 3], 256, 2);
    // The lost replicas are re-created; balancing may move a few more (well under 10%).
    assert!(
        next.moved >= lost && next.moved <= lost + lost / 10,
        "moved {} for {lost} lost",
        next.moved
    );
}

#[test]
fn a_new_node_takes_a_fair_share_and_nothing_else_moves() {
    let first = plan(None, &slots(4, 1000), &[1, 2, 3], 256, 2).expect("fits");
    let next = plan(Some(&record(&first)), &slots(5, 1000), &[1, 2, 3], 256, 2).expect("fits");
    check_cover(&next, &[1, 2, 3], 256, 2);
    let total = 3 * 256 * 2;
    assert!(next.moved <= total / 5 + 1, "moved {}", next.moved);
    assert!(next.nodes[4].experts.len() >= total / 5 - 1);
    let scratch = plan(None, &slots(5, 1000), &[1, 2, 3], 256, 2).expect("fits");
    let differ: usize = scratch
        .nodes
        .iter()
        .zip(&next.nodes)
        .map(|(a, b)| a.experts.iter().filter(|x| !b.experts.contains(x)).count())
        .sum();
    eprintln!(
        "incremental moves {} vs from-scratch difference {differ}",
        next.moved
    );
    assert!(next.moved * 2 < differ);
}

#[test]
fn capacities_are_respected_or_the_plan_refuses() {
    let mut nodes = slots(3, 300);
    nodes[0].capacity = 0; // a node that can hold nothing
    let err = plan(None, &nodes, &[1, 2, 3], 256, 1).expect_err("768 pairs > 600 slots");
    assert!(
        matches!(
            err,
            PlanError::Capacity {
                needed: 768,
                available: 600,
                ..
            }
        ),
        "{err}"
    );
    nodes[1].capacity = 500;
    let p = plan(None, &nodes, &[1, 2, 3], 256, 1).expect("fits in 800");
    assert!(p.nodes[0].experts.is_empty());
    assert!(
        p.nodes
            .iter()
            .zip(&nodes)
            .all(|(p, n)| p.experts.len() <= n.capacity)
    );
    check_cover(&p, &[1, 2, 3], 256, 1);
    assert_eq!(
        plan(None, &[], &[1], 4, 1).expect_err("no nodes"),
        PlanError::NoNodes
    );
}

#[test]
fn replicas_are_capped_by_the_number_of_nodes() {
    let p = plan(None, &slots(1, 100), &[1], 8, 2).expect("one node holds one replica each");
    assert_eq!(p.nodes[0].experts.len(), 8);
}

/// Per layer, what each node holds.
fn per_layer(p: &Plan, layers: &[usize]) -> Vec<Vec<usize>> {
    layers
        .iter()
        .map(|&l| {
            p.nodes
                .iter()
                .map(|n| n.experts.iter().filter(|x| x.0 as usize == l).count())
                .collect()
        })
        .collect()
}

/// Every layer's per-node replica count is the floor or ceiling of the layer's mean, and
/// within ±20% of it wherever whole numbers allow that (returns the layers where they do not).
fn check_spread(p: &Plan, layers: &[usize], what: &str) -> usize {
    let mut impossible = 0;
    for (li, counts) in per_layer(p, layers).iter().enumerate() {
        let total: usize = counts.iter().sum();
        let n = counts.len();
        let mean = total as f64 / n as f64;
        let (lo, hi) = (total / n, total.div_ceil(n));
        for &c in counts {
            assert!(c >= lo && c <= hi, "{what}: layer {li}: {counts:?}");
            let within = (c as f64 - mean).abs() <= 0.2 * mean + 1e-9;
            if !within {
                // Only where no whole number is within 20% on that side.
                assert!(
                    (c == hi && hi as f64 > 1.2 * mean) || (c == lo && (lo as f64) < 0.8 * mean),
                    "{what}: layer {li}: {counts:?}"
                );
                impossible += 1;
            }
        }
    }
    impossible
}

const LAYERS: [usize; 6] = [1, 2, 3, 4, 5, 6];

#[test]
fn joins_from_2_to_64_nodes_take_a_fair_share_of_every_layer() {
    for replicas in [1, 2] {
        let total = LAYERS.len() * 256 * replicas;
        let mut p = plan(None, &slots(2, 10_000), &LAYERS, 256, replicas).expect("fits");
        check_spread(&p, &LAYERS, "2 nodes");
        let mut worst = 0.0f64;
        let mut impossible = Vec::new();
        for n in 3..=64 {
            let next =
                plan(Some(&record(&p)), &slots(n, 10_000), &LAYERS, 256, replicas).expect("fits");
            let what = format!("join {}→{n}, {replicas} replicas", n - 1);
            check_cover(&next, &LAYERS, 256, replicas.min(n));
            if check_spread(&next, &LAYERS, &what) > 0 {
                impossible.push(n);
            }
            // The new node's share is what moves (a few more where the rounding shifts).
            let newcomer = &next.nodes.iter().find(|x| x.id == format!("n{}", n - 1));
            let share = newcomer.expect("placed").experts.len();
            assert!(share >= total / n - LAYERS.len(), "{what}: share {share}");
            assert!(
                next.moved <= share + LAYERS.len(),
                "{what}: moved {} for {share}",
                next.moved
            );
            worst = worst.max(next.moved as f64 / (total as f64 / n as f64));
            // A fresh plan at this size is just as even.
            check_spread(
                &plan(None, &slots(n, 10_000), &LAYERS, 256, replicas).expect("fits"),
                &LAYERS,
                &what,
            );
            p = next;
        }
        eprintln!(
            "{replicas} replicas: moves per join at most {worst:.3}× a fair share; ±20% impossible \
             in whole numbers at {impossible:?} nodes"
        );
    }
}

#[test]
fn losing_a_node_spreads_its_replicas_and_moves_only_those() {
    for replicas in [1, 2] {
        for n in 3..=64 {
            let first = plan(None, &slots(n, 10_000), &LAYERS, 256, replicas).expect("fits");
            let gone = format!("n{}", n / 2);
            let lost = first
                .nodes
                .iter()
                .find(|x| x.id == gone)
                .expect("node")
                .experts
                .len();
            let survivors: Vec<NodeSlot> = slots(n, 10_000)
                .into_iter()
                .filter(|s| s.id != gone)
                .collect();
            let next =
                plan(Some(&record(&first)), &survivors, &LAYERS, 256, replicas).expect("fits");
            let what = format!("loss {n}→{}, {replicas} replicas", n - 1);
            check_cover(&next, &LAYERS, 256, replicas.min(n - 1));
            check_spread(&next, &LAYERS, &what);
            assert!(
                next.moved <= lost + LAYERS.len() * 2,
                "{what}: moved {} for {lost} lost",
                next.moved
            );
        }
    }
}

#[test]
fn a_node_back_from_a_lease_blip_gets_its_experts_back_without_a_move() {
    for replicas in [1, 2] {
        let first = plan(None, &slots(5, 10_000), &LAYERS, 256, replicas).expect("fits");
        let away = first.nodes[2].clone();
        let others: Vec<NodeSlot> = slots(5, 10_000)
            .into_iter()
            .filter(|s| s.id != away.id)
            .collect();
        let without = plan(Some(&record(&first)), &others, &LAYERS, 256, replicas).expect("fits");
        assert!(without.moved > 0);
        let back = plan_with(
            Some(&record(&without)),
            std::slice::from_ref(&away),
            &slots(5, 10_000),
            &LAYERS,
            256,
            replicas,
        )
        .expect("fits");
        // It loads nothing and keeps what it holds; elsewhere at most what the departure moved
        // beyond the lost replicas themselves (rounding shifts among the others) moves back.
        assert_eq!(
            back.nodes[2].experts, away.experts,
            "it keeps what it holds"
        );
        let shifted = without.moved - away.experts.len();
        eprintln!(
            "{replicas} replicas: back moved {}, departure shifted {shifted}",
            back.moved
        );
        assert!(back.moved <= shifted, "moved {} > {shifted}", back.moved);
        check_cover(&back, &LAYERS, 256, replicas);
        check_spread(&back, &LAYERS, "back");
        // Without knowing what it holds, it is a plain join.
        let join = plan(
            Some(&record(&without)),
            &slots(5, 10_000),
            &LAYERS,
            256,
            replicas,
        )
        .expect("fits");
        assert_eq!(join.moved, join.nodes[2].experts.len());
    }
}

#[test]
fn deepseek_v3_scale_stays_even_on_joins_and_losses() {
    // 58 MoE layers × 256 experts, 2 replicas (29,696 replicas).
    let layers: Vec<usize> = (3..61).collect();
    for (from, to) in [(3, 4), (63, 64), (64, 63)] {
        let first = plan(None, &slots(from, 100_000), &layers, 256, 2).expect("fits");
        let next = plan(Some(&record(&first)), &slots(to, 100_000), &layers, 256, 2).expect("fits");
        check_cover(&next, &layers, 256, 2);
        check_spread(&next, &layers, &format!("{from}→{to}"));
        let fair = layers.len() * 512 / from.max(to);
        assert!(
            next.moved <= fair + layers.len() * 2,
            "{from}→{to}: moved {}",
            next.moved
        );
    }
}

#[test]
fn tight_capacity_still_fits_the_union_of_old_and_new() {
    // Exactly enough room: 3 layers × 256 experts on 3 nodes of 256, then a 4th joins.
    let layers = [1, 2, 3];
    let first = plan(None, &slots(3, 256), &layers, 256, 1).expect("fits");
    let next = plan(Some(&record(&first)), &slots(4, 256), &layers, 256, 1).expect("fits");
    check_cover(&next, &layers, 256, 1);
    check_spread(&next, &layers, "3→4 tight");
    for (a, b) in first.nodes.iter().zip(&next.nodes) {
        let union: BTreeSet<_> = a.experts.iter().chain(&b.experts).collect();
        assert!(union.len() <= 256, "{}: {}", a.id, union.len());
    }
}

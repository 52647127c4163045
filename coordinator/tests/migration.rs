//! Migration on the EPLB traces: from the placement for one trace, rebalance to the same trace
//! with its hottest 10% of experts changed, and compare with planning from scratch.

use std::collections::BTreeMap;

pub mod common;

use common::{fixture, valid};
use moe_coordinator::balance::{LayerPlacement, place_layer, rebalance_layer, relabel};

/// How the trace changes between the current placement and the rebalance.
#[derive(Clone, Copy, Debug)]
enum Change {
    /// The hottest 10% of experts change load by factors spread over 0.3–1.7: some cool off and
    /// leave the hot set, others heat up.
    Drift,
    /// The hottest 10% trade loads with as many others (fixed stride through the rest): the hot
    /// set is replaced outright.
    Swap,
}

fn perturb(loads: &[f64], change: Change) -> Vec<f64> {
    let n = loads.len();
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| loads[b].total_cmp(&loads[a]).then(a.cmp(&b)));
    let hot = n.div_ceil(10);
    let rest = &order[hot..];
    let mut next = loads.to_vec();
    for (i, &h) in order[..hot].iter().enumerate() {
        match change {
            Change::Drift => next[h] *= 0.3 + 1.4 * ((i * 7 + 3) % hot) as f64 / (hot - 1) as f64,
            Change::Swap => next.swap(h, rest[(i * 37 + 11) % rest.len()]),
        }
    }
    next
}

/// One trace layer migrated on one shape.
#[derive(Debug)]
struct Row {
    shape: String,
    trace: String,
    layer: usize,
    /// Balancedness of the fresh plan and of the rebalanced placement.
    fresh: f64,
    rebalanced: f64,
    /// Slots that change expert: rebalancing, the fresh plan, and a lower bound for reaching
    /// the balance goal (replicas the experts lack for no replica to exceed the goal's cap).
    moves: usize,
    fresh_moves: usize,
    /// The fresh plan with its GPUs renumbered to overlap the current placement most.
    aligned_moves: usize,
    bound: usize,
}

impl Row {
    fn describe(&self) -> String {
        format!(
            "{} {} layer {}: balance {:.4} vs fresh {:.4}; moves {} vs fresh {} (bound {})",
            self.shape,
            self.trace,
            self.layer,
            self.rebalanced,
            self.fresh,
            self.moves,
            self.fresh_moves,
            self.bound
        )
    }
}

/// Replicas `current` lacks for no replica to carry more than the cap at balancedness `goal`.
fn moves_bound(loads: &[f64], gpus: usize, current: &LayerPlacement, goal: f64) -> usize {
    let cap = loads.iter().sum::<f64>() / gpus as f64 / goal;
    let have = current.replicas(loads.len());
    loads
        .iter()
        .zip(have)
        .map(|(&l, h)| ((l / cap - 1e-9).ceil().max(1.0) as usize).saturating_sub(h))
        .sum()
}

/// Every trace layer on every shape: plan, change the trace, rebalance; prints a table per
/// (shape, distribution).
fn migrate_all(change: Change) -> Vec<Row> {
    let traces = fixture("traces_dev.json");
    let reference = fixture("reference_dev.json");
    let shapes: BTreeMap<String, (usize, usize, usize)> = reference["results"]
        .as_array()
        .expect("results")
        .iter()
        .map(|r| {
            let g = r["num_gpus"].as_u64().expect("gpus") as usize;
            let n = r["num_logical_experts"].as_u64().expect("E") as usize;
            let s = r["num_replicas"].as_u64().expect("r") as usize / g;
            (r["shape_id"].as_str().expect("id").to_string(), (g, n, s))
        })
        .collect();
    let mut rows = Vec::new();
    eprintln!(
        "{change:?}: shape, dist, balance fresh / rebalanced, slots moved rebalanced / fresh / fresh renumbered to overlap"
    );
    for (shape, &(gpus, n, per_gpu)) in &shapes {
        let slots = vec![per_gpu; gpus];
        let mut cells: BTreeMap<String, (f64, f64, usize, usize, usize, usize)> = BTreeMap::new();
        for t in traces["traces"].as_array().expect("traces") {
            if t["num_logical_experts"].as_u64() != Some(n as u64) {
                continue;
            }
            let id = t["trace_id"].as_str().expect("id");
            let dist = id.split('_').next().expect("dist").to_string();
            for (layer, l) in t["load"].as_array().expect("load").iter().enumerate() {
                let loads: Vec<f64> = serde_json::from_value(l.clone()).expect("loads");
                let first = place_layer(&loads, &slots).expect("fits");
                let next = perturb(&loads, change);
                let fresh = place_layer(&next, &slots).expect("fits");
                let (moved, moves) = rebalance_layer(&next, &slots, &first, 0.01).expect("fits");
                valid(&moved, n, per_gpu);
                assert_eq!(moves, moved.moves_from(&first));
                let (bf, bm) = (fresh.balancedness(&next), moved.balancedness(&next));
                let fresh_moves = fresh.moves_from(&first);
                let aligned_moves = relabel(&fresh, &first, &slots).moves_from(&first);
                rows.push(Row {
                    shape: shape.clone(),
                    trace: id.to_string(),
                    layer,
                    fresh: bf,
                    rebalanced: bm,
                    moves,
                    fresh_moves,
                    aligned_moves,
                    bound: moves_bound(&next, gpus, &first, bf - 0.01),
                });
                let c = cells.entry(dist.clone()).or_default();
                *c = (
                    c.0 + bf,
                    c.1 + bm,
                    c.2 + moves,
                    c.3 + fresh_moves,
                    c.4 + aligned_moves,
                    c.5 + 1,
                );
            }
        }
        for (dist, (bf, bm, m, fm, am, k)) in cells {
            let k = k as f64;
            eprintln!(
                "{shape:<18} {dist:<8} {:.4} / {:.4}   {m:>5} / {fm:>5} / {am:>5}",
                bf / k,
                bm / k
            );
        }
    }
    let (m, fm, am, b) = rows.iter().fold((0, 0, 0, 0), |a, r| {
        (
            a.0 + r.moves,
            a.1 + r.fresh_moves,
            a.2 + r.aligned_moves,
            a.3 + r.bound,
        )
    });
    eprintln!(
        "{change:?}: {m} slots moved vs {fm} by fresh plans, {am} renumbered (lower bound {b})"
    );
    rows
}

#[test]
fn drift_rebalances_within_a_hundredth_moving_a_third_of_a_fresh_plan() {
    let failures: Vec<String> = migrate_all(Change::Drift)
        .iter()
        .filter(|r| r.rebalanced < r.fresh - 0.01 || r.moves * 3 > r.fresh_moves)
        .map(Row::describe)
        .collect();
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
fn a_replaced_hot_set_rebalances_within_a_hundredth_never_moving_more_than_a_fresh_plan() {
    let rows = migrate_all(Change::Swap);
    let failures: Vec<String> = rows
        .iter()
        .filter(|r| r.rebalanced < r.fresh - 0.01 || r.moves > r.fresh_moves)
        .map(Row::describe)
        .collect();
    assert!(failures.is_empty(), "{failures:#?}");
    let moves: usize = rows.iter().map(|r| r.moves).sum();
    let fresh: usize = rows.iter().map(|r| r.fresh_moves).sum();
    assert!(
        moves * 3 <= fresh,
        "moved {moves} slots, fresh plans {fresh}"
    );
}

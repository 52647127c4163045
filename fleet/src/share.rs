//! How evenly a placement spreads each MoE layer over the nodes.
//!
//! `min_layer_share` is the measure: the lowest per-node replica count of any MoE layer
//! over that layer's mean. It is only informative when a layer has at least one replica per
//! node: at 1,000 nodes × 256 experts × 2 replicas a layer has 0.512 replicas per node, so some
//! nodes must hold none of it and the measure is 0 for every placement. For that regime
//! [`Spread::within_rounding`] says whether every node holds the floor or the ceiling of every
//! layer's mean (the best whole numbers allow), and [`Spread::min_node_share`] measures the
//! whole model per node (each node's total replicas over the mean).

use std::collections::BTreeMap;

use moe_meta::records::PlacementRecord;

/// Spread of a placement's replicas over its nodes.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Spread {
    /// Lowest (per-node replicas of a layer / the layer's mean) over layers and nodes.
    pub min_layer_share: f64,
    /// Highest such ratio.
    pub max_layer_share: f64,
    /// Mean replicas of one layer per node.
    pub layer_mean: f64,
    /// Every node holds floor(mean) or ceil(mean) replicas of every layer.
    pub within_rounding: bool,
    /// Lowest (a node's replicas over all layers / the mean).
    pub min_node_share: f64,
    /// Highest such ratio.
    pub max_node_share: f64,
}

/// The spread of `rec` over `layers`.
pub fn spread(rec: &PlacementRecord, layers: &[usize]) -> Spread {
    let n = rec.nodes.len().max(1);
    let mut per_layer: BTreeMap<usize, Vec<usize>> =
        layers.iter().map(|&l| (l, vec![0; n])).collect();
    for (i, node) in rec.nodes.iter().enumerate() {
        for &(l, _) in &node.experts {
            if let Some(c) = per_layer.get_mut(&(l as usize)) {
                c[i] += 1;
            }
        }
    }
    let (mut lo, mut hi, mut rounding, mut mean_sum) = (f64::INFINITY, 0.0f64, true, 0.0);
    for counts in per_layer.values() {
        let total: usize = counts.iter().sum();
        let mean = total as f64 / n as f64;
        mean_sum += mean;
        for &c in counts {
            let share = if mean > 0.0 { c as f64 / mean } else { 1.0 };
            lo = lo.min(share);
            hi = hi.max(share);
            rounding &= c as f64 >= mean.floor() && c as f64 <= mean.ceil();
        }
    }
    let totals: Vec<usize> = rec.nodes.iter().map(|x| x.experts.len()).collect();
    let mean_total = totals.iter().sum::<usize>() as f64 / n as f64;
    let ratio = |c: usize| {
        if mean_total > 0.0 {
            c as f64 / mean_total
        } else {
            1.0
        }
    };
    Spread {
        min_layer_share: if lo.is_finite() { lo } else { 0.0 },
        max_layer_share: hi,
        layer_mean: mean_sum / per_layer.len().max(1) as f64,
        within_rounding: rounding,
        min_node_share: totals
            .iter()
            .map(|&c| ratio(c))
            .fold(f64::INFINITY, f64::min),
        max_node_share: totals.iter().map(|&c| ratio(c)).fold(0.0, f64::max),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use moe_meta::records::PlacedNode;

    fn node(id: &str, experts: Vec<(u16, u16)>) -> PlacedNode {
        PlacedNode {
            id: id.into(),
            addr: String::new(),
            shares: vec![],
            experts,
        }
    }

    #[test]
    fn shares_over_the_layer_mean_and_rounding() {
        // Layer 1: 3 replicas over 2 nodes (mean 1.5: 1 and 2 are the floor and the ceiling);
        // layer 2: 4 replicas, 3 on one node (mean 2: 1 is half of it).
        let rec = PlacementRecord {
            version: 1,
            nodes: vec![
                node("a", vec![(1, 0), (2, 0), (2, 1), (2, 2)]),
                node("b", vec![(1, 1), (1, 2), (2, 3)]),
            ],
        };
        let s = spread(&rec, &[1, 2]);
        assert!((s.min_layer_share - 0.5).abs() < 1e-12);
        assert!((s.max_layer_share - 1.5).abs() < 1e-12);
        assert!(
            !s.within_rounding,
            "layer 2 holds 3 and 1 around a mean of 2"
        );
        assert!((s.min_node_share - 3.0 / 3.5).abs() < 1e-12);
        let even = PlacementRecord {
            version: 1,
            nodes: vec![node("a", vec![(1, 0)]), node("b", vec![(1, 1), (1, 2)])],
        };
        assert!(spread(&even, &[1]).within_rounding);
    }
}

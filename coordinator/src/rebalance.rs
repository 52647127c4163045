//! Load-driven rebalancing: the routers' published token counts, summed and smoothed over time
//! (an exponential moving average of tokens per second), the balancedness of each MoE layer under
//! the active placement and its shares, and one layer's re-placement as a new placement record
//! ([`crate::balance::rebalance_layer`] from the current layer, other layers untouched).

use std::collections::BTreeMap;
use std::time::Duration;

use moe_meta::records::{LoadRecord, PlacedNode, PlacementRecord, SHARE_UNIT};

use crate::balance::{LayerPlacement, rebalance_layer, rebalance_with_floor};

/// When and how the coordinator rebalances on load.
#[derive(Debug, Clone)]
pub struct RebalanceConfig {
    /// Rebalance a layer whose balancedness (mean node load / max node load) falls below this;
    /// 0 turns load-driven rebalancing off.
    pub threshold: f64,
    /// How often loads are read and checked.
    pub interval: Duration,
    /// Weight of the newest reading in the moving average (1: no smoothing).
    pub alpha: f64,
    /// Fewest tokens a layer must have in the routers' windows before its balance is judged.
    pub min_tokens: u64,
    /// Balance given up to save moves (see [`rebalance_layer`]).
    pub tolerance: f64,
    /// Least time between two rebalancing rounds.
    pub cooldown: Duration,
}

impl Default for RebalanceConfig {
    fn default() -> Self {
        RebalanceConfig {
            threshold: 0.0,
            interval: Duration::from_secs(10),
            alpha: 0.3,
            min_tokens: 10_000,
            tolerance: 0.01,
            cooldown: Duration::from_secs(60),
        }
    }
}

/// Smoothed load per (layer, expert), tokens per second over all routers.
#[derive(Debug, Clone, Default)]
pub struct LoadTracker {
    pub rate: BTreeMap<usize, Vec<f64>>,
    /// Tokens in the routers' current windows, per layer.
    pub tokens: BTreeMap<usize, u64>,
}

impl LoadTracker {
    /// Folds in the routers' latest records.
    pub fn update(&mut self, records: &[LoadRecord], n_experts: usize, alpha: f64) {
        let mut now: BTreeMap<usize, Vec<f64>> = BTreeMap::new();
        self.tokens.clear();
        for r in records {
            let secs = (r.window_ms as f64 / 1000.0).max(1e-3);
            for (layer, counts) in &r.layers {
                let layer = *layer as usize;
                let sum = now.entry(layer).or_insert_with(|| vec![0.0; n_experts]);
                for (e, &c) in counts.iter().enumerate().take(n_experts) {
                    sum[e] += f64::from(c) / secs;
                }
                *self.tokens.entry(layer).or_default() +=
                    counts.iter().map(|&c| u64::from(c)).sum::<u64>();
            }
        }
        let alpha = alpha.clamp(0.0, 1.0);
        for (layer, x) in now {
            match self.rate.get_mut(&layer) {
                Some(ema) => {
                    for (m, v) in ema.iter_mut().zip(x) {
                        *m = alpha * v + (1.0 - alpha) * *m;
                    }
                }
                None => {
                    self.rate.insert(layer, x);
                }
            }
        }
    }
}

/// Layer `layer` of `rec` as per-node slots with shares (even where the record has none).
pub fn layer_of(rec: &PlacementRecord, layer: usize, n_experts: usize) -> LayerPlacement {
    let mut replicas = vec![0usize; n_experts];
    let mut shared = vec![0u64; n_experts];
    let mut all_shared = vec![true; n_experts];
    for n in &rec.nodes {
        for (i, &(l, e)) in n.experts.iter().enumerate() {
            if l as usize == layer && (e as usize) < n_experts {
                replicas[e as usize] += 1;
                match n.shares.get(i).copied().filter(|&s| s > 0) {
                    Some(s) => shared[e as usize] += u64::from(s),
                    None => all_shared[e as usize] = false,
                }
            }
        }
    }
    let gpus = rec
        .nodes
        .iter()
        .map(|n| {
            n.experts
                .iter()
                .enumerate()
                .filter(|(_, (l, e))| *l as usize == layer && (*e as usize) < n_experts)
                .map(|(i, &(_, e))| {
                    let e = e as usize;
                    let share = match all_shared[e] {
                        true => f64::from(n.shares[i]) / shared[e] as f64,
                        false => 1.0 / replicas[e] as f64,
                    };
                    (e as u32, share)
                })
                .collect()
        })
        .collect();
    LayerPlacement { gpus }
}

/// `rec` with layer `layer` replaced by `next` (node order as in `rec`), shares included.
pub fn with_layer(rec: &PlacementRecord, layer: usize, next: &LayerPlacement) -> PlacementRecord {
    let nodes = rec
        .nodes
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let mut pairs: BTreeMap<(u16, u16), u32> = n
                .experts
                .iter()
                .enumerate()
                .filter(|(_, (l, _))| *l as usize != layer)
                .map(|(k, &p)| (p, n.shares.get(k).copied().unwrap_or(0)))
                .collect();
            for &(e, s) in next.gpus.get(i).map_or(&[][..], Vec::as_slice) {
                let ppm = (s * f64::from(SHARE_UNIT)).round().max(1.0) as u32;
                pairs.insert((layer as u16, e as u16), ppm);
            }
            PlacedNode {
                id: n.id.clone(),
                addr: n.addr.clone(),
                experts: pairs.keys().copied().collect(),
                shares: pairs.values().copied().collect(),
            }
        })
        .collect();
    PlacementRecord {
        version: rec.version,
        nodes,
    }
}

/// One layer's proposed re-placement.
#[derive(Debug, Clone)]
pub struct LayerChange {
    pub layer: usize,
    pub before: f64,
    pub after: f64,
    pub moved: usize,
    pub record: PlacementRecord,
}

/// Slots node `i` may give one of `layers` MoE layers: its fair share of `capacity[i]` (or what
/// the layer holds there already, if more), never more than the other layers leave free.
pub fn layer_slots(
    rec: &PlacementRecord,
    layer: usize,
    capacity: &[usize],
    layers: usize,
) -> Vec<usize> {
    rec.nodes
        .iter()
        .zip(capacity)
        .map(|(n, &cap)| {
            let here = n
                .experts
                .iter()
                .filter(|(l, _)| *l as usize == layer)
                .count();
            let others = n.experts.len() - here;
            (cap / layers.max(1))
                .max(here)
                .min(cap.saturating_sub(others).max(here))
        })
        .collect()
}

/// Re-places `layer` of `rec` for `loads` with `slots[i]` slots on node `i` (see
/// [`layer_slots`]). With `min_replicas` > 1 every expert keeps at least that many replicas
/// ([`rebalance_with_floor`]: only spare slots and replicas above the floor change; a move must
/// gain a tenth of `tolerance`); otherwise the algorithm decides replica counts itself
/// ([`rebalance_layer`]). `None` when no placement fits or it does not improve.
pub fn rebalance(
    rec: &PlacementRecord,
    layer: usize,
    loads: &[f64],
    slots: &[usize],
    min_replicas: usize,
    tolerance: f64,
) -> Option<LayerChange> {
    let current = layer_of(rec, layer, loads.len());
    let before = current.balancedness(loads);
    let (next, moved) = if min_replicas > 1 {
        let budget = slots.iter().sum();
        rebalance_with_floor(
            loads,
            slots,
            &current,
            min_replicas,
            tolerance / 10.0,
            budget,
        )
    } else {
        rebalance_layer(loads, slots, &current, tolerance)
            .map_err(|e| tracing::warn!(layer, error = %e, "cannot rebalance"))
            .ok()?
    };
    let after = next.balancedness(loads);
    (after > before + 1e-9).then(|| LayerChange {
        layer,
        before,
        after,
        moved,
        record: with_layer(rec, layer, &next),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec() -> PlacementRecord {
        // Layer 1: experts 0-3 on a, 4-7 on b; layer 2: all on both.
        let node = |id: &str, es: std::ops::Range<u16>| PlacedNode {
            id: id.into(),
            addr: format!("{id}:1"),
            experts: es.map(|e| (1, e)).chain((0..8).map(|e| (2, e))).collect(),
            shares: vec![],
        };
        PlacementRecord {
            version: 4,
            nodes: vec![node("a", 0..4), node("b", 4..8)],
        }
    }

    #[test]
    fn a_hot_layer_is_replicated_and_split_by_shares_leaving_others_alone() {
        let r = rec();
        let loads = [10.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0];
        let c = rebalance(&r, 1, &loads, &[6, 6], 1, 0.0).expect("improves");
        assert!(
            c.before < 0.66 && c.after > 0.99,
            "{} → {}",
            c.before,
            c.after
        );
        assert_eq!(
            c.moved,
            layer_of(&c.record, 1, 8).moves_from(&layer_of(&r, 1, 8))
        );
        // Layer 2 is untouched; the record resolves to a placement whose node loads match.
        let p = c.record.to_placement(&[1, 2], 8).expect("covers");
        assert_eq!(p.replicas(2, 5), &[0, 1]);
        assert_eq!(p.shares(2, 5), None);
        let b = moe_meta::balancedness(&p.node_loads(1, &loads));
        assert!((b - c.after).abs() < 1e-3, "{b} vs {}", c.after);
        // Balanced already: nothing to do.
        assert!(rebalance(&c.record, 1, &loads, &[6, 6], 1, 0.0).is_none());
    }

    #[test]
    fn a_layer_gets_its_share_of_capacity_within_what_other_layers_leave() {
        let r = rec(); // a: 4 + 8 pairs, b: 4 + 8
        assert_eq!(layer_slots(&r, 1, &[16, 24], 2), vec![8, 12]);
        // a: share 7, but other layers leave 6; b: share 6, but they leave 4.
        assert_eq!(layer_slots(&r, 1, &[14, 12], 2), vec![6, 4]);
        // Over capacity already (capacity lowered): never below what the layer holds.
        assert_eq!(layer_slots(&r, 1, &[6, 6], 2), vec![4, 4]);
    }

    #[test]
    fn loads_are_summed_over_routers_as_rates_and_smoothed() {
        let rec = |c: Vec<u32>, ms| LoadRecord {
            router: "r".into(),
            window_ms: ms,
            layers: vec![(1, c)],
        };
        let mut t = LoadTracker::default();
        t.update(&[rec(vec![10, 0], 1000), rec(vec![20, 4], 2000)], 2, 0.5);
        assert_eq!(t.rate[&1], vec![20.0, 2.0]);
        assert_eq!(t.tokens[&1], 34);
        t.update(&[rec(vec![0, 6], 1000)], 2, 0.5);
        assert_eq!(t.rate[&1], vec![10.0, 4.0]);
    }
}

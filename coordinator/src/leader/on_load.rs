//! Load-driven rebalancing rounds of the leader: measure every layer's balance under the
//! smoothed load and re-place the layers below the threshold, one two-phase rollout each.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use moe_meta::records::PlacementRecord;
use moe_meta::store::MetaStore;
use moe_meta::store::election::Leadership;
use moe_meta::store::mirror::Snapshot;
use moe_meta::store::placements::Slot;
use tokio::sync::watch;

use super::{
    CoordinatorConfig, CoordinatorStatus, LayerRebalance, Rollout, TermEnd, read_placement,
    rollout, same_members,
};
use crate::plan::NodeSlot;
use crate::rebalance::{LoadTracker, layer_of, layer_slots, rebalance};

/// Measures every layer's balance under the smoothed load and, unless `quiet`, re-places the
/// layers below the threshold, worst first, one rollout each. Returns whether anything changed.
#[allow(clippy::too_many_arguments)]
pub(super) async fn rebalance_round(
    store: &Arc<dyn MetaStore>,
    cfg: &CoordinatorConfig,
    leadership: &Leadership,
    status: &watch::Sender<CoordinatorStatus>,
    active: &PlacementRecord,
    live: &[NodeSlot],
    tracker: &LoadTracker,
    quiet: bool,
    nodes: &mut watch::Receiver<Arc<Snapshot>>,
    acks: &mut watch::Receiver<Arc<Snapshot>>,
) -> Result<bool, TermEnd> {
    let mut worst: Vec<(f64, usize)> = Vec::new();
    let mut measured = BTreeMap::new();
    let layers_of_model = tracker
        .rate
        .iter()
        .filter(|(l, _)| cfg.moe_layers.contains(l));
    for (&layer, rate) in layers_of_model {
        let b = layer_of(active, layer, cfg.n_experts).balancedness(rate);
        measured.insert(layer, b);
        let enough = tracker.tokens.get(&layer).copied().unwrap_or(0) >= cfg.rebalance.min_tokens;
        if b < cfg.rebalance.threshold && enough {
            worst.push((b, layer));
        }
    }
    status.send_modify(|s| s.balancedness = measured);
    if quiet || worst.is_empty() || !same_members(active, live) {
        return Ok(false);
    }
    worst.sort_by(|a, b| a.0.total_cmp(&b.0));
    let layers = cfg.moe_layers.len().max(1);
    let capacity: Vec<usize> = active
        .nodes
        .iter()
        .map(|n| live.iter().find(|l| l.id == n.id).map_or(0, |l| l.capacity))
        .collect();
    let pending = read_placement(store, &cfg.keys, Slot::Pending)
        .await?
        .map_or(0, |p| p.version);
    let mut rec = active.clone();
    let mut changed = false;
    status.send_modify(|s| s.rebalance_compute.clear());
    for (_, layer) in worst {
        let slots = layer_slots(&rec, layer, &capacity, layers);
        // Off the async workers: a large layer's re-placement takes a while.
        let (r, rate) = (rec.clone(), tracker.rate[&layer].clone());
        let (floor, tolerance) = (
            cfg.min_replicas.min(active.nodes.len()),
            cfg.rebalance.tolerance,
        );
        let computed = tokio::task::spawn_blocking(move || {
            let t = Instant::now();
            let change = rebalance(&r, layer, &rate, &slots, floor, tolerance);
            (change, t.elapsed())
        })
        .await;
        let change = match computed {
            Ok((change, took)) => {
                status.send_modify(|s| {
                    s.rebalance_compute.insert(layer, took.as_secs_f64());
                });
                change
            }
            Err(e) => {
                tracing::warn!(layer, error = %e, "re-placing a layer failed");
                status.send_modify(|s| s.rebalance_error("compute_failed"));
                None
            }
        };
        let Some(mut change) = change else {
            continue;
        };
        if change.after < change.before + 0.01 {
            continue;
        }
        let started = Instant::now();
        let version = rec.version.max(pending) + 1;
        change.record.version = version;
        tracing::info!(
            layer,
            version,
            before = change.before,
            after = change.after,
            moved = change.moved,
            "rebalancing a layer"
        );
        status.send_modify(|s| s.rollouts += 1);
        let done = rollout(store, cfg, leadership, &change.record, true, nodes, acks).await?;
        if !matches!(done, Rollout::Done) {
            tracing::warn!(layer, version, outcome = ?done, "a layer's rollout did not complete; the round stops");
            status.send_modify(|s| s.rebalance_error("rollout_failed"));
            return Ok(changed);
        }
        let done = LayerRebalance {
            layer,
            version,
            before: change.before,
            after: change.after,
            moved: change.moved,
        };
        tracing::info!(
            layer,
            version,
            moved = change.moved,
            ms = started.elapsed().as_millis() as u64,
            "layer rebalanced"
        );
        status.send_modify(|s| {
            s.active_version = version;
            s.last_moved = change.moved;
            s.nodes = change.record.nodes.len();
            s.last_rollout = started.elapsed();
            s.balancedness.insert(layer, change.after);
            s.last_rebalance = Some(done);
        });
        rec = change.record;
        changed = true;
    }
    Ok(changed)
}

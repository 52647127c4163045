//! Publishing the router's load window (token counts per (layer, expert) over the last minute)
//! under `load/<router id>`, on the router's lease, and the load gauges of `/metrics`.

use std::sync::Arc;

use moe_meta::records::{self, LoadRecord};
use moe_meta::store::{LeaseId, MetaStore};

use super::FollowConfig;
use crate::RemoteExperts;

/// Publishes the router's load window and sets the load gauges.
pub async fn publish_loads(
    store: &Arc<dyn MetaStore>,
    cfg: &FollowConfig,
    experts: &RemoteExperts,
    lease: LeaseId,
) {
    let (covered, layers) = experts.loads.snapshot(cfg.n_experts);
    let routes = experts.routes();
    for (&layer, counts) in &layers {
        let loads: Vec<f64> = counts.iter().map(|&c| f64::from(c)).collect();
        let total: f64 = loads.iter().sum();
        let hottest = loads.iter().copied().fold(0.0, f64::max);
        let label = layer.to_string();
        metrics::gauge!(crate::metrics::HOTTEST_SHARE, "layer" => label.clone())
            .set(if total > 0.0 { hottest / total } else { 0.0 });
        if let Some(p) = &routes.placement {
            let b = moe_meta::balancedness(&p.node_loads(layer, &loads));
            metrics::gauge!(crate::metrics::LAYER_BALANCEDNESS, "layer" => label).set(b);
        }
    }
    let rec = LoadRecord {
        router: cfg.id.clone(),
        window_ms: covered.as_millis() as u64,
        layers: layers.into_iter().map(|(l, c)| (l as u16, c)).collect(),
    };
    if let Err(e) = store
        .put(&cfg.keys.load(&cfg.id), records::encode(&rec), Some(lease))
        .await
    {
        tracing::warn!(router = %cfg.id, error = %e, "cannot publish load counts");
    }
}

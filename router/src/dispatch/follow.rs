//! A router in a coordinated cluster: register under a lease (with the placement version it
//! routes with), follow `placement/active`, switch the dispatch routes, then report the new
//! version, which is what lets nodes unload experts the new placement moved away. Re-registers
//! after losing its lease; keeps routing with the last active placement while the store is
//! unreachable. Every `load_publish` it also publishes its token counts per (layer, expert)
//! under `load/<id>` (same lease) and sets the load gauges of `/metrics`.

use std::sync::Arc;
use std::time::Duration;

use moe_meta::records::{self, Keys, LoadRecord, PlacementRecord, RouterRecord};
use moe_meta::store::MetaStore;
use moe_meta::store::lease::LeaseKeeper;
use moe_meta::store::mirror::mirror;
use moe_meta::store::wait_until;
use tokio::sync::watch;

use super::RemoteExperts;

/// How the router takes part in the cluster.
#[derive(Debug, Clone)]
pub struct FollowConfig {
    pub keys: Keys,
    pub id: String,
    /// The HTTP address clients use (informational).
    pub addr: String,
    pub moe_layers: Vec<usize>,
    pub n_experts: usize,
    pub lease_ttl: Duration,
    /// How often to publish load counts.
    pub load_publish: Duration,
}

/// Publishes the router's load window and sets the load gauges.
async fn publish_loads(
    store: &Arc<dyn MetaStore>,
    cfg: &FollowConfig,
    experts: &RemoteExperts,
    lease: i64,
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

/// Follows the active placement until `shutdown` becomes true.
pub async fn follow(
    store: Arc<dyn MetaStore>,
    cfg: FollowConfig,
    experts: Arc<RemoteExperts>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut placements = mirror(store.clone(), cfg.keys.placement());
    let record = |v: u64| {
        records::encode(&RouterRecord {
            id: cfg.id.clone(),
            addr: cfg.addr.clone(),
            placement_version: v,
        })
    };
    loop {
        let Some(lease) =
            LeaseKeeper::start_retrying(&store, cfg.lease_ttl, &cfg.id, &mut shutdown).await
        else {
            return;
        };
        let mut lost = lease.lost();
        let mut reported = None;
        // Store revision of the active placement last acted on (under this lease: a store that
        // lost our lease may have lost its history too).
        let mut applied = 0;
        let mut publish = tokio::time::interval(cfg.load_publish.max(Duration::from_millis(10)));
        loop {
            let snap = placements.borrow_and_update().clone();
            let key = cfg.keys.active();
            // The prefix also holds pending and every node's ack: act on a new active only.
            if let Some(kv) = snap.entries.get(&key)
                && kv.mod_revision != applied
            {
                applied = kv.mod_revision;
                match records::decode::<PlacementRecord>(&key, &kv.value)
                    .map(|r| r.to_placement(&cfg.moe_layers, cfg.n_experts))
                {
                    Ok(Ok(p)) if p.version != experts.placement_version() => experts.update(p),
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => {
                        tracing::error!(error = %e, "the active placement does not fit the model")
                    }
                    Err(e) => tracing::error!(error = %e, "cannot decode the active placement"),
                }
            }
            let v = experts.placement_version();
            if reported != Some(v) {
                match store
                    .put(&cfg.keys.router(&cfg.id), record(v), Some(lease.id))
                    .await
                {
                    Ok(_) => reported = Some(v),
                    Err(e) => {
                        tracing::warn!(router = %cfg.id, error = %e, "cannot report the placement version")
                    }
                }
            }
            tokio::select! {
                _ = placements.changed() => {}
                _ = publish.tick() => publish_loads(&store, &cfg, &experts, lease.id).await,
                _ = wait_until(&mut lost, |l| *l) => break,
                _ = tokio::time::sleep(Duration::from_secs(1)), if reported != Some(v) => {}
                _ = wait_until(&mut shutdown, |s| *s) => {
                    let _ = store.revoke(lease.id).await;
                    return;
                }
            }
        }
        tracing::warn!(router = %cfg.id, "lease lost; registering again");
    }
}

//! A router in a coordinated cluster: register under a lease (with the placement version it
//! routes with), follow `placement/active`, switch the dispatch routes, then report the new
//! version, which is what lets nodes unload experts the new placement moved away. Every
//! `load_publish` it also publishes its load counts ([`super::load`]).
//!
//! The placement comes through a [`PlacementFeed`]: the watched values are deltas against the
//! pending the router holds, the whole record is read only when that base is missing.
//!
//! The lease and what happens when it is lost live in [`moe_meta::store::register::hold`]:
//! while etcd is unreachable the router keeps its lease (and keeps routing with the last active
//! placement); only a lease etcd says is gone makes it register again.

use std::sync::Arc;
use std::time::Duration;

use moe_meta::records::{self, Keys, RouterRecord};
use moe_meta::store::MetaStore;
use moe_meta::store::mirror::{Snapshot, mirror};
use moe_meta::store::placements::PlacementFeed;
use moe_meta::store::register::{Term, TermError, hold};
use tokio::sync::watch;

use super::load::{Published, publish_loads};
use crate::RemoteExperts;

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

/// Follows the active placement until `shutdown` becomes true.
pub async fn follow(
    store: Arc<dyn MetaStore>,
    cfg: FollowConfig,
    experts: Arc<RemoteExperts>,
    shutdown: watch::Receiver<bool>,
) {
    let placements = mirror(store.clone(), cfg.keys.placement());
    let r = hold(store.clone(), &cfg.id, cfg.lease_ttl, shutdown, |term| {
        let (store, cfg, experts) = (store.clone(), cfg.clone(), experts.clone());
        let mut placements = placements.clone();
        async move { run_term(&store, &cfg, &experts, &mut placements, term).await }
    })
    .await;
    if let Err(e) = r {
        tracing::error!(router = %cfg.id, error = %e, "router left the cluster");
    }
}

/// Acts on a new active placement of `feed`, if there is one (`applied`: the digest of the
/// last one acted on).
fn apply_active(
    cfg: &FollowConfig,
    experts: &RemoteExperts,
    feed: &PlacementFeed,
    applied: &mut Option<u64>,
) {
    // The feed also holds the pending: act on a new active only.
    let Some(a) = feed.active() else {
        return;
    };
    if *applied == Some(a.digest) {
        return;
    }
    *applied = Some(a.digest);
    match a.record.to_placement(&cfg.moe_layers, cfg.n_experts) {
        Ok(p) if p.version != experts.placement_version() => experts.update(p),
        Ok(_) => {}
        Err(e) => tracing::error!(error = %e, "the active placement does not fit the model"),
    }
}

/// One registration term: report the routed version under `term.lease`, follow placements and
/// publish loads; returns only when a store write fails for long (the caller runs it again
/// under the same lease).
async fn run_term(
    store: &Arc<dyn MetaStore>,
    cfg: &FollowConfig,
    experts: &RemoteExperts,
    placements: &mut watch::Receiver<Arc<Snapshot>>,
    term: Term,
) -> Result<(), TermError> {
    // Digest of the active placement last acted on (re-applying one is a no-op).
    let mut applied = None;
    let mut feed = PlacementFeed::new(store.clone(), cfg.keys.clone());
    let mut published = Published::default();
    let record = |v: u64| {
        records::encode(&RouterRecord {
            id: cfg.id.clone(),
            addr: cfg.addr.clone(),
            placement_version: v,
        })
    };
    let mut reported = None;
    let mut publish = tokio::time::interval(cfg.load_publish.max(Duration::from_millis(10)));
    publish.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let snap = placements.borrow_and_update().clone();
        let current = snap.revision == 0 || feed.update(&snap).await;
        apply_active(cfg, experts, &feed, &mut applied);
        let v = experts.placement_version();
        if reported != Some(v) {
            match store
                .put(&cfg.keys.router(&cfg.id), record(v), Some(term.lease))
                .await
            {
                Ok(_) => {
                    if reported.is_none() {
                        tracing::info!(router = %cfg.id, lease = term.lease, "registered");
                    }
                    reported = Some(v);
                }
                Err(moe_meta::store::StoreError::LeaseGone(_)) => {
                    // The keeper reports the loss; wait for it rather than spin.
                    std::future::pending::<()>().await;
                }
                Err(e) => {
                    tracing::warn!(router = %cfg.id, error = %e, "cannot report the placement version")
                }
            }
        }
        tokio::select! {
            r = placements.changed() => if r.is_err() {
                return Err(TermError::Retry("placement mirror closed".into()));
            },
            _ = publish.tick() => publish_loads(store, cfg, experts, term.lease, &mut published).await,
            _ = tokio::time::sleep(Duration::from_secs(1)), if reported != Some(v) => {}
            // A placement the feed could not resolve (the store did not answer): again soon.
            _ = tokio::time::sleep(Duration::from_millis(500)), if !current => {}
        }
    }
}

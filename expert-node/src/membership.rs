//! An expert node in a coordinated cluster: register under a lease, follow the placement, load
//! what the pending and active placements give this node, acknowledge a version once everything
//! it needs is loaded, serve the versions routers may still use, and unload experts only once
//! every router routes with a placement that no longer needs them.
//!
//! A node that loses its lease stops acknowledging and serving new versions (it only keeps the
//! active one) and registers again with a new lease.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use moe_meta::records::{self, AckRecord, Keys, NodeRecord, PlacementRecord, RouterRecord};
use moe_meta::store::lease::LeaseKeeper;
use moe_meta::store::mirror::{Snapshot, mirror};
use moe_meta::store::wait_until;
use moe_meta::store::{MetaStore, StoreError};
use tokio::sync::watch;

use crate::node::ExpertNode;

/// How the node takes part in the cluster.
#[derive(Debug, Clone)]
pub struct MemberConfig {
    pub keys: Keys,
    /// The address routers dial.
    pub addr: String,
    /// (layer, expert) pairs this node can hold.
    pub capacity: usize,
    pub lease_ttl: Duration,
}

fn placement(snap: &Snapshot, key: &str) -> Option<PlacementRecord> {
    let kv = snap.entries.get(key)?;
    records::decode_or_skip(key, &kv.value)
}

/// Lowest placement version any router reports (None: no router registered).
fn min_router_version(snap: &Snapshot) -> Option<u64> {
    snap.entries
        .iter()
        .filter_map(|(k, kv)| records::decode_or_skip::<RouterRecord>(k, &kv.value))
        .map(|r| r.placement_version)
        .min()
}

/// One pass: load, serve, acknowledge, unload. Returns the version acknowledged.
async fn reconcile(
    node: &Arc<ExpertNode>,
    store: &Arc<dyn MetaStore>,
    cfg: &MemberConfig,
    placements: &Snapshot,
    routers: &Snapshot,
    lease: i64,
) -> Result<Option<u64>, StoreError> {
    let active = placement(placements, &cfg.keys.active());
    let pending = placement(placements, &cfg.keys.pending());
    let mut desired: BTreeSet<(usize, usize)> = BTreeSet::new();
    for p in [&active, &pending].into_iter().flatten() {
        desired.extend(p.pairs_of(&node.id));
    }
    let hosted = node.hosted();
    let missing: Vec<(usize, usize)> = desired.difference(&hosted).copied().collect();
    let newest_rec = [&pending, &active]
        .into_iter()
        .flatten()
        .max_by_key(|p| p.version);
    if !missing.is_empty() {
        let n = node.clone();
        let loaded = tokio::task::spawn_blocking(move || n.load_pairs(&missing)).await;
        let why = match loaded {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(e) => Some(format!("load task failed: {e}")),
        };
        if let Some(why) = why {
            tracing::error!(node = %node.id, error = %why, "cannot load experts");
            // Say so, naming the record, so the coordinator re-plans without this node.
            if let Some(rec) = newest_rec {
                let ack = AckRecord {
                    error: Some(why),
                    ..AckRecord::loaded(rec)
                };
                write_ack(store, cfg, placements, &node.id, &ack, lease).await?;
            }
            return Ok(None);
        }
    }
    // Serve every version from the oldest one a router may still use up to the newest.
    let active_v = active.as_ref().map(|p| p.version);
    let newest = pending.as_ref().map(|p| p.version).max(active_v);
    if let Some(newest) = newest {
        let oldest = min_router_version(routers).map_or(active_v.unwrap_or(newest), |r| {
            r.min(active_v.unwrap_or(newest))
        });
        node.set_versions((oldest.min(newest)..=newest).collect());
    }
    // Acknowledge the newest record (its experts are all here).
    if let Some(rec) = newest_rec {
        write_ack(
            store,
            cfg,
            placements,
            &node.id,
            &AckRecord::loaded(rec),
            lease,
        )
        .await?;
    }
    let acked = newest;
    // Unload what no placement needs once every router routes with the active version. A node
    // the active placement does not name (back from a lease blip, not yet re-placed) keeps what
    // it holds: the coordinator gives it back without loading anything.
    let named = active
        .as_ref()
        .is_some_and(|a| a.nodes.iter().any(|n| n.id == node.id));
    if let Some(av) = active_v
        && named
        && pending.is_none()
        && min_router_version(routers).is_none_or(|r| r >= av)
    {
        let extra: Vec<(usize, usize)> = node.hosted().difference(&desired).copied().collect();
        node.unload_pairs(&extra);
    }
    Ok(acked)
}

/// Writes `ack` unless that very ack is in the store under this lease already: acks live under
/// the watched placement prefix, so writing one again would wake every node to write theirs
/// again, without end.
async fn write_ack(
    store: &Arc<dyn MetaStore>,
    cfg: &MemberConfig,
    placements: &Snapshot,
    id: &str,
    ack: &AckRecord,
    lease: i64,
) -> Result<(), StoreError> {
    let key = cfg.keys.ack(id);
    let rec = records::encode(ack);
    let stored = placements.entries.get(&key);
    if stored.is_none_or(|kv| kv.lease != lease || kv.value != rec) {
        store.put(&key, rec, Some(lease)).await?;
    }
    Ok(())
}

/// Registers `node` and follows the placement until `shutdown` resolves.
pub async fn run_member(
    node: Arc<ExpertNode>,
    store: Arc<dyn MetaStore>,
    cfg: MemberConfig,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut placements = mirror(store.clone(), cfg.keys.placement());
    let mut routers = mirror(store.clone(), cfg.keys.routers());
    let record = NodeRecord {
        id: node.id.clone(),
        addr: cfg.addr.clone(),
        capacity: cfg.capacity as u32,
        backend: node.info().backend,
        version: env!("CARGO_PKG_VERSION").to_string(),
    };
    loop {
        let Some(lease) =
            LeaseKeeper::start_retrying(&store, cfg.lease_ttl, &node.id, &mut shutdown).await
        else {
            return;
        };
        if let Err(e) = store
            .put(
                &cfg.keys.node(&node.id),
                records::encode(&record),
                Some(lease.id),
            )
            .await
        {
            tracing::warn!(node = %node.id, error = %e, "cannot register; retrying");
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        }
        tracing::info!(node = %node.id, lease = lease.id, "registered");
        let mut lost = lease.lost();
        // What the last successful reconcile saw: the placement prefix also holds every node's
        // ack, and those alone change nothing here.
        let mut done: Option<(i64, i64, i64)> = None;
        loop {
            let (p, r) = (
                placements.borrow_and_update().clone(),
                routers.borrow_and_update().clone(),
            );
            let rev = |key: &str| p.entries.get(key).map_or(0, |kv| kv.mod_revision);
            let seen = (
                rev(&cfg.keys.active()),
                rev(&cfg.keys.pending()),
                r.revision,
            );
            if p.revision > 0 && done != Some(seen) {
                match reconcile(&node, &store, &cfg, &p, &r, lease.id).await {
                    Ok(Some(_)) => done = Some(seen),
                    Ok(None) => {}
                    Err(e) => tracing::warn!(node = %node.id, error = %e, "reconcile failed"),
                }
            }
            tokio::select! {
                _ = placements.changed() => {}
                _ = routers.changed() => {}
                _ = wait_until(&mut lost, |l| *l) => break,
                _ = wait_until(&mut shutdown, |s| *s) => {
                    let _ = store.revoke(lease.id).await;
                    return;
                }
            }
        }
        // Lease lost: keep serving only the active version until registered again.
        let active = placement(&placements.borrow(), &cfg.keys.active()).map(|p| p.version);
        node.set_versions(active.into_iter().collect());
        tracing::warn!(node = %node.id, "lease lost; registering again");
    }
}

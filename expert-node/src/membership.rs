//! An expert node in a coordinated cluster: register under a lease, follow the placement, load
//! what the pending and active placements give this node, acknowledge a version once everything
//! it needs is loaded, serve the versions routers may still use, and unload experts only once
//! every router routes with a placement that no longer needs them. What routers use comes from
//! the coordinator's one-key summary (`router-versions`), not from every router's record.
//!
//! The lease and the lease-loss policy are [`moe_meta::store::register::hold`]'s: the node
//! keeps its lease while etcd is unreachable; only a lease etcd says is gone makes it register
//! again (acks are written under the lease, so none is written meanwhile). Its id is
//! [`claim`]ed: a second live process with the same id is refused.
//!
//! The placement comes through a [`PlacementFeed`] (deltas applied to the record held, the whole
//! record read only when the base is missing). Acks go to `acks/<node>`, outside the
//! `placement/` prefix every node and router watches, so a rollout's thousand acks reach the
//! coordinator alone; a record a coordinator of the previous format wrote is acknowledged
//! where that coordinator reads acks.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use moe_meta::records::wire::Resolved;
use moe_meta::records::{self, AckRecord, Keys, NodeRecord, RouterVersions};
use moe_meta::store::mirror::{Snapshot, mirror};
use moe_meta::store::placements::PlacementFeed;
use moe_meta::store::register::{Term, TermError, claim, hold};
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

/// Lowest placement version any router reports (None: no router registered), from the
/// coordinator's `router-versions` summary (the snapshot of that one key).
fn min_router_version(snap: &Snapshot) -> Option<u64> {
    snap.entries
        .iter()
        .filter_map(|(k, kv)| records::decode_or_skip::<RouterVersions>(k, &kv.value))
        .find_map(|r| r.oldest)
}

/// One pass: load, serve, acknowledge, unload. Returns the version acknowledged.
async fn reconcile(
    node: &Arc<ExpertNode>,
    store: &Arc<dyn MetaStore>,
    cfg: &MemberConfig,
    feed: &PlacementFeed,
    routers: &Snapshot,
    lease: i64,
    last_ack: &mut Option<(String, Vec<u8>)>,
) -> Result<Option<u64>, StoreError> {
    let active = feed.active();
    let pending = feed.pending();
    let mut desired: BTreeSet<(usize, usize)> = BTreeSet::new();
    for p in [&active, &pending].into_iter().flatten() {
        desired.extend(p.record.pairs_of(&node.id));
    }
    let hosted = node.hosted();
    let missing: Vec<(usize, usize)> = desired.difference(&hosted).copied().collect();
    let newest_rec = [&pending, &active]
        .into_iter()
        .flatten()
        .max_by_key(|p| p.record.version);
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
                    ..AckRecord::of(rec.record.version, rec.digest)
                };
                write_ack(store, cfg, rec, &node.id, &ack, lease, last_ack).await?;
            }
            return Ok(None);
        }
    }
    // Serve every version from the oldest one a router may still use up to the newest.
    let active_v = active.as_ref().map(|p| p.record.version);
    let newest = pending.as_ref().map(|p| p.record.version).max(active_v);
    if let Some(newest) = newest {
        let oldest = min_router_version(routers).map_or(active_v.unwrap_or(newest), |r| {
            r.min(active_v.unwrap_or(newest))
        });
        node.set_versions((oldest.min(newest)..=newest).collect());
    }
    // Acknowledge the newest record (its experts are all here).
    if let Some(rec) = newest_rec {
        let ack = AckRecord::of(rec.record.version, rec.digest);
        write_ack(store, cfg, rec, &node.id, &ack, lease, last_ack).await?;
    }
    let acked = newest;
    // Unload what no placement needs once every router routes with the active version. A node
    // the active placement does not name (back from a lease blip, not yet re-placed) keeps what
    // it holds: the coordinator gives it back without loading anything.
    let named = active
        .as_ref()
        .is_some_and(|a| a.record.nodes.iter().any(|n| n.id == node.id));
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

/// Writes `ack` of `rec` unless this term wrote that very ack already (`last`): an ack of a
/// legacy record goes where its coordinator reads them, under the watched placement prefix,
/// where writing one again would wake every node to write theirs again, without end.
async fn write_ack(
    store: &Arc<dyn MetaStore>,
    cfg: &MemberConfig,
    rec: &Resolved,
    id: &str,
    ack: &AckRecord,
    lease: i64,
    last: &mut Option<(String, Vec<u8>)>,
) -> Result<(), StoreError> {
    let key = match rec.legacy {
        true => cfg.keys.legacy_ack(id),
        false => cfg.keys.ack(id),
    };
    let value = records::encode(ack);
    if last.as_ref() != Some(&(key.clone(), value.clone())) {
        store.put(&key, value.clone(), Some(lease)).await?;
        *last = Some((key, value));
    }
    Ok(())
}

/// Registers `node` and follows the placement until `shutdown` resolves. `Err` when the node
/// cannot take part (its id is held by another live process): the caller should exit with it.
pub async fn run_member(
    node: Arc<ExpertNode>,
    store: Arc<dyn MetaStore>,
    cfg: MemberConfig,
    shutdown: watch::Receiver<bool>,
) -> Result<(), String> {
    let placements = mirror(store.clone(), cfg.keys.placement());
    let routers = mirror(store.clone(), cfg.keys.router_versions());
    let record = NodeRecord {
        id: node.id.clone(),
        addr: cfg.addr.clone(),
        capacity: cfg.capacity as u32,
        backend: node.info().backend,
        version: env!("CARGO_PKG_VERSION").to_string(),
    };
    let id = node.id.clone();
    hold(store.clone(), &id, cfg.lease_ttl, shutdown, |term| {
        let (node, store, cfg, record) = (node.clone(), store.clone(), cfg.clone(), record.clone());
        let (placements, routers) = (placements.clone(), routers.clone());
        async move { run_term(&node, &store, &cfg, &record, placements, routers, &term).await }
    })
    .await
}

/// One registration term: claim the node's id under `term.lease`, then reconcile on every
/// change of the placement or router prefixes.
async fn run_term(
    node: &Arc<ExpertNode>,
    store: &Arc<dyn MetaStore>,
    cfg: &MemberConfig,
    record: &NodeRecord,
    mut placements: watch::Receiver<Arc<Snapshot>>,
    mut routers: watch::Receiver<Arc<Snapshot>>,
    term: &Term,
) -> Result<(), TermError> {
    // A restarted node waits out its predecessor's lease (two TTLs) before refusing.
    claim(
        store.as_ref(),
        &cfg.keys.node(&node.id),
        records::encode(record),
        term.lease,
        2 * term.ttl,
    )
    .await?;
    tracing::info!(node = %node.id, lease = term.lease, "registered");
    // What the last successful reconcile saw (with both placements resolved): a router
    // re-reporting the same version changes nothing here.
    let mut done: Option<(i64, i64, i64)> = None;
    let mut feed = PlacementFeed::new(store.clone(), cfg.keys.clone());
    let mut last_ack = None;
    loop {
        let (p, r) = (
            placements.borrow_and_update().clone(),
            routers.borrow_and_update().clone(),
        );
        let current = p.revision > 0 && feed.update(&p).await;
        let rev = |key: &str| p.entries.get(key).map_or(0, |kv| kv.mod_revision);
        let seen = (
            rev(&cfg.keys.active()),
            rev(&cfg.keys.pending()),
            r.revision,
        );
        if p.revision > 0 && done != Some(seen) {
            match reconcile(node, store, cfg, &feed, &r, term.lease, &mut last_ack).await {
                Ok(Some(_)) if current => done = Some(seen),
                Ok(Some(_)) => {}
                Ok(None) => {}
                // The keeper reports the loss; nothing to do under this lease meanwhile.
                Err(StoreError::LeaseGone(_)) => std::future::pending::<()>().await,
                Err(e) => tracing::warn!(node = %node.id, error = %e, "reconcile failed"),
            }
        }
        tokio::select! {
            r = placements.changed() => if r.is_err() {
                return Err(TermError::Retry("placement mirror closed".into()));
            },
            r = routers.changed() => if r.is_err() {
                return Err(TermError::Retry("router mirror closed".into()));
            },
            // A placement the feed could not resolve (the store did not answer): again soon.
            _ = tokio::time::sleep(Duration::from_millis(500)), if p.revision > 0 && !current => {}
        }
    }
}

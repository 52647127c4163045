//! The coordinator: campaign for leadership under a lease; while leading, watch node
//! membership, plan the placement ([`crate::plan`]) and roll every change out in two phases:
//! write it as `pending` (version v+1), wait until every node in it has acknowledged v+1 (it has
//! loaded what it needs), then make it `active` and drop `pending` in one transaction. Every
//! write is fenced on the election key, so a deposed leader cannot write. Losing the lease (or
//! the store) ends the term; the coordinator campaigns again.
//!
//! With load-driven rebalancing on ([`RebalanceConfig::threshold`] > 0), every interval it also
//! folds the routers' load records into a moving average, measures each layer's balancedness
//! under the active placement, and re-places the layers below the threshold one at a time, each
//! as its own two-phase rollout, so nodes load one layer's new replicas at a time and serving
//! never stops. Membership changes come first: load rebalancing waits until the active
//! placement covers exactly the live nodes. With `min_replicas` > 1 it keeps that floor and
//! only adds replicas of hot experts.

use std::sync::Arc;
use std::time::{Duration, Instant};

use moe_meta::records::{self, AckRecord, Keys, LoadRecord, NodeRecord, PlacementRecord};
use moe_meta::store::election::{Leadership, campaign};
use moe_meta::store::mirror::{Snapshot, mirror};
use moe_meta::store::register::{Term, TermError, hold};
use moe_meta::store::wait_until;
use moe_meta::store::{MetaStore, Op, StoreError};
use tokio::sync::watch;
use tracing::Instrument;

use crate::plan::{NodeSlot, plan};
use crate::rebalance::{LoadTracker, RebalanceConfig};

mod on_load;
mod status;

use on_load::rebalance_round;
pub use status::{CoordinatorStatus, LayerRebalance};

/// What the coordinator needs to know.
#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    /// This replica's id (unique among coordinators).
    pub id: String,
    pub keys: Keys,
    pub moe_layers: Vec<usize>,
    pub n_experts: usize,
    pub min_replicas: usize,
    pub lease_ttl: Duration,
    /// Longest wait for nodes to acknowledge a pending placement before re-planning.
    pub ack_timeout: Duration,
    pub rebalance: RebalanceConfig,
}

#[derive(Debug, thiserror::Error)]
enum TermEnd {
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("no longer the leader (a fenced write failed)")]
    Deposed,
}

fn live_nodes(snap: &Snapshot) -> Vec<NodeSlot> {
    snap.entries
        .iter()
        .filter_map(|(k, kv)| records::decode_or_skip::<NodeRecord>(k, &kv.value))
        .map(|n| NodeSlot {
            id: n.id,
            addr: n.addr,
            capacity: n.capacity as usize,
        })
        .collect()
}

/// The placement record stored at `key` (`active` or `pending`), if any and readable.
async fn read_placement(
    store: &Arc<dyn MetaStore>,
    key: &str,
) -> Result<Option<PlacementRecord>, StoreError> {
    Ok(store
        .get(key)
        .await?
        .and_then(|kv| records::decode_or_skip(&kv.key, &kv.value)))
}

/// Runs a coordinator replica until `shutdown` becomes true. The lease and its loss policy are
/// [`hold`]'s: a term that ends (a store error, deposed) campaigns again under the same lease,
/// so no election key is left on an abandoned lease; a lost lease means a new one.
pub async fn run(
    store: Arc<dyn MetaStore>,
    cfg: CoordinatorConfig,
    status: watch::Sender<CoordinatorStatus>,
    shutdown: watch::Receiver<bool>,
) {
    let r = hold(store.clone(), &cfg.id, cfg.lease_ttl, shutdown, |term| {
        let (store, cfg, status) = (&store, &cfg, &status);
        async move { serve_term(store, cfg, status, term).await }
    })
    .await;
    status.send_modify(|s| s.leading = false);
    if let Err(e) = r {
        tracing::error!(id = %cfg.id, error = %e, "coordinator stopped");
    }
}

/// Sets `leading` back to false when a term ends, however it ends (the term's future is
/// dropped when the lease is lost or on shutdown).
struct StepDown<'a>(&'a watch::Sender<CoordinatorStatus>, &'a str);

impl Drop for StepDown<'_> {
    fn drop(&mut self) {
        self.0.send_modify(|s| s.leading = false);
        tracing::warn!(id = %self.1, "term ended");
    }
}

/// One term: campaign under `term.lease`, then lead until leadership ends.
async fn serve_term(
    store: &Arc<dyn MetaStore>,
    cfg: &CoordinatorConfig,
    status: &watch::Sender<CoordinatorStatus>,
    term: Term,
) -> Result<(), TermError> {
    let leadership = campaign(store.clone(), &cfg.keys.election(), &cfg.id, term.lease).await?;
    tracing::info!(id = %cfg.id, "leading");
    status.send_modify(|s| s.leading = true);
    let _step_down = StepDown(status, &cfg.id);
    match lead(store, cfg, &leadership, status).await {
        Ok(()) => Err(TermError::Retry("the membership mirror closed".into())),
        Err(e) => Err(TermError::Retry(e.to_string())),
    }
}

async fn lead(
    store: &Arc<dyn MetaStore>,
    cfg: &CoordinatorConfig,
    leadership: &Leadership,
    status: &watch::Sender<CoordinatorStatus>,
) -> Result<(), TermEnd> {
    let mut nodes = mirror(store.clone(), cfg.keys.nodes());
    let mut acks = mirror(store.clone(), cfg.keys.acks());
    let _ = wait_until(&mut nodes, |s| s.revision > 0).await;
    let _ = wait_until(&mut acks, |s| s.revision > 0).await;
    let loads = mirror(store.clone(), cfg.keys.loads());
    let mut tracker = LoadTracker::default();
    let mut tick = tokio::time::interval(cfg.rebalance.interval.max(Duration::from_millis(10)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut quiet_until = tokio::time::Instant::now();
    loop {
        let noticed = Instant::now();
        let live = live_nodes(&nodes.borrow_and_update());
        let active = read_placement(store, &cfg.keys.active()).await?;
        let pending = read_placement(store, &cfg.keys.pending()).await?;
        if let Some(a) = &active {
            status.send_modify(|s| s.active_version = a.version);
        }
        if !live.is_empty() && active.as_ref().is_none_or(|a| !same_members(a, &live)) {
            match plan(
                active.as_ref(),
                &live,
                &cfg.moe_layers,
                cfg.n_experts,
                cfg.min_replicas,
            ) {
                Ok(next) if active.as_ref().is_none_or(|a| a.nodes != next.nodes) => {
                    let version = active
                        .as_ref()
                        .map_or(0, |a| a.version)
                        .max(pending.as_ref().map_or(0, |p| p.version))
                        + 1;
                    let rec = PlacementRecord {
                        version,
                        nodes: next.nodes,
                    };
                    tracing::info!(
                        version,
                        nodes = live.len(),
                        moved = next.moved,
                        "rolling out a placement"
                    );
                    let span = tracing::info_span!(
                        "coordinator.rollout",
                        moe.version = version,
                        moe.moved = next.moved,
                        moe.nodes = rec.nodes.len(),
                        moe.duration_seconds = tracing::field::Empty,
                        moe.completed = false
                    );
                    if rollout(store, cfg, leadership, &rec, &mut nodes, &mut acks)
                        .instrument(span.clone())
                        .await?
                    {
                        let took = noticed.elapsed();
                        span.record("moe.duration_seconds", took.as_secs_f64());
                        span.record("moe.completed", true);
                        tracing::info!(
                            version,
                            moved = next.moved,
                            ms = took.as_millis() as u64,
                            "placement active"
                        );
                        // The load balance of the new membership is judged at once.
                        quiet_until = tokio::time::Instant::now();
                        status.send_modify(|s| {
                            s.active_version = version;
                            s.last_moved = next.moved;
                            s.nodes = rec.nodes.len();
                            s.last_rollout = took;
                            s.rollouts += 1;
                            s.rollout_seconds += took.as_secs_f64();
                        });
                    }
                    continue;
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "no placement fits the live nodes"),
            }
        }
        tokio::select! {
            r = nodes.changed() => if r.is_err() {
                return Ok(());
            },
            _ = tick.tick(), if cfg.rebalance.threshold > 0.0 => {
                let records: Vec<LoadRecord> = loads
                    .borrow()
                    .entries
                    .iter()
                    .filter_map(|(k, kv)| records::decode_or_skip(k, &kv.value))
                    .collect();
                tracker.update(&records, cfg.n_experts, cfg.rebalance.alpha);
                if let Some(a) = &active {
                    let quiet = tokio::time::Instant::now() < quiet_until;
                    let span = tracing::info_span!("coordinator.rebalance_round", moe.version = a.version, moe.quiet = quiet, moe.changed = false);
                    if rebalance_round(store, cfg, leadership, status, a, &live, &tracker, quiet, &mut nodes, &mut acks).instrument(span.clone()).await? {
                        span.record("moe.changed", true);
                        quiet_until = tokio::time::Instant::now() + cfg.rebalance.cooldown;
                        status.send_modify(|s| s.rebalance_rounds += 1);
                    }
                }
            }
        }
    }
}

/// Whether `active` places exactly the live nodes, at their addresses.
fn same_members(active: &PlacementRecord, live: &[NodeSlot]) -> bool {
    active.nodes.len() == live.len()
        && active
            .nodes
            .iter()
            .all(|n| live.iter().any(|l| l.id == n.id && l.addr == n.addr))
}

/// Phase 1: pending; wait for every node's ack; phase 2: active. Returns false when membership
/// changed under it (the caller re-plans).
async fn rollout(
    store: &Arc<dyn MetaStore>,
    cfg: &CoordinatorConfig,
    leadership: &Leadership,
    rec: &PlacementRecord,
    nodes: &mut watch::Receiver<Arc<Snapshot>>,
    acks: &mut watch::Receiver<Arc<Snapshot>>,
) -> Result<bool, TermEnd> {
    let put = Op::Put {
        key: cfg.keys.pending(),
        value: records::encode(rec),
        lease: None,
    };
    if !store.txn(vec![leadership.fence()], vec![put]).await? {
        return Err(TermEnd::Deposed);
    }
    let members: Vec<String> = rec.nodes.iter().map(|n| n.id.clone()).collect();
    let deadline = tokio::time::Instant::now() + cfg.ack_timeout;
    loop {
        let snap = acks.borrow_and_update().clone();
        let acked = |id: &String| {
            let key = cfg.keys.ack(id);
            snap.entries
                .get(&key)
                .and_then(|kv| records::decode_or_skip::<AckRecord>(&key, &kv.value))
                .is_some_and(|a| a.version >= rec.version)
        };
        if members.iter().all(acked) {
            break;
        }
        tokio::select! {
            _ = acks.changed() => {}
            _ = nodes.changed() => {
                let live = live_nodes(&nodes.borrow());
                if members.iter().any(|m| !live.iter().any(|n| &n.id == m)) || live.len() != members.len() {
                    tracing::info!(version = rec.version, "membership changed during rollout; re-planning");
                    return Ok(false);
                }
            }
            _ = tokio::time::sleep_until(deadline) => {
                tracing::warn!(version = rec.version, "nodes did not acknowledge in time; re-planning");
                return Ok(false);
            }
        }
    }
    let ops = vec![
        Op::Put {
            key: cfg.keys.active(),
            value: records::encode(rec),
            lease: None,
        },
        Op::Delete(cfg.keys.pending()),
    ];
    if !store.txn(vec![leadership.fence()], ops).await? {
        return Err(TermEnd::Deposed);
    }
    Ok(true)
}

//! The coordinator: campaign for leadership under a lease; while leading, watch node
//! membership, plan the placement ([`crate::plan`]) and roll every change out in two phases:
//! write it as `pending` (version v+1), wait until every node in it has acknowledged that very
//! record (version and digest), then make it `active` and drop `pending` in one transaction.
//! Every write is fenced on the term (the election key's revision), so a deposed leader cannot
//! write. Losing the lease (or the store) ends the term; the coordinator resigns what it can,
//! revokes the lease and campaigns again under a new one.
//!
//! Rollouts always finish: membership changes are gathered for a settle window before planning
//! (nodes that register together are placed together); joins during a rollout wait for the next
//! one instead of aborting it; a node that answers with a failure ack, or does not answer within
//! the ack timeout, is left out of the next plan until it registers again; and a `pending` no
//! rollout of this term is waiting for (a dead leader's, an aborted one's) is resumed when it is
//! what the plan wants, and otherwise replaced or deleted, at once.
//!
//! With load-driven rebalancing on ([`RebalanceConfig::threshold`] > 0), every interval it also
//! folds the routers' load records into a moving average, measures each layer's balancedness
//! under the active placement, and re-places the layers below the threshold one at a time, each
//! as its own two-phase rollout, so nodes load one layer's new replicas at a time and serving
//! never stops. Membership changes come first: load rebalancing waits until the active
//! placement covers exactly the live nodes. With `min_replicas` > 1 it keeps that floor and
//! only adds replicas of hot experts. Planning and rebalancing run on blocking threads, so the
//! lease and the watches keep their deadlines while a large plan is computed.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use moe_meta::records::wire::{Resolved, encode_wire};
use moe_meta::records::{
    self, AckRecord, Keys, LoadRecord, NodeRecord, PlacedNode, PlacementRecord,
};
use moe_meta::store::election::{Leadership, campaign};
use moe_meta::store::mirror::{Snapshot, mirror};
use moe_meta::store::placements::{Slot, read_whole};
use moe_meta::store::register::{Term, TermError, hold};
use moe_meta::store::wait_until;
use moe_meta::store::{MetaStore, Op, StoreError};
use tokio::sync::watch;
use tracing::Instrument;

use crate::plan::{NodeSlot, plan_with};
use crate::rebalance::{LoadTracker, RebalanceConfig};

mod on_load;
mod routers;
mod status;

use on_load::rebalance_round;
pub use status::{CoordinatorStatus, LayerRebalance, REBALANCE_ERROR_REASONS};

/// Replicas of every expert unless told otherwise: two survive the loss of any one node with
/// no failed request (routers re-send its tokens to the other replica at once).
pub const DEFAULT_MIN_REPLICAS: usize = 2;
/// Quiet time membership must keep before a plan: nodes registering together are placed together.
pub const DEFAULT_SETTLE: Duration = Duration::from_millis(1000);

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
    /// Longest wait for nodes to acknowledge a pending placement; the nodes that did not are
    /// left out of the next plan.
    pub ack_timeout: Duration,
    /// Membership must be quiet this long before a plan (at most 5× this after the first change).
    pub settle: Duration,
    pub rebalance: RebalanceConfig,
}

#[derive(Debug, thiserror::Error)]
enum TermEnd {
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("no longer the leader (a fenced write failed)")]
    Deposed,
}

/// Live nodes, with the revision of each node's registration.
fn live_nodes(snap: &Snapshot) -> Vec<(NodeSlot, i64)> {
    snap.entries
        .iter()
        .filter_map(|(k, kv)| {
            records::decode_or_skip::<NodeRecord>(k, &kv.value).map(|n| (n, kv.mod_revision))
        })
        .map(|(n, rev)| {
            let slot = NodeSlot {
                id: n.id,
                addr: n.addr,
                capacity: n.capacity as usize,
            };
            (slot, rev)
        })
        .collect()
}

/// The whole `active` or `pending` record (see [`read_whole`]).
async fn read_placement(
    store: &Arc<dyn MetaStore>,
    keys: &Keys,
    slot: Slot,
) -> Result<Option<PlacementRecord>, StoreError> {
    read_whole(store.as_ref(), keys, slot).await
}

/// The writes that drop the pending placement.
fn drop_pending(keys: &Keys) -> [Op; 2] {
    [Op::Delete(keys.pending()), Op::Delete(keys.full_pending())]
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

/// Waits until membership has been quiet for `settle` (at most 5× `settle` in all).
async fn settle(nodes: &mut watch::Receiver<Arc<Snapshot>>, settle: Duration) {
    let until = tokio::time::Instant::now() + settle * 5;
    loop {
        tokio::select! {
            r = nodes.changed() => if r.is_err() { return },
            _ = tokio::time::sleep(settle) => return,
            _ = tokio::time::sleep_until(until) => return,
        }
    }
}

/// Aborts a term's helper task when the term ends, however it ends.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// State a term keeps between rollouts.
#[derive(Default)]
struct TermState {
    /// Nodes whose load failed or timed out, with the registration revision they failed under:
    /// left out of plans until they register again.
    excluded: BTreeMap<String, (i64, String)>,
    /// What nodes dropped from the active placement held there (a node back from a lease blip
    /// gets it back without loading).
    departed: BTreeMap<String, PlacedNode>,
}

impl TermState {
    fn live(&mut self, snap: &Snapshot) -> Vec<NodeSlot> {
        let all = live_nodes(snap);
        self.excluded
            .retain(|id, (rev, _)| all.iter().any(|(n, r)| &n.id == id && r == rev));
        all.into_iter()
            .filter(|(n, _)| !self.excluded.contains_key(&n.id))
            .map(|(n, _)| n)
            .collect()
    }

    fn activated(&mut self, before: Option<&PlacementRecord>, now: &PlacementRecord) {
        for n in before.map_or(&[][..], |b| b.nodes.as_slice()) {
            if !now.nodes.iter().any(|x| x.id == n.id) && self.departed.len() < 4096 {
                self.departed.insert(n.id.clone(), n.clone());
            }
        }
        self.departed
            .retain(|id, _| !now.nodes.iter().any(|x| &x.id == id));
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
    // Nodes learn what routers use from one key this term keeps (aborted with the term).
    let publisher = tokio::spawn(routers::publish(
        store.clone(),
        cfg.keys.clone(),
        leadership.fence(),
    ));
    let _publisher = AbortOnDrop(publisher);
    let mut tracker = LoadTracker::default();
    let mut tick = tokio::time::interval(cfg.rebalance.interval.max(Duration::from_millis(10)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut quiet_until = tokio::time::Instant::now();
    let mut term = TermState::default();
    let mut ticks = 0u64;
    loop {
        let noticed = Instant::now();
        let mut live = term.live(&nodes.borrow_and_update());
        let mut active = read_placement(store, &cfg.keys, Slot::Active).await?;
        if let Some(a) = &active {
            status.send_modify(|s| s.active_version = a.version);
        }
        let changed = !live.is_empty() && active.as_ref().is_none_or(|a| !same_members(a, &live));
        if changed {
            // Gather what else is changing before planning.
            settle(&mut nodes, cfg.settle).await;
            live = term.live(&nodes.borrow_and_update());
            active = read_placement(store, &cfg.keys, Slot::Active).await?;
        }
        let pending = read_placement(store, &cfg.keys, Slot::Pending).await?;
        let target = match (&active, live.is_empty()) {
            (Some(a), _) if same_members(a, &live) => Some(a.nodes.clone()),
            (_, true) => active.as_ref().map(|a| a.nodes.clone()),
            _ => {
                let returning: Vec<PlacedNode> = live
                    .iter()
                    .filter(|l| {
                        active
                            .as_ref()
                            .is_none_or(|a| !a.nodes.iter().any(|n| n.id == l.id))
                    })
                    .filter_map(|l| term.departed.get(&l.id).cloned())
                    .collect();
                let (a, l, layers) = (active.clone(), live.clone(), cfg.moe_layers.clone());
                let (e, r) = (cfg.n_experts, cfg.min_replicas);
                let planned = tokio::task::spawn_blocking(move || {
                    plan_with(a.as_ref(), &returning, &l, &layers, e, r)
                })
                .await;
                match planned {
                    Ok(Ok(next)) => {
                        tracing::info!(nodes = live.len(), moved = next.moved, "planned");
                        status.send_modify(|s| s.last_moved = next.moved);
                        Some(next.nodes)
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "no placement fits the live nodes");
                        None
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "planning failed");
                        None
                    }
                }
            }
        };
        let rolled = match target {
            Some(t) if active.as_ref().is_none_or(|a| a.nodes != t) => {
                // Resume a pending that is exactly this plan (a dead leader's), else a new one.
                let rec = match pending {
                    Some(p)
                        if p.nodes == t
                            && active.as_ref().is_none_or(|a| p.version > a.version) =>
                    {
                        tracing::info!(version = p.version, "resuming the pending placement");
                        // One a coordinator of the previous format left is written again in
                        // this format (its acks went where this one does not read them).
                        let legacy = store.get(&cfg.keys.full_pending()).await?.is_none();
                        (p, legacy)
                    }
                    _ => {
                        let version = active
                            .as_ref()
                            .map_or(0, |a| a.version)
                            .max(pending.as_ref().map_or(0, |p| p.version))
                            + 1;
                        (PlacementRecord { version, nodes: t }, true)
                    }
                };
                Some(rec)
            }
            _ => {
                // Nothing to roll out: a pending left by a dead leader or an aborted rollout goes.
                if let Some(p) = &pending {
                    tracing::info!(
                        version = p.version,
                        "deleting a pending placement no rollout waits for"
                    );
                    if !store
                        .txn(vec![leadership.fence()], drop_pending(&cfg.keys).to_vec())
                        .await?
                    {
                        return Err(TermEnd::Deposed);
                    }
                }
                None
            }
        };
        if let Some((rec, write)) = rolled {
            tracing::info!(
                version = rec.version,
                nodes = rec.nodes.len(),
                "rolling out a placement"
            );
            status.send_modify(|s| s.rollouts += 1);
            let span = tracing::info_span!(
                "coordinator.rollout",
                moe.version = rec.version,
                moe.moved = status.borrow().last_moved,
                moe.nodes = rec.nodes.len(),
                moe.duration_seconds = tracing::field::Empty,
                moe.completed = false
            );
            match rollout(store, cfg, leadership, &rec, write, &mut nodes, &mut acks)
                .instrument(span.clone())
                .await?
            {
                Rollout::Done => {
                    let took = noticed.elapsed();
                    span.record("moe.duration_seconds", took.as_secs_f64());
                    span.record("moe.completed", true);
                    tracing::info!(
                        version = rec.version,
                        ms = took.as_millis() as u64,
                        "placement active"
                    );
                    term.activated(active.as_ref(), &rec);
                    // The load balance of the new membership is judged at once.
                    quiet_until = tokio::time::Instant::now();
                    status.send_modify(|s| {
                        s.active_version = rec.version;
                        s.nodes = rec.nodes.len();
                        s.last_rollout = took;
                        s.rollout_seconds += took.as_secs_f64();
                    });
                }
                Rollout::MemberLeft => {}
                Rollout::Failed(failed) => {
                    let snap = nodes.borrow().clone();
                    for (id, why) in failed {
                        let rev = live_nodes(&snap)
                            .into_iter()
                            .find(|(n, _)| n.id == id)
                            .map_or(0, |(_, r)| r);
                        tracing::warn!(node = %id, reason = %why, "leaving a node out until it registers again");
                        term.excluded.insert(id, (rev, why));
                    }
                    status.send_modify(|s| {
                        s.excluded = term
                            .excluded
                            .iter()
                            .map(|(k, v)| (k.clone(), v.1.clone()))
                            .collect()
                    });
                }
            }
            continue;
        }
        tokio::select! {
            r = nodes.changed() => if r.is_err() {
                return Ok(());
            },
            _ = tick.tick(), if cfg.rebalance.threshold > 0.0 => {
                let records = read_loads(&loads.borrow(), status, ticks > 0);
                ticks += 1;
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

/// The routers' load records in `snap`; what stops rebalancing is logged at warn and counted
/// (an unread prefix only once `late`: the first tick may come before the first list).
fn read_loads(
    snap: &Snapshot,
    status: &watch::Sender<CoordinatorStatus>,
    late: bool,
) -> Vec<LoadRecord> {
    if snap.revision == 0 && late {
        tracing::warn!("the routers' load records are not readable yet; no load rebalancing");
        status.send_modify(|s| s.rebalance_error("loads_unread"));
    }
    snap.entries
        .iter()
        .filter_map(|(k, kv)| match records::decode_load(k, &kv.value) {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::warn!(error = %e, "skipping a router's load record");
                status.send_modify(|s| s.rebalance_error("load_undecodable"));
                None
            }
        })
        .collect()
}

/// Whether `active` places exactly the live nodes, at their addresses.
fn same_members(active: &PlacementRecord, live: &[NodeSlot]) -> bool {
    active.nodes.len() == live.len()
        && active
            .nodes
            .iter()
            .all(|n| live.iter().any(|l| l.id == n.id && l.addr == n.addr))
}

/// How a rollout ended.
#[derive(Debug)]
enum Rollout {
    Done,
    /// A node of the record left (or moved): it will never acknowledge; re-plan.
    MemberLeft,
    /// These nodes answered with a failure, or not within the ack timeout: re-plan without them.
    Failed(Vec<(String, String)>),
}

/// Phase 1: pending (unless `write` is false: it is there already); wait for every node's ack
/// of this record; phase 2: active. Joins do not interrupt it (the next plan takes them).
async fn rollout(
    store: &Arc<dyn MetaStore>,
    cfg: &CoordinatorConfig,
    leadership: &Leadership,
    rec: &PlacementRecord,
    write: bool,
    nodes: &mut watch::Receiver<Arc<Snapshot>>,
    acks: &mut watch::Receiver<Arc<Snapshot>>,
) -> Result<Rollout, TermEnd> {
    let next = Resolved::new(rec.clone());
    if write {
        // Watchers get the pending as a delta against the active they hold.
        let base = read_placement(store, &cfg.keys, Slot::Active)
            .await?
            .map(Resolved::new);
        let puts = vec![
            Op::Put {
                key: cfg.keys.full_pending(),
                value: next.bytes.to_vec(),
                lease: None,
            },
            Op::Put {
                key: cfg.keys.pending(),
                value: encode_wire(&next, base.as_ref()),
                lease: None,
            },
        ];
        if !store.txn(vec![leadership.fence()], puts).await? {
            return Err(TermEnd::Deposed);
        }
    }
    let deadline = tokio::time::Instant::now() + cfg.ack_timeout;
    let digest = rec.digest();
    loop {
        let snap = acks.borrow_and_update().clone();
        let ack = |id: &str| {
            let key = cfg.keys.ack(id);
            snap.entries
                .get(&key)
                .and_then(|kv| records::decode_or_skip::<AckRecord>(&key, &kv.value))
                .filter(|a| a.names_digest(rec.version, digest))
        };
        let answers: Vec<(String, Option<AckRecord>)> = rec
            .nodes
            .iter()
            .map(|n| (n.id.clone(), ack(&n.id)))
            .collect();
        let failed: Vec<(String, String)> = answers
            .iter()
            .filter_map(|(id, a)| Some((id.clone(), a.as_ref()?.error.clone()?)))
            .collect();
        if !failed.is_empty() {
            tracing::warn!(
                version = rec.version,
                ?failed,
                "nodes cannot load the placement; re-planning"
            );
            return Ok(Rollout::Failed(failed));
        }
        if answers.iter().all(|(_, a)| a.is_some()) {
            break;
        }
        tokio::select! {
            _ = acks.changed() => {}
            _ = nodes.changed() => {
                let live = live_nodes(&nodes.borrow());
                let gone = rec.nodes.iter().any(|m| !live.iter().any(|(n, _)| n.id == m.id && n.addr == m.addr));
                if gone {
                    tracing::info!(version = rec.version, "a node of the rollout left; re-planning");
                    return Ok(Rollout::MemberLeft);
                }
            }
            _ = tokio::time::sleep_until(deadline) => {
                let silent: Vec<(String, String)> = answers
                    .into_iter()
                    .filter(|(_, a)| a.is_none())
                    .map(|(id, _)| (id, format!("no ack within {:?}", cfg.ack_timeout)))
                    .collect();
                tracing::warn!(version = rec.version, ?silent, "nodes did not acknowledge in time; re-planning");
                return Ok(Rollout::Failed(silent));
            }
        }
    }
    // The active is the pending promoted: to watchers, a delta of a few bytes against it.
    let mut ops = vec![
        Op::Put {
            key: cfg.keys.full_active(),
            value: next.bytes.to_vec(),
            lease: None,
        },
        Op::Put {
            key: cfg.keys.active(),
            value: encode_wire(&next, Some(&next)),
            lease: None,
        },
    ];
    ops.extend(drop_pending(&cfg.keys));
    if !store.txn(vec![leadership.fence()], ops).await? {
        return Err(TermEnd::Deposed);
    }
    Ok(Rollout::Done)
}

//! An expert node's state: the model shape, the experts it hosts, the placement versions it
//! serves; and the compute of one validated dispatch.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use moe_model::checkpoint::Checkpoint;
use moe_model::moe::run_experts;
use moe_model::{Config, ExpertStore, Matrix, ModelError};
use moe_proto::pb;

use crate::validate::Job;

/// What a node hosts and serves.
#[derive(Debug)]
pub struct ExpertNode {
    pub id: String,
    cfg: Config,
    store: ExpertStore,
    hosted: BTreeMap<usize, BTreeSet<usize>>,
    versions: BTreeSet<u64>,
    fingerprint: String,
    draining: AtomicBool,
    in_flight: AtomicU64,
}

impl ExpertNode {
    /// Loads the `pairs` of the model in `dir` (only their tensors are read).
    pub fn load(
        id: String,
        dir: &Path,
        pairs: &[(usize, usize)],
        versions: BTreeSet<u64>,
    ) -> Result<ExpertNode, ModelError> {
        let cfg = Config::from_dir(dir)?;
        let ckpt = Checkpoint::open(dir, cfg.fp8_block())?;
        let store = ExpertStore::load(&cfg, &ckpt, pairs)?;
        tracing::info!(node = %id, experts = pairs.len(), bytes = ckpt.bytes_read(), "experts loaded");
        Ok(ExpertNode::from_store(id, cfg, store, pairs, versions))
    }

    /// A node over experts already in memory.
    pub fn from_store(
        id: String,
        cfg: Config,
        store: ExpertStore,
        pairs: &[(usize, usize)],
        versions: BTreeSet<u64>,
    ) -> ExpertNode {
        let mut hosted: BTreeMap<usize, BTreeSet<usize>> = BTreeMap::new();
        for &(l, e) in pairs {
            hosted.entry(l).or_default().insert(e);
        }
        let fingerprint = cfg.fingerprint();
        ExpertNode {
            id,
            cfg,
            store,
            hosted,
            versions,
            fingerprint,
            draining: AtomicBool::new(false),
            in_flight: AtomicU64::new(0),
        }
    }

    /// The model configuration.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Whether (layer, expert) is hosted here.
    pub fn hosts(&self, layer: usize, expert: usize) -> bool {
        self.hosted.get(&layer).is_some_and(|s| s.contains(&expert))
    }

    /// Placement versions served; empty means any (a node started with a static expert spec).
    pub fn versions(&self) -> &BTreeSet<u64> {
        &self.versions
    }

    /// Runs a validated job: `[tokens, hidden]` weighted sums.
    pub fn compute(&self, job: &Job) -> Result<Matrix, ModelError> {
        run_experts(job.layer, &job.hidden, &job.assignments, |e| {
            self.store.get(job.layer, e)
        })
    }

    /// Marks the node as draining (health reports it; streams stop taking new messages).
    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// Whether the node is draining.
    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Counts a message in flight until the guard drops.
    pub fn track(&self) -> InFlight<'_> {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        InFlight(&self.in_flight)
    }

    /// Messages being computed now.
    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::SeqCst)
    }

    /// The Info answer.
    pub fn info(&self) -> pb::InfoResponse {
        pb::InfoResponse {
            node_id: self.id.clone(),
            hidden_size: self.cfg.hidden_size as u32,
            n_routed_experts: self.cfg.moe().map_or(0, |m| m.n_routed_experts as u32),
            moe_layers: self
                .cfg
                .moe_layers()
                .into_iter()
                .map(|l| l as u32)
                .collect(),
            hosted: self
                .hosted
                .iter()
                .map(|(&l, e)| pb::ExpertRange {
                    layer: l as u32,
                    experts: e.iter().map(|&x| x as u32).collect(),
                })
                .collect(),
            placement_versions: self.versions.iter().copied().collect(),
            model_fingerprint: self.fingerprint.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            backend: format!("cpu/{:?}", moe_model::kernels::kernel_choice()).to_lowercase(),
        }
    }
}

/// Decrements the in-flight count when dropped.
#[derive(Debug)]
pub struct InFlight<'a>(&'a AtomicU64);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

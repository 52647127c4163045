//! An expert node's state: the model shape, the experts it hosts, the placement versions it
//! serves; the compute of one validated dispatch; and loading/unloading experts while serving
//! (placement changes): computes hold a read lock, a load reads tensors outside the lock and
//! inserts under a short write lock.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use moe_model::checkpoint::Checkpoint;
use moe_model::{Device, ExpertStore, Matrix, ModelConfig, ModelError};
use moe_proto::pb;

use crate::backend::{Backend, Experts};
use crate::validate::Job;

#[derive(Debug, Default)]
struct Hosted {
    store: Experts,
    pairs: BTreeMap<usize, BTreeSet<usize>>,
    /// Served placement versions; empty means any (a node started with a static spec).
    versions: BTreeSet<u64>,
}

/// What a node hosts and serves.
#[derive(Debug)]
pub struct ExpertNode {
    pub id: String,
    cfg: ModelConfig,
    ckpt: Option<Arc<Checkpoint>>,
    /// The device the experts live and compute on.
    backend: Backend,
    /// Hosts experts by name only (the fleet simulator's nodes): loads read nothing.
    weightless: bool,
    state: RwLock<Hosted>,
    fingerprint: String,
    draining: AtomicBool,
    in_flight: AtomicU64,
    /// Messages taken off a stream (or a Compute call) whose answer is not yet queued to send.
    held: AtomicU64,
    /// The most `held` has been.
    held_peak: AtomicU64,
    /// Tokens and compute time per (layer, expert).
    pub stats: crate::stats::NodeStats,
    /// The listener's TLS, once served with it (for its refusal counts).
    tls: std::sync::OnceLock<Arc<moe_meta::tls::ServerTls>>,
}

impl ExpertNode {
    /// Loads the `pairs` of the model in `dir` (only their tensors are read); more can be loaded
    /// later with [`ExpertNode::load_pairs`].
    pub fn load(
        id: String,
        dir: &Path,
        pairs: &[(usize, usize)],
        versions: BTreeSet<u64>,
    ) -> Result<ExpertNode, ModelError> {
        ExpertNode::load_on(id, dir, pairs, versions, Device::Cpu)
    }

    /// [`ExpertNode::load`] with the experts on `device` (a CUDA device is checked and opened
    /// first: a clear error, never a panic, when it cannot be used).
    pub fn load_on(
        id: String,
        dir: &Path,
        pairs: &[(usize, usize)],
        versions: BTreeSet<u64>,
        device: Device,
    ) -> Result<ExpertNode, ModelError> {
        let backend = Backend::open(device)?;
        let cfg = ModelConfig::from_dir(dir)?;
        let ckpt = Arc::new(cfg.open_checkpoint(dir)?);
        let store = backend.load(&cfg, &ckpt, pairs)?;
        tracing::info!(node = %id, experts = pairs.len(), bytes = ckpt.bytes_read(), backend = %backend.describe(), "experts loaded");
        let mut node = ExpertNode::from_store(id, cfg, ExpertStore::default(), pairs, versions);
        node.state
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .store = store;
        node.backend = backend;
        node.ckpt = Some(ckpt);
        Ok(node)
    }

    /// A node over experts already in memory (no checkpoint to load more from).
    pub fn from_store(
        id: String,
        cfg: impl Into<ModelConfig>,
        store: ExpertStore,
        pairs: &[(usize, usize)],
        versions: BTreeSet<u64>,
    ) -> ExpertNode {
        let mut hosted: BTreeMap<usize, BTreeSet<usize>> = BTreeMap::new();
        for &(l, e) in pairs {
            hosted.entry(l).or_default().insert(e);
        }
        let cfg = cfg.into();
        let fingerprint = cfg.fingerprint();
        ExpertNode {
            id,
            cfg,
            ckpt: None,
            backend: Backend::Cpu,
            weightless: false,
            state: RwLock::new(Hosted {
                store: Experts::Cpu(store),
                pairs: hosted,
                versions,
            }),
            fingerprint,
            draining: AtomicBool::new(false),
            in_flight: AtomicU64::new(0),
            held: AtomicU64::new(0),
            held_peak: AtomicU64::new(0),
            tls: std::sync::OnceLock::new(),
            stats: Default::default(),
        }
    }

    /// A node that hosts experts by name only: [`ExpertNode::load_pairs`] records the pairs and
    /// reads no weights, so it "loads" instantly (the fleet simulator's nodes, which exercise
    /// membership and placement at fleet size; a compute on one finds no weights and fails).
    pub fn weightless(id: String, cfg: impl Into<ModelConfig>) -> ExpertNode {
        let mut node =
            ExpertNode::from_store(id, cfg, ExpertStore::default(), &[], BTreeSet::new());
        node.weightless = true;
        node
    }

    fn read(&self) -> RwLockReadGuard<'_, Hosted> {
        // A panic under the lock leaves the maps consistent (inserts and removes are atomic).
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Hosted> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The model configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// Whether (layer, expert) is hosted here.
    pub fn hosts(&self, layer: usize, expert: usize) -> bool {
        self.read()
            .pairs
            .get(&layer)
            .is_some_and(|s| s.contains(&expert))
    }

    /// Every hosted (layer, expert).
    pub fn hosted(&self) -> BTreeSet<(usize, usize)> {
        self.read()
            .pairs
            .iter()
            .flat_map(|(&l, es)| es.iter().map(move |&e| (l, e)))
            .collect()
    }

    /// Bytes of the hosted experts' weights.
    pub fn expert_bytes(&self) -> usize {
        self.read().store.bytes()
    }

    /// Placement versions served; empty means any.
    pub fn versions(&self) -> BTreeSet<u64> {
        self.read().versions.clone()
    }

    /// Sets the placement versions served.
    pub fn set_versions(&self, versions: BTreeSet<u64>) {
        self.write().versions = versions;
    }

    /// Loads `pairs` from the checkpoint (tensors read outside the lock) and starts hosting them.
    pub fn load_pairs(&self, pairs: &[(usize, usize)]) -> Result<(), ModelError> {
        if pairs.is_empty() {
            return Ok(());
        }
        if self.weightless {
            let mut st = self.write();
            for &(l, e) in pairs {
                st.pairs.entry(l).or_default().insert(e);
            }
            drop(st);
            self.stats.record_loads(pairs.len());
            return Ok(());
        }
        let ckpt = self.ckpt.as_ref().ok_or_else(|| {
            ModelError::InvalidInput("this node has no checkpoint to load experts from".into())
        })?;
        let loaded = self.backend.load(&self.cfg, ckpt, pairs);
        // The load's staging buffers (read, widened, packed) are freed by now, whatever it gave.
        moe_meta::memory::release_to_os();
        let loaded = loaded?;
        let hosted = {
            let mut st = self.write();
            st.store.absorb(loaded);
            for &(l, e) in pairs {
                st.pairs.entry(l).or_default().insert(e);
            }
            st.store.len()
        };
        self.stats.record_loads(pairs.len());
        tracing::info!(node = %self.id, added = pairs.len(), hosted, "experts loaded");
        Ok(())
    }

    /// Stops hosting `pairs` and frees their weights.
    pub fn unload_pairs(&self, pairs: &[(usize, usize)]) {
        if pairs.is_empty() {
            return;
        }
        let hosted = {
            let mut st = self.write();
            for &(l, e) in pairs {
                st.store.remove(l, e);
                if let Some(s) = st.pairs.get_mut(&l) {
                    s.remove(&e);
                }
            }
            st.store.len()
        };
        // Outside the lock: computes go on while the pages go back.
        if !self.weightless {
            moe_meta::memory::release_to_os();
        }
        self.stats.record_unloads(pairs.len());
        tracing::info!(node = %self.id, removed = pairs.len(), hosted, "experts unloaded");
    }

    /// The node's `/metrics` text.
    pub fn render_metrics(&self) -> String {
        let (hosted, expert_bytes, version) = {
            let st = self.read();
            let v = st.versions.last().copied().unwrap_or(0);
            (st.store.len(), st.store.bytes() as u64, v)
        };
        self.stats.render(crate::stats::NodeGauges {
            node: &self.id,
            in_flight: self.in_flight(),
            held: self.held(),
            hosted,
            expert_bytes,
            placement_version: version,
            tls_refused: self.tls.get().map(|t| t.refusals().counts()),
        })
    }

    /// Runs a validated job: `[tokens, hidden]` weighted sums.
    pub fn compute(&self, job: &Job) -> Result<Matrix, ModelError> {
        let st = self.read();
        st.store.compute(job.layer, &job.hidden, &job.assignments)
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

    /// Counts a message held (read, its answer not yet queued to send) until the guard drops.
    pub fn hold(self: &Arc<Self>) -> Held {
        let now = self.held.fetch_add(1, Ordering::SeqCst) + 1;
        self.held_peak.fetch_max(now, Ordering::SeqCst);
        Held(self.clone())
    }

    /// Records the TLS the node is served with, so `/metrics` shows its refusals.
    pub fn set_tls(&self, tls: Arc<moe_meta::tls::ServerTls>) {
        let _ = self.tls.set(tls);
    }

    /// Messages held now: read, answer not yet queued to send.
    pub fn held(&self) -> u64 {
        self.held.load(Ordering::SeqCst)
    }

    /// The most messages ever held at once.
    pub fn held_peak(&self) -> u64 {
        self.held_peak.load(Ordering::SeqCst)
    }

    /// The Info answer.
    pub fn info(&self) -> pb::InfoResponse {
        let st = self.read();
        pb::InfoResponse {
            node_id: self.id.clone(),
            hidden_size: self.cfg.hidden_size() as u32,
            n_routed_experts: self.cfg.n_routed_experts() as u32,
            moe_layers: self
                .cfg
                .moe_layers()
                .into_iter()
                .map(|l| l as u32)
                .collect(),
            hosted: st
                .pairs
                .iter()
                .map(|(&l, e)| pb::ExpertRange {
                    layer: l as u32,
                    experts: e.iter().map(|&x| x as u32).collect(),
                })
                .collect(),
            placement_versions: st.versions.iter().copied().collect(),
            model_fingerprint: self.fingerprint.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            backend: self.backend.describe(),
        }
    }
}

/// Decrements the held count when dropped.
#[derive(Debug)]
pub struct Held(Arc<ExpertNode>);

impl Drop for Held {
    fn drop(&mut self) {
        self.0.held.fetch_sub(1, Ordering::SeqCst);
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

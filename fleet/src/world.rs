//! The simulated fleet: one in-memory store on tokio's clock behind the counting store, the real
//! coordinator ([`moe_coordinator::run`]), real expert-node membership
//! ([`moe_expert_node::membership::run_member`]) over weightless nodes that load instantly, and
//! real router-follow code ([`moe_router::cluster::follow`]) over routers with no data plane,
//! whose load windows a traffic task fills with a skewed, deterministic token mix (with
//! Poisson-like noise, so windows move as real ones do).
//!
//! Everything runs on a paused current-thread runtime: time moves only when every task is idle
//! (tokio's auto-advance), so simulated seconds cost only the work done in them. Blocking
//! planner work (`spawn_blocking`) holds the clock while it runs, so simulated time excludes
//! coordinator compute; wall time measures it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use moe_coordinator::{CoordinatorConfig, CoordinatorStatus, RebalanceConfig};
use moe_expert_node::ExpertNode;
use moe_expert_node::membership::{MemberConfig, run_member};
use moe_meta::records::{self, Keys, PlacementRecord, RouterRecord};
use moe_meta::store::MetaStore;
use moe_meta::store::memory::{Clock, MemStore};
use moe_meta::store::placements::{Slot, read_whole};
use moe_router::cluster::{FollowConfig, follow};
use moe_router::{DispatchOptions, RemoteExperts};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::FleetConfig;
use crate::store::{CountingStore, Limits};

/// The in-memory store's clock: tokio's (paused) time.
#[derive(Debug)]
struct TokioClock(Instant);

impl Clock for TokioClock {
    fn now_ms(&self) -> u64 {
        self.0.elapsed().as_millis() as u64
    }
}

/// A running role: its task and the switch that stops it gracefully.
struct Role {
    task: JoinHandle<()>,
    stop: watch::Sender<bool>,
}

impl Role {
    /// Stops the role gracefully (it revokes its lease) and waits until it has.
    async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

struct Router {
    role: Role,
    experts: Arc<RemoteExperts>,
}

/// The simulated fleet.
pub struct World {
    pub cfg: FleetConfig,
    pub keys: Keys,
    /// The raw store, for observing without counting.
    pub mem: MemStore,
    pub store: CountingStore,
    model: moe_model::Config,
    nodes: BTreeMap<String, Role>,
    routers: Vec<Router>,
    coordinator: Option<(Role, watch::Receiver<CoordinatorStatus>)>,
    coordinators_started: usize,
    /// Rollouts started by coordinators stopped since.
    past_rollouts: u64,
    /// Waits give up once the wall clock passes this (a scenario's wall-time budget).
    pub wall_deadline: Option<std::time::Instant>,
    _ticker: JoinHandle<()>,
    _traffic: JoinHandle<()>,
}

/// The model shape the nodes report: `layers` MoE layers after three dense ones (DeepSeek-V3's
/// layout), `experts` routed experts; tiny dimensions (no weights are ever read).
fn model_config(layers: usize, experts: usize) -> Result<moe_model::Config, String> {
    let groups = if experts.is_multiple_of(8) { 8 } else { 1 };
    let json = serde_json::json!({
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
        "hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 32,
        "num_hidden_layers": layers + 3, "first_k_dense_replace": 3,
        "n_routed_experts": experts, "n_shared_experts": 1, "num_experts_per_tok": 8.min(experts),
        "n_group": groups, "topk_group": groups.min(4), "topk_method": "noaux_tc",
        "scoring_func": "sigmoid", "norm_topk_prob": true, "routed_scaling_factor": 2.5,
        "num_attention_heads": 4, "num_key_value_heads": 4, "head_dim": 8,
        "kv_lora_rank": 32, "q_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8,
        "v_head_dim": 16, "vocab_size": 512, "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "bos_token_id": 0, "eos_token_id": 1,
        "tie_word_embeddings": false
    });
    moe_model::Config::from_json(&json.to_string()).map_err(|e| e.to_string())
}

/// Tokens of `layer` routed to each expert in one publish interval by one router: a fixed
/// power-law mix (the hottest expert about 10× the mean at 256 experts), its ranking rotated
/// per layer.
pub fn token_mix(layer: usize, experts: usize, tokens: u64) -> Vec<u32> {
    let weight = |e: usize| {
        let rank = (e * 7 + layer * 13) % experts;
        1.0 / ((rank + 1) as f64).powf(0.6)
    };
    let total: f64 = (0..experts).map(weight).sum();
    (0..experts)
        .map(|e| (tokens as f64 * weight(e) / total).round() as u32)
        .collect()
}

/// Deterministic counting noise (xorshift64*): each interval's counts vary as Poisson counts
/// do (standard deviation the square root of the mean), so a router's window moves as a real
/// one does and its publications are what real traffic would cause.
struct Noise(u64);

impl Noise {
    fn uniform(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64
    }

    /// About Poisson(`mean`): the mean plus a sum of four uniforms scaled to its deviation.
    fn poisson(&mut self, mean: u32) -> u32 {
        let g = (0..4).map(|_| self.uniform()).sum::<f64>() - 2.0;
        let sd = f64::from(mean).sqrt() * 3f64.sqrt();
        (f64::from(mean) + g * sd).round().max(0.0) as u32
    }
}

impl World {
    /// A fleet with no role running yet, at simulated time zero. Needs a paused runtime.
    pub fn new(cfg: FleetConfig) -> Result<World, String> {
        let model = model_config(cfg.layers, cfg.experts)?;
        let mem = MemStore::with_clock(Arc::new(TokioClock(Instant::now())));
        let store = CountingStore::new(Arc::new(mem.clone()), Limits::default());
        let ticker = {
            let mem = mem.clone();
            tokio::spawn(async move {
                let mut iv = tokio::time::interval(Duration::from_millis(50));
                loop {
                    iv.tick().await;
                    mem.tick();
                }
            })
        };
        Ok(World {
            keys: Keys::new("fleet"),
            mem,
            store,
            model,
            nodes: BTreeMap::new(),
            routers: Vec::new(),
            coordinator: None,
            coordinators_started: 0,
            past_rollouts: 0,
            wall_deadline: None,
            _ticker: ticker,
            _traffic: tokio::spawn(async {}),
            cfg,
        })
    }

    fn dyn_store(&self) -> Arc<dyn MetaStore> {
        Arc::new(self.store.clone())
    }

    pub fn moe_layers(&self) -> Vec<usize> {
        self.model.moe_layers()
    }

    /// Starts a coordinator (the previous one, if any, is stopped first) with `rebalance`.
    pub async fn start_coordinator(&mut self, rebalance: RebalanceConfig) {
        if let Some((role, status)) = self.coordinator.take() {
            self.past_rollouts += status.borrow().rollouts;
            role.stop().await;
        }
        self.coordinators_started += 1;
        let cfg = CoordinatorConfig {
            id: format!("c{}", self.coordinators_started),
            keys: self.keys.clone(),
            moe_layers: self.moe_layers(),
            n_experts: self.cfg.experts,
            min_replicas: self.cfg.min_replicas,
            lease_ttl: self.cfg.lease_ttl,
            ack_timeout: Duration::from_secs(120),
            settle: self.cfg.settle,
            rebalance,
        };
        let (status, rx) = watch::channel(CoordinatorStatus::default());
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(moe_coordinator::run(self.dyn_store(), cfg, status, stopped));
        self.coordinator = Some((Role { task, stop }, rx));
    }

    /// The coordinator's status.
    pub fn status(&self) -> CoordinatorStatus {
        self.coordinator
            .as_ref()
            .map(|(_, s)| s.borrow().clone())
            .unwrap_or_default()
    }

    /// Rollouts started by every coordinator so far.
    pub fn rollouts(&self) -> u64 {
        self.past_rollouts + self.status().rollouts
    }

    /// Whether the scenario's wall-time budget is spent.
    pub fn out_of_wall_time(&self) -> bool {
        self.wall_deadline
            .is_some_and(|d| std::time::Instant::now() >= d)
    }

    /// Node ids as the simulator names them.
    pub fn node_id(i: usize) -> String {
        format!("n{i:04}")
    }

    /// Starts a fresh (empty) node `id`.
    pub fn start_node(&mut self, id: &str) {
        let node = Arc::new(ExpertNode::weightless(id.into(), self.model.clone()));
        let cfg = MemberConfig {
            keys: self.keys.clone(),
            addr: format!("{id}:50051"),
            capacity: self.cfg.node_capacity(),
            lease_ttl: self.cfg.lease_ttl,
        };
        let (stop, stopped) = watch::channel(false);
        let store = self.dyn_store();
        let task = tokio::spawn(async move {
            if let Err(e) = run_member(node, store, cfg, stopped).await {
                tracing::error!(error = %e, "simulated node left the cluster");
            }
        });
        self.nodes.insert(id.into(), Role { task, stop });
    }

    /// Kills node `id` (no revoke: its lease expires after the TTL).
    pub fn kill_node(&mut self, id: &str) {
        if let Some(r) = self.nodes.remove(id) {
            r.task.abort();
        }
    }

    /// Stops node `id` gracefully (it revokes its lease).
    pub async fn stop_node(&mut self, id: &str) {
        if let Some(r) = self.nodes.remove(id) {
            r.stop().await;
        }
    }

    /// Ids of the running nodes.
    pub fn node_ids(&self) -> Vec<String> {
        self.nodes.keys().cloned().collect()
    }

    /// Starts `n` routers and the traffic task that fills their load windows.
    pub fn start_routers(&mut self, n: usize) {
        let handle = tokio::runtime::Handle::current();
        for i in 0..n {
            let experts = Arc::new(RemoteExperts::unconnected(
                self.model.hidden_size,
                DispatchOptions::default(),
                handle.clone(),
            ));
            let id = format!("r{i:03}");
            let cfg = FollowConfig {
                keys: self.keys.clone(),
                addr: format!("{id}:8080"),
                id,
                moe_layers: self.moe_layers(),
                n_experts: self.cfg.experts,
                lease_ttl: self.cfg.lease_ttl,
                load_publish: self.cfg.load_publish,
            };
            let (stop, stopped) = watch::channel(false);
            let task = tokio::spawn(follow(self.dyn_store(), cfg, experts.clone(), stopped));
            self.routers.push(Router {
                role: Role { task, stop },
                experts,
            });
        }
        let windows: Vec<Arc<RemoteExperts>> =
            self.routers.iter().map(|r| r.experts.clone()).collect();
        let mixes: Vec<(usize, Vec<u32>)> = self
            .moe_layers()
            .into_iter()
            .map(|l| {
                let tokens = self.cfg.tokens_per_s * self.cfg.load_publish.as_secs().max(1) * 8;
                (l, token_mix(l, self.cfg.experts, tokens))
            })
            .collect();
        let every = self.cfg.load_publish;
        self._traffic.abort();
        self._traffic = tokio::spawn(async move {
            let mut iv = tokio::time::interval(every);
            let mut noise = Noise(0x9e37_79b9_7f4a_7c15);
            let mut counts = Vec::new();
            loop {
                iv.tick().await;
                for w in &windows {
                    for (l, mix) in &mixes {
                        counts.clear();
                        counts.extend(mix.iter().map(|&c| noise.poisson(c)));
                        w.loads.record_counts(*l, &counts);
                    }
                }
            }
        });
    }

    /// The active placement, read without counting.
    pub async fn active(&self) -> Option<PlacementRecord> {
        read_whole(&self.mem, &self.keys, Slot::Active).await.ok()?
    }

    /// Whether the fleet has converged on the running nodes: the active placement names exactly
    /// them, no rollout is pending, and every router routes with the active version.
    pub async fn converged(&self) -> bool {
        let Some(active) = self.active().await else {
            return false;
        };
        if active.nodes.len() != self.nodes.len()
            || !active.nodes.iter().all(|n| self.nodes.contains_key(&n.id))
        {
            return false;
        }
        if self
            .mem
            .get(&self.keys.pending())
            .await
            .ok()
            .flatten()
            .is_some()
        {
            return false;
        }
        let versions_ok = self
            .routers
            .iter()
            .all(|r| r.experts.placement_version() == active.version);
        // And what the routers report in the store (what lets nodes unload).
        let (routers, _) = self
            .mem
            .list(&self.keys.routers())
            .await
            .unwrap_or_default();
        let reported = routers.len() == self.routers.len()
            && routers.iter().all(|kv| {
                records::decode_or_skip::<RouterRecord>(&kv.key, &kv.value)
                    .is_some_and(|r| r.placement_version == active.version)
            });
        versions_ok && reported
    }

    /// Lets simulated time pass until `cond` holds, polling every 100 ms; false after `limit`.
    pub async fn wait_until<F, Fut>(&self, limit: Duration, mut cond: F) -> bool
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let deadline = Instant::now() + limit;
        loop {
            if cond().await {
                return true;
            }
            if Instant::now() >= deadline || self.out_of_wall_time() {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until [`World::converged`]; false after `limit`.
    pub async fn converge(&self, limit: Duration) -> bool {
        self.wait_until(limit, || self.converged()).await
    }

    /// Stops every role, the coordinator first (nothing is measured any more: it must not
    /// re-plan the fleet once per departing node, which took minutes at 1,000 nodes).
    pub async fn shutdown(mut self) {
        if let Some((c, _)) = self.coordinator.take() {
            c.stop().await;
        }
        for r in std::mem::take(&mut self.routers) {
            r.role.stop().await;
        }
        for (_, n) in std::mem::take(&mut self.nodes) {
            n.stop().await;
        }
    }
}

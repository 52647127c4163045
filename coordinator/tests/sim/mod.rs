//! A simulated cluster for scenario tests: the in-memory store with a simulated clock, real
//! coordinator replicas and real expert-node membership (loading experts of the tiny model);
//! time advances only when the test moves it.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use moe_coordinator::{CoordinatorConfig, CoordinatorStatus, RebalanceConfig};
use moe_expert_node::ExpertNode;
use moe_expert_node::membership::{MemberConfig, run_member};
use moe_meta::records::{self, AckRecord, Keys, PlacementRecord};
use moe_meta::store::MetaStore;
use moe_meta::store::memory::{MemStore, SimClock};
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub const TTL: Duration = Duration::from_secs(3);

pub struct World {
    pub clock: Arc<SimClock>,
    pub mem: MemStore,
    pub store: Arc<dyn MetaStore>,
    pub keys: Keys,
}

impl World {
    /// Moves simulated and tokio time forward together, 100 ms at a time.
    pub async fn advance(&self, d: Duration) {
        let step = Duration::from_millis(100);
        let mut t = Duration::ZERO;
        while t < d {
            self.clock.advance(step);
            tokio::time::advance(step).await;
            self.mem.tick();
            for _ in 0..20 {
                tokio::task::yield_now().await;
            }
            t += step;
        }
    }

    /// One 100 ms step of simulated time, with a little real time for the loading threads.
    pub async fn step(&self) {
        self.advance(Duration::from_millis(100)).await;
        tokio::task::spawn_blocking(|| std::thread::sleep(Duration::from_millis(2)))
            .await
            .expect("join");
    }

    /// Advances time until `cond` holds (at most `limit`).
    pub async fn until(&self, what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
        let mut waited = Duration::ZERO;
        while !cond() {
            assert!(waited < limit, "{what}: not within {limit:?}");
            self.advance(Duration::from_millis(100)).await;
            // Loading experts runs on real threads: give them real time too.
            tokio::task::spawn_blocking(|| std::thread::sleep(Duration::from_millis(2)))
                .await
                .expect("join");
            waited += Duration::from_millis(100);
        }
    }

    /// Whether `nodes` nodes have acknowledged version `v`, and the store's revision.
    pub async fn acked(&self, v: u64, nodes: usize) -> (bool, i64) {
        let (acks, rev) = self.store.list(&self.keys.acks()).await.expect("list");
        let all = acks.len() == nodes
            && acks.iter().all(|kv| {
                records::decode::<AckRecord>(&kv.key, &kv.value)
                    .is_ok_and(|a| a.version == v && a.error.is_none())
            });
        (all, rev)
    }

    pub async fn active(&self) -> Option<PlacementRecord> {
        let slot = moe_meta::store::placements::Slot::Active;
        moe_meta::store::placements::read_whole(self.store.as_ref(), &self.keys, slot)
            .await
            .expect("reads")
    }

    /// A coordinator keeping 2 replicas of every expert, without load rebalancing.
    pub fn coordinator(
        &self,
        id: &str,
    ) -> (
        JoinHandle<()>,
        watch::Receiver<CoordinatorStatus>,
        watch::Sender<bool>,
    ) {
        self.coordinator_with(id, 2, RebalanceConfig::default())
    }

    pub fn coordinator_with(
        &self,
        id: &str,
        min_replicas: usize,
        rebalance: RebalanceConfig,
    ) -> (
        JoinHandle<()>,
        watch::Receiver<CoordinatorStatus>,
        watch::Sender<bool>,
    ) {
        let cfg = CoordinatorConfig {
            id: id.into(),
            keys: self.keys.clone(),
            moe_layers: vec![1, 2, 3],
            n_experts: 256,
            min_replicas,
            lease_ttl: TTL,
            ack_timeout: Duration::from_secs(3600),
            settle: Duration::from_millis(500),
            rebalance,
        };
        let (status, rx) = watch::channel(CoordinatorStatus::default());
        let (stop, stopped) = watch::channel(false);
        (
            tokio::spawn(moe_coordinator::run(
                self.store.clone(),
                cfg,
                status,
                stopped,
            )),
            rx,
            stop,
        )
    }

    /// A node that can hold every expert.
    pub fn node(&self, id: &str) -> JoinHandle<()> {
        self.node_with(id, 768)
    }

    pub fn node_with(&self, id: &str, capacity: usize) -> JoinHandle<()> {
        let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/models/tiny-dsv3-bf16");
        let node = Arc::new(ExpertNode::load(id.into(), &dir, &[], BTreeSet::new()).expect("node"));
        self.member(node, capacity)
    }

    /// A node that registers like any other but cannot load a single expert (it has no
    /// checkpoint to load from): every load it is asked for fails.
    pub fn broken_node(&self, id: &str) -> JoinHandle<()> {
        let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/models/tiny-dsv3-bf16");
        let cfg = moe_model::Config::from_dir(&dir).expect("config");
        let store = moe_model::ExpertStore::default();
        let node = ExpertNode::from_store(id.into(), cfg, store, &[], BTreeSet::new());
        self.member(Arc::new(node), 768)
    }

    fn member(&self, node: Arc<ExpertNode>, capacity: usize) -> JoinHandle<()> {
        let id = node.id.clone();
        let cfg = MemberConfig {
            keys: self.keys.clone(),
            addr: format!("{id}:1"),
            capacity,
            lease_ttl: TTL,
        };
        let (_stop, stopped) = watch::channel(false);
        let store = self.store.clone();
        tokio::spawn(async move {
            let _keep = _stop;
            if let Err(e) = run_member(node, store, cfg, stopped).await {
                panic!("node left the cluster: {e}");
            }
        })
    }

    /// A world at time zero.
    pub fn new(cluster: &str) -> World {
        let clock = Arc::new(SimClock::default());
        let mem = MemStore::with_clock(clock.clone());
        World {
            clock,
            store: Arc::new(mem.clone()),
            mem,
            keys: Keys::new(cluster),
        }
    }
}

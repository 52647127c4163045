//! The coordinator's scenarios on the in-memory store with a simulated clock: real coordinator
//! replicas and real expert-node membership (loading experts of the tiny model), time advanced
//! by hand (leases expire only when the test moves the clock).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use moe_coordinator::{CoordinatorConfig, CoordinatorStatus};
use moe_expert_node::ExpertNode;
use moe_expert_node::membership::{MemberConfig, run_member};
use moe_meta::records::{self, AckRecord, Keys, PlacementRecord};
use moe_meta::store::MetaStore;
use moe_meta::store::memory::{MemStore, SimClock};
use tokio::sync::watch;
use tokio::task::JoinHandle;

const TTL: Duration = Duration::from_secs(3);

struct World {
    clock: Arc<SimClock>,
    mem: MemStore,
    store: Arc<dyn MetaStore>,
    keys: Keys,
}

impl World {
    /// Moves simulated and tokio time forward together, 100 ms at a time.
    async fn advance(&self, d: Duration) {
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

    /// Advances time until `cond` holds (at most `limit`).
    async fn until(&self, what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
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
    async fn acked(&self, v: u64, nodes: usize) -> (bool, i64) {
        let (acks, rev) = self.store.list(&self.keys.acks()).await.expect("list");
        let all = acks.len() == nodes
            && acks.iter().all(|kv| {
                records::decode::<AckRecord>(&kv.key, &kv.value).is_ok_and(|a| a.version == v)
            });
        (all, rev)
    }

    async fn active(&self) -> Option<PlacementRecord> {
        let kv = self.store.get(&self.keys.active()).await.expect("get")?;
        Some(records::decode(&kv.key, &kv.value).expect("decodes"))
    }

    fn coordinator(
        &self,
        id: &str,
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
            min_replicas: 2,
            lease_ttl: TTL,
            ack_timeout: Duration::from_secs(3600),
            rebalance: Default::default(),
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

    fn node(&self, id: &str) -> JoinHandle<()> {
        let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/models/tiny-dsv3-bf16");
        let node = Arc::new(ExpertNode::load(id.into(), &dir, &[], BTreeSet::new()).expect("node"));
        let cfg = MemberConfig {
            keys: self.keys.clone(),
            addr: format!("{id}:1"),
            capacity: 768,
            lease_ttl: TTL,
        };
        let (_stop, stopped) = watch::channel(false);
        let store = self.store.clone();
        tokio::spawn(async move {
            let _keep = _stop;
            run_member(node, store, cfg, stopped).await;
        })
    }
}

fn covers_twice(p: &PlacementRecord) {
    let placement = p
        .to_placement(&[1, 2, 3], 256)
        .expect("covers every expert");
    for l in [1, 2, 3] {
        for e in 0..256 {
            assert_eq!(placement.replicas(l, e).len(), 2, "({l}, {e})");
        }
    }
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn membership_changes_failover_and_leader_loss() {
    let clock = Arc::new(SimClock::default());
    let mem = MemStore::with_clock(clock.clone());
    let w = World {
        clock,
        store: Arc::new(mem.clone()),
        mem,
        keys: Keys::new("sim"),
    };

    let (c1, s1, _stop1) = w.coordinator("c1");
    w.until("c1 leads", Duration::from_secs(5), || s1.borrow().leading)
        .await;
    let (_c2, s2, _stop2) = w.coordinator("c2");
    let mut nodes: Vec<JoinHandle<()>> = (0..4).map(|i| w.node(&format!("n{i}"))).collect();
    w.until("a placement over 4 nodes", Duration::from_secs(60), || {
        s1.borrow().active_version > 0 && s1.borrow().last_moved == 3 * 256 * 2
    })
    .await;
    let first = w.active().await.expect("active");
    assert_eq!(first.nodes.len(), 4);
    covers_twice(&first);
    assert!(!s2.borrow().leading, "one leader");

    // Settled: every node has acknowledged, and then nothing writes (acks live under the
    // placement prefix every node watches; re-writing them would wake the others for ever).
    let mut settled = w.acked(first.version, 4).await;
    for _ in 0..100 {
        if settled.0 {
            break;
        }
        w.advance(Duration::from_millis(100)).await;
        settled = w.acked(first.version, 4).await;
    }
    assert!(settled.0, "every node acknowledges the placement");
    w.advance(Duration::from_secs(2)).await;
    assert_eq!(
        w.acked(first.version, 4).await.1,
        settled.1,
        "the store stays quiet"
    );

    // A node dies: its lease expires; the new placement drops it and re-creates only its replicas.
    let v = s1.borrow().active_version;
    let lost = first
        .nodes
        .iter()
        .find(|n| n.id == "n3")
        .expect("n3")
        .experts
        .len();
    nodes.remove(3).abort();
    w.until("re-placement without n3", Duration::from_secs(20), || {
        s1.borrow().active_version > v
    })
    .await;
    let second = w.active().await.expect("active");
    assert!(second.nodes.iter().all(|n| n.id != "n3"));
    covers_twice(&second);
    let moved = s1.borrow().last_moved;
    assert!(
        moved >= lost && moved <= lost + lost / 10,
        "moved {moved} for {lost} lost"
    );

    // A node joins: it gets a fair share and nothing else moves.
    let v = s1.borrow().active_version;
    nodes.push(w.node("n4"));
    w.until("placement with n4", Duration::from_secs(60), || {
        s1.borrow().active_version > v
    })
    .await;
    let third = w.active().await.expect("active");
    covers_twice(&third);
    let share = third
        .nodes
        .iter()
        .find(|n| n.id == "n4")
        .expect("n4")
        .experts
        .len();
    let moved = s1.borrow().last_moved;
    assert_eq!(moved, share, "only the new node's share moved");
    assert!(share >= 1536 / 4 - 1, "fair share: {share}");

    // The leader dies: the standby leads within the TTL plus a step, and handles the next change.
    c1.abort();
    w.until("c2 leads", TTL + Duration::from_secs(1), || {
        s2.borrow().leading
    })
    .await;
    let v = w.active().await.expect("active").version;
    nodes.push(w.node("n5"));
    w.until("c2 rolls out", Duration::from_secs(60), || {
        s2.borrow().active_version > v
    })
    .await;
    covers_twice(&w.active().await.expect("active"));
}

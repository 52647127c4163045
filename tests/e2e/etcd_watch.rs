//! What the etcd fault tests watch: every lease-bound registration (to show nothing lost its
//! lease or registered again), the coordinators' leadership lines, and a steady load of
//! concurrent greedy requests checked against the golden ids.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use moe_meta::records::Keys;
use moe_meta::store::MetaStore;
use moe_meta::testing::EtcdCluster;

use super::roles::*;

/// Every lease-bound registration: key → lease.
pub async fn registrations(store: &dyn MetaStore) -> BTreeMap<String, i64> {
    let keys = Keys::new("default");
    let mut out = BTreeMap::new();
    for prefix in [keys.nodes(), keys.routers()] {
        let (kvs, _) = store.list(&prefix).await.expect("list");
        out.extend(kvs.into_iter().map(|kv| (kv.key, kv.lease)));
    }
    let e = store.get(&keys.election()).await.expect("get");
    let e = e.expect("a leader");
    out.insert(e.key, e.lease);
    out
}

/// The members in the order the processes are given them: the raft leader first (so every
/// lease stream and watch starts there), then the one they move to when it fails, then the
/// last; with those URLs, comma-separated (what `--etcd` takes).
pub async fn leader_first(etcd: &EtcdCluster) -> (Vec<usize>, String) {
    let leader = etcd.wait_leader(Duration::from_secs(30)).await;
    let order: Vec<usize> = (0..etcd.len()).map(|k| (leader + k) % etcd.len()).collect();
    let urls = order
        .iter()
        .map(|&i| etcd.url(i))
        .collect::<Vec<_>>()
        .join(",");
    (order, urls)
}

/// Lines the coordinators printed so far, appended to `seen`.
pub fn drain(coords: &[&Role], seen: &mut [Vec<String>]) {
    for (c, s) in coords.iter().zip(seen.iter_mut()) {
        while let Ok(l) = c.lines.try_recv() {
            s.push(l);
        }
    }
}

/// Waits until some coordinator prints a line containing `needle`.
pub fn expect_any(coords: &[&Role], seen: &mut [Vec<String>], needle: &str, within: Duration) {
    let deadline = Instant::now() + within;
    let mut from: Vec<usize> = seen.iter().map(Vec::len).collect();
    loop {
        drain(coords, seen);
        for (s, f) in seen.iter().zip(from.iter_mut()) {
            if s[*f..].iter().any(|l| l.contains(needle)) {
                return;
            }
            *f = s.len();
        }
        assert!(Instant::now() < deadline, "no `{needle}` within {within:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// "leading"/"standby" lines: each is one leadership change seen by that coordinator.
pub fn leadership_changes(seen: &[Vec<String>]) -> usize {
    seen.iter()
        .flatten()
        .filter(|l| *l == "leading" || *l == "standby")
        .count()
}

/// Four clients sending greedy golden prompts to a router until stopped.
pub struct Load {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicUsize>,
    tasks: Vec<tokio::task::JoinHandle<Vec<String>>>,
}

impl Load {
    pub fn start(c: &reqwest::Client, addr: &str) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicUsize::new(0));
        let tasks = (0..4)
            .map(|k| {
                let (c, a) = (c.clone(), addr.to_string());
                let (stop, done) = (stop.clone(), done.clone());
                tokio::spawn(async move {
                    let mut failures = Vec::new();
                    while !stop.load(Ordering::Relaxed) {
                        let i = PROMPTS[k % 2];
                        match greedy(&c, &a, i).await {
                            Ok(ids) if ids == golden_ids(i) => {}
                            Ok(ids) => failures.push(format!("prompt {i}: wrong ids {ids:?}")),
                            Err(e) => failures.push(format!("prompt {i}: {e}")),
                        }
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    failures
                })
            })
            .collect();
        Load { stop, done, tasks }
    }

    /// Requests answered so far (right or wrong).
    pub fn done(&self) -> usize {
        self.done.load(Ordering::Relaxed)
    }

    /// Stops the clients and fails the test if any request failed; the number answered.
    /// `what` says what they ran through, for the summary line.
    pub async fn finish(self, what: &str) -> usize {
        self.stop.store(true, Ordering::Relaxed);
        let total = self.done();
        let mut failures = Vec::new();
        for t in self.tasks {
            failures.extend(t.await.expect("join"));
        }
        eprintln!("{total} requests ({what}), {} failed", failures.len());
        assert!(failures.is_empty(), "{failures:?}");
        total
    }
}

/// Two coordinators, three expert nodes (`n0`..`n2`) and a router.
pub struct Cluster {
    pub c1: Role,
    pub c2: Role,
    pub nodes: Vec<Option<Role>>,
    pub router: Role,
}

/// Starts a [`Cluster`] on the etcd members `urls` and returns once the first coordinator
/// leads, the placement of the three nodes is active and the router serves the golden ids.
pub async fn bring_up(c: &reqwest::Client, urls: &str) -> Cluster {
    let c1 = coordinator(urls);
    c1.expect_line("leading", Duration::from_secs(30));
    let c2 = coordinator(urls);
    let nodes = (0..3).map(|i| Some(node(urls, &format!("n{i}")))).collect();
    let router = router(urls);
    c1.expect_line("active (3 nodes", Duration::from_secs(60));
    wait_ready(c, &router.proc.addr).await;
    for i in PROMPTS {
        assert_eq!(
            greedy(c, &router.proc.addr, i).await.expect("ok"),
            golden_ids(i)
        );
    }
    Cluster {
        c1,
        c2,
        nodes,
        router,
    }
}

//! The coordinated cluster through an etcd network partition: three etcd members, each in a
//! network namespace of its own, and two coordinators, three expert nodes, a router and this
//! test's clients in a fourth, all joined by a bridge (`netns.rs`). Under concurrent greedy
//! requests checked against the golden ids, the member every process talks to (the raft leader)
//! is cut off the network for two TTLs and put back, then the member they moved to. No request
//! fails, no process loses its lease or registers again, and the coordinator's leadership changes
//! at most once per cut. Needs root and iproute2 (CI runs as root).

pub mod etcd_watch;
pub mod harness;
pub mod netns;
pub mod roles;

use std::time::{Duration, Instant};

use moe_meta::store::etcd::EtcdStore;
use moe_meta::testing::EtcdCluster;

use etcd_watch::*;
use netns::Lab;
use roles::*;

#[test]
fn the_cluster_serves_through_an_etcd_partition() {
    // Host 0: the cluster's processes and this test; hosts 1-3: the etcd members.
    let lab = Lab::create(4)
        .unwrap_or_else(|e| panic!("this test builds network namespaces (root, iproute2): {e}"));
    // This thread, the runtime's threads and every process they start live on host 0.
    lab.enter(0).expect("enters host 0");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(partitions(&lab));
}

async fn partitions(lab: &Lab) {
    let t_start = Instant::now();
    let hosts: Vec<(String, String)> = (1..4)
        .map(|h| (lab.netns(h).to_string(), lab.addr(h)))
        .collect();
    let etcd = EtcdCluster::start_in(&hosts);
    // Every process starts on the raft leader, then moves to `order[1]`, cut next.
    let (order, urls) = leader_first(&etcd).await;
    let c = reqwest::Client::new();
    let cl = bring_up(&c, &urls).await;
    let store = EtcdStore::connect(&urls).await.expect("connects");
    let before = registrations(&store).await;
    assert_eq!(before.len(), 3 + 1 + 1, "{before:?}");
    let coords = [&cl.c1, &cl.c2];
    let mut seen = vec![vec!["leading".to_string()], Vec::new()];
    let load = Load::start(&c, &cl.router.proc.addr);
    let ttl = Duration::from_millis(TTL_MS.parse().expect("ms"));

    let mut changes = vec![leadership_changes(&seen)];
    for (fault, &member) in order[..2].iter().enumerate() {
        let host = member + 1;
        let was_leader = etcd.leader().await == Some(member);
        lab.cut(host);
        tokio::time::sleep(2 * ttl).await;
        lab.heal(host);
        let now = etcd.wait_leader(Duration::from_secs(20)).await;
        drain(&coords, &mut seen);
        changes.push(leadership_changes(&seen));
        eprintln!(
            "cut {}: m{member} (raft leader: {was_leader}) off for {:?}; leader now m{now}; coordinator lines {seen:?}",
            fault + 1,
            2 * ttl
        );
    }
    // Let every keeper refresh once more after the cuts before judging.
    tokio::time::sleep(ttl).await;
    assert_eq!(
        registrations(&store).await,
        before,
        "no process lost its lease or registered again"
    );
    // A leadership change is a standby line plus a leading line.
    for w in changes.windows(2) {
        assert!(
            w[1] - w[0] <= 2,
            "at most one leadership change per cut: {seen:?}"
        );
    }
    let total = load.finish("through two cuts").await;
    eprintln!("test took {:?}", t_start.elapsed());
    assert!(total > 0);
}

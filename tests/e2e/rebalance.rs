//! Load-driven rebalancing end to end on a real etcd: 4 expert nodes with spare slots, a router
//! and a coordinator, driven by a skewed workload (one prompt repeated, so a few experts per
//! layer take most tokens). The per-node token counts come from the nodes' own `/metrics`.
//! Before: a coordinator with load rebalancing off; then a coordinator with it on takes over,
//! replicates the hot experts layer by layer while requests run, and the same workload is
//! measured again.

pub mod harness;
pub mod roles;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use moe_meta::testing::EtcdProcess;
use roles::*;
use serde_json::json;

/// Tokens computed per (node, layer), from each node's metrics.
async fn scrape(c: &reqwest::Client, metrics: &[String]) -> Vec<BTreeMap<usize, f64>> {
    let mut out = Vec::new();
    for m in metrics {
        let text = harness::metrics_text(c, m).await;
        let mut per_layer = BTreeMap::new();
        for line in text.lines() {
            let Some(rest) = line.strip_prefix("moe_node_layer_expert_tokens_total{") else {
                continue;
            };
            let layer: usize = rest
                .split("layer=\"")
                .nth(1)
                .and_then(|s| s.split('"').next())
                .and_then(|s| s.parse().ok())
                .expect("layer label");
            let v: f64 = rest
                .rsplit(' ')
                .next()
                .and_then(|v| v.parse().ok())
                .expect("value");
            *per_layer.entry(layer).or_default() += v;
        }
        out.push(per_layer);
    }
    out
}

/// Per layer, balancedness (mean / max) of the nodes' tokens between two scrapes.
fn imbalance(a: &[BTreeMap<usize, f64>], b: &[BTreeMap<usize, f64>]) -> BTreeMap<usize, f64> {
    let layers: std::collections::BTreeSet<usize> =
        b.iter().flat_map(|m| m.keys().copied()).collect();
    layers
        .into_iter()
        .map(|l| {
            let loads: Vec<f64> = a
                .iter()
                .zip(b)
                .map(|(x, y)| y.get(&l).copied().unwrap_or(0.0) - x.get(&l).copied().unwrap_or(0.0))
                .collect();
            (l, moe_meta::balancedness(&loads))
        })
        .collect()
}

/// The skewed workload: `n` concurrent greedy requests for the same prompt.
async fn workload(c: &reqwest::Client, addr: &str, n: usize) -> Vec<Result<usize, String>> {
    let prompt: Vec<u32> = (0..24).map(|i| 40 + (i % 3)).collect();
    let body = json!({"prompt": prompt, "max_tokens": 16, "temperature": 0, "ignore_eos": true});
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let (c, addr, body) = (c.clone(), addr.to_string(), body.clone());
            tokio::spawn(async move {
                let v = complete(&c, &addr, &body).await?;
                Ok(v["usage"]["completion_tokens"].as_u64().unwrap_or(0) as usize)
            })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.expect("join"));
    }
    out
}

/// Replicas per (layer, expert) in the active placement of `moe placement show`.
fn replica_counts(show: &str) -> BTreeMap<(usize, usize), usize> {
    let mut counts = BTreeMap::new();
    let active = show.split("active:").nth(1).unwrap_or_default();
    let active = active.split("pending:").next().unwrap_or_default();
    for line in active.lines().skip(1) {
        let Some(spec) = line.split_whitespace().nth(4) else {
            continue;
        };
        for group in spec.split(';') {
            let Some((l, es)) = group.split_once(':') else {
                continue;
            };
            for e in es.split(',') {
                let key = (l.parse().expect("layer"), e.parse().expect("expert"));
                *counts.entry(key).or_default() += 1;
            }
        }
    }
    counts
}

fn all_ok(results: &[Result<usize, String>], phase: &str) {
    for r in results {
        assert_eq!(
            r.as_ref().map_err(String::as_str),
            Ok(&16),
            "{phase}: a request failed"
        );
    }
}

fn mean(m: &BTreeMap<usize, f64>) -> f64 {
    m.values().sum::<f64>() / m.len().max(1) as f64
}

/// `moe cluster status` until the router routes with the active placement.
fn status_when_settled(url: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = harness::moe(&["cluster", "status", "--etcd", url]);
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let active = text
            .split("placement: active v")
            .nth(1)
            .and_then(|s| s.split(',').next())
            .map(str::to_string);
        if let Some(v) = active
            && text.contains(&format!("routes with v{v}"))
            && text.contains("pending none")
        {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "the router never caught up:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skewed_load_is_rebalanced_by_replicating_hot_experts_without_failing_requests() {
    // 3 MoE layers × 80 slots: 64 experts per layer and node plus 16 spare.
    rebalance_under_skew("1", "240").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_two_replicas_per_expert_shares_rebalance_and_none_drops_below_two() {
    // 3 MoE layers × 144 slots: 2 × 64 experts per layer and node plus 16 spare. Two replicas
    // of every expert leave the split of their tokens (shares) free: that may be all it takes.
    rebalance_under_skew("2", "432").await;
}

/// `min_replicas` 1: the hot experts must gain replicas; above 1: no expert may drop below it.
async fn rebalance_under_skew(min_replicas: &str, capacity: &str) {
    let etcd = EtcdProcess::start();
    let url = etcd.url();
    let first = coordinator_with(
        &url,
        &["--min-replicas", min_replicas, "--rebalance-threshold", "0"],
    );
    first.expect_line("leading", Duration::from_secs(30));
    let spare = [
        "--capacity",
        capacity,
        "--metrics-listen",
        "127.0.0.1:0",
        "--expert-metrics",
    ];
    let nodes: Vec<Role> = (0..4)
        .map(|i| node_with(&url, &format!("n{i}"), &spare))
        .collect();
    let metrics: Vec<String> = nodes
        .iter()
        .map(|n| {
            let l = n.expect_line("metrics on", Duration::from_secs(10));
            l.rsplit(' ').next().unwrap_or_default().to_string()
        })
        .collect();
    let r = router_with(&url, &["--load-publish-ms", "300"]);
    let c = reqwest::Client::new();
    first.expect_line("active (4 nodes", Duration::from_secs(60));
    wait_ready(&c, &r.proc.addr).await;

    let s0 = scrape(&c, &metrics).await;
    all_ok(&workload(&c, &r.proc.addr, 32).await, "before");
    let s1 = scrape(&c, &metrics).await;
    let before = imbalance(&s0, &s1);

    // A coordinator with load rebalancing takes over while requests run.
    drop(first);
    let second = coordinator_with(
        &url,
        &[
            "--min-replicas",
            "1",
            "--rebalance-threshold",
            "0.95",
            "--rebalance-interval-ms",
            "300",
            "--rebalance-min-tokens",
            "500",
            "--rebalance-alpha",
            "1",
            "--rebalance-cooldown-ms",
            "600000",
            "--metrics-listen",
            "127.0.0.1:0",
        ],
    );
    let during = {
        let (c, a) = (c.clone(), r.proc.addr.clone());
        tokio::spawn(async move { workload(&c, &a, 32).await })
    };
    // The coordinator's lines up to the end of its first round: one per re-placed layer.
    let mut layers = Vec::new();
    let mut coordinator_metrics = String::new();
    let done = tokio::task::block_in_place(|| {
        loop {
            let line = second
                .lines
                .recv_timeout(Duration::from_secs(90))
                .expect("the coordinator finishes a rebalance round");
            if line.contains("rebalance round 1 done") {
                return line;
            }
            if let Some(addr) = line.strip_prefix("metrics on ") {
                coordinator_metrics = addr.to_string();
            }
            if line.contains("rebalanced") {
                layers.push(line);
            }
        }
    });
    assert!(!layers.is_empty(), "no layer was re-placed");
    all_ok(&during.await.expect("join"), "during the rebalance");
    let status = tokio::task::block_in_place(|| status_when_settled(&url));

    let s2 = scrape(&c, &metrics).await;
    all_ok(&workload(&c, &r.proc.addr, 32).await, "after");
    let s3 = scrape(&c, &metrics).await;
    let after = imbalance(&s2, &s3);
    for l in &layers {
        eprintln!("coordinator: {l}");
    }
    eprintln!("coordinator: {done}");
    for (l, b) in &before {
        eprintln!(
            "layer {l}: node balancedness {b:.3} before, {:.3} after",
            after[l]
        );
    }
    eprintln!("{status}");
    assert!(
        mean(&after) > mean(&before) + 0.1 && after.values().all(|&b| b > 0.75),
        "before {before:?}, after {after:?}"
    );
    // Replicated: more slots in use than experts.
    let show = harness::moe(&["placement", "show", "--etcd", &url]);
    let text = String::from_utf8_lossy(&show.stdout);
    let slots: usize = text
        .split("active:")
        .nth(1)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(2)?.parse::<usize>().ok())
        .sum();
    let floor: usize = min_replicas.parse().expect("number");
    match floor {
        1 => assert!(slots > 3 * 256, "{text}"),
        _ => assert!(slots >= floor * 3 * 256, "{text}"),
    }
    // No expert below the floor: every (layer, expert) on at least `floor` nodes.
    let spec_counts = replica_counts(&text);
    assert_eq!(spec_counts.len(), 3 * 256, "{text}");
    assert!(spec_counts.values().all(|&k| k >= floor), "{spec_counts:?}");
    assert!(
        status.contains("hottest") && status.contains("balancedness"),
        "{status}"
    );
    // Still the model's numbers.
    for i in PROMPTS {
        assert_eq!(
            greedy(&c, &r.proc.addr, i).await.expect("ok"),
            golden_ids(i)
        );
    }
    let m = harness::metrics_text(&c, &r.proc.addr).await;
    assert!(
        m.contains("moe_expert_load_balancedness{layer=\"1\"}"),
        "{m}"
    );
    let m = harness::metrics_text(&c, &coordinator_metrics).await;
    // Round 1 re-placed some layers; a layer it left may be re-placed by a later round as the
    // load goes on, but the cooldown (10 min) keeps every layer to one move: at most 3 rounds.
    let rounds: f64 = m
        .lines()
        .find_map(|l| l.strip_prefix("moe_rebalance_rounds_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0);
    assert!(
        (1.0..=3.0).contains(&rounds) && m.contains("moe_layer_balancedness{layer=\"3\"}"),
        "{m}"
    );
    drop(nodes);
}

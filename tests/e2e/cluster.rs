//! The coordinated cluster end to end with a real etcd on loopback: coordinator replicas,
//! expert nodes and a router as separate `moe` processes; failures injected by SIGKILL.

pub mod harness;
pub mod roles;

use std::time::{Duration, Instant};

use futures::StreamExt;
use harness::*;
use moe_meta::testing::EtcdProcess;
use reqwest::StatusCode;
use serde_json::json;

use roles::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinated_cluster_survives_failures_and_scales() {
    let mut etcd = EtcdProcess::start();
    let url = etcd.url();
    let c1 = coordinator(&url);
    c1.expect_line("leading", Duration::from_secs(30));
    let c2 = coordinator(&url);
    let mut nodes: Vec<Option<Role>> = (0..3).map(|i| Some(node(&url, &format!("n{i}")))).collect();
    let r = router(&url);
    let c = reqwest::Client::new();
    c1.expect_line("active (3 nodes", Duration::from_secs(60));
    wait_ready(&c, &r.proc.addr).await;

    // 1. Golden greedy continuations through the HTTP API.
    for i in PROMPTS {
        assert_eq!(
            greedy(&c, &r.proc.addr, i).await.expect("ok"),
            golden_ids(i),
            "prompt_{i}"
        );
    }

    // 2. A fourth node joins: it gets a fair share of every MoE layer, only that share moves,
    //    no request fails.
    let during: Vec<_> = (0..8)
        .map(|k| {
            let (c, a) = (c.clone(), r.proc.addr.clone());
            let i = PROMPTS[k % 2];
            tokio::spawn(async move { (i, greedy(&c, &a, i).await) })
        })
        .collect();
    nodes.push(Some(node(&url, "n3")));
    let line =
        tokio::task::block_in_place(|| c1.expect_line("active (4 nodes", Duration::from_secs(60)));
    let moved: usize = line
        .split("moved ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .and_then(|s| s.parse().ok())
        .expect("moved count");
    let full = 3 * 256 * 2; // a from-scratch placement re-assigns nearly all of these
    eprintln!("adding a node: `{line}` ({moved} of {full} replicas moved)");
    assert!(moved > 0 && moved <= full * 3 / 10, "moved {moved}");
    let per_layer = active_layers(&url);
    for (layer, counts) in &per_layer {
        let fair = counts.values().sum::<usize>() as f64 / 4.0;
        let got = counts.get("n3").copied().unwrap_or(0) as f64;
        eprintln!(
            "layer {layer}: {counts:?}, the new node holds {:.3}× a fair share",
            got / fair
        );
        assert!(
            (0.8 * fair..=1.2 * fair).contains(&got),
            "layer {layer}: {counts:?}"
        );
    }
    assert_eq!(per_layer.len(), 3, "every MoE layer: {per_layer:?}");
    for t in during {
        let (i, got) = t.await.expect("join");
        assert_eq!(
            got.expect("no request fails during the switch"),
            golden_ids(i)
        );
    }

    // 3. SIGKILL a node while 32 requests generate: all complete with the same tokens.
    let requests: Vec<_> = (0..32)
        .map(|k| {
            let (c, a) = (c.clone(), r.proc.addr.clone());
            let i = PROMPTS[k % 2];
            tokio::spawn(async move { (i, greedy(&c, &a, i).await) })
        })
        .collect();
    // Kill only once the router is generating for them.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let m = metrics_text(&c, &r.proc.addr).await;
        let running = m
            .lines()
            .find_map(|l| l.strip_prefix("moe_running_sequences "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0);
        if running >= 8.0 {
            break;
        }
        assert!(Instant::now() < deadline, "requests never started");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let killed = Instant::now();
    nodes[2] = None;
    let line =
        tokio::task::block_in_place(|| c1.expect_line("active (3 nodes", Duration::from_secs(30)));
    eprintln!(
        "kill -9 of a node → `{line}` after {:?} (lease TTL {TTL_MS} ms)",
        killed.elapsed()
    );
    for t in requests {
        let (i, got) = t.await.expect("join");
        assert_eq!(
            got.expect("request survives the node's death"),
            golden_ids(i),
            "prompt_{i}"
        );
    }

    // 4. Kill the leading coordinator: the standby leads within the TTL plus a margin, and
    //    handles the next membership change.
    let deposed = Instant::now();
    drop(c1);
    tokio::task::block_in_place(|| c2.expect_line("leading", Duration::from_millis(2000 + 3000)));
    eprintln!(
        "standby leads {:?} after the leader's death",
        deposed.elapsed()
    );
    nodes[0] = None;
    tokio::task::block_in_place(|| c2.expect_line("active (2 nodes", Duration::from_secs(30)));
    for i in PROMPTS {
        assert_eq!(
            greedy(&c, &r.proc.addr, i).await.expect("ok"),
            golden_ids(i)
        );
    }

    // 5. Restart etcd: requests keep being served meanwhile and after.
    etcd.kill();
    for i in PROMPTS {
        assert_eq!(
            greedy(&c, &r.proc.addr, i)
                .await
                .expect("served without etcd"),
            golden_ids(i)
        );
    }
    etcd.restart();
    for i in PROMPTS {
        assert_eq!(
            greedy(&c, &r.proc.addr, i)
                .await
                .expect("served after etcd came back"),
            golden_ids(i)
        );
    }
    // The records, for people.
    let status = moe(&["cluster", "status", "--etcd", &url]);
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(
        status.status.success()
            && text.contains("expert nodes (2)")
            && text.contains("routers (1)"),
        "{text}"
    );
    let show = moe(&["placement", "show", "--etcd", &url]);
    let text = String::from_utf8_lossy(&show.stdout);
    assert!(
        show.status.success() && text.contains("active: version") && text.contains("n3"),
        "{text}"
    );
    drop(nodes);
}

/// Per MoE layer, how many experts each node holds in the active placement (from
/// `moe placement show`).
fn active_layers(
    url: &str,
) -> std::collections::BTreeMap<u16, std::collections::BTreeMap<String, usize>> {
    let show = moe(&["placement", "show", "--etcd", url]);
    let text = String::from_utf8_lossy(&show.stdout).into_owned();
    assert!(show.status.success(), "{text}");
    let mut out: std::collections::BTreeMap<u16, std::collections::BTreeMap<String, usize>> =
        Default::default();
    for line in text
        .lines()
        .skip_while(|l| !l.starts_with("active:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
    {
        let mut words = line.split_whitespace();
        let id = words.next().expect("id").to_string();
        let spec = words.last().unwrap_or_default();
        for layer in spec.split(';').filter(|s| s.contains(':')) {
            let (l, experts) = layer.split_once(':').expect("layer:experts");
            let n = experts.split(',').filter(|e| !e.is_empty()).count();
            out.entry(l.parse().expect("layer"))
                .or_default()
                .insert(id.clone(), n);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moe_up_brings_up_a_working_cluster() {
    let m = model();
    let up = role(&["up", "--model", &m, "--listen", "127.0.0.1:0"]);
    let line = up.expect_line("listening on", Duration::from_secs(60));
    let addr = line.rsplit(' ').next().unwrap_or_default().to_string();
    up.expect_line("ready", Duration::from_secs(60));
    let c = reqwest::Client::new();
    let r = c
        .post(format!("http://{addr}/v1/completions"))
        .json(&json!({"prompt": "Hello", "max_tokens": 8}))
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), StatusCode::OK);
    for i in PROMPTS {
        assert_eq!(greedy(&c, &addr, i).await.expect("ok"), golden_ids(i));
    }

    // SIGTERM while a long stream runs: the stream still gets every token, then `moe up` exits.
    let n = 600;
    let resp = c
        .post(format!("http://{addr}/v1/completions"))
        .json(
            &json!({"prompt": "Hello", "max_tokens": n, "ignore_eos": true, "stream": true,
            "stream_options": {"include_usage": true}}),
        )
        .send()
        .await
        .expect("stream");
    let mut body = resp.bytes_stream();
    let mut text = String::from_utf8(body.next().await.expect("a chunk").expect("bytes").to_vec())
        .expect("utf-8");
    let pid = up.proc.child.id().to_string();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status();
    assert!(killed.expect("kill").success());
    up.expect_line("stopping", Duration::from_secs(20));
    while let Some(chunk) = body.next().await {
        text.push_str(std::str::from_utf8(&chunk.expect("stream stays up")).expect("utf-8"));
    }
    let chunks: Vec<serde_json::Value> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).expect("chunk JSON"))
        .collect();
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    let usage = &chunks.last().expect("chunks")["usage"];
    assert_eq!(usage["completion_tokens"], n, "{usage}");
    let finish: Vec<_> = chunks
        .iter()
        .filter_map(|ch| ch["choices"][0]["finish_reason"].as_str())
        .collect();
    assert_eq!(finish, ["length"], "{text}");
    assert!(chunks.iter().all(|ch| ch.get("error").is_none()), "{text}");
    up.expect_line("stopped", Duration::from_secs(30));
}

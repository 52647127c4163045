//! Failures stay local: a router (`moe router`, a real process) in front of two replicas of
//! every expert, one of them behind a fault-injecting proxy ([`fault_proxy`]) that answers one
//! layer with errors or stalls on it past the dispatch timeout. The request still gets the
//! golden ids of the tiny model, and the router's `/metrics` shows what it did (quarantine,
//! failovers). Also: an engine panic injected through the hidden test hook makes `/ready`
//! answer 503 and the process exit non-zero, and with no replica of an expert left a stream
//! gets a 503 and an error body before any streamed byte.

mod fault_proxy;
pub mod harness;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use fault_proxy::Fault;
use harness::*;
use reqwest::StatusCode;
use serde_json::{Value, json};

const MODEL: &str = "tiny-dsv3";

fn node_metric(m: &HashMap<String, f64>, name: &str, node: &str) -> f64 {
    m.get(&format!("{name}{{node=\"{node}\"}}"))
        .copied()
        .unwrap_or(0.0)
}

/// The golden greedy continuation of the chat prompt (every golden margin > 5e-3), asked for
/// through `/v1/completions`; returns the ids and how long the request took.
async fn golden_request(c: &reqwest::Client, addr: &str) -> (Vec<u64>, Duration) {
    let g = golden(MODEL);
    let body = json!({"prompt": ids(&g["prompts"][2]["ids"]), "max_tokens": 24, "temperature": 0,
                      "ignore_eos": true, "logprobs": 0, "return_tokens_as_token_ids": true});
    let t0 = Instant::now();
    let r = c
        .post(format!("http://{addr}/v1/completions"))
        .json(&body)
        .send()
        .await
        .expect("request");
    let status = r.status();
    let v: Value = r.json().await.expect("JSON body");
    let took = t0.elapsed();
    eprintln!("golden request: {status} in {took:?}");
    assert_eq!(status, StatusCode::OK, "{v}");
    let got = v["choices"][0]["logprobs"]["tokens"]
        .as_array()
        .expect("tokens")
        .iter()
        .map(token_id)
        .collect();
    (got, took)
}

fn want() -> Vec<u64> {
    ids(&golden(MODEL)["results"][2]["generated_ids"])
}

/// A real node behind a proxy with `fault`, a second real node, and a router over both (every
/// expert has one replica on each), with `extra` router flags.
async fn faulty_pair(fault: Fault, extra: &[&str]) -> (Proc, Proc, fault_proxy::FaultProxy, Proc) {
    let model = fixture(MODEL);
    let behind = expert_node(&model, &["--experts", "*:*"]);
    let healthy = expert_node(&model, &["--experts", "*:*"]);
    let proxy = fault_proxy::start(&behind.addr, fault).await;
    let addrs = format!("{},{}", proxy.addr, healthy.addr);
    let m = model.to_str().expect("utf8");
    let mut args = vec!["--model", m, "--experts-at", &addrs, "--wire", "f32"];
    args.extend_from_slice(extra);
    let router = tokio::task::block_in_place(|| server("router", &args));
    (behind, healthy, proxy, router)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_answering_one_layer_with_errors_is_quarantined_and_the_answer_is_golden() {
    let (_behind, healthy, proxy, router) = faulty_pair(Fault::ErrorAt { layer: 2 }, &[]).await;
    let c = reqwest::Client::new();
    let (got, took) = golden_request(&c, &router.addr).await;
    eprintln!("error at layer 2 on one replica: 24 tokens in {took:?}");
    assert_eq!(
        got,
        want(),
        "the healthy replica's answers give the golden ids"
    );
    assert!(
        proxy.sabotaged() > 0,
        "the proxy answered some layer-2 dispatch with an error"
    );
    let m = metric_values(&c, &router.addr).await;
    let q = node_metric(&m, "moe_dispatch_quarantines_total", &proxy.addr);
    assert!(q >= 1.0, "the erring node was quarantined ({q})");
    assert_eq!(
        node_metric(&m, "moe_dispatch_quarantined", &proxy.addr),
        1.0,
        "and still is (10 s by default)"
    );
    assert_eq!(
        node_metric(&m, "moe_dispatch_quarantines_total", &healthy.addr),
        0.0,
        "the healthy node was not"
    );
    // The quarantine keeps the erring node out of later steps: one error per quarantine, not
    // one per step and layer (24 steps here).
    assert_eq!(
        proxy.sabotaged() as f64,
        node_metric(&m, "moe_dispatch_failovers_total", &proxy.addr)
    );
    assert!(
        proxy.sabotaged() < 24,
        "{} errors: the node was tried again at every step",
        proxy.sabotaged()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_at_its_limit_is_routed_around_but_not_quarantined() {
    let (_behind, _healthy, proxy, router) = faulty_pair(Fault::BusyAt { layer: 2 }, &[]).await;
    let c = reqwest::Client::new();
    let (got, _) = golden_request(&c, &router.addr).await;
    assert_eq!(got, want(), "the other replica answered");
    assert!(
        proxy.sabotaged() > 0,
        "the proxy answered some layer-2 dispatch busy"
    );
    let m = metric_values(&c, &router.addr).await;
    assert!(node_metric(&m, "moe_dispatch_failovers_total", &proxy.addr) >= 1.0);
    assert_eq!(
        node_metric(&m, "moe_dispatch_quarantines_total", &proxy.addr),
        0.0,
        "busy is not broken: the node stays in the plan for later steps"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_answering_nans_with_ok_is_quarantined_and_the_answer_is_golden() {
    let (_behind, healthy, proxy, router) = faulty_pair(Fault::NanAt { layer: 2 }, &[]).await;
    let c = reqwest::Client::new();
    let (got, _) = golden_request(&c, &router.addr).await;
    assert_eq!(got, want(), "no NaN reached the residual stream");
    assert!(
        proxy.sabotaged() > 0,
        "the proxy answered some layer-2 dispatch with NaNs"
    );
    let m = metric_values(&c, &router.addr).await;
    assert!(
        node_metric(&m, "moe_dispatch_quarantines_total", &proxy.addr) >= 1.0,
        "the node answering NaNs was quarantined"
    );
    assert_eq!(
        node_metric(&m, "moe_dispatch_quarantines_total", &healthy.addr),
        0.0,
        "the healthy node was not"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_stalling_past_the_timeout_is_routed_around_within_the_step() {
    let (_behind, _healthy, proxy, router) = faulty_pair(
        Fault::StallAt { layer: 3 },
        &["--dispatch-timeout-ms", "1000"],
    )
    .await;
    let c = reqwest::Client::new();
    let (got, took) = golden_request(&c, &router.addr).await;
    eprintln!("stall at layer 3 on one replica, 1 s timeout: 24 tokens in {took:?}");
    assert_eq!(
        got,
        want(),
        "the stalled work was re-sent to the other replica"
    );
    assert!(
        proxy.sabotaged() > 0,
        "the proxy swallowed some layer-3 dispatch"
    );
    let m = metric_values(&c, &router.addr).await;
    let routed_around = node_metric(&m, "moe_dispatch_quarantines_total", &proxy.addr)
        + node_metric(&m, "moe_dispatch_hedges_total", &proxy.addr);
    assert!(
        routed_around >= 1.0,
        "the stalled node was quarantined or hedged"
    );
    // Later steps do not wait on the stalled node again: it is skipped while quarantined.
    assert!(
        proxy.sabotaged() < 24,
        "{} stalls: every step waited on the stalled node",
        proxy.sabotaged()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_turns_slow_is_hedged_then_avoided() {
    // 60 good answers give the node a p99; after them every answer is 400 ms late.
    let (_behind, healthy, proxy, router) = faulty_pair(
        Fault::SlowAfter {
            answers: 60,
            delay_ms: 400,
        },
        &[],
    )
    .await;
    let c = reqwest::Client::new();
    let (got, _) = golden_request(&c, &router.addr).await; // warm-up: the proxy's p99
    assert_eq!(got, want());
    let (got, took) = golden_request(&c, &router.addr).await;
    eprintln!("one replica 400 ms late: 24 tokens in {took:?}");
    assert_eq!(got, want(), "hedged answers are the same answers");
    assert!(proxy.sabotaged() > 0, "the proxy delayed some answers");
    let m = metric_values(&c, &router.addr).await;
    assert!(
        node_metric(&m, "moe_dispatch_hedges_total", &proxy.addr) >= 3.0,
        "late dispatches were hedged"
    );
    assert_eq!(
        node_metric(&m, "moe_dispatch_avoided", &proxy.addr),
        1.0,
        "the slow node is avoided"
    );
    assert_eq!(
        node_metric(&m, "moe_dispatch_hedges_total", &healthy.addr),
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_panic_makes_ready_503_and_the_process_exit_non_zero() {
    let mut s = server(
        "serve",
        &[
            "--model",
            fixture(MODEL).to_str().expect("utf8"),
            "--debug-panic-engine-at-step",
            "3",
            "--engine-failure-grace-ms",
            "3000",
        ],
    );
    let c = reqwest::Client::new();
    let ready = |c: &reqwest::Client, addr: &str| {
        let url = format!("http://{addr}/ready");
        let c = c.clone();
        async move { c.get(url).send().await.map(|r| r.status()) }
    };
    assert_eq!(ready(&c, &s.addr).await.expect("ready"), StatusCode::OK);
    let r = c
        .post(format!("http://{}/v1/completions", s.addr))
        .json(&json!({"prompt": "The cat", "max_tokens": 8, "ignore_eos": true}))
        .send()
        .await
        .expect("request");
    let status = r.status();
    let body: Value = r.json().await.expect("JSON body");
    assert_eq!(
        status,
        StatusCode::SERVICE_UNAVAILABLE,
        "the request in flight when the engine died: {body}"
    );
    assert_eq!(body["error"]["type"], "service_unavailable", "{body}");
    // The engine is dead from then on: /ready says so while the process lingers for its grace
    // period (3 s here, far longer than this check needs).
    assert_eq!(
        ready(&c, &s.addr).await.expect("ready"),
        StatusCode::SERVICE_UNAVAILABLE
    );
    let status = tokio::task::block_in_place(|| s.child.wait()).expect("wait");
    assert!(
        !status.success(),
        "the process exits non-zero for its supervisor: {status}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_fails_mid_way_ends_with_an_error_and_is_counted_as_failed() {
    let s = server(
        "serve",
        &[
            "--model",
            fixture(MODEL).to_str().expect("utf8"),
            "--debug-panic-engine-at-step",
            "4",
            "--engine-failure-grace-ms",
            "5000",
        ],
    );
    let c = reqwest::Client::new();
    let r = c
        .post(format!("http://{}/v1/completions", s.addr))
        .json(&json!({"prompt": "The cat", "max_tokens": 16, "ignore_eos": true, "stream": true}))
        .send()
        .await
        .expect("request");
    assert_eq!(
        r.status(),
        StatusCode::OK,
        "the first tokens came before the panic"
    );
    let text = r.text().await.expect("body");
    let chunks: Vec<Value> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).expect("JSON chunk"))
        .collect();
    let last = chunks.last().expect("chunks");
    assert_eq!(last["error"]["type"], "service_unavailable", "{text}");
    assert!(
        chunks
            .iter()
            .all(|c| c["choices"][0]["finish_reason"].is_null()),
        "it never claims to have finished: {text}"
    );
    let m = metric_values(&c, &s.addr).await;
    let requests = |status: &str| -> f64 {
        m.iter()
            .filter(|(k, _)| {
                k.starts_with("moe_requests_total{") && k.contains(&format!("status=\"{status}\""))
            })
            .map(|(_, v)| v)
            .sum()
    };
    assert_eq!(requests("200"), 0.0, "{m:?}");
    assert_eq!(requests("503"), 1.0, "{m:?}");
    assert!(
        m.keys().any(|k| k.starts_with("moe_requests_total{")
            && k.contains("error_type=\"service_unavailable\"")),
        "{m:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_replica_left_a_stream_gets_503_before_any_byte() {
    let model = fixture(MODEL);
    let m = model.to_str().expect("utf8");
    let n0 = expert_node(&model, &["--experts", "1-3:0-127"]);
    let n1 = expert_node(&model, &["--experts", "1-3:128-255"]);
    let addrs = format!("{},{}", n0.addr, n1.addr);
    let s = server("router", &["--model", m, "--experts-at", &addrs]);
    let c = reqwest::Client::new();
    let gone = n1.addr.clone();
    drop(n1); // experts 128-255 have no replica left
    for stream in [true, false] {
        let t0 = Instant::now();
        let r = c
            .post(format!("http://{}/v1/completions", s.addr))
            .json(&json!({"prompt": "The cat sat on the mat", "max_tokens": 4, "stream": stream}))
            .send()
            .await
            .expect("request");
        let (status, headers_at) = (r.status(), t0.elapsed());
        let text = r.text().await.expect("body");
        eprintln!(
            "stream={stream}: {status} after {headers_at:?}, body complete after {:?}",
            t0.elapsed()
        );
        let body: Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("a JSON error body, not an event stream ({e}): {text}"));
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert_eq!(body["error"]["type"], "service_unavailable", "{body}");
        // Which node is gone, and how it failed, is for the logs: the client gets a stable
        // message naming no address.
        assert_eq!(
            body["error"]["message"], "the service is temporarily unavailable; retry later",
            "{body}"
        );
        assert!(
            !text.contains(&gone) && !text.contains("127.0.0.1"),
            "{text}"
        );
    }
    // /ready says 503 without naming the unreachable node either.
    let r = c
        .get(format!("http://{}/ready", s.addr))
        .send()
        .await
        .expect("ready");
    let ready_text = r.text().await.expect("body");
    assert!(
        !ready_text.contains(&gone) && !ready_text.contains("127.0.0.1"),
        "{ready_text}"
    );
    let m = metric_values(&c, &s.addr).await;
    assert!(
        m.get("moe_dispatch_failed_sequences_total")
            .is_some_and(|v| *v >= 2.0),
        "both failed sequences are counted"
    );
}

/// Polls the router's `/metrics` until `metric` for `node` is `want` (bounded).
async fn wait_node_metric(c: &reqwest::Client, router: &str, metric: &str, node: &str, want: f64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let m = metric_values(c, router).await;
        if node_metric(&m, metric, node) == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{metric} of {node} never became {want}: {m:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_restarted_with_fewer_experts_is_rechecked_and_skipped_until_it_hosts_them() {
    let model = fixture(MODEL);
    let a = expert_node(&model, &["--experts", "*:*"]);
    let b = expert_node(&model, &["--experts", "*:*"]);
    let b_addr = b.addr.clone();
    let addrs = format!("{},{}", a.addr, b_addr);
    let m = model.to_str().expect("utf8");
    let args = ["--model", m, "--experts-at", &addrs, "--wire", "f32"];
    let router = tokio::task::block_in_place(|| server("router", &args));
    let c = reqwest::Client::new();
    assert_eq!(golden_request(&c, &router.addr).await.0, want());

    // The same address, now hosting only layer 1's experts.
    drop(b);
    let b = tokio::task::block_in_place(|| {
        expert_node(&model, &["--experts", "1:*", "--listen", &b_addr])
    });
    wait_node_metric(
        &c,
        &router.addr,
        "moe_dispatch_node_mismatched",
        &b.addr,
        1.0,
    )
    .await;
    let pairs =
        |m: &HashMap<String, f64>| node_metric(m, "moe_dispatch_expert_tokens_total", &b_addr);
    let before = metric_values(&c, &router.addr).await;
    for _ in 0..3 {
        assert_eq!(golden_request(&c, &router.addr).await.0, want());
    }
    let after = metric_values(&c, &router.addr).await;
    // Unchecked, every step's requests for layers 2 and 3 reached it and failed over (one
    // error per quarantine at best); checked, it gets nothing while the other replica serves.
    assert_eq!(
        node_metric(&after, "moe_dispatch_failovers_total", &b_addr),
        node_metric(&before, "moe_dispatch_failovers_total", &b_addr),
        "no request failed over from the mismatched node"
    );
    assert_eq!(
        pairs(&after),
        pairs(&before),
        "the mismatched node was skipped"
    );

    // Back with every expert: the re-check passes and it takes work again.
    drop(b);
    let _b = tokio::task::block_in_place(|| {
        expert_node(&model, &["--experts", "*:*", "--listen", &b_addr])
    });
    wait_node_metric(
        &c,
        &router.addr,
        "moe_dispatch_node_mismatched",
        &b_addr,
        0.0,
    )
    .await;
    for _ in 0..3 {
        assert_eq!(golden_request(&c, &router.addr).await.0, want());
    }
    let again = metric_values(&c, &router.addr).await;
    assert!(
        pairs(&again) > pairs(&after),
        "the node serves again: {again:?}"
    );
}

//! The paged KV cache end to end, on `moe serve` processes over loopback: prefix caching (the
//! same prompt twice reuses its pages and gives the same answer), preemption by recompute under a
//! small KV budget (every request finishes with the ids it has alone), and `--max-model-len`
//! (a chat request without `max_tokens` runs to the model length; a 163,840-token model is
//! served).

pub mod harness;

use std::collections::HashMap;

use futures::StreamExt;
use harness::*;
use reqwest::StatusCode;
use serde_json::{Value, json};

const MODEL: &str = "tiny-dsv3-bf16";
/// Bytes of one 16-token page of the tiny models with the default (f32) cache:
/// 4 layers × (32 + 8) values × 4 bytes × 16 tokens.
const PAGE_BYTES: usize = 4 * 40 * 4 * 16;

fn serve_model(dir: &std::path::Path, extra: &[&str]) -> Proc {
    let mut args = vec!["--model", dir.to_str().expect("utf8")];
    args.extend_from_slice(extra);
    server("serve", &args)
}

fn get(m: &HashMap<String, f64>, k: &str) -> f64 {
    m.get(k).copied().unwrap_or(0.0)
}

fn body(prompt: &[u64], max_tokens: usize) -> Value {
    json!({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": true,
           "logprobs": 0, "return_tokens_as_token_ids": true})
}

/// Generated ids and their logprobs.
fn answer(resp: &Value) -> (Vec<u64>, Vec<f64>) {
    let lp = &resp["choices"][0]["logprobs"];
    let ids = lp["tokens"]
        .as_array()
        .expect("tokens")
        .iter()
        .map(token_id)
        .collect();
    let lps = lp["token_logprobs"]
        .as_array()
        .expect("logprobs")
        .iter()
        .map(|v| v.as_f64().expect("f"))
        .collect();
    (ids, lps)
}

fn prompt(g: &Value, i: usize) -> Vec<u64> {
    ids(&g["prompts"][i]["ids"])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_prompt_twice_reuses_its_pages_and_gives_the_same_answer() {
    let g = golden(MODEL);
    let p = prompt(&g, 3); // 400 tokens: 24 full pages before the last token
    let c = reqwest::Client::new();
    for (flags, hits) in [(&[][..], 24.0), (&["--no-prefix-caching"][..], 0.0)] {
        let s = serve_model(&fixture(MODEL), flags);
        let (st, first) = post(&c, &url(&s, "/v1/completions"), &body(&p, 24)).await;
        assert_eq!(st, StatusCode::OK, "{first}");
        let before = metric_values(&c, &s.addr).await;
        let (st, second) = post(&c, &url(&s, "/v1/completions"), &body(&p, 24)).await;
        assert_eq!(st, StatusCode::OK, "{second}");
        let after = metric_values(&c, &s.addr).await;
        let d = |k: &str| get(&after, k) - get(&before, k);
        assert_eq!(d("moe_prefix_cache_hits_total"), hits, "{flags:?}");
        let (a, la) = answer(&first);
        let (b, lb) = answer(&second);
        assert_eq!(a, ids(&g["results"][3]["generated_ids"]), "golden ids");
        assert_eq!(a, b, "{flags:?}: same ids");
        for (x, y) in la.iter().zip(&lb) {
            assert!((x - y).abs() <= 1e-4, "{flags:?}: logprob {x} vs {y}");
        }
        if hits > 0.0 {
            assert!(get(&after, "moe_prefix_cache_hit_rate") > 0.0);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preempted_sequences_resume_with_the_ids_they_have_alone() {
    let g = golden(MODEL);
    let p = prompt(&g, 3);
    // 60 pages (960 tokens): two 400-token prompts are admitted, and growing to 500 tokens
    // each (64 pages) they outgrow the cache, so the younger is preempted and recomputed.
    let budget = (60 * PAGE_BYTES).to_string();
    let s = serve_model(
        &fixture(MODEL),
        &["--kv-cache-bytes", &budget, "--no-prefix-caching"],
    );
    let c = reqwest::Client::new();
    let (st, alone) = post(&c, &url(&s, "/v1/completions"), &body(&p, 100)).await;
    assert_eq!(st, StatusCode::OK, "{alone}");
    let (want, _) = answer(&alone);
    // Bursts of 4 until one has overlapped enough to preempt (on a loaded machine a burst's
    // requests can arrive one after another and never share the cache); every answer of every
    // burst must be the one the request gets alone.
    let mut m = HashMap::new();
    for _ in 0..5 {
        let requests = (0..4).map(|_| {
            let (c, u, b) = (c.clone(), url(&s, "/v1/completions"), body(&p, 100));
            async move { post(&c, &u, &b).await }
        });
        for (st, resp) in futures::future::join_all(requests).await {
            assert_eq!(st, StatusCode::OK, "{resp}");
            assert_eq!(
                answer(&resp).0,
                want,
                "a preempted request resumes where it stopped"
            );
            assert_eq!(resp["usage"]["completion_tokens"], 100);
        }
        m = metric_values(&c, &s.addr).await;
        if get(&m, "moe_kv_preemptions_total") >= 1.0 {
            break;
        }
    }
    assert!(get(&m, "moe_kv_preemptions_total") >= 1.0, "{m:?}");
    // A response's last byte can leave before the engine ends the step that finished it and
    // frees its pages: watch the gauge reach 0 (it must, and soon).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while get(&m, "moe_kv_cache_used_tokens") != 0.0 && std::time::Instant::now() < deadline {
        tokio::task::yield_now().await;
        m = metric_values(&c, &s.addr).await;
    }
    assert_eq!(
        get(&m, "moe_kv_cache_used_tokens"),
        0.0,
        "every page is back"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chat_without_max_tokens_runs_to_the_model_length() {
    let g = golden(MODEL);
    let budget = (20 * PAGE_BYTES).to_string(); // holds 320 tokens: the default model length
    let s = serve_model(&fixture(MODEL), &["--kv-cache-bytes", &budget]);
    let c = reqwest::Client::new();
    let models: Value = c
        .get(url(&s, "/v1/models"))
        .send()
        .await
        .expect("models")
        .json()
        .await
        .expect("json");
    assert_eq!(models["data"][0]["max_model_len"], 320);
    let chat =
        json!({"messages": g["prompts"][2]["messages"], "temperature": 0, "ignore_eos": true});
    let (st, resp) = post(&c, &url(&s, "/v1/chat/completions"), &chat).await;
    assert_eq!(st, StatusCode::OK, "{resp}");
    assert_eq!(resp["usage"]["prompt_tokens"], 46);
    assert_eq!(resp["usage"]["completion_tokens"], 320 - 46);
    assert_eq!(resp["choices"][0]["finish_reason"], "length");

    // A --max-model-len the budget cannot hold is refused at start.
    let model = fixture(MODEL);
    let out = moe(&[
        "serve",
        "--model",
        model.to_str().expect("utf8"),
        "--listen",
        "127.0.0.1:0",
        "--kv-cache-bytes",
        &budget,
        "--max-model-len",
        "321",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("exceeds what the KV-cache budget holds"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chat_without_max_tokens_is_served_at_a_163840_token_context() {
    let dir = tempfile::tempdir().expect("tempdir");
    for entry in std::fs::read_dir(fixture(MODEL)).expect("fixture") {
        let entry = entry.expect("entry");
        if entry.file_type().expect("type").is_file() {
            std::fs::copy(entry.path(), dir.path().join(entry.file_name())).expect("copy");
        }
    }
    let cfg_path = dir.path().join("config.json");
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).expect("config")).expect("json");
    cfg["max_position_embeddings"] = json!(163_840);
    std::fs::write(&cfg_path, cfg.to_string()).expect("write config");

    let s = serve_model(dir.path(), &[]);
    let c = reqwest::Client::new();
    let models: Value = c
        .get(url(&s, "/v1/models"))
        .send()
        .await
        .expect("models")
        .json()
        .await
        .expect("json");
    assert_eq!(models["data"][0]["max_model_len"], 163_840);
    let chat = json!({"messages": [{"role": "user", "content": "Hello"}], "stream": true,
                      "ignore_eos": true});
    let r = c
        .post(url(&s, "/v1/chat/completions"))
        .json(&chat)
        .send()
        .await
        .expect("chat");
    assert_eq!(r.status(), StatusCode::OK);
    let mut stream = r.bytes_stream();
    let mut text = String::new();
    while text.matches("data: ").count() < 4 {
        let chunk = stream.next().await.expect("more chunks").expect("bytes");
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(!text.contains("\"error\""), "{text}");
    drop(stream); // the client leaves; the sequence is cancelled
}

/// The f32 and FP8 golden models (serve_api covers the bf16 one) with the paged cache and
/// prefix caching on: each golden prompt alone and then 32 concurrent requests over them (which
/// reuse the cached prompt pages) give the golden ids
/// (up to a step whose golden margin is ≤ 1e-3) and logprobs within 1e-3.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn golden_ids_and_logprobs_among_32_concurrent_requests_on_the_other_models() {
    for name in ["tiny-dsv3", "tiny-dsv3-fp8"] {
        let g = golden(name);
        let steps = f32_tensors(
            &fixture(name).join("golden/golden_extra.safetensors"),
            |n| n.ends_with("step_logits"),
        );
        let s = serve_model(&fixture(name), &[]);
        let c = reqwest::Client::new();
        // Each prompt alone first (its full pages are then cached), then 32 at once.
        let mut answers = Vec::new();
        for i in 0..4 {
            let r = post(&c, &url(&s, "/v1/completions"), &body(&prompt(&g, i), 24)).await;
            answers.push((i, r));
        }
        let before = metric_values(&c, &s.addr).await;
        let requests = (0..32).map(|k| {
            let (c, u, b) = (
                c.clone(),
                url(&s, "/v1/completions"),
                body(&prompt(&g, k % 4), 24),
            );
            async move { (k % 4, post(&c, &u, &b).await) }
        });
        answers.extend(futures::future::join_all(requests).await);
        for (i, (st, resp)) in answers {
            assert_eq!(st, StatusCode::OK, "{resp}");
            let (got, lps) = answer(&resp);
            let want = ids(&g["results"][i]["generated_ids"]);
            let rows = &steps[&format!("greedy.prompt_{i}.step_logits")];
            for step in 0..24 {
                if got[step] != want[step] {
                    let m = g["results"][i]["greedy_margins"][step].as_f64().expect("m");
                    assert!(m <= 1e-3, "{name} prompt_{i} step {step}: margin {m}");
                    break;
                }
                let gold = log_softmax(&rows[step * 512..(step + 1) * 512])[got[step] as usize];
                assert!(
                    (lps[step] - gold).abs() <= 1e-3,
                    "{name} prompt_{i} step {step}: logprob {} vs {gold}",
                    lps[step]
                );
            }
        }
        let m = metric_values(&c, &s.addr).await;
        // prompt_2 has 2 full pages before its last token, prompt_3 24: each reused 8 times.
        let key = "moe_prefix_cache_hits_total";
        let hits = get(&m, key) - get(&before, key);
        assert!(hits >= 8.0 * 26.0, "{name}: {hits} pages reused");
    }
}

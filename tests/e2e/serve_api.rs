//! The OpenAI-compatible API end to end: `moe serve` (and `moe router`) processes on loopback,
//! driven by a real HTTP client; golden outputs of the tiny bf16 model.

pub mod harness;

use std::collections::HashMap;
use std::time::Duration;

use futures::StreamExt;
use harness::*;
use reqwest::StatusCode;
use serde_json::{Value, json};

#[path = "serve_api/refusals.rs"]
mod refusals;

const MODEL: &str = "tiny-dsv3-bf16";

fn serve(extra: &[&str]) -> Proc {
    let model = fixture(MODEL);
    let mut args = vec!["--model", model.to_str().expect("utf8")];
    args.extend_from_slice(extra);
    server("serve", &args)
}

fn step_logits() -> HashMap<String, Vec<f32>> {
    let path = fixture(MODEL).join("golden/golden_extra.safetensors");
    f32_tensors(&path, |n| n.ends_with("step_logits"))
}

/// Checks a completion's ids (from `token_id:N` logprob tokens) and logprobs against golden.
fn check_completion(i: usize, resp: &Value, golden: &Value, steps: &HashMap<String, Vec<f32>>) {
    let lp = &resp["choices"][0]["logprobs"];
    let got: Vec<u64> = lp["tokens"]
        .as_array()
        .expect("tokens")
        .iter()
        .map(token_id)
        .collect();
    let want: Vec<u64> = ids(&golden["results"][i]["generated_ids"]);
    let margins: Vec<f64> = golden["results"][i]["greedy_margins"]
        .as_array()
        .expect("margins")
        .iter()
        .map(|m| m.as_f64().expect("f"))
        .collect();
    let rows = &steps[&format!("greedy.prompt_{i}.step_logits")];
    assert_eq!(got.len(), 24, "prompt_{i}");
    for step in 0..24 {
        if got[step] != want[step] {
            assert!(
                margins[step] <= 1e-3,
                "prompt_{i} step {step}: {} != {}",
                got[step],
                want[step]
            );
            break;
        }
        let gold = log_softmax(&rows[step * 512..(step + 1) * 512]);
        let ours = lp["token_logprobs"][step].as_f64().expect("logprob");
        assert!(
            (ours - gold[got[step] as usize]).abs() <= 1e-3,
            "prompt_{i} step {step}: logprob {ours} vs {}",
            gold[got[step] as usize]
        );
    }
}

fn completion_body(prompt: &[u64]) -> Value {
    json!({"prompt": prompt, "max_tokens": 24, "temperature": 0, "ignore_eos": true, "logprobs": 1,
           "return_tokens_as_token_ids": true})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn golden_greedy_ids_and_logprobs_alone_and_with_32_concurrent_requests() {
    let s = serve(&[]);
    let c = reqwest::Client::new();
    let g = golden(MODEL);
    let steps = step_logits();
    let prompts: Vec<Vec<u64>> = g["prompts"]
        .as_array()
        .expect("prompts")
        .iter()
        .map(|p| ids(&p["ids"]))
        .collect();
    for (i, p) in prompts.iter().enumerate() {
        let (status, resp) = post(&c, &url(&s, "/v1/completions"), &completion_body(p)).await;
        assert_eq!(status, StatusCode::OK, "{resp}");
        check_completion(i, &resp, &g, &steps);
        assert_eq!(resp["usage"]["prompt_tokens"], p.len());
        assert_eq!(resp["usage"]["completion_tokens"], 24);
    }
    let before = metric_values(&c, &s.addr).await;
    let requests = (0..32).map(|k| {
        let (c, u, body) = (
            c.clone(),
            url(&s, "/v1/completions"),
            completion_body(&prompts[k % 4]),
        );
        async move { (k % 4, post(&c, &u, &body).await) }
    });
    for (i, (status, resp)) in futures::future::join_all(requests).await {
        assert_eq!(status, StatusCode::OK, "{resp}");
        check_completion(i, &resp, &g, &steps);
    }
    let after = metric_values(&c, &s.addr).await;
    let delta =
        |k: &str| after.get(k).copied().unwrap_or(0.0) - before.get(k).copied().unwrap_or(0.0);
    let avg = delta("moe_batch_sequences_sum") / delta("moe_batch_sequences_count");
    eprintln!("average sequences per step with 32 concurrent requests: {avg:.1}");
    assert!(avg > 8.0, "continuous batching: average batch {avg}");
}

/// Reads an SSE response: the JSON of every `data:` line and whether `[DONE]` came last.
async fn sse(resp: reqwest::Response) -> (Vec<Value>, bool) {
    let text = resp.text().await.expect("body");
    let data: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    let done = data.last() == Some(&"[DONE]");
    (
        data.iter()
            .filter(|d| **d != "[DONE]")
            .map(|d| serde_json::from_str(d).expect("chunk JSON"))
            .collect(),
        done,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_gives_the_same_text_as_a_plain_answer() {
    let s = serve(&[]);
    let c = reqwest::Client::new();
    let body =
        json!({"prompt": "The cat sat", "max_tokens": 12, "temperature": 0, "ignore_eos": true});
    let (_, plain) = post(&c, &url(&s, "/v1/completions"), &body).await;
    let mut stream_body = body.clone();
    stream_body["stream"] = json!(true);
    stream_body["stream_options"] = json!({"include_usage": true});
    let r = c
        .post(url(&s, "/v1/completions"))
        .json(&stream_body)
        .send()
        .await
        .expect("stream");
    assert_eq!(r.status(), StatusCode::OK);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .expect("ascii")
            .starts_with("text/event-stream")
    );
    let (chunks, done) = sse(r).await;
    assert!(done, "ends with data: [DONE]");
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["text"].as_str())
        .collect();
    assert_eq!(text, plain["choices"][0]["text"].as_str().expect("text"));
    let finish: Vec<&Value> = chunks
        .iter()
        .map(|c| &c["choices"][0]["finish_reason"])
        .filter(|f| !f.is_null())
        .collect();
    assert_eq!(finish, vec![&json!("length")]);
    assert_eq!(chunks.last().expect("usage")["usage"], plain["usage"]);

    // Chat: the role first, then content, finish reason, usage.
    let chat = json!({"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8, "temperature": 0,
                      "stream": true, "stream_options": {"include_usage": true}});
    let r = c
        .post(url(&s, "/v1/chat/completions"))
        .json(&chat)
        .send()
        .await
        .expect("chat stream");
    let (chunks, done) = sse(r).await;
    assert!(done);
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert!(
        chunks
            .iter()
            .all(|c| c["object"] == "chat.completion.chunk")
    );
    assert_eq!(
        chunks.last().expect("usage")["usage"]["completion_tokens"],
        8
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_uses_the_models_template_like_the_reference() {
    let s = serve(&[]);
    let c = reqwest::Client::new();
    let g = golden(MODEL);
    let body = json!({"messages": g["prompts"][2]["messages"], "max_tokens": 24, "temperature": 0,
                      "ignore_eos": true, "logprobs": true, "top_logprobs": 2, "return_tokens_as_token_ids": true});
    let (status, resp) = post(&c, &url(&s, "/v1/chat/completions"), &body).await;
    assert_eq!(status, StatusCode::OK, "{resp}");
    assert_eq!(
        resp["usage"]["prompt_tokens"], 46,
        "the rendered chat prompt is golden prompt_2"
    );
    let content = resp["choices"][0]["logprobs"]["content"]
        .as_array()
        .expect("content");
    let got: Vec<u64> = content.iter().map(|e| token_id(&e["token"])).collect();
    assert_eq!(got, ids(&g["results"][2]["generated_ids"]));
    assert_eq!(content[0]["top_logprobs"].as_array().expect("top").len(), 2);
    assert_eq!(resp["choices"][0]["message"]["role"], "assistant");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_clients_that_disconnect_leave_nothing_running() {
    let s = serve(&[]);
    let c = reqwest::Client::new();
    // Long enough (2030 tokens each, 50 at once) that none can finish before its client leaves.
    let body = json!({"prompt": "Once upon a time", "max_tokens": 2030, "ignore_eos": true, "stream": true});
    let mut streams = Vec::new();
    for _ in 0..50 {
        let r = c
            .post(url(&s, "/v1/completions"))
            .json(&body)
            .send()
            .await
            .expect("stream");
        assert_eq!(r.status(), StatusCode::OK);
        streams.push(r.bytes_stream());
    }
    let first = streams[0].next().await;
    assert!(first.is_some(), "generation is under way");
    let get = |m: &HashMap<String, f64>, k: &str| m.get(k).copied().unwrap_or(0.0);
    let mid = metric_values(&c, &s.addr).await;
    assert!(
        get(&mid, "moe_running_sequences") + get(&mid, "moe_waiting_sequences") > 0.0,
        "work in flight"
    );
    drop(streams); // every client disconnects mid-stream
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let m = metric_values(&c, &s.addr).await;
        if get(&m, "moe_running_sequences") == 0.0
            && get(&m, "moe_waiting_sequences") == 0.0
            && get(&m, "moe_kv_cache_used_tokens") == 0.0
        {
            assert_eq!(
                get(&m, "moe_cancelled_sequences_total"),
                50.0,
                "every sequence was cancelled, none finished"
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "sequences still running: {m:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_ready_models_and_metrics() {
    let s = serve(&["--served-model-name", "tiny"]);
    let c = reqwest::Client::new();
    assert_eq!(
        c.get(url(&s, "/health"))
            .send()
            .await
            .expect("health")
            .status(),
        StatusCode::OK
    );
    assert_eq!(
        c.get(url(&s, "/ready"))
            .send()
            .await
            .expect("ready")
            .status(),
        StatusCode::OK
    );
    let models: Value = c
        .get(url(&s, "/v1/models"))
        .send()
        .await
        .expect("models")
        .json()
        .await
        .expect("json");
    assert_eq!(models["data"][0]["id"], "tiny");
    let (status, _) = post(
        &c,
        &url(&s, "/v1/completions"),
        &json!({"model": "tiny", "prompt": "hi", "max_tokens": 3}),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let m = metric_values(&c, &s.addr).await;
    for name in [
        "moe_requests_total{status=\"200\",error_type=\"\"}",
        "moe_time_to_first_token_seconds_count",
        "moe_time_per_output_token_seconds_count",
        "moe_prompt_tokens_total",
        "moe_generation_tokens_total",
        "moe_batch_sequences_count",
        "moe_kv_cache_capacity_tokens",
    ] {
        assert!(
            m.get(name).is_some_and(|v| *v > 0.0),
            "{name} missing or zero"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_answers_503_when_experts_are_unavailable() {
    let model = fixture("tiny-dsv3");
    let m = model.to_str().expect("utf8");
    let n0 = expert_node(&model, &["--experts", "1-3:0-127"]);
    let n1 = expert_node(&model, &["--experts", "1-3:128-255"]);
    let addrs = format!("{},{}", n0.addr, n1.addr);
    let s = server(
        "router",
        &[
            "--model",
            m,
            "--experts-at",
            &addrs,
            "--wire",
            "f32",
            "--replacement-wait-ms",
            "300",
        ],
    );
    let c = reqwest::Client::new();
    let g = golden("tiny-dsv3");
    let body = json!({"prompt": ids(&g["prompts"][2]["ids"]), "max_tokens": 24, "temperature": 0, "ignore_eos": true,
                      "logprobs": 0, "return_tokens_as_token_ids": true});
    let (status, resp) = post(&c, &url(&s, "/v1/completions"), &body).await;
    assert_eq!(status, StatusCode::OK, "{resp}");
    let got: Vec<u64> = resp["choices"][0]["logprobs"]["tokens"]
        .as_array()
        .expect("tokens")
        .iter()
        .map(token_id)
        .collect();
    assert_eq!(
        got,
        ids(&g["results"][2]["generated_ids"]),
        "the router serves the golden continuation"
    );
    assert_eq!(
        c.get(url(&s, "/ready"))
            .send()
            .await
            .expect("ready")
            .status(),
        StatusCode::OK
    );
    drop(n1); // experts 128-255 have no replica
    let (status, resp) = post(
        &c,
        &url(&s, "/v1/completions"),
        &json!({"prompt": "The cat", "max_tokens": 4}),
    )
    .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{resp}");
    assert_eq!(resp["error"]["type"], "service_unavailable");
    assert_eq!(
        c.get(url(&s, "/ready"))
            .send()
            .await
            .expect("ready")
            .status(),
        StatusCode::SERVICE_UNAVAILABLE
    );
}

#[test]
fn the_official_openai_python_package_drives_the_api() {
    let s = serve(&[]);
    let out = openai_client(&s.addr, &fixture(MODEL).join("golden/golden.json"), None);
    eprintln!("{out}");
}

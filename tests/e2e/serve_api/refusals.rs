//! What the API refuses, and how: malformed fields, a full queue, foreign hosts and non-JSON
//! bodies, each a 4xx with an OpenAI-style body, the server serving on afterwards.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_input_gets_a_4xx_with_an_openai_error_body() {
    let s = serve(&["--max-body-bytes", "4096"]);
    let c = reqwest::Client::new();
    let msgs = json!([{"role": "user", "content": "hi"}]);
    // (body, the parameter the error names); the path follows from the body.
    let completions: Vec<(Value, &str)> = vec![
        (json!({"prompt": "x", "temperature": 2.5}), "temperature"),
        (json!({"prompt": "x", "temperature": -0.1}), "temperature"),
        (json!({"prompt": "x", "top_p": 0}), "top_p"),
        (json!({"prompt": "x", "top_p": 1.5}), "top_p"),
        (json!({"prompt": "x", "top_k": -5}), "top_k"),
        (json!({"prompt": "x", "min_p": 1.5}), "min_p"),
        (json!({"prompt": "x", "min_p": -0.1}), "min_p"),
        (json!({"prompt": "x", "max_tokens": -1}), "max_tokens"),
        (json!({"prompt": "x", "max_tokens": 2048}), "max_tokens"),
        (json!({"prompt": "x", "model": "gpt-4"}), "model"),
        (json!({"prompt": ["a", "b"]}), "prompt"),
        (json!({"prompt": [1, 99999]}), "prompt"),
        (json!({"prompt": ""}), "prompt"),
        (json!({"max_tokens": 3}), "prompt"),
        (json!({"prompt": "x", "echo": true}), "echo"),
        (json!({"prompt": "x", "n": 2}), "n"),
        (json!({"prompt": "x", "logprobs": 21}), "logprobs"),
        (
            json!({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}),
            "stop",
        ),
        (
            json!({"prompt": "x", "presence_penalty": 1.0}),
            "presence_penalty",
        ),
    ];
    let chat: Vec<(Value, &str)> = vec![
        (json!({"messages": []}), "messages"),
        (
            json!({"messages": msgs, "max_completion_tokens": 0}),
            "max_completion_tokens",
        ),
        (json!({"messages": msgs, "top_logprobs": 3}), "top_logprobs"),
        (
            json!({"messages": [{"role": "wizard", "content": "x"}]}),
            "messages[0].role",
        ),
        (
            json!({"messages": msgs, "tools": [{"type": "function"}]}),
            "tools",
        ),
        (json!({"messages": msgs, "model": "other"}), "model"),
    ];
    let cases = (completions
        .into_iter()
        .map(|(b, p)| ("/v1/completions", b, p)))
    .chain(
        chat.into_iter()
            .map(|(b, p)| ("/v1/chat/completions", b, p)),
    );
    for (path, body, param) in cases {
        let (status, resp) = post(&c, &url(&s, path), &body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {resp}");
        assert_eq!(resp["error"]["param"], param, "{body}: {resp}");
        assert_eq!(resp["error"]["type"], "invalid_request_error");
        assert!(
            !resp["error"]["message"]
                .as_str()
                .expect("message")
                .is_empty()
        );
    }
    // Not JSON at all.
    let r = c
        .post(url(&s, "/v1/completions"))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let v: Value = r.json().await.expect("json");
    assert!(
        v["error"]["message"]
            .as_str()
            .expect("m")
            .starts_with("invalid JSON body")
    );
    // Over the body limit.
    let big = json!({"prompt": "x".repeat(5000)});
    let (status, resp) = post(&c, &url(&s, "/v1/completions"), &big).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{resp}");
    assert_eq!(resp["error"]["code"], "payload_too_large");
    // The server still serves.
    let (status, _) = post(
        &c,
        &url(&s, "/v1/completions"),
        &json!({"prompt": "x", "max_tokens": 2}),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_answers_429() {
    let s = serve(&["--max-running", "1", "--max-waiting", "1"]);
    let c = reqwest::Client::new();
    let long = json!({"prompt": "x", "max_tokens": 2000, "ignore_eos": true, "temperature": 0, "stream": true});
    // A runs (its first chunk proves it was admitted) ...
    let a = c
        .post(url(&s, "/v1/completions"))
        .json(&long)
        .send()
        .await
        .expect("a");
    let mut a_body = a.bytes_stream();
    assert!(a_body.next().await.is_some(), "A streams");
    // ... B waits (the 200 of a stream is sent once the request is queued) ...
    let b = c
        .post(url(&s, "/v1/completions"))
        .json(&long)
        .send()
        .await
        .expect("b");
    assert_eq!(b.status(), StatusCode::OK);
    // ... and C finds the queue full, and is told when to retry.
    let r = c
        .post(url(&s, "/v1/completions"))
        .json(&json!({"prompt": "x", "max_tokens": 2}))
        .send()
        .await
        .expect("c");
    let (status, retry_after) = (r.status(), r.headers().get("retry-after").cloned());
    let resp: Value = r.json().await.expect("JSON body");
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{resp}");
    assert_eq!(resp["error"]["type"], "rate_limit_error");
    let secs: u64 = retry_after
        .expect("Retry-After")
        .to_str()
        .expect("ascii")
        .parse()
        .expect("seconds");
    assert!(secs >= 1);
    drop(a_body);
    drop(b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_hosts_and_non_json_bodies_are_refused_and_the_server_keeps_serving() {
    let s = serve(&["--allowed-hosts", "api.example.com,localhost"]);
    let c = reqwest::Client::new();
    let port = s.addr.rsplit(':').next().expect("port").to_string();
    let body = json!({"prompt": "The cat", "max_tokens": 2});
    let send = |host: String, ct: &'static str, body: String| {
        let c = c.clone();
        let u = url(&s, "/v1/completions");
        async move {
            let r = c
                .post(u)
                .header("host", host)
                .header("content-type", ct)
                .body(body)
                .send()
                .await
                .expect("send");
            let status = r.status();
            (status, r.json::<Value>().await.expect("JSON body"))
        }
    };
    // A page on another origin (DNS rebinding: the name resolves here, the Host is its own).
    let (status, resp) = send(
        format!("evil.example.net:{port}"),
        "application/json",
        body.to_string(),
    )
    .await;
    assert_eq!(status, StatusCode::MISDIRECTED_REQUEST, "{resp}");
    assert_eq!(resp["error"]["code"], "host_not_allowed");
    // The address itself is not an allowed name either.
    let (status, _) = send(s.addr.clone(), "application/json", body.to_string()).await;
    assert_eq!(status, StatusCode::MISDIRECTED_REQUEST);
    // A cross-site form post cannot set application/json without a preflight.
    for ct in ["text/plain", "application/x-www-form-urlencoded"] {
        let (status, resp) = send(format!("localhost:{port}"), ct, body.to_string()).await;
        assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE, "{ct}: {resp}");
        assert_eq!(resp["error"]["type"], "invalid_request_error");
    }
    // Probes are not host-checked; the allowed names are served.
    let health = c.get(url(&s, "/health")).send().await.expect("health");
    assert_eq!(health.status(), StatusCode::OK);
    for host in [format!("localhost:{port}"), "API.example.com".to_string()] {
        let (status, resp) = send(
            host.clone(),
            "application/json; charset=utf-8",
            body.to_string(),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{host}: {resp}");
    }
    let m = metric_values(&c, &s.addr).await;
    let refused: f64 = m
        .iter()
        .filter(|(k, _)| {
            k.starts_with("moe_requests_total{") && (k.contains("\"421\"") || k.contains("\"415\""))
        })
        .map(|(_, v)| v)
        .sum();
    assert_eq!(refused, 4.0, "refusals are counted: {m:?}");
}

/// Private memory of the serving process, from its own `/metrics`.
async fn private_bytes(c: &reqwest::Client, p: &Proc) -> f64 {
    metric_values(c, &p.addr).await["moe_process_private_memory_bytes"]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prompt_tokenized_then_refused_for_length_gives_its_memory_back() {
    // DeepSeek's vocabulary size and context: with a 163,840-token context a few megabytes of
    // text pass the byte-length precheck, so they are tokenized before they are refused.
    let dir = tempfile::tempdir().expect("tempdir");
    let model = dir.path().join("m");
    let model_s = model.to_str().expect("utf8");
    let out = moe(&["gen-model", "--preset", "tiny-129k", "--out", model_s]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cfg_path = model.join("config.json");
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).expect("config")).expect("json");
    cfg["max_position_embeddings"] = json!(163_840);
    std::fs::write(&cfg_path, cfg.to_string()).expect("write config");
    let s = server("serve", &["--model", model_s, "--served-model-name", "m"]);
    let c = reqwest::Client::new();

    // Words from a fixed generator: ~2 tokens each, so 4.5 MB is far past the context.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut text = String::new();
    while text.len() < 4_500_000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        for k in 0..(2 + x % 8) {
            text.push((b'a' + ((x >> (5 * k)) % 26) as u8) as char);
        }
        text.push(' ');
    }
    let small =
        json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2});
    let (status, _) = post(&c, &url(&s, "/v1/chat/completions"), &small).await;
    assert_eq!(status, StatusCode::OK);
    let before = private_bytes(&c, &s).await;
    let big =
        json!({"model": "m", "messages": [{"role": "user", "content": text}], "max_tokens": 4});
    for _ in 0..2 {
        let (status, resp) = post(&c, &url(&s, "/v1/chat/completions"), &big).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{resp}");
        let msg = resp["error"]["message"].as_str().expect("message");
        assert!(
            msg.contains("in the prompt"),
            "refused after tokenizing: {msg}"
        );
    }
    let after = private_bytes(&c, &s).await;
    // Kept, each request's tokenization held ~540 MB after its answer.
    assert!(
        after - before < 96.0 * 1024.0 * 1024.0,
        "private memory {:.0} MB before, {:.0} MB after",
        before / 1e6,
        after / 1e6
    );
    let (status, _) = post(&c, &url(&s, "/v1/chat/completions"), &small).await;
    assert_eq!(status, StatusCode::OK, "serves on");
}

//! `moe bench`: a load generator for any OpenAI-compatible server, like vLLM's
//! `benchmark_serving`: N streaming completion requests at a fixed concurrency (or Poisson
//! arrivals at a request rate), prompts of random token ids with fixed or ranged lengths, fixed
//! or ranged output lengths (`ignore_eos`), and the usual figures: request and token throughput,
//! TTFT, TPOT and end-to-end latency percentiles, errors. Optionally writes them as JSON.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{Value, json};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Server base URL.
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    url: String,
    /// Model name to send (default: the first of /v1/models).
    #[arg(long)]
    model: Option<String>,
    /// Number of requests.
    #[arg(long, default_value_t = 64)]
    requests: usize,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Poisson arrivals at this many requests per second (default: all at once, bounded by
    /// --concurrency).
    #[arg(long)]
    request_rate: Option<f64>,
    /// Prompt length in tokens (or the low end of a range with --prompt-len-max).
    #[arg(long, default_value_t = 32)]
    prompt_len: usize,
    #[arg(long)]
    prompt_len_max: Option<usize>,
    /// Output length in tokens (or the low end of a range with --output-len-max).
    #[arg(long, default_value_t = 64)]
    output_len: usize,
    #[arg(long)]
    output_len_max: Option<usize>,
    /// Seed of prompts, lengths and arrivals.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Sampling temperature of every request (0 = greedy).
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    /// Nucleus sampling of every request (1 = off).
    #[arg(long, default_value_t = 1.0)]
    top_p: f64,
    /// Top-N log-probabilities per token (`logprobs` of /v1/completions); off when absent.
    #[arg(long)]
    logprobs: Option<u32>,
}

#[derive(Debug, Clone, Default)]
struct Record {
    ok: bool,
    error: String,
    prompt_tokens: usize,
    output_tokens: usize,
    ttft: f64,
    latency: f64,
}

fn percentiles(mut v: Vec<f64>) -> Value {
    if v.is_empty() {
        return json!(null);
    }
    v.sort_by(f64::total_cmp);
    let p = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize] * 1e3;
    json!({"mean_ms": v.iter().sum::<f64>() / v.len() as f64 * 1e3, "p50_ms": p(0.5), "p90_ms": p(0.9), "p99_ms": p(0.99)})
}

async fn one(
    client: reqwest::Client,
    url: String,
    sampling: Arc<Value>,
    prompt: Vec<u32>,
    max_tokens: usize,
) -> Record {
    let started = Instant::now();
    let mut body = json!({"prompt": prompt, "max_tokens": max_tokens, "ignore_eos": true,
                      "stream": true, "stream_options": {"include_usage": true}});
    if let (Some(b), Some(s)) = (body.as_object_mut(), sampling.as_object()) {
        b.extend(s.iter().map(|(k, v)| (k.clone(), v.clone())));
    }
    let mut rec = Record {
        prompt_tokens: prompt.len(),
        ..Default::default()
    };
    let resp = match client
        .post(format!("{url}/v1/completions"))
        .json(&body)
        .send()
        .await
    {
        Ok(r) => r,
        Err(e) => {
            rec.error = e.to_string();
            return rec;
        }
    };
    if !resp.status().is_success() {
        rec.error = format!(
            "HTTP {}: {}",
            resp.status(),
            resp.text().await.unwrap_or_default()
        );
        return rec;
    }
    let mut stream = resp.bytes_stream();
    let mut buf = String::new();
    while let Some(chunk) = stream.next().await {
        let Ok(chunk) = chunk else {
            rec.error = "stream broken".into();
            return rec;
        };
        buf.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(pos) = buf.find("\n\n") {
            let event: String = buf.drain(..pos + 2).collect();
            for data in event.lines().filter_map(|l| l.strip_prefix("data: ")) {
                if data == "[DONE]" {
                    continue;
                }
                let Ok(v) = serde_json::from_str::<Value>(data) else {
                    continue;
                };
                if v.get("error").is_some() {
                    rec.error = v["error"]["message"]
                        .as_str()
                        .unwrap_or("error")
                        .to_string();
                }
                if rec.ttft == 0.0
                    && v["choices"][0]["text"]
                        .as_str()
                        .is_some_and(|t| !t.is_empty())
                {
                    rec.ttft = started.elapsed().as_secs_f64();
                }
                if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
                    rec.output_tokens = n as usize;
                }
            }
        }
    }
    rec.latency = started.elapsed().as_secs_f64();
    if rec.ttft == 0.0 {
        rec.ttft = rec.latency;
    }
    rec.ok = rec.error.is_empty() && rec.output_tokens > 0;
    rec
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(run_async(a))
}

async fn run_async(a: Args) -> anyhow::Result<()> {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(a.concurrency.max(1))
        .build()?;
    let url = a.url.trim_end_matches('/').to_string();
    let model = match &a.model {
        Some(m) => m.clone(),
        None => {
            let v: Value = client
                .get(format!("{url}/v1/models"))
                .send()
                .await
                .context("GET /v1/models")?
                .json()
                .await?;
            v["data"][0]["id"]
                .as_str()
                .context("no model in /v1/models")?
                .to_string()
        }
    };
    let mut sampling = json!({"model": model, "temperature": a.temperature, "top_p": a.top_p});
    if let Some(n) = a.logprobs {
        sampling["logprobs"] = n.into();
    }
    let sampling = Arc::new(sampling);
    let mut rng = ChaCha8Rng::seed_from_u64(a.seed);
    let work: Vec<(Vec<u32>, usize)> = (0..a.requests)
        .map(|_| {
            let pl = rng.random_range(
                a.prompt_len..=a.prompt_len_max.unwrap_or(a.prompt_len).max(a.prompt_len),
            );
            let ol = rng.random_range(
                a.output_len..=a.output_len_max.unwrap_or(a.output_len).max(a.output_len),
            );
            ((0..pl).map(|_| rng.random_range(4..500u32)).collect(), ol)
        })
        .collect();
    let bar = ProgressBar::new(a.requests as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} requests ({elapsed})")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let permits = Arc::new(tokio::sync::Semaphore::new(a.concurrency.max(1)));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(work.len());
    for (prompt, out) in work {
        if let Some(rate) = a.request_rate {
            let gap: f64 = -rng.random::<f64>().max(1e-12).ln() / rate;
            tokio::time::sleep(Duration::from_secs_f64(gap)).await;
        }
        let permit = permits.clone().acquire_owned().await?;
        let (client, url, sampling, bar) =
            (client.clone(), url.clone(), sampling.clone(), bar.clone());
        tasks.push(tokio::spawn(async move {
            let r = one(client, url, sampling, prompt, out).await;
            drop(permit);
            bar.inc(1);
            r
        }));
    }
    let mut records = Vec::new();
    for t in tasks {
        records.push(t.await?);
    }
    let elapsed = started.elapsed().as_secs_f64();
    bar.finish_and_clear();
    let ok: Vec<&Record> = records.iter().filter(|r| r.ok).collect();
    let out_tokens: usize = ok.iter().map(|r| r.output_tokens).sum();
    let in_tokens: usize = ok.iter().map(|r| r.prompt_tokens).sum();
    let tpot: Vec<f64> = ok
        .iter()
        .filter(|r| r.output_tokens > 1)
        .map(|r| (r.latency - r.ttft) / (r.output_tokens - 1) as f64)
        .collect();
    let summary = json!({
        "url": url, "model": model, "requests": a.requests, "concurrency": a.concurrency,
        "request_rate": a.request_rate, "temperature": a.temperature, "top_p": a.top_p, "logprobs": a.logprobs, "successful": ok.len(), "errors": records.len() - ok.len(),
        "duration_s": elapsed,
        "request_throughput": ok.len() as f64 / elapsed,
        "output_tokens_per_s": out_tokens as f64 / elapsed,
        "total_tokens_per_s": (out_tokens + in_tokens) as f64 / elapsed,
        "ttft": percentiles(ok.iter().map(|r| r.ttft).collect()),
        "tpot": percentiles(tpot),
        "latency": percentiles(ok.iter().map(|r| r.latency).collect()),
        "first_errors": records.iter().filter(|r| !r.ok).take(5).map(|r| r.error.clone()).collect::<Vec<_>>(),
    });
    let f = |k: &str, q: &str| {
        summary[k][q]
            .as_f64()
            .map_or("-".to_string(), |v| format!("{v:.1}"))
    };
    println!(
        "requests: {} ok, {} errors in {elapsed:.2} s",
        ok.len(),
        records.len() - ok.len()
    );
    println!("request throughput: {:.2} req/s", ok.len() as f64 / elapsed);
    println!("output tokens/s:    {:.1}", out_tokens as f64 / elapsed);
    println!(
        "total tokens/s:     {:.1}",
        (out_tokens + in_tokens) as f64 / elapsed
    );
    println!(
        "{:<10} {:>10} {:>10} {:>10} {:>10}",
        "ms", "mean", "p50", "p90", "p99"
    );
    for k in ["ttft", "tpot", "latency"] {
        println!(
            "{k:<10} {:>10} {:>10} {:>10} {:>10}",
            f(k, "mean_ms"),
            f(k, "p50_ms"),
            f(k, "p90_ms"),
            f(k, "p99_ms")
        );
    }
    if let Some(path) = &a.json {
        std::fs::write(path, serde_json::to_string_pretty(&summary)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if ok.is_empty() {
        anyhow::bail!("every request failed: {}", summary["first_errors"]);
    }
    Ok(())
}

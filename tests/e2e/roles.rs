//! Cluster roles for end-to-end tests: `moe` coordinator, expert-node and router processes
//! on a real etcd, their stdout lines, and greedy requests against the golden outputs.

use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};

use super::harness::*;

pub const MODEL: &str = "tiny-dsv3";
pub const TTL_MS: &str = "2000";

/// A `moe` process whose stdout lines are forwarded to a channel.
pub struct Role {
    pub proc: Proc,
    pub lines: mpsc::Receiver<String>,
}

pub fn role(args: &[&str]) -> Role {
    let mut cmd = Command::new(moe_bin());
    cmd.args(args);
    let (child, lines) = spawn_lines(cmd);
    Role {
        proc: Proc {
            child,
            addr: String::new(),
        },
        lines,
    }
}

impl Role {
    /// Waits for a line containing `needle` and returns it.
    pub fn expect_line(&self, needle: &str, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if l.contains(needle) => return l,
                Ok(_) => {}
                Err(_) => panic!("no line with `{needle}` within {within:?}"),
            }
        }
    }
}

pub fn model() -> String {
    fixture(MODEL).to_str().expect("utf8").to_string()
}

/// A coordinator for membership tests: 2 replicas, no load-driven rebalancing.
pub fn coordinator(etcd: &str) -> Role {
    coordinator_with(etcd, &["--min-replicas", "2", "--rebalance-threshold", "0"])
}

/// A coordinator with `extra` arguments.
pub fn coordinator_with(etcd: &str, extra: &[&str]) -> Role {
    member("coordinator", etcd, extra)
}

pub fn node(etcd: &str, id: &str) -> Role {
    node_with(etcd, id, &[])
}

/// An expert node with `extra` arguments; its address is learnt from its stdout.
pub fn node_with(etcd: &str, id: &str, extra: &[&str]) -> Role {
    let mut args = vec!["--node-id", id];
    args.extend_from_slice(extra);
    announced(member("expert-node", etcd, &args))
}

pub fn router(etcd: &str) -> Role {
    router_with(etcd, &[])
}

/// A router with `extra` arguments; its HTTP address is learnt from its stdout.
pub fn router_with(etcd: &str, extra: &[&str]) -> Role {
    let mut args = vec!["--listen", "127.0.0.1:0", "--wire", "f32"];
    args.extend_from_slice(extra);
    announced(member("router", etcd, &args))
}

/// `moe <command>` on the tiny model in the cluster at `etcd`, with `extra` arguments.
fn member(command: &str, etcd: &str, extra: &[&str]) -> Role {
    let m = model();
    let mut args = vec![
        command,
        "--model",
        &m,
        "--etcd",
        etcd,
        "--lease-ttl-ms",
        TTL_MS,
    ];
    args.extend_from_slice(extra);
    role(&args)
}

/// `r` once it has printed `listening on ADDR`, with that address.
fn announced(mut r: Role) -> Role {
    let line = r.expect_line("listening on", Duration::from_secs(60));
    r.proc.addr = line.rsplit(' ').next().unwrap_or_default().to_string();
    r
}

pub async fn wait_ready(c: &reqwest::Client, addr: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(r) = c.get(format!("http://{addr}/ready")).send().await
            && r.status() == StatusCode::OK
        {
            return;
        }
        assert!(Instant::now() < deadline, "the router never became ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Greedy ids of golden prompt `i` through the API.
pub async fn greedy(c: &reqwest::Client, addr: &str, i: usize) -> Result<Vec<u64>, String> {
    let g = golden(MODEL);
    let body = json!({"prompt": g["prompts"][i]["ids"], "max_tokens": 24, "temperature": 0, "ignore_eos": true,
                      "logprobs": 0, "return_tokens_as_token_ids": true});
    let v = complete(c, addr, &body).await?;
    Ok(v["choices"][0]["logprobs"]["tokens"]
        .as_array()
        .ok_or("no tokens")?
        .iter()
        .map(token_id)
        .collect())
}

/// POSTs `body` to `/v1/completions`: the JSON answer, or the status and body of an error.
pub async fn complete(c: &reqwest::Client, addr: &str, body: &Value) -> Result<Value, String> {
    let r = c
        .post(format!("http://{addr}/v1/completions"))
        .json(body)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let status = r.status();
    let v: Value = r.json().await.map_err(|e| e.to_string())?;
    if status != StatusCode::OK {
        return Err(format!("{status}: {v}"));
    }
    Ok(v)
}

pub fn golden_ids(i: usize) -> Vec<u64> {
    ids(&golden(MODEL)["results"][i]["generated_ids"])
}

/// Prompt 2 (chat, 46 tokens) and 3 (400 tokens) have no near-tied greedy step in the f32 model.
pub const PROMPTS: [usize; 2] = [2, 3];

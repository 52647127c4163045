//! Traces end to end: a router and two expert nodes as separate `moe` processes export over
//! OTLP/gRPC to a real receiver on loopback (`otlp_sink.py`: grpcio + opentelemetry-proto,
//! installed by `.ci/run`), and one completion's span tree is checked: the HTTP server span
//! at the root with its GenAI attributes, queue-wait and prefill children, the engine steps
//! linked to it, per-layer dispatch spans with a client span per node whose child is that
//! node's server span (another service) with its compute span. Without an endpoint nothing is
//! exported and no exporter thread exists.

pub mod harness;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use harness::*;
use serde_json::{Value, json};

fn python() -> PathBuf {
    std::env::var_os("MOE_TEST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/e2e-venv/bin/python")
        })
}

/// The OTLP receiver, killed on drop.
struct Sink {
    child: Child,
    endpoint: String,
    out: PathBuf,
}

impl Drop for Sink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn sink(dir: &Path) -> Sink {
    let out = dir.join("spans.jsonl");
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/e2e/otlp_sink.py");
    let mut child = Command::new(python())
        .arg(script)
        .arg(&out)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("starts the OTLP sink (run .ci/run: it installs grpcio and opentelemetry-proto)");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("sink announces its port");
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("sink said {line:?}: is grpcio installed in the venv?"))
        .to_string();
    Sink {
        child,
        endpoint: format!("http://{addr}"),
        out,
    }
}

/// Starts `moe ARGS` with `env`, waiting for its `listening on ADDR` line.
fn start(args: &[&str], env: &[(&str, &str)]) -> Proc {
    let mut cmd = Command::new(moe_bin());
    cmd.args(args);
    for k in [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_SDK_DISABLED",
        "OTEL_TRACES_SAMPLER",
    ] {
        cmd.env_remove(k);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let (child, rx) = spawn_lines(cmd);
    let deadline = Instant::now() + Duration::from_secs(120);
    let addr = loop {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("the process announces its address");
        if let Some(addr) = line.split("listening on ").nth(1) {
            break addr.trim().to_string();
        }
    };
    std::thread::spawn(move || while rx.recv().is_ok() {});
    Proc { child, addr }
}

/// Two nodes (`n0`, `n1`, half the experts each) and a router, all with `env`.
fn cluster(env: &[(&str, &str)]) -> Vec<Proc> {
    let model = fixture("tiny-dsv3");
    let m = model.to_str().expect("utf8");
    let node = |id: &str, experts: &str| {
        start(
            &[
                "expert-node",
                "--model",
                m,
                "--listen",
                "127.0.0.1:0",
                "--experts",
                experts,
                "--node-id",
                id,
            ],
            env,
        )
    };
    let n0 = node("n0", "1-3:0-127");
    let n1 = node("n1", "1-3:128-255");
    let at = format!("{},{}", n0.addr, n1.addr);
    let r = start(
        &[
            "router",
            "--model",
            m,
            "--listen",
            "127.0.0.1:0",
            "--experts-at",
            &at,
            "--wire",
            "f32",
        ],
        env,
    );
    vec![r, n0, n1]
}

const MAX_TOKENS: u64 = 4;

async fn one_completion(addr: &str) -> Value {
    let body = json!({"prompt": [1, 2, 3, 4, 5, 6, 7, 8], "max_tokens": MAX_TOKENS,
                      "temperature": 0, "ignore_eos": true});
    let r = reqwest::Client::new()
        .post(format!("http://{addr}/v1/completions"))
        .json(&body)
        .send()
        .await
        .expect("post");
    assert!(r.status().is_success(), "{}", r.status());
    r.json().await.expect("json")
}

/// Names of the threads of process `pid`.
fn threads(pid: u32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("task dir")
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|c| c.trim().to_string())
        .collect()
}

fn exporter_threads(pid: u32) -> Vec<String> {
    threads(pid)
        .into_iter()
        .filter(|t| t.starts_with("otlp-export") || t.starts_with("OpenTelemetry"))
        .collect()
}

fn spans(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("span json"))
        .collect()
}

fn s<'a>(v: &'a Value, k: &str) -> &'a str {
    v[k].as_str().unwrap_or_default()
}

fn attr<'a>(v: &'a Value, k: &str) -> &'a Value {
    &v["attributes"][k]
}

/// The spans once the completion's whole tree has arrived: the HTTP span, and a server span
/// for every dispatch client span.
fn wait_for_tree(path: &Path) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let all = spans(path);
        let http = all
            .iter()
            .any(|v| s(v, "name") == "text_completion tiny-dsv3");
        let clients: Vec<&str> = all
            .iter()
            .filter(|v| s(v, "name") == "moe.dispatch.node")
            .map(|v| s(v, "span_id"))
            .collect();
        let served = clients.iter().all(|c| {
            all.iter()
                .any(|v| s(v, "name") == "expert.dispatch" && s(v, "parent_span_id") == *c)
        });
        if http && !clients.is_empty() && served {
            return all;
        }
        assert!(
            Instant::now() < deadline,
            "the completion's spans did not all arrive: {} spans",
            all.len()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_completion_is_one_trace_across_router_and_expert_nodes() {
    let dir = tempfile::tempdir().expect("tmp");
    let sink = sink(dir.path());
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", sink.endpoint.as_str()),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        (
            "OTEL_RESOURCE_ATTRIBUTES",
            "deployment.environment.name=test",
        ),
    ];
    let procs = cluster(&env);
    let resp = one_completion(&procs[0].addr).await;
    let prompt_tokens = resp["usage"]["prompt_tokens"].as_u64().expect("usage");
    let all = wait_for_tree(&sink.out);
    for p in &procs {
        assert!(
            !exporter_threads(p.child.id()).is_empty(),
            "exporting processes have the thread"
        );
    }

    // The HTTP server span: the root, with the GenAI conventions.
    let http: Vec<&Value> = all
        .iter()
        .filter(|v| s(v, "name") == "text_completion tiny-dsv3")
        .collect();
    assert_eq!(http.len(), 1, "one HTTP span");
    let http = http[0];
    let (trace, root) = (s(http, "trace_id"), s(http, "span_id"));
    assert_eq!(s(http, "parent_span_id"), "", "the HTTP span is the root");
    assert_eq!(http["kind"], 2, "SPAN_KIND_SERVER");
    assert_eq!(s(http, "service"), "moe-router");
    assert_eq!(http["resource"]["deployment.environment.name"], "test");
    assert!(http["resource"]["service.version"].is_string());
    assert_eq!(attr(http, "gen_ai.operation.name"), "text_completion");
    assert_eq!(attr(http, "gen_ai.provider.name"), "moe-cluster");
    assert_eq!(attr(http, "gen_ai.request.model"), "tiny-dsv3");
    assert_eq!(attr(http, "gen_ai.request.max_tokens"), MAX_TOKENS);
    assert_eq!(attr(http, "gen_ai.request.temperature"), 0.0);
    assert_eq!(attr(http, "gen_ai.usage.input_tokens"), prompt_tokens);
    assert_eq!(attr(http, "gen_ai.usage.output_tokens"), MAX_TOKENS);
    assert_eq!(
        attr(http, "gen_ai.response.finish_reasons"),
        &json!(["length"])
    );
    assert_eq!(attr(http, "http.request.method"), "POST");
    assert_eq!(attr(http, "http.route"), "/v1/completions");
    assert_eq!(attr(http, "http.response.status_code"), 200);

    // Queue wait and prefill: children of the HTTP span, in its trace.
    for name in ["scheduler.queue", "engine.prefill"] {
        let phase: Vec<&Value> = all.iter().filter(|v| s(v, "name") == name).collect();
        assert_eq!(phase.len(), 1, "{name}");
        assert_eq!(
            s(phase[0], "trace_id"),
            trace,
            "{name} in the request's trace"
        );
        assert_eq!(
            s(phase[0], "parent_span_id"),
            root,
            "{name} under the HTTP span"
        );
    }

    // Every engine step that served the request links to it; one step per generated token.
    let steps: HashMap<&str, &Value> = all
        .iter()
        .filter(|v| s(v, "name") == "engine.step")
        .filter(|v| {
            v["links"].as_array().is_some_and(|l| {
                l.iter()
                    .any(|l| s(l, "trace_id") == trace && s(l, "span_id") == root)
            })
        })
        .map(|v| (s(v, "span_id"), v))
        .collect();
    assert_eq!(steps.len() as u64, MAX_TOKENS, "one linked step per token");

    // Per MoE layer a dispatch span under a step; per node a client span under it.
    let dispatch: HashMap<&str, &Value> = all
        .iter()
        .filter(|v| s(v, "name") == "moe.dispatch")
        .map(|v| (s(v, "span_id"), v))
        .collect();
    for d in dispatch.values() {
        let step = steps
            .get(s(d, "parent_span_id"))
            .expect("dispatch under a linked step");
        assert_eq!(s(d, "trace_id"), s(step, "trace_id"));
    }
    assert_eq!(
        dispatch.len() as u64,
        MAX_TOKENS * 3,
        "three MoE layers per step"
    );
    let clients: Vec<&Value> = all
        .iter()
        .filter(|v| s(v, "name") == "moe.dispatch.node")
        .collect();
    let mut nodes_seen = std::collections::BTreeSet::new();
    for c in &clients {
        assert_eq!(c["kind"], 3, "SPAN_KIND_CLIENT");
        assert!(
            dispatch.contains_key(s(c, "parent_span_id")),
            "client under a dispatch"
        );
        for k in [
            "moe.node",
            "moe.layer",
            "moe.tokens",
            "moe.experts",
            "moe.bytes",
        ] {
            assert!(!attr(c, k).is_null(), "client span has {k}");
        }
        // Its child: the node's server span, in another service, with the compute under it.
        let server: Vec<&Value> = all
            .iter()
            .filter(|v| s(v, "parent_span_id") == s(c, "span_id"))
            .collect();
        assert_eq!(server.len(), 1, "one server span per client span");
        let server = server[0];
        assert_eq!(s(server, "name"), "expert.dispatch");
        assert_eq!(server["kind"], 2, "SPAN_KIND_SERVER");
        assert_eq!(s(server, "trace_id"), s(c, "trace_id"));
        assert_eq!(s(server, "service"), "moe-expert-node");
        assert_eq!(attr(server, "moe.layer"), attr(c, "moe.layer"));
        nodes_seen.insert(
            server["resource"]["moe.node.id"]
                .as_str()
                .unwrap_or("?")
                .to_string(),
        );
        let compute = all
            .iter()
            .filter(|v| s(v, "name") == "expert.compute")
            .filter(|v| s(v, "parent_span_id") == s(server, "span_id"))
            .count();
        assert_eq!(compute, 1, "the compute span under the server span");
    }
    assert_eq!(
        nodes_seen.into_iter().collect::<Vec<_>>(),
        vec!["n0".to_string(), "n1".to_string()],
        "both expert nodes' spans arrived"
    );

    // The router counts what it exported.
    let m = metrics_text(&reqwest::Client::new(), &procs[0].addr).await;
    let exported = m
        .lines()
        .find_map(|l| l.strip_prefix("moe_otel_spans_exported_total "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .expect("moe_otel_spans_exported_total");
    assert!(exported > 0.0, "{exported}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_endpoint_nothing_is_exported_and_no_exporter_thread_runs() {
    // Everything but the endpoint is configured.
    let env = [
        ("OTEL_SERVICE_NAME", "x"),
        ("OTEL_TRACES_SAMPLER", "always_on"),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
    ];
    let procs = cluster(&env);
    one_completion(&procs[0].addr).await;
    for p in &procs {
        let t = threads(p.child.id());
        assert!(!t.is_empty());
        assert_eq!(
            exporter_threads(p.child.id()),
            Vec::<String>::new(),
            "{t:?}"
        );
    }
    let m = metrics_text(&reqwest::Client::new(), &procs[0].addr).await;
    assert!(
        m.contains("moe_otel_spans_exported_total 0\n"),
        "nothing exported"
    );
    assert!(m.contains("moe_otel_spans_dropped_total{reason=\"queue_full\"} 0\n"));
}

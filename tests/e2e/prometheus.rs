//! Metrics end to end with the real tools: a Prometheus (Debian `prometheus`) scrapes a local
//! cluster (router, two expert nodes, a coordinator, on a real etcd) and every target is up;
//! `promtool check metrics` passes on every exposition with no lint warning; every PromQL
//! expression of the Grafana dashboards (helm/moe-cluster/dashboards/) passes `promtool check
//! rules` and returns data from that Prometheus after some traffic; and every dashboard
//! type-checks against npm `@grafana/schema` with `tsc` (both installed by `.ci/run`).

pub mod harness;
pub mod roles;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use harness::*;
use moe_meta::testing::EtcdProcess;
use roles::*;
use serde_json::{Value, json};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn dashboards() -> Vec<(String, Value)> {
    let mut out: Vec<(String, Value)> = Vec::new();
    let dir = repo().join("helm/moe-cluster/dashboards");
    for e in std::fs::read_dir(&dir).expect("dashboards dir") {
        let p = e.expect("entry").path();
        if p.extension().is_some_and(|x| x == "json") {
            let v: Value = serde_json::from_str(&std::fs::read_to_string(&p).expect("read"))
                .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            out.push((
                p.file_stem().unwrap_or_default().to_string_lossy().into(),
                v,
            ));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    assert!(out.len() >= 3, "overview, data plane, control plane");
    out
}

/// Every panel's (dashboard, title, expression), panels in rows included.
fn expressions() -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for (name, d) in dashboards() {
        let vars: Vec<&str> = d["templating"]["list"]
            .as_array()
            .expect("templating")
            .iter()
            .filter_map(|v| v["name"].as_str())
            .collect();
        for needed in ["namespace", "cluster", "instance"] {
            assert!(vars.contains(&needed), "{name} has a ${needed} variable");
        }
        for p in d["panels"].as_array().expect("panels") {
            if p["type"] == "row" {
                continue;
            }
            let title = p["title"].as_str().unwrap_or_default().to_string();
            assert!(
                p["description"].as_str().is_some_and(|s| !s.is_empty()),
                "{name}/{title} has a description"
            );
            for t in p["targets"].as_array().expect("targets") {
                out.push((
                    name.clone(),
                    title.clone(),
                    t["expr"].as_str().expect("expr").into(),
                ));
            }
        }
    }
    out
}

/// The expression as Grafana sends it with every variable at "All".
fn substitute(expr: &str) -> String {
    expr.replace("$__rate_interval", "15s")
        .replace("$namespace", ".*")
        .replace("$cluster", ".*")
        .replace("$instance", ".*")
        .replace("$layer", ".*")
}

fn run_with_stdin(cmd: &mut Command, input: &str) -> std::process::Output {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e} (run .ci/run: it installs prometheus)"));
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes())
        .expect("write");
    child.wait_with_output().expect("wait")
}

#[test]
fn dashboards_type_check_against_grafana_schema() {
    let root = repo().join("target/dashboard-check");
    let tsc = root.join("node_modules/.bin/tsc");
    assert!(
        tsc.exists(),
        "{} missing: run .ci/run (it installs @grafana/schema and typescript there)",
        tsc.display()
    );
    let check = tempfile::tempdir_in(&root).expect("tmp under node_modules' parent");
    let write = |name: &str, d: &Value| {
        let ts = format!(
            "import type {{ Dashboard }} from '@grafana/schema';\nexport const dashboard: Dashboard = {};\n",
            serde_json::to_string_pretty(d).expect("json")
        );
        std::fs::write(check.path().join(format!("{name}.ts")), ts).expect("write");
    };
    let config = json!({"compilerOptions": {"strict": true, "noEmit": true, "module": "esnext",
        "moduleResolution": "bundler", "target": "es2022", "skipLibCheck": true, "types": []},
        "include": ["*.ts"]});
    std::fs::write(check.path().join("tsconfig.json"), config.to_string()).expect("write");
    let tsc_run = || {
        Command::new(&tsc)
            .arg("-p")
            .arg(check.path().join("tsconfig.json"))
            .output()
            .expect("runs tsc")
    };
    let boards = dashboards();
    for (name, d) in &boards {
        write(name, d);
    }
    let out = tsc_run();
    assert!(
        out.status.success(),
        "dashboards do not type-check:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // The check can fail: a panel with a misspelt field is refused.
    let mut broken = boards[0].1.clone();
    broken["panels"][1]["gridpos"] = json!({"h": 1});
    write("broken", &broken);
    let out = tsc_run();
    assert!(!out.status.success(), "tsc accepted a misspelt field");
    assert!(String::from_utf8_lossy(&out.stdout).contains("gridpos"));
}

#[test]
fn dashboard_expressions_pass_promtool_check_rules() {
    let dir = tempfile::tempdir().expect("tmp");
    let rules: Vec<Value> = expressions()
        .iter()
        .enumerate()
        .map(|(i, (_, _, e))| json!({"record": format!("dashboard:expr_{i}"), "expr": substitute(e)}))
        .collect();
    let file = dir.path().join("rules.yml");
    // YAML is a superset of JSON.
    std::fs::write(
        &file,
        json!({"groups": [{"name": "dashboards", "rules": rules}]}).to_string(),
    )
    .expect("write");
    let out = Command::new("promtool")
        .args(["check", "rules"])
        .arg(&file)
        .output()
        .expect("runs promtool (run .ci/run: it installs prometheus)");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn metrics_addr(r: &Role) -> String {
    let l = r.expect_line("metrics on", Duration::from_secs(30));
    l.rsplit(' ').next().unwrap_or_default().to_string()
}

async fn query(c: &reqwest::Client, prom: &str, expr: &str) -> Vec<Value> {
    let v: Value = c
        .get(format!("http://{prom}/api/v1/query"))
        .query(&[("query", expr)])
        .send()
        .await
        .expect("query")
        .json()
        .await
        .expect("json");
    assert_eq!(v["status"], "success", "{expr}: {v}");
    v["data"]["result"].as_array().cloned().unwrap_or_default()
}

/// Prometheus on `port` scraping `jobs` every 500 ms, killed on drop.
fn prometheus(dir: &Path, port: u16, jobs: &[(&str, Vec<String>)]) -> Proc {
    let scrape: Vec<Value> = jobs
        .iter()
        .map(|(job, targets)| {
            json!({"job_name": job, "scrape_interval": "500ms", "scrape_timeout": "400ms",
                   "static_configs": [{"targets": targets,
                                       "labels": {"namespace": "moe", "cluster": "local"}}]})
        })
        .collect();
    let cfg = dir.join("prometheus.yml");
    std::fs::write(&cfg, json!({"scrape_configs": scrape}).to_string()).expect("write");
    let child = Command::new("prometheus")
        .arg(format!("--config.file={}", cfg.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starts prometheus (run .ci/run: it installs it)");
    Proc {
        child,
        addr: format!("127.0.0.1:{port}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_every_role_and_every_dashboard_query_returns_data() {
    let etcd = EtcdProcess::start();
    let url = etcd.url();
    let coord = coordinator_with(
        &url,
        &[
            "--min-replicas",
            "1",
            "--rebalance-threshold",
            "0",
            "--metrics-listen",
            "127.0.0.1:0",
        ],
    );
    let coord_metrics = metrics_addr(&coord);
    let node_args = ["--metrics-listen", "127.0.0.1:0", "--expert-metrics"];
    let nodes: Vec<Role> = (0..2)
        .map(|i| node_with(&url, &format!("n{i}"), &node_args))
        .collect();
    let node_metrics: Vec<String> = nodes.iter().map(metrics_addr).collect();
    let r = router_with(
        &url,
        &[
            "--metrics-listen",
            "127.0.0.1:0",
            "--load-publish-ms",
            "300",
        ],
    );
    let router_metrics = metrics_addr(&r);
    let c = reqwest::Client::new();
    wait_ready(&c, &r.proc.addr).await;

    // Traffic, one refused request among it.
    for i in 0..4 {
        greedy(&c, &r.proc.addr, i % 3).await.expect("served");
    }
    let bad = complete(
        &c,
        &r.proc.addr,
        &json!({"prompt": [1, 2], "max_tokens": 0}),
    )
    .await;
    assert!(bad.is_err(), "max_tokens 0 is refused");

    let dir = tempfile::tempdir().expect("tmp");
    let port = free_port();
    let jobs = [
        (
            "moe-router",
            vec![r.proc.addr.clone(), router_metrics.clone()],
        ),
        ("moe-expert-node", node_metrics.clone()),
        ("moe-coordinator", vec![coord_metrics.clone()]),
    ];
    let prom = prometheus(dir.path(), port, &jobs);

    // Every exposition is clean for promtool.
    let mut expositions = vec![r.proc.addr.clone(), router_metrics, coord_metrics];
    expositions.extend(node_metrics);
    for addr in &expositions {
        let text = metrics_text(&c, addr).await;
        let out = run_with_stdin(Command::new("promtool").args(["check", "metrics"]), &text);
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success() && said.trim().is_empty(),
            "{addr}: {said}"
        );
    }

    // Every target up.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let up = if let Ok(r) = c
            .get(format!("http://{}/api/v1/targets", prom.addr))
            .send()
            .await
        {
            let v: Value = r.json().await.unwrap_or_default();
            let t = v["data"]["activeTargets"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            t.len() == expositions.len() && t.iter().all(|t| t["health"] == "up")
        } else {
            false
        };
        if up {
            break;
        }
        assert!(Instant::now() < deadline, "not every target is up");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // More traffic while Prometheus scrapes, so rates have two samples; then every dashboard
    // expression returns data.
    let exprs = expressions();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut missing: Vec<String>;
    loop {
        greedy(&c, &r.proc.addr, 0).await.expect("served");
        missing = Vec::new();
        for (board, title, e) in &exprs {
            if query(&c, &prom.addr, &substitute(e)).await.is_empty() {
                missing.push(format!("{board} / {title}: {e}"));
            }
        }
        if missing.is_empty() || Instant::now() > deadline {
            break;
        }
    }
    assert!(
        missing.is_empty(),
        "queries without data:\n{}",
        missing.join("\n")
    );
    drop(nodes);
}

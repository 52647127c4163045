//! Harness for end-to-end tests: the `moe` binary built from this tree, fixture paths, and
//! child processes that are killed when the test ends (pass or fail).

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// The `moe` binary of this build, or `MOE_E2E_BIN` when set (bench/faults.sh runs a scenario
/// against an older build for a before/after comparison).
pub fn moe_bin() -> PathBuf {
    std::env::var_os("MOE_E2E_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_moe")))
}

/// `tests/fixtures/models/<name>`.
pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/models")
        .join(name)
}

/// Runs `moe` to completion.
pub fn moe(args: &[&str]) -> Output {
    Command::new(moe_bin())
        .args(args)
        .env("MOE_LOG", "warn")
        .output()
        .expect("runs moe")
}

/// Runs `moe` and parses its stdout as JSON, failing the test with stderr on error.
pub fn moe_json(args: &[&str]) -> serde_json::Value {
    let out = moe(args);
    assert!(
        out.status.success(),
        "moe {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON on stdout")
}

/// The golden.json of a fixture model.
pub fn golden(name: &str) -> serde_json::Value {
    let text =
        std::fs::read_to_string(fixture(name).join("golden/golden.json")).expect("golden.json");
    serde_json::from_str(&text).expect("golden.json parses")
}

/// Token ids of a JSON array.
pub fn ids(v: &serde_json::Value) -> Vec<u64> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_u64().expect("integer"))
        .collect()
}

/// A child process killed on drop.
pub struct Proc {
    pub child: Child,
    /// The address it printed (`listening on ADDR`).
    pub addr: String,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Spawns `cmd` with its stdout lines forwarded to a channel. Its stderr (warnings the test
/// often provokes on purpose: a killed node, a lost lease) goes to the test's captured output,
/// which the test harness shows only when the test fails (or with `--nocapture`).
pub fn spawn_lines(mut cmd: Command) -> (Child, mpsc::Receiver<String>) {
    let mut child = cmd
        .env("MOE_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawns moe");
    let stderr = child.stderr.take().expect("stderr");
    // A thread spawned here inherits the test's output capture.
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("{line}");
        }
    });
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    (child, rx)
}

/// Spawns `cmd` and waits (up to two minutes: model loading is the only wait) for the
/// `listening on ADDR` line it prints when it is ready.
fn spawn_announcing(cmd: Command) -> Proc {
    let (child, rx) = spawn_lines(cmd);
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let addr = loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let line = rx
            .recv_timeout(left)
            .expect("the process announces its address");
        if let Some(addr) = line.split("listening on ").nth(1) {
            break addr.trim().to_string();
        }
    };
    // Keep draining stdout so the child never blocks on a full pipe.
    std::thread::spawn(move || while rx.recv().is_ok() {});
    Proc { child, addr }
}

fn listen_args(args: &[&str]) -> &'static [&'static str] {
    if args.contains(&"--listen") {
        &[]
    } else {
        &["--listen", "127.0.0.1:0"]
    }
}

/// Starts `moe expert-node --model MODEL ARGS...` (on 127.0.0.1:0 unless ARGS has `--listen`).
pub fn expert_node(model: &Path, args: &[&str]) -> Proc {
    let mut cmd = Command::new(moe_bin());
    cmd.arg("expert-node")
        .arg("--model")
        .arg(model)
        .args(listen_args(args))
        .args(args);
    spawn_announcing(cmd)
}

/// Starts `moe serve|router ARGS...` (on 127.0.0.1:0 unless ARGS has `--listen`); the address is
/// the HTTP API's.
pub fn server(subcommand: &str, args: &[&str]) -> Proc {
    let mut cmd = Command::new(moe_bin());
    cmd.arg(subcommand).args(listen_args(args)).args(args);
    spawn_announcing(cmd)
}

/// Writes a placement file `{"version", "nodes": [{"id": "node-i", "experts": SPEC}]}`.
pub fn placement_file(dir: &Path, version: u64, specs: &[&str]) -> PathBuf {
    let nodes: Vec<serde_json::Value> = specs
        .iter()
        .enumerate()
        .map(|(i, s)| serde_json::json!({"id": format!("node-{i}"), "experts": s}))
        .collect();
    let path = dir.join("placement.json");
    std::fs::write(
        &path,
        serde_json::json!({"version": version, "nodes": nodes}).to_string(),
    )
    .expect("write");
    path
}

/// The `/metrics` page of the process serving HTTP at `addr`.
pub async fn metrics_text(c: &reqwest::Client, addr: &str) -> String {
    c.get(format!("http://{addr}/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics text")
}

/// `moe logits --model model` of `prompts` (token-id lists) with `extra` arguments (e.g.
/// `--experts-at`), files under `dir`; the logits by tensor name.
pub fn moe_logits(
    model: &Path,
    prompts: &[Vec<u64>],
    dir: &Path,
    extra: &[&str],
) -> HashMap<String, Vec<f32>> {
    let prompts_file = dir.join("prompts.json");
    std::fs::write(
        &prompts_file,
        serde_json::json!({ "prompts": prompts }).to_string(),
    )
    .expect("write");
    let out_file = dir.join(format!("logits-{}.safetensors", extra.len()));
    let mut args = vec![
        "logits",
        "--model",
        model.to_str().expect("utf8"),
        "--prompts",
        prompts_file.to_str().expect("utf8"),
        "--out",
        out_file.to_str().expect("utf8"),
    ];
    args.extend_from_slice(extra);
    let out = moe(&args);
    assert!(
        out.status.success(),
        "moe logits failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    f32_tensors(&out_file, |_| true)
}

/// `log softmax` of a logits row, in float64.
pub fn log_softmax(row: &[f32]) -> Vec<f64> {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = max
        + row
            .iter()
            .map(|&v| (v as f64 - max).exp())
            .sum::<f64>()
            .ln();
    row.iter().map(|&v| v as f64 - lse).collect()
}

/// The tensors of a safetensors file whose names `keep` accepts, as f32 values.
pub fn f32_tensors(path: &Path, keep: impl Fn(&str) -> bool) -> HashMap<String, Vec<f32>> {
    let bytes = std::fs::read(path).expect("safetensors file");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
    st.tensors()
        .into_iter()
        .filter(|(n, _)| keep(n))
        .map(|(n, v)| {
            let values = v.data().chunks_exact(4);
            (
                n,
                values
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect(),
            )
        })
        .collect()
}

/// The id of a `token_id:N` token string (vLLM's `return_tokens_as_token_ids`).
pub fn token_id(token: &serde_json::Value) -> u64 {
    token
        .as_str()
        .and_then(|t| t.strip_prefix("token_id:"))
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("`{token}` is not token_id:N"))
}

/// The metrics page of the process serving HTTP at `addr`, as `name{labels}` → value.
pub async fn metric_values(c: &reqwest::Client, addr: &str) -> HashMap<String, f64> {
    metrics_text(c, addr)
        .await
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            l.rsplit_once(' ')
                .and_then(|(k, v)| Some((k.to_string(), v.parse().ok()?)))
        })
        .collect()
}

/// `http://ADDR/path` of a serving process.
pub fn url(p: &Proc, path: &str) -> String {
    format!("http://{}{path}", p.addr)
}

/// POSTs a JSON body; the status and the JSON answer.
pub async fn post(
    c: &reqwest::Client,
    url: &str,
    body: &serde_json::Value,
) -> (reqwest::StatusCode, serde_json::Value) {
    let r = c.post(url).json(body).send().await.expect("request");
    let status = r.status();
    (status, r.json().await.expect("JSON body"))
}

/// The Python with the `openai` package: `MOE_TEST_PYTHON`, else the venv `.ci/run` creates.
pub fn python_with_openai() -> PathBuf {
    let candidate = std::env::var_os("MOE_TEST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/e2e-venv/bin/python")
        });
    let ok = Command::new(&candidate)
        .args(["-c", "import openai"])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ok,
        "{} cannot import openai: run .ci/run (it creates target/e2e-venv with `pip install openai`) or set MOE_TEST_PYTHON",
        candidate.display()
    );
    candidate
}

/// Runs `tests/e2e/openai_client.py` (the official `openai` package) against the server at
/// `addr` with `golden` (a golden.json), and with `concurrent` golden completions at once when
/// given; fails the test unless the script passes, and returns what it printed.
pub fn openai_client(addr: &str, golden: &Path, concurrent: Option<usize>) -> String {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/e2e/openai_client.py");
    let mut cmd = Command::new(python_with_openai());
    cmd.arg(script).arg(format!("http://{addr}")).arg(golden);
    if let Some(n) = concurrent {
        cmd.arg(n.to_string());
    }
    let out = cmd.output().expect("runs python");
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A process whose stdout lines go to a channel and whose whole stderr is kept (tests that
/// check what a process logged).
pub struct Logged {
    pub proc: Proc,
    pub lines: mpsc::Receiver<String>,
    pub log: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Logged {
    /// The stderr so far.
    pub fn log(&self) -> String {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// Waits (up to `within`) for the stderr to contain `needle`; false if it never does.
    pub fn wait_log(&self, needle: &str, within: Duration) -> bool {
        let deadline = std::time::Instant::now() + within;
        while std::time::Instant::now() < deadline {
            if self.log().contains(needle) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }
}

/// Spawns `cmd` keeping its stderr, and waits (up to two minutes) for `listening on ADDR`.
pub fn spawn_logged(mut cmd: Command) -> Logged {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawns moe");
    let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let sink = log.clone();
    let stderr = child.stderr.take().expect("stderr");
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("{line}");
            if let Ok(mut l) = sink.lock() {
                l.push_str(&line);
                l.push('\n');
            }
        }
    });
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let addr = loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let line = rx.recv_timeout(left).unwrap_or_else(|_| {
            panic!(
                "the process announces its address; its log:\n{}",
                log.lock().map(|l| l.clone()).unwrap_or_default()
            )
        });
        if let Some(addr) = line.split("listening on ").nth(1) {
            break addr.trim().to_string();
        }
    };
    Logged {
        proc: Proc { child, addr },
        lines: rx,
        log,
    }
}

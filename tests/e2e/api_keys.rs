//! API keys end to end: a `moe serve` process with keys from a flag and from a key file, driven
//! by a real HTTP client and by the official `openai` Python package. Missing and wrong keys get
//! 401 with an OpenAI-style body, probes stay open, a rotated key file takes effect without a
//! restart, requests are counted per key id on `/metrics`, and no key reaches the logs.

pub mod harness;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use harness::*;
use reqwest::StatusCode;
use serde_json::{Value, json};

const MODEL: &str = "tiny-dsv3-bf16";
const FLAG_KEY: &str = "sk-flag-0123456789abcdef";
const FILE_KEY_1: &str = "sk-file-one-fedcba9876543210";
const FILE_KEY_2: &str = "sk-file-two-a1b2c3d4e5f60718";

/// `moe serve` at debug log level, with its whole stderr kept to search for keys afterwards.
struct Server {
    proc: Proc,
    log: Arc<Mutex<String>>,
}

fn start(key_file: &std::path::Path) -> Server {
    let mut cmd = Command::new(moe_bin());
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--model"])
        .arg(fixture(MODEL))
        .args(["--api-key", FLAG_KEY, "--api-key-file"])
        .arg(key_file)
        .arg("--metrics-require-key")
        .env("MOE_LOG", "debug")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawns moe");
    let log = Arc::new(Mutex::new(String::new()));
    let sink = log.clone();
    let stderr = child.stderr.take().expect("stderr");
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let mut l = sink.lock().expect("log");
            l.push_str(&line);
            l.push('\n');
        }
    });
    let mut stdout = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let addr = loop {
        let line = stdout
            .next()
            .expect("the server announces its address")
            .expect("line");
        if let Some(a) = line.split("listening on ").nth(1) {
            break a.trim().to_string();
        }
    };
    std::thread::spawn(move || for _ in stdout {});
    Server {
        proc: Proc { child, addr },
        log,
    }
}

async fn completion(c: &reqwest::Client, s: &Server, key: Option<&str>) -> (StatusCode, Value) {
    let golden = golden(MODEL);
    let body = json!({
        "prompt": ids(&golden["prompts"][0]["ids"]),
        "max_tokens": 8,
        "temperature": 0,
        "ignore_eos": true,
        "return_tokens_as_token_ids": true,
        "logprobs": 1,
    });
    let mut req = c
        .post(format!("http://{}/v1/completions", s.proc.addr))
        .json(&body);
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    let r = req.send().await.expect("request");
    let status = r.status();
    (status, r.json().await.expect("JSON body"))
}

fn expect_401(status: StatusCode, body: &Value, what: &str) {
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{what}: {body}");
    assert_eq!(
        body["error"]["type"], "invalid_request_error",
        "{what}: {body}"
    );
    assert_eq!(body["error"]["code"], "invalid_api_key", "{what}: {body}");
}

/// The golden greedy continuation of prompt 0, from a completion answer.
fn check_golden(body: &Value) {
    let golden = golden(MODEL);
    let want: Vec<u64> = ids(&golden["results"][0]["generated_ids"])[..8].to_vec();
    let got: Vec<u64> = body["choices"][0]["logprobs"]["tokens"]
        .as_array()
        .expect("tokens")
        .iter()
        .map(token_id)
        .collect();
    assert_eq!(got, want, "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn keys_guard_the_api_rotate_without_a_restart_and_never_reach_the_logs() {
    let dir = tempfile::tempdir().expect("tmp");
    let key_file = dir.path().join("keys");
    std::fs::write(
        &key_file,
        format!("# rotated by the operator\n{FILE_KEY_1}\n"),
    )
    .expect("keys");
    let s = start(&key_file);
    let c = reqwest::Client::new();

    // Missing, wrong and malformed keys: 401 with an OpenAI-style body.
    let (st, b) = completion(&c, &s, None).await;
    expect_401(st, &b, "no key");
    let (st, b) = completion(&c, &s, Some("sk-wrong")).await;
    expect_401(st, &b, "wrong key");
    let r = c
        .get(format!("http://{}/v1/models", s.proc.addr))
        .header("authorization", format!("Basic {FLAG_KEY}"))
        .send()
        .await
        .expect("models");
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    // Both configured keys work, with the golden answer.
    for key in [FLAG_KEY, FILE_KEY_1] {
        let (st, b) = completion(&c, &s, Some(key)).await;
        assert_eq!(st, StatusCode::OK, "{b}");
        check_golden(&b);
    }
    // Probes stay open; /metrics needs a key here (--metrics-require-key).
    for path in ["/health", "/ready"] {
        let r = c
            .get(format!("http://{}{path}", s.proc.addr))
            .send()
            .await
            .expect("probe");
        assert_eq!(r.status(), StatusCode::OK, "{path}");
    }
    let r = c
        .get(format!("http://{}/metrics", s.proc.addr))
        .send()
        .await
        .expect("metrics");
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);

    // Rotate the file: the new key works within a few reload periods, the old one is refused.
    std::fs::write(&key_file, format!("{FILE_KEY_2}\n")).expect("rotate");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (st, b) = completion(&c, &s, Some(FILE_KEY_2)).await;
        if st == StatusCode::OK {
            check_golden(&b);
            break;
        }
        expect_401(st, &b, "the new key before the reload");
        assert!(
            Instant::now() < deadline,
            "the rotated key file was never applied"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (st, b) = completion(&c, &s, Some(FILE_KEY_1)).await;
    expect_401(st, &b, "the removed key");

    // The official client: wrong key → AuthenticationError, right key → an answer.
    let python = python_with_openai();
    let script = r#"
import sys, openai
base, good = sys.argv[1], sys.argv[2]
try:
    openai.OpenAI(base_url=base, api_key="sk-nope").models.list()
    sys.exit("a wrong key was accepted")
except openai.AuthenticationError as e:
    assert e.status_code == 401, e
client = openai.OpenAI(base_url=base, api_key=good)
model = client.models.list().data[0].id
r = client.completions.create(model=model, prompt="Hello", max_tokens=4, temperature=0)
assert r.usage.completion_tokens == 4, r
print("openai: 401 for a wrong key, 200 for a right one")
"#;
    let out = Command::new(python)
        .args(["-c", script])
        .arg(format!("http://{}/v1", s.proc.addr))
        .arg(FLAG_KEY)
        .output()
        .expect("runs python");
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // Per-key counts under a hash prefix; failures by reason; no key text anywhere.
    let page = c
        .get(format!("http://{}/metrics", s.proc.addr))
        .bearer_auth(FLAG_KEY)
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    let count = |name: &str| -> f64 {
        page.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit_once(' '))
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(0.0)
    };
    let id = |key: &str| {
        use sha2::Digest;
        let d = sha2::Sha256::digest(key.as_bytes());
        d[..4]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    };
    let flag_requests = count(&format!(
        "moe_api_key_requests_total{{key=\"{}\"}}",
        id(FLAG_KEY)
    ));
    // One completion, the client's models + completion, this page.
    assert!(flag_requests >= 4.0, "{page}");
    assert!(
        count(&format!(
            "moe_api_key_requests_total{{key=\"{}\"}}",
            id(FILE_KEY_2)
        )) >= 1.0
    );
    assert!(
        count("moe_api_auth_failures_total{reason=\"missing\"}") >= 2.0,
        "{page}"
    );
    assert!(
        count("moe_api_auth_failures_total{reason=\"invalid\"}") >= 2.0,
        "{page}"
    );
    assert!(
        count("moe_api_auth_failures_total{reason=\"malformed\"}") >= 1.0,
        "{page}"
    );
    assert!(count("moe_api_key_reloads_total") >= 1.0, "{page}");
    drop(s.proc);
    let log = s.log.lock().expect("log").clone();
    assert!(log.contains("API keys reloaded"), "the reload is logged");
    for key in [FLAG_KEY, FILE_KEY_1, FILE_KEY_2, "sk-wrong", "sk-nope"] {
        assert!(!page.contains(key), "{key} on /metrics");
        assert!(!log.contains(key), "{key} in the debug log");
    }
}

#[test]
fn a_key_file_without_keys_stops_the_server_with_a_clear_error() {
    let dir = tempfile::tempdir().expect("tmp");
    let key_file = dir.path().join("keys");
    std::fs::write(&key_file, "# no keys yet\n").expect("keys");
    let out = moe(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--model",
        fixture(MODEL).to_str().expect("utf8"),
        "--api-key-file",
        key_file.to_str().expect("utf8"),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no API key in"), "{err}");
}

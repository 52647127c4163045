//! DeepSeek-V4 over the cluster's data plane: two real `moe expert-node` processes on 127.0.0.1
//! serve the routed experts of `tiny-dsv4` (clamped SwiGLU, loaded per (layer, expert) in the
//! V4 spelling), and the V4 backbone in this process dispatches to them over the unchanged wire
//! (f32). The logits of every golden prompt match the reference within 1e-3 and the 24-token
//! greedy continuation of the chat prompt is the golden one; `moe logits` and `moe generate`
//! give the golden logits and greedy ids in-process and against the nodes; `moe serve` and a
//! `moe router` over expert-node processes (f32 wire) serve the golden continuations to the
//! official `openai` client, alone and to 16 concurrent requests.

pub mod harness;

use std::time::Duration;

use harness::*;
use moe_meta::Placement;
use moe_model::model::LogitsMode;
use moe_model::sampling::argmax;
use moe_model::v4::{V4Backbone, V4SeqInput, model::open};
use moe_proto::pb::Dtype;
use moe_router::{DispatchOptions, RemoteExperts};
use safetensors::SafeTensors;

const MODEL: &str = "tiny-dsv4";

#[test]
fn v4_experts_on_separate_nodes_reproduce_the_golden_logits() {
    let model = fixture(MODEL);
    let dir = tempfile::tempdir().expect("tmp");
    let file = placement_file(dir.path(), 3, &["0-4:0-191", "0-4:192-383"]);
    let (_nodes, addrs) = two_nodes(&file);

    let (cfg, ckpt) = open(&model).expect("open");
    let backbone = V4Backbone::load(&cfg, &ckpt).expect("backbone");
    let placement =
        Placement::from_file(&file, &cfg.moe_layers(), cfg.n_routed_experts).expect("placement");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let opts = DispatchOptions {
        wire: Dtype::F32,
        timeout: Duration::from_secs(20),
        ..Default::default()
    };
    let experts = RemoteExperts::new(placement, addrs, cfg.hidden_size, opts, rt.handle().clone());
    rt.block_on(experts.ready(Duration::from_secs(20), Some(&cfg.fingerprint())))
        .expect("nodes ready");

    let g = golden(MODEL);
    let bytes = std::fs::read(model.join("golden/golden_logits.safetensors")).expect("golden");
    let st = SafeTensors::deserialize(&bytes).expect("safetensors");
    let mut worst = 0.0f32;
    for (i, p) in g["prompts"].as_array().expect("prompts").iter().enumerate() {
        let prompt: Vec<u32> = ids(&p["ids"]).into_iter().map(|x| x as u32).collect();
        let ours = backbone
            .forward_full(&prompt, &experts, None)
            .expect("forward over the cluster");
        let want: Vec<f32> = st
            .tensor(&format!("prompt_{i}"))
            .expect("golden prompt")
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        assert_eq!(ours.data.len(), want.len());
        let d = ours
            .data
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(d <= 1e-3, "prompt_{i}: logits differ by {d}");
        worst = worst.max(d);
    }
    eprintln!("tiny-dsv4 over two expert nodes: worst logit |diff| {worst}");

    // Greedy decoding through the cache, every step dispatched to the nodes.
    let i = 2;
    let prompt: Vec<u32> = ids(&g["prompts"][i]["ids"])
        .into_iter()
        .map(|x| x as u32)
        .collect();
    let want: Vec<u32> = ids(&g["results"][i]["generated_ids"])
        .into_iter()
        .map(|x| x as u32)
        .collect();
    let mut cache = backbone.new_cache();
    let mut next = prompt;
    let mut got = Vec::new();
    for _ in 0..want.len() {
        let mut seqs = [V4SeqInput {
            tokens: &next,
            cache: &mut cache,
        }];
        let logits = backbone
            .forward(&mut seqs, &experts, LogitsMode::Last, None)
            .expect("decode step")
            .remove(0);
        let tok = argmax(logits.row(0));
        got.push(tok);
        next = vec![tok];
    }
    assert_eq!(got, want);
}

/// `moe logits` of every golden prompt with `extra` arguments, against the golden logits.
fn moe_logits_diff(dir: &std::path::Path, extra: &[&str]) -> f32 {
    let g = golden(MODEL);
    let prompts: Vec<Vec<u64>> = g["prompts"]
        .as_array()
        .expect("prompts")
        .iter()
        .map(|p| ids(&p["ids"]))
        .collect();
    let model = fixture(MODEL);
    let ours = moe_logits(&model, &prompts, dir, extra);
    let want = f32_tensors(&model.join("golden/golden_logits.safetensors"), |_| true);
    assert_eq!(ours.len(), want.len());
    want.iter()
        .map(|(name, w)| {
            let o = &ours[name];
            assert_eq!(o.len(), w.len(), "{name}");
            o.iter()
                .zip(w)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f32::max)
        })
        .fold(0.0, f32::max)
}

#[test]
fn moe_logits_and_generate_run_v4_locally_and_against_expert_nodes() {
    let dir = tempfile::tempdir().expect("tmp");
    let local = moe_logits_diff(dir.path(), &[]);
    assert!(local <= 1e-3, "local: {local}");
    let file = placement_file(dir.path(), 1, &["0-4:0-99", "0-4:100-383"]);
    let f = file.to_str().expect("utf8");
    let model = fixture(MODEL);
    let (_nodes, addrs) = two_nodes(&file);
    let addrs = addrs.join(",");
    // With the placement file, and discovered from the nodes (Info).
    for extra in [
        vec!["--experts-at", &addrs, "--wire", "f32", "--placement", f],
        vec!["--experts-at", &addrs, "--wire", "f32"],
    ] {
        let d = moe_logits_diff(dir.path(), &extra);
        assert!(d <= 1e-3, "{extra:?}: {d}");
    }
    // `moe generate`: the golden 24-token greedy continuation, in-process and over the nodes.
    let g = golden(MODEL);
    for i in [1, 2] {
        let prompt: Vec<String> = ids(&g["prompts"][i]["ids"])
            .iter()
            .map(u64::to_string)
            .collect();
        let want = ids(&g["results"][i]["generated_ids"]);
        let prompt = prompt.join(",");
        for extra in [vec![], vec!["--experts-at", &addrs, "--wire", "f32"]] {
            let model_dir = model.to_str().expect("utf8");
            let mut args = vec![
                "generate",
                "--model",
                model_dir,
                "--prompt-ids",
                &prompt,
                "--max-tokens",
                "24",
                "--ignore-eos",
                "--json",
            ];
            args.extend_from_slice(&extra);
            let out = moe(&args);
            assert!(
                out.status.success(),
                "moe generate failed:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let v: serde_json::Value =
                serde_json::from_slice(&out.stdout).expect("generate --json output");
            assert_eq!(ids(&v["output_ids"]), want, "prompt_{i} {extra:?}");
        }
    }
    eprintln!("moe logits on tiny-dsv4: local {local}");
}

/// The official `openai` client against `server` (the golden script, then 16 concurrent golden
/// completions).
fn openai_client_passes(server: &Proc, what: &str) {
    let out = openai_client(
        &server.addr,
        &fixture(MODEL).join("golden/golden.json"),
        Some(16),
    );
    eprintln!("{what}: {out}");
}

/// Two `moe expert-node` processes serving the placement `file` as node-0 and node-1, and
/// their addresses.
fn two_nodes(file: &std::path::Path) -> (Vec<Proc>, Vec<String>) {
    let f = file.to_str().expect("utf8");
    let nodes: Vec<Proc> = (0..2)
        .map(|i| {
            expert_node(
                &fixture(MODEL),
                &["--placement", f, "--node-id", &format!("node-{i}")],
            )
        })
        .collect();
    let addrs = nodes.iter().map(|n| n.addr.clone()).collect();
    (nodes, addrs)
}

#[test]
fn moe_serve_and_a_router_over_expert_nodes_serve_v4_to_the_openai_client() {
    let model = fixture(MODEL);
    let m = model.to_str().expect("utf8");
    let serve = server("serve", &["--model", m]);
    openai_client_passes(&serve, "moe serve");
    drop(serve);

    let dir = tempfile::tempdir().expect("tmp");
    let file = placement_file(dir.path(), 1, &["0-4:0-191", "0-4:192-383"]);
    let f = file.to_str().expect("utf8");
    let (_nodes, addrs) = two_nodes(&file);
    let addrs = addrs.join(",");
    let router = server(
        "router",
        &[
            "--model",
            m,
            "--experts-at",
            &addrs,
            "--wire",
            "f32",
            "--placement",
            f,
        ],
    );
    openai_client_passes(&router, "moe router over two expert nodes");
}

#[test]
fn a_bf16_cache_for_v4_is_refused_with_a_clear_error() {
    let model = fixture(MODEL);
    let out = moe(&[
        "serve",
        "--model",
        model.to_str().expect("utf8"),
        "--kv-cache-dtype",
        "bf16",
        "--listen",
        "127.0.0.1:0",
    ]);
    assert!(!out.status.success(), "a bf16 V4 cache was accepted");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("kept in f32"), "{err}");
}

#[test]
fn moe_up_places_v4_experts_through_its_coordinator_and_serves_them() {
    let model = fixture(MODEL);
    let mut cmd = std::process::Command::new(moe_bin());
    cmd.args(["up", "--model", model.to_str().expect("utf8")])
        .args(["--listen", "127.0.0.1:0", "--nodes", "3", "--wire", "f32"])
        .args(["--load-publish-ms", "200"]);
    let (child, lines) = spawn_lines(cmd);
    let mut up = Proc {
        child,
        addr: String::new(),
    };
    // `listening on ADDR`, then `ready` once a placement is active and every expert has a
    // live replica (the coordinator placed 5 layers × 384 experts over the 3 nodes).
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let line = lines.recv_timeout(left).expect("moe up announces itself");
        if let Some(addr) = line.split("listening on ").nth(1) {
            up.addr = addr.trim().to_string();
        }
        if line.starts_with("ready") {
            break;
        }
    }
    std::thread::spawn(move || while lines.recv().is_ok() {});
    openai_client_passes(&up, "moe up (f32 wire)");
    // The load statistics the balancer reads cover V4's hash layers (0-2) and score layers.
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let c = reqwest::Client::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let want: Vec<String> = (0..5)
        .map(|l| format!("moe_expert_load_balancedness{{layer=\"{l}\"}}"))
        .collect();
    loop {
        let m = rt.block_on(metrics_text(&c, &up.addr));
        if want.iter().all(|w| m.contains(w.as_str())) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no load statistics for every V4 layer:\n{m}"
        );
        std::thread::sleep(Duration::from_millis(100)); // polling a condition, bounded above
    }
}

//! DeepSeek-V4 against V3 in one run: the `bench-v4` preset (hidden 1024, 8 layers — 2 sliding,
//! then CSA/HCA alternating —, 256 experts of width 160 top-6, 3 hash layers, bf16), the same
//! preset quantised to FP8 dense + FP4 experts, and V3's `bench` preset (hidden 1024, 6 layers,
//! 256 experts of width 256 top-8, bf16). Workloads: a decode step at batch 1 and 16 (every
//! sequence with `CONTEXT` cached tokens) and a 512-token prefill. Each round runs every model
//! once, alternating, so load from other processes hits all alike; the median over rounds is
//! reported in tokens/s, with the V4/V3 ratio (median of the per-round ratios), that ratio per
//! active parameter, the parameter
//! counts, the active bytes per batch-1 token, and the load average before and after.
//!
//! Run: `cargo bench -p moe-model --bench decode_v4 --offline` (`MOE_BENCH_ROUNDS` overrides
//! the decode rounds; prefill runs a third as many).

pub mod common;

use std::path::{Path, PathBuf};
use std::time::Instant;

use moe_model::SeqCache;
use moe_model::checkpoint::Checkpoint;
use moe_model::checkpoint::select::{TensorKind, classify};
use moe_model::model::{LoadOptions, LogitsMode, Model, SeqInput};
use moe_model::presets::GenDtype;
use moe_model::v4::preset::{V4Preset, write_v4_preset};
use moe_model::v4::quantize::{QuantizeOptions, quantize_dir};
use moe_model::v4::{V4Cache, V4Model, V4SeqInput};

const CONTEXT: usize = 256;
const PREFILL: usize = 512;

fn prompt(i: usize, len: usize) -> Vec<u32> {
    (0..len)
        .map(|t| ((t * 37 + i * 101) % 500 + 4) as u32)
        .collect()
}

fn bench_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../target/moe-bench-model")
        .join(name)
}

/// `bench-v4` in bf16, and its FP8 + FP4 copy, generated once into `target/`.
fn v4_dirs() -> (PathBuf, PathBuf) {
    let bf16 = bench_dir("bench-v4-seed0");
    if !bf16.join(".complete").exists() {
        eprintln!("generating bench-v4 into {} ...", bf16.display());
        write_v4_preset(V4Preset::Bench, &bf16, 0, GenDtype::Bf16).expect("bench-v4");
        std::fs::write(bf16.join(".complete"), b"").expect("marker");
    }
    let q = bench_dir("bench-v4-seed0-fp8fp4");
    if !q.join(".complete").exists() {
        eprintln!("quantising bench-v4 into {} ...", q.display());
        quantize_dir(&bf16, &q, QuantizeOptions::default()).expect("quantize");
        std::fs::write(q.join(".complete"), b"").expect("marker");
    }
    (bf16, q)
}

/// Parameters, active parameters and active stored bytes of one batch-1 token: routed experts
/// count `top_k / experts` of theirs, the embedding one row; scale tensors count as bytes only.
fn sizes(dir: &Path, experts: usize, top_k: usize, vocab: usize) -> (f64, f64, f64) {
    let ckpt = Checkpoint::open(dir, None).expect("open");
    let (mut params, mut active, mut bytes) = (0.0, 0.0, 0.0);
    for name in ckpt.names() {
        let shape = ckpt.shape(name).expect("shape");
        let stored = ckpt.stored_bytes(name) as f64;
        let scale = name.ends_with(".scale") || name.ends_with("_scale_inv");
        let mut n: f64 = shape.iter().product::<usize>() as f64;
        if ckpt.dtype(name) == Some(safetensors::Dtype::I8) {
            n *= 2.0; // two FP4 values per byte
        }
        let share = match classify(name) {
            TensorKind::RoutedExpert { .. } => top_k as f64 / experts as f64,
            _ if name.contains("embed") => 1.0 / vocab as f64,
            _ => 1.0,
        };
        if !scale {
            params += n;
            active += n * share;
            // stored_bytes includes the weight's scale tensor.
            bytes += stored * share;
        }
    }
    (params, active, bytes)
}

/// Median of `v`.
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// A V3 model with its caches at `CONTEXT` tokens.
struct V3Run {
    model: Model,
    caches: Vec<SeqCache>,
}

impl V3Run {
    fn step(&mut self, batch: usize) -> f64 {
        let next: Vec<[u32; 1]> = (0..batch).map(|i| [(i * 7 + 11) as u32]).collect();
        let mut seqs: Vec<SeqInput<'_>> = next
            .iter()
            .zip(self.caches.iter_mut())
            .map(|(t, cache)| SeqInput { tokens: t, cache })
            .collect();
        let t0 = Instant::now();
        self.model
            .forward(&mut seqs, LogitsMode::Last, None)
            .expect("decode");
        let dt = t0.elapsed().as_secs_f64();
        for c in self.caches.iter_mut() {
            c.truncate(CONTEXT);
        }
        dt
    }

    fn prefill(&self, p: &[u32]) -> f64 {
        let mut cache = self.model.new_cache();
        let t0 = Instant::now();
        self.model
            .forward(
                &mut [SeqInput {
                    tokens: p,
                    cache: &mut cache,
                }],
                LogitsMode::Last,
                None,
            )
            .expect("prefill");
        t0.elapsed().as_secs_f64()
    }
}

/// A V4 model with its caches at `CONTEXT` tokens (each step runs on a copy).
struct V4Run {
    model: V4Model,
    caches: Vec<V4Cache>,
}

impl V4Run {
    fn step(&mut self, batch: usize) -> f64 {
        let next: Vec<[u32; 1]> = (0..batch).map(|i| [(i * 7 + 11) as u32]).collect();
        let mut caches = self.caches[..batch].to_vec();
        let mut seqs: Vec<V4SeqInput<'_>> = next
            .iter()
            .zip(caches.iter_mut())
            .map(|(t, cache)| V4SeqInput { tokens: t, cache })
            .collect();
        let t0 = Instant::now();
        self.model
            .forward(&mut seqs, LogitsMode::Last, None)
            .expect("decode");
        t0.elapsed().as_secs_f64()
    }

    fn prefill(&self, p: &[u32]) -> f64 {
        let mut cache = self.model.new_cache();
        let t0 = Instant::now();
        self.model
            .forward(
                &mut [V4SeqInput {
                    tokens: p,
                    cache: &mut cache,
                }],
                LogitsMode::Last,
                None,
            )
            .expect("prefill");
        t0.elapsed().as_secs_f64()
    }
}

const BATCH: usize = 16;

fn v3_run() -> V3Run {
    let model = Model::load(&common::bench_model_dir(), &LoadOptions::default()).expect("bench");
    let prompts: Vec<Vec<u32>> = (0..BATCH).map(|i| prompt(i, CONTEXT)).collect();
    let mut caches: Vec<SeqCache> = prompts.iter().map(|_| model.new_cache()).collect();
    let mut seqs: Vec<SeqInput<'_>> = prompts
        .iter()
        .zip(caches.iter_mut())
        .map(|(p, cache)| SeqInput { tokens: p, cache })
        .collect();
    model
        .forward(&mut seqs, LogitsMode::Last, None)
        .expect("context");
    V3Run { model, caches }
}

fn v4_run(dir: &Path) -> V4Run {
    let model = V4Model::load(dir).expect("bench-v4");
    let prompts: Vec<Vec<u32>> = (0..BATCH).map(|i| prompt(i, CONTEXT)).collect();
    let mut caches: Vec<V4Cache> = prompts.iter().map(|_| model.new_cache()).collect();
    let mut seqs: Vec<V4SeqInput<'_>> = prompts
        .iter()
        .zip(caches.iter_mut())
        .map(|(p, cache)| V4SeqInput { tokens: p, cache })
        .collect();
    model
        .forward(&mut seqs, LogitsMode::Last, None)
        .expect("context");
    V4Run { model, caches }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo bench -- --list` and test discovery
    }
    let rounds: usize = std::env::var("MOE_BENCH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(15);
    let (v4_dir, q_dir) = v4_dirs();
    let v3_dir = common::bench_model_dir();
    let mut v3 = v3_run();
    let mut v4 = v4_run(&v4_dir);
    let mut q = v4_run(&q_dir);
    let c3 = v3.model.config().clone();
    let (e3, k3) = {
        let m = c3.moe().expect("moe");
        (m.n_routed_experts, m.num_experts_per_tok)
    };
    let c4 = v4.model.config().clone();
    let s3 = sizes(&v3_dir, e3, k3, c3.vocab_size);
    let s4 = sizes(
        &v4_dir,
        c4.n_routed_experts,
        c4.num_experts_per_tok,
        c4.vocab_size,
    );
    let sq = sizes(
        &q_dir,
        c4.n_routed_experts,
        c4.num_experts_per_tok,
        c4.vocab_size,
    );
    let names = [
        "v3 bench (bf16)",
        "v4 bench-v4 (bf16)",
        "v4 bench-v4 (fp8+fp4)",
    ];
    for (name, (p, a, b)) in names.iter().zip([s3, s4, sq]) {
        println!(
            "{name:24} params {:.3} B, active per token {:.1} M, active bytes per token {:.1} MB",
            p / 1e9,
            a / 1e6,
            b / 1e6
        );
    }
    println!(
        "routed experts in memory: v4 bf16 {:.0} MB, v4 fp4 {:.0} MB",
        v4.model.experts.store.bytes() as f64 / 1e6,
        q.model.experts.store.bytes() as f64 / 1e6
    );
    println!(
        "rayon threads {}, load average before: {}",
        rayon::current_num_threads(),
        loadavg()
    );
    let p = prompt(3, PREFILL);
    let workloads: [(&str, usize, usize); 3] = [
        ("decode batch 1", 1, rounds),
        ("decode batch 16", BATCH, rounds),
        ("prefill 512", PREFILL, rounds.div_ceil(3)),
    ];
    for (label, tokens, n) in workloads {
        let run = |m: usize, v3: &mut V3Run, v4: &mut V4Run, q: &mut V4Run| -> f64 {
            match (label.starts_with("prefill"), m) {
                (true, 0) => v3.prefill(&p),
                (true, 1) => v4.prefill(&p),
                (true, _) => q.prefill(&p),
                (false, 0) => v3.step(tokens),
                (false, 1) => v4.step(tokens),
                (false, _) => q.step(tokens),
            }
        };
        for m in 0..3 {
            run(m, &mut v3, &mut v4, &mut q); // warm-up
        }
        let mut times = [Vec::new(), Vec::new(), Vec::new()];
        let mut ratios = [Vec::new(), Vec::new()];
        for r in 0..n {
            // Alternate the order too, so no model always runs right after another.
            let order: [usize; 3] = if r % 2 == 0 { [0, 1, 2] } else { [2, 1, 0] };
            let mut t = [0.0; 3];
            for m in order {
                t[m] = run(m, &mut v3, &mut v4, &mut q);
            }
            ratios[0].push(t[0] / t[1]);
            ratios[1].push(t[0] / t[2]);
            for m in 0..3 {
                times[m].push(t[m]);
            }
        }
        let tps: Vec<f64> = times
            .iter()
            .map(|t| tokens as f64 / median(t.clone()))
            .collect();
        // Throughput per active parameter, relative to V3's: the median round ratio times the
        // active-parameter ratio.
        let per_active = |i: usize, s: (f64, f64, f64)| median(ratios[i - 1].clone()) * s.1 / s3.1;
        println!(
            "{label:16} tok/s: v3 {:9.1} | v4 bf16 {:9.1} (x{:.2} of v3, x{:.2} per active \
             param) | v4 fp8+fp4 {:9.1} (x{:.2}, x{:.2} per active param) [{n} rounds]",
            tps[0],
            tps[1],
            median(ratios[0].clone()),
            per_active(1, s4),
            tps[2],
            median(ratios[1].clone()),
            per_active(2, sq),
        );
    }
    println!("load average after: {}", loadavg());
}

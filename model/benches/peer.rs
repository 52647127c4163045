//! The engine's side of `bench/llama_cpp.sh`: one case per run, timed with a wall clock, printed
//! as one `RESULT` line the script pairs with llama.cpp's figure for the same case.
//!
//! `cargo bench -p moe-model --bench peer -- CASE [REPS]` on the model in `MOE_BENCH_MODEL`
//! (default: the bench preset, generated once into `target/`), every thread of the process's
//! rayon pool (set `RAYON_NUM_THREADS` to match llama.cpp's `-t`). Cases, each the median of
//! REPS (default 3) repetitions after one warm-up:
//! - `pp512`: a 512-token prompt in one pass (llama-bench `-p 512 -n 0`), prompt tokens/s;
//! - `tg_b1_dD`: 128 decode steps of one sequence after a D-token prompt (llama-bench
//!   `-p 0 -n 128 -d D`; D = 0 starts from a one-token prompt), generated tokens/s;
//! - `tg_bB`: B sequences with 32-token prompts decoding 128 steps together
//!   (llama-batched-bench `-npp 32 -ntg 128 -npl B`, its `S_TG`), generated tokens/s;
//! - `limits`: the machine's read bandwidth (a parallel streaming sum over 1 GiB, GB/s) and its
//!   bf16 GEMM figure (the packed AVX-512 kernel, 512×4096 by 4096×4096, GFLOP/s), best of REPS.

pub mod common;

use std::time::Instant;

use moe_model::SeqCache;
use moe_model::checkpoint::WeightData;
use moe_model::kernels::Linear;
use moe_model::model::{LoadOptions, LogitsMode, Model, SeqInput};
use rayon::prelude::*;

const TG_TOKENS: usize = 128;

fn token(i: usize, t: usize) -> u32 {
    ((t * 37 + i * 101) % 500 + 4) as u32
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Prefills `batch` prompts of `depth` tokens (at least one), then returns the seconds `steps`
/// batched decode steps take.
fn decode(model: &Model, batch: usize, depth: usize, steps: usize) -> f64 {
    let depth = depth.max(1);
    let prompts: Vec<Vec<u32>> = (0..batch)
        .map(|i| (0..depth).map(|t| token(i, t)).collect())
        .collect();
    let mut caches: Vec<SeqCache> = prompts.iter().map(|_| model.new_cache()).collect();
    for (p, cache) in prompts.iter().zip(caches.iter_mut()) {
        for chunk in p.chunks(512) {
            let mut s = [SeqInput {
                tokens: chunk,
                cache,
            }];
            model
                .forward(&mut s, LogitsMode::Last, None)
                .expect("prefill");
        }
    }
    let start = Instant::now();
    for step in 0..steps {
        let next: Vec<[u32; 1]> = (0..batch).map(|i| [token(i, depth + step)]).collect();
        let mut seqs: Vec<SeqInput<'_>> = next
            .iter()
            .zip(caches.iter_mut())
            .map(|(t, cache)| SeqInput { tokens: t, cache })
            .collect();
        model
            .forward(&mut seqs, LogitsMode::Last, None)
            .expect("decode");
    }
    start.elapsed().as_secs_f64()
}

fn prefill(model: &Model, len: usize) -> f64 {
    let p: Vec<u32> = (0..len).map(|t| token(0, t)).collect();
    let mut cache = model.new_cache();
    let start = Instant::now();
    model
        .forward(
            &mut [SeqInput {
                tokens: &p,
                cache: &mut cache,
            }],
            LogitsMode::Last,
            None,
        )
        .expect("prefill");
    start.elapsed().as_secs_f64()
}

/// Sums a buffer on every thread, 64 lanes per thread, to measure read bandwidth.
fn stream_sum(buf: &[f32]) -> f32 {
    buf.par_chunks(1 << 20)
        .map(|c| {
            let mut acc = [0.0f32; 64];
            for v in c.chunks_exact(64) {
                for i in 0..64 {
                    acc[i] += v[i];
                }
            }
            acc.iter().sum::<f32>()
        })
        .sum()
}

fn limits(reps: usize) {
    let buf = vec![1.0f32; 1 << 28];
    let mut best = f64::MAX;
    for _ in 0..reps.max(2) {
        let t = Instant::now();
        std::hint::black_box(stream_sum(std::hint::black_box(&buf)));
        best = best.min(t.elapsed().as_secs_f64());
    }
    drop(buf);
    println!(
        "RESULT case=read_bandwidth value={:.2} unit=GB/s",
        (1u64 << 30) as f64 / best / 1e9
    );
    let (m, n, k) = (512usize, 4096usize, 4096usize);
    let w: Vec<u16> = (0..n * k)
        .map(|i| half::bf16::from_f32(((i * 2654435761 % 1000) as f32 - 500.0) * 1e-4).to_bits())
        .collect();
    let lin = Linear::new(WeightData::Bf16(w), n, k);
    let x: Vec<f32> = (0..m * k)
        .map(|i| ((i % 97) as f32 - 48.0) * 1e-2)
        .collect();
    let mut y = vec![0.0f32; m * n];
    let mut best = f64::MAX;
    for _ in 0..reps.max(2) + 1 {
        let t = Instant::now();
        lin.forward_into(&x, m, &mut y);
        best = best.min(t.elapsed().as_secs_f64());
    }
    std::hint::black_box(&y);
    println!(
        "RESULT case=bf16_gemm value={:.1} unit=GFLOP/s",
        2.0 * (m * n * k) as f64 / best / 1e9
    );
}

fn main() {
    // `cargo bench` passes `--bench`; the case and the repetitions are the other arguments.
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let case = args.first().map(String::as_str).unwrap_or("limits");
    let reps: usize = args.get(1).and_then(|r| r.parse().ok()).unwrap_or(3);
    if case == "limits" {
        limits(reps);
        return;
    }
    let model =
        Model::load(&common::bench_model_dir(), &LoadOptions::default()).expect("bench model");
    let run = |warm: bool| -> f64 {
        if case == "pp512" {
            512.0 / prefill(&model, 512)
        } else if let Some(d) = case.strip_prefix("tg_b1_d") {
            let d: usize = d.parse().expect("depth");
            let steps = if warm { 4 } else { TG_TOKENS };
            steps as f64 / decode(&model, 1, d, steps)
        } else if let Some(b) = case.strip_prefix("tg_b") {
            let b: usize = b.parse().expect("batch");
            let steps = if warm { 4 } else { TG_TOKENS };
            (b * steps) as f64 / decode(&model, b, 32, steps)
        } else {
            panic!("unknown case {case}: pp512, tg_b1_dD, tg_bB or limits")
        }
    };
    run(true);
    let v: Vec<f64> = (0..reps).map(|_| run(false)).collect();
    println!(
        "RESULT case={case} value={:.2} unit=tok/s reps={}",
        median(v.clone()),
        v.iter()
            .map(|x| format!("{x:.1}"))
            .collect::<Vec<_>>()
            .join(",")
    );
}

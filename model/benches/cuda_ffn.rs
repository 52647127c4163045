//! GPU expert FFN at DeepSeek-V3's shape (hidden 7168, expert width 2048, bf16 weights, top-8
//! routing spread evenly over E experts), 1..4096 tokens over 8..256 experts: one dispatch as an
//! expert node runs it (copies in and out included), TFLOP/s beside one large cuBLAS bf16 GEMM
//! measured in the same run. Needs a GPU (`bench/cuda_check.sh` runs it); prints that it was
//! skipped otherwise. `MOE_CUDA_BENCH_EXPERTS=8,64` narrows the expert counts.

use std::time::Instant;

use moe_model::checkpoint::WeightData;
use moe_model::cuda::CudaExperts;
use moe_model::cuda::experts::Engine;
use moe_model::{Assignments, Matrix};

const HIDDEN: usize = 7168;
const INTER: usize = 2048;
const TOP_K: usize = 8;

fn bf16_weights(n: usize, seed: u32) -> WeightData {
    // Small values (|w| < 2^-6) from a cheap hash: the GEMM's speed does not depend on them.
    let v = (0..n as u32)
        .map(|i| {
            let h = i
                .wrapping_mul(2_654_435_761)
                .wrapping_add(seed.wrapping_mul(40_503));
            half::bf16::from_f32(((h >> 8) as f32 / (1u32 << 24) as f32 - 0.5) / 32.0).to_bits()
        })
        .collect();
    WeightData::Bf16(v)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    if !moe_model::cuda::available() {
        eprintln!("skipped: no usable CUDA device");
        return;
    }
    let engine = std::sync::Arc::new(Engine::new(0).expect("device 0"));
    let n = 8192;
    let peak = 2.0 * (n * n * n) as f64 / engine.time_bf16_gemm(n, 10).expect("gemm") / 1e12;
    println!(
        "{}: cuBLAS bf16 GEMM {n}^3: {peak:.1} TFLOP/s",
        engine.describe()
    );
    let counts: Vec<usize> = std::env::var("MOE_CUDA_BENCH_EXPERTS")
        .ok()
        .map(|s| s.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![8, 32, 256]);
    for experts in counts {
        let mut store = CudaExperts::empty(engine.clone(), HIDDEN);
        for e in 0..experts {
            let s = e as u32 * 3;
            let w = [
                bf16_weights(INTER * HIDDEN, s),
                bf16_weights(INTER * HIDDEN, s + 1),
                bf16_weights(HIDDEN * INTER, s + 2),
            ];
            store.insert(1, e, w, INTER).expect("upload");
        }
        for tokens in [1usize, 16, 128, 512, 1024, 4096] {
            let k = TOP_K.min(experts);
            let a = Assignments {
                offsets: (0..=tokens).map(|t| (t * k) as u32).collect(),
                experts: (0..tokens * k)
                    .map(|i| ((i / k * 7 + i % k) % experts) as u32)
                    .collect(),
                weights: vec![1.0 / k as f32; tokens * k],
            };
            let x = Matrix::from_vec(tokens, HIDDEN, vec![0.01; tokens * HIDDEN]);
            store.run(1, &x, &a).expect("warm-up");
            let iters = if tokens >= 1024 { 5 } else { 20 };
            let secs = median(
                (0..iters)
                    .map(|_| {
                        let t0 = Instant::now();
                        store.run(1, &x, &a).expect("run");
                        t0.elapsed().as_secs_f64()
                    })
                    .collect(),
            );
            let flops = 2.0 * 3.0 * (HIDDEN * INTER * tokens * k) as f64;
            let tf = flops / secs / 1e12;
            println!(
                "experts {experts:3} tokens {tokens:4} ({:6.1} per expert): {:8.3} ms {tf:7.1} TFLOP/s ({:4.0}% of the GEMM)",
                (tokens * k) as f64 / experts as f64,
                secs * 1e3,
                100.0 * tf / peak
            );
        }
    }
}

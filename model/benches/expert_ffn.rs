//! One routed expert's SwiGLU FFN (hidden 2048, moe_intermediate 1024, bf16 weights) over
//! {1, 8, 64, 512} tokens, with the packed AVX-512 kernel and the portable (faer) path, next to
//! float32 `faer` GEMMs of the same shapes as this machine's reference peak; the same expert with
//! FP8 weights (e4m3 bytes, 128×128 block scales, kept at one byte) and FP4 weights (e2m1
//! nibbles, a scale per 32 columns, kept at half a byte); and decode's memory-bound case, one
//! token through each of 24 experts (300 MB of bf16 weights, 150 MB of FP8, 94 MB of FP4 with its
//! float32 scales, more than the caches hold), bf16, FP8 and FP4 alternated. Throughput is reported in FLOP/s (criterion prints
//! it as elem/s: 1 elem = 1 FLOP).

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, Par};
use moe_model::checkpoint::{WeightData, fp4, fp8};
use moe_model::kernels::{KernelChoice, set_kernel_choice};
use moe_model::mlp::Mlp;

const HIDDEN: usize = 2048;
const INTER: usize = 1024;

fn bf16(n: usize, seed: usize) -> WeightData {
    WeightData::Bf16(
        (0..n)
            .map(|i| {
                half::bf16::from_f32((((i * 2654435761 + seed) % 1000) as f32 - 500.0) * 1e-4)
                    .to_bits()
            })
            .collect(),
    )
}

/// FP8 weights `[rows, cols]` of the same values range, with 128×128 block scales.
fn fp8w(rows: usize, cols: usize, seed: usize) -> WeightData {
    let values = (0..rows * cols)
        .map(|i| ((i * 2654435761 + seed) % 251) as u8)
        .map(|b| if fp8::is_nan(b) { 0x38 } else { b })
        .collect();
    let scales = (0..fp8::blocks(rows, 128) * fp8::blocks(cols, 128))
        .map(|i| 1e-4 * (1 + (i + seed) % 7) as f32)
        .collect();
    WeightData::Fp8 {
        values,
        scales,
        block: [128, 128],
    }
}

/// FP4 weights `[rows, cols]` (every nibble), with power-of-two scales per 32 columns.
fn fp4w(rows: usize, cols: usize, seed: usize) -> WeightData {
    let values = (0..rows * cols / 2)
        .map(|i| ((i * 2654435761 + seed) % 256) as u8)
        .collect();
    let scales = (0..rows * cols / fp4::GROUP)
        .map(|i| fp4::e8m0_to_f32(110 + ((i + seed) % 5) as u8).expect("scale"))
        .collect();
    WeightData::Fp4 { values, scales }
}

fn fp4_expert(seed: usize) -> Mlp {
    Mlp::from_weights(
        fp4w(INTER, HIDDEN, seed),
        fp4w(INTER, HIDDEN, seed + 1),
        fp4w(HIDDEN, INTER, seed + 2),
        HIDDEN,
        INTER,
    )
}

fn bf16_expert(seed: usize) -> Mlp {
    Mlp::from_weights(
        bf16(INTER * HIDDEN, seed),
        bf16(INTER * HIDDEN, seed + 1),
        bf16(HIDDEN * INTER, seed + 2),
        HIDDEN,
        INTER,
    )
}

fn fp8_expert(seed: usize) -> Mlp {
    Mlp::from_weights(
        fp8w(INTER, HIDDEN, seed),
        fp8w(INTER, HIDDEN, seed + 1),
        fp8w(HIDDEN, INTER, seed + 2),
        HIDDEN,
        INTER,
    )
}

/// One decode token through each of many experts: weights stream from memory, not cache.
fn streaming(c: &mut Criterion) {
    const EXPERTS: usize = 24;
    let sets = [
        (
            "bf16",
            (0..EXPERTS).map(|e| bf16_expert(3 * e)).collect::<Vec<_>>(),
        ),
        (
            "fp8",
            (0..EXPERTS).map(|e| fp8_expert(3 * e)).collect::<Vec<_>>(),
        ),
        (
            "fp4",
            (0..EXPERTS).map(|e| fp4_expert(3 * e)).collect::<Vec<_>>(),
        ),
    ];
    let x: Vec<f32> = (0..HIDDEN)
        .map(|i| ((i % 97) as f32 - 48.0) * 0.01)
        .collect();
    let mut g = c.benchmark_group("decode_token_through_24_experts");
    g.throughput(Throughput::Elements(
        (EXPERTS * 2 * 3 * HIDDEN * INTER) as u64,
    ));
    for round in 0..2 {
        for (name, experts) in &sets {
            g.bench_with_input(BenchmarkId::new(*name, round), &round, |b, _| {
                b.iter(|| {
                    for e in experts {
                        std::hint::black_box(e.forward(&x, 1));
                    }
                })
            });
        }
    }
    g.finish();
}

fn expert_ffn(c: &mut Criterion) {
    let mlp = bf16_expert(1);
    let mlp_fp8 = fp8_expert(1);
    let mlp_fp4 = fp4_expert(1);
    let mut g = c.benchmark_group("expert_ffn_2048x1024_bf16");
    for tokens in [1usize, 8, 64, 512] {
        let x: Vec<f32> = (0..tokens * HIDDEN)
            .map(|i| ((i % 97) as f32 - 48.0) * 0.01)
            .collect();
        g.throughput(Throughput::Elements(
            (2 * tokens * 3 * HIDDEN * INTER) as u64,
        ));
        for (name, choice) in [
            ("avx512", KernelChoice::Avx512),
            ("portable", KernelChoice::Portable),
        ] {
            set_kernel_choice(choice);
            g.bench_with_input(BenchmarkId::new(name, tokens), &tokens, |b, &t| {
                b.iter(|| mlp.forward(&x, t))
            });
        }
        set_kernel_choice(KernelChoice::Auto);
        g.bench_with_input(BenchmarkId::new("avx512_fp8", tokens), &tokens, |b, &t| {
            b.iter(|| mlp_fp8.forward(&x, t))
        });
        g.bench_with_input(BenchmarkId::new("avx512_fp4", tokens), &tokens, |b, &t| {
            b.iter(|| mlp_fp4.forward(&x, t))
        });
        // Reference: the same FLOPs as three float32 faer GEMMs (weights 2× the bytes).
        let wgu = Mat::<f32>::from_fn(HIDDEN, 2 * INTER, |i, j| ((i + j) % 7) as f32 * 1e-3);
        let wd = Mat::<f32>::from_fn(INTER, HIDDEN, |i, j| ((i * 3 + j) % 5) as f32 * 1e-3);
        let xa = Mat::<f32>::from_fn(tokens, HIDDEN, |i, j| ((i + j) % 11) as f32 * 1e-2);
        let mut gu = Mat::<f32>::zeros(tokens, 2 * INTER);
        let mut out = Mat::<f32>::zeros(tokens, HIDDEN);
        g.bench_with_input(
            BenchmarkId::new("faer_f32_weights", tokens),
            &tokens,
            |b, _| {
                b.iter(|| {
                    matmul(&mut gu, Accum::Replace, &xa, &wgu, 1.0, Par::rayon(0));
                    let h = gu.get(.., ..INTER).to_owned();
                    matmul(&mut out, Accum::Replace, &h, &wd, 1.0, Par::rayon(0));
                })
            },
        );
    }
    g.finish();
}

criterion_group!(benches, expert_ffn, streaming);
criterion_main!(benches);

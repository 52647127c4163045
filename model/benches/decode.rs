//! One engine step of the `bench` preset (hidden 1024, 6 layers, 256 experts top-8, bf16):
//! decode at batch 1, 16 and 32 (each sequence has 32 cached tokens), and a 128-token prefill.
//! Throughput is reported in tokens/s. Alongside, in the same run, a parallel streaming read of
//! 1 GiB (bytes/s): decode at batch 1 reads every active weight once per token, so
//! `tok/s × active bytes / stream bytes/s` is the fraction of this machine's memory bandwidth
//! that decoding achieves (the active bytes are printed at start-up). Batched steps read every
//! expert that any of their tokens routes to: `decode_step_bytes/batch_B` times the same step
//! with those bytes as its throughput (counted from the step's own routing), so its GiB/s
//! next to `memory_stream_read_1GiB`'s is the fraction of the read bandwidth the step reaches.

pub mod common;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use moe_model::SeqCache;
use moe_model::model::{LoadOptions, LogitsMode, Model, SeqInput, Trace};
use rayon::prelude::*;

const CONTEXT: usize = 32;

fn prompt(i: usize, len: usize) -> Vec<u32> {
    (0..len)
        .map(|t| ((t * 37 + i * 101) % 500 + 4) as u32)
        .collect()
}

/// Sums a buffer on every thread, 64 lanes (four independent vectors) per thread, to measure
/// read bandwidth.
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

/// Bytes of weights one batch-1 decode step reads: the checkpoint minus the routed experts and
/// the embedding table, plus top-k experts per MoE layer and one embedding row (bf16).
fn active_bytes(model: &Model) -> u64 {
    let cfg = model.config();
    let moe = cfg.moe().expect("moe");
    let h = cfg.hidden_size as u64;
    let expert = 2 * 3 * h * moe.moe_intermediate_size as u64;
    let layers = cfg.moe_layers().len() as u64;
    let size = std::fs::metadata(common::bench_model_dir().join("model.safetensors"))
        .expect("size")
        .len();
    size - expert * moe.n_routed_experts as u64 * layers
        + expert * moe.num_experts_per_tok as u64 * layers
        - 2 * (cfg.vocab_size as u64 - 1) * h
}

/// Bytes of weights a decode step reads when its tokens route as `trace` says: the batch-1
/// figure with the top-k experts per layer replaced by the distinct experts routed to.
fn step_bytes(model: &Model, trace: &Trace) -> u64 {
    let cfg = model.config();
    let moe = cfg.moe().expect("moe");
    let expert = 2 * 3 * cfg.hidden_size as u64 * moe.moe_intermediate_size as u64;
    let layers = cfg.moe_layers().len() as u64;
    let distinct: u64 = trace
        .routing
        .values()
        .map(|r| {
            r.ids
                .iter()
                .collect::<std::collections::BTreeSet<_>>()
                .len() as u64
        })
        .sum();
    active_bytes(model) - expert * moe.num_experts_per_tok as u64 * layers + expert * distinct
}

fn decode(c: &mut Criterion) {
    let model =
        Model::load(&common::bench_model_dir(), &LoadOptions::default()).expect("bench model");
    eprintln!(
        "active weight bytes per batch-1 decode step: {:.1} MB",
        active_bytes(&model) as f64 / 1e6
    );
    let mut g = c.benchmark_group("bench_preset");
    g.sample_size(20);
    let buf = vec![1.0f32; 1 << 28];
    g.throughput(Throughput::Bytes((buf.len() * 4) as u64));
    g.bench_function("memory_stream_read_1GiB", |b| b.iter(|| stream_sum(&buf)));
    drop(buf);
    for batch in [1usize, 16, 32] {
        let prompts: Vec<Vec<u32>> = (0..batch).map(|i| prompt(i, CONTEXT)).collect();
        let mut caches: Vec<SeqCache> = prompts.iter().map(|_| model.new_cache()).collect();
        {
            let mut seqs: Vec<SeqInput<'_>> = prompts
                .iter()
                .zip(caches.iter_mut())
                .map(|(p, cache)| SeqInput { tokens: p, cache })
                .collect();
            model
                .forward(&mut seqs, LogitsMode::Last, None)
                .expect("prefill");
        }
        let next: Vec<[u32; 1]> = (0..batch).map(|i| [(i * 7 + 11) as u32]).collect();
        let mut step = |trace: Option<&mut Trace>| {
            let mut seqs: Vec<SeqInput<'_>> = next
                .iter()
                .zip(caches.iter_mut())
                .map(|(t, cache)| SeqInput { tokens: t, cache })
                .collect();
            let out = model
                .forward(&mut seqs, LogitsMode::Last, trace)
                .expect("decode");
            for cache in caches.iter_mut() {
                cache.truncate(CONTEXT);
            }
            out
        };
        let mut trace = Trace::default();
        step(Some(&mut trace));
        let bytes = step_bytes(&model, &trace);
        eprintln!(
            "batch {batch}: one decode step reads {:.1} MB of weights",
            bytes as f64 / 1e6
        );
        g.throughput(Throughput::Elements(batch as u64));
        g.bench_function(format!("decode_step/batch_{batch}"), |b| {
            b.iter(|| step(None))
        });
        if batch > 1 {
            g.throughput(Throughput::Bytes(bytes));
            g.bench_function(format!("decode_step_bytes/batch_{batch}"), |b| {
                b.iter(|| step(None))
            });
        }
    }
    let p = prompt(0, 128);
    g.throughput(Throughput::Elements(128));
    g.bench_function("prefill/128_tokens", |b| {
        b.iter(|| {
            let mut cache = model.new_cache();
            model
                .forward(
                    &mut [SeqInput {
                        tokens: &p,
                        cache: &mut cache,
                    }],
                    LogitsMode::Last,
                    None,
                )
                .expect("prefill")
        })
    });
    g.finish();
}

criterion_group!(benches, decode);
criterion_main!(benches);

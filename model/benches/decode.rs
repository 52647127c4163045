//! One engine step of the `bench` preset (hidden 1024, 6 layers, 256 experts top-8, bf16):
//! decode at batch 1 and 16 (each sequence has 32 cached tokens), and a 128-token prefill.
//! Throughput is reported in tokens/s.

mod common;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use moe_model::SeqCache;
use moe_model::model::{LoadOptions, LogitsMode, Model, SeqInput};

const CONTEXT: usize = 32;

fn prompt(i: usize, len: usize) -> Vec<u32> {
    (0..len)
        .map(|t| ((t * 37 + i * 101) % 500 + 4) as u32)
        .collect()
}

fn decode(c: &mut Criterion) {
    let model =
        Model::load(&common::bench_model_dir(), &LoadOptions::default()).expect("bench model");
    let mut g = c.benchmark_group("bench_preset");
    g.sample_size(20);
    for batch in [1usize, 16] {
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
        g.throughput(Throughput::Elements(batch as u64));
        g.bench_function(format!("decode_step/batch_{batch}"), |b| {
            b.iter(|| {
                let mut seqs: Vec<SeqInput<'_>> = next
                    .iter()
                    .zip(caches.iter_mut())
                    .map(|(t, cache)| SeqInput { tokens: t, cache })
                    .collect();
                let out = model
                    .forward(&mut seqs, LogitsMode::Last, None)
                    .expect("decode");
                for cache in caches.iter_mut() {
                    cache.truncate(CONTEXT);
                }
                out
            })
        });
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

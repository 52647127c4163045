//! Sampling and logprobs per token at the DeepSeek vocabulary (129,280), one sequence: the
//! serving overhead that `moe serve` adds to every generated token. `temperature 1, top_p
//! 0.95, logprobs 5` (the case) and greedy, over a trained model's peaked logits and a
//! random-weight model's flat ones; beside them, in the same run, the full-sort implementation
//! this replaced (sort for top-p, log-softmax and a second sort for logprobs).

use criterion::{Criterion, criterion_group, criterion_main};
use moe_model::sampling::{Sampler, SamplingParams, top_n, vector};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

const VOCAB: usize = 129_280;

fn logits(std: f32) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let n = Normal::new(0.0f32, std).expect("normal");
    (0..VOCAB).map(|_| n.sample(&mut rng)).collect()
}

/// The previous implementation: a full sort per sampled token and another for logprobs.
fn full_sort(logits: &[f32], rng: &mut ChaCha8Rng, top_p: f32, logprobs: usize) -> (u32, f32) {
    let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
    idx.sort_by(|&a, &b| {
        logits[b as usize]
            .total_cmp(&logits[a as usize])
            .then(a.cmp(&b))
    });
    let max = logits[idx[0] as usize];
    let mut probs: Vec<f64> = idx
        .iter()
        .map(|&i| f64::from(logits[i as usize] - max).exp())
        .collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|q| *q /= total);
    let mut cum = 0.0;
    let keep = probs
        .iter()
        .position(|q| {
            cum += q;
            cum >= f64::from(top_p)
        })
        .map_or(probs.len(), |i| i + 1);
    let total: f64 = probs[..keep].iter().sum();
    let mut u = rng.random::<f64>() * total;
    let mut id = idx[keep - 1];
    for (i, q) in probs[..keep].iter().enumerate() {
        if u < *q {
            id = idx[i];
            break;
        }
        u -= q;
    }
    let sum: f64 = logits.iter().map(|&v| f64::from(v - max).exp()).sum();
    let lse = max + sum.ln() as f32;
    let lp: Vec<f32> = logits.iter().map(|&v| v - lse).collect();
    let mut order: Vec<u32> = (0..logits.len() as u32).collect();
    order.sort_by(|&a, &b| lp[b as usize].total_cmp(&lp[a as usize]).then(a.cmp(&b)));
    (id, order[..logprobs].iter().map(|&i| lp[i as usize]).sum())
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("sample_129k");
    for (shape, std) in [("peaked", 2.5f32), ("flat", 0.5)] {
        let row = logits(std);
        let p = SamplingParams {
            temperature: 1.0,
            top_p: 0.95,
            seed: Some(7),
            ..Default::default()
        };
        let mut s = Sampler::new(p);
        g.bench_function(format!("{shape}/t1_top_p0.95_logprobs5"), |b| {
            b.iter(|| s.sample_with_logprobs(&row, Some(5)))
        });
        let mut greedy = Sampler::new(SamplingParams::default());
        g.bench_function(format!("{shape}/greedy"), |b| {
            b.iter(|| greedy.sample(&row))
        });
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        g.bench_function(format!("{shape}/full_sort_baseline"), |b| {
            b.iter(|| full_sort(&row, &mut rng, 0.95, 5))
        });
        let mut k = Sampler::new(SamplingParams {
            temperature: 0.7,
            top_k: 50,
            top_p: 0.9,
            min_p: 0.05,
            seed: Some(3),
        });
        g.bench_function(format!("{shape}/t0.7_top_k50_top_p0.9_min_p0.05"), |b| {
            b.iter(|| k.sample(&row))
        });
    }
    g.finish();
    // The passes one sampled token makes, one by one (flat logits).
    let row = logits(0.5);
    let mut g = c.benchmark_group("sample_129k_parts");
    let max = vector::max(&row);
    let mut w = vec![0.0f32; VOCAB];
    let mut count = vec![0u32; vector::BUCKETS];
    let mut mass = vec![0.0f64; vector::BUCKETS];
    g.bench_function("max", |b| b.iter(|| vector::max(&row)));
    g.bench_function("exp_sum", |b| b.iter(|| vector::exp_sum(&row, max)));
    g.bench_function("weights", |b| {
        b.iter(|| vector::floored_weights(&row, max, 1.0, f32::NEG_INFINITY, &mut w))
    });
    g.bench_function("weights_and_histogram", |b| {
        b.iter(|| {
            count.fill(0);
            mass.fill(0.0);
            vector::weights_and_histogram(
                &row,
                max,
                1.0,
                f32::NEG_INFINITY,
                &mut w,
                &mut count,
                &mut mass,
            )
        })
    });
    g.bench_function("top_n_5", |b| b.iter(|| top_n(&row, 5)));
    g.bench_function("draw_masked", |b| {
        b.iter(|| vector::draw(&w, 1000.0, |i| row[i] > -0.3))
    });
    g.bench_function("mass_before", |b| {
        b.iter(|| vector::mass_before(&row, &w, VOCAB / 2))
    });
    g.bench_function("draw_unmasked", |b| {
        b.iter(|| vector::draw(&w, 1000.0, |_| true))
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).warm_up_time(std::time::Duration::from_millis(500)).measurement_time(std::time::Duration::from_secs(2));
    targets = bench
}
criterion_main!(benches);

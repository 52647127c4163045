//! The vocabulary-scale sampler against a straightforward reference implementation of the
//! same distribution (`moe_model::sampling`'s module docs): a full sort, the filters applied
//! literally on float64 sums, the same seeded uniforms per token (one, or one per round of
//! top-p's rejection draw). The weights are the float32
//! `vector::exp` values the distribution is defined on (within 5e-7 of float64 `exp`, checked
//! in its unit test): with float64 `exp` instead, a draw whose uniform lands within ~1e-7 of
//! a boundary between two of 129,280 tied tokens picks the neighbour. Exact ids for a seed, at the
//! real vocabulary size (129,280), over peaked, flat and tied logits; and raw logprobs against
//! a float64 log-softmax.

use moe_model::sampling::{Sampler, SamplingParams, token_logprobs, vector};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

const VOCAB: usize = 129_280;

/// The reference: which ids are kept and their float64 weights, in id order.
fn reference_kept(logits: &[f32], p: &SamplingParams) -> Vec<(u32, f64)> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let t = f64::from(p.temperature);
    let inv_t = (1.0 / t) as f32;
    let w = |l: f32| f64::from(vector::exp((l - max) * inv_t));
    // Step 3: min-p on probabilities (p / p_max = w / 1), computed in float64; tokens whose
    // float32 weight underflows to 0 are never drawn.
    let mut ranked: Vec<u32> = (0..logits.len() as u32)
        .filter(|&i| {
            let l = logits[i as usize];
            (f64::from(l - max) / t).exp() >= f64::from(p.min_p) && w(l) > 0.0
        })
        .collect();
    // Step 4: rank by (logit desc, id asc); top-k.
    ranked.sort_by(|&a, &b| {
        logits[b as usize]
            .total_cmp(&logits[a as usize])
            .then(a.cmp(&b))
    });
    if p.top_k > 0 {
        ranked.truncate(p.top_k);
    }
    // Step 5: keep a token while the mass ranked before it is < top_p of the total.
    if p.top_p < 1.0 {
        let total: f64 = ranked.iter().map(|&i| w(logits[i as usize])).sum();
        let need = f64::from(p.top_p) * total;
        let mut acc = 0.0;
        let mut keep = 0;
        for &i in &ranked {
            if acc >= need {
                break;
            }
            acc += w(logits[i as usize]);
            keep += 1;
        }
        ranked.truncate(keep);
    }
    ranked.sort_unstable();
    ranked
        .into_iter()
        .map(|i| (i, w(logits[i as usize])))
        .collect()
}

/// Step 6: the first kept id (id order) where the running sum exceeds `u · total`.
fn reference_draw(kept: &[(u32, f64)], u: f64) -> u32 {
    let total: f64 = kept.iter().map(|k| k.1).sum();
    let target = u * total;
    let mut acc = 0.0;
    for &(i, w) in kept {
        acc += w;
        if acc > target {
            return i;
        }
    }
    kept.last().expect("the maximum is always kept").0
}

/// Top-p without top-k, by rejection: draw from the candidates in id order; a token outside
/// the nucleus replaces the candidates by those ranked above it, and the next uniform draws.
/// `all` is every candidate (the reference's kept set without top-p), `nucleus` with it.
fn reference_rejection(
    logits: &[f32],
    all: &[(u32, f64)],
    nucleus: &std::collections::HashSet<u32>,
    rng: &mut ChaCha8Rng,
) -> u32 {
    let mut candidates = all.to_vec();
    let ranks_before = |a: u32, b: u32| {
        let (la, lb) = (logits[a as usize], logits[b as usize]);
        la > lb || (la == lb && a < b)
    };
    loop {
        let x = reference_draw(&candidates, rng.random::<f64>());
        if nucleus.contains(&x) {
            return x;
        }
        candidates.retain(|&(i, _)| ranks_before(i, x));
    }
}

fn logits(kind: &str, seed: u64) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    match kind {
        // A trained model's shape: a few likely tokens over a long tail.
        "peaked" => {
            let n = Normal::new(0.0f32, 2.5).expect("normal");
            (0..VOCAB).map(|_| n.sample(&mut rng)).collect()
        }
        // A random-weight model's shape: the nucleus is most of the vocabulary.
        "flat" => {
            let n = Normal::new(0.0f32, 0.5).expect("normal");
            (0..VOCAB).map(|_| n.sample(&mut rng)).collect()
        }
        // Many exact ties, including at the cut points.
        "tied" => (0..VOCAB)
            .map(|_| (rng.random_range(0..24) as f32) * 0.5)
            .collect(),
        other => panic!("{other}"),
    }
}

fn params(temperature: f32, top_k: usize, top_p: f32, min_p: f32, seed: u64) -> SamplingParams {
    SamplingParams {
        temperature,
        top_k,
        top_p,
        min_p,
        seed: Some(seed),
    }
}

#[test]
fn exact_ids_for_a_seed_match_the_reference() {
    let cases = [
        params(1.0, 0, 1.0, 0.0, 1),
        params(1.0, 0, 0.95, 0.0, 2),
        params(0.7, 0, 0.5, 0.0, 3),
        params(1.0, 50, 1.0, 0.0, 4),
        params(1.3, 1000, 0.9, 0.0, 5),
        params(1.0, 0, 1.0, 0.05, 6),
        params(0.8, 40, 0.9, 0.1, 7),
        params(1.0, 3, 1.0, 0.0, 8),
        params(2.0, 0, 0.99, 0.0, 9),
        params(1.0, 0, 0.9, 0.05, 10),
        params(0.5, 0, 0.3, 0.0, 11),
    ];
    const DRAWS: usize = 64;
    for kind in ["peaked", "flat", "tied"] {
        let row = logits(kind, 42);
        for p in &cases {
            let kept = reference_kept(&row, p);
            let mut rng = ChaCha8Rng::seed_from_u64(p.seed.expect("seeded"));
            let rejection = p.top_k == 0 && p.top_p < 1.0;
            let all = reference_kept(&row, &SamplingParams { top_p: 1.0, ..*p });
            let nucleus = kept.iter().map(|k| k.0).collect();
            let want: Vec<u32> = (0..DRAWS)
                .map(|_| match rejection {
                    true => reference_rejection(&row, &all, &nucleus, &mut rng),
                    false => reference_draw(&kept, rng.random::<f64>()),
                })
                .collect();
            let mut s = Sampler::new(*p);
            let got: Vec<u32> = (0..DRAWS).map(|_| s.sample(&row)).collect();
            assert_eq!(got, want, "{kind} {p:?} (reference keeps {})", kept.len());
            let distinct: std::collections::BTreeSet<_> = got.iter().collect();
            assert!(
                distinct.len() > 1 || kept.len() == 1,
                "{kind} {p:?} never varied"
            );
        }
    }
}

/// The rejection draw's frequencies are the nucleus's normalised weights (a statistical check
/// of the argument in `sampling::nucleus`, independent of the reference's code).
#[test]
fn top_p_by_rejection_draws_the_nucleus_distribution() {
    let row: Vec<f32> = vec![2.0, 0.5, 1.9, -1.0, 1.2, 1.8, 0.0, 1.0];
    let p = params(1.0, 0, 0.8, 0.0, 12);
    let kept = reference_kept(&row, &p);
    let total: f64 = kept.iter().map(|k| k.1).sum();
    const N: usize = 200_000;
    let mut s = Sampler::new(p);
    let mut seen = vec![0usize; row.len()];
    for _ in 0..N {
        seen[s.sample(&row) as usize] += 1;
    }
    for (i, &c) in seen.iter().enumerate() {
        let want = kept
            .iter()
            .find(|k| k.0 == i as u32)
            .map_or(0.0, |k| k.1 / total);
        let got = c as f64 / N as f64;
        // Binomial standard error at N = 200,000 is <= 0.0012; 5 sigma.
        assert!((got - want).abs() < 0.006, "token {i}: {got} vs {want}");
    }
    assert!(
        kept.len() > 1 && kept.len() < row.len(),
        "the cut is inside"
    );
}

#[test]
fn temperature_zero_and_top_k_one_take_the_first_maximum() {
    let row = logits("tied", 3);
    let first_max = {
        let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        row.iter().position(|&v| v == m).expect("max") as u32
    };
    for p in [params(0.0, 0, 0.9, 0.0, 1), params(1.0, 1, 1.0, 0.0, 1)] {
        let mut s = Sampler::new(p);
        assert!((0..8).all(|_| s.sample(&row) == first_max), "{p:?}");
    }
}

#[test]
fn logprobs_match_a_float64_log_softmax() {
    for kind in ["peaked", "flat", "tied"] {
        let row = logits(kind, 9);
        let max = vector::max(&row);
        let lse = f64::from(max)
            + row
                .iter()
                .map(|&l| f64::from(l - max).exp())
                .sum::<f64>()
                .ln();
        let mut idx: Vec<u32> = (0..row.len() as u32).collect();
        idx.sort_by(|&a, &b| row[b as usize].total_cmp(&row[a as usize]).then(a.cmp(&b)));
        let lp = token_logprobs(&row, max, 17, 20);
        assert!((f64::from(lp.logprob) - (f64::from(row[17]) - lse)).abs() < 1e-4);
        assert_eq!(lp.top.len(), 20);
        for (&(id, v), &want) in lp.top.iter().zip(&idx) {
            assert_eq!(id, want, "{kind}");
            assert!((f64::from(v) - (f64::from(row[id as usize]) - lse)).abs() < 1e-4);
        }
    }
}

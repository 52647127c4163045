//! Choosing the next token from logits, at vocabulary scale: greedy (temperature 0), or
//! temperature with min-p, top-k and top-p (nucleus) filtering, from a seeded ChaCha RNG so a
//! seed reproduces a sample, whatever else shares the batch.
//!
//! The distribution, in vLLM's order (`vllm/v1/sample/sampler.py`):
//! 1. temperature 0 or `top_k == 1`: the first maximum, and no random number is drawn;
//! 2. weights `w = exp((l - max) / T)`;
//! 3. min-p drops tokens with `p < min_p · p_max` (`l < max + T · ln min_p`);
//! 4. tokens rank by `(logit desc, id asc)`; top-k keeps the first k;
//! 5. top-p keeps the shortest prefix of that ranking whose mass reaches `top_p` of what is left;
//! 6. one uniform `u` in `[0, 1)` (`rng.random::<f64>()`); the token is the first kept one in id
//!    order at which the running (float64) sum of kept weights exceeds `u · Σ kept`. Top-p
//!    without top-k (the OpenAI API's case) reaches the same distribution by rejection instead
//!    (`nucleus`): that draw over every candidate, repeated over the candidates ranked above
//!    a token that falls outside the nucleus, one uniform per round.
//!
//! No step sorts the vocabulary: the maximum and the weights are vectorised passes (compiled
//! for AVX-512 as well, picked at run time: [`vector`]), the top-k cut of steps 4-5 walks a
//! histogram of the weights and sorts only the tokens of the bucket where a cut falls
//! ([`select`]), a rejection round is two passes, and the draw is one. Log-probabilities
//! ([`logprobs`]) are of the raw logits, from one `log Σ exp` pass and a top-N scan, sharing
//! the maximum with the sampler.
//! `model/tests/sampling.rs` checks exact ids against a full-sort reference implementation.

mod logprobs;
mod select;
pub mod vector;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

pub use logprobs::{TokenLogprobs, log_sum_exp, token_logprobs, top_n};
use select::Scratch;

/// Per-request sampling settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// Keep the smallest set of tokens whose probability reaches `top_p` (1 = off).
    pub top_p: f32,
    /// Keep the `top_k` most likely tokens (0 = off).
    pub top_k: usize,
    /// Drop tokens less likely than `min_p` times the most likely one (0 = off).
    pub min_p: f32,
    /// RNG seed; `None` draws one from the OS.
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            seed: None,
        }
    }
}

impl SamplingParams {
    /// Checks the ranges an API would reject.
    pub fn validate(&self) -> Result<(), String> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(format!(
                "temperature must be >= 0, got {}",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(format!("min_p must be in [0, 1], got {}", self.min_p));
        }
        Ok(())
    }

    /// Whether sampling is the argmax (no random number drawn).
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0 || self.top_k == 1
    }
}

/// Index of the largest logit (first on ties).
pub fn argmax(logits: &[f32]) -> u32 {
    first_at(logits, vector::max(logits))
}

/// Index of the first logit equal to `max` (the maximum, already known).
fn first_at(logits: &[f32], max: f32) -> u32 {
    logits.iter().position(|&v| v == max).unwrap_or(0) as u32
}

/// A sampler with its own RNG stream and scratch buffers.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
    scratch: Scratch,
}

impl Sampler {
    /// A sampler for `params`.
    pub fn new(params: SamplingParams) -> Sampler {
        let rng = match params.seed {
            Some(s) => ChaCha8Rng::seed_from_u64(s),
            None => ChaCha8Rng::from_os_rng(),
        };
        Sampler {
            params,
            rng,
            scratch: Scratch::default(),
        }
    }

    /// The settings.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// The next token.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        self.sample_with_logprobs(logits, None).0
    }

    /// The next token and, with `logprobs = Some(n)`, its log-probability and the top `n`.
    pub fn sample_with_logprobs(
        &mut self,
        logits: &[f32],
        logprobs: Option<usize>,
    ) -> (u32, Option<TokenLogprobs>) {
        let max = vector::max(logits);
        let (id, sum) = if self.params.is_greedy() {
            (first_at(logits, max), None)
        } else {
            self.draw(logits, max)
        };
        let lp = logprobs.map(|n| match sum {
            Some(sum) => logprobs::with_lse(logits, max + sum.ln() as f32, id, n),
            None => token_logprobs(logits, max, id, n),
        });
        (id, lp)
    }

    /// The drawn token, and `Σ exp(l - max)` when the weights were exactly that (T = 1, no
    /// min-p), so that logprobs need no second pass.
    fn draw(&mut self, logits: &[f32], max: f32) -> (u32, Option<f64>) {
        let p = self.params;
        let inv_t = 1.0 / p.temperature;
        let floor = if p.min_p > 0.0 {
            max + p.temperature * p.min_p.ln()
        } else {
            f32::NEG_INFINITY
        };
        let s = &mut self.scratch;
        let (found, total) = if p.top_k == 0 {
            // No ranking cut needs a histogram: min-p zeroes weights (never drawn), and
            // top-p draws by rejection.
            s.weights.resize(logits.len(), 0.0);
            let kept = vector::floored_weights(logits, max, inv_t, floor, &mut s.weights);
            let found = if p.top_p >= 1.0 {
                vector::draw(&s.weights, self.rng.random::<f64>() * kept, |_| true)
            } else {
                nucleus(
                    logits,
                    &s.weights,
                    kept,
                    f64::from(p.top_p) * kept,
                    &mut self.rng,
                )
            };
            (found, kept)
        } else {
            s.reset(logits.len());
            let u = self.rng.random::<f64>();
            let total = vector::weights_and_histogram(
                logits,
                max,
                inv_t,
                floor,
                &mut s.weights,
                &mut s.count,
                &mut s.mass,
            );
            let cut = select::cut(logits, s, p.top_k, p.top_p);
            let found = vector::draw(&s.weights, u * cut.mass, |i| cut.keeps(logits[i], i));
            (found, total)
        };
        let id = found.map_or_else(|| first_at(logits, max), |i| i as u32);
        let exact = p.temperature == 1.0 && p.min_p == 0.0;
        (id, exact.then_some(total))
    }
}

/// Top-p by rejection, without ranking the vocabulary: draw from a candidate set `S` (first
/// every token of nonzero weight, of mass `mass`) in id order; a token whose higher-ranked mass
/// is below `need` is in the nucleus and is the sample; otherwise `S` becomes the tokens ranked
/// above it, whose mass that check just computed. The nucleus is a prefix of the ranking, so
/// it stays inside `S`, and a draw from `S` that lands in it is a draw from the nucleus. The
/// first draw is accepted with probability ≈ `top_p`; each round is two vectorised passes.
fn nucleus(
    logits: &[f32],
    weights: &[f32],
    mut mass: f64,
    need: f64,
    rng: &mut ChaCha8Rng,
) -> Option<usize> {
    let mut pivot: Option<usize> = None;
    loop {
        let target = rng.random::<f64>() * mass;
        let x = match pivot {
            None => vector::draw(weights, target, |_| true),
            Some(pv) => {
                let lp = logits[pv];
                vector::draw(weights, target, |i| {
                    logits[i] > lp || (logits[i] == lp && i < pv)
                })
            }
        }?;
        let before = vector::mass_before(logits, weights, x);
        if before < need {
            return Some(x);
        }
        pivot = Some(x);
        mass = before;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(params: SamplingParams, logits: &[f32], n: usize) -> Vec<usize> {
        let mut s = Sampler::new(params);
        let mut c = vec![0; logits.len()];
        for _ in 0..n {
            c[s.sample(logits) as usize] += 1;
        }
        c
    }

    #[test]
    fn greedy_takes_the_first_maximum() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, -1.0]), 1);
        let mut s = Sampler::new(SamplingParams::default());
        assert_eq!(s.sample(&[0.0, 2.0, 1.0]), 1);
    }

    #[test]
    fn a_seed_reproduces_the_samples() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let p = SamplingParams {
            temperature: 1.0,
            seed: Some(7),
            ..Default::default()
        };
        let a: Vec<u32> = {
            let mut s = Sampler::new(p);
            (0..20).map(|_| s.sample(&logits)).collect()
        };
        let b: Vec<u32> = {
            let mut s = Sampler::new(p);
            (0..20).map(|_| s.sample(&logits)).collect()
        };
        assert_eq!(a, b);
        assert!(
            a.iter().any(|&t| t != a[0]),
            "temperature 1 should not be constant"
        );
    }

    #[test]
    fn top_k_and_top_p_restrict_the_support() {
        let logits = [2.0, 1.9, 1.8, 0.0, -1.0];
        let c = counts(
            SamplingParams {
                temperature: 1.0,
                top_k: 2,
                seed: Some(1),
                ..Default::default()
            },
            &logits,
            2000,
        );
        assert!(
            c[2] == 0 && c[3] == 0 && c[4] == 0 && c[0] > 0 && c[1] > 0,
            "{c:?}"
        );
        // Probabilities ≈ [.30, .27, .25, .04, .01, ...]: top_p 0.5 keeps the first two.
        let c = counts(
            SamplingParams {
                temperature: 1.0,
                top_p: 0.5,
                seed: Some(2),
                ..Default::default()
            },
            &logits,
            2000,
        );
        assert!(
            c[2..].iter().all(|&v| v == 0) && c[0] > 0 && c[1] > 0,
            "{c:?}"
        );
    }

    #[test]
    fn temperature_sharpens_the_distribution() {
        let logits = [1.0, 0.0];
        // p(0) = 1/(1+e^-1) ≈ 0.73 at T=1; ≈ 0.99995 at T=0.1.
        let hot = counts(
            SamplingParams {
                temperature: 1.0,
                seed: Some(3),
                ..Default::default()
            },
            &logits,
            4000,
        );
        let cold = counts(
            SamplingParams {
                temperature: 0.1,
                seed: Some(3),
                ..Default::default()
            },
            &logits,
            4000,
        );
        let f = hot[0] as f64 / 4000.0;
        assert!((f - 0.731).abs() < 0.03, "{f}");
        assert!(cold[1] <= 2, "{cold:?}");
    }

    #[test]
    fn validation_rejects_out_of_range_values() {
        assert!(
            SamplingParams {
                temperature: -1.0,
                ..Default::default()
            }
            .validate()
            .is_err()
        );
        assert!(
            SamplingParams {
                top_p: 0.0,
                ..Default::default()
            }
            .validate()
            .is_err()
        );
        assert!(
            SamplingParams {
                top_p: 1.5,
                ..Default::default()
            }
            .validate()
            .is_err()
        );
        assert!(SamplingParams::default().validate().is_ok());
    }
}

//! Choosing the next token from logits: greedy (temperature 0), or temperature with top-k and
//! top-p (nucleus) filtering, from a seeded ChaCha RNG so a seed reproduces a sample.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Per-request sampling settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// Keep the smallest set of tokens whose probability reaches `top_p` (1 = off).
    pub top_p: f32,
    /// Keep the `top_k` most likely tokens (0 = off).
    pub top_k: usize,
    /// RNG seed; `None` draws one from the OS.
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
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
        Ok(())
    }
}

/// Index of the largest logit (first on ties).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// A sampler with its own RNG stream.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
}

impl Sampler {
    /// A sampler for `params`.
    pub fn new(params: SamplingParams) -> Sampler {
        let rng = match params.seed {
            Some(s) => ChaCha8Rng::seed_from_u64(s),
            None => ChaCha8Rng::from_os_rng(),
        };
        Sampler { params, rng }
    }

    /// The settings.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// The next token.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let p = &self.params;
        if p.temperature == 0.0 || p.top_k == 1 {
            return argmax(logits);
        }
        // Candidates by descending logit (ties: lower id first), cut by top-k.
        let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
        idx.sort_by(|&a, &b| {
            logits[b as usize]
                .total_cmp(&logits[a as usize])
                .then(a.cmp(&b))
        });
        if p.top_k > 0 {
            idx.truncate(p.top_k);
        }
        let max = logits[idx[0] as usize];
        let mut probs: Vec<f64> = idx
            .iter()
            .map(|&i| f64::from((logits[i as usize] - max) / p.temperature).exp())
            .collect();
        let total: f64 = probs.iter().sum();
        for q in &mut probs {
            *q /= total;
        }
        if p.top_p < 1.0 {
            let mut cum = 0.0;
            let mut keep = probs.len();
            for (i, q) in probs.iter().enumerate() {
                cum += q;
                if cum >= f64::from(p.top_p) {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep);
            idx.truncate(keep);
        }
        let total: f64 = probs.iter().sum();
        let mut u = self.rng.random::<f64>() * total;
        for (i, q) in probs.iter().enumerate() {
            if u < *q {
                return idx[i];
            }
            u -= q;
        }
        idx[probs.len() - 1]
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

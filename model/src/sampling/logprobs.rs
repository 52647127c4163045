//! Log-probabilities of the raw logits (before temperature and filters, as vLLM and the OpenAI
//! API report them): one pass for the maximum, one for `log Σ exp`, and the top N by a single
//! scan that keeps N candidates and skips every 64-token chunk whose maximum cannot enter.

use super::vector;

/// The log-probability of a sampled token and the most likely tokens, best first.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprobs {
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

/// `log Σ exp(l)` given the maximum `max` of `logits`.
pub fn log_sum_exp(logits: &[f32], max: f32) -> f32 {
    max + vector::exp_sum(logits, max).ln() as f32
}

vector::multiversion! {
/// The `n` largest logits, best first (ties: lower id first), as `(id, logit)`.
pub fn top_n(logits: &[f32], n: usize) -> Vec<(u32, f32)> {
    const CHUNK: usize = 64;
    let mut best: Vec<(u32, f32)> = Vec::with_capacity(n + 1);
    if n == 0 {
        return best;
    }
    for (c, chunk) in logits.chunks(CHUNK).enumerate() {
        if best.len() == n {
            let floor = best[n - 1].1;
            if vector::max_inline(chunk) <= floor {
                continue; // ties with the floor lose to it: it has the lower id
            }
        }
        for (j, &l) in chunk.iter().enumerate() {
            if best.len() == n && l <= best[n - 1].1 {
                continue;
            }
            // Insert after every entry >= l (earlier ids win ties).
            let at = best.partition_point(|&(_, v)| v >= l);
            best.insert(at, ((c * CHUNK + j) as u32, l));
            best.truncate(n);
        }
    }
    best
}
}

/// Log-probabilities of token `id` and of the `n` most likely tokens.
pub fn token_logprobs(logits: &[f32], max: f32, id: u32, n: usize) -> TokenLogprobs {
    with_lse(logits, log_sum_exp(logits, max), id, n)
}

/// [`token_logprobs`] with `log Σ exp` already known (the sampler's weight sum at T = 1).
pub fn with_lse(logits: &[f32], lse: f32, id: u32, n: usize) -> TokenLogprobs {
    TokenLogprobs {
        logprob: logits[id as usize] - lse,
        top: top_n(logits, n)
            .into_iter()
            .map(|(i, l)| (i, l - lse))
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_n_equals_a_full_sort() {
        let logits: Vec<f32> = (0..5000u32)
            .map(|i| ((i.wrapping_mul(2_654_435_761) >> 7) % 997) as f32 * 0.01)
            .collect();
        let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
        idx.sort_by(|&a, &b| {
            logits[b as usize]
                .total_cmp(&logits[a as usize])
                .then(a.cmp(&b))
        });
        for n in [0, 1, 5, 20] {
            let want: Vec<(u32, f32)> = idx[..n].iter().map(|&i| (i, logits[i as usize])).collect();
            assert_eq!(top_n(&logits, n), want, "n = {n}");
        }
    }

    #[test]
    fn logprobs_normalise() {
        let logits = [1.0f32, 3.0, 2.0];
        let t = token_logprobs(&logits, 3.0, 0, 2);
        let total: f64 = [0u32, 1, 2]
            .iter()
            .map(|&i| f64::from(token_logprobs(&logits, 3.0, i, 0).logprob).exp())
            .sum();
        assert!((total - 1.0).abs() < 1e-6, "{total}");
        assert_eq!(t.top.iter().map(|x| x.0).collect::<Vec<_>>(), vec![1, 2]);
    }
}

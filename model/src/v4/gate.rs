//! The DeepSeek-V4 MoE gate: router logits → (expert ids, weights) per token.
//!
//! Scores `s = √softplus(x Wᵀ)` (`scoring_func: sqrtsoftplus`; sigmoid and softmax are also
//! accepted, as in transformers). Hash layers (`mlp_layer_types == hash_moe`) take their experts
//! from the frozen `tid2eid[token id]` table, so the gate needs the input token ids; score layers
//! take the top-k of `s + bias` with no group limit (ties to the lower index). Either way the
//! weights are the unbiased `s` of the chosen experts, always normalised (`/ (Σ + 1e-20)`), times
//! `routed_scaling_factor`. The output is a V3 [`Routing`] (ids ascending, weights aligned), so
//! everything downstream of the gate, the wire included, is shared with V3.
//! Reference: transformers `DeepseekV4TopKRouter` / `DeepseekV4HashRouter`.

use super::names::Names;
use super::{V4Config, V4ScoringFunc};
use crate::checkpoint::Checkpoint;
use crate::error::{ModelError, Result};
use crate::gate::{Routing, top_indices};
use crate::kernels::{self, Linear};

#[derive(Debug)]
enum Choice {
    /// `[vocab, top_k]` expert ids per token id.
    Hash(Vec<u32>),
    /// `e_score_correction_bias`, for the choice only.
    Score(Vec<f32>),
}

/// One layer's gate.
#[derive(Debug)]
pub struct V4Gate {
    weight: Linear,
    choice: Choice,
    scoring: V4ScoringFunc,
    top_k: usize,
    scale: f32,
    vocab: usize,
}

/// `√softplus(x)`, with torch's softplus (linear above 20).
fn sqrt_softplus(x: f32) -> f32 {
    let sp = if x > 20.0 {
        x
    } else {
        x.max(0.0) + (-x.abs()).exp().ln_1p()
    };
    sp.sqrt()
}

impl V4Gate {
    /// Loads `layers.{layer}.ffn.gate.{weight, tid2eid | bias}`.
    pub fn load(cfg: &V4Config, ckpt: &Checkpoint, names: &Names, layer: usize) -> Result<V4Gate> {
        let (e, hid, k) = (
            cfg.n_routed_experts,
            cfg.hidden_size,
            cfg.num_experts_per_tok,
        );
        let weight = Linear::new(
            ckpt.read_weight(&names.layer(layer, "ffn.gate.weight"), &[e, hid])?,
            e,
            hid,
        );
        let choice = if cfg.is_hash_layer(layer) {
            let name = names.layer(layer, "ffn.gate.tid2eid");
            let table = ckpt.read_index_table(&name, &[cfg.vocab_size, k], e)?;
            // A token's experts must be distinct: a dispatch lists each expert once per token.
            if let Some(tok) = (0..cfg.vocab_size).find(|&t| {
                let row = &table[t * k..][..k];
                (1..k).any(|i| row[..i].contains(&row[i]))
            }) {
                return Err(ModelError::Checkpoint {
                    path: ckpt.dir().to_path_buf(),
                    reason: format!("`{name}` lists an expert twice for token id {tok}"),
                });
            }
            Choice::Hash(table)
        } else {
            Choice::Score(ckpt.read_f32(&names.layer(layer, "ffn.gate.bias"), &[e])?)
        };
        Ok(V4Gate {
            weight,
            choice,
            scoring: cfg.scoring_func,
            top_k: k,
            scale: cfg.routed_scaling_factor as f32,
            vocab: cfg.vocab_size,
        })
    }

    /// Whether this gate routes by token id.
    pub fn is_hash(&self) -> bool {
        matches!(self.choice, Choice::Hash(_))
    }

    /// Routes `x[t, hidden]` whose input token ids are `tokens` (`t` of them).
    pub fn route(&self, x: &[f32], tokens: &[u32]) -> Result<Routing> {
        let t = tokens.len();
        let e = self.weight.out_features();
        if x.len() != t * self.weight.in_features() {
            return Err(ModelError::InvalidInput(format!(
                "gate input has {} values for {t} tokens",
                x.len()
            )));
        }
        let logits = self.weight.forward(x, t);
        let k = self.top_k;
        let mut ids = Vec::with_capacity(t * k);
        let mut weights = Vec::with_capacity(t * k);
        for (row, &tok) in logits.chunks_exact(e).zip(tokens) {
            let mut scores: Vec<f32> = match self.scoring {
                V4ScoringFunc::Sqrtsoftplus => row.iter().map(|&l| sqrt_softplus(l)).collect(),
                V4ScoringFunc::Sigmoid => row.iter().map(|&l| kernels::sigmoid(l)).collect(),
                V4ScoringFunc::Softmax => row.to_vec(),
            };
            if self.scoring == V4ScoringFunc::Softmax {
                kernels::softmax(&mut scores);
            }
            let mut chosen: Vec<usize> = match &self.choice {
                Choice::Hash(table) => {
                    if tok as usize >= self.vocab {
                        return Err(ModelError::InvalidInput(format!(
                            "token id {tok} is outside the hash table of {} ids",
                            self.vocab
                        )));
                    }
                    table[tok as usize * k..][..k]
                        .iter()
                        .map(|&i| i as usize)
                        .collect()
                }
                Choice::Score(bias) => {
                    let biased: Vec<f32> = scores.iter().zip(bias).map(|(s, b)| s + b).collect();
                    top_indices(&biased, 0..e, k)
                }
            };
            chosen.sort_unstable();
            let sum: f32 = chosen.iter().map(|&i| scores[i]).sum::<f32>() + 1e-20;
            ids.extend(chosen.iter().map(|&i| i as u32));
            weights.extend(chosen.iter().map(|&i| scores[i] / sum * self.scale));
        }
        Ok(Routing {
            top_k: k,
            ids,
            weights,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::WeightData;

    fn gate(choice: Choice) -> V4Gate {
        // 4 experts over a 2-wide input: logits = [x0, x1, -x0, 2 x1].
        let w = vec![1.0, 0.0, 0.0, 1.0, -1.0, 0.0, 0.0, 2.0];
        V4Gate {
            weight: Linear::new(WeightData::F32(w), 4, 2),
            choice,
            scoring: V4ScoringFunc::Sqrtsoftplus,
            top_k: 2,
            scale: 1.5,
            vocab: 3,
        }
    }

    #[test]
    fn score_layers_choose_with_bias_and_weigh_without() {
        let x = [1.0f32, 0.5];
        let s: Vec<f32> = [1.0f32, 0.5, -1.0, 1.0]
            .iter()
            .map(|&l| sqrt_softplus(l))
            .collect();
        // Unbiased top-2: experts 0 and 3 (logit 1.0 each). A bias on 2 makes it win over 3.
        let r = gate(Choice::Score(vec![0.0; 4]))
            .route(&x, &[0])
            .expect("route");
        assert_eq!(r.ids, vec![0, 3]);
        let r = gate(Choice::Score(vec![0.0, 0.0, 1.0, 0.0]))
            .route(&x, &[0])
            .expect("route");
        assert_eq!(r.ids, vec![0, 2]);
        let sum = s[0] + s[2];
        assert!((r.weights[0] - s[0] / sum * 1.5).abs() < 1e-6, "{r:?}");
        assert!((r.weights[1] - s[2] / sum * 1.5).abs() < 1e-6, "{r:?}");
    }

    #[test]
    fn hash_layers_route_by_token_id() {
        let g = gate(Choice::Hash(vec![3, 1, 0, 2, 2, 0]));
        let x = [1.0f32, 0.5, 1.0, 0.5];
        let r = g.route(&x, &[2, 0]).expect("route");
        assert_eq!(r.ids, vec![0, 2, 1, 3]);
        assert!((r.weights_of(0).iter().sum::<f32>() - 1.5).abs() < 1e-6);
        assert!(g.route(&x[..2], &[7]).is_err());
    }

    #[test]
    fn sqrt_softplus_matches_the_definition() {
        for x in [-30.0f32, -3.0, 0.0, 0.7, 19.0, 25.0] {
            let exact = (f64::from(x).exp().ln_1p()).sqrt();
            assert!((f64::from(sqrt_softplus(x)) - exact).abs() < 1e-6, "{x}");
        }
    }
}

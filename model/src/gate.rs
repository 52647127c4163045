//! The MoE gate: router logits → (expert ids, weights) per token.
//!
//! DeepSeek-V3 (`noaux_tc`): `s = sigmoid(x Wᵀ)`; experts are *chosen* by `s + bias`
//! (`e_score_correction_bias`), groups ranked by the sum of their two best biased scores, only
//! the best `topk_group` groups compete, the top-k biased scores win; the *weights* are the
//! unbiased `s` of the winners, normalised when `norm_topk_prob`, times `routed_scaling_factor`.
//! DeepSeek-V2: softmax scores with `greedy` (plain top-k) or `group_limited_greedy` (groups
//! ranked by their best score). Experts outside the kept groups are excluded outright, as in
//! DeepSeek's own inference code (transformers fills them with 0.0, which can only differ when
//! every kept candidate scores below zero). Ties go to the lower index. The output ids are
//! sorted ascending with their weights, so the combine order does not depend on scores.
//! The gate returns routing only; experts never see it.
//! References: DeepSeek-V3 `inference/model.py::Gate`, transformers `DeepseekV3TopkRouter`.

use crate::checkpoint::Checkpoint;
use crate::config::{MoeConfig, ScoringFunc, TopkMethod};
use crate::error::Result;
use crate::kernels::{self, Linear};

/// Chosen experts and weights for a batch of tokens, `top_k` per token.
#[derive(Debug, Clone, PartialEq)]
pub struct Routing {
    pub top_k: usize,
    /// `[tokens, top_k]` expert ids, ascending within a token.
    pub ids: Vec<u32>,
    /// `[tokens, top_k]` weights aligned with `ids`.
    pub weights: Vec<f32>,
}

impl Routing {
    /// Tokens routed.
    pub fn tokens(&self) -> usize {
        self.ids.len().checked_div(self.top_k).unwrap_or(0)
    }

    /// Expert ids of token `t`.
    pub fn ids_of(&self, t: usize) -> &[u32] {
        &self.ids[t * self.top_k..][..self.top_k]
    }

    /// Weights of token `t`.
    pub fn weights_of(&self, t: usize) -> &[f32] {
        &self.weights[t * self.top_k..][..self.top_k]
    }
}

/// One MoE layer's gate.
#[derive(Debug)]
pub struct Gate {
    weight: Linear,
    bias: Option<Vec<f32>>,
    cfg: MoeConfig,
}

impl Gate {
    /// Loads `model.layers.{layer}.mlp.gate.*`.
    pub fn load(cfg: &MoeConfig, hidden: usize, ckpt: &Checkpoint, layer: usize) -> Result<Gate> {
        let p = format!("model.layers.{layer}.mlp.gate");
        let e = cfg.n_routed_experts;
        let weight = Linear::new(
            ckpt.read_weight(&format!("{p}.weight"), &[e, hidden])?,
            e,
            hidden,
        );
        let bias_name = format!("{p}.e_score_correction_bias");
        let bias = match cfg.topk_method {
            TopkMethod::NoauxTc => Some(ckpt.read_f32(&bias_name, &[e])?),
            _ if ckpt.contains(&bias_name) => Some(ckpt.read_f32(&bias_name, &[e])?),
            _ => None,
        };
        Ok(Gate {
            weight,
            bias,
            cfg: cfg.clone(),
        })
    }

    /// Builds a gate from parts (tests, synthetic models).
    pub fn from_parts(weight: Linear, bias: Option<Vec<f32>>, cfg: MoeConfig) -> Gate {
        Gate { weight, bias, cfg }
    }

    /// Routes `x[t, hidden]`.
    pub fn route(&self, x: &[f32], t: usize) -> Routing {
        let logits = self.weight.forward(x, t);
        let e = self.cfg.n_routed_experts;
        let k = self.cfg.num_experts_per_tok;
        let mut ids = Vec::with_capacity(t * k);
        let mut weights = Vec::with_capacity(t * k);
        for row in logits.chunks_exact(e) {
            let (i, w) = select_experts(&self.cfg, row, self.bias.as_deref());
            ids.extend(i);
            weights.extend(w);
        }
        Routing {
            top_k: k,
            ids,
            weights,
        }
    }
}

/// Indices of the `k` largest `values` among `candidates` (ties: lower index first).
pub(crate) fn top_indices(
    values: &[f32],
    candidates: impl Iterator<Item = usize>,
    k: usize,
) -> Vec<usize> {
    let mut idx: Vec<usize> = candidates.collect();
    let cmp = |a: &usize, b: &usize| values[*b].total_cmp(&values[*a]).then(a.cmp(b));
    if idx.len() > k {
        idx.select_nth_unstable_by(k - 1, cmp);
        idx.truncate(k);
    }
    idx.sort_by(cmp);
    idx
}

/// Routing of one token from its router logits: `(ids ascending, weights)`.
pub fn select_experts(
    cfg: &MoeConfig,
    logits: &[f32],
    bias: Option<&[f32]>,
) -> (Vec<u32>, Vec<f32>) {
    let e = logits.len();
    let mut scores: Vec<f32> = match cfg.scoring_func {
        ScoringFunc::Sigmoid => logits.iter().map(|&l| kernels::sigmoid(l)).collect(),
        ScoringFunc::Softmax => logits.to_vec(),
    };
    if cfg.scoring_func == ScoringFunc::Softmax {
        kernels::softmax(&mut scores);
    }
    let choice: Vec<f32> = match bias {
        Some(b) => scores.iter().zip(b).map(|(s, b)| s + b).collect(),
        None => scores.clone(),
    };
    let per_group = e / cfg.n_group.max(1);
    let kept_groups: Vec<usize> = match cfg.topk_method {
        TopkMethod::Greedy => (0..cfg.n_group.max(1)).collect(),
        method => {
            let group_scores: Vec<f32> = choice
                .chunks_exact(per_group)
                .map(|g| match method {
                    TopkMethod::NoauxTc => {
                        let top = top_indices(g, 0..g.len(), 2);
                        top.iter().map(|&i| g[i]).sum()
                    }
                    _ => g.iter().copied().fold(f32::NEG_INFINITY, f32::max),
                })
                .collect();
            top_indices(&group_scores, 0..group_scores.len(), cfg.topk_group)
        }
    };
    let candidates = kept_groups
        .iter()
        .flat_map(|&g| g * per_group..(g + 1) * per_group);
    let mut chosen = top_indices(&choice, candidates, cfg.num_experts_per_tok);
    chosen.sort_unstable();
    let mut weights: Vec<f32> = chosen.iter().map(|&i| scores[i]).collect();
    if cfg.norm_topk_prob {
        let denom = weights.iter().sum::<f32>() + 1e-20;
        for w in &mut weights {
            *w /= denom;
        }
    }
    for w in &mut weights {
        *w *= cfg.routed_scaling_factor;
    }
    (chosen.into_iter().map(|i| i as u32).collect(), weights)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v3(n_group: usize, topk_group: usize, k: usize) -> MoeConfig {
        MoeConfig {
            n_routed_experts: 16,
            num_experts_per_tok: k,
            n_group,
            topk_group,
            n_shared_experts: 1,
            moe_intermediate_size: 8,
            routed_scaling_factor: 2.5,
            norm_topk_prob: true,
            scoring_func: ScoringFunc::Sigmoid,
            topk_method: TopkMethod::NoauxTc,
        }
    }

    fn logit(p: f32) -> f32 {
        (p / (1.0 - p)).ln()
    }

    #[test]
    fn group_limiting_keeps_the_best_groups_by_top2_sum() {
        // 4 groups of 4. Group 0 holds the single best expert (0.99) but its runner-up is weak;
        // groups 1 and 2 have two strong experts each. Ranking by top-2 sum keeps groups 1, 2.
        let mut p = [0.05f32; 16];
        p[0] = 0.99;
        p[1] = 0.06;
        p[4] = 0.7;
        p[5] = 0.69;
        p[8] = 0.6;
        p[9] = 0.59;
        p[12] = 0.5;
        let logits: Vec<f32> = p.iter().map(|&v| logit(v)).collect();
        let (ids, _) = select_experts(&v3(4, 2, 4), &logits, None);
        assert_eq!(ids, vec![4, 5, 8, 9]);
        // Without group limiting (one group) expert 0 wins a place.
        let (ids, _) = select_experts(&v3(1, 1, 4), &logits, None);
        assert_eq!(ids, vec![0, 4, 5, 8]);
    }

    #[test]
    fn bias_chooses_but_does_not_weigh() {
        let p: Vec<f32> = (0..16).map(|i| 0.1 + 0.05 * i as f32).collect();
        let logits: Vec<f32> = p.iter().map(|&v| logit(v)).collect();
        // Without bias: the top-2 are 14, 15. A bias on 0 and 1 makes them win instead.
        let (ids, _) = select_experts(&v3(1, 1, 2), &logits, None);
        assert_eq!(ids, vec![14, 15]);
        let mut bias = vec![0.0f32; 16];
        bias[0] = 1.0;
        bias[1] = 1.0;
        let (ids, w) = select_experts(&v3(1, 1, 2), &logits, Some(&bias));
        assert_eq!(ids, vec![0, 1]);
        // Weights come from the unbiased scores 0.10 and 0.15, normalised, × 2.5.
        assert!((w[0] - 2.5 * 0.10 / 0.25).abs() < 1e-5, "{w:?}");
        assert!((w[1] - 2.5 * 0.15 / 0.25).abs() < 1e-5, "{w:?}");
    }

    #[test]
    fn normalisation_is_optional() {
        let p: Vec<f32> = (0..16).map(|i| 0.1 + 0.05 * i as f32).collect();
        let logits: Vec<f32> = p.iter().map(|&v| logit(v)).collect();
        let mut cfg = v3(1, 1, 2);
        cfg.norm_topk_prob = false;
        let (ids, w) = select_experts(&cfg, &logits, None);
        assert_eq!(ids, vec![14, 15]);
        assert!(
            (w[0] - 2.5 * 0.8).abs() < 1e-5 && (w[1] - 2.5 * 0.85).abs() < 1e-5,
            "{w:?}"
        );
    }

    #[test]
    fn v2_softmax_variants() {
        let logits: Vec<f32> = vec![
            3.0, 0.0, 0.0, 0.0, 2.0, 2.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 2.5,
        ];
        let mut cfg = v3(4, 2, 3);
        cfg.scoring_func = ScoringFunc::Softmax;
        cfg.norm_topk_prob = false;
        cfg.routed_scaling_factor = 1.0;
        cfg.topk_method = TopkMethod::Greedy;
        let (ids, w) = select_experts(&cfg, &logits, None);
        assert_eq!(ids, vec![0, 4, 15]);
        let z: f32 = logits.iter().map(|l| l.exp()).sum();
        assert!((w[0] - 3f32.exp() / z).abs() < 1e-6);
        // Group-limited: group maxima are 3, 2, 1, 2.5 → groups 0 and 3 → experts 0, 15, then 1.
        cfg.topk_method = TopkMethod::GroupLimitedGreedy;
        let (ids, _) = select_experts(&cfg, &logits, None);
        assert_eq!(ids, vec![0, 1, 15]);
    }

    #[test]
    fn ties_prefer_the_lower_index() {
        let logits = vec![0.0f32; 16];
        let (ids, w) = select_experts(&v3(4, 2, 3), &logits, None);
        assert_eq!(ids, vec![0, 1, 2]);
        assert!(w.iter().all(|x| (x - 2.5 / 3.0).abs() < 1e-6));
    }
}

//! Typed, validated `config.json` of the DeepSeek-V3 model family (V2, V2-Lite, V3, R1, V3.x).
//!
//! Mirrors the Hugging Face `DeepseekV3Config` / `DeepseekV2Config` field for field, with serde
//! defaults for absent keys and enums for the categorical ones. [`Config::validate`] rejects
//! shapes no checkpoint can have before anything is loaded.
//! Reference: `transformers/models/deepseek_v3/configuration_deepseek_v3.py`.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};

/// How router logits become expert scores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScoringFunc {
    /// DeepSeek-V3: independent sigmoid per expert.
    Sigmoid,
    /// DeepSeek-V2: softmax over all routed experts.
    Softmax,
}

/// How the top-k experts are chosen from the scores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TopkMethod {
    /// DeepSeek-V3: bias-corrected scores, groups ranked by the sum of their top-2.
    NoauxTc,
    /// DeepSeek-V2-Lite: plain top-k over all experts.
    Greedy,
    /// DeepSeek-V2: groups ranked by their best score, then top-k inside the chosen groups.
    GroupLimitedGreedy,
}

/// `rope_scaling` (only YaRN is used by this family).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RopeScaling {
    /// `"yarn"`; HF spells the key `type` or `rope_type`.
    #[serde(alias = "rope_type", rename = "type")]
    pub kind: String,
    pub factor: f64,
    #[serde(default)]
    pub original_max_position_embeddings: Option<usize>,
    #[serde(default)]
    pub beta_fast: Option<f64>,
    #[serde(default)]
    pub beta_slow: Option<f64>,
    #[serde(default)]
    pub mscale: Option<f64>,
    #[serde(default)]
    pub mscale_all_dim: Option<f64>,
    #[serde(default)]
    pub attention_factor: Option<f64>,
}

/// `quantization_config` of the official FP8 checkpoints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QuantizationConfig {
    pub quant_method: String,
    #[serde(default)]
    pub fmt: Option<String>,
    #[serde(default)]
    pub activation_scheme: Option<String>,
    /// `[block_rows, block_cols]` of the `weight_scale_inv` grid.
    #[serde(default)]
    pub weight_block_size: Option<[usize; 2]>,
}

/// A token id or a list of them (`eos_token_id` is either in the wild).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl TokenIds {
    /// All ids as a vector.
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            TokenIds::One(id) => vec![*id],
            TokenIds::Many(ids) => ids.clone(),
        }
    }
}

fn default_one() -> usize {
    1
}
fn default_rope_theta() -> f64 {
    10000.0
}
fn default_eps() -> f64 {
    1e-6
}
fn default_true() -> bool {
    true
}
fn default_scaling() -> f64 {
    1.0
}
fn default_max_pos() -> usize {
    4096
}
fn default_act() -> String {
    "silu".to_string()
}

/// The model configuration, as in `config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Config {
    #[serde(default)]
    pub model_type: Option<String>,
    pub vocab_size: usize,
    pub hidden_size: usize,
    /// Width of the dense MLP layers.
    pub intermediate_size: usize,
    /// Width of one routed (and one shared) expert.
    #[serde(default)]
    pub moe_intermediate_size: Option<usize>,
    pub num_hidden_layers: usize,
    /// Layers `0..first_k_dense_replace` use a dense MLP.
    #[serde(default)]
    pub first_k_dense_replace: usize,
    /// Every `moe_layer_freq`-th layer after the dense ones is MoE (1 in every released model).
    #[serde(default = "default_one")]
    pub moe_layer_freq: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// `None`: queries come from `q_proj` directly (DeepSeek-V2-Lite).
    #[serde(default)]
    pub q_lora_rank: Option<usize>,
    pub kv_lora_rank: usize,
    pub qk_nope_head_dim: usize,
    pub qk_rope_head_dim: usize,
    pub v_head_dim: usize,
    #[serde(default)]
    pub n_routed_experts: Option<usize>,
    #[serde(default)]
    pub num_experts_per_tok: Option<usize>,
    #[serde(default = "default_one")]
    pub n_group: usize,
    #[serde(default = "default_one")]
    pub topk_group: usize,
    #[serde(default)]
    pub n_shared_experts: Option<usize>,
    #[serde(default = "default_scaling")]
    pub routed_scaling_factor: f64,
    #[serde(default)]
    pub norm_topk_prob: bool,
    #[serde(default)]
    pub scoring_func: Option<ScoringFunc>,
    #[serde(default)]
    pub topk_method: Option<TopkMethod>,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    #[serde(default)]
    pub rope_scaling: Option<RopeScaling>,
    /// Interleaved rope pairs `(2i, 2i+1)`, as in the official weights.
    #[serde(default = "default_true")]
    pub rope_interleave: bool,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Multi-token-prediction layers; their weights are ignored.
    #[serde(default)]
    pub num_nextn_predict_layers: usize,
    #[serde(default)]
    pub quantization_config: Option<QuantizationConfig>,
    /// The checkpoint dtype; transformers ≥4.56 writes `dtype`, older ones `torch_dtype`.
    #[serde(default, alias = "torch_dtype")]
    pub dtype: Option<String>,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    #[serde(default)]
    pub eos_token_id: Option<TokenIds>,
}

/// Everything the MoE layers need, resolved from the optional config keys.
#[derive(Debug, Clone, PartialEq)]
pub struct MoeConfig {
    pub n_routed_experts: usize,
    pub num_experts_per_tok: usize,
    pub n_group: usize,
    pub topk_group: usize,
    pub n_shared_experts: usize,
    pub moe_intermediate_size: usize,
    pub routed_scaling_factor: f32,
    pub norm_topk_prob: bool,
    pub scoring_func: ScoringFunc,
    pub topk_method: TopkMethod,
}

impl Config {
    /// Reads and validates `<dir>/config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| ModelError::ConfigRead {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        Self::from_json(&text).map_err(|e| match e {
            ModelError::ConfigRead { reason, .. } => ModelError::ConfigRead { path, reason },
            other => other,
        })
    }

    /// Parses and validates a `config.json` text.
    pub fn from_json(text: &str) -> Result<Self> {
        let cfg: Config = serde_json::from_str(text).map_err(|e| ModelError::ConfigRead {
            path: "config.json".into(),
            reason: e.to_string(),
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// True for the V3 generation (sigmoid + noaux_tc defaults).
    fn is_v3(&self) -> bool {
        self.model_type.as_deref() != Some("deepseek_v2")
    }

    /// The MoE settings, or `None` for a model without routed experts.
    pub fn moe(&self) -> Option<MoeConfig> {
        let n_routed_experts = self.n_routed_experts?;
        let v3 = self.is_v3();
        Some(MoeConfig {
            n_routed_experts,
            num_experts_per_tok: self.num_experts_per_tok.unwrap_or(1),
            n_group: self.n_group,
            topk_group: self.topk_group,
            n_shared_experts: self.n_shared_experts.unwrap_or(0),
            moe_intermediate_size: self.moe_intermediate_size.unwrap_or(self.intermediate_size),
            routed_scaling_factor: self.routed_scaling_factor as f32,
            norm_topk_prob: self.norm_topk_prob,
            scoring_func: self.scoring_func.unwrap_or(if v3 {
                ScoringFunc::Sigmoid
            } else {
                ScoringFunc::Softmax
            }),
            topk_method: self.topk_method.unwrap_or(if v3 {
                TopkMethod::NoauxTc
            } else {
                TopkMethod::Greedy
            }),
        })
    }

    /// Whether decoder layer `layer` has routed experts.
    pub fn is_moe_layer(&self, layer: usize) -> bool {
        self.n_routed_experts.is_some()
            && layer >= self.first_k_dense_replace
            && layer < self.num_hidden_layers
            && layer.is_multiple_of(self.moe_layer_freq.max(1))
    }

    /// The MoE layers, in order.
    pub fn moe_layers(&self) -> Vec<usize> {
        (0..self.num_hidden_layers)
            .filter(|&l| self.is_moe_layer(l))
            .collect()
    }

    /// Query/key head width: nope + rope.
    pub fn qk_head_dim(&self) -> usize {
        self.qk_nope_head_dim + self.qk_rope_head_dim
    }

    /// The FP8 weight block size, when the checkpoint is block-quantised.
    pub fn fp8_block(&self) -> Option<[usize; 2]> {
        let q = self.quantization_config.as_ref()?;
        (q.quant_method == "fp8").then(|| q.weight_block_size.unwrap_or([128, 128]))
    }

    /// A stable fingerprint of the configuration (FNV-1a of its JSON), so that processes can
    /// check they serve the same model.
    pub fn fingerprint(&self) -> String {
        let text = serde_json::to_string(self).unwrap_or_default();
        let h = text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        });
        format!("{h:016x}")
    }

    /// End-of-sequence ids.
    pub fn eos_token_ids(&self) -> Vec<u32> {
        self.eos_token_id
            .as_ref()
            .map(TokenIds::to_vec)
            .unwrap_or_default()
    }

    /// Rejects configurations no checkpoint can have.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(ModelError::InvalidConfig(msg));
        for (name, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("kv_lora_rank", self.kv_lora_rank),
            ("qk_nope_head_dim", self.qk_nope_head_dim),
            ("qk_rope_head_dim", self.qk_rope_head_dim),
            ("v_head_dim", self.v_head_dim),
        ] {
            if v == 0 {
                return bad(format!("{name} must be positive"));
            }
        }
        if self.q_lora_rank == Some(0) {
            return bad("q_lora_rank must be positive or null".into());
        }
        if !self.qk_rope_head_dim.is_multiple_of(2) || self.qk_rope_head_dim > 512 {
            return bad(format!(
                "qk_rope_head_dim ({}) must be even (rope rotates pairs) and at most 512",
                self.qk_rope_head_dim
            ));
        }
        if let Some(kv) = self.num_key_value_heads
            && kv != self.num_attention_heads
        {
            return bad(format!(
                "num_key_value_heads ({kv}) must equal num_attention_heads ({}) for MLA",
                self.num_attention_heads
            ));
        }
        if self.first_k_dense_replace > self.num_hidden_layers {
            return bad(format!(
                "first_k_dense_replace ({}) exceeds num_hidden_layers ({})",
                self.first_k_dense_replace, self.num_hidden_layers
            ));
        }
        if self.hidden_act != "silu" {
            return bad(format!(
                "hidden_act `{}` is not supported (only silu)",
                self.hidden_act
            ));
        }
        if self.attention_bias {
            return bad("attention_bias = true is not supported by this family".into());
        }
        if self.rms_norm_eps.is_nan()
            || self.rms_norm_eps <= 0.0
            || !self.rope_theta.is_finite()
            || self.rope_theta <= 1.0
        {
            return bad("rms_norm_eps must be > 0 and rope_theta > 1".into());
        }
        if let Some(rs) = &self.rope_scaling {
            if rs.kind != "yarn" {
                return bad(format!(
                    "rope_scaling type `{}` is not supported (only yarn)",
                    rs.kind
                ));
            }
            if rs.factor.is_nan() || rs.factor < 1.0 {
                return bad(format!("rope_scaling.factor ({}) must be >= 1", rs.factor));
            }
        }
        if let Some(q) = &self.quantization_config {
            if q.quant_method != "fp8" {
                return bad(format!(
                    "quantization method `{}` is not supported (only fp8)",
                    q.quant_method
                ));
            }
            if let Some(fmt) = &q.fmt
                && fmt != "e4m3"
            {
                return bad(format!("fp8 format `{fmt}` is not supported (only e4m3)"));
            }
            if let Some([r, c]) = q.weight_block_size
                && (r == 0 || c == 0)
            {
                return bad("weight_block_size entries must be positive".into());
            }
        }
        if self.n_routed_experts.is_some() {
            self.validate_moe()?;
        }
        Ok(())
    }

    fn validate_moe(&self) -> Result<()> {
        let bad = |msg: String| Err(ModelError::InvalidConfig(msg));
        let Some(m) = self.moe() else { return Ok(()) };
        if m.n_routed_experts == 0 || m.num_experts_per_tok == 0 {
            return bad("n_routed_experts and num_experts_per_tok must be positive".into());
        }
        if m.num_experts_per_tok > m.n_routed_experts {
            return bad(format!(
                "num_experts_per_tok ({}) exceeds n_routed_experts ({})",
                m.num_experts_per_tok, m.n_routed_experts
            ));
        }
        if m.moe_intermediate_size == 0 {
            return bad("moe_intermediate_size must be positive".into());
        }
        if self.moe_layer_freq == 0 {
            return bad("moe_layer_freq must be positive".into());
        }
        if !m.routed_scaling_factor.is_finite() || m.routed_scaling_factor <= 0.0 {
            return bad("routed_scaling_factor must be positive".into());
        }
        let grouped = m.topk_method != TopkMethod::Greedy;
        if grouped {
            if m.n_group == 0 || m.n_routed_experts % m.n_group != 0 {
                return bad(format!(
                    "n_routed_experts ({}) is not divisible by n_group ({})",
                    m.n_routed_experts, m.n_group
                ));
            }
            if m.topk_group == 0 || m.topk_group > m.n_group {
                return bad(format!(
                    "topk_group ({}) must be in 1..=n_group ({})",
                    m.topk_group, m.n_group
                ));
            }
            let per_group = m.n_routed_experts / m.n_group;
            if m.num_experts_per_tok > m.topk_group * per_group {
                return bad(format!(
                    "num_experts_per_tok ({}) exceeds the experts in topk_group ({}) groups of {}",
                    m.num_experts_per_tok, m.topk_group, per_group
                ));
            }
            if m.topk_method == TopkMethod::NoauxTc && per_group < 2 {
                return bad(
                    "noaux_tc ranks groups by their top-2 experts: groups need >= 2".into(),
                );
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny_json() -> serde_json::Value {
        let text = include_str!("../../tests/fixtures/models/tiny-dsv3/config.json");
        serde_json::from_str(text).expect("fixture config parses")
    }

    #[test]
    fn parses_the_tiny_config() {
        let cfg = Config::from_json(&tiny_json().to_string()).expect("valid");
        assert_eq!(cfg.hidden_size, 64);
        assert_eq!(cfg.dtype.as_deref(), Some("float32"));
        let moe = cfg.moe().expect("moe");
        assert_eq!(moe.scoring_func, ScoringFunc::Sigmoid);
        assert_eq!(moe.topk_method, TopkMethod::NoauxTc);
        assert_eq!(cfg.moe_layers(), vec![1, 2, 3]);
        assert!(cfg.rope_interleave);
    }

    #[test]
    fn torch_dtype_spelling_and_fp8_block() {
        let text = include_str!("../../tests/fixtures/models/tiny-dsv3-fp8/config.json");
        let cfg = Config::from_json(text).expect("valid");
        assert_eq!(cfg.dtype.as_deref(), Some("bfloat16"));
        assert_eq!(cfg.fp8_block(), Some([128, 128]));
    }

    #[test]
    fn v2_lite_shape_without_q_lora() {
        let mut v = tiny_json();
        v["model_type"] = "deepseek_v2".into();
        v["q_lora_rank"] = serde_json::Value::Null;
        v["topk_method"] = "greedy".into();
        v["scoring_func"] = "softmax".into();
        v["n_group"] = 1.into();
        v["topk_group"] = 1.into();
        let cfg = Config::from_json(&v.to_string()).expect("valid");
        assert_eq!(cfg.q_lora_rank, None);
        assert_eq!(cfg.moe().expect("moe").topk_method, TopkMethod::Greedy);
    }

    #[test]
    fn rejects_impossible_shapes() {
        let cases: &[(&str, serde_json::Value, &str)] = &[
            ("n_group", 7.into(), "not divisible by n_group"),
            ("topk_group", 9.into(), "topk_group"),
            (
                "num_experts_per_tok",
                300.into(),
                "exceeds n_routed_experts",
            ),
            ("qk_rope_head_dim", 7.into(), "must be even"),
            ("num_key_value_heads", 1.into(), "num_key_value_heads"),
            ("first_k_dense_replace", 9.into(), "first_k_dense_replace"),
            ("hidden_size", 0.into(), "hidden_size must be positive"),
            ("topk_method", "bogus".into(), "unknown variant"),
        ];
        for (key, value, needle) in cases {
            let mut v = tiny_json();
            v[*key] = value.clone();
            let err = Config::from_json(&v.to_string())
                .expect_err(key)
                .to_string();
            assert!(err.contains(needle), "{key}: {err}");
        }
    }

    #[test]
    fn too_few_experts_in_the_kept_groups() {
        let mut v = tiny_json();
        v["topk_group"] = 1.into(); // 1 group of 32 experts is enough for top-8
        Config::from_json(&v.to_string()).expect("valid");
        v["n_group"] = 64.into(); // groups of 4, one kept: 4 < 8
        let err = Config::from_json(&v.to_string())
            .expect_err("invalid")
            .to_string();
        assert!(err.contains("exceeds the experts in topk_group"), "{err}");
    }

    #[test]
    fn yarn_scaling_parses_both_key_spellings() {
        let mut v = tiny_json();
        v["rope_scaling"] = serde_json::json!({"type": "yarn", "factor": 40.0,
            "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1,
            "mscale": 1.0, "mscale_all_dim": 1.0});
        let cfg = Config::from_json(&v.to_string()).expect("valid");
        assert_eq!(cfg.rope_scaling.expect("yarn").factor, 40.0);
        v["rope_scaling"] = serde_json::json!({"rope_type": "yarn", "factor": 4.0});
        Config::from_json(&v.to_string()).expect("rope_type spelling");
        v["rope_scaling"] = serde_json::json!({"type": "linear", "factor": 4.0});
        assert!(Config::from_json(&v.to_string()).is_err());
    }
}

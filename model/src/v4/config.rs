//! Typed, validated `config.json` of DeepSeek-V4 (`model_type: deepseek_v4`, V4-Flash / V4-Pro).
//!
//! Mirrors transformers' `DeepseekV4Config` (5.24): serde defaults equal its defaults, the
//! categorical keys are enums ([`AttnLayerType`], [`MlpLayerType`], [`V4ScoringFunc`]), and the
//! legacy spellings real checkpoints ship (`compress_ratios`, `compress_rate_csa/hca`,
//! `num_hash_layers`, `qk_rope_head_dim`, a flat YaRN `rope_parameters` / `rope_scaling`) are folded
//! into the modern fields first by [`super::config_compat::normalize`], which rejects a file whose
//! two spellings of one field disagree. [`V4Config::validate`] rejects shapes no checkpoint can
//! have and what this engine cannot run.
//! Reference: transformers `models/deepseek_v4/configuration_deepseek_v4.py`; `V4.md`.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::config::{Dtype, HiddenAct, QuantizationConfig, RopeType, TokenIds};
use crate::error::{ModelError, Result};

/// `layer_types`: the attention variant of each layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AttnLayerType {
    /// Sliding window only; "main" RoPE.
    #[serde(rename = "sliding_attention")]
    Sliding,
    /// Compressed Sparse Attention: overlapping compressor + lightning indexer top-k.
    #[serde(rename = "compressed_sparse_attention")]
    Csa,
    /// Heavily Compressed Attention: every complete compressed entry.
    #[serde(rename = "heavily_compressed_attention")]
    Hca,
}

/// `mlp_layer_types`: how each layer's MoE picks its experts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MlpLayerType {
    /// Experts from the frozen `tid2eid[token id]` table.
    HashMoe,
    /// Top-k of `score + bias`.
    Moe,
}

/// `scoring_func`: router logits → expert scores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum V4ScoringFunc {
    /// `sqrt(softplus(logit))` (V4-Flash and V4-Pro).
    Sqrtsoftplus,
    Sigmoid,
    Softmax,
}

/// `compress_rates`: tokens per compressed entry for each compressed layer type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompressRates {
    #[serde(rename = "compressed_sparse_attention")]
    pub csa: usize,
    #[serde(rename = "heavily_compressed_attention")]
    pub hca: usize,
}

/// One rope set of `rope_parameters` (`main` or `compress`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RopeParams {
    pub rope_type: RopeType,
    pub rope_theta: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partial_rotary_factor: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub factor: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original_max_position_embeddings: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub beta_fast: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub beta_slow: Option<f64>,
    /// Forced to 1.0 for YaRN by the config (cos/sin are not scaled).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention_factor: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mscale: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mscale_all_dim: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub truncate: Option<bool>,
}

/// `rope_parameters`, always nested after normalisation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RopeSets {
    /// Sliding-only layers.
    pub main: RopeParams,
    /// CSA/HCA layers, their compressors and the indexer.
    pub compress: RopeParams,
}

fn d_vocab() -> usize {
    129_280
}
fn d_hidden() -> usize {
    4096
}
fn d_moe_inter() -> usize {
    2048
}
fn d_layers() -> usize {
    43
}
fn d_heads() -> usize {
    64
}
fn d_one() -> usize {
    1
}
fn d_head_dim() -> usize {
    512
}
fn d_1024() -> usize {
    1024
}
fn d_topk() -> usize {
    6
}
fn d_experts() -> usize {
    256
}
fn d_scoring() -> V4ScoringFunc {
    V4ScoringFunc::Sqrtsoftplus
}
fn d_true() -> bool {
    true
}
fn d_scaling() -> f64 {
    1.5
}
fn d_max_pos() -> usize {
    1_048_576
}
fn d_theta() -> f64 {
    10_000.0
}
fn d_compress_theta() -> f64 {
    160_000.0
}
fn d_rates() -> CompressRates {
    CompressRates { csa: 4, hca: 128 }
}
fn d_hc_mult() -> usize {
    4
}
fn d_sinkhorn() -> usize {
    20
}
fn d_eps() -> f64 {
    1e-6
}
fn d_swiglu() -> f64 {
    10.0
}
fn d_window() -> usize {
    128
}
fn d_groups() -> usize {
    8
}
fn d_index_heads() -> usize {
    64
}
fn d_index_dim() -> usize {
    128
}
fn d_index_topk() -> usize {
    512
}
fn d_act() -> HiddenAct {
    HiddenAct::Silu
}
fn d_bos() -> Option<u32> {
    Some(0)
}
fn d_eos() -> Option<TokenIds> {
    Some(TokenIds::One(1))
}

/// The DeepSeek-V4 configuration, after the legacy keys are folded in.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct V4Config {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub architectures: Vec<String>,
    #[serde(default = "d_vocab")]
    pub vocab_size: usize,
    #[serde(default = "d_hidden")]
    pub hidden_size: usize,
    /// Width of one routed expert and of the shared expert.
    #[serde(default = "d_moe_inter")]
    pub moe_intermediate_size: usize,
    #[serde(default = "d_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "d_heads")]
    pub num_attention_heads: usize,
    /// Always 1: one 512-wide head is both K and V.
    #[serde(default = "d_one")]
    pub num_key_value_heads: usize,
    #[serde(default = "d_head_dim")]
    pub head_dim: usize,
    #[serde(default = "d_1024")]
    pub q_lora_rank: usize,
    /// Rotated dims at the end of each head (`head_dim · partial_rotary_factor`).
    pub qk_rope_head_dim: usize,
    pub partial_rotary_factor: f64,
    #[serde(default = "d_topk")]
    pub num_experts_per_tok: usize,
    #[serde(default = "d_experts")]
    pub n_routed_experts: usize,
    /// Read but not used: V4 has one shared expert of width `moe_intermediate_size`.
    #[serde(default = "d_one")]
    pub n_shared_experts: usize,
    #[serde(default = "d_scoring")]
    pub scoring_func: V4ScoringFunc,
    /// Read but not used: V4 always normalises the top-k weights.
    #[serde(default = "d_true")]
    pub norm_topk_prob: bool,
    #[serde(default = "d_scaling")]
    pub routed_scaling_factor: f64,
    #[serde(default = "d_max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default = "d_theta")]
    pub rope_theta: f64,
    pub layer_types: Vec<AttnLayerType>,
    #[serde(default = "d_rates")]
    pub compress_rates: CompressRates,
    #[serde(default = "d_compress_theta")]
    pub compress_rope_theta: f64,
    #[serde(default = "d_hc_mult")]
    pub hc_mult: usize,
    #[serde(default = "d_sinkhorn")]
    pub hc_sinkhorn_iters: usize,
    #[serde(default = "d_eps")]
    pub hc_eps: f64,
    pub mlp_layer_types: Vec<MlpLayerType>,
    #[serde(default = "d_swiglu")]
    pub swiglu_limit: f64,
    #[serde(default = "d_window")]
    pub sliding_window: usize,
    #[serde(default = "d_groups")]
    pub o_groups: usize,
    #[serde(default = "d_1024")]
    pub o_lora_rank: usize,
    #[serde(default = "d_index_heads")]
    pub index_n_heads: usize,
    #[serde(default = "d_index_dim")]
    pub index_head_dim: usize,
    #[serde(default = "d_index_topk")]
    pub index_topk: usize,
    /// MTP layers; their weights (`mtp.*`) are ignored.
    #[serde(default = "d_one")]
    pub num_nextn_predict_layers: usize,
    #[serde(default = "d_act")]
    pub hidden_act: HiddenAct,
    #[serde(default = "d_eps")]
    pub rms_norm_eps: f64,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    pub rope_parameters: RopeSets,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    #[serde(default)]
    pub quantization_config: Option<QuantizationConfig>,
    #[serde(default)]
    pub dtype: Option<Dtype>,
    #[serde(default = "d_bos")]
    pub bos_token_id: Option<u32>,
    #[serde(default = "d_eos")]
    pub eos_token_id: Option<TokenIds>,
}

impl V4Config {
    /// Reads and validates `<dir>/config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        crate::config::read_config(dir, Self::from_json)
    }

    /// Parses and validates a `config.json` text, in any of the published spellings.
    pub fn from_json(text: &str) -> Result<Self> {
        let read = |e: serde_json::Error| ModelError::ConfigRead {
            path: "config.json".into(),
            reason: e.to_string(),
        };
        let value: serde_json::Value = serde_json::from_str(text).map_err(read)?;
        let cfg: V4Config =
            serde_json::from_value(super::config_compat::normalize(value)?).map_err(read)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Whether layer `l` routes by the `tid2eid` table.
    pub fn is_hash_layer(&self, l: usize) -> bool {
        self.mlp_layer_types.get(l) == Some(&MlpLayerType::HashMoe)
    }

    /// Tokens per compressed entry of layer `l` (`None` for sliding-only layers).
    pub fn compress_rate(&self, l: usize) -> Option<usize> {
        match self.layer_types.get(l)? {
            AttnLayerType::Sliding => None,
            AttnLayerType::Csa => Some(self.compress_rates.csa),
            AttnLayerType::Hca => Some(self.compress_rates.hca),
        }
    }

    /// Every layer is MoE in V4.
    pub fn moe_layers(&self) -> Vec<usize> {
        (0..self.num_hidden_layers).collect()
    }

    /// Every routed (layer, expert) pair.
    pub fn all_expert_pairs(&self) -> Vec<(usize, usize)> {
        let n = self.n_routed_experts;
        (0..self.num_hidden_layers)
            .flat_map(|l| (0..n).map(move |e| (l, e)))
            .collect()
    }

    /// End-of-sequence ids.
    pub fn eos_token_ids(&self) -> Vec<u32> {
        self.eos_token_id
            .as_ref()
            .map(TokenIds::to_vec)
            .unwrap_or_default()
    }

    /// A stable fingerprint of the configuration (FNV-1a of its JSON).
    pub fn fingerprint(&self) -> String {
        let text = serde_json::to_string(self).unwrap_or_default();
        let h = text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        });
        format!("{h:016x}")
    }
}

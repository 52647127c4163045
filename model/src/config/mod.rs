//! Typed, validated `config.json` of the DeepSeek-V3 model family (V2, V2-Lite, V3, R1, V3.x).
//!
//! Mirrors the Hugging Face `DeepseekV3Config` / `DeepseekV2Config` field for field, with serde
//! defaults for absent keys and enums for the categorical ones. [`Config::validate`] rejects
//! shapes no checkpoint can have before anything is loaded.
//! Every published spelling is accepted: the files are first folded into one shape by
//! [`compat::normalize`] (`torch_dtype`/`dtype`, `type`/`rope_type`, transformers 5's
//! `rope_parameters`), then parsed into this struct; categorical keys are enums ([`types`]).
//! Reference: `transformers/models/deepseek_v3/configuration_deepseek_v3.py`; the published
//! files this is tested against are under `tests/fixtures/configs/`.

mod compat;
mod types;
mod validate;

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};

pub use types::{
    ActivationScheme, Dtype, Fp8Format, HiddenAct, ModelType, QuantMethod, QuantizationConfig,
    RopeScaling, RopeType, ScoringFunc, TokenIds, TopkMethod,
};

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
fn default_act() -> HiddenAct {
    HiddenAct::Silu
}

/// The model configuration, as in `config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Config {
    #[serde(default)]
    pub model_type: Option<ModelType>,
    /// The transformers model classes (`DeepseekV3ForCausalLM`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub architectures: Vec<String>,
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
    #[serde(default)]
    pub dtype: Option<Dtype>,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default = "default_act")]
    pub hidden_act: HiddenAct,
    /// transformers' `head_dim` (= `qk_rope_head_dim`, written by transformers ≥ 4.48).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
    /// transformers' `qk_head_dim` (= nope + rope).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qk_head_dim: Option<usize>,
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

/// Reads `<dir>/config.json` and parses it with `parse`; read and parse errors name the file.
pub(crate) fn read_config<T>(dir: &Path, parse: impl Fn(&str) -> Result<T>) -> Result<T> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| ModelError::ConfigRead {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    parse(&text).map_err(|e| match e {
        ModelError::ConfigRead { reason, .. } => ModelError::ConfigRead { path, reason },
        other => other,
    })
}

impl Config {
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
        if value.get("model_type").and_then(|v| v.as_str()) == Some("deepseek_v4") {
            return Err(ModelError::InvalidConfig(
                "model_type `deepseek_v4` is the DeepSeek-V4 layout: load it with \
                 `moe_model::v4::V4Config`"
                    .into(),
            ));
        }
        let cfg: Config = serde_json::from_value(compat::normalize(value)?).map_err(read)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// True for the V3 generation (sigmoid + noaux_tc defaults): every model type but
    /// `deepseek_v2` (and an unnamed type whose architecture is `DeepseekV2ForCausalLM`).
    fn is_v3(&self) -> bool {
        match &self.model_type {
            Some(ModelType::DeepseekV2) => false,
            Some(ModelType::Other(_)) | None => !self
                .architectures
                .iter()
                .any(|a| a == "DeepseekV2ForCausalLM"),
            Some(_) => true,
        }
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
        (q.quant_method == QuantMethod::Fp8).then(|| q.weight_block_size.unwrap_or([128, 128]))
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
}

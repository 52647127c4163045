//! The categorical and nested fields of `config.json`: one enum per categorical key, with the
//! spellings found in published checkpoints, and the nested `rope_scaling` /
//! `quantization_config` objects. A value this engine recognises but cannot run (a GELU
//! activation, linear RoPE scaling, AWQ weights) parses, and [`super::Config::validate`] rejects
//! it with a message that names it; a value nobody publishes fails to parse.

use serde::{Deserialize, Serialize};

/// `model_type`: the DeepSeek-V2/V3 layouts and the models of other labs that reuse them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelType {
    /// DeepSeek-V2, V2-Lite, V2.5 (softmax gate, `group_limited_greedy` or `greedy`).
    DeepseekV2,
    /// DeepSeek-V3, V3-0324, R1, V3.1 (sigmoid gate, `noaux_tc`).
    DeepseekV3,
    /// Moonshot's Kimi-K2: the V3 layout with 384 experts and a single expert group.
    KimiK2,
    /// Any other name; accepted only when `architectures` names a DeepSeek-V2/V3 class.
    #[serde(untagged)]
    Other(String),
}

impl ModelType {
    /// The `config.json` spelling.
    pub fn as_str(&self) -> &str {
        match self {
            ModelType::DeepseekV2 => "deepseek_v2",
            ModelType::DeepseekV3 => "deepseek_v3",
            ModelType::KimiK2 => "kimi_k2",
            ModelType::Other(s) => s,
        }
    }
}

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

/// `hidden_act` (transformers' `ACT2FN` names). Only SiLU is used by this family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HiddenAct {
    /// `silu`; `swish` is the same function under its other name.
    #[serde(alias = "swish")]
    Silu,
    Gelu,
    GeluNew,
    GeluPytorchTanh,
    Relu,
    Tanh,
}

/// The RoPE scaling type (`type` or `rope_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RopeType {
    /// No scaling (transformers 5 writes it in `rope_parameters`).
    Default,
    Linear,
    Dynamic,
    Yarn,
    Longrope,
    Llama3,
}

impl RopeType {
    /// The `config.json` spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            RopeType::Default => "default",
            RopeType::Linear => "linear",
            RopeType::Dynamic => "dynamic",
            RopeType::Yarn => "yarn",
            RopeType::Longrope => "longrope",
            RopeType::Llama3 => "llama3",
        }
    }
}

/// `rope_scaling` (only YaRN is used by this family). `rope_parameters` and the `rope_type`
/// spelling are folded into this shape before parsing (see `compat`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RopeScaling {
    #[serde(rename = "type")]
    pub kind: RopeType,
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

/// `quantization_config.quant_method` (transformers' `QuantizationMethod` spellings).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QuantMethod {
    /// Block-scaled FP8 (the official DeepSeek-V3/R1 and Kimi-K2 checkpoints).
    Fp8,
    #[serde(rename = "compressed-tensors")]
    CompressedTensors,
    Awq,
    Gptq,
    Bitsandbytes,
    FbgemmFp8,
    Mxfp4,
    /// A name transformers does not know either; rejected by validation.
    #[serde(untagged)]
    Other(String),
}

impl QuantMethod {
    /// The `config.json` spelling.
    pub fn as_str(&self) -> &str {
        match self {
            QuantMethod::Fp8 => "fp8",
            QuantMethod::CompressedTensors => "compressed-tensors",
            QuantMethod::Awq => "awq",
            QuantMethod::Gptq => "gptq",
            QuantMethod::Bitsandbytes => "bitsandbytes",
            QuantMethod::FbgemmFp8 => "fbgemm_fp8",
            QuantMethod::Mxfp4 => "mxfp4",
            QuantMethod::Other(s) => s,
        }
    }
}

/// `quantization_config.fmt` of FP8 checkpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Fp8Format {
    E4m3,
    E5m2,
}

/// `quantization_config.activation_scheme`. Activations are computed in bf16/f32 here, so both
/// are served (static input scales are ignored).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ActivationScheme {
    Dynamic,
    Static,
}

/// `quantization_config` of the official FP8 checkpoints (transformers' `FineGrainedFP8Config`
/// when re-saved: `fmt` dropped, `modules_to_not_convert` added and ignored).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QuantizationConfig {
    pub quant_method: QuantMethod,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fmt: Option<Fp8Format>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activation_scheme: Option<ActivationScheme>,
    /// `[block_rows, block_cols]` of the `weight_scale_inv` grid.
    #[serde(default)]
    pub weight_block_size: Option<[usize; 2]>,
}

/// The checkpoint's dtype (`dtype`, or `torch_dtype` before transformers 4.56).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Dtype {
    #[serde(rename = "bfloat16", alias = "bf16")]
    Bfloat16,
    #[serde(rename = "float16", alias = "fp16", alias = "half")]
    Float16,
    #[serde(rename = "float32", alias = "fp32", alias = "float")]
    Float32,
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

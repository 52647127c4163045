//! Random-weight checkpoints in the Hugging Face DeepSeek-V3 layout (config.json, safetensors,
//! tokenizer files), so tests, benchmarks and the local cluster need no download.
//!
//! Presets: `tiny` has the shape of `tests/fixtures/models/tiny-dsv3` and its initialisation
//! scheme (normal(0, 0.2) weights, router N(0, 0.25²), correction bias N(0, 0.1²), norms
//! N(1, 0.1²)); `bench` is a 1B-parameter model (256 experts, top-8, 117 MB of active bf16
//! weights per token) with normal(0, 1/√fan_in) weights. Each tensor's values come from a
//! ChaCha stream seeded by (seed, tensor name, chunk), so a seed always gives the same bytes,
//! tensors generate in parallel, and the file is written one tensor at a time.

use std::borrow::Cow;
use std::path::Path;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use rayon::prelude::*;
use safetensors::{Dtype, View};

use crate::config::{
    Config, Dtype as ConfigDtype, HiddenAct, ModelType, ScoringFunc, TokenIds, TopkMethod,
};
use crate::error::{ModelError, Result};

/// A generated model's shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preset {
    /// The shape of the tiny golden model (hidden 64, 4 layers, 256 experts).
    Tiny,
    /// Hidden 1024, 6 layers (1 dense), 256 experts of width 256, top-8 of 8 groups/top-4.
    Bench,
}

impl std::str::FromStr for Preset {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "tiny" => Ok(Preset::Tiny),
            "bench" => Ok(Preset::Bench),
            other => Err(format!("unknown preset `{other}` (tiny, bench)")),
        }
    }
}

/// Storage dtype of generated weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GenDtype {
    Bf16,
    F32,
}

impl std::str::FromStr for GenDtype {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "bf16" | "bfloat16" => Ok(GenDtype::Bf16),
            "f32" | "float32" => Ok(GenDtype::F32),
            other => Err(format!("unknown dtype `{other}` (bf16, f32)")),
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn config(
    hidden: usize,
    inter: usize,
    moe_inter: usize,
    layers: usize,
    heads: usize,
    (q_lora, kv_lora, nope, rope, v): (usize, usize, usize, usize, usize),
    max_pos: usize,
    dtype: GenDtype,
) -> Config {
    Config {
        model_type: Some(ModelType::DeepseekV3),
        architectures: vec!["DeepseekV3ForCausalLM".into()],
        vocab_size: 512,
        hidden_size: hidden,
        intermediate_size: inter,
        moe_intermediate_size: Some(moe_inter),
        num_hidden_layers: layers,
        first_k_dense_replace: 1,
        moe_layer_freq: 1,
        num_attention_heads: heads,
        num_key_value_heads: Some(heads),
        q_lora_rank: Some(q_lora),
        kv_lora_rank: kv_lora,
        qk_nope_head_dim: nope,
        qk_rope_head_dim: rope,
        v_head_dim: v,
        n_routed_experts: Some(256),
        num_experts_per_tok: Some(8),
        n_group: 8,
        topk_group: 4,
        n_shared_experts: Some(1),
        routed_scaling_factor: 2.5,
        norm_topk_prob: true,
        scoring_func: Some(ScoringFunc::Sigmoid),
        topk_method: Some(TopkMethod::NoauxTc),
        rope_theta: 10000.0,
        rope_scaling: None,
        rope_interleave: true,
        max_position_embeddings: max_pos,
        rms_norm_eps: 1e-6,
        tie_word_embeddings: false,
        num_nextn_predict_layers: 0,
        quantization_config: None,
        dtype: Some(match dtype {
            GenDtype::Bf16 => ConfigDtype::Bfloat16,
            GenDtype::F32 => ConfigDtype::Float32,
        }),
        attention_bias: false,
        hidden_act: HiddenAct::Silu,
        head_dim: None,
        qk_head_dim: None,
        bos_token_id: Some(0),
        eos_token_id: Some(TokenIds::One(1)),
    }
}

impl Preset {
    /// The preset's configuration.
    pub fn config(self, dtype: GenDtype) -> Config {
        match self {
            Preset::Tiny => config(64, 128, 32, 4, 4, (32, 32, 16, 8, 16), 2048, dtype),
            Preset::Bench => config(1024, 2816, 256, 6, 16, (256, 128, 64, 32, 64), 4096, dtype),
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Init {
    mean: f32,
    std: f32,
}

/// Every tensor of a DeepSeek-V3 checkpoint for `cfg`, with its initialisation.
fn tensors(cfg: &Config, preset: Preset) -> Vec<(String, Vec<usize>, Init, bool)> {
    let tiny = preset == Preset::Tiny;
    let lin = |fan_in: usize| Init {
        mean: 0.0,
        std: if tiny {
            0.2
        } else {
            1.0 / (fan_in as f32).sqrt()
        },
    };
    let norm = Init {
        mean: 1.0,
        std: 0.1,
    };
    let (h, v) = (cfg.hidden_size, cfg.vocab_size);
    let heads = cfg.num_attention_heads;
    let qk = cfg.qk_head_dim();
    let mut out = vec![
        (
            "model.embed_tokens.weight".to_string(),
            vec![v, h],
            Init {
                mean: 0.0,
                std: if tiny { 0.2 } else { 1.0 },
            },
            false,
        ),
        ("model.norm.weight".into(), vec![h], norm, false),
        ("lm_head.weight".into(), vec![v, h], lin(h), false),
    ];
    let mlp = |out: &mut Vec<_>, p: String, inter: usize| {
        out.push((
            format!("{p}.gate_proj.weight"),
            vec![inter, h],
            lin(h),
            false,
        ));
        out.push((format!("{p}.up_proj.weight"), vec![inter, h], lin(h), false));
        out.push((
            format!("{p}.down_proj.weight"),
            vec![h, inter],
            lin(inter),
            false,
        ));
    };
    let moe = cfg.moe();
    for l in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{l}");
        let q_lora = cfg.q_lora_rank.unwrap_or(0);
        let kv = cfg.kv_lora_rank;
        out.extend([
            (format!("{p}.input_layernorm.weight"), vec![h], norm, false),
            (
                format!("{p}.post_attention_layernorm.weight"),
                vec![h],
                norm,
                false,
            ),
            (
                format!("{p}.self_attn.q_a_proj.weight"),
                vec![q_lora, h],
                lin(h),
                false,
            ),
            (
                format!("{p}.self_attn.q_a_layernorm.weight"),
                vec![q_lora],
                norm,
                false,
            ),
            (
                format!("{p}.self_attn.q_b_proj.weight"),
                vec![heads * qk, q_lora],
                lin(q_lora),
                false,
            ),
            (
                format!("{p}.self_attn.kv_a_proj_with_mqa.weight"),
                vec![kv + cfg.qk_rope_head_dim, h],
                lin(h),
                false,
            ),
            (
                format!("{p}.self_attn.kv_a_layernorm.weight"),
                vec![kv],
                norm,
                false,
            ),
            (
                format!("{p}.self_attn.kv_b_proj.weight"),
                vec![heads * (cfg.qk_nope_head_dim + cfg.v_head_dim), kv],
                lin(kv),
                false,
            ),
            (
                format!("{p}.self_attn.o_proj.weight"),
                vec![h, heads * cfg.v_head_dim],
                lin(heads * cfg.v_head_dim),
                false,
            ),
        ]);
        match &moe {
            Some(m) if cfg.is_moe_layer(l) => {
                let gate = Init {
                    mean: 0.0,
                    std: if tiny { 0.25 } else { 1.0 / (h as f32).sqrt() },
                };
                out.push((
                    format!("{p}.mlp.gate.weight"),
                    vec![m.n_routed_experts, h],
                    gate,
                    false,
                ));
                out.push((
                    format!("{p}.mlp.gate.e_score_correction_bias"),
                    vec![m.n_routed_experts],
                    Init {
                        mean: 0.0,
                        std: 0.1,
                    },
                    true,
                ));
                for e in 0..m.n_routed_experts {
                    mlp(
                        &mut out,
                        format!("{p}.mlp.experts.{e}"),
                        m.moe_intermediate_size,
                    );
                }
                mlp(
                    &mut out,
                    format!("{p}.mlp.shared_experts"),
                    m.moe_intermediate_size * m.n_shared_experts,
                );
            }
            _ => mlp(&mut out, format!("{p}.mlp"), cfg.intermediate_size),
        }
    }
    out
}

/// FNV-1a, to derive a per-tensor seed from its name.
fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

const CHUNK: usize = 1 << 16;

/// One tensor, generated when the writer asks for its bytes.
struct Lazy {
    shape: Vec<usize>,
    dtype: Dtype,
    init: Init,
    seed: u64,
}

impl View for &Lazy {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        let n: usize = self.shape.iter().product();
        let size = if self.dtype == Dtype::BF16 { 2 } else { 4 };
        let mut bytes = vec![0u8; n * size];
        let dist =
            Normal::new(self.init.mean, self.init.std).unwrap_or_else(|_| unreachable!("std >= 0"));
        bytes
            .par_chunks_mut(CHUNK * size)
            .enumerate()
            .for_each(|(c, out)| {
                let mut rng = ChaCha8Rng::seed_from_u64(
                    self.seed ^ (c as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
                );
                for b in out.chunks_exact_mut(size) {
                    let v: f32 = dist.sample(&mut rng);
                    if size == 2 {
                        b.copy_from_slice(&half::bf16::from_f32(v).to_bits().to_le_bytes());
                    } else {
                        b.copy_from_slice(&v.to_le_bytes());
                    }
                }
            });
        Cow::Owned(bytes)
    }
    fn data_len(&self) -> usize {
        self.shape.iter().product::<usize>() * if self.dtype == Dtype::BF16 { 2 } else { 4 }
    }
}

const TOKENIZER: &str = include_str!("../assets/tokenizer/tokenizer.json");
const TOKENIZER_CONFIG: &str = include_str!("../assets/tokenizer/tokenizer_config.json");
const SPECIAL_TOKENS: &str = include_str!("../assets/tokenizer/special_tokens_map.json");
const GENERATION_CONFIG: &str = include_str!("../assets/tokenizer/generation_config.json");

/// Writes a complete model directory for `preset` into `out` (created if needed).
pub fn write_preset(preset: Preset, out: &Path, seed: u64, dtype: GenDtype) -> Result<()> {
    let werr = |path: &Path, e: &dyn std::fmt::Display| ModelError::Write {
        path: path.into(),
        reason: e.to_string(),
    };
    std::fs::create_dir_all(out).map_err(|e| werr(out, &e))?;
    let cfg = preset.config(dtype);
    cfg.validate()?;
    let json = serde_json::to_value(&cfg).map_err(|e| werr(out, &e))?;
    let files = [
        (
            "config.json",
            serde_json::to_string_pretty(&json).map_err(|e| werr(out, &e))?,
        ),
        ("tokenizer.json", TOKENIZER.to_string()),
        ("tokenizer_config.json", TOKENIZER_CONFIG.to_string()),
        ("special_tokens_map.json", SPECIAL_TOKENS.to_string()),
        ("generation_config.json", GENERATION_CONFIG.to_string()),
    ];
    for (name, text) in files {
        let path = out.join(name);
        std::fs::write(&path, text).map_err(|e| werr(&path, &e))?;
    }
    let lazies: Vec<(String, Lazy)> = tensors(&cfg, preset)
        .into_iter()
        .map(|(name, shape, init, keep_f32)| {
            let dtype = if keep_f32 || dtype == GenDtype::F32 {
                Dtype::F32
            } else {
                Dtype::BF16
            };
            let seed = seed.wrapping_mul(0x2545_F491_4F6C_DD1D) ^ name_hash(&name);
            (
                name,
                Lazy {
                    shape,
                    dtype,
                    init,
                    seed,
                },
            )
        })
        .collect();
    let path = out.join("model.safetensors");
    let views = lazies.iter().map(|(n, l)| (n.as_str(), l));
    safetensors::serialize_to_file(views, None, &path).map_err(|e| werr(&path, &e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiny_preset_matches_the_fixture_shape() {
        let fixture: serde_json::Value = serde_json::from_str(include_str!(
            "../../tests/fixtures/models/tiny-dsv3/config.json"
        ))
        .expect("json");
        let ours = serde_json::to_value(Preset::Tiny.config(GenDtype::F32)).expect("json");
        for key in [
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "moe_intermediate_size",
            "num_hidden_layers",
            "first_k_dense_replace",
            "num_attention_heads",
            "q_lora_rank",
            "kv_lora_rank",
            "qk_nope_head_dim",
            "qk_rope_head_dim",
            "v_head_dim",
            "n_routed_experts",
            "num_experts_per_tok",
            "n_group",
            "topk_group",
            "n_shared_experts",
            "routed_scaling_factor",
            "norm_topk_prob",
            "scoring_func",
            "topk_method",
            "max_position_embeddings",
        ] {
            assert_eq!(ours[key], fixture[key], "{key}");
        }
    }

    #[test]
    fn bench_preset_has_the_stated_active_size() {
        let cfg = Preset::Bench.config(GenDtype::Bf16);
        let all = tensors(&cfg, Preset::Bench);
        let params = |pred: &dyn Fn(&str) -> bool| -> usize {
            all.iter()
                .filter(|(n, ..)| pred(n))
                .map(|(_, s, ..)| s.iter().product::<usize>())
                .sum()
        };
        let total = params(&|_| true);
        let experts = params(&|n| n.contains(".mlp.experts."));
        // Active per token: everything but routed experts, plus 8 of 256 experts per MoE layer.
        let active = total - experts + experts * 8 / 256;
        assert!((1_000_000_000..1_100_000_000).contains(&total), "{total}");
        assert!((56_000_000..60_000_000).contains(&active), "{active}"); // ≈ 117 MB in bf16
    }
}

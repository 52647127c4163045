//! Random-weight DeepSeek-V4 checkpoints (`moe gen-model --preset tiny-v4 | bench-v4`), in the
//! HF-saved spelling, written by the same lazy, seeded writer as the V3 presets.
//!
//! `tiny-v4` has the shape of `tests/fixtures/models/tiny-dsv4` (hidden 64, 5 layers: 2 sliding,
//! CSA, HCA, CSA; 384 experts top-6, 3 hash layers) and its initialisation scheme (normal(0, 0.2)
//! weights, router N(0, 0.25²), bias N(0, 0.1²), norms N(1, 0.1²), sinks N(0, 1), `ape` N(0, 0.5²),
//! HC base N(0, 0.5²), HC scales around 0.45). `bench-v4` is a V4-Flash-like shape scaled to
//! about a billion parameters: hidden 1024, 8 layers with the Flash schedule (2 sliding, then
//! CSA/HCA alternating), 256 experts top-6 of width 160, 3 hash layers, normal(0, 1/√fan_in).

use std::path::Path;

use serde_json::json;

use super::names::{Names, Spelling};
use super::{AttnLayerType, V4Config};
use crate::error::{ModelError, Result};
use crate::presets::{GenDtype, Init, write_dir};

/// A generated V4 model's shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum V4Preset {
    /// The shape of the tiny golden model.
    Tiny,
    /// V4-Flash-like, ~1B parameters.
    Bench,
}

impl std::str::FromStr for V4Preset {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "tiny-v4" => Ok(V4Preset::Tiny),
            "bench-v4" => Ok(V4Preset::Bench),
            other => Err(format!("unknown V4 preset `{other}` (tiny-v4, bench-v4)")),
        }
    }
}

impl V4Preset {
    /// The preset's `config.json`.
    pub fn config_json(self, dtype: GenDtype) -> serde_json::Value {
        let dtype = if dtype == GenDtype::F32 {
            "float32"
        } else {
            "bfloat16"
        };
        let (hid, layers, heads, hd, ql, groups, olr, window) = match self {
            V4Preset::Tiny => (64, 5, 8, 32, 32, 4, 16, 12),
            V4Preset::Bench => (1024, 8, 16, 128, 256, 4, 256, 128),
        };
        let (experts, inter, rates, ih, ihd, topk, max_pos) = match self {
            V4Preset::Tiny => (384, 32, (4, 8), 8, 16, 3, 16384),
            V4Preset::Bench => (256, 160, (4, 128), 16, 64, 64, 65536),
        };
        let layer_types: Vec<&str> = (0..layers)
            .map(|l| match (self, l) {
                (V4Preset::Tiny, 3) => "heavily_compressed_attention",
                (_, 0 | 1) => "sliding_attention",
                (_, l) if l % 2 == 0 => "compressed_sparse_attention",
                _ => "heavily_compressed_attention",
            })
            .collect();
        let mut cfg = json!({
            "architectures": ["DeepseekV4ForCausalLM"],
            "model_type": "deepseek_v4",
            "vocab_size": 512,
            "hidden_size": hid,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": 1,
            "head_dim": hd,
            "qk_rope_head_dim": hd / 4,
            "partial_rotary_factor": 0.25,
            "q_lora_rank": ql,
            "o_groups": groups,
            "o_lora_rank": olr,
            "sliding_window": window,
            "layer_types": layer_types,
            "compress_rates": {"compressed_sparse_attention": rates.0,
                               "heavily_compressed_attention": rates.1},
            "index_n_heads": ih,
            "index_head_dim": ihd,
            "index_topk": topk,
        });
        let rest = json!({
            "rope_theta": 10000.0,
            "compress_rope_theta": 160000.0,
            "rope_parameters": {"rope_type": "yarn", "factor": 4.0,
                                "original_max_position_embeddings": max_pos / 4,
                                "beta_fast": 32, "beta_slow": 1},
            "max_position_embeddings": max_pos,
            "num_hash_layers": 3,
            "n_routed_experts": experts,
            "num_experts_per_tok": 6,
            "n_shared_experts": 1,
            "moe_intermediate_size": inter,
            "scoring_func": "sqrtsoftplus",
            "norm_topk_prob": true,
            "routed_scaling_factor": 2.5,
            "swiglu_limit": if self == V4Preset::Tiny { 2.5 } else { 10.0 },
            "hc_mult": 4,
            "hc_sinkhorn_iters": 20,
            "hc_eps": 1e-6,
            "rms_norm_eps": 1e-6,
            "hidden_act": "silu",
            "tie_word_embeddings": false,
            "num_nextn_predict_layers": 0,
            "bos_token_id": 0,
            "eos_token_id": 1,
            "dtype": dtype,
        });
        if let (Some(a), Some(b)) = (cfg.as_object_mut(), rest.as_object()) {
            a.extend(b.clone());
        }
        cfg
    }

    /// The preset's configuration, parsed and validated.
    pub fn config(self, dtype: GenDtype) -> Result<V4Config> {
        V4Config::from_json(&self.config_json(dtype).to_string())
    }
}

type Spec = (String, Vec<usize>, Init, bool);
/// A hash table to generate: name, shape, exclusive bound of its ids.
type Table = (String, Vec<usize>, usize);

/// Every floating-point tensor of a V4 checkpoint for `cfg` (HF-saved names), and the hash
/// tables `(name, shape, bound)`.
fn tensors(cfg: &V4Config, tiny: bool) -> (Vec<Spec>, Vec<Table>) {
    let names = Names {
        spelling: Spelling::HfSaved,
    };
    let lin = |fan_in: usize| Init {
        mean: 0.0,
        std: if tiny {
            0.2
        } else {
            1.0 / (fan_in as f32).sqrt()
        },
    };
    let normal = |std: f32| Init { mean: 0.0, std };
    let norm = Init {
        mean: 1.0,
        std: 0.1,
    };
    let (d, v, n) = (cfg.hidden_size, cfg.vocab_size, cfg.hc_mult);
    let (h, hd, ql) = (cfg.num_attention_heads, cfg.head_dim, cfg.q_lora_rank);
    let (g, r, e, inter) = (
        cfg.o_groups,
        cfg.o_lora_rank,
        cfg.n_routed_experts,
        cfg.moe_intermediate_size,
    );
    let mut out: Vec<Spec> = vec![
        (
            names.global("embed.weight"),
            vec![v, d],
            normal(if tiny { 0.2 } else { 1.0 }),
            false,
        ),
        (names.global("norm.weight"), vec![d], norm, true),
        (names.global("head.weight"), vec![v, d], lin(d), false),
        (names.global("hc_head_fn"), vec![n, n * d], lin(n * d), true),
        (names.global("hc_head_base"), vec![n], normal(0.5), true),
        (
            names.global("hc_head_scale"),
            vec![1],
            Init {
                mean: 0.45,
                std: 0.05,
            },
            true,
        ),
    ];
    let mut tables = Vec::new();
    for l in 0..cfg.num_hidden_layers {
        let mut push = |rest: &str, shape: Vec<usize>, init: Init, f32: bool| {
            out.push((names.layer(l, rest), shape, init, f32));
        };
        for which in ["attn", "ffn"] {
            push(
                &format!("hc_{which}_fn"),
                vec![(2 + n) * n, n * d],
                lin(n * d),
                true,
            );
            push(
                &format!("hc_{which}_base"),
                vec![(2 + n) * n],
                normal(0.5),
                true,
            );
            push(
                &format!("hc_{which}_scale"),
                vec![3],
                Init {
                    mean: 0.45,
                    std: 0.05,
                },
                true,
            );
            push(&format!("{which}_norm.weight"), vec![d], norm, true);
        }
        push("attn.wq_a.weight", vec![ql, d], lin(d), false);
        push("attn.q_norm.weight", vec![ql], norm, true);
        push("attn.wq_b.weight", vec![h * hd, ql], lin(ql), false);
        push("attn.wkv.weight", vec![hd, d], lin(d), false);
        push("attn.norm.weight", vec![hd], norm, true);
        push(
            "attn.wo_a.weight",
            vec![g * r, h * hd / g],
            lin(h * hd / g),
            false,
        );
        push("attn.wo_b.weight", vec![d, g * r], lin(g * r), false);
        push("attn.attn_sink", vec![h], normal(1.0), true);
        let mut compressor = |prefix: &str, dim: usize, c: usize, m: usize| {
            push(
                &format!("{prefix}.wkv.weight"),
                vec![c * dim, d],
                lin(d),
                false,
            );
            push(
                &format!("{prefix}.wgate.weight"),
                vec![c * dim, d],
                lin(d),
                false,
            );
            push(
                &format!("{prefix}.ape"),
                vec![m, c * dim],
                normal(0.5),
                true,
            );
            push(&format!("{prefix}.norm.weight"), vec![dim], norm, true);
        };
        match cfg.layer_types[l] {
            AttnLayerType::Sliding => {}
            AttnLayerType::Hca => compressor("attn.compressor", hd, 1, cfg.compress_rates.hca),
            AttnLayerType::Csa => {
                let m = cfg.compress_rates.csa;
                compressor("attn.compressor", hd, 2, m);
                compressor("attn.indexer.compressor", cfg.index_head_dim, 2, m);
                let (ih, ihd) = (cfg.index_n_heads, cfg.index_head_dim);
                push(
                    "attn.indexer.wq_b.weight",
                    vec![ih * ihd, ql],
                    lin(ql),
                    false,
                );
                push(
                    "attn.indexer.weights_proj.weight",
                    vec![ih, d],
                    lin(d),
                    false,
                );
            }
        }
        let gate_std = if tiny { 0.25 } else { 1.0 / (d as f32).sqrt() };
        push("ffn.gate.weight", vec![e, d], normal(gate_std), false);
        if cfg.is_hash_layer(l) {
            tables.push((
                names.layer(l, "ffn.gate.tid2eid"),
                vec![v, cfg.num_experts_per_tok],
                e,
            ));
        } else {
            push("ffn.gate.bias", vec![e], normal(0.1), true);
        }
        let mut mlp = |prefix: String| {
            push(
                &format!("{prefix}.w1.weight"),
                vec![inter, d],
                lin(d),
                false,
            );
            push(
                &format!("{prefix}.w3.weight"),
                vec![inter, d],
                lin(d),
                false,
            );
            push(
                &format!("{prefix}.w2.weight"),
                vec![d, inter],
                lin(inter),
                false,
            );
        };
        mlp("ffn.shared_experts".into());
        for x in 0..e {
            mlp(format!("ffn.experts.{x}"));
        }
    }
    (out, tables)
}

/// Writes a complete V4 model directory for `preset` into `out` (created if needed).
pub fn write_v4_preset(preset: V4Preset, out: &Path, seed: u64, dtype: GenDtype) -> Result<()> {
    let json = preset.config_json(dtype);
    let cfg = V4Config::from_json(&json.to_string()).map_err(|e| match e {
        ModelError::InvalidConfig(m) => ModelError::InvalidConfig(format!("{preset:?}: {m}")),
        other => other,
    })?;
    let (specs, tables) = tensors(&cfg, preset == V4Preset::Tiny);
    write_dir(out, &json, cfg.vocab_size, specs, tables, (seed, dtype))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiny_v4_has_the_fixture_shape_and_bench_v4_about_a_billion_parameters() {
        let fixture = V4Config::from_dir(
            &Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/models/tiny-dsv4"),
        )
        .expect("fixture config");
        let mut tiny = V4Preset::Tiny.config(GenDtype::F32).expect("tiny-v4");
        tiny.architectures = fixture.architectures.clone();
        assert_eq!(tiny.layer_types, fixture.layer_types);
        assert_eq!(tiny.mlp_layer_types, fixture.mlp_layer_types);
        assert_eq!(tiny.rope_parameters, fixture.rope_parameters);
        assert_eq!(
            (
                tiny.hidden_size,
                tiny.head_dim,
                tiny.qk_rope_head_dim,
                tiny.index_topk
            ),
            (
                fixture.hidden_size,
                fixture.head_dim,
                fixture.qk_rope_head_dim,
                fixture.index_topk
            )
        );
        let (specs, tables) = tensors(&tiny, true);
        assert_eq!(
            specs.len() + tables.len(),
            5895,
            "the fixture's tensor count"
        );
        let bench = V4Preset::Bench.config(GenDtype::Bf16).expect("bench-v4");
        let (specs, _) = tensors(&bench, false);
        let params: usize = specs
            .iter()
            .map(|(_, s, ..)| s.iter().product::<usize>())
            .sum();
        assert!((0.9e9..1.3e9).contains(&(params as f64)), "{params}");
        use AttnLayerType::{Csa, Hca, Sliding};
        assert_eq!(
            bench.layer_types,
            [Sliding, Sliding, Csa, Hca, Csa, Hca, Csa, Hca]
        );
    }
}

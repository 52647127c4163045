//! The DeepSeek-V4 `config.json` of `tests/fixtures/models/tiny-dsv4` parses into the values its
//! `golden.json` summarises; the legacy spellings (`compress_ratios` with its trailing MTP entry,
//! `compress_rate_csa/hca`, `num_hash_layers`, `qk_rope_head_dim`, flat YaRN keys) resolve to the
//! same configuration; contradictory or impossible fields are rejected with a message naming them.

use std::path::PathBuf;

use moe_model::Config;
use moe_model::config::RopeType;
use moe_model::v4::{AttnLayerType, MlpLayerType, V4Config, V4ScoringFunc};
use serde_json::{Value, json};

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/models/tiny-dsv4")
}

fn base() -> Value {
    let text = std::fs::read_to_string(fixture().join("config.json")).expect("config.json");
    serde_json::from_str(&text).expect("json")
}

fn parse(v: &Value) -> Result<V4Config, String> {
    V4Config::from_json(&v.to_string()).map_err(|e| e.to_string())
}

fn edited(f: impl FnOnce(&mut serde_json::Map<String, Value>)) -> Value {
    let mut v = base();
    f(v.as_object_mut().expect("object"));
    v
}

#[test]
fn fixture_config_resolves_to_the_golden_summary() {
    let cfg = V4Config::from_dir(&fixture()).expect("tiny-dsv4 config");
    let text = std::fs::read_to_string(fixture().join("golden/golden.json")).expect("golden");
    let golden: Value = serde_json::from_str(&text).expect("golden json");
    let s = &golden["config_summary"];
    let n = |k: &str| s[k].as_u64().unwrap_or_else(|| panic!("{k}")) as usize;
    assert_eq!(cfg.vocab_size, n("vocab_size"));
    assert_eq!(cfg.hidden_size, n("hidden_size"));
    assert_eq!(cfg.num_hidden_layers, n("num_hidden_layers"));
    assert_eq!(cfg.num_attention_heads, n("num_attention_heads"));
    assert_eq!(cfg.head_dim, n("head_dim"));
    assert_eq!(cfg.qk_rope_head_dim, n("qk_rope_head_dim"));
    assert_eq!(cfg.o_groups, n("o_groups"));
    assert_eq!(cfg.o_lora_rank, n("o_lora_rank"));
    assert_eq!(cfg.sliding_window, n("sliding_window"));
    assert_eq!(cfg.index_topk, n("index_topk"));
    assert_eq!(cfg.n_routed_experts, n("n_routed_experts"));
    assert_eq!(cfg.num_experts_per_tok, n("num_experts_per_tok"));
    assert_eq!(cfg.hc_mult, n("hc_mult"));
    assert_eq!(cfg.hc_sinkhorn_iters, n("hc_sinkhorn_iters"));
    assert_eq!(cfg.swiglu_limit, s["swiglu_limit"].as_f64().expect("limit"));
    assert_eq!(cfg.scoring_func, V4ScoringFunc::Sqrtsoftplus);
    let expect_layers: Vec<AttnLayerType> =
        serde_json::from_value(s["layer_types"].clone()).expect("layer types");
    assert_eq!(cfg.layer_types, expect_layers);
    assert_eq!(
        cfg.layer_types,
        [
            AttnLayerType::Sliding,
            AttnLayerType::Sliding,
            AttnLayerType::Csa,
            AttnLayerType::Hca,
            AttnLayerType::Csa
        ]
    );
    assert_eq!(cfg.compress_rate(2), Some(4));
    assert_eq!(cfg.compress_rate(3), Some(8));
    assert_eq!(cfg.compress_rate(0), None);
    assert_eq!(
        (0..5).filter(|&l| cfg.is_hash_layer(l)).collect::<Vec<_>>(),
        vec![0, 1, 2]
    );
    let c = &cfg.rope_parameters.compress;
    assert_eq!(c.rope_type, RopeType::Yarn);
    assert_eq!((c.rope_theta, c.factor), (160_000.0, Some(4.0)));
    assert_eq!(c.original_max_position_embeddings, Some(4096));
    assert_eq!(c.attention_factor, Some(1.0));
    assert_eq!(cfg.rope_parameters.main.rope_type, RopeType::Default);
    assert_eq!(cfg.rope_parameters.main.rope_theta, 10_000.0);
}

#[test]
fn legacy_spellings_resolve_to_the_same_config() {
    let want = parse(&base()).expect("base");
    // Official-style: per-layer ratios with one trailing MTP entry, scalar rates, hash count,
    // rope width instead of the factor, flat YaRN keys under rope_scaling.
    let legacy = edited(|o| {
        for k in [
            "layer_types",
            "compress_rates",
            "mlp_layer_types",
            "partial_rotary_factor",
        ] {
            o.remove(k);
        }
        o.insert("compress_ratios".into(), json!([0, 0, 4, 8, 4, 0]));
        o.insert("compress_rate_csa".into(), json!(4));
        o.insert("compress_rate_hca".into(), json!(8));
        o.insert("num_hash_layers".into(), json!(3));
        o.remove("rope_parameters");
        o.insert(
            "rope_scaling".into(),
            json!({"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096,
                   "beta_fast": 32, "beta_slow": 1}),
        );
        o.insert("torch_dtype".into(), o["dtype"].clone());
        o.remove("dtype");
    });
    assert_eq!(parse(&legacy).expect("legacy"), want);
    // transformers' flat rope_parameters (YaRN keys plus the main theta).
    let flat = edited(|o| {
        o.insert(
            "rope_parameters".into(),
            json!({"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                   "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1}),
        );
    });
    assert_eq!(parse(&flat).expect("flat"), want);
    // Defaults: no schedules at all gives HF's (2 × HCA, then HCA/CSA; 3 hash layers).
    let defaults = edited(|o| {
        o.remove("layer_types");
        o.remove("mlp_layer_types");
    });
    let d = parse(&defaults).expect("defaults");
    use AttnLayerType::{Csa, Hca};
    assert_eq!(d.layer_types, [Hca, Hca, Hca, Csa, Hca]);
    assert_eq!(
        d.mlp_layer_types[2..],
        [MlpLayerType::HashMoe, MlpLayerType::Moe, MlpLayerType::Moe]
    );
}

#[test]
fn contradictory_and_impossible_fields_are_rejected() {
    let cases: Vec<(&str, Value)> = vec![
        (
            "contradicts compress_ratios",
            edited(|o| {
                o.insert("compress_ratios".into(), json!([0, 4, 4, 8, 4]));
            }),
        ),
        (
            "contradicts compress_rate_csa",
            edited(|o| {
                o.insert("compress_rate_csa".into(), json!(16));
            }),
        ),
        (
            "contradicts num_hash_layers",
            edited(|o| {
                o.insert("num_hash_layers".into(), json!(2));
            }),
        ),
        (
            "qk_rope_head_dim (8) contradicts",
            edited(|o| {
                o.insert("partial_rotary_factor".into(), json!(0.5));
            }),
        ),
        (
            "compress.rope_theta = 160000.0 contradicts",
            edited(|o| {
                o.insert("compress_rope_theta".into(), json!(50000.0));
            }),
        ),
        (
            "compress_ratios entry 16",
            edited(|o| {
                o.remove("layer_types");
                o.insert("compress_ratios".into(), json!([0, 0, 16, 8, 4]));
            }),
        ),
        (
            "layer_types has 4 entries",
            edited(|o| {
                o.insert("layer_types".into(), json!(vec!["sliding_attention"; 4]));
            }),
        ),
        (
            "unknown variant `full_attention`",
            edited(|o| {
                o.insert("layer_types".into(), json!(vec!["full_attention"; 5]));
            }),
        ),
        (
            "unknown variant `topk`",
            edited(|o| {
                o.insert("scoring_func".into(), json!("topk"));
            }),
        ),
        (
            "num_key_value_heads (2) must be 1",
            edited(|o| {
                o.insert("num_key_value_heads".into(), json!(2));
            }),
        ),
        (
            "not divisible by o_groups",
            edited(|o| {
                o.insert("o_groups".into(), json!(3));
            }),
        ),
        (
            "swiglu_limit (0) must be",
            edited(|o| {
                o.insert("swiglu_limit".into(), json!(0.0));
            }),
        ),
        (
            "exceeds n_routed_experts",
            edited(|o| {
                o.insert("num_experts_per_tok".into(), json!(400));
            }),
        ),
        (
            "weight_block_size [64, 64] is not supported",
            edited(|o| {
                o.insert(
                    "quantization_config".into(),
                    json!({"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [64, 64]}),
                );
            }),
        ),
        (
            "scale_fmt \"e4m3\" is not supported",
            edited(|o| {
                o.insert(
                    "quantization_config".into(),
                    json!({"quant_method": "fp8", "scale_fmt": "e4m3"}),
                );
            }),
        ),
        (
            "expert_dtype \"int4\" is not supported",
            edited(|o| {
                o.insert("expert_dtype".into(), json!("int4"));
                o.insert("quantization_config".into(), json!({"quant_method": "fp8"}));
            }),
        ),
        (
            "quantization method `awq` is not supported",
            edited(|o| {
                o.insert("quantization_config".into(), json!({"quant_method": "awq"}));
            }),
        ),
        (
            "is not deepseek_v4",
            edited(|o| {
                o.insert("model_type".into(), json!("deepseek_v3"));
            }),
        ),
    ];
    for (want, cfg) in cases {
        let err = parse(&cfg).expect_err(want);
        assert!(err.contains(want), "expected `{want}` in: {err}");
    }
    // The V3 loader names the V4 one instead of failing on a missing V3 field.
    let err = Config::from_json(&base().to_string()).expect_err("V3 loader refuses V4");
    assert!(err.to_string().contains("v4::V4Config"), "{err}");
}

#[test]
fn fp8_fp4_quantization_configs_are_accepted() {
    // DeepSeek's spelling (expert_dtype at the top level) and transformers' (inside).
    let official = edited(|o| {
        o.insert("expert_dtype".into(), json!("fp4"));
        o.insert(
            "quantization_config".into(),
            json!({"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                   "weight_block_size": [128, 128], "scale_fmt": "ue8m0"}),
        );
    });
    let hf = edited(|o| {
        o.insert(
            "quantization_config".into(),
            json!({"quant_method": "fp8", "weight_block_size": [128, 128],
                   "scale_fmt": "ue8m0", "expert_dtype": "fp4"}),
        );
    });
    for cfg in [official, hf] {
        let c = parse(&cfg).expect("quantized config");
        let q = c.quantization_config.expect("kept");
        assert_eq!(q.weight_block_size, Some([128, 128]));
    }
}

//! Every published `config.json` of the DeepSeek-V2/V3 layouts parses and validates, whichever
//! tool wrote it, and every impossible or contradictory field is rejected with its message.
//!
//! Data: `tests/fixtures/configs/*.json` (written from the published values of DeepSeek-V2,
//! V2-Lite, V2.5, V3, V3-0324, R1 and Kimi-K2, and as transformers 4.51 / 4.57 / 5 re-save
//! them), `cases.json` (what each resolves to) and `invalid.json` (one edit per bad field and
//! the error it must give). No weights are needed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use moe_model::Config;
use moe_model::rope::{Rope, softmax_scale};
use serde_json::Value;

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/configs")
}

fn read(name: &str) -> String {
    std::fs::read_to_string(dir().join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn json(name: &str) -> Value {
    serde_json::from_str(&read(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn parse(name: &str) -> Config {
    Config::from_json(&read(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// The model files (everything but the two tables).
fn model_files() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir())
        .expect("fixture dir")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.ends_with(".json") && n != "cases.json" && n != "invalid.json")
        .collect();
    names.sort();
    names
}

fn cases() -> BTreeMap<String, Value> {
    serde_json::from_value(json("cases.json")).expect("cases.json")
}

#[test]
fn every_published_config_parses_to_its_published_values() {
    let cases = cases();
    assert_eq!(
        cases.keys().cloned().collect::<Vec<_>>(),
        model_files(),
        "cases.json lists every fixture"
    );
    for (name, want) in &cases {
        let cfg = parse(name);
        let moe = cfg.moe().expect("every family member has routed experts");
        let rope_factor = cfg.rope_scaling.as_ref().map(|r| r.factor);
        let got = serde_json::json!({
            "vocab_size": cfg.vocab_size,
            "num_hidden_layers": cfg.num_hidden_layers,
            "n_routed_experts": moe.n_routed_experts,
            "num_experts_per_tok": moe.num_experts_per_tok,
            "n_group": moe.n_group,
            "topk_group": moe.topk_group,
            "scoring_func": moe.scoring_func,
            "topk_method": moe.topk_method,
            "moe_layers": cfg.moe_layers().len(),
            "rope_theta": cfg.rope_theta,
            "yarn_factor": rope_factor,
            "max_position_embeddings": cfg.max_position_embeddings,
            "q_lora_rank": cfg.q_lora_rank,
            "fp8_block": cfg.fp8_block(),
            "dtype": cfg.dtype,
        });
        for (key, value) in want.as_object().expect("case object") {
            if key == "same_as" {
                continue;
            }
            let g = &got[key];
            let equal = match (g.as_f64(), value.as_f64()) {
                (Some(a), Some(b)) => a == b,
                _ => g == value,
            };
            assert!(equal, "{name}: {key} = {g}, published {value}");
        }
        // What we write back (the fingerprint's input) parses to the same config.
        let again = Config::from_json(&serde_json::to_string(&cfg).expect("serialise"))
            .unwrap_or_else(|e| panic!("{name} round trip: {e}"));
        assert_eq!(again, cfg, "{name} round trip");
    }
}

/// What differs between files that describe one model: the keys transformers adds or drops
/// without changing the model.
fn canonical(mut cfg: Config) -> Config {
    cfg.head_dim = None;
    cfg.qk_head_dim = None;
    if let Some(q) = &mut cfg.quantization_config {
        q.fmt = None; // FineGrainedFP8Config drops `fmt` (e4m3 is its only format)
    }
    cfg
}

#[test]
fn a_resaved_config_describes_the_same_model_as_the_published_one() {
    for (name, want) in cases() {
        let Some(orig) = want["same_as"].as_str() else {
            continue;
        };
        let (a, b) = (parse(&name), parse(orig));
        assert_eq!(
            canonical(a.clone()),
            canonical(b.clone()),
            "{name} vs {orig}"
        );
        assert_eq!(a.fingerprint() == b.fingerprint(), a == b, "{name}");
        assert_eq!(Rope::new(&a).inv_freq(), Rope::new(&b).inv_freq(), "{name}");
        assert_eq!(softmax_scale(&a), softmax_scale(&b), "{name}");
    }
}

#[test]
fn kimi_k2_is_the_v3_layout_with_one_group_of_384() {
    let cfg = parse("kimi-k2-instruct.json");
    let moe = cfg.moe().expect("moe");
    assert_eq!(cfg.model_type.as_ref().map(|m| m.as_str()), Some("kimi_k2"));
    assert_eq!(
        (moe.n_routed_experts, moe.n_group, moe.topk_group),
        (384, 1, 1)
    );
    assert_eq!(cfg.moe_layers(), (1..61).collect::<Vec<_>>());
    // beta_fast = beta_slow = 1 (Moonshot's values): the ramp still spans at least one pair.
    let rope = Rope::new(&cfg);
    assert!(rope.inv_freq().iter().all(|f| f.is_finite() && *f > 0.0));
}

#[test]
fn another_labs_model_type_is_served_by_its_architecture() {
    let mut v = json("deepseek-v3.json");
    v["model_type"] = "moonlight".into();
    let cfg = Config::from_json(&v.to_string()).expect("a V3-architecture model");
    assert_eq!(cfg.moe().expect("moe").n_routed_experts, 256);
    v["architectures"] = serde_json::json!(["DeepseekV2ForCausalLM"]);
    v["topk_method"] = Value::Null;
    v["scoring_func"] = Value::Null;
    let cfg = Config::from_json(&v.to_string()).expect("a V2-architecture model");
    assert_eq!(
        cfg.moe().expect("moe").scoring_func,
        moe_model::config::ScoringFunc::Softmax,
        "V2 defaults"
    );
}

/// Sets `path` (dotted for nested keys; empty for the whole document) in `v`.
fn set(v: &mut Value, path: &str, value: Value) {
    if path.is_empty() {
        *v = value;
        return;
    }
    let mut at = v;
    let mut keys = path.split('.').peekable();
    while let Some(k) = keys.next() {
        if keys.peek().is_none() {
            at[k] = value;
            return;
        }
        at = &mut at[k];
    }
}

fn remove(v: &mut Value, path: &str) {
    let (parent, key) = match path.rsplit_once('.') {
        Some((p, k)) => (p.split('.').fold(&mut *v, |at, k| &mut at[k]), k),
        None => (v, path),
    };
    parent.as_object_mut().expect("object").remove(key);
}

#[test]
fn every_impossible_or_contradictory_field_is_rejected_with_its_reason() {
    let cases: Vec<Value> = serde_json::from_value(json("invalid.json")).expect("invalid.json");
    assert!(cases.len() >= 40, "{} cases", cases.len());
    let mut failures = Vec::new();
    for case in &cases {
        let name = case["name"].as_str().expect("name");
        let base = case["base"].as_str().expect("base");
        let mut v = json(base);
        for (path, value) in case["set"].as_object().expect("set") {
            set(&mut v, path, value.clone());
        }
        for path in case["remove"].as_array().expect("remove") {
            remove(&mut v, path.as_str().expect("path"));
        }
        let want = case["error"].as_str().expect("error");
        match Config::from_json(&v.to_string()) {
            Ok(_) => failures.push(format!("{name}: accepted")),
            Err(e) if !e.to_string().contains(want) => {
                failures.push(format!("{name}: `{e}` lacks `{want}`"))
            }
            Err(_) => {}
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

//! Folds the legacy and alternative spellings of a DeepSeek-V4 `config.json` into the one shape
//! [`super::V4Config`] parses, as transformers' `DeepseekV4Config.__post_init__` does, and rejects
//! a file whose two spellings of one field disagree (transformers lets one silently win).
//!
//! - `compress_ratios` (per layer 0 / CSA rate / HCA rate, one extra trailing entry for MTP) →
//!   `layer_types`; absent both, the HF default (2 × HCA, then HCA/CSA alternating).
//! - `compress_rate_csa` / `compress_rate_hca` → `compress_rates`.
//! - `num_hash_layers` (default 3) → `mlp_layer_types`.
//! - `qk_rope_head_dim` ↔ `partial_rotary_factor` (`rope = head_dim · factor`).
//! - `rope_parameters` nested `{main, compress}`, or flat YaRN keys (also under the older
//!   `rope_scaling`), which apply to `compress` only; YaRN's `attention_factor` defaults to 1.0.
//! - `torch_dtype` → `dtype`.

use serde_json::{Map, Value, json};

use crate::error::{ModelError, Result};

fn bad<T>(msg: String) -> Result<T> {
    Err(ModelError::InvalidConfig(msg))
}

fn num_eq(a: &Value, b: &Value) -> bool {
    match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) => (x - y).abs() <= 1e-9 * x.abs().max(1.0),
        _ => a == b,
    }
}

fn usize_of(obj: &Map<String, Value>, key: &str, default: usize) -> Result<usize> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(v) => v.as_u64().map(|v| v as usize).ok_or_else(|| {
            ModelError::InvalidConfig(format!("`{key}` must be an integer, got {v}"))
        }),
    }
}

/// `layer_types` from the legacy per-layer ratios.
fn layers_from_ratios(ratios: &Value, n: usize, csa: usize, hca: usize) -> Result<Vec<Value>> {
    let Some(list) = ratios.as_array() else {
        return bad(format!("compress_ratios must be a list, got {ratios}"));
    };
    if list.len() < n {
        return bad(format!(
            "compress_ratios has {} entries for {n} layers",
            list.len()
        ));
    }
    list.iter()
        .take(n)
        .map(|r| match r.as_u64().map(|r| r as usize) {
            Some(0) => Ok(json!("sliding_attention")),
            Some(r) if r == csa => Ok(json!("compressed_sparse_attention")),
            Some(r) if r == hca => Ok(json!("heavily_compressed_attention")),
            _ => bad(format!(
                "compress_ratios entry {r} is none of 0 (sliding), {csa} (CSA) or {hca} (HCA)"
            )),
        })
        .collect()
}

fn fold_rates(obj: &mut Map<String, Value>) -> Result<(usize, usize)> {
    let given = obj.get("compress_rates").filter(|v| !v.is_null()).cloned();
    let mut rates = match &given {
        None => json!({"compressed_sparse_attention": 4, "heavily_compressed_attention": 128}),
        Some(Value::Object(_)) => given.clone().unwrap_or_default(),
        Some(other) => return bad(format!("compress_rates must be an object, got {other}")),
    };
    for (legacy, key) in [
        ("compress_rate_csa", "compressed_sparse_attention"),
        ("compress_rate_hca", "heavily_compressed_attention"),
    ] {
        let Some(v) = obj.remove(legacy).filter(|v| !v.is_null()) else {
            continue;
        };
        if let Some(old) = given.as_ref().and_then(|g| g.get(key))
            && !num_eq(old, &v)
        {
            return bad(format!(
                "compress_rates.{key} = {old} contradicts {legacy} = {v}"
            ));
        }
        rates[key] = v;
    }
    let get = |k: &str| rates.get(k).and_then(Value::as_u64).map(|v| v as usize);
    let (Some(csa), Some(hca)) = (
        get("compressed_sparse_attention"),
        get("heavily_compressed_attention"),
    ) else {
        return bad(format!(
            "compress_rates must give integer rates for both compressed layer types, got {rates}"
        ));
    };
    obj.insert("compress_rates".into(), rates);
    Ok((csa, hca))
}

fn fold_layer_types(obj: &mut Map<String, Value>, n: usize) -> Result<()> {
    let (csa, hca) = fold_rates(obj)?;
    let from_ratios = match obj.remove("compress_ratios").filter(|v| !v.is_null()) {
        Some(r) => Some(layers_from_ratios(&r, n, csa, hca)?),
        None => None,
    };
    let explicit = match obj.remove("layer_types").filter(|v| !v.is_null()) {
        Some(Value::Array(list)) => Some(list),
        Some(other) => return bad(format!("layer_types must be a list, got {other}")),
        None => None,
    };
    let layers = match (explicit, from_ratios) {
        (Some(mut e), ratios) => {
            if e.len() < n {
                return bad(format!(
                    "layer_types has {} entries for {n} layers",
                    e.len()
                ));
            }
            e.truncate(n);
            if let Some(r) = ratios
                && r != e
            {
                return bad(format!(
                    "layer_types {} contradicts compress_ratios (which give {})",
                    Value::Array(e),
                    Value::Array(r)
                ));
            }
            e
        }
        (None, Some(r)) => r,
        (None, None) => (0..n)
            .map(|i| {
                if i < 2 || i % 2 == 0 {
                    json!("heavily_compressed_attention")
                } else {
                    json!("compressed_sparse_attention")
                }
            })
            .collect(),
    };
    obj.insert("layer_types".into(), Value::Array(layers));
    Ok(())
}

fn fold_mlp_types(obj: &mut Map<String, Value>, n: usize) -> Result<()> {
    let hash = match obj.remove("num_hash_layers").filter(|v| !v.is_null()) {
        Some(v) => Some(v.as_u64().map(|v| v as usize).ok_or_else(|| {
            ModelError::InvalidConfig(format!("num_hash_layers must be an integer, got {v}"))
        })?),
        None => None,
    };
    let from_hash = |k: usize| -> Vec<Value> {
        (0..n)
            .map(|i| json!(if i < k { "hash_moe" } else { "moe" }))
            .collect()
    };
    let types = match obj.remove("mlp_layer_types").filter(|v| !v.is_null()) {
        Some(Value::Array(mut list)) => {
            if list.len() < n {
                return bad(format!(
                    "mlp_layer_types has {} entries for {n} layers",
                    list.len()
                ));
            }
            list.truncate(n);
            if let Some(k) = hash
                && from_hash(k) != list
            {
                return bad(format!(
                    "mlp_layer_types {} contradicts num_hash_layers = {k}",
                    Value::Array(list)
                ));
            }
            list
        }
        Some(other) => return bad(format!("mlp_layer_types must be a list, got {other}")),
        None => from_hash(hash.unwrap_or(3)),
    };
    obj.insert("mlp_layer_types".into(), Value::Array(types));
    Ok(())
}

fn fold_rotary(obj: &mut Map<String, Value>) -> Result<f64> {
    let head_dim = usize_of(obj, "head_dim", 512)?;
    let rope = obj
        .get("qk_rope_head_dim")
        .filter(|v| !v.is_null())
        .cloned();
    let factor = obj.get("partial_rotary_factor").and_then(Value::as_f64);
    let factor = match (factor, rope) {
        (Some(f), Some(r)) => {
            let r = r.as_f64().unwrap_or(f64::NAN);
            if (head_dim as f64 * f - r).abs() > 1e-9 {
                return bad(format!(
                    "qk_rope_head_dim ({r}) contradicts head_dim ({head_dim}) × \
                     partial_rotary_factor ({f})"
                ));
            }
            f
        }
        (Some(f), None) => f,
        (None, Some(r)) => r.as_f64().unwrap_or(f64::NAN) / head_dim as f64,
        (None, None) => 64.0 / 512.0,
    };
    let rope_dim = head_dim as f64 * factor;
    if !rope_dim.is_finite() || rope_dim < 0.0 || rope_dim.fract() != 0.0 {
        return bad(format!(
            "partial_rotary_factor ({factor}) × head_dim ({head_dim}) is not a whole number of dims"
        ));
    }
    obj.insert("partial_rotary_factor".into(), json!(factor));
    obj.insert("qk_rope_head_dim".into(), json!(rope_dim as usize));
    Ok(factor)
}

/// A rope set with `type` folded into `rope_type`, its theta and rotary factor checked or filled.
fn rope_set(
    v: Value,
    what: &str,
    theta: Option<&Value>,
    theta_default: f64,
    factor: f64,
) -> Result<Value> {
    let Value::Object(mut o) = v else {
        return bad(format!("rope_parameters.{what} must be an object, got {v}"));
    };
    if let Some(t) = o.remove("type") {
        match o.get("rope_type") {
            Some(rt) if rt != &t => {
                return bad(format!(
                    "rope_parameters.{what}: rope_type {rt} contradicts type {t}"
                ));
            }
            _ => {
                o.insert("rope_type".into(), t);
            }
        }
    }
    o.entry("rope_type").or_insert(json!("default"));
    match (o.get("rope_theta"), theta) {
        (Some(inner), Some(top)) if !num_eq(inner, top) => {
            return bad(format!(
                "rope_parameters.{what}.rope_theta = {inner} contradicts the top-level value {top}"
            ));
        }
        (Some(_), _) => {}
        (None, top) => {
            let t = top.cloned().unwrap_or(json!(theta_default));
            o.insert("rope_theta".into(), t);
        }
    }
    match o.get("partial_rotary_factor") {
        Some(f) if !num_eq(f, &json!(factor)) => {
            return bad(format!(
                "rope_parameters.{what}.partial_rotary_factor = {f} contradicts {factor}"
            ));
        }
        _ => {
            o.insert("partial_rotary_factor".into(), json!(factor));
        }
    }
    if o.get("rope_type") == Some(&json!("yarn")) {
        o.entry("attention_factor").or_insert(json!(1.0));
    }
    Ok(Value::Object(o))
}

fn fold_rope(obj: &mut Map<String, Value>, factor: f64) -> Result<()> {
    let params = obj.remove("rope_parameters").filter(|v| !v.is_null());
    let scaling = obj.remove("rope_scaling").filter(|v| !v.is_null());
    let theta = obj.get("rope_theta").filter(|v| !v.is_null()).cloned();
    let ctheta = obj
        .get("compress_rope_theta")
        .filter(|v| !v.is_null())
        .cloned();
    let nested = params.as_ref().is_some_and(|p| {
        p.get("main").is_some_and(Value::is_object)
            && p.get("compress").is_some_and(Value::is_object)
    });
    let (main, compress) = if nested {
        let mut p = params.unwrap_or_default();
        let main = p["main"].take();
        let compress = p["compress"].take();
        let compress = rope_set(compress, "compress", ctheta.as_ref(), 160_000.0, factor)?;
        if let Some(s) = scaling {
            let Value::Object(s) = s else {
                return bad(format!("rope_scaling must be an object, got {s}"));
            };
            for (k, v) in s {
                let key = if k == "type" {
                    "rope_type".to_string()
                } else {
                    k
                };
                if let Some(c) = compress.get(&key)
                    && !num_eq(c, &v)
                {
                    return bad(format!(
                        "rope_scaling.{key} = {v} contradicts rope_parameters.compress.{key} = {c}"
                    ));
                }
            }
        }
        (
            rope_set(main, "main", theta.as_ref(), 10_000.0, factor)?,
            compress,
        )
    } else {
        let flat = match (params, scaling) {
            (Some(p), Some(s)) => {
                let strip = |v: &Value| {
                    let mut v = v.clone();
                    if let Some(o) = v.as_object_mut() {
                        o.remove("rope_theta");
                        o.remove("partial_rotary_factor");
                    }
                    v
                };
                if strip(&p) != strip(&s) {
                    return bad(format!("rope_scaling {s} contradicts rope_parameters {p}"));
                }
                p
            }
            (Some(p), None) => p,
            (None, Some(s)) => s,
            (None, None) => json!({}),
        };
        let Value::Object(mut yarn) = flat else {
            return bad(format!("rope_parameters must be an object, got {flat}"));
        };
        yarn.remove("main");
        yarn.remove("compress");
        yarn.remove("partial_rotary_factor");
        // A flat `rope_theta` is the main theta (transformers moves the top-level key there).
        if let Some(t) = yarn.remove("rope_theta")
            && let Some(top) = &theta
            && !num_eq(&t, top)
        {
            return bad(format!(
                "rope_parameters.rope_theta = {t} contradicts rope_theta = {top}"
            ));
        }
        let main = json!({"rope_type": "default"});
        (
            rope_set(main, "main", theta.as_ref(), 10_000.0, factor)?,
            rope_set(
                Value::Object(yarn),
                "compress",
                ctheta.as_ref(),
                160_000.0,
                factor,
            )?,
        )
    };
    obj.insert("rope_theta".into(), main["rope_theta"].clone());
    obj.insert("compress_rope_theta".into(), compress["rope_theta"].clone());
    obj.insert(
        "rope_parameters".into(),
        json!({"main": main, "compress": compress}),
    );
    Ok(())
}

/// Checks the V4-only quantisation keys, which [`crate::config::QuantizationConfig`] does not
/// carry: `expert_dtype` (top level in DeepSeek's config, inside `quantization_config` in
/// transformers') must be `fp4` or `fp8` and `quantization_config.scale_fmt` `ue8m0` (or absent).
/// The loader decides each tensor's format from its dtype, so they are checked, not kept.
fn fold_quantization(obj: &mut Map<String, Value>) -> Result<()> {
    let top = obj.remove("expert_dtype").filter(|v| !v.is_null());
    let q = obj.get("quantization_config").and_then(Value::as_object);
    let inner = q
        .and_then(|q| q.get("expert_dtype"))
        .filter(|v| !v.is_null());
    for ed in top.iter().chain(inner) {
        if !matches!(ed.as_str(), Some("fp4" | "fp8")) {
            return bad(format!(
                "expert_dtype {ed} is not supported (fp4 or fp8 experts)"
            ));
        }
    }
    if let Some(fmt) = q.and_then(|q| q.get("scale_fmt")).filter(|v| !v.is_null())
        && fmt.as_str() != Some("ue8m0")
    {
        return bad(format!(
            "quantization_config.scale_fmt {fmt} is not supported (ue8m0 or absent)"
        ));
    }
    if top.is_some() && q.is_none() {
        return bad("expert_dtype is set but quantization_config is missing".into());
    }
    Ok(())
}

/// Rewrites `cfg` (a parsed V4 `config.json`) into the one shape [`super::V4Config`] parses.
pub fn normalize(mut cfg: Value) -> Result<Value> {
    let Some(obj) = cfg.as_object_mut() else {
        return bad("config.json is not a JSON object".into());
    };
    match obj.get("model_type").and_then(Value::as_str) {
        Some("deepseek_v4") => {}
        other => {
            return bad(format!(
                "model_type {} is not deepseek_v4",
                other.map_or("(missing)".to_string(), |s| format!("`{s}`"))
            ));
        }
    }
    obj.remove("model_type");
    if let Some(old) = obj.remove("torch_dtype") {
        match obj.get("dtype") {
            Some(new) if !new.is_null() && !old.is_null() && new != &old => {
                return bad(format!(
                    "dtype: `dtype` = {new} contradicts `torch_dtype` = {old}"
                ));
            }
            Some(new) if !new.is_null() => {}
            _ => {
                obj.insert("dtype".into(), old);
            }
        }
    }
    fold_quantization(obj)?;
    let n = usize_of(obj, "num_hidden_layers", 43)?;
    fold_layer_types(obj, n)?;
    fold_mlp_types(obj, n)?;
    let factor = fold_rotary(obj)?;
    fold_rope(obj, factor)?;
    Ok(cfg)
}

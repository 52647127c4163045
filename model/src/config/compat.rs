//! Folds the spellings different tools write into one `config.json` shape before it is parsed,
//! and rejects files whose two spellings of one field disagree.
//!
//! - `dtype` (transformers ≥ 4.56) and `torch_dtype` (older, and the DeepSeek/Moonshot uploads).
//! - `rope_scaling.type` (the DeepSeek uploads) and `rope_scaling.rope_type` (transformers 4.x
//!   adds it on load and writes both on save).
//! - `rope_parameters` (transformers 5): `{rope_type, rope_theta, factor, ...}` in place of
//!   `rope_theta` + `rope_scaling`; `rope_type: "default"` means no scaling.
//!
//! Reference: transformers `modeling_rope_utils.py` (`standardize_rope_params`,
//! `rope_config_validation`) and `configuration_utils.py` (`torch_dtype` → `dtype`).

use serde_json::{Map, Value};

use crate::error::{ModelError, Result};

fn contradiction(msg: String) -> ModelError {
    ModelError::InvalidConfig(msg)
}

/// Two JSON values that mean the same (numbers compared as numbers: `40` equals `40.0`).
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| same(v, w)))
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(v, w)| same(v, w))
        }
        _ => a == b,
    }
}

/// Moves `from` into `to` in `obj`; both present must agree.
fn merge_key(obj: &mut Map<String, Value>, to: &str, from: &str, what: &str) -> Result<()> {
    let Some(old) = obj.remove(from) else {
        return Ok(());
    };
    match obj.get(to) {
        Some(new) if !new.is_null() && !old.is_null() && !same(new, &old) => Err(contradiction(
            format!("{what}: `{to}` = {new} contradicts `{from}` = {old}"),
        )),
        Some(new) if !new.is_null() => Ok(()),
        _ => {
            obj.insert(to.into(), old);
            Ok(())
        }
    }
}

/// A rope object with `rope_type` folded into `type`; `None` for null or `type: "default"`.
fn rope_object(v: Value, what: &str) -> Result<Option<Map<String, Value>>> {
    let mut obj = match v {
        Value::Null => return Ok(None),
        Value::Object(o) => o,
        other => {
            return Err(contradiction(format!(
                "{what} must be an object or null, got {other}"
            )));
        }
    };
    merge_key(&mut obj, "type", "rope_type", what)?;
    match obj.get("type") {
        None => Err(contradiction(format!(
            "{what} has no `type` or `rope_type`"
        ))),
        Some(Value::String(t)) if t == "default" => Ok(None),
        Some(_) => Ok(Some(obj)),
    }
}

/// Rewrites `cfg` (a parsed `config.json`) into the one shape [`super::Config`] parses.
pub fn normalize(mut cfg: Value) -> Result<Value> {
    let Some(obj) = cfg.as_object_mut() else {
        return Err(contradiction("config.json is not a JSON object".into()));
    };
    merge_key(obj, "dtype", "torch_dtype", "dtype")?;

    let scaling = match obj.remove("rope_scaling") {
        Some(v) => rope_object(v, "rope_scaling")?,
        None => None,
    };
    let had_scaling_key = scaling.is_some();
    let scaling = match obj.remove("rope_parameters") {
        None | Some(Value::Null) => scaling,
        Some(Value::Object(mut params)) => {
            if let Some(theta) = params.remove("rope_theta") {
                match obj.get("rope_theta") {
                    Some(top) if !same(top, &theta) => {
                        return Err(contradiction(format!(
                            "rope_theta = {top} contradicts rope_parameters.rope_theta = {theta}"
                        )));
                    }
                    _ => {
                        obj.insert("rope_theta".into(), theta);
                    }
                }
            }
            // transformers 5 may also keep per-layer-type keys; none apply to this family.
            params.remove("partial_rotary_factor");
            let from_params = rope_object(Value::Object(params), "rope_parameters")?;
            match (scaling, from_params) {
                (Some(s), Some(p))
                    if !same(&Value::Object(s.clone()), &Value::Object(p.clone())) =>
                {
                    return Err(contradiction(format!(
                        "rope_scaling {} contradicts rope_parameters {}",
                        Value::Object(s),
                        Value::Object(p)
                    )));
                }
                (Some(_), None) if had_scaling_key => {
                    return Err(contradiction(
                        "rope_scaling is set but rope_parameters says rope_type `default`".into(),
                    ));
                }
                (s, p) => p.or(s),
            }
        }
        Some(other) => {
            return Err(contradiction(format!(
                "rope_parameters must be an object, got {other}"
            )));
        }
    };
    obj.insert(
        "rope_scaling".into(),
        scaling.map(Value::Object).unwrap_or(Value::Null),
    );
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn both_rope_type_spellings_fold_into_one() {
        let v =
            normalize(json!({"rope_scaling": {"type": "yarn", "rope_type": "yarn", "factor": 40}}))
                .expect("agree");
        assert_eq!(v["rope_scaling"], json!({"type": "yarn", "factor": 40}));
        let err = normalize(
            json!({"rope_scaling": {"type": "yarn", "rope_type": "linear", "factor": 4}}),
        )
        .expect_err("disagree");
        assert!(err.to_string().contains("contradicts"), "{err}");
    }

    #[test]
    fn rope_parameters_become_theta_and_scaling() {
        let v =
            normalize(json!({"rope_parameters": {"rope_type": "default", "rope_theta": 50000.0}}))
                .expect("default");
        assert_eq!(v["rope_theta"], json!(50000.0));
        assert_eq!(v["rope_scaling"], Value::Null);
        let v = normalize(json!({"rope_theta": 10000,
            "rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0}}))
        .expect("yarn");
        assert_eq!(v["rope_scaling"], json!({"type": "yarn", "factor": 40.0}));
    }

    #[test]
    fn dtype_spellings_must_agree() {
        let v = normalize(json!({"torch_dtype": "bfloat16"})).expect("old spelling");
        assert_eq!(v["dtype"], json!("bfloat16"));
        normalize(json!({"torch_dtype": "bfloat16", "dtype": "bfloat16"})).expect("both agree");
        let err = normalize(json!({"torch_dtype": "bfloat16", "dtype": "float32"})).expect_err("x");
        assert!(err.to_string().contains("contradicts"), "{err}");
    }
}

//! Writes an FP8 + FP4 copy of a DeepSeek-V4 checkpoint in the layout of the official release
//! (`V4.md` → "FP8 / FP4"): dense linears of attention, the indexer's `wq_b` and the shared
//! experts as e4m3fn with one scale per 128×128 block; routed experts as int8-packed e2m1 with a
//! scale per row and 32 columns; the compressors' and indexer's `wkv`/`wgate`/`weights_proj`,
//! the gate, embeddings, head, norms and hyper-connection tensors unchanged. Scales are E8M0
//! bytes (`F8_E8M0`) or float32, under `.weight_scale_inv` or `.scale` (the official suffix is
//! undetermined, so tests write both). For test checkpoints and `gen-model --quantize fp8-fp4`.

use std::collections::BTreeMap;
use std::path::Path;

use safetensors::Dtype;
use safetensors::tensor::TensorView;
use serde_json::json;

use crate::checkpoint::{Checkpoint, fp4, fp8};
use crate::error::{ModelError, Result};

/// How a scale tensor is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScaleFormat {
    /// `true`: `{stem}.scale`; `false`: `{stem}.weight_scale_inv`.
    pub short_suffix: bool,
    /// `true`: E8M0 bytes (`F8_E8M0`); `false`: float32.
    pub e8m0: bool,
}

/// What [`quantize_dir`] writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuantizeOptions {
    pub fp8: ScaleFormat,
    pub fp4: ScaleFormat,
}

impl Default for QuantizeOptions {
    fn default() -> Self {
        let f = ScaleFormat {
            short_suffix: false,
            e8m0: true,
        };
        QuantizeOptions { fp8: f, fp4: f }
    }
}

/// Tensors written per format, and bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QuantizeReport {
    pub fp8: usize,
    pub fp4: usize,
    pub unchanged: usize,
    pub bytes_written: u64,
}

/// How a tensor is quantised, from its name (either spelling) and shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Fp8,
    Fp4,
    Keep,
}

/// The format the official release ships `name` in.
pub fn target(name: &str, shape: &[usize]) -> Target {
    if shape.len() != 2 || !name.ends_with(".weight") {
        return Target::Keep;
    }
    let is = |part: &str| name.contains(part);
    if is(".ffn.experts.") {
        return if shape[1].is_multiple_of(fp4::GROUP) {
            Target::Fp4
        } else {
            Target::Keep
        };
    }
    if is(".compressor.") || is(".weights_proj.") {
        return Target::Keep; // shipped in BF16
    }
    if is(".attn.") || is(".ffn.shared_experts.") {
        return Target::Fp8;
    }
    Target::Keep
}

fn scale_name(weight: &str, f: ScaleFormat) -> String {
    match (f.short_suffix, weight.strip_suffix(".weight")) {
        (true, Some(stem)) => format!("{stem}.scale"),
        _ => format!("{weight}_scale_inv"),
    }
}

/// The stored bytes of a scale tensor.
fn scale_bytes(bytes: Vec<u8>, f: ScaleFormat) -> (Dtype, Vec<u8>) {
    if f.e8m0 {
        return (Dtype::F8_E8M0, bytes);
    }
    let floats = bytes
        .iter()
        .flat_map(|&b| {
            fp4::e8m0_to_f32(b)
                .expect("quantisers write finite scales")
                .to_le_bytes()
        })
        .collect();
    (Dtype::F32, floats)
}

/// Writes the quantised copy of the V4 checkpoint in `src` into `dst` (created if needed): one
/// `model.safetensors`, `config.json` with its `quantization_config`, and every other file of
/// `src` (tokenizer, generation config) copied.
pub fn quantize_dir(src: &Path, dst: &Path, opts: QuantizeOptions) -> Result<QuantizeReport> {
    let io = |path: &Path, e: std::io::Error| ModelError::Checkpoint {
        path: path.into(),
        reason: e.to_string(),
    };
    let ckpt = Checkpoint::open(src, None)?;
    let mut names: Vec<String> = ckpt.names().map(str::to_string).collect();
    names.sort();
    let mut out: BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)> = BTreeMap::new();
    let mut report = QuantizeReport::default();
    for name in &names {
        let shape = ckpt.shape(name).expect("listed").to_vec();
        let dtype = ckpt.dtype(name).expect("listed");
        let float = matches!(dtype, Dtype::F32 | Dtype::BF16 | Dtype::F16);
        match (target(name, &shape), float) {
            (Target::Fp8, true) => {
                let (rows, cols) = (shape[0], shape[1]);
                let w = ckpt.read_f32(name, &shape)?;
                let (values, scales) = fp8::quantize_block(&w, rows, cols, [128, 128]);
                let grid = vec![fp8::blocks(rows, 128), fp8::blocks(cols, 128)];
                let (sd, sb) = scale_bytes(scales, opts.fp8);
                out.insert(name.clone(), (Dtype::F8_E4M3, shape, values));
                out.insert(scale_name(name, opts.fp8), (sd, grid, sb));
                report.fp8 += 1;
            }
            (Target::Fp4, true) => {
                let (rows, cols) = (shape[0], shape[1]);
                let w = ckpt.read_f32(name, &shape)?;
                let (values, scales) = fp4::quantize(&w, rows, cols);
                let (sd, sb) = scale_bytes(scales, opts.fp4);
                out.insert(name.clone(), (Dtype::I8, vec![rows, cols / 2], values));
                out.insert(
                    scale_name(name, opts.fp4),
                    (sd, vec![rows, cols / fp4::GROUP], sb),
                );
                report.fp4 += 1;
            }
            _ => {
                let w = ckpt.read_raw(name)?;
                out.insert(name.clone(), (dtype, shape, w.to_vec()));
                report.unchanged += 1;
            }
        }
    }
    std::fs::create_dir_all(dst).map_err(|e| io(dst, e))?;
    let views: BTreeMap<&str, TensorView<'_>> = out
        .iter()
        .map(|(n, (d, s, b))| {
            let view = TensorView::new(*d, s.clone(), b).map_err(|e| ModelError::Checkpoint {
                path: dst.into(),
                reason: format!("tensor `{n}`: {e}"),
            })?;
            Ok((n.as_str(), view))
        })
        .collect::<Result<_>>()?;
    let file = dst.join("model.safetensors");
    safetensors::serialize_to_file(views, None, &file).map_err(|e| ModelError::Checkpoint {
        path: file.clone(),
        reason: e.to_string(),
    })?;
    report.bytes_written = std::fs::metadata(&file).map_err(|e| io(&file, e))?.len();
    for entry in std::fs::read_dir(src).map_err(|e| io(src, e))? {
        let entry = entry.map_err(|e| io(src, e))?;
        let fname = entry.file_name().to_string_lossy().into_owned();
        if fname.ends_with(".safetensors") || fname.ends_with(".safetensors.index.json") {
            continue;
        }
        if entry.file_type().map_err(|e| io(src, e))?.is_file() {
            std::fs::copy(entry.path(), dst.join(&fname)).map_err(|e| io(&entry.path(), e))?;
        }
    }
    let cfg_path = dst.join("config.json");
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| io(&cfg_path, e))?;
    let mut cfg: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| ModelError::Checkpoint {
            path: cfg_path.clone(),
            reason: e.to_string(),
        })?;
    let mut q = json!({
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [128, 128],
        "expert_dtype": "fp4",
    });
    if opts.fp8.e8m0 && opts.fp4.e8m0 {
        q["scale_fmt"] = json!("ue8m0");
    }
    cfg["quantization_config"] = q;
    let text = serde_json::to_string_pretty(&cfg).expect("json");
    std::fs::write(&cfg_path, text).map_err(|e| io(&cfg_path, e))?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_follow_the_official_layout() {
        let t = |n: &str| target(n, &[64, 64]);
        assert_eq!(t("model.layers.0.attn.wq_a.weight"), Target::Fp8);
        assert_eq!(t("layers.3.attn.indexer.wq_b.weight"), Target::Fp8);
        assert_eq!(t("layers.3.ffn.shared_experts.w2.weight"), Target::Fp8);
        assert_eq!(t("layers.3.ffn.experts.17.w1.weight"), Target::Fp4);
        assert_eq!(t("layers.3.attn.compressor.wkv.weight"), Target::Keep);
        assert_eq!(
            t("layers.3.attn.indexer.compressor.wgate.weight"),
            Target::Keep
        );
        assert_eq!(t("layers.3.attn.indexer.weights_proj.weight"), Target::Keep);
        assert_eq!(t("layers.3.ffn.gate.weight"), Target::Keep);
        assert_eq!(t("head.weight"), Target::Keep);
        assert_eq!(t("model.embed_tokens.weight"), Target::Keep);
        assert_eq!(target("layers.0.attn.attn_sink", &[8]), Target::Keep);
        assert_eq!(target("layers.0.attn.norm.weight", &[32]), Target::Keep);
    }
}

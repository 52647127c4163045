//! Reading quantised weights: FP8 (e4m3fn) with 128×128 block scales (DeepSeek-V3, and V4's
//! dense linears) and int8-packed FP4 (e2m1) with per-32-column scales (V4's routed experts).
//!
//! A weight `….weight` finds its scale tensor as `….weight_scale_inv` (what DeepSeek-V3 ships
//! and transformers writes) or `….scale` (DeepSeek's own inference code's parameter name). Which
//! one the official DeepSeek-V4 release uses is undetermined (`V4.md` → "FP8 / FP4"), so both are
//! accepted; a weight with both is refused as ambiguous. Scales are float32 (or any float dtype)
//! or E8M0 bytes (`F8_E8M0`, or `U8` as `scale_fmt: "ue8m0"` checkpoints may store them), which
//! convert exactly to float32 powers of two at load.

use safetensors::Dtype;

use super::{Checkpoint, Entry, WeightData, fp4, fp8};
use crate::error::{ModelError, Result};

impl Checkpoint {
    /// The scale tensor of weight `name`, if the checkpoint has one: `{name}_scale_inv` or
    /// (for `{stem}.weight`) `{stem}.scale`.
    pub fn scale_name(&self, name: &str) -> Option<String> {
        let inv = format!("{name}_scale_inv");
        let short = name.strip_suffix(".weight").map(|s| format!("{s}.scale"));
        match (self.contains(&inv), short.filter(|s| self.contains(s))) {
            (true, _) => Some(inv),
            (false, Some(s)) => Some(s),
            (false, None) => None,
        }
    }

    fn scale_of(&self, name: &str) -> Result<String> {
        let inv = format!("{name}_scale_inv");
        if let Some(stem) = name.strip_suffix(".weight")
            && self.contains(&inv)
            && self.contains(&format!("{stem}.scale"))
        {
            return Err(self.bad(
                name,
                format!("has two scale tensors, `{inv}` and `{stem}.scale`"),
            ));
        }
        self.scale_name(name)
            .ok_or_else(|| ModelError::MissingTensor {
                name: format!("{inv} (or the `.scale` of `{name}`)"),
            })
    }

    fn bad(&self, name: &str, reason: String) -> ModelError {
        let path = self
            .entries
            .get(name)
            .map_or_else(|| self.dir.clone(), |e| self.files[e.file].0.clone());
        ModelError::Checkpoint {
            path,
            reason: format!("tensor `{name}` {reason}"),
        }
    }

    /// Reads a scale tensor of shape `grid` as float32: float dtypes as they are, E8M0 bytes
    /// (`F8_E8M0` or `U8`) as `2^(b − 127)`. A NaN or non-positive scale is an error.
    pub(super) fn read_scales(&self, name: &str, grid: &[usize]) -> Result<Vec<f32>> {
        let scales = match self.dtype(name) {
            Some(Dtype::F8_E8M0 | Dtype::U8) => {
                let (_, bytes) = self.raw(name, grid)?;
                let mut out = Vec::with_capacity(bytes.len());
                for (i, &b) in bytes.iter().enumerate() {
                    out.push(fp4::e8m0_to_f32(b).ok_or_else(|| {
                        self.bad(name, format!("holds the E8M0 NaN byte 0xff at element {i}"))
                    })?);
                }
                out
            }
            _ => self.read_f32(name, grid)?,
        };
        if let Some(i) = scales.iter().position(|s| !(s.is_finite() && *s > 0.0)) {
            return Err(self.bad(name, format!("holds scale {} at element {i}", scales[i])));
        }
        Ok(scales)
    }

    /// An FP8 weight `[rows, cols]` (bytes already read) with its block scales.
    pub(super) fn fp8_weight(
        &self,
        name: &str,
        entry: &Entry,
        bytes: &[u8],
        shape: &[usize],
    ) -> Result<WeightData> {
        let block = self.fp8_block.unwrap_or([128, 128]);
        let (rows, cols) = match shape {
            [r, c] => (*r, *c),
            _ => return Err(Self::unsupported(name, entry.dtype)),
        };
        let grid = [fp8::blocks(rows, block[0]), fp8::blocks(cols, block[1])];
        let scales = self.read_scales(&self.scale_of(name)?, &grid)?;
        if let Some(i) = bytes.iter().position(|&b| fp8::is_nan(b)) {
            return Err(self.bad(
                name,
                format!("holds an FP8 NaN (byte {:#04x} at element {i})", bytes[i]),
            ));
        }
        Ok(WeightData::Fp8 {
            values: bytes.to_vec(),
            scales,
            block,
        })
    }

    /// `Some` FP4 weight if `name` is stored int8-packed (`I8`/`U8`, `[rows, cols / 2]`) for the
    /// asked `[rows, cols]`; `None` if it is stored some other way (read as usual).
    pub(super) fn read_fp4(&self, name: &str, shape: &[usize]) -> Result<Option<WeightData>> {
        let (Some(dtype), Some(stored), [rows, cols]) = (self.dtype(name), self.shape(name), shape)
        else {
            return Ok(None);
        };
        let (rows, cols) = (*rows, *cols);
        if !matches!(dtype, Dtype::I8 | Dtype::U8) || stored == shape {
            return Ok(None);
        }
        if !cols.is_multiple_of(fp4::GROUP) {
            return Err(self.bad(
                name,
                format!(
                    "is packed FP4 with {cols} columns, not a multiple of {}",
                    fp4::GROUP
                ),
            ));
        }
        let (_, bytes) = self.raw(name, &[rows, cols / 2])?;
        let values = bytes.to_vec();
        let scales = self.read_scales(&self.scale_of(name)?, &[rows, cols / fp4::GROUP])?;
        Ok(Some(WeightData::Fp4 { values, scales }))
    }
}

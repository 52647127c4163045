//! Hugging Face safetensors checkpoints: one file or sharded with `model.safetensors.index.json`,
//! memory-mapped, read tensor by tensor.
//!
//! Opening a checkpoint parses only the headers; tensor bytes are touched when a caller asks for
//! that tensor, so a process that needs a slice of a 1T-parameter checkpoint (a router without
//! routed experts, an expert node with a few experts) pages in only that slice.
//! [`Checkpoint::bytes_read`] counts what was actually read, which the tests check.
//! Reference: <https://huggingface.co/docs/safetensors/index>.

pub mod fp4;
pub mod fp8;
mod mmap;
mod quant;
pub mod select;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use safetensors::{Dtype, SafeTensors};

use crate::error::{ModelError, Result};
pub use select::{TensorFilter, TensorKind};

/// Weight data as the engine keeps it in memory (see [`crate::kernels::Linear`]).
#[derive(Debug, Clone, PartialEq)]
pub enum WeightData {
    /// float32 values.
    F32(Vec<f32>),
    /// bf16 bit patterns (f16 checkpoints are converted to f32 instead: not every f16 is a bf16).
    Bf16(Vec<u16>),
    /// FP8 (e4m3fn) bytes as stored, plus the per-block float32 scales
    /// (`[ceil(rows/block[0]), ceil(cols/block[1])]`). Kept as 1 byte per weight and widened
    /// inside the GEMM kernel. Never holds a NaN byte (the loader refuses them).
    Fp8 {
        values: Vec<u8>,
        scales: Vec<f32>,
        block: [usize; 2],
    },
    /// Like `Fp8` with one scale per (row, k block): `[rows, ceil(cols/block_k)]` (what stacking
    /// two scaled weights gives when rows do not fill whole blocks).
    Fp8RowScaled {
        values: Vec<u8>,
        row_scales: Vec<f32>,
        block_k: usize,
    },
    /// FP4 (e2m1) nibbles packed two per byte, row-major `[rows, cols / 2]` (low nibble = even
    /// column), with float32 scales per row and 32 columns (`[rows, cols / 32]`; see [`fp4`]).
    /// Kept packed and widened inside the GEMM kernel.
    Fp4 { values: Vec<u8>, scales: Vec<f32> },
}

impl WeightData {
    /// The values as float32 (`[rows, cols]`), dequantising FP8 and FP4 with their scales.
    pub fn into_f32(self, rows: usize, cols: usize) -> Vec<f32> {
        match self {
            WeightData::F32(v) => v,
            WeightData::Bf16(v) => v.into_iter().map(bf16_to_f32).collect(),
            WeightData::Fp8 {
                values,
                scales,
                block,
            } => fp8::dequantize_block_fp8(&values, rows, cols, &scales, block),
            WeightData::Fp8RowScaled {
                values,
                row_scales,
                block_k,
            } => fp8::dequantize_block_fp8(&values, rows, cols, &row_scales, [1, block_k]),
            WeightData::Fp4 { values, scales } => fp4::dequantize(&values, rows, cols, &scales),
        }
    }
}

/// Progress of a load, reported after every tensor.
#[derive(Debug, Clone, Copy)]
pub struct LoadProgress {
    pub tensors: u64,
    pub bytes: u64,
}

/// Callback that receives load progress.
pub type ProgressFn = Arc<dyn Fn(LoadProgress) + Send + Sync>;

#[derive(Debug)]
struct Entry {
    file: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    start: usize,
    end: usize,
}

/// An opened checkpoint directory.
pub struct Checkpoint {
    dir: PathBuf,
    files: Vec<(PathBuf, mmap::MappedFile)>,
    entries: HashMap<String, Entry>,
    fp8_block: Option<[usize; 2]>,
    bytes_read: AtomicU64,
    tensors_read: AtomicU64,
    progress: Option<ProgressFn>,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("dir", &self.dir)
            .field("files", &self.files.len())
            .field("tensors", &self.entries.len())
            .finish()
    }
}

fn dtype_size(dtype: Dtype) -> Option<usize> {
    match dtype {
        Dtype::F32 | Dtype::I32 | Dtype::U32 => Some(4),
        Dtype::BF16 | Dtype::F16 | Dtype::I16 | Dtype::U16 => Some(2),
        Dtype::F8_E4M3 | Dtype::U8 | Dtype::I8 | Dtype::F8_E5M2 | Dtype::F8_E8M0 => Some(1),
        Dtype::F64 | Dtype::I64 | Dtype::U64 => Some(8),
        _ => None,
    }
}

impl Checkpoint {
    /// Opens `dir`: `model.safetensors.index.json` if present, else every `*.safetensors` file.
    /// `fp8_block` comes from the config's `quantization_config`.
    pub fn open(dir: &Path, fp8_block: Option<[usize; 2]>) -> Result<Self> {
        let err = |path: &Path, reason: String| ModelError::Checkpoint {
            path: path.into(),
            reason,
        };
        let index_path = dir.join("model.safetensors.index.json");
        let (file_names, index) = if index_path.exists() {
            let text = std::fs::read_to_string(&index_path)
                .map_err(|e| err(&index_path, e.to_string()))?;
            let json: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| err(&index_path, e.to_string()))?;
            let map = json
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| err(&index_path, "no `weight_map` object".into()))?;
            let mut index = HashMap::new();
            let mut names: Vec<String> = Vec::new();
            for (tensor, file) in map {
                let file = file
                    .as_str()
                    .ok_or_else(|| err(&index_path, format!("`{tensor}` maps to a non-string")))?;
                if !names.iter().any(|n| n == file) {
                    names.push(file.to_string());
                }
                index.insert(tensor.clone(), file.to_string());
            }
            names.sort();
            (names, Some(index))
        } else {
            let mut names: Vec<String> = std::fs::read_dir(dir)
                .map_err(|e| err(dir, e.to_string()))?
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".safetensors"))
                .collect();
            names.sort();
            if names.is_empty() {
                return Err(err(dir, "no *.safetensors file".into()));
            }
            (names, None)
        };

        let mut files = Vec::with_capacity(file_names.len());
        let mut entries = HashMap::new();
        for (fi, name) in file_names.iter().enumerate() {
            let path = dir.join(name);
            let mapped = mmap::MappedFile::open(&path).map_err(|e| err(&path, e.to_string()))?;
            let (header_len, meta) = SafeTensors::read_metadata(mapped.bytes())
                .map_err(|e| err(&path, format!("bad safetensors header: {e}")))?;
            let data_start = 8 + header_len;
            for (tname, info) in meta.tensors() {
                let (s, e) = info.data_offsets;
                if data_start + e > mapped.bytes().len() || s > e {
                    return Err(err(
                        &path,
                        format!("tensor `{tname}` lies outside the file"),
                    ));
                }
                if let Some(idx) = &index
                    && idx.get(&tname).map(String::as_str) != Some(name.as_str())
                {
                    continue; // the index names another file as authoritative
                }
                entries.insert(
                    tname,
                    Entry {
                        file: fi,
                        dtype: info.dtype,
                        shape: info.shape.clone(),
                        start: data_start + s,
                        end: data_start + e,
                    },
                );
            }
            files.push((path, mapped));
        }
        if let Some(idx) = &index
            && let Some(missing) = idx.keys().find(|k| !entries.contains_key(*k))
        {
            return Err(err(
                &index_path,
                format!(
                    "`{missing}` is in the index but not in its file {}",
                    idx[missing]
                ),
            ));
        }
        Ok(Checkpoint {
            dir: dir.to_path_buf(),
            files,
            entries,
            fp8_block,
            bytes_read: AtomicU64::new(0),
            tensors_read: AtomicU64::new(0),
            progress: None,
        })
    }

    /// Reports progress to `f` after each tensor read.
    pub fn set_progress(&mut self, f: ProgressFn) {
        self.progress = Some(f);
    }

    /// The checkpoint directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether the checkpoint holds `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// All tensor names (unordered).
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    /// Stored dtype of `name`, if present.
    pub fn dtype(&self, name: &str) -> Option<Dtype> {
        self.entries.get(name).map(|e| e.dtype)
    }

    /// Shape of `name`, if present.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.entries.get(name).map(|e| e.shape.as_slice())
    }

    /// Stored size of `name` in bytes (with its FP8/FP4 scale tensor, if any).
    pub fn stored_bytes(&self, name: &str) -> u64 {
        let own = self
            .entries
            .get(name)
            .map_or(0, |e| (e.end - e.start) as u64);
        let scale = self
            .scale_name(name)
            .and_then(|s| self.entries.get(&s))
            .map_or(0, |e| (e.end - e.start) as u64);
        own + scale
    }

    /// Total stored bytes of the tensors that `filter` selects.
    pub fn selected_bytes(&self, filter: &TensorFilter) -> u64 {
        self.entries
            .iter()
            .filter(|(n, _)| filter.matches(n))
            .map(|(_, e)| (e.end - e.start) as u64)
            .sum()
    }

    /// Bytes of tensor data read so far.
    pub fn bytes_read(&self) -> u64 {
        self.bytes_read.load(Ordering::Relaxed)
    }

    fn raw(&self, name: &str, expected: &[usize]) -> Result<(&Entry, &[u8])> {
        let entry = self
            .entries
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor {
                name: name.to_string(),
            })?;
        if entry.shape != expected {
            return Err(ModelError::ShapeMismatch {
                name: name.to_string(),
                expected: expected.to_vec(),
                found: entry.shape.clone(),
            });
        }
        let count: usize = entry.shape.iter().product();
        let size = dtype_size(entry.dtype).ok_or_else(|| ModelError::UnsupportedDtype {
            name: name.to_string(),
            dtype: format!("{:?}", entry.dtype),
        })?;
        if count * size != entry.end - entry.start {
            return Err(ModelError::Checkpoint {
                path: self.files[entry.file].0.clone(),
                reason: format!(
                    "tensor `{name}` has {} bytes for {count} elements",
                    entry.end - entry.start
                ),
            });
        }
        let bytes = &self.files[entry.file].1.bytes()[entry.start..entry.end];
        let total = self
            .bytes_read
            .fetch_add(bytes.len() as u64, Ordering::Relaxed)
            + bytes.len() as u64;
        let tensors = self.tensors_read.fetch_add(1, Ordering::Relaxed) + 1;
        if let Some(progress) = &self.progress {
            progress(LoadProgress {
                tensors,
                bytes: total,
            });
        }
        Ok((entry, bytes))
    }

    /// The stored bytes of `name` as they are (any dtype, its own shape).
    pub fn read_raw(&self, name: &str) -> Result<&[u8]> {
        let shape = self
            .shape(name)
            .ok_or_else(|| ModelError::MissingTensor {
                name: name.to_string(),
            })?
            .to_vec();
        Ok(self.raw(name, &shape)?.1)
    }

    fn unsupported(name: &str, dtype: Dtype) -> ModelError {
        ModelError::UnsupportedDtype {
            name: name.to_string(),
            dtype: format!("{dtype:?}"),
        }
    }

    /// Reads `name` as float32 (any float dtype; FP8 and FP4 are dequantised with their scales).
    pub fn read_f32(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let (rows, cols) = match shape {
            [] => (1, 1),
            [.., c] => (shape.iter().product::<usize>() / (*c).max(1), *c),
        };
        Ok(self.read_weight(name, shape)?.into_f32(rows, cols))
    }

    /// Reads `name` in the representation the engine keeps: bf16 stays bf16, f32 stays f32, f16
    /// becomes f32, FP8 stays FP8 bytes plus block scales (a NaN byte is an error) and an
    /// int8-packed FP4 weight (stored `[rows, cols / 2]` for a `[rows, cols]` shape) stays packed
    /// with its per-32-column scales. Scales are `{name}_scale_inv` or `{stem}.scale` (see
    /// [`Checkpoint::scale_name`]), float or E8M0.
    pub fn read_weight(&self, name: &str, shape: &[usize]) -> Result<WeightData> {
        if let Some(w) = self.read_fp4(name, shape)? {
            return Ok(w);
        }
        let (entry, bytes) = self.raw(name, shape)?;
        match entry.dtype {
            Dtype::F32 => Ok(WeightData::F32(
                bytes
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect(),
            )),
            Dtype::BF16 => Ok(WeightData::Bf16(
                bytes
                    .chunks_exact(2)
                    .map(|b| u16::from_le_bytes([b[0], b[1]]))
                    .collect(),
            )),
            Dtype::F16 => Ok(WeightData::F32(
                bytes
                    .chunks_exact(2)
                    .map(|b| half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32())
                    .collect(),
            )),
            Dtype::F8_E4M3 => self.fp8_weight(name, entry, bytes, shape),
            other => Err(Self::unsupported(name, other)),
        }
    }
}

impl Checkpoint {
    /// Reads an integer table (`I64` or `I32`, e.g. DeepSeek-V4's `tid2eid`) as `u32`; every
    /// entry must lie in `0..bound`.
    pub fn read_index_table(&self, name: &str, shape: &[usize], bound: usize) -> Result<Vec<u32>> {
        let (entry, bytes) = self.raw(name, shape)?;
        let values: Vec<i64> = match entry.dtype {
            Dtype::I64 => bytes
                .chunks_exact(8)
                .map(|b| i64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
                .collect(),
            Dtype::I32 => bytes
                .chunks_exact(4)
                .map(|b| i64::from(i32::from_le_bytes([b[0], b[1], b[2], b[3]])))
                .collect(),
            other => return Err(Self::unsupported(name, other)),
        };
        if let Some((i, v)) = values
            .iter()
            .enumerate()
            .find(|(_, v)| **v < 0 || **v as u64 >= bound as u64)
        {
            return Err(ModelError::Checkpoint {
                path: self.files[entry.file].0.clone(),
                reason: format!("tensor `{name}` holds {v} at element {i}, outside 0..{bound}"),
            });
        }
        Ok(values.into_iter().map(|v| v as u32).collect())
    }
}

/// bf16 bits to f32 (exact).
#[inline]
pub fn bf16_to_f32(bits: u16) -> f32 {
    f32::from_bits(u32::from(bits) << 16)
}

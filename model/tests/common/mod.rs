//! Shared helpers for the golden tests: fixture paths, golden files, comparisons.

use std::collections::HashMap;
use std::path::PathBuf;

use moe_model::model::{LoadOptions, LogitsMode, Model, SeqInput, Trace};
use moe_model::{Matrix, SeqCache};
use safetensors::{Dtype, SafeTensors};

/// `tests/fixtures/models/<name>` at the workspace root.
pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/models")
        .join(name)
}

pub fn load(name: &str) -> Model {
    Model::load(&fixture(name), &LoadOptions::default()).expect("fixture model loads")
}

/// A golden safetensors file, decoded.
pub struct Golden {
    pub f32s: HashMap<String, Matrix>,
    pub ids: HashMap<String, (usize, usize, Vec<i64>)>,
}

pub fn read_golden(name: &str, file: &str) -> Golden {
    let bytes = std::fs::read(fixture(name).join("golden").join(file)).expect("golden file");
    let st = SafeTensors::deserialize(&bytes).expect("golden safetensors");
    let mut f32s = HashMap::new();
    let mut ids = HashMap::new();
    for (n, v) in st.tensors() {
        let shape = v.shape().to_vec();
        let (rows, cols) = match shape.as_slice() {
            [r, c] => (*r, *c),
            [r] => (*r, 1),
            // DeepSeek-V4's residual streams `[len, hc_mult, hidden]`, flattened per token.
            [r, c, d] => (*r, c * d),
            _ => panic!("unexpected golden shape {shape:?}"),
        };
        match v.dtype() {
            Dtype::F32 => {
                let data = v
                    .data()
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect();
                f32s.insert(n, Matrix::from_vec(rows, cols, data));
            }
            Dtype::I64 => {
                let data = v
                    .data()
                    .chunks_exact(8)
                    .map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes")))
                    .collect();
                ids.insert(n, (rows, cols, data));
            }
            other => panic!("unexpected golden dtype {other:?}"),
        }
    }
    Golden { f32s, ids }
}

pub fn golden_json(name: &str) -> serde_json::Value {
    let text =
        std::fs::read_to_string(fixture(name).join("golden/golden.json")).expect("golden.json");
    serde_json::from_str(&text).expect("golden.json parses")
}

/// Prompt token ids of the golden file.
pub fn prompts(json: &serde_json::Value) -> Vec<Vec<u32>> {
    json["prompts"]
        .as_array()
        .expect("prompts")
        .iter()
        .map(|p| {
            p["ids"]
                .as_array()
                .expect("ids")
                .iter()
                .map(|v| v.as_u64().expect("id") as u32)
                .collect()
        })
        .collect()
}

/// Full forward of one prompt with a trace.
pub fn full_forward(model: &Model, ids: &[u32]) -> (Matrix, Trace) {
    let mut cache = SeqCache::new(model.config());
    let mut trace = Trace::default();
    let mut seqs = [SeqInput {
        tokens: ids,
        cache: &mut cache,
    }];
    let mut out = model
        .forward(&mut seqs, LogitsMode::All, Some(&mut trace))
        .expect("forward");
    (out.remove(0), trace)
}

/// Index of the largest value (first on ties), as the reference's argmax.
pub fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in row.iter().enumerate() {
        if *v > row[best] {
            best = i;
        }
    }
    best as u32
}

pub fn assert_close(what: &str, ours: &Matrix, golden: &Matrix, tol: f32) -> f32 {
    assert_eq!(
        (ours.rows, ours.cols),
        (golden.rows, golden.cols),
        "{what}: shape"
    );
    let d = ours.max_abs_diff(golden);
    assert!(d <= tol, "{what}: max |diff| {d} > {tol}");
    d
}

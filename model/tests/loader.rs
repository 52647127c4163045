//! The checkpoint loader: partial loads read only what they select, and broken checkpoints give
//! errors that name the tensor and the shapes.

pub mod common;

use std::collections::HashMap;
use std::path::Path;

use common::*;
use moe_model::checkpoint::{Checkpoint, TensorFilter};
use moe_model::model::{Backbone, LogitsMode, SeqInput};
use moe_model::{Config, ExpertStore, ModelError, SeqCache};
use safetensors::{Dtype, SafeTensors, tensor::TensorView};

fn open(name: &str) -> (Config, Checkpoint) {
    moe_model::model::open(&fixture(name)).expect("opens")
}

#[test]
fn a_router_reads_only_the_backbone() {
    for name in ["tiny-dsv3-bf16", "tiny-dsv3-fp8"] {
        let (cfg, ckpt) = open(name);
        let _ = Backbone::load(&cfg, &ckpt).expect("backbone");
        let all = ckpt.selected_bytes(&TensorFilter::All { num_layers: 4 });
        let backbone = ckpt.selected_bytes(&TensorFilter::Backbone { num_layers: 4 });
        assert_eq!(ckpt.bytes_read(), backbone, "{name}");
        assert!(
            backbone * 5 < all,
            "{name}: the routed experts are most of the model"
        );
    }
}

#[test]
fn an_expert_node_reads_only_its_experts() {
    for name in ["tiny-dsv3-bf16", "tiny-dsv3-fp8"] {
        let (cfg, ckpt) = open(name);
        let pairs = [(1, 5), (3, 255)];
        let store = ExpertStore::load(&cfg, &ckpt, &pairs).expect("experts");
        assert_eq!(store.len(), 2);
        assert!(store.get(1, 5).is_some() && store.get(1, 6).is_none());
        let expected: u64 = pairs
            .iter()
            .flat_map(|(l, e)| {
                ["gate", "up", "down"]
                    .map(|p| format!("model.layers.{l}.mlp.experts.{e}.{p}_proj.weight"))
            })
            .map(|n| ckpt.stored_bytes(&n))
            .sum();
        assert_eq!(ckpt.bytes_read(), expected, "{name}");
        let err = ExpertStore::load(&cfg, &ckpt, &[(0, 1)]).expect_err("layer 0 is dense");
        assert!(
            err.to_string().contains("no routed expert 1 in layer 0"),
            "{err}"
        );
    }
}

#[test]
fn fp8_experts_stay_one_byte_per_weight_in_memory() {
    // The same experts of the bf16 and the FP8 golden models: FP8 holds its bytes and block
    // scales (what the checkpoint stores, plus panel padding), about half of bf16's memory.
    let pairs: Vec<(usize, usize)> = (0..256).map(|e| (1, e)).collect();
    let held = |name: &str| {
        let (cfg, ckpt) = open(name);
        let store = ExpertStore::load(&cfg, &ckpt, &pairs).expect("experts");
        (store.bytes() as f64, ckpt.bytes_read() as f64)
    };
    let (bf16, bf16_file) = held("tiny-dsv3-bf16");
    let (fp8, fp8_file) = held("tiny-dsv3-fp8");
    eprintln!(
        "layer 1 experts in memory: bf16 {bf16} B, FP8 {fp8} B (stored: {bf16_file} B, {fp8_file} B)"
    );
    assert!(bf16 >= bf16_file, "bf16 {bf16} B for {bf16_file} B stored");
    assert!(
        fp8 <= 1.25 * fp8_file && fp8 <= 0.6 * bf16,
        "FP8 experts hold {fp8} B for {fp8_file} B stored (bf16: {bf16} B)"
    );
}

/// Copies the f32 tiny model into `dir`, transforming its tensors with `edit`.
fn rewrite(
    dir: &Path,
    edit: impl Fn(&str, Dtype, Vec<usize>, Vec<u8>) -> Option<(String, Dtype, Vec<usize>, Vec<u8>)>,
) {
    rewrite_from("tiny-dsv3", dir, edit)
}

/// [`rewrite`] of the golden model `name`.
fn rewrite_from(
    name: &str,
    dir: &Path,
    edit: impl Fn(&str, Dtype, Vec<usize>, Vec<u8>) -> Option<(String, Dtype, Vec<usize>, Vec<u8>)>,
) {
    let src = fixture(name);
    for entry in std::fs::read_dir(&src).expect("ls") {
        let path = entry.expect("entry").path();
        let file = path.file_name().expect("name").to_owned();
        if path.extension().is_some_and(|e| e == "safetensors") {
            let bytes = std::fs::read(&path).expect("read");
            let st = SafeTensors::deserialize(&bytes).expect("parse");
            let tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = st
                .tensors()
                .into_iter()
                .filter_map(|(n, v)| edit(&n, v.dtype(), v.shape().to_vec(), v.data().to_vec()))
                .collect();
            let views: HashMap<String, TensorView<'_>> = tensors
                .iter()
                .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).expect("view")))
                .collect();
            safetensors::serialize_to_file(views, None, &dir.join(file)).expect("write");
        } else if path.is_file() {
            std::fs::copy(&path, dir.join(file)).expect("copy");
        }
    }
}

fn load_err(dir: &Path) -> ModelError {
    let (cfg, ckpt) = moe_model::model::open(dir).expect("opens");
    Backbone::load(&cfg, &ckpt).expect_err("must fail")
}

#[test]
fn missing_tensor_is_named() {
    let dir = tempfile::tempdir().expect("tmp");
    let victim = "model.layers.2.self_attn.kv_a_layernorm.weight";
    rewrite(dir.path(), |n, d, s, b| {
        (n != victim).then(|| (n.to_string(), d, s, b))
    });
    match load_err(dir.path()) {
        ModelError::MissingTensor { name } => assert_eq!(name, victim),
        other => panic!("wrong error: {other}"),
    }
}

#[test]
fn wrong_shape_names_tensor_and_both_shapes() {
    let dir = tempfile::tempdir().expect("tmp");
    let victim = "model.layers.1.self_attn.q_a_proj.weight"; // [32, 64]
    rewrite(dir.path(), |n, d, s, b| {
        let s = if n == victim { vec![64, 32] } else { s };
        Some((n.to_string(), d, s, b))
    });
    let err = load_err(dir.path());
    assert_eq!(
        err.to_string(),
        format!("tensor `{victim}` has shape [64, 32], expected [32, 64]")
    );
}

#[test]
fn a_nan_in_an_fp8_weight_is_refused_by_name() {
    // FP8 weights stay bytes in memory and the kernels widen them without a NaN check, so the
    // loader refuses the NaN encodings (0x7F, 0xFF) instead of computing with them.
    let dir = tempfile::tempdir().expect("tmp");
    let victim = "model.layers.1.self_attn.q_a_proj.weight";
    rewrite_from("tiny-dsv3-fp8", dir.path(), |n, d, s, mut b| {
        if n == victim {
            assert_eq!(d, Dtype::F8_E4M3);
            b[5] = 0xFF;
        }
        Some((n.to_string(), d, s, b))
    });
    let err = load_err(dir.path()).to_string();
    assert!(
        err.contains(victim) && err.contains("FP8 NaN (byte 0xff at element 5)"),
        "{err}"
    );
}

#[test]
fn unsupported_dtype_is_an_error() {
    let dir = tempfile::tempdir().expect("tmp");
    let victim = "model.norm.weight";
    rewrite(dir.path(), |n, d, s, b| {
        let d = if n == victim { Dtype::I32 } else { d };
        Some((n.to_string(), d, s, b))
    });
    let err = load_err(dir.path());
    assert!(
        matches!(&err, ModelError::UnsupportedDtype { name, .. } if name == victim),
        "{err}"
    );
}

#[test]
fn sharded_index_pointing_at_a_missing_tensor_is_an_error() {
    let dir = tempfile::tempdir().expect("tmp");
    let src = fixture("tiny-dsv3-fp8");
    for f in std::fs::read_dir(&src).expect("ls") {
        let f = f.expect("entry");
        if f.path().is_file() {
            std::fs::copy(f.path(), dir.path().join(f.file_name())).expect("copy");
        }
    }
    let index_path = dir.path().join("model.safetensors.index.json");
    let mut index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&index_path).expect("index")).expect("json");
    index["weight_map"]["model.layers.9.ghost.weight"] = "model-00001-of-00002.safetensors".into();
    std::fs::write(&index_path, index.to_string()).expect("write");
    let err = moe_model::model::open(dir.path()).expect_err("inconsistent index");
    assert!(
        err.to_string().contains("model.layers.9.ghost.weight"),
        "{err}"
    );
}

#[test]
fn mtp_weights_in_the_checkpoint_are_ignored() {
    // A checkpoint with one multi-token-prediction layer (layer 4 of a 4-layer model), as the
    // official DeepSeek-V3 release ships: loads, never reads it, and gives the golden logits.
    let dir = tempfile::tempdir().expect("tmp");
    rewrite(dir.path(), |n, d, s, b| Some((n.to_string(), d, s, b)));
    let mut cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("config.json")).expect("cfg"),
    )
    .expect("json");
    cfg["num_nextn_predict_layers"] = 1.into();
    std::fs::write(dir.path().join("config.json"), cfg.to_string()).expect("write");
    let eh: Vec<u8> = vec![0u8; 64 * 128 * 4];
    let mut mtp = HashMap::new();
    mtp.insert(
        "model.layers.4.eh_proj.weight".to_string(),
        TensorView::new(Dtype::F32, vec![64, 128], &eh).expect("view"),
    );
    mtp.insert(
        "model.layers.4.mlp.experts.0.up_proj.weight".to_string(),
        TensorView::new(Dtype::F32, vec![128, 64], &eh).expect("view"),
    );
    safetensors::serialize_to_file(mtp, None, &dir.path().join("model-mtp.safetensors"))
        .expect("write");

    let model = moe_model::Model::load(dir.path(), &Default::default())
        .expect("loads with MTP weights present");
    let ids = &prompts(&golden_json("tiny-dsv3"))[1];
    let mut cache = SeqCache::new(model.config());
    let out = model
        .forward(
            &mut [SeqInput {
                tokens: ids,
                cache: &mut cache,
            }],
            LogitsMode::All,
            None,
        )
        .expect("forward");
    let golden = read_golden("tiny-dsv3", "golden_logits.safetensors");
    assert_close("with MTP weights", &out[0], &golden.f32s["prompt_1"], 1e-3);
}

#[test]
fn bad_inputs_are_errors_and_leave_the_cache_alone() {
    let model = load("tiny-dsv3-bf16");
    let mut cache = SeqCache::new(model.config());
    model
        .forward(
            &mut [SeqInput {
                tokens: &[0, 5, 7],
                cache: &mut cache,
            }],
            LogitsMode::Last,
            None,
        )
        .expect("ok");
    for (tokens, needle) in [
        (vec![512u32], "outside the vocabulary"),
        (vec![], "no new tokens"),
    ] {
        let err = model
            .forward(
                &mut [SeqInput {
                    tokens: &tokens,
                    cache: &mut cache,
                }],
                LogitsMode::Last,
                None,
            )
            .expect_err("bad input");
        assert!(err.to_string().contains(needle), "{err}");
        assert_eq!(cache.len(), 3);
    }
    let long = vec![5u32; 2046];
    let err = model
        .forward(
            &mut [SeqInput {
                tokens: &long,
                cache: &mut cache,
            }],
            LogitsMode::Last,
            None,
        )
        .expect_err("too long");
    assert!(
        err.to_string().contains("beyond the context length 2048"),
        "{err}"
    );
}

#[test]
fn a_missing_expert_fails_the_step_and_rolls_back_the_cache() {
    let (cfg, ckpt) = open("tiny-dsv3-bf16");
    let backbone = Backbone::load(&cfg, &ckpt).expect("backbone");
    // Only half of layer 1's experts: some token will pick one that is absent.
    let pairs: Vec<(usize, usize)> = (0..128).map(|e| (1, e)).collect();
    let experts = moe_model::LocalExperts {
        store: ExpertStore::load(&cfg, &ckpt, &pairs).expect("experts"),
    };
    let mut cache = SeqCache::new(&cfg);
    let ids = &prompts(&golden_json("tiny-dsv3-bf16"))[2];
    let err = backbone
        .forward(
            &mut [SeqInput {
                tokens: ids,
                cache: &mut cache,
            }],
            &experts,
            LogitsMode::Last,
            None,
        )
        .expect_err("experts missing");
    assert!(matches!(err, ModelError::Experts { layer: 1, .. }), "{err}");
    assert!(err.to_string().contains("is not loaded"), "{err}");
    assert_eq!((cache.len(), cache.bytes()), (0, 0));
}

//! DeepSeek-V4 FP8 + FP4 checkpoints: `tiny-dsv4` quantised in the test (dense linears to e4m3
//! with 128×128 block scales, routed experts to int8-packed e2m1 with per-32-column scales, as
//! the official release ships them) loads and runs, and gives
//! - bit for bit the logits of the same checkpoint with its FP4 experts stored as the bf16 of
//!   their dequantised values (the FP4 kernels widen to exactly those weights and accumulate in
//!   the bf16 kernels' order), on the AVX-512 and the portable kernel;
//! - bit for bit the same logits whether scales are E8M0 bytes or float32, under
//!   `.weight_scale_inv` or `.scale`;
//! - within 1e-4 (relative to the row's largest logit) the logits of the checkpoint dequantised
//!   to float32 (FP8 blocks are scaled after each block's sum, float32 weights go through faer:
//!   a different rounding order, so not bitwise).
//!
//! The FP4 experts take 17/64 (0.27) of their bf16 bytes in memory, and an expert slice reads only its
//! packed bytes and scales. Malformed scale grids, an E8M0 NaN, a weight with both scale suffixes
//! and a missing scale are refused.

pub mod common;

use std::path::Path;

use common::{fixture, golden_json, prompts};
use moe_model::checkpoint::Checkpoint;
use moe_model::kernels::{KernelChoice, kernel_choice, set_kernel_choice};
use moe_model::v4::quantize::{QuantizeOptions, ScaleFormat, Target, quantize_dir, target};
use moe_model::v4::{V4Model, experts};
use safetensors::Dtype;
use safetensors::tensor::TensorView;

const NAME: &str = "tiny-dsv4";

fn is_scale(name: &str) -> bool {
    name.ends_with(".scale") || name.ends_with("_scale_inv")
}

/// What a rewrite does with one tensor.
enum Edit {
    Keep,
    Drop,
    Replace(Dtype, Vec<usize>, Vec<u8>),
    /// Keep it and add another tensor.
    Add(String, Dtype, Vec<usize>, Vec<u8>),
}

/// Copies the checkpoint in `src` to `dst` with `edit` applied to every tensor (config and
/// other files copied).
fn rewrite(src: &Path, dst: &Path, edit: impl Fn(&Checkpoint, &str) -> Edit) {
    let ckpt = Checkpoint::open(src, None).expect("open");
    let mut out: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for name in ckpt.names() {
        match edit(&ckpt, name) {
            Edit::Keep => out.push((
                name.to_string(),
                ckpt.dtype(name).expect("dtype"),
                ckpt.shape(name).expect("shape").to_vec(),
                ckpt.read_raw(name).expect("raw").to_vec(),
            )),
            Edit::Drop => {}
            Edit::Replace(d, s, b) => out.push((name.to_string(), d, s, b)),
            Edit::Add(extra, d, s, b) => {
                out.push((
                    name.to_string(),
                    ckpt.dtype(name).expect("dtype"),
                    ckpt.shape(name).expect("shape").to_vec(),
                    ckpt.read_raw(name).expect("raw").to_vec(),
                ));
                out.push((extra, d, s, b));
            }
        }
    }
    let views: Vec<(String, TensorView<'_>)> = out
        .iter()
        .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).expect("view")))
        .collect();
    std::fs::create_dir_all(dst).expect("dir");
    safetensors::serialize_to_file(views, None, &dst.join("model.safetensors")).expect("write");
    std::fs::copy(src.join("config.json"), dst.join("config.json")).expect("config");
}

/// The logical `[rows, cols]` of a stored weight (packed FP4 stores `cols / 2`).
fn logical(ckpt: &Checkpoint, name: &str) -> Vec<usize> {
    let s = ckpt.shape(name).expect("shape").to_vec();
    if ckpt.dtype(name) == Some(Dtype::I8) {
        vec![s[0], s[1] * 2]
    } else {
        s
    }
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn quantized(dir: &Path, opts: QuantizeOptions) {
    let r = quantize_dir(&fixture(NAME), dir, opts).expect("quantize");
    // 5 layers × (wq_a, wq_b, wkv, wo_a, wo_b, 3 shared) + the indexer's wq_b of 2 CSA layers.
    assert_eq!((r.fp8, r.fp4), (5 * 8 + 2, 5 * 384 * 3), "{r:?}");
}

/// Every prompt's logits, as bits.
fn logits(model: &V4Model) -> Vec<Vec<u32>> {
    prompts(&golden_json(NAME))
        .iter()
        .map(|p| {
            let m = model.forward_full(p, None).expect("forward");
            m.data.iter().map(|v| v.to_bits()).collect()
        })
        .collect()
}

#[test]
fn quantized_checkpoint_matches_its_dequantised_weights() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let q_dir = tmp.path().join("q");
    quantized(&q_dir, QuantizeOptions::default());
    // The same quantisation with float32 scales under the other suffixes.
    let q2_dir = tmp.path().join("q2");
    let f32_scales = |short_suffix| ScaleFormat {
        short_suffix,
        e8m0: false,
    };
    quantized(
        &q2_dir,
        QuantizeOptions {
            fp8: f32_scales(true),
            fp4: f32_scales(false),
        },
    );
    // FP4 experts replaced by the bf16 of their dequantised values (FP8 kept).
    let b_dir = tmp.path().join("b");
    rewrite(&q_dir, &b_dir, |ckpt, name| {
        let shape = logical(ckpt, name);
        if is_scale(name) && name.contains(".ffn.experts.") {
            return Edit::Drop;
        }
        if target(name, &shape) != Target::Fp4 {
            return Edit::Keep;
        }
        let w = ckpt.read_f32(name, &shape).expect("fp4");
        let bits: Vec<u8> = w
            .iter()
            .flat_map(|&v| {
                let b = half::bf16::from_f32(v);
                assert_eq!(b.to_f32().to_bits(), v.to_bits(), "{name}: exact in bf16");
                b.to_bits().to_le_bytes()
            })
            .collect();
        Edit::Replace(Dtype::BF16, shape, bits)
    });
    // Everything dequantised to float32.
    let a_dir = tmp.path().join("a");
    rewrite(&q_dir, &a_dir, |ckpt, name| {
        let shape = logical(ckpt, name);
        if is_scale(name) {
            return Edit::Drop;
        }
        match ckpt.dtype(name) {
            Some(Dtype::I8 | Dtype::F8_E4M3) => {
                let w = ckpt.read_f32(name, &shape).expect("dequantise");
                Edit::Replace(Dtype::F32, shape, f32_bytes(&w))
            }
            _ => Edit::Keep,
        }
    });

    let q = V4Model::load(&q_dir).expect("quantized loads");
    let q2 = V4Model::load(&q2_dir).expect("float32 scales load");
    let b = V4Model::load(&b_dir).expect("bf16 experts load");
    let a = V4Model::load(&a_dir).expect("dequantised loads");
    let original = V4Model::load(&fixture(NAME)).expect("tiny-dsv4");

    let (qb, bb) = (q.experts.store.bytes(), b.experts.store.bytes());
    println!(
        "routed experts in memory: FP4 {qb} bytes, bf16 {bb} bytes ({:.4} of bf16)",
        qb as f64 / bb as f64
    );
    // Half a byte per weight plus an exponent byte per 32 weights, against 2 bytes.
    assert_eq!(qb * 64, bb * 17, "FP4 expert bytes");

    let mut choices = vec![KernelChoice::Portable];
    if kernel_choice() == KernelChoice::Avx512 {
        choices.push(KernelChoice::Avx512);
    }
    for choice in choices {
        set_kernel_choice(choice);
        let lq = logits(&q);
        assert_eq!(lq, logits(&q2), "{choice:?}: E8M0 and float32 scales");
        assert_eq!(
            lq,
            logits(&b),
            "{choice:?}: FP4 vs bf16 of the dequantised experts"
        );
        let (mut worst, mut moved) = (0.0f32, 0.0f32);
        for ((rq, ra), ro) in lq.iter().zip(logits(&a)).zip(logits(&original)) {
            let f = |v: &[u32]| v.iter().map(|&x| f32::from_bits(x)).collect::<Vec<_>>();
            let (rq, ra, ro) = (f(rq), f(&ra), f(&ro));
            let scale = ra.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            for ((x, y), z) in rq.iter().zip(&ra).zip(&ro) {
                worst = worst.max((x - y).abs() / scale);
                moved = moved.max((x - z).abs() / scale);
            }
        }
        println!(
            "{choice:?}: quantized vs dequantised-f32 logits {worst:.2e}, vs the unquantised \
             model {moved:.2e} (relative to the largest logit)"
        );
        assert!(worst <= 1e-4, "{choice:?}: {worst}");
        assert!(moved > 1e-3, "the quantisation changed nothing ({moved})");
    }
    set_kernel_choice(KernelChoice::Auto);
}

#[test]
fn an_expert_slice_loads_packed_from_the_quantized_checkpoint() {
    let tmp = tempfile::tempdir().expect("tempdir");
    quantized(tmp.path(), QuantizeOptions::default());
    let (cfg, ckpt) = moe_model::v4::model::open(tmp.path()).expect("open");
    let pairs = [(0, 5), (3, 383), (4, 0)];
    let store = experts::load_experts(&cfg, &ckpt, &pairs).expect("slice");
    // 3 experts × 3 matrices of 32 × 64 nibbles, plus a scale per 32 — nothing else read.
    let expert_bytes = 3 * (32 * 64 / 2 + 32 * 64 / 32) as u64;
    assert_eq!(ckpt.bytes_read(), 3 * expert_bytes);
    assert_eq!(store.len(), 3);
}

fn expect_load_error(edit: impl Fn(&Checkpoint, &str) -> Edit, want: &str) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let q_dir = tmp.path().join("q");
    quantized(&q_dir, QuantizeOptions::default());
    let bad = tmp.path().join("bad");
    rewrite(&q_dir, &bad, edit);
    std::fs::copy(q_dir.join("config.json"), bad.join("config.json")).expect("config");
    let err = V4Model::load(&bad).expect_err(want).to_string();
    assert!(err.contains(want), "expected `{want}` in: {err}");
}

#[test]
fn malformed_scales_are_refused() {
    let fp8_scale = "model.layers.2.attn.wq_b.weight_scale_inv";
    let fp4_scale = "model.layers.1.ffn.experts.9.w2.weight_scale_inv";
    // A wrong FP8 block grid ([256, 32] has a 2 × 1 grid) and a wrong FP4 group grid.
    for (name, shape) in [(fp8_scale, vec![1, 1]), (fp4_scale, vec![64, 2])] {
        expect_load_error(
            |_, n| {
                if n == name {
                    let len: usize = shape.iter().product();
                    Edit::Replace(Dtype::F8_E8M0, shape.clone(), vec![127; len])
                } else {
                    Edit::Keep
                }
            },
            name,
        );
    }
    expect_load_error(
        |ckpt, n| {
            if n == fp8_scale {
                let mut b = ckpt.read_raw(n).expect("raw").to_vec();
                b[0] = 255;
                Edit::Replace(Dtype::F8_E8M0, ckpt.shape(n).expect("s").to_vec(), b)
            } else {
                Edit::Keep
            }
        },
        "E8M0 NaN",
    );
    // Both suffixes for one weight: which scale is meant is ambiguous.
    expect_load_error(
        |ckpt, n| {
            if n == fp8_scale {
                let s = ckpt.shape(n).expect("s").to_vec();
                let b = ckpt.read_raw(n).expect("raw").to_vec();
                Edit::Add(
                    "model.layers.2.attn.wq_b.scale".into(),
                    Dtype::F8_E8M0,
                    s,
                    b,
                )
            } else {
                Edit::Keep
            }
        },
        "has two scale tensors",
    );
    expect_load_error(
        |_, n| {
            if n == fp4_scale {
                Edit::Drop
            } else {
                Edit::Keep
            }
        },
        "`model.layers.1.ffn.experts.9.w2.weight_scale_inv (or the `.scale`",
    );
}

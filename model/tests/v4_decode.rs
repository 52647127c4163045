//! DeepSeek-V4 decoding through the cache (`tests/fixtures/models/tiny-dsv4`): the 24-step
//! greedy continuations of `golden.json` (each step's logits within 1e-3 of the reference's,
//! ids identical wherever the reference margin exceeds 1e-3); incremental decoding of the
//! 400-token prompt in any chunking equal to the full forward within 1e-4; batched results equal
//! to unbatched ones (to float32 GEMM rounding); a failed pass leaves every cache as it was.

pub mod common;

use common::{argmax, fixture, golden_json, prompts, read_golden};
use moe_model::model::LogitsMode;
use moe_model::v4::{V4Model, V4SeqInput};
use moe_model::{Matrix, ModelError};

const NAME: &str = "tiny-dsv4";

fn model() -> V4Model {
    V4Model::load(&fixture(NAME)).expect("tiny-dsv4 loads")
}

fn step(model: &V4Model, cache: &mut moe_model::v4::V4Cache, tokens: &[u32]) -> Matrix {
    let mut seqs = [V4SeqInput { tokens, cache }];
    model
        .forward(&mut seqs, LogitsMode::Last, None)
        .expect("forward")
        .remove(0)
}

#[test]
fn greedy_continuations_match_the_reference() {
    let model = model();
    let json = golden_json(NAME);
    let extra = read_golden(NAME, "golden_extra.safetensors");
    let mut worst = 0.0f32;
    for (i, ids) in prompts(&json).iter().enumerate() {
        let res = &json["results"][i];
        let want: Vec<u32> = res["generated_ids"]
            .as_array()
            .expect("ids")
            .iter()
            .map(|v| v.as_u64().expect("id") as u32)
            .collect();
        let margins: Vec<f64> = res["greedy_margins"]
            .as_array()
            .expect("margins")
            .iter()
            .map(|v| v.as_f64().expect("margin"))
            .collect();
        let golden = &extra.f32s[&format!("greedy.prompt_{i}.step_logits")];
        let mut cache = model.new_cache();
        let mut logits = step(&model, &mut cache, ids);
        let mut fed = 0;
        for (s, &tok) in want.iter().enumerate() {
            let d = logits
                .row(0)
                .iter()
                .zip(golden.row(s))
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f32::max);
            assert!(d <= 1e-3, "prompt_{i} step {s}: logits differ by {d}");
            worst = worst.max(d);
            let ours = argmax(logits.row(0));
            if margins[s] <= 1e-3 {
                break;
            }
            assert_eq!(ours, tok, "prompt_{i} step {s}");
            logits = step(&model, &mut cache, &[tok]);
            fed += 1;
        }
        assert_eq!(cache.len(), ids.len() + fed);
    }
    eprintln!("greedy step logits: worst |diff| vs golden {worst}");
}

#[test]
fn incremental_decoding_equals_the_full_forward() {
    let model = model();
    let ids = prompts(&golden_json(NAME))[3].clone();
    let full = model.forward_full(&ids, None).expect("full");
    // A prefill, odd chunks that straddle compression windows, then one token at a time.
    let mut cache = model.new_cache();
    let mut got: Vec<f32> = Vec::new();
    let mut pos = 0;
    while pos < ids.len() {
        let n = match pos {
            0 => 301,
            p if p < 350 => 7.min(350 - p),
            _ => 1,
        };
        let mut seqs = [V4SeqInput {
            tokens: &ids[pos..pos + n],
            cache: &mut cache,
        }];
        let out = model
            .forward(&mut seqs, LogitsMode::All, None)
            .expect("forward")
            .remove(0);
        got.extend(out.data);
        pos += n;
    }
    let got = Matrix::from_vec(ids.len(), full.cols, got);
    let d = got.max_abs_diff(&full);
    eprintln!("incremental vs full forward: max |diff| {d}");
    assert!(
        d <= 1e-4,
        "incremental decoding differs from the full forward by {d}"
    );
    // The window keeps sliding_window - 1 rows, however the tokens came.
    let w = model.config().sliding_window - 1;
    assert_eq!(cache.layers[0].window.len(), w * model.config().head_dim);
}

#[test]
fn batches_give_the_same_results_as_single_sequences() {
    let model = model();
    let p = prompts(&golden_json(NAME));
    let (a, b) = (&p[2], &p[1]);
    let alone_a = model.forward_full(a, None).expect("a");
    let alone_b = model.forward_full(b, None).expect("b");
    let (mut ca, mut cb) = (model.new_cache(), model.new_cache());
    let mut seqs = [
        V4SeqInput {
            tokens: a,
            cache: &mut ca,
        },
        V4SeqInput {
            tokens: b,
            cache: &mut cb,
        },
    ];
    let out = model
        .forward(&mut seqs, LogitsMode::All, None)
        .expect("batch");
    let (da, db) = (out[0].max_abs_diff(&alone_a), out[1].max_abs_diff(&alone_b));
    // Float32 weights go through faer's GEMM, whose blocking (and so rounding) depends on the
    // number of rows; everything else is per row or per sequence. Hence a tolerance, not `==`.
    assert!(da <= 1e-4 && db <= 1e-4, "batched vs alone: {da} {db}");
    // A failed pass (a bad token in the second sequence) leaves both caches untouched.
    let (before_a, before_b) = (ca.clone(), cb.clone());
    let mut seqs = [
        V4SeqInput {
            tokens: &[5],
            cache: &mut ca,
        },
        V4SeqInput {
            tokens: &[100_000],
            cache: &mut cb,
        },
    ];
    let err = model
        .forward(&mut seqs, LogitsMode::Last, None)
        .expect_err("bad token");
    assert!(matches!(err, ModelError::InvalidInput(_)), "{err}");
    assert_eq!((ca, cb), (before_a, before_b));
}

#[test]
fn a_generated_tiny_v4_checkpoint_loads_and_decodes() {
    use moe_model::presets::GenDtype;
    use moe_model::v4::preset::{V4Preset, write_v4_preset};
    let dir = tempfile::tempdir().expect("tmp");
    write_v4_preset(V4Preset::Tiny, dir.path(), 7, GenDtype::Bf16).expect("write tiny-v4");
    let again = tempfile::tempdir().expect("tmp");
    write_v4_preset(V4Preset::Tiny, again.path(), 7, GenDtype::Bf16).expect("write again");
    let bytes = |d: &std::path::Path| std::fs::read(d.join("model.safetensors")).expect("read");
    assert_eq!(
        bytes(dir.path()),
        bytes(again.path()),
        "a seed gives the same bytes"
    );
    let model = V4Model::load(dir.path()).expect("tiny-v4 loads");
    let ids: Vec<u32> = (0..40).map(|i| (i * 37 % 512) as u32).collect();
    let full = model.forward_full(&ids, None).expect("forward");
    assert!(full.data.iter().all(|v| v.is_finite()));
    // Decoding the last tokens one by one gives the full forward's logits.
    let mut cache = model.new_cache();
    step(&model, &mut cache, &ids[..30]);
    for (i, &tok) in ids.iter().enumerate().skip(30) {
        let row = step(&model, &mut cache, &[tok]);
        let d = row
            .row(0)
            .iter()
            .zip(full.row(i))
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(d <= 1e-4, "position {i}: {d}");
    }
}

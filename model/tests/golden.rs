//! The engine against the Hugging Face reference outputs of `tests/fixtures/models`, with the
//! tolerances of that folder's README: logits and hidden states within 1e-3, routing identical
//! where its margins exceed 1e-4 (weights within 1e-4), greedy continuations identical wherever
//! the golden margin exceeds 1e-3.

pub mod common;

use common::*;
use moe_model::model::{LogitsMode, SeqInput};
use moe_model::{Model, SeqCache};

const TOL: f32 = 1e-3;
const ROUTING_MARGIN: f32 = 1e-4;

fn check_forward(name: &str) {
    let model = load(name);
    let json = golden_json(name);
    let logits = read_golden(name, "golden_logits.safetensors");
    let extra = read_golden(name, "golden_extra.safetensors");
    let mut worst = 0.0f32;
    for (i, ids) in prompts(&json).iter().enumerate() {
        let p = format!("prompt_{i}");
        let (ours, trace) = full_forward(&model, ids);
        worst = worst.max(assert_close(
            &format!("{name} {p} logits"),
            &ours,
            &logits.f32s[&p],
            TOL,
        ));
        assert_close(
            &format!("{name} {p} embed"),
            &trace.embed,
            &extra.f32s[&format!("hidden.{p}.embed")],
            TOL,
        );
        for (l, h) in trace.layers.iter().enumerate() {
            assert_close(
                &format!("{name} {p} layer {l}"),
                h,
                &extra.f32s[&format!("hidden.{p}.layer_{l}")],
                TOL,
            );
        }
        assert_close(
            &format!("{name} {p} final norm"),
            &trace.final_norm,
            &extra.f32s[&format!("hidden.{p}.final_norm")],
            TOL,
        );
        let mut compared = 0;
        for (layer, routing) in &trace.routing {
            let key = format!("routing.{p}.layer_{layer}");
            let (rows, k, gids) = &extra.ids[&format!("{key}.ids")];
            let gw = &extra.f32s[&format!("{key}.weights")];
            let em = &extra.f32s[&format!("{key}.expert_margin")];
            let gm = &extra.f32s[&format!("{key}.group_margin")];
            assert_eq!((*rows, *k), (ids.len(), routing.top_k));
            for t in 0..*rows {
                if em.data[t] <= ROUTING_MARGIN || gm.data[t] <= ROUTING_MARGIN {
                    continue;
                }
                let want: Vec<u32> = gids[t * k..(t + 1) * k].iter().map(|&v| v as u32).collect();
                assert_eq!(
                    routing.ids_of(t),
                    want.as_slice(),
                    "{name} {p} layer {layer} token {t} experts"
                );
                for (a, b) in routing.weights_of(t).iter().zip(gw.row(t)) {
                    assert!(
                        (a - b).abs() <= 1e-4,
                        "{name} {p} layer {layer} token {t} weights {a} vs {b}"
                    );
                }
                compared += 1;
            }
        }
        assert!(
            compared > 0 || trace.routing.is_empty(),
            "{name} {p}: no routing compared"
        );
    }
    eprintln!("{name}: max logit diff {worst:e}");
}

/// Prefill through the cache, then 24 greedy steps one token at a time.
fn check_greedy(name: &str) {
    let model = load(name);
    let json = golden_json(name);
    let extra = read_golden(name, "golden_extra.safetensors");
    for (i, ids) in prompts(&json).iter().enumerate() {
        let result = &json["results"][i];
        let want: Vec<u32> = result["generated_ids"]
            .as_array()
            .expect("ids")
            .iter()
            .map(|v| v.as_u64().expect("id") as u32)
            .collect();
        let margins: Vec<f64> = result["greedy_margins"]
            .as_array()
            .expect("margins")
            .iter()
            .map(|v| v.as_f64().expect("f"))
            .collect();
        let step_logits = &extra.f32s[&format!("greedy.prompt_{i}.step_logits")];
        let mut cache = SeqCache::new(model.config());
        let mut next: Vec<u32> = ids.clone();
        for (step, &expect) in want.iter().enumerate() {
            let mut seqs = [SeqInput {
                tokens: &next,
                cache: &mut cache,
            }];
            let logits = model
                .forward(&mut seqs, LogitsMode::Last, None)
                .expect("step")
                .remove(0);
            let golden_row = step_logits.row(step);
            let diff = logits
                .data
                .iter()
                .zip(golden_row)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f32::max);
            assert!(
                diff <= TOL,
                "{name} prompt_{i} step {step}: logits differ by {diff}"
            );
            let got = argmax(&logits.data);
            if got != expect {
                assert!(
                    margins[step] <= 1e-3,
                    "{name} prompt_{i} step {step}: {got} != {expect} (margin {})",
                    margins[step]
                );
                break; // a near-tie: the rest of the sequence legitimately diverges
            }
            next = vec![got];
        }
    }
}

#[test]
fn f32_forward_matches_golden() {
    check_forward("tiny-dsv3");
}

#[test]
fn bf16_forward_matches_golden() {
    check_forward("tiny-dsv3-bf16");
}

#[test]
fn fp8_forward_matches_golden() {
    check_forward("tiny-dsv3-fp8");
}

#[test]
fn f32_greedy_matches_golden() {
    check_greedy("tiny-dsv3");
}

#[test]
fn bf16_greedy_matches_golden() {
    check_greedy("tiny-dsv3-bf16");
}

#[test]
fn fp8_greedy_matches_golden() {
    check_greedy("tiny-dsv3-fp8");
}

fn decode_one_by_one(model: &Model, ids: &[u32], prefill: usize) -> Vec<f32> {
    let mut cache = SeqCache::new(model.config());
    let mut out = Vec::new();
    let mut seqs = [SeqInput {
        tokens: &ids[..prefill],
        cache: &mut cache,
    }];
    out.extend(
        model
            .forward(&mut seqs, LogitsMode::All, None)
            .expect("prefill")
            .remove(0)
            .data,
    );
    for t in prefill..ids.len() {
        let mut seqs = [SeqInput {
            tokens: &ids[t..t + 1],
            cache: &mut cache,
        }];
        out.extend(
            model
                .forward(&mut seqs, LogitsMode::Last, None)
                .expect("decode")
                .remove(0)
                .data,
        );
    }
    assert_eq!(cache.len(), ids.len());
    out
}

#[test]
fn incremental_decoding_with_the_compressed_cache_equals_the_full_forward() {
    for name in ["tiny-dsv3", "tiny-dsv3-bf16"] {
        let model = load(name);
        let ids = &prompts(&golden_json(name))[3]; // 400 tokens
        let (full, _) = full_forward(&model, ids);
        for prefill in [1, 37] {
            let inc = decode_one_by_one(&model, ids, prefill);
            let d = full
                .data
                .iter()
                .zip(&inc)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f32::max);
            assert!(
                d < 1e-4,
                "{name} prefill {prefill}: incremental differs from full by {d}"
            );
        }
    }
}

#[test]
fn a_sequence_gives_identical_logits_alone_or_in_a_batch() {
    let model = load("tiny-dsv3-bf16");
    let ps = prompts(&golden_json("tiny-dsv3-bf16"));
    let alone: Vec<_> = ps.iter().map(|ids| full_forward(&model, ids).0).collect();
    // All four prompts prefilled together, then two decode steps for all of them at once.
    let mut caches: Vec<SeqCache> = ps.iter().map(|_| SeqCache::new(model.config())).collect();
    let mut seqs: Vec<SeqInput<'_>> = ps
        .iter()
        .zip(caches.iter_mut())
        .map(|(ids, cache)| SeqInput { tokens: ids, cache })
        .collect();
    let batched = model
        .forward(&mut seqs, LogitsMode::All, None)
        .expect("batch");
    for (i, (a, b)) in alone.iter().zip(&batched).enumerate() {
        assert_eq!(
            a, b,
            "prompt_{i}: batched prefill differs from the prompt alone"
        );
    }
    let next: Vec<Vec<u32>> = batched
        .iter()
        .map(|m| vec![argmax(m.row(m.rows - 1))])
        .collect();
    let mut seqs: Vec<SeqInput<'_>> = next
        .iter()
        .zip(caches.iter_mut())
        .map(|(ids, cache)| SeqInput { tokens: ids, cache })
        .collect();
    let step = model
        .forward(&mut seqs, LogitsMode::Last, None)
        .expect("decode batch");
    for (i, ids) in ps.iter().enumerate() {
        let mut cache = SeqCache::new(model.config());
        let mut s = [SeqInput {
            tokens: ids,
            cache: &mut cache,
        }];
        model
            .forward(&mut s, LogitsMode::Last, None)
            .expect("prefill");
        let mut s = [SeqInput {
            tokens: &next[i],
            cache: &mut cache,
        }];
        let single = model
            .forward(&mut s, LogitsMode::Last, None)
            .expect("decode")
            .remove(0);
        assert_eq!(
            single, step[i],
            "prompt_{i}: batched decode differs from decoding alone"
        );
    }
}

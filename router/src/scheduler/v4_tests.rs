//! DeepSeek-V4 in the batching scheduler: the golden greedy continuations of `tiny-dsv4` with
//! all four prompts batched together; sampled tokens and logprobs that do not depend on the
//! batch (bit for bit on a bf16 `tiny-v4` where the AVX-512 kernels run); and sequences
//! preempted for pages, recomputed and resumed to the same tokens.

use std::path::{Path, PathBuf};

use moe_model::kernels::{KernelChoice, kernel_choice};
use moe_model::sampling::{Sampler, SamplingParams};
use moe_model::v4::V4Model;

use super::*;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/models/tiny-dsv4")
}

fn golden() -> serde_json::Value {
    let text = std::fs::read_to_string(fixture().join("golden/golden.json")).expect("golden");
    serde_json::from_str(&text).expect("golden parses")
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

fn request(prompt: Vec<u32>, params: SamplingParams, logprobs: Option<usize>) -> GenerationRequest {
    GenerationRequest {
        prompt,
        max_tokens: 24,
        sampler: Sampler::new(params),
        stop: Vec::new(),
        ignore_eos: true,
        logprobs,
    }
}

/// What one sequence received, and the most preemptions any sequence had.
struct Run {
    events: Vec<Vec<Event>>,
    preemptions: u32,
}

/// Runs `reqs` to completion through a scheduler loop over the V4 model in `dir`.
fn run(dir: &Path, kv: KvConfig, reqs: Vec<GenerationRequest>) -> Run {
    let model = V4Model::load(dir).expect("V4 model");
    let codec = Arc::new(TextCodec::from_dir(dir).expect("tokenizer"));
    let cfg = SchedulerConfig {
        kv,
        ..SchedulerConfig::default()
    };
    let mut l = Loop::new(
        Engine::local_v4(model),
        codec,
        cfg,
        Arc::new(Stats::default()),
    )
    .expect("loop");
    let mut rx = Vec::new();
    for req in reqs {
        let (events, r) = mpsc::unbounded_channel();
        l.stats.waiting.fetch_add(1, Ordering::SeqCst);
        l.enqueue(Command {
            req,
            events,
            span: tracing::Span::none(),
        });
        rx.push(r);
    }
    let mut preemptions = 0;
    loop {
        l.admit();
        if l.running.is_empty() && l.waiting.is_empty() {
            break;
        }
        l.step();
        let seen = l.running.iter().chain(&l.waiting).map(|s| s.preemptions);
        preemptions = preemptions.max(seen.max().unwrap_or(0));
    }
    let events = rx
        .iter_mut()
        .map(|r| std::iter::from_fn(|| r.try_recv().ok()).collect())
        .collect();
    Run {
        events,
        preemptions,
    }
}

fn token_ids(events: &[Event]) -> Vec<u32> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Token { id, .. } => Some(*id),
            _ => None,
        })
        .collect()
}

fn finished(events: &[Event]) -> bool {
    matches!(
        events.last(),
        Some(Event::Finished {
            completion_tokens: 24,
            ..
        })
    )
}

#[test]
fn the_golden_continuations_come_out_of_one_batch() {
    let g = golden();
    let prompts: Vec<Vec<u32>> = (0..4).map(|i| ids(&g["prompts"][i]["ids"])).collect();
    let reqs = prompts
        .iter()
        .map(|p| request(p.clone(), SamplingParams::default(), None))
        .collect();
    let out = run(&fixture(), KvConfig::default(), reqs);
    for (i, events) in out.events.iter().enumerate() {
        assert!(finished(events), "prompt_{i}: {events:?}");
        // Every golden margin is above 1e-2, far above batching's float32 rounding.
        assert_eq!(
            token_ids(events),
            ids(&g["results"][i]["generated_ids"]),
            "prompt_{i}"
        );
    }
}

#[test]
fn sampled_tokens_and_logprobs_do_not_depend_on_the_batch() {
    let dir = tempfile::tempdir().expect("tmp");
    moe_model::v4::preset::write_v4_preset(
        moe_model::v4::preset::V4Preset::Tiny,
        dir.path(),
        3,
        moe_model::presets::GenDtype::Bf16,
    )
    .expect("tiny-v4");
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(fixture().join(f), dir.path().join(f)).expect("tokenizer");
    }
    let reqs = || -> Vec<GenerationRequest> {
        (0..6)
            .map(|i| {
                let prompt = (0..(5 + 9 * i)).map(|t| ((t * 31 + i * 7) % 500) as u32 + 2);
                let params = SamplingParams {
                    temperature: 0.9,
                    top_p: 0.95,
                    seed: Some(i as u64),
                    ..SamplingParams::default()
                };
                request(prompt.collect(), params, Some(3))
            })
            .collect()
    };
    let together = run(dir.path(), KvConfig::default(), reqs());
    let alone: Vec<Vec<Event>> = reqs()
        .into_iter()
        .map(|r| {
            run(dir.path(), KvConfig::default(), vec![r])
                .events
                .remove(0)
        })
        .collect();
    for (i, (t, a)) in together.events.iter().zip(&alone).enumerate() {
        assert!(finished(t), "request {i}: {t:?}");
        if kernel_choice() == KernelChoice::Avx512 {
            assert_eq!(t, a, "request {i}: batched vs alone");
        } else {
            eprintln!(
                "portable kernels: bitwise batch independence not checked (faer's rounding depends on the row count)"
            );
            assert_eq!(t.len(), a.len());
        }
    }
}

#[test]
fn sequences_preempted_for_pages_resume_to_the_golden_tokens() {
    let g = golden();
    let prompt = ids(&g["prompts"][2]["ids"]);
    let want = ids(&g["results"][2]["generated_ids"]);
    let model = V4Model::load(&fixture()).expect("tiny-dsv4");
    let probe = Engine::local_v4(model);
    let mut kv = KvConfig {
        page_tokens: 4,
        ..KvConfig::default()
    };
    let layout = probe.kv_layout(&kv).expect("layout");
    // Admission counts a prompt plus one page of headroom: three are admitted, and they
    // outgrow the budget as they decode, so the youngest is preempted.
    let admitted = layout.pages_for(prompt.len() + 4);
    assert!(3 * layout.pages_for(prompt.len() + 24) > 3 * admitted + 3);
    kv.budget_bytes = layout.page_bytes() * (3 * admitted + 3);
    let reqs = (0..4)
        .map(|_| request(prompt.clone(), SamplingParams::default(), None))
        .collect();
    let out = run(&fixture(), kv, reqs);
    assert!(out.preemptions > 0, "nothing was preempted");
    for (i, events) in out.events.iter().enumerate() {
        assert!(finished(events), "request {i}: {events:?}");
        assert_eq!(token_ids(events), want, "request {i}");
    }
}

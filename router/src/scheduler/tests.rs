//! Scheduler tests: which sequences a failed pass hits, and a step whose dispatch fails for one
//! sequence's rows (experts without a replica) failing only that sequence while the other
//! continues to its golden ids.

use std::path::PathBuf;
use std::sync::Mutex;

use moe_model::gate::Routing;
use moe_model::model::Model;
use moe_model::sampling::{Sampler, SamplingParams};
use moe_model::{DispatchClass, ExpertBackend, LoadOptions, ModelError, PendingExperts};

use super::*;

fn dispatch_error(rows: Vec<usize>) -> ModelError {
    ModelError::Dispatch {
        layer: 1,
        class: DispatchClass::Unavailable,
        rows,
        reason: "test".into(),
    }
}

#[test]
fn only_the_sequences_owning_the_failed_rows_are_hit() {
    // Three sequences: a decode token (row 0), a 4-token prefill chunk (rows 1-4), a decode
    // token (row 5).
    let inputs = vec![(7, vec![1]), (2, vec![1, 2, 3, 4]), (0, vec![9])];
    assert_eq!(hit_inputs(&inputs, &dispatch_error(vec![3])), vec![1]);
    assert_eq!(hit_inputs(&inputs, &dispatch_error(vec![0, 5])), vec![0, 2]);
    assert_eq!(hit_inputs(&inputs, &dispatch_error(vec![1, 4])), vec![1]);
    // No rows named, rows beyond the batch, or another error: every sequence.
    assert_eq!(hit_inputs(&inputs, &dispatch_error(vec![])), vec![0, 1, 2]);
    assert_eq!(hit_inputs(&inputs, &dispatch_error(vec![6])), vec![0, 1, 2]);
    let other = ModelError::InvalidInput("x".into());
    assert_eq!(hit_inputs(&inputs, &other), vec![0, 1, 2]);
}

/// Local experts that fail the first dispatch of a batch of `rows_at_least` rows or more, naming
/// its rows `fail` as the ones whose experts are unavailable.
struct FailRows {
    inner: moe_model::LocalExperts,
    rows_at_least: usize,
    fail: Vec<usize>,
    failed: Mutex<usize>,
}

impl ExpertBackend for FailRows {
    fn dispatch<'a>(
        &'a self,
        layer: usize,
        x: &'a Matrix,
        routing: &'a Routing,
    ) -> moe_model::Result<Box<dyn PendingExperts + 'a>> {
        let mut failed = self.failed.lock().unwrap_or_else(|p| p.into_inner());
        if *failed == 0 && x.rows >= self.rows_at_least {
            *failed += 1;
            return Err(ModelError::Dispatch {
                layer,
                class: DispatchClass::Unavailable,
                rows: self.fail.clone(),
                reason: "no live replica of expert 7 (test)".into(),
            });
        }
        self.inner.dispatch(layer, x, routing)
    }
}

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/models/tiny-dsv3")
}

fn request(prompt: Vec<u32>) -> GenerationRequest {
    GenerationRequest {
        prompt,
        max_tokens: 24,
        sampler: Sampler::new(SamplingParams::default()),
        stop: Vec::new(),
        ignore_eos: true,
        logprobs: None,
    }
}

#[test]
fn a_dispatch_failure_fails_only_the_sequences_that_needed_the_missing_experts() {
    let dir = fixture();
    let golden: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("golden/golden.json")).expect("golden.json"),
    )
    .expect("golden parses");
    let ids = |v: &serde_json::Value| -> Vec<u32> {
        v.as_array()
            .expect("array")
            .iter()
            .map(|x| x.as_u64().expect("id") as u32)
            .collect()
    };
    let (a_prompt, b_prompt) = (
        ids(&golden["prompts"][0]["ids"]),
        ids(&golden["prompts"][2]["ids"]),
    );
    let b_want = ids(&golden["results"][2]["generated_ids"]);
    let model = Model::load(&dir, &LoadOptions::default()).expect("model");
    // The first pass batches both prompts (A's rows first); it fails naming A's rows only.
    let backend = FailRows {
        inner: model.experts,
        rows_at_least: a_prompt.len() + b_prompt.len(),
        fail: (0..a_prompt.len()).collect(),
        failed: Mutex::new(0),
    };
    let engine = Engine::with_backend(model.backbone, Box::new(backend));
    let codec = Arc::new(TextCodec::from_dir(&dir).expect("tokenizer"));
    let cfg = SchedulerConfig::default();
    let mut l = Loop::new(engine, codec, cfg, Arc::new(Stats::default())).expect("loop");
    let mut rx = Vec::new();
    for prompt in [a_prompt, b_prompt] {
        let (events, r) = mpsc::unbounded_channel();
        l.stats.waiting.fetch_add(1, Ordering::SeqCst);
        l.enqueue(Command {
            req: request(prompt),
            events,
            span: tracing::Span::none(),
        });
        rx.push(r);
    }
    l.admit();
    assert_eq!(l.running.len(), 2, "both admitted into one batch");
    while !l.running.is_empty() {
        l.step();
    }
    let (mut a, mut b) = (Vec::new(), Vec::new());
    while let Ok(ev) = rx[0].try_recv() {
        a.push(ev);
    }
    while let Ok(ev) = rx[1].try_recv() {
        b.push(ev);
    }
    assert!(
        matches!(a.as_slice(), [Event::Failed(ApiError::Unavailable(m))] if m.contains("no live replica")),
        "A failed with 503 and nothing else: {a:?}"
    );
    let b_ids: Vec<u32> = b
        .iter()
        .filter_map(|e| match e {
            Event::Token { id, .. } => Some(*id),
            _ => None,
        })
        .collect();
    assert_eq!(b_ids, b_want, "B continued to its golden ids");
    assert!(matches!(
        b.last(),
        Some(Event::Finished {
            completion_tokens: 24,
            ..
        })
    ));
}

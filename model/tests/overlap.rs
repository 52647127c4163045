//! Two-batch overlap in the forward pass: the two micro-batches give the serial path's logits
//! bit for bit on bf16 and FP8 models (the AVX-512 kernel's rows do not depend on the batch; the
//! portable path's single rows may, see `row_independence.rs`), a group really computes while the
//! other waits for its experts, and a dispatch failure in one group names that group's rows of
//! the whole batch and leaves every cache as it was.

pub mod common;

use std::collections::HashMap;
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use moe_model::gate::Routing;
use moe_model::kernels::{KernelChoice, kernel_choice};
use moe_model::model::{LogitsMode, Model, SeqInput};
use moe_model::moe::run_experts;
use moe_model::{
    Assignments, DispatchClass, ExpertBackend, ExpertStore, Matrix, ModelError, Overlap,
    PendingExperts, Result, SeqCache,
};

/// Prompts of 5, 1, 7, 3, 2 and 9 tokens: the split puts the first three (13 rows) in one group
/// and the last three (14 rows) in the other.
fn prompts() -> Vec<Vec<u32>> {
    [5usize, 1, 7, 3, 2, 9]
        .iter()
        .enumerate()
        .map(|(s, &n)| {
            (0..n)
                .map(|i| ((s * 131 + i * 37) % 500 + 3) as u32)
                .collect()
        })
        .collect()
}

/// Runs `inputs` (one entry per sequence) through `caches`; logits as bit patterns.
fn pass(
    model: &Model,
    backend: &dyn ExpertBackend,
    caches: &mut [SeqCache],
    inputs: &[Vec<u32>],
    mode: LogitsMode,
    overlap: Overlap,
) -> Result<Vec<Vec<u32>>> {
    let mut seqs: Vec<SeqInput<'_>> = caches
        .iter_mut()
        .zip(inputs)
        .map(|(cache, tokens)| SeqInput { tokens, cache })
        .collect();
    let out = model
        .backbone
        .forward_with(&mut seqs, backend, mode, None, overlap)?;
    Ok(out
        .iter()
        .map(|m| m.data.iter().map(|v| v.to_bits()).collect())
        .collect())
}

/// A prefill of every prompt (all logits), then three decode steps, under `backend`.
fn run(model: &Model, backend: &dyn ExpertBackend, overlap: Overlap) -> Vec<Vec<Vec<u32>>> {
    let prompts = prompts();
    let mut caches: Vec<SeqCache> = prompts.iter().map(|_| model.new_cache()).collect();
    let mut out = vec![
        pass(
            model,
            backend,
            &mut caches,
            &prompts,
            LogitsMode::All,
            overlap,
        )
        .expect("prefill"),
    ];
    for step in 0..3u32 {
        let next: Vec<Vec<u32>> = (0..prompts.len() as u32)
            .map(|s| vec![(s * 7 + step * 11) % 500 + 3])
            .collect();
        out.push(
            pass(
                model,
                backend,
                &mut caches,
                &next,
                LogitsMode::Last,
                overlap,
            )
            .expect("decode"),
        );
    }
    out
}

/// Local experts reporting themselves remote, whose wait for layer `l` returns only once both
/// groups have dispatched layer `l`: a group that kept the compute lock while waiting would
/// never let the other reach its dispatch.
struct Rendezvous<'s> {
    store: &'s ExpertStore,
    dispatched: Mutex<HashMap<usize, usize>>,
    cv: Condvar,
}

struct RendezvousWait<'a, 's> {
    r: &'a Rendezvous<'s>,
    layer: usize,
    x: &'a Matrix,
    routing: &'a Routing,
}

impl ExpertBackend for Rendezvous<'_> {
    fn dispatch<'a>(
        &'a self,
        layer: usize,
        x: &'a Matrix,
        routing: &'a Routing,
    ) -> Result<Box<dyn PendingExperts + 'a>> {
        *self
            .dispatched
            .lock()
            .expect("lock")
            .entry(layer)
            .or_default() += 1;
        self.cv.notify_all();
        Ok(Box::new(RendezvousWait {
            r: self,
            layer,
            x,
            routing,
        }))
    }

    fn is_remote(&self) -> bool {
        true
    }
}

impl PendingExperts for RendezvousWait<'_, '_> {
    fn wait(self: Box<Self>) -> Result<Matrix> {
        let seen = self.r.dispatched.lock().expect("lock");
        // A bound for the failure only: the other group's attention takes milliseconds.
        let (seen, timeout) = self
            .r
            .cv
            .wait_timeout_while(seen, Duration::from_secs(30), |d| d[&self.layer] < 2)
            .expect("lock");
        drop(seen);
        if timeout.timed_out() {
            return Err(ModelError::Experts {
                layer: self.layer,
                reason: "the other group never dispatched while this one waited".into(),
            });
        }
        let layer = self.layer;
        run_experts(
            layer,
            self.x,
            &Assignments::from_routing(self.routing),
            |e| self.r.store.get(layer, e),
        )
    }
}

fn rendezvous(store: &ExpertStore) -> Rendezvous<'_> {
    Rendezvous {
        store,
        dispatched: Mutex::new(HashMap::new()),
        cv: Condvar::new(),
    }
}

fn needs_avx512() -> bool {
    if kernel_choice() != KernelChoice::Avx512 {
        eprintln!("skipped: the bitwise claim is the AVX-512 kernel's (this CPU has none)");
        return false;
    }
    true
}

#[test]
fn overlapped_groups_give_the_serial_logits_bit_for_bit_bf16_and_fp8() {
    if !needs_avx512() {
        return;
    }
    for name in ["tiny-dsv3-bf16", "tiny-dsv3-fp8"] {
        let model = common::load(name);
        let serial = run(&model, &model.experts, Overlap::Off);
        // Local experts keep the lock in their wait (they compute there).
        let on = run(&model, &model.experts, Overlap::On);
        assert!(serial == on, "{name}: overlap on (local experts) differs");
        // Experts that say they are remote: the lock is released in every wait, and each wait
        // returns only after the other group has dispatched the same layer.
        let remote = run(&model, &rendezvous(&model.experts.store), Overlap::On);
        assert!(
            serial == remote,
            "{name}: overlapped groups differ from serial"
        );
    }
}

/// Local experts reporting themselves remote that fail the first dispatch of a batch of
/// `rows` rows, naming `fail` (rows of that batch) as the ones whose experts are missing.
struct FailGroup<'s> {
    store: &'s ExpertStore,
    rows: usize,
    fail: Vec<usize>,
    failed: Mutex<bool>,
}

impl ExpertBackend for FailGroup<'_> {
    fn dispatch<'a>(
        &'a self,
        layer: usize,
        x: &'a Matrix,
        routing: &'a Routing,
    ) -> Result<Box<dyn PendingExperts + 'a>> {
        let mut failed = self.failed.lock().expect("lock");
        if !*failed && x.rows == self.rows {
            *failed = true;
            return Err(ModelError::Dispatch {
                layer,
                class: DispatchClass::Unavailable,
                rows: self.fail.clone(),
                reason: "no live replica (test)".into(),
            });
        }
        let out = run_experts(layer, x, &Assignments::from_routing(routing), |e| {
            self.store.get(layer, e)
        })?;
        Ok(Box::new(moe_model::moe::Ready(out)))
    }

    fn is_remote(&self) -> bool {
        true
    }
}

#[test]
fn a_failure_in_one_group_names_its_rows_of_the_whole_batch_and_keeps_the_caches() {
    let model = common::load("tiny-dsv3-bf16");
    let prompts = prompts();
    // Group 0: sequences 0-2, rows 0..13; group 1: sequences 3-5, rows 13..27.
    for (group_rows, fail, want) in [
        (14, vec![1, 5], vec![14, 18]),
        (14, vec![], (13..27).collect::<Vec<_>>()),
        (13, vec![12], vec![12]),
    ] {
        let backend = FailGroup {
            store: &model.experts.store,
            rows: group_rows,
            fail,
            failed: Mutex::new(false),
        };
        let mut caches: Vec<SeqCache> = prompts.iter().map(|_| model.new_cache()).collect();
        let err = pass(
            &model,
            &backend,
            &mut caches,
            &prompts,
            LogitsMode::All,
            Overlap::On,
        )
        .expect_err("the group's dispatch fails");
        match err {
            ModelError::Dispatch { rows, .. } => assert_eq!(rows, want),
            other => panic!("expected a dispatch error, got {other}"),
        }
        assert!(
            caches.iter().all(|c| c.is_empty()),
            "a failed pass leaves every cache as it was"
        );
        // The same pass again (the backend fails once) succeeds and equals the serial one.
        let again = pass(
            &model,
            &backend,
            &mut caches,
            &prompts,
            LogitsMode::All,
            Overlap::On,
        )
        .expect("second pass");
        let mut fresh: Vec<SeqCache> = prompts.iter().map(|_| model.new_cache()).collect();
        let serial = pass(
            &model,
            &model.experts,
            &mut fresh,
            &prompts,
            LogitsMode::All,
            Overlap::Off,
        )
        .expect("serial");
        if kernel_choice() == KernelChoice::Avx512 {
            assert!(again == serial, "the retried pass equals the serial one");
        }
    }
}

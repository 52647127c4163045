//! The forward pass with routed experts computed by another thread on the same rayon pool, the
//! way `moe up` runs expert nodes inside the router's process: the engine must wait for them
//! outside rayon jobs, or a pool worker blocked in the wait leaves the experts' compute queued
//! behind it for ever. The pool has one thread here so that waiting inside a rayon job
//! deadlocks every time rather than by chance (it did on the bench preset with two threads).

pub mod common;

use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;

use moe_model::gate::Routing;
use moe_model::model::{LogitsMode, Model, SeqInput};
use moe_model::moe::run_experts;
use moe_model::{
    Assignments, ExpertBackend, ExpertStore, Matrix, ModelError, PendingExperts, Result, SeqCache,
};

/// Routed experts computed on their own thread, answered through a channel.
struct OtherThread {
    store: Arc<ExpertStore>,
}

struct Answer {
    layer: usize,
    rx: mpsc::Receiver<Result<Matrix>>,
}

impl ExpertBackend for OtherThread {
    fn dispatch<'a>(
        &'a self,
        layer: usize,
        x: &'a Matrix,
        routing: &'a Routing,
    ) -> Result<Box<dyn PendingExperts + 'a>> {
        let (tx, rx) = mpsc::channel();
        let store = Arc::clone(&self.store);
        let x = x.clone();
        let assignments = Assignments::from_routing(routing);
        std::thread::spawn(move || {
            let out = run_experts(layer, &x, &assignments, |e| store.get(layer, e));
            let _ = tx.send(out);
        });
        Ok(Box::new(Answer { layer, rx }))
    }
}

impl PendingExperts for Answer {
    fn wait(self: Box<Self>) -> Result<Matrix> {
        self.rx.recv().map_err(|_| ModelError::Experts {
            layer: self.layer,
            reason: "the expert thread went away".into(),
        })?
    }
}

#[test]
fn experts_computed_on_the_same_pool_by_another_thread_do_not_deadlock() {
    rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build_global()
        .expect("this test binary sets up the global pool once");
    let model = common::load("tiny-dsv3-bf16");
    let prompt: Vec<u32> = (0..48).map(|i| (i * 37 % 500 + 4) as u32).collect();
    let mut cache = SeqCache::new(model.config());
    let local = model
        .forward(
            &mut [SeqInput {
                tokens: &prompt,
                cache: &mut cache,
            }],
            LogitsMode::All,
            None,
        )
        .expect("forward with local experts");

    let Model { backbone, experts } = model;
    let backend = OtherThread {
        store: Arc::new(experts.store),
    };
    let (done_tx, done_rx) = mpsc::channel();
    let ids = prompt.clone();
    std::thread::spawn(move || {
        let mut cache = SeqCache::new(backbone.config());
        let out = backbone.forward(
            &mut [SeqInput {
                tokens: &ids,
                cache: &mut cache,
            }],
            &backend,
            LogitsMode::All,
            None,
        );
        let _ = done_tx.send(out);
    });
    // A bound for the failure only: a tiny-model forward takes milliseconds.
    let remote = done_rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the forward pass finished (no deadlock between the wait and the experts)")
        .expect("forward with experts on another thread");
    assert_eq!(remote.len(), 1);
    assert_eq!(remote[0].data, local[0].data, "same logits either way");
}

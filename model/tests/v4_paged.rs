//! The DeepSeek-V4 decode cache under the page budget (`tests/fixtures/models/tiny-dsv4`): a
//! pass that fails half-way through its layers (after the windows, compressor buffers and
//! entries of the first layers grew) is undone by truncation, and decoding then continues to
//! the full forward's logits; the pages a sequence holds always cover its state, and the
//! growing part is counted exactly; a reservation the pool cannot give changes nothing.

pub mod common;

use std::sync::atomic::{AtomicUsize, Ordering};

use common::{fixture, golden_json, prompts};
use moe_model::gate::Routing;
use moe_model::model::LogitsMode;
use moe_model::v4::paged::{layout, state_bound};
use moe_model::v4::{PagedV4Cache, V4Model, V4SeqInput};
use moe_model::{ExpertBackend, KvPool, Matrix, ModelError, PendingExperts};

const NAME: &str = "tiny-dsv4";

/// The model's own experts, failing at `layer` while `fail` is above zero (counting down).
struct FailAt<'a> {
    inner: &'a dyn ExpertBackend,
    layer: usize,
    fail: AtomicUsize,
}

impl ExpertBackend for FailAt<'_> {
    fn dispatch<'a>(
        &'a self,
        layer: usize,
        x: &'a Matrix,
        routing: &'a Routing,
    ) -> moe_model::Result<Box<dyn PendingExperts + 'a>> {
        if layer == self.layer && self.fail.load(Ordering::SeqCst) > 0 {
            self.fail.fetch_sub(1, Ordering::SeqCst);
            return Err(ModelError::Experts {
                layer,
                reason: "injected".into(),
            });
        }
        self.inner.dispatch(layer, x, routing)
    }
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn a_pass_that_fails_half_way_is_undone_and_decoding_goes_on() {
    let model = V4Model::load(&fixture(NAME)).expect("tiny-dsv4 loads");
    let ids = prompts(&golden_json(NAME))[3].clone(); // 400 tokens
    let full = model.forward_full(&ids, None).expect("full forward");
    // Layer 4 is the last; every CSA/HCA layer before it has appended by then.
    let experts = FailAt {
        inner: &model.experts,
        layer: model.config().num_hidden_layers - 1,
        fail: AtomicUsize::new(0),
    };
    let mut cache = model.new_cache();
    let mut at = 0;
    // Chunks that complete compressor windows (rates 4 and 8) and overflow the window (12).
    for chunk in [5, 17, 1, 32, 3, 64] {
        let before = cache.clone();
        experts.fail.store(1, Ordering::SeqCst);
        let mut seqs = [V4SeqInput {
            tokens: &ids[at..at + chunk],
            cache: &mut cache,
        }];
        let err = model
            .backbone
            .forward(&mut seqs, &experts, LogitsMode::All, None)
            .expect_err("injected failure");
        assert!(matches!(err, ModelError::Experts { .. }), "{err}");
        assert_eq!(
            cache, before,
            "the failed pass of {chunk} tokens at {at} was undone"
        );
        let mut seqs = [V4SeqInput {
            tokens: &ids[at..at + chunk],
            cache: &mut cache,
        }];
        let out = model
            .backbone
            .forward(&mut seqs, &experts, LogitsMode::All, None)
            .expect("the pass again")
            .remove(0);
        let want = &full.data[at * full.cols..(at + chunk) * full.cols];
        let d = max_diff(&out.data, want);
        assert!(d <= 1e-4, "tokens {at}..{}: {d}", at + chunk);
        at += chunk;
    }
}

#[test]
fn the_pages_held_cover_the_state_and_count_its_growth_exactly() {
    let model = V4Model::load(&fixture(NAME)).expect("tiny-dsv4 loads");
    let cfg = model.config().clone();
    let ids = prompts(&golden_json(NAME))[3].clone();
    let l = layout(&cfg, 16);
    assert!(l.fixed_pages > 0 && l.width > 0, "{l:?}");
    let pool = KvPool::new(l, None, false);
    let mut paged = PagedV4Cache::new(&cfg, &pool);
    let mut bytes_at = std::collections::BTreeMap::new();
    let mut at = 0;
    for chunk in [1, 7, 24, 8, 40, 120, 200] {
        paged.reserve(chunk).expect("unbounded pool");
        assert_eq!(paged.pages_held(), l.pages_for(at + chunk));
        let mut seqs = [V4SeqInput {
            tokens: &ids[at..at + chunk],
            cache: paged.cache_mut(),
        }];
        model
            .forward(&mut seqs, LogitsMode::Last, None)
            .expect("forward");
        at += chunk;
        let bytes = paged.cache().bytes();
        assert!(
            bytes <= state_bound(&cfg, at),
            "{bytes} B at {at} tokens over the bound {}",
            state_bound(&cfg, at)
        );
        assert!(
            bytes <= paged.pages_held() * l.page_bytes(),
            "{bytes} B at {at} tokens over {} pages of {} B",
            paged.pages_held(),
            l.page_bytes()
        );
        bytes_at.insert(at, bytes);
    }
    // Between two lengths where every window is full and every compressor buffer in the same
    // phase (multiples of 8), the state grows by exactly the counted bytes per token.
    let grown = bytes_at[&400] - bytes_at[&80];
    assert_eq!(grown, state_bound(&cfg, 400) - state_bound(&cfg, 80));
    assert_eq!(pool.stats().live, paged.pages_held());
    paged.release();
    assert_eq!((paged.len(), paged.pages_held()), (0, 0));
    assert_eq!(pool.stats().live, 0, "pages went back to the pool");
}

#[test]
fn a_reservation_the_pool_cannot_give_changes_nothing() {
    let model = V4Model::load(&fixture(NAME)).expect("tiny-dsv4 loads");
    let cfg = model.config().clone();
    let l = layout(&cfg, 16);
    let pool = KvPool::new(l, Some(l.fixed_pages + 2), false);
    let mut a = PagedV4Cache::new(&cfg, &pool);
    a.reserve(32).expect("fixed pages and two of tokens");
    let mut b = PagedV4Cache::new(&cfg, &pool);
    let err = b.reserve(1).expect_err("the pool is spent");
    assert!(matches!(err, ModelError::KvCacheFull { .. }), "{err}");
    assert_eq!(b.pages_held(), 0);
    assert_eq!(pool.stats().live, a.pages_held());
    a.release();
    b.reserve(1).expect("room again");
}

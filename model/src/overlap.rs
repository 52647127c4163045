//! Two-batch overlap: a forward pass split into two micro-batches (contiguous groups of
//! sequences, balanced by tokens) whose layer loops interleave, so that while one group's routed
//! experts are remote (dispatched, waiting for the expert nodes) the other runs attention, its
//! gate and its shared expert. This is DeepSeek's "two-batch overlap" (SGLang's TBO,
//! MegaScale-Infer's ping-pong) on CPU.
//!
//! Each group runs [`crate::model::Backbone`]'s layer loop on a scoped thread of its own under a
//! *compute lock*: a thread holds it while computing and releases it only while it waits for its
//! remote experts (`PendingExperts::wait`), so exactly one group computes at a time and the
//! model's kernels never see two callers on the rayon pool at once (no oversubscription, and the
//! waits stay outside rayon jobs, see `PendingExperts::wait`). Both groups' dispatches travel on
//! the same per-node streams (the protocol has many requests in flight per stream).
//!
//! The split changes no token's arithmetic where every product's rows are independent of the
//! other rows in it: the AVX-512 and AVX2 packed kernels always (`model/tests/row_independence.rs`),
//! so bf16, FP8 and FP4 models give bitwise the serial path's logits. The `faer` path (float32
//! weights, or CPUs without AVX2) multiplies a lone row by its matrix-vector order, so a group of one
//! token row can differ from the serial result within rounding (groups of two rows or more are
//! exact there too). Replicated experts whose replica is drawn per dispatch also change which
//! node's partial sum is rounded (bf16 on the wire), overlap or not.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};

use crate::error::{ModelError, Result};
use crate::model::{Backbone, SeqInput};
use crate::moe::ExpertBackend;

/// Whether a forward pass splits its batch into two interleaved micro-batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Overlap {
    /// Always the serial layer loop.
    Off,
    /// Split every batch of two sequences or more.
    On,
    /// Split where it helps: the routed experts are remote
    /// ([`crate::ExpertBackend::is_remote`]) and the batch has at least
    /// [`AUTO_MIN_TOKENS`] tokens in two sequences or more.
    #[default]
    Auto,
}

/// The smallest batch (tokens of one forward pass) `auto` splits. Each group reads every
/// router weight again, and with about one token per expert the two halves read more expert
/// bytes on the nodes than the whole batch: at 32 decode tokens on the bench preset overlap
/// measured 0.86-1.08× (`bench/overlap.sh`), so decode-sized steps stay serial. From 256 tokens
/// each half routes about 4 tokens to every expert (top-8 of 256), where the second read of the
/// weights is amortised (512-token prompts: 1.06×).
pub const AUTO_MIN_TOKENS: usize = 256;

impl std::str::FromStr for Overlap {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "off" => Ok(Overlap::Off),
            "on" => Ok(Overlap::On),
            "auto" => Ok(Overlap::Auto),
            other => Err(format!("overlap `{other}`: expected on, off or auto")),
        }
    }
}

impl std::fmt::Display for Overlap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Overlap::Off => "off",
            Overlap::On => "on",
            Overlap::Auto => "auto",
        })
    }
}

impl Overlap {
    /// Where to split a batch whose sequences have `tokens` new tokens each: `Some(k)` runs
    /// sequences `..k` and `k..` as two groups, `None` the serial path.
    pub fn split(self, remote: bool, tokens: &[usize]) -> Option<usize> {
        let total: usize = tokens.iter().sum();
        let wanted = match self {
            Overlap::Off => false,
            Overlap::On => true,
            Overlap::Auto => remote && total >= AUTO_MIN_TOKENS,
        };
        if !wanted || tokens.len() < 2 {
            return None;
        }
        Some(balanced_split(tokens))
    }
}

/// The `k` in `1..len` that makes `tokens[..k]` and `tokens[k..]` closest in sum (the first
/// such `k` on a tie).
pub fn balanced_split(tokens: &[usize]) -> usize {
    let total: usize = tokens.iter().sum();
    let mut best = (usize::MAX, 1);
    let mut left = 0;
    for (k, &n) in tokens.iter().enumerate().take(tokens.len() - 1) {
        left += n;
        let diff = left.abs_diff(total - left);
        if diff < best.0 {
            best = (diff, k + 1);
        }
    }
    best.1
}

/// What a group's layer loop shares with the other group: the compute lock and a flag that
/// stops a group early once the other has failed (the step fails either way).
#[derive(Debug, Default)]
pub(crate) struct Turns {
    compute: Mutex<()>,
    failed: AtomicBool,
    /// Whether waits release the lock (remote experts: the wait is I/O); local experts compute
    /// inside the wait, so they keep it.
    release_in_wait: bool,
}

/// A group's hold on the compute lock (none on the serial path).
pub(crate) struct Turn<'a> {
    turns: Option<&'a Turns>,
    guard: Option<MutexGuard<'a, ()>>,
}

impl Turns {
    pub(crate) fn new(release_in_wait: bool) -> Turns {
        Turns {
            release_in_wait,
            ..Turns::default()
        }
    }

    /// Marks the step failed: the other group stops at its next layer.
    pub(crate) fn fail(&self) {
        self.failed.store(true, Ordering::Relaxed);
    }
}

impl<'a> Turn<'a> {
    /// The serial path: no lock.
    pub(crate) fn serial() -> Turn<'a> {
        Turn {
            turns: None,
            guard: None,
        }
    }

    /// Takes the compute lock of `turns` (a poisoned lock guards nothing: `()`).
    pub(crate) fn take(turns: &'a Turns) -> Turn<'a> {
        Turn {
            turns: Some(turns),
            guard: Some(turns.compute.lock().unwrap_or_else(|p| p.into_inner())),
        }
    }

    /// Whether the other group failed (this one should stop).
    pub(crate) fn stopped(&self) -> bool {
        self.turns.is_some_and(|t| t.failed.load(Ordering::Relaxed))
    }

    /// Runs `wait` with the lock released (when the wait is I/O), then takes it back.
    pub(crate) fn waiting<T>(&mut self, wait: impl FnOnce() -> T) -> T {
        let Some(turns) = self.turns.filter(|t| t.release_in_wait) else {
            return wait();
        };
        self.guard = None;
        let out = wait();
        self.guard = Some(turns.compute.lock().unwrap_or_else(|p| p.into_inner()));
        out
    }
}

/// Runs the layer loop of `seqs[..k]` and `seqs[k..]` (rows `h`, cos/sin rows `rope`) as two
/// groups on scoped threads, taking turns on the compute lock. The first group's error wins (its
/// rows mapped to the whole batch); a group that fails stops the other at its next layer.
pub(crate) fn run(
    backbone: &Backbone,
    seqs: &mut [SeqInput<'_>],
    h: &mut [f32],
    (cos, sin): (&[f32], &[f32]),
    experts: &dyn ExpertBackend,
    k: usize,
) -> Result<()> {
    let hid = backbone.config().hidden_size;
    let rows = h.len() / hid;
    let half = cos.len() / rows.max(1);
    let rows_a: usize = seqs[..k].iter().map(|s| s.tokens.len()).sum();
    let (seqs_a, seqs_b) = seqs.split_at_mut(k);
    let (h_a, h_b) = h.split_at_mut(rows_a * hid);
    let (cos_a, cos_b) = cos.split_at(rows_a * half);
    let (sin_a, sin_b) = sin.split_at(rows_a * half);
    let turns = Turns::new(experts.is_remote());
    // The step's span (the scheduler's `engine.step`) stays the parent of each layer's dispatch.
    let span = tracing::Span::current();
    let group = |seqs: &mut [SeqInput<'_>], h: &mut [f32], rope: (&[f32], &[f32])| {
        let _e = span.enter();
        let mut turn = Turn::take(&turns);
        let r = backbone.layers(seqs, h, rope, experts, None, &mut turn);
        if r.is_err() {
            turns.fail();
        }
        r
    };
    let (a, b) = std::thread::scope(|s| {
        let a = std::thread::Builder::new()
            .name("moe-overlap-a".into())
            .spawn_scoped(s, || group(seqs_a, h_a, (cos_a, sin_a)));
        let b = group(seqs_b, h_b, (cos_b, sin_b));
        let a = match a {
            Ok(handle) => handle
                .join()
                .unwrap_or_else(|p| std::panic::resume_unwind(p)),
            Err(e) => Err(ModelError::Experts {
                layer: 0,
                reason: format!("cannot start the overlap thread: {e}"),
            }),
        };
        (a, b)
    });
    match (a, b) {
        (Err(e), _) => Err(to_batch_rows(e, 0, rows_a)),
        (_, Err(e)) => Err(to_batch_rows(e, rows_a, rows - rows_a)),
        (Ok(_), Ok(_)) => Ok(()),
    }
}

/// Rows of the full batch named by a group's error: a dispatch error's rows (empty: all of the
/// group's) shifted by the group's first row; any other error as it is.
pub(crate) fn to_batch_rows(e: ModelError, first_row: usize, rows: usize) -> ModelError {
    match e {
        ModelError::Dispatch {
            layer,
            class,
            rows: hit,
            reason,
        } => ModelError::Dispatch {
            layer,
            class,
            rows: if hit.is_empty() {
                (first_row..first_row + rows).collect()
            } else {
                hit.into_iter().map(|r| r + first_row).collect()
            },
            reason,
        },
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DispatchClass;

    #[test]
    fn the_split_balances_tokens_over_contiguous_groups() {
        assert_eq!(balanced_split(&[1, 1]), 1);
        assert_eq!(balanced_split(&[1, 1, 1, 1, 1]), 2);
        assert_eq!(balanced_split(&[10, 1, 1, 1]), 1);
        assert_eq!(balanced_split(&[1, 1, 1, 10]), 3);
        assert_eq!(balanced_split(&[4, 4, 8]), 2);
        assert_eq!(balanced_split(&[3, 5, 2, 6]), 2);
    }

    #[test]
    fn auto_splits_only_remote_batches_big_enough() {
        let eight = [AUTO_MIN_TOKENS / 8; 8];
        assert_eq!(Overlap::Auto.split(true, &eight), Some(4));
        assert_eq!(Overlap::Auto.split(false, &eight), None);
        assert_eq!(Overlap::Auto.split(true, &[1; 32]), None, "a decode step");
        assert_eq!(
            Overlap::Auto.split(true, &[64]),
            None,
            "one sequence never splits"
        );
        assert_eq!(Overlap::On.split(false, &[1, 1]), Some(1));
        assert_eq!(Overlap::On.split(true, &[5]), None);
        assert_eq!(Overlap::Off.split(true, &eight), None);
        for s in ["on", "off", "auto"] {
            assert_eq!(s.parse::<Overlap>().expect("parses").to_string(), s);
        }
        assert!("yes".parse::<Overlap>().is_err());
    }

    #[test]
    fn a_group_error_names_full_batch_rows() {
        let e = |rows: Vec<usize>| ModelError::Dispatch {
            layer: 2,
            class: DispatchClass::Unavailable,
            rows,
            reason: "x".into(),
        };
        let rows = |e: ModelError| match e {
            ModelError::Dispatch { rows, .. } => rows,
            other => panic!("not a dispatch error: {other}"),
        };
        assert_eq!(rows(to_batch_rows(e(vec![0, 3]), 10, 5)), vec![10, 13]);
        assert_eq!(rows(to_batch_rows(e(vec![]), 10, 3)), vec![10, 11, 12]);
        let other = to_batch_rows(ModelError::InvalidInput("y".into()), 10, 3);
        assert!(matches!(other, ModelError::InvalidInput(_)));
    }
}

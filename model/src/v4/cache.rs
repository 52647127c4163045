//! The DeepSeek-V4 decode cache of one sequence: per layer the last `sliding_window − 1` K=V
//! rows, and on CSA/HCA layers the compressor state — the emitted entries, the raw projections
//! of the incomplete window (kv and gate) and, for CSA, the last complete window (whose first
//! halves the next entry mixes in) — plus the lightning indexer's own copy of that state.
//!
//! Feeding tokens in any chunking (one prefill, chunks, one token at a time) gives the same
//! entries and the same attention as the full forward. A forward pass only appends (window
//! rows, buffered projections, entries); what falls out of the window or out of the buffers is
//! dropped when the pass is committed ([`V4Cache::commit`]). So a failed pass is undone by
//! truncating to a [`V4Mark`] taken before it, at no cost proportional to the context.
//! Reference: transformers `DeepseekV4HCACache`, `DeepseekV4CSACache`.

use super::{AttnLayerType, V4Config};

/// One compressor's running state.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CompState {
    /// Raw `kv` / `gate` projections of the tokens after the last complete window (during a
    /// pass, also the windows it completed, up to `consumed`).
    pub buf_kv: Vec<f32>,
    pub buf_gate: Vec<f32>,
    /// Raw projections of the last complete window (CSA overlap; empty for HCA).
    pub prev_kv: Vec<f32>,
    pub prev_gate: Vec<f32>,
    /// Emitted entries `[n, dim]`, normalised and rotated.
    pub entries: Vec<f32>,
    /// Values of `buf_*` already turned into entries by the current pass (0 between passes).
    pub(crate) consumed: usize,
    /// Values of the last window completed by the current pass that become `prev_*` at commit
    /// (0 without overlap).
    pub(crate) keep_prev: usize,
}

impl CompState {
    fn mark(&self) -> CompMark {
        CompMark {
            buf: self.buf_kv.len(),
            entries: self.entries.len(),
        }
    }

    fn rollback(&mut self, m: &CompMark) {
        self.buf_kv.truncate(m.buf);
        self.buf_gate.truncate(m.buf);
        self.entries.truncate(m.entries);
        self.consumed = 0;
        self.keep_prev = 0;
    }

    fn commit(&mut self) {
        let used = std::mem::take(&mut self.consumed);
        let keep = std::mem::take(&mut self.keep_prev);
        if used == 0 {
            return;
        }
        if keep > 0 {
            self.prev_kv.clear();
            self.prev_kv
                .extend_from_slice(&self.buf_kv[used - keep..used]);
            self.prev_gate.clear();
            self.prev_gate
                .extend_from_slice(&self.buf_gate[used - keep..used]);
        }
        self.buf_kv.drain(..used);
        self.buf_gate.drain(..used);
    }

    fn bytes(&self) -> usize {
        (self.buf_kv.len()
            + self.buf_gate.len()
            + self.prev_kv.len()
            + self.prev_gate.len()
            + self.entries.len())
            * 4
    }
}

/// One layer's cache.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LayerCache {
    /// The last `< sliding_window` K=V rows (rotated), oldest first (during a pass, followed
    /// by the pass's new rows).
    pub window: Vec<f32>,
    /// The main compressor (CSA/HCA layers).
    pub compressor: Option<CompState>,
    /// The lightning indexer's compressor (CSA layers).
    pub indexer: Option<CompState>,
}

#[derive(Debug, Clone, Copy)]
struct CompMark {
    buf: usize,
    entries: usize,
}

/// Lengths of a cache before a forward pass, to undo the pass ([`V4Cache::rollback`]).
#[derive(Debug, Clone)]
pub struct V4Mark {
    layers: Vec<(usize, Option<CompMark>, Option<CompMark>)>,
}

/// The cache of one sequence.
#[derive(Debug, Clone, PartialEq)]
pub struct V4Cache {
    pub layers: Vec<LayerCache>,
    len: usize,
}

impl V4Cache {
    /// An empty cache for `cfg`.
    pub fn new(cfg: &V4Config) -> V4Cache {
        let layers = cfg
            .layer_types
            .iter()
            .map(|t| LayerCache {
                window: Vec::new(),
                compressor: (*t != AttnLayerType::Sliding).then(CompState::default),
                indexer: (*t == AttnLayerType::Csa).then(CompState::default),
            })
            .collect();
        V4Cache { layers, len: 0 }
    }

    /// Tokens seen so far (the next token's position).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no token has been seen.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Forgets every token (the buffers keep their capacity).
    pub fn clear(&mut self) {
        for l in &mut self.layers {
            l.window.clear();
            for c in [&mut l.compressor, &mut l.indexer].into_iter().flatten() {
                *c = CompState::default();
            }
        }
        self.len = 0;
    }

    /// The lengths to return to if the next pass fails.
    pub(crate) fn mark(&self) -> V4Mark {
        V4Mark {
            layers: self
                .layers
                .iter()
                .map(|l| {
                    (
                        l.window.len(),
                        l.compressor.as_ref().map(CompState::mark),
                        l.indexer.as_ref().map(CompState::mark),
                    )
                })
                .collect(),
        }
    }

    /// Undoes a pass that did not complete: back to `mark` (taken before it).
    pub(crate) fn rollback(&mut self, mark: &V4Mark) {
        for (l, (w, c, i)) in self.layers.iter_mut().zip(&mark.layers) {
            l.window.truncate(*w);
            for (st, m) in [(&mut l.compressor, c), (&mut l.indexer, i)] {
                if let (Some(st), Some(m)) = (st.as_mut(), m) {
                    st.rollback(m);
                }
            }
        }
    }

    /// Completes a pass of `n` tokens: keeps the last `window_rows` rows of `row` values in
    /// each window, drops the buffered projections that became entries, and counts the tokens.
    pub(crate) fn commit(&mut self, n: usize, window_rows: usize, row: usize) {
        for l in &mut self.layers {
            let rows = l.window.len() / row.max(1);
            let drop = rows.saturating_sub(window_rows);
            l.window.drain(..drop * row);
            for st in [&mut l.compressor, &mut l.indexer].into_iter().flatten() {
                st.commit();
            }
        }
        self.len += n;
    }

    /// Bytes of state held (for budgeting).
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|l| {
                l.window.len() * 4
                    + l.compressor.as_ref().map_or(0, CompState::bytes)
                    + l.indexer.as_ref().map_or(0, CompState::bytes)
            })
            .sum()
    }
}

//! The DeepSeek-V4 decode cache of one sequence: per layer the last `sliding_window − 1` K=V
//! rows, and on CSA/HCA layers the compressor state — the emitted entries, the raw projections
//! of the incomplete window (kv and gate) and, for CSA, the last complete window (whose first
//! halves the next entry mixes in) — plus the lightning indexer's own copy of that state.
//!
//! Feeding tokens in any chunking (one prefill, chunks, one token at a time) gives the same
//! entries and the same attention as the full forward. The state is not rewindable (as in the
//! reference), so a failed forward pass restores a snapshot instead ([`super::V4Backbone`]).
//! Reference: transformers `DeepseekV4HCACache`, `DeepseekV4CSACache`.

use super::{AttnLayerType, V4Config};

/// One compressor's running state.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CompState {
    /// Raw `kv` / `gate` projections of the tokens after the last complete window.
    pub buf_kv: Vec<f32>,
    pub buf_gate: Vec<f32>,
    /// Raw projections of the last complete window (CSA overlap; empty for HCA).
    pub prev_kv: Vec<f32>,
    pub prev_gate: Vec<f32>,
    /// Emitted entries `[n, dim]`, normalised and rotated.
    pub entries: Vec<f32>,
}

/// One layer's cache.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LayerCache {
    /// The last `< sliding_window` K=V rows (rotated), oldest first.
    pub window: Vec<f32>,
    /// The main compressor (CSA/HCA layers).
    pub compressor: Option<CompState>,
    /// The lightning indexer's compressor (CSA layers).
    pub indexer: Option<CompState>,
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

    /// Records `n` more tokens (after every layer has consumed them).
    pub(crate) fn advance(&mut self, n: usize) {
        self.len += n;
    }

    /// Bytes of state held (for budgeting).
    pub fn bytes(&self) -> usize {
        let comp = |c: &Option<CompState>| {
            c.as_ref().map_or(0, |c| {
                c.buf_kv.len()
                    + c.buf_gate.len()
                    + c.prev_kv.len()
                    + c.prev_gate.len()
                    + c.entries.len()
            })
        };
        self.layers
            .iter()
            .map(|l| (l.window.len() + comp(&l.compressor) + comp(&l.indexer)) * 4)
            .sum()
    }
}

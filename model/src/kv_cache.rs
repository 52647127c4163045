//! The compressed MLA KV cache of one sequence.
//!
//! Per layer and token MLA needs only the normalised latent `c_kv` (`kv_lora_rank` values) and
//! the rotated shared rope key `k_pe` (`qk_rope_head_dim` values); keys and values of every head
//! are recovered from them through `kv_b_proj`, which attention absorbs into the query and output
//! (DeepSeek-V2 paper §2.1.3). For DeepSeek-V3 that is 576 floats per token and layer instead of
//! 128 heads × 320. Rows are stored as `[c_kv | k_pe]`.

use crate::config::Config;

/// Compressed cache of one sequence across all layers.
#[derive(Debug, Clone)]
pub struct SeqCache {
    width: usize,
    len: usize,
    layers: Vec<Vec<f32>>,
}

impl SeqCache {
    /// An empty cache shaped for `cfg`.
    pub fn new(cfg: &Config) -> SeqCache {
        SeqCache {
            width: cfg.kv_lora_rank + cfg.qk_rope_head_dim,
            len: 0,
            layers: vec![Vec::new(); cfg.num_hidden_layers],
        }
    }

    /// Tokens cached (committed by completed forward passes).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Floats per token and layer (`kv_lora_rank + qk_rope_head_dim`).
    pub fn width(&self) -> usize {
        self.width
    }

    /// Bytes held per token over all layers.
    pub fn bytes_per_token(&self) -> usize {
        self.width * self.layers.len() * 4
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.layers.iter().map(|l| l.len() * 4).sum()
    }

    /// The rows of `layer`, including any appended but not yet committed.
    pub fn layer(&self, layer: usize) -> &[f32] {
        &self.layers[layer]
    }

    /// Appends `rows` (`[n, width]`) to `layer`; committed by [`SeqCache::commit`].
    pub(crate) fn append(&mut self, layer: usize, rows: &[f32]) {
        debug_assert_eq!(rows.len() % self.width, 0);
        self.layers[layer].extend_from_slice(rows);
    }

    /// Makes `n` appended tokens part of the cache.
    pub(crate) fn commit(&mut self, n: usize) {
        self.len += n;
        debug_assert!(self.layers.iter().all(|l| l.len() == self.len * self.width));
    }

    /// Drops everything past `len` tokens (also rolls back a failed forward pass).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
        let keep = self.len * self.width;
        for l in &mut self.layers {
            l.truncate(keep);
        }
    }
}

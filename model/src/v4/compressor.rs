//! DeepSeek-V4's KV compressors and the lightning indexer.
//!
//! A compressor turns every complete window of `m` tokens into one entry:
//! `kv = x·Wkv`, `g = x·Wgate + ape[j]`, entry = `norm(Σ_j softmax_j(g) ⊙ kv_j)` (softmax per
//! channel over the window's slots), then RoPE ("compress" set) at position `w·m`. HCA windows are
//! disjoint. CSA (`overlap`) projections are twice as wide: entry `w` mixes `2m` slots, the
//! previous window's first halves (`[:d]`, none for window 0) and this window's second halves
//! (`[d:]`). Entry `w` is visible to query `t` iff `w < (t+1)/m`.
//! The indexer (CSA) has its own overlapping compressor at `index_head_dim`; it scores entry `e`
//! for query `t` as `Σ_h w_t,h · relu(qI_t,h · K_e) · ihd^-0.5` with `qI = rope(qr·Wq_b)` and
//! `w = x·Wproj · heads^-0.5`, and keeps the top `min(index_topk, visible)` of the entries the
//! query may see (ties to the lower index).
//! Both work incrementally on a [`CompState`]: tokens are projected as they come, complete
//! windows are emitted, the rest is buffered, so any chunking gives the full forward's entries.
//! Reference: transformers `DeepseekV4HCACompressor`, `DeepseekV4CSACompressor`,
//! `DeepseekV4Indexer`.

use super::V4Config;
use super::cache::CompState;
use super::names::Names;
use super::rope::{RopeTable, V4Rope};
use crate::checkpoint::Checkpoint;
use crate::error::Result;
use crate::kernels::{self, Linear};

/// One compressor's weights.
#[derive(Debug)]
pub struct Compressor {
    wkv: Linear,
    wgate: Linear,
    /// `[m, c·d]`, `c` = 2 with overlap.
    ape: Vec<f32>,
    norm: Vec<f32>,
    /// Entry width.
    pub dim: usize,
    /// Tokens per window.
    pub rate: usize,
    overlap: bool,
    eps: f32,
}

fn linear(ckpt: &Checkpoint, name: &str, out: usize, inp: usize) -> Result<Linear> {
    Ok(Linear::new(ckpt.read_weight(name, &[out, inp])?, out, inp))
}

impl Compressor {
    /// Loads `{prefix}.{wkv,wgate,ape,norm}` (official `prefix`, e.g. `attn.compressor`).
    #[allow(clippy::too_many_arguments)]
    pub fn load(
        cfg: &V4Config,
        ckpt: &Checkpoint,
        names: &Names,
        layer: usize,
        prefix: &str,
        dim: usize,
        rate: usize,
        overlap: bool,
    ) -> Result<Compressor> {
        let c = if overlap { 2 } else { 1 };
        let hid = cfg.hidden_size;
        let name = |part: &str| names.layer(layer, &format!("{prefix}.{part}"));
        Ok(Compressor {
            wkv: linear(ckpt, &name("wkv.weight"), c * dim, hid)?,
            wgate: linear(ckpt, &name("wgate.weight"), c * dim, hid)?,
            ape: ckpt.read_f32(&name("ape"), &[rate, c * dim])?,
            norm: ckpt.read_f32(&name("norm.weight"), &[dim])?,
            dim,
            rate,
            overlap,
            eps: cfg.rms_norm_eps as f32,
        })
    }

    /// Projects `x [t, hidden]` and appends to `st` the entry of every window the new tokens
    /// complete (rotated at its window's first position with the "compress" `rope`); the rest
    /// waits in the buffer. Nothing is removed: the windows turned into entries are dropped
    /// from the buffer when the pass commits ([`super::V4Cache::commit`]).
    pub fn extend(&self, st: &mut CompState, x: &[f32], t: usize, rope: &V4Rope) {
        let (m, d) = (self.rate, self.dim);
        let w = if self.overlap { 2 * d } else { d };
        st.buf_kv.extend(self.wkv.forward(x, t));
        st.buf_gate.extend(self.wgate.forward(x, t));
        let from = st.consumed;
        let windows = (st.buf_kv.len() - from) / w / m;
        if windows == 0 {
            return;
        }
        let mut logits = Vec::with_capacity(2 * m);
        let mut values = Vec::with_capacity(2 * m);
        for win in 0..windows {
            let index = st.entries.len() / d;
            let at = from + win * m * w;
            let cur_kv = &st.buf_kv[at..][..m * w];
            let cur_gate = &st.buf_gate[at..][..m * w];
            let (prev_kv, prev_gate) = match at {
                0 => (&st.prev_kv[..], &st.prev_gate[..]),
                _ => (
                    &st.buf_kv[at - m * w..][..m * w],
                    &st.buf_gate[at - m * w..][..m * w],
                ),
            };
            let mut entry = vec![0.0f32; d];
            for (ch, e) in entry.iter_mut().enumerate() {
                logits.clear();
                values.clear();
                if self.overlap && !prev_kv.is_empty() {
                    for j in 0..m {
                        logits.push(prev_gate[j * w + ch] + self.ape[j * w + ch]);
                        values.push(prev_kv[j * w + ch]);
                    }
                }
                let off = if self.overlap { d } else { 0 };
                for j in 0..m {
                    logits.push(cur_gate[j * w + off + ch] + self.ape[j * w + off + ch]);
                    values.push(cur_kv[j * w + off + ch]);
                }
                kernels::softmax(&mut logits);
                *e = logits.iter().zip(&values).map(|(p, v)| p * v).sum();
            }
            kernels::rms_norm(&mut entry, &self.norm, self.eps);
            rope.table([index * m]).rotate(&mut entry, 0, false);
            st.entries.extend(entry);
        }
        st.consumed = from + windows * m * w;
        st.keep_prev = if self.overlap { m * w } else { 0 };
    }
}

/// The lightning indexer of a CSA layer.
#[derive(Debug)]
pub struct Indexer {
    compressor: Compressor,
    wq_b: Linear,
    weights_proj: Linear,
    heads: usize,
    topk: usize,
}

impl Indexer {
    /// Loads `layers.{layer}.attn.indexer.*`.
    pub fn load(cfg: &V4Config, ckpt: &Checkpoint, names: &Names, layer: usize) -> Result<Indexer> {
        let (ih, id) = (cfg.index_n_heads, cfg.index_head_dim);
        let rate = cfg.compress_rates.csa;
        let p = |part: &str| names.layer(layer, &format!("attn.indexer.{part}"));
        Ok(Indexer {
            compressor: Compressor::load(
                cfg,
                ckpt,
                names,
                layer,
                "attn.indexer.compressor",
                id,
                rate,
                true,
            )?,
            wq_b: linear(ckpt, &p("wq_b.weight"), ih * id, cfg.q_lora_rank)?,
            weights_proj: linear(ckpt, &p("weights_proj.weight"), ih, cfg.hidden_size)?,
            heads: ih,
            topk: cfg.index_topk,
        })
    }

    /// Extends the indexer's own compressor with `x [t, hidden]`, then for each query row
    /// (`qr [t, q_lora]`, absolute positions `p0..p0+t`, "compress" rope rows `query_rope`) picks
    /// the top `min(index_topk, visible)` entries, in score order.
    pub fn select(
        &self,
        st: &mut CompState,
        x: &[f32],
        qr: &[f32],
        (t, p0): (usize, usize),
        query_rope: &RopeTable,
        rope: &V4Rope,
    ) -> Vec<Vec<usize>> {
        self.compressor.extend(st, x, t, rope);
        let keys = &st.entries;
        let (d, m, h) = (self.compressor.dim, self.compressor.rate, self.heads);
        let n_entries = keys.len() / d;
        let mut q = self.wq_b.forward(qr, t);
        for (row, qt) in q.chunks_exact_mut(h * d).enumerate() {
            for head in qt.chunks_exact_mut(d) {
                query_rope.rotate(head, row, false);
            }
        }
        let w = self.weights_proj.forward(x, t);
        let (scale, wscale) = ((d as f32).powf(-0.5), (h as f32).powf(-0.5));
        (0..t)
            .map(|row| {
                let visible = ((p0 + row + 1) / m).min(n_entries);
                let scores: Vec<f32> = (0..visible)
                    .map(|e| {
                        let key = &keys[e * d..][..d];
                        (0..h)
                            .map(|hh| {
                                let qh = &q[(row * h + hh) * d..][..d];
                                let dot: f32 = qh.iter().zip(key).map(|(a, b)| a * b).sum();
                                dot.max(0.0) * scale * (w[row * h + hh] * wscale)
                            })
                            .sum()
                    })
                    .collect();
                crate::gate::top_indices(&scores, 0..visible, self.topk.min(visible))
            })
            .collect()
    }

    /// `index_topk` (picks per query, at most).
    pub fn topk(&self) -> usize {
        self.topk
    }
}

//! DeepSeek-V4 attention over a sequence's cache: shared-KV multi-query attention with sinks over a
//! sliding window plus, on CSA/HCA layers, compressed entries.
//!
//! `qr = q_norm(x·Wq_a)`; `q = qr·Wq_b` per head `[nope | rope]`, weightless RMS per head, RoPE;
//! `kv = norm(x·Wkv)`, RoPE: one head that is both key and value. Query `t` attends to window
//! keys `t−W < s ≤ t` and to the compressed entries it may see (HCA: all complete ones; CSA: the
//! indexer's picks), with a per-head sink logit in the softmax whose probability is dropped;
//! scale `head_dim^-0.5`. The output's rope slice is rotated back by the query's angle, then the
//! grouped low-rank projection: heads in `o_groups` contiguous groups, group g through its
//! `wo_a` rows `[g·r, (g+1)·r)`, concatenated, then `wo_b`.
//! Reference: transformers `DeepseekV4Attention`, `eager_attention_forward`.

use super::cache::LayerCache;
use super::compressor::{Compressor, Indexer};
use super::names::Names;
use super::rope::{RopeTable, V4Rope};
use super::{AttnLayerType, V4Config};
use crate::checkpoint::{Checkpoint, WeightData};
use crate::error::Result;
use crate::kernels::{self, Linear};

/// What a compressed layer adds to attention.
#[derive(Debug)]
enum Extra {
    None,
    Hca(Compressor),
    Csa(Compressor, Box<Indexer>),
}

/// One layer's attention weights.
#[derive(Debug)]
pub struct V4Attention {
    wq_a: Linear,
    q_norm: Vec<f32>,
    wq_b: Linear,
    wkv: Linear,
    kv_norm: Vec<f32>,
    /// One Linear per output group: `[r, heads/groups · head_dim]`.
    wo_a: Vec<Linear>,
    wo_b: Linear,
    sinks: Vec<f32>,
    extra: Extra,
    heads: usize,
    head_dim: usize,
    window: usize,
    eps: f32,
    /// The layer's type (selects the "main" or "compress" rope).
    pub kind: AttnLayerType,
}

/// What a forward pass records for golden checks.
#[derive(Debug, Default)]
pub struct AttnTrace {
    /// Compressed entries `[n, head_dim]` (CSA/HCA).
    pub compressed: Option<Vec<f32>>,
    /// CSA indexer picks per query, in score order.
    pub picks: Option<Vec<Vec<usize>>>,
}

fn linear(ckpt: &Checkpoint, name: &str, out: usize, inp: usize) -> Result<Linear> {
    Ok(Linear::new(ckpt.read_weight(name, &[out, inp])?, out, inp))
}

impl V4Attention {
    /// Loads `layers.{layer}.attn.*`.
    pub fn load(
        cfg: &V4Config,
        ckpt: &Checkpoint,
        names: &Names,
        layer: usize,
    ) -> Result<V4Attention> {
        let (hid, h, hd) = (cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim);
        let (g, r, ql) = (cfg.o_groups, cfg.o_lora_rank, cfg.q_lora_rank);
        let n = |part: &str| names.layer(layer, &format!("attn.{part}"));
        let group_in = h * hd / g;
        let wo_a = ckpt.read_f32(&n("wo_a.weight"), &[g * r, group_in])?;
        let wo_a = wo_a
            .chunks_exact(r * group_in)
            .map(|w| Linear::new(WeightData::F32(w.to_vec()), r, group_in))
            .collect();
        let kind = cfg.layer_types[layer];
        let extra = match kind {
            AttnLayerType::Sliding => Extra::None,
            AttnLayerType::Hca => Extra::Hca(Compressor::load(
                cfg,
                ckpt,
                names,
                layer,
                "attn.compressor",
                hd,
                cfg.compress_rates.hca,
                false,
            )?),
            AttnLayerType::Csa => Extra::Csa(
                Compressor::load(
                    cfg,
                    ckpt,
                    names,
                    layer,
                    "attn.compressor",
                    hd,
                    cfg.compress_rates.csa,
                    true,
                )?,
                Box::new(Indexer::load(cfg, ckpt, names, layer)?),
            ),
        };
        Ok(V4Attention {
            wq_a: linear(ckpt, &n("wq_a.weight"), ql, hid)?,
            q_norm: ckpt.read_f32(&n("q_norm.weight"), &[ql])?,
            wq_b: linear(ckpt, &n("wq_b.weight"), h * hd, ql)?,
            wkv: linear(ckpt, &n("wkv.weight"), hd, hid)?,
            kv_norm: ckpt.read_f32(&n("norm.weight"), &[hd])?,
            wo_a,
            wo_b: linear(ckpt, &n("wo_b.weight"), hid, g * r)?,
            sinks: ckpt.read_f32(&n("attn_sink"), &[h])?,
            extra,
            heads: h,
            head_dim: hd,
            window: cfg.sliding_window,
            eps: cfg.rms_norm_eps as f32,
            kind,
        })
    }

    /// Attention for the `t` new tokens `x [t, hidden]` (normed input) of one sequence at
    /// positions `p0..p0+t`, extending its layer `cache`. `rope` holds this layer's rope rows at
    /// those positions, `compress` the "compress" rows (for the indexer's queries), and
    /// `compress_rope` places the compressed entries.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        x: &[f32],
        (t, p0): (usize, usize),
        cache: &mut LayerCache,
        rope: &RopeTable,
        compress: &RopeTable,
        compress_rope: &V4Rope,
        trace: Option<&mut AttnTrace>,
    ) -> Vec<f32> {
        let (h, hd) = (self.heads, self.head_dim);
        let mut qr = self.wq_a.forward(x, t);
        kernels::rms_norm_rows(&mut qr, &self.q_norm, self.eps);
        let mut q = self.wq_b.forward(&qr, t);
        let ones = vec![1.0f32; hd];
        for (row, qt) in q.chunks_exact_mut(h * hd).enumerate() {
            for head in qt.chunks_exact_mut(hd) {
                kernels::rms_norm(head, &ones, self.eps);
                rope.rotate(head, row, false);
            }
        }
        let mut kv = self.wkv.forward(x, t);
        kernels::rms_norm_rows(&mut kv, &self.kv_norm, self.eps);
        for (row, k) in kv.chunks_exact_mut(hd).enumerate() {
            rope.rotate(k, row, false);
        }
        // The window's keys: the cached rows (positions `p0 - cached ..`) then the new ones.
        let mut keys = std::mem::take(&mut cache.window);
        let cached = keys.len() / hd;
        keys.extend_from_slice(&kv);
        // Compressed entries and, per query, which of them it sees.
        let (rate, picks) = match (&self.extra, cache.compressor.as_mut()) {
            (Extra::Hca(c), Some(st)) => {
                c.extend(st, x, t, compress_rope);
                (c.rate, None)
            }
            (Extra::Csa(c, ix), Some(st)) => {
                c.extend(st, x, t, compress_rope);
                let ist = cache.indexer.get_or_insert_with(Default::default);
                let p = ix.select(ist, x, &qr, (t, p0), compress, compress_rope);
                (c.rate, Some(p))
            }
            _ => (0, None),
        };
        let entries: &[f32] = cache.compressor.as_ref().map_or(&[], |c| &c.entries);
        let scale = (hd as f32).powf(-0.5);
        let mut out = vec![0.0f32; t * h * hd];
        let mut logits = Vec::new();
        let mut vals: Vec<&[f32]> = Vec::new();
        for row in 0..t {
            let pos = p0 + row;
            vals.clear();
            let lo = (pos + 1).saturating_sub(self.window).max(p0 - cached);
            for s in lo..=pos {
                vals.push(&keys[(s + cached - p0) * hd..][..hd]);
            }
            match &picks {
                Some(p) => {
                    for e in &p[row] {
                        vals.push(&entries[e * hd..][..hd]);
                    }
                }
                None if rate > 0 => {
                    let visible = ((pos + 1) / rate).min(entries.len() / hd);
                    for e in 0..visible {
                        vals.push(&entries[e * hd..][..hd]);
                    }
                }
                None => {}
            }
            for head in 0..h {
                let qh = &q[(row * h + head) * hd..][..hd];
                logits.clear();
                logits.extend(
                    vals.iter()
                        .map(|k| qh.iter().zip(*k).map(|(a, b)| a * b).sum::<f32>() * scale),
                );
                logits.push(self.sinks[head]);
                kernels::softmax(&mut logits);
                let o = &mut out[(row * h + head) * hd..][..hd];
                for (p, v) in logits.iter().zip(&vals) {
                    for (ov, vv) in o.iter_mut().zip(*v) {
                        *ov += p * vv;
                    }
                }
                rope.rotate(o, row, true);
            }
        }
        if let Some(tr) = trace {
            tr.compressed = (rate > 0).then(|| entries.to_vec());
            tr.picks = picks;
        }
        // The rows that fall out of the window are dropped when the pass commits.
        cache.window = keys;
        self.project_out(&out, t)
    }

    /// The grouped low-rank output projection of `out [t, heads·head_dim]`.
    fn project_out(&self, out: &[f32], t: usize) -> Vec<f32> {
        let (h, hd) = (self.heads, self.head_dim);
        let g = self.wo_a.len();
        let group_in = h * hd / g;
        let r = self.wo_a[0].out_features();
        let mut mid = vec![0.0f32; t * g * r];
        for (gi, w) in self.wo_a.iter().enumerate() {
            let xg: Vec<f32> = (0..t)
                .flat_map(|row| {
                    out[row * h * hd + gi * group_in..][..group_in]
                        .iter()
                        .copied()
                })
                .collect();
            let yg = w.forward(&xg, t);
            for row in 0..t {
                mid[row * g * r + gi * r..][..r].copy_from_slice(&yg[row * r..][..r]);
            }
        }
        self.wo_b.forward(&mid, t)
    }
}

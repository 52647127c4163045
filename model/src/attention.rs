//! Multi-head latent attention (MLA) over the compressed cache, in the weight-absorbed form.
//!
//! Queries: `q = q_b_proj(rmsnorm(q_a_proj(x)))` (or `q_proj(x)` when `q_lora_rank` is null),
//! split per head into `[nope | rope]`. Keys/values: `kv_a_proj_with_mqa(x) = [c | k_pe]`,
//! `c_kv = rmsnorm(c)`, `k_pe` rotated and shared by all heads. Instead of expanding `c_kv`
//! through `kv_b_proj = [W_UK; W_UV]` for every cached token, each head's query is absorbed into
//! latent space (`q_lat = W_UKᵀ q_nope`), scores are `q_lat·c_kv + q_pe·k_pe`, the weighted sum
//! of latents is taken, and `W_UV` is applied once per query. All heads then share one
//! `[tokens·heads, kv_lora+rope] × [kv_lora+rope, cached]` product per sequence.
//! References: DeepSeek-V2 paper §2.1 and appendix C; transformers `DeepseekV3Attention`.

use rayon::prelude::*;

use crate::attend::attend;
use crate::cache::SeqCache;
use crate::checkpoint::Checkpoint;
use crate::config::Config;
use crate::error::Result;
use crate::kernels::{self, Linear};
use crate::rope::Rope;

/// Epsilon of `q_a_layernorm` and `kv_a_layernorm` (their module default in the reference).
const LORA_NORM_EPS: f32 = 1e-6;

#[derive(Debug)]
enum QProj {
    Lora {
        a: Linear,
        norm: Vec<f32>,
        b: Linear,
    },
    Direct(Linear),
}

/// One layer's MLA weights.
#[derive(Debug)]
pub struct Mla {
    q: QProj,
    kv_a: Linear,
    kv_norm: Vec<f32>,
    /// Per head `W_UKᵀ`: `[kv_lora, nope]` (maps `q_nope` into latent space).
    uk: Vec<Linear>,
    /// Per head `W_UV`: `[v, kv_lora]`.
    uv: Vec<Linear>,
    o: Linear,
    heads: usize,
    nope: usize,
    rope_dim: usize,
    v: usize,
    lora: usize,
    scale: f32,
}

/// Where a sequence's tokens sit in the flattened batch.
#[derive(Debug)]
pub struct SeqSlot<'a> {
    pub cache: &'a mut SeqCache,
    /// First row of this sequence in the batch.
    pub start: usize,
    /// Rows (new tokens) of this sequence.
    pub count: usize,
}

/// Loads a Linear `[out, inp]`.
pub(crate) fn linear(ckpt: &Checkpoint, name: &str, out: usize, inp: usize) -> Result<Linear> {
    Ok(Linear::new(ckpt.read_weight(name, &[out, inp])?, out, inp))
}

impl Mla {
    /// Loads `model.layers.{layer}.self_attn.*`.
    pub fn load(cfg: &Config, ckpt: &Checkpoint, layer: usize, scale: f32) -> Result<Mla> {
        let p = format!("model.layers.{layer}.self_attn");
        let (h, hid) = (cfg.num_attention_heads, cfg.hidden_size);
        let (nope, rope_dim, v, lora) = (
            cfg.qk_nope_head_dim,
            cfg.qk_rope_head_dim,
            cfg.v_head_dim,
            cfg.kv_lora_rank,
        );
        let qk = nope + rope_dim;
        let q = match cfg.q_lora_rank {
            Some(r) => QProj::Lora {
                a: linear(ckpt, &format!("{p}.q_a_proj.weight"), r, hid)?,
                norm: ckpt.read_f32(&format!("{p}.q_a_layernorm.weight"), &[r])?,
                b: linear(ckpt, &format!("{p}.q_b_proj.weight"), h * qk, r)?,
            },
            None => QProj::Direct(linear(ckpt, &format!("{p}.q_proj.weight"), h * qk, hid)?),
        };
        let (uk, uv) = crate::absorb::absorbed_heads(
            ckpt,
            &format!("{p}.kv_b_proj.weight"),
            h,
            nope,
            v,
            lora,
        )?;
        Ok(Mla {
            q,
            kv_a: linear(
                ckpt,
                &format!("{p}.kv_a_proj_with_mqa.weight"),
                lora + rope_dim,
                hid,
            )?,
            kv_norm: ckpt.read_f32(&format!("{p}.kv_a_layernorm.weight"), &[lora])?,
            uk,
            uv,
            o: linear(ckpt, &format!("{p}.o_proj.weight"), hid, h * v)?,
            heads: h,
            nope,
            rope_dim,
            v,
            lora,
            scale,
        })
    }

    /// Attention for a flattened batch `x[T, hidden]` of several sequences; appends each
    /// sequence's new `[c_kv | k_pe]` rows to its cache (uncommitted) and returns `[T, hidden]`.
    /// `cos`/`sin` are the rope tables of every row's position.
    pub fn forward(
        &self,
        layer: usize,
        x: &[f32],
        t: usize,
        seqs: &mut [SeqSlot<'_>],
        rope: &Rope,
        (cos, sin): (&[f32], &[f32]),
    ) -> Vec<f32> {
        let (h, nope, r, lora) = (self.heads, self.nope, self.rope_dim, self.lora);
        let qk = nope + r;
        let width = lora + r;
        let half = r / 2;

        // Queries [T, H*(nope+rope)] and latent keys [T, lora+rope]; both read x.
        let first = match &self.q {
            QProj::Lora { a, .. } => a,
            QProj::Direct(p) => p,
        };
        let [q_first, mut kv]: [Vec<f32>; 2] =
            kernels::products(&[(first, x, t), (&self.kv_a, x, t)])
                .try_into()
                .unwrap_or_else(|_| unreachable!());
        let mut q = match &self.q {
            QProj::Lora { norm, b, .. } => {
                let mut qa = q_first;
                kernels::rms_norm_rows(&mut qa, norm, LORA_NORM_EPS);
                b.forward(&qa, t)
            }
            QProj::Direct(_) => q_first,
        };
        // Normalise c_kv, rotate k_pe.
        for (i, row) in kv.chunks_exact_mut(width).enumerate() {
            let (c, kpe) = row.split_at_mut(lora);
            kernels::rms_norm(c, &self.kv_norm, LORA_NORM_EPS);
            rope.apply(kpe, &cos[i * half..][..half], &sin[i * half..][..half]);
        }
        for (i, row) in q.chunks_exact_mut(h * qk).enumerate() {
            for head in row.chunks_exact_mut(qk) {
                rope.apply(
                    &mut head[nope..],
                    &cos[i * half..][..half],
                    &sin[i * half..][..half],
                );
            }
        }

        // Absorbed queries [T, H, lora+rope] = [W_UKᵀ q_nope | q_pe].
        let mut qcat = vec![0.0f32; t * h * width];
        let nope_rows: Vec<Vec<f32>> = (0..h)
            .map(|head| {
                (0..t)
                    .flat_map(|i| &q[i * h * qk + head * qk..][..nope])
                    .copied()
                    .collect()
            })
            .collect();
        let per_head = kernels::products(&heads(&self.uk, &nope_rows, t));
        for (head, lat) in per_head.iter().enumerate() {
            for i in 0..t {
                let dst = &mut qcat[(i * h + head) * width..][..width];
                dst[..lora].copy_from_slice(&lat[i * lora..][..lora]);
                dst[lora..].copy_from_slice(&q[i * h * qk + head * qk + nope..][..r]);
            }
        }

        // Per sequence: append to the cache, attend over it. Latent outputs [T, H, lora].
        let mut olat = vec![0.0f32; t * h * lora];
        let mut outs: Vec<(&mut SeqSlot<'_>, &mut [f32])> = Vec::with_capacity(seqs.len());
        {
            let mut rest = olat.as_mut_slice();
            let mut consumed = 0;
            let mut order: Vec<&mut SeqSlot<'_>> = seqs.iter_mut().collect();
            order.sort_by_key(|s| s.start);
            for s in order {
                let skip = (s.start - consumed) * h * lora;
                let (_, tail) = rest.split_at_mut(skip);
                let (mine, tail) = tail.split_at_mut(s.count * h * lora);
                rest = tail;
                consumed = s.start + s.count;
                outs.push((s, mine));
            }
        }
        outs.par_iter_mut().for_each(|(s, out)| {
            s.cache
                .write(layer, &kv[s.start * width..(s.start + s.count) * width]);
            let first_pos = s.cache.len();
            let rows = &qcat[s.start * h * width..(s.start + s.count) * h * width];
            attend(s.cache, layer, first_pos, rows, (h, lora), self.scale, out);
        });

        // Values [T, H*v] through W_UV, then o_proj.
        let lat_rows: Vec<Vec<f32>> = (0..h)
            .map(|head| {
                (0..t)
                    .flat_map(|i| &olat[(i * h + head) * lora..][..lora])
                    .copied()
                    .collect()
            })
            .collect();
        let per_head = kernels::products(&heads(&self.uv, &lat_rows, t));
        let mut o = vec![0.0f32; t * h * self.v];
        for (head, vals) in per_head.iter().enumerate() {
            for i in 0..t {
                o[(i * h + head) * self.v..][..self.v]
                    .copy_from_slice(&vals[i * self.v..][..self.v]);
            }
        }
        self.o.forward(&o, t)
    }
}

/// One product per head: `lins[h]` over `inputs[h]` (`t` rows each).
fn heads<'a>(
    lins: &'a [Linear],
    inputs: &'a [Vec<f32>],
    t: usize,
) -> Vec<(&'a Linear, &'a [f32], usize)> {
    lins.iter()
        .zip(inputs)
        .map(|(w, x)| (w, x.as_slice(), t))
        .collect()
}

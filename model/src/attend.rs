//! Causal attention of absorbed MLA queries over one sequence's paged latent cache.
//!
//! The cache holds `[c_kv | k_pe]` rows in small pages (16 tokens by default), which are too
//! short for one GEMM each to run near the machine's speed: at a 4K context one decode step made
//! ~3,000 tiny sequential products per token. Keys are therefore read in blocks of
//! [`BLOCK_TOKENS`] tokens, each gathered into one contiguous f32 buffer (widening a bf16 cache
//! once), with one scores GEMM and one values GEMM per block, blocks in parallel.
//!
//! The arithmetic does not depend on the thread count or on how blocks are grouped: every block
//! product runs serially inside its task, the softmax sees the whole score row at once, and the
//! value partials are added in block order.

use faer::Par;
use rayon::prelude::*;

use crate::cache::{KvLayout, SeqCache};
use crate::kernels;

/// Most score-matrix elements materialised at once (bounds prefill memory).
const MAX_SCORE_ELEMS: usize = 1 << 22;
/// Keys per gathered block: one GEMM over this many keys runs near the kernel's speed.
pub(crate) const BLOCK_TOKENS: usize = 256;
/// Most per-block partial elements (block scores, or `[rows, lora]` value partials) held at once.
const MAX_PARTIAL_ELEMS: usize = 1 << 20;
/// Most gathered key elements kept between the scores and the values pass (else read again).
const MAX_KEPT_ELEMS: usize = 1 << 22;

/// The blocks of the first `visible` cached tokens of one layer.
struct Blocks<'c> {
    cache: &'c SeqCache,
    layout: KvLayout,
    layer: usize,
    visible: usize,
}

impl Blocks<'_> {
    fn count(&self) -> usize {
        self.visible.div_ceil(BLOCK_TOKENS)
    }

    /// First key and number of keys of block `b`.
    fn span(&self, b: usize) -> (usize, usize) {
        let k0 = b * BLOCK_TOKENS;
        (k0, BLOCK_TOKENS.min(self.visible - k0))
    }

    /// Block `b`'s rows `[nb, width]` as one contiguous f32 buffer.
    fn gather(&self, b: usize) -> Vec<f32> {
        let (k0, nb) = self.span(b);
        let (width, pt) = (self.layout.width, self.layout.page_tokens);
        let mut out = Vec::with_capacity(nb * width);
        let mut key = k0;
        while key < k0 + nb {
            let (page, slot) = (key / pt, key % pt);
            let take = (pt - slot).min(k0 + nb - key);
            self.cache.pages()[page].extend_rows_f32(
                &self.layout,
                self.layer,
                slot..slot + take,
                &mut out,
            );
            key += take;
        }
        out
    }
}

/// Maps blocks `0..count` through `f`, `group` of them in parallel at a time (so at most
/// `group` results are held), and hands each result to `sink` in block order.
fn in_block_order<T: Send>(
    count: usize,
    group: usize,
    f: impl Fn(usize) -> T + Sync,
    mut sink: impl FnMut(usize, T),
) {
    let group = group.clamp(1, count.max(1));
    for g0 in (0..count).step_by(group) {
        let results: Vec<T> = (g0..(g0 + group).min(count))
            .into_par_iter()
            .map(&f)
            .collect();
        for (b, r) in (g0..).zip(results) {
            sink(b, r);
        }
    }
}

/// Causal attention of `rows` (`[n, H, width]` absorbed queries of tokens at positions
/// `first_pos..first_pos+n`) over `cache` (`[c_kv | k_pe]` rows of `layer`, the `n` new ones
/// included); writes the latent outputs `[n, H, lora]`. Queries are taken in chunks whose score
/// rows fit [`MAX_SCORE_ELEMS`]; each chunk's rows see every visible key at once.
pub(crate) fn attend(
    cache: &SeqCache,
    layer: usize,
    first_pos: usize,
    rows: &[f32],
    (h, lora): (usize, usize),
    scale: f32,
    out: &mut [f32],
) {
    let layout: KvLayout = *cache.layout();
    let width = layout.width;
    let n = rows.len() / (h * width);
    let cached = first_pos + n;
    let chunk = (MAX_SCORE_ELEMS / (h * cached).max(1)).clamp(1, n.max(1));
    let mut scores = vec![0.0f32; chunk * h * cached];
    let mut t0 = 0;
    while t0 < n {
        let tc = chunk.min(n - t0);
        // Keys visible to the last token of the chunk; earlier tokens mask the rest.
        let visible = first_pos + t0 + tc;
        let blocks = Blocks {
            cache,
            layout,
            layer,
            visible,
        };
        let m = tc * h;
        let s = &mut scores[..m * visible];
        let q = &rows[t0 * h * width..][..m * width];
        let kept = scores_pass(&blocks, q, m, scale, s);
        for (ri, row) in s.chunks_exact_mut(visible).enumerate() {
            let pos = first_pos + t0 + ri / h;
            let (live, masked) = row.split_at_mut(pos + 1);
            masked.fill(0.0);
            kernels::softmax(live);
        }
        values_pass(
            &blocks,
            kept,
            s,
            m,
            lora,
            &mut out[t0 * h * lora..][..m * lora],
        );
        t0 += tc;
    }
}

/// `s[m, visible] = scale · q · keysᵀ`, one GEMM per block; returns the gathered blocks when
/// they are small enough to keep for the values pass.
fn scores_pass(
    blocks: &Blocks<'_>,
    q: &[f32],
    m: usize,
    scale: f32,
    s: &mut [f32],
) -> Option<Vec<Vec<f32>>> {
    let width = blocks.layout.width;
    let visible = blocks.visible;
    let keep = visible * width <= MAX_KEPT_ELEMS;
    let mut kept = Vec::new();
    // Block scores are held per group (MAX_PARTIAL_ELEMS) before they are copied into `s`.
    in_block_order(
        blocks.count(),
        MAX_PARTIAL_ELEMS / (m * BLOCK_TOKENS).max(1),
        |b| {
            let keys = blocks.gather(b);
            let nb = blocks.span(b).1;
            let mut sb = vec![0.0f32; m * nb];
            let dims = (m, nb, width);
            kernels::matmul_nt_with(&mut sb, nb, q, width, &keys, width, dims, scale, Par::Seq);
            (sb, keep.then_some(keys))
        },
        |b, (sb, keys)| {
            let (k0, nb) = blocks.span(b);
            for (dst, src) in s.chunks_exact_mut(visible).zip(sb.chunks_exact(nb)) {
                dst[k0..k0 + nb].copy_from_slice(src);
            }
            kept.extend(keys);
        },
    );
    keep.then_some(kept)
}

/// `out[m, lora] = Σ_b p[:, block b] · values_b`, partials added in block order.
fn values_pass(
    blocks: &Blocks<'_>,
    kept: Option<Vec<Vec<f32>>>,
    p: &[f32],
    m: usize,
    lora: usize,
    out: &mut [f32],
) {
    let (width, visible) = (blocks.layout.width, blocks.visible);
    in_block_order(
        blocks.count(),
        MAX_PARTIAL_ELEMS / (m * lora).max(1),
        |b| {
            let (k0, nb) = blocks.span(b);
            let gathered;
            let vals = match &kept {
                Some(k) => k[b].as_slice(),
                None => {
                    gathered = blocks.gather(b);
                    gathered.as_slice()
                }
            };
            let mut part = vec![0.0f32; m * lora];
            let (p, dims) = (&p[k0..], (m, lora, nb));
            kernels::matmul_nn_with(
                &mut part,
                lora,
                p,
                visible,
                vals,
                width,
                dims,
                false,
                Par::Seq,
            );
            part
        },
        |b, part| {
            if b == 0 {
                out.copy_from_slice(&part);
            } else {
                for (o, v) in out.iter_mut().zip(&part) {
                    *o += v;
                }
            }
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::{KvDtype, KvPool};

    const LORA: usize = 24;
    const ROPE: usize = 8;
    const HEADS: usize = 3;

    fn value(i: usize, salt: f32) -> f32 {
        ((i as f32 * 0.618 + salt).sin() * 43758.547).fract() - 0.5
    }

    /// A one-layer cache holding `total` tokens, the last `new` of them written but uncommitted.
    fn cache(dtype: KvDtype, total: usize, new: usize) -> SeqCache {
        let layout = KvLayout {
            layers: 1,
            width: LORA + ROPE,
            page_tokens: 16,
            dtype,
            fixed_pages: 0,
        };
        let pool = KvPool::new(layout, None, false);
        let mut c = SeqCache::in_pool(&pool);
        let rows = |from: usize, to: usize| -> Vec<f32> {
            (from * layout.width..to * layout.width)
                .map(|i| value(i, 1.0))
                .collect()
        };
        let old = total - new;
        if old > 0 {
            c.prepare(&vec![5; old]).expect("unbounded pool");
            c.write(0, &rows(0, old));
            c.commit();
        }
        c.prepare(&vec![5; new]).expect("unbounded pool");
        c.write(0, &rows(old, total));
        c
    }

    /// Every cached row of layer 0 (committed or not), as the attention reads them.
    fn keys(c: &SeqCache, total: usize) -> Vec<f32> {
        let b = Blocks {
            cache: c,
            layout: *c.layout(),
            layer: 0,
            visible: total,
        };
        (0..b.count()).flat_map(|i| b.gather(i)).collect()
    }

    /// Attention in f64, one query row at a time.
    fn naive(keys: &[f32], q: &[f32], first_pos: usize, scale: f32) -> Vec<f32> {
        let w = LORA + ROPE;
        let mut out = Vec::new();
        for (r, qr) in q.chunks_exact(w).enumerate() {
            let pos = first_pos + r / HEADS;
            let s: Vec<f64> = keys
                .chunks_exact(w)
                .take(pos + 1)
                .map(|k| k.iter().zip(qr).map(|(a, b)| f64::from(a * b)).sum::<f64>())
                .map(|x| x * f64::from(scale))
                .collect();
            let max = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = s.iter().map(|x| (x - max).exp()).collect();
            let sum: f64 = e.iter().sum();
            for j in 0..LORA {
                let v: f64 = e
                    .iter()
                    .zip(keys.chunks_exact(w))
                    .map(|(p, k)| p * f64::from(k[j]))
                    .sum();
                out.push((v / sum) as f32);
            }
        }
        out
    }

    fn run(c: &SeqCache, first_pos: usize, q: &[f32], threads: usize) -> Vec<f32> {
        let n = q.len() / (HEADS * (LORA + ROPE));
        let mut out = vec![f32::NAN; n * HEADS * LORA];
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .expect("thread pool");
        pool.install(|| attend(c, 0, first_pos, q, (HEADS, LORA), 0.3, &mut out));
        out
    }

    /// Decode over several blocks (the last one partial) and a prefill that spans them, for
    /// both cache dtypes: equal to f64 attention, and bitwise the same on 1 and 3 threads.
    #[test]
    fn blocks_match_naive_attention_on_any_thread_count() {
        for dtype in [KvDtype::F32, KvDtype::Bf16] {
            for (total, new) in [
                (3 * BLOCK_TOKENS + 37, 2),
                (2 * BLOCK_TOKENS + 5, 2 * BLOCK_TOKENS + 5),
                (BLOCK_TOKENS, 1),
            ] {
                let c = cache(dtype, total, new);
                let first_pos = total - new;
                let q: Vec<f32> = (0..new * HEADS * (LORA + ROPE))
                    .map(|i| 4.0 * value(i, 2.0))
                    .collect();
                let one = run(&c, first_pos, &q, 1);
                let three = run(&c, first_pos, &q, 3);
                assert!(
                    one.iter()
                        .zip(&three)
                        .all(|(a, b)| a.to_bits() == b.to_bits())
                );
                let want = naive(&keys(&c, total), &q, first_pos, 0.3);
                for (i, (got, want)) in one.iter().zip(&want).enumerate() {
                    assert!(
                        (got - want).abs() <= 1e-5 + 1e-4 * want.abs(),
                        "{dtype:?} total {total} new {new} [{i}]: {got} vs {want}"
                    );
                }
            }
        }
    }
}

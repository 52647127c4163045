//! Manifold-constrained hyper-connections (mHC): DeepSeek-V4's residual is `hc_mult` (n)
//! streams per token, `[tokens, n·hidden]`.
//!
//! Before a block, [`HyperConn::pre`] computes from the streams `f = rms(X.flatten())` (no weight)
//! and `mix = f · fnᵀ`, split `[pre n | post n | comb n·n]`: `pre = σ(mix·s0 + b) + hc_eps`,
//! `post = 2σ(mix·s1 + b)`, `comb = softmax_row(mix·s2 + b) + hc_eps`, then Sinkhorn (normalise
//! columns, then `iters − 1` × rows and columns, each with `sum + hc_eps`). The block input is
//! `Σ_j pre_j X_j`. After it, [`expand`] writes `X'_k = post_k·out + Σ_j comb[j,k]·X_j` (comb is
//! used transposed). [`HcHead`] collapses the streams at the end with its own `pre`.
//! Reference: transformers `DeepseekV4HyperConnection`, `DeepseekV4HyperHead`.

use super::V4Config;
use super::names::Names;
use crate::checkpoint::{Checkpoint, WeightData};
use crate::error::Result;
use crate::kernels::{self, Linear};

/// Per-token mixing weights of one block: `post [t, n]`, `comb [t, n·n]` (row-major `[j, k]`).
#[derive(Debug)]
pub struct HcMix {
    pub post: Vec<f32>,
    pub comb: Vec<f32>,
}

/// One block's hyper-connection (`hc_attn_*` or `hc_ffn_*`).
#[derive(Debug)]
pub struct HyperConn {
    fn_w: Linear,
    base: Vec<f32>,
    scale: [f32; 3],
    n: usize,
    iters: usize,
    hc_eps: f32,
    eps: f32,
}

/// `x / sqrt(mean(x²) + eps)` on every row of width `w`, into a new buffer.
fn unweighted_rms(x: &[f32], w: usize, eps: f32) -> Vec<f32> {
    let mut out = x.to_vec();
    for row in out.chunks_exact_mut(w) {
        let ms = row.iter().map(|v| v * v).sum::<f32>() / w as f32;
        let inv = 1.0 / (ms + eps).sqrt();
        row.iter_mut().for_each(|v| *v *= inv);
    }
    out
}

/// `Σ_j pre_j X_j` for every token: `x [t, n·d]`, `pre [t, n]` → `[t, d]`.
/// `x [t, in] · Wᵀ` one row at a time: these weights are float32, whose GEMM (faer) rounds
/// differently with the row count, and a row's mixing weights must not depend on the batch.
fn by_rows(w: &Linear, x: &[f32], t: usize) -> Vec<f32> {
    use rayon::prelude::*;
    let cols = x.len() / t.max(1);
    x.par_chunks_exact(cols.max(1))
        .flat_map_iter(|row| w.forward(row, 1))
        .collect()
}

fn collapse(x: &[f32], pre: &[f32], n: usize, d: usize) -> Vec<f32> {
    let t = pre.len() / n;
    let mut out = vec![0.0f32; t * d];
    for i in 0..t {
        let o = &mut out[i * d..][..d];
        for j in 0..n {
            let p = pre[i * n + j];
            for (ov, xv) in o.iter_mut().zip(&x[(i * n + j) * d..][..d]) {
                *ov += p * xv;
            }
        }
    }
    out
}

impl HyperConn {
    /// Loads `layers.{layer}.hc_{which}_{fn,base,scale}` (`which`: `attn` or `ffn`).
    pub fn load(
        cfg: &V4Config,
        ckpt: &Checkpoint,
        names: &Names,
        layer: usize,
        which: &str,
    ) -> Result<HyperConn> {
        let n = cfg.hc_mult;
        let rows = (2 + n) * n;
        let cols = n * cfg.hidden_size;
        let name = |part: &str| names.layer(layer, &format!("hc_{which}_{part}"));
        let fn_w = ckpt.read_f32(&name("fn"), &[rows, cols])?;
        let s = ckpt.read_f32(&name("scale"), &[3])?;
        Ok(HyperConn {
            fn_w: Linear::new(WeightData::F32(fn_w), rows, cols),
            base: ckpt.read_f32(&name("base"), &[rows])?,
            scale: [s[0], s[1], s[2]],
            n,
            iters: cfg.hc_sinkhorn_iters,
            hc_eps: cfg.hc_eps as f32,
            eps: cfg.rms_norm_eps as f32,
        })
    }

    /// The block input `[t, d]` and the mixing weights, from the streams `x [t, n·d]`.
    pub fn pre(&self, x: &[f32], t: usize) -> (Vec<f32>, HcMix) {
        let n = self.n;
        let d = x.len() / (t * n).max(1);
        let mix = by_rows(&self.fn_w, &unweighted_rms(x, n * d, self.eps), t);
        let w = (2 + n) * n;
        let mut pre = Vec::with_capacity(t * n);
        let mut post = Vec::with_capacity(t * n);
        let mut comb = Vec::with_capacity(t * n * n);
        for row in mix.chunks_exact(w) {
            for j in 0..n {
                pre.push(kernels::sigmoid(row[j] * self.scale[0] + self.base[j]) + self.hc_eps);
                post.push(2.0 * kernels::sigmoid(row[n + j] * self.scale[1] + self.base[n + j]));
            }
            let mut c: Vec<f32> = (0..n * n)
                .map(|i| row[2 * n + i] * self.scale[2] + self.base[2 * n + i])
                .collect();
            for r in c.chunks_exact_mut(n) {
                kernels::softmax(r);
                r.iter_mut().for_each(|v| *v += self.hc_eps);
            }
            self.normalise_columns(&mut c);
            for _ in 1..self.iters {
                for r in c.chunks_exact_mut(n) {
                    let s = r.iter().sum::<f32>() + self.hc_eps;
                    r.iter_mut().for_each(|v| *v /= s);
                }
                self.normalise_columns(&mut c);
            }
            comb.extend(c);
        }
        (collapse(x, &pre, n, d), HcMix { post, comb })
    }

    fn normalise_columns(&self, c: &mut [f32]) {
        let n = self.n;
        for k in 0..n {
            let s = (0..n).map(|j| c[j * n + k]).sum::<f32>() + self.hc_eps;
            for j in 0..n {
                c[j * n + k] /= s;
            }
        }
    }
}

/// `X'_k = post_k·out + Σ_j comb[j,k]·X_j`: `out [t, d]`, `x [t, n·d]` → `[t, n·d]`.
pub fn expand(mix: &HcMix, out: &[f32], x: &[f32], n: usize) -> Vec<f32> {
    let t = mix.post.len() / n;
    let d = out.len() / t.max(1);
    let mut y = vec![0.0f32; t * n * d];
    for i in 0..t {
        let o = &out[i * d..][..d];
        let comb = &mix.comb[i * n * n..][..n * n];
        for k in 0..n {
            let dst = &mut y[(i * n + k) * d..][..d];
            let p = mix.post[i * n + k];
            for (dv, ov) in dst.iter_mut().zip(o) {
                *dv = p * ov;
            }
            for j in 0..n {
                let c = comb[j * n + k];
                for (dv, xv) in dst.iter_mut().zip(&x[(i * n + j) * d..][..d]) {
                    *dv += c * xv;
                }
            }
        }
    }
    y
}

/// The final collapse of the streams (`hc_head_{fn,base,scale}`).
#[derive(Debug)]
pub struct HcHead {
    fn_w: Linear,
    base: Vec<f32>,
    scale: f32,
    n: usize,
    hc_eps: f32,
    eps: f32,
}

impl HcHead {
    /// Loads `hc_head_{fn,base,scale}`.
    pub fn load(cfg: &V4Config, ckpt: &Checkpoint, names: &Names) -> Result<HcHead> {
        let n = cfg.hc_mult;
        let cols = n * cfg.hidden_size;
        let fn_w = ckpt.read_f32(&names.global("hc_head_fn"), &[n, cols])?;
        Ok(HcHead {
            fn_w: Linear::new(WeightData::F32(fn_w), n, cols),
            base: ckpt.read_f32(&names.global("hc_head_base"), &[n])?,
            scale: ckpt.read_f32(&names.global("hc_head_scale"), &[1])?[0],
            n,
            hc_eps: cfg.hc_eps as f32,
            eps: cfg.rms_norm_eps as f32,
        })
    }

    /// `x [t, n·d]` → `[t, d]`.
    pub fn forward(&self, x: &[f32], t: usize) -> Vec<f32> {
        let n = self.n;
        let d = x.len() / (t * n).max(1);
        let mix = by_rows(&self.fn_w, &unweighted_rms(x, n * d, self.eps), t);
        let pre: Vec<f32> = mix
            .iter()
            .enumerate()
            .map(|(i, m)| kernels::sigmoid(m * self.scale + self.base[i % n]) + self.hc_eps)
            .collect();
        collapse(x, &pre, n, d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sinkhorn_makes_comb_doubly_stochastic_and_expand_uses_its_transpose() {
        let n = 2;
        let d = 1;
        // fn = 0: mix is the base alone. comb logits favour [0,1] strongly; not symmetric.
        let hc = HyperConn {
            fn_w: Linear::new(WeightData::F32(vec![0.0; 8 * 2]), 8, 2),
            base: vec![0.0, 0.0, 0.0, 0.0, 0.0, 3.0, 1.0, 0.0],
            scale: [1.0, 1.0, 1.0],
            n,
            iters: 20,
            hc_eps: 1e-6,
            eps: 1e-6,
        };
        let x = [1.0f32, 10.0];
        let (c, mix) = hc.pre(&x, 1);
        // pre = σ(0) + eps each: collapsed = 0.5·(1 + 10).
        assert!((c[0] - 5.5).abs() < 1e-4, "{c:?}");
        let m = &mix.comb;
        for r in 0..n {
            assert!((m[r * n] + m[r * n + 1] - 1.0).abs() < 1e-3, "{m:?}");
            assert!((m[r] + m[n + r] - 1.0).abs() < 1e-3, "{m:?}");
        }
        assert!(m[1] > m[0], "{m:?}");
        let y = expand(&mix, &[0.0], &x, n);
        // Stream 0 gets Σ_j comb[j, 0]·x_j.
        let want0 = m[0] * x[0] + m[n] * x[1];
        assert!((y[0] - want0).abs() < 1e-5, "{y:?}");
        assert_eq!(y.len(), n * d);
    }
}

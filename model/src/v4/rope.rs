//! DeepSeek-V4 rotary embedding: interleaved pairs `(2i, 2i+1)` on the **last**
//! `qk_rope_head_dim` dims of a head (`[nope | rope]`), written back in place (V4's output keeps
//! the interleaved layout, since the value's rope slice is rotated back and projected).
//!
//! Two sets: "main" (sliding-only layers; plain θ = `rope_theta`) and "compress" (CSA/HCA layers,
//! their compressors and the indexer; θ = `compress_rope_theta` with YaRN frequencies). cos/sin
//! are never scaled (the config forces YaRN's `attention_factor` to 1.0), and the attention scale
//! is `head_dim^-0.5` without YaRN's mscale.
//! Reference: transformers `DeepseekV4RotaryEmbedding`, `apply_rotary_pos_emb`,
//! `modeling_rope_utils._compute_yarn_parameters`.

use super::config::RopeParams;
use crate::config::RopeType;
use crate::rope::{Yarn, pos_freqs};

/// Inverse frequencies of one rope set.
#[derive(Debug, Clone)]
pub struct V4Rope {
    dim: usize,
    inv_freq: Vec<f32>,
    scaling: f32,
}

/// `(cos, sin)` rows of a list of positions, `[positions, dim/2]`.
#[derive(Debug, Clone, Default)]
pub struct RopeTable {
    pub half: usize,
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
}

impl RopeTable {
    /// Rotates the last `2·half` dims of `x` (interleaved pairs) by the angles of row `row`;
    /// `inverse` rotates by the negative angle.
    pub fn rotate(&self, x: &mut [f32], row: usize, inverse: bool) {
        let h = self.half;
        let start = x.len() - 2 * h;
        let (c, s) = (&self.cos[row * h..][..h], &self.sin[row * h..][..h]);
        let sign = if inverse { -1.0 } else { 1.0 };
        for i in 0..h {
            let (a, b) = (x[start + 2 * i], x[start + 2 * i + 1]);
            let si = sign * s[i];
            x[start + 2 * i] = a * c[i] - b * si;
            x[start + 2 * i + 1] = b * c[i] + a * si;
        }
    }
}

impl V4Rope {
    /// The rope set `p` over `dim` rotated dims.
    pub fn new(p: &RopeParams, dim: usize) -> V4Rope {
        let base = p.rope_theta;
        let pos_freqs = pos_freqs(base, dim);
        if p.rope_type != RopeType::Yarn {
            return V4Rope {
                dim,
                inv_freq: pos_freqs.iter().map(|f| 1.0 / f).collect(),
                scaling: 1.0,
            };
        }
        let yarn = Yarn {
            factor: p.factor.unwrap_or(1.0),
            original: p.original_max_position_embeddings.unwrap_or(4096) as f64,
            beta_fast: p.beta_fast.unwrap_or(32.0),
            beta_slow: p.beta_slow.unwrap_or(1.0),
            truncate: p.truncate.unwrap_or(true),
        };
        let inv_freq = yarn.inv_freq(&pos_freqs, base, dim);
        V4Rope {
            dim,
            inv_freq,
            scaling: p.attention_factor.unwrap_or(1.0) as f32,
        }
    }

    /// The rotated width.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// cos/sin of each position (the angle is a float32 product, as in the reference).
    pub fn table(&self, positions: impl IntoIterator<Item = usize>) -> RopeTable {
        let mut t = RopeTable {
            half: self.dim / 2,
            ..RopeTable::default()
        };
        for pos in positions {
            for &f in &self.inv_freq {
                let angle = f64::from(pos as f32 * f);
                t.cos.push(angle.cos() as f32 * self.scaling);
                t.sin.push(angle.sin() as f32 * self.scaling);
            }
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_is_interleaved_on_the_tail_and_inverts() {
        let p = RopeParams {
            rope_type: RopeType::Default,
            rope_theta: 10_000.0,
            partial_rotary_factor: None,
            factor: None,
            original_max_position_embeddings: None,
            beta_fast: None,
            beta_slow: None,
            attention_factor: None,
            mscale: None,
            mscale_all_dim: None,
            truncate: None,
        };
        let t = V4Rope::new(&p, 4).table([3]);
        let orig = [9.0f32, 1.0, 2.0, 3.0, 4.0];
        let mut x = orig;
        t.rotate(&mut x, 0, false);
        assert_eq!(x[0], 9.0, "the nope head is untouched");
        // Pair (x1, x2) rotated by 3 rad (inv_freq 1 for i = 0).
        assert!((x[1] - (3f32.cos() - 2.0 * 3f32.sin())).abs() < 1e-6);
        assert!((x[2] - (2.0 * 3f32.cos() + 3f32.sin())).abs() < 1e-6);
        t.rotate(&mut x, 0, true);
        for (a, b) in x.iter().zip(orig) {
            assert!((a - b).abs() < 1e-5);
        }
    }
}

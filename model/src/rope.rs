//! Rotary position embedding with YaRN scaling, in the interleaved layout of the official
//! DeepSeek weights.
//!
//! The rope slice of each query head and of the shared key holds pairs `(2i, 2i+1)` rotated by
//! `pos * inv_freq[i]` (DeepSeek's `view_as_complex` form). Like Hugging Face's
//! `apply_rotary_pos_emb_interleave`, the output is written de-interleaved (`[rotated evens |
//! rotated odds]`); queries and keys use the same layout, so attention scores are unchanged.
//! YaRN follows transformers' `_compute_yarn_parameters` (correction range from beta_fast /
//! beta_slow, ramp between interpolated and extrapolated frequencies, cos/sin scaled by the
//! attention factor) and the attention module's softmax-scale correction `mscale(factor,
//! mscale_all_dim)²`.
//! References: transformers `modeling_rope_utils.py`, `modeling_deepseek_v3.py`; DeepSeek-V3
//! `inference/model.py::precompute_freqs_cis`.

use std::f64::consts::PI;

use crate::config::Config;

/// Precomputed RoPE parameters for one model.
#[derive(Debug, Clone)]
pub struct Rope {
    dim: usize,
    inv_freq: Vec<f32>,
    attention_factor: f32,
    interleave: bool,
}

/// `0.1 * mscale * ln(scale) + 1` for `scale > 1`, else 1 (YaRN's magnitude correction).
pub fn yarn_mscale(scale: f64, mscale: f64) -> f64 {
    if scale <= 1.0 {
        1.0
    } else {
        0.1 * mscale * scale.ln() + 1.0
    }
}

/// `base ** (arange(0, dim, 2) / dim)`, computed in float32 like the reference.
pub(crate) fn pos_freqs(base: f64, dim: usize) -> Vec<f32> {
    (0..dim / 2)
        .map(|i| (base as f32).powf((2 * i) as f32 / dim as f32))
        .collect()
}

/// YaRN's frequency blend (transformers `_compute_yarn_parameters`): dims that rotate more than
/// `beta_fast` times over the original context keep their frequency, those under `beta_slow`
/// are interpolated by `factor`, with a linear ramp between.
pub(crate) struct Yarn {
    pub factor: f64,
    pub original: f64,
    pub beta_fast: f64,
    pub beta_slow: f64,
    /// Round the ramp's ends to whole dims (the reference's default).
    pub truncate: bool,
}

impl Yarn {
    /// The blended inverse frequencies for `pos_freqs` of `dim` rotated dims at `base`.
    pub fn inv_freq(&self, pos_freqs: &[f32], base: f64, dim: usize) -> Vec<f32> {
        let correction_dim = |rotations: f64| {
            dim as f64 * (self.original / (rotations * 2.0 * PI)).ln() / (2.0 * base.ln())
        };
        let (mut low, mut high) = (
            correction_dim(self.beta_fast),
            correction_dim(self.beta_slow),
        );
        if self.truncate {
            low = low.floor();
            high = high.ceil();
        }
        let low = low.max(0.0);
        let high = high.min(dim as f64 - 1.0);
        let span = if low == high { 0.001 } else { high - low };
        pos_freqs
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let ramp = ((i as f32 - low as f32) / span as f32).clamp(0.0, 1.0);
                let extrapolation = 1.0 - ramp;
                let interpolated = 1.0 / (self.factor as f32 * p);
                interpolated * (1.0 - extrapolation) + (1.0 / p) * extrapolation
            })
            .collect()
    }
}

impl Rope {
    /// RoPE of `cfg` (rope dim = `qk_rope_head_dim`).
    pub fn new(cfg: &Config) -> Rope {
        let dim = cfg.qk_rope_head_dim;
        let base = cfg.rope_theta;
        let pos_freqs = pos_freqs(base, dim);
        let Some(rs) = &cfg.rope_scaling else {
            return Rope {
                dim,
                inv_freq: pos_freqs.iter().map(|p| 1.0 / p).collect(),
                attention_factor: 1.0,
                interleave: cfg.rope_interleave,
            };
        };
        let (original, factor) = match rs.original_max_position_embeddings {
            Some(orig) => (
                orig as f64,
                cfg.max_position_embeddings as f64 / orig as f64,
            ),
            None => (cfg.max_position_embeddings as f64, rs.factor),
        };
        let attention_factor =
            rs.attention_factor
                .unwrap_or_else(|| match (rs.mscale, rs.mscale_all_dim) {
                    (Some(m), Some(all)) if m != 0.0 && all != 0.0 => {
                        yarn_mscale(factor, m) / yarn_mscale(factor, all)
                    }
                    _ => yarn_mscale(factor, 1.0),
                });
        let beta_fast = rs.beta_fast.filter(|b| *b != 0.0).unwrap_or(32.0);
        let beta_slow = rs.beta_slow.filter(|b| *b != 0.0).unwrap_or(1.0);
        let yarn = Yarn {
            factor,
            original,
            beta_fast,
            beta_slow,
            truncate: true,
        };
        let inv_freq = yarn.inv_freq(&pos_freqs, base, dim);
        Rope {
            dim,
            inv_freq,
            attention_factor: attention_factor as f32,
            interleave: cfg.rope_interleave,
        }
    }

    /// The inverse frequencies, one per rotated pair.
    pub fn inv_freq(&self) -> &[f32] {
        &self.inv_freq
    }

    /// The factor applied to cos and sin (1 unless YaRN's mscale and mscale_all_dim differ).
    pub fn attention_factor(&self) -> f32 {
        self.attention_factor
    }

    /// `(cos, sin)` for each position, `[positions, dim/2]`, attention factor included.
    pub fn tables(&self, positions: &[usize]) -> (Vec<f32>, Vec<f32>) {
        let half = self.dim / 2;
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for &pos in positions {
            for &f in &self.inv_freq {
                // The angle is a float32 product, as in the reference.
                let angle = f64::from(pos as f32 * f);
                cos.push((angle.cos() as f32) * self.attention_factor);
                sin.push((angle.sin() as f32) * self.attention_factor);
            }
        }
        (cos, sin)
    }

    /// Rotates `x` (`dim` values) in place with the `(cos, sin)` row of its position.
    pub fn apply(&self, x: &mut [f32], cos: &[f32], sin: &[f32]) {
        let half = self.dim / 2;
        let mut tmp = [0.0f32; 512];
        let buf = &mut tmp[..self.dim];
        if self.interleave {
            for i in 0..half {
                buf[i] = x[2 * i];
                buf[i + half] = x[2 * i + 1];
            }
        } else {
            buf.copy_from_slice(x);
        }
        for i in 0..half {
            let (a, b) = (buf[i], buf[i + half]);
            x[i] = a * cos[i] - b * sin[i];
            x[i + half] = b * cos[i] + a * sin[i];
        }
    }
}

/// The attention softmax scale: `qk_head_dim^-0.5`, times `mscale(factor, mscale_all_dim)²` with
/// YaRN (as transformers' `DeepseekV3Attention`).
pub fn softmax_scale(cfg: &Config) -> f32 {
    let mut scale = (cfg.qk_head_dim() as f64).powf(-0.5);
    if let Some(rs) = &cfg.rope_scaling
        && let Some(all) = rs.mscale_all_dim
        && all != 0.0
    {
        let m = yarn_mscale(rs.factor, all);
        scale *= m * m;
    }
    scale as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(rope_scaling: serde_json::Value) -> Config {
        let mut v: serde_json::Value = serde_json::from_str(include_str!(
            "../../tests/fixtures/models/tiny-dsv3/config.json"
        ))
        .expect("fixture");
        v["qk_rope_head_dim"] = 64.into();
        v["head_dim"] = 64.into();
        v["qk_head_dim"] = 80.into();
        v["max_position_embeddings"] = 163840.into();
        v["rope_scaling"] = rope_scaling;
        Config::from_json(&v.to_string()).expect("valid")
    }

    /// DeepSeek-V3's published rope_scaling.
    fn dsv3() -> Config {
        config(
            serde_json::json!({"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
            "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}),
        )
    }

    #[test]
    fn yarn_frequencies_follow_the_correction_range() {
        // By hand for dim 64, base 1e4, 4096 original positions: the correction dims are
        // 64·ln(4096/(32·2π))/(2·ln 1e4) = 10.47 → 10 and 64·ln(4096/(2π))/(2·ln 1e4) = 22.51 → 23.
        // Pairs up to 10 keep their frequency, pairs from 23 on are divided by 40, and pair 16
        // blends with ramp (16-10)/13.
        let rope = Rope::new(&dsv3());
        let plain = |i: usize| 1.0 / 10000f64.powf(2.0 * i as f64 / 64.0);
        let f = rope.inv_freq();
        assert_eq!(f.len(), 32);
        for (i, &fi) in f.iter().enumerate().take(11) {
            assert!((f64::from(fi) / plain(i) - 1.0).abs() < 1e-6, "pair {i}");
        }
        for (i, &fi) in f.iter().enumerate().skip(23) {
            assert!(
                (f64::from(fi) / (plain(i) / 40.0) - 1.0).abs() < 1e-6,
                "pair {i}"
            );
        }
        let r = 6.0 / 13.0;
        let blend = plain(16) / 40.0 * r + plain(16) * (1.0 - r);
        assert!((f64::from(f[16]) / blend - 1.0).abs() < 1e-6);
        // mscale == mscale_all_dim: cos/sin unscaled; the softmax scale gets (0.1 ln 40 + 1)².
        assert_eq!(rope.attention_factor(), 1.0);
        let expect = (16.0f64 + 64.0).powf(-0.5) * (0.1 * 40f64.ln() + 1.0).powi(2);
        assert!((f64::from(softmax_scale(&dsv3())) - expect).abs() < 1e-7);
    }

    #[test]
    fn yarn_attention_factor_without_mscale_all_dim() {
        let cfg = config(serde_json::json!({"type": "yarn", "factor": 4.0}));
        let rope = Rope::new(&cfg);
        assert!((f64::from(rope.attention_factor()) - (0.1 * 4f64.ln() + 1.0)).abs() < 1e-6);
        assert_eq!(softmax_scale(&cfg), (80f64).powf(-0.5) as f32);
    }

    #[test]
    fn interleaved_rotation_equals_complex_multiplication() {
        // The official code treats (2i, 2i+1) as the complex number x_{2i} + i·x_{2i+1} and
        // multiplies by e^{i·pos·f_i}. Dot products of rotated q and k must agree.
        let cfg = config(serde_json::Value::Null);
        let rope = Rope::new(&cfg);
        let q: Vec<f32> = (0..64).map(|i| (i as f32 * 0.7).sin()).collect();
        let k: Vec<f32> = (0..64).map(|i| (i as f32 * 0.3).cos()).collect();
        let complex = |x: &[f32], pos: usize| -> Vec<f64> {
            let mut out = vec![0.0; 64];
            for i in 0..32 {
                let th = pos as f64 * f64::from(rope.inv_freq()[i]);
                let (re, im) = (f64::from(x[2 * i]), f64::from(x[2 * i + 1]));
                out[2 * i] = re * th.cos() - im * th.sin();
                out[2 * i + 1] = re * th.sin() + im * th.cos();
            }
            out
        };
        for (pq, pk) in [(0, 0), (5, 3), (300, 17), (1000, 999)] {
            let (mut qr, mut kr) = (q.clone(), k.clone());
            let (c, s) = rope.tables(&[pq, pk]);
            rope.apply(&mut qr, &c[..32], &s[..32]);
            rope.apply(&mut kr, &c[32..], &s[32..]);
            let ours: f64 = qr
                .iter()
                .zip(&kr)
                .map(|(a, b)| f64::from(*a) * f64::from(*b))
                .sum();
            let reference: f64 = complex(&q, pq)
                .iter()
                .zip(complex(&k, pk))
                .map(|(a, b)| a * b)
                .sum();
            assert!(
                (ours - reference).abs() < 1e-3,
                "{pq},{pk}: {ours} vs {reference}"
            );
        }
    }

    #[test]
    fn scores_depend_only_on_relative_position() {
        let rope = Rope::new(&config(serde_json::Value::Null));
        let q: Vec<f32> = (0..64).map(|i| (i as f32 * 1.1).sin()).collect();
        let k: Vec<f32> = (0..64).map(|i| (i as f32 * 0.4).cos()).collect();
        let score = |pq: usize, pk: usize| {
            let (mut qr, mut kr) = (q.clone(), k.clone());
            let (c, s) = rope.tables(&[pq, pk]);
            rope.apply(&mut qr, &c[..32], &s[..32]);
            rope.apply(&mut kr, &c[32..], &s[32..]);
            qr.iter().zip(&kr).map(|(a, b)| a * b).sum::<f32>()
        };
        assert!((score(10, 4) - score(106, 100)).abs() < 1e-3);
        assert!((score(10, 4) - score(10, 5)).abs() > 1e-3);
    }
}

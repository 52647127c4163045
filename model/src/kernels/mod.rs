//! CPU compute: the weight GEMM ([`Linear`]), activation-by-activation GEMM (attention), and the
//! element-wise operations (RMSNorm, SiLU·up, softmax). All accumulate in float32.

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
mod dense;
#[cfg(test)]
mod fp4_tests;
mod linear;
mod pack;
mod tasks;

pub use dense::{matmul_nn, matmul_nn_acc, matmul_nt};
pub(crate) use dense::{matmul_nn_with, matmul_nt_with};
pub use linear::{
    GemmJob, KernelChoice, Linear, forward_grouped, kernel_choice, packed_rows_exact, products,
    set_kernel_choice,
};
pub use pack::row_scales;

/// `x / sqrt(mean(x²) + eps) * w`, in place on every row of `x` (`[rows, w.len()]`).
pub fn rms_norm_rows(x: &mut [f32], w: &[f32], eps: f32) {
    let n = w.len();
    for row in x.chunks_exact_mut(n) {
        rms_norm(row, w, eps);
    }
}

/// RMSNorm of one vector, in place (HF: `w * (x * rsqrt(mean(x²) + eps))`).
pub fn rms_norm(x: &mut [f32], w: &[f32], eps: f32) {
    let mut acc = [0.0f32; 16];
    let mut chunks = x.chunks_exact(16);
    for c in &mut chunks {
        for i in 0..16 {
            acc[i] += c[i] * c[i];
        }
    }
    let mut ss: f32 = acc.iter().sum();
    ss += chunks.remainder().iter().map(|v| v * v).sum::<f32>();
    let inv = 1.0 / (ss / x.len() as f32 + eps).sqrt();
    for (v, &g) in x.iter_mut().zip(w) {
        *v = g * (*v * inv);
    }
}

/// `e^x` in float32 without libm: `2^n · p(f)` with `x = n·ln2 + f`, `|f| ≤ ln2/2`, and a
/// degree-6 Taylor polynomial (relative error < 2e-7 across the range). Branch-free, so loops
/// over slices vectorise, and it never takes libm's slow under/overflow paths (which cost
/// ~200 ns per call on this machine for the very negative attention scores of a softmax).
/// Inputs are clamped to [-87.3, 88]: tiny results become ~1e-38 instead of 0, huge ones e^88.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    const ROUND: f32 = 12_582_912.0; // 1.5 · 2^23: adding and subtracting rounds to an integer
    let x = x.clamp(-87.3, 88.0);
    let n = (x * LOG2E + ROUND) - ROUND;
    let f = x - n * LN2_HI - n * LN2_LO;
    let p = 1.0
        + f * (1.0
            + f * (0.5
                + f * (1.0 / 6.0 + f * (1.0 / 24.0 + f * (1.0 / 120.0 + f * (1.0 / 720.0))))));
    p * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// `silu(g) * u`, where `gu` rows are `[gate | up]` of width `2 * inter`; writes `[rows, inter]`.
pub fn silu_mul(gu: &[f32], inter: usize, out: &mut [f32]) {
    for (row, o) in gu.chunks_exact(2 * inter).zip(out.chunks_exact_mut(inter)) {
        let (g, u) = row.split_at(inter);
        for i in 0..inter {
            o[i] = g[i] / (1.0 + exp(-g[i])) * u[i];
        }
    }
}

/// `silu(min(g, limit)) * clamp(u, -limit, limit)` (DeepSeek-V4's clamped SwiGLU; the gate has
/// no lower clamp), where `gu` rows are `[gate | up]` of width `2 * inter`; writes `[rows, inter]`.
pub fn silu_mul_clamped(gu: &[f32], inter: usize, limit: f32, out: &mut [f32]) {
    for (row, o) in gu.chunks_exact(2 * inter).zip(out.chunks_exact_mut(inter)) {
        let (g, u) = row.split_at(inter);
        for i in 0..inter {
            let gi = g[i].min(limit);
            o[i] = gi / (1.0 + exp(-gi)) * u[i].clamp(-limit, limit);
        }
    }
}

/// Numerically stable softmax in place.
pub fn softmax(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for v in x.iter_mut() {
        *v = exp(*v - max);
    }
    for v in x.iter() {
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

/// `1 / (1 + e^-x)`.
#[inline]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rms_norm_matches_the_definition() {
        let mut x: Vec<f32> = (0..37).map(|i| (i as f32 * 0.37).sin()).collect();
        let w: Vec<f32> = (0..37).map(|i| 1.0 + i as f32 * 0.01).collect();
        let orig = x.clone();
        rms_norm(&mut x, &w, 1e-6);
        let ms: f64 = orig.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>() / 37.0;
        for i in 0..37 {
            let expect = f64::from(w[i]) * f64::from(orig[i]) / (ms + 1e-6).sqrt();
            assert!((f64::from(x[i]) - expect).abs() < 1e-6, "{i}");
        }
    }

    #[test]
    fn exp_matches_libm() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let ours = f64::from(exp(x));
            let exact = f64::from(x).exp();
            worst = worst.max((ours - exact).abs() / exact);
            x += 0.0137;
        }
        assert!(worst < 3e-7, "relative error {worst}");
        assert!(exp(-1000.0) < 1e-37 && exp(-1000.0) >= 0.0);
        assert!(exp(1000.0).is_finite() && exp(1000.0) > 1e38);
        assert_eq!(exp(0.0), 1.0);
    }

    #[test]
    fn clamped_swiglu_clamps_gate_above_and_up_both_ways() {
        // [gate | up] rows of width 2 * 3.
        let gu = [5.0f32, -5.0, 1.0, 4.0, -4.0, 0.5];
        let mut out = [0.0f32; 3];
        silu_mul_clamped(&gu, 3, 2.5, &mut out);
        let silu = |x: f32| x / (1.0 + (-x).exp());
        let expect = [silu(2.5) * 2.5, silu(-5.0) * -2.5, silu(1.0) * 0.5];
        for (o, e) in out.iter().zip(expect) {
            assert!((o - e).abs() < 1e-6, "{out:?} vs {expect:?}");
        }
        // A limit above every value is plain SwiGLU.
        let mut plain = [0.0f32; 3];
        silu_mul(&gu, 3, &mut plain);
        silu_mul_clamped(&gu, 3, 100.0, &mut out);
        assert_eq!(out, plain);
    }

    #[test]
    fn softmax_is_stable_and_normalised() {
        let mut x = vec![1000.0, 1001.0, 999.0];
        softmax(&mut x);
        assert!((x.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(x[1] > x[0] && x[0] > x[2]);
    }
}

//! Whole-vocabulary passes written so the compiler vectorises them: the maximum, the softmax
//! weights `exp((l - max) / T)` (a Cephes-style `expf`: range reduction by `ln 2` and a
//! degree-6 polynomial, relative error ≈ 2e-7, exact 0 below `-87`), their sum, and the
//! histogram of weights by their float bits that [`super::select`] cuts on. Sums are taken in
//! float64 so a draw depends on the weights, not on the order they were added in.
//!
//! The default x86-64 target is SSE2 (4 lanes); each pass is also compiled for AVX-512 and
//! chosen at run time (see [`multiversion`]). Both builds run the same IEEE operations in the
//! same order (Rust never contracts `a * b + c` into an FMA), so their results are bitwise
//! equal: a seed draws the same token on every CPU.

/// Defines `pub fn $name` whose body is compiled twice, for the portable target and with
/// AVX-512 enabled, and picks the AVX-512 build when the CPU has it.
macro_rules! multiversion {
    ($(#[$m:meta])* pub fn $name:ident$(<$g:ident: $b:path>)?($($arg:ident: $ty:ty),* $(,)?) -> $ret:ty $body:block) => {
        $(#[$m])*
        #[allow(unsafe_code)] // the dispatch to the `#[target_feature]` build
        pub fn $name$(<$g: $b>)?($($arg: $ty),*) -> $ret {
            #[inline(always)]
            fn body$(<$g: $b>)?($($arg: $ty),*) -> $ret $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx512dq,avx512bw")]
                fn wide$(<$g: $b>)?($($arg: $ty),*) -> $ret {
                    body($($arg),*)
                }
                if $crate::sampling::vector::wide_available() {
                    // SAFETY: the CPU has the features `wide` was compiled for.
                    return unsafe { wide($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}

pub(crate) use multiversion;

/// Whether this CPU runs the AVX-512 builds (the detection result is cached by `std`).
#[cfg(target_arch = "x86_64")]
#[inline]
pub(crate) fn wide_available() -> bool {
    is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512vl")
        && is_x86_feature_detected!("avx512dq")
        && is_x86_feature_detected!("avx512bw")
}

/// Lanes of the chunked loops (one AVX-512 register of f32, two AVX2 ones).
const LANES: usize = 16;

multiversion! {
/// The largest value (NaN-free input; `-inf` for an empty slice).
pub fn max(values: &[f32]) -> f32 {
    max_inline(values)
}
}

/// [`max`]'s body, for passes that take chunk maxima inside their own multiversioned build.
#[inline(always)]
pub(crate) fn max_inline(values: &[f32]) -> f32 {
    let mut m = [f32::NEG_INFINITY; LANES];
    let chunks = values.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for j in 0..LANES {
            m[j] = if c[j] > m[j] { c[j] } else { m[j] };
        }
    }
    let mut best = rest.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    for v in m {
        best = best.max(v);
    }
    best
}

/// `e^x` in float32 for `x <= 0` (the softmax range): 0 below -87.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const ROUND: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer
    let xc = if x < -87.0 { -87.0 } else { x };
    // Adding ROUND leaves round(xc · log2 e) in the low mantissa bits of `t`: n as an integer
    // by a bit cast, without a float-to-int conversion (which does not vectorise).
    let t = xc * LOG2E + ROUND;
    let n = t - ROUND;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    let scale = f32::from_bits((t.to_bits().wrapping_sub(ROUND.to_bits()).wrapping_add(127)) << 23);
    if x < -87.0 { 0.0 } else { y * scale }
}

multiversion! {
/// `Σ exp(v - max)` over `values`, in float64.
pub fn exp_sum(values: &[f32], max: f32) -> f64 {
    let mut total = 0.0f64;
    for c in values.chunks(1024) {
        let mut acc = [0.0f32; LANES];
        let chunks = c.chunks_exact(LANES);
        let rest = chunks.remainder();
        for ch in chunks {
            for j in 0..LANES {
                acc[j] += exp(ch[j] - max);
            }
        }
        let part: f32 = acc.iter().sum::<f32>() + rest.iter().map(|&v| exp(v - max)).sum::<f32>();
        total += f64::from(part);
    }
    total
}
}

/// Weight buckets: the top bits of a weight in `[0, 1]` (8 exponent + 6 mantissa bits, so 64
/// buckets per octave); a larger bucket holds larger weights. Bucket 0 holds zeros.
pub const BUCKET_SHIFT: u32 = 17;
/// Buckets needed for weights in `[0, 1]`.
pub const BUCKETS: usize = (0x3F80_0000u32 >> BUCKET_SHIFT) as usize + 1;

/// The bucket of weight `w` (`0 <= w <= 1`).
#[inline(always)]
pub fn bucket(w: f32) -> usize {
    (w.to_bits() >> BUCKET_SHIFT) as usize
}

/// Writes `out[i] = exp((logits[i] - max) * inv_t)`, or 0 where `logits[i] < floor`, and adds
/// each weight's count and mass to its bucket. Returns the total mass.
pub fn weights_and_histogram(
    logits: &[f32],
    max: f32,
    inv_t: f32,
    floor: f32,
    out: &mut [f32],
    count: &mut [u32],
    mass: &mut [f64],
) -> f64 {
    debug_assert_eq!(logits.len(), out.len());
    let total = floored_weights(logits, max, inv_t, floor, out);
    histogram(out, count, mass);
    total
}

multiversion! {
/// `out[i] = exp((logits[i] - max) * inv_t)`, or 0 where `logits[i] < floor`. Returns the
/// total mass, summed in float64 (a float32 sum is off by ~1e-7 of the total, enough to move
/// a draw).
pub fn floored_weights(logits: &[f32], max: f32, inv_t: f32, floor: f32, out: &mut [f32]) -> f64 {
    let mut acc = [0.0f64; LANES];
    let mut lc = logits.chunks_exact(LANES);
    let mut oc = out.chunks_exact_mut(LANES);
    for (l, o) in (&mut lc).zip(&mut oc) {
        for j in 0..LANES {
            let w = exp((l[j] - max) * inv_t);
            o[j] = if l[j] < floor { 0.0 } else { w };
        }
        for j in 0..LANES {
            acc[j] += f64::from(o[j]);
        }
    }
    let mut total: f64 = acc.iter().sum();
    for (o, &l) in oc.into_remainder().iter_mut().zip(lc.remainder()) {
        let w = exp((l - max) * inv_t);
        *o = if l < floor { 0.0 } else { w };
        total += f64::from(*o);
    }
    total
}
}

multiversion! {
/// `Σ weights[i]` over the entries that rank before entry `pivot` by `(logit desc, id asc)`:
/// lower ids with a logit `>=` the pivot's and higher ids with a logit `>` it.
pub fn mass_before(logits: &[f32], weights: &[f32], pivot: usize) -> f64 {
    let lp = logits[pivot];
    masked_sum::<true>(&logits[..pivot], &weights[..pivot], lp)
        + masked_sum::<false>(&logits[pivot + 1..], &weights[pivot + 1..], lp)
}
}

/// `Σ weights[i]` where `logits[i] > lp` (or `>=` with `TIE`), in float64 lanes. The weight
/// is masked by its bits, which keeps the loop free of branches (it vectorises).
#[inline(always)]
fn masked_sum<const TIE: bool>(logits: &[f32], weights: &[f32], lp: f32) -> f64 {
    let keep = |l: f32, w: f32| -> f32 {
        let k = if TIE { l >= lp } else { l > lp };
        f32::from_bits(w.to_bits() & (k as u32).wrapping_neg())
    };
    let mut acc = [0.0f64; LANES];
    let mut lc = logits.chunks_exact(LANES);
    let mut wc = weights.chunks_exact(LANES);
    for (l, w) in (&mut lc).zip(&mut wc) {
        let mut v = [0.0f32; LANES];
        for j in 0..LANES {
            v[j] = keep(l[j], w[j]);
        }
        for j in 0..LANES {
            acc[j] += f64::from(v[j]);
        }
    }
    let mut total: f64 = acc.iter().sum();
    for (&l, &w) in lc.remainder().iter().zip(wc.remainder()) {
        total += f64::from(keep(l, w));
    }
    total
}

/// Adds each weight's count and float64 mass to its bucket ([`bucket`]; `count` and `mass`
/// hold at least [`BUCKETS`] entries).
fn histogram(weights: &[f32], count: &mut [u32], mass: &mut [f64]) {
    let (count, mass) = (&mut count[..BUCKETS], &mut mass[..BUCKETS]);
    for &w in weights {
        let b = bucket(w).min(BUCKETS - 1);
        count[b] += 1;
        mass[b] += f64::from(w);
    }
}

multiversion! {
/// The index of the first entry where the running float64 sum of the kept weights exceeds
/// `target`, scanning in index order; `kept(i)` says whether entry `i` takes part. When rounding
/// left the target beyond the sum, the last kept entry of nonzero weight; `None` if there is none.
pub fn draw<F: Fn(usize) -> bool>(weights: &[f32], target: f64, kept: F) -> Option<usize> {
    const CHUNK: usize = 256;
    let mut acc = 0.0f64;
    let mut last = None;
    for (c, ws) in weights.chunks(CHUNK).enumerate() {
        let base = c * CHUNK;
        let mut part = 0.0f64;
        for (j, &w) in ws.iter().enumerate() {
            if kept(base + j) {
                part += f64::from(w);
            }
        }
        if acc + part <= target {
            acc += part;
            if part > 0.0 {
                last = (0..ws.len())
                    .rev()
                    .find(|&j| ws[j] > 0.0 && kept(base + j))
                    .map(|j| base + j);
            }
            continue;
        }
        for (j, &w) in ws.iter().enumerate() {
            if w > 0.0 && kept(base + j) {
                acc += f64::from(w);
                if acc > target {
                    return Some(base + j);
                }
                last = Some(base + j);
            }
        }
    }
    last
}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_std_where_softmax_uses_it() {
        let mut worst = 0.0f64;
        for i in 0..=200_000 {
            let x = -87.0 + 87.0 * i as f32 / 200_000.0;
            let want = f64::from(x).exp();
            let rel = (f64::from(exp(x)) - want).abs() / want;
            worst = worst.max(rel);
        }
        assert!(worst < 5e-7, "{worst}");
        assert_eq!(exp(-100.0), 0.0);
        assert_eq!(exp(0.0), 1.0);
    }

    #[test]
    fn max_and_buckets_are_monotone() {
        let v: Vec<f32> = (0..1001)
            .map(|i| ((i * 37) % 1001) as f32 * 0.01 - 3.0)
            .collect();
        assert_eq!(max(&v), 7.0);
        let mut last = 0;
        for i in 0..1000 {
            let b = bucket(exp(-(1000 - i) as f32 * 0.05));
            assert!(b >= last);
            last = b;
        }
        assert_eq!(bucket(1.0), BUCKETS - 1);
        assert_eq!(bucket(0.0), 0);
    }
}

//! Whole-vocabulary passes written so the compiler vectorises them: the maximum, the softmax
//! weights `exp((l - max) / T)` (a Cephes-style `expf`: range reduction by `ln 2` and a
//! degree-6 polynomial, relative error ≈ 2e-7, exact 0 below `-87`), their sum, and the
//! histogram of weights by their float bits that [`super::select`] cuts on. Sums are taken in
//! float64 so a draw depends on the weights, not on the order they were added in.

/// Lanes of the chunked loops (one AVX-512 register of f32, two AVX2 ones).
const LANES: usize = 16;

/// The largest value (NaN-free input; `-inf` for an empty slice).
pub fn max(values: &[f32]) -> f32 {
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
    for (lc, oc) in logits.chunks(LANES).zip(out.chunks_mut(LANES)) {
        if lc.len() == LANES {
            for j in 0..LANES {
                let w = exp((lc[j] - max) * inv_t);
                oc[j] = if lc[j] < floor { 0.0 } else { w };
            }
        } else {
            for (o, &l) in oc.iter_mut().zip(lc) {
                let w = exp((l - max) * inv_t);
                *o = if l < floor { 0.0 } else { w };
            }
        }
        for &w in oc.iter() {
            let b = bucket(w);
            count[b] += 1;
            mass[b] += f64::from(w);
        }
    }
    mass.iter().skip(1).sum()
}

/// Writes the weights only (no filter needs the histogram). Returns the total mass, summed in
/// float64 (a float32 sum is off by ~1e-7 of the total, enough to move a draw).
pub fn weights(logits: &[f32], max: f32, inv_t: f32, out: &mut [f32]) -> f64 {
    let mut acc = [0.0f64; LANES];
    let mut lc = logits.chunks_exact(LANES);
    let mut oc = out.chunks_exact_mut(LANES);
    for (l, o) in (&mut lc).zip(&mut oc) {
        for j in 0..LANES {
            o[j] = exp((l[j] - max) * inv_t);
        }
        for j in 0..LANES {
            acc[j] += f64::from(o[j]);
        }
    }
    let mut total: f64 = acc.iter().sum();
    for (o, &l) in oc.into_remainder().iter_mut().zip(lc.remainder()) {
        *o = exp((l - max) * inv_t);
        total += f64::from(*o);
    }
    total
}

/// The index of the first entry where the running float64 sum of the kept weights exceeds
/// `target`, scanning in index order; `kept(i)` says whether entry `i` takes part. When rounding
/// left the target beyond the sum, the last kept entry of nonzero weight; `None` if there is none.
pub fn draw(weights: &[f32], target: f64, kept: impl Fn(usize) -> bool) -> Option<usize> {
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

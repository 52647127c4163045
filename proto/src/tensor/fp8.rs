//! FP8 (e4m3fn) activations on the wire, as DeepSeek's DeepEP low-latency dispatch sends them:
//! each run of [`BLOCK`] values of a row shares one float32 scale (`amax / 448`), the values are
//! rounded to nearest even e4m3fn. A payload is the `rows × cols` e4m3 bytes followed by the
//! `rows × ceil(cols / BLOCK)` little-endian f32 scales; answers come back in bf16.
//! Reference: DeepEP `low_latency_dispatch` (`use_fp8`), e4m3fn as in the OCP FP8 spec.

use std::sync::OnceLock;

/// Values per scale.
pub const BLOCK: usize = 128;
/// Largest finite e4m3fn magnitude.
const MAX: f32 = 448.0;

/// Bytes of an FP8 payload for `rows × cols` values.
pub fn payload_len(rows: usize, cols: usize) -> usize {
    rows * cols + rows * cols.div_ceil(BLOCK) * 4
}

/// Nearest e4m3fn byte (ties to even) of `y`, saturating at ±448 (no infinities in e4m3fn).
/// Branch-free, so the encode loop vectorises (see `simd::encode_e4m3`).
#[inline(always)]
pub fn e4m3_bits(y: f32) -> u8 {
    let sign = (y.to_bits() >> 24) & 0x80;
    let a = y.abs().min(MAX);
    // Subnormals are multiples of 2^-9; 8 × 2^-9 is the smallest normal, byte 0x08 too.
    let sub = (a * 512.0).round_ties_even() as u32;
    let b = a.to_bits();
    let r = b.wrapping_add(0x7_FFFF + ((b >> 20) & 1));
    let exp = (r >> 23).wrapping_add(7).wrapping_sub(127);
    let normal = ((exp << 3) | ((r >> 20) & 7)).min(0x7E);
    let magnitude = if a < 2f32.powi(-6) { sub } else { normal };
    (sign | magnitude) as u8
}

/// The value of every e4m3fn byte (`S.1111.111` is NaN).
pub fn e4m3_table() -> &'static [f32; 256] {
    static TABLE: OnceLock<[f32; 256]> = OnceLock::new();
    TABLE.get_or_init(|| {
        std::array::from_fn(|i| {
            let byte = i as u8;
            let sign = if byte & 0x80 != 0 { -1.0f32 } else { 1.0 };
            let exp = i32::from((byte >> 3) & 0x0F);
            let mant = f32::from(byte & 0x07);
            if byte & 0x7F == 0x7F {
                return f32::NAN;
            }
            sign * if exp == 0 {
                mant / 8.0 * 2f32.powi(-6)
            } else {
                (1.0 + mant / 8.0) * 2f32.powi(exp - 7)
            }
        })
    })
}

/// Appends the FP8 payload of the rows `rows` of the row-major `data` (`cols` wide).
pub fn encode_rows(data: &[f32], cols: usize, rows: &[usize], out: &mut Vec<u8>) {
    let blocks = cols.div_ceil(BLOCK);
    let start = out.len();
    out.resize(start + payload_len(rows.len(), cols), 0);
    let (values, scales) = out[start..].split_at_mut(rows.len() * cols);
    for (r, &row) in rows.iter().enumerate() {
        let src = &data[row * cols..(row + 1) * cols];
        let dst = &mut values[r * cols..(r + 1) * cols];
        for (b, (s, d)) in src.chunks(BLOCK).zip(dst.chunks_mut(BLOCK)).enumerate() {
            // A non-finite amax gives a non-finite scale, which the receiver refuses.
            let amax = super::simd::amax(s);
            let scale = if amax == 0.0 { 1.0 } else { amax / MAX };
            super::simd::encode_e4m3(s, 1.0 / scale, d);
            let at = (r * blocks + b) * 4;
            scales[at..at + 4].copy_from_slice(&scale.to_le_bytes());
        }
    }
}

/// Decodes an FP8 payload of `rows × cols` (length checked by the caller) into `dst`; returns
/// the count of non-finite values (a non-finite scale makes its whole block non-finite).
pub fn decode(bytes: &[u8], rows: usize, cols: usize, dst: &mut [f32]) -> u32 {
    let table = e4m3_table();
    let blocks = cols.div_ceil(BLOCK);
    let (values, scales) = bytes.split_at(rows * cols);
    let mut bad = 0u32;
    for r in 0..rows {
        let src = &values[r * cols..(r + 1) * cols];
        let out = &mut dst[r * cols..(r + 1) * cols];
        for (b, (s, d)) in src.chunks(BLOCK).zip(out.chunks_mut(BLOCK)).enumerate() {
            let at = (r * blocks + b) * 4;
            let scale =
                f32::from_le_bytes([scales[at], scales[at + 1], scales[at + 2], scales[at + 3]]);
            for (d, &byte) in d.iter_mut().zip(s) {
                let v = table[byte as usize] * scale;
                bad += u32::from(!v.is_finite());
                *d = v;
            }
        }
    }
    bad
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The nearest table entry by brute force, ties to the even byte (even mantissa).
    fn reference(y: f32) -> u8 {
        let t = e4m3_table();
        let y = y.clamp(-MAX, MAX);
        let mut best = 0u8;
        for b in 0..=255u8 {
            let v = t[b as usize];
            if v.is_nan() || (v == 0.0 && v.is_sign_negative() != y.is_sign_negative()) {
                continue;
            }
            let (d, e) = ((v - y).abs(), (t[best as usize] - y).abs());
            if d < e || (d == e && b & 1 == 0) {
                best = b;
            }
        }
        best
    }

    #[test]
    fn rounding_matches_brute_force_nearest() {
        let mut state = 0x9E37_79B9u32;
        for i in 0..20_000 {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            // Spread over e4m3's whole range and past it (saturation), both signs.
            let y = (state as f32 / u32::MAX as f32 - 0.5) * 2.0 * 2f32.powi(i % 20 - 10);
            assert_eq!(e4m3_bits(y), reference(y), "{y:e}");
        }
        for b in 0..=255u8 {
            let v = e4m3_table()[b as usize];
            if !v.is_nan() {
                assert_eq!(e4m3_bits(v), b, "exact value {v} of byte {b:#x}");
            }
        }
        assert_eq!(e4m3_bits(1e9), 0x7E);
        assert_eq!(e4m3_bits(-1e9), 0xFE);
    }

    #[test]
    fn payload_round_trips_within_e4m3_precision() {
        let cols = 300; // two full blocks and a partial one
        let data: Vec<f32> = (0..4 * cols)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.013 * (1 + i / cols) as f32)
            .collect();
        let mut out = Vec::new();
        encode_rows(&data, cols, &[3, 1], &mut out);
        assert_eq!(out.len(), payload_len(2, cols));
        let mut back = vec![0.0f32; 2 * cols];
        assert_eq!(decode(&out, 2, cols, &mut back), 0);
        for (r, &row) in [3usize, 1].iter().enumerate() {
            for (b, block) in data[row * cols..(row + 1) * cols].chunks(BLOCK).enumerate() {
                let amax = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                for (j, &v) in block.iter().enumerate() {
                    let got = back[r * cols + b * BLOCK + j];
                    // 3 mantissa bits: half an ulp is 1/16 relative; subnormals 2^-10 × scale.
                    let tol = v.abs() / 16.0 + amax / MAX * 2f32.powi(-10);
                    assert!((got - v).abs() <= tol, "row {row} col {j}: {got} vs {v}");
                }
            }
        }
        let mut bad = out.clone();
        let at = 2 * cols; // first scale
        bad[at..at + 4].copy_from_slice(&f32::NAN.to_le_bytes());
        assert_eq!(decode(&bad, 2, cols, &mut back), BLOCK as u32);
    }
}

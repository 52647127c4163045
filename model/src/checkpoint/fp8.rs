//! FP8 (float8_e4m3fn) decoding and DeepSeek-V3 block dequantisation.
//!
//! The official checkpoints store each Linear weight as e4m3fn with a float32 `weight_scale_inv`
//! per `[block_rows, block_cols]` block (128×128; edge blocks may be partial):
//! `w[i, j] = fp8[i, j] * scale_inv[i / block_rows, j / block_cols]`.
//! The loader keeps FP8 weights as they are stored, one byte each, plus the block scales; the
//! GEMM kernel widens them in registers ([`e4m3_to_f16_bits`]: every e4m3fn value times 2^-8 is
//! exactly an IEEE half, so the hardware half → float conversion decodes it) and applies each
//! block's scale, so no precision is lost. Reference: DeepSeek-V3 `inference/kernel.py`.

use std::sync::OnceLock;

/// Decodes one e4m3fn byte (1 sign, 4 exponent bits with bias 7, 3 mantissa bits; no
/// infinities; `S.1111.111` is NaN).
pub fn e4m3_to_f32(byte: u8) -> f32 {
    let sign = if byte & 0x80 != 0 { -1.0f32 } else { 1.0 };
    let exp = i32::from((byte >> 3) & 0x0F);
    let mant = f32::from(byte & 0x07);
    if exp == 0x0F && byte & 0x07 == 0x07 {
        return f32::NAN;
    }
    let magnitude = if exp == 0 {
        mant / 8.0 * 2f32.powi(-6)
    } else {
        (1.0 + mant / 8.0) * 2f32.powi(exp - 7)
    };
    sign * magnitude
}

/// The 256-entry decoding table.
pub fn e4m3_table() -> &'static [f32; 256] {
    static TABLE: OnceLock<[f32; 256]> = OnceLock::new();
    TABLE.get_or_init(|| std::array::from_fn(|i| e4m3_to_f32(i as u8)))
}

/// Number of scale blocks along a dimension of `len` with blocks of `block`.
pub fn blocks(len: usize, block: usize) -> usize {
    len.div_ceil(block)
}

/// Dequantises a `[rows, cols]` e4m3fn matrix with its `[ceil(rows/br), ceil(cols/bc)]` scales
/// into float32.
pub fn dequantize_block_fp8(
    data: &[u8],
    rows: usize,
    cols: usize,
    scales: &[f32],
    block: [usize; 2],
) -> Vec<f32> {
    let table = e4m3_table();
    let grid_cols = blocks(cols, block[1]);
    debug_assert_eq!(data.len(), rows * cols);
    debug_assert_eq!(scales.len(), blocks(rows, block[0]) * grid_cols);
    let mut out = Vec::with_capacity(rows * cols);
    for (i, row) in data.chunks_exact(cols).enumerate() {
        let srow = &scales[(i / block[0]) * grid_cols..][..grid_cols];
        out.extend(
            row.iter()
                .enumerate()
                .map(|(j, &b)| table[b as usize] * srow[j / block[1]]),
        );
    }
    out
}

/// Whether an e4m3fn byte is NaN (`S.1111.111`; the format has no infinities).
#[inline]
pub fn is_nan(byte: u8) -> bool {
    byte & 0x7F == 0x7F
}

/// The IEEE half whose value is `e4m3(byte) · 2^-8`, for every non-NaN byte: the 4 exponent and
/// 3 mantissa bits move up into the half's 5 exponent and 10 mantissa bits (bias 7 → 15 is the
/// 2^-8), subnormals onto subnormals, the sign onto the sign. Two shifts and two masks, which is
/// what the AVX-512 kernel does on 32 lanes at once.
#[inline(always)]
pub fn e4m3_to_f16_bits(byte: u8) -> u16 {
    let b = u16::from(byte);
    ((b << 7) & 0x3F80) | ((b << 8) & 0x8000)
}

/// The power of two that [`e4m3_to_f16_bits`] divides by; kernels fold it into the block scales.
pub const F16_SHIFT_SCALE: f32 = 256.0;

/// The e4m3fn byte nearest `x` (ties to the smaller magnitude; beyond 448 saturates).
pub fn nearest_e4m3(x: f32) -> u8 {
    let table = e4m3_table();
    let mag = x.abs();
    // Bytes 0..=0x7E are the non-negative finite values in increasing order.
    let hi = table[..0x7F].partition_point(|&v| v < mag).min(0x7E);
    let best = if hi > 0 && mag - table[hi - 1] <= table[hi] - mag {
        hi - 1
    } else {
        hi
    } as u8;
    if x.is_sign_negative() && best != 0 {
        best | 0x80
    } else {
        best
    }
}

/// Quantises `w[rows, cols]` to e4m3fn with one E8M0 scale byte per `block` (edge blocks
/// partial): the smallest power of two that brings the block's largest magnitude within 448,
/// then each value to its nearest e4m3. Returns the bytes and the
/// `[ceil(rows/block[0]), ceil(cols/block[1])]` scale bytes. For test checkpoints and
/// `gen-model --quantize`.
pub fn quantize_block(
    w: &[f32],
    rows: usize,
    cols: usize,
    block: [usize; 2],
) -> (Vec<u8>, Vec<u8>) {
    assert_eq!(w.len(), rows * cols, "FP8 weight size");
    let grid = [blocks(rows, block[0]), blocks(cols, block[1])];
    let mut scales = vec![127u8; grid[0] * grid[1]];
    let mut values = vec![0u8; rows * cols];
    for bi in 0..grid[0] {
        for bj in 0..grid[1] {
            let (r0, r1) = (bi * block[0], ((bi + 1) * block[0]).min(rows));
            let (c0, c1) = (bj * block[1], ((bj + 1) * block[1]).min(cols));
            let amax = (r0..r1)
                .flat_map(|i| w[i * cols + c0..i * cols + c1].iter())
                .fold(0.0f32, |m, v| m.max(v.abs()));
            let b = if amax > 0.0 {
                super::fp4::e8m0_at_least(amax / 448.0)
            } else {
                127
            };
            scales[bi * grid[1] + bj] = b;
            let s = super::fp4::e8m0_to_f32(b).expect("finite scale");
            for i in r0..r1 {
                for j in c0..c1 {
                    values[i * cols + j] = nearest_e4m3(w[i * cols + j] / s);
                }
            }
        }
    }
    (values, scales)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_known_values() {
        assert_eq!(e4m3_to_f32(0x00), 0.0);
        assert_eq!(e4m3_to_f32(0x38), 1.0); // exp 7, mant 0
        assert_eq!(e4m3_to_f32(0xB8), -1.0);
        assert_eq!(e4m3_to_f32(0x7E), 448.0); // the largest finite value
        assert_eq!(e4m3_to_f32(0x01), 2f32.powi(-9)); // the smallest subnormal
        assert_eq!(e4m3_to_f32(0x08), 2f32.powi(-6)); // the smallest normal
        assert_eq!(e4m3_to_f32(0x3C), 1.5);
        assert!(e4m3_to_f32(0x7F).is_nan());
        assert!(e4m3_to_f32(0xFF).is_nan());
    }

    #[test]
    fn every_value_widens_exactly_through_a_half() {
        let mut finite = 0;
        for b in 0..=255u8 {
            let v = e4m3_to_f32(b);
            assert_eq!(is_nan(b), v.is_nan(), "byte {b:#x}");
            if v.is_nan() {
                continue;
            }
            finite += 1;
            let h = half::f16::from_bits(e4m3_to_f16_bits(b)).to_f32();
            assert_eq!(h * F16_SHIFT_SCALE, v, "byte {b:#x}");
            assert_eq!(h.to_bits() >> 31, u32::from(b >> 7), "sign of {b:#x}");
        }
        assert_eq!(finite, 254);
    }

    #[test]
    fn block_dequantisation_with_partial_edge_blocks() {
        // A 5×7 matrix with 2×3 blocks: a 3×3 scale grid whose last row and column are partial.
        let (rows, cols, block) = (5, 7, [2, 3]);
        let data: Vec<u8> = (0..rows * cols)
            .map(|i| [0x38u8, 0x40, 0xB8, 0x3C][i % 4])
            .collect();
        let scales: Vec<f32> = (0..9).map(|i| 0.5 + i as f32).collect();
        let out = dequantize_block_fp8(&data, rows, cols, &scales, block);
        for i in 0..rows {
            for j in 0..cols {
                let expect = e4m3_to_f32(data[i * cols + j]) * scales[(i / 2) * 3 + j / 3];
                assert_eq!(out[i * cols + j], expect, "({i}, {j})");
            }
        }
        // By hand: element (4, 6) is byte 34 % 4 = 2 → 0xB8 = -1.0, in the last (partial)
        // block, scale index 2 * 3 + 2 = 8 → 8.5.
        assert_eq!(out[4 * 7 + 6], -8.5);
        // Element (1, 4): byte 11 % 4 = 3 → 0x3C = 1.5, scale index 0 * 3 + 1 = 1 → 1.5.
        assert_eq!(out[7 + 4], 2.25);
    }

    #[test]
    fn quantisation_rounds_to_the_nearest_value() {
        for b in 0..=0xFEu8 {
            if is_nan(b) {
                continue;
            }
            let v = e4m3_to_f32(b);
            let back = nearest_e4m3(v);
            assert_eq!(e4m3_to_f32(back), v, "byte {b:#x}");
        }
        assert_eq!(nearest_e4m3(1.0625), 0x38); // halfway between 1 and 1.125: the smaller
        assert_eq!(nearest_e4m3(1.07), 0x39);
        assert_eq!(nearest_e4m3(-1000.0), 0xFE);
        let w: Vec<f32> = (0..5 * 7).map(|i| (i as f32 * 0.7).sin() * 100.0).collect();
        let (values, bytes) = quantize_block(&w, 5, 7, [2, 3]);
        let scales: Vec<f32> = bytes
            .iter()
            .map(|&b| super::super::fp4::e8m0_to_f32(b).expect("scale"))
            .collect();
        let back = dequantize_block_fp8(&values, 5, 7, &scales, [2, 3]);
        for (a, b) in w.iter().zip(&back) {
            assert!((a - b).abs() <= a.abs() / 16.0 + 1e-3, "{a} vs {b}");
        }
    }
}

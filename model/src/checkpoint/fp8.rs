//! FP8 (float8_e4m3fn) decoding and DeepSeek-V3 block dequantisation.
//!
//! The official checkpoints store each Linear weight as e4m3fn with a float32 `weight_scale_inv`
//! per `[block_rows, block_cols]` block (128×128; edge blocks may be partial):
//! `w[i, j] = fp8[i, j] * scale_inv[i / block_rows, j / block_cols]`.
//! Every e4m3fn value is exactly representable in bf16 (3 mantissa bits, exponents 2^-9..2^8),
//! which is how the loader keeps FP8 weights: exact bf16 values plus the block scales, applied by
//! the GEMM kernel per block, so no precision is lost. Reference: DeepSeek-V3 `inference/kernel.py`.

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

/// Converts e4m3fn bytes to bf16 bit patterns (exact: every finite e4m3 value is a bf16 value).
pub fn e4m3_to_bf16_bits(data: &[u8]) -> Vec<u16> {
    let table = e4m3_table();
    data.iter()
        .map(|&b| half::bf16::from_f32(table[b as usize]).to_bits())
        .collect()
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
    fn every_finite_value_is_exact_in_bf16() {
        for b in 0..=255u8 {
            let v = e4m3_to_f32(b);
            if v.is_finite() {
                assert_eq!(half::bf16::from_f32(v).to_f32(), v, "byte {b:#x}");
            }
        }
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
}

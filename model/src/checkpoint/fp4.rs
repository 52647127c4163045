//! FP4 (e2m1) weights with per-32-column scales, as DeepSeek-V4 ships its routed experts, and
//! E8M0 scale bytes.
//!
//! A `[rows, cols]` FP4 weight is stored int8-packed as `[rows, cols / 2]`: byte `b` of a row holds
//! column `2b` in its low nibble and column `2b + 1` in its high nibble. A nibble is 1 sign bit
//! (bit 3) and a 3-bit magnitude index into `[0, 0.5, 1, 1.5, 2, 3, 4, 6]`. Its scales are
//! `[rows, cols / 32]`: `w[i, j] = e2m1(i, j) · scale[i, j / 32]`. Scales come as E8M0 bytes
//! (`scale_fmt: "ue8m0"`: byte `b` is `2^(b − 127)`, 255 is NaN) or as float32. The engine keeps
//! the nibbles packed (half a byte per weight) and widens them in the GEMM kernels
//! ([`crate::kernels::Linear`]). Reference: `V4.md` → "FP8 / FP4".

/// Columns per FP4 scale.
pub const GROUP: usize = 32;

/// The values of the 16 nibbles (the sign is bit 3).
pub const E2M1: [f32; 16] = [
    0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
];

/// The scale an E8M0 byte encodes (`2^(b − 127)`, exactly; `None` for the NaN byte 255).
pub fn e8m0_to_f32(b: u8) -> Option<f32> {
    match b {
        255 => None,
        // 2^-127 is a float32 subnormal: the mantissa's top bit.
        0 => Some(f32::from_bits(1 << 22)),
        b => Some(f32::from_bits(u32::from(b) << 23)),
    }
}

/// The E8M0 byte of the smallest power of two ≥ `x` (`x` finite and > 0), clamped to the format.
pub fn e8m0_at_least(x: f32) -> u8 {
    let mut b = 0u8;
    while b < 254 && e8m0_to_f32(b).is_some_and(|s| s < x) {
        b += 1;
    }
    b
}

/// Column `j` of an FP4 row `row` (packed `cols / 2` bytes).
#[inline]
pub fn nibble(row: &[u8], j: usize) -> u8 {
    (row[j / 2] >> (4 * (j % 2))) & 0x0F
}

/// Dequantises packed `values` (`[rows, cols / 2]`) with their `[rows, cols / 32]` scales.
pub fn dequantize(values: &[u8], rows: usize, cols: usize, scales: &[f32]) -> Vec<f32> {
    debug_assert_eq!(values.len(), rows * cols / 2);
    debug_assert_eq!(scales.len(), rows * cols / GROUP);
    let mut out = Vec::with_capacity(rows * cols);
    for i in 0..rows {
        let row = &values[i * cols / 2..][..cols / 2];
        let srow = &scales[i * cols / GROUP..][..cols / GROUP];
        out.extend((0..cols).map(|j| E2M1[nibble(row, j) as usize] * srow[j / GROUP]));
    }
    out
}

/// Quantises `w[rows, cols]` (`cols` a multiple of 32) to packed e2m1 with one E8M0 scale per
/// row and 32 columns: the smallest power of two that brings the group's largest magnitude
/// within 6, then each value to its nearest e2m1 (ties to the smaller magnitude). For test
/// checkpoints and `gen-model --quantize`; the weights' precision is what FP4 gives.
pub fn quantize(w: &[f32], rows: usize, cols: usize) -> (Vec<u8>, Vec<u8>) {
    assert!(
        cols.is_multiple_of(GROUP),
        "FP4 columns must be a multiple of {GROUP}"
    );
    assert_eq!(w.len(), rows * cols, "FP4 weight size");
    let mut values = vec![0u8; rows * cols / 2];
    let mut scales = Vec::with_capacity(rows * cols / GROUP);
    for (g, group) in w.chunks_exact(GROUP).enumerate() {
        let amax = group.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let b = if amax > 0.0 {
            e8m0_at_least(amax / 6.0)
        } else {
            127
        };
        let s = e8m0_to_f32(b).expect("finite scale");
        scales.push(b);
        for (t, &v) in group.iter().enumerate() {
            let q = nearest(v / s);
            let j = g * GROUP + t;
            values[j / 2] |= q << (4 * (j % 2));
        }
    }
    (values, scales)
}

/// The nibble of the e2m1 value nearest `x`.
fn nearest(x: f32) -> u8 {
    let mag = x.abs();
    let mut best = 0usize;
    for (i, v) in E2M1.iter().enumerate().take(8) {
        if (v - mag).abs() < (E2M1[best] - mag).abs() {
            best = i;
        }
    }
    best as u8
        | if x.is_sign_negative() && best != 0 {
            8
        } else {
            0
        }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e8m0_bytes_are_exact_powers_of_two() {
        assert_eq!(e8m0_to_f32(127), Some(1.0));
        assert_eq!(e8m0_to_f32(128), Some(2.0));
        assert_eq!(e8m0_to_f32(120), Some(2f32.powi(-7)));
        assert_eq!(e8m0_to_f32(254), Some(2f32.powi(127)));
        assert_eq!(e8m0_to_f32(1), Some(2f32.powi(-126)));
        assert_eq!(e8m0_to_f32(0), Some(2f32.powi(-127)));
        assert_eq!(e8m0_to_f32(255), None);
        assert_eq!(e8m0_at_least(1.0), 127);
        assert_eq!(e8m0_at_least(1.5), 128);
        assert_eq!(e8m0_at_least(0.25), 125);
    }

    #[test]
    fn low_nibble_is_the_even_column() {
        // Row [1.0, -6.0, 0.5, 0, ...] at scale 2: bytes 0x?? with column 0 low.
        let mut row = vec![0.0f32; 32];
        row[0] = 2.0; // 1.0 · 2 → nibble 2
        row[1] = -12.0; // -6 · 2 → nibble 15
        row[2] = 1.0; // 0.5 · 2 → nibble 1
        let (values, scales) = quantize(&row, 1, 32);
        assert_eq!(scales, vec![128]);
        assert_eq!(values[0], 0xF2);
        assert_eq!(values[1], 0x01);
        let back = dequantize(&values, 1, 32, &[2.0]);
        assert_eq!(&back[..4], &[2.0, -12.0, 1.0, 0.0]);
    }

    #[test]
    fn quantisation_picks_the_nearest_value() {
        let w: Vec<f32> = (0..64).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
        let (values, bytes) = quantize(&w, 2, 32);
        let scales: Vec<f32> = bytes
            .iter()
            .map(|&b| e8m0_to_f32(b).expect("scale"))
            .collect();
        let back = dequantize(&values, 2, 32, &scales);
        for (i, (a, b)) in w.iter().zip(&back).enumerate() {
            let s = scales[i / 32];
            // The grid spacing is at most 2 · s (between 4 and 6).
            assert!((a - b).abs() <= s, "{i}: {a} vs {b} at scale {s}");
        }
    }
}

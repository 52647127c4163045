//! Tensor payloads: float32 activations to and from little-endian bf16, f32 or block-scaled FP8
//! bytes, vectorised (see `simd`), with the finiteness check folded into the decode pass and the
//! router's gather of token rows fused into the encode.

pub mod fp8;
mod simd;

use bytes::Bytes;

use crate::pb::Dtype;

/// Bytes per element of `dtype` for the element-wise dtypes (0 for unspecified; FP8 payloads
/// also carry scales: use [`payload_len`]).
pub fn dtype_size(dtype: Dtype) -> usize {
    match dtype {
        Dtype::Bf16 => 2,
        Dtype::F32 => 4,
        Dtype::Fp8E4m3 => 1,
        Dtype::Unspecified => 0,
    }
}

/// Bytes of a `rows × cols` payload in `dtype`.
pub fn payload_len(dtype: Dtype, rows: usize, cols: usize) -> usize {
    match dtype {
        Dtype::Fp8E4m3 => fp8::payload_len(rows, cols),
        d => rows * cols * dtype_size(d),
    }
}

/// The dtype a node answers in for a request in `dtype`: FP8 dispatches combine in bf16 (the
/// partial sums need more range per value than one scale per block gives).
pub fn answer_dtype(dtype: Dtype) -> Dtype {
    match dtype {
        Dtype::Fp8E4m3 => Dtype::Bf16,
        d => d,
    }
}

/// `Bytes` over a vector of plain values, without copying them.
struct Owned<T: bytemuck::Pod>(Vec<T>);

impl<T: bytemuck::Pod> AsRef<[u8]> for Owned<T> {
    fn as_ref(&self) -> &[u8] {
        bytemuck::cast_slice(&self.0)
    }
}

/// Encodes `values` as `dtype` (bf16 rounds to nearest even). FP8 takes [`encode_rows`], which
/// knows the row width; here it is treated as one row.
pub fn encode(values: &[f32], dtype: Dtype) -> Bytes {
    encode_rows(
        values,
        values.len(),
        0..usize::from(!values.is_empty()),
        dtype,
    )
}

/// Encodes an owned vector, without a copy for f32 on little-endian machines.
pub fn encode_vec(values: Vec<f32>, cols: usize, dtype: Dtype) -> Bytes {
    match dtype {
        Dtype::F32 if cfg!(target_endian = "little") => Bytes::from_owner(Owned(values)),
        _ => {
            let rows = values.len().checked_div(cols).unwrap_or(0);
            encode_rows(&values, cols, 0..rows, dtype)
        }
    }
}

/// Gathers the rows `rows` of the row-major `data` (`cols` wide) and encodes them as `dtype`,
/// in one pass into one buffer.
pub fn encode_rows(
    data: &[f32],
    cols: usize,
    rows: impl ExactSizeIterator<Item = usize> + Clone,
    dtype: Dtype,
) -> Bytes {
    let n = rows.len();
    match dtype {
        Dtype::F32 => {
            let mut out: Vec<f32> = Vec::with_capacity(n * cols);
            for r in rows {
                out.extend_from_slice(&data[r * cols..(r + 1) * cols]);
            }
            if cfg!(target_endian = "big") {
                for v in &mut out {
                    *v = f32::from_bits(v.to_bits().to_le());
                }
            }
            Bytes::from_owner(Owned(out))
        }
        Dtype::Bf16 => {
            let mut out = vec![0u16; n * cols];
            for (dst, r) in out.chunks_exact_mut(cols.max(1)).zip(rows) {
                simd::encode_bf16(&data[r * cols..(r + 1) * cols], dst);
            }
            Bytes::from_owner(Owned(out))
        }
        Dtype::Fp8E4m3 => {
            let idx: Vec<usize> = rows.collect();
            let mut out = Vec::new();
            fp8::encode_rows(data, cols, &idx, &mut out);
            Bytes::from(out)
        }
        Dtype::Unspecified => Bytes::new(),
    }
}

/// A value that is not a finite number, at this element index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NonFinite(pub usize);

fn first_non_finite(values: &[f32]) -> NonFinite {
    NonFinite(values.iter().position(|v| !v.is_finite()).unwrap_or(0))
}

/// Decodes a `rows × cols` `dtype` payload (length checked by the caller) into float32, checking
/// in the same pass that every value is finite.
pub fn decode_finite(
    bytes: &[u8],
    rows: usize,
    cols: usize,
    dtype: Dtype,
) -> Result<Vec<f32>, NonFinite> {
    let mut out = vec![0.0f32; rows * cols];
    let bad = match dtype {
        Dtype::F32 => simd::decode_f32(bytes, &mut out),
        Dtype::Bf16 => simd::decode_bf16(bytes, &mut out),
        Dtype::Fp8E4m3 => fp8::decode(bytes, rows, cols, &mut out),
        Dtype::Unspecified => 0,
    };
    if bad > 0 {
        return Err(first_non_finite(&out));
    }
    Ok(out)
}

/// Decodes a bf16 or f32 buffer into float32 (the caller has checked the length; FP8 needs the
/// row width: use [`decode_finite`]).
pub fn decode(bytes: &[u8], dtype: Dtype) -> Vec<f32> {
    let n = bytes.len().checked_div(dtype_size(dtype)).unwrap_or(0);
    let mut out = vec![0.0f32; n];
    match dtype {
        Dtype::F32 => simd::decode_f32(bytes, &mut out),
        Dtype::Bf16 => simd::decode_bf16(bytes, &mut out),
        Dtype::Fp8E4m3 | Dtype::Unspecified => return Vec::new(),
    };
    out
}

/// Adds a decoded bf16 or f32 buffer into `acc` without allocating; `Err` (with `acc` already
/// changed) when a value was not finite.
pub fn accumulate(acc: &mut [f32], bytes: &[u8], dtype: Dtype) -> Result<(), NonFinite> {
    let bad = match dtype {
        Dtype::F32 => simd::accumulate_f32(acc, bytes),
        Dtype::Bf16 => simd::accumulate_bf16(acc, bytes),
        Dtype::Fp8E4m3 | Dtype::Unspecified => 0,
    };
    if bad > 0 {
        return Err(first_non_finite(acc));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let v = vec![1.0f32, -2.5, 3.140625, 1e-3];
        assert_eq!(decode(&encode(&v, Dtype::F32), Dtype::F32), v);
        let b = decode(&encode(&v, Dtype::Bf16), Dtype::Bf16);
        assert_eq!(b[..3], v[..3]); // exactly representable in bf16
        assert!((b[3] - 1e-3).abs() < 1e-5);
        let mut acc = vec![1.0f32; 4];
        accumulate(&mut acc, &encode(&v, Dtype::F32), Dtype::F32).expect("finite");
        assert_eq!(acc, vec![2.0, -1.5, 4.140625, 1.001]);
    }

    /// The vectorised paths against the scalar reference (`half`, byte by byte) on odd lengths.
    #[test]
    fn matches_scalar_reference() {
        let cols = 7168 + 3;
        let data: Vec<f32> = (0..5 * cols)
            .map(|i| ((i * 7919 % 10007) as f32 - 5000.0) * 1.37e-3)
            .collect();
        let rows = [4usize, 0, 2];
        for dtype in [Dtype::Bf16, Dtype::F32] {
            let fused = encode_rows(&data, cols, rows.iter().copied(), dtype);
            let mut scalar = Vec::new();
            for &r in &rows {
                for &v in &data[r * cols..(r + 1) * cols] {
                    match dtype {
                        Dtype::F32 => scalar.extend_from_slice(&v.to_le_bytes()),
                        _ => scalar
                            .extend_from_slice(&half::bf16::from_f32(v).to_bits().to_le_bytes()),
                    }
                }
            }
            assert_eq!(&fused[..], &scalar[..], "{dtype:?}");
            assert_eq!(fused.len(), payload_len(dtype, 3, cols));
            let back = decode_finite(&fused, 3, cols, dtype).expect("finite");
            let want: Vec<f32> = scalar
                .chunks_exact(dtype_size(dtype))
                .map(|b| match dtype {
                    Dtype::F32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
                    _ => half::bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32(),
                })
                .collect();
            assert_eq!(back, want);
            let owned = encode_vec(data[..2 * cols].to_vec(), cols, dtype);
            assert_eq!(
                &owned[..],
                &encode_rows(&data, cols, 0..2, dtype)[..],
                "{dtype:?}"
            );
        }
    }

    #[test]
    fn non_finite_values_are_found_in_the_decode_pass() {
        for dtype in [Dtype::Bf16, Dtype::F32] {
            for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                let mut v = vec![0.5f32; 1000];
                v[777] = bad;
                let bytes = encode(&v, dtype);
                assert_eq!(decode_finite(&bytes, 1, 1000, dtype), Err(NonFinite(777)));
                let mut acc = vec![0.0f32; 1000];
                assert_eq!(accumulate(&mut acc, &bytes, dtype), Err(NonFinite(777)));
            }
            let mut big = vec![0.25f32; 10_000];
            big[9_001] = f32::NAN;
            let mut acc = vec![0.0f32; 10_000];
            assert_eq!(
                accumulate(&mut acc, &encode(&big, dtype), dtype),
                Err(NonFinite(9_001))
            );
        }
    }
}

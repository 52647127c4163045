//! Tensor payloads: float32 activations to and from little-endian bf16 or f32 bytes.

use bytes::Bytes;

use crate::pb::Dtype;

/// Bytes per element of `dtype` (0 for unspecified).
pub fn dtype_size(dtype: Dtype) -> usize {
    match dtype {
        Dtype::Bf16 => 2,
        Dtype::F32 => 4,
        Dtype::Unspecified => 0,
    }
}

/// Encodes `values` as `dtype` (bf16 rounds to nearest even).
pub fn encode(values: &[f32], dtype: Dtype) -> Bytes {
    match dtype {
        Dtype::F32 => {
            let mut out = Vec::with_capacity(values.len() * 4);
            for v in values {
                out.extend_from_slice(&v.to_le_bytes());
            }
            Bytes::from(out)
        }
        Dtype::Bf16 => {
            let mut out = Vec::with_capacity(values.len() * 2);
            for v in values {
                out.extend_from_slice(&half::bf16::from_f32(*v).to_bits().to_le_bytes());
            }
            Bytes::from(out)
        }
        Dtype::Unspecified => Bytes::new(),
    }
}

/// Decodes a `dtype` buffer into float32 (the caller has checked the length).
pub fn decode(bytes: &[u8], dtype: Dtype) -> Vec<f32> {
    match dtype {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::Bf16 => bytes
            .chunks_exact(2)
            .map(|b| f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16))
            .collect(),
        Dtype::Unspecified => Vec::new(),
    }
}

/// Adds `scale ×` a decoded buffer into `acc` without allocating.
pub fn accumulate(acc: &mut [f32], bytes: &[u8], dtype: Dtype) {
    match dtype {
        Dtype::F32 => {
            for (a, b) in acc.iter_mut().zip(bytes.chunks_exact(4)) {
                *a += f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        Dtype::Bf16 => {
            for (a, b) in acc.iter_mut().zip(bytes.chunks_exact(2)) {
                *a += f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16);
            }
        }
        Dtype::Unspecified => {}
    }
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
        accumulate(&mut acc, &encode(&v, Dtype::F32), Dtype::F32);
        assert_eq!(acc, vec![2.0, -1.5, 4.140625, 1.001]);
    }
}

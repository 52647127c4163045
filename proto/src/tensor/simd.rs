//! The payload loops, compiled once for the machine's widest vector unit and once portably,
//! chosen at run time (the pattern of `moe-model`'s kernels, without hand-written intrinsics:
//! each loop is plain Rust that the compiler vectorises under the enabled target features).
//!
//! Every loop body is `#[inline(always)]` so that it is compiled inside the `target_feature`
//! wrapper that calls it; the wrappers are the only `unsafe` here (calling a function compiled
//! for features the CPU may lack), guarded by `is_x86_feature_detected!`.
#![allow(unsafe_code)]

/// float32 → bf16 bits, round to nearest even; NaN stays NaN (quiet bit set), as `half` does.
#[inline(always)]
pub fn bf16_bits(v: f32) -> u16 {
    let b = v.to_bits();
    let rounded = (b.wrapping_add(0x7FFF + ((b >> 16) & 1)) >> 16) as u16;
    let nan = ((b >> 16) as u16) | 0x0040;
    if b & 0x7FFF_FFFF > 0x7F80_0000 {
        nan
    } else {
        rounded
    }
}

#[inline(always)]
fn bf16_value(bits: u16) -> f32 {
    f32::from_bits(u32::from(bits) << 16)
}

/// 1 when `bits` (of an f32) is not finite.
#[inline(always)]
fn non_finite(bits: u32) -> u32 {
    u32::from(bits & 0x7F80_0000 == 0x7F80_0000)
}

#[inline(always)]
fn encode_bf16_body(src: &[f32], dst: &mut [u16]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = bf16_bits(*s).to_le();
    }
}

/// Little-endian bf16 bytes → f32; returns how many values were not finite.
#[inline(always)]
fn decode_bf16_body(src: &[u8], dst: &mut [f32]) -> u32 {
    let mut bad = 0u32;
    for (d, s) in dst.iter_mut().zip(src.chunks_exact(2)) {
        let v = bf16_value(u16::from_le_bytes([s[0], s[1]]));
        bad += non_finite(v.to_bits());
        *d = v;
    }
    bad
}

#[inline(always)]
fn decode_f32_body(src: &[u8], dst: &mut [f32]) -> u32 {
    let mut bad = 0u32;
    for (d, s) in dst.iter_mut().zip(src.chunks_exact(4)) {
        let bits = u32::from_le_bytes([s[0], s[1], s[2], s[3]]);
        bad += non_finite(bits);
        *d = f32::from_bits(bits);
    }
    bad
}

#[inline(always)]
fn accumulate_bf16_body(acc: &mut [f32], src: &[u8]) -> u32 {
    let mut bad = 0u32;
    for (a, s) in acc.iter_mut().zip(src.chunks_exact(2)) {
        let v = bf16_value(u16::from_le_bytes([s[0], s[1]]));
        bad += non_finite(v.to_bits());
        *a += v;
    }
    bad
}

#[inline(always)]
fn accumulate_f32_body(acc: &mut [f32], src: &[u8]) -> u32 {
    let mut bad = 0u32;
    for (a, s) in acc.iter_mut().zip(src.chunks_exact(4)) {
        let bits = u32::from_le_bytes([s[0], s[1], s[2], s[3]]);
        bad += non_finite(bits);
        *a += f32::from_bits(bits);
    }
    bad
}

/// Largest |value| by the integer order of the magnitude bits (the float order for every
/// non-NaN value; a NaN counts as larger than infinity, so it shows as a non-finite result).
#[inline(always)]
fn amax_body(src: &[f32]) -> f32 {
    f32::from_bits(
        src.iter()
            .fold(0u32, |m, v| m.max(v.to_bits() & 0x7FFF_FFFF)),
    )
}

#[inline(always)]
fn encode_e4m3_body(src: &[f32], inv: f32, dst: &mut [u8]) {
    for (d, v) in dst.iter_mut().zip(src) {
        *d = super::fp8::e4m3_bits(v * inv);
    }
}

/// Defines `pub fn $name(args) -> ret` that runs `$body` compiled for AVX-512 or AVX2 when the
/// CPU has them, else the portable build of the same body.
macro_rules! dispatched {
    ($(#[$m:meta])* $name:ident($($a:ident: $t:ty),*) -> $r:ty = $body:ident) => {
        $(#[$m])*
        pub fn $name($($a: $t),*) -> $r {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx2,fma")]
                unsafe fn wide($($a: $t),*) -> $r {
                    $body($($a),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($a: $t),*) -> $r {
                    $body($($a),*)
                }
                if std::is_x86_feature_detected!("avx512f")
                    && std::is_x86_feature_detected!("avx512bw")
                {
                    // SAFETY: the CPU has every feature `wide` is compiled for.
                    return unsafe { wide($($a),*) };
                }
                if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU has every feature `avx2` is compiled for.
                    return unsafe { avx2($($a),*) };
                }
            }
            $body($($a),*)
        }
    };
}

dispatched!(
    /// `dst[i] = bf16(src[i])` as little-endian bits.
    encode_bf16(src: &[f32], dst: &mut [u16]) -> () = encode_bf16_body
);
dispatched!(
    /// Decodes little-endian bf16; returns the count of non-finite values.
    decode_bf16(src: &[u8], dst: &mut [f32]) -> u32 = decode_bf16_body
);
dispatched!(
    /// Decodes little-endian f32; returns the count of non-finite values.
    decode_f32(src: &[u8], dst: &mut [f32]) -> u32 = decode_f32_body
);
dispatched!(
    /// `acc += bf16 values`; returns the count of non-finite values added.
    accumulate_bf16(acc: &mut [f32], src: &[u8]) -> u32 = accumulate_bf16_body
);
dispatched!(
    /// `acc += f32 values`; returns the count of non-finite values added.
    accumulate_f32(acc: &mut [f32], src: &[u8]) -> u32 = accumulate_f32_body
);

dispatched!(
    /// The largest magnitude in `src` (0 for an empty slice).
    amax(src: &[f32]) -> f32 = amax_body
);
dispatched!(
    /// `dst[i] = e4m3(src[i] × inv)`.
    encode_e4m3(src: &[f32], inv: f32, dst: &mut [u8]) -> () = encode_e4m3_body
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_rounding_matches_half_on_every_class() {
        let specials = [
            0.0f32,
            -0.0,
            1.0,
            f32::MIN_POSITIVE,
            1e-40,
            f32::MAX,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            -f32::NAN,
            f32::from_bits(0x7F80_0001), // signalling NaN
            f32::from_bits(0x3F80_8000), // a tie: rounds to even
            f32::from_bits(0x3F81_8000), // a tie: rounds up to even
            f32::from_bits(0x7F7F_FFFF), // rounds to infinity
        ];
        let mut state = 0x1234_5678u32;
        let random = (0..100_000).map(|_| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            f32::from_bits(state)
        });
        for v in specials.into_iter().chain(random) {
            let ours = bf16_bits(v);
            let theirs = half::bf16::from_f32(v).to_bits();
            if v.is_nan() {
                assert!(bf16_value(ours).is_nan(), "{v:?}");
            } else {
                assert_eq!(ours, theirs, "{v:?} ({:#x})", v.to_bits());
            }
        }
    }

    /// The vectorised encode (as the CPU runs it, over a length that leaves a tail) bitwise
    /// against `half` on every special class, NaNs included; the vectorised decode of every
    /// bf16 bit pattern against `half` (NaNs widened bit for bit), with its non-finite count.
    #[test]
    fn vectorised_bf16_is_bitwise_the_scalar_reference() {
        let mut values = vec![
            0.0f32,
            -0.0,
            f32::MIN_POSITIVE,
            1e-40,
            -1e-45,
            f32::from_bits(0x0000_8000), // a subnormal tie
            f32::from_bits(0x0001_8000), // a subnormal tie, up
            f32::MAX,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            -f32::NAN,
            f32::from_bits(0x7F80_0001),
            f32::from_bits(0xFFC1_2345),
            f32::from_bits(0x3F80_8000),
            f32::from_bits(0x3F81_8000),
            f32::from_bits(0xBF81_8000),
            f32::from_bits(0x7F7F_FFFF),
        ];
        let mut state = 0x9E37_79B9u32;
        values.extend((0..4099).map(|_| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            f32::from_bits(state)
        }));
        let mut dst = vec![0u16; values.len()];
        encode_bf16(&values, &mut dst);
        for (v, d) in values.iter().zip(&dst) {
            let want = half::bf16::from_f32(*v).to_bits();
            assert_eq!(u16::from_le(*d), want, "{v:?} ({:#x})", v.to_bits());
        }
        let all: Vec<u8> = (0..=u16::MAX).flat_map(u16::to_le_bytes).collect();
        let mut out = vec![0f32; 1 << 16];
        let bad = decode_bf16(&all, &mut out);
        let mut want_bad = 0;
        for (bits, got) in (0..=u16::MAX).zip(&out) {
            let want = half::bf16::from_bits(bits).to_f32();
            want_bad += u32::from(!want.is_finite());
            if want.is_nan() {
                // `half` quiets a signalling NaN; the wire widens bits exactly (and refuses
                // every NaN as non-finite either way).
                assert_eq!(got.to_bits(), u32::from(bits) << 16, "{bits:#x}");
            } else {
                assert_eq!(got.to_bits(), want.to_bits(), "{bits:#x}");
            }
        }
        assert_eq!(bad, want_bad);
    }
}

//! The portable driver's fast path on x86-64 CPUs without AVX-512 (AVX2 + FMA + F16C, every x86
//! server since 2013): bf16, FP8 and FP4 panels widened in registers and multiplied with FMA, in
//! place of unpacking each panel chunk to float32 for `faer`.
//!
//! A tile is one or two activation rows × one 32-column panel over one k chunk: four float32
//! vectors per row (columns 0-7, 8-15, 16-23, 24-31). A bf16 k-row (64 bytes, see
//! [`super::pack`]) gives them as two 32-byte loads, each shifted (columns `l`) and masked
//! (columns `16 + l`); an FP8 k-row (32 bytes) as four 8-byte loads widened to halves
//! (`e4m3 · 2^-8`) and converted; an FP4 k-row (16 bytes) as nibbles looked up in the e2m1
//! table. Block scales (FP4: one per column and 32-wide k group) multiply each widened weight
//! before the FMA, as the portable unpacking does, so FP8 and FP4 panels give their bf16 images'
//! results bit for bit.
//!
//! Every output is one FMA chain over k in order, continued from the stored partial at each k
//! chunk, whatever the tile's height: a row's result never depends on the other rows of the
//! batch (a lone row included, unlike `faer`'s matrix-vector path).
#![allow(unsafe_code)]

use std::arch::x86_64::*;

use super::pack::{Fp4PanelScales, NR, Packed, PanelData};
use crate::checkpoint::fp4;

/// Whether this CPU runs [`task`].
pub fn available() -> bool {
    is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
}

const BF16: u8 = 0;
const FP8: u8 = 1;
const FP4: u8 = 2;

/// The four column vectors of k-row `kk` of a bf16 panel chunk at `w`.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn bf16_row(w: *const u8, kk: usize) -> [__m256; 4] {
    // SAFETY: the caller's chunk holds k-row kk (64 bytes).
    unsafe {
        let at = w.add(kk * NR * 2);
        let lo = _mm256_loadu_si256(at.cast());
        let hi = _mm256_loadu_si256(at.add(32).cast());
        let mask = _mm256_set1_epi32(0xFFFF_0000_u32 as i32);
        [
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(lo)),
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(hi)),
            _mm256_castsi256_ps(_mm256_and_si256(lo, mask)),
            _mm256_castsi256_ps(_mm256_and_si256(hi, mask)),
        ]
    }
}

/// The four column vectors of k-row `kk` of an FP8 panel chunk at `w` (values `e4m3 · 2^-8`).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn fp8_row(w: *const u8, kk: usize) -> [__m256; 4] {
    // SAFETY: the caller's chunk holds k-row kk (32 bytes).
    unsafe {
        let at = w.add(kk * NR);
        [
            fp8_8(at),
            fp8_8(at.add(8)),
            fp8_8(at.add(16)),
            fp8_8(at.add(24)),
        ]
    }
}

/// Eight e4m3 bytes at `at` as float32 `e4m3 · 2^-8` (see `fp8::e4m3_to_f16_bits`).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn fp8_8(at: *const u8) -> __m256 {
    // SAFETY: the caller guarantees 8 readable bytes at `at`.
    let h = _mm_cvtepu8_epi16(unsafe { _mm_loadl_epi64(at.cast()) });
    let mag = _mm_and_si128(_mm_slli_epi16::<7>(h), _mm_set1_epi16(0x3F80));
    let sign = _mm_and_si128(_mm_slli_epi16::<8>(h), _mm_set1_epi16(0x8000_u16 as i16));
    _mm256_cvtph_ps(_mm_or_si128(mag, sign))
}

/// The four column vectors of k-row `kk` of an FP4 panel chunk at `w` (unscaled e2m1 values).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn fp4_row(w: *const u8, kk: usize, table: __m256) -> [__m256; 4] {
    // SAFETY: the caller's chunk holds k-row kk (16 bytes).
    let bytes = unsafe { _mm_loadu_si128(w.add(kk * NR / 2).cast()) };
    let lo = _mm256_cvtepu8_epi32(bytes);
    let hi = _mm256_cvtepu8_epi32(_mm_srli_si128::<8>(bytes));
    let nib = _mm256_set1_epi32(0xF);
    let value = |n: __m256i| {
        let mag = _mm256_permutevar8x32_ps(table, n);
        let sign = _mm256_slli_epi32::<28>(_mm256_and_si256(n, _mm256_set1_epi32(8)));
        _mm256_xor_ps(mag, _mm256_castsi256_ps(sign))
    };
    [
        value(_mm256_and_si256(lo, nib)),
        value(_mm256_and_si256(hi, nib)),
        value(_mm256_srli_epi32::<4>(lo)),
        value(_mm256_srli_epi32::<4>(hi)),
    ]
}

/// The 32 column scales of panel `q`'s FP4 k group `kb`.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn fp4_scales(s: &Fp4PanelScales, q: usize, kb: usize) -> [__m256; 4] {
    let (ptr, pow2) = s.ptr(q, kb);
    let mut out = [_mm256_setzero_ps(); 4];
    for (v, o) in out.iter_mut().enumerate() {
        // SAFETY: group kb of panel q holds NR scales (bytes or float32) from ptr.
        *o = unsafe {
            if pow2 {
                let b = _mm_loadl_epi64(ptr.add(8 * v).cast());
                _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_cvtepu8_epi32(b)))
            } else {
                _mm256_loadu_ps(ptr.cast::<f32>().add(8 * v))
            }
        };
    }
    out
}

/// `acc[r] (+)= x[r][..kc] · chunk` for `R` rows; `acc` holds the partial sums in column order.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn tile<const R: usize, const FMT: u8>(
    w: *const u8,
    kc: usize,
    x: [*const f32; R],
    scale: Scale<'_>,
    acc: &mut [[f32; NR]; R],
) {
    // SAFETY: the caller guarantees kc k-rows at w and kc values at each x[r]; acc and scale
    // hold NR floats each.
    unsafe {
        let mut a = [[_mm256_setzero_ps(); 4]; R];
        for (ar, cr) in a.iter_mut().zip(acc.iter()) {
            for (v, av) in ar.iter_mut().enumerate() {
                *av = _mm256_loadu_ps(cr.as_ptr().add(8 * v));
            }
        }
        let mut s = match scale {
            Scale::Block(s) => {
                let p = s.as_ptr();
                Some([
                    _mm256_loadu_ps(p),
                    _mm256_loadu_ps(p.add(8)),
                    _mm256_loadu_ps(p.add(16)),
                    _mm256_loadu_ps(p.add(24)),
                ])
            }
            Scale::None | Scale::Fp4 { .. } => None,
        };
        let table = _mm256_loadu_ps(fp4::E2M1.as_ptr());
        for kk in 0..kc {
            if FMT == FP4
                && let Scale::Fp4 { scales, q, k0 } = scale
                && (k0 + kk).is_multiple_of(fp4::GROUP)
            {
                s = Some(fp4_scales(scales, q, (k0 + kk) / fp4::GROUP));
            }
            let mut ws = match FMT {
                BF16 => bf16_row(w, kk),
                FP8 => fp8_row(w, kk),
                _ => fp4_row(w, kk, table),
            };
            if let Some(s) = &s {
                for v in 0..4 {
                    ws[v] = _mm256_mul_ps(ws[v], s[v]);
                }
            }
            for r in 0..R {
                let b = _mm256_broadcast_ss(&*x[r].add(kk));
                for v in 0..4 {
                    a[r][v] = _mm256_fmadd_ps(b, ws[v], a[r][v]);
                }
            }
        }
        for (ar, cr) in a.iter().zip(acc.iter_mut()) {
            for (v, av) in ar.iter().enumerate() {
                _mm256_storeu_ps(cr.as_mut_ptr().add(8 * v), *av);
            }
        }
    }
}

/// The scales a tile applies to its widened weights.
#[derive(Clone, Copy)]
enum Scale<'a> {
    None,
    /// One block scale per panel column (the chunk never crosses a block).
    Block(&'a [f32]),
    /// FP4: per column and 32-wide k group of panel `q`; the chunk starts at `k0`.
    Fp4 {
        scales: &'a Fp4PanelScales,
        q: usize,
        k0: usize,
    },
}

/// One task of a grouped GEMM (as the portable driver's): rows × panels over every k chunk.
///
/// # Safety
/// [`available`] holds; `c` points to the `[m, p.n]` output, `x` is `[m, p.k]`,
/// and this call is the only writer of `rows` × the columns of `panels`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn task(
    p: &Packed,
    x: &[f32],
    c: *mut f32,
    chunks: &[(usize, usize)],
    panels: std::ops::Range<usize>,
    rows: std::ops::Range<usize>,
) {
    let fmt = match p.data {
        PanelData::Bf16(_) => BF16,
        PanelData::Fp8(_) => FP8,
        PanelData::Fp4 { .. } => FP4,
    };
    for q in panels {
        let cols = p.cols_of(q);
        for (ci, &(k0, k1)) in chunks.iter().enumerate() {
            let kc = k1 - k0;
            let w = p.panel_bytes_from(q, k0).as_ptr();
            let scale = match (&p.data, &p.scales) {
                (PanelData::Fp4 { scales, .. }, _) => Scale::Fp4 { scales, q, k0 },
                (_, Some(s)) => Scale::Block(s.get(q, k0 / s.block_k)),
                (_, None) => Scale::None,
            };
            let mut r0 = rows.start;
            while r0 < rows.end {
                let r = (rows.end - r0).min(2);
                let mut acc = [[0.0f32; NR]; 2];
                for (i, a) in acc.iter_mut().enumerate().take(r) {
                    if ci > 0 {
                        // SAFETY: row r0 + i, columns q*NR..q*NR+cols lie in the output.
                        let src = unsafe { c.add((r0 + i) * p.n + q * NR) };
                        for (j, v) in a.iter_mut().enumerate().take(cols) {
                            // SAFETY: as above.
                            *v = unsafe { *src.add(j) };
                        }
                    }
                }
                let xr = |i: usize| x[(r0 + i) * p.k + k0..].as_ptr();
                // SAFETY: the chunk holds kc k-rows from k0 and each row of x has kc values from
                // k0 (checked by the driver's size asserts).
                unsafe {
                    let two = [xr(0), xr(1.min(r - 1))];
                    let [first, _] = &mut acc;
                    let one = std::array::from_mut(first);
                    match (r, fmt) {
                        (2, BF16) => tile::<2, BF16>(w, kc, two, scale, &mut acc),
                        (2, FP8) => tile::<2, FP8>(w, kc, two, scale, &mut acc),
                        (2, _) => tile::<2, FP4>(w, kc, two, scale, &mut acc),
                        (_, BF16) => tile::<1, BF16>(w, kc, [two[0]], scale, one),
                        (_, FP8) => tile::<1, FP8>(w, kc, [two[0]], scale, one),
                        (_, _) => tile::<1, FP4>(w, kc, [two[0]], scale, one),
                    }
                }
                for (i, a) in acc.iter().enumerate().take(r) {
                    // SAFETY: as above; this task alone writes these outputs.
                    let dst = unsafe { c.add((r0 + i) * p.n + q * NR) };
                    for (j, &v) in a.iter().enumerate().take(cols) {
                        // SAFETY: as above.
                        unsafe { *dst.add(j) = v };
                    }
                }
                r0 += r;
            }
        }
    }
}

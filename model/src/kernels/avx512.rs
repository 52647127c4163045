//! AVX-512 micro-kernels over packed bf16 or FP8 weight panels (see [`super::pack`]).
//!
//! Activations stay float32: each 64-byte bf16 panel row is widened to two float32 vectors with
//! one shift and one mask (bf16 → f32 is exact); each 32-byte FP8 row is widened to 32 halves
//! (`e4m3 · 2^-8`, two shifts and two masks) and converted by `vcvtph2ps` (exact). Both are then
//! multiplied with broadcast activations by FMA into float32 accumulators. Weights are read at 2
//! (bf16) or 1 (FP8) byte each, which is what matters for memory-bound decode, and results equal a
//! float32 GEMM over the weights' values (FP8's 2^-8 is folded into its block scales). Every
//! output element is accumulated over k in the same order whatever the tile shape, so a token's
//! result does not depend on which or how many other tokens share the batch.
#![allow(unsafe_code)]

use std::arch::x86_64::*;

use super::pack::NR;

/// One tile invocation: `R` activation rows × `P` adjacent panels over `kc` columns of k.
#[derive(Debug, Clone, Copy)]
pub struct Tile {
    pub kc: usize,
    /// Activations at (row 0, k0); row stride `lda`.
    pub a: *const f32,
    pub lda: usize,
    /// First panel's data at k0; next panel `panel_stride` bytes further.
    pub b: *const u8,
    pub panel_stride: usize,
    /// Output at (row 0, first panel column); row stride `ldc`.
    pub c: *mut f32,
    pub ldc: usize,
    /// Valid columns of the last panel of the group (all others are full).
    pub last_cols: usize,
    /// Scales of the first panel in this k block, next panel `scale_stride` further.
    pub scale: Option<(*const f32, usize)>,
    /// Overwrite `c` (first k chunk) instead of accumulating into it.
    pub first: bool,
}

/// Bytes prefetched ahead in each panel (64 bf16 rows). The hardware prefetcher alone left decode
/// ~20% short of it at batch 32 and less so at batch 1 (`cargo bench --bench decode`, A/B in one
/// run; 24 and 128 rows were close, 256 no better than none).
const PREFETCH_BYTES: usize = 64 * NR * 2;

/// One panel row of weights as float32 columns `[0..16, 16..32]`.
///
/// # Safety
/// `row` has `NR` values of the format (64 bytes for bf16, 32 for FP8).
#[inline(always)]
unsafe fn widen<const FP8: bool>(row: *const u8) -> [__m512; 2] {
    // SAFETY: forwarded from the caller; AVX-512F/BW are enabled in the calling kernel.
    unsafe {
        if FP8 {
            let v = _mm512_cvtepu8_epi16(_mm256_loadu_si256(row.cast()));
            let magnitude = _mm512_and_si512(_mm512_slli_epi16::<7>(v), _mm512_set1_epi16(0x3F80));
            let sign = _mm512_and_si512(
                _mm512_slli_epi16::<8>(v),
                _mm512_set1_epi16(0x8000u16 as i16),
            );
            let h = _mm512_or_si512(magnitude, sign);
            [
                _mm512_cvtph_ps(_mm512_castsi512_si256(h)),
                _mm512_cvtph_ps(_mm512_extracti64x4_epi64::<1>(h)),
            ]
        } else {
            let v = _mm512_loadu_si512(row.cast());
            [
                _mm512_castsi512_ps(_mm512_slli_epi32::<16>(v)),
                _mm512_castsi512_ps(_mm512_and_si512(
                    v,
                    _mm512_set1_epi32(0xFFFF_0000u32 as i32),
                )),
            ]
        }
    }
}

#[inline(always)]
fn mask_for(cols: usize) -> __mmask16 {
    if cols >= 16 {
        0xFFFF
    } else {
        ((1u32 << cols) - 1) as __mmask16
    }
}

#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn tile<const R: usize, const P: usize, const FP8: bool>(t: &Tile) {
    let row_bytes = if FP8 { NR } else { NR * 2 };
    let mut acc = [[[_mm512_setzero_ps(); 2]; P]; R];
    for kk in 0..t.kc {
        let mut w = [[_mm512_setzero_ps(); 2]; P];
        // One prefetch per 64-byte line: every row in bf16, every other row in FP8.
        if !FP8 || kk.is_multiple_of(2) {
            for p in 0..P {
                // A prefetch never faults, even past the panel; wrapping_add keeps the address
                // arithmetic defined.
                let ahead =
                    t.b.wrapping_add(p * t.panel_stride + kk * row_bytes + PREFETCH_BYTES);
                _mm_prefetch::<_MM_HINT_T0>(ahead.cast());
            }
        }
        for (p, wp) in w.iter_mut().enumerate() {
            // SAFETY: the driver guarantees panel p has kc rows of NR values from `b`.
            *wp = unsafe { widen::<FP8>(t.b.add(p * t.panel_stride + kk * row_bytes)) };
        }
        for (r, accr) in acc.iter_mut().enumerate() {
            // SAFETY: rows 0..R of `a` have at least kc readable elements.
            let x = _mm512_set1_ps(unsafe { *t.a.add(r * t.lda + kk) });
            for p in 0..P {
                accr[p][0] = _mm512_fmadd_ps(x, w[p][0], accr[p][0]);
                accr[p][1] = _mm512_fmadd_ps(x, w[p][1], accr[p][1]);
            }
        }
    }
    for p in 0..P {
        let cols = if p + 1 == P { t.last_cols } else { NR };
        let masks = [mask_for(cols), mask_for(cols.saturating_sub(16))];
        let scales = t.scale.map(|(s, stride)| {
            // SAFETY: each panel has NR scales per k block.
            unsafe {
                [
                    _mm512_loadu_ps(s.add(p * stride)),
                    _mm512_loadu_ps(s.add(p * stride + 16)),
                ]
            }
        });
        for (r, accr) in acc.iter().enumerate() {
            for h in 0..2 {
                if masks[h] == 0 {
                    continue;
                }
                // SAFETY: the masked lanes are valid output columns of row r.
                unsafe {
                    let cp = t.c.add(r * t.ldc + p * NR + 16 * h);
                    let v = accr[p][h];
                    let out = match (scales, t.first) {
                        (Some(s), true) => _mm512_mul_ps(v, s[h]),
                        (Some(s), false) => {
                            _mm512_fmadd_ps(v, s[h], _mm512_maskz_loadu_ps(masks[h], cp))
                        }
                        (None, true) => v,
                        (None, false) => _mm512_add_ps(v, _mm512_maskz_loadu_ps(masks[h], cp)),
                    };
                    _mm512_mask_storeu_ps(cp, masks[h], out);
                }
            }
        }
    }
}

/// Widens `kc` rows of one FP8 panel at `src` into the bf16 panel layout at `dst` (`kc · NR`
/// u16): the values `e4m3 · 2^-8` are exact in bf16, so the bf16 tiles over `dst`, with the same
/// (2^8-folded) scales, give exactly what the FP8 tiles give. Tall inputs use this once per panel
/// chunk instead of widening every weight row once per 8 activation rows.
///
/// # Safety
/// The CPU supports AVX-512F and BW; `src` has `kc · NR` bytes and `dst` room for `kc · NR` u16.
#[target_feature(enable = "avx512f,avx512bw")]
pub unsafe fn widen_fp8_panel(src: *const u8, kc: usize, dst: *mut u16) {
    let high = _mm512_set1_epi32(0xFFFF_0000u32 as i32);
    for kk in 0..kc {
        // SAFETY: row kk of both buffers is in range (see the contract above).
        unsafe {
            let [lo, hi] = widen::<true>(src.add(kk * NR));
            let packed = _mm512_or_si512(
                _mm512_srli_epi32::<16>(_mm512_castps_si512(lo)),
                _mm512_and_si512(_mm512_castps_si512(hi), high),
            );
            _mm512_storeu_si512(dst.add(kk * NR).cast(), packed);
        }
    }
}

/// Panels per tile for `rows` activation rows (more panels keep enough FMA chains in flight
/// when there are few rows).
pub fn panels_for(rows: usize) -> usize {
    match rows {
        1 | 2 => 4,
        3 | 4 => 2,
        _ => 1,
    }
}

/// Runs one tile of `rows` (1..=8) × `panels` (1, or [`panels_for`]`(rows)`) over FP8 panels when
/// `fp8`, bf16 ones otherwise.
///
/// # Safety
/// The CPU supports AVX-512F and BW, and every pointer in `t` covers the region the tile touches.
pub unsafe fn run(rows: usize, panels: usize, fp8: bool, t: &Tile) {
    // SAFETY: forwarded from the caller.
    unsafe {
        if fp8 {
            run_format::<true>(rows, panels, t)
        } else {
            run_format::<false>(rows, panels, t)
        }
    }
}

/// # Safety
/// As [`run`].
unsafe fn run_format<const FP8: bool>(rows: usize, panels: usize, t: &Tile) {
    // SAFETY: forwarded from the caller.
    unsafe {
        match (rows, panels) {
            (1, 4) => tile::<1, 4, FP8>(t),
            (2, 4) => tile::<2, 4, FP8>(t),
            (3, 2) => tile::<3, 2, FP8>(t),
            (4, 2) => tile::<4, 2, FP8>(t),
            (1, 1) => tile::<1, 1, FP8>(t),
            (2, 1) => tile::<2, 1, FP8>(t),
            (3, 1) => tile::<3, 1, FP8>(t),
            (4, 1) => tile::<4, 1, FP8>(t),
            (5, 1) => tile::<5, 1, FP8>(t),
            (6, 1) => tile::<6, 1, FP8>(t),
            (7, 1) => tile::<7, 1, FP8>(t),
            (8, 1) => tile::<8, 1, FP8>(t),
            _ => unreachable!("no tile for {rows}x{panels}"),
        }
    }
}

/// Whether this CPU can run the kernels.
pub fn available() -> bool {
    is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw")
}

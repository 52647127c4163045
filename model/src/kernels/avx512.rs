//! AVX-512 micro-kernels over packed bf16 weight panels (see [`super::pack`]).
//!
//! Activations stay float32: each 64-byte panel row is widened to two float32 vectors with one
//! shift and one mask (bf16 → f32 is exact), then multiplied with broadcast activations by FMA
//! into float32 accumulators. Weights are read at 2 bytes each, which is what matters for
//! memory-bound decode, and results equal a float32 GEMM over the bf16-valued weights. Every
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
    /// First panel's data at k0; next panel `panel_stride` u16 further.
    pub b: *const u16,
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

/// Panel rows prefetched ahead (4 KiB per panel). The hardware prefetcher alone left decode
/// ~20% short of it at batch 32 and less so at batch 1 (`cargo bench --bench decode`, A/B in one
/// run; 24 and 128 rows were close, 256 no better than none).
const PREFETCH_ROWS: usize = 64;

#[inline(always)]
fn mask_for(cols: usize) -> __mmask16 {
    if cols >= 16 {
        0xFFFF
    } else {
        ((1u32 << cols) - 1) as __mmask16
    }
}

#[target_feature(enable = "avx512f")]
unsafe fn tile<const R: usize, const P: usize>(t: &Tile) {
    let mut acc = [[[_mm512_setzero_ps(); 2]; P]; R];
    let high = _mm512_set1_epi32(0xFFFF_0000u32 as i32);
    for kk in 0..t.kc {
        let mut w = [[_mm512_setzero_ps(); 2]; P];
        for p in 0..P {
            // A prefetch never faults, even past the panel; wrapping_add keeps the address
            // arithmetic defined.
            let ahead =
                t.b.wrapping_add(p * t.panel_stride + (kk + PREFETCH_ROWS) * NR);
            _mm_prefetch::<_MM_HINT_T0>(ahead.cast());
        }
        for (p, wp) in w.iter_mut().enumerate() {
            // SAFETY: the driver guarantees panel p has kc rows of NR u16 from `b`.
            let v = unsafe { _mm512_loadu_si512(t.b.add(p * t.panel_stride + kk * NR).cast()) };
            wp[0] = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(v));
            wp[1] = _mm512_castsi512_ps(_mm512_and_si512(v, high));
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

/// Panels per tile for `rows` activation rows (more panels keep enough FMA chains in flight
/// when there are few rows).
pub fn panels_for(rows: usize) -> usize {
    match rows {
        1 | 2 => 4,
        3 | 4 => 2,
        _ => 1,
    }
}

/// Runs one tile of `rows` (1..=8) × `panels` (1, or [`panels_for`]`(rows)`).
///
/// # Safety
/// The CPU supports AVX-512F, and every pointer in `t` covers the region the tile touches.
pub unsafe fn run(rows: usize, panels: usize, t: &Tile) {
    // SAFETY: forwarded from the caller.
    unsafe {
        match (rows, panels) {
            (1, 4) => tile::<1, 4>(t),
            (2, 4) => tile::<2, 4>(t),
            (3, 2) => tile::<3, 2>(t),
            (4, 2) => tile::<4, 2>(t),
            (1, 1) => tile::<1, 1>(t),
            (2, 1) => tile::<2, 1>(t),
            (3, 1) => tile::<3, 1>(t),
            (4, 1) => tile::<4, 1>(t),
            (5, 1) => tile::<5, 1>(t),
            (6, 1) => tile::<6, 1>(t),
            (7, 1) => tile::<7, 1>(t),
            (8, 1) => tile::<8, 1>(t),
            _ => unreachable!("no tile for {rows}x{panels}"),
        }
    }
}

/// Whether this CPU can run the kernels.
pub fn available() -> bool {
    is_x86_feature_detected!("avx512f")
}

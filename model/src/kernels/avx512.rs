//! AVX-512 micro-kernels over packed bf16, FP8 or FP4 weight panels (see [`super::pack`]).
//!
//! Activations stay float32: each 64-byte bf16 panel row is widened to two float32 vectors with
//! one shift and one mask (bf16 → f32 is exact); each 32-byte FP8 row is widened to 32 halves
//! (`e4m3 · 2^-8`, two shifts and two masks) and converted by `vcvtph2ps` (exact). Both are then
//! multiplied with broadcast activations by FMA into float32 accumulators. Weights are read at 2
//! (bf16) or 1 (FP8) byte each, which is what matters for memory-bound decode, and results equal a
//! float32 GEMM over the weights' values (FP8's 2^-8 is folded into its block scales). Every
//! output element is accumulated over k in the same order whatever the tile shape, so a token's
//! result does not depend on which or how many other tokens share the batch.
//!
//! FP4 (e2m1) rows are 16 bytes: the bytes are zero-extended to 16 int32 lanes, the low and high
//! nibbles (columns 0..16 and 16..32) index a 16-entry float32 table by `vpermps`, and each value
//! is multiplied by its column's scale for that 32-wide k group before the FMA. The product is the
//! dequantised weight exactly as `e2m1 · scale` rounds in float32, so FP4 panels give the results
//! of bf16 (or float32) panels holding the dequantised weights, bit for bit.
#![allow(unsafe_code)]

use std::arch::x86_64::*;

use super::pack::NR;
use crate::checkpoint::fp4;

/// The weight format of a tile's panels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Bf16,
    Fp8,
    Fp4,
}

const BF16: u8 = 0;
const FP8: u8 = 1;
const FP4: u8 = 2;

/// The per-weight scales of an FP4 tile: NR scales per (panel, 32-wide k group).
#[derive(Debug, Clone, Copy)]
pub struct Fp4Scales {
    /// Scales of the first panel in the k group holding the tile's first column: float32, or
    /// E8M0 exponent bytes (`2^(b − 127)`, `b` ≥ 1) when `e8m0`.
    pub scales: *const u8,
    pub e8m0: bool,
    /// Scales from one panel's to the next's.
    pub panel_stride: usize,
    /// The tile's first column's offset inside its k group (`k0 % 32`).
    pub offset: usize,
}

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
    /// Per-weight scales of FP4 panels (`None` for the other formats).
    pub fp4: Option<Fp4Scales>,
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
unsafe fn widen<const F: u8>(row: *const u8) -> [__m512; 2] {
    // SAFETY: forwarded from the caller; AVX-512F/BW are enabled in the calling kernel.
    unsafe {
        if F == FP8 {
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

/// One FP4 panel row (16 bytes: column `j` in the low nibble of byte `j`, column `16 + j` in the
/// high one) as float32 columns `[0..16, 16..32]`, each times its scale.
///
/// # Safety
/// `row` has 16 readable bytes; AVX-512F is enabled in the calling kernel.
#[inline(always)]
unsafe fn widen_fp4(row: *const u8, table: __m512, scales: [__m512; 2]) -> [__m512; 2] {
    // SAFETY: forwarded from the caller.
    unsafe {
        let v = _mm512_cvtepu8_epi32(_mm_loadu_si128(row.cast()));
        let lo = _mm512_and_si512(v, _mm512_set1_epi32(0x0F));
        let hi = _mm512_srli_epi32::<4>(v);
        [
            _mm512_mul_ps(_mm512_permutexvar_ps(lo, table), scales[0]),
            _mm512_mul_ps(_mm512_permutexvar_ps(hi, table), scales[1]),
        ]
    }
}

/// The 32 scales of panel `p` for the k group holding tile column `kk`.
///
/// # Safety
/// `s` covers that group of that panel.
#[inline(always)]
unsafe fn fp4_scales(s: &Fp4Scales, p: usize, kk: usize) -> [__m512; 2] {
    let i = p * s.panel_stride + (s.offset + kk) / fp4::GROUP * NR;
    // SAFETY: forwarded from the caller.
    unsafe {
        if s.e8m0 {
            // The exponent byte moved into a float32's exponent field is 2^(b − 127) exactly.
            let b = _mm256_loadu_si256(s.scales.add(i).cast());
            let lo = _mm512_cvtepu8_epi32(_mm256_castsi256_si128(b));
            let hi = _mm512_cvtepu8_epi32(_mm256_extracti128_si256::<1>(b));
            [
                _mm512_castsi512_ps(_mm512_slli_epi32::<23>(lo)),
                _mm512_castsi512_ps(_mm512_slli_epi32::<23>(hi)),
            ]
        } else {
            let at = s.scales.cast::<f32>().add(i);
            [_mm512_loadu_ps(at), _mm512_loadu_ps(at.add(16))]
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
unsafe fn tile<const R: usize, const P: usize, const F: u8>(t: &Tile) {
    let row_bytes = match F {
        BF16 => NR * 2,
        FP8 => NR,
        _ => NR / 2,
    };
    // SAFETY: a 16-float table.
    let table = unsafe { _mm512_loadu_ps(fp4::E2M1.as_ptr()) };
    let mut ws = [[_mm512_setzero_ps(); 2]; P];
    let mut acc = [[[_mm512_setzero_ps(); 2]; P]; R];
    for kk in 0..t.kc {
        let mut w = [[_mm512_setzero_ps(); 2]; P];
        if F == FP4
            && let Some(s) = &t.fp4
            && (kk == 0 || (s.offset + kk).is_multiple_of(fp4::GROUP))
        {
            for (p, wsp) in ws.iter_mut().enumerate() {
                // SAFETY: the driver passes the scales of every panel and group of the tile.
                *wsp = unsafe { fp4_scales(s, p, kk) };
            }
        }
        // One prefetch per 64-byte line: every row in bf16, every other row in FP8, every
        // fourth in FP4.
        if kk.is_multiple_of(64 / row_bytes) {
            for p in 0..P {
                // A prefetch never faults, even past the panel; wrapping_add keeps the address
                // arithmetic defined.
                let ahead =
                    t.b.wrapping_add(p * t.panel_stride + kk * row_bytes + PREFETCH_BYTES);
                _mm_prefetch::<_MM_HINT_T0>(ahead.cast());
            }
        }
        for (p, wp) in w.iter_mut().enumerate() {
            let row = t.b.wrapping_add(p * t.panel_stride + kk * row_bytes);
            // SAFETY: the driver guarantees panel p has kc rows of NR values from `b`.
            *wp = unsafe {
                if F == FP4 {
                    widen_fp4(row, table, ws[p])
                } else {
                    widen::<F>(row)
                }
            };
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
            let [lo, hi] = widen::<FP8>(src.add(kk * NR));
            let packed = _mm512_or_si512(
                _mm512_srli_epi32::<16>(_mm512_castps_si512(lo)),
                _mm512_and_si512(_mm512_castps_si512(hi), high),
            );
            _mm512_storeu_si512(dst.add(kk * NR).cast(), packed);
        }
    }
}

/// Widens `kc` rows of one FP4 panel at `src` (16 bytes a row), each value times its scale, into
/// the bf16 panel layout at `dst`, like [`widen_fp8_panel`]. Exact only when every
/// `e2m1 · scale` is a bf16 value ([`super::pack::PanelData::Fp4`]'s `bf16_exact`).
///
/// # Safety
/// The CPU supports AVX-512F and BW; `src` has `kc · 16` bytes, `scales` covers the panel's
/// groups of these rows and `dst` has room for `kc · NR` u16.
#[target_feature(enable = "avx512f,avx512bw")]
pub unsafe fn widen_fp4_panel(src: *const u8, kc: usize, scales: &Fp4Scales, dst: *mut u16) {
    let high = _mm512_set1_epi32(0xFFFF_0000u32 as i32);
    // SAFETY: a 16-float table.
    let table = unsafe { _mm512_loadu_ps(fp4::E2M1.as_ptr()) };
    let mut ws = [_mm512_setzero_ps(); 2];
    for kk in 0..kc {
        // SAFETY: row kk of both buffers and its group's scales are in range (the contract).
        unsafe {
            if kk == 0 || (scales.offset + kk).is_multiple_of(fp4::GROUP) {
                ws = fp4_scales(scales, 0, kk);
            }
            let [lo, hi] = widen_fp4(src.add(kk * NR / 2), table, ws);
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

/// Runs one tile of `rows` (1..=8) × `panels` (1, or [`panels_for`]`(rows)`) over panels of
/// `format` (FP4 tiles need `t.fp4`).
///
/// # Safety
/// The CPU supports AVX-512F and BW, and every pointer in `t` covers the region the tile touches.
pub unsafe fn run(rows: usize, panels: usize, format: Format, t: &Tile) {
    debug_assert_eq!(
        format == Format::Fp4,
        t.fp4.is_some(),
        "FP4 tiles carry scales"
    );
    // SAFETY: forwarded from the caller.
    unsafe {
        match format {
            Format::Bf16 => run_format::<BF16>(rows, panels, t),
            Format::Fp8 => run_format::<FP8>(rows, panels, t),
            Format::Fp4 => run_format::<FP4>(rows, panels, t),
        }
    }
}

/// # Safety
/// As [`run`].
unsafe fn run_format<const F: u8>(rows: usize, panels: usize, t: &Tile) {
    // SAFETY: forwarded from the caller.
    unsafe {
        match (rows, panels) {
            (1, 4) => tile::<1, 4, F>(t),
            (2, 4) => tile::<2, 4, F>(t),
            (3, 2) => tile::<3, 2, F>(t),
            (4, 2) => tile::<4, 2, F>(t),
            (1, 1) => tile::<1, 1, F>(t),
            (2, 1) => tile::<2, 1, F>(t),
            (3, 1) => tile::<3, 1, F>(t),
            (4, 1) => tile::<4, 1, F>(t),
            (5, 1) => tile::<5, 1, F>(t),
            (6, 1) => tile::<6, 1, F>(t),
            (7, 1) => tile::<7, 1, F>(t),
            (8, 1) => tile::<8, 1, F>(t),
            _ => unreachable!("no tile for {rows}x{panels}"),
        }
    }
}

/// Whether this CPU can run the kernels.
pub fn available() -> bool {
    is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw")
}

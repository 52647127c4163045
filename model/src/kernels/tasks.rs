//! One task of a grouped GEMM over a packed weight: a block of activation rows × a range of
//! panels, over every k chunk. The AVX-512 drivers cut it into micro-kernel tiles (FP8 inputs
//! taller than one tile, and FP4 ones whose dequantised values are bf16, widen each panel chunk
//! once into a bf16 scratch panel); the portable
//! driver unpacks panel chunks to float32 and calls `faer`.
#![allow(unsafe_code)]

use faer::linalg::matmul::matmul;
use faer::{Accum, MatMut, MatRef, Par};

#[cfg(target_arch = "x86_64")]
use super::avx512;
use super::linear::KC;
use super::pack::{NR, Packed, PanelData};

/// Where a tile starts: k chunk `[k0, k1)`, activation row `r0`, first panel `q`, and whether it
/// overwrites the output (the first k chunk) or accumulates.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct At {
    k0: usize,
    k1: usize,
    r0: usize,
    q: usize,
    first: bool,
}

/// The micro-kernel tile at `at`, reading weights from `(pointer, panel stride in bytes)`, whose
/// last panel is `last`.
///
/// # Safety
/// `c` points to the `[m, p.n]` output and `(at.r0, at.q * NR)` lies inside it.
#[cfg(target_arch = "x86_64")]
unsafe fn tile(
    p: &Packed,
    x: &[f32],
    c: *mut f32,
    at: At,
    (b, panel_stride): (*const u8, usize),
    last: usize,
) -> avx512::Tile {
    let kb = p.scales.as_ref().map(|s| at.k0 / s.block_k);
    avx512::Tile {
        kc: at.k1 - at.k0,
        a: x[at.r0 * p.k + at.k0..].as_ptr(),
        lda: p.k,
        b,
        panel_stride,
        // SAFETY: (r0, q * NR) is inside the output (the caller's contract).
        c: unsafe { c.add(at.r0 * p.n + at.q * NR) },
        ldc: p.n,
        last_cols: p.cols_of(last),
        scale: p
            .scales
            .as_ref()
            .zip(kb)
            .map(|(s, kb)| (s.get(at.q, kb).as_ptr(), s.kblocks * NR)),
        first: at.first,
        fp4: fp4_scales(p, at.q, at.k0),
    }
}

/// The FP4 scales of panel `q` from column `k0` on (`None` for other formats).
#[cfg(target_arch = "x86_64")]
fn fp4_scales(p: &Packed, q: usize, k0: usize) -> Option<avx512::Fp4Scales> {
    let PanelData::Fp4 { scales, .. } = &p.data else {
        return None;
    };
    let group = k0 / crate::checkpoint::fp4::GROUP;
    let (ptr, e8m0) = scales.ptr(q, group);
    Some(avx512::Fp4Scales {
        scales: ptr,
        e8m0,
        panel_stride: scales.kblocks * NR,
        offset: k0 % crate::checkpoint::fp4::GROUP,
    })
}

#[cfg(target_arch = "x86_64")]
fn format_of(p: &Packed) -> avx512::Format {
    match p.data {
        PanelData::Bf16(_) => avx512::Format::Bf16,
        PanelData::Fp8(_) => avx512::Format::Fp8,
        PanelData::Fp4 { .. } => avx512::Format::Fp4,
    }
}

/// # Safety
/// `c` points to the `[m, p.n]` output; this call writes only `rows` × the columns of `panels`.
#[cfg(target_arch = "x86_64")]
pub(super) unsafe fn task_avx512(
    p: &Packed,
    x: &[f32],
    c: *mut f32,
    chunks: &[(usize, usize)],
    panels: std::ops::Range<usize>,
    rows: std::ops::Range<usize>,
) {
    let format = format_of(p);
    let widen_once = match &p.data {
        PanelData::Bf16(_) => false,
        PanelData::Fp8(_) => true,
        PanelData::Fp4 { bf16_exact, .. } => *bf16_exact,
    };
    if widen_once && rows.len() > 8 {
        // SAFETY: forwarded from the caller.
        unsafe { task_avx512_fp8_tall(p, x, c, chunks, panels, rows) };
        return;
    }
    for (ci, &(k0, k1)) in chunks.iter().enumerate() {
        let mut r0 = rows.start;
        while r0 < rows.end {
            let r = (rows.end - r0).min(8);
            let group = avx512::panels_for(r);
            let mut q = panels.start;
            while q < panels.end {
                let np = if panels.end - q >= group { group } else { 1 };
                let at = At {
                    k0,
                    k1,
                    r0,
                    q,
                    first: ci == 0,
                };
                let weights = (p.panel_bytes_from(q, k0).as_ptr(), p.k * p.row_bytes());
                // SAFETY: (r0, q * NR) is inside the output.
                let tile = unsafe { tile(p, x, c, at, weights, q + np - 1) };
                // SAFETY: AVX-512F was detected; the tile covers rows r0..r0+r, panels q..q+np,
                // k0..k1, all inside the operands.
                unsafe { avx512::run(r, np, format, &tile) };
                q += np;
            }
            r0 += r;
        }
    }
}

/// FP8 (or bf16-exact FP4) weights against more than one tile of rows: each panel chunk is
/// widened once into a bf16 scratch panel, which the bf16 tiles then read for every row tile (the
/// same bits as widening in the tiles, since every output is accumulated in the same order
/// whatever the tile shape).
///
/// # Safety
/// As [`task_avx512`].
#[cfg(target_arch = "x86_64")]
unsafe fn task_avx512_fp8_tall(
    p: &Packed,
    x: &[f32],
    c: *mut f32,
    chunks: &[(usize, usize)],
    panels: std::ops::Range<usize>,
    rows: std::ops::Range<usize>,
) {
    let mut scratch = vec![0u16; KC * NR];
    for (ci, &(k0, k1)) in chunks.iter().enumerate() {
        let kc = k1 - k0;
        for q in panels.clone() {
            let src = p.panel_bytes_from(q, k0).as_ptr();
            // SAFETY: AVX-512F/BW were detected; panel q has kc rows from k0 (with their FP4
            // scales), and the scratch holds KC >= kc rows.
            unsafe {
                match fp4_scales(p, q, k0) {
                    Some(s) => avx512::widen_fp4_panel(src, kc, &s, scratch.as_mut_ptr()),
                    None => avx512::widen_fp8_panel(src, kc, scratch.as_mut_ptr()),
                }
            };
            let mut r0 = rows.start;
            while r0 < rows.end {
                let r = (rows.end - r0).min(8);
                let at = At {
                    k0,
                    k1,
                    r0,
                    q,
                    first: ci == 0,
                };
                let weights = (scratch.as_ptr().cast(), kc * NR * 2);
                // SAFETY: (r0, q * NR) is inside the output.
                let mut tile = unsafe { tile(p, x, c, at, weights, q) };
                tile.fp4 = None; // the scratch holds scaled bf16 weights
                // SAFETY: AVX-512F was detected; the tile covers rows r0..r0+r of one panel
                // (the scratch) over kc columns, all inside the operands.
                unsafe { avx512::run(r, 1, avx512::Format::Bf16, &tile) };
                r0 += r;
            }
        }
    }
}

/// # Safety
/// As [`task_avx512`].
pub(super) unsafe fn task_portable(
    p: &Packed,
    x: &[f32],
    c: *mut f32,
    chunks: &[(usize, usize)],
    panels: std::ops::Range<usize>,
    rows: std::ops::Range<usize>,
) {
    let mut buf = vec![0.0f32; KC * NR];
    let nrows = rows.len();
    for q in panels {
        let cols = p.cols_of(q);
        for (ci, &(k0, k1)) in chunks.iter().enumerate() {
            let kc = k1 - k0;
            p.unpack(q, k0, kc, &mut buf);
            let lhs = MatRef::from_row_major_slice_with_stride(
                &x[rows.start * p.k + k0..(rows.end - 1) * p.k + k1],
                nrows,
                kc,
                p.k,
            );
            let rhs = MatRef::from_row_major_slice_with_stride(
                &buf[..(kc - 1) * NR + cols],
                kc,
                cols,
                NR,
            );
            // SAFETY: rows × [q*NR, q*NR+cols) lies inside the [m, n] output and belongs to this
            // task alone.
            let dst = unsafe {
                MatMut::from_raw_parts_mut(
                    c.add(rows.start * p.n + q * NR),
                    nrows,
                    cols,
                    p.n as isize,
                    1,
                )
            };
            let accum = if ci == 0 { Accum::Replace } else { Accum::Add };
            matmul(dst, accum, lhs, rhs, 1.0, Par::Seq);
        }
    }
}

//! Pre-packed weight panels for the GEMM micro-kernels: bf16, FP8 (e4m3fn) kept at one byte, or
//! FP4 (e2m1) kept at half a byte.
//!
//! A Linear weight `W[n, k]` (`y = x Wᵀ`) is cut into panels of [`NR`] = 32 output rows.
//! - bf16: panel `p` stores, for every `k`, its 32 values as 16 little-endian u32 lanes: lane `l`
//!   holds `W[32p + l, k]` in the low half and `W[32p + 16 + l, k]` in the high half. A 64-byte
//!   load then yields both halves as float32 vectors with one shift and one mask, no shuffles.
//! - FP8: panel `p` stores, for every `k`, its 32 bytes in column order (`W[32p + j, k]` at byte
//!   `j`). A 32-byte load widens to 32 halves (`e4m3 · 2^-8` exactly, see
//!   [`fp8::e4m3_to_f16_bits`]) and the hardware half → float conversion gives the two float32
//!   vectors of columns 0..16 and 16..32. Its block scales are stored times 2^8, so the product
//!   equals the bf16 path's bit for bit (scaling by a power of two is exact).
//! - FP4: panel `p` stores, for every `k`, 16 bytes: byte `j` holds column `j` in its low nibble
//!   and column `16 + j` in its high nibble, so the two nibble sets are the two float32 vectors.
//!   Its scales (one per row and 32 columns of k) multiply each widened weight before the FMA
//!   (see [`super::avx512`]), so it is not split into k chunks at its scale groups and gives the
//!   results of a bf16 panel holding `e2m1 · scale`, bit for bit. Scales that are all normal
//!   powers of two (every E8M0 checkpoint) are held as their exponent bytes: 0.53 bytes per
//!   weight in all, 0.27 of bf16; other float scales as float32 (0.625 bytes per weight).
//!
//! Rows past `n` are zero. Block-quantised weights carry a float32 scale per (panel lane, k block).

use rayon::prelude::*;

use crate::checkpoint::{fp4, fp8};

/// Output rows per panel.
pub const NR: usize = 32;

/// Lane position (u16 index inside a panel's k-row) of panel column `j`.
#[inline]
pub fn lane_of(j: usize) -> usize {
    if j < 16 { 2 * j } else { 2 * (j - 16) + 1 }
}

/// Expands a `[ceil(n/b0), ceil(k/b1)]` block-scale grid to one scale per (row, k block).
pub fn row_scales(grid: &[f32], n: usize, k: usize, block: [usize; 2]) -> Vec<f32> {
    let kblocks = fp8::blocks(k, block[1]);
    (0..n)
        .flat_map(|r| grid[(r / block[0]) * kblocks..][..kblocks].iter().copied())
        .collect()
}

/// Per-panel block scales of a block-quantised weight.
#[derive(Debug, Clone)]
pub struct PanelScales {
    /// Columns (k) per scale block.
    pub block_k: usize,
    /// Scale blocks along k.
    pub kblocks: usize,
    /// `[panels, kblocks, NR]`: the scale of each panel column in each k block.
    pub data: Vec<f32>,
}

impl PanelScales {
    /// The NR scales of panel `p` in k block `kb`.
    #[inline]
    pub fn get(&self, p: usize, kb: usize) -> &[f32] {
        &self.data[(p * self.kblocks + kb) * NR..][..NR]
    }
}

/// The scales of an FP4 weight, `[panels, kblocks, NR]`.
#[derive(Debug, Clone)]
pub enum Fp4ScaleData {
    /// E8M0 exponent bytes, `2^(b − 127)` with `b` in 1..=254 (one byte a scale): used when every
    /// scale is a normal power of two, which E8M0 checkpoints always give.
    Pow2(Vec<u8>),
    /// float32 scales (any other checkpoint scales).
    F32(Vec<f32>),
}

/// Per-panel scales of an FP4 weight: one per panel column and 32-wide k group.
#[derive(Debug, Clone)]
pub struct Fp4PanelScales {
    /// Scale groups along k.
    pub kblocks: usize,
    pub data: Fp4ScaleData,
}

impl Fp4PanelScales {
    /// From per-row scales `[n, k / 32]`: exponent bytes when they are all normal powers of two.
    fn new(rows: &[f32], n: usize, k: usize) -> Fp4PanelScales {
        let f = panel_scales(rows, n, k, fp4::GROUP, 1.0);
        let pow2 =
            |s: f32| s.to_bits() & 0x807F_FFFF == 0 && (1..=254).contains(&(s.to_bits() >> 23));
        let data = if rows.iter().all(|&s| pow2(s)) {
            // Columns past `n` (zero scales) hold zero nibbles; any scale does for them.
            Fp4ScaleData::Pow2(
                f.data
                    .iter()
                    .map(|&s| {
                        if s == 0.0 {
                            127
                        } else {
                            (s.to_bits() >> 23) as u8
                        }
                    })
                    .collect(),
            )
        } else {
            Fp4ScaleData::F32(f.data)
        };
        Fp4PanelScales {
            kblocks: f.kblocks,
            data,
        }
    }

    /// The scale of panel `p`'s column `j` in k group `kb`.
    #[inline]
    pub fn get(&self, p: usize, kb: usize, j: usize) -> f32 {
        let i = (p * self.kblocks + kb) * NR + j;
        match &self.data {
            Fp4ScaleData::Pow2(b) => f32::from_bits(u32::from(b[i]) << 23),
            Fp4ScaleData::F32(v) => v[i],
        }
    }

    /// Where panel `p`'s scales of group `kb` start, and whether they are exponent bytes.
    #[inline]
    pub fn ptr(&self, p: usize, kb: usize) -> (*const u8, bool) {
        let i = (p * self.kblocks + kb) * NR;
        match &self.data {
            Fp4ScaleData::Pow2(b) => (b[i..].as_ptr(), true),
            Fp4ScaleData::F32(v) => (v[i..].as_ptr().cast(), false),
        }
    }

    fn bytes(&self) -> usize {
        match &self.data {
            Fp4ScaleData::Pow2(b) => b.len(),
            Fp4ScaleData::F32(v) => v.len() * 4,
        }
    }
}

/// The panel values, in the layout of their format (see the module header).
#[derive(Debug, Clone)]
pub enum PanelData {
    /// `[panels, k, NR]` bf16 bits in lane order.
    Bf16(Vec<u16>),
    /// `[panels, k, NR]` e4m3fn bytes in column order.
    Fp8(Vec<u8>),
    /// `[panels, k, NR / 2]` e2m1 nibble pairs (column `j` low, `16 + j` high), with the scale
    /// of each panel column in each 32-wide k group. `bf16_exact`: every `e2m1 · scale` is a
    /// bf16 value (true for E8M0 scales), so a panel chunk may be widened once into bf16.
    Fp4 {
        nibbles: Vec<u8>,
        scales: Box<Fp4PanelScales>,
        bf16_exact: bool,
    },
}

/// A packed weight `[n, k]`.
#[derive(Debug, Clone)]
pub struct Packed {
    pub n: usize,
    pub k: usize,
    pub panels: usize,
    pub data: PanelData,
    pub scales: Option<PanelScales>,
}

/// Lays `w[n, k]` (row-major) out as `[panels, k, NR]`, column `j` of a panel at `slot(j)`.
fn panelize<T: Copy + Default + Send + Sync>(
    w: &[T],
    n: usize,
    k: usize,
    slot: fn(usize) -> usize,
) -> Vec<T> {
    assert_eq!(w.len(), n * k, "packed weight size");
    let panels = n.div_ceil(NR);
    let mut data = vec![T::default(); panels * k * NR];
    if k > 0 {
        data.par_chunks_mut(k * NR)
            .enumerate()
            .for_each(|(p, panel)| {
                for j in 0..NR.min(n - p * NR) {
                    let row = &w[(p * NR + j) * k..][..k];
                    let lane = slot(j);
                    for (kk, &v) in row.iter().enumerate() {
                        panel[kk * NR + lane] = v;
                    }
                }
            });
    }
    data
}

/// Per-panel scales from per-row block scales (`[n, ceil(k/block_k)]`), each times `factor`.
fn panel_scales(rows: &[f32], n: usize, k: usize, block_k: usize, factor: f32) -> PanelScales {
    let panels = n.div_ceil(NR);
    let kblocks = fp8::blocks(k, block_k);
    assert_eq!(rows.len(), n * kblocks, "row scales size");
    let mut data = vec![0.0f32; panels * kblocks * NR];
    for p in 0..panels {
        for kb in 0..kblocks {
            for j in 0..NR.min(n - p * NR) {
                data[(p * kblocks + kb) * NR + j] = rows[(p * NR + j) * kblocks + kb] * factor;
            }
        }
    }
    PanelScales {
        block_k,
        kblocks,
        data,
    }
}

impl Packed {
    /// Packs row-major bf16 bits `w[n, k]`; `scales` are per-row block scales
    /// (`[n, ceil(k/block_k)]`, `block_k`) of a block-quantised weight.
    pub fn new(w: &[u16], n: usize, k: usize, scales: Option<(&[f32], usize)>) -> Packed {
        Packed {
            n,
            k,
            panels: n.div_ceil(NR),
            data: PanelData::Bf16(panelize(w, n, k, lane_of)),
            scales: scales.map(|(rows, block_k)| panel_scales(rows, n, k, block_k, 1.0)),
        }
    }

    /// Packs row-major e4m3fn bytes `w[n, k]` (no NaN byte) with their per-row block scales
    /// (`[n, ceil(k/block_k)]`).
    pub fn fp8(w: &[u8], n: usize, k: usize, row_scales: &[f32], block_k: usize) -> Packed {
        debug_assert!(!w.iter().any(|&b| fp8::is_nan(b)), "NaN in an FP8 weight");
        Packed {
            n,
            k,
            panels: n.div_ceil(NR),
            data: PanelData::Fp8(panelize(w, n, k, |j| j)),
            scales: Some(panel_scales(
                row_scales,
                n,
                k,
                block_k,
                fp8::F16_SHIFT_SCALE,
            )),
        }
    }

    /// Packs row-major int8-packed e2m1 `w[n, k / 2]` (low nibble = even column; `k` a multiple
    /// of 32) with its float32 scales `[n, k / 32]`.
    pub fn fp4(w: &[u8], n: usize, k: usize, scales: &[f32]) -> Packed {
        assert!(
            k.is_multiple_of(fp4::GROUP),
            "FP4 k must be a multiple of 32"
        );
        assert_eq!(w.len(), n * k / 2, "packed FP4 weight size");
        let panels = n.div_ceil(NR);
        let mut nibbles = vec![0u8; panels * k * NR / 2];
        if k > 0 {
            nibbles
                .par_chunks_mut(k * NR / 2)
                .enumerate()
                .for_each(|(p, panel)| {
                    for j in 0..NR.min(n - p * NR) {
                        let row = &w[(p * NR + j) * k / 2..][..k / 2];
                        let shift = 4 * (j / 16);
                        for kk in 0..k {
                            panel[kk * NR / 2 + j % 16] |= fp4::nibble(row, kk) << shift;
                        }
                    }
                });
        }
        let bf16_exact = scales.iter().all(|&s| {
            fp4::E2M1.iter().all(|&v| {
                let x = v * s;
                half::bf16::from_f32(x).to_f32().to_bits() == x.to_bits()
            })
        });
        Packed {
            n,
            k,
            panels,
            data: PanelData::Fp4 {
                nibbles,
                scales: Box::new(Fp4PanelScales::new(scales, n, k)),
                bf16_exact,
            },
            scales: None,
        }
    }

    /// Bytes per panel k-row (`NR` values).
    #[inline]
    pub fn row_bytes(&self) -> usize {
        match self.data {
            PanelData::Bf16(_) => NR * 2,
            PanelData::Fp8(_) => NR,
            PanelData::Fp4 { .. } => NR / 2,
        }
    }

    /// Panel `p`'s data from `k0` on, as bytes.
    #[inline]
    pub fn panel_bytes_from(&self, p: usize, k0: usize) -> &[u8] {
        let (start, end) = ((p * self.k + k0) * NR, (p + 1) * self.k * NR);
        match &self.data {
            PanelData::Bf16(d) => bytemuck::cast_slice(&d[start..end]),
            PanelData::Fp8(d) => &d[start..end],
            PanelData::Fp4 { nibbles, .. } => &nibbles[start / 2..end / 2],
        }
    }

    /// Valid columns of panel `p`.
    #[inline]
    pub fn cols_of(&self, p: usize) -> usize {
        NR.min(self.n - p * NR)
    }

    /// Unpacks panel `p`, k range `[k0, k0 + kc)`, into `out[kc, NR]` float32 (scales applied).
    pub fn unpack(&self, p: usize, k0: usize, kc: usize, out: &mut [f32]) {
        let scale = self.scales.as_ref().map(|s| s.get(p, k0 / s.block_k));
        let start = (p * self.k + k0) * NR;
        for kk in 0..kc {
            let dst = &mut out[kk * NR..][..NR];
            match &self.data {
                PanelData::Bf16(d) => {
                    let row = &d[start + kk * NR..][..NR];
                    for j in 0..NR {
                        let v = f32::from_bits(u32::from(row[lane_of(j)]) << 16);
                        dst[j] = scale.map_or(v, |s| v * s[j]);
                    }
                }
                PanelData::Fp8(d) => {
                    let row = &d[start + kk * NR..][..NR];
                    let s = scale.expect("FP8 panels are scaled");
                    for j in 0..NR {
                        let v = half::f16::from_bits(fp8::e4m3_to_f16_bits(row[j])).to_f32();
                        dst[j] = v * s[j];
                    }
                }
                PanelData::Fp4 {
                    nibbles, scales, ..
                } => {
                    let row = &nibbles[(start + kk * NR) / 2..][..NR / 2];
                    let kb = (k0 + kk) / fp4::GROUP;
                    for j in 0..NR {
                        let nib = (row[j % 16] >> (4 * (j / 16))) & 0x0F;
                        dst[j] = fp4::E2M1[nib as usize] * scales.get(p, kb, j);
                    }
                }
            }
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        let values = match &self.data {
            PanelData::Bf16(d) => d.len() * 2,
            PanelData::Fp8(d) => d.len(),
            PanelData::Fp4 {
                nibbles, scales, ..
            } => nibbles.len() + scales.bytes(),
        };
        values + self.scales.as_ref().map_or(0, |s| s.data.len() * 4)
    }
}

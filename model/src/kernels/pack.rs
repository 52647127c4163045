//! Pre-packed bf16 weight panels for the GEMM micro-kernels.
//!
//! A Linear weight `W[n, k]` (`y = x Wᵀ`) is cut into panels of [`NR`] = 32 output rows. Panel
//! `p` stores, for every `k`, its 32 values as 16 little-endian u32 lanes: lane `l` holds
//! `W[32p + l, k]` in the low half and `W[32p + 16 + l, k]` in the high half. A 64-byte load
//! then yields both halves as float32 vectors with one shift and one mask, no shuffles. Rows past
//! `n` are zero. FP8 weights carry a float32 scale per (panel lane, k block).

use rayon::prelude::*;

use crate::checkpoint::fp8;

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

/// A packed bf16 weight `[n, k]`.
#[derive(Debug, Clone)]
pub struct Packed {
    pub n: usize,
    pub k: usize,
    pub panels: usize,
    /// `[panels, k, NR]` bf16 bits in lane order.
    pub data: Vec<u16>,
    pub scales: Option<PanelScales>,
}

impl Packed {
    /// Packs row-major bf16 bits `w[n, k]`; `scales` are per-row block scales
    /// (`[n, ceil(k/block_k)]`, `block_k`) of a block-quantised weight.
    pub fn new(w: &[u16], n: usize, k: usize, scales: Option<(&[f32], usize)>) -> Packed {
        assert_eq!(w.len(), n * k, "packed weight size");
        let panels = n.div_ceil(NR);
        let mut data = vec![0u16; panels * k * NR];
        if k > 0 {
            data.par_chunks_mut(k * NR)
                .enumerate()
                .for_each(|(p, panel)| {
                    for j in 0..NR.min(n - p * NR) {
                        let row = &w[(p * NR + j) * k..][..k];
                        let lane = lane_of(j);
                        for (kk, &v) in row.iter().enumerate() {
                            panel[kk * NR + lane] = v;
                        }
                    }
                });
        }
        let scales = scales.map(|(rows, block_k)| {
            let kblocks = fp8::blocks(k, block_k);
            assert_eq!(rows.len(), n * kblocks, "row scales size");
            let mut data = vec![0.0f32; panels * kblocks * NR];
            for p in 0..panels {
                for kb in 0..kblocks {
                    for j in 0..NR.min(n - p * NR) {
                        data[(p * kblocks + kb) * NR + j] = rows[(p * NR + j) * kblocks + kb];
                    }
                }
            }
            PanelScales {
                block_k,
                kblocks,
                data,
            }
        });
        Packed {
            n,
            k,
            panels,
            data,
            scales,
        }
    }

    /// Panel `p`'s data from `k0` on.
    #[inline]
    pub fn panel_from(&self, p: usize, k0: usize) -> &[u16] {
        &self.data[(p * self.k + k0) * NR..(p + 1) * self.k * NR]
    }

    /// Valid columns of panel `p`.
    #[inline]
    pub fn cols_of(&self, p: usize) -> usize {
        NR.min(self.n - p * NR)
    }

    /// Unpacks panel `p`, k range `[k0, k0 + kc)`, into `out[kc, NR]` float32 (scales applied).
    pub fn unpack(&self, p: usize, k0: usize, kc: usize, out: &mut [f32]) {
        let src = self.panel_from(p, k0);
        let scale = self.scales.as_ref().map(|s| s.get(p, k0 / s.block_k));
        for kk in 0..kc {
            let row = &src[kk * NR..][..NR];
            let dst = &mut out[kk * NR..][..NR];
            for j in 0..NR {
                let v = f32::from_bits(u32::from(row[lane_of(j)]) << 16);
                dst[j] = scale.map_or(v, |s| v * s[j]);
            }
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.data.len() * 2 + self.scales.as_ref().map_or(0, |s| s.data.len() * 4)
    }
}

//! `Linear`: a weight matrix `W[out, in]` and `y = x Wᵀ` over a batch of rows.
//!
//! float32 weights go through `faer`. bf16, FP8 (e4m3fn bytes with block scales, one byte per
//! weight in memory) and FP4 (e2m1 nibbles with per-32-column scales, half a byte per weight)
//! weights are packed into panels at load and multiplied by the AVX-512
//! micro-kernels when the CPU has them, otherwise by unpacking panel chunks to float32 and
//! calling `faer` (the portable path; also selectable with
//! `MOE_KERNEL=portable` or [`set_kernel_choice`] to test it). Work is split over rayon tasks by
//! panels and, for tall inputs, by rows.
#![allow(unsafe_code)]

use std::sync::atomic::{AtomicU8, Ordering};

use faer::linalg::matmul::matmul;
use faer::{Accum, MatMut, MatRef, Par};
use rayon::prelude::*;

use super::pack::Packed;
use crate::checkpoint::WeightData;

/// k columns per cache block.
pub(super) const KC: usize = 256;
/// Multiply-adds below which a product runs on one thread.
const PAR_MIN_MACS: usize = 1 << 16;

/// Which packed-bf16 kernel runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelChoice {
    /// AVX-512 when the CPU has it, else portable; `MOE_KERNEL=portable` forces portable.
    Auto,
    /// AVX-512 micro-kernels.
    Avx512,
    /// Unpack to float32 and use `faer`.
    Portable,
}

static CHOICE: AtomicU8 = AtomicU8::new(0);

/// Overrides the kernel for the whole process (tests use it to exercise the portable path).
pub fn set_kernel_choice(choice: KernelChoice) {
    CHOICE.store(
        match choice {
            KernelChoice::Auto => 0,
            KernelChoice::Avx512 => 1,
            KernelChoice::Portable => 2,
        },
        Ordering::Relaxed,
    );
}

fn avx512_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        super::avx512::available()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The kernel that will run: `Avx512` or `Portable`.
pub fn kernel_choice() -> KernelChoice {
    let avx = avx512_available();
    match CHOICE.load(Ordering::Relaxed) {
        1 if avx => KernelChoice::Avx512,
        2 => KernelChoice::Portable,
        0 if avx && std::env::var("MOE_KERNEL").as_deref() != Ok("portable") => {
            KernelChoice::Avx512
        }
        _ => KernelChoice::Portable,
    }
}

/// One task of a grouped GEMM over a packed weight (see [`super::tasks`]): the weight, the
/// input, the output, its k chunks, and the panels × rows it covers.
type PackedTask = unsafe fn(
    &Packed,
    &[f32],
    *mut f32,
    &[(usize, usize)],
    std::ops::Range<usize>,
    std::ops::Range<usize>,
);

/// The packed-weight driver `choice` runs on this CPU, and whether a lone row gets from it bit
/// for bit what it gets inside a batch: the AVX-512 and AVX2 drivers do; `faer`'s
/// matrix-vector path (the portable driver on CPUs with neither) does not.
fn packed_task(choice: KernelChoice) -> (PackedTask, bool) {
    let avx512 = match choice {
        KernelChoice::Auto => kernel_choice() == KernelChoice::Avx512,
        KernelChoice::Avx512 => avx512_available(),
        KernelChoice::Portable => false,
    };
    #[cfg(target_arch = "x86_64")]
    {
        if avx512 {
            return (super::tasks::task_avx512, true);
        }
        // Without AVX-512, packed panels still run in registers where AVX2 + FMA + F16C exist.
        if super::avx2::available() {
            return (super::avx2::task, true);
        }
    }
    let _ = avx512; // read only on x86-64
    (super::tasks::task_portable, false)
}

/// Whether packed (bf16, FP8, FP4) products under `choice` give a lone row bit for bit what it
/// gets inside a batch (see [`packed_task`]).
pub fn packed_rows_exact(choice: KernelChoice) -> bool {
    packed_task(choice).1
}

#[derive(Debug, Clone)]
enum Repr {
    F32(Vec<f32>),
    Packed(Packed),
}

/// A weight `W[out, in]` ready for `y = x Wᵀ`.
#[derive(Debug, Clone)]
pub struct Linear {
    out: usize,
    inp: usize,
    repr: Repr,
}

#[derive(Clone, Copy)]
struct SendPtr<T>(*mut T);
// SAFETY: tasks write disjoint regions of the output (distinct panels × distinct row ranges).
unsafe impl<T> Send for SendPtr<T> {}
// SAFETY: as above.
unsafe impl<T> Sync for SendPtr<T> {}

impl Linear {
    /// Builds a Linear from checkpoint data of shape `[out, inp]`.
    pub fn new(data: WeightData, out: usize, inp: usize) -> Linear {
        let repr = match data {
            WeightData::F32(w) => {
                assert_eq!(w.len(), out * inp, "linear weight size");
                Repr::F32(w)
            }
            WeightData::Bf16(w) => Repr::Packed(Packed::new(&w, out, inp, None)),
            WeightData::Fp8 {
                values,
                scales,
                block,
            } => {
                let rows = super::pack::row_scales(&scales, out, inp, block);
                Repr::Packed(Packed::fp8(&values, out, inp, &rows, block[1]))
            }
            WeightData::Fp8RowScaled {
                values,
                row_scales,
                block_k,
            } => Repr::Packed(Packed::fp8(&values, out, inp, &row_scales, block_k)),
            WeightData::Fp4 { values, scales } => {
                Repr::Packed(Packed::fp4(&values, out, inp, &scales))
            }
        };
        Linear { out, inp, repr }
    }

    /// Output features.
    pub fn out_features(&self) -> usize {
        self.out
    }

    /// Input features.
    pub fn in_features(&self) -> usize {
        self.inp
    }

    /// Bytes of weight data held.
    pub fn bytes(&self) -> usize {
        match &self.repr {
            Repr::F32(w) => w.len() * 4,
            Repr::Packed(p) => p.bytes(),
        }
    }

    /// `x[m, in] Wᵀ` as a new `[m, out]` buffer.
    pub fn forward(&self, x: &[f32], m: usize) -> Vec<f32> {
        let mut y = vec![0.0; m * self.out];
        self.forward_into(x, m, &mut y);
        y
    }

    /// `y[m, out] = x[m, in] Wᵀ`.
    pub fn forward_into(&self, x: &[f32], m: usize, y: &mut [f32]) {
        self.forward_with(x, m, y, KernelChoice::Auto);
    }

    /// [`Linear::forward_into`] with an explicit kernel (`Auto` means the process default).
    pub fn forward_with(&self, x: &[f32], m: usize, y: &mut [f32], choice: KernelChoice) {
        if self.inp == 0 {
            y.fill(0.0);
            return;
        }
        forward_grouped_with(&mut [GemmJob { w: self, x, m, y }], choice);
    }
}

/// k chunks: at most KC wide and never crossing a scale block.
fn k_chunks(p: &Packed) -> Vec<(usize, usize)> {
    let block = p.scales.as_ref().map_or(usize::MAX, |s| s.block_k);
    let mut out = Vec::new();
    let mut k0 = 0;
    while k0 < p.k {
        let block_end = if block == usize::MAX {
            p.k
        } else {
            (k0 / block + 1) * block
        };
        let k1 = (k0 + KC).min(p.k).min(block_end);
        out.push((k0, k1));
        k0 = k1;
    }
    out
}

/// One product of a grouped call: `y[m, out] = x[m, in] · wᵀ`.
#[derive(Debug)]
pub struct GemmJob<'a> {
    pub w: &'a Linear,
    pub x: &'a [f32],
    pub m: usize,
    pub y: &'a mut [f32],
}

/// Multiply-adds per task: enough to amortise scheduling and let the hardware prefetcher ramp up
/// (256 KiB of bf16 weights at one row; 2^16 and 2^18 measured within noise of it).
const TASK_MACS: usize = 1 << 17;

struct Task {
    job: usize,
    panels: std::ops::Range<usize>,
    rows: std::ops::Range<usize>,
}

/// Runs several independent products as one parallel job: every product is cut into tasks of
/// panels × rows and all tasks share the thread pool, so many small products (the experts of a
/// layer, the heads of an attention) keep every core streaming weights with one join at the end.
pub fn forward_grouped(jobs: &mut [GemmJob<'_>]) {
    forward_grouped_with(jobs, kernel_choice());
}

/// `(w, x, rows)` products as one grouped GEMM, each into a new buffer.
pub fn products(items: &[(&Linear, &[f32], usize)]) -> Vec<Vec<f32>> {
    let mut outs: Vec<Vec<f32>> = items.iter().map(|(w, _, m)| vec![0.0; m * w.out]).collect();
    let mut jobs: Vec<GemmJob<'_>> = items
        .iter()
        .zip(outs.iter_mut())
        .map(|(&(w, x, m), y)| GemmJob { w, x, m, y })
        .collect();
    forward_grouped(&mut jobs);
    drop(jobs);
    outs
}

/// [`forward_grouped`] with an explicit kernel.
pub fn forward_grouped_with(jobs: &mut [GemmJob<'_>], choice: KernelChoice) {
    let (packed, _) = packed_task(choice);
    let threads = rayon::current_num_threads();
    let mut tasks = Vec::new();
    let mut outs = Vec::with_capacity(jobs.len());
    let mut specs = Vec::with_capacity(jobs.len());
    let mut chunks = Vec::with_capacity(jobs.len());
    for (j, job) in jobs.iter_mut().enumerate() {
        let w = job.w;
        assert_eq!(job.x.len(), job.m * w.inp, "linear input size");
        assert_eq!(job.y.len(), job.m * w.out, "linear output size");
        outs.push(SendPtr(job.y.as_mut_ptr()));
        specs.push((w, job.x, job.m));
        chunks.push(match &w.repr {
            Repr::Packed(p) => k_chunks(p),
            Repr::F32(_) => Vec::new(),
        });
        if job.m == 0 || w.out == 0 {
            continue;
        }
        match &w.repr {
            Repr::F32(_) => tasks.push(Task {
                job: j,
                panels: 0..0,
                rows: 0..job.m,
            }),
            Repr::Packed(p) => {
                let macs = job.m * p.n * p.k;
                let target = (macs / TASK_MACS).clamp(1, threads * 8);
                let p_parts = target.min(p.panels);
                let m_parts = (target / p_parts).min(job.m.div_ceil(8)).max(1);
                for mi in 0..m_parts {
                    for pi in 0..p_parts {
                        tasks.push(Task {
                            job: j,
                            panels: split(p.panels, p_parts, pi),
                            rows: split_aligned(job.m, m_parts, mi, 8),
                        });
                    }
                }
            }
        }
    }
    let run = |t: &Task| {
        let (lin, x, m) = specs[t.job];
        let out = outs[t.job];
        match &lin.repr {
            Repr::F32(w) => {
                // SAFETY: this task is the only one writing job t.job's output, which is
                // `m * out` floats long (checked above).
                let y = unsafe { std::slice::from_raw_parts_mut(out.0, m * lin.out) };
                gemm_f32(w, x, m, lin.inp, lin.out, y);
            }
            Repr::Packed(p) => {
                if t.panels.is_empty() || t.rows.is_empty() || p.k == 0 {
                    return;
                }
                // SAFETY: tasks of a job own disjoint (rows × panels) blocks of its output, and
                // `packed_task` picked a driver this CPU runs.
                unsafe {
                    packed(
                        p,
                        x,
                        out.0,
                        &chunks[t.job],
                        t.panels.clone(),
                        t.rows.clone(),
                    )
                };
            }
        }
    };
    if tasks.len() == 1 {
        run(&tasks[0]);
    } else {
        tasks.par_iter().for_each(run);
    }
}

fn gemm_f32(w: &[f32], x: &[f32], m: usize, inp: usize, out: usize, y: &mut [f32]) {
    let macs = m * out * inp;
    let par = if macs >= PAR_MIN_MACS * 4 {
        Par::rayon(0)
    } else {
        Par::Seq
    };
    let lhs = MatRef::from_row_major_slice(x, m, inp);
    let rhs = MatRef::from_column_major_slice(w, inp, out);
    matmul(
        MatMut::from_row_major_slice_mut(y, m, out),
        Accum::Replace,
        lhs,
        rhs,
        1.0,
        par,
    );
}

/// Part `i` of `0..len` split into `parts` near-equal ranges.
fn split(len: usize, parts: usize, i: usize) -> std::ops::Range<usize> {
    (len * i / parts)..(len * (i + 1) / parts)
}

/// Like [`split`], with boundaries on multiples of `align`.
fn split_aligned(len: usize, parts: usize, i: usize, align: usize) -> std::ops::Range<usize> {
    let blocks = len.div_ceil(align);
    let r = split(blocks, parts, i);
    (r.start * align).min(len)..(r.end * align).min(len)
}

#[cfg(test)]
mod tests {
    use super::super::pack::NR;
    use super::*;
    use crate::checkpoint::fp8;

    fn reference(w: &[f32], x: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
        let mut y = vec![0.0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                y[i * n + j] = (0..k)
                    .map(|t| f64::from(x[i * k + t]) * f64::from(w[j * k + t]))
                    .sum::<f64>() as f32;
            }
        }
        y
    }

    fn bf16_weights(n: usize, k: usize, seed: f32) -> (Vec<u16>, Vec<f32>) {
        let bits: Vec<u16> = (0..n * k)
            .map(|i| half::bf16::from_f32(((i as f32 + seed) * 0.731).sin()).to_bits())
            .collect();
        let vals = bits
            .iter()
            .map(|&b| half::bf16::from_bits(b).to_f32())
            .collect();
        (bits, vals)
    }

    fn check(choice: KernelChoice) {
        // Shapes with partial panels, partial k chunks, row tails, several tasks.
        for &(m, n, k) in &[
            (1, 1, 1),
            (1, 33, 70),
            (2, 100, 300),
            (3, 64, 257),
            (7, 96, 512),
            (13, 130, 40),
            (37, 65, 600),
        ] {
            let (bits, vals) = bf16_weights(n, k, m as f32);
            let x: Vec<f32> = (0..m * k)
                .map(|i| ((i * 7 % 13) as f32 - 6.0) * 0.1)
                .collect();
            let lin = Linear::new(WeightData::Bf16(bits), n, k);
            let mut y = vec![0.0; m * n];
            lin.forward_with(&x, m, &mut y, choice);
            let r = reference(&vals, &x, m, n, k);
            let err = y
                .iter()
                .zip(&r)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f32::max);
            assert!(err < 1e-4, "{choice:?} m={m} n={n} k={k}: {err}");
        }
    }

    #[test]
    fn packed_kernels_match_the_reference() {
        check(KernelChoice::Portable);
        if kernel_choice() == KernelChoice::Avx512 {
            check(KernelChoice::Avx512);
        }
    }

    /// FP8 bytes covering every finite e4m3 value (both signs, subnormals, the largest), no NaN.
    fn fp8_bytes(n: usize, k: usize) -> Vec<u8> {
        (0..n * k)
            .map(|i| (i * 37 % 251) as u8)
            .map(|b| if fp8::is_nan(b) { b & 0xF0 } else { b })
            .collect()
    }

    #[test]
    fn block_scaled_weights_apply_each_blocks_scale() {
        // 70×300 with 32×128 blocks: partial blocks in both directions, chunks split at 128.
        let (n, k, block) = (70, 300, [32, 128]);
        let bytes = fp8_bytes(n, k);
        let grid = [fp8::blocks(n, block[0]), fp8::blocks(k, block[1])];
        let scales: Vec<f32> = (0..grid[0] * grid[1])
            .map(|i| 0.01 * (i + 1) as f32)
            .collect();
        let dense = fp8::dequantize_block_fp8(&bytes, n, k, &scales, block);
        let lin = Linear::new(
            WeightData::Fp8 {
                values: bytes,
                scales,
                block,
            },
            n,
            k,
        );
        assert_eq!(
            lin.bytes(),
            3 * NR * k + 3 * 3 * NR * 4,
            "one byte per weight"
        );
        for m in [1, 5, 9] {
            let x: Vec<f32> = (0..m * k).map(|i| ((i % 17) as f32 - 8.0) * 0.05).collect();
            let r = reference(&dense, &x, m, n, k);
            for choice in [KernelChoice::Portable, KernelChoice::Auto] {
                let mut y = vec![0.0; m * n];
                lin.forward_with(&x, m, &mut y, choice);
                let err = y
                    .iter()
                    .zip(&r)
                    .map(|(a, b)| (a - b).abs() / (1.0 + b.abs()))
                    .fold(0.0, f32::max);
                assert!(err < 1e-5, "{choice:?} m={m}: {err}");
            }
        }
    }

    #[test]
    fn fp8_panels_equal_their_bf16_images_bit_for_bit() {
        // The FP8 kernels widen in registers; the same bytes as exact bf16 images with the same
        // scales (how FP8 weights were held before) must give identical outputs on both paths.
        let (n, k, block_k) = (100, 520, 128);
        let bytes = fp8_bytes(n, k);
        let rows: Vec<f32> = (0..n * fp8::blocks(k, block_k))
            .map(|i| 1e-3 * (1 + i % 23) as f32)
            .collect();
        let fp8_lin = Linear::new(
            WeightData::Fp8RowScaled {
                values: bytes.clone(),
                row_scales: rows.clone(),
                block_k,
            },
            n,
            k,
        );
        let images: Vec<u16> = bytes
            .iter()
            .map(|&b| half::bf16::from_f32(fp8::e4m3_to_f32(b)).to_bits())
            .collect();
        let bf16_lin = Linear {
            out: n,
            inp: k,
            repr: Repr::Packed(Packed::new(&images, n, k, Some((&rows, block_k)))),
        };
        assert_eq!(
            bf16_lin.bytes() - fp8_lin.bytes(),
            4 * NR * k,
            "half the value bytes"
        );
        let mut choices = vec![KernelChoice::Portable];
        if kernel_choice() == KernelChoice::Avx512 {
            choices.push(KernelChoice::Avx512);
        }
        for m in [1, 2, 3, 4, 8, 13, 40] {
            let x: Vec<f32> = (0..m * k)
                .map(|i| ((i * 29 % 101) as f32 - 50.0) * 0.013)
                .collect();
            for &choice in &choices {
                let (mut a, mut b) = (vec![0.0; m * n], vec![0.0; m * n]);
                fp8_lin.forward_with(&x, m, &mut a, choice);
                bf16_lin.forward_with(&x, m, &mut b, choice);
                let a: Vec<u32> = a.iter().map(|v| v.to_bits()).collect();
                let b: Vec<u32> = b.iter().map(|v| v.to_bits()).collect();
                assert_eq!(a, b, "{choice:?} m={m}");
            }
        }
    }

    #[test]
    fn rows_do_not_depend_on_the_batch() {
        let (n, k) = (200, 700);
        let (bits, _) = bf16_weights(n, k, 0.5);
        let lin = Linear::new(WeightData::Bf16(bits), n, k);
        let x: Vec<f32> = (0..40 * k)
            .map(|i| ((i * 31 % 97) as f32 - 48.0) * 0.01)
            .collect();
        let all = lin.forward(&x, 40);
        // faer (the portable kernel without AVX2) multiplies a lone row by its matrix-vector
        // path, whose summation order differs: there one row matches only to within rounding.
        let exact_single = packed_rows_exact(KernelChoice::Auto);
        for (m0, m) in [(0, 1), (3, 2), (5, 3), (11, 8), (20, 20)] {
            let part = lin.forward(&x[m0 * k..(m0 + m) * k], m);
            let want = &all[m0 * n..(m0 + m) * n];
            if m > 1 || exact_single {
                assert_eq!(part, want, "rows {m0}..{}", m0 + m);
            } else {
                for (a, b) in part.iter().zip(want) {
                    assert!(
                        (a - b).abs() <= 1e-5 * (1.0 + b.abs()),
                        "row {m0}: {a} vs {b}"
                    );
                }
            }
        }
    }

    #[test]
    fn f32_weights_use_faer() {
        let (m, n, k) = (9, 50, 33);
        let w: Vec<f32> = (0..n * k).map(|i| (i as f32 * 0.37).cos()).collect();
        let x: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.11).sin()).collect();
        let y = Linear::new(WeightData::F32(w.clone()), n, k).forward(&x, m);
        let r = reference(&w, &x, m, n, k);
        assert!(y.iter().zip(&r).all(|(a, b)| (a - b).abs() < 1e-4));
    }
}

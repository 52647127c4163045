//! Activation × activation products (attention scores and values) through `faer`.
//!
//! Operands are row-major views with explicit row strides, so that slices of the latent KV cache
//! (`[c_kv | k_pe]` rows) are used in place.

use faer::linalg::matmul::matmul;
use faer::{Accum, MatMut, MatRef, Par};

fn par_for(flops: usize) -> Par {
    if flops >= 1 << 21 && rayon::current_num_threads() > 1 {
        Par::rayon(0)
    } else {
        Par::Seq
    }
}

/// A row-major `[rows, cols]` view with row stride `ld` (the last row may be short of `ld`).
fn view(data: &[f32], rows: usize, cols: usize, ld: usize) -> MatRef<'_, f32> {
    let len = if rows == 0 { 0 } else { (rows - 1) * ld + cols };
    MatRef::from_row_major_slice_with_stride(&data[..len], rows, cols, ld)
}

fn view_mut(data: &mut [f32], rows: usize, cols: usize, ld: usize) -> MatMut<'_, f32> {
    let len = if rows == 0 { 0 } else { (rows - 1) * ld + cols };
    // Not `from_row_major_slice_with_stride_mut`: in faer 0.24.4 it builds a column-major view
    // (row stride 1, column stride `ld`) and writes out of bounds.
    MatMut::from_column_major_slice_with_stride_mut(&mut data[..len], cols, rows, ld)
        .transpose_mut()
}

/// `c[m, n] = alpha * a[m, k] · b[n, k]ᵀ` (row strides `lda`, `ldb`, `ldc`).
#[allow(clippy::too_many_arguments)]
pub fn matmul_nt(
    c: &mut [f32],
    ldc: usize,
    a: &[f32],
    lda: usize,
    b: &[f32],
    ldb: usize,
    (m, n, k): (usize, usize, usize),
    alpha: f32,
) {
    matmul_nt_with(c, ldc, a, lda, b, ldb, (m, n, k), alpha, par_for(m * n * k));
}

/// [`matmul_nt`] with an explicit `faer` parallelism (`Par::Seq` for callers that parallelise
/// over products themselves).
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul_nt_with(
    c: &mut [f32],
    ldc: usize,
    a: &[f32],
    lda: usize,
    b: &[f32],
    ldb: usize,
    (m, n, k): (usize, usize, usize),
    alpha: f32,
    par: Par,
) {
    if m == 0 || n == 0 {
        return;
    }
    let dst = view_mut(c, m, n, ldc);
    matmul(
        dst,
        Accum::Replace,
        view(a, m, k, lda),
        view(b, n, k, ldb).transpose(),
        alpha,
        par,
    );
}

/// `c[m, n] = a[m, k] · b[k, n]` (row strides `lda`, `ldb`, `ldc`).
#[allow(clippy::too_many_arguments)]
pub fn matmul_nn(
    c: &mut [f32],
    ldc: usize,
    a: &[f32],
    lda: usize,
    b: &[f32],
    ldb: usize,
    dims: (usize, usize, usize),
) {
    matmul_nn_acc(c, ldc, a, lda, b, ldb, dims, false);
}

/// `c[m, n] (+)= a[m, k] · b[k, n]`: adds to `c` when `accumulate`, else replaces it.
#[allow(clippy::too_many_arguments)]
pub fn matmul_nn_acc(
    c: &mut [f32],
    ldc: usize,
    a: &[f32],
    lda: usize,
    b: &[f32],
    ldb: usize,
    (m, n, k): (usize, usize, usize),
    accumulate: bool,
) {
    let par = par_for(m * n * k);
    matmul_nn_with(c, ldc, a, lda, b, ldb, (m, n, k), accumulate, par);
}

/// [`matmul_nn_acc`] with an explicit `faer` parallelism.
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul_nn_with(
    c: &mut [f32],
    ldc: usize,
    a: &[f32],
    lda: usize,
    b: &[f32],
    ldb: usize,
    (m, n, k): (usize, usize, usize),
    accumulate: bool,
    par: Par,
) {
    if m == 0 || n == 0 {
        return;
    }
    let dst = view_mut(c, m, n, ldc);
    matmul(
        dst,
        if accumulate {
            Accum::Add
        } else {
            Accum::Replace
        },
        view(a, m, k, lda),
        view(b, k, n, ldb),
        1.0,
        par,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strided_products_match_loops() {
        let (m, n, k) = (5, 7, 9);
        let a: Vec<f32> = (0..m * 11).map(|i| (i as f32 * 0.3).sin()).collect(); // lda 11
        let b: Vec<f32> = (0..n * 10).map(|i| (i as f32 * 0.7).cos()).collect(); // ldb 10
        let mut c = vec![0.0; m * n];
        matmul_nt(&mut c, n, &a, 11, &b, 10, (m, n, k), 0.5);
        for i in 0..m {
            for j in 0..n {
                let e: f32 = (0..k).map(|t| a[i * 11 + t] * b[j * 10 + t]).sum::<f32>() * 0.5;
                assert!((c[i * n + j] - e).abs() < 1e-5);
            }
        }
        let bk: Vec<f32> = (0..k * 8).map(|i| (i as f32 * 0.2).sin()).collect(); // [k, n] ld 8
        matmul_nn(&mut c, n, &a, 11, &bk, 8, (m, n, k));
        for i in 0..m {
            for j in 0..n {
                let e: f32 = (0..k).map(|t| a[i * 11 + t] * bk[t * 8 + j]).sum();
                assert!((c[i * n + j] - e).abs() < 1e-5);
            }
        }
    }
}

//! The property two-batch overlap relies on: a weight GEMM's output row depends only on its own
//! input row, not on which other rows are in the batch, for every kernel a forward pass can use
//! (the AVX-512 and AVX2 kernels exactly; the `faer` paths for products of two rows or more).

use moe_model::checkpoint::WeightData;
use moe_model::kernels::{KernelChoice, Linear, kernel_choice, packed_rows_exact};

fn input(m: usize, k: usize) -> Vec<f32> {
    (0..m * k)
        .map(|i| ((i * 31 % 97) as f32 - 48.0) * 0.0137)
        .collect()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Rows `m0..m0+m` of a 64-row product equal the product of those rows alone, bit for bit.
/// `exact_single_rows: false` skips one-row products: `faer` (float32 weights, the portable
/// kernel on CPUs without AVX2) multiplies a single row by its matrix-vector path, whose
/// summation order differs from its matrix path, so there a lone row is equal only to within
/// rounding.
fn check(lin: &Linear, choice: KernelChoice, what: &str, exact_single_rows: bool) {
    let (n, k) = (lin.out_features(), lin.in_features());
    let total = 64;
    let x = input(total, k);
    let mut all = vec![0.0; total * n];
    lin.forward_with(&x, total, &mut all, choice);
    for (m0, m) in [
        (0, 1),
        (3, 2),
        (5, 3),
        (9, 7),
        (11, 8),
        (20, 20),
        (32, 32),
        (0, 33),
    ] {
        let mut part = vec![0.0; m * n];
        lin.forward_with(&x[m0 * k..(m0 + m) * k], m, &mut part, choice);
        if m == 1 && !exact_single_rows {
            continue;
        }
        assert_eq!(
            bits(&part),
            bits(&all[m0 * n..(m0 + m) * n]),
            "{what} {choice:?}: rows {m0}..{} alone differ from the same rows in a batch of {total}",
            m0 + m
        );
    }
}

fn choices() -> Vec<KernelChoice> {
    let mut c = vec![KernelChoice::Portable];
    if kernel_choice() == KernelChoice::Avx512 {
        c.push(KernelChoice::Avx512);
    }
    c
}

#[test]
fn bf16_rows_do_not_depend_on_the_batch() {
    let (n, k) = (300, 1100);
    let w: Vec<u16> = (0..n * k)
        .map(|i| half::bf16::from_f32(((i as f32) * 0.731).sin()).to_bits())
        .collect();
    let lin = Linear::new(WeightData::Bf16(w), n, k);
    for c in choices() {
        check(&lin, c, "bf16", packed_rows_exact(c));
    }
}

#[test]
fn f32_rows_do_not_depend_on_the_batch() {
    let (n, k) = (300, 1100);
    let w: Vec<f32> = (0..n * k).map(|i| ((i as f32) * 0.377).cos()).collect();
    let lin = Linear::new(WeightData::F32(w), n, k);
    check(&lin, KernelChoice::Auto, "f32", false);
}

//! FP4 (e2m1) panels against the same weights dequantised: bit for bit against bf16 panels (both
//! kernels, short and tall inputs) when every `e2m1 · scale` is a bf16 value, and within float32
//! rounding of a float64 reference otherwise.

use super::linear::{KernelChoice, Linear, kernel_choice};
use crate::checkpoint::{WeightData, fp4};

/// Packed nibbles covering all 16 codes and E8M0-style power-of-two scales.
fn weights(n: usize, k: usize) -> (Vec<u8>, Vec<f32>) {
    let values: Vec<u8> = (0..n * k / 2).map(|i| (i * 97 % 256) as u8).collect();
    let scales = (0..n * k / 32)
        .map(|i| fp4::e8m0_to_f32(120 + (i * 7 % 13) as u8).expect("scale"))
        .collect();
    (values, scales)
}

fn choices() -> Vec<KernelChoice> {
    let mut out = vec![KernelChoice::Portable];
    if kernel_choice() == KernelChoice::Avx512 {
        out.push(KernelChoice::Avx512);
    }
    out
}

fn input(m: usize, k: usize) -> Vec<f32> {
    (0..m * k)
        .map(|i| ((i * 29 % 101) as f32 - 50.0) * 0.013)
        .collect()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn fp4_panels_equal_bf16_panels_of_the_dequantised_weights() {
    // Partial panels (n = 70, 100), k chunks of 256 plus a tail, inputs of one tile and taller.
    for &(n, k) in &[(70, 96), (100, 544), (32, 256)] {
        let (values, scales) = weights(n, k);
        let dense = fp4::dequantize(&values, n, k, &scales);
        let images: Vec<u16> = dense
            .iter()
            .map(|&v| {
                let b = half::bf16::from_f32(v);
                assert_eq!(b.to_f32().to_bits(), v.to_bits(), "exact in bf16");
                b.to_bits()
            })
            .collect();
        let fp4_lin = Linear::new(WeightData::Fp4 { values, scales }, n, k);
        let bf16_lin = Linear::new(WeightData::Bf16(images), n, k);
        let panels = n.div_ceil(32);
        assert_eq!(
            fp4_lin.bytes(),
            panels * 32 * k / 2 + panels * 32 * (k / 32),
            "half a byte per weight plus an exponent byte per 32"
        );
        for m in [1, 2, 3, 5, 8, 9, 20] {
            let x = input(m, k);
            for choice in choices() {
                let (mut a, mut b) = (vec![0.0; m * n], vec![0.0; m * n]);
                fp4_lin.forward_with(&x, m, &mut a, choice);
                bf16_lin.forward_with(&x, m, &mut b, choice);
                assert_eq!(bits(&a), bits(&b), "{choice:?} n={n} k={k} m={m}");
            }
        }
    }
}

#[test]
fn fp4_with_arbitrary_float_scales_matches_the_reference_and_is_batch_independent() {
    // Scales that are not powers of two: e2m1 · scale rounds in float32 and is not a bf16
    // value, so tall inputs take the in-register path; compare with a float64 GEMM.
    let (n, k) = (64, 320);
    let (values, _) = weights(n, k);
    let scales: Vec<f32> = (0..n * k / 32)
        .map(|i| 0.013 * (1 + i % 11) as f32)
        .collect();
    let dense = fp4::dequantize(&values, n, k, &scales);
    let lin = Linear::new(WeightData::Fp4 { values, scales }, n, k);
    assert_eq!(lin.bytes(), n * k / 2 + n * k / 32 * 4, "float32 scales");
    let m = 19;
    let x = input(m, k);
    for choice in choices() {
        let mut y = vec![0.0; m * n];
        lin.forward_with(&x, m, &mut y, choice);
        for i in 0..m {
            for j in 0..n {
                let r: f64 = (0..k)
                    .map(|t| f64::from(x[i * k + t]) * f64::from(dense[j * k + t]))
                    .sum();
                let err = (f64::from(y[i * n + j]) - r).abs() / (1.0 + r.abs());
                assert!(err < 1e-5, "{choice:?} ({i}, {j}): {} vs {r}", y[i * n + j]);
            }
        }
        // A lone row takes faer's matrix-vector order on the portable path.
        let parts: &[(usize, usize)] = if choice == KernelChoice::Portable {
            &[(3, 4), (9, 10)]
        } else {
            &[(0, 1), (3, 4), (9, 10)]
        };
        for &(m0, rows) in parts {
            let mut part = vec![0.0; rows * n];
            lin.forward_with(&x[m0 * k..(m0 + rows) * k], rows, &mut part, choice);
            assert_eq!(
                bits(&part),
                bits(&y[m0 * n..(m0 + rows) * n]),
                "{choice:?} rows {m0}"
            );
        }
    }
}

//! MLA's `kv_b_proj = [W_UK; W_UV]` cut into the per-head matrices of the weight-absorbed form
//! (see [`crate::attention`]): `W_UKᵀ` (`[kv_lora, nope]`, maps `q_nope` into latent space) and
//! `W_UV` (`[v, kv_lora]`), in the checkpoint's own precision: bf16 stays bf16, FP8 stays one
//! byte per weight with its block scales (a transposed block is still one block), f32 stays f32.

use crate::checkpoint::{Checkpoint, WeightData, bf16_to_f32, fp8};
use crate::error::Result;
use crate::kernels::Linear;

/// Per-head `(W_UKᵀ, W_UV)` of `kv_b_proj` (`[heads · (nope + v), lora]`).
pub(crate) fn absorbed_heads(
    ckpt: &Checkpoint,
    name: &str,
    heads: usize,
    nope: usize,
    v: usize,
    lora: usize,
) -> Result<(Vec<Linear>, Vec<Linear>)> {
    let shape = [heads * (nope + v), lora];
    match ckpt.read_weight(name, &shape)? {
        WeightData::Fp8 {
            values,
            scales,
            block,
        } => Ok(fp8_heads(&values, &scales, block, heads, nope, v, lora)),
        WeightData::Bf16(bits) => Ok(dense_heads(
            &bits.into_iter().map(bf16_to_f32).collect::<Vec<_>>(),
            true,
            heads,
            nope,
            v,
            lora,
        )),
        WeightData::F32(values) => Ok(dense_heads(&values, false, heads, nope, v, lora)),
        WeightData::Fp8RowScaled { .. } => unreachable!("never read from a file"),
        w @ WeightData::Fp4 { .. } => Ok(dense_heads(
            &w.into_f32(shape[0], lora),
            false,
            heads,
            nope,
            v,
            lora,
        )),
    }
}

/// The heads of a float32 (or exactly-bf16, kept as bf16) `kv_b_proj`.
fn dense_heads(
    kv_b: &[f32],
    bf16_source: bool,
    heads: usize,
    nope: usize,
    v: usize,
    lora: usize,
) -> (Vec<Linear>, Vec<Linear>) {
    let mut uk = Vec::with_capacity(heads);
    let mut uv = Vec::with_capacity(heads);
    for head in 0..heads {
        let rows = &kv_b[head * (nope + v) * lora..][..(nope + v) * lora];
        uk.push(Linear::new(
            f32_or_bf16(transpose(&rows[..nope * lora], nope, lora), bf16_source),
            lora,
            nope,
        ));
        uv.push(Linear::new(
            f32_or_bf16(rows[nope * lora..].to_vec(), bf16_source),
            v,
            lora,
        ));
    }
    (uk, uv)
}

/// `m[rows, cols]` → `[cols, rows]`.
fn transpose<T: Copy + Default>(m: &[T], rows: usize, cols: usize) -> Vec<T> {
    let mut t = vec![T::default(); rows * cols];
    for i in 0..rows {
        for j in 0..cols {
            t[j * rows + i] = m[i * cols + j];
        }
    }
    t
}

/// Wraps float32 values for a Linear, as bf16 when they are exactly bf16 (halves memory).
fn f32_or_bf16(values: Vec<f32>, bf16_source: bool) -> WeightData {
    if bf16_source {
        WeightData::Bf16(values.iter().map(|v| (v.to_bits() >> 16) as u16).collect())
    } else {
        WeightData::F32(values)
    }
}

/// The FP8 heads. `W_UV`'s rows keep their block scales per (row, k block). `W_UKᵀ` runs over the
/// original rows as its k: its k blocks are the original row blocks, exact only when the head
/// starts on a row-block boundary (DeepSeek-V3: heads of 256 rows, blocks of 128); a head that
/// does not is dequantised to float32 instead.
fn fp8_heads(
    values: &[u8],
    scales: &[f32],
    block: [usize; 2],
    heads: usize,
    nope: usize,
    v: usize,
    lora: usize,
) -> (Vec<Linear>, Vec<Linear>) {
    let grid_cols = fp8::blocks(lora, block[1]);
    let scale = |row: usize, col: usize| scales[(row / block[0]) * grid_cols + col / block[1]];
    let mut uk = Vec::with_capacity(heads);
    let mut uv = Vec::with_capacity(heads);
    for head in 0..heads {
        let base = head * (nope + v);
        let k_rows = &values[base * lora..][..nope * lora];
        let wk = if base.is_multiple_of(block[0]) {
            let kblocks = fp8::blocks(nope, block[0]);
            let row_scales = (0..lora)
                .flat_map(|j| (0..kblocks).map(move |kb| (j, kb)))
                .map(|(j, kb)| scale(base + kb * block[0], j))
                .collect();
            WeightData::Fp8RowScaled {
                values: transpose(k_rows, nope, lora),
                row_scales,
                block_k: block[0],
            }
        } else {
            let dense: Vec<f32> = (0..nope * lora)
                .map(|idx| fp8::e4m3_to_f32(k_rows[idx]) * scale(base + idx / lora, idx % lora))
                .collect();
            WeightData::F32(transpose(&dense, nope, lora))
        };
        uk.push(Linear::new(wk, lora, nope));
        let v_base = base + nope;
        let row_scales = (0..v)
            .flat_map(|i| (0..grid_cols).map(move |kb| (i, kb)))
            .map(|(i, kb)| scale(v_base + i, kb * block[1]))
            .collect();
        uv.push(Linear::new(
            WeightData::Fp8RowScaled {
                values: values[v_base * lora..][..v * lora].to_vec(),
                row_scales,
                block_k: block[1],
            },
            v,
            lora,
        ));
    }
    (uk, uv)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every head's matrices against the dequantised `kv_b_proj`, for heads on and off block
    /// boundaries (the second layout falls back to float32 for some heads).
    #[test]
    fn fp8_heads_match_the_dequantised_weight() {
        for (heads, nope, v, lora, block) in [(3, 8, 8, 12, [16, 8]), (3, 6, 4, 10, [4, 4])] {
            let rows = heads * (nope + v);
            let values: Vec<u8> = (0..rows * lora)
                .map(|i| (i * 53 % 251) as u8)
                .map(|b| if fp8::is_nan(b) { 0x38 } else { b })
                .collect();
            let grid = [fp8::blocks(rows, block[0]), fp8::blocks(lora, block[1])];
            let scales: Vec<f32> = (0..grid[0] * grid[1])
                .map(|i| 0.5 + 0.25 * i as f32)
                .collect();
            let dense = fp8::dequantize_block_fp8(&values, rows, lora, &scales, block);
            let (uk, uv) = fp8_heads(&values, &scales, block, heads, nope, v, lora);
            for head in 0..heads {
                let base = head * (nope + v);
                // W_UKᵀ q for unit vectors q = e_i is column i of W_UKᵀ = row base+i of kv_b.
                for i in 0..nope {
                    let mut q = vec![0.0f32; nope];
                    q[i] = 1.0;
                    let got = uk[head].forward(&q, 1);
                    assert_eq!(got, dense[(base + i) * lora..][..lora], "uk {head} {i}");
                }
                for j in 0..lora {
                    let mut c = vec![0.0f32; lora];
                    c[j] = 1.0;
                    let got = uv[head].forward(&c, 1);
                    let want: Vec<f32> = (0..v)
                        .map(|i| dense[(base + nope + i) * lora + j])
                        .collect();
                    assert_eq!(got, want, "uv {head} {j}");
                }
            }
        }
    }
}

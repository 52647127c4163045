//! SwiGLU feed-forward blocks: dense MLP layers, shared experts and routed experts all compute
//! `down(silu(gate(x)) * up(x))`. `gate_proj` and `up_proj` are fused into one weight so a
//! batch needs two GEMMs, not three. DeepSeek-V4 blocks carry a `swiglu_limit` L and compute
//! `down(silu(min(gate, L)) * clamp(up, -L, L))` instead (routed and shared experts alike).

use crate::checkpoint::{Checkpoint, WeightData};
use crate::error::Result;
use crate::kernels::{self, Linear};
use crate::tensor::Matrix;

/// One SwiGLU block.
#[derive(Debug)]
pub struct Mlp {
    gate_up: Linear,
    down: Linear,
    inter: usize,
    /// DeepSeek-V4's `swiglu_limit` (`None`: plain SwiGLU).
    limit: Option<f32>,
}

/// Stacks two `[rows, cols]` weights vertically, keeping the common representation.
fn concat_rows(a: WeightData, b: WeightData, rows: usize, cols: usize) -> WeightData {
    match (a, b) {
        (WeightData::F32(mut a), WeightData::F32(b)) => {
            a.extend(b);
            WeightData::F32(a)
        }
        (WeightData::Bf16(mut a), WeightData::Bf16(b)) => {
            a.extend(b);
            WeightData::Bf16(a)
        }
        (
            WeightData::Fp8 {
                values: mut va,
                scales: sa,
                block,
            },
            WeightData::Fp8 {
                values: vb,
                scales: sb,
                block: block_b,
            },
        ) if block == block_b => {
            // Per-row scales keep blocks exact even when `rows` is not a multiple of the block.
            let mut scales = kernels::row_scales(&sa, rows, cols, block);
            scales.extend(kernels::row_scales(&sb, rows, cols, block));
            va.extend(vb);
            WeightData::Fp8RowScaled {
                values: va,
                row_scales: scales,
                block_k: block[1],
            }
        }
        (
            WeightData::Fp4 {
                values: mut va,
                scales: mut sa,
            },
            WeightData::Fp4 {
                values: vb,
                scales: sb,
            },
        ) => {
            // Row-major packing and per-row scales stack as they are.
            va.extend(vb);
            sa.extend(sb);
            WeightData::Fp4 {
                values: va,
                scales: sa,
            }
        }
        (a, b) => {
            let mut out = a.into_f32(rows, cols);
            out.extend(b.into_f32(rows, cols));
            WeightData::F32(out)
        }
    }
}

impl Mlp {
    /// Loads `{prefix}.{gate,up,down}_proj.weight` with intermediate width `inter`.
    pub fn load(ckpt: &Checkpoint, prefix: &str, hidden: usize, inter: usize) -> Result<Mlp> {
        let gate = ckpt.read_weight(&format!("{prefix}.gate_proj.weight"), &[inter, hidden])?;
        let up = ckpt.read_weight(&format!("{prefix}.up_proj.weight"), &[inter, hidden])?;
        let down = ckpt.read_weight(&format!("{prefix}.down_proj.weight"), &[hidden, inter])?;
        Ok(Mlp {
            gate_up: Linear::new(concat_rows(gate, up, inter, hidden), 2 * inter, hidden),
            down: Linear::new(down, hidden, inter),
            inter,
            limit: None,
        })
    }

    /// Loads a DeepSeek-V4 block in the official spelling, `{prefix}.{w1,w3,w2}.weight` (gate,
    /// up, down), clamped at `limit`.
    pub fn load_clamped(
        ckpt: &Checkpoint,
        prefix: &str,
        hidden: usize,
        inter: usize,
        limit: f32,
    ) -> Result<Mlp> {
        let gate = ckpt.read_weight(&format!("{prefix}.w1.weight"), &[inter, hidden])?;
        let up = ckpt.read_weight(&format!("{prefix}.w3.weight"), &[inter, hidden])?;
        let down = ckpt.read_weight(&format!("{prefix}.w2.weight"), &[hidden, inter])?;
        Ok(Mlp::from_weights(gate, up, down, hidden, inter).with_limit(Some(limit)))
    }

    /// The same block with the SwiGLU clamp set (or removed).
    pub fn with_limit(mut self, limit: Option<f32>) -> Mlp {
        self.limit = limit;
        self
    }

    /// The SwiGLU clamp, if any.
    pub fn limit(&self) -> Option<f32> {
        self.limit
    }

    fn activate(&self, gu: &[f32], h: &mut [f32]) {
        match self.limit {
            Some(l) => kernels::silu_mul_clamped(gu, self.inter, l, h),
            None => kernels::silu_mul(gu, self.inter, h),
        }
    }

    /// Builds a block from weights (`gate`/`up`: `[inter, hidden]`, `down`: `[hidden, inter]`).
    pub fn from_weights(
        gate: WeightData,
        up: WeightData,
        down: WeightData,
        hidden: usize,
        inter: usize,
    ) -> Mlp {
        Mlp {
            gate_up: Linear::new(concat_rows(gate, up, inter, hidden), 2 * inter, hidden),
            down: Linear::new(down, hidden, inter),
            inter,
            limit: None,
        }
    }

    /// `x[t, hidden]` → `[t, hidden]`.
    pub fn forward(&self, x: &[f32], t: usize) -> Vec<f32> {
        let gu = self.gate_up.forward(x, t);
        let mut h = vec![0.0f32; t * self.inter];
        self.activate(&gu, &mut h);
        self.down.forward(&h, t)
    }

    /// Intermediate width.
    pub fn intermediate(&self) -> usize {
        self.inter
    }

    /// Bytes of weights held.
    pub fn bytes(&self) -> usize {
        self.gate_up.bytes() + self.down.bytes()
    }
}

/// Runs several blocks over their own inputs as two grouped GEMMs (all gate/up products in one
/// parallel job, then all down products), so many small experts keep every core busy.
pub fn forward_many(mlps: &[&Mlp], inputs: &[Matrix]) -> Vec<Vec<f32>> {
    let items: Vec<_> = mlps
        .iter()
        .zip(inputs)
        .map(|(m, x)| (&m.gate_up, x.data.as_slice(), x.rows))
        .collect();
    let gu = kernels::products(&items);
    let hs: Vec<Vec<f32>> = mlps
        .iter()
        .zip(&gu)
        .zip(inputs)
        .map(|((m, g), x)| {
            let mut h = vec![0.0f32; x.rows * m.inter];
            m.activate(g, &mut h);
            h
        })
        .collect();
    let items: Vec<_> = mlps
        .iter()
        .zip(&hs)
        .zip(inputs)
        .map(|((m, h), x)| (&m.down, h.as_slice(), x.rows))
        .collect();
    kernels::products(&items)
}

//! Routed experts resident in GPU memory, and the compute of one dispatch on them.
//!
//! Weights are uploaded once at load, in their checkpoint form: bf16 as bf16, FP8 e4m3 as one
//! byte per weight with its 128×128 block scales (dequantised to bf16 by a kernel into one
//! reused buffer just before each GEMM), f32 as f32 (f32 GEMMs, for the exact golden checks).
//! One dispatch ([`CudaExperts::run`]), all on one stream, buffers reused across requests:
//! one host→device copy of the hidden states (plus the small routing arrays), a gather of each
//! expert's tokens, per expert a gate and an up GEMM (cuBLAS `gemm_ex`, bf16 in, f32
//! accumulate), one fused SiLU×up kernel over all rows, per expert a down GEMM, one weighted
//! combine kernel (each token sums its experts in its list order, as the CPU path does), one
//! device→host copy of the `[tokens, hidden]` sums. Jobs on one device run one at a time.

use std::collections::HashMap;
use std::sync::Arc;

use cudarc::cublas::sys::cudaDataType;
use cudarc::driver::CudaSlice;

use super::cuda_err;
pub use super::engine::Engine;
use super::engine::{Arg, grow, int, ptr};
use crate::checkpoint::{Checkpoint, WeightData};
use crate::config::Config;
use crate::device::DeviceError;
use crate::error::{ModelError, Result};
use crate::moe::Assignments;
use crate::tensor::Matrix;

/// One weight `[rows, cols]` in device memory, in its checkpoint form.
enum DevWeight {
    F32(CudaSlice<f32>),
    Bf16(CudaSlice<u16>),
    Fp8 {
        values: CudaSlice<u8>,
        scales: CudaSlice<f32>,
        block: [usize; 2],
    },
}

impl DevWeight {
    fn upload(e: &Engine, name: &str, w: WeightData) -> Result<DevWeight> {
        let s = &e.stream;
        Ok(match w {
            WeightData::F32(v) => DevWeight::F32(s.clone_htod(&v).map_err(cuda_err)?),
            WeightData::Bf16(v) => DevWeight::Bf16(s.clone_htod(&v).map_err(cuda_err)?),
            WeightData::Fp8 {
                values,
                scales,
                block,
            } => DevWeight::Fp8 {
                values: s.clone_htod(&values).map_err(cuda_err)?,
                scales: s.clone_htod(&scales).map_err(cuda_err)?,
                block,
            },
            _ => {
                return Err(DeviceError::Unsupported(format!(
                    "`{name}`: only f32, bf16 and block-FP8 expert weights run on CUDA so far"
                ))
                .into());
            }
        })
    }

    fn bytes(&self) -> usize {
        match self {
            DevWeight::F32(w) => w.len() * 4,
            DevWeight::Bf16(w) => w.len() * 2,
            DevWeight::Fp8 { values, scales, .. } => values.len() + scales.len() * 4,
        }
    }
}

/// One routed expert on the device.
struct DevMlp {
    gate: DevWeight,
    up: DevWeight,
    down: DevWeight,
    inter: usize,
    /// All three weights f32 (f32 GEMMs); otherwise all run as bf16 GEMMs.
    f32: bool,
}

/// Routed experts in device memory, keyed by (layer, expert): the GPU twin of
/// [`crate::ExpertStore`].
pub struct CudaExperts {
    engine: Arc<Engine>,
    hidden: usize,
    experts: HashMap<(usize, usize), DevMlp>,
}

impl std::fmt::Debug for CudaExperts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "CudaExperts({} experts on {:?})",
            self.experts.len(),
            self.engine
        )
    }
}

impl CudaExperts {
    /// No experts yet, on `engine`.
    pub fn empty(engine: Arc<Engine>, hidden: usize) -> CudaExperts {
        CudaExperts {
            engine,
            hidden,
            experts: HashMap::new(),
        }
    }

    /// Reads the `(layer, expert)` pairs from the checkpoint and uploads them.
    pub fn load(
        engine: Arc<Engine>,
        cfg: &Config,
        ckpt: &Checkpoint,
        pairs: &[(usize, usize)],
    ) -> Result<CudaExperts> {
        let moe = cfg
            .moe()
            .ok_or_else(|| ModelError::InvalidConfig("the model has no routed experts".into()))?;
        let (hidden, inter) = (cfg.hidden_size, moe.moe_intermediate_size);
        let mut out = CudaExperts::empty(engine, hidden);
        for &(layer, expert) in pairs {
            if !cfg.is_moe_layer(layer) || expert >= moe.n_routed_experts {
                return Err(ModelError::InvalidInput(format!(
                    "no routed expert {expert} in layer {layer} (MoE layers {:?}, {} experts)",
                    cfg.moe_layers(),
                    moe.n_routed_experts
                )));
            }
            let p = format!("model.layers.{layer}.mlp.experts.{expert}");
            let w =
                |name: &str, shape: [usize; 2]| ckpt.read_weight(&format!("{p}.{name}"), &shape);
            let gate = w("gate_proj.weight", [inter, hidden])?;
            let up = w("up_proj.weight", [inter, hidden])?;
            let down = w("down_proj.weight", [hidden, inter])?;
            out.insert(layer, expert, [gate, up, down], inter)?;
        }
        out.engine.stream.synchronize().map_err(cuda_err)?;
        Ok(out)
    }

    /// Uploads one expert from its weights (`gate`, `up`: `[inter, hidden]`, `down`:
    /// `[hidden, inter]`), replacing any held for (layer, expert).
    pub fn insert(
        &mut self,
        layer: usize,
        expert: usize,
        [gate, up, down]: [WeightData; 3],
        inter: usize,
    ) -> Result<()> {
        let name = format!("layer {layer} expert {expert}");
        let gate = DevWeight::upload(&self.engine, &name, gate)?;
        let up = DevWeight::upload(&self.engine, &name, up)?;
        let down = DevWeight::upload(&self.engine, &name, down)?;
        let is32 = |w: &DevWeight| matches!(w, DevWeight::F32(_));
        let f32 = is32(&gate);
        if is32(&up) != f32 || is32(&down) != f32 {
            return Err(DeviceError::Unsupported(format!(
                "{name}: f32 mixed with bf16/FP8 weights in one expert"
            ))
            .into());
        }
        let mlp = DevMlp {
            gate,
            up,
            down,
            inter,
            f32,
        };
        self.experts.insert((layer, expert), mlp);
        Ok(())
    }

    /// Moves every expert of `other` (same device) into this store.
    pub fn absorb(&mut self, other: CudaExperts) {
        self.experts.extend(other.experts);
    }

    /// Drops an expert (its device memory is freed); returns whether it was held.
    pub fn remove(&mut self, layer: usize, expert: usize) -> bool {
        self.experts.remove(&(layer, expert)).is_some()
    }

    /// Number of experts held.
    pub fn len(&self) -> usize {
        self.experts.len()
    }

    /// Whether no expert is held.
    pub fn is_empty(&self) -> bool {
        self.experts.is_empty()
    }

    /// Device bytes of the experts' weights.
    pub fn bytes(&self) -> usize {
        let m = |m: &DevMlp| m.gate.bytes() + m.up.bytes() + m.down.bytes();
        self.experts.values().map(m).sum()
    }

    /// The device.
    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// `Σ_k w_k · expert_k(x_t)` for every token of `x` (`[tokens, hidden]`), like
    /// [`crate::moe::run_experts`].
    pub fn run(&self, layer: usize, x: &Matrix, a: &Assignments) -> Result<Matrix> {
        let t = a.tokens();
        let hidden = self.hidden;
        if x.cols != hidden || x.rows != t {
            return Err(ModelError::InvalidInput(format!(
                "hidden states [{}, {}] for {t} tokens of width {hidden}",
                x.rows, x.cols
            )));
        }
        if t == 0 || a.experts.is_empty() {
            return Ok(Matrix::zeros(t, hidden));
        }
        // Group entries by expert (ascending), tokens in order within a group.
        let mut groups: std::collections::BTreeMap<u32, Vec<usize>> = Default::default();
        for tok in 0..t {
            for e in a.range(tok) {
                groups.entry(a.experts[e]).or_default().push(e);
            }
        }
        let n_entries = a.experts.len();
        let mut rows = Vec::with_capacity(n_entries); // token of each grouped row
        let mut entry_row = vec![0i32; n_entries];
        let mut plan = Vec::with_capacity(groups.len()); // (expert, first row, rows)
        let mut token_of = vec![0usize; n_entries];
        for tok in 0..t {
            for e in a.range(tok) {
                token_of[e] = tok;
            }
        }
        for (&expert, entries) in &groups {
            let mlp =
                self.experts
                    .get(&(layer, expert as usize))
                    .ok_or_else(|| ModelError::Experts {
                        layer,
                        reason: format!("routed expert {expert} is not loaded"),
                    })?;
            plan.push((mlp, rows.len(), entries.len()));
            for &e in entries {
                entry_row[e] = rows.len() as i32;
                rows.push(token_of[e] as i32);
            }
        }
        let mut ints = rows;
        ints.extend_from_slice(&entry_row);
        ints.extend(a.offsets.iter().map(|&o| o as i32));
        let out =
            self.compute(x, &ints, &a.weights, &plan, t)
                .map_err(|e| ModelError::Experts {
                    layer,
                    reason: e.to_string(),
                })?;
        Ok(Matrix::from_vec(t, hidden, out))
    }

    /// The device part of [`CudaExperts::run`]: `ints` is `[rows (R) | entry_row (R) |
    /// offsets (t + 1)]`, `plan` the experts in grouped-row order.
    fn compute(
        &self,
        x: &Matrix,
        ints: &[i32],
        weights: &[f32],
        plan: &[(&DevMlp, usize, usize)],
        t: usize,
    ) -> Result<Vec<f32>, DeviceError> {
        let e = &*self.engine;
        let s = &e.stream;
        let hidden = self.hidden;
        let r = weights.len();
        let inter = plan.iter().map(|p| p.0.inter).max().unwrap_or(0);
        let need32 = plan.iter().any(|p| p.0.f32);
        let need16 = plan.iter().any(|p| !p.0.f32);
        let mut sc = e.scratch.lock().unwrap_or_else(|p| p.into_inner());
        let sc = &mut *sc;

        // The one copy of the hidden states in, and the routing.
        s.memcpy_htod(&x.data, grow(s, &mut sc.x, t * hidden)?)
            .map_err(cuda_err)?;
        s.memcpy_htod(ints, grow(s, &mut sc.ints, ints.len())?)
            .map_err(cuda_err)?;
        s.memcpy_htod(weights, grow(s, &mut sc.weights, r.max(1))?)
            .map_err(cuda_err)?;
        let px = ptr(grow(s, &mut sc.x, 0)?, s);
        let pints = ptr(grow(s, &mut sc.ints, 0)?, s);
        let (p_rows, p_entry_row, p_offsets) = (pints, pints + 4 * r as u64, pints + 8 * r as u64);
        let pw = ptr(grow(s, &mut sc.weights, 0)?, s);
        let pgu = ptr(grow(s, &mut sc.gu, r * 2 * inter)?, s);
        let py = ptr(grow(s, &mut sc.y, r * hidden)?, s);
        let pout = ptr(grow(s, &mut sc.out, t * hidden)?, s);
        let (mut pxg32, mut pxg16, mut ph32, mut ph16, mut pdq) = (0, 0, 0, 0, 0);
        let (n_r, n_h, n_i) = (int(r)?, int(hidden)?, int(inter)?);
        let ip = |a: &Arg| match a {
            Arg::Int(i) => Arg::Int(*i),
            Arg::Ptr(p) => Arg::Ptr(*p),
        };
        if need32 {
            pxg32 = ptr(grow(s, &mut sc.xg32, r * hidden)?, s);
            ph32 = ptr(grow(s, &mut sc.h32, r * inter)?, s);
            let args = [
                Arg::Ptr(px),
                Arg::Ptr(p_rows),
                ip(&n_r),
                ip(&n_h),
                Arg::Ptr(pxg32),
            ];
            e.launch(&e.k.gather_f32, r * hidden, &args)?;
        }
        if need16 {
            pxg16 = ptr(grow(s, &mut sc.xg16, r * hidden)?, s);
            ph16 = ptr(grow(s, &mut sc.h16, r * inter)?, s);
            pdq = ptr(grow(s, &mut sc.dequant, inter * hidden)?, s);
            let args = [
                Arg::Ptr(px),
                Arg::Ptr(p_rows),
                ip(&n_r),
                ip(&n_h),
                Arg::Ptr(pxg16),
            ];
            e.launch(&e.k.gather_bf16, r * hidden, &args)?;
        }
        // A weight's address as a GEMM operand (FP8 dequantised into `pdq` first).
        let operand = |w: &DevWeight, rows: usize, cols: usize| -> Result<u64, DeviceError> {
            Ok(match w {
                DevWeight::F32(v) => ptr(v, s),
                DevWeight::Bf16(v) => ptr(v, s),
                DevWeight::Fp8 {
                    values,
                    scales,
                    block,
                } => {
                    let args = [
                        Arg::Ptr(ptr(values, s)),
                        Arg::Ptr(ptr(scales, s)),
                        int(rows)?,
                        int(cols)?,
                        int(block[0])?,
                        int(block[1])?,
                        Arg::Ptr(pdq),
                    ];
                    e.launch(&e.k.fp8_dequant_bf16, rows * cols, &args)?;
                    pdq
                }
            })
        };
        let bf = cudaDataType::CUDA_R_16BF;
        let f = cudaDataType::CUDA_R_32F;
        // Gate and up products into gu[R, 2·inter] (gate columns first, as the CPU stacks them).
        for &(m, r0, n) in plan {
            let (dt, xg, es) = if m.f32 { (f, pxg32, 4) } else { (bf, pxg16, 2) };
            let x0 = xg + (r0 * hidden * es) as u64;
            let gu0 = pgu + (r0 * 2 * inter * 4) as u64;
            let g = operand(&m.gate, m.inter, hidden)?;
            e.gemm(dt, g, x0, gu0, n, m.inter, hidden, 2 * inter)?;
            let u = operand(&m.up, m.inter, hidden)?;
            e.gemm(
                dt,
                u,
                x0,
                gu0 + (m.inter * 4) as u64,
                n,
                m.inter,
                hidden,
                2 * inter,
            )?;
        }
        if need32 {
            let args = [Arg::Ptr(pgu), ip(&n_r), ip(&n_i), Arg::Ptr(ph32)];
            e.launch(&e.k.silu_mul_f32, r * inter, &args)?;
        }
        if need16 {
            let args = [Arg::Ptr(pgu), ip(&n_r), ip(&n_i), Arg::Ptr(ph16)];
            e.launch(&e.k.silu_mul_bf16, r * inter, &args)?;
        }
        // Down products into y[R, hidden].
        for &(m, r0, n) in plan {
            let (dt, h, es) = if m.f32 { (f, ph32, 4) } else { (bf, ph16, 2) };
            let d = operand(&m.down, hidden, m.inter)?;
            let h0 = h + (r0 * inter * es) as u64;
            e.gemm(
                dt,
                d,
                h0,
                py + (r0 * hidden * 4) as u64,
                n,
                hidden,
                m.inter,
                hidden,
            )?;
        }
        let args = [
            Arg::Ptr(py),
            Arg::Ptr(p_offsets),
            Arg::Ptr(p_entry_row),
            Arg::Ptr(pw),
            int(t)?,
            ip(&n_h),
            Arg::Ptr(pout),
        ];
        let grid = (
            u32::try_from(t).map_err(cuda_err)?,
            hidden.div_ceil(256) as u32,
        );
        e.launch_cfg(&e.k.combine, grid, &args)?;
        // The one copy of the sums out.
        let mut host = vec![0.0f32; t * hidden];
        let out = grow(s, &mut sc.out, t * hidden)?;
        s.memcpy_dtoh(&out.slice(..t * hidden), &mut host)
            .map_err(cuda_err)?;
        s.synchronize().map_err(cuda_err)?;
        Ok(host)
    }
}

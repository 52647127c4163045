//! Where a node's experts live and compute: CPU memory ([`ExpertStore`], the default) or, with
//! the `cuda` feature and `--device cuda[:N]`, GPU memory ([`moe_model::cuda::CudaExperts`]).
//! Both answer the same [`Job`](crate::validate::Job) with the same `[tokens, hidden]` sums.

use moe_model::checkpoint::Checkpoint;
use moe_model::moe::run_experts;
use moe_model::{Assignments, Device, ExpertStore, Matrix, ModelConfig, ModelError};

/// The device a node computes on.
#[derive(Debug, Clone)]
pub enum Backend {
    Cpu,
    #[cfg(feature = "cuda")]
    Cuda(std::sync::Arc<moe_model::cuda::experts::Engine>),
}

impl Backend {
    /// Opens `device` (for CUDA: checks the libraries and the index, compiles the kernels).
    pub fn open(device: Device) -> Result<Backend, ModelError> {
        match device {
            Device::Cpu => Ok(Backend::Cpu),
            #[cfg(feature = "cuda")]
            Device::Cuda(i) => Ok(Backend::Cuda(std::sync::Arc::new(
                moe_model::cuda::experts::Engine::new(i)?,
            ))),
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(_) => Err(moe_model::DeviceError::NotBuilt.into()),
        }
    }

    /// Loads `pairs` from the checkpoint onto this device.
    pub fn load(
        &self,
        cfg: &ModelConfig,
        ckpt: &Checkpoint,
        pairs: &[(usize, usize)],
    ) -> Result<Experts, ModelError> {
        match self {
            Backend::Cpu => Ok(Experts::Cpu(cfg.load_experts(ckpt, pairs)?)),
            #[cfg(feature = "cuda")]
            Backend::Cuda(e) => match cfg {
                ModelConfig::V3(c) => Ok(Experts::Cuda(moe_model::cuda::CudaExperts::load(
                    e.clone(),
                    c,
                    ckpt,
                    pairs,
                )?)),
                ModelConfig::V4(_) => Err(moe_model::DeviceError::Unsupported(
                    "DeepSeek-V4 experts (clamped SwiGLU, FP4) run on the CPU only so far".into(),
                )
                .into()),
            },
        }
    }

    /// The Info answer's `backend`: `cpu/avx512`, `cpu/portable` or `cuda:N/<name>`.
    pub fn describe(&self) -> String {
        match self {
            Backend::Cpu => format!("cpu/{:?}", moe_model::kernels::kernel_choice()).to_lowercase(),
            #[cfg(feature = "cuda")]
            Backend::Cuda(e) => e.describe(),
        }
    }
}

/// A node's hosted expert weights.
#[derive(Debug)]
pub enum Experts {
    Cpu(ExpertStore),
    #[cfg(feature = "cuda")]
    Cuda(moe_model::cuda::CudaExperts),
}

impl Default for Experts {
    fn default() -> Self {
        Experts::Cpu(ExpertStore::default())
    }
}

impl Experts {
    /// `Σ_k w_k · expert_k(x_t)` per token.
    pub fn compute(&self, layer: usize, x: &Matrix, a: &Assignments) -> Result<Matrix, ModelError> {
        match self {
            Experts::Cpu(s) => run_experts(layer, x, a, |e| s.get(layer, e)),
            #[cfg(feature = "cuda")]
            Experts::Cuda(s) => s.run(layer, x, a),
        }
    }

    /// Moves `other`'s experts in (both come from the node's one backend).
    pub fn absorb(&mut self, other: Experts) {
        match (self, other) {
            (Experts::Cpu(a), Experts::Cpu(b)) => a.absorb(b),
            #[cfg(feature = "cuda")]
            (Experts::Cuda(a), Experts::Cuda(b)) => a.absorb(b),
            #[cfg(feature = "cuda")]
            _ => tracing::error!("experts loaded on another device than the node's; dropped"),
        }
    }

    pub fn remove(&mut self, layer: usize, expert: usize) -> bool {
        match self {
            Experts::Cpu(s) => s.remove(layer, expert),
            #[cfg(feature = "cuda")]
            Experts::Cuda(s) => s.remove(layer, expert),
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Experts::Cpu(s) => s.len(),
            #[cfg(feature = "cuda")]
            Experts::Cuda(s) => s.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes of weights held (device bytes on a GPU).
    pub fn bytes(&self) -> usize {
        match self {
            Experts::Cpu(s) => s.bytes(),
            #[cfg(feature = "cuda")]
            Experts::Cuda(s) => s.bytes(),
        }
    }
}

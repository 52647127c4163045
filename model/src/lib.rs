//! `moe-model`: the DeepSeek-V3-family engine shared by routers, expert nodes and the
//! single-process reference path.
//!
//! - [`config`]: `config.json`, typed and validated.
//! - [`checkpoint`]: memory-mapped safetensors (sharded, bf16/f32/f16/FP8) read tensor by tensor.
//! - [`kernels`]: GEMM over packed bf16 panels (AVX-512) or `faer`, RMSNorm, SiLU, softmax.
//! - [`rope`], [`attention`], [`cache`]: YaRN RoPE and MLA attention over the paged latent cache.
//! - [`gate`], [`mlp`], [`moe`]: the router gate, dense/expert FFNs and the expert-backend seam
//!   that the distributed router plugs into.
//! - [`model`]: the backbone (everything but routed experts) and the full forward pass;
//!   [`overlap`]: the same pass as two interleaved micro-batches (two-batch overlap).
//! - [`family`]: V3-family or V4 config, as the expert side and control plane see it.
//! - [`v4`]: the DeepSeek-V4 sibling (config, checkpoint names, hyper-connections, compressed
//!   attention, hash / sqrt-softplus gate) over the same kernels and expert seam.
//! - [`device`]: `--device cpu|cuda[:N]`; [`cuda`] (feature `cuda`): the GPU expert FFN
//!   (cuBLAS GEMMs and NVRTC kernels over experts resident in device memory).
//! - [`sampling`], [`presets`]: token sampling and random-weight checkpoints for tests/benchmarks.

mod absorb;
mod attend;
pub mod attention;
pub mod cache;
pub mod checkpoint;
pub mod config;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod device;
pub mod error;
pub mod family;
pub mod gate;
pub mod kernels;
pub mod mlp;
pub mod model;
pub mod moe;
pub mod overlap;
pub mod presets;
pub mod rope;
pub mod sampling;
pub mod tensor;
pub mod v4;

pub use cache::{KvCacheDtype, KvDtype, KvLayout, KvPool, SeqCache};
pub use config::Config;
pub use device::{Device, DeviceError};
pub use error::{DispatchClass, ModelError, Result};
pub use family::ModelConfig;
pub use model::{Backbone, LoadOptions, LogitsMode, Model, SeqInput, Trace};
pub use moe::{Assignments, ExpertBackend, ExpertStore, LocalExperts, PendingExperts};
pub use overlap::Overlap;
pub use tensor::Matrix;

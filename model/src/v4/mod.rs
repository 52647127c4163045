//! DeepSeek-V4 (V4-Flash, V4-Pro): a sibling of the V3 engine that shares its kernels, tensor
//! type, checkpoint reader, expert store and expert seam.
//!
//! - [`config`]: `config.json` (`model_type: deepseek_v4`), legacy keys folded, validated.
//! - [`names`]: the official and the HF-saved tensor spellings.
//! - [`experts`]: routed experts, one (layer, expert) pair at a time, clamped SwiGLU.
//! - [`gate`]: sqrt-softplus scores, hash layers by token id, top-k with bias for the choice.
//! - [`hc`]: manifold-constrained hyper-connections and the final HC head.
//! - [`rope`], [`attention`], [`compressor`]: shared-KV attention with sinks over a sliding window
//!   and compressed entries (CSA with the lightning indexer, HCA).
//! - [`cache`]: the per-sequence decode cache (window, compressor and indexer state);
//!   [`paged`]: that cache counted in the scheduler's page pool.
//! - [`preset`]: random-weight `tiny-v4` / `bench-v4` checkpoints.
//! - [`model`]: the backbone and the batched forward pass over caches.
//!
//! Reference: transformers 5.24 `models/deepseek_v4`; `V4.md` of the golden fixtures.

pub mod attention;
pub mod cache;
pub mod compressor;
pub mod config;
mod config_compat;
pub mod experts;
pub mod gate;
pub mod hc;
pub mod model;
pub mod names;
pub mod paged;
pub mod preset;
pub mod rope;
mod validate;

pub use cache::V4Cache;
pub use config::{
    AttnLayerType, CompressRates, MlpLayerType, RopeParams, RopeSets, V4Config, V4ScoringFunc,
};
pub use model::{V4Backbone, V4Model, V4SeqInput, V4Trace};
pub use paged::PagedV4Cache;

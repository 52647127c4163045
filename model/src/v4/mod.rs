//! DeepSeek-V4 (V4-Flash, V4-Pro): a sibling of the V3 engine that shares its kernels, tensor
//! type, checkpoint reader and expert seam.
//!
//! - [`config`]: `config.json` (`model_type: deepseek_v4`), legacy keys folded, validated.

pub mod config;
mod config_compat;
mod validate;

pub use config::{
    AttnLayerType, CompressRates, MlpLayerType, RopeParams, RopeSets, V4Config, V4ScoringFunc,
};

//! The model families this engine serves, as the expert side and the control plane see them.
//!
//! [`ModelConfig`] is a V3-family [`Config`] or a DeepSeek-V4 [`V4Config`], told apart by
//! `model_type`. Expert nodes, placement and load statistics need only its expert-side shape
//! (hidden size, MoE layers, routed experts, a fingerprint) and [`ModelConfig::load_experts`],
//! which reads each (layer, expert) pair's own tensors in the family's spelling (V4 experts carry
//! the clamped SwiGLU). The wire between router and expert nodes is the same for both.

use std::path::Path;

use crate::checkpoint::Checkpoint;
use crate::config::Config;
use crate::error::{ModelError, Result};
use crate::moe::ExpertStore;
use crate::v4::{self, V4Config};

/// A V3-family or a DeepSeek-V4 configuration.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelConfig {
    V3(Box<Config>),
    V4(Box<V4Config>),
}

impl From<Config> for ModelConfig {
    fn from(c: Config) -> Self {
        ModelConfig::V3(Box::new(c))
    }
}

impl From<V4Config> for ModelConfig {
    fn from(c: V4Config) -> Self {
        ModelConfig::V4(Box::new(c))
    }
}

impl ModelConfig {
    /// Reads `<dir>/config.json` as whichever family its `model_type` names.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| ModelError::ConfigRead {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        let value: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| ModelError::ConfigRead {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        if value.get("model_type").and_then(|v| v.as_str()) == Some("deepseek_v4") {
            Ok(V4Config::from_dir(dir)?.into())
        } else {
            Ok(Config::from_dir(dir)?.into())
        }
    }

    /// The V3-family config, if this is one.
    pub fn as_v3(&self) -> Option<&Config> {
        match self {
            ModelConfig::V3(c) => Some(c),
            ModelConfig::V4(_) => None,
        }
    }

    /// Width of the hidden states on the wire.
    pub fn hidden_size(&self) -> usize {
        match self {
            ModelConfig::V3(c) => c.hidden_size,
            ModelConfig::V4(c) => c.hidden_size,
        }
    }

    /// Routed experts per MoE layer (0 without MoE).
    pub fn n_routed_experts(&self) -> usize {
        match self {
            ModelConfig::V3(c) => c.moe().map_or(0, |m| m.n_routed_experts),
            ModelConfig::V4(c) => c.n_routed_experts,
        }
    }

    /// The layers with routed experts (every layer in V4).
    pub fn moe_layers(&self) -> Vec<usize> {
        match self {
            ModelConfig::V3(c) => c.moe_layers(),
            ModelConfig::V4(c) => c.moe_layers(),
        }
    }

    /// Whether `layer` has routed experts.
    pub fn is_moe_layer(&self, layer: usize) -> bool {
        match self {
            ModelConfig::V3(c) => c.is_moe_layer(layer),
            ModelConfig::V4(c) => layer < c.num_hidden_layers,
        }
    }

    /// The stable fingerprint processes compare to check they serve the same model.
    pub fn fingerprint(&self) -> String {
        match self {
            ModelConfig::V3(c) => c.fingerprint(),
            ModelConfig::V4(c) => c.fingerprint(),
        }
    }

    /// Opens the checkpoint of `dir` with this family's settings.
    pub fn open_checkpoint(&self, dir: &Path) -> Result<Checkpoint> {
        match self {
            ModelConfig::V3(c) => Checkpoint::open(dir, c.fp8_block()),
            ModelConfig::V4(_) => Checkpoint::open(dir, None),
        }
    }

    /// Loads exactly the `(layer, expert)` pairs asked for (only their tensors are read).
    pub fn load_experts(&self, ckpt: &Checkpoint, pairs: &[(usize, usize)]) -> Result<ExpertStore> {
        match self {
            ModelConfig::V3(c) => ExpertStore::load(c, ckpt, pairs),
            ModelConfig::V4(c) => v4::experts::load_experts(c, ckpt, pairs),
        }
    }
}

//! DeepSeek-V4 routed experts: loaded one (layer, expert) pair at a time into the same
//! [`ExpertStore`] as V3 experts, so an expert node reads only its slice of the checkpoint and
//! runs them with the same [`crate::moe::run_experts`]. Each block carries the config's
//! `swiglu_limit` (clamped SwiGLU); the wire format is unchanged.

use rayon::prelude::*;

use super::V4Config;
use super::names::Names;
use crate::checkpoint::Checkpoint;
use crate::error::{ModelError, Result};
use crate::mlp::Mlp;
use crate::moe::ExpertStore;

/// Loads exactly the `(layer, expert)` pairs asked for (only their tensors are read).
pub fn load_experts(
    cfg: &V4Config,
    ckpt: &Checkpoint,
    pairs: &[(usize, usize)],
) -> Result<ExpertStore> {
    let names = Names::detect(ckpt)?;
    for &(layer, expert) in pairs {
        if layer >= cfg.num_hidden_layers || expert >= cfg.n_routed_experts {
            return Err(ModelError::InvalidInput(format!(
                "no routed expert {expert} in layer {layer} ({} layers, {} experts)",
                cfg.num_hidden_layers, cfg.n_routed_experts
            )));
        }
    }
    let loaded: Vec<((usize, usize), Mlp)> = pairs
        .par_iter()
        .map(|&(layer, expert)| {
            let mlp = Mlp::load_clamped(
                ckpt,
                &names.expert(layer, expert),
                cfg.hidden_size,
                cfg.moe_intermediate_size,
                cfg.swiglu_limit as f32,
            )?;
            Ok(((layer, expert), mlp))
        })
        .collect::<Result<_>>()?;
    let mut store = ExpertStore::default();
    for ((l, e), m) in loaded {
        store.insert(l, e, m);
    }
    Ok(store)
}

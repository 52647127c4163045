//! [`V4Config::validate`]: rejects DeepSeek-V4 configurations no checkpoint can have (zero sizes,
//! heads that do not split into the output groups, schedules of the wrong length) and what this
//! engine cannot run (several KV heads, a non-SiLU activation, quantised weights), each with a
//! message naming the field. Tested over the fixture config and broken variants of it in
//! `model/tests/v4_config.rs`.

use super::config::{RopeParams, V4Config};
use crate::config::{Fp8Format, HiddenAct, QuantMethod, RopeType};
use crate::error::{ModelError, Result};

fn bad<T>(msg: String) -> Result<T> {
    Err(ModelError::InvalidConfig(msg))
}

fn validate_rope(what: &str, r: &RopeParams, max_pos: usize) -> Result<()> {
    if !r.rope_theta.is_finite() || r.rope_theta <= 1.0 {
        return bad(format!(
            "rope_parameters.{what}.rope_theta ({}) must be > 1",
            r.rope_theta
        ));
    }
    match r.rope_type {
        RopeType::Default => Ok(()),
        RopeType::Yarn => {
            let f = r.factor.unwrap_or(f64::NAN);
            if !f.is_finite() || f < 1.0 {
                return bad(format!(
                    "rope_parameters.{what}.factor ({f}) must be given and >= 1 for yarn"
                ));
            }
            if let Some(orig) = r.original_max_position_embeddings
                && (orig == 0 || orig > max_pos)
            {
                return bad(format!(
                    "rope_parameters.{what}.original_max_position_embeddings ({orig}) must be in \
                     1..=max_position_embeddings ({max_pos})"
                ));
            }
            if let (Some(fast), Some(slow)) = (r.beta_fast, r.beta_slow)
                && fast < slow
            {
                return bad(format!(
                    "rope_parameters.{what}.beta_fast ({fast}) is below beta_slow ({slow})"
                ));
            }
            Ok(())
        }
        other => bad(format!(
            "rope_parameters.{what} type `{}` is not supported (default or yarn)",
            other.as_str()
        )),
    }
}

impl V4Config {
    /// Rejects configurations no checkpoint can have, or that this engine cannot run.
    pub fn validate(&self) -> Result<()> {
        let n = self.num_hidden_layers;
        for (name, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("moe_intermediate_size", self.moe_intermediate_size),
            ("num_hidden_layers", n),
            ("num_attention_heads", self.num_attention_heads),
            ("head_dim", self.head_dim),
            ("q_lora_rank", self.q_lora_rank),
            ("num_experts_per_tok", self.num_experts_per_tok),
            ("n_routed_experts", self.n_routed_experts),
            ("max_position_embeddings", self.max_position_embeddings),
            ("hc_mult", self.hc_mult),
            ("hc_sinkhorn_iters", self.hc_sinkhorn_iters),
            ("sliding_window", self.sliding_window),
            ("o_groups", self.o_groups),
            ("o_lora_rank", self.o_lora_rank),
            (
                "compress_rates.compressed_sparse_attention",
                self.compress_rates.csa,
            ),
            (
                "compress_rates.heavily_compressed_attention",
                self.compress_rates.hca,
            ),
        ] {
            if v == 0 {
                return bad(format!("{name} must be positive"));
            }
        }
        if self.num_key_value_heads != 1 {
            return bad(format!(
                "num_key_value_heads ({}) must be 1: DeepSeek-V4 attention has one shared K=V head",
                self.num_key_value_heads
            ));
        }
        if self.hidden_act != HiddenAct::Silu {
            return bad("hidden_act must be silu (clamped SwiGLU)".into());
        }
        if self.attention_bias || self.mlp_bias {
            return bad("attention_bias / mlp_bias = true is not supported by DeepSeek-V4".into());
        }
        if let Some(q) = &self.quantization_config {
            if q.quant_method != QuantMethod::Fp8 {
                return bad(format!(
                    "quantization method `{}` is not supported (fp8 dense / fp4 experts)",
                    q.quant_method.as_str()
                ));
            }
            if q.fmt == Some(Fp8Format::E5m2) {
                return bad("fp8 format `e5m2` is not supported (only e4m3)".into());
            }
            if let Some(b) = q.weight_block_size
                && b != [128, 128]
            {
                return bad(format!(
                    "weight_block_size {b:?} is not supported (DeepSeek-V4 uses [128, 128])"
                ));
            }
        }
        if self.layer_types.len() != n || self.mlp_layer_types.len() != n {
            return bad(format!(
                "layer_types ({}) and mlp_layer_types ({}) must have num_hidden_layers ({n}) entries",
                self.layer_types.len(),
                self.mlp_layer_types.len()
            ));
        }
        let rope = self.qk_rope_head_dim;
        if rope == 0 || !rope.is_multiple_of(2) || rope > self.head_dim {
            return bad(format!(
                "qk_rope_head_dim ({rope}) must be even, positive and at most head_dim ({})",
                self.head_dim
            ));
        }
        if self.uses_indexer() && (self.index_head_dim < rope || self.index_n_heads == 0) {
            return bad(format!(
                "index_head_dim ({}) must be at least qk_rope_head_dim ({rope}) and \
                 index_n_heads ({}) positive for CSA layers",
                self.index_head_dim, self.index_n_heads
            ));
        }
        if self.uses_indexer() && self.index_topk == 0 {
            return bad("index_topk must be positive for CSA layers".into());
        }
        if !self.num_attention_heads.is_multiple_of(self.o_groups) {
            return bad(format!(
                "num_attention_heads ({}) is not divisible by o_groups ({})",
                self.num_attention_heads, self.o_groups
            ));
        }
        if self.num_experts_per_tok > self.n_routed_experts {
            return bad(format!(
                "num_experts_per_tok ({}) exceeds n_routed_experts ({})",
                self.num_experts_per_tok, self.n_routed_experts
            ));
        }
        for (name, v) in [
            ("routed_scaling_factor", self.routed_scaling_factor),
            ("swiglu_limit", self.swiglu_limit),
            ("rms_norm_eps", self.rms_norm_eps),
            ("hc_eps", self.hc_eps),
        ] {
            if !v.is_finite() || v <= 0.0 {
                return bad(format!("{name} ({v}) must be finite and > 0"));
            }
        }
        validate_rope(
            "main",
            &self.rope_parameters.main,
            self.max_position_embeddings,
        )?;
        validate_rope(
            "compress",
            &self.rope_parameters.compress,
            self.max_position_embeddings,
        )?;
        for id in self.bos_token_id.into_iter().chain(self.eos_token_ids()) {
            if id as usize >= self.vocab_size {
                return bad(format!(
                    "special token id {id} (bos/eos) is outside the vocabulary of {}",
                    self.vocab_size
                ));
            }
        }
        Ok(())
    }

    /// Whether some layer is CSA (and so has a lightning indexer).
    pub fn uses_indexer(&self) -> bool {
        self.layer_types
            .contains(&super::config::AttnLayerType::Csa)
    }
}

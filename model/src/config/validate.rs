//! [`Config::validate`]: rejects configurations no checkpoint can have (zero sizes, expert
//! groups that do not divide, two keys that contradict each other) and the ones this engine
//! cannot run (a non-SiLU activation, non-YaRN RoPE scaling, non-FP8 quantisation), each with a
//! message naming the field. Tested field by field in `model/tests/configs.rs`.

use super::{Config, Fp8Format, HiddenAct, ModelType, QuantMethod, RopeType, TopkMethod};
use crate::error::{ModelError, Result};

/// The transformers classes of the layouts this engine runs.
const ARCHITECTURES: [&str; 2] = ["DeepseekV3ForCausalLM", "DeepseekV2ForCausalLM"];

fn bad<T>(msg: String) -> Result<T> {
    Err(ModelError::InvalidConfig(msg))
}

impl Config {
    /// Rejects configurations no checkpoint can have.
    pub fn validate(&self) -> Result<()> {
        self.validate_family()?;
        self.validate_shape()?;
        self.validate_rope()?;
        self.validate_quantization()?;
        self.validate_tokens()?;
        if self.n_routed_experts.is_some() {
            self.validate_moe()?;
        }
        Ok(())
    }

    fn validate_family(&self) -> Result<()> {
        if let Some(ModelType::Other(name)) = &self.model_type
            && !self
                .architectures
                .iter()
                .any(|a| ARCHITECTURES.contains(&a.as_str()))
        {
            return bad(format!(
                "model_type `{name}` is not a DeepSeek-V2/V3 layout (deepseek_v2, deepseek_v3, \
                 kimi_k2, or architectures naming {})",
                ARCHITECTURES.join(" or ")
            ));
        }
        if self.hidden_act != HiddenAct::Silu {
            return bad(format!(
                "hidden_act `{}` is not supported (only silu)",
                serde_json::to_value(self.hidden_act)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default()
            ));
        }
        if self.attention_bias {
            return bad("attention_bias = true is not supported by this family".into());
        }
        Ok(())
    }

    fn validate_shape(&self) -> Result<()> {
        for (name, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("kv_lora_rank", self.kv_lora_rank),
            ("qk_nope_head_dim", self.qk_nope_head_dim),
            ("qk_rope_head_dim", self.qk_rope_head_dim),
            ("v_head_dim", self.v_head_dim),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if v == 0 {
                return bad(format!("{name} must be positive"));
            }
        }
        if self.q_lora_rank == Some(0) {
            return bad("q_lora_rank must be positive or null".into());
        }
        if !self.qk_rope_head_dim.is_multiple_of(2) || self.qk_rope_head_dim > 512 {
            return bad(format!(
                "qk_rope_head_dim ({}) must be even (rope rotates pairs) and at most 512",
                self.qk_rope_head_dim
            ));
        }
        if let Some(hd) = self.head_dim
            && hd != self.qk_rope_head_dim
        {
            return bad(format!(
                "head_dim ({hd}) contradicts qk_rope_head_dim ({}): transformers sets head_dim \
                 to the rope width",
                self.qk_rope_head_dim
            ));
        }
        if let Some(qk) = self.qk_head_dim
            && qk != self.qk_head_dim()
        {
            return bad(format!(
                "qk_head_dim ({qk}) contradicts qk_nope_head_dim + qk_rope_head_dim ({})",
                self.qk_head_dim()
            ));
        }
        if let Some(kv) = self.num_key_value_heads
            && kv != self.num_attention_heads
        {
            return bad(format!(
                "num_key_value_heads ({kv}) must equal num_attention_heads ({}) for MLA",
                self.num_attention_heads
            ));
        }
        if self.first_k_dense_replace > self.num_hidden_layers {
            return bad(format!(
                "first_k_dense_replace ({}) exceeds num_hidden_layers ({})",
                self.first_k_dense_replace, self.num_hidden_layers
            ));
        }
        if self.rms_norm_eps.is_nan() || self.rms_norm_eps <= 0.0 {
            return bad(format!("rms_norm_eps ({}) must be > 0", self.rms_norm_eps));
        }
        Ok(())
    }

    fn validate_rope(&self) -> Result<()> {
        if !self.rope_theta.is_finite() || self.rope_theta <= 1.0 {
            return bad(format!("rope_theta ({}) must be > 1", self.rope_theta));
        }
        let Some(rs) = &self.rope_scaling else {
            return Ok(());
        };
        if rs.kind != RopeType::Yarn {
            return bad(format!(
                "rope_scaling type `{}` is not supported (only yarn)",
                rs.kind.as_str()
            ));
        }
        if !rs.factor.is_finite() || rs.factor < 1.0 {
            return bad(format!("rope_scaling.factor ({}) must be >= 1", rs.factor));
        }
        if let Some(orig) = rs.original_max_position_embeddings
            && (orig == 0 || orig > self.max_position_embeddings)
        {
            return bad(format!(
                "rope_scaling.original_max_position_embeddings ({orig}) must be in \
                 1..=max_position_embeddings ({})",
                self.max_position_embeddings
            ));
        }
        for (name, v) in [
            ("beta_fast", rs.beta_fast),
            ("beta_slow", rs.beta_slow),
            ("mscale", rs.mscale),
            ("mscale_all_dim", rs.mscale_all_dim),
            ("attention_factor", rs.attention_factor),
        ] {
            if let Some(v) = v
                && (!v.is_finite() || v < 0.0)
            {
                return bad(format!("rope_scaling.{name} ({v}) must be finite and >= 0"));
            }
        }
        if let (Some(fast), Some(slow)) = (rs.beta_fast, rs.beta_slow)
            && fast < slow
        {
            return bad(format!(
                "rope_scaling.beta_fast ({fast}) is below beta_slow ({slow})"
            ));
        }
        Ok(())
    }

    fn validate_quantization(&self) -> Result<()> {
        let Some(q) = &self.quantization_config else {
            return Ok(());
        };
        if q.quant_method != QuantMethod::Fp8 {
            return bad(format!(
                "quantization method `{}` is not supported (only fp8)",
                q.quant_method.as_str()
            ));
        }
        if q.fmt == Some(Fp8Format::E5m2) {
            return bad("fp8 format `e5m2` is not supported (only e4m3)".into());
        }
        if let Some([r, c]) = q.weight_block_size
            && (r == 0 || c == 0)
        {
            return bad("weight_block_size entries must be positive".into());
        }
        Ok(())
    }

    fn validate_tokens(&self) -> Result<()> {
        let ids = self.bos_token_id.into_iter().chain(self.eos_token_ids());
        for id in ids {
            if id as usize >= self.vocab_size {
                return bad(format!(
                    "special token id {id} (bos/eos) is outside the vocabulary of {}",
                    self.vocab_size
                ));
            }
        }
        Ok(())
    }

    fn validate_moe(&self) -> Result<()> {
        let Some(m) = self.moe() else { return Ok(()) };
        if m.n_routed_experts == 0 || m.num_experts_per_tok == 0 {
            return bad("n_routed_experts and num_experts_per_tok must be positive".into());
        }
        if m.num_experts_per_tok > m.n_routed_experts {
            return bad(format!(
                "num_experts_per_tok ({}) exceeds n_routed_experts ({})",
                m.num_experts_per_tok, m.n_routed_experts
            ));
        }
        if m.moe_intermediate_size == 0 {
            return bad("moe_intermediate_size must be positive".into());
        }
        if self.moe_layer_freq == 0 {
            return bad("moe_layer_freq must be positive".into());
        }
        if !m.routed_scaling_factor.is_finite() || m.routed_scaling_factor <= 0.0 {
            return bad("routed_scaling_factor must be positive".into());
        }
        if m.topk_method == TopkMethod::Greedy {
            return Ok(());
        }
        if m.n_group == 0 || !m.n_routed_experts.is_multiple_of(m.n_group) {
            return bad(format!(
                "n_routed_experts ({}) is not divisible by n_group ({})",
                m.n_routed_experts, m.n_group
            ));
        }
        if m.topk_group == 0 || m.topk_group > m.n_group {
            return bad(format!(
                "topk_group ({}) must be in 1..=n_group ({})",
                m.topk_group, m.n_group
            ));
        }
        let per_group = m.n_routed_experts / m.n_group;
        if m.num_experts_per_tok > m.topk_group * per_group {
            return bad(format!(
                "num_experts_per_tok ({}) exceeds the experts in topk_group ({}) groups of {}",
                m.num_experts_per_tok, m.topk_group, per_group
            ));
        }
        if m.topk_method == TopkMethod::NoauxTc && per_group < 2 {
            return bad("noaux_tc ranks groups by their top-2 experts: groups need >= 2".into());
        }
        Ok(())
    }
}

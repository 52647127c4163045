//! DeepSeek-V4 tensor names in both spellings a checkpoint can have.
//!
//! The official release names tensors `embed.weight`, `layers.L.attn.wq_a.weight`,
//! `layers.L.hc_attn_fn`, `hc_head_fn`, `head.weight`, ... Hugging Face's `save_pretrained`
//! reverses its conversion mapping but keeps a `model.` prefix and leaves the anchored renames, so
//! it writes a hybrid: `model.embed_tokens.weight`, `model.norm.weight`, `model.hc_head.hc_fn`,
//! `model.layers.L.attn.wq_a.weight`, top-level `head.weight`. [`Names`] detects which one a
//! checkpoint uses and maps the official name of a tensor to its stored name. Per-expert tensors
//! are `…ffn.experts.E.{w1,w2,w3}.weight` in both. Reference: `V4.md` → "Checkpoint names".

use crate::checkpoint::Checkpoint;
use crate::error::{ModelError, Result};

/// Which spelling a checkpoint uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spelling {
    /// DeepSeek's own names (no prefix).
    Official,
    /// What transformers' `save_pretrained` writes (`model.` prefix, HF global names).
    HfSaved,
}

/// Maps official tensor names to a checkpoint's stored names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Names {
    pub spelling: Spelling,
}

impl Names {
    /// Detects the spelling from the embedding's name.
    pub fn detect(ckpt: &Checkpoint) -> Result<Names> {
        let spelling = if ckpt.contains("model.embed_tokens.weight") {
            Spelling::HfSaved
        } else if ckpt.contains("embed.weight") {
            Spelling::Official
        } else {
            return Err(ModelError::MissingTensor {
                name: "embed.weight (or model.embed_tokens.weight)".into(),
            });
        };
        Ok(Names { spelling })
    }

    /// The stored name of a global tensor given by its official name (`embed.weight`,
    /// `norm.weight`, `head.weight`, `hc_head_{fn,base,scale}`).
    pub fn global(&self, official: &str) -> String {
        if self.spelling == Spelling::Official {
            return official.to_string();
        }
        match official {
            "embed.weight" => "model.embed_tokens.weight".into(),
            "norm.weight" => "model.norm.weight".into(),
            o => match o.strip_prefix("hc_head_") {
                Some(part) => format!("model.hc_head.hc_{part}"),
                None => o.to_string(),
            },
        }
    }

    /// The stored name of `layers.{layer}.{rest}` (official `rest`, e.g. `attn.wq_a.weight`).
    pub fn layer(&self, layer: usize, rest: &str) -> String {
        match self.spelling {
            Spelling::Official => format!("layers.{layer}.{rest}"),
            Spelling::HfSaved => format!("model.layers.{layer}.{rest}"),
        }
    }

    /// The prefix of routed expert `expert` of `layer` (`….ffn.experts.E`).
    pub fn expert(&self, layer: usize, expert: usize) -> String {
        self.layer(layer, &format!("ffn.experts.{expert}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_spellings_map_official_names() {
        let hf = Names {
            spelling: Spelling::HfSaved,
        };
        assert_eq!(hf.global("embed.weight"), "model.embed_tokens.weight");
        assert_eq!(hf.global("hc_head_fn"), "model.hc_head.hc_fn");
        assert_eq!(hf.global("head.weight"), "head.weight");
        assert_eq!(hf.layer(3, "hc_attn_fn"), "model.layers.3.hc_attn_fn");
        assert_eq!(hf.expert(1, 7), "model.layers.1.ffn.experts.7");
        let off = Names {
            spelling: Spelling::Official,
        };
        assert_eq!(off.global("hc_head_fn"), "hc_head_fn");
        assert_eq!(
            off.layer(3, "attn.wq_a.weight"),
            "layers.3.attn.wq_a.weight"
        );
    }
}

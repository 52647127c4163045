//! The paged MLA latent cache.
//!
//! Per layer and token MLA needs only the normalised latent `c_kv` (`kv_lora_rank` values) and
//! the rotated shared rope key `k_pe` (`qk_rope_head_dim` values); keys and values of every head
//! are recovered from them through `kv_b_proj`, which attention absorbs into the query and output
//! (DeepSeek-V2 paper §2.1.3). For DeepSeek-V3 that is 576 values per token and layer instead of
//! 128 heads × 320. Rows are stored as `[c_kv | k_pe]`.
//!
//! Rows live in fixed-size pages ([`KvLayout::page_tokens`] tokens, every layer) handed out by a
//! shared [`KvPool`]; each sequence keeps a page table ([`SeqCache`]). Attention reads the pages
//! in place. Full pages can be shared between sequences with the same token prefix (prefix
//! caching): the pool indexes them by a hash of their tokens and of the prefix before them,
//! counts references (an `Arc` per holder) and evicts unreferenced ones least recently used
//! first when it needs room.

mod pool;
mod seq;
#[cfg(test)]
mod tests;

pub use pool::{KvPool, Page, PoolStats};
pub use seq::SeqCache;

use crate::config::{Config, Dtype};

/// Element type of the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvDtype {
    F32,
    Bf16,
}

impl KvDtype {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            KvDtype::F32 => 4,
            KvDtype::Bf16 => 2,
        }
    }

    /// The lower-case name (`f32`, `bf16`).
    pub fn as_str(self) -> &'static str {
        match self {
            KvDtype::F32 => "f32",
            KvDtype::Bf16 => "bf16",
        }
    }
}

/// What `--kv-cache-dtype` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvCacheDtype {
    /// Follow the model (see [`KvCacheDtype::resolve`]).
    #[default]
    Auto,
    Bf16,
    F32,
}

impl std::str::FromStr for KvCacheDtype {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(KvCacheDtype::Auto),
            "bf16" | "bfloat16" => Ok(KvCacheDtype::Bf16),
            "f32" | "float32" => Ok(KvCacheDtype::F32),
            other => Err(format!(
                "unknown KV-cache dtype `{other}` (expected auto, bf16 or f32)"
            )),
        }
    }
}

impl KvCacheDtype {
    /// The element type for `cfg`. This is the one place `auto` is decided.
    ///
    /// `auto` is f32 for every checkpoint for now, although bf16 for bf16/FP8 checkpoints is
    /// the goal (as vLLM does): the golden outputs were computed in f32 with an f32 cache from
    /// the 16-bit weights upcast, and a bf16 cache moves their step logits by up to 2.6 and
    /// changes greedy ids of the bf16 and FP8 golden models (margins 0.12-0.47 at the first
    /// change; `model/tests/paged.rs`). `bf16` halves the cache and is opt-in. To make `auto`
    /// follow the model, return `KvDtype::Bf16` when `checkpoint_is_16_bit(cfg)`.
    pub fn resolve(self, _cfg: &Config) -> KvDtype {
        match self {
            KvCacheDtype::Bf16 => KvDtype::Bf16,
            KvCacheDtype::F32 | KvCacheDtype::Auto => KvDtype::F32,
        }
    }
}

/// Whether the checkpoint stores its weights in 16 bits or fewer (bf16, f16 or block FP8).
pub fn checkpoint_is_16_bit(cfg: &Config) -> bool {
    cfg.fp8_block().is_some() || matches!(cfg.dtype, Some(Dtype::Bfloat16 | Dtype::Float16))
}

/// Default tokens per page.
pub const DEFAULT_PAGE_TOKENS: usize = 16;

/// The shape of every page of a pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvLayout {
    pub layers: usize,
    /// Values per token and layer (`kv_lora_rank + qk_rope_head_dim`).
    pub width: usize,
    pub page_tokens: usize,
    pub dtype: KvDtype,
    /// Pages every sequence holds whatever its length: 0 for the MLA cache; a DeepSeek-V4
    /// cache's bounded state (sliding window, compressor buffers) in pages of its growing part
    /// (`crate::v4::paged`).
    pub fixed_pages: usize,
}

impl KvLayout {
    /// The layout for `cfg`.
    pub fn new(cfg: &Config, page_tokens: usize, dtype: KvDtype) -> KvLayout {
        KvLayout {
            layers: cfg.num_hidden_layers,
            width: cfg.kv_lora_rank + cfg.qk_rope_head_dim,
            page_tokens: page_tokens.max(1),
            dtype,
            fixed_pages: 0,
        }
    }

    /// Bytes per token over all layers.
    pub fn bytes_per_token(&self) -> usize {
        self.layers * self.width * self.dtype.size()
    }

    /// Bytes per page.
    pub fn page_bytes(&self) -> usize {
        self.bytes_per_token() * self.page_tokens
    }

    /// Elements per page.
    pub fn page_elems(&self) -> usize {
        self.layers * self.page_tokens * self.width
    }

    /// Pages a sequence of `tokens` tokens holds (its fixed pages included).
    pub fn pages_for(&self, tokens: usize) -> usize {
        self.fixed_pages + tokens.div_ceil(self.page_tokens)
    }

    /// Tokens one sequence can have in `pages` pages.
    pub fn tokens_in(&self, pages: usize) -> usize {
        pages.saturating_sub(self.fixed_pages) * self.page_tokens
    }
}

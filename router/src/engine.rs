//! What the scheduler runs: a backbone of either model family (DeepSeek-V3 family or V4) plus
//! an expert backend, local (`moe serve`) or remote (`moe router`), and the per-sequence cache
//! each family keeps ([`SeqKv`]): the paged MLA latent cache for V3, the V4 decode cache
//! counted in the same page pool for V4.

use moe_model::model::{Backbone, LogitsMode, Model, SeqInput};
use moe_model::v4::{PagedV4Cache, V4Backbone, V4Model, V4SeqInput};
use moe_model::{
    Config, ExpertBackend, KvCacheDtype, KvLayout, KvPool, Matrix, ModelError, Overlap, SeqCache,
};

use crate::dispatch::RemoteExperts;
use crate::scheduler::KvConfig;

/// Everything but the routed experts, of either family.
#[derive(Debug)]
pub enum AnyBackbone {
    V3(Box<Backbone>),
    V4(Box<V4Backbone>),
}

impl From<Backbone> for AnyBackbone {
    fn from(b: Backbone) -> Self {
        AnyBackbone::V3(Box::new(b))
    }
}

impl From<V4Backbone> for AnyBackbone {
    fn from(b: V4Backbone) -> Self {
        AnyBackbone::V4(Box::new(b))
    }
}

impl AnyBackbone {
    /// Width of the hidden states on the wire.
    pub fn hidden_size(&self) -> usize {
        match self {
            AnyBackbone::V3(b) => b.config().hidden_size,
            AnyBackbone::V4(b) => b.config().hidden_size,
        }
    }
}

/// What the scheduler and the API need to know of the model.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelShape {
    pub vocab_size: usize,
    /// The model's context length (`max_position_embeddings`).
    pub context: usize,
    pub eos_token_ids: Vec<u32>,
    /// `deepseek_v3`-family or `deepseek_v4`, for logs.
    pub family: &'static str,
}

/// One sequence's cache, of the engine's family.
#[derive(Debug)]
pub enum SeqKv {
    V3(SeqCache),
    V4(PagedV4Cache),
}

impl SeqKv {
    /// Tokens cached.
    pub fn len(&self) -> usize {
        match self {
            SeqKv::V3(c) => c.len(),
            SeqKv::V4(c) => c.len(),
        }
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// New pages a pass of `n` more tokens needs.
    pub fn pages_needed(&self, n: usize) -> usize {
        match self {
            SeqKv::V3(c) => c.pages_needed(n),
            SeqKv::V4(c) => c.pages_needed(n),
        }
    }

    /// Pages held.
    pub fn pages_held(&self) -> usize {
        match self {
            SeqKv::V3(c) => c.pages().len(),
            SeqKv::V4(c) => c.pages_held(),
        }
    }

    /// Forgets the cache and gives its pages back (preemption by recompute).
    pub fn release(&mut self) {
        match self {
            SeqKv::V3(c) => c.release(),
            SeqKv::V4(c) => c.release(),
        }
    }

    /// Reuses cached pages of `context`'s prefix; the tokens reused (always 0 for V4, whose
    /// compressor state is not shared by prefix).
    pub fn adopt_prefix(&mut self, context: &[u32]) -> usize {
        match self {
            SeqKv::V3(c) => c.adopt_prefix(context),
            SeqKv::V4(_) => 0,
        }
    }
}

/// A loaded engine.
pub struct Engine {
    backbone: AnyBackbone,
    experts: Box<dyn ExpertBackend>,
    /// Two-batch overlap of each step ([`moe_model::overlap`]).
    overlap: Overlap,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").finish_non_exhaustive()
    }
}

impl Engine {
    /// Everything in this process (V3 family).
    pub fn local(model: Model) -> Engine {
        Engine {
            backbone: model.backbone.into(),
            experts: Box::new(model.experts),
            overlap: Overlap::default(),
        }
    }

    /// Everything in this process (DeepSeek-V4).
    pub fn local_v4(model: V4Model) -> Engine {
        Engine {
            backbone: model.backbone.into(),
            experts: Box::new(model.experts),
            overlap: Overlap::default(),
        }
    }

    /// The backbone with any expert backend (tests inject failing ones).
    pub fn with_backend(
        backbone: impl Into<AnyBackbone>,
        experts: Box<dyn ExpertBackend>,
    ) -> Engine {
        Engine {
            backbone: backbone.into(),
            experts,
            overlap: Overlap::default(),
        }
    }

    /// The backbone here, routed experts on expert nodes.
    pub fn remote(
        backbone: impl Into<AnyBackbone>,
        experts: std::sync::Arc<RemoteExperts>,
    ) -> Engine {
        Engine {
            backbone: backbone.into(),
            experts: Box::new(experts),
            overlap: Overlap::default(),
        }
    }

    /// Sets two-batch overlap (`auto` by default: on for remote experts and batches big enough;
    /// V3-family backbones only, V4 runs serially).
    pub fn with_overlap(mut self, overlap: Overlap) -> Engine {
        self.overlap = overlap;
        self
    }

    /// The V3-family configuration, if this engine runs one.
    pub fn v3_config(&self) -> Option<&Config> {
        match &self.backbone {
            AnyBackbone::V3(b) => Some(b.config()),
            AnyBackbone::V4(_) => None,
        }
    }

    /// What the scheduler and the API need to know of the model.
    pub fn shape(&self) -> ModelShape {
        match &self.backbone {
            AnyBackbone::V3(b) => {
                let c = b.config();
                ModelShape {
                    vocab_size: c.vocab_size,
                    context: c.max_position_embeddings,
                    eos_token_ids: c.eos_token_ids(),
                    family: "deepseek_v3",
                }
            }
            AnyBackbone::V4(b) => {
                let c = b.config();
                ModelShape {
                    vocab_size: c.vocab_size,
                    context: c.max_position_embeddings,
                    eos_token_ids: c.eos_token_ids(),
                    family: "deepseek_v4",
                }
            }
        }
    }

    /// The page shape of this model's cache under `kv`.
    pub fn kv_layout(&self, kv: &KvConfig) -> Result<KvLayout, String> {
        match &self.backbone {
            AnyBackbone::V3(b) => {
                let c = b.config();
                Ok(KvLayout::new(c, kv.page_tokens, kv.dtype.resolve(c)))
            }
            AnyBackbone::V4(b) => match kv.dtype {
                KvCacheDtype::Bf16 => Err(
                    "--kv-cache-dtype bf16: the DeepSeek-V4 decode cache is kept in f32 (use auto or f32)"
                        .into(),
                ),
                KvCacheDtype::Auto | KvCacheDtype::F32 => {
                    Ok(moe_model::v4::paged::layout(b.config(), kv.page_tokens))
                }
            },
        }
    }

    /// Whether sequences may share cached pages of a common prefix (the MLA cache only).
    pub fn shares_prefixes(&self) -> bool {
        matches!(self.backbone, AnyBackbone::V3(_))
    }

    /// An empty cache for one sequence, counted in `pool`.
    pub fn new_cache(&self, pool: &KvPool) -> SeqKv {
        match &self.backbone {
            AnyBackbone::V3(_) => SeqKv::V3(SeqCache::in_pool(pool)),
            AnyBackbone::V4(b) => SeqKv::V4(PagedV4Cache::new(b.config(), pool)),
        }
    }

    /// One forward pass over `(new tokens, cache)` of each sequence. On error every cache is
    /// left as it was.
    pub fn forward(
        &self,
        seqs: &mut [(&[u32], &mut SeqKv)],
        mode: LogitsMode,
    ) -> moe_model::Result<Vec<Matrix>> {
        let mismatch = || ModelError::InvalidInput("a cache of the other model family".into());
        match &self.backbone {
            AnyBackbone::V3(b) => {
                let mut inputs = Vec::with_capacity(seqs.len());
                for (tokens, kv) in seqs.iter_mut() {
                    let SeqKv::V3(cache) = &mut **kv else {
                        return Err(mismatch());
                    };
                    inputs.push(SeqInput { tokens, cache });
                }
                b.forward_with(&mut inputs, self.experts.as_ref(), mode, None, self.overlap)
            }
            AnyBackbone::V4(b) => {
                let mut inputs = Vec::with_capacity(seqs.len());
                for (tokens, kv) in seqs.iter_mut() {
                    let SeqKv::V4(cache) = &mut **kv else {
                        return Err(mismatch());
                    };
                    // Pages first: a pass that cannot have them does not start.
                    cache.reserve(tokens.len())?;
                    inputs.push(V4SeqInput {
                        tokens,
                        cache: cache.cache_mut(),
                    });
                }
                b.forward(&mut inputs, self.experts.as_ref(), mode, None)
            }
        }
    }
}

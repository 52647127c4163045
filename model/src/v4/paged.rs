//! The DeepSeek-V4 decode cache under the scheduler's page budget.
//!
//! A V4 sequence's state is a bounded part — per layer the sliding window (`sliding_window − 1`
//! K=V rows), and on CSA/HCA layers the compressor buffers (the incomplete window, and for
//! CSA the last complete one) with the indexer's own copy — plus a part that grows by one
//! compressed entry per `rate` tokens on CSA/HCA layers (and one indexer key on CSA). The
//! state lives in the [`V4Cache`]'s own buffers (the attention code reads them contiguously);
//! the pages of the shared [`KvPool`] count it: a V4 pool's page is the growing part of
//! `page_tokens` tokens ([`layout`]), and every sequence also holds the pages of its bounded
//! part (`KvLayout::fixed_pages`). So admission, preemption and the budget work as for the MLA
//! cache, and a sequence holds at least as many page bytes as its state takes
//! ([`state_bound`]). Pages are budget only ([`KvPool::reserve`]); prefix sharing does not
//! apply (the compressor state depends on the whole prefix and is not paged by tokens).

use super::cache::V4Cache;
use super::{AttnLayerType, V4Config};
use crate::cache::{KvDtype, KvLayout, KvPool, Page};
use crate::error::{ModelError, Result};

/// (entry width, rate, overlap) of every compressor of `cfg`'s layers.
fn compressors(cfg: &V4Config) -> impl Iterator<Item = (usize, usize, bool)> + '_ {
    cfg.layer_types.iter().flat_map(move |t| {
        let r = &cfg.compress_rates;
        match t {
            AttnLayerType::Sliding => vec![],
            AttnLayerType::Hca => vec![(cfg.head_dim, r.hca, false)],
            AttnLayerType::Csa => vec![
                (cfg.head_dim, r.csa, true),
                (cfg.index_head_dim, r.csa, true),
            ],
        }
    })
}

/// f32 values per token of the growing part (entries), rounded up per compressor.
fn growth_per_token(cfg: &V4Config) -> usize {
    compressors(cfg)
        .map(|(d, m, _)| d.div_ceil(m.max(1)))
        .sum::<usize>()
        .max(1)
}

/// Bytes of the bounded part at most: full windows and full buffers.
fn bounded_bytes(cfg: &V4Config) -> usize {
    let window = cfg.num_hidden_layers * cfg.sliding_window.saturating_sub(1) * cfg.head_dim;
    let buffers: usize = compressors(cfg)
        .map(|(d, m, overlap)| {
            let w = if overlap { 2 * d } else { d };
            // kv and gate: the incomplete window, and the last complete one with overlap.
            2 * (m.saturating_sub(1) * w + if overlap { m * w } else { 0 })
        })
        .sum();
    (window + buffers) * 4
}

/// Bytes a sequence's state may take after `tokens` tokens (between passes).
pub fn state_bound(cfg: &V4Config, tokens: usize) -> usize {
    bounded_bytes(cfg) + tokens * growth_per_token(cfg) * 4
}

/// The page shape of a V4 pool: a page is the growing part of `page_tokens` tokens, and
/// every sequence holds the pages of its bounded part besides.
pub fn layout(cfg: &V4Config, page_tokens: usize) -> KvLayout {
    let mut l = KvLayout {
        layers: 1,
        width: growth_per_token(cfg),
        page_tokens: page_tokens.max(1),
        dtype: KvDtype::F32,
        fixed_pages: 0,
    };
    l.fixed_pages = bounded_bytes(cfg).div_ceil(l.page_bytes());
    l
}

/// A V4 cache holding the pages that count its state.
#[derive(Debug)]
pub struct PagedV4Cache {
    cache: V4Cache,
    pages: Vec<Page>,
    pool: KvPool,
}

impl PagedV4Cache {
    /// An empty cache counted in `pool` (whose layout is [`layout`] of `cfg`).
    pub fn new(cfg: &V4Config, pool: &KvPool) -> PagedV4Cache {
        PagedV4Cache {
            cache: V4Cache::new(cfg),
            pages: Vec::new(),
            pool: pool.clone(),
        }
    }

    /// Tokens cached.
    pub fn len(&self) -> usize {
        self.cache.len()
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.cache.is_empty()
    }

    /// The state, for a forward pass.
    pub fn cache_mut(&mut self) -> &mut V4Cache {
        &mut self.cache
    }

    /// The state.
    pub fn cache(&self) -> &V4Cache {
        &self.cache
    }

    /// Pages held.
    pub fn pages_held(&self) -> usize {
        self.pages.len()
    }

    /// New pages a pass of `n` more tokens needs.
    pub fn pages_needed(&self, n: usize) -> usize {
        self.pool
            .layout()
            .pages_for(self.len() + n)
            .saturating_sub(self.pages.len())
    }

    /// Takes the pages a pass of `n` more tokens needs; on failure nothing changes.
    pub fn reserve(&mut self, n: usize) -> Result<()> {
        let need = self.pages_needed(n);
        let mut got = Vec::with_capacity(need);
        for _ in 0..need {
            match self.pool.reserve() {
                Some(p) => got.push(p),
                None => {
                    return Err(ModelError::KvCacheFull {
                        needed: need,
                        free: got.len(),
                    });
                }
            }
        }
        self.pages.extend(got);
        Ok(())
    }

    /// Forgets every token and gives the pages back (preemption).
    pub fn release(&mut self) {
        self.cache.clear();
        self.pages.clear();
    }
}

//! One sequence's page table: the pages holding its cached tokens in order, the tokens
//! themselves (to hash full pages for the prefix index), and the rows of the forward pass in
//! flight (written by attention, made part of the cache by [`SeqCache::commit`]).

use std::sync::Arc;

use super::pool::{Page, page_hash};
use super::{DEFAULT_PAGE_TOKENS, KvDtype, KvLayout, KvPool};
use crate::config::Config;
use crate::error::{ModelError, Result};

/// The hash chain's seed (the "prefix" of the first page).
const ROOT: u64 = 0;

/// Compressed cache of one sequence across all layers.
#[derive(Debug)]
pub struct SeqCache {
    pool: KvPool,
    pages: Vec<Arc<Page>>,
    /// Tokens committed.
    len: usize,
    /// Tokens of the forward pass in flight (prepared, not committed).
    pending: usize,
    /// The committed tokens, then the pending ones.
    tokens: Vec<u32>,
    /// Prefix hash of each full page.
    hashes: Vec<u64>,
}

impl SeqCache {
    /// An empty cache shaped for `cfg` in a pool of its own (f32, unbounded, no prefix
    /// sharing): for tools and tests that run one sequence at a time.
    pub fn new(cfg: &Config) -> SeqCache {
        let layout = KvLayout::new(cfg, DEFAULT_PAGE_TOKENS, KvDtype::F32);
        SeqCache::in_pool(&KvPool::new(layout, None, false))
    }

    /// An empty cache whose pages come from `pool`.
    pub fn in_pool(pool: &KvPool) -> SeqCache {
        SeqCache {
            pool: pool.clone(),
            pages: Vec::new(),
            len: 0,
            pending: 0,
            tokens: Vec::new(),
            hashes: Vec::new(),
        }
    }

    /// Tokens cached (committed by completed forward passes).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The page shape.
    pub fn layout(&self) -> &KvLayout {
        self.pool.layout()
    }

    /// Values per token and layer (`kv_lora_rank + qk_rope_head_dim`).
    pub fn width(&self) -> usize {
        self.layout().width
    }

    /// Bytes per token over all layers.
    pub fn bytes_per_token(&self) -> usize {
        self.layout().bytes_per_token()
    }

    /// Bytes of the pages this sequence holds (shared pages included).
    pub fn bytes(&self) -> usize {
        self.pages.len() * self.layout().page_bytes()
    }

    /// The page table.
    pub fn pages(&self) -> &[Arc<Page>] {
        &self.pages
    }

    /// Pages held that other sequences or the prefix index hold too.
    pub fn shared_pages(&self) -> usize {
        self.pages
            .iter()
            .filter(|p| Arc::strong_count(p) > 1)
            .count()
    }

    /// New pages a forward pass of `n` more tokens needs (including a copy of a shared
    /// partly-filled last page).
    pub fn pages_needed(&self, n: usize) -> usize {
        let l = self.layout();
        let grow = l.pages_for(self.len + n).saturating_sub(self.pages.len());
        grow + usize::from(self.tail_is_shared())
    }

    fn tail_is_shared(&self) -> bool {
        !self.len.is_multiple_of(self.layout().page_tokens)
            && self.pages.last().is_some_and(|p| Arc::strong_count(p) > 1)
    }

    /// Makes room for `tokens` (the next forward pass): a private copy of a shared last page
    /// and new pages. On failure nothing changes.
    pub(crate) fn prepare(&mut self, tokens: &[u32]) -> Result<()> {
        self.truncate(self.len); // drops a previous pass that was never committed
        let need = self.pages_needed(tokens.len());
        let mut fresh = Vec::with_capacity(need);
        for _ in 0..need {
            match self.pool.alloc() {
                Some(p) => fresh.push(p),
                None => {
                    return Err(ModelError::KvCacheFull {
                        needed: need,
                        free: fresh.len(),
                    });
                }
            }
        }
        let mut fresh = fresh.into_iter();
        if self.tail_is_shared()
            && let (Some(tail), Some(mut copy)) = (self.pages.last_mut(), fresh.next())
        {
            copy.copy_from(tail);
            *tail = Arc::new(copy);
        }
        self.pages.extend(fresh.map(Arc::new));
        self.pending = tokens.len();
        self.tokens.extend_from_slice(tokens);
        Ok(())
    }

    /// Writes the in-flight pass's rows of `layer` (`[pending, width]`).
    pub(crate) fn write(&mut self, layer: usize, rows: &[f32]) {
        let layout = *self.layout();
        let (p, w) = (layout.page_tokens, layout.width);
        debug_assert_eq!(rows.len(), self.pending * w);
        let mut pos = self.len;
        let mut rest = rows;
        while !rest.is_empty() {
            let (page, slot) = (pos / p, pos % p);
            let n = (p - slot).min(rest.len() / w);
            let (mine, tail) = rest.split_at(n * w);
            Arc::get_mut(&mut self.pages[page])
                .expect("pages past the committed length are private after prepare")
                .write(&layout, layer, slot, mine);
            pos += n;
            rest = tail;
        }
    }

    /// Makes the pending tokens part of the cache and offers newly full pages to the prefix
    /// index.
    pub(crate) fn commit(&mut self) {
        self.len += self.pending;
        self.pending = 0;
        let p = self.layout().page_tokens;
        while self.hashes.len() < self.len / p {
            let i = self.hashes.len();
            let parent = self.hashes.last().copied().unwrap_or(ROOT);
            let toks = &self.tokens[i * p..(i + 1) * p];
            let h = page_hash(parent, toks);
            self.pool.register(h, parent, toks, &self.pages[i]);
            self.hashes.push(h);
        }
    }

    /// Drops everything past `len` tokens (also rolls back a forward pass in flight).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
        self.pending = 0;
        let l = *self.layout();
        self.tokens.truncate(self.len);
        self.pages.truncate(l.pages_for(self.len));
        self.hashes.truncate(self.len / l.page_tokens);
    }

    /// Gives every page back (the cache is empty afterwards).
    pub fn release(&mut self) {
        self.truncate(0);
    }

    /// Starts an empty cache from the cached full pages of `prompt`'s longest cached prefix,
    /// leaving at least one prompt token to compute; returns the tokens reused.
    pub fn adopt_prefix(&mut self, prompt: &[u32]) -> usize {
        if !self.is_empty() || !self.pool.prefix_caching() || prompt.is_empty() {
            return 0;
        }
        let p = self.layout().page_tokens;
        let mut parent = ROOT;
        for toks in prompt[..prompt.len() - 1].chunks_exact(p) {
            let h = page_hash(parent, toks);
            let Some(page) = self.pool.lookup(h, parent, toks) else {
                break;
            };
            self.pages.push(page);
            self.hashes.push(h);
            self.tokens.extend_from_slice(toks);
            self.len += p;
            parent = h;
        }
        self.len
    }
}

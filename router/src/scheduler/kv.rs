//! The scheduler's KV-cache settings and page accounting: the pool built from a byte budget,
//! `--max-model-len` resolution, and preemption by recompute when a step needs more pages than
//! are free (youngest sequence first; it goes back to the front of the waiting queue and is
//! resumed, never failed).

use moe_model::{Config, KvCacheDtype, KvLayout, KvPool};

use super::Loop;
use crate::metrics as m;

/// KV-cache settings.
#[derive(Debug, Clone)]
pub struct KvConfig {
    /// Memory budget for the pages, bytes.
    pub budget_bytes: usize,
    /// Tokens per page.
    pub page_tokens: usize,
    /// Element type (`auto` follows the model: [`KvCacheDtype::resolve`]).
    pub dtype: KvCacheDtype,
    /// Share full pages between sequences with the same prefix.
    pub prefix_caching: bool,
}

impl Default for KvConfig {
    fn default() -> Self {
        KvConfig {
            budget_bytes: 4 << 30,
            page_tokens: moe_model::cache::DEFAULT_PAGE_TOKENS,
            dtype: KvCacheDtype::Auto,
            prefix_caching: true,
        }
    }
}

impl KvConfig {
    /// The page shape for `cfg`.
    pub fn layout(&self, cfg: &Config) -> KvLayout {
        KvLayout::new(cfg, self.page_tokens, self.dtype.resolve(cfg))
    }

    /// Pages the budget holds.
    pub fn pages(&self, cfg: &Config) -> usize {
        self.budget_bytes / self.layout(cfg).page_bytes().max(1)
    }

    /// Tokens the budget holds.
    pub fn tokens(&self, cfg: &Config) -> usize {
        self.pages(cfg) * self.layout(cfg).page_tokens
    }

    /// The pool for `cfg`.
    pub fn pool(&self, cfg: &Config) -> KvPool {
        KvPool::new(self.layout(cfg), Some(self.pages(cfg)), self.prefix_caching)
    }
}

/// The longest context a request may have: `requested` (`--max-model-len`) when it fits both
/// the model and the KV budget, by default the model's context capped by what the budget holds
/// for one sequence.
pub fn max_model_len(
    cfg: &Config,
    kv: &KvConfig,
    requested: Option<usize>,
) -> Result<usize, String> {
    let model = cfg.max_position_embeddings;
    let holds = kv.tokens(cfg);
    if holds == 0 {
        return Err(format!(
            "the KV-cache budget of {} bytes holds no page of {} tokens ({} bytes)",
            kv.budget_bytes,
            kv.page_tokens,
            kv.layout(cfg).page_bytes()
        ));
    }
    match requested {
        None => Ok(model.min(holds)),
        Some(0) => Err("--max-model-len must be at least 1".into()),
        Some(n) if n > model => Err(format!(
            "--max-model-len {n} exceeds the model's context length {model}"
        )),
        Some(n) if n > holds => Err(format!(
            "--max-model-len {n} exceeds what the KV-cache budget holds for one sequence ({holds} tokens of {} bytes)",
            kv.layout(cfg).bytes_per_token()
        )),
        Some(n) => Ok(n),
    }
}

impl Loop {
    /// New pages the step `inputs` needs.
    pub(super) fn pages_needed(&self, inputs: &[(usize, Vec<u32>)]) -> usize {
        inputs
            .iter()
            .map(|(i, t)| self.running[*i].cache.pages_needed(t.len()))
            .sum()
    }

    /// Preempts the youngest running sequence (the last to arrive): frees its pages and puts it
    /// at the front of the waiting queue, to be recomputed and resumed. Returns false when
    /// nothing is running.
    pub(super) fn preempt_youngest(&mut self) -> bool {
        let Some((i, _)) = self.running.iter().enumerate().max_by_key(|(_, s)| s.id) else {
            return false;
        };
        let mut seq = self.running.remove(i);
        seq.preempt();
        tracing::debug!(
            seq = seq.id,
            context = seq.context_len(),
            preemptions = seq.preemptions,
            "preempted for KV pages"
        );
        metrics::counter!(m::PREEMPTIONS).increment(1);
        seq.phase = tracing::info_span!(parent: &seq.span, "scheduler.queue", preempted = true);
        self.waiting.push_front(seq);
        self.stats
            .waiting
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        true
    }
}

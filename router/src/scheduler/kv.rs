//! The scheduler's KV-cache settings and page accounting: the pool built from a byte budget,
//! `--max-model-len` resolution, and preemption by recompute when a step needs more pages than
//! are free (youngest sequence first; it goes back to the front of the waiting queue and is
//! resumed, never failed).

use moe_model::{KvCacheDtype, KvLayout, KvPool};

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
    /// Pages the budget holds for `layout`.
    pub fn pages(&self, layout: &KvLayout) -> usize {
        self.budget_bytes / layout.page_bytes().max(1)
    }

    /// Tokens the budget holds for one sequence.
    pub fn tokens(&self, layout: &KvLayout) -> usize {
        layout.tokens_in(self.pages(layout))
    }

    /// The pool for `layout` (prefix sharing only where `shares_prefixes`).
    pub fn pool(&self, layout: KvLayout, shares_prefixes: bool) -> KvPool {
        KvPool::new(
            layout,
            Some(self.pages(&layout)),
            self.prefix_caching && shares_prefixes,
        )
    }
}

/// The longest context a request may have: `requested` (`--max-model-len`) when it fits both
/// the model (`model` tokens) and the KV budget, by default the model's context capped by what
/// the budget holds for one sequence.
pub fn max_model_len(
    model: usize,
    kv: &KvConfig,
    layout: &KvLayout,
    requested: Option<usize>,
) -> Result<usize, String> {
    let holds = kv.tokens(layout);
    if holds == 0 {
        return Err(format!(
            "the KV-cache budget of {} bytes holds no sequence: a page of {} tokens takes {} bytes and every sequence {} pages besides",
            kv.budget_bytes,
            kv.page_tokens,
            layout.page_bytes(),
            layout.fixed_pages
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
            layout.bytes_per_token()
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

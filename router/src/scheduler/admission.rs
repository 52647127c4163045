//! Admission by pages: a waiting sequence joins the batch when the pages its context needs
//! plus decode headroom (one page, or less when `max_tokens` is near) fit next to what the
//! running sequences hold or are committed to, and the pool has those pages free with one to
//! spare per running sequence (so that admitting it does not preempt someone at once).
//! `max_tokens` is not reserved: sequences that outgrow the cache are preempted instead
//! ([`super::kv`]).

use std::sync::atomic::Ordering;

use super::Loop;
use super::sequence::Seq;

impl Loop {
    /// Pages `seq` is counted for: what it holds, or its context plus headroom if more.
    fn committed_pages(&self, seq: &Seq) -> usize {
        let l = self.pool.layout();
        let headroom = seq.remaining().min(l.page_tokens);
        l.pages_for(seq.context_len() + headroom)
            .max(seq.cache.pages_held())
    }

    pub(super) fn admit(&mut self) {
        let capacity = self.pool.stats().capacity;
        let mut committed: usize = self.running.iter().map(|s| self.committed_pages(s)).sum();
        while let Some(front) = self.waiting.front() {
            let need = self.committed_pages(front);
            let free = self.pool.stats().free();
            // Alone, a sequence always fits: --max-model-len is within the budget.
            let alone = self.running.is_empty();
            if self.running.len() >= self.cfg.max_running
                || (!alone && (committed + need > capacity || need + self.running.len() > free))
            {
                break;
            }
            committed += need;
            if let Some(mut seq) = self.waiting.pop_front() {
                self.stats.waiting.fetch_sub(1, Ordering::SeqCst);
                let reused = seq.adopt_prefix();
                seq.phase = tracing::info_span!(parent: &seq.span, "engine.prefill", prompt_tokens = seq.req.prompt.len(), prefix_cached_tokens = reused);
                self.running.push(seq);
            }
        }
    }
}

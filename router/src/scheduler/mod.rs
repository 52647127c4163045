//! The continuous-batching scheduler: an actor owning every sequence and the engine.
//!
//! Each step batches one decode token of every running sequence that has finished its prompt
//! plus prefill chunks of the others, under a token budget. The KV cache is a pool of pages
//! (`moe_model::cache`): sequences are admitted by the pages their prompt needs plus decode
//! headroom ([`admission`]), reuse cached pages of a shared prefix, and when a step needs more
//! pages than are free the youngest sequences are preempted and later recomputed ([`kv`]);
//! past `max_waiting` new requests are refused with 429. A sequence leaves the batch the step it finishes; a client that goes away
//! (its event receiver dropped) is cancelled and its cache freed at the start of the next step.
//! The engine runs on its own thread; the handle is a cheap clone around a channel. After each
//! step the sequences' tokens are sampled, their logprobs computed and their text
//! detokenized in parallel on the rayon pool (each sequence has its own RNG and detokenizer, so
//! results do not depend on the batch or the thread).

mod admission;
pub mod kv;
mod sequence;
mod stops;

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Instant;

use moe_model::model::LogitsMode;
use moe_model::{KvPool, Matrix, ModelError};
use rayon::prelude::*;
use tokio::sync::mpsc;

pub use kv::{KvConfig, max_model_len};
use sequence::Seq;
pub use sequence::{Event, FinishReason, GenerationRequest, TokenLogprob};

use crate::engine::{Engine, SeqKv};
use crate::error::ApiError;
use crate::metrics as m;
use crate::tokenize::TextCodec;

/// Scheduler limits.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// Tokens per engine step (decode tokens plus prefill chunks).
    pub max_batch_tokens: usize,
    /// Sequences running at once.
    pub max_running: usize,
    /// Requests waiting for admission before new ones get 429.
    pub max_waiting: usize,
    /// The paged KV cache.
    pub kv: KvConfig,
    /// Test hook: the engine thread panics at this step (1-based), to exercise what a panic
    /// does to readiness and to the process.
    pub panic_at_step: Option<u64>,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            max_batch_tokens: 2048,
            max_running: 256,
            max_waiting: 1024,
            kv: KvConfig::default(),
            panic_at_step: None,
        }
    }
}

struct Command {
    req: GenerationRequest,
    events: mpsc::UnboundedSender<Event>,
    span: tracing::Span,
}

/// The scheduler's counters, shared with the handle and /ready.
#[derive(Debug)]
pub struct Stats {
    pub waiting: AtomicUsize,
    pub running: AtomicUsize,
    /// Tokens in KV pages held by sequences.
    pub kv_used: AtomicUsize,
    pub alive: AtomicBool,
    /// Set (to `true` for a panic) when the engine thread ends.
    ended: tokio::sync::watch::Sender<Option<bool>>,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            waiting: AtomicUsize::new(0),
            running: AtomicUsize::new(0),
            kv_used: AtomicUsize::new(0),
            alive: AtomicBool::new(false),
            ended: tokio::sync::watch::channel(None).0,
        }
    }
}

/// Marks the engine dead when its thread ends, by return or by panic (it runs while unwinding).
struct AliveGuard(Arc<Stats>);

impl Drop for AliveGuard {
    fn drop(&mut self) {
        let panicked = std::thread::panicking();
        self.0.alive.store(false, Ordering::SeqCst);
        if panicked {
            tracing::error!("the engine thread panicked: /ready answers 503 from now on");
        }
        self.0.ended.send_replace(Some(panicked));
    }
}

/// A handle to submit requests.
#[derive(Clone)]
pub struct Scheduler {
    tx: std::sync::mpsc::Sender<Command>,
    stats: Arc<Stats>,
    cfg: SchedulerConfig,
    pool: KvPool,
}

impl std::fmt::Debug for Scheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scheduler").field("cfg", &self.cfg).finish()
    }
}

impl Scheduler {
    /// Starts the engine thread; an error when the KV settings do not suit the model.
    pub fn start(
        engine: Engine,
        codec: Arc<TextCodec>,
        cfg: SchedulerConfig,
    ) -> Result<Scheduler, String> {
        let (tx, rx) = std::sync::mpsc::channel();
        let stats = Arc::new(Stats::default());
        let loop_ = Loop::new(engine, codec, cfg.clone(), stats.clone())?;
        let pool = loop_.pool.clone();
        stats.alive.store(true, Ordering::SeqCst);
        let spawned = std::thread::Builder::new()
            .name("moe-scheduler".into())
            .spawn(move || loop_.run(rx));
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the scheduler thread");
            stats.alive.store(false, Ordering::SeqCst);
        }
        Ok(Scheduler {
            tx,
            stats,
            cfg,
            pool,
        })
    }

    /// The KV-cache pool.
    pub fn pool(&self) -> &KvPool {
        &self.pool
    }

    /// The limits.
    pub fn config(&self) -> &SchedulerConfig {
        &self.cfg
    }

    /// Counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Resolves when the engine thread has ended, with `true` if it panicked.
    pub async fn ended(&self) -> bool {
        let mut rx = self.stats.ended.subscribe();
        match rx.wait_for(Option::is_some).await {
            Ok(v) => v.unwrap_or(false),
            Err(_) => false,
        }
    }

    /// Queues a request; its events arrive on the returned channel. Drop it to cancel.
    pub fn submit(
        &self,
        req: GenerationRequest,
    ) -> Result<mpsc::UnboundedReceiver<Event>, ApiError> {
        let holds = self.pool.layout().tokens_in(self.pool.stats().capacity);
        if req.prompt.len() + 1 > holds {
            return Err(ApiError::bad_request(format!(
                "the prompt ({} tokens) does not fit the KV cache ({holds} tokens)",
                req.prompt.len(),
            )));
        }
        let waiting = self.stats.waiting.fetch_add(1, Ordering::SeqCst);
        if waiting >= self.cfg.max_waiting {
            self.stats.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(ApiError::Overloaded { waiting });
        }
        let (events, rx) = mpsc::unbounded_channel();
        let cmd = Command {
            req,
            events,
            span: tracing::Span::current(),
        };
        if self.tx.send(cmd).is_err() {
            self.stats.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(ApiError::Unavailable("the engine has stopped".into()));
        }
        Ok(rx)
    }
}

struct Loop {
    /// First field, so dropped first: the engine is marked dead before the sequences' event
    /// channels close (a handler that sees its channel close then finds `/ready` at 503).
    _alive: AliveGuard,
    pool: KvPool,
    engine: Engine,
    /// The model's end-of-sequence ids.
    eos: Vec<u32>,
    codec: Arc<TextCodec>,
    cfg: SchedulerConfig,
    stats: Arc<Stats>,
    waiting: VecDeque<Seq>,
    running: Vec<Seq>,
    next_id: u64,
    steps: u64,
}

impl Loop {
    /// The loop over `engine` with a pool built from `cfg.kv` for its model.
    fn new(
        engine: Engine,
        codec: Arc<TextCodec>,
        cfg: SchedulerConfig,
        stats: Arc<Stats>,
    ) -> Result<Loop, String> {
        let layout = engine.kv_layout(&cfg.kv)?;
        let pool = cfg.kv.pool(layout, engine.shares_prefixes());
        let shape = engine.shape();
        metrics::gauge!(m::KV_CAPACITY_TOKENS).set(layout.tokens_in(pool.stats().capacity) as f64);
        tracing::info!(
            family = shape.family,
            pages = pool.stats().capacity,
            page_tokens = layout.page_tokens,
            fixed_pages_per_sequence = layout.fixed_pages,
            dtype = layout.dtype.as_str(),
            bytes_per_token = layout.bytes_per_token(),
            prefix_caching = pool.prefix_caching(),
            "KV cache"
        );
        Ok(Loop {
            _alive: AliveGuard(stats.clone()),
            pool,
            engine,
            eos: shape.eos_token_ids,
            codec,
            cfg,
            stats,
            waiting: VecDeque::new(),
            running: Vec::new(),
            next_id: 0,
            steps: 0,
        })
    }

    fn run(mut self, rx: std::sync::mpsc::Receiver<Command>) {
        loop {
            if self.running.is_empty() && self.waiting.is_empty() {
                match rx.recv() {
                    Ok(cmd) => self.enqueue(cmd),
                    Err(_) => return,
                }
            }
            while let Ok(cmd) = rx.try_recv() {
                self.enqueue(cmd);
            }
            self.drop_cancelled();
            self.admit();
            self.publish();
            if !self.running.is_empty() {
                self.step();
                self.publish();
            }
        }
    }

    fn enqueue(&mut self, cmd: Command) {
        self.next_id += 1;
        let cache = self.engine.new_cache(&self.pool);
        self.waiting
            .push_back(Seq::new(self.next_id, cmd.req, cache, cmd.events, cmd.span));
    }

    fn drop_cancelled(&mut self) {
        let before = self.running.len() + self.waiting.len();
        let waiting_before = self.waiting.len();
        self.running.retain(|s| !s.cancelled());
        self.waiting.retain(|s| !s.cancelled());
        self.stats
            .waiting
            .fetch_sub(waiting_before - self.waiting.len(), Ordering::SeqCst);
        let gone = before - self.running.len() - self.waiting.len();
        if gone > 0 {
            metrics::counter!(m::CANCELLED).increment(gone as u64);
            tracing::debug!(cancelled = gone, "clients went away");
        }
    }

    fn publish(&self) {
        let st = self.pool.stats();
        // Pages held beyond every running sequence's fixed ones (none for the MLA cache).
        let l = self.pool.layout();
        let used = st.used().saturating_sub(l.fixed_pages * self.running.len()) * l.page_tokens;
        self.stats
            .running
            .store(self.running.len(), Ordering::SeqCst);
        self.stats.kv_used.store(used, Ordering::SeqCst);
        metrics::gauge!(m::RUNNING).set(self.running.len() as f64);
        metrics::gauge!(m::WAITING).set(self.waiting.len() as f64);
        metrics::gauge!(m::KV_USED_TOKENS).set(used as f64);
        metrics::gauge!(m::KV_USAGE).set(st.used() as f64 / st.capacity.max(1) as f64);
        metrics::gauge!(m::KV_CACHED_PAGES).set(st.cached as f64);
        metrics::counter!(m::PREFIX_QUERIES).absolute(st.queried);
        metrics::counter!(m::PREFIX_HITS).absolute(st.hits);
        if st.queried > 0 {
            metrics::gauge!(m::PREFIX_HIT_RATE).set(st.hits as f64 / st.queried as f64);
        }
    }

    /// This step's inputs: a decode token of every decoding sequence, then prefill chunks in
    /// arrival order, under the token budget.
    fn plan(&self) -> Vec<(usize, Vec<u32>)> {
        let mut budget = self.cfg.max_batch_tokens.max(1);
        let mut inputs: Vec<(usize, Vec<u32>)> = Vec::new();
        for (i, s) in self.running.iter().enumerate() {
            if s.decoding() && budget > 0 {
                inputs.push((i, s.next_input(1)));
                budget -= 1;
            }
        }
        for (i, s) in self.running.iter().enumerate() {
            if !s.decoding() && budget > 0 {
                let chunk = s.next_input(budget);
                budget -= chunk.len();
                inputs.push((i, chunk));
            }
        }
        inputs
    }

    /// One engine step over the running sequences.
    fn step(&mut self) {
        let started = Instant::now();
        // Decode tokens first (latency), then prefill chunks; preempt while pages are short
        // (the last sequence left always fits: --max-model-len is within the budget).
        let mut inputs = self.plan();
        while self.running.len() > 1 && self.pages_needed(&inputs) > self.pool.stats().free() {
            self.preempt_youngest();
            inputs = self.plan();
        }
        let tokens: usize = inputs.iter().map(|(_, t)| t.len()).sum();
        let prefill_tokens: usize = inputs
            .iter()
            .filter(|(i, _)| !self.running[*i].decoding())
            .map(|(_, t)| t.len())
            .sum();
        metrics::histogram!(m::BATCH_SEQUENCES).record(inputs.len() as f64);
        metrics::histogram!(m::BATCH_TOKENS).record(tokens as f64);
        metrics::counter!(m::PROMPT_TOKENS).increment(prefill_tokens as u64);

        // A step serves many requests: it is a root linked to each of them (and sampled when
        // any of them is), not a child of one.
        let span = tracing::debug_span!(parent: None, "engine.step", moe.sequences = inputs.len(), moe.tokens = tokens, moe.prefill_tokens = prefill_tokens);
        if !span.is_disabled() {
            for (i, _) in &inputs {
                span.follows_from(&self.running[*i].span);
            }
        }
        self.steps += 1;
        if self.cfg.panic_at_step == Some(self.steps) {
            panic!("engine panic injected at step {} (test hook)", self.steps);
        }
        let _e = span.enter();
        let mut failed: Vec<(usize, ApiError)> = Vec::new();
        let mut preempt = false;
        let logits = loop {
            match self.forward(&inputs) {
                Ok(logits) => break logits,
                Err(ModelError::KvCacheFull { .. }) if self.running.len() > 1 => {
                    // Only when the pages counted free could not be had; the next step retries.
                    preempt = true;
                    break Vec::new();
                }
                Err(e) => {
                    let hit = hit_inputs(&inputs, &e);
                    let err = ApiError::from(e);
                    tracing::warn!(error = %err, sequences = hit.len(), of = inputs.len(), "engine step failed; failing the sequences that needed it");
                    if matches!(err, ApiError::Unavailable(_)) {
                        metrics::counter!(m::DISPATCH_FAILED_SEQUENCES).increment(hit.len() as u64);
                    }
                    for &k in hit.iter().rev() {
                        failed.push((inputs.remove(k).0, err.clone()));
                    }
                    if inputs.is_empty() {
                        break Vec::new();
                    }
                    // The others run again (the failed pass left every cache as it was).
                }
            }
        };
        drop(_e);
        metrics::histogram!(m::STEP_SECONDS).record(started.elapsed().as_secs_f64());
        failed.sort_by_key(|f| std::cmp::Reverse(f.0));
        for (i, err) in failed.iter().cloned() {
            let s = self.running.remove(i);
            let _ = s.events.send(Event::Failed(err));
            for input in inputs.iter_mut() {
                if input.0 > i {
                    input.0 -= 1;
                }
            }
        }
        if preempt {
            self.preempt_youngest();
        } else if !inputs.is_empty() {
            self.after_step(&inputs, &logits);
        }
    }

    /// One forward pass over `inputs` (running index, tokens).
    fn forward(&mut self, inputs: &[(usize, Vec<u32>)]) -> moe_model::Result<Vec<Matrix>> {
        let mut seqs: Vec<(&[u32], &mut SeqKv)> = Vec::with_capacity(inputs.len());
        let mut caches: Vec<Option<&mut SeqKv>> = self
            .running
            .iter_mut()
            .map(|s| Some(&mut s.cache))
            .collect();
        for (i, toks) in inputs {
            if let Some(cache) = caches[*i].take() {
                seqs.push((toks, cache));
            }
        }
        self.engine.forward(&mut seqs, LogitsMode::Last)
    }

    /// Samples, detokenizes and streams one token for every sequence whose prompt is done.
    /// Sequences are independent (each has its own RNG stream and detokenizer), so this runs
    /// on the rayon pool, which the model is not using between steps.
    fn after_step(&mut self, inputs: &[(usize, Vec<u32>)], logits: &[Matrix]) {
        let eos = &self.eos;
        let mut rows: Vec<Option<&Matrix>> = vec![None; self.running.len()];
        for ((i, _), row) in inputs.iter().zip(logits) {
            rows[*i] = Some(row);
        }
        let codec = &*self.codec;
        let finished: Vec<Option<FinishReason>> = self
            .running
            .par_iter_mut()
            .zip(rows.par_iter())
            .map(|(s, row)| {
                let row = (*row)?;
                if !s.caught_up() {
                    return None; // a prefill chunk that did not reach the end of the context
                }
                let span = s.span.clone();
                let _e = span.enter();
                let (id, lp) = s
                    .req
                    .sampler
                    .sample_with_logprobs(&row.data, s.req.logprobs);
                let lp = lp.map(|t| TokenLogprob {
                    logprob: t.logprob,
                    top: t.top,
                });
                let now = Instant::now();
                s.phase = tracing::Span::none(); // prefill (or recomputation) done
                if s.first_token_at.is_none() {
                    s.first_token_at = Some(now);
                    metrics::histogram!(m::TTFT).record((now - s.arrived).as_secs_f64());
                }
                metrics::counter!(m::GENERATED_TOKENS).increment(1);
                s.push(id, lp, codec, eos)
            })
            .collect();
        let now = Instant::now();
        let mut done: Vec<usize> = Vec::new();
        for (i, reason) in finished.into_iter().enumerate() {
            let Some(reason) = reason else { continue };
            let s = &self.running[i];
            let n = s.output.len();
            if let Some(first) = s.first_token_at
                && n > 1
            {
                metrics::histogram!(m::TPOT).record((now - first).as_secs_f64() / (n - 1) as f64);
            }
            metrics::histogram!(m::E2E).record((now - s.arrived).as_secs_f64());
            tracing::debug!(seq = s.id, reason = reason.as_str(), tokens = n, "finished");
            let _ = s.events.send(Event::Finished {
                reason,
                prompt_tokens: s.req.prompt.len(),
                completion_tokens: n,
            });
            done.push(i);
        }
        for &i in done.iter().rev() {
            self.running.remove(i);
        }
    }
}

/// The positions in `inputs` of the sequences a failed pass hit: those owning the batch rows a
/// dispatch error names, or all of them.
fn hit_inputs(inputs: &[(usize, Vec<u32>)], e: &moe_model::ModelError) -> Vec<usize> {
    let rows = match e {
        moe_model::ModelError::Dispatch { rows, .. } if !rows.is_empty() => rows,
        _ => return (0..inputs.len()).collect(),
    };
    let mut hit = Vec::new();
    let mut start = 0;
    for (k, (_, toks)) in inputs.iter().enumerate() {
        let end = start + toks.len();
        if rows.iter().any(|&r| (start..end).contains(&r)) {
            hit.push(k);
        }
        start = end;
    }
    if hit.is_empty() {
        // Rows outside the batch: a bug somewhere; fail the step rather than loop.
        return (0..inputs.len()).collect();
    }
    hit
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod v4_tests;

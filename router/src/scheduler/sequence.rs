//! One request in the scheduler: its tokens, cache, sampler, stop conditions, and the channel
//! its events go to. Text is produced incrementally; stop strings are matched on the text and
//! the tail that could still become a stop string is held back, so a stop string is never
//! streamed.

use std::time::Instant;

use moe_model::sampling::Sampler;
use tokio::sync::mpsc;

use super::stops::StopMatcher;
use crate::engine::SeqKv;
use crate::error::ApiError;
use crate::tokenize::{Detokenizer, TextCodec};

/// Why a sequence finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// `max_tokens` reached.
    Length,
    /// EOS or a stop string.
    Stop,
}

impl FinishReason {
    /// The OpenAI spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Length => "length",
            FinishReason::Stop => "stop",
        }
    }
}

/// Log-probabilities of a sampled token.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub logprob: f32,
    /// The most likely tokens with their log-probabilities, best first.
    pub top: Vec<(u32, f32)>,
}

/// What a request's handler receives.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A generated token and the text it completes (possibly empty while held back).
    Token {
        id: u32,
        text: String,
        logprob: Option<TokenLogprob>,
    },
    /// The end: reason, prompt tokens, generated tokens.
    Finished {
        reason: FinishReason,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
    /// The request failed after it was accepted.
    Failed(ApiError),
}

/// What the HTTP layer asks for.
#[derive(Debug, Clone)]
pub struct GenerationRequest {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub sampler: Sampler,
    pub stop: Vec<String>,
    pub ignore_eos: bool,
    /// Top-N log-probabilities per token (0 = only the sampled token's, None = none).
    pub logprobs: Option<usize>,
}

/// A sequence owned by the scheduler.
pub(crate) struct Seq {
    pub id: u64,
    pub req: GenerationRequest,
    pub output: Vec<u32>,
    pub cache: SeqKv,
    pub events: mpsc::UnboundedSender<Event>,
    pub arrived: Instant,
    pub first_token_at: Option<Instant>,
    /// The request's HTTP span, and its open phase (`scheduler.queue` until admitted, then
    /// `engine.prefill` until the first token): children of `span`, closed by dropping.
    pub span: tracing::Span,
    pub phase: tracing::Span,
    detok: Detokenizer,
    /// Output text produced but not yet sent (a possible stop-string prefix).
    held: String,
    stops: StopMatcher,
    /// Times the sequence lost its cache to preemption.
    pub preemptions: u32,
}

impl Seq {
    pub fn new(
        id: u64,
        req: GenerationRequest,
        cache: SeqKv,
        events: mpsc::UnboundedSender<Event>,
        span: tracing::Span,
    ) -> Seq {
        let stops = StopMatcher::new(&req.stop);
        Seq {
            id,
            req,
            output: Vec::new(),
            cache,
            events,
            arrived: Instant::now(),
            first_token_at: None,
            phase: tracing::info_span!(parent: &span, "scheduler.queue"),
            span,
            detok: Detokenizer::default(),
            held: String::new(),
            stops,
            preemptions: 0,
        }
    }

    /// Tokens of the context: the prompt, then the tokens generated so far.
    pub fn context_len(&self) -> usize {
        self.req.prompt.len() + self.output.len()
    }

    fn context(&self, range: std::ops::Range<usize>) -> Vec<u32> {
        let p = self.req.prompt.len();
        range
            .map(|i| {
                if i < p {
                    self.req.prompt[i]
                } else {
                    self.output[i - p]
                }
            })
            .collect()
    }

    /// Whether only the last sampled token is missing from the cache (one decode token next).
    /// Otherwise the sequence is prefilling: its prompt, or, after a preemption, its prompt and
    /// output again.
    pub fn decoding(&self) -> bool {
        !self.output.is_empty() && self.cache.len() + 1 == self.context_len()
    }

    /// Whether the whole context is in the cache, so the last step's logits give the next token.
    pub fn caught_up(&self) -> bool {
        self.cache.len() == self.context_len()
    }

    /// Tokens of generation left before `max_tokens`.
    pub fn remaining(&self) -> usize {
        self.req.max_tokens.saturating_sub(self.output.len())
    }

    /// The tokens to feed next: up to `budget` context tokens not yet cached (one, the last
    /// sampled token, while decoding).
    pub fn next_input(&self, budget: usize) -> Vec<u32> {
        let start = self.cache.len();
        let end = (start + budget).min(self.context_len());
        self.context(start..end)
    }

    /// Frees the cache (preemption by recompute): the context is prefilled again on resumption,
    /// and generation continues from where it stopped (nothing is sent twice).
    pub fn preempt(&mut self) {
        self.cache.release();
        self.preemptions += 1;
    }

    /// Reuses cached pages of the context's prefix (when the pool shares prefixes).
    pub fn adopt_prefix(&mut self) -> usize {
        let ctx = self.context(0..self.context_len());
        self.cache.adopt_prefix(&ctx)
    }

    /// Whether the client went away.
    pub fn cancelled(&self) -> bool {
        self.events.is_closed()
    }

    /// Records a sampled token; returns the finish reason when the sequence is done.
    pub fn push(
        &mut self,
        id: u32,
        logprob: Option<TokenLogprob>,
        codec: &TextCodec,
        eos: &[u32],
    ) -> Option<FinishReason> {
        self.output.push(id);
        let is_eos = !self.req.ignore_eos && eos.contains(&id);
        let mut text = self.detok.next(codec, &self.output);
        let mut finish = if is_eos {
            Some(FinishReason::Stop)
        } else if self.output.len() >= self.req.max_tokens {
            Some(FinishReason::Length)
        } else {
            None
        };
        if finish.is_some() {
            text.push_str(&self.detok.flush(codec, &self.output));
        }
        let fed_from = self.held.len();
        self.held.push_str(&text);
        let (emit, stop) = self.split_held(fed_from, finish.is_some());
        if stop {
            finish = Some(FinishReason::Stop);
        }
        let _ = self.events.send(Event::Token {
            id,
            text: emit,
            logprob,
        });
        finish
    }

    /// Takes what can be sent from the held text, whose bytes from `fed_from` are new:
    /// everything before a stop string (then `true`), else all but the tail that could still
    /// begin one (all of it at the end).
    fn split_held(&mut self, fed_from: usize, at_end: bool) -> (String, bool) {
        if let Some((end, len)) = self.stops.feed(&self.held.as_bytes()[fed_from..]) {
            // The held text always contains the partial match a stop string continues from.
            let start = (fed_from + end).saturating_sub(len);
            let out = self.held.get(..start).unwrap_or_default().to_string();
            self.held.clear();
            return (out, true);
        }
        if at_end {
            return (std::mem::take(&mut self.held), false);
        }
        let cut = self.held.len() - self.stops.partial().min(self.held.len());
        let out = self.held.get(..cut).unwrap_or_default().to_string();
        self.held.drain(..out.len());
        (out, false)
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use moe_model::sampling::SamplingParams;

    use super::*;

    /// Feeds the tokens of `text` one by one; the text sent and the finish reason.
    fn generate(text: &str, stop: &[&str]) -> (String, Option<FinishReason>) {
        let dir =
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/models/tiny-dsv3");
        let codec = TextCodec::from_dir(&dir).expect("codec");
        let cfg = moe_model::Config::from_dir(&dir).expect("config");
        let ids = codec.encode(text, false).expect("ids");
        let req = GenerationRequest {
            prompt: vec![0],
            max_tokens: ids.len(),
            sampler: Sampler::new(SamplingParams::default()),
            stop: stop.iter().map(|s| s.to_string()).collect(),
            ignore_eos: true,
            logprobs: None,
        };
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut seq = Seq::new(
            0,
            req,
            SeqKv::V3(moe_model::SeqCache::new(&cfg)),
            tx,
            tracing::Span::none(),
        );
        let mut finish = None;
        for id in ids {
            finish = seq.push(id, None, &codec, &[]);
            if finish.is_some() {
                break;
            }
        }
        let mut sent = String::new();
        while let Ok(Event::Token { text, .. }) = rx.try_recv() {
            sent.push_str(&text);
        }
        (sent, finish)
    }

    #[test]
    fn text_is_sent_up_to_the_first_stop_string_and_never_past_it() {
        let text = "The cat sat on the mat, naïve café.";
        assert_eq!(
            generate(text, &["sat on"]),
            ("The cat ".to_string(), Some(FinishReason::Stop))
        );
        assert_eq!(
            generate(text, &["mat", "on the"]),
            ("The cat sat ".to_string(), Some(FinishReason::Stop))
        );
        assert_eq!(
            generate(text, &["é."]),
            (
                "The cat sat on the mat, naïve caf".to_string(),
                Some(FinishReason::Stop)
            )
        );
        // A stop that never completes holds back only while it could, and all comes out.
        assert_eq!(
            generate(text, &["mat!"]),
            (text.to_string(), Some(FinishReason::Length))
        );
    }
}

//! `/v1/completions` and `/v1/chat/completions`: validate, submit to the scheduler, then either
//! collect the events into one JSON answer or stream them as server-sent events.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::trace::{self, Operation};
use super::{AppState, count, fail, parse};
use crate::api::*;
use crate::error::ApiError;
use crate::scheduler::{Event, FinishReason, TokenLogprob};
use crate::tokenize::TextCodec;
use crate::validation::{self, Validated};

fn next_id(prefix: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(1);
    format!(
        "{prefix}-{:x}{:06x}",
        now(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// How a token is named in logprobs.
fn token_name(codec: &TextCodec, id: u32, as_ids: bool) -> String {
    if as_ids {
        format!("token_id:{id}")
    } else {
        codec.token_text(id)
    }
}

/// A finished generation, gathered from its events.
struct Collected {
    text: String,
    tokens: Vec<(u32, usize, Option<TokenLogprob>)>,
    finish: FinishReason,
    usage: Usage,
}

async fn collect(mut rx: mpsc::UnboundedReceiver<Event>) -> Result<Collected, ApiError> {
    let mut text = String::new();
    let mut tokens = Vec::new();
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Token {
                id,
                text: t,
                logprob,
            } => {
                tokens.push((id, text.len(), logprob));
                text.push_str(&t);
            }
            Event::Finished {
                reason,
                prompt_tokens,
                completion_tokens,
            } => {
                let usage = Usage::new(prompt_tokens, completion_tokens);
                return Ok(Collected {
                    text,
                    tokens,
                    finish: reason,
                    usage,
                });
            }
            Event::Failed(e) => return Err(e),
        }
    }
    Err(ApiError::Unavailable(
        "the engine stopped before the request finished".into(),
    ))
}

fn completion_logprobs(
    codec: &TextCodec,
    as_ids: bool,
    items: &[(u32, usize, Option<TokenLogprob>)],
) -> Option<CompletionLogprobs> {
    if items.iter().all(|(_, _, lp)| lp.is_none()) {
        return None;
    }
    let mut out = CompletionLogprobs::default();
    for (id, offset, lp) in items {
        let Some(lp) = lp else { continue };
        out.tokens.push(token_name(codec, *id, as_ids));
        out.token_logprobs.push(lp.logprob);
        out.top_logprobs.push(
            lp.top
                .iter()
                .map(|(t, l)| (token_name(codec, *t, as_ids), json!(l)))
                .collect(),
        );
        out.text_offset.push(*offset);
    }
    Some(out)
}

fn chat_logprobs(
    codec: &TextCodec,
    as_ids: bool,
    items: &[(u32, usize, Option<TokenLogprob>)],
) -> Option<ChatLogprobs> {
    if items.iter().all(|(_, _, lp)| lp.is_none()) {
        return None;
    }
    let entry = |id: u32, logprob: f32, top: Option<Vec<ChatTokenLogprob>>| {
        let token = token_name(codec, id, as_ids);
        ChatTokenLogprob {
            bytes: codec.token_bytes(id),
            token,
            logprob,
            top_logprobs: top,
        }
    };
    let content = items
        .iter()
        .filter_map(|(id, _, lp)| {
            let lp = lp.as_ref()?;
            let top = lp.top.iter().map(|(t, l)| entry(*t, *l, None)).collect();
            Some(entry(*id, lp.logprob, Some(top)))
        })
        .collect();
    Some(ChatLogprobs { content })
}

/// Bodies from this size on give the memory their preparation used back to the system.
const RELEASE_AFTER_BYTES: usize = 1 << 20;

/// Parses and validates a request body on the blocking pool (tokenizing megabytes takes
/// seconds of CPU), then submits it under `span` (the scheduler's spans for the request are
/// its children): the validated request and its events.
async fn accept<R: serde::de::DeserializeOwned + 'static>(
    s: &AppState,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
    validate: fn(&R, &TextCodec, &validation::Limits) -> Result<Validated, ApiError>,
    span: &tracing::Span,
) -> Result<(Validated, mpsc::UnboundedReceiver<Event>), ApiError> {
    // Cheap checks first, on the worker: a refused body costs no blocking slot.
    super::guard::require_json(headers)?;
    let (codec, limits, max_body) = (s.codec.clone(), s.limits.clone(), s.max_body_bytes);
    let (headers, job_span) = (headers.clone(), span.clone());
    let large = body.as_ref().is_ok_and(|b| b.len() >= RELEASE_AFTER_BYTES);
    let v = s
        .blocking
        .run(move || {
            let v = job_span.in_scope(|| {
                parse::<R>(&headers, body, max_body).and_then(|req| validate(&req, &codec, &limits))
            });
            // Tokenizing megabytes allocates hundreds of megabytes in small pieces, which the
            // allocator would otherwise keep (a 4.7 MB prompt refused for length left 540 MB).
            if large {
                moe_meta::memory::release_to_os();
            }
            v
        })
        .await??;
    span.in_scope(|| {
        trace::record_request(span, &v);
        let rx = s.scheduler.submit(v.request.clone())?;
        Ok((v, rx))
    })
}

/// Fails the request: counted, and recorded on its span.
fn fail_traced(span: &tracing::Span, e: ApiError) -> Response {
    trace::record_error(span, e.status(), e.error_type());
    fail(e)
}

/// Counts a stream when its last event comes: 200 when it finished, the error's status and
/// type when it failed after the 200 was sent.
fn count_end(ev: Option<&Event>) {
    match ev {
        Some(Event::Finished { .. }) => count(StatusCode::OK, ""),
        Some(Event::Failed(e)) => count(e.status(), e.error_type()),
        _ => {}
    }
}

/// Records a streamed event on the request's span.
fn trace_event(span: &tracing::Span, ev: Option<&Event>) {
    match ev {
        Some(Event::Finished {
            reason,
            prompt_tokens,
            completion_tokens,
        }) => trace::record_finish(span, *reason, *prompt_tokens, *completion_tokens),
        Some(Event::Failed(e)) => trace::record_error(span, e.status(), e.error_type()),
        _ => {}
    }
}

/// `POST /v1/completions`.
pub async fn completions(
    State(s): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let span = trace::request_span(Operation::TextCompletion, &s.limits.model_name, &headers);
    let (v, rx) = match accept(&s, &headers, body, validation::completion, &span).await {
        Ok(accepted) => accepted,
        Err(e) => return fail_traced(&span, e),
    };
    let (id, created, model) = (next_id("cmpl"), now(), s.limits.model_name.clone());
    if v.stream {
        let (first, rx) =
            match super::stream::first_event(rx, super::stream::FIRST_EVENT_WAIT).await {
                Ok(x) => x,
                Err(e) => return fail_traced(&span, e),
            };
        // Counted when it ends: a stream that fails mid-way is a failure of its error type.
        let codec = s.codec.clone();
        let mut offset = 0usize;
        let mut usage: Option<Usage> = None;
        return super::stream::sse(first, rx, move |ev| {
            trace_event(&span, ev);
            count_end(ev);
            let chunk = |text: String,
                         logprobs: Option<CompletionLogprobs>,
                         finish: Option<&'static str>| {
                json!({"id": id, "object": "text_completion", "created": created, "model": model,
                       "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}]})
            };
            match ev {
                Some(Event::Token {
                    id: tok,
                    text,
                    logprob,
                }) => {
                    let lp = completion_logprobs(
                        &codec,
                        v.tokens_as_ids,
                        &[(*tok, offset, logprob.clone())],
                    );
                    offset += text.len();
                    if text.is_empty() && lp.is_none() {
                        vec![]
                    } else {
                        vec![chunk(text.clone(), lp, None)]
                    }
                }
                Some(Event::Finished {
                    reason,
                    prompt_tokens,
                    completion_tokens,
                }) => {
                    usage = Some(Usage::new(*prompt_tokens, *completion_tokens));
                    vec![chunk(String::new(), None, Some(reason.as_str()))]
                }
                Some(Event::Failed(e)) => vec![e.body()],
                None => match (&usage, v.include_usage) {
                    (Some(u), true) => vec![
                        json!({"id": id, "object": "text_completion", "created": created,
                                                   "model": model, "choices": [], "usage": u}),
                    ],
                    _ => vec![],
                },
            }
        });
    }
    match collect(rx).await {
        Ok(c) => {
            count(StatusCode::OK, "");
            trace::record_finish(
                &span,
                c.finish,
                c.usage.prompt_tokens,
                c.usage.completion_tokens,
            );
            axum::Json(CompletionResponse {
                id,
                object: "text_completion",
                created,
                model,
                choices: vec![CompletionChoice {
                    index: 0,
                    logprobs: completion_logprobs(&s.codec, v.tokens_as_ids, &c.tokens),
                    text: c.text,
                    finish_reason: Some(c.finish.as_str()),
                }],
                usage: Some(c.usage),
            })
            .into_response()
        }
        Err(e) => fail_traced(&span, e),
    }
}

/// `POST /v1/chat/completions`.
pub async fn chat(
    State(s): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let span = trace::request_span(Operation::Chat, &s.limits.model_name, &headers);
    let (v, rx) = match accept(&s, &headers, body, validation::chat, &span).await {
        Ok(accepted) => accepted,
        Err(e) => return fail_traced(&span, e),
    };
    let (id, created, model) = (next_id("chatcmpl"), now(), s.limits.model_name.clone());
    if v.stream {
        let (first, rx) =
            match super::stream::first_event(rx, super::stream::FIRST_EVENT_WAIT).await {
                Ok(x) => x,
                Err(e) => return fail_traced(&span, e),
            };
        // Counted when it ends: a stream that fails mid-way is a failure of its error type.
        let codec: Arc<TextCodec> = s.codec.clone();
        let mut started = false;
        let mut usage: Option<Usage> = None;
        return super::stream::sse(first, rx, move |ev| {
            trace_event(&span, ev);
            count_end(ev);
            let chunk =
                |delta: ChatDelta, logprobs: Option<ChatLogprobs>, finish: Option<&'static str>| {
                    serde_json::to_value(ChatChunk {
                        id: id.clone(),
                        object: "chat.completion.chunk",
                        created,
                        model: model.clone(),
                        choices: vec![ChatChunkChoice {
                            index: 0,
                            delta,
                            logprobs,
                            finish_reason: finish,
                        }],
                        usage: None,
                    })
                    .unwrap_or(Value::Null)
                };
            let mut out = Vec::new();
            if !started && ev.is_some() {
                started = true;
                out.push(chunk(
                    ChatDelta {
                        role: Some("assistant"),
                        content: Some(String::new()),
                    },
                    None,
                    None,
                ));
            }
            match ev {
                Some(Event::Token {
                    id: tok,
                    text,
                    logprob,
                }) => {
                    let lp = chat_logprobs(&codec, v.tokens_as_ids, &[(*tok, 0, logprob.clone())]);
                    if !text.is_empty() || lp.is_some() {
                        out.push(chunk(
                            ChatDelta {
                                role: None,
                                content: Some(text.clone()),
                            },
                            lp,
                            None,
                        ));
                    }
                }
                Some(Event::Finished {
                    reason,
                    prompt_tokens,
                    completion_tokens,
                }) => {
                    usage = Some(Usage::new(*prompt_tokens, *completion_tokens));
                    out.push(chunk(
                        ChatDelta {
                            role: None,
                            content: None,
                        },
                        None,
                        Some(reason.as_str()),
                    ));
                }
                Some(Event::Failed(e)) => out.push(e.body()),
                None => {
                    if let (Some(u), true) = (&usage, v.include_usage) {
                        out.push(
                            json!({"id": id, "object": "chat.completion.chunk", "created": created,
                                        "model": model, "choices": [], "usage": u}),
                        );
                    }
                }
            }
            out
        });
    }
    match collect(rx).await {
        Ok(c) => {
            count(StatusCode::OK, "");
            trace::record_finish(
                &span,
                c.finish,
                c.usage.prompt_tokens,
                c.usage.completion_tokens,
            );
            axum::Json(ChatResponse {
                id,
                object: "chat.completion",
                created,
                model,
                choices: vec![ChatChoice {
                    index: 0,
                    logprobs: chat_logprobs(&s.codec, v.tokens_as_ids, &c.tokens),
                    message: ChatMessageOut {
                        role: "assistant",
                        content: c.text,
                    },
                    finish_reason: Some(c.finish.as_str()),
                }],
                usage: c.usage,
            })
            .into_response()
        }
        Err(e) => fail_traced(&span, e),
    }
}

//! Turning API requests into generation requests: every parameter checked against the ranges
//! OpenAI documents and against the model (vocabulary, context length), with a 400 naming the
//! parameter. Features we do not implement (n > 1, penalties, logit bias, echo, tools) are refused
//! explicitly rather than silently ignored.

use moe_model::sampling::{Sampler, SamplingParams};
use serde_json::Value;

use crate::api::{ChatRequest, CommonParams, CompletionRequest, OneOrMany};
use crate::error::ApiError;
use crate::scheduler::GenerationRequest;
use crate::tokenize::TextCodec;

/// Most stop sequences per request (OpenAI's limit).
pub const MAX_STOPS: usize = 4;
/// Longest stop sequence, bytes.
pub const MAX_STOP_BYTES: usize = 512;

/// What the model and server allow.
#[derive(Debug, Clone)]
pub struct Limits {
    pub model_name: String,
    pub vocab: usize,
    pub context: usize,
}

/// A validated request and how to answer it.
#[derive(Debug, Clone)]
pub struct Validated {
    pub request: GenerationRequest,
    pub stream: bool,
    pub include_usage: bool,
    /// Report token strings as `token_id:<id>`.
    pub tokens_as_ids: bool,
}

fn check_model(c: &CommonParams, limits: &Limits) -> Result<(), ApiError> {
    match &c.model {
        Some(m) if m != &limits.model_name => Err(ApiError::BadRequest {
            message: format!(
                "the model `{m}` does not exist; this server serves `{}`",
                limits.model_name
            ),
            param: Some("model".into()),
            code: Some("model_not_found".into()),
        }),
        _ => Ok(()),
    }
}

fn unsupported(c: &CommonParams) -> Result<(), ApiError> {
    if c.n.is_some_and(|n| n != 1) {
        return Err(ApiError::invalid("n", "only n = 1 is supported"));
    }
    for (name, v) in [
        ("presence_penalty", c.presence_penalty),
        ("frequency_penalty", c.frequency_penalty),
    ] {
        if v.is_some_and(|v| v != 0.0) {
            return Err(ApiError::invalid(name, format!("{name} is not supported")));
        }
    }
    match &c.logit_bias {
        None | Some(Value::Null) => {}
        Some(Value::Object(o)) if o.is_empty() => {}
        Some(Value::Object(_)) => {
            return Err(ApiError::invalid(
                "logit_bias",
                "logit_bias is not supported",
            ));
        }
        Some(_) => {
            return Err(ApiError::invalid(
                "logit_bias",
                "logit_bias must be an object mapping token ids to biases",
            ));
        }
    }
    Ok(())
}

fn sampling(c: &CommonParams) -> Result<SamplingParams, ApiError> {
    let temperature = c.temperature.unwrap_or(1.0);
    if !temperature.is_finite() || !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::invalid(
            "temperature",
            format!("temperature must be in [0, 2], got {temperature}"),
        ));
    }
    let top_p = c.top_p.unwrap_or(1.0);
    if !top_p.is_finite() || top_p <= 0.0 || top_p > 1.0 {
        return Err(ApiError::invalid(
            "top_p",
            format!("top_p must be in (0, 1], got {top_p}"),
        ));
    }
    let top_k = match c.top_k {
        None | Some(-1) | Some(0) => 0,
        Some(k) if k > 0 => k as usize,
        Some(k) => {
            return Err(ApiError::invalid(
                "top_k",
                format!("top_k must be -1, 0 or positive, got {k}"),
            ));
        }
    };
    let min_p = c.min_p.unwrap_or(0.0);
    if !(0.0..=1.0).contains(&min_p) {
        return Err(ApiError::invalid(
            "min_p",
            format!("min_p must be in [0, 1], got {min_p}"),
        ));
    }
    Ok(SamplingParams {
        temperature: temperature as f32,
        top_p: top_p as f32,
        top_k,
        min_p: min_p as f32,
        seed: c.seed,
    })
}

fn stops(c: &CommonParams) -> Result<Vec<String>, ApiError> {
    let list = match &c.stop {
        None => Vec::new(),
        Some(OneOrMany::One(s)) => vec![s.clone()],
        Some(OneOrMany::Many(v)) => v.clone(),
    };
    if list.len() > MAX_STOPS {
        return Err(ApiError::invalid(
            "stop",
            format!("at most {MAX_STOPS} stop sequences, got {}", list.len()),
        ));
    }
    if let Some(long) = list.iter().find(|s| s.len() > MAX_STOP_BYTES) {
        return Err(ApiError::invalid(
            "stop",
            format!(
                "a stop sequence may be at most {MAX_STOP_BYTES} bytes, got one of {}",
                long.len()
            ),
        ));
    }
    if list.iter().any(String::is_empty) {
        return Err(ApiError::invalid(
            "stop",
            "stop sequences must not be empty",
        ));
    }
    Ok(list)
}

fn max_tokens(
    v: Option<i64>,
    param: &str,
    default: usize,
    prompt: usize,
    limits: &Limits,
) -> Result<usize, ApiError> {
    let n = match v {
        None => default,
        Some(n) if n < 1 => {
            return Err(ApiError::invalid(
                param,
                format!("{param} must be at least 1, got {n}"),
            ));
        }
        Some(n) => n as usize,
    };
    if prompt + n > limits.context {
        return Err(ApiError::invalid(
            param,
            format!(
                "this model's maximum context length is {} tokens, but {} were requested ({prompt} in the prompt, {n} to generate)",
                limits.context,
                prompt + n
            ),
        ));
    }
    Ok(n)
}

/// Refuses text that cannot fit the context whatever it tokenizes to: no token covers more
/// than [`TextCodec::max_token_bytes`] bytes, so more than context × that many bytes is more
/// tokens than the context holds. Checked before tokenizing, which for megabytes of text costs
/// seconds of CPU and hundreds of MB.
fn fits_by_bytes(
    param: &str,
    bytes: usize,
    codec: &TextCodec,
    limits: &Limits,
) -> Result<(), ApiError> {
    let most = limits.context.saturating_mul(codec.max_token_bytes());
    if bytes > most {
        return Err(ApiError::invalid(
            param,
            format!(
                "this model's maximum context length is {} tokens, and no token is longer than {} bytes, so at most {most} bytes of text fit; the request has {bytes}",
                limits.context,
                codec.max_token_bytes()
            ),
        ));
    }
    Ok(())
}

/// Bytes of a message's text (its string, or its text parts).
fn content_len(content: &Value) -> usize {
    match content {
        Value::String(s) => s.len(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .map(str::len)
            .sum(),
        _ => 0,
    }
}

fn check_ids(ids: &[u32], limits: &Limits) -> Result<(), ApiError> {
    if ids.is_empty() {
        return Err(ApiError::invalid("prompt", "the prompt must not be empty"));
    }
    if let Some(bad) = ids.iter().find(|&&t| t as usize >= limits.vocab) {
        return Err(ApiError::invalid(
            "prompt",
            format!(
                "token id {bad} is outside the vocabulary (size {})",
                limits.vocab
            ),
        ));
    }
    Ok(())
}

fn build(
    c: &CommonParams,
    prompt: Vec<u32>,
    max_tokens: usize,
    logprobs: Option<usize>,
) -> Result<Validated, ApiError> {
    Ok(Validated {
        request: GenerationRequest {
            prompt,
            max_tokens,
            sampler: Sampler::new(sampling(c)?),
            stop: stops(c)?,
            ignore_eos: c.ignore_eos,
            logprobs,
        },
        stream: c.stream,
        include_usage: c.stream_options.as_ref().is_some_and(|o| o.include_usage),
        tokens_as_ids: c.return_tokens_as_token_ids,
    })
}

/// `/v1/completions`.
pub fn completion(
    req: &CompletionRequest,
    codec: &TextCodec,
    limits: &Limits,
) -> Result<Validated, ApiError> {
    let c = &req.common;
    check_model(c, limits)?;
    unsupported(c)?;
    if req.echo {
        return Err(ApiError::invalid("echo", "echo is not supported"));
    }
    if req.best_of.is_some_and(|b| b != 1) {
        return Err(ApiError::invalid(
            "best_of",
            "only best_of = 1 is supported",
        ));
    }
    if req.suffix.as_ref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::invalid("suffix", "suffix is not supported"));
    }
    let prompt = match &req.prompt {
        Some(Value::String(s)) => {
            if s.is_empty() {
                return Err(ApiError::invalid("prompt", "the prompt must not be empty"));
            }
            fits_by_bytes("prompt", s.len(), codec, limits)?;
            codec.encode(s, true)?
        }
        Some(Value::Array(items)) if items.iter().all(Value::is_number) => items
            .iter()
            .map(|v| {
                v.as_u64()
                    .filter(|&n| n <= u64::from(u32::MAX))
                    .map(|n| n as u32)
            })
            .collect::<Option<Vec<u32>>>()
            .ok_or_else(|| {
                ApiError::invalid("prompt", "token ids must be non-negative integers")
            })?,
        Some(Value::Array(_)) => {
            return Err(ApiError::invalid(
                "prompt",
                "a list of prompts is not supported: send one prompt (a string or a list of token ids) per request",
            ));
        }
        Some(_) => {
            return Err(ApiError::invalid(
                "prompt",
                "prompt must be a string or a list of token ids",
            ));
        }
        None => return Err(ApiError::invalid("prompt", "prompt is required")),
    };
    check_ids(&prompt, limits)?;
    let logprobs = match req.logprobs {
        None => None,
        Some(n) if (0..=20).contains(&n) => Some(n as usize),
        Some(n) => {
            return Err(ApiError::invalid(
                "logprobs",
                format!("logprobs must be in 0..=20, got {n}"),
            ));
        }
    };
    let max = max_tokens(req.max_tokens, "max_tokens", 16, prompt.len(), limits)?;
    build(c, prompt, max, logprobs)
}

/// `/v1/chat/completions`: renders the messages with the chat template.
pub fn chat(req: &ChatRequest, codec: &TextCodec, limits: &Limits) -> Result<Validated, ApiError> {
    let c = &req.common;
    check_model(c, limits)?;
    unsupported(c)?;
    if req.tools.as_ref().is_some_and(|t| !t.is_null()) {
        return Err(ApiError::invalid("tools", "tools are not supported"));
    }
    match &req.response_format {
        None | Some(Value::Null) => {}
        Some(rf @ Value::Object(_)) => match rf.get("type").and_then(Value::as_str) {
            Some("text") => {}
            Some(_) => {
                return Err(ApiError::invalid(
                    "response_format",
                    "only response_format type `text` is supported",
                ));
            }
            None => {
                return Err(ApiError::invalid(
                    "response_format",
                    "response_format must have a string `type`",
                ));
            }
        },
        Some(_) => {
            return Err(ApiError::invalid(
                "response_format",
                "response_format must be an object such as {\"type\": \"text\"}",
            ));
        }
    }
    let messages = match &req.messages {
        Some(m) if !m.is_empty() => m,
        _ => {
            return Err(ApiError::invalid(
                "messages",
                "messages must be a non-empty list",
            ));
        }
    };
    let content_bytes = messages.iter().map(|m| content_len(&m.content)).sum();
    fits_by_bytes("messages", content_bytes, codec, limits)?;
    // The template writes the BOS itself, as transformers' apply_chat_template expects.
    let prompt = codec.encode_chat(messages)?;
    check_ids(&prompt, limits)?;
    let logprobs = match (req.logprobs, req.top_logprobs) {
        (false, Some(n)) if n > 0 => {
            return Err(ApiError::invalid(
                "top_logprobs",
                "top_logprobs requires logprobs = true",
            ));
        }
        (false, _) => None,
        (true, None) => Some(0),
        (true, Some(n)) if (0..=20).contains(&n) => Some(n as usize),
        (true, Some(n)) => {
            return Err(ApiError::invalid(
                "top_logprobs",
                format!("top_logprobs must be in 0..=20, got {n}"),
            ));
        }
    };
    let (value, param) = match (req.max_completion_tokens, req.max_tokens) {
        (Some(v), _) => (Some(v), "max_completion_tokens"),
        (None, v) => (v, "max_tokens"),
    };
    let default = limits.context.saturating_sub(prompt.len()).max(1);
    let max = max_tokens(value, param, default, prompt.len(), limits)?;
    build(c, prompt, max, logprobs)
}

#[cfg(test)]
mod tests;

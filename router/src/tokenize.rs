//! Text in and out: the model's tokenizer (`tokenizer.json`), its chat template
//! (`tokenizer_config.json`, rendered with minijinja like TGI, with Python-style string methods),
//! and incremental detokenization for streaming (text is released only once it is valid UTF-8,
//! as byte-level BPE tokens can split a character).

use std::path::Path;

use minijinja::{Environment, Error as JinjaError, ErrorKind, context};
use serde_json::Value;
use tokenizers::Tokenizer;

use crate::api::ChatMessage;
use crate::error::ApiError;

/// Tokenizer plus chat template of one model.
pub struct TextCodec {
    tok: Tokenizer,
    template: Option<String>,
    bos: String,
    eos: String,
}

impl std::fmt::Debug for TextCodec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextCodec")
            .field("chat_template", &self.template.is_some())
            .finish()
    }
}

fn special(v: Option<&Value>) -> String {
    match v {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Object(o)) => o
            .get("content")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string(),
        _ => String::new(),
    }
}

impl TextCodec {
    /// Loads `tokenizer.json` and, if present, `tokenizer_config.json` from `dir`.
    pub fn from_dir(dir: &Path) -> Result<TextCodec, String> {
        let tok = Tokenizer::from_file(dir.join("tokenizer.json"))
            .map_err(|e| format!("loading {}: {e}", dir.join("tokenizer.json").display()))?;
        let cfg: Value = match std::fs::read_to_string(dir.join("tokenizer_config.json")) {
            Ok(text) => {
                serde_json::from_str(&text).map_err(|e| format!("tokenizer_config.json: {e}"))?
            }
            Err(_) => Value::Null,
        };
        Ok(TextCodec {
            tok,
            template: cfg
                .get("chat_template")
                .and_then(Value::as_str)
                .map(str::to_string),
            bos: special(cfg.get("bos_token")),
            eos: special(cfg.get("eos_token")),
        })
    }

    /// Token ids of `text` (`add_special`: the post-processor's BOS).
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>, ApiError> {
        self.tok
            .encode(text, add_special)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| ApiError::bad_request(format!("cannot tokenize the prompt: {e}")))
    }

    /// Text of `ids`.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> String {
        self.tok.decode(ids, skip_special).unwrap_or_default()
    }

    /// Text of one token, special tokens included (for logprobs).
    pub fn token_text(&self, id: u32) -> String {
        self.decode(&[id], false)
    }

    /// Renders `messages` with the chat template, ending with the assistant's turn.
    pub fn render_chat(&self, messages: &[ChatMessage]) -> Result<String, ApiError> {
        let template = self.template.as_deref().ok_or_else(|| {
            ApiError::bad_request("this model has no chat_template; use /v1/completions")
        })?;
        let mut msgs = Vec::with_capacity(messages.len());
        for (i, m) in messages.iter().enumerate() {
            if !matches!(
                m.role.as_str(),
                "system" | "user" | "assistant" | "developer"
            ) {
                return Err(ApiError::invalid(
                    &format!("messages[{i}].role"),
                    format!("unknown role `{}`", m.role),
                ));
            }
            let content = match &m.content {
                Value::String(s) => s.clone(),
                Value::Null => String::new(),
                Value::Array(parts) => {
                    let mut text = String::new();
                    for p in parts {
                        match (
                            p.get("type").and_then(Value::as_str),
                            p.get("text").and_then(Value::as_str),
                        ) {
                            (Some("text"), Some(t)) => text.push_str(t),
                            _ => {
                                return Err(ApiError::invalid(
                                    &format!("messages[{i}].content"),
                                    "only text content parts are supported",
                                ));
                            }
                        }
                    }
                    text
                }
                _ => {
                    return Err(ApiError::invalid(
                        &format!("messages[{i}].content"),
                        "content must be a string or a list of parts",
                    ));
                }
            };
            let role = if m.role == "developer" {
                "system"
            } else {
                m.role.as_str()
            };
            msgs.push(context! { role => role, content => content });
        }
        let mut env = Environment::new();
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> Result<String, JinjaError> {
                Err(JinjaError::new(ErrorKind::InvalidOperation, msg))
            },
        );
        let render_err = |e: JinjaError| ApiError::bad_request(format!("chat template: {e}"));
        env.add_template("chat", template).map_err(render_err)?;
        env.get_template("chat")
            .and_then(|t| {
                t.render(context! {
                    messages => msgs,
                    add_generation_prompt => true,
                    bos_token => self.bos.clone(),
                    eos_token => self.eos.clone(),
                })
            })
            .map_err(render_err)
    }
}

/// Incremental detokenizer of one sequence's output.
#[derive(Debug, Default, Clone)]
pub struct Detokenizer {
    prefix: usize,
    read: usize,
}

impl Detokenizer {
    /// Text that `tokens` (the whole output so far) adds since the last call, held back while it
    /// ends in an incomplete character.
    pub fn next(&mut self, codec: &TextCodec, tokens: &[u32]) -> String {
        let before = codec.decode(&tokens[self.prefix..self.read], true);
        let now = codec.decode(&tokens[self.prefix..], true);
        if now.len() > before.len() && !now.ends_with('\u{FFFD}') {
            let Some(delta) = now.get(before.len()..).map(str::to_string) else {
                return String::new();
            };
            self.prefix = self.read;
            self.read = tokens.len();
            delta
        } else {
            String::new()
        }
    }

    /// Whatever is still held back, at the end of the sequence.
    pub fn flush(&mut self, codec: &TextCodec, tokens: &[u32]) -> String {
        let before = codec.decode(&tokens[self.prefix..self.read], true);
        let now = codec.decode(&tokens[self.prefix..], true);
        self.prefix = tokens.len();
        self.read = tokens.len();
        now.get(before.len()..).unwrap_or_default().to_string()
    }
}

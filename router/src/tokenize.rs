//! Text in and out: the model's tokenizer (`tokenizer.json`), its chat template
//! (`tokenizer_config.json`, rendered with minijinja like TGI, with Python-style string methods),
//! and incremental detokenization for streaming (text is released only once it is valid UTF-8,
//! as byte-level BPE tokens can split a character).
//!
//! Message content is text, never markup: the chat template is rendered with each message's
//! content between two Unicode noncharacters (U+FDD0, U+FDD1); the special tokens found in the
//! template's own text are real (its BOS and role tokens), and everything between them is
//! encoded with special-token parsing off (`encode_special_tokens`, HF's
//! `split_special_tokens`), so a user who types `<｜Assistant｜>` gets those characters, not a
//! fake turn (vLLM and TGI do the same). Added tokens' `lstrip`/`rstrip` flags are not applied
//! at those cuts (DeepSeek's have none).

use std::collections::HashMap;
use std::path::Path;
use std::str::FromStr;

use minijinja::{Environment, Error as JinjaError, ErrorKind, context};
use serde_json::Value;
use tokenizers::Tokenizer;

use crate::api::ChatMessage;
use crate::error::ApiError;

/// Opens and closes a message's content in the rendered chat prompt (noncharacters: "for
/// internal use", never meaningful in interchanged text; refused in requests).
const CONTENT_OPEN: char = '\u{FDD0}';
const CONTENT_CLOSE: char = '\u{FDD1}';

/// GPT-2's byte-level alphabet, reversed: the character that stands for each byte in a
/// byte-level BPE vocabulary, back to the byte (`bytes_to_unicode` in GPT-2's encoder.py).
fn byte_level_inverse() -> HashMap<char, u8> {
    let mut map = HashMap::with_capacity(256);
    let mut extra = 0u32;
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        let c = if printable {
            char::from(b)
        } else {
            extra += 1;
            char::from_u32(255 + extra).unwrap_or(char::REPLACEMENT_CHARACTER)
        };
        map.insert(c, b);
    }
    map
}

/// Tokenizer plus chat template of one model.
pub struct TextCodec {
    tok: Tokenizer,
    /// The same tokenizer with special-token parsing off, for message content.
    plain: Tokenizer,
    /// Special tokens (text, id), longest first: where a chat prompt is cut.
    specials: Vec<(String, u32)>,
    /// Raw bytes of each token (byte-level BPE decoded one token alone).
    token_bytes: Vec<Vec<u8>>,
    max_token_bytes: usize,
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
        let path = dir.join("tokenizer.json");
        let json = std::fs::read_to_string(&path)
            .map_err(|e| format!("loading {}: {e}", path.display()))?;
        let tok =
            Tokenizer::from_str(&json).map_err(|e| format!("loading {}: {e}", path.display()))?;
        let spec: Value = serde_json::from_str(&json).unwrap_or(Value::Null);
        let mut plain = tok.clone();
        plain.set_encode_special_tokens(true);
        let mut specials: Vec<(String, u32)> = tok
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, t)| t.special && !t.content.is_empty())
            .map(|(id, t)| (t.content, id))
            .collect();
        specials.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.1.cmp(&b.1)));
        let token_bytes = all_token_bytes(&tok, &spec);
        // A normalizer may shrink text (NFKC maps some 3-byte characters to 1 byte): allow for
        // it rather than refuse text that would fit.
        let shrink = if spec.get("normalizer").is_some_and(|n| !n.is_null()) {
            4
        } else {
            1
        };
        let max_token_bytes = token_bytes.iter().map(Vec::len).max().unwrap_or(1).max(1) * shrink;
        let cfg: Value = match std::fs::read_to_string(dir.join("tokenizer_config.json")) {
            Ok(text) => {
                serde_json::from_str(&text).map_err(|e| format!("tokenizer_config.json: {e}"))?
            }
            Err(_) => Value::Null,
        };
        Ok(TextCodec {
            tok,
            plain,
            specials,
            token_bytes,
            max_token_bytes,
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
            .encode_fast(text, add_special)
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

    /// The raw bytes of one token (for chat logprobs' `bytes`): a byte-level BPE token that is
    /// part of a character is that part, not U+FFFD.
    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        match self.token_bytes.get(id as usize) {
            Some(b) => b.clone(),
            None => self.token_text(id).into_bytes(),
        }
    }

    /// The most bytes of text one token stands for (an upper bound, computed once).
    pub fn max_token_bytes(&self) -> usize {
        self.max_token_bytes
    }

    /// Token ids of `messages` rendered with the chat template: the template's special tokens
    /// are real, the messages' content is plain text. The rendered prompt is cut only at the
    /// template's own special tokens, which are where a whole-prompt encoding splits anyway,
    /// so the ids equal transformers' `apply_chat_template` except that a special token typed
    /// in content stays text.
    pub fn encode_chat(&self, messages: &[ChatMessage]) -> Result<Vec<u32>, ApiError> {
        let rendered = self.render_chat(messages)?;
        // The text without markers, and whether each of its bytes came from content.
        let mut text = String::with_capacity(rendered.len());
        let mut in_content = Vec::with_capacity(rendered.len());
        let mut inside = false;
        for c in rendered.chars() {
            match c {
                CONTENT_OPEN => inside = true,
                CONTENT_CLOSE => inside = false,
                c => {
                    text.push(c);
                    in_content.resize(text.len(), inside);
                }
            }
        }
        let mut ids = Vec::new();
        let encode_plain = |piece: &str, ids: &mut Vec<u32>| -> Result<(), ApiError> {
            if !piece.is_empty() {
                let enc = self.plain.encode_fast(piece, false).map_err(|e| {
                    ApiError::bad_request(format!("cannot tokenize the prompt: {e}"))
                })?;
                ids.extend_from_slice(enc.get_ids());
            }
            Ok(())
        };
        let (mut start, mut i) = (0, 0);
        while i < text.len() {
            let special = (!in_content[i])
                .then(|| {
                    self.specials.iter().find(|(s, _)| {
                        text[i..].starts_with(s.as_str())
                            && !in_content[i..i + s.len()].iter().any(|&c| c)
                    })
                })
                .flatten();
            match special {
                Some((s, id)) => {
                    encode_plain(&text[start..i], &mut ids)?;
                    ids.push(*id);
                    i += s.len();
                    start = i;
                }
                None => i += text[i..].chars().next().map_or(1, char::len_utf8),
            }
        }
        encode_plain(&text[start..], &mut ids)?;
        Ok(ids)
    }

    /// Renders `messages` with the chat template, ending with the assistant's turn; each
    /// message's content is marked (between [`CONTENT_OPEN`] and [`CONTENT_CLOSE`]).
    fn render_chat(&self, messages: &[ChatMessage]) -> Result<String, ApiError> {
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
            if content.contains([CONTENT_OPEN, CONTENT_CLOSE]) {
                return Err(ApiError::invalid(
                    &format!("messages[{i}].content"),
                    "content must not contain the noncharacters U+FDD0 or U+FDD1",
                ));
            }
            let content = format!("{CONTENT_OPEN}{content}{CONTENT_CLOSE}");
            let role = if m.role == "developer" {
                "system"
            } else {
                m.role.as_str()
            };
            msgs.push(context! { role => role, content => content });
        }
        let mut env = Environment::new();
        // Trimming sees through the content markers, so a template that trims content (Llama
        // 3's `| trim`, Python's `.strip()`) renders what it would without them.
        env.add_filter("trim", |s: String| marked_trim(&s, true, true));
        env.set_unknown_method_callback(|state, value, method, args| {
            let ends = match method {
                "strip" => Some((true, true)),
                "lstrip" => Some((true, false)),
                "rstrip" => Some((false, true)),
                _ => None,
            };
            match (value.as_str(), ends, args.is_empty()) {
                (Some(s), Some((l, r)), true) => Ok(marked_trim(s, l, r).into()),
                _ => {
                    minijinja_contrib::pycompat::unknown_method_callback(state, value, method, args)
                }
            }
        });
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

/// `s` without leading (`left`) and trailing (`right`) whitespace, the content markers kept
/// where they are (whitespace inside a marked span at its edge is trimmed as it would be
/// without the markers).
fn marked_trim(s: &str, left: bool, right: bool) -> String {
    let marker = |c: char| c == CONTENT_OPEN || c == CONTENT_CLOSE;
    let mut chars: Vec<char> = s.chars().collect();
    if left {
        let mut out = Vec::with_capacity(chars.len());
        let mut i = 0;
        while i < chars.len() && (chars[i].is_whitespace() || marker(chars[i])) {
            if marker(chars[i]) {
                out.push(chars[i]);
            }
            i += 1;
        }
        out.extend_from_slice(&chars[i..]);
        chars = out;
    }
    if right {
        let mut tail = Vec::new();
        while let Some(&c) = chars.last() {
            if !(c.is_whitespace() || marker(c)) {
                break;
            }
            chars.pop();
            if marker(c) {
                tail.push(c);
            }
        }
        chars.extend(tail.into_iter().rev());
    }
    chars.into_iter().collect()
}

/// Raw bytes of every token: for a byte-level BPE vocabulary (a `ByteLevel` decoder) each
/// character of the token string stands for one byte; other tokens (added and special ones,
/// whose strings are plain text, and other vocabularies) are their decoded text.
fn all_token_bytes(tok: &Tokenizer, spec: &Value) -> Vec<Vec<u8>> {
    let decoder = spec
        .get("decoder")
        .map(Value::to_string)
        .unwrap_or_default();
    let byte_level = decoder.contains("\"ByteLevel\"");
    let inverse = byte_level_inverse();
    let added: std::collections::HashSet<u32> =
        tok.get_added_tokens_decoder().keys().copied().collect();
    (0..tok.get_vocab_size(true) as u32)
        .map(|id| {
            let piece = tok.id_to_token(id).unwrap_or_default();
            let raw: Option<Vec<u8>> = (byte_level && !added.contains(&id))
                .then(|| piece.chars().map(|c| inverse.get(&c).copied()).collect())
                .flatten();
            raw.unwrap_or_else(|| tok.decode(&[id], false).unwrap_or_default().into_bytes())
        })
        .collect()
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

#[cfg(test)]
mod tests;

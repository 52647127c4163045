//! A byte-level BPE tokenizer of any vocabulary size, grown from the 512-token one the golden
//! models use: its special tokens, byte alphabet and merges stay as they are (ids unchanged),
//! and merges of an existing token with one byte-level character are appended in a fixed order
//! until the vocabulary has the requested size. Every id decodes (to bytes, as real byte-level
//! tokens do), ordinary text encodes, and the same size always gives the same file.

use std::collections::HashSet;

use serde_json::Value;

use crate::error::{ModelError, Result};

fn invalid(msg: &str) -> ModelError {
    ModelError::InvalidInput(format!("base tokenizer: {msg}"))
}

/// `base` (a `tokenizer.json` text with a BPE model) grown to `vocab_size` ids in all.
pub fn extend(base: &str, vocab_size: usize) -> Result<String> {
    let mut t: Value = serde_json::from_str(base).map_err(|e| invalid(&e.to_string()))?;
    let added = t["added_tokens"].as_array().map_or(0, Vec::len);
    let model = &mut t["model"];
    let mut vocab = model["vocab"]
        .as_object()
        .cloned()
        .ok_or_else(|| invalid("no model.vocab"))?;
    let mut merges = model["merges"]
        .as_array()
        .cloned()
        .ok_or_else(|| invalid("no model.merges"))?;
    if vocab_size < vocab.len() {
        return Err(invalid("the requested vocabulary is smaller than the base"));
    }
    // Tokens in id order; the single-character ones (the byte alphabet) are the right halves.
    let mut by_id: Vec<(u64, String)> = vocab
        .iter()
        .filter_map(|(k, v)| Some((v.as_u64()?, k.clone())))
        .collect();
    by_id.sort();
    let tokens: Vec<String> = by_id.into_iter().map(|(_, k)| k).skip(added).collect();
    let alphabet: Vec<String> = tokens
        .iter()
        .filter(|k| k.chars().count() == 1)
        .cloned()
        .collect();
    if alphabet.is_empty() {
        return Err(invalid("no single-character tokens"));
    }
    let mut seen: HashSet<String> = vocab.keys().cloned().collect();
    let mut lefts = tokens;
    let mut next_id = vocab.len();
    let mut left = 0usize;
    while next_id < vocab_size {
        let l = lefts[left].clone();
        left += 1;
        // A fixed stride through the alphabet, so early tokens mix many characters.
        for step in 0..alphabet.len() {
            if next_id >= vocab_size {
                break;
            }
            let r = &alphabet[(step * 37 + left) % alphabet.len()];
            let merged = format!("{l}{r}");
            if l.chars().count() + 1 > 16 || !seen.insert(merged.clone()) {
                continue;
            }
            merges.push(Value::Array(vec![l.clone().into(), r.clone().into()]));
            vocab.insert(merged.clone(), next_id.into());
            lefts.push(merged);
            next_id += 1;
        }
    }
    model["vocab"] = Value::Object(vocab);
    model["merges"] = Value::Array(merges);
    serde_json::to_string(&t).map_err(|e| invalid(&e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::str::FromStr;

    const BASE: &str = include_str!("../../assets/tokenizer/tokenizer.json");

    #[test]
    fn grows_to_the_deepseek_vocabulary_and_still_round_trips_text() {
        let text = extend(BASE, 129_280).expect("extend");
        assert_eq!(text, extend(BASE, 129_280).expect("again"), "deterministic");
        let tok = tokenizers::Tokenizer::from_str(&text).expect("tokenizers loads it");
        assert_eq!(tok.get_vocab_size(true), 129_280);
        let base = tokenizers::Tokenizer::from_str(BASE).expect("base");
        for (k, id) in base.get_vocab(true) {
            assert_eq!(tok.token_to_id(&k), Some(id), "{k} keeps its id");
        }
        let s = "Hello, world! The quick brown fox: 12345.";
        let ids = tok.encode(s, false).expect("encode").get_ids().to_vec();
        assert!(ids.len() < base.encode(s, false).expect("encode").len());
        assert_eq!(tok.decode(&ids, true).expect("decode").trim_start(), s);
        for id in [4, 600, 70_000, 129_279] {
            assert!(tok.id_to_token(id).is_some(), "{id}");
        }
    }
}

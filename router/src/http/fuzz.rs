//! Property tests (bounded, for CI) of request parsing and validation: arbitrary bytes and
//! arbitrary JSON bodies (the real field names with values of any type and shape) through the
//! handlers' own `parse` and validation, with the golden model's tokenizer. Nothing panics;
//! every refusal is a 4xx with an OpenAI-style body; every acceptance fits the context.

use std::path::PathBuf;
use std::sync::OnceLock;

use axum::body::Bytes;
use axum::http::{HeaderMap, HeaderValue, header};
use proptest::prelude::*;
use serde_json::{Map, Value};

use super::parse;
use crate::api::{ChatRequest, CompletionRequest};
use crate::error::ApiError;
use crate::tokenize::TextCodec;
use crate::validation::{self, Limits, Validated};

fn codec() -> &'static TextCodec {
    static CODEC: OnceLock<TextCodec> = OnceLock::new();
    CODEC.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/models/tiny-dsv3-bf16");
        TextCodec::from_dir(&dir).expect("codec")
    })
}

fn limits() -> Limits {
    Limits {
        model_name: "m".into(),
        vocab: 512,
        context: 128,
    }
}

fn json_headers() -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h
}

const FIELDS: &[&str] = &[
    "model",
    "prompt",
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "stop",
    "stream",
    "stream_options",
    "n",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "ignore_eos",
    "return_tokens_as_token_ids",
    "logprobs",
    "top_logprobs",
    "echo",
    "best_of",
    "suffix",
    "tools",
    "response_format",
    "role",
    "content",
    "type",
    "text",
    "include_usage",
];

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        (-3i64..300).prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        "[a-z <>｜▁]{0,12}".prop_map(Value::from),
        prop::sample::select(vec![
            "user",
            "assistant",
            "system",
            "text",
            "m",
            "<｜Assistant｜>",
            "\u{FDD0}",
            "",
        ])
        .prop_map(Value::from),
    ]
}

fn value() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((prop::sample::select(FIELDS), inner), 0..6).prop_map(|kv| {
                Value::Object(
                    kv.into_iter()
                        .map(|(k, v)| (k.to_string(), v))
                        .collect::<Map<_, _>>(),
                )
            }),
        ]
    })
}

/// A top-level object over the real fields.
fn body() -> impl Strategy<Value = Value> {
    prop::collection::vec((prop::sample::select(FIELDS), value()), 0..10)
        .prop_map(|kv| Value::Object(kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect()))
}

fn accepted_fits(v: &Validated) -> Result<(), TestCaseError> {
    let l = limits();
    let r = &v.request;
    prop_assert!(!r.prompt.is_empty());
    prop_assert!(r.max_tokens >= 1);
    prop_assert!(r.prompt.len() + r.max_tokens <= l.context);
    prop_assert!(r.prompt.iter().all(|&t| (t as usize) < l.vocab));
    prop_assert!(r.stop.len() <= validation::MAX_STOPS);
    Ok(())
}

fn refusal_is_the_clients(e: &ApiError) -> Result<(), TestCaseError> {
    prop_assert!(e.status().is_client_error(), "{e:?}");
    let body = e.body();
    prop_assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty())
    );
    prop_assert_eq!(
        body["error"]["type"].as_str(),
        Some("invalid_request_error")
    );
    Ok(())
}

fn run(bytes: Vec<u8>) -> Result<(), TestCaseError> {
    let (c, l) = (codec(), limits());
    let h = json_headers();
    let body = || Ok(Bytes::from(bytes.clone()));
    match parse::<CompletionRequest>(&h, body(), 1 << 20)
        .and_then(|r| validation::completion(&r, c, &l))
    {
        Ok(v) => accepted_fits(&v)?,
        Err(e) => refusal_is_the_clients(&e)?,
    }
    match parse::<ChatRequest>(&h, body(), 1 << 20).and_then(|r| validation::chat(&r, c, &l)) {
        Ok(v) => accepted_fits(&v)?,
        Err(e) => refusal_is_the_clients(&e)?,
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_json_bodies_are_validated_or_refused_with_a_4xx(b in body()) {
        run(b.to_string().into_bytes())?;
    }

    #[test]
    fn arbitrary_bytes_are_refused_with_a_4xx(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        run(bytes)?;
    }

    #[test]
    fn chat_messages_of_any_shape_are_validated_or_refused(msgs in prop::collection::vec(value(), 0..4), max in value()) {
        let b = serde_json::json!({"messages": msgs, "max_tokens": max});
        run(b.to_string().into_bytes())?;
    }
}

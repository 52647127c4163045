//! Malformed fields are 400s naming the field, with the golden model's tokenizer.

use std::path::PathBuf;

use serde_json::{Value, json};

use super::*;

fn codec() -> TextCodec {
    let dir =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/models/tiny-dsv3-bf16");
    TextCodec::from_dir(&dir).expect("codec")
}

fn limits() -> Limits {
    Limits {
        model_name: "m".into(),
        vocab: 512,
        context: 64,
    }
}

fn run(kind: &str, body: Value) -> Result<Validated, ApiError> {
    let (c, l) = (codec(), limits());
    match kind {
        "chat" => chat(&serde_json::from_value(body).expect("shape"), &c, &l),
        _ => completion(&serde_json::from_value(body).expect("shape"), &c, &l),
    }
}

fn refused(kind: &str, body: Value) -> (String, String) {
    match run(kind, body.clone()) {
        Err(ApiError::BadRequest {
            param: Some(p),
            message,
            ..
        }) => (p, message),
        other => panic!("{body}: expected a 400 naming a parameter, got {other:?}"),
    }
}

fn user() -> Value {
    json!([{"role": "user", "content": "hi"}])
}

#[test]
fn logit_bias_and_response_format_of_the_wrong_type_are_400() {
    for bias in [json!("x"), json!(3), json!([1, 2]), json!(true)] {
        let (p, _) = refused("completion", json!({"prompt": "hi", "logit_bias": bias}));
        assert_eq!(p, "logit_bias");
        let (p, _) = refused("chat", json!({"messages": user(), "logit_bias": bias}));
        assert_eq!(p, "logit_bias");
    }
    for rf in [json!("x"), json!(1), json!({}), json!({"type": 3})] {
        let (p, m) = refused("chat", json!({"messages": user(), "response_format": rf}));
        assert_eq!(p, "response_format", "{rf}: {m}");
    }
    // What is allowed still is.
    for ok in [
        json!({"messages": user(), "logit_bias": {}, "response_format": {"type": "text"}}),
        json!({"messages": user(), "logit_bias": null, "response_format": null}),
    ] {
        run("chat", ok.clone()).unwrap_or_else(|e| panic!("{ok}: {e}"));
    }
}

#[test]
fn stop_sequences_are_limited_in_count_and_length() {
    let (p, m) = refused(
        "completion",
        json!({"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}),
    );
    assert_eq!(p, "stop");
    assert!(m.contains(&MAX_STOPS.to_string()), "{m}");
    let long = "x".repeat(MAX_STOP_BYTES + 1);
    let (p, m) = refused("chat", json!({"messages": user(), "stop": long}));
    assert_eq!(p, "stop");
    assert!(
        m.contains(&MAX_STOP_BYTES.to_string()),
        "names the limit: {m}"
    );
    let fits = "x".repeat(MAX_STOP_BYTES);
    run("chat", json!({"messages": user(), "stop": [fits, "y"]})).expect("at the limit");
}

#[test]
fn text_too_long_for_the_context_is_refused_by_its_bytes() {
    let c = codec();
    let most = limits().context * c.max_token_bytes();
    let (p, m) = refused("completion", json!({"prompt": "a".repeat(most + 1)}));
    assert_eq!(p, "prompt");
    assert!(m.contains("bytes"), "{m}");
    let (p, m) = refused(
        "chat",
        json!({"messages": [{"role": "user", "content": [{"type": "text", "text": "a".repeat(most + 1)}]}]}),
    );
    assert_eq!(p, "messages");
    assert!(m.contains("bytes"), "{m}");
    // Just within the byte bound the token count decides (and names max_tokens).
    let (p, _) = refused("completion", json!({"prompt": "a b ".repeat(most / 4)}));
    assert_eq!(p, "max_tokens");
}

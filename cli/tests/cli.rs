//! The `moe` binary end to end: real process, fixture models, golden outputs.

use std::path::{Path, PathBuf};
use std::process::Command;

use safetensors::SafeTensors;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/models")
        .join(name)
}

fn moe(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_moe"))
        .args(args)
        .env("MOE_LOG", "warn")
        .output()
        .expect("runs moe")
}

fn golden(name: &str) -> serde_json::Value {
    serde_json::from_str(
        &std::fs::read_to_string(fixture(name).join("golden/golden.json")).expect("read"),
    )
    .expect("json")
}

fn ids(v: &serde_json::Value) -> Vec<u64> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_u64().expect("id"))
        .collect()
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

#[test]
fn logits_command_reproduces_the_golden_logits() {
    let dir = tempfile::tempdir().expect("tmp");
    let g = golden("tiny-dsv3-fp8");
    let prompts: Vec<Vec<u64>> = g["prompts"]
        .as_array()
        .expect("prompts")
        .iter()
        .map(|p| ids(&p["ids"]))
        .collect();
    let prompts_file = dir.path().join("prompts.json");
    std::fs::write(
        &prompts_file,
        serde_json::json!({ "prompts": prompts }).to_string(),
    )
    .expect("write");
    let out_file = dir.path().join("logits.safetensors");
    let model = fixture("tiny-dsv3-fp8");
    let out = moe(&[
        "logits",
        "--model",
        model.to_str().expect("utf8"),
        "--prompts",
        prompts_file.to_str().expect("utf8"),
        "--out",
        out_file.to_str().expect("utf8"),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ours = std::fs::read(&out_file).expect("output");
    let ours = SafeTensors::deserialize(&ours).expect("safetensors");
    let gold = std::fs::read(fixture("tiny-dsv3-fp8").join("golden/golden_logits.safetensors"))
        .expect("golden");
    let gold = SafeTensors::deserialize(&gold).expect("golden safetensors");
    for (i, p) in prompts.iter().enumerate() {
        let name = format!("prompt_{i}");
        let a = ours.tensor(&name).expect("tensor");
        let b = gold.tensor(&name).expect("golden tensor");
        assert_eq!(a.shape(), &[p.len(), 512]);
        assert_eq!(a.shape(), b.shape());
        let d = f32s(a.data())
            .iter()
            .zip(f32s(b.data()))
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max);
        assert!(d <= 1e-3, "{name}: {d}");
    }
}

#[test]
fn generate_tokenizes_text_and_continues_greedily_as_the_reference() {
    let g = golden("tiny-dsv3-bf16");
    let model = fixture("tiny-dsv3-bf16");
    let out = moe(&[
        "generate",
        "--model",
        model.to_str().expect("utf8"),
        "--prompt",
        "The cat sat.",
        "--max-tokens",
        "24",
        "--ignore-eos",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json output");
    assert_eq!(
        ids(&v["prompt_ids"]),
        ids(&g["prompts"][1]["ids"]),
        "tokenization with BOS"
    );
    assert_eq!(
        ids(&v["output_ids"]),
        ids(&g["results"][1]["generated_ids"]),
        "greedy continuation"
    );
    assert_eq!(v["text"], g["results"][1]["generated_text"]);
}

#[test]
fn generate_rejects_bad_input_with_a_clear_error() {
    let model = fixture("tiny-dsv3-bf16");
    let m = model.to_str().expect("utf8");
    let out = moe(&["generate", "--model", m, "--prompt-ids", "0,999"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("token id 999 is outside the vocabulary")
    );
    let out = moe(&[
        "generate",
        "--model",
        m,
        "--prompt-ids",
        "0",
        "--temperature=-1",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("temperature must be >= 0"));
    let out = moe(&["generate", "--model", "/nonexistent/model", "--prompt", "x"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/model"));
}

fn gen_model(out: &Path, seed: &str) {
    let o = moe(&[
        "gen-model",
        "--preset",
        "tiny",
        "--out",
        out.to_str().expect("utf8"),
        "--seed",
        seed,
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn gen_model_is_deterministic_and_loadable() {
    let dir = tempfile::tempdir().expect("tmp");
    let (a, b, c) = (
        dir.path().join("a"),
        dir.path().join("b"),
        dir.path().join("c"),
    );
    gen_model(&a, "7");
    gen_model(&b, "7");
    gen_model(&c, "8");
    let read = |d: &Path| std::fs::read(d.join("model.safetensors")).expect("weights");
    assert_eq!(read(&a), read(&b), "same seed, same bytes");
    assert_ne!(read(&a), read(&c), "another seed, other weights");
    for f in [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        assert!(a.join(f).exists(), "{f}");
    }
    let out = moe(&[
        "generate",
        "--model",
        a.to_str().expect("utf8"),
        "--prompt",
        "Hello",
        "--max-tokens",
        "5",
        "--json",
        "--ignore-eos",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["output_ids"].as_array().expect("ids").len(), 5);
}

#[test]
fn the_tokenizer_reproduces_the_reference_cases() {
    let tok = tokenizers::Tokenizer::from_file(fixture("tiny-dsv3").join("tokenizer.json"))
        .expect("tokenizer");
    let cases = golden("tiny-dsv3")["tokenizer_cases"].clone();
    let cases = cases.as_array().expect("cases");
    assert!(!cases.is_empty());
    for case in cases {
        let text = case["text"].as_str().expect("text");
        let enc = tok.encode(text, true).expect("encode");
        let got: Vec<u64> = enc.get_ids().iter().map(|&i| u64::from(i)).collect();
        assert_eq!(got, ids(&case["ids_with_bos"]), "{text:?}");
        let ids32: Vec<u32> = enc.get_ids().to_vec();
        assert_eq!(
            tok.decode(&ids32, true).expect("decode"),
            case["decoded_skip_special"].as_str().expect("s")
        );
        assert_eq!(
            tok.decode(&ids32, false).expect("decode"),
            case["decoded_keep_special"].as_str().expect("s")
        );
    }
}

//! DeepSeek-V4 against the Hugging Face reference outputs of `tests/fixtures/models/tiny-dsv4`,
//! with the tolerances of its `golden.json`: logits at every prompt position, the four residual
//! streams after every layer, the HC head output and the final norm within 1e-3; hash-layer
//! routing identical, score-layer routing identical where the margin exceeds 1e-4 (weights
//! within 1e-4); compressed KV entries within 1e-3; CSA indexer picks identical where the
//! indexer margin exceeds 1e-4. Also: the same logits from the checkpoint re-saved under the
//! official tensor names, and an expert load that reads only its own tensors.

pub mod common;

use std::collections::HashMap;

use common::{Golden, assert_close, fixture, golden_json, prompts, read_golden};
use moe_model::ModelError;
use moe_model::checkpoint::Checkpoint;
use moe_model::v4::{V4Config, V4Model, V4Trace, experts};

const NAME: &str = "tiny-dsv4";
const TOL: f32 = 1e-3;
const MARGIN: f32 = 1e-4;

fn model() -> V4Model {
    V4Model::load(&fixture(NAME)).expect("tiny-dsv4 loads")
}

/// Worst differences seen, for the printed summary.
#[derive(Default, Debug)]
struct Worst {
    logits: f32,
    streams: f32,
    hc_head: f32,
    final_norm: f32,
    weights: f32,
    compressed: f32,
    routed_compared: usize,
    picks_compared: usize,
}

fn check_routing(p: &str, trace: &V4Trace, extra: &Golden, w: &mut Worst) {
    for (layer, r) in &trace.routing {
        let key = format!("routing.{p}.layer_{layer}");
        let (rows, k, gids) = &extra.ids[&format!("{key}.ids")];
        let gw = &extra.f32s[&format!("{key}.weights")];
        let margin = &extra.f32s[&format!("{key}.expert_margin")];
        assert_eq!((*rows, *k), (r.tokens(), r.top_k), "{key} shape");
        for t in 0..*rows {
            let hash = margin.data[t].is_infinite();
            if !hash && margin.data[t] <= MARGIN {
                continue;
            }
            let want: Vec<u32> = gids[t * k..][..*k].iter().map(|&v| v as u32).collect();
            assert_eq!(
                r.ids_of(t),
                want.as_slice(),
                "{key} token {t} (hash: {hash})"
            );
            for (a, b) in r.weights_of(t).iter().zip(gw.row(t)) {
                w.weights = w.weights.max((a - b).abs());
            }
            w.routed_compared += 1;
        }
    }
    assert!(
        w.weights <= MARGIN,
        "{p}: routing weights differ by {}",
        w.weights
    );
}

fn check_compressed(p: &str, trace: &V4Trace, extra: &Golden, w: &mut Worst) {
    for (layer, m) in &trace.compressed {
        let key = format!("compressed.{p}.layer_{layer}");
        match extra.f32s.get(&key) {
            Some(g) => w.compressed = w.compressed.max(assert_close(&key, m, g, TOL)),
            None => assert_eq!(m.rows, 0, "{key}: entries the reference does not have"),
        }
    }
    for (layer, picks) in &trace.picks {
        let key = format!("indexer.{p}.layer_{layer}");
        let (rows, k, gids) = &extra.ids[&format!("{key}.ids")];
        let margin = &extra.f32s[&format!("{key}.margin")];
        assert_eq!(*rows, picks.len(), "{key} rows");
        for (t, pk) in picks.iter().enumerate() {
            assert!(pk.len() <= *k, "{key} token {t}: picks");
            if margin.data[t] <= MARGIN {
                continue;
            }
            // The reference pads to min(index_topk, entries) with -1 (no entry).
            let mut ours: Vec<i64> = pk.iter().map(|&e| e as i64).collect();
            ours.resize(*k, -1);
            ours.sort_unstable();
            assert_eq!(ours, gids[t * k..][..*k], "{key} token {t}");
            w.picks_compared += 1;
        }
    }
}

#[test]
fn full_forward_matches_the_reference() {
    let model = model();
    let json = golden_json(NAME);
    let logits = read_golden(NAME, "golden_logits.safetensors");
    let extra = read_golden(NAME, "golden_extra.safetensors");
    let mut w = Worst::default();
    for (i, ids) in prompts(&json).iter().enumerate() {
        let p = format!("prompt_{i}");
        let mut trace = V4Trace::default();
        let ours = model.forward_full(ids, Some(&mut trace)).expect("forward");
        let d = assert_close(&format!("{p} logits"), &ours, &logits.f32s[&p], TOL);
        w.logits = w.logits.max(d);
        assert_close(
            &format!("{p} embed"),
            &trace.embed,
            &extra.f32s[&format!("hidden.{p}.embed")],
            0.0,
        );
        for (l, h) in trace.layers.iter().enumerate() {
            if let Some(g) = extra.f32s.get(&format!("hidden.{p}.layer_{l}")) {
                let d = assert_close(&format!("{p} layer {l} streams"), h, g, TOL);
                w.streams = w.streams.max(d);
            }
        }
        let hc = &extra.f32s[&format!("hidden.{p}.hc_head")];
        w.hc_head = w.hc_head.max(assert_close(
            &format!("{p} hc head"),
            &trace.hc_head,
            hc,
            TOL,
        ));
        let fnorm = &extra.f32s[&format!("hidden.{p}.final_norm")];
        w.final_norm = w.final_norm.max(assert_close(
            &format!("{p} final norm"),
            &trace.final_norm,
            fnorm,
            TOL,
        ));
        check_routing(&p, &trace, &extra, &mut w);
        check_compressed(&p, &trace, &extra, &mut w);
    }
    assert!(w.routed_compared > 400 && w.picks_compared > 100, "{w:?}");
    eprintln!("tiny-dsv4 worst |diff| vs golden: {w:?}");
}

/// Rewrites the fixture checkpoint under the official names (`tensors.txt`'s last column:
/// `model.` dropped, `embed.weight`, `norm.weight`, `hc_head_*`).
fn official_name(saved: &str) -> String {
    match saved {
        "model.embed_tokens.weight" => "embed.weight".into(),
        "model.norm.weight" => "norm.weight".into(),
        s => match s.strip_prefix("model.hc_head.hc_") {
            Some(part) => format!("hc_head_{part}"),
            None => s.strip_prefix("model.").unwrap_or(s).to_string(),
        },
    }
}

#[test]
fn official_tensor_names_load_to_the_same_logits() {
    let src = fixture(NAME);
    let bytes = std::fs::read(src.join("model.safetensors")).expect("weights");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
    let renamed: HashMap<String, safetensors::tensor::TensorView<'_>> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (official_name(&n), v))
        .collect();
    assert!(renamed.contains_key("layers.0.ffn.gate.tid2eid"));
    let dir = tempfile::tempdir().expect("tempdir");
    safetensors::serialize_to_file(&renamed, None, &dir.path().join("model.safetensors"))
        .expect("write");
    std::fs::copy(src.join("config.json"), dir.path().join("config.json")).expect("config");
    let official = V4Model::load(dir.path()).expect("official names load");
    let hf = model();
    let json = golden_json(NAME);
    let ids = &prompts(&json)[2];
    let a = official.forward_full(ids, None).expect("forward");
    let b = hf.forward_full(ids, None).expect("forward");
    assert_eq!(a, b);
}

#[test]
fn an_expert_pair_reads_only_its_own_tensors() {
    let cfg = V4Config::from_dir(&fixture(NAME)).expect("config");
    let ckpt = Checkpoint::open(&fixture(NAME), None).expect("checkpoint");
    let store = experts::load_experts(&cfg, &ckpt, &[(3, 200)]).expect("one expert");
    assert_eq!(store.len(), 1);
    let one = 3 * cfg.hidden_size * cfg.moe_intermediate_size * 4;
    assert_eq!(ckpt.bytes_read() as usize, one);
    let mlp = store.get(3, 200).expect("held");
    assert_eq!(mlp.limit(), Some(cfg.swiglu_limit as f32));
    let err = experts::load_experts(&cfg, &ckpt, &[(5, 0)]).expect_err("no layer 5");
    assert!(matches!(err, ModelError::InvalidInput(_)), "{err}");
}

#[test]
fn a_hash_table_listing_an_expert_twice_is_refused() {
    let src = fixture(NAME);
    let bytes = std::fs::read(src.join("model.safetensors")).expect("weights");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
    let name = "model.layers.1.ffn.gate.tid2eid";
    let mut table = st.tensor(name).expect("table").data().to_vec();
    // Token 7's second expert := its first.
    let row = 7 * 6 * 8;
    let first: [u8; 8] = table[row..row + 8].try_into().expect("8 bytes");
    table[row + 8..row + 16].copy_from_slice(&first);
    let mut views: HashMap<String, safetensors::tensor::TensorView<'_>> =
        st.tensors().into_iter().collect();
    views.insert(
        name.into(),
        safetensors::tensor::TensorView::new(safetensors::Dtype::I64, vec![512, 6], &table)
            .expect("view"),
    );
    let dir = tempfile::tempdir().expect("tempdir");
    safetensors::serialize_to_file(&views, None, &dir.path().join("model.safetensors"))
        .expect("write");
    std::fs::copy(src.join("config.json"), dir.path().join("config.json")).expect("config");
    let err = V4Model::load(dir.path()).expect_err("duplicate expert");
    assert!(err.to_string().contains("twice for token id 7"), "{err}");
}

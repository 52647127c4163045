//! The paged KV cache: what it holds and what reading it costs.
//!
//! Prints, for the DeepSeek-V3 shape (`tests/fixtures/configs/deepseek-v3.json`), the KV bytes
//! per token in f32 and bf16 and how many 4,096-token sequences the default 4 GiB budget admits
//! before (f32, prompt + `max_tokens` reserved per sequence) and after (pages: the prompt plus
//! one page of decode headroom; sequences that outgrow the cache are preempted), and what a chat
//! request without `max_tokens` at the model's 163,840-token context got. Then times one decode
//! step of the tiny golden model at a 2,000-token context with 16-token pages, one 2,048-token
//! page (a contiguous cache), and bf16 pages: the cost of reading the cache page by page.

use criterion::{Criterion, criterion_group, criterion_main};
use moe_model::cache::DEFAULT_PAGE_TOKENS;
use moe_model::model::{LoadOptions, LogitsMode, Model, SeqInput};
use moe_model::{Config, KvDtype, KvLayout, KvPool, SeqCache};

const BUDGET: usize = 4 << 30;
const SEQ: usize = 4096;
const CONTEXT: usize = 2000;

fn root() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn report() {
    let path = root().join("tests/fixtures/configs/deepseek-v3.json");
    let cfg = Config::from_json(&std::fs::read_to_string(path).expect("V3 config")).expect("parse");
    println!(
        "DeepSeek-V3 shape: {} layers x ({} + {}) values per token",
        cfg.num_hidden_layers, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    );
    let f32 = KvLayout::new(&cfg, DEFAULT_PAGE_TOKENS, KvDtype::F32);
    let bf16 = KvLayout::new(&cfg, DEFAULT_PAGE_TOKENS, KvDtype::Bf16);
    for l in [f32, bf16] {
        println!(
            "  {:>4}: {} B per token ({:.1} KiB), {} B per {}-token page",
            l.dtype.as_str(),
            l.bytes_per_token(),
            l.bytes_per_token() as f64 / 1024.0,
            l.page_bytes(),
            l.page_tokens
        );
    }
    let before_tokens = BUDGET / f32.bytes_per_token();
    println!(
        "default budget {} GiB, {SEQ}-token sequences admitted:",
        BUDGET >> 30
    );
    println!(
        "  before (f32, grown by doubling, prompt + max_tokens reserved): {} tokens -> {} sequences; a chat without max_tokens at {} context reserved {} tokens -> {}",
        before_tokens,
        before_tokens / SEQ,
        cfg.max_position_embeddings,
        cfg.max_position_embeddings,
        if cfg.max_position_embeddings > before_tokens {
            "refused (400)"
        } else {
            "admitted"
        }
    );
    for l in [f32, bf16] {
        let pages = BUDGET / l.page_bytes();
        let admit = l.pages_for(SEQ + l.page_tokens);
        let grown = l.pages_for(SEQ);
        let len = cfg.max_position_embeddings.min(pages * l.page_tokens);
        println!(
            "  after ({}, pages): {pages} pages; {} prompts of {SEQ} admitted ({admit} pages each), {} sequences held at {SEQ} tokens; default --max-model-len {len}, a chat without max_tokens is admitted by its prompt",
            l.dtype.as_str(),
            pages / admit,
            pages / grown
        );
    }
}

fn decode_step(model: &Model, pool: &KvPool, prompt: &[u32]) -> SeqCache {
    let mut cache = SeqCache::in_pool(pool);
    for chunk in prompt.chunks(500) {
        let mut s = [SeqInput {
            tokens: chunk,
            cache: &mut cache,
        }];
        model
            .forward(&mut s, LogitsMode::Last, None)
            .expect("prefill");
    }
    cache
}

fn bench(c: &mut Criterion) {
    report();
    let dir = root().join("tests/fixtures/models/tiny-dsv3-bf16");
    let model = Model::load(&dir, &LoadOptions::default()).expect("tiny model");
    let prompt: Vec<u32> = (0..CONTEXT).map(|t| ((t * 37) % 500 + 4) as u32).collect();
    let mut g = c.benchmark_group(format!("decode_at_{CONTEXT}_tokens"));
    for (name, pt, dtype) in [
        ("f32_pages_of_16", 16, KvDtype::F32),
        ("f32_one_page", 2048, KvDtype::F32),
        ("bf16_pages_of_16", 16, KvDtype::Bf16),
    ] {
        let pool = KvPool::new(KvLayout::new(model.config(), pt, dtype), None, false);
        let mut cache = decode_step(&model, &pool, &prompt);
        g.bench_function(name, |b| {
            b.iter(|| {
                let mut s = [SeqInput {
                    tokens: &[7],
                    cache: &mut cache,
                }];
                let out = model
                    .forward(&mut s, LogitsMode::Last, None)
                    .expect("decode");
                cache.truncate(CONTEXT);
                out
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

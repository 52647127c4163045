//! `moe generate`: prompt in, continuation out; experts in this process or on expert nodes.
//! DeepSeek-V4 models (`model_type: deepseek_v4`) run through the V4 decoder and its cache.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, bail};
use moe_model::model::{LogitsMode, SeqInput};
use moe_model::presets::Preset;
use moe_model::sampling::{Sampler, SamplingParams};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Model directory (config.json, safetensors, tokenizer.json).
    #[arg(long, env = "MOE_MODEL")]
    model: Option<PathBuf>,
    /// Without --model: generate this preset (tiny, bench) once into the temp dir and use it.
    #[arg(long, default_value = "tiny")]
    preset: Preset,
    /// Prompt text (tokenized with the model's tokenizer, BOS added).
    #[arg(
        long,
        conflicts_with = "prompt_ids",
        required_unless_present = "prompt_ids"
    )]
    prompt: Option<String>,
    /// Prompt as comma-separated token ids.
    #[arg(long, value_delimiter = ',')]
    prompt_ids: Option<Vec<u32>>,
    /// Tokens to generate.
    #[arg(long, default_value_t = 32)]
    max_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// 0 = off.
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Drop tokens less likely than min_p times the most likely one; 0 = off.
    #[arg(long, default_value_t = 0.0)]
    min_p: f32,
    #[arg(long)]
    seed: Option<u64>,
    /// Keep generating past the end-of-sequence token.
    #[arg(long)]
    ignore_eos: bool,
    /// Print `{"prompt_ids", "output_ids", "text"}` instead of the text.
    #[arg(long)]
    json: bool,
    /// Also print the logits of every step (with --json): `"logits": [[...], ...]`.
    #[arg(long, requires = "json")]
    logits: bool,
    #[command(flatten)]
    remote: crate::engine::RemoteArgs,
}

/// One sequence's engine and cache, of either family.
enum Stepper {
    V3(Box<crate::engine::Engine>, moe_model::SeqCache),
    V4(Box<crate::engine::V4Engine>, moe_model::v4::V4Cache),
}

impl Stepper {
    fn load(dir: &std::path::Path, remote: &crate::engine::RemoteArgs) -> anyhow::Result<Self> {
        Ok(if crate::engine::is_v4(dir)? {
            let e = crate::engine::V4Engine::load(dir, remote)?;
            let cache = e.new_cache();
            Stepper::V4(Box::new(e), cache)
        } else {
            let e = crate::engine::Engine::load(dir, remote)?;
            let cache = e.new_cache();
            Stepper::V3(Box::new(e), cache)
        })
    }

    fn eos(&self) -> Vec<u32> {
        match self {
            Stepper::V3(e, _) => e.config().eos_token_ids(),
            Stepper::V4(e, _) => e.config().eos_token_ids(),
        }
    }

    /// Feeds `tokens` and returns the last position's logits.
    fn step(&mut self, tokens: &[u32]) -> moe_model::Result<moe_model::Matrix> {
        let mut out = match self {
            Stepper::V3(e, cache) => {
                e.forward(&mut [SeqInput { tokens, cache }], LogitsMode::Last)?
            }
            Stepper::V4(e, cache) => e.forward(
                &mut [moe_model::v4::V4SeqInput { tokens, cache }],
                LogitsMode::Last,
            )?,
        };
        Ok(out.remove(0))
    }
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let params = SamplingParams {
        temperature: a.temperature,
        top_p: a.top_p,
        top_k: a.top_k,
        min_p: a.min_p,
        seed: a.seed,
    };
    params.validate().map_err(anyhow::Error::msg)?;
    let model_dir = match &a.model {
        Some(dir) => dir.clone(),
        None => crate::commands::gen_model::cached_preset(a.preset)?,
    };
    let tok_path = model_dir.join("tokenizer.json");
    let tokenizer = tokenizers::Tokenizer::from_file(&tok_path)
        .map_err(|e| anyhow::anyhow!("loading {}: {e}", tok_path.display()))?;
    let prompt_ids: Vec<u32> = match (&a.prompt, &a.prompt_ids) {
        (Some(text), _) => tokenizer
            .encode(text.as_str(), true)
            .map_err(|e| anyhow::anyhow!("tokenizing: {e}"))?
            .get_ids()
            .to_vec(),
        (None, Some(ids)) => ids.clone(),
        (None, None) => bail!("give --prompt or --prompt-ids"),
    };
    if prompt_ids.is_empty() {
        bail!("the prompt is empty");
    }
    let mut step = Stepper::load(&model_dir, &a.remote)?;
    let eos = step.eos();
    let mut sampler = Sampler::new(params);
    let mut output = Vec::with_capacity(a.max_tokens);
    let mut next = prompt_ids.clone();
    let start = Instant::now();
    let mut first_token = None;
    let mut step_logits: Vec<Vec<f32>> = Vec::new();
    while output.len() < a.max_tokens {
        let logits = step.step(&next).context("forward pass")?;
        if a.logits {
            step_logits.push(logits.data.clone());
        }
        first_token.get_or_insert_with(Instant::now);
        let id = sampler.sample(&logits.data);
        output.push(id);
        if !a.ignore_eos && eos.contains(&id) {
            break;
        }
        next = vec![id];
    }
    let prefill = first_token.map_or(0.0, |t| (t - start).as_secs_f64());
    let decode = first_token.map_or(0.0, |t| t.elapsed().as_secs_f64());
    tracing::info!(
        prompt_tokens = prompt_ids.len(),
        output_tokens = output.len(),
        prefill_tok_s = format!("{:.1}", prompt_ids.len() as f64 / prefill.max(1e-9)),
        decode_tok_s = format!(
            "{:.1}",
            output.len().saturating_sub(1) as f64 / decode.max(1e-9)
        ),
        "generated"
    );
    let text = tokenizer
        .decode(&output, true)
        .map_err(|e| anyhow::anyhow!("decoding: {e}"))?;
    if a.json {
        println!(
            "{}",
            serde_json::json!({"prompt_ids": prompt_ids, "output_ids": output, "text": text})
        );
    } else {
        println!("{text}");
    }
    Ok(())
}

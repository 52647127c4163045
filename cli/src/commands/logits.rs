//! `moe logits`: logits at every position of every prompt, as float32 safetensors. DeepSeek-V4
//! models (`model_type: deepseek_v4`) run through the V4 decoder, locally or against expert
//! nodes (`--experts-at`), the same way.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::Context;
use moe_model::model::{LogitsMode, SeqInput};
use safetensors::{Dtype, tensor::TensorView};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Model directory (config.json, safetensors).
    #[arg(long)]
    model: PathBuf,
    /// JSON file `{"prompts": [[token ids], ...]}`.
    #[arg(long)]
    prompts: PathBuf,
    /// Output file: tensor `prompt_<i>` of shape [len, vocab] per prompt.
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    remote: crate::engine::RemoteArgs,
}

#[derive(serde::Deserialize)]
struct Prompts {
    prompts: Vec<Vec<u32>>,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&a.prompts)
        .with_context(|| format!("reading {}", a.prompts.display()))?;
    let prompts: Prompts = serde_json::from_str(&text)
        .with_context(|| format!("{}: expected {{\"prompts\": [[ids]]}}", a.prompts.display()))?;
    let logits = if crate::engine::is_v4(&a.model)? {
        v4_logits(&a, &prompts.prompts)?
    } else {
        v3_logits(&a, &prompts.prompts)?
    };
    write(&a, &logits)
}

fn v3_logits(a: &Args, prompts: &[Vec<u32>]) -> anyhow::Result<Vec<moe_model::Matrix>> {
    let model = crate::engine::Engine::load(&a.model, &a.remote)?;
    let mut caches: Vec<_> = prompts.iter().map(|_| model.new_cache()).collect();
    let mut seqs: Vec<SeqInput<'_>> = prompts
        .iter()
        .zip(caches.iter_mut())
        .map(|(tokens, cache)| SeqInput { tokens, cache })
        .collect();
    Ok(model.forward(&mut seqs, LogitsMode::All)?)
}

/// The V4 decoder over the prompts, with local experts or the nodes of `--experts-at`.
fn v4_logits(a: &Args, prompts: &[Vec<u32>]) -> anyhow::Result<Vec<moe_model::Matrix>> {
    let engine = crate::engine::V4Engine::load(&a.model, &a.remote)?;
    let mut caches: Vec<_> = prompts.iter().map(|_| engine.new_cache()).collect();
    let mut seqs: Vec<moe_model::v4::V4SeqInput<'_>> = prompts
        .iter()
        .zip(caches.iter_mut())
        .map(|(tokens, cache)| moe_model::v4::V4SeqInput { tokens, cache })
        .collect();
    Ok(engine.forward(&mut seqs, LogitsMode::All)?)
}

fn write(a: &Args, logits: &[moe_model::Matrix]) -> anyhow::Result<()> {
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = logits
        .iter()
        .enumerate()
        .map(|(i, m)| {
            (
                format!("prompt_{i}"),
                vec![m.rows, m.cols],
                m.data.iter().flat_map(|v| v.to_le_bytes()).collect(),
            )
        })
        .collect();
    let views: HashMap<String, TensorView<'_>> = bytes
        .iter()
        .map(|(n, s, b)| Ok((n.clone(), TensorView::new(Dtype::F32, s.clone(), b)?)))
        .collect::<Result<_, safetensors::SafeTensorError>>()?;
    safetensors::serialize_to_file(views, None, &a.out)
        .with_context(|| format!("writing {}", a.out.display()))?;
    tracing::info!(prompts = logits.len(), out = %a.out.display(), "logits written");
    Ok(())
}

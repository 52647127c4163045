//! `moe logits`: logits at every position of every prompt, as float32 safetensors.

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
    let model = crate::engine::Engine::load(&a.model, &a.remote)?;
    let mut caches: Vec<_> = prompts.prompts.iter().map(|_| model.new_cache()).collect();
    let mut seqs: Vec<SeqInput<'_>> = prompts
        .prompts
        .iter()
        .zip(caches.iter_mut())
        .map(|(tokens, cache)| SeqInput { tokens, cache })
        .collect();
    let logits = model.forward(&mut seqs, LogitsMode::All)?;
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

//! `moe gen-model`: write a random-weight checkpoint for a preset.

use std::path::PathBuf;

use moe_model::presets::{GenDtype, Preset, write_preset};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// `tiny` (the shape of the golden test model), `bench` (1B parameters, 256 experts), or
    /// `tiny-129k` / `bench-129k`: the same with DeepSeek's 129,280-token vocabulary.
    #[arg(long, default_value = "tiny")]
    preset: Preset,
    /// Output directory (created if missing).
    #[arg(long)]
    out: PathBuf,
    /// Seed of the weights; the same seed writes the same bytes.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Weight dtype.
    #[arg(long, default_value = "bf16")]
    dtype: GenDtype,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let start = std::time::Instant::now();
    write_preset(a.preset, &a.out, a.seed, a.dtype)?;
    tracing::info!(out = %a.out.display(), preset = ?a.preset, secs = format!("{:.1}", start.elapsed().as_secs_f64()), "model written");
    Ok(())
}

/// A preset generated (seed 0, bf16) into `$TMPDIR/moe-presets/`, written once and reused.
pub fn cached_preset(preset: Preset) -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir()
        .join("moe-presets")
        .join(format!("{preset:?}-seed0").to_lowercase());
    let done = dir.join(".complete");
    if !done.exists() {
        tracing::info!(dir = %dir.display(), ?preset, "generating preset model");
        write_preset(preset, &dir, 0, GenDtype::Bf16)?;
        std::fs::write(&done, b"")?;
    }
    Ok(dir)
}

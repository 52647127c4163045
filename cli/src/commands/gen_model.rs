//! `moe gen-model`: write a random-weight checkpoint for a preset.

use std::path::PathBuf;

use moe_model::presets::{GenDtype, Preset, write_preset};
use moe_model::v4::preset::{V4Preset, write_v4_preset};
use moe_model::v4::quantize::{QuantizeOptions, quantize_dir};

/// `--quantize`: how a V4 preset's weights are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Quantize {
    /// As `--dtype` says.
    None,
    /// DeepSeek-V4's release layout: FP8 (e4m3, 128×128 E8M0 block scales) dense linears and
    /// FP4 (e2m1, per-32-column E8M0 scales) routed experts.
    #[value(name = "fp8-fp4")]
    Fp8Fp4,
}

/// A DeepSeek-V3-layout or a DeepSeek-V4 preset.
#[derive(Debug, Clone, Copy)]
pub enum AnyPreset {
    V3(Preset),
    V4(V4Preset),
}

impl std::str::FromStr for AnyPreset {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Ok(p) = s.parse::<V4Preset>() {
            return Ok(AnyPreset::V4(p));
        }
        s.parse::<Preset>()
            .map(AnyPreset::V3)
            .map_err(|e| format!("{e}; or tiny-v4, bench-v4 (DeepSeek-V4)"))
    }
}

#[derive(Debug, clap::Args)]
pub struct Args {
    /// `tiny` (the shape of the golden test model), `bench` (1B parameters, 256 experts),
    /// `tiny-129k` / `bench-129k`: the same with DeepSeek's 129,280-token vocabulary; or
    /// DeepSeek-V4: `tiny-v4` (the shape of the V4 golden model), `bench-v4` (V4-Flash-like, 1B).
    #[arg(long, default_value = "tiny")]
    preset: AnyPreset,
    /// Output directory (created if missing).
    #[arg(long)]
    out: PathBuf,
    /// Seed of the weights; the same seed writes the same bytes.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Weight dtype.
    #[arg(long, default_value = "bf16")]
    dtype: GenDtype,
    /// DeepSeek-V4 presets only: `fp8-fp4` quantises the generated weights as the official
    /// release ships them.
    #[arg(long, value_enum, default_value = "none")]
    quantize: Quantize,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let start = std::time::Instant::now();
    match (a.preset, a.quantize) {
        (AnyPreset::V3(_), Quantize::Fp8Fp4) => {
            anyhow::bail!("--quantize fp8-fp4 is for the DeepSeek-V4 presets (tiny-v4, bench-v4)")
        }
        (AnyPreset::V3(p), Quantize::None) => write_preset(p, &a.out, a.seed, a.dtype)?,
        (AnyPreset::V4(p), Quantize::None) => write_v4_preset(p, &a.out, a.seed, a.dtype)?,
        (AnyPreset::V4(p), Quantize::Fp8Fp4) => {
            // Generate next to the output, quantise into it, remove the unquantised copy.
            let name = a
                .out
                .file_name()
                .map_or_else(|| "model".to_string(), |n| n.to_string_lossy().into_owned());
            let staging = a.out.with_file_name(format!(".{name}.unquantized"));
            write_v4_preset(p, &staging, a.seed, a.dtype)?;
            let report = quantize_dir(&staging, &a.out, QuantizeOptions::default());
            std::fs::remove_dir_all(&staging)?;
            let report = report?;
            tracing::info!(
                fp8 = report.fp8,
                fp4 = report.fp4,
                bytes = report.bytes_written,
                "quantized"
            );
        }
    }
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

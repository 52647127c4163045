//! Model loading with a progress bar on a terminal (bytes read of the bytes selected) and a
//! `tracing` line at the end either way.

use std::io::IsTerminal;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use moe_model::checkpoint::TensorFilter;
use moe_model::model::{Backbone, LoadOptions, Model, open};

/// A bar on stderr for `total` bytes when stderr is a terminal, and load options feeding it.
fn bar(total: u64) -> (Option<ProgressBar>, LoadOptions) {
    let mut opts = LoadOptions::default();
    let bar = std::io::stderr().is_terminal().then(|| {
        let bar = ProgressBar::new(total);
        bar.set_style(
            ProgressStyle::with_template("loading {bar:40} {bytes}/{total_bytes} {msg} ({eta})")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar
    });
    if let Some(bar) = &bar {
        let b = bar.clone();
        opts.progress = Some(Arc::new(move |p| {
            b.set_position(p.bytes);
            b.set_message(format!("{} tensors", p.tensors));
        }));
    }
    (bar, opts)
}

fn done(bar: Option<ProgressBar>, dir: &Path, total: u64, start: Instant, what: &str) {
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    tracing::info!(
        model = %dir.display(),
        mib = total / (1 << 20),
        secs = format!("{:.2}", start.elapsed().as_secs_f64()),
        kernel = ?moe_model::kernels::kernel_choice(),
        "{what} ready"
    );
}

/// Loads the single-process model from `dir`.
pub fn load_model(dir: &Path) -> anyhow::Result<Model> {
    refuse_v4(dir)?;
    let start = Instant::now();
    let total =
        Model::load_bytes(dir).with_context(|| format!("opening model {}", dir.display()))?;
    let (bar, opts) = bar(total);
    let model =
        Model::load(dir, &opts).with_context(|| format!("loading model {}", dir.display()))?;
    done(bar, dir, total, start, "model");
    Ok(model)
}

/// The scheduler (`moe serve`, `moe router`, `moe up`) runs V3-family models only so far.
fn refuse_v4(dir: &Path) -> anyhow::Result<()> {
    if crate::engine::is_v4(dir).unwrap_or(false) {
        anyhow::bail!(
            "{}: DeepSeek-V4 models run in `moe logits`, `moe generate` and `moe expert-node` so \
             far; the batching scheduler of `moe serve`, `moe router` and `moe up` does not \
             serve them yet",
            dir.display()
        );
    }
    Ok(())
}

/// Loads everything but the routed experts (the router's part).
pub fn load_backbone(dir: &Path) -> anyhow::Result<Backbone> {
    refuse_v4(dir)?;
    let start = Instant::now();
    let (cfg, mut ckpt) = open(dir).with_context(|| format!("opening model {}", dir.display()))?;
    let total = ckpt.selected_bytes(&TensorFilter::Backbone {
        num_layers: cfg.num_hidden_layers,
    });
    let (bar, opts) = bar(total);
    if let Some(p) = opts.progress {
        ckpt.set_progress(p);
    }
    let backbone =
        Backbone::load(&cfg, &ckpt).with_context(|| format!("loading model {}", dir.display()))?;
    done(bar, dir, total, start, "backbone");
    Ok(backbone)
}

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
use moe_model::v4::{V4Backbone, V4Model};
use moe_router::AnyBackbone;

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

/// Loads the single-process V3-family model from `dir`.
pub fn load_model(dir: &Path) -> anyhow::Result<Model> {
    ensure_v3(dir)?;
    let start = Instant::now();
    let total =
        Model::load_bytes(dir).with_context(|| format!("opening model {}", dir.display()))?;
    let (bar, opts) = bar(total);
    let model =
        Model::load(dir, &opts).with_context(|| format!("loading model {}", dir.display()))?;
    done(bar, dir, total, start, "model");
    Ok(model)
}

/// The V3-family loaders are not for V4 models (their callers pick the family first).
fn ensure_v3(dir: &Path) -> anyhow::Result<()> {
    anyhow::ensure!(
        !crate::engine::is_v4(dir).unwrap_or(false),
        "{}: a DeepSeek-V4 model where a V3-family one was expected",
        dir.display()
    );
    Ok(())
}

/// Loads the single-process engine of either family (`moe serve`).
pub fn load_engine(dir: &Path) -> anyhow::Result<moe_router::Engine> {
    if !crate::engine::is_v4(dir)? {
        return Ok(moe_router::Engine::local(load_model(dir)?));
    }
    let start = Instant::now();
    let model = V4Model::load(dir).with_context(|| format!("loading model {}", dir.display()))?;
    done(None, dir, 0, start, "DeepSeek-V4 model");
    Ok(moe_router::Engine::local_v4(model))
}

/// Loads everything but the routed experts of a V3-family model (the router's part).
pub fn load_v3_backbone(dir: &Path) -> anyhow::Result<Backbone> {
    ensure_v3(dir)?;
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

/// Loads everything but the routed experts, of either family (`moe router`, `moe up`).
pub fn load_backbone(dir: &Path) -> anyhow::Result<AnyBackbone> {
    if !crate::engine::is_v4(dir)? {
        return Ok(load_v3_backbone(dir)?.into());
    }
    let start = Instant::now();
    let (cfg, ckpt) = moe_model::v4::model::open(dir)
        .with_context(|| format!("opening model {}", dir.display()))?;
    let backbone = V4Backbone::load(&cfg, &ckpt)
        .with_context(|| format!("loading model {}", dir.display()))?;
    done(None, dir, 0, start, "DeepSeek-V4 backbone");
    Ok(backbone.into())
}

//! Model loading with a progress bar on a terminal (bytes read of the bytes selected) and a
//! `tracing` line at the end either way.

use std::io::IsTerminal;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use moe_model::model::{LoadOptions, Model};

/// Loads the single-process model from `dir`, showing progress on stderr when it is a terminal.
pub fn load_model(dir: &Path) -> anyhow::Result<Model> {
    let start = Instant::now();
    let total =
        Model::load_bytes(dir).with_context(|| format!("opening model {}", dir.display()))?;
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
    let model =
        Model::load(dir, &opts).with_context(|| format!("loading model {}", dir.display()))?;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    tracing::info!(
        model = %dir.display(),
        mib = total / (1 << 20),
        secs = format!("{:.2}", start.elapsed().as_secs_f64()),
        kernel = ?moe_model::kernels::kernel_choice(),
        "ready"
    );
    Ok(model)
}

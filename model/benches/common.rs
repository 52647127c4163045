//! Shared bench setup: the `bench` preset model, generated once into `target/` (or taken from
//! `MOE_BENCH_MODEL`).

use std::path::PathBuf;

use moe_model::presets::{GenDtype, Preset, write_preset};

pub fn bench_model_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("MOE_BENCH_MODEL") {
        return PathBuf::from(dir);
    }
    let dir =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/moe-bench-model/bench-seed0");
    let done = dir.join(".complete");
    if !done.exists() {
        eprintln!("generating the bench preset into {} ...", dir.display());
        write_preset(Preset::Bench, &dir, 0, GenDtype::Bf16).expect("write bench preset");
        std::fs::write(&done, b"").expect("marker");
    }
    dir
}

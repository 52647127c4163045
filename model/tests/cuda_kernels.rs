//! Every CUDA kernel source compiles with NVRTC for sm_80 and sm_90 and its PTX defines every
//! entry point. Needs only `libnvrtc.so.12` (PyPI `nvidia-cuda-nvrtc-cu12`, on
//! `LD_LIBRARY_PATH`), no GPU. Without it the test says it was skipped, unless
//! `MOE_REQUIRE_NVRTC=1` (set by `.ci/run`), where a missing library fails.
#![cfg(feature = "cuda")]
#![allow(unsafe_code)]

use moe_model::cuda::kernels::{ENTRIES, SOURCE, compile};

fn nvrtc_present() -> bool {
    // SAFETY: only tries to dlopen libnvrtc by its usual names.
    let present = unsafe { cudarc::nvrtc::sys::is_culib_present() };
    if !present {
        assert!(
            std::env::var("MOE_REQUIRE_NVRTC").as_deref() != Ok("1"),
            "MOE_REQUIRE_NVRTC=1 but libnvrtc.so.12 does not load (LD_LIBRARY_PATH={:?})",
            std::env::var("LD_LIBRARY_PATH").ok()
        );
        eprintln!("skipped: libnvrtc.so.12 not found (pip install nvidia-cuda-nvrtc-cu12)");
    }
    present
}

#[test]
fn every_kernel_compiles_for_sm80_and_sm90() {
    if !nvrtc_present() {
        return;
    }
    for name in ENTRIES {
        assert!(
            SOURCE.contains(&format!("__global__ void {name}(")),
            "{name} is not an entry of the source"
        );
    }
    for arch in ["compute_80", "compute_90"] {
        let ptx = compile(Some(arch)).unwrap_or_else(|e| panic!("{arch}: {e}"));
        let text = ptx.to_src();
        let target = arch.replace("compute_", "sm_");
        assert!(
            text.contains(&format!(".target {target}")),
            "{arch}: {text:.400}"
        );
        for name in ENTRIES {
            assert!(
                text.contains(&format!(".entry {name}(")),
                "{arch}: no .entry {name} in the PTX"
            );
        }
    }
}

#[test]
fn a_broken_kernel_is_an_error() {
    if !nvrtc_present() {
        return;
    }
    let opts = cudarc::nvrtc::CompileOptions {
        arch: Some("compute_80"),
        ..Default::default()
    };
    let r = cudarc::nvrtc::compile_ptx_with_opts(
        "extern \"C\" __global__ void k(float* x) { x[0] = undefined_name; }",
        opts,
    );
    assert!(r.is_err(), "NVRTC accepted an undefined identifier");
}

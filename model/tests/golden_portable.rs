//! The golden logits again with the portable (non-AVX-512) kernel forced, so the fallback that
//! CPUs without AVX-512 run is held to the same tolerance. A separate test binary: the kernel
//! choice is process-wide.

pub mod common;

use common::*;
use moe_model::kernels::{KernelChoice, kernel_choice, set_kernel_choice};

#[test]
fn portable_kernels_match_golden_logits() {
    set_kernel_choice(KernelChoice::Portable);
    assert_eq!(kernel_choice(), KernelChoice::Portable);
    for name in ["tiny-dsv3-bf16", "tiny-dsv3-fp8"] {
        let model = load(name);
        let json = golden_json(name);
        let logits = read_golden(name, "golden_logits.safetensors");
        for (i, ids) in prompts(&json).iter().enumerate() {
            let (ours, _) = full_forward(&model, ids);
            assert_close(
                &format!("{name} prompt_{i} (portable)"),
                &ours,
                &logits.f32s[&format!("prompt_{i}")],
                1e-3,
            );
        }
    }
}

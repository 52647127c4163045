#!/usr/bin/env bash
# The device check of the CUDA backend, on a machine with an NVIDIA GPU, driver and the CUDA 12
# libraries (libcublas, libnvrtc on LD_LIBRARY_PATH). Not run yet: no GPU was available to the
# session that wrote it.
#   1. builds with --features cuda (release: the benchmark needs it; tests share the build);
#   2. the NVRTC compile check and the device tests: tests/e2e/cuda_device.rs starts expert nodes
#      with --device cuda on the tiny f32/bf16/FP8 fixtures and compares `moe logits` through
#      them (f32 wire) with the single-process CPU engine (f32 within 1e-4);
#   3. the expert FFN benchmark (hidden 7168, width 2048, 1..4096 tokens over 8..256 experts,
#      TFLOP/s beside one 8192^3 cuBLAS bf16 GEMM measured in the same run).
# A decode step of the bench preset GPU vs CPU is not here: the router's attention has no GPU
# path yet, so only its experts could move, through a node (moe up --device cuda).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
export MOE_REQUIRE_NVRTC=1
time cargo build --release --locked -p moe --features cuda
cargo test --release --locked -p moe -p moe-model --features moe/cuda \
    --test cuda_kernels --test cuda_device -- --nocapture
cargo bench --locked -p moe-model --features cuda --bench cuda_ffn

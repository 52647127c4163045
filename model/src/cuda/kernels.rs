//! CUDA C kernels of the GPU expert FFN, compiled with NVRTC at start-up (and for sm_80 and
//! sm_90 by `tests/cuda_kernels.rs` in CI, which needs only `libnvrtc.so`, no GPU).
//!
//! bf16 is handled as raw `unsigned short` bits (round to nearest even, like `half`'s
//! `bf16::from_f32`) so the source needs no CUDA header: NVRTC compiles it with no include
//! path. FP8 e4m3fn is decoded exactly in float (the loader refuses NaN bytes).

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaFunction};
use cudarc::nvrtc::{CompileOptions, Ptx, compile_ptx_with_opts};

use crate::device::DeviceError;

/// Every kernel entry point in [`SOURCE`].
pub const ENTRIES: [&str; 7] = [
    "gather_f32",
    "gather_bf16",
    "fp8_dequant_bf16",
    "silu_mul_f32",
    "silu_mul_bf16",
    "combine",
    "f32_to_bf16",
];

/// The CUDA C source of every kernel.
pub const SOURCE: &str = r#"
__device__ __forceinline__ unsigned short f2bf(float f) {
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        return (unsigned short)((u >> 16) | 0x40u);
    }
    u += 0x7fffu + ((u >> 16) & 1u);
    return (unsigned short)(u >> 16);
}

// e4m3fn: 1 sign, 4 exponent (bias 7), 3 mantissa bits; exponent 0 is subnormal.
__device__ __forceinline__ float e4m3(unsigned char v) {
    int e = (v >> 3) & 0xf;
    int m = v & 7;
    float x = e == 0 ? ldexpf((float)m, -9) : ldexpf((float)(8 + m), e - 10);
    return (v & 0x80) ? -x : x;
}

// out[i, :] = x[rows[i], :] for i < n (rows of the tokens routed to each expert, grouped).
extern "C" __global__ void gather_f32(const float* x, const int* rows, int n, int hidden,
                                      float* out) {
    size_t total = (size_t)n * hidden;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total;
         i += (size_t)gridDim.x * blockDim.x) {
        size_t r = i / hidden, c = i % hidden;
        out[i] = x[(size_t)rows[r] * hidden + c];
    }
}

extern "C" __global__ void gather_bf16(const float* x, const int* rows, int n, int hidden,
                                       unsigned short* out) {
    size_t total = (size_t)n * hidden;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total;
         i += (size_t)gridDim.x * blockDim.x) {
        size_t r = i / hidden, c = i % hidden;
        out[i] = f2bf(x[(size_t)rows[r] * hidden + c]);
    }
}

// out[rows, cols] (bf16) = e4m3(v) * scale of its [block_r, block_c] block; scales are
// [ceil(rows / block_r), ceil(cols / block_c)] row-major.
extern "C" __global__ void fp8_dequant_bf16(const unsigned char* v, const float* scales,
                                            int rows, int cols, int block_r, int block_c,
                                            unsigned short* out) {
    size_t total = (size_t)rows * cols;
    int scale_cols = (cols + block_c - 1) / block_c;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total;
         i += (size_t)gridDim.x * blockDim.x) {
        int r = (int)(i / cols), c = (int)(i % cols);
        float s = scales[(size_t)(r / block_r) * scale_cols + c / block_c];
        out[i] = f2bf(e4m3(v[i]) * s);
    }
}

// h[r, j] = silu(gu[r, j]) * gu[r, inter + j] for r < n, j < inter.
__device__ __forceinline__ float silu_mul(const float* gu, size_t i, int inter) {
    size_t r = i / inter, j = i % inter;
    float g = gu[r * 2 * inter + j];
    float u = gu[r * 2 * inter + inter + j];
    return g / (1.0f + expf(-g)) * u;
}

extern "C" __global__ void silu_mul_f32(const float* gu, int n, int inter, float* h) {
    size_t total = (size_t)n * inter;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total;
         i += (size_t)gridDim.x * blockDim.x) {
        h[i] = silu_mul(gu, i, inter);
    }
}

extern "C" __global__ void silu_mul_bf16(const float* gu, int n, int inter, unsigned short* h) {
    size_t total = (size_t)n * inter;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total;
         i += (size_t)gridDim.x * blockDim.x) {
        h[i] = f2bf(silu_mul(gu, i, inter));
    }
}

// The weighted scatter-add, as a gather per token so it is deterministic: token t (block x)
// sums w[e] * y[entry_row[e], c] over its entries e in order (the CPU's order; separate
// multiply and add, no FMA contraction, as the CPU rounds). Grid: (tokens, ceil(hidden / block)).
extern "C" __global__ void combine(const float* y, const int* offsets, const int* entry_row,
                                   const float* weights, int tokens, int hidden, float* out) {
    int t = blockIdx.x;
    int c = blockIdx.y * blockDim.x + threadIdx.x;
    if (t >= tokens || c >= hidden) {
        return;
    }
    float acc = 0.0f;
    for (int e = offsets[t]; e < offsets[t + 1]; ++e) {
        acc = __fadd_rn(acc, __fmul_rn(weights[e], y[(size_t)entry_row[e] * hidden + c]));
    }
    out[(size_t)t * hidden + c] = acc;
}

// out[i] = bf16(x[i]) (benchmark inputs).
extern "C" __global__ void f32_to_bf16(const float* x, int n, unsigned short* out) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < (size_t)n;
         i += (size_t)gridDim.x * blockDim.x) {
        out[i] = f2bf(x[i]);
    }
}
"#;

/// Compiles [`SOURCE`] to PTX; `arch` like `"compute_80"` (`None`: NVRTC's default).
pub fn compile(arch: Option<&'static str>) -> Result<Ptx, DeviceError> {
    let opts = CompileOptions {
        arch,
        name: Some("moe_expert_kernels.cu".into()),
        ..Default::default()
    };
    compile_ptx_with_opts(SOURCE, opts).map_err(|e| DeviceError::Cuda(format!("NVRTC: {e:?}")))
}

/// The kernels loaded into a context.
#[derive(Debug, Clone)]
pub struct Kernels {
    pub gather_f32: CudaFunction,
    pub gather_bf16: CudaFunction,
    pub fp8_dequant_bf16: CudaFunction,
    pub silu_mul_f32: CudaFunction,
    pub silu_mul_bf16: CudaFunction,
    pub combine: CudaFunction,
    pub f32_to_bf16: CudaFunction,
}

impl Kernels {
    /// Compiles the kernels for `ctx`'s device and loads them.
    pub fn load(ctx: &Arc<CudaContext>) -> Result<Kernels, DeviceError> {
        let (major, minor) = ctx.compute_capability().map_err(super::cuda_err)?;
        // NVRTC wants a 'static arch string; the devices this targets are few.
        let arch: &'static str = match (major, minor) {
            (8, 0) => "compute_80",
            (8, 6) => "compute_86",
            (8, 9) => "compute_89",
            (9, 0) => "compute_90",
            (m, _) if m >= 10 => "compute_90",
            (m, n) => {
                return Err(DeviceError::Unsupported(format!(
                    "compute capability {m}.{n}: bf16 GEMMs need 8.0 or newer"
                )));
            }
        };
        let module = ctx
            .load_module(compile(Some(arch))?)
            .map_err(super::cuda_err)?;
        let f = |name: &str| module.load_function(name).map_err(super::cuda_err);
        Ok(Kernels {
            gather_f32: f("gather_f32")?,
            gather_bf16: f("gather_bf16")?,
            fp8_dequant_bf16: f("fp8_dequant_bf16")?,
            silu_mul_f32: f("silu_mul_f32")?,
            silu_mul_bf16: f("silu_mul_bf16")?,
            combine: f("combine")?,
            f32_to_bf16: f("f32_to_bf16")?,
        })
    }
}

//! One CUDA device as the expert FFN uses it: context, stream, cuBLAS handle, the NVRTC-compiled
//! kernels, kernel launches and the one GEMM shape (row-major `y = x wᵀ` through cuBLAS's
//! column-major `gemm_ex`), and the grow-only dispatch buffers reused across requests.

use std::ffi::c_void;
use std::sync::{Arc, Mutex};

use cudarc::cublas::CudaBlas;
use cudarc::cublas::result::gemm_ex;
use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, DeviceRepr, LaunchConfig,
    PushKernelArg, ValidAsZeroBits,
};

use super::cuda_err;
use super::kernels::Kernels;
use crate::device::DeviceError;

/// One device: its context, stream, cuBLAS handle, kernels and the dispatch buffers.
pub struct Engine {
    pub(super) ctx: Arc<CudaContext>,
    pub(super) stream: Arc<CudaStream>,
    pub(super) blas: CudaBlas,
    pub(super) k: Kernels,
    pub(super) name: String,
    pub(super) scratch: Mutex<Scratch>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Engine({} on cuda:{})", self.name, self.ctx.ordinal())
    }
}

impl Engine {
    /// Opens device `index` (checked first: no panic without a driver), compiles the kernels.
    pub fn new(index: usize) -> Result<Engine, DeviceError> {
        let ctx = super::probe(index)?;
        let stream = ctx.new_stream().map_err(cuda_err)?;
        let blas = CudaBlas::new(stream.clone()).map_err(cuda_err)?;
        let k = Kernels::load(&ctx)?;
        let name = ctx.name().map_err(cuda_err)?;
        tracing::info!(device = index, %name, "CUDA device ready");
        Ok(Engine {
            ctx,
            stream,
            blas,
            k,
            name,
            scratch: Mutex::new(Scratch::default()),
        })
    }

    /// Seconds per `[n, n] · [n, n]ᵀ` bf16 GEMM (f32 accumulate) on this device, the median of
    /// `iters` after a warm-up: the practical peak the expert benchmark is compared with.
    pub fn time_bf16_gemm(&self, n: usize, iters: usize) -> Result<f64, DeviceError> {
        let s = &self.stream;
        let a = s.alloc_zeros::<u16>(n * n).map_err(cuda_err)?;
        let c = s.alloc_zeros::<f32>(n * n).map_err(cuda_err)?;
        let (pa, pc) = (ptr(&a, s), ptr(&c, s));
        let bf = cudaDataType::CUDA_R_16BF;
        self.gemm(bf, pa, pa, pc, n, n, n, n)?;
        s.synchronize().map_err(cuda_err)?;
        let mut times = Vec::with_capacity(iters);
        for _ in 0..iters.max(1) {
            let t0 = std::time::Instant::now();
            self.gemm(bf, pa, pa, pc, n, n, n, n)?;
            s.synchronize().map_err(cuda_err)?;
            times.push(t0.elapsed().as_secs_f64());
        }
        times.sort_by(f64::total_cmp);
        Ok(times[times.len() / 2])
    }

    /// `cuda:N/<device name>`, for the node's Info answer.
    pub fn describe(&self) -> String {
        format!("cuda:{}/{}", self.ctx.ordinal(), self.name)
    }

    /// The device's stream (benchmarks time on it).
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Launches a grid-stride kernel over `total` elements with `args` (device pointers as
    /// `u64`, sizes as `i32`).
    pub(super) fn launch(
        &self,
        f: &CudaFunction,
        total: usize,
        args: &[Arg],
    ) -> Result<(), DeviceError> {
        let blocks = total.div_ceil(256).clamp(1, 1 << 20) as u32;
        self.launch_cfg(f, (blocks, 1), args)
    }

    pub(super) fn launch_cfg(
        &self,
        f: &CudaFunction,
        grid: (u32, u32),
        args: &[Arg],
    ) -> Result<(), DeviceError> {
        let cfg = LaunchConfig {
            grid_dim: (grid.0, grid.1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = self.stream.launch_builder(f);
        for a in args {
            match a {
                Arg::Ptr(p) => b.arg(p),
                Arg::Int(i) => b.arg(i),
            };
        }
        // SAFETY: every kernel in `kernels::SOURCE` takes exactly these argument types in this
        // order (the callers below pass them so), and every pointer is a live device buffer of
        // this context at least as large as the kernel's indexing reaches (sized by `grow`).
        unsafe { b.launch(cfg) }.map(|_| ()).map_err(cuda_err)
    }

    /// `y[n, out]` (row-major f32, row stride `ldc`) = `x[n, k] · w[out, k]ᵀ`, both inputs of
    /// `dtype` (bf16 or f32), accumulated in f32.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn gemm(
        &self,
        dtype: cudaDataType,
        w: u64,
        x: u64,
        y: u64,
        n: usize,
        out: usize,
        k: usize,
        ldc: usize,
    ) -> Result<(), DeviceError> {
        let (alpha, beta) = (1.0f32, 0.0f32);
        let i = |v: usize| {
            i32::try_from(v).map_err(|_| DeviceError::Unsupported(format!("GEMM size {v}")))
        };
        // Row-major y = x wᵀ is column-major yᵀ[out, n] = (w as [k, out])ᵀ · (x as [k, n]).
        // SAFETY: w holds out×k, x n×k and y n rows of ldc ≥ out elements (see the callers);
        // the handle is bound to `self.stream`, which orders this after the kernels before it.
        unsafe {
            gemm_ex(
                *self.blas.handle(),
                cublasOperation_t::CUBLAS_OP_T,
                cublasOperation_t::CUBLAS_OP_N,
                i(out)?,
                i(n)?,
                i(k)?,
                (&alpha as *const f32).cast::<c_void>(),
                w as *const c_void,
                dtype,
                i(k)?,
                x as *const c_void,
                dtype,
                i(k)?,
                (&beta as *const f32).cast::<c_void>(),
                y as *mut c_void,
                cudaDataType::CUDA_R_32F,
                i(ldc)?,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublasGemmAlgo_t::CUBLAS_GEMM_DFALT,
            )
        }
        .map_err(cuda_err)
    }
}

/// A kernel argument.
pub(super) enum Arg {
    Ptr(u64),
    Int(i32),
}

pub(super) fn int(v: usize) -> Result<Arg, DeviceError> {
    i32::try_from(v)
        .map(Arg::Int)
        .map_err(|_| DeviceError::Unsupported(format!("size {v} does not fit a kernel's int")))
}

/// Grow-only device buffers of the dispatch path.
#[derive(Default)]
pub(super) struct Scratch {
    pub(super) x: Option<CudaSlice<f32>>,
    pub(super) ints: Option<CudaSlice<i32>>,
    pub(super) weights: Option<CudaSlice<f32>>,
    pub(super) xg32: Option<CudaSlice<f32>>,
    pub(super) xg16: Option<CudaSlice<u16>>,
    pub(super) gu: Option<CudaSlice<f32>>,
    pub(super) h32: Option<CudaSlice<f32>>,
    pub(super) h16: Option<CudaSlice<u16>>,
    pub(super) y: Option<CudaSlice<f32>>,
    pub(super) out: Option<CudaSlice<f32>>,
    pub(super) dequant: Option<CudaSlice<u16>>,
}

/// The buffer in `slot`, reallocated when shorter than `len`.
pub(super) fn grow<'a, T: DeviceRepr + ValidAsZeroBits>(
    stream: &Arc<CudaStream>,
    slot: &'a mut Option<CudaSlice<T>>,
    len: usize,
) -> Result<&'a mut CudaSlice<T>, DeviceError> {
    if slot.as_ref().is_none_or(|s| s.len() < len) {
        *slot = None; // free first: the old buffer's memory may be needed for the new one
        *slot = Some(stream.alloc_zeros::<T>(len.max(1)).map_err(cuda_err)?);
    }
    slot.as_mut()
        .ok_or_else(|| DeviceError::Cuda("buffer allocation".into()))
}

/// A buffer's device address (every use is on the engine's one stream, so ordering holds).
pub(super) fn ptr<T>(s: &CudaSlice<T>, stream: &CudaStream) -> u64 {
    s.device_ptr(stream).0
}

//! The GPU expert FFN (feature `cuda`, through cudarc with dynamic loading: nothing CUDA is
//! needed to build, only to run).
//!
//! - [`probe`]: checks that the driver, cuBLAS and NVRTC libraries load and that the device
//!   exists before anything touches them (cudarc panics on a missing library), then opens the
//!   device's primary context.
//! - [`kernels`]: the CUDA C sources (SiLU×up, FP8 dequantisation, gather, weighted combine),
//!   compiled with NVRTC at start-up.
//! - [`engine`]: one device (stream, cuBLAS, kernels, reused buffers).
//! - [`experts`]: routed experts resident in device memory and the compute of one dispatch.
//!
//! Status: compiled and NVRTC-checked in CI, not yet run on a GPU (see docs/ARCHITECTURE.md).
#![allow(unsafe_code)]

pub mod engine;
pub mod experts;
pub mod kernels;

use std::sync::Arc;

use cudarc::driver::CudaContext;

use crate::device::DeviceError;

pub use experts::CudaExperts;

/// Errors of cudarc calls, as [`DeviceError::Cuda`].
pub(crate) fn cuda_err(e: impl std::fmt::Debug) -> DeviceError {
    DeviceError::Cuda(format!("{e:?}"))
}

/// Checks the CUDA libraries and the device index, then opens device `index`.
pub fn probe(index: usize) -> Result<Arc<CudaContext>, DeviceError> {
    // SAFETY: each call only tries to dlopen the library by its usual names; nothing from it is
    // called.
    let (driver, cublas, nvrtc) = unsafe {
        (
            cudarc::driver::sys::is_culib_present(),
            cudarc::cublas::sys::is_culib_present(),
            cudarc::nvrtc::sys::is_culib_present(),
        )
    };
    if !driver {
        return Err(DeviceError::MissingLibrary {
            what: "the CUDA driver (libcuda.so)",
        });
    }
    if !cublas {
        return Err(DeviceError::MissingLibrary {
            what: "cuBLAS (libcublas.so.12)",
        });
    }
    if !nvrtc {
        return Err(DeviceError::MissingLibrary {
            what: "NVRTC (libnvrtc.so.12)",
        });
    }
    let count = CudaContext::device_count().map_err(cuda_err)?;
    let count = usize::try_from(count).unwrap_or(0);
    if index >= count {
        return Err(DeviceError::NoSuchDevice { index, count });
    }
    CudaContext::new(index).map_err(cuda_err)
}

/// Whether a CUDA device can be used here (tests that need one skip otherwise).
pub fn available() -> bool {
    probe(0).is_ok()
}

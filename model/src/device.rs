//! Where expert FFNs run: `--device cpu|cuda[:N]` (`cpu` is the default).
//!
//! [`Device::check`] says whether the device can be used in this build on this machine, with an
//! error naming what is missing: CUDA support in the build (cargo feature `cuda`), the driver
//! library (`libcuda.so`), or the device index. It never panics: cudarc's dynamic loading
//! panics when a library it needs is absent, so [`crate::cuda`] looks for each library first.

use std::fmt;
use std::str::FromStr;

/// A compute device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Device {
    /// The CPU kernels (AVX-512 or portable).
    #[default]
    Cpu,
    /// NVIDIA GPU number N (`cuda` means `cuda:0`).
    Cuda(usize),
}

impl Device {
    /// Whether this is a CUDA device.
    pub fn is_cuda(&self) -> bool {
        matches!(self, Device::Cuda(_))
    }

    /// Checks that the device can be used here: always for the CPU; for CUDA, that the build
    /// has the `cuda` feature, the driver and cuBLAS/NVRTC libraries load and the index exists.
    pub fn check(&self) -> Result<(), DeviceError> {
        match *self {
            Device::Cpu => Ok(()),
            Device::Cuda(index) => check_cuda(index),
        }
    }
}

#[cfg(feature = "cuda")]
fn check_cuda(index: usize) -> Result<(), DeviceError> {
    crate::cuda::probe(index).map(|_| ())
}

#[cfg(not(feature = "cuda"))]
fn check_cuda(_index: usize) -> Result<(), DeviceError> {
    Err(DeviceError::NotBuilt)
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

impl FromStr for Device {
    type Err = DeviceError;

    fn from_str(s: &str) -> Result<Device, DeviceError> {
        let bad = || DeviceError::Parse(s.to_string());
        match s.trim() {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            t => {
                let n = t.strip_prefix("cuda:").ok_or_else(bad)?;
                n.parse::<usize>().map(Device::Cuda).map_err(|_| bad())
            }
        }
    }
}

/// Why a device cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceError {
    /// Not `cpu`, `cuda` or `cuda:N`.
    #[error("unknown device `{0}`: expected cpu, cuda or cuda:N")]
    Parse(String),
    /// The build has no `cuda` feature.
    #[error("this build has no CUDA support; rebuild with --features cuda")]
    NotBuilt,
    /// A CUDA library could not be loaded (`what` names it: the driver, cuBLAS, NVRTC).
    #[error(
        "CUDA is not available: {what} could not be loaded (an NVIDIA driver and the CUDA 12 libraries are needed; check LD_LIBRARY_PATH)"
    )]
    MissingLibrary { what: &'static str },
    /// The device index is not below the number of visible devices.
    #[error("CUDA device {index} does not exist: {count} device(s) visible")]
    NoSuchDevice { index: usize, count: usize },
    /// A CUDA call failed (context creation, allocation, a kernel, cuBLAS).
    #[error("CUDA error: {0}")]
    Cuda(String),
    /// The model or weights are not supported on the GPU path yet.
    #[error("not supported on CUDA: {0}")]
    Unsupported(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_devices() {
        assert_eq!("cpu".parse::<Device>(), Ok(Device::Cpu));
        assert_eq!("cuda".parse::<Device>(), Ok(Device::Cuda(0)));
        assert_eq!("cuda:3".parse::<Device>(), Ok(Device::Cuda(3)));
        assert_eq!(Device::Cuda(3).to_string(), "cuda:3");
        for bad in ["tpu", "cuda:", "cuda:-1", "cuda:x", "CUDA", ""] {
            let e = bad.parse::<Device>().expect_err(bad);
            assert!(
                e.to_string().contains("expected cpu, cuda or cuda:N"),
                "{e}"
            );
        }
    }

    #[test]
    fn cpu_is_always_available() {
        assert_eq!(Device::default(), Device::Cpu);
        assert!(Device::Cpu.check().is_ok());
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_the_feature_says_so() {
        let e = Device::Cuda(0).check().expect_err("no cuda feature");
        assert_eq!(e, DeviceError::NotBuilt);
        assert!(e.to_string().contains("--features cuda"), "{e}");
    }
}

//! CUDA probe stand-in for builds without the `cuda` feature: always reports "not-compiled".

use super::{CudaReport, CudaStatus};

pub fn probe() -> CudaReport {
    CudaReport {
        status: CudaStatus::NotCompiled,
        reason: Some("built without the `cuda` feature".to_owned()),
        driver_version: None,
        devices: Vec::new(),
    }
}

//! Stand-in for builds without the `cuda` feature: an uninhabited `CudaBackend`, so the `Cuda` variant
//! of [`super::Backend`] exists without cfg noise at its uses and can never be constructed, and a
//! [`device_count`] of 0.

use super::backend::TensorBackend;
use super::dtype::{HostTensor, RawTensor};
use super::op::{MetaRef, Planned};
use super::tensor::{BackendKind, Determinism, GpuError, Result, TensorId};

/// No CUDA devices in a build without the `cuda` feature.
pub fn device_count() -> usize {
    0
}

/// Cannot be constructed: [`CudaBackend::new`] always fails in this build.
#[derive(Debug)]
pub enum CudaBackend {}

impl CudaBackend {
    pub fn new(determinism: Determinism) -> Result<Self> {
        Self::new_on(0, determinism)
    }

    pub fn new_on(_ordinal: usize, _determinism: Determinism) -> Result<Self> {
        Err(GpuError::Device("unavailable: built without the `cuda` feature".to_owned()))
    }

    pub fn ordinal(&self) -> usize {
        match *self {}
    }
}

impl TensorBackend for CudaBackend {
    fn kind(&self) -> BackendKind {
        match *self {}
    }
    fn describe(&self) -> String {
        match *self {}
    }
    fn determinism(&self) -> Determinism {
        match *self {}
    }
    fn upload(&mut self, _t: &HostTensor) -> Result<TensorId> {
        match *self {}
    }
    fn upload_raw(&mut self, _t: &RawTensor) -> Result<TensorId> {
        match *self {}
    }
    fn read(&mut self, _id: TensorId) -> Result<HostTensor> {
        match *self {}
    }
    fn read_raw(&mut self, _id: TensorId) -> Result<RawTensor> {
        match *self {}
    }
    fn free(&mut self, _id: TensorId) -> Result<()> {
        match *self {}
    }
    fn meta(&self, _id: TensorId) -> Result<MetaRef<'_>> {
        match *self {}
    }
    fn execute(&mut self, _op: Planned<'_>) -> Result<TensorId> {
        match *self {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disabled_build_reports_unavailable() {
        assert_eq!(device_count(), 0);
        let e = CudaBackend::new_on(1, Determinism::Fast).unwrap_err();
        assert_eq!(e.to_string(), "device error: unavailable: built without the `cuda` feature");
    }
}

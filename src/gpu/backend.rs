//! The backend contract and the closed set of backends: [`TensorBackend`] (storage, metas, the
//! execution of planned ops, batches), [`Backend`] (CPU, wgpu, CUDA; it derefs to the contract, so
//! there is no forwarding layer) and [`select`] (the first backend of an order that starts).
//!
//! Ops are not methods of the contract: callers go through [`super::TensorOps::run`], which plans
//! the op ([`super::Op::plan`]) and hands the backend a [`Planned`] op to execute.

use std::fmt;
use std::ops::{Deref, DerefMut};

use super::dtype::{DType, RawTensor};
use super::op::{Meta, Planned};
use super::tensor::{BackendKind, Determinism, GpuError, HostTensor, Result, TensorId};
use super::{cpu, cuda, wgpu};

/// What every backend implements: device-resident tensors by id, and the execution of ops that
/// [`super::TensorOps::run_with`] planned.
pub trait TensorBackend {
    fn kind(&self) -> BackendKind;
    /// For logs, metrics and attestations, such as "wgpu (llvmpipe, vulkan)".
    fn describe(&self) -> String;
    fn determinism(&self) -> Determinism;
    /// Uploads an f32 tensor (checked by [`HostTensor::check`]).
    fn upload(&mut self, t: &HostTensor) -> Result<TensorId>;
    /// Uploads storage bytes of any dtype (checked as by [`RawTensor::new`]).
    fn upload_raw(&mut self, t: &RawTensor) -> Result<TensorId>;
    /// Every element as an f32 value (dequantizing).
    fn read(&mut self, id: TensorId) -> Result<HostTensor>;
    /// The storage bytes of a tensor, in its own dtype.
    fn read_raw(&mut self, id: TensorId) -> Result<RawTensor>;
    fn free(&mut self, id: TensorId) -> Result<()>;
    /// The shape and dtype of a tensor.
    fn meta(&self, id: TensorId) -> Result<Meta>;
    fn shape(&self, id: TensorId) -> Result<Vec<usize>> {
        self.meta(id).map(|m| m.shape)
    }
    fn dtype(&self, id: TensorId) -> Result<DType> {
        self.meta(id).map(|m| m.dtype)
    }
    /// Executes an op planned against its operands' current metas, making a tensor of
    /// `plan.out` (for `Append`: growing the cache, whose id it returns). Operands are validated:
    /// only checks that need device values remain (`Gather`'s ids, device limits).
    fn execute(&mut self, op: Planned<'_>) -> Result<TensorId>;
    /// Starts a batch: ops until [`TensorBackend::end_batch`] may be recorded and submitted to the
    /// device together (one submission, no synchronization in between). Errors are still reported
    /// by each op; a `read` inside a batch flushes it first.
    fn begin_batch(&mut self) {}
    /// Submits everything recorded since `begin_batch`.
    fn end_batch(&mut self) -> Result<()> {
        Ok(())
    }
    /// Bytes of device memory held by live tensors (for placement across devices).
    fn live_bytes(&self) -> u64 {
        0
    }
    /// The error of an op this backend does not implement.
    fn unsupported(&self, op: &'static str) -> GpuError {
        GpuError::Unsupported { op, backend: self.describe() }
    }
}

/// The closed set of backends. The `Cuda` variant is uninhabited in builds without the `cuda`
/// feature. Derefs to [`TensorBackend`]; the ops come with [`super::TensorOps`].
pub enum Backend {
    Cpu(cpu::CpuBackend),
    /// Boxed: the device state is much larger than the other variants.
    Wgpu(Box<wgpu::WgpuBackend>),
    Cuda(cuda::CudaBackend),
}

impl fmt::Debug for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Backend({})", self.describe())
    }
}

impl Backend {
    /// Creates one backend of the given kind.
    pub fn new(kind: BackendKind, determinism: Determinism) -> Result<Self> {
        Ok(match kind {
            BackendKind::Cpu => Backend::Cpu(cpu::CpuBackend::new(determinism)),
            BackendKind::Wgpu => Backend::Wgpu(Box::new(wgpu::WgpuBackend::new(determinism)?)),
            BackendKind::Cuda => Backend::Cuda(cuda::CudaBackend::new(determinism)?),
        })
    }
}

impl Deref for Backend {
    type Target = dyn TensorBackend;

    fn deref(&self) -> &Self::Target {
        match self {
            Backend::Cpu(b) => b,
            Backend::Wgpu(b) => &**b,
            Backend::Cuda(b) => b,
        }
    }
}

impl DerefMut for Backend {
    fn deref_mut(&mut self) -> &mut Self::Target {
        match self {
            Backend::Cpu(b) => b,
            Backend::Wgpu(b) => &mut **b,
            Backend::Cuda(b) => b,
        }
    }
}

/// Walks `order` and returns the first backend that starts, with one line per skipped candidate
/// ("cuda: unavailable: no CUDA driver"). Each skip is also logged; the caller should surface the
/// chosen backend's [`Backend::describe`] so there is never a silent fallback.
pub fn select(order: &[BackendKind], determinism: Determinism) -> Result<(Backend, Vec<String>)> {
    let mut skipped = Vec::new();
    for &kind in order {
        match Backend::new(kind, determinism) {
            Ok(backend) => {
                tracing::info!(backend = %backend.describe(), ?determinism, skipped = ?skipped, "tensor backend selected");
                return Ok((backend, skipped));
            }
            Err(e) => {
                tracing::info!(backend = %kind, error = %e, "tensor backend skipped");
                skipped.push(format!("{kind}: {e}"));
            }
        }
    }
    Err(GpuError::Device(format!(
        "no tensor backend available ({})",
        if skipped.is_empty() { "empty order".to_owned() } else { skipped.join("; ") }
    )))
}

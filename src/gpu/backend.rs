//! The backend contract, the one checked dispatch and the closed set of backends:
//! [`TensorBackend`] (storage, metas, the execution of planned ops, batches), [`TensorOps`]
//! (`run`: plan the op with [`Op::plan`], then execute it; and the ops spelled as methods),
//! [`Backend`] (CPU, wgpu, CUDA; it derefs to the contract, so there is no forwarding layer) and
//! [`select`] (the first backend of an order that starts).

use std::fmt;
use std::ops::{Deref, DerefMut};

use super::dtype::HostTensor;
use super::dtype::{DType, RawTensor};
use super::op::{BinaryOp, MAX_OPERANDS, MetaRef, Op, Plan, Planned, ReduceOp, RopeMode, UnaryOp};
use super::shape::shape_err;
use super::tensor::{BackendKind, Determinism, GpuError, Result, TensorId};
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
    fn meta(&self, id: TensorId) -> Result<MetaRef<'_>>;
    fn shape(&self, id: TensorId) -> Result<Vec<usize>> {
        self.meta(id).map(|m| m.shape.to_vec())
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

/// The checked dispatch, and the ops spelled as methods for Rust callers (each builds an [`Op`] and
/// calls [`TensorOps::run`]). Implemented for every [`TensorBackend`], including `dyn` ones, so
/// `Backend` gets it through `Deref`.
pub trait TensorOps: TensorBackend {
    /// Plans `op` on `inputs` (their metas as the backend holds them), then executes it.
    fn run(&mut self, op: &Op, inputs: &[TensorId]) -> Result<TensorId> {
        self.run_with(op, inputs, |_| Ok::<(), GpuError>(())).map(|(id, _)| id)
    }

    /// [`TensorOps::run`], with `admit` deciding on the plan before anything runs (a quota, a
    /// price): its error stops the op. Returns the output and the plan.
    fn run_with<E: From<GpuError>>(
        &mut self,
        op: &Op,
        inputs: &[TensorId],
        admit: impl FnOnce(&Plan) -> std::result::Result<(), E>,
    ) -> std::result::Result<(TensorId, Plan), E> {
        if inputs.len() != op.arity() {
            return Err(shape_err(op.name(), format!("takes {} operands, got {}", op.arity(), inputs.len())).into());
        }
        let plan = {
            // Borrowed from the backend's own table: planning copies no operand shape.
            let mut metas = [MetaRef { shape: &[], dtype: DType::F32 }; MAX_OPERANDS];
            for (slot, &id) in metas.iter_mut().zip(inputs) {
                *slot = self.meta(id)?;
            }
            op.plan(&metas[..inputs.len()])?
        };
        admit(&plan)?;
        let out = self.execute(Planned { plan: &plan, inputs })?;
        Ok((out, plan))
    }

    fn matmul(&mut self, a: TensorId, b: TensorId, transpose_a: bool, transpose_b: bool) -> Result<TensorId> {
        self.run(&Op::Matmul { transpose_a, transpose_b }, &[a, b])
    }
    fn binary(&mut self, op: BinaryOp, a: TensorId, b: TensorId) -> Result<TensorId> {
        self.run(&Op::Binary(op), &[a, b])
    }
    fn add(&mut self, a: TensorId, b: TensorId) -> Result<TensorId> {
        self.binary(BinaryOp::Add, a, b)
    }
    fn sub(&mut self, a: TensorId, b: TensorId) -> Result<TensorId> {
        self.binary(BinaryOp::Sub, a, b)
    }
    fn mul(&mut self, a: TensorId, b: TensorId) -> Result<TensorId> {
        self.binary(BinaryOp::Mul, a, b)
    }
    fn div(&mut self, a: TensorId, b: TensorId) -> Result<TensorId> {
        self.binary(BinaryOp::Div, a, b)
    }
    fn unary(&mut self, op: UnaryOp, x: TensorId) -> Result<TensorId> {
        self.run(&Op::Unary(op), &[x])
    }
    fn scale(&mut self, x: TensorId, factor: f32) -> Result<TensorId> {
        self.unary(UnaryOp::Scale(factor), x)
    }
    fn relu(&mut self, x: TensorId) -> Result<TensorId> {
        self.unary(UnaryOp::Relu, x)
    }
    fn gelu(&mut self, x: TensorId) -> Result<TensorId> {
        self.unary(UnaryOp::Gelu, x)
    }
    fn silu(&mut self, x: TensorId) -> Result<TensorId> {
        self.unary(UnaryOp::Silu, x)
    }
    fn tanh(&mut self, x: TensorId) -> Result<TensorId> {
        self.unary(UnaryOp::Tanh, x)
    }
    fn exp(&mut self, x: TensorId) -> Result<TensorId> {
        self.unary(UnaryOp::Exp, x)
    }
    fn softmax_last(&mut self, x: TensorId) -> Result<TensorId> {
        self.run(&Op::Softmax, &[x])
    }
    fn rmsnorm(&mut self, x: TensorId, weight: TensorId, eps: f32) -> Result<TensorId> {
        self.run(&Op::Rmsnorm { eps }, &[x, weight])
    }
    fn layernorm(&mut self, x: TensorId, weight: TensorId, bias: TensorId, eps: f32) -> Result<TensorId> {
        self.run(&Op::Layernorm { eps }, &[x, weight, bias])
    }
    fn reduce_last(&mut self, op: ReduceOp, x: TensorId) -> Result<TensorId> {
        self.run(&Op::Reduce(op), &[x])
    }
    fn sum_last(&mut self, x: TensorId) -> Result<TensorId> {
        self.reduce_last(ReduceOp::Sum, x)
    }
    fn mean_last(&mut self, x: TensorId) -> Result<TensorId> {
        self.reduce_last(ReduceOp::Mean, x)
    }
    fn max_last(&mut self, x: TensorId) -> Result<TensorId> {
        self.reduce_last(ReduceOp::Max, x)
    }
    fn argmax_last(&mut self, x: TensorId) -> Result<TensorId> {
        self.reduce_last(ReduceOp::Argmax, x)
    }
    fn cast(&mut self, x: TensorId, to: DType) -> Result<TensorId> {
        self.run(&Op::Cast(to), &[x])
    }
    fn reshape(&mut self, x: TensorId, shape: &[usize]) -> Result<TensorId> {
        self.run(&Op::Reshape(shape.to_vec()), &[x])
    }
    fn permute(&mut self, x: TensorId, axes: &[usize]) -> Result<TensorId> {
        self.run(&Op::Permute(axes.to_vec()), &[x])
    }
    fn slice(&mut self, x: TensorId, axis: usize, start: usize, len: usize) -> Result<TensorId> {
        self.run(&Op::Slice { axis, start, len }, &[x])
    }
    fn concat(&mut self, a: TensorId, b: TensorId, axis: usize) -> Result<TensorId> {
        self.run(&Op::Concat { axis }, &[a, b])
    }
    /// [`Op::Append`]: the cache keeps its id.
    fn append(&mut self, cache: TensorId, rows: TensorId) -> Result<()> {
        self.run(&Op::Append, &[cache, rows]).map(|_| ())
    }
    fn gather_rows(&mut self, table: TensorId, ids: TensorId) -> Result<TensorId> {
        self.run(&Op::Gather, &[table, ids])
    }
    fn rope(&mut self, x: TensorId, pos0: u32, theta: f32, mode: RopeMode) -> Result<TensorId> {
        self.run(&Op::Rope { pos0, theta, mode }, &[x])
    }
    fn attention(&mut self, q: TensorId, k: TensorId, v: TensorId, pos0: u32, scale: f32) -> Result<TensorId> {
        self.run(&Op::Attention { pos0, scale }, &[q, k, v])
    }
}

impl<T: TensorBackend + ?Sized> TensorOps for T {}

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
/// chosen backend's [`TensorBackend::describe`] so there is never a silent fallback.
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

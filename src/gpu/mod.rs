//! Tensor offload: device-resident tensors behind one closed [`Backend`] enum (CPU, wgpu, CUDA).
//!
//! A tensor is a [`TensorId`] handle to data that stays on the backend's device between calls; only
//! [`Backend::read`] copies it back to the host. Every op takes handles and returns a new handle.
//!
//! Architecture invariants:
//! * this module knows nothing of Wasm, actors or the network;
//! * misuse (bad shapes, unknown or freed handles, allocation failure) returns a [`GpuError`] and
//!   leaves the backend usable; nothing here panics on caller input;
//! * the CPU backend always exists: it is the reference the conformance suite checks the others against
//!   and the last entry of the default selection order, but it is never chosen silently: [`select`]
//!   returns why every earlier candidate was skipped and the chosen backend names itself.
//!
//! Tensors have a [`DType`] (f32, f16, i32, or the GGUF blocks Q8_0 / Q4_0 / Q4_1 for weights), up to
//! 4 axes, row-major contiguous. Arithmetic is f32: the other types enter through `cast`, `matmul`
//! (an f16 or quantized right operand, f32 accumulation), `gather_rows` (any table, i32 ids) and the
//! layout ops (reshape / permute / slice / concat / append work on any unquantized type). `read`
//! converts any dtype to f32 values; `read_raw` returns the storage bytes.
//!
//! Determinism: each kernel declares a [`KernelClass`] in [`kernels`]. In [`Determinism::Reproducible`]
//! mode every op gives bitwise-identical f32 results on the CPU, wgpu and CUDA backends, and so does a
//! whole model: matmul, reductions, softmax and norms sum in a fixed order (each output summed
//! sequentially in index order, `acc = acc + a * b` with no fused multiply-add), softmax uses a
//! portable `exp` ([`repro_exp`]), and the elementwise exp, tanh, silu and gelu are the portable
//! [`repro_exp_full`], [`repro_tanh`], [`repro_silu`] and [`repro_gelu`] (within 1.4, 2.0, 4.1 and
//! 3.9 ULP of f64; subnormal results flush to zero on every device). All are built from IEEE +, -, *
//! in one order that the WGSL and CUDA kernels mirror with the constants as bits (the WGSL guards the
//! spots where its compiler's algebraic rewrites would change a result). This assumes no FMA
//! contraction, IEEE-correct division and square root on the device where an op uses them (the norms
//! and softmax do, the portable elementwise functions do not; true for lavapipe and x86, while Vulkan
//! allows 2.5 ULP), and, outside those elementwise functions, inputs/intermediates that stay out of
//! the subnormal range (GPUs may flush subnormals to zero). Fast mode uses each device's own `exp` and
//! `tanh` and faster orders: results agree within a tolerance only.

pub mod cpu;
pub mod dtype;
pub mod kernels;
pub mod layout;
pub mod pool;
pub mod quant;
pub mod wgpu;

// `cfg` on the module definitions, not on their uses: both files expose the same `CudaBackend`.
#[cfg(feature = "cuda")]
pub mod cuda;
#[cfg(not(feature = "cuda"))]
#[path = "cuda_disabled.rs"]
pub mod cuda;

use std::fmt;

pub use dtype::{DType, QK, RawTensor};
pub use kernels::KernelClass;
pub use layout::{RopeMode, rope_table};

/// Errors from the tensor layer; each variant is a decision for the caller.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum GpuError {
    /// The caller's shapes do not fit the op: reject the request.
    #[error("shape mismatch in {op}: {details}")]
    ShapeMismatch { op: &'static str, details: String },
    /// The handle was never issued by this backend or was already freed: reject the request.
    #[error("unknown tensor {0}")]
    UnknownTensor(TensorId),
    /// An operand has a dtype the op does not take (or a quantized shape that is not block-aligned).
    #[error("dtype mismatch in {op}: {details}")]
    DType { op: &'static str, details: String },
    /// The device cannot hold the tensor: free something or retry smaller.
    #[error("out of memory: requested {requested} bytes, {available} available")]
    OutOfMemory { requested: u64, available: u64 },
    /// This backend does not implement the op (or is not usable at all): choose another backend.
    #[error("{op} is not supported on the {backend} backend")]
    Unsupported { op: &'static str, backend: String },
    /// The device failed: drain and re-create the backend.
    #[error("device error: {0}")]
    Device(String),
}

pub type Result<T, E = GpuError> = std::result::Result<T, E>;

/// A handle to a tensor resident on one backend. Ids are never reused by a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TensorId(pub u64);

impl fmt::Display for TensorId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// The most dimensions a tensor may have.
pub const MAX_RANK: usize = 4;

/// An f32 tensor in host memory: row-major, contiguous.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl HostTensor {
    /// Checks that the rank is 1..=4 and `data` holds exactly `shape.product()` values.
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Result<Self> {
        let t = Self { shape, data };
        t.check()?;
        Ok(t)
    }

    /// The checks of [`HostTensor::new`] on a tensor built by hand (its fields are public), without
    /// copying it: what every backend's `upload` runs first.
    pub fn check(&self) -> Result<()> {
        check_shape("upload", &self.shape)?;
        let n = numel(&self.shape);
        if n != self.data.len() {
            return Err(shape_err("upload", format!("shape {:?} needs {n} values, got {}", self.shape, self.data.len())));
        }
        Ok(())
    }

    pub fn numel(&self) -> usize {
        numel(&self.shape)
    }
}

/// Whether reductions must be bitwise reproducible across backends, chosen when a backend is created.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Determinism {
    /// Fixed reduction order, no FMA contraction, portable exp / tanh / silu / gelu: CPU, wgpu and
    /// CUDA agree bitwise.
    Reproducible,
    /// Whatever is fastest on the device (matrixmultiply on the CPU, tiled matmul on wgpu).
    Fast,
}

impl Determinism {
    pub fn as_str(self) -> &'static str {
        match self {
            Determinism::Reproducible => "reproducible",
            Determinism::Fast => "fast",
        }
    }

    /// `"reproducible"` or `"fast"`.
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "reproducible" => Some(Determinism::Reproducible),
            "fast" => Some(Determinism::Fast),
            _ => None,
        }
    }
}

/// Which backend implementation; the order of [`DEFAULT_ORDER`] is the documented selection order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BackendKind {
    Cuda,
    Wgpu,
    Cpu,
}

impl BackendKind {
    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::Cuda => "cuda",
            BackendKind::Wgpu => "wgpu",
            BackendKind::Cpu => "cpu",
        }
    }

    /// `"cuda"`, `"wgpu"` or `"cpu"`.
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "cuda" => Some(BackendKind::Cuda),
            "wgpu" => Some(BackendKind::Wgpu),
            "cpu" => Some(BackendKind::Cpu),
            _ => None,
        }
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The documented default selection order: CUDA, then wgpu, then the CPU.
pub const DEFAULT_ORDER: &[BackendKind] = &[BackendKind::Cuda, BackendKind::Wgpu, BackendKind::Cpu];

/// Elementwise ops on two tensors with numpy broadcasting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BinaryOp {
    Add,
    Sub,
    Mul,
    Div,
}

impl BinaryOp {
    pub fn name(self) -> &'static str {
        match self {
            BinaryOp::Add => "add",
            BinaryOp::Sub => "sub",
            BinaryOp::Mul => "mul",
            BinaryOp::Div => "div",
        }
    }
}

/// Elementwise ops on one tensor.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum UnaryOp {
    /// `x * factor`.
    Scale(f32),
    Relu,
    /// The tanh approximation: `0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))`.
    Gelu,
    /// `x / (1 + exp(-x))`.
    Silu,
    Tanh,
    Exp,
}

impl UnaryOp {
    pub fn name(self) -> &'static str {
        match self {
            UnaryOp::Scale(_) => "scale",
            UnaryOp::Relu => "relu",
            UnaryOp::Gelu => "gelu",
            UnaryOp::Silu => "silu",
            UnaryOp::Tanh => "tanh",
            UnaryOp::Exp => "exp",
        }
    }
}

/// Reductions over the last axis; the output drops that axis (a 1-D input gives shape `[1]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    Sum,
    Mean,
    Max,
    /// The first index of the maximum, as an i32 tensor; NaN compares as not greater.
    Argmax,
}

impl ReduceOp {
    pub fn name(self) -> &'static str {
        match self {
            ReduceOp::Sum => "sum_last",
            ReduceOp::Mean => "mean_last",
            ReduceOp::Max => "max_last",
            ReduceOp::Argmax => "argmax_last",
        }
    }
}

/// The operations every backend implements. Shapes are validated by the shared helpers in this module,
/// so every backend reports the same error for the same misuse.
pub trait TensorBackend {
    fn kind(&self) -> BackendKind;
    /// For logs, metrics and attestations, such as "wgpu (llvmpipe, vulkan)".
    fn describe(&self) -> String;
    fn determinism(&self) -> Determinism;
    fn upload(&mut self, t: &HostTensor) -> Result<TensorId>;
    fn read(&mut self, id: TensorId) -> Result<HostTensor>;
    fn free(&mut self, id: TensorId) -> Result<()>;
    fn shape(&self, id: TensorId) -> Result<Vec<usize>>;
    /// Batched `a @ b` over the last two axes with f32 accumulation.
    fn matmul(&mut self, a: TensorId, b: TensorId, transpose_a: bool, transpose_b: bool) -> Result<TensorId>;
    fn binary(&mut self, op: BinaryOp, a: TensorId, b: TensorId) -> Result<TensorId>;
    fn unary(&mut self, op: UnaryOp, x: TensorId) -> Result<TensorId>;
    fn softmax_last(&mut self, x: TensorId) -> Result<TensorId>;
    /// `x / sqrt(mean(x^2) + eps) * weight`, weight of shape `[last]`.
    fn rmsnorm(&mut self, x: TensorId, weight: TensorId, eps: f32) -> Result<TensorId>;
    /// `(x - mean) / sqrt(var + eps) * weight + bias` (biased variance), weight and bias of shape `[last]`.
    fn layernorm(&mut self, x: TensorId, weight: TensorId, bias: TensorId, eps: f32) -> Result<TensorId>;
    fn reduce_last(&mut self, op: ReduceOp, x: TensorId) -> Result<TensorId>;

    // ---- dtypes, layout, gather, rotary, attention ----
    //
    // The defaults refuse with `Unsupported`; every backend that claims an op overrides it and the
    // conformance suite checks it against the CPU backend. Dtype rules: see each method; an operand
    // of another dtype gets `GpuError::DType`.

    /// The element type of a tensor (f32 for backends that only hold f32).
    fn dtype(&self, id: TensorId) -> Result<DType> {
        self.shape(id).map(|_| DType::F32)
    }
    /// Uploads storage bytes of any dtype (checked by [`RawTensor::new`]).
    fn upload_raw(&mut self, t: &RawTensor) -> Result<TensorId> {
        if t.dtype != DType::F32 {
            return Err(self.unsupported("upload_raw"));
        }
        let data = t.bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        self.upload(&HostTensor::new(t.shape.clone(), data)?)
    }
    /// The storage bytes of a tensor, in its own dtype.
    fn read_raw(&mut self, id: TensorId) -> Result<RawTensor> {
        let t = self.read(id)?;
        RawTensor::from_f32(t.shape, &t.data)
    }
    /// A converted copy: f32 <-> f16 (round to nearest even), f32 -> i32 (toward zero, saturating,
    /// NaN to 0), i32 -> f32, any quantized type -> f32 (dequantize), f32 -> a quantized type
    /// (GGUF's reference quantizer), and the identity.
    fn cast(&mut self, _x: TensorId, _to: DType) -> Result<TensorId> {
        Err(self.unsupported("cast"))
    }
    /// The same data under another shape with the same element count (any dtype; quantized types
    /// keep a block-aligned last axis).
    fn reshape(&mut self, _x: TensorId, _shape: &[usize]) -> Result<TensorId> {
        Err(self.unsupported("reshape"))
    }
    /// A transposed copy: output axis `i` is input axis `axes[i]` (unquantized types).
    fn permute(&mut self, _x: TensorId, _axes: &[usize]) -> Result<TensorId> {
        Err(self.unsupported("permute"))
    }
    /// A copy of `[start, start + len)` along `axis` (unquantized types).
    fn slice(&mut self, _x: TensorId, _axis: usize, _start: usize, _len: usize) -> Result<TensorId> {
        Err(self.unsupported("slice"))
    }
    /// `a` then `b` along `axis`; same dtype (unquantized), equal other axes.
    fn concat(&mut self, _a: TensorId, _b: TensorId, _axis: usize) -> Result<TensorId> {
        Err(self.unsupported("concat"))
    }
    /// Appends `rows` to `cache` along axis 0, in place (the cache keeps its id; storage grows
    /// geometrically, so appending one row at a time costs amortized O(row)). Same dtype, unquantized.
    fn append(&mut self, _cache: TensorId, _rows: TensorId) -> Result<()> {
        Err(self.unsupported("append"))
    }
    /// Embedding lookup: `table [v, d]` (f32, f16 or quantized), `ids` i32 of any shape; the output
    /// is f32 of shape `ids.shape + [d]`. An id outside `0..v` is a `ShapeMismatch` error.
    fn gather_rows(&mut self, _table: TensorId, _ids: TensorId) -> Result<TensorId> {
        Err(self.unsupported("gather_rows"))
    }
    /// Rotary position embedding of f32 `x [.., seq, heads, head_dim]`: row `t` is at position
    /// `pos0 + t`, pair `i` rotates by `pos * theta^(-2i/head_dim)` using [`rope_table`].
    fn rope(&mut self, _x: TensorId, _pos0: u32, _theta: f32, _mode: RopeMode) -> Result<TensorId> {
        Err(self.unsupported("rope"))
    }
    /// Causal scaled-dot-product attention (see `layout::AttentionDims` for shapes): for query
    /// row `i` at position `pos0 + i`, `softmax(q . k_j * scale)` over keys `j <= pos0 + i` (and
    /// `j < tk`), times `v`. All f32. Softmax as in `softmax_last` (portable exp in reproducible mode).
    fn attention(&mut self, _q: TensorId, _k: TensorId, _v: TensorId, _pos0: u32, _scale: f32) -> Result<TensorId> {
        Err(self.unsupported("attention"))
    }
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

/// The closed set of backends. The `Cuda` variant is uninhabited in builds without the `cuda` feature.
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

    fn inner(&self) -> &dyn TensorBackend {
        match self {
            Backend::Cpu(b) => b,
            Backend::Wgpu(b) => &**b,
            Backend::Cuda(b) => b,
        }
    }

    fn inner_mut(&mut self) -> &mut dyn TensorBackend {
        match self {
            Backend::Cpu(b) => b,
            Backend::Wgpu(b) => &mut **b,
            Backend::Cuda(b) => b,
        }
    }

    pub fn kind(&self) -> BackendKind {
        self.inner().kind()
    }
    pub fn describe(&self) -> String {
        self.inner().describe()
    }
    pub fn determinism(&self) -> Determinism {
        self.inner().determinism()
    }
    pub fn upload(&mut self, t: &HostTensor) -> Result<TensorId> {
        self.inner_mut().upload(t)
    }
    pub fn read(&mut self, id: TensorId) -> Result<HostTensor> {
        self.inner_mut().read(id)
    }
    pub fn free(&mut self, id: TensorId) -> Result<()> {
        self.inner_mut().free(id)
    }
    pub fn shape(&self, id: TensorId) -> Result<Vec<usize>> {
        self.inner().shape(id)
    }
    pub fn matmul(&mut self, a: TensorId, b: TensorId, transpose_a: bool, transpose_b: bool) -> Result<TensorId> {
        self.inner_mut().matmul(a, b, transpose_a, transpose_b)
    }
    pub fn binary(&mut self, op: BinaryOp, a: TensorId, b: TensorId) -> Result<TensorId> {
        self.inner_mut().binary(op, a, b)
    }
    pub fn add(&mut self, a: TensorId, b: TensorId) -> Result<TensorId> {
        self.binary(BinaryOp::Add, a, b)
    }
    pub fn sub(&mut self, a: TensorId, b: TensorId) -> Result<TensorId> {
        self.binary(BinaryOp::Sub, a, b)
    }
    pub fn mul(&mut self, a: TensorId, b: TensorId) -> Result<TensorId> {
        self.binary(BinaryOp::Mul, a, b)
    }
    pub fn div(&mut self, a: TensorId, b: TensorId) -> Result<TensorId> {
        self.binary(BinaryOp::Div, a, b)
    }
    pub fn unary(&mut self, op: UnaryOp, x: TensorId) -> Result<TensorId> {
        self.inner_mut().unary(op, x)
    }
    pub fn scale(&mut self, x: TensorId, factor: f32) -> Result<TensorId> {
        self.unary(UnaryOp::Scale(factor), x)
    }
    pub fn relu(&mut self, x: TensorId) -> Result<TensorId> {
        self.unary(UnaryOp::Relu, x)
    }
    pub fn gelu(&mut self, x: TensorId) -> Result<TensorId> {
        self.unary(UnaryOp::Gelu, x)
    }
    pub fn silu(&mut self, x: TensorId) -> Result<TensorId> {
        self.unary(UnaryOp::Silu, x)
    }
    pub fn tanh(&mut self, x: TensorId) -> Result<TensorId> {
        self.unary(UnaryOp::Tanh, x)
    }
    pub fn exp(&mut self, x: TensorId) -> Result<TensorId> {
        self.unary(UnaryOp::Exp, x)
    }
    pub fn softmax_last(&mut self, x: TensorId) -> Result<TensorId> {
        self.inner_mut().softmax_last(x)
    }
    pub fn rmsnorm(&mut self, x: TensorId, weight: TensorId, eps: f32) -> Result<TensorId> {
        self.inner_mut().rmsnorm(x, weight, eps)
    }
    pub fn layernorm(&mut self, x: TensorId, weight: TensorId, bias: TensorId, eps: f32) -> Result<TensorId> {
        self.inner_mut().layernorm(x, weight, bias, eps)
    }
    pub fn reduce_last(&mut self, op: ReduceOp, x: TensorId) -> Result<TensorId> {
        self.inner_mut().reduce_last(op, x)
    }
    pub fn sum_last(&mut self, x: TensorId) -> Result<TensorId> {
        self.reduce_last(ReduceOp::Sum, x)
    }
    pub fn mean_last(&mut self, x: TensorId) -> Result<TensorId> {
        self.reduce_last(ReduceOp::Mean, x)
    }
    pub fn max_last(&mut self, x: TensorId) -> Result<TensorId> {
        self.reduce_last(ReduceOp::Max, x)
    }
    pub fn argmax_last(&mut self, x: TensorId) -> Result<TensorId> {
        self.reduce_last(ReduceOp::Argmax, x)
    }
    pub fn dtype(&self, id: TensorId) -> Result<DType> {
        self.inner().dtype(id)
    }
    pub fn upload_raw(&mut self, t: &RawTensor) -> Result<TensorId> {
        self.inner_mut().upload_raw(t)
    }
    pub fn read_raw(&mut self, id: TensorId) -> Result<RawTensor> {
        self.inner_mut().read_raw(id)
    }
    pub fn cast(&mut self, x: TensorId, to: DType) -> Result<TensorId> {
        self.inner_mut().cast(x, to)
    }
    pub fn reshape(&mut self, x: TensorId, shape: &[usize]) -> Result<TensorId> {
        self.inner_mut().reshape(x, shape)
    }
    pub fn permute(&mut self, x: TensorId, axes: &[usize]) -> Result<TensorId> {
        self.inner_mut().permute(x, axes)
    }
    pub fn slice(&mut self, x: TensorId, axis: usize, start: usize, len: usize) -> Result<TensorId> {
        self.inner_mut().slice(x, axis, start, len)
    }
    pub fn concat(&mut self, a: TensorId, b: TensorId, axis: usize) -> Result<TensorId> {
        self.inner_mut().concat(a, b, axis)
    }
    pub fn append(&mut self, cache: TensorId, rows: TensorId) -> Result<()> {
        self.inner_mut().append(cache, rows)
    }
    pub fn gather_rows(&mut self, table: TensorId, ids: TensorId) -> Result<TensorId> {
        self.inner_mut().gather_rows(table, ids)
    }
    pub fn rope(&mut self, x: TensorId, pos0: u32, theta: f32, mode: RopeMode) -> Result<TensorId> {
        self.inner_mut().rope(x, pos0, theta, mode)
    }
    pub fn attention(&mut self, q: TensorId, k: TensorId, v: TensorId, pos0: u32, scale: f32) -> Result<TensorId> {
        self.inner_mut().attention(q, k, v, pos0, scale)
    }
    pub fn begin_batch(&mut self) {
        self.inner_mut().begin_batch()
    }
    pub fn end_batch(&mut self) -> Result<()> {
        self.inner_mut().end_batch()
    }
    pub fn live_bytes(&self) -> u64 {
        self.inner().live_bytes()
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

// ---- shape helpers shared by every backend ----

pub(crate) fn shape_err(op: &'static str, details: impl Into<String>) -> GpuError {
    GpuError::ShapeMismatch { op, details: details.into() }
}

pub(crate) fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

/// Rank 1..=4, and the element count (and its byte size) fits comfortably in u32/u64 indexing.
pub(crate) fn check_shape(op: &'static str, shape: &[usize]) -> Result<()> {
    if shape.is_empty() || shape.len() > MAX_RANK {
        return Err(shape_err(op, format!("rank must be 1..={MAX_RANK}, got shape {shape:?}")));
    }
    let mut n: u64 = 1;
    for &d in shape {
        n = n
            .checked_mul(d as u64)
            .filter(|&n| n <= u32::MAX as u64 / 4)
            .ok_or_else(|| shape_err(op, format!("shape {shape:?} is too large")))?;
    }
    Ok(())
}

/// The geometry of a batched matmul: `batch` products of `[m, k] @ [k, n]`; a stride of 0 broadcasts
/// a 2-D operand over the batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct MatmulDims {
    pub batch: usize,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub stride_a: usize,
    pub stride_b: usize,
    pub transpose_a: bool,
    pub transpose_b: bool,
}

/// Validates a matmul and returns its geometry and output shape. The leading (batch) axes of `a` and
/// `b` must be equal, or one operand must be 2-D (shared across the batch).
pub(crate) fn matmul_dims(a: &[usize], b: &[usize], transpose_a: bool, transpose_b: bool) -> Result<(MatmulDims, Vec<usize>)> {
    const OP: &str = "matmul";
    if a.len() < 2 || b.len() < 2 {
        return Err(shape_err(OP, format!("operands need rank >= 2, got {a:?} and {b:?}")));
    }
    let (ba, ma) = a.split_at(a.len() - 2);
    let (bb, mb) = b.split_at(b.len() - 2);
    let (m, ka) = if transpose_a { (ma[1], ma[0]) } else { (ma[0], ma[1]) };
    let (kb, n) = if transpose_b { (mb[1], mb[0]) } else { (mb[0], mb[1]) };
    if ka != kb {
        return Err(shape_err(OP, format!("inner dimensions differ: {a:?} (transpose {transpose_a}) @ {b:?} (transpose {transpose_b})")));
    }
    let batch_shape: Vec<usize> = if ba == bb || bb.is_empty() {
        ba.to_vec()
    } else if ba.is_empty() {
        bb.to_vec()
    } else {
        return Err(shape_err(OP, format!("batch axes differ: {a:?} @ {b:?}")));
    };
    let mut out = batch_shape.clone();
    out.extend([m, n]);
    check_shape(OP, &out)?;
    let dims = MatmulDims {
        batch: numel(&batch_shape),
        m,
        n,
        k: ka,
        stride_a: if ba.is_empty() { 0 } else { m * ka },
        stride_b: if bb.is_empty() { 0 } else { ka * n },
        transpose_a,
        transpose_b,
    };
    Ok((dims, out))
}

/// Numpy broadcasting of two shapes, padded to 4-D: the output shape (at the larger rank) and, for
/// each operand, its element strides in the padded 4-D index space (0 on broadcast axes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Broadcast {
    pub out_shape: Vec<usize>,
    pub out4: [usize; 4],
    pub a_strides: [usize; 4],
    pub b_strides: [usize; 4],
}

pub(crate) fn broadcast(op: &'static str, a: &[usize], b: &[usize]) -> Result<Broadcast> {
    let rank = a.len().max(b.len());
    let pad = |s: &[usize]| {
        let mut p = [1usize; 4];
        p[4 - s.len()..].copy_from_slice(s);
        p
    };
    let (pa, pb) = (pad(a), pad(b));
    let mut out4 = [1usize; 4];
    for i in 0..4 {
        out4[i] = match (pa[i], pb[i]) {
            (x, y) if x == y => x,
            (1, y) => y,
            (x, 1) => x,
            _ => return Err(shape_err(op, format!("shapes {a:?} and {b:?} do not broadcast"))),
        };
    }
    let strides = |p: [usize; 4]| {
        let mut s = [0usize; 4];
        let mut acc = 1;
        for i in (0..4).rev() {
            s[i] = if p[i] == 1 { 0 } else { acc };
            acc *= p[i];
        }
        s
    };
    Ok(Broadcast { out_shape: out4[4 - rank..].to_vec(), out4, a_strides: strides(pa), b_strides: strides(pb) })
}

/// Rows and row length of a tensor seen as `[rows, last]`.
pub(crate) fn rows_last(shape: &[usize]) -> (usize, usize) {
    let last = *shape.last().unwrap_or(&1);
    let rows = numel(&shape[..shape.len().saturating_sub(1)]);
    (rows, last)
}

/// The output shape of a last-axis reduction.
pub(crate) fn reduced_shape(shape: &[usize]) -> Vec<usize> {
    if shape.len() == 1 { vec![1] } else { shape[..shape.len() - 1].to_vec() }
}

/// Checks a norm parameter (weight or bias) has shape `[last]`.
pub(crate) fn check_param(op: &'static str, what: &str, x: &[usize], p: &[usize]) -> Result<()> {
    let last = *x.last().unwrap_or(&0);
    if p != [last] {
        return Err(shape_err(op, format!("{what} must have shape [{last}] for input {x:?}, got {p:?}")));
    }
    Ok(())
}

// ---- portable math shared bit-for-bit with shaders/ ----

/// `exp` built only from IEEE +, -, * and exact power-of-two scaling, evaluated in the same order as
/// `repro_exp` in `shaders/reduce.wgsl`, so the CPU and every wgpu device agree bitwise (given no FMA
/// contraction). Accuracy is a few ULP. Results below `e^-86` flush to 0 (they would be near the
/// subnormal range, which GPUs may flush anyway); above `88.7` gives +inf; NaN gives NaN.
pub fn repro_exp(x: f32) -> f32 {
    if x.is_nan() {
        return x;
    }
    if x > 88.72 {
        return f32::INFINITY;
    }
    if x < -86.0 {
        return 0.0;
    }
    // The constants are given as bits so the CPU and WGSL use exactly the same f32 values.
    // n = round(x / ln 2), r = x - n ln 2 (Cody-Waite split: n * LN2_HI is exact for |n| < 2^9).
    let n = (x * f32::from_bits(0x3fb8_aa3b) + 0.5).floor();
    let r = (x - n * f32::from_bits(0x3f31_7200)) - n * f32::from_bits(0x35bf_be8e);
    // Degree-6 Taylor polynomial in Horner form (1/720, 1/120, 1/24, 1/6, 1/2, 1, 1); |r| <= 0.35.
    let mut p = f32::from_bits(0x3ab6_0b61);
    p = p * r + f32::from_bits(0x3c08_8889);
    p = p * r + f32::from_bits(0x3d2a_aaab);
    p = p * r + f32::from_bits(0x3e2a_aaab);
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    // 2^n as an exact f32 built from its bits: n is in -125..=128 here.
    let n = n as i32;
    if n > 127 {
        return p * f32::from_bits(254 << 23) * 2.0;
    }
    p * f32::from_bits(((n + 127) as u32) << 23)
}

// ---- portable transcendental functions of the elementwise ops, shared bit-for-bit with
// shaders/elementwise.wgsl and kernels/elementwise.cu ----
//
// Reproducible mode computes exp, tanh, silu and gelu with these functions: IEEE +, -, * only (no
// division, no built-in transcendental), power-of-two scaling built from bits, NaN and subnormal
// tests on the bits, one fixed order of operations, constants given as bits. The WGSL and CUDA
// copies mirror them operation for operation, so every backend gives the same bits (without FMA
// contraction). Subnormal inputs count as signed zeros and subnormal results flush to signed zero,
// so devices that flush subnormals agree with those that do not. Largest error against f64 over
// every f32 input (every normal result, both signs): exp 1.33 ULP, tanh 2.00 ULP, silu 4.01 ULP,
// gelu 3.83 ULP (all below 3e-7 relative).

/// `2^n` for `n` in -126..=127, built from its bits.
fn pow2(n: i32) -> f32 {
    f32::from_bits(((n + 127) as u32) << 23)
}

/// `v * 2^n` for `n` in -252..=254 in at most two steps, each exact unless its result overflows or
/// is subnormal (which the callers flush).
fn scale_pow2(v: f32, n: i32) -> f32 {
    if n > 127 {
        v * pow2(127) * pow2(n - 127)
    } else if n < -126 {
        v * pow2(-126) * pow2(n + 126)
    } else {
        v * pow2(n)
    }
}

/// `v`, or the zero with sign bit `sign` where `v` is subnormal (or zero).
fn flush_subnormal(v: f32, sign: u32) -> f32 {
    if v.to_bits() & 0x7f80_0000 == 0 { f32::from_bits(sign) } else { v }
}

/// `e^(hi + lo) = p * 2^n` for `|hi| <= 110` and `|lo|` a few ULP of `hi` at most: `n = round(hi / ln 2)`,
/// `r = hi - n ln 2 + lo` (Cody-Waite: `n * LN2_HI` is exact for `|n| < 2^9`), `p` a degree-6
/// polynomial in `r` (1, 1, 1/2 and a minimax fit of the rest on |r| <= 0.35; error 2e-9).
fn exp_parts(hi: f32, lo: f32) -> (f32, i32) {
    let n = (hi * f32::from_bits(0x3fb8_aa3b) + 0.5).floor();
    let r = ((hi - n * f32::from_bits(0x3f31_7200)) - n * f32::from_bits(0x35bf_be8e)) + lo;
    let mut p = f32::from_bits(0x3ab6_7172);
    p = p * r + f32::from_bits(0x3c08_eea1);
    p = p * r + f32::from_bits(0x3d2a_aa9e);
    p = p * r + f32::from_bits(0x3e2a_aa92);
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    (p, n as i32)
}

/// `1 / d` for `d` in [1, 2] without a division (Vulkan allows 2.5 ULP for one): three Newton steps
/// from the linear minimax start `24/17 - 8/17 d` (relative error 1/17, then 3e-3, 1e-5, 1e-10
/// before rounding; about 1.5 ULP after).
fn recip_1_2(d: f32) -> f32 {
    let mut r = f32::from_bits(0x3fb4_b4b5) - f32::from_bits(0x3ef0_f0f1) * d;
    r = r + r * (1.0 - d * r);
    r = r + r * (1.0 - d * r);
    r = r + r * (1.0 - d * r);
    r
}

// Error-free transformations for gelu's argument. The WGSL copy guards them (and a few other
// spots) against its compiler, which may rewrite float expressions by the rules of real arithmetic
// and so cancel the very rounding errors they capture (see `opaque` in shaders/elementwise.wgsl);
// the guard returns its argument bit for bit, so here and in CUDA (whose intrinsics are never
// rewritten) it is left out.

/// `a = hi + lo` exactly with `hi` the leading 12 significant bits of `a` (the low 12 mantissa bits
/// cleared) and `lo` at most 12 bits more.
fn split(a: f32) -> (f32, f32) {
    let hi = f32::from_bits(a.to_bits() & 0xffff_f000);
    (hi, a - hi)
}

/// `a * b = p + e` exactly (Dekker's product: the products of halves are exact, so an FMA
/// contraction would not change them either), for products far from under/overflow.
fn two_prod(a: f32, b: f32) -> (f32, f32) {
    let p = a * b;
    let (ah, al) = split(a);
    let (bh, bl) = split(b);
    (p, ((ah * bh - p) + ah * bl + al * bh) + al * bl)
}

/// `a + b = s + e` exactly (Dekker's fast two-sum, the operands ordered by magnitude).
fn two_sum(a: f32, b: f32) -> (f32, f32) {
    let (big, small) = if a.abs() < b.abs() { (b, a) } else { (a, b) };
    let s = big + small;
    (s, small - (s - big))
}

/// `exp` over the whole f32 range: [`repro_exp`]'s method with a more accurate polynomial, every
/// normal result (x from -87.34 to 88.72) within 1.4 ULP; subnormal results flush to +0, above
/// `ln(f32::MAX)` gives +inf, subnormal inputs give 1, NaN gives NaN (the same bits).
pub fn repro_exp_full(x: f32) -> f32 {
    let bits = x.to_bits();
    if bits & 0x7fff_ffff > 0x7f80_0000 {
        return x;
    }
    if bits & 0x7f80_0000 == 0 {
        return 1.0;
    }
    if x > 88.75 {
        return f32::INFINITY;
    }
    if x < -87.5 {
        return 0.0;
    }
    let (p, n) = exp_parts(x, 0.0);
    flush_subnormal(scale_pow2(p, n), 0)
}

/// `tanh` within 2.0 ULP: `x` itself below 2^-12 (subnormals flush to signed zero), an odd minimax
/// polynomial below 0.5625, `1 - 2e / (1 + e)` with `e = e^(-2|x|)` up to 9.5, then +-1; odd
/// (the sign is restored from the bits); NaN gives NaN (the same bits).
pub fn repro_tanh(x: f32) -> f32 {
    let bits = x.to_bits();
    let sign = bits & 0x8000_0000;
    let abs_bits = bits & 0x7fff_ffff;
    if abs_bits > 0x7f80_0000 {
        return x;
    }
    // Below 2^-12 the x^3 / 3 term is under half an ULP.
    if abs_bits < 0x3980_0000 {
        return flush_subnormal(x, sign);
    }
    let a = f32::from_bits(abs_bits);
    let t = if a < 0.5625 {
        // tanh(a) = a + a z P(z), z = a^2, P a minimax fit on z <= 0.5625^2 (relative error 5e-9).
        let z = a * a;
        let mut p = f32::from_bits(0xbbd5_d478);
        p = p * z + f32::from_bits(0x3cae_307c);
        p = p * z + f32::from_bits(0xbd5c_c816);
        p = p * z + f32::from_bits(0x3e08_87da);
        p = p * z + f32::from_bits(0xbeaa_aaaa);
        a + a * (z * p)
    } else if a < 9.5 {
        let (p, n) = exp_parts(-2.0 * a, 0.0);
        let e = p * pow2(n);
        1.0 - (e + e) * recip_1_2(1.0 + e)
    } else {
        // tanh rounds to 1 above 9.01.
        1.0
    };
    f32::from_bits(t.to_bits() | sign)
}

/// `x * sigmoid(y) = x / (1 + e^-y)` for `y = hi + lo`, `x` normal with `|x| < 2^15` wherever
/// `hi < 0` (a subnormal result flushes to zero with the sign of `x`).
fn mul_sigmoid(x: f32, hi: f32, lo: f32) -> f32 {
    let sign = x.to_bits() & 0x8000_0000;
    if hi >= 0.0 {
        // x / (1 + e^-y) = x (1 - e^-y + ...) rounds to x: e^-18 is below 2^-25.
        if hi > 18.0 {
            return x;
        }
        let (p, n) = exp_parts(-hi, -lo);
        return flush_subnormal(x * recip_1_2(1.0 + p * pow2(n)), sign);
    }
    // |x| e^y < 2^-126 below y = -100 for every |x| < 2^15.
    if hi < -100.0 {
        return f32::from_bits(sign);
    }
    // x e^y / (1 + e^y) with e^y = p 2^n: scaled by 2^n last, so e^y may be far below the normal range.
    let (p, n) = exp_parts(hi, lo);
    let mut q = x * p;
    if hi >= -18.0 {
        q *= recip_1_2(1.0 + p * pow2(n));
    }
    flush_subnormal(scale_pow2(q, n), sign)
}

/// `silu(x) = x / (1 + e^-x)` within 4.1 ULP (through `x e^x / (1 + e^x)` below 0, so the tail down to
/// the subnormal range near -92 keeps its accuracy); NaN gives NaN (the same bits), +inf gives +inf,
/// -inf gives -0, subnormal results flush to signed zero.
pub fn repro_silu(x: f32) -> f32 {
    let bits = x.to_bits();
    if bits & 0x7fff_ffff > 0x7f80_0000 {
        return x;
    }
    if bits & 0x7f80_0000 == 0 {
        return f32::from_bits(bits & 0x8000_0000);
    }
    mul_sigmoid(x, x, 0.0)
}

/// The tanh approximation of gelu, `0.5 x (1 + tanh(u))` with `u = sqrt(2/pi) (x + 0.044715 x^3)`,
/// computed as `x * sigmoid(2u)` (the same function, without the cancellation of `1 + tanh(u)` for
/// negative x) within 3.9 ULP of that formula evaluated in f64 with the exact constants. Below
/// -1/64 the result is as sensitive to `2u` as `e^(2u)` is, so `2u` is computed in double-f32 (Dekker
/// products, constants as a high and a low f32). NaN gives NaN (the same bits), +inf gives +inf,
/// -inf gives -0, subnormal results flush to signed zero.
pub fn repro_gelu(x: f32) -> f32 {
    let bits = x.to_bits();
    if bits & 0x7fff_ffff > 0x7f80_0000 {
        return x;
    }
    if bits & 0x7f80_0000 == 0 {
        return f32::from_bits(bits & 0x8000_0000);
    }
    // 2 sqrt(2/pi) and 0.044715, each as a high f32 and the f32 nearest the rest.
    let (k_hi, k_lo) = (f32::from_bits(0x3fcc_422a), f32::from_bits(0xb342_bc9b));
    let (c_hi, c_lo) = (f32::from_bits(0x3d37_2713), f32::from_bits(0x30d4_801f));
    if x >= -0.015625 {
        return mul_sigmoid(x, k_hi * (x + c_hi * (x * x * x)), 0.0);
    }
    // gelu(-11) is far below the normal range (and the Dekker splits stay far from overflow).
    if x < -11.0 {
        return -0.0;
    }
    let (s, s_lo) = two_prod(x, x);
    let (t, t_lo) = two_prod(s, x);
    let t_lo = t_lo + s_lo * x;
    let (u, u_lo) = two_prod(c_hi, t);
    let u_lo = u_lo + (c_hi * t_lo + c_lo * t);
    let (v, v_lo) = two_sum(x, u);
    let v_lo = v_lo + u_lo;
    let (y, y_lo) = two_prod(k_hi, v);
    mul_sigmoid(x, y, y_lo + (k_hi * v_lo + k_lo * v))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broadcast_shapes() {
        let b = broadcast("add", &[4, 1], &[1, 6]).unwrap();
        assert_eq!(b.out_shape, vec![4, 6]);
        assert_eq!(b.a_strides, [0, 0, 1, 0]);
        assert_eq!(b.b_strides, [0, 0, 0, 1]);
        assert!(broadcast("add", &[3], &[4]).is_err());
        assert_eq!(broadcast("add", &[2, 3, 4], &[4]).unwrap().out_shape, vec![2, 3, 4]);
    }

    #[test]
    fn matmul_shapes() {
        let (d, out) = matmul_dims(&[2, 9, 13], &[13, 11], false, false).unwrap();
        assert_eq!(out, vec![2, 9, 11]);
        assert_eq!((d.batch, d.m, d.n, d.k, d.stride_a, d.stride_b), (2, 9, 11, 13, 117, 0));
        let (_, out) = matmul_dims(&[5, 3], &[7, 5], true, true).unwrap();
        assert_eq!(out, vec![3, 7]);
        assert!(matmul_dims(&[3, 5], &[4, 7], false, false).is_err());
        assert!(matmul_dims(&[2, 3, 5], &[3, 5, 7], false, false).is_err());
        assert!(matmul_dims(&[5], &[5, 7], false, false).is_err());
    }

    /// |got - want| in units of the last place of the f32 nearest `want` (a normal number).
    fn ulps(got: f32, want: f64) -> f64 {
        let e = ((want as f32).abs().to_bits() >> 23) as i32 - 127;
        (got as f64 - want).abs() / 2f64.powi(e - 23)
    }

    #[test]
    fn error_free_transformations_are_exact() {
        let mut rng = fastrand::Rng::with_seed(5);
        for _ in 0..10_000 {
            let (a, b) = ((rng.f32() - 0.5) * 50.0, (rng.f32() - 0.5) * 3000.0);
            let (p, e) = two_prod(a, b);
            assert_eq!(p as f64 + e as f64, a as f64 * b as f64, "{a} * {b}");
            let (s, e) = two_sum(a, b);
            assert_eq!(s as f64 + e as f64, a as f64 + b as f64, "{a} + {b}");
            let (hi, lo) = split(b);
            assert_eq!((hi + lo, hi.to_bits() & 0xfff), (b, 0));
        }
        for i in 0..=1000 {
            let d = 1.0 + i as f32 / 1000.0;
            assert!(ulps(recip_1_2(d), 1.0 / d as f64) <= 1.5, "1 / {d}: {}", recip_1_2(d));
        }
    }

    #[test]
    fn portable_elementwise_functions_at_the_edges() {
        let gelu64 = |x: f64| 0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x)).tanh());
        for x in [0.1f32, 0.5, 1.0, 2.5, 7.0] {
            assert!(ulps(repro_exp_full(x), (x as f64).exp()) <= 1.5, "exp {x}");
            assert!(ulps(repro_exp_full(-x), (-x as f64).exp()) <= 1.5, "exp -{x}");
            assert!(ulps(repro_tanh(x), (x as f64).tanh()) <= 2.0, "tanh {x}");
            assert!(ulps(repro_silu(x), x as f64 / (1.0 + (-x as f64).exp())) <= 4.0, "silu {x}");
            assert!(ulps(repro_gelu(x), gelu64(x as f64)) <= 4.0, "gelu {x}");
            // tanh is odd through the sign bit: exactly antisymmetric.
            assert_eq!(repro_tanh(-x).to_bits(), (-repro_tanh(x)).to_bits());
        }
        assert!(ulps(repro_gelu(-1.5), gelu64(-1.5)) <= 4.0);
        // NaN keeps its bits; zeros and subnormals give signed zeros (exp: 1); infinities the limits.
        let nan = f32::from_bits(0xffc0_1234);
        for f in [repro_exp_full, repro_tanh, repro_silu, repro_gelu] {
            assert_eq!(f(nan).to_bits(), nan.to_bits());
        }
        for f in [repro_tanh, repro_silu, repro_gelu] {
            for (x, z) in [(0.0f32, 0.0f32), (-0.0, -0.0), (1e-40, 0.0), (-1e-40, -0.0)] {
                assert_eq!(f(x).to_bits(), z.to_bits(), "{x:e}");
            }
        }
        assert_eq!((repro_exp_full(1e-40), repro_exp_full(-0.0)), (1.0, 1.0));
        assert_eq!((repro_exp_full(f32::INFINITY), repro_exp_full(f32::NEG_INFINITY)), (f32::INFINITY, 0.0));
        assert_eq!((repro_tanh(f32::INFINITY), repro_tanh(f32::NEG_INFINITY), repro_tanh(10.0)), (1.0, -1.0, 1.0));
        assert_eq!((repro_silu(f32::INFINITY), repro_gelu(f32::INFINITY)), (f32::INFINITY, f32::INFINITY));
        assert_eq!(repro_silu(f32::NEG_INFINITY).to_bits(), (-0.0f32).to_bits());
        assert_eq!(repro_gelu(f32::NEG_INFINITY).to_bits(), (-0.0f32).to_bits());
        // Overflow at ln(f32::MAX) = 88.7228; results below 2^-126 (e^-87.34) flush to zero.
        assert!(repro_exp_full(88.722_8).is_finite() && repro_exp_full(88.723).is_infinite());
        assert!(repro_exp_full(-87.3) >= f32::MIN_POSITIVE && repro_exp_full(-87.4) == 0.0);
        // silu keeps its accuracy down to the subnormal range (-91 e^-91 is 2.7e-38), then gives -0.
        assert!(ulps(repro_silu(-91.0), -91.0 * (-91.0f64).exp() / (1.0 + (-91.0f64).exp())) <= 4.0);
        assert_eq!(repro_silu(-93.0).to_bits(), (-0.0f32).to_bits());
        // gelu's left tail: x sigmoid(2u) without the cancellation of 1 + tanh(u).
        let tail = |x: f64| x / (1.0 + (-2.0 * (2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x)).exp());
        assert!(ulps(repro_gelu(-6.0), tail(-6.0)) <= 4.0, "{:e} vs {:e}", repro_gelu(-6.0), tail(-6.0));
        assert_eq!(repro_gelu(-10.5).to_bits(), (-0.0f32).to_bits());
    }

    #[test]
    fn repro_exp_is_close_to_exp() {
        let mut x = -86.0f32;
        while x < 88.0 {
            let (got, want) = (repro_exp(x) as f64, (x as f64).exp());
            assert!(((got - want) / want).abs() < 4e-7, "x={x}: {got} vs {want}");
            x += 0.173;
        }
        // The top of the range, where n = round(x / ln 2) reaches 128.
        for x in [88.3f32, 88.4, 88.5, 88.7] {
            let (got, want) = (repro_exp(x) as f64, (x as f64).exp());
            assert!(((got - want) / want).abs() < 4e-7, "x={x}: {got} vs {want}");
        }
        assert_eq!(repro_exp(0.0), 1.0);
        assert_eq!(repro_exp(-100.0), 0.0);
        assert_eq!(repro_exp(100.0), f32::INFINITY);
        assert_eq!(repro_exp(f32::NEG_INFINITY), 0.0);
        assert!(repro_exp(f32::NAN).is_nan());
    }
}

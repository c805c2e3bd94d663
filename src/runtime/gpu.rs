//! The `ao_gpu` host module: tensor operations for actors, on the runtime's tensor backend.
//!
//! A tensor is a small positive integer handle, valid for one evaluation, that maps to a backend
//! [`TensorId`] with its shape and [`DType`]; the data stays on the device between calls and only
//! `read` / `read_f32` copy it back into Wasm memory. Every tensor an evaluation created is freed
//! when the evaluation ends, whether it succeeded or failed ([`GpuCtx`]'s `Drop`). Constants
//! (`constant`: an item id plus the sha256 of its data) are the exception: their device tensors
//! live in the runtime's [`ConstantCache`], shared across evaluations and actors; a handle to one
//! is read-only and freeing it releases only the handle.
//!
//! Errors: misuse the guest can handle (bad op or dtype code, shape or dtype mismatch, unknown or
//! freed handle, device-memory quota, device out of memory, too small a read buffer, a constant
//! that is missing or does not match its digest) returns a negative [`GpuStatus`] and leaves the
//! worker healthy; a pointer range outside memory 0 traps; never a host panic. Pointer checks come
//! first, so a trapping call has no effect. A constant whose source is unreachable ends the
//! evaluation with [`super::EvalError::Unavailable`]: not the actor's fault, retried later.
//!
//! Gas (include/ao_gpu.h has the table): before an op runs it is charged, from shapes and dtypes
//! alone, `ceil(bytes / 4) + ceil(flops / 2)` fuel on top of `GAS_PER_CALL` (one per host call)
//! or `GAS_PER_COMMAND` (one per command of a `run`). A call that fails its checks costs only
//! `GAS_PER_CALL`; when the fuel does not suffice the call traps as out of fuel before anything
//! runs. The fuel comes out of the guest's own budget (part of `GasUsed`, bounded by
//! `Compute-Limit`).
//!
//! Batches (`run`): a list of [`CMD_SIZE`]-byte command records in Wasm memory, executed in order
//! under one backend lock between `begin_batch` and `end_batch` (one device submission). Each
//! command is checked and charged exactly as the single call, then runs; the first failing command
//! stops the list (its index is reported), and the outputs of the commands before it stay live.

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use wasmtime::{AsContextMut, Caller, Extern, Linker, Trap};

use super::constants::{AcquireError, ConstantCache, ConstantKey, Pin};
use crate::gpu::dtype::{dtype_err, expect_dtype};
use crate::gpu::layout::{self, RopeMode};
use crate::gpu::{self, Backend, BinaryOp, DType, GpuError, HostTensor, MAX_RANK, RawTensor, ReduceOp, TensorId, UnaryOp};

/// The import module name.
pub const MODULE: &str = "ao_gpu";

/// Default cap on the bytes of live tensors one evaluation may hold.
pub const DEFAULT_MAX_DEVICE_MEMORY: u64 = 256 << 20;
/// Most live handles one evaluation may hold (beyond: `QUOTA_EXCEEDED`).
pub const MAX_HANDLES: usize = 4096;

/// Fuel every `ao_gpu` call costs.
pub const GAS_PER_CALL: u64 = 100;
/// Fuel every command of a `run` costs (instead of `GAS_PER_CALL`; the `run` call itself costs
/// `GAS_PER_CALL` once).
pub const GAS_PER_COMMAND: u64 = 20;
/// Bytes moved per unit of fuel.
pub const BYTES_PER_GAS: u64 = 4;
/// FLOPs per unit of fuel.
pub const FLOPS_PER_GAS: u64 = 2;

/// Bytes of one `run` command record (`ao_gpu_cmd` in include/ao_gpu.h).
pub const CMD_SIZE: usize = 64;
/// Byte offsets of the record's fields.
pub const CMD_OP: usize = 0;
pub const CMD_IN: usize = 4;
pub const CMD_I: usize = 20;
pub const CMD_F: usize = 44;
pub const CMD_OUT: usize = 52;
pub const CMD_RESERVED: usize = 56;
/// Operand slots, integer and float parameters of a record.
pub const CMD_INPUTS: usize = 4;
pub const CMD_INTS: usize = 6;
pub const CMD_FLOATS: usize = 2;

/// A tensor backend shared by every evaluation of a runtime.
pub type SharedBackend = Arc<Mutex<Backend>>;

/// The `ao_gpu` settings of a runtime, chosen by whoever creates it.
#[derive(Debug, Clone)]
pub struct GpuConfig {
    /// The backend `ao_gpu` runs on; `None` means the constant cache's backend when there is one,
    /// else a fresh CPU backend in reproducible mode (the runtime reports which backend it uses,
    /// see `Runtime::tensor_backend`).
    pub backend: Option<SharedBackend>,
    /// Cap on the bytes of live tensors per evaluation (beyond: `QUOTA_EXCEEDED`).
    pub max_device_memory: u64,
    /// Constants loaded by content (`constant`): the cache, with the [`super::ConstantSource`]
    /// it fetches from and its byte cap. Runtimes given the same `Arc` share it; it must be made
    /// for the same backend. `None`: `constant` answers `UNSUPPORTED`.
    pub constants: Option<Arc<ConstantCache>>,
}

impl Default for GpuConfig {
    fn default() -> Self {
        Self { backend: None, max_device_memory: DEFAULT_MAX_DEVICE_MEMORY, constants: None }
    }
}

/// What an `ao_gpu` call returns (also in include/ao_gpu.h).
#[repr(i32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GpuStatus {
    Ok = 0,
    /// An op, dtype or rope-mode code, rank, axis, length or record field outside what the
    /// function accepts, or a malformed item id.
    InvalidArgument = -1,
    ShapeMismatch = -2,
    /// Never issued in this evaluation, or already freed.
    UnknownHandle = -3,
    /// The evaluation's device-memory quota or handle limit would be exceeded (or, for a
    /// constant, the constant cache's cap).
    QuotaExceeded = -4,
    DeviceOutOfMemory = -5,
    /// `read` / `read_f32`'s capacity is smaller than the tensor.
    BufferTooSmall = -6,
    /// The backend does not implement the op (or the worker has no constant source).
    Unsupported = -7,
    DeviceError = -8,
    /// An operand's dtype is not one the op takes (or a quantized shape is not block-aligned).
    DtypeMismatch = -9,
    /// The op would modify a constant.
    ReadOnly = -10,
    /// A constant's item data does not have the sha256 the actor named.
    ConstantMismatch = -11,
    /// A constant's item does not exist.
    NotFound = -12,
}

impl GpuStatus {
    pub const ALL: [GpuStatus; 13] = [
        GpuStatus::Ok,
        GpuStatus::InvalidArgument,
        GpuStatus::ShapeMismatch,
        GpuStatus::UnknownHandle,
        GpuStatus::QuotaExceeded,
        GpuStatus::DeviceOutOfMemory,
        GpuStatus::BufferTooSmall,
        GpuStatus::Unsupported,
        GpuStatus::DeviceError,
        GpuStatus::DtypeMismatch,
        GpuStatus::ReadOnly,
        GpuStatus::ConstantMismatch,
        GpuStatus::NotFound,
    ];

    pub fn code(self) -> i32 {
        self as i32
    }

    pub fn from_code(code: i32) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.code() == code)
    }

    /// The name in include/ao_gpu.h without the `AO_GPU_` prefix.
    pub fn name(self) -> &'static str {
        match self {
            GpuStatus::Ok => "OK",
            GpuStatus::InvalidArgument => "INVALID_ARGUMENT",
            GpuStatus::ShapeMismatch => "SHAPE_MISMATCH",
            GpuStatus::UnknownHandle => "UNKNOWN_HANDLE",
            GpuStatus::QuotaExceeded => "QUOTA_EXCEEDED",
            GpuStatus::DeviceOutOfMemory => "DEVICE_OUT_OF_MEMORY",
            GpuStatus::BufferTooSmall => "BUFFER_TOO_SMALL",
            GpuStatus::Unsupported => "UNSUPPORTED",
            GpuStatus::DeviceError => "DEVICE_ERROR",
            GpuStatus::DtypeMismatch => "DTYPE_MISMATCH",
            GpuStatus::ReadOnly => "READ_ONLY",
            GpuStatus::ConstantMismatch => "CONSTANT_MISMATCH",
            GpuStatus::NotFound => "NOT_FOUND",
        }
    }
}

impl From<&GpuError> for GpuStatus {
    fn from(e: &GpuError) -> Self {
        match e {
            GpuError::ShapeMismatch { .. } => GpuStatus::ShapeMismatch,
            GpuError::DType { .. } => GpuStatus::DtypeMismatch,
            GpuError::UnknownTensor(_) => GpuStatus::UnknownHandle,
            GpuError::OutOfMemory { .. } => GpuStatus::DeviceOutOfMemory,
            GpuError::Unsupported { .. } => GpuStatus::Unsupported,
            GpuError::Device(_) => GpuStatus::DeviceError,
        }
    }
}

/// Every linked function with its signature as rendered by `abi::signature`; the import check at
/// load refuses anything else, and a test checks that this table and `add_to_linker` agree.
pub const FUNCTIONS: &[(&str, &str)] = &[
    ("tensor_f32", "(i32, i32, i32, i32, i32) -> i32"),
    ("read_f32", "(i32, i32, i32) -> i32"),
    ("shape", "(i32, i32, i32) -> i32"),
    ("free", "(i32) -> i32"),
    ("matmul", "(i32, i32, i32, i32, i32) -> i32"),
    ("binary", "(i32, i32, i32, i32) -> i32"),
    ("unary", "(i32, i32, i32) -> i32"),
    ("scale", "(i32, f32, i32) -> i32"),
    ("softmax", "(i32, i32) -> i32"),
    ("rmsnorm", "(i32, i32, f32, i32) -> i32"),
    ("layernorm", "(i32, i32, i32, f32, i32) -> i32"),
    ("reduce", "(i32, i32, i32) -> i32"),
    ("tensor", "(i32, i32, i32, i32, i32, i32) -> i32"),
    ("read", "(i32, i32, i32, i32) -> i32"),
    ("dtype", "(i32) -> i32"),
    ("cast", "(i32, i32, i32) -> i32"),
    ("reshape", "(i32, i32, i32, i32) -> i32"),
    ("permute", "(i32, i32, i32, i32) -> i32"),
    ("slice", "(i32, i32, i32, i32, i32) -> i32"),
    ("concat", "(i32, i32, i32, i32) -> i32"),
    ("append", "(i32, i32) -> i32"),
    ("gather", "(i32, i32, i32) -> i32"),
    ("rope", "(i32, i32, f32, i32, i32) -> i32"),
    ("attention", "(i32, i32, i32, i32, f32, i32) -> i32"),
    ("run", "(i32, i32, i32) -> i32"),
    ("constant", "(i32, i32, i32, i32, i32, i32) -> i32"),
];

/// `binary` op codes.
fn binary_op(code: i32) -> Option<BinaryOp> {
    Some(match code {
        0 => BinaryOp::Add,
        1 => BinaryOp::Sub,
        2 => BinaryOp::Mul,
        3 => BinaryOp::Div,
        _ => return None,
    })
}

/// `unary` op codes.
fn unary_op(code: i32) -> Option<UnaryOp> {
    Some(match code {
        0 => UnaryOp::Relu,
        1 => UnaryOp::Gelu,
        2 => UnaryOp::Silu,
        3 => UnaryOp::Tanh,
        4 => UnaryOp::Exp,
        _ => return None,
    })
}

/// `reduce` op codes (over the last axis).
fn reduce_op(code: i32) -> Option<ReduceOp> {
    Some(match code {
        0 => ReduceOp::Sum,
        1 => ReduceOp::Max,
        2 => ReduceOp::Mean,
        3 => ReduceOp::Argmax,
        _ => return None,
    })
}

/// `run` command op codes (`AO_GPU_OP_*`).
pub mod op {
    pub const MATMUL: i32 = 1;
    pub const BINARY: i32 = 2;
    pub const UNARY: i32 = 3;
    pub const SCALE: i32 = 4;
    pub const SOFTMAX: i32 = 5;
    pub const RMSNORM: i32 = 6;
    pub const LAYERNORM: i32 = 7;
    pub const REDUCE: i32 = 8;
    pub const CAST: i32 = 9;
    pub const RESHAPE: i32 = 10;
    pub const PERMUTE: i32 = 11;
    pub const SLICE: i32 = 12;
    pub const CONCAT: i32 = 13;
    pub const APPEND: i32 = 14;
    pub const GATHER: i32 = 15;
    pub const ROPE: i32 = 16;
    pub const ATTENTION: i32 = 17;
    pub const FREE: i32 = 18;
}

/// The FLOPs charged for an op, from shapes only.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Flops {
    /// `2 * batch * m * n * k`.
    Matmul { batch: usize, m: usize, n: usize, k: usize },
    /// `per_element * elements`.
    Elementwise { elements: usize, per_element: u64 },
    /// Causal attention: `batch * heads * keys * (4 * dim + 8)`, where `keys` is the number of
    /// (query, key) pairs one head attends, `sum over i < tq of min(pos0 + i + 1, tk)`.
    Attention { batch: usize, heads: usize, tq: usize, tk: usize, dim: usize, pos0: u32 },
}

/// See [`Flops`]: binary ops, scale, relu, reductions and gather 1 per element; cast 2; rope 3;
/// exp, tanh, silu and rmsnorm 4; gelu, softmax and layernorm 8; layout ops 0.
pub fn flops(f: Flops) -> u64 {
    match f {
        Flops::Matmul { batch, m, n, k } => {
            2u64.saturating_mul(batch as u64).saturating_mul(m as u64).saturating_mul(n as u64).saturating_mul(k as u64)
        }
        Flops::Elementwise { elements, per_element } => (elements as u64).saturating_mul(per_element),
        Flops::Attention { batch, heads, tq, tk, dim, pos0 } => {
            let pairs = attended_pairs(tq, tk, pos0);
            let per_pair = 4u128 * dim as u128 + 8;
            let total = (batch as u128).saturating_mul(heads as u128).saturating_mul(pairs).saturating_mul(per_pair);
            u64::try_from(total).unwrap_or(u64::MAX)
        }
    }
}

/// `sum over i < tq of min(pos0 + i + 1, tk)`: the keys the queries of one head attend.
fn attended_pairs(tq: usize, tk: usize, pos0: u32) -> u128 {
    let (tq, tk, pos0) = (tq as u128, tk as u128, pos0 as u128);
    // Queries i < m see pos0 + i + 1 <= tk keys; the rest see all tk.
    let m = tq.min(tk.saturating_sub(pos0));
    m * pos0 + m * (m + 1) / 2 + (tq - m) * tk
}

/// The fuel an op costs as a single call: `GAS_PER_CALL + ceil(bytes / 4) + ceil(flops / 2)`.
pub fn gas(bytes: u64, flops: u64) -> u64 {
    GAS_PER_CALL.saturating_add(op_gas(bytes, flops))
}

/// The op's part of the fuel, on top of `GAS_PER_CALL` or `GAS_PER_COMMAND`.
fn op_gas(bytes: u64, flops: u64) -> u64 {
    bytes.div_ceil(BYTES_PER_GAS).saturating_add(flops.div_ceil(FLOPS_PER_GAS))
}

fn unary_cost(op: UnaryOp) -> u64 {
    match op {
        UnaryOp::Scale(_) | UnaryOp::Relu => 1,
        UnaryOp::Exp | UnaryOp::Tanh | UnaryOp::Silu => 4,
        UnaryOp::Gelu => 8,
    }
}

/// Storage bytes of a tensor (`DType::byte_len`), checked.
fn storage(op: &'static str, dtype: DType, shape: &[usize]) -> gpu::Result<u64> {
    gpu::check_shape(op, shape)?;
    dtype.byte_len(op, shape).map(|b| b as u64)
}

/// The shape and dtype of a tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Meta {
    shape: Vec<usize>,
    dtype: DType,
}

/// One live handle of an evaluation.
#[derive(Debug)]
struct Live {
    id: TensorId,
    meta: Meta,
    /// Storage bytes: what the quota counts (0 for constants, which are not counted).
    bytes: u64,
    /// Set for a constant: the handle is read-only and its tensor belongs to the cache.
    pin: Option<Pin>,
}

impl Live {
    fn stored(&self) -> u64 {
        match &self.pin {
            Some(p) => p.bytes(),
            None => self.bytes,
        }
    }
}

/// An op of a single call or of a `run` command, with its parameters (its operands are handles).
#[derive(Debug, Clone, PartialEq)]
enum Op {
    Matmul { ta: bool, tb: bool },
    Binary(BinaryOp),
    Unary(UnaryOp),
    Softmax,
    Rmsnorm { eps: f32 },
    Layernorm { eps: f32 },
    Reduce(ReduceOp),
    Cast(DType),
    Reshape(Vec<usize>),
    Permute(Vec<usize>),
    Slice { axis: usize, start: usize, len: usize },
    Concat { axis: usize },
    Append,
    Gather,
    Rope { pos0: u32, theta: f32, mode: RopeMode },
    Attention { pos0: u32, scale: f32 },
    Free,
}

impl Op {
    /// How many operand handles the op takes.
    fn arity(&self) -> usize {
        match self {
            Op::Unary(_) | Op::Softmax | Op::Reduce(_) | Op::Cast(_) | Op::Reshape(_) | Op::Permute(_) | Op::Slice { .. } => 1,
            Op::Rope { .. } | Op::Free => 1,
            Op::Matmul { .. } | Op::Binary(_) | Op::Rmsnorm { .. } | Op::Concat { .. } | Op::Append | Op::Gather => 2,
            Op::Layernorm { .. } | Op::Attention { .. } => 3,
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Op::Matmul { .. } => "matmul",
            Op::Binary(op) => op.name(),
            Op::Unary(op) => op.name(),
            Op::Softmax => "softmax",
            Op::Rmsnorm { .. } => "rmsnorm",
            Op::Layernorm { .. } => "layernorm",
            Op::Reduce(op) => op.name(),
            Op::Cast(_) => "cast",
            Op::Reshape(_) => "reshape",
            Op::Permute(_) => "permute",
            Op::Slice { .. } => "slice",
            Op::Concat { .. } => "concat",
            Op::Append => "append",
            Op::Gather => "gather",
            Op::Rope { .. } => "rope",
            Op::Attention { .. } => "attention",
            Op::Free => "free",
        }
    }
}

/// What an op makes and what it costs.
#[derive(Debug, Clone, PartialEq)]
struct Plan {
    out: Meta,
    /// Storage bytes of the output: what the quota counts.
    out_bytes: u64,
    /// Bytes charged for.
    bytes: u64,
    flops: u64,
}

fn f32_operand(op: &'static str, what: &str, m: &Meta) -> gpu::Result<()> {
    expect_dtype(op, what, m.dtype, DType::F32)
}

fn unquantized(op: &'static str, what: &str, m: &Meta) -> gpu::Result<()> {
    if m.dtype.is_quantized() {
        return Err(dtype_err(op, format!("{what} must not be quantized, got {}", m.dtype)));
    }
    Ok(())
}

/// Whether `cast` converts `from` to `to` (the rules of `TensorBackend::cast`).
fn castable(from: DType, to: DType) -> bool {
    use DType::*;
    from == to
        || matches!((from, to), (F32, F16) | (F16, F32) | (F32, I32) | (I32, F32))
        || (from.is_quantized() && to == F32)
        || (from == F32 && to.is_quantized())
}

fn elements(shape: &[usize], per_element: u64) -> u64 {
    flops(Flops::Elementwise { elements: gpu::numel(shape), per_element })
}

/// Validates an op on `x` (one entry per operand: its meta and storage bytes) and plans its output
/// and cost. Shapes use the backends' shared checks, so the statuses agree with theirs.
fn plan(op: &Op, x: &[(&Meta, u64)]) -> gpu::Result<Plan> {
    let name = op.name();
    let in_bytes: u64 = x.iter().map(|(_, b)| *b).fold(0, u64::saturating_add);
    let m = |i: usize| x[i].0;
    let (out, flops, bytes_override): (Meta, u64, Option<u64>) = match op {
        Op::Matmul { ta, tb } => {
            f32_operand(name, "a", m(0))?;
            match m(1).dtype {
                DType::I32 => return Err(dtype_err(name, "b must be f32, f16 or quantized, got i32")),
                d if d.is_quantized() && !tb => {
                    return Err(dtype_err(name, format!("{d} weights must be stored [n, k] (transpose_b = true)")));
                }
                _ => {}
            }
            let (d, shape) = gpu::matmul_dims(&m(0).shape, &m(1).shape, *ta, *tb)?;
            (Meta { shape, dtype: DType::F32 }, flops(Flops::Matmul { batch: d.batch, m: d.m, n: d.n, k: d.k }), None)
        }
        Op::Binary(bop) => {
            f32_operand(name, "a", m(0))?;
            f32_operand(name, "b", m(1))?;
            let shape = gpu::broadcast(bop.name(), &m(0).shape, &m(1).shape)?.out_shape;
            let f = elements(&shape, 1);
            (Meta { shape, dtype: DType::F32 }, f, None)
        }
        Op::Unary(uop) => {
            f32_operand(name, "x", m(0))?;
            (m(0).clone(), elements(&m(0).shape, unary_cost(*uop)), None)
        }
        Op::Softmax => {
            f32_operand(name, "x", m(0))?;
            (m(0).clone(), elements(&m(0).shape, 8), None)
        }
        Op::Rmsnorm { .. } => {
            f32_operand(name, "x", m(0))?;
            f32_operand(name, "weight", m(1))?;
            gpu::check_param(name, "weight", &m(0).shape, &m(1).shape)?;
            (m(0).clone(), elements(&m(0).shape, 4), None)
        }
        Op::Layernorm { .. } => {
            for (i, what) in ["x", "weight", "bias"].into_iter().enumerate() {
                f32_operand(name, what, m(i))?;
            }
            gpu::check_param(name, "weight", &m(0).shape, &m(1).shape)?;
            gpu::check_param(name, "bias", &m(0).shape, &m(2).shape)?;
            (m(0).clone(), elements(&m(0).shape, 8), None)
        }
        Op::Reduce(rop) => {
            f32_operand(name, "x", m(0))?;
            if *rop == ReduceOp::Argmax && m(0).shape.last() == Some(&0) {
                return Err(gpu::shape_err("argmax_last", format!("the last axis of {:?} is empty", m(0).shape)));
            }
            // Argmax gives i32 indices (read_f32 converts them to f32 values).
            let dtype = if *rop == ReduceOp::Argmax { DType::I32 } else { DType::F32 };
            (Meta { shape: gpu::reduced_shape(&m(0).shape), dtype }, elements(&m(0).shape, 1), None)
        }
        Op::Cast(to) => {
            if !castable(m(0).dtype, *to) {
                return Err(dtype_err(name, format!("cannot cast {} to {to}", m(0).dtype)));
            }
            (Meta { shape: m(0).shape.clone(), dtype: *to }, elements(&m(0).shape, 2), None)
        }
        Op::Reshape(shape) => {
            layout::reshape_check(&m(0).shape, shape)?;
            (Meta { shape: shape.clone(), dtype: m(0).dtype }, 0, None)
        }
        Op::Permute(axes) => {
            unquantized(name, "x", m(0))?;
            (Meta { shape: layout::permute_dims(&m(0).shape, axes)?, dtype: m(0).dtype }, 0, None)
        }
        Op::Slice { axis, start, len } => {
            unquantized(name, "x", m(0))?;
            let (shape, _) = layout::slice_dims(&m(0).shape, *axis, *start, *len)?;
            (Meta { shape, dtype: m(0).dtype }, 0, None)
        }
        Op::Concat { axis } => {
            unquantized(name, "a", m(0))?;
            expect_dtype(name, "b", m(1).dtype, m(0).dtype)?;
            let (shape, _) = layout::concat_dims(&m(0).shape, &m(1).shape, *axis)?;
            (Meta { shape, dtype: m(0).dtype }, 0, None)
        }
        Op::Append => {
            unquantized(name, "cache", m(0))?;
            expect_dtype(name, "rows", m(1).dtype, m(0).dtype)?;
            let shape = layout::append_dims(&m(0).shape, &m(1).shape)?;
            // The rows are read and written once; the cache itself is not moved (amortized).
            (Meta { shape, dtype: m(0).dtype }, 0, Some(x[1].1.saturating_mul(2)))
        }
        Op::Gather => {
            expect_dtype(name, "ids", m(1).dtype, DType::I32)?;
            if m(0).dtype == DType::I32 {
                return Err(dtype_err(name, "the table must be f32, f16 or quantized, got i32"));
            }
            let shape = layout::gather_dims(&m(0).shape, &m(1).shape)?;
            // Only the rows looked up are read, not the whole table.
            let rows = gpu::numel(&m(1).shape) as u64;
            let row_bytes = storage(name, m(0).dtype, &m(0).shape[1..])?;
            let out_bytes = storage(name, DType::F32, &shape)?;
            let bytes = x[1].1.saturating_add(rows.saturating_mul(row_bytes)).saturating_add(out_bytes);
            let f = elements(&shape, 1);
            (Meta { shape, dtype: DType::F32 }, f, Some(bytes))
        }
        Op::Rope { .. } => {
            f32_operand(name, "x", m(0))?;
            layout::rope_dims(&m(0).shape)?;
            (m(0).clone(), elements(&m(0).shape, 3), None)
        }
        Op::Attention { pos0, .. } => {
            for (i, what) in ["q", "k", "v"].into_iter().enumerate() {
                f32_operand(name, what, m(i))?;
            }
            let d = layout::attention_dims(&m(0).shape, &m(1).shape, &m(2).shape)?;
            let f = flops(Flops::Attention { batch: d.batch, heads: d.hq, tq: d.tq, tk: d.tk, dim: d.dim, pos0: *pos0 });
            (m(0).clone(), f, None)
        }
        // `exec` handles free itself; never planned.
        Op::Free => return Err(GpuError::Device("free has no plan".to_owned())),
    };
    let out_bytes = storage(name, out.dtype, &out.shape)?;
    let bytes = bytes_override.unwrap_or_else(|| in_bytes.saturating_add(out_bytes));
    Ok(Plan { out, out_bytes, bytes, flops })
}

/// Runs a planned op on the backend.
fn run_op(be: &mut Backend, op: &Op, ids: &[TensorId]) -> gpu::Result<TensorId> {
    Ok(match op {
        Op::Matmul { ta, tb } => be.matmul(ids[0], ids[1], *ta, *tb)?,
        Op::Binary(bop) => be.binary(*bop, ids[0], ids[1])?,
        Op::Unary(uop) => be.unary(*uop, ids[0])?,
        Op::Softmax => be.softmax_last(ids[0])?,
        Op::Rmsnorm { eps } => be.rmsnorm(ids[0], ids[1], *eps)?,
        Op::Layernorm { eps } => be.layernorm(ids[0], ids[1], ids[2], *eps)?,
        Op::Reduce(rop) => be.reduce_last(*rop, ids[0])?,
        Op::Cast(to) => be.cast(ids[0], *to)?,
        Op::Reshape(shape) => be.reshape(ids[0], shape)?,
        Op::Permute(axes) => be.permute(ids[0], axes)?,
        Op::Slice { axis, start, len } => be.slice(ids[0], *axis, *start, *len)?,
        Op::Concat { axis } => be.concat(ids[0], ids[1], *axis)?,
        Op::Gather => be.gather_rows(ids[0], ids[1])?,
        Op::Rope { pos0, theta, mode } => be.rope(ids[0], *pos0, *theta, *mode)?,
        Op::Attention { pos0, scale } => be.attention(ids[0], ids[1], ids[2], *pos0, *scale)?,
        // `exec` handles append and free itself: they make no tensor.
        Op::Append | Op::Free => return Err(GpuError::Device(format!("{} makes no tensor", op.name()))),
    })
}

/// The runtime's side of `ao_gpu`: what every evaluation's [`GpuCtx`] is made from.
#[derive(Debug, Clone)]
pub(crate) struct GpuEnv {
    pub backend: SharedBackend,
    pub max_device_memory: u64,
    pub constants: Option<Arc<ConstantCache>>,
}

/// The per-evaluation `ao_gpu` state: the handle table and the quota. Dropping it frees every tensor
/// still live and releases every constant.
pub struct GpuCtx {
    backend: SharedBackend,
    constants: Option<Arc<ConstantCache>>,
    live: BTreeMap<u32, Live>,
    next_handle: u32,
    used_bytes: u64,
    max_bytes: u64,
    /// Constants this evaluation holds handles to: key -> (handles, bytes).
    pinned: HashMap<ConstantKey, (u32, u64)>,
    pinned_bytes: u64,
    /// Why the evaluation cannot complete for a reason outside the actor (see `unavailable`).
    unavailable: Option<String>,
    /// When the evaluation started, its wall-clock deadline, and the time spent waiting for
    /// constants (which does not count against the deadline).
    started: Instant,
    deadline: Option<Duration>,
    excluded: Duration,
    /// The instance's memory 0, once a call has looked it up.
    memory: Option<wasmtime::Memory>,
}

impl std::fmt::Debug for GpuCtx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuCtx").field("live", &self.live.len()).field("used_bytes", &self.used_bytes).finish_non_exhaustive()
    }
}

impl GpuCtx {
    pub fn new(backend: SharedBackend, max_bytes: u64) -> Self {
        Self {
            backend,
            constants: None,
            live: BTreeMap::new(),
            next_handle: 1,
            used_bytes: 0,
            max_bytes,
            pinned: HashMap::new(),
            pinned_bytes: 0,
            unavailable: None,
            started: Instant::now(),
            deadline: None,
            excluded: Duration::ZERO,
            memory: None,
        }
    }

    /// A context for one evaluation of a runtime whose deadline is `deadline`.
    pub(crate) fn for_evaluation(env: &GpuEnv, deadline: Duration) -> Self {
        let mut ctx = Self::new(env.backend.clone(), env.max_device_memory);
        ctx.constants = env.constants.clone();
        ctx.deadline = Some(deadline);
        ctx
    }

    /// Set when a call could not complete for a reason outside the actor (a constant's source is
    /// unreachable): the evaluation must not be recorded, only retried.
    pub fn unavailable(&self) -> Option<&str> {
        self.unavailable.as_deref()
    }

    /// Frees every live tensor and releases every constant.
    pub fn release(&mut self) {
        if self.live.is_empty() {
            return;
        }
        let live = std::mem::take(&mut self.live);
        self.used_bytes = 0;
        self.pinned.clear();
        self.pinned_bytes = 0;
        let (owned, constants): (Vec<Live>, Vec<Live>) = live.into_values().partition(|t| t.pin.is_none());
        // Releasing a pin may evict (which locks the backend): never with the backend locked.
        drop(constants);
        let mut backend = lock_backend(&self.backend);
        for t in owned {
            if let Err(e) = backend.free(t.id) {
                tracing::warn!(tensor = %t.id, error = %e, "cannot free an evaluation's tensor");
            }
        }
    }

    fn get(&self, handle: i32) -> Result<&Live, Fail> {
        u32::try_from(handle).ok().and_then(|h| self.live.get(&h)).ok_or(Fail::Status(GpuStatus::UnknownHandle))
    }

    /// Whether a new tensor of `bytes` fits the quota and the handle limit.
    fn admit(&self, bytes: u64) -> Result<(), Fail> {
        if self.live.len() >= MAX_HANDLES || self.used_bytes.saturating_add(bytes) > self.max_bytes {
            return Err(Fail::Status(GpuStatus::QuotaExceeded));
        }
        Ok(())
    }

    fn insert(&mut self, id: TensorId, meta: Meta, bytes: u64, pin: Option<Pin>) -> u32 {
        let handle = self.next_handle;
        self.next_handle += 1;
        match &pin {
            Some(p) => {
                let entry = self.pinned.entry(p.key().clone()).or_insert((0, p.bytes()));
                if entry.0 == 0 {
                    self.pinned_bytes = self.pinned_bytes.saturating_add(p.bytes());
                }
                entry.0 += 1;
            }
            None => self.used_bytes = self.used_bytes.saturating_add(bytes),
        }
        self.live.insert(handle, Live { id, meta, bytes, pin });
        handle
    }

    /// Removes a handle from the table and gives back its quota; the caller frees the tensor (or
    /// drops the pin) outside the backend lock.
    fn remove(&mut self, handle: i32) -> Result<Live, Fail> {
        let t = u32::try_from(handle).ok().and_then(|h| self.live.remove(&h)).ok_or(Fail::Status(GpuStatus::UnknownHandle))?;
        match &t.pin {
            Some(p) => {
                if let Some(entry) = self.pinned.get_mut(p.key()) {
                    entry.0 = entry.0.saturating_sub(1);
                    if entry.0 == 0 {
                        self.pinned_bytes = self.pinned_bytes.saturating_sub(entry.1);
                        self.pinned.remove(p.key());
                    }
                }
            }
            None => self.used_bytes = self.used_bytes.saturating_sub(t.bytes),
        }
        Ok(t)
    }

    /// The epoch ticks left before the deadline, not counting time spent waiting for constants.
    fn ticks_left(&self) -> Option<u64> {
        let deadline = self.deadline?;
        let spent = self.started.elapsed().saturating_sub(self.excluded);
        let left = deadline.saturating_sub(spent);
        Some(left.as_nanos().div_ceil(super::EPOCH_TICK.as_nanos()) as u64 + 1)
    }
}

impl Drop for GpuCtx {
    fn drop(&mut self) {
        self.release();
    }
}

/// Locks a shared backend, surviving poisoning.
pub(crate) fn lock_backend(backend: &SharedBackend) -> MutexGuard<'_, Backend> {
    // A panic in a backend op leaves no half-updated state that the next op could trip over
    // worse than the error it would report anyway.
    backend.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Why a call did not return `OK`.
#[derive(Debug)]
enum Fail {
    Status(GpuStatus),
    /// Guest abuse: the evaluation traps with this message.
    Trap(String),
    OutOfFuel,
    /// Not the actor's fault (a constant's source is unreachable): the evaluation ends and is
    /// retried later.
    Unavailable(String),
}

impl From<GpuError> for Fail {
    fn from(e: GpuError) -> Self {
        Fail::Status(GpuStatus::from(&e))
    }
}

fn invalid() -> Fail {
    Fail::Status(GpuStatus::InvalidArgument)
}

/// A non-negative i32 parameter as usize, or `INVALID_ARGUMENT`.
fn index(v: i32) -> Result<usize, Fail> {
    usize::try_from(v).map_err(|_| invalid())
}

fn u32_le(bytes: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    if let Some(src) = bytes.get(at..at + 4) {
        b.copy_from_slice(src);
    }
    u32::from_le_bytes(b)
}

fn i32_le(bytes: &[u8], at: usize) -> i32 {
    u32_le(bytes, at) as i32
}

fn f32_le(bytes: &[u8], at: usize) -> f32 {
    f32::from_bits(u32_le(bytes, at))
}

#[cfg(test)]
thread_local! {
    /// `begin_batch` and `end_batch` calls made by `run` on this thread (for the tests).
    pub(crate) static BATCH_CALLS: std::cell::Cell<(u64, u64)> = const { std::cell::Cell::new((0, 0)) };
}

/// One host call: guest memory, the context and the fuel it may charge.
struct Call<'a> {
    name: &'static str,
    mem: &'a mut [u8],
    ctx: &'a mut GpuCtx,
    fuel: u64,
    charged: u64,
    /// Time spent waiting for constants (excluded from the deadline).
    waited: Duration,
}

impl Call<'_> {
    fn charge(&mut self, gas: u64) -> Result<(), Fail> {
        let total = self.charged.saturating_add(gas);
        if total > self.fuel {
            return Err(Fail::OutOfFuel);
        }
        self.charged = total;
        Ok(())
    }

    /// `[ptr, ptr + len)` in memory 0, or a trap.
    fn range(&self, ptr: i32, len: u64, what: &str) -> Result<Range<usize>, Fail> {
        let start = ptr as u32 as u64;
        match start.checked_add(len) {
            Some(end) if end <= self.mem.len() as u64 => Ok(start as usize..end as usize),
            _ => Err(Fail::Trap(format!("ao_gpu.{}: {what} [{start:#x}, +{len}) is outside memory ({} bytes)", self.name, self.mem.len()))),
        }
    }

    fn put_u32(&mut self, r: Range<usize>, value: u32) {
        if let Some(dst) = self.mem.get_mut(r) {
            dst.copy_from_slice(&value.to_le_bytes());
        }
    }

    /// `rank` u32s at `ptr` (rank 1..=4, else `INVALID_ARGUMENT`); the range is checked first.
    fn dims(&self, ptr: i32, rank: i32, what: &str) -> Result<Vec<usize>, Fail> {
        let rank = usize::try_from(rank).ok().filter(|r| (1..=MAX_RANK).contains(r));
        let r = self.range(ptr, rank.unwrap_or(0) as u64 * 4, what)?;
        rank.ok_or_else(invalid)?;
        Ok(self.mem[r].chunks_exact(4).map(|c| u32_le(c, 0) as usize).collect())
    }

    /// Checks, charges (the op's part, on top of the call or command fee) and runs one op on
    /// the operand handles `inputs` (exactly `op.arity()` of them). Returns the output handle: a
    /// new one, the cache's for `append`, 0 for `free`. A freed tensor goes to `freed`, to be
    /// dropped once the backend is unlocked.
    fn exec(&mut self, be: &mut Backend, op: &Op, inputs: &[i32], freed: &mut Vec<Live>) -> Result<u32, Fail> {
        if inputs.len() != op.arity() {
            return Err(invalid());
        }
        match op {
            Op::Free => {
                let t = self.ctx.remove(inputs[0])?;
                if t.pin.is_none() {
                    be.free(t.id)?;
                }
                freed.push(t);
                return Ok(0);
            }
            Op::Append => return self.append(be, inputs[0], inputs[1]),
            _ => {}
        }
        let mut ids = [TensorId(0); CMD_INPUTS];
        let plan = {
            let mut x: [Option<(&Meta, u64)>; CMD_INPUTS] = [None; CMD_INPUTS];
            for (i, &h) in inputs.iter().enumerate() {
                let t = self.ctx.get(h)?;
                ids[i] = t.id;
                x[i] = Some((&t.meta, t.stored()));
            }
            let x: Vec<(&Meta, u64)> = x.into_iter().flatten().collect();
            plan(op, &x)?
        };
        self.ctx.admit(plan.out_bytes)?;
        self.charge(op_gas(plan.bytes, plan.flops))?;
        let id = run_op(be, op, &ids[..inputs.len()])?;
        Ok(self.ctx.insert(id, plan.out, plan.out_bytes, None))
    }

    fn append(&mut self, be: &mut Backend, cache: i32, rows: i32) -> Result<u32, Fail> {
        let handle = u32::try_from(cache).map_err(|_| Fail::Status(GpuStatus::UnknownHandle))?;
        let (c, r) = (self.ctx.get(cache)?, self.ctx.get(rows)?);
        if c.pin.is_some() {
            return Err(Fail::Status(GpuStatus::ReadOnly));
        }
        let (cache_id, rows_id, old_bytes) = (c.id, r.id, c.bytes);
        let plan = plan(&Op::Append, &[(&c.meta, c.bytes), (&r.meta, r.stored())])?;
        let growth = plan.out_bytes.saturating_sub(old_bytes);
        if self.ctx.used_bytes.saturating_add(growth) > self.ctx.max_bytes {
            return Err(Fail::Status(GpuStatus::QuotaExceeded));
        }
        self.charge(op_gas(plan.bytes, plan.flops))?;
        be.append(cache_id, rows_id)?;
        self.ctx.used_bytes = self.ctx.used_bytes.saturating_add(growth);
        if let Some(t) = self.ctx.live.get_mut(&handle) {
            t.meta = plan.out;
            t.bytes = plan.out_bytes;
        }
        Ok(handle)
    }

    /// A single-call op: checks the output pointer, then runs `op` under the backend lock and
    /// writes the new handle.
    fn single(&mut self, out_ptr: Option<i32>, op: Op, inputs: &[i32]) -> Result<(), Fail> {
        let out = out_ptr.map(|p| self.range(p, 4, "out_handle_ptr")).transpose()?;
        self.single_checked(out, op, inputs)
    }

    fn single_checked(&mut self, out: Option<Range<usize>>, op: Op, inputs: &[i32]) -> Result<(), Fail> {
        let backend = self.ctx.backend.clone();
        let mut freed = Vec::new();
        let result = {
            let mut be = lock_backend(&backend);
            self.exec(&mut be, &op, inputs, &mut freed)
        };
        drop(freed);
        let handle = result?;
        if let Some(out) = out {
            self.put_u32(out, handle);
        }
        Ok(())
    }

    fn tensor(&mut self, dtype: i32, data_ptr: i32, byte_len: u64, shape_ptr: i32, rank: i32, out_ptr: i32) -> Result<(), Fail> {
        let shape = self.dims(shape_ptr, rank, "shape_ptr")?;
        let data_r = self.range(data_ptr, byte_len, "data_ptr")?;
        let out = self.range(out_ptr, 4, "out_handle_ptr")?;
        let dtype = DType::from_code(dtype).ok_or_else(invalid)?;
        let bytes = storage(self.name, dtype, &shape)?;
        if bytes != byte_len {
            return Err(Fail::Status(GpuStatus::ShapeMismatch));
        }
        self.ctx.admit(bytes)?;
        self.charge(op_gas(bytes, 0))?;
        let raw = RawTensor::new(dtype, shape, self.mem[data_r].to_vec())?;
        let id = if dtype == DType::F32 {
            // The f32 path every backend has.
            let data = raw.bytes.chunks_exact(4).map(|c| f32_le(c, 0)).collect();
            lock_backend(&self.ctx.backend).upload(&HostTensor { shape: raw.shape.clone(), data })?
        } else {
            lock_backend(&self.ctx.backend).upload_raw(&raw)?
        };
        let handle = self.ctx.insert(id, Meta { shape: raw.shape, dtype }, bytes, None);
        self.put_u32(out, handle);
        Ok(())
    }

    fn read_f32(&mut self, handle: i32, out_ptr: i32, capacity: i32) -> Result<(), Fail> {
        let out = self.range(out_ptr, capacity as u32 as u64 * 4, "out_ptr")?;
        let t = self.ctx.get(handle)?;
        let (id, n) = (t.id, gpu::numel(&t.meta.shape));
        if n > capacity as u32 as usize {
            return Err(Fail::Status(GpuStatus::BufferTooSmall));
        }
        self.charge(op_gas(n as u64 * 4, 0))?;
        let host = lock_backend(&self.ctx.backend).read(id)?;
        if host.data.len() != n {
            return Err(Fail::Status(GpuStatus::DeviceError));
        }
        for (dst, v) in self.mem[out].chunks_exact_mut(4).zip(&host.data) {
            dst.copy_from_slice(&v.to_le_bytes());
        }
        Ok(())
    }

    fn read(&mut self, handle: i32, out_ptr: i32, capacity: i32, len_ptr: i32) -> Result<(), Fail> {
        let out = self.range(out_ptr, capacity as u32 as u64, "out_ptr")?;
        let len_r = self.range(len_ptr, 4, "out_len_ptr")?;
        let t = self.ctx.get(handle)?;
        let (id, bytes) = (t.id, t.stored());
        self.put_u32(len_r, u32::try_from(bytes).unwrap_or(u32::MAX));
        if bytes > out.len() as u64 {
            return Err(Fail::Status(GpuStatus::BufferTooSmall));
        }
        self.charge(op_gas(bytes, 0))?;
        let raw = lock_backend(&self.ctx.backend).read_raw(id)?;
        let dst = self.mem.get_mut(out.start..out.start + raw.bytes.len()).ok_or(Fail::Status(GpuStatus::DeviceError))?;
        if raw.bytes.len() as u64 != bytes {
            return Err(Fail::Status(GpuStatus::DeviceError));
        }
        dst.copy_from_slice(&raw.bytes);
        Ok(())
    }

    fn shape(&mut self, handle: i32, shape_ptr: i32, rank_ptr: i32) -> Result<(), Fail> {
        let shape_r = self.range(shape_ptr, MAX_RANK as u64 * 4, "out_shape_ptr")?;
        let rank_r = self.range(rank_ptr, 4, "out_rank_ptr")?;
        let t = self.ctx.get(handle)?;
        let mut dims = [0u8; MAX_RANK * 4];
        for (dst, d) in dims.chunks_exact_mut(4).zip(&t.meta.shape) {
            dst.copy_from_slice(&(*d as u32).to_le_bytes());
        }
        let rank = t.meta.shape.len();
        // Only the first `rank` entries are written.
        self.mem[shape_r.start..shape_r.start + rank * 4].copy_from_slice(&dims[..rank * 4]);
        self.put_u32(rank_r, rank as u32);
        Ok(())
    }

    fn constant(&mut self, id_ptr: i32, sha_ptr: i32, dtype: i32, shape_ptr: i32, rank: i32, out_ptr: i32) -> Result<(), Fail> {
        let id_r = self.range(id_ptr, 43, "id_ptr")?;
        let sha_r = self.range(sha_ptr, 32, "sha256_ptr")?;
        let shape = self.dims(shape_ptr, rank, "shape_ptr")?;
        let out = self.range(out_ptr, 4, "out_handle_ptr")?;
        let id = std::str::from_utf8(&self.mem[id_r]).ok().and_then(|s| crate::protocol::b64::decode_id(s).ok()).ok_or_else(invalid)?;
        let mut sha256 = [0u8; 32];
        sha256.copy_from_slice(&self.mem[sha_r]);
        let dtype = DType::from_code(dtype).ok_or_else(invalid)?;
        let bytes = storage(self.name, dtype, &shape)?;
        let cache = self.ctx.constants.clone().ok_or(Fail::Status(GpuStatus::Unsupported))?;
        let key = ConstantKey { id, sha256, dtype, shape };
        let more = if self.ctx.pinned.contains_key(&key) { 0 } else { bytes };
        if self.ctx.live.len() >= MAX_HANDLES || self.ctx.pinned_bytes.saturating_add(more) > cache.max_bytes() {
            return Err(Fail::Status(GpuStatus::QuotaExceeded));
        }
        self.charge(op_gas(bytes, 0))?;
        let meta = Meta { shape: key.shape.clone(), dtype };
        let (pin, waited) = match cache.acquire(key, bytes) {
            Ok(got) => got,
            Err(AcquireError::Status(s)) => return Err(Fail::Status(s)),
            Err(AcquireError::Unavailable(reason)) => return Err(Fail::Unavailable(reason)),
        };
        self.waited += waited;
        let handle = self.ctx.insert(pin.tensor(), meta, 0, Some(pin));
        self.put_u32(out, handle);
        Ok(())
    }

    /// `run`: the command list at `cmds_ptr`.
    fn run(&mut self, cmds_ptr: i32, n: i32, done_ptr: i32) -> Result<(), Fail> {
        let n = n as u32 as usize;
        let cmds = self.range(cmds_ptr, n as u64 * CMD_SIZE as u64, "cmds_ptr")?;
        let done = self.range(done_ptr, 4, "out_done_ptr")?;
        let backend = self.ctx.backend.clone();
        let mut freed = Vec::new();
        let mut outs: Vec<u32> = Vec::with_capacity(n);
        let (result, end) = {
            let mut be = lock_backend(&backend);
            be.begin_batch();
            #[cfg(test)]
            BATCH_CALLS.with(|c| c.set((c.get().0 + 1, c.get().1)));
            let mut result = Ok(());
            for i in 0..n {
                let at = cmds.start + i * CMD_SIZE;
                let r = self.charge(GAS_PER_COMMAND).and_then(|()| self.command(&mut be, at, &outs, &mut freed));
                match r {
                    Ok(handle) => {
                        self.put_u32(at + CMD_OUT..at + CMD_OUT + 4, handle);
                        outs.push(handle);
                    }
                    Err(e) => {
                        result = Err(e);
                        break;
                    }
                }
            }
            #[cfg(test)]
            BATCH_CALLS.with(|c| c.set((c.get().0, c.get().1 + 1)));
            (result, be.end_batch())
        };
        drop(freed);
        self.put_u32(done, outs.len() as u32);
        result?;
        end?;
        Ok(())
    }

    /// Decodes and runs the command record at `at`; `outs` are the outputs of the commands before.
    fn command(&mut self, be: &mut Backend, at: usize, outs: &[u32], freed: &mut Vec<Live>) -> Result<u32, Fail> {
        let rec = self.mem.get(at..at + CMD_SIZE).ok_or_else(invalid)?;
        let int = |k: usize| i32_le(rec, CMD_I + 4 * k);
        let float = |k: usize| f32_le(rec, CMD_F + 4 * k);
        if u32_le(rec, CMD_RESERVED) != 0 || u32_le(rec, CMD_RESERVED + 4) != 0 {
            return Err(invalid());
        }
        let list = |count: i32| -> Result<Vec<usize>, Fail> {
            let count = usize::try_from(count).ok().filter(|c| (1..=MAX_RANK).contains(c)).ok_or_else(invalid)?;
            (0..count).map(|k| index(int(1 + k))).collect()
        };
        let op = match i32_le(rec, CMD_OP) {
            op::MATMUL => Op::Matmul { ta: int(0) != 0, tb: int(1) != 0 },
            op::BINARY => Op::Binary(binary_op(int(0)).ok_or_else(invalid)?),
            op::UNARY => Op::Unary(unary_op(int(0)).ok_or_else(invalid)?),
            op::SCALE => Op::Unary(UnaryOp::Scale(float(0))),
            op::SOFTMAX => Op::Softmax,
            op::RMSNORM => Op::Rmsnorm { eps: float(0) },
            op::LAYERNORM => Op::Layernorm { eps: float(0) },
            op::REDUCE => Op::Reduce(reduce_op(int(0)).ok_or_else(invalid)?),
            op::CAST => Op::Cast(DType::from_code(int(0)).ok_or_else(invalid)?),
            op::RESHAPE => Op::Reshape(list(int(0))?),
            op::PERMUTE => Op::Permute(list(int(0))?),
            op::SLICE => Op::Slice { axis: index(int(0))?, start: index(int(1))?, len: index(int(2))? },
            op::CONCAT => Op::Concat { axis: index(int(0))? },
            op::APPEND => Op::Append,
            op::GATHER => Op::Gather,
            op::ROPE => Op::Rope {
                pos0: u32::try_from(int(0)).map_err(|_| invalid())?,
                theta: float(0),
                mode: RopeMode::from_code(int(1)).ok_or_else(invalid)?,
            },
            op::ATTENTION => Op::Attention { pos0: u32::try_from(int(0)).map_err(|_| invalid())?, scale: float(0) },
            op::FREE => Op::Free,
            _ => return Err(invalid()),
        };
        let mut inputs = [0i32; CMD_INPUTS];
        for (k, slot) in inputs.iter_mut().enumerate().take(op.arity()) {
            let v = i32_le(rec, CMD_IN + 4 * k);
            *slot = if v >= 0 {
                v
            } else {
                // AO_GPU_OUT(j) = -(j + 1): the output of an earlier command of this list.
                let j = (-(v as i64) - 1) as usize;
                let h = *outs.get(j).ok_or_else(invalid)?;
                i32::try_from(h).map_err(|_| invalid())?
            };
        }
        self.exec(be, &op, &inputs[..op.arity()], freed)
    }
}

/// Runs one host call: `GAS_PER_CALL`, then `f`; settles the fuel and turns the outcome into a
/// status or a trap.
fn host<T: 'static>(
    caller: &mut Caller<'_, T>,
    get: fn(&mut T) -> &mut GpuCtx,
    name: &'static str,
    f: impl FnOnce(&mut Call<'_>) -> Result<(), Fail>,
) -> wasmtime::Result<i32> {
    let fuel = caller.get_fuel()?;
    // The export is looked up once per evaluation (each evaluation has its own store and context).
    let memory = match get(caller.data_mut()).memory {
        Some(m) => m,
        None => {
            let Some(Extern::Memory(m)) = caller.get_export("memory") else {
                return Err(wasmtime::format_err!("ao_gpu.{name}: the module has no memory export"));
            };
            get(caller.data_mut()).memory = Some(m);
            m
        }
    };
    let (mem, data) = memory.data_and_store_mut(&mut *caller);
    let mut call = Call { name, mem, ctx: get(data), fuel, charged: 0, waited: Duration::ZERO };
    let result = call.charge(GAS_PER_CALL).and_then(|()| f(&mut call));
    let (charged, waited) = (call.charged, call.waited);
    if !waited.is_zero() {
        // Time spent fetching constants is not the actor's: move the deadline by it.
        let ctx = get(caller.data_mut());
        ctx.excluded += waited;
        if let Some(ticks) = ctx.ticks_left() {
            caller.as_context_mut().set_epoch_deadline(ticks);
        }
    }
    // `charged <= fuel` always (`Call::charge`), and out of fuel leaves none.
    caller.set_fuel(if matches!(result, Err(Fail::OutOfFuel)) { 0 } else { fuel - charged })?;
    match result {
        Ok(()) => Ok(GpuStatus::Ok.code()),
        Err(Fail::Status(s)) => Ok(s.code()),
        Err(Fail::Trap(msg)) => Err(wasmtime::format_err!("{msg}")),
        Err(Fail::OutOfFuel) => Err(wasmtime::Error::new(Trap::OutOfFuel)),
        Err(Fail::Unavailable(reason)) => {
            let text = format!("ao_gpu.{name}: {reason}");
            get(caller.data_mut()).unavailable = Some(text.clone());
            Err(wasmtime::format_err!("{text}"))
        }
    }
}

/// Links `ao_gpu` into `linker`; `get` finds the per-evaluation context in the store's data.
pub fn add_to_linker<T: 'static>(linker: &mut Linker<T>, get: fn(&mut T) -> &mut GpuCtx) -> wasmtime::Result<()> {
    linker.func_wrap(MODULE, "tensor_f32", move |mut c: Caller<'_, T>, data: i32, len: i32, shape: i32, rank: i32, out: i32| {
        host(&mut c, get, "tensor_f32", |call| call.tensor(DType::F32.code(), data, len as u32 as u64 * 4, shape, rank, out))
    })?;
    linker.func_wrap(MODULE, "read_f32", move |mut c: Caller<'_, T>, h: i32, out: i32, capacity: i32| {
        host(&mut c, get, "read_f32", |call| call.read_f32(h, out, capacity))
    })?;
    linker.func_wrap(MODULE, "shape", move |mut c: Caller<'_, T>, h: i32, shape: i32, rank: i32| {
        host(&mut c, get, "shape", |call| call.shape(h, shape, rank))
    })?;
    linker.func_wrap(MODULE, "free", move |mut c: Caller<'_, T>, h: i32| {
        host(&mut c, get, "free", |call| call.single(None, Op::Free, &[h]))
    })?;
    linker.func_wrap(MODULE, "matmul", move |mut c: Caller<'_, T>, a: i32, b: i32, ta: i32, tb: i32, out: i32| {
        host(&mut c, get, "matmul", |call| call.single(Some(out), Op::Matmul { ta: ta != 0, tb: tb != 0 }, &[a, b]))
    })?;
    linker.func_wrap(MODULE, "binary", move |mut c: Caller<'_, T>, op: i32, a: i32, b: i32, out: i32| {
        host(&mut c, get, "binary", |call| {
            let out = call.range(out, 4, "out_handle_ptr")?;
            call.single_checked(Some(out), Op::Binary(binary_op(op).ok_or_else(invalid)?), &[a, b])
        })
    })?;
    linker.func_wrap(MODULE, "unary", move |mut c: Caller<'_, T>, op: i32, x: i32, out: i32| {
        host(&mut c, get, "unary", |call| {
            let out = call.range(out, 4, "out_handle_ptr")?;
            call.single_checked(Some(out), Op::Unary(unary_op(op).ok_or_else(invalid)?), &[x])
        })
    })?;
    linker.func_wrap(MODULE, "scale", move |mut c: Caller<'_, T>, x: i32, factor: f32, out: i32| {
        host(&mut c, get, "scale", |call| call.single(Some(out), Op::Unary(UnaryOp::Scale(factor)), &[x]))
    })?;
    linker.func_wrap(MODULE, "softmax", move |mut c: Caller<'_, T>, x: i32, out: i32| {
        host(&mut c, get, "softmax", |call| call.single(Some(out), Op::Softmax, &[x]))
    })?;
    linker.func_wrap(MODULE, "rmsnorm", move |mut c: Caller<'_, T>, x: i32, w: i32, eps: f32, out: i32| {
        host(&mut c, get, "rmsnorm", |call| call.single(Some(out), Op::Rmsnorm { eps }, &[x, w]))
    })?;
    linker.func_wrap(MODULE, "layernorm", move |mut c: Caller<'_, T>, x: i32, w: i32, b: i32, eps: f32, out: i32| {
        host(&mut c, get, "layernorm", |call| call.single(Some(out), Op::Layernorm { eps }, &[x, w, b]))
    })?;
    linker.func_wrap(MODULE, "reduce", move |mut c: Caller<'_, T>, op: i32, x: i32, out: i32| {
        host(&mut c, get, "reduce", |call| {
            let out = call.range(out, 4, "out_handle_ptr")?;
            call.single_checked(Some(out), Op::Reduce(reduce_op(op).ok_or_else(invalid)?), &[x])
        })
    })?;
    linker.func_wrap(
        MODULE,
        "tensor",
        move |mut c: Caller<'_, T>, dtype: i32, data: i32, byte_len: i32, shape: i32, rank: i32, out: i32| {
            host(&mut c, get, "tensor", |call| call.tensor(dtype, data, byte_len as u32 as u64, shape, rank, out))
        },
    )?;
    linker.func_wrap(MODULE, "read", move |mut c: Caller<'_, T>, h: i32, out: i32, capacity: i32, len: i32| {
        host(&mut c, get, "read", |call| call.read(h, out, capacity, len))
    })?;
    linker.func_wrap(MODULE, "dtype", move |mut c: Caller<'_, T>, h: i32| {
        // The code itself on success (>= 0), else a negative status.
        let mut code = 0;
        let status = host(&mut c, get, "dtype", |call| {
            code = call.ctx.get(h)?.meta.dtype.code();
            Ok(())
        })?;
        Ok(if status == GpuStatus::Ok.code() { code } else { status })
    })?;
    linker.func_wrap(MODULE, "cast", move |mut c: Caller<'_, T>, x: i32, dtype: i32, out: i32| {
        host(&mut c, get, "cast", |call| {
            let out = call.range(out, 4, "out_handle_ptr")?;
            call.single_checked(Some(out), Op::Cast(DType::from_code(dtype).ok_or_else(invalid)?), &[x])
        })
    })?;
    linker.func_wrap(MODULE, "reshape", move |mut c: Caller<'_, T>, x: i32, shape: i32, rank: i32, out: i32| {
        host(&mut c, get, "reshape", |call| {
            let out = call.range(out, 4, "out_handle_ptr")?;
            let shape = call.dims(shape, rank, "shape_ptr")?;
            call.single_checked(Some(out), Op::Reshape(shape), &[x])
        })
    })?;
    linker.func_wrap(MODULE, "permute", move |mut c: Caller<'_, T>, x: i32, axes: i32, rank: i32, out: i32| {
        host(&mut c, get, "permute", |call| {
            let out = call.range(out, 4, "out_handle_ptr")?;
            let axes = call.dims(axes, rank, "axes_ptr")?;
            call.single_checked(Some(out), Op::Permute(axes), &[x])
        })
    })?;
    linker.func_wrap(MODULE, "slice", move |mut c: Caller<'_, T>, x: i32, axis: i32, start: i32, len: i32, out: i32| {
        host(&mut c, get, "slice", |call| {
            let out = call.range(out, 4, "out_handle_ptr")?;
            let op = Op::Slice { axis: index(axis)?, start: index(start)?, len: index(len)? };
            call.single_checked(Some(out), op, &[x])
        })
    })?;
    linker.func_wrap(MODULE, "concat", move |mut c: Caller<'_, T>, a: i32, b: i32, axis: i32, out: i32| {
        host(&mut c, get, "concat", |call| {
            let out = call.range(out, 4, "out_handle_ptr")?;
            call.single_checked(Some(out), Op::Concat { axis: index(axis)? }, &[a, b])
        })
    })?;
    linker.func_wrap(MODULE, "append", move |mut c: Caller<'_, T>, cache: i32, rows: i32| {
        host(&mut c, get, "append", |call| call.single(None, Op::Append, &[cache, rows]))
    })?;
    linker.func_wrap(MODULE, "gather", move |mut c: Caller<'_, T>, table: i32, ids: i32, out: i32| {
        host(&mut c, get, "gather", |call| call.single(Some(out), Op::Gather, &[table, ids]))
    })?;
    linker.func_wrap(MODULE, "rope", move |mut c: Caller<'_, T>, x: i32, pos0: i32, theta: f32, mode: i32, out: i32| {
        host(&mut c, get, "rope", |call| {
            let out = call.range(out, 4, "out_handle_ptr")?;
            let pos0 = u32::try_from(pos0).map_err(|_| invalid())?;
            let mode = RopeMode::from_code(mode).ok_or_else(invalid)?;
            call.single_checked(Some(out), Op::Rope { pos0, theta, mode }, &[x])
        })
    })?;
    linker.func_wrap(MODULE, "attention", move |mut c: Caller<'_, T>, q: i32, k: i32, v: i32, pos0: i32, scale: f32, out: i32| {
        host(&mut c, get, "attention", |call| {
            let out = call.range(out, 4, "out_handle_ptr")?;
            let pos0 = u32::try_from(pos0).map_err(|_| invalid())?;
            call.single_checked(Some(out), Op::Attention { pos0, scale }, &[q, k, v])
        })
    })?;
    linker.func_wrap(MODULE, "run", move |mut c: Caller<'_, T>, cmds: i32, n: i32, done: i32| {
        host(&mut c, get, "run", |call| call.run(cmds, n, done))
    })?;
    linker.func_wrap(MODULE, "constant", move |mut c: Caller<'_, T>, id: i32, sha: i32, dtype: i32, shape: i32, rank: i32, out: i32| {
        host(&mut c, get, "constant", |call| call.constant(id, sha, dtype, shape, rank, out))
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_codes_round_trip() {
        for s in GpuStatus::ALL {
            assert_eq!(GpuStatus::from_code(s.code()), Some(s));
        }
        assert_eq!(GpuStatus::from_code(1), None);
        assert_eq!(GpuStatus::QuotaExceeded.code(), -4);
        assert_eq!(GpuStatus::DtypeMismatch.code(), -9);
        assert_eq!(GpuStatus::from(&GpuError::DType { op: "x", details: String::new() }), GpuStatus::DtypeMismatch);
        // Codes are dense: 0 down to the last one.
        let mut codes: Vec<i32> = GpuStatus::ALL.iter().map(|s| s.code()).collect();
        codes.sort_unstable();
        assert_eq!(codes, (-12..=0).collect::<Vec<_>>());
    }

    #[test]
    fn gas_formula() {
        assert_eq!(gas(0, 0), GAS_PER_CALL);
        assert_eq!(gas(5, 3), GAS_PER_CALL + 2 + 2);
        assert_eq!(flops(Flops::Matmul { batch: 2, m: 3, n: 4, k: 5 }), 240);
        assert_eq!(flops(Flops::Elementwise { elements: 10, per_element: 8 }), 80);
        // No overflow on absurd inputs.
        assert_eq!(gas(u64::MAX, 0), GAS_PER_CALL + u64::MAX.div_ceil(4));
        assert!(gas(u64::MAX, u64::MAX) >= u64::MAX / 2);
    }

    /// The pair count by brute force over (query, key) pairs, against the closed form.
    #[test]
    fn attention_pairs_count_causal_keys() {
        for tq in 0..7usize {
            for tk in 0..9usize {
                for pos0 in 0..12u32 {
                    let brute = (0..tq).map(|i| (0..tk).filter(|&j| j <= pos0 as usize + i).count() as u128).sum::<u128>();
                    assert_eq!(attended_pairs(tq, tk, pos0), brute, "tq {tq} tk {tk} pos0 {pos0}");
                }
            }
        }
        // 2 batches x 3 heads, one query at position 4 over 5 keys of dim 8: 5 pairs x (32 + 8).
        assert_eq!(flops(Flops::Attention { batch: 2, heads: 3, tq: 1, tk: 5, dim: 8, pos0: 4 }), 6 * 5 * 40);
        assert_eq!(
            flops(Flops::Attention { batch: usize::MAX, heads: usize::MAX, tq: 1 << 30, tk: 1 << 30, dim: 1 << 20, pos0: 0 }),
            u64::MAX
        );
    }

    #[test]
    fn plans_check_dtypes_and_count_bytes() {
        let m = |shape: &[usize], dtype| Meta { shape: shape.to_vec(), dtype };
        let f = |shape: &[usize]| m(shape, DType::F32);
        let w = m(&[64, 32], DType::Q4_1);
        let x = f(&[3, 32]);
        // Quantized weight, transposed: [3, 32] @ [64, 32]^T.
        let p = plan(&Op::Matmul { ta: false, tb: true }, &[(&x, 384), (&w, 64 * 20)]).unwrap();
        assert_eq!((p.out.shape.clone(), p.out.dtype, p.out_bytes), (vec![3, 64], DType::F32, 3 * 64 * 4));
        assert_eq!((p.bytes, p.flops), (384 + 1280 + 768, 2 * 3 * 64 * 32));
        // Dtype errors.
        let ids = m(&[5], DType::I32);
        let err = |r: gpu::Result<Plan>| GpuStatus::from(&r.unwrap_err());
        assert_eq!(err(plan(&Op::Matmul { ta: false, tb: false }, &[(&w, 1280), (&x, 384)])), GpuStatus::DtypeMismatch);
        assert_eq!(err(plan(&Op::Softmax, &[(&ids, 20)])), GpuStatus::DtypeMismatch);
        assert_eq!(err(plan(&Op::Permute(vec![1, 0]), &[(&w, 1280)])), GpuStatus::DtypeMismatch);
        assert_eq!(err(plan(&Op::Cast(DType::Q8_0), &[(&ids, 20)])), GpuStatus::DtypeMismatch);
        assert_eq!(err(plan(&Op::Gather, &[(&w, 1280), (&x, 384)])), GpuStatus::DtypeMismatch);
        assert_eq!(err(plan(&Op::Reshape(vec![128, 16]), &[(&w, 1280)])), GpuStatus::DtypeMismatch, "blocks must stay whole");
        assert_eq!(err(plan(&Op::Reshape(vec![7]), &[(&ids, 20)])), GpuStatus::ShapeMismatch);
        // Gather reads only the looked-up rows: 5 ids (20 bytes) + 5 rows of 20 bytes + the [5, 32] output.
        let p = plan(&Op::Gather, &[(&w, 1280), (&ids, 20)]).unwrap();
        assert_eq!((p.out.shape.clone(), p.bytes, p.flops), (vec![5, 32], 20 + 5 * 20 + 5 * 32 * 4, 5 * 32));
        // Append charges twice the rows, the quota follows the new size.
        let cache = f(&[4, 2, 8]);
        let rows = f(&[1, 2, 8]);
        let p = plan(&Op::Append, &[(&cache, 256), (&rows, 64)]).unwrap();
        assert_eq!((p.out.shape.clone(), p.out_bytes, p.bytes), (vec![5, 2, 8], 320, 128));
        assert!(castable(DType::Q4_0, DType::F32) && castable(DType::F32, DType::Q8_0) && !castable(DType::F16, DType::I32));
    }
}

//! The `ao_gpu` ABI, mirrored by include/ao_gpu.h: the status codes and how tensor-layer errors
//! map to them, the op, dtype and rope-mode codes, the `run` command record layout, and `Fail`,
//! the one outcome type of a host call. (The function table is `super::FUNCTIONS`, generated with
//! the linker entries from one list.)

use crate::gpu::{BinaryOp, DType, GpuError, ReduceOp, RopeMode, UnaryOp};

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

/// `binary` op codes.
pub fn binary_op(code: i32) -> Option<BinaryOp> {
    Some(match code {
        0 => BinaryOp::Add,
        1 => BinaryOp::Sub,
        2 => BinaryOp::Mul,
        3 => BinaryOp::Div,
        _ => return None,
    })
}

/// `unary` op codes.
pub fn unary_op(code: i32) -> Option<UnaryOp> {
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
pub fn reduce_op(code: i32) -> Option<ReduceOp> {
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

/// Dtype codes: f32 0, f16 1, i32 2, q8_0 3, q4_0 4, q4_1 5 ([`DType::code`], which the WGSL
/// kernels share as their `DT` parameter).
pub fn dtype(code: i32) -> Option<DType> {
    DType::from_code(code)
}

/// Rope-mode codes: 0 interleaved, 2 neox (GGML's numbering, [`RopeMode::ggml_code`]).
pub fn rope_mode(code: i32) -> Option<RopeMode> {
    match code {
        0 => Some(RopeMode::Interleaved),
        2 => Some(RopeMode::Neox),
        _ => None,
    }
}

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

/// Why a call did not return `OK`.
#[derive(Debug)]
pub(super) enum Fail {
    Status(GpuStatus),
    /// Guest abuse: the evaluation traps with this message.
    Trap(String),
    OutOfFuel,
    /// Not the actor's fault (a constant's source is unreachable): the evaluation ends and is
    /// retried later.
    Unavailable(String),
    /// The evaluation's wall-clock deadline passed (between the commands of a list, or while
    /// waiting for the device): the evaluation ends as a timeout.
    Deadline,
}

impl From<GpuError> for Fail {
    fn from(e: GpuError) -> Self {
        Fail::Status(GpuStatus::from(&e))
    }
}

pub(super) fn invalid() -> Fail {
    Fail::Status(GpuStatus::InvalidArgument)
}

/// A non-negative i32 parameter as usize, or `INVALID_ARGUMENT`.
pub(super) fn index(v: i32) -> Result<usize, Fail> {
    usize::try_from(v).map_err(|_| invalid())
}

impl From<super::constants::AcquireError> for Fail {
    fn from(e: super::constants::AcquireError) -> Self {
        use super::constants::AcquireError;
        match e {
            AcquireError::NotFound => Fail::Status(GpuStatus::NotFound),
            AcquireError::Mismatch => Fail::Status(GpuStatus::ConstantMismatch),
            AcquireError::Tensor(e) => Fail::Status(GpuStatus::from(&e)),
            AcquireError::Unavailable(reason) => Fail::Unavailable(reason),
        }
    }
}

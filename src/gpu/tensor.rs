//! The small vocabulary every floor of `gpu` shares: errors, tensor handles, the determinism mode
//! and the backend kinds. Imports nothing else of `gpu`.

use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasherDefault, Hasher};

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

/// Hashes a [`TensorId`] with one multiplication (Fibonacci hashing). Ids are issued in sequence by
/// the backend that owns the map, never chosen by a caller, so SipHash's resistance to chosen keys
/// buys nothing, and a backend looks its operands up on every op.
#[derive(Debug, Default, Clone, Copy)]
pub struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0 ^ n).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

/// A backend's tensors by id.
pub type IdMap<V> = HashMap<TensorId, V, BuildHasherDefault<IdHasher>>;

/// The most dimensions a tensor may have.
pub const MAX_RANK: usize = 4;

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

//! Tensor offload: device-resident tensors behind one closed [`Backend`] enum (CPU, wgpu, CUDA).
//!
//! A tensor is a [`TensorId`] handle to data that stays on the backend's device between calls; only
//! [`TensorBackend::read`] copies it back to the host. Every op takes handles and returns a new handle.
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
//! Rooms: [`tensor`] (errors, ids, modes), [`dtype`] and [`quant`] (element types, the GGUF
//! blocks and host tensors), [`shape`] (shape checks and kernel geometry), [`op`] (the op vocabulary, its
//! checks and costs), [`backend`] (the contract, the one checked dispatch [`TensorOps::run`] and
//! the closed [`Backend`] set), [`repro`] (portable math: how reproducible mode is bitwise across
//! devices), [`kernels`] (every WGSL and CUDA source with its determinism class), the backends
//! [`cpu`], [`wgpu`] and [`cuda`], and [`pool`] (every device of the serving kind, placement).

pub mod backend;
pub mod cpu;
pub mod dtype;
pub mod kernels;
pub mod op;
pub mod pool;
pub mod quant;
pub mod repro;
pub mod shape;
pub mod tensor;
pub mod wgpu;

// `cfg` on the module definitions, not on their uses: both files expose the same `CudaBackend`.
#[cfg(feature = "cuda")]
pub mod cuda;
#[cfg(not(feature = "cuda"))]
#[path = "cuda_disabled.rs"]
pub mod cuda;

pub use backend::{Backend, TensorBackend, TensorOps, select};
pub use dtype::{DType, HostTensor, QK, RawTensor};
pub use kernels::KernelClass;
pub use op::{BinaryOp, Flops, Meta, Op, Plan, Planned, ReduceOp, RopeMode, UnaryOp, flops};
pub use repro::{repro_exp, repro_exp_full, repro_gelu, repro_silu, repro_tanh};
pub use shape::rope_table;
pub use tensor::{BackendKind, DEFAULT_ORDER, Determinism, GpuError, MAX_RANK, Result, TensorId};

//! The `ao_gpu` host module: tensor operations for actors, on the runtime's tensor backend.
//!
//! A tensor is a small positive integer handle, valid for one evaluation, that maps to a backend
//! [`TensorId`](crate::gpu::TensorId) with its shape and [`DType`](crate::gpu::DType); the data stays on the device between calls and only
//! `read` / `read_f32` copy it back into Wasm memory. Every tensor an evaluation created is freed
//! when the evaluation ends, whether it succeeded or failed ([`GpuCtx`]'s `Drop`). Constants
//! (`constant`: an item id plus the sha256 of its data) are the exception: their device tensors
//! live in the runtime's [`ConstantCache`], shared across evaluations and actors; a handle to one
//! is read-only and freeing it releases only the handle.
//!
//! This module is a binding in the shape of wasmtime's wasi-nn: decode the guest's arguments,
//! delegate to `gpu` (which plans, checks and runs every op: [`crate::gpu::op`]), map the outcome.
//! Rooms: [`abi`] (status, op, dtype and rope codes, the command record, `Fail`), `handles` (the
//! per-evaluation handle table and quota), `call` (memory ranges, fuel, the calls and the `call::host`
//! trampoline), [`constants`] (the content-addressed constant cache); the function table and the
//! linker entries are generated here from one list ([`FUNCTIONS`], [`add_to_linker`]).
//!
//! Errors: misuse the guest can handle (bad op or dtype code, shape or dtype mismatch, unknown or
//! freed handle, device-memory quota, device out of memory, too small a read buffer, a constant
//! that is missing or does not match its digest) returns a negative [`GpuStatus`] and leaves the
//! worker healthy; a pointer range outside memory 0 traps; never a host panic. Pointer checks come
//! first, so a trapping call has no effect. A constant whose source is unreachable ends the
//! evaluation with [`crate::runtime::EvalError::Unavailable`]: not the actor's fault, retried later.
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

pub mod abi;
mod call;
pub mod constants;
mod handles;
mod trace;

use std::sync::Arc;

use wasmtime::{Caller, Linker};

pub use self::abi::{CMD_F, CMD_FLOATS, CMD_I, CMD_IN, CMD_INPUTS, CMD_INTS, CMD_OP, CMD_OUT, CMD_RESERVED, CMD_SIZE, GpuStatus, op};
use self::abi::{index, invalid};
#[cfg(test)]
pub(crate) use self::call::BATCH_CALLS;
use self::call::{Command, host};
use self::constants::ConstantCache;
pub use self::handles::GpuCtx;
pub(crate) use self::handles::GpuEnv;
use crate::gpu::pool::SharedDevice;
use crate::gpu::{DType, Op, UnaryOp};

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
/// Bytes moved per unit of fuel (the pricing of a plan: `gpu::Plan::bytes`).
pub const BYTES_PER_GAS: u64 = 4;
/// FLOPs per unit of fuel (`gpu::Plan::flops`).
pub const FLOPS_PER_GAS: u64 = 2;

/// The `ao_gpu` settings of a runtime, chosen by whoever creates it.
#[derive(Debug, Clone)]
pub struct GpuConfig {
    /// The backend `ao_gpu` runs on; `None` means the constant cache's backend when there is one,
    /// else a fresh CPU backend in reproducible mode (the runtime reports which backend it uses,
    /// see `Runtime::tensor_backend`).
    pub backend: Option<SharedDevice>,
    /// Cap on the bytes of live tensors per evaluation (beyond: `QUOTA_EXCEEDED`).
    pub max_device_memory: u64,
    /// Constants loaded by content (`constant`): the cache, with the [`ConstantSource`](constants::ConstantSource)
    /// it fetches from and its byte cap. Runtimes given the same `Arc` share it; it must be made
    /// for the same backend. `None`: `constant` answers `UNSUPPORTED`.
    pub constants: Option<Arc<ConstantCache>>,
}

impl Default for GpuConfig {
    fn default() -> Self {
        Self { backend: None, max_device_memory: DEFAULT_MAX_DEVICE_MEMORY, constants: None }
    }
}

/// The fuel an op costs as a single call: `GAS_PER_CALL + ceil(bytes / 4) + ceil(flops / 2)`.
pub fn gas(bytes: u64, flops: u64) -> u64 {
    GAS_PER_CALL.saturating_add(op_gas(bytes, flops))
}

/// The op's part of the fuel, on top of `GAS_PER_CALL` or `GAS_PER_COMMAND`.
pub(super) fn op_gas(bytes: u64, flops: u64) -> u64 {
    bytes.div_ceil(BYTES_PER_GAS).saturating_add(flops.div_ceil(FLOPS_PER_GAS))
}

/// The `ao_gpu` functions, each with its parameters and its call: [`FUNCTIONS`] and
/// [`add_to_linker`] are generated from this one list, so they cannot disagree.
macro_rules! functions {
    ($($name:literal ($($arg:ident: $ty:ident),*) => |$call:ident| $body:expr;)*) => {
        /// Every linked function with its signature as rendered by the import check at load, which
        /// refuses anything else.
        pub const FUNCTIONS: &[(&str, &str)] = &[$(($name, concat!("(", stringify!($($ty),*), ") -> i32"))),*];

        /// Links `ao_gpu` into `linker`; `get` finds the per-evaluation context in the store's data.
        pub fn add_to_linker<T: 'static>(linker: &mut Linker<T>, get: fn(&mut T) -> &mut GpuCtx) -> wasmtime::Result<()> {
            $(
                linker.func_wrap(MODULE, $name, move |mut c: Caller<'_, T>, $($arg: $ty),*| {
                    host(&mut c, get, $name, |$call| $body)
                })?;
            )*
            Ok(())
        }
    };
}

functions! {
    "tensor_f32" (data: i32, len: i32, shape: i32, rank: i32, out: i32) =>
        |call| call.tensor(DType::F32.code(), data, len as u32 as u64 * 4, shape, rank, out);
    "read_f32" (h: i32, out: i32, capacity: i32) => |call| call.read_f32(h, out, capacity);
    "shape" (h: i32, shape: i32, rank: i32) => |call| call.shape(h, shape, rank);
    "free" (h: i32) => |call| call.single(None, Command::Free, &[h]);
    "matmul" (a: i32, b: i32, ta: i32, tb: i32, out: i32) =>
        |call| call.single(Some(out), Command::Op(Op::Matmul { transpose_a: ta != 0, transpose_b: tb != 0 }), &[a, b]);
    "binary" (op: i32, a: i32, b: i32, out: i32) => |call| {
        let out = call.range(out, 4, "out_handle_ptr")?;
        call.single_checked(Some(out), Command::Op(Op::Binary(abi::binary_op(op).ok_or_else(invalid)?)), &[a, b])
    };
    "unary" (op: i32, x: i32, out: i32) => |call| {
        let out = call.range(out, 4, "out_handle_ptr")?;
        call.single_checked(Some(out), Command::Op(Op::Unary(abi::unary_op(op).ok_or_else(invalid)?)), &[x])
    };
    "scale" (x: i32, factor: f32, out: i32) => |call| call.single(Some(out), Command::Op(Op::Unary(UnaryOp::Scale(factor))), &[x]);
    "softmax" (x: i32, out: i32) => |call| call.single(Some(out), Command::Op(Op::Softmax), &[x]);
    "rmsnorm" (x: i32, w: i32, eps: f32, out: i32) => |call| call.single(Some(out), Command::Op(Op::Rmsnorm { eps }), &[x, w]);
    "layernorm" (x: i32, w: i32, b: i32, eps: f32, out: i32) =>
        |call| call.single(Some(out), Command::Op(Op::Layernorm { eps }), &[x, w, b]);
    "reduce" (op: i32, x: i32, out: i32) => |call| {
        let out = call.range(out, 4, "out_handle_ptr")?;
        call.single_checked(Some(out), Command::Op(Op::Reduce(abi::reduce_op(op).ok_or_else(invalid)?)), &[x])
    };
    "tensor" (dtype: i32, data: i32, byte_len: i32, shape: i32, rank: i32, out: i32) =>
        |call| call.tensor(dtype, data, byte_len as u32 as u64, shape, rank, out);
    "read" (h: i32, out: i32, capacity: i32, len: i32) => |call| call.read(h, out, capacity, len);
    // The code itself on success (>= 0), else a negative status.
    "dtype" (h: i32) => |call| call.dtype(h);
    "cast" (x: i32, dtype: i32, out: i32) => |call| {
        let out = call.range(out, 4, "out_handle_ptr")?;
        call.single_checked(Some(out), Command::Op(Op::Cast(abi::dtype(dtype).ok_or_else(invalid)?)), &[x])
    };
    "reshape" (x: i32, shape: i32, rank: i32, out: i32) => |call| {
        let out = call.range(out, 4, "out_handle_ptr")?;
        let shape = call.dims(shape, rank, "shape_ptr")?;
        call.single_checked(Some(out), Command::Op(Op::Reshape(shape)), &[x])
    };
    "permute" (x: i32, axes: i32, rank: i32, out: i32) => |call| {
        let out = call.range(out, 4, "out_handle_ptr")?;
        let axes = call.dims(axes, rank, "axes_ptr")?;
        call.single_checked(Some(out), Command::Op(Op::Permute(axes)), &[x])
    };
    "slice" (x: i32, axis: i32, start: i32, len: i32, out: i32) => |call| {
        let out = call.range(out, 4, "out_handle_ptr")?;
        let op = Op::Slice { axis: index(axis)?, start: index(start)?, len: index(len)? };
        call.single_checked(Some(out), Command::Op(op), &[x])
    };
    "concat" (a: i32, b: i32, axis: i32, out: i32) => |call| {
        let out = call.range(out, 4, "out_handle_ptr")?;
        call.single_checked(Some(out), Command::Op(Op::Concat { axis: index(axis)? }), &[a, b])
    };
    "append" (cache: i32, rows: i32) => |call| call.single(None, Command::Op(Op::Append), &[cache, rows]);
    "gather" (table: i32, ids: i32, out: i32) => |call| call.single(Some(out), Command::Op(Op::Gather), &[table, ids]);
    "rope" (x: i32, pos0: i32, theta: f32, mode: i32, out: i32) => |call| {
        let out = call.range(out, 4, "out_handle_ptr")?;
        let pos0 = u32::try_from(pos0).map_err(|_| invalid())?;
        let mode = abi::rope_mode(mode).ok_or_else(invalid)?;
        call.single_checked(Some(out), Command::Op(Op::Rope { pos0, theta, mode }), &[x])
    };
    "attention" (q: i32, k: i32, v: i32, pos0: i32, scale: f32, out: i32) => |call| {
        let out = call.range(out, 4, "out_handle_ptr")?;
        let pos0 = u32::try_from(pos0).map_err(|_| invalid())?;
        call.single_checked(Some(out), Command::Op(Op::Attention { pos0, scale }), &[q, k, v])
    };
    "run" (cmds: i32, n: i32, done: i32) => |call| call.batch(cmds, n, done);
    "constant" (id: i32, sha: i32, dtype: i32, shape: i32, rank: i32, out: i32) => |call| call.constant(id, sha, dtype, shape, rank, out);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::{Flops, GpuError, flops};

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
}

//! The `ao_gpu` host module: tensor operations for actors, on the runtime's tensor backend.
//!
//! A tensor is a small positive integer handle, valid for one evaluation, that maps to a backend
//! [`TensorId`]; the data stays on the device between calls and only `read_f32` copies it back into
//! Wasm memory. Every tensor an evaluation created is freed when the evaluation ends, whether it
//! succeeded or failed ([`GpuCtx`]'s `Drop`).
//!
//! Errors: misuse the guest can handle (bad op code, shape mismatch, unknown or freed handle,
//! device-memory quota, device out of memory, too small a read buffer) returns a negative
//! [`GpuStatus`] and leaves the worker healthy; a pointer range outside memory 0 traps; never a
//! host panic. Pointer checks come first, so a trapping call has no effect.
//!
//! Gas: before an op runs, it is charged, deterministically from shapes alone,
//! `GAS_PER_CALL + ceil(bytes / 4) + ceil(flops / 2)` fuel, where `bytes` is the size of every input
//! tensor plus the output (the upload or the read for `tensor_f32` / `read_f32`) and `flops` is
//! [`flops`] of the op. The fuel comes out of the same budget as the guest's instructions (so it is
//! part of `GasUsed` and bounded by `Compute-Limit`); when it does not suffice the call traps as out
//! of fuel before anything runs. Calls that return an error status, `shape` and `free` cost
//! `GAS_PER_CALL` only.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard};

use wasmtime::{Caller, Extern, Linker, Trap};

use crate::gpu::{self, Backend, BinaryOp, GpuError, HostTensor, MAX_RANK, ReduceOp, TensorId, UnaryOp};

/// The import module name.
pub const MODULE: &str = "ao_gpu";

/// Default cap on the bytes of live tensors one evaluation may hold.
pub const DEFAULT_MAX_DEVICE_MEMORY: u64 = 256 << 20;
/// Most live handles one evaluation may hold (beyond: `QUOTA_EXCEEDED`).
pub const MAX_HANDLES: usize = 4096;

/// Fuel every `ao_gpu` call costs.
pub const GAS_PER_CALL: u64 = 100;
/// Bytes moved per unit of fuel.
pub const BYTES_PER_GAS: u64 = 4;
/// FLOPs per unit of fuel.
pub const FLOPS_PER_GAS: u64 = 2;

/// A tensor backend shared by every evaluation of a runtime.
pub type SharedBackend = Arc<Mutex<Backend>>;

/// The `ao_gpu` settings of a runtime, chosen by whoever creates it.
#[derive(Debug, Clone)]
pub struct GpuConfig {
    /// The backend `ao_gpu` runs on; `None` means a fresh CPU backend in reproducible mode (the
    /// runtime reports which backend it uses, see `Runtime::tensor_backend`).
    pub backend: Option<SharedBackend>,
    /// Cap on the bytes of live tensors per evaluation (beyond: `QUOTA_EXCEEDED`).
    pub max_device_memory: u64,
}

impl Default for GpuConfig {
    fn default() -> Self {
        Self { backend: None, max_device_memory: DEFAULT_MAX_DEVICE_MEMORY }
    }
}

/// What an `ao_gpu` call returns (also in include/ao_gpu.h).
#[repr(i32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GpuStatus {
    Ok = 0,
    /// An op code, rank or length outside what the function accepts.
    InvalidArgument = -1,
    ShapeMismatch = -2,
    /// Never issued in this evaluation, or already freed.
    UnknownHandle = -3,
    /// The evaluation's device-memory quota or handle limit would be exceeded.
    QuotaExceeded = -4,
    DeviceOutOfMemory = -5,
    /// `read_f32`'s capacity is smaller than the tensor.
    BufferTooSmall = -6,
    /// The backend does not implement the op.
    Unsupported = -7,
    DeviceError = -8,
}

impl GpuStatus {
    pub const ALL: [GpuStatus; 9] = [
        GpuStatus::Ok,
        GpuStatus::InvalidArgument,
        GpuStatus::ShapeMismatch,
        GpuStatus::UnknownHandle,
        GpuStatus::QuotaExceeded,
        GpuStatus::DeviceOutOfMemory,
        GpuStatus::BufferTooSmall,
        GpuStatus::Unsupported,
        GpuStatus::DeviceError,
    ];

    pub fn code(self) -> i32 {
        self as i32
    }

    pub fn from_code(code: i32) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.code() == code)
    }
}

impl From<&GpuError> for GpuStatus {
    fn from(e: &GpuError) -> Self {
        match e {
            GpuError::ShapeMismatch { .. } => GpuStatus::ShapeMismatch,
            GpuError::DType { .. } => GpuStatus::ShapeMismatch,
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

/// The FLOPs charged for an op, from shapes only.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Flops {
    /// `2 * batch * m * n * k`.
    Matmul { batch: usize, m: usize, n: usize, k: usize },
    /// `per_element * elements`.
    Elementwise { elements: usize, per_element: u64 },
}

/// See [`Flops`]: binary ops, scale, relu and reductions 1 per element; exp, tanh, silu and rmsnorm
/// 4; gelu, softmax and layernorm 8.
pub fn flops(f: Flops) -> u64 {
    match f {
        Flops::Matmul { batch, m, n, k } => {
            2u64.saturating_mul(batch as u64).saturating_mul(m as u64).saturating_mul(n as u64).saturating_mul(k as u64)
        }
        Flops::Elementwise { elements, per_element } => (elements as u64).saturating_mul(per_element),
    }
}

/// The fuel an op costs: `GAS_PER_CALL + ceil(bytes / 4) + ceil(flops / 2)`.
pub fn gas(bytes: u64, flops: u64) -> u64 {
    GAS_PER_CALL.saturating_add(bytes.div_ceil(BYTES_PER_GAS)).saturating_add(flops.div_ceil(FLOPS_PER_GAS))
}

fn unary_cost(op: UnaryOp) -> u64 {
    match op {
        UnaryOp::Scale(_) | UnaryOp::Relu => 1,
        UnaryOp::Exp | UnaryOp::Tanh | UnaryOp::Silu => 4,
        UnaryOp::Gelu => 8,
    }
}

fn bytes_of(shape: &[usize]) -> u64 {
    (gpu::numel(shape) as u64).saturating_mul(4)
}

#[derive(Debug)]
struct Live {
    id: TensorId,
    shape: Vec<usize>,
}

/// The per-evaluation `ao_gpu` state: the handle table and the quota. Dropping it frees every tensor
/// still live.
pub struct GpuCtx {
    backend: SharedBackend,
    live: BTreeMap<u32, Live>,
    next_handle: u32,
    used_bytes: u64,
    max_bytes: u64,
}

impl std::fmt::Debug for GpuCtx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuCtx").field("live", &self.live.len()).field("used_bytes", &self.used_bytes).finish_non_exhaustive()
    }
}

impl GpuCtx {
    pub fn new(backend: SharedBackend, max_bytes: u64) -> Self {
        Self { backend, live: BTreeMap::new(), next_handle: 1, used_bytes: 0, max_bytes }
    }

    /// Frees every live tensor.
    pub fn release(&mut self) {
        if self.live.is_empty() {
            return;
        }
        let live = std::mem::take(&mut self.live);
        self.used_bytes = 0;
        let mut backend = lock(&self.backend);
        for t in live.into_values() {
            if let Err(e) = backend.free(t.id) {
                tracing::warn!(tensor = %t.id, error = %e, "cannot free an evaluation's tensor");
            }
        }
    }

    fn get(&self, handle: i32) -> Result<&Live, Fail> {
        u32::try_from(handle).ok().and_then(|h| self.live.get(&h)).ok_or(Fail::Status(GpuStatus::UnknownHandle))
    }

    /// Whether a new tensor of `shape` fits the quota.
    fn admit(&self, shape: &[usize]) -> Result<(), Fail> {
        if self.live.len() >= MAX_HANDLES || self.used_bytes.saturating_add(bytes_of(shape)) > self.max_bytes {
            return Err(Fail::Status(GpuStatus::QuotaExceeded));
        }
        Ok(())
    }

    fn insert(&mut self, id: TensorId, shape: Vec<usize>) -> u32 {
        let handle = self.next_handle;
        self.next_handle += 1;
        self.used_bytes = self.used_bytes.saturating_add(bytes_of(&shape));
        self.live.insert(handle, Live { id, shape });
        handle
    }
}

impl Drop for GpuCtx {
    fn drop(&mut self) {
        self.release();
    }
}

fn lock(backend: &SharedBackend) -> MutexGuard<'_, Backend> {
    // A panic in a backend op leaves no half-updated state that the next op could trip over
    // worse than the error it would report anyway.
    backend.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Why a call did not return `OK`.
enum Fail {
    Status(GpuStatus),
    /// Guest abuse: the evaluation traps with this message.
    Trap(String),
    OutOfFuel,
}

impl From<GpuError> for Fail {
    fn from(e: GpuError) -> Self {
        Fail::Status(GpuStatus::from(&e))
    }
}

/// One host call: guest memory, the context and the fuel it may charge.
struct Call<'a> {
    name: &'static str,
    mem: &'a mut [u8],
    ctx: &'a mut GpuCtx,
    fuel: u64,
    charged: u64,
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

    fn write_u32(&mut self, ptr: i32, value: u32, what: &str) -> Result<(), Fail> {
        let r = self.range(ptr, 4, what)?;
        self.mem[r].copy_from_slice(&value.to_le_bytes());
        Ok(())
    }

    /// Runs an op that makes one tensor from `inputs`: checks the output pointer, resolves the
    /// handles, plans the output shape and FLOPs, checks the quota, charges gas, runs, and writes
    /// the new handle.
    fn produce(
        &mut self,
        out_ptr: i32,
        inputs: &[i32],
        plan: impl FnOnce(&[&[usize]]) -> gpu::Result<(Vec<usize>, Flops)>,
        run: impl FnOnce(&mut Backend, &[TensorId]) -> gpu::Result<TensorId>,
    ) -> Result<(), Fail> {
        let out = self.range(out_ptr, 4, "out_handle_ptr")?;
        let mut ids = Vec::with_capacity(inputs.len());
        let mut shapes = Vec::with_capacity(inputs.len());
        for &h in inputs {
            let t = self.ctx.get(h)?;
            ids.push(t.id);
            shapes.push(t.shape.as_slice());
        }
        let in_bytes: u64 = shapes.iter().map(|s| bytes_of(s)).sum();
        let (out_shape, f) = plan(&shapes)?;
        self.ctx.admit(&out_shape)?;
        self.charge(gas(in_bytes.saturating_add(bytes_of(&out_shape)), flops(f)) - GAS_PER_CALL)?;
        let (id, shape) = {
            let mut backend = lock(&self.ctx.backend);
            let id = run(&mut backend, &ids)?;
            let shape = backend.shape(id).unwrap_or(out_shape);
            (id, shape)
        };
        let handle = self.ctx.insert(id, shape);
        self.mem[out].copy_from_slice(&handle.to_le_bytes());
        Ok(())
    }

    fn tensor_f32(&mut self, data_ptr: i32, len: i32, shape_ptr: i32, rank: i32, out_ptr: i32) -> Result<(), Fail> {
        let rank = usize::try_from(rank).ok().filter(|r| (1..=MAX_RANK).contains(r)).ok_or(Fail::Status(GpuStatus::InvalidArgument))?;
        let shape_r = self.range(shape_ptr, rank as u64 * 4, "shape_ptr")?;
        let data_r = self.range(data_ptr, len as u32 as u64 * 4, "data_ptr")?;
        let out = self.range(out_ptr, 4, "out_handle_ptr")?;
        let shape: Vec<usize> =
            self.mem[shape_r].chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")) as usize).collect();
        gpu::check_shape("tensor_f32", &shape)?;
        if gpu::numel(&shape) != len as u32 as usize {
            return Err(Fail::Status(GpuStatus::ShapeMismatch));
        }
        self.ctx.admit(&shape)?;
        self.charge(gas(bytes_of(&shape), 0) - GAS_PER_CALL)?;
        let data: Vec<f32> = self.mem[data_r].chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes"))).collect();
        let t = HostTensor { shape, data };
        let id = lock(&self.ctx.backend).upload(&t)?;
        let handle = self.ctx.insert(id, t.shape);
        self.mem[out].copy_from_slice(&handle.to_le_bytes());
        Ok(())
    }

    fn read_f32(&mut self, handle: i32, out_ptr: i32, capacity: i32) -> Result<(), Fail> {
        let out = self.range(out_ptr, capacity as u32 as u64 * 4, "out_ptr")?;
        let t = self.ctx.get(handle)?;
        let (id, n) = (t.id, gpu::numel(&t.shape));
        if n > capacity as u32 as usize {
            return Err(Fail::Status(GpuStatus::BufferTooSmall));
        }
        self.charge(gas(n as u64 * 4, 0) - GAS_PER_CALL)?;
        let host = lock(&self.ctx.backend).read(id)?;
        if host.data.len() != n {
            return Err(Fail::Status(GpuStatus::DeviceError));
        }
        for (dst, v) in self.mem[out].chunks_exact_mut(4).zip(&host.data) {
            dst.copy_from_slice(&v.to_le_bytes());
        }
        Ok(())
    }

    fn shape(&mut self, handle: i32, shape_ptr: i32, rank_ptr: i32) -> Result<(), Fail> {
        let shape_r = self.range(shape_ptr, MAX_RANK as u64 * 4, "out_shape_ptr")?;
        self.range(rank_ptr, 4, "out_rank_ptr")?;
        let shape = self.ctx.get(handle)?.shape.clone();
        for (dst, d) in self.mem[shape_r].chunks_exact_mut(4).zip(&shape) {
            dst.copy_from_slice(&(*d as u32).to_le_bytes());
        }
        self.write_u32(rank_ptr, shape.len() as u32, "out_rank_ptr")
    }

    fn free(&mut self, handle: i32) -> Result<(), Fail> {
        self.ctx.get(handle)?;
        let t = self.ctx.live.remove(&(handle as u32)).expect("checked above");
        self.ctx.used_bytes = self.ctx.used_bytes.saturating_sub(bytes_of(&t.shape));
        lock(&self.ctx.backend).free(t.id)?;
        Ok(())
    }
}

fn elementwise(shape: &[usize], per_element: u64) -> Flops {
    Flops::Elementwise { elements: gpu::numel(shape), per_element }
}

fn invalid() -> Fail {
    Fail::Status(GpuStatus::InvalidArgument)
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
    let Some(Extern::Memory(memory)) = caller.get_export("memory") else {
        return Err(wasmtime::format_err!("ao_gpu.{name}: the module has no memory export"));
    };
    let (mem, data) = memory.data_and_store_mut(&mut *caller);
    let mut call = Call { name, mem, ctx: get(data), fuel, charged: 0 };
    let result = call.charge(GAS_PER_CALL).and_then(|()| f(&mut call));
    let charged = call.charged;
    if let Err(Fail::OutOfFuel) = result {
        caller.set_fuel(0)?;
        return Err(wasmtime::Error::new(Trap::OutOfFuel));
    }
    caller.set_fuel(fuel - charged)?;
    match result {
        Ok(()) => Ok(GpuStatus::Ok.code()),
        Err(Fail::Status(s)) => Ok(s.code()),
        Err(Fail::Trap(msg)) => Err(wasmtime::format_err!("{msg}")),
        Err(Fail::OutOfFuel) => unreachable!("handled above"),
    }
}

/// Links `ao_gpu` into `linker`; `get` finds the per-evaluation context in the store's data.
pub fn add_to_linker<T: 'static>(linker: &mut Linker<T>, get: fn(&mut T) -> &mut GpuCtx) -> wasmtime::Result<()> {
    linker.func_wrap(MODULE, "tensor_f32", move |mut c: Caller<'_, T>, data: i32, len: i32, shape: i32, rank: i32, out: i32| {
        host(&mut c, get, "tensor_f32", |call| call.tensor_f32(data, len, shape, rank, out))
    })?;
    linker.func_wrap(MODULE, "read_f32", move |mut c: Caller<'_, T>, h: i32, out: i32, capacity: i32| {
        host(&mut c, get, "read_f32", |call| call.read_f32(h, out, capacity))
    })?;
    linker.func_wrap(MODULE, "shape", move |mut c: Caller<'_, T>, h: i32, shape: i32, rank: i32| {
        host(&mut c, get, "shape", |call| call.shape(h, shape, rank))
    })?;
    linker.func_wrap(MODULE, "free", move |mut c: Caller<'_, T>, h: i32| host(&mut c, get, "free", |call| call.free(h)))?;
    linker.func_wrap(MODULE, "matmul", move |mut c: Caller<'_, T>, a: i32, b: i32, ta: i32, tb: i32, out: i32| {
        let (ta, tb) = (ta != 0, tb != 0);
        host(&mut c, get, "matmul", |call| {
            call.produce(
                out,
                &[a, b],
                |s| {
                    let (d, shape) = gpu::matmul_dims(s[0], s[1], ta, tb)?;
                    Ok((shape, Flops::Matmul { batch: d.batch, m: d.m, n: d.n, k: d.k }))
                },
                |be, ids| be.matmul(ids[0], ids[1], ta, tb),
            )
        })
    })?;
    linker.func_wrap(MODULE, "binary", move |mut c: Caller<'_, T>, op: i32, a: i32, b: i32, out: i32| {
        host(&mut c, get, "binary", |call| {
            let op = binary_op(op).ok_or_else(invalid)?;
            call.produce(
                out,
                &[a, b],
                |s| {
                    let shape = gpu::broadcast(op.name(), s[0], s[1])?.out_shape;
                    let f = elementwise(&shape, 1);
                    Ok((shape, f))
                },
                |be, ids| be.binary(op, ids[0], ids[1]),
            )
        })
    })?;
    let unary = move |c: &mut Caller<'_, T>, name: &'static str, op: Option<UnaryOp>, x: i32, out: i32| {
        host(c, get, name, |call| {
            let op = op.ok_or_else(invalid)?;
            call.produce(out, &[x], |s| Ok((s[0].to_vec(), elementwise(s[0], unary_cost(op)))), |be, ids| be.unary(op, ids[0]))
        })
    };
    linker
        .func_wrap(MODULE, "unary", move |mut c: Caller<'_, T>, op: i32, x: i32, out: i32| unary(&mut c, "unary", unary_op(op), x, out))?;
    linker.func_wrap(MODULE, "scale", move |mut c: Caller<'_, T>, x: i32, factor: f32, out: i32| {
        unary(&mut c, "scale", Some(UnaryOp::Scale(factor)), x, out)
    })?;
    linker.func_wrap(MODULE, "softmax", move |mut c: Caller<'_, T>, x: i32, out: i32| {
        host(&mut c, get, "softmax", |call| {
            call.produce(out, &[x], |s| Ok((s[0].to_vec(), elementwise(s[0], 8))), |be, ids| be.softmax_last(ids[0]))
        })
    })?;
    linker.func_wrap(MODULE, "rmsnorm", move |mut c: Caller<'_, T>, x: i32, w: i32, eps: f32, out: i32| {
        host(&mut c, get, "rmsnorm", |call| {
            call.produce(
                out,
                &[x, w],
                |s| {
                    gpu::check_param("rmsnorm", "weight", s[0], s[1])?;
                    Ok((s[0].to_vec(), elementwise(s[0], 4)))
                },
                |be, ids| be.rmsnorm(ids[0], ids[1], eps),
            )
        })
    })?;
    linker.func_wrap(MODULE, "layernorm", move |mut c: Caller<'_, T>, x: i32, w: i32, b: i32, eps: f32, out: i32| {
        host(&mut c, get, "layernorm", |call| {
            call.produce(
                out,
                &[x, w, b],
                |s| {
                    gpu::check_param("layernorm", "weight", s[0], s[1])?;
                    gpu::check_param("layernorm", "bias", s[0], s[2])?;
                    Ok((s[0].to_vec(), elementwise(s[0], 8)))
                },
                |be, ids| be.layernorm(ids[0], ids[1], ids[2], eps),
            )
        })
    })?;
    linker.func_wrap(MODULE, "reduce", move |mut c: Caller<'_, T>, op: i32, x: i32, out: i32| {
        host(&mut c, get, "reduce", |call| {
            let op = reduce_op(op).ok_or_else(invalid)?;
            call.produce(out, &[x], |s| Ok((gpu::reduced_shape(s[0]), elementwise(s[0], 1))), |be, ids| be.reduce_last(op, ids[0]))
        })
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

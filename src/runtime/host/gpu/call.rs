//! One `ao_gpu` host call: the guest's memory ranges (checked before any effect), the fuel it is
//! charged, the calls themselves (`Call::{tensor, read, shape, constant, batch, ...}`), and the
//! trampoline [`host`] that ends every call as exactly one of a status, a trap, out of fuel or
//! unavailable. Ops go down into `gpu` once per command (`TensorOps::run_with`): the backend plans
//! them, the call admits and charges the plan, the backend executes.

use std::ops::Range;
use std::time::Duration;

use wasmtime::{AsContextMut, Caller, Extern, Trap};

use super::abi::{self, CMD_F, CMD_I, CMD_IN, CMD_INPUTS, CMD_OP, CMD_OUT, CMD_RESERVED, CMD_SIZE, Fail, GpuStatus, index, invalid, op};
use super::constants::ConstantKey;
use super::handles::{GpuCtx, Live, lock_before};
use super::trace::{MetaText, OpText};
use super::{GAS_PER_CALL, GAS_PER_COMMAND, MAX_HANDLES, op_gas};
use crate::attest::trace::LeafText;
use crate::gpu::{Backend, DType, HostTensor, MAX_RANK, Meta, Op, RawTensor, TensorId, TensorOps, UnaryOp};

/// Commands of an `ao_gpu.run` list recorded before a deferring backend (wgpu) submits them, so
/// that the deadline checked between commands also bounds the device's queue.
const FLUSH_EVERY: usize = 32;

/// What a host call returns to the guest on success: 0 (`OK`) for most calls, the value itself
/// for `dtype` (a code, >= 0).
pub(super) trait Returned {
    fn code(self) -> i32;
}

impl Returned for () {
    fn code(self) -> i32 {
        GpuStatus::Ok.code()
    }
}

impl Returned for i32 {
    fn code(self) -> i32 {
        self
    }
}

/// Adds `gas` to `charged` unless that passes `fuel`.
fn charge(charged: &mut u64, fuel: u64, gas: u64) -> Result<(), Fail> {
    let total = charged.saturating_add(gas);
    if total > fuel {
        return Err(Fail::OutOfFuel);
    }
    *charged = total;
    Ok(())
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

/// What a single call or a `run` command does: an op (which makes a tensor, or for `Append` grows
/// one), or freeing a handle.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Command {
    Op(Op),
    Free,
}

impl Command {
    fn arity(&self) -> usize {
        match self {
            Command::Op(op) => op.arity(),
            Command::Free => 1,
        }
    }
}

#[cfg(test)]
thread_local! {
    /// `begin_batch` and `end_batch` calls made by `run` on this thread (for the tests).
    pub(crate) static BATCH_CALLS: std::cell::Cell<(u64, u64)> = const { std::cell::Cell::new((0, 0)) };
}

/// One host call: guest memory, the context and the fuel it may charge.
pub(super) struct Call<'a> {
    pub(super) name: &'static str,
    pub(super) mem: &'a mut [u8],
    pub(super) ctx: &'a mut GpuCtx,
    fuel: u64,
    charged: u64,
    /// Time spent waiting for constants (excluded from the deadline).
    waited: Duration,
    /// This call's trace leaf, written as the call proceeds.
    pub(super) leaf: LeafText,
}

impl Call<'_> {
    fn charge(&mut self, gas: u64) -> Result<(), Fail> {
        charge(&mut self.charged, self.fuel, gas)
    }

    /// `[ptr, ptr + len)` in memory 0, or a trap.
    pub(super) fn range(&self, ptr: i32, len: u64, what: &str) -> Result<Range<usize>, Fail> {
        let start = ptr as u32 as u64;
        match start.checked_add(len) {
            Some(end) if end <= self.mem.len() as u64 => Ok(start as usize..end as usize),
            _ => Err(Fail::Trap(format!("ao_gpu.{}: {what} [{start:#x}, +{len}) is outside memory ({} bytes)", self.name, self.mem.len()))),
        }
    }

    /// Records the bytes a read wrote into memory (after a test's fault, if one strikes it).
    fn read_back(&mut self, written: Range<usize>) {
        #[cfg(debug_assertions)]
        if self.ctx.strike(self.name)
            && let Some(bytes) = self.mem.get_mut(written.clone())
        {
            crate::runtime::fault::corrupt(bytes);
        }
        if let Some(bytes) = self.mem.get(written) {
            self.leaf.read_back(bytes);
        }
    }

    fn put_u32(&mut self, r: Range<usize>, value: u32) {
        if let Some(dst) = self.mem.get_mut(r) {
            dst.copy_from_slice(&value.to_le_bytes());
        }
    }

    /// `rank` u32s at `ptr` (rank 1..=4, else `INVALID_ARGUMENT`); the range is checked first.
    pub(super) fn dims(&self, ptr: i32, rank: i32, what: &str) -> Result<Vec<usize>, Fail> {
        let rank = usize::try_from(rank).ok().filter(|r| (1..=MAX_RANK).contains(r));
        let r = self.range(ptr, rank.unwrap_or(0) as u64 * 4, what)?;
        rank.ok_or_else(invalid)?;
        Ok(self.mem[r].chunks_exact(4).map(|c| u32_le(c, 0) as usize).collect())
    }

    /// Runs one command on the operand handles `inputs` (exactly its arity): an op is planned by
    /// the backend (`run_with`, one descent into `gpu`), admitted against the quota, charged (the
    /// op's part, on top of the call or command fee), then executed. Returns the output handle: a
    /// new one, the cache's for `Append`, 0 for `Free`. A freed tensor goes to `freed`, to be
    /// dropped once the backend is unlocked.
    fn exec(&mut self, be: &mut Backend, cmd: &Command, inputs: &[i32], freed: &mut Vec<Live>) -> Result<u32, Fail> {
        if inputs.len() != cmd.arity() {
            return Err(invalid());
        }
        let op = match cmd {
            Command::Free => {
                let t = self.ctx.remove(inputs[0])?;
                self.leaf.field("op", "free");
                self.leaf.field("in", MetaText(&t.meta));
                if t.pin.is_none() {
                    be.free(t.id)?;
                }
                freed.push(t);
                return Ok(0);
            }
            Command::Op(Op::Append) => return self.append(be, inputs[0], inputs[1]),
            Command::Op(op) => op,
        };
        self.leaf.field("op", OpText(op));
        let mut ids = [TensorId(0); CMD_INPUTS];
        for (slot, &h) in ids.iter_mut().zip(inputs) {
            let t = self.ctx.get(h)?;
            self.leaf.field("in", MetaText(&t.meta));
            *slot = t.id;
        }
        let (ctx, charged, fuel) = (&mut *self.ctx, &mut self.charged, self.fuel);
        let (id, plan) = be.run_with(op, &ids[..inputs.len()], |plan| {
            ctx.admit(plan.out_bytes)?;
            charge(charged, fuel, op_gas(plan.bytes, plan.flops))
        })?;
        self.leaf.field("out", MetaText(&plan.out));
        #[cfg(debug_assertions)]
        let id = if self.ctx.strike(op.name()) { super::trace::corrupt_tensor(be, id)? } else { id };
        Ok(self.ctx.insert(id, plan.out, plan.out_bytes, None))
    }

    /// `Append`: grows the cache in place; the quota counts the growth. A constant is read-only.
    fn append(&mut self, be: &mut Backend, cache: i32, rows: i32) -> Result<u32, Fail> {
        let handle = u32::try_from(cache).map_err(|_| Fail::Status(GpuStatus::UnknownHandle))?;
        let (c, r) = (self.ctx.get(cache)?, self.ctx.get(rows)?);
        if c.pin.is_some() {
            return Err(Fail::Status(GpuStatus::ReadOnly));
        }
        self.leaf.field("op", "append");
        self.leaf.field("in", MetaText(&c.meta));
        self.leaf.field("in", MetaText(&r.meta));
        let (ids, old_bytes) = ([c.id, r.id], c.bytes);
        let (used, max) = (self.ctx.used_bytes, self.ctx.max_bytes);
        let (charged, fuel) = (&mut self.charged, self.fuel);
        let (_, plan) = be.run_with(&Op::Append, &ids, |plan| {
            if used.saturating_add(plan.out_bytes.saturating_sub(old_bytes)) > max {
                return Err(Fail::Status(GpuStatus::QuotaExceeded));
            }
            charge(charged, fuel, op_gas(plan.bytes, plan.flops))
        })?;
        self.ctx.used_bytes = self.ctx.used_bytes.saturating_add(plan.out_bytes.saturating_sub(old_bytes));
        self.leaf.field("out", MetaText(&plan.out));
        if let Some(t) = self.ctx.live.get_mut(&handle) {
            t.meta = plan.out;
            t.bytes = plan.out_bytes;
        }
        Ok(handle)
    }

    /// A single-call command: checks the output pointer, then runs it under the backend lock and
    /// writes the new handle.
    pub(super) fn single(&mut self, out_ptr: Option<i32>, cmd: Command, inputs: &[i32]) -> Result<(), Fail> {
        let out = out_ptr.map(|p| self.range(p, 4, "out_handle_ptr")).transpose()?;
        self.single_checked(out, cmd, inputs)
    }

    /// As [`Call::single`], with the output range already checked (for calls that decode codes
    /// after the pointer check).
    pub(super) fn single_checked(&mut self, out: Option<Range<usize>>, cmd: Command, inputs: &[i32]) -> Result<(), Fail> {
        let backend = self.ctx.backend.clone();
        let mut freed = Vec::new();
        let result = {
            let mut be = lock_before(&backend, self.ctx.deadline_at())?;
            self.exec(&mut be, &cmd, inputs, &mut freed)
        };
        drop(freed);
        let handle = result?;
        if let Some(out) = out {
            self.put_u32(out, handle);
        }
        Ok(())
    }

    /// The code of a handle's dtype.
    pub(super) fn dtype(&mut self, handle: i32) -> Result<i32, Fail> {
        let meta = &self.ctx.get(handle)?.meta;
        self.leaf.field("of", MetaText(meta));
        Ok(meta.dtype.code())
    }

    pub(super) fn tensor(&mut self, dtype: i32, data_ptr: i32, byte_len: u64, shape_ptr: i32, rank: i32, out_ptr: i32) -> Result<(), Fail> {
        let shape = self.dims(shape_ptr, rank, "shape_ptr")?;
        let data_r = self.range(data_ptr, byte_len, "data_ptr")?;
        let out = self.range(out_ptr, 4, "out_handle_ptr")?;
        let dtype = abi::dtype(dtype).ok_or_else(invalid)?;
        let meta = Meta::new(shape.clone(), dtype);
        self.leaf.field("in", MetaText(&meta));
        self.leaf.digest("data", &self.mem[data_r.clone()]);
        let bytes = meta.bytes(self.name)?;
        if bytes != byte_len {
            return Err(Fail::Status(GpuStatus::ShapeMismatch));
        }
        self.ctx.admit(bytes)?;
        self.charge(op_gas(bytes, 0))?;
        let raw = RawTensor::new(dtype, shape, self.mem[data_r].to_vec())?;
        let id = if dtype == DType::F32 {
            // The f32 path every backend has.
            let data = raw.bytes.chunks_exact(4).map(|c| f32_le(c, 0)).collect();
            lock_before(&self.ctx.backend, self.ctx.deadline_at())?.upload(&HostTensor { shape: raw.shape.clone(), data })?
        } else {
            lock_before(&self.ctx.backend, self.ctx.deadline_at())?.upload_raw(&raw)?
        };
        let handle = self.ctx.insert(id, Meta { shape: raw.shape, dtype }, bytes, None);
        self.put_u32(out, handle);
        Ok(())
    }

    pub(super) fn read_f32(&mut self, handle: i32, out_ptr: i32, capacity: i32) -> Result<(), Fail> {
        let out = self.range(out_ptr, capacity as u32 as u64 * 4, "out_ptr")?;
        let t = self.ctx.get(handle)?;
        self.leaf.field("of", MetaText(&t.meta));
        let (id, n) = (t.id, t.meta.shape.iter().product::<usize>());
        if n > capacity as u32 as usize {
            return Err(Fail::Status(GpuStatus::BufferTooSmall));
        }
        self.charge(op_gas(n as u64 * 4, 0))?;
        let host = lock_before(&self.ctx.backend, self.ctx.deadline_at())?.read(id)?;
        if host.data.len() != n {
            return Err(Fail::Status(GpuStatus::DeviceError));
        }
        let written = out.start..out.start + n * 4;
        for (dst, v) in self.mem[out].chunks_exact_mut(4).zip(&host.data) {
            dst.copy_from_slice(&v.to_le_bytes());
        }
        self.read_back(written);
        Ok(())
    }

    pub(super) fn read(&mut self, handle: i32, out_ptr: i32, capacity: i32, len_ptr: i32) -> Result<(), Fail> {
        let out = self.range(out_ptr, capacity as u32 as u64, "out_ptr")?;
        let len_r = self.range(len_ptr, 4, "out_len_ptr")?;
        let t = self.ctx.get(handle)?;
        self.leaf.field("of", MetaText(&t.meta));
        let (id, bytes) = (t.id, t.stored());
        self.put_u32(len_r, u32::try_from(bytes).unwrap_or(u32::MAX));
        if bytes > out.len() as u64 {
            return Err(Fail::Status(GpuStatus::BufferTooSmall));
        }
        self.charge(op_gas(bytes, 0))?;
        let raw = lock_before(&self.ctx.backend, self.ctx.deadline_at())?.read_raw(id)?;
        let dst = self.mem.get_mut(out.start..out.start + raw.bytes.len()).ok_or(Fail::Status(GpuStatus::DeviceError))?;
        if raw.bytes.len() as u64 != bytes {
            return Err(Fail::Status(GpuStatus::DeviceError));
        }
        dst.copy_from_slice(&raw.bytes);
        self.read_back(out.start..out.start + raw.bytes.len());
        Ok(())
    }

    pub(super) fn shape(&mut self, handle: i32, shape_ptr: i32, rank_ptr: i32) -> Result<(), Fail> {
        let shape_r = self.range(shape_ptr, MAX_RANK as u64 * 4, "out_shape_ptr")?;
        let rank_r = self.range(rank_ptr, 4, "out_rank_ptr")?;
        let t = self.ctx.get(handle)?;
        self.leaf.field("of", MetaText(&t.meta));
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

    pub(super) fn constant(&mut self, id_ptr: i32, sha_ptr: i32, dtype: i32, shape_ptr: i32, rank: i32, out_ptr: i32) -> Result<(), Fail> {
        let id_r = self.range(id_ptr, 43, "id_ptr")?;
        let sha_r = self.range(sha_ptr, 32, "sha256_ptr")?;
        let shape = self.dims(shape_ptr, rank, "shape_ptr")?;
        let out = self.range(out_ptr, 4, "out_handle_ptr")?;
        let id = std::str::from_utf8(&self.mem[id_r]).ok().and_then(|s| crate::protocol::b64::decode_id(s).ok()).ok_or_else(invalid)?;
        let mut sha256 = [0u8; 32];
        sha256.copy_from_slice(&self.mem[sha_r]);
        let dtype = abi::dtype(dtype).ok_or_else(invalid)?;
        self.leaf.field("id", crate::protocol::b64::encode(&id));
        self.leaf.field("sha256", hex::encode(sha256));
        self.leaf.field("out", MetaText(&Meta { shape: shape.clone(), dtype }));
        let bytes = Meta::new(shape.clone(), dtype).bytes(self.name)?;
        let cache = self.ctx.constants.clone().ok_or(Fail::Status(GpuStatus::Unsupported))?;
        let key = ConstantKey { id, sha256, dtype, shape };
        let more = if self.ctx.pinned.contains_key(&key) { 0 } else { bytes };
        if self.ctx.live.len() >= MAX_HANDLES || self.ctx.pinned_bytes.saturating_add(more) > cache.max_bytes() {
            return Err(Fail::Status(GpuStatus::QuotaExceeded));
        }
        self.charge(op_gas(bytes, 0))?;
        let meta = Meta { shape: key.shape.clone(), dtype };
        let (pin, waited) = cache.acquire(key, bytes)?;
        self.waited += waited;
        let handle = self.ctx.insert(pin.tensor(), meta, 0, Some(pin));
        self.put_u32(out, handle);
        Ok(())
    }

    /// `run`: the command list at `cmds_ptr`.
    pub(super) fn batch(&mut self, cmds_ptr: i32, n: i32, done_ptr: i32) -> Result<(), Fail> {
        let n = n as u32 as usize;
        let cmds = self.range(cmds_ptr, n as u64 * CMD_SIZE as u64, "cmds_ptr")?;
        let done = self.range(done_ptr, 4, "out_done_ptr")?;
        self.leaf.field("n", n);
        let backend = self.ctx.backend.clone();
        let mut freed = Vec::new();
        let mut outs: Vec<u32> = Vec::with_capacity(n);
        let (result, end) = {
            let mut be = lock_before(&backend, self.ctx.deadline_at())?;
            be.begin_batch();
            #[cfg(test)]
            BATCH_CALLS.with(|c| c.set((c.get().0 + 1, c.get().1)));
            let mut result = Ok(());
            for i in 0..n {
                // The deadline bounds the list, not only the guest's own code: it is checked
                // before each command, and a deferring backend submits what it recorded every
                // FLUSH_EVERY commands so that the device's work is bounded the same way.
                if i > 0 && i % FLUSH_EVERY == 0 {
                    if let Err(e) = be.end_batch() {
                        result = Err(e.into());
                        break;
                    }
                    be.begin_batch();
                }
                if self.ctx.expired() {
                    result = Err(Fail::Deadline);
                    break;
                }
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
        self.leaf.field("done", outs.len());
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
        let code = i32_le(rec, CMD_OP);
        let cmd = if code == op::FREE {
            Command::Free
        } else {
            Command::Op(match code {
                op::MATMUL => Op::Matmul { transpose_a: int(0) != 0, transpose_b: int(1) != 0 },
                op::BINARY => Op::Binary(abi::binary_op(int(0)).ok_or_else(invalid)?),
                op::UNARY => Op::Unary(abi::unary_op(int(0)).ok_or_else(invalid)?),
                op::SCALE => Op::Unary(UnaryOp::Scale(float(0))),
                op::SOFTMAX => Op::Softmax,
                op::RMSNORM => Op::Rmsnorm { eps: float(0) },
                op::LAYERNORM => Op::Layernorm { eps: float(0) },
                op::REDUCE => Op::Reduce(abi::reduce_op(int(0)).ok_or_else(invalid)?),
                op::CAST => Op::Cast(abi::dtype(int(0)).ok_or_else(invalid)?),
                op::RESHAPE => Op::Reshape(list(int(0))?),
                op::PERMUTE => Op::Permute(list(int(0))?),
                op::SLICE => Op::Slice { axis: index(int(0))?, start: index(int(1))?, len: index(int(2))? },
                op::CONCAT => Op::Concat { axis: index(int(0))? },
                op::APPEND => Op::Append,
                op::GATHER => Op::Gather,
                op::ROPE => Op::Rope {
                    pos0: u32::try_from(int(0)).map_err(|_| invalid())?,
                    theta: float(0),
                    mode: abi::rope_mode(int(1)).ok_or_else(invalid)?,
                },
                op::ATTENTION => Op::Attention { pos0: u32::try_from(int(0)).map_err(|_| invalid())?, scale: float(0) },
                _ => return Err(invalid()),
            })
        };
        let mut inputs = [0i32; CMD_INPUTS];
        for (k, slot) in inputs.iter_mut().enumerate().take(cmd.arity()) {
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
        self.exec(be, &cmd, &inputs[..cmd.arity()], freed)
    }
}

/// The `status=` of a trace leaf: the code returned, or how the call ended instead.
enum Status {
    Code(i32),
    Word(&'static str),
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Status::Code(c) => write!(f, "{c}"),
            Status::Word(w) => f.write_str(w),
        }
    }
}

/// Runs one host call: `GAS_PER_CALL`, then `f`; settles the fuel and turns the outcome into a
/// status or a trap.
pub(super) fn host<T: 'static, R: Returned>(
    caller: &mut Caller<'_, T>,
    get: fn(&mut T) -> &mut GpuCtx,
    name: &'static str,
    f: impl FnOnce(&mut Call<'_>) -> Result<R, Fail>,
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
    let mut call = Call { name, mem, ctx: get(data), fuel, charged: 0, waited: Duration::ZERO, leaf: LeafText::new(name) };
    let result =
        if call.ctx.expired() { Err(Fail::Deadline) } else { call.charge(GAS_PER_CALL).and_then(|()| f(&mut call)).map(Returned::code) };
    let (charged, waited) = (call.charged, call.waited);
    let status = match &result {
        Ok(code) => Status::Code(*code),
        Err(Fail::Status(s)) => Status::Code(s.code()),
        Err(Fail::Trap(_)) => Status::Word("trap"),
        Err(Fail::OutOfFuel) => Status::Word("out-of-fuel"),
        Err(Fail::Unavailable(_)) => Status::Word("unavailable"),
        Err(Fail::Deadline) => Status::Word("deadline"),
    };
    let leaf = std::mem::take(&mut call.leaf).finish(status);
    get(caller.data_mut()).trace.push(leaf);
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
        Ok(code) => Ok(code),
        Err(Fail::Status(s)) => Ok(s.code()),
        Err(Fail::Trap(msg)) => Err(wasmtime::format_err!("{msg}")),
        Err(Fail::OutOfFuel) => Err(wasmtime::Error::new(Trap::OutOfFuel)),
        // Classified as the evaluation's timeout, as the epoch interruption is.
        Err(Fail::Deadline) => Err(wasmtime::Error::new(Trap::Interrupt)),
        Err(Fail::Unavailable(reason)) => {
            let text = format!("ao_gpu.{name}: {reason}");
            get(caller.data_mut()).unavailable = Some(text.clone());
            Err(wasmtime::format_err!("{text}"))
        }
    }
}

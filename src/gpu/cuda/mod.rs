//! The CUDA backend: `kernels/*.cu` compiled by NVRTC for the device when the backend starts
//! (cached on disk, see [`compile`]), cuBLAS for f32 GEMM in fast mode where the library loads,
//! all through cudarc with libcuda / libnvrtc / libcublas loaded at run time.
//!
//! [`CudaBackend::new_on`] checks for the driver, the device and NVRTC before any call that could
//! panic (cudarc's dynamic loading panics on a missing library) and reports
//! "unavailable: no CUDA driver: …" cleanly; [`device_count`] is 0 on a machine without a driver.
//!
//! Layers: `launch` (pure launch geometry and parameter structs), `compile` (NVRTC and the cache),
//! `device` (the [`device::Device`] trait and its cudarc implementation) and the generic [`Engine`]
//! here, which executes every op on any `Device`; [`CudaBackend`] is the engine on the real device.
//! The unit tests run the same `Engine` on a host emulator of the kernels (`emu`), against the CPU
//! backend.
//!
//! Semantics follow the CPU backend exactly; operands arrive checked by [`super::op`], and the one
//! check left here needs device values (gather's ids). Tensors are byte buffers with a dtype; all work is ordered on one
//! stream, so a batch is simply the ops between `begin_batch` and `end_batch` (no synchronization
//! in between), and only reads (and `gather_rows`, which must check its ids) wait for the device.

mod compile;
pub mod device;
#[cfg(test)]
mod emu;
mod launch;

use self::device::{Arg, Device, RealDevice};
use self::launch::{
    AttnParams, BLOCK, Broadcast4, CopyParams, GatherParams, MATVEC_OUTPUTS_PER_BLOCK, MatmulParams, PermuteParams, RopeParams, bytes_of,
    gemm_plan, grid_for, matmul_grid, u32_of,
};
use super::backend::TensorBackend;
use super::dtype::{DType, HostTensor, RawTensor};
use super::op::{BinaryOp, Launch, Meta, MetaRef, Planned, ReduceOp, RopeMode, UnaryOp};
use super::quant;
use super::shape::{AttentionDims, AxisSplit, Broadcast, MatmulDims, RopeDims, check_shape, gather_id_err, numel, rope_table, shape_err};
use super::tensor::{BackendKind, Determinism, GpuError, IdMap, Result, TensorId};

/// The number of CUDA devices the driver reports; 0 (never an error or a panic) without a driver.
pub fn device_count() -> usize {
    std::panic::catch_unwind(|| {
        // SAFETY: only dlopen()s the candidate library names.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return 0;
        }
        cudarc::driver::CudaContext::device_count().map_or(0, |n| n.max(0) as usize)
    })
    .unwrap_or(0)
}

fn unavailable(why: impl std::fmt::Display) -> GpuError {
    GpuError::Device(format!("unavailable: {why}"))
}

/// Checks, without any call that can panic, that libcuda, device `ordinal` and libnvrtc are there.
fn check_available(ordinal: usize) -> Result<()> {
    // SAFETY: only dlopen()s the candidate library names (see src/capacity/cuda.rs).
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(unavailable("no CUDA driver: libcuda not found"));
    }
    let n = std::panic::catch_unwind(cudarc::driver::CudaContext::device_count)
        .map_err(|_| unavailable("no CUDA driver: loading libcuda panicked"))?
        .map_err(|e| unavailable(format!("no CUDA devices: {}", device::describe_driver_error(&e))))?;
    let n = usize::try_from(n).unwrap_or(0);
    if n == 0 {
        return Err(unavailable("no CUDA devices"));
    }
    if ordinal >= n {
        return Err(unavailable(format!("no CUDA device {ordinal} (the driver reports {n})")));
    }
    // SAFETY: as above, for libnvrtc.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err(unavailable("no NVRTC: libnvrtc not found (add the CUDA 13 libraries to LD_LIBRARY_PATH)"));
    }
    Ok(())
}

/// The CUDA backend on one device: the [`Engine`] over the real device.
pub type CudaBackend = Engine<RealDevice>;

impl Engine<RealDevice> {
    /// The backend on device 0.
    pub fn new(determinism: Determinism) -> Result<Self> {
        Self::new_on(0, determinism)
    }

    /// The backend on device `ordinal` (see [`device_count`]): compiles (or loads from the cache)
    /// every kernel for it, and in fast mode opens cuBLAS when the library loads.
    pub fn new_on(ordinal: usize, determinism: Determinism) -> Result<Self> {
        check_available(ordinal)?;
        // Past the check every library is loadable; catch_unwind is a second line of defence
        // against cudarc panicking (a missing symbol in an old driver, say).
        let open = std::panic::catch_unwind(|| RealDevice::open(ordinal, determinism == Determinism::Fast))
            .unwrap_or_else(|_| Err(GpuError::Device("cuda start panicked".to_owned())))?;
        Ok(Engine::on(open, determinism))
    }

    /// The device ordinal this backend runs on.
    pub fn ordinal(&self) -> usize {
        self.dev.ordinal()
    }
}

/// One tensor: dtype, shape and a device buffer of at least `bytes` bytes (more for an `append`
/// cache, which grows geometrically).
struct Tensor<B> {
    dtype: DType,
    shape: Vec<usize>,
    bytes: usize,
    buf: B,
}

/// Every op of [`TensorBackend`] on a [`Device`].
pub struct Engine<D: Device> {
    // Tensors before the device: buffers are released before the context they belong to.
    tensors: IdMap<Tensor<D::Buf>>,
    dev: D,
    determinism: Determinism,
    next_id: u64,
    live: u64,
}

/// Tensors are released on the device's context, whichever thread drops the backend.
impl<D: Device + std::fmt::Debug> std::fmt::Debug for Engine<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaBackend").field("device", &self.dev).field("ordinal", &self.dev.ordinal()).finish_non_exhaustive()
    }
}

impl<D: Device> Drop for Engine<D> {
    fn drop(&mut self) {
        if let Err(e) = self.dev.bind() {
            tracing::warn!(error = %e, "cuda: could not bind the context to release tensors");
        }
    }
}

impl<D: Device> Engine<D> {
    /// The engine on `dev`.
    pub(crate) fn on(dev: D, determinism: Determinism) -> Self {
        Self { tensors: IdMap::default(), dev, determinism, next_id: 1, live: 0 }
    }

    fn repro(&self) -> bool {
        self.determinism == Determinism::Reproducible
    }

    fn get(&self, id: TensorId) -> Result<&Tensor<D::Buf>> {
        self.tensors.get(&id).ok_or(GpuError::UnknownTensor(id))
    }

    /// A new tensor with uninitialized storage (`dtype.byte_len` checks quantized shapes).
    fn alloc(&self, op: &'static str, dtype: DType, shape: Vec<usize>) -> Result<Tensor<D::Buf>> {
        let bytes = dtype.byte_len(op, &shape)?;
        // Zero-sized device allocations are not portable: an empty tensor keeps 4 bytes.
        let buf = self.dev.alloc(bytes.max(4))?;
        Ok(Tensor { dtype, shape, bytes, buf })
    }

    fn insert(&mut self, t: Tensor<D::Buf>) -> TensorId {
        let id = TensorId(self.next_id);
        self.next_id += 1;
        self.live += D::capacity(&t.buf) as u64;
        self.tensors.insert(id, t);
        id
    }

    /// Launches `kernel` over `items` work items at `per_block` per block, unless there are none.
    fn launch(&self, kernel: &str, items: usize, per_block: usize, args: &[Arg<'_, D::Buf>]) -> Result<()> {
        if items == 0 {
            return Ok(());
        }
        self.dev.launch(kernel, grid_for(items, per_block), args)
    }

    /// A copy of `t`'s storage under another shape (same byte length).
    fn copy_of(&self, t: &Tensor<D::Buf>, shape: Vec<usize>) -> Result<Tensor<D::Buf>> {
        let out = self.alloc("copy", t.dtype, shape)?;
        self.dev.copy(&t.buf, 0, &out.buf, 0, t.bytes)?;
        Ok(out)
    }
}

/// Element size of an unquantized dtype, as the suffix of the layout kernels.
fn elem_kernel(dtype: DType) -> &'static str {
    if dtype == DType::F16 { "b16" } else { "b32" }
}

impl<D: Device> TensorBackend for Engine<D> {
    fn kind(&self) -> BackendKind {
        BackendKind::Cuda
    }

    fn describe(&self) -> String {
        match self.dev.ordinal() {
            0 => format!("cuda ({})", self.dev.describe()),
            n => format!("cuda ({}, device {n})", self.dev.describe()),
        }
    }

    fn determinism(&self) -> Determinism {
        self.determinism
    }

    fn upload(&mut self, t: &HostTensor) -> Result<TensorId> {
        t.check()?;
        let bytes: Vec<u8> = t.data.iter().flat_map(|v| v.to_le_bytes()).collect();
        let out = self.alloc("upload", DType::F32, t.shape.clone())?;
        self.dev.upload(&out.buf, 0, &bytes)?;
        Ok(self.insert(out))
    }

    fn upload_raw(&mut self, t: &RawTensor) -> Result<TensorId> {
        // As `RawTensor::new` (the fields are public), without copying the bytes first.
        check_shape("upload", &t.shape)?;
        let want = t.dtype.byte_len("upload", &t.shape)?;
        if t.bytes.len() != want {
            return Err(shape_err("upload", format!("a {} tensor of shape {:?} is {want} bytes, got {}", t.dtype, t.shape, t.bytes.len())));
        }
        let out = self.alloc("upload", t.dtype, t.shape.clone())?;
        self.dev.upload(&out.buf, 0, &t.bytes)?;
        Ok(self.insert(out))
    }

    fn read(&mut self, id: TensorId) -> Result<HostTensor> {
        let t = self.get(id)?;
        let bytes = self.dev.download(&t.buf, 0, t.bytes)?;
        let data = quant::dequantize(t.dtype, &bytes, numel(&t.shape))?;
        Ok(HostTensor { shape: t.shape.clone(), data })
    }

    fn read_raw(&mut self, id: TensorId) -> Result<RawTensor> {
        let t = self.get(id)?;
        let bytes = self.dev.download(&t.buf, 0, t.bytes)?;
        Ok(RawTensor { dtype: t.dtype, shape: t.shape.clone(), bytes })
    }

    fn free(&mut self, id: TensorId) -> Result<()> {
        let t = self.tensors.remove(&id).ok_or(GpuError::UnknownTensor(id))?;
        self.live = self.live.saturating_sub(D::capacity(&t.buf) as u64);
        // The buffer is released on the device's context, which must be current on this thread.
        self.dev.bind()?;
        drop(t);
        Ok(())
    }

    fn meta(&self, id: TensorId) -> Result<MetaRef<'_>> {
        let t = self.get(id)?;
        Ok(MetaRef { shape: &t.shape, dtype: t.dtype })
    }

    fn execute(&mut self, p: Planned<'_>) -> Result<TensorId> {
        let out = p.out();
        match p.launch() {
            Launch::Matmul { dims, b } => self.op_matmul(p.x(0), p.x(1), dims, *b, out),
            Launch::Binary { op, bc } => self.op_binary(*op, p.x(0), p.x(1), bc),
            Launch::Unary { op } => self.op_unary(*op, p.x(0), out),
            Launch::Softmax { rows, last } => {
                let kernel = if self.repro() { "softmax_repro_f32" } else { "softmax_fast_f32" };
                self.op_rows(kernel, p.x(0), &[], (*rows, *last), None, out)
            }
            Launch::Rmsnorm { eps, rows, last } => {
                let kernel = if self.repro() { "rmsnorm_f32" } else { "rmsnorm_fast_f32" };
                self.op_rows(kernel, p.x(0), &[p.x(1)], (*rows, *last), Some(*eps), out)
            }
            Launch::Layernorm { eps, rows, last } => {
                let kernel = if self.repro() { "layernorm_f32" } else { "layernorm_fast_f32" };
                self.op_rows(kernel, p.x(0), &[p.x(1), p.x(2)], (*rows, *last), Some(*eps), out)
            }
            Launch::Reduce { op, rows, last } => self.op_reduce(*op, p.x(0), *rows, *last, out),
            Launch::Cast { from, to } => self.op_cast(p.x(0), *from, *to),
            Launch::Reshape => {
                let t = self.get(p.x(0))?;
                let copy = self.copy_of(t, out.shape.clone())?;
                Ok(self.insert(copy))
            }
            Launch::Permute { axes } => self.op_permute(p.x(0), axes, out),
            Launch::Slice { axis, start, len, split } => self.op_slice(p.x(0), *axis, *start, *len, *split, out),
            Launch::Concat { axis, split } => self.op_concat(p.x(0), p.x(1), *axis, *split, out),
            Launch::Append => self.op_append(p.x(0), p.x(1), out),
            Launch::Gather { rows, dim } => self.op_gather(p.x(0), p.x(1), *rows, *dim, out),
            Launch::Rope { pos0, theta, mode, dims } => self.op_rope(p.x(0), *pos0, *theta, *mode, dims, out),
            Launch::Attention { pos0, scale, dims } => self.op_attention([p.x(0), p.x(1), p.x(2)], *pos0, *scale, dims, out),
        }
    }

    /// Work is already queued in order on one stream; a batch needs no bookkeeping.
    fn begin_batch(&mut self) {}

    /// Reports an asynchronous failure recorded during the batch (without waiting for the device).
    fn end_batch(&mut self) -> Result<()> {
        self.dev.check()
    }

    fn live_bytes(&self) -> u64 {
        self.live
    }
}

/// The ops, on operands `Op::plan` checked.
impl<D: Device> Engine<D> {
    fn op_matmul(&mut self, a: TensorId, b: TensorId, dims: &MatmulDims, b_dtype: DType, out: &Meta) -> Result<TensorId> {
        const OP: &str = "matmul";
        let (ta, tb) = (self.get(a)?, self.get(b)?);
        let out = self.alloc(OP, DType::F32, out.shape.clone())?;
        if out.bytes > 0 {
            if dims.k == 0 {
                self.dev.zero(&out.buf, 0, out.bytes)?;
            } else {
                let blas = match (b_dtype, self.determinism, gemm_plan(dims)) {
                    (DType::F32, Determinism::Fast, Some(plan)) => self.dev.gemm(&plan, &ta.buf, &tb.buf, &out.buf),
                    _ => None,
                };
                match blas {
                    Some(r) => r?,
                    None => {
                        let suffix = if self.repro() { "_repro" } else { "" };
                        let p = MatmulParams::new(dims);
                        let args = [Arg::Buf(&ta.buf), Arg::Buf(&tb.buf), Arg::Buf(&out.buf), Arg::Pod(bytes_of(&p))];
                        if dims.m == 1 && dims.transpose_b {
                            let kernel = format!("matvec_{b_dtype}{suffix}");
                            self.launch(&kernel, dims.batch * dims.n, MATVEC_OUTPUTS_PER_BLOCK, &args)?;
                        } else {
                            self.dev.launch(&format!("matmul_{b_dtype}{suffix}"), matmul_grid(dims), &args)?;
                        }
                    }
                }
            }
        }
        Ok(self.insert(out))
    }

    fn op_binary(&mut self, op: BinaryOp, a: TensorId, b: TensorId, bc: &Broadcast) -> Result<TensorId> {
        let (ta, tb) = (self.get(a)?, self.get(b)?);
        let n = numel(&bc.out_shape);
        let out = self.alloc(op.name(), DType::F32, bc.out_shape.clone())?;
        let p = Broadcast4::new(bc);
        let args = [Arg::Buf(&ta.buf), Arg::Buf(&tb.buf), Arg::Buf(&out.buf), Arg::U32(u32_of(n)), Arg::Pod(bytes_of(&p))];
        self.launch(&format!("{}_f32", op.name()), n, BLOCK as usize, &args)?;
        Ok(self.insert(out))
    }

    fn op_unary(&mut self, op: UnaryOp, x: TensorId, out: &Meta) -> Result<TensorId> {
        let t = self.get(x)?;
        let n = numel(&out.shape);
        let factor = if let UnaryOp::Scale(s) = op { s } else { 1.0 };
        let out = self.alloc(op.name(), DType::F32, out.shape.clone())?;
        let args = [Arg::Buf(&t.buf), Arg::Buf(&out.buf), Arg::U32(u32_of(n)), Arg::F32(factor)];
        // Reproducible mode: the transcendental ops run the portable functions of `gpu` (`_repro`).
        let portable = self.repro() && matches!(op, UnaryOp::Gelu | UnaryOp::Silu | UnaryOp::Tanh | UnaryOp::Exp);
        let kernel = if portable { format!("{}_repro_f32", op.name()) } else { format!("{}_f32", op.name()) };
        self.launch(&kernel, n, BLOCK as usize, &args)?;
        Ok(self.insert(out))
    }

    /// Softmax or a norm: one thread per row of `last` elements; `params` are the norm's weight
    /// (and bias), `eps` its epsilon.
    fn op_rows(
        &mut self,
        kernel: &str,
        x: TensorId,
        params: &[TensorId],
        (rows, last): (usize, usize),
        eps: Option<f32>,
        out: &Meta,
    ) -> Result<TensorId> {
        let t = self.get(x)?;
        let out = self.alloc("row op", DType::F32, out.shape.clone())?;
        let mut args = vec![Arg::Buf(&t.buf)];
        for &id in params {
            args.push(Arg::Buf(&self.get(id)?.buf));
        }
        args.extend([Arg::Buf(&out.buf), Arg::U32(u32_of(rows)), Arg::U32(u32_of(last))]);
        args.extend(eps.map(Arg::F32));
        self.launch(kernel, if last == 0 { 0 } else { rows }, 1, &args)?;
        Ok(self.insert(out))
    }

    fn op_reduce(&mut self, op: ReduceOp, x: TensorId, rows: usize, last: usize, out: &Meta) -> Result<TensorId> {
        let t = self.get(x)?;
        let out = self.alloc(op.name(), out.dtype, out.shape.clone())?;
        // Sums in reproducible mode: one thread per row, in order; everything else: a block per row.
        let (kernel, per_block) = match (op, self.repro()) {
            (ReduceOp::Sum, true) => ("sum_last_f32", BLOCK as usize),
            (ReduceOp::Mean, true) => ("mean_last_f32", BLOCK as usize),
            (ReduceOp::Sum, false) => ("sum_last_fast_f32", 1),
            (ReduceOp::Mean, false) => ("mean_last_fast_f32", 1),
            (ReduceOp::Max, _) => ("max_last_f32", 1),
            (ReduceOp::Argmax, _) => ("argmax_last_i32", 1),
        };
        let args = [Arg::Buf(&t.buf), Arg::Buf(&out.buf), Arg::U32(u32_of(rows)), Arg::U32(u32_of(last))];
        self.launch(kernel, rows, per_block, &args)?;
        Ok(self.insert(out))
    }

    fn op_cast(&mut self, x: TensorId, from: DType, to: DType) -> Result<TensorId> {
        const OP: &str = "cast";
        let t = self.get(x)?;
        let n = numel(&t.shape);
        let kernel = match (from, to) {
            _ if from == to => {
                let out = self.copy_of(t, t.shape.clone())?;
                return Ok(self.insert(out));
            }
            (DType::F32, DType::F16) => "cast_f32_f16",
            (DType::F32, DType::I32) => "cast_f32_i32",
            (DType::F32, DType::Q8_0) => "quantize_q8_0",
            (DType::F32, DType::Q4_0) => "quantize_q4_0",
            (DType::F32, DType::Q4_1) => "quantize_q4_1",
            (DType::F16, DType::F32) => "cast_f16_f32",
            (DType::I32, DType::F32) => "cast_i32_f32",
            (DType::Q8_0, DType::F32) => "dequantize_q8_0",
            (DType::Q4_0, DType::F32) => "dequantize_q4_0",
            (DType::Q4_1, DType::F32) => "dequantize_q4_1",
            _ => return Err(self.unsupported(OP)),
        };
        let out = self.alloc(OP, to, t.shape.clone())?;
        // The quantizers take one thread per 32-value block.
        let items = if to.is_quantized() { n / to.block_len() } else { n };
        let args = [Arg::Buf(&t.buf), Arg::Buf(&out.buf), Arg::U32(u32_of(items))];
        self.launch(kernel, items, BLOCK as usize, &args)?;
        Ok(self.insert(out))
    }

    fn op_permute(&mut self, x: TensorId, axes: &[usize], out: &Meta) -> Result<TensorId> {
        const OP: &str = "permute";
        let t = self.get(x)?;
        let out = self.alloc(OP, t.dtype, out.shape.clone())?;
        let p = PermuteParams::new(&t.shape, axes);
        let args = [Arg::Buf(&t.buf), Arg::Buf(&out.buf), Arg::Pod(bytes_of(&p))];
        self.launch(&format!("permute_{}", elem_kernel(t.dtype)), p.n as usize, BLOCK as usize, &args)?;
        Ok(self.insert(out))
    }

    fn op_slice(&mut self, x: TensorId, axis: usize, start: usize, len: usize, sp: AxisSplit, out: &Meta) -> Result<TensorId> {
        const OP: &str = "slice";
        let t = self.get(x)?;
        let out = self.alloc(OP, t.dtype, out.shape.clone())?;
        let p = CopyParams {
            outer: u32_of(sp.outer),
            row: u32_of(len * sp.inner),
            src_stride: u32_of(t.shape[axis] * sp.inner),
            src_offset: u32_of(start * sp.inner),
            dst_stride: u32_of(len * sp.inner),
            dst_offset: 0,
        };
        let args = [Arg::Buf(&t.buf), Arg::Buf(&out.buf), Arg::Pod(bytes_of(&p))];
        self.launch(&format!("copy_rows_{}", elem_kernel(t.dtype)), sp.outer * len * sp.inner, BLOCK as usize, &args)?;
        Ok(self.insert(out))
    }

    fn op_concat(&mut self, a: TensorId, b: TensorId, axis: usize, sp: AxisSplit, out: &Meta) -> Result<TensorId> {
        const OP: &str = "concat";
        let (ta, tb) = (self.get(a)?, self.get(b)?);
        let (la, lb) = (ta.shape[axis], tb.shape[axis]);
        let out = self.alloc(OP, ta.dtype, out.shape.clone())?;
        let kernel = format!("copy_rows_{}", elem_kernel(ta.dtype));
        let dst_stride = u32_of((la + lb) * sp.inner);
        for (src, len, dst_offset) in [(ta, la, 0), (tb, lb, la * sp.inner)] {
            let row = len * sp.inner;
            let p = CopyParams {
                outer: u32_of(sp.outer),
                row: u32_of(row),
                src_stride: u32_of(row),
                src_offset: 0,
                dst_stride,
                dst_offset: u32_of(dst_offset),
            };
            let args = [Arg::Buf(&src.buf), Arg::Buf(&out.buf), Arg::Pod(bytes_of(&p))];
            self.launch(&kernel, sp.outer * row, BLOCK as usize, &args)?;
        }
        Ok(self.insert(out))
    }

    fn op_append(&mut self, cache: TensorId, rows: TensorId, out: &Meta) -> Result<TensorId> {
        const OP: &str = "append";
        let (tc, tr) = (self.get(cache)?, self.get(rows)?);
        let new_shape = out.shape.clone();
        let new_bytes = tc.dtype.byte_len(OP, &new_shape)?;
        let (old_bytes, add) = (tc.bytes, tr.bytes);
        let cap = D::capacity(&tc.buf);
        // Row-major storage: joining along axis 0 appends the bytes. Grow geometrically, so one row at
        // a time costs amortized O(row). When the rows are the cache itself, their bytes are already
        // at the start of the buffer being copied from.
        let grown = if new_bytes > cap {
            let new_cap = new_bytes.max(cap.saturating_mul(2));
            let nb = self.dev.alloc(new_cap)?;
            self.dev.copy(&tc.buf, 0, &nb, 0, old_bytes)?;
            self.dev.copy(&tr.buf, 0, &nb, old_bytes, add)?;
            Some(nb)
        } else if cache == rows {
            // In place, from the first half of the same buffer: stage through a temporary.
            let tmp = self.dev.alloc(add.max(4))?;
            self.dev.copy(&tr.buf, 0, &tmp, 0, add)?;
            self.dev.copy(&tmp, 0, &tc.buf, old_bytes, add)?;
            None
        } else {
            self.dev.copy(&tr.buf, 0, &tc.buf, old_bytes, add)?;
            None
        };
        let tc = self.tensors.get_mut(&cache).ok_or(GpuError::UnknownTensor(cache))?;
        if let Some(nb) = grown {
            self.live = self.live - D::capacity(&tc.buf) as u64 + D::capacity(&nb) as u64;
            tc.buf = nb;
        }
        tc.shape = new_shape;
        tc.bytes = new_bytes;
        Ok(cache)
    }

    fn op_gather(&mut self, table: TensorId, ids: TensorId, vocab: usize, dim: usize, out: &Meta) -> Result<TensorId> {
        const OP: &str = "gather_rows";
        let (tt, ti) = (self.get(table)?, self.get(ids)?);
        let n_ids = numel(&ti.shape);
        let out = self.alloc(OP, DType::F32, out.shape.clone())?;
        // The lowest position of a bad id, or u32::MAX.
        let bad = self.dev.alloc(4)?;
        self.dev.upload(&bad, 0, &u32::MAX.to_le_bytes())?;
        let check = [Arg::Buf(&ti.buf), Arg::U32(u32_of(n_ids)), Arg::U32(u32_of(vocab)), Arg::Buf(&bad)];
        self.launch("check_ids_i32", n_ids, BLOCK as usize, &check)?;
        let p = GatherParams { n_ids: u32_of(n_ids), vocab: u32_of(vocab), dim: u32_of(dim) };
        let args = [Arg::Buf(&tt.buf), Arg::Buf(&ti.buf), Arg::Buf(&out.buf), Arg::Pod(bytes_of(&p))];
        self.launch(&format!("gather_rows_{}", tt.dtype), n_ids * dim, BLOCK as usize, &args)?;
        let flag = self.dev.download(&bad, 0, 4)?;
        let pos = u32::from_le_bytes([flag[0], flag[1], flag[2], flag[3]]);
        if pos != u32::MAX {
            let at = pos as usize * 4;
            let id = self.dev.download(&ti.buf, at, 4)?;
            let id = i32::from_le_bytes([id[0], id[1], id[2], id[3]]);
            return Err(gather_id_err(id.into(), vocab));
        }
        Ok(self.insert(out))
    }

    fn op_rope(&mut self, x: TensorId, pos0: u32, theta: f32, mode: RopeMode, d: &RopeDims, out: &Meta) -> Result<TensorId> {
        const OP: &str = "rope";
        let t = self.get(x)?;
        let out = self.alloc(OP, DType::F32, out.shape.clone())?;
        let pairs = d.batch * d.seq * d.heads * (d.dim / 2);
        if pairs > 0 {
            let table: Vec<u8> = rope_table(pos0, d.seq, d.dim, theta).iter().flat_map(|v| v.to_le_bytes()).collect();
            let tbuf = self.dev.alloc(table.len().max(4))?;
            self.dev.upload(&tbuf, 0, &table)?;
            let p =
                RopeParams { pairs: u32_of(pairs), seq: u32_of(d.seq), heads: u32_of(d.heads), dim: u32_of(d.dim), mode: mode.ggml_code() };
            let args = [Arg::Buf(&t.buf), Arg::Buf(&tbuf), Arg::Buf(&out.buf), Arg::Pod(bytes_of(&p))];
            self.launch("rope_f32", pairs, BLOCK as usize, &args)?;
        }
        Ok(self.insert(out))
    }

    fn op_attention(&mut self, [q, k, v]: [TensorId; 3], pos0: u32, scale: f32, d: &AttentionDims, out: &Meta) -> Result<TensorId> {
        const OP: &str = "attention";
        let (tq, tk, tv) = (self.get(q)?, self.get(k)?, self.get(v)?);
        let out = self.alloc(OP, DType::F32, out.shape.clone())?;
        let rows = d.batch * d.tq * d.hq;
        let p = AttnParams {
            batch: u32_of(d.batch),
            tq: u32_of(d.tq),
            tk: u32_of(d.tk),
            hq: u32_of(d.hq),
            hkv: u32_of(d.hkv),
            dim: u32_of(d.dim),
            pos0,
            scale,
        };
        let kernel = if self.repro() { "attention_f32_repro" } else { "attention_f32" };
        let args = [Arg::Buf(&tq.buf), Arg::Buf(&tk.buf), Arg::Buf(&tv.buf), Arg::Buf(&out.buf), Arg::Pod(bytes_of(&p))];
        self.launch(kernel, if d.dim == 0 { 0 } else { rows }, 1, &args)?;
        Ok(self.insert(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The runtime moves backends between threads.
    #[test]
    fn the_backend_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<CudaBackend>();
    }

    /// On this machine there is no driver: the error is the clean "unavailable" one, and the device
    /// count is 0. (Where a driver exists, both are skipped.)
    #[test]
    fn without_a_driver_the_backend_is_unavailable() {
        // SAFETY: only dlopen()s the candidate library names.
        if unsafe { cudarc::driver::sys::is_culib_present() } {
            eprintln!("libcuda is present: skipping the no-driver checks");
            return;
        }
        assert_eq!(device_count(), 0);
        let e = CudaBackend::new(Determinism::Reproducible).unwrap_err();
        assert_eq!(e.to_string(), "device error: unavailable: no CUDA driver: libcuda not found");
        let e = CudaBackend::new_on(3, Determinism::Fast).unwrap_err();
        assert!(e.to_string().contains("no CUDA driver"), "{e}");
    }
}

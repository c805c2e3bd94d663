//! The CUDA backend: `kernels/*.cu` compiled by NVRTC for the device when the backend starts
//! (cached on disk, see [`compile`]), cuBLAS for f32 GEMM in fast mode where the library loads,
//! all through cudarc with libcuda / libnvrtc / libcublas loaded at run time.
//!
//! [`CudaBackend::new_on`] checks for the driver, the device and NVRTC before any call that could
//! panic (cudarc's dynamic loading panics on a missing library) and reports
//! "unavailable: no CUDA driver: …" cleanly; [`device_count`] is 0 on a machine without a driver.
//!
//! Layers: `plan` (pure geometry and parameter structs), `compile` (NVRTC and the cache),
//! `device` (the [`device::Device`] trait and its cudarc implementation) and the generic [`Engine`]
//! here, which implements every op of [`TensorBackend`] on any `Device`. The unit tests run the same
//! `Engine` on a host emulator of the kernels (`emu`), against the CPU backend.
//!
//! Semantics follow `cpu.rs` exactly, including the order of checks (unknown handles, then dtypes,
//! then shapes, then values). Tensors are byte buffers with a dtype; all work is ordered on one
//! stream, so a batch is simply the ops between `begin_batch` and `end_batch` (no synchronization
//! in between), and only reads (and `gather_rows`, which must check its ids) wait for the device.

mod compile;
mod device;
#[cfg(test)]
mod emu;
mod plan;

use std::collections::HashMap;

use self::device::{Arg, Device, RealDevice};
use self::plan::{
    AttnParams, BLOCK, Broadcast4, CopyParams, GatherParams, MATVEC_OUTPUTS_PER_BLOCK, MatmulParams, PermuteParams, RopeParams, bytes_of,
    gemm_plan, grid_for, matmul_grid, u32_of,
};
use super::dtype::{dtype_err, expect_dtype};
use super::layout::{append_dims, attention_dims, concat_dims, gather_dims, permute_dims, reshape_check, rope_dims, slice_dims};
use super::{
    BackendKind, BinaryOp, DType, Determinism, GpuError, HostTensor, RawTensor, ReduceOp, Result, RopeMode, TensorBackend, TensorId,
    UnaryOp, broadcast, check_param, check_shape, matmul_dims, numel, quant, reduced_shape, rope_table, rows_last, shape_err,
};

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

/// The CUDA backend on one device.
pub struct CudaBackend {
    engine: Engine<RealDevice>,
    ordinal: usize,
}

impl std::fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaBackend").field("device", &self.engine.dev).field("ordinal", &self.ordinal).finish_non_exhaustive()
    }
}

impl CudaBackend {
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
        Ok(Self { engine: Engine::new(open, determinism), ordinal })
    }

    /// The device ordinal this backend runs on.
    pub fn ordinal(&self) -> usize {
        self.ordinal
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
pub(crate) struct Engine<D: Device> {
    // Tensors before the device: buffers are released before the context they belong to.
    tensors: HashMap<TensorId, Tensor<D::Buf>>,
    dev: D,
    determinism: Determinism,
    next_id: u64,
    live: u64,
}

/// Tensors are released on the device's context, whichever thread drops the backend.
impl<D: Device> Drop for Engine<D> {
    fn drop(&mut self) {
        if let Err(e) = self.dev.bind() {
            tracing::warn!(error = %e, "cuda: could not bind the context to release tensors");
        }
    }
}

impl<D: Device> Engine<D> {
    pub(crate) fn new(dev: D, determinism: Determinism) -> Self {
        Self { tensors: HashMap::new(), dev, determinism, next_id: 1, live: 0 }
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
    fn run(&self, kernel: &str, items: usize, per_block: usize, args: &[Arg<'_, D::Buf>]) -> Result<()> {
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

    fn f32_operand(&self, op: &'static str, what: &str, id: TensorId) -> Result<&Tensor<D::Buf>> {
        let t = self.get(id)?;
        expect_dtype(op, what, t.dtype, DType::F32)?;
        Ok(t)
    }
}

/// Element size of an unquantized dtype, as the suffix of the layout kernels.
fn elem_kernel(dtype: DType) -> &'static str {
    if dtype == DType::F16 { "b16" } else { "b32" }
}

/// The refusal of the block types by the layout ops (as `cpu.rs` words it).
fn unquantized(op: &'static str, what: &str, dtype: DType) -> Result<()> {
    if dtype.is_quantized() {
        return Err(dtype_err(op, format!("{what} must be an unquantized type (f32, f16 or i32), got {dtype}")));
    }
    Ok(())
}

impl<D: Device> TensorBackend for Engine<D> {
    fn kind(&self) -> BackendKind {
        BackendKind::Cuda
    }

    fn describe(&self) -> String {
        format!("cuda ({})", self.dev.describe())
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

    fn shape(&self, id: TensorId) -> Result<Vec<usize>> {
        Ok(self.get(id)?.shape.clone())
    }

    fn dtype(&self, id: TensorId) -> Result<DType> {
        Ok(self.get(id)?.dtype)
    }

    fn matmul(&mut self, a: TensorId, b: TensorId, transpose_a: bool, transpose_b: bool) -> Result<TensorId> {
        const OP: &str = "matmul";
        let (ta, tb) = (self.get(a)?, self.get(b)?);
        expect_dtype(OP, "a", ta.dtype, DType::F32)?;
        match tb.dtype {
            DType::I32 => return Err(dtype_err(OP, "b must be f32, f16 or quantized, got i32")),
            d if d.is_quantized() && !transpose_b => {
                return Err(dtype_err(OP, format!("a {d} b must be transposed ([n, k] rows with blocks along k)")));
            }
            _ => {}
        }
        let (dims, out_shape) = matmul_dims(&ta.shape, &tb.shape, transpose_a, transpose_b)?;
        let out = self.alloc(OP, DType::F32, out_shape)?;
        if out.bytes > 0 {
            if dims.k == 0 {
                self.dev.zero(&out.buf, 0, out.bytes)?;
            } else {
                let blas = match (tb.dtype, self.determinism, gemm_plan(&dims)) {
                    (DType::F32, Determinism::Fast, Some(plan)) => self.dev.gemm(&plan, &ta.buf, &tb.buf, &out.buf),
                    _ => None,
                };
                match blas {
                    Some(r) => r?,
                    None => {
                        let suffix = if self.repro() { "_repro" } else { "" };
                        let p = MatmulParams::new(&dims);
                        let args = [Arg::Buf(&ta.buf), Arg::Buf(&tb.buf), Arg::Buf(&out.buf), Arg::Pod(bytes_of(&p))];
                        if dims.m == 1 && transpose_b {
                            let kernel = format!("matvec_{}{suffix}", tb.dtype);
                            self.run(&kernel, dims.batch * dims.n, MATVEC_OUTPUTS_PER_BLOCK, &args)?;
                        } else {
                            self.dev.launch(&format!("matmul_{}{suffix}", tb.dtype), matmul_grid(&dims), &args)?;
                        }
                    }
                }
            }
        }
        Ok(self.insert(out))
    }

    fn binary(&mut self, op: BinaryOp, a: TensorId, b: TensorId) -> Result<TensorId> {
        let (ta, tb) = (self.get(a)?, self.get(b)?);
        expect_dtype(op.name(), "a", ta.dtype, DType::F32)?;
        expect_dtype(op.name(), "b", tb.dtype, DType::F32)?;
        let bc = broadcast(op.name(), &ta.shape, &tb.shape)?;
        let n = numel(&bc.out_shape);
        let out = self.alloc(op.name(), DType::F32, bc.out_shape.clone())?;
        let p = Broadcast4::new(&bc);
        let args = [Arg::Buf(&ta.buf), Arg::Buf(&tb.buf), Arg::Buf(&out.buf), Arg::U32(u32_of(n)), Arg::Pod(bytes_of(&p))];
        self.run(&format!("{}_f32", op.name()), n, BLOCK as usize, &args)?;
        Ok(self.insert(out))
    }

    fn unary(&mut self, op: UnaryOp, x: TensorId) -> Result<TensorId> {
        let t = self.f32_operand(op.name(), "x", x)?;
        let n = numel(&t.shape);
        let factor = if let UnaryOp::Scale(s) = op { s } else { 1.0 };
        let out = self.alloc(op.name(), DType::F32, t.shape.clone())?;
        let args = [Arg::Buf(&t.buf), Arg::Buf(&out.buf), Arg::U32(u32_of(n)), Arg::F32(factor)];
        // Reproducible mode: the transcendental ops run the portable functions of `gpu` (`_repro`).
        let portable = self.repro() && matches!(op, UnaryOp::Gelu | UnaryOp::Silu | UnaryOp::Tanh | UnaryOp::Exp);
        let kernel = if portable { format!("{}_repro_f32", op.name()) } else { format!("{}_f32", op.name()) };
        self.run(&kernel, n, BLOCK as usize, &args)?;
        Ok(self.insert(out))
    }

    fn softmax_last(&mut self, x: TensorId) -> Result<TensorId> {
        let t = self.f32_operand("softmax_last", "x", x)?;
        let (rows, last) = rows_last(&t.shape);
        let out = self.alloc("softmax_last", DType::F32, t.shape.clone())?;
        let kernel = if self.repro() { "softmax_repro_f32" } else { "softmax_fast_f32" };
        let args = [Arg::Buf(&t.buf), Arg::Buf(&out.buf), Arg::U32(u32_of(rows)), Arg::U32(u32_of(last))];
        self.run(kernel, if last == 0 { 0 } else { rows }, 1, &args)?;
        Ok(self.insert(out))
    }

    fn rmsnorm(&mut self, x: TensorId, weight: TensorId, eps: f32) -> Result<TensorId> {
        const OP: &str = "rmsnorm";
        let (t, w) = (self.get(x)?, self.get(weight)?);
        expect_dtype(OP, "x", t.dtype, DType::F32)?;
        expect_dtype(OP, "weight", w.dtype, DType::F32)?;
        check_param(OP, "weight", &t.shape, &w.shape)?;
        let (rows, last) = rows_last(&t.shape);
        let out = self.alloc(OP, DType::F32, t.shape.clone())?;
        let kernel = if self.repro() { "rmsnorm_f32" } else { "rmsnorm_fast_f32" };
        let args = [Arg::Buf(&t.buf), Arg::Buf(&w.buf), Arg::Buf(&out.buf), Arg::U32(u32_of(rows)), Arg::U32(u32_of(last)), Arg::F32(eps)];
        self.run(kernel, if last == 0 { 0 } else { rows }, 1, &args)?;
        Ok(self.insert(out))
    }

    fn layernorm(&mut self, x: TensorId, weight: TensorId, bias: TensorId, eps: f32) -> Result<TensorId> {
        const OP: &str = "layernorm";
        let (t, w, b) = (self.get(x)?, self.get(weight)?, self.get(bias)?);
        expect_dtype(OP, "x", t.dtype, DType::F32)?;
        expect_dtype(OP, "weight", w.dtype, DType::F32)?;
        expect_dtype(OP, "bias", b.dtype, DType::F32)?;
        check_param(OP, "weight", &t.shape, &w.shape)?;
        check_param(OP, "bias", &t.shape, &b.shape)?;
        let (rows, last) = rows_last(&t.shape);
        let out = self.alloc(OP, DType::F32, t.shape.clone())?;
        let kernel = if self.repro() { "layernorm_f32" } else { "layernorm_fast_f32" };
        let args = [
            Arg::Buf(&t.buf),
            Arg::Buf(&w.buf),
            Arg::Buf(&b.buf),
            Arg::Buf(&out.buf),
            Arg::U32(u32_of(rows)),
            Arg::U32(u32_of(last)),
            Arg::F32(eps),
        ];
        self.run(kernel, if last == 0 { 0 } else { rows }, 1, &args)?;
        Ok(self.insert(out))
    }

    fn reduce_last(&mut self, op: ReduceOp, x: TensorId) -> Result<TensorId> {
        let t = self.f32_operand(op.name(), "x", x)?;
        let (rows, last) = rows_last(&t.shape);
        if op == ReduceOp::Argmax && last == 0 {
            return Err(shape_err("argmax_last", format!("the last axis of {:?} is empty", t.shape)));
        }
        let out_shape = reduced_shape(&t.shape);
        check_shape(op.name(), &out_shape)?;
        let dtype = if op == ReduceOp::Argmax { DType::I32 } else { DType::F32 };
        let out = self.alloc(op.name(), dtype, out_shape)?;
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
        self.run(kernel, rows, per_block, &args)?;
        Ok(self.insert(out))
    }

    fn cast(&mut self, x: TensorId, to: DType) -> Result<TensorId> {
        const OP: &str = "cast";
        let t = self.get(x)?;
        let from = t.dtype;
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
            _ => return Err(dtype_err(OP, format!("cannot cast {from} to {to} (only to and from f32, and the identity)"))),
        };
        // `alloc` checks the block alignment of a quantized target (a DType error, as on the CPU).
        let out = self.alloc(OP, to, t.shape.clone())?;
        // The quantizers take one thread per 32-value block.
        let items = if to.is_quantized() { n / to.block_len() } else { n };
        let args = [Arg::Buf(&t.buf), Arg::Buf(&out.buf), Arg::U32(u32_of(items))];
        self.run(kernel, items, BLOCK as usize, &args)?;
        Ok(self.insert(out))
    }

    fn reshape(&mut self, x: TensorId, shape: &[usize]) -> Result<TensorId> {
        let t = self.get(x)?;
        reshape_check(&t.shape, shape)?;
        t.dtype.byte_len("reshape", shape)?;
        let out = self.copy_of(t, shape.to_vec())?;
        Ok(self.insert(out))
    }

    fn permute(&mut self, x: TensorId, axes: &[usize]) -> Result<TensorId> {
        const OP: &str = "permute";
        let t = self.get(x)?;
        unquantized(OP, "x", t.dtype)?;
        let out_shape = permute_dims(&t.shape, axes)?;
        let out = self.alloc(OP, t.dtype, out_shape)?;
        let p = PermuteParams::new(&t.shape, axes);
        let args = [Arg::Buf(&t.buf), Arg::Buf(&out.buf), Arg::Pod(bytes_of(&p))];
        self.run(&format!("permute_{}", elem_kernel(t.dtype)), p.n as usize, BLOCK as usize, &args)?;
        Ok(self.insert(out))
    }

    fn slice(&mut self, x: TensorId, axis: usize, start: usize, len: usize) -> Result<TensorId> {
        const OP: &str = "slice";
        let t = self.get(x)?;
        unquantized(OP, "x", t.dtype)?;
        let (out_shape, sp) = slice_dims(&t.shape, axis, start, len)?;
        let out = self.alloc(OP, t.dtype, out_shape)?;
        let p = CopyParams {
            outer: u32_of(sp.outer),
            row: u32_of(len * sp.inner),
            src_stride: u32_of(t.shape[axis] * sp.inner),
            src_offset: u32_of(start * sp.inner),
            dst_stride: u32_of(len * sp.inner),
            dst_offset: 0,
        };
        let args = [Arg::Buf(&t.buf), Arg::Buf(&out.buf), Arg::Pod(bytes_of(&p))];
        self.run(&format!("copy_rows_{}", elem_kernel(t.dtype)), sp.outer * len * sp.inner, BLOCK as usize, &args)?;
        Ok(self.insert(out))
    }

    fn concat(&mut self, a: TensorId, b: TensorId, axis: usize) -> Result<TensorId> {
        const OP: &str = "concat";
        let (ta, tb) = (self.get(a)?, self.get(b)?);
        unquantized(OP, "a", ta.dtype)?;
        expect_dtype(OP, "b", tb.dtype, ta.dtype)?;
        let (out_shape, sp) = concat_dims(&ta.shape, &tb.shape, axis)?;
        let (la, lb) = (ta.shape[axis], tb.shape[axis]);
        let out = self.alloc(OP, ta.dtype, out_shape)?;
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
            self.run(&kernel, sp.outer * row, BLOCK as usize, &args)?;
        }
        Ok(self.insert(out))
    }

    fn append(&mut self, cache: TensorId, rows: TensorId) -> Result<()> {
        const OP: &str = "append";
        let (tc, tr) = (self.get(cache)?, self.get(rows)?);
        unquantized(OP, "cache", tc.dtype)?;
        expect_dtype(OP, "rows", tr.dtype, tc.dtype)?;
        let new_shape = append_dims(&tc.shape, &tr.shape)?;
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
        Ok(())
    }

    fn gather_rows(&mut self, table: TensorId, ids: TensorId) -> Result<TensorId> {
        const OP: &str = "gather_rows";
        let (tt, ti) = (self.get(table)?, self.get(ids)?);
        if tt.dtype == DType::I32 {
            return Err(dtype_err(OP, "the table must be f32, f16 or quantized, got i32"));
        }
        expect_dtype(OP, "ids", ti.dtype, DType::I32)?;
        let out_shape = gather_dims(&tt.shape, &ti.shape)?;
        let (vocab, dim) = (tt.shape[0], tt.shape[1]);
        let n_ids = numel(&ti.shape);
        let out = self.alloc(OP, DType::F32, out_shape)?;
        // The lowest position of a bad id, or u32::MAX.
        let bad = self.dev.alloc(4)?;
        self.dev.upload(&bad, 0, &u32::MAX.to_le_bytes())?;
        let check = [Arg::Buf(&ti.buf), Arg::U32(u32_of(n_ids)), Arg::U32(u32_of(vocab)), Arg::Buf(&bad)];
        self.run("check_ids_i32", n_ids, BLOCK as usize, &check)?;
        let p = GatherParams { n_ids: u32_of(n_ids), vocab: u32_of(vocab), dim: u32_of(dim) };
        let args = [Arg::Buf(&tt.buf), Arg::Buf(&ti.buf), Arg::Buf(&out.buf), Arg::Pod(bytes_of(&p))];
        self.run(&format!("gather_rows_{}", tt.dtype), n_ids * dim, BLOCK as usize, &args)?;
        let flag = self.dev.download(&bad, 0, 4)?;
        let pos = u32::from_le_bytes([flag[0], flag[1], flag[2], flag[3]]);
        if pos != u32::MAX {
            let at = pos as usize * 4;
            let id = self.dev.download(&ti.buf, at, 4)?;
            let id = i32::from_le_bytes([id[0], id[1], id[2], id[3]]);
            return Err(shape_err(OP, format!("id {id} at index {pos} is outside the table's 0..{vocab} rows")));
        }
        Ok(self.insert(out))
    }

    fn rope(&mut self, x: TensorId, pos0: u32, theta: f32, mode: RopeMode) -> Result<TensorId> {
        const OP: &str = "rope";
        let t = self.f32_operand(OP, "x", x)?;
        let d = rope_dims(&t.shape)?;
        let out = self.alloc(OP, DType::F32, t.shape.clone())?;
        let pairs = d.batch * d.seq * d.heads * (d.dim / 2);
        if pairs > 0 {
            let table: Vec<u8> = rope_table(pos0, d.seq, d.dim, theta).iter().flat_map(|v| v.to_le_bytes()).collect();
            let tbuf = self.dev.alloc(table.len().max(4))?;
            self.dev.upload(&tbuf, 0, &table)?;
            let p = RopeParams {
                pairs: u32_of(pairs),
                seq: u32_of(d.seq),
                heads: u32_of(d.heads),
                dim: u32_of(d.dim),
                mode: match mode {
                    RopeMode::Interleaved => 0,
                    RopeMode::Neox => 2,
                },
            };
            let args = [Arg::Buf(&t.buf), Arg::Buf(&tbuf), Arg::Buf(&out.buf), Arg::Pod(bytes_of(&p))];
            self.run("rope_f32", pairs, BLOCK as usize, &args)?;
        }
        Ok(self.insert(out))
    }

    fn attention(&mut self, q: TensorId, k: TensorId, v: TensorId, pos0: u32, scale: f32) -> Result<TensorId> {
        const OP: &str = "attention";
        let (tq, tk, tv) = (self.get(q)?, self.get(k)?, self.get(v)?);
        expect_dtype(OP, "q", tq.dtype, DType::F32)?;
        expect_dtype(OP, "k", tk.dtype, DType::F32)?;
        expect_dtype(OP, "v", tv.dtype, DType::F32)?;
        let d = attention_dims(&tq.shape, &tk.shape, &tv.shape)?;
        let out = self.alloc(OP, DType::F32, tq.shape.clone())?;
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
        self.run(kernel, if d.dim == 0 { 0 } else { rows }, 1, &args)?;
        Ok(self.insert(out))
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

/// Forwards every op to the [`Engine`] on the real device.
impl TensorBackend for CudaBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Cuda
    }
    fn describe(&self) -> String {
        if self.ordinal == 0 { self.engine.describe() } else { format!("cuda ({}, device {})", self.engine.dev.describe(), self.ordinal) }
    }
    fn determinism(&self) -> Determinism {
        self.engine.determinism()
    }
    fn upload(&mut self, t: &HostTensor) -> Result<TensorId> {
        self.engine.upload(t)
    }
    fn read(&mut self, id: TensorId) -> Result<HostTensor> {
        self.engine.read(id)
    }
    fn free(&mut self, id: TensorId) -> Result<()> {
        self.engine.free(id)
    }
    fn shape(&self, id: TensorId) -> Result<Vec<usize>> {
        self.engine.shape(id)
    }
    fn matmul(&mut self, a: TensorId, b: TensorId, transpose_a: bool, transpose_b: bool) -> Result<TensorId> {
        self.engine.matmul(a, b, transpose_a, transpose_b)
    }
    fn binary(&mut self, op: BinaryOp, a: TensorId, b: TensorId) -> Result<TensorId> {
        self.engine.binary(op, a, b)
    }
    fn unary(&mut self, op: UnaryOp, x: TensorId) -> Result<TensorId> {
        self.engine.unary(op, x)
    }
    fn softmax_last(&mut self, x: TensorId) -> Result<TensorId> {
        self.engine.softmax_last(x)
    }
    fn rmsnorm(&mut self, x: TensorId, weight: TensorId, eps: f32) -> Result<TensorId> {
        self.engine.rmsnorm(x, weight, eps)
    }
    fn layernorm(&mut self, x: TensorId, weight: TensorId, bias: TensorId, eps: f32) -> Result<TensorId> {
        self.engine.layernorm(x, weight, bias, eps)
    }
    fn reduce_last(&mut self, op: ReduceOp, x: TensorId) -> Result<TensorId> {
        self.engine.reduce_last(op, x)
    }
    fn dtype(&self, id: TensorId) -> Result<DType> {
        self.engine.dtype(id)
    }
    fn upload_raw(&mut self, t: &RawTensor) -> Result<TensorId> {
        self.engine.upload_raw(t)
    }
    fn read_raw(&mut self, id: TensorId) -> Result<RawTensor> {
        self.engine.read_raw(id)
    }
    fn cast(&mut self, x: TensorId, to: DType) -> Result<TensorId> {
        self.engine.cast(x, to)
    }
    fn reshape(&mut self, x: TensorId, shape: &[usize]) -> Result<TensorId> {
        self.engine.reshape(x, shape)
    }
    fn permute(&mut self, x: TensorId, axes: &[usize]) -> Result<TensorId> {
        self.engine.permute(x, axes)
    }
    fn slice(&mut self, x: TensorId, axis: usize, start: usize, len: usize) -> Result<TensorId> {
        self.engine.slice(x, axis, start, len)
    }
    fn concat(&mut self, a: TensorId, b: TensorId, axis: usize) -> Result<TensorId> {
        self.engine.concat(a, b, axis)
    }
    fn append(&mut self, cache: TensorId, rows: TensorId) -> Result<()> {
        self.engine.append(cache, rows)
    }
    fn gather_rows(&mut self, table: TensorId, ids: TensorId) -> Result<TensorId> {
        self.engine.gather_rows(table, ids)
    }
    fn rope(&mut self, x: TensorId, pos0: u32, theta: f32, mode: RopeMode) -> Result<TensorId> {
        self.engine.rope(x, pos0, theta, mode)
    }
    fn attention(&mut self, q: TensorId, k: TensorId, v: TensorId, pos0: u32, scale: f32) -> Result<TensorId> {
        self.engine.attention(q, k, v, pos0, scale)
    }
    fn begin_batch(&mut self) {
        self.engine.begin_batch()
    }
    fn end_batch(&mut self) -> Result<()> {
        self.engine.end_batch()
    }
    fn live_bytes(&self) -> u64 {
        self.engine.live_bytes()
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

//! The wgpu backend: WGSL kernels from `shaders/` (through the registry in [`super::kernels`]) on the
//! first adapter of the primary backends (Vulkan, Metal, DX12; `WGPU_BACKEND` and the other `WGPU_*`
//! variables override, as in the capacity probe). Every pipeline is compiled once, when the backend
//! starts, and cached by entry-point name, except the matmul kernels: those are specialized per call
//! shape and compiled on first use, from a kernel set chosen by adapter type ([`matmul`]). Tensors
//! live in pooled storage buffers ([`pool`]); only
//! `read` / `read_raw` map memory back to the host. Commands are recorded and submitted by
//! [`stream`]: one submission per op, or one per batch between `begin_batch` and `end_batch`.
//!
//! Storage: every tensor is a buffer of u32 words holding its dtype's storage bytes (padded to a
//! multiple of 4): f32 / i32 one element per word, f16 two per word (no `shader-f16` feature needed),
//! the GGUF block types as their raw blocks, decoded in the kernels with shifts. `reshape` and an
//! identity `cast` share the buffer; `append` writes in place, copying into a buffer twice as large
//! when full (and copying first when the buffer is shared). f32 -> quantized `cast` runs on the host
//! (`quant::quantize` after a read, then an upload); every other conversion runs on the device.
//!
//! `gather_rows` validates ids without reading them back when their range is known: uploads,
//! `argmax_last` outputs and layout ops of those carry their value range; ids from a cast are read
//! back once (flushing an open batch) and the range is remembered.
//!
//! Operands arrive checked by [`super::op`]. Nothing here panics on caller input: shapes are validated before any wgpu call, allocation runs
//! inside an out-of-memory error scope, and device errors are collected by the uncaptured-error
//! handler and reported by the next flush instead of hitting wgpu's default (panicking) handler.

mod matmul;
mod pool;
mod stream;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

pub use self::matmul::MatmulKernels;
use self::matmul::MatmulPipelines;
use self::stream::{Gpu, Kernel, Purpose, Stream, device_err};
use super::backend::TensorBackend;
use super::dtype::{DType, HostTensor, RawTensor};
use super::kernels::{FILES, Lang, compiled_source};
use super::op::{BinaryOp, Launch, Meta, MetaRef, Planned, ReduceOp, RopeMode, UnaryOp};
use super::quant;
use super::shape::{AttentionDims, Broadcast, MatmulDims, RopeDims, gather_id_err, numel, rope_table, shape_err, strides};
use super::tensor::{BackendKind, Determinism, GpuError, IdMap, Result, TensorId};

/// Freed buffers kept for reuse, at most this many bytes.
const MAX_POOLED_BYTES: u64 = 256 << 20;

/// Known inclusive bounds of an i32 tensor's values; `EMPTY` for a tensor with no elements.
type IdRange = (i32, i32);
const EMPTY: IdRange = (i32::MAX, i32::MIN);

fn union(a: Option<IdRange>, b: Option<IdRange>) -> Option<IdRange> {
    Some((a?.0.min(b?.0), a?.1.max(b?.1)))
}

struct WTensor {
    shape: Vec<usize>,
    dtype: DType,
    /// Shared by `reshape` / identity-`cast` views; `append` copies before writing a shared buffer.
    buf: Arc<::wgpu::Buffer>,
    /// For i32 tensors whose values are known to the host: their range.
    ids: Option<IdRange>,
}

impl WTensor {
    fn numel(&self) -> usize {
        numel(&self.shape)
    }

    /// The storage size in bytes (unpadded).
    fn bytes(&self) -> usize {
        self.numel() / self.dtype.block_len() * self.dtype.block_bytes()
    }
}

fn get(tensors: &IdMap<WTensor>, id: TensorId) -> Result<&WTensor> {
    tensors.get(&id).ok_or(GpuError::UnknownTensor(id))
}

/// One wgpu device and queue, its compiled pipelines and its tensors.
pub struct WgpuBackend {
    determinism: Determinism,
    gpu: Gpu,
    stream: Stream,
    matmul: MatmulPipelines,
    tensors: IdMap<WTensor>,
    next_id: u64,
}

impl std::fmt::Debug for WgpuBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WgpuBackend")
            .field("adapter", &self.gpu.info.name)
            .field("tensors", &self.tensors.len())
            .field("pooled_bytes", &self.stream.pooled_bytes())
            .finish()
    }
}

fn u32_of(v: usize) -> u32 {
    // `check_shape` keeps every element count below u32::MAX / 4.
    v as u32
}

/// A shape padded to 4-D with leading 1s.
fn pad4(shape: &[usize]) -> [usize; 4] {
    let mut p = [1usize; 4];
    p[4 - shape.len()..].copy_from_slice(shape);
    p
}

/// Element strides of a 4-D padded shape.
fn strides4(shape: &[usize]) -> [usize; 4] {
    let s = strides(shape);
    let mut p = [0usize; 4];
    p[4 - s.len()..].copy_from_slice(&s);
    p
}

/// One strided copy (see shaders/layout.wgsl): the destination region `dst` (4-D) at element
/// `dst_off` of the output, written where coordinate `win_axis` is in `win_start..win_start + win_len`
/// from source element `src_off + sum (c - window offset) * src_strides`.
struct Copy {
    dst: [usize; 4],
    dst_off: usize,
    win_axis: usize,
    win_start: usize,
    win_len: usize,
    src_off: usize,
    src_strides: [usize; 4],
}

impl Copy {
    /// A plain copy of a whole region whose source is walked with `src_strides`.
    fn full(dst: [usize; 4], src_off: usize, src_strides: [usize; 4]) -> Self {
        Self { dst, dst_off: 0, win_axis: 0, win_start: 0, win_len: dst[0], src_off, src_strides }
    }
}

impl WgpuBackend {
    /// Opens the first adapter and compiles every WGSL kernel; "unavailable: …" when there is no adapter.
    pub fn new(determinism: Determinism) -> Result<Self> {
        // `Instance::new` panics when no backend is compiled in and drivers can misbehave.
        std::panic::catch_unwind(|| Self::start(determinism, None)).unwrap_or_else(|_| Err(device_err("wgpu start panicked")))
    }

    /// Opens adapter `index` in the order `enumerate_adapters` lists them on the primary backends
    /// (the order `ao-gpu-worker capacity` shows), for one queue per device.
    pub fn new_on(index: usize, determinism: Determinism) -> Result<Self> {
        std::panic::catch_unwind(|| Self::start(determinism, Some(index))).unwrap_or_else(|_| Err(device_err("wgpu start panicked")))
    }

    /// How many adapters [`WgpuBackend::new_on`] can open (0 when wgpu finds none).
    pub fn adapter_count() -> usize {
        std::panic::catch_unwind(|| {
            let (instance, backends) = Self::instance();
            pollster::block_on(instance.enumerate_adapters(backends)).len()
        })
        .unwrap_or(0)
    }

    fn instance() -> (::wgpu::Instance, ::wgpu::Backends) {
        let mut desc = ::wgpu::InstanceDescriptor::new_without_display_handle();
        desc.backends = ::wgpu::Backends::PRIMARY;
        desc.flags = ::wgpu::InstanceFlags::empty();
        let desc = desc.with_env();
        let backends = desc.backends;
        (::wgpu::Instance::new(desc), backends)
    }

    fn start(determinism: Determinism, index: Option<usize>) -> Result<Self> {
        let (instance, backends) = Self::instance();
        let adapter = match index {
            None => pollster::block_on(instance.request_adapter(&::wgpu::RequestAdapterOptions {
                power_preference: ::wgpu::PowerPreference::HighPerformance,
                ..Default::default()
            }))
            .map_err(|e| device_err(format!("unavailable: {e}")))?,
            Some(i) => {
                let mut adapters = pollster::block_on(instance.enumerate_adapters(backends));
                let n = adapters.len();
                if i >= n {
                    return Err(device_err(format!("unavailable: no wgpu adapter {i} ({n} found)")));
                }
                adapters.swap_remove(i)
            }
        };
        let info = adapter.get_info();
        let limits = adapter.limits();
        let features = adapter.features();
        let (device, queue) = pollster::block_on(adapter.request_device(&::wgpu::DeviceDescriptor {
            label: Some("ao-gpu-worker tensors"),
            required_features: ::wgpu::Features::empty(),
            required_limits: limits.clone(),
            ..Default::default()
        }))
        .map_err(|e| device_err(format!("request device on {}: {e}", info.name)))?;
        let errors: Arc<Mutex<Option<String>>> = Arc::default();
        let slot = errors.clone();
        device.on_uncaptured_error(Arc::new(move |e| {
            tracing::error!(error = %e, "uncaptured wgpu error");
            if let Ok(mut s) = slot.lock() {
                s.get_or_insert_with(|| e.to_string());
            }
        }));

        let scope = device.push_error_scope(::wgpu::ErrorFilter::Validation);
        let mut kernels = HashMap::new();
        let mut matmul = MatmulPipelines::new(MatmulKernels::for_adapter(&info));
        for file in FILES.iter().filter(|f| f.lang == Lang::Wgsl) {
            if matmul::FILES.contains(&file.path) {
                // Specialized pipelines, compiled on first use (`matmul::MatmulPipelines`).
                matmul.add(&device, file);
                continue;
            }
            let module = device.create_shader_module(::wgpu::ShaderModuleDescriptor {
                label: Some(file.path),
                source: ::wgpu::ShaderSource::Wgsl(compiled_source(file)),
            });
            for entry in file.entries {
                let pipeline = device.create_compute_pipeline(&::wgpu::ComputePipelineDescriptor {
                    label: Some(entry.name),
                    layout: None,
                    module: &module,
                    entry_point: Some(entry.name),
                    compilation_options: Default::default(),
                    cache: None,
                });
                let layout = pipeline.get_bind_group_layout(0);
                kernels.insert(entry.name, Kernel { pipeline, layout });
            }
        }
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(device_err(format!("compiling shaders on {}: {e}", info.name)));
        }
        let matmul = matmul.complete()?;
        tracing::debug!(
            adapter = %info.name,
            max_storage_buffer_binding_size = limits.max_storage_buffer_binding_size,
            max_buffer_size = limits.max_buffer_size,
            subgroup = features.contains(::wgpu::Features::SUBGROUP),
            "wgpu tensor backend ready"
        );
        let gpu = Gpu { info, limits, features, device, queue, kernels, errors };
        let stream = Stream::new(&gpu, MAX_POOLED_BYTES);
        Ok(Self { determinism, gpu, stream, matmul, tensors: IdMap::default(), next_id: 1 })
    }

    pub fn adapter_info(&self) -> &::wgpu::AdapterInfo {
        &self.gpu.info
    }

    /// The adapter limits the backend runs with (the device requests all of them).
    pub fn limits(&self) -> &::wgpu::Limits {
        &self.gpu.limits
    }

    /// The adapter's features (the device requests none; kernels use only core WGSL).
    pub fn features(&self) -> ::wgpu::Features {
        self.gpu.features
    }

    /// The matmul kernel set in use (chosen from the adapter type at start).
    pub fn matmul_kernels(&self) -> MatmulKernels {
        self.matmul.set
    }

    /// Switches the matmul kernel set, e.g. to check the GPU kernels on a CPU adapter; results are
    /// the same in reproducible mode.
    pub fn set_matmul_kernels(&mut self, set: MatmulKernels) {
        self.matmul.set = set;
    }

    /// Command submissions so far: one per op outside a batch, one per batch (plus reads) inside.
    pub fn submissions(&self) -> u64 {
        self.stream.submits
    }

    fn get(&self, id: TensorId) -> Result<&WTensor> {
        get(&self.tensors, id)
    }

    fn insert(&mut self, shape: Vec<usize>, dtype: DType, buf: Arc<::wgpu::Buffer>, ids: Option<IdRange>) -> TensorId {
        let id = TensorId(self.next_id);
        self.next_id += 1;
        self.tensors.insert(id, WTensor { shape, dtype, buf, ids });
        id
    }

    /// A new device buffer holding `bytes` (padded to a multiple of 4).
    fn upload_bytes(&mut self, bytes: &[u8]) -> Result<Arc<::wgpu::Buffer>> {
        let buf = self.stream.alloc(&self.gpu, bytes.len() as u64, Purpose::Upload)?;
        if !bytes.is_empty() {
            if bytes.len().is_multiple_of(4) {
                self.gpu.queue.write_buffer(&buf, 0, bytes);
            } else {
                let mut padded = bytes.to_vec();
                padded.resize(bytes.len().next_multiple_of(4), 0);
                self.gpu.queue.write_buffer(&buf, 0, &padded);
            }
        }
        Ok(Arc::new(buf))
    }

    /// An output buffer for `bytes`.
    fn output(&mut self, bytes: usize) -> Result<Arc<::wgpu::Buffer>> {
        Ok(Arc::new(self.stream.alloc(&self.gpu, bytes as u64, Purpose::Output)?))
    }

    /// Runs a one-input, one-output kernel over `n` elements at 256 per workgroup.
    fn map_op(&mut self, entry: &'static str, x: TensorId, params: &[u32], n: usize, out: &::wgpu::Buffer) -> Result<()> {
        let t = get(&self.tensors, x)?;
        let groups = self.gpu.grid(n, 256);
        self.stream.dispatch(&self.gpu, entry, params, &[(1, &t.buf), (3, out)], groups)
    }

    /// Runs a row kernel (softmax, norms, reductions; `params` start with rows and row length),
    /// making a tensor of `out`; `extra` are further bindings (weights, bias).
    fn row_op(&mut self, entry: &'static str, x: TensorId, out: &Meta, params: &[u32], extra: &[(u32, TensorId)]) -> Result<TensorId> {
        let (out_shape, out_dtype) = (out.shape.clone(), out.dtype);
        let rows = params[0] as usize;
        let out = self.output(numel(&out_shape) * 4)?;
        if numel(&out_shape) > 0 {
            let t = get(&self.tensors, x)?;
            let mut bindings = vec![(1, &*t.buf), (3, &*out)];
            for &(binding, id) in extra {
                bindings.push((binding, &*get(&self.tensors, id)?.buf));
            }
            self.stream.dispatch(&self.gpu, entry, params, &bindings, self.gpu.grid(rows, 64))?;
        }
        self.stream.end_op(&self.gpu)?;
        Ok(self.insert(out_shape, out_dtype, out, None))
    }

    /// Records one strided copy of `src` (element size from `dtype`) into `dst`.
    fn record_copy(&mut self, dtype: DType, src: &::wgpu::Buffer, dst: &::wgpu::Buffer, c: &Copy) -> Result<()> {
        let n = numel(&c.dst);
        if n == 0 {
            return Ok(());
        }
        let [_, d1, d2, d3] = c.dst;
        let [s0, s1, s2, s3] = c.src_strides;
        let (w0, nw) = ((c.dst_off / 2), (c.dst_off + n).div_ceil(2) - c.dst_off / 2);
        let params = [n, c.dst_off, w0, nw, d1, d2, d3, c.win_axis, c.win_start, c.win_len, c.src_off, s0, s1, s2, s3].map(u32_of);
        let (entry, items) = if dtype == DType::F16 { ("copy16", nw) } else { ("copy32", n) };
        let groups = self.gpu.grid(items, 256);
        self.stream.dispatch(&self.gpu, entry, &params, &[(1, src), (3, dst)], groups)
    }

    /// Reads an i32 tensor back to learn its value range (flushes an open batch).
    fn id_range(&mut self, id: TensorId) -> Result<IdRange> {
        let t = self.get(id)?;
        if let Some(r) = t.ids {
            return Ok(r);
        }
        let (buf, bytes) = (t.buf.clone(), t.bytes());
        let raw = self.stream.read(&self.gpu, &buf, bytes as u64)?;
        let r = i32_range(&raw);
        if let Some(t) = self.tensors.get_mut(&id) {
            t.ids = Some(r);
        }
        Ok(r)
    }
}

fn i32_range(bytes: &[u8]) -> IdRange {
    bytes.chunks_exact(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]])).fold(EMPTY, |(lo, hi), v| (lo.min(v), hi.max(v)))
}

impl TensorBackend for WgpuBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Wgpu
    }

    fn describe(&self) -> String {
        format!("wgpu ({}, {})", self.gpu.info.name, self.gpu.info.backend.to_str())
    }

    fn determinism(&self) -> Determinism {
        self.determinism
    }

    fn upload(&mut self, t: &HostTensor) -> Result<TensorId> {
        t.check()?;
        let bytes: Vec<u8> = t.data.iter().flat_map(|v| v.to_le_bytes()).collect();
        let buf = self.upload_bytes(&bytes)?;
        Ok(self.insert(t.shape.clone(), DType::F32, buf, None))
    }

    fn upload_raw(&mut self, t: &RawTensor) -> Result<TensorId> {
        let t = RawTensor::new(t.dtype, t.shape.clone(), t.bytes.clone())?;
        let ids = (t.dtype == DType::I32).then(|| i32_range(&t.bytes));
        let buf = self.upload_bytes(&t.bytes)?;
        Ok(self.insert(t.shape, t.dtype, buf, ids))
    }

    fn read(&mut self, id: TensorId) -> Result<HostTensor> {
        let raw = self.read_raw(id)?;
        let data = quant::dequantize(raw.dtype, &raw.bytes, numel(&raw.shape))?;
        Ok(HostTensor { shape: raw.shape, data })
    }

    fn read_raw(&mut self, id: TensorId) -> Result<RawTensor> {
        let t = self.get(id)?;
        let (shape, dtype, buf, bytes) = (t.shape.clone(), t.dtype, t.buf.clone(), t.bytes());
        let bytes = self.stream.read(&self.gpu, &buf, bytes as u64)?;
        RawTensor::new(dtype, shape, bytes)
    }

    fn free(&mut self, id: TensorId) -> Result<()> {
        let t = self.tensors.remove(&id).ok_or(GpuError::UnknownTensor(id))?;
        self.stream.release(t.buf);
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
                let entry = match self.determinism {
                    Determinism::Reproducible => "softmax_repro",
                    Determinism::Fast => "softmax_fast",
                };
                self.row_op(entry, p.x(0), out, &[u32_of(*rows), u32_of(*last)], &[])
            }
            Launch::Rmsnorm { eps, rows, last } => {
                self.row_op("rmsnorm", p.x(0), out, &[u32_of(*rows), u32_of(*last), eps.to_bits()], &[(2, p.x(1))])
            }
            Launch::Layernorm { eps, rows, last } => {
                let params = [u32_of(*rows), u32_of(*last), eps.to_bits()];
                self.row_op("layernorm", p.x(0), out, &params, &[(2, p.x(1)), (4, p.x(2))])
            }
            Launch::Reduce { op, rows, last } => self.op_reduce(*op, p.x(0), *rows, *last, out),
            Launch::Cast { from, to } => self.op_cast(p.x(0), *from, *to, out),
            Launch::Reshape => {
                let t = self.get(p.x(0))?;
                let (buf, ids) = (t.buf.clone(), t.ids);
                Ok(self.insert(out.shape.clone(), out.dtype, buf, ids))
            }
            Launch::Permute { axes } => self.op_permute(p.x(0), axes, out),
            Launch::Slice { axis, start, .. } => self.op_slice(p.x(0), *axis, *start, out),
            Launch::Concat { axis, .. } => self.op_concat(p.x(0), p.x(1), *axis, out),
            Launch::Append => self.op_append(p.x(0), p.x(1), out),
            Launch::Gather { rows, dim } => self.op_gather(p.x(0), p.x(1), *rows, *dim, out),
            Launch::Rope { pos0, theta, mode, dims } => self.op_rope(p.x(0), *pos0, *theta, *mode, dims, out),
            Launch::Attention { pos0, scale, dims } => self.op_attention([p.x(0), p.x(1), p.x(2)], *pos0, *scale, dims, out),
        }
    }

    fn begin_batch(&mut self) {
        self.stream.batching = true;
    }

    fn end_batch(&mut self) -> Result<()> {
        self.stream.batching = false;
        self.stream.flush(&self.gpu)
    }

    /// The sizes of the device buffers live tensors hold (a buffer shared by views counts once;
    /// buffers are rounded up to the pool's power-of-two size classes).
    fn live_bytes(&self) -> u64 {
        let mut seen = HashSet::new();
        self.tensors.values().filter(|t| seen.insert(Arc::as_ptr(&t.buf))).map(|t| t.buf.size()).sum()
    }
}

/// The ops, on operands `Op::plan` checked; what remains here are the device's own limits (binding
/// sizes) and gather's ids.
impl WgpuBackend {
    fn op_matmul(&mut self, a: TensorId, b: TensorId, dims: &MatmulDims, b_dtype: DType, out_meta: &Meta) -> Result<TensorId> {
        let (ta, tb) = (self.get(a)?, self.get(b)?);
        // The kernels read whole 16-byte vectors; pooled buffers are sized in multiples of 16 except
        // at a binding limit that is not one, where the last bytes could not be read.
        if [ta, tb].iter().any(|t| t.bytes() as u64 > t.buf.size() / 16 * 16) {
            return Err(GpuError::Unsupported { op: "matmul of a tensor at the binding size limit", backend: self.describe() });
        }
        let n = numel(&out_meta.shape);
        let out = self.output(n * 4)?;
        if n > 0 {
            let params = [
                dims.batch,
                dims.m,
                dims.n,
                dims.k,
                dims.stride_a,
                dims.stride_b,
                dims.transpose_a as usize,
                dims.transpose_b as usize,
                b_dtype.code() as usize,
            ]
            .map(u32_of);
            let plan = matmul::plan(self.matmul.set, self.determinism, dims, b_dtype, &self.gpu);
            let kernel = self.matmul.get(&self.gpu, plan.variant)?;
            let (ta, tb) = (get(&self.tensors, a)?, get(&self.tensors, b)?);
            let bindings = [(1, &*ta.buf), (2, &*tb.buf), (3, &*out)];
            self.stream.dispatch_kernel(&self.gpu, kernel, plan.variant.entry, &params, &bindings, plan.groups)?;
        }
        self.stream.end_op(&self.gpu)?;
        Ok(self.insert(out_meta.shape.clone(), DType::F32, out, None))
    }

    fn op_binary(&mut self, op: BinaryOp, a: TensorId, b: TensorId, bc: &Broadcast) -> Result<TensorId> {
        let n = numel(&bc.out_shape);
        let out = self.output(n * 4)?;
        if n > 0 {
            let mut params = vec![u32_of(n), u32_of(bc.out4[1]), u32_of(bc.out4[2]), u32_of(bc.out4[3])];
            params.extend(bc.a_strides.map(u32_of));
            params.extend(bc.b_strides.map(u32_of));
            let (ta, tb) = (get(&self.tensors, a)?, get(&self.tensors, b)?);
            let groups = self.gpu.grid(n, 256);
            self.stream.dispatch(&self.gpu, op.name(), &params, &[(1, &ta.buf), (2, &tb.buf), (3, &out)], groups)?;
        }
        self.stream.end_op(&self.gpu)?;
        Ok(self.insert(bc.out_shape.clone(), DType::F32, out, None))
    }

    fn op_unary(&mut self, op: UnaryOp, x: TensorId, out_meta: &Meta) -> Result<TensorId> {
        let n = numel(&out_meta.shape);
        let out = self.output(n * 4)?;
        if n > 0 {
            // Reproducible mode: the portable functions of `gpu` (`_repro`, bitwise equal to the CPU).
            let repro = self.determinism == Determinism::Reproducible;
            let (entry, factor) = match op {
                UnaryOp::Scale(s) => ("scale", s),
                UnaryOp::Relu => ("relu", 0.0),
                UnaryOp::Gelu if repro => ("gelu_repro", 0.0),
                UnaryOp::Gelu => ("gelu", 0.0),
                UnaryOp::Silu if repro => ("silu_repro", 0.0),
                UnaryOp::Silu => ("silu", 0.0),
                UnaryOp::Tanh if repro => ("tanh_repro", 0.0),
                UnaryOp::Tanh => ("tanh_op", 0.0),
                UnaryOp::Exp if repro => ("exp_repro", 0.0),
                UnaryOp::Exp => ("exp_op", 0.0),
            };
            // `UnaryParams`: n, factor, and a 0 the `_repro` kernels read where the shader compiler
            // must not see a constant (`opaque` in shaders/elementwise.wgsl).
            self.map_op(entry, x, &[u32_of(n), factor.to_bits(), 0], n, &out)?;
        }
        self.stream.end_op(&self.gpu)?;
        Ok(self.insert(out_meta.shape.clone(), DType::F32, out, None))
    }

    fn op_reduce(&mut self, op: ReduceOp, x: TensorId, rows: usize, last: usize, out: &Meta) -> Result<TensorId> {
        let params = [u32_of(rows), u32_of(last)];
        let id = self.row_op(op.name(), x, out, &params, &[])?;
        if op == ReduceOp::Argmax {
            let range = if rows == 0 { EMPTY } else { (0, i32::try_from(last - 1).unwrap_or(i32::MAX)) };
            if let Some(t) = self.tensors.get_mut(&id) {
                t.ids = Some(range);
            }
        }
        Ok(id)
    }

    fn op_cast(&mut self, x: TensorId, from: DType, to: DType, out_meta: &Meta) -> Result<TensorId> {
        const OP: &str = "cast";
        let t = self.get(x)?;
        let (shape, n) = (out_meta.shape.clone(), t.numel());
        if from == to {
            let (buf, ids) = (t.buf.clone(), t.ids);
            return Ok(self.insert(shape, to, buf, ids));
        }
        let (entry, params) = match (from, to) {
            (DType::F32, DType::F16) => ("cast_f32_f16", [n, 0]),
            (DType::F32, DType::I32) => ("cast_f32_i32", [n, 0]),
            (DType::I32, DType::F32) => ("cast_i32_f32", [n, 0]),
            (DType::F32, q) if q.is_quantized() => {
                // GGUF's reference quantizer on the host: a read, `quant::quantize`, an upload.
                let raw = self.read(x)?;
                let bytes = quant::quantize(q, &raw.data)?;
                return self.upload_raw(&RawTensor::new(q, shape, bytes)?);
            }
            // f16 and the block types to f32 (planning allows no other conversion).
            _ => ("dequantize", [n, from.code() as usize]),
        };
        let out = self.output(to.byte_len(OP, &shape)?)?;
        if n > 0 {
            let items = if to == DType::F16 { n.div_ceil(2) } else { n };
            self.map_op(entry, x, &params.map(u32_of), items, &out)?;
        }
        self.stream.end_op(&self.gpu)?;
        Ok(self.insert(shape, to, out, None))
    }

    fn op_permute(&mut self, x: TensorId, axes: &[usize], out_meta: &Meta) -> Result<TensorId> {
        let t = self.get(x)?;
        let (dtype, ids) = (t.dtype, t.ids);
        let in_strides = strides(&t.shape);
        let mut src_strides = [0usize; 4];
        for (i, &a) in axes.iter().enumerate() {
            src_strides[4 - axes.len() + i] = in_strides[a];
        }
        let out = self.output(dtype.byte_len("permute", &out_meta.shape)?)?;
        let src = get(&self.tensors, x)?.buf.clone();
        self.record_copy(dtype, &src, &out, &Copy::full(pad4(&out_meta.shape), 0, src_strides))?;
        self.stream.end_op(&self.gpu)?;
        Ok(self.insert(out_meta.shape.clone(), dtype, out, ids))
    }

    fn op_slice(&mut self, x: TensorId, axis: usize, start: usize, out_meta: &Meta) -> Result<TensorId> {
        let t = self.get(x)?;
        let (dtype, ids) = (t.dtype, t.ids);
        let in_strides = strides4(&t.shape);
        let src_off = start * in_strides[4 - t.shape.len() + axis];
        let src = t.buf.clone();
        let out = self.output(dtype.byte_len("slice", &out_meta.shape)?)?;
        self.record_copy(dtype, &src, &out, &Copy::full(pad4(&out_meta.shape), src_off, in_strides))?;
        self.stream.end_op(&self.gpu)?;
        Ok(self.insert(out_meta.shape.clone(), dtype, out, ids))
    }

    fn op_concat(&mut self, a: TensorId, b: TensorId, axis: usize, out_meta: &Meta) -> Result<TensorId> {
        let (ta, tb) = (self.get(a)?, self.get(b)?);
        let out_shape = out_meta.shape.clone();
        let (dtype, ids) = (ta.dtype, union(ta.ids, tb.ids));
        let (sa, sb) = (strides4(&ta.shape), strides4(&tb.shape));
        let (bufa, bufb) = (ta.buf.clone(), tb.buf.clone());
        let ax = 4 - out_shape.len() + axis;
        let dst = pad4(&out_shape);
        let len_a = ta.shape[axis];
        let out = self.output(dtype.byte_len("concat", &out_shape)?)?;
        let first = Copy { dst, dst_off: 0, win_axis: ax, win_start: 0, win_len: len_a, src_off: 0, src_strides: sa };
        self.record_copy(dtype, &bufa, &out, &first)?;
        let second = Copy { win_start: len_a, win_len: dst[ax] - len_a, src_strides: sb, ..first };
        self.record_copy(dtype, &bufb, &out, &second)?;
        self.stream.end_op(&self.gpu)?;
        Ok(self.insert(out_shape, dtype, out, ids))
    }

    fn op_append(&mut self, cache: TensorId, rows: TensorId, out: &Meta) -> Result<TensorId> {
        let (tc, tr) = (self.get(cache)?, self.get(rows)?);
        let new_shape = out.shape.clone();
        let dtype = tc.dtype;
        let (old_n, add_n) = (tc.numel(), tr.numel());
        let old_bytes = (old_n * dtype.block_bytes()) as u64;
        let new_bytes = ((old_n + add_n) * dtype.block_bytes()).next_multiple_of(4) as u64;
        let ids = union(tc.ids, tr.ids);
        let (mut dst, src) = (tc.buf.clone(), tr.buf.clone());
        // Copy into a new buffer when full, or when another tensor shares the cache's storage (a
        // reshape view, or `rows` itself): views must not see the write.
        let shared = Arc::strong_count(&dst) > 2 || Arc::ptr_eq(&dst, &src);
        if new_bytes > dst.size() || shared {
            // Twice the old capacity where the binding limit allows (past it, `output` refuses).
            let max = self.gpu.max_binding();
            let cap = if new_bytes > max { new_bytes } else { new_bytes.max(dst.size().saturating_mul(2)).min(max) };
            let grown = self.output(cap as usize)?;
            self.stream.copy(&self.gpu, &dst, 0, &grown, 0, old_bytes.next_multiple_of(4));
            if let Some(t) = self.tensors.get_mut(&cache) {
                let old = std::mem::replace(&mut t.buf, grown.clone());
                drop(dst);
                self.stream.release(old);
            }
            dst = grown;
        }
        if add_n > 0 {
            let add_bytes = (add_n * dtype.block_bytes()) as u64;
            if old_bytes.is_multiple_of(4) {
                // The rows' buffer is padded to 4 bytes; the padding lands past the cache's end.
                self.stream.copy(&self.gpu, &src, 0, &dst, old_bytes, add_bytes.next_multiple_of(4));
            } else {
                let region = [1, 1, 1, add_n];
                let c = Copy { dst_off: old_n, ..Copy::full(region, 0, [0, 0, 0, 1]) };
                self.record_copy(dtype, &src, &dst, &c)?;
            }
        }
        if let Some(t) = self.tensors.get_mut(&cache) {
            t.shape = new_shape;
            t.ids = ids;
        }
        self.stream.end_op(&self.gpu)?;
        Ok(cache)
    }

    fn op_gather(&mut self, table: TensorId, ids: TensorId, v: usize, d: usize, out_meta: &Meta) -> Result<TensorId> {
        let dtype = self.get(table)?.dtype;
        let (lo, hi) = self.id_range(ids)?;
        if lo <= hi && (lo < 0 || hi as usize >= v) {
            let bad = if lo < 0 { lo } else { hi };
            return Err(gather_id_err(bad.into(), v));
        }
        let n = numel(&out_meta.shape);
        let out = self.output(n * 4)?;
        if n > 0 {
            let (tt, ti) = (get(&self.tensors, table)?, get(&self.tensors, ids)?);
            let params = [n, dtype.code() as usize, v, d].map(u32_of);
            let groups = self.gpu.grid(n, 256);
            self.stream.dispatch(&self.gpu, "gather_rows", &params, &[(1, &tt.buf), (2, &ti.buf), (3, &out)], groups)?;
        }
        self.stream.end_op(&self.gpu)?;
        Ok(self.insert(out_meta.shape.clone(), DType::F32, out, None))
    }

    fn op_rope(&mut self, x: TensorId, pos0: u32, theta: f32, mode: RopeMode, dims: &RopeDims, out_meta: &Meta) -> Result<TensorId> {
        let shape = out_meta.shape.clone();
        let pairs = numel(&shape) / 2;
        let out = self.output(numel(&shape) * 4)?;
        if pairs > 0 {
            let table: Vec<u8> = rope_table(pos0, dims.seq, dims.dim, theta).iter().flat_map(|v| v.to_le_bytes()).collect();
            let table = self.upload_bytes(&table)?;
            let params = [pairs, dims.seq, dims.heads, dims.dim, mode.ggml_code() as usize].map(u32_of);
            let t = get(&self.tensors, x)?;
            let groups = self.gpu.grid(pairs, 256);
            self.stream.dispatch(&self.gpu, "rope", &params, &[(1, &t.buf), (2, &table), (3, &out)], groups)?;
            self.stream.release(table);
        }
        self.stream.end_op(&self.gpu)?;
        Ok(self.insert(shape, DType::F32, out, None))
    }

    fn op_attention(&mut self, [q, k, v]: [TensorId; 3], pos0: u32, scale: f32, d: &AttentionDims, out_meta: &Meta) -> Result<TensorId> {
        let shape = out_meta.shape.clone();
        let rows = d.batch * d.tq * d.hq;
        // The scores buffer is this device's own limit.
        let scores = rows
            .checked_mul(d.tk)
            .filter(|&s| s <= u32::MAX as usize / 4)
            .ok_or_else(|| shape_err("attention", format!("{rows} query rows x {} keys is too large", d.tk)))?;
        let out = self.output(numel(&shape) * 4)?;
        if numel(&shape) > 0 {
            let s = self.output(scores * 4)?;
            let params = [d.batch, d.tq, d.tk, d.hq, d.hkv, d.dim, pos0 as usize].map(u32_of);
            let mut params = params.to_vec();
            params.push(scale.to_bits());
            let (tq, tk, tv) = (get(&self.tensors, q)?, get(&self.tensors, k)?, get(&self.tensors, v)?);
            let softmax = match self.determinism {
                Determinism::Reproducible => "attn_softmax_repro",
                Determinism::Fast => "attn_softmax_fast",
            };
            let g = &self.gpu;
            self.stream.dispatch(g, "attn_scores", &params, &[(1, &tq.buf), (2, &tk.buf), (3, &s)], g.grid(scores, 64))?;
            self.stream.dispatch(g, softmax, &params, &[(3, &s)], g.grid(rows, 64))?;
            self.stream.dispatch(g, "attn_values", &params, &[(1, &s), (2, &tv.buf), (3, &out)], g.grid(numel(&shape), 64))?;
            self.stream.release(s);
        }
        self.stream.end_op(&self.gpu)?;
        Ok(self.insert(shape, DType::F32, out, None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn padded_shapes_and_strides() {
        assert_eq!(pad4(&[3, 5]), [1, 1, 3, 5]);
        assert_eq!(strides4(&[2, 3, 4]), [0, 12, 4, 1]);
        assert_eq!(union(Some((0, 3)), Some((-1, 2))), Some((-1, 3)));
        assert_eq!(union(Some(EMPTY), Some((4, 4))), Some((4, 4)));
        assert_eq!(union(None, Some((4, 4))), None);
        let bytes: Vec<u8> = [5i32, -2, 9].iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(i32_range(&bytes), (-2, 9));
        assert_eq!(i32_range(&[]), EMPTY);
    }
}

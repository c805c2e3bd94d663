//! The wgpu backend: WGSL kernels from `shaders/` (through the registry in [`super::kernels`]) on the
//! first adapter of the primary backends (Vulkan, Metal, DX12; `WGPU_BACKEND` and the other `WGPU_*`
//! variables override, as in the capacity probe). Every pipeline is compiled once, when the backend
//! starts, and cached by entry-point name. Tensors live in pooled storage buffers ([`pool`]); only
//! [`TensorBackend::read`] maps memory back to the host.
//!
//! Nothing here panics on caller input: shapes are validated before any wgpu call, allocation runs
//! inside an out-of-memory error scope, bind groups and dispatches inside a validation error scope,
//! and uncaptured errors are logged instead of hitting wgpu's default (panicking) handler.

mod pool;

use std::collections::HashMap;
use std::sync::Arc;

use ::wgpu::util::DeviceExt;

use self::pool::BufferPool;
use super::kernels::{FILES, Lang};
use super::{
    BackendKind, BinaryOp, Determinism, GpuError, HostTensor, ReduceOp, Result, TensorBackend, TensorId, UnaryOp, broadcast, check_param,
    check_shape, matmul_dims, numel, reduced_shape, rows_last, shape_err,
};

/// Freed buffers kept for reuse, at most this many bytes.
const MAX_POOLED_BYTES: u64 = 256 << 20;

struct WTensor {
    shape: Vec<usize>,
    buf: ::wgpu::Buffer,
}

/// One wgpu device and queue, its compiled pipelines and its tensors.
pub struct WgpuBackend {
    determinism: Determinism,
    info: ::wgpu::AdapterInfo,
    limits: ::wgpu::Limits,
    device: ::wgpu::Device,
    queue: ::wgpu::Queue,
    pipelines: HashMap<&'static str, ::wgpu::ComputePipeline>,
    tensors: HashMap<TensorId, WTensor>,
    pool: BufferPool,
    next_id: u64,
}

impl std::fmt::Debug for WgpuBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WgpuBackend")
            .field("adapter", &self.info.name)
            .field("tensors", &self.tensors.len())
            .field("pooled_bytes", &self.pool.pooled_bytes())
            .finish()
    }
}

fn device_err(what: impl std::fmt::Display) -> GpuError {
    GpuError::Device(what.to_string())
}

impl WgpuBackend {
    /// Opens the first adapter and compiles every WGSL kernel; "unavailable: …" when there is no adapter.
    pub fn new(determinism: Determinism) -> Result<Self> {
        // `Instance::new` panics when no backend is compiled in and drivers can misbehave.
        std::panic::catch_unwind(|| Self::start(determinism)).unwrap_or_else(|_| Err(device_err("wgpu start panicked")))
    }

    fn start(determinism: Determinism) -> Result<Self> {
        let mut desc = ::wgpu::InstanceDescriptor::new_without_display_handle();
        desc.backends = ::wgpu::Backends::PRIMARY;
        desc.flags = ::wgpu::InstanceFlags::empty();
        let instance = ::wgpu::Instance::new(desc.with_env());
        let adapter = pollster::block_on(instance.request_adapter(&::wgpu::RequestAdapterOptions {
            power_preference: ::wgpu::PowerPreference::HighPerformance,
            ..Default::default()
        }))
        .map_err(|e| device_err(format!("unavailable: {e}")))?;
        let info = adapter.get_info();
        let limits = adapter.limits();
        let (device, queue) = pollster::block_on(adapter.request_device(&::wgpu::DeviceDescriptor {
            label: Some("ao-gpu-worker tensors"),
            required_features: ::wgpu::Features::empty(),
            required_limits: limits.clone(),
            ..Default::default()
        }))
        .map_err(|e| device_err(format!("request device on {}: {e}", info.name)))?;
        device.on_uncaptured_error(Arc::new(|e| tracing::error!(error = %e, "uncaptured wgpu error")));

        let scope = device.push_error_scope(::wgpu::ErrorFilter::Validation);
        let mut pipelines = HashMap::new();
        for file in FILES.iter().filter(|f| f.lang == Lang::Wgsl) {
            let module = device.create_shader_module(::wgpu::ShaderModuleDescriptor {
                label: Some(file.path),
                source: ::wgpu::ShaderSource::Wgsl(file.source.into()),
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
                pipelines.insert(entry.name, pipeline);
            }
        }
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(device_err(format!("compiling shaders on {}: {e}", info.name)));
        }
        let pool = BufferPool::new(MAX_POOLED_BYTES);
        Ok(Self { determinism, info, limits, device, queue, pipelines, tensors: HashMap::new(), pool, next_id: 1 })
    }

    pub fn adapter_info(&self) -> &::wgpu::AdapterInfo {
        &self.info
    }

    fn get(&self, id: TensorId) -> Result<&WTensor> {
        self.tensors.get(&id).ok_or(GpuError::UnknownTensor(id))
    }

    fn insert(&mut self, shape: Vec<usize>, buf: ::wgpu::Buffer) -> TensorId {
        let id = TensorId(self.next_id);
        self.next_id += 1;
        self.tensors.insert(id, WTensor { shape, buf });
        id
    }

    /// A storage buffer for `n` f32 values (contents undefined), from the pool when possible.
    fn alloc(&mut self, n: usize) -> Result<::wgpu::Buffer> {
        let bytes = (n.max(1) * 4) as u64;
        let max = self.limits.max_storage_buffer_binding_size.min(self.limits.max_buffer_size);
        if bytes > max {
            return Err(GpuError::OutOfMemory { requested: bytes, available: max });
        }
        let class = BufferPool::class(bytes, max);
        if let Some(buf) = self.pool.take(class) {
            return Ok(buf);
        }
        let scope = self.device.push_error_scope(::wgpu::ErrorFilter::OutOfMemory);
        let buf = self.device.create_buffer(&::wgpu::BufferDescriptor {
            label: Some("tensor"),
            size: class,
            usage: ::wgpu::BufferUsages::STORAGE | ::wgpu::BufferUsages::COPY_SRC | ::wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        if let Some(e) = pollster::block_on(scope.pop()) {
            tracing::warn!(error = %e, bytes = class, "wgpu allocation failed");
            return Err(GpuError::OutOfMemory { requested: class, available: 0 });
        }
        Ok(buf)
    }

    /// Runs one kernel: `params` (u32 words, floats as bits) at binding 0, `bindings` after it.
    fn dispatch(&self, entry: &str, params: &[u32], bindings: &[(u32, &::wgpu::Buffer)], groups: [u32; 3]) -> Result<()> {
        let pipeline = self.pipelines.get(entry).ok_or_else(|| device_err(format!("kernel {entry} is not registered")))?;
        let max = self.limits.max_compute_workgroups_per_dimension;
        if groups.iter().any(|&g| g > max) {
            return Err(GpuError::Unsupported {
                op: "dispatch larger than max_compute_workgroups_per_dimension",
                backend: self.describe(),
            });
        }
        let mut words = params.to_vec();
        words.resize(params.len().div_ceil(4).max(1) * 4, 0);
        let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        let scope = self.device.push_error_scope(::wgpu::ErrorFilter::Validation);
        let ubuf = self.device.create_buffer_init(&::wgpu::util::BufferInitDescriptor {
            label: Some("params"),
            contents: &bytes,
            usage: ::wgpu::BufferUsages::UNIFORM,
        });
        let mut entries = vec![::wgpu::BindGroupEntry { binding: 0, resource: ubuf.as_entire_binding() }];
        entries.extend(bindings.iter().map(|&(binding, buf)| ::wgpu::BindGroupEntry { binding, resource: buf.as_entire_binding() }));
        let bind_group = self.device.create_bind_group(&::wgpu::BindGroupDescriptor {
            label: Some(entry),
            layout: &pipeline.get_bind_group_layout(0),
            entries: &entries,
        });
        let mut encoder = self.device.create_command_encoder(&::wgpu::CommandEncoderDescriptor { label: Some(entry) });
        {
            let mut pass = encoder.begin_compute_pass(&::wgpu::ComputePassDescriptor { label: Some(entry), timestamp_writes: None });
            pass.set_pipeline(pipeline);
            pass.set_bind_group(0, &bind_group, &[]);
            pass.dispatch_workgroups(groups[0], groups[1], groups[2]);
        }
        self.queue.submit([encoder.finish()]);
        match pollster::block_on(scope.pop()) {
            Some(e) => Err(device_err(format!("{entry}: {e}"))),
            None => Ok(()),
        }
    }

    /// A 2-D grid of workgroups covering `items` invocations at `per_group` each.
    fn grid(&self, items: usize, per_group: usize) -> [u32; 3] {
        let groups = items.div_ceil(per_group).max(1);
        let x = groups.min(self.limits.max_compute_workgroups_per_dimension as usize);
        [x as u32, groups.div_ceil(x) as u32, 1]
    }

    fn row_op(
        &mut self,
        entry: &'static str,
        x: TensorId,
        out_shape: Vec<usize>,
        params: &[u32],
        extra: &[(u32, TensorId)],
    ) -> Result<TensorId> {
        let (rows, _) = rows_last(&self.get(x)?.shape);
        let out = self.alloc(numel(&out_shape))?;
        if numel(&out_shape) > 0 {
            let t = self.get(x)?;
            let mut bindings = vec![(1, &t.buf), (3, &out)];
            for &(binding, id) in extra {
                bindings.push((binding, &self.get(id)?.buf));
            }
            self.dispatch(entry, params, &bindings, self.grid(rows, 64))?;
        }
        Ok(self.insert(out_shape, out))
    }
}

fn u32_of(v: usize) -> u32 {
    // `check_shape` keeps every element count below u32::MAX / 4.
    v as u32
}

impl TensorBackend for WgpuBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Wgpu
    }

    fn describe(&self) -> String {
        format!("wgpu ({}, {})", self.info.name, self.info.backend.to_str())
    }

    fn determinism(&self) -> Determinism {
        self.determinism
    }

    fn upload(&mut self, t: &HostTensor) -> Result<TensorId> {
        let t = HostTensor::new(t.shape.clone(), t.data.clone())?;
        let buf = self.alloc(t.data.len())?;
        if !t.data.is_empty() {
            let bytes: Vec<u8> = t.data.iter().flat_map(|v| v.to_le_bytes()).collect();
            self.queue.write_buffer(&buf, 0, &bytes);
        }
        Ok(self.insert(t.shape, buf))
    }

    fn read(&mut self, id: TensorId) -> Result<HostTensor> {
        let t = self.get(id)?;
        let n = numel(&t.shape);
        if n == 0 {
            return Ok(HostTensor { shape: t.shape.clone(), data: Vec::new() });
        }
        let bytes = (n * 4) as u64;
        let staging = self.device.create_buffer(&::wgpu::BufferDescriptor {
            label: Some("read"),
            size: bytes,
            usage: ::wgpu::BufferUsages::MAP_READ | ::wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut encoder = self.device.create_command_encoder(&::wgpu::CommandEncoderDescriptor { label: Some("read") });
        encoder.copy_buffer_to_buffer(&t.buf, 0, &staging, 0, bytes);
        self.queue.submit([encoder.finish()]);
        let (tx, rx) = std::sync::mpsc::channel();
        staging.slice(..).map_async(::wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
        self.device.poll(::wgpu::PollType::wait_indefinitely()).map_err(|e| device_err(format!("poll: {e}")))?;
        rx.recv().map_err(|_| device_err("map callback dropped"))?.map_err(|e| device_err(format!("map: {e}")))?;
        let data = {
            let view = staging.slice(..).get_mapped_range().map_err(|e| device_err(format!("mapped range: {e}")))?;
            view.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
        };
        staging.unmap();
        Ok(HostTensor { shape: t.shape.clone(), data })
    }

    fn free(&mut self, id: TensorId) -> Result<()> {
        let t = self.tensors.remove(&id).ok_or(GpuError::UnknownTensor(id))?;
        self.pool.put(t.buf);
        Ok(())
    }

    fn shape(&self, id: TensorId) -> Result<Vec<usize>> {
        Ok(self.get(id)?.shape.clone())
    }

    fn matmul(&mut self, a: TensorId, b: TensorId, transpose_a: bool, transpose_b: bool) -> Result<TensorId> {
        let (dims, out_shape) = matmul_dims(&self.get(a)?.shape, &self.get(b)?.shape, transpose_a, transpose_b)?;
        let out = self.alloc(numel(&out_shape))?;
        if numel(&out_shape) > 0 {
            let params =
                [dims.batch, dims.m, dims.n, dims.k, dims.stride_a, dims.stride_b, transpose_a as usize, transpose_b as usize].map(u32_of);
            let (entry, tile) = match self.determinism {
                Determinism::Reproducible => ("matmul_naive", 8),
                Determinism::Fast => ("matmul_tiled", 64),
            };
            let groups = [dims.n.div_ceil(tile), dims.m.div_ceil(tile), dims.batch].map(u32_of);
            let (ta, tb) = (self.get(a)?, self.get(b)?);
            self.dispatch(entry, &params, &[(1, &ta.buf), (2, &tb.buf), (3, &out)], groups)?;
        }
        Ok(self.insert(out_shape, out))
    }

    fn binary(&mut self, op: BinaryOp, a: TensorId, b: TensorId) -> Result<TensorId> {
        let bc = broadcast(op.name(), &self.get(a)?.shape, &self.get(b)?.shape)?;
        let n = numel(&bc.out_shape);
        let out = self.alloc(n)?;
        if n > 0 {
            let mut params = vec![u32_of(n), u32_of(bc.out4[1]), u32_of(bc.out4[2]), u32_of(bc.out4[3])];
            params.extend(bc.a_strides.map(u32_of));
            params.extend(bc.b_strides.map(u32_of));
            let (ta, tb) = (self.get(a)?, self.get(b)?);
            self.dispatch(op.name(), &params, &[(1, &ta.buf), (2, &tb.buf), (3, &out)], self.grid(n, 256))?;
        }
        Ok(self.insert(bc.out_shape, out))
    }

    fn unary(&mut self, op: UnaryOp, x: TensorId) -> Result<TensorId> {
        let shape = self.get(x)?.shape.clone();
        let n = numel(&shape);
        let out = self.alloc(n)?;
        if n > 0 {
            let (entry, factor) = match op {
                UnaryOp::Scale(s) => ("scale", s),
                UnaryOp::Relu => ("relu", 0.0),
                UnaryOp::Gelu => ("gelu", 0.0),
                UnaryOp::Silu => ("silu", 0.0),
                UnaryOp::Tanh => ("tanh_op", 0.0),
                UnaryOp::Exp => ("exp_op", 0.0),
            };
            let t = self.get(x)?;
            self.dispatch(entry, &[u32_of(n), factor.to_bits()], &[(1, &t.buf), (3, &out)], self.grid(n, 256))?;
        }
        Ok(self.insert(shape, out))
    }

    fn softmax_last(&mut self, x: TensorId) -> Result<TensorId> {
        let shape = self.get(x)?.shape.clone();
        let (rows, last) = rows_last(&shape);
        let entry = match self.determinism {
            Determinism::Reproducible => "softmax_repro",
            Determinism::Fast => "softmax_fast",
        };
        self.row_op(entry, x, shape, &[u32_of(rows), u32_of(last)], &[])
    }

    fn rmsnorm(&mut self, x: TensorId, weight: TensorId, eps: f32) -> Result<TensorId> {
        let shape = self.get(x)?.shape.clone();
        check_param("rmsnorm", "weight", &shape, &self.get(weight)?.shape)?;
        let (rows, last) = rows_last(&shape);
        self.row_op("rmsnorm", x, shape, &[u32_of(rows), u32_of(last), eps.to_bits()], &[(2, weight)])
    }

    fn layernorm(&mut self, x: TensorId, weight: TensorId, bias: TensorId, eps: f32) -> Result<TensorId> {
        let shape = self.get(x)?.shape.clone();
        check_param("layernorm", "weight", &shape, &self.get(weight)?.shape)?;
        check_param("layernorm", "bias", &shape, &self.get(bias)?.shape)?;
        let (rows, last) = rows_last(&shape);
        self.row_op("layernorm", x, shape, &[u32_of(rows), u32_of(last), eps.to_bits()], &[(2, weight), (4, bias)])
    }

    fn reduce_last(&mut self, op: ReduceOp, x: TensorId) -> Result<TensorId> {
        let shape = self.get(x)?.shape.clone();
        let (rows, last) = rows_last(&shape);
        if op == ReduceOp::Argmax && last == 0 {
            return Err(shape_err("argmax_last", format!("the last axis of {shape:?} is empty")));
        }
        let out_shape = reduced_shape(&shape);
        check_shape(op.name(), &out_shape)?;
        self.row_op(op.name(), x, out_shape, &[u32_of(rows), u32_of(last)], &[])
    }
}

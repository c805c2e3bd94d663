//! Command recording for the wgpu backend: every dispatch and buffer copy goes into one open
//! [`Recording`] (a command encoder with one compute pass kept open between dispatches), which is
//! submitted by [`Stream::flush`]: after each op outside a batch, or once at `end_batch` (or before a
//! read) inside one. Kernel parameters go to a uniform arena written once per submission.
//!
//! Ordering hazards this module owns:
//! * `queue.write_buffer` (uploads, the parameter arena) runs before the *next* submission, i.e.
//!   before every command still being recorded. So a buffer freed while a recording is open may
//!   still be read by recorded commands; it is parked in `pending` until the submission and only
//!   reused meanwhile as the *output* of a later recorded command (ordered after those reads), never
//!   as the target of an upload.
//! * The parameter arena is rewritten for each submission; queue order puts that write after the
//!   previous submission's reads.
//! * Validation errors are not captured with an error scope per dispatch (scopes are thread-local
//!   and cost a pop each): the device's uncaptured-error handler stores the first error and every
//!   flush reports it as [`GpuError::Device`].

use std::collections::HashMap;
use std::num::NonZeroU64;
use std::sync::{Arc, Mutex};

use super::pool::BufferPool;
use crate::gpu::{GpuError, Result};

/// Bytes of one kernel's parameters (16 u32 words; every params struct in `shaders/` fits).
pub(super) const PARAM_BYTES: u64 = 64;
/// Parameter slots per arena chunk.
const SLOTS_PER_CHUNK: u64 = 256;

pub(super) fn device_err(what: impl std::fmt::Display) -> GpuError {
    GpuError::Device(what.to_string())
}

/// A compiled kernel and its bind group layout (fetched once, not per dispatch).
pub(super) struct Kernel {
    pub pipeline: wgpu::ComputePipeline,
    pub layout: wgpu::BindGroupLayout,
}

/// The device side that does not change after start-up.
pub(super) struct Gpu {
    pub info: wgpu::AdapterInfo,
    pub limits: wgpu::Limits,
    pub features: wgpu::Features,
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    pub kernels: HashMap<&'static str, Kernel>,
    /// The first error the uncaptured-error handler saw since the last flush.
    pub errors: Arc<Mutex<Option<String>>>,
}

impl Gpu {
    /// The largest buffer a kernel can bind.
    pub fn max_binding(&self) -> u64 {
        self.limits.max_storage_buffer_binding_size.min(self.limits.max_buffer_size)
    }

    fn take_error(&self) -> Result<()> {
        let e = self.errors.lock().map_err(|_| device_err("error slot poisoned"))?.take();
        match e {
            Some(e) => Err(device_err(e)),
            None => Ok(()),
        }
    }

    /// A 2-D grid of workgroups covering `items` invocations at `per_group` each.
    pub fn grid(&self, items: usize, per_group: usize) -> [u32; 3] {
        let groups = items.div_ceil(per_group).max(1);
        let x = groups.min(self.limits.max_compute_workgroups_per_dimension as usize);
        [x as u32, groups.div_ceil(x).min(u32::MAX as usize) as u32, 1]
    }
}

/// What a new buffer is for, which decides whether a buffer freed in the open recording may be reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Purpose {
    /// Written by `queue.write_buffer`: only buffers no recorded command can still read.
    Upload,
    /// Written by a recorded command.
    Output,
}

struct Recording {
    encoder: wgpu::CommandEncoder,
    /// The open compute pass; ended (dropped) before a copy is recorded and at submission.
    pass: Option<wgpu::ComputePass<'static>>,
}

/// Uniform parameter slots: host bytes staged during a recording, written with one
/// `write_buffer` per used chunk at submission.
#[derive(Default)]
struct Arena {
    chunks: Vec<wgpu::Buffer>,
    staged: Vec<u8>,
    used: u64,
    slot: u64,
}

/// Recording state, buffer reuse and readback.
pub(super) struct Stream {
    rec: Option<Recording>,
    pub batching: bool,
    pool: BufferPool,
    pending: Vec<wgpu::Buffer>,
    arena: Arena,
    staging: Option<wgpu::Buffer>,
    /// Submissions so far (for tests and logs).
    pub submits: u64,
}

impl Stream {
    pub fn new(gpu: &Gpu, max_pooled_bytes: u64) -> Self {
        let align = u64::from(gpu.limits.min_uniform_buffer_offset_alignment).max(1);
        let slot = PARAM_BYTES.div_ceil(align) * align;
        Self {
            rec: None,
            batching: false,
            pool: BufferPool::new(max_pooled_bytes),
            pending: Vec::new(),
            arena: Arena { slot, ..Default::default() },
            staging: None,
            submits: 0,
        }
    }

    pub fn pooled_bytes(&self) -> u64 {
        self.pool.pooled_bytes()
    }

    /// A storage buffer of at least `bytes` (rounded up to a pool size class; contents undefined).
    pub fn alloc(&mut self, gpu: &Gpu, bytes: u64, purpose: Purpose) -> Result<wgpu::Buffer> {
        let bytes = bytes.max(4).next_multiple_of(4);
        let max = gpu.max_binding();
        if bytes > max {
            return Err(GpuError::OutOfMemory { requested: bytes, available: max });
        }
        let class = BufferPool::class(bytes, max);
        if purpose == Purpose::Output
            && let Some(i) = self.pending.iter().position(|b| b.size() == class)
        {
            return Ok(self.pending.swap_remove(i));
        }
        if let Some(buf) = self.pool.take(class) {
            return Ok(buf);
        }
        let scope = gpu.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let buf = gpu.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("tensor"),
            size: class,
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        if let Some(e) = pollster::block_on(scope.pop()) {
            tracing::warn!(error = %e, bytes = class, "wgpu allocation failed");
            return Err(GpuError::OutOfMemory { requested: class, available: 0 });
        }
        Ok(buf)
    }

    /// Gives a tensor's buffer back: pooled now, or after the submission when a recorded command
    /// may still read it. A buffer another tensor still shares is just dropped from this one.
    pub fn release(&mut self, buf: Arc<wgpu::Buffer>) {
        if let Ok(buf) = Arc::try_unwrap(buf) {
            if self.rec.is_some() {
                self.pending.push(buf);
            } else {
                self.pool.put(buf);
            }
        }
    }

    fn recording(&mut self, gpu: &Gpu) -> &mut Recording {
        self.rec.get_or_insert_with(|| Recording {
            encoder: gpu.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("ops") }),
            pass: None,
        })
    }

    /// Stages `params` (u32 words, floats as bits) and returns the arena chunk and byte offset.
    fn push_params(&mut self, gpu: &Gpu, params: &[u32]) -> Result<(usize, u64)> {
        if params.len() as u64 * 4 > PARAM_BYTES {
            return Err(device_err(format!("{} parameter words do not fit a slot", params.len())));
        }
        let a = &mut self.arena;
        let index = a.used;
        let chunk = (index / SLOTS_PER_CHUNK) as usize;
        if chunk >= a.chunks.len() {
            a.chunks.push(gpu.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("params"),
                size: a.slot * SLOTS_PER_CHUNK,
                usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            }));
        }
        let start = (index * a.slot) as usize;
        a.staged.resize(start + a.slot as usize, 0);
        for (dst, w) in a.staged[start..].chunks_exact_mut(4).zip(params) {
            dst.copy_from_slice(&w.to_le_bytes());
        }
        a.used += 1;
        Ok((chunk, (index % SLOTS_PER_CHUNK) * a.slot))
    }

    /// Records one kernel launch: `params` at binding 0, `bindings` after it.
    pub fn dispatch(&mut self, gpu: &Gpu, entry: &str, params: &[u32], bindings: &[(u32, &wgpu::Buffer)], groups: [u32; 3]) -> Result<()> {
        let kernel = gpu.kernels.get(entry).ok_or_else(|| device_err(format!("kernel {entry} is not registered")))?;
        self.dispatch_kernel(gpu, kernel, entry, params, bindings, groups)
    }

    /// [`Stream::dispatch`] of a pipeline the caller holds (the specialized matmul kernels).
    pub fn dispatch_kernel(
        &mut self,
        gpu: &Gpu,
        kernel: &Kernel,
        entry: &str,
        params: &[u32],
        bindings: &[(u32, &wgpu::Buffer)],
        groups: [u32; 3],
    ) -> Result<()> {
        let max = gpu.limits.max_compute_workgroups_per_dimension;
        if groups.iter().any(|&g| g > max) {
            return Err(GpuError::Unsupported {
                op: "dispatch larger than max_compute_workgroups_per_dimension",
                backend: format!("wgpu ({})", gpu.info.name),
            });
        }
        if groups.contains(&0) {
            return Ok(());
        }
        let (chunk, offset) = self.push_params(gpu, params)?;
        let mut entries = Vec::with_capacity(bindings.len() + 1);
        entries.push(wgpu::BindGroupEntry {
            binding: 0,
            resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                buffer: &self.arena.chunks[chunk],
                offset,
                size: NonZeroU64::new(PARAM_BYTES),
            }),
        });
        entries.extend(bindings.iter().map(|&(binding, buf)| wgpu::BindGroupEntry { binding, resource: buf.as_entire_binding() }));
        let bind_group =
            gpu.device.create_bind_group(&wgpu::BindGroupDescriptor { label: Some(entry), layout: &kernel.layout, entries: &entries });
        let rec = self.recording(gpu);
        let pass = rec.pass.get_or_insert_with(|| {
            rec.encoder.begin_compute_pass(&wgpu::ComputePassDescriptor { label: Some("ops"), timestamp_writes: None }).forget_lifetime()
        });
        pass.set_pipeline(&kernel.pipeline);
        pass.set_bind_group(0, &bind_group, &[]);
        pass.dispatch_workgroups(groups[0], groups[1], groups[2]);
        Ok(())
    }

    /// Records a buffer-to-buffer copy (offsets and size multiples of 4).
    pub fn copy(&mut self, gpu: &Gpu, src: &wgpu::Buffer, src_off: u64, dst: &wgpu::Buffer, dst_off: u64, bytes: u64) {
        if bytes == 0 {
            return;
        }
        let rec = self.recording(gpu);
        rec.pass = None;
        rec.encoder.copy_buffer_to_buffer(src, src_off, dst, dst_off, bytes);
    }

    /// Ends an op: submits unless a batch is open.
    pub fn end_op(&mut self, gpu: &Gpu) -> Result<()> {
        if self.batching { Ok(()) } else { self.flush(gpu) }
    }

    /// Submits everything recorded (parameters first), then reports any device error since the last flush.
    pub fn flush(&mut self, gpu: &Gpu) -> Result<()> {
        if let Some(mut rec) = self.rec.take() {
            rec.pass = None;
            let a = &mut self.arena;
            let chunk_bytes = (a.slot * SLOTS_PER_CHUNK) as usize;
            for (buf, bytes) in a.chunks.iter().zip(a.staged.chunks(chunk_bytes)) {
                gpu.queue.write_buffer(buf, 0, bytes);
            }
            a.staged.clear();
            a.used = 0;
            gpu.queue.submit([rec.encoder.finish()]);
            self.submits += 1;
            for buf in self.pending.drain(..) {
                self.pool.put(buf);
            }
            // Lets wgpu retire finished submissions without blocking.
            let _ = gpu.device.poll(wgpu::PollType::Poll);
        }
        gpu.take_error()
    }

    /// Copies the first `bytes` of `buf` to the host (flushing everything recorded first).
    pub fn read(&mut self, gpu: &Gpu, buf: &wgpu::Buffer, bytes: u64) -> Result<Vec<u8>> {
        if bytes == 0 {
            return Ok(Vec::new());
        }
        let padded = bytes.next_multiple_of(4);
        let staging = match &self.staging {
            Some(s) if s.size() >= padded => s.clone(),
            _ => {
                let s = gpu.device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some("read"),
                    size: padded.next_power_of_two().max(256),
                    usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                    mapped_at_creation: false,
                });
                self.staging = Some(s.clone());
                s
            }
        };
        self.copy(gpu, buf, 0, &staging, 0, padded);
        self.flush(gpu)?;
        let slice = staging.slice(..padded);
        let (tx, rx) = std::sync::mpsc::channel();
        slice.map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
        gpu.device.poll(wgpu::PollType::wait_indefinitely()).map_err(|e| device_err(format!("poll: {e}")))?;
        rx.recv().map_err(|_| device_err("map callback dropped"))?.map_err(|e| device_err(format!("map: {e}")))?;
        let out = {
            let view = slice.get_mapped_range().map_err(|e| device_err(format!("mapped range: {e}")))?;
            view.get(..bytes as usize).map(<[u8]>::to_vec).ok_or_else(|| device_err("short mapping"))?
        };
        staging.unmap();
        gpu.take_error()?;
        Ok(out)
    }
}

//! Seeded inputs and the timed [`Workload`] with its device sync: what one timed iteration of a
//! tensor op is, for the criterion benches in `benches/` and for the `bench` subcommand's suite.
//!
//! # One timed iteration
//! A [`Workload`] uploads its inputs once. Each iteration runs the op, frees its output, and then
//! calls [`sync`]: a `read` of a 1-element sentinel tensor. On wgpu that read is a submit, a buffer
//! map and `device.poll(wait)`, which returns only once every earlier submission on the backend's
//! one in-order queue has finished, so the clock covers the kernel's execution and not only its
//! enqueue; on CUDA the read's copy runs on the same stream after the kernel; on the CPU it is a
//! copy of one value. That sync is part of every figure, as it is part of any guest computation
//! that ends with a read; `benches/tensor.rs` times it alone (`sync/read_1`) so it can be
//! subtracted.
//!
//! It knows only `gpu`: nothing of the runtime, the daemon or bench.json.

use std::fmt;
use std::time::Duration;

use crate::gpu::{self, Backend, DType, GpuError, HostTensor, QK, RawTensor, TensorId, TensorOps};

// ---- inputs ----------------------------------------------------------------------------------

/// A fixed 64-bit LCG: every run times the same data.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        self.0 >> 33
    }

    /// Uniform in [-1, 1).
    fn value(&mut self) -> f32 {
        (self.next() & 0xff_ffff) as f32 / (1 << 23) as f32 - 1.0
    }
}

/// `n` pseudo-random values in [-1, 1), the same for the same seed.
pub fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = Lcg(seed);
    (0..n).map(|_| rng.value()).collect()
}

/// An f32 tensor of pseudo-random values in [-1, 1).
pub fn host(shape: &[usize], seed: u64) -> HostTensor {
    HostTensor { shape: shape.to_vec(), data: values(shape.iter().product(), seed) }
}

/// GGUF blocks of `dtype` (q8_0, q4_0 or q4_1) for a tensor of `shape` (last axis a multiple of 32):
/// pseudo-random quants with a small finite f16 scale (2^-7) and, for q4_1, offset (-2^-6), so the
/// values are those of a real weight matrix in size, not in content.
pub fn quantized(dtype: DType, shape: &[usize], seed: u64) -> gpu::Result<RawTensor> {
    const D: u16 = 0x2000;
    const M: u16 = 0xa400;
    let len = dtype.byte_len("bench", shape)?;
    let blocks = shape.iter().product::<usize>() / QK;
    let mut rng = Lcg(seed);
    let mut bytes = Vec::with_capacity(len);
    for _ in 0..blocks {
        bytes.extend(D.to_le_bytes());
        let quants = match dtype {
            DType::Q8_0 => QK,
            DType::Q4_0 => QK / 2,
            DType::Q4_1 => {
                bytes.extend(M.to_le_bytes());
                QK / 2
            }
            other => {
                return Err(GpuError::DType { op: "bench", details: format!("{other} is not a quantized type") });
            }
        };
        bytes.extend((0..quants).map(|_| rng.next() as u8));
    }
    RawTensor::new(dtype, shape.to_vec(), bytes)
}

// ---- timed workloads -------------------------------------------------------------------------

/// What one iteration of a workload does, for throughput: FLOPs (compute-bound ops) or bytes
/// moved (memory-bound ops and transfers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Work {
    Flops(u64),
    Bytes(u64),
}

impl Work {
    /// Work per second, in units of 10^9 (GFLOP/s or GB/s).
    pub fn giga_per_second(self, per_iteration: Duration) -> f64 {
        let amount = match self {
            Work::Flops(n) | Work::Bytes(n) => n as f64,
        };
        amount / per_iteration.as_secs_f64().max(1e-12) / 1e9
    }
}

/// An input tensor of a workload.
#[derive(Debug, Clone)]
pub enum Input {
    F32(HostTensor),
    Raw(RawTensor),
}

/// Why a workload could not be set up on a backend; `unsupported` when the backend does not
/// implement the op (yet), which the benches report as a skip rather than a failure.
#[derive(Debug, Clone, PartialEq)]
pub struct Skip {
    pub reason: String,
    pub unsupported: bool,
}

impl fmt::Display for Skip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.reason)
    }
}

impl Skip {
    fn new(name: &str, backend: &Backend, e: &GpuError) -> Self {
        Skip { reason: format!("{name} on {}: {e}", backend.describe()), unsupported: matches!(e, GpuError::Unsupported { .. }) }
    }
}

/// The op of a workload: runs once on its uploaded inputs and returns the output to free, if any.
pub type OpFn = Box<dyn Fn(&mut Backend, &[TensorId]) -> gpu::Result<Option<TensorId>>>;

/// One timed operation on one backend: inputs uploaded once; [`Workload::run`] is the op, the
/// free of its output and [`sync`].
pub struct Workload {
    pub name: String,
    pub work: Work,
    inputs: Vec<TensorId>,
    sentinel: TensorId,
    op: OpFn,
}

impl fmt::Debug for Workload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Workload").field("name", &self.name).field("work", &self.work).finish_non_exhaustive()
    }
}

/// Waits until everything submitted to `backend` has finished, by reading the 1-element `sentinel`
/// (see the module documentation).
pub fn sync(backend: &mut Backend, sentinel: TensorId) -> gpu::Result<()> {
    backend.read(sentinel).map(drop)
}

fn free_all(backend: &mut Backend, ids: &[TensorId]) {
    for &id in ids {
        let _ = backend.free(id);
    }
}

impl Workload {
    /// Uploads `inputs` and a sync sentinel, then runs the op once (which also compiles or warms
    /// whatever the backend caches). Any error frees what was uploaded and becomes a [`Skip`].
    pub fn prepare(
        backend: &mut Backend,
        name: impl Into<String>,
        work: Work,
        inputs: Vec<Input>,
        op: impl Fn(&mut Backend, &[TensorId]) -> gpu::Result<Option<TensorId>> + 'static,
    ) -> Result<Self, Skip> {
        let name = name.into();
        let mut ids = Vec::with_capacity(inputs.len());
        for input in &inputs {
            let uploaded = match input {
                Input::F32(t) => backend.upload(t),
                Input::Raw(t) => backend.upload_raw(t),
            };
            match uploaded {
                Ok(id) => ids.push(id),
                Err(e) => {
                    let skip = Skip::new(&name, backend, &e);
                    free_all(backend, &ids);
                    return Err(skip);
                }
            }
        }
        let sentinel = match backend.upload(&HostTensor { shape: vec![1], data: vec![0.0] }) {
            Ok(id) => id,
            Err(e) => {
                let skip = Skip::new(&name, backend, &e);
                free_all(backend, &ids);
                return Err(skip);
            }
        };
        let w = Workload { name, work, inputs: ids, sentinel, op: Box::new(op) };
        if let Err(e) = w.run(backend) {
            let skip = Skip::new(&w.name, backend, &e);
            w.release(backend);
            return Err(skip);
        }
        Ok(w)
    }

    /// One timed iteration: the op, the free of its output, and the device sync.
    pub fn run(&self, backend: &mut Backend) -> gpu::Result<()> {
        if let Some(out) = (self.op)(backend, &self.inputs)? {
            backend.free(out)?;
        }
        sync(backend, self.sentinel)
    }

    /// Frees the inputs and the sentinel.
    pub fn release(self, backend: &mut Backend) {
        free_all(backend, &self.inputs);
        let _ = backend.free(self.sentinel);
    }
}

/// `[n, n] @ [n, n]` in f32: `2 n^3` FLOPs.
pub fn gemm(backend: &mut Backend, n: usize) -> Result<Workload, Skip> {
    matmul(backend, 1, n, n, n)
}

/// `batch` products `[m, k] @ [k, n]` in f32 (2-D operands when `batch` is 1).
pub fn matmul(backend: &mut Backend, batch: usize, m: usize, k: usize, n: usize) -> Result<Workload, Skip> {
    let shape = |r: usize, c: usize| if batch == 1 { vec![r, c] } else { vec![batch, r, c] };
    let flops = 2 * (batch * m * n * k) as u64;
    let name = if batch == 1 { format!("matmul f32 {m}x{k}x{n}") } else { format!("matmul f32 {batch}x{m}x{k}x{n}") };
    Workload::prepare(
        backend,
        name,
        Work::Flops(flops),
        vec![Input::F32(host(&shape(m, k), 1)), Input::F32(host(&shape(k, n), 2))],
        |b, ids| b.matmul(ids[0], ids[1], false, false).map(Some),
    )
}

/// `x [m, k]` (f32) times a quantized weight matrix of `n` rows of `k` (GGUF layout, blocks along
/// `k`): `matmul(x, w, transpose_b = true)`; a backend that takes the weight only untransposed
/// (`[k, n]`, blocks along `n`) is measured that way. Throughput: the weight bytes for a
/// matrix-vector product (`m == 1`, memory-bound), FLOPs otherwise.
pub fn qmatmul(backend: &mut Backend, dtype: DType, m: usize, k: usize, n: usize) -> Result<Workload, Skip> {
    let weight_bytes = dtype.byte_len("bench", &[n, k]).map_err(|e| Skip::new("qmatmul", backend, &e))? as u64;
    let work = if m == 1 { Work::Bytes(weight_bytes) } else { Work::Flops(2 * (m * n * k) as u64) };
    let name = format!("matmul {dtype} {m}x{k}x{n}");
    let x = Input::F32(host(&[m, k], 3));
    let w = quantized(dtype, &[n, k], 4).map_err(|e| Skip::new(&name, backend, &e))?;
    match Workload::prepare(backend, name.clone(), work, vec![x.clone(), Input::Raw(w)], |b, ids| {
        b.matmul(ids[0], ids[1], false, true).map(Some)
    }) {
        Ok(w) => Ok(w),
        Err(skip) if skip.unsupported => Err(skip),
        Err(_) => {
            let w = quantized(dtype, &[k, n], 4).map_err(|e| Skip::new(&name, backend, &e))?;
            Workload::prepare(backend, name, work, vec![x, Input::Raw(w)], |b, ids| b.matmul(ids[0], ids[1], false, false).map(Some))
        }
    }
}

/// Host-to-device: one upload of `bytes` of f32 (the time includes finishing the copy).
pub fn upload(backend: &mut Backend, bytes: usize) -> Result<Workload, Skip> {
    let t = host(&[bytes / 4], 5);
    Workload::prepare(backend, format!("upload {}", size_label(bytes)), Work::Bytes(bytes as u64), vec![], move |b, _| {
        b.upload(&t).map(Some)
    })
}

/// Device-to-host: one read of a `bytes` f32 tensor into host memory.
pub fn download(backend: &mut Backend, bytes: usize) -> Result<Workload, Skip> {
    Workload::prepare(
        backend,
        format!("read {}", size_label(bytes)),
        Work::Bytes(bytes as u64),
        vec![Input::F32(host(&[bytes / 4], 6))],
        |b, ids| b.read(ids[0]).map(|_| None),
    )
}

/// "64 KiB", "16 MiB".
pub fn size_label(bytes: usize) -> String {
    match bytes {
        b if b >= 1 << 20 && b % (1 << 20) == 0 => format!("{} MiB", b >> 20),
        b if b >= 1 << 10 && b % (1 << 10) == 0 => format!("{} KiB", b >> 10),
        b => format!("{b} B"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::{BackendKind, Determinism};

    #[test]
    fn quantized_inputs_have_the_gguf_sizes() {
        assert_eq!(quantized(DType::Q8_0, &[2, 64], 1).unwrap().bytes.len(), 4 * 34);
        assert_eq!(quantized(DType::Q4_0, &[3, 32], 1).unwrap().bytes.len(), 3 * 18);
        let q41 = quantized(DType::Q4_1, &[1, 32], 1).unwrap();
        assert_eq!(q41.bytes.len(), 20);
        // d = 2^-7 and m = -2^-6 as f16 bits.
        assert_eq!(&q41.bytes[..4], &[0x00, 0x20, 0x00, 0xa4]);
        assert!(quantized(DType::Q8_0, &[2, 33], 1).is_err());
        assert!(quantized(DType::F16, &[2, 32], 1).is_err());
    }

    #[test]
    fn values_are_in_range_and_repeatable() {
        let v = values(10_000, 7);
        assert!(v.iter().all(|x| (-1.0..1.0).contains(x)));
        assert_eq!(v, values(10_000, 7));
        assert_ne!(v, values(10_000, 8));
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64;
        assert!(mean.abs() < 0.05, "{mean}");
    }

    #[test]
    fn a_workload_runs_and_an_unsupported_op_is_a_skip() {
        let mut b = Backend::new(BackendKind::Cpu, Determinism::Reproducible).unwrap();
        let w = gemm(&mut b, 8).unwrap();
        assert_eq!(w.work, Work::Flops(2 * 8 * 8 * 8));
        w.run(&mut b).unwrap();
        w.release(&mut b);
        assert_eq!(b.live_bytes(), 0);
        let skip = Workload::prepare(&mut b, "refused", Work::Bytes(4), vec![Input::F32(host(&[4], 1))], |b, _| {
            Err(GpuError::Unsupported { op: "test", backend: b.describe() })
        })
        .unwrap_err();
        assert!(skip.unsupported, "{skip}");
        assert!(skip.reason.contains("refused"), "{skip}");
        assert!(Work::Bytes(2_000_000_000).giga_per_second(Duration::from_secs(1)) - 2.0 < 1e-12);
    }
}

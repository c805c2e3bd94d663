//! Measured performance, one body of code for the criterion benches in `benches/` and for
//! `ao-gpu-worker bench`: the inputs, the timed [`Workload`]s and the device sync that ends each
//! timed iteration, the Wasm actors that time host calls ([`HostCallBench`]), the short suite of
//! plain timing loops behind the `bench` subcommand ([`run`]), and its record
//! (`<data_dir>/bench.json`, [`BenchReport`]) whose figures become the capacity manifest's measured
//! scores ([`ScoreSlot`]).
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
//! # Host calls from Wasm
//! [`HostCallBench`] runs WAT actors through the production [`Runtime`] (its engine: fuel metering,
//! epoch interruption, NaN canonicalization; its linker: the WASI subset and `ao_gpu`), one
//! evaluation per measurement, each actor looping `n` times over the call under test (`n` is the
//! message text). A per-call figure is `(t(n) - t(0)) / n`, so instantiation and the JSON round
//! trip of the evaluation cancel out. The empty call is `wasi_snapshot_preview1.sched_yield`, a
//! host function that does nothing.
//!
//! # Measured scores
//! `ao-gpu-worker bench` writes `<data_dir>/bench.json`. At startup the daemon takes the scores
//! from it when it was written by this worker version on this hardware (the same
//! [`CapacityManifest::hardware_fingerprint`]) and holds figures of the backend that serves
//! evaluations, in its determinism mode; otherwise it runs the quick suite for that backend once,
//! on a background thread, saves it (keeping the other backends' figures of a matching file), and
//! advertises the scores from then on ([`ScoreSlot`]).

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::capacity::{BackendScore, CapacityManifest, GemmScore, MeasuredScores};
use crate::gpu::{self, Backend, BackendKind, DType, Determinism, GpuError, HostTensor, QK, RawTensor, TensorId, TensorOps};
use crate::protocol::Tag;
use crate::runtime::{
    ActorModule, DEFAULT_MAX_DEVICE_MEMORY, EvalInput, GPU_FUNCTIONS, GpuConfig, Limits, MODULE_FORMAT, Runtime, RuntimeConfig,
    SharedBackend,
};

/// The `schema` of every bench.json this version writes.
pub const SCHEMA: &str = "ao-gpu-worker/bench/1";
/// The file in the worker's data directory.
pub const FILE_NAME: &str = "bench.json";
/// The worker version recorded with (and required of) measured scores.
pub const WORKER_VERSION: &str = env!("CARGO_PKG_VERSION");

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

// ---- host calls from Wasm --------------------------------------------------------------------

/// What a host-call actor does `n` times per evaluation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HostCall {
    /// `wasi_snapshot_preview1.sched_yield`: a host function that does nothing.
    Empty,
    /// `ao_gpu.free(0)`: the cheapest `ao_gpu` call (an unknown handle), i.e. the `ao_gpu` call path
    /// (fuel accounting, memory lookup, status) without an op.
    GpuNoop,
    /// `ao_gpu.scale` of a 4-element tensor and `free` of the result.
    TinyOp,
    /// `scale` of a 4-element tensor, `read_f32` of the result, and `free`: a full round trip.
    TinyOpRead,
    /// 100 `scale` ops on a 64-element tensor, one host call each (every intermediate freed when
    /// the next exists), then `read_f32` and `free` of the last.
    Ops100OneByOne,
    /// The same 100 `scale` ops and 99 frees as one `ao_gpu.run` command list, then `read_f32` and
    /// `free` of the last: 3 host calls instead of 201.
    Ops100Batched,
}

impl HostCall {
    /// Host calls per iteration.
    pub fn calls(self) -> u64 {
        match self {
            HostCall::Empty | HostCall::GpuNoop => 1,
            HostCall::TinyOp => 2,
            HostCall::TinyOpRead => 3,
            HostCall::Ops100OneByOne => 201,
            HostCall::Ops100Batched => 3,
        }
    }

    fn elements(self) -> u32 {
        if matches!(self, HostCall::Ops100OneByOne | HostCall::Ops100Batched) { 64 } else { 4 }
    }
}

/// Whether the runtime links `ao_gpu.<name>` (ops that other parts of the worker add over time).
pub fn gpu_function_linked(name: &str) -> bool {
    GPU_FUNCTIONS.iter().any(|(n, _)| *n == name)
}

const OK_AT: u32 = 1024;
const STATUS_AT: u32 = 1100;
const DATA_AT: u32 = 2048;
const SHAPE_AT: u32 = 2560;
const X_AT: u32 = 2576;
const OUT_AT: u32 = 2580;
const READ_AT: u32 = 3072;
const DONE_AT: u32 = 2588;
const CMDS_AT: u32 = 16384;
/// `ao_gpu_cmd` (include/ao_gpu.h): 64-byte records; op codes and field offsets.
const CMD_BYTES: usize = 64;
const OP_SCALE: i32 = 4;
const OP_FREE: i32 = 18;

/// The command list of [`HostCall::Ops100Batched`]: `scale` number `j` reads the previous scale's
/// output (`AO_GPU_OUT(i) = -(i + 1)`; the first reads the input, patched in at run time), and each
/// intermediate is freed right after the scale that consumes it, as the one-by-one actor does.
/// Returns the records and the index of the last scale.
fn ops100_commands() -> (Vec<u8>, usize) {
    let mut cmds = Vec::new();
    let record = |op: i32, input: i32, factor: f32| {
        let mut r = vec![0u8; CMD_BYTES];
        r[0..4].copy_from_slice(&op.to_le_bytes());
        r[4..8].copy_from_slice(&input.to_le_bytes());
        r[44..48].copy_from_slice(&factor.to_le_bytes());
        r
    };
    let mut prev: Option<usize> = None;
    for _ in 0..100 {
        let input = prev.map_or(0, |i| -(i as i32) - 1);
        cmds.extend(record(OP_SCALE, input, 1.0001));
        let this = cmds.len() / CMD_BYTES - 1;
        if let Some(p) = prev {
            cmds.extend(record(OP_FREE, -(p as i32) - 1, 0.0));
        }
        prev = Some(this);
    }
    (cmds, prev.unwrap_or(0))
}

fn wat_bytes(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("\\{b:02x}")).collect()
}

/// `(local.set $s EXPR)` and, when the status is not 0, return the "status -k" result.
fn check(expr: &str) -> String {
    format!("(local.set $s {expr}) (if (local.get $s) (then (return (call $fail (local.get $s)))))\n")
}

/// The WAT actor for `kind`: `handle` parses the message text as a decimal `n` and runs the
/// iteration `n` times; it answers Output "ok", or "status -k" when an `ao_gpu` call returned `-k`.
pub fn actor_wat(kind: HostCall) -> String {
    let mut wat = String::from(
        r#"(module
  (import "wasi_snapshot_preview1" "sched_yield" (func $yield (result i32)))
  (import "ao_gpu" "tensor_f32" (func $tensor (param i32 i32 i32 i32 i32) (result i32)))
  (import "ao_gpu" "read_f32" (func $read (param i32 i32 i32) (result i32)))
  (import "ao_gpu" "free" (func $free (param i32) (result i32)))
  (import "ao_gpu" "scale" (func $scale (param i32 f32 i32) (result i32)))
"#,
    );
    if kind == HostCall::Ops100Batched {
        wat.push_str("  (import \"ao_gpu\" \"run\" (func $run (param i32 i32 i32) (result i32)))\n");
    }
    wat.push_str("  (memory (export \"memory\") 1)\n");
    let mut ok = br#"{"ok":true,"response":{"Output":"ok"}}"#.to_vec();
    ok.push(0);
    wat.push_str(&format!("  (data (i32.const {OK_AT}) \"{}\")\n", wat_bytes(&ok)));
    for k in 1..=8u32 {
        let mut text = format!(r#"{{"ok":true,"response":{{"Output":"status -{k}"}}}}"#).into_bytes();
        text.push(0);
        wat.push_str(&format!("  (data (i32.const {}) \"{}\")\n", STATUS_AT + 64 * k, wat_bytes(&text)));
    }
    let len = kind.elements();
    let data: Vec<u8> = (0..len).flat_map(|_| 1.0f32.to_le_bytes()).collect();
    wat.push_str(&format!("  (data (i32.const {DATA_AT}) \"{}\")\n", wat_bytes(&data)));
    wat.push_str(&format!("  (data (i32.const {SHAPE_AT}) \"{}\")\n", wat_bytes(&len.to_le_bytes())));
    let (cmds, last_scale) = ops100_commands();
    let n_cmds = cmds.len() / CMD_BYTES;
    if kind == HostCall::Ops100Batched {
        wat.push_str(&format!("  (data (i32.const {CMDS_AT}) \"{}\")\n", wat_bytes(&cmds)));
    }
    wat.push_str(&format!(
        r#"
  (global $heap (mut i32) (i32.const 8192))
  (func (export "malloc") (param $n i32) (result i32)
    (local $p i32)
    (local.set $p (global.get $heap))
    (global.set $heap (i32.add (local.get $p) (i32.and (i32.add (local.get $n) (i32.const 7)) (i32.const -8))))
    (if (i32.gt_u (global.get $heap) (i32.const 65536)) (then (return (i32.const 0))))
    (local.get $p))
  (func $count (param $p i32) (result i32)
    (local $n i32) (local $c i32)
    (block $done
      (loop $next
        (local.set $c (i32.sub (i32.load8_u (local.get $p)) (i32.const 48)))
        (br_if $done (i32.gt_u (local.get $c) (i32.const 9)))
        (local.set $n (i32.add (i32.mul (local.get $n) (i32.const 10)) (local.get $c)))
        (local.set $p (i32.add (local.get $p) (i32.const 1)))
        (br $next)))
    (local.get $n))
  (func $fail (param $s i32) (result i32)
    (if (i32.or (i32.gt_s (local.get $s) (i32.const -1)) (i32.lt_s (local.get $s) (i32.const -8)))
      (then (local.set $s (i32.const -8))))
    (i32.add (i32.const {STATUS_AT}) (i32.mul (i32.sub (i32.const 0) (local.get $s)) (i32.const 64))))
  (func (export "handle") (param $msg i32) (param $env i32) (result i32)
    (local $n i32) (local $i i32) (local $j i32) (local $s i32) (local $cur i32)
    (local.set $n (call $count (local.get $msg)))
"#
    ));
    if kind != HostCall::Empty && kind != HostCall::GpuNoop {
        wat.push_str(&check(&format!(
            "(call $tensor (i32.const {DATA_AT}) (i32.const {len}) (i32.const {SHAPE_AT}) (i32.const 1) (i32.const {X_AT}))"
        )));
    }
    if kind == HostCall::Ops100Batched {
        // The first scale reads the input tensor.
        wat.push_str(&format!("    (i32.store (i32.const {}) (i32.load (i32.const {X_AT})))\n", CMDS_AT + 4));
    }
    let body = match kind {
        HostCall::Empty => "(drop (call $yield))\n".to_owned(),
        HostCall::GpuNoop => "(drop (call $free (i32.const 0)))\n".to_owned(),
        HostCall::TinyOp | HostCall::TinyOpRead => {
            let mut b = check(&format!("(call $scale (i32.load (i32.const {X_AT})) (f32.const 2) (i32.const {OUT_AT}))"));
            if kind == HostCall::TinyOpRead {
                b.push_str(&check(&format!("(call $read (i32.load (i32.const {OUT_AT})) (i32.const {READ_AT}) (i32.const {len}))")));
            }
            b.push_str(&check(&format!("(call $free (i32.load (i32.const {OUT_AT})))")));
            b
        }
        HostCall::Ops100OneByOne => format!(
            "(local.set $cur (i32.load (i32.const {X_AT})))
    (local.set $j (i32.const 0))
    (block $jend (loop $jl
      (br_if $jend (i32.ge_u (local.get $j) (i32.const 100)))
      {scale}      (if (i32.ne (local.get $cur) (i32.load (i32.const {X_AT}))) (then {free_cur}))
      (local.set $cur (i32.load (i32.const {OUT_AT})))
      (local.set $j (i32.add (local.get $j) (i32.const 1)))
      (br $jl)))
    {read}    {free_last}",
            scale = check(&format!("(call $scale (local.get $cur) (f32.const 1.0001) (i32.const {OUT_AT}))")),
            free_cur = check("(call $free (local.get $cur))"),
            read = check(&format!("(call $read (local.get $cur) (i32.const {READ_AT}) (i32.const {len}))")),
            free_last = check("(call $free (local.get $cur))"),
        ),
        HostCall::Ops100Batched => {
            let last_out = CMDS_AT as usize + last_scale * CMD_BYTES + 52;
            let mut b = check(&format!("(call $run (i32.const {CMDS_AT}) (i32.const {n_cmds}) (i32.const {DONE_AT}))"));
            b.push_str(&format!("    (local.set $cur (i32.load (i32.const {last_out})))\n"));
            b.push_str(&check(&format!("(call $read (local.get $cur) (i32.const {READ_AT}) (i32.const {len}))")));
            b.push_str(&check("(call $free (local.get $cur))"));
            b
        }
    };
    wat.push_str(&format!(
        r#"    (block $end
      (loop $l
        (br_if $end (i32.ge_u (local.get $i) (local.get $n)))
        {body}        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $l)))
    (i32.const {OK_AT}))
)
"#
    ));
    wat
}

/// A directory under the system temp dir, removed on drop (the host-call runtime's module cache).
struct ScratchDir(PathBuf);

impl ScratchDir {
    fn new() -> std::io::Result<Self> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
        let dir = std::env::temp_dir().join(format!(
            "ao-gpu-worker-bench-{}-{nanos}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir)?;
        Ok(Self(dir))
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Fuel for one host-call evaluation: far more than any measurement uses.
const HOST_CALL_FUEL: u64 = 1 << 42;

/// Host-call actors on a production [`Runtime`] whose `ao_gpu` runs on the given backend.
pub struct HostCallBench {
    runtime: Runtime,
    modules: HashMap<HostCall, Arc<ActorModule>>,
    _dir: ScratchDir,
}

impl fmt::Debug for HostCallBench {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HostCallBench").field("backend", &self.runtime.tensor_backend().description).finish_non_exhaustive()
    }
}

impl HostCallBench {
    pub fn new(backend: SharedBackend) -> Result<Self, String> {
        let dir = ScratchDir::new().map_err(|e| format!("cannot create a scratch directory: {e}"))?;
        let runtime = Runtime::with_gpu(
            RuntimeConfig {
                cache_dir: dir.0.join("modules"),
                max_memory: 64 << 20,
                max_compute: HOST_CALL_FUEL,
                deadline: Duration::from_secs(300),
            },
            GpuConfig { backend: Some(backend), max_device_memory: DEFAULT_MAX_DEVICE_MEMORY, ..GpuConfig::default() },
        )
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
        Ok(Self { runtime, modules: HashMap::new(), _dir: dir })
    }

    fn module(&mut self, kind: HostCall) -> Result<Arc<ActorModule>, String> {
        if let Some(m) = self.modules.get(&kind) {
            return Ok(m.clone());
        }
        let wat = actor_wat(kind);
        let bytes = wat::parse_str(&wat).map_err(|e| format!("{kind:?} actor: {e}"))?;
        let module = self.runtime.load(&bytes, &[Tag::new("Module-Format", MODULE_FORMAT)]).map_err(|e| format!("{kind:?} actor: {e}"))?;
        self.modules.insert(kind, module.clone());
        Ok(module)
    }

    /// The wall time of one evaluation whose actor runs `kind` `n` times. An `ao_gpu` status other
    /// than 0 is an error naming it ("status -7" is `UNSUPPORTED`).
    pub fn evaluate(&mut self, kind: HostCall, n: u64) -> Result<Duration, String> {
        self.evaluate_with_memory(kind, n).map(|(t, _, _)| t)
    }

    /// [`HostCallBench::evaluate`], the actor's memory after it and the gas it used.
    fn evaluate_with_memory(&mut self, kind: HostCall, n: u64) -> Result<(Duration, Vec<u8>, u64), String> {
        let module = self.module(kind)?;
        let msg = n.to_string();
        let input = EvalInput {
            msg_json: &msg,
            env_json: "{}",
            timestamp_ms: 0,
            message_id: "bench",
            limits: Limits { memory_bytes: 16 << 20, compute: HOST_CALL_FUEL },
        };
        let started = Instant::now();
        let evaluation = self.runtime.evaluate(&module, None, &input);
        let elapsed = started.elapsed();
        match evaluation.outcome {
            Ok(response) if response["Output"] == "ok" => Ok((elapsed, evaluation.memory.unwrap_or_default(), evaluation.gas_used)),
            Ok(response) => Err(format!("{kind:?} actor answered {}", response["Output"])),
            Err(e) => Err(format!("{kind:?} actor failed: {e}")),
        }
    }

    /// `(t(n) - t(0)) / n` per iteration, the median over repetitions (each repetition times both).
    pub fn per_iteration(&mut self, kind: HostCall, n: u64, budget: &Budget) -> Result<Duration, String> {
        let n = n.max(1);
        let diffs = repeat(budget, || {
            let base = self.evaluate(kind, 0)?;
            let full = self.evaluate(kind, n)?;
            Ok(full.saturating_sub(base))
        })?;
        Ok(Duration::from_secs_f64(median(diffs).as_secs_f64() / n as f64))
    }
}

// ---- plain timing loops ----------------------------------------------------------------------

/// How long a figure of the `bench` subcommand is measured: up to `warmup` untimed runs (fewer when
/// they already took half of `time`), then timed runs until there are at least `min_reps` and
/// either `time` has passed or there are `max_reps`; the figure is the median. A slow op thus gets
/// `min_reps` runs, a fast one as many as fit in `time`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    pub warmup: u32,
    pub min_reps: u32,
    pub max_reps: u32,
    pub time: Duration,
}

/// Runs `f` per `budget` and returns the durations it reported for the timed runs.
fn repeat(budget: &Budget, mut f: impl FnMut() -> Result<Duration, String>) -> Result<Vec<Duration>, String> {
    let started = Instant::now();
    for _ in 0..budget.warmup {
        if started.elapsed() >= budget.time / 2 {
            break;
        }
        f()?;
    }
    let started = Instant::now();
    let mut times = Vec::new();
    let (min, max) = (budget.min_reps.max(1) as usize, budget.max_reps.max(budget.min_reps).max(1) as usize);
    while times.len() < min || (started.elapsed() < budget.time && times.len() < max) {
        times.push(f()?);
    }
    Ok(times)
}

fn median(mut times: Vec<Duration>) -> Duration {
    times.sort();
    times.get(times.len() / 2).copied().unwrap_or_default()
}

/// The median time of one iteration of `w`.
pub fn time_workload(backend: &mut Backend, w: &Workload, budget: &Budget) -> Result<Duration, String> {
    let times = repeat(budget, || {
        let t = Instant::now();
        w.run(backend).map_err(|e| format!("{}: {e}", w.name))?;
        Ok(t.elapsed())
    })?;
    Ok(median(times))
}

// ---- the `bench` suite -----------------------------------------------------------------------

/// What `ao-gpu-worker bench` measures.
#[derive(Debug, Clone, PartialEq)]
pub struct Options {
    /// In this order; one that cannot start is reported in [`BenchReport::unavailable`].
    pub backends: Vec<BackendKind>,
    pub determinism: Determinism,
    /// The short run (a few seconds) instead of the full one (well under a minute).
    pub quick: bool,
}

/// The sizes and budgets of one suite.
#[derive(Debug, Clone)]
struct Plan {
    budget: Budget,
    /// GEMM sizes tried in order; the last one is the target.
    gemm_sizes: &'static [usize],
    /// A GEMM size is not grown further once one run would take longer than this.
    gemm_max_run: Duration,
    /// The quantized weight matrix is `[qmat, qmat]`.
    qmat: usize,
    transfer_bytes: usize,
    empty_calls: u64,
    tiny_ops: u64,
    ops100: u64,
}

impl Plan {
    fn new(quick: bool) -> Self {
        if quick {
            Plan {
                budget: Budget { warmup: 1, min_reps: 3, max_reps: 15, time: Duration::from_millis(200) },
                gemm_sizes: &[128, 256, 512, 1024],
                gemm_max_run: Duration::from_millis(250),
                qmat: 2048,
                transfer_bytes: 16 << 20,
                empty_calls: 100_000,
                tiny_ops: 500,
                ops100: 3,
            }
        } else {
            Plan {
                budget: Budget { warmup: 2, min_reps: 3, max_reps: 100, time: Duration::from_millis(800) },
                gemm_sizes: &[128, 256, 512, 1024],
                gemm_max_run: Duration::from_millis(800),
                qmat: 4096,
                transfer_bytes: 64 << 20,
                empty_calls: 1_000_000,
                tiny_ops: 2_000,
                ops100: 20,
            }
        }
    }
}

/// The hardware a report was measured on (from the capacity probe).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hardware {
    pub cpu_model: String,
    pub cpu_vendor: String,
    pub logical_cores: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub physical_cores: Option<usize>,
    pub arch: String,
    pub cpu_features: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub os: Option<String>,
    pub memory_total_bytes: u64,
    /// Each wgpu adapter: "name (backend, type; driver, driver info)".
    pub wgpu_adapters: Vec<String>,
    /// The CUDA status, driver and devices.
    pub cuda: String,
}

impl Hardware {
    pub fn of(manifest: &CapacityManifest) -> Self {
        let cpu = &manifest.host.cpu;
        let cuda = &manifest.gpus.cuda;
        let mut cuda_text = cuda.status.as_str().to_owned();
        if let Some(v) = &cuda.driver_version {
            cuda_text.push_str(&format!(", driver {v}"));
        }
        for d in &cuda.devices {
            cuda_text.push_str(&format!(", #{} {} (sm {})", d.ordinal, d.name, d.compute_capability));
        }
        if let Some(r) = &cuda.reason {
            cuda_text.push_str(&format!(" ({r})"));
        }
        Hardware {
            cpu_model: cpu.model.clone(),
            cpu_vendor: cpu.vendor.clone(),
            logical_cores: cpu.logical_cores,
            physical_cores: cpu.physical_cores,
            arch: manifest.host.arch.clone(),
            cpu_features: cpu.features.clone(),
            os: manifest.host.os.clone(),
            memory_total_bytes: manifest.host.memory.total_bytes,
            wgpu_adapters: manifest
                .gpus
                .wgpu
                .adapters
                .iter()
                .map(|a| format!("{} ({}, {}; {}, {})", a.name, a.backend, a.device_type, a.driver, a.driver_info))
                .collect(),
            cuda: cuda_text,
        }
    }
}

/// The figures of one backend.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackendReport {
    #[serde(flatten)]
    pub score: BackendScore,
    /// The device: the CPU model, the wgpu adapter or the CUDA device.
    pub device: String,
    /// The device driver and its version, where the backend reports one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub driver: Option<String>,
    /// 100 small ops from Wasm, one host call each, then a read: µs per 100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ops100_one_by_one_us: Option<f64>,
    /// The same 100 ops in one batched host call: µs per 100 (once `ao_gpu.run` exists).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ops100_batched_us: Option<f64>,
    /// Figures that could not be measured, and why.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

/// One `bench` run: `<data_dir>/bench.json`, and the `--json` output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BenchReport {
    /// Always [`SCHEMA`].
    pub schema: String,
    pub worker_version: String,
    /// Milliseconds since the Unix epoch.
    pub measured_at_ms: u64,
    pub quick: bool,
    /// [`CapacityManifest::hardware_fingerprint`] of the machine it ran on.
    pub fingerprint: String,
    pub hardware: Hardware,
    /// One empty host call from Wasm, in ns.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_call_ns: Option<f64>,
    /// The `ao_gpu` call path alone (`free` of an unknown handle), in ns.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ao_gpu_call_ns: Option<f64>,
    pub backends: Vec<BackendReport>,
    /// Backends asked for that could not start, with the reason.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unavailable: Vec<String>,
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

fn lock(backend: &SharedBackend) -> MutexGuard<'_, Backend> {
    backend.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Rounds to 4 significant digits: figures are noisy well before that.
fn round4(v: f64) -> f64 {
    if v == 0.0 || !v.is_finite() {
        return v;
    }
    let scale = 10f64.powi(3 - v.abs().log10().floor() as i32);
    (v * scale).round() / scale
}

/// The device and driver a backend runs on.
fn device_of(backend: &Backend, manifest: &CapacityManifest) -> (String, Option<String>) {
    match backend {
        Backend::Cpu(_) => (manifest.host.cpu.model.clone(), None),
        Backend::Wgpu(w) => {
            let info = w.adapter_info();
            let driver = format!("{} {}", info.driver, info.driver_info).trim().to_owned();
            (info.name.clone(), Some(driver).filter(|d| !d.is_empty()))
        }
        Backend::Cuda(_) => (backend.describe(), manifest.gpus.cuda.driver_version.as_ref().map(|v| format!("CUDA driver {v}"))),
    }
}

/// Runs the suite: for each backend of `opts`, f32 GEMM (growing to 1024^3 while one run stays
/// short), quantized matrix-vector products, upload and read bandwidth, and host calls from Wasm.
/// Never fails: what cannot be measured is noted in the report. `progress` gets a line per step;
/// `cancelled` is checked between figures (the report then holds what was measured).
pub fn run(opts: &Options, manifest: &CapacityManifest, progress: &dyn Fn(&str), cancelled: &dyn Fn() -> bool) -> BenchReport {
    let plan = Plan::new(opts.quick);
    let mut report = BenchReport {
        schema: SCHEMA.to_owned(),
        worker_version: WORKER_VERSION.to_owned(),
        measured_at_ms: now_ms(),
        quick: opts.quick,
        fingerprint: manifest.hardware_fingerprint(),
        hardware: Hardware::of(manifest),
        host_call_ns: None,
        ao_gpu_call_ns: None,
        backends: Vec::new(),
        unavailable: Vec::new(),
    };
    for &kind in &opts.backends {
        if cancelled() {
            break;
        }
        progress(&format!("{kind}: starting the backend"));
        let backend = match Backend::new(kind, opts.determinism) {
            Ok(b) => b,
            Err(e) => {
                progress(&format!("{kind}: {e}"));
                report.unavailable.push(format!("{kind}: {e}"));
                continue;
            }
        };
        let shared: SharedBackend = Arc::new(Mutex::new(backend));
        let r = measure_backend(&shared, manifest, &plan, &mut report, progress, cancelled);
        report.backends.push(r);
    }
    report
}

fn measure_backend(
    shared: &SharedBackend,
    manifest: &CapacityManifest,
    plan: &Plan,
    report: &mut BenchReport,
    progress: &dyn Fn(&str),
    cancelled: &dyn Fn() -> bool,
) -> BackendReport {
    let (kind, description, determinism, device, driver) = {
        let b = lock(shared);
        let (device, driver) = device_of(&b, manifest);
        (b.kind(), b.describe(), b.determinism(), device, driver)
    };
    let mut r = BackendReport {
        score: BackendScore {
            kind: kind.as_str().to_owned(),
            description: description.clone(),
            determinism: determinism.as_str().to_owned(),
            gemm_f32: None,
            qmatvec_gbps: BTreeMap::new(),
            h2d_gbps: None,
            d2h_gbps: None,
            tiny_op_ns: None,
        },
        device,
        driver,
        ops100_one_by_one_us: None,
        ops100_batched_us: None,
        notes: Vec::new(),
    };
    let step = |what: &str| progress(&format!("{kind}: {what}"));

    // f32 GEMM: grow n while one run stays short, measure at the last size reached.
    if !cancelled() {
        step("f32 gemm");
        let mut b = lock(shared);
        match gemm_figure(&mut b, plan) {
            Ok(g) => r.score.gemm_f32 = Some(g),
            Err(e) => r.notes.push(format!("f32 gemm: {e}")),
        }
    }

    // Quantized matrix-vector products: GB/s of weight bytes.
    for dtype in [DType::Q8_0, DType::Q4_0, DType::Q4_1] {
        if cancelled() {
            break;
        }
        step(&format!("{dtype} matvec"));
        let mut b = lock(shared);
        match qmatmul(&mut b, dtype, 1, plan.qmat, plan.qmat) {
            Ok(w) => {
                match time_workload(&mut b, &w, &plan.budget) {
                    Ok(t) => {
                        r.score.qmatvec_gbps.insert(dtype.as_str().to_owned(), round4(w.work.giga_per_second(t)));
                    }
                    Err(e) => r.notes.push(format!("{dtype} matvec: {e}")),
                }
                w.release(&mut b);
            }
            Err(skip) => r.notes.push(format!("{dtype} matvec: {skip}")),
        }
    }

    // Transfers.
    for (upload_dir, label) in [(true, "h2d"), (false, "d2h")] {
        if cancelled() {
            break;
        }
        step(&format!("{label} {}", size_label(plan.transfer_bytes)));
        let mut b = lock(shared);
        let w = if upload_dir { upload(&mut b, plan.transfer_bytes) } else { download(&mut b, plan.transfer_bytes) };
        match w {
            Ok(w) => {
                match time_workload(&mut b, &w, &plan.budget) {
                    Ok(t) => {
                        let gbps = Some(round4(w.work.giga_per_second(t)));
                        if upload_dir {
                            r.score.h2d_gbps = gbps;
                        } else {
                            r.score.d2h_gbps = gbps;
                        }
                    }
                    Err(e) => r.notes.push(format!("{label}: {e}")),
                }
                w.release(&mut b);
            }
            Err(skip) => r.notes.push(format!("{label}: {skip}")),
        }
    }

    // Host calls from Wasm, through the production runtime on this backend.
    if !cancelled() {
        step("host calls from wasm");
        match HostCallBench::new(shared.clone()) {
            Ok(mut hc) => host_call_figures(&mut hc, plan, report, &mut r, cancelled),
            Err(e) => r.notes.push(format!("host calls: {e}")),
        }
    }
    r
}

fn gemm_figure(backend: &mut Backend, plan: &Plan) -> Result<GemmScore, String> {
    let last = plan.gemm_sizes.len().saturating_sub(1);
    for (i, &n) in plan.gemm_sizes.iter().enumerate() {
        let w = gemm(backend, n).map_err(|s| s.to_string())?;
        let t = Instant::now();
        let first = w.run(backend).map_err(|e| e.to_string());
        let one = t.elapsed();
        // Each size step is 8x the work: stop growing once the next would take too long.
        if first.is_err() || i == last || one * 8 > plan.gemm_max_run {
            // `prepare` and the run above warmed this size up.
            let budget = Budget { warmup: 0, ..plan.budget };
            let result = first.and_then(|()| time_workload(backend, &w, &budget));
            let work = w.work;
            w.release(backend);
            let t = result?;
            return Ok(GemmScore { n, gflops: round4(work.giga_per_second(t)) });
        }
        w.release(backend);
    }
    Err("no gemm size configured".to_owned())
}

fn host_call_figures(hc: &mut HostCallBench, plan: &Plan, report: &mut BenchReport, r: &mut BackendReport, cancelled: &dyn Fn() -> bool) {
    let ns = |d: Duration| round4(d.as_secs_f64() * 1e9);
    // The empty call and the bare ao_gpu path do not depend on the backend: measured once.
    if report.host_call_ns.is_none() && !cancelled() {
        match hc.per_iteration(HostCall::Empty, plan.empty_calls, &plan.budget) {
            Ok(d) => report.host_call_ns = Some(ns(d)),
            Err(e) => r.notes.push(format!("empty host call: {e}")),
        }
    }
    if report.ao_gpu_call_ns.is_none() && !cancelled() {
        match hc.per_iteration(HostCall::GpuNoop, plan.empty_calls, &plan.budget) {
            Ok(d) => report.ao_gpu_call_ns = Some(ns(d)),
            Err(e) => r.notes.push(format!("ao_gpu call: {e}")),
        }
    }
    if !cancelled() {
        match hc.per_iteration(HostCall::TinyOp, plan.tiny_ops, &plan.budget) {
            Ok(d) => r.score.tiny_op_ns = Some(ns(d)),
            Err(e) => r.notes.push(format!("tiny op: {e}")),
        }
    }
    if !cancelled() {
        match hc.per_iteration(HostCall::Ops100OneByOne, plan.ops100, &plan.budget) {
            Ok(d) => r.ops100_one_by_one_us = Some(round4(d.as_secs_f64() * 1e6)),
            Err(e) => r.notes.push(format!("100 ops one by one: {e}")),
        }
    }
    if !gpu_function_linked("run") {
        r.notes.push("100 ops batched: ao_gpu.run is not linked yet".to_owned());
    } else if !cancelled() {
        match hc.per_iteration(HostCall::Ops100Batched, plan.ops100, &plan.budget) {
            Ok(d) => r.ops100_batched_us = Some(round4(d.as_secs_f64() * 1e6)),
            Err(e) => r.notes.push(format!("100 ops batched: {e}")),
        }
    }
}

impl BenchReport {
    /// The figures as the capacity manifest's measured scores.
    pub fn scores(&self, source: &str) -> MeasuredScores {
        MeasuredScores {
            source: source.to_owned(),
            measured_at_ms: self.measured_at_ms,
            worker_version: self.worker_version.clone(),
            quick: self.quick,
            fingerprint: self.fingerprint.clone(),
            host_call_ns: self.host_call_ns,
            backends: self.backends.iter().map(|b| b.score.clone()).collect(),
        }
    }

    /// Whether this report was measured by this worker version on the machine `manifest` describes.
    pub fn matches(&self, manifest: &CapacityManifest) -> bool {
        self.schema == SCHEMA && self.worker_version == WORKER_VERSION && self.fingerprint == manifest.hardware_fingerprint()
    }

    /// Whether it holds figures of `kind` measured in `determinism` mode.
    pub fn covers(&self, kind: BackendKind, determinism: Determinism) -> bool {
        self.backends.iter().any(|b| b.score.kind == kind.as_str() && b.score.determinism == determinism.as_str())
    }

    /// The table `ao-gpu-worker bench` prints: the hardware, then one column per backend.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let line = |out: &mut String, s: String| {
            out.push_str(&s);
            out.push('\n');
        };
        let h = &self.hardware;
        line(
            &mut out,
            format!(
                "ao-gpu-worker {} bench{} at {}",
                self.worker_version,
                if self.quick { " --quick" } else { "" },
                utc(self.measured_at_ms)
            ),
        );
        let physical = h.physical_cores.map(|p| format!(", {p} physical")).unwrap_or_default();
        line(&mut out, format!("cpu      {} ({} logical cores{physical}), {}", h.cpu_model, h.logical_cores, h.arch));
        if !h.cpu_features.is_empty() {
            line(&mut out, format!("         features: {}", h.cpu_features.join(" ")));
        }
        if let Some(os) = &h.os {
            line(&mut out, format!("os       {os}, {:.1} GiB memory", h.memory_total_bytes as f64 / (1u64 << 30) as f64));
        }
        for a in &h.wgpu_adapters {
            line(&mut out, format!("wgpu     {a}"));
        }
        if h.wgpu_adapters.is_empty() {
            line(&mut out, "wgpu     no adapter".to_owned());
        }
        line(&mut out, format!("cuda     {}", h.cuda));
        line(&mut out, format!("machine  fingerprint {}", short(&self.fingerprint)));
        line(&mut out, String::new());
        for b in &self.backends {
            let driver = b.driver.as_ref().map(|d| format!(", driver {d}")).unwrap_or_default();
            line(&mut out, format!("backend  {} [{}] on {}{driver}", b.score.description, b.score.determinism, b.device));
        }
        for u in &self.unavailable {
            line(&mut out, format!("skipped  {u}"));
        }
        line(&mut out, String::new());

        let fmt_opt = |v: Option<f64>, unit: &str| v.map(|v| format!("{v} {unit}")).unwrap_or_else(|| "-".to_owned());
        let mut rows: Vec<(String, Vec<String>)> = Vec::new();
        rows.push((
            "f32 gemm".to_owned(),
            self.backends
                .iter()
                .map(|b| b.score.gemm_f32.as_ref().map_or("-".to_owned(), |g| format!("{} GFLOP/s @{}³", g.gflops, g.n)))
                .collect(),
        ));
        for dtype in [DType::Q8_0, DType::Q4_0, DType::Q4_1] {
            rows.push((
                format!("{dtype} matvec"),
                self.backends.iter().map(|b| fmt_opt(b.score.qmatvec_gbps.get(dtype.as_str()).copied(), "GB/s")).collect(),
            ));
        }
        rows.push(("h2d upload".to_owned(), self.backends.iter().map(|b| fmt_opt(b.score.h2d_gbps, "GB/s")).collect()));
        rows.push(("d2h read".to_owned(), self.backends.iter().map(|b| fmt_opt(b.score.d2h_gbps, "GB/s")).collect()));
        rows.push(("tiny op (wasm)".to_owned(), self.backends.iter().map(|b| fmt_opt(b.score.tiny_op_ns, "ns")).collect()));
        rows.push(("100 ops 1-by-1".to_owned(), self.backends.iter().map(|b| fmt_opt(b.ops100_one_by_one_us, "µs")).collect()));
        rows.push(("100 ops batched".to_owned(), self.backends.iter().map(|b| fmt_opt(b.ops100_batched_us, "µs")).collect()));
        let headers: Vec<String> = self.backends.iter().map(|b| b.score.kind.clone()).collect();
        let widths: Vec<usize> = (0..headers.len())
            .map(|i| rows.iter().map(|(_, cells)| cells[i].chars().count()).chain([headers[i].len()]).max().unwrap_or(0))
            .collect();
        let label_width = rows.iter().map(|(l, _)| l.len()).max().unwrap_or(0).max(6);
        let mut header = format!("{:label_width$}", "figure");
        for (h, w) in headers.iter().zip(&widths) {
            header.push_str(&format!("  {h:>w$}"));
        }
        line(&mut out, header);
        for (label, cells) in &rows {
            let mut row = format!("{label:label_width$}");
            for (c, &w) in cells.iter().zip(&widths) {
                let pad = w.saturating_sub(c.chars().count());
                row.push_str(&format!("  {}{c}", " ".repeat(pad)));
            }
            line(&mut out, row);
        }
        line(&mut out, String::new());
        line(&mut out, format!("host call from wasm (empty): {}", fmt_opt(self.host_call_ns, "ns")));
        line(&mut out, format!("ao_gpu call path (no op):    {}", fmt_opt(self.ao_gpu_call_ns, "ns")));
        for b in &self.backends {
            for n in &b.notes {
                line(&mut out, format!("note: {}: {n}", b.score.kind));
            }
        }
        out
    }
}

fn short(fingerprint: &str) -> &str {
    fingerprint.get(..16).unwrap_or(fingerprint)
}

/// "2023-11-14 22:13:20 UTC" for milliseconds since the Unix epoch.
pub fn utc(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Days to a civil date (proleptic Gregorian), after Howard Hinnant's `civil_from_days`.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC", rem / 3600, rem % 3600 / 60, rem % 60)
}

// ---- bench.json ------------------------------------------------------------------------------

/// `<data_dir>/bench.json`.
pub fn path(data_dir: &Path) -> PathBuf {
    data_dir.join(FILE_NAME)
}

/// The report saved in `data_dir`, if there is a readable one.
pub fn load(data_dir: &Path) -> Option<BenchReport> {
    let file = path(data_dir);
    let text = match std::fs::read_to_string(&file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            tracing::warn!(path = %file.display(), error = %e, "cannot read the saved bench results");
            return None;
        }
    };
    serde_json::from_str(&text)
        .inspect_err(|e| tracing::warn!(path = %file.display(), error = %e, "saved bench results do not parse; ignoring them"))
        .ok()
}

/// Writes `report` to `<data_dir>/bench.json` (creating the directory), atomically: a reader sees
/// the old file or the new one.
pub fn save(report: &BenchReport, data_dir: &Path) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(data_dir)?;
    let file = path(data_dir);
    let tmp = data_dir.join(format!(".{FILE_NAME}.{}.tmp", std::process::id()));
    let mut text = serde_json::to_string_pretty(report).map_err(std::io::Error::other)?;
    text.push('\n');
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, &file).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })?;
    Ok(file)
}

// ---- measured scores for the daemon ----------------------------------------------------------

/// The measured scores a running worker advertises, shared between the startup measurement and
/// the capacity heartbeat.
#[derive(Debug, Clone, Default)]
pub struct ScoreSlot(Arc<Mutex<Option<MeasuredScores>>>);

impl ScoreSlot {
    /// The scores in `<data_dir>/bench.json` when it was written by this worker version on this
    /// hardware and covers the serving backend (`kind` in `determinism` mode); otherwise an empty
    /// slot for [`ScoreSlot::measure_in_background`] to fill.
    pub fn load(manifest: &CapacityManifest, data_dir: &Path, kind: BackendKind, determinism: Determinism) -> Self {
        let slot = ScoreSlot::default();
        match load(data_dir) {
            Some(r) if r.matches(manifest) && r.covers(kind, determinism) => {
                tracing::info!(path = %path(data_dir).display(), measured_at = %utc(r.measured_at_ms), "measured scores from the saved bench results");
                slot.set(r.scores(FILE_NAME));
            }
            Some(r) => tracing::info!(
                path = %path(data_dir).display(),
                same_machine = r.fingerprint == manifest.hardware_fingerprint(),
                same_version = r.worker_version == WORKER_VERSION,
                covers_backend = r.covers(kind, determinism),
                "saved bench results do not describe this machine, version and backend; measuring again"
            ),
            None => {}
        }
        slot
    }

    pub fn current(&self) -> Option<MeasuredScores> {
        self.lock().clone()
    }

    fn set(&self, scores: MeasuredScores) {
        *self.lock() = Some(scores);
    }

    fn lock(&self) -> MutexGuard<'_, Option<MeasuredScores>> {
        self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// When the slot is empty: runs the quick suite for the serving backend on a thread of its own
    /// (off the async runtime; a few seconds of CPU once per machine and version), saves it to
    /// `<data_dir>/bench.json` (keeping the other backends' figures of a saved report from this
    /// machine and version), fills the slot and calls `done`. Stops early, saving nothing, when
    /// `cancel` fires.
    pub fn measure_in_background(
        &self,
        manifest: &CapacityManifest,
        data_dir: &Path,
        kind: BackendKind,
        determinism: Determinism,
        cancel: CancellationToken,
        done: impl FnOnce(&MeasuredScores) + Send + 'static,
    ) {
        if self.current().is_some() {
            return;
        }
        let (slot, manifest, data_dir) = (self.clone(), manifest.clone(), data_dir.to_path_buf());
        let spawned = std::thread::Builder::new().name("startup-bench".to_owned()).spawn(move || {
            let started = Instant::now();
            let opts = Options { backends: vec![kind], determinism, quick: true };
            let mut report = run(&opts, &manifest, &|line| tracing::debug!(step = line, "startup bench"), &|| cancel.is_cancelled());
            if cancel.is_cancelled() {
                return;
            }
            if let Some(old) = load(&data_dir).filter(|old| old.matches(&manifest)) {
                let measured: Vec<String> = report.backends.iter().map(|b| b.score.kind.clone()).collect();
                report.backends.extend(old.backends.into_iter().filter(|b| !measured.contains(&b.score.kind)));
            }
            match save(&report, &data_dir) {
                Ok(file) => tracing::info!(path = %file.display(), "bench results saved"),
                Err(e) => tracing::warn!(data_dir = %data_dir.display(), error = %e, "cannot save the bench results"),
            }
            let scores = report.scores("startup");
            tracing::info!(
                elapsed_ms = started.elapsed().as_millis() as u64,
                scores = %serde_json::to_string(&scores).unwrap_or_default(),
                "measured scores"
            );
            slot.set(scores.clone());
            done(&scores);
        });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start the startup bench; advertising without measured scores");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capacity::{DetectOptions, detect};

    #[test]
    fn utc_dates() {
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(1_700_000_000_123), "2023-11-14 22:13:20 UTC");
        assert_eq!(utc(951_782_400_000), "2000-02-29 00:00:00 UTC");
        assert_eq!(utc(4_107_542_399_000), "2100-02-28 23:59:59 UTC");
    }

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
    fn round4_keeps_four_significant_digits() {
        assert_eq!(round4(123.456), 123.5);
        assert_eq!(round4(0.0012345), 0.001235);
        assert_eq!(round4(98_765.0), 98_770.0);
        assert_eq!(round4(0.0), 0.0);
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

    #[test]
    fn host_call_actors_run_on_the_cpu_backend() {
        let backend = Arc::new(Mutex::new(Backend::new(BackendKind::Cpu, Determinism::Reproducible).unwrap()));
        let mut hc = HostCallBench::new(backend.clone()).unwrap();
        for kind in
            [HostCall::Empty, HostCall::GpuNoop, HostCall::TinyOp, HostCall::TinyOpRead, HostCall::Ops100OneByOne, HostCall::Ops100Batched]
        {
            hc.evaluate(kind, 0).unwrap_or_else(|e| panic!("{kind:?} n=0: {e}"));
            hc.evaluate(kind, 3).unwrap_or_else(|e| panic!("{kind:?} n=3: {e}"));
        }
        // Every tensor an evaluation made is gone with it.
        assert_eq!(lock(&backend).live_bytes(), 0);
        // The actors really loop `n` times: gas grows by the same amount per iteration.
        let gas = |hc: &mut HostCallBench, kind, n| hc.evaluate_with_memory(kind, n).unwrap().2;
        for (kind, at_least) in [(HostCall::Empty, 4), (HostCall::GpuNoop, crate::runtime::GAS_PER_CALL), (HostCall::TinyOp, 200)] {
            // Two-digit counts: parsing the message costs the same.
            let (g10, g20, g30) = (gas(&mut hc, kind, 10), gas(&mut hc, kind, 20), gas(&mut hc, kind, 30));
            assert_eq!(g30 - g20, g20 - g10, "{kind:?}: {g10} {g20} {g30}");
            assert!(g20 - g10 >= 10 * at_least, "{kind:?}: {g10} {g20}");
        }
    }

    /// Both 100-op actors compute 1.0001^100 (f32, one rounding per op) in all 64 elements and read
    /// it back; the batched list is the same computation as the one-by-one calls.
    #[test]
    fn the_100_op_actors_compute_the_same_chain() {
        let mut want = 1.0f32;
        for _ in 0..100 {
            want *= 1.0001;
        }
        let backend = Arc::new(Mutex::new(Backend::new(BackendKind::Cpu, Determinism::Reproducible).unwrap()));
        let mut hc = HostCallBench::new(backend.clone()).unwrap();
        for kind in [HostCall::Ops100OneByOne, HostCall::Ops100Batched] {
            let (_, mem, _) = hc.evaluate_with_memory(kind, 2).unwrap_or_else(|e| panic!("{kind:?}: {e}"));
            let out = &mem[READ_AT as usize..READ_AT as usize + 64 * 4];
            for (i, c) in out.chunks_exact(4).enumerate() {
                let got = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                assert_eq!(got.to_bits(), want.to_bits(), "{kind:?} element {i}: {got} vs {want}");
            }
        }
        assert_eq!(lock(&backend).live_bytes(), 0);
        let (cmds, last) = ops100_commands();
        assert_eq!(cmds.len(), 199 * CMD_BYTES);
        assert_eq!(last, 197);
    }

    fn report_for(manifest: &CapacityManifest) -> BenchReport {
        BenchReport {
            schema: SCHEMA.to_owned(),
            worker_version: WORKER_VERSION.to_owned(),
            measured_at_ms: 1_700_000_000_000,
            quick: true,
            fingerprint: manifest.hardware_fingerprint(),
            hardware: Hardware::of(manifest),
            host_call_ns: Some(42.0),
            ao_gpu_call_ns: Some(80.0),
            backends: vec![BackendReport {
                score: BackendScore {
                    kind: "cpu".to_owned(),
                    description: "cpu (2 threads)".to_owned(),
                    determinism: "reproducible".to_owned(),
                    gemm_f32: Some(GemmScore { n: 256, gflops: 1.5 }),
                    qmatvec_gbps: BTreeMap::new(),
                    h2d_gbps: Some(3.25),
                    d2h_gbps: Some(4.5),
                    tiny_op_ns: Some(700.0),
                },
                device: "some cpu".to_owned(),
                driver: None,
                ops100_one_by_one_us: Some(70.0),
                ops100_batched_us: None,
                notes: vec!["q8_0 matvec: unsupported".to_owned()],
            }],
            unavailable: vec!["cuda: unavailable: no CUDA driver".to_owned()],
        }
    }

    #[test]
    fn saved_scores_are_used_only_on_the_machine_version_and_backend_that_measured_them() {
        let dir = tempfile::tempdir().unwrap();
        let manifest = detect(&DetectOptions { data_dir: dir.path().to_path_buf(), worker_address: None });
        let report = report_for(&manifest);
        let file = save(&report, dir.path()).unwrap();
        assert_eq!(file, dir.path().join("bench.json"));
        assert_eq!(load(dir.path()).as_ref(), Some(&report));

        let slot = ScoreSlot::load(&manifest, dir.path(), BackendKind::Cpu, Determinism::Reproducible);
        let scores = slot.current().expect("matching bench.json is used");
        assert_eq!(scores.source, "bench.json");
        assert_eq!(scores.host_call_ns, Some(42.0));
        assert_eq!(scores.backends[0].gemm_f32, Some(GemmScore { n: 256, gflops: 1.5 }));
        assert_eq!(scores.fingerprint, manifest.hardware_fingerprint());

        // Another backend or mode: not covered.
        assert!(ScoreSlot::load(&manifest, dir.path(), BackendKind::Wgpu, Determinism::Reproducible).current().is_none());
        assert!(ScoreSlot::load(&manifest, dir.path(), BackendKind::Cpu, Determinism::Fast).current().is_none());
        // Another machine, another version, another schema: ignored.
        for change in [
            (|r: &mut BenchReport| r.fingerprint = "0".repeat(64)) as fn(&mut BenchReport),
            |r| r.worker_version = "0.0.0-other".to_owned(),
            |r| r.schema = "ao-gpu-worker/bench/0".to_owned(),
        ] {
            let mut other = report.clone();
            change(&mut other);
            save(&other, dir.path()).unwrap();
            assert!(ScoreSlot::load(&manifest, dir.path(), BackendKind::Cpu, Determinism::Reproducible).current().is_none());
        }
        // A file that does not parse: ignored, not fatal.
        std::fs::write(dir.path().join("bench.json"), "{not json").unwrap();
        assert!(ScoreSlot::load(&manifest, dir.path(), BackendKind::Cpu, Determinism::Reproducible).current().is_none());
    }

    #[test]
    fn the_table_shows_hardware_and_figures() {
        let dir = tempfile::tempdir().unwrap();
        let manifest = detect(&DetectOptions { data_dir: dir.path().to_path_buf(), worker_address: None });
        let table = report_for(&manifest).table();
        assert!(table.contains(&format!("({} logical cores", manifest.host.cpu.logical_cores)), "{table}");
        assert!(table.contains("1.5 GFLOP/s @256³"), "{table}");
        assert!(table.contains("3.25 GB/s"), "{table}");
        assert!(table.contains("host call from wasm (empty): 42 ns"), "{table}");
        assert!(table.contains("skipped  cuda: unavailable"), "{table}");
        assert!(table.contains("note: cpu: q8_0 matvec: unsupported"), "{table}");
    }
}

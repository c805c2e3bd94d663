//! WAT actors that time host calls through the production [`Runtime`] ([`HostCallBench`]).
//!
//! The runtime is the worker's own (its engine: fuel metering, epoch interruption, NaN
//! canonicalization; its linker: the WASI subset and `ao_gpu`), one evaluation per measurement,
//! each actor looping `n` times over the call under test (`n` is the message text). A per-call
//! figure is `(t(n) - t(0)) / n`, so instantiation and the JSON round trip of the evaluation cancel
//! out. The empty call is `wasi_snapshot_preview1.sched_yield`, a host function that does nothing.

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::{Budget, median, repeat};
use crate::gpu::pool::SharedDevice;
use crate::protocol::Tag;
use crate::runtime::{
    ActorModule, DEFAULT_MAX_DEVICE_MEMORY, EvalInput, GPU_FUNCTIONS, GpuConfig, Limits, MODULE_FORMAT, Runtime, RuntimeConfig,
};

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
    let mut wat = wat_header(kind);
    wat.push_str(&wat_data(kind));
    wat.push_str(&wat_functions());
    wat.push_str(&wat_setup(kind));
    wat.push_str(&wat_loop(&wat_iteration(kind)));
    wat
}

/// The module's imports (`run` only for the batched actor) and its one page of memory.
fn wat_header(kind: HostCall) -> String {
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
    wat
}

/// The data segments: the "ok" and "status -k" results, the input tensor (all ones) and its
/// shape, and for the batched actor its command list.
fn wat_data(kind: HostCall) -> String {
    let mut wat = String::new();
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
    if kind == HostCall::Ops100Batched {
        let (cmds, _) = ops100_commands();
        wat.push_str(&format!("  (data (i32.const {CMDS_AT}) \"{}\")\n", wat_bytes(&cmds)));
    }
    wat
}

/// `malloc` (a bump allocator), `$count` (the decimal message text), `$fail` (the "status -k"
/// result of a status) and the start of `handle`, up to parsing `n`.
fn wat_functions() -> String {
    format!(
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
    )
}

/// What `handle` does once before the loop: make the input tensor (actors that use one), and
/// for the batched actor point its first scale at it.
fn wat_setup(kind: HostCall) -> String {
    let mut wat = String::new();
    let len = kind.elements();
    if kind != HostCall::Empty && kind != HostCall::GpuNoop {
        wat.push_str(&check(&format!(
            "(call $tensor (i32.const {DATA_AT}) (i32.const {len}) (i32.const {SHAPE_AT}) (i32.const 1) (i32.const {X_AT}))"
        )));
    }
    if kind == HostCall::Ops100Batched {
        // The first scale reads the input tensor.
        wat.push_str(&format!("    (i32.store (i32.const {}) (i32.load (i32.const {X_AT})))\n", CMDS_AT + 4));
    }
    wat
}

/// One iteration of `kind`: the body of `handle`'s loop.
fn wat_iteration(kind: HostCall) -> String {
    let len = kind.elements();
    match kind {
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
            let (cmds, last_scale) = ops100_commands();
            let n_cmds = cmds.len() / CMD_BYTES;
            let last_out = CMDS_AT as usize + last_scale * CMD_BYTES + 52;
            let mut b = check(&format!("(call $run (i32.const {CMDS_AT}) (i32.const {n_cmds}) (i32.const {DONE_AT}))"));
            b.push_str(&format!("    (local.set $cur (i32.load (i32.const {last_out})))\n"));
            b.push_str(&check(&format!("(call $read (local.get $cur) (i32.const {READ_AT}) (i32.const {len}))")));
            b.push_str(&check("(call $free (local.get $cur))"));
            b
        }
    }
}

/// The end of `handle`: `body` `n` times, then the "ok" result.
fn wat_loop(body: &str) -> String {
    format!(
        r#"    (block $end
      (loop $l
        (br_if $end (i32.ge_u (local.get $i) (local.get $n)))
        {body}        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $l)))
    (i32.const {OK_AT}))
)
"#
    )
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
    pub fn new(backend: SharedDevice) -> Result<Self, String> {
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

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::super::lock;
    use super::*;
    use crate::gpu::{Backend, BackendKind, Determinism};

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
}

//! The `ao_gpu` host module through the runtime, with inline WAT actors: upload, ops and read-back
//! against a CPU computation, statuses for guest misuse, traps for bad pointers, gas, the
//! compute limit, the device-memory quota, per-evaluation handles, and the same actor on wgpu;
//! dtypes and the layout, gather, rotary and attention ops; batched submission (`run`); constants
//! loaded by content, from a fake source, from the devnet gateway over loopback HTTP, and through
//! the worker's job loop when the gateway misbehaves; and the header and docs against the code.
//!
//! Every actor imports every function of `GPU_FUNCTIONS` with the table's signature (so the table
//! and the linker agree) and answers `Output` = hex of a memory range the test decodes.
//!
//! Here: the actor builders (`actor`, `Prog`, `cmd`) and the runtime fixture; the cases are in
//! `calls`, `statuses`, `gas`, `batch`, `constants` and `header`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use ao_gpu_worker::gpu::{Backend, BackendKind, DType, Determinism, RawTensor, TensorId};
use ao_gpu_worker::protocol::Tag;
use ao_gpu_worker::runtime::{
    ActorModule, CMD_SIZE, EvalError, EvalInput, Evaluation, GPU_FUNCTIONS, GpuConfig, GpuStatus, Limits, MODULE_FORMAT, Runtime,
    RuntimeConfig, RuntimeError,
};

mod batch;
mod calls;
mod constants;
mod deadline;
mod gas;
mod header;
mod statuses;

const MIB: u64 = 1 << 20;
const PREFIX: &str = r#"{"ok":true,"response":{"Output":""#;
const PREFIX_AT: u32 = 0x100;
const HEX_AT: u32 = 0x180;
const SUFFIX_AT: u32 = 0x1a0;
const A: u32 = 0x1000;
const B: u32 = 0x1800;
const SHAPE_A: u32 = 0x3000;
const SHAPE_B: u32 = 0x3010;
const SHAPE_BIG: u32 = 0x3020;
const H: u32 = 0x3100; // handle slots, 4 bytes each
const FLAG: u32 = 0x3200;
const OUT: u32 = 0x6000;
const BIG_A: u32 = 0x20000;
const BIG_B: u32 = 0x60000;
const RESP: u32 = 0xE0000;

fn h(i: u32) -> u32 {
    H + 4 * i
}

fn wat_bytes(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("\\{b:02x}")).collect()
}

fn data(addr: u32, bytes: &[u8]) -> String {
    format!("(data (i32.const {addr}) \"{}\")\n", wat_bytes(bytes))
}

fn f32s(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn u32s(v: &[u32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

const A_DATA: [f32; 6] = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
const B_DATA: [f32; 12] = [0.5, -1.0, 2.0, 0.25, 1.5, 3.0, -0.5, 1.0, -2.0, 0.75, 4.0, 0.125];

/// An actor whose `handle` runs `body` (which must leave the result pointer of `$respond` on the
/// stack); A is 2x3 at `A`, B is 3x4 at `B`, the big shape is `big` x `big`.
fn actor(body: &str, big: u32) -> Vec<u8> {
    actor_with(body, big, &[])
}

/// [`actor`] with more data segments `(address, bytes)`.
fn actor_with(body: &str, big: u32, extra: &[(u32, Vec<u8>)]) -> Vec<u8> {
    let wat_sig = |sig: &str| {
        let (params, results) = sig.split_once(" -> ").unwrap();
        let list = |s: &str| s.trim_matches(|c| c == '(' || c == ')').replace(',', "");
        format!("(param {}) (result {})", list(params), list(results))
    };
    let imports: String =
        GPU_FUNCTIONS.iter().map(|(name, sig)| format!("(import \"ao_gpu\" \"{name}\" (func ${name} {}))\n", wat_sig(sig))).collect();
    let mut wat = format!("(module {imports} (memory (export \"memory\") 16)\n");
    wat.push_str(&data(PREFIX_AT, PREFIX.as_bytes()));
    wat.push_str(&data(HEX_AT, b"0123456789abcdef"));
    wat.push_str(&data(SUFFIX_AT, b"\"}}\0"));
    wat.push_str(&data(A, &f32s(&A_DATA)));
    wat.push_str(&data(B, &f32s(&B_DATA)));
    wat.push_str(&data(SHAPE_A, &u32s(&[2, 3])));
    wat.push_str(&data(SHAPE_B, &u32s(&[3, 4])));
    wat.push_str(&data(SHAPE_BIG, &u32s(&[big, big])));
    for (addr, bytes) in extra {
        wat.push_str(&data(*addr, bytes));
    }
    let plen = PREFIX.len();
    wat.push_str(&format!(
        r#"
  (func (export "malloc") (param i32) (result i32) (i32.const 0x8000))
  (func $respond (param $p i32) (param $n i32) (result i32) (local $i i32) (local $o i32) (local $b i32)
    (memory.copy (i32.const {RESP}) (i32.const {PREFIX_AT}) (i32.const {plen}))
    (local.set $o (i32.const {resp_hex}))
    (block $done (loop $l
      (br_if $done (i32.ge_u (local.get $i) (local.get $n)))
      (local.set $b (i32.load8_u (i32.add (local.get $p) (local.get $i))))
      (i32.store8 (local.get $o) (i32.load8_u (i32.add (i32.const {HEX_AT}) (i32.shr_u (local.get $b) (i32.const 4)))))
      (i32.store8 (i32.add (local.get $o) (i32.const 1)) (i32.load8_u (i32.add (i32.const {HEX_AT}) (i32.and (local.get $b) (i32.const 15)))))
      (local.set $o (i32.add (local.get $o) (i32.const 2)))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br $l)))
    (memory.copy (local.get $o) (i32.const {SUFFIX_AT}) (i32.const 4))
    (i32.const {RESP}))
  (func (export "handle") (param $msg i32) (param $env i32) (result i32)
    {body})
)"#,
        resp_hex = RESP as usize + plen,
    ));
    wat::parse_str(&wat).unwrap_or_else(|e| panic!("{e}\n{wat}"))
}

/// `(i32.store (i32.const OUT + 4 * slot) call)`.
fn status(slot: u32, call: &str) -> String {
    format!("(i32.store (i32.const {}) {call})\n", OUT + 4 * slot)
}

fn load(slot: u32) -> String {
    format!("(i32.load (i32.const {}))", h(slot))
}

fn upload_a(slot: u32) -> String {
    format!("(call $tensor_f32 (i32.const {A}) (i32.const 6) (i32.const {SHAPE_A}) (i32.const 2) (i32.const {}))", h(slot))
}

fn upload_b(slot: u32) -> String {
    format!("(call $tensor_f32 (i32.const {B}) (i32.const 12) (i32.const {SHAPE_B}) (i32.const 2) (i32.const {}))", h(slot))
}

struct Fixture {
    rt: Runtime,
    _dir: tempfile::TempDir,
}

fn runtime_with(gpu: GpuConfig) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let cfg = RuntimeConfig {
        cache_dir: dir.path().join("modules"),
        max_memory: 16 * MIB,
        max_compute: 200_000_000,
        deadline: Duration::from_secs(30),
    };
    Fixture { rt: Runtime::with_gpu(cfg, gpu).unwrap(), _dir: dir }
}

fn runtime() -> Fixture {
    runtime_with(GpuConfig::default())
}

const LIMITS: Limits = Limits { memory_bytes: 16 * MIB, compute: 200_000_000 };

fn input(limits: Limits) -> EvalInput<'static> {
    EvalInput { msg_json: "{}", env_json: "{}", timestamp_ms: 1_700_000_000_000, message_id: "m1", limits }
}

fn load_module(rt: &Runtime, wasm: &[u8]) -> Result<Arc<ActorModule>, RuntimeError> {
    rt.load(wasm, &[Tag::new("Module-Format", MODULE_FORMAT)])
}

/// The decoded `Output` bytes of a successful evaluation.
fn output(e: &Evaluation) -> Vec<u8> {
    match &e.outcome {
        Ok(response) => hex::decode(response["Output"].as_str().expect("string Output")).unwrap(),
        Err(err) => panic!("evaluation failed: {err}; log: {}", e.log),
    }
}

fn i32_at(bytes: &[u8], slot: usize) -> i32 {
    i32::from_le_bytes(bytes[4 * slot..4 * slot + 4].try_into().unwrap())
}

fn f32_at(bytes: &[u8], slot: usize) -> f32 {
    f32::from_le_bytes(bytes[4 * slot..4 * slot + 4].try_into().unwrap())
}

fn run(f: &Fixture, wasm: &[u8], state: Option<&[u8]>, limits: Limits) -> Evaluation {
    let m = load_module(&f.rt, wasm).unwrap();
    f.rt.evaluate(&m, state, &input(limits))
}

/// A @ B on the CPU, summed in k order.
fn matmul_reference() -> Vec<f32> {
    let mut out = vec![0f32; 8];
    for i in 0..2 {
        for j in 0..4 {
            let mut acc = 0f32;
            for k in 0..3 {
                acc += A_DATA[i * 3 + k] * B_DATA[k * 4 + j];
            }
            out[i * 4 + j] = acc;
        }
    }
    out
}

/// Where [`Prog`] places its data segments.
const DATA: u32 = 0x10000;
/// Status slots are OUT words 0..64; results follow.
const RESULTS: u32 = 64;

fn f16s(v: &[u16]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn i32s(v: &[i32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// A WAT actor under construction: data placed in memory, calls whose statuses land in OUT words
/// 0.., results read into OUT words `RESULTS`...
struct Prog {
    body: String,
    data: Vec<(u32, Vec<u8>)>,
    next_data: u32,
    statuses: u32,
    results: u32,
}

impl Prog {
    fn new() -> Self {
        Self { body: String::new(), data: Vec::new(), next_data: DATA, statuses: 0, results: RESULTS }
    }

    /// Places `bytes` (16-byte aligned) and returns their address.
    fn put(&mut self, bytes: Vec<u8>) -> u32 {
        let at = self.next_data;
        self.next_data += (bytes.len() as u32).div_ceil(16) * 16 + 16;
        self.data.push((at, bytes));
        at
    }

    /// Runs `call` and stores its status; returns the status slot.
    fn st(&mut self, call: impl Into<String>) -> usize {
        let slot = self.statuses;
        self.statuses += 1;
        assert!(self.statuses <= RESULTS, "too many statuses");
        self.body += &status(slot, &call.into());
        slot as usize
    }

    /// Uploads a tensor of `dtype` into handle slot `slot`.
    fn upload(&mut self, dtype: DType, bytes: Vec<u8>, shape: &[u32], slot: u32) -> usize {
        let len = bytes.len();
        let (data, shape_at) = (self.put(bytes), self.put(u32s(shape)));
        self.st(format!(
            "(call $tensor (i32.const {}) (i32.const {data}) (i32.const {len}) (i32.const {shape_at}) (i32.const {}) (i32.const {}))",
            dtype.code(),
            shape.len(),
            h(slot)
        ))
    }

    /// Reads `n` f32 values of the tensor in handle slot `slot`; returns the first result word.
    fn read_f32(&mut self, slot: u32, n: u32) -> usize {
        let at = self.results;
        self.results += n;
        self.st(format!("(call $read_f32 {} (i32.const {}) (i32.const {n}))", load(slot), OUT + 4 * at));
        at as usize
    }

    /// Reads the storage bytes of slot `slot` (room for `cap` bytes, a multiple of 4); returns the
    /// word of the length, followed by the bytes.
    fn read_raw(&mut self, slot: u32, cap: u32) -> usize {
        let at = self.results;
        self.results += 1 + cap / 4;
        self.st(format!("(call $read {} (i32.const {}) (i32.const {cap}) (i32.const {}))", load(slot), OUT + 4 * (at + 1), OUT + 4 * at));
        at as usize
    }

    fn wasm(&self) -> Vec<u8> {
        let body = format!("{}(call $respond (i32.const {OUT}) (i32.const {}))", self.body, 4 * self.results);
        actor_with(&body, 2, &self.data)
    }
}

fn f32s_at(out: &[u8], word: usize, n: usize) -> Vec<f32> {
    (0..n).map(|i| f32_at(out, word + i)).collect()
}

fn statuses(out: &[u8], n: usize) -> Vec<Option<GpuStatus>> {
    (0..n).map(|i| GpuStatus::from_code(i32_at(out, i))).collect()
}

fn cpu() -> Backend {
    Backend::new(BackendKind::Cpu, Determinism::Reproducible).unwrap()
}

fn cpu_tensor(be: &mut Backend, dtype: DType, shape: &[usize], bytes: Vec<u8>) -> TensorId {
    be.upload_raw(&RawTensor::new(dtype, shape.to_vec(), bytes).unwrap()).unwrap()
}

const X_ROPE: [f32; 8] = [0.5, -1.0, 2.0, 0.25, -0.75, 1.5, 3.0, -2.0];
const Q_ATT: [f32; 16] = [0.1, 0.2, -0.3, 0.4, 0.5, -0.6, 0.7, 0.8, -0.9, 1.0, 0.15, -0.25, 0.35, 0.45, -0.55, 0.65];
const K_ATT: [f32; 12] = [0.3, -0.1, 0.2, 0.5, -0.4, 0.6, 0.1, -0.2, 0.9, 0.05, -0.3, 0.4];
const V_ATT: [f32; 12] = [1.0, 2.0, 3.0, 4.0, -1.0, 0.5, 0.25, 2.5, 0.75, -1.5, 1.25, 0.125];

fn b64_id(n: u8) -> String {
    ao_gpu_worker::protocol::b64::encode(&[n; 32])
}

/// A `run` command record (include/ao_gpu.h's `ao_gpu_cmd`).
fn cmd(op: i32, ins: &[i32], ints: &[i32], floats: &[f32]) -> Vec<u8> {
    let mut r = vec![0u8; CMD_SIZE];
    r[0..4].copy_from_slice(&op.to_le_bytes());
    for (k, v) in ins.iter().enumerate() {
        r[4 + 4 * k..8 + 4 * k].copy_from_slice(&v.to_le_bytes());
    }
    for (k, v) in ints.iter().enumerate() {
        r[20 + 4 * k..24 + 4 * k].copy_from_slice(&v.to_le_bytes());
    }
    for (k, v) in floats.iter().enumerate() {
        r[44 + 4 * k..48 + 4 * k].copy_from_slice(&v.to_le_bytes());
    }
    // `out` starts as a sentinel the host overwrites.
    r[52..56].copy_from_slice(&0x7777i32.to_le_bytes());
    r
}

/// `AO_GPU_OUT(i)`.
fn out_of(i: i32) -> i32 {
    -i - 1
}

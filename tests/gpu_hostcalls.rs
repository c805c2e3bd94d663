//! The `ao_gpu` host module through the runtime, with inline WAT actors: upload, ops and read-back
//! against a CPU computation, statuses for guest misuse, traps for bad pointers, gas, the
//! compute limit, the device-memory quota, per-evaluation handles, and the same actor on wgpu.
//!
//! Every actor imports every function of `GPU_FUNCTIONS` with the table's signature (so the table
//! and the linker agree) and answers `Output` = hex of a memory range the test decodes.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use ao_gpu_worker::gpu::{Backend, BackendKind, Determinism, HostTensor, TensorId};
use ao_gpu_worker::protocol::Tag;
use ao_gpu_worker::runtime::{
    ActorModule, EvalError, EvalInput, Evaluation, GPU_FUNCTIONS, GpuConfig, GpuStatus, Limits, MODULE_FORMAT, Runtime, RuntimeConfig,
    RuntimeError,
};

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

/// Uploads A and B, multiplies, reads back, and runs every other op on A (or the product),
/// reading each result: statuses in slots 0..16, the product at 16..24, shape at 24..28 and rank 28,
/// then the op results from 32.
fn ops_actor() -> Vec<u8> {
    let mut body = String::new();
    body += &status(0, &upload_a(0));
    body += &status(1, &upload_b(1));
    body += &status(2, &format!("(call $matmul {} {} (i32.const 0) (i32.const 0) (i32.const {}))", load(0), load(1), h(2)));
    body += &status(3, &format!("(call $read_f32 {} (i32.const {}) (i32.const 8))", load(2), OUT + 4 * 16));
    body += &status(4, &format!("(call $shape {} (i32.const {}) (i32.const {}))", load(2), OUT + 4 * 24, OUT + 4 * 28));
    // Elementwise and row ops on the 2x4 product (slot 2); results in handle slots 3.. and read to 32 + 8 * i.
    let ops = [
        format!("(call $binary (i32.const 2) {} {} (i32.const {}))", load(2), load(2), h(3)),
        format!("(call $unary (i32.const 1) {} (i32.const {}))", load(2), h(4)),
        format!("(call $scale {} (f32.const 0.5) (i32.const {}))", load(2), h(5)),
        format!("(call $softmax {} (i32.const {}))", load(2), h(6)),
        format!("(call $reduce (i32.const 3) {} (i32.const {}))", load(2), h(7)),
    ];
    for (i, op) in ops.iter().enumerate() {
        let i = i as u32;
        body += &status(5 + i, op);
        body += &status(10 + i, &format!("(call $read_f32 {} (i32.const {}) (i32.const 8))", load(3 + i), OUT + 4 * (32 + 8 * i)));
    }
    body += &format!("(call $respond (i32.const {OUT}) (i32.const {}))", 4 * (32 + 8 * 5));
    actor(&body, 2)
}

#[test]
fn upload_matmul_and_ops_read_back_match_the_cpu() {
    let f = runtime();
    assert_eq!(f.rt.tensor_backend().kind, BackendKind::Cpu);
    assert_eq!(f.rt.tensor_backend().determinism, Determinism::Reproducible);
    let e = run(&f, &ops_actor(), None, LIMITS);
    let out = output(&e);
    let statuses: Vec<i32> = (0..15).map(|i| i32_at(&out, i)).collect();
    assert!(statuses.iter().all(|&s| s == 0), "{statuses:?}");
    let product: Vec<f32> = (16..24).map(|i| f32_at(&out, i)).collect();
    assert_eq!(product, matmul_reference());
    assert_eq!((i32_at(&out, 24), i32_at(&out, 25), i32_at(&out, 28)), (2, 4, 2), "shape [2, 4], rank 2");
    // The same ops straight on a CPU backend.
    let mut cpu = Backend::new(BackendKind::Cpu, Determinism::Reproducible).unwrap();
    let p = cpu.upload(&HostTensor { shape: vec![2, 4], data: product.clone() }).unwrap();
    let expect = [cpu.mul(p, p), cpu.gelu(p), cpu.scale(p, 0.5), cpu.softmax_last(p), cpu.argmax_last(p)];
    for (i, id) in expect.into_iter().enumerate() {
        let want = cpu.read(id.unwrap()).unwrap().data;
        let got: Vec<f32> = (0..want.len()).map(|j| f32_at(&out, 32 + 8 * i + j)).collect();
        assert_eq!(got.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), want.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), "op {i}");
    }
}

#[test]
fn guest_misuse_returns_statuses_and_the_evaluation_succeeds() {
    let f = runtime();
    let mut body = String::new();
    body += &status(0, &upload_a(0));
    body += &status(1, &format!("(call $matmul {} {} (i32.const 0) (i32.const 0) (i32.const {}))", load(0), load(0), h(1)));
    body +=
        &status(2, &format!("(call $tensor_f32 (i32.const {A}) (i32.const 5) (i32.const {SHAPE_A}) (i32.const 2) (i32.const {}))", h(2)));
    body +=
        &status(3, &format!("(call $tensor_f32 (i32.const {A}) (i32.const 6) (i32.const {SHAPE_A}) (i32.const 0) (i32.const {}))", h(2)));
    body += &status(4, &format!("(call $binary (i32.const 9) {} {} (i32.const {}))", load(0), load(0), h(2)));
    body += &status(5, &format!("(call $reduce (i32.const 7) {} (i32.const {}))", load(0), h(2)));
    body += &status(6, &format!("(call $read_f32 {} (i32.const {}) (i32.const 5))", load(0), OUT + 64));
    body += &status(7, &format!("(call $rmsnorm {} {} (f32.const 1e-5) (i32.const {}))", load(0), load(0), h(2)));
    body += &status(8, "(call $shape (i32.const 77) (i32.const 0x6100) (i32.const 0x6110))");
    body += &status(9, &format!("(call $free {})", load(0)));
    body += &status(10, &format!("(call $free {})", load(0)));
    body += &status(11, &format!("(call $read_f32 {} (i32.const {}) (i32.const 8))", load(0), OUT + 64));
    body += &status(12, "(call $free (i32.const 0))");
    body += &status(13, "(call $unary (i32.const 0) (i32.const -1) (i32.const 0x6100))");
    body += &format!("(call $respond (i32.const {OUT}) (i32.const 56))");
    let e = run(&f, &actor(&body, 2), None, LIMITS);
    let out = output(&e);
    let got: Vec<Option<GpuStatus>> = (0..14).map(|i| GpuStatus::from_code(i32_at(&out, i))).collect();
    use GpuStatus::*;
    let want = [
        Ok,
        ShapeMismatch,
        ShapeMismatch,
        InvalidArgument,
        InvalidArgument,
        InvalidArgument,
        BufferTooSmall,
        ShapeMismatch,
        UnknownHandle,
        Ok,
        UnknownHandle,
        UnknownHandle,
        UnknownHandle,
        UnknownHandle,
    ];
    assert_eq!(got, want.map(Some));
}

#[test]
fn out_of_bounds_pointers_trap() {
    let f = runtime();
    let cases = [
        format!("(drop {}) (drop (call $read_f32 {} (i32.const 0xffffff00) (i32.const 8))) (i32.const 0)", upload_a(0), load(0)),
        format!(
            "(drop (call $tensor_f32 (i32.const 0xfffffff0) (i32.const 6) (i32.const {SHAPE_A}) (i32.const 2) (i32.const {}))) (i32.const 0)",
            h(0)
        ),
        format!("(drop (call $tensor_f32 (i32.const {A}) (i32.const 6) (i32.const {SHAPE_A}) (i32.const 2) (i32.const -2))) (i32.const 0)"),
        format!("(drop {}) (drop (call $unary (i32.const 0) {} (i32.const 0x7ffffff0))) (i32.const 0)", upload_a(0), load(0)),
        format!("(drop {}) (drop (call $shape {} (i32.const 0xfffffffc) (i32.const 0))) (i32.const 0)", upload_a(0), load(0)),
    ];
    for body in cases {
        let e = run(&f, &actor(&body, 2), None, LIMITS);
        assert!(e.memory.is_none(), "{body}");
        match &e.outcome {
            Err(EvalError::Trap(msg)) => assert!(msg.contains("ao_gpu.") && msg.contains("outside memory"), "{msg}"),
            other => panic!("{body}: {other:?}"),
        }
    }
}

/// Uploads two `n` x `n` matrices, multiplies them and frees everything.
fn big_matmul_actor(n: u32) -> Vec<u8> {
    let upload = |at: u32, slot: u32| {
        format!("(call $tensor_f32 (i32.const {at}) (i32.const {}) (i32.const {SHAPE_BIG}) (i32.const 2) (i32.const {}))", n * n, h(slot))
    };
    let mut body = String::new();
    body += &status(0, &upload(BIG_A, 0));
    body += &status(1, &upload(BIG_B, 1));
    body += &status(2, &format!("(call $matmul {} {} (i32.const 0) (i32.const 1) (i32.const {}))", load(0), load(1), h(2)));
    body += &format!("(i32.store (i32.const {FLAG}) (i32.add (i32.load (i32.const {FLAG})) (i32.const 1)))\n");
    body += &format!("(call $respond (i32.const {OUT}) (i32.const 12))");
    actor(&body, n)
}

#[test]
fn gas_grows_with_the_op_and_is_deterministic() {
    let f = runtime();
    let small = run(&f, &big_matmul_actor(8), None, LIMITS);
    let big = run(&f, &big_matmul_actor(256), None, LIMITS);
    let big_again = run(&f, &big_matmul_actor(256), None, LIMITS);
    for e in [&small, &big] {
        let out = output(e);
        assert_eq!((i32_at(&out, 0), i32_at(&out, 1), i32_at(&out, 2)), (0, 0, 0));
    }
    assert_eq!(big.gas_used, big_again.gas_used);
    let n: u64 = 256;
    // The matmul alone: 3 tensors of n^2 f32 moved (3 n^2 fuel) and 2 n^3 FLOPs (n^3 fuel).
    assert!(big.gas_used - small.gas_used >= n * n * n + 3 * n * n - 3 * 64, "{} vs {}", big.gas_used, small.gas_used);
}

#[test]
fn compute_limit_too_small_for_the_op_is_out_of_fuel_and_rolls_back() {
    let f = runtime();
    let wasm = big_matmul_actor(256);
    let ok = run(&f, &wasm, None, LIMITS);
    let state = ok.memory.clone().unwrap();
    let tight = Limits { compute: 5_000_000, ..LIMITS };
    let e = run(&f, &wasm, Some(&state), tight);
    assert_eq!(e.outcome, Err(EvalError::OutOfFuel { limit: 5_000_000 }));
    assert!(e.memory.is_none(), "no state from a failed evaluation");
    assert_eq!(e.gas_used, 5_000_000);
    // The previous state is still good: the flag counts successful messages only.
    let again = run(&f, &wasm, Some(&state), LIMITS);
    assert_eq!(i32_at(&again.memory.unwrap()[FLAG as usize..], 0), 2);
}

#[test]
fn device_memory_quota_returns_a_status() {
    let f = runtime_with(GpuConfig { backend: None, max_device_memory: 100_000 });
    // 2 x 128x128 f32 = 128 KiB > 100 000 bytes: the first upload fits, the second does not.
    let out = output(&run(&f, &big_matmul_actor(128), None, LIMITS));
    assert_eq!(
        [i32_at(&out, 0), i32_at(&out, 1), i32_at(&out, 2)],
        [GpuStatus::Ok.code(), GpuStatus::QuotaExceeded.code(), GpuStatus::UnknownHandle.code()]
    );
    // Freeing gives the quota back within the evaluation.
    let upload = |slot: u32| {
        format!("(call $tensor_f32 (i32.const {BIG_A}) (i32.const 16384) (i32.const {SHAPE_BIG}) (i32.const 2) (i32.const {}))", h(slot))
    };
    let body = format!(
        "{}{}{}{}(call $respond (i32.const {OUT}) (i32.const 16))",
        status(0, &upload(0)),
        status(1, &format!("(call $free {})", load(0))),
        status(2, &upload(1)),
        status(3, &format!("(call $scale {} (f32.const 2) (i32.const {}))", load(1), h(2))),
    );
    let out = output(&run(&f, &actor(&body, 128), None, LIMITS));
    assert_eq!([i32_at(&out, 0), i32_at(&out, 1), i32_at(&out, 2), i32_at(&out, 3)], [0, 0, 0, GpuStatus::QuotaExceeded.code()]);
}

#[test]
fn handles_do_not_survive_into_the_next_evaluation() {
    let f = runtime();
    // First message: upload and keep the handle in memory (the state). Later: ask for its shape.
    let body = format!(
        "(if (i32.eqz (i32.load (i32.const {FLAG})))
           (then {} (i32.store (i32.const {FLAG}) (i32.const 1)))
           (else {}))
         (call $respond (i32.const {OUT}) (i32.const 4))",
        status(0, &upload_a(0)),
        status(0, &format!("(call $shape {} (i32.const 0x6100) (i32.const 0x6110))", load(0))),
    );
    let wasm = actor(&body, 2);
    let first = run(&f, &wasm, None, LIMITS);
    assert_eq!(i32_at(&output(&first), 0), 0);
    let state = first.memory.unwrap();
    assert_eq!(i32_at(&state[h(0) as usize..], 0), 1, "the first handle is 1");
    let second = run(&f, &wasm, Some(&state), LIMITS);
    assert_eq!(i32_at(&output(&second), 0), GpuStatus::UnknownHandle.code());
}

#[test]
fn tensors_are_freed_when_the_evaluation_ends_whatever_the_outcome() {
    let backend = Arc::new(Mutex::new(Backend::new(BackendKind::Cpu, Determinism::Reproducible).unwrap()));
    let f = runtime_with(GpuConfig { backend: Some(backend.clone()), ..GpuConfig::default() });
    let ok = format!("{}{}(call $respond (i32.const {OUT}) (i32.const 4))", status(0, &upload_a(0)), status(1, &upload_b(1)));
    let trap = format!("{}{}unreachable", status(0, &upload_a(0)), status(1, &upload_b(1)));
    assert!(run(&f, &actor(&ok, 2), None, LIMITS).outcome.is_ok());
    assert!(matches!(run(&f, &actor(&trap, 2), None, LIMITS).outcome, Err(EvalError::Trap(_))));
    let b = backend.lock().unwrap();
    for id in 0..10 {
        assert!(b.shape(TensorId(id)).is_err(), "tensor {id} is still live");
    }
}

#[test]
fn gpu_imports_are_checked_at_load() {
    let f = runtime();
    let base = r#"(memory (export "memory") 1)
      (func (export "malloc") (param i32) (result i32) (i32.const 0))
      (func (export "handle") (param i32 i32) (result i32) (i32.const 0)))"#;
    let refused = |import: &str| match load_module(&f.rt, &wat::parse_str(format!("(module {import} {base}")).unwrap()) {
        Err(RuntimeError::ForbiddenImport { module, name, detail }) => (module, name, detail),
        other => panic!("{import}: {other:?}"),
    };
    let (module, name, detail) = refused(r#"(import "ao_gpu" "matmul" (func (param i32) (result i32)))"#);
    assert_eq!((module.as_str(), name.as_str()), ("ao_gpu", "matmul"));
    assert!(detail.contains("(i32, i32, i32, i32, i32) -> i32"), "{detail}");
    let (_, _, detail) = refused(r#"(import "ao_gpu" "scale" (func (param i32 i32 i32) (result i32)))"#);
    assert!(detail.contains("(i32, f32, i32) -> i32"), "{detail}");
    let (_, name, _) = refused(r#"(import "ao_gpu" "conv2d" (func (param i32) (result i32)))"#);
    assert_eq!(name, "conv2d");
    let ok = wat::parse_str(format!(r#"(module (import "ao_gpu" "scale" (func (param i32 f32 i32) (result i32))) {base}"#)).unwrap();
    load_module(&f.rt, &ok).unwrap();
}

#[test]
fn the_same_actor_on_wgpu_is_bitwise_identical_in_reproducible_mode() {
    let backend = match Backend::new(BackendKind::Wgpu, Determinism::Reproducible) {
        Ok(b) => b,
        Err(e) => {
            if std::env::var("REQUIRE_WGPU").is_ok_and(|v| v == "1") {
                panic!("REQUIRE_WGPU=1 but the wgpu backend did not start: {e}");
            }
            eprintln!("!!!!! SKIPPING the wgpu ao_gpu case: {e} (set REQUIRE_WGPU=1 to make this fail) !!!!!");
            return;
        }
    };
    let gpu = runtime_with(GpuConfig { backend: Some(Arc::new(Mutex::new(backend))), ..GpuConfig::default() });
    assert_eq!(gpu.rt.tensor_backend().kind, BackendKind::Wgpu);
    eprintln!("ao_gpu on {}", gpu.rt.tensor_backend().description);
    let cpu = runtime();
    let wasm = ops_actor();
    let on_gpu = run(&gpu, &wasm, None, LIMITS);
    let on_cpu = run(&cpu, &wasm, None, LIMITS);
    assert_eq!(output(&on_gpu), output(&on_cpu));
    assert_eq!(on_gpu.gas_used, on_cpu.gas_used, "gas does not depend on the backend");
}

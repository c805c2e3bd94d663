//! Several devices behind `ao_gpu`: evaluations running at the same time are placed on different
//! devices of a pool (CPU backends standing in for GPUs, and two wgpu backends on one adapter where
//! there is one), keep that device to the end, take constants from that device's own cache, and
//! are attested with the device they ran on; opening a pool walks the configured order and says
//! why each device or kind was passed over.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ao_gpu_worker::attest::Keypair;
use ao_gpu_worker::attest::attestation::{Attestation, VERSION_1 as VERSION};
use ao_gpu_worker::gpu::pool::{DevicePool, DeviceRef, DeviceSelection, Inventory, KnownDevice};
use ao_gpu_worker::gpu::{Backend, BackendKind, DType, Determinism};
use ao_gpu_worker::protocol::{Tag, b64};
use ao_gpu_worker::runtime::{
    ConstantSource, EvalInput, Evaluation, GPU_FUNCTIONS, GpuConfig, Limits, MODULE_FORMAT, PoolConfig, Runtime, RuntimeConfig, SourceError,
};
use sha2::{Digest, Sha256};

const MIB: u64 = 1 << 20;
const LIMITS: Limits = Limits { memory_bytes: 16 * MIB, compute: 100_000_000 };
const VALUES: [f32; 4] = [1.5, -2.0, 0.25, 8.0];

/// Item data by id; the first fetch waits until the test lets it go, after saying it started.
struct Gate {
    data: Vec<u8>,
    id: String,
    fetches: AtomicUsize,
    first: AtomicBool,
    started: Mutex<mpsc::Sender<()>>,
    release: Mutex<mpsc::Receiver<()>>,
}

impl ConstantSource for Gate {
    fn fetch(&self, id: &str) -> Result<Vec<u8>, SourceError> {
        self.fetches.fetch_add(1, Ordering::SeqCst);
        if self.first.swap(false, Ordering::SeqCst) {
            let _ = self.started.lock().unwrap().send(());
            let _ = self.release.lock().unwrap().recv_timeout(Duration::from_secs(60));
        }
        if id == self.id { Ok(self.data.clone()) } else { Err(SourceError::NotFound) }
    }
}

fn gate() -> (Arc<Gate>, mpsc::Receiver<()>, mpsc::Sender<()>) {
    let (started_tx, started_rx) = mpsc::channel();
    let (release_tx, release_rx) = mpsc::channel();
    let gate = Gate {
        data: VALUES.iter().flat_map(|v| v.to_le_bytes()).collect(),
        id: b64::encode(&[7u8; 32]),
        fetches: AtomicUsize::new(0),
        first: AtomicBool::new(true),
        started: Mutex::new(started_tx),
        release: Mutex::new(release_rx),
    };
    (Arc::new(gate), started_rx, release_tx)
}

fn wat_bytes(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("\\{b:02x}")).collect()
}

/// An actor that loads the 4-value f32 constant `id`, reads it back and answers
/// `{"Output": "<16 bytes as hex>"}`; it traps when a call does not return OK.
fn constant_actor(id: &str, sha: &[u8; 32]) -> Vec<u8> {
    let sig = |name: &str| GPU_FUNCTIONS.iter().find(|(n, _)| *n == name).map(|(_, s)| *s).unwrap();
    assert_eq!(sig("constant"), "(i32, i32, i32, i32, i32, i32) -> i32");
    assert_eq!(sig("read_f32"), "(i32, i32, i32) -> i32");
    let prefix = r#"{"ok":true,"response":{"Output":""#;
    let plen = prefix.len();
    let wat = format!(
        r#"(module
  (import "ao_gpu" "constant" (func $constant (param i32 i32 i32 i32 i32 i32) (result i32)))
  (import "ao_gpu" "read_f32" (func $read_f32 (param i32 i32 i32) (result i32)))
  (memory (export "memory") 4)
  (data (i32.const 0x100) "{id}")
  (data (i32.const 0x200) "{sha}")
  (data (i32.const 0x300) "\04\00\00\00")
  (data (i32.const 0x380) "0123456789abcdef")
  (data (i32.const 0x800) "{prefix_escaped}")
  (func (export "malloc") (param i32) (result i32) (i32.const 0x8000))
  (func (export "handle") (param i32 i32) (result i32) (local $i i32) (local $b i32) (local $o i32)
    (if (call $constant (i32.const 0x100) (i32.const 0x200) (i32.const {f32}) (i32.const 0x300) (i32.const 1) (i32.const 0x400))
      (then unreachable))
    (if (call $read_f32 (i32.load (i32.const 0x400)) (i32.const 0x500) (i32.const 4)) (then unreachable))
    (local.set $o (i32.const {hex_at}))
    (block $done (loop $l
      (br_if $done (i32.ge_u (local.get $i) (i32.const 16)))
      (local.set $b (i32.load8_u (i32.add (i32.const 0x500) (local.get $i))))
      (i32.store8 (local.get $o) (i32.load8_u (i32.add (i32.const 0x380) (i32.shr_u (local.get $b) (i32.const 4)))))
      (i32.store8 (i32.add (local.get $o) (i32.const 1)) (i32.load8_u (i32.add (i32.const 0x380) (i32.and (local.get $b) (i32.const 15)))))
      (local.set $o (i32.add (local.get $o) (i32.const 2)))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br $l)))
    (i32.store (local.get $o) (i32.const 0x007d7d22))
    (i32.const 0x800)))"#,
        sha = wat_bytes(sha),
        prefix_escaped = wat_bytes(prefix.as_bytes()),
        f32 = DType::F32.code(),
        hex_at = 0x800 + plen,
    );
    wat::parse_str(&wat).unwrap_or_else(|e| panic!("{e}\n{wat}"))
}

fn runtime(pool: DevicePool, source: Arc<Gate>, dir: &std::path::Path) -> Runtime {
    let cfg =
        RuntimeConfig { cache_dir: dir.join("modules"), max_memory: 16 * MIB, max_compute: 100_000_000, deadline: Duration::from_secs(60) };
    let gpu = PoolConfig { pool: Arc::new(pool), max_device_memory: MIB, constant_source: Some(source), max_constant_memory: MIB };
    Runtime::with_pool(cfg, gpu).unwrap()
}

fn output(e: &Evaluation) -> Vec<f32> {
    let response = e.outcome.as_ref().unwrap_or_else(|err| panic!("evaluation failed: {err}; log: {}", e.log));
    let bytes = hex::decode(response["Output"].as_str().unwrap()).unwrap();
    bytes.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
}

/// Starts evaluation A (which blocks in its constant's first fetch), evaluates B meanwhile, then
/// lets A finish: returns (A, B).
fn two_at_once(rt: &Arc<Runtime>, started: mpsc::Receiver<()>, release: mpsc::Sender<()>, wasm: &[u8]) -> (Evaluation, Evaluation) {
    let module = rt.load(wasm, &[Tag::new("Module-Format", MODULE_FORMAT)]).unwrap();
    let input =
        |id: &'static str| EvalInput { msg_json: "{}", env_json: "{}", timestamp_ms: 1_700_000_000_000, message_id: id, limits: LIMITS };
    let first = {
        let (rt, module) = (rt.clone(), module.clone());
        std::thread::spawn(move || rt.evaluate(&module, None, &input("a")))
    };
    started.recv_timeout(Duration::from_secs(60)).expect("evaluation A reached its constant");
    let loads = rt.pool().loads();
    assert_eq!(loads.iter().map(|l| l.in_flight).collect::<Vec<_>>(), [1, 0], "A is in flight on device 0");
    let b = rt.evaluate(&module, None, &input("b"));
    release.send(()).unwrap();
    (first.join().unwrap(), b)
}

fn attestation(device: String) -> Attestation {
    Attestation {
        version: VERSION,
        process: b64::encode(&[1u8; 32]),
        message: b64::encode(&[2u8; 32]),
        nonce: 0,
        hash_chain: b64::encode(&[3u8; 32]),
        module: b64::encode(&[4u8; 32]),
        message_sha256: "00".repeat(32),
        env_sha256: "00".repeat(32),
        result_sha256: "00".repeat(32),
        state_sha256: None,
        gas_used: 1,
        backend: "cpu/reproducible".to_owned(),
        device,
        capacity_advertisement: None,
        v2: None,
    }
}

#[test]
fn concurrent_evaluations_run_on_different_devices_and_are_attested_with_them() {
    let dir = tempfile::tempdir().unwrap();
    let (source, started, release) = gate();
    let cpu = || Backend::new(BackendKind::Cpu, Determinism::Reproducible).unwrap();
    let rt = Arc::new(runtime(DevicePool::from_backends(vec![cpu(), cpu()]).unwrap(), source.clone(), dir.path()));
    let info = rt.tensor_backend();
    assert_eq!(info.devices.iter().map(|d| (d.index, d.kind)).collect::<Vec<_>>(), [(0, BackendKind::Cpu), (1, BackendKind::Cpu)]);
    assert!(info.description.starts_with("2 devices: cpu ("), "{}", info.description);
    let sha: [u8; 32] = Sha256::digest(&source.data).into();
    let (a, b) = two_at_once(&rt, started, release, &constant_actor(&source.id, &sha));
    assert_eq!((a.device, b.device), (0, 1), "B was placed while A held device 0");
    assert_eq!(output(&a), VALUES);
    assert_eq!(output(&b), VALUES);
    // Each device loaded the constant into its own cache: two fetches, one entry on each.
    assert_eq!(source.fetches.load(Ordering::SeqCst), 2);
    for device in 0..2 {
        let stats = rt.constants_on(device).unwrap().stats();
        assert_eq!((stats.entries, stats.misses, stats.bytes), (1, 1, 16), "device {device}");
    }
    let metrics = rt.constant_metrics().unwrap();
    assert_eq!((metrics.misses.get(), metrics.entries.get(), metrics.bytes.get()), (2, 2, 32), "shared metrics add up");
    let loads = rt.pool().loads();
    assert_eq!(loads.iter().map(|l| (l.in_flight, l.evaluations, l.live_bytes)).collect::<Vec<_>>(), [(0, 1, 16), (0, 1, 16)]);

    // The attestation's Device names the device each evaluation ran on.
    let names = ao_gpu_worker::jobs::attested_devices(&info.devices, "Test CPU");
    assert_eq!(names, ["Test CPU [device 0]", "Test CPU [device 1]"]);
    let key = Keypair::generate().unwrap();
    let target = b64::encode(&[9u8; 32]);
    for (e, want) in [(&a, "Test CPU [device 0]"), (&b, "Test CPU [device 1]")] {
        let item = attestation(names[e.device].clone()).sign(&key, &target).unwrap();
        assert_eq!(item.tag("Device"), Some(want));
    }
}

#[test]
fn one_device_keeps_its_old_names() {
    let cpu = Backend::new(BackendKind::Cpu, Determinism::Reproducible).unwrap();
    let description = cpu.describe();
    let dir = tempfile::tempdir().unwrap();
    let cfg = RuntimeConfig { cache_dir: dir.path().into(), max_memory: 16 * MIB, max_compute: 1 << 30, deadline: Duration::from_secs(5) };
    let rt = Runtime::with_gpu(cfg, GpuConfig { backend: Some(Arc::new(Mutex::new(cpu))), ..GpuConfig::default() }).unwrap();
    let info = rt.tensor_backend();
    assert_eq!(info.description, description);
    assert_eq!(info.devices.len(), 1);
    assert_eq!(ao_gpu_worker::jobs::attested_devices(&info.devices, "Test CPU"), ["Test CPU"]);
    assert!(rt.constant_metrics().is_none());
}

fn wgpu() -> Option<Backend> {
    match Backend::new(BackendKind::Wgpu, Determinism::Reproducible) {
        Ok(b) => Some(b),
        Err(e) => {
            assert!(!std::env::var("REQUIRE_WGPU").is_ok_and(|v| v == "1"), "REQUIRE_WGPU=1 but no wgpu adapter: {e}");
            eprintln!("skip: no wgpu adapter ({e})");
            None
        }
    }
}

#[test]
fn two_wgpu_devices_on_one_adapter() {
    let (Some(w0), Some(w1)) = (wgpu(), wgpu()) else { return };
    let dir = tempfile::tempdir().unwrap();
    let (source, started, release) = gate();
    let rt = Arc::new(runtime(DevicePool::from_backends(vec![w0, w1]).unwrap(), source.clone(), dir.path()));
    assert_eq!(rt.tensor_backend().kind, BackendKind::Wgpu);
    let sha: [u8; 32] = Sha256::digest(&source.data).into();
    let (a, b) = two_at_once(&rt, started, release, &constant_actor(&source.id, &sha));
    assert_eq!((a.device, b.device), (0, 1));
    assert_eq!(output(&a), VALUES);
    assert_eq!(output(&b), VALUES);
    let names = ao_gpu_worker::jobs::attested_devices(&rt.tensor_backend().devices, "unused");
    assert!(names[0].starts_with("wgpu (") && names[0].ends_with(" [device 0]"), "{names:?}");
    assert!(names[1].ends_with(" [device 1]"), "{names:?}");
}

#[test]
fn opening_a_pool_reports_every_device_passed_over() {
    let Some(probe) = wgpu() else { return };
    let Backend::Wgpu(w) = &probe else { unreachable!() };
    let (name, api) = (w.adapter_info().name.clone(), w.adapter_info().backend.to_str().to_owned());
    drop(probe);
    let count = ao_gpu_worker::gpu::wgpu::WgpuBackend::adapter_count();
    assert!(count >= 1);
    let inventory =
        Inventory { wgpu: vec![KnownDevice { name: name.clone(), api: Some(api), memory_bytes: None }], ..Inventory::default() };
    let order = [BackendKind::Wgpu, BackendKind::Cpu];
    // Every adapter opens, each on its own device and queue, under its enumeration index.
    let pool = DevicePool::open(&order, Determinism::Reproducible, &DeviceSelection::All, &inventory).unwrap();
    assert_eq!((pool.kind(), pool.len()), (BackendKind::Wgpu, count));
    assert_eq!(pool.info(0).unwrap().ordinal, 0);
    assert!(pool.skipped().is_empty(), "{:?}", pool.skipped());
    // Selecting a device that does not exist: wgpu does not start, the CPU serves, and the
    // reasons name every adapter passed over.
    let only = DeviceSelection::Only(vec![DeviceRef::Name("imaginary".into())]);
    let pool = DevicePool::open(&order, Determinism::Reproducible, &only, &inventory).unwrap();
    assert_eq!((pool.kind(), pool.len()), (BackendKind::Cpu, 1));
    assert!(pool.skipped()[0].starts_with(&format!("wgpu: device 0 ({name}): not in gpu.devices [\"imaginary\"]")), "{:?}", pool.skipped());
    let err =
        DevicePool::open(&[BackendKind::Wgpu], Determinism::Reproducible, &DeviceSelection::Only(vec![DeviceRef::Index(5)]), &inventory)
            .unwrap_err();
    assert!(
        err.to_string().starts_with(&format!("device error: no tensor backend available (wgpu: device 0 ({name}): not in gpu.devices [5]")),
        "{err}"
    );
}

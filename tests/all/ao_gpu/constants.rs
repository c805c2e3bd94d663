//! Constants loaded by content: from a fake source (fetched once, shared, evicted under the cap,
//! errors as statuses), from the devnet gateway over loopback HTTP, through the worker's job loop
//! when the gateway misbehaves, and outside the deadline.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use ao_gpu_worker::attest::Keypair;
use ao_gpu_worker::config::{Config, Overrides};
use ao_gpu_worker::daemon::Worker;
use ao_gpu_worker::demo;
use ao_gpu_worker::devnet::{Devnet, DevnetOptions};
use ao_gpu_worker::jobs::constants::GatewayConstants;
use ao_gpu_worker::net::gateway::ItemMeta;
use ao_gpu_worker::net::{GatewayClient, MessengerClient, Policy};
use ao_gpu_worker::protocol::{DataItem, DataItemBuilder, ao};
use ao_gpu_worker::runtime::{ConstantCache, ConstantSource, SharedDevice, SourceError};
use sha2::{Digest, Sha256};

use super::*;
use crate::support::reference::{Tol, assert_close};

// ---- from a fake source ----

/// Items held in memory; counts fetches; `down` makes every fetch unavailable.
#[derive(Default)]
struct Items {
    data: Mutex<HashMap<String, Vec<u8>>>,
    fetches: AtomicUsize,
    down: AtomicBool,
}

impl Items {
    fn add(&self, id: &str, bytes: Vec<u8>) -> [u8; 32] {
        let sha = Sha256::digest(&bytes).into();
        self.data.lock().unwrap().insert(id.to_owned(), bytes);
        sha
    }

    fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }
}

impl ConstantSource for Items {
    fn fetch(&self, id: &str) -> Result<Vec<u8>, SourceError> {
        self.fetches.fetch_add(1, Ordering::SeqCst);
        if self.down.load(Ordering::SeqCst) {
            return Err(SourceError::Unavailable("connection refused".into()));
        }
        self.data.lock().unwrap().get(id).cloned().ok_or(SourceError::NotFound)
    }
}

fn shared_cpu() -> SharedDevice {
    Arc::new(Mutex::new(cpu()))
}

/// A runtime whose constants come from `source` through `cache` (on `backend`).
fn constants_runtime(backend: &SharedDevice, cache: &Arc<ConstantCache>, max_device_memory: u64) -> Fixture {
    runtime_with(GpuConfig { backend: Some(backend.clone()), max_device_memory, constants: Some(cache.clone()) })
}

/// `constant(id, sha, dtype, shape)` into handle slot `slot`; returns the status slot.
fn constant(p: &mut Prog, id: &str, sha: [u8; 32], dtype: i32, shape: &[u32], slot: u32) -> usize {
    let (id_at, sha_at, shape_at) = (p.put(id.as_bytes().to_vec()), p.put(sha.to_vec()), p.put(u32s(shape)));
    p.st(format!(
        "(call $constant (i32.const {id_at}) (i32.const {sha_at}) (i32.const {dtype}) (i32.const {shape_at}) (i32.const {}) (i32.const {}))",
        shape.len(),
        h(slot)
    ))
}

fn c_values(n: usize, seed: f32) -> Vec<f32> {
    (0..n).map(|j| j as f32 * 0.25 - seed).collect()
}

#[test]
fn a_constant_is_fetched_once_and_shared_by_evaluations_and_runtimes() {
    let items = Arc::new(Items::default());
    let values = c_values(32, 3.0);
    let id = b64_id(7);
    let sha = items.add(&id, f32s(&values));
    let backend = shared_cpu();
    let cache = ConstantCache::new(backend.clone(), items.clone(), 1 << 20);
    // A 64-byte quota: the 128-byte constant does not count against it.
    let (rt1, rt2) = (constants_runtime(&backend, &cache, 64), constants_runtime(&backend, &cache, 64));
    let mut p = Prog::new();
    constant(&mut p, &id, sha, DType::F32.code(), &[4, 8], 0);
    let vals = p.read_f32(0, 32);
    let x: Vec<f32> = (0..8).map(|j| 1.0 - j as f32 / 8.0).collect();
    p.upload(DType::F32, f32s(&x), &[1, 8], 1);
    p.st(format!("(call $matmul {} {} (i32.const 0) (i32.const 1) (i32.const {}))", load(1), load(0), h(2)));
    let y = p.read_f32(2, 4);
    let append = p.st(format!("(call $append {} {})", load(0), load(0)));
    let free = p.st(format!("(call $free {})", load(0)));
    let after = p.st(format!("(call $dtype {})", load(0)));
    let free_again = p.st(format!("(call $free {})", load(0)));
    let wasm = p.wasm();
    let evals = [run(&rt1, &wasm, None, LIMITS), run(&rt1, &wasm, None, LIMITS), run(&rt2, &wasm, None, LIMITS)];
    for e in &evals {
        let out = output(e);
        let st = statuses(&out, p.statuses as usize);
        assert!(st[..append].iter().all(|s| *s == Some(GpuStatus::Ok)), "{st:?}");
        assert_eq!(
            [st[append], st[free], st[after], st[free_again]],
            [Some(GpuStatus::ReadOnly), Some(GpuStatus::Ok), Some(GpuStatus::UnknownHandle), Some(GpuStatus::UnknownHandle)]
        );
        assert_eq!(f32s_at(&out, vals, 32), values);
        let want: Vec<f64> = (0..4).map(|r| (0..8).map(|c| x[c] as f64 * values[r * 8 + c] as f64).sum()).collect();
        assert_close("matmul with the constant", &f32s_at(&out, y, 4), &want, Tol { abs: 1e-6, rel: 1e-6 });
    }
    assert_eq!(items.fetches(), 1, "fetched once for three evaluations on two runtimes");
    let stats = cache.stats();
    assert_eq!((stats.misses, stats.hits, stats.entries, stats.bytes, stats.evictions), (1, 2, 1, 128, 0));
    assert_eq!(evals[0].gas_used, evals[1].gas_used, "a hit costs what a miss costs");
    assert_eq!(evals[0].gas_used, evals[2].gas_used);
    // Freeing the handle left the cached tensor in place: still resident, still a hit.
    assert_eq!(cache.metrics().hits.get(), 2);
    // A runtime on another backend cannot use the cache.
    let dir = tempfile::tempdir().unwrap();
    let cfg = RuntimeConfig { cache_dir: dir.path().into(), max_memory: 16 * MIB, max_compute: 1 << 30, deadline: Duration::from_secs(5) };
    let other = GpuConfig { backend: Some(shared_cpu()), constants: Some(cache.clone()), ..GpuConfig::default() };
    assert!(matches!(Runtime::with_gpu(cfg, other), Err(RuntimeError::Setup(_))));
}

#[test]
fn constant_errors_are_statuses_and_are_not_cached() {
    let items = Arc::new(Items::default());
    let (id1, id_missing, id_big) = (b64_id(1), b64_id(2), b64_id(3));
    let sha1 = items.add(&id1, f32s(&c_values(32, 1.0)));
    let sha_big = items.add(&id_big, f32s(&c_values(200, 1.0)));
    let backend = shared_cpu();
    let cache = ConstantCache::new(backend.clone(), items.clone(), 1000);
    let f = constants_runtime(&backend, &cache, DEFAULT_MAX);
    let mut p = Prog::new();
    use GpuStatus::*;
    let f32c = DType::F32.code();
    let cases = [
        (constant(&mut p, &id1, [0; 32], f32c, &[32], 0), ConstantMismatch),
        (constant(&mut p, &id_missing, sha1, f32c, &[32], 0), NotFound),
        (constant(&mut p, &id1, sha1, f32c, &[4, 4], 0), ShapeMismatch),
        (constant(&mut p, &id1, sha1, DType::Q4_0.code(), &[33], 0), DtypeMismatch),
        (constant(&mut p, &id1, sha1, f32c, &[10_000], 0), QuotaExceeded),
        (constant(&mut p, &id1, sha1, 6, &[32], 0), InvalidArgument),
        (constant(&mut p, &id1, sha1, f32c, &[], 0), InvalidArgument),
        (constant(&mut p, &id1, sha1, f32c, &[32], 1), Ok),
        (constant(&mut p, &id1, sha1, f32c, &[32], 2), Ok),
        (constant(&mut p, &id1, sha1, DType::I32.code(), &[32], 3), Ok),
        // 128 + 128 held (the same key twice counts once) + 800 > 1000.
        (constant(&mut p, &id_big, sha_big, f32c, &[200], 4), QuotaExceeded),
    ];
    let free = p.st(format!("(call $free {})", load(3)));
    let big = constant(&mut p, &id_big, sha_big, f32c, &[200], 4);
    let wasm = p.wasm();
    let out = output(&run(&f, &wasm, None, LIMITS));
    let got: Vec<Option<GpuStatus>> = cases.iter().map(|&(s, _)| GpuStatus::from_code(i32_at(&out, s))).collect();
    assert_eq!(got, cases.map(|(_, w)| Some(w)));
    assert_eq!((i32_at(&out, free), i32_at(&out, big)), (0, 0), "after freeing the i32 view, 128 + 800 fits");
    // Fetched: the mismatch, the missing item, the wrong shape, the f32 and i32 views and the big one.
    assert_eq!(items.fetches(), 6);
    let again = output(&run(&f, &wasm, None, LIMITS));
    assert_eq!(&again[..4 * p.statuses as usize], &out[..4 * p.statuses as usize]);
    // The three failures are fetched again; so are the i32 view and the big one: at the end of
    // the first evaluation the big one evicted the (then unused) i32 view to stay under 1000
    // bytes, and fetching the i32 view again evicted the big one.
    assert_eq!(items.fetches(), 11);
    assert_eq!((cache.stats().entries, cache.stats().bytes, cache.stats().evictions), (2, 928, 3));
}

const DEFAULT_MAX: u64 = ao_gpu_worker::runtime::DEFAULT_MAX_DEVICE_MEMORY;

#[test]
fn least_recently_used_constants_are_evicted_under_the_cap() {
    let items = Arc::new(Items::default());
    let ids: Vec<String> = (10..13).map(b64_id).collect();
    let shas: Vec<[u8; 32]> = ids.iter().enumerate().map(|(k, id)| items.add(id, f32s(&c_values(32, k as f32)))).collect();
    let backend = shared_cpu();
    let cache = ConstantCache::new(backend.clone(), items.clone(), 256);
    let f = constants_runtime(&backend, &cache, DEFAULT_MAX);
    let load_all = |which: &[usize]| {
        let mut p = Prog::new();
        let reads: Vec<usize> = which
            .iter()
            .enumerate()
            .map(|(slot, &k)| {
                constant(&mut p, &ids[k], shas[k], DType::F32.code(), &[32], slot as u32);
                p.read_f32(slot as u32, 32)
            })
            .collect();
        let out = output(&run(&f, &p.wasm(), None, LIMITS));
        let st = statuses(&out, p.statuses as usize);
        assert!(st.iter().all(|s| *s == Some(GpuStatus::Ok)), "{which:?}: {st:?}");
        let firsts: Vec<f32> = reads.iter().map(|&r| f32_at(&out, r)).collect();
        assert_eq!(firsts, which.iter().map(|&k| -(k as f32)).collect::<Vec<_>>());
    };
    let stats = || {
        let s = cache.stats();
        (items.fetches(), s.entries, s.bytes, s.evictions)
    };
    load_all(&[0, 1]);
    assert_eq!(stats(), (2, 2, 256, 0));
    load_all(&[2]);
    assert_eq!(stats(), (3, 2, 256, 1), "constant 0 was the least recently used");
    load_all(&[1]);
    assert_eq!(stats(), (3, 2, 256, 1), "constant 1 is still resident");
    load_all(&[0]);
    assert_eq!(stats(), (4, 2, 256, 2), "0 is fetched again and evicts 2, not the more recently used 1");
    load_all(&[1, 0]);
    assert_eq!(stats(), (4, 2, 256, 2));
    // Backend memory follows: two 128-byte constants live, nothing leaked by evictions.
    assert_eq!(backend.lock().unwrap().live_bytes(), 256);
}

#[test]
fn an_unreachable_constant_source_makes_the_evaluation_unavailable_not_failed() {
    let items = Arc::new(Items::default());
    let id = b64_id(9);
    let sha = items.add(&id, f32s(&c_values(8, 0.0)));
    items.down.store(true, Ordering::SeqCst);
    let backend = shared_cpu();
    let cache = ConstantCache::new(backend.clone(), items.clone(), 1 << 20);
    let f = constants_runtime(&backend, &cache, DEFAULT_MAX);
    let mut p = Prog::new();
    p.st(upload_a(0));
    constant(&mut p, &id, sha, DType::F32.code(), &[8], 1);
    let vals = p.read_f32(1, 8);
    let wasm = p.wasm();
    let e = run(&f, &wasm, None, LIMITS);
    match &e.outcome {
        Err(EvalError::Unavailable(reason)) => assert!(reason.contains("connection refused") && reason.contains(&id), "{reason}"),
        other => panic!("{other:?}"),
    }
    assert!(e.memory.is_none());
    assert_eq!(cache.stats().entries, 0);
    // Its tensors were freed all the same.
    assert_eq!(backend.lock().unwrap().live_bytes(), 0);
    items.down.store(false, Ordering::SeqCst);
    let ok = run(&f, &wasm, None, LIMITS);
    assert_eq!(f32s_at(&output(&ok), vals, 8), c_values(8, 0.0));
}

// ---- constants over HTTP: the devnet gateway, and the worker's job loop ----

fn fast_policy() -> Policy {
    Policy { max_attempts: 1, connect_timeout: Duration::from_secs(2), request_timeout: Duration::from_secs(5), ..Policy::default() }
}

fn weights_item(key: &Keypair, values: &[f32]) -> DataItem {
    DataItemBuilder::new().tags([Tag::new("Content-Type", "application/octet-stream")]).data(f32s(values)).sign(key).unwrap()
}

/// An actor that loads the f32 [n] constant `id` and answers its status and values.
fn constant_actor(id: &str, sha: [u8; 32], n: u32) -> (Vec<u8>, usize, usize) {
    let mut p = Prog::new();
    let s = constant(&mut p, id, sha, DType::F32.code(), &[n], 0);
    let vals = p.read_f32(0, n);
    (p.wasm(), s, vals)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn constants_come_from_the_devnet_gateway_over_http() {
    let dir = tempfile::tempdir().unwrap();
    let net = Devnet::start(&DevnetOptions::new(dir.path().join("devnet"), 0)).await.unwrap();
    let key = Keypair::generate().unwrap();
    let values = c_values(16, 2.0);
    let item = weights_item(&key, &values);
    GatewayClient::new(&net.urls.gateway, Policy::default()).upload(&item).await.unwrap();
    let sha: [u8; 32] = Sha256::digest(&item.data).into();
    let source = GatewayConstants::new(GatewayClient::new(&net.urls.gateway, fast_policy()), tokio::runtime::Handle::current());
    let backend = shared_cpu();
    let cache = ConstantCache::new(backend.clone(), Arc::new(source), 1 << 20);
    let f = Arc::new(constants_runtime(&backend, &cache, DEFAULT_MAX));
    let (wasm, s, vals) = constant_actor(&item.id(), sha, 16);
    let (missing, s_missing, _) = constant_actor(&b64_id(5), sha, 16);
    let f2 = f.clone();
    let (first, second, absent) = tokio::task::spawn_blocking(move || {
        (run(&f2, &wasm, None, LIMITS), run(&f2, &wasm, None, LIMITS), run(&f2, &missing, None, LIMITS))
    })
    .await
    .unwrap();
    for e in [&first, &second] {
        let out = output(e);
        assert_eq!(i32_at(&out, s), 0);
        assert_eq!(f32s_at(&out, vals, 16), values);
    }
    assert_eq!(i32_at(&output(&absent), s_missing), GpuStatus::NotFound.code());
    assert_eq!((cache.stats().misses, cache.stats().hits), (2, 1));

    // The gateway down: nothing listens on the port.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let down =
        GatewayConstants::new(GatewayClient::new(&format!("http://127.0.0.1:{port}"), fast_policy()), tokio::runtime::Handle::current());
    let cache = ConstantCache::new(backend.clone(), Arc::new(down), 1 << 20);
    let g = constants_runtime(&backend, &cache, DEFAULT_MAX);
    let (wasm, _, _) = constant_actor(&item.id(), sha, 16);
    let e = tokio::task::spawn_blocking(move || run(&g, &wasm, None, LIMITS)).await.unwrap();
    match &e.outcome {
        Err(EvalError::Unavailable(reason)) => assert!(reason.contains("gateway"), "{reason}"),
        other => panic!("{other:?}"),
    }
    net.shutdown().await;
}

/// A gateway that serves fixed items (`GET /tx/{id}`, `GET /raw/{id}`) and, while `corrupt` is
/// set, answers one item's data with a flipped byte; counts the requests for that data.
#[derive(Clone)]
struct FlakyGateway {
    items: Arc<HashMap<String, DataItem>>,
    corrupt_id: String,
    corrupt: Arc<AtomicBool>,
    requests: Arc<AtomicUsize>,
}

async fn flaky_meta(
    axum::extract::State(g): axum::extract::State<FlakyGateway>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    match g.items.get(&id) {
        Some(item) => axum::Json(ItemMeta::from_item(item)).into_response(),
        None => axum::http::StatusCode::NOT_FOUND.into_response(),
    }
}

async fn flaky_raw(
    axum::extract::State(g): axum::extract::State<FlakyGateway>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let Some(item) = g.items.get(&id) else { return axum::http::StatusCode::NOT_FOUND.into_response() };
    let mut data = item.data.clone();
    if id == g.corrupt_id {
        g.requests.fetch_add(1, Ordering::SeqCst);
        if g.corrupt.load(Ordering::SeqCst) {
            data[0] ^= 1;
        }
    }
    data.into_response()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_job_loop_retries_an_evaluation_whose_constant_gateway_misbehaves() {
    let dir = tempfile::tempdir().unwrap();
    let mut net = Devnet::start(&DevnetOptions::new(dir.path().join("devnet"), 0)).await.unwrap();
    let values = c_values(8, 1.5);
    let weights = weights_item(&net.authority, &values);
    let sha: [u8; 32] = Sha256::digest(&weights.data).into();
    let (wasm, s, vals) = constant_actor(&weights.id(), sha, 8);
    let module = DataItemBuilder::new()
        .anchor(ao::numeric_anchor(0))
        .tags(ao::module_tags("constant-test", "16-mb", "1000000000"))
        .data(wasm)
        .sign(&net.authority)
        .unwrap();
    GatewayClient::new(&net.urls.gateway, Policy::default()).upload(&module).await.unwrap();
    let gateway = FlakyGateway {
        items: Arc::new([(module.id(), module.clone()), (weights.id(), weights.clone())].into_iter().collect()),
        corrupt_id: weights.id(),
        corrupt: Arc::new(AtomicBool::new(true)),
        requests: Arc::new(AtomicUsize::new(0)),
    };
    let router = axum::Router::new()
        .route("/tx/{id}", axum::routing::get(flaky_meta))
        .route("/raw/{id}", axum::routing::get(flaky_raw))
        .with_state(gateway.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let gateway_url = format!("http://{}", listener.local_addr().unwrap());
    let stop = tokio_util::sync::CancellationToken::new();
    let server = ao_gpu_worker::httpd::serve(listener, router, stop.clone());

    let text = format!(
        "[worker]\ndata_dir = {:?}\n[network]\nscheduler_url = {:?}\nmessenger_url = {:?}\ngateway_url = {:?}\nmax_attempts = 2\n\
         backoff_min = \"10ms\"\nbackoff_max = \"20ms\"\n[registry]\nprocess = {:?}\nauthorities = [{:?}]\npoll_interval = \"50ms\"\n\
         [api]\nlisten = \"127.0.0.1:0\"\n[gpu]\nbackends = [\"cpu\"]\n",
        dir.path().join("worker").display().to_string(),
        net.urls.scheduler,
        net.urls.messenger,
        gateway_url,
        net.urls.registry,
        net.authority.address(),
    );
    let config = Config::parse("test", &text, &Overrides::default()).unwrap();
    let worker = Worker::start(config, Keypair::generate().unwrap(), net.worker_listener.take()).await.unwrap();
    let mu = MessengerClient::new(&net.urls.messenger, Policy::default());
    let process = demo::process_item(&net.authority, &module.id(), &net.scheduler_address, 1, "constant-test").unwrap();
    mu.post_item(&process).await.unwrap();
    let me = worker.state.address.clone();
    let assign = demo::message(
        &net.authority,
        &net.urls.registry,
        2,
        &[("Action", "Assign-Workload"), ("Worker", &me), ("Process", &process.id())],
        "",
    )
    .unwrap();
    mu.post_item(&assign).await.unwrap();

    // While the gateway answers garbage for the weights, the message is tried again and again,
    // and nothing is recorded.
    let journal = worker.state.jobs.journal.clone();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while gateway.requests.load(Ordering::SeqCst) < 3 {
        assert!(std::time::Instant::now() < deadline, "the worker never asked for the weights three times");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(journal.result_by_message(&process.id()).unwrap().is_none(), "an unavailable evaluation was recorded");
    assert!(worker.state.jobs.halted().is_empty(), "{:?}", worker.state.jobs.halted());
    assert_eq!(worker.state.metrics.jobs.evaluations.get_or_create(&[("result", "error")]).get(), 0);

    // Once it answers properly, the same message succeeds.
    gateway.corrupt.store(false, Ordering::SeqCst);
    let record = loop {
        if let Some(r) = journal.result_by_message(&process.id()).unwrap() {
            break r;
        }
        assert!(std::time::Instant::now() < deadline, "the message was never evaluated");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(record.response.get("Error").is_none(), "{}", record.response);
    let out = hex::decode(record.response["Output"].as_str().unwrap()).unwrap();
    assert_eq!(i32_at(&out, s), 0);
    assert_eq!(f32s_at(&out, vals, 8), values);
    let metrics = worker.state.metrics.render();
    assert!(metrics.contains("ao_worker_gpu_constant_entries 1\n"), "{metrics}");
    assert!(metrics.contains("ao_worker_gpu_constant_bytes 32\n"), "{metrics}");
    assert!(metrics.contains("ao_worker_gpu_constant_misses_total "), "{metrics}");
    worker.shutdown().await;
    stop.cancel();
    let _ = server.await;
    net.shutdown().await;
}

/// A source that takes `delay` to answer.
struct Slow {
    inner: Items,
    delay: Duration,
}

impl ConstantSource for Slow {
    fn fetch(&self, id: &str) -> Result<Vec<u8>, SourceError> {
        std::thread::sleep(self.delay);
        self.inner.fetch(id)
    }
}

#[test]
fn time_spent_fetching_constants_does_not_count_against_the_deadline() {
    let slow = Slow { inner: Items::default(), delay: Duration::from_millis(600) };
    let id = b64_id(4);
    let sha = slow.inner.add(&id, f32s(&c_values(8, 0.0)));
    let backend = shared_cpu();
    let cache = ConstantCache::new(backend.clone(), Arc::new(slow), 1 << 20);
    let dir = tempfile::tempdir().unwrap();
    let cfg =
        RuntimeConfig { cache_dir: dir.path().into(), max_memory: 16 * MIB, max_compute: u64::MAX, deadline: Duration::from_millis(200) };
    let rt = Runtime::with_gpu(cfg, GpuConfig { backend: Some(backend), constants: Some(cache), ..GpuConfig::default() }).unwrap();
    let f = Fixture { rt, _dir: dir };
    let (wasm, s, vals) = constant_actor(&id, sha, 8);
    let e = run(&f, &wasm, None, LIMITS);
    let out = output(&e);
    assert_eq!(i32_at(&out, s), 0);
    assert_eq!(f32s_at(&out, vals, 8), c_values(8, 0.0));
    // The deadline still holds for the actor's own time.
    let spin = actor("(loop $l (br $l)) (i32.const 0)", 2);
    let unlimited = Limits { compute: u64::MAX, ..LIMITS };
    assert_eq!(run(&f, &spin, None, unlimited).outcome, Err(EvalError::Timeout { deadline: Duration::from_millis(200) }));
}

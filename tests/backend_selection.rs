//! The daemon picks its tensor backend from `[gpu] backends`, in order, and shows the choice:
//! in `Runtime::tensor_backend` (what attestations name) and in `/capacity`.
//! With `REQUIRE_WGPU=1` a wgpu adapter must exist (CI with lavapipe); otherwise a machine
//! without one falls back to the CPU and says so.

use ao_gpu_worker::attest::Keypair;
use ao_gpu_worker::config::{Config, Overrides};
use ao_gpu_worker::daemon::Worker;
use ao_gpu_worker::devnet::{Devnet, DevnetOptions};
use ao_gpu_worker::gpu::{self, BackendKind, Determinism};

async fn start(dir: &std::path::Path, backends: &str) -> (Devnet, Worker) {
    let mut net = Devnet::start(&DevnetOptions::new(dir.join("devnet"), 0)).await.unwrap();
    let text = format!(
        "[worker]\ndata_dir = {:?}\n[network]\nscheduler_url = {:?}\nmessenger_url = {:?}\ngateway_url = {:?}\n\
         [registry]\nprocess = {:?}\npoll_interval = \"50ms\"\n[api]\nlisten = \"127.0.0.1:0\"\n[gpu]\nbackends = {backends}\n",
        dir.join("worker").display().to_string(),
        net.urls.scheduler,
        net.urls.messenger,
        net.urls.gateway,
        net.urls.registry,
    );
    let config = Config::parse("test", &text, &Overrides::default()).unwrap();
    let worker = Worker::start(config, Keypair::generate().unwrap(), net.worker_listener.take()).await.unwrap();
    (net, worker)
}

async fn capacity_backend(worker: &Worker) -> serde_json::Value {
    let body: serde_json::Value = reqwest::get(format!("{}/capacity", worker.api_url)).await.unwrap().json().await.unwrap();
    assert!(body["manifest"].is_object(), "{body}");
    body["tensor_backend"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wgpu_first_then_cpu() {
    let dir = tempfile::tempdir().unwrap();
    let (_net, worker) = start(dir.path(), r#"["wgpu", "cpu"]"#).await;
    let info = worker.state.jobs.runtime.tensor_backend().clone();
    let adapter = gpu::Backend::new(BackendKind::Wgpu, Determinism::Reproducible).is_ok();
    if std::env::var("REQUIRE_WGPU").is_ok_and(|v| v == "1") {
        assert!(adapter, "REQUIRE_WGPU=1 but no wgpu adapter");
    }
    if adapter {
        assert_eq!(info.kind, BackendKind::Wgpu, "{info:?}");
    } else {
        eprintln!("skip: no wgpu adapter on this machine; checking the CPU fallback instead");
        assert_eq!(info.kind, BackendKind::Cpu, "{info:?}");
    }
    assert_eq!(info.determinism, Determinism::Reproducible);
    let shown = capacity_backend(&worker).await;
    assert_eq!(shown["kind"], info.kind.as_str(), "{shown}");
    assert_eq!(shown["description"], info.description.as_str(), "{shown}");
    assert_eq!(shown["determinism"], "reproducible", "{shown}");
    let metrics = reqwest::get(format!("{}/metrics", worker.api_url)).await.unwrap().text().await.unwrap();
    assert!(metrics.contains(&format!("ao_worker_tensor_backend_info{{kind=\"{}\"", info.kind)), "{metrics}");
    worker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cpu_only() {
    let dir = tempfile::tempdir().unwrap();
    let (_net, worker) = start(dir.path(), r#"["cpu"]"#).await;
    assert_eq!(worker.state.jobs.runtime.tensor_backend().kind, BackendKind::Cpu);
    let shown = capacity_backend(&worker).await;
    assert_eq!(shown["kind"], "cpu", "{shown}");
    worker.shutdown().await;
}

//! The daemon picks its tensor backend from `[gpu] backends`, in order, and shows the choice:
//! in `Runtime::tensor_backend` (what attestations name) and in `/capacity`.
//! With `REQUIRE_WGPU=1` a wgpu adapter must exist (CI with lavapipe); otherwise a machine
//! without one falls back to the CPU and says so.

mod common;

use ao_gpu_worker::daemon::Worker;
use ao_gpu_worker::devnet::Devnet;
use ao_gpu_worker::gpu::{self, BackendKind, Determinism};

async fn start(dir: &std::path::Path, backends: &str) -> (Devnet, Worker) {
    common::inproc::devnet_and_worker(dir, &format!("[gpu]\nbackends = {backends}\n")).await
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

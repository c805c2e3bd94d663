//! The daemon picks its tensor backend from `[gpu] backends`, in order, opens the devices
//! `[gpu] devices` selects, and shows the choice: in `Runtime::tensor_backend` (what attestations
//! name), in `/capacity` (every device with its load, and why each other candidate was skipped)
//! and in `/metrics` (per-device series).
//! With `REQUIRE_WGPU=1` a wgpu adapter must exist (CI with lavapipe); otherwise a machine
//! without one falls back to the CPU and says so.

use ao_gpu_worker::daemon::Worker;
use ao_gpu_worker::devnet::Devnet;
use ao_gpu_worker::gpu::{self, BackendKind, Determinism};

use crate::support;

async fn start(dir: &std::path::Path, backends: &str) -> (Devnet, Worker) {
    start_with(dir, &format!("[gpu]\nbackends = {backends}\n")).await
}

async fn start_with(dir: &std::path::Path, gpu: &str) -> (Devnet, Worker) {
    support::inproc::devnet_and_worker(dir, gpu).await
}

fn wgpu_adapter() -> bool {
    let adapter = gpu::Backend::new(BackendKind::Wgpu, Determinism::Reproducible).is_ok();
    if std::env::var("REQUIRE_WGPU").is_ok_and(|v| v == "1") {
        assert!(adapter, "REQUIRE_WGPU=1 but no wgpu adapter");
    }
    adapter
}

async fn metrics(worker: &Worker) -> String {
    reqwest::get(format!("{}/metrics", worker.api_url)).await.unwrap().text().await.unwrap()
}

async fn capacity_backend(worker: &Worker) -> serde_json::Value {
    let body: serde_json::Value = reqwest::get(format!("{}/capacity", worker.api_url)).await.unwrap().json().await.unwrap();
    assert!(body["manifest"].is_object(), "{body}");
    // The signed manifest names what serves ao_gpu calls too, device by device.
    let (serving, shown) = (&body["manifest"]["serving"], &body["tensor_backend"]);
    assert_eq!(serving["backend"], shown["kind"], "{body}");
    assert_eq!(serving["determinism"], shown["determinism"], "{body}");
    let devices: Vec<&serde_json::Value> = shown["devices"].as_array().unwrap().iter().map(|d| &d["description"]).collect();
    assert_eq!(serving["devices"].as_array().unwrap().iter().collect::<Vec<_>>(), devices, "{body}");
    body["tensor_backend"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wgpu_first_then_cpu() {
    let dir = tempfile::tempdir().unwrap();
    let (_net, worker) = start(dir.path(), r#"["wgpu", "cpu"]"#).await;
    let info = worker.state.jobs.runtime.tensor_backend().clone();
    if wgpu_adapter() {
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
    // Every device of the pool, with its load (nothing has been evaluated yet).
    let devices = shown["devices"].as_array().unwrap();
    assert_eq!(devices.len(), info.devices.len(), "{shown}");
    assert!(!devices.is_empty());
    for (i, d) in devices.iter().enumerate() {
        assert_eq!(d["index"], i, "{shown}");
        assert_eq!(d["kind"], info.kind.as_str(), "{shown}");
        assert_eq!(d["description"], info.devices[i].description.as_str(), "{shown}");
        assert_eq!((d["in_flight"].as_u64(), d["evaluations"].as_u64()), (Some(0), Some(0)), "{shown}");
    }
    assert!(shown["skipped"].is_array(), "{shown}");
    let metrics = metrics(&worker).await;
    assert!(metrics.contains(&format!("ao_worker_tensor_backend_info{{kind=\"{}\"", info.kind)), "{metrics}");
    let kind = info.kind.as_str();
    for series in [
        format!("ao_worker_tensor_device_in_flight{{device=\"0\",kind=\"{kind}\"}} 0"),
        format!("ao_worker_tensor_device_evaluations_total{{device=\"0\",kind=\"{kind}\"}} 0"),
        format!("ao_worker_tensor_device{{device=\"0\",kind=\"{kind}\",ordinal=\"0\",description="),
    ] {
        assert!(metrics.contains(&series), "{series} missing from\n{metrics}");
    }
    worker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cpu_only() {
    let dir = tempfile::tempdir().unwrap();
    let (_net, worker) = start(dir.path(), r#"["cpu"]"#).await;
    assert_eq!(worker.state.jobs.runtime.tensor_backend().kind, BackendKind::Cpu);
    let shown = capacity_backend(&worker).await;
    assert_eq!(shown["kind"], "cpu", "{shown}");
    assert_eq!(shown["devices"].as_array().map(Vec::len), Some(1), "{shown}");
    assert_eq!(shown["devices"][0]["attested_as"], worker.state.jobs.attested_device(0), "{shown}");
    assert_eq!(shown["skipped"], serde_json::json!([]), "{shown}");
    worker.shutdown().await;
}

/// A backend kind none of whose devices `gpu.devices` selects does not start: the next kind
/// serves, and the reason is shown, not swallowed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unselected_devices_are_skipped_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let (_net, worker) = start_with(dir.path(), "[gpu]\nbackends = [\"cuda\", \"wgpu\", \"cpu\"]\ndevices = [\"no such device\"]\n").await;
    let info = worker.state.jobs.runtime.tensor_backend().clone();
    let shown = capacity_backend(&worker).await;
    let skipped: Vec<&str> = shown["skipped"].as_array().unwrap().iter().map(|s| s.as_str().unwrap()).collect();
    // No device has that name: CUDA and wgpu are skipped, the CPU (one device, which the list
    // does not restrict) serves.
    assert_eq!(info.kind, BackendKind::Cpu, "{shown}");
    assert_eq!(skipped.len(), 2, "{shown}");
    assert!(skipped[0].starts_with("cuda: "), "{shown}");
    if wgpu_adapter() {
        assert!(
            skipped[1].starts_with("wgpu: device 0 (") && skipped[1].ends_with("): not in gpu.devices [\"no such device\"]"),
            "{shown}"
        );
    } else {
        assert!(skipped[1].starts_with("wgpu: "), "{shown}");
    }
    worker.shutdown().await;
}

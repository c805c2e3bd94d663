//! Checks of the compute devices: wgpu adapters, the CUDA driver, the GPU device nodes and the
//! service user's access to them, a known-answer kernel on every device the configuration would
//! serve with, and device memory (allocatable against reported) where a size is reported. Also
//! the checks that need the capacity probe: bench freshness and free disk.

use std::path::{Path, PathBuf};

use super::account::{Account, READ, WRITE, group_name};
use super::{Check, Options, local};
use crate::capacity::{CapacityManifest, CudaStatus, DetectOptions};
use crate::config::Config;
use crate::gpu::pool::{DevicePool, lock};
use crate::gpu::{Backend, BackendKind, Determinism, HostTensor, TensorOps};

/// The known answer: [[1,2,3],[4,5,6]] · [[7,8],[9,10],[11,12]], exact in f32.
const KNOWN_ANSWER: [f32; 4] = [58.0, 64.0, 139.0, 154.0];

pub(super) fn check(config: &Config, source: &str, account: &Account, opts: &Options) -> Vec<Check> {
    let manifest = crate::capacity::detect(&DetectOptions { data_dir: config.worker.data_dir.clone(), worker_address: None });
    let mut out = vec![wgpu(config, &manifest, source), cuda(config, &manifest, &opts.dev_dir, source)];
    out.push(device_nodes(&opts.dev_dir, account));
    let serving = if opts.skip_kernels { None } else { kernels(config, &manifest, source, &mut out) };
    out.push(local::bench(config, &manifest, serving, source));
    out.push(local::disk(&manifest, opts.min_free_disk, source));
    out
}

fn wgpu(config: &Config, manifest: &CapacityManifest, source: &str) -> Check {
    let report = &manifest.gpus.wgpu;
    if !config.gpu.backends.contains(&BackendKind::Wgpu) {
        return Check::pass("wgpu", format!("not in gpu.backends ({} adapter(s) seen)", report.adapters.len()));
    }
    if report.adapters.is_empty() {
        return Check::fail(
            "wgpu",
            format!("no adapter: {}", report.error.as_deref().unwrap_or("no Vulkan/GL driver answered")),
            format!(
                "apt-get install mesa-vulkan-drivers libvulkan1 (or the GPU vendor's Vulkan driver), or remove \"wgpu\" from [gpu] backends in {source}"
            ),
        );
    }
    let names: Vec<String> = report.adapters.iter().map(|a| format!("{} ({}, {})", a.name, a.backend, a.device_type)).collect();
    Check::pass("wgpu", format!("{} adapter(s): {}", names.len(), names.join("; ")))
}

fn cuda(config: &Config, manifest: &CapacityManifest, dev_dir: &Path, source: &str) -> Check {
    let report = &manifest.gpus.cuda;
    let wanted = config.gpu.backends.contains(&BackendKind::Cuda);
    let nodes = dev_dir.join("nvidiactl").exists();
    match report.status {
        CudaStatus::Available => {
            let names: Vec<String> =
                report.devices.iter().map(|d| format!("{} {} (sm_{})", d.ordinal, d.name, d.compute_capability.replace('.', ""))).collect();
            Check::pass("cuda", format!("driver {}: {}", report.driver_version.as_deref().unwrap_or("?"), names.join("; ")))
        }
        CudaStatus::NotCompiled => Check::pass("cuda", "built without the cuda feature (cuda is skipped)"),
        CudaStatus::Unavailable if wanted && nodes => Check::fail(
            "cuda",
            format!("{} exists but CUDA does not start: {}", dev_dir.join("nvidiactl").display(), report.reason.as_deref().unwrap_or("?")),
            format!(
                "install the NVIDIA driver's CUDA library (apt-get install libcuda1; `nvidia-smi` must work), or remove \"cuda\" from [gpu] backends in {source}"
            ),
        ),
        CudaStatus::Unavailable => Check::pass(
            "cuda",
            format!("no driver, no NVIDIA device nodes: cuda is skipped ({})", report.reason.as_deref().unwrap_or("unavailable")),
        ),
    }
}

/// GPU device nodes (`nvidia*`, `dri/*`) and whether the service account may open them.
fn device_nodes(dev_dir: &Path, account: &Account) -> Check {
    let mut nodes: Vec<PathBuf> = Vec::new();
    let list = |dir: &Path, prefix: &str| -> Vec<PathBuf> {
        std::fs::read_dir(dir)
            .map(|r| {
                r.filter_map(|e| e.ok())
                    .map(|e| e.path())
                    .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with(prefix)))
                    .collect()
            })
            .unwrap_or_default()
    };
    nodes.extend(list(dev_dir, "nvidia"));
    nodes.extend(list(&dev_dir.join("dri"), "render"));
    nodes.extend(list(&dev_dir.join("dri"), "card"));
    nodes.retain(|p| !p.is_dir());
    nodes.sort();
    if nodes.is_empty() {
        return Check::pass(
            "device_nodes",
            format!("none under {} (nvidia*, dri/*): no GPU is visible; only software adapters and the CPU can serve", dev_dir.display()),
        );
    }
    let mut denied = Vec::new();
    for node in &nodes {
        if let Ok(meta) = std::fs::metadata(node)
            && !account.may(&meta, READ | WRITE)
        {
            denied.push((node.clone(), meta));
        }
    }
    let Some((first, meta)) = denied.first() else {
        return Check::pass("device_nodes", format!("{} node(s) open to {}", nodes.len(), account.name));
    };
    use std::os::unix::fs::MetadataExt;
    let group = group_name(meta.gid());
    let fix = if (meta.mode() >> 3) & 6 == 6 && meta.gid() != 0 {
        format!("usermod -aG {group} {}  (the unit also adds SupplementaryGroups=video render)", account.name)
    } else {
        format!(
            "chgrp render {p} && chmod 0660 {p}  (make it permanent with a udev rule: GROUP=\"render\", MODE=\"0660\")",
            p = first.display()
        )
    };
    let list: Vec<String> =
        denied.iter().map(|(p, m)| format!("{} ({:04o} {})", p.display(), m.mode() & 0o7777, group_name(m.gid()))).collect();
    Check::fail("device_nodes", format!("{} cannot open {}", account.name, list.join(", ")), fix)
}

/// Opens the devices `run` would serve with and runs the known answer on each; checks memory
/// where the device reports a size. Returns the serving backend and mode.
fn kernels(config: &Config, manifest: &CapacityManifest, source: &str, out: &mut Vec<Check>) -> Option<(BackendKind, Determinism)> {
    let g = &config.gpu;
    let pool = match DevicePool::open(&g.backends, g.determinism, &g.devices, &crate::daemon::inventory(manifest)) {
        Ok(p) => p,
        Err(e) => {
            let mut usable = Vec::new();
            if !manifest.gpus.wgpu.adapters.is_empty() {
                usable.push("\"wgpu\"");
            }
            usable.push("\"cpu\"");
            out.push(Check::fail(
                "gpu.backends",
                format!(
                    "none of {:?} starts with gpu.devices = {}: {e}",
                    g.backends.iter().map(|k| k.as_str()).collect::<Vec<_>>(),
                    g.devices
                ),
                format!("set [gpu] backends = [{}] (and devices = \"all\") in {source}", usable.join(", ")),
            ));
            return None;
        }
    };
    out.push(Check::pass("gpu.backends", format!("{} serves with {} device(s)", pool.kind(), pool.len())));
    for info in pool.infos() {
        let Some(device) = pool.backend(info.index) else { continue };
        let name = format!("kernel:{}:{}", info.kind, info.ordinal);
        let mut backend = lock(device);
        out.push(match known_answer(&mut backend) {
            Ok(()) => Check::pass(name, format!("matmul known answer exact on {}", info.description)),
            Err(e) => Check::fail(
                name,
                format!("{}: {e}", info.description),
                format!("leave this device out with [gpu] devices = [<the other indices>] in {source}, and check its driver (vulkaninfo / nvidia-smi)"),
            ),
        });
        if let Some(reported) = info.memory_bytes {
            out.push(memory(&mut backend, &format!("memory:{}:{}", info.kind, info.ordinal), reported, config, source));
        }
    }
    Some((pool.kind(), pool.determinism()))
}

fn known_answer(backend: &mut Backend) -> Result<(), String> {
    let a = backend
        .upload(&HostTensor::new(vec![2, 3], vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]).map_err(|e| e.to_string())?)
        .map_err(|e| e.to_string())?;
    let b = backend
        .upload(&HostTensor::new(vec![3, 2], vec![7.0, 8.0, 9.0, 10.0, 11.0, 12.0]).map_err(|e| e.to_string())?)
        .map_err(|e| e.to_string())?;
    let c = backend.matmul(a, b, false, false).map_err(|e| e.to_string())?;
    let got = backend.read(c).map_err(|e| e.to_string());
    for id in [a, b, c] {
        let _ = backend.free(id);
    }
    let got = got?;
    if got.data != KNOWN_ANSWER {
        return Err(format!("matmul gave {:?}, expected {KNOWN_ANSWER:?}", got.data));
    }
    Ok(())
}

/// The configured per-evaluation and constant caps must fit the reported memory, and one
/// evaluation's cap must be allocatable now.
fn memory(backend: &mut Backend, name: &str, reported: u64, config: &Config, source: &str) -> Check {
    let (eval, constants) = (config.gpu.max_device_memory, config.gpu.max_constant_memory);
    let mib = |b: u64| b / (1 << 20);
    if eval.saturating_add(constants) > reported {
        return Check::fail(
            name,
            format!(
                "gpu.max_device_memory ({} MiB) + gpu.max_constant_memory ({} MiB) exceed the {} MiB the device reports",
                mib(eval),
                mib(constants),
                mib(reported)
            ),
            format!("set [gpu] max_constant_memory = \"{}-mb\" in {source}", mib(reported.saturating_sub(eval)) / 2),
        );
    }
    let floats = (eval / 4) as usize;
    let cols = 1024usize;
    let rows = (floats / cols).max(1);
    let tensor = match HostTensor::new(vec![rows, cols], vec![0.0; rows * cols]) {
        Ok(t) => t,
        Err(e) => {
            return Check::fail(
                name,
                format!("cannot build the probe tensor: {e}"),
                format!("set [gpu] max_device_memory = \"256-mb\" in {source}"),
            );
        }
    };
    match backend.upload(&tensor) {
        Ok(id) => {
            let _ = backend.free(id);
            Check::pass(name, format!("{} MiB (gpu.max_device_memory) allocated of {} MiB reported", mib(eval), mib(reported)))
        }
        Err(e) => Check::fail(
            name,
            format!("cannot allocate gpu.max_device_memory ({} MiB) of the {} MiB reported: {e}", mib(eval), mib(reported)),
            format!("set [gpu] max_device_memory = \"{}-mb\" in {source} (or free the device: nvidia-smi lists its users)", mib(eval) / 2),
        ),
    }
}

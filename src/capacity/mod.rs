//! Hardware detection and the capacity manifest: what this worker can offer, detected on the box.
//!
//! [`detect`] never panics and never fails: every probe that cannot answer leaves its reason in the
//! manifest (`gpus.wgpu.error`, `gpus.cuda.reason`, absent optional fields) instead, so an operator
//! sees *why* a backend is missing rather than a worker that does not start.
//!
//! The JSON shape is versioned by [`SCHEMA`]; field names are part of the wire format.

mod host;
mod wgpu_probe;

// `cfg` on the module definitions, not on their uses: both files expose the same `probe()`.
#[cfg(feature = "cuda")]
mod cuda;
#[cfg(not(feature = "cuda"))]
#[path = "cuda_disabled.rs"]
mod cuda;

use std::path::PathBuf;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// The `schema` value of every manifest this version writes.
pub const SCHEMA: &str = "ao-gpu-worker/capacity/1";

/// What [`detect`] needs to know about this worker.
#[derive(Debug, Clone)]
pub struct DetectOptions {
    /// The worker's data directory; the manifest reports the disk it lives on (it need not exist yet).
    pub data_dir: PathBuf,
    /// The worker's signing address, when known.
    pub worker_address: Option<String>,
}

/// Everything this worker can offer, as advertised (and later signed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CapacityManifest {
    /// Always [`SCHEMA`] for manifests written by this version.
    pub schema: String,
    /// When the manifest was generated, in milliseconds since the Unix epoch.
    pub generated_at_ms: u64,
    pub worker: WorkerInfo,
    pub host: HostInfo,
    pub gpus: GpuInfo,
}

/// The worker software itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerInfo {
    /// The crate version (`CARGO_PKG_VERSION`).
    pub version: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// Module formats this worker can execute.
    pub module_formats: Vec<String>,
}

/// The host machine: CPU, memory and the disk holding the data directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostInfo {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// A long OS description, such as "Linux (Debian GNU/Linux 12)".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub os: Option<String>,
    /// The kernel release, such as "6.1.0-18-amd64".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<String>,
    /// The machine architecture as the kernel reports it, such as "x86_64".
    pub arch: String,
    pub cpu: CpuInfo,
    pub memory: MemoryInfo,
    pub disk: DiskInfo,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuInfo {
    /// The brand string of the first CPU, such as "Intel(R) Xeon(R) CPU @ 2.20GHz".
    pub model: String,
    /// The vendor id, such as "GenuineIntel".
    pub vendor: String,
    pub logical_cores: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub physical_cores: Option<usize>,
    /// The highest current frequency over all cores (0 when unknown).
    pub frequency_mhz: u64,
    /// SIMD features detected at run time that matter for the CPU kernels, such as "avx2".
    pub features: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryInfo {
    pub total_bytes: u64,
    pub available_bytes: u64,
}

/// The file system holding the data directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskInfo {
    /// The data directory, as configured.
    pub path: String,
    /// The mount point whose path is the longest prefix of the data directory (or of its nearest
    /// existing ancestor). Absent when no listed file system contains it; the sizes are then 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mount_point: Option<String>,
    pub total_bytes: u64,
    pub available_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuInfo {
    pub wgpu: WgpuReport,
    pub cuda: CudaReport,
}

/// Every adapter wgpu enumerates on the primary backends (or those named by `WGPU_BACKEND`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WgpuReport {
    pub adapters: Vec<WgpuAdapter>,
    /// Why no adapter is listed (no drivers, instance creation failed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WgpuAdapter {
    pub name: String,
    /// "vulkan", "metal", "dx12", "gl", "webgpu" or "noop".
    pub backend: String,
    /// "discrete_gpu", "integrated_gpu", "virtual_gpu", "cpu" or "other".
    pub device_type: String,
    pub vendor_id: u32,
    pub device_id: u32,
    pub driver: String,
    pub driver_info: String,
    pub limits: WgpuLimits,
    pub features: WgpuFeatures,
}

/// The adapter limits that size compute work.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WgpuLimits {
    pub max_buffer_size: u64,
    pub max_storage_buffer_binding_size: u64,
    pub max_compute_workgroup_storage_size: u32,
    pub max_compute_invocations_per_workgroup: u32,
    pub max_compute_workgroups_per_dimension: u32,
}

/// The adapter features the kernels care about.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WgpuFeatures {
    pub shader_f16: bool,
    pub subgroup: bool,
    pub timestamp_query: bool,
    pub shader_f64: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CudaStatus {
    /// The driver loaded and at least one device answered.
    Available,
    /// Built with CUDA support, but no usable driver or device here; see `reason`.
    Unavailable,
    /// Built without the `cuda` feature.
    NotCompiled,
}

impl CudaStatus {
    /// The serialized name: "available", "unavailable" or "not-compiled".
    pub fn as_str(self) -> &'static str {
        match self {
            CudaStatus::Available => "available",
            CudaStatus::Unavailable => "unavailable",
            CudaStatus::NotCompiled => "not-compiled",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CudaReport {
    pub status: CudaStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The CUDA version the driver supports, such as "13.0".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub driver_version: Option<String>,
    pub devices: Vec<CudaDevice>,
}

impl CudaReport {
    /// A report saying CUDA cannot be used here, and why.
    pub fn unavailable(reason: impl Into<String>) -> Self {
        CudaReport { status: CudaStatus::Unavailable, reason: Some(reason.into()), driver_version: None, devices: Vec::new() }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CudaDevice {
    pub ordinal: u32,
    pub name: String,
    pub total_memory_bytes: u64,
    /// "major.minor", such as "9.0" for an H100.
    pub compute_capability: String,
    /// Such as "0000:01:00.0".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pci_bus_id: Option<String>,
}

/// Detects the host, its wgpu adapters and its CUDA devices. Never panics; whatever a probe cannot
/// find is reported in the manifest.
pub fn detect(opts: &DetectOptions) -> CapacityManifest {
    let started = Instant::now();
    let host = host::probe(&opts.data_dir);
    let wgpu = wgpu_probe::probe();
    let cuda = cuda::probe();
    let manifest = CapacityManifest {
        schema: SCHEMA.to_owned(),
        generated_at_ms: now_ms(),
        worker: WorkerInfo {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            address: opts.worker_address.clone(),
            module_formats: vec![crate::protocol::ao::MODULE_FORMAT.to_owned()],
        },
        host,
        gpus: GpuInfo { wgpu, cuda },
    };
    tracing::debug!(elapsed_ms = started.elapsed().as_millis() as u64, "capacity detected");
    manifest
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

impl CapacityManifest {
    /// A one-line summary for logs, such as
    /// `cpu: Intel Xeon (2 cores), wgpu: llvmpipe (LLVM 15.0.6, 256 bits) [vulkan cpu], cuda: unavailable (…)`.
    pub fn backends_summary(&self) -> String {
        let cpu = &self.host.cpu;
        let model = if cpu.model.is_empty() { "unknown cpu" } else { cpu.model.as_str() };
        let cpu_part = format!("cpu: {model} ({} cores)", cpu.logical_cores);

        let wgpu = &self.gpus.wgpu;
        let wgpu_part = if wgpu.adapters.is_empty() {
            match &wgpu.error {
                Some(e) => format!("wgpu: none ({e})"),
                None => "wgpu: none".to_owned(),
            }
        } else {
            let list: Vec<String> = wgpu.adapters.iter().map(|a| format!("{} [{} {}]", a.name, a.backend, a.device_type)).collect();
            format!("wgpu: {}", list.join("; "))
        };

        let cuda = &self.gpus.cuda;
        let mut cuda_part = format!("cuda: {}", cuda.status.as_str());
        if let Some(v) = &cuda.driver_version {
            cuda_part.push_str(&format!(" (driver {v})"));
        }
        if !cuda.devices.is_empty() {
            let list: Vec<String> = cuda
                .devices
                .iter()
                .map(|d| {
                    let gib = d.total_memory_bytes as f64 / (1u64 << 30) as f64;
                    format!("#{} {} (sm {}, {gib:.1} GiB)", d.ordinal, d.name, d.compute_capability)
                })
                .collect();
            cuda_part.push_str(&format!(": {}", list.join("; ")));
        }
        if let Some(r) = &cuda.reason {
            cuda_part.push_str(&format!(" ({r})"));
        }

        format!("{cpu_part}, {wgpu_part}, {cuda_part}")
    }
}

/// The text of a caught panic payload, for probes that turn panics into reasons.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(dir: &std::path::Path) -> DetectOptions {
        DetectOptions { data_dir: dir.to_path_buf(), worker_address: Some("test-address".to_owned()) }
    }

    #[test]
    fn detect_on_a_tempdir_reports_the_host_and_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let started = Instant::now();
        let m = detect(&opts(dir.path()));
        let elapsed = started.elapsed();
        println!("detect() took {elapsed:?}");
        println!("{}", m.backends_summary());
        println!("{}", serde_json::to_string_pretty(&m).unwrap());

        assert_eq!(m.schema, SCHEMA);
        assert!(m.generated_at_ms > 1_600_000_000_000);
        assert_eq!(m.worker.version, env!("CARGO_PKG_VERSION"));
        assert_eq!(m.worker.address.as_deref(), Some("test-address"));
        assert_eq!(m.worker.module_formats, vec![crate::protocol::ao::MODULE_FORMAT.to_owned()]);
        assert!(m.host.cpu.logical_cores >= 1);
        assert!(!m.host.arch.is_empty());
        assert!(m.host.memory.total_bytes > 0);
        assert!(m.host.memory.available_bytes <= m.host.memory.total_bytes);
        assert!(m.host.disk.mount_point.is_some(), "no disk found for {}", dir.path().display());
        assert!(m.host.disk.total_bytes > 0);
        assert_eq!(m.host.disk.path, dir.path().display().to_string());

        // Round trip: the JSON parses back into an equal manifest.
        let json = serde_json::to_value(&m).unwrap();
        let back: CapacityManifest = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(serde_json::to_value(&back).unwrap(), json);
        assert_eq!(back, m);
    }

    #[test]
    fn json_field_names_are_the_wire_names() {
        let dir = tempfile::tempdir().unwrap();
        let m = detect(&DetectOptions { data_dir: dir.path().to_path_buf(), worker_address: None });
        let v = serde_json::to_value(&m).unwrap();
        assert_eq!(v["schema"], "ao-gpu-worker/capacity/1");
        assert!(v["worker"].get("address").is_none(), "absent options are omitted, not null");
        for key in ["hostname", "os", "kernel", "arch", "cpu", "memory", "disk"] {
            // hostname/os/kernel are optional, but every Linux box this runs on has them.
            assert!(v["host"].get(key).is_some() || !cfg!(target_os = "linux"), "host.{key} missing");
        }
        for key in ["model", "vendor", "logical_cores", "frequency_mhz", "features"] {
            assert!(v["host"]["cpu"].get(key).is_some(), "host.cpu.{key} missing");
        }
        for key in ["total_bytes", "available_bytes"] {
            assert!(v["host"]["memory"].get(key).is_some());
            assert!(v["host"]["disk"].get(key).is_some());
        }
        assert!(v["gpus"]["wgpu"]["adapters"].is_array());
        let status = v["gpus"]["cuda"]["status"].as_str().unwrap();
        assert!(["available", "unavailable", "not-compiled"].contains(&status), "{status}");
        assert!(v["gpus"]["cuda"]["devices"].is_array());
    }

    #[test]
    fn cuda_probe_never_panics_and_reports_a_status() {
        let report = cuda::probe();
        println!("{report:?}");
        if cfg!(feature = "cuda") {
            assert!(matches!(report.status, CudaStatus::Available | CudaStatus::Unavailable), "{report:?}");
        } else {
            assert_eq!(report.status, CudaStatus::NotCompiled);
        }
        match report.status {
            CudaStatus::Available => assert!(!report.devices.is_empty()),
            _ => {
                assert!(report.devices.is_empty());
                assert!(report.reason.is_some());
            }
        }
    }

    #[test]
    fn a_missing_data_dir_reports_its_nearest_existing_ancestor() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("not").join("yet").join("created");
        assert!(!missing.exists());
        let m = detect(&opts(&missing));
        assert_eq!(m.host.disk.path, missing.display().to_string());
        assert!(m.host.disk.mount_point.is_some());
        assert!(m.host.disk.total_bytes > 0);
        assert!(!missing.exists(), "detect must not create the data dir");
    }

    #[test]
    fn summary_mentions_every_backend() {
        let m = CapacityManifest {
            schema: SCHEMA.to_owned(),
            generated_at_ms: 1,
            worker: WorkerInfo { version: "0.1.0".to_owned(), address: None, module_formats: vec![] },
            host: HostInfo {
                hostname: None,
                os: None,
                kernel: None,
                arch: "x86_64".to_owned(),
                cpu: CpuInfo {
                    model: "Intel Xeon".to_owned(),
                    vendor: "GenuineIntel".to_owned(),
                    logical_cores: 2,
                    physical_cores: Some(1),
                    frequency_mhz: 2200,
                    features: vec!["avx2".to_owned()],
                },
                memory: MemoryInfo { total_bytes: 1, available_bytes: 1 },
                disk: DiskInfo { path: "/data".to_owned(), mount_point: Some("/".to_owned()), total_bytes: 1, available_bytes: 1 },
            },
            gpus: GpuInfo {
                wgpu: WgpuReport {
                    adapters: vec![WgpuAdapter {
                        name: "llvmpipe (LLVM 15.0.6, 256 bits)".to_owned(),
                        backend: "vulkan".to_owned(),
                        device_type: "cpu".to_owned(),
                        vendor_id: 0x10005,
                        device_id: 0,
                        driver: "llvmpipe".to_owned(),
                        driver_info: "Mesa 22.3.6 (LLVM 15.0.6)".to_owned(),
                        limits: WgpuLimits {
                            max_buffer_size: 1,
                            max_storage_buffer_binding_size: 1,
                            max_compute_workgroup_storage_size: 1,
                            max_compute_invocations_per_workgroup: 1,
                            max_compute_workgroups_per_dimension: 1,
                        },
                        features: WgpuFeatures { shader_f16: true, subgroup: true, timestamp_query: true, shader_f64: true },
                    }],
                    error: None,
                },
                cuda: CudaReport::unavailable("no CUDA driver: libcuda not found"),
            },
        };
        assert_eq!(
            m.backends_summary(),
            "cpu: Intel Xeon (2 cores), wgpu: llvmpipe (LLVM 15.0.6, 256 bits) [vulkan cpu], \
             cuda: unavailable (no CUDA driver: libcuda not found)"
        );

        let mut m2 = m.clone();
        m2.gpus.wgpu = WgpuReport { adapters: vec![], error: Some("no adapters found".to_owned()) };
        m2.gpus.cuda = CudaReport {
            status: CudaStatus::Available,
            reason: None,
            driver_version: Some("13.0".to_owned()),
            devices: vec![CudaDevice {
                ordinal: 0,
                name: "NVIDIA H100 80GB HBM3".to_owned(),
                total_memory_bytes: 80 << 30,
                compute_capability: "9.0".to_owned(),
                pci_bus_id: Some("0000:01:00.0".to_owned()),
            }],
        };
        assert_eq!(
            m2.backends_summary(),
            "cpu: Intel Xeon (2 cores), wgpu: none (no adapters found), \
             cuda: available (driver 13.0): #0 NVIDIA H100 80GB HBM3 (sm 9.0, 80.0 GiB)"
        );
    }

    #[test]
    fn cuda_status_serializes_kebab_case() {
        assert_eq!(serde_json::to_value(CudaStatus::NotCompiled).unwrap(), "not-compiled");
        assert_eq!(serde_json::to_value(CudaStatus::Available).unwrap(), "available");
        let s: CudaStatus = serde_json::from_str("\"unavailable\"").unwrap();
        assert_eq!(s, CudaStatus::Unavailable);
    }
}

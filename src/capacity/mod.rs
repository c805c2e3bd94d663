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

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CapacityManifest {
    /// Always [`SCHEMA`] for manifests written by this version.
    pub schema: String,
    /// When the manifest was generated, in milliseconds since the Unix epoch.
    pub generated_at_ms: u64,
    pub worker: WorkerInfo,
    pub host: HostInfo,
    pub gpus: GpuInfo,
    /// Measured performance from `ao-gpu-worker bench` on this hardware (see `crate::bench`); absent
    /// until a measurement for this machine exists. [`detect`] never fills it: the daemon does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scores: Option<MeasuredScores>,
    /// The tensor backend and devices that serve `ao_gpu` calls (chosen by `[gpu]`); absent from
    /// [`detect`]'s output, filled by the daemon once its device pool is open.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serving: Option<ServingInfo>,
}

/// What serves the `ao_gpu` host calls: the backend kind and mode, each device of the pool (in
/// pool order; attestations name these), and why every earlier candidate was passed over.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServingInfo {
    pub backend: String,
    pub determinism: String,
    pub devices: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub skipped: Vec<String>,
}

/// Measured scores: the figures of a `bench` run of this worker version on this hardware
/// ([`CapacityManifest::hardware_fingerprint`]). Rates are decimal (1 GB/s = 10^9 bytes/s).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MeasuredScores {
    /// Where the figures come from: "bench.json" (a saved `ao-gpu-worker bench` run, or an earlier
    /// start's quick run) or "startup" (the quick run this process made).
    pub source: String,
    /// When the figures were measured, in milliseconds since the Unix epoch.
    pub measured_at_ms: u64,
    /// The worker version that measured them.
    pub worker_version: String,
    /// Whether they come from the short (`--quick`) run.
    pub quick: bool,
    /// The [`CapacityManifest::hardware_fingerprint`] they were measured on.
    pub fingerprint: String,
    /// One empty host call from Wasm (a loop calling a host function that does nothing), in ns.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_call_ns: Option<f64>,
    pub backends: Vec<BackendScore>,
}

/// The figures of one tensor backend; a figure the backend could not produce (an op it does not
/// support yet) is absent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackendScore {
    /// "cpu", "wgpu" or "cuda".
    pub kind: String,
    /// The backend's own description, such as "wgpu (llvmpipe (LLVM 15.0.6, 256 bits), vulkan)".
    pub description: String,
    /// "fast" or "reproducible": the mode the figures were measured in.
    pub determinism: String,
    /// f32 GEMM `[n, n] @ [n, n]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gemm_f32: Option<GemmScore>,
    /// Quantized matrix-vector product (weights `[n, k]` in the named GGUF type times an f32
    /// vector), in GB/s of weight bytes, by dtype ("q8_0", "q4_0", "q4_1").
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub qmatvec_gbps: BTreeMap<String, f64>,
    /// Host-to-device upload, GB/s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub h2d_gbps: Option<f64>,
    /// Device-to-host read, GB/s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub d2h_gbps: Option<f64>,
    /// One tiny op round trip from Wasm: `ao_gpu.scale` on a 4-element tensor plus `free`, in ns.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tiny_op_ns: Option<f64>,
}

/// An f32 GEMM figure and the size it was measured at.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GemmScore {
    /// `m = n = k`.
    pub n: usize,
    pub gflops: f64,
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
        generated_at_ms: crate::clock::now_ms(),
        worker: WorkerInfo {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            address: opts.worker_address.clone(),
            module_formats: crate::runtime::supported_formats().into_iter().map(str::to_owned).collect(),
        },
        host,
        gpus: GpuInfo { wgpu, cuda },
        scores: None,
        serving: None,
    };
    tracing::debug!(elapsed_ms = started.elapsed().as_millis() as u64, "capacity detected");
    manifest
}

/// What [`CapacityManifest::hardware_fingerprint`] hashes: the parts of the machine that decide
/// how fast the kernels run, and nothing that changes while it runs (free memory, disk, clock).
#[derive(Serialize)]
struct FingerprintParts<'a> {
    arch: &'a str,
    cpu_model: &'a str,
    cpu_vendor: &'a str,
    logical_cores: usize,
    physical_cores: Option<usize>,
    cpu_features: &'a [String],
    wgpu: Vec<(&'a str, &'a str, &'a str, u32, u32, &'a str, &'a str)>,
    cuda_driver: Option<&'a str>,
    cuda: Vec<(&'a str, u64, &'a str)>,
}

impl CapacityManifest {
    /// A hex sha256 identifying this machine's hardware for measured scores: CPU (model, vendor,
    /// cores, SIMD features), every wgpu adapter (name, backend, type, ids, driver and
    /// its version) and every CUDA device (name, memory, compute capability, driver version). The
    /// host name, memory, disk and time are left out, so it is stable across restarts and
    /// changes when the hardware or a GPU driver does.
    pub fn hardware_fingerprint(&self) -> String {
        let cpu = &self.host.cpu;
        let parts = FingerprintParts {
            arch: &self.host.arch,
            cpu_model: &cpu.model,
            cpu_vendor: &cpu.vendor,
            logical_cores: cpu.logical_cores,
            physical_cores: cpu.physical_cores,
            cpu_features: &cpu.features,
            wgpu: self
                .gpus
                .wgpu
                .adapters
                .iter()
                .map(|a| {
                    (
                        a.name.as_str(),
                        a.backend.as_str(),
                        a.device_type.as_str(),
                        a.vendor_id,
                        a.device_id,
                        a.driver.as_str(),
                        a.driver_info.as_str(),
                    )
                })
                .collect(),
            cuda_driver: self.gpus.cuda.driver_version.as_deref(),
            cuda: self.gpus.cuda.devices.iter().map(|d| (d.name.as_str(), d.total_memory_bytes, d.compute_capability.as_str())).collect(),
        };
        // Serializing plain strings, numbers and tuples cannot fail.
        let bytes = serde_json::to_vec(&parts).unwrap_or_default();
        hex::encode(Sha256::digest(&bytes))
    }

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
        assert_eq!(m.worker.module_formats[0], crate::protocol::ao::MODULE_FORMAT);
        for aos in ["wasm32-unknown-emscripten2", "wasm32-unknown-emscripten4", "wasm64-unknown-emscripten-draft_2024_02_15"] {
            assert!(m.worker.module_formats.iter().any(|f| f == aos), "{aos} advertised: {:?}", m.worker.module_formats);
        }
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

    /// A fixed manifest: a 2-core Xeon with lavapipe and no CUDA driver.
    fn sample() -> CapacityManifest {
        CapacityManifest {
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
            scores: None,
            serving: None,
        }
    }

    #[test]
    fn summary_mentions_every_backend() {
        let m = sample();
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
    fn the_fingerprint_follows_the_hardware_and_nothing_else() {
        let m = sample();
        let fp = m.hardware_fingerprint();
        assert_eq!(fp.len(), 64);
        assert!(fp.bytes().all(|b| b.is_ascii_hexdigit()));
        // What changes from one start to the next does not change it.
        let mut same = m.clone();
        same.generated_at_ms = 99;
        same.host.hostname = Some("elsewhere".to_owned());
        same.host.memory.available_bytes = 12345;
        same.host.disk = DiskInfo { path: "/other".to_owned(), mount_point: None, total_bytes: 0, available_bytes: 0 };
        same.worker.address = Some("someone".to_owned());
        same.host.cpu.frequency_mhz = 3000;
        assert_eq!(same.hardware_fingerprint(), fp);
        // The CPU, the adapters and their drivers, and CUDA devices do.
        let changes: [fn(&mut CapacityManifest); 6] = [
            |m| m.host.cpu.model = "AMD EPYC".to_owned(),
            |m| m.host.cpu.logical_cores = 4,
            |m| m.host.cpu.features.push("avx512f".to_owned()),
            |m| m.gpus.wgpu.adapters[0].driver_info = "Mesa 24.0.0".to_owned(),
            |m| m.gpus.wgpu.adapters.clear(),
            |m| {
                m.gpus.cuda.devices.push(CudaDevice {
                    ordinal: 0,
                    name: "NVIDIA H100".to_owned(),
                    total_memory_bytes: 80 << 30,
                    compute_capability: "9.0".to_owned(),
                    pci_bus_id: None,
                })
            },
        ];
        for (i, change) in changes.iter().enumerate() {
            let mut other = m.clone();
            change(&mut other);
            assert_ne!(other.hardware_fingerprint(), fp, "change {i}");
        }
    }

    #[test]
    fn scores_are_optional_on_the_wire() {
        let m = sample();
        let v = serde_json::to_value(&m).unwrap();
        assert!(v.get("scores").is_none(), "absent scores are omitted");
        let back: CapacityManifest = serde_json::from_value(v).unwrap();
        assert_eq!(back.scores, None);
        let mut with = m.clone();
        with.scores = Some(MeasuredScores {
            source: "bench.json".to_owned(),
            measured_at_ms: 5,
            worker_version: "0.1.0".to_owned(),
            quick: true,
            fingerprint: m.hardware_fingerprint(),
            host_call_ns: Some(31.5),
            backends: vec![BackendScore {
                kind: "cpu".to_owned(),
                description: "cpu (2 threads)".to_owned(),
                determinism: "fast".to_owned(),
                gemm_f32: Some(GemmScore { n: 1024, gflops: 50.0 }),
                qmatvec_gbps: BTreeMap::from([("q8_0".to_owned(), 9.5)]),
                h2d_gbps: Some(5.0),
                d2h_gbps: None,
                tiny_op_ns: Some(900.0),
            }],
        });
        let v = serde_json::to_value(&with).unwrap();
        assert_eq!(v["scores"]["backends"][0]["gemm_f32"]["gflops"], 50.0);
        assert_eq!(v["scores"]["backends"][0]["qmatvec_gbps"]["q8_0"], 9.5);
        assert!(v["scores"]["backends"][0].get("d2h_gbps").is_none());
        let back: CapacityManifest = serde_json::from_value(v).unwrap();
        assert_eq!(back, with);
    }

    #[test]
    fn cuda_status_serializes_kebab_case() {
        assert_eq!(serde_json::to_value(CudaStatus::NotCompiled).unwrap(), "not-compiled");
        assert_eq!(serde_json::to_value(CudaStatus::Available).unwrap(), "available");
        let s: CudaStatus = serde_json::from_str("\"unavailable\"").unwrap();
        assert_eq!(s, CudaStatus::Unavailable);
    }
}

//! Several devices of one backend kind, each a [`Backend`] with its own queue (stream) and its own
//! lock, and the placement of evaluations on them.
//!
//! [`DevicePool::open`] walks the configured order of backend kinds like [`super::select`] and
//! opens every device of the first kind that starts (restricted by `gpu.devices`, see
//! [`DeviceSelection`]): every CUDA ordinal, every wgpu adapter it can open, or the one CPU
//! device. Each device opened and each skipped is logged with the reason, and the pool keeps the
//! reasons ([`DevicePool::skipped`]): there is never a silent fallback.
//!
//! Placement ([`DevicePool::place`], the rule is [`choose`]): an evaluation goes to the device with
//! the fewest evaluations in flight; ties go to the device with the most free memory, then to the
//! lowest index. Free memory is `memory_bytes - live_bytes` when every device of the pool knows
//! its memory size (CUDA devices, from the capacity manifest); wgpu adapters do not report their
//! memory size, so when any size is unknown the pool treats the devices as equal in size and
//! compares live bytes (fewer is freer). Live bytes are those the device's backend reported when
//! its last evaluation ended (or when the pool opened): placement never waits for a device lock,
//! and the same pool state always gives the same choice.
//!
//! Architecture invariant: like the rest of `gpu`, nothing here knows of Wasm, actors or the
//! network. Locks: the pool's load table and a device lock are never held together.

use std::sync::{Arc, Mutex, MutexGuard};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

use super::{Backend, BackendKind, Determinism, GpuError, Result};

/// One device of a pool, shared by the evaluations placed on it: its lock orders their calls.
pub type SharedDevice = Arc<Mutex<Backend>>;

/// An entry of `gpu.devices`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceRef {
    /// The device's number among the devices of its kind: the CUDA ordinal, or the wgpu adapter's
    /// position in `ao-gpu-worker capacity` (`gpus.wgpu.adapters`).
    Index(usize),
    /// Matches every device whose name contains this text, ignoring case (such as "H100").
    Name(String),
}

impl DeviceRef {
    /// Whether this entry names device `index` of its kind, named `name`.
    pub fn matches(&self, index: usize, name: &str) -> bool {
        match self {
            DeviceRef::Index(i) => *i == index,
            DeviceRef::Name(n) => name.to_lowercase().contains(&n.to_lowercase()),
        }
    }
}

impl std::fmt::Display for DeviceRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceRef::Index(i) => write!(f, "{i}"),
            DeviceRef::Name(n) => write!(f, "{n:?}"),
        }
    }
}

/// Which devices of the chosen kind serve evaluations (`gpu.devices`). The CPU backend is one
/// device and ignores it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum DeviceSelection {
    /// Every device of the kind that opens.
    #[default]
    All,
    /// Only the devices some entry matches. Never empty (the configuration refuses that).
    Only(Vec<DeviceRef>),
}

impl DeviceSelection {
    /// Whether device `index` of its kind, named `name`, is selected.
    pub fn matches(&self, index: usize, name: &str) -> bool {
        match self {
            DeviceSelection::All => true,
            DeviceSelection::Only(refs) => refs.iter().any(|r| r.matches(index, name)),
        }
    }

    /// The entries that match none of `devices` (index, name): worth a warning.
    fn unmatched<'a>(&'a self, devices: &[(usize, String)]) -> Vec<&'a DeviceRef> {
        match self {
            DeviceSelection::All => Vec::new(),
            DeviceSelection::Only(refs) => refs.iter().filter(|r| !devices.iter().any(|(i, n)| r.matches(*i, n))).collect(),
        }
    }
}

impl std::fmt::Display for DeviceSelection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceSelection::All => f.write_str("\"all\""),
            DeviceSelection::Only(refs) => {
                let list: Vec<String> = refs.iter().map(ToString::to_string).collect();
                write!(f, "[{}]", list.join(", "))
            }
        }
    }
}

/// What is known of a device before it is opened (from the capacity manifest).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KnownDevice {
    /// Such as "NVIDIA H100 80GB HBM3" or "llvmpipe (LLVM 15.0.6, 256 bits)".
    pub name: String,
    /// The wgpu backend API ("vulkan", "metal", ...), to recognize an adapter once opened.
    pub api: Option<String>,
    /// The device's memory size, when it reports one (CUDA; wgpu adapters do not).
    pub memory_bytes: Option<u64>,
}

/// The devices [`DevicePool::open`] may find, by kind, in the order of their indices. Whatever
/// is missing here is still opened; it only lacks a name for `gpu.devices` and a memory size.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Inventory {
    /// By CUDA ordinal.
    pub cuda: Vec<KnownDevice>,
    /// The adapters of the primary backends, in enumeration order.
    pub wgpu: Vec<KnownDevice>,
    /// The host CPU.
    pub cpu: Option<KnownDevice>,
}

/// A device of a pool, as logs, metrics, `/capacity` and attestations name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Its position in the pool: what placement and metrics use.
    pub index: usize,
    pub kind: BackendKind,
    /// Its number among the devices of its kind (CUDA ordinal, wgpu adapter index, 0 for the CPU).
    pub ordinal: usize,
    /// The backend's own description, such as "cuda (NVIDIA H100 80GB HBM3, sm_90)".
    pub description: String,
    pub determinism: Determinism,
    /// The memory size, where known (see the module doc).
    pub memory_bytes: Option<u64>,
}

/// The load of one device: what placement looks at.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeviceLoad {
    /// Evaluations placed on the device and not yet finished.
    pub in_flight: u64,
    /// Bytes of live tensors (evaluations' and cached constants') when the device's last
    /// evaluation ended, or when the pool opened.
    pub live_bytes: u64,
    pub memory_bytes: Option<u64>,
    /// Evaluations finished on the device.
    pub evaluations: u64,
}

impl DeviceLoad {
    fn free_bytes(&self) -> Option<u64> {
        self.memory_bytes.map(|m| m.saturating_sub(self.live_bytes))
    }
}

/// The placement rule (see the module doc): the index of the device an evaluation should go to,
/// `None` only for an empty slice. Depends on nothing but `loads`.
pub fn choose(loads: &[DeviceLoad]) -> Option<usize> {
    let sizes_known = loads.iter().all(|l| l.memory_bytes.is_some());
    loads
        .iter()
        .enumerate()
        .min_by(|(i, a), (j, b)| {
            a.in_flight
                .cmp(&b.in_flight)
                .then_with(|| if sizes_known { b.free_bytes().cmp(&a.free_bytes()) } else { a.live_bytes.cmp(&b.live_bytes) })
                .then(i.cmp(j))
        })
        .map(|(i, _)| i)
}

/// `device` and `kind` labels of the per-device metrics: the pool index and the backend kind.
pub type DeviceLabels = [(&'static str, String); 2];

/// Per-device Prometheus metrics of a pool (registered by [`DeviceMetrics::register`]; clones share values).
#[derive(Debug, Clone, Default)]
pub struct DeviceMetrics {
    /// Evaluations running on the device.
    pub in_flight: Family<DeviceLabels, Gauge>,
    /// Evaluations finished on the device.
    pub evaluations: Family<DeviceLabels, Counter>,
    /// Bytes of live tensors on the device (see [`DeviceLoad::live_bytes`]).
    pub live_bytes: Family<DeviceLabels, Gauge>,
}

struct Device {
    info: DeviceInfo,
    backend: SharedDevice,
    in_flight: Gauge,
    evaluations: Counter,
    live_bytes: Gauge,
}

/// The devices serving `ao_gpu` calls: one kind, one determinism mode, at least one device.
pub struct DevicePool {
    devices: Vec<Device>,
    loads: Mutex<Vec<DeviceLoad>>,
    metrics: DeviceMetrics,
    skipped: Vec<String>,
}

impl std::fmt::Debug for DevicePool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let devices: Vec<&DeviceInfo> = self.devices.iter().map(|d| &d.info).collect();
        f.debug_struct("DevicePool").field("devices", &devices).field("skipped", &self.skipped).finish_non_exhaustive()
    }
}

/// The evaluation's hold on the device it was placed on; dropping it ends the evaluation there
/// (records its live bytes, one evaluation finished, one fewer in flight).
pub struct Lease<'a> {
    pool: &'a DevicePool,
    index: usize,
}

impl std::fmt::Debug for Lease<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease").field("device", &self.index).finish()
    }
}

impl Lease<'_> {
    /// The pool index of the device.
    pub fn index(&self) -> usize {
        self.index
    }
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        self.pool.finish(self.index);
    }
}

/// A device opened by [`DevicePool::open`], before it joins the pool.
struct Opened {
    backend: Backend,
    ordinal: usize,
    memory_bytes: Option<u64>,
}

impl DevicePool {
    /// Walks `order` and opens every selected device of the first kind where at least one opens
    /// (logging each device opened and each skipped, with why). The error lists every kind's reason.
    pub fn open(order: &[BackendKind], determinism: Determinism, selection: &DeviceSelection, inventory: &Inventory) -> Result<Self> {
        let mut skipped = Vec::new();
        for &kind in order {
            let mut reasons = Vec::new();
            let opened = open_kind(kind, determinism, selection, inventory, &mut reasons);
            if opened.is_empty() {
                let why = if reasons.is_empty() { "no device".to_owned() } else { reasons.join("; ") };
                tracing::info!(backend = %kind, reason = %why, "tensor backend skipped");
                skipped.push(format!("{kind}: {why}"));
                continue;
            }
            // Devices of the chosen kind that were passed over are reported too.
            skipped.extend(reasons.into_iter().map(|r| format!("{kind}: {r}")));
            let pool = Self::build(opened, skipped)?;
            tracing::info!(
                backend = %kind,
                devices = pool.len(),
                determinism = determinism.as_str(),
                skipped = ?pool.skipped,
                "tensor device pool ready"
            );
            return Ok(pool);
        }
        Err(GpuError::Device(format!(
            "no tensor backend available ({})",
            if skipped.is_empty() { "empty order".to_owned() } else { skipped.join("; ") }
        )))
    }

    /// A pool of backends made by the caller (tests, benches, a runtime given one backend): device
    /// `i` is `backends[i]`, with ordinal `i` and no known memory size. All of one kind and mode.
    pub fn from_backends(backends: Vec<Backend>) -> Result<Self> {
        Self::from_shared(backends.into_iter().map(|b| Arc::new(Mutex::new(b))).collect())
    }

    /// As [`DevicePool::from_backends`], for backends already shared (the caller may keep a handle).
    pub fn from_shared(backends: Vec<SharedDevice>) -> Result<Self> {
        let devices = backends.into_iter().enumerate().map(|(i, b)| (b, i, None)).collect();
        Self::assemble(devices, Vec::new())
    }

    fn build(opened: Vec<Opened>, skipped: Vec<String>) -> Result<Self> {
        let devices = opened.into_iter().map(|o| (Arc::new(Mutex::new(o.backend)), o.ordinal, o.memory_bytes)).collect();
        Self::assemble(devices, skipped)
    }

    fn assemble(backends: Vec<(SharedDevice, usize, Option<u64>)>, skipped: Vec<String>) -> Result<Self> {
        let metrics = DeviceMetrics::default();
        let mut devices: Vec<Device> = Vec::with_capacity(backends.len());
        let mut loads = Vec::with_capacity(backends.len());
        for (index, (backend, ordinal, memory_bytes)) in backends.into_iter().enumerate() {
            let (kind, description, determinism, live) = {
                let b = lock(&backend);
                (b.kind(), b.describe(), b.determinism(), b.live_bytes())
            };
            if let Some(first) = devices.first()
                && (first.info.kind != kind || first.info.determinism != determinism)
            {
                return Err(GpuError::Device(format!(
                    "a device pool holds one backend kind in one mode: device 0 is {} ({}), device {index} is {description} ({})",
                    first.info.description,
                    first.info.determinism.as_str(),
                    determinism.as_str()
                )));
            }
            let labels: DeviceLabels = [("device", index.to_string()), ("kind", kind.as_str().to_owned())];
            let device = Device {
                info: DeviceInfo { index, kind, ordinal, description, determinism, memory_bytes },
                backend,
                in_flight: metrics.in_flight.get_or_create(&labels).clone(),
                evaluations: metrics.evaluations.get_or_create(&labels).clone(),
                live_bytes: metrics.live_bytes.get_or_create(&labels).clone(),
            };
            device.live_bytes.set(i64::try_from(live).unwrap_or(i64::MAX));
            devices.push(device);
            loads.push(DeviceLoad { live_bytes: live, memory_bytes, ..DeviceLoad::default() });
        }
        if devices.is_empty() {
            return Err(GpuError::Device("a device pool needs at least one device".to_owned()));
        }
        Ok(Self { devices, loads: Mutex::new(loads), metrics, skipped })
    }

    /// The number of devices (at least one).
    pub fn len(&self) -> usize {
        self.devices.len()
    }

    /// Always false: a pool has at least one device.
    pub fn is_empty(&self) -> bool {
        self.devices.is_empty()
    }

    /// The kind of every device.
    pub fn kind(&self) -> BackendKind {
        self.devices.first().map_or(BackendKind::Cpu, |d| d.info.kind)
    }

    /// The determinism mode of every device.
    pub fn determinism(&self) -> Determinism {
        self.devices.first().map_or(Determinism::Reproducible, |d| d.info.determinism)
    }

    /// Every device, by pool index.
    pub fn infos(&self) -> Vec<DeviceInfo> {
        self.devices.iter().map(|d| d.info.clone()).collect()
    }

    /// Device `index`.
    pub fn info(&self, index: usize) -> Option<&DeviceInfo> {
        self.devices.get(index).map(|d| &d.info)
    }

    /// The backend of device `index`.
    pub fn backend(&self, index: usize) -> Option<&SharedDevice> {
        self.devices.get(index).map(|d| &d.backend)
    }

    /// Why each backend kind before the chosen one, and each passed-over device of the chosen
    /// kind, is not serving ("cuda: unavailable: no CUDA driver: …").
    pub fn skipped(&self) -> &[String] {
        &self.skipped
    }

    /// The per-device metrics to register.
    pub fn metrics(&self) -> &DeviceMetrics {
        &self.metrics
    }

    /// The load of every device, by pool index.
    pub fn loads(&self) -> Vec<DeviceLoad> {
        self.lock_loads().clone()
    }

    /// Places an evaluation by [`choose`] and counts it in flight until the lease drops.
    pub fn place(&self) -> Lease<'_> {
        let mut loads = self.lock_loads();
        let index = choose(&loads).unwrap_or(0);
        if let Some(l) = loads.get_mut(index) {
            l.in_flight += 1;
            if let Some(d) = self.devices.get(index) {
                d.in_flight.set(i64::try_from(l.in_flight).unwrap_or(i64::MAX));
            }
        }
        drop(loads);
        Lease { pool: self, index }
    }

    /// Reads every device's live bytes now (locking each device in turn).
    pub fn refresh(&self) {
        for index in 0..self.devices.len() {
            self.record_live(index);
        }
    }

    fn finish(&self, index: usize) {
        self.record_live(index);
        let mut loads = self.lock_loads();
        if let (Some(l), Some(d)) = (loads.get_mut(index), self.devices.get(index)) {
            l.in_flight = l.in_flight.saturating_sub(1);
            l.evaluations += 1;
            d.in_flight.set(i64::try_from(l.in_flight).unwrap_or(i64::MAX));
            d.evaluations.inc();
        }
    }

    fn record_live(&self, index: usize) {
        let Some(d) = self.devices.get(index) else { return };
        let live = lock(&d.backend).live_bytes();
        d.live_bytes.set(i64::try_from(live).unwrap_or(i64::MAX));
        if let Some(l) = self.lock_loads().get_mut(index) {
            l.live_bytes = live;
        }
    }

    fn lock_loads(&self) -> MutexGuard<'_, Vec<DeviceLoad>> {
        // Every update of the table completes before the lock is released.
        crate::sync::lock(&self.loads)
    }
}

/// Locks a device ([`crate::sync::lock`]: a panicked op leaves nothing worse than the error it
/// reported).
pub fn lock(device: &SharedDevice) -> MutexGuard<'_, Backend> {
    crate::sync::lock(device)
}

/// Logs and records one device passed over.
fn skip(kind: BackendKind, index: usize, name: &str, why: String, reasons: &mut Vec<String>) {
    tracing::info!(backend = %kind, device = index, name, reason = %why, "tensor device skipped");
    reasons.push(format!("device {index} ({name}): {why}"));
}

fn opened(kind: BackendKind, backend: Backend, ordinal: usize, memory_bytes: Option<u64>) -> Opened {
    tracing::info!(backend = %kind, device = ordinal, description = %backend.describe(), memory_bytes, "tensor device opened");
    Opened { backend, ordinal, memory_bytes }
}

/// How the pool enumerates and opens the devices of one kind (as ggml's backend registry): how
/// many the kind has, where the capacity inventory lists them, and how to open device `index`.
struct Registry {
    count: fn() -> usize,
    known: fn(&Inventory) -> &[KnownDevice],
    /// How a device missing from the inventory is named.
    noun: &'static str,
    open: fn(usize, Determinism) -> Result<Backend>,
}

fn registry(kind: BackendKind) -> Registry {
    match kind {
        BackendKind::Cuda => Registry {
            count: super::cuda::device_count,
            known: |inv| &inv.cuda,
            noun: "cuda device",
            open: |i, d| super::cuda::CudaBackend::new_on(i, d).map(Backend::Cuda),
        },
        BackendKind::Wgpu => Registry {
            count: super::wgpu::WgpuBackend::adapter_count,
            known: |inv| &inv.wgpu,
            noun: "wgpu adapter",
            open: |i, d| super::wgpu::WgpuBackend::new_on(i, d).map(|b| Backend::Wgpu(Box::new(b))),
        },
        BackendKind::Cpu => Registry {
            count: || 1,
            known: |inv| inv.cpu.as_slice(),
            noun: "cpu",
            open: |_, d| Ok(Backend::Cpu(super::cpu::CpuBackend::new(d))),
        },
    }
}

/// Every selected device of `kind` that opens (every CUDA ordinal, every wgpu adapter, each on its
/// own queue, or the one CPU device); the reason for each that does not goes to `reasons`.
fn open_kind(
    kind: BackendKind,
    determinism: Determinism,
    selection: &DeviceSelection,
    inventory: &Inventory,
    reasons: &mut Vec<String>,
) -> Vec<Opened> {
    let reg = registry(kind);
    let count = (reg.count)();
    if count == 0 {
        // The backend's own error names what is missing (driver, devices, NVRTC, Vulkan loader,
        // or the `cuda` feature in this build).
        match Backend::new(kind, determinism) {
            Err(e) => reasons.push(e.to_string()),
            Ok(_) => reasons.push(format!("{kind} lists no device")),
        }
        return Vec::new();
    }
    let known = (reg.known)(inventory);
    // The CPU is one device that `gpu.devices` (a GPU selection) does not restrict.
    if kind == BackendKind::Cpu {
        return match (reg.open)(0, determinism) {
            Ok(b) => vec![opened(kind, b, 0, known.first().and_then(|c| c.memory_bytes))],
            Err(e) => {
                reasons.push(e.to_string());
                Vec::new()
            }
        };
    }
    let names: Vec<(usize, String)> =
        (0..count).map(|i| (i, known.get(i).map_or_else(|| format!("{} {i}", reg.noun), |d| d.name.clone()))).collect();
    warn_unmatched(kind, selection, &names);
    let mut out = Vec::new();
    for (index, name) in names {
        if !selection.matches(index, &name) {
            skip(kind, index, &name, format!("not in gpu.devices {selection}"), reasons);
            continue;
        }
        match (reg.open)(index, determinism) {
            Ok(b) => out.push(opened(kind, b, index, known.get(index).and_then(|d| d.memory_bytes))),
            Err(e) => skip(kind, index, &name, e.to_string(), reasons),
        }
    }
    out
}

fn warn_unmatched(kind: BackendKind, selection: &DeviceSelection, devices: &[(usize, String)]) {
    for r in selection.unmatched(devices) {
        tracing::warn!(backend = %kind, entry = %r, devices = ?devices, "gpu.devices entry matches no device of this backend");
    }
}

// ---- metrics registration ----------------------------------------------------------------------

impl DeviceMetrics {
    /// Registers the serving backend (`tensor_backend`: `kind`, `description`, `determinism`), one
    /// `tensor_device` series per device of the pool, and these per-device metrics, in that order.
    pub fn register(
        &self,
        registry: &mut prometheus_client::registry::Registry,
        kind: BackendKind,
        description: &str,
        determinism: Determinism,
        devices: &[DeviceInfo],
    ) {
        use prometheus_client::metrics::info::Info;
        let tensor_info = Info::new(vec![
            ("kind".to_owned(), kind.as_str().to_owned()),
            ("description".to_owned(), description.to_owned()),
            ("determinism".to_owned(), determinism.as_str().to_owned()),
        ]);
        registry.register("tensor_backend", "The tensor backend serving ao_gpu calls (chosen from gpu.backends)", tensor_info);
        // One series per device of the pool: which device each pool index is.
        let device_info = Family::<Vec<(String, String)>, Gauge>::default();
        for d in devices {
            device_info
                .get_or_create(&vec![
                    ("device".to_owned(), d.index.to_string()),
                    ("kind".to_owned(), d.kind.as_str().to_owned()),
                    ("ordinal".to_owned(), d.ordinal.to_string()),
                    ("description".to_owned(), d.description.clone()),
                ])
                .set(1);
        }
        registry.register("tensor_device", "The devices ao_gpu evaluations are placed on (value 1), by pool index", device_info);
        registry.register("tensor_device_in_flight", "Evaluations running on the device", self.in_flight.clone());
        registry.register("tensor_device_evaluations", "Evaluations finished on the device", self.evaluations.clone());
        registry.register(
            "tensor_device_live_bytes",
            "Bytes of live tensors on the device (evaluations' and cached constants') when its last evaluation ended",
            self.live_bytes.clone(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::HostTensor;
    use crate::gpu::cpu::CpuBackend;

    fn load(in_flight: u64, live_bytes: u64, memory_bytes: Option<u64>) -> DeviceLoad {
        DeviceLoad { in_flight, live_bytes, memory_bytes, evaluations: 0 }
    }

    #[test]
    fn fewest_in_flight_wins_whatever_the_memory() {
        let loads = [load(2, 0, Some(100)), load(1, 90, Some(100)), load(3, 0, Some(1000))];
        assert_eq!(choose(&loads), Some(1));
        let loads = [load(1, 0, None), load(0, 1 << 30, None)];
        assert_eq!(choose(&loads), Some(1));
        assert_eq!(choose(&[]), None);
    }

    #[test]
    fn ties_go_to_the_most_free_memory_when_every_size_is_known() {
        // Free: 60, 900, 900 -> the first of the two largest.
        let loads = [load(1, 40, Some(100)), load(1, 100, Some(1000)), load(1, 0, Some(900)), load(2, 0, Some(10_000))];
        assert_eq!(choose(&loads), Some(1));
        // More live bytes but a bigger device still has more room.
        let loads = [load(0, 10, Some(100)), load(0, 500, Some(4000))];
        assert_eq!(choose(&loads), Some(1));
        // Live bytes beyond the size count as no room, not as a wrap-around.
        let loads = [load(0, 200, Some(100)), load(0, 90, Some(100))];
        assert_eq!(choose(&loads), Some(1));
    }

    #[test]
    fn ties_go_to_the_fewest_live_bytes_when_a_size_is_unknown() {
        // Device 1 would have the most free bytes by size, but device 2's size is unknown:
        // compare live bytes only.
        let loads = [load(0, 50, Some(100)), load(0, 60, Some(1 << 40)), load(0, 40, None)];
        assert_eq!(choose(&loads), Some(2));
        let loads = [load(0, 7, None), load(0, 7, None), load(0, 7, None)];
        assert_eq!(choose(&loads), Some(0), "full ties go to the lowest index");
        let loads = [load(0, 8, None), load(0, 7, None), load(0, 7, None)];
        assert_eq!(choose(&loads), Some(1));
    }

    fn cpu() -> Backend {
        Backend::Cpu(CpuBackend::new(Determinism::Reproducible))
    }

    #[test]
    fn a_pool_places_by_load_and_counts_evaluations() {
        let pool = DevicePool::from_backends(vec![cpu(), cpu(), cpu()]).unwrap();
        assert_eq!((pool.len(), pool.kind(), pool.determinism()), (3, BackendKind::Cpu, Determinism::Reproducible));
        let infos = pool.infos();
        assert_eq!(infos.iter().map(|d| (d.index, d.ordinal)).collect::<Vec<_>>(), [(0, 0), (1, 1), (2, 2)]);
        let (a, b, c) = (pool.place(), pool.place(), pool.place());
        assert_eq!((a.index(), b.index(), c.index()), (0, 1, 2));
        let d = pool.place();
        assert_eq!(d.index(), 0, "all busy once: back to the lowest index");
        drop(b);
        assert_eq!(pool.place().index(), 1, "device 1 has the fewest in flight");
        let loads = pool.loads();
        assert_eq!(loads.iter().map(|l| (l.in_flight, l.evaluations)).collect::<Vec<_>>(), [(2, 0), (0, 2), (1, 0)]);
        drop((a, c, d));
        let loads = pool.loads();
        assert_eq!(loads.iter().map(|l| (l.in_flight, l.evaluations)).collect::<Vec<_>>(), [(0, 2), (0, 2), (0, 1)]);
        let labels: DeviceLabels = [("device", "0".to_owned()), ("kind", "cpu".to_owned())];
        assert_eq!(pool.metrics().evaluations.get_or_create(&labels).get(), 2);
        assert_eq!(pool.metrics().in_flight.get_or_create(&labels).get(), 0);
    }

    #[test]
    fn idle_devices_are_ranked_by_live_bytes() {
        let pool = DevicePool::from_backends(vec![cpu(), cpu(), cpu()]).unwrap();
        // 64 bytes resident on device 0 (a cached constant, say), 16 on device 1.
        let t = |n: usize| HostTensor::new(vec![n], vec![1.0; n]).unwrap();
        let kept0 = lock(pool.backend(0).unwrap()).upload(&t(16)).unwrap();
        let kept1 = lock(pool.backend(1).unwrap()).upload(&t(4)).unwrap();
        assert_eq!(pool.place().index(), 0, "not yet seen: the recorded live bytes are still 0");
        // Its lease ended: device 0's live bytes are now known.
        assert_eq!(pool.loads()[0].live_bytes, 64);
        assert_eq!(pool.place().index(), 1);
        pool.refresh();
        assert_eq!(pool.loads().iter().map(|l| l.live_bytes).collect::<Vec<_>>(), [64, 16, 0]);
        let (x, y, z) = (pool.place(), pool.place(), pool.place());
        assert_eq!((x.index(), y.index(), z.index()), (2, 1, 0), "fewest live bytes first");
        drop((x, y, z));
        lock(pool.backend(0).unwrap()).free(kept0).unwrap();
        lock(pool.backend(1).unwrap()).free(kept1).unwrap();
    }

    #[test]
    fn a_pool_holds_one_kind_in_one_mode() {
        let fast = Backend::Cpu(CpuBackend::new(Determinism::Fast));
        let err = DevicePool::from_backends(vec![cpu(), fast]).unwrap_err();
        assert!(err.to_string().contains("one backend kind in one mode"), "{err}");
        assert!(DevicePool::from_backends(Vec::new()).is_err());
    }

    #[test]
    fn selection_by_index_and_name() {
        let sel = DeviceSelection::Only(vec![DeviceRef::Index(1), DeviceRef::Name("h100".into())]);
        assert!(sel.matches(1, "NVIDIA A100"));
        assert!(sel.matches(0, "NVIDIA H100 80GB HBM3"));
        assert!(!sel.matches(2, "NVIDIA A100"));
        assert!(DeviceSelection::All.matches(7, ""));
        let devices = [(0, "NVIDIA A100".to_owned())];
        assert_eq!(sel.unmatched(&devices).len(), 2);
        assert_eq!(sel.to_string(), "[1, \"h100\"]");
    }

    #[test]
    fn open_walks_the_order_and_says_why() {
        // CUDA is never available on the machines that run the unit tests without a GPU; where it
        // is, the first kind wins and this test only checks the pool is well formed.
        let pool = DevicePool::open(
            &[BackendKind::Cuda, BackendKind::Cpu],
            Determinism::Reproducible,
            &DeviceSelection::All,
            &Inventory::default(),
        )
        .unwrap();
        if pool.kind() == BackendKind::Cpu {
            assert_eq!(pool.len(), 1);
            assert!(pool.skipped().first().is_some_and(|s| s.starts_with("cuda: ")), "{:?}", pool.skipped());
        }
        let err = DevicePool::open(&[], Determinism::Reproducible, &DeviceSelection::All, &Inventory::default()).unwrap_err();
        assert!(err.to_string().contains("empty order"), "{err}");
    }
}

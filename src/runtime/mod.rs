//! The actor runtime: wasmtime engine, module cache, limits and one evaluation per message, for
//! modules following docs/abi.md (`Module-Format: wasm32-unknown-ao-gpu-worker`, JSON-1).
//!
//! Architecture invariant: this is the only module of the crate that names wasmtime; the rest of
//! the worker sees tags, bytes, JSON and the types below.
//!
//! ```text
//! Runtime::new(RuntimeConfig { cache_dir, max_memory, max_compute, deadline }) -> Result<Runtime, RuntimeError>
//! Runtime::with_gpu(cfg, GpuConfig { backend: Option<SharedDevice>, max_device_memory, constants: Option<Arc<ConstantCache>> }) -> Result<Runtime, RuntimeError>
//! Runtime::with_pool(cfg, PoolConfig { pool: Arc<DevicePool>, max_device_memory, constant_source, max_constant_memory }) -> Result<Runtime, RuntimeError>
//! Runtime::load(&self, module_bytes: &[u8], module_tags: &[Tag]) -> Result<Arc<ActorModule>, RuntimeError>
//! Runtime::limits(&self, module_tags: &[Tag], process_tags: &[Tag]) -> Result<Limits, RuntimeError>
//! Runtime::evaluate(&self, module: &ActorModule, state: Option<&[u8]>, input: &EvalInput) -> Evaluation
//! ```
//!
//! - One `Engine` for the process, with fuel (deterministic `GasUsed` and `Compute-Limit`), epoch
//!   interruption (the wall-clock deadline, ticked every [`EPOCH_TICK`] by a thread that ends with
//!   the runtime) and NaN canonicalization (floats give the same bits on every CPU).
//! - `load` validates the tags, then takes the compiled module from memory, from the disk cache
//!   (`cache_dir/<sha256>-<engine compat hash>.cwasm`) or compiles it; it refuses modules whose
//!   exports or imports do not match the ABI, before anything is linked.
//! - `evaluate` uses a fresh `Store` and instance per message (cheap from the `InstancePre` made at
//!   load): restore the saved memory, or instantiate fresh and call `_initialize`; place the message
//!   and environment with `malloc`; call `handle`; check the JSON. State is the whole linear memory,
//!   returned only on success, so a failed message leaves the caller's previous state in force.
//!   `gas_used` counts all fuel the evaluation burned (including `_initialize` on a first message).
//! - `ao_gpu` runs on a [`DevicePool`]: one device for `with_gpu`, every device of the chosen
//!   backend kind for `with_pool`. Each evaluation is placed on one device when it starts (fewest
//!   evaluations in flight, then most free memory, see `crate::gpu::pool`) and keeps it to the
//!   end: all its tensors live there, constants come from that device's own cache, and
//!   [`Evaluation::device`] says which device it was.
//! - Nothing a module does can panic the worker: every pointer is bounds-checked and every failure
//!   is an [`EvalError`]; a host bug that panics anyway is caught and reported as a trap.

mod abi;
pub mod aos;
mod cache;
mod epoch;
pub mod fault;
pub mod host;
pub mod limits;
mod live;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha2::{Digest, Sha256};
use wasmtime::{Config, Engine, InstancePre, Linker, Module, Store};

pub use epoch::EPOCH_TICK;
pub use host::gpu::constants::{ConstantCache, ConstantMetrics, ConstantSource, ConstantStats, DEFAULT_MAX_CONSTANT_MEMORY, SourceError};
pub use host::gpu::{
    BYTES_PER_GAS, CMD_F, CMD_FLOATS, CMD_I, CMD_IN, CMD_INPUTS, CMD_INTS, CMD_OP, CMD_OUT, CMD_RESERVED, CMD_SIZE,
    DEFAULT_MAX_DEVICE_MEMORY, FLOPS_PER_GAS, FUNCTIONS as GPU_FUNCTIONS, GAS_PER_CALL, GAS_PER_COMMAND, GpuConfig, GpuStatus, MAX_HANDLES,
    gas as gpu_gas, op as gpu_op,
};
pub use host::nn::models::{ModelEntry, ModelError, ModelRegistry};
pub use host::wasi::LOG_CAP;
pub use limits::{COMPUTE_LIMIT_TAG, Limits, MEMORY_LIMIT_TAG, parse_compute_limit, parse_memory_limit};
pub use live::{AosSettings, Restore, StateRef, chained_state};

use crate::attest::trace::Trace;
pub use crate::gpu::pool::{DeviceInfo, DeviceLoad, DevicePool, SharedDevice};
use crate::gpu::{Backend, BackendKind, Determinism};
use crate::protocol::Tag;
use cache::DiskCache;
use host::HostState;
use host::{gpu, nn, wasi};
use limits::StoreLimiter;

/// The only module format the runtime runs.
pub const MODULE_FORMAT: &str = "wasm32-unknown-ao-gpu-worker";
/// The only input and output encoding.
pub const JSON_1: &str = "JSON-1";

/// Runtime settings (from the worker's `limits` config).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeConfig {
    /// Where compiled modules are cached; created when missing. Only the worker may write here.
    pub cache_dir: PathBuf,
    /// Largest `Memory-Limit` a module or process may ask for, in bytes; also the default.
    pub max_memory: u64,
    /// Largest `Compute-Limit` (fuel per message); also the default.
    pub max_compute: u64,
    /// Wall-clock time one evaluation may take.
    pub deadline: Duration,
}

/// Why a module cannot be loaded or a limit cannot be granted. The AO CU answers 422 for the
/// format, encoding and tag errors and 413 for [`RuntimeError::LimitTooLarge`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuntimeError {
    #[error("{}", unsupported_format(.0))]
    UnsupportedFormat(String),
    #[error("unsupported {tag} {value:?}; the worker runs JSON-1")]
    UnsupportedEncoding { tag: &'static str, value: String },
    #[error("module does not export `{0}`")]
    MissingExport(&'static str),
    #[error("module exports `{name}` as {found}, expected {expected}")]
    BadExport { name: &'static str, expected: String, found: String },
    #[error("module imports {module}.{name}: {detail}")]
    ForbiddenImport { module: String, name: String, detail: String },
    #[error("module is not valid wasm: {0}")]
    Invalid(String),
    #[error("{what} {asked} exceeds {bound} {max}")]
    LimitTooLarge { what: &'static str, asked: u64, max: u64, bound: &'static str },
    #[error("{tag} {value:?} is not a valid limit")]
    BadLimit { tag: &'static str, value: String },
    #[error("module cache: {0}")]
    Cache(String),
    #[error("unsupported: {0}")]
    Unsupported(String),
    #[error("runtime setup: {0}")]
    Setup(String),
}

fn unsupported_format(format: &str) -> String {
    let formats = supported_formats().join(", ");
    if format.is_empty() {
        format!("module has no Module-Format tag; the worker runs {formats}")
    } else {
        format!("unsupported module format {format:?}; the worker runs {formats}")
    }
}

/// Every `Module-Format` the worker runs: its own and the aos formats it implements.
pub fn supported_formats() -> Vec<&'static str> {
    let mut formats = vec![MODULE_FORMAT];
    formats.extend(aos::AosFormat::ALL.iter().filter(|f| f.is_supported()).map(|f| f.name()));
    formats
}

/// Why one evaluation failed. The process state rolls back in every case.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EvalError {
    #[error("trap: {0}")]
    Trap(String),
    #[error("out of fuel: the compute limit is {limit}")]
    OutOfFuel { limit: u64 },
    #[error("out of memory: the memory limit is {limit_bytes} bytes")]
    OutOfMemory { limit_bytes: u64 },
    #[error("deadline of {deadline:?} exceeded")]
    Timeout { deadline: Duration },
    #[error("invalid result: {0}")]
    BadResult(String),
    #[error("{0}")]
    Actor(String),
    #[error("exit {0}")]
    Exit(i32),
    /// The worker could not complete the evaluation for a reason outside the actor (a constant's
    /// source is unreachable or answers garbage). Not a result: evaluate the message again later.
    #[error("worker unavailable: {0}")]
    Unavailable(String),
}

/// A loaded module, ready to instantiate. Cheap to share between evaluations and threads.
pub struct ActorModule {
    sha256: [u8; 32],
    kind: ModuleKind,
    compiled_from_source: bool,
}

/// What runs a module: the worker's own ABI, or the aos runtime (AO's emscripten formats).
enum ModuleKind {
    Own { pre: InstancePre<HostState>, has_initialize: bool },
    Aos(Arc<aos::AosModule>),
}

impl ActorModule {
    /// The sha256 of the wasm bytes.
    pub fn sha256(&self) -> [u8; 32] {
        self.sha256
    }

    /// True when this runtime compiled the wasm, false when it came from the disk cache.
    pub fn compiled_from_source(&self) -> bool {
        self.compiled_from_source
    }

    /// Whether the module exports `_initialize` (called before a process's first message).
    pub fn has_initialize(&self) -> bool {
        matches!(self.kind, ModuleKind::Own { has_initialize: true, .. })
    }

    /// The aos format when the module is one of AO's emscripten modules (its messages and
    /// environment are then the compute unit's JSON, `protocol::cu_json`), `None` for the worker's
    /// own format.
    pub fn aos_format(&self) -> Option<aos::AosFormat> {
        match &self.kind {
            ModuleKind::Aos(m) => Some(m.profile().format),
            ModuleKind::Own { .. } => None,
        }
    }

    /// Whether the module imports `ao_gpu` (its evaluations may hold device memory).
    pub fn uses_gpu(&self) -> bool {
        match &self.kind {
            ModuleKind::Own { pre, .. } => pre.module().imports().any(|i| i.module() == "ao_gpu"),
            ModuleKind::Aos(_) => false,
        }
    }

    /// The `Module-Format` the module runs as.
    pub fn format(&self) -> &'static str {
        self.aos_format().map_or(MODULE_FORMAT, aos::AosFormat::name)
    }
}

impl std::fmt::Debug for ActorModule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ActorModule")
            .field("sha256", &hex::encode(self.sha256))
            .field("format", &self.format())
            .field("has_initialize", &self.has_initialize())
            .field("compiled_from_source", &self.compiled_from_source)
            .finish()
    }
}

/// One message to evaluate.
#[derive(Debug, Clone, Copy)]
pub struct EvalInput<'a> {
    /// The message JSON of docs/abi.md.
    pub msg_json: &'a str,
    /// The environment JSON (`{"Process":…,"Module":…}`).
    pub env_json: &'a str,
    /// The message's `Timestamp`: every WASI clock reads it.
    pub timestamp_ms: u64,
    /// Seeds `random_get`.
    pub message_id: &'a str,
    /// From [`Runtime::limits`]; capped again by the config maxima.
    pub limits: Limits,
}

/// The outcome of one evaluation.
#[derive(Debug, Clone, PartialEq)]
pub struct Evaluation {
    /// The `response` object on success.
    pub outcome: Result<serde_json::Value, EvalError>,
    /// The new state (the whole linear memory), only on success.
    pub memory: Option<Vec<u8>>,
    /// The sha256 (hex) of `memory` when the runtime computed it (aos modules); callers hash
    /// `memory` themselves otherwise.
    pub state_hash: Option<String>,
    /// Fuel consumed, the same for the same message in the same state.
    pub gas_used: u64,
    /// Captured stdout and stderr, at most [`LOG_CAP`] bytes plus a truncation note.
    pub log: String,
    /// The pool index of the device `ao_gpu` ran on (see [`Runtime::tensor_backend`]'s `devices`).
    pub device: usize,
    /// One leaf per `ao_gpu` host call, in order (empty for aos modules, which make none).
    pub trace: Trace,
}

/// Which tensor backend `ao_gpu` runs on, for logs and attestations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorBackendInfo {
    pub kind: BackendKind,
    /// The backend's own description, such as "wgpu (llvmpipe, vulkan)"; with several devices,
    /// "2 devices: " and each device's description.
    pub description: String,
    pub determinism: Determinism,
    /// Every device of the pool, by pool index (one for a runtime made by `with_gpu`).
    pub devices: Vec<DeviceInfo>,
}

impl TensorBackendInfo {
    fn of(pool: &DevicePool) -> Self {
        let devices = pool.infos();
        let description = match devices.as_slice() {
            [one] => one.description.clone(),
            many => {
                let list: Vec<&str> = many.iter().map(|d| d.description.as_str()).collect();
                format!("{} devices: {}", many.len(), list.join("; "))
            }
        };
        Self { kind: pool.kind(), description, determinism: pool.determinism(), devices }
    }
}

/// The `ao_gpu` settings of a runtime serving every device of a [`DevicePool`].
#[derive(Clone)]
pub struct PoolConfig {
    pub pool: Arc<DevicePool>,
    /// Cap on the bytes of live tensors per evaluation (beyond: `QUOTA_EXCEEDED`).
    pub max_device_memory: u64,
    /// Where constants (`constant`) come from: the runtime keeps one [`ConstantCache`] per
    /// device, all fed by this source and sharing one [`ConstantMetrics`]. `None`: `constant`
    /// answers `UNSUPPORTED`.
    pub constant_source: Option<Arc<dyn ConstantSource>>,
    /// Cap on the bytes of cached constants, per device.
    pub max_constant_memory: u64,
}

impl std::fmt::Debug for PoolConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PoolConfig")
            .field("pool", &self.pool)
            .field("max_device_memory", &self.max_device_memory)
            .field("constants", &self.constant_source.is_some())
            .field("max_constant_memory", &self.max_constant_memory)
            .finish()
    }
}

/// Loaded modules by (sha256 of the wasm, `Module-Format`).
type ModuleMap = HashMap<([u8; 32], &'static str), Arc<ActorModule>>;

/// The engine, the linker's pre-instantiated modules and the caches. Share it behind an `Arc`.
pub struct Runtime {
    engine: Engine,
    linker: Linker<HostState>,
    cfg: RuntimeConfig,
    pool: Arc<DevicePool>,
    /// One per device of the pool, by pool index: its backend, the quota and its constant cache.
    gpu: Vec<gpu::GpuEnv>,
    max_device_memory: u64,
    constant_metrics: Option<ConstantMetrics>,
    backend_info: TensorBackendInfo,
    disk: DiskCache,
    modules: Mutex<ModuleMap>,
    /// The engine of aos modules, made on the first one loaded.
    aos: std::sync::OnceLock<Result<aos::AosEngine, String>>,
    live: live::LiveProcesses,
    aos_settings: AosSettings,
    deadline_ticks: u64,
    /// A test's injected fault (`fault`); always `None` in a release build.
    fault: Mutex<Option<fault::Fault>>,
    /// `wasi_ephemeral_nn`: the named models and those loaded on each device.
    nn: Arc<nn::models::NnEnv>,
    /// Dropping it stops the epoch ticker.
    _ticker: mpsc::Sender<()>,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("cfg", &self.cfg)
            .field("tensor_backend", &self.backend_info)
            .field("max_device_memory", &self.max_device_memory)
            .field("constants", &self.gpu.iter().map(|g| &g.constants).collect::<Vec<_>>())
            .field("disk", &self.disk)
            .finish_non_exhaustive()
    }
}

impl Runtime {
    /// A runtime whose `ao_gpu` imports run on a fresh CPU backend (reproducible mode), with the
    /// default device-memory quota.
    pub fn new(cfg: RuntimeConfig) -> Result<Self, RuntimeError> {
        Self::with_gpu(cfg, GpuConfig::default())
    }

    /// A runtime whose `ao_gpu` imports run on `gpu.backend` (or a fresh CPU backend when `None`;
    /// [`Runtime::tensor_backend`] says which, there is never a silent fallback).
    pub fn with_gpu(cfg: RuntimeConfig, gpu: GpuConfig) -> Result<Self, RuntimeError> {
        let backend = match (gpu.backend, &gpu.constants) {
            (Some(b), Some(c)) if !Arc::ptr_eq(&b, c.backend()) => {
                return Err(RuntimeError::Setup("the constant cache was made for another tensor backend".to_owned()));
            }
            (Some(b), _) => b,
            (None, Some(c)) => c.backend().clone(),
            (None, None) => Arc::new(Mutex::new(Backend::Cpu(crate::gpu::cpu::CpuBackend::new(Determinism::Reproducible)))),
        };
        let pool = DevicePool::from_shared(vec![backend]).map_err(|e| RuntimeError::Setup(format!("tensor device: {e}")))?;
        let metrics = gpu.constants.as_ref().map(|c| c.metrics().clone());
        Self::build(cfg, Arc::new(pool), gpu.max_device_memory, vec![gpu.constants], metrics)
    }

    /// A runtime whose `ao_gpu` imports run on every device of `gpu.pool`, each evaluation on the
    /// device placement picks for it (see the module doc).
    pub fn with_pool(cfg: RuntimeConfig, gpu: PoolConfig) -> Result<Self, RuntimeError> {
        let metrics = ConstantMetrics::default();
        let mut caches = Vec::with_capacity(gpu.pool.len());
        for index in 0..gpu.pool.len() {
            let backend = gpu.pool.backend(index).ok_or_else(|| RuntimeError::Setup(format!("tensor device {index} is missing")))?;
            caches.push(
                gpu.constant_source
                    .as_ref()
                    .map(|source| ConstantCache::with_metrics(backend.clone(), source.clone(), gpu.max_constant_memory, metrics.clone())),
            );
        }
        let metrics = gpu.constant_source.is_some().then_some(metrics);
        Self::build(cfg, gpu.pool, gpu.max_device_memory, caches, metrics)
    }

    /// `caches[i]` is device `i`'s constant cache.
    fn build(
        cfg: RuntimeConfig,
        pool: Arc<DevicePool>,
        max_device_memory: u64,
        caches: Vec<Option<Arc<ConstantCache>>>,
        constant_metrics: Option<ConstantMetrics>,
    ) -> Result<Self, RuntimeError> {
        if cfg.max_memory == 0 || cfg.max_compute == 0 || cfg.deadline.is_zero() {
            return Err(RuntimeError::Setup(format!(
                "max_memory ({}), max_compute ({}) and deadline ({:?}) must all be positive",
                cfg.max_memory, cfg.max_compute, cfg.deadline
            )));
        }
        if caches.len() != pool.len() {
            return Err(RuntimeError::Setup(format!("{} constant caches for {} tensor devices", caches.len(), pool.len())));
        }
        let mut gpu = Vec::with_capacity(pool.len());
        for (index, constants) in caches.into_iter().enumerate() {
            let backend = pool.backend(index).ok_or_else(|| RuntimeError::Setup(format!("tensor device {index} is missing")))?;
            if constants.as_ref().is_some_and(|c| !Arc::ptr_eq(c.backend(), backend)) {
                return Err(RuntimeError::Setup(format!("the constant cache of tensor device {index} was made for another device")));
            }
            gpu.push(gpu::GpuEnv { backend: backend.clone(), max_device_memory, constants });
        }
        let mut config = Config::new();
        config
            .consume_fuel(true)
            .epoch_interruption(true)
            .cranelift_nan_canonicalization(true)
            .relaxed_simd_deterministic(true)
            // State is memory 0 only; a second memory would silently lose its contents.
            .wasm_multi_memory(false);
        let engine = Engine::new(&config).map_err(|e| RuntimeError::Setup(format!("engine: {e:#}")))?;
        let mut linker = Linker::new(&engine);
        host::add_to_linker(&mut linker).map_err(|e| RuntimeError::Setup(format!("linker: {e:#}")))?;
        let backend_info = TensorBackendInfo::of(&pool);
        tracing::info!(
            backend = %backend_info.description,
            kind = %backend_info.kind,
            devices = backend_info.devices.len(),
            determinism = ?backend_info.determinism,
            max_device_memory,
            max_constant_memory = gpu.first().and_then(|g| g.constants.as_ref()).map(|c| c.max_bytes()),
            "ao_gpu tensor backend"
        );
        let disk = DiskCache::open(&cfg.cache_dir, &engine)?;
        let ticker = epoch::start_ticker(&engine, "wasm-epoch").map_err(RuntimeError::Setup)?;
        let deadline_ticks = epoch::ticks(cfg.deadline);
        Ok(Self {
            engine,
            linker,
            cfg,
            pool,
            gpu,
            max_device_memory,
            constant_metrics,
            backend_info,
            disk,
            modules: Mutex::new(HashMap::new()),
            aos: std::sync::OnceLock::new(),
            live: live::LiveProcesses::new(AosSettings::default()),
            aos_settings: AosSettings::default(),
            deadline_ticks,
            fault: Mutex::new(None),
            nn: Arc::new(nn::models::NnEnv::default()),
            _ticker: ticker,
        })
    }

    /// The models `wasi_ephemeral_nn`'s `load_by_name` serves (config `[models]`); none until
    /// set. Set it before the first evaluation.
    pub fn with_models(mut self, registry: ModelRegistry) -> Self {
        self.nn = Arc::new(nn::models::NnEnv::new(registry));
        self
    }

    pub fn config(&self) -> &RuntimeConfig {
        &self.cfg
    }

    /// How aos processes are kept live (config `[aos]`); [`AosSettings::default`] until set.
    /// Set it before the first evaluation: live instances made earlier are dropped.
    pub fn with_aos_settings(mut self, settings: AosSettings) -> Self {
        self.live = live::LiveProcesses::new(settings);
        self.aos_settings = settings;
        self
    }

    /// The backend `ao_gpu` runs on (kind, description, determinism mode, devices): what
    /// attestations record, with [`Evaluation::device`].
    pub fn tensor_backend(&self) -> &TensorBackendInfo {
        &self.backend_info
    }

    /// The devices evaluations are placed on, with their load.
    pub fn pool(&self) -> &Arc<DevicePool> {
        &self.pool
    }

    /// The device-memory quota of one evaluation, in bytes.
    pub fn max_device_memory(&self) -> u64 {
        self.max_device_memory
    }

    /// The cache of constants loaded by content on device 0, when the runtime has one.
    pub fn constants(&self) -> Option<&Arc<ConstantCache>> {
        self.constants_on(0)
    }

    /// The cache of constants of device `index` (pool index), when the runtime has one.
    pub fn constants_on(&self, index: usize) -> Option<&Arc<ConstantCache>> {
        self.gpu.get(index).and_then(|g| g.constants.as_ref())
    }

    /// The metrics of the constant caches (shared by every device's cache), to register.
    pub fn constant_metrics(&self) -> Option<&ConstantMetrics> {
        self.constant_metrics.as_ref()
    }

    /// Validates `Module-Format` / `Input-Encoding` / `Output-Encoding`, then compiles the module
    /// (or loads it from memory or the disk cache) and checks its exports and imports. The worker's
    /// own format runs on the JSON-1 ABI (docs/abi.md); AO's emscripten formats run on the aos
    /// runtime ([`aos`]).
    pub fn load(&self, module_bytes: &[u8], module_tags: &[Tag]) -> Result<Arc<ActorModule>, RuntimeError> {
        let format = check_tags(module_tags)?;
        let sha256: [u8; 32] = Sha256::digest(module_bytes).into();
        let key = (sha256, format.map_or(MODULE_FORMAT, aos::AosFormat::name));
        if let Some(m) = self.lock_modules().get(&key) {
            return Ok(m.clone());
        }
        let loaded = match format {
            Some(format) => self.load_aos(module_bytes, format, sha256)?,
            None => self.load_own(module_bytes, sha256)?,
        };
        Ok(self.lock_modules().entry(key).or_insert(Arc::new(loaded)).clone())
    }

    fn load_own(&self, module_bytes: &[u8], sha256: [u8; 32]) -> Result<ActorModule, RuntimeError> {
        let (module, compiled_from_source) = match self.disk.load(&self.engine, &sha256) {
            Some(m) => (m, false),
            None => (Module::from_binary(&self.engine, module_bytes).map_err(|e| RuntimeError::Invalid(format!("{e:#}")))?, true),
        };
        let has_initialize = abi::check_exports(&module)?;
        abi::check_imports(&module)?;
        if compiled_from_source {
            self.disk.store(&module, &sha256);
        }
        let pre = self.linker.instantiate_pre(&module).map_err(|e| RuntimeError::Invalid(format!("link: {e:#}")))?;
        Ok(ActorModule { sha256, kind: ModuleKind::Own { pre, has_initialize }, compiled_from_source })
    }

    fn load_aos(&self, module_bytes: &[u8], format: aos::AosFormat, sha256: [u8; 32]) -> Result<ActorModule, RuntimeError> {
        let engine = self
            .aos
            .get_or_init(|| {
                let options = aos::AosEngineOptions { heap_spectre_mitigation: self.aos_settings.heap_spectre_mitigation };
                aos::AosEngine::with_options(Some(self.cfg.cache_dir.clone()), options).map_err(|e| e.to_string())
            })
            .as_ref()
            .map_err(|e| RuntimeError::Setup(format!("aos engine: {e}")))?;
        let module = engine.load(module_bytes, format).map_err(|e| match e {
            aos::AosError::Unsupported(why) => RuntimeError::Unsupported(why),
            aos::AosError::Cache(why) => RuntimeError::Cache(why),
            aos::AosError::Setup(why) => RuntimeError::Setup(why),
            other => RuntimeError::Invalid(other.to_string()),
        })?;
        let compiled_from_source = module.compiled_from_source();
        Ok(ActorModule { sha256, kind: ModuleKind::Aos(module), compiled_from_source })
    }

    /// `Memory-Limit` / `Compute-Limit` from the module's tags, overridden by the process's (which
    /// may not exceed the module's), capped by the config maxima; a missing tag means the maximum.
    pub fn limits(&self, module_tags: &[Tag], process_tags: &[Tag]) -> Result<Limits, RuntimeError> {
        limits::resolve(module_tags, process_tags, self.max_limits())
    }

    /// The runtime with a test's injected fault (`fault`): refused (an error) in release builds.
    pub fn with_fault(self, fault: Option<fault::Fault>) -> Result<Self, RuntimeError> {
        self.inject_fault(fault)?;
        Ok(self)
    }

    /// Sets (or with `None` clears) a test's injected fault for the evaluations that start after;
    /// refused (an error) in release builds.
    pub fn inject_fault(&self, fault: Option<fault::Fault>) -> Result<(), RuntimeError> {
        if fault.is_some() && !cfg!(debug_assertions) {
            return Err(RuntimeError::Setup("fault injection exists only in test and debug builds".into()));
        }
        *crate::sync::lock(&self.fault) = fault;
        Ok(())
    }

    /// The injected fault that applies to an evaluation of `message` on this runtime's backend.
    fn fault_for(&self, message: &str) -> Option<fault::Fault> {
        crate::sync::lock(&self.fault).as_ref().filter(|f| f.applies(message, self.backend_info.kind)).cloned()
    }

    /// The memory after `message`, with a byte flipped when a test's `state` fault names it.
    #[cfg(debug_assertions)]
    fn inject_state_fault(&self, message: &str, mut memory: Vec<u8>) -> Vec<u8> {
        if self.fault_for(message).is_some_and(|f| f.at == fault::FaultAt::State) {
            tracing::warn!(message, "injected fault: the state after this message is wrong");
            let at = memory.len() / 2;
            if let Some(b) = memory.get_mut(at) {
                *b ^= 0x01;
            }
        }
        memory
    }

    /// One evaluation of one message against `state` (`None`: the process's first message).
    pub fn evaluate(&self, module: &ActorModule, state: Option<&[u8]>, input: &EvalInput<'_>) -> Evaluation {
        if let ModuleKind::Aos(aos_module) = &module.kind {
            let restore = Restore { image: state.map(<[u8]>::to_vec), image_hash: None, replay: Vec::new() };
            return live::evaluate_once(aos_module, restore, input, self.cfg.deadline);
        }
        let max = self.max_limits();
        let limits =
            Limits { memory_bytes: input.limits.memory_bytes.min(max.memory_bytes), compute: input.limits.compute.min(max.compute) };
        // The device for the whole evaluation; the lease outlives the store, whose drop frees the
        // evaluation's tensors there.
        let lease = self.pool.place();
        let device = lease.index();
        let Some(env) = self.gpu.get(device) else {
            // `build` made one environment per device: unreachable, but never a panic.
            let e = EvalError::Trap(format!("worker bug: tensor device {device} has no environment"));
            return Evaluation {
                outcome: Err(e),
                memory: None,
                state_hash: None,
                gas_used: 0,
                log: String::new(),
                device,
                trace: Trace::default(),
            };
        };
        tracing::debug!(device, kind = %self.backend_info.kind, msg = input.message_id, "evaluation placed");
        let mut store = Store::new(
            &self.engine,
            HostState {
                limiter: StoreLimiter::new(limits.memory_bytes),
                wasi: wasi::WasiCtx::new(input.timestamp_ms, input.message_id),
                gpu: gpu::GpuCtx::for_evaluation(env, self.cfg.deadline, self.fault_for(input.message_id)),
                nn: nn::NnCtx::for_evaluation(self.nn.clone(), env.backend.clone(), device, self.cfg.deadline, input.env_json),
            },
        );
        store.limiter(|s| &mut s.limiter);
        store.set_epoch_deadline(self.deadline_ticks);
        let outcome = match store.set_fuel(limits.compute) {
            Err(e) => Err(EvalError::Trap(format!("cannot set fuel: {e}"))),
            Ok(()) => {
                std::panic::catch_unwind(AssertUnwindSafe(|| abi::evaluate(&mut store, module, state, input, limits, self.cfg.deadline)))
                    .unwrap_or_else(|panic| Err(EvalError::Trap(format!("worker bug: host panicked: {}", panic_text(&panic)))))
            }
        };
        let gas_used = abi::fuel_used(&store, limits.compute);
        // A call that could not complete for a reason outside the actor makes the whole
        // evaluation unavailable, whatever the guest did after it.
        let outcome = match store.data().gpu.unavailable() {
            Some(reason) => Err(EvalError::Unavailable(reason.to_owned())),
            None => outcome,
        };
        // Tensors die with the evaluation, whatever its outcome.
        store.data_mut().gpu.release();
        store.data_mut().nn.release();
        let log = store.data_mut().wasi.take_log();
        let trace = store.data_mut().gpu.take_trace();
        drop(store);
        drop(lease);
        match outcome {
            Ok((response, memory)) => {
                #[cfg(debug_assertions)]
                let memory = self.inject_state_fault(input.message_id, memory);
                Evaluation { outcome: Ok(response), memory: Some(memory), state_hash: None, gas_used, log, device, trace }
            }
            Err(e) => Evaluation { outcome: Err(e), memory: None, state_hash: None, gas_used, log, device, trace },
        }
    }

    /// One evaluation of a message of the served process `process`. aos processes keep a live
    /// instance between messages (see [`live`]): the state is rebuilt through `state.load` only
    /// when no live instance holds `state.hash`; at a `checkpoint` the memory image comes back
    /// (between checkpoints the state is a chained commitment and `memory` is `None`). The
    /// worker's own format reads its state image every time and returns it on every success.
    pub fn evaluate_process(
        &self,
        process: &str,
        module: &ActorModule,
        state: &StateRef<'_>,
        input: &EvalInput<'_>,
        checkpoint: bool,
    ) -> Evaluation {
        match &module.kind {
            ModuleKind::Aos(aos_module) => self.live.evaluate(process, aos_module, state, input, self.cfg.deadline, checkpoint),
            ModuleKind::Own { .. } => match (state.load)() {
                Ok(restore) => self.evaluate_restored(module, restore, input),
                Err(e) => unavailable(format!("cannot read the state: {e}")),
            },
        }
    }

    /// One evaluation against a rebuilt state, nothing kept (dry-runs).
    pub fn evaluate_restored(&self, module: &ActorModule, restore: Restore, input: &EvalInput<'_>) -> Evaluation {
        match &module.kind {
            ModuleKind::Aos(aos_module) => live::evaluate_once(aos_module, restore, input, self.cfg.deadline),
            ModuleKind::Own { .. } if !restore.replay.is_empty() => {
                unavailable(format!("worker bug: {} messages to replay for a module in the worker's own format", restore.replay.len()))
            }
            ModuleKind::Own { .. } => self.evaluate(module, restore.image.as_deref(), input),
        }
    }

    /// The memory of the state `restore` rebuilds (the stored image for the worker's own format;
    /// for aos the checkpoint with the messages since replayed, checked against `expected`).
    pub fn state_image(
        &self,
        module: &ActorModule,
        restore: Restore,
        expected: Option<&str>,
        env_json: &str,
        limits: Limits,
    ) -> Result<Option<Vec<u8>>, EvalError> {
        match &module.kind {
            ModuleKind::Aos(m) if restore.image.is_some() || !restore.replay.is_empty() => {
                live::state_image(m, restore, expected, env_json, limits, self.cfg.deadline).map(Some)
            }
            _ => Ok(restore.image),
        }
    }

    /// How many aos processes hold a live instance.
    pub fn live_processes(&self) -> usize {
        self.live.len()
    }

    fn max_limits(&self) -> Limits {
        Limits { memory_bytes: self.cfg.max_memory, compute: self.cfg.max_compute }
    }

    fn lock_modules(&self) -> std::sync::MutexGuard<'_, ModuleMap> {
        // The map holds no invariant a panicking holder could break.
        crate::sync::lock(&self.modules)
    }
}

/// The module's format: `None` for the worker's own, else the aos format.
fn check_tags(tags: &[Tag]) -> Result<Option<aos::AosFormat>, RuntimeError> {
    let format = limits::first_tag(tags, "Module-Format").unwrap_or("");
    let aos_format = match format {
        MODULE_FORMAT => None,
        other => Some(other.parse::<aos::AosFormat>().map_err(|_| RuntimeError::UnsupportedFormat(other.to_owned()))?),
    };
    for tag in ["Input-Encoding", "Output-Encoding"] {
        if let Some(value) = limits::first_tag(tags, tag)
            && value != JSON_1
        {
            return Err(RuntimeError::UnsupportedEncoding { tag, value: value.to_owned() });
        }
    }
    Ok(aos_format)
}

fn unavailable(reason: String) -> Evaluation {
    Evaluation {
        outcome: Err(EvalError::Unavailable(reason)),
        memory: None,
        state_hash: None,
        gas_used: 0,
        log: String::new(),
        device: 0,
        trace: Trace::default(),
    }
}

fn panic_text(panic: &(dyn std::any::Any + Send)) -> &str {
    panic.downcast_ref::<&str>().copied().or_else(|| panic.downcast_ref::<String>().map(String::as_str)).unwrap_or("(no message)")
}

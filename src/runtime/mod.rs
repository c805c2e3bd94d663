//! The actor runtime: wasmtime engine, module cache, limits and one evaluation per message, for
//! modules following docs/abi.md (`Module-Format: wasm32-unknown-ao-gpu-worker`, JSON-1).
//!
//! Architecture invariant: this is the only module of the crate that names wasmtime; the rest of
//! the worker sees tags, bytes, JSON and the types below.
//!
//! ```text
//! Runtime::new(RuntimeConfig { cache_dir, max_memory, max_compute, deadline }) -> Result<Runtime, RuntimeError>
//! Runtime::with_gpu(cfg, GpuConfig { backend: Option<SharedBackend>, max_device_memory }) -> Result<Runtime, RuntimeError>
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
//! - Nothing a module does can panic the worker: every pointer is bounds-checked and every failure
//!   is an [`EvalError`]; a host bug that panics anyway is caught and reported as a trap.

mod abi;
mod cache;
mod gpu;
pub mod limits;
mod wasi;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha2::{Digest, Sha256};
use wasmtime::{Config, Engine, InstancePre, Linker, Module, Store};

pub use gpu::{
    BYTES_PER_GAS, DEFAULT_MAX_DEVICE_MEMORY, FLOPS_PER_GAS, FUNCTIONS as GPU_FUNCTIONS, GAS_PER_CALL, GpuConfig, GpuStatus, MAX_HANDLES,
    SharedBackend,
};
pub use limits::{COMPUTE_LIMIT_TAG, Limits, MEMORY_LIMIT_TAG, parse_compute_limit, parse_memory_limit};
pub use wasi::LOG_CAP;

use crate::gpu::{Backend, BackendKind, Determinism};
use crate::protocol::Tag;
use abi::HostState;
use cache::DiskCache;
use limits::StoreLimiter;

/// The only module format the runtime runs.
pub const MODULE_FORMAT: &str = "wasm32-unknown-ao-gpu-worker";
/// The only input and output encoding.
pub const JSON_1: &str = "JSON-1";
/// How often the epoch advances; deadlines are rounded up to whole ticks, plus one.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);

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
    #[error("runtime setup: {0}")]
    Setup(String),
}

fn unsupported_format(format: &str) -> String {
    if format.is_empty() {
        format!("module has no Module-Format tag; the worker runs {MODULE_FORMAT}")
    } else {
        format!("unsupported module format {format:?}; the worker runs {MODULE_FORMAT}")
    }
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
}

/// A loaded module, ready to instantiate. Cheap to share between evaluations and threads.
pub struct ActorModule {
    sha256: [u8; 32],
    pre: InstancePre<HostState>,
    has_initialize: bool,
    compiled_from_source: bool,
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
        self.has_initialize
    }
}

impl std::fmt::Debug for ActorModule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ActorModule")
            .field("sha256", &hex::encode(self.sha256))
            .field("has_initialize", &self.has_initialize)
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
    /// Fuel consumed, the same for the same message in the same state.
    pub gas_used: u64,
    /// Captured stdout and stderr, at most [`LOG_CAP`] bytes plus a truncation note.
    pub log: String,
}

/// Which tensor backend `ao_gpu` runs on, for logs and attestations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorBackendInfo {
    pub kind: BackendKind,
    /// The backend's own description, such as "wgpu (llvmpipe, vulkan)".
    pub description: String,
    pub determinism: Determinism,
}

/// The engine, the linker's pre-instantiated modules and the caches. Share it behind an `Arc`.
pub struct Runtime {
    engine: Engine,
    linker: Linker<HostState>,
    cfg: RuntimeConfig,
    backend: SharedBackend,
    backend_info: TensorBackendInfo,
    max_device_memory: u64,
    disk: DiskCache,
    modules: Mutex<HashMap<[u8; 32], Arc<ActorModule>>>,
    deadline_ticks: u64,
    /// Dropping it stops the epoch ticker.
    _ticker: mpsc::Sender<()>,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("cfg", &self.cfg)
            .field("tensor_backend", &self.backend_info)
            .field("max_device_memory", &self.max_device_memory)
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
        if cfg.max_memory == 0 || cfg.max_compute == 0 || cfg.deadline.is_zero() {
            return Err(RuntimeError::Setup(format!(
                "max_memory ({}), max_compute ({}) and deadline ({:?}) must all be positive",
                cfg.max_memory, cfg.max_compute, cfg.deadline
            )));
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
        wasi::add_to_linker(&mut linker, abi::wasi_ctx).map_err(|e| RuntimeError::Setup(format!("linker: {e:#}")))?;
        gpu::add_to_linker(&mut linker, abi::gpu_ctx).map_err(|e| RuntimeError::Setup(format!("linker: {e:#}")))?;
        let backend =
            gpu.backend.unwrap_or_else(|| Arc::new(Mutex::new(Backend::Cpu(crate::gpu::cpu::CpuBackend::new(Determinism::Reproducible)))));
        let backend_info = {
            let b = backend.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            TensorBackendInfo { kind: b.kind(), description: b.describe(), determinism: b.determinism() }
        };
        tracing::info!(backend = %backend_info.description, determinism = ?backend_info.determinism, max_device_memory = gpu.max_device_memory, "ao_gpu tensor backend");
        let disk = DiskCache::open(&cfg.cache_dir, &engine)?;
        let ticker = start_ticker(&engine)?;
        let deadline_ticks = cfg.deadline.as_nanos().div_ceil(EPOCH_TICK.as_nanos()) as u64 + 1;
        Ok(Self {
            engine,
            linker,
            cfg,
            backend,
            backend_info,
            max_device_memory: gpu.max_device_memory,
            disk,
            modules: Mutex::new(HashMap::new()),
            deadline_ticks,
            _ticker: ticker,
        })
    }

    pub fn config(&self) -> &RuntimeConfig {
        &self.cfg
    }

    /// The backend `ao_gpu` runs on (kind, description, determinism mode): what attestations record.
    pub fn tensor_backend(&self) -> &TensorBackendInfo {
        &self.backend_info
    }

    /// The device-memory quota of one evaluation, in bytes.
    pub fn max_device_memory(&self) -> u64 {
        self.max_device_memory
    }

    /// Validates `Module-Format` / `Input-Encoding` / `Output-Encoding`, then compiles the module
    /// (or loads it from memory or the disk cache) and checks its exports and imports.
    pub fn load(&self, module_bytes: &[u8], module_tags: &[Tag]) -> Result<Arc<ActorModule>, RuntimeError> {
        check_tags(module_tags)?;
        let sha256: [u8; 32] = Sha256::digest(module_bytes).into();
        if let Some(m) = self.lock_modules().get(&sha256) {
            return Ok(m.clone());
        }
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
        let loaded = Arc::new(ActorModule { sha256, pre, has_initialize, compiled_from_source });
        Ok(self.lock_modules().entry(sha256).or_insert(loaded).clone())
    }

    /// `Memory-Limit` / `Compute-Limit` from the module's tags, overridden by the process's (which
    /// may not exceed the module's), capped by the config maxima; a missing tag means the maximum.
    pub fn limits(&self, module_tags: &[Tag], process_tags: &[Tag]) -> Result<Limits, RuntimeError> {
        limits::resolve(module_tags, process_tags, self.max_limits())
    }

    /// One evaluation of one message against `state` (`None`: the process's first message).
    pub fn evaluate(&self, module: &ActorModule, state: Option<&[u8]>, input: &EvalInput<'_>) -> Evaluation {
        let max = self.max_limits();
        let limits =
            Limits { memory_bytes: input.limits.memory_bytes.min(max.memory_bytes), compute: input.limits.compute.min(max.compute) };
        let mut store = Store::new(
            &self.engine,
            HostState {
                limiter: StoreLimiter::new(limits.memory_bytes),
                wasi: wasi::WasiCtx::new(input.timestamp_ms, input.message_id),
                gpu: gpu::GpuCtx::new(self.backend.clone(), self.max_device_memory),
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
        // Tensors die with the evaluation, whatever its outcome.
        store.data_mut().gpu.release();
        let log = store.data_mut().wasi.take_log();
        match outcome {
            Ok((response, memory)) => Evaluation { outcome: Ok(response), memory: Some(memory), gas_used, log },
            Err(e) => Evaluation { outcome: Err(e), memory: None, gas_used, log },
        }
    }

    fn max_limits(&self) -> Limits {
        Limits { memory_bytes: self.cfg.max_memory, compute: self.cfg.max_compute }
    }

    fn lock_modules(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], Arc<ActorModule>>> {
        // The map holds no invariant a panicking holder could break.
        self.modules.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

fn check_tags(tags: &[Tag]) -> Result<(), RuntimeError> {
    let format = limits::first_tag(tags, "Module-Format").unwrap_or("");
    if format != MODULE_FORMAT {
        return Err(RuntimeError::UnsupportedFormat(format.to_owned()));
    }
    for tag in ["Input-Encoding", "Output-Encoding"] {
        if let Some(value) = limits::first_tag(tags, tag)
            && value != JSON_1
        {
            return Err(RuntimeError::UnsupportedEncoding { tag, value: value.to_owned() });
        }
    }
    Ok(())
}

/// A thread that advances the engine's epoch every [`EPOCH_TICK`] until the returned sender is
/// dropped (or the engine is gone).
fn start_ticker(engine: &Engine) -> Result<mpsc::Sender<()>, RuntimeError> {
    let (tx, rx) = mpsc::channel::<()>();
    let weak = engine.weak();
    std::thread::Builder::new()
        .name("wasm-epoch".to_owned())
        .spawn(move || {
            while let Err(RecvTimeoutError::Timeout) = rx.recv_timeout(EPOCH_TICK) {
                match weak.upgrade() {
                    Some(engine) => engine.increment_epoch(),
                    None => break,
                }
            }
        })
        .map_err(|e| RuntimeError::Setup(format!("cannot start the epoch thread: {e}")))?;
    Ok(tx)
}

fn panic_text(panic: &(dyn std::any::Any + Send)) -> &str {
    panic.downcast_ref::<&str>().copied().or_else(|| panic.downcast_ref::<String>().map(String::as_str)).unwrap_or("(no message)")
}

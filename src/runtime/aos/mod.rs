//! The aos runtime: AO's own emscripten Lua processes (aos 1.x/2.0 and anything built with the
//! same glues), run in wasmtime bit-exactly like `@permaweb/ao-loader` 0.0.49 — same `Output`,
//! `Messages`, `Error`, `GasUsed` and the same SHA-256 of the whole linear memory.
//!
//! ```text
//! AosEngine::new(cache_dir: Option<PathBuf>) -> Result<AosEngine, AosError>
//! AosEngine::with_options(cache_dir, AosEngineOptions { heap_spectre_mitigation }) -> Result<AosEngine, AosError>
//! AosEngine::load(&self, wasm: &[u8], format: AosFormat) -> Result<Arc<AosModule>, AosError>
//! AosModule::instantiate(&self, memory: Option<&[u8]>, opts: &InstanceOptions) -> Result<AosInstance, AosError>
//! AosInstance::handle(&mut self, msg_json: &str, env_json: &str) -> Result<HandleOutcome, AosError>
//! AosInstance::{memory, memory_len, memory_sha256, restore}
//! AosProcess::new(module, opts) / with_memory(module, memory, opts); AosProcess::handle(msg, env) -> Result<HandleOutcome, AosError>
//! ```
//!
//! - Formats: the seven `Module-Format`s of the CU allow-list parse ([`AosFormat`]); E1
//!   (`wasm32-unknown-emscripten`, minified names), E2 (`wasm32-unknown-emscripten2`), E4
//!   (`…emscripten4`) and W64 (`wasm64-unknown-emscripten-draft_2024_02_15`) run bit-exactly, and
//!   so do the two `…-metering` formats: [`AosEngine::load`] instruments them with
//!   [`metering::meter_inline`] (the loader's charges, counted in exported globals; `GasUsed` equal
//!   to the loader's). E3 answers [`AosError::Unsupported`].
//! - Exactness rests on the host replaying the JS glue: the stack cookie, strings placed on the
//!   wasm stack as `ccall` does, a per-instance `Date.now` counter (10004, +1 per call), real
//!   Asyncify unwind/rewind (with the glue's 40 MiB buffer) for every WeaveDrive `open`, `invoke_*`
//!   through `dynCall_*`, and the E2 environment/argv/timezone allocations. The message and env
//!   JSON must be byte-identical to what the CU sends ([`json`] builds them in its key order).
//! - Errors: a Lua error is an `Ok` outcome with `error` set; a trap, `abort`, `exit`, out of gas or
//!   `ok:false` is an `Err` from [`AosInstance::handle`]; [`AosProcess`] turns both into the CU's
//!   `Error` result and rolls back (previous memory, fresh instance). A wall-clock deadline is
//!   [`AosError::Deadline`]: "could not compute", never a result. Nothing panics on module input.
//! - Deliberate differences from the loader (documented in docs/aos.md): `system()` never runs a
//!   command, no `/dev/urandom` or in-JS MEMFS (paths are ENOENT), UTC only, a per-instance clock,
//!   argv `./this.program`, NaN sign as on x86-64.

pub mod calendar;
mod engine;
pub mod format;
mod imports;
mod instance;
pub mod json;
pub mod metering;
mod process;
mod snapshot;
mod state;

#[cfg(test)]
mod tests;

pub use engine::{AosEngine, AosEngineOptions};
pub use format::{AosFormat, DateMode, Glue, Profile, StackAllocRule};
pub use imports::control::heap_growth_candidates;
pub use instance::{AosInstance, AosModule, DEFAULT_GAS_LIMIT, HandleOutcome, InstanceOptions};
pub use metering::MeterType;
pub use process::{AosProcess, NOT_ENOUGH_MEMORY, Rollback};
pub use state::{DATE_COUNTER_START, DEFAULT_ENV, EnvVars, GAS_LIMIT_GLOBAL, GAS_USED_GLOBAL};

/// Why a module cannot be loaded or a message could not be evaluated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AosError {
    #[error("unknown aos module format {0:?}; expected one of the CU formats (e.g. wasm32-unknown-emscripten4)")]
    UnknownFormat(String),
    #[error("unsupported: {0}")]
    Unsupported(String),
    #[error("module is not valid wasm: {0}")]
    Invalid(String),
    #[error(
        "module imports {module}.{name}, which the {format} glue does not provide; rebuild the module against that glue or pick its format"
    )]
    UnknownImport { module: String, name: String, format: &'static str },
    #[error("module imports {module}.{name} with the wrong shape: {detail}")]
    BadImport { module: String, name: String, detail: String },
    #[error("module does not export `{0}`, which the glue calls; was it built with emscripten for this format?")]
    MissingExport(&'static str),
    #[error("the {format} format meters the module at load, and that failed: {detail}")]
    Metering { format: &'static str, detail: String },
    #[error("aos engine setup: {0}")]
    Setup(String),
    #[error("module cache: {0}")]
    Cache(String),
    #[error("{tag} {value:?} is not a valid limit")]
    BadTag { tag: &'static str, value: String },
    #[error("restore: {0}")]
    Restore(String),
    #[error("{0}")]
    Trap(String),
    #[error("out of gas! (the compute limit is {limit})")]
    OutOfGas { limit: u64 },
    #[error("the process called exit({0})")]
    Exit(i32),
    /// `handle` answered `ok:false`; the text is its `response`.
    #[error("{0}")]
    Evaluation(String),
    #[error("invalid result: {0}")]
    BadResult(String),
    /// The wall-clock deadline passed: the message could not be computed (not a result).
    #[error("the evaluation did not finish before its deadline; it could not be computed (retry later)")]
    Deadline,
    /// A bug in the worker (a host function panicked): not a result; the message could not be computed.
    #[error("worker bug: {0}")]
    HostBug(String),
    #[error("this instance failed earlier and cannot be used again; instantiate a fresh one")]
    Poisoned,
}

impl AosError {
    /// True for the failures the CU records as an `Error` result of the message (deterministic),
    /// false for load failures, the deadline and host trouble.
    pub fn is_evaluation_error(&self) -> bool {
        matches!(self, AosError::Trap(_) | AosError::OutOfGas { .. } | AosError::Exit(_) | AosError::Evaluation(_) | AosError::BadResult(_))
    }
}

//! The aos engine: its own wasmtime `Engine` (memory64 on, NaN canonicalization off so `0/0`
//! prints `-nan` as on V8/x86-64, no fuel: gas is instrumented; epoch interruption for the
//! wall-clock deadline), the compiled-module cache (memory and disk), and `load`.
//!
//! Memory profile: wasmtime 48's defaults on 64-bit hosts, kept on purpose (docs/aos.md
//! "Performance"). A 4 GiB reservation plus 32 MiB of guard pages lets Cranelift drop every bounds
//! check of a wasm32 memory (E1–E4); a memory64 memory (W64) whose maximum fits the reservation
//! cannot move, so its bounds checks compare against a constant instead of loading the length.
//! Those checks carry a Spectre guard (a conditional move) unless
//! [`AosEngineOptions::heap_spectre_mitigation`] is turned off.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};
use wasmtime::{Config, Engine, ExternType, Linker, Module};

use super::format::{AosFormat, Glue};
use super::instance::AosModule;
use super::{AosError, imports, metering};
use crate::runtime::cache::DiskCache;

/// Loaded modules by (sha256 of the wasm, format).
type ModuleMap = HashMap<([u8; 32], AosFormat), Arc<AosModule>>;

/// Operator choices for the aos engine. [`Default`] is the safe profile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AosEngineOptions {
    /// Spectre hardening of the bounds-checked memory accesses (Cranelift's
    /// `enable_heap_access_spectre_mitigation`). Only memory64 modules (W64) have such checks;
    /// wasm32 modules rely on guard pages and compile the same either way. Default on: a worker
    /// runs code from many tenants in one process. Off saves ~9% of the instructions of a W64
    /// message (measured with callgrind, docs/aos.md) at the cost of that isolation.
    pub heap_spectre_mitigation: bool,
}

impl Default for AosEngineOptions {
    fn default() -> Self {
        Self { heap_spectre_mitigation: true }
    }
}

/// Compiles and caches aos modules. Cheap to share; one per worker.
pub struct AosEngine {
    engine: Engine,
    disk: Option<DiskCache>,
    modules: Mutex<ModuleMap>,
    _ticker: mpsc::Sender<()>,
}

impl std::fmt::Debug for AosEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AosEngine").field("disk_cache", &self.disk.is_some()).finish()
    }
}

impl AosEngine {
    /// A new engine with the default options; `cache_dir` keeps compiled modules across restarts
    /// (created when missing).
    pub fn new(cache_dir: Option<PathBuf>) -> Result<Self, AosError> {
        Self::with_options(cache_dir, AosEngineOptions::default())
    }

    /// A new engine with `options`. Compiles cached on disk are kept apart per option set (the
    /// file name carries the engine's compatibility hash).
    pub fn with_options(cache_dir: Option<PathBuf>, options: AosEngineOptions) -> Result<Self, AosError> {
        let mut config = Config::new();
        config
            .wasm_memory64(true)
            .cranelift_nan_canonicalization(false)
            .consume_fuel(false)
            .epoch_interruption(true)
            .wasm_multi_memory(false);
        if !options.heap_spectre_mitigation {
            // SAFETY: a Cranelift setting wasmtime 48 knows (`Engine::new` rejects unknown or
            // mistyped flags); turning it off only removes the conditional move that guards
            // speculative out-of-bounds loads, bounds checks still trap.
            unsafe {
                config.cranelift_flag_set("enable_heap_access_spectre_mitigation", "false");
            }
        }
        let engine = Engine::new(&config).map_err(|e| AosError::Setup(format!("engine: {e:#}")))?;
        let disk = match cache_dir {
            Some(dir) => Some(DiskCache::open(&dir, &engine).map_err(|e| AosError::Cache(e.to_string()))?),
            None => None,
        };
        let ticker = crate::runtime::epoch::start_ticker(&engine, "aos-epoch").map_err(AosError::Setup)?;
        Ok(Self { engine, disk, modules: Mutex::new(HashMap::new()), _ticker: ticker })
    }

    /// Compiles (or takes from the memory or disk cache) a module of `format`, checks that every
    /// import is a host function of the format's profile and that the exports the glue calls are
    /// there.
    pub fn load(&self, wasm: &[u8], format: AosFormat) -> Result<Arc<AosModule>, AosError> {
        let profile = format.profile();
        if !format.is_supported() {
            return Err(AosError::Unsupported(format!("{format}: its glue is not implemented yet (E1, E2, E4 and wasm64 are)")));
        }
        let sha256: [u8; 32] = Sha256::digest(wasm).into();
        if let Some(m) = self.lock().get(&(sha256, format)) {
            return Ok(m.clone());
        }
        // The `…-metering` formats compile the module instrumented by `metering::meter_inline` (the
        // loader's charges, counted in exported globals). Both caches key it by the original
        // sha256 and the format; the disk cache gets a key of its own so it never hands an
        // unmetered compile to a metering format or the reverse.
        let disk_key = disk_key(&sha256, format);
        let (module, compiled_from_source) = match self.disk.as_ref().and_then(|d| d.load(&self.engine, &disk_key)) {
            Some(m) => (m, false),
            None => {
                let metered;
                let source = match profile.needs_metering {
                    Some(ty) => {
                        metered = metering::meter_inline(wasm, ty)
                            .map_err(|e| AosError::Metering { format: format.name(), detail: e.to_string() })?;
                        &metered[..]
                    }
                    None => wasm,
                };
                (Module::from_binary(&self.engine, source).map_err(|e| AosError::Invalid(format!("{e:#}")))?, true)
            }
        };
        let mut linker = Linker::new(&self.engine);
        linker.allow_shadowing(true);
        imports::link(&mut linker, &module, profile)?;
        check_exports(&module, profile.glue)?;
        if compiled_from_source && let Some(disk) = &self.disk {
            disk.store(&module, &disk_key);
        }
        let pre = linker.instantiate_pre(&module).map_err(|e| AosError::Invalid(format!("link: {e:#}")))?;
        let loaded = Arc::new(AosModule::new(self.engine.clone(), pre, profile, sha256, compiled_from_source));
        Ok(self.lock().entry((sha256, format)).or_insert(loaded).clone())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ModuleMap> {
        crate::sync::lock(&self.modules)
    }
}

/// Version of the metering pass's output: bump it when `meter_inline` changes what it emits, so
/// compiles cached on disk by an older pass are not reused.
const METERING_PASS_VERSION: &str = "meter_inline-1";

/// The disk-cache key of `format`'s compile of the wasm with sha256 `sha256`: the sha256 itself for
/// unmetered formats (the same bytes compile the same whatever their glue), else
/// `sha256(pass version ‖ format ‖ sha256)`.
pub(super) fn disk_key(sha256: &[u8; 32], format: AosFormat) -> [u8; 32] {
    if format.profile().needs_metering.is_none() {
        return *sha256;
    }
    let mut h = Sha256::new();
    h.update(METERING_PASS_VERSION.as_bytes());
    h.update([0]);
    h.update(format.name().as_bytes());
    h.update([0]);
    h.update(sha256);
    h.finalize().into()
}

/// The name under which a module built for `glue` exports `name`: the E1 glue's builds are
/// minified (`E` memory, `F` constructors, `G` handle, …; spec §5.6).
pub(super) fn export_name(glue: Glue, name: &'static str) -> &'static str {
    if glue != Glue::E1 {
        return name;
    }
    match name {
        "memory" => "E",
        "__wasm_call_ctors" => "F",
        "handle" => "G",
        "main" => "H",
        "__indirect_function_table" => "I",
        "malloc" => "J",
        "__errno_location" => "K",
        "setThrew" => "L",
        "stackSave" => "M",
        "stackRestore" => "N",
        "stackAlloc" => "O",
        other => other,
    }
}

/// The exports the glue of `glue` calls (by their unminified names).
pub(super) fn required_exports(glue: Glue) -> Vec<&'static str> {
    let mut names = vec!["handle", "malloc", "__wasm_call_ctors"];
    if glue != Glue::E1 {
        names.extend(["free", "emscripten_stack_init", "emscripten_stack_get_end"]);
    }
    match glue {
        Glue::E1 | Glue::E2 => names.extend(["stackSave", "stackRestore", "stackAlloc", "main"]),
        Glue::E3 | Glue::E4 | Glue::W64 => {
            names.extend(["emscripten_stack_get_current", "_emscripten_stack_restore", "_emscripten_stack_alloc"])
        }
    }
    if matches!(glue, Glue::E4 | Glue::W64) {
        names.extend(["asyncify_start_unwind", "asyncify_stop_unwind", "asyncify_start_rewind", "asyncify_stop_rewind"]);
    }
    names
}

fn check_exports(module: &Module, glue: Glue) -> Result<(), AosError> {
    match module.get_export(export_name(glue, "memory")) {
        Some(ExternType::Memory(_)) => {}
        _ => return Err(AosError::MissingExport(export_name(glue, "memory"))),
    }
    for name in required_exports(glue) {
        let name = export_name(glue, name);
        if !matches!(module.get_export(name), Some(ExternType::Func(_))) {
            return Err(AosError::MissingExport(name));
        }
    }
    Ok(())
}

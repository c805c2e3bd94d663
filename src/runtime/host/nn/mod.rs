//! The `wasi_ephemeral_nn` host module with GGML (llama.cpp) semantics, as WasmEdge's and WAMR's
//! GGML backends expose it (docs/wasi-nn.md has the facts and their sources;
//! include/wasi_ephemeral_nn.h the C declarations): text in, text out, on the worker's own engine
//! (`crate::llm`) over the evaluation's tensor device. A model registered with an allow-list of
//! processes is `model_not_found` (103) to any other process (the worker logs why).
//!
//! A thin binding, like `ao_gpu`: decode the guest's arguments, delegate to `crate::llm`, map the
//! outcome to an errno. Rooms: [`models`] (the named-model registry and the per-device cache of
//! loaded models), [`options`] (WasmEdge's JSON option names), `calls` (each function).
//!
//! Errors: an `nn_errno` (the numbers below, WasmEdge's), never a host panic; a pointer range
//! outside memory 0 traps. Gas: every call costs [`GAS_PER_CALL`]; every tensor op the engine
//! runs is charged from its plan as `ao_gpu` charges a command (`ceil(bytes / 4) + ceil(flops /
//! 2)` on top of `GAS_PER_COMMAND`), and a `load` of GGUF bytes one unit per 4 bytes; when the
//! fuel runs out the call traps as out of fuel. The deadline: the engine checks it between two
//! ops, and a call past it traps as interrupted (the evaluation's timeout). Graphs, contexts and
//! their KV caches live for one evaluation; models loaded by name stay loaded on the device.

mod calls;
pub mod models;
pub mod options;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use wasmtime::{AsContextMut, Caller, Extern, Linker, Trap};

use self::models::NnEnv;
use crate::gpu::pool::{SharedDevice, lock};
use crate::llm::generate::{LoadedModel, Options, Session};

/// The import module name.
pub const MODULE: &str = "wasi_ephemeral_nn";

/// Fuel every call costs.
pub const GAS_PER_CALL: u64 = 100;
/// Fuel every engine op costs on top of its bytes and FLOPs.
pub const GAS_PER_OP: u64 = super::gpu::GAS_PER_COMMAND;

/// WasmEdge's `nn_errno` numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i32)]
pub enum Errno {
    Success = 0,
    InvalidArgument = 1,
    InvalidEncoding = 2,
    MissingMemory = 3,
    Busy = 4,
    RuntimeError = 5,
    UnsupportedOperation = 6,
    TooLarge = 7,
    NotFound = 8,
    EndOfSequence = 100,
    ContextFull = 101,
    PromptTooLong = 102,
    ModelNotFound = 103,
}

/// `graph_encoding` of GGUF models (WasmEdge's `ggml`).
pub const ENCODING_GGML: i32 = 6;
/// Most graphs and contexts one evaluation may hold.
pub const MAX_HANDLES: usize = 64;
/// Largest GGUF a guest may pass to `load`.
pub const MAX_LOAD_BYTES: u64 = 1 << 30;

/// How a call ends, short of success.
#[derive(Debug)]
pub(super) enum Fail {
    Errno(Errno),
    Trap(String),
    OutOfFuel,
    Deadline,
}

impl From<Errno> for Fail {
    fn from(e: Errno) -> Self {
        Fail::Errno(e)
    }
}

/// A graph: a model this evaluation loaded, with its load-time options.
pub(super) struct Graph {
    pub(super) model: Arc<LoadedModel>,
    pub(super) options: Options,
    /// Loaded from the guest's bytes: its weights are freed with the evaluation.
    pub(super) owned: bool,
}

/// An execution context: the prompt set, the session (KV cache) and the last output.
pub(super) struct Context {
    pub(super) model: Arc<LoadedModel>,
    pub(super) options: Options,
    pub(super) prompt: Option<Vec<u32>>,
    pub(super) session: Option<Session>,
    pub(super) output: String,
    pub(super) output_tokens: usize,
    pub(super) input_tokens: usize,
    /// `compute_single`: the latest token's text.
    pub(super) single: String,
    /// An end-of-generation token came.
    pub(super) done: bool,
}

/// The per-evaluation `wasi_ephemeral_nn` state. Dropping (or [`NnCtx::release`]) frees every KV
/// cache and every model loaded from bytes.
pub struct NnCtx {
    pub(super) env: Arc<NnEnv>,
    pub(super) backend: SharedDevice,
    pub(super) device: usize,
    /// The evaluated process's id (the environment's `Process.Id`), for the models' allow-lists.
    pub(super) process: Option<String>,
    pub(super) graphs: BTreeMap<u32, Graph>,
    pub(super) contexts: BTreeMap<u32, Context>,
    pub(super) next: u32,
    /// Models loaded from bytes whose graph was unloaded while a context still used them: freed
    /// with the evaluation.
    pub(super) orphans: Vec<Arc<LoadedModel>>,
    pub(super) started: Instant,
    pub(super) deadline: Option<Duration>,
    /// Time spent reading and uploading models by name: the worker's, not the actor's, so it
    /// does not count against the deadline.
    pub(super) excluded: Duration,
    memory: Option<wasmtime::Memory>,
}

impl std::fmt::Debug for NnCtx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NnCtx").field("graphs", &self.graphs.len()).field("contexts", &self.contexts.len()).finish_non_exhaustive()
    }
}

impl NnCtx {
    pub(crate) fn for_evaluation(env: Arc<NnEnv>, backend: SharedDevice, device: usize, deadline: Duration, env_json: &str) -> Self {
        // Only when a registered model has an allow-list does the process id matter.
        let restricted = env.registry.models.values().any(|m| m.processes.is_some());
        let process = if restricted {
            serde_json::from_str::<serde_json::Value>(env_json).ok().and_then(|v| v["Process"]["Id"].as_str().map(str::to_owned))
        } else {
            None
        };
        Self {
            env,
            backend,
            device,
            process,
            graphs: BTreeMap::new(),
            contexts: BTreeMap::new(),
            next: 1,
            orphans: Vec::new(),
            started: Instant::now(),
            deadline: Some(deadline),
            excluded: Duration::ZERO,
            memory: None,
        }
    }

    /// Frees every context's cache and every model loaded from bytes.
    pub fn release(&mut self) {
        if self.graphs.is_empty() && self.contexts.is_empty() && self.orphans.is_empty() {
            return;
        }
        let contexts = std::mem::take(&mut self.contexts);
        let graphs = std::mem::take(&mut self.graphs);
        let orphans = std::mem::take(&mut self.orphans);
        let mut be = lock(&self.backend);
        for c in contexts.into_values() {
            if let Some(s) = c.session {
                s.free(&mut be);
            }
        }
        let owned = graphs.into_values().filter(|g| g.owned).map(|g| g.model).chain(orphans);
        for model in owned {
            if let Ok(model) = Arc::try_unwrap(model) {
                model.llama.free(&mut be);
            }
        }
    }

    /// The epoch ticks left before the deadline, for the store after a call that waited.
    fn ticks_left(&self) -> Option<u64> {
        let left = self.deadline?.saturating_sub(self.started.elapsed().saturating_sub(self.excluded));
        Some(left.as_nanos().div_ceil(crate::runtime::EPOCH_TICK.as_nanos()) as u64 + 1)
    }

    pub(super) fn handle(&mut self) -> Result<u32, Fail> {
        if self.graphs.len() + self.contexts.len() >= MAX_HANDLES {
            return Err(Fail::Errno(Errno::TooLarge));
        }
        let h = self.next;
        self.next += 1;
        Ok(h)
    }
}

impl Drop for NnCtx {
    fn drop(&mut self) {
        self.release();
    }
}

/// The functions, each with its parameters (all i32) and its call: [`FUNCTIONS`] and
/// [`add_to_linker`] come from this one list.
macro_rules! functions {
    ($($name:literal ($($arg:ident),*) => $call:path;)*) => {
        /// Every linked function with its signature as the import check renders it.
        pub const FUNCTIONS: &[(&str, &str)] = &[$(($name, concat!("(", functions!(@types $($arg),*), ") -> i32"))),*];

        /// Links `wasi_ephemeral_nn` into `linker`; `get` finds the per-evaluation context.
        pub fn add_to_linker<T: 'static>(linker: &mut Linker<T>, get: fn(&mut T) -> &mut NnCtx) -> wasmtime::Result<()> {
            $(
                linker.func_wrap(MODULE, $name, move |mut c: Caller<'_, T>, $($arg: i32),*| {
                    host(&mut c, get, $name, |call| $call(call, $($arg),*))
                })?;
            )*
            Ok(())
        }
    };
    (@types $first:ident $(, $rest:ident)*) => { concat!("i32" $(, functions!(@comma $rest))*) };
    (@comma $x:ident) => { ", i32" };
}

functions! {
    "load" (builders, count, encoding, target, graph_out) => calls::load;
    "load_by_name" (name, name_len, graph_out) => calls::load_by_name;
    "load_by_name_with_config" (name, name_len, config, config_len, graph_out) => calls::load_by_name_with_config;
    "init_execution_context" (graph, ctx_out) => calls::init_execution_context;
    "set_input" (ctx, index, tensor) => calls::set_input;
    "compute" (ctx) => calls::compute;
    "get_output" (ctx, index, out, max, written) => calls::get_output;
    "compute_single" (ctx) => calls::compute_single;
    "get_output_single" (ctx, index, out, max, written) => calls::get_output_single;
    "fini_single" (ctx) => calls::fini_single;
    "unload" (graph) => calls::unload;
    "finalize_execution_context" (ctx) => calls::finalize_execution_context;
}

/// One host call: guest memory, the context, the fuel.
pub(super) struct Call<'a> {
    pub(super) name: &'static str,
    pub(super) mem: &'a mut [u8],
    pub(super) ctx: &'a mut NnCtx,
    pub(super) fuel: u64,
    pub(super) charged: u64,
}

impl Call<'_> {
    pub(super) fn charge(&mut self, gas: u64) -> Result<(), Fail> {
        let total = self.charged.saturating_add(gas);
        if total > self.fuel {
            return Err(Fail::OutOfFuel);
        }
        self.charged = total;
        Ok(())
    }

    /// `[ptr, ptr + len)` in memory 0, or a trap.
    pub(super) fn range(&self, ptr: i32, len: u64, what: &str) -> Result<std::ops::Range<usize>, Fail> {
        let start = ptr as u32 as u64;
        match start.checked_add(len) {
            Some(end) if end <= self.mem.len() as u64 => Ok(start as usize..end as usize),
            _ => {
                Err(Fail::Trap(format!("{MODULE}.{}: {what} [{start:#x}, +{len}) is outside memory ({} bytes)", self.name, self.mem.len())))
            }
        }
    }

    pub(super) fn bytes(&self, ptr: i32, len: i32, what: &str) -> Result<&[u8], Fail> {
        let r = self.range(ptr, len as u32 as u64, what)?;
        Ok(&self.mem[r])
    }

    pub(super) fn u32_at(&self, ptr: u64) -> u32 {
        let p = ptr as usize;
        self.mem.get(p..p + 4).map_or(0, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub(super) fn put_u32(&mut self, ptr: i32, value: u32, what: &str) -> Result<(), Fail> {
        let r = self.range(ptr, 4, what)?;
        self.mem[r].copy_from_slice(&value.to_le_bytes());
        Ok(())
    }
}

/// Runs one call and ends it as an errno, a trap, out of fuel or past the deadline.
fn host<T: 'static>(
    caller: &mut Caller<'_, T>,
    get: fn(&mut T) -> &mut NnCtx,
    name: &'static str,
    f: impl FnOnce(&mut Call<'_>) -> Result<(), Fail>,
) -> wasmtime::Result<i32> {
    let fuel = caller.get_fuel()?;
    let memory = match get(caller.data_mut()).memory {
        Some(m) => m,
        None => {
            let Some(Extern::Memory(m)) = caller.get_export("memory") else {
                return Ok(Errno::MissingMemory as i32);
            };
            get(caller.data_mut()).memory = Some(m);
            m
        }
    };
    let (mem, data) = memory.data_and_store_mut(&mut *caller);
    let excluded_before = get(data).excluded;
    let mut call = Call { name, mem, ctx: get(data), fuel, charged: 0 };
    let result = call.charge(GAS_PER_CALL).and_then(|()| f(&mut call));
    let charged = call.charged;
    let ctx = get(caller.data_mut());
    if ctx.excluded != excluded_before
        && let Some(ticks) = ctx.ticks_left()
    {
        // A model was loaded: move the store's epoch deadline by the time that took.
        caller.as_context_mut().set_epoch_deadline(ticks);
    }
    caller.set_fuel(if matches!(result, Err(Fail::OutOfFuel)) { 0 } else { fuel - charged })?;
    match result {
        Ok(()) => Ok(Errno::Success as i32),
        Err(Fail::Errno(e)) => Ok(e as i32),
        Err(Fail::Trap(msg)) => Err(wasmtime::format_err!("{msg}")),
        Err(Fail::OutOfFuel) => Err(wasmtime::Error::new(Trap::OutOfFuel)),
        Err(Fail::Deadline) => Err(wasmtime::Error::new(Trap::Interrupt)),
    }
}

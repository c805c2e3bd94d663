//! One aos instance: boot as the glue does (§4.2), restore a memory (§4.3), and `handle` with the
//! glue's `ccall` convention and the Asyncify loop (§4.4, §4.5).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};
use wasmtime::{Engine, Func, Instance, InstancePre, Store, StoreLimitsBuilder, Trap, Val};

use super::AosError;
use super::engine::export_name;
use super::format::{Glue, Profile};
use super::imports::control::grow_heap;
use super::imports::weave::current_gas;
use super::snapshot;
use super::state::{AsyncState, EnvVars, Exports, GAS_LIMIT_GLOBAL, GAS_USED_GLOBAL, Host, HostTrap, call_ptr, pval, read_cstr, write};
use crate::protocol::Tag;
use crate::runtime::epoch::EPOCH_TICK;
use crate::runtime::limits::{COMPUTE_LIMIT_TAG, MEMORY_LIMIT_TAG, first_tag, parse_compute_limit, parse_memory_limit};

/// Epoch ticks standing for "no deadline" (the store adds it to the current epoch).
const NO_DEADLINE: u64 = 1 << 62;

/// The glue's default `Compute-Limit`: 9e15, just under 2^53.
pub const DEFAULT_GAS_LIMIT: u64 = 9_000_000_000_000_000;

/// How one instance runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceOptions {
    /// Gas per message (`Compute-Limit`); exceeding it traps `out of gas!`.
    pub gas_limit: u64,
    /// Which environment variables the process sees.
    pub env_vars: EnvVars,
    /// Wall-clock time one boot or message may take; hitting it is "could not compute".
    pub deadline: Option<Duration>,
    /// Largest linear memory in bytes (the module's own maximum applies as well).
    pub memory_limit: Option<u64>,
}

impl InstanceOptions {
    /// The options of a process: `Compute-Limit` from the process's tags, else the module's, else
    /// [`DEFAULT_GAS_LIMIT`] (the loader's rule); `Memory-Limit` likewise (the CU only admits by it;
    /// here it also caps growth).
    pub fn from_tags(module_tags: &[Tag], process_tags: &[Tag]) -> Result<Self, AosError> {
        let tag = |name: &'static str| first_tag(process_tags, name).or_else(|| first_tag(module_tags, name));
        let gas_limit = match tag(COMPUTE_LIMIT_TAG) {
            Some(v) => parse_compute_limit(v).ok_or_else(|| AosError::BadTag { tag: COMPUTE_LIMIT_TAG, value: v.to_owned() })?,
            None => DEFAULT_GAS_LIMIT,
        };
        let memory_limit = match tag(MEMORY_LIMIT_TAG) {
            Some(v) => Some(parse_memory_limit(v).ok_or_else(|| AosError::BadTag { tag: MEMORY_LIMIT_TAG, value: v.to_owned() })?),
            None => None,
        };
        Ok(Self { gas_limit, memory_limit, ..Self::default() })
    }
}

impl Default for InstanceOptions {
    fn default() -> Self {
        Self { gas_limit: DEFAULT_GAS_LIMIT, env_vars: EnvVars::default(), deadline: None, memory_limit: None }
    }
}

/// See [`AosInstance::host_snapshot`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct HostSnapshot {
    now: f64,
    tz_done: bool,
    temp_ret0: i32,
}

/// A compiled, linked aos module. Cheap to share between threads.
pub struct AosModule {
    engine: Engine,
    pre: InstancePre<Host>,
    profile: Profile,
    sha256: [u8; 32],
    compiled_from_source: bool,
}

impl std::fmt::Debug for AosModule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AosModule").field("format", &self.profile.format).field("sha256", &hex::encode(self.sha256)).finish()
    }
}

/// What one `handle` call returned (the loader's result object, spec §4.4 step 7).
#[derive(Debug, Clone, PartialEq)]
pub struct HandleOutcome {
    /// The string `handle` returned, byte for byte (`{"ok":…,"response":{…}}`), empty for errors
    /// the host produced.
    pub raw_json: String,
    /// `response.Output` (null when absent).
    pub output: serde_json::Value,
    /// `response.Error`, or the evaluation error in CU semantics.
    pub error: Option<String>,
    pub messages: Vec<serde_json::Value>,
    pub spawns: Vec<serde_json::Value>,
    pub assignments: Vec<serde_json::Value>,
    pub patches: Vec<serde_json::Value>,
    pub gas_used: u64,
}

impl HandleOutcome {
    /// The result the CU records for a failed evaluation: only `Error` (and the gas burnt).
    pub fn failed(error: String, gas_used: u64) -> Self {
        Self {
            raw_json: String::new(),
            output: serde_json::Value::Null,
            error: Some(error),
            messages: Vec::new(),
            spawns: Vec::new(),
            assignments: Vec::new(),
            patches: Vec::new(),
            gas_used,
        }
    }
}

impl AosModule {
    pub(super) fn new(engine: Engine, pre: InstancePre<Host>, profile: Profile, sha256: [u8; 32], compiled_from_source: bool) -> Self {
        Self { engine, pre, profile, sha256, compiled_from_source }
    }

    pub fn profile(&self) -> &Profile {
        &self.profile
    }

    /// The sha256 of the wasm bytes.
    pub fn sha256(&self) -> [u8; 32] {
        self.sha256
    }

    /// True when this engine compiled the module, false when it came from a cache.
    pub fn compiled_from_source(&self) -> bool {
        self.compiled_from_source
    }

    /// A fresh instance: boot, then (when given) copy `memory` over the start of its memory.
    pub fn instantiate(&self, memory: Option<&[u8]>, opts: &InstanceOptions) -> Result<AosInstance, AosError> {
        let mut limits = StoreLimitsBuilder::new();
        if let Some(max) = opts.memory_limit {
            limits = limits.memory_size(usize::try_from(max).unwrap_or(usize::MAX));
        }
        let host = Host::new(self.profile, opts.env_vars, opts.gas_limit, limits.build());
        let mut store = Store::new(&self.engine, host);
        store.limiter(|h| &mut h.limits);
        let deadline_ticks =
            opts.deadline.map_or(NO_DEADLINE, |d| (d.as_nanos().div_ceil(EPOCH_TICK.as_nanos()) as u64).saturating_add(1).min(NO_DEADLINE));
        store.set_epoch_deadline(deadline_ticks);
        let instance = self.pre.instantiate(&mut store).map_err(|e| classify(e, opts.gas_limit))?;
        let ex = Arc::new(exports_of(&mut store, &instance, self.profile.glue)?);
        store.data_mut().exports = Some(Arc::clone(&ex));
        if let Some(counter) = instance.get_global(&mut store, GAS_USED_GLOBAL) {
            store.data_mut().gas.counter = Some(counter);
            if let Some(limit) = instance.get_global(&mut store, GAS_LIMIT_GLOBAL) {
                // The limit global is compared unsigned: keep the bits of the u64.
                let value = Val::I64(opts.gas_limit as i64);
                limit.set(&mut store, value).map_err(|e| AosError::BadImport {
                    module: "(export)".into(),
                    name: GAS_LIMIT_GLOBAL.into(),
                    detail: format!("must be a mutable i64 global: {e}"),
                })?;
            }
        }
        let mut inst =
            AosInstance { store, instance, ex, profile: self.profile, deadline_ticks, gas_limit: opts.gas_limit, poisoned: false };
        inst.boot()?;
        if let Some(memory) = memory {
            inst.restore(memory)?;
        }
        Ok(inst)
    }
}

fn exports_of(store: &mut Store<Host>, instance: &Instance, glue: Glue) -> Result<Exports, AosError> {
    let func = |store: &mut Store<Host>, name: &'static str| {
        let name = export_name(glue, name);
        instance.get_func(&mut *store, name).ok_or(AosError::MissingExport(name))
    };
    let optional = |store: &mut Store<Host>, name: &'static str| instance.get_func(&mut *store, export_name(glue, name));
    let memory =
        instance.get_memory(&mut *store, export_name(glue, "memory")).ok_or(AosError::MissingExport(export_name(glue, "memory")))?;
    let e1e2 = matches!(glue, Glue::E1 | Glue::E2);
    let (save, restore, alloc) = if e1e2 {
        ("stackSave", "stackRestore", "stackAlloc")
    } else {
        ("emscripten_stack_get_current", "_emscripten_stack_restore", "_emscripten_stack_alloc")
    };
    let asyncify = if matches!(glue, Glue::E4 | Glue::W64) {
        Some([
            func(store, "asyncify_start_unwind")?,
            func(store, "asyncify_stop_unwind")?,
            func(store, "asyncify_start_rewind")?,
            func(store, "asyncify_stop_rewind")?,
        ])
    } else {
        None
    };
    let mut dyncalls = HashMap::new();
    let names: Vec<String> = instance.exports(&mut *store).map(|e| e.name().to_owned()).filter(|n| n.starts_with("dynCall_")).collect();
    for name in names {
        if let Some(f) = instance.get_func(&mut *store, &name) {
            dyncalls.insert(name["dynCall_".len()..].to_owned(), f);
        }
    }
    Ok(Exports {
        memory,
        handle: func(store, "handle")?,
        malloc: func(store, "malloc")?,
        free: optional(store, "free"),
        stack_save: func(store, save)?,
        stack_restore: func(store, restore)?,
        stack_alloc: func(store, alloc)?,
        set_threw: optional(store, "setThrew"),
        tempret_set: optional(store, "_emscripten_tempret_set"),
        errno_location: optional(store, "__errno_location"),
        table: instance.get_table(&mut *store, export_name(glue, "__indirect_function_table")),
        asyncify,
        dyncalls,
    })
}

/// Maps a wasm or host failure to an error (deterministic ones are `Error` results for the CU).
pub(super) fn classify(e: wasmtime::Error, gas_limit: u64) -> AosError {
    if let Some(t) = e.downcast_ref::<HostTrap>() {
        return match t {
            HostTrap::OutOfGas => AosError::OutOfGas { limit: gas_limit },
            HostTrap::Exit(code) => AosError::Exit(*code),
            HostTrap::LongJmp => AosError::Trap("longjmp outside of any setjmp (no invoke_ caught it)".into()),
            HostTrap::Message(m) => AosError::Trap(m.clone()),
        };
    }
    match e.downcast_ref::<Trap>() {
        Some(Trap::Interrupt) => AosError::Deadline,
        Some(t) => AosError::Trap(t.to_string()),
        None => AosError::Trap(format!("{e}")),
    }
}

/// A running aos process instance. One message at a time.
pub struct AosInstance {
    store: Store<Host>,
    instance: Instance,
    ex: Arc<Exports>,
    profile: Profile,
    deadline_ticks: u64,
    gas_limit: u64,
    /// Set when a call failed midway: the instance's stack and globals are undefined after that.
    poisoned: bool,
}

impl std::fmt::Debug for AosInstance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AosInstance").field("format", &self.profile.format).field("memory_len", &self.memory_len()).finish()
    }
}

impl AosInstance {
    fn call(&mut self, f: &Func, args: &[u64]) -> Result<u64, AosError> {
        self.store.set_epoch_deadline(self.deadline_ticks);
        call_ptr(&mut self.store, f, args).map_err(|e| {
            self.poisoned = true;
            classify(e, self.gas_limit)
        })
    }

    fn func(&mut self, name: &'static str) -> Result<Func, AosError> {
        let name = export_name(self.profile.glue, name);
        self.instance.get_func(&mut self.store, name).ok_or(AosError::MissingExport(name))
    }

    fn write_mem(&mut self, at: u64, bytes: &[u8]) -> Result<(), AosError> {
        write(&mut self.store, &self.ex.memory, at, bytes).map_err(|e| AosError::Trap(format!("{e}")))
    }

    /// The glue's start-up: stack init, stack cookie and address-0 magic, constructors, and `main`
    /// for E2/E3 (argv = `["./this.program"]`); E1: constructors and `main(0, 0)` only.
    fn boot(&mut self) -> Result<(), AosError> {
        if self.profile.glue == Glue::E1 {
            let ctors = self.func("__wasm_call_ctors")?;
            self.call(&ctors, &[])?;
            let main = self.func("main")?;
            self.call(&main, &[0, 0])?;
            return Ok(());
        }
        let init = self.func("emscripten_stack_init")?;
        self.call(&init, &[])?;
        let get_end = self.func("emscripten_stack_get_end")?;
        let mut end = self.call(&get_end, &[])?;
        if end == 0 {
            end = 4;
        }
        self.write_mem(end, &0x0213_5467u32.to_le_bytes())?;
        self.write_mem(end.saturating_add(4), &0x89BA_CDFEu32.to_le_bytes())?;
        self.write_mem(0, &0x6373_6d65u32.to_le_bytes())?;
        let ctors = self.func("__wasm_call_ctors")?;
        self.call(&ctors, &[])?;
        if self.profile.call_main {
            let ptr = self.profile.ptr_size();
            let alloc = self.ex.stack_alloc;
            let argv = self.call(&alloc, &[2 * ptr])?;
            let program = b"./this.program\0";
            let arg0 = self.call(&alloc, &[program.len() as u64])?;
            self.write_mem(arg0, program)?;
            let mut slots = Vec::new();
            for v in [arg0, 0] {
                if ptr == 8 {
                    slots.extend_from_slice(&v.to_le_bytes());
                } else {
                    slots.extend_from_slice(&(v as u32).to_le_bytes());
                }
            }
            self.write_mem(argv, &slots)?;
            let main = self.func("main")?;
            self.store.set_epoch_deadline(self.deadline_ticks);
            let args = [Val::I32(1), pval(self.profile.wasm64, argv)];
            let mut out = vec![Val::I32(0); main.ty(&self.store).results().len()];
            main.call(&mut self.store, &args, &mut out).map_err(|e| {
                self.poisoned = true;
                classify(e, self.gas_limit)
            })?;
        }
        Ok(())
    }

    /// The host state a warm instance carries between messages (the clock counter, the timezone
    /// flag, tempRet0): with the memory, everything that distinguishes it from a fresh instance.
    pub(super) fn host_snapshot(&self) -> HostSnapshot {
        let h = self.store.data();
        HostSnapshot { now: h.now, tz_done: h.tz_done, temp_ret0: h.temp_ret0 }
    }

    /// Makes this freshly booted instance equal to the warm one `memory` and `host` were taken
    /// from: memory grown to exactly the same size (not by the glue's rule), copied, host state set.
    pub(super) fn become_snapshot(&mut self, memory: &[u8], host: &HostSnapshot) -> Result<(), AosError> {
        let mem = self.ex.memory;
        let current = mem.data_size(&self.store);
        if current > memory.len() {
            return Err(AosError::Restore(format!(
                "the snapshot ({} bytes) is smaller than a fresh instance ({current} bytes)",
                memory.len()
            )));
        }
        let pages = (memory.len() - current).div_ceil(65536) as u64;
        if pages > 0 && mem.grow(&mut self.store, pages).is_err() {
            return Err(AosError::Restore(format!("cannot grow memory to the {} bytes of the snapshot", memory.len())));
        }
        snapshot::sync(&mut mem.data_mut(&mut self.store)[..memory.len()], memory);
        let h = self.store.data_mut();
        (h.now, h.tz_done, h.temp_ret0) = (host.now, host.tz_done, host.temp_ret0);
        Ok(())
    }

    /// Copies `memory` over the start of this instance's memory, growing it first by the glue's
    /// heap rule when it is smaller (so it may end up larger than `memory`, as in the JS loader).
    pub fn restore(&mut self, memory: &[u8]) -> Result<(), AosError> {
        let mem = self.ex.memory;
        if mem.data_size(&self.store) < memory.len() && !grow_heap(&mut self.store, &mem, memory.len() as u64) {
            return Err(AosError::Restore(format!(
                "cannot grow memory to the {} bytes of the saved memory (the module's maximum or the memory limit is lower)",
                memory.len()
            )));
        }
        snapshot::sync(&mut mem.data_mut(&mut self.store)[..memory.len()], memory);
        Ok(())
    }

    /// Evaluates one message: `msg_json` and `env_json` are passed byte for byte.
    ///
    /// Lua errors come back as `Ok` with `error` set; traps, `exit`, out-of-gas and `ok:false` are
    /// `Err` (the CU records them as `Error` results, see [`super::AosProcess`]); after an `Err` the
    /// instance is poisoned and must be dropped.
    pub fn handle(&mut self, msg_json: &str, env_json: &str) -> Result<HandleOutcome, AosError> {
        if self.poisoned {
            return Err(AosError::Poisoned);
        }
        self.store.data_mut().gas.used = 0;
        if let Some(counter) = self.store.data().gas.counter {
            let zero = if counter.ty(&self.store).content().is_i64() { Val::I64(0) } else { Val::I32(0) };
            counter.set(&mut self.store, zero).map_err(|e| AosError::Trap(format!("cannot reset the gas counter: {e}")))?;
        }
        let ex = Arc::clone(&self.ex);
        let sp0 = self.call(&ex.stack_save, &[])?;
        let mut ptrs = [0u64; 2];
        for (slot, text) in ptrs.iter_mut().zip([msg_json, env_json]) {
            let size = self.profile.stack_string_size(text);
            *slot = self.call(&ex.stack_alloc, &[size])?;
            let mut bytes = Vec::with_capacity(text.len() + 1);
            bytes.extend_from_slice(text.as_bytes());
            bytes.push(0);
            self.write_mem(*slot, &bytes)?;
        }
        let mut ret = self.call(&ex.handle, &ptrs)?;
        if let Some([_, stop_unwind, start_rewind, _]) = ex.asyncify {
            while self.store.data().async_state == AsyncState::Unwinding {
                self.call(&stop_unwind, &[])?;
                self.store.data_mut().async_state = AsyncState::Rewinding;
                let data = self.store.data().async_data;
                self.call(&start_rewind, &[data])?;
                ret = self.call(&ex.handle, &[0, 0])?;
            }
        }
        if self.store.data().async_state != AsyncState::Normal {
            self.poisoned = true;
            return Err(AosError::Trap("handle returned in the middle of an Asyncify rewind".into()));
        }
        self.call(&ex.stack_restore, &[sp0])?;
        let gas_used = current_gas(&mut self.store);
        let raw = read_cstr(&self.store, &ex.memory, ret).map_err(|e| {
            self.poisoned = true;
            AosError::BadResult(format!("{e}"))
        })?;
        parse_result(raw, gas_used)
    }

    /// The gas the last (or current) message has used so far.
    pub fn gas_used(&mut self) -> u64 {
        current_gas(&mut self.store)
    }

    pub fn memory(&self) -> &[u8] {
        self.ex.memory.data(&self.store)
    }

    pub fn memory_len(&self) -> usize {
        self.ex.memory.data_size(&self.store)
    }

    pub fn memory_sha256(&self) -> [u8; 32] {
        Sha256::digest(self.memory()).into()
    }

    /// Bytes the process wrote to stdout/stderr (discarded, as the loader mutes them).
    pub fn stdout_bytes(&self) -> u64 {
        self.store.data().stdout_bytes
    }
}

/// Takes the array at `key` out of `response` (empty when absent or not an array).
fn take_list(response: &mut serde_json::Value, key: &str) -> Vec<serde_json::Value> {
    match response.get_mut(key) {
        Some(serde_json::Value::Array(items)) => std::mem::take(items),
        _ => Vec::new(),
    }
}

/// Parses `{"ok":bool,"response":{…}}`; `ok:false` is the loader's throw.
fn parse_result(raw: String, gas_used: u64) -> Result<HandleOutcome, AosError> {
    let mut value: serde_json::Value =
        serde_json::from_str(&raw).map_err(|e| AosError::BadResult(format!("handle returned invalid JSON ({e}): {}", preview(&raw))))?;
    let ok = value.get("ok") == Some(&serde_json::Value::Bool(true));
    let Some(response) = value.get_mut("response") else {
        return Err(AosError::BadResult(format!("handle's result has no `response`: {}", preview(&raw))));
    };
    if !ok {
        return Err(AosError::Evaluation(match response {
            serde_json::Value::String(s) => s.clone(),
            other => other.to_string(),
        }));
    }
    let error = match response.get("Error") {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::String(s)) => Some(s.clone()),
        Some(other) => Some(other.to_string()),
    };
    Ok(HandleOutcome {
        output: response.get_mut("Output").map(serde_json::Value::take).unwrap_or(serde_json::Value::Null),
        error,
        messages: take_list(response, "Messages"),
        spawns: take_list(response, "Spawns"),
        assignments: take_list(response, "Assignments"),
        patches: take_list(response, "Patches"),
        gas_used,
        raw_json: raw,
    })
}

fn preview(s: &str) -> String {
    let cut: String = s.chars().take(200).collect();
    if cut.len() < s.len() { format!("{cut}…") } else { cut }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tag(name: &str, value: &str) -> Tag {
        Tag { name: name.into(), value: value.into() }
    }

    #[test]
    fn limits_come_from_the_process_then_the_module() {
        assert_eq!(InstanceOptions::from_tags(&[], &[]).unwrap(), InstanceOptions::default());
        let module = [tag("Compute-Limit", "1000"), tag("Memory-Limit", "1-gb")];
        let o = InstanceOptions::from_tags(&module, &[]).unwrap();
        assert_eq!((o.gas_limit, o.memory_limit), (1000, Some(1 << 30)));
        let o = InstanceOptions::from_tags(&module, &[tag("Compute-Limit", "5")]).unwrap();
        assert_eq!((o.gas_limit, o.memory_limit), (5, Some(1 << 30)));
        assert!(matches!(InstanceOptions::from_tags(&[tag("Compute-Limit", "lots")], &[]), Err(AosError::BadTag { .. })));
    }

    #[test]
    fn results_parse_like_the_loader() {
        let ok = parse_result(
            r#"{"ok":true,"response":{"Output":{"data":"2"},"Messages":[{"Target":"X"}],"Spawns":[],"Assignments":[]}}"#.into(),
            7,
        )
        .unwrap();
        assert_eq!((ok.output["data"].as_str(), ok.messages.len(), ok.error, ok.gas_used), (Some("2"), 1, None, 7));
        let lua = parse_result(r#"{"ok":true,"response":{"Error":"boom"}}"#.into(), 0).unwrap();
        assert_eq!((lua.error.as_deref(), lua.output.is_null()), (Some("boom"), true));
        assert_eq!(parse_result(r#"{"ok":false,"response":"bad"}"#.into(), 0), Err(AosError::Evaluation("bad".into())));
        assert!(matches!(parse_result("not json".into(), 0), Err(AosError::BadResult(_))));
    }
}

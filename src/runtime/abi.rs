//! The actor ABI of docs/abi.md at the Wasm level: what a module must export and may import
//! (checked at load), and one evaluation (restore or initialize, place the strings with `malloc`,
//! call `handle`, read and check the JSON result, save the memory).

use std::time::Duration;

use serde_json::Value;
use wasmtime::{AsContext, ExternType, FuncType, Memory, Module, Store, Trap, TypedFunc};

use super::host::wasi::{self, ProcExit};
use super::host::{HostState, gpu, nn};
use super::{ActorModule, EvalError, EvalInput, Limits, RuntimeError};

/// Error and `ok:false` texts from the guest are cut to this many bytes.
const MAX_ERROR_TEXT: usize = 4096;

/// `(i32, i32) -> i32`, `() -> ()`: the form used in errors and in `wasi::FUNCTIONS`.
pub(super) fn signature(ty: &FuncType) -> String {
    let list = |it: &mut dyn Iterator<Item = wasmtime::ValType>| it.map(|v| v.to_string()).collect::<Vec<_>>().join(", ");
    let results = list(&mut ty.results());
    let results = if ty.results().len() == 1 { results } else { format!("({results})") };
    format!("({}) -> {results}", list(&mut ty.params()))
}

fn describe(ty: &ExternType) -> String {
    match ty {
        ExternType::Func(f) => format!("function {}", signature(f)),
        ExternType::Memory(m) if m.is_shared() => "shared memory".to_owned(),
        ExternType::Memory(m) if m.is_64() => "64-bit memory".to_owned(),
        ExternType::Memory(_) => "32-bit memory".to_owned(),
        ExternType::Global(_) => "global".to_owned(),
        ExternType::Table(_) => "table".to_owned(),
        ExternType::Tag(_) => "tag".to_owned(),
    }
}

/// Checks `memory`, `malloc`, `handle` and the optional `_initialize`; returns whether
/// `_initialize` is exported.
pub(super) fn check_exports(module: &Module) -> Result<bool, RuntimeError> {
    let func = |name: &'static str, expected: &'static str, required: bool| -> Result<bool, RuntimeError> {
        match module.get_export(name) {
            None if required => Err(RuntimeError::MissingExport(name)),
            None => Ok(false),
            Some(ExternType::Func(f)) if signature(&f) == expected => Ok(true),
            Some(other) => Err(RuntimeError::BadExport { name, expected: format!("function {expected}"), found: describe(&other) }),
        }
    };
    match module.get_export("memory") {
        None => return Err(RuntimeError::MissingExport("memory")),
        Some(ExternType::Memory(m)) if !m.is_64() && !m.is_shared() => {}
        Some(other) => {
            return Err(RuntimeError::BadExport { name: "memory", expected: "32-bit memory".to_owned(), found: describe(&other) });
        }
    }
    func("malloc", "(i32) -> i32", true)?;
    func("handle", "(i32, i32) -> i32", true)?;
    func("_initialize", "() -> ()", false)
}

/// Every import must be one of the linked WASI or `ao_gpu` functions with exactly its type.
pub(super) fn check_imports(module: &Module) -> Result<(), RuntimeError> {
    for import in module.imports() {
        let forbidden =
            |detail: String| RuntimeError::ForbiddenImport { module: import.module().to_owned(), name: import.name().to_owned(), detail };
        let table = match import.module() {
            wasi::MODULE => wasi::FUNCTIONS,
            gpu::MODULE => gpu::FUNCTIONS,
            nn::MODULE => nn::FUNCTIONS,
            _ => &[],
        };
        let linked = table.iter().find(|(n, _)| *n == import.name());
        let Some((_, expected)) = linked else {
            return Err(forbidden("not provided by the worker".to_owned()));
        };
        match import.ty() {
            ExternType::Func(f) if signature(&f) == *expected => {}
            other => return Err(forbidden(format!("imported as {}, the worker provides function {expected}", describe(&other)))),
        }
    }
    Ok(())
}

/// Why an evaluation stopped, before it is classified with what the store knows.
enum Stop {
    Wasm(wasmtime::Error),
    Eval(EvalError),
}

impl From<wasmtime::Error> for Stop {
    fn from(e: wasmtime::Error) -> Self {
        Stop::Wasm(e)
    }
}

impl From<EvalError> for Stop {
    fn from(e: EvalError) -> Self {
        Stop::Eval(e)
    }
}

/// Runs one evaluation in `store` (fresh, with fuel, deadline and limiter set): the response and the
/// new memory on success.
pub(super) fn evaluate(
    store: &mut Store<HostState>,
    module: &ActorModule,
    state: Option<&[u8]>,
    input: &EvalInput<'_>,
    limits: Limits,
    deadline: Duration,
) -> Result<(Value, Vec<u8>), EvalError> {
    run(store, module, state, input, limits).map_err(|stop| match stop {
        Stop::Eval(e) => e,
        Stop::Wasm(e) => classify(&e, store.data().limiter.memory_refused, limits, deadline),
    })
}

fn classify(e: &wasmtime::Error, memory_refused: bool, limits: Limits, deadline: Duration) -> EvalError {
    if let Some(ProcExit(code)) = e.downcast_ref::<ProcExit>() {
        return EvalError::Exit(*code);
    }
    match e.downcast_ref::<Trap>() {
        Some(Trap::OutOfFuel) => EvalError::OutOfFuel { limit: limits.compute },
        Some(Trap::Interrupt) => EvalError::Timeout { deadline },
        // A guest that ignores a refused memory.grow (or instantiation refused its minimum memory).
        _ if memory_refused => EvalError::OutOfMemory { limit_bytes: limits.memory_bytes },
        // Trap's Display says "wasm trap: …"; the variant already says it is a trap.
        Some(trap) => EvalError::Trap(trap.to_string().trim_start_matches("wasm trap: ").to_owned()),
        None => EvalError::Trap(format!("{e:#}")),
    }
}

fn run(
    store: &mut Store<HostState>,
    module: &ActorModule,
    state: Option<&[u8]>,
    input: &EvalInput<'_>,
    limits: Limits,
) -> Result<(Value, Vec<u8>), Stop> {
    let super::ModuleKind::Own { pre, has_initialize } = &module.kind else {
        return Err(EvalError::Trap("worker bug: an aos module reached the JSON-1 ABI".to_owned()).into());
    };
    let instance = pre.instantiate(&mut *store)?;
    let memory = instance.get_memory(&mut *store, "memory").ok_or_else(|| EvalError::Trap("module has no memory export".to_owned()))?;
    match state {
        Some(saved) => restore(store, memory, saved, limits)?,
        None => {
            if *has_initialize {
                instance.get_typed_func::<(), ()>(&mut *store, "_initialize")?.call(&mut *store, ())?;
            }
        }
    }
    let malloc = instance.get_typed_func::<i32, i32>(&mut *store, "malloc")?;
    let handle = instance.get_typed_func::<(i32, i32), i32>(&mut *store, "handle")?;
    let msg = place_string(store, memory, &malloc, input.msg_json, limits)?;
    let env = place_string(store, memory, &malloc, input.env_json, limits)?;
    let result = handle.call(&mut *store, (msg, env))?;
    let response = read_result(memory.data(&*store), result)?;
    Ok((response, memory.data(&*store).to_vec()))
}

/// Grows the fresh memory to the saved size and copies the state in.
fn restore(store: &mut Store<HostState>, memory: Memory, saved: &[u8], limits: Limits) -> Result<(), Stop> {
    let out_of_memory = EvalError::OutOfMemory { limit_bytes: limits.memory_bytes };
    if saved.len() as u64 > limits.memory_bytes {
        return Err(out_of_memory.into());
    }
    let page = memory.page_size(&*store);
    let pages = (saved.len() as u64).div_ceil(page);
    let current = memory.size(&*store);
    if pages > current && memory.grow(&mut *store, pages - current).is_err() {
        return Err(out_of_memory.into());
    }
    memory.write(&mut *store, 0, saved).map_err(|e| EvalError::Trap(format!("state restore: {e}")))?;
    Ok(())
}

/// `malloc(len + 1)`, then the bytes and a NUL.
fn place_string(store: &mut Store<HostState>, memory: Memory, malloc: &TypedFunc<i32, i32>, s: &str, limits: Limits) -> Result<i32, Stop> {
    let out_of_memory = EvalError::OutOfMemory { limit_bytes: limits.memory_bytes };
    let size = i32::try_from(s.len() + 1).map_err(|_| out_of_memory.clone())?;
    let ptr = malloc.call(&mut *store, size)?;
    if ptr == 0 {
        return Err(out_of_memory.into());
    }
    let start = ptr as u32 as usize;
    let memory_len = memory.data_size(&*store);
    let Some(dest) = memory.data_mut(&mut *store).get_mut(start..start + s.len() + 1) else {
        return Err(EvalError::BadResult(format!(
            "malloc({size}) returned {start:#x}, which does not leave {size} bytes before the end of memory ({memory_len} bytes)"
        ))
        .into());
    };
    let (text, nul) = dest.split_at_mut(s.len());
    text.copy_from_slice(s.as_bytes());
    nul[0] = 0;
    Ok(ptr)
}

/// The NUL-terminated JSON at `ptr`: `{"ok": true, "response": {...}}` gives the response.
fn read_result(mem: &[u8], ptr: i32) -> Result<Value, EvalError> {
    let start = ptr as u32 as usize;
    if start == 0 {
        return Err(EvalError::BadResult("handle returned a null pointer".to_owned()));
    }
    let Some(tail) = mem.get(start..).filter(|t| !t.is_empty()) else {
        return Err(EvalError::BadResult(format!("handle returned {start:#x}, past the end of memory ({} bytes)", mem.len())));
    };
    let Some(len) = tail.iter().position(|&b| b == 0) else {
        return Err(EvalError::BadResult(format!("result string at {start:#x} has no NUL before the end of memory")));
    };
    let text = std::str::from_utf8(&tail[..len]).map_err(|e| EvalError::BadResult(format!("result is not UTF-8: {e}")))?;
    let value: Value = serde_json::from_str(text).map_err(|e| EvalError::BadResult(format!("result is not JSON: {e}")))?;
    let Value::Object(mut result) = value else {
        return Err(EvalError::BadResult("result is not a JSON object".to_owned()));
    };
    let ok = result.get("ok").and_then(Value::as_bool).ok_or_else(|| EvalError::BadResult("result has no boolean `ok`".to_owned()))?;
    let response = result.remove("response");
    if !ok {
        let text = response.as_ref().and_then(error_text).unwrap_or_else(|| "the module answered ok:false".to_owned());
        return Err(EvalError::Actor(text));
    }
    match response {
        Some(response @ Value::Object(_)) => match error_text(&response) {
            Some(text) => Err(EvalError::Actor(text)),
            None => Ok(response),
        },
        Some(_) => Err(EvalError::BadResult("result `response` is not an object".to_owned())),
        None => Err(EvalError::BadResult("result has ok:true but no `response`".to_owned())),
    }
}

/// The response's `Error`, when set (null, false and "" count as unset, as in the AO CU's JavaScript).
fn error_text(response: &Value) -> Option<String> {
    let text = match response.get("Error")? {
        Value::Null | Value::Bool(false) => return None,
        Value::String(s) if s.is_empty() => return None,
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    Some(truncate(text, MAX_ERROR_TEXT))
}

fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push('…');
    }
    s
}

/// Reads the fuel consumed so far.
pub(super) fn fuel_used(store: &impl AsContext, limit: u64) -> u64 {
    limit.saturating_sub(store.as_context().get_fuel().unwrap_or(0))
}

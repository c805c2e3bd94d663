//! Per-instance host state (the `Store` data) and the memory/export helpers the imports share.
//!
//! Everything here is fresh for every instance, as in a fresh `AoLoader`: the date counter, the
//! timezone flag, the tempRet0 register, the Asyncify state and the gas counters.

use std::collections::HashMap;
use std::sync::Arc;

use wasmtime::{AsContext, AsContextMut, Caller, Func, Global, Memory, StoreLimits, Table, Val};

use super::format::{DateMode, Profile};

/// Where `Date.now()` starts for E3/E4/W64: the glue's file-system setup makes four calls after it
/// installs the counter at 10000.
pub const DATE_COUNTER_START: f64 = 10004.0;

/// The inline-counter metering contract ([`super::metering::meter_inline`]): the module exports a
/// mutable i64 global [`GAS_USED_GLOBAL`] that it adds segment costs to, and a mutable i64 global
/// [`GAS_LIMIT_GLOBAL`] (unsigned; `u64::MAX` = no limit) the host sets to the `Compute-Limit`;
/// when the count passes the limit it calls the import `metering.out_of_gas` (no parameters),
/// which traps `out of gas!`. The host zeroes the counter before every message and reads `GasUsed`
/// from it.
pub const GAS_USED_GLOBAL: &str = super::metering::GAS_USED_EXPORT;
/// See [`GAS_USED_GLOBAL`].
pub const GAS_LIMIT_GLOBAL: &str = super::metering::GAS_LIMIT_EXPORT;

/// Which environment the glue exposes (`env_vars` knob of the spec, §9.6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EnvVars {
    /// What ao-loader 0.0.49 does: none for E4/W64, the 7 defaults for E1/E2/E3.
    #[default]
    Loader049,
    /// No variables for every format.
    None,
    /// The 7 default variables for every format (ao-loader 0.0.44, which the AO CU pins).
    Default,
}

/// The 7 variables of the emscripten glue, in its order.
pub const DEFAULT_ENV: [&str; 7] =
    ["USER=web_user", "LOGNAME=web_user", "PATH=/", "PWD=/", "HOME=/home/web_user", "LANG=C.UTF-8", "_=./this.program"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AsyncState {
    Normal,
    Unwinding,
    Rewinding,
}

/// Gas of the current `handle` call. A typed `metering.usegas` import adds to `used`; an inline
/// counter (a mutable global injected by the metering pass) is read through `counter` instead.
#[derive(Debug)]
pub struct Gas {
    pub used: u64,
    pub limit: u64,
    pub counter: Option<Global>,
}

/// The exports the host calls back into, looked up once per instance.
#[derive(Clone)]
pub struct Exports {
    pub memory: Memory,
    pub handle: Func,
    pub malloc: Func,
    /// Absent from E1 builds (their glue never frees).
    pub free: Option<Func>,
    pub stack_save: Func,
    pub stack_restore: Func,
    pub stack_alloc: Func,
    pub set_threw: Option<Func>,
    pub tempret_set: Option<Func>,
    pub errno_location: Option<Func>,
    pub table: Option<Table>,
    /// `asyncify_{start_unwind, stop_unwind, start_rewind, stop_rewind}`.
    pub asyncify: Option<[Func; 4]>,
    /// `dynCall_<sig>` by signature.
    pub dyncalls: HashMap<String, Func>,
}

pub struct Host {
    pub profile: Profile,
    pub env_vars: bool,
    pub now: f64,
    pub tz_done: bool,
    pub temp_ret0: i32,
    pub gas: Gas,
    pub async_state: AsyncState,
    pub async_data: u64,
    pub async_ret: i32,
    /// Shared with the instance: imports take a reference count, not a copy of the maps.
    pub exports: Option<Arc<Exports>>,
    pub limits: StoreLimits,
    /// Bytes written to stdout/stderr (the loader mutes them; we count and discard).
    pub stdout_bytes: u64,
}

impl Host {
    pub fn new(profile: Profile, env_vars: EnvVars, gas_limit: u64, limits: StoreLimits) -> Self {
        let env_vars = match env_vars {
            EnvVars::Loader049 => profile.default_env,
            EnvVars::None => false,
            EnvVars::Default => true,
        };
        Host {
            profile,
            env_vars,
            now: if profile.date == DateMode::Counter { DATE_COUNTER_START } else { 0.0 },
            tz_done: false,
            temp_ret0: 0,
            gas: Gas { used: 0, limit: gas_limit, counter: None },
            async_state: AsyncState::Normal,
            async_data: 0,
            async_ret: 0,
            exports: None,
            limits,
            stdout_bytes: 0,
        }
    }
}

/// A trap raised by the host: the message is what the loader would throw.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostTrap {
    /// `_emscripten_throw_longjmp`: caught by the nearest `invoke_*`.
    #[error("longjmp")]
    LongJmp,
    #[error("out of gas!")]
    OutOfGas,
    #[error("program exited with status {0}")]
    Exit(i32),
    #[error("{0}")]
    Message(String),
}

pub type HostResult<T> = wasmtime::Result<T>;

pub fn trap<T>(msg: impl Into<String>) -> HostResult<T> {
    Err(wasmtime::Error::new(HostTrap::Message(msg.into())))
}

pub fn exports(caller: &Caller<'_, Host>) -> HostResult<Arc<Exports>> {
    match &caller.data().exports {
        Some(e) => Ok(Arc::clone(e)),
        None => trap("an import was called before the instance was set up"),
    }
}

/// A pointer or size argument: i32 zero-extended, i64 as is.
pub fn ptr(v: &Val) -> u64 {
    match v {
        Val::I32(x) => *x as u32 as u64,
        Val::I64(x) => *x as u64,
        _ => 0,
    }
}

/// A signed integer argument: i32 sign-extended.
pub fn int(v: &Val) -> i64 {
    match v {
        Val::I32(x) => *x as i64,
        Val::I64(x) => *x,
        _ => 0,
    }
}

/// A pointer-typed value for the profile.
pub fn pval(wasm64: bool, v: u64) -> Val {
    if wasm64 { Val::I64(v as i64) } else { Val::I32(v as u32 as i32) }
}

/// Calls an export whose parameters are all pointers; returns its first result as a pointer.
pub fn call_ptr(mut ctx: impl AsContextMut<Data = Host>, f: &Func, args: &[u64]) -> HostResult<u64> {
    const MAX_ARGS: usize = 4;
    let wasm64 = ctx.as_context().data().profile.wasm64;
    if args.len() > MAX_ARGS {
        return trap(format!("call_ptr takes at most {MAX_ARGS} arguments, not {}", args.len()));
    }
    let mut vals = [Val::I32(0); MAX_ARGS];
    for (slot, a) in vals.iter_mut().zip(args) {
        *slot = pval(wasm64, *a);
    }
    let n = f.ty(&ctx).results().len();
    let mut out = [Val::I32(0); 1];
    if n > out.len() {
        return trap(format!("call_ptr expects at most one result, the export has {n}"));
    }
    f.call(&mut ctx, &vals[..args.len()], &mut out[..n])?;
    Ok(if n == 0 { 0 } else { ptr(&out[0]) })
}

fn range(len: usize, at: u64, n: u64) -> HostResult<std::ops::Range<usize>> {
    match at.checked_add(n) {
        Some(end) if end <= len as u64 => Ok(at as usize..end as usize),
        _ => trap(format!("memory access out of bounds: {n} bytes at {at:#x} (memory is {len} bytes)")),
    }
}

pub fn read(ctx: impl AsContext, mem: &Memory, at: u64, n: u64) -> HostResult<Vec<u8>> {
    let data = mem.data(&ctx);
    Ok(data[range(data.len(), at, n)?].to_vec())
}

pub fn write(mut ctx: impl AsContextMut, mem: &Memory, at: u64, bytes: &[u8]) -> HostResult<()> {
    let data = mem.data_mut(&mut ctx);
    let r = range(data.len(), at, bytes.len() as u64)?;
    data[r].copy_from_slice(bytes);
    Ok(())
}

pub fn read_u32(ctx: impl AsContext, mem: &Memory, at: u64) -> HostResult<u32> {
    let b = read(ctx, mem, at, 4)?;
    Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

pub fn read_u64(ctx: impl AsContext, mem: &Memory, at: u64) -> HostResult<u64> {
    let b = read(ctx, mem, at, 8)?;
    let mut a = [0u8; 8];
    a.copy_from_slice(&b);
    Ok(u64::from_le_bytes(a))
}

/// Reads a pointer-sized value.
pub fn read_ptr(ctx: impl AsContext, mem: &Memory, wasm64: bool, at: u64) -> HostResult<u64> {
    if wasm64 { read_u64(ctx, mem, at) } else { read_u32(ctx, mem, at).map(u64::from) }
}

/// Writes a pointer-sized value.
pub fn write_ptr(ctx: impl AsContextMut, mem: &Memory, wasm64: bool, at: u64, v: u64) -> HostResult<()> {
    if wasm64 { write(ctx, mem, at, &v.to_le_bytes()) } else { write(ctx, mem, at, &(v as u32).to_le_bytes()) }
}

/// The NUL-terminated string at `at` (lossy UTF-8, as the glue's `UTF8ToString`).
pub fn read_cstr(ctx: impl AsContext, mem: &Memory, at: u64) -> HostResult<String> {
    let data = mem.data(&ctx);
    let start = range(data.len(), at, 0)?.start;
    let Some(len) = data[start..].iter().position(|b| *b == 0) else {
        return trap(format!("string at {at:#x} has no terminating NUL"));
    };
    Ok(String::from_utf8_lossy(&data[start..start + len]).into_owned())
}

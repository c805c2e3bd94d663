//! Metering and WeaveDrive imports (spec §5.5, §4.5).
//!
//! `metering.usegas(n)` adds to the message's gas and traps `out of gas!` past the limit (the block
//! is charged before it runs). WeaveDrive is not enabled: `open` answers "not found" (0), but
//! through a real Asyncify sleep as the glue does (aos probes `require` paths through it, and the
//! sleep's 40 MiB `malloc`/`free` and the unwound frames are visible in memory); `read`/`close`
//! trap, since no fd can have been opened.

use wasmtime::{Caller, FuncType, Linker, Val, ValType};

use super::Ret;
use crate::runtime::aos::state::{AsyncState, Host, HostResult, HostTrap, call_ptr, exports, trap, write};

/// Stack space the glue gives an Asyncify sleep (`Asyncify.StackSize`).
pub const ASYNCIFY_STACK: u64 = 41_943_040;

fn charge(host: &mut Host, amount: i64) -> HostResult<()> {
    let gas = &mut host.gas;
    gas.used = gas.used.saturating_add_signed(amount);
    if gas.used > gas.limit { Err(wasmtime::Error::new(HostTrap::OutOfGas)) } else { Ok(()) }
}

/// Binds `metering.usegas` as a typed function of the module's declared gas type.
pub(super) fn link_usegas(linker: &mut Linker<Host>, ty: &FuncType) -> Result<(), &'static str> {
    let params: Vec<ValType> = ty.params().collect();
    if ty.results().len() != 0 || params.len() != 1 {
        return Err("must be (i32) or (i64) with no results");
    }
    let linked = match params[0] {
        ValType::I32 => linker.func_wrap("metering", "usegas", |mut c: Caller<'_, Host>, n: i32| charge(c.data_mut(), n.into())),
        ValType::I64 => linker.func_wrap("metering", "usegas", |mut c: Caller<'_, Host>, n: i64| charge(c.data_mut(), n)),
        _ => return Err("must take an i32 or i64"),
    };
    linked.map(|_| ()).map_err(|_| "cannot be linked")
}

/// Binds `metering.out_of_gas: () -> ()` (the inline counter passed its limit) as a typed
/// function that traps `out of gas!`.
pub(super) fn link_out_of_gas(linker: &mut Linker<Host>, ty: &FuncType) -> Result<(), &'static str> {
    if ty.params().len() != 0 || ty.results().len() != 0 {
        return Err("must be () -> ()");
    }
    let linked = linker
        .func_wrap("metering", "out_of_gas", |_: Caller<'_, Host>| -> HostResult<()> { Err(wasmtime::Error::new(HostTrap::OutOfGas)) });
    linked.map(|_| ()).map_err(|_| "cannot be linked")
}

/// `metering_gasUsed()`: the gas so far, as JS `ToInt32`.
pub(super) fn gas_used(caller: &mut Caller<'_, Host>, _: &[Val]) -> HostResult<Ret> {
    Ok(Ret::Int(i64::from(current_gas(caller) as u32 as i32)))
}

pub(crate) fn current_gas(caller: &mut impl wasmtime::AsContextMut<Data = Host>) -> u64 {
    match caller.as_context().data().gas.counter {
        Some(global) => match global.get(&mut *caller) {
            Val::I64(v) => v as u64,
            Val::I32(v) => v as u32 as u64,
            _ => 0,
        },
        None => caller.as_context().data().gas.used,
    }
}

/// One Asyncify sleep that resolves to `result`: on the way down allocate the unwind buffer and
/// start unwinding; when called again while rewinding, stop, free the buffer and answer.
fn sleep(caller: &mut Caller<'_, Host>, result: i32) -> HostResult<Ret> {
    let ex = exports(caller)?;
    let Some([start_unwind, _, _, stop_rewind]) = ex.asyncify else {
        return trap("an __asyncjs__ import needs a module built with Asyncify");
    };
    let wasm64 = caller.data().profile.wasm64;
    match caller.data().async_state {
        AsyncState::Normal => {
            let header = if wasm64 { 24 } else { 12 };
            let data = call_ptr(&mut *caller, &ex.malloc, &[header + ASYNCIFY_STACK])?;
            if data == 0 {
                return trap("cannot allocate the Asyncify buffer (malloc returned 0)");
            }
            let mut head = Vec::with_capacity(header as usize);
            if wasm64 {
                head.extend_from_slice(&data.wrapping_add(header).to_le_bytes());
                head.extend_from_slice(&data.wrapping_add(header + ASYNCIFY_STACK).to_le_bytes());
            } else {
                head.extend_from_slice(&(data.wrapping_add(header) as u32).to_le_bytes());
                head.extend_from_slice(&(data.wrapping_add(header + ASYNCIFY_STACK) as u32).to_le_bytes());
            }
            // The id of the export to rewind into: `handle`, the only one that sleeps.
            head.extend_from_slice(&0i32.to_le_bytes());
            write(&mut *caller, &ex.memory, data, &head)?;
            let host = caller.data_mut();
            host.async_state = AsyncState::Unwinding;
            host.async_data = data;
            host.async_ret = result;
            call_ptr(&mut *caller, &start_unwind, &[data])?;
            Ok(Ret::Int(0))
        }
        AsyncState::Rewinding => {
            call_ptr(&mut *caller, &stop_rewind, &[])?;
            let data = caller.data().async_data;
            let Some(free) = ex.free else { return trap("module exports no free") };
            call_ptr(&mut *caller, &free, &[data])?;
            let host = caller.data_mut();
            host.async_state = AsyncState::Normal;
            host.async_data = 0;
            Ok(Ret::Int(host.async_ret.into()))
        }
        AsyncState::Unwinding => trap("an __asyncjs__ import was called while unwinding"),
    }
}

pub(super) fn open(caller: &mut Caller<'_, Host>, _: &[Val]) -> HostResult<Ret> {
    sleep(caller, 0)
}

pub(super) fn read(_: &mut Caller<'_, Host>, _: &[Val]) -> HostResult<Ret> {
    trap("WeaveDrive not enabled: __asyncjs__weavedrive_read called without an open file")
}

pub(super) fn close(_: &mut Caller<'_, Host>, _: &[Val]) -> HostResult<Ret> {
    trap("WeaveDrive not enabled: __asyncjs__weavedrive_close called without an open file")
}

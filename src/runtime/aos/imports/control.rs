//! Control flow, memory and stack imports (spec §5.1–5.2): `invoke_*` (setjmp/longjmp through
//! `dynCall_*` or the table), heap growth, `memcpy`, tempRet0, `abort`, `exit`.

use wasmtime::{Caller, Ref, Val, ValType};

use super::Ret;
use crate::runtime::aos::format::Glue;
use crate::runtime::aos::state::{Host, HostResult, HostTrap, call_ptr, exports, int, ptr, trap};

pub(super) fn throw_longjmp(_: &mut Caller<'_, Host>, _: &[Val]) -> HostResult<Ret> {
    Err(wasmtime::Error::new(HostTrap::LongJmp))
}

/// `invoke_<sig>(index, args…)`: call the function, catching a longjmp the way the glue does
/// (restore the stack, `setThrew(1, 0)`, return normally). E3/E4/W64 go through the exported
/// `dynCall_<sig>` trampoline (its frame is part of what Asyncify saves); E1/E2 call the table.
pub(super) fn invoke(caller: &mut Caller<'_, Host>, sig: &str, args: &[Val], results: &mut [Val]) -> HostResult<()> {
    let ex = exports(caller)?;
    let glue = caller.data().profile.glue;
    let sp = call_ptr(&mut *caller, &ex.stack_save, &[])?;
    let Some(first) = args.first() else { return trap("invoke_ called without a function index") };
    let index = int(first);
    let outcome = if matches!(glue, Glue::E1 | Glue::E2) {
        let entry = match &ex.table {
            Some(table) => table.get(&mut *caller, index as u32 as u64),
            None => return trap("module exports no function table for invoke_"),
        };
        match entry {
            Some(Ref::Func(Some(f))) => f.call(&mut *caller, &args[1..], results),
            _ => return trap(format!("invoke_{sig}: table index {index} is not a function")),
        }
    } else {
        let Some(f) = ex.dyncalls.get(sig) else { return trap(format!("module imports invoke_{sig} but exports no dynCall_{sig}")) };
        // `dynCall_<sig>(index, args…)`: the invoke's own arguments with the index as an i32.
        let mut small = [Val::I32(0); 8];
        let mut large = Vec::new();
        let call_args: &mut [Val] = if args.len() <= small.len() {
            &mut small[..args.len()]
        } else {
            large.resize(args.len(), Val::I32(0));
            &mut large
        };
        call_args[0] = Val::I32(index as i32);
        call_args[1..].copy_from_slice(&args[1..]);
        f.call(&mut *caller, call_args, results)
    };
    match outcome {
        Ok(()) => Ok(()),
        Err(e) if matches!(e.downcast_ref::<HostTrap>(), Some(HostTrap::LongJmp)) => {
            call_ptr(&mut *caller, &ex.stack_restore, &[sp])?;
            let Some(set_threw) = ex.set_threw else { return trap("module exports no setThrew") };
            let ty = set_threw.ty(&*caller);
            let threw: Vec<Val> =
                ty.params().zip([1i64, 0]).map(|(t, v)| if matches!(t, ValType::I64) { Val::I64(v) } else { Val::I32(v as i32) }).collect();
            set_threw.call(&mut *caller, &threw, &mut [])?;
            for r in results.iter_mut() {
                *r = match r {
                    Val::I64(_) => Val::I64(0),
                    Val::F32(_) => Val::F32(0),
                    Val::F64(_) => Val::F64(0),
                    _ => Val::I32(0),
                };
            }
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// The glue's `emscripten_resize_heap` growth rule (spec §5.2): try 20%, 10%, 5% over-growth
/// (capped at request + 96 MiB), aligned to 64 KiB and capped at the heap maximum. Computed in f64
/// like JS.
pub fn heap_growth_candidates(old: u64, requested: u64, heap_max: u64) -> Vec<u64> {
    if requested > heap_max {
        return Vec::new();
    }
    [1.0f64, 2.0, 4.0]
        .iter()
        .map(|cut| {
            let over = (old as f64 * (1.0 + 0.2 / cut)).min(requested as f64 + 100_663_296.0);
            let aligned = ((requested as f64).max(over) / 65536.0).ceil() * 65536.0;
            (heap_max as f64).min(aligned) as u64
        })
        .collect()
}

/// Grows memory to hold `requested` bytes by the glue's rule; false when every candidate fails.
pub(crate) fn grow_heap(caller: &mut impl wasmtime::AsContextMut<Data = Host>, memory: &wasmtime::Memory, requested: u64) -> bool {
    let heap_max = caller.as_context().data().profile.heap_max;
    let old = memory.data_size(&*caller) as u64;
    for new in heap_growth_candidates(old, requested, heap_max) {
        let pages = new.saturating_sub(old).div_ceil(65536);
        if memory.grow(&mut *caller, pages).is_ok() {
            return true;
        }
    }
    false
}

pub(super) fn resize_heap(caller: &mut Caller<'_, Host>, args: &[Val]) -> HostResult<Ret> {
    let memory = exports(caller)?.memory;
    let requested = args.first().map(ptr).unwrap_or(0);
    Ok(Ret::Int(i64::from(grow_heap(caller, &memory, requested))))
}

pub(super) fn memcpy(caller: &mut Caller<'_, Host>, args: &[Val]) -> HostResult<Ret> {
    let memory = exports(caller)?.memory;
    let [dest, src, n] = [0, 1, 2].map(|i| args.get(i).map(ptr).unwrap_or(0));
    let data = memory.data_mut(&mut *caller);
    let len = data.len() as u64;
    if src.checked_add(n).is_none_or(|e| e > len) || dest.checked_add(n).is_none_or(|e| e > len) {
        return trap(format!("memcpy out of bounds: {n} bytes from {src:#x} to {dest:#x}"));
    }
    data.copy_within(src as usize..(src + n) as usize, dest as usize);
    Ok(Ret::None)
}

pub(super) fn get_temp_ret0(caller: &mut Caller<'_, Host>, _: &[Val]) -> HostResult<Ret> {
    Ok(Ret::Int(caller.data().temp_ret0.into()))
}

pub(super) fn set_temp_ret0(caller: &mut Caller<'_, Host>, args: &[Val]) -> HostResult<Ret> {
    caller.data_mut().temp_ret0 = args.first().map(int).unwrap_or(0) as i32;
    Ok(Ret::None)
}

pub(super) fn abort(_: &mut Caller<'_, Host>, _: &[Val]) -> HostResult<Ret> {
    trap("native code called abort()")
}

pub(super) fn dl_abort(_: &mut Caller<'_, Host>, _: &[Val]) -> HostResult<Ret> {
    trap("dynamic linking is not supported (native code called abort())")
}

pub(super) fn exit(_: &mut Caller<'_, Host>, args: &[Val]) -> HostResult<Ret> {
    Err(wasmtime::Error::new(HostTrap::Exit(args.first().map(int).unwrap_or(0) as i32)))
}

pub(super) fn heap_max(caller: &mut Caller<'_, Host>, _: &[Val]) -> HostResult<Ret> {
    Ok(Ret::Int(caller.data().profile.heap_max as i64))
}

#[cfg(test)]
mod tests {
    use super::heap_growth_candidates;

    #[test]
    fn growth_rule_matches_the_glue() {
        // 96 pages, asking for 7 MiB more: 20% over-growth loses to the request, aligned up.
        let old = 96 * 65536;
        let req = old + 7 * 1024 * 1024 + 5;
        let c = heap_growth_candidates(old, req, 524_288_000);
        assert_eq!(c[0], req.div_ceil(65536) * 65536);
        // A small request from a big heap over-grows by 20%, 10%, 5% (64 KiB aligned).
        let old = 1088 * 65536;
        let c = heap_growth_candidates(old, old + 1, 4_294_901_760);
        assert_eq!(c, vec![85_590_016, 78_446_592, 74_907_648]);
        // Over-growth is capped at request + 96 MiB and at the heap maximum.
        let c = heap_growth_candidates(1 << 30, (1 << 30) + 1, 4_294_901_760);
        assert_eq!(c[0], ((1u64 << 30) + 1 + 100_663_296).div_ceil(65536) * 65536);
        assert_eq!(heap_growth_candidates(0, 600_000_000, 524_288_000), Vec::<u64>::new());
        assert_eq!(heap_growth_candidates(500_000_000, 510_000_000, 524_288_000)[0], 524_288_000);
    }
}

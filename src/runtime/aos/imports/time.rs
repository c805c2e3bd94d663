//! Clock and calendar imports (spec §5.3). The process runs in UTC; E1/E2's clock reads 0, E3/E4/W64
//! read a per-instance counter that starts at 10004 ms and ticks once per call.

use wasmtime::{Caller, Val};

use super::Ret;
use crate::runtime::aos::calendar::{self, Tm};
use crate::runtime::aos::format::Glue;
use crate::runtime::aos::state::{Host, HostResult, call_ptr, exports, int, ptr, read, read_cstr, read_ptr, read_u64, write, write_ptr};

pub(super) fn date_zero(_: &mut Caller<'_, Host>, _: &[Val]) -> HostResult<Ret> {
    Ok(Ret::F64(0.0))
}

pub(super) fn date_now(caller: &mut Caller<'_, Host>, _: &[Val]) -> HostResult<Ret> {
    let host = caller.data_mut();
    let now = host.now;
    host.now += 1.0;
    Ok(Ret::F64(now))
}

/// `performance.now()`: 0 for E1/E2 (never called by aos), the counter for E3.
pub(super) fn get_now(caller: &mut Caller<'_, Host>, args: &[Val]) -> HostResult<Ret> {
    if caller.data().profile.glue == Glue::E3 { date_now(caller, args) } else { Ok(Ret::F64(0.0)) }
}

pub(super) fn is_monotonic(_: &mut Caller<'_, Host>, _: &[Val]) -> HostResult<Ret> {
    Ok(Ret::Int(1))
}

const ZONE_NAME_E2: &[u8] = b"Coordinated Universal Time\0";

/// `_tzset_js`: UTC. E2 (once per instance) mallocs the winter then the summer zone name and stores
/// them summer first (the glue's branch for equal offsets); E3/E4/W64 write "UTC" into both buffers.
pub(super) fn tzset(caller: &mut Caller<'_, Host>, args: &[Val]) -> HostResult<Ret> {
    let ex = exports(caller)?;
    let (wasm64, glue) = (caller.data().profile.wasm64, caller.data().profile.glue);
    let a = |i: usize| args.get(i).map(ptr).unwrap_or(0);
    if glue == Glue::E2 || glue == Glue::E1 {
        if caller.data().tz_done {
            return Ok(Ret::None);
        }
        caller.data_mut().tz_done = true;
        write_ptr(&mut *caller, &ex.memory, wasm64, a(0), 0)?;
        write(&mut *caller, &ex.memory, a(1), &0i32.to_le_bytes())?;
        let winter = call_ptr(&mut *caller, &ex.malloc, &[ZONE_NAME_E2.len() as u64])?;
        write(&mut *caller, &ex.memory, winter, ZONE_NAME_E2)?;
        let summer = call_ptr(&mut *caller, &ex.malloc, &[ZONE_NAME_E2.len() as u64])?;
        write(&mut *caller, &ex.memory, summer, ZONE_NAME_E2)?;
        let size = if wasm64 { 8 } else { 4 };
        write_ptr(&mut *caller, &ex.memory, wasm64, a(2), summer)?;
        write_ptr(&mut *caller, &ex.memory, wasm64, a(2).saturating_add(size), winter)?;
    } else {
        write_ptr(&mut *caller, &ex.memory, wasm64, a(0), 0)?;
        write(&mut *caller, &ex.memory, a(1), &0i32.to_le_bytes())?;
        write(&mut *caller, &ex.memory, a(2), b"UTC\0")?;
        write(&mut *caller, &ex.memory, a(3), b"UTC\0")?;
    }
    Ok(Ret::None)
}

/// The time argument and the `tm` pointer of `_gmtime_js` / `_localtime_js`: E2 passes a pointer to
/// an i32 `time_t`, E3/E4 an i32 pair, W64 an i64.
fn time_and_tm(caller: &mut Caller<'_, Host>, args: &[Val]) -> HostResult<(i64, u64)> {
    let glue = caller.data().profile.glue;
    let a = |i: usize| args.get(i).map(ptr).unwrap_or(0);
    Ok(match glue {
        Glue::E1 | Glue::E2 => {
            let memory = exports(caller)?.memory;
            let b = read(&*caller, &memory, a(0), 4)?;
            (i64::from(i32::from_le_bytes([b[0], b[1], b[2], b[3]])), a(1))
        }
        Glue::W64 => (args.first().map(int).unwrap_or(0), a(1)),
        Glue::E3 | Glue::E4 => ((a(0) as u32 as i64) | (args.get(1).map(int).unwrap_or(0) << 32), a(2)),
    })
}

/// `tm_gmtoff` and `tm_zone` offsets: after nine ints on wasm32; aligned to 8 on memory64.
fn tail_offsets(wasm64: bool) -> (u64, u64) {
    if wasm64 { (40, 48) } else { (36, 40) }
}

fn write_tm(caller: &mut Caller<'_, Host>, at: u64, tm: &Tm, local: bool) -> HostResult<()> {
    let memory = exports(caller)?.memory;
    let wasm64 = caller.data().profile.wasm64;
    let fields = [tm.sec, tm.min, tm.hour, tm.mday, tm.mon, tm.year, tm.wday, tm.yday];
    let bytes: Vec<u8> = fields.iter().flat_map(|f| f.to_le_bytes()).collect();
    write(&mut *caller, &memory, at, &bytes)?;
    if local {
        write(&mut *caller, &memory, at.saturating_add(32), &0i32.to_le_bytes())?;
        let (gmtoff, _) = tail_offsets(wasm64);
        write_ptr(&mut *caller, &memory, wasm64, at.saturating_add(gmtoff), 0)?;
    }
    Ok(())
}

pub(super) fn gmtime(caller: &mut Caller<'_, Host>, args: &[Val]) -> HostResult<Ret> {
    let (secs, at) = time_and_tm(caller, args)?;
    write_tm(caller, at, &calendar::tm_from_unix(secs), false)?;
    Ok(Ret::None)
}

pub(super) fn localtime(caller: &mut Caller<'_, Host>, args: &[Val]) -> HostResult<Ret> {
    let (secs, at) = time_and_tm(caller, args)?;
    write_tm(caller, at, &calendar::tm_from_unix(secs), true)?;
    Ok(Ret::None)
}

fn read_tm(caller: &mut Caller<'_, Host>, at: u64) -> HostResult<Tm> {
    let memory = exports(caller)?.memory;
    let wasm64 = caller.data().profile.wasm64;
    let b = read(&*caller, &memory, at, 32)?;
    let f = |i: usize| i32::from_le_bytes([b[i * 4], b[i * 4 + 1], b[i * 4 + 2], b[i * 4 + 3]]);
    let (gmtoff_at, zone_at) = tail_offsets(wasm64);
    let gmtoff = if wasm64 {
        read_u64(&*caller, &memory, at.saturating_add(gmtoff_at))? as i64
    } else {
        i64::from(read_ptr(&*caller, &memory, false, at.saturating_add(gmtoff_at))? as u32 as i32)
    };
    let zone_ptr = read_ptr(&*caller, &memory, wasm64, at.saturating_add(zone_at))?;
    let zone = if zone_ptr == 0 { String::new() } else { read_cstr(&*caller, &memory, zone_ptr)? };
    Ok(Tm { sec: f(0), min: f(1), hour: f(2), mday: f(3), mon: f(4), year: f(5), wday: f(6), yday: f(7), gmtoff, zone })
}

/// `_mktime_js(tm)`: normalise in UTC, write the fields back, return the seconds (-1 when out of
/// range). E3/E4 return the high word through `_emscripten_tempret_set`.
pub(super) fn mktime(caller: &mut Caller<'_, Host>, args: &[Val]) -> HostResult<Ret> {
    let at = args.first().map(ptr).unwrap_or(0);
    let tm = read_tm(caller, at)?;
    let memory = exports(caller)?.memory;
    let Some((secs, norm)) = calendar::mktime(&tm) else { return Ok(Ret::Int(-1)) };
    let isdst = read(&*caller, &memory, at.saturating_add(32), 4)?;
    if i32::from_le_bytes([isdst[0], isdst[1], isdst[2], isdst[3]]) < 0 {
        write(&mut *caller, &memory, at.saturating_add(32), &0i32.to_le_bytes())?;
    }
    write_tm(caller, at, &norm, false)?;
    if matches!(caller.data().profile.glue, Glue::E3 | Glue::E4)
        && let Some(set) = exports(caller)?.tempret_set
    {
        set.call(&mut *caller, &[Val::I32((secs >> 32) as i32)], &mut [])?;
    }
    Ok(Ret::Int(secs))
}

/// `strftime(s, max, format, tm)`: writes the NUL-terminated result when it fits in `max` bytes and
/// returns its length, else 0.
pub(super) fn strftime(caller: &mut Caller<'_, Host>, args: &[Val]) -> HostResult<Ret> {
    let [s, max, format, tm_at] = [0, 1, 2, 3].map(|i| args.get(i).map(ptr).unwrap_or(0));
    let memory = exports(caller)?.memory;
    let format = read_cstr(&*caller, &memory, format)?;
    let tm = read_tm(caller, tm_at)?;
    let mut out = calendar::strftime(&format, &tm).into_bytes();
    if out.len() as u64 + 1 > max {
        return Ok(Ret::Int(0));
    }
    let len = out.len();
    out.push(0);
    write(&mut *caller, &memory, s, &out)?;
    Ok(Ret::Int(len as i64))
}

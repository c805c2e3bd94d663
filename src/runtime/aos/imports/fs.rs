//! File, environment and process imports (spec §5.4). There is no file system: paths answer
//! ENOENT, fds above 2 EBADF, stdout/stderr are counted and discarded (the loader mutes them),
//! stdin is at EOF, and `system` never runs anything (deliberately unlike the E3/E4/W64 glue on
//! Node, which spawns a shell).

use wasmtime::{Caller, Val};

use super::Ret;
use crate::runtime::aos::format::Glue;
use crate::runtime::aos::state::{DEFAULT_ENV, Host, HostResult, call_ptr, exports, int, ptr, read_ptr, write, write_ptr};

const EBADF: i64 = 8;
const ENOENT: i64 = 44;
const ENOSYS: i64 = 52;
const ERANGE: i64 = 68;
const ESPIPE: i64 = 70;

fn a(args: &[Val], i: usize) -> u64 {
    args.get(i).map(ptr).unwrap_or(0)
}

fn fd(args: &[Val]) -> i64 {
    args.first().map(int).unwrap_or(-1)
}

/// A size written back as u32 on wasm32, u64 on memory64.
fn write_size(caller: &mut Caller<'_, Host>, at: u64, v: u64) -> HostResult<()> {
    let (memory, wasm64) = (exports(caller)?.memory, caller.data().profile.wasm64);
    write_ptr(caller, &memory, wasm64, at, v)
}

pub(super) fn fd_write(caller: &mut Caller<'_, Host>, args: &[Val]) -> HostResult<Ret> {
    let (memory, wasm64) = (exports(caller)?.memory, caller.data().profile.wasm64);
    let (iov, count, nwritten) = (a(args, 1), a(args, 2), a(args, 3));
    let step = if wasm64 { 16 } else { 8 };
    let half = step / 2;
    let mut total = 0u64;
    for i in 0..count {
        let at = iov.saturating_add(i.saturating_mul(step));
        let _buf = read_ptr(&*caller, &memory, wasm64, at)?;
        total = total.saturating_add(read_ptr(&*caller, &memory, wasm64, at.saturating_add(half))?);
    }
    if matches!(fd(args), 1 | 2) {
        caller.data_mut().stdout_bytes += total;
    } else {
        return Ok(Ret::Int(EBADF));
    }
    write_size(caller, nwritten, total)?;
    Ok(Ret::Int(0))
}

pub(super) fn fd_read(caller: &mut Caller<'_, Host>, args: &[Val]) -> HostResult<Ret> {
    if fd(args) != 0 {
        return Ok(Ret::Int(EBADF));
    }
    write_size(caller, a(args, 3), 0)?;
    Ok(Ret::Int(0))
}

pub(super) fn fd_close(_: &mut Caller<'_, Host>, args: &[Val]) -> HostResult<Ret> {
    Ok(Ret::Int(if (0..=2).contains(&fd(args)) { 0 } else { EBADF }))
}

pub(super) fn fd_seek(_: &mut Caller<'_, Host>, args: &[Val]) -> HostResult<Ret> {
    Ok(Ret::Int(if (0..=2).contains(&fd(args)) { ESPIPE } else { EBADF }))
}

pub(super) fn fd_sync(_: &mut Caller<'_, Host>, args: &[Val]) -> HostResult<Ret> {
    Ok(Ret::Int(if (0..=2).contains(&fd(args)) { 0 } else { EBADF }))
}

/// A character-device fdstat for 0–2 (filetype 2, no flags, all rights).
pub(super) fn fd_fdstat_get(caller: &mut Caller<'_, Host>, args: &[Val]) -> HostResult<Ret> {
    if !(0..=2).contains(&fd(args)) {
        return Ok(Ret::Int(EBADF));
    }
    let memory = exports(caller)?.memory;
    let mut stat = [0u8; 24];
    stat[0] = 2;
    write(&mut *caller, &memory, a(args, 1), &stat)?;
    Ok(Ret::Int(0))
}

fn env_strings(caller: &Caller<'_, Host>) -> &'static [&'static str] {
    if caller.data().env_vars { &DEFAULT_ENV } else { &[] }
}

pub(super) fn environ_sizes_get(caller: &mut Caller<'_, Host>, args: &[Val]) -> HostResult<Ret> {
    let vars = env_strings(caller);
    let size: usize = vars.iter().map(|v| v.len() + 1).sum();
    write_size(caller, a(args, 0), vars.len() as u64)?;
    write_size(caller, a(args, 1), size as u64)?;
    Ok(Ret::Int(0))
}

/// The strings back to back with NULs from `buf`, their addresses in `environ` (no NULL entry, as
/// the glue writes it).
pub(super) fn environ_get(caller: &mut Caller<'_, Host>, args: &[Val]) -> HostResult<Ret> {
    let (memory, wasm64) = (exports(caller)?.memory, caller.data().profile.wasm64);
    let (environ, buf) = (a(args, 0), a(args, 1));
    let mut offset = 0u64;
    for (i, var) in env_strings(caller).iter().enumerate() {
        write_ptr(
            &mut *caller,
            &memory,
            wasm64,
            environ.saturating_add(i as u64 * if wasm64 { 8 } else { 4 }),
            buf.saturating_add(offset),
        )?;
        let mut bytes = var.as_bytes().to_vec();
        bytes.push(0);
        write(&mut *caller, &memory, buf.saturating_add(offset), &bytes)?;
        offset += bytes.len() as u64;
    }
    Ok(Ret::Int(0))
}

pub(super) fn enoent(_: &mut Caller<'_, Host>, _: &[Val]) -> HostResult<Ret> {
    Ok(Ret::Int(-ENOENT))
}

pub(super) fn ebadf(_: &mut Caller<'_, Host>, _: &[Val]) -> HostResult<Ret> {
    Ok(Ret::Int(-EBADF))
}

pub(super) fn enosys(_: &mut Caller<'_, Host>, _: &[Val]) -> HostResult<Ret> {
    Ok(Ret::Int(-ENOSYS))
}

pub(super) fn nothing(_: &mut Caller<'_, Host>, _: &[Val]) -> HostResult<Ret> {
    Ok(Ret::None)
}

const TCGETS: i64 = 21505;
const TIOCGWINSZ: i64 = 21523;

/// fds 0–2 are ttys: TCGETS writes the glue's termios, TIOCGWINSZ 24×80, the setters succeed.
pub(super) fn ioctl(caller: &mut Caller<'_, Host>, args: &[Val]) -> HostResult<Ret> {
    if !(0..=2).contains(&fd(args)) {
        return Ok(Ret::Int(-EBADF));
    }
    let memory = exports(caller)?.memory;
    let argp = a(args, 2);
    match args.get(1).map(int).unwrap_or(0) {
        TCGETS => {
            let mut termios = Vec::with_capacity(17 + 32);
            for flag in [25856u32, 5, 191, 35387] {
                termios.extend_from_slice(&flag.to_le_bytes());
            }
            termios.push(0);
            let cc = [3u8, 28, 127, 21, 4, 0, 1, 0, 17, 19, 26, 0, 18, 15, 23, 22, 0];
            termios.extend_from_slice(&cc);
            termios.resize(17 + 32, 0);
            // The glue writes the four flags and cc[0..32]; the line byte (+16) is left alone.
            write(&mut *caller, &memory, argp, &termios[..16])?;
            write(&mut *caller, &memory, argp.saturating_add(17), &termios[17..])?;
            Ok(Ret::Int(0))
        }
        TIOCGWINSZ => {
            write(&mut *caller, &memory, argp, &[24, 0, 80, 0])?;
            Ok(Ret::Int(0))
        }
        21506..=21512 | 21524 => Ok(Ret::Int(0)),
        _ => Ok(Ret::Int(-28)),
    }
}

pub(super) fn fcntl(caller: &mut Caller<'_, Host>, args: &[Val]) -> HostResult<Ret> {
    let fd = fd(args);
    if !(0..=2).contains(&fd) {
        return Ok(Ret::Int(-EBADF));
    }
    Ok(Ret::Int(match args.get(1).map(int).unwrap_or(0) {
        3 => i64::from(fd != 0),
        12 => {
            let memory = exports(caller)?.memory;
            write(&mut *caller, &memory, a(args, 2), &2i16.to_le_bytes())?;
            0
        }
        1 | 2 | 4 => 0,
        _ => -28,
    }))
}

pub(super) fn getcwd(caller: &mut Caller<'_, Host>, args: &[Val]) -> HostResult<Ret> {
    if a(args, 1) < 2 {
        return Ok(Ret::Int(-ERANGE));
    }
    let memory = exports(caller)?.memory;
    write(&mut *caller, &memory, a(args, 0), b"/\0")?;
    Ok(Ret::Int(2))
}

/// `system(cmd)`: NULL asks whether a shell exists (no: 0); anything else fails without running —
/// E1/E2 like their glue (-1, "Function not implemented"), E3/E4/W64 with -ENOSYS.
pub(super) fn system(caller: &mut Caller<'_, Host>, args: &[Val]) -> HostResult<Ret> {
    if a(args, 0) == 0 {
        return Ok(Ret::Int(0));
    }
    match caller.data().profile.glue {
        Glue::E1 | Glue::E2 => {
            let ex = exports(caller)?;
            if let Some(errno) = ex.errno_location {
                let at = call_ptr(&mut *caller, &errno, &[])?;
                write(&mut *caller, &ex.memory, at, &(ENOSYS as i32).to_le_bytes())?;
            }
            Ok(Ret::Int(-1))
        }
        _ => Ok(Ret::Int(-ENOSYS)),
    }
}

/// E1 glue stubs: `fd_close`/`fd_read` answer ENOSYS (52) as positive WASI errnos, `fd_seek` ESPIPE
/// (70), and the syscalls it leaves unimplemented return `undefined`, i.e. 0.
pub(super) fn e1_enosys(_: &mut Caller<'_, Host>, _: &[Val]) -> HostResult<Ret> {
    Ok(Ret::Int(ENOSYS))
}

pub(super) fn e1_espipe(_: &mut Caller<'_, Host>, _: &[Val]) -> HostResult<Ret> {
    Ok(Ret::Int(ESPIPE))
}

pub(super) fn e1_undefined(_: &mut Caller<'_, Host>, _: &[Val]) -> HostResult<Ret> {
    Ok(Ret::Int(0))
}

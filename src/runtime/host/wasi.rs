//! The deterministic `wasi_snapshot_preview1` subset of docs/abi.md, written by hand for 32-bit
//! pointers: captured stdio, no files, no environment, the message's timestamp as every clock, and
//! a random stream seeded by the message id.
//!
//! wasmtime-wasi's p1 is deliberately not used: it reads the host's clocks, entropy and files, which
//! would make evaluations differ between workers.
//!
//! Guest abuse of a host call (a pointer or length outside memory) returns `EFAULT` rather than
//! trapping, as a libc would see from a kernel; only `proc_exit` ends the evaluation.

use sha2::{Digest, Sha256};
use wasmtime::{Caller, Extern, Linker, Memory};

/// The import module name.
pub const MODULE: &str = "wasi_snapshot_preview1";

/// Captured stdout+stderr beyond this is dropped (the guest still sees its writes succeed).
pub const LOG_CAP: usize = 64 * 1024;

/// WASI errno values (witx `errno`).
pub mod errno {
    pub const SUCCESS: i32 = 0;
    pub const BADF: i32 = 8;
    pub const FAULT: i32 = 21;
    pub const INVAL: i32 = 28;
    pub const NOTSUP: i32 = 58;
    pub const SPIPE: i32 = 70;
}

/// Every linked function with its signature as rendered by `abi::signature`; the import check at
/// load refuses anything else, and a test checks that this table and `add_to_linker` agree.
pub const FUNCTIONS: &[(&str, &str)] = &[
    ("fd_write", "(i32, i32, i32, i32) -> i32"),
    ("fd_read", "(i32, i32, i32, i32) -> i32"),
    ("fd_close", "(i32) -> i32"),
    ("fd_seek", "(i32, i64, i32, i32) -> i32"),
    ("fd_fdstat_get", "(i32, i32) -> i32"),
    ("fd_fdstat_set_flags", "(i32, i32) -> i32"),
    ("fd_prestat_get", "(i32, i32) -> i32"),
    ("fd_prestat_dir_name", "(i32, i32, i32) -> i32"),
    ("environ_sizes_get", "(i32, i32) -> i32"),
    ("environ_get", "(i32, i32) -> i32"),
    ("args_sizes_get", "(i32, i32) -> i32"),
    ("args_get", "(i32, i32) -> i32"),
    ("clock_time_get", "(i32, i64, i32) -> i32"),
    ("clock_res_get", "(i32, i32) -> i32"),
    ("random_get", "(i32, i32) -> i32"),
    ("sched_yield", "() -> i32"),
    ("proc_exit", "(i32) -> ()"),
    ("poll_oneoff", "(i32, i32, i32, i32) -> i32"),
];

/// `proc_exit(code)`: the error that ends the evaluation, recovered by downcasting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("exit {0}")]
pub struct ProcExit(pub i32);

/// The per-evaluation WASI state.
#[derive(Debug)]
pub struct WasiCtx {
    timestamp_ns: u64,
    random: DetRandom,
    log: Vec<u8>,
    log_dropped: u64,
}

impl WasiCtx {
    pub fn new(timestamp_ms: u64, message_id: &str) -> Self {
        Self { timestamp_ns: timestamp_ms.saturating_mul(1_000_000), random: DetRandom::new(message_id), log: Vec::new(), log_dropped: 0 }
    }

    /// The captured stdout and stderr, lossily decoded, with a note when bytes were dropped.
    pub fn take_log(&mut self) -> String {
        let mut log = String::from_utf8_lossy(&self.log).into_owned();
        if self.log_dropped > 0 {
            log.push_str(&format!("\n[log truncated: {} more bytes dropped]", self.log_dropped));
        }
        self.log.clear();
        self.log_dropped = 0;
        log
    }

    fn capture(&mut self, bytes: &[u8]) {
        let room = LOG_CAP.saturating_sub(self.log.len());
        let keep = bytes.len().min(room);
        self.log.extend_from_slice(&bytes[..keep]);
        self.log_dropped += (bytes.len() - keep) as u64;
    }
}

/// sha256 in counter mode: block `i` is `sha256(seed ‖ i as u64 little-endian)`, where the seed is
/// `sha256(message id)`; successive `random_get` calls continue the stream.
#[derive(Debug)]
struct DetRandom {
    seed: [u8; 32],
    position: u64,
}

impl DetRandom {
    fn new(message_id: &str) -> Self {
        Self { seed: Sha256::digest(message_id.as_bytes()).into(), position: 0 }
    }

    fn fill(&mut self, out: &mut [u8]) {
        let mut done = 0;
        while done < out.len() {
            let block_index = self.position / 32;
            let offset = (self.position % 32) as usize;
            let mut h = Sha256::new();
            h.update(self.seed);
            h.update(block_index.to_le_bytes());
            let block = h.finalize();
            let n = (32 - offset).min(out.len() - done);
            out[done..done + n].copy_from_slice(&block[offset..offset + n]);
            done += n;
            self.position += n as u64;
        }
    }
}

/// A guest range `[ptr, ptr+len)`, or `None` when it leaves memory.
fn range(memory_len: usize, ptr: i32, len: u64) -> Option<std::ops::Range<usize>> {
    let start = ptr as u32 as u64;
    let end = start.checked_add(len)?;
    if end > memory_len as u64 {
        return None;
    }
    Some(start as usize..end as usize)
}

fn write_bytes(mem: &mut [u8], ptr: i32, bytes: &[u8]) -> Result<(), i32> {
    let r = range(mem.len(), ptr, bytes.len() as u64).ok_or(errno::FAULT)?;
    mem[r].copy_from_slice(bytes);
    Ok(())
}

fn read_u32(mem: &[u8], ptr: i32) -> Result<u32, i32> {
    let r = range(mem.len(), ptr, 4).ok_or(errno::FAULT)?;
    let mut b = [0u8; 4];
    b.copy_from_slice(&mem[r]);
    Ok(u32::from_le_bytes(b))
}

fn memory<T>(caller: &mut Caller<'_, T>) -> Option<Memory> {
    match caller.get_export("memory") {
        Some(Extern::Memory(m)) => Some(m),
        _ => None,
    }
}

fn errno_of(r: Result<(), i32>) -> i32 {
    match r {
        Ok(()) => errno::SUCCESS,
        Err(e) => e,
    }
}

/// Runs `f` over the guest memory and the context; no exported memory reads as a fault.
fn with_memory<T: 'static>(
    caller: &mut Caller<'_, T>,
    get: fn(&mut T) -> &mut WasiCtx,
    f: impl FnOnce(&mut [u8], &mut WasiCtx) -> Result<(), i32>,
) -> i32 {
    let Some(memory) = memory(caller) else { return errno::FAULT };
    let (mem, data) = memory.data_and_store_mut(caller);
    errno_of(f(mem, get(data)))
}

fn is_stdio(fd: i32) -> bool {
    (0..=2).contains(&fd)
}

fn fd_write(mem: &mut [u8], ctx: &mut WasiCtx, fd: i32, iovs: i32, iovs_len: i32, nwritten: i32) -> Result<(), i32> {
    if fd != 1 && fd != 2 {
        return Err(errno::BADF);
    }
    let count = iovs_len as u32 as u64;
    let table = range(mem.len(), iovs, count.checked_mul(8).ok_or(errno::FAULT)?).ok_or(errno::FAULT)?;
    // Check every buffer before capturing any, so a faulting call writes nothing.
    let mut bufs = Vec::with_capacity(count.min(1024) as usize);
    let mut total: u32 = 0;
    for i in 0..count as usize {
        let at = table.start + i * 8;
        let buf = read_u32(mem, at as i32)?;
        let len = read_u32(mem, (at + 4) as i32)?;
        let r = range(mem.len(), buf as i32, len as u64).ok_or(errno::FAULT)?;
        total = total.checked_add(len).ok_or(errno::INVAL)?;
        bufs.push(r);
    }
    range(mem.len(), nwritten, 4).ok_or(errno::FAULT)?;
    for r in bufs {
        ctx.capture(&mem[r]);
    }
    write_bytes(mem, nwritten, &total.to_le_bytes())
}

fn fd_fdstat_get(mem: &mut [u8], fd: i32, buf: i32) -> Result<(), i32> {
    const CHARACTER_DEVICE: u8 = 2;
    const RIGHT_FD_READ: u64 = 1 << 1;
    const RIGHT_FD_WRITE: u64 = 1 << 6;
    const RIGHT_POLL_FD_READWRITE: u64 = 1 << 27;
    if !is_stdio(fd) {
        return Err(errno::BADF);
    }
    let rights = if fd == 0 { RIGHT_FD_READ } else { RIGHT_FD_WRITE } | RIGHT_POLL_FD_READWRITE;
    // fdstat: filetype u8 @0, flags u16 @2, rights_base u64 @8, rights_inheriting u64 @16.
    let mut stat = [0u8; 24];
    stat[0] = CHARACTER_DEVICE;
    stat[8..16].copy_from_slice(&rights.to_le_bytes());
    write_bytes(mem, buf, &stat)
}

fn clock_valid(id: i32) -> bool {
    // realtime, monotonic, process_cputime_id, thread_cputime_id
    (0..=3).contains(&id)
}

/// Links the subset into `linker` under `wasi_snapshot_preview1`; `get` finds the context in the
/// store's data.
pub fn add_to_linker<T: 'static>(linker: &mut Linker<T>, get: fn(&mut T) -> &mut WasiCtx) -> wasmtime::Result<()> {
    linker.func_wrap(MODULE, "fd_write", move |mut c: Caller<'_, T>, fd: i32, iovs: i32, iovs_len: i32, nwritten: i32| {
        with_memory(&mut c, get, |mem, ctx| fd_write(mem, ctx, fd, iovs, iovs_len, nwritten))
    })?;
    linker.func_wrap(MODULE, "fd_read", |_: Caller<'_, T>, _fd: i32, _iovs: i32, _len: i32, _nread: i32| errno::BADF)?;
    linker.func_wrap(MODULE, "fd_close", |_: Caller<'_, T>, fd: i32| if is_stdio(fd) { errno::SUCCESS } else { errno::BADF })?;
    linker.func_wrap(
        MODULE,
        "fd_seek",
        |_: Caller<'_, T>, fd: i32, _offset: i64, _whence: i32, _newoffset: i32| {
            if is_stdio(fd) { errno::SPIPE } else { errno::BADF }
        },
    )?;
    linker.func_wrap(MODULE, "fd_fdstat_get", move |mut c: Caller<'_, T>, fd: i32, buf: i32| {
        if !is_stdio(fd) {
            return errno::BADF;
        }
        with_memory(&mut c, get, |mem, _| fd_fdstat_get(mem, fd, buf))
    })?;
    linker.func_wrap(
        MODULE,
        "fd_fdstat_set_flags",
        |_: Caller<'_, T>, fd: i32, _flags: i32| {
            if is_stdio(fd) { errno::SUCCESS } else { errno::BADF }
        },
    )?;
    linker.func_wrap(MODULE, "fd_prestat_get", |_: Caller<'_, T>, _fd: i32, _buf: i32| errno::BADF)?;
    linker.func_wrap(MODULE, "fd_prestat_dir_name", |_: Caller<'_, T>, _fd: i32, _path: i32, _len: i32| errno::BADF)?;
    for (sizes, get_name) in [("environ_sizes_get", "environ_get"), ("args_sizes_get", "args_get")] {
        linker.func_wrap(MODULE, sizes, move |mut c: Caller<'_, T>, count: i32, buf_size: i32| {
            with_memory(&mut c, get, |mem, _| {
                range(mem.len(), count, 4).ok_or(errno::FAULT)?;
                range(mem.len(), buf_size, 4).ok_or(errno::FAULT)?;
                write_bytes(mem, count, &0u32.to_le_bytes())?;
                write_bytes(mem, buf_size, &0u32.to_le_bytes())
            })
        })?;
        linker.func_wrap(MODULE, get_name, |_: Caller<'_, T>, _ptrs: i32, _buf: i32| errno::SUCCESS)?;
    }
    linker.func_wrap(MODULE, "clock_time_get", move |mut c: Caller<'_, T>, id: i32, _precision: i64, time: i32| {
        if !clock_valid(id) {
            return errno::INVAL;
        }
        with_memory(&mut c, get, |mem, ctx| write_bytes(mem, time, &ctx.timestamp_ns.to_le_bytes()))
    })?;
    linker.func_wrap(MODULE, "clock_res_get", move |mut c: Caller<'_, T>, id: i32, res: i32| {
        if !clock_valid(id) {
            return errno::INVAL;
        }
        with_memory(&mut c, get, |mem, _| write_bytes(mem, res, &1_000_000u64.to_le_bytes()))
    })?;
    linker.func_wrap(MODULE, "random_get", move |mut c: Caller<'_, T>, buf: i32, len: i32| {
        with_memory(&mut c, get, |mem, ctx| {
            let r = range(mem.len(), buf, len as u32 as u64).ok_or(errno::FAULT)?;
            ctx.random.fill(&mut mem[r]);
            Ok(())
        })
    })?;
    linker.func_wrap(MODULE, "sched_yield", |_: Caller<'_, T>| errno::SUCCESS)?;
    linker.func_wrap(MODULE, "proc_exit", |_: Caller<'_, T>, code: i32| -> wasmtime::Result<()> {
        Err(wasmtime::Error::new(ProcExit(code)))
    })?;
    linker.func_wrap(MODULE, "poll_oneoff", |_: Caller<'_, T>, _in: i32, _out: i32, _n: i32, _nevents: i32| errno::NOTSUP)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_stream_is_counter_mode_sha256_and_continues_across_calls() {
        let mut a = DetRandom::new("msg-1");
        let mut whole = [0u8; 80];
        a.fill(&mut whole);
        let mut b = DetRandom::new("msg-1");
        let (mut x, mut y) = ([0u8; 7], [0u8; 73]);
        b.fill(&mut x);
        b.fill(&mut y);
        assert_eq!(&whole[..7], &x);
        assert_eq!(&whole[7..], &y);
        let seed: [u8; 32] = Sha256::digest(b"msg-1").into();
        let mut h = Sha256::new();
        h.update(seed);
        h.update(1u64.to_le_bytes());
        assert_eq!(&whole[32..64], &h.finalize()[..]);
    }

    #[test]
    fn log_is_capped_with_a_note() {
        let mut ctx = WasiCtx::new(0, "");
        ctx.capture(&vec![b'a'; LOG_CAP - 1]);
        ctx.capture(b"bcd");
        let log = ctx.take_log();
        assert!(log.starts_with("aaa"));
        assert!(log.contains("ab\n[log truncated: 2 more bytes dropped]"), "{}", &log[log.len() - 60..]);
    }
}

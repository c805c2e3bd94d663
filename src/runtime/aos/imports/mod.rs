//! The host functions of the emscripten glues (spec §5), linked by `(module, name)` for a profile.
//!
//! Every import of a module must name a host function of its profile with the expected arity,
//! else the load fails ([`AosError::UnknownImport`] / [`AosError::BadImport`]), as the JS glue
//! fails with a `LinkError`. Pointer-width differences (wasm32 vs memory64) are absorbed by taking
//! arguments as [`Val`]s: pointers are read with [`ptr`], results written in the declared type.
//! `metering.usegas`, the hottest import, and `metering.out_of_gas` are bound as typed functions.

pub(super) mod control;
mod fs;
mod time;
pub(super) mod weave;

use wasmtime::{Caller, ExternType, Linker, Module, Val, ValType};

use super::AosError;
use super::format::{Glue, Profile};
use super::state::{Host, HostResult};

/// What a host function returns.
pub(super) enum Ret {
    None,
    Int(i64),
    F64(f64),
}

type Imp = fn(&mut Caller<'_, Host>, &[Val]) -> HostResult<Ret>;

/// One host function: its implementation and arity (params, results).
struct Binding(Imp, usize, usize);

/// The host function for `module.name` under `glue`, if the profile has one.
fn lookup(glue: Glue, module: &str, name: &str) -> Option<Binding> {
    let e2 = glue == Glue::E2;
    let b = |f: Imp, p, r| Some(Binding(f, p, r));
    match (module, name) {
        ("env", "_emscripten_throw_longjmp") => b(control::throw_longjmp, 0, 0),
        ("env", "emscripten_resize_heap") => b(control::resize_heap, 1, 1),
        ("env", "emscripten_memcpy_big") if e2 => b(control::memcpy, 3, 0),
        ("env", "_emscripten_memcpy_js") if !e2 => b(control::memcpy, 3, 0),
        ("env", "getTempRet0") => b(control::get_temp_ret0, 0, 1),
        ("env", "setTempRet0") => b(control::set_temp_ret0, 1, 0),
        ("env", "abort") | ("env", "_abort_js") => b(control::abort, 0, 0),
        ("env", "__assert_fail") => b(control::abort, 4, 0),
        ("env", "exit") => b(control::exit, 1, 0),
        ("env", "emscripten_get_heap_max") => b(control::heap_max, 0, 1),
        ("env", "_emscripten_date_now") if e2 => b(time::date_zero, 0, 1),
        ("env", "emscripten_date_now") if !e2 => b(time::date_now, 0, 1),
        ("env", "emscripten_get_now") => b(time::get_now, 0, 1),
        ("env", "_emscripten_get_now_is_monotonic") => b(time::is_monotonic, 0, 1),
        ("env", "_tzset_js") => b(time::tzset, if e2 { 3 } else { 4 }, 0),
        ("env", "_gmtime_js") | ("env", "_localtime_js") => b(
            if name == "_gmtime_js" { time::gmtime } else { time::localtime },
            match glue {
                Glue::W64 | Glue::E2 => 2,
                _ => 3,
            },
            0,
        ),
        ("env", "_mktime_js") => b(time::mktime, 1, 1),
        ("env", "strftime") => b(time::strftime, 4, 1),
        ("wasi_snapshot_preview1", "fd_write") => b(fs::fd_write, 4, 1),
        ("wasi_snapshot_preview1", "fd_read") => b(fs::fd_read, 4, 1),
        ("wasi_snapshot_preview1", "fd_close") => b(fs::fd_close, 1, 1),
        ("wasi_snapshot_preview1", "fd_seek") => b(fs::fd_seek, if glue == Glue::W64 { 4 } else { 5 }, 1),
        ("wasi_snapshot_preview1", "fd_sync") => b(fs::fd_sync, 1, 1),
        ("wasi_snapshot_preview1", "fd_fdstat_get") => b(fs::fd_fdstat_get, 2, 1),
        ("wasi_snapshot_preview1", "environ_sizes_get") => b(fs::environ_sizes_get, 2, 1),
        ("wasi_snapshot_preview1", "environ_get") => b(fs::environ_get, 2, 1),
        ("env", "__syscall_openat") => b(fs::enoent, 4, 1),
        ("env", "__syscall_ioctl") => b(fs::ioctl, 3, 1),
        ("env", "__syscall_fcntl64") => b(fs::fcntl, 3, 1),
        ("env", "__syscall_getcwd") => b(fs::getcwd, 2, 1),
        ("env", "__syscall_unlinkat")
        | ("env", "__syscall_renameat")
        | ("env", "__syscall_readlinkat")
        | ("env", "__syscall_newfstatat") => b(fs::enoent, ANY, 1),
        ("env", "__syscall_rmdir")
        | ("env", "__syscall_lstat64")
        | ("env", "__syscall_stat64")
        | ("env", "__syscall_mkdirat")
        | ("env", "__syscall_faccessat")
        | ("env", "__syscall_chmod")
        | ("env", "__syscall_utimensat") => b(fs::enoent, ANY, 1),
        ("env", "__syscall_dup3")
        | ("env", "__syscall_fstat64")
        | ("env", "__syscall_fchmod")
        | ("env", "__syscall_fchown32")
        | ("env", "__syscall_ftruncate64") => b(fs::ebadf, ANY, 1),
        ("env", "system") if e2 => b(fs::system, 1, 1),
        ("env", "_emscripten_system") if !e2 => b(fs::system, 1, 1),
        ("env", "_dlopen_js") | ("env", "_dlsym_js") => b(control::dl_abort, ANY, 1),
        ("env", "_dlinit") => b(fs::nothing, 1, 0),
        ("env", "_mmap_js") | ("env", "_munmap_js") => b(fs::enosys, ANY, 1),
        ("env", "metering_gasUsed") => b(weave::gas_used, 0, 1),
        ("env", "__asyncjs__weavedrive_open") if !e2 => b(weave::open, 2, 1),
        ("env", "__asyncjs__weavedrive_read") if !e2 => b(weave::read, 3, 1),
        ("env", "__asyncjs__weavedrive_close") if !e2 => b(weave::close, 1, 1),
        _ => None,
    }
}

/// E1 (`wasm32-unknown-emscripten`): minified imports `a.a`…`a.D` (spec §5.6).
fn lookup_e1(name: &str) -> Option<Binding> {
    let b = |f: Imp, p, r| Some(Binding(f, p, r));
    match name {
        "a" => b(time::date_zero, 0, 1),
        "b" => b(control::set_temp_ret0, 1, 0),
        "c" => b(fs::e1_enosys, 1, 1),
        "d" => b(fs::e1_undefined, 3, 1),
        "e" => b(fs::e1_undefined, 3, 1),
        "f" => b(fs::fd_write, 4, 1),
        "g" => b(fs::e1_undefined, 4, 1),
        "h" => b(control::get_temp_ret0, 0, 1),
        "i" => b(time::mktime, 1, 1),
        "j" => b(time::tzset, 3, 0),
        "k" => b(control::memcpy, 3, 0),
        "l" => b(control::exit, 1, 0),
        "m" => b(fs::system, 1, 1),
        "n" => b(time::strftime, 4, 1),
        "o" => b(fs::e1_espipe, 5, 1),
        "p" => b(control::throw_longjmp, 0, 0),
        "q" => b(control::resize_heap, 1, 1),
        "r" => b(fs::e1_undefined, 2, 1),
        "s" => b(fs::e1_undefined, 4, 1),
        "t" => b(fs::e1_undefined, 1, 1),
        "u" => b(fs::environ_get, 2, 1),
        "v" => b(fs::environ_sizes_get, 2, 1),
        "w" => b(fs::e1_undefined, 3, 1),
        "y" => b(fs::e1_enosys, 4, 1),
        "z" => b(fs::e1_undefined, 3, 1),
        "A" => b(time::is_monotonic, 0, 1),
        "B" => b(time::gmtime, 2, 0),
        "C" => b(time::localtime, 2, 0),
        "D" => b(control::abort, 0, 0),
        _ => None,
    }
}

/// Arity not checked for the rarely used syscalls whose parameter count varies between builds.
const ANY: usize = usize::MAX;

/// Links every import of `module` for `profile` into `linker`.
pub(super) fn link(linker: &mut Linker<Host>, module: &Module, profile: Profile) -> Result<(), AosError> {
    for import in module.imports() {
        let (m, n) = (import.module().to_owned(), import.name().to_owned());
        let ExternType::Func(ty) = import.ty() else {
            return Err(AosError::BadImport { module: m, name: n, detail: "only functions may be imported".into() });
        };
        let bad = |detail: String| AosError::BadImport { module: m.clone(), name: n.clone(), detail };
        let defined = |e: wasmtime::Error| AosError::Setup(format!("linking {m}.{n}: {e:#}"));
        if m == "metering" && n == "usegas" {
            weave::link_usegas(linker, &ty).map_err(|d| bad(d.to_owned()))?;
            continue;
        }
        if m == "metering" && n == "out_of_gas" {
            weave::link_out_of_gas(linker, &ty).map_err(|d| bad(d.to_owned()))?;
            continue;
        }
        let e1_invoke = profile.glue == Glue::E1 && m == "a" && n == "x";
        if (m == "env" && n.starts_with("invoke_")) || e1_invoke {
            if ty.results().len() > 1 || ty.params().len() == 0 {
                return Err(bad(format!("{ty:?} is not an invoke signature")));
            }
            let sig = if e1_invoke { "vii".to_owned() } else { n["invoke_".len()..].to_owned() };
            linker
                .func_new(&m, &n, ty.clone(), move |mut caller, args, results| control::invoke(&mut caller, &sig, args, results))
                .map_err(defined)?;
            continue;
        }
        let binding = if profile.glue == Glue::E1 { if m == "a" { lookup_e1(&n) } else { None } } else { lookup(profile.glue, &m, &n) };
        let Some(Binding(imp, params, results)) = binding else {
            return Err(AosError::UnknownImport { module: m, name: n, format: profile.format.name() });
        };
        if (params != ANY && ty.params().len() != params) || ty.results().len() != results {
            return Err(bad(format!("has type {ty:?}; the {} glue expects {params} parameters and {results} results", profile.format)));
        }
        let result_ty = ty.results().next();
        linker
            .func_new(&m, &n, ty.clone(), move |mut caller, args, out| {
                let ret = imp(&mut caller, args)?;
                set_result(out, result_ty.as_ref(), ret);
                Ok(())
            })
            .map_err(defined)?;
    }
    Ok(())
}

fn set_result(out: &mut [Val], ty: Option<&ValType>, ret: Ret) {
    let (Some(slot), Some(ty)) = (out.first_mut(), ty) else { return };
    let (i, f) = match ret {
        Ret::None => (0, 0.0),
        Ret::Int(i) => (i, i as f64),
        Ret::F64(f) => (f as i64, f),
    };
    *slot = match ty {
        ValType::I64 => Val::I64(i),
        ValType::F64 => Val::F64(f.to_bits()),
        ValType::F32 => Val::F32((f as f32).to_bits()),
        _ => Val::I32(i as i32),
    };
}

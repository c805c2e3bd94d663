//! NVRTC compilation of `kernels/*.cu` for one device, and the on-disk cache of the results.
//!
//! Each kernel file is one NVRTC program, compiled for the device's architecture (a cubin, or PTX
//! for a device newer than this NVRTC) with `--fmad=false`: no multiply-add is contracted unless a
//! kernel asks for `fmaf` itself, so the reproducible kernels keep the CPU's rounding. Every program
//! gets the registered headers (`kernels/*.cuh`, [`crate::gpu::kernels::HEADERS`]) as NVRTC named
//! headers, so `#include "common.cuh"` needs no file system. Results are cached under
//! `$XDG_CACHE_HOME/ao-gpu-worker/cuda` (else `~/.cache/ao-gpu-worker/cuda`), keyed by the sha256 of
//! (path, source, headers, options, target, NVRTC version). A cache entry carries the sha256 of its
//! payload; an entry that fails that check (or fails to load) is recompiled and rewritten. Cache
//! trouble is logged and never fatal.

use std::ffi::{CStr, CString, OsString, c_char, c_int};
use std::io::Write;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::launch::Target;
use crate::gpu::kernels::{Lang, headers};

/// NVRTC options every kernel file is compiled with (plus `--gpu-architecture`). Spelled out even
/// where they are NVRTC's defaults, so the cache key and the logs say exactly what was used.
pub(crate) const OPTIONS: &[&str] = &["--fmad=false", "--ftz=false", "--prec-div=true", "--prec-sqrt=true", "--std=c++17"];

/// Magic at the start of a cache entry; bump it when the format changes.
const MAGIC: &[u8; 8] = b"AOGPUCU1";

/// One compiled kernel file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Image {
    pub target: Target,
    /// A cubin, or PTX text without a trailing NUL.
    pub bytes: Vec<u8>,
}

/// Where compiled kernels are cached: `$XDG_CACHE_HOME/ao-gpu-worker/cuda` when that is set to an
/// absolute path (the XDG spec says to ignore relative ones), else `$HOME/.cache/ao-gpu-worker/cuda`,
/// else nowhere.
pub(crate) fn cache_dir(xdg_cache_home: Option<OsString>, home: Option<OsString>) -> Option<PathBuf> {
    let base = match xdg_cache_home.map(PathBuf::from).filter(|p| p.is_absolute()) {
        Some(p) => p,
        None => PathBuf::from(home.filter(|h| !h.is_empty())?).join(".cache"),
    };
    Some(base.join("ao-gpu-worker").join("cuda"))
}

/// The headers every kernel program is compiled with, as (include name, source): the registered
/// CUDA headers. [`compile`] hands exactly these to NVRTC and [`cache_key`] hashes exactly these.
pub(crate) fn program_headers() -> Vec<(&'static str, &'static str)> {
    headers(Lang::Cuda).map(|h| (h.include_name(), h.source)).collect()
}

/// The cache key of one kernel file: sha256 over every input of the compilation (the file, the
/// headers it may include, options, target, NVRTC version), hex.
pub(crate) fn cache_key(path: &str, source: &str, options: &[String], target: Target, nvrtc_version: (i32, i32)) -> String {
    cache_key_with(path, source, &program_headers(), options, target, nvrtc_version)
}

/// [`cache_key`] with the headers given.
fn cache_key_with(
    path: &str,
    source: &str,
    headers: &[(&str, &str)],
    options: &[String],
    target: Target,
    nvrtc_version: (i32, i32),
) -> String {
    let mut h = Sha256::new();
    for part in [MAGIC.as_slice(), path.as_bytes(), source.as_bytes()] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part);
    }
    h.update((headers.len() as u64).to_le_bytes());
    for part in headers.iter().flat_map(|&(name, text)| [name, text]) {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part.as_bytes());
    }
    for o in options {
        h.update((o.len() as u64).to_le_bytes());
        h.update(o.as_bytes());
    }
    h.update(target.arch().as_bytes());
    h.update(format!("\0{}\0{}.{}", matches!(target, Target::Cubin(_)), nvrtc_version.0, nvrtc_version.1).as_bytes());
    hex::encode(h.finalize())
}

/// The cache file of one kernel file: `<dir>/<file stem>-<arch>-<key>.bin`.
pub(crate) fn cache_file(dir: &Path, path: &str, target: Target, key: &str) -> PathBuf {
    let stem = Path::new(path).file_stem().and_then(|s| s.to_str()).unwrap_or("kernels");
    dir.join(format!("{stem}-{}-{key}.bin", target.arch()))
}

/// A cache entry's bytes: magic, sha256 of the payload, payload.
pub(crate) fn encode_entry(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(MAGIC.len() + 32 + payload.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&Sha256::digest(payload));
    out.extend_from_slice(payload);
    out
}

/// The payload of a cache entry, or `None` when it is truncated or corrupt.
pub(crate) fn decode_entry(entry: &[u8]) -> Option<&[u8]> {
    let rest = entry.strip_prefix(MAGIC.as_slice())?;
    if rest.len() < 32 {
        return None;
    }
    let (digest, payload) = rest.split_at(32);
    (Sha256::digest(payload).as_slice() == digest && !payload.is_empty()).then_some(payload)
}

/// A cached image, or `None` (missing, unreadable or corrupt: the caller recompiles).
pub(crate) fn read_cached(file: &Path, target: Target) -> Option<Image> {
    let entry = std::fs::read(file).ok()?;
    match decode_entry(&entry) {
        Some(payload) if valid_payload(target, payload) => Some(Image { target, bytes: payload.to_vec() }),
        _ => {
            tracing::warn!(file = %file.display(), "corrupt CUDA kernel cache entry; recompiling");
            None
        }
    }
}

/// PTX is loaded as a C string: it must be text without NUL bytes.
fn valid_payload(target: Target, payload: &[u8]) -> bool {
    match target {
        Target::Cubin(_) => true,
        Target::Ptx(_) => !payload.contains(&0) && std::str::from_utf8(payload).is_ok(),
    }
}

/// Writes a cache entry atomically (a temporary file renamed into place); failures are logged.
pub(crate) fn write_cached(file: &Path, image: &Image) {
    let write = || -> std::io::Result<()> {
        if let Some(dir) = file.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
        let tmp = file.with_extension(format!("tmp.{}.{nanos}", std::process::id()));
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&encode_entry(&image.bytes))?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, file).inspect_err(|_| {
            let _ = std::fs::remove_file(&tmp);
        })
    };
    if let Err(e) = write() {
        tracing::warn!(file = %file.display(), error = %e, "could not write the CUDA kernel cache");
    }
}

/// The NVRTC options for `target`.
pub(crate) fn options_for(target: Target) -> Vec<String> {
    let mut o: Vec<String> = OPTIONS.iter().map(|s| s.to_string()).collect();
    o.push(format!("--gpu-architecture={}", target.arch()));
    o
}

// ---- NVRTC calls (the library must be present: checked by the caller) ----

use cudarc::nvrtc::{result as nvrtc, sys as nvrtc_sys};

/// NVRTC's version as (major, minor).
pub(crate) fn nvrtc_version() -> Result<(i32, i32), String> {
    let (mut major, mut minor): (c_int, c_int) = (0, 0);
    // SAFETY: two valid out-pointers for the duration of the call.
    unsafe { nvrtc_sys::nvrtcVersion(&mut major, &mut minor) }.result().map_err(|e| format!("nvrtcVersion: {e:?}"))?;
    Ok((major, minor))
}

/// The `sm_XY` numbers this NVRTC can compile for.
pub(crate) fn supported_archs() -> Result<Vec<i32>, String> {
    let mut n: c_int = 0;
    // SAFETY: a valid out-pointer for the call.
    unsafe { nvrtc_sys::nvrtcGetNumSupportedArchs(&mut n) }.result().map_err(|e| format!("nvrtcGetNumSupportedArchs: {e:?}"))?;
    let mut archs = vec![0 as c_int; n.max(0) as usize];
    if !archs.is_empty() {
        // SAFETY: `archs` holds exactly the `n` entries NVRTC said it would write.
        unsafe { nvrtc_sys::nvrtcGetSupportedArchs(archs.as_mut_ptr()) }.result().map_err(|e| format!("nvrtcGetSupportedArchs: {e:?}"))?;
    }
    Ok(archs)
}

/// An NVRTC program, destroyed on drop.
struct Program(nvrtc_sys::nvrtcProgram);

impl Drop for Program {
    fn drop(&mut self) {
        // SAFETY: created by nvrtcCreateProgram and destroyed only here.
        let _ = unsafe { nvrtc::destroy_program(self.0) };
    }
}

/// Compiles one kernel file, with [`program_headers`] as NVRTC named headers; the error carries
/// NVRTC's log.
pub(crate) fn compile(path: &str, source: &str, target: Target) -> Result<Image, String> {
    let src = CString::new(source).map_err(|_| format!("{path}: the source contains a NUL byte"))?;
    let name = CString::new(path).map_err(|_| format!("{path}: the path contains a NUL byte"))?;
    // Declared before `prog`, so they outlive it.
    let (header_names, header_sources) = program_headers()
        .into_iter()
        .map(|(n, t)| Ok((CString::new(n).map_err(|_| ())?, CString::new(t).map_err(|_| ())?)))
        .collect::<std::result::Result<(Vec<CString>, Vec<CString>), ()>>()
        .map_err(|()| format!("{path}: a header contains a NUL byte"))?;
    let name_ptrs: Vec<*const c_char> = header_names.iter().map(|c| c.as_ptr()).collect();
    let source_ptrs: Vec<*const c_char> = header_sources.iter().map(|c| c.as_ptr()).collect();
    let count = c_int::try_from(name_ptrs.len()).map_err(|_| format!("{path}: too many headers"))?;
    let mut raw: nvrtc_sys::nvrtcProgram = std::ptr::null_mut();
    // SAFETY: every pointer is a NUL-terminated string alive for the call (NVRTC copies them), and
    // both arrays hold `count` entries.
    unsafe { nvrtc_sys::nvrtcCreateProgram(&mut raw, src.as_ptr(), name.as_ptr(), count, source_ptrs.as_ptr(), name_ptrs.as_ptr()) }
        .result()
        .map_err(|e| format!("{path}: nvrtcCreateProgram: {e:?}"))?;
    let prog = Program(raw);
    let options = options_for(target);
    // SAFETY: `prog` is a live program; the options are NUL-free ASCII.
    if let Err(e) = unsafe { nvrtc::compile_program(prog.0, &options) } {
        // SAFETY: `prog` is live; the log is NUL-terminated by NVRTC.
        let log = unsafe { nvrtc::get_program_log(prog.0) }.map(|l| c_chars_to_string(&l)).unwrap_or_default();
        return Err(format!("{path}: NVRTC {e:?} with {options:?}:\n{log}"));
    }
    let bytes = match target {
        Target::Cubin(_) => {
            let mut size = 0usize;
            // SAFETY: `prog` compiled successfully; valid out-pointer.
            unsafe { nvrtc_sys::nvrtcGetCUBINSize(prog.0, &mut size) }.result().map_err(|e| format!("{path}: nvrtcGetCUBINSize: {e:?}"))?;
            let mut buf = vec![0u8; size];
            // SAFETY: `buf` holds the `size` bytes NVRTC reported.
            unsafe { nvrtc_sys::nvrtcGetCUBIN(prog.0, buf.as_mut_ptr().cast::<c_char>()) }
                .result()
                .map_err(|e| format!("{path}: nvrtcGetCUBIN: {e:?}"))?;
            buf
        }
        Target::Ptx(_) => {
            // SAFETY: `prog` compiled successfully.
            let ptx = unsafe { nvrtc::get_ptx(prog.0) }.map_err(|e| format!("{path}: nvrtcGetPTX: {e:?}"))?;
            c_chars_to_string(&ptx).into_bytes()
        }
    };
    if bytes.is_empty() {
        return Err(format!("{path}: NVRTC returned an empty image"));
    }
    Ok(Image { target, bytes })
}

/// A NUL-terminated (or unterminated) C char buffer as a String, lossily.
fn c_chars_to_string(chars: &[c_char]) -> String {
    let bytes: Vec<u8> = chars.iter().map(|&c| c as u8).collect();
    match CStr::from_bytes_until_nul(&bytes) {
        Ok(s) => s.to_string_lossy().into_owned(),
        Err(_) => String::from_utf8_lossy(&bytes).into_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_dir_follows_xdg_then_home() {
        let d = cache_dir(Some("/x/cache".into()), Some("/home/u".into())).unwrap();
        assert_eq!(d, PathBuf::from("/x/cache/ao-gpu-worker/cuda"));
        // Relative or empty XDG_CACHE_HOME is ignored, per the XDG base directory spec.
        let d = cache_dir(Some("rel/cache".into()), Some("/home/u".into())).unwrap();
        assert_eq!(d, PathBuf::from("/home/u/.cache/ao-gpu-worker/cuda"));
        let d = cache_dir(Some("".into()), Some("/home/u".into())).unwrap();
        assert_eq!(d, PathBuf::from("/home/u/.cache/ao-gpu-worker/cuda"));
        assert_eq!(cache_dir(None, None), None);
        assert_eq!(cache_dir(None, Some("".into())), None);
    }

    #[test]
    fn cache_key_covers_every_input() {
        let opts = options_for(Target::Cubin(90));
        let base = cache_key("kernels/a.cu", "src", &opts, Target::Cubin(90), (13, 0));
        assert_eq!(base.len(), 64);
        assert_eq!(base, cache_key("kernels/a.cu", "src", &opts, Target::Cubin(90), (13, 0)), "deterministic");
        let variants = [
            cache_key("kernels/b.cu", "src", &opts, Target::Cubin(90), (13, 0)),
            cache_key("kernels/a.cu", "src ", &opts, Target::Cubin(90), (13, 0)),
            cache_key("kernels/a.cu", "src", &options_for(Target::Cubin(80)), Target::Cubin(90), (13, 0)),
            cache_key("kernels/a.cu", "src", &opts, Target::Cubin(89), (13, 0)),
            cache_key("kernels/a.cu", "src", &opts, Target::Ptx(90), (13, 0)),
            cache_key("kernels/a.cu", "src", &opts, Target::Cubin(90), (13, 1)),
            cache_key("kernels/a.cu", "src", &opts, Target::Cubin(90), (12, 0)),
            // Concatenation cannot alias: the parts are length-prefixed.
            cache_key("kernels/a.cus", "rc", &opts, Target::Cubin(90), (13, 0)),
        ];
        for (i, v) in variants.iter().enumerate() {
            assert_ne!(*v, base, "variant {i}");
        }
        // The headers are inputs too: their names, their texts, how many there are.
        let hdr = |headers: &[(&str, &str)]| cache_key_with("kernels/a.cu", "src", headers, &opts, Target::Cubin(90), (13, 0));
        let with = hdr(&[("common.cuh", "int x;")]);
        let keys = [
            hdr(&[]),
            with.clone(),
            hdr(&[("other.cuh", "int x;")]),
            hdr(&[("common.cuh", "int y;")]),
            hdr(&[("common.cuh", "int x;"), ("more.cuh", "")]),
            hdr(&[("common.cuh", "int x;src")]),
        ];
        for (i, a) in keys.iter().enumerate() {
            for b in &keys[i + 1..] {
                assert_ne!(a, b, "header variant {i}");
            }
        }
        assert_eq!(with, hdr(&[("common.cuh", "int x;")]), "deterministic");
        // `cache_key` hashes the registered headers, which are exactly what `compile` hands NVRTC.
        let registered = program_headers();
        assert!(registered.iter().any(|(name, text)| *name == "common.cuh" && text.contains("repro_exp")), "{registered:?}");
        assert_eq!(base, hdr(&registered));
        assert_ne!(base, hdr(&[]));
        let f = cache_file(Path::new("/c"), "kernels/matmul.cu", Target::Cubin(90), &base);
        assert_eq!(f, PathBuf::from(format!("/c/matmul-sm_90-{base}.bin")));
    }

    #[test]
    fn options_disable_contraction() {
        let o = options_for(Target::Ptx(120));
        assert!(o.contains(&"--fmad=false".to_owned()));
        assert!(o.contains(&"--gpu-architecture=compute_120".to_owned()));
        assert!(!o.iter().any(|o| o.contains("fast-math") || o.contains("fast_math")));
    }

    #[test]
    fn cache_entries_detect_corruption() {
        let payload = b"\x7fELF cubin bytes".to_vec();
        let entry = encode_entry(&payload);
        assert_eq!(decode_entry(&entry), Some(payload.as_slice()));
        for cut in [0, 7, 8, 39, 40, entry.len() - 1] {
            assert_eq!(decode_entry(&entry[..cut]), None, "truncated at {cut}");
        }
        for flip in [0, 9, 45, entry.len() - 1] {
            let mut bad = entry.clone();
            bad[flip] ^= 0x20;
            assert_eq!(decode_entry(&bad), None, "byte {flip} flipped");
        }
        assert_eq!(decode_entry(&encode_entry(b"")), None, "an empty image is never valid");
    }

    #[test]
    fn cache_round_trip_and_recovery_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let file = cache_file(&dir.path().join("nested"), "kernels/x.cu", Target::Ptx(90), "k");
        assert_eq!(read_cached(&file, Target::Ptx(90)), None, "missing");
        let image = Image { target: Target::Ptx(90), bytes: b".version 9.0\n.target sm_90\n".to_vec() };
        write_cached(&file, &image);
        assert_eq!(read_cached(&file, Target::Ptx(90)), Some(image.clone()));
        // No temporary files left behind.
        let names: Vec<_> = std::fs::read_dir(file.parent().unwrap()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 1, "{names:?}");
        // A corrupted entry reads as missing (so it is recompiled), and rewriting it repairs it.
        let mut bytes = std::fs::read(&file).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&file, &bytes).unwrap();
        assert_eq!(read_cached(&file, Target::Ptx(90)), None);
        write_cached(&file, &image);
        assert_eq!(read_cached(&file, Target::Ptx(90)), Some(image));
        // PTX with a NUL inside would break the C-string load: rejected even with a valid digest.
        std::fs::write(&file, encode_entry(b"ptx\0text")).unwrap();
        assert_eq!(read_cached(&file, Target::Ptx(90)), None);
        assert!(read_cached(&file, Target::Cubin(90)).is_some(), "cubins are binary");
        // An unwritable location is logged, not fatal.
        write_cached(Path::new("/proc/ao-gpu-worker-cannot-write/x.bin"), &Image { target: Target::Cubin(90), bytes: vec![1] });
    }
}

//! A host emulator of the CUDA device, for the unit tests: the real `kernels/*.cu` sources (and the
//! `kernels/*.cuh` headers they include) compiled for the CPU with clang (`emu_prelude.h` maps the
//! CUDA built-ins; AddressSanitizer catches any out-of-bounds access), run by a child process
//! (`emu_runtime.cpp`) that the [`EmuDevice`] drives through the same [`Device`] trait as the real
//! GPU. The tests then run the backend's [`Engine`] unchanged against the CPU backend: argument
//! lists against each kernel's C signature (checked by the emulator), index arithmetic, grid-stride
//! loops (the emulator runs at most 3 blocks), barriers and shuffles, and the bit-exactness of every
//! reproducible kernel.
//!
//! Needs clang++ (Debian's clang-16) at test time; without it the tests print a loud skip, unless
//! `REQUIRE_CUDA_EMU=1` makes that a failure. What it cannot show: NVRTC accepting the sources (see
//! tests/all/cuda_backend.rs for the clang CUDA syntax check), device-specific math (expf, tanhf), real
//! warp scheduling, and performance.

use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};

use sha2::{Digest, Sha256};

use super::device::{Arg, Device, check_range};
use super::launch::GemmPlan;
use crate::gpu::kernels::{FILES, Lang, headers};
use crate::gpu::{GpuError, Result};

const PRELUDE: &str = include_str!("emu_prelude.h");
/// The start of the error when there is no C++ compiler (the one reason the tests skip).
pub(crate) const NO_CXX: &str = "no clang++";
const RUNTIME: &str = include_str!("emu_runtime.cpp");
const CXXFLAGS: &[&str] = &["-std=c++20", "-O1", "-ffp-contract=off", "-fsanitize=address", "-fno-omit-frame-pointer", "-w"];

/// One `extern "C" __global__` kernel of a source file: name and (type, is pointer) per parameter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct KernelSig {
    pub name: String,
    pub params: Vec<(String, bool)>,
}

/// Every `extern "C" __global__ ... void name(params)` in `source`.
pub(crate) fn kernel_signatures(source: &str) -> Vec<KernelSig> {
    let mut out = Vec::new();
    let mut rest = source;
    while let Some(at) = rest.find("extern \"C\" __global__") {
        rest = &rest[at + 1..];
        let Some(v) = rest.find("void ") else { break };
        let after = &rest[v + 5..];
        let Some(open) = after.find('(') else { break };
        let Some(close) = after.find(')') else { break };
        let name = after[..open].trim().to_owned();
        let params = after[open + 1..close]
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(|p| {
                let ident_start = p.rfind(|c: char| !(c.is_alphanumeric() || c == '_')).map_or(0, |i| i + 1);
                let ty = p[..ident_start].trim().to_owned();
                let is_ptr = ty.ends_with('*');
                (ty, is_ptr)
            })
            .collect();
        out.push(KernelSig { name, params });
    }
    out
}

/// C++ that registers every kernel of one file with the emulator runtime.
fn glue(source: &str) -> String {
    let mut g = String::from("\n// ---- emulator glue ----\n");
    for k in kernel_signatures(source) {
        let n = &k.name;
        let args: Vec<String> = k.params.iter().enumerate().map(|(i, (ty, _))| format!("*({ty} *)a[{i}]")).collect();
        let sizes: Vec<String> = k.params.iter().map(|(ty, _)| format!("(int)sizeof({ty})")).collect();
        let ptrs: Vec<&str> = k.params.iter().map(|(_, p)| if *p { "1" } else { "0" }).collect();
        g.push_str(&format!(
            "static void emu_call_{n}(void **a) {{ {n}({}); }}\n\
             static const int emu_sizes_{n}[] = {{{}}};\n\
             static const int emu_ptrs_{n}[] = {{{}}};\n\
             static const EmuKernel emu_k_{n} = {{\"{n}\", emu_call_{n}, {}, emu_sizes_{n}, emu_ptrs_{n}}};\n\
             static EmuRegistrar emu_r_{n}(&emu_k_{n});\n",
            args.join(", "),
            sizes.join(", "),
            ptrs.join(", "),
            k.params.len()
        ));
    }
    g
}

/// The C++ compiler: `$AO_EMU_CXX`, else clang++-16, else clang++.
fn cxx() -> Option<String> {
    if let Some(c) = std::env::var_os("AO_EMU_CXX") {
        return c.into_string().ok();
    }
    ["clang++-16", "clang++"]
        .into_iter()
        .find(|c| Command::new(c).arg("--version").output().is_ok_and(|o| o.status.success()))
        .map(str::to_owned)
}

/// Builds (once per process, cached on disk by content) the emulator executable.
fn emulator() -> std::result::Result<&'static Path, String> {
    static EXE: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    EXE.get_or_init(build).as_deref().map_err(Clone::clone)
}

fn build() -> std::result::Result<PathBuf, String> {
    let cxx = cxx().ok_or_else(|| format!("{NO_CXX} (install clang-16, or set AO_EMU_CXX)"))?;
    let files: Vec<_> = FILES.iter().filter(|f| f.lang == Lang::Cuda).collect();
    let mut h = Sha256::new();
    for part in [cxx.as_str(), PRELUDE, RUNTIME]
        .into_iter()
        .chain(CXXFLAGS.iter().copied())
        .chain(files.iter().map(|f| f.source))
        .chain(headers(Lang::Cuda).flat_map(|h| [h.include_name(), h.source]))
    {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part.as_bytes());
    }
    let dir = std::env::temp_dir().join("ao-gpu-worker-cuda-emu").join(&hex::encode(h.finalize())[..16]);
    let exe = dir.join("emu");
    if exe.exists() {
        return Ok(exe);
    }
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    std::fs::write(dir.join("emu_prelude.h"), PRELUDE).map_err(|e| e.to_string())?;
    // `#include "common.cuh"` finds the embedded copy next to the sources (the directory is on -I).
    for header in headers(Lang::Cuda) {
        std::fs::write(dir.join(header.include_name()), header.source).map_err(|e| e.to_string())?;
    }
    let compile = |name: &str, text: String| -> std::result::Result<PathBuf, String> {
        let src = dir.join(format!("{name}.cpp"));
        let obj = dir.join(format!("{name}.o"));
        std::fs::write(&src, text).map_err(|e| e.to_string())?;
        let out = Command::new(&cxx)
            .args(CXXFLAGS)
            .arg("-include")
            .arg(dir.join("emu_prelude.h"))
            .arg("-I")
            .arg(&dir)
            .arg("-c")
            .arg(&src)
            .arg("-o")
            .arg(&obj)
            .output()
            .map_err(|e| format!("{cxx}: {e}"))?;
        if !out.status.success() {
            return Err(format!("{cxx} {name}: {}", String::from_utf8_lossy(&out.stderr)));
        }
        Ok(obj)
    };
    // Compile the translation units in parallel: one per kernel file, plus the runtime.
    let objects: Vec<std::result::Result<PathBuf, String>> = std::thread::scope(|s| {
        let mut jobs = vec![s.spawn(|| compile("runtime", RUNTIME.to_owned()))];
        for f in &files {
            let stem = Path::new(f.path).file_stem().and_then(|s| s.to_str()).unwrap_or("kernels").to_owned();
            let text = format!("#line 1 \"{}\"\n{}{}", f.path, f.source, glue(f.source));
            jobs.push(s.spawn(move || compile(&format!("k_{stem}"), text)));
        }
        jobs.into_iter().map(|j| j.join().unwrap_or_else(|_| Err("compile thread panicked".to_owned()))).collect()
    });
    let objects = objects.into_iter().collect::<std::result::Result<Vec<_>, _>>()?;
    let tmp = dir.join(format!("emu.tmp.{}", std::process::id()));
    let out = Command::new(&cxx).args(CXXFLAGS).args(&objects).arg("-o").arg(&tmp).output().map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!("linking the emulator: {}", String::from_utf8_lossy(&out.stderr)));
    }
    std::fs::rename(&tmp, &exe).map_err(|e| e.to_string())?;
    Ok(exe)
}

/// The emulator process and its pipes.
struct Conn {
    io: Mutex<Io>,
    log: PathBuf,
}

struct Io {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    dead: Option<String>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        if let Ok(io) = self.io.get_mut() {
            let _ = io.child.kill();
            let _ = io.child.wait();
        }
        let _ = std::fs::remove_file(&self.log);
    }
}

impl Conn {
    /// Sends one request and reads the status and `reply_len` bytes of payload.
    fn call(&self, req: &[u8], reply_len: usize) -> Result<Vec<u8>> {
        let mut io = self.io.lock().map_err(|_| GpuError::Device("emulator lock poisoned".to_owned()))?;
        if let Some(why) = &io.dead {
            return Err(GpuError::Device(why.clone()));
        }
        let r = (|| -> std::io::Result<std::result::Result<Vec<u8>, String>> {
            io.stdin.write_all(req)?;
            io.stdin.flush()?;
            let mut status = [0u8; 1];
            io.stdout.read_exact(&mut status)?;
            if status[0] != 0 {
                let mut n = [0u8; 4];
                io.stdout.read_exact(&mut n)?;
                let mut msg = vec![0u8; u32::from_le_bytes(n) as usize];
                io.stdout.read_exact(&mut msg)?;
                return Ok(Err(String::from_utf8_lossy(&msg).into_owned()));
            }
            let mut out = vec![0u8; reply_len];
            io.stdout.read_exact(&mut out)?;
            Ok(Ok(out))
        })();
        match r {
            Ok(Ok(out)) => Ok(out),
            Ok(Err(msg)) => Err(GpuError::Device(format!("emulator: {msg}"))),
            Err(e) => {
                let _ = io.child.kill();
                let _ = io.child.wait();
                let log = std::fs::read_to_string(&self.log).unwrap_or_default();
                let why = format!("emulator died ({e}):\n{log}");
                io.dead = Some(why.clone());
                Err(GpuError::Device(why))
            }
        }
    }
}

/// A buffer in the emulator process, freed there on drop.
pub(crate) struct EmuBuf {
    id: u64,
    len: usize,
    conn: Arc<Conn>,
}

impl Drop for EmuBuf {
    fn drop(&mut self) {
        let mut req = vec![2u8];
        req.extend(self.id.to_le_bytes());
        let _ = self.conn.call(&req, 0);
    }
}

/// The [`Device`] of the unit tests: the kernels run on the host in a child process.
pub(crate) struct EmuDevice {
    conn: Arc<Conn>,
    /// Whether `gemm` is served (by a column-major reference SGEMM, like cuBLAS) or refused.
    blas: bool,
}

impl EmuDevice {
    /// Starts an emulator process; `Err` with the reason when there is no C++ compiler.
    pub fn start(blas: bool) -> std::result::Result<Self, String> {
        let exe = emulator()?;
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let log = exe.with_file_name(format!("emu-{}-{n}.log", std::process::id()));
        let err = std::fs::File::create(&log).map_err(|e| e.to_string())?;
        let mut child = Command::new(exe)
            .env("ASAN_OPTIONS", "detect_leaks=0:abort_on_error=0")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(err)
            .spawn()
            .map_err(|e| format!("{}: {e}", exe.display()))?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            return Err("emulator pipes".to_owned());
        };
        let io = Io { child, stdin, stdout: BufReader::new(stdout), dead: None };
        Ok(Self { conn: Arc::new(Conn { io: Mutex::new(io), log }), blas })
    }
}

fn push_u64(v: &mut Vec<u8>, x: u64) {
    v.extend(x.to_le_bytes());
}

impl Device for EmuDevice {
    type Buf = EmuBuf;

    fn describe(&self) -> String {
        "host emulator".to_owned()
    }

    fn alloc(&self, bytes: usize) -> Result<EmuBuf> {
        let mut req = vec![1u8];
        push_u64(&mut req, bytes.max(1) as u64);
        let id = self.conn.call(&req, 8)?;
        let id = u64::from_le_bytes(id.try_into().map_err(|_| GpuError::Device("emulator: bad id".to_owned()))?);
        Ok(EmuBuf { id, len: bytes.max(1), conn: self.conn.clone() })
    }

    fn capacity(buf: &EmuBuf) -> usize {
        buf.len
    }

    fn upload(&self, dst: &EmuBuf, offset: usize, data: &[u8]) -> Result<()> {
        check_range("upload", dst.len, offset, data.len())?;
        let mut req = vec![3u8];
        for x in [dst.id, offset as u64, data.len() as u64] {
            push_u64(&mut req, x);
        }
        req.extend_from_slice(data);
        self.conn.call(&req, 0).map(drop)
    }

    fn download(&self, src: &EmuBuf, offset: usize, len: usize) -> Result<Vec<u8>> {
        check_range("download", src.len, offset, len)?;
        let mut req = vec![4u8];
        for x in [src.id, offset as u64, len as u64] {
            push_u64(&mut req, x);
        }
        self.conn.call(&req, len)
    }

    fn copy(&self, src: &EmuBuf, src_offset: usize, dst: &EmuBuf, dst_offset: usize, len: usize) -> Result<()> {
        check_range("copy source", src.len, src_offset, len)?;
        check_range("copy destination", dst.len, dst_offset, len)?;
        let mut req = vec![5u8];
        for x in [src.id, src_offset as u64, dst.id, dst_offset as u64, len as u64] {
            push_u64(&mut req, x);
        }
        self.conn.call(&req, 0).map(drop)
    }

    fn zero(&self, dst: &EmuBuf, offset: usize, len: usize) -> Result<()> {
        check_range("zero", dst.len, offset, len)?;
        let mut req = vec![6u8];
        for x in [dst.id, offset as u64, len as u64] {
            push_u64(&mut req, x);
        }
        self.conn.call(&req, 0).map(drop)
    }

    fn launch(&self, kernel: &str, grid: u32, args: &[Arg<'_, EmuBuf>]) -> Result<()> {
        let mut req = vec![7u8];
        req.extend((kernel.len() as u32).to_le_bytes());
        req.extend(kernel.as_bytes());
        req.extend(grid.to_le_bytes());
        req.extend((args.len() as u32).to_le_bytes());
        for a in args {
            let value: Vec<u8> = match a {
                Arg::Buf(b) => {
                    req.push(0);
                    push_u64(&mut req, b.id);
                    continue;
                }
                Arg::U32(v) => v.to_le_bytes().to_vec(),
                Arg::F32(v) => v.to_le_bytes().to_vec(),
                Arg::Pod(bytes) => bytes.to_vec(),
            };
            req.push(1);
            req.extend((value.len() as u32).to_le_bytes());
            req.extend(value);
        }
        self.conn.call(&req, 0).map(drop)
    }

    /// As `RealDevice::gemm`: cuBLAS's first operand is our `b`, its second our `a`.
    fn gemm(&self, plan: &GemmPlan, a: &EmuBuf, b: &EmuBuf, c: &EmuBuf) -> Option<Result<()>> {
        if !self.blas {
            return None;
        }
        let mut req = vec![8u8, plan.trans_first as u8, plan.trans_second as u8];
        for x in [plan.m, plan.n, plan.k] {
            req.extend(x.to_le_bytes());
        }
        for (buf, ld, stride) in
            [(b, plan.ld_first, plan.stride_first), (a, plan.ld_second, plan.stride_second), (c, plan.ldc, plan.stride_c)]
        {
            push_u64(&mut req, buf.id);
            req.extend(ld.to_le_bytes());
            req.extend(stride.to_le_bytes());
        }
        req.extend(plan.batch.to_le_bytes());
        Some(self.conn.call(&req, 0).map(drop))
    }

    fn check(&self) -> Result<()> {
        Ok(())
    }

    fn bind(&self) -> Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests;

//! The CUDA backend from the outside, on any machine:
//!
//! * without a driver (or without the `cuda` feature) it is cleanly unavailable: a clear error from
//!   `Backend::new`, a skip reason in `select`, and `device_count() == 0`;
//! * every registered CUDA entry point is an `extern "C" __global__` kernel, and every such kernel
//!   is registered; every `#include` names a registered header (`kernels/*.cuh`), and no kernel file
//!   defines again (or copies under another name) a helper that a header defines; `repro_exp` uses
//!   the constants of `gpu::repro_exp`;
//! * every `kernels/*.cu` file compiles as CUDA device code with Debian's clang-16 for sm_80 and
//!   sm_90 (a stand-in for NVRTC, which this machine lacks), with the registered headers beside it,
//!   every entry point emitted unmangled and at most 48 KiB of static shared memory per kernel.
//!   Skipped (loudly) without clang-16; `REQUIRE_CLANG=1` makes that a failure;
//! * on a machine with a CUDA device, every op against the CPU backend in both determinism modes
//!   (bitwise where the mode promises it), the kernel cache, and device selection. Skipped (loudly)
//!   without a device; `REQUIRE_CUDA=1` makes that a failure.
//!
//! The kernels themselves are also run on this machine, against the CPU, by the host emulator in
//! the unit tests (`cargo test --lib gpu::cuda`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;

use ao_gpu_worker::gpu::cuda::{CudaBackend, device_count};
use ao_gpu_worker::gpu::kernels::{FILES, KernelHeader, Lang, headers};
use ao_gpu_worker::gpu::{Backend, BackendKind, Determinism, GpuError, select};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn cuda_files() -> impl Iterator<Item = &'static ao_gpu_worker::gpu::kernels::KernelFile> {
    FILES.iter().filter(|f| f.lang == Lang::Cuda)
}

fn cuda_headers() -> impl Iterator<Item = &'static KernelHeader> {
    headers(Lang::Cuda)
}

// ---- without CUDA ----

#[test]
fn without_a_device_cuda_is_cleanly_unavailable() {
    if device_count() > 0 {
        eprintln!("a CUDA device is present: skipping the no-device checks");
        return;
    }
    let e = Backend::new(BackendKind::Cuda, Determinism::Reproducible).unwrap_err();
    let text = e.to_string();
    if cfg!(feature = "cuda") {
        assert!(text.starts_with("device error: unavailable: no CUDA"), "{text}");
    } else {
        assert_eq!(text, "device error: unavailable: built without the `cuda` feature");
    }
    assert!(matches!(CudaBackend::new_on(1, Determinism::Fast), Err(GpuError::Device(_))));
    let (b, skipped) = select(&[BackendKind::Cuda, BackendKind::Cpu], Determinism::Reproducible).unwrap();
    assert_eq!(b.kind(), BackendKind::Cpu);
    assert_eq!(skipped.len(), 1);
    assert!(skipped[0].starts_with("cuda: device error: unavailable: "), "{skipped:?}");
}

// ---- the kernel sources ----

/// The names of the `extern "C" __global__` functions of a source, in order.
fn global_kernels(source: &str) -> Vec<String> {
    let mut names = Vec::new();
    for (at, _) in source.match_indices("extern \"C\" __global__") {
        let rest = &source[at..];
        let void = rest.find("void ").expect("a kernel returns void");
        let after = &rest[void + 5..];
        names.push(after[..after.find('(').unwrap()].trim().to_owned());
    }
    names
}

#[test]
fn every_cuda_entry_point_is_an_unmangled_kernel_and_every_kernel_is_registered() {
    let mut files = BTreeSet::new();
    for f in cuda_files() {
        files.insert(f.path);
        let kernels = global_kernels(f.source);
        let entries: Vec<&str> = f.entries.iter().map(|e| e.name).collect();
        for e in &entries {
            assert_eq!(kernels.iter().filter(|k| k == e).count(), 1, "{}: {e} must be defined once as extern \"C\" __global__", f.path);
        }
        for k in &kernels {
            assert!(entries.contains(&k.as_str()), "{}: kernel {k} is not registered in src/gpu/kernels.rs", f.path);
        }
    }
    for entry in std::fs::read_dir(root().join("kernels")).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        if name.ends_with(".cu") {
            assert!(files.contains(format!("kernels/{name}").as_str()), "kernels/{name} is not registered");
        }
    }
}

/// The file names a source includes with `#include "NAME"`.
fn includes(source: &str) -> Vec<&str> {
    source.lines().filter_map(|l| l.trim().strip_prefix("#include \"")?.split('"').next()).collect()
}

/// The names a C++ source defines at file scope, by the conventions of kernels/ (one declaration
/// per line): macros, typedefs, structs and `static __device__` functions, each with its line.
fn definitions(source: &str) -> Vec<(String, &str)> {
    let ident = |s: &str| -> String { s.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect() };
    let mut out = Vec::new();
    for line in source.lines() {
        let t = line.trim_start();
        let name = if let Some(rest) = t.strip_prefix("#define ") {
            ident(rest)
        } else if let Some(rest) = t.strip_prefix("typedef ") {
            rest.trim_end().trim_end_matches(';').rsplit(' ').next().map(ident).unwrap_or_default()
        } else if let Some(rest) = t.strip_prefix("struct ") {
            if !t.trim_end().ends_with('{') {
                continue;
            }
            ident(rest)
        } else if t.starts_with("static __device__") {
            let Some(open) = t.find('(') else { continue };
            let head = t[..open].trim_end();
            head.rsplit(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).next().unwrap_or_default().to_owned()
        } else {
            continue;
        };
        if !name.is_empty() {
            out.push((name, line));
        }
    }
    out
}

/// The bodies (the lines after the signature, up to the closing brace at column 0) of the
/// multi-line `static __device__` functions of a source, by name.
fn function_bodies(source: &str) -> Vec<(String, String)> {
    let lines: Vec<&str> = source.lines().collect();
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        if !line.starts_with("static __device__") || !line.trim_end().ends_with('{') {
            continue;
        }
        let Some(len) = lines[i + 1..].iter().position(|l| *l == "}") else { continue };
        let name = definitions(line).pop().map(|d| d.0).unwrap_or_default();
        out.push((name, lines[i + 1..i + 1 + len].join("\n")));
    }
    out
}

#[test]
fn definitions_and_includes_parse() {
    let src = "#include \"common.cuh\"\n#define BLOCK 256\ntypedef unsigned int u32;\nstruct P {\n    u32 n;\n};\n\
               template <int DT>\nstatic __device__ __forceinline__ float load_elem(const u8 *b, u32 i) {\n    return 0.0f;\n    // x\n}\n\
               static __device__ inline float block_sum(float v, float *s) { return v; }\nextern \"C\" __global__ void k(P p) {}\n";
    assert_eq!(includes(src), ["common.cuh"]);
    let names: Vec<String> = definitions(src).into_iter().map(|d| d.0).collect();
    assert_eq!(names, ["BLOCK", "u32", "P", "load_elem", "block_sum"]);
    assert_eq!(function_bodies(src), [("load_elem".to_owned(), "    return 0.0f;\n    // x".to_owned())]);
}

/// Kernel files that another change in flight is rewriting, not yet on the header: they may repeat
/// its macros and typedefs (not its functions) until they include it. Remove a file from this list
/// once it does (the test then insists).
const NOT_ON_THE_HEADER_YET: &[&str] = &[];

/// Helpers used by several kernel files live in a header (kernels/common.cuh), once: every
/// `#include` of a kernel file names a registered header, every header is included, and no kernel
/// file defines a name the header defines (macro, typedef, struct or function), nor holds a copy of
/// a header function's body under another name.
#[test]
fn helpers_live_once_in_the_headers() {
    let registered: BTreeSet<&str> = cuda_headers().map(|h| h.include_name()).collect();
    let mut included = BTreeSet::new();
    for f in cuda_files() {
        for name in includes(f.source) {
            assert!(registered.contains(name), "{}: #include \"{name}\" is not a registered header ({registered:?})", f.path);
            included.insert(name);
        }
    }
    for h in cuda_headers() {
        assert!(included.contains(h.include_name()), "{} is included by no kernel file", h.path);
        assert!(global_kernels(h.source).is_empty(), "{}: kernels belong in .cu files (the registry lists their entry points)", h.path);
        let defined: BTreeMap<String, &str> = definitions(h.source).into_iter().collect();
        for must in ["u32", "GRID_STRIDE", "BLOCK", "f16_value", "load_elem", "repro_exp", "block_sum", "block_max"] {
            assert!(defined.contains_key(must), "{}: {must} not found among {:?}", h.path, defined.keys());
        }
        let bodies = function_bodies(h.source);
        assert!(bodies.iter().any(|(n, _)| n == "repro_exp") && bodies.iter().any(|(n, _)| n == "block_sum"), "{bodies:?}");
        for f in cuda_files() {
            let pending = NOT_ON_THE_HEADER_YET.contains(&f.path);
            assert!(!pending || includes(f.source).is_empty(), "{} includes a header now: remove it from NOT_ON_THE_HEADER_YET", f.path);
            for (name, line) in definitions(f.source) {
                if pending && !line.trim_start().starts_with("static __device__") {
                    continue;
                }
                assert!(!defined.contains_key(&name), "{}: `{}` defines {name} again; it lives in {}", f.path, line.trim(), h.path);
            }
            for (name, body) in &bodies {
                assert!(!f.source.contains(body.as_str()), "{}: holds a copy of the body of {name} from {}", f.path, h.path);
            }
        }
    }
}

/// The hexadecimal f32 constants of a function body, in order (`0x3fb8_aa3b` and `0x3fb8aa3bu`
/// alike).
fn hex_constants(body: &str) -> Vec<u32> {
    let mut out = Vec::new();
    for (at, _) in body.match_indices("0x") {
        let digits: String = body[at + 2..].chars().take_while(|c| c.is_ascii_hexdigit() || *c == '_').filter(|c| *c != '_').collect();
        if digits.len() == 8 {
            out.push(u32::from_str_radix(&digits, 16).unwrap());
        }
    }
    out
}

#[test]
fn kernel_repro_exp_uses_the_rust_constants() {
    let rust = std::fs::read_to_string(root().join("src/gpu/repro.rs")).unwrap();
    let start = rust.find("pub fn repro_exp").unwrap();
    let rust_body = &rust[start..start + rust[start..].find("\n}\n").unwrap()];
    let want = hex_constants(rust_body);
    assert_eq!(want.len(), 7, "{want:x?}");
    let sources = cuda_files().map(|f| (f.path, f.source)).chain(cuda_headers().map(|h| (h.path, h.source)));
    let mut checked = 0;
    for (path, source) in sources.filter(|(_, s)| s.contains("float repro_exp(")) {
        let start = source.find("float repro_exp(").unwrap();
        let body = &source[start..start + source[start..].find("\n}\n").unwrap()];
        // The C body also builds +inf (0x7f800000) for the overflow case, which Rust spells f32::INFINITY.
        let got: Vec<u32> = hex_constants(body).into_iter().filter(|&c| c != 0x7f80_0000).collect();
        assert_eq!(got, want, "{path}: repro_exp constants");
        assert!(body.contains("x > 88.72f") && body.contains("x < -86.0f"), "{path}: repro_exp thresholds");
        assert!(rust_body.contains("x > 88.72") && rust_body.contains("x < -86.0"));
        checked += 1;
    }
    assert_eq!(checked, 1, "repro_exp must be defined exactly once, in kernels/common.cuh");
}

// ---- clang-16 as a CUDA syntax and semantics checker ----

/// Declarations of the CUDA built-ins the kernels use (NVRTC provides them implicitly).
const CLANG_PRELUDE: &str = r#"
#define __global__ __attribute__((global))
#define __device__ __attribute__((device))
#define __host__ __attribute__((host))
#define __shared__ __attribute__((shared))
#define __forceinline__ __inline__ __attribute__((always_inline))
#define __launch_bounds__(...) __attribute__((launch_bounds(__VA_ARGS__)))
#include "__clang_cuda_builtin_vars.h"
__device__ float __fadd_rn(float, float);
__device__ float __fsub_rn(float, float);
__device__ float __fmul_rn(float, float);
__device__ float __fdiv_rn(float, float);
__device__ float __fsqrt_rn(float);
__device__ float fmaf(float, float, float);
__device__ float expf(float);
__device__ float tanhf(float);
__device__ float floorf(float);
__device__ float roundf(float);
__device__ float fabsf(float);
__device__ float sqrtf(float);
__device__ float __uint_as_float(unsigned int);
__device__ unsigned int __float_as_uint(float);
__device__ void __syncthreads(void);
__device__ float __shfl_sync(unsigned int, float, int, int = 32);
__device__ float __shfl_down_sync(unsigned int, float, unsigned int, int = 32);
__device__ unsigned int __shfl_down_sync(unsigned int, unsigned int, unsigned int, int = 32);
__device__ float __shfl_xor_sync(unsigned int, float, int, int = 32);
__device__ unsigned int atomicMin(unsigned int *, unsigned int);
"#;

fn clang() -> Option<&'static str> {
    let found = ["clang-16", "clang"].into_iter().find(|c| Command::new(c).arg("--version").output().is_ok_and(|o| o.status.success()));
    if found.is_none() {
        if std::env::var("REQUIRE_CLANG").is_ok_and(|v| v == "1") {
            panic!("REQUIRE_CLANG=1 but clang-16 is not installed");
        }
        eprintln!("!!!!! SKIPPING the clang CUDA check of kernels/*.cu: no clang-16 (set REQUIRE_CLANG=1 to make this fail) !!!!!");
    }
    found
}

/// The mangled prefix naming the function that declares a local static (`_ZZ<function>E<len><name>`
/// -> `_ZZ<function>E`), or the whole symbol when it is not of that form.
fn enclosing_function(sym: &str) -> &str {
    for len in 1..sym.len() {
        let digits = len.to_string();
        let name_start = sym.len() - len;
        if name_start > digits.len() && sym[..name_start].ends_with(&digits) {
            let name = &sym[name_start..];
            if name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_') {
                return &sym[..name_start - digits.len()];
            }
        }
    }
    sym
}

#[test]
fn enclosing_functions_of_shared_variables() {
    assert_eq!(enclosing_function("_ZZ12max_last_f32E2sv"), "_ZZ12max_last_f32E");
    assert_eq!(
        enclosing_function("_ZZL12matmul_tiledILi0ELb0EEvPKfPKhPfRK12MatmulParamsE2As"),
        "_ZZL12matmul_tiledILi0ELb0EEvPKfPKhPfRK12MatmulParamsE"
    );
    assert_eq!(
        enclosing_function("_ZZ9attentionILb1EEvPKfS1_S1_PfRK10AttnParamsE7scratch"),
        "_ZZ9attentionILb1EEvPKfS1_S1_PfRK10AttnParamsE"
    );
    assert_eq!(enclosing_function("plain"), "plain");
}

#[test]
fn kernels_compile_as_cuda_with_clang() {
    let Some(clang) = clang() else { return };
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("prelude.h"), CLANG_PRELUDE).unwrap();
    // The embedded headers beside the sources, where `#include "common.cuh"` looks first (NVRTC
    // gets the same text as named headers).
    for h in cuda_headers() {
        std::fs::write(dir.path().join(h.include_name()), h.source).unwrap();
    }
    for arch in ["sm_80", "sm_90"] {
        for f in cuda_files() {
            let src = dir.path().join(Path::new(f.path).file_name().unwrap());
            std::fs::write(&src, f.source).unwrap();
            let ptx = dir.path().join(format!("{arch}.ptx"));
            let out = Command::new(clang)
                .args(["-x", "cuda", "--cuda-device-only", "-nocudainc", "-nocudalib", &format!("--cuda-gpu-arch={arch}")])
                .args(["-Wall", "-Wextra", "-Wno-unused-parameter", "-Werror", "-S", "-include"])
                .arg(dir.path().join("prelude.h"))
                .arg("-o")
                .arg(&ptx)
                .arg(&src)
                .output()
                .unwrap();
            assert!(out.status.success(), "{} for {arch}:\n{}", f.path, String::from_utf8_lossy(&out.stderr));
            let ptx = std::fs::read_to_string(&ptx).unwrap();
            for e in f.entries {
                assert!(ptx.contains(&format!(".visible .entry {}(", e.name)), "{} for {arch}: no unmangled entry {}", f.path, e.name);
            }
            // Static shared memory, grouped by the function that declares it (the mangled prefix of
            // each `.shared` variable): every group must fit the 48 KiB a block gets by default.
            let mut per_fn: BTreeMap<String, usize> = BTreeMap::new();
            for line in ptx.lines().filter(|l| l.trim_start().starts_with(".shared")) {
                let decl = line.trim().trim_end_matches(';');
                let (sym, size) = match decl.rsplit_once('[') {
                    Some((head, n)) => (head.rsplit(' ').next().unwrap(), n.trim_end_matches(']').parse::<usize>().unwrap_or(0)),
                    None => (decl.rsplit(' ').next().unwrap(), 4),
                };
                *per_fn.entry(enclosing_function(sym).to_owned()).or_default() += size;
            }
            for (func, bytes) in per_fn {
                assert!(bytes <= 48 * 1024, "{} for {arch}: {func} uses {bytes} bytes of static shared memory", f.path);
            }
        }
    }
}

// ---- on a CUDA device (the `cuda` feature's real backend; skipped without a device) ----

#[cfg(feature = "cuda")]
mod on_device {
    use super::*;
    use ao_gpu_worker::gpu::TensorOps;
    use ao_gpu_worker::gpu::{BinaryOp, DType, RawTensor, ReduceOp, Result, RopeMode, TensorId, UnaryOp, cpu::CpuBackend, quant};

    fn require_cuda() -> bool {
        std::env::var("REQUIRE_CUDA").is_ok_and(|v| v == "1")
    }

    /// Both backends, or a loud skip (a failure with REQUIRE_CUDA=1).
    fn cuda_and_cpu(det: Determinism) -> Option<(Backend, Backend)> {
        match CudaBackend::new(det) {
            Ok(b) => Some((Backend::Cuda(b), Backend::Cpu(CpuBackend::new(det)))),
            Err(e) => {
                assert!(!require_cuda(), "REQUIRE_CUDA=1 but the CUDA backend did not start: {e}");
                eprintln!("!!!!! SKIPPING the CUDA device tests: {e} (set REQUIRE_CUDA=1 to make this fail) !!!!!");
                None
            }
        }
    }

    #[derive(Debug, Clone, Copy)]
    enum Tol {
        Bits,
        Near(f64, f64),
    }

    /// Runs `f` on both backends with `inputs` uploaded; both must fail with the same error, or succeed
    /// with the same dtype and shape and values within `tol` (NaN matches NaN).
    fn same(
        what: &str,
        cuda: &mut Backend,
        cpu: &mut Backend,
        inputs: &[&RawTensor],
        tol: Tol,
        f: impl Fn(&mut Backend, &[TensorId]) -> Result<TensorId>,
    ) {
        let run = |b: &mut Backend| -> Result<(DType, Vec<usize>, Vec<f32>)> {
            let ids: Vec<TensorId> = inputs.iter().map(|t| b.upload_raw(t)).collect::<Result<_>>()?;
            let out = f(b, &ids);
            let r = out.clone().and_then(|id| {
                let t = b.read(id)?;
                Ok((b.dtype(id)?, t.shape, t.data))
            });
            for id in ids.into_iter().chain(out.ok()) {
                let _ = b.free(id);
            }
            r
        };
        match (run(cuda), run(cpu)) {
            (Ok((gd, gs, gv)), Ok((wd, ws, wv))) => {
                assert_eq!((gd, &gs), (wd, &ws), "{what}: dtype and shape");
                for (i, (&a, &e)) in gv.iter().zip(&wv).enumerate() {
                    let ok = match tol {
                        _ if a.is_nan() || e.is_nan() => a.is_nan() && e.is_nan(),
                        Tol::Bits => a.to_bits() == e.to_bits(),
                        Tol::Near(abs, rel) => a == e || (a as f64 - e as f64).abs() <= abs + rel * (e as f64).abs(),
                    };
                    assert!(ok, "{what}: index {i}: cuda {a:e} ({:#010x}), cpu {e:e} ({:#010x})", a.to_bits(), e.to_bits());
                }
            }
            (Err(g), Err(w)) => assert_eq!(g, w, "{what}"),
            (g, w) => panic!("{what}: cuda {:?}, cpu {:?}", g.map(|r| r.1), w.map(|r| r.1)),
        }
    }

    fn rand_vals(seed: u64, n: usize, scale: f32) -> Vec<f32> {
        let mut rng = fastrand::Rng::with_seed(seed);
        (0..n).map(|_| (rng.f32() * 2.0 - 1.0) * scale).collect()
    }

    fn rand_t(seed: u64, shape: &[usize], scale: f32) -> RawTensor {
        RawTensor::from_f32(shape.to_vec(), &rand_vals(seed, shape.iter().product(), scale)).unwrap()
    }

    fn as_dtype(dtype: DType, shape: &[usize], values: &[f32]) -> RawTensor {
        RawTensor::new(dtype, shape.to_vec(), quant::quantize(dtype, values).unwrap()).unwrap()
    }

    /// Every op on the device against the CPU, both modes. The emulated unit tests cover the same
    /// ground in more detail; this is the check that the real device (NVRTC, the driver, cuBLAS)
    /// agrees, at sizes where the tiled kernels and cuBLAS actually engage.
    #[test]
    fn every_op_matches_the_cpu_on_a_cuda_device() {
        for det in [Determinism::Reproducible, Determinism::Fast] {
            let Some((mut cuda, mut cpu)) = cuda_and_cpu(det) else { return };
            let (g, c) = (&mut cuda, &mut cpu);
            eprintln!("on {} ({det:?})", g.describe());
            let repro = |fast: Tol| if det == Determinism::Reproducible { Tol::Bits } else { fast };
            let mm_tol = repro(Tol::Near(1e-4, 1e-4));
            for (i, &(sa, sb, ta, tb)) in [
                (&[1usize, 1][..], &[1usize, 1][..], false, false),
                (&[130, 70], &[70, 260], false, false),
                (&[70, 130], &[260, 70], true, true),
                (&[3, 65, 33], &[3, 33, 17], false, false),
                (&[1, 300], &[513, 300], false, true),
                (&[256, 512], &[512, 384], false, false),
                (&[0, 5], &[5, 7], false, false),
                (&[3, 0], &[0, 4], false, false),
            ]
            .iter()
            .enumerate()
            {
                let (a, b) = (rand_t(i as u64, sa, 1.0), rand_t(50 + i as u64, sb, 1.0));
                same(&format!("matmul {sa:?} {sb:?}"), g, c, &[&a, &b], mm_tol, |b, ids| b.matmul(ids[0], ids[1], ta, tb));
            }
            for dtype in [DType::F16, DType::Q8_0, DType::Q4_0, DType::Q4_1] {
                for (m, n, k) in [(1, 1000, 256), (7, 96, 128), (200, 130, 64)] {
                    let a = rand_t(m as u64, &[m, k], 1.0);
                    let w = as_dtype(dtype, &[n, k], &rand_vals(n as u64, n * k, 1.0));
                    same(&format!("matmul {dtype} {m}x{n}x{k}"), g, c, &[&a, &w], mm_tol, |b, ids| b.matmul(ids[0], ids[1], false, true));
                }
            }
            let (x, y) = (rand_t(1, &[4, 1, 300], 3.0), rand_t(2, &[5, 300], 3.0));
            for op in [BinaryOp::Add, BinaryOp::Sub, BinaryOp::Mul, BinaryOp::Div] {
                same(op.name(), g, c, &[&x, &y], Tol::Bits, |b, ids| b.binary(op, ids[0], ids[1]));
            }
            let special = RawTensor::from_f32(vec![6], &[0.0, -0.0, f32::INFINITY, f32::NEG_INFINITY, f32::NAN, 1e-3]).unwrap();
            for op in [UnaryOp::Scale(0.37), UnaryOp::Relu, UnaryOp::Gelu, UnaryOp::Silu, UnaryOp::Tanh, UnaryOp::Exp] {
                let exact = matches!(op, UnaryOp::Scale(_) | UnaryOp::Relu);
                let tol = if exact { Tol::Bits } else { Tol::Near(1e-5, 1e-4) };
                for t in [&x, &special] {
                    same(op.name(), g, c, &[t], tol, |b, ids| b.unary(op, ids[0]));
                }
            }
            let rows = rand_t(3, &[33, 1000], 4.0);
            for op in [ReduceOp::Sum, ReduceOp::Mean, ReduceOp::Max, ReduceOp::Argmax] {
                let tol = if matches!(op, ReduceOp::Max | ReduceOp::Argmax) { Tol::Bits } else { repro(Tol::Near(1e-4, 1e-5)) };
                same(op.name(), g, c, &[&rows], tol, |b, ids| b.reduce_last(op, ids[0]));
            }
            same("softmax", g, c, &[&rows], repro(Tol::Near(1e-6, 1e-4)), |b, ids| b.softmax_last(ids[0]));
            let (w, bias) = (rand_t(4, &[1000], 1.0), rand_t(5, &[1000], 1.0));
            same("rmsnorm", g, c, &[&rows, &w], repro(Tol::Near(1e-5, 1e-5)), |b, ids| b.rmsnorm(ids[0], ids[1], 1e-5));
            same("layernorm", g, c, &[&rows, &w, &bias], repro(Tol::Near(1e-5, 1e-5)), |b, ids| b.layernorm(ids[0], ids[1], ids[2], 1e-5));
            let v = rand_t(6, &[8, 64], 3.0);
            for to in DType::ALL {
                same(&format!("cast f32 -> {to}"), g, c, &[&v], Tol::Bits, |b, ids| b.cast(ids[0], to));
                let q = as_dtype(to, &[8, 64], &rand_vals(7, 512, 3.0));
                same(&format!("cast {to} -> f32"), g, c, &[&q], Tol::Bits, |b, ids| b.cast(ids[0], DType::F32));
            }
            let t4 = rand_t(8, &[2, 3, 4, 5], 1.0);
            same("permute", g, c, &[&t4], Tol::Bits, |b, ids| b.permute(ids[0], &[3, 1, 0, 2]));
            same("slice", g, c, &[&t4], Tol::Bits, |b, ids| b.slice(ids[0], 2, 1, 2));
            same("concat", g, c, &[&t4, &t4], Tol::Bits, |b, ids| b.concat(ids[0], ids[1], 1));
            same("reshape", g, c, &[&t4], Tol::Bits, |b, ids| b.reshape(ids[0], &[10, 12]));
            let table = as_dtype(DType::Q4_1, &[50, 64], &rand_vals(9, 3200, 2.0));
            let ids = RawTensor::from_i32(vec![2, 3], &[0, 49, 7, 7, 1, 30]).unwrap();
            same("gather", g, c, &[&table, &ids], Tol::Bits, |b, i| b.gather_rows(i[0], i[1]));
            let bad = RawTensor::from_i32(vec![2], &[3, 50]).unwrap();
            same("gather bad id", g, c, &[&table, &bad], Tol::Bits, |b, i| b.gather_rows(i[0], i[1]));
            let xr = rand_t(10, &[2, 5, 4, 64], 1.0);
            for mode in [RopeMode::Interleaved, RopeMode::Neox] {
                same("rope", g, c, &[&xr], Tol::Bits, |b, ids| b.rope(ids[0], 17, 10000.0, mode));
            }
            let (q, k, vv) = (rand_t(11, &[2, 3, 8, 64], 1.0), rand_t(12, &[2, 300, 2, 64], 1.0), rand_t(13, &[2, 300, 2, 64], 1.0));
            same("attention", g, c, &[&q, &k, &vv], repro(Tol::Near(1e-5, 1e-4)), |b, ids| b.attention(ids[0], ids[1], ids[2], 297, 0.125));
            // A key/value cache grown one row at a time keeps its id and matches the CPU.
            let mut cache = Vec::new();
            for b in [&mut *g, &mut *c] {
                let id = b.upload_raw(&RawTensor::from_f32(vec![0, 2, 4], &[]).unwrap()).unwrap();
                for step in 0..40u64 {
                    let r = b.upload_raw(&rand_t(100 + step, &[1, 2, 4], 1.0)).unwrap();
                    b.append(id, r).unwrap();
                    b.free(r).unwrap();
                }
                cache.push(b.read_raw(id).unwrap());
            }
            assert_eq!(cache[0], cache[1], "append");
            // A chain inside a batch, one read at the end.
            g.begin_batch();
            let a = g.upload_raw(&rows).unwrap();
            let s = g.softmax_last(a).unwrap();
            let t = g.sum_last(s).unwrap();
            g.end_batch().unwrap();
            let sums = g.read(t).unwrap().data;
            assert!(sums.iter().all(|v| (v - 1.0).abs() < 1e-5), "{sums:?}");
        }
    }

    #[test]
    fn devices_are_counted_and_opened_by_ordinal() {
        let n = device_count();
        if n == 0 {
            assert!(!require_cuda(), "REQUIRE_CUDA=1 but device_count() is 0");
            eprintln!("!!!!! SKIPPING the CUDA device ordinal checks: no device !!!!!");
            return;
        }
        let b = CudaBackend::new_on(n - 1, Determinism::Fast).unwrap();
        assert_eq!(b.ordinal(), n - 1);
        let d = Backend::Cuda(b).describe();
        assert!(d.starts_with("cuda (") && d.contains("sm_"), "{d}");
        let e = CudaBackend::new_on(n, Determinism::Fast).unwrap_err();
        assert!(e.to_string().contains(&format!("no CUDA device {n}")), "{e}");
    }

    /// The kernel cache directory the backend uses (see src/gpu/cuda/compile.rs).
    fn cache_dir() -> Option<std::path::PathBuf> {
        let base = match std::env::var_os("XDG_CACHE_HOME").map(std::path::PathBuf::from).filter(|p| p.is_absolute()) {
            Some(p) => p,
            None => std::path::PathBuf::from(std::env::var_os("HOME")?).join(".cache"),
        };
        Some(base.join("ao-gpu-worker").join("cuda"))
    }

    #[test]
    fn kernel_cache_is_written_and_corrupt_entries_are_rebuilt() {
        let Some((cuda, _)) = cuda_and_cpu(Determinism::Reproducible) else { return };
        let dir = cache_dir().expect("a cache directory");
        let arch = {
            let d = cuda.describe();
            d.rsplit(", ").next().unwrap().trim_end_matches(')').to_owned()
        };
        drop(cuda);
        let entries = |dir: &Path| -> Vec<std::path::PathBuf> {
            let mut v: Vec<_> = std::fs::read_dir(dir)
                .map(|r| {
                    r.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.to_string_lossy().contains(&format!("-{arch}-"))).collect()
                })
                .unwrap_or_default();
            v.sort();
            v
        };
        let before = entries(&dir);
        for f in cuda_files() {
            let stem = Path::new(f.path).file_stem().unwrap().to_str().unwrap();
            assert!(
                before.iter().any(|p| p.file_name().unwrap().to_string_lossy().starts_with(&format!("{stem}-{arch}-"))),
                "no cache entry for {stem} in {before:?}"
            );
        }
        // Corrupt every entry: the next start recompiles and rewrites them.
        for p in &before {
            std::fs::write(p, b"AOGPUCU1 corrupt").unwrap();
        }
        let b = CudaBackend::new(Determinism::Fast).expect("starts despite a corrupt cache");
        drop(b);
        for p in entries(&dir) {
            assert!(std::fs::metadata(&p).unwrap().len() > 40, "{} was not rewritten", p.display());
        }
    }
}

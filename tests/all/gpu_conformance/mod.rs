//! One conformance suite for the tensor layer: every op on every available backend (the CPU always;
//! wgpu when an adapter exists) against the CPU reference, and against an f64 reference where
//! precision matters (matmul, reductions, softmax, norms), in both determinism modes.
//!
//! Tolerances: ops classed `Exact`, and every op in `Reproducible` mode (the transcendental
//! elementwise ones, gelu, silu, tanh and exp, through the portable functions `gpu::repro_*`), must
//! match the CPU bitwise; `DeviceDependent` results within `DEVICE_TOL` of the CPU; f64 references
//! within `k * 4 * 2^-24` relative to the sum of absolute terms (matmul, sums), `F64_TOL` (softmax,
//! norms), or a few ULP (the portable exp / tanh / silu / gelu, see `ulp_bound`).
//!
//! The dtype, layout, gather, rotary, attention and batching cases (`raw`, `batch`) compare
//! storage bytes: casts, gathers, layout ops and rope bitwise in both modes; f16 / quantized matmul
//! and attention bitwise in reproducible mode, and always against an f64 reference (the per-output
//! error bound above for matmul; `abs 2e-6 + rel 1e-5` for attention, `1e-6` for rope); batched
//! results bitwise equal to unbatched ones; misuse gives the CPU backend's error kind.
//!
//! Without an adapter the wgpu cases print a loud skip; with `REQUIRE_WGPU=1` they fail instead.
//! Shapes stay small: lavapipe runs ~1-3 GFLOP/s and CI has 2 cores.
//!
//! Here: the backends, the `backend_test!` harness and the helpers; the cases are in `ops` (the f32
//! ops), `transcendental`, `raw` (dtypes, layout, gather, rotary, attention) and `batch`.

use ao_gpu_worker::gpu::{
    Backend, BackendKind, BinaryOp, DType, Determinism, GpuError, HostTensor, RawTensor, ReduceOp, Result, RopeMode, TensorId, UnaryOp,
    cpu::CpuBackend, quant, rope_table, select, wgpu::WgpuBackend,
};

use crate::support::reference::{Tol, assert_close, assert_within_bound, matmul_f64};

/// Backends to test, the CPU first. The wgpu case honours `REQUIRE_WGPU=1`.
fn backends(det: Determinism) -> Vec<Backend> {
    let mut v = vec![Backend::Cpu(CpuBackend::new(det))];
    match WgpuBackend::new(det) {
        Ok(b) => v.push(Backend::Wgpu(Box::new(b))),
        Err(e) => {
            if std::env::var("REQUIRE_WGPU").is_ok_and(|v| v == "1") {
                panic!("REQUIRE_WGPU=1 but the wgpu backend did not start: {e}");
            }
            eprintln!("!!!!! SKIPPING wgpu conformance cases: {e} (set REQUIRE_WGPU=1 to make this fail) !!!!!");
        }
    }
    // CUDA where a driver and device exist (a lent GPU machine); REQUIRE_CUDA=1 makes absence fail.
    match Backend::new(ao_gpu_worker::gpu::BackendKind::Cuda, det) {
        Ok(b) => v.push(b),
        Err(e) => {
            if std::env::var("REQUIRE_CUDA").is_ok_and(|v| v == "1") {
                panic!("REQUIRE_CUDA=1 but the cuda backend did not start: {e}");
            }
            eprintln!("skipping cuda conformance cases: {e}");
        }
    }
    v
}

/// Runs `body` for every backend in both determinism modes, comparing with a CPU backend of the same mode.
macro_rules! backend_test {
    ($name:ident, |$b:ident, $cpu:ident, $det:ident| $body:block) => {
        #[test]
        fn $name() {
            for $det in [Determinism::Reproducible, Determinism::Fast] {
                for mut backend in backends($det) {
                    let $b = &mut backend;
                    let $cpu = &mut Backend::Cpu(CpuBackend::new($det));
                    eprintln!("{} on {} ({:?})", stringify!($name), $b.describe(), $det);
                    $body
                }
            }
        }
    };
}

mod batch;
mod ops;
mod raw;
mod transcendental;

// ---- inputs ----

fn rand_tensor(seed: u64, shape: &[usize], scale: f32) -> HostTensor {
    let mut rng = fastrand::Rng::with_seed(seed);
    let n = shape.iter().product();
    HostTensor::new(shape.to_vec(), (0..n).map(|_| (rng.f32() * 2.0 - 1.0) * scale).collect()).unwrap()
}

/// Uploads `inputs`, runs `f`, reads the result back and frees everything.
fn run(b: &mut Backend, inputs: &[&HostTensor], f: impl FnOnce(&mut Backend, &[TensorId]) -> Result<TensorId>) -> Result<HostTensor> {
    let ids: Vec<TensorId> = inputs.iter().map(|t| b.upload(t)).collect::<Result<_>>()?;
    let out = f(b, &ids);
    let result = out.clone().and_then(|id| b.read(id));
    for id in ids.into_iter().chain(out.ok()) {
        b.free(id)?;
    }
    result
}

// ---- comparison ----

const BITWISE: Tol = Tol { abs: 0.0, rel: 0.0 };
const DEVICE_TOL: Tol = Tol { abs: 1e-5, rel: 1e-4 };
const F64_TOL: Tol = Tol { abs: 1e-6, rel: 1e-5 };

fn assert_close_f32(what: &str, actual: &HostTensor, expected: &HostTensor, tol: Tol) {
    assert_eq!(actual.shape, expected.shape, "{what}: shape");
    let e: Vec<f64> = expected.data.iter().map(|&v| v as f64).collect();
    assert_close(what, &actual.data, &e, tol);
}

/// Bitwise where the mode promises it, else within `tol` of the CPU.
fn check_vs_cpu(what: &str, det: Determinism, reproducible_class: bool, actual: &HostTensor, cpu: &HostTensor, tol: Tol) {
    let t = if reproducible_class && det == Determinism::Reproducible { BITWISE } else { tol };
    assert_close_f32(what, actual, cpu, t);
}

/// The rows of `t` (along its last axis) in f64.
fn rows(t: &HostTensor) -> Vec<Vec<f64>> {
    let last = *t.shape.last().unwrap();
    let n_rows: usize = t.shape[..t.shape.len() - 1].iter().product();
    (0..n_rows).map(|r| t.data[r * last..(r + 1) * last].iter().map(|&v| v as f64).collect()).collect()
}

// ---- raw storage (`raw`, `batch`) ----
//
// Raw results are compared as storage bytes. Casts, gathers, layout ops and rope move or convert
// values with integer operations and single correctly rounded f32 operations defined in
// `gpu::quant` / `layout::rope_table`, so they must match the CPU bitwise in both modes; matmul and
// attention bitwise in reproducible mode and against an f64 reference (error bound per output) in
// both. Inputs of the block types are made by `quant::quantize` and their values are taken from
// `quant::dequantize` (the format's definition), not from a backend.

/// The values of a raw tensor by the format's definition.
fn values(t: &RawTensor) -> Vec<f32> {
    quant::dequantize(t.dtype, &t.bytes, t.shape.iter().product()).unwrap()
}

fn host(t: &RawTensor) -> HostTensor {
    HostTensor::new(t.shape.clone(), values(t)).unwrap()
}

/// Random storage of `dtype`: uniform values in (-scale, scale), quantized; i32 in (-scale, scale).
fn rand_raw(seed: u64, dtype: DType, shape: &[usize], scale: f32) -> RawTensor {
    let t = rand_tensor(seed, shape, scale);
    match dtype {
        DType::I32 => RawTensor::from_i32(shape.to_vec(), &t.data.iter().map(|&v| v as i32).collect::<Vec<_>>()).unwrap(),
        _ => RawTensor::new(dtype, shape.to_vec(), quant::quantize(dtype, &t.data).unwrap()).unwrap(),
    }
}

fn f32_raw(shape: &[usize], data: &[f32]) -> RawTensor {
    RawTensor::from_f32(shape.to_vec(), data).unwrap()
}

/// Uploads raw `inputs`, runs `f`, reads the result's storage back and frees everything.
fn run_raw(b: &mut Backend, inputs: &[&RawTensor], f: impl FnOnce(&mut Backend, &[TensorId]) -> Result<TensorId>) -> Result<RawTensor> {
    let ids: Vec<TensorId> = inputs.iter().map(|t| b.upload_raw(t)).collect::<Result<_>>()?;
    let out = f(b, &ids);
    let result = out.clone().and_then(|id| b.read_raw(id));
    for id in ids.into_iter().chain(out.ok()) {
        b.free(id)?;
    }
    result
}

/// Identical dtype, shape and storage bytes; reports the first differing element.
fn assert_raw_eq(what: &str, got: &RawTensor, want: &RawTensor) {
    assert_eq!((got.dtype, &got.shape), (want.dtype, &want.shape), "{what}: dtype / shape");
    if got.bytes != want.bytes {
        let size = if want.dtype.is_quantized() { 1 } else { want.dtype.block_bytes() };
        let i = got.bytes.iter().zip(&want.bytes).position(|(a, b)| a != b).unwrap_or(0) / size;
        panic!(
            "{what}: storage differs first at element {i}: got {:02x?}, want {:02x?}",
            &got.bytes[i * size..(i * size + size).min(got.bytes.len())],
            &want.bytes[i * size..(i * size + size).min(want.bytes.len())]
        );
    }
}

/// Bitwise where the class and mode promise it, else f32 values within `tol` of the CPU's.
fn check_raw(what: &str, det: Determinism, reproducible_class: bool, got: &RawTensor, want: &RawTensor, tol: Tol) {
    if reproducible_class && det == Determinism::Reproducible {
        assert_raw_eq(what, got, want);
    } else {
        assert_close_f32(what, &host(got), &host(want), tol);
    }
}

/// The same misuse gets the same error kind on `b` as on the CPU.
fn same_error_kind(what: &str, got: Result<impl std::fmt::Debug>, want: Result<impl std::fmt::Debug>) {
    let (got, want) = (got.expect_err(&format!("{what}: no error")), want.expect_err(&format!("{what}: no error on the cpu")));
    assert_eq!(std::mem::discriminant(&got), std::mem::discriminant(&want), "{what}: {got} vs cpu {want}");
}

/// The same error, to the letter: operand rules live in one planner, and checks on device values
/// (gather's ids) share one wording, so no backend words a misuse its own way.
fn same_error(what: &str, got: Result<impl std::fmt::Debug>, want: Result<impl std::fmt::Debug>) {
    let (got, want) = (got.expect_err(&format!("{what}: no error")), want.expect_err(&format!("{what}: no error on the cpu")));
    assert_eq!(got, want, "{what}");
}

/// Element `i` (f16 / f32 / i32 sized) of a raw tensor's storage.
fn elem(t: &RawTensor, i: usize) -> &[u8] {
    let s = t.dtype.block_bytes();
    &t.bytes[i * s..(i + 1) * s]
}

/// The storage of `numel(out_shape)` elements, element `i` taken from `t` at `src(coords of i)`.
fn gather_elems(t: &RawTensor, out_shape: &[usize], src: impl Fn(&[usize]) -> usize) -> RawTensor {
    let n: usize = out_shape.iter().product();
    let mut bytes = Vec::new();
    let mut c = vec![0usize; out_shape.len()];
    for i in 0..n {
        let mut r = i;
        for a in (0..out_shape.len()).rev() {
            c[a] = r % out_shape[a];
            r /= out_shape[a];
        }
        bytes.extend_from_slice(elem(t, src(&c)));
    }
    RawTensor::new(t.dtype, out_shape.to_vec(), bytes).unwrap()
}

/// Row-major flat index of `c` in `shape`.
fn flat_index(shape: &[usize], c: &[usize]) -> usize {
    c.iter().zip(shape).fold(0, |acc, (&ci, &d)| acc * d + ci)
}

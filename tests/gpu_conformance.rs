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
//! The dtype, layout, gather, rotary, attention and batching cases (second half of the file) compare
//! storage bytes: casts, gathers, layout ops and rope bitwise in both modes; f16 / quantized matmul
//! and attention bitwise in reproducible mode, and always against an f64 reference (the per-output
//! error bound above for matmul; `abs 2e-6 + rel 1e-5` for attention, `1e-6` for rope); batched
//! results bitwise equal to unbatched ones; misuse gives the CPU backend's error kind.
//!
//! Without an adapter the wgpu cases print a loud skip; with `REQUIRE_WGPU=1` they fail instead.
//! Shapes stay small: lavapipe runs ~1-3 GFLOP/s and CI has 2 cores.

use ao_gpu_worker::gpu::{
    Backend, BackendKind, BinaryOp, DType, Determinism, GpuError, HostTensor, RawTensor, ReduceOp, Result, RopeMode, TensorId, UnaryOp,
    cpu::CpuBackend, quant, rope_table, select, wgpu::WgpuBackend,
};

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

#[derive(Debug, Clone, Copy)]
struct Tol {
    abs: f64,
    rel: f64,
}

const BITWISE: Tol = Tol { abs: 0.0, rel: 0.0 };
const DEVICE_TOL: Tol = Tol { abs: 1e-5, rel: 1e-4 };
const F64_TOL: Tol = Tol { abs: 1e-6, rel: 1e-5 };

/// NaN matches NaN, infinities must match exactly, zero tolerance means identical bits
/// (except NaN payloads); otherwise `|a - e| <= abs + rel * |e|`. Reports index, actual, expected, diff.
fn assert_close(what: &str, actual: &[f32], expected: &[f64], tol: Tol) {
    assert_eq!(actual.len(), expected.len(), "{what}: length {} vs {}", actual.len(), expected.len());
    for (i, (&a, &e)) in actual.iter().zip(expected).enumerate() {
        let ok = if a.is_nan() || e.is_nan() {
            a.is_nan() && e.is_nan()
        } else if a.is_infinite() || e.is_infinite() {
            a as f64 == e
        } else if tol.abs == 0.0 && tol.rel == 0.0 {
            a.to_bits() == (e as f32).to_bits()
        } else {
            (a as f64 - e).abs() <= tol.abs + tol.rel * e.abs()
        };
        assert!(ok, "{what}: index {i}: actual {a:e} (bits {:#010x}), expected {e:e}, diff {:e}, tol {tol:?}", a.to_bits(), a as f64 - e);
    }
}

fn assert_close_f32(what: &str, actual: &HostTensor, expected: &HostTensor, tol: Tol) {
    assert_eq!(actual.shape, expected.shape, "{what}: shape");
    let e: Vec<f64> = expected.data.iter().map(|&v| v as f64).collect();
    assert_close(what, &actual.data, &e, tol);
}

/// Per-element check against an f64 reference with an error bound proportional to `bound[i]`
/// (the sum of absolute terms) and the number of terms: `terms * 4 * 2^-24 * bound + 1e-30`.
fn assert_within_bound(what: &str, actual: &[f32], reference: &[f64], bound: &[f64], terms: usize) {
    assert_eq!(actual.len(), reference.len(), "{what}: length");
    for i in 0..actual.len() {
        let tol = (terms.max(1) as f64) * 4.0 * f32::EPSILON as f64 / 2.0 * bound[i] + 1e-30;
        let diff = (actual[i] as f64 - reference[i]).abs();
        assert!(diff <= tol, "{what}: index {i}: actual {:e}, expected {:e}, diff {diff:e}, tol {tol:e}", actual[i], reference[i]);
    }
}

/// Bitwise where the mode promises it, else within `tol` of the CPU.
fn check_vs_cpu(what: &str, det: Determinism, reproducible_class: bool, actual: &HostTensor, cpu: &HostTensor, tol: Tol) {
    let t = if reproducible_class && det == Determinism::Reproducible { BITWISE } else { tol };
    assert_close_f32(what, actual, cpu, t);
}

// ---- f64 references ----

fn matmul_f64(a: &HostTensor, b: &HostTensor, ta: bool, tb: bool) -> (Vec<f64>, Vec<f64>, usize) {
    let (ra, rb) = (a.shape.len(), b.shape.len());
    let (m, k) = if ta { (a.shape[ra - 1], a.shape[ra - 2]) } else { (a.shape[ra - 2], a.shape[ra - 1]) };
    let n = if tb { b.shape[rb - 2] } else { b.shape[rb - 1] };
    let batch = a.shape[..ra - 2].iter().product::<usize>().max(b.shape[..rb - 2].iter().product());
    let sa = if ra > 2 { m * k } else { 0 };
    let sb = if rb > 2 { k * n } else { 0 };
    let (mut out, mut bound) = (Vec::new(), Vec::new());
    for bi in 0..batch {
        for i in 0..m {
            for j in 0..n {
                let (mut s, mut abs) = (0.0f64, 0.0f64);
                for p in 0..k {
                    let av = if ta { a.data[bi * sa + p * m + i] } else { a.data[bi * sa + i * k + p] } as f64;
                    let bv = if tb { b.data[bi * sb + j * k + p] } else { b.data[bi * sb + p * n + j] } as f64;
                    s += av * bv;
                    abs += (av * bv).abs();
                }
                out.push(s);
                bound.push(abs);
            }
        }
    }
    (out, bound, k)
}

fn rows(t: &HostTensor) -> Vec<Vec<f64>> {
    let last = *t.shape.last().unwrap();
    let n_rows: usize = t.shape[..t.shape.len() - 1].iter().product();
    (0..n_rows).map(|r| t.data[r * last..(r + 1) * last].iter().map(|&v| v as f64).collect()).collect()
}

// ---- the ops ----

backend_test!(matmul_matches_reference, |b, cpu, det| {
    let cases: &[(&[usize], &[usize], bool, bool)] = &[
        (&[1, 1], &[1, 1], false, false),
        (&[3, 5], &[5, 7], false, false),
        (&[17, 33], &[33, 65], false, false),
        (&[33, 17], &[33, 65], true, false),
        (&[17, 33], &[65, 33], false, true),
        (&[33, 17], &[65, 33], true, true),
        (&[70, 40], &[40, 130], false, false),
        (&[2, 9, 13], &[2, 13, 11], false, false),
        (&[2, 9, 13], &[13, 11], false, false),
        (&[9, 13], &[2, 3, 13, 11], false, false),
        (&[0, 5], &[5, 7], false, false),
        (&[3, 0], &[0, 4], false, false),
    ];
    for (i, &(sa, sb, ta, tb)) in cases.iter().enumerate() {
        let (a, bt) = (rand_tensor(10 + i as u64, sa, 1.0), rand_tensor(100 + i as u64, sb, 1.0));
        let what = format!("matmul {sa:?}{} @ {sb:?}{} on {}", if ta { "^T" } else { "" }, if tb { "^T" } else { "" }, b.describe());
        let got = run(b, &[&a, &bt], |b, ids| b.matmul(ids[0], ids[1], ta, tb)).unwrap();
        let want = run(cpu, &[&a, &bt], |b, ids| b.matmul(ids[0], ids[1], ta, tb)).unwrap();
        check_vs_cpu(&what, det, true, &got, &want, F64_TOL);
        let (r, bound, k) = matmul_f64(&a, &bt, ta, tb);
        assert_within_bound(&what, &got.data, &r, &bound, k);
        assert!(got.data.iter().all(|v| v.to_bits() != (-0.0f32).to_bits() || k > 0), "{what}: k = 0 gives +0");
    }
});

backend_test!(binary_ops_broadcast_exactly, |b, cpu, det| {
    let cases: &[(&[usize], &[usize])] =
        &[(&[4, 1], &[1, 6]), (&[3, 5], &[3, 5]), (&[2, 3, 4], &[4]), (&[2, 1, 3, 1], &[5, 1, 4]), (&[1], &[2, 2]), (&[0, 3], &[1, 3])];
    for (i, &(sa, sb)) in cases.iter().enumerate() {
        let (x, y) = (rand_tensor(20 + i as u64, sa, 3.0), rand_tensor(200 + i as u64, sb, 3.0));
        for op in [BinaryOp::Add, BinaryOp::Sub, BinaryOp::Mul, BinaryOp::Div] {
            let what = format!("{} {sa:?} {sb:?} on {}", op.name(), b.describe());
            let got = run(b, &[&x, &y], |b, ids| b.binary(op, ids[0], ids[1])).unwrap();
            let want = run(cpu, &[&x, &y], |b, ids| b.binary(op, ids[0], ids[1])).unwrap();
            // Exact class in both modes.
            assert_close_f32(&what, &got, &want, BITWISE);
        }
    }
    let _ = det;
});

backend_test!(unary_ops_match_cpu, |b, cpu, det| {
    let special = HostTensor::new(vec![8], vec![0.0, -0.0, 1.5, -2.25, f32::INFINITY, f32::NEG_INFINITY, f32::NAN, 1e-3]).unwrap();
    let finite = rand_tensor(30, &[7, 37], 6.0);
    let empty = HostTensor::new(vec![2, 0], vec![]).unwrap();
    for op in [UnaryOp::Scale(0.37), UnaryOp::Relu, UnaryOp::Gelu, UnaryOp::Silu, UnaryOp::Tanh, UnaryOp::Exp] {
        let exact = matches!(op, UnaryOp::Scale(_) | UnaryOp::Relu);
        let inputs: Vec<&HostTensor> = if exact { vec![&special, &finite, &empty] } else { vec![&finite, &empty] };
        for x in inputs {
            let what = format!("{} {:?} on {}", op.name(), x.shape, b.describe());
            let got = run(b, &[x], |b, ids| b.unary(op, ids[0])).unwrap();
            let want = run(cpu, &[x], |b, ids| b.unary(op, ids[0])).unwrap();
            // The transcendental ops are portable functions in reproducible mode.
            assert_close_f32(&what, &got, &want, if exact || det == Determinism::Reproducible { BITWISE } else { DEVICE_TOL });
        }
    }
});

// ---- the portable exp / tanh / silu / gelu of reproducible mode ----

const TRANSCENDENTAL: [UnaryOp; 4] = [UnaryOp::Exp, UnaryOp::Tanh, UnaryOp::Silu, UnaryOp::Gelu];

/// Inputs at every branch and threshold of the portable functions (`gpu::repro_*`), one ULP either
/// side, and the IEEE specials: signed zeros, subnormals, the smallest normals, huge values,
/// infinities, NaNs with payloads.
fn transcendental_edges() -> Vec<f32> {
    let mut v = vec![
        0.0,
        -0.0,
        f32::from_bits(1),
        f32::from_bits(0x8000_0001),
        1e-40,
        -1e-40,
        f32::MIN_POSITIVE,
        -f32::MIN_POSITIVE,
        f32::MIN_POSITIVE * 1.5,
        -f32::MIN_POSITIVE * 3.0,
        1e-30,
        -1e-20,
        1e-15,
        -1e-14,
        f32::MAX,
        f32::MIN,
        1e30,
        -1e30,
        1e13,
        -7e12,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        f32::from_bits(0x7fc0_0001),
        f32::from_bits(0xffc0_0000),
        f32::from_bits(0x7f80_0001),
        f32::from_bits(0xff80_1234),
    ];
    let thresholds = [
        2f32.powi(-12), // tanh: x itself below
        0.5625,         // tanh: polynomial below
        9.5,            // tanh: 1 above
        0.015625,       // gelu: double-f32 below -1/64
        11.0,           // gelu: -0 below -11
        18.0,           // sigmoid: 1 above, 1 + e^y = 1 below -18
        100.0,          // sigmoid: 0 below -100
        88.72,
        88.722_84, // exp overflows above ln(f32::MAX)
        88.75,
        87.336_55, // exp: subnormal results below ln(2^-126)
        87.5,
        86.0,
        91.9, // silu: subnormal results below about -91.9
        10.1, // gelu: subnormal results below about -10.1
        1.0,
        0.5,
        0.25,
    ];
    for t in thresholds {
        for m in [t, -t] {
            v.extend([f32::from_bits(m.to_bits() - 1), m, f32::from_bits(m.to_bits() + 1)]);
        }
    }
    v
}

/// Edge cases, then seeded random values: uniform at several scales and arbitrary bit patterns.
fn transcendental_inputs(seed: u64, n: usize) -> HostTensor {
    let mut v = transcendental_edges();
    let mut rng = fastrand::Rng::with_seed(seed);
    while v.len() < n {
        let x = match v.len() % 6 {
            0 => f32::from_bits(rng.u32(..)),
            1 => (rng.f32() * 2.0 - 1.0) * 1.0,
            2 => (rng.f32() * 2.0 - 1.0) * 4.0,
            3 => (rng.f32() * 2.0 - 1.0) * 12.0,
            4 => (rng.f32() * 2.0 - 1.0) * 100.0,
            _ => (rng.f32() * 2.0 - 1.0) * 0.05,
        };
        v.push(x);
    }
    HostTensor::new(vec![v.len()], v).unwrap()
}

fn assert_same_bits(what: &str, got: &HostTensor, want: &HostTensor, input: &HostTensor) {
    assert_eq!(got.shape, want.shape, "{what}: shape");
    for (i, (a, e)) in got.data.iter().zip(&want.data).enumerate() {
        assert!(
            a.to_bits() == e.to_bits(),
            "{what}: x = {:e} ({:#010x}): got {a:e} ({:#010x}), cpu {e:e} ({:#010x})",
            input.data[i],
            input.data[i].to_bits(),
            a.to_bits(),
            e.to_bits()
        );
    }
}

/// Reproducible mode: exp, tanh, silu and gelu on every backend equal the CPU's bits exactly (NaN
/// payloads and signs of zero included) over edge cases and 2^16 seeded random inputs, in shapes that
/// are not multiples of the workgroup size.
#[test]
fn transcendental_ops_are_bitwise_equal_in_reproducible_mode() {
    let inputs = [transcendental_inputs(7, 1 << 16), transcendental_inputs(8, 1000)];
    let mut cpu = Backend::Cpu(CpuBackend::new(Determinism::Reproducible));
    for mut b in backends(Determinism::Reproducible).into_iter().skip(1) {
        for x in &inputs {
            for op in TRANSCENDENTAL {
                let what = format!("{} of {} values on {}", op.name(), x.data.len(), b.describe());
                let got = run(&mut b, &[x], |b, ids| b.unary(op, ids[0])).unwrap();
                let want = run(&mut cpu, &[x], |b, ids| b.unary(op, ids[0])).unwrap();
                assert_same_bits(&what, &got, &want, x);
            }
        }
    }
}

/// The op evaluated in f64 (gelu with the exact constants: `x sigmoid(2u)` is `0.5 x (1 + tanh u)`
/// without the cancellation of `1 + tanh u` for negative x).
fn transcendental_f64(op: UnaryOp, x: f64) -> f64 {
    match op {
        UnaryOp::Exp => x.exp(),
        UnaryOp::Tanh => x.tanh(),
        UnaryOp::Silu => x / (1.0 + (-x).exp()),
        UnaryOp::Gelu => {
            let k = 2.0 * (2.0 / std::f64::consts::PI).sqrt();
            x / (1.0 + (-k * (x + 0.044715 * x * x * x)).exp())
        }
        _ => unreachable!(),
    }
}

/// The largest error allowed in units of the last place of the f32 result (the maxima measured over
/// every f32 input are 1.33 for exp, 2.00 for tanh, 4.01 for silu and 3.83 for gelu).
fn ulp_bound(op: UnaryOp) -> f64 {
    match op {
        UnaryOp::Exp => 2.0,
        UnaryOp::Tanh => 2.5,
        _ => 4.5,
    }
}

/// Checks one result of the portable functions against f64: NaN keeps its bits; infinities are
/// the limits (silu and gelu of -inf are -0); a result below the normal range is a zero of its sign
/// (subnormals flush); a result above `f32::MAX` is inf; everything else within `ulp_bound` ULP.
/// Returns the error in ULP.
fn check_transcendental(op: UnaryOp, x: f32, got: f32) -> f64 {
    let what = format!("{}({x:e}) [{:#010x}] = {got:e} [{:#010x}]", op.name(), x.to_bits(), got.to_bits());
    if x.is_nan() {
        assert_eq!(got.to_bits(), x.to_bits(), "{what}: NaN keeps its bits");
        return 0.0;
    }
    if x.is_infinite() {
        let want: f32 = match (op, x > 0.0) {
            (UnaryOp::Tanh, pos) => {
                if pos {
                    1.0
                } else {
                    -1.0
                }
            }
            (_, true) => f32::INFINITY,
            (UnaryOp::Exp, false) => 0.0,
            (_, false) => -0.0,
        };
        assert_eq!(got.to_bits(), want.to_bits(), "{what}: want {want:e}");
        return 0.0;
    }
    let want = transcendental_f64(op, x as f64);
    let w32 = want as f32;
    if w32.is_infinite() {
        assert_eq!(got, w32, "{what}: want {want:e}");
        return 0.0;
    }
    let min = f32::MIN_POSITIVE as f64;
    if want.abs() < min || (got == 0.0 && want.abs() < min * (1.0 + 1e-6)) {
        // Flushed to a zero of the right sign (or, right at the boundary, the smallest normals).
        let zero = got == 0.0 && got.is_sign_negative() == (want < 0.0 || (want == 0.0 && x.is_sign_negative() && op != UnaryOp::Exp));
        assert!(zero || (got as f64 - want).abs() <= 8.0 * min * f32::EPSILON as f64, "{what}: want {want:e} (flushed to a signed zero)");
        return 0.0;
    }
    assert!(got.is_finite() && got.abs() >= f32::MIN_POSITIVE, "{what}: want {want:e}");
    let exponent = ((w32.abs().to_bits() >> 23) as i32 - 127).max(-126);
    let ulps = (got as f64 - want).abs() / 2f64.powi(exponent - 23);
    assert!(ulps <= ulp_bound(op), "{what}: want {want:e}, error {ulps:.2} ULP (bound {})", ulp_bound(op));
    assert!(((got as f64 - want) / want).abs() <= 1e-6, "{what}: want {want:e}, relative error above 1e-6");
    ulps
}

/// Reproducible mode's exp, tanh, silu and gelu on the CPU backend against f64 over a dense sweep:
/// every 4099th f32 bit pattern (all magnitudes, both signs, NaNs), 2^20 evenly spaced points of
/// [-16, 16], and the edge cases. Fast mode keeps the standard library (checked on a few points).
#[test]
fn transcendental_ops_are_accurate_in_reproducible_mode() {
    let mut v = transcendental_edges();
    v.extend((0..=u32::MAX / 4099).map(|i| f32::from_bits(i * 4099)));
    v.extend((0..1 << 20).map(|i| (i as f32 - (1 << 19) as f32) / (1 << 15) as f32));
    let x = HostTensor::new(vec![v.len()], v).unwrap();
    let mut cpu = Backend::Cpu(CpuBackend::new(Determinism::Reproducible));
    for op in TRANSCENDENTAL {
        let got = run(&mut cpu, &[&x], |b, ids| b.unary(op, ids[0])).unwrap();
        let worst = x.data.iter().zip(&got.data).map(|(&x, &g)| check_transcendental(op, x, g)).fold(0.0, f64::max);
        eprintln!("{}: {} inputs, max error {worst:.2} ULP", op.name(), x.data.len());
    }
    let mut fast = Backend::Cpu(CpuBackend::new(Determinism::Fast));
    let x = HostTensor::new(vec![3], vec![-1.5, 0.25, 3.0]).unwrap();
    for op in TRANSCENDENTAL {
        let got = run(&mut fast, &[&x], |b, ids| b.unary(op, ids[0])).unwrap();
        let want: Vec<f32> = x
            .data
            .iter()
            .map(|&v| match op {
                UnaryOp::Exp => v.exp(),
                UnaryOp::Tanh => v.tanh(),
                UnaryOp::Silu => v / (1.0 + (-v).exp()),
                _ => 0.5 * v * (1.0 + (0.797_884_6 * (v + 0.044_715 * v * v * v)).tanh()),
            })
            .collect();
        assert_eq!(got.data, want, "fast {} uses the standard library", op.name());
    }
}

backend_test!(reductions_match_reference, |b, cpu, det| {
    let shapes: &[&[usize]] = &[&[1, 1], &[3, 5], &[4, 1000], &[2, 3, 7], &[5], &[3, 0], &[2, 2, 2, 3]];
    for (i, &shape) in shapes.iter().enumerate() {
        let x = rand_tensor(40 + i as u64, shape, 2.0);
        for op in [ReduceOp::Sum, ReduceOp::Mean, ReduceOp::Max, ReduceOp::Argmax] {
            let what = format!("{} {shape:?} on {}", op.name(), b.describe());
            if op == ReduceOp::Argmax && shape.last() == Some(&0) {
                let err = run(b, &[&x], |b, ids| b.reduce_last(op, ids[0])).unwrap_err();
                assert!(matches!(err, GpuError::ShapeMismatch { .. }), "{what}: {err}");
                continue;
            }
            let got = run(b, &[&x], |b, ids| b.reduce_last(op, ids[0])).unwrap();
            let want = run(cpu, &[&x], |b, ids| b.reduce_last(op, ids[0])).unwrap();
            let exact = matches!(op, ReduceOp::Max | ReduceOp::Argmax);
            check_vs_cpu(&what, if exact { Determinism::Reproducible } else { det }, true, &got, &want, F64_TOL);
            let rs = rows(&x);
            let last = *shape.last().unwrap();
            let (r, bound): (Vec<f64>, Vec<f64>) = rs
                .iter()
                .map(|row| {
                    let s: f64 = row.iter().sum();
                    let a: f64 = row.iter().map(|v| v.abs()).sum();
                    match op {
                        ReduceOp::Sum => (s, a),
                        ReduceOp::Mean => (s / last as f64, a / last as f64 + s.abs() / last as f64),
                        ReduceOp::Max => (row.iter().cloned().fold(f64::NEG_INFINITY, f64::max), 0.0),
                        ReduceOp::Argmax => {
                            let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                            (row.iter().position(|&v| v == m).unwrap() as f64, 0.0)
                        }
                    }
                })
                .unzip();
            if last == 0 {
                let expect = match op {
                    ReduceOp::Sum => 0.0,
                    ReduceOp::Mean => f64::NAN,
                    _ => f64::NEG_INFINITY,
                };
                assert_close(&what, &got.data, &vec![expect; got.data.len()], BITWISE);
            } else {
                assert_within_bound(&what, &got.data, &r, &bound, last + 1);
            }
        }
    }
});

backend_test!(softmax_matches_reference, |b, cpu, det| {
    let shapes: &[&[usize]] = &[&[1, 1], &[3, 5], &[4, 300], &[2, 3, 17], &[2, 0]];
    for (i, &shape) in shapes.iter().enumerate() {
        let x = rand_tensor(50 + i as u64, shape, 8.0);
        let what = format!("softmax {shape:?} on {}", b.describe());
        let got = run(b, &[&x], |b, ids| b.softmax_last(ids[0])).unwrap();
        let want = run(cpu, &[&x], |b, ids| b.softmax_last(ids[0])).unwrap();
        check_vs_cpu(&what, det, true, &got, &want, DEVICE_TOL);
        let r: Vec<f64> = rows(&x)
            .iter()
            .flat_map(|row| {
                let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = row.iter().map(|v| (v - m).exp()).collect();
                let s: f64 = e.iter().sum();
                e.into_iter().map(move |v| v / s)
            })
            .collect();
        assert_close(&what, &got.data, &r, F64_TOL);
    }
});

backend_test!(norms_match_reference, |b, cpu, det| {
    let shapes: &[&[usize]] = &[&[1, 1], &[3, 5], &[4, 300], &[2, 3, 17], &[0, 4]];
    let eps = 1e-5f32;
    for (i, &shape) in shapes.iter().enumerate() {
        let last = *shape.last().unwrap();
        let x = rand_tensor(60 + i as u64, shape, 3.0);
        let w = rand_tensor(70 + i as u64, &[last], 1.5);
        let bias = rand_tensor(80 + i as u64, &[last], 0.5);
        let (wd, bd): (Vec<f64>, Vec<f64>) = (w.data.iter().map(|&v| v as f64).collect(), bias.data.iter().map(|&v| v as f64).collect());

        let what = format!("rmsnorm {shape:?} on {}", b.describe());
        let got = run(b, &[&x, &w], |b, ids| b.rmsnorm(ids[0], ids[1], eps)).unwrap();
        let want = run(cpu, &[&x, &w], |b, ids| b.rmsnorm(ids[0], ids[1], eps)).unwrap();
        check_vs_cpu(&what, det, true, &got, &want, F64_TOL);
        let r: Vec<f64> = rows(&x)
            .iter()
            .flat_map(|row| {
                let inv = 1.0 / (row.iter().map(|v| v * v).sum::<f64>() / last as f64 + eps as f64).sqrt();
                row.iter().zip(&wd).map(move |(v, w)| v * inv * w).collect::<Vec<_>>()
            })
            .collect();
        assert_close(&what, &got.data, &r, F64_TOL);

        let what = format!("layernorm {shape:?} on {}", b.describe());
        let got = run(b, &[&x, &w, &bias], |b, ids| b.layernorm(ids[0], ids[1], ids[2], eps)).unwrap();
        let want = run(cpu, &[&x, &w, &bias], |b, ids| b.layernorm(ids[0], ids[1], ids[2], eps)).unwrap();
        check_vs_cpu(&what, det, true, &got, &want, F64_TOL);
        let r: Vec<f64> = rows(&x)
            .iter()
            .flat_map(|row| {
                let mean = row.iter().sum::<f64>() / last as f64;
                let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / last as f64;
                let inv = 1.0 / (var + eps as f64).sqrt();
                row.iter().zip(&wd).zip(&bd).map(move |((v, w), b)| (v - mean) * inv * w + b).collect::<Vec<_>>()
            })
            .collect();
        // A single-element row normalises to exactly the bias.
        assert_close(&what, &got.data, &r, Tol { abs: 1e-5, rel: 1e-5 });
    }
});

backend_test!(misuse_returns_errors_and_backend_stays_healthy, |b, cpu, det| {
    let _ = (cpu, det);
    let a = b.upload(&rand_tensor(1, &[3, 5], 1.0)).unwrap();
    let c = b.upload(&rand_tensor(2, &[4, 7], 1.0)).unwrap();
    let w = b.upload(&rand_tensor(3, &[4], 1.0)).unwrap();
    let shape_mismatch = |r: Result<TensorId>| matches!(r, Err(GpuError::ShapeMismatch { .. }));
    assert!(shape_mismatch(b.matmul(a, c, false, false)));
    assert!(shape_mismatch(b.add(a, c)));
    assert!(shape_mismatch(b.rmsnorm(a, w, 1e-5)));
    assert!(shape_mismatch(b.layernorm(a, w, w, 1e-5)));
    assert!(shape_mismatch(b.matmul(w, w, false, false)));
    let bogus = TensorId(987_654);
    assert_eq!(b.read(bogus), Err(GpuError::UnknownTensor(bogus)));
    assert_eq!(b.relu(bogus), Err(GpuError::UnknownTensor(bogus)));
    assert_eq!(b.free(bogus), Err(GpuError::UnknownTensor(bogus)));
    b.free(c).unwrap();
    assert_eq!(b.free(c), Err(GpuError::UnknownTensor(c)));
    assert_eq!(b.add(a, c), Err(GpuError::UnknownTensor(c)));
    assert!(b.upload(&HostTensor { shape: vec![2, 2], data: vec![1.0] }).is_err());
    assert!(b.upload(&HostTensor { shape: vec![1, 1, 1, 1, 1], data: vec![1.0] }).is_err());
    assert!(b.upload(&HostTensor { shape: vec![], data: vec![1.0] }).is_err());
    // Still healthy: a real op works and ids are not reused.
    let r = b.scale(a, 2.0).unwrap();
    assert!(r.0 > c.0);
    assert_eq!(b.read(r).unwrap().shape, vec![3, 5]);
});

#[test]
fn tensors_stay_resident_across_chained_ops() {
    for mut b in backends(Determinism::Reproducible) {
        let x = b.upload(&rand_tensor(5, &[6, 10], 1.0)).unwrap();
        let w = b.upload(&rand_tensor(6, &[10, 8], 1.0)).unwrap();
        let h = b.matmul(x, w, false, false).unwrap();
        let h = b.gelu(h).unwrap();
        let s = b.softmax_last(h).unwrap();
        let total = b.sum_last(s).unwrap();
        let out = b.read(total).unwrap();
        assert_eq!(out.shape, vec![6]);
        assert_close(&format!("softmax rows on {}", b.describe()), &out.data, &[1.0; 6], Tol { abs: 1e-5, rel: 0.0 });
        // Freed buffers go back to the pool and are reused without stale data leaking into results.
        for id in [x, w, h, s, total] {
            b.free(id).unwrap();
        }
        let z = b.upload(&HostTensor::new(vec![0, 3], vec![]).unwrap()).unwrap();
        let k0 = b.upload(&HostTensor::new(vec![0, 3], vec![]).unwrap()).unwrap();
        let m = b.matmul(z, k0, true, false).unwrap();
        let m = b.read(m).unwrap();
        assert_eq!(m.shape, vec![3, 3]);
        assert!(m.data.iter().all(|&v| v == 0.0), "k = 0 matmul is zeros on {}", b.describe());
    }
}

#[test]
fn selection_reports_skipped_candidates() {
    let (b, skipped) = select(&[BackendKind::Cuda, BackendKind::Wgpu, BackendKind::Cpu], Determinism::Reproducible).unwrap();
    eprintln!("selected {} after skipping {skipped:?}", b.describe());
    let order = [BackendKind::Cuda, BackendKind::Wgpu, BackendKind::Cpu];
    let pos = order.iter().position(|&k| k == b.kind()).unwrap();
    assert_eq!(skipped.len(), pos, "one reason per skipped candidate");
    for (reason, kind) in skipped.iter().zip(order) {
        assert!(reason.starts_with(kind.as_str()), "{reason}");
    }
    let (b, skipped) = select(&[BackendKind::Cpu], Determinism::Fast).unwrap();
    assert_eq!((b.kind(), skipped.len()), (BackendKind::Cpu, 0));
    assert!(select(&[], Determinism::Fast).is_err());
}

// ==== dtypes, layout, gather, rotary, attention, batching ====
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

backend_test!(raw_storage_round_trips_in_every_dtype, |b, cpu, det| {
    let _ = det;
    let cases: &[(DType, &[usize])] = &[
        (DType::F32, &[3, 5]),
        (DType::F16, &[3]),
        (DType::F16, &[2, 3]),
        (DType::I32, &[4]),
        (DType::Q8_0, &[2, 64]),
        (DType::Q4_0, &[3, 32]),
        (DType::Q4_1, &[1, 96]),
        (DType::Q8_0, &[0, 32]),
        (DType::F16, &[1, 1]),
    ];
    for (i, &(dtype, shape)) in cases.iter().enumerate() {
        let what = format!("{dtype} {shape:?} on {}", b.describe());
        let t = rand_raw(300 + i as u64, dtype, shape, 3.0);
        let id = b.upload_raw(&t).unwrap();
        assert_eq!(b.dtype(id).unwrap(), dtype, "{what}");
        assert_eq!(b.shape(id).unwrap(), shape.to_vec(), "{what}");
        assert_raw_eq(&what, &b.read_raw(id).unwrap(), &t);
        let read = b.read(id).unwrap();
        assert_close(&what, &read.data, &values(&t).iter().map(|&v| v as f64).collect::<Vec<_>>(), BITWISE);
        b.free(id).unwrap();
    }
    assert_eq!(b.live_bytes(), 0, "everything freed on {}", b.describe());
    let bad_len = RawTensor { dtype: DType::F16, shape: vec![3], bytes: vec![0; 4] };
    same_error_kind("upload_raw length", b.upload_raw(&bad_len), cpu.upload_raw(&bad_len));
    let unaligned = RawTensor { dtype: DType::Q4_0, shape: vec![2, 33], bytes: vec![0; 36] };
    same_error_kind("upload_raw q4_0 [2, 33]", b.upload_raw(&unaligned), cpu.upload_raw(&unaligned));
});

/// `h` is the f16 nearest to finite `x` (ties to even), or the right infinity past the f16 range.
fn is_nearest_f16(x: f32, h: u16) -> bool {
    let v = |h: u16| quant::f16_value(h) as f64;
    let x = x as f64;
    if x.abs() >= 65520.0 {
        return h == if x > 0.0 { 0x7c00 } else { 0xfc00 };
    }
    let d = (v(h) - x).abs();
    let neighbours = [h.wrapping_add(1), h.wrapping_sub(1), h ^ 0x8000];
    neighbours.iter().filter(|&&n| n & 0x7c00 != 0x7c00).all(|&n| (v(n) - x).abs() > d || ((v(n) - x).abs() == d && h & 1 == 0))
}

backend_test!(casts_match_cpu_bitwise, |b, cpu, det| {
    let _ = det;
    // Specials: signed zeros, f16 ties (1 + 2^-11 rounds down to even, 1 + 3 * 2^-11 up), f16
    // subnormals and underflow, overflow, i32 saturation and truncation, NaN and infinities.
    let mut special = vec![
        0.0,
        -0.0,
        1.0,
        -1.0,
        1.000_488_3,
        1.001_464_8,
        65504.0,
        65519.99,
        65520.0,
        -65520.0,
        6.0e-8,
        2.98e-8,
        3.0e-8,
        6.1e-5,
        1e-20,
        2.5,
        -2.5,
        3.7,
        -3.7,
        0.499_999_97,
        2_147_483_520.0,
        2_147_483_648.0,
        -2_147_483_648.0,
        -2_147_483_904.0,
        1e10,
        -1e10,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        f32::MIN_POSITIVE,
        -1e-40,
        1234.567,
    ];
    special.extend(rand_tensor(310, &[32], 1000.0).data);
    let x = f32_raw(&[2, 32], &special);
    for to in [DType::F16, DType::I32, DType::Q8_0, DType::Q4_0, DType::Q4_1, DType::F32] {
        let what = format!("cast f32 -> {to} on {}", b.describe());
        let got = run_raw(b, &[&x], |b, ids| b.cast(ids[0], to)).unwrap();
        let want = run_raw(cpu, &[&x], |b, ids| b.cast(ids[0], to)).unwrap();
        assert_raw_eq(&what, &got, &want);
        if to == DType::F16 {
            for (i, &v) in special.iter().enumerate().filter(|(_, v)| v.is_finite()) {
                let h = u16::from_le_bytes([got.bytes[2 * i], got.bytes[2 * i + 1]]);
                assert!(is_nearest_f16(v, h), "{what}: {v:e} -> {h:#06x}");
            }
        }
        if to == DType::I32 {
            for (i, &v) in special.iter().enumerate() {
                let want = if v.is_nan() { 0 } else { (v as f64).trunc().clamp(i32::MIN as f64, i32::MAX as f64) as i32 };
                assert_eq!(i32::from_le_bytes(elem(&got, i).try_into().unwrap()), want, "{what}: {v:e}");
            }
        }
    }
    // Every f16 bit pattern to f32: exact (NaN keeps its payload).
    let all: Vec<u8> = (0..=u16::MAX).flat_map(|h| h.to_le_bytes()).collect();
    let h = RawTensor::new(DType::F16, vec![256, 256], all).unwrap();
    let what = format!("cast f16 -> f32 on {}", b.describe());
    let got = run_raw(b, &[&h], |b, ids| b.cast(ids[0], DType::F32)).unwrap();
    assert_raw_eq(&what, &got, &run_raw(cpu, &[&h], |b, ids| b.cast(ids[0], DType::F32)).unwrap());
    for bits in 0..=u16::MAX {
        let v = f32::from_le_bytes(elem(&got, bits as usize).try_into().unwrap());
        let (e, m) = ((bits >> 10) & 31, (bits & 1023) as f64);
        let sign = if bits & 0x8000 != 0 { -1.0 } else { 1.0 };
        let want = match e {
            0 => sign * m * 2f64.powi(-24),
            31 if m == 0.0 => sign * f64::INFINITY,
            31 => f64::NAN,
            _ => sign * (1024.0 + m) * 2f64.powi(e as i32 - 25),
        };
        assert!(v as f64 == want || (v.is_nan() && want.is_nan()), "{what}: {bits:#06x} -> {v:e}, want {want:e}");
    }
    // i32 -> f32 rounds to nearest even.
    let ints = [0, 1, -1, 16_777_216, 16_777_217, 16_777_219, -16_777_217, 33_554_435, i32::MAX, i32::MIN, 123_456_789, -7];
    let it = RawTensor::from_i32(vec![ints.len()], &ints).unwrap();
    let what = format!("cast i32 -> f32 on {}", b.describe());
    let got = run_raw(b, &[&it], |b, ids| b.cast(ids[0], DType::F32)).unwrap();
    assert_raw_eq(&what, &got, &run_raw(cpu, &[&it], |b, ids| b.cast(ids[0], DType::F32)).unwrap());
    for (i, &v) in ints.iter().enumerate() {
        let got = f32::from_le_bytes(elem(&got, i).try_into().unwrap()) as f64;
        let err = (got - v as f64).abs();
        let ulp = if v.unsigned_abs() >= 1 << 24 { 2f64.powi(32 - v.unsigned_abs().leading_zeros() as i32 - 24) } else { 1.0 };
        assert!(err < ulp / 2.0 || (err == ulp / 2.0 && (got / ulp) % 2.0 == 0.0), "{what}: {v} -> {got}");
    }
    // The block types dequantize to exactly the defined values.
    for (i, dtype) in [DType::Q8_0, DType::Q4_0, DType::Q4_1].into_iter().enumerate() {
        let q = rand_raw(320 + i as u64, dtype, &[3, 64], 4.0);
        let what = format!("cast {dtype} -> f32 on {}", b.describe());
        let got = run_raw(b, &[&q], |b, ids| b.cast(ids[0], DType::F32)).unwrap();
        assert_raw_eq(&what, &got, &run_raw(cpu, &[&q], |b, ids| b.cast(ids[0], DType::F32)).unwrap());
        assert_raw_eq(&what, &got, &f32_raw(&[3, 64], &values(&q)));
    }
    // The identity shares nothing observable: the source can be freed.
    let id = b.upload_raw(&x).unwrap();
    let same = b.cast(id, DType::F32).unwrap();
    assert_ne!(id, same);
    b.free(id).unwrap();
    assert_raw_eq("identity cast", &b.read_raw(same).unwrap(), &x);
    b.free(same).unwrap();
    // Pairs outside the contract, and a quantized target without whole blocks.
    let h = rand_raw(330, DType::F16, &[2, 32], 1.0);
    let q = rand_raw(331, DType::Q8_0, &[2, 32], 1.0);
    let odd = rand_raw(332, DType::F32, &[2, 33], 1.0);
    let misuse: &[(&RawTensor, DType)] = &[
        (&h, DType::I32),
        (&h, DType::Q4_0),
        (&it, DType::F16),
        (&it, DType::Q8_0),
        (&q, DType::F16),
        (&q, DType::Q4_1),
        (&odd, DType::Q8_0),
    ];
    for &(t, to) in misuse {
        let what = format!("cast {} {:?} -> {to} on {}", t.dtype, t.shape, b.describe());
        same_error_kind(&what, run_raw(b, &[t], |b, ids| b.cast(ids[0], to)), run_raw(cpu, &[t], |b, ids| b.cast(ids[0], to)));
    }
});

backend_test!(matmul_with_weight_dtypes_matches_reference, |b, cpu, det| {
    // (a, b, transpose_a, transpose_b); the block types need transpose_b (weights [n, k]).
    let transposed: &[(&[usize], &[usize], bool)] = &[
        (&[1, 64], &[7, 64], false),
        (&[1, 96], &[2, 5, 96], false),
        (&[2, 1, 64], &[2, 3, 64], false),
        (&[5, 64], &[33, 64], false),
        (&[64, 5], &[33, 64], true),
        (&[70, 32], &[65, 32], false),
        (&[3, 0], &[4, 0], false),
        (&[0, 32], &[4, 32], false),
        (&[1, 32], &[0, 32], false),
        (&[1, 32], &[1, 32], false),
    ];
    /// (weight dtype, a shape, b shape, transpose_a, transpose_b)
    type Case<'a> = (DType, &'a [usize], &'a [usize], bool, bool);
    let mut cases: Vec<Case> = Vec::new();
    for dtype in [DType::F16, DType::Q8_0, DType::Q4_0, DType::Q4_1, DType::F32] {
        for &(sa, sb, ta) in transposed {
            cases.push((dtype, sa, sb, ta, true));
        }
    }
    let plain: &[(&[usize], &[usize], bool)] =
        &[(&[5, 13], &[13, 9], false), (&[1, 13], &[13, 9], false), (&[13, 5], &[13, 9], true), (&[2, 1, 17], &[2, 17, 5], false)];
    for dtype in [DType::F16, DType::F32] {
        for &(sa, sb, ta) in plain {
            cases.push((dtype, sa, sb, ta, false));
        }
    }
    for (i, &(dtype, sa, sb, ta, tb)) in cases.iter().enumerate() {
        let a = rand_raw(400 + i as u64, DType::F32, sa, 1.0);
        let w = rand_raw(500 + i as u64, dtype, sb, 1.0);
        let what = format!(
            "matmul {sa:?}{} @ {dtype} {sb:?}{} on {} ({det:?})",
            if ta { "^T" } else { "" },
            if tb { "^T" } else { "" },
            b.describe()
        );
        let got = run_raw(b, &[&a, &w], |b, ids| b.matmul(ids[0], ids[1], ta, tb)).unwrap();
        let want = run_raw(cpu, &[&a, &w], |b, ids| b.matmul(ids[0], ids[1], ta, tb)).unwrap();
        assert_eq!(got.dtype, DType::F32, "{what}");
        if det == Determinism::Reproducible {
            assert_raw_eq(&what, &got, &want);
        }
        let (r, bound, k) = matmul_f64(&host(&a), &host(&w), ta, tb);
        assert_within_bound(&what, &values(&got), &r, &bound, k);
    }
    let a = rand_raw(600, DType::F32, &[3, 32], 1.0);
    let q = rand_raw(601, DType::Q4_0, &[4, 32], 1.0);
    let h = rand_raw(602, DType::F16, &[3, 32], 1.0);
    let q64 = rand_raw(603, DType::Q8_0, &[4, 64], 1.0);
    let ids = RawTensor::from_i32(vec![32, 4], &[1; 128]).unwrap();
    let misuse: [(&str, &RawTensor, &RawTensor, bool); 4] = [
        ("quantized b not transposed", &a, &q, false),
        ("i32 b", &a, &ids, false),
        ("f16 a", &h, &q, true),
        ("inner dims", &a, &q64, true),
    ];
    for (what, x, y, tb) in misuse {
        let what = format!("matmul {what} on {}", b.describe());
        same_error_kind(
            &what,
            run_raw(b, &[x, y], |b, ids| b.matmul(ids[0], ids[1], false, tb)),
            run_raw(cpu, &[x, y], |b, ids| b.matmul(ids[0], ids[1], false, tb)),
        );
    }
});

backend_test!(gather_rows_matches_reference, |b, cpu, det| {
    let _ = det;
    let tables: &[(DType, &[usize])] = &[
        (DType::F32, &[10, 7]),
        (DType::F16, &[10, 7]),
        (DType::F16, &[9, 6]),
        (DType::Q8_0, &[10, 64]),
        (DType::Q4_0, &[6, 32]),
        (DType::Q4_1, &[5, 64]),
        (DType::F32, &[1, 1]),
    ];
    for (i, &(dtype, shape)) in tables.iter().enumerate() {
        let v = shape[0] as i32;
        let table = rand_raw(700 + i as u64, dtype, shape, 2.0);
        let id_sets: [(&[usize], Vec<i32>); 4] =
            [(&[3], vec![0, v - 1, v / 2]), (&[2, 3], vec![v - 1, 0, 0, v / 3, v - 1, v / 2]), (&[0], vec![]), (&[1, 1, 1], vec![v - 1])];
        for (shape_ids, idv) in id_sets {
            let ids = RawTensor::from_i32(shape_ids.to_vec(), &idv).unwrap();
            let what = format!("gather_rows {dtype} {shape:?} ids {idv:?} on {}", b.describe());
            let got = run_raw(b, &[&table, &ids], |b, x| b.gather_rows(x[0], x[1])).unwrap();
            assert_raw_eq(&what, &got, &run_raw(cpu, &[&table, &ids], |b, x| b.gather_rows(x[0], x[1])).unwrap());
            let tv = values(&table);
            let d = shape[1];
            let want: Vec<f32> = idv.iter().flat_map(|&r| tv[r as usize * d..(r as usize + 1) * d].to_vec()).collect();
            let mut out_shape = shape_ids.to_vec();
            out_shape.push(d);
            assert_raw_eq(&what, &got, &f32_raw(&out_shape, &want));
        }
    }
    // Ids computed on the device: argmax (range known), a cast from f32 (read back to validate).
    let table = rand_raw(710, DType::Q8_0, &[6, 32], 1.0);
    let x = rand_raw(711, DType::F32, &[4, 6], 1.0);
    let what = format!("gather_rows by argmax on {}", b.describe());
    let run_argmax = |b: &mut Backend| run_raw(b, &[&table, &x], |b, t| b.argmax_last(t[1]).and_then(|ids| b.gather_rows(t[0], ids)));
    assert_raw_eq(&what, &run_argmax(b).unwrap(), &run_argmax(cpu).unwrap());
    for (floats, ok) in [(vec![1.0, 5.9, 0.0, 3.5], true), (vec![1.0, 6.0], false), (vec![-1.0], false), (vec![f32::NAN, 2.0], true)] {
        let ft = f32_raw(&[floats.len()], &floats);
        let what = format!("gather_rows by cast ids {floats:?} on {}", b.describe());
        let go = |b: &mut Backend| run_raw(b, &[&table, &ft], |b, t| b.cast(t[1], DType::I32).and_then(|ids| b.gather_rows(t[0], ids)));
        if ok {
            assert_raw_eq(&what, &go(b).unwrap(), &go(cpu).unwrap());
        } else {
            same_error_kind(&what, go(b), go(cpu));
        }
    }
    let ft = rand_raw(712, DType::F32, &[3, 4], 1.0);
    let bad: [(&str, RawTensor, RawTensor); 5] = [
        ("negative id", table.clone(), RawTensor::from_i32(vec![2], &[0, -1]).unwrap()),
        ("id == rows", table.clone(), RawTensor::from_i32(vec![1], &[6]).unwrap()),
        ("i32 table", RawTensor::from_i32(vec![2, 2], &[1, 2, 3, 4]).unwrap(), RawTensor::from_i32(vec![1], &[0]).unwrap()),
        ("f32 ids", table.clone(), ft.clone()),
        ("1-D table", rand_raw(713, DType::F32, &[5], 1.0), RawTensor::from_i32(vec![1], &[0]).unwrap()),
    ];
    for (what, t, ids) in bad {
        let what = format!("gather_rows {what} on {}", b.describe());
        same_error_kind(
            &what,
            run_raw(b, &[&t, &ids], |b, x| b.gather_rows(x[0], x[1])),
            run_raw(cpu, &[&t, &ids], |b, x| b.gather_rows(x[0], x[1])),
        );
    }
});

backend_test!(layout_ops_match_reference, |b, cpu, det| {
    let _ = det;
    for (k, dtype) in [DType::F32, DType::F16, DType::I32].into_iter().enumerate() {
        let seed = 800 + 100 * k as u64;
        let permutes: &[(&[usize], &[usize])] = &[
            (&[3, 5], &[1, 0]),
            (&[2, 3, 4], &[2, 0, 1]),
            (&[2, 3, 4, 5], &[3, 1, 0, 2]),
            (&[2, 3, 5], &[0, 1, 2]),
            (&[1, 7], &[1, 0]),
            (&[0, 3], &[1, 0]),
            (&[3], &[0]),
        ];
        for (i, &(shape, axes)) in permutes.iter().enumerate() {
            let x = rand_raw(seed + i as u64, dtype, shape, 50.0);
            let what = format!("permute {dtype} {shape:?} {axes:?} on {}", b.describe());
            let got = run_raw(b, &[&x], |b, t| b.permute(t[0], axes)).unwrap();
            assert_raw_eq(&what, &got, &run_raw(cpu, &[&x], |b, t| b.permute(t[0], axes)).unwrap());
            let out_shape: Vec<usize> = axes.iter().map(|&a| shape[a]).collect();
            let want = gather_elems(&x, &out_shape, |c| {
                let mut ci = vec![0; shape.len()];
                for (i, &a) in axes.iter().enumerate() {
                    ci[a] = c[i];
                }
                flat_index(shape, &ci)
            });
            assert_raw_eq(&what, &got, &want);
        }
        let slices: &[(&[usize], usize, usize, usize)] = &[
            (&[4, 5, 6], 1, 2, 3),
            (&[4, 5, 6], 2, 1, 3),
            (&[7], 0, 3, 3),
            (&[3, 5], 0, 1, 0),
            (&[2, 3, 4, 5], 3, 1, 3),
            (&[1, 1], 1, 0, 1),
        ];
        for (i, &(shape, axis, start, len)) in slices.iter().enumerate() {
            let x = rand_raw(seed + 20 + i as u64, dtype, shape, 50.0);
            let what = format!("slice {dtype} {shape:?} axis {axis} [{start}, +{len}) on {}", b.describe());
            let got = run_raw(b, &[&x], |b, t| b.slice(t[0], axis, start, len)).unwrap();
            assert_raw_eq(&what, &got, &run_raw(cpu, &[&x], |b, t| b.slice(t[0], axis, start, len)).unwrap());
            let mut out_shape = shape.to_vec();
            out_shape[axis] = len;
            let want = gather_elems(&x, &out_shape, |c| {
                let mut ci = c.to_vec();
                ci[axis] += start;
                flat_index(shape, &ci)
            });
            assert_raw_eq(&what, &got, &want);
        }
        let concats: &[(&[usize], &[usize], usize)] = &[
            (&[2, 3], &[2, 5], 1),
            (&[3, 3], &[1, 3], 0),
            (&[2, 3, 3], &[2, 1, 3], 1),
            (&[2, 1, 3, 3], &[2, 1, 3, 1], 3),
            (&[0, 3], &[2, 3], 0),
            (&[3], &[0], 0),
            (&[1, 1], &[1, 1], 1),
        ];
        for (i, &(sa, sb, axis)) in concats.iter().enumerate() {
            let (xa, xb) = (rand_raw(seed + 40 + i as u64, dtype, sa, 50.0), rand_raw(seed + 60 + i as u64, dtype, sb, 50.0));
            let what = format!("concat {dtype} {sa:?} {sb:?} axis {axis} on {}", b.describe());
            let got = run_raw(b, &[&xa, &xb], |b, t| b.concat(t[0], t[1], axis)).unwrap();
            assert_raw_eq(&what, &got, &run_raw(cpu, &[&xa, &xb], |b, t| b.concat(t[0], t[1], axis)).unwrap());
            let mut out_shape = sa.to_vec();
            out_shape[axis] += sb[axis];
            // Concatenated storage, then element (c) comes from a or b.
            let both =
                RawTensor { dtype, shape: vec![xa.bytes.len() + xb.bytes.len()], bytes: [xa.bytes.clone(), xb.bytes.clone()].concat() };
            let na: usize = sa.iter().product();
            let want = gather_elems(&both, &out_shape, |c| {
                let mut ci = c.to_vec();
                if ci[axis] < sa[axis] {
                    flat_index(sa, &ci)
                } else {
                    ci[axis] -= sa[axis];
                    na + flat_index(sb, &ci)
                }
            });
            assert_raw_eq(&what, &got, &want);
        }
        let x = rand_raw(seed + 80, dtype, &[2, 6], 50.0);
        let got = run_raw(b, &[&x], |b, t| b.reshape(t[0], &[3, 1, 4])).unwrap();
        assert_raw_eq("reshape", &got, &RawTensor { shape: vec![3, 1, 4], ..x.clone() });
    }
    // Reshape keeps quantized blocks whole.
    let q = rand_raw(890, DType::Q4_1, &[2, 64], 1.0);
    for to in [&[4usize, 32][..], &[128], &[1, 2, 1, 64]] {
        let got = run_raw(b, &[&q], |b, t| b.reshape(t[0], to)).unwrap();
        assert_raw_eq("reshape q4_1", &got, &RawTensor { shape: to.to_vec(), ..q.clone() });
    }
    let x = rand_raw(891, DType::F32, &[3, 4], 1.0);
    let h = rand_raw(892, DType::F16, &[3, 4], 1.0);
    type Op = fn(&mut Backend, &[TensorId]) -> Result<TensorId>;
    let misuse: [(&str, &RawTensor, &RawTensor, Op); 11] = [
        ("reshape q4_1 to [8, 16]", &q, &q, |b, t| b.reshape(t[0], &[8, 16])),
        ("reshape count", &x, &x, |b, t| b.reshape(t[0], &[5])),
        ("permute q4_1", &q, &q, |b, t| b.permute(t[0], &[1, 0])),
        ("permute repeated axis", &x, &x, |b, t| b.permute(t[0], &[0, 0])),
        ("slice past the end", &x, &x, |b, t| b.slice(t[0], 1, 3, 2)),
        ("slice axis", &x, &x, |b, t| b.slice(t[0], 2, 0, 1)),
        ("slice q4_1", &q, &q, |b, t| b.slice(t[0], 0, 0, 1)),
        ("concat dtypes", &x, &h, |b, t| b.concat(t[0], t[1], 0)),
        ("concat shapes", &x, &q, |b, t| b.concat(t[0], t[0], 2)),
        ("concat q4_1", &q, &q, |b, t| b.concat(t[0], t[1], 0)),
        ("concat f16 [3, 4] with f16 [3, 4] on axis 1 is fine, on a 1-D view not", &h, &h, |b, t| {
            let flat = b.reshape(t[0], &[12])?;
            b.concat(flat, t[1], 0)
        }),
    ];
    for (what, xa, xb, f) in misuse {
        let what = format!("{what} on {}", b.describe());
        same_error_kind(&what, run_raw(b, &[xa, xb], f), run_raw(cpu, &[xa, xb], f));
    }
});

backend_test!(append_grows_in_place, |b, cpu, det| {
    let _ = det;
    for (k, dtype) in [DType::F32, DType::F16, DType::I32].into_iter().enumerate() {
        let what = format!("append {dtype} on {}", b.describe());
        let empty = RawTensor::new(dtype, vec![0, 3], vec![]).unwrap();
        let (cache, cache_cpu) = (b.upload_raw(&empty).unwrap(), cpu.upload_raw(&empty).unwrap());
        let mut want = empty.clone();
        let mut sizes = std::collections::BTreeSet::new();
        for i in 0..40u64 {
            let rows = rand_raw(1000 + 50 * k as u64 + i, dtype, &[1 + (i as usize % 3), 3], 100.0);
            let (r, rc) = (b.upload_raw(&rows).unwrap(), cpu.upload_raw(&rows).unwrap());
            b.append(cache, r).unwrap();
            cpu.append(cache_cpu, rc).unwrap();
            b.free(r).unwrap();
            cpu.free(rc).unwrap();
            want.shape[0] += rows.shape[0];
            want.bytes.extend_from_slice(&rows.bytes);
            sizes.insert(b.live_bytes());
            if i % 13 == 0 {
                assert_raw_eq(&what, &b.read_raw(cache).unwrap(), &want);
            }
        }
        assert_raw_eq(&what, &b.read_raw(cache).unwrap(), &want);
        assert_raw_eq(&what, &cpu.read_raw(cache_cpu).unwrap(), &want);
        if b.kind() == BackendKind::Wgpu {
            // Geometric growth: the storage was reallocated a handful of times, not 40.
            assert!(sizes.len() <= 8, "{what}: {} distinct sizes {sizes:?}", sizes.len());
        }
        // A reshape view taken before an append keeps its contents; appending a tensor to itself,
        // and appending nothing, work.
        let view = b.reshape(cache, &[want.shape[0] * 3]).unwrap();
        b.append(cache, cache).unwrap();
        let none = b.upload_raw(&empty).unwrap();
        b.append(cache, none).unwrap();
        assert_raw_eq(&what, &b.read_raw(view).unwrap(), &RawTensor { shape: vec![want.shape[0] * 3], ..want.clone() });
        let doubled =
            RawTensor { shape: vec![want.shape[0] * 2, 3], bytes: [want.bytes.clone(), want.bytes.clone()].concat(), ..want.clone() };
        assert_raw_eq(&what, &b.read_raw(cache).unwrap(), &doubled);
        for id in [cache, view, none] {
            b.free(id).unwrap();
        }
        cpu.free(cache_cpu).unwrap();
    }
    let x = rand_raw(1200, DType::F32, &[2, 3], 1.0);
    let h = rand_raw(1201, DType::F16, &[2, 3], 1.0);
    let y = rand_raw(1202, DType::F32, &[2, 4], 1.0);
    let q = rand_raw(1203, DType::Q8_0, &[1, 32], 1.0);
    let misuse: [(&str, &RawTensor, &RawTensor); 3] = [("dtypes", &x, &h), ("shapes", &x, &y), ("quantized", &q, &q)];
    for (what, c, r) in misuse {
        let what = format!("append {what} on {}", b.describe());
        let f = |b: &mut Backend| run_raw(b, &[c, r], |b, t| b.append(t[0], t[1]).map(|()| t[0]));
        same_error_kind(&what, f(b), f(cpu));
    }
});

backend_test!(rope_matches_reference, |b, cpu, det| {
    let cases: &[(&[usize], u32, f32)] = &[
        (&[1, 1, 2], 0, 10000.0),
        (&[5, 3, 8], 0, 10000.0),
        (&[2, 4, 3, 16], 17, 10000.0),
        (&[1, 2, 64], 1000, 500000.0),
        (&[0, 2, 4], 3, 10000.0),
    ];
    for (i, &(shape, pos0, theta)) in cases.iter().enumerate() {
        for mode in [RopeMode::Interleaved, RopeMode::Neox] {
            let x = rand_raw(1300 + i as u64, DType::F32, shape, 2.0);
            let what = format!("rope {shape:?} pos0 {pos0} {mode:?} on {}", b.describe());
            let got = run_raw(b, &[&x], |b, t| b.rope(t[0], pos0, theta, mode)).unwrap();
            let want = run_raw(cpu, &[&x], |b, t| b.rope(t[0], pos0, theta, mode)).unwrap();
            check_raw(&what, det, true, &got, &want, DEVICE_TOL);
            let r = shape.len();
            let (seq, heads, dim) = (shape[r - 3], shape[r - 2], shape[r - 1]);
            let table = rope_table(pos0, seq, dim, theta);
            let xv = values(&x);
            let mut reference = vec![0.0f64; xv.len()];
            for (row, chunk) in xv.chunks(dim).enumerate() {
                let t = (row / heads) % seq;
                for p in 0..dim / 2 {
                    let (i0, i1) = if mode == RopeMode::Interleaved { (2 * p, 2 * p + 1) } else { (p, p + dim / 2) };
                    let (c, s) = (table[(t * dim / 2 + p) * 2] as f64, table[(t * dim / 2 + p) * 2 + 1] as f64);
                    let (x0, x1) = (chunk[i0] as f64, chunk[i1] as f64);
                    reference[row * dim + i0] = x0 * c - x1 * s;
                    reference[row * dim + i1] = x0 * s + x1 * c;
                }
            }
            assert_close(&what, &values(&got), &reference, Tol { abs: 1e-6, rel: 1e-6 });
        }
    }
    let misuse: [(&str, RawTensor); 3] = [
        ("odd head_dim", rand_raw(1310, DType::F32, &[2, 3, 5], 1.0)),
        ("rank 2", rand_raw(1311, DType::F32, &[3, 4], 1.0)),
        ("f16 x", rand_raw(1312, DType::F16, &[2, 3, 4], 1.0)),
    ];
    for (what, x) in misuse {
        let what = format!("rope {what} on {}", b.describe());
        let f = |b: &mut Backend| run_raw(b, &[&x], |b, t| b.rope(t[0], 0, 10000.0, RopeMode::Neox));
        same_error_kind(&what, f(b), f(cpu));
    }
});

/// Causal attention in f64 with the error bound of each output: `q [.., tq, hq, d]`, `k`/`v [.., tk, hkv, d]`.
fn attention_f64(q: &HostTensor, k: &HostTensor, v: &HostTensor, pos0: usize, scale: f64) -> Vec<f64> {
    let r = q.shape.len();
    let (tq, hq, d) = (q.shape[r - 3], q.shape[r - 2], q.shape[r - 1]);
    let (tk, hkv) = (k.shape[r - 3], k.shape[r - 2]);
    let batch: usize = q.shape[..r - 3].iter().product();
    let mut out = vec![0.0f64; q.data.len()];
    for b in 0..batch {
        for i in 0..tq {
            for h in 0..hq {
                let g = h / (hq / hkv);
                let visible = (pos0 + i + 1).min(tk);
                let qrow = &q.data[((b * tq + i) * hq + h) * d..][..d];
                let kv =
                    |t: &HostTensor, j: usize| t.data[((b * tk + j) * hkv + g) * d..][..d].iter().map(|&x| x as f64).collect::<Vec<_>>();
                let s: Vec<f64> =
                    (0..visible).map(|j| kv(k, j).iter().zip(qrow).map(|(a, &b)| a * b as f64).sum::<f64>() * scale).collect();
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                let sum: f64 = e.iter().sum();
                let o = &mut out[((b * tq + i) * hq + h) * d..][..d];
                for (j, ej) in e.iter().enumerate() {
                    for (o, vv) in o.iter_mut().zip(kv(v, j)) {
                        *o += ej / sum * vv;
                    }
                }
            }
        }
    }
    out
}

backend_test!(attention_matches_reference, |b, cpu, det| {
    let cases: &[(&[usize], &[usize], u32)] = &[
        (&[1, 4, 8], &[5, 2, 8], 4),
        (&[6, 2, 16], &[6, 2, 16], 0),
        (&[3, 4, 8], &[10, 1, 8], 7),
        (&[2, 3, 4, 16], &[2, 5, 2, 16], 1),
        (&[4, 2, 8], &[2, 2, 8], 0),
        (&[2, 2, 8], &[0, 2, 8], 0),
        (&[0, 2, 8], &[3, 2, 8], 0),
        (&[1, 1, 1], &[1, 1, 1], 0),
        (&[7, 3, 5], &[40, 3, 5], 33),
    ];
    for (i, &(sq, sk, pos0)) in cases.iter().enumerate() {
        let q = rand_raw(1400 + i as u64, DType::F32, sq, 2.0);
        let k = rand_raw(1450 + i as u64, DType::F32, sk, 2.0);
        let v = rand_raw(1500 + i as u64, DType::F32, sk, 2.0);
        let scale = 1.0 / (sq[sq.len() - 1] as f32).sqrt();
        let what = format!("attention q {sq:?} kv {sk:?} pos0 {pos0} on {} ({det:?})", b.describe());
        let got = run_raw(b, &[&q, &k, &v], |b, t| b.attention(t[0], t[1], t[2], pos0, scale)).unwrap();
        let want = run_raw(cpu, &[&q, &k, &v], |b, t| b.attention(t[0], t[1], t[2], pos0, scale)).unwrap();
        check_raw(&what, det, true, &got, &want, DEVICE_TOL);
        let reference = attention_f64(&host(&q), &host(&k), &host(&v), pos0 as usize, scale as f64);
        assert_close(&what, &values(&got), &reference, Tol { abs: 2e-6, rel: 1e-5 });
    }
    let q = rand_raw(1600, DType::F32, &[2, 3, 8], 1.0);
    let k2 = rand_raw(1601, DType::F32, &[4, 2, 8], 1.0);
    let k1 = rand_raw(1602, DType::F32, &[4, 1, 8], 1.0);
    let k9 = rand_raw(1603, DType::F32, &[4, 1, 9], 1.0);
    let qi = RawTensor::from_i32(vec![2, 3, 8], &[0; 48]).unwrap();
    let misuse: [(&str, &RawTensor, &RawTensor, &RawTensor); 4] =
        [("heads", &q, &k2, &k2), ("k and v differ", &q, &k1, &k2), ("head_dim", &q, &k9, &k9), ("i32 q", &qi, &k1, &k1)];
    for (what, q, k, v) in misuse {
        let what = format!("attention {what} on {}", b.describe());
        let f = |b: &mut Backend| run_raw(b, &[q, k, v], |b, t| b.attention(t[0], t[1], t[2], 0, 0.5));
        same_error_kind(&what, f(b), f(cpu));
    }
});

backend_test!(nan_and_infinity_inputs_match_cpu, |b, cpu, det| {
    // NaN is skipped by max / argmax, propagates through sums and softmax; NaN tests in kernels must
    // not be folded away by the device compiler.
    let (nan, inf) = (f32::NAN, f32::INFINITY);
    let x = HostTensor::new(
        vec![5, 4],
        vec![
            nan, 1.0, 3.0, 2.0, //
            1.0, nan, -inf, 0.5, //
            nan, nan, nan, nan, //
            -inf, -inf, -2.0, -inf, //
            inf, 1.0, inf, 0.0,
        ],
    )
    .unwrap();
    for op in [ReduceOp::Sum, ReduceOp::Max, ReduceOp::Argmax, ReduceOp::Mean] {
        let what = format!("{} with NaN on {}", op.name(), b.describe());
        let got = run(b, &[&x], |b, t| b.reduce_last(op, t[0])).unwrap();
        let want = run(cpu, &[&x], |b, t| b.reduce_last(op, t[0])).unwrap();
        assert_close_f32(&what, &got, &want, BITWISE);
    }
    let what = format!("softmax with NaN on {}", b.describe());
    let got = run(b, &[&x], |b, t| b.softmax_last(t[0])).unwrap();
    let want = run(cpu, &[&x], |b, t| b.softmax_last(t[0])).unwrap();
    check_vs_cpu(&what, det, true, &got, &want, DEVICE_TOL);
    let argmax = b.upload(&x).and_then(|t| b.argmax_last(t)).unwrap();
    assert_eq!(b.dtype(argmax).unwrap(), DType::I32, "argmax_last gives i32 on {}", b.describe());
    assert_eq!(b.read_raw(argmax).unwrap(), RawTensor::from_i32(vec![5], &[2, 0, 0, 2, 0]).unwrap(), "argmax on {}", b.describe());
});

/// A small transformer-ish step touching every op family; returns the storage of its outputs.
/// `mid_read` reads an intermediate in the middle (which flushes an open batch).
fn script(b: &mut Backend, mid_read: bool) -> Result<Vec<RawTensor>> {
    let x = b.upload_raw(&rand_raw(1700, DType::F32, &[4, 64], 1.0))?;
    let w = b.upload_raw(&rand_raw(1701, DType::Q8_0, &[48, 64], 0.5))?;
    let wf = b.upload_raw(&rand_raw(1702, DType::F16, &[48, 48], 0.5))?;
    let norm_w = b.upload_raw(&rand_raw(1703, DType::F32, &[48], 1.0))?;
    let table = b.upload_raw(&rand_raw(1704, DType::Q4_1, &[48, 32], 1.0))?;
    let h = b.matmul(x, w, false, true)?;
    let h = b.gelu(h)?;
    let h = b.rmsnorm(h, norm_w, 1e-5)?;
    let h = b.matmul(h, wf, false, true)?;
    let mut mid = Vec::new();
    if mid_read {
        mid.push(b.read_raw(h)?);
    }
    let heads = b.reshape(h, &[4, 3, 16])?;
    let r = b.rope(heads, 2, 10000.0, RopeMode::Neox)?;
    let cache = b.upload_raw(&RawTensor::new(DType::F32, vec![0, 3, 16], vec![])?)?;
    b.append(cache, r)?;
    let att = b.attention(r, cache, cache, 0, 0.25)?;
    let flat = b.reshape(att, &[4, 48])?;
    let p = b.softmax_last(flat)?;
    let ids = b.argmax_last(p)?;
    let emb = b.gather_rows(table, ids)?;
    let emb16 = b.cast(emb, DType::F16)?;
    let t = b.permute(emb16, &[1, 0])?;
    let s = b.slice(t, 0, 3, 17)?;
    let c = b.concat(s, s, 1)?;
    let back = b.cast(c, DType::F32)?;
    let sum = b.sum_last(back)?;
    b.free(x)?;
    b.free(w)?;
    let mut out = mid;
    for id in [h, r, att, p, ids, emb, c, sum] {
        out.push(b.read_raw(id)?);
    }
    Ok(out)
}

#[test]
fn batched_results_equal_unbatched() {
    for det in [Determinism::Reproducible, Determinism::Fast] {
        for mut b in backends(det) {
            let what = format!("batch on {} ({det:?})", b.describe());
            let plain = script(&mut b, false).unwrap();
            // Everything up to the reads is one batch (the reads flush it); then a batch with a
            // read in the middle.
            b.begin_batch();
            let batched = script(&mut b, false).unwrap();
            b.end_batch().unwrap();
            b.begin_batch();
            let with_read = script(&mut b, true).unwrap();
            b.end_batch().unwrap();
            assert_eq!(plain.len(), batched.len());
            for (i, (p, q)) in plain.iter().zip(&batched).enumerate() {
                assert_raw_eq(&format!("{what}: output {i}"), q, p);
            }
            for (i, (p, q)) in plain.iter().zip(&with_read[1..]).enumerate() {
                assert_raw_eq(&format!("{what} with a read inside: output {i}"), q, p);
            }
        }
    }
}

#[test]
fn batch_submits_once_and_keeps_freed_buffers_until_submitted() {
    for det in [Determinism::Reproducible, Determinism::Fast] {
        for mut b in backends(det) {
            let what = format!("batch on {} ({det:?})", b.describe());
            let a = rand_tensor(1800, &[8, 16], 1.0);
            let c = rand_tensor(1801, &[8, 16], 1.0);
            let submissions = |b: &Backend| match b {
                Backend::Wgpu(w) => Some(w.submissions()),
                _ => None,
            };
            let before = submissions(&b);
            b.begin_batch();
            let x = b.upload(&a).unwrap();
            let y = b.scale(x, 2.0).unwrap();
            // The freed buffer must not take the next upload before the scale above has run.
            b.free(x).unwrap();
            let z = b.upload(&c).unwrap();
            let w = b.add(y, z).unwrap();
            // An error inside a batch is reported by its op and spoils nothing.
            assert!(matches!(b.matmul(y, z, false, false), Err(GpuError::ShapeMismatch { .. })), "{what}");
            let mut last = w;
            for _ in 0..100 {
                last = b.scale(last, 1.0).unwrap();
            }
            b.end_batch().unwrap();
            if let (Some(before), Some(after)) = (before, submissions(&b)) {
                assert_eq!(after - before, 1, "{what}: one submission for 103 ops");
            }
            let y = b.read(y).unwrap();
            let want: Vec<f64> = a.data.iter().map(|&v| (v * 2.0) as f64).collect();
            assert_close(&what, &y.data, &want, BITWISE);
            let got = b.read(last).unwrap();
            let want: Vec<f64> = a.data.iter().zip(&c.data).map(|(&p, &q)| (p * 2.0 + q) as f64).collect();
            assert_close(&what, &got.data, &want, BITWISE);
            // A batch that is never ended is flushed by a read; end_batch without begin is fine.
            b.begin_batch();
            let s = b.scale(last, 3.0).unwrap();
            assert_eq!(b.read(s).unwrap().shape, vec![8, 16]);
            b.end_batch().unwrap();
            b.end_batch().unwrap();
        }
    }
}

backend_test!(unknown_handles_and_misuse_match_cpu, |b, cpu, det| {
    let _ = det;
    let bogus = TensorId(987_654);
    // The same tensors on both backends.
    let inputs = [
        rand_raw(1900, DType::F32, &[3, 4], 1.0),
        rand_raw(1901, DType::F16, &[3, 4], 1.0),
        RawTensor::from_i32(vec![3], &[0, 1, 2]).unwrap(),
        rand_raw(1902, DType::Q8_0, &[2, 32], 1.0),
        rand_raw(1903, DType::F16, &[4], 1.0),
        rand_raw(1904, DType::F32, &[2, 3, 4], 1.0),
    ];
    let up = |b: &mut Backend| inputs.iter().map(|t| b.upload_raw(t).unwrap()).collect::<Vec<_>>();
    let (t, tc) = (up(b), up(cpu));
    type Op = fn(&mut Backend, &[TensorId], TensorId) -> Result<TensorId>;
    // [x f32 [3,4], h f16 [3,4], ids i32 [3], q q8_0 [2,32], w16 f16 [4], x3 f32 [2,3,4]], bogus
    let cases: &[(&str, Op)] = &[
        ("add f16", |b, t, _| b.add(t[1], t[0])),
        ("relu i32", |b, t, _| b.relu(t[2])),
        ("softmax q8_0", |b, t, _| b.softmax_last(t[3])),
        ("rmsnorm f16 weight", |b, t, _| b.rmsnorm(t[0], t[4], 1e-5)),
        ("sum i32", |b, t, _| b.sum_last(t[2])),
        ("argmax f16", |b, t, _| b.argmax_last(t[1])),
        ("matmul f16 a, unknown b", |b, t, u| b.matmul(t[1], u, false, false)),
        ("cast unknown", |b, _, u| b.cast(u, DType::F16)),
        ("reshape unknown", |b, _, u| b.reshape(u, &[1])),
        ("permute unknown", |b, _, u| b.permute(u, &[0])),
        ("slice unknown", |b, _, u| b.slice(u, 0, 0, 0)),
        ("concat unknown", |b, t, u| b.concat(t[0], u, 0)),
        ("concat unknown first, quantized second", |b, t, u| b.concat(u, t[3], 0)),
        ("append unknown cache", |b, t, u| b.append(u, t[0]).map(|()| t[0])),
        ("append unknown rows", |b, t, u| b.append(t[0], u).map(|()| t[0])),
        ("gather unknown ids", |b, t, u| b.gather_rows(t[0], u)),
        ("gather i32 table, unknown ids", |b, t, u| b.gather_rows(t[2], u)),
        ("rope unknown", |b, _, u| b.rope(u, 0, 10000.0, RopeMode::Neox)),
        ("attention unknown v", |b, t, u| b.attention(t[5], t[5], u, 0, 1.0)),
        ("attention rank 2", |b, t, _| b.attention(t[0], t[0], t[0], 0, 1.0)),
        ("attention f16 q, bad shapes", |b, t, _| b.attention(t[1], t[5], t[0], 0, 1.0)),
        ("gather out of range", |b, t, _| b.gather_rows(t[3], t[2])),
        ("rope f16", |b, t, _| b.rope(t[1], 0, 10000.0, RopeMode::Neox)),
        ("read_raw unknown", |b, _, u| b.read_raw(u).map(|_| u)),
        ("dtype unknown", |b, _, u| b.dtype(u).map(|_| u)),
    ];
    for &(what, f) in cases {
        let what = format!("{what} on {}", b.describe());
        same_error_kind(&what, f(b, &t, bogus), f(cpu, &tc, bogus));
    }
    // Still healthy after every error.
    let y = b.matmul(t[0], t[3], false, false).map_err(|e| e.to_string());
    assert!(y.is_err());
    let s = b.slice(t[1], 1, 1, 2).unwrap();
    let got = b.read_raw(s).unwrap();
    let sc = cpu.slice(tc[1], 1, 1, 2).unwrap();
    assert_raw_eq("slice after errors", &got, &cpu.read_raw(sc).unwrap());
});

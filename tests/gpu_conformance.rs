//! One conformance suite for the tensor layer: every op on every available backend (the CPU always;
//! wgpu when an adapter exists) against the CPU reference, and against an f64 reference where
//! precision matters (matmul, reductions, softmax, norms), in both determinism modes.
//!
//! Tolerances: ops classed `Exact`, and every op in `Reproducible` mode except the transcendental
//! elementwise ones (gelu, silu, tanh, exp), must match the CPU bitwise; `DeviceDependent` results
//! within `DEVICE_TOL` of the CPU; f64 references within `k * 4 * 2^-24` relative to the sum of
//! absolute terms (matmul, sums) or `F64_TOL` (softmax, norms).
//!
//! Without an adapter the wgpu cases print a loud skip; with `REQUIRE_WGPU=1` they fail instead.
//! Shapes stay small: lavapipe runs ~1-3 GFLOP/s and CI has 2 cores.

use ao_gpu_worker::gpu::{
    Backend, BackendKind, BinaryOp, Determinism, GpuError, HostTensor, ReduceOp, Result, TensorId, UnaryOp, cpu::CpuBackend, select,
    wgpu::WgpuBackend,
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
            assert_close_f32(&what, &got, &want, if exact { BITWISE } else { DEVICE_TOL });
        }
    }
    let _ = det;
});

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

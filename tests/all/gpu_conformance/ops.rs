//! The f32 ops on every backend against the CPU and f64 references: matmul, broadcasting binary
//! ops, unary ops, reductions, softmax and norms, NaN and infinity inputs, misuse, residency of
//! chained results, and backend selection.

use super::*;
use ao_gpu_worker::gpu::TensorOps;

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
        let (r, bound, k) = matmul_f64(&a.data, &a.shape, &bt.data, &bt.shape, ta, tb);
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

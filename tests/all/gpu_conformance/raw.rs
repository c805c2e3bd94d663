//! Raw storage: every dtype round trips, casts, matmul with f16 and quantized weights, gather,
//! the layout ops, append, rope and attention, compared as storage bytes.

use super::*;
use ao_gpu_worker::gpu::TensorOps;

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
        same_error(&what, run_raw(b, &[t], |b, ids| b.cast(ids[0], to)), run_raw(cpu, &[t], |b, ids| b.cast(ids[0], to)));
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
        let (r, bound, k) = matmul_f64(&values(&a), &a.shape, &values(&w), &w.shape, ta, tb);
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
        same_error(
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
            same_error(&what, go(b), go(cpu));
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
        same_error(
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

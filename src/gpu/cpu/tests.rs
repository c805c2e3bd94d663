//! Unit tests of the CPU backend: each op against an f64 reference or an index-level reference,
//! bitwise properties of reproducible mode, and the dtype and shape errors.

use super::matmul::*;
use super::*;
use crate::gpu::TensorOps;
use crate::gpu::shape::attention_dims;

const MODES: [Determinism; 2] = [Determinism::Reproducible, Determinism::Fast];

fn rand_vec(rng: &mut fastrand::Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| (rng.f32() * 2.0 - 1.0) * scale).collect()
}

fn up(b: &mut CpuBackend, shape: &[usize], data: Vec<f32>) -> TensorId {
    b.upload(&HostTensor::new(shape.to_vec(), data).unwrap()).unwrap()
}

/// Uploads `values` encoded as `dtype` (GGUF reference quantizer for the block types).
fn up_as(b: &mut CpuBackend, dtype: DType, shape: &[usize], values: &[f32]) -> TensorId {
    b.upload_raw(&RawTensor::new(dtype, shape.to_vec(), quant::quantize(dtype, values).unwrap()).unwrap()).unwrap()
}

fn up_i32(b: &mut CpuBackend, shape: &[usize], data: &[i32]) -> TensorId {
    b.upload_raw(&RawTensor::from_i32(shape.to_vec(), data).unwrap()).unwrap()
}

fn vals(b: &mut CpuBackend, id: TensorId) -> Vec<f32> {
    b.read(id).unwrap().data
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn is_dtype<T: std::fmt::Debug>(r: Result<T>) -> bool {
    matches!(r, Err(GpuError::DType { .. }))
}

fn is_shape<T: std::fmt::Debug>(r: Result<T>) -> bool {
    matches!(r, Err(GpuError::ShapeMismatch { .. }))
}

/// `|got - want| <= tol * bound + 1e-30` for each element, with index and values on failure.
fn assert_within(what: &str, got: &[f32], want: &[f64], bound: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, ((&g, &w), &b)) in got.iter().zip(want).zip(bound).enumerate() {
        let diff = (g as f64 - w).abs();
        assert!(diff <= tol * b + 1e-30, "{what}[{i}]: got {g}, want {w}, diff {diff}, allowed {}", tol * b);
    }
}

/// f64 `a @ b` (a [m, k] or transposed, b [k, n] or transposed) and the sums of |terms|.
#[allow(clippy::too_many_arguments)]
fn matmul_f64(m: usize, n: usize, k: usize, a: &[f32], b: &[f32], ta: bool, tb: bool) -> (Vec<f64>, Vec<f64>) {
    let mut out = vec![0.0; m * n];
    let mut abs = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            for p in 0..k {
                let av = if ta { a[p * m + i] } else { a[i * k + p] } as f64;
                let bv = if tb { b[j * k + p] } else { b[p * n + j] } as f64;
                out[i * n + j] += av * bv;
                abs[i * n + j] += (av * bv).abs();
            }
        }
    }
    (out, abs)
}

#[test]
fn f32_matmul_matches_f64_in_both_modes() {
    let mut rng = fastrand::Rng::with_seed(1);
    for det in MODES {
        for &(m, n, k) in &[(1, 1, 1), (3, 5, 7), (7, 300, 65), (1, 513, 200), (17, 33, 65), (64, 48, 130), (2, 3, 0), (0, 4, 3), (4, 0, 3)]
        {
            for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
                let mut b = CpuBackend::new(det);
                let (av, bv) = (rand_vec(&mut rng, m * k, 1.0), rand_vec(&mut rng, k * n, 1.0));
                let a = up(&mut b, &if ta { [k, m] } else { [m, k] }, av.clone());
                let w = up(&mut b, &if tb { [n, k] } else { [k, n] }, bv.clone());
                let c = b.matmul(a, w, ta, tb).unwrap();
                assert_eq!(b.shape(c).unwrap(), vec![m, n]);
                let (want, abs) = matmul_f64(m, n, k, &av, &bv, ta, tb);
                assert_within(&format!("{det:?} {m}x{n}x{k} {ta} {tb}"), &vals(&mut b, c), &want, &abs, (k + 1) as f64 * 2f64.powi(-24));
            }
        }
    }
}

/// Reproducible f32 matmul is one sequential `acc = acc + a * b` per output, whatever the tiling
/// and threading: compared bitwise with that loop written out, on shapes around the tile sizes.
#[test]
fn reproducible_f32_matmul_is_bitwise_the_sequential_loop() {
    let mut rng = fastrand::Rng::with_seed(14);
    for &(m, n, k) in &[(1, 1, 1), (1, 9, 300), (5, 7, 3), (4, 8, 64), (67, 17, 40), (130, 30, 33), (3, 2, 0)] {
        for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
            let mut b = CpuBackend::new(Determinism::Reproducible);
            let (av, bv) = (rand_vec(&mut rng, m * k, 1.0), rand_vec(&mut rng, k * n, 1.0));
            let a = up(&mut b, &if ta { [k, m] } else { [m, k] }, av.clone());
            let w = up(&mut b, &if tb { [n, k] } else { [k, n] }, bv.clone());
            let got = {
                let id = b.matmul(a, w, ta, tb).unwrap();
                vals(&mut b, id)
            };
            let mut want = vec![0.0f32; m * n];
            for i in 0..m {
                for j in 0..n {
                    let mut acc = 0.0f32;
                    for p in 0..k {
                        let x = if ta { av[p * m + i] } else { av[i * k + p] };
                        let y = if tb { bv[j * k + p] } else { bv[p * n + j] };
                        acc = acc + x * y;
                    }
                    want[i * n + j] = acc;
                }
            }
            assert_eq!(bits(&got), bits(&want), "{m}x{n}x{k} {ta} {tb}");
        }
    }
}

#[test]
fn batched_matmul_broadcasts_a_2d_operand() {
    let mut rng = fastrand::Rng::with_seed(2);
    for det in MODES {
        let mut b = CpuBackend::new(det);
        let (av, bv) = (rand_vec(&mut rng, 3 * 4 * 5, 1.0), rand_vec(&mut rng, 5 * 6, 1.0));
        let a = up(&mut b, &[3, 4, 5], av.clone());
        let w = up(&mut b, &[5, 6], bv.clone());
        let c = b.matmul(a, w, false, false).unwrap();
        assert_eq!(b.shape(c).unwrap(), vec![3, 4, 6]);
        let got = vals(&mut b, c);
        for bi in 0..3 {
            let (want, abs) = matmul_f64(4, 6, 5, &av[bi * 20..(bi + 1) * 20], &bv, false, false);
            assert_within("batched", &got[bi * 24..(bi + 1) * 24], &want, &abs, 6.0 * 2f64.powi(-24));
        }
    }
}

/// The reproducible definition written out independently: dequantize the whole matrix, then one
/// sequential `acc = acc + a * w` per output.
fn ordered_on_dequantized(m: usize, n: usize, k: usize, a: &[f32], w: &[f32]) -> Vec<f32> {
    let mut out = vec![0.0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            let mut acc = 0.0f32;
            for p in 0..k {
                acc = acc + a[i * k + p] * w[j * k + p];
            }
            out[i * n + j] = acc;
        }
    }
    out
}

const WEIGHT_TYPES: [DType; 4] = [DType::F16, DType::Q8_0, DType::Q4_0, DType::Q4_1];

#[test]
fn reproducible_weight_matmul_is_bitwise_ordered_matmul_on_dequantized_weights() {
    let mut rng = fastrand::Rng::with_seed(3);
    for dtype in WEIGHT_TYPES {
        for &(m, n, k) in &[(1, 1, 32), (1, 37, 64), (3, 20, 96), (16, 9, 32), (40, 70, 160), (70, 9, 64)] {
            let mut b = CpuBackend::new(Determinism::Reproducible);
            let (av, wv) = (rand_vec(&mut rng, m * k, 1.0), rand_vec(&mut rng, n * k, 2.0));
            let deq = quant::dequantize(dtype, &quant::quantize(dtype, &wv).unwrap(), n * k).unwrap();
            let a = up(&mut b, &[m, k], av.clone());
            let w = up_as(&mut b, dtype, &[n, k], &wv);
            let got = {
                let id = b.matmul(a, w, false, true).unwrap();
                vals(&mut b, id)
            };
            assert_eq!(bits(&got), bits(&ordered_on_dequantized(m, n, k, &av, &deq)), "{dtype} {m}x{n}x{k}");
            // transpose_a reads the same rows.
            let at: Vec<f32> = (0..m * k).map(|x| av[(x % m) * k + x / m]).collect();
            let a_t = up(&mut b, &[k, m], at);
            let got_t = {
                let id = b.matmul(a_t, w, true, true).unwrap();
                vals(&mut b, id)
            };
            assert_eq!(bits(&got_t), bits(&got), "{dtype} transpose_a");
            // And the same as the f32 path on the cast weights.
            let wf = b.cast(w, DType::F32).unwrap();
            assert_eq!(
                bits(&{
                    let id = b.matmul(a, wf, false, true).unwrap();
                    vals(&mut b, id)
                }),
                bits(&got),
                "{dtype} via cast"
            );
        }
    }
}

#[test]
fn batched_weight_matmul() {
    let mut rng = fastrand::Rng::with_seed(4);
    for det in MODES {
        let mut b = CpuBackend::new(det);
        let (m, n, k) = (5, 6, 64);
        let (av, wv) = (rand_vec(&mut rng, 2 * m * k, 1.0), rand_vec(&mut rng, 2 * n * k, 1.0));
        let deq = quant::dequantize(DType::Q8_0, &quant::quantize(DType::Q8_0, &wv).unwrap(), 2 * n * k).unwrap();
        let a = up(&mut b, &[2, m, k], av.clone());
        let w = up_as(&mut b, DType::Q8_0, &[2, n, k], &wv);
        let w2 = up_as(&mut b, DType::Q8_0, &[n, k], &wv[..n * k]);
        let got = {
            let id = b.matmul(a, w, false, true).unwrap();
            vals(&mut b, id)
        };
        let shared = {
            let id = b.matmul(a, w2, false, true).unwrap();
            vals(&mut b, id)
        };
        for bi in 0..2 {
            let (want, abs) = matmul_f64(m, n, k, &av[bi * m * k..][..m * k], &deq[bi * n * k..][..n * k], false, true);
            let tol = (k + 8) as f64 * 2f64.powi(-23);
            assert_within(&format!("{det:?} batch {bi}"), &got[bi * m * n..][..m * n], &want, &abs, tol);
            let (want, abs) = matmul_f64(m, n, k, &av[bi * m * k..][..m * k], &deq[..n * k], false, true);
            assert_within(&format!("{det:?} shared {bi}"), &shared[bi * m * n..][..m * n], &want, &abs, tol);
        }
    }
}

/// Fast mode (SIMD row dots below `GEMM_MIN_ROWS` rows, dequantized tiles + matrixmultiply from
/// there on) against reproducible mode and f64, on seeded random shapes. Tolerance: each result
/// within `(k + 8) * 2^-23` of the f64 dot relative to `sum |a_p * w_p|` (a bound for any
/// summation order, with or without FMA), so fast and reproducible differ by at most twice that.
#[test]
fn fast_weight_matmul_agrees_with_reproducible_within_tolerance() {
    let mut rng = fastrand::Rng::with_seed(5);
    for case in 0..40 {
        let dtype = WEIGHT_TYPES[case % 4];
        let m = [1, 2, WEIGHT_TILE_MIN_ROWS - 1, WEIGHT_TILE_MIN_ROWS, 33, GEMM_MIN_ROWS - 1, GEMM_MIN_ROWS, 70][rng.usize(0..8)];
        let (n, k) = (rng.usize(1..80), 32 * rng.usize(1..12));
        let (av, wv) = (rand_vec(&mut rng, m * k, 3.0), rand_vec(&mut rng, n * k, 1.0));
        let deq = quant::dequantize(dtype, &quant::quantize(dtype, &wv).unwrap(), n * k).unwrap();
        let (want, abs) = matmul_f64(m, n, k, &av, &deq, false, true);
        let run = |det| {
            let mut b = CpuBackend::new(det);
            let a = up(&mut b, &[m, k], av.clone());
            let w = up_as(&mut b, dtype, &[n, k], &wv);
            {
                let id = b.matmul(a, w, false, true).unwrap();
                vals(&mut b, id)
            }
        };
        let (fast, repro) = (run(Determinism::Fast), run(Determinism::Reproducible));
        let tol = (k + 8) as f64 * 2f64.powi(-23);
        let what = format!("{dtype} {m}x{n}x{k}");
        assert_within(&format!("fast {what}"), &fast, &want, &abs, tol);
        assert_within(&format!("repro {what}"), &repro, &want, &abs, tol);
        let repro64: Vec<f64> = repro.iter().map(|&x| x as f64).collect();
        assert_within(&format!("fast vs repro {what}"), &fast, &repro64, &abs, 2.0 * tol);
    }
}

#[test]
fn f16_weights_work_with_either_transpose() {
    let mut rng = fastrand::Rng::with_seed(6);
    for det in MODES {
        let mut b = CpuBackend::new(det);
        let (m, n, k) = (3, 5, 11);
        let (av, wv) = (rand_vec(&mut rng, m * k, 1.0), rand_vec(&mut rng, k * n, 1.0));
        let deq: Vec<f32> = wv.iter().map(|&x| quant::f16_value(quant::f16_bits(x))).collect();
        let a = up(&mut b, &[m, k], av.clone());
        let w = up_as(&mut b, DType::F16, &[k, n], &wv);
        let (want, abs) = matmul_f64(m, n, k, &av, &deq, false, false);
        assert_within(
            &format!("{det:?} f16 [k, n]"),
            &{
                let id = b.matmul(a, w, false, false).unwrap();
                vals(&mut b, id)
            },
            &want,
            &abs,
            1e-6,
        );
        let w = up_as(&mut b, DType::F16, &[n, k], &wv);
        let (want, abs) = matmul_f64(m, n, k, &av, &deq, false, true);
        assert_within(
            &format!("{det:?} f16 [n, k]"),
            &{
                let id = b.matmul(a, w, false, true).unwrap();
                vals(&mut b, id)
            },
            &want,
            &abs,
            1e-6,
        );
    }
}

#[test]
fn matmul_dtype_errors() {
    let mut b = CpuBackend::new(Determinism::Fast);
    let f = up(&mut b, &[2, 32], vec![0.5; 64]);
    let q = up_as(&mut b, DType::Q4_0, &[3, 32], &[1.0; 96]);
    let h = up_as(&mut b, DType::F16, &[2, 32], &[1.0; 64]);
    let i = up_i32(&mut b, &[32, 2], &[1; 64]);
    assert!(is_dtype(b.matmul(q, q, false, true)), "quantized a");
    assert!(is_dtype(b.matmul(h, f, false, true)), "f16 a");
    assert!(is_dtype(b.matmul(f, i, false, false)), "i32 b");
    assert!(is_dtype(b.matmul(f, q, false, false)), "quantized b must be transposed");
    let q64 = up_as(&mut b, DType::Q8_0, &[3, 64], &[1.0; 192]);
    assert!(is_shape(b.matmul(f, q64, false, true)), "k differs");
    let c = b.matmul(f, q, false, true).unwrap();
    assert_eq!(b.shape(c).unwrap(), vec![2, 3]);
    assert_eq!(b.matmul(TensorId(999), q, false, true), Err(GpuError::UnknownTensor(TensorId(999))));
    // Zero-sized products are fine with weights too.
    let e = up(&mut b, &[0, 32], vec![]);
    let c = b.matmul(e, q, false, true).unwrap();
    assert_eq!((b.shape(c).unwrap(), vals(&mut b, c)), (vec![0, 3], vec![]));
}

#[test]
fn argmax_is_i32_and_reads_as_values() {
    let mut b = CpuBackend::new(Determinism::Reproducible);
    let x = up(&mut b, &[3, 4], vec![1.0, 5.0, 5.0, 2.0, f32::NAN, -1.0, -0.5, -3.0, 0.0, 0.0, 0.0, 0.0]);
    let a = b.reduce_last(ReduceOp::Argmax, x).unwrap();
    assert_eq!(b.dtype(a).unwrap(), DType::I32);
    assert_eq!(b.shape(a).unwrap(), vec![3]);
    assert_eq!(vals(&mut b, a), vec![1.0, 2.0, 0.0]);
    assert_eq!(b.read_raw(a).unwrap(), RawTensor::from_i32(vec![3], &[1, 2, 0]).unwrap());
    // Argmax feeds gather_rows directly.
    let table = up(&mut b, &[3, 2], vec![0.0, 1.0, 10.0, 11.0, 20.0, 21.0]);
    assert_eq!(
        {
            let id = b.gather_rows(table, a).unwrap();
            vals(&mut b, id)
        },
        vec![10.0, 11.0, 20.0, 21.0, 0.0, 1.0]
    );
    let s = b.reduce_last(ReduceOp::Sum, x).unwrap();
    assert_eq!(b.dtype(s).unwrap(), DType::F32);
}

#[test]
fn arithmetic_ops_take_f32_only() {
    let mut b = CpuBackend::new(Determinism::Reproducible);
    let f = up(&mut b, &[1, 32], vec![1.0; 32]);
    let h = up_as(&mut b, DType::F16, &[1, 32], &[1.0; 32]);
    let i = up_i32(&mut b, &[1, 32], &[1; 32]);
    let q = up_as(&mut b, DType::Q8_0, &[1, 32], &[1.0; 32]);
    let w = up(&mut b, &[32], vec![1.0; 32]);
    let hw = up_as(&mut b, DType::F16, &[32], &[1.0; 32]);
    for x in [h, i, q] {
        assert!(is_dtype(b.binary(BinaryOp::Add, x, f)));
        assert!(is_dtype(b.binary(BinaryOp::Mul, f, x)));
        assert!(is_dtype(b.unary(UnaryOp::Relu, x)));
        assert!(is_dtype(b.softmax_last(x)));
        assert!(is_dtype(b.rmsnorm(x, w, 1e-5)));
        assert!(is_dtype(b.layernorm(x, w, w, 1e-5)));
        assert!(is_dtype(b.reduce_last(ReduceOp::Sum, x)));
        assert!(is_dtype(b.reduce_last(ReduceOp::Argmax, x)));
    }
    assert!(is_dtype(b.rmsnorm(f, hw, 1e-5)));
    assert!(is_dtype(b.layernorm(f, w, hw, 1e-5)));
    let r = up(&mut b, &[1, 2, 16], vec![1.0; 32]);
    let rh = b.cast(r, DType::F16).unwrap();
    assert!(is_dtype(b.rope(rh, 0, 10000.0, RopeMode::Neox)));
    let ri = b.cast(r, DType::I32).unwrap();
    assert!(is_dtype(b.attention(r, ri, r, 0, 1.0)));
    assert!(is_dtype(b.attention(rh, r, r, 0, 1.0)));
    assert!(is_dtype(b.attention(r, r, rh, 0, 1.0)));
    assert!(b.attention(r, r, r, 0, 1.0).is_ok());
}

#[test]
fn raw_round_trips_and_live_bytes() {
    let mut rng = fastrand::Rng::with_seed(7);
    let mut b = CpuBackend::new(Determinism::Fast);
    assert_eq!(b.live_bytes(), 0);
    let mut ids = Vec::new();
    let mut total = 0;
    for dtype in DType::ALL {
        let v = rand_vec(&mut rng, 2 * 64, 100.0);
        let bytes = quant::quantize(dtype, &v).unwrap();
        let raw = RawTensor::new(dtype, vec![2, 64], bytes.clone()).unwrap();
        let id = b.upload_raw(&raw).unwrap();
        assert_eq!(b.dtype(id).unwrap(), dtype);
        assert_eq!(b.read_raw(id).unwrap(), raw, "{dtype}");
        assert_eq!(vals(&mut b, id), quant::dequantize(dtype, &bytes, 128).unwrap(), "{dtype}");
        total += bytes.len() as u64;
        assert_eq!(b.live_bytes(), total);
        ids.push(id);
    }
    // The public fields are re-checked.
    let bad = RawTensor { dtype: DType::Q4_0, shape: vec![2, 32], bytes: vec![0; 35] };
    assert!(is_shape(b.upload_raw(&bad)));
    let bad = RawTensor { dtype: DType::Q4_0, shape: vec![33], bytes: vec![0; 18] };
    assert!(is_dtype(b.upload_raw(&bad)));
    for id in ids {
        b.free(id).unwrap();
    }
    assert_eq!(b.live_bytes(), 0);
    assert_eq!(b.read_raw(TensorId(1)), Err(GpuError::UnknownTensor(TensorId(1))));
}

#[test]
fn casts() {
    let mut b = CpuBackend::new(Determinism::Reproducible);
    let v = vec![1.5f32, -2.5, 70000.0, -1e10, f32::NAN, 0.1, 1.0 + 2f32.powi(-11), 3.7];
    let x = up(&mut b, &[2, 4], v.clone());
    let h = b.cast(x, DType::F16).unwrap();
    assert_eq!(b.dtype(h).unwrap(), DType::F16);
    let hv = vals(&mut b, h);
    assert_eq!(&hv[..4], &[1.5, -2.5, f32::INFINITY, f32::NEG_INFINITY]);
    assert!(hv[4].is_nan());
    assert_eq!((hv[5], hv[6]), (f32::from_bits(0x3dcc_c000), 1.0), "0.1 -> 0x2e66; the tie rounds to even");
    let i = b.cast(x, DType::I32).unwrap();
    assert_eq!(b.read_raw(i).unwrap().bytes, quant::quantize(DType::I32, &v).unwrap());
    assert_eq!(vals(&mut b, i), vec![1.0, -2.0, 70000.0, i32::MIN as f32, 0.0, 0.0, 1.0, 3.0]);
    assert_eq!(
        {
            let id = b.cast(i, DType::F32).unwrap();
            vals(&mut b, id)
        },
        vals(&mut b, i)
    );
    assert_eq!(
        bits(&{
            let id = b.cast(h, DType::F32).unwrap();
            vals(&mut b, id)
        }),
        bits(&hv)
    );
    // The identity keeps dtype and bytes.
    for id in [x, h, i] {
        let same = b.cast(id, b.dtype(id).unwrap()).unwrap();
        assert_eq!(b.read_raw(same).unwrap(), b.read_raw(id).unwrap());
    }
    // f32 -> quantized is the reference quantizer; quantized -> f32 dequantizes.
    let mut rng = fastrand::Rng::with_seed(8);
    let w = rand_vec(&mut rng, 3 * 64, 2.0);
    let wx = up(&mut b, &[3, 64], w.clone());
    for dtype in [DType::Q8_0, DType::Q4_0, DType::Q4_1] {
        let q = b.cast(wx, dtype).unwrap();
        let bytes = quant::quantize(dtype, &w).unwrap();
        assert_eq!(b.read_raw(q).unwrap().bytes, bytes);
        assert_eq!(
            {
                let id = b.cast(q, DType::F32).unwrap();
                vals(&mut b, id)
            },
            quant::dequantize(dtype, &bytes, w.len()).unwrap()
        );
        // Only through f32.
        assert!(is_dtype(b.cast(q, DType::F16)));
        assert!(is_dtype(b.cast(q, DType::I32)));
        let other = if dtype == DType::Q8_0 { DType::Q4_0 } else { DType::Q8_0 };
        assert!(is_dtype(b.cast(q, other)));
    }
    assert!(is_dtype(b.cast(h, DType::I32)));
    assert!(is_dtype(b.cast(i, DType::F16)));
    assert!(is_dtype(b.cast(h, DType::Q8_0)));
    // A last axis that is not a multiple of 32 cannot be quantized.
    assert!(is_dtype(b.cast(x, DType::Q4_1)));
}

#[test]
fn reshape_any_dtype() {
    let mut b = CpuBackend::new(Determinism::Reproducible);
    let v: Vec<f32> = (0..128).map(|x| x as f32 / 8.0).collect();
    for dtype in DType::ALL {
        let x = up_as(&mut b, dtype, &[2, 64], &v);
        let r = b.reshape(x, &[4, 1, 32]).unwrap();
        assert_eq!((b.shape(r).unwrap(), b.dtype(r).unwrap()), (vec![4, 1, 32], dtype));
        assert_eq!(b.read_raw(r).unwrap().bytes, b.read_raw(x).unwrap().bytes);
        assert!(is_shape(b.reshape(x, &[3, 64])), "{dtype}");
        assert!(is_shape(b.reshape(x, &[1, 1, 1, 2, 64])), "{dtype}: rank 5");
        let odd = b.reshape(x, &[8, 16]);
        assert_eq!(is_dtype(odd.clone()), dtype.is_quantized(), "{dtype}: {odd:?}");
    }
}

/// Independent permute reference: walk the input and place each element.
fn permute_ref(x: &[f32], shape: &[usize], axes: &[usize]) -> Vec<f32> {
    let out_shape: Vec<usize> = axes.iter().map(|&a| shape[a]).collect();
    let mut out = vec![0.0; x.len()];
    for (flat, &v) in x.iter().enumerate() {
        let mut idx = vec![0; shape.len()];
        let mut r = flat;
        for d in (0..shape.len()).rev() {
            idx[d] = r % shape[d];
            r /= shape[d];
        }
        let mut o = 0;
        for (i, &a) in axes.iter().enumerate() {
            o = o * out_shape[i] + idx[a];
        }
        out[o] = v;
    }
    out
}

#[test]
fn permute_matches_index_reference() {
    let mut b = CpuBackend::new(Determinism::Reproducible);
    let cases: &[(&[usize], &[usize])] =
        &[(&[2, 3], &[1, 0]), (&[2, 3, 4], &[2, 0, 1]), (&[2, 3, 4, 5], &[3, 1, 0, 2]), (&[7], &[0]), (&[3, 0, 2], &[2, 1, 0])];
    for &(shape, axes) in cases {
        let n = numel(shape);
        let v: Vec<f32> = (0..n).map(|x| x as f32).collect();
        let want = permute_ref(&v, shape, axes);
        let want_shape: Vec<usize> = axes.iter().map(|&a| shape[a]).collect();
        for dtype in [DType::F32, DType::F16, DType::I32] {
            let x = up_as(&mut b, dtype, shape, &v);
            let p = b.permute(x, axes).unwrap();
            assert_eq!((b.shape(p).unwrap(), b.dtype(p).unwrap()), (want_shape.clone(), dtype));
            assert_eq!(vals(&mut b, p), want, "{dtype} {shape:?} {axes:?}");
        }
    }
    let x = up(&mut b, &[2, 3], vec![0.0; 6]);
    assert!(is_shape(b.permute(x, &[0, 0])));
    assert!(is_shape(b.permute(x, &[0, 1, 2])));
    assert!(is_shape(b.permute(x, &[2, 0])));
    let q = up_as(&mut b, DType::Q8_0, &[2, 32], &[0.0; 64]);
    assert!(is_dtype(b.permute(q, &[1, 0])));
}

#[test]
fn slice_concat_and_their_errors() {
    let mut b = CpuBackend::new(Determinism::Reproducible);
    let v: Vec<f32> = (0..24).map(|x| x as f32).collect();
    for dtype in [DType::F32, DType::F16, DType::I32] {
        let x = up_as(&mut b, dtype, &[2, 3, 4], &v);
        let s = b.slice(x, 1, 1, 2).unwrap();
        assert_eq!(b.shape(s).unwrap(), vec![2, 2, 4]);
        let want: Vec<f32> = [4..12, 16..24].into_iter().flatten().map(|x| x as f32).collect();
        assert_eq!(vals(&mut b, s), want, "{dtype}");
        let s2 = b.slice(x, 2, 3, 1).unwrap();
        assert_eq!(vals(&mut b, s2), vec![3.0, 7.0, 11.0, 15.0, 19.0, 23.0]);
        let empty = b.slice(x, 0, 2, 0).unwrap();
        assert_eq!((b.shape(empty).unwrap(), vals(&mut b, empty)), (vec![0, 3, 4], vec![]));
        // concat(slice(..1), slice(1..)) along each axis gives x back.
        for axis in 0..3 {
            let len = [2, 3, 4][axis];
            let (lo, hi) = (b.slice(x, axis, 0, 1).unwrap(), b.slice(x, axis, 1, len - 1).unwrap());
            let c = b.concat(lo, hi, axis).unwrap();
            assert_eq!((b.shape(c).unwrap(), b.dtype(c).unwrap()), (vec![2, 3, 4], dtype));
            assert_eq!(vals(&mut b, c), v, "{dtype} axis {axis}");
            let c0 = b.concat(empty, x, 0).unwrap();
            assert_eq!(vals(&mut b, c0), v);
        }
        assert!(is_shape(b.slice(x, 3, 0, 1)));
        assert!(is_shape(b.slice(x, 1, 2, 2)));
        assert!(is_shape(b.slice(x, 1, usize::MAX, 2)));
        assert!(is_shape(b.concat(x, s, 2)));
        assert!(is_shape(b.concat(x, x, 3)));
    }
    let f = up(&mut b, &[2, 32], vec![0.0; 64]);
    let h = up_as(&mut b, DType::F16, &[2, 32], &[0.0; 64]);
    let q = up_as(&mut b, DType::Q4_1, &[2, 32], &[0.0; 64]);
    assert!(is_dtype(b.concat(f, h, 0)));
    assert!(is_dtype(b.concat(q, q, 0)));
    assert!(is_dtype(b.slice(q, 0, 0, 1)));
}

#[test]
fn append_grows_in_place_with_amortized_copies() {
    for dtype in [DType::F32, DType::F16, DType::I32] {
        let mut b = CpuBackend::new(Determinism::Reproducible);
        let cache = up_as(&mut b, dtype, &[0, 2, 3], &[]);
        let mut want = Vec::new();
        let mut capacities = Vec::new();
        for t in 0..1000 {
            let row: Vec<f32> = (0..6).map(|x| (t * 6 + x) as f32 % 1000.0).collect();
            let r = up_as(&mut b, dtype, &[1, 2, 3], &row);
            b.append(cache, r).unwrap();
            b.free(r).unwrap();
            want.extend(row);
            let cap = match &*b.tensors[&cache].data {
                Data::F32(v) => v.capacity(),
                Data::I32(v) => v.capacity(),
                Data::Bytes(v) => v.capacity(),
            };
            if capacities.last() != Some(&cap) {
                capacities.push(cap);
            }
        }
        assert_eq!(b.shape(cache).unwrap(), vec![1000, 2, 3]);
        assert_eq!(vals(&mut b, cache), want, "{dtype}");
        // Geometric growth: a handful of reallocations for 1000 appends, not one per append.
        assert!(capacities.len() <= 16, "{dtype}: {} reallocations", capacities.len());
        // Appending a tensor to itself doubles it.
        let small = up_as(&mut b, dtype, &[2, 1], &[1.0, 2.0]);
        b.append(small, small).unwrap();
        assert_eq!(vals(&mut b, small), vec![1.0, 2.0, 1.0, 2.0]);
    }
    // A reshape shares storage; appending to the cache copies first and leaves the reshape alone.
    let mut b = CpuBackend::new(Determinism::Reproducible);
    let cache = up(&mut b, &[2, 2], vec![1.0, 2.0, 3.0, 4.0]);
    let view = b.reshape(cache, &[4]).unwrap();
    let row = up(&mut b, &[1, 2], vec![5.0, 6.0]);
    b.append(cache, row).unwrap();
    assert_eq!(vals(&mut b, view), vec![1.0, 2.0, 3.0, 4.0]);
    assert_eq!(vals(&mut b, cache), vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    // Errors leave the cache unchanged.
    let wide = up(&mut b, &[1, 3], vec![0.0; 3]);
    assert!(is_shape(b.append(cache, wide)));
    let ri = up_i32(&mut b, &[1, 2], &[0, 0]);
    assert!(is_dtype(b.append(cache, ri)));
    let q = up_as(&mut b, DType::Q8_0, &[1, 32], &[0.0; 32]);
    assert!(is_dtype(b.append(q, q)));
    assert_eq!(b.append(cache, TensorId(999)), Err(GpuError::UnknownTensor(TensorId(999))));
    assert_eq!(b.shape(cache).unwrap(), vec![3, 2]);
}

#[test]
fn gather_rows_every_table_type() {
    let mut rng = fastrand::Rng::with_seed(9);
    let (v, d) = (10, 64);
    let table = rand_vec(&mut rng, v * d, 2.0);
    let ids = [3i32, 0, 9, 3, 7, 1];
    for dtype in [DType::F32, DType::F16, DType::Q8_0, DType::Q4_0, DType::Q4_1] {
        let mut b = CpuBackend::new(Determinism::Reproducible);
        let t = up_as(&mut b, dtype, &[v, d], &table);
        let deq = quant::dequantize(dtype, &quant::quantize(dtype, &table).unwrap(), v * d).unwrap();
        let i = up_i32(&mut b, &[2, 3], &ids);
        let g = b.gather_rows(t, i).unwrap();
        assert_eq!((b.shape(g).unwrap(), b.dtype(g).unwrap()), (vec![2, 3, d], DType::F32));
        let want: Vec<f32> = ids.iter().flat_map(|&r| deq[r as usize * d..(r as usize + 1) * d].to_vec()).collect();
        assert_eq!(bits(&vals(&mut b, g)), bits(&want), "{dtype}");
        let none = up_i32(&mut b, &[0], &[]);
        let g = b.gather_rows(t, none).unwrap();
        assert_eq!((b.shape(g).unwrap(), vals(&mut b, g)), (vec![0, d], vec![]));
        for bad in [-1, 10, i32::MIN] {
            let i = up_i32(&mut b, &[3], &[0, bad, 1]);
            match b.gather_rows(t, i) {
                Err(GpuError::ShapeMismatch { details, .. }) => assert!(details.contains(&format!("id {bad} ")), "{details}"),
                other => panic!("{dtype} id {bad}: {other:?}"),
            }
        }
    }
    let mut b = CpuBackend::new(Determinism::Reproducible);
    let t = up(&mut b, &[2, 3], vec![0.0; 6]);
    let fi = up(&mut b, &[1], vec![0.0]);
    assert!(is_dtype(b.gather_rows(t, fi)));
    let ti = up_i32(&mut b, &[2, 3], &[0; 6]);
    let i = up_i32(&mut b, &[1], &[0]);
    assert!(is_dtype(b.gather_rows(ti, i)));
    let t3 = up(&mut b, &[1, 2, 3], vec![0.0; 6]);
    assert!(is_shape(b.gather_rows(t3, i)));
    let i4 = up_i32(&mut b, &[1, 1, 1, 1], &[0]);
    assert!(is_shape(b.gather_rows(t, i4)));
}

/// f64 rotary reference: angle `pos * theta^(-2i/d)` computed in f64.
fn rope_f64(x: &[f32], seq: usize, heads: usize, dim: usize, pos0: u32, theta: f32, mode: RopeMode) -> Vec<f64> {
    let mut out: Vec<f64> = x.iter().map(|&v| v as f64).collect();
    let half = dim / 2;
    for (r, row) in out.chunks_mut(dim).enumerate() {
        let pos = (pos0 as usize + (r / heads) % seq) as f64;
        for i in 0..half {
            let (i0, i1) = if mode == RopeMode::Neox { (i, i + half) } else { (2 * i, 2 * i + 1) };
            let ang = pos * (theta as f64).powf(-2.0 * i as f64 / dim as f64);
            let (x0, x1) = (row[i0], row[i1]);
            row[i0] = x0 * ang.cos() - x1 * ang.sin();
            row[i1] = x0 * ang.sin() + x1 * ang.cos();
        }
    }
    out
}

#[test]
fn rope_matches_f64_rotation() {
    let mut rng = fastrand::Rng::with_seed(10);
    for det in MODES {
        for mode in [RopeMode::Interleaved, RopeMode::Neox] {
            for (shape, pos0) in [(vec![5, 3, 8], 0u32), (vec![2, 4, 2, 16], 17), (vec![1, 1, 2], 1000), (vec![0, 2, 4], 3)] {
                let mut b = CpuBackend::new(det);
                let (seq, heads, dim) = (shape[shape.len() - 3], shape[shape.len() - 2], shape[shape.len() - 1]);
                let xv = rand_vec(&mut rng, numel(&shape), 1.0);
                let x = up(&mut b, &shape, xv.clone());
                let got = {
                    let id = b.rope(x, pos0, 10000.0, mode).unwrap();
                    vals(&mut b, id)
                };
                let want = rope_f64(&xv, seq, heads, dim, pos0, 10000.0, mode);
                // cos/sin rounded to f32, two products and one add: a few ULP of |x0| + |x1|.
                let bound: Vec<f64> = vec![2.0; want.len()];
                assert_within(&format!("{det:?} {mode:?} {shape:?}"), &got, &want, &bound, 4.0 * 2f64.powi(-24));
            }
        }
    }
    let mut b = CpuBackend::new(Determinism::Reproducible);
    let odd = up(&mut b, &[2, 2, 3], vec![0.0; 12]);
    assert!(is_shape(b.rope(odd, 0, 10000.0, RopeMode::Neox)));
    let flat = up(&mut b, &[4, 8], vec![0.0; 32]);
    assert!(is_shape(b.rope(flat, 0, 10000.0, RopeMode::Interleaved)));
}

/// f64 causal attention over `[batch, t, h, d]` (leading axes flattened into `batch`).
#[allow(clippy::too_many_arguments)]
fn attention_f64(q: &[f32], k: &[f32], v: &[f32], a: &AttentionDims, pos0: u32, scale: f32) -> Vec<f64> {
    let mut out = vec![0.0; q.len()];
    let group = a.hq / a.hkv;
    for b in 0..a.batch {
        for i in 0..a.tq {
            for h in 0..a.hq {
                let g = h / group;
                let visible = (pos0 as usize + i + 1).min(a.tk);
                let qo = ((b * a.tq + i) * a.hq + h) * a.dim;
                let ko = |j: usize| ((b * a.tk + j) * a.hkv + g) * a.dim;
                let s: Vec<f64> =
                    (0..visible).map(|j| (0..a.dim).map(|d| q[qo + d] as f64 * k[ko(j) + d] as f64).sum::<f64>() * scale as f64).collect();
                let mx = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = s.iter().map(|x| (x - mx).exp()).collect();
                let sum: f64 = e.iter().sum();
                for d in 0..a.dim {
                    out[qo + d] = (0..visible).map(|j| e[j] / sum * v[ko(j) + d] as f64).sum();
                }
            }
        }
    }
    out
}

#[test]
fn attention_matches_f64_reference() {
    let mut rng = fastrand::Rng::with_seed(11);
    // (q shape, k shape, pos0): prefill, decode with a cache, grouped heads, rank 4, keys fewer
    // than the causal window, and no keys at all.
    let cases: &[(&[usize], &[usize], u32)] = &[
        (&[4, 2, 8], &[4, 2, 8], 0),
        (&[1, 4, 16], &[9, 2, 16], 8),
        (&[3, 6, 4], &[7, 3, 4], 4),
        (&[2, 3, 4, 8], &[2, 5, 1, 8], 2),
        (&[5, 2, 4], &[3, 2, 4], 0),
        (&[2, 2, 4], &[0, 1, 4], 5),
        (&[0, 2, 4], &[3, 2, 4], 0),
    ];
    for det in MODES {
        for &(qs, ks, pos0) in cases {
            let mut b = CpuBackend::new(det);
            let (qv, kv, vv) = (rand_vec(&mut rng, numel(qs), 2.0), rand_vec(&mut rng, numel(ks), 2.0), rand_vec(&mut rng, numel(ks), 1.0));
            let dims = attention_dims(qs, ks, ks).unwrap();
            let scale = 1.0 / (dims.dim as f32).sqrt();
            let (q, k, v) = (up(&mut b, qs, qv.clone()), up(&mut b, ks, kv.clone()), up(&mut b, ks, vv.clone()));
            let o = b.attention(q, k, v, pos0, scale).unwrap();
            assert_eq!(b.shape(o).unwrap(), qs.to_vec());
            let want = attention_f64(&qv, &kv, &vv, &dims, pos0, scale);
            // Outputs are convex combinations of v (|v| <= 1): absolute error a few hundred ULP
            // of 1 covers the f32 scores, exp and sums.
            assert_within(&format!("{det:?} {qs:?} {ks:?} pos0 {pos0}"), &vals(&mut b, o), &want, &vec![1.0; want.len()], 1e-5);
        }
    }
}

#[test]
fn attention_never_reads_keys_past_the_causal_limit() {
    // Query 0 at position 0 sees key 0 only; keys 1.. hold NaN / inf, which a -inf mask added to
    // the scores would turn into NaN outputs.
    for det in MODES {
        let mut b = CpuBackend::new(det);
        let q = up(&mut b, &[2, 1, 2], vec![1.0, 0.0, 0.5, 0.5]);
        let k = up(&mut b, &[3, 1, 2], vec![1.0, 1.0, 2.0, 0.0, f32::NAN, f32::INFINITY]);
        let v = up(&mut b, &[3, 1, 2], vec![3.0, -1.0, 5.0, 7.0, f32::NAN, f32::NAN]);
        let o = {
            let id = b.attention(q, k, v, 0, 1.0).unwrap();
            vals(&mut b, id)
        };
        assert_eq!(&o[..2], &[3.0, -1.0], "one visible key: its value exactly");
        // Query 1: scores 1 and 1 -> equal weights.
        assert_eq!(&o[2..], &[4.0, 3.0]);
        let bad = up(&mut b, &[3, 1, 3], vec![0.0; 9]);
        assert!(is_shape(b.attention(q, bad, bad, 0, 1.0)));
        assert!(is_shape(b.attention(q, k, bad, 0, 1.0)));
        let k2 = up(&mut b, &[3, 2, 2], vec![0.0; 12]);
        assert!(is_shape(b.attention(q, k2, k2, 0, 1.0)), "1 query head over 2 kv heads");
    }
}

#[test]
fn softmax_and_norms_match_f64() {
    let mut rng = fastrand::Rng::with_seed(12);
    for det in MODES {
        let mut b = CpuBackend::new(det);
        let (rows, last) = (70, 600);
        let xv = rand_vec(&mut rng, rows * last, 4.0);
        let (wv, bv) = (rand_vec(&mut rng, last, 1.0), rand_vec(&mut rng, last, 1.0));
        let (x, w, bias) = (up(&mut b, &[rows, last], xv.clone()), up(&mut b, &[last], wv.clone()), up(&mut b, &[last], bv.clone()));
        let sm = {
            let id = b.softmax_last(x).unwrap();
            vals(&mut b, id)
        };
        let rms = {
            let id = b.rmsnorm(x, w, 1e-5).unwrap();
            vals(&mut b, id)
        };
        let ln = {
            let id = b.layernorm(x, w, bias, 1e-5).unwrap();
            vals(&mut b, id)
        };
        let (mut want_sm, mut want_rms, mut want_ln) = (Vec::new(), Vec::new(), Vec::new());
        for row in xv.chunks(last) {
            let r: Vec<f64> = row.iter().map(|&v| v as f64).collect();
            let mx = r.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let sum: f64 = r.iter().map(|v| (v - mx).exp()).sum();
            want_sm.extend(r.iter().map(|v| (v - mx).exp() / sum));
            let ms = r.iter().map(|v| v * v).sum::<f64>() / last as f64;
            want_rms.extend(r.iter().zip(&wv).map(|(v, &w)| v / (ms + 1e-5).sqrt() * w as f64));
            let mean = r.iter().sum::<f64>() / last as f64;
            let var = r.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / last as f64;
            want_ln.extend(r.iter().zip(&wv).zip(&bv).map(|((v, &w), &b)| (v - mean) / (var + 1e-5).sqrt() * w as f64 + b as f64));
        }
        let ones = vec![1.0; want_sm.len()];
        let tol = last as f64 * 2f64.powi(-22);
        assert_within("softmax", &sm, &want_sm, &want_sm.iter().map(|v| v.abs() + 1e-9).collect::<Vec<_>>(), tol);
        assert_within("rmsnorm", &rms, &want_rms, &ones, 1e-5);
        assert_within("layernorm", &ln, &want_ln, &ones, 1e-5);
    }
}

#[test]
fn binary_broadcasts_like_numpy() {
    let mut b = CpuBackend::new(Determinism::Reproducible);
    let x = up(&mut b, &[2, 3], vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    let row = up(&mut b, &[3], vec![10.0, 20.0, 30.0]);
    let col = up(&mut b, &[2, 1], vec![100.0, 200.0]);
    let one = up(&mut b, &[1], vec![0.5]);
    assert_eq!(
        {
            let id = b.binary(BinaryOp::Add, x, row).unwrap();
            vals(&mut b, id)
        },
        vec![11.0, 22.0, 33.0, 14.0, 25.0, 36.0]
    );
    assert_eq!(
        {
            let id = b.binary(BinaryOp::Sub, col, x).unwrap();
            vals(&mut b, id)
        },
        vec![99.0, 98.0, 97.0, 196.0, 195.0, 194.0]
    );
    assert_eq!(
        {
            let id = b.binary(BinaryOp::Mul, one, x).unwrap();
            vals(&mut b, id)
        },
        vec![0.5, 1.0, 1.5, 2.0, 2.5, 3.0]
    );
    let outer = b.binary(BinaryOp::Div, col, row).unwrap();
    assert_eq!(b.shape(outer).unwrap(), vec![2, 3]);
    assert_eq!(vals(&mut b, outer), vec![10.0, 5.0, 100.0 / 30.0, 20.0, 10.0, 200.0 / 30.0]);
    let empty = up(&mut b, &[0, 3], vec![]);
    assert_eq!(
        {
            let id = b.binary(BinaryOp::Add, empty, row).unwrap();
            vals(&mut b, id)
        },
        Vec::<f32>::new()
    );
    let two = up(&mut b, &[2], vec![0.0; 2]);
    assert!(is_shape(b.binary(BinaryOp::Add, x, two)));
}

#[test]
fn large_row_ops_are_the_same_threaded_or_not() {
    // Above PAR_MIN_ELEMS rows run on several threads; each row must equal the single-row result.
    let mut rng = fastrand::Rng::with_seed(13);
    let mut b = CpuBackend::new(Determinism::Reproducible);
    let (rows, last) = (300, 257);
    let xv = rand_vec(&mut rng, rows * last, 3.0);
    let x = up(&mut b, &[rows, last], xv.clone());
    let all = {
        let id = b.softmax_last(x).unwrap();
        vals(&mut b, id)
    };
    let ua = {
        let id = b.unary(UnaryOp::Gelu, x).unwrap();
        vals(&mut b, id)
    };
    for r in [0, 137, rows - 1] {
        let one = up(&mut b, &[1, last], xv[r * last..(r + 1) * last].to_vec());
        assert_eq!(
            bits(&{
                let id = b.softmax_last(one).unwrap();
                vals(&mut b, id)
            }),
            bits(&all[r * last..(r + 1) * last])
        );
        assert_eq!(
            bits(&{
                let id = b.unary(UnaryOp::Gelu, one).unwrap();
                vals(&mut b, id)
            }),
            bits(&ua[r * last..(r + 1) * last])
        );
    }
}

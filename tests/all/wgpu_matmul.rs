//! The wgpu matmul kernels (shaders/matmul_*.wgsl, matvec.wgsl) in both kernel sets on whatever adapter runs the
//! tests, so the GPU set is checked on lavapipe too: shapes that cross the tile edges (64 x 128 for
//! `mm_rb`, 64 x 64 for `mm_tiled`), k not a multiple of 4 or 32 (unaligned loads, scalar tails),
//! every weight dtype, both transposes, batches with a broadcast operand, and the row counts where
//! the kernel choice changes (1, 2, 3, 4, 15, 16, 17). Reproducible mode must give the CPU
//! reference's bits; both modes must be within the per-output error bound of an f64 reference
//! computed from the inputs' defined values (`support::reference`).
//!
//! Without an adapter the cases print a loud skip; with `REQUIRE_WGPU=1` they fail instead.

use ao_gpu_worker::gpu::TensorOps;
use ao_gpu_worker::gpu::wgpu::{MatmulKernels, WgpuBackend};
use ao_gpu_worker::gpu::{Backend, DType, Determinism, RawTensor, Result, TensorId, cpu::CpuBackend, quant};

use crate::support::reference::{assert_within_bound, matmul_f64};

fn wgpu(det: Determinism, set: MatmulKernels) -> Option<Backend> {
    match WgpuBackend::new(det) {
        Ok(mut b) => {
            b.set_matmul_kernels(set);
            Some(Backend::Wgpu(Box::new(b)))
        }
        Err(e) => {
            if std::env::var("REQUIRE_WGPU").is_ok_and(|v| v == "1") {
                panic!("REQUIRE_WGPU=1 but the wgpu backend did not start: {e}");
            }
            eprintln!("!!!!! SKIPPING wgpu matmul cases: {e} (set REQUIRE_WGPU=1 to make this fail) !!!!!");
            None
        }
    }
}

/// Uniform values in (-1, 1), stored as `dtype` (quantized with the GGUF reference quantizer).
fn rand_raw(seed: u64, dtype: DType, shape: &[usize]) -> RawTensor {
    let mut rng = fastrand::Rng::with_seed(seed);
    let values: Vec<f32> = (0..shape.iter().product::<usize>()).map(|_| rng.f32() * 2.0 - 1.0).collect();
    RawTensor::new(dtype, shape.to_vec(), quant::quantize(dtype, &values).unwrap()).unwrap()
}

fn values(t: &RawTensor) -> Vec<f32> {
    quant::dequantize(t.dtype, &t.bytes, t.shape.iter().product()).unwrap()
}

fn run(b: &mut Backend, x: &RawTensor, w: &RawTensor, ta: bool, tb: bool) -> Result<RawTensor> {
    let ids: Vec<TensorId> = [x, w].iter().map(|t| b.upload_raw(t)).collect::<Result<_>>()?;
    let out = b.matmul(ids[0], ids[1], ta, tb);
    let result = out.clone().and_then(|id| b.read_raw(id));
    for id in ids.into_iter().chain(out.ok()) {
        b.free(id)?;
    }
    result
}

/// (weight dtype, a shape, b shape, transpose_a, transpose_b)
type Case = (DType, Vec<usize>, Vec<usize>, bool, bool);

/// `[m, k] @ [k, n]` in the storage order the transposes ask for, with optional batch axes.
fn case(dtype: DType, (ba, m, k): (&[usize], usize, usize), (bb, n): (&[usize], usize), ta: bool, tb: bool) -> Case {
    let mut a = ba.to_vec();
    a.extend(if ta { [k, m] } else { [m, k] });
    let mut b = bb.to_vec();
    b.extend(if tb { [n, k] } else { [k, n] });
    (dtype, a, b, ta, tb)
}

fn cases() -> Vec<Case> {
    let mut v = Vec::new();
    // f32 across tile edges, every transpose, aligned and unaligned k, m and n.
    for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
        for (m, k, n) in [(130, 70, 150), (68, 67, 132), (67, 68, 129), (70, 100, 129)] {
            v.push(case(DType::F32, (&[], m, k), (&[], n), ta, tb));
        }
    }
    // Row counts around the kernel switches, k with scalar tails, n not a multiple of 4.
    for m in [1, 2, 3, 4, 15, 16, 17] {
        for (k, n) in [(37, 131), (64, 37), (100, 8)] {
            for tb in [false, true] {
                v.push(case(DType::F32, (&[], m, k), (&[], n), false, tb));
            }
        }
        v.push(case(DType::F32, (&[], m, 36), (&[], 33), true, true));
        v.push(case(DType::F32, (&[], m, 1), (&[], 5), m > 2, false));
    }
    // Batches, with either operand shared.
    v.push(case(DType::F32, (&[3], 9, 36), (&[], 20), false, false));
    v.push(case(DType::F32, (&[], 20, 37), (&[3], 70), false, true));
    v.push(case(DType::F32, (&[2], 1, 40), (&[2], 65), false, true));
    v.push(case(DType::F32, (&[2], 70, 33), (&[2], 130), true, false));
    // No k at all: zeros.
    v.push(case(DType::F32, (&[], 3, 0), (&[], 4), false, false));
    v.push(case(DType::F32, (&[], 1, 0), (&[], 4), false, true));
    // Block types (transpose_b only; k a multiple of 32).
    for dtype in [DType::Q8_0, DType::Q4_0, DType::Q4_1] {
        for (m, k, n) in [(1, 96, 37), (1, 416, 130), (3, 64, 130), (20, 160, 65), (70, 32, 129), (1, 0, 4)] {
            v.push(case(dtype, (&[], m, k), (&[], n), false, true));
        }
        v.push(case(dtype, (&[], 70, 64), (&[], 66), true, true));
        v.push(case(dtype, (&[], 5, 64), (&[], 9), true, true));
        v.push(case(dtype, (&[2], 3, 64), (&[2], 5), false, true));
        v.push(case(dtype, (&[2], 1, 128), (&[], 7), false, true));
    }
    // f16 weights: aligned (k or n a multiple of 4 or 8) and not.
    for (m, k, n, tb) in [
        (1, 35, 37, true),
        (1, 200, 40, true),
        (5, 36, 70, true),
        (70, 41, 130, true),
        (70, 48, 130, true),
        (70, 40, 132, false),
        (1, 40, 37, false),
        (16, 33, 9, false),
    ] {
        v.push(case(DType::F16, (&[], m, k), (&[], n), false, tb));
    }
    v.push(case(DType::F16, (&[], 2, 33), (&[], 9), true, false));
    v.push(case(DType::F16, (&[2], 66, 40), (&[2], 20), true, true));
    v
}

fn check_all(det: Determinism, set: MatmulKernels) {
    let Some(mut b) = wgpu(det, set) else { return };
    let cpu = &mut Backend::Cpu(CpuBackend::new(det));
    for (i, (dtype, sa, sb, ta, tb)) in cases().into_iter().enumerate() {
        let what = format!("{set:?} {det:?}: [{sa:?}]{} @ {dtype} [{sb:?}]{}", if ta { "^T" } else { "" }, if tb { "^T" } else { "" });
        let a = rand_raw(1000 + i as u64, DType::F32, &sa);
        let w = rand_raw(2000 + i as u64, dtype, &sb);
        let got = run(&mut b, &a, &w, ta, tb).unwrap_or_else(|e| panic!("{what}: {e}"));
        let want = run(cpu, &a, &w, ta, tb).unwrap();
        assert_eq!((got.dtype, &got.shape), (DType::F32, &want.shape), "{what}");
        let got_v = values(&got);
        if det == Determinism::Reproducible
            && let Some(j) = got.bytes.chunks(4).zip(want.bytes.chunks(4)).position(|(x, y)| x != y)
        {
            panic!("{what}: output {j} is {:e}, the CPU reference gives {:e}", got_v[j], values(&want)[j]);
        }
        let (r, bound, k) = matmul_f64(&values(&a), &a.shape, &values(&w), &w.shape, ta, tb);
        assert_within_bound(&what, &got_v, &r, &bound, k);
    }
}

#[test]
fn cpu_kernels_reproducible() {
    check_all(Determinism::Reproducible, MatmulKernels::Cpu);
}

#[test]
fn cpu_kernels_fast() {
    check_all(Determinism::Fast, MatmulKernels::Cpu);
}

#[test]
fn gpu_kernels_reproducible() {
    check_all(Determinism::Reproducible, MatmulKernels::Gpu);
}

#[test]
fn gpu_kernels_fast() {
    check_all(Determinism::Fast, MatmulKernels::Gpu);
}

/// Infinities and NaN in the inputs propagate as on the CPU (NaN compared as NaN).
#[test]
fn non_finite_inputs_match_cpu() {
    for set in [MatmulKernels::Cpu, MatmulKernels::Gpu] {
        let Some(mut b) = wgpu(Determinism::Reproducible, set) else { return };
        let cpu = &mut Backend::Cpu(CpuBackend::new(Determinism::Reproducible));
        let (m, k, n) = (17, 36, 70);
        let mut av: Vec<f32> = (0..m * k).map(|i| ((i * 7) % 11) as f32 - 5.0).collect();
        av[3] = f32::INFINITY;
        av[k + 5] = f32::NEG_INFINITY;
        av[2 * k + 7] = f32::NAN;
        av[5 * k] = 1e38;
        let mut wv: Vec<f32> = (0..k * n).map(|i| ((i * 5) % 13) as f32 / 4.0 - 1.5).collect();
        wv[9] = 0.0;
        wv[n * 3 + 2] = f32::INFINITY;
        wv[n * 5 + 1] = 1e38;
        let a = RawTensor::from_f32(vec![m, k], &av).unwrap();
        for (dtype, shape, tb) in [(DType::F32, vec![k, n], false), (DType::F16, vec![k, n], false)] {
            let w = RawTensor::new(dtype, shape, quant::quantize(dtype, &wv).unwrap()).unwrap();
            let got = values(&run(&mut b, &a, &w, false, tb).unwrap());
            let want = values(&run(cpu, &a, &w, false, tb).unwrap());
            for (j, (g, c)) in got.iter().zip(&want).enumerate() {
                assert!(g.to_bits() == c.to_bits() || (g.is_nan() && c.is_nan()), "{set:?} {dtype}: output {j}: {g:e} vs cpu {c:e}");
            }
        }
    }
}

#[test]
fn kernel_set_follows_the_adapter() {
    if let Ok(b) = WgpuBackend::new(Determinism::Fast) {
        assert_eq!(b.matmul_kernels(), MatmulKernels::for_adapter(b.adapter_info()));
    }
}

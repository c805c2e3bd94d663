//! The CUDA backend's `Engine` on the host emulator of `kernels/*.cu`, against the CPU backend.
//!
//! Every reproducible result must equal the CPU's bit for bit (and every Exact op in both modes);
//! fast-mode results must be within a tolerance of the CPU; every misuse must give exactly the CPU's
//! error. Inputs mix seeded random values with special ones (NaN, infinities, signed zeros, ties),
//! and shapes cross the kernels' tile and block sizes (128, 256) while staying small.

use super::super::Engine;
use super::EmuDevice;
use crate::gpu::TensorOps;
use crate::gpu::cpu::CpuBackend;
use crate::gpu::kernels::{FILES, Lang};
use crate::gpu::quant;
use crate::gpu::{
    BinaryOp, DType, Determinism, GpuError, HostTensor, RawTensor, ReduceOp, Result, RopeMode, TensorBackend, TensorId, UnaryOp,
};

const MODES: [Determinism; 2] = [Determinism::Reproducible, Determinism::Fast];

/// The emulated CUDA engine (cuBLAS emulated or not), or a loud skip without clang++.
fn emu(det: Determinism, blas: bool) -> Option<Engine<EmuDevice>> {
    match EmuDevice::start(blas) {
        Ok(dev) => Some(Engine::on(dev, det)),
        Err(why) => {
            // Only a missing compiler is a skip; a kernel that does not compile for the host is a failure.
            assert!(why.starts_with(super::NO_CXX), "the CUDA kernel emulator did not build: {why}");
            if std::env::var("REQUIRE_CUDA_EMU").is_ok_and(|v| v == "1") {
                panic!("REQUIRE_CUDA_EMU=1 but the CUDA kernel emulator is unavailable: {why}");
            }
            eprintln!("!!!!! SKIPPING the emulated CUDA kernel tests: {why} (set REQUIRE_CUDA_EMU=1 to make this fail) !!!!!");
            None
        }
    }
}

/// A comparison rule for one result.
#[derive(Debug, Clone, Copy)]
enum Tol {
    /// Identical bits (any NaN matches any NaN).
    Bits,
    /// `|a - e| <= abs + rel * |e|`.
    Near { abs: f64, rel: f64 },
}

const NEAR: Tol = Tol::Near { abs: 1e-5, rel: 1e-4 };

fn compare(what: &str, got: &HostTensor, want: &HostTensor, tol: Tol) {
    assert_eq!(got.shape, want.shape, "{what}: shape");
    for (i, (&a, &e)) in got.data.iter().zip(&want.data).enumerate() {
        let ok = match tol {
            _ if a.is_nan() || e.is_nan() => a.is_nan() && e.is_nan(),
            Tol::Bits => a.to_bits() == e.to_bits(),
            _ if a.is_infinite() || e.is_infinite() => a == e,
            Tol::Near { abs, rel } => (a as f64 - e as f64).abs() <= abs + rel * (e as f64).abs(),
        };
        assert!(ok, "{what}: index {i}: cuda {a:e} ({:#010x}), cpu {e:e} ({:#010x}), tol {tol:?}", a.to_bits(), e.to_bits());
    }
}

/// Uploads `inputs` to the emulated engine and the CPU, runs `f` on both, and checks that both fail
/// with the same error or both succeed with the same dtype, shape, and values within `tol` (and,
/// for `Tol::Bits`, the same storage bytes).
fn same(
    what: &str,
    cuda: &mut Engine<EmuDevice>,
    cpu: &mut CpuBackend,
    inputs: &[&RawTensor],
    tol: Tol,
    f: impl Fn(&mut dyn TensorBackend, &[TensorId]) -> Result<TensorId>,
) {
    let run = |b: &mut dyn TensorBackend| -> Result<(DType, HostTensor, RawTensor)> {
        let ids: Vec<TensorId> = inputs.iter().map(|t| b.upload_raw(t)).collect::<Result<_>>()?;
        let out = f(b, &ids);
        let result = out.clone().and_then(|id| Ok((b.dtype(id)?, b.read(id)?, b.read_raw(id)?)));
        for id in ids.into_iter().chain(out.ok()) {
            let _ = b.free(id);
        }
        result
    };
    let (got, want) = (run(cuda), run(cpu));
    match (got, want) {
        (Ok((gd, gv, gr)), Ok((wd, wv, wr))) => {
            assert_eq!(gd, wd, "{what}: dtype");
            compare(what, &gv, &wv, tol);
            if matches!(tol, Tol::Bits) && !gv.data.iter().any(|v| v.is_nan()) {
                assert_eq!(gr, wr, "{what}: storage bytes");
            }
        }
        (Err(g), Err(w)) => assert_eq!(g, w, "{what}: errors differ"),
        (g, w) => panic!("{what}: cuda {:?} but cpu {:?}", g.map(|r| r.1.shape), w.map(|r| r.1.shape)),
    }
}

fn rand_vals(seed: u64, n: usize, scale: f32) -> Vec<f32> {
    let mut rng = fastrand::Rng::with_seed(seed);
    (0..n).map(|_| (rng.f32() * 2.0 - 1.0) * scale).collect()
}

fn f32t(shape: &[usize], data: Vec<f32>) -> RawTensor {
    RawTensor::from_f32(shape.to_vec(), &data).unwrap()
}

fn rand_t(seed: u64, shape: &[usize], scale: f32) -> RawTensor {
    f32t(shape, rand_vals(seed, shape.iter().product(), scale))
}

fn i32t(shape: &[usize], data: &[i32]) -> RawTensor {
    RawTensor::from_i32(shape.to_vec(), data).unwrap()
}

/// `values` stored as `dtype` (the GGUF reference quantizer for the block types).
fn as_dtype(dtype: DType, shape: &[usize], values: &[f32]) -> RawTensor {
    RawTensor::new(dtype, shape.to_vec(), quant::quantize(dtype, values).unwrap()).unwrap()
}

/// Runs `body` for each determinism mode with a fresh emulated engine and CPU backend.
fn each_mode(blas: bool, mut body: impl FnMut(Determinism, &mut Engine<EmuDevice>, &mut CpuBackend)) {
    for det in MODES {
        let Some(mut cuda) = emu(det, blas) else { return };
        let mut cpu = CpuBackend::new(det);
        body(det, &mut cuda, &mut cpu);
    }
}

/// Bitwise in reproducible mode, `fast` otherwise.
fn repro_or(det: Determinism, fast: Tol) -> Tol {
    if det == Determinism::Reproducible { Tol::Bits } else { fast }
}

#[test]
fn kernel_signatures_parse() {
    let sigs = super::kernel_signatures(
        "extern \"C\" __global__ __launch_bounds__(256) void k1(const float *a, u32 n, Broadcast4 p) { }\n\
         static __device__ void helper(int x) {}\nextern \"C\" __global__ void k2() {}",
    );
    assert_eq!(sigs.len(), 2);
    assert_eq!(sigs[0].name, "k1");
    assert_eq!(sigs[0].params, vec![("const float *".to_owned(), true), ("u32".to_owned(), false), ("Broadcast4".to_owned(), false)]);
    assert_eq!(sigs[1].params, vec![]);
    // Every registered CUDA entry point is an extern "C" kernel the emulator can register.
    for f in FILES.iter().filter(|f| f.lang == Lang::Cuda) {
        let names: Vec<String> = super::kernel_signatures(f.source).into_iter().map(|k| k.name).collect();
        for e in f.entries {
            assert!(names.iter().any(|n| n == e.name), "{}: {} is not an extern \"C\" __global__ kernel", f.path, e.name);
        }
        assert_eq!(names.len(), f.entries.len(), "{}: unregistered kernels in {names:?}", f.path);
    }
}

#[test]
fn matmul_f32_matches_cpu() {
    let cases: &[(&[usize], &[usize], bool, bool)] = &[
        (&[1, 1], &[1, 1], false, false),
        (&[3, 5], &[5, 7], false, false),
        (&[33, 17], &[33, 65], true, false),
        (&[17, 33], &[65, 33], false, true),
        (&[33, 17], &[65, 33], true, true),
        // Crosses the 128 x 128 output tile in both directions, and k is not a multiple of 8.
        (&[130, 9], &[9, 131], false, false),
        (&[2, 9, 13], &[2, 13, 11], false, false),
        (&[2, 9, 13], &[13, 11], false, false),
        (&[9, 13], &[2, 3, 13, 11], false, false),
        // m = 1: the matrix-vector kernel (transpose_b) and the tiled one (not).
        (&[1, 70], &[37, 70], false, true),
        (&[3, 1, 40], &[3, 20, 40], false, true),
        (&[40, 1], &[20, 40], true, true),
        (&[1, 70], &[70, 37], false, false),
        (&[0, 5], &[5, 7], false, false),
        (&[3, 0], &[0, 4], false, false),
    ];
    for blas in [false, true] {
        each_mode(blas, |det, cuda, cpu| {
            for (i, &(sa, sb, ta, tb)) in cases.iter().enumerate() {
                let (a, b) = (rand_t(10 + i as u64, sa, 1.0), rand_t(100 + i as u64, sb, 1.0));
                let what = format!("matmul {sa:?}{ta} @ {sb:?}{tb} {det:?} blas={blas}");
                let tol = repro_or(det, Tol::Near { abs: 1e-5, rel: 1e-5 });
                same(&what, cuda, cpu, &[&a, &b], tol, |b, ids| b.matmul(ids[0], ids[1], ta, tb));
            }
        });
    }
}

#[test]
fn matmul_with_f16_and_quantized_weights_matches_cpu() {
    each_mode(false, |det, cuda, cpu| {
        for dtype in [DType::F16, DType::Q8_0, DType::Q4_0, DType::Q4_1] {
            // (a shape, weight shape [n, k] or [batch, n, k], transpose_a)
            let cases: &[(&[usize], &[usize], bool)] = &[
                (&[1, 64], &[9, 64], false),
                (&[3, 96], &[5, 96], false),
                (&[130, 32], &[3, 32], false),
                (&[64, 2], &[7, 64], true),
                (&[2, 1, 32], &[2, 6, 32], false),
                (&[2, 3, 64], &[4, 64], false),
                (&[0, 32], &[4, 32], false),
            ];
            for (i, &(sa, sw, ta)) in cases.iter().enumerate() {
                let a = rand_t(200 + i as u64, sa, 1.0);
                let w = as_dtype(dtype, sw, &rand_vals(300 + i as u64, sw.iter().product(), 2.0));
                let what = format!("matmul {sa:?}{ta} @ {dtype} {sw:?}^T {det:?}");
                let tol = repro_or(det, Tol::Near { abs: 1e-5, rel: 1e-5 });
                same(&what, cuda, cpu, &[&a, &w], tol, |b, ids| b.matmul(ids[0], ids[1], ta, true));
            }
        }
        // f16 weights may also be [k, n]; quantized ones must be transposed; i32 is refused.
        let a = rand_t(1, &[3, 40], 1.0);
        let w16 = as_dtype(DType::F16, &[40, 5], &rand_vals(2, 200, 1.0));
        let tol = repro_or(det, Tol::Near { abs: 1e-5, rel: 1e-5 });
        same("matmul f16 [k, n]", cuda, cpu, &[&a, &w16], tol, |b, ids| b.matmul(ids[0], ids[1], false, false));
        let a = rand_t(1, &[3, 64], 1.0);
        let wq = as_dtype(DType::Q8_0, &[64, 64], &rand_vals(3, 4096, 1.0));
        same("matmul q8_0 untransposed", cuda, cpu, &[&a, &wq], Tol::Bits, |b, ids| b.matmul(ids[0], ids[1], false, false));
        let wi = i32t(&[64, 2], &[1; 128]);
        same("matmul i32 b", cuda, cpu, &[&a, &wi], Tol::Bits, |b, ids| b.matmul(ids[0], ids[1], false, false));
        same("matmul f16 a", cuda, cpu, &[&w16, &a], Tol::Bits, |b, ids| b.matmul(ids[0], ids[1], false, false));
        same("matmul shapes", cuda, cpu, &[&a, &a], Tol::Bits, |b, ids| b.matmul(ids[0], ids[1], false, false));
    });
}

#[test]
fn elementwise_ops_match_cpu() {
    let special = f32t(&[8], vec![0.0, -0.0, 1.5, -2.25, f32::INFINITY, f32::NEG_INFINITY, f32::NAN, 1e-3]);
    each_mode(false, |det, cuda, cpu| {
        let cases: &[(&[usize], &[usize])] =
            &[(&[4, 1], &[1, 6]), (&[3, 5], &[3, 5]), (&[2, 3, 4], &[4]), (&[2, 1, 3, 1], &[5, 1, 4]), (&[1], &[2, 2]), (&[0, 3], &[1, 3])];
        // More elements than the emulator's 3 blocks of 256 threads: the grid-stride loops go round.
        let cases = [cases, &[(&[30, 40][..], &[40][..])]].concat();
        for (i, &(sa, sb)) in cases.iter().enumerate() {
            let (x, y) = (rand_t(20 + i as u64, sa, 3.0), rand_t(200 + i as u64, sb, 3.0));
            for op in [BinaryOp::Add, BinaryOp::Sub, BinaryOp::Mul, BinaryOp::Div] {
                let what = format!("{} {sa:?} {sb:?} {det:?}", op.name());
                same(&what, cuda, cpu, &[&x, &y], Tol::Bits, |b, ids| b.binary(op, ids[0], ids[1]));
            }
        }
        let (x, y) = (special.clone(), f32t(&[8], vec![-0.0, 0.0, f32::INFINITY, 3.0, f32::INFINITY, 2.0, 1.0, 0.0]));
        for op in [BinaryOp::Add, BinaryOp::Sub, BinaryOp::Mul, BinaryOp::Div] {
            same(&format!("{} special", op.name()), cuda, cpu, &[&x, &y], Tol::Bits, |b, ids| b.binary(op, ids[0], ids[1]));
        }
        same("add broadcast error", cuda, cpu, &[&rand_t(1, &[3], 1.0), &rand_t(2, &[4], 1.0)], Tol::Bits, |b, ids| b.add(ids[0], ids[1]));
        let finite = rand_t(30, &[7, 37], 6.0);
        for op in [UnaryOp::Scale(0.37), UnaryOp::Relu, UnaryOp::Gelu, UnaryOp::Silu, UnaryOp::Tanh, UnaryOp::Exp] {
            // Reproducible mode computes gelu / silu / tanh / exp with the portable functions of `gpu`.
            let exact = matches!(op, UnaryOp::Scale(_) | UnaryOp::Relu) || det == Determinism::Reproducible;
            for x in [&finite, &special, &f32t(&[2, 0], vec![])] {
                let what = format!("{} {:?} {det:?}", op.name(), x.shape);
                same(&what, cuda, cpu, &[x], if exact { Tol::Bits } else { NEAR }, |b, ids| b.unary(op, ids[0]));
            }
        }
        let i = i32t(&[2], &[1, 2]);
        same("relu of i32", cuda, cpu, &[&i], Tol::Bits, |b, ids| b.relu(ids[0]));
        same("add of i32", cuda, cpu, &[&finite, &i], Tol::Bits, |b, ids| b.add(ids[0], ids[1]));
    });
}

/// Inputs at every branch and threshold of the portable exp / tanh / silu / gelu (`gpu::repro_*`,
/// mirrored by the `_repro_f32` kernels of elementwise.cu) one ULP either side, IEEE specials (signed
/// zeros, subnormals, huge values, infinities, NaNs with payloads), then seeded random values at
/// several scales and as arbitrary bit patterns.
fn transcendental_inputs(n: usize) -> Vec<f32> {
    let mut v = vec![0.0, -0.0, f32::from_bits(1), f32::from_bits(0x8000_0001), 1e-40, -1e-40, f32::MIN_POSITIVE, -f32::MIN_POSITIVE];
    v.extend([1e-30, -1e-20, 1e-14, f32::MAX, f32::MIN, 1e13, -7e12, f32::INFINITY, f32::NEG_INFINITY, f32::NAN]);
    v.extend([0x7fc0_0001, 0xffc0_0000, 0x7f80_0001].map(f32::from_bits));
    for t in [2f32.powi(-12), 0.5625, 9.5, 0.015625, 11.0, 18.0, 100.0, 88.722_84, 88.75, 87.336_55, 87.5, 91.9, 10.1] {
        for m in [t, -t] {
            v.extend([f32::from_bits(m.to_bits() - 1), m, f32::from_bits(m.to_bits() + 1)]);
        }
    }
    let mut rng = fastrand::Rng::with_seed(77);
    while v.len() < n {
        let scale = [1.0, 4.0, 12.0, 100.0, 0.05][v.len() % 5];
        v.push(if v.len() % 6 == 0 { f32::from_bits(rng.u32(..)) } else { (rng.f32() * 2.0 - 1.0) * scale });
    }
    v
}

#[test]
fn portable_transcendentals_are_bitwise_equal_to_the_cpu() {
    let x = transcendental_inputs(20_000);
    let Some(mut cuda) = emu(Determinism::Reproducible, false) else { return };
    let mut cpu = CpuBackend::new(Determinism::Reproducible);
    let input = f32t(&[x.len()], x.clone());
    for op in [UnaryOp::Gelu, UnaryOp::Silu, UnaryOp::Tanh, UnaryOp::Exp] {
        same(op.name(), &mut cuda, &mut cpu, &[&input], Tol::Bits, |b, ids| b.unary(op, ids[0]));
        // `same` compares NaNs loosely; the payloads must survive too.
        let run = |b: &mut dyn TensorBackend| -> Vec<u32> {
            let id = b.upload_raw(&input).unwrap();
            let out = b.unary(op, id).unwrap();
            b.read(out).unwrap().data.iter().map(|v| v.to_bits()).collect()
        };
        let (got, want) = (run(&mut cuda), run(&mut cpu));
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(g, w, "{} of {:e} ({:#010x}): cuda {g:#010x}, cpu {w:#010x}", op.name(), x[i], x[i].to_bits());
        }
    }
}

#[test]
fn reductions_match_cpu() {
    // Rows with NaN, infinities, signed zeros and ties: max / argmax are exact in every mode.
    let nan = f32::NAN;
    let special = f32t(
        &[6, 4],
        vec![
            nan,
            1.0,
            3.0,
            3.0, // first maximum wins; a leading NaN is skipped
            -0.0,
            0.0,
            -0.0,
            0.0, // -0 then +0: max is -0, argmax 0
            nan,
            nan,
            nan,
            nan, // all NaN: max -inf, argmax 0
            f32::NEG_INFINITY,
            nan,
            f32::NEG_INFINITY,
            -5.0,
            2.0,
            f32::INFINITY,
            nan,
            f32::INFINITY,
            -1.0,
            -1.0,
            -1.0,
            -1.0,
        ],
    );
    let shapes: &[&[usize]] = &[&[1, 1], &[3, 5], &[4, 1000], &[2, 3, 7], &[5], &[3, 0], &[2, 2, 2, 3], &[70, 3]];
    each_mode(false, |det, cuda, cpu| {
        for op in [ReduceOp::Sum, ReduceOp::Mean, ReduceOp::Max, ReduceOp::Argmax] {
            let exact = matches!(op, ReduceOp::Max | ReduceOp::Argmax);
            let tol = if exact { Tol::Bits } else { repro_or(det, Tol::Near { abs: 1e-5, rel: 1e-5 }) };
            // More rows than the emulator's 3 x 256 threads, for the one-thread-per-row kernels
            // (reproducible sums); the block-per-row kernels already wrap with 8 rows.
            let long: &[&[usize]] = if det == Determinism::Reproducible && !exact { &[&[800, 3]] } else { &[] };
            for (i, &shape) in shapes.iter().chain(long).enumerate() {
                let x = rand_t(40 + i as u64, shape, 2.0);
                same(&format!("{} {shape:?} {det:?}", op.name()), cuda, cpu, &[&x], tol, |b, ids| b.reduce_last(op, ids[0]));
            }
            let tol = if exact { Tol::Bits } else { repro_or(det, NEAR) };
            same(&format!("{} special {det:?}", op.name()), cuda, cpu, &[&special], tol, |b, ids| b.reduce_last(op, ids[0]));
        }
    });
}

#[test]
fn softmax_and_norms_match_cpu() {
    each_mode(false, |det, cuda, cpu| {
        let shapes: &[&[usize]] = &[&[1, 1], &[3, 5], &[4, 300], &[2, 3, 17], &[2, 0], &[0, 4], &[300, 2]];
        for (i, &shape) in shapes.iter().enumerate() {
            let last = *shape.last().unwrap();
            let x = rand_t(50 + i as u64, shape, 8.0);
            let tol = repro_or(det, NEAR);
            same(&format!("softmax {shape:?} {det:?}"), cuda, cpu, &[&x], tol, |b, ids| b.softmax_last(ids[0]));
            let (w, bias) = (rand_t(70 + i as u64, &[last], 1.5), rand_t(80 + i as u64, &[last], 0.5));
            let tol = repro_or(det, Tol::Near { abs: 1e-5, rel: 1e-5 });
            same(&format!("rmsnorm {shape:?} {det:?}"), cuda, cpu, &[&x, &w], tol, |b, ids| b.rmsnorm(ids[0], ids[1], 1e-5));
            same(&format!("layernorm {shape:?} {det:?}"), cuda, cpu, &[&x, &w, &bias], tol, |b, ids| {
                b.layernorm(ids[0], ids[1], ids[2], 1e-5)
            });
        }
        // Large, equal, infinite and NaN entries go through the exponent paths of repro_exp.
        let x = f32t(&[4, 3], vec![100.0, 0.0, -100.0, 5.0, 5.0, 5.0, f32::INFINITY, 1.0, 2.0, f32::NAN, 1.0, 2.0]);
        same(&format!("softmax special {det:?}"), cuda, cpu, &[&x], repro_or(det, NEAR), |b, ids| b.softmax_last(ids[0]));
        let (x, w) = (rand_t(1, &[3, 4], 1.0), rand_t(2, &[5], 1.0));
        same("rmsnorm weight shape", cuda, cpu, &[&x, &w], Tol::Bits, |b, ids| b.rmsnorm(ids[0], ids[1], 1e-5));
        let w16 = as_dtype(DType::F16, &[4], &[1.0; 4]);
        same("rmsnorm f16 weight", cuda, cpu, &[&x, &w16], Tol::Bits, |b, ids| b.rmsnorm(ids[0], ids[1], 1e-5));
    });
}

#[test]
fn casts_match_cpu_bit_for_bit() {
    let mut v = vec![
        0.0,
        -0.0,
        1.0,
        -2.5,
        65504.0,
        65520.0,
        1e9,
        -1e9,
        3e38,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::from_bits(0x7fc1_2345),
        f32::from_bits(0xffa0_0001),
        5.960_464_5e-8,
        2.980_232_2e-8,
        8.940_697e-8,
        6.103_515_6e-5,
        1.0e-40,
        2147483520.0,
        2147483648.0,
        -2147483904.0,
        0.499_999_97,
        1.000_976_6,
        1.000_488_3,
        -7.5,
        255.9,
    ];
    v.extend(rand_vals(9, 64 - v.len(), 70000.0));
    v.extend(rand_vals(10, 64, 1.0));
    v.extend((0..64).map(|i| (i as f32 - 32.0) * 1e-6));
    v.extend([7.0f32; 32]);
    v.extend(rand_vals(11, 32, 1e-30));
    assert_eq!(v.len(), 256);
    each_mode(false, |det, cuda, cpu| {
        let src = f32t(&[8, 32], v.clone());
        for to in DType::ALL {
            same(&format!("cast f32 -> {to} {det:?}"), cuda, cpu, &[&src], Tol::Bits, |b, ids| b.cast(ids[0], to));
        }
        for from in DType::ALL {
            let x = match from {
                DType::I32 => i32t(&[8, 32], &(0..256).map(|i| i * 7919 - 1_000_000 + i32::MIN / 300 * (i % 3)).collect::<Vec<_>>()),
                d => {
                    as_dtype(d, &[8, 32], &v.iter().map(|x| if x.is_nan() { 1.0 } else { x.clamp(-60000.0, 60000.0) }).collect::<Vec<_>>())
                }
            };
            for to in DType::ALL {
                same(&format!("cast {from} -> {to} {det:?}"), cuda, cpu, &[&x], Tol::Bits, |b, ids| b.cast(ids[0], to));
            }
        }
        // A quantized target needs a block-aligned last axis.
        same("cast to q8_0 misaligned", cuda, cpu, &[&rand_t(1, &[2, 3], 1.0)], Tol::Bits, |b, ids| b.cast(ids[0], DType::Q8_0));
    });
}

#[test]
fn layout_ops_match_cpu() {
    each_mode(false, |det, cuda, cpu| {
        let dtypes = [DType::F32, DType::F16, DType::I32];
        for dtype in dtypes {
            let make = |seed: u64, shape: &[usize]| match dtype {
                DType::I32 => i32t(shape, &(0..shape.iter().product::<usize>()).map(|i| i as i32 * 3 - seed as i32).collect::<Vec<_>>()),
                d => as_dtype(d, shape, &rand_vals(seed, shape.iter().product(), 4.0)),
            };
            let x = make(1, &[2, 3, 4, 5]);
            for axes in [&[0usize, 1, 2, 3][..], &[3, 2, 1, 0], &[1, 3, 0, 2], &[2, 0, 1, 3]] {
                same(&format!("permute {dtype} {axes:?} {det:?}"), cuda, cpu, &[&x], Tol::Bits, |b, ids| b.permute(ids[0], axes));
            }
            let y = make(2, &[6, 7]);
            same(&format!("permute 2-D {dtype}"), cuda, cpu, &[&y], Tol::Bits, |b, ids| b.permute(ids[0], &[1, 0]));
            same(&format!("permute bad {dtype}"), cuda, cpu, &[&y], Tol::Bits, |b, ids| b.permute(ids[0], &[0, 0]));
            for (axis, start, len) in [(0, 1, 1), (1, 0, 3), (2, 1, 2), (3, 4, 1), (3, 0, 0), (1, 2, 2)] {
                same(&format!("slice {dtype} {axis} {start} {len}"), cuda, cpu, &[&x], Tol::Bits, |b, ids| {
                    b.slice(ids[0], axis, start, len)
                });
            }
            for axis in 0..4 {
                let mut sb = vec![2, 3, 4, 5];
                sb[axis] = 2;
                let z = make(3, &sb);
                same(&format!("concat {dtype} axis {axis}"), cuda, cpu, &[&x, &z], Tol::Bits, |b, ids| b.concat(ids[0], ids[1], axis));
            }
            same(&format!("concat mismatch {dtype}"), cuda, cpu, &[&x, &y], Tol::Bits, |b, ids| b.concat(ids[0], ids[1], 0));
            same(&format!("reshape {dtype}"), cuda, cpu, &[&x], Tol::Bits, |b, ids| b.reshape(ids[0], &[6, 20]));
            same(&format!("reshape bad {dtype}"), cuda, cpu, &[&x], Tol::Bits, |b, ids| b.reshape(ids[0], &[7, 20]));
        }
        let f = rand_t(1, &[2, 3], 1.0);
        let i = i32t(&[2, 3], &[1; 6]);
        same("concat f32 + i32", cuda, cpu, &[&f, &i], Tol::Bits, |b, ids| b.concat(ids[0], ids[1], 0));
        let q = as_dtype(DType::Q4_0, &[2, 64], &rand_vals(4, 128, 1.0));
        same("permute q4_0", cuda, cpu, &[&q], Tol::Bits, |b, ids| b.permute(ids[0], &[1, 0]));
        same("slice q4_0", cuda, cpu, &[&q], Tol::Bits, |b, ids| b.slice(ids[0], 0, 0, 1));
        same("reshape q4_0", cuda, cpu, &[&q], Tol::Bits, |b, ids| b.reshape(ids[0], &[4, 32]));
        same("reshape q4_0 misaligned", cuda, cpu, &[&q], Tol::Bits, |b, ids| b.reshape(ids[0], &[8, 16]));
    });
}

#[test]
fn append_grows_in_place_and_matches_cpu() {
    each_mode(false, |det, cuda, cpu| {
        for dtype in [DType::F32, DType::F16, DType::I32] {
            let make = |seed: u64, rows: usize| match dtype {
                DType::I32 => i32t(&[rows, 2, 3], &(0..rows * 6).map(|i| i as i32 + seed as i32 * 100).collect::<Vec<_>>()),
                d => as_dtype(d, &[rows, 2, 3], &rand_vals(seed, rows * 6, 2.0)),
            };
            let mut ids = Vec::new();
            for b in [&mut *cuda as &mut dyn TensorBackend, &mut *cpu] {
                let cache = b.upload_raw(&make(0, 0)).unwrap();
                let mut caps = Vec::new();
                for step in 0..20u64 {
                    let rows = b.upload_raw(&make(step + 1, 1 + (step as usize % 2))).unwrap();
                    b.append(cache, rows).unwrap();
                    b.free(rows).unwrap();
                    caps.push(b.live_bytes());
                }
                // The cache appended to itself doubles it.
                b.append(cache, cache).unwrap();
                ids.push((cache, caps));
            }
            let (got, want) = (cuda.read_raw(ids[0].0).unwrap(), cpu.read_raw(ids[1].0).unwrap());
            assert_eq!(got, want, "append {dtype} {det:?}");
            assert_eq!(got.shape, vec![60, 2, 3]);
            // Geometric growth: the device buffer is reallocated only a logarithmic number of times.
            let caps = &ids[0].1;
            let grows = caps.windows(2).filter(|w| w[1] != w[0]).count();
            assert!(grows <= 6, "{dtype}: {grows} reallocations in 20 appends: {caps:?}");
            let errs = [(cuda.append(ids[0].0, TensorId(999)), cpu.append(ids[1].0, TensorId(999)))];
            for (g, w) in errs {
                assert_eq!(g, w);
            }
            cuda.free(ids[0].0).unwrap();
            cpu.free(ids[1].0).unwrap();
        }
        let c = rand_t(1, &[2, 3], 1.0);
        let r = rand_t(2, &[1, 4], 1.0);
        same("append shape error", cuda, cpu, &[&c, &r], Tol::Bits, |b, ids| b.append(ids[0], ids[1]).map(|_| ids[0]));
        let r16 = as_dtype(DType::F16, &[1, 3], &[1.0; 3]);
        same("append dtype error", cuda, cpu, &[&c, &r16], Tol::Bits, |b, ids| b.append(ids[0], ids[1]).map(|_| ids[0]));
        let q = as_dtype(DType::Q8_0, &[1, 32], &[1.0; 32]);
        same("append quantized", cuda, cpu, &[&q, &q], Tol::Bits, |b, ids| b.append(ids[0], ids[1]).map(|_| ids[0]));
    });
}

#[test]
fn gather_rows_matches_cpu() {
    each_mode(false, |det, cuda, cpu| {
        let ids = i32t(&[2, 3], &[0, 4, 2, 4, 1, 3]);
        for dtype in [DType::F32, DType::F16, DType::Q8_0, DType::Q4_0, DType::Q4_1] {
            let table = as_dtype(dtype, &[5, 64], &rand_vals(7, 320, 3.0));
            same(&format!("gather {dtype} {det:?}"), cuda, cpu, &[&table, &ids], Tol::Bits, |b, i| b.gather_rows(i[0], i[1]));
            for bad in [&[0, 5, 1][..], &[-1, 0, 9], &[3, 2, 1000]] {
                let bad_ids = i32t(&[3], bad);
                same(&format!("gather {dtype} bad {bad:?}"), cuda, cpu, &[&table, &bad_ids], Tol::Bits, |b, i| b.gather_rows(i[0], i[1]));
            }
        }
        // An empty row width still checks the ids; an empty id list gives an empty result.
        let empty = f32t(&[5, 0], vec![]);
        same("gather dim 0 bad", cuda, cpu, &[&empty, &i32t(&[2], &[0, 7])], Tol::Bits, |b, i| b.gather_rows(i[0], i[1]));
        same("gather dim 0", cuda, cpu, &[&empty, &i32t(&[2], &[0, 4])], Tol::Bits, |b, i| b.gather_rows(i[0], i[1]));
        let table = rand_t(1, &[5, 4], 1.0);
        same("gather no ids", cuda, cpu, &[&table, &i32t(&[0], &[])], Tol::Bits, |b, i| b.gather_rows(i[0], i[1]));
        same("gather f32 ids", cuda, cpu, &[&table, &table], Tol::Bits, |b, i| b.gather_rows(i[0], i[1]));
        same("gather i32 table", cuda, cpu, &[&ids, &ids], Tol::Bits, |b, i| b.gather_rows(i[0], i[1]));
        same("gather 3-D table", cuda, cpu, &[&rand_t(1, &[2, 2, 2], 1.0), &ids], Tol::Bits, |b, i| b.gather_rows(i[0], i[1]));
    });
}

#[test]
fn rope_matches_cpu_bit_for_bit() {
    each_mode(false, |det, cuda, cpu| {
        for (shape, pos0) in [(&[3usize, 2, 8][..], 0u32), (&[2, 5, 3, 16], 7), (&[1, 1, 64], 100_000), (&[2, 0, 4], 1)] {
            let x = rand_t(5, shape, 2.0);
            for mode in [RopeMode::Interleaved, RopeMode::Neox] {
                let what = format!("rope {shape:?} {pos0} {mode:?} {det:?}");
                same(&what, cuda, cpu, &[&x], Tol::Bits, |b, ids| b.rope(ids[0], pos0, 10000.0, mode));
            }
        }
        same("rope odd dim", cuda, cpu, &[&rand_t(1, &[2, 2, 3], 1.0)], Tol::Bits, |b, ids| b.rope(ids[0], 0, 10000.0, RopeMode::Neox));
    });
}

#[test]
fn attention_matches_cpu() {
    each_mode(false, |det, cuda, cpu| {
        // (q shape, kv shape, pos0): GQA, a cache longer than the causal limit, none visible,
        // and more keys (300) and wider heads (260) than one 256-thread block covers.
        let cases: &[(&[usize], &[usize], u32)] = &[
            (&[3, 4, 8], &[3, 2, 8], 0),
            (&[2, 4, 8], &[9, 2, 8], 5),
            (&[2, 2, 3, 16], &[2, 6, 1, 16], 3),
            (&[1, 2, 4], &[4, 2, 4], 100),
            (&[2, 2, 4], &[0, 2, 4], 0),
            (&[2, 1, 260], &[300, 1, 260], 298),
            (&[1, 0, 4], &[3, 1, 4], 0),
        ];
        for (i, &(sq, skv, pos0)) in cases.iter().enumerate() {
            let q = rand_t(90 + i as u64, sq, 1.0);
            let k = rand_t(190 + i as u64, skv, 1.0);
            let v = rand_t(290 + i as u64, skv, 1.0);
            let what = format!("attention q{sq:?} kv{skv:?} pos0 {pos0} {det:?}");
            let scale = 1.0 / (*sq.last().unwrap() as f32).sqrt().max(1.0);
            same(&what, cuda, cpu, &[&q, &k, &v], repro_or(det, NEAR), |b, ids| b.attention(ids[0], ids[1], ids[2], pos0, scale));
        }
        let (q, k) = (rand_t(1, &[2, 3, 8], 1.0), rand_t(2, &[2, 2, 8], 1.0));
        same("attention heads", cuda, cpu, &[&q, &k, &k], Tol::Bits, |b, ids| b.attention(ids[0], ids[1], ids[2], 0, 1.0));
    });
}

#[test]
fn misuse_gives_the_cpu_errors_and_leaves_the_backend_healthy() {
    let Some(mut cuda) = emu(Determinism::Reproducible, false) else { return };
    let mut cpu = CpuBackend::new(Determinism::Reproducible);
    for b in [&mut cuda as &mut dyn TensorBackend, &mut cpu] {
        assert_eq!(b.upload(&HostTensor { shape: vec![2, 2], data: vec![1.0] }).unwrap_err().to_string(), {
            HostTensor::new(vec![2, 2], vec![1.0]).unwrap_err().to_string()
        });
        assert!(b.upload(&HostTensor { shape: vec![1, 1, 1, 1, 1], data: vec![1.0] }).is_err());
        assert!(b.upload(&HostTensor { shape: vec![], data: vec![1.0] }).is_err());
        let raw = RawTensor { dtype: DType::Q8_0, shape: vec![2, 32], bytes: vec![0; 67] };
        assert!(matches!(b.upload_raw(&raw), Err(GpuError::ShapeMismatch { .. })));
        let raw = RawTensor { dtype: DType::Q8_0, shape: vec![2, 31], bytes: vec![0; 68] };
        assert!(matches!(b.upload_raw(&raw), Err(GpuError::DType { .. })));
        let bogus = TensorId(987_654);
        assert_eq!(b.read(bogus), Err(GpuError::UnknownTensor(bogus)));
        assert_eq!(b.relu(bogus), Err(GpuError::UnknownTensor(bogus)));
        assert_eq!(b.free(bogus), Err(GpuError::UnknownTensor(bogus)));
        let a = b.upload(&HostTensor::new(vec![3, 5], vec![0.5; 15]).unwrap()).unwrap();
        let c = b.upload(&HostTensor::new(vec![4, 7], vec![1.0; 28]).unwrap()).unwrap();
        b.free(c).unwrap();
        assert_eq!(b.free(c), Err(GpuError::UnknownTensor(c)));
        assert_eq!(b.add(a, c), Err(GpuError::UnknownTensor(c)));
        assert_eq!(b.argmax_last_checked(a), Ok(vec![0.0; 3]));
        let r = b.scale(a, 2.0).unwrap();
        assert!(r.0 > c.0, "ids are never reused");
        assert_eq!(b.read(r).unwrap().data, vec![1.0; 15]);
    }
    let (e1, e2) = (cuda.live_bytes(), cpu.live_bytes());
    assert!(e1 >= e2, "cuda holds at least the cpu's bytes ({e1} vs {e2})");
}

trait ArgmaxChecked {
    fn argmax_last_checked(&mut self, x: TensorId) -> Result<Vec<f32>>;
}

impl ArgmaxChecked for dyn TensorBackend + '_ {
    fn argmax_last_checked(&mut self, x: TensorId) -> Result<Vec<f32>> {
        let id = self.reduce_last(ReduceOp::Argmax, x)?;
        assert_eq!(self.dtype(id)?, DType::I32);
        let v = self.read(id)?.data;
        self.free(id)?;
        Ok(v)
    }
}

#[test]
fn batches_and_chained_ops_stay_on_the_device() {
    each_mode(true, |det, cuda, cpu| {
        let x = rand_t(5, &[6, 10], 1.0);
        let w = rand_t(6, &[10, 8], 1.0);
        let tol = repro_or(det, Tol::Near { abs: 1e-5, rel: 1e-4 });
        same(&format!("chain {det:?}"), cuda, cpu, &[&x, &w], tol, |b, ids| {
            b.begin_batch();
            let h = b.matmul(ids[0], ids[1], false, false)?;
            let g = b.gelu(h)?;
            let s = b.softmax_last(g)?;
            let t = b.sum_last(s)?;
            for id in [h, g, s] {
                b.free(id)?;
            }
            b.end_batch()?;
            Ok(t)
        });
    });
}

//! The portable exp / tanh / silu / gelu of reproducible mode: bitwise equal everywhere, and accurate.

use super::*;
use ao_gpu_worker::gpu::TensorOps;

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

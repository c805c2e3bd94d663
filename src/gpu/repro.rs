//! Portable math shared bit for bit with `shaders/` and `kernels/`: the `exp` of softmax and the
//! transcendental functions of the elementwise ops in reproducible mode.
//!
//! Determinism: each kernel declares a [`super::KernelClass`] in [`super::kernels`]. In [`super::Determinism::Reproducible`]
//! mode every op gives bitwise-identical f32 results on the CPU, wgpu and CUDA backends, and so does a
//! whole model: matmul, reductions, softmax and norms sum in a fixed order (each output summed
//! sequentially in index order, `acc = acc + a * b` with no fused multiply-add), softmax uses a
//! portable `exp` ([`repro_exp`]), and the elementwise exp, tanh, silu and gelu are the portable
//! [`repro_exp_full`], [`repro_tanh`], [`repro_silu`] and [`repro_gelu`] (within 1.4, 2.0, 4.1 and
//! 3.9 ULP of f64; subnormal results flush to zero on every device). All are built from IEEE +, -, *
//! in one order that the WGSL and CUDA kernels mirror with the constants as bits (the WGSL guards the
//! spots where its compiler's algebraic rewrites would change a result). This assumes no FMA
//! contraction, IEEE-correct division and square root on the device where an op uses them (the norms
//! and softmax do, the portable elementwise functions do not; true for lavapipe and x86, while Vulkan
//! allows 2.5 ULP), and, outside those elementwise functions, inputs/intermediates that stay out of
//! the subnormal range (GPUs may flush subnormals to zero). Fast mode uses each device's own `exp` and
//! `tanh` and faster orders: results agree within a tolerance only.

// ---- portable math shared bit-for-bit with shaders/ ----

/// `exp` built only from IEEE +, -, * and exact power-of-two scaling, evaluated in the same order as
/// `repro_exp` in `shaders/reduce.wgsl`, so the CPU and every wgpu device agree bitwise (given no FMA
/// contraction). Accuracy is a few ULP. Results below `e^-86` flush to 0 (they would be near the
/// subnormal range, which GPUs may flush anyway); above `88.7` gives +inf; NaN gives NaN.
#[inline]
pub fn repro_exp(x: f32) -> f32 {
    if x.is_nan() {
        return x;
    }
    if x > 88.72 {
        return f32::INFINITY;
    }
    if x < -86.0 {
        return 0.0;
    }
    // The constants are given as bits so the CPU and WGSL use exactly the same f32 values.
    // n = round(x / ln 2), r = x - n ln 2 (Cody-Waite split: n * LN2_HI is exact for |n| < 2^9).
    let n = (x * f32::from_bits(0x3fb8_aa3b) + 0.5).floor();
    let r = (x - n * f32::from_bits(0x3f31_7200)) - n * f32::from_bits(0x35bf_be8e);
    // Degree-6 Taylor polynomial in Horner form (1/720, 1/120, 1/24, 1/6, 1/2, 1, 1); |r| <= 0.35.
    let mut p = f32::from_bits(0x3ab6_0b61);
    p = p * r + f32::from_bits(0x3c08_8889);
    p = p * r + f32::from_bits(0x3d2a_aaab);
    p = p * r + f32::from_bits(0x3e2a_aaab);
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    // 2^n as an exact f32 built from its bits: n is in -125..=128 here.
    let n = n as i32;
    if n > 127 {
        return p * f32::from_bits(254 << 23) * 2.0;
    }
    p * f32::from_bits(((n + 127) as u32) << 23)
}

// ---- portable transcendental functions of the elementwise ops, shared bit-for-bit with
// shaders/elementwise.wgsl and kernels/elementwise.cu ----
//
// Reproducible mode computes exp, tanh, silu and gelu with these functions: IEEE +, -, * only (no
// division, no built-in transcendental), power-of-two scaling built from bits, NaN and subnormal
// tests on the bits, one fixed order of operations, constants given as bits. The WGSL and CUDA
// copies mirror them operation for operation, so every backend gives the same bits (without FMA
// contraction). Subnormal inputs count as signed zeros and subnormal results flush to signed zero,
// so devices that flush subnormals agree with those that do not. Largest error against f64 over
// every f32 input (every normal result, both signs): exp 1.33 ULP, tanh 2.00 ULP, silu 4.01 ULP,
// gelu 3.83 ULP (all below 3e-7 relative).

/// `2^n` for `n` in -126..=127, built from its bits.
#[inline]
fn pow2(n: i32) -> f32 {
    f32::from_bits(((n + 127) as u32) << 23)
}

/// `v * 2^n` for `n` in -252..=254 in at most two steps, each exact unless its result overflows or
/// is subnormal (which the callers flush).
#[inline]
fn scale_pow2(v: f32, n: i32) -> f32 {
    if n > 127 {
        v * pow2(127) * pow2(n - 127)
    } else if n < -126 {
        v * pow2(-126) * pow2(n + 126)
    } else {
        v * pow2(n)
    }
}

/// `v`, or the zero with sign bit `sign` where `v` is subnormal (or zero).
#[inline]
fn flush_subnormal(v: f32, sign: u32) -> f32 {
    if v.to_bits() & 0x7f80_0000 == 0 { f32::from_bits(sign) } else { v }
}

/// `e^(hi + lo) = p * 2^n` for `|hi| <= 110` and `|lo|` a few ULP of `hi` at most: `n = round(hi / ln 2)`,
/// `r = hi - n ln 2 + lo` (Cody-Waite: `n * LN2_HI` is exact for `|n| < 2^9`), `p` a degree-6
/// polynomial in `r` (1, 1, 1/2 and a minimax fit of the rest on |r| <= 0.35; error 2e-9).
#[inline]
fn exp_parts(hi: f32, lo: f32) -> (f32, i32) {
    let n = (hi * f32::from_bits(0x3fb8_aa3b) + 0.5).floor();
    let r = ((hi - n * f32::from_bits(0x3f31_7200)) - n * f32::from_bits(0x35bf_be8e)) + lo;
    let mut p = f32::from_bits(0x3ab6_7172);
    p = p * r + f32::from_bits(0x3c08_eea1);
    p = p * r + f32::from_bits(0x3d2a_aa9e);
    p = p * r + f32::from_bits(0x3e2a_aa92);
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    (p, n as i32)
}

/// `1 / d` for `d` in [1, 2] without a division (Vulkan allows 2.5 ULP for one): three Newton steps
/// from the linear minimax start `24/17 - 8/17 d` (relative error 1/17, then 3e-3, 1e-5, 1e-10
/// before rounding; about 1.5 ULP after).
#[inline]
fn recip_1_2(d: f32) -> f32 {
    let mut r = f32::from_bits(0x3fb4_b4b5) - f32::from_bits(0x3ef0_f0f1) * d;
    r = r + r * (1.0 - d * r);
    r = r + r * (1.0 - d * r);
    r = r + r * (1.0 - d * r);
    r
}

// Error-free transformations for gelu's argument. The WGSL copy guards them (and a few other
// spots) against its compiler, which may rewrite float expressions by the rules of real arithmetic
// and so cancel the very rounding errors they capture (see `opaque` in shaders/elementwise.wgsl);
// the guard returns its argument bit for bit, so here and in CUDA (whose intrinsics are never
// rewritten) it is left out.

/// `a = hi + lo` exactly with `hi` the leading 12 significant bits of `a` (the low 12 mantissa bits
/// cleared) and `lo` at most 12 bits more.
#[inline]
fn split(a: f32) -> (f32, f32) {
    let hi = f32::from_bits(a.to_bits() & 0xffff_f000);
    (hi, a - hi)
}

/// `a * b = p + e` exactly (Dekker's product: the products of halves are exact, so an FMA
/// contraction would not change them either), for products far from under/overflow.
#[inline]
fn two_prod(a: f32, b: f32) -> (f32, f32) {
    let p = a * b;
    let (ah, al) = split(a);
    let (bh, bl) = split(b);
    (p, ((ah * bh - p) + ah * bl + al * bh) + al * bl)
}

/// `a + b = s + e` exactly (Dekker's fast two-sum, the operands ordered by magnitude).
#[inline]
fn two_sum(a: f32, b: f32) -> (f32, f32) {
    let (big, small) = if a.abs() < b.abs() { (b, a) } else { (a, b) };
    let s = big + small;
    (s, small - (s - big))
}

/// `exp` over the whole f32 range: [`repro_exp`]'s method with a more accurate polynomial, every
/// normal result (x from -87.34 to 88.72) within 1.4 ULP; subnormal results flush to +0, above
/// `ln(f32::MAX)` gives +inf, subnormal inputs give 1, NaN gives NaN (the same bits).
#[inline]
pub fn repro_exp_full(x: f32) -> f32 {
    let bits = x.to_bits();
    if bits & 0x7fff_ffff > 0x7f80_0000 {
        return x;
    }
    if bits & 0x7f80_0000 == 0 {
        return 1.0;
    }
    if x > 88.75 {
        return f32::INFINITY;
    }
    if x < -87.5 {
        return 0.0;
    }
    let (p, n) = exp_parts(x, 0.0);
    flush_subnormal(scale_pow2(p, n), 0)
}

/// `tanh` within 2.0 ULP: `x` itself below 2^-12 (subnormals flush to signed zero), an odd minimax
/// polynomial below 0.5625, `1 - 2e / (1 + e)` with `e = e^(-2|x|)` up to 9.5, then +-1; odd
/// (the sign is restored from the bits); NaN gives NaN (the same bits).
#[inline]
pub fn repro_tanh(x: f32) -> f32 {
    let bits = x.to_bits();
    let sign = bits & 0x8000_0000;
    let abs_bits = bits & 0x7fff_ffff;
    if abs_bits > 0x7f80_0000 {
        return x;
    }
    // Below 2^-12 the x^3 / 3 term is under half an ULP.
    if abs_bits < 0x3980_0000 {
        return flush_subnormal(x, sign);
    }
    let a = f32::from_bits(abs_bits);
    let t = if a < 0.5625 {
        // tanh(a) = a + a z P(z), z = a^2, P a minimax fit on z <= 0.5625^2 (relative error 5e-9).
        let z = a * a;
        let mut p = f32::from_bits(0xbbd5_d478);
        p = p * z + f32::from_bits(0x3cae_307c);
        p = p * z + f32::from_bits(0xbd5c_c816);
        p = p * z + f32::from_bits(0x3e08_87da);
        p = p * z + f32::from_bits(0xbeaa_aaaa);
        a + a * (z * p)
    } else if a < 9.5 {
        let (p, n) = exp_parts(-2.0 * a, 0.0);
        let e = p * pow2(n);
        1.0 - (e + e) * recip_1_2(1.0 + e)
    } else {
        // tanh rounds to 1 above 9.01.
        1.0
    };
    f32::from_bits(t.to_bits() | sign)
}

/// `x * sigmoid(y) = x / (1 + e^-y)` for `y = hi + lo`, `x` normal with `|x| < 2^15` wherever
/// `hi < 0` (a subnormal result flushes to zero with the sign of `x`).
#[inline]
fn mul_sigmoid(x: f32, hi: f32, lo: f32) -> f32 {
    let sign = x.to_bits() & 0x8000_0000;
    if hi >= 0.0 {
        // x / (1 + e^-y) = x (1 - e^-y + ...) rounds to x: e^-18 is below 2^-25.
        if hi > 18.0 {
            return x;
        }
        let (p, n) = exp_parts(-hi, -lo);
        return flush_subnormal(x * recip_1_2(1.0 + p * pow2(n)), sign);
    }
    // |x| e^y < 2^-126 below y = -100 for every |x| < 2^15.
    if hi < -100.0 {
        return f32::from_bits(sign);
    }
    // x e^y / (1 + e^y) with e^y = p 2^n: scaled by 2^n last, so e^y may be far below the normal range.
    let (p, n) = exp_parts(hi, lo);
    let mut q = x * p;
    if hi >= -18.0 {
        q *= recip_1_2(1.0 + p * pow2(n));
    }
    flush_subnormal(scale_pow2(q, n), sign)
}

/// `silu(x) = x / (1 + e^-x)` within 4.1 ULP (through `x e^x / (1 + e^x)` below 0, so the tail down to
/// the subnormal range near -92 keeps its accuracy); NaN gives NaN (the same bits), +inf gives +inf,
/// -inf gives -0, subnormal results flush to signed zero.
#[inline]
pub fn repro_silu(x: f32) -> f32 {
    let bits = x.to_bits();
    if bits & 0x7fff_ffff > 0x7f80_0000 {
        return x;
    }
    if bits & 0x7f80_0000 == 0 {
        return f32::from_bits(bits & 0x8000_0000);
    }
    mul_sigmoid(x, x, 0.0)
}

/// The tanh approximation of gelu, `0.5 x (1 + tanh(u))` with `u = sqrt(2/pi) (x + 0.044715 x^3)`,
/// computed as `x * sigmoid(2u)` (the same function, without the cancellation of `1 + tanh(u)` for
/// negative x) within 3.9 ULP of that formula evaluated in f64 with the exact constants. Below
/// -1/64 the result is as sensitive to `2u` as `e^(2u)` is, so `2u` is computed in double-f32 (Dekker
/// products, constants as a high and a low f32). NaN gives NaN (the same bits), +inf gives +inf,
/// -inf gives -0, subnormal results flush to signed zero.
#[inline]
pub fn repro_gelu(x: f32) -> f32 {
    let bits = x.to_bits();
    if bits & 0x7fff_ffff > 0x7f80_0000 {
        return x;
    }
    if bits & 0x7f80_0000 == 0 {
        return f32::from_bits(bits & 0x8000_0000);
    }
    // 2 sqrt(2/pi) and 0.044715, each as a high f32 and the f32 nearest the rest.
    let (k_hi, k_lo) = (f32::from_bits(0x3fcc_422a), f32::from_bits(0xb342_bc9b));
    let (c_hi, c_lo) = (f32::from_bits(0x3d37_2713), f32::from_bits(0x30d4_801f));
    if x >= -0.015625 {
        return mul_sigmoid(x, k_hi * (x + c_hi * (x * x * x)), 0.0);
    }
    // gelu(-11) is far below the normal range (and the Dekker splits stay far from overflow).
    if x < -11.0 {
        return -0.0;
    }
    let (s, s_lo) = two_prod(x, x);
    let (t, t_lo) = two_prod(s, x);
    let t_lo = t_lo + s_lo * x;
    let (u, u_lo) = two_prod(c_hi, t);
    let u_lo = u_lo + (c_hi * t_lo + c_lo * t);
    let (v, v_lo) = two_sum(x, u);
    let v_lo = v_lo + u_lo;
    let (y, y_lo) = two_prod(k_hi, v);
    mul_sigmoid(x, y, y_lo + (k_hi * v_lo + k_lo * v))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// |got - want| in units of the last place of the f32 nearest `want` (a normal number).
    fn ulps(got: f32, want: f64) -> f64 {
        let e = ((want as f32).abs().to_bits() >> 23) as i32 - 127;
        (got as f64 - want).abs() / 2f64.powi(e - 23)
    }

    #[test]
    fn error_free_transformations_are_exact() {
        let mut rng = fastrand::Rng::with_seed(5);
        for _ in 0..10_000 {
            let (a, b) = ((rng.f32() - 0.5) * 50.0, (rng.f32() - 0.5) * 3000.0);
            let (p, e) = two_prod(a, b);
            assert_eq!(p as f64 + e as f64, a as f64 * b as f64, "{a} * {b}");
            let (s, e) = two_sum(a, b);
            assert_eq!(s as f64 + e as f64, a as f64 + b as f64, "{a} + {b}");
            let (hi, lo) = split(b);
            assert_eq!((hi + lo, hi.to_bits() & 0xfff), (b, 0));
        }
        for i in 0..=1000 {
            let d = 1.0 + i as f32 / 1000.0;
            assert!(ulps(recip_1_2(d), 1.0 / d as f64) <= 1.5, "1 / {d}: {}", recip_1_2(d));
        }
    }

    #[test]
    fn portable_elementwise_functions_at_the_edges() {
        let gelu64 = |x: f64| 0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x)).tanh());
        for x in [0.1f32, 0.5, 1.0, 2.5, 7.0] {
            assert!(ulps(repro_exp_full(x), (x as f64).exp()) <= 1.5, "exp {x}");
            assert!(ulps(repro_exp_full(-x), (-x as f64).exp()) <= 1.5, "exp -{x}");
            assert!(ulps(repro_tanh(x), (x as f64).tanh()) <= 2.0, "tanh {x}");
            assert!(ulps(repro_silu(x), x as f64 / (1.0 + (-x as f64).exp())) <= 4.0, "silu {x}");
            assert!(ulps(repro_gelu(x), gelu64(x as f64)) <= 4.0, "gelu {x}");
            // tanh is odd through the sign bit: exactly antisymmetric.
            assert_eq!(repro_tanh(-x).to_bits(), (-repro_tanh(x)).to_bits());
        }
        assert!(ulps(repro_gelu(-1.5), gelu64(-1.5)) <= 4.0);
        // NaN keeps its bits; zeros and subnormals give signed zeros (exp: 1); infinities the limits.
        let nan = f32::from_bits(0xffc0_1234);
        for f in [repro_exp_full, repro_tanh, repro_silu, repro_gelu] {
            assert_eq!(f(nan).to_bits(), nan.to_bits());
        }
        for f in [repro_tanh, repro_silu, repro_gelu] {
            for (x, z) in [(0.0f32, 0.0f32), (-0.0, -0.0), (1e-40, 0.0), (-1e-40, -0.0)] {
                assert_eq!(f(x).to_bits(), z.to_bits(), "{x:e}");
            }
        }
        assert_eq!((repro_exp_full(1e-40), repro_exp_full(-0.0)), (1.0, 1.0));
        assert_eq!((repro_exp_full(f32::INFINITY), repro_exp_full(f32::NEG_INFINITY)), (f32::INFINITY, 0.0));
        assert_eq!((repro_tanh(f32::INFINITY), repro_tanh(f32::NEG_INFINITY), repro_tanh(10.0)), (1.0, -1.0, 1.0));
        assert_eq!((repro_silu(f32::INFINITY), repro_gelu(f32::INFINITY)), (f32::INFINITY, f32::INFINITY));
        assert_eq!(repro_silu(f32::NEG_INFINITY).to_bits(), (-0.0f32).to_bits());
        assert_eq!(repro_gelu(f32::NEG_INFINITY).to_bits(), (-0.0f32).to_bits());
        // Overflow at ln(f32::MAX) = 88.7228; results below 2^-126 (e^-87.34) flush to zero.
        assert!(repro_exp_full(88.722_8).is_finite() && repro_exp_full(88.723).is_infinite());
        assert!(repro_exp_full(-87.3) >= f32::MIN_POSITIVE && repro_exp_full(-87.4) == 0.0);
        // silu keeps its accuracy down to the subnormal range (-91 e^-91 is 2.7e-38), then gives -0.
        assert!(ulps(repro_silu(-91.0), -91.0 * (-91.0f64).exp() / (1.0 + (-91.0f64).exp())) <= 4.0);
        assert_eq!(repro_silu(-93.0).to_bits(), (-0.0f32).to_bits());
        // gelu's left tail: x sigmoid(2u) without the cancellation of 1 + tanh(u).
        let tail = |x: f64| x / (1.0 + (-2.0 * (2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x)).exp());
        assert!(ulps(repro_gelu(-6.0), tail(-6.0)) <= 4.0, "{:e} vs {:e}", repro_gelu(-6.0), tail(-6.0));
        assert_eq!(repro_gelu(-10.5).to_bits(), (-0.0f32).to_bits());
    }

    #[test]
    fn repro_exp_is_close_to_exp() {
        let mut x = -86.0f32;
        while x < 88.0 {
            let (got, want) = (repro_exp(x) as f64, (x as f64).exp());
            assert!(((got - want) / want).abs() < 4e-7, "x={x}: {got} vs {want}");
            x += 0.173;
        }
        // The top of the range, where n = round(x / ln 2) reaches 128.
        for x in [88.3f32, 88.4, 88.5, 88.7] {
            let (got, want) = (repro_exp(x) as f64, (x as f64).exp());
            assert!(((got - want) / want).abs() < 4e-7, "x={x}: {got} vs {want}");
        }
        assert_eq!(repro_exp(0.0), 1.0);
        assert_eq!(repro_exp(-100.0), 0.0);
        assert_eq!(repro_exp(100.0), f32::INFINITY);
        assert_eq!(repro_exp(f32::NEG_INFINITY), 0.0);
        assert!(repro_exp(f32::NAN).is_nan());
    }
}

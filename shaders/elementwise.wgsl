// Elementwise f32 kernels. Binary ops broadcast numpy-style through per-operand strides over a 4-D
// index space (0 on broadcast axes). One invocation per output element, 256 per workgroup, on a 2-D
// grid of workgroups (x up to 65535) so large tensors fit the dispatch limits.
//
// gelu / silu / tanh_op / exp_op use the device's built-in functions (fast mode); gelu_repro /
// silu_repro / tanh_repro / exp_repro (reproducible mode) use the portable functions at the end of
// this file, which equal the CPU backend bit for bit.

struct BinaryParams {
    n: u32,
    d1: u32,
    d2: u32,
    d3: u32,
    as0: u32,
    as1: u32,
    as2: u32,
    as3: u32,
    bs0: u32,
    bs1: u32,
    bs2: u32,
    bs3: u32,
}

struct UnaryParams {
    n: u32,
    factor: f32,
    // 0; read by `opaque` (reproducible mode).
    zero: u32,
}

@group(0) @binding(0) var<uniform> bp: BinaryParams;
@group(0) @binding(0) var<uniform> up: UnaryParams;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

fn flat(wg: vec3<u32>, nwg: vec3<u32>, lid: vec3<u32>) -> u32 {
    return (wg.y * nwg.x + wg.x) * 256u + lid.x;
}

// The elements of a and b that output i reads.
fn operands(i: u32) -> vec2<f32> {
    let i3 = i % bp.d3;
    var t = i / bp.d3;
    let i2 = t % bp.d2;
    t = t / bp.d2;
    let i1 = t % bp.d1;
    let i0 = t / bp.d1;
    let ia = i0 * bp.as0 + i1 * bp.as1 + i2 * bp.as2 + i3 * bp.as3;
    let ib = i0 * bp.bs0 + i1 * bp.bs1 + i2 * bp.bs2 + i3 * bp.bs3;
    return vec2<f32>(a[ia], b[ib]);
}

@compute @workgroup_size(256)
fn add(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = flat(wg, nwg, lid);
    if i < bp.n {
        let v = operands(i);
        out[i] = v.x + v.y;
    }
}

@compute @workgroup_size(256)
fn sub(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = flat(wg, nwg, lid);
    if i < bp.n {
        let v = operands(i);
        out[i] = v.x - v.y;
    }
}

@compute @workgroup_size(256)
fn mul(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = flat(wg, nwg, lid);
    if i < bp.n {
        let v = operands(i);
        out[i] = v.x * v.y;
    }
}

@compute @workgroup_size(256)
fn div(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = flat(wg, nwg, lid);
    if i < bp.n {
        let v = operands(i);
        out[i] = v.x / v.y;
    }
}

@compute @workgroup_size(256)
fn scale(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = flat(wg, nwg, lid);
    if i < up.n {
        out[i] = a[i] * up.factor;
    }
}

// NaN and -0.0 map to 0.0, as in the CPU reference.
@compute @workgroup_size(256)
fn relu(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = flat(wg, nwg, lid);
    if i < up.n {
        let x = a[i];
        out[i] = select(0.0, x, x > 0.0);
    }
}

// The tanh approximation: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).
@compute @workgroup_size(256)
fn gelu(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = flat(wg, nwg, lid);
    if i < up.n {
        let x = a[i];
        out[i] = 0.5 * x * (1.0 + tanh(0.7978846 * (x + 0.044715 * x * x * x)));
    }
}

@compute @workgroup_size(256)
fn silu(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = flat(wg, nwg, lid);
    if i < up.n {
        let x = a[i];
        out[i] = x / (1.0 + exp(-x));
    }
}

@compute @workgroup_size(256)
fn tanh_op(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = flat(wg, nwg, lid);
    if i < up.n {
        out[i] = tanh(a[i]);
    }
}

@compute @workgroup_size(256)
fn exp_op(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = flat(wg, nwg, lid);
    if i < up.n {
        out[i] = exp(a[i]);
    }
}

// ---- reproducible mode: portable exp, tanh, silu and gelu ----
//
// These mirror `repro_exp_full`, `repro_tanh`, `repro_silu`, `repro_gelu` and their helpers in
// src/gpu/repro.rs operation for operation: IEEE +, -, * only (no division, no built-ins but floor
// and abs), constants as bits, NaN and subnormal tests on the bits (a float compare like `v != v`
// may be folded away), subnormal results flushed to signed zero.
//
// The shader compiler may rewrite float expressions by the rules of real arithmetic (lavapipe's
// NIR does: it moves a constant factor into a product chain, `c * ((x * x) * x)` becoming
// `((c * x) * x) * x`, and cancels the error term of Knuth's two-sum to 0). `opaque` stops that:
// it returns its argument bit for bit (`up.zero` is 0), but through an integer OR with a value
// known only at run time, so no rewrite reaches across it. It stands where such a rewrite would
// change the result; the Rust and CUDA copies need no such guard.

fn opaque(v: f32) -> f32 {
    return bitcast<f32>(bitcast<u32>(v) | up.zero);
}

fn pow2(n: i32) -> f32 {
    return bitcast<f32>(u32(n + 127) << 23u);
}

fn scale_pow2(v: f32, n: i32) -> f32 {
    if n > 127 {
        return v * pow2(127) * pow2(n - 127);
    }
    if n < -126 {
        return v * pow2(-126) * pow2(n + 126);
    }
    return v * pow2(n);
}

fn flush_subnormal(v: f32, sign: u32) -> f32 {
    if (bitcast<u32>(v) & 0x7f800000u) == 0u {
        return bitcast<f32>(sign);
    }
    return v;
}

// e^(hi + lo) = p * 2^n.
struct ExpParts {
    p: f32,
    n: i32,
}

fn exp_parts(hi: f32, lo: f32) -> ExpParts {
    let n = floor(hi * bitcast<f32>(0x3fb8aa3bu) + 0.5);
    let r = ((hi - n * bitcast<f32>(0x3f317200u)) - n * bitcast<f32>(0x35bfbe8eu)) + lo;
    var p = bitcast<f32>(0x3ab67172u);
    p = p * r + bitcast<f32>(0x3c08eea1u);
    p = p * r + bitcast<f32>(0x3d2aaa9eu);
    p = p * r + bitcast<f32>(0x3e2aaa92u);
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    return ExpParts(p, i32(n));
}

// 1 / d for d in [1, 2], no division.
fn recip_1_2(d: f32) -> f32 {
    var r = bitcast<f32>(0x3fb4b4b5u) - bitcast<f32>(0x3ef0f0f1u) * d;
    r = r + r * (1.0 - d * r);
    r = r + r * (1.0 - d * r);
    r = r + r * (1.0 - d * r);
    return r;
}

// a = hi + lo exactly, hi the leading 12 significant bits.
fn split(a: f32) -> vec2<f32> {
    let hi = bitcast<f32>(bitcast<u32>(a) & 0xfffff000u);
    return vec2<f32>(hi, opaque(a - hi));
}

// a * b = p + e exactly.
fn two_prod(a: f32, b: f32) -> vec2<f32> {
    let p = opaque(a * b);
    let sa = split(a);
    let sb = split(b);
    return vec2<f32>(p, ((sa.x * sb.x - p) + sa.x * sb.y + sa.y * sb.x) + sa.y * sb.y);
}

// a + b = s + e exactly (fast two-sum on the operands ordered by magnitude).
fn two_sum(a: f32, b: f32) -> vec2<f32> {
    let swap = abs(a) < abs(b);
    let big = select(a, b, swap);
    let small = select(b, a, swap);
    let s = opaque(big + small);
    return vec2<f32>(s, small - opaque(s - big));
}

fn repro_exp_full(x: f32) -> f32 {
    let bits = bitcast<u32>(x);
    if (bits & 0x7fffffffu) > 0x7f800000u {
        return x;
    }
    if (bits & 0x7f800000u) == 0u {
        return 1.0;
    }
    if x > 88.75 {
        return bitcast<f32>(0x7f800000u);
    }
    if x < -87.5 {
        return 0.0;
    }
    let e = exp_parts(x, 0.0);
    return flush_subnormal(scale_pow2(e.p, e.n), 0u);
}

fn repro_tanh(x: f32) -> f32 {
    let bits = bitcast<u32>(x);
    let sign = bits & 0x80000000u;
    let abs_bits = bits & 0x7fffffffu;
    if abs_bits > 0x7f800000u {
        return x;
    }
    if abs_bits < 0x39800000u {
        return flush_subnormal(x, sign);
    }
    let a = bitcast<f32>(abs_bits);
    var t = 1.0;
    if a < 0.5625 {
        let z = opaque(a * a);
        var p = bitcast<f32>(0xbbd5d478u);
        p = p * z + bitcast<f32>(0x3cae307cu);
        p = p * z + bitcast<f32>(0xbd5cc816u);
        p = p * z + bitcast<f32>(0x3e0887dau);
        p = p * z + bitcast<f32>(0xbeaaaaaau);
        t = a + a * (z * p);
    } else if a < 9.5 {
        let ep = exp_parts(-2.0 * a, 0.0);
        let e = ep.p * pow2(ep.n);
        t = 1.0 - (e + e) * recip_1_2(1.0 + e);
    }
    return bitcast<f32>(bitcast<u32>(t) | sign);
}

// x * sigmoid(hi + lo).
fn mul_sigmoid(x: f32, hi: f32, lo: f32) -> f32 {
    let sign = bitcast<u32>(x) & 0x80000000u;
    if hi >= 0.0 {
        if hi > 18.0 {
            return x;
        }
        let e = exp_parts(-hi, -lo);
        return flush_subnormal(x * recip_1_2(1.0 + e.p * pow2(e.n)), sign);
    }
    if hi < -100.0 {
        return bitcast<f32>(sign);
    }
    let e = exp_parts(hi, lo);
    var q = x * e.p;
    if hi >= -18.0 {
        q = q * recip_1_2(1.0 + e.p * pow2(e.n));
    }
    return flush_subnormal(scale_pow2(q, e.n), sign);
}

fn repro_silu(x: f32) -> f32 {
    let bits = bitcast<u32>(x);
    if (bits & 0x7fffffffu) > 0x7f800000u {
        return x;
    }
    if (bits & 0x7f800000u) == 0u {
        return bitcast<f32>(bits & 0x80000000u);
    }
    return mul_sigmoid(x, x, 0.0);
}

fn repro_gelu(x: f32) -> f32 {
    let bits = bitcast<u32>(x);
    if (bits & 0x7fffffffu) > 0x7f800000u {
        return x;
    }
    if (bits & 0x7f800000u) == 0u {
        return bitcast<f32>(bits & 0x80000000u);
    }
    let k_hi = bitcast<f32>(0x3fcc422au);
    let k_lo = bitcast<f32>(0xb342bc9bu);
    let c_hi = bitcast<f32>(0x3d372713u);
    let c_lo = bitcast<f32>(0x30d4801fu);
    if x >= -0.015625 {
        let x3 = opaque(x * x * x);
        return mul_sigmoid(x, opaque(k_hi * (x + c_hi * x3)), 0.0);
    }
    if x < -11.0 {
        return bitcast<f32>(0x80000000u);
    }
    let s = two_prod(x, x);
    let t = two_prod(s.x, x);
    let t_lo = t.y + s.y * x;
    let u = two_prod(c_hi, t.x);
    let u_lo = u.y + (c_hi * t_lo + c_lo * t.x);
    let v = two_sum(x, u.x);
    let v_lo = v.y + u_lo;
    let y = two_prod(k_hi, v.x);
    return mul_sigmoid(x, y.x, y.y + (k_hi * v_lo + k_lo * v.x));
}

@compute @workgroup_size(256)
fn gelu_repro(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = flat(wg, nwg, lid);
    if i < up.n {
        out[i] = repro_gelu(a[i]);
    }
}

@compute @workgroup_size(256)
fn silu_repro(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = flat(wg, nwg, lid);
    if i < up.n {
        out[i] = repro_silu(a[i]);
    }
}

@compute @workgroup_size(256)
fn tanh_repro(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = flat(wg, nwg, lid);
    if i < up.n {
        out[i] = repro_tanh(a[i]);
    }
}

@compute @workgroup_size(256)
fn exp_repro(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = flat(wg, nwg, lid);
    if i < up.n {
        out[i] = repro_exp_full(a[i]);
    }
}

// Elementwise f32 kernels for the CUDA backend (src/gpu/cuda/), compiled at run time by NVRTC.
// The same ops and broadcasting rules as shaders/elementwise.wgsl: binary ops index each operand
// through per-operand strides over a 4-D output index space (stride 0 on broadcast axes).
// add/sub/mul/div/scale/relu use the correctly rounded __f*_rn intrinsics, so they equal the CPU
// reference bitwise whatever the compile options; gelu/silu/tanh/exp use the CUDA math library (fast
// mode) and their `_repro` variants the portable functions at the end of this file (reproducible
// mode), which equal the CPU reference bitwise too.
// Every kernel is a grid-stride loop: any grid size computes every element exactly once.

#include "common.cuh"

// Mirrors `Broadcast4` in src/gpu/cuda/launch.rs: the output is [d0, d1, d2, d3] (d0 implicit),
// operand element (i0, i1, i2, i3) is at sum(i_k * stride_k).
struct Broadcast4 {
    u32 d1, d2, d3;
    u32 a_strides[4];
    u32 b_strides[4];
};

template <int OP>
static __device__ __forceinline__ float binop(float x, float y) {
    if (OP == 0) return __fadd_rn(x, y);
    if (OP == 1) return __fsub_rn(x, y);
    if (OP == 2) return __fmul_rn(x, y);
    return __fdiv_rn(x, y);
}

template <int OP>
static __device__ __forceinline__ void binary(const float *a, const float *b, float *out, u32 n, const Broadcast4 &p) {
    GRID_STRIDE(i, n) {
        Index4 at = unravel4(i, p.d1, p.d2, p.d3);
        out[i] = binop<OP>(a[offset4(at, p.a_strides)], b[offset4(at, p.b_strides)]);
    }
}

extern "C" __global__ void add_f32(const float *a, const float *b, float *out, u32 n, Broadcast4 p) { binary<0>(a, b, out, n, p); }
extern "C" __global__ void sub_f32(const float *a, const float *b, float *out, u32 n, Broadcast4 p) { binary<1>(a, b, out, n, p); }
extern "C" __global__ void mul_f32(const float *a, const float *b, float *out, u32 n, Broadcast4 p) { binary<2>(a, b, out, n, p); }
extern "C" __global__ void div_f32(const float *a, const float *b, float *out, u32 n, Broadcast4 p) { binary<3>(a, b, out, n, p); }

// Unary ops share one signature; `factor` is only read by scale.
extern "C" __global__ void scale_f32(const float *x, float *out, u32 n, float factor) {
    GRID_STRIDE(i, n) { out[i] = __fmul_rn(x[i], factor); }
}

// NaN and -0 give +0, as `if x > 0 { x } else { 0 }` on the CPU.
extern "C" __global__ void relu_f32(const float *x, float *out, u32 n, float factor) {
    GRID_STRIDE(i, n) {
        float v = x[i];
        out[i] = v > 0.0f ? v : 0.0f;
    }
}

// The tanh approximation: 0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3))).
extern "C" __global__ void gelu_f32(const float *x, float *out, u32 n, float factor) {
    GRID_STRIDE(i, n) {
        float v = x[i];
        out[i] = 0.5f * v * (1.0f + tanhf(0.7978846f * (v + 0.044715f * v * v * v)));
    }
}

extern "C" __global__ void silu_f32(const float *x, float *out, u32 n, float factor) {
    GRID_STRIDE(i, n) {
        float v = x[i];
        out[i] = v / (1.0f + expf(-v));
    }
}

extern "C" __global__ void tanh_f32(const float *x, float *out, u32 n, float factor) {
    GRID_STRIDE(i, n) { out[i] = tanhf(x[i]); }
}

extern "C" __global__ void exp_f32(const float *x, float *out, u32 n, float factor) {
    GRID_STRIDE(i, n) { out[i] = expf(x[i]); }
}

// ---- reproducible mode: portable exp, tanh, silu and gelu ----
//
// These mirror `repro_exp_full`, `repro_tanh`, `repro_silu`, `repro_gelu` and their helpers in
// src/gpu/repro.rs operation for operation: correctly rounded +, -, * intrinsics only (never
// contracted or reassociated), constants as bits, NaN and subnormal tests on the bits, subnormal
// results flushed to signed zero. (The WGSL copy passes a few values through `opaque`, a bitwise
// identity that keeps its compiler from rewriting the float expressions around them; the
// intrinsics are never rewritten, so they need no such guard.)

static __device__ float repro_pow2(int n) { return __uint_as_float((u32)(n + 127) << 23); }

static __device__ float repro_scale_pow2(float v, int n) {
    if (n > 127) return __fmul_rn(__fmul_rn(v, repro_pow2(127)), repro_pow2(n - 127));
    if (n < -126) return __fmul_rn(__fmul_rn(v, repro_pow2(-126)), repro_pow2(n + 126));
    return __fmul_rn(v, repro_pow2(n));
}

static __device__ float repro_flush(float v, u32 sign) { return (__float_as_uint(v) & 0x7f800000u) == 0u ? __uint_as_float(sign) : v; }

// e^(hi + lo) = p * 2^n; returns p.
static __device__ float repro_exp_parts(float hi, float lo, int *n_out) {
    float n = floorf(__fadd_rn(__fmul_rn(hi, __uint_as_float(0x3fb8aa3bu)), 0.5f));
    float r = __fadd_rn(__fsub_rn(__fsub_rn(hi, __fmul_rn(n, __uint_as_float(0x3f317200u))), __fmul_rn(n, __uint_as_float(0x35bfbe8eu))), lo);
    float p = __uint_as_float(0x3ab67172u);
    p = __fadd_rn(__fmul_rn(p, r), __uint_as_float(0x3c08eea1u));
    p = __fadd_rn(__fmul_rn(p, r), __uint_as_float(0x3d2aaa9eu));
    p = __fadd_rn(__fmul_rn(p, r), __uint_as_float(0x3e2aaa92u));
    p = __fadd_rn(__fmul_rn(p, r), 0.5f);
    p = __fadd_rn(__fmul_rn(p, r), 1.0f);
    p = __fadd_rn(__fmul_rn(p, r), 1.0f);
    *n_out = (int)n;
    return p;
}

// 1 / d for d in [1, 2], no division.
static __device__ float repro_recip_1_2(float d) {
    float r = __fsub_rn(__uint_as_float(0x3fb4b4b5u), __fmul_rn(__uint_as_float(0x3ef0f0f1u), d));
    r = __fadd_rn(r, __fmul_rn(r, __fsub_rn(1.0f, __fmul_rn(d, r))));
    r = __fadd_rn(r, __fmul_rn(r, __fsub_rn(1.0f, __fmul_rn(d, r))));
    r = __fadd_rn(r, __fmul_rn(r, __fsub_rn(1.0f, __fmul_rn(d, r))));
    return r;
}

// a * b = p + *e exactly (the halves have 12 significant bits, so their products are exact).
static __device__ float repro_two_prod(float a, float b, float *e) {
    float p = __fmul_rn(a, b);
    float ah = __uint_as_float(__float_as_uint(a) & 0xfffff000u), al = __fsub_rn(a, ah);
    float bh = __uint_as_float(__float_as_uint(b) & 0xfffff000u), bl = __fsub_rn(b, bh);
    *e = __fadd_rn(__fadd_rn(__fadd_rn(__fsub_rn(__fmul_rn(ah, bh), p), __fmul_rn(ah, bl)), __fmul_rn(al, bh)), __fmul_rn(al, bl));
    return p;
}

// a + b = s + *e exactly (fast two-sum on the operands ordered by magnitude).
static __device__ float repro_two_sum(float a, float b, float *e) {
    bool swap = fabsf(a) < fabsf(b);
    float big = swap ? b : a, small = swap ? a : b;
    float s = __fadd_rn(big, small);
    *e = __fsub_rn(small, __fsub_rn(s, big));
    return s;
}

static __device__ float repro_exp_full(float x) {
    u32 bits = __float_as_uint(x);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return x;
    if ((bits & 0x7f800000u) == 0u) return 1.0f;
    if (x > 88.75f) return __uint_as_float(0x7f800000u);
    if (x < -87.5f) return 0.0f;
    int n;
    float p = repro_exp_parts(x, 0.0f, &n);
    return repro_flush(repro_scale_pow2(p, n), 0u);
}

static __device__ float repro_tanh(float x) {
    u32 bits = __float_as_uint(x);
    u32 sign = bits & 0x80000000u, abs_bits = bits & 0x7fffffffu;
    if (abs_bits > 0x7f800000u) return x;
    if (abs_bits < 0x39800000u) return repro_flush(x, sign);
    float a = __uint_as_float(abs_bits);
    float t = 1.0f;
    if (a < 0.5625f) {
        float z = __fmul_rn(a, a);
        float p = __uint_as_float(0xbbd5d478u);
        p = __fadd_rn(__fmul_rn(p, z), __uint_as_float(0x3cae307cu));
        p = __fadd_rn(__fmul_rn(p, z), __uint_as_float(0xbd5cc816u));
        p = __fadd_rn(__fmul_rn(p, z), __uint_as_float(0x3e0887dau));
        p = __fadd_rn(__fmul_rn(p, z), __uint_as_float(0xbeaaaaaau));
        t = __fadd_rn(a, __fmul_rn(a, __fmul_rn(z, p)));
    } else if (a < 9.5f) {
        int n;
        float p = repro_exp_parts(__fmul_rn(-2.0f, a), 0.0f, &n);
        float e = __fmul_rn(p, repro_pow2(n));
        t = __fsub_rn(1.0f, __fmul_rn(__fadd_rn(e, e), repro_recip_1_2(__fadd_rn(1.0f, e))));
    }
    return __uint_as_float(__float_as_uint(t) | sign);
}

// x * sigmoid(hi + lo).
static __device__ float repro_mul_sigmoid(float x, float hi, float lo) {
    u32 sign = __float_as_uint(x) & 0x80000000u;
    int n;
    if (hi >= 0.0f) {
        if (hi > 18.0f) return x;
        float p = repro_exp_parts(-hi, -lo, &n);
        return repro_flush(__fmul_rn(x, repro_recip_1_2(__fadd_rn(1.0f, __fmul_rn(p, repro_pow2(n))))), sign);
    }
    if (hi < -100.0f) return __uint_as_float(sign);
    float p = repro_exp_parts(hi, lo, &n);
    float q = __fmul_rn(x, p);
    if (hi >= -18.0f) q = __fmul_rn(q, repro_recip_1_2(__fadd_rn(1.0f, __fmul_rn(p, repro_pow2(n)))));
    return repro_flush(repro_scale_pow2(q, n), sign);
}

static __device__ float repro_silu(float x) {
    u32 bits = __float_as_uint(x);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return x;
    if ((bits & 0x7f800000u) == 0u) return __uint_as_float(bits & 0x80000000u);
    return repro_mul_sigmoid(x, x, 0.0f);
}

static __device__ float repro_gelu(float x) {
    u32 bits = __float_as_uint(x);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return x;
    if ((bits & 0x7f800000u) == 0u) return __uint_as_float(bits & 0x80000000u);
    float k_hi = __uint_as_float(0x3fcc422au), k_lo = __uint_as_float(0xb342bc9bu);
    float c_hi = __uint_as_float(0x3d372713u), c_lo = __uint_as_float(0x30d4801fu);
    if (x >= -0.015625f) {
        float y = __fmul_rn(k_hi, __fadd_rn(x, __fmul_rn(c_hi, __fmul_rn(__fmul_rn(x, x), x))));
        return repro_mul_sigmoid(x, y, 0.0f);
    }
    if (x < -11.0f) return __uint_as_float(0x80000000u);
    float s_lo, t_lo, u_lo, v_lo, y_lo;
    float s = repro_two_prod(x, x, &s_lo);
    float t = repro_two_prod(s, x, &t_lo);
    t_lo = __fadd_rn(t_lo, __fmul_rn(s_lo, x));
    float u = repro_two_prod(c_hi, t, &u_lo);
    u_lo = __fadd_rn(u_lo, __fadd_rn(__fmul_rn(c_hi, t_lo), __fmul_rn(c_lo, t)));
    float v = repro_two_sum(x, u, &v_lo);
    v_lo = __fadd_rn(v_lo, u_lo);
    float y = repro_two_prod(k_hi, v, &y_lo);
    return repro_mul_sigmoid(x, y, __fadd_rn(y_lo, __fadd_rn(__fmul_rn(k_hi, v_lo), __fmul_rn(k_lo, v))));
}

extern "C" __global__ void gelu_repro_f32(const float *x, float *out, u32 n, float factor) {
    GRID_STRIDE(i, n) { out[i] = repro_gelu(x[i]); }
}

extern "C" __global__ void silu_repro_f32(const float *x, float *out, u32 n, float factor) {
    GRID_STRIDE(i, n) { out[i] = repro_silu(x[i]); }
}

extern "C" __global__ void tanh_repro_f32(const float *x, float *out, u32 n, float factor) {
    GRID_STRIDE(i, n) { out[i] = repro_tanh(x[i]); }
}

extern "C" __global__ void exp_repro_f32(const float *x, float *out, u32 n, float factor) {
    GRID_STRIDE(i, n) { out[i] = repro_exp_full(x[i]); }
}

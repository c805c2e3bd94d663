// Dtype conversions, each bit-exact with src/gpu/quant.rs: f32 -> f16 rounds to nearest even
// (`quant::f16_bits`: overflow to inf, correctly rounded subnormals, NaN stays a quiet NaN with the
// top payload bits), f16 -> f32 is exact, f32 -> i32 truncates and saturates with NaN -> 0 (Rust's
// `as`), i32 -> f32 rounds to nearest even, a block type -> f32 dequantizes by the definition in
// quant.rs, and f32 -> a block type is GGUF's reference quantizer (`quant::quantize`), one thread
// per 32-value block, in f32 with correctly rounded operations.
// Launch: 256 threads per block, any grid size (grid-stride loops).

#include "common.cuh"

// The f16 bits nearest to v (ties to even), as `quant::f16_bits`.
static __device__ u32 f16_bits(float v) {
    u32 x = __float_as_uint(v);
    u32 sign = (x >> 16) & 0x8000u;
    int ex = (int)((x >> 23) & 0xffu);
    u32 man = x & 0x7fffffu;
    if (ex == 0xff) return man == 0 ? (sign | 0x7c00u) : (sign | 0x7e00u | (man >> 13));
    int e = ex - 127 + 15;
    if (e >= 0x1f) return sign | 0x7c00u;
    if (e <= 0) {
        // Subnormal or zero: q * 2^-24 with q = m >> (14 - e), rounded.
        u32 shift = (u32)(14 - e);
        if (shift > 24u) return sign;
        u32 m = man | 0x800000u;
        u32 q = m >> shift;
        u32 rem = m & ((1u << shift) - 1u);
        u32 half = 1u << (shift - 1u);
        u32 up = (rem > half || (rem == half && (q & 1u) == 1u)) ? 1u : 0u;
        return sign | (q + up);
    }
    u32 h = ((u32)e << 10) | (man >> 13);
    u32 rem = man & 0x1fffu;
    u32 up = (rem > 0x1000u || (rem == 0x1000u && (h & 1u) == 1u)) ? 1u : 0u;
    return sign | (h + up);
}

// Rust's `v as i32`: toward zero, saturating, NaN -> 0.
static __device__ __forceinline__ int f32_to_i32(float v) {
    if (v != v) return 0;
    if (v >= 2147483648.0f) return 2147483647;
    if (v <= -2147483648.0f) return (int)0x80000000u;
    return (int)v;
}

// Rust's `v as i8` and `v as u8` (truncating, saturating, NaN -> 0).
static __device__ __forceinline__ int f32_to_i8(float v) {
    if (v != v) return 0;
    if (v >= 127.0f) return 127;
    if (v <= -128.0f) return -128;
    return (int)v;
}
static __device__ __forceinline__ u32 f32_to_u8(float v) {
    if (v != v || v <= 0.0f) return 0;
    if (v >= 255.0f) return 255;
    return (u32)v;
}

static __device__ __forceinline__ void st_u16(u8 *p, u32 v) {
    p[0] = (u8)(v & 0xffu);
    p[1] = (u8)(v >> 8);
}

extern "C" __global__ void cast_f32_f16(const float *x, u16 *out, u32 n) {
    GRID_STRIDE(i, n) { out[i] = (u16)f16_bits(x[i]); }
}

extern "C" __global__ void cast_f32_i32(const float *x, int *out, u32 n) {
    GRID_STRIDE(i, n) { out[i] = f32_to_i32(x[i]); }
}

extern "C" __global__ void cast_i32_f32(const int *x, float *out, u32 n) {
    GRID_STRIDE(i, n) { out[i] = (float)x[i]; }
}

template <int DT>
static __device__ __forceinline__ void dequant(const u8 *x, float *out, u32 n) {
    GRID_STRIDE(i, n) { out[i] = load_elem<DT>(x, i); }
}

extern "C" __global__ void cast_f16_f32(const u8 *x, float *out, u32 n) { dequant<DT_F16>(x, out, n); }
extern "C" __global__ void dequantize_q8_0(const u8 *x, float *out, u32 n) { dequant<DT_Q8_0>(x, out, n); }
extern "C" __global__ void dequantize_q4_0(const u8 *x, float *out, u32 n) { dequant<DT_Q4_0>(x, out, n); }
extern "C" __global__ void dequantize_q4_1(const u8 *x, float *out, u32 n) { dequant<DT_Q4_1>(x, out, n); }

// amax = max |x|, d = amax / 127, id = d != 0 ? 1 / d : 0, q = round(x * id) (half away from zero).
extern "C" __global__ void quantize_q8_0(const float *x, u8 *out, u32 blocks) {
    GRID_STRIDE(bi, blocks) {
        const float *v = x + bi * 32u;
        u8 *blk = out + bi * 34u;
        float amax = 0.0f;
        for (u32 j = 0; j < 32u; j++) {
            float a = fabsf(v[j]);
            if (a > amax) amax = a;
        }
        float d = __fdiv_rn(amax, 127.0f);
        float id = d != 0.0f ? __fdiv_rn(1.0f, d) : 0.0f;
        st_u16(blk, f16_bits(d));
        for (u32 j = 0; j < 32u; j++) blk[2u + j] = (u8)(signed char)f32_to_i8(roundf(__fmul_rn(v[j], id)));
    }
}

// max = the value of largest magnitude (first wins), d = max / -8, q = min(15, trunc(x * id + 8.5)).
extern "C" __global__ void quantize_q4_0(const float *x, u8 *out, u32 blocks) {
    GRID_STRIDE(bi, blocks) {
        const float *v = x + bi * 32u;
        u8 *blk = out + bi * 18u;
        float amax = 0.0f, max = 0.0f;
        for (u32 j = 0; j < 32u; j++) {
            float a = fabsf(v[j]);
            if (amax < a) {
                amax = a;
                max = v[j];
            }
        }
        float d = __fdiv_rn(max, -8.0f);
        float id = d != 0.0f ? __fdiv_rn(1.0f, d) : 0.0f;
        st_u16(blk, f16_bits(d));
        for (u32 j = 0; j < 16u; j++) {
            // As the CPU: the i8 code capped at 15, then packed as u8 (a negative code keeps its bits).
            int c0 = f32_to_i8(__fadd_rn(__fmul_rn(v[j], id), 8.5f));
            int c1 = f32_to_i8(__fadd_rn(__fmul_rn(v[j + 16u], id), 8.5f));
            u8 lo = (u8)(c0 < 15 ? c0 : 15), hi = (u8)(c1 < 15 ? c1 : 15);
            blk[2u + j] = (u8)(lo | (u8)(hi << 4));
        }
    }
}

// d = (max - min) / 15, m = min, q = min(15, trunc((x - min) * id + 0.5)).
extern "C" __global__ void quantize_q4_1(const float *x, u8 *out, u32 blocks) {
    GRID_STRIDE(bi, blocks) {
        const float *v = x + bi * 32u;
        u8 *blk = out + bi * 20u;
        float mn = __uint_as_float(0x7f7fffffu), mx = __uint_as_float(0xff7fffffu);
        for (u32 j = 0; j < 32u; j++) {
            if (v[j] < mn) mn = v[j];
            if (v[j] > mx) mx = v[j];
        }
        float d = __fdiv_rn(__fsub_rn(mx, mn), 15.0f);
        float id = d != 0.0f ? __fdiv_rn(1.0f, d) : 0.0f;
        st_u16(blk, f16_bits(d));
        st_u16(blk + 2, f16_bits(mn));
        for (u32 j = 0; j < 16u; j++) {
            u32 c0 = f32_to_u8(__fadd_rn(__fmul_rn(__fsub_rn(v[j], mn), id), 0.5f));
            u32 c1 = f32_to_u8(__fadd_rn(__fmul_rn(__fsub_rn(v[j + 16u], mn), id), 0.5f));
            blk[4u + j] = (u8)((c0 < 15u ? c0 : 15u) | ((c1 < 15u ? c1 : 15u) << 4));
        }
    }
}

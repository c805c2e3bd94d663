// Helpers shared by the kernel files in kernels/: every `.cu` file starts with
// `#include "common.cuh"`, and each helper here is defined nowhere else (tests/all/cuda_backend.rs
// fails if a `.cu` file defines one of these names again).
//
// How each compiler finds this file: NVRTC gets it as a named header (src/gpu/cuda/compile.rs,
// whose cache key covers it); the host emulator (src/gpu/cuda/emu.rs) and the clang-16 syntax check
// (tests/all/cuda_backend.rs) write it next to the sources. The registry (`HEADERS` in
// src/gpu/kernels.rs) embeds it in the binary, like the kernel files.
//
// Functions are `static` (one private copy per NVRTC program) and `inline` (no unused-function
// warning in files that do not call them).

#ifndef AO_KERNELS_COMMON_CUH
#define AO_KERNELS_COMMON_CUH

// ---- types and launch shape ----

typedef unsigned int u32;
typedef unsigned long long u64;
typedef unsigned short u16;
typedef unsigned char u8;

// Threads per block of every launch (`launch::BLOCK` in src/gpu/cuda/launch.rs).
#define BLOCK 256
#define FULL_MASK 0xffffffffu

// Every element index i < n, whatever the grid size.
#define GRID_STRIDE(i, n) for (u32 i = blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += gridDim.x * blockDim.x)

// The index (i0, i1, i2, i3) of flat element i of a row-major [d0, d1, d2, d3] (d0 implicit).
struct Index4 {
    u32 i0, i1, i2, i3;
};

static __device__ __forceinline__ Index4 unravel4(u32 i, u32 d1, u32 d2, u32 d3) {
    Index4 x;
    x.i3 = i % d3;
    u32 t = i / d3;
    x.i2 = t % d2;
    t = t / d2;
    x.i1 = t % d1;
    x.i0 = t / d1;
    return x;
}

// sum(i_k * strides[k]): the element of a strided (or broadcast, stride 0) operand at index x.
static __device__ __forceinline__ u32 offset4(const Index4 &x, const u32 *strides) {
    return x.i0 * strides[0] + x.i1 * strides[1] + x.i2 * strides[2] + x.i3 * strides[3];
}

// ---- f16 and GGUF block decoding (mirrors src/gpu/quant.rs) ----

// Dtype codes of the templates below: the ABI codes of `DType::code` in src/gpu/dtype.rs (2 is i32).
#define DT_F32 0
#define DT_F16 1
#define DT_Q8_0 3
#define DT_Q4_0 4
#define DT_Q4_1 5

// The f32 value of IEEE binary16 bits (exact), as `quant::f16_value`.
static __device__ __forceinline__ float f16_value(u32 h) {
    u32 sign = (h & 0x8000u) << 16;
    u32 e = (h >> 10) & 0x1fu;
    u32 man = h & 0x3ffu;
    if (e == 0) {
        // man * 2^-24: exact, and a normal f32.
        float v = __fmul_rn((float)man, __uint_as_float(0x33800000u));
        return sign ? -v : v;
    }
    if (e == 0x1fu) return __uint_as_float(sign | 0x7f800000u | (man << 13));
    return __uint_as_float(sign | ((e + 112u) << 23) | (man << 13));
}

// A little-endian u16 at any byte address.
static __device__ __forceinline__ u32 ld_u16(const u8 *p) { return (u32)p[0] | ((u32)p[1] << 8); }

// The nibble code of element j of a q4 block's 16 code bytes.
static __device__ __forceinline__ u32 nibble(const u8 *qs, u32 j) { return j < 16u ? (qs[j] & 15u) : (qs[j - 16u] >> 4); }

// Element i (row-major element index) of a tensor of type DT stored at `base`, as f32.
template <int DT>
static __device__ __forceinline__ float load_elem(const u8 *base, u32 i) {
    if (DT == DT_F32) return ((const float *)base)[i];
    if (DT == DT_F16) return f16_value(ld_u16(base + 2u * i));
    u32 j = i & 31u;
    if (DT == DT_Q8_0) {
        const u8 *blk = base + (i >> 5) * 34u;
        return __fmul_rn(f16_value(ld_u16(blk)), (float)(signed char)blk[2u + j]);
    }
    if (DT == DT_Q4_0) {
        const u8 *blk = base + (i >> 5) * 18u;
        return __fmul_rn(f16_value(ld_u16(blk)), (float)((int)nibble(blk + 2, j) - 8));
    }
    const u8 *blk = base + (i >> 5) * 20u;
    return __fadd_rn(__fmul_rn(f16_value(ld_u16(blk)), (float)nibble(blk + 4, j)), f16_value(ld_u16(blk + 2)));
}

// ---- portable math ----

// exp(x) with correctly rounded operations only, bitwise equal to `gpu::repro_exp` in
// src/gpu/repro.rs (the same constants, as bits; tests/all/cuda_backend.rs compares them).
static __device__ inline float repro_exp(float x) {
    if (x != x) return x;
    if (x > 88.72f) return __uint_as_float(0x7f800000u);
    if (x < -86.0f) return 0.0f;
    float n = floorf(__fadd_rn(__fmul_rn(x, __uint_as_float(0x3fb8aa3bu)), 0.5f));
    float r = __fsub_rn(__fsub_rn(x, __fmul_rn(n, __uint_as_float(0x3f317200u))), __fmul_rn(n, __uint_as_float(0x35bfbe8eu)));
    float p = __uint_as_float(0x3ab60b61u);
    p = __fadd_rn(__fmul_rn(p, r), __uint_as_float(0x3c088889u));
    p = __fadd_rn(__fmul_rn(p, r), __uint_as_float(0x3d2aaaabu));
    p = __fadd_rn(__fmul_rn(p, r), __uint_as_float(0x3e2aaaabu));
    p = __fadd_rn(__fmul_rn(p, r), 0.5f);
    p = __fadd_rn(__fmul_rn(p, r), 1.0f);
    p = __fadd_rn(__fmul_rn(p, r), 1.0f);
    int ni = (int)n;
    if (ni > 127) return __fmul_rn(__fmul_rn(p, __uint_as_float(254u << 23)), 2.0f);
    return __fmul_rn(p, __uint_as_float((u32)(ni + 127) << 23));
}

// ---- block reductions (a tree: DeviceDependent order) ----
// Every thread of the block must call these (they synchronize); `scratch` holds BLOCK / 32 floats.

static __device__ inline float block_sum(float v, float *scratch) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(FULL_MASK, v, o);
    u32 lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = lane < (blockDim.x >> 5) ? scratch[lane] : 0.0f;
        for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(FULL_MASK, v, o);
        if (lane == 0) scratch[0] = v;
    }
    __syncthreads();
    float total = scratch[0];
    __syncthreads();
    return total;
}

// The largest value (NaN never greater; the sign of a zero maximum may vary): softmax only
// subtracts it, where +0 and -0 give the same results.
static __device__ inline float block_max(float v, float *scratch) {
    for (int o = 16; o > 0; o >>= 1) {
        float w = __shfl_down_sync(FULL_MASK, v, o);
        v = w > v ? w : v;
    }
    u32 lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = lane < (blockDim.x >> 5) ? scratch[lane] : __uint_as_float(0xff800000u);
        for (int o = 16; o > 0; o >>= 1) {
            float w = __shfl_down_sync(FULL_MASK, v, o);
            v = w > v ? w : v;
        }
        if (lane == 0) scratch[0] = v;
    }
    __syncthreads();
    float total = scratch[0];
    __syncthreads();
    return total;
}

#endif

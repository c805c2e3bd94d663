// RMSNorm and LayerNorm over the last axis of f32 x [rows, last], with weight (and bias) [last].
//
// `rmsnorm_f32` / `layernorm_f32` (reproducible): one block per row; thread 0 sums the row in index
// order with correctly rounded operations, exactly as `rmsnorm_row` / `layernorm_row` in
// src/gpu/cpu/kernels.rs, then every thread writes its elements (each a fixed sequence of rounded ops):
//   rms:   inv = 1 / sqrt(sum(x*x) / n + eps),                 out = x * inv * w
//   layer: mean = sum(x) / n, inv = 1 / sqrt(sum(d*d) / n + eps), out = (x - mean) * inv * w + b
// The `_fast` kernels sum with a 256-thread tree (DeviceDependent).
// Launch: 256 threads per block, any grid size (grid-stride over rows).

#include "common.cuh"

// 1 / sqrt(s / n + eps), each step correctly rounded.
static __device__ __forceinline__ float inv_root(float s, u32 n, float eps) {
    return __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(__fdiv_rn(s, (float)n), eps)));
}

extern "C" __global__ void rmsnorm_f32(const float *x, const float *w, float *out, u32 rows, u32 last, float eps) {
    __shared__ float inv_s;
    for (u32 r = blockIdx.x; r < rows; r += gridDim.x) {
        const float *row = x + r * last;
        if (threadIdx.x == 0) {
            float ss = 0.0f;
            for (u32 j = 0; j < last; j++) ss = __fadd_rn(ss, __fmul_rn(row[j], row[j]));
            inv_s = inv_root(ss, last, eps);
        }
        __syncthreads();
        float inv = inv_s;
        for (u32 j = threadIdx.x; j < last; j += blockDim.x) out[r * last + j] = __fmul_rn(__fmul_rn(row[j], inv), w[j]);
        __syncthreads();
    }
}

extern "C" __global__ void layernorm_f32(const float *x, const float *w, const float *b, float *out, u32 rows, u32 last, float eps) {
    __shared__ float mean_s, inv_s;
    for (u32 r = blockIdx.x; r < rows; r += gridDim.x) {
        const float *row = x + r * last;
        if (threadIdx.x == 0) {
            float s = 0.0f;
            for (u32 j = 0; j < last; j++) s = __fadd_rn(s, row[j]);
            float mean = __fdiv_rn(s, (float)last);
            float var = 0.0f;
            for (u32 j = 0; j < last; j++) {
                float d = __fsub_rn(row[j], mean);
                var = __fadd_rn(var, __fmul_rn(d, d));
            }
            mean_s = mean;
            inv_s = inv_root(var, last, eps);
        }
        __syncthreads();
        float mean = mean_s, inv = inv_s;
        for (u32 j = threadIdx.x; j < last; j += blockDim.x) {
            out[r * last + j] = __fadd_rn(__fmul_rn(__fmul_rn(__fsub_rn(row[j], mean), inv), w[j]), b[j]);
        }
        __syncthreads();
    }
}

extern "C" __global__ void rmsnorm_fast_f32(const float *x, const float *w, float *out, u32 rows, u32 last, float eps) {
    __shared__ float scratch[BLOCK / 32];
    for (u32 r = blockIdx.x; r < rows; r += gridDim.x) {
        const float *row = x + r * last;
        float ss = 0.0f;
        for (u32 j = threadIdx.x; j < last; j += blockDim.x) ss = fmaf(row[j], row[j], ss);
        ss = block_sum(ss, scratch);
        float inv = 1.0f / sqrtf(ss / (float)last + eps);
        for (u32 j = threadIdx.x; j < last; j += blockDim.x) out[r * last + j] = row[j] * inv * w[j];
    }
}

extern "C" __global__ void layernorm_fast_f32(const float *x, const float *w, const float *b, float *out, u32 rows, u32 last, float eps) {
    __shared__ float scratch[BLOCK / 32];
    for (u32 r = blockIdx.x; r < rows; r += gridDim.x) {
        const float *row = x + r * last;
        float s = 0.0f;
        for (u32 j = threadIdx.x; j < last; j += blockDim.x) s += row[j];
        float mean = block_sum(s, scratch) / (float)last;
        float var = 0.0f;
        for (u32 j = threadIdx.x; j < last; j += blockDim.x) {
            float d = row[j] - mean;
            var = fmaf(d, d, var);
        }
        var = block_sum(var, scratch);
        float inv = 1.0f / sqrtf(var / (float)last + eps);
        for (u32 j = threadIdx.x; j < last; j += blockDim.x) out[r * last + j] = fmaf((row[j] - mean) * inv, w[j], b[j]);
    }
}

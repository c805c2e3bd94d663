// Causal scaled-dot-product attention with grouped-query heads, mirroring `attention` in
// src/gpu/cpu/kernels.rs (and shaders/attention.wgsl) operation for operation. q is [batch, tq, hq, dim],
// k and v [batch, tk, hkv, dim]; query row r = (b * tq + i) * hq + h reads key/value head
// h / (hq / hkv) and the keys j < len = min(tk, pos0 + i + 1):
//   s_j = (sum over c in order of q[c] * k_j[c]) * scale
//   p_j = softmax over j < len (max, exp(s_j - max) summed in order, divide)
//   out[c] = sum over j < len in order of p_j * v_j[c]
// One block per query row (grid-stride over rows), with no scratch tensor: each pass recomputes
// the scores, which are the same bits every time. The reproducible kernel uses correctly rounded
// operations and `repro_exp` (bitwise equal to the CPU); the fast one uses fmaf, expf and a tree
// sum. Launch: 256 threads per block, any grid size.

#include "common.cuh"

// Mirrors `AttnParams` in src/gpu/cuda/launch.rs.
struct AttnParams {
    u32 batch, tq, tk, hq, hkv, dim, pos0;
    float scale;
};

template <bool REPRO>
static __device__ __forceinline__ float score(const float *qrow, const float *krow, u32 dim, float scale) {
    float acc = 0.0f;
    for (u32 c = 0; c < dim; c++) acc = REPRO ? __fadd_rn(acc, __fmul_rn(qrow[c], krow[c])) : fmaf(qrow[c], krow[c], acc);
    return REPRO ? __fmul_rn(acc, scale) : acc * scale;
}

template <bool REPRO>
static __device__ void attention(const float *q, const float *k, const float *v, float *out, const AttnParams &p) {
    __shared__ float scratch[BLOCK / 32];
    __shared__ float chunk[BLOCK];
    __shared__ float total;
    const u32 tid = threadIdx.x;
    const u32 rows = p.batch * p.tq * p.hq;
    const u32 group = p.hq / p.hkv;
    for (u32 r = blockIdx.x; r < rows; r += gridDim.x) {
        const u32 h = r % p.hq;
        const u32 i = (r / p.hq) % p.tq;
        const u32 b = r / (p.hq * p.tq);
        const u32 g = h / group;
        const u64 visible = (u64)p.pos0 + i + 1u;
        const u32 len = visible < (u64)p.tk ? (u32)visible : p.tk;
        const float *qrow = q + r * p.dim;
        // Key / value row j of this head starts at kv + ((b * tk + j) * hkv + g) * dim.
        const u32 kv0 = (b * p.tk * p.hkv + g) * p.dim, kv_step = p.hkv * p.dim;

        // 1. The maximum score (exact in any order).
        float m = __uint_as_float(0xff800000u);
        for (u32 j = tid; j < len; j += blockDim.x) {
            float s = score<REPRO>(qrow, k + kv0 + j * kv_step, p.dim, p.scale);
            m = s > m ? s : m;
        }
        m = block_max(m, scratch);

        // 2. The sum of exp(s_j - m): in index order by thread 0 (reproducible) or a tree (fast).
        float part = 0.0f;
        if (REPRO && tid == 0) total = 0.0f;
        for (u32 j0 = 0; j0 < len; j0 += blockDim.x) {
            const u32 j = j0 + tid;
            float e = 0.0f;
            if (j < len) {
                float s = score<REPRO>(qrow, k + kv0 + j * kv_step, p.dim, p.scale);
                e = REPRO ? repro_exp(__fsub_rn(s, m)) : expf(s - m);
            }
            if (REPRO) {
                chunk[tid] = e;
                __syncthreads();
                if (tid == 0) {
                    const u32 cnt = len - j0 < blockDim.x ? len - j0 : blockDim.x;
                    float acc = total;
                    for (u32 l = 0; l < cnt; l++) acc = __fadd_rn(acc, chunk[l]);
                    total = acc;
                }
                __syncthreads();
            } else {
                part += e;
            }
        }
        float sum;
        if (REPRO) {
            __syncthreads();
            sum = total;
        } else {
            sum = block_sum(part, scratch);
        }

        // 3. out[c] = sum_j p_j * v_j[c], a chunk of keys at a time, one column per thread.
        for (u32 c0 = 0; c0 < p.dim; c0 += blockDim.x) {
            const u32 c = c0 + tid;
            float acc = 0.0f;
            for (u32 j0 = 0; j0 < len; j0 += blockDim.x) {
                const u32 j = j0 + tid;
                if (j < len) {
                    float s = score<REPRO>(qrow, k + kv0 + j * kv_step, p.dim, p.scale);
                    float e = REPRO ? repro_exp(__fsub_rn(s, m)) : expf(s - m);
                    chunk[tid] = REPRO ? __fdiv_rn(e, sum) : e / sum;
                }
                __syncthreads();
                const u32 cnt = len - j0 < blockDim.x ? len - j0 : blockDim.x;
                if (c < p.dim) {
                    const float *vcol = v + kv0 + j0 * kv_step + c;
                    for (u32 l = 0; l < cnt; l++) {
                        acc = REPRO ? __fadd_rn(acc, __fmul_rn(chunk[l], vcol[l * kv_step])) : fmaf(chunk[l], vcol[l * kv_step], acc);
                    }
                }
                __syncthreads();
            }
            if (c < p.dim) out[r * p.dim + c] = acc;
        }
    }
}

extern "C" __global__ __launch_bounds__(BLOCK) void attention_f32(const float *q, const float *k, const float *v, float *out, AttnParams p) { attention<false>(q, k, v, out, p); }
extern "C" __global__ __launch_bounds__(BLOCK) void attention_f32_repro(const float *q, const float *k, const float *v, float *out, AttnParams p) { attention<true>(q, k, v, out, p); }

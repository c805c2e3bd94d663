// Reductions over the last axis of an f32 tensor seen as [rows, last], and softmax.
//
// Reproducible kernels (`sum_last_f32`, `mean_last_f32`, `softmax_repro_f32`) sum each row
// sequentially in index order with correctly rounded adds, exactly as `reduce_row` / `softmax_row`
// in src/gpu/cpu.rs, and softmax uses `repro_exp` (src/gpu/mod.rs, constants as bits), so they equal
// the CPU bitwise. The `_fast` kernels reduce a row with a 256-thread tree (DeviceDependent).
// `max_last_f32` and `argmax_last_i32` are exact in any order: candidates compare by (not NaN,
// value, lower index), which picks the CPU's answer (the first maximum, NaN never greater).
//
// Launch: 256 threads per block. Kernels with one thread per row and the block-per-row kernels are
// grid-stride loops over rows, so any grid size works.

typedef unsigned int u32;

#define BLOCK 256
#define FULL_MASK 0xffffffffu

// ==== shared: repro_exp (identical in reduce.cu and attention.cu; mirrors gpu::repro_exp) ====
static __device__ float repro_exp(float x) {
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
    if (ni > 127) return __fmul_rn(__fmul_rn(p, __uint_as_float(127u << 23)), 2.0f);
    return __fmul_rn(p, __uint_as_float((u32)(ni + 127) << 23));
}
// ==== end shared ====

// ==== shared: block_sum (identical in reduce.cu, norm.cu and attention.cu) ====
// Every thread of the block must call this (it synchronizes); `scratch` holds BLOCK / 32 floats.
static __device__ float block_sum(float v, float *scratch) {
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
// ==== end shared ====

// ==== shared: block_max (identical in reduce.cu and attention.cu) ====
// The largest value (NaN never greater; the sign of a zero maximum may vary): softmax only
// subtracts it, where +0 and -0 give the same results.
static __device__ float block_max(float v, float *scratch) {
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
// ==== end shared ====

// A max/argmax candidate; idx == EMPTY marks "no element".
#define EMPTY 0xffffffffu

// Whether (v, i) beats (w, j): a real element beats none, a number beats NaN, a larger value
// wins, equal values (and +0 / -0, and two NaNs) go to the lower index. A strict total order, so
// the winner does not depend on the reduction order.
static __device__ __forceinline__ bool beats(float v, u32 i, float w, u32 j) {
    if (i == EMPTY) return false;
    if (j == EMPTY) return true;
    bool vn = v != v, wn = w != w;
    if (vn != wn) return wn;
    if (!vn && v != w) return v > w;
    return i < j;
}

static __device__ void block_argmax(float &v, u32 &i, float *sv, u32 *si) {
    for (int o = 16; o > 0; o >>= 1) {
        float w = __shfl_down_sync(FULL_MASK, v, o);
        u32 j = __shfl_down_sync(FULL_MASK, i, o);
        // Lanes past the warp's end read their own value back: harmless.
        if (beats(w, j, v, i)) {
            v = w;
            i = j;
        }
    }
    u32 lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
    if (lane == 0) {
        sv[warp] = v;
        si[warp] = i;
    }
    __syncthreads();
    if (warp == 0) {
        bool have = lane < (blockDim.x >> 5);
        v = have ? sv[lane] : 0.0f;
        i = have ? si[lane] : EMPTY;
        for (int o = 16; o > 0; o >>= 1) {
            float w = __shfl_down_sync(FULL_MASK, v, o);
            u32 j = __shfl_down_sync(FULL_MASK, i, o);
            if (beats(w, j, v, i)) {
                v = w;
                i = j;
            }
        }
        if (lane == 0) {
            sv[0] = v;
            si[0] = i;
        }
    }
    __syncthreads();
    v = sv[0];
    i = si[0];
    __syncthreads();
}

// ---- one thread per row, index order (reproducible) ----

static __device__ __forceinline__ float row_sum_ordered(const float *row, u32 last) {
    float acc = 0.0f;
    for (u32 j = 0; j < last; j++) acc = __fadd_rn(acc, row[j]);
    return acc;
}

extern "C" __global__ void sum_last_f32(const float *x, float *out, u32 rows, u32 last) {
    for (u32 r = blockIdx.x * blockDim.x + threadIdx.x; r < rows; r += gridDim.x * blockDim.x) {
        out[r] = row_sum_ordered(x + r * last, last);
    }
}

// An empty row gives 0 / 0 = NaN, as on the CPU.
extern "C" __global__ void mean_last_f32(const float *x, float *out, u32 rows, u32 last) {
    for (u32 r = blockIdx.x * blockDim.x + threadIdx.x; r < rows; r += gridDim.x * blockDim.x) {
        out[r] = __fdiv_rn(row_sum_ordered(x + r * last, last), (float)last);
    }
}

// ---- one block per row ----

extern "C" __global__ void sum_last_fast_f32(const float *x, float *out, u32 rows, u32 last) {
    __shared__ float scratch[BLOCK / 32];
    for (u32 r = blockIdx.x; r < rows; r += gridDim.x) {
        const float *row = x + r * last;
        float acc = 0.0f;
        for (u32 j = threadIdx.x; j < last; j += blockDim.x) acc += row[j];
        acc = block_sum(acc, scratch);
        if (threadIdx.x == 0) out[r] = acc;
    }
}

extern "C" __global__ void mean_last_fast_f32(const float *x, float *out, u32 rows, u32 last) {
    __shared__ float scratch[BLOCK / 32];
    for (u32 r = blockIdx.x; r < rows; r += gridDim.x) {
        const float *row = x + r * last;
        float acc = 0.0f;
        for (u32 j = threadIdx.x; j < last; j += blockDim.x) acc += row[j];
        acc = block_sum(acc, scratch);
        if (threadIdx.x == 0) out[r] = acc / (float)last;
    }
}

// An empty or all-NaN row gives -inf, as on the CPU.
extern "C" __global__ void max_last_f32(const float *x, float *out, u32 rows, u32 last) {
    __shared__ float sv[BLOCK / 32];
    __shared__ u32 si[BLOCK / 32];
    for (u32 r = blockIdx.x; r < rows; r += gridDim.x) {
        const float *row = x + r * last;
        float v = 0.0f;
        u32 i = EMPTY;
        for (u32 j = threadIdx.x; j < last; j += blockDim.x) {
            if (beats(row[j], j, v, i)) {
                v = row[j];
                i = j;
            }
        }
        block_argmax(v, i, sv, si);
        if (threadIdx.x == 0) out[r] = (i == EMPTY || v != v) ? __uint_as_float(0xff800000u) : v;
    }
}

// The host rejects an empty last axis; an all-NaN row gives 0, as on the CPU.
extern "C" __global__ void argmax_last_i32(const float *x, int *out, u32 rows, u32 last) {
    __shared__ float sv[BLOCK / 32];
    __shared__ u32 si[BLOCK / 32];
    for (u32 r = blockIdx.x; r < rows; r += gridDim.x) {
        const float *row = x + r * last;
        float v = 0.0f;
        u32 i = EMPTY;
        for (u32 j = threadIdx.x; j < last; j += blockDim.x) {
            if (beats(row[j], j, v, i)) {
                v = row[j];
                i = j;
            }
        }
        block_argmax(v, i, sv, si);
        if (threadIdx.x == 0) out[r] = i == EMPTY ? 0 : (int)i;
    }
}

// Softmax, one block per row: the maximum in parallel (exact), exp(x - max) in parallel (each
// element computed as on the CPU), then thread 0 sums the row in index order and every thread
// divides. `out` holds the exponentials between the passes.
extern "C" __global__ void softmax_repro_f32(const float *x, float *out, u32 rows, u32 last) {
    __shared__ float scratch[BLOCK / 32];
    __shared__ float total;
    for (u32 r = blockIdx.x; r < rows; r += gridDim.x) {
        const float *row = x + r * last;
        float *orow = out + r * last;
        float m = __uint_as_float(0xff800000u);
        for (u32 j = threadIdx.x; j < last; j += blockDim.x) m = row[j] > m ? row[j] : m;
        m = block_max(m, scratch);
        for (u32 j = threadIdx.x; j < last; j += blockDim.x) orow[j] = repro_exp(__fsub_rn(row[j], m));
        __syncthreads();
        if (threadIdx.x == 0) total = row_sum_ordered(orow, last);
        __syncthreads();
        float s = total;
        for (u32 j = threadIdx.x; j < last; j += blockDim.x) orow[j] = __fdiv_rn(orow[j], s);
        __syncthreads();
    }
}

extern "C" __global__ void softmax_fast_f32(const float *x, float *out, u32 rows, u32 last) {
    __shared__ float scratch[BLOCK / 32];
    for (u32 r = blockIdx.x; r < rows; r += gridDim.x) {
        const float *row = x + r * last;
        float *orow = out + r * last;
        float m = __uint_as_float(0xff800000u);
        for (u32 j = threadIdx.x; j < last; j += blockDim.x) m = row[j] > m ? row[j] : m;
        m = block_max(m, scratch);
        float acc = 0.0f;
        for (u32 j = threadIdx.x; j < last; j += blockDim.x) {
            float e = expf(row[j] - m);
            orow[j] = e;
            acc += e;
        }
        float s = block_sum(acc, scratch);
        for (u32 j = threadIdx.x; j < last; j += blockDim.x) orow[j] = orow[j] / s;
    }
}

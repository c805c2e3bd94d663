// Reductions over the last axis of an f32 tensor seen as [rows, last], and softmax.
//
// Reproducible kernels (`sum_last_f32`, `mean_last_f32`, `softmax_repro_f32`) sum each row
// sequentially in index order with correctly rounded adds, exactly as `reduce_row` / `softmax_row`
// in src/gpu/cpu/kernels.rs, and softmax uses `repro_exp` (src/gpu/repro.rs, constants as bits), so they equal
// the CPU bitwise. The `_fast` kernels reduce a row with a 256-thread tree (DeviceDependent).
// `max_last_f32` and `argmax_last_i32` are exact in any order: candidates compare by (not NaN,
// value, lower index), which picks the CPU's answer (the first maximum, NaN never greater).
//
// Launch: 256 threads per block. Kernels with one thread per row and the block-per-row kernels are
// grid-stride loops over rows, so any grid size works.

#include "common.cuh"

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

// The warp's best (v, i) into lane 0 (the other lanes keep partial results).
static __device__ __forceinline__ void warp_argmax(float &v, u32 &i) {
    for (int o = 16; o > 0; o >>= 1) {
        float w = __shfl_down_sync(FULL_MASK, v, o);
        u32 j = __shfl_down_sync(FULL_MASK, i, o);
        // Lanes past the warp's end read their own value back: harmless.
        if (beats(w, j, v, i)) {
            v = w;
            i = j;
        }
    }
}

// The block's best (v, i), returned to every thread; `sv` / `si` hold BLOCK / 32 entries.
static __device__ void block_argmax(float &v, u32 &i, float *sv, u32 *si) {
    warp_argmax(v, i);
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
        warp_argmax(v, i);
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

// The first maximum (v, i) of a row, i == EMPTY when the row is empty; every thread of the block
// must call this, and gets the block's answer.
static __device__ void row_argmax(const float *row, u32 last, float &v, u32 &i) {
    __shared__ float sv[BLOCK / 32];
    __shared__ u32 si[BLOCK / 32];
    v = 0.0f;
    i = EMPTY;
    for (u32 j = threadIdx.x; j < last; j += blockDim.x) {
        if (beats(row[j], j, v, i)) {
            v = row[j];
            i = j;
        }
    }
    block_argmax(v, i, sv, si);
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

// The sum (MEAN: divided by the row length) of each row, a block tree per row.
template <bool MEAN>
static __device__ __forceinline__ void sum_rows_fast(const float *x, float *out, u32 rows, u32 last) {
    __shared__ float scratch[BLOCK / 32];
    for (u32 r = blockIdx.x; r < rows; r += gridDim.x) {
        const float *row = x + r * last;
        float acc = 0.0f;
        for (u32 j = threadIdx.x; j < last; j += blockDim.x) acc += row[j];
        acc = block_sum(acc, scratch);
        if (threadIdx.x == 0) out[r] = MEAN ? acc / (float)last : acc;
    }
}

extern "C" __global__ void sum_last_fast_f32(const float *x, float *out, u32 rows, u32 last) { sum_rows_fast<false>(x, out, rows, last); }
extern "C" __global__ void mean_last_fast_f32(const float *x, float *out, u32 rows, u32 last) { sum_rows_fast<true>(x, out, rows, last); }

// An empty or all-NaN row gives -inf, as on the CPU.
extern "C" __global__ void max_last_f32(const float *x, float *out, u32 rows, u32 last) {
    for (u32 r = blockIdx.x; r < rows; r += gridDim.x) {
        float v;
        u32 i;
        row_argmax(x + r * last, last, v, i);
        if (threadIdx.x == 0) out[r] = (i == EMPTY || v != v) ? __uint_as_float(0xff800000u) : v;
    }
}

// The host rejects an empty last axis; an all-NaN row gives 0, as on the CPU.
extern "C" __global__ void argmax_last_i32(const float *x, int *out, u32 rows, u32 last) {
    for (u32 r = blockIdx.x; r < rows; r += gridDim.x) {
        float v;
        u32 i;
        row_argmax(x + r * last, last, v, i);
        if (threadIdx.x == 0) out[r] = i == EMPTY ? 0 : (int)i;
    }
}

// The largest value of a row (-inf when empty; see block_max), returned to every thread.
static __device__ __forceinline__ float row_max(const float *row, u32 last, float *scratch) {
    float m = __uint_as_float(0xff800000u);
    for (u32 j = threadIdx.x; j < last; j += blockDim.x) m = row[j] > m ? row[j] : m;
    return block_max(m, scratch);
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
        float m = row_max(row, last, scratch);
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
        float m = row_max(row, last, scratch);
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

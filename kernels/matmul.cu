// Batched matmul out[b] = op(A[b]) @ op(B[b]) with f32 A and a B of f32, f16 or a GGUF block type
// (q8_0, q4_0, q4_1), f32 accumulation. B elements are addressed by their row-major element index
// and dequantized on load exactly as src/gpu/quant.rs defines (`d * q`, `d * q + m` with a separate
// add), so a quantized B behaves as the f32 matrix those rules give.
//
// * `matmul_<b>`: 128x128 output tiles, 8 k per step in shared memory, 8x8 outputs per thread
//   (rows ty + 16r, columns tx + 16c), fmaf accumulation (DeviceDependent).
// * `matmul_<b>_repro`: the same tiling, but each output accumulates `acc = acc + a * b` for
//   k = 0, 1, ... in order with correctly rounded multiply and add (no FMA), which is exactly the
//   CPU's fixed order (`matmul_ordered`, `quant::dot_row_ordered`): bitwise equal to it.
// * `matvec_<b>` / `matvec_<b>_repro`: m = 1 with transpose_b (weights [n, k], k contiguous), one
//   warp per output: the lanes read 32 consecutive k at once. The reproducible form multiplies in
//   parallel and then adds the 32 products in k order through shuffles (bitwise equal to the CPU);
//   the fast form keeps one fmaf partial per lane and adds them in a tree.
//
// Launch: 256 threads per block; the grid is a grid-stride loop over (batch, tile) or outputs.
// Index arithmetic is u32: the host keeps every tensor below 2^30 elements.

#include "common.cuh"

// Mirrors `MatmulParams` in src/gpu/cuda/launch.rs. Strides are in elements (0 broadcasts a 2-D
// operand over the batch); ta / tb are 0 or 1.
struct MatmulParams {
    u32 batch, m, n, k;
    u32 stride_a, stride_b;
    u32 ta, tb;
};

#define BM 128
#define BN 128
#define BK 8
#define TM 8
#define TN 8

template <bool REPRO>
static __device__ __forceinline__ float mad(float acc, float a, float b) {
    return REPRO ? __fadd_rn(acc, __fmul_rn(a, b)) : fmaf(a, b, acc);
}

template <int DT, bool REPRO>
static __device__ void matmul_tiled(const float *a, const u8 *b, float *out, const MatmulParams &p) {
    // +4 columns of padding: the strided tile stores hit 32 different banks.
    __shared__ float As[BK][BM + 4];
    __shared__ float Bs[BK][BN + 4];
    const u32 tid = threadIdx.x;
    const u32 tx = tid & 15u, ty = tid >> 4;
    const u32 tiles_n = (p.n + BN - 1) / BN;
    const u32 tiles = ((p.m + BM - 1) / BM) * tiles_n;
    for (u32 w = blockIdx.x; w < p.batch * tiles; w += gridDim.x) {
        const u32 bi = w / tiles, t = w % tiles;
        const u32 m0 = (t / tiles_n) * BM, n0 = (t % tiles_n) * BN;
        const float *A = a + bi * p.stride_a;
        const u32 b_off = bi * p.stride_b;
        float acc[TM][TN];
#pragma unroll
        for (int r = 0; r < TM; r++)
#pragma unroll
            for (int c = 0; c < TN; c++) acc[r][c] = 0.0f;
        for (u32 k0 = 0; k0 < p.k; k0 += BK) {
            // Each tile is BM * BK = BK * BN = 1024 values, 4 per thread, read along the
            // contiguous axis of the operand; out-of-range entries are zero and never used.
#pragma unroll
            for (u32 l = 0; l < 4; l++) {
                const u32 e = tid + l * BLOCK;
                const u32 i = p.ta ? e % BM : e / BK;
                const u32 kk = p.ta ? e / BM : e % BK;
                const u32 gi = m0 + i, gk = k0 + kk;
                float v = 0.0f;
                if (gi < p.m && gk < p.k) v = p.ta ? A[gk * p.m + gi] : A[gi * p.k + gk];
                As[kk][i] = v;
            }
#pragma unroll
            for (u32 l = 0; l < 4; l++) {
                const u32 e = tid + l * BLOCK;
                const u32 j = p.tb ? e / BK : e % BN;
                const u32 kk = p.tb ? e % BK : e / BN;
                const u32 gj = n0 + j, gk = k0 + kk;
                float v = 0.0f;
                if (gj < p.n && gk < p.k) v = load_elem<DT>(b, b_off + (p.tb ? gj * p.k + gk : gk * p.n + gj));
                Bs[kk][j] = v;
            }
            __syncthreads();
            // Only the k < p.k steps: every output sums exactly its k products, in order.
            const u32 kc = p.k - k0 < BK ? p.k - k0 : BK;
            for (u32 kk = 0; kk < kc; kk++) {
                float ar[TM], br[TN];
#pragma unroll
                for (int r = 0; r < TM; r++) ar[r] = As[kk][ty + 16 * r];
#pragma unroll
                for (int c = 0; c < TN; c++) br[c] = Bs[kk][tx + 16 * c];
#pragma unroll
                for (int r = 0; r < TM; r++)
#pragma unroll
                    for (int c = 0; c < TN; c++) acc[r][c] = mad<REPRO>(acc[r][c], ar[r], br[c]);
            }
            __syncthreads();
        }
        float *O = out + bi * p.m * p.n;
#pragma unroll
        for (int r = 0; r < TM; r++) {
            const u32 gi = m0 + ty + 16 * r;
            if (gi >= p.m) continue;
#pragma unroll
            for (int c = 0; c < TN; c++) {
                const u32 gj = n0 + tx + 16 * c;
                if (gj < p.n) O[gi * p.n + gj] = acc[r][c];
            }
        }
    }
}

// m = 1, transpose_b: out[b, j] = sum_k a[b, k] * B[b][j, k].
template <int DT, bool REPRO>
static __device__ void matvec(const float *a, const u8 *b, float *out, const MatmulParams &p) {
    const u32 lane = threadIdx.x & 31u;
    const u32 warps = blockDim.x >> 5;
    const u32 total = p.batch * p.n;
    // `o` is the same for the whole warp, so the shuffles below always run converged.
    for (u32 o = blockIdx.x * warps + (threadIdx.x >> 5); o < total; o += gridDim.x * warps) {
        const u32 bi = o / p.n, j = o % p.n;
        const float *x = a + bi * p.stride_a;
        const u32 wbase = bi * p.stride_b + j * p.k;
        float acc = 0.0f;
        for (u32 k0 = 0; k0 < p.k; k0 += 32u) {
            const u32 kk = k0 + lane;
            const float xv = kk < p.k ? x[kk] : 0.0f;
            const float wv = kk < p.k ? load_elem<DT>(b, wbase + kk) : 0.0f;
            if (REPRO) {
                const float prod = __fmul_rn(xv, wv);
                const u32 cnt = p.k - k0 < 32u ? p.k - k0 : 32u;
                for (u32 l = 0; l < cnt; l++) acc = __fadd_rn(acc, __shfl_sync(FULL_MASK, prod, l));
            } else {
                acc = fmaf(xv, wv, acc);
            }
        }
        if (!REPRO) {
            for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(FULL_MASK, acc, off);
        }
        if (lane == 0) out[o] = acc;
    }
}

extern "C" __global__ __launch_bounds__(BLOCK) void matmul_f32(const float *a, const u8 *b, float *out, MatmulParams p) { matmul_tiled<DT_F32, false>(a, b, out, p); }
extern "C" __global__ __launch_bounds__(BLOCK) void matmul_f32_repro(const float *a, const u8 *b, float *out, MatmulParams p) { matmul_tiled<DT_F32, true>(a, b, out, p); }
extern "C" __global__ __launch_bounds__(BLOCK) void matmul_f16(const float *a, const u8 *b, float *out, MatmulParams p) { matmul_tiled<DT_F16, false>(a, b, out, p); }
extern "C" __global__ __launch_bounds__(BLOCK) void matmul_f16_repro(const float *a, const u8 *b, float *out, MatmulParams p) { matmul_tiled<DT_F16, true>(a, b, out, p); }
extern "C" __global__ __launch_bounds__(BLOCK) void matmul_q8_0(const float *a, const u8 *b, float *out, MatmulParams p) { matmul_tiled<DT_Q8_0, false>(a, b, out, p); }
extern "C" __global__ __launch_bounds__(BLOCK) void matmul_q8_0_repro(const float *a, const u8 *b, float *out, MatmulParams p) { matmul_tiled<DT_Q8_0, true>(a, b, out, p); }
extern "C" __global__ __launch_bounds__(BLOCK) void matmul_q4_0(const float *a, const u8 *b, float *out, MatmulParams p) { matmul_tiled<DT_Q4_0, false>(a, b, out, p); }
extern "C" __global__ __launch_bounds__(BLOCK) void matmul_q4_0_repro(const float *a, const u8 *b, float *out, MatmulParams p) { matmul_tiled<DT_Q4_0, true>(a, b, out, p); }
extern "C" __global__ __launch_bounds__(BLOCK) void matmul_q4_1(const float *a, const u8 *b, float *out, MatmulParams p) { matmul_tiled<DT_Q4_1, false>(a, b, out, p); }
extern "C" __global__ __launch_bounds__(BLOCK) void matmul_q4_1_repro(const float *a, const u8 *b, float *out, MatmulParams p) { matmul_tiled<DT_Q4_1, true>(a, b, out, p); }

extern "C" __global__ __launch_bounds__(BLOCK) void matvec_f32(const float *a, const u8 *b, float *out, MatmulParams p) { matvec<DT_F32, false>(a, b, out, p); }
extern "C" __global__ __launch_bounds__(BLOCK) void matvec_f32_repro(const float *a, const u8 *b, float *out, MatmulParams p) { matvec<DT_F32, true>(a, b, out, p); }
extern "C" __global__ __launch_bounds__(BLOCK) void matvec_f16(const float *a, const u8 *b, float *out, MatmulParams p) { matvec<DT_F16, false>(a, b, out, p); }
extern "C" __global__ __launch_bounds__(BLOCK) void matvec_f16_repro(const float *a, const u8 *b, float *out, MatmulParams p) { matvec<DT_F16, true>(a, b, out, p); }
extern "C" __global__ __launch_bounds__(BLOCK) void matvec_q8_0(const float *a, const u8 *b, float *out, MatmulParams p) { matvec<DT_Q8_0, false>(a, b, out, p); }
extern "C" __global__ __launch_bounds__(BLOCK) void matvec_q8_0_repro(const float *a, const u8 *b, float *out, MatmulParams p) { matvec<DT_Q8_0, true>(a, b, out, p); }
extern "C" __global__ __launch_bounds__(BLOCK) void matvec_q4_0(const float *a, const u8 *b, float *out, MatmulParams p) { matvec<DT_Q4_0, false>(a, b, out, p); }
extern "C" __global__ __launch_bounds__(BLOCK) void matvec_q4_0_repro(const float *a, const u8 *b, float *out, MatmulParams p) { matvec<DT_Q4_0, true>(a, b, out, p); }
extern "C" __global__ __launch_bounds__(BLOCK) void matvec_q4_1(const float *a, const u8 *b, float *out, MatmulParams p) { matvec<DT_Q4_1, false>(a, b, out, p); }
extern "C" __global__ __launch_bounds__(BLOCK) void matvec_q4_1_repro(const float *a, const u8 *b, float *out, MatmulParams p) { matvec<DT_Q4_1, true>(a, b, out, p); }

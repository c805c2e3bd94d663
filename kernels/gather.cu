// Embedding lookup: out[r, c] = table[ids[r], c] for a table [vocab, dim] of f32, f16 or a GGUF
// block type (dequantized exactly as src/gpu/quant.rs defines), i32 ids of any shape, f32 output
// [n_ids, dim]. `check_ids_i32` records the lowest position of an id outside 0..vocab in `*bad`
// (which the host sets to 0xffffffff first); `gather_rows_*` writes 0 for such rows instead of
// reading outside the table, and the host turns `*bad` into an error.
// Launch: 256 threads per block, any grid size (grid-stride loops).

typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;

#define GRID_STRIDE(i, n) for (u32 i = blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += gridDim.x * blockDim.x)

// Mirrors `GatherParams` in src/gpu/cuda/plan.rs.
struct GatherParams {
    u32 n_ids, vocab, dim;
};

// ==== shared: dequant (identical in matmul.cu, gather.cu and cast.cu; mirrors gpu::quant) ====
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
// ==== end shared ====

extern "C" __global__ void check_ids_i32(const int *ids, u32 n, u32 vocab, u32 *bad) {
    GRID_STRIDE(r, n) {
        int id = ids[r];
        if (id < 0 || (u32)id >= vocab) atomicMin(bad, r);
    }
}

template <int DT>
static __device__ __forceinline__ void gather(const u8 *table, const int *ids, float *out, const GatherParams &p) {
    GRID_STRIDE(e, p.n_ids * p.dim) {
        u32 r = e / p.dim, c = e % p.dim;
        int id = ids[r];
        out[e] = (id < 0 || (u32)id >= p.vocab) ? 0.0f : load_elem<DT>(table, (u32)id * p.dim + c);
    }
}

extern "C" __global__ void gather_rows_f32(const u8 *table, const int *ids, float *out, GatherParams p) { gather<DT_F32>(table, ids, out, p); }
extern "C" __global__ void gather_rows_f16(const u8 *table, const int *ids, float *out, GatherParams p) { gather<DT_F16>(table, ids, out, p); }
extern "C" __global__ void gather_rows_q8_0(const u8 *table, const int *ids, float *out, GatherParams p) { gather<DT_Q8_0>(table, ids, out, p); }
extern "C" __global__ void gather_rows_q4_0(const u8 *table, const int *ids, float *out, GatherParams p) { gather<DT_Q4_0>(table, ids, out, p); }
extern "C" __global__ void gather_rows_q4_1(const u8 *table, const int *ids, float *out, GatherParams p) { gather<DT_Q4_1>(table, ids, out, p); }

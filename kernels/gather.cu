// Embedding lookup: out[r, c] = table[ids[r], c] for a table [vocab, dim] of f32, f16 or a GGUF
// block type (dequantized exactly as src/gpu/quant.rs defines), i32 ids of any shape, f32 output
// [n_ids, dim]. `check_ids_i32` records the lowest position of an id outside 0..vocab in `*bad`
// (which the host sets to 0xffffffff first); `gather_rows_*` writes 0 for such rows instead of
// reading outside the table, and the host turns `*bad` into an error.
// Launch: 256 threads per block, any grid size (grid-stride loops).

#include "common.cuh"

// Mirrors `GatherParams` in src/gpu/cuda/launch.rs.
struct GatherParams {
    u32 n_ids, vocab, dim;
};

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

// Rotary position embedding of f32 x [batch, seq, heads, dim]. The (cos, sin) table
// [seq, dim / 2, 2] comes from the host (`layout::rope_table`, rounded once to f32 there), so the
// kernel only multiplies and adds, each product rounded before the add (no FMA), mirroring `rope`
// in src/gpu/cpu/kernels.rs and shaders/rope.wgsl:
//   out0 = x0 * cos - x1 * sin,   out1 = x0 * sin + x1 * cos
// One thread per rotated pair; launch: 256 threads per block, any grid size (grid-stride loop).

#include "common.cuh"

// Mirrors `RopeParams` in src/gpu/cuda/launch.rs. mode 0: pairs (2i, 2i + 1) (GGML normal);
// mode 2: pairs (i, i + dim / 2) (NeoX).
struct RopeParams {
    u32 pairs, seq, heads, dim, mode;
};

extern "C" __global__ void rope_f32(const float *x, const float *table, float *out, RopeParams p) {
    const u32 half = p.dim / 2u;
    GRID_STRIDE(pi, p.pairs) {
        u32 i = pi % half;
        u32 row = pi / half;
        u32 t = (row / p.heads) % p.seq;
        u32 base = row * p.dim;
        u32 i0 = p.mode == 2u ? base + i : base + 2u * i;
        u32 i1 = p.mode == 2u ? base + i + half : i0 + 1u;
        float cs = table[(t * half + i) * 2u];
        float sn = table[(t * half + i) * 2u + 1u];
        float x0 = x[i0], x1 = x[i1];
        out[i0] = __fsub_rn(__fmul_rn(x0, cs), __fmul_rn(x1, sn));
        out[i1] = __fadd_rn(__fmul_rn(x0, sn), __fmul_rn(x1, cs));
    }
}

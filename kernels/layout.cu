// Layout copies for permute / slice / concat of 4-byte (f32, i32) and 2-byte (f16) elements.
// Reshape and append are plain device-to-device copies on the host side.
//
// * `permute_b32` / `permute_b16`: out (padded to 4-D [d0, d1, d2, d3], d0 implicit) element
//   (i0, i1, i2, i3) reads x at sum(i_k * strides[k]), where strides[k] is the input stride of the
//   input axis that becomes output axis k.
// * `copy_rows_b32` / `copy_rows_b16`: `outer` runs of `row` contiguous elements,
//   dst[dst_offset + o * dst_stride + w] = src[src_offset + o * src_stride + w]: a slice along an
//   axis, or one operand of a concat.
// Launch: 256 threads per block, any grid size (grid-stride loops).

#include "common.cuh"

// Mirrors `PermuteParams` in src/gpu/cuda/launch.rs.
struct PermuteParams {
    u32 n, d1, d2, d3;
    u32 strides[4];
};

// Mirrors `CopyParams` in src/gpu/cuda/launch.rs.
struct CopyParams {
    u32 outer, row, src_stride, src_offset, dst_stride, dst_offset;
};

template <typename T>
static __device__ __forceinline__ void permute(const T *x, T *out, const PermuteParams &p) {
    GRID_STRIDE(i, p.n) { out[i] = x[offset4(unravel4(i, p.d1, p.d2, p.d3), p.strides)]; }
}

template <typename T>
static __device__ __forceinline__ void copy_rows(const T *src, T *dst, const CopyParams &p) {
    GRID_STRIDE(e, p.outer * p.row) {
        u32 o = e / p.row, w = e % p.row;
        dst[p.dst_offset + o * p.dst_stride + w] = src[p.src_offset + o * p.src_stride + w];
    }
}

extern "C" __global__ void permute_b32(const u32 *x, u32 *out, PermuteParams p) { permute<u32>(x, out, p); }
extern "C" __global__ void permute_b16(const u16 *x, u16 *out, PermuteParams p) { permute<u16>(x, out, p); }
extern "C" __global__ void copy_rows_b32(const u32 *src, u32 *dst, CopyParams p) { copy_rows<u32>(src, dst, p); }
extern "C" __global__ void copy_rows_b16(const u16 *src, u16 *dst, CopyParams p) { copy_rows<u16>(src, dst, p); }

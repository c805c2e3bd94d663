// Host emulation of the CUDA built-ins that kernels/*.cu use, so the unit tests of the CUDA backend
// can run the real kernel sources on the CPU (src/gpu/cuda/emu.rs). Each kernel file is compiled as
// C++ with this header forced in front of it (and kernels/*.cuh beside it). Blocks run one at a time, each CUDA thread a fiber
// (ucontext) on one OS thread: `__shared__` variables become function statics (shared by the block),
// and `__syncthreads` / warp shuffles become barriers at which a fiber yields until every live thread
// of the block (or warp) has arrived. Arithmetic intrinsics are plain IEEE f32 operations
// (the harness is compiled with -ffp-contract=off, so nothing is fused unless a kernel calls fmaf).
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

struct emu_dim3 {
    unsigned int x, y, z;
};
// Set by the scheduler before it resumes a fiber.
extern emu_dim3 threadIdx;
extern emu_dim3 blockIdx;
extern emu_dim3 blockDim;
extern emu_dim3 gridDim;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

void __syncthreads();
uint32_t emu_shfl(uint32_t v, int src_lane);

static inline float emu_f(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}
static inline uint32_t emu_u(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

static inline float __uint_as_float(unsigned int u) { return emu_f(u); }
static inline unsigned int __float_as_uint(float f) { return emu_u(f); }
static inline float __fadd_rn(float a, float b) { return a + b; }
static inline float __fsub_rn(float a, float b) { return a - b; }
static inline float __fmul_rn(float a, float b) { return a * b; }
static inline float __fdiv_rn(float a, float b) { return a / b; }
static inline float __fsqrt_rn(float a) { return sqrtf(a); }

static inline int emu_lane() { return (int)(threadIdx.x & 31u); }

static inline float __shfl_sync(unsigned int, float v, int src, int = 32) { return emu_f(emu_shfl(emu_u(v), src & 31)); }
static inline unsigned int __shfl_sync(unsigned int, unsigned int v, int src, int = 32) { return emu_shfl(v, src & 31); }
static inline float __shfl_down_sync(unsigned int, float v, unsigned int d, int = 32) {
    int src = emu_lane() + (int)d;
    return emu_f(emu_shfl(emu_u(v), src < 32 ? src : emu_lane()));
}
static inline unsigned int __shfl_down_sync(unsigned int, unsigned int v, unsigned int d, int = 32) {
    int src = emu_lane() + (int)d;
    return emu_shfl(v, src < 32 ? src : emu_lane());
}
static inline float __shfl_xor_sync(unsigned int, float v, int m, int = 32) { return emu_f(emu_shfl(emu_u(v), emu_lane() ^ (m & 31))); }

static inline unsigned int atomicMin(unsigned int *p, unsigned int v) {
    unsigned int old = __atomic_load_n(p, __ATOMIC_SEQ_CST);
    while (v < old && !__atomic_compare_exchange_n(p, &old, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
    }
    return old;
}

// One registered kernel: a call thunk taking cuLaunchKernel-style argument pointers, and per
// parameter its size in bytes and whether it is a pointer (a device buffer).
struct EmuKernel {
    const char *name;
    void (*call)(void **args);
    int nparams;
    const int *sizes;
    const int *is_ptr;
};
void emu_register(const EmuKernel *k);
struct EmuRegistrar {
    explicit EmuRegistrar(const EmuKernel *k) { emu_register(k); }
};

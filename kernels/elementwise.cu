// Elementwise f32 kernels for the CUDA backend (src/gpu/cuda/), compiled at run time by NVRTC.
// The same ops and broadcasting rules as shaders/elementwise.wgsl: binary ops index each operand
// through per-operand strides over a 4-D output index space (stride 0 on broadcast axes).
// add/sub/mul/div/scale/relu use the correctly rounded __f*_rn intrinsics, so they equal the CPU
// reference bitwise whatever the compile options; gelu/silu/tanh/exp use the CUDA math library.
// Every kernel is a grid-stride loop: any grid size computes every element exactly once.

typedef unsigned int u32;

#define GRID_STRIDE(i, n) for (u32 i = blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += gridDim.x * blockDim.x)

// Mirrors `Broadcast4` in src/gpu/cuda/plan.rs: the output is [d0, d1, d2, d3] (d0 implicit),
// operand element (i0, i1, i2, i3) is at sum(i_k * stride_k).
struct Broadcast4 {
    u32 d1, d2, d3;
    u32 a_strides[4];
    u32 b_strides[4];
};

template <int OP>
static __device__ __forceinline__ float binop(float x, float y) {
    if (OP == 0) return __fadd_rn(x, y);
    if (OP == 1) return __fsub_rn(x, y);
    if (OP == 2) return __fmul_rn(x, y);
    return __fdiv_rn(x, y);
}

template <int OP>
static __device__ __forceinline__ void binary(const float *a, const float *b, float *out, u32 n, const Broadcast4 &p) {
    GRID_STRIDE(i, n) {
        u32 i3 = i % p.d3;
        u32 t = i / p.d3;
        u32 i2 = t % p.d2;
        t = t / p.d2;
        u32 i1 = t % p.d1;
        u32 i0 = t / p.d1;
        u32 ia = i0 * p.a_strides[0] + i1 * p.a_strides[1] + i2 * p.a_strides[2] + i3 * p.a_strides[3];
        u32 ib = i0 * p.b_strides[0] + i1 * p.b_strides[1] + i2 * p.b_strides[2] + i3 * p.b_strides[3];
        out[i] = binop<OP>(a[ia], b[ib]);
    }
}

extern "C" __global__ void add_f32(const float *a, const float *b, float *out, u32 n, Broadcast4 p) { binary<0>(a, b, out, n, p); }
extern "C" __global__ void sub_f32(const float *a, const float *b, float *out, u32 n, Broadcast4 p) { binary<1>(a, b, out, n, p); }
extern "C" __global__ void mul_f32(const float *a, const float *b, float *out, u32 n, Broadcast4 p) { binary<2>(a, b, out, n, p); }
extern "C" __global__ void div_f32(const float *a, const float *b, float *out, u32 n, Broadcast4 p) { binary<3>(a, b, out, n, p); }

// Unary ops share one signature; `factor` is only read by scale.
extern "C" __global__ void scale_f32(const float *x, float *out, u32 n, float factor) {
    GRID_STRIDE(i, n) { out[i] = __fmul_rn(x[i], factor); }
}

// NaN and -0 give +0, as `if x > 0 { x } else { 0 }` on the CPU.
extern "C" __global__ void relu_f32(const float *x, float *out, u32 n, float factor) {
    GRID_STRIDE(i, n) {
        float v = x[i];
        out[i] = v > 0.0f ? v : 0.0f;
    }
}

// The tanh approximation: 0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3))).
extern "C" __global__ void gelu_f32(const float *x, float *out, u32 n, float factor) {
    GRID_STRIDE(i, n) {
        float v = x[i];
        out[i] = 0.5f * v * (1.0f + tanhf(0.7978846f * (v + 0.044715f * v * v * v)));
    }
}

extern "C" __global__ void silu_f32(const float *x, float *out, u32 n, float factor) {
    GRID_STRIDE(i, n) {
        float v = x[i];
        out[i] = v / (1.0f + expf(-v));
    }
}

extern "C" __global__ void tanh_f32(const float *x, float *out, u32 n, float factor) {
    GRID_STRIDE(i, n) { out[i] = tanhf(x[i]); }
}

extern "C" __global__ void exp_f32(const float *x, float *out, u32 n, float factor) {
    GRID_STRIDE(i, n) { out[i] = expf(x[i]); }
}

// Elementwise f32 kernels for the CUDA backend, compiled at run time by NVRTC (no nvcc at build time).
// The same ops and broadcasting rules as shaders/elementwise.wgsl: binary ops index each operand
// through per-operand strides over a 4-D output index space (stride 0 on broadcast axes).
// Compile without fast math: add/sub/mul/div/scale/relu must be bitwise equal to the CPU reference.

struct Broadcast4 {
    unsigned int d1, d2, d3;
    unsigned int as[4];
    unsigned int bs[4];
};

__device__ __forceinline__ void operand_index(unsigned int i, const Broadcast4 &p, unsigned int &ia, unsigned int &ib) {
    unsigned int i3 = i % p.d3;
    unsigned int t = i / p.d3;
    unsigned int i2 = t % p.d2;
    t = t / p.d2;
    unsigned int i1 = t % p.d1;
    unsigned int i0 = t / p.d1;
    ia = i0 * p.as[0] + i1 * p.as[1] + i2 * p.as[2] + i3 * p.as[3];
    ib = i0 * p.bs[0] + i1 * p.bs[1] + i2 * p.bs[2] + i3 * p.bs[3];
}

#define BINARY(name, expr)                                                                              \
    extern "C" __global__ void name(const float *a, const float *b, float *out, unsigned int n, Broadcast4 p) { \
        unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;                                         \
        if (i < n) {                                                                                    \
            unsigned int ia, ib;                                                                        \
            operand_index(i, p, ia, ib);                                                                \
            float x = a[ia];                                                                            \
            float y = b[ib];                                                                            \
            out[i] = (expr);                                                                            \
        }                                                                                               \
    }

#define UNARY(name, expr)                                                                               \
    extern "C" __global__ void name(const float *a, float *out, unsigned int n, float factor) {         \
        unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;                                         \
        if (i < n) {                                                                                    \
            float x = a[i];                                                                             \
            out[i] = (expr);                                                                            \
        }                                                                                               \
    }

BINARY(add_f32, __fadd_rn(x, y))
BINARY(sub_f32, __fsub_rn(x, y))
BINARY(mul_f32, __fmul_rn(x, y))
BINARY(div_f32, __fdiv_rn(x, y))

UNARY(scale_f32, __fmul_rn(x, factor))
UNARY(relu_f32, (x > 0.0f ? x : 0.0f))
UNARY(gelu_f32, 0.5f * x * (1.0f + tanhf(0.7978846f * (x + 0.044715f * x * x * x))))
UNARY(silu_f32, x / (1.0f + expf(-x)))
UNARY(tanh_f32, tanhf(x))
UNARY(exp_f32, expf(x))

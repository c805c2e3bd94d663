/*
 * ao_gpu.h — the `ao_gpu` host module of ao-gpu-worker: tensor operations on the worker's tensor
 * backend (CPU, wgpu or CUDA; the worker reports which one, and whether it runs in reproducible
 * mode, in its attestations). See docs/abi.md ("Imports") for the rest of the actor ABI and
 * include/ao_gpu_worker.h for the actor helpers.
 *
 * Tensors are f32, row-major, rank 1..4. A tensor is an `ao_tensor` handle (a small positive
 * integer) to data that stays on the device between calls; only ao_gpu_read_f32 copies it back
 * into Wasm memory. Handles are valid for ONE evaluation (one message): every tensor is freed when
 * `handle` returns or the evaluation fails, so never keep a handle in a static variable for the
 * next message (it would be AO_GPU_UNKNOWN_HANDLE there). Handles are not reused within an
 * evaluation. Free tensors you no longer need: live tensors count against the device-memory quota.
 *
 * Errors: every function returns a status, 0 on success and a negative AO_GPU_* code for misuse
 * the actor can handle; the output handle is then not written and the worker stays healthy.
 * A pointer range outside linear memory (abuse) traps and ends the evaluation with an error.
 * Pointers are checked before anything else, so a trapping call has no effect.
 *
 * Gas: each call is charged, BEFORE the op runs and from shapes alone (so the same on every
 * backend and every run),
 *
 *     fuel = 100 + ceil(bytes / 4) + ceil(flops / 2)
 *
 * where bytes = the size of every input tensor plus the output (the upload for tensor_f32, the
 * read for read_f32) and flops is
 *     matmul                            2 * batch * m * n * k
 *     binary, scale, relu, reduce       1 per (output, resp. input) element
 *     exp, tanh, silu, rmsnorm          4 per element
 *     gelu, softmax, layernorm          8 per element
 * Calls that return an error status, ao_gpu_shape and ao_gpu_free cost 100. The fuel comes out of
 * the message's Compute-Limit (it is part of GasUsed); when it does not suffice the evaluation
 * ends out of fuel before the op runs.
 *
 * Quota: the bytes of an evaluation's live tensors are capped by the worker's configured device
 * memory per evaluation (default 256 MiB), and at most 4096 tensors may be live; beyond either,
 * AO_GPU_QUOTA_EXCEEDED.
 */
#ifndef AO_GPU_H
#define AO_GPU_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef int32_t ao_tensor;

/* Status codes. */
#define AO_GPU_OK                    0
#define AO_GPU_INVALID_ARGUMENT     (-1) /* unknown op code, rank outside 1..4 */
#define AO_GPU_SHAPE_MISMATCH       (-2) /* shapes do not fit the op, or len != product of the shape */
#define AO_GPU_UNKNOWN_HANDLE       (-3) /* never issued in this evaluation, or already freed */
#define AO_GPU_QUOTA_EXCEEDED       (-4) /* device-memory quota or live-tensor limit of the evaluation */
#define AO_GPU_DEVICE_OUT_OF_MEMORY (-5)
#define AO_GPU_BUFFER_TOO_SMALL     (-6) /* read_f32 capacity below the tensor's element count */
#define AO_GPU_UNSUPPORTED          (-7) /* the backend does not implement the op */
#define AO_GPU_DEVICE_ERROR         (-8)

/* ao_gpu_binary ops (numpy broadcasting). */
#define AO_GPU_ADD 0
#define AO_GPU_SUB 1
#define AO_GPU_MUL 2
#define AO_GPU_DIV 3

/* ao_gpu_unary ops. gelu is the tanh approximation; silu is x / (1 + exp(-x)). */
#define AO_GPU_RELU 0
#define AO_GPU_GELU 1
#define AO_GPU_SILU 2
#define AO_GPU_TANH 3
#define AO_GPU_EXP  4

/* ao_gpu_reduce ops, over the last axis (the output drops it; a 1-D input gives shape [1]).
 * argmax gives the first index of the maximum as an f32 value. */
#define AO_GPU_SUM    0
#define AO_GPU_MAX    1
#define AO_GPU_MEAN   2
#define AO_GPU_ARGMAX 3

#define AO_GPU_MAX_RANK 4

#define AO_GPU_IMPORT(name) __attribute__((import_module("ao_gpu"), import_name(name)))

/* Uploads len f32s from data as a tensor of shape[0..rank] (len must equal the product). */
AO_GPU_IMPORT("tensor_f32")
int32_t ao_gpu_tensor_f32(const float *data, int32_t len, const uint32_t *shape, int32_t rank, ao_tensor *out);

/* Copies the tensor's elements to out (room for capacity f32s; the whole range must be in memory). */
AO_GPU_IMPORT("read_f32")
int32_t ao_gpu_read_f32(ao_tensor t, float *out, int32_t capacity);

/* Writes the shape to out_shape (room for AO_GPU_MAX_RANK u32s) and the rank to out_rank. */
AO_GPU_IMPORT("shape")
int32_t ao_gpu_shape(ao_tensor t, uint32_t *out_shape, uint32_t *out_rank);

AO_GPU_IMPORT("free")
int32_t ao_gpu_free(ao_tensor t);

/* Batched a @ b over the last two axes; nonzero transpose flags transpose the last two axes of
 * that operand. Batch axes must be equal, or one operand 2-D. */
AO_GPU_IMPORT("matmul")
int32_t ao_gpu_matmul(ao_tensor a, ao_tensor b, int32_t transpose_a, int32_t transpose_b, ao_tensor *out);

AO_GPU_IMPORT("binary")
int32_t ao_gpu_binary(int32_t op, ao_tensor a, ao_tensor b, ao_tensor *out);

AO_GPU_IMPORT("unary")
int32_t ao_gpu_unary(int32_t op, ao_tensor x, ao_tensor *out);

/* x * factor. */
AO_GPU_IMPORT("scale")
int32_t ao_gpu_scale(ao_tensor x, float factor, ao_tensor *out);

/* Softmax over the last axis. */
AO_GPU_IMPORT("softmax")
int32_t ao_gpu_softmax(ao_tensor x, ao_tensor *out);

/* x / sqrt(mean(x^2) + eps) * w over the last axis; w has shape [last]. */
AO_GPU_IMPORT("rmsnorm")
int32_t ao_gpu_rmsnorm(ao_tensor x, ao_tensor w, float eps, ao_tensor *out);

/* (x - mean) / sqrt(var + eps) * w + b over the last axis (biased variance); w, b of shape [last]. */
AO_GPU_IMPORT("layernorm")
int32_t ao_gpu_layernorm(ao_tensor x, ao_tensor w, ao_tensor b, float eps, ao_tensor *out);

AO_GPU_IMPORT("reduce")
int32_t ao_gpu_reduce(int32_t op, ao_tensor x, ao_tensor *out);

#undef AO_GPU_IMPORT

#ifdef __cplusplus
}
#endif

#endif /* AO_GPU_H */

/*
 * ao_gpu.h — the `ao_gpu` host module of ao-gpu-worker: tensor operations on the worker's tensor
 * backend (CPU, wgpu or CUDA; the worker reports which one, and whether it runs in reproducible
 * mode, in its attestations). See docs/abi.md ("Imports") for the rest of the actor ABI and
 * include/ao_gpu_worker.h for the actor helpers.
 *
 * ---------------------------------------------------------------------------------------------
 * Tensors
 *
 * A tensor is an `ao_tensor` handle (a small positive integer) to data that stays on the device
 * between calls; only ao_gpu_read / ao_gpu_read_f32 copy it back into Wasm memory. Tensors are
 * row-major and contiguous, rank 1..4 (a dimension may be 0), of one dtype:
 *
 *   AO_GPU_F32, AO_GPU_F16, AO_GPU_I32    one little-endian value per element
 *   AO_GPU_Q8_0, AO_GPU_Q4_0, AO_GPU_Q4_1 GGUF blocks of 32 elements along the last axis (which
 *                                         must be a multiple of 32), exactly as in a .gguf file:
 *     q8_0  34 bytes: f16 d; int8 qs[32]              x[j] = d * qs[j]
 *     q4_0  18 bytes: f16 d; uint8 qs[16]             x[j] = d * ((qs[j] & 15) - 8),  x[j+16] = d * ((qs[j] >> 4) - 8)
 *     q4_1  20 bytes: f16 d; f16 m; uint8 qs[16]      x[j] = d * (qs[j] & 15) + m,    x[j+16] = d * (qs[j] >> 4) + m
 *
 * Arithmetic is f32. Other dtypes enter through ao_gpu_cast, ao_gpu_matmul (an f16 or quantized
 * right operand, f32 accumulation), ao_gpu_gather (any table, i32 ids) and the layout ops (any
 * unquantized dtype; reshape any dtype). argmax (ao_gpu_reduce) gives i32 indices. An operand of
 * a dtype the op does not take is AO_GPU_DTYPE_MISMATCH.
 *
 * Handles are valid for ONE evaluation (one message): every tensor is freed when `handle`
 * returns or the evaluation fails, so never keep a handle in a static variable for the next
 * message (it would be AO_GPU_UNKNOWN_HANDLE there). Handles are never reused within an
 * evaluation. Free tensors you no longer need: live tensors count against the quota.
 *
 * Constants (ao_gpu_constant) are the exception: model weights named by an Arweave item id and
 * the sha256 of the item's data. The worker fetches the item from its gateway once, verifies it
 * and keeps the device tensor across messages and actors; each evaluation still asks for a
 * handle (cheap after the first time). A constant handle is read-only (ao_gpu_append on it is
 * AO_GPU_READ_ONLY), does not count against the device-memory quota, and ao_gpu_free releases
 * only the handle. When the worker cannot reach its gateway the message is not failed: the
 * evaluation is abandoned and run again later (the actor never sees it).
 *
 * ---------------------------------------------------------------------------------------------
 * Errors
 *
 * Every function returns a status: 0 on success, a negative AO_GPU_* code for misuse the actor
 * can handle; the output is then not written (unless said otherwise) and the worker stays
 * healthy. A pointer range outside linear memory (abuse) traps and ends the evaluation with an
 * error. Pointers are checked before anything else, so a trapping call has no effect.
 *
 * ---------------------------------------------------------------------------------------------
 * Gas
 *
 * Each op is charged BEFORE it runs, from shapes and dtypes alone (so the same on every backend
 * and every run):
 *
 *     fuel = 100 + ceil(bytes / 4) + ceil(flops / 2)           (a single call)
 *     fuel =  20 + ceil(bytes / 4) + ceil(flops / 2)           (one command of ao_gpu_run, which
 *                                                              itself costs 100 once)
 *
 * where "size" is storage bytes (dtype-aware: a q4_1 tensor of n elements is n / 32 * 20 bytes)
 * and, unless the table says otherwise, bytes = size of every operand + size of the output:
 *
 *   op                         bytes                                 flops
 *   tensor, tensor_f32         size of the tensor                    0
 *   constant                   size of the tensor (hit or miss)      0
 *   read                       size of the tensor                    0
 *   read_f32                   4 * elements                          0
 *   matmul                     operands + output                     2 * batch * m * n * k
 *   binary                     operands + output                     1 per output element
 *   unary relu, scale          operands + output                     1 per element
 *   unary exp, tanh, silu      operands + output                     4 per element
 *   unary gelu                 operands + output                     8 per element
 *   softmax, layernorm         operands + output                     8 per element
 *   rmsnorm                    operands + output                     4 per element
 *   reduce                     operands + output                     1 per input element
 *   cast                       operands + output                     2 per element
 *   rope                       operands + output                     3 per element
 *   reshape, permute, slice,   operands + output                     0
 *     concat
 *   append                     2 * size of rows                      0
 *   gather                     ids + rows looked up                  1 per output element
 *                                (ids elements * table row size)
 *                                + output
 *   attention                  q + k + v + output                    batch * heads_q * pairs * (4 * head_dim + 8),
 *                                                                    pairs = sum over i < seq_q of
 *                                                                            min(pos0 + i + 1, seq_k)
 *   shape, dtype, free         -                                     - (100; a `free` command: 20)
 *
 * A call that fails its checks (a bad code, unknown handle, shape or dtype mismatch, quota)
 * costs only the 100 (a command: the 20). A status that arises while the op runs (a gather id
 * outside the table, a constant that is missing or fails its digest, device out of memory)
 * comes after the full charge. The fuel comes out of the message's Compute-Limit (it is part of
 * GasUsed); when it does not suffice the evaluation ends out of fuel before the op runs.
 *
 * ---------------------------------------------------------------------------------------------
 * Quota
 *
 * The storage bytes of an evaluation's live tensors (constants excepted) are capped by the
 * worker's device memory per evaluation (default 256 MiB; ao_gpu_append counts the cache's new
 * size), and at most 4096 handles may be live; beyond either, AO_GPU_QUOTA_EXCEEDED. Constants
 * have their own cap (the worker's constant cache, default 1 GiB): the constants ONE evaluation
 * holds may not exceed it (AO_GPU_QUOTA_EXCEEDED).
 */
#ifndef AO_GPU_H
#define AO_GPU_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef int32_t ao_tensor;

/* Status codes. */
#define AO_GPU_OK                    0
#define AO_GPU_INVALID_ARGUMENT     (-1)  /* op/dtype/mode code, rank, axis, negative length, record field, item id */
#define AO_GPU_SHAPE_MISMATCH       (-2)  /* shapes do not fit the op, byte length != the shape's size, gather id outside the table */
#define AO_GPU_UNKNOWN_HANDLE       (-3)  /* never issued in this evaluation, or already freed */
#define AO_GPU_QUOTA_EXCEEDED       (-4)  /* device-memory quota or live-handle limit of the evaluation, or the constant cap */
#define AO_GPU_DEVICE_OUT_OF_MEMORY (-5)
#define AO_GPU_BUFFER_TOO_SMALL     (-6)  /* read / read_f32 capacity below the tensor's size */
#define AO_GPU_UNSUPPORTED          (-7)  /* the backend does not implement the op (or the worker has no constant source) */
#define AO_GPU_DEVICE_ERROR         (-8)
#define AO_GPU_DTYPE_MISMATCH       (-9)  /* an operand's dtype is not one the op takes, or a quantized last axis % 32 != 0 */
#define AO_GPU_READ_ONLY            (-10) /* append to a constant */
#define AO_GPU_CONSTANT_MISMATCH    (-11) /* the item's data does not have the sha256 given to ao_gpu_constant */
#define AO_GPU_NOT_FOUND            (-12) /* the constant's item does not exist */

/* The name of a status code, such as "SHAPE_MISMATCH", for error messages ("OK" for 0). */
static inline const char *ao_gpu_status_name(int32_t status) {
    switch (status) {
    case AO_GPU_OK: return "OK";
    case AO_GPU_INVALID_ARGUMENT: return "INVALID_ARGUMENT";
    case AO_GPU_SHAPE_MISMATCH: return "SHAPE_MISMATCH";
    case AO_GPU_UNKNOWN_HANDLE: return "UNKNOWN_HANDLE";
    case AO_GPU_QUOTA_EXCEEDED: return "QUOTA_EXCEEDED";
    case AO_GPU_DEVICE_OUT_OF_MEMORY: return "DEVICE_OUT_OF_MEMORY";
    case AO_GPU_BUFFER_TOO_SMALL: return "BUFFER_TOO_SMALL";
    case AO_GPU_UNSUPPORTED: return "UNSUPPORTED";
    case AO_GPU_DEVICE_ERROR: return "DEVICE_ERROR";
    case AO_GPU_DTYPE_MISMATCH: return "DTYPE_MISMATCH";
    case AO_GPU_READ_ONLY: return "READ_ONLY";
    case AO_GPU_CONSTANT_MISMATCH: return "CONSTANT_MISMATCH";
    case AO_GPU_NOT_FOUND: return "NOT_FOUND";
    default: return "UNKNOWN_STATUS";
    }
}

/* Dtypes. */
#define AO_GPU_F32  0
#define AO_GPU_F16  1
#define AO_GPU_I32  2
#define AO_GPU_Q8_0 3
#define AO_GPU_Q4_0 4
#define AO_GPU_Q4_1 5

/* ao_gpu_binary ops (numpy broadcasting). */
#define AO_GPU_ADD 0
#define AO_GPU_SUB 1
#define AO_GPU_MUL 2
#define AO_GPU_DIV 3

/* ao_gpu_unary ops. gelu is the tanh approximation; silu is x / (1 + exp(-x)). In reproducible
 * mode every op, these included, gives the same bits on every backend. */
#define AO_GPU_RELU 0
#define AO_GPU_GELU 1
#define AO_GPU_SILU 2
#define AO_GPU_TANH 3
#define AO_GPU_EXP  4

/* ao_gpu_reduce ops, over the last axis (the output drops it; a 1-D input gives shape [1]).
 * argmax gives the first index of the maximum as an i32 tensor (ao_gpu_read_f32 reads it as
 * f32 values; it can feed ao_gpu_gather directly). */
#define AO_GPU_SUM    0
#define AO_GPU_MAX    1
#define AO_GPU_MEAN   2
#define AO_GPU_ARGMAX 3

/* ao_gpu_rope modes: which features of a head rotate together.
 * NORMAL: (2i, 2i+1), GGML's default and what GGUF llama-family weights (SmolLM2 included)
 *         expect: the converter permuted Q and K for it.
 * NEOX:   (i, i + head_dim/2), GPT-NeoX and Hugging Face checkpoints. */
#define AO_GPU_ROPE_NORMAL 0
#define AO_GPU_ROPE_NEOX   2

#define AO_GPU_MAX_RANK 4
/* Characters of an item id given to ao_gpu_constant (base64url of 32 bytes, no padding). */
#define AO_GPU_ITEM_ID_LEN 43

#define AO_GPU_IMPORT(name) __attribute__((import_module("ao_gpu"), import_name(name)))

/* ---- tensors in and out ---- */

/* Uploads byte_len bytes of storage as a tensor of `dtype` and shape[0..rank]; byte_len must be
 * the shape's storage size (else AO_GPU_SHAPE_MISMATCH). */
AO_GPU_IMPORT("tensor")
int32_t ao_gpu_tensor(int32_t dtype, const void *data, int32_t byte_len, const uint32_t *shape, int32_t rank, ao_tensor *out);

/* Uploads len f32s (len must equal the product of the shape). Same as ao_gpu_tensor(AO_GPU_F32,
 * data, 4 * len, ...). */
AO_GPU_IMPORT("tensor_f32")
int32_t ao_gpu_tensor_f32(const float *data, int32_t len, const uint32_t *shape, int32_t rank, ao_tensor *out);

/* A constant: the data of Arweave item `id` (AO_GPU_ITEM_ID_LEN base64url characters, no NUL
 * needed) whose sha256 is `sha256` (32 bytes), as a tensor of `dtype` and shape[0..rank] (the
 * item's data must be exactly that storage size, else AO_GPU_SHAPE_MISMATCH). Read-only; see
 * "Constants" above. Upload a GGUF tensor's bytes as a data item and pass its id and digest. */
AO_GPU_IMPORT("constant")
int32_t ao_gpu_constant(const char *id, const uint8_t *sha256, int32_t dtype, const uint32_t *shape, int32_t rank, ao_tensor *out);

/* Copies the tensor's storage bytes to out (room for capacity bytes; the whole range must be in
 * memory) and writes their number to *out_len, which is also written when the result is
 * AO_GPU_BUFFER_TOO_SMALL (so a caller can ask with capacity 0). */
AO_GPU_IMPORT("read")
int32_t ao_gpu_read(ao_tensor t, void *out, int32_t capacity, uint32_t *out_len);

/* Copies the tensor's elements to out as f32 values (room for capacity f32s), converting from
 * any dtype (quantized: dequantized; i32: converted). */
AO_GPU_IMPORT("read_f32")
int32_t ao_gpu_read_f32(ao_tensor t, float *out, int32_t capacity);

/* Writes the shape to out_shape (room for AO_GPU_MAX_RANK u32s; only rank are written) and the
 * rank to out_rank. */
AO_GPU_IMPORT("shape")
int32_t ao_gpu_shape(ao_tensor t, uint32_t *out_shape, uint32_t *out_rank);

/* The tensor's dtype code (>= 0), or a negative status (AO_GPU_UNKNOWN_HANDLE). */
AO_GPU_IMPORT("dtype")
int32_t ao_gpu_dtype(ao_tensor t);

AO_GPU_IMPORT("free")
int32_t ao_gpu_free(ao_tensor t);

/* ---- math ---- */

/* Batched a @ b over the last two axes, f32 out; nonzero transpose flags transpose the last two
 * axes of that operand. Batch axes must be equal, or one operand 2-D. a is f32; b is f32, f16
 * or quantized. A quantized b must be stored [n, k] (blocks along k) with transpose_b = 1:
 * y = x @ W^T for a GGUF weight W of shape [out, in]. */
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

/* A converted copy: f32 <-> f16 (round to nearest even), f32 -> i32 (toward zero, saturating,
 * NaN to 0), i32 -> f32, quantized -> f32, f32 -> quantized (GGUF's reference quantizer), and
 * the identity. */
AO_GPU_IMPORT("cast")
int32_t ao_gpu_cast(ao_tensor x, int32_t dtype, ao_tensor *out);

/* Rotary position embedding of f32 x [.., seq, heads, head_dim] (rank 3 or 4, head_dim even):
 * row t is at position pos0 + t; pair i rotates by pos * theta^(-2i/head_dim) (theta: 10000 for
 * llama; in a GGUF file, llama.rope.freq_base). mode: AO_GPU_ROPE_*. */
AO_GPU_IMPORT("rope")
int32_t ao_gpu_rope(ao_tensor x, int32_t pos0, float theta, int32_t mode, ao_tensor *out);

/* Causal scaled-dot-product attention, all f32: q [.., seq_q, heads_q, head_dim], k and v
 * [.., seq_k, heads_kv, head_dim] (same leading axes; heads_q a multiple of heads_kv: query head
 * h reads key/value head h / (heads_q / heads_kv)). Query row i is at position pos0 + i and
 * attends keys j <= pos0 + i (j < seq_k): softmax(q . k_j * scale) @ v. The output has q's
 * shape. scale is usually 1 / sqrt(head_dim). With a key/value cache: append the new rows, then
 * call with pos0 = the position of the first new query. */
AO_GPU_IMPORT("attention")
int32_t ao_gpu_attention(ao_tensor q, ao_tensor k, ao_tensor v, int32_t pos0, float scale, ao_tensor *out);

/* ---- layout ---- */

/* The same data under shape[0..rank] (same element count; any dtype, quantized keeps whole
 * blocks in the last axis). */
AO_GPU_IMPORT("reshape")
int32_t ao_gpu_reshape(ao_tensor x, const uint32_t *shape, int32_t rank, ao_tensor *out);

/* A transposed copy: output axis i is input axis axes[i]; rank must be x's rank (unquantized). */
AO_GPU_IMPORT("permute")
int32_t ao_gpu_permute(ao_tensor x, const uint32_t *axes, int32_t rank, ao_tensor *out);

/* A copy of [start, start + len) along axis (unquantized). */
AO_GPU_IMPORT("slice")
int32_t ao_gpu_slice(ao_tensor x, int32_t axis, int32_t start, int32_t len, ao_tensor *out);

/* a then b along axis: same dtype (unquantized), equal other axes. */
AO_GPU_IMPORT("concat")
int32_t ao_gpu_concat(ao_tensor a, ao_tensor b, int32_t axis, ao_tensor *out);

/* Appends rows to cache along axis 0, IN PLACE: cache keeps its handle and grows (amortized
 * O(rows)); same dtype (unquantized), all axes but the first equal. A cache may start empty,
 * e.g. shape [0, heads_kv, head_dim] uploaded with byte_len 0. The quota counts the new size. */
AO_GPU_IMPORT("append")
int32_t ao_gpu_append(ao_tensor cache, ao_tensor rows);

/* Embedding lookup: table [vocab, dim] (f32, f16 or quantized), ids i32 of any shape (rank <= 3);
 * out is f32 of shape ids.shape + [dim]. An id outside 0..vocab is AO_GPU_SHAPE_MISMATCH. */
AO_GPU_IMPORT("gather")
int32_t ao_gpu_gather(ao_tensor table, ao_tensor ids, ao_tensor *out);

/* ---- batched submission ---- */

/* Command op codes (ao_gpu_cmd.op). */
#define AO_GPU_OP_MATMUL    1  /* in a, b;    i[0] transpose_a, i[1] transpose_b */
#define AO_GPU_OP_BINARY    2  /* in a, b;    i[0] AO_GPU_ADD.. */
#define AO_GPU_OP_UNARY     3  /* in x;       i[0] AO_GPU_RELU.. */
#define AO_GPU_OP_SCALE     4  /* in x;       f[0] factor */
#define AO_GPU_OP_SOFTMAX   5  /* in x */
#define AO_GPU_OP_RMSNORM   6  /* in x, w;    f[0] eps */
#define AO_GPU_OP_LAYERNORM 7  /* in x, w, b; f[0] eps */
#define AO_GPU_OP_REDUCE    8  /* in x;       i[0] AO_GPU_SUM.. */
#define AO_GPU_OP_CAST      9  /* in x;       i[0] dtype */
#define AO_GPU_OP_RESHAPE   10 /* in x;       i[0] rank, i[1..rank] shape */
#define AO_GPU_OP_PERMUTE   11 /* in x;       i[0] rank, i[1..rank] axes */
#define AO_GPU_OP_SLICE     12 /* in x;       i[0] axis, i[1] start, i[2] len */
#define AO_GPU_OP_CONCAT    13 /* in a, b;    i[0] axis */
#define AO_GPU_OP_APPEND    14 /* in cache, rows (in place; out = the cache's handle) */
#define AO_GPU_OP_GATHER    15 /* in table, ids */
#define AO_GPU_OP_ROPE      16 /* in x;       i[0] pos0, i[1] mode; f[0] theta */
#define AO_GPU_OP_ATTENTION 17 /* in q, k, v; i[0] pos0; f[0] scale */
#define AO_GPU_OP_FREE      18 /* in x (out = 0) */

/* An operand that names the output of command i (0-based) of the same list; i must be before
 * the command that uses it. Any other operand is a handle (> 0). */
#define AO_GPU_OUT(i) ((ao_tensor)(-(int32_t)(i) - 1))

/* One command of ao_gpu_run: 64 bytes, little-endian, 4-byte aligned. Fields a command's op
 * does not use are ignored, except `reserved`, which must be zero. */
typedef struct ao_gpu_cmd {
    int32_t op;          /* offset  0: AO_GPU_OP_* */
    ao_tensor in[4];     /* offset  4: operands, in the order of the single call; handles or AO_GPU_OUT(i) */
    int32_t i[6];        /* offset 20: integer parameters (see the op codes) */
    float f[2];          /* offset 44: float parameters */
    ao_tensor out;       /* offset 52: written by the host: the new handle (append: the cache; free: 0) */
    uint32_t reserved[2];/* offset 56: must be 0 */
} ao_gpu_cmd;

#ifdef __cplusplus
#define AO_GPU_STATIC_ASSERT static_assert
#else
#define AO_GPU_STATIC_ASSERT _Static_assert
#endif
AO_GPU_STATIC_ASSERT(sizeof(ao_gpu_cmd) == 64, "ao_gpu_cmd is 64 bytes");
AO_GPU_STATIC_ASSERT(offsetof(ao_gpu_cmd, op) == 0, "ao_gpu_cmd.op at 0");
AO_GPU_STATIC_ASSERT(offsetof(ao_gpu_cmd, in) == 4, "ao_gpu_cmd.in at 4");
AO_GPU_STATIC_ASSERT(offsetof(ao_gpu_cmd, i) == 20, "ao_gpu_cmd.i at 20");
AO_GPU_STATIC_ASSERT(offsetof(ao_gpu_cmd, f) == 44, "ao_gpu_cmd.f at 44");
AO_GPU_STATIC_ASSERT(offsetof(ao_gpu_cmd, out) == 52, "ao_gpu_cmd.out at 52");
AO_GPU_STATIC_ASSERT(offsetof(ao_gpu_cmd, reserved) == 56, "ao_gpu_cmd.reserved at 56");
#undef AO_GPU_STATIC_ASSERT

/* Runs cmds[0..n] in order with one host call and one device submission (reads stay separate
 * calls). Each command is checked and charged like its single call (its fee is 20 instead of
 * 100; the run call costs 100 once) and then runs; its output handle is written to cmds[k].out.
 * The first command that fails stops the list: its status is returned and *out_done is its
 * index; the outputs of the commands before it stay live (free them or let the evaluation end).
 * On success *out_done = n. A cmds range outside memory traps before anything runs. */
AO_GPU_IMPORT("run")
int32_t ao_gpu_run(ao_gpu_cmd *cmds, int32_t n, int32_t *out_done);

#undef AO_GPU_IMPORT

/* Command builders. */
static inline ao_gpu_cmd ao_gpu_cmd_make(int32_t op, ao_tensor a, ao_tensor b, ao_tensor c) {
    ao_gpu_cmd cmd;
    memset(&cmd, 0, sizeof cmd);
    cmd.op = op;
    cmd.in[0] = a;
    cmd.in[1] = b;
    cmd.in[2] = c;
    return cmd;
}
static inline ao_gpu_cmd ao_gpu_cmd_matmul(ao_tensor a, ao_tensor b, int32_t transpose_a, int32_t transpose_b) {
    ao_gpu_cmd c = ao_gpu_cmd_make(AO_GPU_OP_MATMUL, a, b, 0);
    c.i[0] = transpose_a;
    c.i[1] = transpose_b;
    return c;
}
static inline ao_gpu_cmd ao_gpu_cmd_binary(int32_t op, ao_tensor a, ao_tensor b) {
    ao_gpu_cmd c = ao_gpu_cmd_make(AO_GPU_OP_BINARY, a, b, 0);
    c.i[0] = op;
    return c;
}
static inline ao_gpu_cmd ao_gpu_cmd_unary(int32_t op, ao_tensor x) {
    ao_gpu_cmd c = ao_gpu_cmd_make(AO_GPU_OP_UNARY, x, 0, 0);
    c.i[0] = op;
    return c;
}
static inline ao_gpu_cmd ao_gpu_cmd_scale(ao_tensor x, float factor) {
    ao_gpu_cmd c = ao_gpu_cmd_make(AO_GPU_OP_SCALE, x, 0, 0);
    c.f[0] = factor;
    return c;
}
static inline ao_gpu_cmd ao_gpu_cmd_softmax(ao_tensor x) { return ao_gpu_cmd_make(AO_GPU_OP_SOFTMAX, x, 0, 0); }
static inline ao_gpu_cmd ao_gpu_cmd_rmsnorm(ao_tensor x, ao_tensor w, float eps) {
    ao_gpu_cmd c = ao_gpu_cmd_make(AO_GPU_OP_RMSNORM, x, w, 0);
    c.f[0] = eps;
    return c;
}
static inline ao_gpu_cmd ao_gpu_cmd_layernorm(ao_tensor x, ao_tensor w, ao_tensor b, float eps) {
    ao_gpu_cmd c = ao_gpu_cmd_make(AO_GPU_OP_LAYERNORM, x, w, b);
    c.f[0] = eps;
    return c;
}
static inline ao_gpu_cmd ao_gpu_cmd_reduce(int32_t op, ao_tensor x) {
    ao_gpu_cmd c = ao_gpu_cmd_make(AO_GPU_OP_REDUCE, x, 0, 0);
    c.i[0] = op;
    return c;
}
static inline ao_gpu_cmd ao_gpu_cmd_cast(ao_tensor x, int32_t dtype) {
    ao_gpu_cmd c = ao_gpu_cmd_make(AO_GPU_OP_CAST, x, 0, 0);
    c.i[0] = dtype;
    return c;
}
/* dims[0..rank] (rank 1..4); for AO_GPU_OP_RESHAPE the shape, for AO_GPU_OP_PERMUTE the axes. */
static inline ao_gpu_cmd ao_gpu_cmd_dims(int32_t op, ao_tensor x, int32_t rank, const uint32_t *dims) {
    ao_gpu_cmd c = ao_gpu_cmd_make(op, x, 0, 0);
    c.i[0] = rank;
    for (int32_t k = 0; k < rank && k < AO_GPU_MAX_RANK; k++) c.i[1 + k] = (int32_t)dims[k];
    return c;
}
static inline ao_gpu_cmd ao_gpu_cmd_reshape(ao_tensor x, int32_t rank, const uint32_t *shape) {
    return ao_gpu_cmd_dims(AO_GPU_OP_RESHAPE, x, rank, shape);
}
static inline ao_gpu_cmd ao_gpu_cmd_permute(ao_tensor x, int32_t rank, const uint32_t *axes) {
    return ao_gpu_cmd_dims(AO_GPU_OP_PERMUTE, x, rank, axes);
}
static inline ao_gpu_cmd ao_gpu_cmd_slice(ao_tensor x, int32_t axis, int32_t start, int32_t len) {
    ao_gpu_cmd c = ao_gpu_cmd_make(AO_GPU_OP_SLICE, x, 0, 0);
    c.i[0] = axis;
    c.i[1] = start;
    c.i[2] = len;
    return c;
}
static inline ao_gpu_cmd ao_gpu_cmd_concat(ao_tensor a, ao_tensor b, int32_t axis) {
    ao_gpu_cmd c = ao_gpu_cmd_make(AO_GPU_OP_CONCAT, a, b, 0);
    c.i[0] = axis;
    return c;
}
static inline ao_gpu_cmd ao_gpu_cmd_append(ao_tensor cache, ao_tensor rows) { return ao_gpu_cmd_make(AO_GPU_OP_APPEND, cache, rows, 0); }
static inline ao_gpu_cmd ao_gpu_cmd_gather(ao_tensor table, ao_tensor ids) { return ao_gpu_cmd_make(AO_GPU_OP_GATHER, table, ids, 0); }
static inline ao_gpu_cmd ao_gpu_cmd_rope(ao_tensor x, int32_t pos0, float theta, int32_t mode) {
    ao_gpu_cmd c = ao_gpu_cmd_make(AO_GPU_OP_ROPE, x, 0, 0);
    c.i[0] = pos0;
    c.i[1] = mode;
    c.f[0] = theta;
    return c;
}
static inline ao_gpu_cmd ao_gpu_cmd_attention(ao_tensor q, ao_tensor k, ao_tensor v, int32_t pos0, float scale) {
    ao_gpu_cmd c = ao_gpu_cmd_make(AO_GPU_OP_ATTENTION, q, k, v);
    c.i[0] = pos0;
    c.f[0] = scale;
    return c;
}
static inline ao_gpu_cmd ao_gpu_cmd_free(ao_tensor x) { return ao_gpu_cmd_make(AO_GPU_OP_FREE, x, 0, 0); }

#ifdef __cplusplus
}
#endif

#endif /* AO_GPU_H */

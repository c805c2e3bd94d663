/*
 * wasi_ephemeral_nn.h — the `wasi_ephemeral_nn` host module of ao-gpu-worker for C actors: the
 * legacy (witx) wasi-nn ABI with GGML semantics, as WasmEdge's and WAMR's GGML backends expose it
 * (docs/wasi-nn.md: the facts, their sources and what differs).
 *
 * Text in, text out:
 *
 *   graph g; graph_execution_context c;
 *   load_by_name_with_config("smollm2", 7, "{\"n-predict\":32}", 16, &g);   // a model the worker registered
 *   init_execution_context(g, &c);
 *   tensor t = { {dims, 1}, TENSOR_TYPE_U8, {(uint8_t *)prompt, strlen(prompt)} };
 *   set_input(c, 0, &t);                       // index 0: the prompt (UTF-8; <|im_start|> etc. are special tokens)
 *   compute(c);                                // reads the prompt, generates (greedy unless "temp" > 0)
 *   get_output(c, 0, buf, sizeof buf, &n);     // index 0: the text; index 1: {"input_tokens":..,"output_tokens":..}
 *
 * Token by token: compute_single (ERR_END_OF_SEQUENCE at the end), get_output_single, fini_single.
 * Options (JSON, WasmEdge's names): n-predict, ctx-size, temp, top-p, repeat-penalty, seed.
 *
 * Graphs and contexts live for one evaluation (one message): load again in the next one (a
 * model loaded by name stays on the worker's device, so that is cheap). Every call costs gas,
 * and the engine's tensor ops are charged by their bytes and FLOPs as ao_gpu commands are.
 */
#ifndef WASI_EPHEMERAL_NN_H
#define WASI_EPHEMERAL_NN_H

#include <stdint.h>

#define WASI_NN_IMPORT(name) __attribute__((import_module("wasi_ephemeral_nn"), import_name(name)))

/* nn_errno: WasmEdge's numbers. */
typedef enum {
    success = 0,
    invalid_argument = 1,
    invalid_encoding = 2,
    missing_memory = 3,
    busy = 4,
    runtime_error = 5,
    unsupported_operation = 6,
    too_large = 7,
    not_found = 8,
    end_of_sequence = 100, /* compute_single: generation ended */
    context_full = 101,    /* the context (ctx-size) has no room for another token */
    prompt_tool_long = 102, /* the prompt does not fit in ctx-size (WasmEdge's spelling) */
    model_not_found = 103, /* load_by_name: no model of that name is registered */
} wasi_nn_error;

typedef enum { openvino = 0, onnx, tensorflow, pytorch, tensorflowlite, autodetect, ggml } graph_encoding;
typedef enum { cpu = 0, gpu, tpu, auto_target } execution_target;
typedef enum { fp16 = 0, fp32, fp64, u8, i32, i64 } tensor_type;

typedef uint32_t graph;
typedef uint32_t graph_execution_context;

typedef struct {
    uint8_t *buf;
    uint32_t size;
} graph_builder;

typedef struct {
    uint32_t *buf;
    uint32_t size;
} tensor_dimensions;

typedef struct {
    uint8_t *buf;
    uint32_t size;
} tensor_data_t;

/* The witx tensor record: 20 bytes on wasm32 (dimensions, type, data). */
typedef struct {
    tensor_dimensions dimensions;
    tensor_type type;
    tensor_data_t data;
} tensor;

typedef uint8_t *tensor_data;

/* GGUF bytes as builders[0] (encoding ggml); builders[1], when given, is a JSON options text. */
WASI_NN_IMPORT("load")
wasi_nn_error load(graph_builder *builders, uint32_t count, graph_encoding encoding, execution_target target, graph *g);
WASI_NN_IMPORT("load_by_name")
wasi_nn_error load_by_name(const char *name, uint32_t name_len, graph *g);
WASI_NN_IMPORT("load_by_name_with_config")
wasi_nn_error load_by_name_with_config(const char *name, uint32_t name_len, const char *config, uint32_t config_len, graph *g);
WASI_NN_IMPORT("init_execution_context")
wasi_nn_error init_execution_context(graph g, graph_execution_context *ctx);
WASI_NN_IMPORT("set_input")
wasi_nn_error set_input(graph_execution_context ctx, uint32_t index, tensor *t);
WASI_NN_IMPORT("compute")
wasi_nn_error compute(graph_execution_context ctx);
WASI_NN_IMPORT("get_output")
wasi_nn_error get_output(graph_execution_context ctx, uint32_t index, tensor_data out, uint32_t max, uint32_t *written);
WASI_NN_IMPORT("compute_single")
wasi_nn_error compute_single(graph_execution_context ctx);
WASI_NN_IMPORT("get_output_single")
wasi_nn_error get_output_single(graph_execution_context ctx, uint32_t index, tensor_data out, uint32_t max, uint32_t *written);
WASI_NN_IMPORT("fini_single")
wasi_nn_error fini_single(graph_execution_context ctx);
WASI_NN_IMPORT("unload")
wasi_nn_error unload(graph g);
WASI_NN_IMPORT("finalize_execution_context")
wasi_nn_error finalize_execution_context(graph_execution_context ctx);

#endif

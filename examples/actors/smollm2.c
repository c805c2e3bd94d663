/*
 * smollm2.c — a llama-architecture language model (SmolLM2-135M-Instruct Q4_1 and its kind)
 * run inside an AO actor on the worker's tensor backend, through the `ao_gpu` host module
 * (include/ao_gpu.h; JSON-1 ABI, see include/ao_gpu_worker.h).
 *
 * The weights are not in the actor: `ao-gpu-worker model publish` uploads every GGUF tensor as
 * signed data items (large tensors split by rows) and prints a model manifest (JSON: the
 * hyperparameters and, per tensor, its items as {id, sha256, dtype, shape, row}). The actor keeps
 * the manifest in its state and names each item with ao_gpu_constant: the worker fetches,
 * verifies and caches the weights on the device, across messages and actors.
 *
 * Messages:
 *
 *   Type=Process       the spawn message: its Data, when it is a manifest, loads the model.
 *   Action=Load-Model  Data = a manifest; only from the process owner. Replaces the model.
 *   Action=Generate    Data = {"prompt_tokens": [ids...], "max_new_tokens": N,
 *                              "logits_for": [ids...]}
 *                      N 0..512, default 16 (tag Max-New-Tokens overrides); logits_for is
 *                      optional (at most 64 ids). Runs the prompt through the model (one batched
 *                      pass), then greedy decoding with a key/value cache, one token per pass,
 *                      stopping after N tokens or at the end-of-sequence token. Output (a JSON
 *                      object):
 *                        {"tokens": [generated ids], "stop": "length" | "eos",
 *                         "prompt_len": n, "top5": [[id, logit], ...]  (after the prompt),
 *                         "logits": [[id, logit], ...]  (after the prompt, for logits_for),
 *                         "model": name}
 *   Action=Model-Info  Output = the loaded model's name and hyperparameters.
 *   otherwise          Output "ignored: <Action>".
 *
 * The forward pass per step, for T new rows at position pos0 (T = prompt length, then 1):
 *
 *   x = embed(ids)                                      gather from the chunk holding each row
 *   for each block l:
 *     h = rmsnorm(x) * attn_norm
 *     q, k, v = h Wq^T, h Wk^T, h Wv^T                  Q4_1 weights [n, k], transpose_b = 1
 *     q, k = rope(q, k, pos0, freq_base, NORMAL)        [T, heads, head_dim]
 *     append k, v to the block's cache                  [pos0 + T, kv_heads, head_dim]
 *     x = x + attention(q, cache_k, cache_v, pos0, 1/sqrt(head_dim)) Wo^T
 *     h = rmsnorm(x) * ffn_norm
 *     x = x + (silu(h Wgate^T) * (h Wup^T)) Wdown^T
 *   logits = rmsnorm(x[T-1]) * output_norm @ Wout^T     per output chunk, then concatenated
 *   next = argmax(logits)
 *
 * Every step is ONE ao_gpu_run command list (all blocks, the logits and the argmax; the
 * temporaries are freed by commands of the same list), plus the id upload and the reads.
 *
 * Gas (Compute-Limit): each op costs from shapes (include/ao_gpu.h), so for SmolLM2-135M a
 * message costs about 24.2M fuel to name the 275 weight items (their storage size / 4), and a
 * step of T rows about 106M * T + 53M (matmul FLOPs / 2, weight bytes / 4; the output projection
 * runs on the last row only) plus attention: a decoded token costs about 161M (measured
 * 160,624,074 at position 7), a Generate of a 14-token prompt and 32 new tokens about 6.6G.
 * When the Compute-Limit does not cover a message, the evaluation ends out of fuel and the state
 * is rolled back: lower max_new_tokens or raise the limit.
 *
 * Deterministic: the result depends only on the manifest, the message and the backend's
 * determinism mode (reproducible by default: CPU and wgpu give the same bits).
 *
 * Build: scripts/build-actors.
 */
#include <math.h>
#include <stdio.h>

#include "ao_gpu.h"
#include "ao_gpu_worker.h"

#define MAX_BLOCKS 64
#define MAX_CHUNKS 4096
#define MAX_NEW_TOKENS 512
#define MAX_PROMPT 2048
#define MAX_CMDS 4096
#define TOP_K 5
#define MAX_LOGITS_FOR 64

/* The per-block weights, in manifest name order. */
enum { W_ATTN_NORM, W_Q, W_K, W_V, W_O, W_FFN_NORM, W_GATE, W_UP, W_DOWN, W_PER_BLOCK };
static const char *const BLOCK_NAMES[W_PER_BLOCK] = {"attn_norm", "attn_q",   "attn_k", "attn_v", "attn_output",
                                                     "ffn_norm",  "ffn_gate", "ffn_up", "ffn_down"};

typedef struct chunk {
    char id[AO_GPU_ITEM_ID_LEN + 1];
    uint8_t sha256[32];
    int32_t dtype;
    uint32_t shape[AO_GPU_MAX_RANK];
    int32_t rank;
    uint32_t row;  /* first row of the tensor this chunk holds */
    uint32_t rows; /* rows it holds (1 for a 1-D tensor) */
} chunk;

typedef struct tensor_ref {
    int32_t first; /* index of its first chunk in model.chunks; -1 when absent */
    int32_t count;
} tensor_ref;

typedef struct model_t {
    int loaded;
    char name[128];
    uint32_t blocks, dim, ffn, heads, kv_heads, head_dim, vocab, context;
    float rope_base, rms_eps;
    int64_t eos; /* -1: none */
    tensor_ref embd, out_norm, output, block[MAX_BLOCKS][W_PER_BLOCK];
    chunk *chunks;
    int32_t n_chunks;
} model_t;

/* The process state: the model (persists in linear memory across messages). */
static model_t model;

/* ---------------------------------------------------------------------------------------------
 * Manifest parsing
 * ------------------------------------------------------------------------------------------- */

static int json_u32(ao_json v, uint32_t *out) {
    uint64_t x = 0;
    if (ao_json_kind_of(v) != AO_JSON_NUMBER || !ao_parse_u64(v.p, (size_t)(v.end - v.p), &x) || x > UINT32_MAX) return 0;
    *out = (uint32_t)x;
    return 1;
}

static int json_f32(ao_json v, float *out) {
    char text[64];
    size_t n = (size_t)(v.end - v.p);
    if (ao_json_kind_of(v) != AO_JSON_NUMBER || n >= sizeof text) return 0;
    memcpy(text, v.p, n);
    text[n] = '\0';
    char *end = NULL;
    double d = strtod(text, &end);
    if (end != text + n || !isfinite(d)) return 0;
    *out = (float)d;
    return 1;
}

static int dtype_code(ao_json v) {
    static const char *const names[] = {"f32", "f16", "i32", "q8_0", "q4_0", "q4_1"};
    for (int i = 0; i < 6; i++)
        if (ao_json_str_eq(v, names[i])) return i;
    return -1;
}

static int hex_nibble(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

/* A shape array of 1..4 dims into out; returns the rank or 0. */
static int32_t json_shape(ao_json arr, uint32_t *out) {
    ao_json_iter it = ao_json_iter_array(arr);
    ao_json el;
    int32_t rank = 0;
    while (ao_json_iter_next(&it, &el)) {
        if (rank == AO_GPU_MAX_RANK || !json_u32(el, &out[rank])) return 0;
        rank++;
    }
    return rank;
}

/* Where a tensor name goes in the model, or NULL when the actor does not use it. */
static tensor_ref *slot_for(model_t *m, const char *name) {
    if (!strcmp(name, "token_embd.weight")) return &m->embd;
    if (!strcmp(name, "output_norm.weight")) return &m->out_norm;
    if (!strcmp(name, "output.weight")) return &m->output;
    if (strncmp(name, "blk.", 4)) return NULL;
    const char *p = name + 4;
    uint32_t b = 0;
    int digits = 0;
    while (*p >= '0' && *p <= '9' && digits < 4) b = b * 10 + (uint32_t)(*p++ - '0'), digits++;
    if (!digits || *p != '.' || b >= MAX_BLOCKS) return NULL;
    p++;
    for (int w = 0; w < W_PER_BLOCK; w++) {
        size_t n = strlen(BLOCK_NAMES[w]);
        if (!strncmp(p, BLOCK_NAMES[w], n) && !strcmp(p + n, ".weight")) return &m->block[b][w];
    }
    return NULL;
}

/* Checks a tensor is present with the row-major shape [rows, cols] (cols only when rows is 0:
 * a 1-D tensor) and that its chunks tile its rows in order. NULL or an error text in err. */
static const char *check_tensor(const model_t *m, const tensor_ref *t, const char *name, uint32_t rows, uint32_t cols,
                                char *err, size_t cap) {
    if (t->first < 0 || t->count <= 0) {
        snprintf(err, cap, "manifest lacks tensor %s", name);
        return err;
    }
    uint32_t next = 0;
    for (int32_t i = 0; i < t->count; i++) {
        const chunk *c = &m->chunks[t->first + i];
        int ok = rows ? (c->rank == 2 && c->shape[1] == cols && c->row == next)
                      : (c->rank == 1 && c->shape[0] == cols && t->count == 1);
        if (!ok) {
            snprintf(err, cap, "tensor %s: chunk %d does not fit shape [%u, %u]", name, (int)i, rows, cols);
            return err;
        }
        next += c->rows;
    }
    if (rows && next != rows) {
        snprintf(err, cap, "tensor %s: its chunks hold %u of %u rows", name, next, rows);
        return err;
    }
    return NULL;
}

/* Parses a manifest into a new model; replaces `model` only when it is complete. */
static const char *load_manifest(const char *text, size_t len, char *err, size_t cap) {
    ao_json root = ao_json_parse_n(text, len);
    if (ao_json_kind_of(root) != AO_JSON_OBJECT) return "the manifest is not a JSON object";
    if (!ao_json_str_eq(ao_json_get(root, "format"), "ao-gpu-worker.model/1")) return "manifest format is not ao-gpu-worker.model/1";
    ao_json h = ao_json_get(root, "hyperparameters");
    if (!ao_json_str_eq(ao_json_get(h, "architecture"), "llama")) return "only llama models are supported";
    if (!ao_json_str_eq(ao_json_get(h, "rope_mode"), "interleaved")) return "only interleaved (GGML normal) rope is supported";

    model_t m;
    memset(&m, 0, sizeof m);
    m.embd.first = m.out_norm.first = m.output.first = -1;
    for (int b = 0; b < MAX_BLOCKS; b++)
        for (int w = 0; w < W_PER_BLOCK; w++) m.block[b][w].first = -1;
    int ok = json_u32(ao_json_get(h, "block_count"), &m.blocks) && json_u32(ao_json_get(h, "embedding_length"), &m.dim) &&
             json_u32(ao_json_get(h, "feed_forward_length"), &m.ffn) && json_u32(ao_json_get(h, "head_count"), &m.heads) &&
             json_u32(ao_json_get(h, "head_count_kv"), &m.kv_heads) && json_u32(ao_json_get(h, "head_dim"), &m.head_dim) &&
             json_u32(ao_json_get(h, "vocab_size"), &m.vocab) && json_u32(ao_json_get(h, "context_length"), &m.context) &&
             json_f32(ao_json_get(h, "rope_freq_base"), &m.rope_base) && json_f32(ao_json_get(h, "rms_eps"), &m.rms_eps);
    if (!ok) return "manifest hyperparameters are missing or not numbers";
    if (m.blocks == 0 || m.blocks > MAX_BLOCKS) return "block_count is 0 or more than this actor supports (64)";
    if (m.heads == 0 || m.kv_heads == 0 || m.heads % m.kv_heads || m.head_dim == 0 || m.head_dim % 2 ||
        m.heads * m.head_dim != m.dim || m.vocab == 0 || m.ffn == 0)
        return "inconsistent hyperparameters";
    uint32_t eos = 0;
    m.eos = json_u32(ao_json_get(h, "eos_token_id"), &eos) ? (int64_t)eos : -1;
    ao_json_str_copy(ao_json_get(root, "name"), m.name, sizeof m.name);

    /* Count the chunks first, then fill them in. */
    ao_json tensors = ao_json_get(root, "tensors");
    ao_json_iter it = ao_json_iter_array(tensors);
    ao_json t;
    int32_t total = 0;
    while (ao_json_iter_next(&it, &t)) {
        ao_json_iter ci = ao_json_iter_array(ao_json_get(t, "chunks"));
        ao_json c;
        while (ao_json_iter_next(&ci, &c)) total++;
    }
    if (total == 0 || total > MAX_CHUNKS) return "the manifest has no chunks, or too many";
    m.chunks = calloc((size_t)total, sizeof(chunk));
    if (!m.chunks) return "out of memory";

    it = ao_json_iter_array(tensors);
    const char *bad = NULL;
    while (!bad && ao_json_iter_next(&it, &t)) {
        char name[96];
        int64_t n = ao_json_str_copy(ao_json_get(t, "name"), name, sizeof name);
        if (n < 0 || (size_t)n >= sizeof name) {
            bad = "a tensor name is missing or too long";
            break;
        }
        tensor_ref *slot = slot_for(&m, name);
        if (!slot) continue; /* not used by this actor */
        if (slot->first >= 0) {
            snprintf(err, cap, "tensor %s appears twice", name);
            bad = err;
            break;
        }
        slot->first = m.n_chunks;
        ao_json_iter ci = ao_json_iter_array(ao_json_get(t, "chunks"));
        ao_json cj;
        while (ao_json_iter_next(&ci, &cj)) {
            chunk *c = &m.chunks[m.n_chunks];
            char sha[65];
            int64_t idn = ao_json_str_copy(ao_json_get(cj, "id"), c->id, sizeof c->id);
            int64_t shan = ao_json_str_copy(ao_json_get(cj, "sha256"), sha, sizeof sha);
            c->dtype = dtype_code(ao_json_get(cj, "dtype"));
            c->rank = json_shape(ao_json_get(cj, "shape"), c->shape);
            int good = idn == AO_GPU_ITEM_ID_LEN && shan == 64 && c->dtype >= 0 && c->rank > 0 && json_u32(ao_json_get(cj, "row"), &c->row);
            for (int k = 0; good && k < 32; k++) {
                int hi = hex_nibble(sha[2 * k]), lo = hex_nibble(sha[2 * k + 1]);
                if (hi < 0 || lo < 0) good = 0;
                c->sha256[k] = (uint8_t)(hi << 4 | lo);
            }
            if (!good) {
                snprintf(err, cap, "tensor %s: a chunk is malformed (id, sha256, dtype, shape, row)", name);
                bad = err;
                break;
            }
            c->rows = c->rank > 1 ? c->shape[0] : 1;
            m.n_chunks++;
            slot->count++;
        }
    }
    if (!bad) bad = check_tensor(&m, &m.embd, "token_embd.weight", m.vocab, m.dim, err, cap);
    if (!bad) bad = check_tensor(&m, &m.out_norm, "output_norm.weight", 0, m.dim, err, cap);
    if (!bad && m.output.first >= 0) bad = check_tensor(&m, &m.output, "output.weight", m.vocab, m.dim, err, cap);
    uint32_t kv = m.kv_heads * m.head_dim;
    const uint32_t shapes[W_PER_BLOCK][2] = {{0, m.dim},  {m.dim, m.dim}, {kv, m.dim},    {kv, m.dim},   {m.dim, m.dim},
                                             {0, m.dim},  {m.ffn, m.dim}, {m.ffn, m.dim}, {m.dim, m.ffn}};
    for (uint32_t b = 0; !bad && b < m.blocks; b++) {
        for (int w = 0; !bad && w < W_PER_BLOCK; w++) {
            char name[96];
            snprintf(name, sizeof name, "blk.%u.%s.weight", b, BLOCK_NAMES[w]);
            bad = check_tensor(&m, &m.block[b][w], name, shapes[w][0], shapes[w][1], err, cap);
        }
    }
    if (bad) {
        free(m.chunks);
        return bad;
    }
    if (m.output.first < 0) m.output = m.embd; /* tied output projection */
    m.loaded = 1;
    free(model.chunks);
    model = m;
    return NULL;
}

/* ---------------------------------------------------------------------------------------------
 * The forward pass
 * ------------------------------------------------------------------------------------------- */

/* One evaluation's handles: the constants (one per chunk) and the key/value caches. */
static ao_tensor *weights;
static ao_tensor cache_k[MAX_BLOCKS], cache_v[MAX_BLOCKS];

/* The command list of one step. */
static ao_gpu_cmd cmds[MAX_CMDS];
static int ncmd;
static int cmds_full;

/* Appends a command; returns the operand naming its output. */
static ao_tensor emit(ao_gpu_cmd c) {
    if (ncmd == MAX_CMDS) {
        cmds_full = 1;
        return AO_GPU_OUT(0);
    }
    cmds[ncmd] = c;
    return AO_GPU_OUT(ncmd++);
}

static void emit_free(ao_tensor x) { emit(ao_gpu_cmd_free(x)); }

/* x [rows, k] @ W^T for a weight W [n, k] held in chunks of rows: one matmul per chunk, the
 * outputs concatenated along the last axis. */
static ao_tensor emit_linear(ao_tensor x, const tensor_ref *w) {
    ao_tensor y = emit(ao_gpu_cmd_matmul(x, weights[w->first], 0, 1));
    for (int32_t i = 1; i < w->count; i++) {
        ao_tensor part = emit(ao_gpu_cmd_matmul(x, weights[w->first + i], 0, 1));
        ao_tensor joined = emit(ao_gpu_cmd_concat(y, part, 1));
        emit_free(y);
        emit_free(part);
        y = joined;
    }
    return y;
}

/* The chunk of tensor w holding row r (an index into model.chunks). */
static int32_t chunk_of(const tensor_ref *w, uint32_t r) {
    for (int32_t i = 0; i < w->count; i++) {
        const chunk *c = &model.chunks[w->first + i];
        if (r >= c->row && r - c->row < c->rows) return w->first + i;
    }
    return -1;
}

typedef struct step_out {
    uint32_t next;       /* the argmax of the logits after the last row */
    float *logits;       /* when asked for: all vocab logits (malloc'd by the caller) */
} step_out;

static char step_error[256];

static int32_t fail_status(const char *what, int32_t status) {
    snprintf(step_error, sizeof step_error, "%s: %s", what, ao_gpu_status_name(status));
    return status;
}

/* Runs the commands emitted so far and starts a new list; *live (an output of this list, or a
 * handle) becomes a handle. Long prompts and many weight chunks need several lists per step. */
static int32_t flush(ao_tensor *live) {
    if (cmds_full) return fail_status("a step needs more commands than a list holds", AO_GPU_INVALID_ARGUMENT);
    int32_t done = 0;
    int32_t s = ncmd ? ao_gpu_run(cmds, ncmd, &done) : AO_GPU_OK;
    if (s) {
        snprintf(step_error, sizeof step_error, "ao_gpu_run: command %d (op %d) failed: %s", (int)done,
                 done >= 0 && done < ncmd ? (int)cmds[done].op : -1, ao_gpu_status_name(s));
        return s;
    }
    if (*live < 0) *live = cmds[-(int)*live - 1].out;
    ncmd = 0;
    return AO_GPU_OK;
}

/* Commands a block emits at most for one weight chunk each, plus room per extra chunk. */
#define BLOCK_CMDS 64

/* Runs tokens[0..n) at positions pos0.. through the model; the caches grow by n rows. */
static int32_t step(const uint32_t *tokens, uint32_t n, uint32_t pos0, step_out *out) {
    ncmd = 0;
    cmds_full = 0;
    /* Embeddings: one gather per run of consecutive tokens in the same chunk, then joined. */
    ao_tensor x = 0;
    uint32_t i = 0;
    static int32_t local[MAX_PROMPT];
    while (i < n) {
        int32_t c = chunk_of(&model.embd, tokens[i]);
        if (c < 0) return fail_status("token id outside the vocabulary", AO_GPU_SHAPE_MISMATCH);
        uint32_t j = i;
        while (j < n && chunk_of(&model.embd, tokens[j]) == c) {
            local[j - i] = (int32_t)(tokens[j] - model.chunks[c].row);
            j++;
        }
        if (ncmd > MAX_CMDS - 8) {
            int32_t s = flush(&x);
            if (s) return s;
        }
        uint32_t shape[1] = {j - i};
        ao_tensor ids = 0;
        int32_t s = ao_gpu_tensor(AO_GPU_I32, local, (int32_t)(4 * (j - i)), shape, 1, &ids);
        if (s) return fail_status("uploading token ids", s);
        ao_tensor rows = emit(ao_gpu_cmd_gather(weights[c], ids));
        emit_free(ids);
        if (x) {
            ao_tensor joined = emit(ao_gpu_cmd_concat(x, rows, 0));
            emit_free(x);
            emit_free(rows);
            x = joined;
        } else {
            x = rows;
        }
        i = j;
    }

    const float scale = 1.0f / sqrtf((float)model.head_dim);
    const uint32_t q_shape[3] = {n, model.heads, model.head_dim};
    const uint32_t kv_shape[3] = {n, model.kv_heads, model.head_dim};
    const uint32_t flat[2] = {n, model.dim};
    for (uint32_t b = 0; b < model.blocks; b++) {
        const tensor_ref *w = model.block[b];
        int32_t extra = 0;
        for (int k = 0; k < W_PER_BLOCK; k++) extra += 3 * (w[k].count - 1);
        if (ncmd + BLOCK_CMDS + extra > MAX_CMDS) {
            int32_t s = flush(&x);
            if (s) return s;
        }
        ao_tensor h = emit(ao_gpu_cmd_rmsnorm(x, weights[w[W_ATTN_NORM].first], model.rms_eps));
        ao_tensor q = emit_linear(h, &w[W_Q]);
        ao_tensor k = emit_linear(h, &w[W_K]);
        ao_tensor v = emit_linear(h, &w[W_V]);
        emit_free(h);
        ao_tensor q3 = emit(ao_gpu_cmd_reshape(q, 3, q_shape));
        ao_tensor k3 = emit(ao_gpu_cmd_reshape(k, 3, kv_shape));
        ao_tensor v3 = emit(ao_gpu_cmd_reshape(v, 3, kv_shape));
        emit_free(q);
        emit_free(k);
        emit_free(v);
        ao_tensor qr = emit(ao_gpu_cmd_rope(q3, (int32_t)pos0, model.rope_base, AO_GPU_ROPE_NORMAL));
        ao_tensor kr = emit(ao_gpu_cmd_rope(k3, (int32_t)pos0, model.rope_base, AO_GPU_ROPE_NORMAL));
        emit_free(q3);
        emit_free(k3);
        emit(ao_gpu_cmd_append(cache_k[b], kr));
        emit(ao_gpu_cmd_append(cache_v[b], v3));
        emit_free(kr);
        emit_free(v3);
        ao_tensor a = emit(ao_gpu_cmd_attention(qr, cache_k[b], cache_v[b], (int32_t)pos0, scale));
        emit_free(qr);
        ao_tensor a2 = emit(ao_gpu_cmd_reshape(a, 2, flat));
        emit_free(a);
        ao_tensor o = emit_linear(a2, &w[W_O]);
        emit_free(a2);
        ao_tensor x2 = emit(ao_gpu_cmd_binary(AO_GPU_ADD, x, o));
        emit_free(x);
        emit_free(o);
        ao_tensor h2 = emit(ao_gpu_cmd_rmsnorm(x2, weights[w[W_FFN_NORM].first], model.rms_eps));
        ao_tensor g = emit_linear(h2, &w[W_GATE]);
        ao_tensor u = emit_linear(h2, &w[W_UP]);
        emit_free(h2);
        ao_tensor gs = emit(ao_gpu_cmd_unary(AO_GPU_SILU, g));
        emit_free(g);
        ao_tensor gu = emit(ao_gpu_cmd_binary(AO_GPU_MUL, gs, u));
        emit_free(gs);
        emit_free(u);
        ao_tensor d = emit_linear(gu, &w[W_DOWN]);
        emit_free(gu);
        x = emit(ao_gpu_cmd_binary(AO_GPU_ADD, x2, d));
        emit_free(x2);
        emit_free(d);
    }
    /* Only the last row's logits are needed. */
    if (ncmd + 16 + 3 * model.output.count > MAX_CMDS) {
        int32_t s = flush(&x);
        if (s) return s;
    }
    ao_tensor last = x;
    if (n > 1) {
        last = emit(ao_gpu_cmd_slice(x, 0, (int32_t)n - 1, 1));
        emit_free(x);
    }
    ao_tensor xn = emit(ao_gpu_cmd_rmsnorm(last, weights[model.out_norm.first], model.rms_eps));
    emit_free(last);
    ao_tensor logits = emit_linear(xn, &model.output);
    emit_free(xn);
    ao_tensor best = emit(ao_gpu_cmd_reduce(AO_GPU_ARGMAX, logits));
    int logits_at = -(int)logits - 1;
    if (!out->logits) emit_free(logits);
    ao_tensor keep = logits;
    int32_t s = flush(&best);
    if (!s && out->logits) keep = cmds[logits_at].out;
    if (s) return s;
    float next = 0;
    s = ao_gpu_read_f32(best, &next, 1);
    if (!s && out->logits) s = ao_gpu_read_f32(keep, out->logits, (int32_t)model.vocab);
    if (s) return fail_status("reading the logits", s);
    ao_gpu_free(best);
    if (out->logits) ao_gpu_free(keep);
    out->next = (uint32_t)next;
    return AO_GPU_OK;
}

/* Handles for every chunk and empty caches: the start of each Generate. */
static int32_t prepare(void) {
    free(weights);
    weights = calloc((size_t)model.n_chunks, sizeof(ao_tensor));
    if (!weights) return fail_status("out of memory", AO_GPU_QUOTA_EXCEEDED);
    for (int32_t i = 0; i < model.n_chunks; i++) {
        const chunk *c = &model.chunks[i];
        int32_t s = ao_gpu_constant(c->id, c->sha256, c->dtype, c->shape, c->rank, &weights[i]);
        if (s) {
            snprintf(step_error, sizeof step_error, "loading weight item %s: %s", c->id, ao_gpu_status_name(s));
            return s;
        }
    }
    const uint32_t empty[3] = {0, model.kv_heads, model.head_dim};
    for (uint32_t b = 0; b < model.blocks; b++) {
        int32_t s = ao_gpu_tensor(AO_GPU_F32, NULL, 0, empty, 3, &cache_k[b]);
        if (!s) s = ao_gpu_tensor(AO_GPU_F32, NULL, 0, empty, 3, &cache_v[b]);
        if (s) return fail_status("creating the key/value cache", s);
    }
    return AO_GPU_OK;
}

/* ---------------------------------------------------------------------------------------------
 * Messages
 * ------------------------------------------------------------------------------------------- */

static void put_float(ao_buf *b, float v) {
    char num[32];
    snprintf(num, sizeof num, "%.9g", (double)v);
    ao_buf_puts(b, num);
}

/* Indices of the TOP_K largest logits, largest first (the lower id first on ties). */
static void top_k(const float *logits, uint32_t n, uint32_t *ids) {
    for (int k = 0; k < TOP_K; k++) ids[k] = UINT32_MAX;
    for (uint32_t i = 0; i < n; i++) {
        float v = logits[i];
        int pos = TOP_K;
        while (pos > 0 && (ids[pos - 1] == UINT32_MAX || v > logits[ids[pos - 1]])) pos--;
        if (pos == TOP_K) continue;
        for (int k = TOP_K - 1; k > pos; k--) ids[k] = ids[k - 1];
        ids[pos] = i;
    }
}

static const char *generate(ao_json msg, ao_json tags) {
    if (!model.loaded) return ao_result_error("no model loaded (send Load-Model with a manifest)");
    size_t len = 0;
    char *data = ao_json_text_dup(ao_json_get(msg, "Data"), &len);
    ao_json req = ao_json_parse_n(data ? data : "", data ? len : 0);
    static uint32_t tokens[MAX_PROMPT + MAX_NEW_TOKENS];
    uint32_t n = 0, max_new = 16;
    const char *bad = NULL;
    ao_json_iter it = ao_json_iter_array(ao_json_get(req, "prompt_tokens"));
    ao_json el;
    while (!bad && ao_json_iter_next(&it, &el)) {
        if (n == MAX_PROMPT || !json_u32(el, &tokens[n]) || tokens[n] >= model.vocab) bad = "prompt_tokens must be token ids below the vocabulary size (at most 2048)";
        n++;
    }
    if (!bad && n == 0) bad = "Data must be {\"prompt_tokens\": [ids...], \"max_new_tokens\": N}";
    static uint32_t wanted[MAX_LOGITS_FOR];
    uint32_t n_wanted = 0;
    it = ao_json_iter_array(ao_json_get(req, "logits_for"));
    while (!bad && ao_json_iter_next(&it, &el)) {
        if (n_wanted == MAX_LOGITS_FOR || !json_u32(el, &wanted[n_wanted]) || wanted[n_wanted] >= model.vocab)
            bad = "logits_for must be at most 64 token ids below the vocabulary size";
        n_wanted++;
    }
    ao_json mx = ao_json_get(req, "max_new_tokens");
    if (!bad && ao_json_present(mx) && !json_u32(mx, &max_new)) bad = "max_new_tokens must be a number";
    ao_json tag = ao_tags_get(tags, "Max-New-Tokens");
    if (!bad && ao_json_present(tag)) {
        char text[16];
        int64_t tn = ao_json_str_copy(tag, text, sizeof text);
        uint64_t v = 0;
        if (tn <= 0 || !ao_parse_u64(text, (size_t)tn, &v) || v > UINT32_MAX) bad = "Max-New-Tokens must be a number";
        max_new = (uint32_t)v;
    }
    free(data);
    if (!bad && max_new > MAX_NEW_TOKENS) bad = "max_new_tokens is at most 512";
    if (!bad && (uint64_t)n + max_new > model.context) bad = "prompt plus max_new_tokens exceed the model's context length";
    if (bad) return ao_result_error(bad);

    float *logits = malloc((size_t)model.vocab * sizeof(float));
    if (!logits) return ao_result_error("out of memory");
    int32_t s = prepare();
    step_out out = {0, logits};
    if (!s) s = step(tokens, n, 0, &out);
    uint32_t top[TOP_K];
    if (!s) top_k(logits, model.vocab, top);
    uint32_t made = 0;
    const char *stop = "length";
    uint32_t pos = n;
    out.logits = NULL;
    while (!s && made < max_new) {
        uint32_t next = out.next;
        tokens[n + made++] = next;
        if (model.eos >= 0 && next == (uint32_t)model.eos) {
            stop = "eos";
            break;
        }
        if (made == max_new) break;
        s = step(&tokens[n + made - 1], 1, pos, &out);
        pos++;
    }
    if (s) {
        free(logits);
        return ao_result_error(step_error);
    }

    ao_buf b = AO_BUF_INIT;
    ao_buf_puts(&b, "{\"ok\":true,\"response\":{\"Output\":{\"tokens\":[");
    for (uint32_t k = 0; k < made; k++) {
        if (k) ao_buf_putc(&b, ',');
        ao_buf_put_u64(&b, tokens[n + k]);
    }
    ao_buf_puts(&b, "],\"stop\":");
    ao_buf_put_json_str(&b, made == 0 ? "length" : stop);
    ao_buf_puts(&b, ",\"prompt_len\":");
    ao_buf_put_u64(&b, n);
    ao_buf_puts(&b, ",\"top5\":[");
    for (int k = 0; k < TOP_K && top[k] != UINT32_MAX; k++) {
        if (k) ao_buf_putc(&b, ',');
        ao_buf_putc(&b, '[');
        ao_buf_put_u64(&b, top[k]);
        ao_buf_putc(&b, ',');
        put_float(&b, logits[top[k]]);
        ao_buf_putc(&b, ']');
    }
    ao_buf_puts(&b, "],\"logits\":[");
    for (uint32_t k = 0; k < n_wanted; k++) {
        if (k) ao_buf_putc(&b, ',');
        ao_buf_putc(&b, '[');
        ao_buf_put_u64(&b, wanted[k]);
        ao_buf_putc(&b, ',');
        put_float(&b, logits[wanted[k]]);
        ao_buf_putc(&b, ']');
    }
    ao_buf_puts(&b, "],\"model\":");
    ao_buf_put_json_str(&b, model.name);
    ao_buf_puts(&b, "},\"Messages\":[],\"Spawns\":[],\"Assignments\":[]}}");
    free(logits);
    return ao__result_keep(&b);
}

/* Loads the manifest in the message's Data; `required` makes a missing manifest an error. */
static const char *load(ao_json msg, int required) {
    size_t len = 0;
    char *data = ao_json_text_dup(ao_json_get(msg, "Data"), &len);
    const char *p = data;
    while (p && p < data + len && (*p == ' ' || *p == '\n' || *p == '\r' || *p == '\t')) p++;
    if (!data || p == data + len) {
        free(data);
        return required ? ao_result_error("Load-Model needs the manifest as Data") : ao_result_ok("no model in the process Data", NULL);
    }
    static char err[256];
    const char *bad = load_manifest(data, len, err, sizeof err);
    free(data);
    if (bad) return ao_result_error(bad);
    ao_buf out = AO_BUF_INIT;
    char line[256];
    snprintf(line, sizeof line, "loaded %s: %u blocks, %u items", model.name, model.blocks, (unsigned)model.n_chunks);
    ao_buf_puts(&out, line);
    return ao_result_ok_buf(&out, NULL);
}

static const char *info(void) {
    if (!model.loaded) return ao_result_error("no model loaded");
    char text[512];
    snprintf(text, sizeof text,
             "{\"name\":\"%s\",\"blocks\":%u,\"dim\":%u,\"ffn\":%u,\"heads\":%u,\"kv_heads\":%u,\"vocab\":%u,\"items\":%d}",
             model.name, model.blocks, model.dim, model.ffn, model.heads, model.kv_heads, model.vocab, (int)model.n_chunks);
    return ao_result_ok(text, NULL);
}

static const char *ignored(ao_json tags) {
    ao_json action = ao_tags_get(tags, "Action");
    ao_buf out = AO_BUF_INIT;
    ao_buf_puts(&out, "ignored: ");
    if (!ao_json_present(action)) {
        ao_buf_puts(&out, "(no Action)");
    } else {
        size_t len = 0;
        char *name = ao_json_text_dup(action, &len);
        if (!name) out.failed = 1;
        ao_buf_putn(&out, name, name ? len : 0);
        free(name);
    }
    return ao_result_ok_buf(&out, NULL);
}

static const char *dispatch(const char *msg_json, const char *env_json) {
    ao_json msg = ao_json_parse(msg_json);
    if (ao_json_kind_of(msg) != AO_JSON_OBJECT) return ao_result_error("message is not a JSON object");
    ao_json tags = ao_json_get(msg, "Tags");
    if (ao_json_str_eq(ao_tags_get(tags, "Type"), "Process")) return load(msg, 0);
    if (ao_json_str_eq(ao_tags_get(tags, "Action"), "Generate")) return generate(msg, tags);
    if (ao_json_str_eq(ao_tags_get(tags, "Action"), "Model-Info")) return info();
    if (ao_json_str_eq(ao_tags_get(tags, "Action"), "Load-Model")) {
        char *from = ao_json_text_dup(ao_json_get(msg, "From"), NULL);
        char *owner = ao_env_process_field(env_json, "Owner");
        int allowed = from && owner && !strcmp(from, owner);
        free(from);
        free(owner);
        if (!allowed) return ao_result_error("only the process owner may load a model");
        return load(msg, 1);
    }
    return ignored(tags);
}

AO_EXPORT("handle")
const char *handle(char *msg_json, char *env_json) {
    const char *result = dispatch(msg_json, env_json);
    /* Handles die with the evaluation: forget them. */
    free(weights);
    weights = NULL;
    ao_handle_done(msg_json, env_json);
    return result;
}

/*
 * mlp.c — a small MLP on the worker's tensor backend through the `ao_gpu` host module
 * (include/ao_gpu.h; JSON-1 ABI, see include/ao_gpu_worker.h).
 *
 *   y = softmax(W2 · gelu(W1 · x + b1) + b2)      x [16], W1 [32x16], b1 [32], W2 [4x32], b2 [4]
 *
 * The weights are fixed: element i of the parameter block (W1, b1, W2, b2, row-major, one after
 * the other: 512 + 32 + 128 + 4 values) is
 *
 *   ((int)((i * 2654435761u) % 2001) - 1000) / 1000.0f * scale     (scale 0.25, 0.1, 0.5, 0.1)
 *
 * Behaviour by the message's Action tag:
 *
 *   Infer      input x: Data = a JSON array of 16 numbers, or tag Input = 16 comma-separated
 *              numbers. Output = a JSON array of the 4 probabilities (%.9g, so they round-trip
 *              to the same f32), and the response field Argmax = the index of the first largest.
 *              Every step runs through ao_gpu: the uploads, then ONE batched command list
 *              (ao_gpu_run: matmul, add, gelu, matmul, add, softmax: one host call, one device
 *              submission), then read_f32; a failing status fails the message with the status name.
 *   otherwise  Output "ignored: <Action>" (the Process message, Type=Process, included)
 *
 * Build: scripts/build-actors.
 */
#include <stdio.h>

#include "ao_gpu.h"
#include "ao_gpu_worker.h"

#define IN 16
#define HIDDEN 32
#define OUT 4

static float weight(uint32_t i, float scale) {
    return (float)((int32_t)((i * 2654435761u) % 2001u) - 1000) / 1000.0f * scale;
}

/* n weights starting at parameter index *next (which advances). */
static void fill(float *w, uint32_t n, uint32_t *next, float scale) {
    for (uint32_t k = 0; k < n; k++) w[k] = weight(*next + k, scale);
    *next += n;
}

/* Parses one number (the whole of s[0..n)) into *out; 1 on success. */
static int parse_f32(const char *s, size_t n, float *out) {
    char text[64];
    while (n > 0 && (*s == ' ' || *s == '\t')) s++, n--;
    while (n > 0 && (s[n - 1] == ' ' || s[n - 1] == '\t')) n--;
    if (n == 0 || n >= sizeof text) return 0;
    memcpy(text, s, n);
    text[n] = '\0';
    char *end = NULL;
    *out = strtof(text, &end);
    return end == text + n;
}

/* x from Data (a JSON array) or from the Input tag (comma-separated); NULL or an error text. */
static const char *read_input(ao_json msg, ao_json tags, float *x) {
    int n = 0;
    ao_json input_tag = ao_tags_get(tags, "Input");
    if (ao_json_present(input_tag)) {
        size_t len = 0;
        char *text = ao_json_text_dup(input_tag, &len);
        if (!text) return "invalid Input";
        const char *p = text, *end = text + len;
        for (;;) {
            const char *comma = memchr(p, ',', (size_t)(end - p));
            const char *stop = comma ? comma : end;
            if (n == IN || !parse_f32(p, (size_t)(stop - p), &x[n])) {
                free(text);
                return "Input must be 16 comma-separated numbers";
            }
            n++;
            if (!comma) break;
            p = comma + 1;
        }
        free(text);
    } else {
        size_t len = 0;
        char *data = ao_json_text_dup(ao_json_get(msg, "Data"), &len);
        ao_json arr = ao_json_parse_n(data ? data : "", data ? len : 0);
        ao_json_iter it = ao_json_iter_array(arr);
        ao_json el;
        int bad = ao_json_kind_of(arr) != AO_JSON_ARRAY;
        while (!bad && ao_json_iter_next(&it, &el)) {
            if (n == IN || ao_json_kind_of(el) != AO_JSON_NUMBER || !parse_f32(el.p, (size_t)(el.end - el.p), &x[n])) bad = 1;
            n++;
        }
        free(data);
        if (bad) return "Data must be a JSON array of 16 numbers";
    }
    return n == IN ? NULL : "expected 16 input values";
}

/* The handles of one inference; all freed at the end, whatever happened. */
typedef struct tensors {
    ao_tensor h[12];
    int n;
} tensors;

static ao_tensor *slot(tensors *t) {
    t->h[t->n] = 0;
    return &t->h[t->n++];
}

static int32_t upload(tensors *t, const float *data, uint32_t rows, uint32_t cols, ao_tensor *out) {
    uint32_t shape[2] = {rows, cols};
    int32_t status = ao_gpu_tensor_f32(data, (int32_t)(rows * cols), shape, 2, slot(t));
    *out = t->h[t->n - 1];
    return status;
}

/* Runs the MLP on x; the probabilities go to y. */
static int32_t forward(const float *x, float *y) {
    static float w1[HIDDEN * IN], b1[HIDDEN], w2[OUT * HIDDEN], b2[OUT];
    uint32_t next = 0;
    fill(w1, HIDDEN * IN, &next, 0.25f);
    fill(b1, HIDDEN, &next, 0.1f);
    fill(w2, OUT * HIDDEN, &next, 0.5f);
    fill(b2, OUT, &next, 0.1f);

    tensors t = {{0}, 0};
    ao_tensor tx = 0, tw1 = 0, tb1 = 0, tw2 = 0, tb2 = 0;
    int32_t s = upload(&t, x, 1, IN, &tx);
    if (!s) s = upload(&t, w1, HIDDEN, IN, &tw1);
    if (!s) s = upload(&t, b1, 1, HIDDEN, &tb1);
    if (!s) s = upload(&t, w2, OUT, HIDDEN, &tw2);
    if (!s) s = upload(&t, b2, 1, OUT, &tb2);
    /* One command list, one host call, one device submission. Row vectors:
     * x [1x16] · W1ᵀ [16x32] = (W1 · x)ᵀ; AO_GPU_OUT(i) is command i's output. */
    ao_gpu_cmd cmds[6];
    cmds[0] = ao_gpu_cmd_matmul(tx, tw1, 0, 1);
    cmds[1] = ao_gpu_cmd_binary(AO_GPU_ADD, AO_GPU_OUT(0), tb1);
    cmds[2] = ao_gpu_cmd_unary(AO_GPU_GELU, AO_GPU_OUT(1));
    cmds[3] = ao_gpu_cmd_matmul(AO_GPU_OUT(2), tw2, 0, 1);
    cmds[4] = ao_gpu_cmd_binary(AO_GPU_ADD, AO_GPU_OUT(3), tb2);
    cmds[5] = ao_gpu_cmd_softmax(AO_GPU_OUT(4));
    int32_t done = 0;
    if (!s) s = ao_gpu_run(cmds, 6, &done);
    /* Outputs of the commands that ran stay live until freed (or the message ends). */
    for (int32_t i = 0; i < done && i < 6; i++) *slot(&t) = cmds[i].out;
    if (!s) s = ao_gpu_read_f32(cmds[5].out, y, OUT);
    for (int i = 0; i < t.n; i++)
        if (t.h[i] > 0) ao_gpu_free(t.h[i]);
    return s;
}

static const char *infer(ao_json msg, ao_json tags) {
    float x[IN], y[OUT];
    const char *bad = read_input(msg, tags, x);
    if (bad) return ao_result_error(bad);
    int32_t status = forward(x, y);
    if (status != AO_GPU_OK) {
        ao_buf err = AO_BUF_INIT;
        ao_buf_puts(&err, "ao_gpu: ");
        ao_buf_puts(&err, ao_gpu_status_name(status));
        return ao_result_error_buf(&err);
    }

    ao_buf out = AO_BUF_INIT;
    uint64_t argmax = 0;
    ao_buf_putc(&out, '[');
    for (int i = 0; i < OUT; i++) {
        char num[32];
        snprintf(num, sizeof num, "%.9g", (double)y[i]);
        if (i) ao_buf_putc(&out, ',');
        ao_buf_puts(&out, num);
        if (y[i] > y[argmax]) argmax = (uint64_t)i;
    }
    ao_buf_putc(&out, ']');

    /* ao_result_ok_* only write Output; this response also carries Argmax. */
    ao_buf b = AO_BUF_INIT;
    ao_buf_puts(&b, "{\"ok\":true,\"response\":{\"Output\":");
    ao_buf_put_json_strn(&b, out.data ? out.data : "", out.data ? out.len : 0);
    ao_buf_puts(&b, ",\"Argmax\":");
    ao_buf_put_u64(&b, argmax);
    ao_buf_puts(&b, ",\"Messages\":[],\"Spawns\":[],\"Assignments\":[]}}");
    if (out.failed) b.failed = 1;
    ao_buf_free(&out);
    return ao__result_keep(&b);
}

static const char *ignored(ao_json tags, int is_process) {
    ao_json action = ao_tags_get(tags, "Action");
    ao_buf out = AO_BUF_INIT;
    ao_buf_puts(&out, "ignored: ");
    if (is_process || !ao_json_present(action)) {
        ao_buf_puts(&out, is_process ? "Process" : "(no Action)");
    } else {
        size_t len = 0;
        char *name = ao_json_text_dup(action, &len);
        if (!name) out.failed = 1;
        ao_buf_putn(&out, name, name ? len : 0);
        free(name);
    }
    return ao_result_ok_buf(&out, NULL);
}

static const char *dispatch(const char *msg_json) {
    ao_json msg = ao_json_parse(msg_json);
    if (ao_json_kind_of(msg) != AO_JSON_OBJECT) return ao_result_error("message is not a JSON object");
    ao_json tags = ao_json_get(msg, "Tags");
    if (ao_json_str_eq(ao_tags_get(tags, "Type"), "Process")) return ignored(tags, 1);
    if (ao_json_str_eq(ao_tags_get(tags, "Action"), "Infer")) return infer(msg, tags);
    return ignored(tags, 0);
}

AO_EXPORT("handle")
const char *handle(char *msg_json, char *env_json) {
    const char *result = dispatch(msg_json);
    ao_handle_done(msg_json, env_json);
    return result;
}

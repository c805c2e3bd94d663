/*
 * chat.c — an AO actor that answers `Chat` messages with text from a language model, using only
 * the `wasi_ephemeral_nn` host module (include/wasi_ephemeral_nn.h), as a LlamaEdge-style C
 * client would on WasmEdge or WAMR: no ao_gpu, no tokenizer, no model code in the actor.
 *
 * Messages (tags):
 *   Action: Chat      Data: the user's message. The reply's Output is the model's answer.
 *     Model           the model's registered name (default "smollm2": the worker's [models])
 *     Prompt-Format   "chatml" (default: Data becomes one ChatML user turn, the assistant's turn
 *                     opened, as SmolLM2's chat template renders it without a system message)
 *                     or "raw" (Data is the whole prompt; `<|im_start|>` etc. stay special tokens)
 *     N-Predict       most tokens to generate (default 32)
 *     Stream          "1": generate token by token (compute_single) instead of compute
 *   Anything else is acknowledged and ignored.
 *
 * The Output is the generated text; with the tag `Metadata: 1` a newline and get_output index 1's
 * JSON ({"input_tokens":..,"output_tokens":..}) follow it.
 */
#include <stdio.h>

#include "ao_gpu_worker.h"
#include "wasi_ephemeral_nn.h"

#define MAX_PROMPT (64 * 1024)
#define MAX_OUTPUT (64 * 1024)

static char out_text[MAX_OUTPUT];
static char meta_text[1024];

static const char *nn_error(const char *what, wasi_nn_error e) {
    ao_buf b = AO_BUF_INIT;
    ao_buf_puts(&b, what);
    ao_buf_puts(&b, " failed: wasi_nn error ");
    ao_buf_put_u64(&b, (uint64_t)e);
    switch (e) {
        case model_not_found: ao_buf_puts(&b, " (model not found: is it registered with the worker?)"); break;
        case prompt_tool_long: ao_buf_puts(&b, " (prompt too long for the context)"); break;
        case context_full: ao_buf_puts(&b, " (context full)"); break;
        default: break;
    }
    return ao_result_error_buf(&b);
}

/* The tag's text, or `fallback` when absent (the caller frees the result). */
static char *tag_or(ao_json tags, const char *name, const char *fallback) {
    ao_json t = ao_tags_get(tags, name);
    if (ao_json_present(t)) return ao_json_text_dup(t, NULL);
    size_t n = strlen(fallback);
    char *s = malloc(n + 1);
    if (s) memcpy(s, fallback, n + 1);
    return s;
}

static const char *chat(ao_json msg, ao_json tags) {
    size_t data_len = 0;
    char *data = ao_json_text_dup(ao_json_get(msg, "Data"), &data_len);
    char *model = tag_or(tags, "Model", "smollm2");
    char *format = tag_or(tags, "Prompt-Format", "chatml");
    char *n_predict = tag_or(tags, "N-Predict", "32");
    int stream = ao_json_str_eq(ao_tags_get(tags, "Stream"), "1");
    int with_meta = ao_json_str_eq(ao_tags_get(tags, "Metadata"), "1");
    const char *result = NULL;
    ao_buf prompt = AO_BUF_INIT;
    ao_buf config = AO_BUF_INIT;
    uint64_t n = 0;
    if (!data || !model || !format || !n_predict) {
        result = ao_result_error("out of memory");
        goto done;
    }
    if (!ao_parse_u64(n_predict, strlen(n_predict), &n) || n == 0 || n > 4096) {
        result = ao_result_error("N-Predict must be an integer in 1..4096");
        goto done;
    }
    if (data_len == 0 || data_len > MAX_PROMPT) {
        result = ao_result_error("Data must hold the message (1 byte to 64 KiB)");
        goto done;
    }
    if (strcmp(format, "raw") == 0) {
        ao_buf_putn(&prompt, data, data_len);
    } else if (strcmp(format, "chatml") == 0) {
        ao_buf_puts(&prompt, "<|im_start|>user\n");
        ao_buf_putn(&prompt, data, data_len);
        ao_buf_puts(&prompt, "<|im_end|>\n<|im_start|>assistant\n");
    } else {
        result = ao_result_error("Prompt-Format must be chatml or raw");
        goto done;
    }
    ao_buf_puts(&config, "{\"n-predict\":");
    ao_buf_put_u64(&config, n);
    ao_buf_puts(&config, ",\"ctx-size\":512}");
    if (prompt.failed || config.failed) {
        result = ao_result_error("out of memory");
        goto done;
    }

    graph g = 0;
    graph_execution_context c = 0;
    wasi_nn_error e = load_by_name_with_config(model, (uint32_t)strlen(model), config.data, (uint32_t)config.len, &g);
    if (e != success) {
        result = nn_error("load_by_name_with_config", e);
        goto done;
    }
    e = init_execution_context(g, &c);
    if (e != success) {
        result = nn_error("init_execution_context", e);
        goto done;
    }
    uint32_t dims[1] = {(uint32_t)prompt.len};
    tensor t = {{dims, 1}, u8, {(uint8_t *)prompt.data, (uint32_t)prompt.len}};
    e = set_input(c, 0, &t);
    if (e != success) {
        result = nn_error("set_input", e);
        goto done;
    }
    uint32_t written = 0;
    if (stream) {
        size_t len = 0;
        char piece[256];
        for (;;) {
            e = compute_single(c);
            if (e == end_of_sequence) break;
            if (e != success) {
                result = nn_error("compute_single", e);
                goto done;
            }
            e = get_output_single(c, 0, (uint8_t *)piece, sizeof piece, &written);
            if (e != success) {
                result = nn_error("get_output_single", e);
                goto done;
            }
            if (len + written >= sizeof out_text) break;
            memcpy(out_text + len, piece, written);
            len += written;
        }
        written = (uint32_t)len;
        fini_single(c);
    } else {
        e = compute(c);
        if (e != success && e != context_full) {
            result = nn_error("compute", e);
            goto done;
        }
        e = get_output(c, 0, (uint8_t *)out_text, sizeof out_text - 1, &written);
        if (e != success) {
            result = nn_error("get_output", e);
            goto done;
        }
    }
    ao_buf reply = AO_BUF_INIT;
    ao_buf_putn(&reply, out_text, written);
    if (with_meta) {
        uint32_t meta_len = 0;
        e = get_output(c, 1, (uint8_t *)meta_text, sizeof meta_text - 1, &meta_len);
        if (e == success) {
            ao_buf_putc(&reply, '\n');
            ao_buf_putn(&reply, meta_text, meta_len);
        }
    }
    finalize_execution_context(c);
    unload(g);
    result = ao_result_ok_buf(&reply, NULL);
done:
    ao_buf_free(&prompt);
    ao_buf_free(&config);
    free(data);
    free(model);
    free(format);
    free(n_predict);
    return result;
}

static const char *dispatch(const char *msg_json) {
    ao_json msg = ao_json_parse(msg_json);
    if (ao_json_kind_of(msg) != AO_JSON_OBJECT) return ao_result_error("message is not a JSON object");
    ao_json tags = ao_json_get(msg, "Tags");
    if (ao_json_str_eq(ao_tags_get(tags, "Type"), "Process")) return ao_result_ok("chat actor ready", NULL);
    if (ao_json_str_eq(ao_tags_get(tags, "Action"), "Chat")) return chat(msg, tags);
    return ao_result_ok("ignored", NULL);
}

AO_EXPORT("handle")
const char *handle(char *msg_json, char *env_json) {
    const char *result = dispatch(msg_json);
    ao_handle_done(msg_json, env_json);
    return result;
}

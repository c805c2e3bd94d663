/*
 * ao_gpu_worker.h — the actor ABI of ao-gpu-worker for C, and the small helpers an actor needs.
 *
 * The ABI itself is described in docs/abi.md; this header restates what a C actor must do and
 * offers, header-only (everything is `static inline`), a bounds-checked JSON reader for the
 * message and environment and a JSON writer for the result. Build an actor with
 * scripts/build-actors, or by hand:
 *
 *   clang-16 --target=wasm32-wasi --sysroot=/usr -O2 -mexec-model=reactor -Iinclude \
 *            -Wl,--export=malloc -Wl,--strip-all -o actor.wasm actor.c
 *
 * ---------------------------------------------------------------------------------------------
 * Module tags (on the Module data item; see docs/abi.md)
 *
 *   Module-Format:   wasm32-unknown-ao-gpu-worker   (required; anything else is refused)
 *   Input-Encoding:  JSON-1                         (default when absent)
 *   Output-Encoding: JSON-1                         (default when absent)
 *   Memory-Limit:    e.g. 16-mb, 1-gb               (largest linear memory; a process tag may lower it)
 *   Compute-Limit:   e.g. 9000000000                (fuel per message; a process tag may lower it)
 *
 * ---------------------------------------------------------------------------------------------
 * Exports
 *
 *   memory       the linear memory (32-bit). It IS the process state: the whole of it is saved
 *                after every successful message and restored before the next one, so plain
 *                `static` variables persist from message to message.
 *   malloc       (i32 size) -> i32 ptr. The host calls it to place the message and environment
 *                strings; 0 means out of memory. wasi-libc's malloc serves, exported with
 *                `-Wl,--export=malloc`.
 *   handle       (i32 msg, i32 env) -> i32 result. Once per message; see below.
 *   _initialize  () -> (). Optional; `-mexec-model=reactor` provides it (it runs static
 *                constructors). Called once when the process starts, never after a restore.
 *
 *   Export a function under a fixed name with the export_name attribute (AO_EXPORT below):
 *
 *     __attribute__((export_name("handle")))
 *     const char *handle(char *msg_json, char *env_json) { ... }
 *
 * One evaluation: `msg_json` and `env_json` are NUL-terminated UTF-8 JSON texts that the host
 * placed with this module's malloc. `handle` returns a pointer to a NUL-terminated UTF-8 JSON
 * text:
 *
 *   {"ok":true,"response":{"Output":"...","Messages":[...],"Spawns":[],"Assignments":[]}}
 *   {"ok":false,"response":{"Error":"..."}}
 *
 * A failed evaluation (ok:false, a present Error, a trap, proc_exit, out of fuel or memory)
 * rolls the memory back to what it was before the message: an actor may change its state
 * first and fail afterwards. Messages are {"Target","Anchor","Tags":[{"name","value"}],"Data"}.
 *
 * Memory ownership as these helpers use it (the host never frees anything):
 *   - msg_json and env_json belong to the module once handle() is called. Free them before
 *     returning (ao_handle_done does), or memory grows with every message.
 *   - The result must stay valid after handle() returns, until the host has read it. The
 *     ao_result_* functions keep the latest result and free the previous one on the next call.
 *
 * Imports: only wasi_snapshot_preview1 functions listed in docs/abi.md (deterministic: clocks
 * read the message Timestamp, random_get is seeded from the message id) and the worker's own
 * host modules. stdout/stderr (fd 1, 2) are captured into the result's log. stdio buffers in
 * linear memory: call fflush(stdout) before returning, or the text becomes part of the state
 * and is written during some later message.
 */
#ifndef AO_GPU_WORKER_H
#define AO_GPU_WORKER_H

#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Exports a function from the module under `name`. */
#define AO_EXPORT(name) __attribute__((export_name(name)))

/* Deepest nesting of arrays/objects the reader accepts; deeper documents are invalid. */
#ifndef AO_JSON_MAX_DEPTH
#define AO_JSON_MAX_DEPTH 64
#endif

/* =============================================================================================
 * JSON reader
 *
 * An ao_json is one JSON value: the bytes [p, end) of its text. An invalid or missing value has
 * p == NULL, and every function accepts it (and returns "missing"/0/NULL), so lookups chain
 * without checks: ao_json_get(ao_json_get(env, "Process"), "Owner").
 *
 * The reader never reads outside [p, end) and never past the NUL of the text given to
 * ao_json_parse; malformed JSON makes values missing, it never crashes. Strings are decoded
 * (escapes, \uXXXX with surrogate pairs → UTF-8; a lone surrogate becomes U+FFFD).
 * ============================================================================================= */

typedef struct ao_json {
    const char *p;   /* first byte of the value, NULL when missing/invalid */
    const char *end; /* one past its last byte */
} ao_json;

typedef enum ao_json_kind {
    AO_JSON_MISSING = 0,
    AO_JSON_NULL,
    AO_JSON_FALSE,
    AO_JSON_TRUE,
    AO_JSON_NUMBER,
    AO_JSON_STRING,
    AO_JSON_ARRAY,
    AO_JSON_OBJECT,
} ao_json_kind;

static inline ao_json ao_json_missing(void) {
    ao_json v = {NULL, NULL};
    return v;
}

static inline const char *ao__json_ws(const char *p, const char *end) {
    while (p < end && (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r')) p++;
    return p;
}

static inline int ao__json_hex(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

/* p at the opening quote; returns the byte after the closing quote, or NULL when malformed. */
static inline const char *ao__json_skip_string(const char *p, const char *end) {
    if (p >= end || *p != '"') return NULL;
    p++;
    while (p < end) {
        unsigned char c = (unsigned char)*p;
        if (c == '"') return p + 1;
        if (c < 0x20) return NULL; /* raw control characters are not allowed in JSON strings */
        if (c == '\\') {
            if (end - p < 2) return NULL;
            switch (p[1]) {
            case '"': case '\\': case '/': case 'b': case 'f': case 'n': case 'r': case 't':
                p += 2;
                break;
            case 'u':
                if (end - p < 6) return NULL;
                for (int i = 2; i < 6; i++)
                    if (ao__json_hex(p[i]) < 0) return NULL;
                p += 6;
                break;
            default:
                return NULL;
            }
        } else {
            p++;
        }
    }
    return NULL;
}

static inline const char *ao__json_skip_digits(const char *p, const char *end) {
    while (p < end && *p >= '0' && *p <= '9') p++;
    return p;
}

static inline const char *ao__json_skip_number(const char *p, const char *end) {
    if (p < end && *p == '-') p++;
    if (p >= end) return NULL;
    if (*p == '0') {
        p++;
    } else if (*p >= '1' && *p <= '9') {
        p = ao__json_skip_digits(p, end);
    } else {
        return NULL;
    }
    if (p < end && *p == '.') {
        const char *q = ao__json_skip_digits(p + 1, end);
        if (q == p + 1) return NULL;
        p = q;
    }
    if (p < end && (*p == 'e' || *p == 'E')) {
        p++;
        if (p < end && (*p == '+' || *p == '-')) p++;
        const char *q = ao__json_skip_digits(p, end);
        if (q == p) return NULL;
        p = q;
    }
    return p;
}

static inline const char *ao__json_skip_literal(const char *p, const char *end, const char *lit, size_t n) {
    if ((size_t)(end - p) < n || memcmp(p, lit, n) != 0) return NULL;
    return p + n;
}

/* p at the first byte of a value (no leading whitespace); returns the byte after it, or NULL
 * when the value is malformed or nested deeper than AO_JSON_MAX_DEPTH. */
static inline const char *ao__json_skip_value(const char *p, const char *end, int depth) {
    if (p >= end) return NULL;
    switch (*p) {
    case '"':
        return ao__json_skip_string(p, end);
    case 't':
        return ao__json_skip_literal(p, end, "true", 4);
    case 'f':
        return ao__json_skip_literal(p, end, "false", 5);
    case 'n':
        return ao__json_skip_literal(p, end, "null", 4);
    case '[':
        if (depth >= AO_JSON_MAX_DEPTH) return NULL;
        p = ao__json_ws(p + 1, end);
        if (p < end && *p == ']') return p + 1;
        for (;;) {
            p = ao__json_skip_value(p, end, depth + 1);
            if (!p) return NULL;
            p = ao__json_ws(p, end);
            if (p >= end) return NULL;
            if (*p == ']') return p + 1;
            if (*p != ',') return NULL;
            p = ao__json_ws(p + 1, end);
        }
    case '{':
        if (depth >= AO_JSON_MAX_DEPTH) return NULL;
        p = ao__json_ws(p + 1, end);
        if (p < end && *p == '}') return p + 1;
        for (;;) {
            p = ao__json_skip_string(p, end);
            if (!p) return NULL;
            p = ao__json_ws(p, end);
            if (p >= end || *p != ':') return NULL;
            p = ao__json_skip_value(ao__json_ws(p + 1, end), end, depth + 1);
            if (!p) return NULL;
            p = ao__json_ws(p, end);
            if (p >= end) return NULL;
            if (*p == '}') return p + 1;
            if (*p != ',') return NULL;
            p = ao__json_ws(p + 1, end);
        }
    default:
        return ao__json_skip_number(p, end);
    }
}

/* Parses a whole NUL-terminated JSON text (surrounding whitespace allowed). Returns the
 * top-level value, or a missing value when `text` is NULL or not exactly one valid JSON value. */
static inline ao_json ao_json_parse_n(const char *text, size_t len) {
    if (!text) return ao_json_missing();
    const char *end = text + len;
    const char *p = ao__json_ws(text, end);
    const char *q = ao__json_skip_value(p, end, 0);
    if (!q || ao__json_ws(q, end) != end) return ao_json_missing();
    ao_json v = {p, q};
    return v;
}

static inline ao_json ao_json_parse(const char *text) {
    return text ? ao_json_parse_n(text, strlen(text)) : ao_json_missing();
}

/* The kind of a value, judged by its first byte (the value was validated when it was found). */
static inline ao_json_kind ao_json_kind_of(ao_json v) {
    if (!v.p || v.p >= v.end) return AO_JSON_MISSING;
    switch (*v.p) {
    case '{': return AO_JSON_OBJECT;
    case '[': return AO_JSON_ARRAY;
    case '"': return AO_JSON_STRING;
    case 't': return AO_JSON_TRUE;
    case 'f': return AO_JSON_FALSE;
    case 'n': return AO_JSON_NULL;
    default: return AO_JSON_NUMBER;
    }
}

static inline int ao_json_present(ao_json v) {
    return ao_json_kind_of(v) != AO_JSON_MISSING;
}

static inline void ao__utf8_put(uint32_t cp, unsigned char out[4], int *n) {
    if (cp < 0x80) {
        out[0] = (unsigned char)cp;
        *n = 1;
    } else if (cp < 0x800) {
        out[0] = (unsigned char)(0xC0 | (cp >> 6));
        out[1] = (unsigned char)(0x80 | (cp & 0x3F));
        *n = 2;
    } else if (cp < 0x10000) {
        out[0] = (unsigned char)(0xE0 | (cp >> 12));
        out[1] = (unsigned char)(0x80 | ((cp >> 6) & 0x3F));
        out[2] = (unsigned char)(0x80 | (cp & 0x3F));
        *n = 3;
    } else {
        out[0] = (unsigned char)(0xF0 | (cp >> 18));
        out[1] = (unsigned char)(0x80 | ((cp >> 12) & 0x3F));
        out[2] = (unsigned char)(0x80 | ((cp >> 6) & 0x3F));
        out[3] = (unsigned char)(0x80 | (cp & 0x3F));
        *n = 4;
    }
}

static inline uint32_t ao__json_hex4(const char *p) {
    return (uint32_t)(ao__json_hex(p[0]) << 12 | ao__json_hex(p[1]) << 8 | ao__json_hex(p[2]) << 4 | ao__json_hex(p[3]));
}

/* Decodes the next piece of a string's contents at *pp (inside the quotes) into out[0..4].
 * Returns the number of bytes produced, 0 at the closing quote, -1 when malformed. */
static inline int ao__json_str_next(const char **pp, const char *end, unsigned char out[4]) {
    const char *p = *pp;
    if (p >= end) return -1;
    unsigned char c = (unsigned char)*p;
    if (c == '"') return 0;
    if (c < 0x20) return -1;
    if (c != '\\') {
        out[0] = c;
        *pp = p + 1;
        return 1;
    }
    if (end - p < 2) return -1;
    int n = 1;
    switch (p[1]) {
    case '"': out[0] = '"'; break;
    case '\\': out[0] = '\\'; break;
    case '/': out[0] = '/'; break;
    case 'b': out[0] = '\b'; break;
    case 'f': out[0] = '\f'; break;
    case 'n': out[0] = '\n'; break;
    case 'r': out[0] = '\r'; break;
    case 't': out[0] = '\t'; break;
    case 'u': {
        if (end - p < 6) return -1;
        for (int i = 2; i < 6; i++)
            if (ao__json_hex(p[i]) < 0) return -1;
        uint32_t cp = ao__json_hex4(p + 2);
        p += 6;
        if (cp >= 0xD800 && cp <= 0xDBFF) {
            /* a high surrogate: combine with a following \uDC00-\uDFFF, else U+FFFD */
            if (end - p >= 6 && p[0] == '\\' && p[1] == 'u' && ao__json_hex(p[2]) >= 0 && ao__json_hex(p[3]) >= 0 &&
                ao__json_hex(p[4]) >= 0 && ao__json_hex(p[5]) >= 0) {
                uint32_t lo = ao__json_hex4(p + 2);
                if (lo >= 0xDC00 && lo <= 0xDFFF) {
                    cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                    p += 6;
                } else {
                    cp = 0xFFFD;
                }
            } else {
                cp = 0xFFFD;
            }
        } else if (cp >= 0xDC00 && cp <= 0xDFFF) {
            cp = 0xFFFD;
        }
        ao__utf8_put(cp, out, &n);
        *pp = p;
        return n;
    }
    default:
        return -1;
    }
    *pp = p + 2;
    return n;
}

/* Compares a decoded JSON string with the C string `s`. 1 when `v` is a string equal to `s`. */
static inline int ao_json_str_eq(ao_json v, const char *s) {
    if (ao_json_kind_of(v) != AO_JSON_STRING || !s) return 0;
    const char *p = v.p + 1;
    size_t i = 0;
    for (;;) {
        unsigned char buf[4];
        int n = ao__json_str_next(&p, v.end, buf);
        if (n < 0) return 0;
        if (n == 0) return s[i] == '\0';
        for (int k = 0; k < n; k++, i++)
            if (s[i] == '\0' || (unsigned char)s[i] != buf[k]) return 0;
    }
}

/* Decodes string `v` into buf (at most cap-1 bytes, always NUL-terminated when cap > 0).
 * Returns the full decoded length (which may exceed cap-1, like snprintf), or -1 when `v` is
 * not a string. The decoded text may contain NUL bytes (from \u0000). */
static inline int64_t ao_json_str_copy(ao_json v, char *buf, size_t cap) {
    if (ao_json_kind_of(v) != AO_JSON_STRING) return -1;
    const char *p = v.p + 1;
    size_t len = 0;
    for (;;) {
        unsigned char piece[4];
        int n = ao__json_str_next(&p, v.end, piece);
        if (n < 0) return -1;
        if (n == 0) break;
        for (int k = 0; k < n; k++, len++)
            if (cap > 0 && len < cap - 1) buf[len] = (char)piece[k];
    }
    if (cap > 0) buf[len < cap - 1 ? len : cap - 1] = '\0';
    return (int64_t)len;
}

/* The text of a value as a new malloc'd NUL-terminated string (free it): a string decoded, any
 * other value as its JSON text (a number's digits, "true", "null", an object's source text).
 * *len (when not NULL) gets the length. NULL when the value is missing or out of memory. */
static inline char *ao_json_text_dup(ao_json v, size_t *len) {
    ao_json_kind kind = ao_json_kind_of(v);
    if (kind == AO_JSON_MISSING) return NULL;
    size_t n;
    if (kind == AO_JSON_STRING) {
        int64_t m = ao_json_str_copy(v, NULL, 0);
        if (m < 0) return NULL;
        n = (size_t)m;
    } else {
        n = (size_t)(v.end - v.p);
    }
    char *s = (char *)malloc(n + 1);
    if (!s) return NULL;
    if (kind == AO_JSON_STRING) {
        ao_json_str_copy(v, s, n + 1);
    } else {
        memcpy(s, v.p, n);
        s[n] = '\0';
    }
    if (len) *len = n;
    return s;
}

/* Member `key` of object `obj` (the first one when a key repeats), or missing. */
static inline ao_json ao_json_get(ao_json obj, const char *key) {
    if (ao_json_kind_of(obj) != AO_JSON_OBJECT || !key) return ao_json_missing();
    const char *p = ao__json_ws(obj.p + 1, obj.end);
    const char *end = obj.end;
    if (p < end && *p == '}') return ao_json_missing();
    for (;;) {
        const char *k = p;
        p = ao__json_skip_string(p, end);
        if (!p) return ao_json_missing();
        ao_json kv = {k, p};
        p = ao__json_ws(p, end);
        if (p >= end || *p != ':') return ao_json_missing();
        const char *vs = ao__json_ws(p + 1, end);
        const char *ve = ao__json_skip_value(vs, end, 1);
        if (!ve) return ao_json_missing();
        if (ao_json_str_eq(kv, key)) {
            ao_json v = {vs, ve};
            return v;
        }
        p = ao__json_ws(ve, end);
        if (p >= end || *p != ',') return ao_json_missing();
        p = ao__json_ws(p + 1, end);
    }
}

/* Iterates an array:  ao_json_iter it = ao_json_iter_array(arr); ao_json el;
 *                     while (ao_json_iter_next(&it, &el)) { ... }                          */
typedef struct ao_json_iter {
    const char *p;   /* next element (or ']'), NULL when done or malformed */
    const char *end;
} ao_json_iter;

static inline ao_json_iter ao_json_iter_array(ao_json arr) {
    ao_json_iter it = {NULL, NULL};
    if (ao_json_kind_of(arr) != AO_JSON_ARRAY) return it;
    it.p = ao__json_ws(arr.p + 1, arr.end);
    it.end = arr.end;
    if (it.p < it.end && *it.p == ']') it.p = NULL;
    return it;
}

static inline int ao_json_iter_next(ao_json_iter *it, ao_json *out) {
    if (!it->p) return 0;
    const char *e = ao__json_skip_value(it->p, it->end, 1);
    if (!e) {
        it->p = NULL;
        return 0;
    }
    out->p = it->p;
    out->end = e;
    const char *q = ao__json_ws(e, it->end);
    if (q < it->end && *q == ',') {
        it->p = ao__json_ws(q + 1, it->end);
    } else {
        it->p = NULL; /* ']' (or garbage, which ends the iteration) */
    }
    return 1;
}

/* The value of the first tag named `name` in an AO tag list [{"name":…,"value":…}, …]
 * (AO, like aos, takes the first when a name repeats), or missing. */
static inline ao_json ao_tags_get(ao_json tags, const char *name) {
    ao_json_iter it = ao_json_iter_array(tags);
    ao_json tag;
    while (ao_json_iter_next(&it, &tag)) {
        if (ao_json_str_eq(ao_json_get(tag, "name"), name)) return ao_json_get(tag, "value");
    }
    return ao_json_missing();
}

/* Convenience lookups on the raw texts handed to handle(). Each parses the text again, so an
 * actor reading many fields of a large message should ao_json_parse once and use ao_json_get /
 * ao_tags_get. Each returns a malloc'd NUL-terminated string (free it) or NULL when absent. */

/* Top-level field of the message: "Id", "From", "Owner", "Data", "Timestamp", … (numbers,
 * such as Timestamp or Nonce may be, come back as their digits). */
static inline char *ao_msg_field(const char *msg_json, const char *field) {
    return ao_json_text_dup(ao_json_get(ao_json_parse(msg_json), field), NULL);
}

/* Tag of the message, by name ("Action", "Quantity", …). */
static inline char *ao_msg_tag(const char *msg_json, const char *name) {
    return ao_json_text_dup(ao_tags_get(ao_json_get(ao_json_parse(msg_json), "Tags"), name), NULL);
}

/* Field of env.Process: "Id", "Owner". */
static inline char *ao_env_process_field(const char *env_json, const char *field) {
    return ao_json_text_dup(ao_json_get(ao_json_get(ao_json_parse(env_json), "Process"), field), NULL);
}

/* Tag of the process (env.Process.Tags), by name. */
static inline char *ao_env_process_tag(const char *env_json, const char *name) {
    ao_json process = ao_json_get(ao_json_parse(env_json), "Process");
    return ao_json_text_dup(ao_tags_get(ao_json_get(process, "Tags"), name), NULL);
}

/* Parses an unsigned decimal of 1–20 digits (no sign, no spaces) that fits in 64 bits.
 * Returns 1 and sets *out on success, 0 otherwise. */
static inline int ao_parse_u64(const char *s, size_t n, uint64_t *out) {
    if (!s || n == 0 || n > 20) return 0;
    uint64_t v = 0;
    for (size_t i = 0; i < n; i++) {
        if (s[i] < '0' || s[i] > '9') return 0;
        uint64_t d = (uint64_t)(s[i] - '0');
        if (v > (UINT64_MAX - d) / 10) return 0;
        v = v * 10 + d;
    }
    *out = v;
    return 1;
}

/* =============================================================================================
 * JSON writer: a growable buffer
 *
 * Appends never fail loudly: on out of memory (or a size overflow) the buffer is marked failed,
 * further appends are ignored, and ao_result_* turn it into an "out of memory" error result.
 * ============================================================================================= */

typedef struct ao_buf {
    char *data; /* NUL-terminated whenever len > 0 and not failed */
    size_t len;
    size_t cap;
    int failed;
} ao_buf;

#define AO_BUF_INIT {NULL, 0, 0, 0}

static inline void ao_buf_free(ao_buf *b) {
    free(b->data);
    b->data = NULL;
    b->len = b->cap = 0;
    b->failed = 0;
}

/* Makes room for `extra` more bytes plus a NUL. 1 on success, 0 when failed. */
static inline int ao_buf_reserve(ao_buf *b, size_t extra) {
    if (b->failed) return 0;
    if (extra > SIZE_MAX - 1 - b->len) {
        b->failed = 1;
        return 0;
    }
    size_t need = b->len + extra + 1;
    if (need <= b->cap) return 1;
    size_t cap = b->cap ? b->cap : 64;
    while (cap < need) {
        if (cap > SIZE_MAX / 2) {
            cap = need;
            break;
        }
        cap *= 2;
    }
    char *d = (char *)realloc(b->data, cap);
    if (!d) {
        b->failed = 1;
        return 0;
    }
    b->data = d;
    b->cap = cap;
    return 1;
}

static inline void ao_buf_putn(ao_buf *b, const char *s, size_t n) {
    if (!ao_buf_reserve(b, n)) return;
    if (n) memcpy(b->data + b->len, s, n);
    b->len += n;
    b->data[b->len] = '\0';
}

static inline void ao_buf_puts(ao_buf *b, const char *s) {
    ao_buf_putn(b, s, s ? strlen(s) : 0);
}

static inline void ao_buf_putc(ao_buf *b, char c) {
    ao_buf_putn(b, &c, 1);
}

/* Decimal, zero-padded on the left to at least `width` digits (width ≤ 64). */
static inline void ao_buf_put_u64_padded(ao_buf *b, uint64_t v, int width) {
    char tmp[64];
    int i = (int)sizeof tmp;
    do {
        tmp[--i] = (char)('0' + v % 10);
        v /= 10;
    } while (v && i > 0);
    while ((int)sizeof tmp - i < width && i > 0) tmp[--i] = '0';
    ao_buf_putn(b, tmp + i, sizeof tmp - (size_t)i);
}

static inline void ao_buf_put_u64(ao_buf *b, uint64_t v) {
    ao_buf_put_u64_padded(b, v, 1);
}

/* Length of the valid UTF-8 sequence at s[0..n) (1–4), or 0 when it is not valid UTF-8
 * (overlong forms, surrogates and code points above U+10FFFF are invalid). */
static inline size_t ao__utf8_seq(const unsigned char *s, size_t n) {
    unsigned char c = s[0];
    if (c < 0x80) return 1;
    size_t len;
    uint32_t min, cp;
    if (c >= 0xC2 && c <= 0xDF) {
        len = 2, min = 0x80, cp = c & 0x1F;
    } else if (c >= 0xE0 && c <= 0xEF) {
        len = 3, min = 0x800, cp = c & 0x0F;
    } else if (c >= 0xF0 && c <= 0xF4) {
        len = 4, min = 0x10000, cp = c & 0x07;
    } else {
        return 0;
    }
    if (n < len) return 0;
    for (size_t i = 1; i < len; i++) {
        if ((s[i] & 0xC0) != 0x80) return 0;
        cp = (cp << 6) | (s[i] & 0x3F);
    }
    if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return 0;
    return len;
}

/* Appends s[0..n) as a quoted JSON string: '"' and '\' are escaped, control characters become
 * \u00XX, and bytes that are not valid UTF-8 become \ufffd, so the output is always valid
 * JSON in valid UTF-8. */
static inline void ao_buf_put_json_strn(ao_buf *b, const char *s, size_t n) {
    static const char hex[] = "0123456789abcdef";
    const unsigned char *u = (const unsigned char *)s;
    ao_buf_putc(b, '"');
    size_t i = 0;
    while (i < n) {
        size_t run = i; /* copy runs of bytes that need no escaping in one go */
        while (run < n && u[run] >= 0x20 && u[run] < 0x80 && u[run] != '"' && u[run] != '\\') run++;
        if (run > i) {
            ao_buf_putn(b, s + i, run - i);
            i = run;
            continue;
        }
        unsigned char c = u[i];
        if (c == '"' || c == '\\') {
            char esc[2] = {'\\', (char)c};
            ao_buf_putn(b, esc, 2);
            i++;
        } else if (c < 0x20) {
            char esc[6] = {'\\', 'u', '0', '0', hex[c >> 4], hex[c & 0xF]};
            ao_buf_putn(b, esc, 6);
            i++;
        } else {
            size_t len = ao__utf8_seq(u + i, n - i);
            if (len) {
                ao_buf_putn(b, s + i, len);
                i += len;
            } else {
                ao_buf_putn(b, "\\ufffd", 6);
                i++;
            }
        }
    }
    ao_buf_putc(b, '"');
}

static inline void ao_buf_put_json_str(ao_buf *b, const char *s) {
    ao_buf_put_json_strn(b, s ? s : "", s ? strlen(s) : 0);
}

/* =============================================================================================
 * Outbox and results
 * ============================================================================================= */

/* The Messages array under construction. */
typedef struct ao_outbox {
    ao_buf json; /* the array's elements, comma-separated, without the brackets */
    size_t count;
} ao_outbox;

#define AO_OUTBOX_INIT {AO_BUF_INIT, 0}

/* Appends {"Target":…,"Anchor":…,"Tags":[…],"Data":…} to the outbox. `tags` is a list of
 * name, value pairs ended by NULL: (const char *[]){"Action", "Pong", NULL}. AO's messenger
 * drops entries without Target, Anchor or Tags, and sends empty Data as " ". */
static inline void ao_outbox_add(ao_outbox *ob, const char *target, const char *anchor, const char *const *tags,
                                 const char *data) {
    ao_buf *b = &ob->json;
    if (ob->count) ao_buf_putc(b, ',');
    ao_buf_puts(b, "{\"Target\":");
    ao_buf_put_json_str(b, target);
    ao_buf_puts(b, ",\"Anchor\":");
    ao_buf_put_json_str(b, anchor);
    ao_buf_puts(b, ",\"Tags\":[");
    for (size_t i = 0; tags && tags[i] && tags[i + 1]; i += 2) {
        if (i) ao_buf_putc(b, ',');
        ao_buf_puts(b, "{\"name\":");
        ao_buf_put_json_str(b, tags[i]);
        ao_buf_puts(b, ",\"value\":");
        ao_buf_put_json_str(b, tags[i + 1]);
        ao_buf_putc(b, '}');
    }
    ao_buf_puts(b, "],\"Data\":");
    ao_buf_put_json_str(b, data);
    ao_buf_putc(b, '}');
    ob->count++;
}

static inline void ao_outbox_free(ao_outbox *ob) {
    ao_buf_free(&ob->json);
    ob->count = 0;
}

/* The result returned last; freed when the next one is made (the host has read it by then). */
static inline char **ao__last_result(void) {
    static char *last;
    return &last;
}

/* Takes ownership of the finished result text in `b` and returns it for handle() to return. */
static inline const char *ao__result_keep(ao_buf *b) {
    char **last = ao__last_result();
    free(*last);
    *last = NULL;
    if (b->failed || !b->data) {
        ao_buf_free(b);
        return "{\"ok\":false,\"response\":{\"Error\":\"out of memory\"}}";
    }
    *last = b->data;
    b->data = NULL;
    b->len = b->cap = 0;
    return *last;
}

/* A failed evaluation: {"ok":false,"response":{"Error":<error>}}. The host rolls the state back. */
static inline const char *ao_result_error(const char *error) {
    ao_buf b = AO_BUF_INIT;
    ao_buf_puts(&b, "{\"ok\":false,\"response\":{\"Error\":");
    ao_buf_put_json_str(&b, error);
    ao_buf_puts(&b, "}}");
    return ao__result_keep(&b);
}

/* Like ao_result_error, with the message taken from a buffer (which it frees). */
static inline const char *ao_result_error_buf(ao_buf *error) {
    if (error->failed) {
        ao_buf_free(error);
        return ao__result_keep(error);
    }
    const char *r = ao_result_error(error->data ? error->data : "");
    ao_buf_free(error);
    return r;
}

/* A successful evaluation with Output = output[0..len) as a JSON string and the outbox's
 * messages (outbox may be NULL); frees the outbox. Spawns and Assignments are empty. */
static inline const char *ao_result_ok_n(const char *output, size_t len, ao_outbox *outbox) {
    ao_buf b = AO_BUF_INIT;
    ao_buf_puts(&b, "{\"ok\":true,\"response\":{\"Output\":");
    ao_buf_put_json_strn(&b, output ? output : "", output ? len : 0);
    ao_buf_puts(&b, ",\"Messages\":[");
    if (outbox) {
        if (outbox->json.failed) b.failed = 1;
        if (outbox->json.data) ao_buf_putn(&b, outbox->json.data, outbox->json.len);
        ao_outbox_free(outbox);
    }
    ao_buf_puts(&b, "],\"Spawns\":[],\"Assignments\":[]}}");
    return ao__result_keep(&b);
}

static inline const char *ao_result_ok(const char *output, ao_outbox *outbox) {
    return ao_result_ok_n(output, output ? strlen(output) : 0, outbox);
}

/* Like ao_result_ok, with Output taken from a buffer (which it frees). */
static inline const char *ao_result_ok_buf(ao_buf *output, ao_outbox *outbox) {
    if (output->failed) {
        ao_buf_free(output);
        if (outbox) ao_outbox_free(outbox);
        return ao__result_keep(output);
    }
    const char *r = ao_result_ok_n(output->data, output->len, outbox);
    ao_buf_free(output);
    return r;
}

/* Frees the message and environment texts; call it at the end of handle(), after the last
 * use of anything parsed from them. */
static inline void ao_handle_done(char *msg_json, char *env_json) {
    free(msg_json);
    free(env_json);
}

#endif /* AO_GPU_WORKER_H */

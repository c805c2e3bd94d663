/*
 * counter.c — the counter/echo example actor (JSON-1 ABI, see include/ao_gpu_worker.h).
 *
 * State: one 64-bit count in a static variable; it persists because the whole linear memory is
 * the process state. Behaviour by the message's Action tag:
 *
 *   Increment  optional tag Amount (decimal, default 1): count += Amount; Output "count=N"
 *   Get        Output "count=N"
 *   Echo       Output = the message Data
 *   Ping       Output "pong"; one message to the Reply-To tag's process (else to From):
 *              Action=Pong, Data "pong", Anchor = the count
 *              as 32 zero-padded decimal digits
 *   Fail       fails with "failed on purpose" (after changing the count, so the host's rollback
 *              is what keeps the state)
 *   Print      printf()s "hello from counter\n" (the host captures fd 1); Output "printed"
 *   otherwise  Output "ignored: <Action>" (the Process message, Type=Process, included)
 *
 * Build: scripts/build-actors.
 */
#include <stdio.h>

#include "ao_gpu_worker.h"

static uint64_t count;

static const char *count_result(void) {
    ao_buf out = AO_BUF_INIT;
    ao_buf_puts(&out, "count=");
    ao_buf_put_u64(&out, count);
    return ao_result_ok_buf(&out, NULL);
}

static const char *increment(ao_json tags) {
    uint64_t amount = 1;
    ao_json amount_tag = ao_tags_get(tags, "Amount");
    if (ao_json_present(amount_tag)) {
        char digits[32];
        int64_t n = ao_json_str_copy(amount_tag, digits, sizeof digits);
        if (n < 0 || n >= (int64_t)sizeof digits || !ao_parse_u64(digits, (size_t)n, &amount))
            return ao_result_error("invalid Amount");
    }
    if (amount > UINT64_MAX - count) return ao_result_error("count overflow");
    count += amount;
    return count_result();
}

static const char *echo(ao_json msg) {
    size_t len = 0;
    char *data = ao_json_text_dup(ao_json_get(msg, "Data"), &len);
    const char *result = ao_result_ok_n(data ? data : "", data ? len : 0, NULL);
    free(data);
    return result;
}

static const char *ping(ao_json msg, ao_json tags) {
    ao_json reply_to = ao_tags_get(tags, "Reply-To");
    char *from = ao_json_text_dup(ao_json_present(reply_to) ? reply_to : ao_json_get(msg, "From"), NULL);
    if (!from || !*from) {
        free(from);
        return ao_result_error("missing From");
    }
    ao_buf anchor = AO_BUF_INIT;
    ao_buf_put_u64_padded(&anchor, count, 32);
    ao_outbox outbox = AO_OUTBOX_INIT;
    const char *pong_tags[] = {"Action", "Pong", NULL};
    ao_outbox_add(&outbox, from, anchor.failed ? "" : anchor.data, pong_tags, "pong");
    if (anchor.failed) outbox.json.failed = 1;
    ao_buf_free(&anchor);
    free(from);
    return ao_result_ok("pong", &outbox);
}

static const char *ignored(ao_json tags, int is_process) {
    ao_json action = ao_tags_get(tags, "Action");
    ao_buf out = AO_BUF_INIT;
    ao_buf_puts(&out, "ignored: ");
    if (ao_json_present(action)) {
        size_t len = 0;
        char *name = ao_json_text_dup(action, &len);
        if (!name) out.failed = 1;
        ao_buf_putn(&out, name, name ? len : 0);
        free(name);
    } else {
        ao_buf_puts(&out, is_process ? "Process" : "(no Action)");
    }
    return ao_result_ok_buf(&out, NULL);
}

static const char *dispatch(const char *msg_json) {
    ao_json msg = ao_json_parse(msg_json);
    if (ao_json_kind_of(msg) != AO_JSON_OBJECT) return ao_result_error("message is not a JSON object");
    ao_json tags = ao_json_get(msg, "Tags");
    ao_json action = ao_tags_get(tags, "Action");

    /* The process's own message (nonce 0) is acknowledged, whatever its tags say. */
    if (ao_json_str_eq(ao_tags_get(tags, "Type"), "Process")) return ignored(tags, 1);
    if (ao_json_str_eq(action, "Increment")) return increment(tags);
    if (ao_json_str_eq(action, "Get")) return count_result();
    if (ao_json_str_eq(action, "Echo")) return echo(msg);
    if (ao_json_str_eq(action, "Ping")) return ping(msg, tags);
    if (ao_json_str_eq(action, "Fail")) {
        count += 1000; /* must not survive: a failed evaluation rolls the memory back */
        return ao_result_error("failed on purpose");
    }
    if (ao_json_str_eq(action, "Print")) {
        printf("hello from counter\n");
        fflush(stdout); /* stdio buffers in linear memory; unflushed text would become state */
        return ao_result_ok("printed", NULL);
    }
    return ignored(tags, 0);
}

AO_EXPORT("handle")
const char *handle(char *msg_json, char *env_json) {
    const char *result = dispatch(msg_json);
    ao_handle_done(msg_json, env_json);
    return result;
}

/*
 * ledger.c — a stateful token ledger example actor (JSON-1 ABI, see include/ao_gpu_worker.h).
 *
 * State (static memory, persisted as part of the linear memory): a table of up to 1024
 * (address, balance) entries, a transfer counter and whether the supply was minted.
 *
 *   Type=Process  (the process's own message, nonce 0) mints the process tag Initial-Supply
 *                 (env.Process.Tags; default 1000000) to env.Process.Owner; Output
 *                 "minted N to ADDR"
 *   Balance       tag Target, else the sender (From): Output the balance in decimal
 *   Transfer      tags Recipient (1–64 bytes) and Quantity (decimal > 0): moves Quantity from
 *                 From to Recipient; Output "transferred Q from A to B"; a Debit-Notice to From
 *                 and a Credit-Notice to Recipient, both with Data " " and Anchor = the transfer
 *                 counter as 32 zero-padded decimal digits. Fails with "insufficient balance:
 *                 has X, needs Y" or "ledger full" (the host rolls the state back)
 *   Balances      Output = a JSON object {"<address>":"<balance>", …} in table order
 *   otherwise     Output "ignored: <Action>"
 *
 * Build: scripts/build-actors.
 */
#include "ao_gpu_worker.h"

#define LEDGER_CAPACITY 1024
#define ADDRESS_MAX 64
#define DEFAULT_SUPPLY 1000000u

typedef struct entry {
    char address[ADDRESS_MAX]; /* not NUL-terminated; `len` bytes */
    uint32_t len;
    uint64_t balance;
} entry;

static entry table[LEDGER_CAPACITY];
static uint32_t entries;
static uint64_t transfers;
static int minted;

/* An address decoded from a JSON string: 1–ADDRESS_MAX bytes. */
typedef struct address {
    char bytes[ADDRESS_MAX + 1]; /* NUL-terminated */
    uint32_t len;
} address;

/* 1 when `v` is a string of 1–ADDRESS_MAX bytes without control characters, decoded into *a
 * (so a->bytes is also a proper C string). */
static int read_address(ao_json v, address *a) {
    int64_t n = ao_json_str_copy(v, a->bytes, sizeof a->bytes);
    if (n < 1 || n > ADDRESS_MAX) return 0;
    for (int64_t i = 0; i < n; i++)
        if ((unsigned char)a->bytes[i] < 0x20) return 0;
    a->len = (uint32_t)n;
    return 1;
}

/* 1 when `v` is a string holding a decimal that fits in 64 bits. */
static int read_u64(ao_json v, uint64_t *out) {
    char digits[32];
    int64_t n = ao_json_str_copy(v, digits, sizeof digits);
    return n > 0 && n < (int64_t)sizeof digits && ao_parse_u64(digits, (size_t)n, out);
}

static entry *find(const address *a) {
    for (uint32_t i = 0; i < entries; i++) {
        if (table[i].len == a->len && memcmp(table[i].address, a->bytes, a->len) == 0) return &table[i];
    }
    return NULL;
}

/* The entry for `a`, added with balance 0 when new; NULL when the table is full. */
static entry *find_or_add(const address *a) {
    entry *e = find(a);
    if (e || entries == LEDGER_CAPACITY) return e;
    e = &table[entries++];
    memcpy(e->address, a->bytes, a->len);
    e->len = a->len;
    e->balance = 0;
    return e;
}

static void put_address(ao_buf *b, const address *a) {
    ao_buf_putn(b, a->bytes, a->len);
}

static const char *mint(ao_json env) {
    if (minted) return ao_result_ok("already minted", NULL);
    ao_json process = ao_json_get(env, "Process");
    address owner;
    if (!read_address(ao_json_get(process, "Owner"), &owner)) return ao_result_error("missing or invalid Process.Owner");
    uint64_t supply = DEFAULT_SUPPLY;
    ao_json supply_tag = ao_tags_get(ao_json_get(process, "Tags"), "Initial-Supply");
    if (ao_json_present(supply_tag) && !read_u64(supply_tag, &supply)) return ao_result_error("invalid Initial-Supply");
    entry *e = find_or_add(&owner);
    if (!e) return ao_result_error("ledger full");
    if (supply > UINT64_MAX - e->balance) return ao_result_error("invalid Initial-Supply: balance overflow");
    e->balance += supply;
    minted = 1;
    ao_buf out = AO_BUF_INIT;
    ao_buf_puts(&out, "minted ");
    ao_buf_put_u64(&out, supply);
    ao_buf_puts(&out, " to ");
    put_address(&out, &owner);
    return ao_result_ok_buf(&out, NULL);
}

static const char *balance(ao_json msg, ao_json tags) {
    address who;
    ao_json target = ao_tags_get(tags, "Target");
    uint64_t bal = 0;
    if (read_address(ao_json_present(target) ? target : ao_json_get(msg, "From"), &who)) {
        entry *e = find(&who);
        if (e) bal = e->balance;
    }
    ao_buf out = AO_BUF_INIT;
    ao_buf_put_u64(&out, bal);
    return ao_result_ok_buf(&out, NULL);
}

static const char *transfer(ao_json msg, ao_json tags) {
    address from, to;
    uint64_t quantity;
    if (!read_address(ao_json_get(msg, "From"), &from)) return ao_result_error("missing or invalid From");
    if (!read_address(ao_tags_get(tags, "Recipient"), &to))
        return ao_result_error("invalid Recipient: need 1 to 64 bytes, no control characters");
    if (!read_u64(ao_tags_get(tags, "Quantity"), &quantity) || quantity == 0)
        return ao_result_error("invalid Quantity: need a decimal integer above 0");

    entry *src = find(&from);
    uint64_t has = src ? src->balance : 0;
    if (has < quantity) {
        ao_buf err = AO_BUF_INIT;
        ao_buf_puts(&err, "insufficient balance: has ");
        ao_buf_put_u64(&err, has);
        ao_buf_puts(&err, ", needs ");
        ao_buf_put_u64(&err, quantity);
        return ao_result_error_buf(&err);
    }
    entry *dst = find_or_add(&to);
    if (!dst) return ao_result_error("ledger full");
    /* The total never exceeds the minted supply, so the credit cannot overflow. */
    src->balance -= quantity;
    dst->balance += quantity;
    transfers++;

    ao_buf qty = AO_BUF_INIT, anchor = AO_BUF_INIT, out = AO_BUF_INIT;
    ao_buf_put_u64(&qty, quantity);
    ao_buf_put_u64_padded(&anchor, transfers, 32);
    ao_outbox outbox = AO_OUTBOX_INIT;
    if (qty.failed || anchor.failed) {
        outbox.json.failed = 1;
    } else {
        const char *debit[] = {"Action", "Debit-Notice", "Recipient", to.bytes, "Quantity", qty.data, NULL};
        const char *credit[] = {"Action", "Credit-Notice", "Sender", from.bytes, "Quantity", qty.data, NULL};
        ao_outbox_add(&outbox, from.bytes, anchor.data, debit, " ");
        ao_outbox_add(&outbox, to.bytes, anchor.data, credit, " ");
    }
    ao_buf_puts(&out, "transferred ");
    ao_buf_put_u64(&out, quantity);
    ao_buf_puts(&out, " from ");
    put_address(&out, &from);
    ao_buf_puts(&out, " to ");
    put_address(&out, &to);
    ao_buf_free(&qty);
    ao_buf_free(&anchor);
    return ao_result_ok_buf(&out, &outbox);
}

static const char *balances(void) {
    ao_buf out = AO_BUF_INIT;
    ao_buf_putc(&out, '{');
    for (uint32_t i = 0; i < entries; i++) {
        if (i) ao_buf_putc(&out, ',');
        ao_buf_put_json_strn(&out, table[i].address, table[i].len);
        ao_buf_puts(&out, ":\"");
        ao_buf_put_u64(&out, table[i].balance);
        ao_buf_putc(&out, '"');
    }
    ao_buf_putc(&out, '}');
    return ao_result_ok_buf(&out, NULL);
}

static const char *ignored(ao_json action) {
    ao_buf out = AO_BUF_INIT;
    ao_buf_puts(&out, "ignored: ");
    size_t len = 0;
    char *name = ao_json_text_dup(action, &len);
    if (name) ao_buf_putn(&out, name, len);
    else ao_buf_puts(&out, "(no Action)");
    free(name);
    return ao_result_ok_buf(&out, NULL);
}

static const char *dispatch(const char *msg_json, const char *env_json) {
    ao_json msg = ao_json_parse(msg_json);
    if (ao_json_kind_of(msg) != AO_JSON_OBJECT) return ao_result_error("message is not a JSON object");
    ao_json tags = ao_json_get(msg, "Tags");
    ao_json action = ao_tags_get(tags, "Action");

    if (ao_json_str_eq(ao_tags_get(tags, "Type"), "Process")) {
        ao_json env = ao_json_parse(env_json);
        if (ao_json_kind_of(env) != AO_JSON_OBJECT) return ao_result_error("environment is not a JSON object");
        return mint(env);
    }
    if (ao_json_str_eq(action, "Balance")) return balance(msg, tags);
    if (ao_json_str_eq(action, "Transfer")) return transfer(msg, tags);
    if (ao_json_str_eq(action, "Balances")) return balances();
    return ignored(action);
}

AO_EXPORT("handle")
const char *handle(char *msg_json, char *env_json) {
    const char *result = dispatch(msg_json, env_json);
    ao_handle_done(msg_json, env_json);
    return result;
}

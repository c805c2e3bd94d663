// The host emulator of the CUDA device for the unit tests of src/gpu/cuda (driven by emu.rs): a
// process that owns "device" buffers (malloc'd, so AddressSanitizer catches any kernel access out
// of bounds) and runs the kernels of kernels/*.cu (compiled for the host with emu_prelude.h) on
// request. Requests arrive on stdin and replies leave on stdout, little-endian:
//
//   1 alloc  u64 len                              -> u64 id
//   2 free   u64 id
//   3 write  u64 id, u64 off, u64 len, bytes
//   4 read   u64 id, u64 off, u64 len             -> bytes
//   5 copy   u64 src, u64 soff, u64 dst, u64 doff, u64 len
//   6 zero   u64 id, u64 off, u64 len
//   7 launch u32 name_len, name, u32 grid, u32 nargs, args (u8 0 + u64 buffer id | u8 1 + u32 len + bytes)
//   8 sgemm  (cuBLAS sgemm_strided_batched, column-major) u8 ta, u8 tb, i32 m n k,
//            u64 a, i32 lda, i64 sa, u64 b, i32 ldb, i64 sb, u64 c, i32 ldc, i64 sc, i32 batch
//
// Every reply starts with a status byte: 0 and the payload, or 1, u32 len and an error message.
// A launch runs min(grid, EMU_GRID_CAP) blocks of 256 threads, one block at a time (kernels are
// grid-stride loops, so a smaller grid must give the same result), each thread a fiber; a barrier
// that can never complete is reported as an error, and an alarm kills a launch that still hangs.

#include <map>
#include <string>
#include <vector>

#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include "emu_prelude.h"

emu_dim3 threadIdx;
emu_dim3 blockIdx;
emu_dim3 blockDim;
emu_dim3 gridDim;

static const unsigned EMU_THREADS = 256;
static const unsigned EMU_GRID_CAP = 3;

static std::map<std::string, const EmuKernel *> &kernels() {
    static std::map<std::string, const EmuKernel *> k;
    return k;
}
void emu_register(const EmuKernel *k) { kernels()[k->name] = k; }

// ---- block execution: one fiber per CUDA thread ----

#if defined(__has_feature)
#if __has_feature(address_sanitizer)
#define EMU_ASAN 1
#include <sanitizer/common_interface_defs.h>
#endif
#endif
#ifndef EMU_ASAN
static inline void __sanitizer_start_switch_fiber(void **, const void *, size_t) {}
static inline void __sanitizer_finish_switch_fiber(void *, const void **, size_t *) {}
#endif

// A barrier for fibers: `expected` live participants; those that have finished the kernel drop out.
struct Bar {
    unsigned expected, arrived, gen;
};

struct Fiber {
    ucontext_t ctx;
    void *fake_stack;
    bool done;
};

static const size_t EMU_STACK = 64 * 1024;
static Fiber fibers[EMU_THREADS];
static uint8_t *stacks;  // EMU_THREADS stacks of EMU_STACK bytes
static ucontext_t sched_ctx;
static const void *main_stack_bottom;
static size_t main_stack_size;
static unsigned current;
static uint64_t progress;  // bumped on every barrier arrival and kernel exit: no change in a sweep = deadlock
static Bar block_bar;
static Bar warp_bar[EMU_THREADS / 32];
static uint32_t warp_vals[EMU_THREADS / 32][32];
static const EmuKernel *run_kernel;
static void **run_args;

static void yield_fiber() {
    Fiber &f = fibers[current];
    __sanitizer_start_switch_fiber(&f.fake_stack, main_stack_bottom, main_stack_size);
    swapcontext(&f.ctx, &sched_ctx);
    __sanitizer_finish_switch_fiber(f.fake_stack, nullptr, nullptr);
}

static void bar_wait(Bar &b) {
    progress++;
    unsigned gen = b.gen;
    if (++b.arrived == b.expected) {
        b.arrived = 0;
        b.gen++;
        return;
    }
    while (b.gen == gen) yield_fiber();
}

static void bar_drop(Bar &b) {
    b.expected--;
    if (b.arrived > 0 && b.arrived == b.expected) {
        b.arrived = 0;
        b.gen++;
    }
}

void __syncthreads() { bar_wait(block_bar); }

uint32_t emu_shfl(uint32_t v, int src_lane) {
    unsigned w = threadIdx.x >> 5, lane = threadIdx.x & 31u;
    warp_vals[w][lane] = v;
    bar_wait(warp_bar[w]);
    uint32_t r = warp_vals[w][src_lane & 31];
    bar_wait(warp_bar[w]);
    return r;
}

static void fiber_main() {
    __sanitizer_finish_switch_fiber(nullptr, &main_stack_bottom, &main_stack_size);
    run_kernel->call(run_args);
    progress++;
    fibers[current].done = true;
    bar_drop(block_bar);
    bar_drop(warp_bar[current >> 5]);
    // Returning resumes the scheduler (uc_link); this fiber's stack is dead.
    __sanitizer_start_switch_fiber(nullptr, main_stack_bottom, main_stack_size);
}

// Runs block `b`: resumes the live fibers round-robin until all have finished. Returns false on a
// deadlock (every live fiber waits at a barrier that can never complete).
static bool run_block(const EmuKernel *k, void **args, unsigned b) {
    if (!stacks) {
        void *m = mmap(nullptr, EMU_THREADS * EMU_STACK, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (m == MAP_FAILED) {
            perror("mmap fiber stacks");
            exit(2);
        }
        stacks = (uint8_t *)m;
    }
    run_kernel = k;
    run_args = args;
    blockIdx = {b, 0, 0};
    block_bar = {EMU_THREADS, 0, 0};
    for (unsigned w = 0; w < EMU_THREADS / 32; w++) warp_bar[w] = {32, 0, 0};
    for (unsigned t = 0; t < EMU_THREADS; t++) {
        Fiber &f = fibers[t];
        f.done = false;
        getcontext(&f.ctx);
        f.ctx.uc_stack.ss_sp = stacks + (size_t)t * EMU_STACK;
        f.ctx.uc_stack.ss_size = EMU_STACK;
        f.ctx.uc_link = &sched_ctx;
        makecontext(&f.ctx, fiber_main, 0);
    }
    unsigned live = EMU_THREADS;
    while (live > 0) {
        uint64_t before = progress;
        for (unsigned t = 0; t < EMU_THREADS; t++) {
            if (fibers[t].done) continue;
            current = t;
            threadIdx = {t, 0, 0};
            void *fake = nullptr;
            __sanitizer_start_switch_fiber(&fake, stacks + (size_t)t * EMU_STACK, EMU_STACK);
            swapcontext(&sched_ctx, &fibers[t].ctx);
            __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
            if (fibers[t].done) live--;
        }
        if (live > 0 && progress == before) return false;
    }
    return true;
}

// ---- buffers and the request loop ----

struct Buf {
    uint8_t *p;
    uint64_t len;
};
static std::map<uint64_t, Buf> bufs;
static uint64_t next_id = 1;

static void read_exact(void *dst, size_t n) {
    uint8_t *d = (uint8_t *)dst;
    while (n > 0) {
        ssize_t r = read(0, d, n);
        if (r <= 0) exit(0);
        d += r;
        n -= (size_t)r;
    }
}
template <typename T> static T rd() {
    T v;
    read_exact(&v, sizeof v);
    return v;
}
static void write_all(const void *src, size_t n) {
    const uint8_t *s = (const uint8_t *)src;
    while (n > 0) {
        ssize_t w = write(1, s, n);
        if (w <= 0) exit(1);
        s += w;
        n -= (size_t)w;
    }
}
static void ok() {
    uint8_t s = 0;
    write_all(&s, 1);
}
static void fail(const std::string &msg) {
    uint8_t s = 1;
    uint32_t n = (uint32_t)msg.size();
    write_all(&s, 1);
    write_all(&n, 4);
    write_all(msg.data(), n);
}

static Buf *find(uint64_t id, uint64_t off, uint64_t len, std::string &err) {
    auto it = bufs.find(id);
    if (it == bufs.end()) {
        err = "unknown buffer " + std::to_string(id);
        return nullptr;
    }
    if (off > it->second.len || len > it->second.len - off) {
        err = "range [" + std::to_string(off) + ", +" + std::to_string(len) + ") outside buffer " + std::to_string(id) + " of " +
              std::to_string(it->second.len) + " bytes";
        return nullptr;
    }
    return &it->second;
}

static void launch() {
    uint32_t name_len = rd<uint32_t>();
    std::string name(name_len, '\0');
    read_exact(&name[0], name_len);
    uint32_t grid = rd<uint32_t>();
    uint32_t nargs = rd<uint32_t>();
    std::vector<std::vector<uint64_t>> blobs(nargs);  // 8-byte aligned storage of each argument's value
    std::vector<uint32_t> lens(nargs);
    std::vector<int> is_buf(nargs);
    std::vector<void *> args(nargs);
    std::string err;
    for (uint32_t i = 0; i < nargs; i++) {
        uint8_t kind = rd<uint8_t>();
        if (kind == 0) {
            uint64_t id = rd<uint64_t>();
            Buf *b = find(id, 0, 0, err);
            blobs[i].assign(1, b ? (uint64_t)(uintptr_t)b->p : 0);
            lens[i] = 8;
            is_buf[i] = 1;
        } else {
            uint32_t len = rd<uint32_t>();
            blobs[i].assign(len / 8 + 1, 0);
            if (len) read_exact(blobs[i].data(), len);
            lens[i] = len;
            is_buf[i] = 0;
        }
        args[i] = blobs[i].data();
    }
    if (!err.empty()) return fail(err);
    auto it = kernels().find(name);
    if (it == kernels().end()) return fail("no kernel named " + name);
    const EmuKernel *k = it->second;
    if ((int)nargs != k->nparams) return fail(name + ": " + std::to_string(nargs) + " arguments for " + std::to_string(k->nparams) + " parameters");
    for (int i = 0; i < k->nparams; i++) {
        if (k->is_ptr[i] != is_buf[i]) {
            return fail(name + ": argument " + std::to_string(i) +
                        (is_buf[i] ? " is a buffer but the parameter is not a pointer" : " is a value but the parameter is a pointer"));
        }
        if (!is_buf[i] && (int)lens[i] != k->sizes[i]) {
            return fail(name + ": argument " + std::to_string(i) + " has " + std::to_string(lens[i]) + " bytes, the parameter " +
                        std::to_string(k->sizes[i]));
        }
    }
    if (grid == 0) return fail(name + ": empty grid");
    gridDim = {grid < EMU_GRID_CAP ? grid : EMU_GRID_CAP, 1, 1};
    blockDim = {EMU_THREADS, 1, 1};
    alarm(300);
    for (unsigned b = 0; b < gridDim.x; b++) {
        if (!run_block(k, args.data(), b)) {
            alarm(0);
            return fail(name + ": deadlock: every live thread of block " + std::to_string(b) + " waits at a barrier");
        }
    }
    alarm(0);
    ok();
}

// cuBLAS's column-major C = op(A) @ op(B), strided batched, in double then rounded (a reference).
static void sgemm() {
    uint8_t ta = rd<uint8_t>(), tb = rd<uint8_t>();
    int32_t m = rd<int32_t>(), n = rd<int32_t>(), k = rd<int32_t>();
    uint64_t a = rd<uint64_t>();
    int32_t lda = rd<int32_t>();
    int64_t sa = rd<int64_t>();
    uint64_t b = rd<uint64_t>();
    int32_t ldb = rd<int32_t>();
    int64_t sb = rd<int64_t>();
    uint64_t c = rd<uint64_t>();
    int32_t ldc = rd<int32_t>();
    int64_t sc = rd<int64_t>();
    int32_t batch = rd<int32_t>();
    std::string err;
    Buf *A = find(a, 0, 0, err), *B = find(b, 0, 0, err), *C = find(c, 0, 0, err);
    if (!A || !B || !C) return fail(err);
    if (lda < (ta ? k : m) || ldb < (tb ? n : k) || ldc < m) return fail("sgemm: a leading dimension is too small");
    const float *fa = (const float *)A->p, *fb = (const float *)B->p;
    float *fc = (float *)C->p;
    for (int64_t bi = 0; bi < batch; bi++) {
        for (int64_t i = 0; i < m; i++) {
            for (int64_t j = 0; j < n; j++) {
                double acc = 0;
                for (int64_t l = 0; l < k; l++) {
                    int64_t ia = bi * sa + (ta ? l + i * lda : i + l * lda);
                    int64_t ib = bi * sb + (tb ? j + l * ldb : l + j * ldb);
                    int64_t ic = bi * sc + i + j * ldc;
                    if ((uint64_t)(ia + 1) * 4 > A->len || (uint64_t)(ib + 1) * 4 > B->len || (uint64_t)(ic + 1) * 4 > C->len)
                        return fail("sgemm: an access is outside its buffer");
                    acc += (double)fa[ia] * (double)fb[ib];
                }
                fc[bi * sc + i + j * ldc] = (float)acc;
            }
        }
    }
    ok();
}

int main() {
    for (;;) {
        uint8_t op;
        read_exact(&op, 1);
        std::string err;
        switch (op) {
        case 1: {
            uint64_t len = rd<uint64_t>();
            uint8_t *p = (uint8_t *)malloc(len ? len : 1);
            memset(p, 0xa5, len);  // uninitialized device memory: never zero by accident
            uint64_t id = next_id++;
            bufs[id] = Buf{p, len};
            ok();
            write_all(&id, 8);
            break;
        }
        case 2: {
            uint64_t id = rd<uint64_t>();
            auto it = bufs.find(id);
            if (it == bufs.end()) {
                fail("free of unknown buffer " + std::to_string(id));
                break;
            }
            free(it->second.p);
            bufs.erase(it);
            ok();
            break;
        }
        case 3: {
            uint64_t id = rd<uint64_t>(), off = rd<uint64_t>(), len = rd<uint64_t>();
            std::vector<uint8_t> data(len);
            if (len) read_exact(data.data(), len);
            Buf *b = find(id, off, len, err);
            if (!b) {
                fail(err);
                break;
            }
            if (len) memcpy(b->p + off, data.data(), len);
            ok();
            break;
        }
        case 4: {
            uint64_t id = rd<uint64_t>(), off = rd<uint64_t>(), len = rd<uint64_t>();
            Buf *b = find(id, off, len, err);
            if (!b) {
                fail(err);
                break;
            }
            ok();
            write_all(b->p + off, len);
            break;
        }
        case 5: {
            uint64_t s = rd<uint64_t>(), soff = rd<uint64_t>(), d = rd<uint64_t>(), doff = rd<uint64_t>(), len = rd<uint64_t>();
            Buf *sb = find(s, soff, len, err);
            Buf *db = sb ? find(d, doff, len, err) : nullptr;
            if (!sb || !db) {
                fail(err);
                break;
            }
            if (len) memmove(db->p + doff, sb->p + soff, len);
            ok();
            break;
        }
        case 6: {
            uint64_t id = rd<uint64_t>(), off = rd<uint64_t>(), len = rd<uint64_t>();
            Buf *b = find(id, off, len, err);
            if (!b) {
                fail(err);
                break;
            }
            if (len) memset(b->p + off, 0, len);
            ok();
            break;
        }
        case 7:
            launch();
            break;
        case 8:
            sgemm();
            break;
        default:
            fail("unknown request " + std::to_string(op));
            return 1;
        }
    }
}

// The matmul header: parameters, override constants, bindings, loading and decoding, ordered
// arithmetic. WGSL has no #include: the registry (src/gpu/kernels.rs) puts it (after common.wgsl and
// quant.wgsl) in front of matmul_cpu.wgsl, matmul_tiled.wgsl and matvec.wgsl, the three kernel files.
//
// Batched matmul with f32 accumulation: c[b] = op(a[b]) @ op(w[b]), op = optional transpose. `a` is
// f32; the right operand `w` is f32, f16 or a GGUF block type (q8_0 / q4_0 / q4_1; those need
// transpose_b, i.e. weights stored [n, k] with blocks along k), decoded exactly as `gpu::quant`
// defines dequantization (d * q as one multiply, + m as a separate add). A stride of 0 broadcasts a
// 2-D operand over the batch.
//
// Order: every kernel except `mv_split` sums each output over k in index order with a separate
// multiply and add (`acc = acc + x * w` from 0), mirroring `matmul_ordered` in src/gpu/cpu/matmul.rs and
// `quant::dot_row_ordered`, so all of them serve reproducible mode; they differ only in how the work
// is laid out:
//
// * `mm_rb`, `mv_rb`: for CPU adapters (lavapipe). lavapipe runs 8 invocations as SIMD lanes and
//   turns every storage or workgroup load into a per-lane loop, while arithmetic is cheap, so these
//   kernels maximize the multiply-adds per load: large register blocks (8 x 16 outputs per
//   invocation), 16-byte loads, whole quantized blocks decoded from three or four 16-byte loads, and
//   straight-line code (a loop over a private array would live in memory). `mm_rb` decodes
//   quantized weight tiles cooperatively into workgroup memory (each tile column is used by eight
//   invocations); `mv_rb` (few rows) decodes in registers, since no two invocations share a block.
// * `mm_tiled`, `mv_staged`, `mv_split`: for GPUs. Tiles of `a` and `w` staged in workgroup memory
//   with coalesced loads, quantized blocks decoded cooperatively, 4 x 4 outputs per invocation.
//   `mv_split` (fast mode only) splits k over 32 invocations per output and adds the partial sums
//   with a tree, so its order is fixed but not the CPU's.
//
// Pipelines are specialized per call shape with the override constants below (the backend builds
// and caches one pipeline per combination), so no per-element branch on the dtype or layout is left
// in the inner loops (`w_elem` passes the constant `DT` to quant.wgsl's `q_elem`).

struct MatmulParams {
    batch: u32,
    m: u32,
    n: u32,
    k: u32,
    stride_a: u32,
    stride_b: u32,
    trans_a: u32,
    trans_b: u32,
    // The dtype code of `w`: 0 f32, 1 f16, 3 q8_0, 4 q4_0, 5 q4_1.
    b_dtype: u32,
}

// op(a) = a^T: `a` stored [k, m].
override TA: bool = false;
// op(w) = w^T: `w` stored [n, k].
override TB: bool = false;
// The dtype code of `w` (as `b_dtype`).
override DT: u32 = 0u;
// Four consecutive elements of `a` along its contiguous axis start at a multiple of 4 wherever the
// kernels load them (the host checks the shape); otherwise they are gathered from two 16-byte loads.
override AV: bool = false;
// The same for `w` (f32: multiples of 4 elements; f16: multiples of 4 halves, 8 bytes).
override BV: bool = false;
// `mv_rb`: rows of op(a) per invocation (1, 2 or 4).
override ROWS: u32 = 1u;

@group(0) @binding(0) var<uniform> p: MatmulParams;
// Tensor buffers are bound whole; the pool sizes them in multiples of 16 bytes.
@group(0) @binding(1) var<storage, read> a: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> w: array<vec4<u32>>;
@group(0) @binding(3) var<storage, read_write> c: array<f32>;

// ---- loading and decoding (f16 and the block types one element at a time: quant.wgsl) ----

// Words s.. s+3 of the eight words x, y.
fn shift_u(x: vec4<u32>, y: vec4<u32>, s: u32) -> vec4<u32> {
    return select(select(select(x, vec4(x.yzw, y.x), s == 1u), vec4(x.zw, y.xy), s == 2u), vec4(x.w, y.xyz), s == 3u);
}

fn shift_f(x: vec4<f32>, y: vec4<f32>, s: u32) -> vec4<f32> {
    return select(select(select(x, vec4(x.yzw, y.x), s == 1u), vec4(x.zw, y.xy), s == 2u), vec4(x.w, y.xyz), s == 3u);
}

// Element `i` of `a`.
fn a_at(i: u32) -> f32 {
    return a[i >> 2u][i & 3u];
}

// Elements i.. i+3 of `a`.
fn a_vec(i: u32) -> vec4<f32> {
    if AV {
        return a[i >> 2u];
    }
    return shift_f(a[i >> 2u], a[(i >> 2u) + 1u], i & 3u);
}

// Word `i` of `w`.
fn w_word(i: u32) -> u32 {
    return w[i >> 2u][i & 3u];
}

// Words i.. i+3 of `w`.
fn w_words(i: u32) -> vec4<u32> {
    return shift_u(w[i >> 2u], w[(i >> 2u) + 1u], i & 3u);
}

// f32 elements e.. e+3 of `w`.
fn wf_vec(e: u32) -> vec4<f32> {
    if BV {
        return bitcast<vec4<f32>>(w[e >> 2u]);
    }
    return bitcast<vec4<f32>>(w_words(e));
}

// The four halves of two words.
fn halves(x: u32, y: u32) -> vec4<u32> {
    return vec4(x & 0xffffu, x >> 16u, y & 0xffffu, y >> 16u);
}

// f16 elements e.. e+3 of `w` (element 2i is the low half of word i).
fn h4(e: u32) -> vec4<f32> {
    if BV {
        let v = w[e >> 3u];
        let x = select(v.xy, v.zw, (e & 4u) != 0u);
        return half4(halves(x.x, x.y));
    }
    let ws = w_words(e >> 1u);
    let odd = vec4(ws.x >> 16u, ws.y & 0xffffu, ws.y >> 16u, ws.z & 0xffffu);
    return half4(select(halves(ws.x, ws.y), odd, (e & 1u) != 0u));
}

// Elements e.. e+3 of `w` as f32 (f32 or f16 only).
fn w_vec(e: u32) -> vec4<f32> {
    if DT == 1u {
        return h4(e);
    }
    return wf_vec(e);
}

// Word `i` of `w`, for quant.wgsl.
fn q_word(i: u32) -> u32 {
    return w_word(i);
}

// Element `idx` (row-major element index) of `w` as f32, one at a time.
fn w_elem(idx: u32) -> f32 {
    return q_elem(DT, idx);
}

// Element (i, q) of op(a) for the batch starting at `off`.
fn a_elem(off: u32, i: u32, q: u32) -> f32 {
    if TA {
        return a_at(off + q * p.m + i);
    }
    return a_at(off + i * p.k + q);
}

// Element (q, j) of op(w) for the batch starting at `off`.
fn b_elem(off: u32, q: u32, j: u32) -> f32 {
    if TB {
        return w_elem(off + j * p.k + q);
    }
    return w_elem(off + q * p.n + j);
}

// 32 consecutive values along k (one quantized block), in k order.
struct Blk {
    q0: vec4<f32>,
    q1: vec4<f32>,
    q2: vec4<f32>,
    q3: vec4<f32>,
    q4: vec4<f32>,
    q5: vec4<f32>,
    q6: vec4<f32>,
    q7: vec4<f32>,
}

// The signed bytes of a word as f32.
fn i8x4(q: u32) -> vec4<f32> {
    return vec4<f32>(bitcast<vec4<i32>>(vec4(q << 24u, q << 16u, q << 8u, q)) >> vec4(24u));
}

// The low (shift 0) or high (shift 4) nibbles of the bytes of a word.
fn nib4(q: u32, shift: u32) -> vec4<u32> {
    return (vec4(q) >> (vec4(0u, 8u, 16u, 24u) + shift)) & vec4(15u);
}

// Words i.. i+4 of `w`: two 16-byte loads wherever i falls.
struct W5 {
    v: vec4<u32>,
    e: u32,
}

fn words5(i: u32) -> W5 {
    let x0 = w[i >> 2u];
    let x1 = w[(i >> 2u) + 1u];
    let s = i & 3u;
    return W5(shift_u(x0, x1, s), x1[s]);
}

// The dequantized values of quantized block `blk` (its index in `w`, 32 elements each).
fn qblock(blk: u32) -> Blk {
    switch DT {
        case 3u: {
            // 34-byte blocks: the f16 at an even offset, then 32 signed bytes; words i.. i+8 hold
            // them, three 16-byte loads.
            let base = blk * 34u;
            let i = base >> 2u;
            let s = i & 3u;
            let x0 = w[i >> 2u];
            let x1 = w[(i >> 2u) + 1u];
            let x2 = w[(i >> 2u) + 2u];
            let v0 = shift_u(x0, x1, s);
            let v1 = shift_u(x1, x2, s);
            let n0 = vec4(v0.yzw, v1.x);
            let n1 = vec4(v1.yzw, x2[s]);
            // base % 4 == 2: the f16 is the high half of word i and the bytes are word aligned.
            let high = (base & 2u) != 0u;
            let d = half_value(select(v0.x & 0xffffu, v0.x >> 16u, high));
            let q0 = select((v0 >> vec4(16u)) | (n0 << vec4(16u)), n0, high);
            let q1 = select((v1 >> vec4(16u)) | (n1 << vec4(16u)), n1, high);
            return Blk(
                d * i8x4(q0.x), d * i8x4(q0.y), d * i8x4(q0.z), d * i8x4(q0.w),
                d * i8x4(q1.x), d * i8x4(q1.y), d * i8x4(q1.z), d * i8x4(q1.w),
            );
        }
        case 4u: {
            // 18-byte blocks: the f16, then 16 bytes of nibbles (element j < 16: low nibble of byte
            // j, element j >= 16: high nibble of byte j - 16).
            let base = blk * 18u;
            let ws = words5(base >> 2u);
            let n0 = vec4(ws.v.yzw, ws.e);
            let high = (base & 2u) != 0u;
            let d = half_value(select(ws.v.x & 0xffffu, ws.v.x >> 16u, high));
            let q = select((ws.v >> vec4(16u)) | (n0 << vec4(16u)), n0, high);
            let m8 = vec4(8);
            return Blk(
                d * vec4<f32>(vec4<i32>(nib4(q.x, 0u)) - m8), d * vec4<f32>(vec4<i32>(nib4(q.y, 0u)) - m8),
                d * vec4<f32>(vec4<i32>(nib4(q.z, 0u)) - m8), d * vec4<f32>(vec4<i32>(nib4(q.w, 0u)) - m8),
                d * vec4<f32>(vec4<i32>(nib4(q.x, 4u)) - m8), d * vec4<f32>(vec4<i32>(nib4(q.y, 4u)) - m8),
                d * vec4<f32>(vec4<i32>(nib4(q.z, 4u)) - m8), d * vec4<f32>(vec4<i32>(nib4(q.w, 4u)) - m8),
            );
        }
        default: {
            // q4_1: 20-byte blocks, so d and m share word 5 blk and the nibbles are word aligned.
            let ws = words5(blk * 5u);
            let q = vec4(ws.v.yzw, ws.e);
            let d = half_value(ws.v.x & 0xffffu);
            let m = vec4(half_value(ws.v.x >> 16u));
            return Blk(
                d * vec4<f32>(nib4(q.x, 0u)) + m, d * vec4<f32>(nib4(q.y, 0u)) + m,
                d * vec4<f32>(nib4(q.z, 0u)) + m, d * vec4<f32>(nib4(q.w, 0u)) + m,
                d * vec4<f32>(nib4(q.x, 4u)) + m, d * vec4<f32>(nib4(q.y, 4u)) + m,
                d * vec4<f32>(nib4(q.z, 4u)) + m, d * vec4<f32>(nib4(q.w, 4u)) + m,
            );
        }
    }
}

// Elements e.. e+31 of `w` as f32 (e is a multiple of 32 for the block types).
fn w_block(e: u32) -> Blk {
    if DT >= 3u {
        return qblock(e >> 5u);
    }
    if DT == 1u && BV && (e & 7u) == 0u {
        let i = e >> 3u;
        let x0 = w[i];
        let x1 = w[i + 1u];
        let x2 = w[i + 2u];
        let x3 = w[i + 3u];
        return Blk(
            half4(halves(x0.x, x0.y)), half4(halves(x0.z, x0.w)), half4(halves(x1.x, x1.y)), half4(halves(x1.z, x1.w)),
            half4(halves(x2.x, x2.y)), half4(halves(x2.z, x2.w)), half4(halves(x3.x, x3.y)), half4(halves(x3.z, x3.w)),
        );
    }
    return Blk(
        w_vec(e), w_vec(e + 4u), w_vec(e + 8u), w_vec(e + 12u),
        w_vec(e + 16u), w_vec(e + 20u), w_vec(e + 24u), w_vec(e + 28u),
    );
}

// Elements i.. i+31 of `a` (contiguous).
fn a_block(i: u32) -> Blk {
    return Blk(
        a_vec(i), a_vec(i + 4u), a_vec(i + 8u), a_vec(i + 12u),
        a_vec(i + 16u), a_vec(i + 20u), a_vec(i + 24u), a_vec(i + 28u),
    );
}

// Elements i, i + s, ..., i + 31 s of `a`.
fn a_block_strided(i: u32, s: u32) -> Blk {
    var v: array<f32, 32>;
    for (var t = 0u; t < 32u; t++) {
        v[t] = a_at(i + t * s);
    }
    return Blk(
        vec4(v[0], v[1], v[2], v[3]), vec4(v[4], v[5], v[6], v[7]), vec4(v[8], v[9], v[10], v[11]),
        vec4(v[12], v[13], v[14], v[15]), vec4(v[16], v[17], v[18], v[19]), vec4(v[20], v[21], v[22], v[23]),
        vec4(v[24], v[25], v[26], v[27]), vec4(v[28], v[29], v[30], v[31]),
    );
}

// ---- ordered arithmetic ----

// acc + x0 y0 + x1 y1 + x2 y2 + x3 y3, one term at a time.
fn dot4(acc: f32, x: vec4<f32>, y: vec4<f32>) -> f32 {
    var s = acc;
    s = s + x.x * y.x;
    s = s + x.y * y.y;
    s = s + x.z * y.z;
    s = s + x.w * y.w;
    return s;
}

fn dot_blk(acc: f32, x: Blk, y: Blk) -> f32 {
    var s = acc;
    s = dot4(s, x.q0, y.q0);
    s = dot4(s, x.q1, y.q1);
    s = dot4(s, x.q2, y.q2);
    s = dot4(s, x.q3, y.q3);
    s = dot4(s, x.q4, y.q4);
    s = dot4(s, x.q5, y.q5);
    s = dot4(s, x.q6, y.q6);
    s = dot4(s, x.q7, y.q7);
    return s;
}

// acc + x.x w0 + x.y w1 + x.z w2 + x.w w3 for four columns at once (x: four k, w_t: the columns at k t).
fn axpy4(acc: vec4<f32>, x: vec4<f32>, w0: vec4<f32>, w1: vec4<f32>, w2: vec4<f32>, w3: vec4<f32>) -> vec4<f32> {
    var s = acc;
    s = s + x.x * w0;
    s = s + x.y * w1;
    s = s + x.z * w2;
    s = s + x.w * w3;
    return s;
}

// ---- storing and grid ----

fn store4(row_off: u32, i: u32, j0: u32, v: vec4<f32>) {
    if i >= p.m || j0 >= p.n {
        return;
    }
    let o = row_off + i * p.n + j0;
    c[o] = v.x;
    if j0 + 1u < p.n {
        c[o + 1u] = v.y;
    }
    if j0 + 2u < p.n {
        c[o + 2u] = v.z;
    }
    if j0 + 3u < p.n {
        c[o + 3u] = v.w;
    }
}

fn flat_group(wg: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return wg.y * nwg.x + wg.x;
}

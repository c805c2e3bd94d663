// Batched matmul with f32 accumulation: c[b] = op(a[b]) @ op(w[b]), op = optional transpose. `a` is
// f32; the right operand `w` is f32, f16 or a GGUF block type (q8_0 / q4_0 / q4_1; those need
// transpose_b, i.e. weights stored [n, k] with blocks along k), decoded exactly as `gpu::quant`
// defines dequantization (d * q as one multiply, + m as a separate add). A stride of 0 broadcasts a
// 2-D operand over the batch.
//
// Order: every kernel except `mv_split` sums each output over k in index order with a separate
// multiply and add (`acc = acc + x * w` from 0), mirroring `matmul_ordered` in src/gpu/cpu.rs and
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
// in the inner loops.

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

// ---- loading and decoding ----

// The f32 value of f16 bits (exact, as `quant::f16_value`), four at a time and without branches.
fn half4(h: vec4<u32>) -> vec4<f32> {
    let sign = (h & vec4(0x8000u)) << vec4(16u);
    let e = (h >> vec4(10u)) & vec4(0x1fu);
    let man = h & vec4(0x3ffu);
    let normal = sign | ((e + vec4(112u)) << vec4(23u)) | (man << vec4(13u));
    let special = sign | vec4(0x7f800000u) | (man << vec4(13u));
    // man * 2^-24 is exact and normal in f32.
    let sub = sign | bitcast<vec4<u32>>(vec4<f32>(man) * bitcast<f32>(0x33800000u));
    return bitcast<vec4<f32>>(select(select(normal, special, e == vec4(0x1fu)), sub, e == vec4(0u)));
}

fn half_value(h: u32) -> f32 {
    return half4(vec4(h)).x;
}

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

// Byte `o` of `w`.
fn w_byte(o: u32) -> u32 {
    return (w_word(o >> 2u) >> ((o & 3u) * 8u)) & 0xffu;
}

// The f16 at even byte offset `o` of `w` (never straddles a word).
fn w_half_at_byte(o: u32) -> f32 {
    return half_value((w_word(o >> 2u) >> ((o & 2u) * 8u)) & 0xffffu);
}

// Element `idx` (row-major element index) of `w` as f32, one at a time.
fn w_elem(idx: u32) -> f32 {
    switch DT {
        case 1u: {
            return half_value((w_word(idx >> 1u) >> ((idx & 1u) * 16u)) & 0xffffu);
        }
        case 3u: {
            let base = (idx >> 5u) * 34u;
            let q = bitcast<i32>(w_byte(base + 2u + (idx & 31u)) << 24u) >> 24u;
            return w_half_at_byte(base) * f32(q);
        }
        case 4u: {
            let j = idx & 31u;
            let base = (idx >> 5u) * 18u;
            let byte = w_byte(base + 2u + (j & 15u));
            let nib = select(byte & 15u, byte >> 4u, j >= 16u);
            return w_half_at_byte(base) * f32(i32(nib) - 8);
        }
        case 5u: {
            let j = idx & 31u;
            let base = (idx >> 5u) * 20u;
            let byte = w_byte(base + 4u + (j & 15u));
            let nib = select(byte & 15u, byte >> 4u, j >= 16u);
            let prod = w_half_at_byte(base) * f32(nib);
            return prod + w_half_at_byte(base + 2u);
        }
        default: {
            return bitcast<f32>(w_word(idx));
        }
    }
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

// ---- mv_rb: few rows (m <= 4), for CPU adapters ----

// Invocation t computes ROWS rows x 4 columns of one batch. One flat 1-D index over
// (batch, row group, column group) with the column group fastest; dispatch grid(that count / 64).

// The four columns' accumulators of rows ROWS of the invocation.
struct Acc4 {
    r0: vec4<f32>,
    r1: vec4<f32>,
    r2: vec4<f32>,
    r3: vec4<f32>,
}

// One k of op(w)'s four columns times the four rows' values xs.
fn acc4_k(acc: Acc4, xs: vec4<f32>, wv: vec4<f32>) -> Acc4 {
    var r = acc;
    r.r0 = r.r0 + xs.x * wv;
    if ROWS > 1u {
        r.r1 = r.r1 + xs.y * wv;
    }
    if ROWS > 2u {
        r.r2 = r.r2 + xs.z * wv;
        r.r3 = r.r3 + xs.w * wv;
    }
    return r;
}

// op(a)'s block of 32 k starting at k0 for row i.
fn x_block(offa: u32, i: u32, k0: u32) -> Blk {
    if TA {
        return a_block_strided(offa + k0 * p.m + i, p.m);
    }
    return a_block(offa + i * p.k + k0);
}

// acc.rX += xb_X . wb for the rows, in column slot `col`.
fn acc4_blk(acc: Acc4, x0: Blk, x1: Blk, x2: Blk, x3: Blk, wb: Blk, col: u32) -> Acc4 {
    var r = acc;
    r.r0[col] = dot_blk(r.r0[col], x0, wb);
    if ROWS > 1u {
        r.r1[col] = dot_blk(r.r1[col], x1, wb);
    }
    if ROWS > 2u {
        r.r2[col] = dot_blk(r.r2[col], x2, wb);
        r.r3[col] = dot_blk(r.r3[col], x3, wb);
    }
    return r;
}

// For !TB: 32 k of the four columns (w_vec at `e`, stride n) against the rows' blocks.
fn acc4_nt_quad(acc: Acc4, x0: vec4<f32>, x1: vec4<f32>, x2: vec4<f32>, x3: vec4<f32>, e: u32) -> Acc4 {
    let n = p.n;
    let w0 = w_vec(e);
    let w1 = w_vec(e + n);
    let w2 = w_vec(e + 2u * n);
    let w3 = w_vec(e + 3u * n);
    var r = acc;
    r.r0 = axpy4(r.r0, x0, w0, w1, w2, w3);
    if ROWS > 1u {
        r.r1 = axpy4(r.r1, x1, w0, w1, w2, w3);
    }
    if ROWS > 2u {
        r.r2 = axpy4(r.r2, x2, w0, w1, w2, w3);
        r.r3 = axpy4(r.r3, x3, w0, w1, w2, w3);
    }
    return r;
}

fn acc4_nt_blk(acc: Acc4, x0: Blk, x1: Blk, x2: Blk, x3: Blk, e: u32) -> Acc4 {
    let n4 = 4u * p.n;
    var r = acc;
    r = acc4_nt_quad(r, x0.q0, x1.q0, x2.q0, x3.q0, e);
    r = acc4_nt_quad(r, x0.q1, x1.q1, x2.q1, x3.q1, e + n4);
    r = acc4_nt_quad(r, x0.q2, x1.q2, x2.q2, x3.q2, e + 2u * n4);
    r = acc4_nt_quad(r, x0.q3, x1.q3, x2.q3, x3.q3, e + 3u * n4);
    r = acc4_nt_quad(r, x0.q4, x1.q4, x2.q4, x3.q4, e + 4u * n4);
    r = acc4_nt_quad(r, x0.q5, x1.q5, x2.q5, x3.q5, e + 5u * n4);
    r = acc4_nt_quad(r, x0.q6, x1.q6, x2.q6, x3.q6, e + 6u * n4);
    r = acc4_nt_quad(r, x0.q7, x1.q7, x2.q7, x3.q7, e + 7u * n4);
    return r;
}

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

@compute @workgroup_size(64)
fn mv_rb(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let t = flat_group(wg, nwg) * 64u + lid.x;
    let m = p.m;
    let n = p.n;
    let k = p.k;
    let ng = (n + 3u) / 4u;
    let mg = (m + ROWS - 1u) / ROWS;
    if t >= p.batch * mg * ng {
        return;
    }
    let j0 = (t % ng) * 4u;
    let i0 = ((t / ng) % mg) * ROWS;
    let bi = t / (ng * mg);
    let offa = bi * p.stride_a;
    let offb = bi * p.stride_b;
    // Rows and columns past the edge repeat the last one (their results are not stored).
    let i1 = min(i0 + 1u, m - 1u);
    let i2 = min(i0 + 2u, m - 1u);
    let i3 = min(i0 + 3u, m - 1u);
    var acc = Acc4(vec4(0.0), vec4(0.0), vec4(0.0), vec4(0.0));
    let nb = k / 32u;
    let zero = Blk(vec4(0.0), vec4(0.0), vec4(0.0), vec4(0.0), vec4(0.0), vec4(0.0), vec4(0.0), vec4(0.0));
    if TB {
        // Weight rows j0.. j0+3 of n, each k long.
        let e0 = offb + j0 * k;
        let e1 = offb + min(j0 + 1u, n - 1u) * k;
        let e2 = offb + min(j0 + 2u, n - 1u) * k;
        let e3 = offb + min(j0 + 3u, n - 1u) * k;
        for (var b = 0u; b < nb; b++) {
            let k0 = b * 32u;
            let x0 = x_block(offa, i0, k0);
            var x1 = zero;
            var x2 = zero;
            var x3 = zero;
            if ROWS > 1u {
                x1 = x_block(offa, i1, k0);
            }
            if ROWS > 2u {
                x2 = x_block(offa, i2, k0);
                x3 = x_block(offa, i3, k0);
            }
            acc = acc4_blk(acc, x0, x1, x2, x3, w_block(e0 + k0), 0u);
            acc = acc4_blk(acc, x0, x1, x2, x3, w_block(e1 + k0), 1u);
            acc = acc4_blk(acc, x0, x1, x2, x3, w_block(e2 + k0), 2u);
            acc = acc4_blk(acc, x0, x1, x2, x3, w_block(e3 + k0), 3u);
        }
        for (var q = nb * 32u; q < k; q++) {
            let xs = vec4(a_elem(offa, i0, q), a_elem(offa, i1, q), a_elem(offa, i2, q), a_elem(offa, i3, q));
            acc = acc4_k(acc, xs, vec4(w_elem(e0 + q), w_elem(e1 + q), w_elem(e2 + q), w_elem(e3 + q)));
        }
    } else {
        // Columns j0.. j0+3 of w [k, n] (f32 or f16).
        for (var b = 0u; b < nb; b++) {
            let k0 = b * 32u;
            let x0 = x_block(offa, i0, k0);
            var x1 = zero;
            var x2 = zero;
            var x3 = zero;
            if ROWS > 1u {
                x1 = x_block(offa, i1, k0);
            }
            if ROWS > 2u {
                x2 = x_block(offa, i2, k0);
                x3 = x_block(offa, i3, k0);
            }
            acc = acc4_nt_blk(acc, x0, x1, x2, x3, offb + k0 * n + j0);
        }
        for (var q = nb * 32u; q < k; q++) {
            let xs = vec4(a_elem(offa, i0, q), a_elem(offa, i1, q), a_elem(offa, i2, q), a_elem(offa, i3, q));
            acc = acc4_k(acc, xs, w_vec(offb + q * n + j0));
        }
    }
    let row_off = bi * m * n;
    store4(row_off, i0, j0, acc.r0);
    if ROWS > 1u {
        store4(row_off, i0 + 1u, j0, acc.r1);
    }
    if ROWS > 2u {
        store4(row_off, i0 + 2u, j0, acc.r2);
        store4(row_off, i0 + 3u, j0, acc.r3);
    }
}

// ---- mm_rb: more rows, for CPU adapters ----

// Workgroup 8 x 8 invocations for a 64 x 128 tile of c; invocation (x, y) computes rows 8y.. 8y+7
// and columns 16x.. 16x+15 of it. Dispatch (ceil(n / 128), ceil(m / 64), batch).

// 16 columns of one row.
struct R16 {
    c0: vec4<f32>,
    c1: vec4<f32>,
    c2: vec4<f32>,
    c3: vec4<f32>,
}

// 4 k x the 16 columns of op(w): one R16 per k.
struct Q16 {
    k0: R16,
    k1: R16,
    k2: R16,
    k3: R16,
}

// 8 rows x 4 k of op(a): one vec4 (over k) per row.
struct X8 {
    r0: vec4<f32>,
    r1: vec4<f32>,
    r2: vec4<f32>,
    r3: vec4<f32>,
    r4: vec4<f32>,
    r5: vec4<f32>,
    r6: vec4<f32>,
    r7: vec4<f32>,
}

fn r16_quad(acc: R16, x: vec4<f32>, b: Q16) -> R16 {
    return R16(
        axpy4(acc.c0, x, b.k0.c0, b.k1.c0, b.k2.c0, b.k3.c0),
        axpy4(acc.c1, x, b.k0.c1, b.k1.c1, b.k2.c1, b.k3.c1),
        axpy4(acc.c2, x, b.k0.c2, b.k1.c2, b.k2.c2, b.k3.c2),
        axpy4(acc.c3, x, b.k0.c3, b.k1.c3, b.k2.c3, b.k3.c3),
    );
}

fn r16_k(acc: R16, x: f32, b: R16) -> R16 {
    return R16(acc.c0 + x * b.c0, acc.c1 + x * b.c1, acc.c2 + x * b.c2, acc.c3 + x * b.c3);
}

// Rows k0.. k0+3 of w [k, n] at columns j.. j+15, `e` = the element of (k0, j).
fn q16_rows(e: u32) -> Q16 {
    let n = p.n;
    return Q16(
        R16(w_vec(e), w_vec(e + 4u), w_vec(e + 8u), w_vec(e + 12u)),
        R16(w_vec(e + n), w_vec(e + n + 4u), w_vec(e + n + 8u), w_vec(e + n + 12u)),
        R16(w_vec(e + 2u * n), w_vec(e + 2u * n + 4u), w_vec(e + 2u * n + 8u), w_vec(e + 2u * n + 12u)),
        R16(w_vec(e + 3u * n), w_vec(e + 3u * n + 4u), w_vec(e + 3u * n + 8u), w_vec(e + 3u * n + 12u)),
    );
}

// Four k from `k0` of four weight rows of w [n, k] starting at elements s: m[t] = the rows at k0 + t.
fn cols4(s: vec4<u32>, k0: u32) -> mat4x4<f32> {
    return transpose(mat4x4<f32>(w_vec(s.x + k0), w_vec(s.y + k0), w_vec(s.z + k0), w_vec(s.w + k0)));
}

// k0.. k0+3 of the 16 weight rows of w [n, k] starting at elements s0.. s3.
fn q16_cols(s0: vec4<u32>, s1: vec4<u32>, s2: vec4<u32>, s3: vec4<u32>, k0: u32) -> Q16 {
    let g0 = cols4(s0, k0);
    let g1 = cols4(s1, k0);
    let g2 = cols4(s2, k0);
    let g3 = cols4(s3, k0);
    return Q16(R16(g0[0], g1[0], g2[0], g3[0]), R16(g0[1], g1[1], g2[1], g3[1]), R16(g0[2], g1[2], g2[2], g3[2]), R16(g0[3], g1[3], g2[3], g3[3]));
}

// k0.. k0+3 of op(a) for 8 rows: for !TA the rows start at elements s0 (rows 0-3) and s1 (4-7);
// for TA, `i` is the element of (k0, first row) of a [k, m].
fn x8(s0: vec4<u32>, s1: vec4<u32>, i: u32, k0: u32) -> X8 {
    if TA {
        let m = p.m;
        let lo = transpose(mat4x4<f32>(a_vec(i), a_vec(i + m), a_vec(i + 2u * m), a_vec(i + 3u * m)));
        let hi = transpose(mat4x4<f32>(a_vec(i + 4u), a_vec(i + m + 4u), a_vec(i + 2u * m + 4u), a_vec(i + 3u * m + 4u)));
        return X8(lo[0], lo[1], lo[2], lo[3], hi[0], hi[1], hi[2], hi[3]);
    }
    return X8(
        a_vec(s0.x + k0), a_vec(s0.y + k0), a_vec(s0.z + k0), a_vec(s0.w + k0),
        a_vec(s1.x + k0), a_vec(s1.y + k0), a_vec(s1.z + k0), a_vec(s1.w + k0),
    );
}

// The 8 x 16 accumulators of an invocation.
struct Acc8 {
    r0: R16,
    r1: R16,
    r2: R16,
    r3: R16,
    r4: R16,
    r5: R16,
    r6: R16,
    r7: R16,
}

fn acc8_quad(acc: Acc8, x: X8, b: Q16) -> Acc8 {
    return Acc8(
        r16_quad(acc.r0, x.r0, b), r16_quad(acc.r1, x.r1, b), r16_quad(acc.r2, x.r2, b), r16_quad(acc.r3, x.r3, b),
        r16_quad(acc.r4, x.r4, b), r16_quad(acc.r5, x.r5, b), r16_quad(acc.r6, x.r6, b), r16_quad(acc.r7, x.r7, b),
    );
}

fn store16(row_off: u32, i: u32, j0: u32, v: R16) {
    store4(row_off, i, j0, v.c0);
    store4(row_off, i, j0 + 4u, v.c1);
    store4(row_off, i, j0 + 8u, v.c2);
    store4(row_off, i, j0 + 12u, v.c3);
}

// Decoded weights of the tile for one block of k: [32 k][32 column groups of 4].
var<workgroup> wtile: array<vec4<f32>, 1024>;

// Entries (k, g).. (k + 3, g) of `wtile` for quad `t` of half `h`: four blocks' vec4 `t`.
fn put_quad(k: u32, g: u32, b0: vec4<f32>, b1: vec4<f32>, b2: vec4<f32>, b3: vec4<f32>) {
    let v = transpose(mat4x4<f32>(b0, b1, b2, b3));
    wtile[k * 32u + g] = v[0];
    wtile[(k + 1u) * 32u + g] = v[1];
    wtile[(k + 2u) * 32u + g] = v[2];
    wtile[(k + 3u) * 32u + g] = v[3];
}

fn wtile_r16(k: u32, g: u32) -> R16 {
    let i = k * 32u + g;
    return R16(wtile[i], wtile[i + 1u], wtile[i + 2u], wtile[i + 3u]);
}

@compute @workgroup_size(8, 8, 1)
fn mm_rb(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let m = p.m;
    let n = p.n;
    let k = p.k;
    let bi = wg.z;
    let offa = bi * p.stride_a;
    let offb = bi * p.stride_b;
    let i0 = wg.y * 64u + lid.y * 8u;
    let j0 = wg.x * 128u + lid.x * 16u;
    // Rows and columns past the edge repeat the last one (their results are not stored).
    let rows_lo = min(vec4(i0) + vec4(0u, 1u, 2u, 3u), vec4(m - 1u));
    let rows_hi = min(vec4(i0) + vec4(4u, 5u, 6u, 7u), vec4(m - 1u));
    let sa0 = vec4(offa) + rows_lo * k;
    let sa1 = vec4(offa) + rows_hi * k;
    let cols = vec4(j0) + vec4(0u, 1u, 2u, 3u);
    let sb0 = vec4(offb) + min(cols, vec4(n - 1u)) * k;
    let sb1 = vec4(offb) + min(cols + vec4(4u), vec4(n - 1u)) * k;
    let sb2 = vec4(offb) + min(cols + vec4(8u), vec4(n - 1u)) * k;
    let sb3 = vec4(offb) + min(cols + vec4(12u), vec4(n - 1u)) * k;
    let z = R16(vec4(0.0), vec4(0.0), vec4(0.0), vec4(0.0));
    var acc = Acc8(z, z, z, z, z, z, z, z);
    if DT >= 3u {
        // Quantized (TB, k a multiple of 32): each block of k, the workgroup decodes the tile's 128
        // weight rows into `wtile`; invocation l takes column group l % 32 and half l / 32 of k.
        let l = lid.y * 8u + lid.x;
        let g = l % 32u;
        let h = l / 32u;
        let col0 = wg.x * 128u + g * 4u;
        let bl = (vec4(offb) + min(vec4(col0) + vec4(0u, 1u, 2u, 3u), vec4(n - 1u)) * k) / 32u;
        let nb = k / 32u;
        for (var b = 0u; b < nb; b++) {
            let w0 = qblock(bl.x + b);
            let w1 = qblock(bl.y + b);
            let w2 = qblock(bl.z + b);
            let w3 = qblock(bl.w + b);
            if h == 0u {
                put_quad(0u, g, w0.q0, w1.q0, w2.q0, w3.q0);
                put_quad(4u, g, w0.q1, w1.q1, w2.q1, w3.q1);
                put_quad(8u, g, w0.q2, w1.q2, w2.q2, w3.q2);
                put_quad(12u, g, w0.q3, w1.q3, w2.q3, w3.q3);
            } else {
                put_quad(16u, g, w0.q4, w1.q4, w2.q4, w3.q4);
                put_quad(20u, g, w0.q5, w1.q5, w2.q5, w3.q5);
                put_quad(24u, g, w0.q6, w1.q6, w2.q6, w3.q6);
                put_quad(28u, g, w0.q7, w1.q7, w2.q7, w3.q7);
            }
            workgroupBarrier();
            for (var t = 0u; t < 8u; t++) {
                let kk = t * 4u;
                let k0 = b * 32u + kk;
                let x = x8(sa0, sa1, offa + k0 * m + i0, k0);
                let gq = lid.x * 4u;
                let bq = Q16(wtile_r16(kk, gq), wtile_r16(kk + 1u, gq), wtile_r16(kk + 2u, gq), wtile_r16(kk + 3u, gq));
                acc = acc8_quad(acc, x, bq);
            }
            workgroupBarrier();
        }
    } else {
        let nq = k / 4u;
        for (var q = 0u; q < nq; q++) {
            let k0 = q * 4u;
            let x = x8(sa0, sa1, offa + k0 * m + i0, k0);
            var bq: Q16;
            if TB {
                bq = q16_cols(sb0, sb1, sb2, sb3, k0);
            } else {
                bq = q16_rows(offb + k0 * n + j0);
            }
            acc = acc8_quad(acc, x, bq);
        }
        for (var q = nq * 4u; q < k; q++) {
            var b: R16;
            if TB {
                b = R16(
                    vec4(w_elem(sb0.x + q), w_elem(sb0.y + q), w_elem(sb0.z + q), w_elem(sb0.w + q)),
                    vec4(w_elem(sb1.x + q), w_elem(sb1.y + q), w_elem(sb1.z + q), w_elem(sb1.w + q)),
                    vec4(w_elem(sb2.x + q), w_elem(sb2.y + q), w_elem(sb2.z + q), w_elem(sb2.w + q)),
                    vec4(w_elem(sb3.x + q), w_elem(sb3.y + q), w_elem(sb3.z + q), w_elem(sb3.w + q)),
                );
            } else {
                let e = offb + q * n + j0;
                b = R16(w_vec(e), w_vec(e + 4u), w_vec(e + 8u), w_vec(e + 12u));
            }
            acc.r0 = r16_k(acc.r0, a_elem(offa, rows_lo.x, q), b);
            acc.r1 = r16_k(acc.r1, a_elem(offa, rows_lo.y, q), b);
            acc.r2 = r16_k(acc.r2, a_elem(offa, rows_lo.z, q), b);
            acc.r3 = r16_k(acc.r3, a_elem(offa, rows_lo.w, q), b);
            acc.r4 = r16_k(acc.r4, a_elem(offa, rows_hi.x, q), b);
            acc.r5 = r16_k(acc.r5, a_elem(offa, rows_hi.y, q), b);
            acc.r6 = r16_k(acc.r6, a_elem(offa, rows_hi.z, q), b);
            acc.r7 = r16_k(acc.r7, a_elem(offa, rows_hi.w, q), b);
        }
    }
    let row_off = bi * m * n;
    store16(row_off, i0, j0, acc.r0);
    store16(row_off, i0 + 1u, j0, acc.r1);
    store16(row_off, i0 + 2u, j0, acc.r2);
    store16(row_off, i0 + 3u, j0, acc.r3);
    store16(row_off, i0 + 4u, j0, acc.r4);
    store16(row_off, i0 + 5u, j0, acc.r5);
    store16(row_off, i0 + 6u, j0, acc.r6);
    store16(row_off, i0 + 7u, j0, acc.r7);
}

// ---- mm_tiled: for GPUs ----

// A 64 x 64 tile of c per workgroup of 16 x 16 invocations, each computing a 4 x 4 block from
// 32-deep slices of op(a) and op(w) (decoded to f32) staged in workgroup memory with coalesced
// loads. Dispatch (ceil(n / 64), ceil(m / 64), batch).

// [32 k][16 groups of 4 rows] and [32 k][16 groups of 4 columns].
var<workgroup> a_s: array<vec4<f32>, 512>;
var<workgroup> b_s: array<vec4<f32>, 512>;

// Elements 8 o.. 8 o+7 of quantized block `blk`, from word loads.
fn qoct(blk: u32, o: u32) -> mat2x4<f32> {
    switch DT {
        case 3u: {
            let base = blk * 34u;
            let d = w_half_at_byte(base);
            let s = base + 2u + 8u * o;
            let i = s >> 2u;
            let w0 = w_word(i);
            let w1 = w_word(i + 1u);
            var b0 = w0;
            var b1 = w1;
            if (s & 2u) != 0u {
                let w2 = w_word(i + 2u);
                b0 = (w0 >> 16u) | (w1 << 16u);
                b1 = (w1 >> 16u) | (w2 << 16u);
            }
            return mat2x4<f32>(d * i8x4(b0), d * i8x4(b1));
        }
        case 4u: {
            let base = blk * 18u;
            let d = w_half_at_byte(base);
            let s = base + 2u + 8u * (o & 1u);
            let i = s >> 2u;
            let w0 = w_word(i);
            let w1 = w_word(i + 1u);
            var b0 = w0;
            var b1 = w1;
            if (s & 2u) != 0u {
                let w2 = w_word(i + 2u);
                b0 = (w0 >> 16u) | (w1 << 16u);
                b1 = (w1 >> 16u) | (w2 << 16u);
            }
            let sh = select(0u, 4u, o >= 2u);
            let m8 = vec4(8);
            return mat2x4<f32>(d * vec4<f32>(vec4<i32>(nib4(b0, sh)) - m8), d * vec4<f32>(vec4<i32>(nib4(b1, sh)) - m8));
        }
        default: {
            let i = blk * 5u;
            let dm = w_word(i);
            let d = half_value(dm & 0xffffu);
            let m = vec4(half_value(dm >> 16u));
            let j = i + 1u + 2u * (o & 1u);
            let sh = select(0u, 4u, o >= 2u);
            return mat2x4<f32>(d * vec4<f32>(nib4(w_word(j), sh)) + m, d * vec4<f32>(nib4(w_word(j + 1u), sh)) + m);
        }
    }
}

@compute @workgroup_size(16, 16, 1)
fn mm_tiled(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let m = p.m;
    let n = p.n;
    let k = p.k;
    let bi = wg.z;
    let offa = bi * p.stride_a;
    let offb = bi * p.stride_b;
    let row0 = wg.y * 64u;
    let col0 = wg.x * 64u;
    let l = lid.y * 16u + lid.x;
    var acc0 = vec4(0.0);
    var acc1 = vec4(0.0);
    var acc2 = vec4(0.0);
    var acc3 = vec4(0.0);
    for (var k0 = 0u; k0 < k; k0 += 32u) {
        // op(a): 64 rows x 32 k. Values past the edges are never summed.
        if TA {
            let kk = l / 8u;
            let r = (l % 8u) * 8u;
            let e = offa + min(k0 + kk, k - 1u) * m + row0 + r;
            a_s[kk * 16u + r / 4u] = a_vec(e);
            a_s[kk * 16u + r / 4u + 1u] = a_vec(e + 4u);
        } else {
            let r = l / 4u;
            let kk = (l % 4u) * 8u;
            let e = offa + min(row0 + r, m - 1u) * k + k0 + kk;
            let v0 = a_vec(e);
            let v1 = a_vec(e + 4u);
            let g = r / 4u;
            let c = r % 4u;
            a_s[kk * 16u + g][c] = v0.x;
            a_s[(kk + 1u) * 16u + g][c] = v0.y;
            a_s[(kk + 2u) * 16u + g][c] = v0.z;
            a_s[(kk + 3u) * 16u + g][c] = v0.w;
            a_s[(kk + 4u) * 16u + g][c] = v1.x;
            a_s[(kk + 5u) * 16u + g][c] = v1.y;
            a_s[(kk + 6u) * 16u + g][c] = v1.z;
            a_s[(kk + 7u) * 16u + g][c] = v1.w;
        }
        // op(w): 32 k x 64 columns.
        if TB {
            let col = l / 4u;
            let o = l % 4u;
            let e = offb + min(col0 + col, n - 1u) * k + k0;
            var v: mat2x4<f32>;
            if DT >= 3u {
                v = qoct(e >> 5u, o);
            } else {
                v = mat2x4<f32>(w_vec(e + 8u * o), w_vec(e + 8u * o + 4u));
            }
            let kk = o * 8u;
            let g = col / 4u;
            let c = col % 4u;
            b_s[kk * 16u + g][c] = v[0].x;
            b_s[(kk + 1u) * 16u + g][c] = v[0].y;
            b_s[(kk + 2u) * 16u + g][c] = v[0].z;
            b_s[(kk + 3u) * 16u + g][c] = v[0].w;
            b_s[(kk + 4u) * 16u + g][c] = v[1].x;
            b_s[(kk + 5u) * 16u + g][c] = v[1].y;
            b_s[(kk + 6u) * 16u + g][c] = v[1].z;
            b_s[(kk + 7u) * 16u + g][c] = v[1].w;
        } else {
            let kk = l / 8u;
            let cc = (l % 8u) * 8u;
            let e = offb + min(k0 + kk, k - 1u) * n + col0 + cc;
            b_s[kk * 16u + cc / 4u] = w_vec(e);
            b_s[kk * 16u + cc / 4u + 1u] = w_vec(e + 4u);
        }
        workgroupBarrier();
        // Stop at the real k so every output sums exactly k terms in order.
        let kmax = min(32u, k - k0);
        for (var kk = 0u; kk < kmax; kk++) {
            let av = a_s[kk * 16u + lid.y];
            let bv = b_s[kk * 16u + lid.x];
            acc0 = acc0 + av.x * bv;
            acc1 = acc1 + av.y * bv;
            acc2 = acc2 + av.z * bv;
            acc3 = acc3 + av.w * bv;
        }
        workgroupBarrier();
    }
    let row_off = bi * m * n;
    let i = row0 + lid.y * 4u;
    let j = col0 + lid.x * 4u;
    store4(row_off, i, j, acc0);
    store4(row_off, i + 1u, j, acc1);
    store4(row_off, i + 2u, j, acc2);
    store4(row_off, i + 3u, j, acc3);
}

// ---- matrix-vector products on GPUs (m = 1, transpose_b) ----

// Fast: 8 outputs per workgroup of 256, 32 invocations each. Invocation l of an output sums blocks
// l, l + 32, ... of k (neighbours read neighbouring blocks) and the 32 partial sums are added by a
// tree in workgroup memory. Dispatch grid(batch * n / 8).
var<workgroup> partial: array<f32, 256>;

@compute @workgroup_size(256)
fn mv_split(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let l = lid.x;
    let lane = l % 32u;
    let total = p.batch * p.n;
    let o = flat_group(wg, nwg) * 8u + l / 32u;
    let oc = min(o, total - 1u);
    let bi = oc / p.n;
    let j = oc % p.n;
    let k = p.k;
    let xa = bi * p.stride_a;
    let e = bi * p.stride_b + j * k;
    let nb = k / 32u;
    var acc = 0.0;
    for (var b = lane; b < nb; b += 32u) {
        acc = dot_blk(acc, a_block(xa + b * 32u), w_block(e + b * 32u));
    }
    let q = nb * 32u + lane;
    if q < k {
        acc = acc + a_at(xa + q) * w_elem(e + q);
    }
    partial[l] = acc;
    workgroupBarrier();
    for (var s = 16u; s > 0u; s >>= 1u) {
        if lane < s {
            partial[l] = partial[l] + partial[l + s];
        }
        workgroupBarrier();
    }
    if lane == 0u && o < total {
        c[o] = partial[l];
    }
}

// Reproducible: one invocation per output (64 per workgroup) summing k in order. The workgroup
// stages a chunk of its 64 weight rows (128 elements for the block types, 64 for f16, 32 for f32:
// at most 136 bytes a row) in workgroup memory as raw words, consecutive invocations loading
// consecutive words of a row, then each invocation decodes its own row from there.
// Dispatch grid(batch * n / 64).
const SLOT: u32 = 36u;
var<workgroup> staged: array<u32, 2304>;

// Elements per chunk.
fn chunk_len() -> u32 {
    switch DT {
        case 0u: {
            return 32u;
        }
        case 1u: {
            return 64u;
        }
        default: {
            return 128u;
        }
    }
}

// The byte of `w` where chunk `ch` of the weight row starting at element `e` starts.
fn chunk_byte(e: u32, ch: u32) -> u32 {
    let s = e + ch * chunk_len();
    switch DT {
        case 0u: {
            return s * 4u;
        }
        case 1u: {
            return s * 2u;
        }
        case 3u: {
            return (s >> 5u) * 34u;
        }
        case 4u: {
            return (s >> 5u) * 18u;
        }
        default: {
            return (s >> 5u) * 20u;
        }
    }
}

// Byte `o` of staged slot `slot`.
fn st_byte(slot: u32, o: u32) -> u32 {
    return (staged[slot + (o >> 2u)] >> ((o & 3u) * 8u)) & 0xffu;
}

fn st_half(slot: u32, o: u32) -> f32 {
    return half_value(st_byte(slot, o) | (st_byte(slot, o + 1u) << 8u));
}

// Element `q` of a chunk staged in `slot` from byte `b0` on.
fn st_elem(slot: u32, b0: u32, q: u32) -> f32 {
    switch DT {
        case 0u: {
            let o = b0 + q * 4u;
            return bitcast<f32>(st_byte(slot, o) | (st_byte(slot, o + 1u) << 8u) | (st_byte(slot, o + 2u) << 16u) | (st_byte(slot, o + 3u) << 24u));
        }
        case 1u: {
            return st_half(slot, b0 + q * 2u);
        }
        case 3u: {
            let base = b0 + (q >> 5u) * 34u;
            let v = bitcast<i32>(st_byte(slot, base + 2u + (q & 31u)) << 24u) >> 24u;
            return st_half(slot, base) * f32(v);
        }
        case 4u: {
            let j = q & 31u;
            let base = b0 + (q >> 5u) * 18u;
            let byte = st_byte(slot, base + 2u + (j & 15u));
            let nib = select(byte & 15u, byte >> 4u, j >= 16u);
            return st_half(slot, base) * f32(i32(nib) - 8);
        }
        default: {
            let j = q & 31u;
            let base = b0 + (q >> 5u) * 20u;
            let byte = st_byte(slot, base + 4u + (j & 15u));
            let nib = select(byte & 15u, byte >> 4u, j >= 16u);
            let prod = st_half(slot, base) * f32(nib);
            return prod + st_half(slot, base + 2u);
        }
    }
}

@compute @workgroup_size(64)
fn mv_staged(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let l = lid.x;
    let n = p.n;
    let k = p.k;
    let total = p.batch * n;
    let first = flat_group(wg, nwg) * 64u;
    let o = first + l;
    let oc = min(o, total - 1u);
    let xa = (oc / n) * p.stride_a;
    let e = (oc / n) * p.stride_b + (oc % n) * k;
    let cl = chunk_len();
    let chunks = (k + cl - 1u) / cl;
    var acc = 0.0;
    for (var ch = 0u; ch < chunks; ch++) {
        for (var it = 0u; it < SLOT; it++) {
            let li = it * 64u + l;
            let r = min(first + li / SLOT, total - 1u);
            let er = (r / n) * p.stride_b + (r % n) * k;
            staged[li] = w_word((chunk_byte(er, ch) >> 2u) + li % SLOT);
        }
        workgroupBarrier();
        let slot = l * SLOT;
        let b0 = chunk_byte(e, ch) & 3u;
        let q0 = ch * cl;
        let qn = min(cl, k - q0);
        for (var q = 0u; q < qn; q++) {
            acc = acc + a_at(xa + q0 + q) * st_elem(slot, b0, q);
        }
        workgroupBarrier();
    }
    if o < total {
        c[o] = acc;
    }
}

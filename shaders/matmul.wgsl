// Batched matmul with f32 accumulation: c[b] = op(a[b]) @ op(w[b]), op = optional transpose. `a` is
// f32; the right operand `w` is f32, f16 or a GGUF block type (q8_0 / q4_0 / q4_1; those need
// transpose_b, i.e. weights stored [n, k] with blocks along k), read as u32 words and decoded per
// element exactly as `gpu::quant` defines dequantization (d * q as one multiply, + m as a separate
// add). A stride of 0 broadcasts a 2-D operand over the batch. Every kernel except `matvec_split`
// sums k in index order with a separate multiply and add (`acc = acc + x * w`), mirroring
// `matmul_ordered` in src/gpu/cpu.rs and `quant::dot_row_ordered`.

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

@group(0) @binding(0) var<uniform> p: MatmulParams;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> w: array<u32>;
@group(0) @binding(3) var<storage, read_write> c: array<f32>;

// ---- decoding `w` (the same functions as in convert.wgsl) ----

// The f32 value of f16 bits (exact, as `quant::f16_value`).
fn half_value(h: u32) -> f32 {
    let sign = (h & 0x8000u) << 16u;
    let e = (h >> 10u) & 0x1fu;
    let man = h & 0x3ffu;
    if e == 0u {
        // man * 2^-24 is exact and normal in f32.
        return bitcast<f32>(sign | bitcast<u32>(f32(man) * bitcast<f32>(0x33800000u)));
    }
    if e == 0x1fu {
        return bitcast<f32>(sign | 0x7f800000u | (man << 13u));
    }
    return bitcast<f32>(sign | ((e + 112u) << 23u) | (man << 13u));
}

// Byte `o` of the storage of `w`.
fn w_byte(o: u32) -> u32 {
    return (w[o >> 2u] >> ((o & 3u) * 8u)) & 0xffu;
}

// The f16 at even byte offset `o` of `w` (never straddles a word).
fn w_half_at_byte(o: u32) -> f32 {
    return half_value((w[o >> 2u] >> ((o & 2u) * 8u)) & 0xffffu);
}

// Element `idx` (row-major element index) of `w` as f32.
fn w_elem(idx: u32) -> f32 {
    switch p.b_dtype {
        case 1u: {
            return half_value((w[idx >> 1u] >> ((idx & 1u) * 16u)) & 0xffffu);
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
            return bitcast<f32>(w[idx]);
        }
    }
}

// Element (i, q) of op(a) for the batch starting at `off`.
fn load_a(off: u32, i: u32, q: u32) -> f32 {
    if p.trans_a != 0u {
        return a[off + q * p.m + i];
    }
    return a[off + i * p.k + q];
}

// Element (q, j) of op(w) for the batch starting at `off`.
fn load_b(off: u32, q: u32, j: u32) -> f32 {
    if p.trans_b != 0u {
        return w_elem(off + j * p.k + q);
    }
    return w_elem(off + q * p.n + j);
}

// Reproducible: one invocation per output. Dispatch (ceil(n/8), ceil(m/8), batch).
@compute @workgroup_size(8, 8, 1)
fn matmul_naive(@builtin(global_invocation_id) gid: vec3<u32>) {
    let j = gid.x;
    let i = gid.y;
    let bi = gid.z;
    if i >= p.m || j >= p.n || bi >= p.batch {
        return;
    }
    let offa = bi * p.stride_a;
    let offb = bi * p.stride_b;
    var acc = 0.0;
    for (var q = 0u; q < p.k; q++) {
        acc = acc + load_a(offa, i, q) * load_b(offb, q, j);
    }
    c[bi * p.m * p.n + i * p.n + j] = acc;
}

// Fast: a 64x64 output tile per workgroup of 16x16 invocations, each computing a 4x4 register block
// from 8-deep slices of a and w (decoded to f32) staged in workgroup memory (4 KiB). Dispatch
// (ceil(n/64), ceil(m/64), batch).
const TILE: u32 = 64u;
const BK: u32 = 8u;
var<workgroup> a_tile: array<f32, 512>; // [BK][TILE]: a_tile[kk * TILE + row]
var<workgroup> b_tile: array<f32, 512>; // [BK][TILE]: b_tile[kk * TILE + col]

@compute @workgroup_size(16, 16, 1)
fn matmul_tiled(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let bi = wg.z;
    let row0 = wg.y * TILE;
    let col0 = wg.x * TILE;
    let tid = lid.y * 16u + lid.x;
    let offa = bi * p.stride_a;
    let offb = bi * p.stride_b;
    var acc: array<f32, 16>;
    for (var k0 = 0u; k0 < p.k; k0 += BK) {
        for (var l = 0u; l < 2u; l++) {
            let e = tid + l * 256u;
            let kk = e % BK;
            let r = e / BK;
            var va = 0.0;
            if row0 + r < p.m && k0 + kk < p.k {
                va = load_a(offa, row0 + r, k0 + kk);
            }
            a_tile[kk * TILE + r] = va;
            // Consecutive invocations read consecutive k of one weight row when w is transposed
            // (the quantized layout), consecutive columns otherwise.
            var cc = e % TILE;
            var kb = e / TILE;
            if p.trans_b != 0u {
                cc = e / BK;
                kb = e % BK;
            }
            var vb = 0.0;
            if col0 + cc < p.n && k0 + kb < p.k {
                vb = load_b(offb, k0 + kb, col0 + cc);
            }
            b_tile[kb * TILE + cc] = vb;
        }
        workgroupBarrier();
        // Stop at the real k (not the zero padding) so every output sums exactly k terms in order.
        let kmax = min(BK, p.k - k0);
        for (var kk = 0u; kk < kmax; kk++) {
            var ar: array<f32, 4>;
            var br: array<f32, 4>;
            for (var x = 0u; x < 4u; x++) {
                ar[x] = a_tile[kk * TILE + lid.y * 4u + x];
                br[x] = b_tile[kk * TILE + lid.x * 4u + x];
            }
            for (var x = 0u; x < 4u; x++) {
                for (var y = 0u; y < 4u; y++) {
                    acc[x * 4u + y] = acc[x * 4u + y] + ar[x] * br[y];
                }
            }
        }
        workgroupBarrier();
    }
    for (var x = 0u; x < 4u; x++) {
        for (var y = 0u; y < 4u; y++) {
            let i = row0 + lid.y * 4u + x;
            let j = col0 + lid.x * 4u + y;
            if i < p.m && j < p.n {
                c[bi * p.m * p.n + i * p.n + j] = acc[x * 4u + y];
            }
        }
    }
}

// Matrix-vector products (m = 1, the decode step). The 64-invocation workgroups run on a 2-D grid
// of workgroups; `flat_group` is the workgroup's index in it.
fn flat_group(wg: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return wg.y * nwg.x + wg.x;
}

// Reproducible: one invocation per output (batch * n of them), k in order. The row of `a` is
// contiguous whatever trans_a says, since m = 1.
@compute @workgroup_size(64)
fn matvec_ordered(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let t = flat_group(wg, nwg) * 64u + lid.x;
    if t >= p.batch * p.n {
        return;
    }
    let bi = t / p.n;
    let j = t % p.n;
    let offa = bi * p.stride_a;
    let offb = bi * p.stride_b;
    var acc = 0.0;
    for (var q = 0u; q < p.k; q++) {
        acc = acc + a[offa + q] * load_b(offb, q, j);
    }
    c[t] = acc;
}

// Fast: one workgroup per output; invocation l sums k = l, l + 64, ... and the 64 partial sums are
// added by a tree in workgroup memory (a fixed order, but not the index order of the CPU).
var<workgroup> partial: array<f32, 64>;

@compute @workgroup_size(64)
fn matvec_split(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let t = flat_group(wg, nwg);
    // Uniform across the workgroup, so the barriers below stay in uniform control flow.
    let live = t < p.batch * p.n;
    let tt = select(0u, t, live);
    let bi = tt / max(p.n, 1u);
    let j = tt % max(p.n, 1u);
    let offa = bi * p.stride_a;
    let offb = bi * p.stride_b;
    var acc = 0.0;
    if live {
        for (var q = lid.x; q < p.k; q += 64u) {
            acc = acc + a[offa + q] * load_b(offb, q, j);
        }
    }
    partial[lid.x] = acc;
    workgroupBarrier();
    for (var s = 32u; s > 0u; s >>= 1u) {
        if lid.x < s {
            partial[lid.x] = partial[lid.x] + partial[lid.x + s];
        }
        workgroupBarrier();
    }
    if live && lid.x == 0u {
        c[t] = partial[0];
    }
}

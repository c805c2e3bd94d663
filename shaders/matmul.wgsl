// Batched f32 matmul: c[b] = op(a[b]) @ op(b[b]), op = optional transpose, f32 accumulation.
// A stride of 0 broadcasts a 2-D operand over the batch. Both kernels sum k in index order with a
// separate multiply and add (`acc = acc + x * y`), mirroring `matmul_ordered` in src/gpu/cpu.rs.

struct MatmulParams {
    batch: u32,
    m: u32,
    n: u32,
    k: u32,
    stride_a: u32,
    stride_b: u32,
    trans_a: u32,
    trans_b: u32,
}

@group(0) @binding(0) var<uniform> p: MatmulParams;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read_write> c: array<f32>;

// Element (i, q) of op(a) for the batch starting at `off`.
fn load_a(off: u32, i: u32, q: u32) -> f32 {
    if p.trans_a != 0u {
        return a[off + q * p.m + i];
    }
    return a[off + i * p.k + q];
}

// Element (q, j) of op(b) for the batch starting at `off`.
fn load_b(off: u32, q: u32, j: u32) -> f32 {
    if p.trans_b != 0u {
        return b[off + j * p.k + q];
    }
    return b[off + q * p.n + j];
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
// from 8-deep slices of a and b staged in workgroup memory (4 KiB). Dispatch (ceil(n/64), ceil(m/64), batch).
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
            let cc = e % TILE;
            let kb = e / TILE;
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

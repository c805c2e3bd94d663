// Matrix-vector products for GPUs (m = 1, transpose_b): `mv_split` (fast mode) and `mv_staged`
// (reproducible), over matmul_common.wgsl.

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

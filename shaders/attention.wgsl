// Causal scaled-dot-product attention in three passes over a scratch score tensor
// s [batch, tq, hq, tk] (row r = (b * tq + i) * hq + h), mirroring `attention` in src/gpu/cpu/kernels.rs
// operation for operation:
//   1. attn_scores: s[r, j] = (sum over c in order of q[.., c] * k[.., c]) * scale, for the keys
//      j < len(i) = min(tk, pos0 + i + 1) the query may see;
//   2. attn_softmax_repro / attn_softmax_fast: each row's first len(i) scores become
//      softmax probabilities exactly as `softmax_row` (max, exp(s - max) summed in order, divide);
//   3. attn_values: out[.., c] = sum over j < len(i) in order of p[r, j] * v[.., c].
// q is [batch, tq, hq, dim], k and v [batch, tk, hkv, dim]; query head h reads key/value head
// h / (hq / hkv). Every sum is sequential with a separate multiply and add.

struct AttnParams {
    batch: u32,
    tq: u32,
    tk: u32,
    hq: u32,
    hkv: u32,
    dim: u32,
    pos0: u32,
    scale: f32,
}

@group(0) @binding(0) var<uniform> p: AttnParams;
@group(0) @binding(1) var<storage, read> q: array<f32>;
@group(0) @binding(1) var<storage, read> probs: array<f32>;
@group(0) @binding(2) var<storage, read> kv: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

fn flat(wg: vec3<u32>, nwg: vec3<u32>, lid: vec3<u32>) -> u32 {
    return (wg.y * nwg.x + wg.x) * 64u + lid.x;
}

// The number of keys query row `r` sees.
fn keys_of(r: u32) -> u32 {
    let i = (r / p.hq) % p.tq;
    return min(p.tk, p.pos0 + i + 1u);
}

// The start of key/value row j for query row r.
fn kv_base(r: u32, j: u32) -> u32 {
    let h = r % p.hq;
    let b = r / (p.hq * p.tq);
    let g = h / (p.hq / p.hkv);
    return ((b * p.tk + j) * p.hkv + g) * p.dim;
}

// One invocation per (row, key).
@compute @workgroup_size(64)
fn attn_scores(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let e = flat(wg, nwg, lid);
    if e >= p.batch * p.tq * p.hq * p.tk {
        return;
    }
    let r = e / p.tk;
    let j = e % p.tk;
    if j >= keys_of(r) {
        out[e] = 0.0;
        return;
    }
    let qb = r * p.dim;
    let kb = kv_base(r, j);
    var acc = 0.0;
    for (var c = 0u; c < p.dim; c++) {
        acc = acc + q[qb + c] * kv[kb + c];
    }
    out[e] = acc * p.scale;
}

fn softmax_row(r: u32, portable: bool) {
    let len = keys_of(r);
    let base = r * p.tk;
    var m = bitcast<f32>(0xff800000u); // -inf
    for (var j = 0u; j < len; j++) {
        let v = out[base + j];
        if v > m {
            m = v;
        }
    }
    var sum = 0.0;
    for (var j = 0u; j < len; j++) {
        var e: f32;
        if portable {
            e = repro_exp(out[base + j] - m);
        } else {
            e = exp(out[base + j] - m);
        }
        out[base + j] = e;
        sum = sum + e;
    }
    for (var j = 0u; j < len; j++) {
        out[base + j] = out[base + j] / sum;
    }
}

// One invocation per row, in place on the scores.
@compute @workgroup_size(64)
fn attn_softmax_repro(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let r = flat(wg, nwg, lid);
    if r < p.batch * p.tq * p.hq {
        softmax_row(r, true);
    }
}

@compute @workgroup_size(64)
fn attn_softmax_fast(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let r = flat(wg, nwg, lid);
    if r < p.batch * p.tq * p.hq {
        softmax_row(r, false);
    }
}

// One invocation per output element (row, c).
@compute @workgroup_size(64)
fn attn_values(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let e = flat(wg, nwg, lid);
    if e >= p.batch * p.tq * p.hq * p.dim {
        return;
    }
    let r = e / p.dim;
    let c = e % p.dim;
    let len = keys_of(r);
    var acc = 0.0;
    for (var j = 0u; j < len; j++) {
        acc = acc + probs[r * p.tk + j] * kv[kv_base(r, j) + c];
    }
    out[e] = acc;
}

// Rotary position embedding of f32 x [batch, seq, heads, dim]. The (cos, sin) table [seq, dim/2, 2]
// comes from the host (`layout::rope_table`, rounded once to f32 there), so this kernel only
// multiplies and adds: out0 = x0 * cos - x1 * sin, out1 = x0 * sin + x1 * cos, each product rounded
// before the add, mirroring `rope` in src/gpu/cpu/kernels.rs. One invocation per rotated pair.

struct RopeParams {
    // batch * seq * heads * dim / 2
    pairs: u32,
    seq: u32,
    heads: u32,
    dim: u32,
    // 0: pairs (2i, 2i + 1) (GGML normal); 2: pairs (i, i + dim/2) (NeoX).
    mode: u32,
}

@group(0) @binding(0) var<uniform> p: RopeParams;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> table: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(256)
fn rope(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let pi = (wg.y * nwg.x + wg.x) * 256u + lid.x;
    if pi >= p.pairs {
        return;
    }
    let half = p.dim / 2u;
    let i = pi % half;
    // The row (b, t, h) of this pair, and its position t.
    let row = pi / half;
    let t = (row / p.heads) % p.seq;
    let base = row * p.dim;
    var i0 = base + 2u * i;
    var i1 = i0 + 1u;
    if p.mode == 2u {
        i0 = base + i;
        i1 = base + i + half;
    }
    let cs = table[(t * half + i) * 2u];
    let sn = table[(t * half + i) * 2u + 1u];
    let x0 = x[i0];
    let x1 = x[i1];
    out[i0] = x0 * cs - x1 * sn;
    out[i1] = x0 * sn + x1 * cs;
}

// RMSNorm and LayerNorm over the last axis, one invocation per row, sums in index order: the same
// operations in the same order as `rmsnorm_row` / `layernorm_row` in src/gpu/cpu/kernels.rs.

struct NormParams {
    rows: u32,
    last: u32,
    eps: f32,
}

@group(0) @binding(0) var<uniform> p: NormParams;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> w: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;
@group(0) @binding(4) var<storage, read> bias: array<f32>;

fn row_index(wg: vec3<u32>, nwg: vec3<u32>, lid: vec3<u32>) -> u32 {
    return (wg.y * nwg.x + wg.x) * 64u + lid.x;
}

// x / sqrt(mean(x^2) + eps) * w
@compute @workgroup_size(64)
fn rmsnorm(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let r = row_index(wg, nwg, lid);
    if r >= p.rows {
        return;
    }
    let base = r * p.last;
    var ss = 0.0;
    for (var j = 0u; j < p.last; j++) {
        let v = x[base + j];
        ss = ss + v * v;
    }
    let inv = 1.0 / sqrt(ss / f32(p.last) + p.eps);
    for (var j = 0u; j < p.last; j++) {
        out[base + j] = x[base + j] * inv * w[j];
    }
}

// (x - mean) / sqrt(var + eps) * w + bias, biased variance.
@compute @workgroup_size(64)
fn layernorm(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let r = row_index(wg, nwg, lid);
    if r >= p.rows {
        return;
    }
    let base = r * p.last;
    let n = f32(p.last);
    var s = 0.0;
    for (var j = 0u; j < p.last; j++) {
        s = s + x[base + j];
    }
    let mean = s / n;
    var var_acc = 0.0;
    for (var j = 0u; j < p.last; j++) {
        let d = x[base + j] - mean;
        var_acc = var_acc + d * d;
    }
    let inv = 1.0 / sqrt(var_acc / n + p.eps);
    for (var j = 0u; j < p.last; j++) {
        out[base + j] = (x[base + j] - mean) * inv * w[j] + bias[j];
    }
}

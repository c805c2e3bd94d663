// Reductions over the last axis, one invocation per row summing in index order (the fixed order of
// `reduce_row` / `softmax_row` in src/gpu/cpu/kernels.rs), 64 rows per workgroup on a 2-D workgroup grid.
// NaN never compares greater: max skips it, argmax returns the first index of the maximum (as i32).

struct RowParams {
    rows: u32,
    last: u32,
}

@group(0) @binding(0) var<uniform> p: RowParams;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;
// argmax_last writes i32 indices (the output tensor is i32).
@group(0) @binding(3) var<storage, read_write> out_i: array<i32>;

fn row_index(wg: vec3<u32>, nwg: vec3<u32>, lid: vec3<u32>) -> u32 {
    return (wg.y * nwg.x + wg.x) * 64u + lid.x;
}

fn row_sum(r: u32) -> f32 {
    var acc = 0.0;
    for (var j = 0u; j < p.last; j++) {
        acc = acc + x[r * p.last + j];
    }
    return acc;
}

fn row_max(r: u32) -> f32 {
    var acc = bitcast<f32>(0xff800000u); // -inf
    for (var j = 0u; j < p.last; j++) {
        let v = x[r * p.last + j];
        if v > acc {
            acc = v;
        }
    }
    return acc;
}

@compute @workgroup_size(64)
fn sum_last(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let r = row_index(wg, nwg, lid);
    if r < p.rows {
        out[r] = row_sum(r);
    }
}

@compute @workgroup_size(64)
fn mean_last(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let r = row_index(wg, nwg, lid);
    if r < p.rows {
        out[r] = row_sum(r) / f32(p.last);
    }
}

@compute @workgroup_size(64)
fn max_last(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let r = row_index(wg, nwg, lid);
    if r < p.rows {
        out[r] = row_max(r);
    }
}

// The caller rejects an empty last axis.
@compute @workgroup_size(64)
fn argmax_last(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let r = row_index(wg, nwg, lid);
    if r < p.rows {
        var best = x[r * p.last];
        var idx = 0u;
        for (var j = 1u; j < p.last; j++) {
            let v = x[r * p.last + j];
            if v > best || (is_nan(best) && !is_nan(v)) {
                best = v;
                idx = j;
            }
        }
        out_i[r] = i32(idx);
    }
}

fn softmax_row(r: u32, portable: bool) {
    let m = row_max(r);
    var sum = 0.0;
    for (var j = 0u; j < p.last; j++) {
        let i = r * p.last + j;
        var e: f32;
        if portable {
            e = repro_exp(x[i] - m);
        } else {
            e = exp(x[i] - m);
        }
        out[i] = e;
        sum = sum + e;
    }
    for (var j = 0u; j < p.last; j++) {
        let i = r * p.last + j;
        out[i] = out[i] / sum;
    }
}

@compute @workgroup_size(64)
fn softmax_repro(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let r = row_index(wg, nwg, lid);
    if r < p.rows {
        softmax_row(r, true);
    }
}

@compute @workgroup_size(64)
fn softmax_fast(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let r = row_index(wg, nwg, lid);
    if r < p.rows {
        softmax_row(r, false);
    }
}

// Elementwise f32 kernels. Binary ops broadcast numpy-style through per-operand strides over a 4-D
// index space (0 on broadcast axes). One invocation per output element, 256 per workgroup, on a 2-D
// grid of workgroups (x up to 65535) so large tensors fit the dispatch limits.

struct BinaryParams {
    n: u32,
    d1: u32,
    d2: u32,
    d3: u32,
    as0: u32,
    as1: u32,
    as2: u32,
    as3: u32,
    bs0: u32,
    bs1: u32,
    bs2: u32,
    bs3: u32,
}

struct UnaryParams {
    n: u32,
    factor: f32,
}

@group(0) @binding(0) var<uniform> bp: BinaryParams;
@group(0) @binding(0) var<uniform> up: UnaryParams;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

fn flat(wg: vec3<u32>, nwg: vec3<u32>, lid: vec3<u32>) -> u32 {
    return (wg.y * nwg.x + wg.x) * 256u + lid.x;
}

// The elements of a and b that output i reads.
fn operands(i: u32) -> vec2<f32> {
    let i3 = i % bp.d3;
    var t = i / bp.d3;
    let i2 = t % bp.d2;
    t = t / bp.d2;
    let i1 = t % bp.d1;
    let i0 = t / bp.d1;
    let ia = i0 * bp.as0 + i1 * bp.as1 + i2 * bp.as2 + i3 * bp.as3;
    let ib = i0 * bp.bs0 + i1 * bp.bs1 + i2 * bp.bs2 + i3 * bp.bs3;
    return vec2<f32>(a[ia], b[ib]);
}

@compute @workgroup_size(256)
fn add(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = flat(wg, nwg, lid);
    if i < bp.n {
        let v = operands(i);
        out[i] = v.x + v.y;
    }
}

@compute @workgroup_size(256)
fn sub(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = flat(wg, nwg, lid);
    if i < bp.n {
        let v = operands(i);
        out[i] = v.x - v.y;
    }
}

@compute @workgroup_size(256)
fn mul(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = flat(wg, nwg, lid);
    if i < bp.n {
        let v = operands(i);
        out[i] = v.x * v.y;
    }
}

@compute @workgroup_size(256)
fn div(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = flat(wg, nwg, lid);
    if i < bp.n {
        let v = operands(i);
        out[i] = v.x / v.y;
    }
}

@compute @workgroup_size(256)
fn scale(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = flat(wg, nwg, lid);
    if i < up.n {
        out[i] = a[i] * up.factor;
    }
}

// NaN and -0.0 map to 0.0, as in the CPU reference.
@compute @workgroup_size(256)
fn relu(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = flat(wg, nwg, lid);
    if i < up.n {
        let x = a[i];
        out[i] = select(0.0, x, x > 0.0);
    }
}

// The tanh approximation: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).
@compute @workgroup_size(256)
fn gelu(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = flat(wg, nwg, lid);
    if i < up.n {
        let x = a[i];
        out[i] = 0.5 * x * (1.0 + tanh(0.7978846 * (x + 0.044715 * x * x * x)));
    }
}

@compute @workgroup_size(256)
fn silu(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = flat(wg, nwg, lid);
    if i < up.n {
        let x = a[i];
        out[i] = x / (1.0 + exp(-x));
    }
}

@compute @workgroup_size(256)
fn tanh_op(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = flat(wg, nwg, lid);
    if i < up.n {
        out[i] = tanh(a[i]);
    }
}

@compute @workgroup_size(256)
fn exp_op(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = flat(wg, nwg, lid);
    if i < up.n {
        out[i] = exp(a[i]);
    }
}

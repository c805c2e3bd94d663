// Layout ops through one strided copy: permute, slice, concat and append (and the copy of a buffer
// region the host cannot do with copy_buffer_to_buffer because it is not 4-byte aligned). Pure data
// movement: the bits are copied unchanged.
//
// The destination is a row-major 4-D tensor of shape [d0, d1, d2, d3] (n elements in all) that
// starts at element `dst_off` of the output buffer. Destination element r with coordinates c is
// written iff `win_start <= c[win_axis] < win_start + win_len`; it takes source element
// `src_off + sum_i (c_i - [i == win_axis] * win_start) * s_i`. Elements outside the window keep their
// value (concat runs one copy per operand into the same output).
//
// `copy32` moves 4-byte elements (f32, i32), one invocation per destination element. `copy16` moves
// f16 elements, two per u32 word; each invocation owns one output word (word w0 + i), so no two
// invocations write the same word, and the half that is outside the destination region or the
// window keeps its bits.

struct CopyParams {
    n: u32,
    dst_off: u32,
    // copy16: the first output word and the number of words.
    w0: u32,
    nw: u32,
    d1: u32,
    d2: u32,
    d3: u32,
    win_axis: u32,
    win_start: u32,
    win_len: u32,
    src_off: u32,
    s0: u32,
    s1: u32,
    s2: u32,
    s3: u32,
}

@group(0) @binding(0) var<uniform> p: CopyParams;
@group(0) @binding(1) var<storage, read> src: array<u32>;
@group(0) @binding(3) var<storage, read_write> out: array<u32>;

fn flat(wg: vec3<u32>, nwg: vec3<u32>, lid: vec3<u32>) -> u32 {
    return (wg.y * nwg.x + wg.x) * 256u + lid.x;
}

// The source element index of destination element r (< n), or 0xffffffff outside the window.
fn source_of(r: u32) -> u32 {
    var c: array<u32, 4>;
    c[3] = r % p.d3;
    var t = r / p.d3;
    c[2] = t % p.d2;
    t = t / p.d2;
    c[1] = t % p.d1;
    c[0] = t / p.d1;
    let cw = c[p.win_axis];
    if cw < p.win_start || cw >= p.win_start + p.win_len {
        return 0xffffffffu;
    }
    c[p.win_axis] = cw - p.win_start;
    return p.src_off + c[0] * p.s0 + c[1] * p.s1 + c[2] * p.s2 + c[3] * p.s3;
}

@compute @workgroup_size(256)
fn copy32(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let r = flat(wg, nwg, lid);
    if r >= p.n {
        return;
    }
    let s = source_of(r);
    if s != 0xffffffffu {
        out[p.dst_off + r] = src[s];
    }
}

@compute @workgroup_size(256)
fn copy16(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = flat(wg, nwg, lid);
    if i >= p.nw {
        return;
    }
    let wi = p.w0 + i;
    var word = out[wi];
    for (var h = 0u; h < 2u; h++) {
        let e = wi * 2u + h;
        if e < p.dst_off || e - p.dst_off >= p.n {
            continue;
        }
        let s = source_of(e - p.dst_off);
        if s == 0xffffffffu {
            continue;
        }
        let v = (src[s >> 1u] >> ((s & 1u) * 16u)) & 0xffffu;
        let shift = h * 16u;
        word = (word & ~(0xffffu << shift)) | (v << shift);
    }
    out[wi] = word;
}

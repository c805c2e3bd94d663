// Dtype conversions and the embedding gather. Tensors are u32 words: f32 and i32 one per word, f16
// two per word (element 2i in the low half), the GGUF block types as their raw block bytes (34, 18
// or 20 per block, so blocks straddle words; bytes are extracted with shifts). Every conversion is
// built from integer operations and exact or single correctly rounded f32 operations, so it matches
// `gpu::quant` bit for bit: f32 -> f16 rounds to nearest even (`quant::f16_bits`, NaN stays a quiet
// NaN with the top payload bits), f16 -> f32 is exact (`quant::f16_value`), f32 -> i32 truncates and
// saturates with NaN -> 0 (Rust's `as`), i32 -> f32 rounds to nearest even, and dequantization is
// `d * q` (+ `m` as a separate add; quant.wgsl). One invocation per output word, 256 per workgroup,
// on a 2-D grid.

struct ConvertParams {
    // Output elements (for `cast_f32_f16`, output words are ceil(n / 2)).
    n: u32,
    // The dtype code of `src` for `dequantize` and `gather_rows`: 0 f32, 1 f16, 3 q8_0, 4 q4_0, 5 q4_1.
    dtype: u32,
    // gather_rows: table rows and row length.
    rows: u32,
    dim: u32,
}

@group(0) @binding(0) var<uniform> p: ConvertParams;
@group(0) @binding(1) var<storage, read> src: array<u32>;
@group(0) @binding(2) var<storage, read> ids: array<i32>;
@group(0) @binding(3) var<storage, read_write> out: array<u32>;

fn flat(wg: vec3<u32>, nwg: vec3<u32>, lid: vec3<u32>) -> u32 {
    return (wg.y * nwg.x + wg.x) * 256u + lid.x;
}

// The f16 bits nearest to the f32 with bits `x` (ties to even), as `quant::f16_bits`.
fn half_bits(x: u32) -> u32 {
    let sign = (x >> 16u) & 0x8000u;
    let ex = i32((x >> 23u) & 0xffu);
    let man = x & 0x7fffffu;
    if ex == 0xff {
        if man == 0u {
            return sign | 0x7c00u;
        }
        return sign | 0x7e00u | (man >> 13u);
    }
    let e = ex - 127 + 15;
    if e >= 0x1f {
        return sign | 0x7c00u;
    }
    if e <= 0 {
        let shift = u32(14 - e);
        if shift > 24u {
            return sign;
        }
        let m = man | 0x800000u;
        let q = m >> shift;
        let rem = m & ((1u << shift) - 1u);
        let half = 1u << (shift - 1u);
        let up = rem > half || (rem == half && (q & 1u) == 1u);
        return sign | (q + select(0u, 1u, up));
    }
    let h = (u32(e) << 10u) | (man >> 13u);
    let rem = man & 0x1fffu;
    let up = rem > 0x1000u || (rem == 0x1000u && (h & 1u) == 1u);
    return sign | (h + select(0u, 1u, up));
}

// Word `i` of `src`, for quant.wgsl's `q_elem`.
fn q_word(i: u32) -> u32 {
    return src[i];
}

// Element `idx` of `src` (of dtype `p.dtype`) as f32, by the definition in `gpu::quant`.
fn src_elem(idx: u32) -> f32 {
    return q_elem(p.dtype, idx);
}

// f32 -> f16: output word w packs elements 2w and 2w + 1 (a missing last element packs as 0).
@compute @workgroup_size(256)
fn cast_f32_f16(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let wi = flat(wg, nwg, lid);
    let e = wi * 2u;
    if e >= p.n {
        return;
    }
    var word = half_bits(src[e]);
    if e + 1u < p.n {
        word = word | (half_bits(src[e + 1u]) << 16u);
    }
    out[wi] = word;
}

// Any dtype but i32 -> f32 (f16 exact, the block types dequantized), written as bits so NaN
// payloads survive.
@compute @workgroup_size(256)
fn dequantize(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = flat(wg, nwg, lid);
    if i < p.n {
        if p.dtype == 1u {
            let h = (src[i >> 1u] >> ((i & 1u) * 16u)) & 0xffffu;
            // NaN keeps its payload (shifted), as `quant::f16_value`.
            if (h & 0x7c00u) == 0x7c00u {
                out[i] = ((h & 0x8000u) << 16u) | 0x7f800000u | ((h & 0x3ffu) << 13u);
                return;
            }
        }
        out[i] = bitcast<u32>(src_elem(i));
    }
}

// f32 -> i32: toward zero, saturating, NaN -> 0.
@compute @workgroup_size(256)
fn cast_f32_i32(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = flat(wg, nwg, lid);
    if i < p.n {
        let v = bitcast<f32>(src[i]);
        var r = 0;
        if is_nan(v) {
            r = 0;
        } else if v >= 2147483648.0 {
            r = 2147483647;
        } else if v < -2147483648.0 {
            r = -2147483647 - 1;
        } else {
            r = i32(v);
        }
        out[i] = bitcast<u32>(r);
    }
}

// i32 -> f32, round to nearest even: hi * 65536 is exact and the one add rounds correctly.
@compute @workgroup_size(256)
fn cast_i32_f32(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = flat(wg, nwg, lid);
    if i < p.n {
        let v = bitcast<i32>(src[i]);
        let hi = f32(v >> 16u) * 65536.0;
        out[i] = bitcast<u32>(hi + f32(v & 0xffff));
    }
}

// Embedding lookup: output element e = (r, c) is element (ids[r], c) of the table [rows, dim] of
// dtype `p.dtype`, as f32. The host validates ids; one outside the table gives 0 here.
@compute @workgroup_size(256)
fn gather_rows(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let e = flat(wg, nwg, lid);
    if e >= p.n {
        return;
    }
    let r = e / p.dim;
    let col = e % p.dim;
    let id = ids[r];
    if id < 0 || u32(id) >= p.rows {
        out[e] = 0u;
        return;
    }
    let idx = u32(id) * p.dim + col;
    if p.dtype == 0u {
        out[e] = src[idx];
    } else if p.dtype == 1u {
        let h = (src[idx >> 1u] >> ((idx & 1u) * 16u)) & 0xffffu;
        if (h & 0x7c00u) == 0x7c00u {
            out[e] = ((h & 0x8000u) << 16u) | 0x7f800000u | ((h & 0x3ffu) << 13u);
        } else {
            out[e] = bitcast<u32>(half_value(h));
        }
    } else {
        out[e] = bitcast<u32>(src_elem(idx));
    }
}

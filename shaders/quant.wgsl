// Dequantization as `gpu::quant` defines it (d * q as one multiply, + m as a separate add; f16 exact,
// as `quant::f16_value`), written once for every shader that reads f16 or GGUF block storage. WGSL
// has no #include: the registry (src/gpu/kernels.rs) puts this header in front of each file that
// names it in its `headers`. Only functions, no bindings or entry points.
//
// The including file defines the accessor `q_word(i: u32) -> u32`: word i of the tensor decoded
// (f16 two per word, element 2i in the low half; the block types as their raw block bytes, 34, 18
// or 20 per block, so blocks straddle words and bytes are extracted with shifts).

// The f32 value of f16 bits (exact, as `quant::f16_value`), four at a time and without branches.
fn half4(h: vec4<u32>) -> vec4<f32> {
    let sign = (h & vec4(0x8000u)) << vec4(16u);
    let e = (h >> vec4(10u)) & vec4(0x1fu);
    let man = h & vec4(0x3ffu);
    let normal = sign | ((e + vec4(112u)) << vec4(23u)) | (man << vec4(13u));
    let special = sign | vec4(0x7f800000u) | (man << vec4(13u));
    // man * 2^-24 is exact and normal in f32.
    let sub = sign | bitcast<vec4<u32>>(vec4<f32>(man) * bitcast<f32>(0x33800000u));
    return bitcast<vec4<f32>>(select(select(normal, special, e == vec4(0x1fu)), sub, e == vec4(0u)));
}

fn half_value(h: u32) -> f32 {
    return half4(vec4(h)).x;
}

// Byte `o` of the tensor.
fn q_byte(o: u32) -> u32 {
    return (q_word(o >> 2u) >> ((o & 3u) * 8u)) & 0xffu;
}

// The f16 at even byte offset `o` of the tensor (never straddles a word).
fn q_half_at_byte(o: u32) -> f32 {
    return half_value((q_word(o >> 2u) >> ((o & 2u) * 8u)) & 0xffffu);
}

// Element `idx` (row-major element index) of a tensor of dtype code `dt` (0 f32, 1 f16, 3 q8_0,
// 4 q4_0, 5 q4_1) as f32, one at a time.
fn q_elem(dt: u32, idx: u32) -> f32 {
    switch dt {
        case 1u: {
            return half_value((q_word(idx >> 1u) >> ((idx & 1u) * 16u)) & 0xffffu);
        }
        case 3u: {
            let base = (idx >> 5u) * 34u;
            let q = bitcast<i32>(q_byte(base + 2u + (idx & 31u)) << 24u) >> 24u;
            return q_half_at_byte(base) * f32(q);
        }
        case 4u: {
            let j = idx & 31u;
            let base = (idx >> 5u) * 18u;
            let byte = q_byte(base + 2u + (j & 15u));
            let nib = select(byte & 15u, byte >> 4u, j >= 16u);
            return q_half_at_byte(base) * f32(i32(nib) - 8);
        }
        case 5u: {
            let j = idx & 31u;
            let base = (idx >> 5u) * 20u;
            let byte = q_byte(base + 4u + (j & 15u));
            let nib = select(byte & 15u, byte >> 4u, j >= 16u);
            let prod = q_half_at_byte(base) * f32(nib);
            return prod + q_half_at_byte(base + 2u);
        }
        default: {
            return bitcast<f32>(q_word(idx));
        }
    }
}

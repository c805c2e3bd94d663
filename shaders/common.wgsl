// Shared WGSL functions. WGSL has no #include: the registry (src/gpu/kernels.rs, `compiled_source`)
// puts this file in front of every shaders/*.wgsl file before it is compiled or validated, so each
// helper here exists once. Only functions, no bindings or entry points.

// NaN by its bits: a float compare like `v != v` may be folded away (Vulkan does not promise NaN
// semantics without float-controls).
fn is_nan(v: f32) -> bool {
    return (bitcast<u32>(v) & 0x7fffffffu) > 0x7f800000u;
}

// Mirrors `repro_exp` in src/gpu/repro.rs operation for operation (constants as bits): the portable
// exp of softmax and attention in reproducible mode.
fn repro_exp(v: f32) -> f32 {
    if is_nan(v) {
        return v;
    }
    if v > 88.72 {
        return bitcast<f32>(0x7f800000u);
    }
    if v < -86.0 {
        return 0.0;
    }
    let n = floor(v * bitcast<f32>(0x3fb8aa3bu) + 0.5);
    let r = (v - n * bitcast<f32>(0x3f317200u)) - n * bitcast<f32>(0x35bfbe8eu);
    var q = bitcast<f32>(0x3ab60b61u);
    q = q * r + bitcast<f32>(0x3c088889u);
    q = q * r + bitcast<f32>(0x3d2aaaabu);
    q = q * r + bitcast<f32>(0x3e2aaaabu);
    q = q * r + 0.5;
    q = q * r + 1.0;
    q = q * r + 1.0;
    let ni = i32(n);
    if ni > 127 {
        return q * bitcast<f32>(254u << 23u) * 2.0;
    }
    return q * bitcast<f32>(u32(ni + 127) << 23u);
}

// The matmul kernel for GPUs, `mm_tiled`, over matmul_common.wgsl (see there for the order of the
// sums).

// ---- mm_tiled: for GPUs ----

// A 64 x 64 tile of c per workgroup of 16 x 16 invocations, each computing a 4 x 4 block from
// 32-deep slices of op(a) and op(w) (decoded to f32) staged in workgroup memory with coalesced
// loads. Dispatch (ceil(n / 64), ceil(m / 64), batch).

// [32 k][16 groups of 4 rows] and [32 k][16 groups of 4 columns].
var<workgroup> a_s: array<vec4<f32>, 512>;
var<workgroup> b_s: array<vec4<f32>, 512>;

// Elements 8 o.. 8 o+7 of quantized block `blk`, from word loads.
fn qoct(blk: u32, o: u32) -> mat2x4<f32> {
    switch DT {
        case 3u: {
            let base = blk * 34u;
            let d = q_half_at_byte(base);
            let s = base + 2u + 8u * o;
            let i = s >> 2u;
            let w0 = w_word(i);
            let w1 = w_word(i + 1u);
            var b0 = w0;
            var b1 = w1;
            if (s & 2u) != 0u {
                let w2 = w_word(i + 2u);
                b0 = (w0 >> 16u) | (w1 << 16u);
                b1 = (w1 >> 16u) | (w2 << 16u);
            }
            return mat2x4<f32>(d * i8x4(b0), d * i8x4(b1));
        }
        case 4u: {
            let base = blk * 18u;
            let d = q_half_at_byte(base);
            let s = base + 2u + 8u * (o & 1u);
            let i = s >> 2u;
            let w0 = w_word(i);
            let w1 = w_word(i + 1u);
            var b0 = w0;
            var b1 = w1;
            if (s & 2u) != 0u {
                let w2 = w_word(i + 2u);
                b0 = (w0 >> 16u) | (w1 << 16u);
                b1 = (w1 >> 16u) | (w2 << 16u);
            }
            let sh = select(0u, 4u, o >= 2u);
            let m8 = vec4(8);
            return mat2x4<f32>(d * vec4<f32>(vec4<i32>(nib4(b0, sh)) - m8), d * vec4<f32>(vec4<i32>(nib4(b1, sh)) - m8));
        }
        default: {
            let i = blk * 5u;
            let dm = w_word(i);
            let d = half_value(dm & 0xffffu);
            let m = vec4(half_value(dm >> 16u));
            let j = i + 1u + 2u * (o & 1u);
            let sh = select(0u, 4u, o >= 2u);
            return mat2x4<f32>(d * vec4<f32>(nib4(w_word(j), sh)) + m, d * vec4<f32>(nib4(w_word(j + 1u), sh)) + m);
        }
    }
}

@compute @workgroup_size(16, 16, 1)
fn mm_tiled(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let m = p.m;
    let n = p.n;
    let k = p.k;
    let bi = wg.z;
    let offa = bi * p.stride_a;
    let offb = bi * p.stride_b;
    let row0 = wg.y * 64u;
    let col0 = wg.x * 64u;
    let l = lid.y * 16u + lid.x;
    var acc0 = vec4(0.0);
    var acc1 = vec4(0.0);
    var acc2 = vec4(0.0);
    var acc3 = vec4(0.0);
    for (var k0 = 0u; k0 < k; k0 += 32u) {
        // op(a): 64 rows x 32 k. Values past the edges are never summed.
        if TA {
            let kk = l / 8u;
            let r = (l % 8u) * 8u;
            let e = offa + min(k0 + kk, k - 1u) * m + row0 + r;
            a_s[kk * 16u + r / 4u] = a_vec(e);
            a_s[kk * 16u + r / 4u + 1u] = a_vec(e + 4u);
        } else {
            let r = l / 4u;
            let kk = (l % 4u) * 8u;
            let e = offa + min(row0 + r, m - 1u) * k + k0 + kk;
            let v0 = a_vec(e);
            let v1 = a_vec(e + 4u);
            let g = r / 4u;
            let c = r % 4u;
            a_s[kk * 16u + g][c] = v0.x;
            a_s[(kk + 1u) * 16u + g][c] = v0.y;
            a_s[(kk + 2u) * 16u + g][c] = v0.z;
            a_s[(kk + 3u) * 16u + g][c] = v0.w;
            a_s[(kk + 4u) * 16u + g][c] = v1.x;
            a_s[(kk + 5u) * 16u + g][c] = v1.y;
            a_s[(kk + 6u) * 16u + g][c] = v1.z;
            a_s[(kk + 7u) * 16u + g][c] = v1.w;
        }
        // op(w): 32 k x 64 columns.
        if TB {
            let col = l / 4u;
            let o = l % 4u;
            let e = offb + min(col0 + col, n - 1u) * k + k0;
            var v: mat2x4<f32>;
            if DT >= 3u {
                v = qoct(e >> 5u, o);
            } else {
                v = mat2x4<f32>(w_vec(e + 8u * o), w_vec(e + 8u * o + 4u));
            }
            let kk = o * 8u;
            let g = col / 4u;
            let c = col % 4u;
            b_s[kk * 16u + g][c] = v[0].x;
            b_s[(kk + 1u) * 16u + g][c] = v[0].y;
            b_s[(kk + 2u) * 16u + g][c] = v[0].z;
            b_s[(kk + 3u) * 16u + g][c] = v[0].w;
            b_s[(kk + 4u) * 16u + g][c] = v[1].x;
            b_s[(kk + 5u) * 16u + g][c] = v[1].y;
            b_s[(kk + 6u) * 16u + g][c] = v[1].z;
            b_s[(kk + 7u) * 16u + g][c] = v[1].w;
        } else {
            let kk = l / 8u;
            let cc = (l % 8u) * 8u;
            let e = offb + min(k0 + kk, k - 1u) * n + col0 + cc;
            b_s[kk * 16u + cc / 4u] = w_vec(e);
            b_s[kk * 16u + cc / 4u + 1u] = w_vec(e + 4u);
        }
        workgroupBarrier();
        // Stop at the real k so every output sums exactly k terms in order.
        let kmax = min(32u, k - k0);
        for (var kk = 0u; kk < kmax; kk++) {
            let av = a_s[kk * 16u + lid.y];
            let bv = b_s[kk * 16u + lid.x];
            acc0 = acc0 + av.x * bv;
            acc1 = acc1 + av.y * bv;
            acc2 = acc2 + av.z * bv;
            acc3 = acc3 + av.w * bv;
        }
        workgroupBarrier();
    }
    let row_off = bi * m * n;
    let i = row0 + lid.y * 4u;
    let j = col0 + lid.x * 4u;
    store4(row_off, i, j, acc0);
    store4(row_off, i + 1u, j, acc1);
    store4(row_off, i + 2u, j, acc2);
    store4(row_off, i + 3u, j, acc3);
}

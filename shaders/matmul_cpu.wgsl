// Matmul kernels for CPU adapters (lavapipe): `mv_rb` (few rows) and `mm_rb`, over matmul_common.wgsl
// (see there for the layout of the work and the order of the sums).

// ---- mv_rb: few rows (m <= 4), for CPU adapters ----

// Invocation t computes ROWS rows x 4 columns of one batch. One flat 1-D index over
// (batch, row group, column group) with the column group fastest; dispatch grid(that count / 64).

// The four columns' accumulators of rows ROWS of the invocation.
struct Acc4 {
    r0: vec4<f32>,
    r1: vec4<f32>,
    r2: vec4<f32>,
    r3: vec4<f32>,
}

// One k of op(w)'s four columns times the four rows' values xs.
fn acc4_k(acc: Acc4, xs: vec4<f32>, wv: vec4<f32>) -> Acc4 {
    var r = acc;
    r.r0 = r.r0 + xs.x * wv;
    if ROWS > 1u {
        r.r1 = r.r1 + xs.y * wv;
    }
    if ROWS > 2u {
        r.r2 = r.r2 + xs.z * wv;
        r.r3 = r.r3 + xs.w * wv;
    }
    return r;
}

// op(a)'s block of 32 k starting at k0 for row i.
fn x_block(offa: u32, i: u32, k0: u32) -> Blk {
    if TA {
        return a_block_strided(offa + k0 * p.m + i, p.m);
    }
    return a_block(offa + i * p.k + k0);
}

// acc.rX += xb_X . wb for the rows, in column slot `col`.
fn acc4_blk(acc: Acc4, x0: Blk, x1: Blk, x2: Blk, x3: Blk, wb: Blk, col: u32) -> Acc4 {
    var r = acc;
    r.r0[col] = dot_blk(r.r0[col], x0, wb);
    if ROWS > 1u {
        r.r1[col] = dot_blk(r.r1[col], x1, wb);
    }
    if ROWS > 2u {
        r.r2[col] = dot_blk(r.r2[col], x2, wb);
        r.r3[col] = dot_blk(r.r3[col], x3, wb);
    }
    return r;
}

// For !TB: 32 k of the four columns (w_vec at `e`, stride n) against the rows' blocks.
fn acc4_nt_quad(acc: Acc4, x0: vec4<f32>, x1: vec4<f32>, x2: vec4<f32>, x3: vec4<f32>, e: u32) -> Acc4 {
    let n = p.n;
    let w0 = w_vec(e);
    let w1 = w_vec(e + n);
    let w2 = w_vec(e + 2u * n);
    let w3 = w_vec(e + 3u * n);
    var r = acc;
    r.r0 = axpy4(r.r0, x0, w0, w1, w2, w3);
    if ROWS > 1u {
        r.r1 = axpy4(r.r1, x1, w0, w1, w2, w3);
    }
    if ROWS > 2u {
        r.r2 = axpy4(r.r2, x2, w0, w1, w2, w3);
        r.r3 = axpy4(r.r3, x3, w0, w1, w2, w3);
    }
    return r;
}

fn acc4_nt_blk(acc: Acc4, x0: Blk, x1: Blk, x2: Blk, x3: Blk, e: u32) -> Acc4 {
    let n4 = 4u * p.n;
    var r = acc;
    r = acc4_nt_quad(r, x0.q0, x1.q0, x2.q0, x3.q0, e);
    r = acc4_nt_quad(r, x0.q1, x1.q1, x2.q1, x3.q1, e + n4);
    r = acc4_nt_quad(r, x0.q2, x1.q2, x2.q2, x3.q2, e + 2u * n4);
    r = acc4_nt_quad(r, x0.q3, x1.q3, x2.q3, x3.q3, e + 3u * n4);
    r = acc4_nt_quad(r, x0.q4, x1.q4, x2.q4, x3.q4, e + 4u * n4);
    r = acc4_nt_quad(r, x0.q5, x1.q5, x2.q5, x3.q5, e + 5u * n4);
    r = acc4_nt_quad(r, x0.q6, x1.q6, x2.q6, x3.q6, e + 6u * n4);
    r = acc4_nt_quad(r, x0.q7, x1.q7, x2.q7, x3.q7, e + 7u * n4);
    return r;
}

@compute @workgroup_size(64)
fn mv_rb(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let t = flat_group(wg, nwg) * 64u + lid.x;
    let m = p.m;
    let n = p.n;
    let k = p.k;
    let ng = (n + 3u) / 4u;
    let mg = (m + ROWS - 1u) / ROWS;
    if t >= p.batch * mg * ng {
        return;
    }
    let j0 = (t % ng) * 4u;
    let i0 = ((t / ng) % mg) * ROWS;
    let bi = t / (ng * mg);
    let offa = bi * p.stride_a;
    let offb = bi * p.stride_b;
    // Rows and columns past the edge repeat the last one (their results are not stored).
    let i1 = min(i0 + 1u, m - 1u);
    let i2 = min(i0 + 2u, m - 1u);
    let i3 = min(i0 + 3u, m - 1u);
    var acc = Acc4(vec4(0.0), vec4(0.0), vec4(0.0), vec4(0.0));
    let nb = k / 32u;
    let zero = Blk(vec4(0.0), vec4(0.0), vec4(0.0), vec4(0.0), vec4(0.0), vec4(0.0), vec4(0.0), vec4(0.0));
    if TB {
        // Weight rows j0.. j0+3 of n, each k long.
        let e0 = offb + j0 * k;
        let e1 = offb + min(j0 + 1u, n - 1u) * k;
        let e2 = offb + min(j0 + 2u, n - 1u) * k;
        let e3 = offb + min(j0 + 3u, n - 1u) * k;
        for (var b = 0u; b < nb; b++) {
            let k0 = b * 32u;
            let x0 = x_block(offa, i0, k0);
            var x1 = zero;
            var x2 = zero;
            var x3 = zero;
            if ROWS > 1u {
                x1 = x_block(offa, i1, k0);
            }
            if ROWS > 2u {
                x2 = x_block(offa, i2, k0);
                x3 = x_block(offa, i3, k0);
            }
            acc = acc4_blk(acc, x0, x1, x2, x3, w_block(e0 + k0), 0u);
            acc = acc4_blk(acc, x0, x1, x2, x3, w_block(e1 + k0), 1u);
            acc = acc4_blk(acc, x0, x1, x2, x3, w_block(e2 + k0), 2u);
            acc = acc4_blk(acc, x0, x1, x2, x3, w_block(e3 + k0), 3u);
        }
        for (var q = nb * 32u; q < k; q++) {
            let xs = vec4(a_elem(offa, i0, q), a_elem(offa, i1, q), a_elem(offa, i2, q), a_elem(offa, i3, q));
            acc = acc4_k(acc, xs, vec4(w_elem(e0 + q), w_elem(e1 + q), w_elem(e2 + q), w_elem(e3 + q)));
        }
    } else {
        // Columns j0.. j0+3 of w [k, n] (f32 or f16).
        for (var b = 0u; b < nb; b++) {
            let k0 = b * 32u;
            let x0 = x_block(offa, i0, k0);
            var x1 = zero;
            var x2 = zero;
            var x3 = zero;
            if ROWS > 1u {
                x1 = x_block(offa, i1, k0);
            }
            if ROWS > 2u {
                x2 = x_block(offa, i2, k0);
                x3 = x_block(offa, i3, k0);
            }
            acc = acc4_nt_blk(acc, x0, x1, x2, x3, offb + k0 * n + j0);
        }
        for (var q = nb * 32u; q < k; q++) {
            let xs = vec4(a_elem(offa, i0, q), a_elem(offa, i1, q), a_elem(offa, i2, q), a_elem(offa, i3, q));
            acc = acc4_k(acc, xs, w_vec(offb + q * n + j0));
        }
    }
    let row_off = bi * m * n;
    store4(row_off, i0, j0, acc.r0);
    if ROWS > 1u {
        store4(row_off, i0 + 1u, j0, acc.r1);
    }
    if ROWS > 2u {
        store4(row_off, i0 + 2u, j0, acc.r2);
        store4(row_off, i0 + 3u, j0, acc.r3);
    }
}

// ---- mm_rb: more rows, for CPU adapters ----

// Workgroup 8 x 8 invocations for a 64 x 128 tile of c; invocation (x, y) computes rows 8y.. 8y+7
// and columns 16x.. 16x+15 of it. Dispatch (ceil(n / 128), ceil(m / 64), batch).

// 16 columns of one row.
struct R16 {
    c0: vec4<f32>,
    c1: vec4<f32>,
    c2: vec4<f32>,
    c3: vec4<f32>,
}

// 4 k x the 16 columns of op(w): one R16 per k.
struct Q16 {
    k0: R16,
    k1: R16,
    k2: R16,
    k3: R16,
}

// 8 rows x 4 k of op(a): one vec4 (over k) per row.
struct X8 {
    r0: vec4<f32>,
    r1: vec4<f32>,
    r2: vec4<f32>,
    r3: vec4<f32>,
    r4: vec4<f32>,
    r5: vec4<f32>,
    r6: vec4<f32>,
    r7: vec4<f32>,
}

fn r16_quad(acc: R16, x: vec4<f32>, b: Q16) -> R16 {
    return R16(
        axpy4(acc.c0, x, b.k0.c0, b.k1.c0, b.k2.c0, b.k3.c0),
        axpy4(acc.c1, x, b.k0.c1, b.k1.c1, b.k2.c1, b.k3.c1),
        axpy4(acc.c2, x, b.k0.c2, b.k1.c2, b.k2.c2, b.k3.c2),
        axpy4(acc.c3, x, b.k0.c3, b.k1.c3, b.k2.c3, b.k3.c3),
    );
}

fn r16_k(acc: R16, x: f32, b: R16) -> R16 {
    return R16(acc.c0 + x * b.c0, acc.c1 + x * b.c1, acc.c2 + x * b.c2, acc.c3 + x * b.c3);
}

// Rows k0.. k0+3 of w [k, n] at columns j.. j+15, `e` = the element of (k0, j).
fn q16_rows(e: u32) -> Q16 {
    let n = p.n;
    return Q16(
        R16(w_vec(e), w_vec(e + 4u), w_vec(e + 8u), w_vec(e + 12u)),
        R16(w_vec(e + n), w_vec(e + n + 4u), w_vec(e + n + 8u), w_vec(e + n + 12u)),
        R16(w_vec(e + 2u * n), w_vec(e + 2u * n + 4u), w_vec(e + 2u * n + 8u), w_vec(e + 2u * n + 12u)),
        R16(w_vec(e + 3u * n), w_vec(e + 3u * n + 4u), w_vec(e + 3u * n + 8u), w_vec(e + 3u * n + 12u)),
    );
}

// Four k from `k0` of four weight rows of w [n, k] starting at elements s: m[t] = the rows at k0 + t.
fn cols4(s: vec4<u32>, k0: u32) -> mat4x4<f32> {
    return transpose(mat4x4<f32>(w_vec(s.x + k0), w_vec(s.y + k0), w_vec(s.z + k0), w_vec(s.w + k0)));
}

// k0.. k0+3 of the 16 weight rows of w [n, k] starting at elements s0.. s3.
fn q16_cols(s0: vec4<u32>, s1: vec4<u32>, s2: vec4<u32>, s3: vec4<u32>, k0: u32) -> Q16 {
    let g0 = cols4(s0, k0);
    let g1 = cols4(s1, k0);
    let g2 = cols4(s2, k0);
    let g3 = cols4(s3, k0);
    return Q16(R16(g0[0], g1[0], g2[0], g3[0]), R16(g0[1], g1[1], g2[1], g3[1]), R16(g0[2], g1[2], g2[2], g3[2]), R16(g0[3], g1[3], g2[3], g3[3]));
}

// k0.. k0+3 of op(a) for 8 rows: for !TA the rows start at elements s0 (rows 0-3) and s1 (4-7);
// for TA, `i` is the element of (k0, first row) of a [k, m].
fn x8(s0: vec4<u32>, s1: vec4<u32>, i: u32, k0: u32) -> X8 {
    if TA {
        let m = p.m;
        let lo = transpose(mat4x4<f32>(a_vec(i), a_vec(i + m), a_vec(i + 2u * m), a_vec(i + 3u * m)));
        let hi = transpose(mat4x4<f32>(a_vec(i + 4u), a_vec(i + m + 4u), a_vec(i + 2u * m + 4u), a_vec(i + 3u * m + 4u)));
        return X8(lo[0], lo[1], lo[2], lo[3], hi[0], hi[1], hi[2], hi[3]);
    }
    return X8(
        a_vec(s0.x + k0), a_vec(s0.y + k0), a_vec(s0.z + k0), a_vec(s0.w + k0),
        a_vec(s1.x + k0), a_vec(s1.y + k0), a_vec(s1.z + k0), a_vec(s1.w + k0),
    );
}

// The 8 x 16 accumulators of an invocation.
struct Acc8 {
    r0: R16,
    r1: R16,
    r2: R16,
    r3: R16,
    r4: R16,
    r5: R16,
    r6: R16,
    r7: R16,
}

fn acc8_quad(acc: Acc8, x: X8, b: Q16) -> Acc8 {
    return Acc8(
        r16_quad(acc.r0, x.r0, b), r16_quad(acc.r1, x.r1, b), r16_quad(acc.r2, x.r2, b), r16_quad(acc.r3, x.r3, b),
        r16_quad(acc.r4, x.r4, b), r16_quad(acc.r5, x.r5, b), r16_quad(acc.r6, x.r6, b), r16_quad(acc.r7, x.r7, b),
    );
}

fn store16(row_off: u32, i: u32, j0: u32, v: R16) {
    store4(row_off, i, j0, v.c0);
    store4(row_off, i, j0 + 4u, v.c1);
    store4(row_off, i, j0 + 8u, v.c2);
    store4(row_off, i, j0 + 12u, v.c3);
}

// Decoded weights of the tile for one block of k: [32 k][32 column groups of 4].
var<workgroup> wtile: array<vec4<f32>, 1024>;

// Entries (k, g).. (k + 3, g) of `wtile` for quad `t` of half `h`: four blocks' vec4 `t`.
fn put_quad(k: u32, g: u32, b0: vec4<f32>, b1: vec4<f32>, b2: vec4<f32>, b3: vec4<f32>) {
    let v = transpose(mat4x4<f32>(b0, b1, b2, b3));
    wtile[k * 32u + g] = v[0];
    wtile[(k + 1u) * 32u + g] = v[1];
    wtile[(k + 2u) * 32u + g] = v[2];
    wtile[(k + 3u) * 32u + g] = v[3];
}

fn wtile_r16(k: u32, g: u32) -> R16 {
    let i = k * 32u + g;
    return R16(wtile[i], wtile[i + 1u], wtile[i + 2u], wtile[i + 3u]);
}

@compute @workgroup_size(8, 8, 1)
fn mm_rb(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let m = p.m;
    let n = p.n;
    let k = p.k;
    let bi = wg.z;
    let offa = bi * p.stride_a;
    let offb = bi * p.stride_b;
    let i0 = wg.y * 64u + lid.y * 8u;
    let j0 = wg.x * 128u + lid.x * 16u;
    // Rows and columns past the edge repeat the last one (their results are not stored).
    let rows_lo = min(vec4(i0) + vec4(0u, 1u, 2u, 3u), vec4(m - 1u));
    let rows_hi = min(vec4(i0) + vec4(4u, 5u, 6u, 7u), vec4(m - 1u));
    let sa0 = vec4(offa) + rows_lo * k;
    let sa1 = vec4(offa) + rows_hi * k;
    let cols = vec4(j0) + vec4(0u, 1u, 2u, 3u);
    let sb0 = vec4(offb) + min(cols, vec4(n - 1u)) * k;
    let sb1 = vec4(offb) + min(cols + vec4(4u), vec4(n - 1u)) * k;
    let sb2 = vec4(offb) + min(cols + vec4(8u), vec4(n - 1u)) * k;
    let sb3 = vec4(offb) + min(cols + vec4(12u), vec4(n - 1u)) * k;
    let z = R16(vec4(0.0), vec4(0.0), vec4(0.0), vec4(0.0));
    var acc = Acc8(z, z, z, z, z, z, z, z);
    if DT >= 3u {
        // Quantized (TB, k a multiple of 32): each block of k, the workgroup decodes the tile's 128
        // weight rows into `wtile`; invocation l takes column group l % 32 and half l / 32 of k.
        let l = lid.y * 8u + lid.x;
        let g = l % 32u;
        let h = l / 32u;
        let col0 = wg.x * 128u + g * 4u;
        let bl = (vec4(offb) + min(vec4(col0) + vec4(0u, 1u, 2u, 3u), vec4(n - 1u)) * k) / 32u;
        let nb = k / 32u;
        for (var b = 0u; b < nb; b++) {
            let w0 = qblock(bl.x + b);
            let w1 = qblock(bl.y + b);
            let w2 = qblock(bl.z + b);
            let w3 = qblock(bl.w + b);
            if h == 0u {
                put_quad(0u, g, w0.q0, w1.q0, w2.q0, w3.q0);
                put_quad(4u, g, w0.q1, w1.q1, w2.q1, w3.q1);
                put_quad(8u, g, w0.q2, w1.q2, w2.q2, w3.q2);
                put_quad(12u, g, w0.q3, w1.q3, w2.q3, w3.q3);
            } else {
                put_quad(16u, g, w0.q4, w1.q4, w2.q4, w3.q4);
                put_quad(20u, g, w0.q5, w1.q5, w2.q5, w3.q5);
                put_quad(24u, g, w0.q6, w1.q6, w2.q6, w3.q6);
                put_quad(28u, g, w0.q7, w1.q7, w2.q7, w3.q7);
            }
            workgroupBarrier();
            for (var t = 0u; t < 8u; t++) {
                let kk = t * 4u;
                let k0 = b * 32u + kk;
                let x = x8(sa0, sa1, offa + k0 * m + i0, k0);
                let gq = lid.x * 4u;
                let bq = Q16(wtile_r16(kk, gq), wtile_r16(kk + 1u, gq), wtile_r16(kk + 2u, gq), wtile_r16(kk + 3u, gq));
                acc = acc8_quad(acc, x, bq);
            }
            workgroupBarrier();
        }
    } else {
        let nq = k / 4u;
        for (var q = 0u; q < nq; q++) {
            let k0 = q * 4u;
            let x = x8(sa0, sa1, offa + k0 * m + i0, k0);
            var bq: Q16;
            if TB {
                bq = q16_cols(sb0, sb1, sb2, sb3, k0);
            } else {
                bq = q16_rows(offb + k0 * n + j0);
            }
            acc = acc8_quad(acc, x, bq);
        }
        for (var q = nq * 4u; q < k; q++) {
            var b: R16;
            if TB {
                b = R16(
                    vec4(w_elem(sb0.x + q), w_elem(sb0.y + q), w_elem(sb0.z + q), w_elem(sb0.w + q)),
                    vec4(w_elem(sb1.x + q), w_elem(sb1.y + q), w_elem(sb1.z + q), w_elem(sb1.w + q)),
                    vec4(w_elem(sb2.x + q), w_elem(sb2.y + q), w_elem(sb2.z + q), w_elem(sb2.w + q)),
                    vec4(w_elem(sb3.x + q), w_elem(sb3.y + q), w_elem(sb3.z + q), w_elem(sb3.w + q)),
                );
            } else {
                let e = offb + q * n + j0;
                b = R16(w_vec(e), w_vec(e + 4u), w_vec(e + 8u), w_vec(e + 12u));
            }
            acc.r0 = r16_k(acc.r0, a_elem(offa, rows_lo.x, q), b);
            acc.r1 = r16_k(acc.r1, a_elem(offa, rows_lo.y, q), b);
            acc.r2 = r16_k(acc.r2, a_elem(offa, rows_lo.z, q), b);
            acc.r3 = r16_k(acc.r3, a_elem(offa, rows_lo.w, q), b);
            acc.r4 = r16_k(acc.r4, a_elem(offa, rows_hi.x, q), b);
            acc.r5 = r16_k(acc.r5, a_elem(offa, rows_hi.y, q), b);
            acc.r6 = r16_k(acc.r6, a_elem(offa, rows_hi.z, q), b);
            acc.r7 = r16_k(acc.r7, a_elem(offa, rows_hi.w, q), b);
        }
    }
    let row_off = bi * m * n;
    store16(row_off, i0, j0, acc.r0);
    store16(row_off, i0 + 1u, j0, acc.r1);
    store16(row_off, i0 + 2u, j0, acc.r2);
    store16(row_off, i0 + 3u, j0, acc.r3);
    store16(row_off, i0 + 4u, j0, acc.r4);
    store16(row_off, i0 + 5u, j0, acc.r5);
    store16(row_off, i0 + 6u, j0, acc.r6);
    store16(row_off, i0 + 7u, j0, acc.r7);
}

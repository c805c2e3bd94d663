//! The CPU matmul family: reproducible ordered sums at SIMD speed (32 outputs side by side in
//! vector lanes over packed weight tiles), and in fast mode SIMD row dots, an FMA tile kernel or
//! `matrixmultiply`; f16 and quantized weights as dequantized tiles or fused quantized dots.

// `acc = acc + x` is spelled out to mirror the WGSL kernels line for line (Rust never contracts either form).
#![allow(clippy::assign_op_pattern)]

use std::borrow::Cow;

use rayon::prelude::*;

use super::super::dtype::DType;
use super::super::quant;
use super::super::shape::MatmulDims;
use super::super::tensor::Determinism;

pub(super) fn matmul_f32(det: Determinism, d: &MatmulDims, a: &[f32], b: &[f32]) -> Vec<f32> {
    match det {
        Determinism::Reproducible => matmul_ordered(d, a, b),
        Determinism::Fast if d.m < SMALL_M => matmul_small(d, a, b),
        Determinism::Fast if d.m < GEMM_MIN_ROWS => matmul_tiled(d, a, b, tile_kernel(true)),
        Determinism::Fast => matmul_fast(d, a, b),
    }
}

/// The rows of `a` for batch `bi` as a contiguous `[m, k]` (copied once when `a` is transposed).
pub(super) fn a_rows<'a>(d: &MatmulDims, a: &'a [f32], bi: usize) -> Cow<'a, [f32]> {
    let (m, k) = (d.m, d.k);
    let a = &a[bi * d.stride_a..bi * d.stride_a + m * k];
    if d.transpose_a { Cow::Owned((0..m * k).map(|x| a[(x % k) * m + x / k]).collect()) } else { Cow::Borrowed(a) }
}

/// One output at a time, k in order, `acc = acc + a * b` (no FMA): matches `matmul_naive` in WGSL.
/// Outputs of a row are computed side by side (SIMD lanes, each lane its own sequential sum) and
/// tiles of outputs are spread over threads; neither changes a bit of any output.
pub(crate) fn matmul_ordered(d: &MatmulDims, a: &[f32], b: &[f32]) -> Vec<f32> {
    matmul_tiled(d, a, b, tile_kernel(false))
}

/// [`matmul_ordered`]'s tiling with a given kernel (the FMA kernel in fast mode).
pub(super) fn matmul_tiled(d: &MatmulDims, a: &[f32], b: &[f32], kernel: TileKernel) -> Vec<f32> {
    let (m, n, k) = (d.m, d.n, d.k);
    let mut out = vec![0.0f32; d.batch * m * n];
    if m == 0 || n == 0 {
        return out;
    }
    for bi in 0..d.batch {
        let ar = a_rows(d, a, bi);
        let bb = &b[bi * d.stride_b..bi * d.stride_b + k * n];
        let pack = |j0: usize, tile: &mut [[f32; LANES]]| {
            let lanes = LANES.min(n - j0);
            if d.transpose_b {
                pack_lanes(tile, k, lanes, |l, out| out.copy_from_slice(&bb[(j0 + l) * k..(j0 + l + 1) * k]));
            } else {
                for (t, brow) in tile.iter_mut().zip(bb.chunks_exact(n)) {
                    t[..lanes].copy_from_slice(&brow[j0..j0 + lanes]);
                }
            }
        };
        ordered_tiles(m, n, k, &ar, pack, kernel, &mut out[bi * m * n..(bi + 1) * m * n]);
    }
    out
}

/// Outputs per tile row: 32 weight columns summed side by side.
pub(super) const LANES: usize = 32;

/// Rows of `a` per task, so a task's rows stay in cache while its tile is reused.
pub(super) const ROW_BLOCK: usize = 64;

/// Below this many multiply-adds a matmul stays on the calling thread.
pub(super) const PAR_MIN_WORK: usize = 1 << 16;

/// `c [m, n]`: every `c[i, j] = sum over p in order of a[i, p] * w_j[p]` (`acc = acc + a * w` from
/// 0, or one FMA per step with the fast kernel), where `pack(j0, tile)` writes weight columns
/// `j0..j0 + LANES` as `tile[p][lane]` (lanes past `n` stay 0 and are ignored). Threads take
/// (row block, tile) tasks.
pub(super) fn ordered_tiles(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    pack: impl Fn(usize, &mut [[f32; LANES]]) + Sync,
    kernel: TileKernel,
    c: &mut [f32],
) {
    let (tiles, blocks) = (n.div_ceil(LANES), m.div_ceil(ROW_BLOCK));
    let task = |t: usize| {
        let (tile_i, block) = (t % tiles, t / tiles);
        let rows = block * ROW_BLOCK..m.min((block + 1) * ROW_BLOCK);
        let mut tile = vec![[0.0f32; LANES]; k];
        pack(tile_i * LANES, &mut tile);
        let mut res = vec![[0.0f32; LANES]; rows.len()];
        kernel(&a[rows.start * k..rows.end * k], k, &tile, &mut res);
        res
    };
    let results: Vec<Vec<[f32; LANES]>> = if m * n * k < PAR_MIN_WORK {
        (0..tiles * blocks).map(task).collect()
    } else {
        (0..tiles * blocks).into_par_iter().map(task).collect()
    };
    for (t, res) in results.iter().enumerate() {
        let (j0, i0) = ((t % tiles) * LANES, (t / tiles) * ROW_BLOCK);
        let lanes = LANES.min(n - j0);
        for (i, r) in res.iter().enumerate() {
            c[(i0 + i) * n + j0..(i0 + i) * n + j0 + lanes].copy_from_slice(&r[..lanes]);
        }
    }
}

/// `out[i][lane] = sum over p in order of a[i, p] * tile[p][lane]` for the `out.len()` rows of `a`.
type TileKernel = fn(&[f32], usize, &[[f32; LANES]], &mut [[f32; LANES]]);

/// The tile kernel: `fused` (fast mode) uses one FMA per step where the CPU has it; otherwise a
/// separate multiply and add (the reproducible arithmetic), compiled for AVX where available.
pub(super) fn tile_kernel(fused: bool) -> TileKernel {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        if fused && has!("avx2") && has!("fma") {
            return tile_fma_entry;
        }
        if has!("avx") {
            return tile_avx_entry;
        }
    }
    let _ = fused;
    tile_portable
}

/// One step of a lane's sum: `acc + x * w` rounded twice, or once (FMA) when `FUSED`.
#[inline(always)]
pub(super) fn step<const FUSED: bool>(acc: f32, x: f32, w: f32) -> f32 {
    if FUSED { x.mul_add(w, acc) } else { acc + x * w }
}

/// Two rows of `a` at a time against the 32 lanes: 64 independent sequential sums.
#[inline(always)]
pub(super) fn tile_impl<const FUSED: bool>(a: &[f32], k: usize, tile: &[[f32; LANES]], out: &mut [[f32; LANES]]) {
    if k == 0 {
        out.fill([0.0; LANES]);
        return;
    }
    let mut out2 = out.chunks_exact_mut(2);
    let mut a2 = a.chunks_exact(2 * k);
    for (o, a) in (&mut out2).zip(&mut a2) {
        let (r0, r1) = a.split_at(k);
        let mut acc = [[0.0f32; LANES]; 2];
        for ((w, &x0), &x1) in tile.iter().zip(r0).zip(r1) {
            for l in 0..LANES {
                acc[0][l] = step::<FUSED>(acc[0][l], x0, w[l]);
                acc[1][l] = step::<FUSED>(acc[1][l], x1, w[l]);
            }
        }
        o.copy_from_slice(&acc);
    }
    for (o, r) in out2.into_remainder().iter_mut().zip(a2.remainder().chunks_exact(k)) {
        let mut acc = [0.0f32; LANES];
        for (w, &x) in tile.iter().zip(r) {
            for l in 0..LANES {
                acc[l] = step::<FUSED>(acc[l], x, w[l]);
            }
        }
        *o = acc;
    }
}

pub(super) fn tile_portable(a: &[f32], k: usize, tile: &[[f32; LANES]], out: &mut [[f32; LANES]]) {
    tile_impl::<false>(a, k, tile, out)
}

/// The reproducible code compiled with AVX (8-wide registers); `mul` and `add` stay separate
/// instructions (no FMA feature is enabled, and Rust never contracts).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
pub(super) fn tile_avx(a: &[f32], k: usize, tile: &[[f32; LANES]], out: &mut [[f32; LANES]]) {
    tile_impl::<false>(a, k, tile, out)
}

/// Fast mode: one FMA per step.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub(super) fn tile_fma(a: &[f32], k: usize, tile: &[[f32; LANES]], out: &mut [[f32; LANES]]) {
    tile_impl::<true>(a, k, tile, out)
}

#[cfg(target_arch = "x86_64")]
pub(super) fn tile_avx_entry(a: &[f32], k: usize, tile: &[[f32; LANES]], out: &mut [[f32; LANES]]) {
    // SAFETY: handed out by `tile_kernel` only after `is_x86_feature_detected!("avx")`.
    unsafe { tile_avx(a, k, tile, out) }
}

#[cfg(target_arch = "x86_64")]
pub(super) fn tile_fma_entry(a: &[f32], k: usize, tile: &[[f32; LANES]], out: &mut [[f32; LANES]]) {
    // SAFETY: handed out by `tile_kernel` only after detecting avx2 and fma.
    unsafe { tile_fma(a, k, tile, out) }
}

// Fast-mode strategy by the number of rows `m` of `a`, picked from throwaway timings of
// [m, 576] x [1536, 576]^T on a 2-core AMD EPYC (AVX2): f32 uses SIMD row dots below `SMALL_M`
// (matrixmultiply's packing dominates there), the FMA tile kernel up to `GEMM_MIN_ROWS`, then
// matrixmultiply; f16 / quantized weights use the fused quantized dot for one row, dequantize-a-row
// dots below `WEIGHT_TILE_MIN_ROWS`, dequantized tiles with the FMA tile kernel up to
// `GEMM_MIN_ROWS`, then dequantized tiles through matrixmultiply.

/// Fast f32 matmul with fewer rows than this uses SIMD row dots.
pub(super) const SMALL_M: usize = 12;

/// Fast f32 matmul for a few rows of `a`: SIMD dots over the rows of a transposed `b`, or rows of `b`
/// accumulated into each output row (`y = y + a[i, p] * b[p, :]`); threads over output columns.
pub(super) fn matmul_small(d: &MatmulDims, a: &[f32], b: &[f32]) -> Vec<f32> {
    let (m, n, k) = (d.m, d.n, d.k);
    let mut out = vec![0.0f32; d.batch * m * n];
    if m == 0 || n == 0 || k == 0 {
        return out;
    }
    let dot = quant::fast_dot_f32();
    let par = m * n * k >= PAR_MIN_WORK;
    for bi in 0..d.batch {
        let ar = a_rows(d, a, bi);
        let bb = &b[bi * d.stride_b..bi * d.stride_b + k * n];
        let c = &mut out[bi * m * n..(bi + 1) * m * n];
        if d.transpose_b {
            let mut ct = vec![0.0f32; m * n];
            let col = |(o, w): (&mut [f32], &[f32])| o.iter_mut().zip(ar.chunks_exact(k)).for_each(|(o, x)| *o = dot(w, x));
            if par {
                ct.par_chunks_mut(m).zip(bb.par_chunks(k)).with_min_len(16).for_each(col);
            } else {
                ct.chunks_mut(m).zip(bb.chunks(k)).for_each(col);
            }
            transpose_into(&ct, m, c);
        } else {
            const COLS: usize = 256;
            for (crow, arow) in c.chunks_exact_mut(n).zip(ar.chunks_exact(k)) {
                let seg = |(j, y): (usize, &mut [f32])| {
                    for (&x, brow) in arow.iter().zip(bb.chunks_exact(n)) {
                        for (y, &w) in y.iter_mut().zip(&brow[j * COLS..]) {
                            *y = *y + x * w;
                        }
                    }
                };
                if par {
                    crow.par_chunks_mut(COLS).enumerate().for_each(seg);
                } else {
                    crow.chunks_mut(COLS).enumerate().for_each(seg);
                }
            }
        }
    }
    out
}

/// `matrixmultiply::sgemm` per batch; transposes are expressed as strides, no copies.
pub(super) fn matmul_fast(d: &MatmulDims, a: &[f32], b: &[f32]) -> Vec<f32> {
    let (m, n, k) = (d.m, d.n, d.k);
    let mut out = vec![0.0f32; d.batch * m * n];
    if m == 0 || n == 0 || k == 0 {
        return out;
    }
    let (rsa, csa) = if d.transpose_a { (1, m as isize) } else { (k as isize, 1) };
    let (rsb, csb) = if d.transpose_b { (1, k as isize) } else { (n as isize, 1) };
    for bi in 0..d.batch {
        let (oa, ob, oc) = (bi * d.stride_a, bi * d.stride_b, bi * m * n);
        let (a, b, c) = (&a[oa..oa + m * k], &b[ob..ob + k * n], &mut out[oc..oc + m * n]);
        sgemm(m, k, n, a, (rsa, csa), b, (rsb, csb), c, (n as isize, 1));
    }
    out
}

/// `c = a @ b` for `[m, k] @ [k, n]` views with the given (row, column) strides.
#[allow(clippy::too_many_arguments)]
pub(super) fn sgemm(
    m: usize,
    k: usize,
    n: usize,
    a: &[f32],
    sa: (isize, isize),
    b: &[f32],
    sb: (isize, isize),
    c: &mut [f32],
    sc: (isize, isize),
) {
    let last = |rows: usize, cols: usize, (rs, cs): (isize, isize)| (rows - 1) as isize * rs + (cols - 1) as isize * cs;
    let fits = m > 0
        && n > 0
        && k > 0
        && last(m, k, sa) < a.len() as isize
        && last(k, n, sb) < b.len() as isize
        && last(m, n, sc) < c.len() as isize;
    if !fits {
        return;
    }
    // SAFETY: every stride is positive and the last element of each [rows, cols] view is inside its
    // slice (checked above), so all accesses are in bounds; `c` is a unique borrow, not aliased.
    unsafe {
        matrixmultiply::sgemm(m, k, n, 1.0, a.as_ptr(), sa.0, sa.1, b.as_ptr(), sb.0, sb.1, 0.0, c.as_mut_ptr(), sc.0, sc.1);
    }
}

/// From this many rows of `a` on, fast mode multiplies with `matrixmultiply` (weights: dequantized
/// tiles of weight rows).
pub(super) const GEMM_MIN_ROWS: usize = 64;

/// Weight tiles for the GEMM path hold at most this many f32 values (4 MiB).
pub(super) const TILE_ELEMS: usize = 1 << 20;

/// `a [m, k]` (f32) times the f16 or quantized weights `w`, stored as `[n, k]` rows (transpose_b).
pub(super) fn matmul_weights(det: Determinism, d: &MatmulDims, a: &[f32], dtype: DType, w: &[u8]) -> Vec<f32> {
    let (m, n, k) = (d.m, d.n, d.k);
    let mut out = vec![0.0f32; d.batch * m * n];
    if m == 0 || n == 0 || k == 0 {
        return out;
    }
    let row_bytes = k / dtype.block_len() * dtype.block_bytes();
    let w_stride = if d.stride_b == 0 { 0 } else { n * row_bytes };
    for bi in 0..d.batch {
        let ar = a_rows(d, a, bi);
        let w = &w[bi * w_stride..bi * w_stride + n * row_bytes];
        let c = &mut out[bi * m * n..(bi + 1) * m * n];
        match det {
            // Each lane dequantizes its weight row by the definition in `quant`.
            Determinism::Reproducible => ordered_tiles(m, n, k, &ar, weight_packer(dtype, w, row_bytes), tile_kernel(false), c),
            Determinism::Fast if m >= GEMM_MIN_ROWS => weights_gemm(m, n, k, &ar, dtype, w, row_bytes, c),
            Determinism::Fast if m >= WEIGHT_TILE_MIN_ROWS => {
                ordered_tiles(m, n, k, &ar, weight_packer(dtype, w, row_bytes), tile_kernel(true), c)
            }
            Determinism::Fast => weights_dots(m, k, &ar, dtype, w, row_bytes, c),
        }
    }
    out
}

/// Packs weight rows `j0..j0 + LANES`, each dequantized by the definition in `quant`, as tile lanes.
pub(super) fn weight_packer(dtype: DType, w: &[u8], row_bytes: usize) -> impl Fn(usize, &mut [[f32; LANES]]) + Sync {
    move |j0, tile| {
        let rows: Vec<&[u8]> = w.chunks_exact(row_bytes).skip(j0).take(LANES).collect();
        pack_lanes(tile, tile.len(), rows.len(), |l, out| quant::dequantize_unchecked(dtype, rows[l], out));
    }
}

/// Fills `tile[p][l]` (`tile.len() == k`) with element `p` of row `l`, for the `lanes` rows that
/// `fill(l, row)` writes (contiguously, into a scratch `[LANES, k]`); other lanes are 0.
pub(super) fn pack_lanes(tile: &mut [[f32; LANES]], k: usize, lanes: usize, fill: impl Fn(usize, &mut [f32])) {
    let mut rows = vec![0.0f32; LANES * k];
    if k == 0 {
        return;
    }
    for (l, row) in rows.chunks_exact_mut(k).enumerate().take(lanes) {
        fill(l, row);
    }
    transpose_to_tile(&rows, k, tile);
}

/// `tile[p][l] = rows[l * k + p]` for `l < LANES`, `p < k`: 8x8 blocks through AVX registers where
/// the CPU has AVX (a pure data move, so the result is the same either way).
pub(super) fn transpose_to_tile(rows: &[f32], k: usize, tile: &mut [[f32; LANES]]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx") {
        // SAFETY: AVX was just detected.
        let done = unsafe { transpose_avx::transpose(rows, k, tile) };
        return transpose_from(rows, k, done, tile);
    }
    transpose_from(rows, k, 0, tile)
}

/// The scalar transpose of columns `p_from..k`.
pub(super) fn transpose_from(rows: &[f32], k: usize, p_from: usize, tile: &mut [[f32; LANES]]) {
    for (p, t) in tile.iter_mut().enumerate().take(k).skip(p_from) {
        for (l, v) in t.iter_mut().enumerate() {
            *v = rows[l * k + p];
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod transpose_avx {
    use std::arch::x86_64::*;

    use super::LANES;

    /// Transposes the 8x8 blocks of the first `k / 8 * 8` columns; returns that count.
    #[target_feature(enable = "avx")]
    pub(super) fn transpose(rows: &[f32], k: usize, tile: &mut [[f32; LANES]]) -> usize {
        let k8 = k / 8 * 8;
        let mut p0 = 0;
        while p0 < k8 {
            let mut l0 = 0;
            while l0 < LANES {
                let mut r = [_mm256_setzero_ps(); 8];
                for (i, r) in r.iter_mut().enumerate() {
                    let src = &rows[(l0 + i) * k + p0..(l0 + i) * k + p0 + 8];
                    // SAFETY: `src` is 8 in-bounds f32s; unaligned load.
                    *r = unsafe { _mm256_loadu_ps(src.as_ptr()) };
                }
                let t = transpose8(r);
                for (e, t) in t.into_iter().enumerate() {
                    let dst = &mut tile[p0 + e][l0..l0 + 8];
                    // SAFETY: `dst` is 8 in-bounds f32s; unaligned store.
                    unsafe { _mm256_storeu_ps(dst.as_mut_ptr(), t) };
                }
                l0 += 8;
            }
            p0 += 8;
        }
        k8
    }

    /// The 8x8 transpose of eight rows.
    #[target_feature(enable = "avx")]
    fn transpose8(r: [__m256; 8]) -> [__m256; 8] {
        let t0 = _mm256_unpacklo_ps(r[0], r[1]);
        let t1 = _mm256_unpackhi_ps(r[0], r[1]);
        let t2 = _mm256_unpacklo_ps(r[2], r[3]);
        let t3 = _mm256_unpackhi_ps(r[2], r[3]);
        let t4 = _mm256_unpacklo_ps(r[4], r[5]);
        let t5 = _mm256_unpackhi_ps(r[4], r[5]);
        let t6 = _mm256_unpacklo_ps(r[6], r[7]);
        let t7 = _mm256_unpackhi_ps(r[6], r[7]);
        let s0 = _mm256_shuffle_ps::<0x44>(t0, t2);
        let s1 = _mm256_shuffle_ps::<0xee>(t0, t2);
        let s2 = _mm256_shuffle_ps::<0x44>(t1, t3);
        let s3 = _mm256_shuffle_ps::<0xee>(t1, t3);
        let s4 = _mm256_shuffle_ps::<0x44>(t4, t6);
        let s5 = _mm256_shuffle_ps::<0xee>(t4, t6);
        let s6 = _mm256_shuffle_ps::<0x44>(t5, t7);
        let s7 = _mm256_shuffle_ps::<0xee>(t5, t7);
        [
            _mm256_permute2f128_ps::<0x20>(s0, s4),
            _mm256_permute2f128_ps::<0x20>(s1, s5),
            _mm256_permute2f128_ps::<0x20>(s2, s6),
            _mm256_permute2f128_ps::<0x20>(s3, s7),
            _mm256_permute2f128_ps::<0x31>(s0, s4),
            _mm256_permute2f128_ps::<0x31>(s1, s5),
            _mm256_permute2f128_ps::<0x31>(s2, s6),
            _mm256_permute2f128_ps::<0x31>(s3, s7),
        ]
    }
}

/// Fast weight matmul from this many rows of `a` on (below `GEMM_MIN_ROWS`) uses the FMA tile kernel.
pub(super) const WEIGHT_TILE_MIN_ROWS: usize = 6;

/// Fast, few rows: threads over weight rows; one row of `a` uses the fused quantized dot, more rows
/// dequantize each weight row once and use f32 dots.
pub(super) fn weights_dots(m: usize, k: usize, a: &[f32], dtype: DType, w: &[u8], row_bytes: usize, c: &mut [f32]) {
    if m == 1 {
        let kernel = quant::fast_kernel(dtype);
        c.par_iter_mut().zip(w.par_chunks(row_bytes)).with_min_len(16).for_each(|(o, wrow)| *o = kernel(wrow, a));
        return;
    }
    let dot = quant::fast_dot_f32();
    let mut ct = vec![0.0f32; c.len()];
    ct.par_chunks_mut(m).zip(w.par_chunks(row_bytes)).with_min_len(8).for_each_init(
        || vec![0.0f32; k],
        |buf, (o, wrow)| {
            quant::dequantize_unchecked(dtype, wrow, buf);
            for (o, arow) in o.iter_mut().zip(a.chunks_exact(k)) {
                *o = dot(buf, arow);
            }
        },
    );
    transpose_into(&ct, m, c);
}

/// Fast, many rows: dequantize tiles of weight rows to f32 (threads over rows) and multiply each
/// tile with `matrixmultiply` straight into its columns of `c`.
#[allow(clippy::too_many_arguments)]
pub(super) fn weights_gemm(m: usize, n: usize, k: usize, a: &[f32], dtype: DType, w: &[u8], row_bytes: usize, c: &mut [f32]) {
    let tile_rows = (TILE_ELEMS / k).clamp(1, n);
    let mut tile = vec![0.0f32; tile_rows * k];
    let mut j0 = 0;
    while j0 < n {
        let rows = tile_rows.min(n - j0);
        let t = &mut tile[..rows * k];
        t.par_chunks_mut(k)
            .zip(w[j0 * row_bytes..(j0 + rows) * row_bytes].par_chunks(row_bytes))
            .with_min_len(8)
            .for_each(|(o, wrow)| quant::dequantize_unchecked(dtype, wrow, o));
        // c[:, j0..j0 + rows] = a [m, k] @ tile^T [k, rows]
        sgemm(m, k, rows, a, (k as isize, 1), t, (1, k as isize), &mut c[j0..], (n as isize, 1));
        j0 += rows;
    }
}

/// `c [m, n] = ct^T` for `ct [n, m]`.
pub(super) fn transpose_into(ct: &[f32], m: usize, c: &mut [f32]) {
    if m == 1 {
        c.copy_from_slice(ct);
        return;
    }
    let n = c.len() / m.max(1);
    for (i, crow) in c.chunks_exact_mut(n.max(1)).enumerate() {
        for (j, o) in crow.iter_mut().enumerate() {
            *o = ct[j * m + i];
        }
    }
}

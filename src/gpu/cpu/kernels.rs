//! The CPU's reference kernels, which `shaders/*.wgsl` and `kernels/*.cu` mirror operation for
//! operation (rows of softmax, norms, reductions, rotary and attention; the elementwise functions),
//! and the element moves of the layout ops.

// `acc = acc + x` is spelled out to mirror the WGSL kernels line for line (Rust never contracts either form).
#![allow(clippy::assign_op_pattern)]

use rayon::prelude::*;

use super::super::op::{ReduceOp, RopeMode, UnaryOp};
use super::super::repro::{repro_exp_full, repro_gelu, repro_silu, repro_tanh};
use super::super::shape::{AttentionDims, strides};
use super::super::tensor::Determinism;
use super::PAR_MIN_ELEMS;

// ---- layout ----

/// A transposed copy: output axis `i` is input axis `axes[i]` (rank <= 4, checked by the caller).
pub(super) fn permute_elems<T: Copy>(src: &[T], shape: &[usize], axes: &[usize]) -> Vec<T> {
    let in_strides = strides(shape);
    // Pad to 4-D: output extents and the input stride of each output axis.
    let (mut ext, mut st) = ([1usize; 4], [0usize; 4]);
    let pad = 4 - axes.len();
    for (i, &ax) in axes.iter().enumerate() {
        ext[pad + i] = shape[ax];
        st[pad + i] = in_strides[ax];
    }
    let mut out = Vec::with_capacity(src.len());
    for i0 in 0..ext[0] {
        for i1 in 0..ext[1] {
            for i2 in 0..ext[2] {
                let base = i0 * st[0] + i1 * st[1] + i2 * st[2];
                out.extend((0..ext[3]).map(|i3| src[base + i3 * st[3]]));
            }
        }
    }
    out
}

/// `[outer, axis]` runs of `axis_run` units: keeps `[start, start + len)` of each run.
pub(super) fn slice_runs<T: Copy>(src: &[T], outer: usize, (axis_run, start, len): (usize, usize, usize)) -> Vec<T> {
    let mut out = Vec::with_capacity(outer * len);
    for o in 0..outer {
        out.extend_from_slice(&src[o * axis_run + start..o * axis_run + start + len]);
    }
    out
}

/// Interleaves `outer` runs of `ra` units of `a` with runs of `rb` units of `b`.
pub(super) fn concat_runs<T: Copy>(a: &[T], b: &[T], outer: usize, ra: usize, rb: usize) -> Vec<T> {
    let mut out = Vec::with_capacity(outer * (ra + rb));
    for o in 0..outer {
        out.extend_from_slice(&a[o * ra..(o + 1) * ra]);
        out.extend_from_slice(&b[o * rb..(o + 1) * rb]);
    }
    out
}

// ---- the reference kernels; `shaders/*.wgsl` mirror these operation for operation ----

/// Rotates one head (`row`, `d` features) by its position's `(cos, sin)` pairs `cs` (`[d/2, 2]`
/// from [`rope_table`]). Pair `i` is features `(2i, 2i + 1)` (interleaved) or `(i, i + d/2)` (neox);
/// `x0' = x0 * c - x1 * s`, `x1' = x0 * s + x1 * c`, each product rounded to f32 before the add.
#[inline]
pub(super) fn rope_row(row: &mut [f32], cs: &[f32], mode: RopeMode) {
    let half = row.len() / 2;
    for i in 0..half {
        let (i0, i1) = match mode {
            RopeMode::Interleaved => (2 * i, 2 * i + 1),
            RopeMode::Neox => (i, i + half),
        };
        let (c, s) = (cs[2 * i], cs[2 * i + 1]);
        let (x0, x1) = (row[i0], row[i1]);
        row[i0] = x0 * c - x1 * s;
        row[i1] = x0 * s + x1 * c;
    }
}

/// Causal grouped-query attention, the reference order (the wgpu kernels mirror it):
///
/// for each batch `b`, query row `i` and query head `h` (key/value head `g = h / (hq / hkv)`):
/// 1. `visible = min(pos0 + i + 1, tk)` keys; with none, the output row is zeros;
/// 2. for `j` in `0..visible`: `s_j = (sum over d in order of q_d * k_jd, acc = acc + q * k from 0)
///    * scale` (the sum rounded to f32, then one multiply);
/// 3. `p = softmax_row(s)` exactly as `softmax_last` does a row: `mx = max_j s_j` (from -inf, NaN
///    skipped), `e_j = exp(s_j - mx)` with `sum = sum + e_j` in order, then `p_j = e_j / sum`, with
///    `exp` = [`repro_exp`] (reproducible) or `f32::exp` (fast);
/// 4. `out_d = sum over j in order of p_j * v_jd` (`acc = acc + p * v` from 0).
///
/// Keys past the causal limit are never touched (not masked with -inf). All rows are independent, so
/// they are spread over threads without changing a bit.
pub(super) fn attention_ref(d: &AttentionDims, q: &[f32], k: &[f32], v: &[f32], pos0: u32, scale: f32, exp: fn(f32) -> f32) -> Vec<f32> {
    let dim = d.dim;
    let mut out = vec![0.0f32; d.batch * d.tq * d.hq * dim];
    if out.is_empty() {
        return out;
    }
    let group = d.hq / d.hkv.max(1);
    let row = |scores: &mut Vec<f32>, r: usize, o: &mut [f32]| {
        let (h, i, b) = (r % d.hq, (r / d.hq) % d.tq, r / (d.hq * d.tq));
        let visible = (pos0 as usize + i + 1).min(d.tk);
        let g = h / group.max(1);
        let qrow = &q[r * dim..(r + 1) * dim];
        let kv_row = |j: usize| ((b * d.tk + j) * d.hkv + g) * dim;
        scores.clear();
        for j in 0..visible {
            let krow = &k[kv_row(j)..kv_row(j) + dim];
            let mut acc = 0.0f32;
            for (&qv, &kv) in qrow.iter().zip(krow) {
                acc = acc + qv * kv;
            }
            scores.push(acc * scale);
        }
        softmax_row(scores, exp);
        o.fill(0.0);
        for (j, &p) in scores.iter().enumerate() {
            let vrow = &v[kv_row(j)..kv_row(j) + dim];
            for (o, &vv) in o.iter_mut().zip(vrow) {
                *o = *o + p * vv;
            }
        }
    };
    if out.len() * d.tk < PAR_MIN_ELEMS {
        let mut scores = Vec::new();
        out.chunks_mut(dim).enumerate().for_each(|(r, o)| row(&mut scores, r, o));
    } else {
        out.par_chunks_mut(dim).enumerate().for_each_init(Vec::new, |scores, (r, o)| row(scores, r, o));
    }
    out
}

/// One element of a unary op. The transcendental ops use the portable functions of [`super`] in
/// reproducible mode (bitwise equal to the wgpu and CUDA kernels) and the standard library in fast
/// mode.
#[inline]
pub(crate) fn unary_f32(op: UnaryOp, det: Determinism, x: f32) -> f32 {
    let repro = det == Determinism::Reproducible;
    match op {
        UnaryOp::Scale(s) => x * s,
        UnaryOp::Relu => {
            if x > 0.0 {
                x
            } else {
                0.0
            }
        }
        UnaryOp::Gelu if repro => repro_gelu(x),
        UnaryOp::Gelu => 0.5 * x * (1.0 + (0.797_884_6 * (x + 0.044_715 * x * x * x)).tanh()),
        UnaryOp::Silu if repro => repro_silu(x),
        UnaryOp::Silu => x / (1.0 + (-x).exp()),
        UnaryOp::Tanh if repro => repro_tanh(x),
        UnaryOp::Tanh => x.tanh(),
        UnaryOp::Exp if repro => repro_exp_full(x),
        UnaryOp::Exp => x.exp(),
    }
}

/// Sum, mean and max of a row (argmax: [`argmax_row`], as an f32). NaN never compares greater, so
/// it is skipped (an all-NaN row gives max -inf).
#[inline]
pub(crate) fn reduce_row(op: ReduceOp, row: &[f32]) -> f32 {
    match op {
        ReduceOp::Sum => row_sum(row),
        ReduceOp::Mean => row_sum(row) / row.len() as f32,
        ReduceOp::Max => row_max(row),
        ReduceOp::Argmax => argmax_row(row) as f32,
    }
}

/// The first index of the maximum; NaN is skipped (an all-NaN or empty row gives 0).
#[inline]
pub(crate) fn argmax_row(row: &[f32]) -> usize {
    let Some(&first) = row.first() else { return 0 };
    let (mut best, mut idx) = (first, 0usize);
    for (i, &v) in row.iter().enumerate().skip(1) {
        if v > best || (best.is_nan() && !v.is_nan()) {
            best = v;
            idx = i;
        }
    }
    idx
}

#[inline]
pub(super) fn row_sum(row: &[f32]) -> f32 {
    let mut acc = 0.0f32;
    for &v in row {
        acc = acc + v;
    }
    acc
}

#[inline]
pub(super) fn row_max(row: &[f32]) -> f32 {
    let mut acc = f32::NEG_INFINITY;
    for &v in row {
        if v > acc {
            acc = v;
        }
    }
    acc
}

#[inline]
pub(super) fn softmax_row(row: &mut [f32], exp: fn(f32) -> f32) {
    let m = row_max(row);
    let mut sum = 0.0f32;
    for v in row.iter_mut() {
        *v = exp(*v - m);
        sum = sum + *v;
    }
    for v in row.iter_mut() {
        *v = *v / sum;
    }
}

#[inline]
pub(super) fn rmsnorm_row(row: &mut [f32], w: &[f32], eps: f32) {
    let mut ss = 0.0f32;
    for &v in row.iter() {
        ss = ss + v * v;
    }
    let inv = 1.0 / (ss / row.len() as f32 + eps).sqrt();
    for (v, &w) in row.iter_mut().zip(w) {
        *v = *v * inv * w;
    }
}

#[inline]
pub(super) fn layernorm_row(row: &mut [f32], w: &[f32], b: &[f32], eps: f32) {
    let n = row.len() as f32;
    let mean = row_sum(row) / n;
    let mut var = 0.0f32;
    for &v in row.iter() {
        let d = v - mean;
        var = var + d * d;
    }
    let inv = 1.0 / (var / n + eps).sqrt();
    for ((v, &w), &b) in row.iter_mut().zip(w).zip(b) {
        *v = (*v - mean) * inv * w + b;
    }
}

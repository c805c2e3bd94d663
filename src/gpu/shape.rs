//! Shape checks and the geometry the kernels need, for every op: rank and size limits, matmul and
//! broadcasting geometry, and the layout, gather, rotary and attention shapes. `op.rs` decides which
//! check applies to which op; backends only read the geometry these functions return, so the same
//! misuse gets the same error on every backend.

use super::tensor::{GpuError, MAX_RANK, Result};

pub(crate) fn shape_err(op: &'static str, details: impl Into<String>) -> GpuError {
    GpuError::ShapeMismatch { op, details: details.into() }
}

pub(crate) fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

/// Rank 1..=4, and the element count (and its byte size) fits comfortably in u32/u64 indexing.
pub(crate) fn check_shape(op: &'static str, shape: &[usize]) -> Result<()> {
    if shape.is_empty() || shape.len() > MAX_RANK {
        return Err(shape_err(op, format!("rank must be 1..={MAX_RANK}, got shape {shape:?}")));
    }
    let mut n: u64 = 1;
    for &d in shape {
        n = n
            .checked_mul(d as u64)
            .filter(|&n| n <= u32::MAX as u64 / 4)
            .ok_or_else(|| shape_err(op, format!("shape {shape:?} is too large")))?;
    }
    Ok(())
}

/// The geometry of a batched matmul: `batch` products of `[m, k] @ [k, n]`; a stride of 0 broadcasts
/// a 2-D operand over the batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct MatmulDims {
    pub batch: usize,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub stride_a: usize,
    pub stride_b: usize,
    pub transpose_a: bool,
    pub transpose_b: bool,
}

/// Validates a matmul and returns its geometry and output shape. The leading (batch) axes of `a` and
/// `b` must be equal, or one operand must be 2-D (shared across the batch).
pub(crate) fn matmul_dims(a: &[usize], b: &[usize], transpose_a: bool, transpose_b: bool) -> Result<(MatmulDims, Vec<usize>)> {
    const OP: &str = "matmul";
    if a.len() < 2 || b.len() < 2 {
        return Err(shape_err(OP, format!("operands need rank >= 2, got {a:?} and {b:?}")));
    }
    let (ba, ma) = a.split_at(a.len() - 2);
    let (bb, mb) = b.split_at(b.len() - 2);
    let (m, ka) = if transpose_a { (ma[1], ma[0]) } else { (ma[0], ma[1]) };
    let (kb, n) = if transpose_b { (mb[1], mb[0]) } else { (mb[0], mb[1]) };
    if ka != kb {
        return Err(shape_err(OP, format!("inner dimensions differ: {a:?} (transpose {transpose_a}) @ {b:?} (transpose {transpose_b})")));
    }
    let batch_shape: Vec<usize> = if ba == bb || bb.is_empty() {
        ba.to_vec()
    } else if ba.is_empty() {
        bb.to_vec()
    } else {
        return Err(shape_err(OP, format!("batch axes differ: {a:?} @ {b:?}")));
    };
    let mut out = batch_shape.clone();
    out.extend([m, n]);
    check_shape(OP, &out)?;
    let dims = MatmulDims {
        batch: numel(&batch_shape),
        m,
        n,
        k: ka,
        stride_a: if ba.is_empty() { 0 } else { m * ka },
        stride_b: if bb.is_empty() { 0 } else { ka * n },
        transpose_a,
        transpose_b,
    };
    Ok((dims, out))
}

/// Numpy broadcasting of two shapes, padded to 4-D: the output shape (at the larger rank) and, for
/// each operand, its element strides in the padded 4-D index space (0 on broadcast axes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Broadcast {
    pub out_shape: Vec<usize>,
    pub out4: [usize; 4],
    pub a_strides: [usize; 4],
    pub b_strides: [usize; 4],
}

pub(crate) fn broadcast(op: &'static str, a: &[usize], b: &[usize]) -> Result<Broadcast> {
    let rank = a.len().max(b.len());
    let pad = |s: &[usize]| {
        let mut p = [1usize; 4];
        p[4 - s.len()..].copy_from_slice(s);
        p
    };
    let (pa, pb) = (pad(a), pad(b));
    let mut out4 = [1usize; 4];
    for i in 0..4 {
        out4[i] = match (pa[i], pb[i]) {
            (x, y) if x == y => x,
            (1, y) => y,
            (x, 1) => x,
            _ => return Err(shape_err(op, format!("shapes {a:?} and {b:?} do not broadcast"))),
        };
    }
    let strides = |p: [usize; 4]| {
        let mut s = [0usize; 4];
        let mut acc = 1;
        for i in (0..4).rev() {
            s[i] = if p[i] == 1 { 0 } else { acc };
            acc *= p[i];
        }
        s
    };
    Ok(Broadcast { out_shape: out4[4 - rank..].to_vec(), out4, a_strides: strides(pa), b_strides: strides(pb) })
}

/// Rows and row length of a tensor seen as `[rows, last]`.
pub(crate) fn rows_last(shape: &[usize]) -> (usize, usize) {
    let last = *shape.last().unwrap_or(&1);
    let rows = numel(&shape[..shape.len().saturating_sub(1)]);
    (rows, last)
}

/// The output shape of a last-axis reduction.
pub(crate) fn reduced_shape(shape: &[usize]) -> Vec<usize> {
    if shape.len() == 1 { vec![1] } else { shape[..shape.len() - 1].to_vec() }
}

/// Checks a norm parameter (weight or bias) has shape `[last]`.
pub(crate) fn check_param(op: &'static str, what: &str, x: &[usize], p: &[usize]) -> Result<()> {
    let last = *x.last().unwrap_or(&0);
    if p != [last] {
        return Err(shape_err(op, format!("{what} must have shape [{last}] for input {x:?}, got {p:?}")));
    }
    Ok(())
}

/// `reshape`: same element count, rank 1..=4.
pub(crate) fn reshape_check(x: &[usize], to: &[usize]) -> Result<()> {
    check_shape("reshape", to)?;
    if numel(x) != numel(to) {
        return Err(shape_err("reshape", format!("{x:?} has {} elements, {to:?} has {}", numel(x), numel(to))));
    }
    Ok(())
}

/// `permute`: `axes` is a permutation of `0..rank`; returns the output shape (`out[i] = x[axes[i]]`).
pub(crate) fn permute_dims(x: &[usize], axes: &[usize]) -> Result<Vec<usize>> {
    let rank = x.len();
    let mut seen = [false; MAX_RANK];
    if axes.len() != rank || axes.iter().any(|&a| a >= rank || std::mem::replace(&mut seen[a], true)) {
        return Err(shape_err("permute", format!("axes {axes:?} are not a permutation of 0..{rank} for shape {x:?}")));
    }
    Ok(axes.iter().map(|&a| x[a]).collect())
}

/// Row-major element strides of `shape`.
pub(crate) fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

/// A copy along one axis, seen as `[outer, axis, inner]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct AxisSplit {
    pub outer: usize,
    pub inner: usize,
}

fn split(shape: &[usize], axis: usize) -> AxisSplit {
    AxisSplit { outer: numel(&shape[..axis]), inner: numel(&shape[axis + 1..]) }
}

/// `slice(x, axis, start, len)`: `start + len <= x[axis]`; returns the output shape and the split.
pub(crate) fn slice_dims(x: &[usize], axis: usize, start: usize, len: usize) -> Result<(Vec<usize>, AxisSplit)> {
    if axis >= x.len() {
        return Err(shape_err("slice", format!("axis {axis} is out of range for shape {x:?}")));
    }
    if start.checked_add(len).is_none_or(|end| end > x[axis]) {
        return Err(shape_err("slice", format!("[{start}, {start}+{len}) is outside axis {axis} of {x:?}")));
    }
    let mut out = x.to_vec();
    out[axis] = len;
    Ok((out, split(x, axis)))
}

/// `concat(a, b, axis)`: equal ranks, equal on every other axis; returns the output shape and the
/// split of the output.
pub(crate) fn concat_dims(a: &[usize], b: &[usize], axis: usize) -> Result<(Vec<usize>, AxisSplit)> {
    let same_elsewhere = a.len() == b.len() && a.iter().zip(b).enumerate().all(|(i, (x, y))| i == axis || x == y);
    if axis >= a.len() || !same_elsewhere {
        return Err(shape_err("concat", format!("cannot join {a:?} and {b:?} along axis {axis}")));
    }
    let mut out = a.to_vec();
    out[axis] = a[axis] + b[axis];
    check_shape("concat", &out)?;
    Ok((out.clone(), split(&out, axis)))
}

/// `append(cache, rows)`: rows joined to the cache along axis 0 in place; returns the new cache shape.
pub(crate) fn append_dims(cache: &[usize], rows: &[usize]) -> Result<Vec<usize>> {
    if cache.len() != rows.len() || cache[1..] != rows[1..] {
        return Err(shape_err("append", format!("rows {rows:?} do not fit cache {cache:?} (all axes but the first must match)")));
    }
    let mut out = cache.to_vec();
    out[0] += rows[0];
    check_shape("append", &out)?;
    Ok(out)
}

/// The error for a gather id outside the table's `0..rows` (a check on device values, which each
/// backend makes its own way, with one wording).
pub(crate) fn gather_id_err(id: i64, rows: usize) -> GpuError {
    shape_err("gather_rows", format!("id {id} is outside the table's 0..{rows} rows"))
}

/// `gather_rows(table [v, d], ids [...])`: returns the output shape `ids.shape + [d]` (rank <= 4).
pub(crate) fn gather_dims(table: &[usize], ids: &[usize]) -> Result<Vec<usize>> {
    if table.len() != 2 {
        return Err(shape_err("gather_rows", format!("the table must be 2-D, got {table:?}")));
    }
    let mut out = ids.to_vec();
    out.push(table[1]);
    check_shape("gather_rows", &out)?;
    Ok(out)
}

/// The geometry of `rope(x [.., t, h, d], pos0, theta, mode)`: `x` has rank 3 or 4, `d` is even.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RopeDims {
    /// Product of the axes before `t` (1 for rank 3).
    pub batch: usize,
    pub seq: usize,
    pub heads: usize,
    pub dim: usize,
}

pub(crate) fn rope_dims(x: &[usize]) -> Result<RopeDims> {
    if !(3..=4).contains(&x.len()) || !x[x.len() - 1].is_multiple_of(2) {
        return Err(shape_err("rope", format!("x must be [.., seq, heads, head_dim] with rank 3 or 4 and an even head_dim, got {x:?}")));
    }
    let r = x.len();
    Ok(RopeDims { batch: numel(&x[..r - 3]), seq: x[r - 3], heads: x[r - 2], dim: x[r - 1] })
}

/// The rotation table of `rope`: for each position `p` in `pos0..pos0 + seq` and pair `i < d/2`,
/// `(cos, sin)` of `p * theta^(-2i/d)`, computed in f64 and rounded to f32 on the host, so every
/// backend rotates with the same bits (the kernels only multiply and add). Layout: `[seq, d/2, 2]`.
pub fn rope_table(pos0: u32, seq: usize, dim: usize, theta: f32) -> Vec<f32> {
    let half = dim / 2;
    let mut out = Vec::with_capacity(seq * half * 2);
    for t in 0..seq {
        let p = (pos0 as u64 + t as u64) as f64;
        for i in 0..half {
            let freq = (theta as f64).powf(-2.0 * i as f64 / dim as f64);
            let (s, c) = (p * freq).sin_cos();
            out.push(c as f32);
            out.push(s as f32);
        }
    }
    out
}

/// The geometry of causal attention: `q [.., tq, hq, d]`, `k` and `v [.., tk, hkv, d]` with the same
/// leading axes, `hq` a multiple of `hkv` (grouped-query attention: query head `h` reads key/value
/// head `h / (hq / hkv)`), and `tk >= pos0 + tq` is not required: query `i` (absolute position
/// `pos0 + i`) attends keys `j <= pos0 + i` with `j < tk`. The output has `q`'s shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct AttentionDims {
    pub batch: usize,
    pub tq: usize,
    pub tk: usize,
    pub hq: usize,
    pub hkv: usize,
    pub dim: usize,
}

pub(crate) fn attention_dims(q: &[usize], k: &[usize], v: &[usize]) -> Result<AttentionDims> {
    let bad = |why: &str| shape_err("attention", format!("{why}: q {q:?}, k {k:?}, v {v:?}"));
    if !(3..=4).contains(&q.len()) || k.len() != q.len() || v != k {
        return Err(bad("q, k, v must be [.., seq, heads, head_dim] of one rank (3 or 4), with k and v equal"));
    }
    let r = q.len();
    if q[..r - 3] != k[..r - 3] || q[r - 1] != k[r - 1] {
        return Err(bad("leading axes and head_dim must match"));
    }
    let (hq, hkv) = (q[r - 2], k[r - 2]);
    if hkv == 0 || hq % hkv != 0 {
        return Err(bad("query heads must be a multiple of key/value heads"));
    }
    Ok(AttentionDims { batch: numel(&q[..r - 3]), tq: q[r - 3], tk: k[r - 3], hq, hkv, dim: q[r - 1] })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broadcast_shapes() {
        let b = broadcast("add", &[4, 1], &[1, 6]).unwrap();
        assert_eq!(b.out_shape, vec![4, 6]);
        assert_eq!(b.a_strides, [0, 0, 1, 0]);
        assert_eq!(b.b_strides, [0, 0, 0, 1]);
        assert!(broadcast("add", &[3], &[4]).is_err());
        assert_eq!(broadcast("add", &[2, 3, 4], &[4]).unwrap().out_shape, vec![2, 3, 4]);
    }

    #[test]
    fn matmul_shapes() {
        let (d, out) = matmul_dims(&[2, 9, 13], &[13, 11], false, false).unwrap();
        assert_eq!(out, vec![2, 9, 11]);
        assert_eq!((d.batch, d.m, d.n, d.k, d.stride_a, d.stride_b), (2, 9, 11, 13, 117, 0));
        let (_, out) = matmul_dims(&[5, 3], &[7, 5], true, true).unwrap();
        assert_eq!(out, vec![3, 7]);
        assert!(matmul_dims(&[3, 5], &[4, 7], false, false).is_err());
        assert!(matmul_dims(&[2, 3, 5], &[3, 5, 7], false, false).is_err());
        assert!(matmul_dims(&[5], &[5, 7], false, false).is_err());
    }

    #[test]
    fn layout_shapes() {
        assert_eq!(permute_dims(&[2, 3, 4], &[2, 0, 1]).unwrap(), vec![4, 2, 3]);
        assert!(permute_dims(&[2, 3], &[0, 0]).is_err());
        assert!(permute_dims(&[2, 3], &[0, 2]).is_err());
        assert_eq!(strides(&[2, 3, 4]), vec![12, 4, 1]);
        let (s, sp) = slice_dims(&[4, 5, 6], 1, 2, 3).unwrap();
        assert_eq!((s, sp), (vec![4, 3, 6], AxisSplit { outer: 4, inner: 6 }));
        assert!(slice_dims(&[4, 5], 1, 3, 3).is_err());
        assert!(slice_dims(&[4, 5], 2, 0, 0).is_err());
        assert_eq!(concat_dims(&[2, 3], &[2, 5], 1).unwrap().0, vec![2, 8]);
        assert!(concat_dims(&[2, 3], &[3, 5], 1).is_err());
        assert_eq!(append_dims(&[0, 2, 8], &[3, 2, 8]).unwrap(), vec![3, 2, 8]);
        assert!(append_dims(&[4, 2, 8], &[3, 1, 8]).is_err());
        assert_eq!(gather_dims(&[100, 16], &[2, 7]).unwrap(), vec![2, 7, 16]);
        assert!(gather_dims(&[100, 16], &[1, 1, 1, 1]).is_err());
        assert!(reshape_check(&[2, 6], &[3, 4]).is_ok());
        assert!(reshape_check(&[2, 6], &[5]).is_err());
        assert!(rope_dims(&[4, 2, 7]).is_err());
        assert_eq!(rope_dims(&[2, 4, 3, 8]).unwrap(), RopeDims { batch: 2, seq: 4, heads: 3, dim: 8 });
        let a = attention_dims(&[3, 8, 16], &[10, 2, 16], &[10, 2, 16]).unwrap();
        assert_eq!((a.tq, a.tk, a.hq, a.hkv, a.dim), (3, 10, 8, 2, 16));
        assert!(attention_dims(&[3, 8, 16], &[10, 3, 16], &[10, 3, 16]).is_err());
        assert!(attention_dims(&[3, 8, 16], &[10, 2, 16], &[9, 2, 16]).is_err());
    }

    #[test]
    fn rope_table_is_cos_sin() {
        let t = rope_table(5, 2, 4, 10000.0);
        assert_eq!(t.len(), 2 * 2 * 2);
        assert_eq!(t[0], (5.0f64).cos() as f32);
        assert_eq!(t[1], (5.0f64).sin() as f32);
        let f = 10000f64.powf(-0.5);
        assert_eq!(t[6], (6.0 * f).cos() as f32);
    }
}

//! Shape checks and geometry of the layout, gather, rotary and attention ops, shared by every
//! backend so the same misuse gets the same error everywhere.

use super::{Result, check_shape, numel, shape_err};

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
    let mut seen = [false; super::MAX_RANK];
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

/// How rotary embedding pairs the features of a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeMode {
    /// Features `(2i, 2i+1)` rotate together (GGML's "normal" mode, used by GGUF llama models).
    Interleaved,
    /// Features `(i, i + d/2)` rotate together (GPT-NeoX, Hugging Face llama).
    Neox,
}

impl RopeMode {
    /// The ABI code: 0 interleaved, 2 neox (GGML's numbering).
    pub fn from_code(code: i32) -> Option<Self> {
        match code {
            0 => Some(RopeMode::Interleaved),
            2 => Some(RopeMode::Neox),
            _ => None,
        }
    }
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

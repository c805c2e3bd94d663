//! The op vocabulary: every tensor op with its parameters ([`Op`]), the one place its operands are
//! checked ([`Op::plan`]: dtypes, then shapes), and what it makes and costs ([`Plan`]: the output's
//! shape and dtype, its storage bytes, the bytes it moves and its FLOPs).
//!
//! [`super::TensorOps::run`] (and `run_with`, which lets the caller admit the plan first) is the one
//! checked dispatch that every caller uses, the `ao_gpu` host module, model code, benches and tests
//! alike: it plans the op against its operands' metas and hands the backend a [`Planned`] op, whose
//! `Launch` carries the validated geometry the kernels need. Backends keep only the checks that
//! need device values (`gather`'s ids, device limits). Pricing is not here: the runtime turns a
//! plan's bytes and FLOPs into gas.
//!
//! Adding an op: a variant of [`Op`] with its name, arity and plan arm here (and its `Launch`),
//! one function per backend (`cpu`, `wgpu`, `cuda`) called from its `execute`, and its code in the
//! host ABI table (`runtime/host/gpu/abi.rs`, mirrored by include/ao_gpu.h).

use super::dtype::{DType, dtype_err, expect_dtype};
use super::shape::{
    AttentionDims, AxisSplit, Broadcast, MatmulDims, RopeDims, append_dims, attention_dims, broadcast, check_param, check_shape,
    concat_dims, gather_dims, matmul_dims, numel, permute_dims, reduced_shape, reshape_check, rope_dims, rows_last, shape_err, slice_dims,
};
use super::tensor::{Result, TensorId};

/// Elementwise ops on two tensors with numpy broadcasting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BinaryOp {
    Add,
    Sub,
    Mul,
    Div,
}

impl BinaryOp {
    pub fn name(self) -> &'static str {
        match self {
            BinaryOp::Add => "add",
            BinaryOp::Sub => "sub",
            BinaryOp::Mul => "mul",
            BinaryOp::Div => "div",
        }
    }
}

/// Elementwise ops on one tensor.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum UnaryOp {
    /// `x * factor`.
    Scale(f32),
    Relu,
    /// The tanh approximation: `0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))`.
    Gelu,
    /// `x / (1 + exp(-x))`.
    Silu,
    Tanh,
    Exp,
}

impl UnaryOp {
    pub fn name(self) -> &'static str {
        match self {
            UnaryOp::Scale(_) => "scale",
            UnaryOp::Relu => "relu",
            UnaryOp::Gelu => "gelu",
            UnaryOp::Silu => "silu",
            UnaryOp::Tanh => "tanh",
            UnaryOp::Exp => "exp",
        }
    }
}

/// Reductions over the last axis; the output drops that axis (a 1-D input gives shape `[1]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    Sum,
    Mean,
    Max,
    /// The first index of the maximum, as an i32 tensor; NaN compares as not greater.
    Argmax,
}

impl ReduceOp {
    pub fn name(self) -> &'static str {
        match self {
            ReduceOp::Sum => "sum_last",
            ReduceOp::Mean => "mean_last",
            ReduceOp::Max => "max_last",
            ReduceOp::Argmax => "argmax_last",
        }
    }
}

/// A tensor op with its parameters; its operands are tensors of one backend, in the order given.
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    /// Batched `a @ b` over the last two axes with f32 accumulation: `a` f32, `b` f32, f16 or a
    /// quantized type (stored `[n, k]`, so `transpose_b`).
    Matmul { transpose_a: bool, transpose_b: bool },
    /// f32 elementwise with numpy broadcasting.
    Binary(BinaryOp),
    /// f32 elementwise.
    Unary(UnaryOp),
    /// Softmax over the last axis.
    Softmax,
    /// `x / sqrt(mean(x^2) + eps) * weight`, weight of shape `[last]`.
    Rmsnorm { eps: f32 },
    /// `(x - mean) / sqrt(var + eps) * weight + bias` (biased variance), weight and bias `[last]`.
    Layernorm { eps: f32 },
    /// A reduction over the last axis (argmax gives i32).
    Reduce(ReduceOp),
    /// A converted copy: f32 <-> f16 (round to nearest even), f32 -> i32 (toward zero, saturating,
    /// NaN to 0), i32 -> f32, any quantized type -> f32 (dequantize), f32 -> a quantized type (GGUF's
    /// reference quantizer), and the identity.
    Cast(DType),
    /// The same data under another shape with the same element count (any dtype; quantized types
    /// keep a block-aligned last axis).
    Reshape(Vec<usize>),
    /// A transposed copy: output axis `i` is input axis `axes[i]` (unquantized types).
    Permute(Vec<usize>),
    /// A copy of `[start, start + len)` along `axis` (unquantized types).
    Slice { axis: usize, start: usize, len: usize },
    /// `a` then `b` along `axis`; same dtype (unquantized), equal other axes.
    Concat { axis: usize },
    /// Appends `rows` to `cache` along axis 0 in place: the output is the cache itself, grown
    /// (storage grows geometrically, so one row at a time costs amortized O(row)).
    Append,
    /// Embedding lookup: `table [v, d]` (f32, f16 or quantized), `ids` i32 of any shape; the output
    /// is f32 `ids.shape + [d]`. An id outside `0..v` is a `ShapeMismatch` error.
    Gather,
    /// Rotary position embedding of f32 `x [.., seq, heads, head_dim]`: row `t` is at position
    /// `pos0 + t`, pair `i` rotates by `pos * theta^(-2i/head_dim)` using [`super::rope_table`].
    Rope { pos0: u32, theta: f32, mode: RopeMode },
    /// Causal scaled-dot-product attention of f32 `q [.., tq, hq, d]` over `k`, `v [.., tk, hkv, d]`
    /// (grouped-query heads): query `i` at position `pos0 + i` attends keys `j <= pos0 + i`, `j < tk`.
    Attention { pos0: u32, scale: f32 },
}

impl Op {
    /// How many operands the op takes.
    pub fn arity(&self) -> usize {
        match self {
            Op::Unary(_) | Op::Softmax | Op::Reduce(_) | Op::Cast(_) | Op::Reshape(_) | Op::Permute(_) | Op::Slice { .. } => 1,
            Op::Rope { .. } => 1,
            Op::Matmul { .. } | Op::Binary(_) | Op::Rmsnorm { .. } | Op::Concat { .. } | Op::Append | Op::Gather => 2,
            Op::Layernorm { .. } | Op::Attention { .. } => 3,
        }
    }

    /// The name errors give.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Matmul { .. } => "matmul",
            Op::Binary(op) => op.name(),
            Op::Unary(op) => op.name(),
            Op::Softmax => "softmax_last",
            Op::Rmsnorm { .. } => "rmsnorm",
            Op::Layernorm { .. } => "layernorm",
            Op::Reduce(op) => op.name(),
            Op::Cast(_) => "cast",
            Op::Reshape(_) => "reshape",
            Op::Permute(_) => "permute",
            Op::Slice { .. } => "slice",
            Op::Concat { .. } => "concat",
            Op::Append => "append",
            Op::Gather => "gather_rows",
            Op::Rope { .. } => "rope",
            Op::Attention { .. } => "attention",
        }
    }
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
    /// GGML's numbering (0 normal, 2 neox), which the WGSL and CUDA kernels take as a parameter.
    pub fn ggml_code(self) -> u32 {
        match self {
            RopeMode::Interleaved => 0,
            RopeMode::Neox => 2,
        }
    }
}

/// The shape and dtype of a tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meta {
    pub shape: Vec<usize>,
    pub dtype: DType,
}

impl Meta {
    pub fn new(shape: Vec<usize>, dtype: DType) -> Self {
        Self { shape, dtype }
    }

    pub fn as_ref(&self) -> MetaRef<'_> {
        MetaRef { shape: &self.shape, dtype: self.dtype }
    }

    /// Storage bytes ([`DType::byte_len`]), with the rank and size checked.
    pub fn bytes(&self, op: &'static str) -> Result<u64> {
        self.as_ref().bytes(op)
    }
}

/// A borrowed [`Meta`]: what planning reads of an operand (no copy of its shape).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetaRef<'a> {
    pub shape: &'a [usize],
    pub dtype: DType,
}

impl MetaRef<'_> {
    /// Storage bytes ([`DType::byte_len`]), with the rank and size checked.
    pub fn bytes(&self, op: &'static str) -> Result<u64> {
        check_shape(op, self.shape)?;
        self.dtype.byte_len(op, self.shape).map(|b| b as u64)
    }

    /// The storage bytes of an existing tensor's meta (one that passed [`MetaRef::bytes`] when it
    /// was made), without checking it again.
    fn stored_bytes(&self) -> u64 {
        let elements: usize = self.shape.iter().product();
        (elements / self.dtype.block_len() * self.dtype.block_bytes()) as u64
    }

    pub fn to_owned(&self) -> Meta {
        Meta::new(self.shape.to_vec(), self.dtype)
    }
}

/// The most operands an op takes.
pub const MAX_OPERANDS: usize = 3;

/// What an op makes and what it costs, from its operands' metas alone.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub out: Meta,
    /// Storage bytes of the output.
    pub out_bytes: u64,
    /// Bytes the op moves: its operands and output, except where noted ([`Op::Gather`] reads only
    /// the rows it looks up; [`Op::Append`] reads and writes the rows once).
    pub bytes: u64,
    pub flops: u64,
    /// The geometry a backend executes.
    pub(crate) launch: Launch,
}

/// An op as the backends execute it: its parameters with the geometry [`Op::plan`] derived from
/// the operands' shapes. Made only by planning, so a backend never sees an unchecked operand.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Launch {
    Matmul {
        dims: MatmulDims,
        b: DType,
    },
    Binary {
        op: BinaryOp,
        bc: Broadcast,
    },
    Unary {
        op: UnaryOp,
    },
    /// Softmax over rows of `last` elements.
    Softmax {
        rows: usize,
        last: usize,
    },
    Rmsnorm {
        eps: f32,
        rows: usize,
        last: usize,
    },
    Layernorm {
        eps: f32,
        rows: usize,
        last: usize,
    },
    Reduce {
        op: ReduceOp,
        rows: usize,
        last: usize,
    },
    Cast {
        from: DType,
        to: DType,
    },
    Reshape,
    Permute {
        axes: Vec<usize>,
    },
    /// `split` is the input seen as `[outer, axis, inner]`.
    Slice {
        axis: usize,
        start: usize,
        len: usize,
        split: AxisSplit,
    },
    /// `split` is the output seen as `[outer, axis, inner]`.
    Concat {
        axis: usize,
        split: AxisSplit,
    },
    Append,
    /// A table of `rows` rows of `dim` elements.
    Gather {
        rows: usize,
        dim: usize,
    },
    Rope {
        pos0: u32,
        theta: f32,
        mode: RopeMode,
        dims: RopeDims,
    },
    Attention {
        pos0: u32,
        scale: f32,
        dims: AttentionDims,
    },
}

/// An op that [`super::TensorOps::run_with`] planned against the current metas of its operands: what
/// [`super::TensorBackend::execute`] takes. Only `run_with` makes one.
#[derive(Debug, Clone, Copy)]
pub struct Planned<'a> {
    pub(crate) plan: &'a Plan,
    /// Exactly the op's arity.
    pub(crate) inputs: &'a [TensorId],
}

impl Planned<'_> {
    /// Operand `i` (`i < arity`).
    pub(crate) fn x(&self, i: usize) -> TensorId {
        self.inputs[i]
    }

    /// The output's shape and dtype.
    pub(crate) fn out(&self) -> &Meta {
        &self.plan.out
    }

    pub(crate) fn launch(&self) -> &Launch {
        &self.plan.launch
    }
}

fn f32_operand(op: &'static str, what: &str, m: MetaRef<'_>) -> Result<()> {
    expect_dtype(op, what, m.dtype, DType::F32)
}

/// Refuses the block types (for the layout ops, which move single elements).
fn unquantized(op: &'static str, what: &str, m: MetaRef<'_>) -> Result<()> {
    if m.dtype.is_quantized() {
        return Err(dtype_err(op, format!("{what} must be an unquantized type (f32, f16 or i32), got {}", m.dtype)));
    }
    Ok(())
}

/// Whether [`Op::Cast`] converts `from` to `to`.
pub(crate) fn castable(from: DType, to: DType) -> bool {
    use DType::*;
    from == to
        || matches!((from, to), (F32, F16) | (F16, F32) | (F32, I32) | (I32, F32))
        || (from.is_quantized() && to == F32)
        || (from == F32 && to.is_quantized())
}

fn elements(shape: &[usize], per_element: u64) -> u64 {
    flops(Flops::Elementwise { elements: numel(shape), per_element })
}

impl Op {
    /// Checks the op against its operands' metas (exactly [`Op::arity`] of them) and plans its
    /// output, cost and launch. The order of checks is the same for every op: dtypes, then shapes.
    pub fn plan(&self, x: &[MetaRef<'_>]) -> Result<Plan> {
        let name = self.name();
        if x.len() != self.arity() {
            return Err(shape_err(name, format!("takes {} operands, got {}", self.arity(), x.len())));
        }
        let m = |i: usize| x[i];
        // Operands exist, so their shapes were checked when they were made.
        let in_bytes = x.iter().map(|t| t.stored_bytes()).fold(0u64, u64::saturating_add);
        let same = |i: usize| m(i).to_owned();
        let f32_out = |shape: Vec<usize>| Meta::new(shape, DType::F32);
        let (out, flops, bytes, launch): (Meta, u64, Option<u64>, Launch) = match self {
            Op::Matmul { transpose_a, transpose_b } => {
                f32_operand(name, "a", m(0))?;
                match m(1).dtype {
                    DType::I32 => return Err(dtype_err(name, "b must be f32, f16 or quantized, got i32")),
                    d if d.is_quantized() && !transpose_b => {
                        return Err(dtype_err(name, format!("{d} weights must be stored [n, k] (transpose_b = true)")));
                    }
                    _ => {}
                }
                let (d, shape) = matmul_dims(m(0).shape, m(1).shape, *transpose_a, *transpose_b)?;
                let f = flops(Flops::Matmul { batch: d.batch, m: d.m, n: d.n, k: d.k });
                (f32_out(shape), f, None, Launch::Matmul { dims: d, b: m(1).dtype })
            }
            Op::Binary(op) => {
                f32_operand(name, "a", m(0))?;
                f32_operand(name, "b", m(1))?;
                let bc = broadcast(name, m(0).shape, m(1).shape)?;
                let f = elements(&bc.out_shape, 1);
                (f32_out(bc.out_shape.clone()), f, None, Launch::Binary { op: *op, bc })
            }
            Op::Unary(op) => {
                f32_operand(name, "x", m(0))?;
                (same(0), elements(m(0).shape, unary_cost(*op)), None, Launch::Unary { op: *op })
            }
            Op::Softmax => {
                f32_operand(name, "x", m(0))?;
                let (rows, last) = rows_last(m(0).shape);
                (same(0), elements(m(0).shape, 8), None, Launch::Softmax { rows, last })
            }
            Op::Rmsnorm { eps } => {
                f32_operand(name, "x", m(0))?;
                f32_operand(name, "weight", m(1))?;
                check_param(name, "weight", m(0).shape, m(1).shape)?;
                let (rows, last) = rows_last(m(0).shape);
                (same(0), elements(m(0).shape, 4), None, Launch::Rmsnorm { eps: *eps, rows, last })
            }
            Op::Layernorm { eps } => {
                for (i, what) in ["x", "weight", "bias"].into_iter().enumerate() {
                    f32_operand(name, what, m(i))?;
                }
                check_param(name, "weight", m(0).shape, m(1).shape)?;
                check_param(name, "bias", m(0).shape, m(2).shape)?;
                let (rows, last) = rows_last(m(0).shape);
                (same(0), elements(m(0).shape, 8), None, Launch::Layernorm { eps: *eps, rows, last })
            }
            Op::Reduce(op) => {
                f32_operand(name, "x", m(0))?;
                let (rows, last) = rows_last(m(0).shape);
                if *op == ReduceOp::Argmax && last == 0 {
                    return Err(shape_err(name, format!("the last axis of {:?} is empty", m(0).shape)));
                }
                // Argmax gives i32 indices (< 2^30 by `check_shape`, so they fit).
                let dtype = if *op == ReduceOp::Argmax { DType::I32 } else { DType::F32 };
                let out = Meta::new(reduced_shape(m(0).shape), dtype);
                (out, elements(m(0).shape, 1), None, Launch::Reduce { op: *op, rows, last })
            }
            Op::Cast(to) => {
                let from = m(0).dtype;
                if !castable(from, *to) {
                    return Err(dtype_err(name, format!("cannot cast {from} to {to} (only to and from f32, and the identity)")));
                }
                (Meta::new(m(0).shape.to_vec(), *to), elements(m(0).shape, 2), None, Launch::Cast { from, to: *to })
            }
            Op::Reshape(shape) => {
                reshape_check(m(0).shape, shape)?;
                (Meta::new(shape.clone(), m(0).dtype), 0, None, Launch::Reshape)
            }
            Op::Permute(axes) => {
                unquantized(name, "x", m(0))?;
                let shape = permute_dims(m(0).shape, axes)?;
                (Meta::new(shape, m(0).dtype), 0, None, Launch::Permute { axes: axes.clone() })
            }
            Op::Slice { axis, start, len } => {
                unquantized(name, "x", m(0))?;
                let (shape, split) = slice_dims(m(0).shape, *axis, *start, *len)?;
                (Meta::new(shape, m(0).dtype), 0, None, Launch::Slice { axis: *axis, start: *start, len: *len, split })
            }
            Op::Concat { axis } => {
                unquantized(name, "a", m(0))?;
                expect_dtype(name, "b", m(1).dtype, m(0).dtype)?;
                let (shape, split) = concat_dims(m(0).shape, m(1).shape, *axis)?;
                (Meta::new(shape, m(0).dtype), 0, None, Launch::Concat { axis: *axis, split })
            }
            Op::Append => {
                unquantized(name, "cache", m(0))?;
                expect_dtype(name, "rows", m(1).dtype, m(0).dtype)?;
                let shape = append_dims(m(0).shape, m(1).shape)?;
                // The rows are read and written once; the cache itself is not moved (amortized).
                let rows = m(1).bytes(name)?;
                (Meta::new(shape, m(0).dtype), 0, Some(rows.saturating_mul(2)), Launch::Append)
            }
            Op::Gather => {
                if m(0).dtype == DType::I32 {
                    return Err(dtype_err(name, "the table must be f32, f16 or quantized, got i32"));
                }
                expect_dtype(name, "ids", m(1).dtype, DType::I32)?;
                let shape = gather_dims(m(0).shape, m(1).shape)?;
                // Only the rows looked up are read, not the whole table.
                let looked_up = numel(m(1).shape) as u64;
                let row_bytes = MetaRef { shape: &m(0).shape[1..], dtype: m(0).dtype }.bytes(name)?;
                let out_bytes = MetaRef { shape: &shape, dtype: DType::F32 }.bytes(name)?;
                let bytes = m(1).bytes(name)?.saturating_add(looked_up.saturating_mul(row_bytes)).saturating_add(out_bytes);
                let f = elements(&shape, 1);
                let launch = Launch::Gather { rows: m(0).shape[0], dim: m(0).shape[1] };
                (f32_out(shape), f, Some(bytes), launch)
            }
            Op::Rope { pos0, theta, mode } => {
                f32_operand(name, "x", m(0))?;
                let dims = rope_dims(m(0).shape)?;
                (same(0), elements(m(0).shape, 3), None, Launch::Rope { pos0: *pos0, theta: *theta, mode: *mode, dims })
            }
            Op::Attention { pos0, scale } => {
                for (i, what) in ["q", "k", "v"].into_iter().enumerate() {
                    f32_operand(name, what, m(i))?;
                }
                let d = attention_dims(m(0).shape, m(1).shape, m(2).shape)?;
                let f = flops(Flops::Attention { batch: d.batch, heads: d.hq, tq: d.tq, tk: d.tk, dim: d.dim, pos0: *pos0 });
                (same(0), f, None, Launch::Attention { pos0: *pos0, scale: *scale, dims: d })
            }
        };
        let out_bytes = out.bytes(name)?;
        let bytes = bytes.unwrap_or_else(|| in_bytes.saturating_add(out_bytes));
        Ok(Plan { out, out_bytes, bytes, flops, launch })
    }
}

/// The FLOPs an op is counted for, from shapes only.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Flops {
    /// `2 * batch * m * n * k`.
    Matmul { batch: usize, m: usize, n: usize, k: usize },
    /// `per_element * elements`.
    Elementwise { elements: usize, per_element: u64 },
    /// Causal attention: `batch * heads * keys * (4 * dim + 8)`, where `keys` is the number of
    /// (query, key) pairs one head attends, `sum over i < tq of min(pos0 + i + 1, tk)`.
    Attention { batch: usize, heads: usize, tq: usize, tk: usize, dim: usize, pos0: u32 },
}

/// See [`Flops`]: binary ops, scale, relu, reductions and gather 1 per element; cast 2; rope 3;
/// exp, tanh, silu and rmsnorm 4; gelu, softmax and layernorm 8; layout ops 0.
pub fn flops(f: Flops) -> u64 {
    match f {
        Flops::Matmul { batch, m, n, k } => {
            2u64.saturating_mul(batch as u64).saturating_mul(m as u64).saturating_mul(n as u64).saturating_mul(k as u64)
        }
        Flops::Elementwise { elements, per_element } => (elements as u64).saturating_mul(per_element),
        Flops::Attention { batch, heads, tq, tk, dim, pos0 } => {
            let pairs = attended_pairs(tq, tk, pos0);
            let per_pair = 4u128 * dim as u128 + 8;
            let total = (batch as u128).saturating_mul(heads as u128).saturating_mul(pairs).saturating_mul(per_pair);
            u64::try_from(total).unwrap_or(u64::MAX)
        }
    }
}

/// `sum over i < tq of min(pos0 + i + 1, tk)`: the keys the queries of one head attend.
fn attended_pairs(tq: usize, tk: usize, pos0: u32) -> u128 {
    let (tq, tk, pos0) = (tq as u128, tk as u128, pos0 as u128);
    // Queries i < m see pos0 + i + 1 <= tk keys; the rest see all tk.
    let m = tq.min(tk.saturating_sub(pos0));
    m * pos0 + m * (m + 1) / 2 + (tq - m) * tk
}

fn unary_cost(op: UnaryOp) -> u64 {
    match op {
        UnaryOp::Scale(_) | UnaryOp::Relu => 1,
        UnaryOp::Exp | UnaryOp::Tanh | UnaryOp::Silu => 4,
        UnaryOp::Gelu => 8,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::GpuError;

    /// The pair count by brute force over (query, key) pairs, against the closed form.
    #[test]
    fn attention_pairs_count_causal_keys() {
        for tq in 0..7usize {
            for tk in 0..9usize {
                for pos0 in 0..12u32 {
                    let brute = (0..tq).map(|i| (0..tk).filter(|&j| j <= pos0 as usize + i).count() as u128).sum::<u128>();
                    assert_eq!(attended_pairs(tq, tk, pos0), brute, "tq {tq} tk {tk} pos0 {pos0}");
                }
            }
        }
        // 2 batches x 3 heads, one query at position 4 over 5 keys of dim 8: 5 pairs x (32 + 8).
        assert_eq!(flops(Flops::Attention { batch: 2, heads: 3, tq: 1, tk: 5, dim: 8, pos0: 4 }), 6 * 5 * 40);
        assert_eq!(
            flops(Flops::Attention { batch: usize::MAX, heads: usize::MAX, tq: 1 << 30, tk: 1 << 30, dim: 1 << 20, pos0: 0 }),
            u64::MAX
        );
    }

    #[test]
    fn plans_check_dtypes_and_count_bytes() {
        let m = |shape: &[usize], dtype| Meta::new(shape.to_vec(), dtype);
        let f = |shape: &[usize]| m(shape, DType::F32);
        let w = m(&[64, 32], DType::Q4_1);
        let x = f(&[3, 32]);
        // Quantized weight, transposed: [3, 32] @ [64, 32]^T.
        let p = Op::Matmul { transpose_a: false, transpose_b: true }.plan(&[x.as_ref(), w.as_ref()]).unwrap();
        assert_eq!((p.out.shape.clone(), p.out.dtype, p.out_bytes), (vec![3, 64], DType::F32, 3 * 64 * 4));
        assert_eq!((p.bytes, p.flops), (384 + 1280 + 768, 2 * 3 * 64 * 32));
        // Dtype errors.
        let ids = m(&[5], DType::I32);
        let err = |r: Result<Plan>| r.unwrap_err();
        assert!(matches!(
            err(Op::Matmul { transpose_a: false, transpose_b: false }.plan(&[w.as_ref(), x.as_ref()])),
            GpuError::DType { .. }
        ));
        assert!(matches!(err(Op::Softmax.plan(&[ids.as_ref()])), GpuError::DType { .. }));
        assert!(matches!(err(Op::Permute(vec![1, 0]).plan(&[w.as_ref()])), GpuError::DType { .. }));
        assert!(matches!(err(Op::Cast(DType::Q8_0).plan(&[ids.as_ref()])), GpuError::DType { .. }));
        assert!(matches!(err(Op::Gather.plan(&[w.as_ref(), x.as_ref()])), GpuError::DType { .. }));
        assert!(matches!(err(Op::Reshape(vec![128, 16]).plan(&[w.as_ref()])), GpuError::DType { .. }), "blocks must stay whole");
        assert!(matches!(err(Op::Reshape(vec![7]).plan(&[ids.as_ref()])), GpuError::ShapeMismatch { .. }));
        // Gather reads only the looked-up rows: 5 ids (20 bytes) + 5 rows of 20 bytes + the [5, 32] output.
        let p = Op::Gather.plan(&[w.as_ref(), ids.as_ref()]).unwrap();
        assert_eq!((p.out.shape.clone(), p.bytes, p.flops), (vec![5, 32], 20 + 5 * 20 + 5 * 32 * 4, 5 * 32));
        // Append charges twice the rows, the quota follows the new size.
        let cache = f(&[4, 2, 8]);
        let rows = f(&[1, 2, 8]);
        let p = Op::Append.plan(&[cache.as_ref(), rows.as_ref()]).unwrap();
        assert_eq!((p.out.shape.clone(), p.out_bytes, p.bytes), (vec![5, 2, 8], 320, 128));
        assert!(castable(DType::Q4_0, DType::F32) && castable(DType::F32, DType::Q8_0) && !castable(DType::F16, DType::I32));
    }

    /// `run_with` plans from a fixed array of `MAX_OPERANDS` metas: no op may take more.
    #[test]
    fn every_op_fits_the_operand_array() {
        let ops = [
            Op::Matmul { transpose_a: false, transpose_b: false },
            Op::Binary(BinaryOp::Add),
            Op::Unary(UnaryOp::Relu),
            Op::Softmax,
            Op::Rmsnorm { eps: 0.0 },
            Op::Layernorm { eps: 0.0 },
            Op::Reduce(ReduceOp::Sum),
            Op::Cast(DType::F16),
            Op::Reshape(vec![1]),
            Op::Permute(vec![0]),
            Op::Slice { axis: 0, start: 0, len: 0 },
            Op::Concat { axis: 0 },
            Op::Append,
            Op::Gather,
            Op::Rope { pos0: 0, theta: 1.0, mode: RopeMode::Neox },
            Op::Attention { pos0: 0, scale: 1.0 },
        ];
        assert_eq!(ops.iter().map(Op::arity).max(), Some(MAX_OPERANDS));
    }

    /// The same misuse gets the same error whatever the op's path: a quantized `b` that is not
    /// transposed is refused by planning, before any backend sees it.
    #[test]
    fn one_wording_per_rule() {
        let w = Meta::new(vec![64, 32], DType::Q4_0);
        let x = Meta::new(vec![3, 64], DType::F32);
        let e = Op::Matmul { transpose_a: false, transpose_b: false }.plan(&[x.as_ref(), w.as_ref()]).unwrap_err();
        assert_eq!(e.to_string(), "dtype mismatch in matmul: q4_0 weights must be stored [n, k] (transpose_b = true)");
        let e = Op::Permute(vec![1, 0]).plan(&[w.as_ref()]).unwrap_err();
        assert_eq!(e.to_string(), "dtype mismatch in permute: x must be an unquantized type (f32, f16 or i32), got q4_0");
        assert!(matches!(Op::Softmax.plan(&[x.as_ref(), x.as_ref()]), Err(GpuError::ShapeMismatch { .. })), "arity");
    }
}

//! The CPU backend: the reference every other backend is tested against, and the last fallback.
//!
//! Reductions (sum, mean, softmax, norms, attention) and, in [`Determinism::Reproducible`] mode,
//! matmul sum each output sequentially in index order with a separate multiply and add
//! (`acc = acc + a * b`; Rust never contracts that into an FMA), exactly as the WGSL kernels in
//! `shaders/` do, so the two agree bitwise. Reproducible matmul still runs at SIMD speed: 32 outputs
//! are summed side by side in vector lanes (each lane its own sequential sum) over a tile of weight
//! columns packed (dequantized) once. Work is spread over all cores (rayon) by output rows, columns
//! or tiles only, so threading never changes a result. In [`Determinism::Fast`] mode matmul picks by
//! the number of rows (see the constants below `matmul_f32`): SIMD row dots (the fused quantized
//! dots of [`super::quant`] for one row), an FMA tile kernel, or `matrixmultiply` (weights as
//! dequantized tiles); softmax uses `f32::exp`. The elementwise exp, tanh, silu and gelu are the
//! portable functions of [`super::repro`] (`repro_exp_full`, `repro_tanh`, `repro_silu`, `repro_gelu`) in
//! reproducible mode, which the WGSL and CUDA kernels mirror bit for bit, and the standard library's
//! in fast mode.
//!
//! Dtypes: tensors keep their own element type (f32 and i32 as typed vectors, f16 and the GGUF block
//! types as their little-endian storage bytes). Arithmetic takes f32 only; f16 / quantized weights
//! enter through `matmul` (as `b`), `gather_rows` (the table) and `cast`. Quantized weights in
//! reproducible mode dequantize exactly as [`super::quant`] defines, so a quantized matmul is bitwise
//! `matmul_ordered` over the dequantized f32 matrix.
//!
//! Operands arrive checked ([`super::op`]); the one check left here needs values: gather's ids.
//!
//! Rooms: this file (storage and the backend), `matmul` (the matmul family), `kernels` (the
//! reference row kernels the shaders mirror, and the layout moves).

// `acc = acc + x` is spelled out to mirror the WGSL kernels line for line (Rust never contracts either form).
#![allow(clippy::assign_op_pattern)]

mod kernels;
mod matmul;
#[cfg(test)]
mod tests;

use std::sync::Arc;

use rayon::prelude::*;

use self::kernels::{
    argmax_row, attention_ref, concat_runs, layernorm_row, permute_elems, reduce_row, rmsnorm_row, rope_row, slice_runs, softmax_row,
    unary_f32,
};
use self::matmul::{matmul_f32, matmul_weights};
use super::backend::TensorBackend;
use super::dtype::{DType, HostTensor, RawTensor};
use super::op::{BinaryOp, Launch, Meta, MetaRef, Planned, ReduceOp, RopeMode, UnaryOp};
use super::quant;
use super::repro::repro_exp;
use super::shape::{AttentionDims, AxisSplit, Broadcast, MatmulDims, RopeDims, gather_id_err, numel, rope_table};
use super::tensor::{BackendKind, Determinism, GpuError, IdMap, Result, TensorId};

/// Storage of one tensor.
#[derive(Debug, Clone)]
enum Data {
    F32(Vec<f32>),
    I32(Vec<i32>),
    /// Little-endian storage bytes of an f16 or block-quantized tensor.
    Bytes(Vec<u8>),
}

impl Data {
    fn byte_len(&self) -> usize {
        match self {
            Data::F32(v) => v.len() * 4,
            Data::I32(v) => v.len() * 4,
            Data::Bytes(b) => b.len(),
        }
    }
}

/// A tensor: its dtype and shape, and storage shared (copy on write) between reshapes of it.
#[derive(Debug, Clone)]
struct Tensor {
    dtype: DType,
    shape: Vec<usize>,
    data: Arc<Data>,
}

impl Tensor {
    fn f32(shape: Vec<usize>, data: Vec<f32>) -> Self {
        Self { dtype: DType::F32, shape, data: Arc::new(Data::F32(data)) }
    }

    /// The values of an f32 tensor (planning checked the dtype).
    fn f32s(&self, op: &'static str) -> Result<&[f32]> {
        match &*self.data {
            Data::F32(v) => Ok(v),
            _ => Err(inconsistent(op)),
        }
    }

    /// The storage bytes of an f16 or quantized tensor.
    fn raw(&self, op: &'static str) -> Result<&[u8]> {
        match &*self.data {
            Data::Bytes(b) => Ok(b),
            _ => Err(inconsistent(op)),
        }
    }

    /// Every element as an f32 value (dequantizing).
    fn values(&self) -> Vec<f32> {
        match &*self.data {
            Data::F32(v) => v.clone(),
            Data::I32(v) => v.iter().map(|&x| x as f32).collect(),
            Data::Bytes(b) => {
                let mut out = vec![0.0; numel(&self.shape)];
                quant::dequantize_unchecked(self.dtype, b, &mut out);
                out
            }
        }
    }

    /// The little-endian storage bytes.
    fn bytes(&self) -> Vec<u8> {
        match &*self.data {
            Data::F32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            Data::I32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            Data::Bytes(b) => b.clone(),
        }
    }
}

/// Storage that does not match its dtype: an internal bug, reported rather than panicking.
fn inconsistent(op: &'static str) -> GpuError {
    GpuError::Device(format!("{op}: cpu tensor storage does not match its dtype"))
}

/// Tensors in host memory, keyed by handle.
#[derive(Debug)]
pub struct CpuBackend {
    determinism: Determinism,
    tensors: IdMap<Tensor>,
    next_id: u64,
}

impl CpuBackend {
    pub fn new(determinism: Determinism) -> Self {
        Self { determinism, tensors: IdMap::default(), next_id: 1 }
    }

    fn get(&self, id: TensorId) -> Result<&Tensor> {
        self.tensors.get(&id).ok_or(GpuError::UnknownTensor(id))
    }

    fn insert(&mut self, t: Tensor) -> TensorId {
        let id = TensorId(self.next_id);
        self.next_id += 1;
        self.tensors.insert(id, t);
        id
    }

    fn insert_f32(&mut self, shape: Vec<usize>, data: Vec<f32>) -> TensorId {
        self.insert(Tensor::f32(shape, data))
    }

    fn exp_fn(&self) -> fn(f32) -> f32 {
        match self.determinism {
            Determinism::Reproducible => repro_exp,
            Determinism::Fast => f32::exp,
        }
    }
}

impl TensorBackend for CpuBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Cpu
    }

    fn describe(&self) -> String {
        format!("cpu ({} threads)", rayon::current_num_threads())
    }

    fn determinism(&self) -> Determinism {
        self.determinism
    }

    fn upload(&mut self, t: &HostTensor) -> Result<TensorId> {
        t.check()?;
        Ok(self.insert_f32(t.shape.clone(), t.data.clone()))
    }

    fn upload_raw(&mut self, t: &RawTensor) -> Result<TensorId> {
        // The fields are public: check them again.
        let t = RawTensor::new(t.dtype, t.shape.clone(), t.bytes.clone())?;
        let data = match t.dtype {
            DType::F32 => Data::F32(t.bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()),
            DType::I32 => Data::I32(t.bytes.chunks_exact(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()),
            DType::F16 | DType::Q8_0 | DType::Q4_0 | DType::Q4_1 => Data::Bytes(t.bytes),
        };
        Ok(self.insert(Tensor { dtype: t.dtype, shape: t.shape, data: Arc::new(data) }))
    }

    fn read(&mut self, id: TensorId) -> Result<HostTensor> {
        let t = self.get(id)?;
        Ok(HostTensor { shape: t.shape.clone(), data: t.values() })
    }

    fn read_raw(&mut self, id: TensorId) -> Result<RawTensor> {
        let t = self.get(id)?;
        Ok(RawTensor { dtype: t.dtype, shape: t.shape.clone(), bytes: t.bytes() })
    }

    fn free(&mut self, id: TensorId) -> Result<()> {
        self.tensors.remove(&id).map(|_| ()).ok_or(GpuError::UnknownTensor(id))
    }

    fn meta(&self, id: TensorId) -> Result<MetaRef<'_>> {
        let t = self.get(id)?;
        Ok(MetaRef { shape: &t.shape, dtype: t.dtype })
    }

    fn execute(&mut self, p: Planned<'_>) -> Result<TensorId> {
        let out = p.out();
        match p.launch() {
            Launch::Matmul { dims, b } => self.op_matmul(p.x(0), p.x(1), dims, *b, out),
            Launch::Binary { op, bc } => self.op_binary(*op, p.x(0), p.x(1), bc),
            Launch::Unary { op } => self.op_unary(*op, p.x(0)),
            Launch::Softmax { last, .. } => self.op_rows(p.x(0), *last, Row::Softmax),
            Launch::Rmsnorm { eps, last, .. } => self.op_rows(p.x(0), *last, Row::Rmsnorm { weight: p.x(1), eps: *eps }),
            Launch::Layernorm { eps, last, .. } => self.op_rows(p.x(0), *last, Row::Layernorm { weight: p.x(1), bias: p.x(2), eps: *eps }),
            Launch::Reduce { op, rows, last } => self.op_reduce(*op, p.x(0), *rows, *last, out),
            Launch::Cast { from, to } => self.op_cast(p.x(0), *from, *to),
            Launch::Reshape => self.op_reshape(p.x(0), out),
            Launch::Permute { axes } => self.op_permute(p.x(0), axes, out),
            Launch::Slice { axis, start, len, split } => self.op_slice(p.x(0), *axis, *start, *len, *split, out),
            Launch::Concat { axis, split } => self.op_concat(p.x(0), p.x(1), *axis, *split, out),
            Launch::Append => self.op_append(p.x(0), p.x(1), out),
            Launch::Gather { rows, dim } => self.op_gather(p.x(0), p.x(1), *rows, *dim, out),
            Launch::Rope { pos0, theta, mode, dims } => self.op_rope(p.x(0), *pos0, *theta, *mode, dims),
            Launch::Attention { pos0, scale, dims } => self.op_attention([p.x(0), p.x(1), p.x(2)], *pos0, *scale, dims),
        }
    }

    fn live_bytes(&self) -> u64 {
        self.tensors.values().map(|t| t.data.byte_len() as u64).sum()
    }
}

/// The row ops over the last axis, with their parameter tensors.
#[derive(Clone, Copy)]
enum Row {
    Softmax,
    Rmsnorm { weight: TensorId, eps: f32 },
    Layernorm { weight: TensorId, bias: TensorId, eps: f32 },
}

/// The ops, on operands `Op::plan` checked: only storage kinds are matched here (an internal
/// inconsistency, never the caller's error) and gather's ids.
impl CpuBackend {
    fn op_matmul(&mut self, a: TensorId, b: TensorId, dims: &MatmulDims, b_dtype: DType, out: &Meta) -> Result<TensorId> {
        const OP: &str = "matmul";
        let (ta, tb) = (self.get(a)?, self.get(b)?);
        let av = ta.f32s(OP)?;
        let data = match b_dtype {
            DType::F32 => matmul_f32(self.determinism, dims, av, tb.f32s(OP)?),
            // [k, n] f16: the dot kernels want rows along k, so widen (exactly) and use the f32 path.
            DType::F16 if !dims.transpose_b => matmul_f32(self.determinism, dims, av, &tb.values()),
            dtype => matmul_weights(self.determinism, dims, av, dtype, tb.raw(OP)?),
        };
        Ok(self.insert_f32(out.shape.clone(), data))
    }

    fn op_binary(&mut self, op: BinaryOp, a: TensorId, b: TensorId, bc: &Broadcast) -> Result<TensorId> {
        let (ta, tb) = (self.get(a)?, self.get(b)?);
        let (av, bv) = (ta.f32s(op.name())?, tb.f32s(op.name())?);
        let f: fn(f32, f32) -> f32 = match op {
            BinaryOp::Add => |x, y| x + y,
            BinaryOp::Sub => |x, y| x - y,
            BinaryOp::Mul => |x, y| x * y,
            BinaryOp::Div => |x, y| x / y,
        };
        let [d0, d1, d2, d3] = bc.out4;
        let (sa, sb) = (bc.a_strides, bc.b_strides);
        let mut out = Vec::with_capacity(d0 * d1 * d2 * d3);
        for i0 in 0..d0 {
            for i1 in 0..d1 {
                for i2 in 0..d2 {
                    let oa = i0 * sa[0] + i1 * sa[1] + i2 * sa[2];
                    let ob = i0 * sb[0] + i1 * sb[1] + i2 * sb[2];
                    match (sa[3], sb[3]) {
                        (1, 1) => out.extend(av[oa..oa + d3].iter().zip(&bv[ob..ob + d3]).map(|(&x, &y)| f(x, y))),
                        (1, 0) => out.extend(av[oa..oa + d3].iter().map(|&x| f(x, bv[ob]))),
                        (0, 1) => out.extend(bv[ob..ob + d3].iter().map(|&y| f(av[oa], y))),
                        _ => out.extend((0..d3).map(|_| f(av[oa], bv[ob]))),
                    }
                }
            }
        }
        Ok(self.insert_f32(bc.out_shape.clone(), out))
    }

    fn op_unary(&mut self, op: UnaryOp, x: TensorId) -> Result<TensorId> {
        let t = self.get(x)?;
        let mut out = t.f32s(op.name())?.to_vec();
        let shape = t.shape.clone();
        let det = self.determinism;
        for_chunks(&mut out, 4096, |c| c.iter_mut().for_each(|v| *v = unary_f32(op, det, *v)));
        Ok(self.insert_f32(shape, out))
    }

    /// Softmax or a norm of every row of `last` elements.
    fn op_rows(&mut self, x: TensorId, last: usize, row_op: Row) -> Result<TensorId> {
        const OP: &str = "row op";
        let exp = self.exp_fn();
        let t = self.get(x)?;
        let mut out = t.f32s(OP)?.to_vec();
        match row_op {
            Row::Softmax => for_chunks(&mut out, last, |row| softmax_row(row, exp)),
            Row::Rmsnorm { weight, eps } => {
                let w = self.get(weight)?.f32s(OP)?;
                for_chunks(&mut out, last, |row| rmsnorm_row(row, w, eps));
            }
            Row::Layernorm { weight, bias, eps } => {
                let (w, b) = (self.get(weight)?.f32s(OP)?, self.get(bias)?.f32s(OP)?);
                for_chunks(&mut out, last, |row| layernorm_row(row, w, b, eps));
            }
        }
        let shape = t.shape.clone();
        Ok(self.insert_f32(shape, out))
    }

    fn op_reduce(&mut self, op: ReduceOp, x: TensorId, rows: usize, last: usize, out: &Meta) -> Result<TensorId> {
        let xv = self.get(x)?.f32s(op.name())?;
        let row = |r: usize| &xv[r * last..(r + 1) * last];
        let data = if op == ReduceOp::Argmax {
            // Indices are < 2^30 (`check_shape`), so they fit i32.
            Data::I32((0..rows).map(|r| argmax_row(row(r)) as i32).collect())
        } else {
            Data::F32((0..rows).map(|r| reduce_row(op, row(r))).collect())
        };
        Ok(self.insert(Tensor { dtype: out.dtype, shape: out.shape.clone(), data: Arc::new(data) }))
    }

    fn op_cast(&mut self, x: TensorId, from: DType, to: DType) -> Result<TensorId> {
        let t = self.get(x)?;
        let data = match (from, to) {
            // The identity shares the storage (copied on write by `append`).
            _ if from == to => Arc::clone(&t.data),
            (DType::F32, DType::I32) => Arc::new(Data::I32(t.f32s("cast")?.iter().map(|&x| x as i32).collect())),
            (DType::F32, _) => Arc::new(Data::Bytes(quant::quantize(to, t.f32s("cast")?)?)),
            _ => Arc::new(Data::F32(t.values())),
        };
        let shape = t.shape.clone();
        Ok(self.insert(Tensor { dtype: to, shape, data }))
    }

    fn op_reshape(&mut self, x: TensorId, out: &Meta) -> Result<TensorId> {
        let data = Arc::clone(&self.get(x)?.data);
        Ok(self.insert(Tensor { dtype: out.dtype, shape: out.shape.clone(), data }))
    }

    fn op_permute(&mut self, x: TensorId, axes: &[usize], out: &Meta) -> Result<TensorId> {
        let t = self.get(x)?;
        let data = match &*t.data {
            Data::F32(v) => Data::F32(permute_elems(v, &t.shape, axes)),
            Data::I32(v) => Data::I32(permute_elems(v, &t.shape, axes)),
            Data::Bytes(b) => Data::Bytes(permute_elems(b.as_chunks::<2>().0, &t.shape, axes).into_flattened()),
        };
        Ok(self.insert(Tensor { dtype: out.dtype, shape: out.shape.clone(), data: Arc::new(data) }))
    }

    fn op_slice(&mut self, x: TensorId, axis: usize, start: usize, len: usize, sp: AxisSplit, out: &Meta) -> Result<TensorId> {
        let t = self.get(x)?;
        let run = |inner: usize| (t.shape[axis] * inner, start * inner, len * inner);
        let data = match &*t.data {
            Data::F32(v) => Data::F32(slice_runs(v, sp.outer, run(sp.inner))),
            Data::I32(v) => Data::I32(slice_runs(v, sp.outer, run(sp.inner))),
            Data::Bytes(b) => Data::Bytes(slice_runs(b, sp.outer, run(sp.inner * 2))),
        };
        Ok(self.insert(Tensor { dtype: out.dtype, shape: out.shape.clone(), data: Arc::new(data) }))
    }

    fn op_concat(&mut self, a: TensorId, b: TensorId, axis: usize, sp: AxisSplit, out: &Meta) -> Result<TensorId> {
        let (ta, tb) = (self.get(a)?, self.get(b)?);
        let (la, lb) = (ta.shape[axis], tb.shape[axis]);
        let data = match (&*ta.data, &*tb.data) {
            (Data::F32(x), Data::F32(y)) => Data::F32(concat_runs(x, y, sp.outer, la * sp.inner, lb * sp.inner)),
            (Data::I32(x), Data::I32(y)) => Data::I32(concat_runs(x, y, sp.outer, la * sp.inner, lb * sp.inner)),
            (Data::Bytes(x), Data::Bytes(y)) => Data::Bytes(concat_runs(x, y, sp.outer, la * sp.inner * 2, lb * sp.inner * 2)),
            _ => return Err(inconsistent("concat")),
        };
        Ok(self.insert(Tensor { dtype: out.dtype, shape: out.shape.clone(), data: Arc::new(data) }))
    }

    fn op_append(&mut self, cache: TensorId, rows: TensorId, out: &Meta) -> Result<TensorId> {
        // Row-major storage: joining along axis 0 is appending the flat data. The rows are copied
        // out first (they may be the cache itself); the cache's Vec grows geometrically in place
        // (copied once first if a reshape still shares it).
        let extra = Arc::clone(&self.get(rows)?.data);
        let tc = self.tensors.get_mut(&cache).ok_or(GpuError::UnknownTensor(cache))?;
        match (Arc::make_mut(&mut tc.data), &*extra) {
            (Data::F32(c), Data::F32(r)) => c.extend_from_slice(r),
            (Data::I32(c), Data::I32(r)) => c.extend_from_slice(r),
            (Data::Bytes(c), Data::Bytes(r)) => c.extend_from_slice(r),
            _ => return Err(inconsistent("append")),
        }
        tc.shape = out.shape.clone();
        Ok(cache)
    }

    fn op_gather(&mut self, table: TensorId, ids: TensorId, v: usize, d: usize, out: &Meta) -> Result<TensorId> {
        const OP: &str = "gather_rows";
        let (tt, ti) = (self.get(table)?, self.get(ids)?);
        let Data::I32(idv) = &*ti.data else { return Err(inconsistent(OP)) };
        let rows: Vec<usize> = idv
            .iter()
            .map(|&id| usize::try_from(id).ok().filter(|&r| r < v).ok_or_else(|| gather_id_err(id.into(), v)))
            .collect::<Result<_>>()?;
        let mut data = vec![0.0f32; rows.len() * d];
        if d > 0 {
            match &*tt.data {
                Data::F32(tv) => {
                    for (o, &r) in data.chunks_exact_mut(d).zip(&rows) {
                        o.copy_from_slice(&tv[r * d..(r + 1) * d]);
                    }
                }
                Data::Bytes(tb) => {
                    let row_bytes = tt.dtype.byte_len(OP, &[d])?;
                    for (o, &r) in data.chunks_exact_mut(d).zip(&rows) {
                        quant::dequantize_unchecked(tt.dtype, &tb[r * row_bytes..(r + 1) * row_bytes], o);
                    }
                }
                Data::I32(_) => return Err(inconsistent(OP)),
            }
        }
        Ok(self.insert_f32(out.shape.clone(), data))
    }

    fn op_rope(&mut self, x: TensorId, pos0: u32, theta: f32, mode: RopeMode, d: &RopeDims) -> Result<TensorId> {
        let t = self.get(x)?;
        let table = rope_table(pos0, d.seq, d.dim, theta);
        let mut out = t.f32s("rope")?.to_vec();
        if d.dim > 0 {
            for (r, row) in out.chunks_exact_mut(d.dim).enumerate() {
                let pos = (r / d.heads) % d.seq;
                rope_row(row, &table[pos * d.dim..(pos + 1) * d.dim], mode);
            }
        }
        let shape = t.shape.clone();
        Ok(self.insert_f32(shape, out))
    }

    fn op_attention(&mut self, [q, k, v]: [TensorId; 3], pos0: u32, scale: f32, dims: &AttentionDims) -> Result<TensorId> {
        const OP: &str = "attention";
        let exp = self.exp_fn();
        let (tq, tk, tv) = (self.get(q)?, self.get(k)?, self.get(v)?);
        let out = attention_ref(dims, tq.f32s(OP)?, tk.f32s(OP)?, tv.f32s(OP)?, pos0, scale, exp);
        let shape = tq.shape.clone();
        Ok(self.insert_f32(shape, out))
    }
}

// ---- threading ----

/// Runs `f` on each `chunk`-sized piece of `data` (the last may be shorter), in parallel when there
/// is enough work. A `chunk` of 0 (an empty last axis) does nothing.
pub(super) fn for_chunks(data: &mut [f32], chunk: usize, f: impl Fn(&mut [f32]) + Sync + Send) {
    if chunk == 0 || data.is_empty() {
        return;
    }
    if data.len() < PAR_MIN_ELEMS {
        data.chunks_mut(chunk).for_each(f);
    } else {
        let per_task = (PAR_MIN_ELEMS / 4 / chunk).max(1);
        data.par_chunks_mut(chunk).with_min_len(per_task).for_each(f);
    }
}

/// Below this many elements, elementwise and row ops stay on the calling thread.
pub(super) const PAR_MIN_ELEMS: usize = 1 << 15;

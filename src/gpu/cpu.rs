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
//! portable functions of [`super`] (`repro_exp_full`, `repro_tanh`, `repro_silu`, `repro_gelu`) in
//! reproducible mode, which the WGSL and CUDA kernels mirror bit for bit, and the standard library's
//! in fast mode.
//!
//! Dtypes: tensors keep their own element type (f32 and i32 as typed vectors, f16 and the GGUF block
//! types as their little-endian storage bytes). Arithmetic takes f32 only; f16 / quantized weights
//! enter through `matmul` (as `b`), `gather_rows` (the table) and `cast`. Quantized weights in
//! reproducible mode dequantize exactly as [`super::quant`] defines, so a quantized matmul is bitwise
//! `matmul_ordered` over the dequantized f32 matrix.
//!
//! Errors are checked in one order, which the other backends follow: unknown handles, then dtypes,
//! then shapes, then values (gather ids).

// `acc = acc + x` is spelled out to mirror the WGSL kernels line for line (Rust never contracts either form).
#![allow(clippy::assign_op_pattern)]

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

use rayon::prelude::*;

use super::dtype::{dtype_err, expect_dtype};
use super::layout::{
    AttentionDims, append_dims, attention_dims, concat_dims, gather_dims, permute_dims, reshape_check, rope_dims, slice_dims, strides,
};
use super::quant;
use super::{
    BackendKind, BinaryOp, DType, Determinism, GpuError, HostTensor, MatmulDims, RawTensor, ReduceOp, Result, RopeMode, TensorBackend,
    TensorId, UnaryOp, broadcast, check_param, check_shape, matmul_dims, numel, reduced_shape, repro_exp, repro_exp_full, repro_gelu,
    repro_silu, repro_tanh, rope_table, rows_last, shape_err,
};

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

    /// The f32 values of an f32 operand (`what` of `op`), or a dtype error.
    fn f32s(&self, op: &'static str, what: &str) -> Result<&[f32]> {
        expect_dtype(op, what, self.dtype, DType::F32)?;
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

    /// Refuses the block types (for the layout ops, which move single elements).
    fn unquantized(&self, op: &'static str, what: &str) -> Result<()> {
        if self.dtype.is_quantized() {
            return Err(dtype_err(op, format!("{what} must be an unquantized type (f32, f16 or i32), got {}", self.dtype)));
        }
        Ok(())
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
    tensors: HashMap<TensorId, Tensor>,
    next_id: u64,
}

impl CpuBackend {
    pub fn new(determinism: Determinism) -> Self {
        Self { determinism, tensors: HashMap::new(), next_id: 1 }
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

    fn read(&mut self, id: TensorId) -> Result<HostTensor> {
        let t = self.get(id)?;
        Ok(HostTensor { shape: t.shape.clone(), data: t.values() })
    }

    fn free(&mut self, id: TensorId) -> Result<()> {
        self.tensors.remove(&id).map(|_| ()).ok_or(GpuError::UnknownTensor(id))
    }

    fn shape(&self, id: TensorId) -> Result<Vec<usize>> {
        Ok(self.get(id)?.shape.clone())
    }

    fn dtype(&self, id: TensorId) -> Result<DType> {
        Ok(self.get(id)?.dtype)
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

    fn read_raw(&mut self, id: TensorId) -> Result<RawTensor> {
        let t = self.get(id)?;
        Ok(RawTensor { dtype: t.dtype, shape: t.shape.clone(), bytes: t.bytes() })
    }

    fn matmul(&mut self, a: TensorId, b: TensorId, transpose_a: bool, transpose_b: bool) -> Result<TensorId> {
        const OP: &str = "matmul";
        let (ta, tb) = (self.get(a)?, self.get(b)?);
        let av = ta.f32s(OP, "a")?;
        match tb.dtype {
            DType::I32 => return Err(dtype_err(OP, "b must be f32, f16 or quantized, got i32")),
            d if d.is_quantized() && !transpose_b => {
                return Err(dtype_err(OP, format!("a {d} b must be transposed ([n, k] rows with blocks along k)")));
            }
            _ => {}
        }
        let (dims, out_shape) = matmul_dims(&ta.shape, &tb.shape, transpose_a, transpose_b)?;
        let out = match tb.dtype {
            DType::F32 => {
                let bv = tb.f32s(OP, "b")?;
                matmul_f32(self.determinism, &dims, av, bv)
            }
            DType::F16 if !transpose_b => {
                // [k, n] f16: the dot kernels want rows along k, so widen (exactly) and use the f32 path.
                matmul_f32(self.determinism, &dims, av, &tb.values())
            }
            dtype => matmul_weights(self.determinism, &dims, av, dtype, tb.raw(OP)?),
        };
        Ok(self.insert_f32(out_shape, out))
    }

    fn binary(&mut self, op: BinaryOp, a: TensorId, b: TensorId) -> Result<TensorId> {
        let (ta, tb) = (self.get(a)?, self.get(b)?);
        let (av, bv) = (ta.f32s(op.name(), "a")?, tb.f32s(op.name(), "b")?);
        let bc = broadcast(op.name(), &ta.shape, &tb.shape)?;
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
        Ok(self.insert_f32(bc.out_shape, out))
    }

    fn unary(&mut self, op: UnaryOp, x: TensorId) -> Result<TensorId> {
        let t = self.get(x)?;
        let mut out = t.f32s(op.name(), "x")?.to_vec();
        let shape = t.shape.clone();
        let det = self.determinism;
        for_chunks(&mut out, 4096, |c| c.iter_mut().for_each(|v| *v = unary_f32(op, det, *v)));
        Ok(self.insert_f32(shape, out))
    }

    fn softmax_last(&mut self, x: TensorId) -> Result<TensorId> {
        let exp = self.exp_fn();
        let t = self.get(x)?;
        let mut out = t.f32s("softmax_last", "x")?.to_vec();
        let (_, last) = rows_last(&t.shape);
        let shape = t.shape.clone();
        for_chunks(&mut out, last, |row| softmax_row(row, exp));
        Ok(self.insert_f32(shape, out))
    }

    fn rmsnorm(&mut self, x: TensorId, weight: TensorId, eps: f32) -> Result<TensorId> {
        const OP: &str = "rmsnorm";
        let (t, w) = (self.get(x)?, self.get(weight)?);
        let (xv, wv) = (t.f32s(OP, "x")?, w.f32s(OP, "weight")?);
        check_param(OP, "weight", &t.shape, &w.shape)?;
        let (_, last) = rows_last(&t.shape);
        let mut out = xv.to_vec();
        for_chunks(&mut out, last, |row| rmsnorm_row(row, wv, eps));
        let shape = t.shape.clone();
        Ok(self.insert_f32(shape, out))
    }

    fn layernorm(&mut self, x: TensorId, weight: TensorId, bias: TensorId, eps: f32) -> Result<TensorId> {
        const OP: &str = "layernorm";
        let (t, w, b) = (self.get(x)?, self.get(weight)?, self.get(bias)?);
        let (xv, wv, bv) = (t.f32s(OP, "x")?, w.f32s(OP, "weight")?, b.f32s(OP, "bias")?);
        check_param(OP, "weight", &t.shape, &w.shape)?;
        check_param(OP, "bias", &t.shape, &b.shape)?;
        let (_, last) = rows_last(&t.shape);
        let mut out = xv.to_vec();
        for_chunks(&mut out, last, |row| layernorm_row(row, wv, bv, eps));
        let shape = t.shape.clone();
        Ok(self.insert_f32(shape, out))
    }

    fn reduce_last(&mut self, op: ReduceOp, x: TensorId) -> Result<TensorId> {
        let t = self.get(x)?;
        let xv = t.f32s(op.name(), "x")?;
        let (rows, last) = rows_last(&t.shape);
        if op == ReduceOp::Argmax && last == 0 {
            return Err(shape_err("argmax_last", format!("the last axis of {:?} is empty", t.shape)));
        }
        let out_shape = reduced_shape(&t.shape);
        check_shape(op.name(), &out_shape)?;
        let row = |r: usize| &xv[r * last..(r + 1) * last];
        let data = if op == ReduceOp::Argmax {
            // Indices are < 2^30 (check_shape), so they fit i32.
            Data::I32((0..rows).map(|r| argmax_row(row(r)) as i32).collect())
        } else {
            Data::F32((0..rows).map(|r| reduce_row(op, row(r))).collect())
        };
        let dtype = if op == ReduceOp::Argmax { DType::I32 } else { DType::F32 };
        Ok(self.insert(Tensor { dtype, shape: out_shape, data: Arc::new(data) }))
    }

    fn cast(&mut self, x: TensorId, to: DType) -> Result<TensorId> {
        const OP: &str = "cast";
        let t = self.get(x)?;
        let from = t.dtype;
        let data = match (from, to) {
            // The identity shares the storage (copied on write by `append`).
            _ if from == to => {
                let t = Tensor { dtype: to, shape: t.shape.clone(), data: Arc::clone(&t.data) };
                return Ok(self.insert(t));
            }
            (DType::F32, _) => {
                to.byte_len(OP, &t.shape)?;
                let v = t.f32s(OP, "x")?;
                match to {
                    DType::I32 => Data::I32(v.iter().map(|&x| x as i32).collect()),
                    _ => Data::Bytes(quant::quantize(to, v)?),
                }
            }
            (_, DType::F32) => Data::F32(t.values()),
            _ => return Err(dtype_err(OP, format!("cannot cast {from} to {to} (only to and from f32, and the identity)"))),
        };
        let shape = t.shape.clone();
        Ok(self.insert(Tensor { dtype: to, shape, data: Arc::new(data) }))
    }

    fn reshape(&mut self, x: TensorId, shape: &[usize]) -> Result<TensorId> {
        let t = self.get(x)?;
        reshape_check(&t.shape, shape)?;
        t.dtype.byte_len("reshape", shape)?;
        let t = Tensor { dtype: t.dtype, shape: shape.to_vec(), data: Arc::clone(&t.data) };
        Ok(self.insert(t))
    }

    fn permute(&mut self, x: TensorId, axes: &[usize]) -> Result<TensorId> {
        const OP: &str = "permute";
        let t = self.get(x)?;
        t.unquantized(OP, "x")?;
        let out_shape = permute_dims(&t.shape, axes)?;
        let data = match &*t.data {
            Data::F32(v) => Data::F32(permute_elems(v, &t.shape, axes)),
            Data::I32(v) => Data::I32(permute_elems(v, &t.shape, axes)),
            Data::Bytes(b) => Data::Bytes(permute_elems(b.as_chunks::<2>().0, &t.shape, axes).into_flattened()),
        };
        Ok(self.insert(Tensor { dtype: t.dtype, shape: out_shape, data: Arc::new(data) }))
    }

    fn slice(&mut self, x: TensorId, axis: usize, start: usize, len: usize) -> Result<TensorId> {
        const OP: &str = "slice";
        let t = self.get(x)?;
        t.unquantized(OP, "x")?;
        let (out_shape, sp) = slice_dims(&t.shape, axis, start, len)?;
        let run = |inner: usize| (t.shape[axis] * inner, start * inner, len * inner);
        let data = match &*t.data {
            Data::F32(v) => Data::F32(slice_runs(v, sp.outer, run(sp.inner))),
            Data::I32(v) => Data::I32(slice_runs(v, sp.outer, run(sp.inner))),
            Data::Bytes(b) => Data::Bytes(slice_runs(b, sp.outer, run(sp.inner * 2))),
        };
        Ok(self.insert(Tensor { dtype: t.dtype, shape: out_shape, data: Arc::new(data) }))
    }

    fn concat(&mut self, a: TensorId, b: TensorId, axis: usize) -> Result<TensorId> {
        const OP: &str = "concat";
        let (ta, tb) = (self.get(a)?, self.get(b)?);
        ta.unquantized(OP, "a")?;
        expect_dtype(OP, "b", tb.dtype, ta.dtype)?;
        let (out_shape, sp) = concat_dims(&ta.shape, &tb.shape, axis)?;
        let (la, lb) = (ta.shape[axis], tb.shape[axis]);
        let data = match (&*ta.data, &*tb.data) {
            (Data::F32(x), Data::F32(y)) => Data::F32(concat_runs(x, y, sp.outer, la * sp.inner, lb * sp.inner)),
            (Data::I32(x), Data::I32(y)) => Data::I32(concat_runs(x, y, sp.outer, la * sp.inner, lb * sp.inner)),
            (Data::Bytes(x), Data::Bytes(y)) => Data::Bytes(concat_runs(x, y, sp.outer, la * sp.inner * 2, lb * sp.inner * 2)),
            _ => return Err(inconsistent(OP)),
        };
        Ok(self.insert(Tensor { dtype: ta.dtype, shape: out_shape, data: Arc::new(data) }))
    }

    fn append(&mut self, cache: TensorId, rows: TensorId) -> Result<()> {
        const OP: &str = "append";
        let (tc, tr) = (self.get(cache)?, self.get(rows)?);
        tc.unquantized(OP, "cache")?;
        expect_dtype(OP, "rows", tr.dtype, tc.dtype)?;
        let new_shape = append_dims(&tc.shape, &tr.shape)?;
        // Row-major storage: joining along axis 0 is appending the flat data. The rows are copied
        // out first (they may be the cache itself); the cache's Vec grows geometrically in place
        // (copied once first if a reshape still shares it).
        let extra = Arc::clone(&tr.data);
        let Some(tc) = self.tensors.get_mut(&cache) else { return Err(GpuError::UnknownTensor(cache)) };
        match (Arc::make_mut(&mut tc.data), &*extra) {
            (Data::F32(c), Data::F32(r)) => c.extend_from_slice(r),
            (Data::I32(c), Data::I32(r)) => c.extend_from_slice(r),
            (Data::Bytes(c), Data::Bytes(r)) => c.extend_from_slice(r),
            _ => return Err(inconsistent(OP)),
        }
        tc.shape = new_shape;
        Ok(())
    }

    fn gather_rows(&mut self, table: TensorId, ids: TensorId) -> Result<TensorId> {
        const OP: &str = "gather_rows";
        let (tt, ti) = (self.get(table)?, self.get(ids)?);
        if tt.dtype == DType::I32 {
            return Err(dtype_err(OP, "the table must be f32, f16 or quantized, got i32"));
        }
        expect_dtype(OP, "ids", ti.dtype, DType::I32)?;
        let out_shape = gather_dims(&tt.shape, &ti.shape)?;
        let Data::I32(idv) = &*ti.data else { return Err(inconsistent(OP)) };
        let (v, d) = (tt.shape[0], tt.shape[1]);
        let rows: Vec<usize> = idv
            .iter()
            .enumerate()
            .map(|(i, &id)| {
                usize::try_from(id)
                    .ok()
                    .filter(|&r| r < v)
                    .ok_or_else(|| shape_err(OP, format!("id {id} at index {i} is outside the table's 0..{v} rows")))
            })
            .collect::<Result<_>>()?;
        let mut out = vec![0.0f32; rows.len() * d];
        if d > 0 {
            match &*tt.data {
                Data::F32(tv) => {
                    for (o, &r) in out.chunks_exact_mut(d).zip(&rows) {
                        o.copy_from_slice(&tv[r * d..(r + 1) * d]);
                    }
                }
                Data::Bytes(tb) => {
                    let row_bytes = tt.dtype.byte_len(OP, &[d])?;
                    for (o, &r) in out.chunks_exact_mut(d).zip(&rows) {
                        quant::dequantize_unchecked(tt.dtype, &tb[r * row_bytes..(r + 1) * row_bytes], o);
                    }
                }
                Data::I32(_) => return Err(inconsistent(OP)),
            }
        }
        Ok(self.insert_f32(out_shape, out))
    }

    fn rope(&mut self, x: TensorId, pos0: u32, theta: f32, mode: RopeMode) -> Result<TensorId> {
        const OP: &str = "rope";
        let t = self.get(x)?;
        let xv = t.f32s(OP, "x")?;
        let d = rope_dims(&t.shape)?;
        let table = rope_table(pos0, d.seq, d.dim, theta);
        let mut out = xv.to_vec();
        if d.dim > 0 {
            for (r, row) in out.chunks_exact_mut(d.dim).enumerate() {
                let pos = (r / d.heads) % d.seq;
                rope_row(row, &table[pos * d.dim..(pos + 1) * d.dim], mode);
            }
        }
        let shape = t.shape.clone();
        Ok(self.insert_f32(shape, out))
    }

    fn attention(&mut self, q: TensorId, k: TensorId, v: TensorId, pos0: u32, scale: f32) -> Result<TensorId> {
        const OP: &str = "attention";
        let exp = self.exp_fn();
        let (tq, tk, tv) = (self.get(q)?, self.get(k)?, self.get(v)?);
        let (qv, kv, vv) = (tq.f32s(OP, "q")?, tk.f32s(OP, "k")?, tv.f32s(OP, "v")?);
        let dims = attention_dims(&tq.shape, &tk.shape, &tv.shape)?;
        let out = attention_ref(&dims, qv, kv, vv, pos0, scale, exp);
        let shape = tq.shape.clone();
        Ok(self.insert_f32(shape, out))
    }

    fn live_bytes(&self) -> u64 {
        self.tensors.values().map(|t| t.data.byte_len() as u64).sum()
    }
}

// ---- threading ----

/// Runs `f` on each `chunk`-sized piece of `data` (the last may be shorter), in parallel when there
/// is enough work. A `chunk` of 0 (an empty last axis) does nothing.
fn for_chunks(data: &mut [f32], chunk: usize, f: impl Fn(&mut [f32]) + Sync + Send) {
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
const PAR_MIN_ELEMS: usize = 1 << 15;

// ---- matmul ----

fn matmul_f32(det: Determinism, d: &MatmulDims, a: &[f32], b: &[f32]) -> Vec<f32> {
    match det {
        Determinism::Reproducible => matmul_ordered(d, a, b),
        Determinism::Fast if d.m < SMALL_M => matmul_small(d, a, b),
        Determinism::Fast if d.m < GEMM_MIN_ROWS => matmul_tiled(d, a, b, tile_kernel(true)),
        Determinism::Fast => matmul_fast(d, a, b),
    }
}

/// The rows of `a` for batch `bi` as a contiguous `[m, k]` (copied once when `a` is transposed).
fn a_rows<'a>(d: &MatmulDims, a: &'a [f32], bi: usize) -> Cow<'a, [f32]> {
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
fn matmul_tiled(d: &MatmulDims, a: &[f32], b: &[f32], kernel: TileKernel) -> Vec<f32> {
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
const LANES: usize = 32;

/// Rows of `a` per task, so a task's rows stay in cache while its tile is reused.
const ROW_BLOCK: usize = 64;

/// Below this many multiply-adds a matmul stays on the calling thread.
const PAR_MIN_WORK: usize = 1 << 16;

/// `c [m, n]`: every `c[i, j] = sum over p in order of a[i, p] * w_j[p]` (`acc = acc + a * w` from
/// 0, or one FMA per step with the fast kernel), where `pack(j0, tile)` writes weight columns
/// `j0..j0 + LANES` as `tile[p][lane]` (lanes past `n` stay 0 and are ignored). Threads take
/// (row block, tile) tasks.
fn ordered_tiles(
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
fn tile_kernel(fused: bool) -> TileKernel {
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
fn step<const FUSED: bool>(acc: f32, x: f32, w: f32) -> f32 {
    if FUSED { x.mul_add(w, acc) } else { acc + x * w }
}

/// Two rows of `a` at a time against the 32 lanes: 64 independent sequential sums.
#[inline(always)]
fn tile_impl<const FUSED: bool>(a: &[f32], k: usize, tile: &[[f32; LANES]], out: &mut [[f32; LANES]]) {
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

fn tile_portable(a: &[f32], k: usize, tile: &[[f32; LANES]], out: &mut [[f32; LANES]]) {
    tile_impl::<false>(a, k, tile, out)
}

/// The reproducible code compiled with AVX (8-wide registers); `mul` and `add` stay separate
/// instructions (no FMA feature is enabled, and Rust never contracts).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
fn tile_avx(a: &[f32], k: usize, tile: &[[f32; LANES]], out: &mut [[f32; LANES]]) {
    tile_impl::<false>(a, k, tile, out)
}

/// Fast mode: one FMA per step.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn tile_fma(a: &[f32], k: usize, tile: &[[f32; LANES]], out: &mut [[f32; LANES]]) {
    tile_impl::<true>(a, k, tile, out)
}

#[cfg(target_arch = "x86_64")]
fn tile_avx_entry(a: &[f32], k: usize, tile: &[[f32; LANES]], out: &mut [[f32; LANES]]) {
    // SAFETY: handed out by `tile_kernel` only after `is_x86_feature_detected!("avx")`.
    unsafe { tile_avx(a, k, tile, out) }
}

#[cfg(target_arch = "x86_64")]
fn tile_fma_entry(a: &[f32], k: usize, tile: &[[f32; LANES]], out: &mut [[f32; LANES]]) {
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
const SMALL_M: usize = 12;

/// Fast f32 matmul for a few rows of `a`: SIMD dots over the rows of a transposed `b`, or rows of `b`
/// accumulated into each output row (`y = y + a[i, p] * b[p, :]`); threads over output columns.
fn matmul_small(d: &MatmulDims, a: &[f32], b: &[f32]) -> Vec<f32> {
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
fn matmul_fast(d: &MatmulDims, a: &[f32], b: &[f32]) -> Vec<f32> {
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
fn sgemm(m: usize, k: usize, n: usize, a: &[f32], sa: (isize, isize), b: &[f32], sb: (isize, isize), c: &mut [f32], sc: (isize, isize)) {
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
const GEMM_MIN_ROWS: usize = 64;

/// Weight tiles for the GEMM path hold at most this many f32 values (4 MiB).
const TILE_ELEMS: usize = 1 << 20;

/// `a [m, k]` (f32) times the f16 or quantized weights `w`, stored as `[n, k]` rows (transpose_b).
fn matmul_weights(det: Determinism, d: &MatmulDims, a: &[f32], dtype: DType, w: &[u8]) -> Vec<f32> {
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
fn weight_packer(dtype: DType, w: &[u8], row_bytes: usize) -> impl Fn(usize, &mut [[f32; LANES]]) + Sync {
    move |j0, tile| {
        let rows: Vec<&[u8]> = w.chunks_exact(row_bytes).skip(j0).take(LANES).collect();
        pack_lanes(tile, tile.len(), rows.len(), |l, out| quant::dequantize_unchecked(dtype, rows[l], out));
    }
}

/// Fills `tile[p][l]` (`tile.len() == k`) with element `p` of row `l`, for the `lanes` rows that
/// `fill(l, row)` writes (contiguously, into a scratch `[LANES, k]`); other lanes are 0.
fn pack_lanes(tile: &mut [[f32; LANES]], k: usize, lanes: usize, fill: impl Fn(usize, &mut [f32])) {
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
fn transpose_to_tile(rows: &[f32], k: usize, tile: &mut [[f32; LANES]]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx") {
        // SAFETY: AVX was just detected.
        let done = unsafe { transpose_avx::transpose(rows, k, tile) };
        return transpose_from(rows, k, done, tile);
    }
    transpose_from(rows, k, 0, tile)
}

/// The scalar transpose of columns `p_from..k`.
fn transpose_from(rows: &[f32], k: usize, p_from: usize, tile: &mut [[f32; LANES]]) {
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
const WEIGHT_TILE_MIN_ROWS: usize = 6;

/// Fast, few rows: threads over weight rows; one row of `a` uses the fused quantized dot, more rows
/// dequantize each weight row once and use f32 dots.
fn weights_dots(m: usize, k: usize, a: &[f32], dtype: DType, w: &[u8], row_bytes: usize, c: &mut [f32]) {
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
fn weights_gemm(m: usize, n: usize, k: usize, a: &[f32], dtype: DType, w: &[u8], row_bytes: usize, c: &mut [f32]) {
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
fn transpose_into(ct: &[f32], m: usize, c: &mut [f32]) {
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

// ---- layout ----

/// A transposed copy: output axis `i` is input axis `axes[i]` (rank <= 4, checked by the caller).
fn permute_elems<T: Copy>(src: &[T], shape: &[usize], axes: &[usize]) -> Vec<T> {
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
fn slice_runs<T: Copy>(src: &[T], outer: usize, (axis_run, start, len): (usize, usize, usize)) -> Vec<T> {
    let mut out = Vec::with_capacity(outer * len);
    for o in 0..outer {
        out.extend_from_slice(&src[o * axis_run + start..o * axis_run + start + len]);
    }
    out
}

/// Interleaves `outer` runs of `ra` units of `a` with runs of `rb` units of `b`.
fn concat_runs<T: Copy>(a: &[T], b: &[T], outer: usize, ra: usize, rb: usize) -> Vec<T> {
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
fn rope_row(row: &mut [f32], cs: &[f32], mode: RopeMode) {
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
fn attention_ref(d: &AttentionDims, q: &[f32], k: &[f32], v: &[f32], pos0: u32, scale: f32, exp: fn(f32) -> f32) -> Vec<f32> {
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
pub(crate) fn reduce_row(op: ReduceOp, row: &[f32]) -> f32 {
    match op {
        ReduceOp::Sum => row_sum(row),
        ReduceOp::Mean => row_sum(row) / row.len() as f32,
        ReduceOp::Max => row_max(row),
        ReduceOp::Argmax => argmax_row(row) as f32,
    }
}

/// The first index of the maximum; NaN is skipped (an all-NaN or empty row gives 0).
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

fn row_sum(row: &[f32]) -> f32 {
    let mut acc = 0.0f32;
    for &v in row {
        acc = acc + v;
    }
    acc
}

fn row_max(row: &[f32]) -> f32 {
    let mut acc = f32::NEG_INFINITY;
    for &v in row {
        if v > acc {
            acc = v;
        }
    }
    acc
}

fn softmax_row(row: &mut [f32], exp: fn(f32) -> f32) {
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

fn rmsnorm_row(row: &mut [f32], w: &[f32], eps: f32) {
    let mut ss = 0.0f32;
    for &v in row.iter() {
        ss = ss + v * v;
    }
    let inv = 1.0 / (ss / row.len() as f32 + eps).sqrt();
    for (v, &w) in row.iter_mut().zip(w) {
        *v = *v * inv * w;
    }
}

fn layernorm_row(row: &mut [f32], w: &[f32], b: &[f32], eps: f32) {
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

#[cfg(test)]
mod tests {
    use super::*;

    const MODES: [Determinism; 2] = [Determinism::Reproducible, Determinism::Fast];

    fn rand_vec(rng: &mut fastrand::Rng, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| (rng.f32() * 2.0 - 1.0) * scale).collect()
    }

    fn up(b: &mut CpuBackend, shape: &[usize], data: Vec<f32>) -> TensorId {
        b.upload(&HostTensor::new(shape.to_vec(), data).unwrap()).unwrap()
    }

    /// Uploads `values` encoded as `dtype` (GGUF reference quantizer for the block types).
    fn up_as(b: &mut CpuBackend, dtype: DType, shape: &[usize], values: &[f32]) -> TensorId {
        b.upload_raw(&RawTensor::new(dtype, shape.to_vec(), quant::quantize(dtype, values).unwrap()).unwrap()).unwrap()
    }

    fn up_i32(b: &mut CpuBackend, shape: &[usize], data: &[i32]) -> TensorId {
        b.upload_raw(&RawTensor::from_i32(shape.to_vec(), data).unwrap()).unwrap()
    }

    fn vals(b: &mut CpuBackend, id: TensorId) -> Vec<f32> {
        b.read(id).unwrap().data
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    fn is_dtype<T: std::fmt::Debug>(r: Result<T>) -> bool {
        matches!(r, Err(GpuError::DType { .. }))
    }

    fn is_shape<T: std::fmt::Debug>(r: Result<T>) -> bool {
        matches!(r, Err(GpuError::ShapeMismatch { .. }))
    }

    /// `|got - want| <= tol * bound + 1e-30` for each element, with index and values on failure.
    fn assert_within(what: &str, got: &[f32], want: &[f64], bound: &[f64], tol: f64) {
        assert_eq!(got.len(), want.len(), "{what}: length");
        for (i, ((&g, &w), &b)) in got.iter().zip(want).zip(bound).enumerate() {
            let diff = (g as f64 - w).abs();
            assert!(diff <= tol * b + 1e-30, "{what}[{i}]: got {g}, want {w}, diff {diff}, allowed {}", tol * b);
        }
    }

    /// f64 `a @ b` (a [m, k] or transposed, b [k, n] or transposed) and the sums of |terms|.
    #[allow(clippy::too_many_arguments)]
    fn matmul_f64(m: usize, n: usize, k: usize, a: &[f32], b: &[f32], ta: bool, tb: bool) -> (Vec<f64>, Vec<f64>) {
        let mut out = vec![0.0; m * n];
        let mut abs = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                for p in 0..k {
                    let av = if ta { a[p * m + i] } else { a[i * k + p] } as f64;
                    let bv = if tb { b[j * k + p] } else { b[p * n + j] } as f64;
                    out[i * n + j] += av * bv;
                    abs[i * n + j] += (av * bv).abs();
                }
            }
        }
        (out, abs)
    }

    #[test]
    fn f32_matmul_matches_f64_in_both_modes() {
        let mut rng = fastrand::Rng::with_seed(1);
        for det in MODES {
            for &(m, n, k) in
                &[(1, 1, 1), (3, 5, 7), (7, 300, 65), (1, 513, 200), (17, 33, 65), (64, 48, 130), (2, 3, 0), (0, 4, 3), (4, 0, 3)]
            {
                for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
                    let mut b = CpuBackend::new(det);
                    let (av, bv) = (rand_vec(&mut rng, m * k, 1.0), rand_vec(&mut rng, k * n, 1.0));
                    let a = up(&mut b, &if ta { [k, m] } else { [m, k] }, av.clone());
                    let w = up(&mut b, &if tb { [n, k] } else { [k, n] }, bv.clone());
                    let c = b.matmul(a, w, ta, tb).unwrap();
                    assert_eq!(b.shape(c).unwrap(), vec![m, n]);
                    let (want, abs) = matmul_f64(m, n, k, &av, &bv, ta, tb);
                    assert_within(
                        &format!("{det:?} {m}x{n}x{k} {ta} {tb}"),
                        &vals(&mut b, c),
                        &want,
                        &abs,
                        (k + 1) as f64 * 2f64.powi(-24),
                    );
                }
            }
        }
    }

    /// Reproducible f32 matmul is one sequential `acc = acc + a * b` per output, whatever the tiling
    /// and threading: compared bitwise with that loop written out, on shapes around the tile sizes.
    #[test]
    fn reproducible_f32_matmul_is_bitwise_the_sequential_loop() {
        let mut rng = fastrand::Rng::with_seed(14);
        for &(m, n, k) in &[(1, 1, 1), (1, 9, 300), (5, 7, 3), (4, 8, 64), (67, 17, 40), (130, 30, 33), (3, 2, 0)] {
            for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
                let mut b = CpuBackend::new(Determinism::Reproducible);
                let (av, bv) = (rand_vec(&mut rng, m * k, 1.0), rand_vec(&mut rng, k * n, 1.0));
                let a = up(&mut b, &if ta { [k, m] } else { [m, k] }, av.clone());
                let w = up(&mut b, &if tb { [n, k] } else { [k, n] }, bv.clone());
                let got = {
                    let id = b.matmul(a, w, ta, tb).unwrap();
                    vals(&mut b, id)
                };
                let mut want = vec![0.0f32; m * n];
                for i in 0..m {
                    for j in 0..n {
                        let mut acc = 0.0f32;
                        for p in 0..k {
                            let x = if ta { av[p * m + i] } else { av[i * k + p] };
                            let y = if tb { bv[j * k + p] } else { bv[p * n + j] };
                            acc = acc + x * y;
                        }
                        want[i * n + j] = acc;
                    }
                }
                assert_eq!(bits(&got), bits(&want), "{m}x{n}x{k} {ta} {tb}");
            }
        }
    }

    #[test]
    fn batched_matmul_broadcasts_a_2d_operand() {
        let mut rng = fastrand::Rng::with_seed(2);
        for det in MODES {
            let mut b = CpuBackend::new(det);
            let (av, bv) = (rand_vec(&mut rng, 3 * 4 * 5, 1.0), rand_vec(&mut rng, 5 * 6, 1.0));
            let a = up(&mut b, &[3, 4, 5], av.clone());
            let w = up(&mut b, &[5, 6], bv.clone());
            let c = b.matmul(a, w, false, false).unwrap();
            assert_eq!(b.shape(c).unwrap(), vec![3, 4, 6]);
            let got = vals(&mut b, c);
            for bi in 0..3 {
                let (want, abs) = matmul_f64(4, 6, 5, &av[bi * 20..(bi + 1) * 20], &bv, false, false);
                assert_within("batched", &got[bi * 24..(bi + 1) * 24], &want, &abs, 6.0 * 2f64.powi(-24));
            }
        }
    }

    /// The reproducible definition written out independently: dequantize the whole matrix, then one
    /// sequential `acc = acc + a * w` per output.
    fn ordered_on_dequantized(m: usize, n: usize, k: usize, a: &[f32], w: &[f32]) -> Vec<f32> {
        let mut out = vec![0.0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut acc = 0.0f32;
                for p in 0..k {
                    acc = acc + a[i * k + p] * w[j * k + p];
                }
                out[i * n + j] = acc;
            }
        }
        out
    }

    const WEIGHT_TYPES: [DType; 4] = [DType::F16, DType::Q8_0, DType::Q4_0, DType::Q4_1];

    #[test]
    fn reproducible_weight_matmul_is_bitwise_ordered_matmul_on_dequantized_weights() {
        let mut rng = fastrand::Rng::with_seed(3);
        for dtype in WEIGHT_TYPES {
            for &(m, n, k) in &[(1, 1, 32), (1, 37, 64), (3, 20, 96), (16, 9, 32), (40, 70, 160), (70, 9, 64)] {
                let mut b = CpuBackend::new(Determinism::Reproducible);
                let (av, wv) = (rand_vec(&mut rng, m * k, 1.0), rand_vec(&mut rng, n * k, 2.0));
                let deq = quant::dequantize(dtype, &quant::quantize(dtype, &wv).unwrap(), n * k).unwrap();
                let a = up(&mut b, &[m, k], av.clone());
                let w = up_as(&mut b, dtype, &[n, k], &wv);
                let got = {
                    let id = b.matmul(a, w, false, true).unwrap();
                    vals(&mut b, id)
                };
                assert_eq!(bits(&got), bits(&ordered_on_dequantized(m, n, k, &av, &deq)), "{dtype} {m}x{n}x{k}");
                // transpose_a reads the same rows.
                let at: Vec<f32> = (0..m * k).map(|x| av[(x % m) * k + x / m]).collect();
                let a_t = up(&mut b, &[k, m], at);
                let got_t = {
                    let id = b.matmul(a_t, w, true, true).unwrap();
                    vals(&mut b, id)
                };
                assert_eq!(bits(&got_t), bits(&got), "{dtype} transpose_a");
                // And the same as the f32 path on the cast weights.
                let wf = b.cast(w, DType::F32).unwrap();
                assert_eq!(
                    bits(&{
                        let id = b.matmul(a, wf, false, true).unwrap();
                        vals(&mut b, id)
                    }),
                    bits(&got),
                    "{dtype} via cast"
                );
            }
        }
    }

    #[test]
    fn batched_weight_matmul() {
        let mut rng = fastrand::Rng::with_seed(4);
        for det in MODES {
            let mut b = CpuBackend::new(det);
            let (m, n, k) = (5, 6, 64);
            let (av, wv) = (rand_vec(&mut rng, 2 * m * k, 1.0), rand_vec(&mut rng, 2 * n * k, 1.0));
            let deq = quant::dequantize(DType::Q8_0, &quant::quantize(DType::Q8_0, &wv).unwrap(), 2 * n * k).unwrap();
            let a = up(&mut b, &[2, m, k], av.clone());
            let w = up_as(&mut b, DType::Q8_0, &[2, n, k], &wv);
            let w2 = up_as(&mut b, DType::Q8_0, &[n, k], &wv[..n * k]);
            let got = {
                let id = b.matmul(a, w, false, true).unwrap();
                vals(&mut b, id)
            };
            let shared = {
                let id = b.matmul(a, w2, false, true).unwrap();
                vals(&mut b, id)
            };
            for bi in 0..2 {
                let (want, abs) = matmul_f64(m, n, k, &av[bi * m * k..][..m * k], &deq[bi * n * k..][..n * k], false, true);
                let tol = (k + 8) as f64 * 2f64.powi(-23);
                assert_within(&format!("{det:?} batch {bi}"), &got[bi * m * n..][..m * n], &want, &abs, tol);
                let (want, abs) = matmul_f64(m, n, k, &av[bi * m * k..][..m * k], &deq[..n * k], false, true);
                assert_within(&format!("{det:?} shared {bi}"), &shared[bi * m * n..][..m * n], &want, &abs, tol);
            }
        }
    }

    /// Fast mode (SIMD row dots below `GEMM_MIN_ROWS` rows, dequantized tiles + matrixmultiply from
    /// there on) against reproducible mode and f64, on seeded random shapes. Tolerance: each result
    /// within `(k + 8) * 2^-23` of the f64 dot relative to `sum |a_p * w_p|` (a bound for any
    /// summation order, with or without FMA), so fast and reproducible differ by at most twice that.
    #[test]
    fn fast_weight_matmul_agrees_with_reproducible_within_tolerance() {
        let mut rng = fastrand::Rng::with_seed(5);
        for case in 0..40 {
            let dtype = WEIGHT_TYPES[case % 4];
            let m = [1, 2, WEIGHT_TILE_MIN_ROWS - 1, WEIGHT_TILE_MIN_ROWS, 33, GEMM_MIN_ROWS - 1, GEMM_MIN_ROWS, 70][rng.usize(0..8)];
            let (n, k) = (rng.usize(1..80), 32 * rng.usize(1..12));
            let (av, wv) = (rand_vec(&mut rng, m * k, 3.0), rand_vec(&mut rng, n * k, 1.0));
            let deq = quant::dequantize(dtype, &quant::quantize(dtype, &wv).unwrap(), n * k).unwrap();
            let (want, abs) = matmul_f64(m, n, k, &av, &deq, false, true);
            let run = |det| {
                let mut b = CpuBackend::new(det);
                let a = up(&mut b, &[m, k], av.clone());
                let w = up_as(&mut b, dtype, &[n, k], &wv);
                {
                    let id = b.matmul(a, w, false, true).unwrap();
                    vals(&mut b, id)
                }
            };
            let (fast, repro) = (run(Determinism::Fast), run(Determinism::Reproducible));
            let tol = (k + 8) as f64 * 2f64.powi(-23);
            let what = format!("{dtype} {m}x{n}x{k}");
            assert_within(&format!("fast {what}"), &fast, &want, &abs, tol);
            assert_within(&format!("repro {what}"), &repro, &want, &abs, tol);
            let repro64: Vec<f64> = repro.iter().map(|&x| x as f64).collect();
            assert_within(&format!("fast vs repro {what}"), &fast, &repro64, &abs, 2.0 * tol);
        }
    }

    #[test]
    fn f16_weights_work_with_either_transpose() {
        let mut rng = fastrand::Rng::with_seed(6);
        for det in MODES {
            let mut b = CpuBackend::new(det);
            let (m, n, k) = (3, 5, 11);
            let (av, wv) = (rand_vec(&mut rng, m * k, 1.0), rand_vec(&mut rng, k * n, 1.0));
            let deq: Vec<f32> = wv.iter().map(|&x| quant::f16_value(quant::f16_bits(x))).collect();
            let a = up(&mut b, &[m, k], av.clone());
            let w = up_as(&mut b, DType::F16, &[k, n], &wv);
            let (want, abs) = matmul_f64(m, n, k, &av, &deq, false, false);
            assert_within(
                &format!("{det:?} f16 [k, n]"),
                &{
                    let id = b.matmul(a, w, false, false).unwrap();
                    vals(&mut b, id)
                },
                &want,
                &abs,
                1e-6,
            );
            let w = up_as(&mut b, DType::F16, &[n, k], &wv);
            let (want, abs) = matmul_f64(m, n, k, &av, &deq, false, true);
            assert_within(
                &format!("{det:?} f16 [n, k]"),
                &{
                    let id = b.matmul(a, w, false, true).unwrap();
                    vals(&mut b, id)
                },
                &want,
                &abs,
                1e-6,
            );
        }
    }

    #[test]
    fn matmul_dtype_errors() {
        let mut b = CpuBackend::new(Determinism::Fast);
        let f = up(&mut b, &[2, 32], vec![0.5; 64]);
        let q = up_as(&mut b, DType::Q4_0, &[3, 32], &[1.0; 96]);
        let h = up_as(&mut b, DType::F16, &[2, 32], &[1.0; 64]);
        let i = up_i32(&mut b, &[32, 2], &[1; 64]);
        assert!(is_dtype(b.matmul(q, q, false, true)), "quantized a");
        assert!(is_dtype(b.matmul(h, f, false, true)), "f16 a");
        assert!(is_dtype(b.matmul(f, i, false, false)), "i32 b");
        assert!(is_dtype(b.matmul(f, q, false, false)), "quantized b must be transposed");
        let q64 = up_as(&mut b, DType::Q8_0, &[3, 64], &[1.0; 192]);
        assert!(is_shape(b.matmul(f, q64, false, true)), "k differs");
        let c = b.matmul(f, q, false, true).unwrap();
        assert_eq!(b.shape(c).unwrap(), vec![2, 3]);
        assert_eq!(b.matmul(TensorId(999), q, false, true), Err(GpuError::UnknownTensor(TensorId(999))));
        // Zero-sized products are fine with weights too.
        let e = up(&mut b, &[0, 32], vec![]);
        let c = b.matmul(e, q, false, true).unwrap();
        assert_eq!((b.shape(c).unwrap(), vals(&mut b, c)), (vec![0, 3], vec![]));
    }

    #[test]
    fn argmax_is_i32_and_reads_as_values() {
        let mut b = CpuBackend::new(Determinism::Reproducible);
        let x = up(&mut b, &[3, 4], vec![1.0, 5.0, 5.0, 2.0, f32::NAN, -1.0, -0.5, -3.0, 0.0, 0.0, 0.0, 0.0]);
        let a = b.reduce_last(ReduceOp::Argmax, x).unwrap();
        assert_eq!(b.dtype(a).unwrap(), DType::I32);
        assert_eq!(b.shape(a).unwrap(), vec![3]);
        assert_eq!(vals(&mut b, a), vec![1.0, 2.0, 0.0]);
        assert_eq!(b.read_raw(a).unwrap(), RawTensor::from_i32(vec![3], &[1, 2, 0]).unwrap());
        // Argmax feeds gather_rows directly.
        let table = up(&mut b, &[3, 2], vec![0.0, 1.0, 10.0, 11.0, 20.0, 21.0]);
        assert_eq!(
            {
                let id = b.gather_rows(table, a).unwrap();
                vals(&mut b, id)
            },
            vec![10.0, 11.0, 20.0, 21.0, 0.0, 1.0]
        );
        let s = b.reduce_last(ReduceOp::Sum, x).unwrap();
        assert_eq!(b.dtype(s).unwrap(), DType::F32);
    }

    #[test]
    fn arithmetic_ops_take_f32_only() {
        let mut b = CpuBackend::new(Determinism::Reproducible);
        let f = up(&mut b, &[1, 32], vec![1.0; 32]);
        let h = up_as(&mut b, DType::F16, &[1, 32], &[1.0; 32]);
        let i = up_i32(&mut b, &[1, 32], &[1; 32]);
        let q = up_as(&mut b, DType::Q8_0, &[1, 32], &[1.0; 32]);
        let w = up(&mut b, &[32], vec![1.0; 32]);
        let hw = up_as(&mut b, DType::F16, &[32], &[1.0; 32]);
        for x in [h, i, q] {
            assert!(is_dtype(b.binary(BinaryOp::Add, x, f)));
            assert!(is_dtype(b.binary(BinaryOp::Mul, f, x)));
            assert!(is_dtype(b.unary(UnaryOp::Relu, x)));
            assert!(is_dtype(b.softmax_last(x)));
            assert!(is_dtype(b.rmsnorm(x, w, 1e-5)));
            assert!(is_dtype(b.layernorm(x, w, w, 1e-5)));
            assert!(is_dtype(b.reduce_last(ReduceOp::Sum, x)));
            assert!(is_dtype(b.reduce_last(ReduceOp::Argmax, x)));
        }
        assert!(is_dtype(b.rmsnorm(f, hw, 1e-5)));
        assert!(is_dtype(b.layernorm(f, w, hw, 1e-5)));
        let r = up(&mut b, &[1, 2, 16], vec![1.0; 32]);
        let rh = b.cast(r, DType::F16).unwrap();
        assert!(is_dtype(b.rope(rh, 0, 10000.0, RopeMode::Neox)));
        let ri = b.cast(r, DType::I32).unwrap();
        assert!(is_dtype(b.attention(r, ri, r, 0, 1.0)));
        assert!(is_dtype(b.attention(rh, r, r, 0, 1.0)));
        assert!(is_dtype(b.attention(r, r, rh, 0, 1.0)));
        assert!(b.attention(r, r, r, 0, 1.0).is_ok());
    }

    #[test]
    fn raw_round_trips_and_live_bytes() {
        let mut rng = fastrand::Rng::with_seed(7);
        let mut b = CpuBackend::new(Determinism::Fast);
        assert_eq!(b.live_bytes(), 0);
        let mut ids = Vec::new();
        let mut total = 0;
        for dtype in DType::ALL {
            let v = rand_vec(&mut rng, 2 * 64, 100.0);
            let bytes = quant::quantize(dtype, &v).unwrap();
            let raw = RawTensor::new(dtype, vec![2, 64], bytes.clone()).unwrap();
            let id = b.upload_raw(&raw).unwrap();
            assert_eq!(b.dtype(id).unwrap(), dtype);
            assert_eq!(b.read_raw(id).unwrap(), raw, "{dtype}");
            assert_eq!(vals(&mut b, id), quant::dequantize(dtype, &bytes, 128).unwrap(), "{dtype}");
            total += bytes.len() as u64;
            assert_eq!(b.live_bytes(), total);
            ids.push(id);
        }
        // The public fields are re-checked.
        let bad = RawTensor { dtype: DType::Q4_0, shape: vec![2, 32], bytes: vec![0; 35] };
        assert!(is_shape(b.upload_raw(&bad)));
        let bad = RawTensor { dtype: DType::Q4_0, shape: vec![33], bytes: vec![0; 18] };
        assert!(is_dtype(b.upload_raw(&bad)));
        for id in ids {
            b.free(id).unwrap();
        }
        assert_eq!(b.live_bytes(), 0);
        assert_eq!(b.read_raw(TensorId(1)), Err(GpuError::UnknownTensor(TensorId(1))));
    }

    #[test]
    fn casts() {
        let mut b = CpuBackend::new(Determinism::Reproducible);
        let v = vec![1.5f32, -2.5, 70000.0, -1e10, f32::NAN, 0.1, 1.0 + 2f32.powi(-11), 3.7];
        let x = up(&mut b, &[2, 4], v.clone());
        let h = b.cast(x, DType::F16).unwrap();
        assert_eq!(b.dtype(h).unwrap(), DType::F16);
        let hv = vals(&mut b, h);
        assert_eq!(&hv[..4], &[1.5, -2.5, f32::INFINITY, f32::NEG_INFINITY]);
        assert!(hv[4].is_nan());
        assert_eq!((hv[5], hv[6]), (f32::from_bits(0x3dcc_c000), 1.0), "0.1 -> 0x2e66; the tie rounds to even");
        let i = b.cast(x, DType::I32).unwrap();
        assert_eq!(b.read_raw(i).unwrap().bytes, quant::quantize(DType::I32, &v).unwrap());
        assert_eq!(vals(&mut b, i), vec![1.0, -2.0, 70000.0, i32::MIN as f32, 0.0, 0.0, 1.0, 3.0]);
        assert_eq!(
            {
                let id = b.cast(i, DType::F32).unwrap();
                vals(&mut b, id)
            },
            vals(&mut b, i)
        );
        assert_eq!(
            bits(&{
                let id = b.cast(h, DType::F32).unwrap();
                vals(&mut b, id)
            }),
            bits(&hv)
        );
        // The identity keeps dtype and bytes.
        for id in [x, h, i] {
            let same = b.cast(id, b.dtype(id).unwrap()).unwrap();
            assert_eq!(b.read_raw(same).unwrap(), b.read_raw(id).unwrap());
        }
        // f32 -> quantized is the reference quantizer; quantized -> f32 dequantizes.
        let mut rng = fastrand::Rng::with_seed(8);
        let w = rand_vec(&mut rng, 3 * 64, 2.0);
        let wx = up(&mut b, &[3, 64], w.clone());
        for dtype in [DType::Q8_0, DType::Q4_0, DType::Q4_1] {
            let q = b.cast(wx, dtype).unwrap();
            let bytes = quant::quantize(dtype, &w).unwrap();
            assert_eq!(b.read_raw(q).unwrap().bytes, bytes);
            assert_eq!(
                {
                    let id = b.cast(q, DType::F32).unwrap();
                    vals(&mut b, id)
                },
                quant::dequantize(dtype, &bytes, w.len()).unwrap()
            );
            // Only through f32.
            assert!(is_dtype(b.cast(q, DType::F16)));
            assert!(is_dtype(b.cast(q, DType::I32)));
            let other = if dtype == DType::Q8_0 { DType::Q4_0 } else { DType::Q8_0 };
            assert!(is_dtype(b.cast(q, other)));
        }
        assert!(is_dtype(b.cast(h, DType::I32)));
        assert!(is_dtype(b.cast(i, DType::F16)));
        assert!(is_dtype(b.cast(h, DType::Q8_0)));
        // A last axis that is not a multiple of 32 cannot be quantized.
        assert!(is_dtype(b.cast(x, DType::Q4_1)));
    }

    #[test]
    fn reshape_any_dtype() {
        let mut b = CpuBackend::new(Determinism::Reproducible);
        let v: Vec<f32> = (0..128).map(|x| x as f32 / 8.0).collect();
        for dtype in DType::ALL {
            let x = up_as(&mut b, dtype, &[2, 64], &v);
            let r = b.reshape(x, &[4, 1, 32]).unwrap();
            assert_eq!((b.shape(r).unwrap(), b.dtype(r).unwrap()), (vec![4, 1, 32], dtype));
            assert_eq!(b.read_raw(r).unwrap().bytes, b.read_raw(x).unwrap().bytes);
            assert!(is_shape(b.reshape(x, &[3, 64])), "{dtype}");
            assert!(is_shape(b.reshape(x, &[1, 1, 1, 2, 64])), "{dtype}: rank 5");
            let odd = b.reshape(x, &[8, 16]);
            assert_eq!(is_dtype(odd.clone()), dtype.is_quantized(), "{dtype}: {odd:?}");
        }
    }

    /// Independent permute reference: walk the input and place each element.
    fn permute_ref(x: &[f32], shape: &[usize], axes: &[usize]) -> Vec<f32> {
        let out_shape: Vec<usize> = axes.iter().map(|&a| shape[a]).collect();
        let mut out = vec![0.0; x.len()];
        for (flat, &v) in x.iter().enumerate() {
            let mut idx = vec![0; shape.len()];
            let mut r = flat;
            for d in (0..shape.len()).rev() {
                idx[d] = r % shape[d];
                r /= shape[d];
            }
            let mut o = 0;
            for (i, &a) in axes.iter().enumerate() {
                o = o * out_shape[i] + idx[a];
            }
            out[o] = v;
        }
        out
    }

    #[test]
    fn permute_matches_index_reference() {
        let mut b = CpuBackend::new(Determinism::Reproducible);
        let cases: &[(&[usize], &[usize])] =
            &[(&[2, 3], &[1, 0]), (&[2, 3, 4], &[2, 0, 1]), (&[2, 3, 4, 5], &[3, 1, 0, 2]), (&[7], &[0]), (&[3, 0, 2], &[2, 1, 0])];
        for &(shape, axes) in cases {
            let n = numel(shape);
            let v: Vec<f32> = (0..n).map(|x| x as f32).collect();
            let want = permute_ref(&v, shape, axes);
            let want_shape: Vec<usize> = axes.iter().map(|&a| shape[a]).collect();
            for dtype in [DType::F32, DType::F16, DType::I32] {
                let x = up_as(&mut b, dtype, shape, &v);
                let p = b.permute(x, axes).unwrap();
                assert_eq!((b.shape(p).unwrap(), b.dtype(p).unwrap()), (want_shape.clone(), dtype));
                assert_eq!(vals(&mut b, p), want, "{dtype} {shape:?} {axes:?}");
            }
        }
        let x = up(&mut b, &[2, 3], vec![0.0; 6]);
        assert!(is_shape(b.permute(x, &[0, 0])));
        assert!(is_shape(b.permute(x, &[0, 1, 2])));
        assert!(is_shape(b.permute(x, &[2, 0])));
        let q = up_as(&mut b, DType::Q8_0, &[2, 32], &[0.0; 64]);
        assert!(is_dtype(b.permute(q, &[1, 0])));
    }

    #[test]
    fn slice_concat_and_their_errors() {
        let mut b = CpuBackend::new(Determinism::Reproducible);
        let v: Vec<f32> = (0..24).map(|x| x as f32).collect();
        for dtype in [DType::F32, DType::F16, DType::I32] {
            let x = up_as(&mut b, dtype, &[2, 3, 4], &v);
            let s = b.slice(x, 1, 1, 2).unwrap();
            assert_eq!(b.shape(s).unwrap(), vec![2, 2, 4]);
            let want: Vec<f32> = [4..12, 16..24].into_iter().flatten().map(|x| x as f32).collect();
            assert_eq!(vals(&mut b, s), want, "{dtype}");
            let s2 = b.slice(x, 2, 3, 1).unwrap();
            assert_eq!(vals(&mut b, s2), vec![3.0, 7.0, 11.0, 15.0, 19.0, 23.0]);
            let empty = b.slice(x, 0, 2, 0).unwrap();
            assert_eq!((b.shape(empty).unwrap(), vals(&mut b, empty)), (vec![0, 3, 4], vec![]));
            // concat(slice(..1), slice(1..)) along each axis gives x back.
            for axis in 0..3 {
                let len = [2, 3, 4][axis];
                let (lo, hi) = (b.slice(x, axis, 0, 1).unwrap(), b.slice(x, axis, 1, len - 1).unwrap());
                let c = b.concat(lo, hi, axis).unwrap();
                assert_eq!((b.shape(c).unwrap(), b.dtype(c).unwrap()), (vec![2, 3, 4], dtype));
                assert_eq!(vals(&mut b, c), v, "{dtype} axis {axis}");
                let c0 = b.concat(empty, x, 0).unwrap();
                assert_eq!(vals(&mut b, c0), v);
            }
            assert!(is_shape(b.slice(x, 3, 0, 1)));
            assert!(is_shape(b.slice(x, 1, 2, 2)));
            assert!(is_shape(b.slice(x, 1, usize::MAX, 2)));
            assert!(is_shape(b.concat(x, s, 2)));
            assert!(is_shape(b.concat(x, x, 3)));
        }
        let f = up(&mut b, &[2, 32], vec![0.0; 64]);
        let h = up_as(&mut b, DType::F16, &[2, 32], &[0.0; 64]);
        let q = up_as(&mut b, DType::Q4_1, &[2, 32], &[0.0; 64]);
        assert!(is_dtype(b.concat(f, h, 0)));
        assert!(is_dtype(b.concat(q, q, 0)));
        assert!(is_dtype(b.slice(q, 0, 0, 1)));
    }

    #[test]
    fn append_grows_in_place_with_amortized_copies() {
        for dtype in [DType::F32, DType::F16, DType::I32] {
            let mut b = CpuBackend::new(Determinism::Reproducible);
            let cache = up_as(&mut b, dtype, &[0, 2, 3], &[]);
            let mut want = Vec::new();
            let mut capacities = Vec::new();
            for t in 0..1000 {
                let row: Vec<f32> = (0..6).map(|x| (t * 6 + x) as f32 % 1000.0).collect();
                let r = up_as(&mut b, dtype, &[1, 2, 3], &row);
                b.append(cache, r).unwrap();
                b.free(r).unwrap();
                want.extend(row);
                let cap = match &*b.tensors[&cache].data {
                    Data::F32(v) => v.capacity(),
                    Data::I32(v) => v.capacity(),
                    Data::Bytes(v) => v.capacity(),
                };
                if capacities.last() != Some(&cap) {
                    capacities.push(cap);
                }
            }
            assert_eq!(b.shape(cache).unwrap(), vec![1000, 2, 3]);
            assert_eq!(vals(&mut b, cache), want, "{dtype}");
            // Geometric growth: a handful of reallocations for 1000 appends, not one per append.
            assert!(capacities.len() <= 16, "{dtype}: {} reallocations", capacities.len());
            // Appending a tensor to itself doubles it.
            let small = up_as(&mut b, dtype, &[2, 1], &[1.0, 2.0]);
            b.append(small, small).unwrap();
            assert_eq!(vals(&mut b, small), vec![1.0, 2.0, 1.0, 2.0]);
        }
        // A reshape shares storage; appending to the cache copies first and leaves the reshape alone.
        let mut b = CpuBackend::new(Determinism::Reproducible);
        let cache = up(&mut b, &[2, 2], vec![1.0, 2.0, 3.0, 4.0]);
        let view = b.reshape(cache, &[4]).unwrap();
        let row = up(&mut b, &[1, 2], vec![5.0, 6.0]);
        b.append(cache, row).unwrap();
        assert_eq!(vals(&mut b, view), vec![1.0, 2.0, 3.0, 4.0]);
        assert_eq!(vals(&mut b, cache), vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        // Errors leave the cache unchanged.
        let wide = up(&mut b, &[1, 3], vec![0.0; 3]);
        assert!(is_shape(b.append(cache, wide)));
        let ri = up_i32(&mut b, &[1, 2], &[0, 0]);
        assert!(is_dtype(b.append(cache, ri)));
        let q = up_as(&mut b, DType::Q8_0, &[1, 32], &[0.0; 32]);
        assert!(is_dtype(b.append(q, q)));
        assert_eq!(b.append(cache, TensorId(999)), Err(GpuError::UnknownTensor(TensorId(999))));
        assert_eq!(b.shape(cache).unwrap(), vec![3, 2]);
    }

    #[test]
    fn gather_rows_every_table_type() {
        let mut rng = fastrand::Rng::with_seed(9);
        let (v, d) = (10, 64);
        let table = rand_vec(&mut rng, v * d, 2.0);
        let ids = [3i32, 0, 9, 3, 7, 1];
        for dtype in [DType::F32, DType::F16, DType::Q8_0, DType::Q4_0, DType::Q4_1] {
            let mut b = CpuBackend::new(Determinism::Reproducible);
            let t = up_as(&mut b, dtype, &[v, d], &table);
            let deq = quant::dequantize(dtype, &quant::quantize(dtype, &table).unwrap(), v * d).unwrap();
            let i = up_i32(&mut b, &[2, 3], &ids);
            let g = b.gather_rows(t, i).unwrap();
            assert_eq!((b.shape(g).unwrap(), b.dtype(g).unwrap()), (vec![2, 3, d], DType::F32));
            let want: Vec<f32> = ids.iter().flat_map(|&r| deq[r as usize * d..(r as usize + 1) * d].to_vec()).collect();
            assert_eq!(bits(&vals(&mut b, g)), bits(&want), "{dtype}");
            let none = up_i32(&mut b, &[0], &[]);
            let g = b.gather_rows(t, none).unwrap();
            assert_eq!((b.shape(g).unwrap(), vals(&mut b, g)), (vec![0, d], vec![]));
            for bad in [-1, 10, i32::MIN] {
                let i = up_i32(&mut b, &[3], &[0, bad, 1]);
                match b.gather_rows(t, i) {
                    Err(GpuError::ShapeMismatch { details, .. }) => assert!(details.contains(&format!("id {bad} ")), "{details}"),
                    other => panic!("{dtype} id {bad}: {other:?}"),
                }
            }
        }
        let mut b = CpuBackend::new(Determinism::Reproducible);
        let t = up(&mut b, &[2, 3], vec![0.0; 6]);
        let fi = up(&mut b, &[1], vec![0.0]);
        assert!(is_dtype(b.gather_rows(t, fi)));
        let ti = up_i32(&mut b, &[2, 3], &[0; 6]);
        let i = up_i32(&mut b, &[1], &[0]);
        assert!(is_dtype(b.gather_rows(ti, i)));
        let t3 = up(&mut b, &[1, 2, 3], vec![0.0; 6]);
        assert!(is_shape(b.gather_rows(t3, i)));
        let i4 = up_i32(&mut b, &[1, 1, 1, 1], &[0]);
        assert!(is_shape(b.gather_rows(t, i4)));
    }

    /// f64 rotary reference: angle `pos * theta^(-2i/d)` computed in f64.
    fn rope_f64(x: &[f32], seq: usize, heads: usize, dim: usize, pos0: u32, theta: f32, mode: RopeMode) -> Vec<f64> {
        let mut out: Vec<f64> = x.iter().map(|&v| v as f64).collect();
        let half = dim / 2;
        for (r, row) in out.chunks_mut(dim).enumerate() {
            let pos = (pos0 as usize + (r / heads) % seq) as f64;
            for i in 0..half {
                let (i0, i1) = if mode == RopeMode::Neox { (i, i + half) } else { (2 * i, 2 * i + 1) };
                let ang = pos * (theta as f64).powf(-2.0 * i as f64 / dim as f64);
                let (x0, x1) = (row[i0], row[i1]);
                row[i0] = x0 * ang.cos() - x1 * ang.sin();
                row[i1] = x0 * ang.sin() + x1 * ang.cos();
            }
        }
        out
    }

    #[test]
    fn rope_matches_f64_rotation() {
        let mut rng = fastrand::Rng::with_seed(10);
        for det in MODES {
            for mode in [RopeMode::Interleaved, RopeMode::Neox] {
                for (shape, pos0) in [(vec![5, 3, 8], 0u32), (vec![2, 4, 2, 16], 17), (vec![1, 1, 2], 1000), (vec![0, 2, 4], 3)] {
                    let mut b = CpuBackend::new(det);
                    let (seq, heads, dim) = (shape[shape.len() - 3], shape[shape.len() - 2], shape[shape.len() - 1]);
                    let xv = rand_vec(&mut rng, numel(&shape), 1.0);
                    let x = up(&mut b, &shape, xv.clone());
                    let got = {
                        let id = b.rope(x, pos0, 10000.0, mode).unwrap();
                        vals(&mut b, id)
                    };
                    let want = rope_f64(&xv, seq, heads, dim, pos0, 10000.0, mode);
                    // cos/sin rounded to f32, two products and one add: a few ULP of |x0| + |x1|.
                    let bound: Vec<f64> = vec![2.0; want.len()];
                    assert_within(&format!("{det:?} {mode:?} {shape:?}"), &got, &want, &bound, 4.0 * 2f64.powi(-24));
                }
            }
        }
        let mut b = CpuBackend::new(Determinism::Reproducible);
        let odd = up(&mut b, &[2, 2, 3], vec![0.0; 12]);
        assert!(is_shape(b.rope(odd, 0, 10000.0, RopeMode::Neox)));
        let flat = up(&mut b, &[4, 8], vec![0.0; 32]);
        assert!(is_shape(b.rope(flat, 0, 10000.0, RopeMode::Interleaved)));
    }

    /// f64 causal attention over `[batch, t, h, d]` (leading axes flattened into `batch`).
    #[allow(clippy::too_many_arguments)]
    fn attention_f64(q: &[f32], k: &[f32], v: &[f32], a: &AttentionDims, pos0: u32, scale: f32) -> Vec<f64> {
        let mut out = vec![0.0; q.len()];
        let group = a.hq / a.hkv;
        for b in 0..a.batch {
            for i in 0..a.tq {
                for h in 0..a.hq {
                    let g = h / group;
                    let visible = (pos0 as usize + i + 1).min(a.tk);
                    let qo = ((b * a.tq + i) * a.hq + h) * a.dim;
                    let ko = |j: usize| ((b * a.tk + j) * a.hkv + g) * a.dim;
                    let s: Vec<f64> = (0..visible)
                        .map(|j| (0..a.dim).map(|d| q[qo + d] as f64 * k[ko(j) + d] as f64).sum::<f64>() * scale as f64)
                        .collect();
                    let mx = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = s.iter().map(|x| (x - mx).exp()).collect();
                    let sum: f64 = e.iter().sum();
                    for d in 0..a.dim {
                        out[qo + d] = (0..visible).map(|j| e[j] / sum * v[ko(j) + d] as f64).sum();
                    }
                }
            }
        }
        out
    }

    #[test]
    fn attention_matches_f64_reference() {
        let mut rng = fastrand::Rng::with_seed(11);
        // (q shape, k shape, pos0): prefill, decode with a cache, grouped heads, rank 4, keys fewer
        // than the causal window, and no keys at all.
        let cases: &[(&[usize], &[usize], u32)] = &[
            (&[4, 2, 8], &[4, 2, 8], 0),
            (&[1, 4, 16], &[9, 2, 16], 8),
            (&[3, 6, 4], &[7, 3, 4], 4),
            (&[2, 3, 4, 8], &[2, 5, 1, 8], 2),
            (&[5, 2, 4], &[3, 2, 4], 0),
            (&[2, 2, 4], &[0, 1, 4], 5),
            (&[0, 2, 4], &[3, 2, 4], 0),
        ];
        for det in MODES {
            for &(qs, ks, pos0) in cases {
                let mut b = CpuBackend::new(det);
                let (qv, kv, vv) =
                    (rand_vec(&mut rng, numel(qs), 2.0), rand_vec(&mut rng, numel(ks), 2.0), rand_vec(&mut rng, numel(ks), 1.0));
                let dims = attention_dims(qs, ks, ks).unwrap();
                let scale = 1.0 / (dims.dim as f32).sqrt();
                let (q, k, v) = (up(&mut b, qs, qv.clone()), up(&mut b, ks, kv.clone()), up(&mut b, ks, vv.clone()));
                let o = b.attention(q, k, v, pos0, scale).unwrap();
                assert_eq!(b.shape(o).unwrap(), qs.to_vec());
                let want = attention_f64(&qv, &kv, &vv, &dims, pos0, scale);
                // Outputs are convex combinations of v (|v| <= 1): absolute error a few hundred ULP
                // of 1 covers the f32 scores, exp and sums.
                assert_within(&format!("{det:?} {qs:?} {ks:?} pos0 {pos0}"), &vals(&mut b, o), &want, &vec![1.0; want.len()], 1e-5);
            }
        }
    }

    #[test]
    fn attention_never_reads_keys_past_the_causal_limit() {
        // Query 0 at position 0 sees key 0 only; keys 1.. hold NaN / inf, which a -inf mask added to
        // the scores would turn into NaN outputs.
        for det in MODES {
            let mut b = CpuBackend::new(det);
            let q = up(&mut b, &[2, 1, 2], vec![1.0, 0.0, 0.5, 0.5]);
            let k = up(&mut b, &[3, 1, 2], vec![1.0, 1.0, 2.0, 0.0, f32::NAN, f32::INFINITY]);
            let v = up(&mut b, &[3, 1, 2], vec![3.0, -1.0, 5.0, 7.0, f32::NAN, f32::NAN]);
            let o = {
                let id = b.attention(q, k, v, 0, 1.0).unwrap();
                vals(&mut b, id)
            };
            assert_eq!(&o[..2], &[3.0, -1.0], "one visible key: its value exactly");
            // Query 1: scores 1 and 1 -> equal weights.
            assert_eq!(&o[2..], &[4.0, 3.0]);
            let bad = up(&mut b, &[3, 1, 3], vec![0.0; 9]);
            assert!(is_shape(b.attention(q, bad, bad, 0, 1.0)));
            assert!(is_shape(b.attention(q, k, bad, 0, 1.0)));
            let k2 = up(&mut b, &[3, 2, 2], vec![0.0; 12]);
            assert!(is_shape(b.attention(q, k2, k2, 0, 1.0)), "1 query head over 2 kv heads");
        }
    }

    #[test]
    fn softmax_and_norms_match_f64() {
        let mut rng = fastrand::Rng::with_seed(12);
        for det in MODES {
            let mut b = CpuBackend::new(det);
            let (rows, last) = (70, 600);
            let xv = rand_vec(&mut rng, rows * last, 4.0);
            let (wv, bv) = (rand_vec(&mut rng, last, 1.0), rand_vec(&mut rng, last, 1.0));
            let (x, w, bias) = (up(&mut b, &[rows, last], xv.clone()), up(&mut b, &[last], wv.clone()), up(&mut b, &[last], bv.clone()));
            let sm = {
                let id = b.softmax_last(x).unwrap();
                vals(&mut b, id)
            };
            let rms = {
                let id = b.rmsnorm(x, w, 1e-5).unwrap();
                vals(&mut b, id)
            };
            let ln = {
                let id = b.layernorm(x, w, bias, 1e-5).unwrap();
                vals(&mut b, id)
            };
            let (mut want_sm, mut want_rms, mut want_ln) = (Vec::new(), Vec::new(), Vec::new());
            for row in xv.chunks(last) {
                let r: Vec<f64> = row.iter().map(|&v| v as f64).collect();
                let mx = r.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let sum: f64 = r.iter().map(|v| (v - mx).exp()).sum();
                want_sm.extend(r.iter().map(|v| (v - mx).exp() / sum));
                let ms = r.iter().map(|v| v * v).sum::<f64>() / last as f64;
                want_rms.extend(r.iter().zip(&wv).map(|(v, &w)| v / (ms + 1e-5).sqrt() * w as f64));
                let mean = r.iter().sum::<f64>() / last as f64;
                let var = r.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / last as f64;
                want_ln.extend(r.iter().zip(&wv).zip(&bv).map(|((v, &w), &b)| (v - mean) / (var + 1e-5).sqrt() * w as f64 + b as f64));
            }
            let ones = vec![1.0; want_sm.len()];
            let tol = last as f64 * 2f64.powi(-22);
            assert_within("softmax", &sm, &want_sm, &want_sm.iter().map(|v| v.abs() + 1e-9).collect::<Vec<_>>(), tol);
            assert_within("rmsnorm", &rms, &want_rms, &ones, 1e-5);
            assert_within("layernorm", &ln, &want_ln, &ones, 1e-5);
        }
    }

    #[test]
    fn binary_broadcasts_like_numpy() {
        let mut b = CpuBackend::new(Determinism::Reproducible);
        let x = up(&mut b, &[2, 3], vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        let row = up(&mut b, &[3], vec![10.0, 20.0, 30.0]);
        let col = up(&mut b, &[2, 1], vec![100.0, 200.0]);
        let one = up(&mut b, &[1], vec![0.5]);
        assert_eq!(
            {
                let id = b.binary(BinaryOp::Add, x, row).unwrap();
                vals(&mut b, id)
            },
            vec![11.0, 22.0, 33.0, 14.0, 25.0, 36.0]
        );
        assert_eq!(
            {
                let id = b.binary(BinaryOp::Sub, col, x).unwrap();
                vals(&mut b, id)
            },
            vec![99.0, 98.0, 97.0, 196.0, 195.0, 194.0]
        );
        assert_eq!(
            {
                let id = b.binary(BinaryOp::Mul, one, x).unwrap();
                vals(&mut b, id)
            },
            vec![0.5, 1.0, 1.5, 2.0, 2.5, 3.0]
        );
        let outer = b.binary(BinaryOp::Div, col, row).unwrap();
        assert_eq!(b.shape(outer).unwrap(), vec![2, 3]);
        assert_eq!(vals(&mut b, outer), vec![10.0, 5.0, 100.0 / 30.0, 20.0, 10.0, 200.0 / 30.0]);
        let empty = up(&mut b, &[0, 3], vec![]);
        assert_eq!(
            {
                let id = b.binary(BinaryOp::Add, empty, row).unwrap();
                vals(&mut b, id)
            },
            Vec::<f32>::new()
        );
        let two = up(&mut b, &[2], vec![0.0; 2]);
        assert!(is_shape(b.binary(BinaryOp::Add, x, two)));
    }

    #[test]
    fn large_row_ops_are_the_same_threaded_or_not() {
        // Above PAR_MIN_ELEMS rows run on several threads; each row must equal the single-row result.
        let mut rng = fastrand::Rng::with_seed(13);
        let mut b = CpuBackend::new(Determinism::Reproducible);
        let (rows, last) = (300, 257);
        let xv = rand_vec(&mut rng, rows * last, 3.0);
        let x = up(&mut b, &[rows, last], xv.clone());
        let all = {
            let id = b.softmax_last(x).unwrap();
            vals(&mut b, id)
        };
        let ua = {
            let id = b.unary(UnaryOp::Gelu, x).unwrap();
            vals(&mut b, id)
        };
        for r in [0, 137, rows - 1] {
            let one = up(&mut b, &[1, last], xv[r * last..(r + 1) * last].to_vec());
            assert_eq!(
                bits(&{
                    let id = b.softmax_last(one).unwrap();
                    vals(&mut b, id)
                }),
                bits(&all[r * last..(r + 1) * last])
            );
            assert_eq!(
                bits(&{
                    let id = b.unary(UnaryOp::Gelu, one).unwrap();
                    vals(&mut b, id)
                }),
                bits(&ua[r * last..(r + 1) * last])
            );
        }
    }
}

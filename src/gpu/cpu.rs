//! The CPU backend: the reference every other backend is tested against, and the last fallback.
//!
//! Reductions (sum, mean, softmax, norms) and, in [`Determinism::Reproducible`] mode, matmul sum each
//! output sequentially in index order with a separate multiply and add (`acc = acc + a * b`; Rust never
//! contracts that into an FMA), exactly as the WGSL kernels in `shaders/` do, so the two agree bitwise.
//! In [`Determinism::Fast`] mode matmul goes through `matrixmultiply` (multi-threaded, SIMD) and
//! softmax uses `f32::exp`.

// `acc = acc + x` is spelled out to mirror the WGSL kernels line for line (Rust never contracts either form).
#![allow(clippy::assign_op_pattern)]

use std::collections::HashMap;

use super::{
    BackendKind, BinaryOp, Determinism, GpuError, HostTensor, MatmulDims, ReduceOp, Result, TensorBackend, TensorId, UnaryOp, broadcast,
    check_param, check_shape, matmul_dims, reduced_shape, repro_exp, rows_last, shape_err,
};

/// Tensors in host memory, keyed by handle.
#[derive(Debug)]
pub struct CpuBackend {
    determinism: Determinism,
    tensors: HashMap<TensorId, HostTensor>,
    next_id: u64,
}

impl CpuBackend {
    pub fn new(determinism: Determinism) -> Self {
        Self { determinism, tensors: HashMap::new(), next_id: 1 }
    }

    fn get(&self, id: TensorId) -> Result<&HostTensor> {
        self.tensors.get(&id).ok_or(GpuError::UnknownTensor(id))
    }

    fn insert(&mut self, t: HostTensor) -> TensorId {
        let id = TensorId(self.next_id);
        self.next_id += 1;
        self.tensors.insert(id, t);
        id
    }
}

impl TensorBackend for CpuBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Cpu
    }

    fn describe(&self) -> String {
        format!("cpu ({} threads)", std::thread::available_parallelism().map_or(1, |n| n.get()))
    }

    fn determinism(&self) -> Determinism {
        self.determinism
    }

    fn upload(&mut self, t: &HostTensor) -> Result<TensorId> {
        let t = HostTensor::new(t.shape.clone(), t.data.clone())?;
        Ok(self.insert(t))
    }

    fn read(&mut self, id: TensorId) -> Result<HostTensor> {
        self.get(id).cloned()
    }

    fn free(&mut self, id: TensorId) -> Result<()> {
        self.tensors.remove(&id).map(|_| ()).ok_or(GpuError::UnknownTensor(id))
    }

    fn shape(&self, id: TensorId) -> Result<Vec<usize>> {
        Ok(self.get(id)?.shape.clone())
    }

    fn matmul(&mut self, a: TensorId, b: TensorId, transpose_a: bool, transpose_b: bool) -> Result<TensorId> {
        let (ta, tb) = (self.get(a)?, self.get(b)?);
        let (dims, out_shape) = matmul_dims(&ta.shape, &tb.shape, transpose_a, transpose_b)?;
        let out = match self.determinism {
            Determinism::Reproducible => matmul_ordered(&dims, &ta.data, &tb.data),
            Determinism::Fast => matmul_fast(&dims, &ta.data, &tb.data),
        };
        Ok(self.insert(HostTensor { shape: out_shape, data: out }))
    }

    fn binary(&mut self, op: BinaryOp, a: TensorId, b: TensorId) -> Result<TensorId> {
        let (ta, tb) = (self.get(a)?, self.get(b)?);
        let bc = broadcast(op.name(), &ta.shape, &tb.shape)?;
        let f: fn(f32, f32) -> f32 = match op {
            BinaryOp::Add => |x, y| x + y,
            BinaryOp::Sub => |x, y| x - y,
            BinaryOp::Mul => |x, y| x * y,
            BinaryOp::Div => |x, y| x / y,
        };
        let [d0, d1, d2, d3] = bc.out4;
        let mut out = Vec::with_capacity(d0 * d1 * d2 * d3);
        for i0 in 0..d0 {
            for i1 in 0..d1 {
                for i2 in 0..d2 {
                    for i3 in 0..d3 {
                        let c = [i0, i1, i2, i3];
                        let ia: usize = c.iter().zip(bc.a_strides).map(|(c, s)| c * s).sum();
                        let ib: usize = c.iter().zip(bc.b_strides).map(|(c, s)| c * s).sum();
                        out.push(f(ta.data[ia], tb.data[ib]));
                    }
                }
            }
        }
        Ok(self.insert(HostTensor { shape: bc.out_shape, data: out }))
    }

    fn unary(&mut self, op: UnaryOp, x: TensorId) -> Result<TensorId> {
        let t = self.get(x)?;
        let data = t.data.iter().map(|&v| unary_f32(op, v)).collect();
        let shape = t.shape.clone();
        Ok(self.insert(HostTensor { shape, data }))
    }

    fn softmax_last(&mut self, x: TensorId) -> Result<TensorId> {
        let t = self.get(x)?;
        let (_, last) = rows_last(&t.shape);
        let exp: fn(f32) -> f32 = match self.determinism {
            Determinism::Reproducible => repro_exp,
            Determinism::Fast => f32::exp,
        };
        let mut out = t.data.clone();
        if last > 0 {
            for row in out.chunks_mut(last) {
                softmax_row(row, exp);
            }
        }
        let shape = t.shape.clone();
        Ok(self.insert(HostTensor { shape, data: out }))
    }

    fn rmsnorm(&mut self, x: TensorId, weight: TensorId, eps: f32) -> Result<TensorId> {
        let (t, w) = (self.get(x)?, self.get(weight)?);
        check_param("rmsnorm", "weight", &t.shape, &w.shape)?;
        let (_, last) = rows_last(&t.shape);
        let mut out = t.data.clone();
        if last > 0 {
            for row in out.chunks_mut(last) {
                rmsnorm_row(row, &w.data, eps);
            }
        }
        let shape = t.shape.clone();
        Ok(self.insert(HostTensor { shape, data: out }))
    }

    fn layernorm(&mut self, x: TensorId, weight: TensorId, bias: TensorId, eps: f32) -> Result<TensorId> {
        let (t, w, b) = (self.get(x)?, self.get(weight)?, self.get(bias)?);
        check_param("layernorm", "weight", &t.shape, &w.shape)?;
        check_param("layernorm", "bias", &t.shape, &b.shape)?;
        let (_, last) = rows_last(&t.shape);
        let mut out = t.data.clone();
        if last > 0 {
            for row in out.chunks_mut(last) {
                layernorm_row(row, &w.data, &b.data, eps);
            }
        }
        let shape = t.shape.clone();
        Ok(self.insert(HostTensor { shape, data: out }))
    }

    fn reduce_last(&mut self, op: ReduceOp, x: TensorId) -> Result<TensorId> {
        let t = self.get(x)?;
        let (rows, last) = rows_last(&t.shape);
        if op == ReduceOp::Argmax && last == 0 {
            return Err(shape_err("argmax_last", format!("the last axis of {:?} is empty", t.shape)));
        }
        let out_shape = reduced_shape(&t.shape);
        check_shape(op.name(), &out_shape)?;
        let data = (0..rows).map(|r| reduce_row(op, &t.data[r * last..(r + 1) * last])).collect();
        Ok(self.insert(HostTensor { shape: out_shape, data }))
    }
}

// ---- the reference kernels; `shaders/*.wgsl` mirror these operation for operation ----

/// One output at a time, k in order, `acc = acc + a * b` (no FMA): matches `matmul_naive` in WGSL.
pub(crate) fn matmul_ordered(d: &MatmulDims, a: &[f32], b: &[f32]) -> Vec<f32> {
    let (m, n, k) = (d.m, d.n, d.k);
    let mut out = vec![0.0f32; d.batch * m * n];
    for bi in 0..d.batch {
        let (oa, ob) = (bi * d.stride_a, bi * d.stride_b);
        for i in 0..m {
            for j in 0..n {
                let mut acc = 0.0f32;
                for p in 0..k {
                    let av = if d.transpose_a { a[oa + p * m + i] } else { a[oa + i * k + p] };
                    let bv = if d.transpose_b { b[ob + j * k + p] } else { b[ob + p * n + j] };
                    acc = acc + av * bv;
                }
                out[bi * m * n + i * n + j] = acc;
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
        // SAFETY: `a` holds m*k and `b` k*n values, `c` m*n; the strides describe [m,k], [k,n] and
        // [m,n] views (row- or column-major) that stay inside those slices, and `c` is not aliased.
        unsafe {
            matrixmultiply::sgemm(m, k, n, 1.0, a.as_ptr(), rsa, csa, b.as_ptr(), rsb, csb, 0.0, c.as_mut_ptr(), n as isize, 1);
        }
    }
    out
}

pub(crate) fn unary_f32(op: UnaryOp, x: f32) -> f32 {
    match op {
        UnaryOp::Scale(s) => x * s,
        UnaryOp::Relu => {
            if x > 0.0 {
                x
            } else {
                0.0
            }
        }
        UnaryOp::Gelu => 0.5 * x * (1.0 + (0.797_884_6 * (x + 0.044_715 * x * x * x)).tanh()),
        UnaryOp::Silu => x / (1.0 + (-x).exp()),
        UnaryOp::Tanh => x.tanh(),
        UnaryOp::Exp => x.exp(),
    }
}

/// NaN never compares greater, so it is skipped (an all-NaN row gives -inf / index 0).
pub(crate) fn reduce_row(op: ReduceOp, row: &[f32]) -> f32 {
    match op {
        ReduceOp::Sum => row_sum(row),
        ReduceOp::Mean => row_sum(row) / row.len() as f32,
        ReduceOp::Max => row_max(row),
        ReduceOp::Argmax => {
            let (mut best, mut idx) = (row[0], 0usize);
            for (i, &v) in row.iter().enumerate().skip(1) {
                if v > best || (best.is_nan() && !v.is_nan()) {
                    best = v;
                    idx = i;
                }
            }
            idx as f32
        }
    }
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

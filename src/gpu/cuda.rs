//! The CUDA backend (cudarc, libcuda and NVRTC loaded at run time): `kernels/*.cu` compiled by NVRTC
//! once per backend. [`CudaBackend::new`] checks for the driver, a device and NVRTC before any call that
//! could panic (cudarc's dynamic loading panics on a missing library) and reports
//! "unavailable: no CUDA driver" cleanly.
//!
//! This slice implements upload/read/free and the elementwise ops (`kernels/elementwise.cu`); matmul,
//! reductions, softmax and norms return [`GpuError::Unsupported`] until their kernels land. Not yet
//! exercised by CI (no CUDA there).

use std::collections::HashMap;
use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DeviceRepr, LaunchConfig, PushKernelArg};

use super::kernels::{self, Lang};
use super::{BackendKind, BinaryOp, Determinism, GpuError, HostTensor, ReduceOp, Result, TensorBackend, TensorId, UnaryOp, broadcast};

struct CudaTensor {
    shape: Vec<usize>,
    data: CudaSlice<f32>,
}

/// One CUDA context on device 0 with its default stream and the compiled elementwise module.
pub struct CudaBackend {
    determinism: Determinism,
    name: String,
    stream: Arc<CudaStream>,
    module: Arc<CudaModule>,
    tensors: HashMap<TensorId, CudaTensor>,
    next_id: u64,
}

impl std::fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaBackend").field("name", &self.name).field("tensors", &self.tensors.len()).finish()
    }
}

/// Mirrors `struct Broadcast4` in kernels/elementwise.cu.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct Broadcast4 {
    d1: u32,
    d2: u32,
    d3: u32,
    a_strides: [u32; 4],
    b_strides: [u32; 4],
}

// SAFETY: `Broadcast4` is `repr(C)`, plain old data, and matches the C struct field for field.
unsafe impl DeviceRepr for Broadcast4 {}

fn unavailable(why: impl std::fmt::Display) -> GpuError {
    GpuError::Device(format!("unavailable: {why}"))
}

fn dev_err(what: &str, e: impl std::fmt::Debug) -> GpuError {
    GpuError::Device(format!("cuda {what}: {e:?}"))
}

/// Checks, without any call that can panic, that libcuda, a device and libnvrtc are there.
fn check_available() -> Result<()> {
    // SAFETY: only dlopen()s candidate library names (see src/capacity/cuda.rs).
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(unavailable("no CUDA driver"));
    }
    let n = CudaContext::device_count().map_err(|e| unavailable(format!("cuda device count: {e:?}")))?;
    if n <= 0 {
        return Err(unavailable("no CUDA devices"));
    }
    // SAFETY: as above, for libnvrtc.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err(unavailable("no libnvrtc"));
    }
    Ok(())
}

impl CudaBackend {
    pub fn new(determinism: Determinism) -> Result<Self> {
        check_available()?;
        // Past the check every library is loadable; catch_unwind is a second line of defence.
        std::panic::catch_unwind(|| Self::start(determinism)).unwrap_or_else(|_| Err(GpuError::Device("cuda start panicked".to_owned())))
    }

    fn start(determinism: Determinism) -> Result<Self> {
        let ctx = CudaContext::new(0).map_err(|e| dev_err("context", e))?;
        let name = ctx.name().unwrap_or_else(|_| "cuda device 0".to_owned());
        let stream = ctx.default_stream();
        let file =
            kernels::file_of(Lang::Cuda, "add_f32").ok_or_else(|| GpuError::Device("elementwise.cu is not registered".to_owned()))?;
        // No fast math and no FMA contraction: the elementwise results must equal the CPU's bitwise.
        let opts = cudarc::nvrtc::CompileOptions { use_fast_math: Some(false), fmad: Some(false), ..Default::default() };
        let ptx = cudarc::nvrtc::compile_ptx_with_opts(file.source, opts).map_err(|e| dev_err(&format!("nvrtc {}", file.path), e))?;
        let module = ctx.load_module(ptx).map_err(|e| dev_err("load module", e))?;
        Ok(Self { determinism, name, stream, module, tensors: HashMap::new(), next_id: 1 })
    }

    fn get(&self, id: TensorId) -> Result<&CudaTensor> {
        self.tensors.get(&id).ok_or(GpuError::UnknownTensor(id))
    }

    fn insert(&mut self, t: CudaTensor) -> TensorId {
        let id = TensorId(self.next_id);
        self.next_id += 1;
        self.tensors.insert(id, t);
        id
    }

    fn function(&self, name: &str) -> Result<CudaFunction> {
        self.module.load_function(name).map_err(|e| dev_err(name, e))
    }

    fn unsupported(op: &'static str) -> GpuError {
        GpuError::Unsupported { op, backend: "cuda".to_owned() }
    }
}

fn u32_of(v: usize) -> u32 {
    // Shapes are checked to stay below u32::MAX / 4 elements before they reach a kernel.
    v as u32
}

impl TensorBackend for CudaBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Cuda
    }
    fn describe(&self) -> String {
        format!("cuda ({})", self.name)
    }
    fn determinism(&self) -> Determinism {
        self.determinism
    }
    fn upload(&mut self, t: &HostTensor) -> Result<TensorId> {
        let t = HostTensor::new(t.shape.clone(), t.data.clone())?;
        // Zero-sized device allocations are not portable: an empty tensor keeps a one-element buffer.
        let data = if t.data.is_empty() { self.stream.alloc_zeros::<f32>(1) } else { self.stream.clone_htod(&t.data) };
        let data = data.map_err(|e| dev_err("upload", e))?;
        Ok(self.insert(CudaTensor { shape: t.shape, data }))
    }
    fn read(&mut self, id: TensorId) -> Result<HostTensor> {
        let t = self.get(id)?;
        let mut data = self.stream.clone_dtoh(&t.data).map_err(|e| dev_err("read", e))?;
        data.truncate(super::numel(&t.shape));
        Ok(HostTensor { shape: t.shape.clone(), data })
    }
    fn free(&mut self, id: TensorId) -> Result<()> {
        self.tensors.remove(&id).map(|_| ()).ok_or(GpuError::UnknownTensor(id))
    }
    fn shape(&self, id: TensorId) -> Result<Vec<usize>> {
        Ok(self.get(id)?.shape.clone())
    }
    fn matmul(&mut self, _a: TensorId, _b: TensorId, _ta: bool, _tb: bool) -> Result<TensorId> {
        Err(Self::unsupported("matmul"))
    }
    fn binary(&mut self, op: BinaryOp, a: TensorId, b: TensorId) -> Result<TensorId> {
        let (ta, tb) = (self.get(a)?, self.get(b)?);
        let bc = broadcast(op.name(), &ta.shape, &tb.shape)?;
        let n = super::numel(&bc.out_shape);
        let mut out = self.stream.alloc_zeros::<f32>(n.max(1)).map_err(|e| dev_err("alloc", e))?;
        if n > 0 {
            let f = self.function(&format!("{}_f32", op.name()))?;
            let p = Broadcast4 {
                d1: u32_of(bc.out4[1]),
                d2: u32_of(bc.out4[2]),
                d3: u32_of(bc.out4[3]),
                a_strides: bc.a_strides.map(u32_of),
                b_strides: bc.b_strides.map(u32_of),
            };
            let n32 = u32_of(n);
            let mut lb = self.stream.launch_builder(&f);
            lb.arg(&ta.data).arg(&tb.data).arg(&mut out).arg(&n32).arg(&p);
            // SAFETY: the argument list matches the BINARY kernels' signature; every index the kernel
            // computes is < n for `out` and inside `a` / `b` by the broadcast strides.
            unsafe { lb.launch(LaunchConfig::for_num_elems(n32)) }.map_err(|e| dev_err("launch", e))?;
        }
        Ok(self.insert(CudaTensor { shape: bc.out_shape, data: out }))
    }
    fn unary(&mut self, op: UnaryOp, x: TensorId) -> Result<TensorId> {
        let t = self.get(x)?;
        let n = t.data.len();
        let factor = if let UnaryOp::Scale(s) = op { s } else { 1.0 };
        let mut out = self.stream.alloc_zeros::<f32>(n.max(1)).map_err(|e| dev_err("alloc", e))?;
        if n > 0 {
            let f = self.function(&format!("{}_f32", op.name()))?;
            let n32 = u32_of(n);
            let mut lb = self.stream.launch_builder(&f);
            lb.arg(&t.data).arg(&mut out).arg(&n32).arg(&factor);
            // SAFETY: the argument list matches the UNARY kernels' signature; indices are < n.
            unsafe { lb.launch(LaunchConfig::for_num_elems(n32)) }.map_err(|e| dev_err("launch", e))?;
        }
        let shape = t.shape.clone();
        Ok(self.insert(CudaTensor { shape, data: out }))
    }
    fn softmax_last(&mut self, _x: TensorId) -> Result<TensorId> {
        Err(Self::unsupported("softmax_last"))
    }
    fn rmsnorm(&mut self, _x: TensorId, _w: TensorId, _eps: f32) -> Result<TensorId> {
        Err(Self::unsupported("rmsnorm"))
    }
    fn layernorm(&mut self, _x: TensorId, _w: TensorId, _b: TensorId, _eps: f32) -> Result<TensorId> {
        Err(Self::unsupported("layernorm"))
    }
    fn reduce_last(&mut self, op: ReduceOp, _x: TensorId) -> Result<TensorId> {
        Err(Self::unsupported(op.name()))
    }
}

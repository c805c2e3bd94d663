//! The device layer under the CUDA backend: a small [`Device`] trait (allocate, copy, launch a
//! kernel by name, cuBLAS SGEMM) and its implementation on one CUDA device through cudarc.
//!
//! The backend logic in `mod.rs` only talks to this trait, so the unit tests run it unchanged on a
//! host emulator of the kernels (`emu.rs`); everything here is the thin part that needs a GPU.
//!
//! All work goes to one stream in order, so no event tracking is needed (it is switched off:
//! cudarc would otherwise create two events per allocation). Device memory is only touched through
//! raw pointers on that stream; downloads synchronize it.

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::Arc;

use cudarc::driver::result::DriverError;
use cudarc::driver::sys::{CUdeviceptr, CUresult};
use cudarc::driver::{CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr};

use super::compile::{self, Image};
use super::launch::{BLOCK, GemmPlan, Target, choose_target};
use crate::gpu::kernels::{FILES, Lang};
use crate::gpu::{GpuError, Result};

/// One kernel argument, in the order of the kernel's C parameter list.
pub enum Arg<'a, B> {
    /// A device buffer (the kernel sees a pointer to its first byte).
    Buf(&'a B),
    U32(u32),
    F32(f32),
    /// A parameter struct by value (see `plan::bytes_of`).
    Pod(&'a [u8]),
}

/// What the backend needs from a device. Buffers are byte arrays; every call is ordered after
/// the previous ones on the device, and only [`Device::download`] waits for the device.
pub trait Device {
    type Buf;
    /// Such as "NVIDIA H100 80GB HBM3, sm_90".
    fn describe(&self) -> String;
    /// The device's number among the driver's devices (0 for an emulated device).
    fn ordinal(&self) -> usize {
        0
    }
    /// An uninitialized buffer of `bytes` bytes (`bytes > 0`).
    fn alloc(&self, bytes: usize) -> Result<Self::Buf>;
    fn capacity(buf: &Self::Buf) -> usize;
    fn upload(&self, dst: &Self::Buf, offset: usize, data: &[u8]) -> Result<()>;
    /// Waits for the device and returns `len` bytes at `offset`.
    fn download(&self, src: &Self::Buf, offset: usize, len: usize) -> Result<Vec<u8>>;
    fn copy(&self, src: &Self::Buf, src_offset: usize, dst: &Self::Buf, dst_offset: usize, len: usize) -> Result<()>;
    fn zero(&self, dst: &Self::Buf, offset: usize, len: usize) -> Result<()>;
    /// Launches `kernel` with `grid` blocks of [`BLOCK`] threads.
    fn launch(&self, kernel: &str, grid: u32, args: &[Arg<'_, Self::Buf>]) -> Result<()>;
    /// `c = a @ b` through cuBLAS as planned, or `None` when cuBLAS is not loaded.
    fn gemm(&self, plan: &GemmPlan, a: &Self::Buf, b: &Self::Buf, c: &Self::Buf) -> Option<Result<()>>;
    /// Reports an asynchronous failure recorded since the last call, without waiting.
    fn check(&self) -> Result<()>;
    /// Makes the device current on the calling thread. Every call above does this itself; dropping
    /// a buffer does not (cudarc frees on the current context), so call it before freeing.
    fn bind(&self) -> Result<()>;
}

/// `[offset, offset + len)` lies inside a buffer of `cap` bytes.
pub(crate) fn check_range(what: &str, cap: usize, offset: usize, len: usize) -> Result<()> {
    if offset.checked_add(len).is_none_or(|end| end > cap) {
        return Err(GpuError::Device(format!("cuda {what}: bytes [{offset}, {offset}+{len}) outside a buffer of {cap}")));
    }
    Ok(())
}

/// "CUDA_ERROR_ILLEGAL_ADDRESS: an illegal memory access was encountered".
pub(crate) fn describe_driver_error(e: &DriverError) -> String {
    match e.error_string() {
        Ok(s) => format!("{:?}: {}", e.0, s.to_string_lossy()),
        Err(_) => format!("{:?}", e.0),
    }
}

fn dev_err(what: &str, e: DriverError) -> GpuError {
    GpuError::Device(format!("cuda {what}: {}", describe_driver_error(&e)))
}

/// One CUDA device: its primary context, the stream everything runs on, every kernel of
/// `kernels/*.cu` and, in fast mode where the library loads, a cuBLAS handle.
pub struct RealDevice {
    // Declared first so it is dropped before the stream it uses.
    blas: Option<cudarc::cublas::CudaBlas>,
    functions: HashMap<&'static str, CudaFunction>,
    stream: Arc<CudaStream>,
    ctx: Arc<CudaContext>,
    name: String,
    target: Target,
    ordinal: usize,
}

impl std::fmt::Debug for RealDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RealDevice").field("name", &self.name).field("target", &self.target).field("cublas", &self.blas.is_some()).finish()
    }
}

impl RealDevice {
    /// Opens device `ordinal` and builds every kernel (from the disk cache when possible). The
    /// caller has checked that libcuda and libnvrtc load and that the device exists.
    pub fn open(ordinal: usize, want_blas: bool) -> Result<Self> {
        let ctx = CudaContext::new(ordinal).map_err(|e| dev_err(&format!("context on device {ordinal}"), e))?;
        // SAFETY: nothing has been allocated yet, and all work goes to one stream, so no cross-stream
        // synchronization is ever needed.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.default_stream();
        let name = ctx.name().map_err(|e| dev_err("device name", e))?;
        let (major, minor) = ctx.compute_capability().map_err(|e| dev_err("compute capability", e))?;
        keep_pool_memory(&ctx);

        let nvrtc = compile::nvrtc_version().map_err(GpuError::Device)?;
        let archs = compile::supported_archs().map_err(GpuError::Device)?;
        let target = choose_target(major, minor, &archs).ok_or_else(|| {
            GpuError::Device(format!(
                "unavailable: NVRTC {}.{} cannot compile for sm_{major}{minor} (supports {archs:?})",
                nvrtc.0, nvrtc.1
            ))
        })?;
        let cache = compile::cache_dir(std::env::var_os("XDG_CACHE_HOME"), std::env::var_os("HOME"));
        let started = std::time::Instant::now();
        let (mut functions, mut compiled, mut cached) = (HashMap::new(), 0, 0);
        for file in FILES.iter().filter(|f| f.lang == Lang::Cuda) {
            let (module, from_cache) = load_module(&ctx, file.path, file.source, target, nvrtc, cache.as_deref())?;
            if from_cache {
                cached += 1
            } else {
                compiled += 1
            }
            for entry in file.entries {
                let f = module.load_function(entry.name).map_err(|e| dev_err(&format!("{}: kernel {}", file.path, entry.name), e))?;
                functions.insert(entry.name, f);
            }
        }
        tracing::info!(
            device = %name, ordinal, arch = %target.arch(), nvrtc = %format!("{}.{}", nvrtc.0, nvrtc.1),
            compiled, cached, cache_dir = ?cache, ms = started.elapsed().as_millis() as u64, "cuda kernels ready"
        );

        let blas = if want_blas { open_blas(&stream) } else { None };
        if want_blas {
            match &blas {
                Some(_) => tracing::info!(device = %name, "cuda f32 matmul: cuBLAS"),
                None => tracing::warn!(device = %name, "cuda f32 matmul: cuBLAS unavailable, using the NVRTC tiled kernel"),
            }
        } else {
            tracing::info!(device = %name, "cuda f32 matmul: fixed-order NVRTC kernel (reproducible mode never uses cuBLAS)");
        }
        Ok(Self { blas, functions, stream, ctx, name, target, ordinal })
    }

    fn ptr(buf: &CudaSlice<u8>, stream: &CudaStream) -> CUdeviceptr {
        // Event tracking is off, so the returned guard does nothing.
        let (ptr, _guard) = buf.device_ptr(stream);
        ptr
    }
}

/// Keeps freed memory in the device's default pool instead of returning it to the driver at every
/// synchronization (its default), so the allocate / free of every op stays cheap. Best effort.
fn keep_pool_memory(ctx: &CudaContext) {
    use cudarc::driver::sys;
    if !ctx.has_async_alloc() {
        return;
    }
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    let mut threshold: u64 = u64::MAX;
    // SAFETY: the device handle is live; both out/in pointers are valid for the calls.
    let r = unsafe {
        let r = sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device());
        if r != CUresult::CUDA_SUCCESS {
            r
        } else {
            sys::cuMemPoolSetAttribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                (&mut threshold as *mut u64).cast::<c_void>(),
            )
        }
    };
    if r != CUresult::CUDA_SUCCESS {
        tracing::debug!(result = ?r, "could not raise the memory pool's release threshold");
    }
}

/// A module for one kernel file: from the cache when a valid entry exists and loads, else
/// compiled (and the cache entry written).
fn load_module(
    ctx: &Arc<CudaContext>,
    path: &'static str,
    source: &'static str,
    target: Target,
    nvrtc: (i32, i32),
    cache: Option<&std::path::Path>,
) -> Result<(Arc<cudarc::driver::CudaModule>, bool)> {
    let options = compile::options_for(target);
    let file = cache.map(|dir| compile::cache_file(dir, path, target, &compile::cache_key(path, source, &options, target, nvrtc)));
    if let Some(image) = file.as_deref().and_then(|f| compile::read_cached(f, target)) {
        match load_image(ctx, &image) {
            Ok(m) => return Ok((m, true)),
            Err(e) => tracing::warn!(path, error = %e, "cached CUDA kernels did not load; recompiling"),
        }
    }
    let image = compile::compile(path, source, target).map_err(|e| GpuError::Device(format!("cuda kernel compile: {e}")))?;
    let module = load_image(ctx, &image).map_err(|e| GpuError::Device(format!("cuda module {path} ({}): {e}", target.arch())))?;
    if let Some(f) = &file {
        compile::write_cached(f, &image);
    }
    Ok((module, false))
}

fn load_image(ctx: &Arc<CudaContext>, image: &Image) -> std::result::Result<Arc<cudarc::driver::CudaModule>, String> {
    let ptx = match image.target {
        Target::Cubin(_) => cudarc::nvrtc::Ptx::from_binary(image.bytes.clone()),
        // `read_cached` / `compile` guarantee NUL-free UTF-8 PTX (cudarc would panic otherwise).
        Target::Ptx(_) => cudarc::nvrtc::Ptx::from_src(String::from_utf8(image.bytes.clone()).map_err(|e| e.to_string())?),
    };
    ctx.load_module(ptx).map_err(|e| describe_driver_error(&e))
}

/// A cuBLAS handle on `stream`, or `None` (logged) when libcublas does not load.
fn open_blas(stream: &Arc<CudaStream>) -> Option<cudarc::cublas::CudaBlas> {
    // SAFETY: only dlopen()s the candidate library names.
    if !unsafe { cudarc::cublas::sys::is_culib_present() } {
        tracing::warn!("libcublas not found (set LD_LIBRARY_PATH to the CUDA 13 libraries)");
        return None;
    }
    match std::panic::catch_unwind(|| cudarc::cublas::CudaBlas::new(stream.clone())) {
        Ok(Ok(b)) => Some(b),
        Ok(Err(e)) => {
            tracing::warn!(error = ?e, "cublasCreate failed");
            None
        }
        Err(_) => {
            tracing::warn!("loading cuBLAS panicked (a missing symbol?)");
            None
        }
    }
}

impl Device for RealDevice {
    type Buf = CudaSlice<u8>;

    fn ordinal(&self) -> usize {
        self.ordinal
    }

    fn describe(&self) -> String {
        match self.target {
            Target::Cubin(a) => format!("{}, sm_{a}", self.name),
            Target::Ptx(a) => format!("{}, compute_{a} PTX", self.name),
        }
    }

    fn alloc(&self, bytes: usize) -> Result<CudaSlice<u8>> {
        self.bind()?;
        // SAFETY: u8 has no invalid bit patterns; the contents are written before they are read.
        match unsafe { self.stream.alloc::<u8>(bytes.max(1)) } {
            Ok(b) => Ok(b),
            Err(e) if e.0 == CUresult::CUDA_ERROR_OUT_OF_MEMORY => {
                let available = self.ctx.mem_get_info().map_or(0, |(free, _)| free as u64);
                Err(GpuError::OutOfMemory { requested: bytes as u64, available })
            }
            Err(e) => Err(dev_err("alloc", e)),
        }
    }

    fn capacity(buf: &CudaSlice<u8>) -> usize {
        buf.len()
    }

    fn upload(&self, dst: &CudaSlice<u8>, offset: usize, data: &[u8]) -> Result<()> {
        check_range("upload", dst.len(), offset, data.len())?;
        if data.is_empty() {
            return Ok(());
        }
        self.bind()?;
        let ptr = Self::ptr(dst, &self.stream) + offset as u64;
        // SAFETY: the range is inside the allocation; a pageable source is staged before the call
        // returns, so `data` may be dropped afterwards.
        unsafe { cudarc::driver::result::memcpy_htod_async(ptr, data, self.stream.cu_stream()) }.map_err(|e| dev_err("upload", e))
    }

    fn download(&self, src: &CudaSlice<u8>, offset: usize, len: usize) -> Result<Vec<u8>> {
        check_range("download", src.len(), offset, len)?;
        let mut out = vec![0u8; len];
        self.bind()?;
        if len > 0 {
            let ptr = Self::ptr(src, &self.stream) + offset as u64;
            // SAFETY: the range is inside the allocation and `out` holds `len` bytes; the stream is
            // synchronized below before `out` is used.
            unsafe { cudarc::driver::result::memcpy_dtoh_async(&mut out, ptr, self.stream.cu_stream()) }
                .map_err(|e| dev_err("download", e))?;
        }
        self.stream.synchronize().map_err(|e| dev_err("synchronize", e))?;
        self.check()?;
        Ok(out)
    }

    fn copy(&self, src: &CudaSlice<u8>, src_offset: usize, dst: &CudaSlice<u8>, dst_offset: usize, len: usize) -> Result<()> {
        check_range("copy source", src.len(), src_offset, len)?;
        check_range("copy destination", dst.len(), dst_offset, len)?;
        if len == 0 {
            return Ok(());
        }
        self.bind()?;
        let (s, d) = (Self::ptr(src, &self.stream) + src_offset as u64, Self::ptr(dst, &self.stream) + dst_offset as u64);
        // SAFETY: both ranges are inside their allocations (distinct tensors, never overlapping).
        unsafe { cudarc::driver::result::memcpy_dtod_async(d, s, len, self.stream.cu_stream()) }.map_err(|e| dev_err("copy", e))
    }

    fn zero(&self, dst: &CudaSlice<u8>, offset: usize, len: usize) -> Result<()> {
        check_range("zero", dst.len(), offset, len)?;
        if len == 0 {
            return Ok(());
        }
        self.bind()?;
        let ptr = Self::ptr(dst, &self.stream) + offset as u64;
        // SAFETY: the range is inside the allocation.
        unsafe { cudarc::driver::result::memset_d8_async(ptr, 0, len, self.stream.cu_stream()) }.map_err(|e| dev_err("memset", e))
    }

    fn launch(&self, kernel: &str, grid: u32, args: &[Arg<'_, CudaSlice<u8>>]) -> Result<()> {
        let f = self.functions.get(kernel).ok_or_else(|| GpuError::Device(format!("cuda kernel {kernel} is not loaded")))?;
        self.bind()?;
        // Device pointers first, in a vector that does not grow while its elements are referenced.
        let ptrs: Vec<CUdeviceptr> =
            args.iter().filter_map(|a| if let Arg::Buf(b) = a { Some(Self::ptr(b, &self.stream)) } else { None }).collect();
        let mut next_ptr = ptrs.iter();
        let mut params: Vec<*mut c_void> = Vec::with_capacity(args.len());
        for a in args {
            let p: *const c_void = match a {
                Arg::Buf(_) => next_ptr.next().map_or(std::ptr::null(), |p| (p as *const CUdeviceptr).cast()),
                Arg::U32(v) => (v as *const u32).cast(),
                Arg::F32(v) => (v as *const f32).cast(),
                Arg::Pod(bytes) => bytes.as_ptr().cast(),
            };
            params.push(p.cast_mut());
        }
        // SAFETY: `params` points at one value per kernel parameter, in order, of the sizes the
        // kernel declares (the callers in mod.rs mirror each kernel's C signature); all of them
        // outlive the call, which copies them. Buffers are live allocations of this context.
        unsafe {
            cudarc::driver::result::launch_kernel(f.cu_function(), (grid, 1, 1), (BLOCK, 1, 1), 0, self.stream.cu_stream(), &mut params)
        }
        .map_err(|e| dev_err(&format!("launch {kernel}"), e))
    }

    fn gemm(&self, plan: &GemmPlan, a: &CudaSlice<u8>, b: &CudaSlice<u8>, c: &CudaSlice<u8>) -> Option<Result<()>> {
        use cudarc::cublas::sys::cublasOperation_t::{CUBLAS_OP_N, CUBLAS_OP_T};
        let blas = self.blas.as_ref()?;
        if let Err(e) = self.bind() {
            return Some(Err(e));
        }
        let op = |t: bool| if t { CUBLAS_OP_T } else { CUBLAS_OP_N };
        let (pa, pb, pc) = (Self::ptr(a, &self.stream), Self::ptr(b, &self.stream), Self::ptr(c, &self.stream));
        let (alpha, beta) = (1.0f32, 0.0f32);
        // SAFETY: the plan describes f32 matrices inside these allocations (checked by the caller
        // from the tensor shapes); the handle runs on this device's stream; alpha / beta are host
        // values that outlive the call.
        let r = unsafe {
            cudarc::cublas::result::sgemm_strided_batched(
                *blas.handle(),
                op(plan.trans_first),
                op(plan.trans_second),
                plan.m,
                plan.n,
                plan.k,
                &alpha,
                pb as *const f32,
                plan.ld_first,
                plan.stride_first,
                pa as *const f32,
                plan.ld_second,
                plan.stride_second,
                &beta,
                pc as *mut f32,
                plan.ldc,
                plan.stride_c,
                plan.batch,
            )
        };
        Some(r.map_err(|e| GpuError::Device(format!("cublasSgemmStridedBatched: {e:?}"))))
    }

    fn check(&self) -> Result<()> {
        self.ctx.check_err().map_err(|e| dev_err("asynchronous error", e))
    }

    fn bind(&self) -> Result<()> {
        self.ctx.bind_to_thread().map_err(|e| dev_err("bind context", e))
    }
}

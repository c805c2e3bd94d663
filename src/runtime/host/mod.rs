//! The host side of the actor ABI: one module per host capability, each with its own
//! `add_to_linker(linker, get)` (the wasmtime idiom), and `HostState`, what every store carries.
//!
//! * [`wasi`]: the deterministic WASI subset (clock = message time, random seeded from the message
//!   id, stdout captured);
//! * [`gpu`]: the `ao_gpu` tensor interface, a thin binding over `crate::gpu`;
//! * [`nn`]: `wasi_ephemeral_nn` with GGML semantics, a thin binding over `crate::llm`.
//!
//! A binding decodes the guest's arguments, delegates, and maps the outcome to a status or a trap;
//! what an op means and costs lives in `crate::gpu::op`, never here.

pub mod gpu;
pub mod nn;
pub mod wasi;

use wasmtime::Linker;

use self::gpu::GpuCtx;
use self::nn::NnCtx;
use self::wasi::WasiCtx;
use super::limits::StoreLimiter;

/// What every store carries.
pub(in crate::runtime) struct HostState {
    pub(in crate::runtime) limiter: StoreLimiter,
    pub(in crate::runtime) wasi: WasiCtx,
    pub(in crate::runtime) gpu: GpuCtx,
    pub(in crate::runtime) nn: NnCtx,
}

fn wasi_ctx(state: &mut HostState) -> &mut WasiCtx {
    &mut state.wasi
}

fn gpu_ctx(state: &mut HostState) -> &mut GpuCtx {
    &mut state.gpu
}

fn nn_ctx(state: &mut HostState) -> &mut NnCtx {
    &mut state.nn
}

/// Links every host module into `linker`.
pub(in crate::runtime) fn add_to_linker(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    wasi::add_to_linker(linker, wasi_ctx)?;
    gpu::add_to_linker(linker, gpu_ctx)?;
    nn::add_to_linker(linker, nn_ctx)
}

//! ao-gpu-worker: a compute provider for AO. The README's "Architecture" section is the full code
//! map; in one breath, floor by floor (each module imports only from floors below it):
//!
//! * ground: [`protocol`] (wire types), [`clock`], [`sync`], [`metrics`] (the registry);
//! * [`gpu`]: tensors on CPU / wgpu / CUDA; [`gpu::op`] is the op vocabulary and its checks,
//!   [`gpu::TensorOps::run`] the one checked dispatch. Knows no Wasm, actor or network;
//! * [`attest`], [`capacity`], [`journal`], [`httpd`];
//! * [`runtime`]: the only user of wasmtime; [`runtime::host`] holds one binding per host
//!   capability (`wasi`, `ao_gpu`), each thin: decode, delegate to `gpu`, map errors;
//! * [`gguf`], [`advertise`], [`config`], [`bench`]; [`net`] (unit clients), [`logging`];
//! * [`jobs`] (the work loop), [`devnet`] (embedded AO units), [`model`] (GGUF publishing);
//! * the service: [`state`], [`api`], [`daemon`]; then [`demo`] and [`cli`] at the top.

pub mod advertise;
pub mod api;
pub mod attest;
pub mod bench;
pub mod capacity;
pub mod cli;
pub mod clock;
pub mod config;
pub mod daemon;
pub mod demo;
pub mod devnet;
pub mod gguf;
pub mod gpu;
pub mod httpd;
pub mod jobs;
pub mod journal;
pub mod llm;
pub mod logging;
pub mod metrics;
pub mod model;
pub mod net;
pub mod protocol;
pub mod runtime;
pub mod state;
pub mod sync;

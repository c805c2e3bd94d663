//! ao-gpu-worker: a compute provider for AO. The README's "Architecture" section is the full code
//! map; in one breath, floor by floor (each module imports only from floors below it):
//!
//! * ground: [`protocol`] (wire types), [`clock`], [`sync`], [`metrics`] (the registry),
//!   [`progress`] (bars or periodic lines);
//! * [`gpu`]: tensors on CPU / wgpu / CUDA; [`gpu::op`] is the op vocabulary and its checks,
//!   [`gpu::TensorOps::run`] the one checked dispatch. Knows no Wasm, actor or network;
//! * [`attest`], [`capacity`], [`journal`], [`httpd`];
//! * [`runtime`]: the only user of wasmtime; [`runtime::host`] holds one binding per host
//!   capability (`wasi`, `ao_gpu`), each thin: decode, delegate to `gpu`, map errors;
//! * [`gguf`], [`advertise`], [`config`], [`bench`]; [`net`] (unit clients), [`logging`],
//!   [`reload`] (SIGHUP);
//! * [`jobs`] (the work loop), [`devnet`] (embedded AO units), [`model`] (GGUF publishing),
//!   [`verifier`] (re-execution of attested results);
//! * the service: [`state`], [`status`], [`api`], [`compaction`] (journal retention), [`daemon`]; [`doctor`] (the preflight); then
//!   [`demo`] and [`cli`] at the top.

pub mod admission;
pub mod advertise;
pub mod api;
pub mod attest;
pub mod bench;
pub mod capacity;
pub mod cli;
pub mod clock;
pub mod compaction;
pub mod config;
pub mod daemon;
pub mod demo;
pub mod devnet;
pub mod doctor;
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
pub mod progress;
pub mod protocol;
pub mod reload;
pub mod runtime;
pub mod state;
pub mod status;
pub mod sync;
pub mod verifier;

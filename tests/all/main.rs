//! The integration tests, in one binary: each former `tests/*.rs` file is a module here (so
//! wasmtime and wgpu are linked once, not once per file), with the helpers they share in
//! [`support`]. `cargo test --test all <module>::` runs one suite, such as
//! `cargo test --test all gpu_conformance::`.
//!
//! All tests share one process: nothing here may set environment variables, install a global
//! (tracing subscriber, rayon pool) or change the working directory.

mod support;

mod actors;
mod actors_build;
mod ans104;
mod ao_gpu;
mod aos;
mod aos_devnet;
mod aos_live;
mod architecture;
mod attestation_format;
mod backend_selection;
mod bench;
mod cli;
mod crash;
mod cu_api;
mod cuda_backend;
mod dashboard;
mod device_pool;
mod devnet;
mod doctor;
mod gpu_conformance;
mod hostile;
mod interop_aoconnect;
mod interop_arbundles;
mod jobs;
mod kernels_registered;
mod llm_tokenizer;
mod net_clients;
mod nn_chat;
mod overload;
mod recovery;
mod reload;
mod retention;
mod run_e2e;
mod sign_once;
mod smollm2;
mod status;
mod verify;
mod wgpu_matmul;

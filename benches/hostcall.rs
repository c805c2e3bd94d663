//! Host-call overhead from Wasm, through the production runtime (`Runtime::evaluate` with WAT
//! actors: the worker's engine configuration with fuel metering and epoch interruption, and its
//! linker with the WASI subset and `ao_gpu`), see `ao_gpu_worker::bench::HostCallBench`.
//!
//! Run with `cargo bench --bench hostcall [-- FILTER]`. Each benchmark is one evaluation whose actor
//! loops `iters` times over the call(s) under test; criterion's linear sampling (iters = d, 2d, ...)
//! fits time against iterations, and the slope it reports as `time` is the cost of one iteration,
//! with the per-evaluation cost (instantiation, message placement, result JSON) in the intercept.
//!
//! - `hostcall/empty`: `wasi_snapshot_preview1.sched_yield`, a host function that does nothing
//!   (target: under 100 ns).
//! - `hostcall/ao_gpu_noop`: `ao_gpu.free(0)`, the `ao_gpu` call path (fuel settlement, memory
//!   lookup, handle check) without an op.
//! - `tiny_op/BACKEND/scale_free`: `scale` of a 4-element tensor and `free` of the result;
//!   `tiny_op/BACKEND/scale_read_free` adds a `read_f32`, i.e. a device sync, per iteration.
//! - `ops100/BACKEND/one_by_one`: 100 `scale` ops on a 64-element tensor, one host call each, each
//!   intermediate freed once the next exists, then a read and a free (201 calls);
//!   `ops100/BACKEND/batched`: the same 100 scales and 99 frees as one `ao_gpu.run` command list,
//!   then the read and the free (3 calls). Target: batched at least 2x faster than one by one.
//!
//! `AO_BENCH_BACKENDS` (default cpu,wgpu,cuda) and `AO_BENCH_MODE` (default reproducible, the
//! worker's default) choose the backends behind `ao_gpu`; one that cannot start is skipped.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use ao_gpu_worker::bench::{HostCall, HostCallBench, gpu_function_linked};
use ao_gpu_worker::gpu::{Backend, BackendKind, Determinism};
use criterion::{Criterion, SamplingMode, Throughput};

fn kinds_from_env() -> Vec<BackendKind> {
    match std::env::var("AO_BENCH_BACKENDS") {
        Ok(list) if !list.trim().is_empty() => list.split(',').filter_map(|s| BackendKind::parse(s.trim())).collect(),
        _ => vec![BackendKind::Cpu, BackendKind::Wgpu, BackendKind::Cuda],
    }
}

fn mode_from_env() -> Determinism {
    std::env::var("AO_BENCH_MODE").ok().and_then(|m| Determinism::parse(m.trim())).unwrap_or(Determinism::Reproducible)
}

/// One evaluation of `iters` iterations: its wall time.
fn timed(hc: &mut HostCallBench, kind: HostCall, iters: u64) -> Duration {
    hc.evaluate(kind, iters).unwrap_or_else(|e| panic!("{kind:?}: {e}"))
}

/// Whether `kind` runs on this backend; prints why not.
fn runs(hc: &mut HostCallBench, kind: HostCall, label: &str) -> bool {
    match hc.evaluate(kind, 1) {
        Ok(_) => true,
        Err(e) => {
            eprintln!("skip {label}: {e}");
            false
        }
    }
}

fn main() {
    let mut c = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .configure_from_args();
    let mode = mode_from_env();

    let cpu = Arc::new(Mutex::new(Backend::new(BackendKind::Cpu, mode).expect("the cpu backend starts")));
    let mut hc = HostCallBench::new(cpu).expect("a runtime starts");
    {
        let mut g = c.benchmark_group("hostcall");
        g.sampling_mode(SamplingMode::Linear).throughput(Throughput::Elements(1));
        g.bench_function("empty", |b| b.iter_custom(|iters| timed(&mut hc, HostCall::Empty, iters)));
        g.bench_function("ao_gpu_noop", |b| b.iter_custom(|iters| timed(&mut hc, HostCall::GpuNoop, iters)));
        g.finish();
    }
    drop(hc);

    for kind in kinds_from_env() {
        let backend = match Backend::new(kind, mode) {
            Ok(b) => b,
            Err(e) => {
                eprintln!("hostcall benches: skipping {kind}: {e}");
                continue;
            }
        };
        eprintln!("hostcall benches: {kind}: {} [{}]", backend.describe(), mode.as_str());
        let mut hc = HostCallBench::new(Arc::new(Mutex::new(backend))).expect("a runtime starts");
        let name = kind.as_str();
        {
            let mut g = c.benchmark_group("tiny_op");
            g.sampling_mode(SamplingMode::Linear);
            for (call, id) in [(HostCall::TinyOp, "scale_free"), (HostCall::TinyOpRead, "scale_read_free")] {
                if runs(&mut hc, call, &format!("tiny_op/{name}/{id}")) {
                    g.throughput(Throughput::Elements(1));
                    g.bench_function(format!("{name}/{id}"), |b| b.iter_custom(|iters| timed(&mut hc, call, iters)));
                }
            }
            g.finish();
        }
        {
            let mut g = c.benchmark_group("ops100");
            g.sampling_mode(SamplingMode::Linear).throughput(Throughput::Elements(100));
            if runs(&mut hc, HostCall::Ops100OneByOne, &format!("ops100/{name}/one_by_one")) {
                g.bench_function(format!("{name}/one_by_one"), |b| b.iter_custom(|iters| timed(&mut hc, HostCall::Ops100OneByOne, iters)));
            }
            if !gpu_function_linked("run") {
                eprintln!("skip ops100/{name}/batched: ao_gpu.run is not linked yet");
            } else if runs(&mut hc, HostCall::Ops100Batched, &format!("ops100/{name}/batched")) {
                g.bench_function(format!("{name}/batched"), |b| b.iter_custom(|iters| timed(&mut hc, HostCall::Ops100Batched, iters)));
            }
            g.finish();
        }
    }
    c.final_summary();
}

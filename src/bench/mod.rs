//! Measured performance, one body of code for the criterion benches in `benches/` and for
//! `ao-gpu-worker bench`. This module is the `bench` subcommand's suite: the plain timing loops
//! ([`Budget`], [`time_workload`]), the sizes of a quick or full run (`Plan`) and [`run`], which
//! measures each backend into a [`BenchReport`]. The rooms:
//!
//! * [`workload`]: seeded inputs and the timed [`Workload`] with its device sync (what one timed
//!   iteration is);
//! * [`hostcall`]: WAT actors that time host calls through the production runtime
//!   ([`HostCallBench`]);
//! * [`report`]: [`BenchReport`], [`Hardware`] and the text table;
//! * [`aos`]: aos processes per second (the aos spec's §10.4 sequence) when AO's fixtures are found;
//! * [`scores`]: `<data_dir>/bench.json` on disk and [`ScoreSlot`], the measured scores the daemon
//!   advertises (the only part of `bench` the daemon uses).

pub mod aos;
pub mod hostcall;
pub mod report;
pub mod scores;
pub mod workload;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::capacity::{BackendScore, CapacityManifest, GemmScore};
use crate::gpu::pool::{SharedDevice, lock};
use crate::gpu::{Backend, BackendKind, DType, Determinism};

pub use hostcall::{HostCall, HostCallBench, actor_wat, gpu_function_linked};
pub use report::{BackendReport, BenchReport, Hardware, SCHEMA, WORKER_VERSION, utc};
pub use scores::{FILE_NAME, ScoreSlot, load, path, save};
pub use workload::{Input, OpFn, Skip, Work, Workload, download, gemm, host, matmul, qmatmul, quantized, size_label, sync, upload, values};

// ---- plain timing loops ----------------------------------------------------------------------

/// How long a figure of the `bench` subcommand is measured: up to `warmup` untimed runs (fewer when
/// they already took half of `time`), then timed runs until there are at least `min_reps` and
/// either `time` has passed or there are `max_reps`; the figure is the median. A slow op thus gets
/// `min_reps` runs, a fast one as many as fit in `time`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    pub warmup: u32,
    pub min_reps: u32,
    pub max_reps: u32,
    pub time: Duration,
}

/// Runs `f` per `budget` and returns the durations it reported for the timed runs.
fn repeat(budget: &Budget, mut f: impl FnMut() -> Result<Duration, String>) -> Result<Vec<Duration>, String> {
    let started = Instant::now();
    for _ in 0..budget.warmup {
        if started.elapsed() >= budget.time / 2 {
            break;
        }
        f()?;
    }
    let started = Instant::now();
    let mut times = Vec::new();
    let (min, max) = (budget.min_reps.max(1) as usize, budget.max_reps.max(budget.min_reps).max(1) as usize);
    while times.len() < min || (started.elapsed() < budget.time && times.len() < max) {
        times.push(f()?);
    }
    Ok(times)
}

fn median(mut times: Vec<Duration>) -> Duration {
    times.sort();
    times.get(times.len() / 2).copied().unwrap_or_default()
}

/// The median time of one iteration of `w`.
pub fn time_workload(backend: &mut Backend, w: &Workload, budget: &Budget) -> Result<Duration, String> {
    let times = repeat(budget, || {
        let t = Instant::now();
        w.run(backend).map_err(|e| format!("{}: {e}", w.name))?;
        Ok(t.elapsed())
    })?;
    Ok(median(times))
}

// ---- the `bench` suite -----------------------------------------------------------------------

/// What `ao-gpu-worker bench` measures.
#[derive(Debug, Clone, PartialEq)]
pub struct Options {
    /// In this order; one that cannot start is reported in [`BenchReport::unavailable`].
    pub backends: Vec<BackendKind>,
    pub determinism: Determinism,
    /// The short run (a few seconds) instead of the full one (well under a minute).
    pub quick: bool,
}

/// The sizes and budgets of one suite.
#[derive(Debug, Clone)]
struct Plan {
    budget: Budget,
    /// GEMM sizes tried in order; the last one is the target.
    gemm_sizes: &'static [usize],
    /// A GEMM size is not grown further once one run would take longer than this.
    gemm_max_run: Duration,
    /// The quantized weight matrix is `[qmat, qmat]`.
    qmat: usize,
    transfer_bytes: usize,
    empty_calls: u64,
    tiny_ops: u64,
    ops100: u64,
    /// Messages of the aos sequence per module.
    aos_messages: usize,
}

impl Plan {
    fn new(quick: bool) -> Self {
        if quick {
            Plan {
                budget: Budget { warmup: 1, min_reps: 3, max_reps: 15, time: Duration::from_millis(200) },
                gemm_sizes: &[128, 256, 512, 1024],
                gemm_max_run: Duration::from_millis(250),
                qmat: 2048,
                transfer_bytes: 16 << 20,
                empty_calls: 100_000,
                tiny_ops: 500,
                ops100: 3,
                aos_messages: 50,
            }
        } else {
            Plan {
                budget: Budget { warmup: 2, min_reps: 3, max_reps: 100, time: Duration::from_millis(800) },
                gemm_sizes: &[128, 256, 512, 1024],
                gemm_max_run: Duration::from_millis(800),
                qmat: 4096,
                transfer_bytes: 64 << 20,
                empty_calls: 1_000_000,
                tiny_ops: 2_000,
                ops100: 20,
                aos_messages: 200,
            }
        }
    }
}

/// Rounds to 4 significant digits: figures are noisy well before that.
fn round4(v: f64) -> f64 {
    if v == 0.0 || !v.is_finite() {
        return v;
    }
    let scale = 10f64.powi(3 - v.abs().log10().floor() as i32);
    (v * scale).round() / scale
}

/// The device and driver a backend runs on.
fn device_of(backend: &Backend, manifest: &CapacityManifest) -> (String, Option<String>) {
    match backend {
        Backend::Cpu(_) => (manifest.host.cpu.model.clone(), None),
        Backend::Wgpu(w) => {
            let info = w.adapter_info();
            let driver = format!("{} {}", info.driver, info.driver_info).trim().to_owned();
            (info.name.clone(), Some(driver).filter(|d| !d.is_empty()))
        }
        Backend::Cuda(_) => (backend.describe(), manifest.gpus.cuda.driver_version.as_ref().map(|v| format!("CUDA driver {v}"))),
    }
}

/// Runs the suite: for each backend of `opts`, f32 GEMM (growing to 1024^3 while one run stays
/// short), quantized matrix-vector products, upload and read bandwidth, and host calls from Wasm;
/// then aos msg/s ([`aos`]) when the fixtures are found.
/// Never fails: what cannot be measured is noted in the report. `progress` gets a line per step;
/// `cancelled` is checked between figures (the report then holds what was measured).
pub fn run(opts: &Options, manifest: &CapacityManifest, progress: &dyn Fn(&str), cancelled: &dyn Fn() -> bool) -> BenchReport {
    let plan = Plan::new(opts.quick);
    let mut report = BenchReport {
        schema: SCHEMA.to_owned(),
        worker_version: WORKER_VERSION.to_owned(),
        measured_at_ms: crate::clock::now_ms(),
        quick: opts.quick,
        fingerprint: manifest.hardware_fingerprint(),
        hardware: Hardware::of(manifest),
        host_call_ns: None,
        ao_gpu_call_ns: None,
        backends: Vec::new(),
        unavailable: Vec::new(),
        aos: Vec::new(),
        aos_notes: Vec::new(),
    };
    for &kind in &opts.backends {
        if cancelled() {
            break;
        }
        progress(&format!("{kind}: starting the backend"));
        let backend = match Backend::new(kind, opts.determinism) {
            Ok(b) => b,
            Err(e) => {
                progress(&format!("{kind}: {e}"));
                report.unavailable.push(format!("{kind}: {e}"));
                continue;
            }
        };
        let shared: SharedDevice = Arc::new(Mutex::new(backend));
        let r = measure_backend(&shared, manifest, &plan, &mut report, progress, cancelled);
        report.backends.push(r);
    }
    if !cancelled() {
        match aos::fixtures_dir() {
            Some(dir) => (report.aos, report.aos_notes) = aos::measure(&dir, plan.aos_messages, progress),
            None => report
                .aos_notes
                .push("aos: no fixtures found (set AO_AOS_FIXTURES to AO's loader test modules to measure aos msg/s)".to_owned()),
        }
    }
    report
}

fn measure_backend(
    shared: &SharedDevice,
    manifest: &CapacityManifest,
    plan: &Plan,
    report: &mut BenchReport,
    progress: &dyn Fn(&str),
    cancelled: &dyn Fn() -> bool,
) -> BackendReport {
    let (mut r, kind) = {
        let b = lock(shared);
        (empty_report(&b, manifest), b.kind())
    };
    let step = |what: &str| progress(&format!("{kind}: {what}"));

    // f32 GEMM: grow n while one run stays short, measure at the last size reached.
    if !cancelled() {
        step("f32 gemm");
        let mut b = lock(shared);
        match gemm_figure(&mut b, plan) {
            Ok(g) => r.score.gemm_f32 = Some(g),
            Err(e) => r.notes.push(format!("f32 gemm: {e}")),
        }
    }
    qmatvec_figures(shared, plan, &mut r, &step, cancelled);
    transfer_figures(shared, plan, &mut r, &step, cancelled);

    // Host calls from Wasm, through the production runtime on this backend.
    if !cancelled() {
        step("host calls from wasm");
        match HostCallBench::new(shared.clone()) {
            Ok(mut hc) => host_call_figures(&mut hc, plan, report, &mut r, cancelled),
            Err(e) => r.notes.push(format!("host calls: {e}")),
        }
    }
    r
}

/// The report of `backend` before any figure: what it is and runs on.
fn empty_report(backend: &Backend, manifest: &CapacityManifest) -> BackendReport {
    let (device, driver) = device_of(backend, manifest);
    BackendReport {
        score: BackendScore {
            kind: backend.kind().as_str().to_owned(),
            description: backend.describe(),
            determinism: backend.determinism().as_str().to_owned(),
            gemm_f32: None,
            qmatvec_gbps: BTreeMap::new(),
            h2d_gbps: None,
            d2h_gbps: None,
            tiny_op_ns: None,
        },
        device,
        driver,
        ops100_one_by_one_us: None,
        ops100_batched_us: None,
        notes: Vec::new(),
    }
}

/// Quantized matrix-vector products: GB/s of weight bytes.
fn qmatvec_figures(shared: &SharedDevice, plan: &Plan, r: &mut BackendReport, step: &dyn Fn(&str), cancelled: &dyn Fn() -> bool) {
    for dtype in [DType::Q8_0, DType::Q4_0, DType::Q4_1] {
        if cancelled() {
            break;
        }
        step(&format!("{dtype} matvec"));
        let mut b = lock(shared);
        match qmatmul(&mut b, dtype, 1, plan.qmat, plan.qmat) {
            Ok(w) => {
                match time_workload(&mut b, &w, &plan.budget) {
                    Ok(t) => {
                        r.score.qmatvec_gbps.insert(dtype.as_str().to_owned(), round4(w.work.giga_per_second(t)));
                    }
                    Err(e) => r.notes.push(format!("{dtype} matvec: {e}")),
                }
                w.release(&mut b);
            }
            Err(skip) => r.notes.push(format!("{dtype} matvec: {skip}")),
        }
    }
}

/// Upload (h2d) and read (d2h) bandwidth.
fn transfer_figures(shared: &SharedDevice, plan: &Plan, r: &mut BackendReport, step: &dyn Fn(&str), cancelled: &dyn Fn() -> bool) {
    for (upload_dir, label) in [(true, "h2d"), (false, "d2h")] {
        if cancelled() {
            break;
        }
        step(&format!("{label} {}", size_label(plan.transfer_bytes)));
        let mut b = lock(shared);
        let w = if upload_dir { upload(&mut b, plan.transfer_bytes) } else { download(&mut b, plan.transfer_bytes) };
        match w {
            Ok(w) => {
                match time_workload(&mut b, &w, &plan.budget) {
                    Ok(t) => {
                        let gbps = Some(round4(w.work.giga_per_second(t)));
                        if upload_dir {
                            r.score.h2d_gbps = gbps;
                        } else {
                            r.score.d2h_gbps = gbps;
                        }
                    }
                    Err(e) => r.notes.push(format!("{label}: {e}")),
                }
                w.release(&mut b);
            }
            Err(skip) => r.notes.push(format!("{label}: {skip}")),
        }
    }
}

fn gemm_figure(backend: &mut Backend, plan: &Plan) -> Result<GemmScore, String> {
    let last = plan.gemm_sizes.len().saturating_sub(1);
    for (i, &n) in plan.gemm_sizes.iter().enumerate() {
        let w = gemm(backend, n).map_err(|s| s.to_string())?;
        let t = Instant::now();
        let first = w.run(backend).map_err(|e| e.to_string());
        let one = t.elapsed();
        // Each size step is 8x the work: stop growing once the next would take too long.
        if first.is_err() || i == last || one * 8 > plan.gemm_max_run {
            // `prepare` and the run above warmed this size up.
            let budget = Budget { warmup: 0, ..plan.budget };
            let result = first.and_then(|()| time_workload(backend, &w, &budget));
            let work = w.work;
            w.release(backend);
            let t = result?;
            return Ok(GemmScore { n, gflops: round4(work.giga_per_second(t)) });
        }
        w.release(backend);
    }
    Err("no gemm size configured".to_owned())
}

fn host_call_figures(hc: &mut HostCallBench, plan: &Plan, report: &mut BenchReport, r: &mut BackendReport, cancelled: &dyn Fn() -> bool) {
    let ns = |d: Duration| round4(d.as_secs_f64() * 1e9);
    // The empty call and the bare ao_gpu path do not depend on the backend: measured once.
    if report.host_call_ns.is_none() && !cancelled() {
        match hc.per_iteration(HostCall::Empty, plan.empty_calls, &plan.budget) {
            Ok(d) => report.host_call_ns = Some(ns(d)),
            Err(e) => r.notes.push(format!("empty host call: {e}")),
        }
    }
    if report.ao_gpu_call_ns.is_none() && !cancelled() {
        match hc.per_iteration(HostCall::GpuNoop, plan.empty_calls, &plan.budget) {
            Ok(d) => report.ao_gpu_call_ns = Some(ns(d)),
            Err(e) => r.notes.push(format!("ao_gpu call: {e}")),
        }
    }
    if !cancelled() {
        match hc.per_iteration(HostCall::TinyOp, plan.tiny_ops, &plan.budget) {
            Ok(d) => r.score.tiny_op_ns = Some(ns(d)),
            Err(e) => r.notes.push(format!("tiny op: {e}")),
        }
    }
    if !cancelled() {
        match hc.per_iteration(HostCall::Ops100OneByOne, plan.ops100, &plan.budget) {
            Ok(d) => r.ops100_one_by_one_us = Some(round4(d.as_secs_f64() * 1e6)),
            Err(e) => r.notes.push(format!("100 ops one by one: {e}")),
        }
    }
    if !gpu_function_linked("run") {
        r.notes.push("100 ops batched: ao_gpu.run is not linked yet".to_owned());
    } else if !cancelled() {
        match hc.per_iteration(HostCall::Ops100Batched, plan.ops100, &plan.budget) {
            Ok(d) => r.ops100_batched_us = Some(round4(d.as_secs_f64() * 1e6)),
            Err(e) => r.notes.push(format!("100 ops batched: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round4_keeps_four_significant_digits() {
        assert_eq!(round4(123.456), 123.5);
        assert_eq!(round4(0.0012345), 0.001235);
        assert_eq!(round4(98_765.0), 98_770.0);
        assert_eq!(round4(0.0), 0.0);
    }
}

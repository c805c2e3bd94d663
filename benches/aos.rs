//! aos throughput (docs/aos.md "Performance"): AO's own Lua processes through the aos runtime, on
//! the aos spec's §10.4 sequence (`ao_gpu_worker::bench::aos`: boot and `count = 0`, then messages
//! alternating `count = count + 1; return count` and `Send({Target='X', Data='hi <i>',
//! Action='Ping'})`).
//!
//! Run with `cargo bench --bench aos [-- FILTER]` (`-- --quick` for a short run). Per module (E4,
//! wasm64, E2 and the two `…-metering` formats):
//!
//! - `aos_msgs/FORMAT/replay`, `aos_msgs/FORMAT/copy`: one message of the sequence on a warm
//!   `AosProcess` (CU error semantics), with the default rollback (replay from a base moved every
//!   256 messages) and with `Rollback::Copy` (the base updated before every message); the
//!   process carries on across samples, so the sequence simply continues;
//! - `aos_msgs/w64/replay_no_spectre`: the same on W64 compiled with
//!   `AosEngineOptions { heap_spectre_mitigation: false }` (the operator trade-off);
//! - `aos_first_message/FORMAT`: a fresh process: boot, `count = 0` and its result;
//! - `aos_compile/FORMAT/cold`, `aos_compile/FORMAT/disk_cache`: `AosEngine::load` on a new engine
//!   without a cache (wasmtime compile, plus the metering pass for `…-metering`) and from a warm
//!   disk cache.
//!
//! The modules are AO's loader test fixtures (BSL-1.1, not in the repository), read from
//! `AO_AOS_FIXTURES` or `../shared/reference/aos`; without them the bench says so and measures
//! nothing.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use ao_gpu_worker::bench::aos::{run_messages, started};
use ao_gpu_worker::runtime::aos::{AosEngine, AosEngineOptions, AosFormat, Rollback};
use criterion::{Criterion, Throughput};

const MODULES: [(&str, AosFormat); 5] = [
    ("emscripten4.wasm", AosFormat::Emscripten4),
    ("wasm64-emscripten.wasm", AosFormat::Wasm64),
    ("aos.wasm", AosFormat::Emscripten2),
    ("emscripten4.wasm", AosFormat::EmscriptenMetering),
    ("wasm64-emscripten.wasm", AosFormat::Wasm64Metering),
];

fn fixtures_dir() -> PathBuf {
    match std::env::var_os("AO_AOS_FIXTURES") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join("shared").join("reference").join("aos"),
    }
}

/// A short label for the format.
fn label(format: AosFormat) -> &'static str {
    match format {
        AosFormat::Emscripten4 => "e4",
        AosFormat::Wasm64 => "w64",
        AosFormat::Emscripten2 => "e2",
        AosFormat::EmscriptenMetering => "e4_metering",
        AosFormat::Wasm64Metering => "w64_metering",
        AosFormat::Emscripten => "e1",
        AosFormat::Emscripten3 => "e3",
    }
}

fn main() {
    let mut c = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();
    let dir = fixtures_dir();
    let mut found = 0;
    for (name, format) in MODULES {
        let wasm = match std::fs::read(dir.join(name)) {
            Ok(w) => w,
            Err(e) => {
                eprintln!(
                    "\n*** aos bench {name} as {format} skipped: {} ({e}); set AO_AOS_FIXTURES to AO's loader test modules ***\n",
                    dir.join(name).display()
                );
                continue;
            }
        };
        found += 1;
        let l = label(format);
        let engine = AosEngine::new(None).expect("aos engine");
        let module = engine.load(&wasm, format).unwrap_or_else(|e| panic!("{name} as {format}: {e}"));

        let mut g = c.benchmark_group(format!("aos_msgs/{l}"));
        g.throughput(Throughput::Elements(1));
        for (rollback, rl) in [(Rollback::default(), "replay"), (Rollback::Copy, "copy")] {
            let (mut process, _) = started(&module, rollback).unwrap_or_else(|e| panic!("{name} as {format}: {e}"));
            let mut next = 1;
            g.bench_function(rl, |b| {
                b.iter_custom(|iters| {
                    let t = Instant::now();
                    run_messages(&mut process, next, iters as usize).unwrap_or_else(|e| panic!("{name} as {format}: {e}"));
                    next += iters as usize;
                    t.elapsed()
                })
            });
        }
        if format == AosFormat::Wasm64 {
            let options = AosEngineOptions { heap_spectre_mitigation: false };
            let engine = AosEngine::with_options(None, options).expect("aos engine");
            let module = engine.load(&wasm, format).unwrap_or_else(|e| panic!("{name} as {format}: {e}"));
            let (mut process, _) = started(&module, Rollback::default()).unwrap_or_else(|e| panic!("{name} as {format}: {e}"));
            let mut next = 1;
            g.bench_function("replay_no_spectre", |b| {
                b.iter_custom(|iters| {
                    let t = Instant::now();
                    run_messages(&mut process, next, iters as usize).unwrap_or_else(|e| panic!("{name} as {format}: {e}"));
                    next += iters as usize;
                    t.elapsed()
                })
            });
        }
        g.finish();

        let mut g = c.benchmark_group("aos_first_message");
        g.bench_function(l, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let (_, first) = started(&module, Rollback::default()).unwrap_or_else(|e| panic!("{name} as {format}: {e}"));
                    total += first;
                }
                total
            })
        });
        g.finish();

        let mut g = c.benchmark_group(format!("aos_compile/{l}"));
        g.bench_function("cold", |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let engine = AosEngine::new(None).expect("aos engine");
                    let t = Instant::now();
                    engine.load(&wasm, format).unwrap_or_else(|e| panic!("{name} as {format}: {e}"));
                    total += t.elapsed();
                }
                total
            })
        });
        let cache = tempfile::tempdir().expect("temp dir");
        AosEngine::new(Some(cache.path().to_path_buf())).expect("aos engine").load(&wasm, format).expect("warm the disk cache");
        g.bench_function("disk_cache", |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let engine = AosEngine::new(Some(cache.path().to_path_buf())).expect("aos engine");
                    let t = Instant::now();
                    let m = engine.load(&wasm, format).unwrap_or_else(|e| panic!("{name} as {format}: {e}"));
                    total += t.elapsed();
                    assert!(!m.compiled_from_source(), "not taken from the disk cache");
                }
                total
            })
        });
        g.finish();
    }
    if found == 0 {
        eprintln!("*** aos bench: no fixture found in {}: nothing measured ***", dir.display());
    }
    c.final_summary();
}

//! Throughput figures of the aos runtime (spec §8/§10.4), printed, not asserted:
//! `cargo test --test all -- aos::perf --ignored --nocapture` (add `--release` for release figures).

use std::time::Instant;

use ao_gpu_worker::runtime::aos::json::{TestMessage, test_env_json};
use ao_gpu_worker::runtime::aos::{AosEngine, AosFormat, AosProcess, InstanceOptions, Rollback};

use crate::support::aos::fixture;

/// Message `i` (1-based) of the 200-message sequence after `count = 0`.
fn message(i: usize) -> String {
    let code = if i % 2 == 1 {
        "count = count + 1\nreturn count".to_owned()
    } else {
        format!("Send({{Target='X', Data='hi {i}', Action='Ping'}})")
    };
    TestMessage::eval(format!("MSG{}", i + 1), code).to_json()
}

#[test]
#[ignore = "a measurement: run with --ignored --nocapture"]
fn throughput() {
    for (name, format) in
        [("emscripten4.wasm", AosFormat::Emscripten4), ("wasm64-emscripten.wasm", AosFormat::Wasm64), ("aos.wasm", AosFormat::Emscripten2)]
    {
        measure(name, format);
    }
}

fn measure(name: &str, format: AosFormat) {
    let Some(wasm) = fixture("aos::perf::throughput", name) else { return };
    let dir = std::env::temp_dir().join(format!("aos-perf-cache-{}", std::process::id()));
    let t = Instant::now();
    let module = AosEngine::new(Some(dir.clone())).unwrap().load(&wasm, format).unwrap();
    let compile = t.elapsed();
    let t = Instant::now();
    let cached = AosEngine::new(Some(dir.clone())).unwrap().load(&wasm, format).unwrap();
    let from_disk = t.elapsed();
    assert!(module.compiled_from_source() && !cached.compiled_from_source());
    let env = test_env_json();
    let opts = InstanceOptions::default();

    let t = Instant::now();
    let mut instance = module.instantiate(None, &opts).unwrap();
    let boot = t.elapsed();
    instance.handle(&TestMessage::eval("MSG0", "count = 0").to_json(), &env).unwrap();
    let first = t.elapsed();
    let t = Instant::now();
    for i in 1..=200 {
        let out = instance.handle(&message(i), &env).unwrap();
        assert_eq!(out.error, None);
    }
    let kept = 200.0 / t.elapsed().as_secs_f64();

    let mut process = AosProcess::new(module.clone(), opts.clone());
    process.handle(&TestMessage::eval("MSG0", "count = 0").to_json(), &env).unwrap();
    let t = Instant::now();
    for i in 1..=200 {
        let out = process.handle(&message(i), &env).unwrap();
        assert_eq!(out.error, None);
    }
    let with_snapshot = 200.0 / t.elapsed().as_secs_f64();

    let mut process = AosProcess::new(module.clone(), InstanceOptions::default()).with_rollback(Rollback::Copy);
    process.handle(&TestMessage::eval("MSG0", "count = 0").to_json(), &env).unwrap();
    let t = Instant::now();
    for i in 1..=200 {
        let out = process.handle(&message(i), &env).unwrap();
        assert_eq!(out.error, None);
    }
    let with_copy = 200.0 / t.elapsed().as_secs_f64();
    eprintln!(
        "aos {name} as {format} ({}): compile {compile:?}, from disk cache {from_disk:?}; boot {boot:?}, boot + first message {first:?}; \
         200 msgs: {kept:.0} msg/s state kept in the instance, {with_snapshot:.0} msg/s as AosProcess (replay rollback, base every 256), {with_copy:.0} msg/s copying the memory before each message ({} MB memory)",
        if cfg!(debug_assertions) { "debug build" } else { "release build" },
        process.memory().len() / 1_000_000
    );
    let _ = std::fs::remove_dir_all(&dir);
}

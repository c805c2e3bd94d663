//! `AosEngineOptions`: turning the Spectre guard of bounds-checked memory accesses off (an
//! operator trade-off, docs/aos.md "Performance") changes no result. W64 is the module where it
//! changes the generated code (its memory64 accesses are bounds-checked); the sequence includes a
//! failing message, so the rollback (replay from a base) runs on both engines too.

use std::path::PathBuf;

use ao_gpu_worker::runtime::aos::json::{TestMessage, test_env_json};
use ao_gpu_worker::runtime::aos::{AosEngine, AosEngineOptions, AosFormat, AosProcess, InstanceOptions};

use crate::support::aos::{fixture, module};

fn sequence() -> Vec<String> {
    let codes = [
        "count = 0",
        "count = count + 1\nreturn count",
        "Send({Target='X', Data='hi', Action='Ping'})",
        "error('boom')",
        "count = count + 1\nreturn count",
        "local t = {} for i = 1, 2000 do t[i] = string.rep('x', i % 64) end\nreturn #t",
        "return count",
    ];
    codes.iter().enumerate().map(|(i, code)| TestMessage::eval(format!("MSG{i}"), *code).to_json()).collect()
}

#[test]
fn w64_without_the_spectre_guard_gives_the_same_results_and_memory() {
    const TEST: &str = "aos::engine_options::w64_without_the_spectre_guard_gives_the_same_results_and_memory";
    let (name, format) = ("wasm64-emscripten.wasm", AosFormat::Wasm64);
    let Some(guarded) = module(TEST, name, format) else { return };
    let Some(wasm) = fixture(TEST, name) else { return };
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("aos-module-cache");
    let unguarded_engine =
        AosEngine::with_options(Some(dir), AosEngineOptions { heap_spectre_mitigation: false }).expect("aos engine without the guard");
    let unguarded = unguarded_engine.load(&wasm, format).unwrap();
    let env = test_env_json();
    let mut a = AosProcess::new(guarded, InstanceOptions::default());
    let mut b = AosProcess::new(unguarded, InstanceOptions::default());
    let mut errors = 0;
    for (i, msg) in sequence().iter().enumerate() {
        let (x, y) = (a.handle(msg, &env).unwrap(), b.handle(msg, &env).unwrap());
        assert_eq!(x, y, "message {i}");
        assert_eq!(a.memory_sha256(), b.memory_sha256(), "memory after message {i}");
        errors += usize::from(x.error.is_some());
    }
    assert_eq!(errors, 1, "error('boom') is the one failing message");
}

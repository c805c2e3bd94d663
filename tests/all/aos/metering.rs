//! The `…-metering` formats at load: the fixture is instrumented with the loader's charges, and the
//! disk cache keeps the metered and unmetered compiles of the same bytes apart.

use ao_gpu_worker::runtime::aos::json::{TestMessage, test_env_json};
use ao_gpu_worker::runtime::aos::{AosEngine, AosFormat, InstanceOptions};

use crate::support::aos::fixture;

/// GasUsed of `1+1` on a fresh instance of `wasm` as `format`, and whether the engine compiled it.
fn gas_of(engine: &AosEngine, wasm: &[u8], format: AosFormat) -> (u64, bool) {
    let module = engine.load(wasm, format).unwrap_or_else(|e| panic!("{format}: {e}"));
    let mut instance = module.instantiate(None, &InstanceOptions::default()).unwrap();
    let out = instance.handle(&TestMessage::eval("MSG1", "1+1").to_json(), &test_env_json()).unwrap();
    assert_eq!(out.error, None);
    (out.gas_used, module.compiled_from_source())
}

#[test]
fn the_disk_cache_never_mixes_metered_and_unmetered_compiles() {
    let Some(wasm) = fixture("aos::metering::the_disk_cache_never_mixes_metered_and_unmetered_compiles", "emscripten4.wasm") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let fresh_engine = || AosEngine::new(Some(dir.path().to_path_buf())).unwrap();
    // Plain E4 first: its compile lands on disk.
    assert_eq!(gas_of(&fresh_engine(), &wasm, AosFormat::Emscripten4), (0, true));
    // The metering format of the same bytes must not get it: compiled anew, and metered.
    let (gas, compiled) = gas_of(&fresh_engine(), &wasm, AosFormat::EmscriptenMetering);
    assert!(compiled, "the metering format was handed the unmetered compile from disk");
    assert_eq!(gas, 10_664_613_823, "GasUsed of `1+1` on a fresh instance (acceptance.e4-metering.jsonl step 1)");
    // Both are now on disk, each under its own key.
    assert_eq!(gas_of(&fresh_engine(), &wasm, AosFormat::EmscriptenMetering), (10_664_613_823, false));
    assert_eq!(gas_of(&fresh_engine(), &wasm, AosFormat::Emscripten4), (0, false));
}

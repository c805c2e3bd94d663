//! §10.3: eleven Eval messages per format with CU error semantics, every figure compared.

use ao_gpu_worker::runtime::aos::json::{TestMessage, test_env_json};
use ao_gpu_worker::runtime::aos::{AosFormat, AosProcess, InstanceOptions, Rollback};
use serde_json::Value;

use crate::support::aos::module;

fn acceptance() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/aos/acceptance.json");
    serde_json::from_str(&std::fs::read_to_string(path).expect("acceptance.json")).expect("acceptance.json parses")
}

/// The text of an aos Output: `Output.data` (aos 2.0) or `Output.data.output` (aos 1.x).
pub fn output_text(output: &Value) -> Option<String> {
    match output.get("data")? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => match o.get("output")? {
            Value::String(s) => Some(s.clone()),
            other => Some(other.to_string()),
        },
        _ => None,
    }
}

/// Runs the sequence of `format`; with `restore_after = Some(n)` the process is rebuilt from a
/// copy of its memory after message `n` (a CU cold start).
fn run(test: &str, format: &str, restore_after: Option<usize>) {
    run_with(test, format, restore_after, Rollback::default());
}

fn run_with(test: &str, format: &str, restore_after: Option<usize>, rollback: Rollback) {
    let doc = acceptance();
    let format: AosFormat = format.parse().unwrap();
    // A `…-metering` format runs its unmetered twin's module: the same memory after every message,
    // with the loader's metered `GasUsed` (`metering_gas_used`).
    let (twin, gas_key) = match format {
        AosFormat::EmscriptenMetering => (AosFormat::Emscripten4, "metering_gas_used"),
        AosFormat::Wasm64Metering => (AosFormat::Wasm64, "metering_gas_used"),
        other => (other, "gas_used"),
    };
    let case = doc["formats"].as_array().unwrap().iter().find(|f| f["format"] == twin.name()).expect("format in acceptance.json");
    let Some(module) = module(test, case["fixture"].as_str().unwrap(), format) else { return };
    let opts = InstanceOptions::default();
    let mut process = AosProcess::new(module.clone(), opts.clone()).with_rollback(rollback);
    let env = test_env_json();
    let mut previous_sha = String::new();
    for (i, exp) in case["messages"].as_array().unwrap().iter().enumerate() {
        let n = i + 1;
        let msg = TestMessage::eval(format!("MSG{n}"), exp["eval"].as_str().unwrap()).to_json();
        let out = process.handle(&msg, &env).unwrap_or_else(|e| panic!("{format} message {n}: could not compute: {e}"));
        let what = format!("{format} message {n} ({:?})", exp["eval"].as_str().unwrap());
        match exp["error_suffix"].as_str() {
            Some(suffix) => {
                let error = out.error.as_deref().unwrap_or_else(|| panic!("{what}: expected an Error, got Output {}", out.output));
                assert!(error.ends_with(suffix), "{what}: Error {error:?} does not end with {suffix:?}");
            }
            None => assert_eq!(out.error, None, "{what}: unexpected Error"),
        }
        if let Some(data) = exp["output_data"].as_str() {
            assert_eq!(output_text(&out.output).as_deref(), Some(data), "{what}: Output {}", out.output);
        }
        if let Some(part) = exp["output_contains"].as_str() {
            let text = output_text(&out.output).unwrap_or_default();
            assert!(text.contains(part), "{what}: Output {text:?} does not contain {part:?}");
        }
        assert_eq!(out.messages.len() as u64, exp["messages"].as_u64().unwrap(), "{what}: Messages {:?}", out.messages);
        if let Some(expected) = exp.get("message") {
            assert_eq!(&out.messages[0], expected, "{what}: the Messages entry");
        }
        assert!(out.spawns.is_empty() && out.assignments.is_empty(), "{what}: Spawns {:?} Assignments {:?}", out.spawns, out.assignments);
        if let Some(gas) = exp[gas_key].as_u64() {
            assert_eq!(out.gas_used, gas, "{what}: GasUsed");
        }
        let sha = hex::encode(process.memory_sha256());
        if exp["rolled_back"].as_bool() == Some(true) {
            assert_eq!(sha, previous_sha, "{what}: the memory was not rolled back");
        } else {
            assert_eq!(sha, exp["memory_sha256"].as_str().unwrap(), "{what}: memory SHA-256 (memory is {} bytes)", process.memory().len());
        }
        if let Some(len) = exp["memory_len"].as_u64() {
            assert_eq!(process.memory().len() as u64, len, "{what}: memory length");
        }
        previous_sha = sha;
        if restore_after == Some(n) {
            let memory = process.memory().to_vec();
            process = AosProcess::with_memory(module.clone(), memory, opts.clone()).with_rollback(rollback);
        }
    }
}

#[test]
fn e4_sequence_is_bit_exact() {
    run("aos::acceptance::e4_sequence_is_bit_exact", "wasm32-unknown-emscripten4", None);
}

#[test]
fn w64_sequence_is_bit_exact() {
    run("aos::acceptance::w64_sequence_is_bit_exact", "wasm64-unknown-emscripten-draft_2024_02_15", None);
}

#[test]
fn e4_metering_sequence_is_bit_exact_with_gas() {
    run("aos::acceptance::e4_metering_sequence_is_bit_exact_with_gas", "wasm32-unknown-emscripten-metering", None);
}

#[test]
fn w64_metering_sequence_is_bit_exact_with_gas() {
    run("aos::acceptance::w64_metering_sequence_is_bit_exact_with_gas", "wasm64-unknown-emscripten-draft_2024_10_16-metering", None);
}

#[test]
fn e2_sequence_is_bit_exact_with_gas() {
    run("aos::acceptance::e2_sequence_is_bit_exact_with_gas", "wasm32-unknown-emscripten2", None);
}

/// The same results whichever way the rollback is made: a copy before every message, or replay
/// with the base moved every 2 messages (so message 8's error replays from a warm snapshot).
#[test]
fn e4_rollback_strategies_agree() {
    let test = "aos::acceptance::e4_rollback_strategies_agree";
    run_with(test, "wasm32-unknown-emscripten4", None, Rollback::Copy);
    run_with(test, "wasm32-unknown-emscripten4", None, Rollback::Replay { rebase_every: 2 });
}

#[test]
fn e2_rollback_strategies_agree() {
    let test = "aos::acceptance::e2_rollback_strategies_agree";
    run_with(test, "wasm32-unknown-emscripten2", None, Rollback::Copy);
    run_with(test, "wasm32-unknown-emscripten2", None, Rollback::Replay { rebase_every: 3 });
}

#[test]
fn e4_restore_after_message_3() {
    run("aos::acceptance::e4_restore_after_message_3", "wasm32-unknown-emscripten4", Some(3));
}

#[test]
fn w64_restore_after_message_3() {
    run("aos::acceptance::w64_restore_after_message_3", "wasm64-unknown-emscripten-draft_2024_02_15", Some(3));
}

#[test]
fn e2_restore_after_message_3() {
    run("aos::acceptance::e2_restore_after_message_3", "wasm32-unknown-emscripten2", Some(3));
}

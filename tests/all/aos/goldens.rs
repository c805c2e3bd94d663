//! Every golden of tests/data/aos/index.json (what `@permaweb/ao-loader` 0.0.49 produced), replayed
//! on [`AosInstance`] exactly as the generator drove the loader: a step marked `fresh` boots a new
//! instance (given the memory kept after step `from`, if any), any other step calls `handle` on the
//! warm instance (after copying in step `from`'s memory when it is not simply the previous one).
//!
//! Compared per step: thrown or not, the error, `Output`/`Messages`/`Spawns`/`Assignments`/`Patches`
//! as JSON values (object key order ignored, as `JSON.parse` reorders integer-like keys; the strings
//! aos prints, Lua tables included, are compared byte for byte), `GasUsed`, and the length and
//! SHA-256 of the memory the CU keeps (and of the memory a failed call left behind) where the index
//! says memory is reproducible. The goldens we deliberately do not meet are in [`DELIBERATE`] (and
//! docs/aos.md): there the test asserts our own documented answer instead.

use std::collections::HashMap;

use ao_gpu_worker::runtime::aos::{AosError, AosFormat, AosInstance, DEFAULT_GAS_LIMIT, HandleOutcome, InstanceOptions, NOT_ENOUGH_MEMORY};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::support::aos::module;

const DATA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/aos");

/// Golden steps whose expectation we deliberately do not meet, with the reason; the test checks
/// our answer (`ours`: the error we give) instead of the loader's.
pub const DELIBERATE: [(&str, u64, &str, Expected); 2] = [
    (
        "os-execute-touch.e4.jsonl",
        1,
        "the E4 Node glue ran the shell command (it created the file) and aos reported Error \"exit\"; we never run commands (docs/aos.md, difference 1) and answer as the W64 and E2 glues do",
        Expected::LuaError("Function not implemented"),
    ),
    (
        "nan.e2.jsonl",
        1,
        "the old aos JSON encoder rejects -nan and `handle` returns an empty string; the loader's error text is V8's JSON.parse message, ours says the same in our words",
        Expected::Thrown("invalid result: handle returned invalid JSON"),
    ),
];

/// Our answer at a [`DELIBERATE`] step.
#[derive(Debug, Clone, Copy)]
pub enum Expected {
    /// A Lua error returned as `Error` (memory rolled back), with this text.
    LuaError(&'static str),
    /// A thrown error whose message starts with this text.
    Thrown(&'static str),
}

fn read_json(path: &str) -> Value {
    let text = std::fs::read_to_string(format!("{DATA}/{path}")).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn index() -> Value {
    read_json("index.json")
}

/// The `computeLimit` of each step's instance, from the sequence file (step, then file, then 9e15).
fn compute_limits(sequence: &Value) -> Vec<u64> {
    let file_limit = sequence.get("compute_limit").and_then(Value::as_u64);
    let steps = match sequence {
        Value::Array(steps) => steps.clone(),
        other => other["steps"].as_array().expect("sequence has steps").clone(),
    };
    steps.iter().map(|s| s.get("compute_limit").and_then(Value::as_u64).or(file_limit).unwrap_or(DEFAULT_GAS_LIMIT)).collect()
}

/// The text the loader shows for a thrown error.
fn thrown_text(e: &AosError) -> String {
    match e {
        AosError::OutOfGas { .. } => "out of gas!".to_owned(),
        AosError::Evaluation(s) | AosError::Trap(s) => s.clone(),
        other => other.to_string(),
    }
}

fn hex_sha(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn opt_u64(v: &Value) -> Option<u64> {
    v.as_u64()
}

/// `response.<key>` of the raw result (null when absent); `Patches` defaults to `[]` as in the loader.
fn response_field(out: &HandleOutcome, key: &str) -> Value {
    let raw: Value = serde_json::from_str(&out.raw_json).unwrap_or(Value::Null);
    match raw["response"].get(key) {
        Some(v) => v.clone(),
        None if key == "Patches" => Value::Array(Vec::new()),
        None => Value::Null,
    }
}

/// Replays the golden `name` (a key of index.json's `goldens`).
pub fn replay(name: &str) {
    let test = format!("aos::goldens::{name}");
    let index = index();
    let entry = &index["goldens"][name];
    assert!(entry.is_object(), "{name} is not in tests/data/aos/index.json");
    let format: AosFormat = entry["format"].as_str().unwrap().parse().unwrap();
    let Some(module) = module(&test, entry["fixture"].as_str().unwrap(), format) else { return };
    let reproducible = entry["memory_reproducible"].as_bool().unwrap_or(true);
    let limits = compute_limits(&read_json(entry["sequence"].as_str().unwrap()));
    let text = std::fs::read_to_string(format!("{DATA}/{name}")).unwrap();
    let lines: Vec<Value> = text.lines().filter(|l| !l.trim().is_empty()).map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len() as u64, entry["lines"].as_u64().unwrap(), "{name}: line count");

    // Memories kept after each step, for as long as a later step names it as `from`.
    let mut kept: HashMap<u64, Option<Vec<u8>>> = HashMap::new();
    let last_use = |k: u64| lines.iter().filter(|l| opt_u64(&l["from"]) == Some(k)).map(|l| l["n"].as_u64().unwrap()).max();
    let mut instance: Option<AosInstance> = None;
    let mut prev_ok = false;
    for line in &lines {
        let n = line["n"].as_u64().unwrap();
        let what = format!("{name} step {n}{}", line.get("note").and_then(Value::as_str).map(|s| format!(" ({s})")).unwrap_or_default());
        let from = opt_u64(&line["from"]);
        let input: Option<Vec<u8>> =
            from.map(|k| kept.get(&k).cloned().flatten().unwrap_or_else(|| panic!("{what}: no memory kept after step {k}")));
        let opts =
            InstanceOptions { gas_limit: limits.get(n as usize - 1).copied().unwrap_or(DEFAULT_GAS_LIMIT), ..InstanceOptions::default() };
        let deliberate = DELIBERATE.iter().find(|d| d.0 == name && d.1 == n);

        // Set up the instance as the loader's was.
        let fresh = line["fresh"].as_bool().unwrap();
        let result = match instance.as_mut() {
            Some(inst) if !fresh => match (&input, from) {
                (Some(memory), Some(k)) if k + 1 != n || !prev_ok => inst.restore(memory),
                _ => Ok(()),
            },
            _ => module.instantiate(input.as_deref(), &opts).map(|i| {
                instance = Some(i);
            }),
        };
        let result = result.and_then(|()| instance.as_mut().unwrap().handle(line["msg"].as_str().unwrap(), line["env"].as_str().unwrap()));

        // What the CU keeps, and what we compare.
        let (ok, kept_memory) = match &result {
            Ok(out) => {
                let lua_error =
                    out.error.is_some() || out.output.get("data").and_then(Value::as_str).is_some_and(|t| t.ends_with(NOT_ENOUGH_MEMORY));
                if lua_error { (false, input.clone()) } else { (true, Some(instance.as_ref().unwrap().memory().to_vec())) }
            }
            Err(_) => (false, input.clone()),
        };
        match (deliberate, &result) {
            (Some((_, _, why, Expected::LuaError(text))), Ok(out)) => {
                eprintln!("{what}: deliberately differs from the golden: {why}");
                assert_eq!(out.error.as_deref(), Some(*text), "{what}: our documented answer");
            }
            (Some((_, _, why, Expected::Thrown(text))), Err(e)) => {
                eprintln!("{what}: deliberately differs from the golden: {why}");
                assert!(line["thrown"].as_bool().unwrap(), "{what}: the loader threw too");
                assert!(e.to_string().starts_with(text), "{what}: our documented answer, got {e}");
            }
            (Some(d), r) => panic!("{what}: expected our documented answer {:?}, got {r:?}", d.3),
            (None, Err(e)) => {
                assert!(e.is_evaluation_error(), "{what}: could not compute: {e}");
                assert!(line["thrown"].as_bool().unwrap(), "{what}: we threw {e:?}, the loader did not (its error: {})", line["error"]);
                assert_eq!(thrown_text(e), line["error"].as_str().unwrap(), "{what}: the thrown error");
            }
            (None, Ok(out)) => {
                assert!(!line["thrown"].as_bool().unwrap(), "{what}: the loader threw {}, we returned {}", line["error"], out.raw_json);
                assert_eq!(ok, line["ok"].as_bool().unwrap(), "{what}: ok (our error {:?}, golden {})", out.error, line["error"]);
                if !ok {
                    assert_eq!(out.error.as_ref().map(|s| Value::String(s.clone())).unwrap_or(Value::Null), line["error"], "{what}: Error");
                }
                if line["output"].is_null() && !ok {
                    // The loader's result for a returned error carries only the Error.
                } else {
                    for (key, golden) in [
                        ("Output", "output"),
                        ("Messages", "messages"),
                        ("Spawns", "spawns"),
                        ("Assignments", "assignments"),
                        ("Patches", "patches"),
                    ] {
                        assert_eq!(response_field(out, key), line[golden], "{what}: {key}");
                    }
                }
                if let Some(gas) = line["gas_used"].as_u64() {
                    assert_eq!(out.gas_used, gas, "{what}: GasUsed");
                }
                if reproducible && let Some(sha) = line["error_memory_sha256"].as_str() {
                    let mem = instance.as_ref().unwrap().memory();
                    assert_eq!(
                        (mem.len() as u64, hex_sha(mem).as_str()),
                        (line["error_memory_len"].as_u64().unwrap(), sha),
                        "{what}: the memory the failed call left"
                    );
                }
            }
        }
        if reproducible || line["memory_len"].is_null() {
            let ours = kept_memory.as_ref().map(|m| (m.len() as u64, hex_sha(m)));
            let golden = line["memory_len"].as_u64().map(|len| (len, line["memory_sha256"].as_str().unwrap().to_owned()));
            assert_eq!(ours, golden, "{what}: the memory the CU keeps (length, SHA-256)");
        }
        if result.is_err() {
            instance = None;
        }
        prev_ok = ok;
        if last_use(n).is_some() {
            kept.insert(n, kept_memory);
        }
        kept.retain(|k, _| last_use(*k).is_some_and(|last| last > n));
    }
}

macro_rules! goldens {
    ($($test:ident => $file:literal,)*) => {
        $(
            #[test]
            fn $test() {
                replay($file);
            }
        )*

        /// Every golden of index.json has a test above.
        #[test]
        fn every_golden_is_replayed() {
            let covered = [$($file),*];
            let index = index();
            let names: Vec<&String> = index["goldens"].as_object().unwrap().keys().collect();
            for name in &names {
                assert!(covered.contains(&name.as_str()), "{name} has no replay test in tests/all/aos/goldens.rs");
            }
            assert_eq!(names.len(), covered.len(), "a replayed golden is not in index.json");
            for (name, step, _, _) in DELIBERATE {
                assert!(covered.contains(&name), "DELIBERATE names {name} step {step}, which is not a golden");
            }
        }
    };
}

goldens! {
    acceptance_e2 => "acceptance.e2.jsonl",
    acceptance_e4 => "acceptance.e4.jsonl",
    acceptance_e4_metering => "acceptance.e4-metering.jsonl",
    acceptance_w64 => "acceptance.w64.jsonl",
    acceptance_w64_metering => "acceptance.w64-metering.jsonl",
    acceptance_restore3_e2 => "acceptance-restore3.e2.jsonl",
    acceptance_restore3_e4 => "acceptance-restore3.e4.jsonl",
    acceptance_restore3_e4_metering => "acceptance-restore3.e4-metering.jsonl",
    acceptance_restore3_w64 => "acceptance-restore3.w64.jsonl",
    acceptance_restore3_w64_metering => "acceptance-restore3.w64-metering.jsonl",
    assignment_e1_actor => "assignment.e1-actor.jsonl",
    loader_tests_e4 => "loader-tests.e4.jsonl",
    loader_tests_e4_metering => "loader-tests.e4-metering.jsonl",
    loader_tests_w64 => "loader-tests.w64.jsonl",
    loader_tests_w64_metering => "loader-tests.w64-metering.jsonl",
    nan_e2 => "nan.e2.jsonl",
    nan_e4 => "nan.e4.jsonl",
    nan_w64 => "nan.w64.jsonl",
    os_execute_touch_e4 => "os-execute-touch.e4.jsonl",
    os_execute_touch_w64 => "os-execute-touch.w64.jsonl",
    resize_heap_e2 => "resize-heap.e2.jsonl",
    sqlite_e2_sqlite => "sqlite.e2-sqlite.jsonl",
    system_e2 => "system.e2.jsonl",
    test_actor_e1_actor => "test-actor.e1-actor.jsonl",
    test_actor_e2_actor => "test-actor.e2-actor.jsonl",
}

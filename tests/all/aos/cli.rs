//! `ao-gpu-worker eval`: the real binary over a JSONL message file.

use ao_gpu_worker::runtime::aos::json::TestMessage;
use serde_json::Value;

use crate::support::aos::{fixture, fixtures_dir};
use crate::support::binary::command;

#[test]
fn eval_prints_one_line_per_message_with_cu_semantics() {
    if fixture("aos::cli::eval_prints_one_line_per_message_with_cu_semantics", "emscripten4.wasm").is_none() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("aos-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let messages = dir.join("msgs.jsonl");
    let lines: Vec<String> = ["1+1", "error('boom')", "return 'Hello World'"]
        .iter()
        .enumerate()
        .map(|(i, code)| TestMessage::eval(format!("MSG{}", i + 1), *code).to_json())
        .collect();
    std::fs::write(&messages, lines.join("\n") + "\n").unwrap();
    let out = command()
        .args(["eval", "--format", "wasm32-unknown-emscripten4", "--module"])
        .arg(fixtures_dir().join("emscripten4.wasm"))
        .arg("--messages")
        .arg(&messages)
        .output()
        .expect("eval runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "eval failed: {}\n{stdout}", String::from_utf8_lossy(&out.stderr));
    let results: Vec<Value> = stdout.lines().map(|l| serde_json::from_str(l).expect("a JSON line")).collect();
    assert_eq!(results.len(), 3, "{stdout}");
    assert_eq!(results[0]["output"]["data"], "2");
    assert_eq!(results[0]["error"], Value::Null);
    assert_eq!(results[0]["gas_used"], 0);
    assert_eq!(results[0]["memory_len"], 109_903_872);
    assert_eq!(results[0]["memory_sha256"], "a4cb343b5e4594230f2bfc8e18518a4774e235e252b9f504bf7013e58b55b621");
    assert!(results[1]["error"].as_str().unwrap().ends_with("[string \"aos\"]:1: boom"), "{}", results[1]);
    assert_eq!(results[1]["memory_sha256"], results[0]["memory_sha256"], "the error rolled back");
    assert_eq!(results[2]["output"]["data"], "Hello World");
    for r in &results {
        for key in ["messages", "spawns", "assignments"] {
            assert!(r[key].is_array(), "{key} in {r}");
        }
    }

    let bad = command()
        .args(["eval", "--format", "wasm32-unknown-nonsense", "--module"])
        .arg(fixtures_dir().join("emscripten4.wasm"))
        .arg("--messages")
        .arg(&messages)
        .output()
        .expect("eval runs");
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("unknown aos module format"), "{}", String::from_utf8_lossy(&bad.stderr));
    let _ = std::fs::remove_dir_all(&dir);
}

/// The worker's own format goes through the actor runtime: state carries from message to message.
#[test]
fn eval_runs_the_workers_own_format() {
    let wat = r#"(module
      (memory (export "memory") 1)
      (global $heap (mut i32) (i32.const 8192))
      (func (export "malloc") (param i32) (result i32) (local $p i32)
        (local.set $p (global.get $heap))
        (global.set $heap (i32.add (global.get $heap) (local.get 0)))
        (local.get $p))
      (func (export "handle") (param i32 i32) (result i32)
        (i32.store8 (i32.const 4096) (i32.add (i32.load8_u (i32.const 4096)) (i32.const 1)))
        (i32.const 1024))
      (data (i32.const 1024) "{\"ok\":true,\"response\":{\"Output\":\"ok\",\"Messages\":[]}}\00"))"#;
    let dir = std::env::temp_dir().join(format!("aos-cli-own-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let module = dir.join("actor.wasm");
    std::fs::write(&module, wat::parse_str(wat).unwrap()).unwrap();
    let messages = dir.join("msgs.jsonl");
    std::fs::write(&messages, "{\"Id\":\"A\",\"Timestamp\":\"5\"}\n{\"Id\":\"B\",\"Timestamp\":6}\n").unwrap();
    let out = command()
        .args(["eval", "--format", "wasm32-unknown-ao-gpu-worker", "--module"])
        .arg(&module)
        .arg("--messages")
        .arg(&messages)
        .arg("--cache-dir")
        .arg(dir.join("cache"))
        .output()
        .expect("eval runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "eval failed: {}\n{stdout}", String::from_utf8_lossy(&out.stderr));
    let results: Vec<Value> = stdout.lines().map(|l| serde_json::from_str(l).expect("a JSON line")).collect();
    assert_eq!(results.len(), 2, "{stdout}");
    for r in &results {
        assert_eq!(r["output"], "ok");
        assert_eq!(r["error"], Value::Null);
        assert_eq!(r["memory_len"], 65536);
        assert!(r["gas_used"].as_u64().unwrap() > 0);
    }
    assert_ne!(results[0]["memory_sha256"], results[1]["memory_sha256"], "the state carried over");
    let _ = std::fs::remove_dir_all(&dir);
}

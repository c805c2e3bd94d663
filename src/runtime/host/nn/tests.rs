//! `wasi_ephemeral_nn` with inline WAT actors and no model: the import check admits the module,
//! the errnos of calls that need no model (WasmEdge's numbers), and a pointer outside memory
//! traps. The model-backed behaviour is tested in tests/all/nn_chat.rs.

use std::time::Duration;

use crate::protocol::ao;
use crate::runtime::{EvalError, EvalInput, Limits, ModelEntry, ModelRegistry, Runtime, RuntimeConfig};

const ERRNOS: usize = 2048;

/// An actor whose `handle` makes the calls of `body` (each leaving an errno on the stack, stored
/// at ERRNOS + 4 i), then returns `{"ok":true,...}`.
fn actor(body: &[&str]) -> Vec<u8> {
    let calls: String = body.iter().enumerate().map(|(i, call)| format!("(i32.store (i32.const {}) {call})\n", ERRNOS + 4 * i)).collect();
    let wat = format!(
        r#"(module
  (import "wasi_ephemeral_nn" "load" (func $load (param i32 i32 i32 i32 i32) (result i32)))
  (import "wasi_ephemeral_nn" "load_by_name" (func $by_name (param i32 i32 i32) (result i32)))
  (import "wasi_ephemeral_nn" "init_execution_context" (func $init (param i32 i32) (result i32)))
  (import "wasi_ephemeral_nn" "compute" (func $compute (param i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 1024) "{{\"ok\":true,\"response\":{{\"Output\":\"done\"}}}}\00")
  (data (i32.const 1200) "nope")
  ;; a builder array: one builder of 8 bytes at 1300
  (data (i32.const 1280) "\14\05\00\00\08\00\00\00")
  (data (i32.const 1300) "notagguf")
  (global $heap (mut i32) (i32.const 8192))
  (func (export "malloc") (param $n i32) (result i32)
    (local $p i32)
    (local.set $p (global.get $heap))
    (global.set $heap (i32.add (local.get $p) (local.get $n)))
    (local.get $p))
  (func (export "handle") (param i32 i32) (result i32)
    {calls}
    (i32.const 1024)))"#
    );
    wat::parse_str(&wat).unwrap()
}

fn run(body: &[&str]) -> (Result<Vec<i32>, EvalError>, usize) {
    run_with(body, ModelRegistry::default(), "{}")
}

fn run_with(body: &[&str], models: ModelRegistry, env_json: &str) -> (Result<Vec<i32>, EvalError>, usize) {
    let dir = tempfile::tempdir().unwrap();
    let cfg =
        RuntimeConfig { cache_dir: dir.path().join("m"), max_memory: 1 << 24, max_compute: 1 << 30, deadline: Duration::from_secs(10) };
    let rt = Runtime::new(cfg).unwrap().with_models(models);
    let module = rt.load(&actor(body), &ao::module_tags("nn", "1-mb", "100000000")).unwrap();
    let input = EvalInput {
        msg_json: "{}",
        env_json,
        timestamp_ms: 1,
        message_id: "m",
        limits: Limits { memory_bytes: 1 << 24, compute: 1 << 27 },
    };
    let e = rt.evaluate(&module, None, &input);
    let n = body.len();
    let out = e.outcome.map(|_| {
        let mem = e.memory.expect("memory of a successful evaluation");
        (0..n).map(|i| i32::from_le_bytes(mem[ERRNOS + 4 * i..ERRNOS + 4 * i + 4].try_into().unwrap())).collect()
    });
    (out, n)
}

#[test]
fn calls_without_a_model_return_wasmedges_errnos() {
    let (errnos, _) = run(&[
        // an unregistered name: model_not_found
        "(call $by_name (i32.const 1200) (i32.const 4) (i32.const 3000))",
        // encoding 0 (openvino): invalid_encoding
        "(call $load (i32.const 1280) (i32.const 1) (i32.const 0) (i32.const 0) (i32.const 3000))",
        // ggml, but not a GGUF: invalid_argument
        "(call $load (i32.const 1280) (i32.const 1) (i32.const 6) (i32.const 0) (i32.const 3000))",
        // no such graph / context: not_found
        "(call $init (i32.const 9) (i32.const 3000))",
        "(call $compute (i32.const 9))",
    ]);
    assert_eq!(errnos.unwrap(), [103, 2, 1, 8, 8]);
}

#[test]
fn a_pointer_outside_memory_traps() {
    let (out, _) = run(&["(call $by_name (i32.const 65530) (i32.const 100) (i32.const 3000))"]);
    match out {
        Err(EvalError::Trap(msg)) => assert!(msg.contains("outside memory"), "{msg}"),
        other => panic!("expected a trap, got {other:?}"),
    }
}

#[test]
fn a_model_with_an_allow_list_is_not_found_by_other_processes() {
    // "nope" registered for process p1 only, at a path that does not exist.
    let entry = ModelEntry { path: "/nonexistent/model.gguf".into(), sha256: "0".repeat(64), processes: Some(vec!["p1".into()]) };
    let models = ModelRegistry { models: [("nope".to_owned(), entry)].into() };
    let call = ["(call $by_name (i32.const 1200) (i32.const 4) (i32.const 3000))"];
    let (other, _) = run_with(&call, models.clone(), r#"{"Process":{"Id":"p2"}}"#);
    assert_eq!(other.unwrap(), [103], "another process: model_not_found");
    let (allowed, _) = run_with(&call, models, r#"{"Process":{"Id":"p1"}}"#);
    assert_eq!(allowed.unwrap(), [5], "the allowed process gets past the check (then the file is missing: runtime_error)");
}

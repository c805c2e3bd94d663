//! Host behaviour on small hand-written emscripten-shaped modules (E2 profile), so it is checked
//! without the AO fixtures: the `ccall` string placement, the inline gas counter, `invoke_*` and
//! longjmp, `exit`, `ok:false`, and the process's rollback.

use super::*;

/// An E2-shaped module. `handle` charges 100 gas through the inline counter, then by the first
/// byte of the message: `x` exit(3), `j` an invoke_vii whose callee longjmps, `f` answers ok:false,
/// `w` writes `W` at 4096; otherwise answers Output "hi".
const MODULE: &str = r#"(module
  (import "metering" "out_of_gas" (func $oog))
  (import "env" "exit" (func $exit (param i32)))
  (import "env" "invoke_vii" (func $invoke (param i32 i32 i32)))
  (import "env" "_emscripten_throw_longjmp" (func $longjmp))
  (memory (export "memory") 2 100)
  (table (export "__indirect_function_table") 1 funcref)
  (elem (i32.const 0) $thrower)
  (global $sp (mut i32) (i32.const 65536))
  (global $heap (mut i32) (i32.const 8192))
  (global $threw (mut i32) (i32.const 0))
  (global $gas (export "__ao_gas_used") (mut i64) (i64.const 0))
  (global $limit (export "__ao_gas_limit") (mut i64) (i64.const 0))
  (func $thrower (param i32 i32) (call $longjmp))
  (func (export "__wasm_call_ctors"))
  (func (export "emscripten_stack_init"))
  (func (export "emscripten_stack_get_end") (result i32) (i32.const 1024))
  (func (export "stackSave") (result i32) (global.get $sp))
  (func (export "stackRestore") (param i32) (global.set $sp (local.get 0)))
  (func (export "stackAlloc") (param i32) (result i32)
    (global.set $sp (i32.and (i32.sub (global.get $sp) (local.get 0)) (i32.const -16)))
    (global.get $sp))
  (func (export "setThrew") (param i32 i32) (global.set $threw (local.get 0)))
  (func (export "main") (param i32 i32) (result i32) (i32.const 0))
  (func (export "malloc") (param i32) (result i32) (local $p i32)
    (local.set $p (global.get $heap))
    (global.set $heap (i32.add (global.get $heap) (local.get 0)))
    (local.get $p))
  (func (export "free") (param i32))
  (func (export "handle") (param $msg i32) (param $env i32) (result i32) (local $c i32)
    (global.set $gas (i64.add (global.get $gas) (i64.const 100)))
    (if (i64.gt_u (global.get $gas) (global.get $limit)) (then (call $oog)))
    (local.set $c (i32.load8_u (local.get $msg)))
    (if (i32.eq (local.get $c) (i32.const 120)) (then (call $exit (i32.const 3))))
    (if (i32.eq (local.get $c) (i32.const 106)) (then
      (call $invoke (i32.const 0) (i32.const 0) (i32.const 0))
      (if (i32.eq (global.get $threw) (i32.const 1)) (then (return (i32.const 2200))))))
    (if (i32.eq (local.get $c) (i32.const 102)) (then (return (i32.const 2400))))
    (if (i32.eq (local.get $c) (i32.const 119)) (then (i32.store8 (i32.const 4096) (i32.const 87))))
    (i32.const 2048))
  (data (i32.const 2048) "{\"ok\":true,\"response\":{\"Output\":\"hi\"}}\00")
  (data (i32.const 2200) "{\"ok\":true,\"response\":{\"Output\":\"caught\"}}\00")
  (data (i32.const 2400) "{\"ok\":false,\"response\":\"thrown\"}\00")
)"#;

fn module() -> std::sync::Arc<AosModule> {
    let engine = AosEngine::new(None).unwrap();
    let wasm = wat::parse_str(MODULE).unwrap_or_else(|e| panic!("{e}"));
    engine.load(&wasm, AosFormat::Emscripten2).unwrap()
}

fn opts(gas_limit: u64) -> InstanceOptions {
    InstanceOptions { gas_limit, ..InstanceOptions::default() }
}

#[test]
fn strings_are_placed_on_the_stack_like_ccall() {
    let mut i = module().instantiate(None, &opts(1000)).unwrap();
    // The boot's main(argc, argv): argv (8 bytes) at 65520, then "./this.program" (15) at 65504.
    let out = i.handle("aé", "{}").unwrap();
    assert_eq!(out.output, serde_json::json!("hi"));
    // E2 reserves 4 * UTF-16 length + 1: msg "aé" 9 bytes -> 16, then env 9 -> 16.
    let sp = 65536 - 16 - 16;
    let msg_at = sp - 16;
    let env_at = msg_at - 16;
    assert_eq!(&i.memory()[msg_at..msg_at + 4], "aé\0".as_bytes());
    assert_eq!(&i.memory()[env_at..env_at + 3], b"{}\0");
    assert_eq!(&i.memory()[sp..sp + 15], b"./this.program\0");
    assert_eq!(&i.memory()[sp + 16..sp + 24], &[0xe0, 0xff, 0, 0, 0, 0, 0, 0], "argv = [arg0, NULL]");
}

#[test]
fn inline_gas_counter_feeds_gas_used_and_the_limit() {
    let mut i = module().instantiate(None, &opts(150)).unwrap();
    assert_eq!(i.handle("a", "{}").unwrap().gas_used, 100);
    assert_eq!(i.handle("a", "{}").unwrap().gas_used, 100, "gas is per message");
    let mut i = module().instantiate(None, &opts(50)).unwrap();
    assert_eq!(i.handle("a", "{}"), Err(AosError::OutOfGas { limit: 50 }));
    assert_eq!(i.handle("a", "{}"), Err(AosError::Poisoned));
}

#[test]
fn longjmp_is_caught_by_invoke_and_exit_and_throws_are_errors() {
    let m = module();
    let mut i = m.instantiate(None, &opts(1000)).unwrap();
    assert_eq!(i.handle("j", "{}").unwrap().output, serde_json::json!("caught"));
    assert_eq!(i.handle("f", "{}"), Err(AosError::Evaluation("thrown".into())));
    let mut i = m.instantiate(None, &opts(1000)).unwrap();
    assert_eq!(i.handle("x", "{}"), Err(AosError::Exit(3)));
}

#[test]
fn process_rolls_back_on_errors() {
    let mut p = AosProcess::new(module(), opts(1000));
    assert_eq!(p.handle("w", "{}").unwrap().error, None);
    assert_eq!(p.memory()[4096], b'W');
    let before = p.memory_sha256();
    let failed = p.handle("x", "{}").unwrap();
    assert_eq!(failed.error.as_deref(), Some("the process called exit(3)"));
    assert_eq!(p.memory_sha256(), before);
    let out = p.handle("a", "{}").unwrap();
    assert_eq!((out.error, out.gas_used), (None, 100));
    assert_eq!(p.memory()[4096], b'W', "the fresh instance was restored from the saved memory");
    assert_eq!(p.handle("f", "{}").unwrap().error.as_deref(), Some("thrown"));
}

#[test]
fn types_cross_threads() {
    fn send_sync<T: Send + Sync>() {}
    fn send<T: Send>() {}
    send_sync::<AosEngine>();
    send_sync::<AosModule>();
    send::<AosInstance>();
    send::<AosProcess>();
    send_sync::<AosError>();
}

#[test]
fn metered_compiles_have_their_own_disk_cache_key() {
    let sha = [7u8; 32];
    assert_eq!(engine::disk_key(&sha, AosFormat::Emscripten4), sha, "unmetered formats share the plain key");
    assert_eq!(engine::disk_key(&sha, AosFormat::Emscripten2), sha);
    let e4m = engine::disk_key(&sha, AosFormat::EmscriptenMetering);
    let w64m = engine::disk_key(&sha, AosFormat::Wasm64Metering);
    assert!(e4m != sha && w64m != sha && e4m != w64m, "each metering format keys its own compile");
    assert_ne!(e4m, engine::disk_key(&[8u8; 32], AosFormat::EmscriptenMetering));
}

#[test]
fn a_module_the_metering_pass_refuses_is_a_clear_load_error() {
    let engine = AosEngine::new(None).unwrap();
    // Already imports `metering.usegas`: the pass refuses it, as the loader does.
    let wasm = wat::parse_str(r#"(module (import "metering" "usegas" (func (param i64))) (memory (export "memory") 1))"#).unwrap();
    match engine.load(&wasm, AosFormat::Wasm64Metering) {
        Err(AosError::Metering { format, detail }) => {
            assert_eq!(format, AosFormat::Wasm64Metering.name());
            assert!(detail.contains("metering.usegas"), "{detail}");
        }
        other => panic!("expected a metering error, got {other:?}"),
    }
}

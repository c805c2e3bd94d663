//! Runtime tests with inline WAT actors (no wasm toolchain needed): the ABI at load, evaluation,
//! state and rollback, limits, the WASI subset, determinism and the disk cache.

use std::time::{Duration, Instant};

use super::*;

const PAGE: u64 = 65536;
const MIB: u64 = 1 << 20;

// Kitchen-sink actor memory layout.
const COUNT: u32 = 1024; // {"ok":true,"response":{"Output":"0"}} — the digit is the counter
const OK: u32 = 1100;
const OK_FALSE: u32 = 1200;
const REFUSED: u32 = 1300;
const GROWN: u32 = 1400;
const NOT_JSON: u32 = 1500;
const BAD_UTF8: u32 = 1550;
const ERROR_FIELD: u32 = 1600;
const NO_OK: u32 = 1700;
const HELLO: u32 = 1800;
const TO_STDERR: u32 = 1850;
const IOVS: u32 = 1900;
const CLOCK_OUT: u32 = 2048;
const NWRITTEN: u32 = 2064;
const ERRNOS: u32 = 2068; // i32 errnos the actors store for the tests to read
const RANDOM_OUT: u32 = 2100;
const INIT_COUNT: u32 = 3001;
const HEAP: u32 = 4096;

const COUNT_JSON: &str = r#"{"ok":true,"response":{"Output":"0"}}"#;

/// WAT string literal for arbitrary bytes.
fn wat_bytes(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("\\{b:02x}")).collect()
}

fn data(addr: u32, bytes: &[u8]) -> String {
    format!("(data (i32.const {addr}) \"{}\")\n", wat_bytes(bytes))
}

fn digit_addr() -> u32 {
    COUNT + COUNT_JSON.find('0').unwrap() as u32
}

/// A bump allocator that grows memory when it runs out and answers 0 when it cannot.
const BUMP_MALLOC: &str = r#"
  (global $heap (mut i32) (i32.const 4096))
  (func (export "malloc") (param $n i32) (result i32)
    (local $p i32) (local $end i32)
    (local.set $p (global.get $heap))
    (local.set $end (i32.add (local.get $p) (local.get $n)))
    (if (i32.gt_u (local.get $end) (i32.mul (memory.size) (i32.const 65536)))
      (then
        (if (i32.eq (memory.grow (i32.add (i32.div_u (i32.sub (local.get $end) (i32.mul (memory.size) (i32.const 65536))) (i32.const 65536)) (i32.const 1)))
                    (i32.const -1))
          (then (return (i32.const 0))))))
    (global.set $heap (local.get $end))
    (local.get $p))
"#;

/// The actor most tests use: `handle` dispatches on the first byte of the message.
fn kitchen_sink() -> Vec<u8> {
    let digit = digit_addr();
    let mut wat = String::from(
        r#"(module
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "clock_time_get" (func $clock_time_get (param i32 i64 i32) (result i32)))
  (import "wasi_snapshot_preview1" "random_get" (func $random_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
  (memory (export "memory") 1)
"#,
    );
    wat.push_str(BUMP_MALLOC);
    for (addr, bytes) in [
        (COUNT, COUNT_JSON.as_bytes()),
        (OK, br#"{"ok":true,"response":{"Output":"ok"}}"#.as_slice()),
        (OK_FALSE, br#"{"ok":false,"response":{"Error":"nope"}}"#),
        (REFUSED, br#"{"ok":true,"response":{"Output":"refused"}}"#),
        (GROWN, br#"{"ok":true,"response":{"Output":"grown"}}"#),
        (NOT_JSON, b"not json"),
        (BAD_UTF8, b"\xff\xfe"),
        (ERROR_FIELD, br#"{"ok":true,"response":{"Output":"x","Error":"boom"}}"#),
        (NO_OK, br#"{"response":{}}"#),
        (HELLO, b"hello log\n"),
        (TO_STDERR, b"to stderr\n"),
    ] {
        wat.push_str(&data(addr, bytes));
    }
    let iovs: Vec<u8> = [HELLO, 10, TO_STDERR, 10].iter().flat_map(|v| v.to_le_bytes()).collect();
    wat.push_str(&data(IOVS, &iovs));
    wat.push_str(&format!(
        r#"
  (func $bump (i32.store8 (i32.const {digit}) (i32.add (i32.load8_u (i32.const {digit})) (i32.const 1))))
  (func (export "_initialize")
    (i32.store8 (i32.const {INIT_COUNT}) (i32.add (i32.load8_u (i32.const {INIT_COUNT})) (i32.const 1))))
  (func (export "handle") (param $msg i32) (param $env i32) (result i32)
    (local $c i32)
    (local.set $c (i32.load8_u (local.get $msg)))
    (if (i32.eq (local.get $c) (i32.const 0x63)) (then (call $bump) (return (i32.const {COUNT}))))   ;; c
    (if (i32.eq (local.get $c) (i32.const 0x46)) (then (call $bump) unreachable))                     ;; F
    (if (i32.eq (local.get $c) (i32.const 0x45)) (then (call $bump) (return (i32.const {OK_FALSE})))) ;; E
    (if (i32.eq (local.get $c) (i32.const 0x4c)) (then (loop $l (br $l))))                            ;; L
    (if (i32.eq (local.get $c) (i32.const 0x47))                                                      ;; G
      (then (if (i32.eq (memory.grow (i32.const 1000)) (i32.const -1)) (then (return (i32.const {REFUSED}))))
            (return (i32.const {GROWN}))))
    (if (i32.eq (local.get $c) (i32.const 0x48))                                                      ;; H
      (then (call $bump) (drop (memory.grow (i32.const 1000)))
            (i32.store (i32.const 65535996) (i32.const 1)) (return (i32.const {GROWN}))))
    (if (i32.eq (local.get $c) (i32.const 0x55)) (then unreachable))                                  ;; U
    (if (i32.eq (local.get $c) (i32.const 0x50)) (then (return (i32.const 0xffffff00))))              ;; P
    (if (i32.eq (local.get $c) (i32.const 0x30)) (then (return (i32.const 0))))                       ;; 0
    (if (i32.eq (local.get $c) (i32.const 0x4e))                                                      ;; N
      (then (i32.store (i32.sub (i32.mul (memory.size) (i32.const 65536)) (i32.const 4)) (i32.const 0x78787878))
            (return (i32.sub (i32.mul (memory.size) (i32.const 65536)) (i32.const 4)))))
    (if (i32.eq (local.get $c) (i32.const 0x4a)) (then (return (i32.const {NOT_JSON}))))              ;; J
    (if (i32.eq (local.get $c) (i32.const 0x42)) (then (return (i32.const {BAD_UTF8}))))              ;; B
    (if (i32.eq (local.get $c) (i32.const 0x4b)) (then (return (i32.const {ERROR_FIELD}))))           ;; K
    (if (i32.eq (local.get $c) (i32.const 0x53)) (then (return (i32.const {NO_OK}))))                 ;; S
    (if (i32.eq (local.get $c) (i32.const 0x65)) (then (return (local.get $env))))                    ;; e
    (if (i32.eq (local.get $c) (i32.const 0x57))                                                      ;; W
      (then (i32.store (i32.const {ERRNOS}) (call $fd_write (i32.const 1) (i32.const {IOVS}) (i32.const 1) (i32.const {NWRITTEN})))
            (i32.store (i32.const {ERRNOS_1}) (call $fd_write (i32.const 2) (i32.const {IOVS_2}) (i32.const 1) (i32.const {NWRITTEN})))
            (i32.store (i32.const {ERRNOS_2}) (call $fd_write (i32.const 7) (i32.const {IOVS}) (i32.const 1) (i32.const {NWRITTEN})))
            (i32.store (i32.const {ERRNOS_3}) (call $fd_write (i32.const 1) (i32.const 0xfffffff0) (i32.const 1) (i32.const {NWRITTEN})))
            (i32.store (i32.const {ERRNOS_4}) (call $random_get (i32.const 0xffffff00) (i32.const 1000)))
            (i32.store (i32.const {ERRNOS_5}) (call $clock_time_get (i32.const 0) (i64.const 0) (i32.const -4)))
            (return (i32.const {OK}))))
    (if (i32.eq (local.get $c) (i32.const 0x54))                                                      ;; T
      (then (i32.store (i32.const {ERRNOS}) (call $clock_time_get (i32.const 0) (i64.const 1) (i32.const {CLOCK_OUT})))
            (return (i32.const {OK}))))
    (if (i32.eq (local.get $c) (i32.const 0x52))                                                      ;; R
      (then (i32.store (i32.const {ERRNOS}) (call $random_get (i32.const {RANDOM_OUT}) (i32.const 40)))
            (i32.store (i32.const {ERRNOS_1}) (call $random_get (i32.const {RANDOM_OUT_40}) (i32.const 24)))
            (return (i32.const {OK}))))
    (if (i32.eq (local.get $c) (i32.const 0x58)) (then (call $proc_exit (i32.const 3))))              ;; X
    (i32.const {OK}))
)"#,
        ERRNOS_1 = ERRNOS + 4,
        ERRNOS_2 = ERRNOS + 8,
        ERRNOS_3 = ERRNOS + 12,
        ERRNOS_4 = ERRNOS + 16,
        ERRNOS_5 = ERRNOS + 20,
        IOVS_2 = IOVS + 8,
        RANDOM_OUT_40 = RANDOM_OUT + 40,
    ));
    wat::parse_str(&wat).unwrap_or_else(|e| panic!("{e}\n{wat}"))
}

fn format_tags() -> Vec<Tag> {
    vec![Tag::new("Module-Format", MODULE_FORMAT), Tag::new("Input-Encoding", "JSON-1"), Tag::new("Output-Encoding", "JSON-1")]
}

struct Fixture {
    rt: Runtime,
    _dir: tempfile::TempDir,
}

fn runtime_with(max_memory: u64, max_compute: u64, deadline: Duration) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let rt = Runtime::new(RuntimeConfig { cache_dir: dir.path().join("modules"), max_memory, max_compute, deadline }).unwrap();
    Fixture { rt, _dir: dir }
}

fn runtime() -> Fixture {
    runtime_with(16 * MIB, 100_000_000, Duration::from_secs(10))
}

const LIMITS: Limits = Limits { memory_bytes: 16 * MIB, compute: 100_000_000 };

fn msg(text: &str) -> EvalInput<'_> {
    EvalInput { msg_json: text, env_json: "{}", timestamp_ms: 1_700_000_000_123, message_id: "message-1", limits: LIMITS }
}

fn load_wat(rt: &Runtime, wat: &str) -> Result<Arc<ActorModule>, RuntimeError> {
    rt.load(&wat::parse_str(wat).unwrap_or_else(|e| panic!("{e}\n{wat}")), &format_tags())
}

fn output(e: &Evaluation) -> &str {
    match &e.outcome {
        Ok(response) => response["Output"].as_str().unwrap_or_else(|| panic!("no string Output in {response}")),
        Err(err) => panic!("evaluation failed: {err}; log: {}", e.log),
    }
}

fn err(e: &Evaluation) -> &EvalError {
    assert!(e.memory.is_none(), "a failed evaluation returned memory");
    e.outcome.as_ref().expect_err("evaluation succeeded")
}

fn u32_at(mem: &[u8], addr: u32) -> u32 {
    u32::from_le_bytes(mem[addr as usize..addr as usize + 4].try_into().unwrap())
}

/// A module with the given malloc and handle bodies, no imports, one page.
fn simple(malloc: &str, handle: &str) -> String {
    format!(
        r#"(module (memory (export "memory") 1)
  {}
  (func (export "malloc") (param i32) (result i32) {malloc})
  (func (export "handle") (param i32 i32) (result i32) {handle}))"#,
        data(OK, br#"{"ok":true,"response":{"Output":"ok"}}"#)
    )
}

// ---- evaluation -------------------------------------------------------------------------------

#[test]
fn good_actor_returns_output() {
    let f = runtime();
    let m = f.rt.load(&kitchen_sink(), &format_tags()).unwrap();
    assert!(m.has_initialize());
    let e = f.rt.evaluate(&m, None, &msg("{}"));
    assert_eq!(output(&e), "ok");
    assert_eq!(e.outcome.as_ref().unwrap(), &serde_json::json!({"Output": "ok"}));
    assert!(e.gas_used > 0);
    assert_eq!(e.memory.as_ref().unwrap().len() as u64, PAGE);
}

#[test]
fn encoding_tags_may_be_absent() {
    let f = runtime();
    f.rt.load(&kitchen_sink(), &[Tag::new("Module-Format", MODULE_FORMAT)]).unwrap();
}

#[test]
fn message_and_env_are_placed_as_nul_terminated_strings() {
    let f = runtime();
    let m = f.rt.load(&kitchen_sink(), &format_tags()).unwrap();
    let env = r#"{"ok":true,"response":{"Output":"from env ✓"}}"#;
    let e = f.rt.evaluate(&m, None, &EvalInput { env_json: env, ..msg("e") });
    assert_eq!(output(&e), "from env ✓");
}

#[test]
fn large_messages_grow_memory_through_malloc() {
    let f = runtime();
    let m = f.rt.load(&kitchen_sink(), &format_tags()).unwrap();
    let big = format!("c{}", "x".repeat(200_000));
    let e = f.rt.evaluate(&m, None, &msg(&big));
    assert_eq!(output(&e), "1");
    assert!(e.memory.unwrap().len() as u64 >= 4 * PAGE);
}

#[test]
fn state_persists_and_rolls_back_after_failures() {
    let f = runtime();
    let m = f.rt.load(&kitchen_sink(), &format_tags()).unwrap();
    let first = f.rt.evaluate(&m, None, &msg("c"));
    assert_eq!(output(&first), "1");
    let state1 = first.memory.unwrap();
    assert_eq!(state1[INIT_COUNT as usize], 1, "_initialize runs on the first message");

    let second = f.rt.evaluate(&m, Some(&state1), &msg("c"));
    assert_eq!(output(&second), "2");
    let state2 = second.memory.unwrap();
    assert_eq!(state2[INIT_COUNT as usize], 1, "_initialize never runs after a restore");

    // Each of these bumps the counter in memory and then fails: the caller keeps state2.
    for (text, check) in [
        ("F", &(|e: &EvalError| matches!(e, EvalError::Trap(_))) as &dyn Fn(&EvalError) -> bool),
        ("E", &|e: &EvalError| *e == EvalError::Actor("nope".into())),
        ("H", &|e: &EvalError| *e == EvalError::OutOfMemory { limit_bytes: LIMITS.memory_bytes }),
    ] {
        let failed = f.rt.evaluate(&m, Some(&state2), &msg(text));
        assert!(check(err(&failed)), "{text}: {:?}", failed.outcome);
    }
    let third = f.rt.evaluate(&m, Some(&state2), &msg("c"));
    assert_eq!(output(&third), "3");
}

#[test]
fn same_message_same_state_same_gas() {
    let f = runtime();
    let m = f.rt.load(&kitchen_sink(), &format_tags()).unwrap();
    let state = f.rt.evaluate(&m, None, &msg("c")).memory.unwrap();
    let a = f.rt.evaluate(&m, Some(&state), &msg("c"));
    let b = f.rt.evaluate(&m, Some(&state), &msg("c"));
    assert_eq!(a, b);
    assert!(a.gas_used > 0);
    // A failure reports the fuel burned up to it, deterministically too.
    let x = f.rt.evaluate(&m, Some(&state), &msg("F"));
    let y = f.rt.evaluate(&m, Some(&state), &msg("F"));
    assert_eq!(x.gas_used, y.gas_used);
}

#[test]
fn infinite_loop_runs_out_of_fuel() {
    let f = runtime();
    let m = f.rt.load(&kitchen_sink(), &format_tags()).unwrap();
    let limits = Limits { compute: 10_000, ..LIMITS };
    let e = f.rt.evaluate(&m, None, &EvalInput { limits, ..msg("L") });
    assert_eq!(err(&e), &EvalError::OutOfFuel { limit: 10_000 });
    assert_eq!(e.gas_used, 10_000);
}

#[test]
fn infinite_loop_with_huge_fuel_hits_the_deadline() {
    let deadline = Duration::from_millis(100);
    let f = runtime_with(16 * MIB, u64::MAX, deadline);
    let m = f.rt.load(&kitchen_sink(), &format_tags()).unwrap();
    let started = Instant::now();
    let e = f.rt.evaluate(&m, None, &EvalInput { limits: Limits { compute: u64::MAX, ..LIMITS }, ..msg("L") });
    let took = started.elapsed();
    assert_eq!(err(&e), &EvalError::Timeout { deadline });
    assert!(took >= deadline && took < deadline * 20, "took {took:?}");
}

#[test]
fn refused_memory_grow_is_seen_by_the_guest() {
    let f = runtime();
    let m = f.rt.load(&kitchen_sink(), &format_tags()).unwrap();
    let e = f.rt.evaluate(&m, None, &msg("G"));
    assert_eq!(output(&e), "refused");
    assert_eq!(e.memory.unwrap().len() as u64, PAGE);
    // With room for it, the same grow succeeds.
    let big = Limits { memory_bytes: 128 * MIB, ..LIMITS };
    let g = runtime_with(128 * MIB, 100_000_000, Duration::from_secs(10));
    let m = g.rt.load(&kitchen_sink(), &format_tags()).unwrap();
    let e = g.rt.evaluate(&m, None, &EvalInput { limits: big, ..msg("G") });
    assert_eq!(output(&e), "grown");
    assert_eq!(e.memory.unwrap().len() as u64, 1001 * PAGE);
}

#[test]
fn state_larger_than_the_memory_limit_is_out_of_memory() {
    let f = runtime();
    let m = f.rt.load(&kitchen_sink(), &format_tags()).unwrap();
    let state = f.rt.evaluate(&m, None, &msg("c")).memory.unwrap();
    let mut big = state.clone();
    big.resize(3 * PAGE as usize, 0);
    let limits = Limits { memory_bytes: 2 * PAGE, ..LIMITS };
    let e = f.rt.evaluate(&m, Some(&big), &EvalInput { limits, ..msg("c") });
    assert_eq!(err(&e), &EvalError::OutOfMemory { limit_bytes: 2 * PAGE });
    // A restored state larger than the module's minimum is grown into place.
    let e = f.rt.evaluate(&m, Some(&big), &msg("c"));
    assert_eq!(output(&e), "2");
    assert_eq!(e.memory.unwrap().len(), big.len());
}

#[test]
fn memory_limit_below_the_module_minimum_is_out_of_memory() {
    let f = runtime();
    let m = load_wat(
        &f.rt,
        &simple("(i32.const 4096)", "(i32.const 1100)").replace("(memory (export \"memory\") 1)", "(memory (export \"memory\") 4)"),
    )
    .unwrap();
    let e = f.rt.evaluate(&m, None, &EvalInput { limits: Limits { memory_bytes: 2 * PAGE, ..LIMITS }, ..msg("x") });
    assert_eq!(err(&e), &EvalError::OutOfMemory { limit_bytes: 2 * PAGE });
}

#[test]
fn traps_and_bad_results_are_errors() {
    let f = runtime();
    let m = f.rt.load(&kitchen_sink(), &format_tags()).unwrap();
    let case = |text: &str| err(&f.rt.evaluate(&m, None, &msg(text))).clone();
    assert_eq!(case("U"), EvalError::Trap("wasm `unreachable` instruction executed".into()));
    assert!(matches!(case("P"), EvalError::BadResult(s) if s.contains("past the end of memory")));
    assert!(matches!(case("0"), EvalError::BadResult(s) if s.contains("null")));
    assert!(matches!(case("N"), EvalError::BadResult(s) if s.contains("no NUL")));
    assert!(matches!(case("J"), EvalError::BadResult(s) if s.contains("not JSON")));
    assert!(matches!(case("B"), EvalError::BadResult(s) if s.contains("not UTF-8")));
    assert!(matches!(case("S"), EvalError::BadResult(s) if s.contains("`ok`")));
    assert_eq!(case("E"), EvalError::Actor("nope".into()));
    assert_eq!(case("K"), EvalError::Actor("boom".into()));
    assert_eq!(case("X"), EvalError::Exit(3));
}

#[test]
fn bad_malloc_never_panics() {
    let f = runtime();
    for (malloc, check) in [
        (
            "(i32.const 0)",
            &(|e: &EvalError| *e == EvalError::OutOfMemory { limit_bytes: LIMITS.memory_bytes }) as &dyn Fn(&EvalError) -> bool,
        ),
        ("(i32.const -16)", &|e: &EvalError| matches!(e, EvalError::BadResult(s) if s.contains("malloc"))),
        ("(i32.const 65535)", &|e: &EvalError| matches!(e, EvalError::BadResult(s) if s.contains("malloc"))),
        ("(i32.const 0x7fffffff)", &|e: &EvalError| matches!(e, EvalError::BadResult(_))),
        ("unreachable", &|e: &EvalError| matches!(e, EvalError::Trap(_))),
        ("(loop $l (br $l)) (i32.const 8)", &|e: &EvalError| matches!(e, EvalError::OutOfFuel { .. })),
    ] {
        let m = load_wat(&f.rt, &simple(malloc, "(i32.const 1100)")).unwrap();
        let e = f.rt.evaluate(&m, None, &EvalInput { limits: Limits { compute: 1_000_000, ..LIMITS }, ..msg("hello") });
        assert!(check(err(&e)), "malloc {malloc}: {:?}", e.outcome);
    }
    // Unbounded recursion exhausts the wasm stack, not the worker's.
    let m = load_wat(
        &f.rt,
        &simple("(i32.const 4096)", "(call $rec) (i32.const 0)")
            .replace("(func (export \"malloc\")", "(func $rec (call $rec)) (func (export \"malloc\")"),
    )
    .unwrap();
    assert_eq!(err(&f.rt.evaluate(&m, None, &msg("x"))), &EvalError::Trap("call stack exhausted".into()));
    // malloc handing out the same garbage (but in-bounds) address for both strings, and handle
    // returning the message itself, which is not a result.
    let m = load_wat(&f.rt, &simple("(i32.const 8)", "(local.get 0)")).unwrap();
    assert!(matches!(err(&f.rt.evaluate(&m, None, &msg("x"))), EvalError::BadResult(_)));
}

// ---- WASI ---------------------------------------------------------------------------------------

#[test]
fn fd_write_is_captured_and_bad_pointers_fault() {
    let f = runtime();
    let m = f.rt.load(&kitchen_sink(), &format_tags()).unwrap();
    let e = f.rt.evaluate(&m, None, &msg("W"));
    assert_eq!(output(&e), "ok");
    assert_eq!(e.log, "hello log\nto stderr\n");
    let mem = e.memory.unwrap();
    let errnos: Vec<u32> = (0..6).map(|i| u32_at(&mem, ERRNOS + 4 * i)).collect();
    assert_eq!(errnos, [0, 0, 8, 21, 21, 21], "stdout, stderr, fd 7 (BADF), bad iovs, bad random buf, bad clock ptr (FAULT)");
    assert_eq!(u32_at(&mem, NWRITTEN), 10);
}

#[test]
fn log_survives_failure_and_is_capped() {
    let f = runtime();
    let m = load_wat(
        &f.rt,
        &format!(
            r#"(module
  (import "wasi_snapshot_preview1" "fd_write" (func $w (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 2)
  {}
  (func (export "malloc") (param i32) (result i32) (i32.const 4096))
  (func (export "handle") (param i32 i32) (result i32)
    (local $i i32)
    (loop $l
      (drop (call $w (i32.const 1) (i32.const 16) (i32.const 1) (i32.const 24)))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $l (i32.lt_u (local.get $i) (i32.const 3))))
    unreachable))"#,
            data(16, &[0x00, 0x00, 0x01, 0x00, 0x00, 0x80, 0x00, 0x00]) // one iovec: 32 KiB at 65536
        ),
    )
    .unwrap();
    let e = f.rt.evaluate(&m, None, &msg("x"));
    assert!(matches!(err(&e), EvalError::Trap(_)));
    assert!(e.log.starts_with(&"\0".repeat(100)));
    assert!(e.log.ends_with("\n[log truncated: 32768 more bytes dropped]"), "{}", &e.log[e.log.len() - 60..]);
}

#[test]
fn clock_reads_the_message_timestamp() {
    let f = runtime();
    let m = f.rt.load(&kitchen_sink(), &format_tags()).unwrap();
    let e = f.rt.evaluate(&m, None, &EvalInput { timestamp_ms: 1_700_000_000_123, ..msg("T") });
    let mem = e.memory.unwrap();
    assert_eq!(u32_at(&mem, ERRNOS), 0);
    let ns = u64::from_le_bytes(mem[CLOCK_OUT as usize..CLOCK_OUT as usize + 8].try_into().unwrap());
    assert_eq!(ns, 1_700_000_000_123 * 1_000_000);
}

#[test]
fn random_get_is_seeded_by_the_message_id() {
    let f = runtime();
    let m = f.rt.load(&kitchen_sink(), &format_tags()).unwrap();
    let random = |id: &str| {
        let mem = f.rt.evaluate(&m, None, &EvalInput { message_id: id, ..msg("R") }).memory.unwrap();
        assert_eq!((u32_at(&mem, ERRNOS), u32_at(&mem, ERRNOS + 4)), (0, 0));
        mem[RANDOM_OUT as usize..RANDOM_OUT as usize + 64].to_vec()
    };
    let a = random("id-a");
    assert_eq!(a, random("id-a"));
    assert_ne!(a, random("id-b"));
    // Two calls (40 + 24 bytes) continue one sha256 counter-mode stream.
    let seed: [u8; 32] = Sha256::digest(b"id-a").into();
    let block = |i: u64| {
        let mut h = Sha256::new();
        h.update(seed);
        h.update(i.to_le_bytes());
        h.finalize().to_vec()
    };
    assert_eq!(a, [block(0), block(1)].concat());
}

#[test]
fn proc_exit_ends_the_evaluation() {
    let f = runtime();
    let m = f.rt.load(&kitchen_sink(), &format_tags()).unwrap();
    assert_eq!(err(&f.rt.evaluate(&m, None, &msg("X"))), &EvalError::Exit(3));
    let m = load_wat(
        &f.rt,
        r#"(module
  (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
  (memory (export "memory") 1)
  (func (export "malloc") (param i32) (result i32) (i32.const 4096))
  (func (export "handle") (param i32 i32) (result i32) (call $exit (i32.const 0)) (i32.const 0)))"#,
    )
    .unwrap();
    assert_eq!(err(&f.rt.evaluate(&m, None, &msg("x"))), &EvalError::Exit(0));
}

/// Imports every function of `wasi::FUNCTIONS` with the table's signature (so the table and the
/// linker agree) and checks the errno of each stub.
#[test]
fn every_listed_wasi_function_links_and_answers() {
    let wat_sig = |sig: &str| {
        let (params, results) = sig.split_once(" -> ").unwrap();
        let list = |s: &str| s.trim_matches(|c| c == '(' || c == ')').replace(',', "");
        format!("(param {}) (result {})", list(params), list(results))
    };
    let imports: String = wasi::FUNCTIONS
        .iter()
        .map(|(name, sig)| format!("(import \"wasi_snapshot_preview1\" \"{name}\" (func ${name} {}))\n", wat_sig(sig)))
        .collect();
    let calls = [
        "(call $fd_read (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0))",
        "(call $fd_close (i32.const 9))",
        "(call $fd_close (i32.const 1))",
        "(call $fd_seek (i32.const 1) (i64.const 0) (i32.const 0) (i32.const 100))",
        "(call $fd_seek (i32.const 5) (i64.const 0) (i32.const 0) (i32.const 100))",
        "(call $fd_fdstat_get (i32.const 1) (i32.const 200))",
        "(call $fd_fdstat_get (i32.const 3) (i32.const 200))",
        "(call $fd_fdstat_set_flags (i32.const 1) (i32.const 0))",
        "(call $fd_prestat_get (i32.const 3) (i32.const 100))",
        "(call $fd_prestat_dir_name (i32.const 3) (i32.const 100) (i32.const 4))",
        "(call $environ_sizes_get (i32.const 100) (i32.const 104))",
        "(call $environ_get (i32.const 100) (i32.const 104))",
        "(call $args_sizes_get (i32.const 100) (i32.const 104))",
        "(call $args_get (i32.const 100) (i32.const 104))",
        "(call $clock_res_get (i32.const 1) (i32.const 112))",
        "(call $clock_time_get (i32.const 99) (i64.const 0) (i32.const 112))",
        "(call $sched_yield)",
        "(call $poll_oneoff (i32.const 0) (i32.const 0) (i32.const 1) (i32.const 100))",
        "(call $random_get (i32.const 100) (i32.const 0))",
    ];
    let stores: String =
        calls.iter().enumerate().map(|(i, c)| format!("(i32.store (i32.const {}) {c})\n", ERRNOS + 4 * i as u32)).collect();
    let wat = format!(
        r#"(module {imports}
  (memory (export "memory") 1)
  {}
  (func (export "malloc") (param i32) (result i32) (i32.const {HEAP}))
  (func (export "handle") (param i32 i32) (result i32)
    (i32.store (i32.const 100) (i32.const -1)) (i32.store (i32.const 104) (i32.const -1))
    {stores} (i32.const {OK})))"#,
        data(OK, br#"{"ok":true,"response":{"Output":"ok"}}"#)
    );
    let f = runtime();
    let m = load_wat(&f.rt, &wat).unwrap();
    let e = f.rt.evaluate(&m, None, &msg("x"));
    let mem = e.memory.unwrap();
    let errnos: Vec<u32> = (0..calls.len() as u32).map(|i| u32_at(&mem, ERRNOS + 4 * i)).collect();
    assert_eq!(errnos, [8, 8, 0, 70, 8, 0, 8, 0, 8, 8, 0, 0, 0, 0, 0, 28, 0, 58, 0]);
    assert_eq!((u32_at(&mem, 100), u32_at(&mem, 104)), (0, 0), "no environment, no args");
    assert_eq!(mem[200], 2, "stdout is a character device");
    assert_eq!(u64::from_le_bytes(mem[112..120].try_into().unwrap()), 1_000_000, "resolution 1 ms");
}

// ---- load ----------------------------------------------------------------------------------------

#[test]
fn format_and_encoding_tags_are_checked() {
    let f = runtime();
    let wasm = kitchen_sink();
    let unknown = "wasm32-unknown-wasi-preview9";
    let e = f.rt.load(&wasm, &[Tag::new("Module-Format", unknown)]).unwrap_err();
    assert_eq!(e, RuntimeError::UnsupportedFormat(unknown.into()));
    assert!(e.to_string().contains(unknown) && e.to_string().contains("wasm32-unknown-emscripten4"), "{e}");
    // An aos format goes to the aos runtime, which refuses a module built for the JSON-1 ABI.
    let emscripten = "wasm64-unknown-emscripten-draft_2024_02_15";
    let e = f.rt.load(&wasm, &[Tag::new("Module-Format", emscripten)]).unwrap_err();
    assert!(matches!(&e, RuntimeError::Invalid(why) if why.contains("imports")), "{e}");
    // E3's glue is not implemented: a clear refusal, not a load attempt.
    let e = f.rt.load(&wasm, &[Tag::new("Module-Format", "wasm32-unknown-emscripten3")]).unwrap_err();
    assert!(matches!(&e, RuntimeError::Unsupported(_)), "{e}");
    assert!(matches!(f.rt.load(&wasm, &[]).unwrap_err(), RuntimeError::UnsupportedFormat(s) if s.is_empty()));
    let mut tags = format_tags();
    tags[2].value = "JSON-2".into();
    assert_eq!(f.rt.load(&wasm, &tags).unwrap_err(), RuntimeError::UnsupportedEncoding { tag: "Output-Encoding", value: "JSON-2".into() });
}

#[test]
fn missing_and_mistyped_exports_are_refused() {
    let f = runtime();
    let good_malloc = r#"(func (export "malloc") (param i32) (result i32) (i32.const 8))"#;
    let good_handle = r#"(func (export "handle") (param i32 i32) (result i32) (i32.const 8))"#;
    let mem = r#"(memory (export "memory") 1)"#;
    let cases = [
        (format!("{good_malloc} {good_handle}"), RuntimeError::MissingExport("memory")),
        (format!("{mem} {good_handle}"), RuntimeError::MissingExport("malloc")),
        (format!("{mem} {good_malloc}"), RuntimeError::MissingExport("handle")),
        (
            format!(r#"{mem} {good_malloc} (func (export "handle") (param i32) (result i32) (i32.const 8))"#),
            RuntimeError::BadExport {
                name: "handle",
                expected: "function (i32, i32) -> i32".into(),
                found: "function (i32) -> i32".into(),
            },
        ),
        (
            format!(r#"{mem} {good_malloc} (func (export "handle") (param i64 i64) (result i64) (i64.const 8))"#),
            RuntimeError::BadExport {
                name: "handle",
                expected: "function (i32, i32) -> i32".into(),
                found: "function (i64, i64) -> i64".into(),
            },
        ),
        (
            format!(r#"{mem} {good_handle} (global (export "malloc") i32 (i32.const 0))"#),
            RuntimeError::BadExport { name: "malloc", expected: "function (i32) -> i32".into(), found: "global".into() },
        ),
        (
            format!(r#"(memory (export "memory") i64 1) {good_malloc} {good_handle}"#),
            RuntimeError::BadExport { name: "memory", expected: "32-bit memory".into(), found: "64-bit memory".into() },
        ),
        (
            format!(r#"{mem} {good_malloc} {good_handle} (func (export "_initialize") (param i32))"#),
            RuntimeError::BadExport { name: "_initialize", expected: "function () -> ()".into(), found: "function (i32) -> ()".into() },
        ),
    ];
    for (body, expected) in cases {
        assert_eq!(load_wat(&f.rt, &format!("(module {body})")).unwrap_err(), expected, "{body}");
    }
    let e =
        RuntimeError::BadExport { name: "handle", expected: "function (i32, i32) -> i32".into(), found: "function (i32) -> i32".into() };
    assert_eq!(e.to_string(), "module exports `handle` as function (i32) -> i32, expected function (i32, i32) -> i32");
}

#[test]
fn unlisted_imports_are_refused_by_name() {
    let f = runtime();
    let body = simple("(i32.const 4096)", "(i32.const 1100)");
    let with_import = |import: &str| body.replacen("(module", &format!("(module {import}"), 1);
    let forbidden = |import: &str| match load_wat(&f.rt, &with_import(import)).unwrap_err() {
        RuntimeError::ForbiddenImport { module, name, detail } => (module, name, detail),
        other => panic!("{import}: {other}"),
    };
    let (module, name, _) = forbidden(r#"(import "env" "foo" (func))"#);
    assert_eq!((module.as_str(), name.as_str()), ("env", "foo"));
    let (module, name, _) =
        forbidden(r#"(import "wasi_snapshot_preview1" "path_open" (func (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))"#);
    assert_eq!((module.as_str(), name.as_str()), ("wasi_snapshot_preview1", "path_open"));
    let (_, name, detail) = forbidden(r#"(import "wasi_snapshot_preview1" "fd_write" (func (param i32 i64 i64 i64) (result i32)))"#);
    assert_eq!(name, "fd_write");
    assert!(detail.contains("(i32, i64, i64, i64) -> i32") && detail.contains("(i32, i32, i32, i32) -> i32"), "{detail}");
    let (module, name, _) = forbidden(r#"(import "env" "table" (table 1 funcref))"#);
    assert_eq!((module.as_str(), name.as_str()), ("env", "table"));
    let e = load_wat(&f.rt, &with_import(r#"(import "env" "foo" (func))"#)).unwrap_err();
    assert_eq!(e.to_string(), "module imports env.foo: not provided by the worker");
}

#[test]
fn invalid_wasm_is_refused() {
    let f = runtime();
    assert!(matches!(f.rt.load(b"\0asm\x01\0\0\0garbage", &format_tags()).unwrap_err(), RuntimeError::Invalid(_)));
    // Text is not accepted: modules are binary.
    let text = simple("(i32.const 0)", "(i32.const 0)");
    assert!(matches!(f.rt.load(text.as_bytes(), &format_tags()).unwrap_err(), RuntimeError::Invalid(_)));
    // A second memory is refused (the state is memory 0 only).
    let two = text.replacen("(memory (export \"memory\") 1)", "(memory (export \"memory\") 1) (memory 1)", 1);
    assert!(matches!(load_wat(&f.rt, &two).unwrap_err(), RuntimeError::Invalid(_)));
}

// ---- limits --------------------------------------------------------------------------------------

#[test]
fn memory_limit_parsing() {
    for (s, v) in [
        ("16-mb", 16 * MIB),
        ("16mb", 16 * MIB),
        ("16-MB", 16 * MIB),
        ("1-gb", 1 << 30),
        ("512-kb", 512 << 10),
        ("100-b", 100),
        ("65536", 65536),
        ("500-Mb", 500 * MIB),
    ] {
        assert_eq!(parse_memory_limit(s), Some(v), "{s}");
    }
    for s in ["abc-mb", "16-tb", "-mb", "16-", "1.5-gb", "", "mb", "16--mb", "99999999999999999999-b", "17179869184-gb"] {
        assert_eq!(parse_memory_limit(s), None, "{s}");
    }
    assert_eq!(parse_compute_limit("9000000000000"), Some(9_000_000_000_000));
    for s in ["9e12", "-1", "", "1_000", "18446744073709551616"] {
        assert_eq!(parse_compute_limit(s), None, "{s}");
    }
}

#[test]
fn limits_from_tags() {
    let f = runtime_with(1 << 30, 9_000_000_000_000, Duration::from_secs(1));
    let t = |pairs: &[(&str, &str)]| pairs.iter().map(|(n, v)| Tag::new(*n, *v)).collect::<Vec<_>>();
    let max = Limits { memory_bytes: 1 << 30, compute: 9_000_000_000_000 };
    assert_eq!(f.rt.limits(&[], &[]).unwrap(), max);
    let module = t(&[("Memory-Limit", "500-mb"), ("Compute-Limit", "9000000000")]);
    assert_eq!(f.rt.limits(&module, &[]).unwrap(), Limits { memory_bytes: 500 * MIB, compute: 9_000_000_000 });
    let smaller = t(&[("Memory-Limit", "16-mb"), ("Compute-Limit", "1000")]);
    assert_eq!(f.rt.limits(&module, &smaller).unwrap(), Limits { memory_bytes: 16 * MIB, compute: 1000 });
    assert_eq!(
        f.rt.limits(&t(&[("Memory-Limit", "2-gb")]), &[]).unwrap_err(),
        RuntimeError::LimitTooLarge { what: "Memory-Limit", asked: 2 << 30, max: 1 << 30, bound: "the worker's maximum" }
    );
    let e = f.rt.limits(&t(&[("Compute-Limit", "9000000000001")]), &[]).unwrap_err();
    assert_eq!(e.to_string(), "Compute-Limit 9000000000001 exceeds the worker's maximum 9000000000000");
    assert_eq!(
        f.rt.limits(&module, &t(&[("Memory-Limit", "501-mb")])).unwrap_err(),
        RuntimeError::LimitTooLarge { what: "Memory-Limit", asked: 501 * MIB, max: 500 * MIB, bound: "the module's limit" }
    );
    assert!(matches!(f.rt.limits(&[], &t(&[("Memory-Limit", "2-gb")])).unwrap_err(), RuntimeError::LimitTooLarge { .. }));
    assert_eq!(
        f.rt.limits(&t(&[("Memory-Limit", "abc-mb")]), &[]).unwrap_err(),
        RuntimeError::BadLimit { tag: "Memory-Limit", value: "abc-mb".into() }
    );
    assert!(matches!(f.rt.limits(&[], &t(&[("Compute-Limit", "0")])).unwrap_err(), RuntimeError::BadLimit { .. }));
}

#[test]
fn limits_above_the_config_are_capped_at_evaluation() {
    let f = runtime_with(16 * MIB, 20_000, Duration::from_secs(10));
    let m = f.rt.load(&kitchen_sink(), &format_tags()).unwrap();
    let e = f.rt.evaluate(&m, None, &EvalInput { limits: Limits { memory_bytes: u64::MAX, compute: u64::MAX }, ..msg("L") });
    assert_eq!(err(&e), &EvalError::OutOfFuel { limit: 20_000 });
}

#[test]
fn bad_runtime_config_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = RuntimeConfig { cache_dir: dir.path().into(), max_memory: 0, max_compute: 1, deadline: Duration::from_secs(1) };
    assert!(matches!(Runtime::new(cfg).unwrap_err(), RuntimeError::Setup(_)));
}

// ---- cache ---------------------------------------------------------------------------------------

#[test]
fn disk_cache_survives_a_restart_and_heals_corruption() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = RuntimeConfig {
        cache_dir: dir.path().join("cache"),
        max_memory: 16 * MIB,
        max_compute: 100_000_000,
        deadline: Duration::from_secs(10),
    };
    let wasm = kitchen_sink();

    let first = Runtime::new(cfg.clone()).unwrap();
    let m = first.load(&wasm, &format_tags()).unwrap();
    assert!(m.compiled_from_source());
    assert!(Arc::ptr_eq(&m, &first.load(&wasm, &format_tags()).unwrap()), "the in-memory map answers the second load");
    let files: Vec<_> = std::fs::read_dir(&cfg.cache_dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    assert_eq!(files.len(), 1, "{files:?}");
    assert!(files[0].starts_with(&hex::encode(m.sha256())) && files[0].ends_with(".cwasm"), "{files:?}");
    let reference = first.evaluate(&m, None, &msg("c"));

    let restarted = Runtime::new(cfg.clone()).unwrap();
    let cached = restarted.load(&wasm, &format_tags()).unwrap();
    assert!(!cached.compiled_from_source(), "loaded from the disk cache");
    assert_eq!(restarted.evaluate(&cached, None, &msg("c")), reference, "same result and gas from the cached code");

    let path = cfg.cache_dir.join(&files[0]);
    std::fs::write(&path, b"corrupt").unwrap();
    let healed = Runtime::new(cfg.clone()).unwrap().load(&wasm, &format_tags()).unwrap();
    assert!(healed.compiled_from_source(), "a corrupt file is recompiled");
    let again = Runtime::new(cfg.clone()).unwrap().load(&wasm, &format_tags()).unwrap();
    assert!(!again.compiled_from_source(), "and overwritten with a good one");
}

// ---- overhead ------------------------------------------------------------------------------------

/// Not a benchmark: prints the per-evaluation cost of a trivial message with a 1-page state, for
/// the record (`cargo test --lib runtime::tests::overhead -- --nocapture`).
#[test]
fn overhead_printout() {
    let f = runtime();
    let m = f.rt.load(&kitchen_sink(), &format_tags()).unwrap();
    let mut state = f.rt.evaluate(&m, None, &msg("c")).memory.unwrap();
    let n = 300;
    let started = Instant::now();
    for _ in 0..n {
        let e = f.rt.evaluate(&m, Some(&state), &msg("x"));
        state = e.memory.unwrap();
    }
    let per = started.elapsed() / n;
    eprintln!("runtime overhead: {per:?} per evaluation (1-page state, trivial handle, {n} runs)");

    // The same with a 16 MiB state: restore and save copy the whole memory each message.
    let mut state = vec![0u8; 16 * MIB as usize];
    state[..PAGE as usize].copy_from_slice(&f.rt.evaluate(&m, None, &msg("c")).memory.unwrap());
    let limits = Limits { memory_bytes: 32 * MIB, ..LIMITS };
    let g = runtime_with(32 * MIB, 100_000_000, Duration::from_secs(10));
    let m = g.rt.load(&kitchen_sink(), &format_tags()).unwrap();
    let n = 20;
    let started = Instant::now();
    for _ in 0..n {
        state = g.rt.evaluate(&m, Some(&state), &EvalInput { limits, ..msg("x") }).memory.unwrap();
    }
    let per = started.elapsed() / n;
    eprintln!("runtime overhead: {per:?} per evaluation (16 MiB state, trivial handle, {n} runs)");
}

#[test]
fn runtime_and_modules_are_shareable_across_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Runtime>();
    assert_send_sync::<ActorModule>();
    let f = runtime();
    let m = f.rt.load(&kitchen_sink(), &format_tags()).unwrap();
    let gas: Vec<u64> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4).map(|_| s.spawn(|| f.rt.evaluate(&m, None, &msg("c")).gas_used)).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(gas.windows(2).all(|w| w[0] == w[1]), "{gas:?}");
}

// ---- ao_gpu: batch submissions and the constant cache ----

use std::sync::atomic::{AtomicUsize, Ordering};

use super::host::gpu::constants::{AcquireError, ConstantKey};
use crate::gpu::pool::{SharedDevice, lock};
use crate::gpu::{DType, RawTensor};

/// Uploads A [2, 3] and B [3, 4], then runs the 3-command list at 8192 `runs` times.
fn batch_actor(runs: u32) -> String {
    let rec = |op: i32, ins: &[i32], ints: &[i32], floats: &[f32]| {
        let mut r = vec![0u8; gpu::CMD_SIZE];
        r[0..4].copy_from_slice(&op.to_le_bytes());
        for (k, v) in ins.iter().enumerate() {
            r[gpu::CMD_IN + 4 * k..gpu::CMD_IN + 4 * k + 4].copy_from_slice(&v.to_le_bytes());
        }
        for (k, v) in ints.iter().enumerate() {
            r[gpu::CMD_I + 4 * k..gpu::CMD_I + 4 * k + 4].copy_from_slice(&v.to_le_bytes());
        }
        for (k, v) in floats.iter().enumerate() {
            r[gpu::CMD_F + 4 * k..gpu::CMD_F + 4 * k + 4].copy_from_slice(&v.to_le_bytes());
        }
        r
    };
    let list =
        [rec(gpu::op::MATMUL, &[1, 2], &[0, 0], &[]), rec(gpu::op::SCALE, &[-1], &[], &[2.0]), rec(gpu::op::SOFTMAX, &[-2], &[], &[])]
            .concat();
    let f32s = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let u32s = |v: &[u32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let mut wat = String::from(
        r#"(module
  (import "ao_gpu" "tensor_f32" (func $tensor_f32 (param i32 i32 i32 i32 i32) (result i32)))
  (import "ao_gpu" "run" (func $run (param i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
"#,
    );
    wat.push_str(BUMP_MALLOC);
    wat.push_str(&data(1024, br#"{"ok":true,"response":{"Output":"ok"}}"#));
    wat.push_str(&data(1100, br#"{"ok":false,"response":{"Error":"status"}}"#));
    wat.push_str(&data(2048, &f32s(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0])));
    wat.push_str(&data(2112, &f32s(&[0.5; 12])));
    wat.push_str(&data(2176, &u32s(&[2, 3, 3, 4])));
    wat.push_str(&data(8192, &list));
    wat.push_str(&format!(
        r#"
  (func (export "handle") (param i32 i32) (result i32) (local $i i32)
    (if (call $tensor_f32 (i32.const 2048) (i32.const 6) (i32.const 2176) (i32.const 2) (i32.const 3000)) (then (return (i32.const 1100))))
    (if (call $tensor_f32 (i32.const 2112) (i32.const 12) (i32.const 2184) (i32.const 2) (i32.const 3004)) (then (return (i32.const 1100))))
    (block $done (loop $l
      (br_if $done (i32.ge_u (local.get $i) (i32.const {runs})))
      (if (call $run (i32.const 8192) (i32.const 3) (i32.const 3008)) (then (return (i32.const 1100))))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br $l)))
    (i32.const 1024))
)"#
    ));
    wat
}

#[test]
fn each_run_is_one_begin_and_one_end_batch() {
    let f = runtime();
    let m = load_wat(&f.rt, &batch_actor(3)).unwrap();
    let before = host::gpu::BATCH_CALLS.with(|c| c.get());
    let e = f.rt.evaluate(&m, None, &msg("x"));
    assert_eq!(e.outcome.as_ref().map(|v| v["Output"].clone()), Ok(serde_json::json!("ok")), "{e:?}");
    let after = host::gpu::BATCH_CALLS.with(|c| c.get());
    assert_eq!((after.0 - before.0, after.1 - before.1), (3, 3), "three runs of three commands: three batches");
}

/// A source that counts fetches and takes `delay` to answer; item "fail" is unavailable.
struct Counting {
    data: Vec<u8>,
    fetches: AtomicUsize,
    delay: Duration,
}

impl ConstantSource for Counting {
    fn fetch(&self, id: &str) -> Result<Vec<u8>, SourceError> {
        self.fetches.fetch_add(1, Ordering::SeqCst);
        std::thread::sleep(self.delay);
        if id == crate::protocol::b64::encode(&[0xee; 32]) {
            return Err(SourceError::Unavailable("down".into()));
        }
        Ok(self.data.clone())
    }
}

fn key(n: u8, data: &[u8], len: usize) -> ConstantKey {
    use sha2::{Digest, Sha256};
    ConstantKey { id: [n; 32], sha256: Sha256::digest(data).into(), dtype: DType::F32, shape: vec![len] }
}

fn cache_with(delay: Duration, max_bytes: u64) -> (Arc<ConstantCache>, Arc<Counting>, SharedDevice) {
    let data: Vec<u8> = (0..16u32).flat_map(|v| (v as f32).to_le_bytes()).collect();
    let source = Arc::new(Counting { data, fetches: AtomicUsize::new(0), delay });
    let backend: SharedDevice = Arc::new(Mutex::new(Backend::Cpu(crate::gpu::cpu::CpuBackend::new(Determinism::Reproducible))));
    (ConstantCache::new(backend.clone(), source.clone(), max_bytes), source, backend)
}

#[test]
fn concurrent_evaluations_share_one_fetch_of_a_constant() {
    let (cache, source, backend) = cache_with(Duration::from_millis(200), 1 << 20);
    let k = key(1, &source.data, 16);
    let pins: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4).map(|_| s.spawn(|| cache.acquire(k.clone(), 64).map(|(p, _)| p))).collect();
        handles.into_iter().map(|h| h.join().unwrap().unwrap()).collect()
    });
    assert_eq!(source.fetches.load(Ordering::SeqCst), 1);
    assert!(pins.windows(2).all(|w| w[0].tensor() == w[1].tensor()));
    let s = cache.stats();
    assert_eq!((s.misses, s.hits, s.entries, s.bytes), (1, 3, 1, 64));
    let t = pins[0].tensor();
    assert_eq!(lock(&backend).read_raw(t).unwrap(), RawTensor::new(DType::F32, vec![16], source.data.clone()).unwrap());
    drop(pins);
    // Dropping the cache frees what it holds.
    drop(cache);
    assert_eq!(lock(&backend).live_bytes(), 0);
}

#[test]
fn pinned_constants_are_never_evicted_and_the_cap_is_restored_when_they_are_released() {
    let (cache, source, backend) = cache_with(Duration::ZERO, 64);
    let (k1, k2) = (key(1, &source.data, 16), key(2, &source.data, 16));
    let (p1, _) = cache.acquire(k1.clone(), 64).unwrap();
    // Another evaluation needs k2 while k1 is pinned: admitted over the cap, not refused.
    let (p2, _) = cache.acquire(k2.clone(), 64).unwrap();
    assert_eq!((cache.stats().entries, cache.stats().bytes, cache.stats().evictions), (2, 128, 0));
    assert_eq!(lock(&backend).live_bytes(), 128);
    // Releasing k1 brings the cache back under the cap (k1 is the only unpinned entry).
    drop(p1);
    assert_eq!((cache.stats().entries, cache.stats().bytes, cache.stats().evictions), (1, 64, 1));
    assert_eq!(lock(&backend).live_bytes(), 64);
    drop(p2);
    assert_eq!(cache.stats().entries, 1, "k2 fits the cap: it stays for the next evaluation");
    let (_again, waited) = cache.acquire(k2, 64).unwrap();
    assert_eq!((source.fetches.load(Ordering::SeqCst), waited), (2, Duration::ZERO));
}

#[test]
fn failed_loads_leave_nothing_behind_and_wake_waiters() {
    let (cache, source, backend) = cache_with(Duration::from_millis(100), 1 << 20);
    let down = ConstantKey { id: [0xee; 32], ..key(0, &source.data, 16) };
    let results: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..3).map(|_| s.spawn(|| cache.acquire(down.clone(), 64).map(|_| ()))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    // Each waiter retries the load itself after the first one failed.
    assert!(results.iter().all(|r| matches!(r, Err(AcquireError::Unavailable(m)) if m.contains("down"))), "{results:?}");
    assert_eq!(source.fetches.load(Ordering::SeqCst), 3);
    let wrong = ConstantKey { sha256: [0; 32], ..key(3, &source.data, 16) };
    assert_eq!(cache.acquire(wrong, 64).map(|_| ()), Err(AcquireError::Mismatch));
    let s = cache.stats();
    assert_eq!((s.entries, s.bytes), (0, 0));
    assert_eq!(lock(&backend).live_bytes(), 0);
}

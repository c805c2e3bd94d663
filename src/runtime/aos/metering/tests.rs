//! Tests of the metering pass: hand-written modules with hand-computed charges (each expected
//! module below was also checked byte for byte against npm `@permaweb/wasm-metering` 0.2.2), the
//! refusals, byte identity with the reference on the aos fixtures, and a wasmtime run showing that
//! the faithful and the inline variants charge the same gas and run out of it at the same point.

use super::*;
use sha2::{Digest, Sha256};
use std::path::PathBuf;
use wasmtime::{Caller, Engine, Instance, Linker, Module, Store, Val};

fn wat(text: &str) -> Vec<u8> {
    wat::parse_str(text).unwrap_or_else(|e| panic!("test WAT does not parse: {e}"))
}

/// `meter(input)` must equal `expected` byte for byte (both written without `$names`, so wat
/// emits no name section).
fn assert_meters_to(input: &str, ty: MeterType, expected: &str) {
    let got = meter(&wat(input), ty).unwrap();
    let want = wat(expected);
    assert_eq!(got, want, "metered module differs from the hand-computed one:\n{expected}");
}

#[test]
fn segments_end_after_branches_and_charge_cost_plus_91_before_them() {
    // seg 1: local.get 120 + if 1 = 121 (+91 = 212); seg 2: 1 + 1 + div_s 36000 + else 90 = 36092
    // (+91 = 36183, charged in the then-branch); seg 3: 1 + 1 + f32.add 45 + 1 + f32.lt 0 + end 0
    // = 48 (+91 = 139); the last `end` alone costs 0 and gets no charge.
    let input = r#"(module
      (type (func (param i32)))
      (type (func (param i32) (result i32)))
      (import "env" "f" (func (type 0)))
      (func (type 1)
        local.get 0
        if (result i32) i32.const 1 i32.const 2 i32.div_s
        else f32.const 1 f32.const 2 f32.add f32.const 3 f32.lt
        end))"#;
    let expected = r#"(module
      (type (func (param i32)))
      (type (func (param i32) (result i32)))
      (type (func (param MT)))
      (import "env" "f" (func (type 0)))
      (import "metering" "usegas" (func (type 2)))
      (func (type 1)
        MT.const 212 call 1
        local.get 0
        if (result i32)
          MT.const 36183 call 1
          i32.const 1 i32.const 2 i32.div_s
        else
          MT.const 139 call 1
          f32.const 1 f32.const 2 f32.add f32.const 3 f32.lt
        end))"#;
    for (ty, t) in [(MeterType::I32, "i32"), (MeterType::I64, "i64")] {
        assert_meters_to(input, ty, &expected.replace("MT", t));
    }
}

#[test]
fn function_indices_at_and_above_the_import_shift_in_calls_exports_elements_and_start() {
    let input = r#"(module
      (type (func))
      (import "env" "a" (func (type 0)))
      (import "env" "b" (func (type 0)))
      (table 2 funcref)
      (func (type 0) call 0 call 3)
      (func (type 0) call 2)
      (export "f" (func 2))
      (export "imp" (func 1))
      (export "t" (table 0))
      (start 3)
      (elem (i32.const 0) func 1 3))"#;
    // F = 2: imports keep 0 and 1, functions 2 and 3 become 3 and 4. Costs: call 90 + call 90 +
    // end 0 = 180 (+91), call 90 (+91).
    let expected = r#"(module
      (type (func))
      (type (func (param i32)))
      (import "env" "a" (func (type 0)))
      (import "env" "b" (func (type 0)))
      (import "metering" "usegas" (func (type 1)))
      (table 2 funcref)
      (func (type 0) i32.const 271 call 2 call 0 call 4)
      (func (type 0) i32.const 181 call 2 call 3)
      (export "f" (func 3))
      (export "imp" (func 1))
      (export "t" (table 0))
      (start 4)
      (elem (i32.const 0) func 1 4))"#;
    assert_meters_to(input, MeterType::I32, expected);
}

#[test]
fn cost_table_covers_memory_calls_loops_tables_and_the_unprefixed_name_quirk() {
    let input = r#"(module
      (type (func))
      (type (func (param i32) (result i32)))
      (table 1 funcref)
      (memory 1)
      (global (mut i32) (i32.const -5))
      (global i64 (i64.const 1234567890123))
      (func (type 1)
        memory.size drop i32.const 1 memory.grow
        drop i32.const 0 call_indirect (type 0) loop
        br 0
        end
        block block local.get 0 br_table 0 1 0
        end
        end
        i32.const 7 return)
      (func (type 1)
        local.get 0 i32.const 3 i32.shl i64.const -9 i64.const 1 i64.rotr i32.wrap_i64 i32.extend8_s
        local.get 0 select global.get 0 i32.add global.set 0 i32.const 8 i32.load offset=4
        f64.const 2.5 f64.const 0.5 f64.div f64.const 1 f64.min f64.sqrt i32.trunc_f64_s
        i32.store16 offset=100000 nop unreachable)
      (data (i32.const 16) "hello"))"#;
    // No imports: F = 0, the import section is created, both functions shift (no calls here).
    // f0: size 100 + drop 120 + const 1 + grow 10000 = 10221 | drop 120 + const 1 +
    //     call_indirect 10000 + loop 1 = 10122 | br 90 | end 0 | block 1 + block 1 + local.get 120
    //     + br_table 120 = 242 | end | end | const 1 + return 90 = 91 | end.
    // f1: local.get 120, const 1, shl 67, const 1, const 1, rotr 90, wrap 0, extend8_s 0,
    //     local.get 120, select 120, global.get 120, add 45, global.set 120, const 1, load 120,
    //     f64.const 1, f64.const 1, f64.div 0, f64.const 1, f64.min 0, sqrt 0, trunc 0,
    //     store16 120, nop 1, unreachable 1, end 0 = 1051.
    let expected = r#"(module
      (type (func))
      (type (func (param i32) (result i32)))
      (type (func (param i32)))
      (import "metering" "usegas" (func (type 2)))
      (table 1 funcref)
      (memory 1)
      (global (mut i32) (i32.const -5))
      (global i64 (i64.const 1234567890123))
      (func (type 1)
        i32.const 10312 call 0 memory.size drop i32.const 1 memory.grow
        i32.const 10213 call 0 drop i32.const 0 call_indirect (type 0) loop
        i32.const 181 call 0 br 0
        end
        i32.const 333 call 0 block block local.get 0 br_table 0 1 0
        end
        end
        i32.const 182 call 0 i32.const 7 return
        )
      (func (type 1)
        i32.const 1142 call 0
        local.get 0 i32.const 3 i32.shl i64.const -9 i64.const 1 i64.rotr i32.wrap_i64 i32.extend8_s
        local.get 0 select global.get 0 i32.add global.set 0 i32.const 8 i32.load offset=4
        f64.const 2.5 f64.const 0.5 f64.div f64.const 1 f64.min f64.sqrt i32.trunc_f64_s
        i32.store16 offset=100000 nop unreachable)
      (data (i32.const 16) "hello"))"#;
    assert_meters_to(input, MeterType::I32, expected);
}

#[test]
fn a_module_without_sections_after_the_type_section_gets_no_import_like_the_reference() {
    let empty = wat("(module)");
    assert_eq!(meter(&empty, MeterType::I32).unwrap(), empty);
    let types_only = wat("(module (type (func)))");
    assert_eq!(meter(&types_only, MeterType::I64).unwrap(), wat("(module (type (func)) (type (func (param i64))))"));
}

#[test]
fn custom_sections_are_copied_unchanged() {
    let input = wat(r#"(module (@custom "before" (before first) "abc") (type (func)) (func (type 0)) (@custom "after" "\00\ff"))"#);
    let expected = wat(
        r#"(module (@custom "before" (before first) "abc") (type (func)) (type (func (param i32))) (import "metering" "usegas" (func (type 1))) (func (type 0)) (@custom "after" "\00\ff"))"#,
    );
    assert_eq!(meter(&input, MeterType::I32).unwrap(), expected);
}

#[test]
fn non_minimal_leb128_is_re_encoded_shortest_like_the_reference() {
    // (module (func (result i32) i32.const 5)) with the const written in 5 bytes.
    let mut m = wat("(module (func (result i32) i32.const 5))");
    let at = m.windows(3).position(|w| w == [0x41, 0x05, 0x0b]).expect("const in body");
    m.splice(at + 1..at + 2, [0x85, 0x80, 0x80, 0x80, 0x00]);
    // Fix the body size and code section size (both single-byte here).
    m[at - 2] += 4;
    m[at - 4] += 4;
    assert!(Validator::new().validate_all(&m).is_ok(), "patched module is valid");
    let expected = wat(
        r#"(module (type (func (result i32))) (type (func (param i32))) (import "metering" "usegas" (func (type 1))) (func (type 0) i32.const 92 call 0 i32.const 5))"#,
    );
    assert_eq!(meter(&m, MeterType::I32).unwrap(), expected);
}

#[test]
fn refusals_are_clear_errors() {
    let pre = wat(r#"(module (import "metering" "usegas" (func (param i32))))"#);
    assert_eq!(meter(&pre, MeterType::I32), Err(MeterError::AlreadyMetered));
    assert_eq!(meter_inline(&pre, MeterType::I32), Err(MeterError::AlreadyMetered));
    assert!(MeterError::AlreadyMetered.to_string().contains("importing metering function is not allowed"));

    for (what, text) in [
        ("bulk memory", "(module (memory 1) (func i32.const 0 i32.const 0 i32.const 0 memory.fill))"),
        ("saturating truncation", "(module (func (result i32) f32.const 1 i32.trunc_sat_f32_s))"),
        ("SIMD", "(module (func (result v128) v128.const i64x2 0 0))"),
        ("multi-value", "(module (func (result i32 i32) i32.const 0 i32.const 1))"),
        ("reference types", "(module (func (result externref) ref.null extern))"),
    ] {
        match meter(&wat(text), MeterType::I32) {
            Err(MeterError::Invalid(msg)) => assert!(!msg.is_empty(), "{what}"),
            other => panic!("{what}: expected Invalid, got {other:?}"),
        }
    }

    let non_ascii = wat(r#"(module (import "env" "caf\c3\a9" (func)))"#);
    assert!(matches!(meter(&non_ascii, MeterType::I32), Err(MeterError::NonAsciiName { what: "import field", .. })));
    let non_ascii_custom = wat(r#"(module (@custom "\c3\a9" "x"))"#);
    assert!(matches!(meter(&non_ascii_custom, MeterType::I32), Err(MeterError::NonAsciiName { what: "custom section", .. })));

    let reserved = wat(r#"(module (global (mut i64) (i64.const 0)) (export "__ao_gas_used" (global 0)))"#);
    assert_eq!(meter_inline(&reserved, MeterType::I64), Err(MeterError::ReservedExport(GAS_USED_EXPORT.into())));
    assert!(meter(&reserved, MeterType::I64).is_ok(), "the faithful variant reserves no names");

    for garbage in [&b""[..], b"\0asm", b"\0asm\x01\0\0\0\x0a\xff", b"not wasm at all"] {
        assert!(matches!(meter(garbage, MeterType::I32), Err(MeterError::Invalid(_))), "{garbage:?}");
    }
}

#[test]
fn inline_adds_the_sections_it_needs_and_stays_valid() {
    for text in ["(module)", "(module (type (func)))", "(module (func))", "(module (memory 1) (func (param i64) (result i64) local.get 0))"]
    {
        let out = meter_inline(&wat(text), MeterType::I64).unwrap();
        Validator::new_with_features(features()).validate_all(&out).unwrap_or_else(|e| panic!("{text}: {e}"));
        let exports: Vec<String> = wasmparser::Parser::new(0)
            .parse_all(&out)
            .filter_map(|p| match p.unwrap() {
                wasmparser::Payload::ExportSection(s) => Some(s.into_iter().map(|e| e.unwrap().name.to_string()).collect::<Vec<_>>()),
                _ => None,
            })
            .flatten()
            .collect();
        assert!(exports.ends_with(&[GAS_USED_EXPORT.to_string(), GAS_LIMIT_EXPORT.to_string()]), "{text}: {exports:?}");
    }
}

#[test]
fn no_input_panics_the_pass() {
    // Every single-byte corruption and every truncation of a small module that uses most
    // sections: each must give Ok or a MeterError, never a panic.
    let base = [
        wat(WORKLOAD),
        wat(
            r#"(module (import "env" "g" (global i32)) (global (mut i64) (i64.const 7)) (export "x" (global 1)) (data (i32.const 0) "ab") (memory 1) (@custom "c" "zz"))"#,
        ),
    ];
    let mut metered = 0;
    for module in &base {
        for cut in 0..module.len() {
            let _ = meter(&module[..cut], MeterType::I32);
        }
        for at in 0..module.len() {
            for value in [0x00, 0x01, 0x0b, 0x41, 0x7f, 0x80, 0xff] {
                let mut m = module.clone();
                m[at] = value;
                metered += usize::from(meter(&m, MeterType::I32).is_ok());
                let _ = meter_inline(&m, MeterType::I64);
            }
        }
    }
    assert!(metered > 100, "the corruptions should also reach the rewrite ({metered} metered)");
}

#[test]
fn a_segment_too_costly_for_an_i32_charge_is_refused_for_i32_only() {
    // 60,000 × (1 + 1 + div_u 36000 + drop 120) = 2,167,320,000 > i32::MAX in one segment.
    let body = "i32.const 1 i32.const 1 i32.div_u drop\n".repeat(60_000);
    let m = wat(&format!("(module (func {body}))"));
    assert_eq!(meter(&m, MeterType::I32), Err(MeterError::SegmentCost { func: 0, cost: 2_167_320_000 + 91 }));
    assert!(meter(&m, MeterType::I64).is_ok());
    assert!(meter_inline(&m, MeterType::I64).is_ok());
}

// ---- wasmtime: both variants charge the same gas and trap at the same point ----

const OUT_OF_GAS: &str = "out of gas!";

struct Gas {
    used: u64,
    limit: u64,
}

/// The reference host: `used += amount` (i32 sign-extended), trap when `used > limit`.
fn charge(caller: &mut Caller<'_, Gas>, amount: i64) -> wasmtime::Result<()> {
    let g = caller.data_mut();
    g.used = g.used.wrapping_add(amount as u64);
    if g.used > g.limit {
        wasmtime::bail!(OUT_OF_GAS);
    }
    Ok(())
}

fn identity_import(linker: &mut Linker<Gas>) {
    linker.func_wrap("env", "id", |x: i32| x).unwrap();
}

/// Runs export `run(arg)` of the module metered by `meter`, with the usegas host; returns the
/// result (or the trap text) and the gas used.
fn run_faithful(engine: &Engine, wasm: &[u8], ty: MeterType, arg: i32, limit: u64) -> (Result<i32, String>, u64) {
    let module = Module::new(engine, meter(wasm, ty).unwrap()).unwrap();
    let mut linker = Linker::new(engine);
    identity_import(&mut linker);
    match ty {
        MeterType::I32 => linker.func_wrap("metering", "usegas", |mut c: Caller<'_, Gas>, n: i32| charge(&mut c, i64::from(n))).unwrap(),
        MeterType::I64 => linker.func_wrap("metering", "usegas", |mut c: Caller<'_, Gas>, n: i64| charge(&mut c, n)).unwrap(),
    };
    let mut store = Store::new(engine, Gas { used: 0, limit });
    let instance = linker.instantiate(&mut store, &module).unwrap();
    let run = instance.get_typed_func::<i32, i32>(&mut store, "run").unwrap();
    let result = run.call(&mut store, arg).map_err(|e| format!("{e:#}"));
    (result, store.data().used)
}

/// The same with `meter_inline`: the host only traps; the gas lives in the exported globals.
fn run_inline(engine: &Engine, wasm: &[u8], ty: MeterType, arg: i32, limit: u64) -> (Result<i32, String>, u64) {
    let module = Module::new(engine, meter_inline(wasm, ty).unwrap()).unwrap();
    let mut linker = Linker::new(engine);
    identity_import(&mut linker);
    linker.func_wrap("metering", OUT_OF_GAS_FIELD, || -> wasmtime::Result<()> { wasmtime::bail!(OUT_OF_GAS) }).unwrap();
    let mut store = Store::new(engine, Gas { used: 0, limit: 0 });
    let instance: Instance = linker.instantiate(&mut store, &module).unwrap();
    let used = instance.get_global(&mut store, GAS_USED_EXPORT).expect("used export");
    let lim = instance.get_global(&mut store, GAS_LIMIT_EXPORT).expect("limit export");
    assert_eq!(used.get(&mut store).i64(), Some(0));
    assert_eq!(lim.get(&mut store).i64(), Some(-1), "no limit until the host sets one");
    lim.set(&mut store, Val::I64(limit as i64)).unwrap();
    let run = instance.get_typed_func::<i32, i32>(&mut store, "run").unwrap();
    let result = run.call(&mut store, arg).map_err(|e| format!("{e:#}"));
    (result, used.get(&mut store).i64().unwrap() as u64)
}

/// Loops, recursion, an import (so indices shift), call_indirect, memory.grow, if/else, br_table.
const WORKLOAD: &str = r#"(module
  (type (func (param i32) (result i32)))
  (import "env" "id" (func (type 0)))
  (table 1 funcref)
  (memory 1)
  (elem (i32.const 0) func 2)
  (func (export "run") (type 0) (local i32 i32)
    block
      loop
        local.get 1 local.get 0 i32.ge_u br_if 1
        local.get 2 local.get 1 i32.const 0 call_indirect (type 0) i32.add local.set 2
        local.get 1 i32.const 1 i32.add call 0 local.set 1
        br 0
      end
    end
    block block block local.get 0 i32.const 3 i32.rem_u br_table 0 1 2 end
      i32.const 1 memory.grow drop end
      local.get 2 i32.const 7 i32.mul local.set 2 end
    local.get 2)
  (func (type 0)
    local.get 0 i32.const 2 i32.lt_u
    if (result i32) local.get 0
    else
      local.get 0 i32.const 1 i32.sub call 2
      local.get 0 i32.const 2 i32.sub call 2
      i32.add i32.const 3 i32.div_u
    end))"#;

#[test]
fn inline_and_faithful_charge_the_same_gas_and_run_out_at_the_same_point() {
    let engine = Engine::default();
    let wasm = wat(WORKLOAD);
    for ty in [MeterType::I32, MeterType::I64] {
        for arg in [0, 1, 2, 5, 9] {
            let (result, gas) = run_faithful(&engine, &wasm, ty, arg, u64::MAX);
            let result = result.unwrap();
            assert!(gas > 0);
            assert_eq!(run_inline(&engine, &wasm, ty, arg, u64::MAX), (Ok(result), gas), "{ty:?} run({arg})");
            // Every limit below the total traps, at the same charge in both variants.
            for limit in [0, 1, 211, gas / 3, gas / 2, gas - 1] {
                let (faithful, at) = run_faithful(&engine, &wasm, ty, arg, limit);
                let (inline, at_inline) = run_inline(&engine, &wasm, ty, arg, limit);
                let f = faithful.expect_err("over the limit");
                let i = inline.expect_err("over the limit");
                assert!(f.contains(OUT_OF_GAS) && i.contains(OUT_OF_GAS), "{f} / {i}");
                assert_eq!(at, at_inline, "{ty:?} run({arg}) limit {limit}");
                assert!(at > limit);
            }
            assert_eq!(run_faithful(&engine, &wasm, ty, arg, gas).0, Ok(result), "a limit equal to the total is enough");
            assert_eq!(run_inline(&engine, &wasm, ty, arg, gas).0, Ok(result));
        }
    }
}

#[test]
fn runtime_gas_matches_the_hand_computed_charges() {
    // The module of the first test: run(1) pays 212 + 36183 (the then-branch is charged up to
    // and including `else`), run(0) pays 212 + 139.
    let wasm = wat(r#"(module
      (type (func (param i32) (result i32)))
      (import "env" "id" (func (type 0)))
      (func (export "run") (type 0)
        local.get 0
        if (result i32) i32.const 1 i32.const 2 i32.div_s
        else f32.const 1 f32.const 2 f32.add f32.const 4 f32.lt
        end))"#);
    let engine = Engine::default();
    for ty in [MeterType::I32, MeterType::I64] {
        assert_eq!(run_faithful(&engine, &wasm, ty, 1, u64::MAX), (Ok(0), 212 + 36183));
        assert_eq!(run_faithful(&engine, &wasm, ty, 0, u64::MAX), (Ok(1), 212 + 139));
        assert_eq!(run_inline(&engine, &wasm, ty, 1, u64::MAX), (Ok(0), 212 + 36183));
        assert_eq!(run_inline(&engine, &wasm, ty, 0, u64::MAX), (Ok(1), 212 + 139));
        // Pre-charging: with 212 + 36182 the second charge already traps.
        let (r, used) = run_inline(&engine, &wasm, ty, 1, 212 + 36182);
        assert!(r.unwrap_err().contains(OUT_OF_GAS));
        assert_eq!(used, 212 + 36183);
    }
}

// ---- the aos fixtures (BSL-1.1 data, never committed) ----

/// The fixture folder (`AO_AOS_FIXTURES` or `../shared/reference/aos`), or `None` after a loud
/// skip line; panics when it is missing and `REQUIRE_AOS=1`.
fn aos_dir(test: &str) -> Option<PathBuf> {
    let dir = std::env::var_os("AO_AOS_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/reference/aos"));
    if dir.join("emscripten4.wasm").is_file() {
        return Some(dir);
    }
    if std::env::var("REQUIRE_AOS").is_ok_and(|v| v == "1") {
        panic!("{test}: the aos fixtures are missing from {} (REQUIRE_AOS=1); see docs/aos.md §10.1", dir.display());
    }
    eprintln!("\n*** {test} skipped: the aos fixtures are missing from {} (set REQUIRE_AOS=1 to make this fail) ***\n", dir.display());
    None
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// (input, its sha256, meter type, the reference's output file, its sha256)
const FIXTURES: [(&str, &str, MeterType, &str, &str); 2] = [
    (
        "emscripten4.wasm",
        "a745c4bfd3d175081c5b2bae7bea0445ae120bde5338b461d83ebef94a9c3514",
        MeterType::I32,
        "emscripten4.metered-i32.wasm",
        "bdd47ee053e18bb9949cdd42be470009fe100e799d7c0d90561784d8a323c855",
    ),
    (
        "wasm64-emscripten.wasm",
        "e384efd41bdcc4e58eafc31c334c71470a6a40b363a972c90fe72600c0af8682",
        MeterType::I64,
        "wasm64-emscripten.metered-i64.wasm",
        "884a7e0eb25cbc8beb28452aa8039856208edb1ef7da748eeb34a1a9c13eab19",
    ),
];

fn read_fixture(dir: &std::path::Path, name: &str, sha: &str) -> Vec<u8> {
    let bytes = std::fs::read(dir.join(name)).unwrap_or_else(|e| panic!("{}: {e}", dir.join(name).display()));
    assert_eq!(sha256_hex(&bytes), sha, "{name} is not the fixture these facts were taken from");
    bytes
}

#[test]
fn the_aos_fixtures_meter_byte_identically_to_the_reference() {
    let Some(dir) = aos_dir("metering::the_aos_fixtures_meter_byte_identically_to_the_reference") else { return };
    for (input, input_sha, ty, output, output_sha) in FIXTURES {
        let wasm = read_fixture(&dir, input, input_sha);
        let reference = read_fixture(&dir, output, output_sha);
        let ours = meter(&wasm, ty).unwrap();
        if ours != reference {
            let first = ours.iter().zip(&reference).position(|(a, b)| a != b).unwrap_or(ours.len().min(reference.len()));
            panic!(
                "{input}: metered output differs from {output} at byte {first} (ours {} bytes, reference {})",
                ours.len(),
                reference.len()
            );
        }
        // Already metered: refused like the reference refuses it.
        assert_eq!(meter(&reference, ty), Err(MeterError::AlreadyMetered));
    }
}

/// The charges of every function body, in order: the `const` before each call of the metering
/// import (faithful), or after each `global.get used` that starts an inline charge.
fn charges(wasm: &[u8], inline: bool) -> Vec<Vec<i64>> {
    use wasmparser::{Operator, Parser, Payload};
    let mut imported = 0;
    let mut used_global = None;
    let mut out = Vec::new();
    for payload in Parser::new(0).parse_all(wasm) {
        match payload.unwrap() {
            Payload::ImportSection(s) => {
                for imp in s.into_imports() {
                    let imp = imp.unwrap();
                    if matches!(imp.ty, wasmparser::TypeRef::Func(_)) {
                        imported += 1;
                    }
                }
            }
            Payload::ExportSection(s) => {
                for e in s {
                    let e = e.unwrap();
                    if e.name == GAS_USED_EXPORT {
                        used_global = Some(e.index);
                    }
                }
            }
            Payload::CodeSectionEntry(body) => {
                let meter_func = imported - 1;
                let ops: Vec<Operator> = body.get_operators_reader().unwrap().into_iter().map(|o| o.unwrap()).collect();
                let mut list = Vec::new();
                for w in ops.windows(3) {
                    match (inline, &w[0], &w[1], &w[2]) {
                        (false, Operator::I32Const { value }, Operator::Call { function_index }, _) if *function_index == meter_func => {
                            list.push(i64::from(*value))
                        }
                        (false, Operator::I64Const { value }, Operator::Call { function_index }, _) if *function_index == meter_func => {
                            list.push(*value)
                        }
                        (true, Operator::GlobalGet { global_index }, Operator::I64Const { value }, Operator::I64Add)
                            if Some(*global_index) == used_global =>
                        {
                            list.push(*value)
                        }
                        _ => {}
                    }
                }
                out.push(list);
            }
            _ => {}
        }
    }
    out
}

#[test]
fn the_inline_variant_of_the_aos_fixtures_is_valid_and_charges_what_the_reference_charges() {
    let Some(dir) = aos_dir("metering::the_inline_variant_of_the_aos_fixtures_is_valid_and_charges_what_the_reference_charges") else {
        return;
    };
    for (input, input_sha, ty, output, output_sha) in FIXTURES {
        let wasm = read_fixture(&dir, input, input_sha);
        let reference = read_fixture(&dir, output, output_sha);
        let inline = meter_inline(&wasm, ty).unwrap();
        Validator::new_with_features(features()).validate_all(&inline).unwrap_or_else(|e| panic!("{input}: inline output invalid: {e}"));
        let want = charges(&reference, false);
        let got = charges(&inline, true);
        assert_eq!(want.len(), got.len());
        let total: usize = want.iter().map(Vec::len).sum();
        assert!(total > 10_000, "{input}: only {total} charges found");
        assert!(want == got, "{input}: the inline charges differ from the reference's");
    }
}

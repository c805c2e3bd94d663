//! What a process must not be able to do, and failures that must become `Error` results (never a
//! crash, never a host side effect): `os.execute`, `os.exit`, unknown imports, out of gas, the
//! wall-clock deadline; and the NaN sign that needs canonicalisation off.

use std::time::Duration;

use ao_gpu_worker::runtime::aos::json::{TestMessage, test_env_json};
use ao_gpu_worker::runtime::aos::{AosError, AosFormat, AosProcess, InstanceOptions};

use super::acceptance::output_text;
use crate::support::aos::{engine, module};

const E4: (&str, AosFormat) = ("emscripten4.wasm", AosFormat::Emscripten4);
const W64: (&str, AosFormat) = ("wasm64-emscripten.wasm", AosFormat::Wasm64);
const E2: (&str, AosFormat) = ("aos.wasm", AosFormat::Emscripten2);

fn process(test: &str, (name, format): (&str, AosFormat), opts: InstanceOptions) -> Option<AosProcess> {
    Some(AosProcess::new(module(test, name, format)?, opts))
}

fn eval(p: &mut AosProcess, n: usize, code: &str) -> Result<ao_gpu_worker::runtime::aos::HandleOutcome, AosError> {
    p.handle(&TestMessage::eval(format!("MSG{n}"), code).to_json(), &test_env_json())
}

#[test]
fn os_execute_runs_nothing() {
    for fixture in [E4, W64, E2] {
        let Some(mut p) = process("aos::safety::os_execute_runs_nothing", fixture, InstanceOptions::default()) else { return };
        let marker = std::env::temp_dir().join(format!("aos_should_not_exist_{}_{}", std::process::id(), fixture.0));
        let _ = std::fs::remove_file(&marker);
        eval(&mut p, 1, "1+1").unwrap();
        let code = format!("return os.execute('touch {}')", marker.display());
        let out = eval(&mut p, 2, &code).unwrap();
        assert!(!marker.exists(), "{}: os.execute ran a shell command", fixture.0);
        let text = output_text(&out.output).unwrap_or_default();
        eprintln!("{}: os.execute -> Output {text:?} Error {:?}", fixture.0, out.error);
        assert!(out.error.is_some() || !text.contains("true"), "{}: os.execute reported success: {text:?}", fixture.0);
    }
}

#[test]
fn zero_over_zero_prints_negative_nan() {
    for fixture in [E4, W64] {
        let Some(mut p) = process("aos::safety::zero_over_zero_prints_negative_nan", fixture, InstanceOptions::default()) else { return };
        let out = eval(&mut p, 1, "return 0/0").unwrap();
        assert_eq!(output_text(&out.output).as_deref(), Some("-nan"), "{}: {}", fixture.0, out.output);
    }
}

#[test]
fn os_exit_is_an_error_and_rolls_back() {
    for fixture in [E4, E2] {
        let Some(mut p) = process("aos::safety::os_exit_is_an_error_and_rolls_back", fixture, InstanceOptions::default()) else { return };
        eval(&mut p, 1, "count = 41").unwrap();
        let before = p.memory_sha256();
        let out = eval(&mut p, 2, "count = 99\nos.exit(3)").unwrap();
        let error = out.error.unwrap_or_else(|| panic!("{}: os.exit gave no Error: {}", fixture.0, out.output));
        assert!(error.contains("exit"), "{}: {error}", fixture.0);
        assert_eq!(p.memory_sha256(), before, "{}: memory not rolled back", fixture.0);
        let out = eval(&mut p, 3, "return count + 1").unwrap();
        assert_eq!(output_text(&out.output).as_deref(), Some("42"), "{}: {}", fixture.0, out.output);
    }
}

#[test]
fn out_of_gas_is_an_error_and_rolls_back() {
    let opts = InstanceOptions { gas_limit: 20_000_000_000, ..InstanceOptions::default() };
    let Some(mut p) = process("aos::safety::out_of_gas_is_an_error_and_rolls_back", E2, opts) else { return };
    let first = eval(&mut p, 1, "count = 1").unwrap();
    assert_eq!(first.error, None, "gas {}", first.gas_used);
    let before = p.memory_sha256();
    let out = eval(&mut p, 2, "count = 5\nlocal t = {} for i=1,100000 do t[i]=tostring(i) end return #t").unwrap();
    assert_eq!(out.error.as_deref(), Some("out of gas! (the compute limit is 20000000000)"));
    assert!(out.gas_used > 20_000_000_000, "gas {}", out.gas_used);
    assert_eq!(p.memory_sha256(), before);
    let out = eval(&mut p, 3, "return count").unwrap();
    assert_eq!(output_text(&out.output).as_deref(), Some("1"));
}

#[test]
fn deadline_is_could_not_compute_and_keeps_state() {
    let opts = InstanceOptions { deadline: Some(Duration::from_millis(300)), ..InstanceOptions::default() };
    let Some(mut p) = process("aos::safety::deadline_is_could_not_compute_and_keeps_state", E4, opts) else { return };
    eval(&mut p, 1, "count = 7").unwrap();
    let before = p.memory_sha256();
    match eval(&mut p, 2, "count = 8\nwhile true do end") {
        Err(AosError::Deadline) => {}
        other => panic!("expected the deadline, got {other:?}"),
    }
    assert_eq!(p.memory_sha256(), before);
    let out = eval(&mut p, 3, "return count").unwrap();
    assert_eq!(output_text(&out.output).as_deref(), Some("7"));
}

/// A module importing a function no glue has: the load fails and names it.
#[test]
fn unknown_import_fails_the_load() {
    let mut wasm = b"\0asm\x01\0\0\0".to_vec();
    wasm.extend_from_slice(&[0x01, 0x04, 0x01, 0x60, 0x00, 0x00]); // type () -> ()
    wasm.extend_from_slice(&[0x02, 0x0d, 0x01, 0x03, b'e', b'n', b'v', 0x05, b'b', b'o', b'g', b'u', b's', 0x00, 0x00]);
    for format in
        [AosFormat::Emscripten4, AosFormat::Emscripten2, AosFormat::Wasm64, AosFormat::EmscriptenMetering, AosFormat::Wasm64Metering]
    {
        match engine().load(&wasm, format) {
            Err(e @ AosError::UnknownImport { .. }) => assert!(e.to_string().contains("env.bogus"), "{e}"),
            other => panic!("{format}: expected UnknownImport, got {other:?}"),
        }
    }
    assert!(matches!(engine().load(b"not wasm", AosFormat::Emscripten4), Err(AosError::Invalid(_))));
    assert!(matches!(engine().load(b"not wasm", AosFormat::Wasm64Metering), Err(AosError::Metering { .. })));
    assert!(matches!(engine().load(&wasm, AosFormat::Emscripten3), Err(AosError::Unsupported(_))));
}

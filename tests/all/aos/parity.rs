//! Loader-test parity (AO's `loader/test` cases, spec §10.3): memory growth across a restore on E2,
//! and the lsqlite3 build of aos running SQL.

use ao_gpu_worker::runtime::aos::json::{TestMessage, test_env_json};
use ao_gpu_worker::runtime::aos::{AosFormat, AosProcess, InstanceOptions};

use super::acceptance::output_text;
use crate::support::aos::module;

/// E2 "resize heap": a 100000-element table grows memory; a new instance with that memory sees it.
#[test]
fn e2_memory_growth_survives_a_restore() {
    let Some(m) = module("aos::parity::e2_memory_growth_survives_a_restore", "aos.wasm", AosFormat::Emscripten2) else { return };
    let env = test_env_json();
    let mut p = AosProcess::new(m.clone(), InstanceOptions::default());
    let out =
        p.handle(&TestMessage::eval("MSG1", "Data = {} for i=1,100000 do table.insert(Data, \"Hello\") end").to_json(), &env).unwrap();
    assert_eq!(out.error, None, "{}", out.output);
    assert!(p.memory().len() > 7_602_176, "memory did not grow: {}", p.memory().len());
    let mut restored = AosProcess::with_memory(m, p.memory().to_vec(), InstanceOptions::default());
    let out = restored.handle(&TestMessage::eval("MSG2", "return #Data").to_json(), &env).unwrap();
    assert_eq!(output_text(&out.output).as_deref(), Some("100000"), "{}", out.output);
}

/// The sqlite build (52 imports: dlopen, mmap, stat, getcwd, fdstat…) opens an in-memory database
/// and answers a query.
#[test]
fn e2_sqlite_runs_sql() {
    let Some(m) = module("aos::parity::e2_sqlite_runs_sql", "emscripten2_sqlite.wasm", AosFormat::Emscripten2) else { return };
    let env = test_env_json();
    let mut p = AosProcess::new(m, InstanceOptions::default());
    let setup = r#"local sqlite3 = require('lsqlite3')
db = sqlite3.open_memory()
db:exec[[
  CREATE TABLE test (id INTEGER PRIMARY KEY, content);
  INSERT INTO test VALUES (NULL, 'Hello Lua');
  INSERT INTO test VALUES (NULL, 'Hello Sqlite3');
  INSERT INTO test VALUES (NULL, 'Hello ao!!!');
]]
return "ok""#;
    let out = p.handle(&TestMessage::eval("MSG1", setup).to_json(), &env).unwrap();
    assert_eq!(out.error, None, "{}", out.output);
    assert_eq!(output_text(&out.output).as_deref(), Some("ok"), "{}", out.output);
    let query = r#"local s = ""
for row in db:nrows("SELECT * FROM test") do s = s .. row.id .. ": " .. row.content .. "\n" end
return s"#;
    let out = p.handle(&TestMessage::eval("MSG2", query).to_json(), &env).unwrap();
    assert_eq!(out.error, None, "{}", out.output);
    assert_eq!(output_text(&out.output).as_deref(), Some("1: Hello Lua\n2: Hello Sqlite3\n3: Hello ao!!!\n"), "{}", out.output);
}

/// E1 (`wasm32-unknown-emscripten`, minified imports and exports): the loader's index tests —
/// echo, a counter carried across a restore, the disabled clock.
#[test]
fn e1_test_actor_echoes_counts_and_restores() {
    let Some(m) = module("aos::parity::e1_test_actor_echoes_counts_and_restores", "emscripten.wasm", AosFormat::Emscripten) else { return };
    let env = r#"{"Process":{"Id":"ctr-id-456","Tags":[]}}"#;
    let msg = |action: &str, data: &str| {
        format!(r#"{{"Owner":"tom","Target":"1","Tags":[{{"name":"Action","value":"{action}"}}],"Data":"{data}"}}"#)
    };
    let mut p = AosProcess::new(m.clone(), InstanceOptions::default());
    let out = p.handle(&msg("echo", "Hello World"), env).unwrap();
    assert_eq!((out.output.as_str(), out.error.as_deref()), (Some("Hello World"), None));
    assert!(out.gas_used > 0, "the E1 actor is pre-metered");
    assert_eq!(p.handle(&msg("inc", ""), env).unwrap().output, serde_json::json!(1));
    let mut restored = AosProcess::with_memory(m, p.memory().to_vec(), InstanceOptions::default());
    assert_eq!(restored.handle(&msg("inc", ""), env).unwrap().output, serde_json::json!(2));
    assert_eq!(restored.handle(&msg("Date", ""), env).unwrap().output, serde_json::json!("1970-01-01"));
}

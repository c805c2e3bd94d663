//! aos throughput (the aos spec's §10.4 sequence), for the `bench` subcommand and `benches/aos.rs`:
//! boot and `count = 0`, then messages alternating `count = count + 1; return count` and
//! `Send({Target='X', Data='hi <i>', Action='Ping'})`, through [`AosProcess`] (CU error semantics,
//! default rollback), every message required to succeed.
//!
//! The modules are AO's own test fixtures (BSL-1.1, never shipped): found in `AO_AOS_FIXTURES`, else
//! `../shared/reference/aos` (a development checkout). Without them nothing is measured and the
//! report says so.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::runtime::aos::json::{TestMessage, test_env_json};
use crate::runtime::aos::{AosEngine, AosFormat, AosModule, AosProcess, InstanceOptions, Rollback};

/// The fixtures measured: file name and format (aos 2.0 on wasm32 and memory64, aos 1.x).
pub const MODULES: [(&str, AosFormat); 3] =
    [("emscripten4.wasm", AosFormat::Emscripten4), ("wasm64-emscripten.wasm", AosFormat::Wasm64), ("aos.wasm", AosFormat::Emscripten2)];

/// One module's figure.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AosFigure {
    pub fixture: String,
    pub format: String,
    /// Messages per second over the sequence, after the boot.
    pub msgs_per_s: f64,
    /// Boot, `count = 0` and its result, in ms.
    pub first_message_ms: f64,
    /// The process memory at the end, in bytes.
    pub memory_bytes: u64,
}

/// Where the fixtures are, if anywhere.
pub fn fixtures_dir() -> Option<PathBuf> {
    let dir = match std::env::var_os("AO_AOS_FIXTURES") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from("..").join("shared").join("reference").join("aos"),
    };
    dir.is_dir().then_some(dir)
}

/// The first message of the sequence (`count = 0`).
pub fn first_message() -> String {
    TestMessage::eval("MSG0", "count = 0").to_json()
}

/// Message `i` (from 1) of the sequence.
pub fn message(i: usize) -> String {
    let code = if i % 2 == 1 {
        "count = count + 1\nreturn count".to_owned()
    } else {
        format!("Send({{Target='X', Data='hi {i}', Action='Ping'}})")
    };
    TestMessage::eval(format!("MSG{i}"), code).to_json()
}

/// A process of `module` that has run the first message, and how long that took from the boot.
pub fn started(module: &std::sync::Arc<AosModule>, rollback: Rollback) -> Result<(AosProcess, Duration), String> {
    let t = Instant::now();
    let mut process = AosProcess::new(module.clone(), InstanceOptions::default()).with_rollback(rollback);
    let out = process.handle(&first_message(), &test_env_json()).map_err(|e| e.to_string())?;
    match out.error {
        None => Ok((process, t.elapsed())),
        Some(e) => Err(format!("count = 0 failed: {e}")),
    }
}

/// Runs messages `from..from + n` of the sequence on `process`; each must succeed.
pub fn run_messages(process: &mut AosProcess, from: usize, n: usize) -> Result<(), String> {
    let env = test_env_json();
    for i in from..from + n {
        let out = process.handle(&message(i), &env).map_err(|e| format!("message {i}: {e}"))?;
        if let Some(e) = out.error {
            return Err(format!("message {i}: {e}"));
        }
    }
    Ok(())
}

/// Measures every fixture found in `dir` (`messages` per module); what fails is a note.
pub fn measure(dir: &Path, messages: usize, progress: &dyn Fn(&str)) -> (Vec<AosFigure>, Vec<String>) {
    let (mut figures, mut notes) = (Vec::new(), Vec::new());
    let engine = match AosEngine::new(None) {
        Ok(e) => e,
        Err(e) => return (figures, vec![format!("aos: {e}")]),
    };
    for (name, format) in MODULES {
        let wasm = match std::fs::read(dir.join(name)) {
            Ok(w) => w,
            Err(e) => {
                notes.push(format!("aos {name}: {e}"));
                continue;
            }
        };
        progress(&format!("aos {name} as {format}: compiling"));
        let figure = engine.load(&wasm, format).map_err(|e| e.to_string()).and_then(|module| {
            progress(&format!("aos {name} as {format}: {messages} messages"));
            let (mut process, first) = started(&module, Rollback::default())?;
            let t = Instant::now();
            run_messages(&mut process, 1, messages)?;
            let secs = t.elapsed().as_secs_f64().max(1e-9);
            Ok(AosFigure {
                fixture: name.to_owned(),
                format: format.name().to_owned(),
                msgs_per_s: round(messages as f64 / secs),
                first_message_ms: round(first.as_secs_f64() * 1e3),
                memory_bytes: process.memory().len() as u64,
            })
        });
        match figure {
            Ok(f) => figures.push(f),
            Err(e) => notes.push(format!("aos {name} as {format}: {e}")),
        }
    }
    (figures, notes)
}

fn round(v: f64) -> f64 {
    (v * 10.0).round() / 10.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sequence_alternates_a_counter_and_a_send() {
        assert!(first_message().contains(r#""Data":"count = 0""#), "{}", first_message());
        assert!(message(1).contains("count = count + 1\\nreturn count"), "{}", message(1));
        assert!(message(2).contains("Data='hi 2'") && message(2).contains(r#""Id":"MSG2""#), "{}", message(2));
    }

    #[test]
    fn a_folder_without_fixtures_gives_notes_not_figures() {
        let dir = tempfile::tempdir().unwrap();
        let (figures, notes) = measure(dir.path(), 2, &|_| {});
        assert!(figures.is_empty());
        assert_eq!(notes.len(), MODULES.len(), "{notes:?}");
    }
}

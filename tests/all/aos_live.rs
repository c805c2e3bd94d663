//! aos processes served through `Runtime::evaluate_process` as the job loop serves them: a live
//! instance between messages, a memory image only at checkpoints, and any other state rebuilt
//! from the last checkpoint by replaying the messages since — checked against the chained state
//! commitment, so a restart or an eviction cannot silently change a process's history.

use std::time::Duration;

use ao_gpu_worker::protocol::Tag;
use ao_gpu_worker::runtime::aos::json::{TestMessage, test_env_json};
use ao_gpu_worker::runtime::{AosSettings, EvalError, EvalInput, Evaluation, Limits, Restore, Runtime, RuntimeConfig, StateRef};

use crate::support::aos::fixture;

const LIMITS: Limits = Limits { memory_bytes: 1 << 30, compute: 9_000_000_000_000 };

fn runtime(dir: &std::path::Path) -> Runtime {
    let cfg = RuntimeConfig {
        cache_dir: dir.join("modules"),
        max_memory: 1 << 30,
        max_compute: LIMITS.compute,
        deadline: Duration::from_secs(60),
    };
    Runtime::new(cfg).unwrap()
}

/// What a journal keeps for a checkpointed process: the last image, its hash, the messages since.
#[derive(Clone, Default)]
struct Kept {
    image: Option<Vec<u8>>,
    image_hash: Option<String>,
    replay: Vec<String>,
    state: Option<String>,
}

struct Step {
    output: serde_json::Value,
    error: Option<String>,
    state: Option<String>,
}

/// Evaluates `msg` for process "P" on `rt` from `kept`, checkpointing when asked; updates `kept`
/// as the job loop updates the journal.
fn step(rt: &Runtime, module: &ao_gpu_worker::runtime::ActorModule, kept: &mut Kept, msg: &str, checkpoint: bool) -> Step {
    step_as("P", rt, module, kept, msg, checkpoint)
}

/// [`step`] for process `pid`.
fn step_as(pid: &str, rt: &Runtime, module: &ao_gpu_worker::runtime::ActorModule, kept: &mut Kept, msg: &str, checkpoint: bool) -> Step {
    let env = test_env_json();
    let snapshot = kept.clone();
    let load =
        move || Ok(Restore { image: snapshot.image.clone(), image_hash: snapshot.image_hash.clone(), replay: snapshot.replay.clone() });
    let state = StateRef { hash: kept.state.as_deref(), load: &load };
    let input = EvalInput { msg_json: msg, env_json: &env, timestamp_ms: 1_700_000_000_000, message_id: "m", limits: LIMITS };
    let e: Evaluation = rt.evaluate_process(pid, module, &state, &input, checkpoint);
    let (output, error) = match &e.outcome {
        Ok(r) => (r["Output"].clone(), None),
        Err(EvalError::Actor(why)) => (serde_json::Value::Null, Some(why.clone())),
        Err(other) => panic!("{msg}: could not compute: {other}"),
    };
    match (&e.memory, &e.state_hash) {
        (Some(memory), Some(h)) => {
            assert!(checkpoint);
            *kept = Kept { image: Some(memory.clone()), image_hash: Some(h.clone()), replay: Vec::new(), state: Some(h.clone()) };
        }
        (None, h) => {
            assert!(!checkpoint || error.is_some(), "a successful checkpoint returns the image");
            kept.replay.push(msg.to_owned());
            if let Some(h) = h {
                kept.state = Some(h.clone());
            }
        }
        (Some(_), None) => panic!("an image without its hash"),
    }
    Step { output, error, state: e.state_hash.or(kept.state.clone()) }
}

fn messages() -> Vec<String> {
    let codes = [
        "count = 1\nreturn count",
        "count = count + 1\nreturn count",
        "return os.time()",
        "error('boom')",
        "count = count + 10\nreturn count",
        "local t = {} for i=1,1000 do t[i]=tostring(i) end return #t",
        "Send({Target = 'X', Action = 'Ping', Data = 'hi'})\nreturn count",
        "return math.random(1,1000)",
        "count = count * 2\nreturn count",
    ];
    codes.iter().enumerate().map(|(i, c)| TestMessage::eval(format!("MSG{}", i + 1), *c).to_json()).collect()
}

#[test]
fn a_restart_between_checkpoints_rebuilds_the_same_state_by_replay() {
    let Some(wasm) = fixture("a_restart_between_checkpoints_rebuilds_the_same_state_by_replay", "emscripten4.wasm") else { return };
    let dir = tempfile::tempdir().unwrap();
    let tags = [Tag::new("Module-Format", "wasm32-unknown-emscripten4")];
    let msgs = messages();
    let checkpoint = |i: usize| i.is_multiple_of(3);

    // The reference: one runtime, live all along.
    let rt = runtime(dir.path());
    let module = rt.load(&wasm, &tags).unwrap();
    let mut kept = Kept::default();
    let reference: Vec<Step> = msgs.iter().enumerate().map(|(i, m)| step(&rt, &module, &mut kept, m, checkpoint(i))).collect();
    assert_eq!(reference[1].output["data"], "2");
    assert!(reference[3].error.as_deref().is_some_and(|e| e.contains("boom")), "{:?}", reference[3].error);
    assert_eq!(reference[3].state, reference[2].state, "the failed message keeps the state");
    assert_eq!(reference[8].output["data"], "24");

    // Restarts after every message: a fresh runtime each time, so each evaluation rebuilds the
    // state from the last checkpoint and the messages since (failed ones included).
    let mut kept = Kept::default();
    for (i, m) in msgs.iter().enumerate() {
        let fresh = runtime(dir.path());
        let module = fresh.load(&wasm, &tags).unwrap();
        let s = step(&fresh, &module, &mut kept, m, checkpoint(i));
        assert_eq!(s.output, reference[i].output, "message {}", i + 1);
        assert_eq!(s.error, reference[i].error, "message {}", i + 1);
        assert_eq!(s.state, reference[i].state, "message {}: the same state commitment after a restart", i + 1);
    }

    // A dry-run on the rebuilt state sees the latest count and changes nothing.
    let dry = TestMessage::eval("DRY", "return count").to_json();
    let env = test_env_json();
    let input = EvalInput { msg_json: &dry, env_json: &env, timestamp_ms: 1_700_000_000_000, message_id: "d", limits: LIMITS };
    let restore = Restore { image: kept.image.clone(), image_hash: kept.image_hash.clone(), replay: kept.replay.clone() };
    let e = rt.evaluate_restored(&module, restore, &input);
    assert_eq!(e.outcome.unwrap()["Output"]["data"], "24");
}

/// `[aos] live_processes` and `rebase_every` (`AosSettings`): with one live instance for two
/// processes, every message of one evicts the other, which is rebuilt from its checkpoint and
/// replay; with the rollback base moved every 2 messages the failed message still returns to the
/// state before it. Either way each process's outputs and state commitments are those of a
/// runtime with the defaults.
#[test]
fn the_aos_settings_bound_live_instances_and_move_the_rollback_base() {
    let Some(wasm) = fixture("the_aos_settings_bound_live_instances_and_move_the_rollback_base", "emscripten4.wasm") else { return };
    let dir = tempfile::tempdir().unwrap();
    let tags = [Tag::new("Module-Format", "wasm32-unknown-emscripten4")];
    let msgs = messages();
    let checkpoint = |i: usize| i % 4 == 3;

    let rt = runtime(dir.path());
    let module = rt.load(&wasm, &tags).unwrap();
    let mut kept = Kept::default();
    let reference: Vec<Step> = msgs.iter().enumerate().map(|(i, m)| step(&rt, &module, &mut kept, m, checkpoint(i))).collect();

    let small = runtime(dir.path()).with_aos_settings(AosSettings { live_processes: 1, rebase_every: 2, ..AosSettings::default() });
    let module = small.load(&wasm, &tags).unwrap();
    let (mut p, mut q) = (Kept::default(), Kept::default());
    for (i, m) in msgs.iter().enumerate() {
        for (pid, kept) in [("P", &mut p), ("Q", &mut q)] {
            let s = step_as(pid, &small, &module, kept, m, checkpoint(i));
            assert_eq!(s.output, reference[i].output, "{pid}, message {}", i + 1);
            assert_eq!(s.error, reference[i].error, "{pid}, message {}", i + 1);
            assert_eq!(s.state, reference[i].state, "{pid}, message {}", i + 1);
            assert_eq!(small.live_processes(), 1, "one live instance at most");
        }
    }
}

#[test]
fn a_replay_that_does_not_arrive_at_the_journals_state_is_refused() {
    let Some(wasm) = fixture("a_replay_that_does_not_arrive_at_the_journals_state_is_refused", "emscripten4.wasm") else { return };
    let dir = tempfile::tempdir().unwrap();
    let tags = [Tag::new("Module-Format", "wasm32-unknown-emscripten4")];
    let msgs = messages();
    let rt = runtime(dir.path());
    let module = rt.load(&wasm, &tags).unwrap();
    let mut kept = Kept::default();
    for (i, m) in msgs.iter().take(3).enumerate() {
        step(&rt, &module, &mut kept, m, i == 0);
    }
    // A journal whose replayed message was altered: the chain does not arrive at the state.
    let mut forged = kept.clone();
    forged.replay[0] = TestMessage::eval("MSG2", "count = count + 100\nreturn count").to_json();
    let fresh = runtime(dir.path());
    let module = fresh.load(&wasm, &tags).unwrap();
    let env = test_env_json();
    let load = move || Ok(Restore { image: forged.image.clone(), image_hash: forged.image_hash.clone(), replay: forged.replay.clone() });
    let state = StateRef { hash: kept.state.as_deref(), load: &load };
    let next = &msgs[3];
    let input = EvalInput { msg_json: next, env_json: &env, timestamp_ms: 1_700_000_000_000, message_id: "m", limits: LIMITS };
    let e = fresh.evaluate_process("P", &module, &state, &input, false);
    match e.outcome {
        Err(EvalError::Unavailable(why)) => assert!(why.contains("not deterministic or the journal is damaged"), "{why}"),
        other => panic!("a forged replay was accepted: {other:?}"),
    }
    assert_eq!(fresh.live_processes(), 0, "nothing is kept from a refused rebuild");
}

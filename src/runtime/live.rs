//! Evaluating aos modules for the job loop: messages of one process run on a live instance kept
//! between messages, as AO's compute unit keeps its `wasmInstanceCache`, instead of booting and
//! restoring the whole memory (110 MB for aos 2.0) for every message.
//!
//! - A live process is keyed by the process id and remembers the module and the state hash its
//!   memory equals. An evaluation whose state hash and module match takes it; any other state
//!   (another worker's journal, a restart, a dry-run) builds a fresh instance restored from the
//!   state image, exactly as the CU does after a cold start.
//! - The process's error semantics are [`AosProcess`]'s: a failed message leaves the memory from
//!   before it and continues on a fresh instance; the state hash the live entry holds is then
//!   unchanged.
//! - At most [`AosSettings::live_processes`] live processes are kept (least recently used goes
//!   first); each holds its instance's memory and the rollback base, which moves up every
//!   [`AosSettings::rebase_every`] messages (config `[aos]`).
//! - A message that could not be computed (the wall-clock deadline, a restore or host failure) is
//!   [`EvalError::Unavailable`]: not a result, the job loop evaluates it again later.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::aos::{AosError, AosModule, AosProcess, HandleOutcome, InstanceOptions, Rollback};
use super::{EvalError, EvalInput, Evaluation, Limits};

/// How a runtime keeps the live instances of aos processes (config `[aos]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AosSettings {
    /// How many aos processes keep a live instance at once (each holds its memory, ~110 MB for
    /// aos 2.0, and its rollback base, as much again). At least 1.
    pub live_processes: usize,
    /// A live process's rollback base moves up every this many messages (one memory copy); a
    /// failed message replays at most this many messages on the base. At least 1.
    pub rebase_every: usize,
    /// Spectre hardening of memory64 modules' bounds checks ([`super::aos::AosEngineOptions`]).
    pub heap_spectre_mitigation: bool,
}

impl Default for AosSettings {
    fn default() -> Self {
        AosSettings { live_processes: 4, rebase_every: 256, heap_spectre_mitigation: true }
    }
}

struct Live {
    module: [u8; 32],
    /// The state (sha256 hex of the memory) the instance holds; `None`: before the first message.
    state_hash: Option<String>,
    process: AosProcess,
    last_used: u64,
}

/// The live aos processes of a runtime.
#[derive(Default)]
pub(super) struct LiveProcesses {
    map: Mutex<HashMap<String, Live>>,
    tick: std::sync::atomic::AtomicU64,
    settings: AosSettings,
}

impl std::fmt::Debug for LiveProcesses {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveProcesses").field("live", &crate::sync::lock(&self.map).len()).field("settings", &self.settings).finish()
    }
}

/// The state an evaluation of a served process starts from: its hash, and how to rebuild it when
/// no live instance holds it.
pub struct StateRef<'a> {
    pub hash: Option<&'a str>,
    pub load: &'a dyn Fn() -> Result<Restore, String>,
}

/// What rebuilds a state: a stored image (`None`: a fresh boot) with its hash, and the messages
/// evaluated since (aos processes are checkpointed; see the module doc).
#[derive(Debug, Clone, Default)]
pub struct Restore {
    pub image: Option<Vec<u8>>,
    pub image_hash: Option<String>,
    pub replay: Vec<String>,
}

/// The state commitment after a successful message that is not a checkpoint: a hash chained from
/// the previous one over the message JSON and the module's answer, so that replaying the messages
/// since a checkpoint proves (or refutes) that it rebuilt the same state.
pub fn chained_state(prev: Option<&str>, msg_json: &str, raw_result: &str) -> String {
    let mut h = Sha256::new();
    h.update(b"ao-gpu-worker aos state chain v1\n");
    h.update(prev.unwrap_or("").as_bytes());
    h.update(b"\n");
    h.update(Sha256::digest(msg_json.as_bytes()));
    h.update(Sha256::digest(raw_result.as_bytes()));
    hex::encode(h.finalize())
}

fn options(input: &EvalInput<'_>, deadline: Duration) -> InstanceOptions {
    limits_options(input.limits, deadline)
}

/// The instance options of a process with `limits` (gas: `Compute-Limit`).
fn limits_options(limits: Limits, deadline: Duration) -> InstanceOptions {
    InstanceOptions {
        gas_limit: limits.compute,
        memory_limit: Some(limits.memory_bytes),
        deadline: Some(deadline),
        ..InstanceOptions::default()
    }
}

fn evaluation(outcome: Result<Value, EvalError>, memory: Option<Vec<u8>>, state_hash: Option<String>, gas_used: u64) -> Evaluation {
    Evaluation { outcome, memory, state_hash, gas_used, log: String::new(), device: 0, trace: Default::default() }
}

fn failure(e: EvalError) -> Evaluation {
    evaluation(Err(e), None, None, 0)
}

/// The response object the job loop records, as the loader returns it to the CU.
fn response(outcome: &HandleOutcome) -> Value {
    json!({
        "Output": outcome.output,
        "Messages": outcome.messages,
        "Spawns": outcome.spawns,
        "Assignments": outcome.assignments,
        "Patches": outcome.patches,
    })
}

/// A process rebuilt from `restore`: the image restored on a fresh instance (as the CU after a
/// cold start), then every message since replayed with the same semantics. With `expected`, the
/// replayed chain must arrive at that state: anything else means evaluation was not
/// deterministic (or the journal is damaged), and nothing is evaluated on it.
fn rebuild(
    module: &Arc<AosModule>,
    restore: Restore,
    expected: Option<&str>,
    env_json: &str,
    opts: InstanceOptions,
    rollback: Rollback,
) -> Result<AosProcess, EvalError> {
    let process = match restore.image {
        Some(memory) => AosProcess::with_memory(module.clone(), memory, opts),
        None => AosProcess::new(module.clone(), opts),
    };
    let mut process = process.with_rollback(rollback);
    let mut state = restore.image_hash;
    let count = restore.replay.len();
    for (i, msg) in restore.replay.iter().enumerate() {
        match process.handle(msg, env_json) {
            Ok(outcome) if outcome.error.is_none() => state = Some(chained_state(state.as_deref(), msg, &outcome.raw_json)),
            Ok(_) => {}
            Err(e) => return Err(EvalError::Unavailable(format!("aos: replaying message {} of {count} since the checkpoint: {e}", i + 1))),
        }
    }
    if let Some(expected) = expected
        && state.as_deref() != Some(expected)
    {
        return Err(EvalError::Unavailable(format!(
            "aos: replaying the {count} messages since the checkpoint gave state {}, the journal says {expected}: evaluation was not deterministic or the journal is damaged",
            state.as_deref().unwrap_or("(fresh)")
        )));
    }
    if count > 0 {
        tracing::debug!(messages = count, "aos state rebuilt by replay");
    }
    Ok(process)
}

/// Evaluates one message on `process` whose state is `prev`. On success at a `checkpoint` the
/// memory comes back (and the process continues from it on a fresh instance, exactly as a
/// replay from that image will); otherwise the state is a chained commitment. The flag says
/// whether the process still holds a known state.
fn evaluate_on(process: &mut AosProcess, prev: Option<&str>, input: &EvalInput<'_>, checkpoint: bool) -> (Evaluation, bool) {
    match process.handle(input.msg_json, input.env_json) {
        Ok(outcome) => match &outcome.error {
            None if checkpoint => {
                let memory = process.memory().to_vec();
                let hash = hex::encode(Sha256::digest(&memory));
                process.evict();
                (evaluation(Ok(response(&outcome)), Some(memory), Some(hash), outcome.gas_used), true)
            }
            None => {
                let hash = chained_state(prev, input.msg_json, &outcome.raw_json);
                (evaluation(Ok(response(&outcome)), None, Some(hash), outcome.gas_used), true)
            }
            // CU semantics: the memory from before the message, on a fresh instance.
            Some(error) => (evaluation(Err(EvalError::Actor(error.clone())), None, None, outcome.gas_used), true),
        },
        // Could not compute: not a result. After a deadline the process rebuilt the state from
        // before the message; after host trouble it is not trusted.
        Err(e) => (failure(EvalError::Unavailable(format!("aos: {e}"))), matches!(e, AosError::Deadline)),
    }
}

/// One evaluation on a state rebuilt from `restore` (dry-runs and one-off callers): nothing is
/// kept.
pub(super) fn evaluate_once(module: &Arc<AosModule>, restore: Restore, input: &EvalInput<'_>, deadline: Duration) -> Evaluation {
    let prev = restore.image_hash.clone();
    match rebuild(module, restore, None, input.env_json, options(input, deadline), Rollback::default()) {
        Ok(mut process) => evaluate_on(&mut process, prev.as_deref(), input, false).0,
        Err(e) => failure(e),
    }
}

/// The memory of the state `restore` rebuilds (`GET /state`).
pub(super) fn state_image(
    module: &Arc<AosModule>,
    restore: Restore,
    expected: Option<&str>,
    env_json: &str,
    limits: Limits,
    deadline: Duration,
) -> Result<Vec<u8>, EvalError> {
    let process = rebuild(module, restore, expected, env_json, limits_options(limits, deadline), Rollback::default())?;
    Ok(process.memory().to_vec())
}

impl LiveProcesses {
    pub(super) fn new(settings: AosSettings) -> Self {
        LiveProcesses { settings, ..LiveProcesses::default() }
    }

    /// Evaluates a message of `process` against `state`, on the live instance when it holds that
    /// state, else on one rebuilt from the journal. `checkpoint`: return the memory image (and
    /// continue from it as a replay would).
    pub(super) fn evaluate(
        &self,
        process_id: &str,
        module: &Arc<AosModule>,
        state: &StateRef<'_>,
        input: &EvalInput<'_>,
        deadline: Duration,
        checkpoint: bool,
    ) -> Evaluation {
        let tick = self.tick.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let taken = crate::sync::lock(&self.map).remove(process_id);
        let mut live = match taken {
            Some(live) if live.module == module.sha256() && live.state_hash.as_deref() == state.hash => live,
            stale => {
                if stale.is_some() {
                    tracing::debug!(process = process_id, "live aos instance holds another state; rebuilding from the journal");
                }
                let restore = match (state.load)() {
                    Ok(restore) => restore,
                    Err(e) => return failure(EvalError::Unavailable(format!("cannot read the state to restore: {e}"))),
                };
                let rollback = Rollback::Replay { rebase_every: self.settings.rebase_every.max(1) };
                match rebuild(module, restore, state.hash, input.env_json, options(input, deadline), rollback) {
                    Ok(process) => Live { module: module.sha256(), state_hash: state.hash.map(str::to_owned), process, last_used: tick },
                    Err(e) => return failure(e),
                }
            }
        };
        let (evaluation, keep) = evaluate_on(&mut live.process, state.hash, input, checkpoint);
        if keep {
            if evaluation.state_hash.is_some() {
                live.state_hash = evaluation.state_hash.clone();
            }
            live.last_used = tick;
            let mut map = crate::sync::lock(&self.map);
            map.insert(process_id.to_owned(), live);
            while map.len() > self.settings.live_processes.max(1) {
                let Some(oldest) = map.iter().min_by_key(|(_, l)| l.last_used).map(|(k, _)| k.clone()) else { break };
                map.remove(&oldest);
            }
        }
        evaluation
    }

    /// How many processes hold a live instance.
    pub(super) fn len(&self) -> usize {
        crate::sync::lock(&self.map).len()
    }
}

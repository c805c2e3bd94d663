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
//! - At most [`LIVE_PROCESSES`] live processes are kept (least recently used goes first); each
//!   holds its instance's memory and the rollback base.
//! - A message that could not be computed (the wall-clock deadline, a restore or host failure) is
//!   [`EvalError::Unavailable`]: not a result, the job loop evaluates it again later.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::aos::{AosError, AosModule, AosProcess, HandleOutcome, InstanceOptions};
use super::{EvalError, EvalInput, Evaluation};

/// How many aos processes keep a live instance at once.
pub const LIVE_PROCESSES: usize = 4;

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
}

impl std::fmt::Debug for LiveProcesses {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveProcesses").field("live", &crate::sync::lock(&self.map).len()).finish()
    }
}

/// The state an evaluation of a served process starts from: its hash, and how to read its image
/// when no live instance holds it.
pub struct StateRef<'a> {
    pub hash: Option<&'a str>,
    pub load: &'a dyn Fn() -> Result<Option<Vec<u8>>, String>,
}

fn options(input: &EvalInput<'_>, deadline: Duration) -> InstanceOptions {
    InstanceOptions {
        gas_limit: input.limits.compute,
        memory_limit: Some(input.limits.memory_bytes),
        deadline: Some(deadline),
        ..InstanceOptions::default()
    }
}

fn new_process(module: &Arc<AosModule>, state: Option<Vec<u8>>, opts: InstanceOptions) -> AosProcess {
    match state {
        Some(memory) => AosProcess::with_memory(module.clone(), memory, opts),
        None => AosProcess::new(module.clone(), opts),
    }
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

fn unavailable(e: &AosError) -> EvalError {
    EvalError::Unavailable(format!("aos: {e}"))
}

/// The evaluation of one handled message; on success the memory and its hash.
fn evaluation(result: Result<HandleOutcome, AosError>, process: &AosProcess) -> (Evaluation, bool) {
    let base = Evaluation { outcome: Ok(Value::Null), memory: None, state_hash: None, gas_used: 0, log: String::new(), device: 0 };
    match result {
        Ok(outcome) => match &outcome.error {
            None => {
                let memory = process.memory().to_vec();
                let hash = hex::encode(Sha256::digest(&memory));
                let e = Evaluation {
                    outcome: Ok(response(&outcome)),
                    memory: Some(memory),
                    state_hash: Some(hash),
                    gas_used: outcome.gas_used,
                    ..base
                };
                (e, true)
            }
            Some(error) => (Evaluation { outcome: Err(EvalError::Actor(error.clone())), gas_used: outcome.gas_used, ..base }, true),
        },
        // Could not compute: not a result. The process still holds the state from before the
        // message unless the failure was in the host itself.
        Err(e) => {
            let keep = matches!(e, AosError::Deadline);
            (Evaluation { outcome: Err(unavailable(&e)), ..base }, keep)
        }
    }
}

/// One evaluation on a fresh instance restored from `state` (dry-runs and one-off callers).
pub(super) fn evaluate_once(module: &Arc<AosModule>, state: Option<&[u8]>, input: &EvalInput<'_>, deadline: Duration) -> Evaluation {
    let mut process = new_process(module, state.map(<[u8]>::to_vec), options(input, deadline));
    let result = process.handle(input.msg_json, input.env_json);
    evaluation(result, &process).0
}

impl LiveProcesses {
    /// Evaluates a message of `process` against `state`, on the live instance when it holds that
    /// state.
    pub(super) fn evaluate(
        &self,
        process_id: &str,
        module: &Arc<AosModule>,
        state: &StateRef<'_>,
        input: &EvalInput<'_>,
        deadline: Duration,
    ) -> Evaluation {
        let tick = self.tick.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let taken = crate::sync::lock(&self.map).remove(process_id);
        let mut live = match taken {
            Some(live) if live.module == module.sha256() && live.state_hash.as_deref() == state.hash => live,
            stale => {
                if stale.is_some() {
                    tracing::debug!(process = process_id, "live aos instance holds another state; restoring from the journal");
                }
                let image = match (state.load)() {
                    Ok(image) => image,
                    Err(e) => {
                        let e = EvalError::Unavailable(format!("cannot read the state to restore: {e}"));
                        return Evaluation { outcome: Err(e), memory: None, state_hash: None, gas_used: 0, log: String::new(), device: 0 };
                    }
                };
                let process = new_process(module, image, options(input, deadline));
                Live { module: module.sha256(), state_hash: state.hash.map(str::to_owned), process, last_used: tick }
            }
        };
        let result = live.process.handle(input.msg_json, input.env_json);
        let (evaluation, keep) = evaluation(result, &live.process);
        if keep {
            if evaluation.state_hash.is_some() {
                live.state_hash = evaluation.state_hash.clone();
            }
            live.last_used = tick;
            let mut map = crate::sync::lock(&self.map);
            map.insert(process_id.to_owned(), live);
            while map.len() > LIVE_PROCESSES {
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

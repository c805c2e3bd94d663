//! CU error semantics (spec §4.7) over an instance: on any `Error` (a Lua error, a trap, out of gas,
//! `exit`, an Output ending in [`NOT_ENOUGH_MEMORY`]) the process keeps the memory it had before
//! the message and drops the instance; the next message runs on a fresh instance restored from that
//! memory, with fresh host state (clock back at 10004). Rollback copies the memory before every
//! message (option (a) of the spec: about 16 ms per 110 MB).

use std::sync::Arc;

use sha2::{Digest, Sha256};

use super::AosError;
use super::instance::{AosInstance, AosModule, HandleOutcome, InstanceOptions};

/// The CU treats an Output ending in this as an error.
pub const NOT_ENOUGH_MEMORY: &str = "not enough memory for buffer allocation";

/// One process: its module, the live instance and the last good memory.
pub struct AosProcess {
    module: Arc<AosModule>,
    opts: InstanceOptions,
    instance: Option<AosInstance>,
    /// The memory before the message being evaluated (the rollback point); `None` before the
    /// first message of a process without a checkpoint.
    saved: Option<Vec<u8>>,
}

impl std::fmt::Debug for AosProcess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AosProcess").field("module", &self.module).field("live", &self.instance.is_some()).finish()
    }
}

fn output_text(output: &serde_json::Value) -> Option<&str> {
    match output {
        serde_json::Value::String(s) => Some(s),
        serde_json::Value::Object(o) => o.get("data").and_then(|d| d.as_str()),
        _ => None,
    }
}

/// Runs `f`, turning a panic (a host bug; module input never panics) into an error result.
fn guarded<T>(f: impl FnOnce() -> Result<T, AosError>) -> Result<T, AosError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|panic| {
        let text =
            panic.downcast_ref::<&str>().copied().or_else(|| panic.downcast_ref::<String>().map(String::as_str)).unwrap_or("(no message)");
        Err(AosError::HostBug(format!("the host panicked: {text}")))
    })
}

impl AosProcess {
    /// A new process with no memory yet (its first message boots it).
    pub fn new(module: Arc<AosModule>, opts: InstanceOptions) -> Self {
        Self { module, opts, instance: None, saved: None }
    }

    /// A process resumed from a checkpoint or previous `Memory`.
    pub fn with_memory(module: Arc<AosModule>, memory: Vec<u8>, opts: InstanceOptions) -> Self {
        Self { module, opts, instance: None, saved: Some(memory) }
    }

    /// Evaluates one message. Deterministic failures are `Ok` with `error` set (state rolled back);
    /// `Err` means the message could not be computed (deadline, restore or load trouble) and the
    /// state is unchanged.
    pub fn handle(&mut self, msg_json: &str, env_json: &str) -> Result<HandleOutcome, AosError> {
        let mut instance = match self.instance.take() {
            Some(i) => {
                // Keep the rollback point: the memory as it is before this message.
                let saved = self.saved.get_or_insert_with(Vec::new);
                saved.clear();
                saved.extend_from_slice(i.memory());
                i
            }
            None => match guarded(|| self.module.instantiate(self.saved.as_deref(), &self.opts)) {
                Ok(i) => i,
                Err(e) if e.is_evaluation_error() => return Ok(HandleOutcome::failed(e.to_string(), 0)),
                Err(e) => return Err(e),
            },
        };
        match guarded(|| instance.handle(msg_json, env_json)) {
            Ok(outcome) if outcome.error.is_none() && !output_text(&outcome.output).is_some_and(|t| t.ends_with(NOT_ENOUGH_MEMORY)) => {
                self.instance = Some(instance);
                Ok(outcome)
            }
            Ok(mut outcome) => {
                if outcome.error.is_none() {
                    outcome.error = output_text(&outcome.output).map(str::to_owned);
                }
                Ok(outcome)
            }
            Err(e) if e.is_evaluation_error() => Ok(HandleOutcome::failed(e.to_string(), instance.gas_used())),
            Err(e) => Err(e),
        }
    }

    /// The process memory after the last message (the rolled-back memory after an error).
    pub fn memory(&self) -> &[u8] {
        match (&self.instance, &self.saved) {
            (Some(i), _) => i.memory(),
            (None, Some(m)) => m,
            (None, None) => &[],
        }
    }

    pub fn memory_sha256(&self) -> [u8; 32] {
        Sha256::digest(self.memory()).into()
    }

    /// Drops the live instance (the next message restores from [`Self::memory`]), as a CU cold start.
    pub fn evict(&mut self) {
        if let Some(i) = self.instance.take() {
            self.saved = Some(i.memory().to_vec());
        }
    }
}

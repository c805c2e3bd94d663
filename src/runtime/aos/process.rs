//! CU error semantics (spec §4.7) over an instance: on any `Error` (a Lua error, a trap, out of gas,
//! `exit`, an Output ending in [`NOT_ENOUGH_MEMORY`]) the process keeps the memory it had before
//! the message and drops the instance; the next message runs on a fresh instance restored from that
//! memory, with fresh host state (clock back at 10004).
//!
//! The pre-message memory is needed only when a message fails, so by default it is not copied
//! before every message ([`Rollback::Replay`]): the process keeps a base (a memory plus the host
//! state of the instance it came from, or "fresh boot") and the messages evaluated since. On a
//! failure it boots a fresh instance, makes it equal to the base (exact memory size, host state)
//! and replays those messages — evaluation is deterministic, so this rebuilds the pre-message
//! memory bit for bit. Every `rebase_every` messages the base moves up: the base is updated page
//! by page, writing only the pages that changed ([`super::snapshot`]; ~4 ms for aos 2.0's 110 MB
//! memory, of which ~2 MB is not zero, instead of ~14 ms for a full copy). [`Rollback::Copy`]
//! does that before every message instead.

use std::sync::Arc;

use sha2::{Digest, Sha256};

use super::AosError;
use super::instance::{AosInstance, AosModule, HandleOutcome, HostSnapshot, InstanceOptions};
use super::snapshot;

/// The CU treats an Output ending in this as an error.
pub const NOT_ENOUGH_MEMORY: &str = "not enough memory for buffer allocation";

/// How a process gets back the memory from before a failed message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rollback {
    /// Copy the memory before every message.
    Copy,
    /// Replay the messages since the last base; move the base every `rebase_every` messages.
    Replay { rebase_every: usize },
}

impl Default for Rollback {
    fn default() -> Self {
        Rollback::Replay { rebase_every: 256 }
    }
}

/// Where a live instance can be rebuilt from.
#[derive(Debug, Default)]
struct Base {
    /// `None`: a fresh boot. Else the memory and, for a warm instance's snapshot, its host state
    /// (`None`: a fresh instance restored from the memory by the glue's rule, as the CU does).
    memory: Option<Vec<u8>>,
    host: Option<HostSnapshot>,
    /// The messages (msg, env) evaluated successfully on the live instance since the base.
    log: Vec<(String, String)>,
}

/// One process: its module, the live instance and what it can be rolled back to.
pub struct AosProcess {
    module: Arc<AosModule>,
    opts: InstanceOptions,
    rollback: Rollback,
    instance: Option<AosInstance>,
    base: Base,
}

impl std::fmt::Debug for AosProcess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AosProcess")
            .field("module", &self.module)
            .field("live", &self.instance.is_some())
            .field("rollback", &self.rollback)
            .finish()
    }
}

fn output_text(output: &serde_json::Value) -> Option<&str> {
    match output {
        serde_json::Value::String(s) => Some(s),
        serde_json::Value::Object(o) => o.get("data").and_then(|d| d.as_str()),
        _ => None,
    }
}

/// Runs `f`, turning a panic (a host bug; module input never panics) into an error.
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
        Self { module, opts, rollback: Rollback::default(), instance: None, base: Base::default() }
    }

    /// A process resumed from a checkpoint or previous `Memory`.
    pub fn with_memory(module: Arc<AosModule>, memory: Vec<u8>, opts: InstanceOptions) -> Self {
        Self {
            module,
            opts,
            rollback: Rollback::default(),
            instance: None,
            base: Base { memory: Some(memory), host: None, log: Vec::new() },
        }
    }

    /// Chooses the rollback strategy (the results are the same).
    pub fn with_rollback(mut self, rollback: Rollback) -> Self {
        self.rollback = rollback;
        self
    }

    /// A fresh instance equal to the base (before its logged messages).
    fn instantiate_base(&self) -> Result<AosInstance, AosError> {
        match (&self.base.memory, &self.base.host) {
            (Some(memory), Some(host)) => {
                let mut instance = self.module.instantiate(None, &self.opts)?;
                instance.become_snapshot(memory, host)?;
                Ok(instance)
            }
            (memory, _) => self.module.instantiate(memory.as_deref(), &self.opts),
        }
    }

    /// The live instance, rebuilt from the base and its log when there is none.
    fn live(&mut self) -> Result<AosInstance, AosError> {
        if let Some(instance) = self.instance.take() {
            return Ok(instance);
        }
        let mut instance = guarded(|| self.instantiate_base())?;
        for (n, (msg, env)) in self.base.log.iter().enumerate() {
            match guarded(|| instance.handle(msg, env)) {
                Ok(out) if out.error.is_none() => {}
                Ok(out) => return Err(AosError::HostBug(format!("replaying message {n} since the base diverged: {:?}", out.error))),
                Err(AosError::Deadline) => return Err(AosError::Deadline),
                Err(e) => return Err(AosError::HostBug(format!("replaying message {n} since the base diverged: {e}"))),
            }
        }
        Ok(instance)
    }

    /// Evaluates one message. Deterministic failures are `Ok` with `error` set (state rolled back);
    /// `Err` means the message could not be computed (deadline, restore or host trouble) and the
    /// state is unchanged.
    pub fn handle(&mut self, msg_json: &str, env_json: &str) -> Result<HandleOutcome, AosError> {
        let mut instance = match self.live() {
            Ok(i) => i,
            // Booting the base failed deterministically (e.g. out of gas in `main`): an Error result.
            Err(e) if e.is_evaluation_error() => return Ok(HandleOutcome::failed(e.to_string(), 0)),
            Err(e) => return Err(e),
        };
        match self.rollback {
            Rollback::Copy => self.rebase(&instance),
            Rollback::Replay { rebase_every } if self.base.log.len() >= rebase_every.max(1) => self.rebase(&instance),
            Rollback::Replay { .. } => {}
        }
        let result = guarded(|| instance.handle(msg_json, env_json));
        let failed = match result {
            Ok(outcome) if outcome.error.is_none() && !output_text(&outcome.output).is_some_and(|t| t.ends_with(NOT_ENOUGH_MEMORY)) => {
                self.base.log.push((msg_json.to_owned(), env_json.to_owned()));
                self.instance = Some(instance);
                return Ok(outcome);
            }
            Ok(mut outcome) => {
                if outcome.error.is_none() {
                    outcome.error = output_text(&outcome.output).map(str::to_owned);
                }
                outcome
            }
            Err(e) if e.is_evaluation_error() => HandleOutcome::failed(e.to_string(), instance.gas_used()),
            // Could not compute: the base and its log still describe the state before the message;
            // rebuild the live instance from them (best effort: a failure leaves it to the next call).
            Err(e) => {
                drop(instance);
                self.instance = self.live().ok();
                return Err(e);
            }
        };
        // CU semantics: keep the memory from before the message, continue on a fresh instance.
        drop(instance);
        let memory = snapshot::sparse_copy(self.live()?.memory());
        self.base = Base { memory: Some(memory), host: None, log: Vec::new() };
        Ok(failed)
    }

    /// Moves the base up to the live instance's current state.
    fn rebase(&mut self, instance: &AosInstance) {
        match &mut self.base.memory {
            Some(memory) => snapshot::rebase_into(memory, instance.memory()),
            None => self.base.memory = Some(snapshot::sparse_copy(instance.memory())),
        }
        self.base.host = Some(instance.host_snapshot());
        self.base.log.clear();
    }

    /// The process memory after the last message (the rolled-back memory after an error).
    pub fn memory(&self) -> &[u8] {
        match (&self.instance, &self.base.memory) {
            (Some(i), _) => i.memory(),
            (None, Some(m)) if self.base.log.is_empty() => m,
            _ => &[],
        }
    }

    pub fn memory_sha256(&self) -> [u8; 32] {
        Sha256::digest(self.memory()).into()
    }

    /// Drops the live instance (the next message restores from [`Self::memory`] with fresh host
    /// state), as a CU cold start.
    pub fn evict(&mut self) {
        if let Some(i) = self.instance.take() {
            self.base = Base { memory: Some(snapshot::sparse_copy(i.memory())), host: None, log: Vec::new() };
        }
    }
}

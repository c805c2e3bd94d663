//! The work loop: follow the registry for workloads assigned to this worker, pull each served
//! process's schedule in nonce order (hash chain verified), evaluate every message, commit
//! the result to the journal, and post what it produced through the messenger.
//!
//! Nothing unverified is evaluated (`verify`): the process item, its module, every assignment
//! and message are checked (signatures, ids, bindings) first. A check that fails, like any error
//! retrying cannot fix, halts that process alone, for good: the reason is journaled, served by
//! the API (`GET /result`, `GET /results`), counted (`processes_halted`, `refused_inputs`) and
//! logged naming the unit and the item. A transient fetch failure is retried at the next poll.
//!
//! Invariants: messages of one process are evaluated strictly in nonce order, each exactly
//! once (the journal's progress is the only cursor, advanced in the same transaction as the
//! result); processes run concurrently up to `jobs.max_concurrent`; nothing is posted that
//! is not first in the journal.

pub mod constants;
pub mod eval;
pub mod health;
pub mod output_limits;
mod poster;
mod registry;
pub mod verify;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};
use tokio::sync::{Notify, Semaphore, watch};
use tokio_util::sync::CancellationToken;

use crate::advertise::Advertisement;
use crate::attest::Keypair;
use crate::attest::attestation::{self, Attestation};
use crate::journal::{Checkpoint, Commit, Journal, OutKind, Outgoing, Progress, ResultRecord, StateSource, sha256_hex};
use crate::net::scheduler::Range;
use crate::net::{GatewayClient, MessengerClient, NetError, SchedulerClient};
use crate::protocol::su::{ItemJson, MessageNode, next_hash_chain};
use crate::protocol::{DataItem, b64};
use crate::runtime::{ActorModule, EvalError, EvalInput, Limits, Restore, Runtime, StateRef};

use eval::{DryRunBase, DryRunRequest, Slot};

/// The work loop's metrics, registered by the work loop itself. Labels are fixed strings.
pub struct JobMetrics {
    /// Evaluated messages by result (`ok`, `error`).
    pub evaluations: Family<[(&'static str, &'static str); 1], Counter>,
    /// Fuel consumed by evaluations (the sum of `GasUsed`).
    pub gas_used: Counter,
    /// Wall-clock time of each evaluation (the wasm run, state restore included), in seconds.
    pub evaluation_seconds: Histogram,
    /// Items the messenger accepted, by kind (`message`, `spawn`, `attestation`).
    pub posted: Family<[(&'static str, &'static str); 1], Counter>,
    /// Items the messenger refused for good (set aside with the reason).
    pub refused: Counter,
    /// Items committed but not yet accepted.
    pub pending: Gauge,
    /// Processes served, and those halted on an error retrying cannot fix.
    pub served: Gauge,
    pub halted: Gauge,
    /// Inputs refused because they do not verify (a forged or swapped item), by the unit that
    /// served them (`scheduler`, `gateway`).
    pub refused_inputs: Family<[(&'static str, &'static str); 1], Counter>,
    /// Outbox items refused for good and kept in the dead-letter table (not dropped).
    pub dead_letters: Gauge,
}

impl JobMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            evaluations: Family::default(),
            gas_used: Counter::default(),
            // 1 ms to ~4.4 min.
            evaluation_seconds: Histogram::new(exponential_buckets(0.001, 4.0, 10)),
            posted: Family::default(),
            refused: Counter::default(),
            pending: Gauge::default(),
            served: Gauge::default(),
            halted: Gauge::default(),
            refused_inputs: Family::default(),
            dead_letters: Gauge::default(),
        };
        registry.register("evaluations", "Messages evaluated, by result", m.evaluations.clone());
        registry.register("gas_used", "Fuel consumed by evaluations (sum of GasUsed)", m.gas_used.clone());
        registry.register_with_unit("evaluation", "Wall-clock time of one evaluation", Unit::Seconds, m.evaluation_seconds.clone());
        registry.register("posted", "Items the messenger accepted, by kind", m.posted.clone());
        registry.register("refused", "Items the messenger refused for good", m.refused.clone());
        registry.register("pending_items", "Items committed to the journal and not yet accepted", m.pending.clone());
        registry.register("processes_served", "Processes this worker serves", m.served.clone());
        registry.register("processes_halted", "Processes halted on an error retrying cannot fix", m.halted.clone());
        registry.register("refused_inputs", "Inputs refused because they do not verify, by unit", m.refused_inputs.clone());
        registry.register("outbox_dead_letters", "Outbox items refused for good, kept as dead letters", m.dead_letters.clone());
        m
    }
}

fn kind_label(kind: OutKind) -> &'static str {
    match kind {
        OutKind::Message => "message",
        OutKind::Spawn => "spawn",
        OutKind::Attestation => "attestation",
    }
}

/// Everything the work loop needs, shared by its tasks: what it was made of ([`JobsConfig`], its
/// fields reached through `Deref`) and what follows from it.
pub struct Context {
    config: JobsConfig,
    pub address: String,
    /// The `Backend` of an attestation: the serving backend kind and its determinism mode.
    pub backend: String,
    /// The `Determinism` of an attestation: `reproducible` or `fast`.
    pub determinism: String,
    /// The `Device` of an attestation, by the pool index of the device the evaluation ran on.
    pub devices: Vec<String>,
    processes: Mutex<HashMap<String, Arc<ProcessSetup>>>,
    scheduler_address: std::sync::OnceLock<String>,
    halted: Mutex<HashMap<String, String>>,
    /// The size of each process's last state seen (bytes of linear memory), for admission control.
    state_sizes: Mutex<HashMap<String, u64>>,
    /// Wakes the work loop before its next poll (someone waits on a result).
    wake: Notify,
    /// The work loop's and the poster's heartbeats, and the processes' and devices' progress.
    pub heartbeats: health::Heartbeats,
    tracked: health::Processes,
    device_watch: health::DeviceWatch,
    /// The registry authorities in force: `config.authorities` at start, replaced by
    /// [`Context::set_authorities`] (SIGHUP).
    authorities: Mutex<Vec<String>>,
}

impl ProcessSetup {
    /// The message JSON the module gets: the compute unit's for aos modules, docs/abi.md's for
    /// the worker's own format.
    pub fn message_json(&self, message: &ItemJson, slot: &Slot, read_only: bool) -> String {
        match self.module.aos_format() {
            Some(_) => eval::cu_message_json(message, slot, &self.process.id, read_only),
            None => eval::message_json(message, slot, &self.module_item.id(), read_only),
        }
    }
}

/// The runtime's view of what the journal holds for a state.
pub fn restore(source: StateSource) -> Restore {
    Restore { image: source.image, image_hash: source.image_hash, replay: source.replay }
}

/// A served process with its verified module, loaded once.
pub struct ProcessSetup {
    pub process: ItemJson,
    pub module_item: DataItem,
    pub module: Arc<ActorModule>,
    pub limits: Limits,
    pub env_json: String,
    /// The address that must have signed the process's assignments.
    pub scheduler: String,
}

/// Why a process stopped being evaluated. Transient failures are retried at the next poll.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error(transparent)]
    Net(#[from] NetError),
    #[error("process {process} halted: {reason}")]
    Halted { process: String, reason: String },
    #[error(transparent)]
    Journal(#[from] crate::journal::JournalError),
    #[error("process {0} is not served by this worker")]
    NotServed(String),
    #[error("the request was cancelled before it ran: its client went away")]
    Cancelled,
    #[error("the catch-up failed unexpectedly (a worker bug; it is retried with backoff): {0}")]
    Panicked(String),
}

/// What the work loop is made of (see [`Context::new`]).
pub struct JobsConfig {
    pub journal: Journal,
    pub runtime: Arc<Runtime>,
    pub key: Arc<Keypair>,
    pub scheduler: SchedulerClient,
    pub messenger: MessengerClient,
    pub gateway: GatewayClient,
    /// The registry process followed for workload assignments.
    pub registry: String,
    /// Signers whose registry messages assign and release workloads.
    pub authorities: Vec<String>,
    /// Where attestations are sent.
    pub attestation_target: String,
    pub poll: Duration,
    pub max_concurrent: usize,
    /// A memory image of an aos process is journaled every this many messages (`aos.checkpoint_every`).
    pub checkpoint_every: u64,
    /// The latest capacity advertisement, named in each attestation.
    pub advertised: watch::Receiver<Option<Advertisement>>,
    /// The host's CPU model: the `Device` of evaluations on the CPU backend.
    pub device: String,
    pub metrics: Arc<JobMetrics>,
    /// Backoff, halt budget and stall bound (`[overload]`).
    pub recovery: health::RecoveryConfig,
    /// Result, outbox, module and compilation limits (`[limits]`).
    pub actor_limits: crate::config::ActorLimits,
}

impl std::ops::Deref for Context {
    type Target = JobsConfig;

    fn deref(&self) -> &JobsConfig {
        &self.config
    }
}

impl Context {
    pub fn new(config: JobsConfig) -> Arc<Self> {
        let address = config.key.address();
        // The attestation names the backend that served the actor's tensor calls, its
        // determinism mode and the device the evaluation ran on.
        let info = config.runtime.tensor_backend();
        let backend = format!("{}/{}", info.kind.as_str(), info.determinism.as_str());
        let devices = attested_devices(&info.devices, &config.device);
        let determinism = info.determinism.as_str().to_owned();
        // Halts are journaled: a process refused before a restart stays refused after it.
        let halted = match config.journal.halts() {
            Ok(h) => h.into_iter().map(|(p, h)| (p, h.reason)).collect(),
            Err(e) => {
                tracing::error!(error = %e, "cannot read the journaled halts");
                HashMap::new()
            }
        };
        config.metrics.halted.set(halted.len() as i64);
        Arc::new(Self {
            address,
            backend,
            determinism,
            devices,
            processes: Mutex::new(HashMap::new()),
            scheduler_address: std::sync::OnceLock::new(),
            halted: Mutex::new(halted),
            state_sizes: Mutex::new(HashMap::new()),
            wake: Notify::new(),
            heartbeats: health::Heartbeats::default(),
            tracked: health::Processes::default(),
            device_watch: health::DeviceWatch::default(),
            authorities: Mutex::new(config.authorities.clone()),
            config,
        })
    }

    /// The `Device` of the attestation of an evaluation that ran on device `index` of the pool.
    pub fn attested_device(&self, index: usize) -> String {
        self.devices.get(index).cloned().unwrap_or_else(|| format!("device {index}"))
    }

    /// The addresses whose registry messages this worker obeys now.
    pub fn authorities(&self) -> Vec<String> {
        crate::sync::lock(&self.authorities).clone()
    }

    /// Replaces the authorities (SIGHUP): registry messages read from now on are judged by them,
    /// as after a restart (the registry log is never re-read).
    pub fn set_authorities(&self, authorities: Vec<String>) {
        *crate::sync::lock(&self.authorities) = authorities;
    }

    /// Asks the work loop to poll now instead of at its next interval.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Whether this worker serves `process` now.
    pub fn is_served(&self, process: &str) -> Result<bool, JobError> {
        Ok(self.journal.served()?.iter().any(|s| s.process == process))
    }

    /// The size of the last state of `process` this worker saw (its linear memory), if any.
    pub fn state_size_hint(&self, process: &str) -> Option<u64> {
        crate::sync::lock(&self.state_sizes).get(process).copied()
    }

    /// What a dry-run or a state read of `process` holds, for admission control: its state image
    /// and the linear memory it is copied into, plus the per-evaluation device quota
    /// (`gpu.max_device_memory`) when its module imports `ao_gpu`; `None` while its state size is
    /// unknown.
    pub fn api_memory_estimate(&self, process: &str) -> Option<u64> {
        let state = self.state_size_hint(process)?;
        let gpu = crate::sync::lock(&self.processes).get(process).is_some_and(|s| s.module.uses_gpu());
        Some(crate::admission::estimate(state).saturating_add(if gpu { self.runtime.max_device_memory() } else { 0 }))
    }

    fn note_state_size(&self, process: &str, bytes: usize) {
        crate::sync::lock(&self.state_sizes).insert(process.to_owned(), bytes as u64);
    }

    /// [`Context::is_served`] off the async threads.
    pub async fn is_served_blocking(self: &Arc<Self>, process: &str) -> Result<bool, JobError> {
        let (ctx, p) = (self.clone(), process.to_owned());
        tokio::task::spawn_blocking(move || ctx.is_served(&p)).await.map_err(|_| JobError::Cancelled)?
    }

    /// Evaluates `request` against the latest state of `process` with `Read-Only: true`, the
    /// way the compute unit's `POST /dry-run` does, and returns the result object. Nothing is
    /// kept: no journal write, no state change, nothing posted, no attestation. When `cancel`
    /// fires before the evaluation starts (the client went away), it does not run.
    pub async fn dry_run(
        self: &Arc<Self>,
        process: &str,
        request: &DryRunRequest,
        cancel: CancellationToken,
    ) -> Result<serde_json::Value, JobError> {
        if !self.is_served_blocking(process).await? {
            return Err(JobError::NotServed(process.to_owned()));
        }
        let setup = self.setup(process).await?;
        let (base, state) = match self.latest(process).await? {
            Some((p, source, block_height)) => {
                let base = DryRunBase {
                    process: process.to_owned(),
                    nonce: p.nonce,
                    hash_chain: p.hash_chain,
                    timestamp: p.timestamp,
                    block_height,
                };
                if let Some(image) = &source.image {
                    self.note_state_size(process, image.len());
                }
                (base, restore(source))
            }
            None => {
                (DryRunBase { process: process.to_owned(), timestamp: crate::clock::now_ms(), ..DryRunBase::default() }, Restore::default())
            }
        };
        let (message, slot) = eval::dry_run_message(request, &base);
        let msg_json = setup.message_json(&message, &slot, true);
        let (runtime, module, env_json, limits) = (self.runtime.clone(), setup.module.clone(), setup.env_json.clone(), setup.limits);
        let (message_id, timestamp) = (message.id.clone(), slot.timestamp);
        let evaluation = tokio::task::spawn_blocking(move || {
            if cancel.is_cancelled() {
                return None;
            }
            let input = EvalInput { msg_json: &msg_json, env_json: &env_json, timestamp_ms: timestamp, message_id: &message_id, limits };
            Some(runtime.evaluate_restored(&module, state, &input))
        })
        .await
        .map_err(|e| JobError::Halted { process: process.to_owned(), reason: format!("dry-run task failed: {e}") })?
        .ok_or(JobError::Cancelled)?;
        if let Err(EvalError::Unavailable(reason)) = &evaluation.outcome {
            return Err(self.unavailable(reason));
        }
        let outcome = evaluation.outcome.map_err(|e| e.to_string());
        Ok(eval::result_object(&outcome, evaluation.gas_used))
    }

    /// The process's progress, what rebuilds its state (an image of up to the whole memory) and
    /// the last message's block height, read off the async threads; `None` when nothing was
    /// evaluated here.
    async fn latest(&self, process: &str) -> Result<Option<(Progress, StateSource, u64)>, JobError> {
        let journal = self.journal.clone();
        let p = process.to_owned();
        tokio::task::spawn_blocking(move || -> Result<_, JobError> {
            let Some(crate::journal::LatestState { progress, source }) = journal.latest_state(&p)? else { return Ok(None) };
            let last = journal.results(&p, None, Some(progress.nonce), 1, true)?;
            Ok(Some((progress, source, last.first().map_or(0, |r| r.block_height))))
        })
        .await
        .map_err(|e| JobError::Halted { process: process.to_owned(), reason: format!("state read task failed: {e}") })?
    }

    /// The memory after the latest evaluation of `process` (`GET /state`), with that progress and
    /// the message's block height; `None` when nothing was evaluated here. The image is `None`
    /// before the first successful evaluation. A checkpointed (aos) process's memory is rebuilt
    /// from its last checkpoint by replaying the messages since, checked against the journal.
    pub async fn latest_image(&self, process: &str) -> Result<Option<(Progress, Option<Vec<u8>>, u64)>, JobError> {
        let Some((progress, source, block_height)) = self.latest(process).await? else { return Ok(None) };
        if let Some(image) = &source.image {
            self.note_state_size(process, image.len());
        }
        if progress.checkpoint.is_none() {
            return Ok(Some((progress, source.image, block_height)));
        }
        let setup = self.setup(process).await?;
        let (runtime, expected) = (self.runtime.clone(), progress.state_hash.clone());
        let image = tokio::task::spawn_blocking(move || {
            runtime.state_image(&setup.module, restore(source), expected.as_deref(), &setup.env_json, setup.limits)
        })
        .await
        .map_err(|e| JobError::Halted { process: process.to_owned(), reason: format!("state rebuild task failed: {e}") })?;
        match image {
            Ok(image) => Ok(Some((progress, image, block_height))),
            Err(EvalError::Unavailable(reason)) => Err(self.unavailable(&reason)),
            Err(e) => Err(self.unavailable(&e.to_string())),
        }
    }

    /// Processes that stopped on an error that retrying cannot fix, with the reason (the
    /// registry follower's halt under `registry:<id>`).
    pub fn halted(&self) -> HashMap<String, String> {
        crate::sync::lock(&self.halted).clone()
    }

    /// Halts `process` for good: journaled (kept across restarts), reported by the API and the
    /// `processes_halted` metric. A journal failure is logged; the halt holds in memory.
    fn record_halt(&self, process: &str, reason: &str) {
        if let Err(e) = self.journal.halt(process, reason) {
            tracing::error!(%process, error = %e, "cannot journal the halt; it holds until restart");
        }
        let mut halted = crate::sync::lock(&self.halted);
        halted.entry(process.to_owned()).or_insert_with(|| reason.to_owned());
        self.metrics.halted.set(halted.len() as i64);
    }

    /// The halt of a refused input: counted by unit, logged naming the unit and the item.
    fn refused(&self, process: &str, refusal: verify::Refusal) -> JobError {
        self.metrics.refused_inputs.get_or_create(&[("unit", refusal.unit)]).inc();
        tracing::error!(%process, unit = refusal.unit, item = %refusal.item, what = refusal.what, reason = %refusal.reason, "input refused");
        JobError::Halted { process: process.to_owned(), reason: refusal.to_string() }
    }

    /// The process's setup: its item from the scheduler, its module from the gateway
    /// (verified against its signed item), compiled, with limits resolved.
    pub async fn setup(&self, process: &str) -> Result<Arc<ProcessSetup>, JobError> {
        if let Some(s) = crate::sync::lock(&self.processes).get(process) {
            return Ok(s.clone());
        }
        // A halted process is not fetched (nor refused, nor counted) again.
        if let Some(reason) = crate::sync::lock(&self.halted).get(process) {
            return Err(JobError::Halted { process: process.to_owned(), reason: reason.clone() });
        }
        let halt = |reason: String| JobError::Halted { process: process.to_owned(), reason };
        let info = self.scheduler.process(process).await?;
        let process_item = match verify::process_item(&info, process) {
            Ok(p) => p,
            // The scheduler keeps no signature for it: the signed item from the gateway, by id.
            Err(r) if info.process_id == process && info.signature.as_deref().is_none_or(str::is_empty) => {
                match self.gateway.item(process).await {
                    Ok(item) => verify::process_from_gateway(&item, process).map_err(|r| self.refused(process, r))?,
                    Err(NetError::BadAnswer { reason, .. }) => {
                        return Err(
                            self.refused(process, verify::Refusal { unit: "gateway", what: "process", item: process.to_owned(), reason })
                        );
                    }
                    Err(NetError::NotFound { .. }) => return Err(self.refused(process, r)),
                    Err(e) => return Err(e.into()),
                }
            }
            Err(r) => return Err(self.refused(process, r)),
        };
        let scheduler = match verify::scheduler_of(&process_item, None) {
            Some(s) => s,
            None => self.scheduler_address().await?,
        };
        let module_id = process_item.tag("Module").ok_or_else(|| halt("process has no Module tag".into()))?.to_owned();
        // The gateway client checks the item it answers has the id asked for: the Module tag.
        let module_item = match self.gateway.item(&module_id).await {
            Ok(m) => m,
            Err(NetError::BadAnswer { reason, .. }) => {
                let refusal = verify::Refusal { unit: "gateway", what: "module", item: module_id.clone(), reason };
                return Err(self.refused(process, refusal));
            }
            Err(NetError::NotFound { .. }) => return Err(halt(format!("module {module_id} not found on the gateway"))),
            Err(e) => return Err(e.into()),
        };
        let max_module = self.actor_limits.max_module_bytes;
        if module_item.data.len() as u64 > max_module {
            let len = module_item.data.len();
            return Err(halt(format!("module {module_id} is {len} bytes, more than the {max_module} allowed (limits.max_module_bytes)")));
        }
        let runtime = self.runtime.clone();
        let (data, tags) = (module_item.data.clone(), module_item.tags.clone());
        // Compilation cannot be interrupted: past the timeout the process is halted and the
        // compiling thread's result, when it comes, is dropped.
        let timeout = self.actor_limits.compile_timeout;
        let module = tokio::time::timeout(timeout, tokio::task::spawn_blocking(move || runtime.load(&data, &tags)))
            .await
            .map_err(|_| halt(format!("module {module_id} did not compile within {timeout:?} (limits.compile_timeout)")))?
            .map_err(|e| halt(format!("module load task failed: {e}")))?
            .map_err(|e| halt(format!("module {module_id}: {e}")))?;
        let limits = self.runtime.limits(&module_item.tags, &process_item.tags).map_err(|e| halt(e.to_string()))?;
        let env_json = match module.aos_format() {
            Some(_) => eval::cu_env_json(&process_item, &module_item),
            None => eval::env_json(&process_item, &module_item),
        };
        let setup = Arc::new(ProcessSetup { process: process_item, module_item, module, limits, env_json, scheduler });
        crate::sync::lock(&self.processes).insert(process.to_owned(), setup.clone());
        Ok(setup)
    }

    /// Evaluates every message of `process` the scheduler has and the journal has not.
    pub async fn catch_up(&self, process: &str) -> Result<usize, JobError> {
        let setup = self.setup(process).await?;
        let process_raw = b64::decode_id(process).map_err(|e| JobError::Halted { process: process.into(), reason: e.to_string() })?;
        let mut evaluated = 0;
        // A long catch-up (more than one page behind) reports its progress: a bar on a terminal,
        // else info log lines.
        let mut report: Option<crate::progress::Progress> = None;
        let done = |report: Option<crate::progress::Progress>, evaluated: usize| {
            if let Some(r) = report {
                r.finish("caught up");
            }
            Ok(evaluated)
        };
        loop {
            let progress = self.journal.progress(process)?;
            let range = Range { from: progress.as_ref().map(|p| p.nonce), limit: Some(100), by_nonce: true, ..Range::default() };
            let page = self.scheduler.page(process, &range).await?;
            if page.edges.is_empty() {
                return done(report, evaluated);
            }
            if report.is_none() && page.page_info.has_next_page {
                let from = progress.as_ref().map_or(0, |p| p.nonce);
                let latest =
                    self.scheduler.latest(process).await.ok().and_then(|n| n.assignment.tag("Nonce").and_then(|t| t.parse::<u64>().ok()));
                let label = format!("catch-up of {process}");
                report = Some(crate::progress::Progress::new(
                    &label,
                    latest.map(|l| l.saturating_sub(from)),
                    crate::progress::Unit::Items,
                    crate::progress::Lines::Log,
                ));
            }
            let mut prev = progress;
            for edge in page.edges {
                verify::schedule_entry(&edge.node, process, &setup.scheduler).map_err(|r| self.refused(process, r))?;
                let slot =
                    Slot::from_assignment(&edge.node.assignment).map_err(|reason| JobError::Halted { process: process.into(), reason })?;
                check_chain(process, &process_raw, prev.as_ref(), &slot)?;
                let next = self.evaluate(&setup, prev.as_ref(), &edge.node, &slot).await?;
                prev = Some(next);
                evaluated += 1;
                if let Some(r) = &report {
                    r.inc(1, "");
                }
            }
            if !page.page_info.has_next_page {
                return done(report, evaluated);
            }
        }
    }

    /// Evaluates one scheduled message and commits everything it changes.
    async fn evaluate(&self, setup: &ProcessSetup, prev: Option<&Progress>, node: &MessageNode, slot: &Slot) -> Result<Progress, JobError> {
        let process = setup.process.id.clone();
        let message = match &node.message {
            Some(m) => m.clone(),
            None => {
                // An assignment of a transaction the scheduler does not hold: hydrate it.
                let id = node.assignment.tag("Message").ok_or_else(|| JobError::Halted {
                    process: process.clone(),
                    reason: format!("assignment {} names no message", node.assignment.id),
                })?;
                let item = match self.gateway.item(id).await {
                    Ok(item) => item,
                    Err(NetError::BadAnswer { reason, .. }) => {
                        return Err(
                            self.refused(&process, verify::Refusal { unit: "gateway", what: "message", item: id.to_owned(), reason })
                        );
                    }
                    Err(e) => return Err(e.into()),
                };
                verify::hydrated(&item, id).map_err(|r| self.refused(&process, r))?;
                ItemJson::from_item(&item)
            }
        };
        let module_id = setup.module_item.id();
        let msg_json = setup.message_json(&message, slot, false);
        let state_hash = prev.and_then(|p| p.state_hash.clone());
        let aos = setup.module.aos_format().is_some();
        // aos memories (~110 MB) are stored every `checkpoint_every` messages, not after each one.
        let last_checkpoint = prev.and_then(|p| p.checkpoint.as_ref()).and_then(|c| c.after);
        let checkpoint = aos && last_checkpoint.is_none_or(|n| slot.nonce >= n + self.checkpoint_every.max(1));
        let prev_progress = prev.cloned();
        let runtime = self.runtime.clone();
        let module = setup.module.clone();
        let (env_json, limits, message_id, msg) = (setup.env_json.clone(), setup.limits, message.id.clone(), msg_json.clone());
        let timestamp = slot.timestamp;
        let (journal, pid) = (self.journal.clone(), process.clone());
        let started = std::time::Instant::now();
        let evaluation = tokio::task::spawn_blocking(move || {
            // Read only when the runtime holds no live instance in that state (aos), off the
            // async threads: an aos state is ~110 MB.
            let load = || match &prev_progress {
                Some(p) => journal.state_source(&pid, p).map(restore).map_err(|e| e.to_string()),
                None => Ok(Restore::default()),
            };
            let state = StateRef { hash: state_hash.as_deref(), load: &load };
            let input = EvalInput { msg_json: &msg, env_json: &env_json, timestamp_ms: timestamp, message_id: &message_id, limits };
            runtime.evaluate_process(&pid, &module, &state, &input, checkpoint)
        })
        .await
        .map_err(|e| JobError::Halted { process: process.clone(), reason: format!("evaluation task failed: {e}") })?;
        if let Err(EvalError::Unavailable(reason)) = &evaluation.outcome {
            // Not the actor's doing (a constant's gateway is down): nothing is recorded, the
            // message is evaluated again at the next poll.
            tracing::warn!(%process, msg = %message.id, nonce = slot.nonce, %reason, "evaluation unavailable; will retry");
            return Err(self.unavailable(reason));
        }

        let mut evaluation = evaluation;
        if let Ok(v) = &evaluation.outcome
            && let Err(why) = output_limits::check(v, &self.actor_limits)
        {
            // Over a limit: rolled back like a trap (a live instance in the refused state no
            // longer matches the journal's state hash, so it is not reused).
            evaluation.outcome = Err(EvalError::Actor(why));
            evaluation.memory = None;
            evaluation.state_hash = None;
        }
        let (outcome, mut response, result_hash) = eval::hashed_result(&evaluation);
        let new_state_hash = eval::state_after(&evaluation, prev.and_then(|p| p.state_hash.as_deref()));
        let mut outgoing = Vec::new();
        if outcome.is_ok() {
            // Spawns name the scheduler; look its address up only when there are any.
            let has_spawns = response.get("Spawns").and_then(|v| v.as_array()).is_some_and(|a| !a.is_empty());
            let scheduler = if has_spawns { self.scheduler_address().await? } else { String::new() };
            let out = eval::outbox(&self.key, &process, &module_id, &message.id, slot.nonce, &response, &scheduler);
            for d in &out.dropped {
                tracing::warn!(%process, msg = %message.id, "{d}");
            }
            outgoing.extend(out.items.into_iter().map(|(kind, item)| to_outgoing(kind, &process, slot.nonce, &item)));
        }
        let m = &self.metrics;
        m.evaluations.get_or_create(&[("result", if outcome.is_ok() { "ok" } else { "error" })]).inc();
        m.gas_used.inc_by(evaluation.gas_used);
        m.evaluation_seconds.observe(started.elapsed().as_secs_f64());
        if let Err(e) = &outcome {
            tracing::info!(
                %process,
                msg = %message.id,
                nonce = slot.nonce,
                device = evaluation.device,
                error = %e,
                "evaluation failed; state rolled back"
            );
        }
        let trace = evaluation.trace;
        let attestation = Attestation {
            version: crate::attest::attestation::VERSION,
            process: process.clone(),
            message: message.id.clone(),
            nonce: slot.nonce,
            hash_chain: slot.hash_chain.clone(),
            module: module_id.clone(),
            message_sha256: sha256_hex(msg_json.as_bytes()),
            env_sha256: sha256_hex(setup.env_json.as_bytes()),
            result_sha256: result_hash.clone(),
            state_sha256: new_state_hash.clone(),
            gas_used: evaluation.gas_used,
            backend: self.backend.clone(),
            device: self.attested_device(evaluation.device),
            capacity_advertisement: self.advertised.borrow().as_ref().map(|a| a.id.clone()),
            v2: Some(attestation::V2 {
                determinism: self.determinism.clone(),
                trace_root: trace.root(),
                trace_length: trace.leaves.len() as u64,
                worker_version: attestation::WORKER_VERSION.to_owned(),
                previous_attestation: prev.and_then(|p| p.attestation.clone()),
            }),
        };
        let attestation_item = attestation
            .sign(&self.key, &self.attestation_target)
            .map_err(|e| JobError::Halted { process: process.clone(), reason: format!("cannot sign the attestation: {e}") })?;
        outgoing.push(to_outgoing(OutKind::Attestation, &process, slot.nonce, &attestation_item));
        if !evaluation.log.is_empty() {
            response.as_object_mut().expect("result is an object").insert("Log".into(), serde_json::json!(evaluation.log));
        }

        let checkpoint = match (aos, &evaluation.memory) {
            (false, _) => None,
            (true, Some(_)) => Some(Checkpoint { after: Some(slot.nonce), state_hash: new_state_hash.clone() }),
            (true, None) => Some(prev.and_then(|p| p.checkpoint.clone()).unwrap_or(Checkpoint { after: None, state_hash: None })),
        };
        let progress = Progress {
            nonce: slot.nonce,
            hash_chain: slot.hash_chain.clone(),
            assignment: slot.assignment.clone(),
            state_hash: new_state_hash.clone(),
            timestamp: slot.timestamp,
            checkpoint,
            attestation: Some(attestation_item.id()),
        };
        let record = ResultRecord {
            process: process.clone(),
            message: message.id.clone(),
            nonce: slot.nonce,
            timestamp: slot.timestamp,
            block_height: slot.block_height,
            response,
            message_hash: attestation.message_sha256.clone(),
            result_hash,
            state_hash: new_state_hash,
            gas_used: evaluation.gas_used,
            posted: outgoing.iter().map(|o| o.id.clone()).collect(),
            replay: aos.then(|| msg_json.clone()),
            trace: Some(trace),
        };
        let journal = self.journal.clone();
        let memory = evaluation.memory;
        if let Some(m) = &memory {
            self.note_state_size(&process, m.len());
        }
        tokio::task::spawn_blocking(move || {
            journal
                .commit(&Commit { progress: &progress, result: &record, state: memory.as_deref(), outgoing: &outgoing })
                .map(|()| progress)
        })
        .await
        .map_err(|e| JobError::Halted { process: process.clone(), reason: format!("commit task failed: {e}") })?
        .map_err(JobError::from)
        .inspect(|_| self.tracked.progressed(&process))
    }

    /// The transient error of an evaluation that could not complete for a reason outside the
    /// actor: the gateway serving its constants is unavailable.
    fn unavailable(&self, reason: &str) -> JobError {
        JobError::Net(NetError::Unavailable {
            unit: crate::net::Unit::Gateway,
            url: self.gateway.base().to_owned(),
            attempts: 1,
            reason: reason.to_owned(),
        })
    }

    /// The scheduler's address, asked once and then remembered. A failure is transient: the
    /// message is evaluated again at the next poll.
    async fn scheduler_address(&self) -> Result<String, JobError> {
        if let Some(a) = self.scheduler_address.get() {
            return Ok(a.clone());
        }
        let address = self.scheduler.info().await?.address;
        Ok(self.scheduler_address.get_or_init(|| address).clone())
    }
}

/// The `Device` of attestations, by pool index: the device's description (for the CPU backend,
/// `host_cpu`, the host's CPU model); with several devices, followed by ` [device <index>]` so
/// that identical devices are told apart.
pub fn attested_devices(devices: &[crate::gpu::pool::DeviceInfo], host_cpu: &str) -> Vec<String> {
    devices
        .iter()
        .map(|d| {
            let name = if d.kind == crate::gpu::BackendKind::Cpu { host_cpu.to_owned() } else { d.description.clone() };
            if devices.len() == 1 { name } else { format!("{name} [device {}]", d.index) }
        })
        .collect()
}

fn to_outgoing(kind: OutKind, process: &str, nonce: u64, item: &DataItem) -> Outgoing {
    Outgoing { id: item.id(), kind, process: process.to_owned(), nonce, bytes: item.to_bytes(), confirmed: false, refused: None }
}

/// Refuses a schedule entry that does not follow the last one: wrong nonce or broken chain.
pub fn check_chain(process: &str, process_raw: &[u8; 32], prev: Option<&Progress>, slot: &Slot) -> Result<(), JobError> {
    let halt = |reason: String| JobError::Halted { process: process.to_owned(), reason };
    let expected_nonce = prev.map_or(0, |p| p.nonce + 1);
    if slot.nonce != expected_nonce {
        return Err(halt(format!("scheduler sent nonce {} where {expected_nonce} was next", slot.nonce)));
    }
    let previous = match prev {
        None => None,
        Some(p) => Some((
            b64::decode_id(&p.assignment).map_err(|e| halt(e.to_string()))?,
            b64::decode_id(&p.hash_chain).map_err(|e| halt(e.to_string()))?,
        )),
    };
    let expected = b64::encode(&next_hash_chain(process_raw, previous.as_ref().map(|(a, h)| (a, h))));
    if slot.hash_chain != expected {
        return Err(halt(format!("hash chain broken at nonce {}: scheduler says {}, expected {expected}", slot.nonce, slot.hash_chain)));
    }
    Ok(())
}

/// Runs the work loop until `shutdown`: the registry follower, the poster, and one
/// catch-up task per served process per poll, at most `max_concurrent` at a time.
pub async fn run(ctx: Arc<Context>, configured: Vec<String>, shutdown: CancellationToken) -> anyhow::Result<()> {
    for p in configured {
        ctx.journal
            .serve(&crate::journal::Served { process: p, assigned_by: "config".into() })
            .context("cannot record configured processes")?;
    }
    let follower = tokio::spawn(registry::follow(ctx.clone(), shutdown.clone()));
    let poster = tokio::spawn(poster::run(ctx.clone(), shutdown.clone()));
    let permits = Arc::new(Semaphore::new(ctx.max_concurrent));
    let running: Arc<Mutex<HashSet<String>>> = Arc::default();
    loop {
        if let Ok(n) = ctx.journal.pending_count() {
            ctx.metrics.pending.set(n as i64);
        }
        match ctx.journal.served() {
            Ok(served) => {
                ctx.metrics.served.set(served.len() as i64);
                for s in served {
                    let p = s.process;
                    if crate::sync::lock(&ctx.halted).contains_key(&p) || !ctx.tracked.due(&p, std::time::Instant::now()) {
                        continue;
                    }
                    if !crate::sync::lock(&running).insert(p.clone()) {
                        continue;
                    }
                    let (ctx, permits, running) = (ctx.clone(), permits.clone(), running.clone());
                    tokio::spawn(async move {
                        if let Ok(_permit) = permits.acquire().await {
                            ctx.tracked.started(&p);
                            // In its own task: a panic is a failure of this process, not the end of
                            // its polling.
                            let task = tokio::spawn({
                                let (ctx, p) = (ctx.clone(), p.clone());
                                async move { ctx.catch_up(&p).await }
                            });
                            let outcome = task.await.unwrap_or_else(|e| Err(JobError::Panicked(e.to_string())));
                            ctx.after_catch_up(&p, outcome);
                        }
                        crate::sync::lock(&running).remove(&p);
                    });
                }
            }
            Err(e) => tracing::error!(error = %e, "cannot read served processes"),
        }
        ctx.heartbeats.beat(health::Loop::Work);
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(ctx.poll) => {}
            _ = ctx.wake.notified() => {}
        }
    }
    let _ = follower.await;
    let _ = poster.await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(nonce: u64, hash_chain: String, assignment: &str) -> Slot {
        Slot { nonce, epoch: 0, timestamp: 1, block_height: 1, hash_chain, assignment: assignment.into() }
    }

    #[test]
    fn the_hash_chain_and_nonces_are_checked() {
        let pid = [5u8; 32];
        let p = b64::encode(&pid);
        let hc0 = b64::encode(&next_hash_chain(&pid, None));
        let a0 = b64::encode(&[6; 32]);
        check_chain(&p, &pid, None, &slot(0, hc0.clone(), &a0)).unwrap();
        let prev = Progress {
            nonce: 0,
            hash_chain: hc0.clone(),
            assignment: a0.clone(),
            state_hash: None,
            timestamp: 1,
            checkpoint: None,
            attestation: None,
        };
        let hc1 = b64::encode(&next_hash_chain(&pid, Some((&[6; 32], &b64::decode_id(&hc0).unwrap()))));
        check_chain(&p, &pid, Some(&prev), &slot(1, hc1.clone(), "x")).unwrap();
        let wrong = check_chain(&p, &pid, Some(&prev), &slot(1, hc0.clone(), "x")).unwrap_err();
        assert!(wrong.to_string().contains("hash chain broken at nonce 1"), "{wrong}");
        let gap = check_chain(&p, &pid, Some(&prev), &slot(2, hc1.clone(), "x")).unwrap_err();
        assert!(gap.to_string().contains("nonce 2 where 1 was next"), "{gap}");
        let replay = check_chain(&p, &pid, Some(&prev), &slot(0, hc0, "x")).unwrap_err();
        assert!(matches!(replay, JobError::Halted { .. }));
    }
}

//! The inputs and the re-execution: the process and module fetched and verified as the worker
//! does (`jobs::verify`), a runtime of the verifier's own on the chosen backend, and every message
//! from the first re-executed in order, its schedule entry and hash chain checked, with the state
//! kept exactly as the worker keeps it (aos: checkpoints every `Request::checkpoint_every` messages
//! and chained commitments between), so that result, state and trace hashes are comparable.

use std::sync::Arc;
use std::time::Duration;

use super::claims::{Claim, Claims, Units, net_missing};
use super::{CallDiff, Divergence, FieldDiff, Missing, Report, Request, Verdict, compare};
use crate::attest::trace::Trace;
use crate::config::{Config, Overrides};
use crate::gpu::pool::DevicePool;
use crate::gpu::{Backend, Determinism};
use crate::jobs::eval::{self, Slot};
use crate::jobs::{ProcessSetup, check_chain, verify};
use crate::journal::{Progress, sha256_hex};
use crate::net::NetError;
use crate::net::scheduler::Range;
use crate::progress::{Lines, Progress as Bar, Unit};
use crate::protocol::su::ItemJson;
use crate::protocol::{DataItem, b64};
use crate::runtime::{EvalError, EvalInput, PoolConfig, Restore, Runtime, RuntimeConfig, StateRef};

/// The shortest deadline of one re-executed message: the verifier's backend may be far slower
/// than the worker's.
const MIN_DEADLINE: Duration = Duration::from_secs(600);

/// What the re-execution of one message gives, in the attestation's terms.
struct Recomputed {
    message_sha256: String,
    env_sha256: String,
    result_sha256: String,
    state_sha256: Option<String>,
    gas_used: u64,
    trace: Trace,
}

/// The state between messages, as the worker's journal keeps it.
#[derive(Default)]
struct State {
    prev: Option<Progress>,
    image: Option<Vec<u8>>,
    image_hash: Option<String>,
    replay: Vec<String>,
    last_checkpoint: Option<u64>,
}

pub(super) struct Replayer {
    runtime: Arc<Runtime>,
    setup: Arc<ProcessSetup>,
    process: String,
    fast: bool,
    checkpoint_every: u64,
}

fn refused(r: verify::Refusal) -> Missing {
    Missing::new(format!("an input does not verify: {r}"))
}

impl Replayer {
    /// The runtime (the worker's default limits, a long deadline) and the verified process setup.
    pub async fn start(units: &Units, req: &Request, process: &str, fast: bool) -> Result<Self, Missing> {
        let defaults = Config::parse("defaults", "", &Overrides::default()).map_err(|e| Missing::new(format!("worker defaults: {e}")))?;
        let determinism = if fast { Determinism::Fast } else { Determinism::Reproducible };
        let backend = Backend::new(req.backend, determinism)
            .map_err(|e| Missing::new(format!("the {} backend cannot start here: {e}", req.backend)))?;
        let pool = Arc::new(DevicePool::from_backends(vec![backend]).map_err(|e| Missing::new(format!("device pool: {e}")))?);
        let constants = crate::jobs::constants::GatewayConstants::new(units.gateway.clone(), tokio::runtime::Handle::current());
        let runtime = Runtime::with_pool(
            RuntimeConfig {
                cache_dir: std::env::temp_dir().join("ao-gpu-worker-verify"),
                max_memory: defaults.limits.max_memory,
                max_compute: defaults.limits.max_compute,
                deadline: defaults.limits.deadline.max(MIN_DEADLINE),
            },
            PoolConfig {
                pool,
                max_device_memory: defaults.gpu.max_device_memory,
                constant_source: Some(Arc::new(constants)),
                max_constant_memory: defaults.gpu.max_constant_memory,
            },
        )
        .map_err(|e| Missing::new(format!("cannot start the runtime: {e}")))?;
        let runtime = Arc::new(runtime);
        let setup = Arc::new(setup(units, &runtime, process).await?);
        Ok(Self { runtime, setup, process: process.to_owned(), fast, checkpoint_every: req.checkpoint_every.max(1) })
    }

    /// Re-executes messages 0..=`claims.to`, comparing each claimed one; stops at the first
    /// difference (the report's divergence) or when an input is missing.
    pub async fn run(&mut self, units: &Units, claims: &Claims, report: &mut Report) -> Result<(), Missing> {
        let process = self.process.clone();
        let raw = b64::decode_id(&process).map_err(|e| Missing::new(format!("process id {process}: {e}")))?;
        let range = Range { to: Some(claims.to), limit: Some(100), by_nonce: true, ..Range::default() };
        let nodes = units.scheduler.all(&process, range).await.map_err(|e| net_missing(&format!("the schedule of {process}"), &e))?;
        let mut state = State::default();
        // A bar on a terminal, else a plain line every few seconds; always on stderr (the report
        // may be JSON on stdout).
        let progress = Bar::new(&format!("verify {process}"), Some(nodes.len() as u64), Unit::Items, Lines::Stderr);
        for node in &nodes {
            progress.inc(1, &format!("nonce {}", report.executed));
            verify::schedule_entry(node, &process, &self.setup.scheduler).map_err(refused)?;
            let slot = Slot::from_assignment(&node.assignment).map_err(Missing::new)?;
            if slot.nonce > claims.to {
                break;
            }
            check_chain(&process, &raw, state.prev.as_ref(), &slot).map_err(|e| Missing::new(e.to_string()))?;
            let message = match &node.message {
                Some(m) => m.clone(),
                None => self.hydrate(units, &node.assignment).await?,
            };
            let got = self.step(&mut state, &message, &slot).await?;
            report.executed += 1;
            let Some(claim) = claims.by_nonce.get(&slot.nonce).filter(|_| slot.nonce >= claims.from) else { continue };
            report.compared += 1;
            if let Some(d) = self.compare(units, claim, &message, &got, report).await {
                report.divergence = Some(d);
                report.verdict = Verdict::Disagree;
                return Ok(());
            }
        }
        progress.finish(&format!("{} re-executed", report.executed));
        let reached = state.prev.as_ref().map(|p| p.nonce);
        if reached != Some(claims.to) {
            return Err(Missing::new(format!(
                "the scheduler lists messages of {process} up to nonce {reached:?}; the attestation is of nonce {}",
                claims.to
            )));
        }
        report.verdict = Verdict::Agree;
        Ok(())
    }

    async fn hydrate(&self, units: &Units, assignment: &ItemJson) -> Result<ItemJson, Missing> {
        let id = assignment.tag("Message").ok_or_else(|| Missing::new(format!("assignment {} names no message", assignment.id)))?;
        let item = units.gateway.item(id).await.map_err(|e| net_missing(&format!("message {id}"), &e))?;
        verify::hydrated(&item, id).map_err(refused)?;
        Ok(ItemJson::from_item(&item))
    }

    /// Re-executes one message from `state`, and moves `state` past it.
    async fn step(&self, state: &mut State, message: &ItemJson, slot: &Slot) -> Result<Recomputed, Missing> {
        let setup = self.setup.clone();
        let msg_json = setup.message_json(message, slot, false);
        let aos = setup.module.aos_format().is_some();
        let checkpoint = aos && state.last_checkpoint.is_none_or(|n| slot.nonce >= n + self.checkpoint_every);
        let restore = Restore { image: state.image.clone(), image_hash: state.image_hash.clone(), replay: state.replay.clone() };
        let prev_hash = state.prev.as_ref().and_then(|p| p.state_hash.clone());
        let (runtime, process, msg, message_id, timestamp) =
            (self.runtime.clone(), self.process.clone(), msg_json.clone(), message.id.clone(), slot.timestamp);
        let (setup2, prev_hash2) = (setup.clone(), prev_hash.clone());
        let evaluation = tokio::task::spawn_blocking(move || {
            let load = || Ok(restore.clone());
            let state = StateRef { hash: prev_hash2.as_deref(), load: &load };
            let input = EvalInput {
                msg_json: &msg,
                env_json: &setup2.env_json,
                timestamp_ms: timestamp,
                message_id: &message_id,
                limits: setup2.limits,
            };
            runtime.evaluate_process(&process, &setup2.module, &state, &input, checkpoint)
        })
        .await
        .map_err(|e| Missing::new(format!("the re-execution task failed: {e}")))?;
        if let Err(EvalError::Unavailable(reason)) = &evaluation.outcome {
            return Err(Missing::new(format!("message {}: {reason}", message.id)));
        }
        let (_, _, result_sha256) = eval::hashed_result(&evaluation);
        let state_sha256 = eval::state_after(&evaluation, prev_hash.as_deref());
        let gas_used = evaluation.gas_used;
        let trace = evaluation.trace;
        match evaluation.memory {
            Some(memory) => {
                state.image = Some(memory);
                state.image_hash = state_sha256.clone();
                state.replay.clear();
                if aos {
                    state.last_checkpoint = Some(slot.nonce);
                }
            }
            None if aos => state.replay.push(msg_json.clone()),
            None => {}
        }
        state.prev = Some(Progress {
            nonce: slot.nonce,
            hash_chain: slot.hash_chain.clone(),
            assignment: slot.assignment.clone(),
            state_hash: state_sha256.clone(),
            timestamp: slot.timestamp,
            checkpoint: None,
            attestation: None,
        });
        Ok(Recomputed {
            message_sha256: sha256_hex(msg_json.as_bytes()),
            env_sha256: sha256_hex(setup.env_json.as_bytes()),
            result_sha256,
            state_sha256,
            gas_used,
            trace,
        })
    }

    /// The claim against the re-execution: `None` when they agree.
    async fn compare(&self, units: &Units, claim: &Claim, message: &ItemJson, got: &Recomputed, report: &mut Report) -> Option<Divergence> {
        let a = &claim.attestation;
        let none = || "none".to_owned();
        let mut pairs = vec![
            ("message-sha256", a.message_sha256.clone(), got.message_sha256.clone()),
            ("env-sha256", a.env_sha256.clone(), got.env_sha256.clone()),
            ("gas-used", a.gas_used.to_string(), got.gas_used.to_string()),
        ];
        let got_root = got.trace.root();
        if let Some(v2) = &a.v2 {
            pairs.push(("trace-root", v2.trace_root.clone(), got_root.clone()));
        }
        pairs.push(("result-sha256", a.result_sha256.clone(), got.result_sha256.clone()));
        pairs.push(("state-sha256", a.state_sha256.clone().unwrap_or_else(none), got.state_sha256.clone().unwrap_or_else(none)));
        let fields: Vec<FieldDiff> = pairs
            .into_iter()
            .filter(|(_, c, r)| c != r)
            .map(|(field, claimed, recomputed)| FieldDiff { field, claimed, recomputed })
            .collect();
        if fields.is_empty() {
            return None;
        }
        let trace_differs = fields.iter().any(|f| f.field == "trace-root");
        let call = if trace_differs && let Some(v2) = &a.v2 {
            match self.claimed_trace(units, &message.id, &v2.trace_root).await {
                Ok(theirs) => {
                    let first = compare::first_difference(&got.trace, &theirs, self.fast);
                    let only_outputs = fields.iter().all(|f| matches!(f.field, "trace-root" | "result-sha256" | "state-sha256"));
                    if first.is_none() && self.fast && only_outputs {
                        report.notes.push(format!("message {} (nonce {}) agrees within the fast-mode tolerance", message.id, a.nonce));
                        return None;
                    }
                    first
                }
                Err(why) => Some(CallDiff {
                    index: 0,
                    call: String::new(),
                    recomputed_leaf: None,
                    claimed_leaf: None,
                    max_abs_diff: None,
                    max_ulp_diff: None,
                    note: Some(format!("the host call cannot be named: {why}")),
                }),
            }
        } else {
            None
        };
        Some(Divergence { nonce: a.nonce, message: message.id.clone(), attestation: claim.id.clone(), fields, call })
    }

    /// The worker's trace of `message`, which must hash to the attested root.
    async fn claimed_trace(&self, units: &Units, message: &str, root: &str) -> Result<Trace, String> {
        let worker = units.worker.as_deref().ok_or("no worker API was given (--worker URL), so its trace leaves are unavailable")?;
        let url = format!("{}/trace/{message}?process-id={}", worker.trim_end_matches('/'), self.process);
        let answer = units.http.get(&url).send().await.map_err(|e| format!("GET {url}: {e}"))?;
        if !answer.status().is_success() {
            return Err(format!("GET {url}: {}", answer.status()));
        }
        let body: serde_json::Value = answer.json().await.map_err(|e| format!("GET {url}: {e}"))?;
        let trace: Trace = serde_json::from_value(body.get("trace").cloned().unwrap_or_default()).map_err(|e| format!("GET {url}: {e}"))?;
        if !trace.proves(root) {
            return Err(format!("the worker's trace from {url} does not hash to the attested root {root}"));
        }
        Ok(trace)
    }
}

/// The process (from the scheduler, else its signed item from the gateway) and its module, both
/// verified as the worker verifies them, with the module loaded.
async fn setup(units: &Units, runtime: &Arc<Runtime>, process: &str) -> Result<ProcessSetup, Missing> {
    let info = units.scheduler.process(process).await.map_err(|e| net_missing(&format!("process {process}"), &e))?;
    let process_item = match verify::process_item(&info, process) {
        Ok(p) => p,
        Err(r) if info.process_id == process && info.signature.as_deref().is_none_or(str::is_empty) => {
            let item = units.gateway.item(process).await.map_err(|e| match e {
                NetError::NotFound { .. } => refused(r),
                other => net_missing(&format!("process {process}"), &other),
            })?;
            verify::process_from_gateway(&item, process).map_err(refused)?
        }
        Err(r) => return Err(refused(r)),
    };
    let scheduler = match verify::scheduler_of(&process_item, None) {
        Some(s) => s,
        None => units.scheduler.info().await.map_err(|e| net_missing("the scheduler's address", &e))?.address,
    };
    let module_id = process_item.tag("Module").ok_or_else(|| Missing::new(format!("process {process} has no Module tag")))?.to_owned();
    let module_item: DataItem = units.gateway.item(&module_id).await.map_err(|e| net_missing(&format!("module {module_id}"), &e))?;
    let (rt, data, tags) = (runtime.clone(), module_item.data.clone(), module_item.tags.clone());
    let module = tokio::task::spawn_blocking(move || rt.load(&data, &tags))
        .await
        .map_err(|e| Missing::new(format!("module load task failed: {e}")))?
        .map_err(|e| Missing::new(format!("module {module_id} does not load here: {e}")))?;
    let limits = runtime.limits(&module_item.tags, &process_item.tags).map_err(|e| Missing::new(e.to_string()))?;
    let env_json = match module.aos_format() {
        Some(_) => eval::cu_env_json(&process_item, &module_item),
        None => eval::env_json(&process_item, &module_item),
    };
    Ok(ProcessSetup { process: process_item, module_item, module, limits, env_json, scheduler })
}

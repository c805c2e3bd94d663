//! `ao-gpu-worker verify`: re-executes what an attestation (or a range of a process's messages)
//! claims, on a backend of the verifier's choosing, and says where the claim and the re-execution
//! first part.
//!
//! Contract: every input is checked exactly as the worker checks it before evaluating
//! (`jobs::verify`: the process item, the module item by its `Module` tag, every assignment and
//! message signature, the hash chain with `jobs::check_chain`), and every attestation's signature
//! verifies and all name the same signer. The state before the range is rebuilt by re-executing
//! from the process's first message. Per message the re-execution is compared with the claim:
//! the message and env digests (the inputs), the gas, the trace root, the result and the state.
//! The first message that differs is reported; within it, when the worker's API serves the trace
//! (`GET /trace/{message}`, whose leaves must hash to the attested root), the first host call
//! whose leaf differs, with the max absolute and ULP difference of what it read back. In
//! reproducible mode equality is bitwise; in fast mode ([`compare::TOLERANCE`]) a message agrees
//! when its trace differs only in read-backs within the tolerance (the report says so).
//!
//! Outcomes ([`Verdict`]): agree (exit 0), disagree (exit 1), cannot verify (exit 2: what is
//! missing is named: an unreachable unit, an item the gateway lacks, an input that does not
//! verify, a constant that cannot be fetched).
//!
//! Rooms: `claims` (attestations: fetch, verify, walk the chain), `replay` (the inputs and the
//! re-execution), `compare` (fields, leaves, ULPs).

mod claims;
pub mod compare;
mod replay;

use std::time::{Duration, Instant};

use serde::Serialize;

use crate::gpu::BackendKind;
use crate::net::Policy;

/// What to verify.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// One attestation: the messages from `from` (default: the process's first) up to its nonce.
    Attestation { id: String, from: Option<u64> },
    /// Messages `from..=to` of `process`, against the attestations scheduled on `attestations`
    /// (the worker's `[attestation] target`, by default its registry).
    Range { process: String, from: u64, to: u64, attestations: String },
}

/// A verification to run.
#[derive(Debug, Clone)]
pub struct Request {
    pub target: Target,
    pub scheduler: String,
    pub gateway: String,
    /// The worker's API (`GET /trace/{message}`), to find the host call that differs.
    pub worker: Option<String>,
    pub backend: BackendKind,
    pub policy: Policy,
    /// The worker's `aos.checkpoint_every`: an aos process's attested state is the memory's
    /// SHA-256 at its checkpoints and a chained commitment between them.
    pub checkpoint_every: u64,
}

/// The outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    Agree,
    Disagree,
    CannotVerify,
}

impl Verdict {
    /// The process exit code: 0 agree, 1 disagree, 2 cannot verify.
    pub fn exit_code(self) -> u8 {
        match self {
            Verdict::Agree => 0,
            Verdict::Disagree => 1,
            Verdict::CannotVerify => 2,
        }
    }
}

/// A claimed value and the re-executed one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FieldDiff {
    pub field: &'static str,
    pub claimed: String,
    pub recomputed: String,
}

/// The first host call whose leaf differs.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CallDiff {
    /// Index of the host call in the message's trace.
    pub index: usize,
    /// The host call (`read_f32`, `matmul`, `run`, ...).
    pub call: String,
    /// The re-executed leaf and the worker's.
    pub recomputed_leaf: Option<String>,
    pub claimed_leaf: Option<String>,
    /// Of what the call read back, when both sides have it as f32.
    pub max_abs_diff: Option<f64>,
    pub max_ulp_diff: Option<u64>,
    pub note: Option<String>,
}

/// Where the claim and the re-execution first part.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Divergence {
    pub nonce: u64,
    pub message: String,
    pub attestation: String,
    pub fields: Vec<FieldDiff>,
    pub call: Option<CallDiff>,
}

/// What `verify` found.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    pub verdict: Verdict,
    pub process: Option<String>,
    pub attestation: Option<String>,
    /// The address that signed the attestations.
    pub signer: Option<String>,
    pub from: u64,
    pub to: u64,
    /// `reproducible` (bitwise) or `fast` (within tolerance), from the attestations.
    pub determinism: Option<String>,
    /// The claimed backend and device, and the verifier's.
    pub claimed_backend: Option<String>,
    pub claimed_device: Option<String>,
    pub backend: String,
    /// Messages re-executed (from the first) and compared with an attestation.
    pub executed: u64,
    pub compared: u64,
    pub divergence: Option<Divergence>,
    /// What was missing, for `cannot-verify`.
    pub missing: Option<String>,
    pub notes: Vec<String>,
    /// Wall time of the re-execution alone, and of the whole verification.
    pub reexecution_ms: u64,
    pub total_ms: u64,
}

impl Report {
    fn new(req: &Request) -> Self {
        Self {
            verdict: Verdict::CannotVerify,
            process: None,
            attestation: None,
            signer: None,
            from: 0,
            to: 0,
            determinism: None,
            claimed_backend: None,
            claimed_device: None,
            backend: req.backend.as_str().to_owned(),
            executed: 0,
            compared: 0,
            divergence: None,
            missing: None,
            notes: Vec::new(),
            reexecution_ms: 0,
            total_ms: 0,
        }
    }

    /// The human report.
    pub fn human(&self) -> String {
        let mut out = String::new();
        let line = |out: &mut String, s: String| {
            out.push_str(&s);
            out.push('\n');
        };
        let verdict = match self.verdict {
            Verdict::Agree => "AGREE",
            Verdict::Disagree => "DISAGREE",
            Verdict::CannotVerify => "CANNOT VERIFY",
        };
        line(&mut out, format!("verdict: {verdict}"));
        if let Some(p) = &self.process {
            line(&mut out, format!("process: {p}  messages {}..={}", self.from, self.to));
        }
        if let Some(a) = &self.attestation {
            line(&mut out, format!("attestation: {a} signed by {}", self.signer.as_deref().unwrap_or("?")));
        }
        line(
            &mut out,
            format!(
                "claimed: {} on {} ({} mode); re-executed on {}",
                self.claimed_backend.as_deref().unwrap_or("?"),
                self.claimed_device.as_deref().unwrap_or("?"),
                self.determinism.as_deref().unwrap_or("?"),
                self.backend
            ),
        );
        line(
            &mut out,
            format!(
                "re-executed {} messages, compared {} ({} ms; {} ms in all)",
                self.executed, self.compared, self.reexecution_ms, self.total_ms
            ),
        );
        if let Some(d) = &self.divergence {
            line(&mut out, format!("first difference: message {} (nonce {}), attestation {}", d.message, d.nonce, d.attestation));
            for f in &d.fields {
                line(&mut out, format!("  {}: claimed {} / re-executed {}", f.field, f.claimed, f.recomputed));
            }
            if let Some(c) = &d.call {
                line(&mut out, format!("  first differing host call: #{} {}", c.index, c.call));
                if let Some(l) = &c.recomputed_leaf {
                    line(&mut out, format!("    re-executed: {l}"));
                }
                if let Some(l) = &c.claimed_leaf {
                    line(&mut out, format!("    claimed:     {l}"));
                }
                if let (Some(a), Some(u)) = (c.max_abs_diff, c.max_ulp_diff) {
                    line(&mut out, format!("    max abs difference {a:e}, max ULP difference {u}"));
                }
                if let Some(n) = &c.note {
                    line(&mut out, format!("    {n}"));
                }
            }
        }
        if let Some(m) = &self.missing {
            line(&mut out, format!("missing: {m}"));
        }
        for n in &self.notes {
            line(&mut out, format!("note: {n}"));
        }
        out
    }
}

/// Why a verification could not be completed: what is missing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Missing(pub String);

impl Missing {
    pub(crate) fn new(what: impl Into<String>) -> Self {
        Self(what.into())
    }
}

/// Runs a verification. Never fails: what could not be checked is a `cannot-verify` report.
pub async fn verify(req: &Request) -> Report {
    let started = Instant::now();
    let mut report = Report::new(req);
    if let Err(Missing(what)) = run(req, &mut report).await {
        report.verdict = Verdict::CannotVerify;
        report.missing = Some(what);
    }
    report.total_ms = millis(started.elapsed());
    report
}

async fn run(req: &Request, report: &mut Report) -> Result<(), Missing> {
    let units = claims::Units::new(req);
    let claims = claims::collect(&units, &req.target).await?;
    let first = claims.last_claim();
    report.process = Some(claims.process.clone());
    report.attestation = Some(first.id.clone());
    report.signer = Some(claims.signer.clone());
    report.from = claims.from;
    report.to = claims.to;
    report.claimed_backend = Some(first.attestation.backend.clone());
    report.claimed_device = Some(first.attestation.device.clone());
    let fast = first.attestation.v2.as_ref().is_some_and(|v| v.determinism == "fast");
    report.determinism = Some(first.attestation.v2.as_ref().map_or("reproducible (v1: unstated)", |v| v.determinism.as_str()).to_owned());
    if first.attestation.v2.is_none() {
        report.notes.push("a version 1 attestation binds no trace: only results and states are compared".into());
    }
    if fast {
        report.notes.push(format!("fast mode: read-backs compared within tolerance ({})", compare::TOLERANCE_TEXT));
    }
    let mut replayer = replay::Replayer::start(&units, req, &claims.process, fast).await?;
    let started = Instant::now();
    let outcome = replayer.run(&units, &claims, report).await;
    report.reexecution_ms = millis(started.elapsed());
    outcome
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

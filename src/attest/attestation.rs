//! Compute attestations: one signed ANS-104 item per evaluated message that binds what went
//! in (process, message, module, the exact JSON handed to the actor) to what came out (the
//! result, the state after and the op trace), with the gas, backend and device that produced it,
//! so anyone can verify the signature and re-execute (`ao-gpu-worker verify`).
//!
//! Format `ao-gpu-worker/attestation/2` (docs/attestation.md; tags, the data repeats them as JSON
//! with kebab-case keys, docs/attestation.schema.json): `Data-Protocol=ao`, `Variant=ao.TN.1`,
//! `Type=Message`, `Action=Compute-Attestation`, `Attestation-Version`, `Process`, `Message`,
//! `Nonce`, `Hash-Chain`, `Module`, `Message-SHA256` (sha256 hex of the message JSON given to
//! `handle`), `Env-SHA256`, `Result-SHA256` (of the result JSON as the compute-unit API serves
//! it), `State-SHA256` (of the linear memory after the message; `none` before any state exists),
//! `Gas-Used`, `Backend` (`<kind>/<determinism>` of the tensor backend, e.g. `wgpu/reproducible`),
//! `Device`, `Capacity-Advertisement` (id of the worker's latest one, or `none`); new in 2:
//! `Determinism` (`reproducible` or `fast`), `Trace-Root` (the Merkle root of the op trace,
//! `attest::trace`), `Trace-Length` (its leaf count), `Worker-Version` (the worker's crate
//! version) and `Previous-Attestation` (the id of the attestation of the process's previous
//! message by this worker, or `none`: a chain).
//! Version 1 items (without the v2 tags) are still read ([`Attestation::from_item`]).
//! `Type=Attestation` is deliberately not used: in AO it means a WeaveDrive data grant.

use serde::Serialize;

use crate::attest::Keypair;
use crate::protocol::ao::{self, ItemType};
use crate::protocol::{Ans104Error, DataItem, DataItemBuilder, Tag, b64};

pub const VERSION: &str = "ao-gpu-worker/attestation/2";
/// The first format, still read.
pub const VERSION_1: &str = "ao-gpu-worker/attestation/1";
/// The worker version v2 attestations name.
pub const WORKER_VERSION: &str = env!("CARGO_PKG_VERSION");
pub const ACTION: &str = "Compute-Attestation";

/// What an attestation binds.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Attestation {
    pub version: &'static str,
    pub process: String,
    pub message: String,
    pub nonce: u64,
    pub hash_chain: String,
    pub module: String,
    pub message_sha256: String,
    pub env_sha256: String,
    pub result_sha256: String,
    pub state_sha256: Option<String>,
    pub gas_used: u64,
    pub backend: String,
    pub device: String,
    pub capacity_advertisement: Option<String>,
    /// What version 2 adds; `None` for a version 1 attestation.
    #[serde(flatten)]
    pub v2: Option<V2>,
}

/// The fields attestation version 2 adds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct V2 {
    pub determinism: String,
    pub trace_root: String,
    pub trace_length: u64,
    pub worker_version: String,
    pub previous_attestation: Option<String>,
}

/// Why an item is not a readable attestation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReadError {
    #[error("item {item} is not a Compute-Attestation (Action={action:?})")]
    NotAnAttestation { item: String, action: Option<String> },
    #[error("attestation {item} has version {version:?}; this worker reads {VERSION_1} and {VERSION}")]
    UnknownVersion { item: String, version: String },
    #[error("attestation {item} has no valid {tag} tag: {why}")]
    BadTag { item: String, tag: &'static str, why: String },
}
impl Attestation {
    /// Signs the attestation as a message to `target`. The anchor derives from the process
    /// and nonce, so the item is the same whenever the same evaluation is attested.
    pub fn sign(&self, key: &Keypair, target: &str) -> Result<DataItem, Ans104Error> {
        let target = b64::decode_id(target).map_err(|_| Ans104Error::InvalidOwner("attestation target"))?;
        let mut tags = ao::base_tags(ItemType::Message);
        let none = || "none".to_owned();
        tags.extend([
            Tag::new("Action", ACTION),
            Tag::new("Attestation-Version", VERSION),
            Tag::new("Process", &self.process),
            Tag::new("Message", &self.message),
            Tag::new("Nonce", self.nonce.to_string()),
            Tag::new("Hash-Chain", &self.hash_chain),
            Tag::new("Module", &self.module),
            Tag::new("Message-SHA256", &self.message_sha256),
            Tag::new("Env-SHA256", &self.env_sha256),
            Tag::new("Result-SHA256", &self.result_sha256),
            Tag::new("State-SHA256", self.state_sha256.clone().unwrap_or_else(none)),
            Tag::new("Gas-Used", self.gas_used.to_string()),
            Tag::new("Backend", &self.backend),
            Tag::new("Device", &self.device),
            Tag::new("Capacity-Advertisement", self.capacity_advertisement.clone().unwrap_or_else(none)),
        ]);
        if let Some(v2) = &self.v2 {
            tags.extend([
                Tag::new("Determinism", &v2.determinism),
                Tag::new("Trace-Root", &v2.trace_root),
                Tag::new("Trace-Length", v2.trace_length.to_string()),
                Tag::new("Worker-Version", &v2.worker_version),
                Tag::new("Previous-Attestation", v2.previous_attestation.clone().unwrap_or_else(none)),
            ]);
        }
        tags.push(Tag::new("Content-Type", "application/json"));
        let data = serde_json::to_vec(self).expect("attestation serializes");
        DataItemBuilder::new()
            .target(target)
            .anchor(derived_anchor(&[&self.process, "attestation", &self.nonce.to_string()]))
            .tags(tags)
            .data(data)
            .sign(key)
    }
}

impl Attestation {
    /// Reads an attestation (version 1 or 2) from its item's tags. The signature is not checked
    /// here: callers verify the item first (`DataItem::verify`).
    pub fn from_item(item: &DataItem) -> Result<Self, ReadError> {
        let id = item.id();
        let action = item.tag("Action");
        if action != Some(ACTION) {
            return Err(ReadError::NotAnAttestation { item: id, action: action.map(str::to_owned) });
        }
        let bad = |tag: &'static str, why: &str| ReadError::BadTag { item: id.clone(), tag, why: why.to_owned() };
        let text = |tag: &'static str| item.tag(tag).map(str::to_owned).ok_or_else(|| bad(tag, "missing"));
        let number = |tag: &'static str| text(tag)?.parse::<u64>().map_err(|_| bad(tag, "not a whole number"));
        let optional = |tag: &'static str| text(tag).map(|v| Some(v).filter(|v| v != "none"));
        let version = match item.tag("Attestation-Version") {
            Some(VERSION) => VERSION,
            Some(VERSION_1) => VERSION_1,
            other => return Err(ReadError::UnknownVersion { item: id, version: other.unwrap_or("").to_owned() }),
        };
        let v2 = if version == VERSION {
            Some(V2 {
                determinism: text("Determinism")?,
                trace_root: text("Trace-Root")?,
                trace_length: number("Trace-Length")?,
                worker_version: text("Worker-Version")?,
                previous_attestation: optional("Previous-Attestation")?,
            })
        } else {
            None
        };
        Ok(Self {
            version,
            process: text("Process")?,
            message: text("Message")?,
            nonce: number("Nonce")?,
            hash_chain: text("Hash-Chain")?,
            module: text("Module")?,
            message_sha256: text("Message-SHA256")?,
            env_sha256: text("Env-SHA256")?,
            result_sha256: text("Result-SHA256")?,
            state_sha256: optional("State-SHA256")?,
            gas_used: number("Gas-Used")?,
            backend: text("Backend")?,
            device: text("Device")?,
            capacity_advertisement: optional("Capacity-Advertisement")?,
            v2,
        })
    }
}

/// A deterministic 32-byte anchor from its parts: the first 32 characters of
/// base64url(sha256(parts joined by '/')).
pub fn derived_anchor(parts: &[&str]) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let text = b64::encode(&Sha256::digest(parts.join("/").as_bytes()));
    text.as_bytes()[..32].try_into().expect("43 characters")
}

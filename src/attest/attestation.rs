//! Compute attestations: one signed ANS-104 item per evaluated message that binds what went
//! in (process, message, module, the exact JSON handed to the actor) to what came out (the
//! result and the state after), with the gas, backend and device that produced it, so anyone
//! can verify the signature and re-execute.
//!
//! Format `ao-gpu-worker/attestation/1` (tags; the data repeats them as JSON):
//! `Data-Protocol=ao`, `Variant=ao.TN.1`, `Type=Message`, `Action=Compute-Attestation`,
//! `Attestation-Version`, `Process`, `Message`, `Nonce`, `Hash-Chain`, `Module`,
//! `Message-SHA256` (sha256 hex of the message JSON given to `handle`), `Env-SHA256`,
//! `Result-SHA256` (of the result JSON as the compute-unit API serves it), `State-SHA256` (of
//! the linear memory after the message; `none` before any state exists), `Gas-Used`,
//! `Backend` (`<kind>/<determinism>` of the tensor backend, e.g. `wgpu/reproducible`), `Device`,
//! `Capacity-Advertisement` (id of the worker's latest one, or `none`).
//! `Type=Attestation` is deliberately not used: in AO it means a WeaveDrive data grant.

use serde::Serialize;

use crate::attest::Keypair;
use crate::protocol::ao::{self, ItemType};
use crate::protocol::{Ans104Error, DataItem, DataItemBuilder, Tag, b64};

pub const VERSION: &str = "ao-gpu-worker/attestation/1";
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
            Tag::new("Content-Type", "application/json"),
        ]);
        let data = serde_json::to_vec(self).expect("attestation serializes");
        DataItemBuilder::new()
            .target(target)
            .anchor(derived_anchor(&[&self.process, "attestation", &self.nonce.to_string()]))
            .tags(tags)
            .data(data)
            .sign(key)
    }
}

/// A deterministic 32-byte anchor from its parts: the first 32 characters of
/// base64url(sha256(parts joined by '/')).
pub fn derived_anchor(parts: &[&str]) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let text = b64::encode(&Sha256::digest(parts.join("/").as_bytes()));
    text.as_bytes()[..32].try_into().expect("43 characters")
}

//! Capacity advertisement: the signed ANS-104 message that tells the registry process what
//! this worker offers, posted through the messenger at start and then as a heartbeat.

use serde::Serialize;

use crate::attest::Keypair;
use crate::capacity::CapacityManifest;
use crate::protocol::ao::{self, ItemType};
use crate::protocol::{Ans104Error, DataItem, DataItemBuilder, Tag, b64};

/// `Action` of a capacity advertisement.
pub const ACTION: &str = "Advertise-Capacity";
/// Version of the manifest schema carried in the data.
pub const SCHEMA: &str = "ao-gpu-worker/capacity/1";

/// An advertisement the messenger accepted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Advertisement {
    pub id: String,
    pub at_ms: u64,
    pub registry: String,
}

/// Builds the signed advertisement. The anchor is the advertisement time, so each heartbeat
/// is a new message. Sign each heartbeat once and re-post those bytes on a retry (the daemon
/// journals them): an RSA key signs the same heartbeat under a new id every time.
pub fn build(key: &Keypair, registry: &str, manifest: &CapacityManifest, at_ms: u64) -> Result<DataItem, AdvertiseError> {
    let target = b64::decode_id(registry).map_err(|e| AdvertiseError::Registry(e.to_string()))?;
    let data = serde_json::to_vec(manifest).map_err(|e| AdvertiseError::Manifest(e.to_string()))?;
    let mut tags = ao::base_tags(ItemType::Message);
    tags.extend([
        Tag::new("Action", ACTION),
        Tag::new("Content-Type", "application/json"),
        Tag::new("Capacity-Schema", SCHEMA),
        Tag::new("Worker-Version", env!("CARGO_PKG_VERSION")),
        Tag::new("Timestamp", at_ms.to_string()),
    ]);
    Ok(DataItemBuilder::new().target(target).anchor(ao::numeric_anchor(at_ms)).tags(tags).data(data).sign(key)?)
}

#[derive(Debug, thiserror::Error)]
pub enum AdvertiseError {
    #[error("registry.process is not a process id: {0}")]
    Registry(String),
    #[error("capacity manifest does not serialize: {0}")]
    Manifest(String),
    #[error("cannot sign the advertisement: {0}")]
    Sign(#[from] Ans104Error),
}

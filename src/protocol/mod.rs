//! Wire types shared by the worker's clients and the embedded devnet: ANS-104 items, deep
//! hash, Avro tags, AO tag conventions and the JSON shapes of the AO units' HTTP APIs.
//!
//! Invariant: the devnet and the clients use these types and nothing else, so the devnet
//! cannot drift from what the clients send to the real units.

pub mod ans104;
pub mod ao;
pub mod avro;
pub mod b64;
pub mod cu_json;
pub mod deep_hash;
pub mod rsa_pss;
pub mod su;

pub use ans104::{Ans104Error, DataItem, DataItemBuilder, SignatureType, Signer};

use serde::{Deserialize, Serialize};

/// One ANS-104 tag. Order matters and names may repeat.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Tag {
    pub name: String,
    pub value: String,
}

impl Tag {
    pub fn new(name: impl Into<String>, value: impl Into<String>) -> Self {
        Self { name: name.into(), value: value.into() }
    }
}

//! JSON shapes of the scheduler unit's HTTP API (docs/ao-protocol.md §3). snake_case, as
//! the deployed Rust SU writes them.

use serde::{Deserialize, Serialize};

use super::{DataItem, SignatureType, Tag, b64};

/// `{"address": …, "key": …}`: the signer of an item.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    pub address: String,
    pub key: String,
}

/// An item as the SU lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ItemJson {
    pub id: String,
    pub owner: Owner,
    /// UTF-8-lossy data, as the SU serves it.
    #[serde(default)]
    pub data: Option<String>,
    pub tags: Vec<Tag>,
    pub signature: String,
    #[serde(default)]
    pub anchor: Option<String>,
    #[serde(default)]
    pub target: Option<String>,
}

impl ItemJson {
    /// The SU's view of a data item. Anchors that are not UTF-8 become `null`, targets that
    /// are absent become `""`, as the SU writes them.
    pub fn from_item(item: &DataItem) -> Self {
        Self::from_item_showing_anchor(item, false)
    }

    /// The same, as the SU answers with `&show-anchor=1`: an anchor that is not UTF-8 is written
    /// base64url (43 characters) instead of being dropped, so the item can be rebuilt and verified.
    pub fn from_item_showing_anchor(item: &DataItem, show_anchor: bool) -> Self {
        let anchor = item.anchor.and_then(|a| match String::from_utf8(a.to_vec()) {
            Ok(text) => Some(text),
            Err(_) => show_anchor.then(|| b64::encode(&a)),
        });
        Self {
            id: item.id(),
            owner: Owner { address: item.owner_address(), key: b64::encode(&item.owner) },
            data: Some(String::from_utf8_lossy(&item.data).into_owned()),
            tags: item.tags.clone(),
            signature: b64::encode(&item.signature),
            anchor,
            target: Some(item.target_id().unwrap_or_default()),
        }
    }

    /// Rebuilds the signed item from the SU's JSON, so its signature can be checked. An anchor
    /// is its 32 UTF-8 bytes, or 43 base64url characters (`&show-anchor=1`). Where the JSON lost
    /// information (a binary anchor without `show-anchor`, non-UTF-8 data) the rebuilt item does
    /// not verify: the caller must refuse it.
    pub fn to_item(&self) -> Result<DataItem, String> {
        let owner = b64::decode(&self.owner.key).map_err(|_| "owner key is not base64url".to_owned())?;
        let signature = b64::decode(&self.signature).map_err(|_| "signature is not base64url".to_owned())?;
        let signature_type = match (owner.len(), signature.len()) {
            (32, 64) => SignatureType::Ed25519,
            (512, 512) => SignatureType::Arweave,
            (o, s) => return Err(format!("cannot tell the signature type of a {o}-byte owner and {s}-byte signature")),
        };
        let target = match self.target.as_deref().filter(|t| !t.is_empty()) {
            Some(t) => Some(b64::decode_id(t).map_err(|e| e.to_string())?),
            None => None,
        };
        let anchor = match self.anchor.as_deref().filter(|a| !a.is_empty()) {
            Some(a) if a.len() == 32 => Some(<[u8; 32]>::try_from(a.as_bytes()).expect("32 bytes")),
            Some(a) if a.len() == 43 => Some(b64::decode_id(a).map_err(|_| format!("anchor {a:?} is neither 32 bytes nor base64url"))?),
            Some(a) => return Err(format!("anchor {a:?} is not 32 bytes")),
            None => None,
        };
        let data = self.data.clone().unwrap_or_default().into_bytes();
        Ok(DataItem::from_parts(signature_type, signature, owner, target, anchor, self.tags.clone(), data))
    }

    /// The first value of a tag.
    pub fn tag(&self, name: &str) -> Option<&str> {
        self.tags.iter().find(|t| t.name == name).map(|t| t.value.as_str())
    }
}

/// A message with its assignment: one entry of a process's schedule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageNode {
    /// `null` for an assignment of a transaction the SU does not hold.
    pub message: Option<ItemJson>,
    pub assignment: ItemJson,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Edge {
    pub cursor: String,
    pub node: MessageNode,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageInfo {
    pub has_next_page: bool,
}

/// `GET /{process}?process-id=…`: one page of a process's schedule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Page {
    pub page_info: PageInfo,
    pub edges: Vec<Edge>,
}

/// `GET /`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SuInfo {
    pub timestamp: String,
    pub address: String,
}

/// `GET /timestamp`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SuTimestamp {
    pub timestamp: String,
    pub block_height: String,
}

/// `POST /` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SuPosted {
    pub timestamp: u64,
    pub id: String,
}

/// `GET /processes/{process}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessInfo {
    pub process_id: String,
    pub block: String,
    pub owner: Owner,
    pub tags: Vec<Tag>,
    pub timestamp: i64,
    pub data: Option<String>,
    pub anchor: Option<String>,
    pub signature: Option<String>,
    pub target: Option<String>,
}

/// Messenger `POST /` answer (202).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MuAccepted {
    pub message: String,
    pub id: String,
}

/// Error body of every unit: `{"error": "…"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

/// The inclusive key range of a page whose lower bound `from` is exclusive and upper bound
/// `to` inclusive, as the SU pages (and the CU's cursors) work; `None` when it is empty.
pub fn page_bounds(from: Option<u64>, to: Option<u64>) -> Option<(u64, u64)> {
    let lo = match from {
        None => 0,
        Some(f) => f.checked_add(1)?,
    };
    let hi = to.unwrap_or(u64::MAX);
    (lo <= hi).then_some((lo, hi))
}

/// Hash chain of a process's assignments (§2.4): `HC_0 = sha256(process id)`,
/// `HC_n = sha256(previous assignment id ‖ HC_{n-1})`, all raw 32-byte values.
pub fn next_hash_chain(process_id: &[u8; 32], previous: Option<(&[u8; 32], &[u8; 32])>) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    match previous {
        None => Sha256::digest(process_id).into(),
        Some((prev_assignment, prev_chain)) => {
            let mut h = Sha256::new();
            h.update(prev_assignment);
            h.update(prev_chain);
            h.finalize().into()
        }
    }
}

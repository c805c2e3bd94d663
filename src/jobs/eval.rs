//! From a scheduled message to a committed result: the JSON-1 message and environment the
//! actor sees, the result as the compute-unit API serves it, the outbox items the worker signs
//! on the actor's behalf (with the tags the AO messenger adds, §2.5), and the attestation.

use serde_json::{Map, Value, json};

use crate::attest::Keypair;
use crate::attest::attestation::derived_anchor;
use crate::journal::OutKind;
use crate::protocol::ao::{self, ItemType};
use crate::protocol::su::ItemJson;
use crate::protocol::{DataItem, DataItemBuilder, Tag, b64};

/// The scheduling facts of one message, from its assignment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slot {
    pub nonce: u64,
    pub epoch: u64,
    pub timestamp: u64,
    pub block_height: u64,
    pub hash_chain: String,
    pub assignment: String,
}

impl Slot {
    pub fn from_assignment(a: &ItemJson) -> Result<Self, String> {
        let num = |name: &str| -> Result<u64, String> {
            a.tag(name)
                .ok_or_else(|| format!("assignment {} has no {name} tag", a.id))?
                .parse()
                .map_err(|_| format!("assignment {} has a non-numeric {name}", a.id))
        };
        Ok(Self {
            nonce: num("Nonce")?,
            epoch: num("Epoch").unwrap_or(0),
            timestamp: num("Timestamp")?,
            block_height: num("Block-Height")?,
            hash_chain: a.tag("Hash-Chain").ok_or_else(|| format!("assignment {} has no Hash-Chain tag", a.id))?.to_owned(),
            assignment: a.id.clone(),
        })
    }
}

fn tags_json(tags: &[Tag]) -> Value {
    Value::Array(tags.iter().map(|t| json!({"name": t.name, "value": t.value})).collect())
}

/// The message JSON handed to `handle` (docs/abi.md): `From` is `From-Process` when a
/// process pushed it, else the signer's address.
pub fn message_json(m: &ItemJson, slot: &Slot, module: &str, read_only: bool) -> String {
    let pushed_by = m.tag("From-Process");
    let mut o = Map::new();
    o.insert("Id".into(), json!(m.id));
    o.insert("Signature".into(), json!(m.signature));
    o.insert("Owner".into(), json!(m.owner.address));
    o.insert("From".into(), json!(pushed_by.unwrap_or(&m.owner.address)));
    if pushed_by.is_some() {
        o.insert("Forwarded-By".into(), json!(m.owner.address));
    }
    o.insert("Target".into(), json!(m.target.clone().unwrap_or_default()));
    o.insert("Anchor".into(), json!(m.anchor.clone().unwrap_or_default()));
    o.insert("Data".into(), json!(m.data.clone().unwrap_or_default()));
    o.insert("Tags".into(), tags_json(&m.tags));
    o.insert("Epoch".into(), json!(slot.epoch));
    o.insert("Nonce".into(), json!(slot.nonce));
    o.insert("Timestamp".into(), json!(slot.timestamp));
    o.insert("Block-Height".into(), json!(slot.block_height));
    o.insert("Hash-Chain".into(), json!(slot.hash_chain));
    o.insert("Cron".into(), json!(false));
    o.insert("Read-Only".into(), json!(read_only));
    o.insert("Module".into(), json!(module));
    Value::Object(o).to_string()
}

/// The environment JSON: `{Process: {Id, Owner, Tags}, Module: {Id, Owner, Tags}}`.
pub fn env_json(process: &ItemJson, module: &DataItem) -> String {
    json!({
        "Process": {"Id": process.id, "Owner": process.owner.address, "Tags": tags_json(&process.tags)},
        "Module": {"Id": module.id(), "Owner": module.owner_address(), "Tags": tags_json(&module.tags)},
    })
    .to_string()
}

/// The result object of the compute-unit API, from the actor's response (or its failure).
pub fn result_object(outcome: &Result<Value, String>, gas_used: u64) -> Value {
    let mut o = Map::new();
    match outcome {
        Ok(resp) => {
            let get = |k: &str, d: Value| resp.get(k).cloned().unwrap_or(d);
            o.insert("Output".into(), get("Output", json!("")));
            o.insert("Messages".into(), get("Messages", json!([])));
            o.insert("Spawns".into(), get("Spawns", json!([])));
            o.insert("Assignments".into(), get("Assignments", json!([])));
        }
        Err(e) => {
            o.insert("Output".into(), json!(""));
            o.insert("Messages".into(), json!([]));
            o.insert("Spawns".into(), json!([]));
            o.insert("Assignments".into(), json!([]));
            o.insert("Error".into(), json!(e));
        }
    }
    o.insert("GasUsed".into(), json!(gas_used));
    Value::Object(o)
}

/// Tags the messenger sets itself; an actor's own values for them are dropped (§2.5).
const RESERVED: [&str; 6] = ["Data-Protocol", "Type", "From-Process", "From-Module", "Assignments", "Variant"];

fn entry_tags(entry: &Value) -> Result<Vec<Tag>, String> {
    let tags = entry.get("Tags").and_then(Value::as_array).ok_or("no Tags")?;
    tags.iter()
        .map(|t| {
            let name = t.get("name").and_then(Value::as_str).ok_or("a tag without a string name")?;
            let value = match t.get("value") {
                Some(Value::String(s)) => s.clone(),
                Some(other) => other.to_string(),
                None => return Err("a tag without a value".to_owned()),
            };
            Ok(Tag::new(name, value))
        })
        .collect()
}

fn entry_data(entry: &Value) -> Vec<u8> {
    let data = match entry.get("Data") {
        Some(Value::String(s)) => s.clone().into_bytes(),
        Some(Value::Null) | None => Vec::new(),
        Some(other) => other.to_string().into_bytes(),
    };
    // AO's convention for "no data" is a single space.
    if data.is_empty() { b" ".to_vec() } else { data }
}

fn entry_anchor(entry: &Value, process: &str, nonce: u64, kind: &str, index: usize) -> [u8; 32] {
    match entry.get("Anchor").and_then(Value::as_str) {
        Some(a) if a.len() == 32 => a.as_bytes().try_into().expect("32 bytes"),
        _ => derived_anchor(&[process, kind, &nonce.to_string(), &index.to_string()]),
    }
}

/// What the worker posts for one successful evaluation: each outbox message and spawn,
/// signed as the AO messenger would push it. Entries it cannot sign are reported, not posted.
pub struct Outbox {
    pub items: Vec<(OutKind, DataItem)>,
    pub dropped: Vec<String>,
}

pub fn outbox(key: &Keypair, process: &str, module: &str, message: &str, nonce: u64, response: &Value, scheduler: &str) -> Outbox {
    let mut out = Outbox { items: Vec::new(), dropped: Vec::new() };
    let list = |k: &str| response.get(k).and_then(Value::as_array).cloned().unwrap_or_default();
    for (i, entry) in list("Messages").iter().enumerate() {
        let built = (|| -> Result<DataItem, String> {
            let target = entry.get("Target").and_then(Value::as_str).ok_or("no Target")?;
            let target = b64::decode_id(target).map_err(|e| format!("Target: {e}"))?;
            let mut tags = ao::base_tags(ItemType::Message);
            tags.extend(entry_tags(entry)?.into_iter().filter(|t| !RESERVED.contains(&t.name.as_str())));
            tags.extend([Tag::new("From-Process", process), Tag::new("From-Module", module), Tag::new("Pushed-For", message)]);
            let anchor = entry_anchor(entry, process, nonce, "message", i);
            DataItemBuilder::new().target(target).anchor(anchor).tags(tags).data(entry_data(entry)).sign(key).map_err(|e| e.to_string())
        })();
        match built {
            Ok(item) => out.items.push((OutKind::Message, item)),
            Err(e) => out.dropped.push(format!("Messages[{i}] not sent: {e}")),
        }
    }
    for (i, entry) in list("Spawns").iter().enumerate() {
        let built = (|| -> Result<DataItem, String> {
            let own = entry_tags(entry)?;
            let mut tags = ao::base_tags(ItemType::Process);
            let has_scheduler = own.iter().any(|t| t.name == "Scheduler");
            tags.extend(own.into_iter().filter(|t| !RESERVED.contains(&t.name.as_str())));
            if !has_scheduler {
                tags.push(Tag::new("Scheduler", scheduler));
            }
            tags.extend([Tag::new("From-Process", process), Tag::new("Pushed-For", message)]);
            let anchor = entry_anchor(entry, process, nonce, "spawn", i);
            DataItemBuilder::new().anchor(anchor).tags(tags).data(entry_data(entry)).sign(key).map_err(|e| e.to_string())
        })();
        match built {
            Ok(item) => out.items.push((OutKind::Spawn, item)),
            Err(e) => out.dropped.push(format!("Spawns[{i}] not sent: {e}")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outbox_items_carry_messenger_tags_and_are_deterministic() {
        let key = Keypair::from_secret(&[3; 32]);
        let target = b64::encode(&[1; 32]);
        let process = b64::encode(&[2; 32]);
        let response = json!({"Messages": [
            {"Target": target, "Anchor": "00000000000000000000000000000007", "Tags": [{"name": "Action", "value": "Pong"}, {"name": "From-Process", "value": "forged"}], "Data": "pong"},
            {"Target": target, "Tags": [{"name": "Action", "value": "Again"}]},
            {"Target": "bad", "Tags": []},
            {"Tags": []},
        ]});
        let a = outbox(&key, &process, "MOD", "MSG", 5, &response, "SU");
        let b = outbox(&key, &process, "MOD", "MSG", 5, &response, "SU");
        assert_eq!(a.items.len(), 2);
        assert_eq!(a.dropped.len(), 2, "{:?}", a.dropped);
        let ids = |o: &Outbox| o.items.iter().map(|(_, i)| i.id()).collect::<Vec<_>>();
        assert_eq!(ids(&a), ids(&b), "same evaluation, same ids");
        let first = &a.items[0].1;
        first.verify().unwrap();
        assert_eq!(first.tag("From-Process"), Some(process.as_str()), "the actor cannot forge From-Process");
        assert_eq!(first.tags.iter().filter(|t| t.name == "From-Process").count(), 1);
        assert_eq!(first.tag("Pushed-For"), Some("MSG"));
        assert_eq!(first.tag("Type"), Some("Message"));
        assert_eq!(&first.anchor.unwrap(), b"00000000000000000000000000000007");
        assert_eq!(a.items[1].1.data, b" ", "empty data becomes a space");
    }

    #[test]
    fn failed_results_carry_the_error() {
        let r = result_object(&Err("trap: unreachable".into()), 42);
        assert_eq!(r["Error"], "trap: unreachable");
        assert_eq!(r["GasUsed"], 42);
        assert_eq!(r["Messages"], json!([]));
    }
}

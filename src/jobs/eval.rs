//! From a scheduled message to a committed result: the JSON-1 message and environment the
//! actor sees, the result as the compute-unit API serves it, the outbox items the worker signs
//! on the actor's behalf (with the tags the AO messenger adds, §2.5), and the attestation.

use serde::{Deserialize, Deserializer};
use serde_json::{Map, Value, json};

use crate::attest::Keypair;
use crate::attest::attestation::derived_anchor;
use crate::journal::OutKind;
use crate::protocol::ao::{self, ItemType};
use crate::protocol::cu_json::{self, CuEnvItem, CuMessage};
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

/// The message JSON an aos module gets: the compute unit's shape, value types and key order
/// (`protocol::cu_json`), which aos's memory image depends on. A scheduled message carries its
/// slot (`Epoch`, `Nonce`, `Hash-Chain`) and targets the process, as the assignment says; a
/// dry-run (`read_only`) carries neither slot field nor `Forwarded-By`, and keeps the target the
/// request gave, as the CU's `dryRun.js` builds it.
pub fn cu_message_json(m: &ItemJson, slot: &Slot, process: &str, read_only: bool) -> String {
    let tags = CuMessage::tags_for_cu(&m.tags);
    let owner = m.owner.address.as_str();
    // `mapFrom`: a non-empty From-Process names the sender; `mapForwardedBy`: any From-Process
    // tag makes the signer the forwarder.
    let from_process = m.tags.iter().find(|t| t.name == "From-Process");
    let from = from_process.map(|t| t.value.as_str()).filter(|v| !v.is_empty()).unwrap_or(owner);
    let scheduled = !read_only;
    CuMessage {
        id: &m.id,
        signature: Some(m.signature.as_str()).filter(|s| scheduled || !s.is_empty()),
        data: m.data.as_deref(),
        owner,
        target: if scheduled { process } else { m.target.as_deref().filter(|t| !t.is_empty()).unwrap_or(process) },
        anchor: m.anchor.as_deref(),
        from,
        forwarded_by: from_process.filter(|_| scheduled).map(|_| owner),
        tags: &tags,
        epoch: scheduled.then_some(slot.epoch),
        nonce: scheduled.then_some(slot.nonce),
        timestamp: slot.timestamp,
        block_height: slot.block_height,
        hash_chain: Some(slot.hash_chain.as_str()).filter(|_| scheduled),
        cron: false,
        read_only,
    }
    .to_json()
}

/// The environment JSON an aos module gets (`AoGlobal`, the CU's key order).
pub fn cu_env_json(process: &ItemJson, module: &DataItem) -> String {
    let (module_id, module_owner) = (module.id(), module.owner_address());
    cu_json::env_json(
        CuEnvItem { id: &process.id, owner: &process.owner.address, tags: &process.tags },
        CuEnvItem { id: &module_id, owner: &module_owner, tags: &module.tags },
    )
}

/// A dry-run message as the compute unit's `POST /dry-run` takes it (docs/ao-protocol.md §5):
/// every field optional, `null` the same as absent, other fields ignored. Dry-run messages
/// are not signed, so nothing here is verified.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct DryRunRequest {
    #[serde(rename = "Id", default)]
    pub id: Option<String>,
    #[serde(rename = "Signature", default)]
    pub signature: Option<String>,
    /// The sender's address.
    #[serde(rename = "Owner", default)]
    pub owner: Option<String>,
    /// Defaults to the process.
    #[serde(rename = "Target", default)]
    pub target: Option<String>,
    /// A string, or any JSON value (passed on as its JSON text).
    #[serde(rename = "Data", default)]
    pub data: Option<Value>,
    #[serde(rename = "Tags", default)]
    pub tags: Option<Vec<Tag>>,
    #[serde(rename = "Anchor", default)]
    pub anchor: Option<String>,
    /// Defaults to the timestamp of the last evaluated message (a number or a decimal string).
    #[serde(rename = "Timestamp", default, deserialize_with = "number_or_string")]
    pub timestamp: Option<u64>,
    /// Defaults to the block height of the last evaluated message.
    #[serde(rename = "Block-Height", default, deserialize_with = "number_or_string")]
    pub block_height: Option<u64>,
}

/// A non-negative integer given as a JSON number or a decimal string (the CU coerces both).
fn number_or_string<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Number(u64),
        Text(String),
    }
    match Option::<Raw>::deserialize(d) {
        Ok(None) => Ok(None),
        Ok(Some(Raw::Number(n))) => Ok(Some(n)),
        Ok(Some(Raw::Text(t))) => t.trim().parse().map(Some).map_err(|_| serde::de::Error::custom(format!("{t:?} is not a whole number"))),
        Err(_) => Err(serde::de::Error::custom("expected a whole number or a decimal string")),
    }
}

/// Where a dry-run stands: the process and the last evaluated message, whose state it reads.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DryRunBase {
    pub process: String,
    pub nonce: u64,
    pub hash_chain: String,
    pub timestamp: u64,
    pub block_height: u64,
}

/// The message and slot a dry-run is evaluated with: the request's fields, defaults from the
/// last evaluation (as the CU takes them), `Read-Only` set by [`message_json`]'s caller. The
/// slot repeats the last evaluated nonce and hash chain: a dry-run is not scheduled.
pub fn dry_run_message(req: &DryRunRequest, base: &DryRunBase) -> (ItemJson, Slot) {
    let data = match &req.data {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    };
    let owner = req.owner.clone().unwrap_or_default();
    let item = ItemJson {
        id: req.id.clone().unwrap_or_default(),
        owner: crate::protocol::su::Owner { address: owner, key: String::new() },
        data: Some(data),
        tags: req.tags.clone().unwrap_or_default(),
        signature: req.signature.clone().unwrap_or_default(),
        anchor: req.anchor.clone(),
        target: Some(req.target.clone().unwrap_or_else(|| base.process.clone())),
    };
    let slot = Slot {
        nonce: base.nonce,
        epoch: 0,
        timestamp: req.timestamp.unwrap_or(base.timestamp),
        block_height: req.block_height.unwrap_or(base.block_height),
        hash_chain: base.hash_chain.clone(),
        assignment: String::new(),
    };
    (item, slot)
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

/// The state hash after an evaluation, as attestations and the journal name it: the runtime's
/// (aos), else the sha256 of the memory it returned, else (a failure: rolled back) `prev`'s.
pub fn state_after(evaluation: &crate::runtime::Evaluation, prev: Option<&str>) -> Option<String> {
    match (&evaluation.state_hash, evaluation.memory.as_deref()) {
        (Some(h), _) => Some(h.clone()),
        (None, Some(memory)) => Some(crate::journal::sha256_hex(memory)),
        (None, None) => prev.map(str::to_owned),
    }
}

/// The result object and its sha256 hex (what `Result-SHA256` attests).
pub fn hashed_result(evaluation: &crate::runtime::Evaluation) -> (Result<Value, String>, Value, String) {
    let outcome: Result<Value, String> = match &evaluation.outcome {
        Ok(v) => Ok(v.clone()),
        Err(e) => Err(e.to_string()),
    };
    let response = result_object(&outcome, evaluation.gas_used);
    let hash = crate::journal::sha256_hex(response.to_string().as_bytes());
    (outcome, response, hash)
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
    fn dry_run_requests_parse_like_the_cu_and_default_to_the_last_evaluation() {
        let req: DryRunRequest = serde_json::from_value(json!({
            "Id": "1234", "Owner": "1234", "Target": "P", "Data": "1984", "Anchor": "0",
            "Tags": [{"name": "Action", "value": "Get"}], "Timestamp": "17", "Block-Height": 9, "Extra": [1]
        }))
        .unwrap();
        assert_eq!((req.timestamp, req.block_height), (Some(17), Some(9)));
        let empty: DryRunRequest = serde_json::from_value(json!({"Tags": null, "Timestamp": null})).unwrap();
        assert_eq!(empty, DryRunRequest::default());
        for bad in [
            json!({"Timestamp": "soon"}),
            json!({"Timestamp": -1}),
            json!({"Timestamp": 1.5}),
            json!({"Tags": [{"name": "A", "value": 1}]}),
        ] {
            assert!(serde_json::from_value::<DryRunRequest>(bad.clone()).is_err(), "{bad}");
        }

        let base = DryRunBase { process: "P".into(), nonce: 4, hash_chain: "HC".into(), timestamp: 1000, block_height: 77 };
        let (item, slot) = dry_run_message(&req, &base);
        let msg: Value = serde_json::from_str(&message_json(&item, &slot, "MOD", true)).unwrap();
        assert_eq!(msg["Read-Only"], true);
        assert_eq!((msg["Id"].clone(), msg["Owner"].clone(), msg["From"].clone()), (json!("1234"), json!("1234"), json!("1234")));
        assert_eq!((msg["Timestamp"].clone(), msg["Block-Height"].clone(), msg["Nonce"].clone()), (json!(17), json!(9), json!(4)));
        assert_eq!(msg["Data"], "1984");
        let (item, slot) = dry_run_message(&DryRunRequest { data: Some(json!({"a": 1})), ..DryRunRequest::default() }, &base);
        let msg: Value = serde_json::from_str(&message_json(&item, &slot, "MOD", true)).unwrap();
        assert_eq!((msg["Target"].clone(), msg["Data"].clone()), (json!("P"), json!("{\"a\":1}")), "defaults: the process, JSON text");
        assert_eq!(
            (msg["Timestamp"].clone(), msg["Block-Height"].clone(), msg["Hash-Chain"].clone()),
            (json!(1000), json!(77), json!("HC"))
        );
    }

    #[test]
    fn aos_messages_are_shaped_as_the_compute_unit_shapes_them() {
        let m = ItemJson {
            id: "M".into(),
            owner: crate::protocol::su::Owner { address: "MU".into(), key: String::new() },
            data: Some("hi".into()),
            tags: vec![Tag::new("Action", "Ping"), Tag::new("From", "spoof"), Tag::new("From-Process", "P2")],
            signature: "S".into(),
            anchor: None,
            target: Some("ELSEWHERE".into()),
        };
        let slot =
            Slot { nonce: 7, epoch: 0, timestamp: 1_700_000_000_000, block_height: 12, hash_chain: "HC".into(), assignment: "A".into() };
        assert_eq!(
            cu_message_json(&m, &slot, "PROC", false),
            r#"{"Id":"M","Signature":"S","Data":"hi","Owner":"MU","Target":"PROC","From":"P2","Forwarded-By":"MU","Tags":[{"name":"Action","value":"Ping"},{"name":"From-Process","value":"P2"}],"Epoch":0,"Nonce":7,"Timestamp":1700000000000,"Block-Height":12,"Hash-Chain":"HC","Cron":false,"Read-Only":false}"#
        );
        let base = DryRunBase { process: "PROC".into(), nonce: 7, hash_chain: "HC".into(), timestamp: 5, block_height: 6 };
        let (item, slot) = dry_run_message(&DryRunRequest { owner: Some("U".into()), ..DryRunRequest::default() }, &base);
        assert_eq!(
            cu_message_json(&item, &slot, "PROC", true),
            r#"{"Id":"","Data":"","Owner":"U","Target":"PROC","From":"U","Tags":[],"Timestamp":5,"Block-Height":6,"Cron":false,"Read-Only":true}"#
        );
    }

    #[test]
    fn failed_results_carry_the_error() {
        let r = result_object(&Err("trap: unreachable".into()), 42);
        assert_eq!(r["Error"], "trap: unreachable");
        assert_eq!(r["GasUsed"], 42);
        assert_eq!(r["Messages"], json!([]));
    }
}

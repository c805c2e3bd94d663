//! Verified inputs: the worker evaluates nothing it cannot verify.
//!
//! Contract: every schedule entry is checked before its message is evaluated. The assignment is
//! an ANS-104 item whose signature verifies (RSA-PSS type 1 or ed25519 type 2), signed by the
//! process's scheduler, naming this process (`Process` tag) and the message (`Message` tag; the
//! boot assignment at nonce 0 names none and carries the process itself). Its `Nonce`, `Epoch`
//! and `Hash-Chain` tags are signed, and the work loop checks them against the journal's last
//! entry (`check_chain`). The message verifies the same way, has the id the assignment names,
//! and targets the process. The process item verifies and has the requested id. Anything else
//! is a [`Refusal`]: a proven forgery, never retried, that halts the process for good.

use crate::protocol::DataItem;
use crate::protocol::ans104::address_of;
use crate::protocol::b64;
use crate::protocol::su::{ItemJson, MessageNode, ProcessInfo};

/// Why an input was refused: which unit served it, which item, and what failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("input refused: {what} {item} from the {unit}: {reason}")]
pub struct Refusal {
    /// `scheduler` or `gateway`.
    pub unit: &'static str,
    /// What the item is: `process`, `message`, `assignment`, `module`.
    pub what: &'static str,
    pub item: String,
    pub reason: String,
}

impl Refusal {
    fn scheduler(what: &'static str, item: &str, reason: impl Into<String>) -> Self {
        Self { unit: "scheduler", what, item: item.to_owned(), reason: reason.into() }
    }
}

/// Rebuilds an item the scheduler served as JSON and checks it: the owner key hashes to the
/// owner address, the signature verifies, and the signed bytes have the id it was served with.
/// JSON that lost information (binary data, an anchor not shown) cannot be rebuilt faithfully:
/// that is a refusal, never a pass.
pub fn signed_json(item: &ItemJson, what: &'static str) -> Result<DataItem, Refusal> {
    let refuse = |reason: String| Refusal::scheduler(what, &item.id, reason);
    let key = b64::decode(&item.owner.key).map_err(|_| refuse("its owner key is not base64url".into()))?;
    if address_of(&key) != item.owner.address {
        return Err(refuse(format!("its owner key hashes to {}, not to the owner address {}", address_of(&key), item.owner.address)));
    }
    let signed = item.to_item().map_err(|e| refuse(format!("cannot rebuild the signed item: {e}")))?;
    signed.verify().map_err(|e| {
        refuse(format!("its signature does not verify ({e}); a forgery, or JSON that lost information (binary data or anchor)"))
    })?;
    if signed.id() != item.id {
        return Err(refuse(format!("its signed bytes have id {}, not the id it was served with", signed.id())));
    }
    Ok(signed)
}

/// The process definition of `GET /processes/{requested}`: signed, verified, with the
/// requested id, of `Type` `Process`. Returns the process as an [`ItemJson`].
pub fn process_item(info: &ProcessInfo, requested: &str) -> Result<ItemJson, Refusal> {
    let refuse = |reason: String| Refusal::scheduler("process", requested, reason);
    if info.process_id != requested {
        return Err(refuse(format!("the scheduler answered process {}", info.process_id)));
    }
    let signature = info.signature.clone().filter(|s| !s.is_empty()).ok_or_else(|| refuse("it comes without a signature".into()))?;
    let item = ItemJson {
        id: info.process_id.clone(),
        owner: info.owner.clone(),
        data: info.data.clone(),
        tags: info.tags.clone(),
        signature,
        anchor: info.anchor.clone(),
        target: info.target.clone(),
    };
    signed_json(&item, "process")?;
    if item.tag("Type") != Some("Process") {
        return Err(refuse(format!("its Type is {:?}, not Process", item.tag("Type"))));
    }
    Ok(item)
}

/// The process item from the gateway (fetched by the requested id, which the gateway client
/// checks, and verified there), for a scheduler that keeps no signature for it: it must be a
/// `Process`.
pub fn process_from_gateway(item: &DataItem, requested: &str) -> Result<ItemJson, Refusal> {
    if item.tag("Type") != Some("Process") || item.id() != requested {
        let reason = format!("item {} of Type {:?} is not the process asked for", item.id(), item.tag("Type"));
        return Err(Refusal { unit: "gateway", what: "process", item: requested.to_owned(), reason });
    }
    Ok(ItemJson::from_item(item))
}

/// The address whose assignments a process accepts: its `Scheduler` tag (signed by the
/// process's owner), else the address the scheduler unit publishes (`GET /`).
pub fn scheduler_of(process: &ItemJson, published: Option<&str>) -> Option<String> {
    process.tag("Scheduler").or(published).map(str::to_owned)
}

/// Checks one schedule entry of `process` before its message is evaluated (see the module
/// documentation). `scheduler` is the address that must have signed the assignment. A node
/// without a message (an assignment of an on-chain transaction) is checked here as far as the
/// assignment goes; the caller fetches the message the assignment names, by that id.
pub fn schedule_entry(node: &MessageNode, process: &str, scheduler: &str) -> Result<(), Refusal> {
    let a = &node.assignment;
    let refuse_a = |reason: String| Refusal::scheduler("assignment", &a.id, reason);
    signed_json(a, "assignment")?;
    if a.owner.address != scheduler {
        return Err(refuse_a(format!("it is signed by {}, not by the process's scheduler {scheduler}", a.owner.address)));
    }
    if a.tag("Type") != Some("Assignment") {
        return Err(refuse_a(format!("its Type is {:?}, not Assignment", a.tag("Type"))));
    }
    if a.tag("Process") != Some(process) {
        return Err(refuse_a(format!("it assigns to process {:?}, not {process}", a.tag("Process"))));
    }
    let Some(m) = &node.message else {
        return match a.tag("Message") {
            Some(_) => Ok(()),
            None => Err(refuse_a("it names no message and the scheduler served none".into())),
        };
    };
    match a.tag("Message") {
        Some(named) if named != m.id => {
            return Err(Refusal::scheduler("message", &m.id, format!("the assignment {} names message {named}, not this one", a.id)));
        }
        Some(_) => {
            let target = m.target.as_deref().unwrap_or_default();
            if target != process {
                return Err(Refusal::scheduler("message", &m.id, format!("it targets {target:?}, not the process {process}")));
            }
        }
        // The boot assignment (nonce 0) carries the process itself.
        None if m.id != process => {
            return Err(refuse_a(format!("it names no message, so it must carry the process itself, not item {}", m.id)));
        }
        None => {}
    }
    signed_json(m, "message")?;
    Ok(())
}

/// The message an assignment names, fetched from the gateway by that id (the gateway client
/// checks the id): it verified there; here its binding to the assignment is checked.
pub fn hydrated(message: &DataItem, named: &str) -> Result<(), Refusal> {
    if message.id() != named {
        return Err(Refusal {
            unit: "gateway",
            what: "message",
            item: named.to_owned(),
            reason: format!("the gateway answered item {}", message.id()),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attest::Keypair;
    use crate::protocol::ao::{self, ItemType};
    use crate::protocol::su::{Owner, next_hash_chain};
    use crate::protocol::{DataItemBuilder, Tag};

    struct World {
        scheduler: Keypair,
        user: Keypair,
        process: DataItem,
    }

    fn world() -> World {
        let scheduler = Keypair::from_secret(&[1; 32]);
        let user = Keypair::from_secret(&[2; 32]);
        let mut tags = ao::base_tags(ItemType::Process);
        tags.extend([Tag::new("Module", b64::encode(&[3; 32])), Tag::new("Scheduler", scheduler.address())]);
        let process = DataItemBuilder::new().anchor(ao::numeric_anchor(1)).tags(tags).data(b" ".to_vec()).sign(&user).unwrap();
        World { scheduler, user, process }
    }

    fn message(w: &World, n: u64) -> DataItem {
        let mut tags = ao::base_tags(ItemType::Message);
        tags.push(Tag::new("Action", "Increment"));
        DataItemBuilder::new().target(w.process.id_raw()).anchor(ao::numeric_anchor(n)).tags(tags).sign(&w.user).unwrap()
    }

    /// An assignment as the SU writes it: a random (binary) anchor, shown base64url.
    fn assignment(signer: &Keypair, process: &str, message: Option<&str>, nonce: u64) -> ItemJson {
        let chain = next_hash_chain(&b64::decode_id(process).unwrap(), None);
        let mut tags = vec![
            Tag::new("Process", process),
            Tag::new("Epoch", "0"),
            Tag::new("Nonce", nonce.to_string()),
            Tag::new("Hash-Chain", b64::encode(&chain)),
            Tag::new("Block-Height", "000000000001"),
            Tag::new("Timestamp", "1"),
        ];
        tags.extend(ao::base_tags(ItemType::Assignment));
        if let Some(m) = message {
            tags.push(Tag::new("Message", m));
        }
        let item = DataItemBuilder::new().anchor([0xfe; 32]).tags(tags).sign(signer).unwrap();
        ItemJson::from_item_showing_anchor(&item, true)
    }

    fn node(message: &DataItem, assignment: ItemJson) -> MessageNode {
        MessageNode { message: Some(ItemJson::from_item(message)), assignment }
    }

    #[test]
    fn an_honest_schedule_verifies() {
        let w = world();
        let (pid, sched) = (w.process.id(), w.scheduler.address());
        schedule_entry(&node(&w.process, assignment(&w.scheduler, &pid, None, 0)), &pid, &sched).unwrap();
        let m = message(&w, 1);
        schedule_entry(&node(&m, assignment(&w.scheduler, &pid, Some(&m.id()), 1)), &pid, &sched).unwrap();
        // An on-chain message: only the assignment is served; it names the message.
        let a = assignment(&w.scheduler, &pid, Some(&m.id()), 1);
        schedule_entry(&MessageNode { message: None, assignment: a }, &pid, &sched).unwrap();
        hydrated(&m, &m.id()).unwrap();
        assert!(hydrated(&message(&w, 2), &m.id()).is_err());
    }

    #[test]
    fn an_assignment_whose_binary_anchor_was_dropped_is_refused() {
        let w = world();
        let (pid, sched) = (w.process.id(), w.scheduler.address());
        let m = message(&w, 1);
        let mut a = assignment(&w.scheduler, &pid, Some(&m.id()), 1);
        a.anchor = None;
        let e = schedule_entry(&node(&m, a), &pid, &sched).unwrap_err();
        assert!(e.reason.contains("does not verify"), "{e}");
    }

    #[test]
    fn forgeries_and_swaps_are_refused() {
        let w = world();
        let (pid, sched) = (w.process.id(), w.scheduler.address());
        let m = message(&w, 1);
        let a = assignment(&w.scheduler, &pid, Some(&m.id()), 1);

        // A forged message signature.
        let mut forged = node(&m, a.clone());
        let msg = forged.message.as_mut().unwrap();
        let mut sig = b64::decode(&msg.signature).unwrap();
        sig[0] ^= 1;
        msg.signature = b64::encode(&sig);
        let e = schedule_entry(&forged, &pid, &sched).unwrap_err();
        assert_eq!((e.what, e.item.as_str()), ("message", m.id().as_str()), "{e}");
        // Data changed under the signature.
        let mut tampered = node(&m, a.clone());
        tampered.message.as_mut().unwrap().data = Some("other".into());
        assert!(schedule_entry(&tampered, &pid, &sched).unwrap_err().reason.contains("does not verify"));

        // A message swapped for another validly signed one.
        let other = message(&w, 2);
        let e = schedule_entry(&node(&other, a.clone()), &pid, &sched).unwrap_err();
        assert!(e.reason.contains(&format!("names message {}", m.id())), "{e}");

        // An assignment signed by someone else than the process's scheduler.
        let stranger = Keypair::from_secret(&[9; 32]);
        let e = schedule_entry(&node(&m, assignment(&stranger, &pid, Some(&m.id()), 1)), &pid, &sched).unwrap_err();
        assert!(e.reason.contains("not by the process's scheduler"), "{e}");
        // ... or claiming the scheduler's address with the stranger's key.
        let mut claimed = assignment(&stranger, &pid, Some(&m.id()), 1);
        claimed.owner = Owner { address: sched.clone(), key: claimed.owner.key.clone() };
        assert!(schedule_entry(&node(&m, claimed), &pid, &sched).unwrap_err().reason.contains("hashes to"));

        // An assignment naming another process (validly signed by the scheduler).
        let elsewhere = b64::encode(&[7; 32]);
        let e = schedule_entry(&node(&m, assignment(&w.scheduler, &elsewhere, Some(&m.id()), 1)), &pid, &sched).unwrap_err();
        assert!(e.reason.contains("assigns to process"), "{e}");

        // A message targeting another process, validly assigned.
        let mut tags = ao::base_tags(ItemType::Message);
        tags.push(Tag::new("Action", "Increment"));
        let off = DataItemBuilder::new().target([7; 32]).anchor(ao::numeric_anchor(3)).tags(tags).sign(&w.user).unwrap();
        let e = schedule_entry(&node(&off, assignment(&w.scheduler, &pid, Some(&off.id()), 1)), &pid, &sched).unwrap_err();
        assert!(e.reason.contains("targets"), "{e}");

        // A boot assignment carrying something else than the process.
        let e = schedule_entry(&node(&m, assignment(&w.scheduler, &pid, None, 0)), &pid, &sched).unwrap_err();
        assert!(e.reason.contains("must carry the process itself"), "{e}");
    }

    fn info(p: &DataItem) -> ProcessInfo {
        let j = ItemJson::from_item(p);
        ProcessInfo {
            process_id: j.id,
            block: "000000000001".into(),
            owner: j.owner,
            tags: j.tags,
            timestamp: 1,
            data: j.data,
            anchor: j.anchor,
            signature: Some(j.signature),
            target: None,
        }
    }

    #[test]
    fn the_process_must_be_the_requested_one_and_signed() {
        let w = world();
        let pid = w.process.id();
        let ok = process_item(&info(&w.process), &pid).unwrap();
        assert_eq!(scheduler_of(&ok, None), Some(w.scheduler.address()));
        // Another process answered.
        let e = process_item(&info(&w.process), &b64::encode(&[8; 32])).unwrap_err();
        assert!(e.reason.contains("answered process"), "{e}");
        // Another process's definition under the requested id.
        let mut swapped = info(&w.process);
        swapped.tags.push(Tag::new("Extra", "1"));
        assert!(process_item(&swapped, &pid).unwrap_err().reason.contains("does not verify"));
        // Unsigned: the signed item must come from elsewhere (the gateway), and be a Process.
        let mut unsigned = info(&w.process);
        unsigned.signature = None;
        assert!(process_item(&unsigned, &pid).unwrap_err().reason.contains("without a signature"));
        assert_eq!(process_from_gateway(&w.process, &pid).unwrap(), ItemJson::from_item(&w.process));
        let m = message(&w, 1);
        assert!(process_from_gateway(&m, &m.id()).unwrap_err().reason.contains("not the process"));
    }

    #[test]
    fn rsa_signed_items_from_the_deployed_scheduler_verify() {
        // The SU's published assignment (docs/ao-protocol.md §1.8 C), as the SU's JSON carries it
        // with `show-anchor=1`.
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/vectors/su_rsa_assignment.b64");
        let text = std::fs::read_to_string(path).unwrap();
        let item = DataItem::parse(&b64::decode(text.trim()).unwrap()).unwrap();
        let json = ItemJson::from_item_showing_anchor(&item, true);
        assert_eq!(signed_json(&json, "assignment").unwrap().id(), "P_N-NEMtNRpNXemOHMNu9Gjx4AbNhAl-7_5CGtPC6PM");
        let mut dropped = json.clone();
        dropped.anchor = None;
        assert!(signed_json(&dropped, "assignment").is_err());
        // A rewritten nonce under the SU's RSA signature.
        let mut renumbered = json.clone();
        renumbered.tags.iter_mut().find(|t| t.name == "Nonce").unwrap().value = "2".into();
        assert!(signed_json(&renumbered, "assignment").unwrap_err().reason.contains("does not verify"));
    }

    #[test]
    fn a_message_whose_binary_data_the_json_mangled_is_refused_not_passed() {
        let w = world();
        let (pid, sched) = (w.process.id(), w.scheduler.address());
        let mut tags = ao::base_tags(ItemType::Message);
        tags.push(Tag::new("Action", "Upload"));
        let m = DataItemBuilder::new().target(w.process.id_raw()).tags(tags).data(vec![0xff, 0xfe, 0x00, 0x80]).sign(&w.user).unwrap();
        let e = schedule_entry(&node(&m, assignment(&w.scheduler, &pid, Some(&m.id()), 1)), &pid, &sched).unwrap_err();
        assert_eq!((e.unit, e.what), ("scheduler", "message"));
        assert!(e.reason.contains("lost information"), "{e}");
    }
}

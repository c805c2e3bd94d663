//! Following the registry process: `Action=Assign-Workload` / `Release-Workload` messages
//! naming this worker (`Worker` tag) and a process (`Process` tag), signed by a configured
//! authority, change the set of served processes. Everything else is ignored with a debug
//! line. The registry cursor (and the chain link: the last assignment's id and `Hash-Chain`)
//! moves in the same transaction as the change it applies.
//!
//! The registry's schedule is checked like a process's (`verify`): every assignment is signed
//! by the scheduler (its published address), assigns to the registry, carries the next nonce
//! and chains from the last one applied; the message it carries has the id it names, and only
//! messages targeting the registry count. A rewind, replay, gap, fork or forged assignment halts
//! following for good (journaled under `registry:<id>`, reported like a halted process).

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::Context;
use super::eval::Slot;
use super::verify;
use crate::journal::{RegistryChange, RegistryLink, Served};
use crate::net::scheduler::Range;
use crate::protocol::ans104::address_of;
use crate::protocol::b64;
use crate::protocol::su::{ItemJson, MessageNode, next_hash_chain};

pub const ASSIGN: &str = "Assign-Workload";
pub const RELEASE: &str = "Release-Workload";

/// What a registry entry means for this worker.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    Serve(String),
    Release(String),
    Ignore(String),
}

/// Decides one registry message: right action, names this worker, signed (verifiably) by
/// an authority, names a valid process.
pub fn decide(m: &ItemJson, me: &str, authorities: &[String]) -> Decision {
    let action = m.tag("Action").unwrap_or_default();
    if action != ASSIGN && action != RELEASE {
        return Decision::Ignore(format!("action {action:?}"));
    }
    if m.tag("Worker") != Some(me) {
        return Decision::Ignore("for another worker".into());
    }
    if !authorities.iter().any(|a| a == &m.owner.address) {
        return Decision::Ignore(format!("signer {} is not an authority", m.owner.address));
    }
    // The address must be the signer's, and the signature must hold: the scheduler's word
    // is not enough to hand out work.
    let owner_ok = b64::decode(&m.owner.key).map(|k| address_of(&k) == m.owner.address).unwrap_or(false);
    if !owner_ok {
        return Decision::Ignore("owner key does not match the owner address".into());
    }
    match m.to_item().and_then(|i| i.verify().map_err(|e| e.to_string())) {
        Ok(()) => {}
        Err(e) => return Decision::Ignore(format!("signature cannot be verified: {e}")),
    }
    let Some(process) = m.tag("Process").filter(|p| b64::is_id(p)) else {
        return Decision::Ignore("no valid Process tag".into());
    };
    if action == ASSIGN { Decision::Serve(process.to_owned()) } else { Decision::Release(process.to_owned()) }
}

/// The key under which a halt of the registry follower is journaled (beside processes').
pub fn halt_key(registry: &str) -> String {
    format!("registry:{registry}")
}

pub async fn follow(ctx: Arc<Context>, shutdown: CancellationToken) {
    let key = halt_key(&ctx.registry);
    loop {
        if !ctx.halted().contains_key(&key) {
            match step(&ctx).await {
                Ok(()) => {}
                Err(StepError::Halt(reason)) => {
                    tracing::error!(registry = %ctx.registry, unit = "scheduler", %reason, "registry following halted");
                    ctx.record_halt(&key, &reason);
                }
                Err(StepError::Retry(e)) => tracing::warn!(error = %e, registry = %ctx.registry, "registry follow failed; will retry"),
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(ctx.poll) => {}
        }
    }
}

/// A step either fails for now (the network, the journal: retried) or for good (a refused
/// registry schedule: following halts).
enum StepError {
    Retry(anyhow::Error),
    Halt(String),
}

impl<E: Into<anyhow::Error>> From<E> for StepError {
    fn from(e: E) -> Self {
        StepError::Retry(e.into())
    }
}

/// Checks one registry schedule entry against the last one applied: signed by the scheduler,
/// assigned to the registry, the next nonce, chained from the last assignment (when known).
fn check_entry(
    ctx_registry: &str,
    scheduler: &str,
    cursor: Option<u64>,
    link: Option<&RegistryLink>,
    node: &MessageNode,
) -> Result<Slot, String> {
    let a = &node.assignment;
    verify::signed_json(a, "assignment").map_err(|e| e.to_string())?;
    if a.owner.address != scheduler {
        return Err(format!("registry assignment {} is signed by {}, not by the scheduler {scheduler}", a.id, a.owner.address));
    }
    if a.tag("Process") != Some(ctx_registry) {
        return Err(format!("registry assignment {} assigns to {:?}, not to the registry", a.id, a.tag("Process")));
    }
    let slot = Slot::from_assignment(a)?;
    let expected = cursor.map_or(0, |c| c + 1);
    if slot.nonce != expected {
        let what = if slot.nonce < expected { "a rewind or replay" } else { "a gap" };
        return Err(format!("registry schedule sent nonce {} where {expected} was next ({what}); following halted", slot.nonce));
    }
    let registry_raw = b64::decode_id(ctx_registry).map_err(|e| e.to_string())?;
    let previous = match (cursor, link) {
        (None, _) => Some(None),
        (Some(_), Some(l)) => Some(Some((
            b64::decode_id(&l.assignment).map_err(|e| e.to_string())?,
            b64::decode_id(&l.hash_chain).map_err(|e| e.to_string())?,
        ))),
        // A journal from before links were kept: the chain is checked from the next entry on.
        (Some(_), None) => None,
    };
    if let Some(previous) = previous {
        let expected = b64::encode(&next_hash_chain(&registry_raw, previous.as_ref().map(|(a, h)| (a, h))));
        if slot.hash_chain != expected {
            return Err(format!(
                "registry hash chain broken at nonce {}: scheduler says {}, expected {expected}",
                slot.nonce, slot.hash_chain
            ));
        }
    }
    if let (Some(m), Some(named)) = (&node.message, a.tag("Message"))
        && m.id != named
    {
        return Err(format!("registry assignment {} names message {named}, the scheduler served {}", a.id, m.id));
    }
    Ok(slot)
}

async fn step(ctx: &Context) -> Result<(), StepError> {
    let scheduler = ctx.scheduler_address().await?;
    loop {
        let cursor = ctx.journal.registry_cursor()?;
        let mut link = ctx.journal.registry_link()?;
        let mut at = cursor;
        let page = ctx.scheduler.page(&ctx.registry, &Range { from: cursor, limit: Some(100), by_nonce: true, ..Range::default() }).await?;
        for edge in &page.edges {
            let slot = check_entry(&ctx.registry, &scheduler, at, link.as_ref(), &edge.node).map_err(StepError::Halt)?;
            let nonce = slot.nonce;
            let decision = match &edge.node.message {
                Some(m) if m.target.as_deref() != Some(ctx.registry.as_str()) => Decision::Ignore("not targeting the registry".into()),
                Some(m) => decide(m, &ctx.address, &ctx.authorities()),
                None => Decision::Ignore("assignment without a message".into()),
            };
            let id = edge.node.message.as_ref().map(|m| m.id.clone()).unwrap_or_default();
            let next = RegistryLink { assignment: slot.assignment.clone(), hash_chain: slot.hash_chain.clone() };
            match &decision {
                Decision::Serve(p) => {
                    tracing::info!(process = %p, by = %id, "workload assigned");
                    let change = RegistryChange::Serve(&Served { process: p.clone(), assigned_by: id });
                    ctx.journal.apply_registry(nonce, Some(&next), Some(change))?;
                }
                Decision::Release(p) => {
                    tracing::info!(process = %p, by = %id, "workload released");
                    ctx.journal.apply_registry(nonce, Some(&next), Some(RegistryChange::Release(p)))?;
                }
                Decision::Ignore(why) => {
                    tracing::debug!(nonce, message = %id, %why, "registry entry ignored");
                    ctx.journal.apply_registry(nonce, Some(&next), None)?;
                }
            }
            at = Some(nonce);
            link = Some(next);
        }
        if !page.page_info.has_next_page || page.edges.is_empty() {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attest::Keypair;
    use crate::protocol::ao::{self, ItemType};
    use crate::protocol::{DataItemBuilder, Tag};

    fn registry_message(signer: &Keypair, action: &str, worker: &str, process: &str) -> ItemJson {
        let mut tags = ao::base_tags(ItemType::Message);
        tags.extend([Tag::new("Action", action), Tag::new("Worker", worker), Tag::new("Process", process)]);
        ItemJson::from_item(
            &DataItemBuilder::new().target([1; 32]).anchor(ao::numeric_anchor(1)).tags(tags).data(b" ".to_vec()).sign(signer).unwrap(),
        )
    }

    #[test]
    fn only_authorities_assign_and_only_to_the_named_worker() {
        let authority = Keypair::from_secret(&[1; 32]);
        let stranger = Keypair::from_secret(&[2; 32]);
        let authorities = vec![authority.address()];
        let me = "W".repeat(43);
        let process = b64::encode(&[9; 32]);
        let m = registry_message(&authority, ASSIGN, &me, &process);
        assert_eq!(decide(&m, &me, &authorities), Decision::Serve(process.clone()));
        let m = registry_message(&authority, RELEASE, &me, &process);
        assert_eq!(decide(&m, &me, &authorities), Decision::Release(process.clone()));
        let m = registry_message(&stranger, ASSIGN, &me, &process);
        assert!(matches!(decide(&m, &me, &authorities), Decision::Ignore(why) if why.contains("not an authority")));
        let m = registry_message(&authority, ASSIGN, &"X".repeat(43), &process);
        assert!(matches!(decide(&m, &me, &authorities), Decision::Ignore(why) if why.contains("another worker")));
        let m = registry_message(&authority, "Advertise-Capacity", &me, &process);
        assert!(matches!(decide(&m, &me, &authorities), Decision::Ignore(_)));
        let m = registry_message(&authority, ASSIGN, &me, "not-a-process");
        assert!(matches!(decide(&m, &me, &authorities), Decision::Ignore(why) if why.contains("Process")));
    }

    /// A registry schedule of `n` entries signed by `scheduler`, chained as the SU chains them.
    /// `time` sets the timestamps: two schedules with different ones are forks of each other.
    fn schedule(scheduler: &Keypair, registry: &str, n: u64, time: u64) -> Vec<MessageNode> {
        let raw = b64::decode_id(registry).unwrap();
        let mut prev: Option<([u8; 32], [u8; 32])> = None;
        let mut out = Vec::new();
        for nonce in 0..n {
            let chain = next_hash_chain(&raw, prev.as_ref().map(|(a, h)| (a, h)));
            let mut tags = vec![
                Tag::new("Process", registry),
                Tag::new("Epoch", "0"),
                Tag::new("Nonce", nonce.to_string()),
                Tag::new("Hash-Chain", b64::encode(&chain)),
                Tag::new("Block-Height", "000000000001"),
                Tag::new("Timestamp", (time + nonce).to_string()),
            ];
            tags.extend(ao::base_tags(ItemType::Assignment));
            let a = DataItemBuilder::new().anchor([nonce as u8 | 0x80; 32]).tags(tags).sign(scheduler).unwrap();
            prev = Some((a.id_raw(), chain));
            out.push(MessageNode { message: None, assignment: ItemJson::from_item_showing_anchor(&a, true) });
        }
        out
    }

    #[test]
    fn registry_entries_are_checked_in_order_and_chained() {
        let scheduler = Keypair::from_secret(&[4; 32]);
        let registry = b64::encode(&[5; 32]);
        let sched = scheduler.address();
        let nodes = schedule(&scheduler, &registry, 4, 1000);
        let mut link: Option<RegistryLink> = None;
        let mut cursor = None;
        for node in &nodes {
            let slot = check_entry(&registry, &sched, cursor, link.as_ref(), node).unwrap();
            link = Some(RegistryLink { assignment: slot.assignment.clone(), hash_chain: slot.hash_chain.clone() });
            cursor = Some(slot.nonce);
        }
        let after_1 = {
            let s = Slot::from_assignment(&nodes[1].assignment).unwrap();
            RegistryLink { assignment: s.assignment, hash_chain: s.hash_chain }
        };
        // A rewind (or a replay), and a gap.
        let e = check_entry(&registry, &sched, Some(1), Some(&after_1), &nodes[1]).unwrap_err();
        assert!(e.contains("nonce 1 where 2 was next (a rewind or replay)"), "{e}");
        let e = check_entry(&registry, &sched, Some(1), Some(&after_1), &nodes[3]).unwrap_err();
        assert!(e.contains("nonce 3 where 2 was next (a gap)"), "{e}");
        // The right nonce from another registry's schedule, or from a fork of this one.
        let other = schedule(&scheduler, &b64::encode(&[6; 32]), 3, 1000);
        let e = check_entry(&registry, &sched, Some(1), Some(&after_1), &other[2]).unwrap_err();
        assert!(e.contains("assigns to"), "{e}");
        let forked = schedule(&scheduler, &registry, 3, 2000);
        let e = check_entry(&registry, &sched, Some(1), Some(&after_1), &forked[2]).unwrap_err();
        assert!(e.contains("hash chain broken at nonce 2"), "{e}");
        // Signed by someone else.
        let e = check_entry(&registry, &Keypair::from_secret(&[7; 32]).address(), None, None, &nodes[0]).unwrap_err();
        assert!(e.contains("not by the scheduler"), "{e}");
    }

    #[test]
    fn a_forged_authority_is_ignored() {
        let authority = Keypair::from_secret(&[1; 32]);
        let forger = Keypair::from_secret(&[3; 32]);
        let me = "W".repeat(43);
        let process = b64::encode(&[9; 32]);
        // The forger signs, then claims the authority's address and key: the signature fails.
        let mut m = registry_message(&forger, ASSIGN, &me, &process);
        m.owner.address = authority.address();
        m.owner.key = b64::encode(&authority.public_key());
        assert!(matches!(decide(&m, &me, &[authority.address()]), Decision::Ignore(why) if why.contains("signature")));
        // Claiming the address with the forger's own key: the key does not hash to it.
        let mut m = registry_message(&forger, ASSIGN, &me, &process);
        m.owner.address = authority.address();
        assert!(matches!(decide(&m, &me, &[authority.address()]), Decision::Ignore(why) if why.contains("owner key")));
    }
}

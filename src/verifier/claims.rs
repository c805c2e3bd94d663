//! The claims to check: attestations, each fetched, its signature verified and read (version 1
//! or 2), all signed by one address; from one attestation back along `Previous-Attestation`, or
//! found among the messages scheduled on the attestation target.

use std::collections::BTreeMap;

use super::{Missing, Request, Target};
use crate::attest::attestation::{ACTION, Attestation};
use crate::jobs::verify;
use crate::net::scheduler::Range;
use crate::net::{GatewayClient, NetError, SchedulerClient};

/// The units the verifier reads from.
pub(super) struct Units {
    pub scheduler: SchedulerClient,
    pub gateway: GatewayClient,
    pub http: reqwest::Client,
    pub worker: Option<String>,
}

impl Units {
    pub fn new(req: &Request) -> Self {
        Self {
            scheduler: SchedulerClient::new(&req.scheduler, req.policy.clone()),
            gateway: GatewayClient::new(&req.gateway, req.policy.clone()),
            http: reqwest::Client::new(),
            worker: req.worker.clone(),
        }
    }
}

/// What a unit could not give, as a [`Missing`].
pub(super) fn net_missing(what: &str, e: &NetError) -> Missing {
    Missing::new(format!("{what}: {e}"))
}

/// One attestation.
pub(super) struct Claim {
    pub id: String,
    pub attestation: Attestation,
}

/// The attestations of `process` from `from` to `to` (not every nonce need have one) by `signer`.
pub(super) struct Claims {
    pub process: String,
    pub signer: String,
    pub from: u64,
    pub to: u64,
    pub by_nonce: BTreeMap<u64, Claim>,
}

impl Claims {
    /// The claim at `to` (always present).
    pub fn last_claim(&self) -> &Claim {
        self.by_nonce.get(&self.to).expect("collect() puts the claim at `to`")
    }
}

/// Fetches an attestation by id from the gateway (which checks the id) and verifies it.
async fn fetch(units: &Units, id: &str) -> Result<(String, Attestation), Missing> {
    let item = units.gateway.item(id).await.map_err(|e| net_missing(&format!("attestation {id}"), &e))?;
    item.verify().map_err(|e| Missing::new(format!("attestation {id}: its signature does not verify ({e})")))?;
    let attestation = Attestation::from_item(&item).map_err(|e| Missing::new(e.to_string()))?;
    Ok((item.owner_address(), attestation))
}

pub(super) async fn collect(units: &Units, target: &Target) -> Result<Claims, Missing> {
    match target {
        Target::Attestation { id, from } => {
            let (signer, attestation) = fetch(units, id).await?;
            let to = attestation.nonce;
            let from = from.unwrap_or(0).min(to);
            let mut claims = Claims { process: attestation.process.clone(), signer, from, to, by_nonce: BTreeMap::new() };
            let mut previous = attestation.v2.as_ref().and_then(|v| v.previous_attestation.clone());
            let mut nonce = to;
            claims.by_nonce.insert(to, Claim { id: id.clone(), attestation });
            while nonce > from {
                let Some(prev) = previous.take() else { break };
                let (signer, attestation) = fetch(units, &prev).await?;
                if signer != claims.signer || attestation.process != claims.process || attestation.nonce >= nonce {
                    return Err(Missing::new(format!(
                        "the attestation chain is broken at {prev}: signer {signer}, process {}, nonce {} (after nonce {nonce} by {})",
                        attestation.process, attestation.nonce, claims.signer
                    )));
                }
                if attestation.nonce < from {
                    break;
                }
                nonce = attestation.nonce;
                previous = attestation.v2.as_ref().and_then(|v| v.previous_attestation.clone());
                claims.by_nonce.insert(nonce, Claim { id: prev, attestation });
            }
            Ok(claims)
        }
        Target::Range { process, from, to, attestations } => {
            let range = Range { by_nonce: true, limit: Some(100), ..Range::default() };
            let nodes = units
                .scheduler
                .all(attestations, range)
                .await
                .map_err(|e| net_missing(&format!("the attestations on {attestations}"), &e))?;
            let mut found: Vec<(String, Claim)> = Vec::new();
            for message in nodes.iter().filter_map(|n| n.message.as_ref()) {
                if message.tag("Action") != Some(ACTION) || message.tag("Process") != Some(process.as_str()) {
                    continue;
                }
                // A forged item on the target is not the worker's claim: skipped.
                let Ok(item) = verify::signed_json(message, "attestation") else { continue };
                let Ok(attestation) = Attestation::from_item(&item) else { continue };
                if (*from..=*to).contains(&attestation.nonce) {
                    found.push((item.owner_address(), Claim { id: item.id(), attestation }));
                }
            }
            let Some(signer) = found.iter().find(|(_, c)| c.attestation.nonce == *to).map(|(s, _)| s.clone()) else {
                return Err(Missing::new(format!(
                    "no attestation of process {process} at nonce {to} among the messages of {attestations}"
                )));
            };
            let mut by_nonce = BTreeMap::new();
            for (s, claim) in found {
                if s == signer {
                    by_nonce.entry(claim.attestation.nonce).or_insert(claim);
                }
            }
            Ok(Claims { process: process.clone(), signer, from: *from, to: *to, by_nonce })
        }
    }
}

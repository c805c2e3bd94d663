//! The worker's durable journal (redb, in the data dir): which processes it serves, how far
//! each has been evaluated, the state after the last message (content-addressed, compressed),
//! every result, and every item still to be posted.
//!
//! Invariant: one evaluated message is one transaction — its result, the new state, the
//! process's progress and the items it must post are committed together or not at all. A
//! crash at any instant therefore resumes at a message boundary, and items are posted from
//! the journal until the network confirms them, so nothing is lost or evaluated twice; and
//! because every posted item is signed once and its bytes are what is re-posted (the same id on
//! every re-post, even for RSA-PSS, whose signatures are randomized), nothing is duplicated.
//! The capacity advertisement in flight is journaled the same way (signed, stored, then posted).

use std::path::Path;
use std::sync::Arc;

use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::protocol::su::page_bounds;

mod dead_letters;
mod halts;
mod retention;
pub use dead_letters::{DeadLetter, DeadLetterOutcome};
pub use halts::{Halt, RegistryLink};
pub use retention::{CompactStats, RetentionPolicy};

/// Process id → JSON [`Served`].
const SERVED: TableDefinition<&str, &[u8]> = TableDefinition::new("served");
/// Process id → JSON [`Progress`].
const PROGRESS: TableDefinition<&str, &[u8]> = TableDefinition::new("progress");
/// sha256 hex of a memory image → lz4-compressed image.
const STATES: TableDefinition<&str, &[u8]> = TableDefinition::new("states");
/// sha256 hex of a memory image → how many processes' progress points at it.
const STATE_REFS: TableDefinition<&str, u64> = TableDefinition::new("state_refs");
/// (process, nonce) → JSON [`ResultRecord`].
const RESULTS: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("results");
/// Message id → (process, nonce).
const RESULT_INDEX: TableDefinition<&str, (&str, u64)> = TableDefinition::new("result_index");
/// Posting order → item id, for items not yet confirmed.
const PENDING: TableDefinition<u64, &str> = TableDefinition::new("pending");
/// Item id → JSON [`Outgoing`] (kept after confirmation, for audits and re-pushes).
const OUTGOING: TableDefinition<&str, &[u8]> = TableDefinition::new("outgoing");
/// Item id → its posting-order key while pending.
const PENDING_KEY: TableDefinition<&str, u64> = TableDefinition::new("pending_key");
/// Counters and cursors.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// [`ADVERTISEMENT`] → the signed bytes of the capacity advertisement not yet accepted.
const ADVERTS: TableDefinition<&str, &[u8]> = TableDefinition::new("advertisement");
const ADVERTISEMENT: &str = "pending";

const NEXT_SEQ: &str = "next_pending_seq";
const REGISTRY_CURSOR: &str = "registry_cursor";

/// Why the journal failed. Any of these stops the affected work: the journal is the truth.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("journal storage: {0}")]
    Storage(String),
    #[error("journal is corrupt: {0}")]
    Corrupt(String),
}

fn st(e: impl std::fmt::Display) -> JournalError {
    JournalError::Storage(e.to_string())
}

fn corrupt(e: impl std::fmt::Display) -> JournalError {
    JournalError::Corrupt(e.to_string())
}

/// A process this worker serves, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Served {
    pub process: String,
    /// `config` for processes listed in the configuration, else the id of the
    /// `Assign-Workload` message.
    pub assigned_by: String,
}

/// How far a process has been evaluated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    /// Nonce of the last evaluated message.
    pub nonce: u64,
    /// `Hash-Chain` and id of that message's assignment: the next one must chain from them.
    pub hash_chain: String,
    pub assignment: String,
    /// The state after it: the sha256 hex of the memory, or for a checkpointed process (below)
    /// between checkpoints a commitment chained from the checkpoint's (see `runtime::live`);
    /// `None` before the first successful evaluation.
    pub state_hash: Option<String>,
    pub timestamp: u64,
    /// For processes whose state is checkpointed (aos: ~110 MB of memory, not stored per
    /// message): the latest state whose image the journal holds. The messages after it are
    /// replayed to rebuild `state_hash`. `None`: the image of every state is stored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<Checkpoint>,
    /// The id of the attestation of that message: the next attestation names it as its
    /// `Previous-Attestation` (kept here so the chain survives restarts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attestation: Option<String>,
}

/// A stored state of a checkpointed process: the image after message `after` (`None`: a fresh
/// boot, before the process's first message), whose memory hashes to `state_hash` (`None` with a
/// fresh boot).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub after: Option<u64>,
    pub state_hash: Option<String>,
}

impl Progress {
    /// The hash of the image the journal holds for this progress.
    fn stored_hash(&self) -> Option<&str> {
        match &self.checkpoint {
            Some(c) => c.state_hash.as_deref(),
            None => self.state_hash.as_deref(),
        }
    }
}

/// What rebuilds a process's state: the stored image (`None`: a fresh boot) with its hash, and the
/// message JSON of every message evaluated since, in order (empty unless checkpointed).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StateSource {
    pub image: Option<Vec<u8>>,
    pub image_hash: Option<String>,
    pub replay: Vec<String>,
}

/// The result of one evaluated message, as the compute-unit API serves it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResultRecord {
    pub process: String,
    pub message: String,
    pub nonce: u64,
    pub timestamp: u64,
    pub block_height: u64,
    /// `{Output, Messages, Spawns, Assignments, Error?, GasUsed}`.
    pub response: serde_json::Value,
    /// sha256 hex of the message item, of the canonical result JSON, of the state after.
    pub message_hash: String,
    pub result_hash: String,
    pub state_hash: Option<String>,
    pub gas_used: u64,
    /// Ids of the items posted for this message (outbox, spawns, attestation).
    pub posted: Vec<String>,
    /// For a checkpointed process: the message JSON exactly as evaluated, to replay it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replay: Option<String>,
    /// The op trace (one leaf per `ao_gpu` call) whose root the attestation binds; `None` in
    /// records written before attestation v2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace: Option<crate::attest::trace::Trace>,
}

/// What kind of item the worker posts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OutKind {
    Message,
    Spawn,
    Attestation,
}

/// An item to post through the messenger.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outgoing {
    pub id: String,
    pub kind: OutKind,
    pub process: String,
    pub nonce: u64,
    #[serde(with = "b64_bytes")]
    pub bytes: Vec<u8>,
    pub confirmed: bool,
    /// Why the network refused it for good, if it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused: Option<String>,
}

mod b64_bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&crate::protocol::b64::encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        crate::protocol::b64::decode(&text).map_err(serde::de::Error::custom)
    }
}

/// Where a process stands: its progress and what rebuilds the state that goes with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LatestState {
    pub progress: Progress,
    /// The stored image (`None` before the first successful evaluation) and, for a checkpointed
    /// process, the messages to replay on it.
    pub source: StateSource,
}

/// Everything one evaluated message changes, committed atomically.
pub struct Commit<'a> {
    pub progress: &'a Progress,
    pub result: &'a ResultRecord,
    /// The new memory image when the evaluation succeeded (its hash is `progress.state_hash`).
    pub state: Option<&'a [u8]>,
    pub outgoing: &'a [Outgoing],
}

/// A stored (compressed) memory image, decompressed and checked against its hash.
fn decode_state(hash: &str, stored: &[u8]) -> Result<Vec<u8>, JournalError> {
    let image = lz4_flex::decompress_size_prepended(stored).map_err(|e| corrupt(format!("state {hash}: {e}")))?;
    if sha256_hex(&image) != hash {
        return Err(corrupt(format!("state {hash} does not match its hash")));
    }
    Ok(image)
}

/// sha256 hex of bytes.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

#[derive(Clone)]
pub struct Journal {
    db: Arc<Database>,
}

impl Journal {
    pub fn open(path: &Path) -> Result<Self, JournalError> {
        let db = Database::create(path).map_err(st)?;
        let j = Self { db: Arc::new(db) };
        let tx = j.db.begin_write().map_err(st)?;
        tx.open_table(SERVED).map_err(st)?;
        tx.open_table(PROGRESS).map_err(st)?;
        tx.open_table(STATES).map_err(st)?;
        tx.open_table(STATE_REFS).map_err(st)?;
        tx.open_table(RESULTS).map_err(st)?;
        tx.open_table(RESULT_INDEX).map_err(st)?;
        tx.open_table(PENDING).map_err(st)?;
        tx.open_table(OUTGOING).map_err(st)?;
        tx.open_table(PENDING_KEY).map_err(st)?;
        tx.open_table(META).map_err(st)?;
        tx.open_table(ADVERTS).map_err(st)?;
        tx.open_table(halts::HALTS).map_err(st)?;
        tx.open_table(dead_letters::DEAD_LETTERS).map_err(st)?;
        tx.open_table(halts::REGISTRY_LINK).map_err(st)?;
        tx.commit().map_err(st)?;
        Ok(j)
    }

    // ---- served processes and the registry cursor ----

    /// Processes served now, in id order.
    pub fn served(&self) -> Result<Vec<Served>, JournalError> {
        let tx = self.db.begin_read().map_err(st)?;
        let t = tx.open_table(SERVED).map_err(st)?;
        let mut out = Vec::new();
        for row in t.iter().map_err(st)? {
            let (_, v) = row.map_err(st)?;
            out.push(serde_json::from_slice(v.value()).map_err(corrupt)?);
        }
        Ok(out)
    }

    /// Nonce of the last registry message applied, if any.
    pub fn registry_cursor(&self) -> Result<Option<u64>, JournalError> {
        self.meta(REGISTRY_CURSOR)
    }

    /// Applies one registry entry atomically: moves the cursor to `nonce` (and the chain link to
    /// its assignment, when given) and adds or removes a served process (or neither, for an
    /// ignored entry).
    pub fn apply_registry(&self, nonce: u64, link: Option<&RegistryLink>, change: Option<RegistryChange<'_>>) -> Result<(), JournalError> {
        let tx = self.db.begin_write().map_err(st)?;
        {
            if let Some(link) = link {
                let v = serde_json::to_vec(link).map_err(corrupt)?;
                tx.open_table(halts::REGISTRY_LINK).map_err(st)?.insert(halts::LINK, v.as_slice()).map_err(st)?;
            }
            let mut served = tx.open_table(SERVED).map_err(st)?;
            match change {
                Some(RegistryChange::Serve(s)) => {
                    let v = serde_json::to_vec(s).map_err(corrupt)?;
                    served.insert(s.process.as_str(), v.as_slice()).map_err(st)?;
                }
                Some(RegistryChange::Release(p)) => {
                    served.remove(p).map_err(st)?;
                }
                None => {}
            }
            tx.open_table(META).map_err(st)?.insert(REGISTRY_CURSOR, nonce).map_err(st)?;
        }
        tx.commit().map_err(st)
    }

    /// Serves a process listed in the configuration (no registry cursor involved).
    pub fn serve(&self, s: &Served) -> Result<(), JournalError> {
        let tx = self.db.begin_write().map_err(st)?;
        {
            let v = serde_json::to_vec(s).map_err(corrupt)?;
            tx.open_table(SERVED).map_err(st)?.insert(s.process.as_str(), v.as_slice()).map_err(st)?;
        }
        tx.commit().map_err(st)
    }

    // ---- evaluation ----

    pub fn progress(&self, process: &str) -> Result<Option<Progress>, JournalError> {
        let tx = self.db.begin_read().map_err(st)?;
        let t = tx.open_table(PROGRESS).map_err(st)?;
        let Some(v) = t.get(process).map_err(st)? else { return Ok(None) };
        serde_json::from_slice(v.value()).map(Some).map_err(corrupt)
    }

    /// A memory image by hash, decompressed and checked against its hash.
    pub fn state(&self, hash: &str) -> Result<Option<Vec<u8>>, JournalError> {
        let tx = self.db.begin_read().map_err(st)?;
        let t = tx.open_table(STATES).map_err(st)?;
        let Some(v) = t.get(hash).map_err(st)? else { return Ok(None) };
        decode_state(hash, v.value()).map(Some)
    }

    /// The process's progress and what rebuilds its state (the stored image and, for a
    /// checkpointed process, the messages since it), read in one transaction so that a commit in
    /// between cannot drop the image.
    pub fn latest_state(&self, process: &str) -> Result<Option<LatestState>, JournalError> {
        let tx = self.db.begin_read().map_err(st)?;
        let t = tx.open_table(PROGRESS).map_err(st)?;
        let Some(v) = t.get(process).map_err(st)? else { return Ok(None) };
        let progress: Progress = serde_json::from_slice(v.value()).map_err(corrupt)?;
        let source = Self::source_in(&tx, process, &progress)?;
        Ok(Some(LatestState { progress, source }))
    }

    /// What rebuilds the state after `progress` of `process` (see [`StateSource`]).
    pub fn state_source(&self, process: &str, progress: &Progress) -> Result<StateSource, JournalError> {
        let tx = self.db.begin_read().map_err(st)?;
        Self::source_in(&tx, process, progress)
    }

    fn source_in(tx: &redb::ReadTransaction, process: &str, progress: &Progress) -> Result<StateSource, JournalError> {
        let image_hash = progress.stored_hash().map(str::to_owned);
        let image = match &image_hash {
            Some(hash) => {
                let states = tx.open_table(STATES).map_err(st)?;
                let stored =
                    states.get(hash.as_str()).map_err(st)?.ok_or_else(|| corrupt(format!("state {hash} missing for {process}")))?;
                Some(decode_state(hash, stored.value())?)
            }
            None => None,
        };
        let mut replay = Vec::new();
        if let Some(c) = &progress.checkpoint {
            let results = tx.open_table(RESULTS).map_err(st)?;
            let from = c.after.map_or(0, |n| n + 1);
            if from <= progress.nonce {
                for row in results.range((process, from)..=(process, progress.nonce)).map_err(st)? {
                    let (key, value) = row.map_err(st)?;
                    let record: ResultRecord = serde_json::from_slice(value.value()).map_err(corrupt)?;
                    let msg =
                        record.replay.ok_or_else(|| corrupt(format!("result {} of {process} has no message to replay", key.value().1)))?;
                    replay.push(msg);
                }
            }
        }
        Ok(StateSource { image, image_hash, replay })
    }

    /// Commits one evaluated message. Refuses a commit that does not follow the recorded
    /// progress (a bug upstream, never papered over).
    pub fn commit(&self, c: &Commit<'_>) -> Result<(), JournalError> {
        let process = c.result.process.as_str();
        let tx = self.db.begin_write().map_err(st)?;
        {
            let mut progress = tx.open_table(PROGRESS).map_err(st)?;
            let previous: Option<Progress> =
                progress.get(process).map_err(st)?.map(|v| serde_json::from_slice(v.value())).transpose().map_err(corrupt)?;
            if let Some(p) = previous.as_ref().filter(|p| c.progress.nonce <= p.nonce) {
                return Err(corrupt(format!("commit of nonce {} after nonce {} for {process}", c.progress.nonce, p.nonce)));
            }
            // Content-addressed state with reference counts: identical images are stored once,
            // and an image no process points at any more is dropped.
            let old_hash = previous.as_ref().and_then(|p| p.stored_hash().map(str::to_owned));
            let new_hash = c.progress.stored_hash().map(str::to_owned);
            if old_hash != new_hash {
                let mut refs = tx.open_table(STATE_REFS).map_err(st)?;
                let mut states = tx.open_table(STATES).map_err(st)?;
                if let Some(h) = &new_hash {
                    let n = refs.get(h.as_str()).map_err(st)?.map(|v| v.value()).unwrap_or(0);
                    if n == 0 {
                        let image = c.state.ok_or_else(|| corrupt(format!("new state {h} committed without its image")))?;
                        states.insert(h.as_str(), lz4_flex::compress_prepend_size(image).as_slice()).map_err(st)?;
                    }
                    refs.insert(h.as_str(), n + 1).map_err(st)?;
                }
                if let Some(h) = &old_hash {
                    let n = refs.get(h.as_str()).map_err(st)?.map(|v| v.value()).unwrap_or(0);
                    if n <= 1 {
                        refs.remove(h.as_str()).map_err(st)?;
                        states.remove(h.as_str()).map_err(st)?;
                    } else {
                        refs.insert(h.as_str(), n - 1).map_err(st)?;
                    }
                }
            }
            let v = serde_json::to_vec(c.progress).map_err(corrupt)?;
            progress.insert(process, v.as_slice()).map_err(st)?;

            let v = serde_json::to_vec(c.result).map_err(corrupt)?;
            tx.open_table(RESULTS).map_err(st)?.insert((process, c.result.nonce), v.as_slice()).map_err(st)?;
            tx.open_table(RESULT_INDEX).map_err(st)?.insert(c.result.message.as_str(), (process, c.result.nonce)).map_err(st)?;

            let mut meta = tx.open_table(META).map_err(st)?;
            let mut seq = meta.get(NEXT_SEQ).map_err(st)?.map(|v| v.value()).unwrap_or(0);
            let mut pending = tx.open_table(PENDING).map_err(st)?;
            let mut pending_key = tx.open_table(PENDING_KEY).map_err(st)?;
            let mut outgoing = tx.open_table(OUTGOING).map_err(st)?;
            for item in c.outgoing {
                if outgoing.get(item.id.as_str()).map_err(st)?.is_some() {
                    continue; // the same (ed25519, deterministic) item from an earlier evaluation
                }
                let v = serde_json::to_vec(item).map_err(corrupt)?;
                outgoing.insert(item.id.as_str(), v.as_slice()).map_err(st)?;
                pending.insert(seq, item.id.as_str()).map_err(st)?;
                pending_key.insert(item.id.as_str(), seq).map_err(st)?;
                seq += 1;
            }
            meta.insert(NEXT_SEQ, seq).map_err(st)?;
        }
        tx.commit().map_err(st)
    }

    // ---- results ----

    pub fn result_by_message(&self, message: &str) -> Result<Option<ResultRecord>, JournalError> {
        let tx = self.db.begin_read().map_err(st)?;
        let index = tx.open_table(RESULT_INDEX).map_err(st)?;
        let Some(loc) = index.get(message).map_err(st)? else { return Ok(None) };
        let (process, nonce) = loc.value();
        let results = tx.open_table(RESULTS).map_err(st)?;
        let Some(v) = results.get((process, nonce)).map_err(st)? else { return Ok(None) };
        serde_json::from_slice(v.value()).map(Some).map_err(corrupt)
    }

    /// Results of a process with nonce in `(from, to]`, ascending or descending, at most `limit`.
    pub fn results(
        &self,
        process: &str,
        from: Option<u64>,
        to: Option<u64>,
        limit: usize,
        descending: bool,
    ) -> Result<Vec<ResultRecord>, JournalError> {
        let Some((lo, hi)) = page_bounds(from, to) else { return Ok(Vec::new()) };
        let tx = self.db.begin_read().map_err(st)?;
        let t = tx.open_table(RESULTS).map_err(st)?;
        let range = t.range((process, lo)..=(process, hi)).map_err(st)?;
        let rows: Box<dyn Iterator<Item = _>> = if descending { Box::new(range.rev()) } else { Box::new(range) };
        let mut out = Vec::new();
        for row in rows.take(limit) {
            let (_, v) = row.map_err(st)?;
            out.push(serde_json::from_slice(v.value()).map_err(corrupt)?);
        }
        Ok(out)
    }

    // ---- posting ----

    /// Items not yet confirmed, in the order they were committed.
    pub fn pending(&self, limit: usize) -> Result<Vec<Outgoing>, JournalError> {
        let tx = self.db.begin_read().map_err(st)?;
        let pending = tx.open_table(PENDING).map_err(st)?;
        let outgoing = tx.open_table(OUTGOING).map_err(st)?;
        let mut out = Vec::new();
        for row in pending.iter().map_err(st)?.take(limit) {
            let (_, id) = row.map_err(st)?;
            let id = id.value();
            let v = outgoing.get(id).map_err(st)?.ok_or_else(|| corrupt(format!("pending item {id} has no body")))?;
            out.push(serde_json::from_slice(v.value()).map_err(corrupt)?);
        }
        Ok(out)
    }

    /// Number of items waiting to be posted.
    pub fn pending_count(&self) -> Result<u64, JournalError> {
        let tx = self.db.begin_read().map_err(st)?;
        tx.open_table(PENDING).map_err(st)?.len().map_err(st)
    }

    /// Marks an item as accepted by the network; idempotent.
    pub fn confirm(&self, id: &str) -> Result<(), JournalError> {
        self.settle(id, None)
    }

    /// Sets an item aside that the network refused for good: a dead letter, kept with the
    /// reason (see `dead_letters`).
    pub fn refuse(&self, id: &str, reason: &str) -> Result<(), JournalError> {
        self.dead_letter(id, reason)
    }

    fn settle(&self, id: &str, refused: Option<&str>) -> Result<(), JournalError> {
        let tx = self.db.begin_write().map_err(st)?;
        {
            let mut pending_key = tx.open_table(PENDING_KEY).map_err(st)?;
            let seq = pending_key.remove(id).map_err(st)?.map(|v| v.value());
            if let Some(seq) = seq {
                tx.open_table(PENDING).map_err(st)?.remove(seq).map_err(st)?;
                let mut outgoing = tx.open_table(OUTGOING).map_err(st)?;
                let record = outgoing.get(id).map_err(st)?.map(|v| v.value().to_vec());
                if let Some(bytes) = record {
                    let mut item: Outgoing = serde_json::from_slice(&bytes).map_err(corrupt)?;
                    item.confirmed = refused.is_none();
                    item.refused = refused.map(str::to_owned);
                    let v = serde_json::to_vec(&item).map_err(corrupt)?;
                    outgoing.insert(id, v.as_slice()).map_err(st)?;
                }
            }
        }
        tx.commit().map_err(st)
    }

    /// An item the worker posted or will post.
    pub fn outgoing(&self, id: &str) -> Result<Option<Outgoing>, JournalError> {
        let tx = self.db.begin_read().map_err(st)?;
        let t = tx.open_table(OUTGOING).map_err(st)?;
        let Some(v) = t.get(id).map_err(st)? else { return Ok(None) };
        serde_json::from_slice(v.value()).map(Some).map_err(corrupt)
    }

    // ---- the capacity advertisement in flight ----

    /// Keeps a signed advertisement until the network accepts it: stored before its first
    /// post, so a retry (or a restart) re-posts these bytes instead of signing anew.
    pub fn stash_advertisement(&self, bytes: &[u8]) -> Result<(), JournalError> {
        let tx = self.db.begin_write().map_err(st)?;
        tx.open_table(ADVERTS).map_err(st)?.insert(ADVERTISEMENT, bytes).map_err(st)?;
        tx.commit().map_err(st)
    }

    /// The signed advertisement not yet accepted, if any.
    pub fn pending_advertisement(&self) -> Result<Option<Vec<u8>>, JournalError> {
        let tx = self.db.begin_read().map_err(st)?;
        let t = tx.open_table(ADVERTS).map_err(st)?;
        Ok(t.get(ADVERTISEMENT).map_err(st)?.map(|v| v.value().to_vec()))
    }

    /// Forgets the advertisement in flight (accepted, or refused for good).
    pub fn clear_advertisement(&self) -> Result<(), JournalError> {
        let tx = self.db.begin_write().map_err(st)?;
        tx.open_table(ADVERTS).map_err(st)?.remove(ADVERTISEMENT).map_err(st)?;
        tx.commit().map_err(st)
    }

    fn meta(&self, key: &str) -> Result<Option<u64>, JournalError> {
        let tx = self.db.begin_read().map_err(st)?;
        let t = tx.open_table(META).map_err(st)?;
        Ok(t.get(key).map_err(st)?.map(|v| v.value()))
    }
}

/// A change to the set of served processes, from the registry.
pub enum RegistryChange<'a> {
    Serve(&'a Served),
    Release(&'a str),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(process: &str, nonce: u64, state_hash: Option<String>, posted: Vec<String>) -> ResultRecord {
        ResultRecord {
            process: process.into(),
            message: format!("msg-{process}-{nonce}"),
            nonce,
            timestamp: 1000 + nonce,
            block_height: 1,
            response: serde_json::json!({"Output": format!("n={nonce}")}),
            message_hash: "m".into(),
            result_hash: "r".into(),
            state_hash,
            gas_used: nonce * 10,
            posted,
            replay: None,
            trace: None,
        }
    }

    fn out(id: &str, process: &str, nonce: u64) -> Outgoing {
        Outgoing {
            id: id.into(),
            kind: OutKind::Message,
            process: process.into(),
            nonce,
            bytes: id.as_bytes().to_vec(),
            confirmed: false,
            refused: None,
        }
    }

    fn commit(j: &Journal, process: &str, nonce: u64, image: Option<&[u8]>, items: &[Outgoing]) {
        let state_hash = image.map(sha256_hex).or_else(|| j.progress(process).unwrap().and_then(|p| p.state_hash));
        let progress = Progress {
            nonce,
            hash_chain: format!("hc{nonce}"),
            assignment: format!("a{nonce}"),
            state_hash: state_hash.clone(),
            timestamp: nonce,
            checkpoint: None,
            attestation: None,
        };
        let result = record(process, nonce, state_hash, items.iter().map(|i| i.id.clone()).collect());
        j.commit(&Commit { progress: &progress, result: &result, state: image, outgoing: items }).unwrap();
    }

    #[test]
    fn commits_are_durable_and_ordered() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.redb");
        {
            let j = Journal::open(&path).unwrap();
            commit(&j, "p", 0, Some(&[1u8; 4096]), &[out("a", "p", 0), out("b", "p", 0)]);
            commit(&j, "p", 1, Some(&[2u8; 4096]), &[out("c", "p", 1)]);
            let err = j.commit(&Commit {
                progress: &Progress {
                    nonce: 1,
                    hash_chain: String::new(),
                    assignment: String::new(),
                    state_hash: None,
                    timestamp: 0,
                    checkpoint: None,
                    attestation: None,
                },
                result: &record("p", 1, None, vec![]),
                state: None,
                outgoing: &[],
            });
            assert!(matches!(err, Err(JournalError::Corrupt(_))), "replaying a nonce is refused");
        }
        let j = Journal::open(&path).unwrap();
        let p = j.progress("p").unwrap().unwrap();
        assert_eq!(p.nonce, 1);
        assert_eq!(j.state(p.state_hash.as_deref().unwrap()).unwrap().unwrap(), vec![2u8; 4096]);
        assert_eq!(j.state(&sha256_hex(&[1u8; 4096])).unwrap(), None, "replaced state is dropped");
        let ids: Vec<_> = j.pending(10).unwrap().into_iter().map(|o| o.id).collect();
        assert_eq!(ids, ["a", "b", "c"]);
        j.confirm("b").unwrap();
        j.confirm("b").unwrap();
        let ids: Vec<_> = j.pending(10).unwrap().into_iter().map(|o| o.id).collect();
        assert_eq!(ids, ["a", "c"]);
        assert!(j.outgoing("b").unwrap().unwrap().confirmed);
        assert_eq!(j.result_by_message("msg-p-1").unwrap().unwrap().gas_used, 10);
        let asc: Vec<_> = j.results("p", None, None, 10, false).unwrap().into_iter().map(|r| r.nonce).collect();
        let desc: Vec<_> = j.results("p", None, None, 10, true).unwrap().into_iter().map(|r| r.nonce).collect();
        assert_eq!((asc, desc), (vec![0, 1], vec![1, 0]));
        assert_eq!(j.results("p", Some(0), None, 10, false).unwrap().len(), 1);
    }

    #[test]
    fn the_latest_state_comes_with_its_progress() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(&dir.path().join("j.redb")).unwrap();
        assert_eq!(j.latest_state("p").unwrap(), None);
        commit(&j, "p", 0, None, &[]);
        let LatestState { progress, source } = j.latest_state("p").unwrap().unwrap();
        assert_eq!((progress.nonce, source), (0, StateSource::default()), "no successful evaluation yet");
        commit(&j, "p", 1, Some(&[4u8; 100]), &[]);
        commit(&j, "p", 2, None, &[]);
        let LatestState { progress, source } = j.latest_state("p").unwrap().unwrap();
        assert_eq!((progress.nonce, source.image), (2, Some(vec![4u8; 100])), "a failed evaluation keeps the state");
        assert!(source.replay.is_empty());
    }

    /// A checkpointed process stores an image only at its checkpoints; its state source is the
    /// last checkpoint's image plus the messages since, in order, failed ones included.
    #[test]
    fn checkpointed_processes_keep_the_last_image_and_the_messages_since() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(&dir.path().join("j.redb")).unwrap();
        let step = |nonce: u64, state: &str, image: Option<&[u8]>, checkpoint: Checkpoint| {
            let progress = Progress {
                nonce,
                hash_chain: format!("hc{nonce}"),
                assignment: format!("a{nonce}"),
                state_hash: Some(state.to_owned()),
                timestamp: nonce,
                checkpoint: Some(checkpoint),
                attestation: None,
            };
            let result = ResultRecord { replay: Some(format!("msg{nonce}")), ..record("p", nonce, Some(state.to_owned()), vec![]) };
            j.commit(&Commit { progress: &progress, result: &result, state: image, outgoing: &[] }).unwrap();
            progress
        };
        let fresh = Checkpoint { after: None, state_hash: None };
        let p0 = step(0, "chain0", None, fresh.clone());
        let p1 = step(1, "chain1", None, fresh.clone());
        assert_eq!(j.state_source("p", &p0).unwrap(), StateSource { image: None, image_hash: None, replay: vec!["msg0".into()] });
        assert_eq!(j.state_source("p", &p1).unwrap().replay, ["msg0", "msg1"], "from a fresh boot, every message");
        let image = vec![5u8; 1000];
        let h = sha256_hex(&image);
        let cp = Checkpoint { after: Some(2), state_hash: Some(h.clone()) };
        let p2 = step(2, &h, Some(&image), cp.clone());
        assert_eq!(
            j.state_source("p", &p2).unwrap(),
            StateSource { image: Some(image.clone()), image_hash: Some(h.clone()), replay: vec![] }
        );
        step(3, "chain3", None, cp.clone());
        let p4 = step(4, "chain3", None, cp.clone());
        let source = j.state_source("p", &p4).unwrap();
        assert_eq!((source.image.as_deref(), source.replay), (Some(image.as_slice()), vec!["msg3".to_owned(), "msg4".to_owned()]));
        // A new checkpoint replaces the image; the old one is dropped.
        let next = vec![6u8; 1000];
        let h2 = sha256_hex(&next);
        step(5, &h2, Some(&next), Checkpoint { after: Some(5), state_hash: Some(h2.clone()) });
        assert_eq!(j.state(&h).unwrap(), None);
        assert_eq!(j.latest_state("p").unwrap().unwrap().source.image, Some(next));
        // A checkpoint without its image is refused.
        let progress = Progress { nonce: 6, checkpoint: Some(Checkpoint { after: Some(6), state_hash: Some("x".into()) }), ..p4 };
        let result = record("p", 6, None, vec![]);
        assert!(j.commit(&Commit { progress: &progress, result: &result, state: None, outgoing: &[] }).is_err());
    }

    #[test]
    fn identical_states_are_stored_once_and_shared() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(&dir.path().join("j.redb")).unwrap();
        let image = vec![7u8; 65536];
        commit(&j, "p1", 0, Some(&image), &[]);
        commit(&j, "p2", 0, Some(&image), &[]);
        commit(&j, "p1", 1, Some(&[8u8; 10]), &[]);
        assert_eq!(j.state(&sha256_hex(&image)).unwrap().unwrap(), image, "still referenced by p2");
        commit(&j, "p2", 1, Some(&[9u8; 10]), &[]);
        assert_eq!(j.state(&sha256_hex(&image)).unwrap(), None, "dropped once unreferenced");
        // A failed evaluation keeps the previous state.
        commit(&j, "p2", 2, None, &[]);
        assert_eq!(j.progress("p2").unwrap().unwrap().state_hash, Some(sha256_hex(&[9u8; 10])));
    }

    #[test]
    fn a_reevaluated_item_is_not_queued_twice() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(&dir.path().join("j.redb")).unwrap();
        commit(&j, "p", 0, None, &[out("x", "p", 0)]);
        j.confirm("x").unwrap();
        commit(&j, "q", 0, None, &[out("x", "q", 0)]);
        assert!(j.pending(10).unwrap().is_empty());
    }

    #[test]
    fn registry_changes_move_the_cursor_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(&dir.path().join("j.redb")).unwrap();
        assert_eq!(j.registry_cursor().unwrap(), None);
        let s = Served { process: "p".into(), assigned_by: "m1".into() };
        j.apply_registry(3, None, Some(RegistryChange::Serve(&s))).unwrap();
        j.apply_registry(4, None, None).unwrap();
        assert_eq!(j.served().unwrap(), vec![s]);
        j.apply_registry(5, None, Some(RegistryChange::Release("p"))).unwrap();
        assert!(j.served().unwrap().is_empty());
        assert_eq!(j.registry_cursor().unwrap(), Some(5));
    }

    #[test]
    fn a_tampered_state_is_reported_not_used() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(&dir.path().join("j.redb")).unwrap();
        commit(&j, "p", 0, Some(&[1, 2, 3]), &[]);
        let h = sha256_hex(&[1, 2, 3]);
        {
            let tx = j.db.begin_write().unwrap();
            tx.open_table(STATES).unwrap().insert(h.as_str(), lz4_flex::compress_prepend_size(&[9, 9, 9]).as_slice()).unwrap();
            tx.commit().unwrap();
        }
        assert!(matches!(j.state(&h), Err(JournalError::Corrupt(_))));
    }
}

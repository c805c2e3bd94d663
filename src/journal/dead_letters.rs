//! The dead-letter table: outbox items (messages, spawns, attestations) the network refused for
//! good. An item goes there, with the reason, in the same transaction that takes it off the
//! pending queue; it stays (across restarts) until an operator retries it (back onto the queue,
//! at its end) or drops it (kept, marked dropped, never posted). Nothing refused is forgotten:
//! `ao-gpu-worker outbox list|retry|drop` and the `outbox_dead_letters` metric read it.

use redb::{ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};

use super::{Journal, JournalError, META, NEXT_SEQ, OUTGOING, OutKind, Outgoing, PENDING, PENDING_KEY, corrupt, st};

/// Item id → JSON [`DeadLetter`].
pub(super) const DEAD_LETTERS: TableDefinition<&str, &[u8]> = TableDefinition::new("dead_letters");

/// An outbox item the network refused for good.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetter {
    pub id: String,
    pub kind: OutKind,
    pub process: String,
    pub nonce: u64,
    /// The refusal, e.g. `400: Bad Request: ...`.
    pub reason: String,
    /// When it was refused (ms since the epoch).
    pub at_ms: u64,
    /// When an operator dropped it, if one did: it is kept, and never posted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dropped_at_ms: Option<u64>,
}

/// What an operator asked of a dead letter, and what happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadLetterOutcome {
    Done,
    NotFound,
    /// `retry` of an item already dropped, or `drop` twice.
    AlreadyDropped,
}

impl Journal {
    /// Takes `id` off the pending queue and keeps it as a dead letter with `reason`; idempotent
    /// (a second refusal keeps the first). An id that is not pending is left as it is.
    pub fn dead_letter(&self, id: &str, reason: &str) -> Result<(), JournalError> {
        let tx = self.db.begin_write().map_err(st)?;
        {
            let mut pending_key = tx.open_table(PENDING_KEY).map_err(st)?;
            let Some(seq) = pending_key.remove(id).map_err(st)?.map(|v| v.value()) else {
                drop(pending_key);
                return tx.commit().map_err(st);
            };
            tx.open_table(PENDING).map_err(st)?.remove(seq).map_err(st)?;
            let mut outgoing = tx.open_table(OUTGOING).map_err(st)?;
            let bytes = outgoing.get(id).map_err(st)?.map(|v| v.value().to_vec());
            let Some(bytes) = bytes else { return Err(corrupt(format!("pending item {id} has no body"))) };
            let mut item: Outgoing = serde_json::from_slice(&bytes).map_err(corrupt)?;
            item.confirmed = false;
            item.refused = Some(reason.to_owned());
            outgoing.insert(id, serde_json::to_vec(&item).map_err(corrupt)?.as_slice()).map_err(st)?;
            let letter = DeadLetter {
                id: id.to_owned(),
                kind: item.kind,
                process: item.process,
                nonce: item.nonce,
                reason: reason.to_owned(),
                at_ms: crate::clock::now_ms(),
                dropped_at_ms: None,
            };
            let mut letters = tx.open_table(DEAD_LETTERS).map_err(st)?;
            if letters.get(id).map_err(st)?.is_none() {
                letters.insert(id, serde_json::to_vec(&letter).map_err(corrupt)?.as_slice()).map_err(st)?;
            }
        }
        tx.commit().map_err(st)
    }

    /// Every dead letter, dropped ones included, oldest first.
    pub fn dead_letters(&self) -> Result<Vec<DeadLetter>, JournalError> {
        let tx = self.db.begin_read().map_err(st)?;
        let t = tx.open_table(DEAD_LETTERS).map_err(st)?;
        let mut out: Vec<DeadLetter> = Vec::new();
        for row in t.iter().map_err(st)? {
            let (_, v) = row.map_err(st)?;
            out.push(serde_json::from_slice(v.value()).map_err(corrupt)?);
        }
        out.sort_by(|a, b| (a.at_ms, &a.id).cmp(&(b.at_ms, &b.id)));
        Ok(out)
    }

    /// Dead letters not dropped: what the `outbox_dead_letters` metric counts.
    pub fn dead_letter_count(&self) -> Result<u64, JournalError> {
        let tx = self.db.begin_read().map_err(st)?;
        let t = tx.open_table(DEAD_LETTERS).map_err(st)?;
        if t.is_empty().map_err(st)? {
            return Ok(0);
        }
        let mut n = 0;
        for row in t.iter().map_err(st)? {
            let (_, v) = row.map_err(st)?;
            let letter: DeadLetter = serde_json::from_slice(v.value()).map_err(corrupt)?;
            n += u64::from(letter.dropped_at_ms.is_none());
        }
        Ok(n)
    }

    /// Puts a dead letter back on the pending queue (at its end), the same signed bytes, and
    /// takes it out of the table.
    pub fn retry_dead_letter(&self, id: &str) -> Result<DeadLetterOutcome, JournalError> {
        let tx = self.db.begin_write().map_err(st)?;
        let outcome = {
            let mut letters = tx.open_table(DEAD_LETTERS).map_err(st)?;
            match live_letter(&letters, id)? {
                Err(outcome) => outcome,
                Ok(_) => {
                    letters.remove(id).map_err(st)?;
                    let mut outgoing = tx.open_table(OUTGOING).map_err(st)?;
                    let body = outgoing.get(id).map_err(st)?.map(|v| v.value().to_vec());
                    let Some(body) = body else { return Err(corrupt(format!("dead letter {id} has no body"))) };
                    let mut item: Outgoing = serde_json::from_slice(&body).map_err(corrupt)?;
                    item.refused = None;
                    outgoing.insert(id, serde_json::to_vec(&item).map_err(corrupt)?.as_slice()).map_err(st)?;
                    let mut meta = tx.open_table(META).map_err(st)?;
                    let seq = meta.get(NEXT_SEQ).map_err(st)?.map(|v| v.value()).unwrap_or(0);
                    tx.open_table(PENDING).map_err(st)?.insert(seq, id).map_err(st)?;
                    tx.open_table(PENDING_KEY).map_err(st)?.insert(id, seq).map_err(st)?;
                    meta.insert(NEXT_SEQ, seq + 1).map_err(st)?;
                    DeadLetterOutcome::Done
                }
            }
        };
        tx.commit().map_err(st)?;
        Ok(outcome)
    }

    /// Marks a dead letter dropped: kept, listed, never posted, no longer counted.
    pub fn drop_dead_letter(&self, id: &str) -> Result<DeadLetterOutcome, JournalError> {
        let tx = self.db.begin_write().map_err(st)?;
        let outcome = {
            let mut letters = tx.open_table(DEAD_LETTERS).map_err(st)?;
            match live_letter(&letters, id)? {
                Err(outcome) => outcome,
                Ok(mut letter) => {
                    letter.dropped_at_ms = Some(crate::clock::now_ms());
                    letters.insert(id, serde_json::to_vec(&letter).map_err(corrupt)?.as_slice()).map_err(st)?;
                    DeadLetterOutcome::Done
                }
            }
        };
        tx.commit().map_err(st)?;
        Ok(outcome)
    }

    /// The ids waiting to be posted, oldest first, at most `limit` (no bodies: cheap to scan).
    pub fn pending_ids(&self, limit: usize) -> Result<Vec<String>, JournalError> {
        let tx = self.db.begin_read().map_err(st)?;
        let pending = tx.open_table(PENDING).map_err(st)?;
        let mut out = Vec::new();
        for row in pending.iter().map_err(st)?.take(limit) {
            let (_, id) = row.map_err(st)?;
            out.push(id.value().to_owned());
        }
        Ok(out)
    }
}

/// The dead letter `id` when it is live (not dropped); otherwise the outcome to answer.
fn live_letter(letters: &redb::Table<&str, &[u8]>, id: &str) -> Result<Result<DeadLetter, DeadLetterOutcome>, JournalError> {
    let Some(bytes) = letters.get(id).map_err(st)?.map(|v| v.value().to_vec()) else { return Ok(Err(DeadLetterOutcome::NotFound)) };
    let letter: DeadLetter = serde_json::from_slice(&bytes).map_err(corrupt)?;
    Ok(if letter.dropped_at_ms.is_some() { Err(DeadLetterOutcome::AlreadyDropped) } else { Ok(letter) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::{Commit, Progress, ResultRecord};

    fn commit_one(j: &Journal, ids: &[&str]) {
        let outgoing: Vec<Outgoing> = ids
            .iter()
            .map(|id| Outgoing {
                id: (*id).into(),
                kind: OutKind::Message,
                process: "P".into(),
                nonce: 0,
                bytes: vec![1, 2, 3],
                confirmed: false,
                refused: None,
            })
            .collect();
        let progress = Progress {
            nonce: 0,
            hash_chain: "h".into(),
            assignment: "a".into(),
            state_hash: None,
            timestamp: 1,
            checkpoint: None,
            attestation: None,
        };
        let result = ResultRecord {
            process: "P".into(),
            message: "M".into(),
            nonce: 0,
            timestamp: 1,
            block_height: 1,
            response: serde_json::json!({}),
            message_hash: String::new(),
            result_hash: String::new(),
            state_hash: None,
            gas_used: 0,
            posted: ids.iter().map(|s| (*s).to_owned()).collect(),
            replay: None,
            trace: None,
        };
        j.commit(&Commit { progress: &progress, result: &result, state: None, outgoing: &outgoing }).unwrap();
    }

    #[test]
    fn dead_letters_survive_a_reopen_and_can_be_retried_or_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.redb");
        {
            let j = Journal::open(&path).unwrap();
            commit_one(&j, &["A", "B", "C"]);
            j.dead_letter("A", "400: bad").unwrap();
            j.dead_letter("A", "400: later").unwrap();
            j.dead_letter("B", "403: no").unwrap();
            assert_eq!(j.pending_ids(10).unwrap(), ["C"]);
        }
        let j = Journal::open(&path).unwrap();
        let letters = j.dead_letters().unwrap();
        assert_eq!(letters.iter().map(|l| (l.id.as_str(), l.reason.as_str())).collect::<Vec<_>>(), [("A", "400: bad"), ("B", "403: no")]);
        assert_eq!(j.dead_letter_count().unwrap(), 2);
        assert_eq!(j.outgoing("A").unwrap().unwrap().refused.as_deref(), Some("400: bad"));

        assert_eq!(j.retry_dead_letter("A").unwrap(), DeadLetterOutcome::Done);
        assert_eq!(j.pending_ids(10).unwrap(), ["C", "A"], "retried at the end of the queue");
        assert_eq!(j.outgoing("A").unwrap().unwrap().refused, None);
        assert_eq!(j.retry_dead_letter("A").unwrap(), DeadLetterOutcome::NotFound);

        assert_eq!(j.drop_dead_letter("B").unwrap(), DeadLetterOutcome::Done);
        assert_eq!(j.drop_dead_letter("B").unwrap(), DeadLetterOutcome::AlreadyDropped);
        assert_eq!(j.retry_dead_letter("B").unwrap(), DeadLetterOutcome::AlreadyDropped);
        assert_eq!(j.dead_letter_count().unwrap(), 0, "a dropped letter is not counted");
        assert!(j.dead_letters().unwrap()[0].dropped_at_ms.is_some(), "but it is kept");
        assert_eq!(j.pending_count().unwrap(), 2);
    }
}

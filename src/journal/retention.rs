//! Retention: compaction deletes the results a [`RetentionPolicy`] no longer keeps, with their
//! message-index entries and the posted items that belong only to them. Whatever the policy says,
//! it ALWAYS keeps what the compute-unit API, recovery and verification need:
//! - the latest result of every process, and its progress and state (states are never touched
//!   here: the journal holds only the latest image, or checkpoint, per process);
//! - for a checkpointed (aos) process, every result after its last checkpoint: their `replay`
//!   messages rebuild the state on the checkpoint image;
//! - items not yet posted (pending) and dead letters (refused items, with their bodies, which
//!   `outbox retry` re-posts); an item is deleted only when confirmed and made by that result;
//! - the attestation the process's progress names (the next one chains from it).
//!
//! The verifier re-executes from the schedule, not from the journal, so it needs nothing more.
//! Each process is compacted in batches of at most [`BATCH`] results, one write transaction per
//! batch, so the work loop never waits on compaction for long.

use std::time::Duration;

use redb::{ReadableDatabase, ReadableTable, WriteTransaction};

use super::dead_letters::DEAD_LETTERS;
use super::{Journal, JournalError, OUTGOING, Outgoing, PENDING_KEY, PROGRESS, Progress, RESULT_INDEX, RESULTS, ResultRecord, corrupt, st};

/// Results deleted per write transaction.
pub const BATCH: usize = 256;

/// What the journal keeps per process (the `[retention]` section).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetentionPolicy {
    /// Results kept per process, newest first; 0 keeps all.
    pub keep_results: u64,
    /// Results whose message timestamp is older than this go too; `None`: no age limit.
    pub max_age: Option<Duration>,
}

impl RetentionPolicy {
    /// True when the policy deletes nothing.
    pub fn keeps_all(&self) -> bool {
        self.keep_results == 0 && self.max_age.is_none()
    }
}

/// What one compaction deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CompactStats {
    /// Processes looked at.
    pub processes: u64,
    /// Result records deleted (with their message-index entries).
    pub results: u64,
    /// Posted (confirmed) outgoing items deleted.
    pub items: u64,
    /// Write transactions committed.
    pub batches: u64,
}

impl Journal {
    /// Deletes, for every process with progress, the results `policy` no longer keeps (see the
    /// module doc for what is always kept). `now_ms` is compared with the results' message
    /// timestamps (ms since the epoch). Safe to run while the work loop commits: each batch is
    /// its own transaction and re-reads the progress.
    pub fn compact(&self, now_ms: u64, policy: &RetentionPolicy) -> Result<CompactStats, JournalError> {
        let mut stats = CompactStats::default();
        if policy.keeps_all() {
            return Ok(stats);
        }
        let processes: Vec<String> = {
            let tx = self.db.begin_read().map_err(st)?;
            let t = tx.open_table(PROGRESS).map_err(st)?;
            let mut out = Vec::new();
            for row in t.iter().map_err(st)? {
                out.push(row.map_err(st)?.0.value().to_owned());
            }
            out
        };
        for process in processes {
            stats.processes += 1;
            loop {
                let tx = self.db.begin_write().map_err(st)?;
                let (results, items) = compact_batch(&tx, &process, now_ms, policy)?;
                tx.commit().map_err(st)?;
                stats.batches += 1;
                stats.results += results;
                stats.items += items;
                if results < BATCH as u64 {
                    break;
                }
            }
        }
        Ok(stats)
    }
}

/// Deletes up to [`BATCH`] results of `process` in `tx`; returns (results, items) deleted.
fn compact_batch(tx: &WriteTransaction, process: &str, now_ms: u64, policy: &RetentionPolicy) -> Result<(u64, u64), JournalError> {
    let progress: Progress = {
        let t = tx.open_table(PROGRESS).map_err(st)?;
        let Some(v) = t.get(process).map_err(st)? else { return Ok((0, 0)) };
        serde_json::from_slice(v.value()).map_err(corrupt)?
    };
    // Results at or after `protected` are always kept: the latest, and for a checkpointed process
    // every one after the checkpoint (all of them after a fresh boot: `after` is `None`).
    let protected = match &progress.checkpoint {
        Some(c) => c.after.map_or(0, |n| n.saturating_add(1)).min(progress.nonce),
        None => progress.nonce,
    };
    if protected == 0 {
        return Ok((0, 0));
    }
    let mut results = tx.open_table(RESULTS).map_err(st)?;
    // Results before `by_count` are beyond `keep_results`.
    let by_count = match policy.keep_results {
        0 => 0,
        n => {
            let mut newest = results.range((process, 0)..=(process, u64::MAX)).map_err(st)?.rev();
            match newest.nth(usize::try_from(n - 1).unwrap_or(usize::MAX)) {
                Some(row) => row.map_err(st)?.0.value().1,
                None => 0,
            }
        }
    };
    let max_age_ms = policy.max_age.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    let mut doomed: Vec<ResultRecord> = Vec::new();
    for row in results.range((process, 0)..(process, protected)).map_err(st)? {
        let (key, value) = row.map_err(st)?;
        let nonce = key.value().1;
        let record: ResultRecord = serde_json::from_slice(value.value()).map_err(corrupt)?;
        let too_old = max_age_ms.is_some_and(|age| record.timestamp.saturating_add(age) < now_ms);
        // Nonces and timestamps grow together: the first result kept by both limits ends the scan.
        if nonce >= by_count && !too_old {
            break;
        }
        doomed.push(record);
        if doomed.len() == BATCH {
            break;
        }
    }
    let mut index = tx.open_table(RESULT_INDEX).map_err(st)?;
    let mut outgoing = tx.open_table(OUTGOING).map_err(st)?;
    let pending_key = tx.open_table(PENDING_KEY).map_err(st)?;
    let letters = tx.open_table(DEAD_LETTERS).map_err(st)?;
    let mut items = 0;
    for record in &doomed {
        results.remove((process, record.nonce)).map_err(st)?;
        let indexed = index.get(record.message.as_str()).map_err(st)?.map(|v| v.value() == (process, record.nonce));
        if indexed == Some(true) {
            index.remove(record.message.as_str()).map_err(st)?;
        }
        for id in &record.posted {
            if progress.attestation.as_deref() == Some(id.as_str())
                || pending_key.get(id.as_str()).map_err(st)?.is_some()
                || letters.get(id.as_str()).map_err(st)?.is_some()
            {
                continue;
            }
            let item = outgoing.get(id.as_str()).map_err(st)?.map(|v| serde_json::from_slice::<Outgoing>(v.value())).transpose();
            let Some(item) = item.map_err(corrupt)? else { continue };
            // Only a confirmed item this very result made: an identical item of another
            // evaluation (deterministic signatures) is still that one's record.
            if item.confirmed && item.refused.is_none() && item.process == process && item.nonce == record.nonce {
                outgoing.remove(id.as_str()).map_err(st)?;
                items += 1;
            }
        }
    }
    Ok((doomed.len() as u64, items))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::{Checkpoint, Commit, OutKind, sha256_hex};

    const DAY_MS: u64 = 86_400_000;

    fn item(id: &str, process: &str, nonce: u64) -> Outgoing {
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

    /// Commits message `nonce` of `process` at `timestamp`, with a new image unless checkpointed
    /// (`checkpoint`), posting one item `<process>-<nonce>`.
    fn step(j: &Journal, process: &str, nonce: u64, timestamp: u64, checkpoint: Option<Checkpoint>, image: Option<&[u8]>) -> String {
        let id = format!("{process}-{nonce}");
        let state_hash = match (&checkpoint, image) {
            (None, Some(i)) => Some(sha256_hex(i)),
            _ => Some(format!("chain{nonce}")),
        };
        let progress = Progress {
            nonce,
            hash_chain: format!("hc{nonce}"),
            assignment: format!("a{nonce}"),
            state_hash: state_hash.clone(),
            timestamp,
            checkpoint: checkpoint.clone(),
            attestation: None,
        };
        let result = ResultRecord {
            process: process.into(),
            message: format!("msg-{process}-{nonce}"),
            nonce,
            timestamp,
            block_height: 1,
            response: serde_json::json!({"Output": format!("n={nonce}")}),
            message_hash: "m".into(),
            result_hash: "r".into(),
            state_hash,
            gas_used: 1,
            posted: vec![id.clone()],
            replay: checkpoint.as_ref().map(|_| format!("replay{nonce}")),
            trace: None,
        };
        j.commit(&Commit { progress: &progress, result: &result, state: image, outgoing: &[item(&id, process, nonce)] }).unwrap();
        id
    }

    fn nonces(j: &Journal, process: &str) -> Vec<u64> {
        j.results(process, None, None, 1000, false).unwrap().into_iter().map(|r| r.nonce).collect()
    }

    fn keep(n: u64) -> RetentionPolicy {
        RetentionPolicy { keep_results: n, max_age: None }
    }

    /// Old results go by count, with their index entries and their confirmed items; the latest
    /// result, progress and state stay, and compaction runs in bounded batches.
    #[test]
    fn old_results_go_and_the_latest_state_stays() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(&dir.path().join("j.redb")).unwrap();
        let n = BATCH as u64 + 50;
        for nonce in 0..n {
            let id = step(&j, "p", nonce, 1000 + nonce, None, Some(&nonce.to_le_bytes()));
            j.confirm(&id).unwrap();
        }
        let stats = j.compact(0, &keep(3)).unwrap();
        assert_eq!((stats.processes, stats.results, stats.items), (1, n - 3, n - 3));
        assert!(stats.batches >= 2, "more than one batch: {stats:?}");
        assert_eq!(nonces(&j, "p"), [n - 3, n - 2, n - 1]);
        assert_eq!(j.result_by_message("msg-p-0").unwrap(), None);
        assert_eq!(j.outgoing("p-0").unwrap(), None);
        assert!(j.result_by_message(&format!("msg-p-{}", n - 1)).unwrap().is_some());
        assert!(j.outgoing(&format!("p-{}", n - 3)).unwrap().is_some());
        let latest = j.latest_state("p").unwrap().unwrap();
        assert_eq!((latest.progress.nonce, latest.source.image), (n - 1, Some((n - 1).to_le_bytes().to_vec())));
        assert_eq!(j.compact(0, &keep(3)).unwrap().results, 0, "idempotent");
        // keep_results = 1 still keeps the latest; keep all deletes nothing.
        assert_eq!(j.compact(0, &keep(0)).unwrap(), CompactStats::default());
        j.compact(0, &keep(1)).unwrap();
        assert_eq!(nonces(&j, "p"), [n - 1]);
        // The journal goes on committing after compaction.
        step(&j, "p", n, 5000, None, Some(b"next"));
        assert_eq!(nonces(&j, "p"), [n - 1, n]);
    }

    /// By age: results older than max_age go, but never the latest, however old.
    #[test]
    fn old_results_go_by_age_but_never_the_latest() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(&dir.path().join("j.redb")).unwrap();
        for nonce in 0..5 {
            step(&j, "p", nonce, nonce * DAY_MS, None, Some(&[nonce as u8]));
        }
        let policy = RetentionPolicy { keep_results: 0, max_age: Some(Duration::from_millis(2 * DAY_MS)) };
        j.compact(4 * DAY_MS, &policy).unwrap();
        assert_eq!(nonces(&j, "p"), [2, 3, 4]);
        j.compact(100 * DAY_MS, &policy).unwrap();
        assert_eq!(nonces(&j, "p"), [4], "the latest result is kept however old");
    }

    /// A checkpointed process keeps its checkpoint image and every result after it (their replay
    /// messages), whatever keep_results says; the state still rebuilds.
    #[test]
    fn a_checkpointed_process_keeps_its_checkpoint_and_replay_tail() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(&dir.path().join("j.redb")).unwrap();
        let fresh = Checkpoint { after: None, state_hash: None };
        for nonce in 0..3 {
            step(&j, "a", nonce, nonce, Some(fresh.clone()), None);
        }
        j.compact(0, &keep(1)).unwrap();
        assert_eq!(nonces(&j, "a"), [0, 1, 2], "from a fresh boot every message is replayed");
        let image = vec![3u8; 512];
        let h = sha256_hex(&image);
        let cp = Checkpoint { after: Some(3), state_hash: Some(h.clone()) };
        {
            // The checkpoint commit carries the image.
            let progress = Progress {
                nonce: 3,
                hash_chain: "hc3".into(),
                assignment: "a3".into(),
                state_hash: Some(h.clone()),
                timestamp: 3,
                checkpoint: Some(cp.clone()),
                attestation: None,
            };
            let mut result = j.results("a", None, None, 1, true).unwrap().remove(0);
            (result.nonce, result.message, result.posted, result.replay) = (3, "msg-a-3".into(), vec![], Some("replay3".into()));
            j.commit(&Commit { progress: &progress, result: &result, state: Some(&image), outgoing: &[] }).unwrap();
        }
        for nonce in 4..8 {
            step(&j, "a", nonce, nonce, Some(cp.clone()), None);
        }
        let before = j.latest_state("a").unwrap().unwrap().source;
        j.compact(0, &keep(1)).unwrap();
        assert_eq!(nonces(&j, "a"), [4, 5, 6, 7], "the replay tail after the checkpoint stays");
        let after = j.latest_state("a").unwrap().unwrap().source;
        assert_eq!(after, before);
        assert_eq!((after.image, after.replay.len()), (Some(image), 4));
    }

    /// Items not yet posted and dead letters survive the compaction of their results; so does
    /// the attestation the progress names.
    #[test]
    fn pending_items_and_dead_letters_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(&dir.path().join("j.redb")).unwrap();
        let pending = step(&j, "p", 0, 0, None, Some(b"0"));
        let refused = step(&j, "p", 1, 1, None, Some(b"1"));
        let posted = step(&j, "p", 2, 2, None, Some(b"2"));
        step(&j, "p", 3, 3, None, Some(b"3"));
        j.refuse(&refused, "400: Bad Request").unwrap();
        j.confirm(&posted).unwrap();
        let stats = j.compact(0, &keep(1)).unwrap();
        assert_eq!((stats.results, stats.items), (3, 1));
        assert_eq!(nonces(&j, "p"), [3]);
        assert_eq!(j.pending(10).unwrap().into_iter().map(|o| o.id).collect::<Vec<_>>(), [pending.clone(), "p-3".to_owned()]);
        assert!(j.outgoing(&pending).unwrap().is_some());
        assert!(j.outgoing(&refused).unwrap().is_some(), "a dead letter keeps its body");
        assert_eq!(j.dead_letters().unwrap().len(), 1);
        assert_eq!(j.retry_dead_letter(&refused).unwrap(), crate::journal::DeadLetterOutcome::Done);
        assert_eq!(j.pending(10).unwrap().len(), 3, "and can still be retried");
        assert_eq!(j.outgoing(&posted).unwrap(), None, "a posted item of a deleted result goes");
    }
}

//! The devnet's durable storage (redb): the gateway's items and the scheduler's processes,
//! schedules and indexes. Every scheduling step is one transaction, so a crash leaves
//! either the whole assignment or none of it.

use std::path::Path;
use std::sync::Arc;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::protocol::su::page_bounds;

/// Gateway: item id → signed item bytes.
const GATEWAY_ITEMS: TableDefinition<&str, &[u8]> = TableDefinition::new("gateway_items");
/// Gateway: item id → upload time (ms).
const GATEWAY_TIMES: TableDefinition<&str, u64> = TableDefinition::new("gateway_times");
/// Scheduler: message or process id → signed item bytes.
const SU_ITEMS: TableDefinition<&str, &[u8]> = TableDefinition::new("su_items");
/// Scheduler: process id → JSON [`ProcessState`].
const SU_PROCESSES: TableDefinition<&str, &[u8]> = TableDefinition::new("su_processes");
/// Scheduler: (process, nonce) → JSON [`Entry`].
const SU_SCHEDULE: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("su_schedule");
/// Scheduler: (process, timestamp) → nonce; timestamps are strictly increasing per process.
const SU_BY_TIME: TableDefinition<(&str, u64), u64> = TableDefinition::new("su_by_time");
/// Scheduler: message id → (process, nonce).
const SU_MESSAGES: TableDefinition<&str, (&str, u64)> = TableDefinition::new("su_messages");
/// Devnet metadata: registry id, genesis time.
const META: TableDefinition<&str, &str> = TableDefinition::new("meta");

/// Storage failure: the devnet answers 500 and changes nothing.
#[derive(Debug, thiserror::Error)]
#[error("devnet storage: {0}")]
pub struct StoreError(String);

impl From<StoreError> for crate::httpd::ApiError {
    fn from(e: StoreError) -> Self {
        tracing::error!(error = %e, "devnet storage failed");
        Self::new(axum::http::StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
    }
}

fn se(e: impl std::fmt::Display) -> StoreError {
    StoreError(e.to_string())
}

/// A process's scheduling state: where its hash chain and clock stand.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessState {
    pub next_nonce: u64,
    pub last_assignment: String,
    pub last_hash_chain: String,
    pub last_timestamp: u64,
    /// Block height and time of the process's own assignment.
    pub block_height: u64,
    pub timestamp: u64,
}

/// One entry of a schedule: the message (or, at nonce 0, the process) and its assignment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub message_id: Option<String>,
    pub assignment: String,
    pub timestamp: u64,
}

/// A write the scheduler commits atomically: a new entry and everything it updates.
pub struct Scheduled<'a> {
    pub process: &'a str,
    pub nonce: u64,
    pub entry: &'a Entry,
    pub message: Option<(&'a str, &'a [u8])>,
    pub assignment_bytes: &'a [u8],
    pub state: &'a ProcessState,
    /// The process item, when this entry spawns the process.
    pub process_item: Option<&'a [u8]>,
}

#[derive(Clone)]
pub struct Store {
    db: Arc<Database>,
}

impl Store {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = Database::create(path).map_err(se)?;
        let store = Self { db: Arc::new(db) };
        // Create every table up front so readers never meet a missing table.
        let tx = store.db.begin_write().map_err(se)?;
        tx.open_table(GATEWAY_ITEMS).map_err(se)?;
        tx.open_table(GATEWAY_TIMES).map_err(se)?;
        tx.open_table(SU_ITEMS).map_err(se)?;
        tx.open_table(SU_PROCESSES).map_err(se)?;
        tx.open_table(SU_SCHEDULE).map_err(se)?;
        tx.open_table(SU_BY_TIME).map_err(se)?;
        tx.open_table(SU_MESSAGES).map_err(se)?;
        tx.open_table(META).map_err(se)?;
        tx.commit().map_err(se)?;
        Ok(store)
    }

    pub fn meta(&self, key: &str) -> Result<Option<String>, StoreError> {
        let tx = self.db.begin_read().map_err(se)?;
        let t = tx.open_table(META).map_err(se)?;
        Ok(t.get(key).map_err(se)?.map(|v| v.value().to_owned()))
    }

    pub fn set_meta(&self, key: &str, value: &str) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(se)?;
        tx.open_table(META).map_err(se)?.insert(key, value).map_err(se)?;
        tx.commit().map_err(se)
    }

    // ---- gateway ----

    /// Stores an item; returns its upload time (the first one, if it was already stored).
    pub fn gateway_put(&self, id: &str, bytes: &[u8], now_ms: u64) -> Result<u64, StoreError> {
        let tx = self.db.begin_write().map_err(se)?;
        let time = {
            let mut times = tx.open_table(GATEWAY_TIMES).map_err(se)?;
            let existing = times.get(id).map_err(se)?.map(|v| v.value());
            match existing {
                Some(t) => t,
                None => {
                    times.insert(id, now_ms).map_err(se)?;
                    tx.open_table(GATEWAY_ITEMS).map_err(se)?.insert(id, bytes).map_err(se)?;
                    now_ms
                }
            }
        };
        tx.commit().map_err(se)?;
        Ok(time)
    }

    pub fn gateway_get(&self, id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let tx = self.db.begin_read().map_err(se)?;
        let t = tx.open_table(GATEWAY_ITEMS).map_err(se)?;
        Ok(t.get(id).map_err(se)?.map(|v| v.value().to_vec()))
    }

    // ---- scheduler ----

    pub fn su_item(&self, id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let tx = self.db.begin_read().map_err(se)?;
        let t = tx.open_table(SU_ITEMS).map_err(se)?;
        Ok(t.get(id).map_err(se)?.map(|v| v.value().to_vec()))
    }

    pub fn process_state(&self, process: &str) -> Result<Option<ProcessState>, StoreError> {
        let tx = self.db.begin_read().map_err(se)?;
        let t = tx.open_table(SU_PROCESSES).map_err(se)?;
        let Some(v) = t.get(process).map_err(se)? else { return Ok(None) };
        serde_json::from_slice(v.value()).map(Some).map_err(se)
    }

    /// Where a message was scheduled: (process, nonce).
    pub fn message_location(&self, message: &str) -> Result<Option<(String, u64)>, StoreError> {
        let tx = self.db.begin_read().map_err(se)?;
        let t = tx.open_table(SU_MESSAGES).map_err(se)?;
        Ok(t.get(message).map_err(se)?.map(|v| {
            let (p, n) = v.value();
            (p.to_owned(), n)
        }))
    }

    pub fn entry(&self, process: &str, nonce: u64) -> Result<Option<Entry>, StoreError> {
        let tx = self.db.begin_read().map_err(se)?;
        let t = tx.open_table(SU_SCHEDULE).map_err(se)?;
        let Some(v) = t.get((process, nonce)).map_err(se)? else { return Ok(None) };
        serde_json::from_slice(v.value()).map(Some).map_err(se)
    }

    /// Up to `limit` entries with nonce in `(from, to]`, in nonce order.
    pub fn entries_by_nonce(
        &self,
        process: &str,
        from: Option<u64>,
        to: Option<u64>,
        limit: usize,
    ) -> Result<Vec<(u64, Entry)>, StoreError> {
        let Some((lo, hi)) = page_bounds(from, to) else { return Ok(Vec::new()) };
        let tx = self.db.begin_read().map_err(se)?;
        let t = tx.open_table(SU_SCHEDULE).map_err(se)?;
        let mut out = Vec::new();
        for row in t.range((process, lo)..=(process, hi)).map_err(se)?.take(limit) {
            let (k, v) = row.map_err(se)?;
            out.push((k.value().1, serde_json::from_slice(v.value()).map_err(se)?));
        }
        Ok(out)
    }

    /// Up to `limit` entries with timestamp in `(from, to]`, in order.
    pub fn entries_by_time(
        &self,
        process: &str,
        from: Option<u64>,
        to: Option<u64>,
        limit: usize,
    ) -> Result<Vec<(u64, Entry)>, StoreError> {
        let Some((lo, hi)) = page_bounds(from, to) else { return Ok(Vec::new()) };
        let tx = self.db.begin_read().map_err(se)?;
        let by_time = tx.open_table(SU_BY_TIME).map_err(se)?;
        let schedule = tx.open_table(SU_SCHEDULE).map_err(se)?;
        let mut out = Vec::new();
        for row in by_time.range((process, lo)..=(process, hi)).map_err(se)?.take(limit) {
            let (_, nonce) = row.map_err(se)?;
            let nonce = nonce.value();
            let v = schedule
                .get((process, nonce))
                .map_err(se)?
                .ok_or_else(|| StoreError(format!("index points at missing entry {process}/{nonce}")))?;
            out.push((nonce, serde_json::from_slice(v.value()).map_err(se)?));
        }
        Ok(out)
    }

    /// Commits one scheduling step atomically.
    pub fn commit_scheduled(&self, s: &Scheduled<'_>) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(se)?;
        {
            let mut items = tx.open_table(SU_ITEMS).map_err(se)?;
            items.insert(s.entry.assignment.as_str(), s.assignment_bytes).map_err(se)?;
            if let Some((id, bytes)) = s.message {
                items.insert(id, bytes).map_err(se)?;
                tx.open_table(SU_MESSAGES).map_err(se)?.insert(id, (s.process, s.nonce)).map_err(se)?;
            }
            if let Some(bytes) = s.process_item {
                items.insert(s.process, bytes).map_err(se)?;
            }
            let entry = serde_json::to_vec(s.entry).map_err(se)?;
            tx.open_table(SU_SCHEDULE).map_err(se)?.insert((s.process, s.nonce), entry.as_slice()).map_err(se)?;
            tx.open_table(SU_BY_TIME).map_err(se)?.insert((s.process, s.entry.timestamp), s.nonce).map_err(se)?;
            let state = serde_json::to_vec(s.state).map_err(se)?;
            tx.open_table(SU_PROCESSES).map_err(se)?.insert(s.process, state.as_slice()).map_err(se)?;
        }
        tx.commit().map_err(se)
    }
}

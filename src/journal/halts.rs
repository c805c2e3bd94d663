//! Persistent halts and the registry's chain link.
//!
//! A halt is a process (or the registry) that stopped on an error retrying cannot fix: a
//! refused input (a forgery), a module that does not load. It is kept with its reason across
//! restarts, so a forged input is never re-evaluated after one, and the API and metrics report
//! it. The registry link is the id and `Hash-Chain` of the last registry assignment applied:
//! the next one must chain from it (a rewind or a gap is refused).

use std::collections::HashMap;

use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use super::{Journal, JournalError, corrupt, st};

/// Process id (or registry id) → JSON [`Halt`].
pub(super) const HALTS: TableDefinition<&str, &[u8]> = TableDefinition::new("halts");
/// [`LINK`] → JSON [`RegistryLink`].
pub(super) const REGISTRY_LINK: TableDefinition<&str, &[u8]> = TableDefinition::new("registry_link");
pub(super) const LINK: &str = "last";

/// Why a process stopped, and when (ms since the epoch).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Halt {
    pub reason: String,
    pub at_ms: u64,
}

/// The last registry assignment applied: the next must chain from it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegistryLink {
    pub assignment: String,
    pub hash_chain: String,
}

impl Journal {
    /// Records that `process` halted for `reason`. The first reason is kept.
    pub fn halt(&self, process: &str, reason: &str) -> Result<(), JournalError> {
        let tx = self.db.begin_write().map_err(st)?;
        {
            let mut t = tx.open_table(HALTS).map_err(st)?;
            if t.get(process).map_err(st)?.is_none() {
                let v = serde_json::to_vec(&Halt { reason: reason.to_owned(), at_ms: crate::clock::now_ms() }).map_err(corrupt)?;
                t.insert(process, v.as_slice()).map_err(st)?;
            }
        }
        tx.commit().map_err(st)
    }

    /// Clears the halt of `process` (an operator resumed it); true when there was one.
    pub fn unhalt(&self, process: &str) -> Result<bool, JournalError> {
        let tx = self.db.begin_write().map_err(st)?;
        let was = tx.open_table(HALTS).map_err(st)?.remove(process).map_err(st)?.is_some();
        tx.commit().map_err(st)?;
        Ok(was)
    }

    /// Every halted process with its halt.
    pub fn halts(&self) -> Result<HashMap<String, Halt>, JournalError> {
        let tx = self.db.begin_read().map_err(st)?;
        let t = tx.open_table(HALTS).map_err(st)?;
        let mut out = HashMap::new();
        for row in t.iter().map_err(st)? {
            let (k, v) = row.map_err(st)?;
            out.insert(k.value().to_owned(), serde_json::from_slice(v.value()).map_err(corrupt)?);
        }
        Ok(out)
    }

    /// The last registry assignment applied, if it was recorded.
    pub fn registry_link(&self) -> Result<Option<RegistryLink>, JournalError> {
        let tx = self.db.begin_read().map_err(st)?;
        let t = tx.open_table(REGISTRY_LINK).map_err(st)?;
        let Some(v) = t.get(LINK).map_err(st)? else { return Ok(None) };
        serde_json::from_slice(v.value()).map(Some).map_err(corrupt)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn halts_survive_a_reopen_and_keep_their_first_reason() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.redb");
        {
            let j = Journal::open(&path).unwrap();
            assert!(j.halts().unwrap().is_empty());
            j.halt("P", "forged message").unwrap();
            j.halt("P", "later reason").unwrap();
        }
        let j = Journal::open(&path).unwrap();
        let halts = j.halts().unwrap();
        assert_eq!(halts.len(), 1);
        assert_eq!(halts["P"].reason, "forged message");
        assert!(j.unhalt("P").unwrap());
        assert!(!j.unhalt("P").unwrap());
        assert!(j.halts().unwrap().is_empty());
    }
}

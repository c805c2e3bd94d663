//! The `[limits]` keys that bound what one actor or unit can make big (issue 12 §3): the result
//! of an evaluation, its outbox, its module, the module's compilation. A result over a limit is
//! refused with a clear `Error` and rolled back, like a trap.

use std::collections::BTreeMap;
use std::time::Duration;

use super::Validator;

#[derive(Debug, Clone, PartialEq)]
pub struct ActorLimits {
    /// Largest result object (its JSON: Output, Messages, Spawns, Assignments).
    pub max_result_bytes: u64,
    /// Most outbox entries (Messages plus Spawns) of one result.
    pub max_outbox_items: usize,
    /// Largest outbox entry (its JSON).
    pub max_outbox_item_bytes: u64,
    /// Largest module (wasm bytes).
    pub max_module_bytes: u64,
    /// Longest a module's compilation may take; past it the process is halted.
    pub compile_timeout: Duration,
    /// Largest answer read from the scheduler or the messenger (a page of the schedule).
    pub max_unit_answer_bytes: u64,
    /// Largest answer read from the gateway (an item: a module, model weights).
    pub max_item_bytes: u64,
}

impl Default for ActorLimits {
    fn default() -> Self {
        Self {
            max_result_bytes: 8 << 20,
            max_outbox_items: 1000,
            max_outbox_item_bytes: 1 << 20,
            max_module_bytes: 256 << 20,
            compile_timeout: Duration::from_secs(300),
            max_unit_answer_bytes: 64 << 20,
            max_item_bytes: 512 << 20,
        }
    }
}

pub(super) fn parse(v: &mut Validator, s: &mut BTreeMap<String, toml::Value>) -> ActorLimits {
    let size = |v: &mut Validator, s: &mut BTreeMap<String, toml::Value>, key: &str, default: &str, fallback: u64| {
        let text = v.string(s, "limits", key, default, None);
        match crate::runtime::limits::parse_memory_limit(&text) {
            Some(n) if n > 0 => n,
            _ => {
                v.issue(&format!("limits.{key}"), format!("{text:?} is not a size such as 512-kb, 8-mb or 1-gb"));
                fallback
            }
        }
    };
    let d = ActorLimits::default();
    let max_result_bytes = size(v, s, "max_result_bytes", "8-mb", d.max_result_bytes);
    let max_outbox_items = v.integer(s, "limits", "max_outbox_items", 1000, 0, 1_000_000) as usize;
    let max_outbox_item_bytes = size(v, s, "max_outbox_item_bytes", "1-mb", d.max_outbox_item_bytes);
    let max_module_bytes = size(v, s, "max_module_bytes", "256-mb", d.max_module_bytes);
    let compile_timeout = v.duration(s, "limits", "compile_timeout", "300s");
    if compile_timeout.is_zero() {
        v.issue("limits.compile_timeout", "must be greater than 0");
    }
    let max_unit_answer_bytes = size(v, s, "max_unit_answer_bytes", "64-mb", d.max_unit_answer_bytes);
    let max_item_bytes = size(v, s, "max_item_bytes", "512-mb", d.max_item_bytes);
    ActorLimits {
        max_result_bytes,
        max_outbox_items,
        max_outbox_item_bytes,
        max_module_bytes,
        compile_timeout,
        max_unit_answer_bytes,
        max_item_bytes,
    }
}

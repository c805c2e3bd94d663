//! The `[overload]` section: how much work that does not come from the schedule the worker
//! takes on at once (admission control for dry-runs and state reads), and how it recovers from
//! work that cannot make progress. Each key is documented in config/worker.toml and in the
//! README's "Limits, overload and recovery".

use std::collections::BTreeMap;

use super::Validator;
use crate::admission::AdmissionConfig;

#[derive(Debug, Clone, PartialEq)]
pub struct OverloadSection {
    /// Dry-runs and state reads (`POST /dry-run`, `GET /state`).
    pub api: AdmissionConfig,
}

pub(super) fn parse(v: &mut Validator, root: &mut toml::Table) -> OverloadSection {
    let mut s: BTreeMap<String, toml::Value> = v.section(root, "overload");
    let concurrency = v.integer(&mut s, "overload", "api_concurrency", 2, 1, 1024) as usize;
    let queue = v.integer(&mut s, "overload", "api_queue", 32, 0, 1_000_000) as usize;
    let queue_timeout = v.duration(&mut s, "overload", "api_queue_timeout", "10s");
    let budget_text = v.string(&mut s, "overload", "api_memory_budget", "1-gb", None);
    let retry_after = v.duration(&mut s, "overload", "retry_after", "1s");
    v.unknown(s, "overload");
    let memory_budget = match crate::runtime::limits::parse_memory_limit(&budget_text) {
        Some(n) if n >= 1 << 20 => n,
        _ => {
            v.issue("overload.api_memory_budget", format!("{budget_text:?} is not a size of at least 1-mb such as 512-mb or 2-gb"));
            1 << 30
        }
    };
    if queue_timeout.is_zero() {
        v.issue("overload.api_queue_timeout", "must be greater than 0");
    }
    OverloadSection { api: AdmissionConfig { concurrency, queue, queue_timeout, memory_budget, retry_after } }
}

//! The `[overload]` section: how much work that does not come from the schedule the worker
//! takes on at once (admission control for dry-runs and state reads), and how it recovers from
//! work that cannot make progress. Each key is documented in config/worker.toml and in the
//! README's "Limits, overload and recovery".

use std::collections::BTreeMap;
use std::time::Duration;

use super::Validator;
use crate::admission::AdmissionConfig;

#[derive(Debug, Clone, PartialEq)]
pub struct OverloadSection {
    /// Dry-runs and state reads (`POST /dry-run`, `GET /state`).
    pub api: AdmissionConfig,
    pub recovery: RecoveryConfig,
}

/// The `[overload]` keys of recovery and health.
#[derive(Debug, Clone, PartialEq)]
pub struct RecoveryConfig {
    /// Longest wait between two posts of an item that keeps failing.
    pub poster_backoff_max: Duration,
    /// Longest wait between two catch-ups of a process that keeps failing.
    pub process_backoff_max: Duration,
    /// A process failing without a success for this long is halted.
    pub process_halt_after: Duration,
    /// No heartbeat (or no progress) for this long: `/healthz` fails.
    pub stall_after: Duration,
}

impl Default for RecoveryConfig {
    fn default() -> Self {
        Self {
            poster_backoff_max: Duration::from_secs(300),
            process_backoff_max: Duration::from_secs(300),
            process_halt_after: Duration::from_secs(6 * 3600),
            stall_after: Duration::from_secs(180),
        }
    }
}

pub(super) fn parse(v: &mut Validator, root: &mut toml::Table) -> OverloadSection {
    let mut s: BTreeMap<String, toml::Value> = v.section(root, "overload");
    let concurrency = v.integer(&mut s, "overload", "api_concurrency", 2, 1, 1024) as usize;
    let queue = v.integer(&mut s, "overload", "api_queue", 32, 0, 1_000_000) as usize;
    let queue_timeout = v.duration(&mut s, "overload", "api_queue_timeout", "10s");
    let budget_text = v.string(&mut s, "overload", "api_memory_budget", "1-gb", None);
    let retry_after = v.duration(&mut s, "overload", "retry_after", "1s");
    let poster_backoff_max = v.duration(&mut s, "overload", "poster_backoff_max", "5m");
    let process_backoff_max = v.duration(&mut s, "overload", "process_backoff_max", "5m");
    let process_halt_after = v.duration(&mut s, "overload", "process_halt_after", "6h");
    let stall_after = v.duration(&mut s, "overload", "stall_after", "3m");
    v.unknown(s, "overload");
    for (key, d) in [
        ("poster_backoff_max", poster_backoff_max),
        ("process_backoff_max", process_backoff_max),
        ("process_halt_after", process_halt_after),
        ("stall_after", stall_after),
    ] {
        if d.is_zero() {
            v.issue(&format!("overload.{key}"), "must be greater than 0");
        }
    }
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
    OverloadSection {
        api: AdmissionConfig { concurrency, queue, queue_timeout, memory_budget, retry_after },
        recovery: RecoveryConfig { poster_backoff_max, process_backoff_max, process_halt_after, stall_after },
    }
}

#[cfg(test)]
mod tests {
    use crate::config::{Config, Overrides};

    #[test]
    fn overload_keys_have_defaults_and_bad_values_are_reported() {
        let c = Config::parse("t", "", &Overrides::default()).unwrap();
        assert_eq!((c.overload.api.concurrency, c.overload.api.queue, c.overload.api.memory_budget), (2, 32, 1 << 30));
        assert_eq!(c.overload.recovery.process_halt_after, std::time::Duration::from_secs(6 * 3600));
        assert_eq!(c.limits.actor.max_outbox_items, 1000);
        let text = "[overload]\napi_concurrency = 0\napi_memory_budget = \"lots\"\nstall_after = \"0s\"\nbogus = 1\n\
                    [limits]\nmax_result_bytes = \"big\"\ncompile_timeout = \"0s\"\n";
        let e = Config::parse("t", text, &Overrides::default()).unwrap_err();
        let paths: Vec<&str> = e.issues.iter().map(|i| i.path.as_str()).collect();
        for key in [
            "overload.api_concurrency",
            "overload.api_memory_budget",
            "overload.stall_after",
            "overload.bogus",
            "limits.max_result_bytes",
            "limits.compile_timeout",
        ] {
            assert!(paths.contains(&key), "{key} not reported: {paths:?}");
        }
    }
}

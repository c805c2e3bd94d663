//! The `[retention]` section: how many results (with the posted items that belong only to them)
//! the journal keeps per process, and how often compaction runs. What verification and the
//! compute-unit API need is always kept whatever these say (see `journal::retention`). Each key
//! is documented in config/worker.toml.

use std::collections::BTreeMap;
use std::time::Duration;

use super::Validator;
use crate::journal::RetentionPolicy;

/// Default `keep_results`: generous, so that the messenger and clients reading recent results
/// never miss one, while a busy process's journal stays bounded.
pub const DEFAULT_KEEP_RESULTS: u64 = 100_000;

#[derive(Debug, Clone, PartialEq)]
pub struct RetentionSection {
    pub policy: RetentionPolicy,
    /// How often compaction runs.
    pub interval: Duration,
}

impl Default for RetentionSection {
    fn default() -> Self {
        Self { policy: RetentionPolicy { keep_results: DEFAULT_KEEP_RESULTS, max_age: None }, interval: Duration::from_secs(600) }
    }
}

pub(super) fn parse(v: &mut Validator, root: &mut toml::Table) -> RetentionSection {
    let mut s: BTreeMap<String, toml::Value> = v.section(root, "retention");
    let keep_results = v.integer(&mut s, "retention", "keep_results", DEFAULT_KEEP_RESULTS as i64, 0, i64::MAX) as u64;
    let max_age = v.duration(&mut s, "retention", "max_age", "0s");
    let interval = v.duration(&mut s, "retention", "interval", "10m");
    v.unknown(s, "retention");
    if interval < Duration::from_secs(1) {
        v.issue("retention.interval", "must be at least 1s");
    }
    RetentionSection { policy: RetentionPolicy { keep_results, max_age: Some(max_age).filter(|d| !d.is_zero()) }, interval }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::config::{Config, Overrides};

    #[test]
    fn retention_keys_have_defaults_and_bad_values_are_reported() {
        let c = Config::parse("t", "", &Overrides::default()).unwrap();
        assert_eq!((c.retention.policy.keep_results, c.retention.policy.max_age), (super::DEFAULT_KEEP_RESULTS, None));
        assert_eq!(c.retention.interval, Duration::from_secs(600));
        let c = Config::parse("t", "[retention]\nkeep_results = 0\nmax_age = \"30d\"\ninterval = \"5s\"\n", &Overrides::default()).unwrap();
        assert_eq!(c.retention.policy.keep_results, 0);
        assert_eq!(c.retention.policy.max_age, Some(Duration::from_secs(30 * 86400)));
        assert_eq!(c.retention.interval, Duration::from_secs(5));
        let text = "[retention]\nkeep_results = -1\nmax_age = \"long\"\ninterval = \"0s\"\nbogus = 1\n";
        let e = Config::parse("t", text, &Overrides::default()).unwrap_err();
        let paths: Vec<&str> = e.issues.iter().map(|i| i.path.as_str()).collect();
        for key in ["retention.keep_results", "retention.max_age", "retention.interval", "retention.bogus"] {
            assert!(paths.contains(&key), "{key} not reported: {paths:?}");
        }
    }
}

//! `SIGHUP`: the running worker re-reads its configuration file. What can change safely while
//! running is applied: `log.level` here, `registry.authorities` by the caller (it owns the work
//! loop; registry messages read from then on are judged by the new list, as after a restart);
//! every other changed section is named in a warning saying it takes a restart, and keeps its
//! running value. An invalid file changes nothing: the problems are logged and the worker goes on
//! with what it has.

use std::path::Path;

use crate::config::{Config, ConfigError, Overrides, Source};

/// What a re-read configuration changes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    /// Applied while running, as `key: old -> new`.
    pub applied: Vec<String>,
    /// Sections (or keys) whose change takes a restart.
    pub needs_restart: Vec<&'static str>,
}

/// Compares the running configuration with a new one.
pub fn changes(running: &Config, new: &Config) -> Changes {
    let mut c = Changes::default();
    if running.log.level != new.log.level {
        c.applied.push(format!("log.level: {} -> {}", running.log.level, new.log.level));
    }
    if running.registry.authorities != new.registry.authorities {
        c.applied.push(format!(
            "registry.authorities: {} -> {} address(es)",
            running.registry.authorities.len(),
            new.registry.authorities.len()
        ));
    }
    let registry_rest = |r: &crate::config::RegistrySection| crate::config::RegistrySection { authorities: Vec::new(), ..r.clone() };
    let restart: [(&'static str, bool); 9] = [
        ("worker", running.worker != new.worker),
        ("network", running.network != new.network),
        ("registry", registry_rest(&running.registry) != registry_rest(&new.registry)),
        ("jobs", running.jobs != new.jobs),
        ("limits", running.limits != new.limits),
        ("attestation", running.attestation != new.attestation),
        ("api", running.api != new.api),
        ("log.format", running.log.format != new.log.format),
        ("gpu", running.gpu != new.gpu),
    ];
    c.needs_restart = restart.into_iter().filter(|(_, changed)| *changed).map(|(name, _)| name).collect();
    c
}

/// Re-reads `path` (as `run` read it at startup), applies the log level, hands new authorities to
/// `set_authorities`, and logs the rest. Returns the configuration now in force.
pub fn reload(path: Option<&Path>, running: &Config, set_authorities: &dyn Fn(Vec<String>)) -> Result<(Config, Changes), ConfigError> {
    let source = Source::locate(path)?;
    let new = Config::parse(&source.name, &source.text, &Overrides::from_env())?;
    let c = changes(running, &new);
    let mut now = running.clone();
    if running.log.level != new.log.level {
        match crate::logging::set_level(&new.log.level) {
            Ok(()) => now.log.level = new.log.level.clone(),
            Err(e) => tracing::warn!(error = %e, "SIGHUP: log.level not applied"),
        }
    }
    if running.registry.authorities != new.registry.authorities {
        set_authorities(new.registry.authorities.clone());
        now.registry.authorities = new.registry.authorities.clone();
    }
    if c.applied.is_empty() && c.needs_restart.is_empty() {
        tracing::info!(config = %source.name, "SIGHUP: configuration re-read, nothing changed");
    }
    for a in &c.applied {
        tracing::info!(config = %source.name, change = %a, "SIGHUP: applied");
    }
    if !c.needs_restart.is_empty() {
        tracing::warn!(
            config = %source.name,
            sections = ?c.needs_restart,
            "SIGHUP: these changes take a restart (systemctl restart ao-gpu-worker); running with the old values"
        );
    }
    Ok((now, c))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Config {
        Config::parse("t", text, &Overrides::default()).unwrap()
    }

    #[test]
    fn log_level_and_authorities_apply_and_the_rest_takes_a_restart() {
        let old = parse("[log]\nlevel = \"info\"\n");
        let same = changes(&old, &old);
        assert_eq!(same, Changes::default());
        let new = parse(
            "[log]\nlevel = \"debug\"\n[limits]\ndeadline = \"5s\"\n[registry]\nauthorities = [\"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA\"]\n",
        );
        let c = changes(&old, &new);
        assert_eq!(c.applied, vec!["log.level: info -> debug".to_owned(), "registry.authorities: 0 -> 1 address(es)".to_owned()]);
        assert_eq!(c.needs_restart, vec!["limits"]);
        // Authorities unchanged, the poll interval changed: the registry section takes a restart.
        let moved = parse("[registry]\npoll_interval = \"3s\"\nauthorities = [\"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA\"]\n");
        assert_eq!(changes(&new, &moved).needs_restart, vec!["registry", "limits"]);
    }

    #[test]
    fn an_invalid_file_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("w.toml");
        std::fs::write(&file, "[limits]\ndeadline = \"soon\"\n").unwrap();
        let running = parse("");
        let err = reload(Some(&file), &running, &|_| panic!("nothing applies")).unwrap_err();
        assert!(err.to_string().contains("limits.deadline"), "{err}");
    }
}

//! Tracing setup: text or JSON lines on stderr (stdout is for command output), filtered by
//! `AO_WORKER_LOG` or the configured level. The level can be changed while running
//! ([`set_level`], what `SIGHUP` does when `log.level` changed).

use std::sync::OnceLock;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Registry, reload};

use crate::config::{ENV_LOG, LogFormat, LogSection};

static FILTER: OnceLock<reload::Handle<EnvFilter, Registry>> = OnceLock::new();

fn level_filter(level: &str) -> EnvFilter {
    EnvFilter::new(format!("warn,ao_gpu_worker={level}"))
}

/// Installs the global subscriber once; later calls do nothing.
pub fn init(log: &LogSection) {
    let filter = std::env::var(ENV_LOG).ok().and_then(|f| EnvFilter::try_new(f).ok()).unwrap_or_else(|| level_filter(&log.level));
    let (filter, handle) = reload::Layer::new(filter);
    use std::io::IsTerminal;
    let ansi = std::io::stderr().is_terminal();
    let registry = tracing_subscriber::registry().with(filter);
    let installed = match log.format {
        LogFormat::Json => registry.with(tracing_subscriber::fmt::layer().json().with_writer(std::io::stderr)).try_init(),
        LogFormat::Text => registry.with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(ansi)).try_init(),
    };
    if installed.is_ok() {
        let _ = FILTER.set(handle);
    }
}

/// Changes the level of the running subscriber (as `log.level` does at startup). Does nothing,
/// and says so, while `AO_WORKER_LOG` is set: it wins over the configuration.
pub fn set_level(level: &str) -> Result<(), String> {
    if std::env::var_os(ENV_LOG).is_some() {
        return Err(format!("{ENV_LOG} is set and wins over log.level"));
    }
    let handle = FILTER.get().ok_or("no subscriber installed by this module")?;
    handle.reload(level_filter(level)).map_err(|e| e.to_string())
}

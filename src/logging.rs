//! Tracing setup: text or JSON lines on stderr (stdout is for command output), filtered by
//! `AO_WORKER_LOG` or the configured level.

use tracing_subscriber::EnvFilter;

use crate::config::{ENV_LOG, LogFormat, LogSection};

/// Installs the global subscriber once; later calls do nothing.
pub fn init(log: &LogSection) {
    let filter = std::env::var(ENV_LOG)
        .ok()
        .and_then(|f| EnvFilter::try_new(f).ok())
        .unwrap_or_else(|| EnvFilter::new(format!("warn,ao_gpu_worker={}", log.level)));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(std::io::stderr().is_terminal());
    let _ = match log.format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

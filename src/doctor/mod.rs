//! `ao-gpu-worker doctor`: a preflight of everything a worker needs before `run`, as one line per
//! check with ✓ or ✗, and for every ✗ the one concrete fix (a command or a configuration line).
//!
//! Contract: [`run`] never panics and never changes anything on the machine except a probe file it
//! writes and deletes in each directory it checks for writability. Checks that depend on a valid
//! configuration are skipped (not counted) when the configuration does not load; everything else
//! is checked even when earlier checks failed, so one run lists every problem. The exit code of
//! the command is the number of failed checks, capped at [`MAX_EXIT`] (64 stays the usage error).

mod account;
mod gpu;
mod local;
mod units;

use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

use crate::config::{Config, Overrides, Source};

pub use account::Account;

/// The largest exit code `doctor` returns (64 is EX_USAGE).
pub const MAX_EXIT: u8 = 63;
/// Default free space the data directory's file system must have.
pub const DEFAULT_MIN_FREE_DISK: u64 = 2 * 1024 * 1024 * 1024;
/// Default largest difference between this machine's clock and the scheduler's.
pub const DEFAULT_MAX_CLOCK_SKEW: Duration = Duration::from_secs(60);

/// One check's outcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    /// Stable name, such as `key_file` or `kernel:wgpu:0`.
    pub name: String,
    pub ok: bool,
    /// What was found.
    pub detail: String,
    /// For a failed check: the one thing to do about it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Check {
    pub fn pass(name: impl Into<String>, detail: impl Into<String>) -> Self {
        Self { name: name.into(), ok: true, detail: detail.into(), fix: None }
    }

    pub fn fail(name: impl Into<String>, detail: impl Into<String>, fix: impl Into<String>) -> Self {
        Self { name: name.into(), ok: false, detail: detail.into(), fix: Some(fix.into()) }
    }
}

/// Every check, in the order they ran.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub checks: Vec<Check>,
}

impl Report {
    pub fn failed(&self) -> usize {
        self.checks.iter().filter(|c| !c.ok).count()
    }

    /// The process exit code: the number of failed checks, at most [`MAX_EXIT`].
    pub fn exit_code(&self) -> u8 {
        self.failed().min(MAX_EXIT as usize) as u8
    }

    pub fn get(&self, name: &str) -> Option<&Check> {
        self.checks.iter().find(|c| c.name == name)
    }

    /// One line per check, each failure followed by its fix, then a summary line.
    pub fn text(&self) -> String {
        let mut out = String::new();
        for c in &self.checks {
            out.push_str(&format!("{} {:<16} {}\n", if c.ok { "✓" } else { "✗" }, c.name, c.detail));
            if let Some(fix) = &c.fix {
                out.push_str(&format!("  fix: {fix}\n"));
            }
        }
        let failed = self.failed();
        out.push_str(&match failed {
            0 => format!("all {} checks passed\n", self.checks.len()),
            n => format!("{n} of {} checks failed\n", self.checks.len()),
        });
        out
    }
}

/// What to check, and against which limits.
#[derive(Debug, Clone)]
pub struct Options {
    /// The configuration file (`None`: `$AO_WORKER_CONFIG`, else the embedded default).
    pub config: Option<PathBuf>,
    pub overrides: Overrides,
    /// The account the service runs as, whose access to files and devices is checked (`None`: the
    /// `ao-gpu-worker` system user when it exists, else whoever runs `doctor`).
    pub service_user: Option<String>,
    /// Where device nodes live (`/dev`).
    pub dev_dir: PathBuf,
    pub min_free_disk: u64,
    pub max_clock_skew: Duration,
    /// This machine's clock, in ms since the epoch (a parameter so the comparison can be tested).
    pub now_ms: fn() -> u64,
    /// Skip opening devices and running the known-answer kernel.
    pub skip_kernels: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            config: None,
            overrides: Overrides::from_env(),
            service_user: None,
            dev_dir: PathBuf::from("/dev"),
            min_free_disk: DEFAULT_MIN_FREE_DISK,
            max_clock_skew: DEFAULT_MAX_CLOCK_SKEW,
            now_ms: crate::clock::now_ms,
            skip_kernels: false,
        }
    }
}

/// The name of the system user the package creates and the unit runs as.
pub const SERVICE_USER: &str = "ao-gpu-worker";

/// Runs every check. Blocking work (device probes, kernels) runs off the async threads.
pub async fn run(opts: &Options) -> Report {
    let mut report = Report::default();
    let (config, source_name) = match load_config(opts) {
        Ok(pair) => pair,
        Err(check) => {
            report.checks.push(check);
            return report;
        }
    };
    let account = match &opts.service_user {
        Some(name) => match Account::lookup(name) {
            Some(a) => a,
            None => {
                report.checks.push(Check::fail(
                    "service_user",
                    format!("no account named {name:?}"),
                    format!("useradd --system --no-create-home --shell /usr/sbin/nologin --groups video,render {name}"),
                ));
                Account::current()
            }
        },
        None => Account::lookup(SERVICE_USER).unwrap_or_else(Account::current),
    };
    report.checks.push(Check::pass("config", format!("{source_name} parses (checking as user {})", account.name)));
    // Fixes name the file to edit; with no file given, the one the package installs.
    let source_name = if opts.config.is_none() && source_name.starts_with('(') {
        "a config file (none given: write /etc/ao-gpu-worker/worker.toml from config/worker.toml, pass --config)".to_owned()
    } else {
        source_name
    };
    report.checks.extend(local::check(&config, &source_name, &account));
    report.checks.extend(units::check(&config, &source_name, opts).await);
    let cfg = config.clone();
    let (account2, opts2, source2) = (account.clone(), opts.clone(), source_name.clone());
    match tokio::task::spawn_blocking(move || gpu::check(&cfg, &source2, &account2, &opts2)).await {
        Ok(checks) => report.checks.extend(checks),
        Err(e) => report.checks.push(Check::fail(
            "gpu",
            format!("the device checks panicked: {e}"),
            "report this as a bug, with the output of `ao-gpu-worker capacity`",
        )),
    }
    report.checks.push(local::api_port(&config, &source_name).await);
    report
}

fn load_config(opts: &Options) -> Result<(Config, String), Check> {
    let source = Source::locate(opts.config.as_deref()).map_err(|e| {
        let path = opts.config.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "/etc/ao-gpu-worker/worker.toml".into());
        Check::fail(
            "config",
            e.to_string().trim().replace('\n', "; "),
            format!("install -m 0640 config/worker.toml {path}  (the reference configuration), then edit it"),
        )
    })?;
    match Config::parse(&source.name, &source.text, &opts.overrides) {
        Ok(c) => Ok((c, source.name)),
        Err(e) => {
            let first = e.issues.first().map(|i| i.to_string()).unwrap_or_default();
            Err(Check::fail(
                "config",
                format!(
                    "{} problem(s) in {}: {}",
                    e.issues.len(),
                    source.name,
                    e.issues.iter().map(|i| i.to_string()).collect::<Vec<_>>().join("; ")
                ),
                format!("edit {} and fix `{first}` (then `ao-gpu-worker check-config {}`)", source.name, source.name),
            ))
        }
    }
}

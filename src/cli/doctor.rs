//! `ao-gpu-worker doctor`: runs [`crate::doctor`] and prints one line per check (or `--json`);
//! the exit code is the number of failed checks (at most 63).

use std::path::PathBuf;

use clap::Args;

use crate::doctor::{self, Options};

#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// Configuration file (default: $AO_WORKER_CONFIG, else the embedded config/worker.toml).
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Print one JSON object ({"checks": [{name, ok, detail, fix}], "failed": N}) instead of lines.
    #[arg(long)]
    pub json: bool,
    /// The account the service runs as, whose access to the key, directories and devices is
    /// checked (default: the `ao-gpu-worker` system user when it exists, else the current user).
    #[arg(long)]
    pub user: Option<String>,
    /// Free space the data directory's file system must have (e.g. 2-gb).
    #[arg(long, default_value = "2-gb", value_parser = parse_size)]
    pub min_free_disk: u64,
    /// Skip opening the devices (no known-answer kernel, no memory probe).
    #[arg(long)]
    pub skip_kernels: bool,
}

fn parse_size(text: &str) -> Result<u64, String> {
    crate::runtime::limits::parse_memory_limit(text).ok_or_else(|| format!("{text:?} is not a size such as 512-mb or 2-gb"))
}

/// Runs the checks and prints them; returns the exit code.
pub fn run_cli(args: DoctorArgs) -> anyhow::Result<u8> {
    let opts = Options {
        config: args.config,
        service_user: args.user,
        min_free_disk: args.min_free_disk,
        skip_kernels: args.skip_kernels,
        ..Options::default()
    };
    let report = super::runtime()?.block_on(doctor::run(&opts));
    if args.json {
        let value = serde_json::json!({"checks": report.checks, "failed": report.failed()});
        super::print_line(&serde_json::to_string(&value)?)?;
    } else {
        super::print_line(report.text().trim_end())?;
    }
    Ok(report.exit_code())
}

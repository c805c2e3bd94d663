//! `ao-gpu-worker verify`: re-executes an attested result (or a range of a process's messages)
//! and says whether the worker's claims hold (`crate::verifier`). Prints the human report, or
//! with `--json` the machine-readable one; exits 0 agree, 1 disagree, 2 cannot verify (what is
//! missing is named), 64 usage.

use std::process::ExitCode;

use anyhow::Context as _;

use crate::config::{self, Config};
use crate::gpu::BackendKind;
use crate::net::Policy;
use crate::verifier::{self, Request, Target};

/// Exit code of a usage error (EX_USAGE).
pub const EXIT_USAGE: u8 = 64;

/// `verify` arguments.
#[derive(Debug, clap::Args)]
pub struct VerifyArgs {
    /// The attestation to verify (a Compute-Attestation item id).
    #[arg(conflicts_with = "process")]
    pub attestation: Option<String>,
    /// Verify messages --from..=--to of this process instead, against the attestations scheduled
    /// on --attestations.
    #[arg(long, requires = "to")]
    pub process: Option<String>,
    /// First nonce compared (default 0; messages before it are re-executed, not compared).
    #[arg(long)]
    pub from: Option<u64>,
    /// Last nonce compared (with --process).
    #[arg(long, requires = "process")]
    pub to: Option<u64>,
    /// The process the attestations were sent to (default: [attestation] target, else
    /// [registry] process, of the configuration).
    #[arg(long)]
    pub attestations: Option<String>,
    /// Scheduler unit (default: network.scheduler_url of the configuration).
    #[arg(long)]
    pub scheduler: Option<String>,
    /// Gateway (default: network.gateway_url of the configuration).
    #[arg(long)]
    pub gateway: Option<String>,
    /// The attesting worker's API, which serves the trace leaves (`GET /trace/{message}`), to name
    /// the first host call that differs.
    #[arg(long)]
    pub worker: Option<String>,
    /// The backend to re-execute on.
    #[arg(long, value_name = "cpu|wgpu|cuda", default_value = "cpu", value_parser = super::parse_backend)]
    pub backend: BackendKind,
    /// Configuration file for the defaults above (default: $AO_WORKER_CONFIG, else the embedded one).
    #[arg(long, short)]
    pub config: Option<std::path::PathBuf>,
    /// Print the report as one JSON object.
    #[arg(long)]
    pub json: bool,
}

fn usage(message: &str) -> ExitCode {
    eprintln!("error: {message}\n\nUsage: ao-gpu-worker verify <ATTESTATION> | --process P --from N --to M [options]");
    ExitCode::from(EXIT_USAGE)
}

/// Runs `verify`; the exit code is the verdict's.
pub fn run_cli(args: VerifyArgs) -> anyhow::Result<ExitCode> {
    let config = match Config::load(args.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprint!("{e}");
            return Ok(ExitCode::from(EXIT_USAGE));
        }
    };
    let target = match (args.attestation, args.process) {
        (Some(id), None) => Target::Attestation { id, from: args.from },
        (None, Some(process)) => {
            let (from, to) = (args.from.unwrap_or(0), args.to.unwrap_or(0));
            if from > to {
                return Ok(usage(&format!("--from {from} is after --to {to}")));
            }
            let Some(attestations) = args.attestations.or(config.attestation.target.clone()).or(config.registry.process.clone()) else {
                return Ok(usage("--process needs --attestations (the process the worker sends its attestations to)"));
            };
            Target::Range { process, from, to, attestations }
        }
        _ => return Ok(usage("give an attestation id, or --process with --to")),
    };
    let request = Request {
        target,
        scheduler: args.scheduler.unwrap_or(config.network.scheduler_url),
        gateway: args.gateway.unwrap_or(config.network.gateway_url),
        worker: args.worker,
        backend: args.backend,
        policy: Policy::default(),
        checkpoint_every: config.aos.checkpoint_every,
    };
    crate::logging::init(&config::LogSection { level: "warn".into(), format: config::LogFormat::Text });
    let runtime = super::runtime()?;
    let report = runtime.block_on(verifier::verify(&request));
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report).context("report")?);
    } else {
        print!("{}", report.human());
    }
    Ok(ExitCode::from(report.verdict.exit_code()))
}

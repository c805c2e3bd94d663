//! `ao-gpu-worker eval`: evaluates messages against an aos module locally, with the compute unit's
//! error semantics and no network — one JSON line per message.

use std::io::BufRead as _;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, bail};

use crate::runtime::aos::json::test_env_json;
use crate::runtime::aos::{AosEngine, AosFormat, AosProcess, EnvVars, InstanceOptions};

/// `eval` arguments.
#[derive(Debug, clap::Args)]
pub struct EvalArgs {
    /// The module's wasm file.
    #[arg(long)]
    pub module: PathBuf,
    /// Its Module-Format (e.g. wasm32-unknown-emscripten4, wasm64-unknown-emscripten-draft_2024_02_15).
    #[arg(long)]
    pub format: String,
    /// The env JSON passed with every message, byte for byte (default: process AOS owned by FOOBAR).
    #[arg(long)]
    pub env: Option<PathBuf>,
    /// Messages, one JSON object per line, passed byte for byte; `-` reads stdin.
    #[arg(long)]
    pub messages: PathBuf,
    /// A memory to start from (a checkpoint or a saved `--save-memory`).
    #[arg(long)]
    pub memory: Option<PathBuf>,
    /// Write the final memory here.
    #[arg(long)]
    pub save_memory: Option<PathBuf>,
    /// Gas per message (Compute-Limit).
    #[arg(long, default_value_t = crate::runtime::aos::DEFAULT_GAS_LIMIT)]
    pub compute_limit: u64,
    /// Largest linear memory in bytes.
    #[arg(long)]
    pub memory_limit: Option<u64>,
    /// Environment variables: loader (ao-loader 0.0.49), none, or default (the 7 glue variables).
    #[arg(long, default_value = "loader")]
    pub env_vars: String,
    /// Wall-clock seconds one message may take.
    #[arg(long)]
    pub deadline_secs: Option<f64>,
    /// Cache compiled modules in this directory.
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
}

pub fn run_cli(args: EvalArgs) -> anyhow::Result<()> {
    let format: AosFormat = args.format.parse()?;
    let env_vars = match args.env_vars.as_str() {
        "loader" => EnvVars::Loader049,
        "none" => EnvVars::None,
        "default" => EnvVars::Default,
        other => bail!("--env-vars {other:?}: expected loader, none or default"),
    };
    let deadline = match args.deadline_secs {
        Some(s) if s.is_finite() && s > 0.0 => Some(Duration::from_secs_f64(s)),
        Some(s) => bail!("--deadline-secs {s}: expected a positive number of seconds"),
        None => None,
    };
    let wasm = std::fs::read(&args.module).with_context(|| format!("cannot read the module {}", args.module.display()))?;
    let env = match &args.env {
        Some(path) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("cannot read the env {}", path.display()))?;
            let text = text.trim_end_matches(['\n', '\r']).to_owned();
            serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(&text)
                .with_context(|| format!("{}: the env must be one JSON object", path.display()))?;
            text
        }
        None => test_env_json(),
    };
    let lines: Vec<String> = if args.messages.as_os_str() == "-" {
        std::io::stdin().lock().lines().collect::<Result<_, _>>().context("cannot read messages from stdin")?
    } else {
        let text =
            std::fs::read_to_string(&args.messages).with_context(|| format!("cannot read the messages {}", args.messages.display()))?;
        text.lines().map(str::to_owned).collect()
    };
    let engine = AosEngine::new(args.cache_dir.clone())?;
    let module = engine.load(&wasm, format)?;
    let opts = InstanceOptions { gas_limit: args.compute_limit, env_vars, deadline, memory_limit: args.memory_limit };
    let mut process = match &args.memory {
        Some(path) => {
            let memory = std::fs::read(path).with_context(|| format!("cannot read the memory {}", path.display()))?;
            AosProcess::with_memory(module, memory, opts)
        }
        None => AosProcess::new(module, opts),
    };
    for (number, line) in lines.iter().enumerate().map(|(i, l)| (i + 1, l.trim_end_matches('\r'))) {
        if line.trim().is_empty() {
            continue;
        }
        serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(line)
            .with_context(|| format!("messages line {number}: not a JSON object"))?;
        let outcome = process.handle(line, &env).with_context(|| format!("messages line {number}: could not compute"))?;
        let result = serde_json::json!({
            "output": outcome.output,
            "error": outcome.error,
            "messages": outcome.messages,
            "spawns": outcome.spawns,
            "assignments": outcome.assignments,
            "gas_used": outcome.gas_used,
            "memory_len": process.memory().len(),
            "memory_sha256": hex::encode(process.memory_sha256()),
        });
        super::print_line(&result.to_string())?;
    }
    if let Some(path) = &args.save_memory {
        std::fs::write(path, process.memory()).with_context(|| format!("cannot write the memory to {}", path.display()))?;
    }
    Ok(())
}

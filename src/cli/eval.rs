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
    /// Its Module-Format: an aos format (e.g. wasm32-unknown-emscripten4, wasm64-unknown-emscripten-draft_2024_02_15)
    /// or the worker's own wasm32-unknown-ao-gpu-worker.
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
    if args.format == crate::runtime::MODULE_FORMAT {
        return run_own_format(args);
    }
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
    let env = read_env(&args)?;
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
    for (number, line, _) in messages(&lines)? {
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

fn read_env(args: &EvalArgs) -> anyhow::Result<String> {
    Ok(match &args.env {
        Some(path) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("cannot read the env {}", path.display()))?;
            let text = text.trim_end_matches(['\n', '\r']).to_owned();
            serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(&text)
                .with_context(|| format!("{}: the env must be one JSON object", path.display()))?;
            text
        }
        None => test_env_json(),
    })
}

fn read_lines(args: &EvalArgs) -> anyhow::Result<Vec<String>> {
    if args.messages.as_os_str() == "-" {
        std::io::stdin().lock().lines().collect::<Result<_, _>>().context("cannot read messages from stdin")
    } else {
        let text =
            std::fs::read_to_string(&args.messages).with_context(|| format!("cannot read the messages {}", args.messages.display()))?;
        Ok(text.lines().map(str::to_owned).collect())
    }
}

/// One message line: its number (from 1), its text and its parsed object.
type MessageLine<'a> = (usize, &'a str, serde_json::Map<String, serde_json::Value>);

/// The non-blank lines, each checked to be a JSON object.
fn messages(lines: &[String]) -> anyhow::Result<Vec<MessageLine<'_>>> {
    let mut out = Vec::new();
    for (number, line) in lines.iter().enumerate().map(|(i, l)| (i + 1, l.trim_end_matches('\r'))) {
        if line.trim().is_empty() {
            continue;
        }
        let parsed = serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(line)
            .with_context(|| format!("messages line {number}: not a JSON object"))?;
        out.push((number, line, parsed));
    }
    Ok(out)
}

/// The worker's own format (`wasm32-unknown-ao-gpu-worker`, docs/abi.md) through [`Runtime`]:
/// the same output lines; a failed message keeps the previous state.
fn run_own_format(args: EvalArgs) -> anyhow::Result<()> {
    use crate::protocol::Tag;
    use crate::runtime::{EvalError, EvalInput, Runtime, RuntimeConfig};

    let wasm = std::fs::read(&args.module).with_context(|| format!("cannot read the module {}", args.module.display()))?;
    let env = read_env(&args)?;
    let lines = read_lines(&args)?;
    let deadline = match args.deadline_secs {
        Some(s) if s.is_finite() && s > 0.0 => Duration::from_secs_f64(s),
        Some(s) => bail!("--deadline-secs {s}: expected a positive number of seconds"),
        None => Duration::from_secs(60),
    };
    let cache_dir = args.cache_dir.clone().unwrap_or_else(|| std::env::temp_dir().join("ao-gpu-worker-eval-cache"));
    let runtime = Runtime::new(RuntimeConfig {
        cache_dir,
        max_memory: args.memory_limit.unwrap_or(4 << 30),
        max_compute: args.compute_limit,
        deadline,
    })?;
    let tags = [Tag { name: "Module-Format".into(), value: crate::runtime::MODULE_FORMAT.into() }];
    let module = runtime.load(&wasm, &tags)?;
    let limits = runtime.limits(&tags, &[])?;
    let mut state = match &args.memory {
        Some(path) => Some(std::fs::read(path).with_context(|| format!("cannot read the memory {}", path.display()))?),
        None => None,
    };
    for (number, line, parsed) in messages(&lines)? {
        let timestamp_ms = match parsed.get("Timestamp") {
            Some(serde_json::Value::Number(n)) => n.as_u64().unwrap_or(0),
            Some(serde_json::Value::String(s)) => s.parse().unwrap_or(0),
            _ => 0,
        };
        let id = parsed.get("Id").and_then(|v| v.as_str()).unwrap_or("");
        let input = EvalInput { msg_json: line, env_json: &env, timestamp_ms, message_id: id, limits };
        let evaluation = runtime.evaluate(&module, state.as_deref(), &input);
        let (response, error) = match evaluation.outcome {
            Ok(response) => (response, None),
            Err(e @ (EvalError::Timeout { .. } | EvalError::Unavailable(_))) => bail!("messages line {number}: could not compute: {e}"),
            Err(e) => (serde_json::Value::Null, Some(e.to_string())),
        };
        if let Some(memory) = evaluation.memory {
            state = Some(memory);
        }
        let memory = state.as_deref().unwrap_or(&[]);
        let list = |key: &str| response.get(key).cloned().unwrap_or_else(|| serde_json::json!([]));
        let result = serde_json::json!({
            "output": response.get("Output").cloned().unwrap_or(serde_json::Value::Null),
            "error": error,
            "messages": list("Messages"),
            "spawns": list("Spawns"),
            "assignments": list("Assignments"),
            "gas_used": evaluation.gas_used,
            "memory_len": memory.len(),
            "memory_sha256": hex::encode(<sha2::Sha256 as sha2::Digest>::digest(memory)),
        });
        super::print_line(&result.to_string())?;
    }
    if let (Some(path), Some(memory)) = (&args.save_memory, &state) {
        std::fs::write(path, memory).with_context(|| format!("cannot write the memory to {}", path.display()))?;
    }
    Ok(())
}

//! `ao-gpu-worker status [--watch]`: what the running worker is doing, read from its API's
//! `GET /status` ([`crate::status`]) and printed for people (or `--json`, one object per line).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use serde_json::Value;

use crate::config::Config;

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Configuration file whose api.listen names the worker (default: $AO_WORKER_CONFIG, else the
    /// embedded default).
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// The worker's API base URL (overrides the configuration), e.g. http://127.0.0.1:8703.
    #[arg(long)]
    pub api: Option<String>,
    /// Print again every interval (default 2s) until interrupted.
    #[arg(long, num_args = 0..=1, default_missing_value = "2s", value_parser = crate::config::parse_duration)]
    pub watch: Option<Duration>,
    /// One JSON object (per interval with --watch) instead of text.
    #[arg(long)]
    pub json: bool,
}

pub fn run_cli(args: StatusArgs) -> anyhow::Result<()> {
    let base = match args.api {
        Some(a) => a.trim_end_matches('/').to_owned(),
        None => format!("http://{}", Config::load(args.config.as_deref())?.api.listen),
    };
    let url = format!("{base}/status");
    crate::net::install_crypto_provider();
    let client = reqwest::Client::builder().timeout(Duration::from_secs(10)).build()?;
    use std::io::IsTerminal;
    let clear = args.watch.is_some() && !args.json && std::io::stdout().is_terminal();
    super::runtime()?.block_on(async {
        loop {
            let status: Value = async { client.get(&url).send().await?.error_for_status()?.json().await }
                .await
                .with_context(|| format!("cannot read {url}: is the worker running (systemctl status ao-gpu-worker)?"))?;
            if args.json {
                super::print_line(&status.to_string())?;
            } else {
                if clear {
                    print!("\x1b[2J\x1b[H");
                }
                super::print_line(&render(&status))?;
            }
            let Some(every) = args.watch else { return Ok(()) };
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = tokio::signal::ctrl_c() => return Ok(()),
            }
        }
    })
}

/// The status object as a few aligned lines.
pub fn render(s: &Value) -> String {
    let str_of = |v: &Value| v.as_str().map(str::to_owned).unwrap_or_else(|| v.to_string());
    let mut out = Vec::new();
    let ready = if s["ready"] == true { "ready ✓".to_owned() } else { format!("not ready ✗ ({})", str_of(&s["last_error"])) };
    out.push(format!("worker     {}  v{}  {ready}", str_of(&s["worker"]["address"]), str_of(&s["worker"]["version"])));
    out.push(match s["advertisement"].as_object() {
        Some(a) => format!("advertised {} s ago ({})", a["age_s"], str_of(&a["id"])),
        None => "advertised never".to_owned(),
    });
    let u = &s["units"];
    out.push(format!(
        "units      scheduler {}  messenger {}  gateway {}",
        str_of(&u["scheduler"]),
        str_of(&u["messenger"]),
        str_of(&u["gateway"])
    ));
    out.push(format!("registry   {}", str_of(&u["registry"])));
    for d in s["devices"].as_array().into_iter().flatten() {
        out.push(format!(
            "device {}   {}  in flight {}  evaluations {}  live {} MiB",
            d["index"],
            str_of(&d["description"]),
            d["in_flight"],
            d["evaluations"],
            d["live_bytes"].as_u64().unwrap_or(0) / (1 << 20)
        ));
    }
    let processes = s["processes"].as_array().cloned().unwrap_or_default();
    out.push(format!("processes  {}", processes.len()));
    for p in &processes {
        let lag = match p["lag"].as_u64() {
            Some(l) => format!("lag {l}"),
            None => format!("lag ? ({})", str_of(&p["lag_error"])),
        };
        let halted = p["halted"].as_str().map(|h| format!("  HALTED: {h}")).unwrap_or_default();
        out.push(format!("  {}  evaluated {}  {lag}{halted}", str_of(&p["process"]), p["evaluated_nonce"]));
    }
    out.push(format!("outbox     pending {}  refused {}", s["outbox"]["pending"], s["outbox"]["refused"]));
    out.join("\n")
}

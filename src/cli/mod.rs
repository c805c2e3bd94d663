//! Command line: the subcommands and what each does, returning an exit code.
//!
//! Exit codes: 0 success, 1 runtime failure, 64 configuration or usage error (EX_USAGE).
//!
//! The top of the crate: it parses, calls the library and prints; no library module imports it.

pub mod admin;
pub mod doctor;
pub mod eval;
pub mod model;
pub mod status;
pub mod verify;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::attest::{KeyError, KeyType, Keypair};
use crate::config::{self, Config, ConfigError};
use crate::daemon::Worker;
use crate::demo::aos::AosDemo;
use crate::devnet::{Devnet, DevnetOptions};
use crate::net::{Policy, SchedulerClient};
use crate::protocol::su::ItemJson;

/// `println!` that treats a closed stdout (`ao-gpu-worker capacity | head`) as the reader's
/// choice rather than a panic.
macro_rules! emit {
    ($($arg:tt)*) => {
        print_line(&format!($($arg)*))?
    };
}

fn print_line(line: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    match writeln!(std::io::stdout().lock(), "{line}") {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other.context("cannot write to stdout"),
    }
}

pub const EXIT_FAILURE: u8 = 1;
pub const EXIT_CONFIG: u8 = 64;

#[derive(Debug, Parser)]
#[command(
    name = "ao-gpu-worker",
    version,
    about = "A GPU compute provider for AO: runs actors in wasmtime, offloads tensor ops to GPUs, posts signed results"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the worker daemon against the AO units named in the configuration.
    Run {
        /// Configuration file (default: $AO_WORKER_CONFIG, else the embedded config/worker.toml).
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Run an embedded AO devnet (scheduler, messenger, gateway) on loopback plus a worker.
    Devnet {
        /// Where the devnet and its worker keep their data; reused across restarts.
        #[arg(long, default_value = "devnet-data")]
        data_dir: PathBuf,
        /// Scheduler on N, messenger N+1, gateway N+2, worker API N+3; 0 picks free ports.
        #[arg(long, default_value_t = 8700)]
        port_base: u16,
        /// Run the demo once, verify it, and exit 0 (non-zero if any step failed).
        #[arg(long)]
        once: bool,
        /// Capacity heartbeat of the devnet's worker.
        #[arg(long, default_value = "60s", value_parser = config::parse_duration)]
        advertise_interval: std::time::Duration,
        /// Start only the AO units, without a worker.
        #[arg(long, conflicts_with = "once")]
        no_worker: bool,
        /// Behave as the deployed legacy scheduler unit: it signs with an Arweave RSA-4096 key and
        /// refuses ed25519 items (HTTP 400); the devnet's authority, worker and demo user use
        /// Arweave wallets. Needs a data dir created in this mode.
        #[arg(long)]
        legacy_strict: bool,
        /// Also run an aos process pair in the demo on this module (an AO emscripten wasm such as
        /// aos 2.0); scripts/devnet passes the aos fixture when it is present.
        #[arg(long, requires = "aos_format")]
        aos_module: Option<PathBuf>,
        /// The aos module's Module-Format (e.g. wasm32-unknown-emscripten4).
        #[arg(long, requires = "aos_module")]
        aos_format: Option<String>,
    },
    /// Create a new key file (mode 0600): ed25519, or an Arweave RSA-4096 wallet; refuses to overwrite.
    Keygen {
        /// Where to write the key (a JWK).
        #[arg(long, short)]
        out: PathBuf,
        /// `ed25519` (ANS-104 type 2) or `arweave` (an RSA-4096 JWK wallet, type 1: what the
        /// deployed legacy scheduler unit requires).
        #[arg(long = "type", value_name = "arweave|ed25519", default_value_t = KeyType::Ed25519)]
        key_type: KeyType,
    },
    /// Check that this machine can run a worker: configuration, key, directories, clock, the AO
    /// units, each GPU (driver, device nodes, a known-answer kernel, memory), bench scores, disk
    /// and ports. One line per check; every failure comes with the one fix. Exit code: the number
    /// of failed checks (at most 63).
    Doctor(doctor::DoctorArgs),
    /// What the running worker is doing (from its API's /status): identity, units, advertisement
    /// age, devices and their load, served processes with their lag, the outbox.
    Status(status::StatusArgs),
    /// Validate a configuration file and report every problem at once.
    CheckConfig {
        /// The file to check (default: $AO_WORKER_CONFIG, else the embedded default).
        file: Option<PathBuf>,
    },
    /// Detect this machine's capacity (CPU, memory, disk, wgpu adapters, CUDA devices) and print it as JSON.
    Capacity {
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Disk to report (default: worker.data_dir from the configuration).
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// Evaluate messages against an aos module (AO's emscripten Lua processes) locally, with the
    /// compute unit's error semantics and no network; prints one JSON line per message (output,
    /// error, messages, spawns, assignments, gas_used, memory_len, memory_sha256).
    Eval(eval::EvalArgs),
    /// Outbox items the messenger refused for good (dead letters) on the running worker: list,
    /// retry (post again) or drop (keep, never post). Talks to the worker's API.
    Outbox {
        #[command(subcommand)]
        command: admin::OutboxCommand,
        #[command(flatten)]
        target: admin::ApiTarget,
    },
    /// The running worker's served processes with their state (serving, catching-up, backing-off,
    /// halted and why), one JSON line each; --resume clears a process's halt. Talks to the worker's API.
    Processes {
        /// Resume this halted process (clears its journaled halt and its backoff).
        #[arg(long, value_name = "PROCESS")]
        resume: Option<String>,
        #[command(flatten)]
        target: admin::ApiTarget,
    },
    /// Model weights for actors: inspect a GGUF file, publish its tensors to a gateway.
    Model {
        #[command(subcommand)]
        command: model::ModelCommand,
    },
    /// Re-execute an attested result (or a range of a process's messages) from the process start
    /// on a backend of your choice and compare result, state and op-trace hashes; on a mismatch,
    /// name the first message and host call that differ. Exit 0 agree, 1 disagree, 2 cannot
    /// verify, 64 usage.
    Verify(verify::VerifyArgs),
    /// Measure this machine: f32 GEMM, quantized matrix-vector products, upload and read bandwidth
    /// and host calls from Wasm on each tensor backend. Prints a table headed by the hardware (or
    /// one JSON object) and saves <data_dir>/bench.json, whose figures the worker advertises as the
    /// measured scores of its capacity manifest.
    Bench {
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Where to save bench.json (default: worker.data_dir from the configuration).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Backends to measure, in order (repeat the flag or separate with commas); default: cpu,
        /// wgpu and cuda, listing those that cannot start here.
        #[arg(long = "backend", value_name = "cpu|wgpu|cuda", num_args = 1.., value_delimiter = ',', value_parser = parse_backend)]
        backends: Vec<crate::gpu::BackendKind>,
        /// The determinism mode to measure in (default: gpu.determinism from the configuration).
        #[arg(long, value_name = "fast|reproducible", value_parser = parse_determinism)]
        determinism: Option<crate::gpu::Determinism>,
        /// A short run (a few seconds) instead of the full one (under a minute).
        #[arg(long)]
        quick: bool,
        /// Print the results as one JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
}

fn parse_backend(text: &str) -> Result<crate::gpu::BackendKind, String> {
    crate::gpu::BackendKind::parse(text).ok_or_else(|| format!("unknown backend {text:?}: expected cpu, wgpu or cuda"))
}

fn parse_determinism(text: &str) -> Result<crate::gpu::Determinism, String> {
    crate::gpu::Determinism::parse(text).ok_or_else(|| format!("unknown mode {text:?}: expected fast or reproducible"))
}

/// Runs a parsed command line.
pub fn main(cli: Cli) -> ExitCode {
    let result = match cli.command {
        // verify's exit codes say agree (0), disagree (1), could not verify (2).
        Command::Verify(args) => {
            return verify::run_cli(args).unwrap_or_else(|e| {
                eprintln!("error: {e:#}");
                ExitCode::from(2)
            });
        }
        Command::Doctor(args) => {
            crate::logging::init(&config::LogSection { level: "error".into(), format: config::LogFormat::Text });
            doctor::run_cli(args).map(ExitCode::from)
        }
        command => run_command(command).map(|()| ExitCode::SUCCESS),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            if let Some(c) = e.downcast_ref::<ConfigError>() {
                eprint!("{c}");
                return ExitCode::from(EXIT_CONFIG);
            }
            if let Some(k) = e.downcast_ref::<KeyError>() {
                eprintln!("error: {k}");
                return ExitCode::from(EXIT_CONFIG);
            }
            eprintln!("error: {e:#}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().context("cannot start the async runtime")
}

fn run_command(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Run { config: path } => {
            let config = Config::load(path.as_deref())?;
            crate::logging::init(&config.log);
            if config.registry.process.is_none() {
                return Err(ConfigError {
                    source_name: "configuration".into(),
                    issues: vec![config::Issue {
                        path: "registry.process".into(),
                        message: format!(
                            "required by `run`: the registry process id (`ao-gpu-worker devnet` prints one; or set {})",
                            config::ENV_REGISTRY
                        ),
                    }],
                }
                .into());
            }
            let key = Keypair::load(&config.worker.key_file)?;
            runtime()?.block_on(async {
                let signals = Signals::listen();
                let running = config.clone();
                let worker = Worker::start(config, key, None).await?;
                let jobs = worker.state.jobs.clone();
                let reload = Reload { path, running, set_authorities: Box::new(move |a| jobs.set_authorities(a)) };
                signals.wait_reloading(worker.shutdown_token(), Some(reload)).await;
                worker.shutdown().await;
                Ok(())
            })
        }
        Command::Devnet { data_dir, port_base, once, advertise_interval, no_worker, legacy_strict, aos_module, aos_format } => {
            crate::logging::init(&config::LogSection { level: "info".into(), format: config::LogFormat::Text });
            let opts = DevnetOptions::new(&data_dir, port_base).legacy_strict(legacy_strict);
            let aos = aos_module.zip(aos_format).map(|(module, format)| AosDemo { module, format });
            runtime()?.block_on(devnet(&opts, once, advertise_interval, no_worker, aos.as_ref()))
        }
        Command::Keygen { out, key_type } => {
            let key = Keypair::generate_type(key_type)?;
            key.write_new(&out)?;
            emit!(
                "{}",
                serde_json::json!({"key_file": out, "type": key_type, "address": key.address(), "public_key": crate::protocol::b64::encode(&key.public_key())})
            );
            Ok(())
        }
        Command::CheckConfig { file } => {
            let source = config::Source::locate(file.as_deref())?;
            let config = Config::parse(&source.name, &source.text, &config::Overrides::from_env())?;
            emit!("{}: ok", source.name);
            emit!("  data_dir   {}", config.worker.data_dir.display());
            emit!("  key_file   {}", config.worker.key_file.display());
            emit!("  scheduler  {}", config.network.scheduler_url);
            emit!("  messenger  {}", config.network.messenger_url);
            emit!("  gateway    {}", config.network.gateway_url);
            emit!("  registry   {}", config.registry.process.as_deref().unwrap_or("(not set: `run` will refuse to start)"));
            emit!("  api        {}", config.api.listen);
            Ok(())
        }
        Command::Capacity { config, data_dir } => {
            let config = Config::load(config.as_deref())?;
            let data_dir = data_dir.unwrap_or(config.worker.data_dir);
            let address = Keypair::load(&config.worker.key_file).ok().map(|k| k.address());
            let manifest = crate::capacity::detect(&crate::capacity::DetectOptions { data_dir, worker_address: address });
            emit!("{}", serde_json::to_string_pretty(&manifest)?);
            Ok(())
        }
        Command::Eval(args) => {
            crate::logging::init(&config::LogSection { level: "warn".into(), format: config::LogFormat::Text });
            eval::run_cli(args)
        }
        Command::Outbox { command, target } => {
            for line in runtime()?.block_on(admin::outbox(&target, &command))? {
                emit!("{line}");
            }
            Ok(())
        }
        Command::Processes { resume, target } => {
            for line in runtime()?.block_on(admin::processes(&target, resume.as_deref()))? {
                emit!("{line}");
            }
            Ok(())
        }
        Command::Doctor(_) => unreachable!("handled by main"),
        Command::Status(args) => status::run_cli(args),
        Command::Model { command } => {
            crate::logging::init(&config::LogSection { level: "warn".into(), format: config::LogFormat::Text });
            model::run_cli(command)
        }
        Command::Bench { config, data_dir, backends, determinism, quick, json } => {
            bench(config, data_dir, backends, determinism, quick, json)
        }
        // `main` runs it for its exit code; here only its errors matter.
        Command::Verify(args) => verify::run_cli(args).map(drop),
    }
}

/// `bench`: measures, prints, saves `<data_dir>/bench.json`. Progress goes to stderr.
fn bench(
    config: Option<PathBuf>,
    data_dir: Option<PathBuf>,
    backends: Vec<crate::gpu::BackendKind>,
    determinism: Option<crate::gpu::Determinism>,
    quick: bool,
    json: bool,
) -> anyhow::Result<()> {
    use crate::gpu::BackendKind;
    let config = Config::load(config.as_deref())?;
    let data_dir = data_dir.unwrap_or(config.worker.data_dir);
    let mut kinds: Vec<BackendKind> = Vec::new();
    for kind in if backends.is_empty() { vec![BackendKind::Cpu, BackendKind::Wgpu, BackendKind::Cuda] } else { backends } {
        if !kinds.contains(&kind) {
            kinds.push(kind);
        }
    }
    let manifest = crate::capacity::detect(&crate::capacity::DetectOptions { data_dir: data_dir.clone(), worker_address: None });
    let opts = crate::bench::Options { backends: kinds, determinism: determinism.unwrap_or(config.gpu.determinism), quick };
    let progress = crate::progress::Progress::new("bench", None, crate::progress::Unit::Items, crate::progress::Lines::Stderr);
    let report = crate::bench::run(&opts, &manifest, &|line| progress.inc(1, line), &|| false);
    progress.finish("measured");
    anyhow::ensure!(!report.backends.is_empty(), "no backend could be measured: {}", report.unavailable.join("; "));
    if json {
        emit!("{}", serde_json::to_string(&report)?);
    } else {
        emit!("{}", report.table());
    }
    let file = crate::bench::save(&report, &data_dir).with_context(|| format!("cannot save the results in {}", data_dir.display()))?;
    eprintln!("bench: saved to {}", file.display());
    Ok(())
}

/// What SIGHUP needs: the configuration file, the configuration in force, and how to hand the
/// work loop new authorities.
struct Reload {
    path: Option<PathBuf>,
    running: Config,
    set_authorities: Box<dyn Fn(Vec<String>) + Send>,
}

/// SIGTERM and SIGINT (and SIGHUP for `run`), listened for from the moment this is created: a
/// signal that arrives while the worker is still starting is not lost (and does not kill it
/// uncleanly).
struct Signals {
    term: Option<tokio::signal::unix::Signal>,
    hup: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    fn listen() -> Self {
        use tokio::signal::unix::{SignalKind, signal};
        let term = signal(SignalKind::terminate()).map_err(|e| tracing::warn!(error = %e, "cannot watch SIGTERM")).ok();
        let hup = signal(SignalKind::hangup()).map_err(|e| tracing::warn!(error = %e, "cannot watch SIGHUP")).ok();
        Self { term, hup }
    }

    /// Waits for a signal (or for `token`), then cancels `token`.
    async fn wait(self, token: CancellationToken) {
        self.wait_reloading(token, None).await
    }

    /// [`Signals::wait`]; with `reload`, each SIGHUP re-reads the configuration file
    /// ([`crate::reload`]) instead of being ignored.
    async fn wait_reloading(mut self, token: CancellationToken, mut reload: Option<Reload>) {
        loop {
            let term = async {
                match self.term.as_mut() {
                    Some(t) => {
                        t.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            let hup = async {
                match self.hup.as_mut() {
                    Some(h) => {
                        h.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                _ = term => tracing::info!("SIGTERM: shutting down"),
                _ = tokio::signal::ctrl_c() => tracing::info!("interrupt: shutting down"),
                _ = token.cancelled() => {}
                _ = hup => {
                    match reload.as_mut() {
                        Some(r) => match crate::reload::reload(r.path.as_deref(), &r.running, &*r.set_authorities) {
                            Ok((now, _)) => r.running = now,
                            Err(e) => tracing::error!(problems = %e.to_string().trim().replace('\n', ";"), "SIGHUP: the configuration does not load; nothing changed"),
                        },
                        None => tracing::info!("SIGHUP: nothing to reload here"),
                    }
                    continue;
                }
            }
            break;
        }
        token.cancel();
    }
}

async fn wait_for_signal(token: CancellationToken) {
    Signals::listen().wait(token).await
}

/// The devnet plus a worker: the README's main job.
async fn devnet(
    opts: &DevnetOptions,
    once: bool,
    advertise_interval: std::time::Duration,
    no_worker: bool,
    aos: Option<&AosDemo>,
) -> anyhow::Result<()> {
    let data_dir = opts.data_dir.as_path();
    let mut net = Devnet::start(opts).await?;
    emit!("{}", serde_json::to_string(&net.urls)?);
    if no_worker {
        wait_for_signal(CancellationToken::new()).await;
        net.shutdown().await;
        return Ok(());
    }
    let worker_dir = data_dir.join("worker");
    let key = Keypair::load_or_create_type(&worker_dir.join("worker.key"), net.client_key_type())?;
    anyhow::ensure!(
        !net.legacy_strict || key.key_type() == KeyType::Arweave,
        "--legacy-strict needs an Arweave RSA worker key, but {} holds an {} key; use a fresh --data-dir",
        worker_dir.join("worker.key").display(),
        key.key_type()
    );
    let config = devnet_worker_config(&worker_dir, &net, advertise_interval)?;
    let worker = Worker::start(config, key, net.worker_listener.take()).await?;
    let result = if once { demo_once(&net, &worker, aos).await } else { serve_demo(&net, &worker, aos).await };
    worker.shutdown().await;
    net.shutdown().await;
    result
}

fn devnet_worker_config(worker_dir: &Path, net: &Devnet, advertise_interval: std::time::Duration) -> anyhow::Result<Config> {
    let text = format!(
        "[worker]\ndata_dir = {dir:?}\nkey_file = \"worker.key\"\n[network]\nscheduler_url = {su:?}\nmessenger_url = {mu:?}\ngateway_url = {gw:?}\nmax_attempts = 3\n[registry]\nprocess = {reg:?}\nadvertise_interval = \"{ms}ms\"\nauthorities = [{auth:?}]\npoll_interval = \"200ms\"\n",
        dir = worker_dir.display().to_string(),
        su = net.urls.scheduler,
        mu = net.urls.messenger,
        gw = net.urls.gateway,
        reg = net.urls.registry,
        ms = advertise_interval.as_millis(),
        auth = net.authority.address(),
    );
    Ok(Config::parse("(devnet worker)", &text, &config::Overrides::default())?)
}

/// Reads an advertisement back from the scheduler, checks its assignment and its signature,
/// and prints what it found.
async fn read_back(net: &Devnet, id: &str) -> anyhow::Result<serde_json::Value> {
    let su = SchedulerClient::new(&net.urls.scheduler, Policy::default());
    let node = su.message(id, &net.urls.registry).await.context("advertisement not found on the scheduler")?;
    let message = node.message.context("scheduler returned the assignment without the message")?;
    let item = message.to_item().map_err(|e| anyhow::anyhow!("scheduler's copy does not rebuild into a data item: {e}"))?;
    item.verify().context("scheduler's copy of the advertisement does not verify")?;
    anyhow::ensure!(item.id() == id, "scheduler's copy has id {}, expected {id}", item.id());
    let assignment = &node.assignment;
    let tag = |j: &ItemJson, n: &str| j.tag(n).map(str::to_owned).unwrap_or_default();
    anyhow::ensure!(tag(assignment, "Message") == id, "assignment does not name the advertisement");
    let manifest: serde_json::Value = serde_json::from_slice(&item.data).context("advertisement data is not JSON")?;
    Ok(serde_json::json!({
        "advertisement": id,
        "registry": net.urls.registry,
        "nonce": tag(assignment, "Nonce").parse::<u64>().unwrap_or_default(),
        "hash_chain": tag(assignment, "Hash-Chain"),
        "timestamp": tag(assignment, "Timestamp"),
        "worker": item.owner_address(),
        "signature_verified": true,
        "capacity": {
            "cpu": manifest.pointer("/host/cpu/model"),
            "logical_cores": manifest.pointer("/host/cpu/logical_cores"),
            "wgpu_adapters": manifest.pointer("/gpus/wgpu/adapters").and_then(|a| a.as_array()).map(|a| a.iter().filter_map(|x| x.get("name")).cloned().collect::<Vec<_>>()),
            "cuda": manifest.pointer("/gpus/cuda/status"),
        },
    }))
}

async fn demo_once(net: &Devnet, worker: &Worker, aos: Option<&AosDemo>) -> anyhow::Result<()> {
    let ad = tokio::time::timeout(std::time::Duration::from_secs(120), worker.advertised())
        .await
        .context("the worker did not advertise its capacity within 120 s")?;
    let summary = read_back(net, &ad.id).await?;
    emit!("{}", serde_json::to_string(&summary)?);
    let print = |v: &serde_json::Value| {
        let _ = print_line(&v.to_string());
    };
    crate::demo::run(net, worker, &print).await?;
    match aos {
        Some(aos) => crate::demo::aos::run(net, worker, aos, &print).await,
        None => Ok(()),
    }
}

async fn serve_demo(net: &Devnet, worker: &Worker, aos: Option<&AosDemo>) -> anyhow::Result<()> {
    let token = worker.shutdown_token();
    demo_once(net, worker, aos).await?;
    let printer = async {
        let mut last = None;
        loop {
            let ad = worker.advertised().await;
            if last.as_ref() != Some(&ad.id) {
                match read_back(net, &ad.id).await {
                    Ok(summary) => {
                        if let Err(e) = print_line(&serde_json::to_string(&summary).unwrap_or_default()) {
                            tracing::warn!(error = %e, "cannot print");
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "read-back of the advertisement failed"),
                }
                last = Some(ad.id);
            }
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        }
    };
    tokio::select! {
        _ = wait_for_signal(token) => {}
        _ = printer => {}
    }
    Ok(())
}

//! The worker daemon: wires configuration, identity, clients, the HTTP API and the
//! capacity heartbeat; owns their tasks; drains them on shutdown.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::advertise::{self, Advertisement};
use crate::attest::Keypair;
use crate::bench::scores::ScoreSlot;
use crate::capacity::{self, CapacityManifest, DetectOptions};
use crate::clock::now_ms;
use crate::config::{ApiSection, Config, GpuSection, NetworkSection};
use crate::gpu::pool::DevicePool;
use crate::gpu::{self, BackendKind, Determinism};
use crate::jobs::{self, JobMetrics, JobsConfig};
use crate::journal::Journal;
use crate::metrics::{DaemonMetrics, Metrics};
use crate::net::{GatewayClient, MessengerClient, NetError, Policy, SchedulerClient};
use crate::protocol::DataItem;
use crate::runtime::{AosSettings, PoolConfig, Runtime, RuntimeConfig};
use crate::state::{WorkerMetrics, WorkerState};

/// A running worker.
pub struct Worker {
    pub state: Arc<WorkerState>,
    pub api_url: String,
    shutdown: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

impl Worker {
    /// Starts the worker: detects capacity, serves the API, starts the heartbeat.
    /// `listener` is a pre-bound API socket (the devnet reserves one); else `api.listen`.
    pub async fn start(config: Config, key: Keypair, listener: Option<TcpListener>) -> anyhow::Result<Self> {
        let registry = registry_process(&config)?;
        let data_dir = config.worker.data_dir.as_path();
        create_data_dir(data_dir)?;
        let address = key.address();
        let mut manifest = detect_capacity(data_dir, &address).await?;
        tracing::info!(%address, capacity = %manifest.backends_summary(), "worker identity and capacity");
        let pool = Arc::new(open_devices(&config.gpu, &manifest).await?);
        manifest.serving = Some(serving_info(&pool));
        let clients = Clients::new(&config.network, &config.limits.actor);
        let runtime = start_runtime(&config, pool.clone(), &clients.gateway)?;
        let serving = (runtime.tensor_backend().kind, runtime.tensor_backend().determinism);
        let scores = load_scores(&mut manifest, data_dir, serving);
        let mut metrics = register_metrics(&address, &manifest, &runtime, &pool);
        let admission = Arc::new(crate::admission::Admission::new(config.overload.api.clone()));
        admission.metrics.register(metrics.registry.registry());
        let (advertised, advertised_rx) = watch::channel(None);
        let journal_path = data_dir.join("journal.redb");
        let journal = Journal::open(&journal_path).context("cannot open the journal")?;
        let compaction_metrics = crate::compaction::CompactionMetrics::register(metrics.registry.registry());
        let compactor = (journal.clone(), journal_path, config.retention.clone(), compaction_metrics);
        let key = Arc::new(key);
        let jobs = jobs::Context::new(JobsConfig {
            journal,
            runtime: Arc::new(runtime),
            key: key.clone(),
            scheduler: clients.scheduler.clone(),
            messenger: clients.messenger.clone(),
            gateway: clients.gateway,
            registry: registry.clone(),
            authorities: config.registry.authorities.clone(),
            attestation_target: config.attestation.target.clone().unwrap_or_else(|| registry.clone()),
            poll: config.registry.poll_interval,
            max_concurrent: config.jobs.max_concurrent,
            checkpoint_every: config.aos.checkpoint_every,
            advertised: advertised_rx,
            device: manifest.host.cpu.model.clone(),
            metrics: metrics.jobs.clone(),
            recovery: config.overload.recovery.clone(),
            actor_limits: config.limits.actor.clone(),
        });
        let state = Arc::new(WorkerState::new(address, metrics, jobs.clone(), admission, manifest.clone(), advertised));
        let listener = bind_api(listener, &config.api).await?;
        let api_url = format!("http://{}", listener.local_addr()?);
        let shutdown = CancellationToken::new();
        if config.gpu.startup_bench {
            measure_scores(&scores, &state, &manifest, data_dir, serving, &shutdown);
        }
        let mut tasks = vec![crate::httpd::serve(listener, crate::api::router(state.clone()), shutdown.clone())];
        tracing::info!(api = %api_url, "worker api listening");
        check_registry(&clients.scheduler, &registry, &shutdown).await?;
        let heartbeat = Heartbeat {
            state: state.clone(),
            key,
            messenger: clients.messenger,
            registry,
            interval: config.registry.advertise_interval,
            data_dir: config.worker.data_dir.clone(),
            manifest,
            scores,
        };
        tasks.push(tokio::spawn(heartbeat.run(shutdown.clone())));
        let jobs_for_watchdog = jobs.clone();
        tasks.push(spawn_work_loop(jobs, config.jobs.processes.clone(), shutdown.clone()));
        let (journal, journal_path, retention, compaction_metrics) = compactor;
        tasks.push(crate::compaction::spawn(journal, journal_path, retention, compaction_metrics, shutdown.clone()));
        if let Some(period) = sd_notify::watchdog_enabled() {
            tasks.push(tokio::spawn(watchdog(period / 2, jobs_for_watchdog, shutdown.clone())));
        }
        Ok(Self { state, api_url, shutdown, tasks })
    }

    /// Waits until an advertisement has been accepted, and returns it.
    pub async fn advertised(&self) -> Advertisement {
        let mut rx = self.state.subscribe_advertised();
        loop {
            if let Some(a) = rx.borrow_and_update().clone() {
                return a;
            }
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// A token that stops the worker when cancelled.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Stops every task, letting in-flight work finish.
    pub async fn shutdown(self) {
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
        self.shutdown.cancel();
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

/// The registry process id, which `run` requires.
fn registry_process(config: &Config) -> anyhow::Result<String> {
    config.registry.process.clone().context("registry.process is empty: set it to the registry process id")
}

fn create_data_dir(data_dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(data_dir).with_context(|| format!("cannot create worker.data_dir {}", data_dir.display()))
}

/// The capacity manifest of this machine (off the async runtime: the probe blocks).
async fn detect_capacity(data_dir: &Path, address: &str) -> anyhow::Result<CapacityManifest> {
    let opts = DetectOptions { data_dir: data_dir.to_path_buf(), worker_address: Some(address.to_owned()) };
    tokio::task::spawn_blocking(move || capacity::detect(&opts)).await.context("capacity detection failed")
}

/// What the manifest says about the devices serving evaluations.
fn serving_info(pool: &DevicePool) -> capacity::ServingInfo {
    capacity::ServingInfo {
        backend: pool.kind().as_str().to_owned(),
        determinism: pool.determinism().as_str().to_owned(),
        devices: pool.infos().into_iter().map(|d| d.description).collect(),
        skipped: pool.skipped().to_vec(),
    }
}

/// The clients of the AO units, all with the configured retry policy.
struct Clients {
    scheduler: SchedulerClient,
    messenger: MessengerClient,
    gateway: GatewayClient,
}

impl Clients {
    fn new(network: &NetworkSection, limits: &crate::config::ActorLimits) -> Self {
        let policy = Policy::from_config(network);
        let bound = |max: u64| Policy { max_answer_bytes: usize::try_from(max).unwrap_or(usize::MAX), ..policy.clone() };
        Self {
            scheduler: SchedulerClient::new(&network.scheduler_url, bound(limits.max_unit_answer_bytes)),
            messenger: MessengerClient::new(&network.messenger_url, bound(limits.max_unit_answer_bytes)),
            gateway: GatewayClient::new(&network.gateway_url, bound(limits.max_item_bytes)),
        }
    }
}

/// The wasm runtime on the device pool, with its module cache in the data directory.
fn start_runtime(config: &Config, pool: Arc<DevicePool>, gateway: &GatewayClient) -> anyhow::Result<Runtime> {
    Runtime::with_pool(
        RuntimeConfig {
            cache_dir: config.worker.cache_dir.join("modules"),
            max_memory: config.limits.max_memory,
            max_compute: config.limits.max_compute,
            deadline: config.limits.deadline,
        },
        PoolConfig {
            pool,
            max_device_memory: config.gpu.max_device_memory,
            // Constants (model weights) come from the same gateway as modules, verified per
            // item, and are cached on each device.
            constant_source: Some(Arc::new(jobs::constants::GatewayConstants::new(gateway.clone(), tokio::runtime::Handle::current()))),
            max_constant_memory: config.gpu.max_constant_memory,
        },
    )
    .map(|rt| {
        rt.with_aos_settings(AosSettings {
            live_processes: config.aos.live_processes,
            rebase_every: config.aos.rebase_every,
            heap_spectre_mitigation: config.aos.heap_spectre_mitigation,
        })
    })
    .and_then(|rt| rt.with_fault(config.testing.fault.clone()))
    .map(|rt| rt.with_models(config.models.clone()))
    .context("cannot start the wasm runtime")
}

/// Measured scores: bench.json when it matches this machine, version and the serving backend
/// (then they go into `manifest`); else an empty slot for [`measure_scores`] (see
/// [`crate::bench::scores`]).
fn load_scores(manifest: &mut CapacityManifest, data_dir: &Path, (kind, mode): (BackendKind, Determinism)) -> ScoreSlot {
    let scores = ScoreSlot::load(manifest, data_dir, kind, mode);
    manifest.scores = scores.current();
    scores
}

/// A quick bench of the serving backend, once, in the background, when `scores` is empty; the
/// status's manifest gets the scores when it ends.
fn measure_scores(
    scores: &ScoreSlot,
    state: &Arc<WorkerState>,
    manifest: &CapacityManifest,
    data_dir: &Path,
    (kind, mode): (BackendKind, Determinism),
    shutdown: &CancellationToken,
) {
    let status_state = state.clone();
    scores.measure_in_background(manifest, data_dir, kind, mode, shutdown.clone(), move |s| {
        if let Some(m) = status_state.status().manifest.as_mut() {
            m.scores = Some(s.clone());
        }
    });
}

/// The registry with the build info, then each subsystem's metrics: the devices, the daemon's
/// own gauges, the constant cache, the work loop.
fn register_metrics(address: &str, manifest: &CapacityManifest, runtime: &Runtime, pool: &DevicePool) -> WorkerMetrics {
    let mut registry = Metrics::new(address, &manifest.backends_summary());
    let tensor = runtime.tensor_backend();
    pool.metrics().register(registry.registry(), tensor.kind, &tensor.description, tensor.determinism, &tensor.devices);
    let daemon = DaemonMetrics::register(registry.registry());
    if let Some(c) = runtime.constant_metrics() {
        c.register(registry.registry());
    }
    let jobs = Arc::new(JobMetrics::register(registry.registry()));
    WorkerMetrics { registry, daemon, jobs }
}

/// The API socket: the pre-bound `listener`, else `api.listen`.
async fn bind_api(listener: Option<TcpListener>, api: &ApiSection) -> anyhow::Result<TcpListener> {
    match listener {
        Some(l) => Ok(l),
        None => TcpListener::bind(api.listen).await.with_context(|| format!("cannot listen on api.listen {}", api.listen)),
    }
}

/// Refuses to go on when the scheduler does not know the registry process (cancelling
/// `shutdown`); any other failure only warns.
async fn check_registry(scheduler: &SchedulerClient, registry: &str, shutdown: &CancellationToken) -> anyhow::Result<()> {
    match scheduler.process(registry).await {
        Ok(_) => {}
        Err(e @ NetError::NotFound { .. }) => {
            shutdown.cancel();
            anyhow::bail!("registry process {registry} is not known to the scheduler at {}: {e}", scheduler.base());
        }
        Err(e) => tracing::warn!(error = %e, "cannot check the registry process yet; advertising anyway"),
    }
    Ok(())
}

/// The work loop on its own task, logging why it stopped.
fn spawn_work_loop(jobs: Arc<jobs::Context>, processes: Vec<String>, token: CancellationToken) -> JoinHandle<()> {
    tokio::spawn(async move {
        if let Err(e) = jobs::run(jobs, processes, token).await {
            tracing::error!(error = %e, "work loop stopped");
        }
    })
}

/// Walks `gpu.backends` in order and opens every device (`gpu.devices`) of the first backend kind
/// that starts, logging the choice, every device and every skipped candidate with its reason;
/// fails when none of them works. Device names and memory sizes come from the capacity manifest.
async fn open_devices(cfg: &GpuSection, manifest: &CapacityManifest) -> anyhow::Result<DevicePool> {
    let (order, determinism, selection) = (cfg.backends.clone(), cfg.determinism, cfg.devices.clone());
    let names: Vec<&str> = order.iter().map(|k| k.as_str()).collect();
    let inventory = inventory(manifest);
    let pool = tokio::task::spawn_blocking(move || DevicePool::open(&order, determinism, &selection, &inventory))
        .await
        .context("tensor backend selection panicked")?
        .map_err(|e| anyhow::anyhow!("none of gpu.backends {names:?} can run here (gpu.devices = {}): {e}", cfg.devices))?;
    for reason in pool.skipped() {
        tracing::info!(candidate = %reason, "tensor backend candidate skipped");
    }
    for d in pool.infos() {
        tracing::info!(device = d.index, kind = %d.kind, ordinal = d.ordinal, description = %d.description, memory_bytes = d.memory_bytes, "tensor device serving");
    }
    tracing::info!(
        kind = %pool.kind(),
        devices = pool.len(),
        determinism = pool.determinism().as_str(),
        order = ?names,
        "tensor backend chosen from gpu.backends"
    );
    Ok(pool)
}

/// What the capacity probe saw of each device: names for `gpu.devices`, memory sizes for placement.
pub fn inventory(manifest: &CapacityManifest) -> gpu::pool::Inventory {
    use gpu::pool::KnownDevice;
    // Ordinals come from the local driver; bounded all the same.
    let cuda = &manifest.gpus.cuda.devices;
    let slots = cuda.iter().map(|d| d.ordinal as usize + 1).max().unwrap_or(0).min(1024);
    let cuda = (0..slots)
        .map(|o| match cuda.iter().find(|d| d.ordinal as usize == o) {
            Some(d) => KnownDevice { name: d.name.clone(), api: None, memory_bytes: Some(d.total_memory_bytes) },
            None => KnownDevice { name: format!("cuda device {o}"), api: None, memory_bytes: None },
        })
        .collect();
    let wgpu = manifest
        .gpus
        .wgpu
        .adapters
        .iter()
        .map(|a| KnownDevice { name: a.name.clone(), api: Some(a.backend.clone()), memory_bytes: None })
        .collect();
    let cpu = &manifest.host.cpu;
    let cpu = KnownDevice { name: cpu.model.clone(), api: None, memory_bytes: Some(manifest.host.memory.total_bytes) };
    gpu::pool::Inventory { cuda, wgpu, cpu: Some(cpu) }
}

struct Heartbeat {
    state: Arc<WorkerState>,
    key: Arc<Keypair>,
    messenger: MessengerClient,
    registry: String,
    interval: Duration,
    data_dir: std::path::PathBuf,
    manifest: CapacityManifest,
    /// Measured scores, put into every re-detected manifest.
    scores: ScoreSlot,
}

/// Wait before retrying a failed advertisement: soon, but never more often than the
/// client's own retries already allow, and never later than the heartbeat.
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(15);

impl Heartbeat {
    async fn run(mut self, shutdown: CancellationToken) {
        let mut first = true;
        loop {
            if !first {
                // Re-measure what changes (free memory and disk, devices coming and going).
                let opts = DetectOptions { data_dir: self.data_dir.clone(), worker_address: Some(self.state.address.clone()) };
                match tokio::task::spawn_blocking(move || capacity::detect(&opts)).await {
                    Ok(m) => self.manifest = CapacityManifest { serving: self.manifest.serving.take(), ..m },
                    Err(e) => tracing::warn!(error = %e, "capacity re-detection failed; advertising the previous manifest"),
                }
            }
            first = false;
            self.manifest.scores = self.scores.current();
            let wait = match self.advertise_once().await {
                Ok((a, fresh)) => {
                    tracing::info!(id = %a.id, registry = %a.registry, fresh, "capacity advertised");
                    // One signed before a restart went out first; follow it with a current one.
                    if fresh { self.interval } else { Duration::ZERO }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "capacity advertisement failed");
                    self.state.metrics.daemon.advertisements.get_or_create(&[("result", "error")]).inc();
                    self.state.status().last_error = Some(e.to_string());
                    RETRY_AFTER_FAILURE.min(self.interval)
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Posts the advertisement in flight (signed earlier, kept in the journal until accepted),
    /// or else signs, journals and posts a new one. Signed once: a failed post is retried with
    /// the same bytes, so even an RSA worker's heartbeat has one id. True when it was new.
    async fn advertise_once(&self) -> anyhow::Result<(Advertisement, bool)> {
        let journal = &self.state.jobs.journal;
        let (item, fresh) = match journal.pending_advertisement()? {
            Some(bytes) => (DataItem::parse(&bytes).context("the journaled advertisement is corrupt")?, false),
            None => {
                let item = advertise::build(&self.key, &self.registry, &self.manifest, now_ms())?;
                journal.stash_advertisement(&item.to_bytes())?;
                (item, true)
            }
        };
        let at_ms = item.tag("Timestamp").and_then(|t| t.parse().ok()).unwrap_or_else(now_ms);
        match self.messenger.post_item(&item).await {
            Ok(_) => journal.clear_advertisement()?,
            Err(NetError::Rejected { status, message, .. }) if (400..500).contains(&status) && status != 429 => {
                // Refused for good: the next heartbeat signs a new one.
                journal.clear_advertisement()?;
                anyhow::bail!("the messenger refused advertisement {} ({status}): {message}", item.id());
            }
            Err(e) => return Err(e.into()),
        }
        let ad = Advertisement { id: item.id(), at_ms, registry: self.registry.clone() };
        let m = &self.state.metrics.daemon;
        m.advertisements.get_or_create(&[("result", "ok")]).inc();
        m.last_advertisement_seconds.set((at_ms / 1000) as i64);
        m.ready.set(1);
        {
            let mut s = self.state.status();
            let was_ready = s.ready;
            s.ready = true;
            s.manifest = Some(self.manifest.clone());
            s.last_advertisement = Some(ad.clone());
            s.last_error = None;
            if !was_ready {
                let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready, sd_notify::NotifyState::Status("registered; serving")]);
            }
        }
        self.state.publish_advertised(ad.clone());
        Ok((ad, fresh))
    }
}

/// Pings the systemd watchdog while the worker makes progress (see `jobs::health`): a stalled
/// work loop, poster, catch-up or device stops the pings, and systemd restarts the worker.
async fn watchdog(every: Duration, jobs: Arc<jobs::Context>, shutdown: CancellationToken) {
    loop {
        let stalls = jobs.stalls();
        if stalls.is_empty() {
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
        } else {
            tracing::error!(?stalls, "not pinging the watchdog: the worker makes no progress");
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}

//! The worker daemon: wires configuration, identity, clients, the HTTP API and the
//! capacity heartbeat; owns their tasks; drains them on shutdown.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::advertise;
use crate::attest::Keypair;
use crate::capacity::{self, CapacityManifest, DetectOptions};
use crate::config::{Config, GpuSection};
use crate::gpu;
use crate::jobs;
use crate::journal::Journal;
use crate::metrics::Metrics;
use crate::net::{GatewayClient, MessengerClient, NetError, Policy, SchedulerClient};
use crate::runtime::{PoolConfig, Runtime, RuntimeConfig};

pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// An advertisement the messenger accepted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Advertisement {
    pub id: String,
    pub at_ms: u64,
    pub registry: String,
}

/// What the worker is doing, for the API and for callers that wait on it.
#[derive(Debug, Clone, Default)]
pub struct Status {
    pub ready: bool,
    pub manifest: Option<CapacityManifest>,
    pub last_advertisement: Option<Advertisement>,
    pub last_error: Option<String>,
}

/// State shared by the daemon's tasks and its API.
pub struct WorkerState {
    pub address: String,
    pub metrics: Arc<Metrics>,
    /// The work loop: journal, runtime and served processes, for the compute-unit API.
    pub jobs: Arc<jobs::Context>,
    status: Mutex<Status>,
    advertised: watch::Sender<Option<Advertisement>>,
}

impl WorkerState {
    pub fn status(&self) -> MutexGuard<'_, Status> {
        self.status.lock().unwrap_or_else(|p| p.into_inner())
    }
}

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
        let registry = config.registry.process.clone().context("registry.process is empty: set it to the registry process id")?;
        std::fs::create_dir_all(&config.worker.data_dir)
            .with_context(|| format!("cannot create worker.data_dir {}", config.worker.data_dir.display()))?;
        let address = key.address();
        let opts = DetectOptions { data_dir: config.worker.data_dir.clone(), worker_address: Some(address.clone()) };
        let mut manifest = tokio::task::spawn_blocking(move || capacity::detect(&opts)).await.context("capacity detection failed")?;
        tracing::info!(%address, capacity = %manifest.backends_summary(), "worker identity and capacity");
        let data_dir = &config.worker.data_dir;
        let pool = Arc::new(open_devices(&config.gpu, &manifest).await?);
        manifest.serving = Some(capacity::ServingInfo {
            backend: pool.kind().as_str().to_owned(),
            determinism: pool.determinism().as_str().to_owned(),
            devices: pool.infos().into_iter().map(|d| d.description).collect(),
            skipped: pool.skipped().to_vec(),
        });
        let policy = Policy::from_config(&config.network);
        let gateway = GatewayClient::new(&config.network.gateway_url, policy.clone());
        let runtime = Runtime::with_pool(
            RuntimeConfig {
                cache_dir: data_dir.join("modules"),
                max_memory: config.limits.max_memory,
                max_compute: config.limits.max_compute,
                deadline: config.limits.deadline,
            },
            PoolConfig {
                pool: pool.clone(),
                max_device_memory: config.gpu.max_device_memory,
                // Constants (model weights) come from the same gateway as modules, verified per
                // item, and are cached on each device.
                constant_source: Some(Arc::new(jobs::constants::GatewayConstants::new(gateway.clone(), tokio::runtime::Handle::current()))),
                max_constant_memory: config.gpu.max_constant_memory,
            },
        )
        .context("cannot start the wasm runtime")?;
        // Measured scores: bench.json when it matches this machine, version and backend; else a quick
        // bench of the serving backend, once, in the background (see crate::bench).
        let (serving, mode) = (runtime.tensor_backend().kind, runtime.tensor_backend().determinism);
        let scores = crate::bench::ScoreSlot::load(&manifest, data_dir, serving, mode);
        manifest.scores = scores.current();
        let metrics = Metrics::new(
            &address,
            &manifest.backends_summary(),
            runtime.tensor_backend(),
            runtime.constant_metrics(),
            Some(pool.metrics()),
        );
        let (advertised, advertised_rx) = watch::channel(None);
        let journal = Journal::open(&data_dir.join("journal.redb")).context("cannot open the journal")?;
        let scheduler = SchedulerClient::new(&config.network.scheduler_url, policy.clone());
        let messenger = MessengerClient::new(&config.network.messenger_url, policy.clone());
        let key = Arc::new(key);
        let jobs = jobs::Context::new(
            journal,
            Arc::new(runtime),
            key.clone(),
            (scheduler.clone(), messenger.clone(), gateway),
            registry.clone(),
            config.registry.authorities.clone(),
            config.attestation.target.clone().unwrap_or_else(|| registry.clone()),
            config.registry.poll_interval,
            config.jobs.max_concurrent,
            advertised_rx,
            manifest.host.cpu.model.clone(),
            metrics.clone(),
        );
        let state = Arc::new(WorkerState {
            address,
            metrics,
            jobs: jobs.clone(),
            status: Mutex::new(Status { manifest: Some(manifest.clone()), ..Status::default() }),
            advertised,
        });

        let listener = match listener {
            Some(l) => l,
            None => {
                TcpListener::bind(config.api.listen).await.with_context(|| format!("cannot listen on api.listen {}", config.api.listen))?
            }
        };
        let api_url = format!("http://{}", listener.local_addr()?);
        let shutdown = CancellationToken::new();
        let status_state = state.clone();
        if config.gpu.startup_bench {
            scores.measure_in_background(&manifest, data_dir, serving, mode, shutdown.clone(), move |s| {
                if let Some(m) = status_state.status().manifest.as_mut() {
                    m.scores = Some(s.clone());
                }
            });
        }
        let mut tasks = vec![crate::httpd::serve(listener, crate::api::router(state.clone()), shutdown.clone())];
        tracing::info!(api = %api_url, "worker api listening");

        match scheduler.process(&registry).await {
            Ok(_) => {}
            Err(e @ NetError::NotFound { .. }) => {
                shutdown.cancel();
                anyhow::bail!("registry process {registry} is not known to the scheduler at {}: {e}", scheduler.base());
            }
            Err(e) => tracing::warn!(error = %e, "cannot check the registry process yet; advertising anyway"),
        }
        let heartbeat = Heartbeat {
            state: state.clone(),
            key,
            messenger,
            registry,
            interval: config.registry.advertise_interval,
            data_dir: config.worker.data_dir.clone(),
            manifest,
            scores,
        };
        tasks.push(tokio::spawn(heartbeat.run(shutdown.clone())));
        let (processes, token) = (config.jobs.processes.clone(), shutdown.clone());
        tasks.push(tokio::spawn(async move {
            if let Err(e) = jobs::run(jobs, processes, token).await {
                tracing::error!(error = %e, "work loop stopped");
            }
        }));
        if let Some(period) = sd_notify::watchdog_enabled() {
            tasks.push(tokio::spawn(watchdog(period / 2, shutdown.clone())));
        }
        Ok(Self { state, api_url, shutdown, tasks })
    }

    /// Waits until an advertisement has been accepted, and returns it.
    pub async fn advertised(&self) -> Advertisement {
        let mut rx = self.state.advertised.subscribe();
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

/// Walks `gpu.backends` in order and opens every device (`gpu.devices`) of the first backend kind
/// that starts, logging the choice, every device and every skipped candidate with its reason;
/// fails when none of them works. Device names and memory sizes come from the capacity manifest.
async fn open_devices(cfg: &GpuSection, manifest: &CapacityManifest) -> anyhow::Result<gpu::pool::DevicePool> {
    let (order, determinism, selection) = (cfg.backends.clone(), cfg.determinism, cfg.devices.clone());
    let names: Vec<&str> = order.iter().map(|k| k.as_str()).collect();
    let inventory = inventory(manifest);
    let pool = tokio::task::spawn_blocking(move || gpu::pool::DevicePool::open(&order, determinism, &selection, &inventory))
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
fn inventory(manifest: &CapacityManifest) -> gpu::pool::Inventory {
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
    scores: crate::bench::ScoreSlot,
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
                Ok(a) => {
                    tracing::info!(id = %a.id, registry = %a.registry, "capacity advertised");
                    self.interval
                }
                Err(e) => {
                    tracing::warn!(error = %e, "capacity advertisement failed");
                    self.state.metrics.advertisements.get_or_create(&[("result", "error")]).inc();
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

    async fn advertise_once(&self) -> anyhow::Result<Advertisement> {
        let at_ms = now_ms();
        let item = advertise::build(&self.key, &self.registry, &self.manifest, at_ms)?;
        self.messenger.post_item(&item).await?;
        let ad = Advertisement { id: item.id(), at_ms, registry: self.registry.clone() };
        let m = &self.state.metrics;
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
        self.state.advertised.send_replace(Some(ad.clone()));
        Ok(ad)
    }
}

async fn watchdog(every: Duration, shutdown: CancellationToken) {
    loop {
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}

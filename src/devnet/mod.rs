//! The embedded devnet: a scheduler, a messenger and a gateway on loopback, each rooted at
//! `/` on its own port like the deployed AO units, so the worker's clients talk to it
//! exactly as they talk to the real network. State lives in `--data-dir` and survives
//! restarts. At first start it publishes the registry module and spawns the registry
//! process through its own messenger, as any AO client would.

pub mod gateway;
pub mod messenger;
pub mod scheduler;
pub mod store;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::attest::{KeyType, Keypair};
use crate::net::{GatewayClient, MessengerClient, Policy, SchedulerClient};
use crate::protocol::ao::{self, ItemType};
use crate::protocol::{DataItem, DataItemBuilder, Tag};

/// Block height of the devnet's genesis: above 1,440,000, from which compute units verify
/// hash chains.
pub const GENESIS_HEIGHT: u64 = 1_500_000;
/// One devnet block every two minutes, as on Arweave.
pub const BLOCK_MS: u64 = 120_000;

/// The devnet's clock: block heights counted from its genesis (wall time is [`crate::clock::now_ms`]).
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    genesis_ms: u64,
}

impl Clock {
    pub fn block_height(&self, at_ms: u64) -> u64 {
        GENESIS_HEIGHT + at_ms.saturating_sub(self.genesis_ms) / BLOCK_MS
    }
}

/// Where the devnet listens and keeps its data.
#[derive(Debug, Clone)]
pub struct DevnetOptions {
    pub data_dir: PathBuf,
    /// Scheduler on `port_base`, messenger +1, gateway +2, worker API +3. 0 picks free ports.
    pub port_base: u16,
    pub host: IpAddr,
    /// Behave as the deployed legacy scheduler unit: its own key and the authority's are
    /// Arweave RSA-4096 wallets, and it refuses items that are not RSA-signed (type 1).
    pub legacy_strict: bool,
}

impl DevnetOptions {
    pub fn new(data_dir: impl Into<PathBuf>, port_base: u16) -> Self {
        Self { data_dir: data_dir.into(), port_base, host: IpAddr::V4(Ipv4Addr::LOCALHOST), legacy_strict: false }
    }

    /// The same, in `--legacy-strict` mode.
    pub fn legacy_strict(mut self, on: bool) -> Self {
        self.legacy_strict = on;
        self
    }
}

/// The line the devnet prints at start, for scripts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct DevnetUrls {
    pub scheduler: String,
    pub messenger: String,
    pub gateway: String,
    pub worker: String,
    pub registry: String,
}

/// A running devnet. Dropping it does not stop it; call [`Devnet::shutdown`].
pub struct Devnet {
    pub urls: DevnetUrls,
    /// The registry's authority: it spawned the registry and signs workload assignments.
    pub authority: Keypair,
    pub scheduler_address: String,
    /// True when the scheduler refuses all but RSA-signed items: clients must sign with
    /// [`Devnet::client_key_type`].
    pub legacy_strict: bool,
    /// The listener reserved for the worker API (port base + 3).
    pub worker_listener: Option<TcpListener>,
    shutdown: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

async fn bind(host: IpAddr, port_base: u16, offset: u16) -> anyhow::Result<TcpListener> {
    let port = if port_base == 0 { 0 } else { port_base.checked_add(offset).context("port base too high")? };
    let addr = SocketAddr::new(host, port);
    TcpListener::bind(addr).await.with_context(|| format!("cannot listen on {addr}"))
}

fn url_of(l: &TcpListener) -> anyhow::Result<String> {
    Ok(format!("http://{}", l.local_addr()?))
}

/// Fast-failing policy for the devnet's own calls between its units.
fn local_policy() -> Policy {
    Policy { max_attempts: 3, ..Policy::default() }
}

impl Devnet {
    /// Opens (or creates) the devnet in `opts.data_dir` and starts its units.
    pub async fn start(opts: &DevnetOptions) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&opts.data_dir).with_context(|| format!("cannot create data dir {}", opts.data_dir.display()))?;
        let store = store::Store::open(&opts.data_dir.join("devnet.redb")).context("cannot open devnet storage")?;
        let key_type = if opts.legacy_strict { KeyType::Arweave } else { KeyType::Ed25519 };
        let su_key = Keypair::load_or_create_type(&opts.data_dir.join("scheduler.key"), key_type)?;
        let authority = Keypair::load_or_create_type(&opts.data_dir.join("authority.key"), key_type)?;
        if opts.legacy_strict {
            for (name, key) in [("scheduler.key", &su_key), ("authority.key", &authority)] {
                anyhow::ensure!(
                    key.key_type() == KeyType::Arweave,
                    "--legacy-strict needs Arweave RSA keys, but {} holds an {} key (the data dir was created without --legacy-strict); use a fresh --data-dir",
                    opts.data_dir.join(name).display(),
                    key.key_type()
                );
            }
        }
        let genesis_ms = match store.meta("genesis_ms")? {
            Some(v) => v.parse().context("corrupt genesis time")?,
            None => {
                let now = crate::clock::now_ms();
                store.set_meta("genesis_ms", &now.to_string())?;
                now
            }
        };
        let clock = Clock { genesis_ms };

        let su_listener = bind(opts.host, opts.port_base, 0).await?;
        let mu_listener = bind(opts.host, opts.port_base, 1).await?;
        let gw_listener = bind(opts.host, opts.port_base, 2).await?;
        let worker_listener = bind(opts.host, opts.port_base, 3).await?;
        let (su_url, mu_url, gw_url, worker_url) =
            (url_of(&su_listener)?, url_of(&mu_listener)?, url_of(&gw_listener)?, url_of(&worker_listener)?);

        let shutdown = CancellationToken::new();
        let su =
            scheduler::SchedulerUnit::new(store.clone(), su_key, GatewayClient::new(&gw_url, local_policy()), clock, opts.legacy_strict);
        let scheduler_address = su.address().to_owned();
        let mu = messenger::MessengerUnit::new(SchedulerClient::new(&su_url, local_policy()));
        let gw = gateway::GatewayUnit::new(store.clone(), clock);
        let tasks = vec![
            crate::httpd::serve(gw_listener, gw.router(), shutdown.clone()),
            crate::httpd::serve(su_listener, su.router(), shutdown.clone()),
            crate::httpd::serve(mu_listener, mu.router(), shutdown.clone()),
        ];

        let registry = match store.meta("registry")? {
            Some(r) => r,
            None => {
                let r = create_registry(&store, &authority, &scheduler_address, &gw_url, &mu_url)
                    .await
                    .context("cannot create the registry process")?;
                store.set_meta("registry", &r)?;
                r
            }
        };
        tracing::info!(scheduler = %su_url, messenger = %mu_url, gateway = %gw_url, %registry, "devnet up");
        Ok(Self {
            urls: DevnetUrls { scheduler: su_url, messenger: mu_url, gateway: gw_url, worker: worker_url, registry },
            authority,
            scheduler_address,
            legacy_strict: opts.legacy_strict,
            worker_listener: Some(worker_listener),
            shutdown,
            tasks,
        })
    }

    /// The key type a client (worker, user) needs for its items to be scheduled here.
    pub fn client_key_type(&self) -> KeyType {
        if self.legacy_strict { KeyType::Arweave } else { KeyType::Ed25519 }
    }

    /// Stops the units, letting in-flight requests finish.
    pub async fn shutdown(self) {
        self.shutdown.cancel();
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

/// The registry module: a real JSON-1 actor (examples/actors/registry.wat).
pub const REGISTRY_WAT: &str = include_str!("../../examples/actors/registry.wat");

/// Signs an item once: the first call stores its bytes under `meta_key` before anything is
/// posted, later calls (a retry after a crash) return those bytes, so an RSA authority, whose
/// signatures are randomized, never creates a second id for the same item.
fn signed_once(store: &store::Store, meta_key: &str, sign: impl FnOnce() -> anyhow::Result<DataItem>) -> anyhow::Result<DataItem> {
    if let Some(text) = store.meta(meta_key)? {
        let bytes = crate::protocol::b64::decode(&text).with_context(|| format!("stored item {meta_key} is not base64url"))?;
        return DataItem::parse(&bytes).with_context(|| format!("stored item {meta_key} is corrupt"));
    }
    let item = sign()?;
    store.set_meta(meta_key, &crate::protocol::b64::encode(&item.to_bytes()))?;
    Ok(item)
}

/// Publishes the registry module and spawns the registry process. Each item is signed once
/// and kept in the devnet's storage, so a retry after a crash re-posts the same ids.
async fn create_registry(
    store: &store::Store,
    authority: &Keypair,
    scheduler: &str,
    gateway_url: &str,
    messenger_url: &str,
) -> anyhow::Result<String> {
    let module = signed_once(store, "registry_module_item", || {
        let wasm = wat::parse_str(REGISTRY_WAT).context("registry module does not assemble")?;
        let module_tags = ao::module_tags("ao-gpu-worker-registry", "1-mb", "1000000");
        Ok(DataItemBuilder::new().anchor(ao::numeric_anchor(0)).tags(module_tags).data(wasm).sign(authority)?)
    })?;
    GatewayClient::new(gateway_url, local_policy()).upload(&module).await?;
    let mut tags = ao::base_tags(ItemType::Process);
    tags.extend([
        Tag::new("Module", module.id()),
        Tag::new("Scheduler", scheduler),
        Tag::new("Authority", authority.address()),
        Tag::new("Name", "ao-gpu-worker-registry"),
        Tag::new("Content-Type", "text/plain"),
    ]);
    let process = signed_once(store, "registry_process_item", || {
        Ok(DataItemBuilder::new().anchor(ao::numeric_anchor(1)).tags(tags).data(b"ao-gpu-worker registry".to_vec()).sign(authority)?)
    })?;
    MessengerClient::new(messenger_url, local_policy()).post_item(&process).await?;
    Ok(process.id())
}

/// The path of the devnet's storage inside a data dir (for tools and tests).
pub fn storage_path(data_dir: &Path) -> PathBuf {
    data_dir.join("devnet.redb")
}

//! An in-process devnet and worker serving one counter process (examples/actors/counter.c),
//! for tests of the worker's compute-unit API.

use std::time::{Duration, Instant};

use ao_gpu_worker::attest::Keypair;
use ao_gpu_worker::daemon::Worker;
use ao_gpu_worker::demo::{message, module_item};
use ao_gpu_worker::devnet::Devnet;
use ao_gpu_worker::journal::ResultRecord;
use ao_gpu_worker::net::{GatewayClient, MessengerClient, Policy};
use ao_gpu_worker::protocol::ao::{self, ItemType};
use ao_gpu_worker::protocol::{DataItemBuilder, Tag};

const WAIT: Duration = Duration::from_secs(120);

pub struct CounterNet {
    pub net: Devnet,
    pub worker: Worker,
    /// The counter process, assigned to the worker and evaluated up to its spawn.
    pub process: String,
    pub user: Keypair,
    mu: MessengerClient,
    next_anchor: u64,
    _dir: tempfile::TempDir,
}

impl CounterNet {
    /// Starts a devnet and a worker, publishes the counter module, spawns a process and has
    /// the registry's authority assign it to the worker; returns once the worker has
    /// evaluated the process's own message.
    pub async fn start() -> Self {
        Self::start_with("").await
    }

    /// [`CounterNet::start`] with `extra` TOML appended to the worker's configuration.
    pub async fn start_with(extra: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (net, worker) = super::inproc::devnet_and_worker(dir.path(), extra).await;
        let mu = MessengerClient::new(&net.urls.messenger, Policy::default());
        let module = module_item(&net.authority).unwrap();
        GatewayClient::new(&net.urls.gateway, Policy::default()).upload(&module).await.unwrap();

        let mut tags = ao::base_tags(ItemType::Process);
        tags.extend([Tag::new("Module", module.id()), Tag::new("Scheduler", &net.scheduler_address), Tag::new("Name", "counter")]);
        let spawn = DataItemBuilder::new().anchor(ao::numeric_anchor(1)).tags(tags).data(b" ".to_vec()).sign(&net.authority).unwrap();
        mu.post_item(&spawn).await.unwrap();
        let me = worker.state.address.clone();
        let process = spawn.id();
        let assign =
            message(&net.authority, &net.urls.registry, 2, &[("Action", "Assign-Workload"), ("Worker", &me), ("Process", &process)], "")
                .unwrap();
        mu.post_item(&assign).await.unwrap();
        let user = Keypair::generate().unwrap();
        let this = Self { net, worker, process, user, mu, next_anchor: 1, _dir: dir };
        this.wait_result(&this.process).await;
        this
    }

    /// The worker's API base URL (the compute unit).
    pub fn cu_url(&self) -> &str {
        &self.worker.api_url
    }

    /// Sends one message from `user` to the counter process; returns its id.
    pub async fn send(&mut self, tags: &[(&str, &str)], data: &str) -> String {
        let m = message(&self.user, &self.process, self.next_anchor, tags, data).unwrap();
        self.next_anchor += 1;
        self.mu.post_item(&m).await.unwrap();
        m.id()
    }

    /// Sends a message and waits for its result in the journal.
    pub async fn send_and_wait(&mut self, tags: &[(&str, &str)], data: &str) -> (String, ResultRecord) {
        let id = self.send(tags, data).await;
        let r = self.wait_result(&id).await;
        (id, r)
    }

    /// Waits until the journal has the result of `message`.
    pub async fn wait_result(&self, message: &str) -> ResultRecord {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(r) = self.worker.state.jobs.journal.result_by_message(message).unwrap() {
                return r;
            }
            let halted = self.worker.state.jobs.halted();
            assert!(halted.is_empty(), "halted: {halted:?}");
            assert!(Instant::now() < deadline, "no result for {message} within {WAIT:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn shutdown(self) {
        self.worker.shutdown().await;
        self.net.shutdown().await;
    }
}

//! What `verify` costs against what it checks: a worker on the in-process devnet (CPU backend,
//! reproducible) evaluates the MLP actor's `Infer` 32 times, and the verifier re-executes the
//! same range from the process start on the CPU and compares every attestation.
//!
//! - `verify/worker_evaluates_32_mlp_messages`: from posting 32 messages to a fresh process to
//!   their 32 results in the worker's journal (scheduling, evaluation, attestation, commit).
//! - `verify/verify_32_mlp_messages`: `verifier::verify` of the last attestation of such a
//!   process: fetching and checking the attestation chain, process, module and schedule, then
//!   re-executing the 33 messages (the process's own included) and comparing.
//!
//! Run with `cargo bench --bench verify`.

use std::time::{Duration, Instant};

use ao_gpu_worker::attest::Keypair;
use ao_gpu_worker::config::{Config, Overrides};
use ao_gpu_worker::daemon::Worker;
use ao_gpu_worker::demo::{MLP_INPUT, MLP_WASM, message, named_module_item, process_item};
use ao_gpu_worker::devnet::{Devnet, DevnetOptions};
use ao_gpu_worker::gpu::BackendKind;
use ao_gpu_worker::net::{GatewayClient, MessengerClient, Policy};
use ao_gpu_worker::verifier::{self, Request, Target, Verdict};
use criterion::{Criterion, criterion_group, criterion_main};

const MESSAGES: u64 = 32;

struct Bench {
    net: Devnet,
    worker: Worker,
    mu: MessengerClient,
    gw: GatewayClient,
    module: String,
    user: Keypair,
    anchor: u64,
}

impl Bench {
    async fn start(dir: &std::path::Path) -> Self {
        let mut net = Devnet::start(&DevnetOptions::new(dir.join("devnet"), 0)).await.unwrap();
        let text = format!(
            "[worker]\ndata_dir = {:?}\n[network]\nscheduler_url = {:?}\nmessenger_url = {:?}\ngateway_url = {:?}\n\
             [registry]\nprocess = {:?}\nauthorities = [{:?}]\npoll_interval = \"20ms\"\n[api]\nlisten = \"127.0.0.1:0\"\n\
             [gpu]\nbackends = [\"cpu\"]\nstartup_bench = \"off\"\n",
            dir.join("worker").display().to_string(),
            net.urls.scheduler,
            net.urls.messenger,
            net.urls.gateway,
            net.urls.registry,
            net.authority.address(),
        );
        let config = Config::parse("bench", &text, &Overrides::default()).unwrap();
        let worker = Worker::start(config, Keypair::generate().unwrap(), net.worker_listener.take()).await.unwrap();
        let mu = MessengerClient::new(&net.urls.messenger, Policy::default());
        let gw = GatewayClient::new(&net.urls.gateway, Policy::default());
        let module = named_module_item(&net.authority, "mlp", MLP_WASM).unwrap();
        gw.upload(&module).await.unwrap();
        Self { net, worker, mu, gw, module: module.id(), user: Keypair::generate().unwrap(), anchor: 100 }
    }

    async fn wait(&self, message: &str) {
        while self.worker.state.jobs.journal.result_by_message(message).unwrap().is_none() {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// A fresh MLP process assigned to the worker, its own message evaluated.
    async fn spawn(&mut self) -> String {
        self.anchor += 1;
        let p = process_item(&self.net.authority, &self.module, &self.net.scheduler_address, self.anchor, "mlp").unwrap();
        self.mu.post_item(&p).await.unwrap();
        let me = self.worker.state.address.clone();
        let assign = message(
            &self.net.authority,
            &self.net.urls.registry,
            self.anchor,
            &[("Action", "Assign-Workload"), ("Worker", &me), ("Process", &p.id())],
            "",
        )
        .unwrap();
        self.mu.post_item(&assign).await.unwrap();
        self.wait(&p.id()).await;
        p.id()
    }

    /// Posts MESSAGES inferences and waits for the last result; the time it took.
    async fn evaluate(&mut self, process: &str) -> Duration {
        let data = serde_json::to_string(&MLP_INPUT.to_vec()).unwrap();
        let items: Vec<_> =
            (0..MESSAGES).map(|i| message(&self.user, process, self.anchor * 1000 + i, &[("Action", "Infer")], &data).unwrap()).collect();
        let started = Instant::now();
        for m in &items {
            self.mu.post_item(m).await.unwrap();
        }
        self.wait(&items.last().unwrap().id()).await;
        started.elapsed()
    }

    /// The latest attestation of `process`, once on the gateway.
    async fn attestation(&self, process: &str) -> String {
        let id = self.worker.state.jobs.journal.progress(process).unwrap().unwrap().attestation.unwrap();
        while !self.gw.exists(&id).await.unwrap() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // The chain's earlier links were posted before it.
        tokio::time::sleep(Duration::from_millis(200)).await;
        id
    }
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut b = rt.block_on(Bench::start(dir.path()));
    let mut g = c.benchmark_group("verify");
    g.sample_size(10);
    g.bench_function("worker_evaluates_32_mlp_messages", |bench| {
        bench.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                total += rt.block_on(async {
                    let p = b.spawn().await;
                    b.evaluate(&p).await
                });
            }
            total
        })
    });
    let process = rt.block_on(async {
        let p = b.spawn().await;
        b.evaluate(&p).await;
        p
    });
    let id = rt.block_on(b.attestation(&process));
    let request = Request {
        target: Target::Attestation { id, from: None },
        scheduler: b.net.urls.scheduler.clone(),
        gateway: b.net.urls.gateway.clone(),
        worker: Some(b.worker.api_url.clone()),
        backend: BackendKind::Cpu,
        policy: Policy::default(),
        checkpoint_every: 32,
    };
    let report = rt.block_on(verifier::verify(&request));
    assert_eq!(report.verdict, Verdict::Agree, "{}", report.human());
    assert_eq!(report.executed, MESSAGES + 1);
    g.bench_function("verify_32_mlp_messages", |bench| {
        bench.iter(|| {
            let report = rt.block_on(verifier::verify(&request));
            assert_eq!(report.verdict, Verdict::Agree);
        })
    });
    g.finish();
    let Bench { net, worker, .. } = b;
    rt.block_on(async {
        worker.shutdown().await;
        net.shutdown().await;
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);

//! Worker throughput, from the outside in:
//!
//! - `worker/e2e_counter_increment`: messages per second end to end for the counter actor, a
//!   devnet and a worker in this process over loopback HTTP: K `Increment` messages posted
//!   through the messenger (8 in flight), timed until the journal holds all K results. Each
//!   message costs one scheduler commit, one evaluation, one journal commit and one posted
//!   attestation (another scheduler commit); the clock stops at the journal commit, while the
//!   attestations may still be posting (they are drained, untimed, before the next batch).
//! - `journal/commit_*`: one evaluated message committed to the journal (redb, durable) with
//!   a realistic result and attestation, with a changed 64 KiB state image and with an
//!   unchanged one.
//! - `runtime/evaluate_counter_increment`: one `Runtime::evaluate` of counter.wasm's
//!   `Increment` from a restored state, no I/O.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ao_gpu_worker::attest::Keypair;
use ao_gpu_worker::attest::attestation::{Attestation, VERSION_1 as VERSION};
use ao_gpu_worker::config::{Config, Overrides};
use ao_gpu_worker::daemon::Worker;
use ao_gpu_worker::demo::COUNTER_WASM;
use ao_gpu_worker::devnet::{Devnet, DevnetOptions};
use ao_gpu_worker::jobs::eval::{self, Slot};
use ao_gpu_worker::journal::{Commit, Journal, OutKind, Outgoing, Progress, ResultRecord, sha256_hex};
use ao_gpu_worker::net::{GatewayClient, MessengerClient, Policy};
use ao_gpu_worker::protocol::ao;
use ao_gpu_worker::protocol::su::ItemJson;
use ao_gpu_worker::protocol::{DataItem, DataItemBuilder, b64};
use ao_gpu_worker::runtime::{EvalInput, Runtime, RuntimeConfig};
use criterion::{BatchSize, Criterion, SamplingMode, Throughput, criterion_group, criterion_main};

/// Messages per end-to-end batch.
const K: u64 = 100;
/// Posts in flight at once during a batch.
const IN_FLIGHT: usize = 8;

fn module_item(key: &Keypair) -> DataItem {
    DataItemBuilder::new()
        .anchor(ao::numeric_anchor(0))
        .tags(ao::module_tags("counter", "16-mb", "1000000000"))
        .data(COUNTER_WASM.to_vec())
        .sign(key)
        .unwrap()
}

fn process_item(key: &Keypair, module: &str, scheduler: &str) -> DataItem {
    ao_gpu_worker::demo::process_item(key, module, scheduler, 1, "bench-counter").unwrap()
}

fn message(key: &Keypair, target: &str, anchor: u64, tags: &[(&str, &str)]) -> DataItem {
    ao_gpu_worker::demo::message(key, target, anchor, tags, "").unwrap()
}

fn e2e(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut net = rt.block_on(Devnet::start(&DevnetOptions::new(dir.path().join("devnet"), 0))).unwrap();
    let worker_dir = dir.path().join("worker");
    let text = format!(
        "[worker]\ndata_dir = {data:?}\n[network]\nscheduler_url = {su:?}\nmessenger_url = {mu:?}\ngateway_url = {gw:?}\n\
         [registry]\nprocess = {reg:?}\nauthorities = [{auth:?}]\npoll_interval = \"50ms\"\n",
        data = worker_dir.display().to_string(),
        su = net.urls.scheduler,
        mu = net.urls.messenger,
        gw = net.urls.gateway,
        reg = net.urls.registry,
        auth = net.authority.address(),
    );
    let config = Config::parse("(bench worker)", &text, &Overrides::default()).unwrap();
    let worker = rt.block_on(Worker::start(config, Keypair::from_secret(&[0x61; 32]), net.worker_listener.take())).unwrap();
    let journal = worker.state.jobs.journal.clone();

    let mu = MessengerClient::new(&net.urls.messenger, Policy::default());
    let gw = GatewayClient::new(&net.urls.gateway, Policy::default());
    let publisher = Keypair::from_secret(&[0x62; 32]);
    let user = Keypair::from_secret(&[0x63; 32]);
    let module = module_item(&publisher);
    let process = process_item(&publisher, &module.id(), &net.scheduler_address);
    let pid = process.id();
    rt.block_on(async {
        gw.upload(&module).await.unwrap();
        mu.post_item(&process).await.unwrap();
        let assign = message(
            &net.authority,
            &net.urls.registry,
            1,
            &[("Action", "Assign-Workload"), ("Worker", &worker.state.address), ("Process", &pid)],
        );
        mu.post_item(&assign).await.unwrap();
        // The process message itself (nonce 0) evaluated: the worker serves it.
        let deadline = Instant::now() + Duration::from_secs(120);
        while journal.progress(&pid).unwrap().is_none() {
            assert!(Instant::now() < deadline, "the worker did not pick up the process: {:?}", worker.state.jobs.halted());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });

    let mu = Arc::new(mu);
    let mut anchor = 1000u64;
    let mut g = c.benchmark_group("worker");
    g.sample_size(10).sampling_mode(SamplingMode::Flat).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(10));
    g.throughput(Throughput::Elements(K));
    g.bench_function("e2e_counter_increment", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                // Untimed: sign the batch, let the previous batch's attestations drain.
                let batch: Vec<DataItem> = (0..K)
                    .map(|i| {
                        anchor += 1;
                        message(&user, &pid, anchor, &[("Action", "Increment"), ("Amount", &(1 + i % 7).to_string())])
                    })
                    .collect();
                rt.block_on(async {
                    while journal.pending_count().unwrap() > 0 {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                });
                let target = journal.progress(&pid).unwrap().unwrap().nonce + K;
                let start = Instant::now();
                rt.block_on(async {
                    let permits = Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT));
                    let mut posts = tokio::task::JoinSet::new();
                    for m in batch {
                        let (mu, permits) = (mu.clone(), permits.clone());
                        posts.spawn(async move {
                            let _permit = permits.acquire_owned().await.unwrap();
                            mu.post_item(&m).await.unwrap();
                        });
                    }
                    while let Some(r) = posts.join_next().await {
                        r.unwrap();
                    }
                    while journal.progress(&pid).unwrap().unwrap().nonce < target {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                });
                total += start.elapsed();
            }
            total
        })
    });
    g.finish();
    assert!(worker.state.jobs.halted().is_empty(), "{:?}", worker.state.jobs.halted());
    rt.block_on(async {
        worker.shutdown().await;
        net.shutdown().await;
    });
}

/// A 64 KiB memory image like a small actor's: a few KiB of data, the rest zero, with
/// `version` written into it so that each version has its own hash.
fn image(version: u64) -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(7);
    let mut m = vec![0u8; 64 * 1024];
    m[..8192].fill_with(|| rng.u8(..));
    m[16384..16392].copy_from_slice(&version.to_le_bytes());
    m
}

struct Prepared {
    progress: Progress,
    result: ResultRecord,
    state: Vec<u8>,
    outgoing: Vec<Outgoing>,
}

fn prepare(key: &Keypair, process: &str, nonce: u64, image: Vec<u8>) -> Prepared {
    let state_hash = sha256_hex(&image);
    let message = b64::encode(&sha256_hex(format!("msg-{nonce}").as_bytes()).as_bytes()[..32]);
    let response = serde_json::json!({
        "Output": format!("count={nonce}"), "Messages": [], "Spawns": [], "Assignments": [], "GasUsed": 123_456,
    });
    let result_hash = sha256_hex(response.to_string().as_bytes());
    let hash_chain = b64::encode(&[nonce as u8; 32]);
    let attestation = Attestation {
        version: VERSION,
        process: process.to_owned(),
        message: message.clone(),
        nonce,
        hash_chain: hash_chain.clone(),
        module: b64::encode(&[3; 32]),
        message_sha256: sha256_hex(b"message json"),
        env_sha256: sha256_hex(b"env json"),
        result_sha256: result_hash.clone(),
        state_sha256: Some(state_hash.clone()),
        gas_used: 123_456,
        backend: "cpu".into(),
        device: "AMD EPYC".into(),
        capacity_advertisement: Some(b64::encode(&[4; 32])),
        v2: None,
    }
    .sign(key, process)
    .unwrap();
    let outgoing = vec![Outgoing {
        id: attestation.id(),
        kind: OutKind::Attestation,
        process: process.to_owned(),
        nonce,
        bytes: attestation.to_bytes(),
        confirmed: false,
        refused: None,
    }];
    let progress = Progress {
        nonce,
        hash_chain,
        assignment: b64::encode(&[5; 32]),
        state_hash: Some(state_hash.clone()),
        timestamp: 1_700_000_000_000 + nonce,
        checkpoint: None,
        attestation: None,
    };
    let result = ResultRecord {
        process: process.to_owned(),
        message,
        nonce,
        timestamp: progress.timestamp,
        block_height: 1_500_000,
        response,
        message_hash: sha256_hex(b"message json"),
        result_hash,
        state_hash: Some(state_hash),
        gas_used: 123_456,
        posted: outgoing.iter().map(|o| o.id.clone()).collect(),
        replay: None,
        trace: None,
    };
    Prepared { progress, result, state: image, outgoing }
}

fn journal_commit(c: &mut Criterion) {
    let key = Keypair::from_secret(&[0x64; 32]);
    let process = b64::encode(&[9; 32]);
    let mut g = c.benchmark_group("journal");
    g.sample_size(10).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(5));
    g.throughput(Throughput::Elements(1));
    for changed in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::open(&dir.path().join("journal.redb")).unwrap();
        let mut nonce = 0u64;
        let mut last_posted: Option<String> = None;
        let name = if changed { "commit_64k_state_changed" } else { "commit_64k_state_unchanged" };
        g.bench_function(name, |b| {
            b.iter_batched(
                || {
                    // The poster confirms the previous item, as it would between commits.
                    if let Some(id) = last_posted.take() {
                        journal.confirm(&id).unwrap();
                    }
                    let p = prepare(&key, &process, nonce, image(if changed { nonce } else { 0 }));
                    nonce += 1;
                    last_posted = Some(p.outgoing[0].id.clone());
                    p
                },
                |p| {
                    journal
                        .commit(&Commit { progress: &p.progress, result: &p.result, state: Some(&p.state), outgoing: &p.outgoing })
                        .unwrap()
                },
                BatchSize::PerIteration,
            )
        });
    }
    g.finish();
}

fn evaluate(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let runtime = Runtime::new(RuntimeConfig {
        cache_dir: dir.path().join("modules"),
        max_memory: 1 << 30,
        max_compute: 9_000_000_000_000,
        deadline: Duration::from_secs(60),
    })
    .unwrap();
    let key = Keypair::from_secret(&[0x65; 32]);
    let module_item = module_item(&key);
    let module = runtime.load(&module_item.data, &module_item.tags).unwrap();
    let process_item = process_item(&key, &module_item.id(), &b64::encode(&[8; 32]));
    let process = ItemJson::from_item(&process_item);
    let limits = runtime.limits(&module_item.tags, &process.tags).unwrap();
    let env_json = eval::env_json(&process, &module_item);
    let slot = |nonce: u64| Slot {
        nonce,
        epoch: 0,
        timestamp: 1_700_000_000_000 + nonce,
        block_height: 1_500_000,
        hash_chain: b64::encode(&[nonce as u8; 32]),
        assignment: b64::encode(&[7; 32]),
    };
    let run = |item: &ItemJson, nonce: u64, state: Option<&[u8]>| {
        let msg_json = eval::message_json(item, &slot(nonce), &module_item.id(), false);
        let input =
            EvalInput { msg_json: &msg_json, env_json: &env_json, timestamp_ms: slot(nonce).timestamp, message_id: &item.id, limits };
        runtime.evaluate(&module, state, &input)
    };
    // The process message, then one increment: a realistic state to restore.
    let first = run(&process, 0, None);
    assert!(first.outcome.is_ok(), "{:?}", first.outcome);
    let user = Keypair::from_secret(&[0x66; 32]);
    let inc = ItemJson::from_item(&message(&user, &process.id, 1, &[("Action", "Increment"), ("Amount", "3")]));
    let second = run(&inc, 1, first.memory.as_deref());
    let state = second.memory.unwrap();
    let inc = ItemJson::from_item(&message(&user, &process.id, 2, &[("Action", "Increment"), ("Amount", "5")]));
    let msg_json = eval::message_json(&inc, &slot(2), &module_item.id(), false);
    let input = EvalInput { msg_json: &msg_json, env_json: &env_json, timestamp_ms: slot(2).timestamp, message_id: &inc.id, limits };
    let check = runtime.evaluate(&module, Some(&state), &input);
    assert_eq!(check.outcome.as_ref().unwrap()["Output"], "count=8");
    eprintln!("runtime/evaluate_counter_increment: state {} bytes, gas {}", state.len(), check.gas_used);

    let mut g = c.benchmark_group("runtime");
    g.sample_size(10).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(5));
    g.throughput(Throughput::Elements(1));
    g.bench_function("evaluate_counter_increment", |b| b.iter(|| runtime.evaluate(&module, Some(&state), &input)));
    g.finish();
}

criterion_group!(benches, e2e, journal_commit, evaluate);
criterion_main!(benches);

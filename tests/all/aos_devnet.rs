//! aos processes served end to end on the devnet: two aos 2.0 processes (the E4 fixture) spawned
//! through the messenger, assigned to the worker through the registry, pulled in order from the
//! scheduler, evaluated on live instances with the compute unit's semantics (an `Eval` error rolls
//! back), a `Send` from one signed by the worker and delivered to the other, every result attested;
//! then `@permaweb/aoconnect` reads a result and runs a dry-run against the worker's CU API.
//!
//! Needs the aos fixtures (see support/aos.rs) and, for the aoconnect half, node with
//! tests/js's packages (REQUIRE_INTEROP as in interop_aoconnect.rs).

use std::sync::Mutex;

use ao_gpu_worker::demo::aos::{AosDemo, run};
use serde_json::{Value, json};

use crate::support::aos::{fixture, fixtures_dir};
use crate::support::inproc::devnet_and_worker;
use crate::support::{interop_dir, run_node};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aos_processes_run_on_the_devnet_and_aoconnect_reads_their_results() {
    let test = "aos_processes_run_on_the_devnet_and_aoconnect_reads_their_results";
    if fixture(test, "emscripten4.wasm").is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (net, worker) = devnet_and_worker(dir.path(), "").await;
    let demo = AosDemo { module: fixtures_dir().join("emscripten4.wasm"), format: "wasm32-unknown-emscripten4".into() };
    let lines = Mutex::new(Vec::<Value>::new());
    let outcome = run(&net, &worker, &demo, &|v| lines.lock().unwrap().push(v.clone())).await;
    let lines = lines.into_inner().unwrap();
    outcome.unwrap_or_else(|e| panic!("aos demo failed: {e:#}\n{lines:#?}"));

    let evals: Vec<&Value> = lines.iter().filter(|l| l.get("eval").is_some()).collect();
    assert_eq!(evals.len(), 5, "{lines:#?}");
    assert!(evals.iter().all(|l| l["attestation"].is_string()), "every message is attested");
    // The failed Eval keeps the state from before it.
    assert_eq!(evals[2]["state"], evals[1]["state"], "error('boom') rolled back");
    assert_ne!(evals[3]["state"], evals[1]["state"]);
    let done = lines.last().unwrap();
    assert_eq!(done["aos_demo"], "ok");
    assert_eq!(done["inbox"], "hello from aos-a (Ping)");
    assert!(done["live_processes"].as_u64().unwrap() >= 1, "the worker kept live instances: {done}");
    let processes = &lines[0]["aos_processes"];
    let a = processes[0].as_str().unwrap().to_owned();

    // GET /state rebuilds the memory after the latest message (from the last checkpoint, the
    // messages since replayed and checked against the journal's state commitment).
    let r = reqwest::get(format!("{}/state/{a}", worker.api_url)).await.unwrap();
    assert_eq!(r.status(), 200);
    let progress = worker.state.jobs.journal.progress(&a).unwrap().unwrap();
    assert_eq!(r.headers()["last-ordinate"].to_str().unwrap(), progress.nonce.to_string());
    let checkpoint = progress.checkpoint.clone().expect("aos processes are checkpointed");
    assert!(checkpoint.after.unwrap() < progress.nonce, "messages since the checkpoint were replayed: {progress:?}");
    let memory = r.bytes().await.unwrap();
    assert!(memory.len() > 100_000_000, "aos 2.0's whole memory: {} bytes", memory.len());

    // The latest attestation of aos-a verifies: re-executed from the spawn on a runtime of the
    // verifier's own, checkpoints and chained state commitments kept as the worker keeps them;
    // aos makes no ao_gpu call, so its trace is the empty one.
    let attestation = progress.attestation.clone().expect("v2 progress names its attestation");
    let gateway = ao_gpu_worker::net::GatewayClient::new(&net.urls.gateway, ao_gpu_worker::net::Policy::default());
    while !gateway.exists(&attestation).await.unwrap() {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let item = gateway.item(&attestation).await.unwrap();
    assert_eq!(item.tag("Trace-Root"), Some(ao_gpu_worker::attest::trace::EMPTY_ROOT));
    let report = ao_gpu_worker::verifier::verify(&ao_gpu_worker::verifier::Request {
        target: ao_gpu_worker::verifier::Target::Attestation { id: attestation, from: None },
        scheduler: net.urls.scheduler.clone(),
        gateway: net.urls.gateway.clone(),
        worker: Some(worker.api_url.clone()),
        backend: ao_gpu_worker::gpu::BackendKind::Cpu,
        policy: ao_gpu_worker::net::Policy::default(),
        checkpoint_every: 32,
    })
    .await;
    assert_eq!(report.verdict, ao_gpu_worker::verifier::Verdict::Agree, "{}", report.human());
    assert_eq!(report.executed, progress.nonce + 1, "{}", report.human());

    // The capacity manifest advertises the aos formats.
    let formats = ao_gpu_worker::runtime::supported_formats();
    assert!(formats.contains(&"wasm32-unknown-emscripten4"), "{formats:?}");

    if let Some(js) = interop_dir(test) {
        let count_msg = evals[3]["aos_message"].as_str().unwrap().to_owned();
        let record = worker.state.jobs.journal.result_by_message(&count_msg).unwrap().unwrap();
        let progress_before = worker.state.jobs.journal.progress(&a).unwrap();
        let cu = worker.api_url.clone();
        let args = vec![net.urls.messenger.clone(), cu, net.urls.gateway.clone(), a.clone(), count_msg.clone()];
        let stdout = tokio::task::spawn_blocking(move || run_node(&js, "aoconnect.js", &args)).await.unwrap();
        let out: Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
        let mut served = record.response.clone();
        served.as_object_mut().unwrap().remove("Log");
        assert_eq!(out["result"], served, "aoconnect reads the journal's result unchanged");
        assert_eq!(out["result"]["Output"]["data"], "5", "{out}");
        // A dry-run (Action=Get: no aos handler matches) evaluates against the latest state and
        // keeps nothing.
        let dryrun = &out["dryrun"];
        assert!(dryrun.get("Error").is_none(), "{out}");
        assert_eq!(dryrun["GasUsed"], json!(0), "unmetered format: {out}");
        assert_eq!(worker.state.jobs.journal.progress(&a).unwrap(), progress_before, "the dry-run left no trace");
    }
    worker.shutdown().await;
    net.shutdown().await;
}

/// A measurement, not a check (run with `--ignored --nocapture`): end-to-end messages per second
/// of one aos 2.0 process on the devnet (post through the messenger, schedule, pull, evaluate on
/// the live instance, hash and journal the state, sign and post the attestation).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn measure_aos_messages_per_second_end_to_end() {
    use ao_gpu_worker::demo::{message, spawn_and_assign};
    use ao_gpu_worker::net::{GatewayClient, MessengerClient, Policy};
    use ao_gpu_worker::protocol::ao::{self, ItemType};
    use ao_gpu_worker::protocol::{DataItemBuilder, Tag};
    let Some(wasm) = fixture("measure", "emscripten4.wasm") else { return };
    let dir = tempfile::tempdir().unwrap();
    let (net, worker) = devnet_and_worker(dir.path(), "").await;
    let mu = MessengerClient::new(&net.urls.messenger, Policy::default());
    let tags = ao::format_module_tags("wasm32-unknown-emscripten4", "aos", "1-gb", "9000000000000");
    let module = DataItemBuilder::new().anchor(ao::numeric_anchor(0)).tags(tags).data(wasm).sign(&net.authority).unwrap();
    GatewayClient::new(&net.urls.gateway, Policy::default()).upload(&module).await.unwrap();
    let mut tags = ao::base_tags(ItemType::Process);
    tags.extend([
        Tag::new("Module", module.id()),
        Tag::new("Scheduler", &net.scheduler_address),
        Tag::new("Authority", &worker.state.address),
    ]);
    let p = DataItemBuilder::new().anchor(ao::numeric_anchor(1)).tags(tags).data(b" ".to_vec()).sign(&net.authority).unwrap();
    spawn_and_assign(&mu, &net, &worker, &p, 2).await.unwrap();
    let n = 40u64;
    let mut last = String::new();
    let started = std::time::Instant::now();
    for i in 0..n {
        let code = if i % 2 == 0 {
            "count = (count or 0) + 1\nreturn count".to_owned()
        } else {
            format!("Send({{Target = 'X', Data = 'hi {i}', Action = 'Ping'}})")
        };
        let m = message(&net.authority, &p.id(), 10 + i, &[("Action", "Eval")], &code).unwrap();
        mu.post_item(&m).await.unwrap();
        last = m.id();
    }
    let journal = &worker.state.jobs.journal;
    while journal.result_by_message(&last).unwrap().is_none() {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let secs = started.elapsed().as_secs_f64();
    println!("aos E4 end to end: {n} messages in {secs:.2} s = {:.1} msg/s", n as f64 / secs);
    worker.shutdown().await;
    net.shutdown().await;
}

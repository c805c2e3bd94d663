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

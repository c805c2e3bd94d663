//! Journal retention on a real worker and devnet: with `keep_results` small, background
//! compaction leaves only the newest results (the CU API's `/results` shows just those), the
//! latest result is still served, the metrics count what went and the journal's size, and a
//! restart rebuilds the process's state and evaluates the next message on it.

use std::time::{Duration, Instant};

use ao_gpu_worker::attest::Keypair;
use ao_gpu_worker::config::{Config, Overrides};
use ao_gpu_worker::daemon::Worker;
use ao_gpu_worker::demo::{message, module_item, process_item};
use ao_gpu_worker::devnet::{Devnet, DevnetOptions};
use ao_gpu_worker::journal::ResultRecord;
use ao_gpu_worker::net::{GatewayClient, MessengerClient, Policy};
use serde_json::Value;

const KEEP: usize = 3;

async fn start(config: &str, net: &mut Devnet) -> Worker {
    let config = Config::parse("test", config, &Overrides::default()).unwrap();
    Worker::start(config, Keypair::from_secret(&[7; 32]), net.worker_listener.take()).await.unwrap()
}

async fn wait_result(worker: &Worker, id: &str) -> ResultRecord {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(r) = worker.state.jobs.journal.result_by_message(id).unwrap() {
            return r;
        }
        assert!(Instant::now() < deadline, "no result for {id} within 120 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn metric(text: &str, name: &str) -> Option<u64> {
    text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse::<f64>().ok()).map(|v| v as u64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_keeps_the_newest_results_and_a_restart_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let mut net = Devnet::start(&DevnetOptions::new(dir.path().join("devnet"), 0)).await.unwrap();
    let config = format!(
        "[worker]\ndata_dir = {:?}\n[network]\nscheduler_url = {:?}\nmessenger_url = {:?}\ngateway_url = {:?}\nmax_attempts = 3\n\
         [registry]\nprocess = {:?}\nauthorities = [{:?}]\npoll_interval = \"50ms\"\n[api]\nlisten = \"127.0.0.1:0\"\n\
         [gpu]\nbackends = [\"cpu\"]\nstartup_bench = \"off\"\n[retention]\nkeep_results = {KEEP}\ninterval = \"1s\"\n",
        dir.path().join("worker").display().to_string(),
        net.urls.scheduler,
        net.urls.messenger,
        net.urls.gateway,
        net.urls.registry,
        net.authority.address(),
    );
    let worker = start(&config, &mut net).await;
    let mu = MessengerClient::new(&net.urls.messenger, Policy::default());
    let module = module_item(&net.authority).unwrap();
    GatewayClient::new(&net.urls.gateway, Policy::default()).upload(&module).await.unwrap();
    let process = process_item(&net.authority, &module.id(), &net.scheduler_address, 1, "retained").unwrap();
    let p = process.id();
    mu.post_item(&process).await.unwrap();
    let me = worker.state.address.clone();
    let assign =
        message(&net.authority, &net.urls.registry, 2, &[("Action", "Assign-Workload"), ("Worker", &me), ("Process", &p)], "").unwrap();
    mu.post_item(&assign).await.unwrap();
    wait_result(&worker, &p).await;

    // Nonce 0 is the process; then 8 increments of 1 (nonces 1..=8).
    let user = Keypair::generate().unwrap();
    let mut ids = Vec::new();
    for n in 1..=8u64 {
        let m = message(&user, &p, n, &[("Action", "Increment")], "").unwrap();
        mu.post_item(&m).await.unwrap();
        wait_result(&worker, &m.id()).await;
        ids.push(m.id());
    }
    let journal = worker.state.jobs.journal.clone();
    let deadline = Instant::now() + Duration::from_secs(60);
    while journal.results(&p, None, None, 100, false).unwrap().len() > KEEP {
        assert!(Instant::now() < deadline, "no compaction within 60 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let cu = worker.api_url.clone();
    let page: Value = reqwest::get(format!("{cu}/results/{p}?limit=100")).await.unwrap().json().await.unwrap();
    let cursors: Vec<u64> = page["edges"].as_array().unwrap().iter().map(|e| e["cursor"].as_str().unwrap().parse().unwrap()).collect();
    assert_eq!(cursors, [6, 7, 8], "{page}");
    assert!(journal.result_by_message(&ids[0]).unwrap().is_none(), "an old result is gone");
    let latest = reqwest::get(format!("{cu}/result/{}?process-id={p}", ids[7])).await.unwrap();
    assert_eq!(latest.status(), reqwest::StatusCode::OK);
    let latest: Value = latest.json().await.unwrap();
    assert_eq!(latest["Output"], "count=8", "{latest}");
    let metrics = reqwest::get(format!("{cu}/metrics")).await.unwrap().text().await.unwrap();
    assert!(metric(&metrics, "ao_worker_journal_compacted_total").is_some_and(|n| n >= 6), "{metrics}");
    assert!(metric(&metrics, "ao_worker_journal_bytes").is_some_and(|n| n > 0), "{metrics}");
    drop(journal);
    worker.shutdown().await;

    // A restart on the compacted journal rebuilds the state and evaluates the next message on it.
    let worker = start(&config, &mut net).await;
    let get = message(&user, &p, 9, &[("Action", "Get")], "").unwrap();
    mu.post_item(&get).await.unwrap();
    let r = wait_result(&worker, &get.id()).await;
    assert_eq!(r.response["Output"], "count=8", "{:?}", r.response);
    assert_eq!(r.nonce, 9);
    worker.shutdown().await;
    net.shutdown().await;
}

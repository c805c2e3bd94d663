//! An in-process devnet with a worker attached to it, as most integration tests need.

use std::path::Path;

use ao_gpu_worker::attest::Keypair;
use ao_gpu_worker::config::{Config, Overrides};
use ao_gpu_worker::daemon::Worker;
use ao_gpu_worker::devnet::{Devnet, DevnetOptions};

/// Starts a devnet in `dir/devnet` and a worker in `dir/worker` that obeys the devnet's
/// authority and polls every 50 ms. `extra` is TOML appended to the worker's configuration
/// (whole sections only, e.g. `[gpu]\nbackends = ["cpu"]\n`).
pub async fn devnet_and_worker(dir: &Path, extra: &str) -> (Devnet, Worker) {
    // Tests do not need measured scores: no background bench competing with them, unless asked.
    let extra = if extra.contains("startup_bench") {
        extra.to_owned()
    } else if extra.contains("[gpu]\n") {
        extra.replacen("[gpu]\n", "[gpu]\nstartup_bench = \"off\"\n", 1)
    } else {
        format!("{extra}\n[gpu]\nstartup_bench = \"off\"\n")
    };
    let mut net = Devnet::start(&DevnetOptions::new(dir.join("devnet"), 0)).await.unwrap();
    let text = format!(
        "[worker]\ndata_dir = {:?}\n[network]\nscheduler_url = {:?}\nmessenger_url = {:?}\ngateway_url = {:?}\nmax_attempts = 3\n\
         [registry]\nprocess = {:?}\nauthorities = [{:?}]\npoll_interval = \"50ms\"\n[api]\nlisten = \"127.0.0.1:0\"\n{extra}",
        dir.join("worker").display().to_string(),
        net.urls.scheduler,
        net.urls.messenger,
        net.urls.gateway,
        net.urls.registry,
        net.authority.address(),
    );
    let config = Config::parse("test", &text, &Overrides::default()).unwrap();
    let worker = Worker::start(config, Keypair::generate().unwrap(), net.worker_listener.take()).await.unwrap();
    (net, worker)
}

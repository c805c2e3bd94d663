//! Load probe for the compute-unit API (issue 12): starts the embedded devnet and a worker in this
//! process, spawns a process of `examples/load/bigstate.wat` (a 64 MiB state), then fires N
//! concurrent `POST /dry-run` while it polls `/healthz` every 100 ms and samples the process's
//! RSS every 20 ms; one scheduled message is sent as the storm starts, and the time to its result
//! is measured. Prints one JSON line of figures. Run it through `scripts/load-dry-run`.
//!
//! Usage: `load_dry_run [CONCURRENCY] [EXTRA_TOML_FILE]`. `LOAD_RSS_CAP_MB` (default 12000) stops
//! the probe (reporting `"capped": true`) before it can exhaust a shared machine's memory.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ao_gpu_worker::attest::Keypair;
use ao_gpu_worker::config::{Config, Overrides};
use ao_gpu_worker::daemon::Worker;
use ao_gpu_worker::demo::message;
use ao_gpu_worker::devnet::{Devnet, DevnetOptions};
use ao_gpu_worker::net::{GatewayClient, MessengerClient, Policy};
use ao_gpu_worker::protocol::ao::{self, ItemType};
use ao_gpu_worker::protocol::{DataItemBuilder, Tag};
use serde_json::json;

const BIGSTATE_WAT: &str = include_str!("load/bigstate.wat");

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm.split_whitespace().nth(1).and_then(|v| v.parse().ok()).unwrap_or(0);
    pages * 4096
}

fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let n: usize = args.get(1).map(|a| a.parse()).transpose()?.unwrap_or(200);
    let extra = match args.get(2) {
        Some(path) => std::fs::read_to_string(path)?,
        None => String::new(),
    };
    let cap = std::env::var("LOAD_RSS_CAP_MB").ok().and_then(|v| v.parse::<u64>().ok()).unwrap_or(12_000) << 20;
    let dir = tempfile::tempdir()?;

    let mut net = Devnet::start(&DevnetOptions::new(dir.path().join("devnet"), 0)).await?;
    let text = format!(
        "[worker]\ndata_dir = {:?}\n[network]\nscheduler_url = {:?}\nmessenger_url = {:?}\ngateway_url = {:?}\n\
         [registry]\nprocess = {:?}\nauthorities = [{:?}]\npoll_interval = \"100ms\"\n[api]\nlisten = \"127.0.0.1:0\"\n\
         [gpu]\nbackends = [\"cpu\"]\nstartup_bench = \"off\"\n{extra}",
        dir.path().join("worker").display().to_string(),
        net.urls.scheduler,
        net.urls.messenger,
        net.urls.gateway,
        net.urls.registry,
        net.authority.address(),
    );
    let config = Config::parse("load", &text, &Overrides::default())?;
    let worker = Worker::start(config, Keypair::generate()?, net.worker_listener.take()).await?;
    let mu = MessengerClient::new(&net.urls.messenger, Policy::default());
    let wasm = wat::parse_str(BIGSTATE_WAT)?;
    let module = DataItemBuilder::new()
        .anchor(ao::numeric_anchor(0))
        .tags(ao::module_tags("bigstate", "128-mb", "1000000000"))
        .data(wasm)
        .sign(&net.authority)?;
    GatewayClient::new(&net.urls.gateway, Policy::default()).upload(&module).await?;
    let mut tags = ao::base_tags(ItemType::Process);
    tags.extend([Tag::new("Module", module.id()), Tag::new("Scheduler", &net.scheduler_address), Tag::new("Name", "bigstate")]);
    let spawn = DataItemBuilder::new().anchor(ao::numeric_anchor(1)).tags(tags).data(b" ".to_vec()).sign(&net.authority)?;
    mu.post_item(&spawn).await?;
    let process = spawn.id();
    let me = worker.state.address.clone();
    let assign =
        message(&net.authority, &net.urls.registry, 2, &[("Action", "Assign-Workload"), ("Worker", &me), ("Process", &process)], "")?;
    mu.post_item(&assign).await?;
    let journal = worker.state.jobs.journal.clone();
    let wait_result = |id: String| {
        let journal = journal.clone();
        async move {
            let start = Instant::now();
            while journal.result_by_message(&id).ok().flatten().is_none() {
                anyhow::ensure!(start.elapsed() < Duration::from_secs(600), "no result for {id} in 600 s");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Ok::<_, anyhow::Error>(start.elapsed())
        }
    };
    wait_result(process.clone()).await?;
    let state_bytes = journal.latest_state(&process)?.and_then(|l| l.source.image).map_or(0, |i| i.len());
    let cu = worker.api_url.clone();
    let http = reqwest::Client::builder().pool_max_idle_per_host(0).timeout(Duration::from_secs(600)).build()?;
    // Warm up: one dry-run, so the module is compiled and set up before the storm.
    let warm = http.post(format!("{cu}/dry-run?process-id={process}")).json(&json!({"Tags": []})).send().await?;
    anyhow::ensure!(warm.status().is_success(), "warm-up dry-run failed: {}", warm.text().await?);
    let rss_before = rss_bytes();

    // RSS sampler, stopping the probe at the cap.
    let stop = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(AtomicU64::new(0));
    let capped = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (stop, peak, capped) = (stop.clone(), peak.clone(), capped.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let r = rss_bytes();
                peak.fetch_max(r, Ordering::Relaxed);
                if r > cap {
                    capped.store(true, Ordering::Relaxed);
                    eprintln!("load: RSS {} MiB passed the cap of {} MiB; stopping", r >> 20, cap >> 20);
                    let figures = json!({"concurrency": n, "capped": true, "rss_at_cap_mb": r >> 20, "state_mb": state_bytes >> 20});
                    println!("{figures}");
                    std::process::exit(3);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    // /healthz every 100 ms.
    let health = {
        let (stop, http, cu) = (stop.clone(), http.clone(), cu.clone());
        tokio::spawn(async move {
            let mut latencies = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                let ok = http.get(format!("{cu}/healthz")).send().await.is_ok_and(|r| r.status().is_success());
                latencies.push((t.elapsed().as_secs_f64() * 1000.0, ok));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            latencies
        })
    };
    let started = Instant::now();
    let mut storm = Vec::with_capacity(n);
    for i in 0..n {
        let (http, cu, process) = (http.clone(), cu.clone(), process.clone());
        storm.push(tokio::spawn(async move {
            let t = Instant::now();
            let body = json!({"Tags": [{"name": "Action", "value": "Read"}], "Data": format!("{i}")});
            let r = http.post(format!("{cu}/dry-run?process-id={process}")).json(&body).send().await;
            let status = match r {
                Ok(r) => {
                    let s = r.status().as_u16();
                    let retry_after = r.headers().contains_key("retry-after");
                    let _ = r.bytes().await;
                    (s, retry_after)
                }
                Err(_) => (0, false),
            };
            (status, t.elapsed().as_secs_f64() * 1000.0)
        }));
    }
    // A scheduled message in the middle of the storm.
    let user = Keypair::generate()?;
    let msg = message(&user, &process, 1, &[("Action", "Tick")], "")?;
    mu.post_item(&msg).await?;
    let scheduled = wait_result(msg.id()).await?;
    let mut by_status = std::collections::BTreeMap::<String, usize>::new();
    let mut ok_ms = Vec::new();
    let mut retry_after_missing = 0;
    for t in storm {
        let ((status, retry_after), ms) = t.await?;
        *by_status.entry(status.to_string()).or_default() += 1;
        if status == 200 {
            ok_ms.push(ms);
        }
        if status == 503 && !retry_after {
            retry_after_missing += 1;
        }
    }
    let storm_s = started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let latencies = health.await?;
    let _ = sampler.join();
    let mut h: Vec<f64> = latencies.iter().map(|(ms, _)| *ms).collect();
    let healthz_failed = latencies.iter().filter(|(_, ok)| !ok).count();
    let healthz_max = h.iter().copied().fold(0.0, f64::max);
    let figures = json!({
        "concurrency": n,
        "state_mb": state_bytes >> 20,
        "rss_before_mb": rss_before >> 20,
        "rss_peak_mb": peak.load(Ordering::Relaxed) >> 20,
        "capped": capped.load(Ordering::Relaxed),
        "storm_s": (storm_s * 10.0).round() / 10.0,
        "answers": by_status,
        "retry_after_missing": retry_after_missing,
        "dry_run_ok_median_ms": median(&mut ok_ms).round(),
        "healthz_probes": h.len(),
        "healthz_failed": healthz_failed,
        "healthz_median_ms": (median(&mut h) * 10.0).round() / 10.0,
        "healthz_max_ms": healthz_max.round(),
        "scheduled_message_s": (scheduled.as_secs_f64() * 100.0).round() / 100.0,
    });
    println!("{figures}");
    worker.shutdown().await;
    net.shutdown().await;
    Ok(())
}

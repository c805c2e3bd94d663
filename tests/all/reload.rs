//! SIGHUP on the real binary: `run` re-reads its configuration file; `log.level` and
//! `registry.authorities` apply while running, other changed sections are logged as needing a restart, an invalid file changes
//! nothing, and the worker stays ready throughout.

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::support::binary::{Guard, command, start_devnet};

fn config(
    dir: &std::path::Path,
    urls: &ao_gpu_worker::devnet::DevnetUrls,
    port: u16,
    level: &str,
    deadline: &str,
    authority: &str,
) -> String {
    format!(
        "[worker]\ndata_dir = {data:?}\nkey_file = \"worker.key\"\n[network]\nscheduler_url = {su:?}\nmessenger_url = {mu:?}\ngateway_url = {gw:?}\n\
         [registry]\nprocess = {reg:?}\nauthorities = [{authority}]\n[api]\nlisten = \"127.0.0.1:{port}\"\n[limits]\ndeadline = \"{deadline}\"\n\
         [gpu]\nbackends = [\"cpu\"]\nstartup_bench = \"off\"\n[log]\nlevel = \"{level}\"\n",
        data = dir.join("worker").display().to_string(),
        su = urls.scheduler,
        mu = urls.messenger,
        gw = urls.gateway,
        reg = urls.registry,
    )
}

async fn wait_for(lines: &Arc<Mutex<Vec<String>>>, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(l) = lines.lock().unwrap().iter().find(|l| l.contains(needle)) {
            return l.clone();
        }
        assert!(Instant::now() < deadline, "no log line with {needle:?} in:\n{}", lines.lock().unwrap().join("\n"));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_applies_the_log_level_and_names_what_needs_a_restart() {
    ao_gpu_worker::net::install_crypto_provider();
    let tmp = tempfile::tempdir().unwrap();
    let (_devnet, urls) = start_devnet(&tmp.path().join("devnet"));
    std::fs::create_dir_all(tmp.path().join("worker")).unwrap();
    let out = command().args(["keygen", "--out"]).arg(tmp.path().join("worker/worker.key")).output().unwrap();
    assert!(out.status.success());
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let file = tmp.path().join("worker.toml");
    std::fs::write(&file, config(tmp.path(), &urls, port, "info", "60s", "")).unwrap();

    let mut child = command().env_remove("AO_WORKER_LOG").args(["run", "--config"]).arg(&file).stderr(Stdio::piped()).spawn().unwrap();
    let stderr = child.stderr.take().unwrap();
    let worker = Guard(child);
    let lines = Arc::new(Mutex::new(Vec::new()));
    let sink = lines.clone();
    std::thread::spawn(move || {
        for l in BufReader::new(stderr).lines().map_while(Result::ok) {
            sink.lock().unwrap().push(l);
        }
    });
    let ready = format!("http://127.0.0.1:{port}/readyz");
    let deadline = Instant::now() + Duration::from_secs(60);
    while reqwest::get(&ready).await.map(|r| r.status()).ok() != Some(reqwest::StatusCode::OK) {
        assert!(Instant::now() < deadline, "not ready:\n{}", lines.lock().unwrap().join("\n"));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let hup = |pid: u32| assert!(std::process::Command::new("kill").args(["-HUP", &pid.to_string()]).status().unwrap().success());

    std::fs::write(&file, config(tmp.path(), &urls, port, "debug", "30s", &format!("{:?}", "A".repeat(43)))).unwrap();
    hup(worker.0.id());
    let applied = wait_for(&lines, "SIGHUP: applied").await;
    assert!(applied.contains("log.level: info -> debug"), "{applied}");
    wait_for(&lines, "registry.authorities: 0 -> 1 address(es)").await;
    let restart = wait_for(&lines, "take a restart").await;
    assert!(restart.contains("[\"limits\"]"), "{restart}");
    // The new level is in force: debug lines from the worker now appear.
    wait_for(&lines, "DEBUG ao_gpu_worker").await;

    std::fs::write(&file, "[limits]\ndeadline = \"soon\"\n").unwrap();
    hup(worker.0.id());
    let refused = wait_for(&lines, "does not load; nothing changed").await;
    assert!(refused.contains("limits.deadline"), "{refused}");
    assert_eq!(reqwest::get(&ready).await.unwrap().status(), 200, "still ready after a bad reload");
    drop(worker);
}

/// What SIGHUP does to the authorities, in process: assignments read while the authority is not
/// in force are ignored; once it is back, the next ones are obeyed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorities_set_while_running_judge_the_registry_messages_read_after() {
    use ao_gpu_worker::demo::{message, module_item};
    use ao_gpu_worker::net::{GatewayClient, MessengerClient, Policy};
    use ao_gpu_worker::protocol::ao::{self, ItemType};
    use ao_gpu_worker::protocol::{DataItemBuilder, Tag};

    let dir = tempfile::tempdir().unwrap();
    let (net, worker) = crate::support::inproc::devnet_and_worker(dir.path(), "").await;
    let mu = MessengerClient::new(&net.urls.messenger, Policy::default());
    let module = module_item(&net.authority).unwrap();
    GatewayClient::new(&net.urls.gateway, Policy::default()).upload(&module).await.unwrap();
    let spawn = |anchor: u64, name: &str| {
        let mut tags = ao::base_tags(ItemType::Process);
        tags.extend([Tag::new("Module", module.id()), Tag::new("Scheduler", &net.scheduler_address), Tag::new("Name", name)]);
        DataItemBuilder::new().anchor(ao::numeric_anchor(anchor)).tags(tags).data(b" ".to_vec()).sign(&net.authority).unwrap()
    };
    let me = worker.state.address.clone();
    let assign = |anchor: u64, process: &str| {
        message(&net.authority, &net.urls.registry, anchor, &[("Action", "Assign-Workload"), ("Worker", &me), ("Process", process)], "")
            .unwrap()
    };
    let (first, second) = (spawn(1, "first"), spawn(2, "second"));
    mu.post_item(&first).await.unwrap();
    mu.post_item(&second).await.unwrap();

    let jobs = worker.state.jobs.clone();
    let configured = jobs.authorities();
    assert_eq!(configured, vec![net.authority.address()]);
    jobs.set_authorities(Vec::new());
    mu.post_item(&assign(3, &first.id())).await.unwrap();
    // Wait until the worker has read the registry up to that assignment, then restore.
    let su = ao_gpu_worker::net::SchedulerClient::new(&net.urls.scheduler, Policy::default());
    let latest = su.latest(&net.urls.registry).await.unwrap();
    let nonce: u64 = latest.assignment.tag("Nonce").unwrap().parse().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while jobs.journal.registry_cursor().unwrap().is_none_or(|c| c < nonce) {
        assert!(std::time::Instant::now() < deadline, "the registry was not read up to nonce {nonce}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    jobs.set_authorities(configured);
    mu.post_item(&assign(4, &second.id())).await.unwrap();
    while !jobs.is_served(&second.id()).unwrap() {
        assert!(std::time::Instant::now() < deadline, "the second assignment was not obeyed");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(!jobs.is_served(&first.id()).unwrap(), "an assignment read with no authority in force was obeyed");
    worker.shutdown().await;
    net.shutdown().await;
}

//! End to end with the real binary: `devnet --no-worker` in one process, `keygen` and `run`
//! in another, as an operator would. The worker's capacity advertisement must be read back
//! from the scheduler, verify here and with npm arbundles, and the worker must serve its
//! API and stop cleanly on SIGTERM.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ao_gpu_worker::net::scheduler::Range;
use ao_gpu_worker::net::{Policy, SchedulerClient};
use ao_gpu_worker::protocol::{DataItem, SignatureType};

use crate::support;
use crate::support::binary::{Guard, command, start_devnet};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_posts_a_capacity_advertisement_that_verifies_everywhere() {
    let tmp = tempfile::tempdir().unwrap();
    let (_devnet, urls) = start_devnet(&tmp.path().join("devnet"));

    let key_file = tmp.path().join("worker.key");
    let out = command().args(["keygen", "--out"]).arg(&key_file).output().unwrap();
    assert!(out.status.success(), "keygen: {}", String::from_utf8_lossy(&out.stderr));
    let keygen: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let address = keygen["address"].as_str().unwrap().to_owned();

    let api_port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let config = tmp.path().join("worker.toml");
    std::fs::write(
        &config,
        format!(
            "[worker]\ndata_dir = {data:?}\nkey_file = {key:?}\n[network]\nscheduler_url = {su:?}\nmessenger_url = {mu:?}\ngateway_url = {gw:?}\n\
             [registry]\nprocess = {reg:?}\nadvertise_interval = \"1s\"\n[api]\nlisten = \"127.0.0.1:{api_port}\"\n[log]\nformat = \"json\"\n",
            data = tmp.path().join("worker").display().to_string(),
            key = key_file.display().to_string(),
            su = urls.scheduler,
            mu = urls.messenger,
            gw = urls.gateway,
            reg = urls.registry,
        ),
    )
    .unwrap();
    let worker = command().args(["run", "--config"]).arg(&config).stderr(Stdio::piped()).spawn().unwrap();
    let mut worker = Guard(worker);

    // Wait for at least two heartbeats from this worker in the registry's schedule.
    let su = SchedulerClient::new(&urls.scheduler, Policy::default());
    let deadline = Instant::now() + Duration::from_secs(60);
    let adverts = loop {
        let nodes = su.all(&urls.registry, Range::default()).await.unwrap();
        let adverts: Vec<_> = nodes
            .into_iter()
            .filter_map(|n| n.message)
            .filter(|m| m.owner.address == address && m.tag("Action") == Some("Advertise-Capacity"))
            .collect();
        if adverts.len() >= 2 {
            break adverts;
        }
        if let Some(status) = worker.0.try_wait().unwrap() {
            let mut err = String::new();
            std::io::Read::read_to_string(worker.0.stderr.as_mut().unwrap(), &mut err).unwrap();
            panic!("worker exited early ({status}): {err}");
        }
        assert!(Instant::now() < deadline, "no two advertisements within 60 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_ne!(adverts[0].id, adverts[1].id, "each heartbeat is a new message");

    // The scheduler's copy verifies here ...
    let advert = &adverts[0];
    let item = advert.to_item().unwrap();
    item.verify().unwrap();
    assert_eq!(item.id(), advert.id);
    assert_eq!(item.target_id().as_deref(), Some(urls.registry.as_str()));
    for (name, value) in [("Data-Protocol", "ao"), ("Variant", "ao.TN.1"), ("Type", "Message"), ("Content-Type", "application/json")] {
        assert_eq!(item.tag(name), Some(value), "tag {name}");
    }
    let manifest: serde_json::Value = serde_json::from_slice(&item.data).unwrap();
    assert_eq!(manifest["worker"]["address"], address);
    assert!(manifest["host"]["cpu"]["logical_cores"].as_u64().unwrap() >= 1);
    assert!(manifest["gpus"]["cuda"]["status"].is_string());

    // ... and with arbundles, byte for byte the item the worker signed.
    if let Some(js) = support::interop_dir("run_posts_a_capacity_advertisement_that_verifies_everywhere") {
        let file = tmp.path().join("advert.bin");
        std::fs::write(&file, item.to_bytes()).unwrap();
        let out = support::run_node(&js, "verify.js", &[file.display().to_string()]);
        let verdict: serde_json::Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
        assert_eq!(verdict["valid"], true, "{out}");
        assert_eq!(verdict["id"], advert.id.as_str(), "{out}");
    }

    // The worker's API: CU-shaped root, readiness, metrics, capacity.
    let api = format!("http://127.0.0.1:{api_port}");
    let http = reqwest::Client::new();
    let root: serde_json::Value = http.get(format!("{api}/")).send().await.unwrap().json().await.unwrap();
    assert_eq!(root["address"], address);
    let ready = http.get(format!("{api}/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200);
    let metrics = http.get(format!("{api}/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("ao_worker_advertisements_total{result=\"ok\"}"), "{metrics}");
    assert!(metrics.contains("ao_worker_ready 1"), "{metrics}");
    let capacity: serde_json::Value = http.get(format!("{api}/capacity")).send().await.unwrap().json().await.unwrap();
    assert_eq!(capacity["manifest"]["worker"]["address"], address);

    // SIGTERM drains and exits 0.
    let pid = worker.0.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = worker.0.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "worker did not stop within 20 s of SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "exit status after SIGTERM: {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devnet_once_runs_the_demo_and_exits_zero() {
    let tmp = tempfile::tempdir().unwrap();
    let out = command().args(["devnet", "--once", "--port-base", "0", "--data-dir"]).arg(tmp.path()).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "devnet --once failed: {}\n{stdout}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<serde_json::Value> = stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(lines.len() >= 4, "{stdout}");
    assert!(lines[0]["registry"].is_string());
    assert_eq!(lines[1]["signature_verified"], true);
    assert_eq!(lines[1]["registry"], lines[0]["registry"]);
    // The demo: every message evaluated and attested, the failed one rolled back, the Pong
    // delivered through the messenger to the second process.
    let last = lines.last().unwrap();
    assert_eq!(last["demo"], "ok", "{stdout}");
    assert_eq!(last["count"], "count=7");
    assert_eq!(last["pong_output"], "ignored: Pong");
    let evaluated: Vec<_> = lines.iter().filter(|l| l.get("action").is_some()).collect();
    assert_eq!(evaluated.len(), 8, "{stdout}");
    assert!(evaluated.iter().all(|l| l["attestation"].is_string()), "every message is attested");
    // The MLP actor ran its batched command list on the worker's backend and matched the CPU backend.
    let infer = evaluated.iter().find(|l| l["action"] == "Infer").unwrap();
    assert_eq!(infer["output"].as_array().unwrap().len(), 4);
    assert_eq!(infer["output"].as_array().unwrap().len(), infer["cpu_reference"].as_array().unwrap().len());
    assert!(infer["max_abs_diff"].as_f64().unwrap() <= 1e-6, "{infer}");
    assert!(infer["backend"].is_string());
    let fail = evaluated.iter().find(|l| l["action"] == "Fail").unwrap();
    assert_eq!(fail["error"], "failed on purpose");
    // A second run reuses the same devnet: same registry, the schedule continues.
    let again = command().args(["devnet", "--once", "--port-base", "0", "--data-dir"]).arg(tmp.path()).output().unwrap();
    assert!(again.status.success());
    let again: Vec<serde_json::Value> = String::from_utf8_lossy(&again.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(again[0]["registry"], lines[0]["registry"]);
    assert!(again[1]["nonce"].as_u64().unwrap() > lines[1]["nonce"].as_u64().unwrap());
    assert_eq!(again.last().unwrap()["demo"], "ok");
}

/// The main job in the deployed scheduler's mode: the scheduler signs with RSA and refuses
/// ed25519 items, so the authority, the demo user and the worker (its outbox, spawns,
/// attestations and advertisements) all sign with Arweave wallets, and the demo still passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devnet_once_passes_in_legacy_strict_mode_with_an_rsa_worker() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cmd = command();
    cmd.args(["devnet", "--legacy-strict", "--once", "--port-base", "0", "--data-dir"]).arg(tmp.path());
    // With the aos fixture, the aos pair runs too (every item RSA-signed as well).
    let aos = crate::support::aos::fixture("devnet_once_passes_in_legacy_strict_mode_with_an_rsa_worker", "emscripten4.wasm").is_some();
    if aos {
        let module = crate::support::aos::fixtures_dir().join("emscripten4.wasm");
        cmd.arg("--aos-module").arg(module).args(["--aos-format", "wasm32-unknown-emscripten4"]);
    }
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "devnet --legacy-strict --once failed: {}\n{stdout}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<serde_json::Value> = stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines[1]["signature_verified"], true, "{stdout}");
    if aos {
        let done = lines.iter().find(|l| l.get("aos_demo").is_some()).unwrap_or_else(|| panic!("no aos demo line: {stdout}"));
        assert_eq!(done["inbox"], "hello from aos-a (Ping)", "{stdout}");
    }
    let last = lines.iter().rev().find(|l| l.get("demo").is_some()).unwrap();
    assert_eq!(last["demo"], "ok", "{stdout}");
    assert_eq!(last["count"], "count=7");
    let evaluated: Vec<_> = lines.iter().filter(|l| l.get("action").is_some()).collect();
    assert_eq!(evaluated.len(), 8, "{stdout}");
    assert!(evaluated.iter().all(|l| l["attestation"].is_string()), "every message is attested");
    for name in ["scheduler.key", "authority.key", "worker/worker.key"] {
        let jwk: serde_json::Value = serde_json::from_slice(&std::fs::read(tmp.path().join(name)).unwrap()).unwrap();
        assert_eq!(jwk["kty"], "RSA", "{name} is an Arweave wallet");
    }
    // Everything scheduled (the worker's advertisements, the demo's messages, the Pong the
    // worker signed) is RSA-signed, and so is every assignment, as the deployed SU requires.
    let store = ao_gpu_worker::devnet::store::Store::open(&ao_gpu_worker::devnet::storage_path(tmp.path())).unwrap();
    let demo = lines.iter().find(|l| l.get("processes").is_some()).expect("the demo's process line");
    let mut processes: Vec<String> = demo["processes"].as_array().unwrap().iter().map(|p| p.as_str().unwrap().to_owned()).collect();
    processes.push(lines[0]["registry"].as_str().unwrap().to_owned());
    if let Some(aos) = lines.iter().find(|l| l.get("aos_processes").is_some()) {
        processes.extend(aos["aos_processes"].as_array().unwrap().iter().map(|p| p.as_str().unwrap().to_owned()));
    }
    let mut checked = 0;
    for process in &processes {
        for (_, entry) in store.entries_by_nonce(process, None, None, 10_000).unwrap() {
            for id in entry.message_id.iter().chain([&entry.assignment]) {
                let raw = store.su_item(id).unwrap().unwrap_or_else(|| panic!("item {id} missing"));
                let item = DataItem::parse_verified(&raw).unwrap();
                assert_eq!(item.signature_type, SignatureType::Arweave, "{id} on {process}");
                checked += 1;
            }
        }
    }
    assert!(checked >= 30, "only {checked} items checked");
}

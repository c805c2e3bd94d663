//! `GET /status` and `ao-gpu-worker status [--watch] [--json]` against a live worker serving the
//! counter process: identity, units, readiness, advertisement age, devices and the served process
//! with its lag behind the scheduler.

use std::io::{BufRead, BufReader};
use std::process::Stdio;

use crate::support::binary::{self, Guard};
use crate::support::counter::CounterNet;

async fn status_cli(args: Vec<String>) -> (bool, String) {
    let out = tokio::task::spawn_blocking(move || binary::command().arg("status").args(args).output().unwrap()).await.unwrap();
    (out.status.success(), String::from_utf8(out.stdout).unwrap() + &String::from_utf8(out.stderr).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_identity_units_devices_and_process_lag() {
    let mut net = CounterNet::start().await;
    net.send_and_wait(&[("Action", "Increment")], "").await;
    let api = net.cu_url().to_owned();

    let (ok, out) = status_cli(vec!["--api".into(), api.clone(), "--json".into()]).await;
    assert!(ok, "{out}");
    let s: serde_json::Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(s["worker"]["address"], net.worker.state.address);
    assert_eq!(s["ready"], true);
    assert_eq!(s["units"]["scheduler"], net.net.urls.scheduler.trim_end_matches('/'));
    assert_eq!(s["units"]["registry"], net.net.urls.registry);
    assert!(s["advertisement"]["age_s"].as_u64().unwrap() < 60, "{s}");
    let devices = s["devices"].as_array().unwrap();
    assert!(!devices.is_empty() && devices[0]["evaluations"].as_u64().unwrap() >= 2, "{s}");
    let p = s["processes"].as_array().unwrap().iter().find(|p| p["process"] == net.process.as_str()).unwrap_or_else(|| panic!("{s}"));
    // Both the spawn and the increment are evaluated: nothing is behind.
    assert_eq!(p["lag"], 0, "{p}");
    assert_eq!(p["evaluated_nonce"], p["scheduler_nonce"], "{p}");
    assert!(p["halted"].is_null());

    // The text rendering names the same things.
    let (ok, text) = status_cli(vec!["--api".into(), api.clone()]).await;
    assert!(ok, "{text}");
    for needle in ["ready ✓", &net.worker.state.address, "advertised ", "device 0", &net.process, "lag 0", "outbox     pending"] {
        assert!(text.contains(needle), "{needle:?} missing:\n{text}");
    }

    // --watch prints again at each interval.
    let mut child =
        Guard(binary::command().args(["status", "--api", &api, "--json", "--watch", "100ms"]).stdout(Stdio::piped()).spawn().unwrap());
    let stdout = child.0.stdout.take().unwrap();
    let lines =
        tokio::task::spawn_blocking(move || BufReader::new(stdout).lines().take(2).map(|l| l.unwrap()).collect::<Vec<_>>()).await.unwrap();
    assert_eq!(lines.len(), 2);
    for l in &lines {
        assert_eq!(serde_json::from_str::<serde_json::Value>(l).unwrap()["worker"]["address"], net.worker.state.address);
    }
    drop(child);

    // No worker there: a clear error, non-zero exit.
    let (ok, out) = status_cli(vec!["--api".into(), format!("http://127.0.0.1:{}", 1)]).await;
    assert!(!ok && out.contains("is the worker running"), "{out}");
    net.shutdown().await;
}

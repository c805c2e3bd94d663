//! `ao-gpu-worker bench` and the measured scores of the capacity manifest: the subcommand's JSON
//! (well formed, hardware fields, positive finite figures; no timing assertions), and a worker that
//! advertises the scores of a bench.json from this machine and ignores one from another.

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use ao_gpu_worker::bench::{BenchReport, WORKER_VERSION};
use ao_gpu_worker::capacity::{DetectOptions, detect};

use crate::support;

/// A quick CPU run in a debug build takes seconds; this only guards against a hang.
const DEADLINE: Duration = Duration::from_secs(300);

fn bin() -> Command {
    let mut cmd = support::binary::command();
    cmd.env("AO_WORKER_LOG", "warn").stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd
}

/// Runs `cmd` to completion (killed and failed after `DEADLINE`): exit code, stdout, stderr.
fn run(cmd: &mut Command) -> (Option<i32>, String, String) {
    let mut child = cmd.spawn().expect("spawn ao-gpu-worker");
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out = thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err = thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > DEADLINE {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} did not finish within {DEADLINE:?}: {}", err.join().unwrap_or_default());
        }
        thread::sleep(Duration::from_millis(50));
    };
    (status.code(), out.join().unwrap(), err.join().unwrap())
}

/// `gpu.determinism` of the embedded default configuration, which these tests run with.
fn default_mode() -> &'static str {
    let config = ao_gpu_worker::config::Config::parse("default", ao_gpu_worker::config::DEFAULT_TOML, &Default::default()).unwrap();
    config.gpu.determinism.as_str()
}

/// Every number anywhere in `v` is finite and positive (figures, counts, sizes, the timestamp).
fn assert_positive_numbers(v: &serde_json::Value, at: &str) {
    match v {
        serde_json::Value::Number(n) => {
            let x = n.as_f64().unwrap();
            assert!(x.is_finite() && x > 0.0, "{at} = {x}");
        }
        serde_json::Value::Array(a) => a.iter().enumerate().for_each(|(i, x)| assert_positive_numbers(x, &format!("{at}[{i}]"))),
        serde_json::Value::Object(o) => o.iter().for_each(|(k, x)| assert_positive_numbers(x, &format!("{at}.{k}"))),
        _ => {}
    }
}

#[test]
fn bench_quick_json_on_the_cpu_prints_a_well_formed_report_and_saves_it() {
    let dir = tempfile::tempdir().unwrap();
    let (code, stdout, stderr) = run(bin().args(["bench", "--quick", "--json", "--backend", "cpu", "--data-dir"]).arg(dir.path()));
    assert_eq!(code, Some(0), "stdout:\n{stdout}\nstderr:\n{stderr}");
    let lines: Vec<&str> = stdout.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "--json prints one object: {stdout}");
    let v: serde_json::Value = serde_json::from_str(lines[0]).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"));
    // Progress, without a terminal: plain lines on stderr (no bar, no escape codes), ending with
    // the finished line.
    assert!(stderr.lines().any(|l| l.starts_with("bench: 1 in ") && l.contains("cpu: starting the backend")), "{stderr}");
    assert!(stderr.lines().any(|l| l.starts_with("bench: ") && l.ends_with(" measured")), "{stderr}");
    assert!(!stderr.contains('\x1b'), "{stderr}");
    println!("{}", serde_json::to_string_pretty(&v).unwrap());

    assert_eq!(v["schema"], "ao-gpu-worker/bench/1");
    assert_eq!(v["worker_version"], WORKER_VERSION);
    assert_eq!(v["quick"], true);
    let fingerprint = v["fingerprint"].as_str().unwrap();
    assert!(fingerprint.len() == 64 && fingerprint.bytes().all(|b| b.is_ascii_hexdigit()), "{fingerprint}");
    // The hardware it ran on, as the capacity probe sees it.
    let manifest = detect(&DetectOptions { data_dir: dir.path().to_path_buf(), worker_address: None });
    let hw = &v["hardware"];
    assert_eq!(hw["cpu_model"], manifest.host.cpu.model.as_str(), "{hw}");
    assert_eq!(hw["logical_cores"], manifest.host.cpu.logical_cores, "{hw}");
    assert_eq!(hw["arch"], manifest.host.arch.as_str(), "{hw}");
    assert!(hw["cpu_features"].is_array() && hw["wgpu_adapters"].is_array() && hw["cuda"].is_string(), "{hw}");
    assert_eq!(fingerprint, manifest.hardware_fingerprint());

    // One CPU backend with its figures, every one positive and finite.
    let backends = v["backends"].as_array().unwrap();
    assert_eq!(backends.len(), 1, "{v}");
    let cpu = &backends[0];
    assert_eq!(cpu["kind"], "cpu");
    assert!(cpu["description"].as_str().unwrap().starts_with("cpu"), "{cpu}");
    assert_eq!(cpu["determinism"], default_mode(), "the configured mode (the embedded default configuration's)");
    assert!(cpu["gemm_f32"]["n"].as_u64().unwrap() >= 128, "{cpu}");
    let mut figures = vec!["/gemm_f32/gflops", "/h2d_gbps", "/d2h_gbps", "/tiny_op_ns", "/ops100_one_by_one_us"];
    if ao_gpu_worker::bench::gpu_function_linked("run") {
        figures.push("/ops100_batched_us");
    }
    for figure in figures {
        assert!(cpu.pointer(figure).and_then(|x| x.as_f64()).is_some(), "{figure} missing: {cpu}");
    }
    assert!(v["host_call_ns"].as_f64().is_some(), "{v}");
    assert_positive_numbers(&v["backends"], "backends");
    assert_positive_numbers(&v["host_call_ns"], "host_call_ns");
    assert_positive_numbers(&v["measured_at_ms"], "measured_at_ms");

    // Saved in the data directory, the same report.
    let saved: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.path().join("bench.json")).unwrap()).unwrap();
    assert_eq!(saved, v);
}

#[test]
fn bench_refuses_an_unknown_backend() {
    let dir = tempfile::tempdir().unwrap();
    let (code, _, stderr) = run(bin().args(["bench", "--quick", "--backend", "tpu", "--data-dir"]).arg(dir.path()));
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("unknown backend \"tpu\""), "{stderr}");
    assert!(!dir.path().join("bench.json").exists());
}

/// A bench.json for the CPU backend in the default determinism mode with `fingerprint`.
fn write_report(data_dir: &Path, fingerprint: &str) -> BenchReport {
    let manifest = detect(&DetectOptions { data_dir: data_dir.to_path_buf(), worker_address: None });
    let report: BenchReport = serde_json::from_value(serde_json::json!({
        "schema": "ao-gpu-worker/bench/1",
        "worker_version": WORKER_VERSION,
        "measured_at_ms": 1_700_000_000_000u64,
        "quick": false,
        "fingerprint": fingerprint,
        "hardware": ao_gpu_worker::bench::Hardware::of(&manifest),
        "host_call_ns": 12.5,
        "backends": [{
            "kind": "cpu",
            "description": "cpu (written by the test)",
            "determinism": default_mode(),
            "gemm_f32": {"n": 512, "gflops": 3.75},
            "qmatvec_gbps": {"q8_0": 1.25},
            "h2d_gbps": 7.5,
            "d2h_gbps": 8.5,
            "tiny_op_ns": 640.0,
            "device": "test cpu"
        }]
    }))
    .unwrap();
    ao_gpu_worker::bench::save(&report, data_dir).unwrap();
    report
}

async fn capacity_scores(api_url: &str) -> serde_json::Value {
    let body: serde_json::Value = reqwest::get(format!("{api_url}/capacity")).await.unwrap().json().await.unwrap();
    body["manifest"]["scores"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_manifest_carries_the_scores_of_a_bench_json_from_this_machine() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("worker");
    let fingerprint = detect(&DetectOptions { data_dir: data_dir.clone(), worker_address: None }).hardware_fingerprint();
    let report = write_report(&data_dir, &fingerprint);

    let (_net, worker) = support::inproc::devnet_and_worker(dir.path(), "[gpu]\nbackends = [\"cpu\"]\n").await;
    let scores = worker.state.status().manifest.as_ref().and_then(|m| m.scores.clone()).expect("scores at startup");
    assert_eq!(scores, report.scores("bench.json"));
    let shown = capacity_scores(&worker.api_url).await;
    assert_eq!(shown["source"], "bench.json", "{shown}");
    assert_eq!(shown["fingerprint"], fingerprint.as_str());
    assert_eq!(shown["host_call_ns"], 12.5);
    assert_eq!(shown["backends"][0]["gemm_f32"], serde_json::json!({"n": 512, "gflops": 3.75}));
    assert_eq!(shown["backends"][0]["qmatvec_gbps"]["q8_0"], 1.25);
    // The advertisement carries them too.
    let ad = tokio::time::timeout(Duration::from_secs(120), worker.advertised()).await.expect("an advertisement");
    let advertised = worker.state.status().manifest.clone().unwrap();
    assert_eq!(advertised.scores.as_ref(), Some(&scores), "advertisement {}", ad.id);
    // Nothing was re-measured: the file is the one written above.
    assert_eq!(ao_gpu_worker::bench::load(&data_dir), Some(report));
    worker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bench_json_from_another_machine_is_ignored_and_the_worker_measures_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("worker");
    let fingerprint = detect(&DetectOptions { data_dir: data_dir.clone(), worker_address: None }).hardware_fingerprint();
    let other = "0".repeat(64);
    assert_ne!(fingerprint, other);
    write_report(&data_dir, &other);

    let (_net, worker) =
        support::inproc::devnet_and_worker(dir.path(), "[gpu]\nbackends = [\"cpu\"]\nstartup_bench = \"when-stale\"\n").await;
    let at_start = worker.state.status().manifest.as_ref().and_then(|m| m.scores.clone());
    assert!(at_start.as_ref().is_none_or(|s| s.source == "startup"), "another machine's scores were used: {at_start:?}");

    // The quick run on this machine replaces them.
    let deadline = Instant::now() + DEADLINE;
    let shown = loop {
        let shown = capacity_scores(&worker.api_url).await;
        if !shown.is_null() {
            break shown;
        }
        assert!(Instant::now() < deadline, "no measured scores within {DEADLINE:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert_eq!(shown["source"], "startup", "{shown}");
    assert_eq!(shown["fingerprint"], fingerprint.as_str(), "{shown}");
    assert_eq!(shown["quick"], true);
    assert_eq!(shown["backends"][0]["kind"], "cpu", "{shown}");
    assert_eq!(shown["backends"][0]["determinism"], default_mode(), "{shown}");
    assert_positive_numbers(&shown["backends"], "backends");
    assert_ne!(shown["backends"][0]["description"], "cpu (written by the test)");
    let saved = ao_gpu_worker::bench::load(&data_dir).expect("the quick run is saved");
    assert_eq!(saved.fingerprint, fingerprint);
    assert!(saved.quick);
    worker.shutdown().await;
}

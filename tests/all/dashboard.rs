//! The Grafana dashboard (dashboards/ao-gpu-worker.json) against a live worker: the JSON loads,
//! every panel has queries, and every `ao_worker_*` name in a query is a series family the worker's
//! `/metrics` exports (after it evaluated messages, advertised and posted). And the exposition
//! passes `promtool check metrics` (Debian's prometheus package; REQUIRE_PROMTOOL=1 makes a
//! missing promtool a failure instead of a skip).

use std::collections::BTreeSet;
use std::io::Write;
use std::process::{Command, Stdio};

use crate::support::counter::CounterNet;

fn dashboard() -> serde_json::Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/dashboards/ao-gpu-worker.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap_or_else(|e| panic!("{path} does not load: {e}"))
}

/// Every query of every panel, with its panel's title.
fn queries(d: &serde_json::Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for p in d["panels"].as_array().expect("panels") {
        if p["type"] == "row" {
            continue;
        }
        let title = p["title"].as_str().expect("every panel has a title").to_owned();
        let targets = p["targets"].as_array().unwrap_or_else(|| panic!("panel {title:?} has no targets"));
        assert!(!targets.is_empty(), "panel {title:?} has no queries");
        for t in targets {
            out.push((title.clone(), t["expr"].as_str().unwrap_or_else(|| panic!("panel {title:?}: a target without expr")).to_owned()));
        }
    }
    out
}

/// `ao_worker_*` identifiers in a PromQL expression.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("ao_worker_") {
        let tail = &rest[at..];
        let end = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
        names.push(tail[..end].to_owned());
        rest = &tail[end..];
    }
    names
}

/// Series names a text exposition offers: sample names, every TYPE line's family, and a
/// histogram's `_bucket`, `_sum` and `_count`.
fn exported(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut it = rest.split_whitespace();
            let (name, kind) = (it.next().unwrap(), it.next().unwrap_or(""));
            names.insert(name.to_owned());
            if kind == "histogram" {
                for s in ["_bucket", "_sum", "_count"] {
                    names.insert(format!("{name}{s}"));
                }
            }
        } else if !line.starts_with('#') && !line.is_empty() {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            names.insert(line[..end].to_owned());
        }
    }
    names
}

#[test]
fn the_dashboard_loads_and_names_only_real_looking_metrics() {
    let d = dashboard();
    assert_eq!(d["uid"], "ao-gpu-worker");
    let qs = queries(&d);
    assert!(qs.len() >= 15, "{} queries", qs.len());
    for (title, expr) in &qs {
        assert!(!metric_names(expr).is_empty(), "panel {title:?}: {expr} names no ao_worker_ metric");
        assert_eq!(expr.matches('(').count(), expr.matches(')').count(), "panel {title:?}: unbalanced {expr}");
    }
    // The topics the issue asks for each have a panel.
    let all: String = qs.iter().map(|(_, e)| e.as_str()).collect::<Vec<_>>().join("\n");
    for needed in [
        "ao_worker_evaluations_total",
        "ao_worker_evaluation_seconds_bucket",
        "ao_worker_gas_used_total",
        "ao_worker_pending_items",
        "ao_worker_tensor_device_in_flight",
        "ao_worker_tensor_device_live_bytes",
        "ao_worker_gpu_constant_hits_total",
        "ao_worker_posted_total",
        "ao_worker_last_advertisement_timestamp_seconds",
    ] {
        assert!(all.contains(needed), "no panel queries {needed}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_query_names_a_metric_a_live_worker_exports_and_promtool_agrees() {
    // Some work first, so labelled families have series: the counter actor evaluates a message,
    // and its attestation is posted.
    let mut net = CounterNet::start().await;
    net.send_and_wait(&[("Action", "Increment")], "").await;
    let http = reqwest::Client::new();
    let url = format!("{}/metrics", net.cu_url());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !http.get(&url).send().await.unwrap().text().await.unwrap().contains("ao_worker_posted_total{kind=\"attestation\"}") {
        assert!(std::time::Instant::now() < deadline, "no attestation posted");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let text = http.get(&url).send().await.unwrap();
    assert!(text.headers()["content-type"].to_str().unwrap().starts_with("text/plain; version=0.0.4"));
    let text = text.text().await.unwrap();
    let open = http.get(&url).header("accept", "application/openmetrics-text; version=1.0.0").send().await.unwrap();
    assert!(open.headers()["content-type"].to_str().unwrap().starts_with("application/openmetrics-text"));
    assert!(open.text().await.unwrap().trim_end().ends_with("# EOF"));

    let names = exported(&text);
    let mut missing = Vec::new();
    for (title, expr) in queries(&dashboard()) {
        for name in metric_names(&expr) {
            if !names.contains(&name) {
                missing.push(format!("{title}: {name}"));
            }
        }
    }
    assert!(missing.is_empty(), "queries name metrics the worker does not export: {missing:#?}\nexported: {names:#?}");

    match Command::new("promtool").arg("--version").output() {
        Ok(_) => {
            let mut child = Command::new("promtool")
                .args(["check", "metrics"])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
            let out = child.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "promtool check metrics: {}{}\n{text}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Err(e) if std::env::var_os("REQUIRE_PROMTOOL").is_some() => panic!("REQUIRE_PROMTOOL=1 but promtool cannot run: {e}"),
        Err(e) => eprintln!("SKIPPED promtool check metrics: promtool cannot run ({e}); apt-get install prometheus"),
    }
    net.shutdown().await;
}

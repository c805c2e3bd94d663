//! Recovery (issue 12 §4, §6): a process that cannot make progress backs off, is halted with a
//! persistent reason past its budget, is listed with its state and resumed through the API and
//! the CLI; an outbox item the network cannot take becomes a dead letter (kept across restarts,
//! counted, listed, retried and dropped with the CLI) without holding up other items; `/healthz`
//! fails while a catch-up makes no progress and recovers when it does; a result over a limit is
//! refused with an Error and rolled back.

use std::time::{Duration, Instant};

use ao_gpu_worker::demo::message;
use ao_gpu_worker::journal::{Commit, OutKind, Outgoing, Progress, ResultRecord};
use ao_gpu_worker::net::{GatewayClient, MessengerClient, Policy};
use ao_gpu_worker::protocol::ao::{self, ItemType};
use ao_gpu_worker::protocol::{DataItemBuilder, Tag, b64};
use reqwest::StatusCode;
use serde_json::Value;

use crate::support::binary;
use crate::support::counter::CounterNet;
use crate::support::inproc::devnet_and_worker;

async fn get(url: &str) -> (StatusCode, String) {
    let r = reqwest::get(url).await.unwrap();
    (r.status(), r.text().await.unwrap())
}

async fn process_state(cu: &str, process: &str) -> Option<Value> {
    let (_, body) = get(&format!("{cu}/processes")).await;
    let v: Value = serde_json::from_str(&body).unwrap();
    v["processes"].as_array().unwrap().iter().find(|p| p["process"] == process).cloned()
}

async fn wait_for<T>(what: &str, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The CLI against the worker's API: stdout lines, asserting success.
fn cli(args: &[&str]) -> Vec<String> {
    let out = binary::command().args(args).output().unwrap();
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().lines().map(str::to_owned).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_without_progress_backs_off_is_halted_persistently_and_resumed() {
    let dir = tempfile::tempdir().unwrap();
    // A process the scheduler does not know: every catch-up fails (a transient error).
    let ghost = b64::encode(&[7u8; 32]);
    let extra = format!("[jobs]\nprocesses = [{ghost:?}]\n[overload]\nprocess_backoff_max = \"300ms\"\nprocess_halt_after = \"2s\"\n");
    let (net, worker) = devnet_and_worker(dir.path(), &extra).await;
    let cu = worker.api_url.clone();
    let backing_off = wait_for("backing-off", async || process_state(&cu, &ghost).await.filter(|p| p["state"] == "backing-off")).await;
    assert!(backing_off["failures"].as_u64().unwrap() >= 1, "{backing_off}");
    assert!(backing_off["reason"].as_str().is_some_and(|r| !r.is_empty()), "{backing_off}");
    let halted = wait_for("halted", async || process_state(&cu, &ghost).await.filter(|p| p["state"] == "halted")).await;
    let reason = halted["reason"].as_str().unwrap();
    assert!(reason.contains("no progress") && reason.contains("process_halt_after"), "{reason}");
    // Journaled: it survives a restart.
    assert_eq!(worker.state.jobs.journal.halts().unwrap()[&ghost].reason, reason);

    // The CLI lists it and resumes it.
    let lines = cli(&["processes", "--api", &cu]);
    assert!(lines.iter().any(|l| l.contains(&ghost) && l.contains("\"halted\"")), "{lines:?}");
    let resumed = cli(&["processes", "--api", &cu, "--resume", &ghost]);
    assert_eq!(serde_json::from_str::<Value>(&resumed[0]).unwrap()["resumed"], true, "{resumed:?}");
    assert!(!worker.state.jobs.journal.halts().unwrap().contains_key(&ghost));
    let after = process_state(&cu, &ghost).await.unwrap();
    assert_ne!(after["state"], "halted", "{after}");
    let again = cli(&["processes", "--api", &cu, "--resume", &ghost]);
    assert_eq!(serde_json::from_str::<Value>(&again[0]).unwrap()["resumed"], false);
    worker.shutdown().await;
    net.shutdown().await;
}

/// Commits a result of an unserved process "X" whose outbox holds one item that is not a data
/// item: the poster can never post it.
fn commit_unpostable(c: &CounterNet) -> String {
    let id = b64::encode(&[9u8; 32]);
    let item = Outgoing {
        id: id.clone(),
        kind: OutKind::Message,
        process: "X".into(),
        nonce: 0,
        bytes: b"not a data item".to_vec(),
        confirmed: false,
        refused: None,
    };
    let progress = Progress {
        nonce: 0,
        hash_chain: "h".into(),
        assignment: "a".into(),
        state_hash: None,
        timestamp: 1,
        checkpoint: None,
        attestation: None,
    };
    let result = ResultRecord {
        process: "X".into(),
        message: "M".into(),
        nonce: 0,
        timestamp: 1,
        block_height: 1,
        response: serde_json::json!({}),
        message_hash: String::new(),
        result_hash: String::new(),
        state_hash: None,
        gas_used: 0,
        posted: vec![id.clone()],
        replay: None,
        trace: None,
    };
    c.worker.state.jobs.journal.commit(&Commit { progress: &progress, result: &result, state: None, outgoing: &[item] }).unwrap();
    id
}

fn dead_letters_metric(metrics: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("ao_worker_outbox_dead_letters "))
        .map(|v| v.trim().parse().unwrap())
        .expect("ao_worker_outbox_dead_letters metric")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unpostable_item_becomes_a_dead_letter_without_holding_up_others_and_the_cli_manages_it() {
    let mut c = CounterNet::start().await;
    let cu = c.cu_url().to_owned();
    let bad = commit_unpostable(&c);
    // Committed after the bad item, posted all the same: the next message's attestation.
    let (_, inc) = c.send_and_wait(&[("Action", "Increment"), ("Amount", "1")], "").await;
    let journal = c.worker.state.jobs.journal.clone();
    assert!(!inc.posted.is_empty());
    for id in &inc.posted {
        let id = id.clone();
        wait_for("the attestation posted", async || journal.outgoing(&id).unwrap().filter(|o| o.confirmed)).await;
    }
    let letter = wait_for("the dead letter", async || journal.dead_letters().unwrap().into_iter().find(|l| l.id == bad)).await;
    assert!(letter.reason.contains("not a data item"), "{letter:?}");
    assert_eq!(journal.outgoing(&bad).unwrap().unwrap().refused.as_deref(), Some(letter.reason.as_str()));
    let metric = wait_for("the metric", async || {
        let (_, m) = get(&format!("{cu}/metrics")).await;
        Some(dead_letters_metric(&m)).filter(|n| *n == 1)
    })
    .await;
    assert_eq!(metric, 1);

    let lines = cli(&["outbox", "list", "--api", &cu]);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(serde_json::from_str::<Value>(&lines[0]).unwrap()["id"], bad.as_str());
    // Retried: back on the queue, refused again (the bytes cannot change), a dead letter again.
    cli(&["outbox", "retry", &bad, "--api", &cu]);
    wait_for("the retried item refused again", async || journal.dead_letters().unwrap().into_iter().find(|l| l.id == bad)).await;
    // Dropped: kept and listed as dropped, no longer counted.
    cli(&["outbox", "drop", &bad, "--api", &cu]);
    let lines = cli(&["outbox", "list", "--api", &cu]);
    assert!(serde_json::from_str::<Value>(&lines[0]).unwrap()["dropped_at_ms"].is_u64(), "{lines:?}");
    let r = reqwest::Client::new().post(format!("{cu}/outbox/dead-letters/{bad}/retry")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::CONFLICT);
    wait_for("the metric back to 0", async || {
        let (_, m) = get(&format!("{cu}/metrics")).await;
        Some(()).filter(|_| dead_letters_metric(&m) == 0)
    })
    .await;
    c.shutdown().await;
}

/// An actor (the worker's JSON-1 format) whose every evaluation spins until the deadline.
const SPIN_WAT: &str = r#"(module
  (memory (export "memory") 1)
  (func (export "malloc") (param i32) (result i32) (i32.const 1024))
  (func (export "handle") (param i32 i32) (result i32) (loop $forever (br $forever)) (i32.const 0)))"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_fails_while_a_catch_up_makes_no_progress_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let (net, worker) = devnet_and_worker(dir.path(), "[limits]\ndeadline = \"6s\"\n[overload]\nstall_after = \"1s\"\n").await;
    let cu = worker.api_url.clone();
    assert_eq!(get(&format!("{cu}/healthz")).await, (StatusCode::OK, "ok".to_owned()));
    let mu = MessengerClient::new(&net.urls.messenger, Policy::default());
    let module = DataItemBuilder::new()
        .anchor(ao::numeric_anchor(0))
        .tags(ao::module_tags("spin", "1-mb", "1000000000000"))
        .data(wat::parse_str(SPIN_WAT).unwrap())
        .sign(&net.authority)
        .unwrap();
    GatewayClient::new(&net.urls.gateway, Policy::default()).upload(&module).await.unwrap();
    let mut tags = ao::base_tags(ItemType::Process);
    tags.extend([Tag::new("Module", module.id()), Tag::new("Scheduler", &net.scheduler_address)]);
    let spawn = DataItemBuilder::new().anchor(ao::numeric_anchor(1)).tags(tags).data(b" ".to_vec()).sign(&net.authority).unwrap();
    mu.post_item(&spawn).await.unwrap();
    let me = worker.state.address.clone();
    let assign =
        message(&net.authority, &net.urls.registry, 2, &[("Action", "Assign-Workload"), ("Worker", &me), ("Process", &spawn.id())], "")
            .unwrap();
    mu.post_item(&assign).await.unwrap();

    // Both the catch-up (nothing committed) and the device (busy, nothing completed) stall.
    let stalled = wait_for("/healthz to fail", async || {
        let (status, body) = get(&format!("{cu}/healthz")).await;
        (status == StatusCode::SERVICE_UNAVAILABLE && body.contains("committed nothing")).then_some(body)
    })
    .await;
    assert!(stalled.contains(&spawn.id()), "{stalled}");
    // The deadline ends the evaluation (a timeout result): progress, and health, again.
    let journal = worker.state.jobs.journal.clone();
    let r = wait_for("the timed-out result", async || journal.result_by_message(&spawn.id()).unwrap()).await;
    assert!(r.response["Error"].as_str().is_some_and(|e| e.contains("deadline")), "{}", r.response);
    wait_for("/healthz to recover", async || {
        let (status, _) = get(&format!("{cu}/healthz")).await;
        (status == StatusCode::OK).then_some(())
    })
    .await;
    worker.shutdown().await;
    net.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_over_a_limit_are_refused_with_an_error_and_rolled_back() {
    let mut c = CounterNet::start_with("[limits]\nmax_outbox_items = 0\nmax_result_bytes = \"200-b\"\n").await;
    let (_, inc) = c.send_and_wait(&[("Action", "Increment"), ("Amount", "5")], "").await;
    assert_eq!(inc.response["Output"], "count=5");
    let journal = c.worker.state.jobs.journal.clone();
    let kept = journal.progress(&c.process).unwrap().unwrap().state_hash;

    // One outbox entry where none may be: an Error naming the key, nothing posted but the attestation.
    let (_, ping) = c.send_and_wait(&[("Action", "Ping")], "").await;
    let error = ping.response["Error"].as_str().unwrap_or_default();
    assert!(error.contains("limits.max_outbox_items") && error.contains("rolled back"), "{}", ping.response);
    assert_eq!(ping.response["Messages"], serde_json::json!([]));
    assert_eq!(ping.posted.len(), 1, "only the attestation: {:?}", ping.posted);
    assert_eq!(journal.outgoing(&ping.posted[0]).unwrap().unwrap().kind, OutKind::Attestation);

    // A result larger than max_result_bytes.
    let (_, echo) = c.send_and_wait(&[("Action", "Echo")], &"e".repeat(300)).await;
    let error = echo.response["Error"].as_str().unwrap_or_default();
    assert!(error.contains("limits.max_result_bytes"), "{}", echo.response);
    assert_eq!(journal.progress(&c.process).unwrap().unwrap().state_hash, kept, "the refused results changed no state");
    let (_, get) = c.send_and_wait(&[("Action", "Get")], "").await;
    assert_eq!(get.response["Output"], "count=5");
    c.shutdown().await;
}

/// A messenger proxy that answers 503 to every item of one process (its `Process` or
/// `From-Process` tag) while `blocked` names it, and forwards everything else.
struct FlakyMessenger {
    upstream: String,
    blocked: std::sync::Mutex<Option<String>>,
    http: reqwest::Client,
}

async fn flaky_forward(
    axum::extract::State(p): axum::extract::State<std::sync::Arc<FlakyMessenger>>,
    method: axum::http::Method,
    uri: axum::http::Uri,
    body: axum::body::Bytes,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    if let (Some(blocked), Ok(item)) = (p.blocked.lock().unwrap().clone(), ao_gpu_worker::protocol::DataItem::parse(&body))
        && (item.tag("Process") == Some(blocked.as_str()) || item.tag("From-Process") == Some(blocked.as_str()))
    {
        return (StatusCode::SERVICE_UNAVAILABLE, axum::Json(serde_json::json!({"error": "down for this process"}))).into_response();
    }
    let url = format!("{}{}", p.upstream, uri.path_and_query().map_or("/", |q| q.as_str()));
    let r = p.http.request(method, url).header("content-type", "application/octet-stream").body(body).send().await.unwrap();
    let status = r.status();
    (status, r.bytes().await.unwrap()).into_response()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_item_the_messenger_keeps_failing_backs_off_without_holding_up_another_process() {
    use ao_gpu_worker::config::{Config, Overrides};
    use ao_gpu_worker::daemon::Worker;
    use ao_gpu_worker::demo::{module_item, process_item};
    use ao_gpu_worker::devnet::{Devnet, DevnetOptions};

    let dir = tempfile::tempdir().unwrap();
    let mut net = Devnet::start(&DevnetOptions::new(dir.path().join("devnet"), 0)).await.unwrap();
    let proxy = std::sync::Arc::new(FlakyMessenger {
        upstream: net.urls.messenger.trim_end_matches('/').to_owned(),
        blocked: std::sync::Mutex::new(None),
        http: reqwest::Client::new(),
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy_url = format!("http://{}", listener.local_addr().unwrap());
    let app = axum::Router::new().fallback(flaky_forward).with_state(proxy.clone());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let text = format!(
        "[worker]\ndata_dir = {:?}\n[network]\nscheduler_url = {:?}\nmessenger_url = {proxy_url:?}\ngateway_url = {:?}\nmax_attempts = 1\n\
         [registry]\nprocess = {:?}\nauthorities = [{:?}]\npoll_interval = \"50ms\"\n[api]\nlisten = \"127.0.0.1:0\"\n\
         [gpu]\nbackends = [\"cpu\"]\nstartup_bench = \"off\"\n[overload]\nposter_backoff_max = \"400ms\"\n",
        dir.path().join("worker").display().to_string(),
        net.urls.scheduler,
        net.urls.gateway,
        net.urls.registry,
        net.authority.address(),
    );
    let config = Config::parse("test", &text, &Overrides::default()).unwrap();
    let worker = Worker::start(config, ao_gpu_worker::attest::Keypair::generate().unwrap(), net.worker_listener.take()).await.unwrap();
    let mu = MessengerClient::new(&net.urls.messenger, Policy::default());
    let module = module_item(&net.authority).unwrap();
    GatewayClient::new(&net.urls.gateway, Policy::default()).upload(&module).await.unwrap();
    let (a, b) = (
        process_item(&net.authority, &module.id(), &net.scheduler_address, 1, "flaky-a").unwrap(),
        process_item(&net.authority, &module.id(), &net.scheduler_address, 2, "flaky-b").unwrap(),
    );
    // A's items are refused (503) from the start.
    *proxy.blocked.lock().unwrap() = Some(a.id());
    let me = worker.state.address.clone();
    let journal = worker.state.jobs.journal.clone();
    // A first: its attestation is ahead of B's in the queue.
    let mut results = Vec::new();
    for (i, p) in [&a, &b].into_iter().enumerate() {
        mu.post_item(p).await.unwrap();
        let assign = message(
            &net.authority,
            &net.urls.registry,
            10 + i as u64,
            &[("Action", "Assign-Workload"), ("Worker", &me), ("Process", &p.id())],
            "",
        )
        .unwrap();
        mu.post_item(&assign).await.unwrap();
        let id = p.id();
        results.push(wait_for("the spawn evaluated", async || journal.result_by_message(&id).unwrap()).await);
    }
    let (ra, rb) = (&results[0], &results[1]);
    assert!(ra.posted.iter().all(|id| journal.outgoing(id).unwrap().is_some_and(|o| !o.confirmed)), "A's items wait");
    // B's attestation is posted while A's keeps failing.
    for id in &rb.posted {
        wait_for("B's attestation posted", async || journal.outgoing(id).unwrap().filter(|o| o.confirmed)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    for id in &ra.posted {
        let o = journal.outgoing(id).unwrap().unwrap();
        assert!(!o.confirmed && o.refused.is_none(), "A's item is pending, not dropped: {o:?}");
    }
    assert!(journal.dead_letters().unwrap().is_empty(), "a transient failure is not a dead letter");
    // The messenger takes A's items again: they go out after their backoff.
    *proxy.blocked.lock().unwrap() = None;
    for id in &ra.posted {
        wait_for("A's attestation posted after its backoff", async || journal.outgoing(id).unwrap().filter(|o| o.confirmed)).await;
    }
    worker.shutdown().await;
    net.shutdown().await;
}

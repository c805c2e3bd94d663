//! Admission control of the compute-unit API under load (issue 12): dry-runs and state reads
//! beyond the configured concurrency and queue are refused with 503 and `Retry-After`, a
//! scheduled message still completes during a dry-run storm, and `/healthz` keeps answering.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::support::counter::CounterNet;

const STRICT: &str = "[overload]\napi_concurrency = 1\napi_queue = 1\napi_queue_timeout = \"60s\"\nretry_after = \"3s\"\n";

async fn dry_run(http: &reqwest::Client, cu: &str, p: &str) -> (StatusCode, Option<String>, Value) {
    let r = http
        .post(format!("{cu}/dry-run?process-id={p}"))
        .json(&json!({"Tags": [{"name": "Action", "value": "Get"}]}))
        .send()
        .await
        .unwrap();
    let status = r.status();
    let retry = r.headers().get("retry-after").map(|v| v.to_str().unwrap().to_owned());
    let body = r.json().await.unwrap_or(Value::Null);
    (status, retry, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_runs_and_state_reads_beyond_the_queue_get_503_with_retry_after() {
    let mut c = CounterNet::start_with(STRICT).await;
    c.send_and_wait(&[("Action", "Increment"), ("Amount", "3")], "").await;
    let (cu, p) = (c.cu_url().to_owned(), c.process.clone());
    let admission = c.worker.state.admission.clone();
    let http = reqwest::Client::new();

    // The one slot is taken: the next request waits in the queue (of one)...
    let held = admission.admit(1).await.unwrap();
    let queued = tokio::spawn({
        let (http, cu, p) = (http.clone(), cu.clone(), p.clone());
        async move { dry_run(&http, &cu, &p).await }
    });
    let start = Instant::now();
    while admission.queued() == 0 {
        assert!(start.elapsed() < Duration::from_secs(30), "the dry-run never queued");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // ...and the ones after it are refused at once, with Retry-After and a JSON error.
    let (status, retry, body) = dry_run(&http, &cu, &p).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(retry.as_deref(), Some("3"));
    assert!(body["error"].as_str().is_some_and(|e| e.contains("overloaded")), "{body}");
    let r = http.get(format!("{cu}/state/{p}")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.headers().get("retry-after").unwrap(), "3");
    let metrics = http.get(format!("{cu}/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("api_refused_total{reason=\"queue_full\"} 2"), "{metrics}");
    assert!(metrics.contains("api_evaluations_queued 1"), "{metrics}");

    // Once the slot is free the queued request runs and answers.
    drop(held);
    let (status, _, body) = queued.await.unwrap();
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["Output"], "count=3");
    let (status, _, _) = dry_run(&http, &cu, &p).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!((admission.running(), admission.queued()), (0, 0));
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_request_whose_client_goes_away_leaves_the_queue() {
    let c = CounterNet::start_with(STRICT).await;
    let (cu, p) = (c.cu_url().to_owned(), c.process.clone());
    let admission = c.worker.state.admission.clone();
    let held = admission.admit(1).await.unwrap();
    // The client gives up after 500 ms, while its dry-run waits in the queue.
    let gave_up = reqwest::Client::new()
        .post(format!("{cu}/dry-run?process-id={p}"))
        .json(&json!({"Tags": []}))
        .timeout(Duration::from_millis(500))
        .send()
        .await;
    assert!(gave_up.is_err_and(|e| e.is_timeout()));
    let start = Instant::now();
    while admission.queued() != 0 {
        assert!(start.elapsed() < Duration::from_secs(30), "the abandoned request stayed in the queue");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Its slot in the queue is free again: the next request queues, and runs once the slot frees.
    drop(held);
    let (status, _, body) = dry_run(&reqwest::Client::new(), &cu, &p).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduled_message_completes_and_healthz_answers_during_a_dry_run_storm() {
    let mut c = CounterNet::start_with("[overload]\napi_concurrency = 1\napi_queue = 4\napi_queue_timeout = \"2s\"\n").await;
    let (cu, p) = (c.cu_url().to_owned(), c.process.clone());
    let http = reqwest::Client::new();
    let stop = Arc::new(AtomicBool::new(false));
    // 64 clients firing dry-runs back to back until the scheduled message is evaluated.
    let storm: Vec<_> = (0..64)
        .map(|_| {
            let (http, cu, p, stop) = (http.clone(), cu.clone(), p.clone(), stop.clone());
            tokio::spawn(async move {
                let (mut ok, mut refused) = (0u32, 0u32);
                while !stop.load(Ordering::Relaxed) {
                    let (status, retry, body) = dry_run(&http, &cu, &p).await;
                    match status {
                        StatusCode::OK => ok += 1,
                        StatusCode::SERVICE_UNAVAILABLE => {
                            assert!(retry.is_some(), "503 without Retry-After: {body}");
                            refused += 1;
                        }
                        other => panic!("dry-run answered {other}: {body}"),
                    }
                }
                (ok, refused)
            })
        })
        .collect();
    let health = {
        let (http, cu, stop) = (http.clone(), cu.clone(), stop.clone());
        tokio::spawn(async move {
            let mut worst = Duration::ZERO;
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                let r = http.get(format!("{cu}/healthz")).timeout(Duration::from_secs(30)).send().await.unwrap();
                assert!(r.status().is_success(), "/healthz answered {} during the storm", r.status());
                worst = worst.max(t.elapsed());
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            worst
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_, record) = c.send_and_wait(&[("Action", "Increment"), ("Amount", "2")], "").await;
    assert_eq!(record.response["Output"], "count=2", "the scheduled message completed during the storm");
    stop.store(true, Ordering::Relaxed);
    let (mut ok, mut refused) = (0, 0);
    for t in storm {
        let (o, r) = t.await.unwrap();
        ok += o;
        refused += r;
    }
    let worst = health.await.unwrap();
    assert!(ok > 0, "some dry-runs ran");
    assert!(refused > 0, "64 clients over one slot and a queue of 4: some were refused");
    // A correctness bound, not a benchmark: the liveness probe is never stuck behind the storm.
    assert!(worst < Duration::from_secs(5), "/healthz took {worst:?} during the storm");
    c.shutdown().await;
}

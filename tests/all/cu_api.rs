//! The worker's compute-unit read API (docs/ao-protocol.md §5) against a devnet: results of
//! good and failed messages, result pages, the state image, dry-runs that change nothing,
//! and JSON errors for bad requests.

use ao_gpu_worker::journal::{Progress, sha256_hex};

use crate::support::counter::CounterNet;
use reqwest::StatusCode;
use serde_json::{Value, json};

/// What a dry-run must leave untouched.
#[derive(Debug, PartialEq)]
struct Snapshot {
    results: Vec<(u64, String)>,
    progress: Option<Progress>,
    pending: u64,
    state: Option<String>,
}

fn snapshot(c: &CounterNet) -> Snapshot {
    let j = &c.worker.state.jobs.journal;
    let results = j.results(&c.process, None, None, 10_000, false).unwrap().into_iter().map(|r| (r.nonce, r.result_hash)).collect();
    let progress = j.progress(&c.process).unwrap();
    let state = j.latest_state(&c.process).unwrap().and_then(|l| l.source.image).map(|i| sha256_hex(&i));
    Snapshot { results, progress, pending: j.pending_count().unwrap(), state }
}

async fn get(url: impl Into<String>) -> (StatusCode, Value) {
    let url: String = url.into();
    let r = reqwest::get(&url).await.unwrap();
    let status = r.status();
    let text = r.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or_else(|e| panic!("GET {url}: {status} body is not JSON ({e}): {text}")))
}

async fn post(url: impl Into<String>, body: impl Into<reqwest::Body>) -> (StatusCode, Value) {
    let url: String = url.into();
    let r = reqwest::Client::new().post(&url).header("content-type", "application/json").body(body).send().await.unwrap();
    let status = r.status();
    let text = r.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or_else(|e| panic!("POST {url}: {status} body is not JSON ({e}): {text}")))
}

/// An error answer: the status and a JSON `{"error": "..."}` body.
fn assert_error(answer: &(StatusCode, Value), status: StatusCode, what: &str) {
    assert_eq!(answer.0, status, "{what}: {answer:?}");
    assert!(answer.1["error"].as_str().is_some_and(|e| !e.is_empty()), "{what}: {answer:?}");
}

fn cursors(page: &Value) -> Vec<u64> {
    page["edges"].as_array().unwrap().iter().map(|e| e["cursor"].as_str().unwrap().parse().unwrap()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cu_read_api_serves_results_state_and_dry_runs() {
    let mut c = CounterNet::start().await;
    let (cu, p) = (c.cu_url().to_owned(), c.process.clone());
    let (inc5, _) = c.send_and_wait(&[("Action", "Increment"), ("Amount", "5")], "").await;
    let (_, _) = c.send_and_wait(&[("Action", "Increment"), ("Amount", "2")], "").await;
    let (fail, fail_record) = c.send_and_wait(&[("Action", "Fail")], "").await;
    let (print, print_record) = c.send_and_wait(&[("Action", "Print")], "").await;
    let (get_id, get_record) = c.send_and_wait(&[("Action", "Get")], "").await;
    assert_eq!(get_record.response["Output"], "count=7");

    // GET /result: the journal's result object, without the internal Log.
    let (status, good) = get(&format!("{cu}/result/{get_id}?process-id={p}")).await;
    assert_eq!(status, StatusCode::OK, "{good}");
    assert_eq!(good["Output"], "count=7");
    assert_eq!(good["Messages"], json!([]));
    assert_eq!(good["Spawns"], json!([]));
    assert_eq!(good["Assignments"], json!([]));
    assert!(good["GasUsed"].as_u64().unwrap() > 0);
    assert_eq!(good["GasUsed"], get_record.gas_used);
    assert!(good.get("Error").is_none(), "{good}");
    assert_eq!(good, get_record.response);

    let (status, failed) = get(&format!("{cu}/result/{fail}?process-id={p}")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(failed["Error"], "failed on purpose");
    assert!(failed["GasUsed"].as_u64().unwrap() > 0, "{failed}");
    assert_eq!(failed, fail_record.response);

    assert!(print_record.response.get("Log").is_some(), "the journal keeps the captured output: {}", print_record.response);
    let (status, printed) = get(&format!("{cu}/result/{print}?process-id={p}&no-busy=1")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(printed["Output"], "printed");
    assert!(printed.get("Log").is_none(), "Log is internal: {printed}");

    // A message just sent: the API waits for the work loop instead of answering 404.
    let echo = c.send(&[("Action", "Echo")], "just sent").await;
    let (status, echoed) = get(&format!("{cu}/result/{echo}?process-id={p}&no-busy=1")).await;
    assert_eq!((status, echoed["Output"].clone()), (StatusCode::OK, json!("just sent")), "{echoed}");

    let (status, spawned) = get(&format!("{cu}/result/{p}?process-id={p}")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(spawned["Output"], "ignored: Process");

    // GET /results: nonces 0 (the process) to 6, paged both ways; from exclusive, to inclusive.
    let journal = &c.worker.state.jobs.journal;
    let (status, all) = get(&format!("{cu}/results/{p}")).await;
    assert_eq!(status, StatusCode::OK, "{all}");
    assert_eq!(cursors(&all), [0, 1, 2, 3, 4, 5, 6]);
    assert_eq!(all["pageInfo"]["hasNextPage"], false);
    for edge in all["edges"].as_array().unwrap() {
        let nonce: u64 = edge["cursor"].as_str().unwrap().parse().unwrap();
        let record = journal.results(&p, nonce.checked_sub(1), Some(nonce), 1, false).unwrap().remove(0);
        let mut expected = record.response.clone();
        expected.as_object_mut().unwrap().remove("Log");
        assert_eq!(edge["node"], expected, "node {nonce}");
    }
    let page = |q: &str| get(format!("{cu}/results/{p}?{q}"));
    let (_, first) = page("limit=2").await;
    assert_eq!((cursors(&first), first["pageInfo"]["hasNextPage"].clone()), (vec![0, 1], json!(true)));
    let (_, second) = page("limit=2&from=1&sort=ASC").await;
    assert_eq!(cursors(&second), [2, 3]);
    let (_, last) = page("limit=2&from=4").await;
    assert_eq!((cursors(&last), last["pageInfo"]["hasNextPage"].clone()), (vec![5, 6], json!(false)));
    let (_, desc) = page("sort=DESC&limit=2").await;
    assert_eq!((cursors(&desc), desc["pageInfo"]["hasNextPage"].clone()), (vec![6, 5], json!(true)));
    let (_, desc_to) = page("sort=DESC&to=3&limit=10").await;
    assert_eq!(cursors(&desc_to), [3, 2, 1, 0]);
    let (_, window) = page("from=1&to=3").await;
    assert_eq!(cursors(&window), [2, 3]);
    let (_, inc_node) = page("from=0&to=1").await;
    assert_eq!(inc_node["edges"][0]["node"]["Output"], "count=5", "{inc5}");
    let (_, empty) = page("from=6").await;
    assert_eq!((cursors(&empty), empty["pageInfo"]["hasNextPage"].clone()), (vec![], json!(false)));

    // GET /state: the latest memory image and where it stands.
    let r = reqwest::get(format!("{cu}/state/{p}")).await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let header = |name: &str| r.headers().get(name).unwrap_or_else(|| panic!("no {name} header")).to_str().unwrap().to_owned();
    assert_eq!(header("content-type"), "application/octet-stream");
    let progress = journal.progress(&p).unwrap().unwrap();
    assert_eq!(header("last-ordinate"), progress.nonce.to_string());
    assert_eq!(header("last-timestamp"), progress.timestamp.to_string());
    let last_record = journal.results(&p, None, None, 1, true).unwrap().remove(0);
    assert_eq!(last_record.nonce, progress.nonce);
    assert_eq!(header("last-block-height"), last_record.block_height.to_string());
    let image = r.bytes().await.unwrap();
    assert!(!image.is_empty());
    assert_eq!(Some(sha256_hex(&image)), progress.state_hash);

    // POST /dry-run: evaluated against the latest state, read-only, nothing kept (nothing
    // queued to post either: wait until the poster is idle so the count is stable).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while journal.pending_count().unwrap() > 0 {
        assert!(std::time::Instant::now() < deadline, "items still pending after 60 s");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let before = snapshot(&c);
    let dry = |body: Value| post(format!("{cu}/dry-run?process-id={p}"), body.to_string());
    let (status, got) = dry(json!({"Target": p, "Owner": c.user.address(), "Tags": [{"name": "Action", "value": "Get"}]})).await;
    assert_eq!(status, StatusCode::OK, "{got}");
    assert_eq!(got["Output"], "count=7");
    assert!(got["GasUsed"].as_u64().unwrap() > 0);
    assert!(got.get("Error").is_none());
    let (status, bumped) = dry(json!({"Tags": [{"name": "Action", "value": "Increment"}, {"name": "Amount", "value": "100"}]})).await;
    assert_eq!(status, StatusCode::OK, "{bumped}");
    assert_eq!(bumped["Output"], "count=107");
    let (_, again) = dry(json!({"Tags": [{"name": "Action", "value": "Get"}], "Timestamp": "1700000000000", "Block-Height": 7})).await;
    assert_eq!(again["Output"], "count=7", "a dry-run Increment changes nothing");
    let (_, failed) = dry(json!({"Tags": [{"name": "Action", "value": "Fail"}]})).await;
    assert_eq!(failed["Error"], "failed on purpose");
    let (_, echoed) =
        dry(json!({"Id": "1234", "Owner": "1234", "Anchor": "0", "Data": "hello", "Tags": [{"name": "Action", "value": "Echo"}]})).await;
    assert_eq!(echoed["Output"], "hello");
    let (_, echoed) = dry(json!({"Data": {"a": 1}, "Tags": [{"name": "Action", "value": "Echo"}], "Extra": null})).await;
    assert_eq!(echoed["Output"], "{\"a\":1}");
    assert_eq!(snapshot(&c), before, "dry-runs must not touch the journal");
    let (_, real) = c.send_and_wait(&[("Action", "Get")], "").await;
    assert_eq!(real.response["Output"], "count=7", "the next real message does not see dry-run increments");

    // Bad requests: JSON errors with 4xx statuses.
    let other = ao_gpu_worker::protocol::b64::encode(&[9; 32]);
    assert_error(&get(&format!("{cu}/result/{get_id}")).await, StatusCode::BAD_REQUEST, "no process-id");
    assert_error(&get(&format!("{cu}/result/{get_id}?process-id=short")).await, StatusCode::BAD_REQUEST, "short process-id");
    assert_error(&get(&format!("{cu}/result/nope?process-id={p}")).await, StatusCode::BAD_REQUEST, "bad message id");
    assert_error(&get(&format!("{cu}/result/{other}?process-id={p}")).await, StatusCode::NOT_FOUND, "unknown message");
    assert_error(&get(&format!("{cu}/result/{get_id}?process-id={other}")).await, StatusCode::NOT_FOUND, "other process");
    assert_error(&get(&format!("{cu}/result/{other}?process-id={other}&no-busy=1")).await, StatusCode::NOT_FOUND, "unserved");
    for q in ["limit=0", "limit=1001", "limit=x", "sort=UP", "from=x", "to=-1"] {
        assert_error(&get(format!("{cu}/results/{p}?{q}")).await, StatusCode::BAD_REQUEST, q);
    }
    let (status, max) = get(&format!("{cu}/results/{p}?limit=1000")).await;
    assert_eq!((status, cursors(&max).len()), (StatusCode::OK, 8));
    assert_error(&get(&format!("{cu}/results/{other}")).await, StatusCode::NOT_FOUND, "results of an unknown process");
    assert_error(&get(&format!("{cu}/results/bad")).await, StatusCode::BAD_REQUEST, "results of a bad id");
    assert_error(&get(&format!("{cu}/state/{other}")).await, StatusCode::NOT_FOUND, "state of an unknown process");
    assert_error(&get(&format!("{cu}/state/{p}?to=1")).await, StatusCode::BAD_REQUEST, "state with to");
    assert_error(&get(&format!("{cu}/dry-run")).await, StatusCode::METHOD_NOT_ALLOWED, "GET /dry-run");
    let dry_url = format!("{cu}/dry-run?process-id={p}");
    assert_error(&post(&format!("{cu}/dry-run"), "{}").await, StatusCode::BAD_REQUEST, "dry-run without process-id");
    assert_error(&post(&dry_url, "not json").await, StatusCode::BAD_REQUEST, "dry-run with a non-JSON body");
    assert_error(&post(&dry_url, "").await, StatusCode::BAD_REQUEST, "dry-run with an empty body");
    assert_error(&post(&dry_url, "[]").await, StatusCode::BAD_REQUEST, "dry-run with an array");
    for body in [
        json!({"Tags": [{"name": "Action", "value": 1}]}),
        json!({"Tags": {"Action": "Get"}}),
        json!({"Timestamp": "soon"}),
        json!({"Block-Height": -1}),
        json!({"Owner": 5}),
    ] {
        assert_error(&post(&dry_url, body.to_string()).await, StatusCode::BAD_REQUEST, &body.to_string());
    }
    assert_error(&post(&format!("{cu}/dry-run?process-id={other}"), "{}").await, StatusCode::NOT_FOUND, "dry-run of an unserved process");
    let huge = format!("{{\"Data\": \"{}\"}}", "x".repeat(2 << 20));
    assert_error(&post(&dry_url, huge).await, StatusCode::PAYLOAD_TOO_LARGE, "dry-run body over 1 MiB");
    c.shutdown().await;
}

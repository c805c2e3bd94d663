//! The AO unit clients (scheduler, messenger, gateway) against real HTTP servers on loopback:
//! retries on 429/5xx, bounded attempts, typed errors, timeouts, id checks and pagination.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::json;

use ao_gpu_worker::attest::Keypair;
use ao_gpu_worker::net::scheduler::Range;
use ao_gpu_worker::net::{GatewayClient, MessengerClient, NetError, Policy, SchedulerClient, Unit};
use ao_gpu_worker::protocol::ao::{self, ItemType};
use ao_gpu_worker::protocol::su::{Edge, ItemJson, MessageNode, Page, PageInfo};
use ao_gpu_worker::protocol::{DataItem, DataItemBuilder};

/// Bounds every test so that a client that loops forever fails instead of hanging the suite.
const TEST_DEADLINE: Duration = Duration::from_secs(60);

/// What a test server saw: how many requests, and each one's method and path-and-query.
#[derive(Default)]
struct Seen {
    hits: AtomicUsize,
    requests: Mutex<Vec<(Method, String)>>,
}

impl Seen {
    /// Records a request; returns its 1-based number.
    fn record(&self, method: &Method, uri: &Uri) -> usize {
        let path = uri.path_and_query().map(|p| p.as_str().to_owned()).unwrap_or_default();
        self.requests.lock().unwrap().push((method.clone(), path));
        self.hits.fetch_add(1, Ordering::SeqCst) + 1
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    fn paths(&self) -> Vec<String> {
        self.requests.lock().unwrap().iter().map(|(_, p)| p.clone()).collect()
    }

    fn methods(&self) -> Vec<Method> {
        self.requests.lock().unwrap().iter().map(|(m, _)| m.clone()).collect()
    }
}

type Shared = Arc<Seen>;

/// Serves `router` on a fresh loopback port; returns its base URL.
async fn serve(router: Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(listener, router).await.unwrap();
    });
    format!("http://{addr}")
}

/// A URL on a loopback port where nothing listens.
fn closed_port_url() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    format!("http://127.0.0.1:{port}")
}

/// A quick policy: millisecond backoffs, generous timeouts (only the timeout test tightens them).
fn quick(max_attempts: u32) -> Policy {
    Policy {
        request_timeout: Duration::from_secs(20),
        connect_timeout: Duration::from_secs(5),
        max_attempts,
        backoff_min: Duration::from_millis(1),
        backoff_max: Duration::from_millis(5),
        ..Policy::default()
    }
}

fn json_response(status: StatusCode, value: serde_json::Value) -> Response {
    (status, axum::Json(value)).into_response()
}

fn signed(key: &Keypair, item_type: ItemType, extra: &[(&str, String)], data: &str) -> DataItem {
    let mut builder = DataItemBuilder::new().tags(ao::base_tags(item_type)).data(data.as_bytes().to_vec());
    for (name, value) in extra {
        builder = builder.tag(*name, value.clone());
    }
    builder.sign(key).unwrap()
}

fn message(key: &Keypair, n: u64) -> DataItem {
    signed(key, ItemType::Message, &[("Action", "Test".into()), ("Seq", n.to_string())], &format!("message {n}"))
}

/// Runs a client future under [`TEST_DEADLINE`].
async fn bounded<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(TEST_DEADLINE, f).await.expect("the client call did not finish: retry or pagination loop?")
}

/// A scheduler whose `POST /` answers with `before` for the first `failures` requests, then
/// with the SU's acknowledgement of the posted item (decoded from the request body).
async fn flaky_scheduler(failures: usize, before: StatusCode) -> (String, Shared) {
    let seen = Shared::default();
    let router = Router::new()
        .route(
            "/",
            post(move |State(seen): State<Shared>, method: Method, uri: Uri, headers: HeaderMap, body: Bytes| async move {
                let n = seen.record(&method, &uri);
                if n <= failures {
                    return json_response(before, json!({"error": "busy, try later"}));
                }
                assert_eq!(headers.get("content-type").and_then(|v| v.to_str().ok()), Some("application/octet-stream"));
                let item = DataItem::parse_verified(&body).expect("the client posts the signed item bytes");
                json_response(StatusCode::OK, json!({"timestamp": 1, "id": item.id()}))
            }),
        )
        .with_state(seen.clone());
    (serve(router).await, seen)
}

#[tokio::test]
async fn scheduler_post_retries_503_then_succeeds() {
    let (url, seen) = flaky_scheduler(2, StatusCode::SERVICE_UNAVAILABLE).await;
    let item = message(&Keypair::generate().unwrap(), 1);
    let posted = bounded(SchedulerClient::new(&url, quick(5)).post_item(&item)).await.unwrap();
    assert_eq!(posted.id, item.id());
    assert_eq!(posted.timestamp, 1);
    assert_eq!(seen.hits(), 3, "two 503s, then the success");
}

#[tokio::test]
async fn scheduler_post_retries_429_like_5xx() {
    let (url, seen) = flaky_scheduler(2, StatusCode::TOO_MANY_REQUESTS).await;
    let item = message(&Keypair::generate().unwrap(), 2);
    let posted = bounded(SchedulerClient::new(&url, quick(5)).post_item(&item)).await.unwrap();
    assert_eq!(posted.id, item.id());
    assert_eq!(seen.hits(), 3, "two 429s, then the success");
}

#[tokio::test]
async fn persistent_429_is_unavailable_after_max_attempts() {
    let (url, seen) = flaky_scheduler(usize::MAX, StatusCode::TOO_MANY_REQUESTS).await;
    let item = message(&Keypair::generate().unwrap(), 3);
    let err = bounded(SchedulerClient::new(&url, quick(3)).post_item(&item)).await.unwrap_err();
    match &err {
        NetError::Unavailable { unit: Unit::Scheduler, attempts: 3, reason, .. } => assert!(reason.contains("429"), "{reason}"),
        other => panic!("expected Unavailable after 3 attempts, got {other:?}"),
    }
    assert_eq!(seen.hits(), 3);
}

#[tokio::test]
async fn always_500_gives_up_after_max_attempts() {
    const MAX: u32 = 4;
    let (url, seen) = flaky_scheduler(usize::MAX, StatusCode::INTERNAL_SERVER_ERROR).await;
    let item = message(&Keypair::generate().unwrap(), 4);
    let err = bounded(SchedulerClient::new(&url, quick(MAX)).post_item(&item)).await.unwrap_err();
    assert!(err.is_transient(), "{err:?}");
    let NetError::Unavailable { unit, url: err_url, attempts, reason } = &err else { panic!("expected Unavailable, got {err:?}") };
    assert_eq!(*unit, Unit::Scheduler);
    assert_eq!(*attempts, MAX);
    assert!(err_url.starts_with(&url), "{err_url}");
    assert!(reason.contains("500") && reason.contains("busy, try later"), "reason names the status and the unit's message: {reason}");
    // No retry storm: the server saw exactly max_attempts requests, and no more arrive later.
    assert_eq!(seen.hits(), MAX as usize);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(seen.hits(), MAX as usize, "no request after the call returned");
    let text = err.to_string();
    assert!(text.contains("scheduler"), "{text}");
    assert!(text.contains(reason.as_str()), "{text}");
    assert!(text.contains(&format!("{MAX} attempt")), "{text}");
}

#[tokio::test]
async fn client_error_is_rejected_after_one_request() {
    let seen = Shared::default();
    let router = Router::new()
        .route(
            "/",
            post(|State(seen): State<Shared>, method: Method, uri: Uri| async move {
                seen.record(&method, &uri);
                json_response(StatusCode::BAD_REQUEST, json!({"error": "bad thing"}))
            }),
        )
        .with_state(seen.clone());
    let url = serve(router).await;
    let item = message(&Keypair::generate().unwrap(), 5);
    let err = bounded(SchedulerClient::new(&url, quick(5)).post_item(&item)).await.unwrap_err();
    assert!(!err.is_transient());
    match &err {
        NetError::Rejected { unit: Unit::Scheduler, method, status: 400, message, .. } => {
            assert_eq!(method, "POST");
            assert_eq!(message, "bad thing");
        }
        other => panic!("expected Rejected 400, got {other:?}"),
    }
    assert_eq!(seen.hits(), 1, "a 4xx is never retried");
    assert!(err.to_string().contains("bad thing"), "{err}");
}

#[tokio::test]
async fn garbage_200_is_bad_answer_after_one_request() {
    let seen = Shared::default();
    let router = Router::new()
        .route(
            "/",
            post(|State(seen): State<Shared>, method: Method, uri: Uri| async move {
                seen.record(&method, &uri);
                (StatusCode::OK, "<html>definitely not json</html>")
            }),
        )
        .with_state(seen.clone());
    let url = serve(router).await;
    let item = message(&Keypair::generate().unwrap(), 6);
    let err = bounded(SchedulerClient::new(&url, quick(5)).post_item(&item)).await.unwrap_err();
    match &err {
        NetError::BadAnswer { unit: Unit::Scheduler, reason, .. } => {
            assert!(reason.contains("invalid JSON") && reason.contains("definitely not json"), "{reason}")
        }
        other => panic!("expected BadAnswer, got {other:?}"),
    }
    assert!(!err.is_transient());
    assert_eq!(seen.hits(), 1, "an undecodable answer is never retried");
}

#[tokio::test]
async fn closed_port_is_unavailable_after_max_attempts() {
    let url = closed_port_url();
    let item = message(&Keypair::generate().unwrap(), 7);
    let err = bounded(SchedulerClient::new(&url, quick(3)).post_item(&item)).await.unwrap_err();
    match &err {
        NetError::Unavailable { unit: Unit::Scheduler, attempts: 3, reason, .. } => {
            let lower = reason.to_lowercase();
            assert!(lower.contains("request failed") && lower.contains("connect"), "reason names the connection failure: {reason}");
        }
        other => panic!("expected Unavailable after 3 attempts, got {other:?}"),
    }
}

#[tokio::test]
async fn slow_server_times_out() {
    let seen = Shared::default();
    let router = Router::new()
        .route(
            "/",
            post(|State(seen): State<Shared>, method: Method, uri: Uri| async move {
                seen.record(&method, &uri);
                tokio::time::sleep(Duration::from_secs(2)).await;
                json_response(StatusCode::OK, json!({"timestamp": 1, "id": "late"}))
            }),
        )
        .with_state(seen.clone());
    let url = serve(router).await;
    let policy = Policy { request_timeout: Duration::from_millis(200), connect_timeout: Duration::from_millis(200), ..quick(2) };
    let item = message(&Keypair::generate().unwrap(), 8);
    let started = Instant::now();
    let err = bounded(SchedulerClient::new(&url, policy).post_item(&item)).await.unwrap_err();
    let elapsed = started.elapsed();
    match &err {
        NetError::Unavailable { unit: Unit::Scheduler, attempts: 2, reason, .. } => assert!(reason.contains("timed out"), "{reason}"),
        other => panic!("expected Unavailable (timed out) after 2 attempts, got {other:?}"),
    }
    assert_eq!(seen.hits(), 2, "a timeout is retried like a 5xx");
    // Two 200 ms attempts; waiting for the server would take at least 4 s.
    assert!(elapsed < Duration::from_millis(3500), "the request timeout did not cut the wait short: {elapsed:?}");
}

/// A messenger that acknowledges every post with `id_of(posted item id)`.
async fn messenger(id_of: fn(String) -> String) -> (String, Shared) {
    let seen = Shared::default();
    let router = Router::new()
        .route(
            "/",
            post(move |State(seen): State<Shared>, method: Method, uri: Uri, body: Bytes| async move {
                seen.record(&method, &uri);
                let item = DataItem::parse_verified(&body).expect("the client posts the signed item bytes");
                json_response(StatusCode::ACCEPTED, json!({"message": "Processing message", "id": id_of(item.id())}))
            }),
        )
        .with_state(seen.clone());
    (serve(router).await, seen)
}

#[tokio::test]
async fn messenger_accepts_matching_id() {
    let (url, seen) = messenger(|id| id).await;
    let item = message(&Keypair::generate().unwrap(), 9);
    let accepted = bounded(MessengerClient::new(&url, quick(3)).post_item(&item)).await.unwrap();
    assert_eq!(accepted.id, item.id());
    assert_eq!(accepted.message, "Processing message");
    assert_eq!(seen.hits(), 1);
}

#[tokio::test]
async fn messenger_acknowledging_another_id_is_bad_answer() {
    let (url, seen) = messenger(|id| id.chars().rev().collect()).await;
    let item = message(&Keypair::generate().unwrap(), 10);
    let err = bounded(MessengerClient::new(&url, quick(3)).post_item(&item)).await.unwrap_err();
    match &err {
        NetError::BadAnswer { unit: Unit::Messenger, reason, .. } => assert!(reason.contains(&item.id()), "{reason}"),
        other => panic!("expected BadAnswer, got {other:?}"),
    }
    assert_eq!(seen.hits(), 1, "a wrong acknowledgement is not retried");
}

/// A gateway holding one item's data under `/raw/{id}`.
async fn gateway(known: String, data: Vec<u8>) -> (String, Shared) {
    let seen = Shared::default();
    let router = Router::new()
        .route(
            "/raw/{id}",
            axum::routing::get(
                move |State(seen): State<Shared>, method: Method, uri: Uri, axum::extract::Path(id): axum::extract::Path<String>| async move {
                    seen.record(&method, &uri);
                    if id == known {
                        (StatusCode::OK, data.clone()).into_response()
                    } else {
                        json_response(StatusCode::NOT_FOUND, json!({"error": "no such item"}))
                    }
                },
            ),
        )
        .with_state(seen.clone());
    (serve(router).await, seen)
}

#[tokio::test]
async fn gateway_exists_and_raw() {
    let key = Keypair::generate().unwrap();
    let held = message(&key, 11);
    let absent = message(&key, 12);
    let (url, seen) = gateway(held.id(), held.data.clone()).await;
    let gw = GatewayClient::new(&url, quick(3));

    assert!(bounded(gw.exists(&held.id())).await.unwrap());
    assert!(!bounded(gw.exists(&absent.id())).await.unwrap(), "404 means absent, not an error");
    assert_eq!(seen.methods(), vec![Method::HEAD, Method::HEAD], "exists does not download the data");

    assert_eq!(bounded(gw.raw(&held.id())).await.unwrap(), held.data);
    match bounded(gw.raw(&absent.id())).await.unwrap_err() {
        NetError::NotFound { unit: Unit::Gateway, what, id } => {
            assert_eq!(what, "item");
            assert_eq!(id, absent.id());
        }
        other => panic!("expected NotFound, got {other:?}"),
    }
    assert_eq!(seen.hits(), 4, "404 is never retried");
    assert_eq!(seen.paths()[3], format!("/raw/{}", absent.id()));
}

/// A page of the schedule: one entry per cursor, each a signed message with its signed assignment.
fn page(key: &Keypair, process: &DataItem, cursors: &[u64], has_next_page: bool) -> Page {
    let edges = cursors
        .iter()
        .map(|&cursor| {
            let msg = message(key, cursor);
            let assignment = signed(
                key,
                ItemType::Assignment,
                &[("Process", process.id()), ("Message", msg.id()), ("Nonce", cursor.to_string()), ("Timestamp", cursor.to_string())],
                "",
            );
            Edge {
                cursor: cursor.to_string(),
                node: MessageNode { message: Some(ItemJson::from_item(&msg)), assignment: ItemJson::from_item(&assignment) },
            }
        })
        .collect();
    Page { page_info: PageInfo { has_next_page }, edges }
}

/// A scheduler that serves `pages` in order, one per request, whatever the query says (so the
/// test checks the client's queries, not the server's cooperation). Past the last page it
/// answers 400, which ends any runaway loop with an error.
async fn paging_scheduler(pages: Vec<Page>) -> (String, Shared) {
    let seen = Shared::default();
    let pages = Arc::new(pages);
    let router = Router::new()
        .fallback(move |State(seen): State<Shared>, method: Method, uri: Uri| {
            let pages = pages.clone();
            async move {
                let n = seen.record(&method, &uri);
                match pages.get(n - 1) {
                    Some(p) => (StatusCode::OK, axum::Json(p.clone())).into_response(),
                    None => json_response(StatusCode::BAD_REQUEST, json!({"error": "no more pages"})),
                }
            }
        })
        .with_state(seen.clone());
    (serve(router).await, seen)
}

#[tokio::test]
async fn scheduler_all_follows_pagination() {
    let key = Keypair::generate().unwrap();
    let process = signed(&key, ItemType::Process, &[("Module", "m".repeat(43))], "process");
    let pages =
        vec![page(&key, &process, &[1000, 1001], true), page(&key, &process, &[1002, 1003], true), page(&key, &process, &[1004], false)];
    let expected: Vec<MessageNode> = pages.iter().flat_map(|p| p.edges.iter().map(|e| e.node.clone())).collect();
    let (url, seen) = paging_scheduler(pages).await;

    let su = SchedulerClient::new(&url, quick(3));
    let nodes = bounded(su.all(&process.id(), Range { limit: Some(2), ..Range::default() })).await.unwrap();
    assert_eq!(nodes, expected, "every node, in order");
    let p = process.id();
    assert_eq!(
        seen.paths(),
        vec![
            format!("/{p}?process-id={p}&show-anchor=1&limit=2"),
            format!("/{p}?process-id={p}&show-anchor=1&from=1001&limit=2"),
            format!("/{p}?process-id={p}&show-anchor=1&from=1003&limit=2")
        ],
        "each request starts after the previous page's last cursor"
    );
    // The nodes still carry verifiable signed items.
    for node in &nodes {
        node.message.as_ref().unwrap().to_item().unwrap().verify().unwrap();
        node.assignment.to_item().unwrap().verify().unwrap();
    }
}

#[tokio::test]
async fn scheduler_all_refuses_a_cursor_that_goes_backwards() {
    let key = Keypair::generate().unwrap();
    let process = signed(&key, ItemType::Process, &[], "process");
    let pages =
        vec![page(&key, &process, &[1000, 1001], true), page(&key, &process, &[900, 901], true), page(&key, &process, &[902], false)];
    let (url, seen) = paging_scheduler(pages).await;
    let err = bounded(SchedulerClient::new(&url, quick(3)).all(&process.id(), Range::default())).await.unwrap_err();
    match &err {
        NetError::BadAnswer { unit: Unit::Scheduler, reason, .. } => assert!(reason.contains("backwards"), "{reason}"),
        other => panic!("expected BadAnswer, got {other:?}"),
    }
    assert_eq!(seen.hits(), 2, "stops at the page whose cursor went backwards");
}

#[tokio::test]
async fn scheduler_all_refuses_a_cursor_that_does_not_advance() {
    let key = Keypair::generate().unwrap();
    let process = signed(&key, ItemType::Process, &[], "process");
    let stuck = page(&key, &process, &[1000, 1001], true);
    let (url, seen) = paging_scheduler(vec![stuck.clone(), stuck.clone(), stuck]).await;
    let err = bounded(SchedulerClient::new(&url, quick(3)).all(&process.id(), Range::default())).await.unwrap_err();
    assert!(matches!(err, NetError::BadAnswer { unit: Unit::Scheduler, .. }), "{err:?}");
    assert_eq!(seen.hits(), 2, "no infinite loop on a repeated page");
}

#[tokio::test]
async fn scheduler_page_404_is_not_found() {
    let seen = Shared::default();
    let router = Router::new()
        .fallback(|State(seen): State<Shared>, method: Method, uri: Uri| async move {
            seen.record(&method, &uri);
            json_response(StatusCode::NOT_FOUND, json!({"error": "Process not found"}))
        })
        .with_state(seen.clone());
    let url = serve(router).await;
    let process = signed(&Keypair::generate().unwrap(), ItemType::Process, &[], "process");
    match bounded(SchedulerClient::new(&url, quick(3)).all(&process.id(), Range::default())).await.unwrap_err() {
        NetError::NotFound { unit: Unit::Scheduler, what: "process", id } => assert_eq!(id, process.id()),
        other => panic!("expected NotFound, got {other:?}"),
    }
    assert_eq!(seen.hits(), 1);
}

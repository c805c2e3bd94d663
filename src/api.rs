//! The worker's HTTP API: the compute unit's `GET /` shape, liveness (`/healthz`),
//! readiness (`/readyz`, only once the worker is registered), `/metrics`, `/capacity`,
//! `/status` (what it is doing: [`crate::status`]), and
//! the compute unit's read API (docs/ao-protocol.md §5) over the journal: `/result/{message}`,
//! `/results/{process}`, `/state/{process}` and `POST /dry-run`; and `/trace/{message}`, the op
//! trace whose root the message's attestation binds (for `ao-gpu-worker verify`).

mod admin;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};

use crate::admission::{Refused, Ticket};
use crate::httpd::{ApiError, no_route, wrong_method};
use crate::jobs::JobError;
use crate::jobs::eval::DryRunRequest;
use crate::journal::ResultRecord;
use crate::net::NetError;
use crate::protocol::b64;
use crate::state::WorkerState;

/// How long `GET /result` waits for a message of a served process to be evaluated.
pub const RESULT_WAIT: Duration = Duration::from_secs(10);
/// How often it looks at the journal meanwhile.
const RESULT_POLL: Duration = Duration::from_millis(50);
/// Largest `POST /dry-run` body.
pub const DRY_RUN_MAX_BODY: usize = 1024 * 1024;
/// Default and largest page of `GET /results`.
pub const RESULTS_DEFAULT_LIMIT: usize = 25;
pub const RESULTS_MAX_LIMIT: usize = 1000;

pub fn router(state: Arc<WorkerState>) -> Router {
    Router::new()
        .route("/", get(root))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/capacity", get(capacity))
        .route("/status", get(|State(s): State<Arc<WorkerState>>| async move { Json(crate::status::snapshot(&s).await) }))
        .route("/result/{message}", get(result))
        .route("/results/{process}", get(results))
        .route("/state/{process}", get(read_state))
        .route("/trace/{message}", get(trace))
        .route("/dry-run", post(dry_run).layer(DefaultBodyLimit::max(DRY_RUN_MAX_BODY)))
        .route("/processes", get(admin::processes))
        .route("/processes/{process}/resume", post(admin::resume))
        .route("/outbox/dead-letters", get(admin::dead_letters))
        .route("/outbox/dead-letters/{id}/{action}", post(admin::dead_letter_action))
        .fallback(no_route)
        .method_not_allowed_fallback(wrong_method)
        .with_state(state)
}

/// `GET /`: `{"address": …, "timestamp": <ms>}`, as an AO compute unit answers.
async fn root(State(s): State<Arc<WorkerState>>) -> impl IntoResponse {
    Json(json!({"address": s.address, "timestamp": crate::clock::now_ms()}))
}

/// `GET /healthz`: `ok`, or 503 with the stalls (a loop that stopped going round, a catch-up or a
/// device without progress for `overload.stall_after`: see `jobs::health`).
async fn healthz(State(s): State<Arc<WorkerState>>) -> Response {
    let stalls = s.jobs.stalls();
    if stalls.is_empty() {
        "ok".into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"ok": false, "stalls": stalls}))).into_response()
    }
}

async fn readyz(State(s): State<Arc<WorkerState>>) -> impl IntoResponse {
    let status = s.status();
    let last = status.last_advertisement.as_ref().map(|a| json!({"id": a.id, "at_ms": a.at_ms}));
    if status.ready {
        (StatusCode::OK, Json(json!({"ready": true, "advertisement": last})))
    } else {
        let reason = status.last_error.clone().unwrap_or_else(|| "not yet registered: no capacity advertisement accepted".into());
        (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"ready": false, "reason": reason})))
    }
}

/// OpenMetrics when the scraper asks for it (Prometheus does), else the Prometheus text format
/// (curl, `promtool check metrics`).
async fn metrics(State(s): State<Arc<WorkerState>>, headers: axum::http::HeaderMap) -> impl IntoResponse {
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()).unwrap_or("");
    if accept.contains("application/openmetrics-text") {
        ([(header::CONTENT_TYPE, crate::metrics::OPENMETRICS_CONTENT_TYPE)], s.metrics.render())
    } else {
        ([(header::CONTENT_TYPE, crate::metrics::TEXT_CONTENT_TYPE)], s.metrics.render_text())
    }
}

async fn capacity(State(s): State<Arc<WorkerState>>) -> impl IntoResponse {
    let status = s.status();
    let t = s.jobs.runtime.tensor_backend();
    let pool = s.jobs.runtime.pool();
    let loads = pool.loads();
    // Every device of the pool with its load, and why each other candidate is not serving.
    let devices: Vec<Value> = t
        .devices
        .iter()
        .map(|d| {
            let load = loads.get(d.index).copied().unwrap_or_default();
            json!({
                "index": d.index,
                "kind": d.kind.as_str(),
                "ordinal": d.ordinal,
                "description": d.description,
                "attested_as": s.jobs.attested_device(d.index),
                "memory_bytes": d.memory_bytes,
                "in_flight": load.in_flight,
                "evaluations": load.evaluations,
                "live_bytes": load.live_bytes,
            })
        })
        .collect();
    let tensor_backend = json!({
        "kind": t.kind.as_str(),
        "description": t.description,
        "determinism": t.determinism.as_str(),
        "devices": devices,
        "skipped": pool.skipped(),
    });
    Json(json!({"manifest": status.manifest, "tensor_backend": tensor_backend, "advertisement": status.last_advertisement}))
}

type Params = Result<Query<HashMap<String, String>>, QueryRejection>;

fn params(q: Params) -> Result<HashMap<String, String>, ApiError> {
    q.map(|Query(q)| q).map_err(|e| ApiError::bad_request(e.body_text()))
}

/// A path segment that must be a 43-character id.
fn path_id(p: Result<Path<String>, PathRejection>, what: &str) -> Result<String, ApiError> {
    let Path(id) = p.map_err(|e| ApiError::bad_request(e.body_text()))?;
    if !b64::is_id(&id) {
        return Err(ApiError::bad_request(format!("{what} {:?} is not a 43-character base64url id", truncate(&id))));
    }
    Ok(id)
}

/// The `process-id` query parameter, required, a 43-character id.
fn process_param(q: &HashMap<String, String>) -> Result<String, ApiError> {
    match q.get("process-id").map(String::as_str) {
        None | Some("") => Err(ApiError::bad_request("the process-id query parameter is required")),
        Some(p) if b64::is_id(p) => Ok(p.to_owned()),
        Some(p) => Err(ApiError::bad_request(format!("process-id {:?} is not a 43-character base64url id", truncate(p)))),
    }
}

fn truncate(s: &str) -> String {
    s.chars().take(64).collect()
}

/// Refuses `to`: the worker serves results and state as of the latest evaluation only.
fn no_to(q: &HashMap<String, String>) -> Result<(), ApiError> {
    match q.get("to") {
        Some(_) => Err(ApiError::bad_request("`to` is not supported: this worker serves the latest state only")),
        None => Ok(()),
    }
}

fn internal(e: impl std::fmt::Display) -> ApiError {
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
}

fn job_error(e: JobError) -> ApiError {
    match e {
        JobError::NotServed(_) => ApiError::not_found(e.to_string()),
        JobError::Net(NetError::NotFound { .. }) => ApiError::not_found(e.to_string()),
        JobError::Net(_) => ApiError::bad_gateway(e.to_string()),
        JobError::Halted { .. } => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        JobError::Journal(_) | JobError::Panicked(_) => internal(e),
        JobError::Cancelled => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

/// Admits a dry-run or state read of `process` (see `admission`): its memory is reserved for
/// twice the process's last state size plus its device quota when it uses `ao_gpu` (the whole
/// budget while unknown). A refusal is the 503 answer with `Retry-After`.
async fn admit(s: &WorkerState, process: &str) -> Result<Ticket, Response> {
    let bytes = s.jobs.api_memory_estimate(process).unwrap_or(u64::MAX);
    s.admission.admit(bytes).await.map_err(|e| overloaded(s, &e))
}

fn overloaded(s: &WorkerState, e: &Refused) -> Response {
    let retry = s.admission.retry_after_secs();
    let body = crate::protocol::su::ErrorBody { error: e.to_string() };
    (StatusCode::SERVICE_UNAVAILABLE, [(header::RETRY_AFTER, retry.to_string())], Json(body)).into_response()
}

/// The journal's result for `message` if it belongs to `process`, read off the async threads.
async fn lookup_blocking(s: &Arc<WorkerState>, message: &str, process: &str) -> Result<Option<ResultRecord>, ApiError> {
    let (s, m, p) = (s.clone(), message.to_owned(), process.to_owned());
    tokio::task::spawn_blocking(move || lookup(&s, &m, &p)).await?
}

/// A journal result as the compute unit serves it: the internal `Log` field removed.
pub fn result_view(response: &Value) -> Value {
    let mut v = response.clone();
    if let Some(o) = v.as_object_mut() {
        o.remove("Log");
    }
    v
}

/// The journal's result for `message`, if it belongs to `process`.
fn lookup(s: &WorkerState, message: &str, process: &str) -> Result<Option<ResultRecord>, ApiError> {
    match s.jobs.journal.result_by_message(message).map_err(internal)? {
        Some(r) if r.process == process => Ok(Some(r)),
        Some(r) => Err(ApiError::not_found(format!("message {message} was evaluated for process {}, not {process}", r.process))),
        None => Ok(None),
    }
}

/// `GET /trace/{message}?process-id=P`: `{process, message, nonce, root, trace: {leaves}}` of an
/// evaluated message (docs/attestation.md); 404 when this worker has no trace of it.
async fn trace(State(s): State<Arc<WorkerState>>, message: Result<Path<String>, PathRejection>, q: Params) -> Result<Response, ApiError> {
    let q = params(q)?;
    let process = process_param(&q)?;
    let message = path_id(message, "message")?;
    let Some(r) = lookup(&s, &message, &process)? else {
        return Err(ApiError::not_found(format!("no result for message {message} of process {process} here")));
    };
    let Some(trace) = r.trace else {
        return Err(ApiError::not_found(format!("message {message} was evaluated before traces were kept")));
    };
    Ok(Json(json!({"process": r.process, "message": r.message, "nonce": r.nonce, "root": trace.root(), "trace": trace})).into_response())
}

/// `GET /result/{message}?process-id=P[&no-busy=1]`: the result object. A message of a served
/// process that is not evaluated yet is waited for up to [`RESULT_WAIT`]; then the answer is
/// the CU's 202 "in progress", or 404 with `no-busy`.
async fn result(State(s): State<Arc<WorkerState>>, message: Result<Path<String>, PathRejection>, q: Params) -> Result<Response, ApiError> {
    let q = params(q)?;
    let process = process_param(&q)?;
    let message = path_id(message, "message")?;
    let no_busy = q.get("no-busy").is_some_and(|v| v != "0" && !v.eq_ignore_ascii_case("false"));
    if let Some(r) = lookup_blocking(&s, &message, &process).await? {
        return Ok(Json(result_view(&r.response)).into_response());
    }
    let jobs = &s.jobs;
    if !jobs.is_served_blocking(&process).await.map_err(job_error)? {
        return Err(ApiError::not_found(format!("no result for message {message}: process {process} is not served by this worker")));
    }
    let halted = |jobs: &crate::jobs::Context| match jobs.halted().get(&process) {
        Some(reason) => Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, format!("process {process} halted: {reason}"))),
        None => Ok(()),
    };
    halted(jobs)?;
    match jobs.scheduler.message(&message, &process).await {
        Ok(_) => {}
        Err(NetError::NotFound { .. }) => {
            return Err(ApiError::not_found(format!("message {message} is not scheduled for process {process}")));
        }
        // The scheduler is unreachable now; the work loop may still have the message.
        Err(e) => tracing::debug!(%message, %process, error = %e, "cannot ask the scheduler about a message"),
    }
    jobs.wake();
    let deadline = Instant::now() + RESULT_WAIT;
    while Instant::now() < deadline {
        tokio::time::sleep(RESULT_POLL).await;
        if let Some(r) = lookup_blocking(&s, &message, &process).await? {
            return Ok(Json(result_view(&r.response)).into_response());
        }
        halted(jobs)?;
    }
    if no_busy {
        return Err(ApiError::not_found(format!("message {message} of process {process} is not evaluated yet")));
    }
    let body = json!({"message": format!("Evaluation of process \"{process}\" to \"{message}\" is in progress.")});
    Ok((StatusCode::ACCEPTED, Json(body)).into_response())
}

fn cursor_param(q: &HashMap<String, String>, name: &str) -> Result<Option<u64>, ApiError> {
    match q.get(name).map(String::as_str) {
        None | Some("") => Ok(None),
        Some(c) => {
            c.parse().map(Some).map_err(|_| ApiError::bad_request(format!("{name} {:?} is not a cursor of this worker", truncate(c))))
        }
    }
}

/// `GET /results/{process}?from=&to=&sort=ASC|DESC&limit=25`: results with a cursor (the
/// nonce) after `from` (exclusive) up to `to` (inclusive), in either order, as the CU pages.
async fn results(State(s): State<Arc<WorkerState>>, process: Result<Path<String>, PathRejection>, q: Params) -> Result<Response, ApiError> {
    let q = params(q)?;
    let process = path_id(process, "process")?;
    let (from, to) = (cursor_param(&q, "from")?, cursor_param(&q, "to")?);
    let descending = match q.get("sort").map(String::as_str) {
        None | Some("") | Some("ASC") => false,
        Some("DESC") => true,
        Some(other) => return Err(ApiError::bad_request(format!("sort {:?} is not ASC or DESC", truncate(other)))),
    };
    let limit = match q.get("limit").map(String::as_str) {
        None | Some("") => RESULTS_DEFAULT_LIMIT,
        Some(l) => match l.parse::<usize>() {
            Ok(n) if (1..=RESULTS_MAX_LIMIT).contains(&n) => n,
            _ => return Err(ApiError::bad_request(format!("limit {:?} is not a number from 1 to {RESULTS_MAX_LIMIT}", truncate(l)))),
        },
    };
    let jobs = s.jobs.clone();
    let p = process.clone();
    let (known, rows) = tokio::task::spawn_blocking(move || -> Result<_, ApiError> {
        let known = jobs.journal.progress(&p).map_err(internal)?.is_some() || jobs.is_served(&p).map_err(job_error)?;
        let rows = if known { jobs.journal.results(&p, from, to, limit + 1, descending).map_err(internal)? } else { Vec::new() };
        Ok((known, rows))
    })
    .await??;
    if !known {
        return Err(ApiError::not_found(format!("process {process} is not served by this worker and has no results")));
    }
    let has_next = rows.len() > limit;
    let edges: Vec<Value> =
        rows.iter().take(limit).map(|r| json!({"node": result_view(&r.response), "cursor": r.nonce.to_string()})).collect();
    let mut page = json!({"pageInfo": {"hasNextPage": has_next}, "edges": edges});
    // A halted process's results stop where it halted: say why (beside the CU's shape).
    if let Some(reason) = s.jobs.halted().get(&process) {
        page["halted"] = json!(reason);
    }
    Ok(Json(page).into_response())
}

/// `GET /state/{process}`: the linear memory after the latest evaluation, with the CU's
/// `Last-Timestamp`, `Last-Ordinate` (the nonce) and `Last-Block-Height` headers.
async fn read_state(
    State(s): State<Arc<WorkerState>>,
    process: Result<Path<String>, PathRejection>,
    q: Params,
) -> Result<Response, ApiError> {
    let q = params(q)?;
    let process = path_id(process, "process")?;
    no_to(&q)?;
    let ticket = match admit(&s, &process).await {
        Ok(t) => t,
        Err(refused) => return Ok(refused),
    };
    let latest = s.jobs.latest_image(&process).await.map_err(job_error)?;
    drop(ticket);
    let Some((progress, image, block_height)) = latest else {
        return Err(ApiError::not_found(format!("no state for process {process}: nothing evaluated here")));
    };
    let Some(image) = image else {
        return Err(ApiError::not_found(format!("no state for process {process}: no message has been evaluated successfully")));
    };
    let headers = [
        (header::CONTENT_TYPE, "application/octet-stream".to_owned()),
        (header::HeaderName::from_static("last-timestamp"), progress.timestamp.to_string()),
        (header::HeaderName::from_static("last-ordinate"), progress.nonce.to_string()),
        (header::HeaderName::from_static("last-block-height"), block_height.to_string()),
    ];
    Ok((headers, image).into_response())
}

/// `POST /dry-run?process-id=P` with a JSON message: evaluated read-only against the latest
/// state, nothing kept; answers the result object.
async fn dry_run(State(s): State<Arc<WorkerState>>, q: Params, body: Result<Bytes, BytesRejection>) -> Result<Response, ApiError> {
    let q = params(q)?;
    let process = process_param(&q)?;
    no_to(&q)?;
    let body = body.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, format!("dry-run body larger than the {DRY_RUN_MAX_BODY}-byte limit"))
        } else {
            ApiError::new(r.status(), r.body_text())
        }
    })?;
    let value: Value = serde_json::from_slice(&body).map_err(|e| ApiError::bad_request(format!("dry-run body is not JSON: {e}")))?;
    if !value.is_object() {
        return Err(ApiError::bad_request("dry-run body must be a JSON object (a message)"));
    }
    let request: DryRunRequest =
        serde_json::from_value(value).map_err(|e| ApiError::bad_request(format!("dry-run body is not a valid message: {e}")))?;
    let ticket = match admit(&s, &process).await {
        Ok(t) => t,
        Err(refused) => return Ok(refused),
    };
    let result = s.jobs.dry_run(&process, &request, ticket.cancelled()).await.map_err(job_error)?;
    drop(ticket);
    Ok(Json(result).into_response())
}

//! The operator's routes, beside the compute-unit API: served processes with their state and
//! resuming a halted one, and the outbox's dead letters with retry and drop. `ao-gpu-worker
//! processes` and `ao-gpu-worker outbox` call them. Routes that change something answer only
//! clients on a loopback address (403 otherwise): the API may listen on a public address for the
//! compute-unit routes.
//!
//! * `GET /processes` → `{"processes": [{"process", "state", "reason"?, "failures"?, "retry_in_ms"?}]}`
//! * `POST /processes/{id}/resume` → `{"process", "resumed": bool}`
//! * `GET /outbox/dead-letters` → `{"dead_letters": [DeadLetter]}` (dropped ones included)
//! * `POST /outbox/dead-letters/{id}/retry|drop` → `{"id", "outcome"}` (404 when unknown, 409
//!   when already dropped)

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::PathRejection;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::{internal, job_error, path_id};
use crate::httpd::ApiError;
use crate::journal::DeadLetterOutcome;
use crate::state::WorkerState;

fn loopback_only(addr: SocketAddr) -> Result<(), ApiError> {
    if addr.ip().is_loopback() {
        Ok(())
    } else {
        Err(ApiError::new(StatusCode::FORBIDDEN, format!("operator routes answer loopback clients only, not {}", addr.ip())))
    }
}

pub(super) async fn processes(State(s): State<Arc<WorkerState>>) -> Result<Response, ApiError> {
    let jobs = s.jobs.clone();
    let list = tokio::task::spawn_blocking(move || jobs.processes()).await?.map_err(job_error)?;
    Ok(Json(json!({"processes": list})).into_response())
}

pub(super) async fn resume(
    State(s): State<Arc<WorkerState>>,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    process: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    loopback_only(addr)?;
    let Path(process) = process.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let (jobs, p) = (s.jobs.clone(), process.clone());
    let resumed = tokio::task::spawn_blocking(move || jobs.resume(&p)).await?.map_err(job_error)?;
    Ok(Json(json!({"process": process, "resumed": resumed})).into_response())
}

pub(super) async fn dead_letters(State(s): State<Arc<WorkerState>>) -> Result<Response, ApiError> {
    let journal = s.jobs.journal.clone();
    let list = tokio::task::spawn_blocking(move || journal.dead_letters()).await?.map_err(internal)?;
    Ok(Json(json!({"dead_letters": list})).into_response())
}

pub(super) async fn dead_letter_action(
    State(s): State<Arc<WorkerState>>,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    path: Result<Path<(String, String)>, PathRejection>,
) -> Result<Response, ApiError> {
    loopback_only(addr)?;
    let Path((id, action)) = path.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let id = path_id(Ok(Path(id)), "item")?;
    let journal = s.jobs.journal.clone();
    let i = id.clone();
    let outcome = match action.as_str() {
        "retry" => tokio::task::spawn_blocking(move || journal.retry_dead_letter(&i)).await?,
        "drop" => tokio::task::spawn_blocking(move || journal.drop_dead_letter(&i)).await?,
        other => return Err(ApiError::not_found(format!("no dead-letter action {other:?} (retry or drop)"))),
    }
    .map_err(internal)?;
    match outcome {
        DeadLetterOutcome::Done => {
            if action == "retry" {
                s.jobs.wake();
            }
            Ok(Json(json!({"id": id, "outcome": action})).into_response())
        }
        DeadLetterOutcome::NotFound => Err(ApiError::not_found(format!("no dead letter {id}"))),
        DeadLetterOutcome::AlreadyDropped => Err(ApiError::new(StatusCode::CONFLICT, format!("dead letter {id} was dropped already"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_are_for_loopback_clients_only() {
        assert!(loopback_only("127.0.0.1:9".parse().unwrap()).is_ok());
        assert!(loopback_only("[::1]:9".parse().unwrap()).is_ok());
        assert_eq!(loopback_only("10.1.2.3:9".parse().unwrap()).unwrap_err().status, StatusCode::FORBIDDEN);
    }
}

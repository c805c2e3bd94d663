//! The worker's HTTP API: the compute unit's `GET /` shape, liveness (`/healthz`),
//! readiness (`/readyz`, only once the worker is registered), `/metrics`, and `/capacity`.

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use serde_json::json;

use crate::daemon::WorkerState;
use crate::httpd::{no_route, wrong_method};

pub fn router(state: Arc<WorkerState>) -> Router {
    Router::new()
        .route("/", get(root))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/capacity", get(capacity))
        .fallback(no_route)
        .method_not_allowed_fallback(wrong_method)
        .with_state(state)
}

/// `GET /`: `{"address": …, "timestamp": <ms>}`, as an AO compute unit answers.
async fn root(State(s): State<Arc<WorkerState>>) -> impl IntoResponse {
    Json(json!({"address": s.address, "timestamp": crate::daemon::now_ms()}))
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

async fn metrics(State(s): State<Arc<WorkerState>>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], s.metrics.render())
}

async fn capacity(State(s): State<Arc<WorkerState>>) -> impl IntoResponse {
    let status = s.status();
    Json(json!({"manifest": status.manifest, "advertisement": status.last_advertisement}))
}

//! The devnet gateway and uploader: `POST /tx` takes a signed data item as Arweave bundlers
//! do; `GET /raw/{id}` serves its data with its `Content-Type`; `GET /info` reports the
//! devnet's block height as an Arweave node does.

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;

use super::Clock;
use super::store::Store;
use crate::httpd::{ApiError, body, no_route, wrong_method};
use crate::net::gateway::{ItemMeta, Uploaded};
use crate::protocol::{DataItem, b64};

/// Largest item the devnet gateway takes (modules and model weights go through it).
pub const MAX_UPLOAD: usize = 256 * 1024 * 1024;

#[derive(Clone)]
pub struct GatewayUnit {
    store: Store,
    clock: Clock,
}

impl GatewayUnit {
    pub fn new(store: Store, clock: Clock) -> Self {
        Self { store, clock }
    }

    pub fn router(&self) -> Router {
        Router::new()
            .route("/info", get(info))
            .route("/tx", post(upload))
            .route("/tx/arweave", post(upload))
            .route("/raw/{id}", get(raw))
            .route("/tx/{id}", get(meta))
            .route("/health", get(|| async { StatusCode::OK }))
            .fallback(no_route)
            .method_not_allowed_fallback(wrong_method)
            .layer(DefaultBodyLimit::max(MAX_UPLOAD))
            .with_state(self.clone())
    }
}

async fn info(State(gw): State<GatewayUnit>) -> Json<serde_json::Value> {
    let height = gw.clock.block_height(crate::clock::now_ms());
    Json(
        json!({"network": "ao-gpu-worker.devnet", "version": 5, "release": 1, "height": height, "blocks": height, "peers": 0, "queue_length": 0}),
    )
}

async fn upload(State(gw): State<GatewayUnit>, raw: Result<Bytes, BytesRejection>) -> Result<Json<Uploaded>, ApiError> {
    let raw = body(raw)?;
    let item = DataItem::parse_verified(&raw).map_err(|e| ApiError::bad_request(format!("invalid data item: {e}")))?;
    let id = item.id();
    let store = gw.store.clone();
    let id2 = id.clone();
    let timestamp = tokio::task::spawn_blocking(move || store.gateway_put(&id2, &raw, crate::clock::now_ms())).await??;
    Ok(Json(Uploaded { id, timestamp }))
}

/// A stored item by id: 400 for a malformed id, 404 when unknown.
async fn stored_item(gw: &GatewayUnit, id: &str) -> Result<DataItem, ApiError> {
    b64::decode_id(id).map_err(|e| ApiError::bad_request(format!("invalid id: {e}")))?;
    let (store, key) = (gw.store.clone(), id.to_owned());
    let bytes = tokio::task::spawn_blocking(move || store.gateway_get(&key)).await??;
    let bytes = bytes.ok_or_else(|| ApiError::not_found(format!("item {id} not found")))?;
    DataItem::parse(&bytes).map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("stored item {id} is corrupt: {e}")))
}

/// `GET /tx/{id}`: the item's signed fields without its data, as bundler nodes describe
/// the items they hold. With `GET /raw/{id}` it rebuilds the signed item for verification.
async fn meta(State(gw): State<GatewayUnit>, Path(id): Path<String>) -> Result<Json<ItemMeta>, ApiError> {
    let item = stored_item(&gw, &id).await?;
    Ok(Json(ItemMeta::from_item(&item)))
}

async fn raw(State(gw): State<GatewayUnit>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let item = stored_item(&gw, &id).await?;
    // A tag value that is not a valid header value is served as plain bytes.
    let content_type = item
        .tag("Content-Type")
        .and_then(|v| header::HeaderValue::from_str(v).ok())
        .unwrap_or(header::HeaderValue::from_static("application/octet-stream"));
    Ok(([(header::CONTENT_TYPE, content_type)], item.data).into_response())
}

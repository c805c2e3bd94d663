//! What every HTTP server in the crate shares (the devnet's units and the worker API): JSON
//! errors (`{"error": …}`, as the AO units answer), body limits, 404/405 fallbacks, and
//! serving a router until shutdown.

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::protocol::su::ErrorBody;

/// The AO units' body limit: 10 MiB.
pub const MAX_BODY: usize = 10 * 1024 * 1024;

/// An error answer: status plus `{"error": message}`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self { status, message: message.into() }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }

    pub fn bad_gateway(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_GATEWAY, message)
    }
}

impl From<tokio::task::JoinError> for ApiError {
    fn from(e: tokio::task::JoinError) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, format!("internal task failed: {e}"))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(ErrorBody { error: self.message })).into_response()
    }
}

/// The request body, or a JSON error saying why it could not be read (413 when too large).
pub fn body(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|r| {
        let status = r.status();
        let message =
            if status == StatusCode::PAYLOAD_TOO_LARGE { format!("body larger than the {MAX_BODY}-byte limit") } else { r.body_text() };
        ApiError::new(status, message)
    })
}

pub async fn no_route(method: Method, uri: Uri) -> ApiError {
    ApiError::not_found(format!("no route for {method} {}", uri.path()))
}

pub async fn wrong_method(method: Method, uri: Uri) -> ApiError {
    ApiError::new(StatusCode::METHOD_NOT_ALLOWED, format!("method {method} not allowed on {}", uri.path()))
}

/// Serves `router` on `listener` until `shutdown` fires, then drains in-flight requests.
pub fn serve(listener: TcpListener, router: axum::Router, shutdown: CancellationToken) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        // The peer's address is handed to handlers that need it (the worker's operator routes).
        let service = router.into_make_service_with_connect_info::<std::net::SocketAddr>();
        let result = axum::serve(listener, service).with_graceful_shutdown(async move { shutdown.cancelled().await }).await;
        if let Err(e) = result {
            tracing::error!(error = %e, "http server failed");
        }
    })
}

//! The devnet messenger unit: `POST /` verifies a signed Message or Process and forwards it
//! to the scheduler (docs/ao-protocol.md §4), answering 202 like the deployed MU.
//!
//! Unlike the deployed MU, which answers 202 before forwarding, the devnet forwards first
//! and answers 202 only once the scheduler has the item: the answer is the same on success,
//! nothing accepted can be lost in between, and a refusal comes back to the sender.

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::routing::get;

use crate::httpd::{ApiError, MAX_BODY, body, no_route, wrong_method};
use crate::net::{NetError, SchedulerClient};
use crate::protocol::DataItem;
use crate::protocol::ao;
use crate::protocol::su::MuAccepted;

#[derive(Clone)]
pub struct MessengerUnit {
    scheduler: SchedulerClient,
}

impl MessengerUnit {
    pub fn new(scheduler: SchedulerClient) -> Self {
        Self { scheduler }
    }

    pub fn router(&self) -> Router {
        Router::new()
            .route("/", get(|| async { "ao messenger unit" }).post(post))
            .route("/health", get(|| async { StatusCode::OK }))
            .fallback(no_route)
            .method_not_allowed_fallback(wrong_method)
            .layer(DefaultBodyLimit::max(MAX_BODY))
            .with_state(self.clone())
    }
}

async fn post(State(mu): State<MessengerUnit>, raw: Result<Bytes, BytesRejection>) -> Result<(StatusCode, Json<MuAccepted>), ApiError> {
    let raw = body(raw)?;
    let item = DataItem::parse_verified(&raw).map_err(|e| ApiError::bad_request(format!("invalid data item: {e}")))?;
    if !ao::is_ao(&item) {
        return Err(ApiError::bad_request("data item lacks the Data-Protocol=ao tag"));
    }
    match ao::item_type(&item) {
        Some("Message" | "Process") => {}
        Some(other) => return Err(ApiError::bad_request(format!("Type {other:?} is not accepted (Message or Process)"))),
        None => return Err(ApiError::bad_request("data item has no Type tag (Message or Process)")),
    }
    let id = item.id();
    match mu.scheduler.post_raw(raw.to_vec()).await {
        Ok(posted) if posted.id == id => Ok((StatusCode::ACCEPTED, Json(MuAccepted { message: "Processing DataItem".into(), id }))),
        Ok(posted) => Err(ApiError::bad_gateway(format!("scheduler scheduled id {} for item {id}", posted.id))),
        Err(NetError::Rejected { status, message, .. }) => {
            Err(ApiError::new(StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY), format!("scheduler refused: {message}")))
        }
        Err(e) => Err(ApiError::bad_gateway(e.to_string())),
    }
}

//! The devnet scheduler unit: `POST /` assigns nonces, timestamps, block heights and the
//! hash chain (docs/ao-protocol.md §2.4) and signs each Assignment with its own key; the
//! read routes answer in the deployed SU's snake_case shapes (§3).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::StatusCode;
use axum::routing::get;

use super::Clock;
use super::store::{Entry, ProcessState, Scheduled, Store};
use crate::attest::Keypair;
use crate::httpd::{ApiError, MAX_BODY, body, no_route, wrong_method};
use crate::net::GatewayClient;
use crate::protocol::ao::{self, ItemType};
use crate::protocol::su::{Edge, ItemJson, MessageNode, Page, PageInfo, ProcessInfo, SuInfo, SuPosted, SuTimestamp, next_hash_chain};
use crate::protocol::{DataItem, DataItemBuilder, SignatureType, Tag, b64};

/// Default and largest page size.
pub const DEFAULT_LIMIT: usize = 100;
pub const MAX_LIMIT: usize = 1000;

#[derive(Clone)]
pub struct SchedulerUnit {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    key: Keypair,
    address: String,
    gateway: GatewayClient,
    clock: Clock,
    /// Refuse items not signed with an Arweave RSA key, as the deployed SU does.
    legacy_strict: bool,
    /// One writer at a time: nonces and the hash chain are assigned in commit order.
    write: Mutex<()>,
}

impl SchedulerUnit {
    /// A scheduler signing with `key`. With `legacy_strict` it accepts only Arweave RSA
    /// (type 1) items, like the deployed legacy SU (docs/ao-protocol.md §1.9), and answers
    /// others with HTTP 400.
    pub fn new(store: Store, key: Keypair, gateway: GatewayClient, clock: Clock, legacy_strict: bool) -> Self {
        let address = key.address();
        Self { inner: Arc::new(Inner { store, key, address, gateway, clock, legacy_strict, write: Mutex::new(()) }) }
    }

    pub fn address(&self) -> &str {
        &self.inner.address
    }

    pub fn router(&self) -> Router {
        Router::new()
            .route("/", get(info).post(post))
            .route("/timestamp", get(timestamp))
            .route("/health", get(|| async { StatusCode::OK }))
            .route("/processes/{process}", get(process))
            .route("/{id}", get(read))
            .route("/{id}/latest", get(latest))
            .fallback(no_route)
            .method_not_allowed_fallback(wrong_method)
            .layer(DefaultBodyLimit::max(MAX_BODY))
            .with_state(self.clone())
    }

    /// Validates and schedules a signed item; idempotent for an item already scheduled.
    pub async fn schedule(&self, raw: &[u8]) -> Result<SuPosted, ApiError> {
        let item = DataItem::parse_verified(raw).map_err(|e| ApiError::bad_request(format!("invalid data item: {e}")))?;
        if self.inner.legacy_strict && item.signature_type != SignatureType::Arweave {
            return Err(ApiError::bad_request(format!(
                "invalid data item: signature type {} ({}) is not accepted; this scheduler (legacy-strict, like the deployed SU) takes Arweave RSA-4096 items (type 1) only: sign with an Arweave wallet (keygen --type arweave)",
                item.signature_type.code(),
                item.signature_type.name()
            )));
        }
        if !ao::is_ao(&item) {
            return Err(ApiError::bad_request("data item lacks the Data-Protocol=ao tag"));
        }
        let id = item.id();
        let kind = match ao::item_type(&item) {
            Some("Message") => ItemType::Message,
            Some("Process") => ItemType::Process,
            Some(other) => return Err(ApiError::bad_request(format!("Type {other:?} cannot be scheduled (Message or Process)"))),
            None => return Err(ApiError::bad_request("data item has no Type tag (Message or Process)")),
        };
        let store = &self.inner.store;
        if kind == ItemType::Process {
            let module = item.tag("Module").ok_or_else(|| ApiError::bad_request("Process has no Module tag"))?;
            let scheduler = item.tag("Scheduler").ok_or_else(|| ApiError::bad_request("Process has no Scheduler tag"))?;
            if scheduler != self.address() {
                return Err(ApiError::bad_request(format!("Scheduler tag {scheduler} is not this scheduler ({})", self.address())));
            }
            if !b64::is_id(module) {
                return Err(ApiError::bad_request(format!("Module tag {module:?} is not a 43-character id")));
            }
            match self.inner.gateway.exists(module).await {
                Ok(true) => {}
                Ok(false) => return Err(ApiError::bad_request(format!("module {module} not found on the gateway"))),
                Err(e) => return Err(ApiError::bad_gateway(format!("cannot check module {module}: {e}"))),
            }
        } else {
            let target = item.target_id().ok_or_else(|| ApiError::bad_request("Message has no target process"))?;
            if store.process_state(&target)?.is_none() {
                return Err(ApiError::bad_request(format!("target {target} is not a process this scheduler schedules")));
            }
        }
        let this = self.clone();
        let raw = raw.to_vec();
        let (posted, uploads) = tokio::task::spawn_blocking(move || this.assign(kind, &item, &raw)).await??;
        // Publish what was scheduled, as the SU uploads to its upload node; the schedule
        // itself is already durable, so a gateway hiccup only delays availability there.
        for item in uploads {
            if let Err(e) = self.inner.gateway.upload(&item).await {
                tracing::warn!(id = %item.id(), error = %e, "scheduler could not upload to the gateway");
            }
        }
        tracing::debug!(%id, nonce_for = ?kind, "scheduled");
        Ok(posted)
    }

    /// The synchronous, serialized part: nonce, timestamp, hash chain, signature, commit.
    fn assign(&self, kind: ItemType, item: &DataItem, raw: &[u8]) -> Result<(SuPosted, Vec<DataItem>), ApiError> {
        let inner = &self.inner;
        let _guard = crate::sync::lock(&inner.write);
        let id = item.id();
        let process = match kind {
            ItemType::Process => id.clone(),
            _ => item.target_id().expect("checked by schedule"),
        };
        // Already scheduled: answer as the first time, change nothing.
        if kind == ItemType::Process {
            if let Some(state) = inner.store.process_state(&id)? {
                return Ok((SuPosted { timestamp: state.timestamp, id }, vec![]));
            }
        } else if let Some((p, nonce)) = inner.store.message_location(&id)? {
            let entry = inner.store.entry(&p, nonce)?.ok_or_else(|| ApiError::not_found("message index without entry"))?;
            return Ok((SuPosted { timestamp: entry.timestamp, id }, vec![]));
        }
        let previous = inner.store.process_state(&process)?;
        let now = crate::clock::now_ms();
        let timestamp = previous.as_ref().map_or(now, |s| now.max(s.last_timestamp + 1));
        let height = inner.clock.block_height(timestamp);
        let process_raw = b64::decode_id(&process).map_err(|e| ApiError::bad_request(e.to_string()))?;
        let (nonce, chain) = match &previous {
            None => (0, next_hash_chain(&process_raw, None)),
            Some(s) => {
                let prev_assignment = b64::decode_id(&s.last_assignment).map_err(|e| ApiError::bad_request(e.to_string()))?;
                let prev_chain = b64::decode_id(&s.last_hash_chain).map_err(|e| ApiError::bad_request(e.to_string()))?;
                (s.next_nonce, next_hash_chain(&process_raw, Some((&prev_assignment, &prev_chain))))
            }
        };
        let mut anchor = [0u8; 32];
        getrandom::fill(&mut anchor).map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("no randomness: {e}")))?;
        let mut tags = vec![
            Tag::new("Process", &process),
            Tag::new("Epoch", "0"),
            Tag::new("Nonce", nonce.to_string()),
            Tag::new("Hash-Chain", b64::encode(&chain)),
            Tag::new("Block-Height", format!("{height:012}")),
            Tag::new("Timestamp", timestamp.to_string()),
        ];
        tags.extend(ao::base_tags(ItemType::Assignment));
        // Reorder to the SU's order: Data-Protocol, Type, Variant after the scheduling tags.
        let variant = tags.remove(tags.len() - 2);
        tags.push(variant);
        if kind == ItemType::Message {
            tags.push(Tag::new("Message", &id));
        }
        let assignment = DataItemBuilder::new()
            .anchor(anchor)
            .tags(tags)
            .sign(&inner.key)
            .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("cannot sign assignment: {e}")))?;
        let assignment_id = assignment.id();
        let state = ProcessState {
            next_nonce: nonce + 1,
            last_assignment: assignment_id.clone(),
            last_hash_chain: b64::encode(&chain),
            last_timestamp: timestamp,
            block_height: previous.as_ref().map_or(height, |s| s.block_height),
            timestamp: previous.as_ref().map_or(timestamp, |s| s.timestamp),
        };
        let entry = Entry { message_id: Some(id.clone()), assignment: assignment_id, timestamp };
        let assignment_bytes = assignment.to_bytes();
        inner.store.commit_scheduled(&Scheduled {
            process: &process,
            nonce,
            entry: &entry,
            message: (kind == ItemType::Message).then_some((id.as_str(), raw)),
            assignment_bytes: &assignment_bytes,
            state: &state,
            process_item: (kind == ItemType::Process).then_some(raw),
        })?;
        Ok((SuPosted { timestamp, id }, vec![item.clone(), assignment]))
    }

    /// One schedule entry; with `show_anchor`, binary anchors are written base64url (`&show-anchor=1`).
    fn node(&self, entry: &Entry, show_anchor: bool) -> Result<MessageNode, ApiError> {
        let load = |id: &str| -> Result<DataItem, ApiError> {
            let bytes = self.inner.store.su_item(id)?.ok_or_else(|| ApiError::not_found(format!("item {id} missing from storage")))?;
            DataItem::parse(&bytes)
                .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("stored item {id} is corrupt: {e}")))
        };
        let message = match &entry.message_id {
            Some(id) => Some(ItemJson::from_item_showing_anchor(&load(id)?, show_anchor)),
            None => None,
        };
        Ok(MessageNode { message, assignment: ItemJson::from_item_showing_anchor(&load(&entry.assignment)?, show_anchor) })
    }
}

async fn info(State(su): State<SchedulerUnit>) -> Json<SuInfo> {
    Json(SuInfo { timestamp: crate::clock::now_ms().to_string(), address: su.address().to_owned() })
}

async fn timestamp(State(su): State<SchedulerUnit>) -> Json<SuTimestamp> {
    let now = crate::clock::now_ms();
    Json(SuTimestamp { timestamp: now.to_string(), block_height: format!("{:012}", su.inner.clock.block_height(now)) })
}

async fn post(
    State(su): State<SchedulerUnit>,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Json<SuPosted>, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    if query.contains_key("assign") || query.contains_key("process-id") {
        return Err(ApiError::bad_request(
            "assigning an existing transaction (?process-id=&assign=) is not supported by the devnet scheduler",
        ));
    }
    let raw = body(raw)?;
    Ok(Json(su.schedule(&raw).await?))
}

/// `&show-anchor=1`: anchors that are not UTF-8 are served base64url.
fn show_anchor(query: &HashMap<String, String>) -> bool {
    query.get("show-anchor").is_some_and(|v| v == "1" || v == "true")
}

fn check_id(id: &str) -> Result<(), ApiError> {
    b64::decode_id(id).map(|_| ()).map_err(|e| ApiError::bad_request(format!("invalid id: {e}")))
}

fn parse_u64(query: &HashMap<String, String>, key: &str) -> Result<Option<u64>, ApiError> {
    match query.get(key) {
        None => Ok(None),
        Some(v) if v.is_empty() => Ok(None),
        Some(v) => v.parse().map(Some).map_err(|_| ApiError::bad_request(format!("{key} must be a non-negative integer, got {v:?}"))),
    }
}

async fn read(
    State(su): State<SchedulerUnit>,
    Path(id): Path<String>,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Result<axum::response::Response, ApiError> {
    use axum::response::IntoResponse;
    let Query(query) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    check_id(&id)?;
    let process_param = query.get("process-id").filter(|p| !p.is_empty());
    if let Some(p) = process_param {
        check_id(p)?;
    }
    let store = &su.inner.store;
    if store.process_state(&id)?.is_some() {
        if process_param.is_some_and(|p| p != &id) {
            return Err(ApiError::bad_request(format!("process-id {} does not match process {id}", process_param.unwrap())));
        }
        return Ok(Json(page(&su, &id, &query)?).into_response());
    }
    let Some((process, nonce)) = store.message_location(&id)? else {
        return Err(ApiError::not_found(format!("Message or Process not found: {id}")));
    };
    if process_param.is_some_and(|p| p != &process) {
        return Err(ApiError::not_found(format!("message {id} is not scheduled on process {}", process_param.unwrap())));
    }
    let entry = store.entry(&process, nonce)?.ok_or_else(|| ApiError::not_found(format!("Message not found: {id}")))?;
    Ok(Json(su.node(&entry, show_anchor(&query))?).into_response())
}

fn page(su: &SchedulerUnit, process: &str, query: &HashMap<String, String>) -> Result<Page, ApiError> {
    let limit = match parse_u64(query, "limit")? {
        None => DEFAULT_LIMIT,
        Some(l) if (1..=MAX_LIMIT as u64).contains(&l) => l as usize,
        Some(l) => return Err(ApiError::bad_request(format!("limit must be between 1 and {MAX_LIMIT}, got {l}"))),
    };
    let by_nonce = query.contains_key("from-nonce") || query.contains_key("to-nonce");
    let store = &su.inner.store;
    let rows = if by_nonce {
        store.entries_by_nonce(process, parse_u64(query, "from-nonce")?, parse_u64(query, "to-nonce")?, limit + 1)?
    } else {
        store.entries_by_time(process, parse_u64(query, "from")?, parse_u64(query, "to")?, limit + 1)?
    };
    let has_next_page = rows.len() > limit;
    let mut edges = Vec::with_capacity(rows.len().min(limit));
    for (nonce, entry) in rows.into_iter().take(limit) {
        let cursor = if by_nonce { nonce.to_string() } else { entry.timestamp.to_string() };
        edges.push(Edge { cursor, node: su.node(&entry, show_anchor(query))? });
    }
    Ok(Page { page_info: PageInfo { has_next_page }, edges })
}

async fn latest(
    State(su): State<SchedulerUnit>,
    Path(id): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Json<MessageNode>, ApiError> {
    check_id(&id)?;
    let store = &su.inner.store;
    let state = store.process_state(&id)?.ok_or_else(|| ApiError::not_found(format!("Process not found: {id}")))?;
    let entry = store.entry(&id, state.next_nonce - 1)?.ok_or_else(|| ApiError::not_found(format!("Process not found: {id}")))?;
    Ok(Json(su.node(&entry, show_anchor(&query))?))
}

async fn process(
    State(su): State<SchedulerUnit>,
    Path(id): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Json<ProcessInfo>, ApiError> {
    check_id(&id)?;
    let store = &su.inner.store;
    let state = store.process_state(&id)?.ok_or_else(|| ApiError::not_found(format!("Process not found: {id}")))?;
    let bytes = store.su_item(&id)?.ok_or_else(|| ApiError::not_found(format!("Process not found: {id}")))?;
    let item =
        DataItem::parse(&bytes).map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("stored process is corrupt: {e}")))?;
    let json = ItemJson::from_item_showing_anchor(&item, show_anchor(&query));
    Ok(Json(ProcessInfo {
        process_id: id,
        block: format!("{:012}", state.block_height),
        owner: json.owner,
        tags: json.tags,
        timestamp: state.timestamp as i64,
        data: json.data,
        anchor: json.anchor,
        signature: Some(json.signature),
        target: json.target.filter(|t| !t.is_empty()),
    }))
}

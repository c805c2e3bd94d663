//! Scheduler-unit client (docs/ao-protocol.md §3).

use reqwest::Method;

use super::{HttpClient, NetError, Policy, Unit};
use crate::protocol::DataItem;
use crate::protocol::su::{MessageNode, Page, ProcessInfo, SuInfo, SuPosted, SuTimestamp};

/// A range of a process's schedule, as the SU's query parameters express it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Range {
    /// Exclusive lower bound: timestamp in ms (or nonce, with `by_nonce`).
    pub from: Option<u64>,
    /// Inclusive upper bound.
    pub to: Option<u64>,
    pub limit: Option<u32>,
    /// Use `from-nonce`/`to-nonce`, where cursors are nonces.
    pub by_nonce: bool,
}

#[derive(Debug, Clone)]
pub struct SchedulerClient {
    http: HttpClient,
}

impl SchedulerClient {
    pub fn new(base: &str, policy: Policy) -> Self {
        Self { http: HttpClient::new(Unit::Scheduler, base, policy) }
    }

    pub fn base(&self) -> &str {
        self.http.base()
    }

    /// `GET /`: the scheduler's address and clock.
    pub async fn info(&self) -> Result<SuInfo, NetError> {
        self.http.json(Method::GET, "/", None).await
    }

    /// `GET /timestamp`.
    pub async fn timestamp(&self) -> Result<SuTimestamp, NetError> {
        self.http.json(Method::GET, "/timestamp", None).await
    }

    /// `POST /`: schedules a signed Message or Process.
    pub async fn post_item(&self, item: &DataItem) -> Result<SuPosted, NetError> {
        self.post_raw(item.to_bytes()).await
    }

    /// `POST /` with raw item bytes (as the messenger forwards them).
    pub async fn post_raw(&self, bytes: Vec<u8>) -> Result<SuPosted, NetError> {
        self.http.json(Method::POST, "/", Some(("application/octet-stream", bytes))).await
    }

    /// `GET /{process}?process-id=…`: one page of the schedule.
    pub async fn page(&self, process: &str, range: &Range) -> Result<Page, NetError> {
        // `show-anchor`: the assignments' binary anchors come back base64url, so they verify.
        let mut q = format!("/{process}?process-id={process}&show-anchor=1");
        let (from, to) = if range.by_nonce { ("from-nonce", "to-nonce") } else { ("from", "to") };
        if let Some(v) = range.from {
            q.push_str(&format!("&{from}={v}"));
        }
        if let Some(v) = range.to {
            q.push_str(&format!("&{to}={v}"));
        }
        if let Some(v) = range.limit {
            q.push_str(&format!("&limit={v}"));
        }
        let page: Page = self.not_found(self.http.json(Method::GET, &q, None).await, "process", process)?;
        // A unit answers at most the page it was asked for: more is refused before it is used.
        if let Some(limit) = range.limit
            && page.edges.len() > limit as usize
        {
            return Err(NetError::BadAnswer {
                unit: Unit::Scheduler,
                url: format!("{}{q}", self.http.base()),
                reason: format!("{} schedule entries for a page of at most {limit}", page.edges.len()),
            });
        }
        Ok(page)
    }

    /// Every schedule entry after `from` (exclusive), following pagination.
    pub async fn all(&self, process: &str, mut range: Range) -> Result<Vec<MessageNode>, NetError> {
        let mut out = Vec::new();
        loop {
            let page = self.page(process, &range).await?;
            let Some(last) = page.edges.last() else { return Ok(out) };
            // In nonce mode the next page starts after the last entry's nonce, whatever the
            // cursor of a first page without `from-nonce` was (the SU pages by time then).
            let raw_cursor = if range.by_nonce { last.node.assignment.tag("Nonce").unwrap_or_default() } else { last.cursor.as_str() };
            let cursor = raw_cursor.parse::<u64>().map_err(|_| NetError::BadAnswer {
                unit: Unit::Scheduler,
                url: format!("{}/{process}", self.base()),
                reason: format!("cursor {raw_cursor:?} is not a number"),
            })?;
            let more = page.page_info.has_next_page;
            out.extend(page.edges.into_iter().map(|e| e.node));
            if !more {
                return Ok(out);
            }
            if range.from.is_some_and(|f| cursor <= f) {
                return Err(NetError::BadAnswer {
                    unit: Unit::Scheduler,
                    url: format!("{}/{process}", self.base()),
                    reason: format!("cursor went backwards ({cursor} after {:?})", range.from),
                });
            }
            range.from = Some(cursor);
        }
    }

    /// `GET /{message}?process-id=…`: one message with its assignment.
    pub async fn message(&self, message: &str, process: &str) -> Result<MessageNode, NetError> {
        let q = format!("/{message}?process-id={process}&show-anchor=1");
        self.not_found(self.http.json(Method::GET, &q, None).await, "message", message)
    }

    /// `GET /processes/{process}`.
    pub async fn process(&self, process: &str) -> Result<ProcessInfo, NetError> {
        self.not_found(self.http.json(Method::GET, &format!("/processes/{process}?show-anchor=1"), None).await, "process", process)
    }

    /// `GET /{process}/latest`.
    pub async fn latest(&self, process: &str) -> Result<MessageNode, NetError> {
        let q = format!("/{process}/latest?process-id={process}&show-anchor=1");
        self.not_found(self.http.json(Method::GET, &q, None).await, "process", process)
    }

    fn not_found<T>(&self, r: Result<T, NetError>, what: &'static str, id: &str) -> Result<T, NetError> {
        match r {
            Err(NetError::Rejected { status: 404, .. }) => Err(NetError::NotFound { unit: Unit::Scheduler, what, id: id.to_owned() }),
            other => other,
        }
    }
}

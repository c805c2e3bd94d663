//! HTTP clients for the AO units (scheduler, messenger, gateway), with timeouts, bounded
//! retries with full-jitter backoff, and typed errors that name the unit and the reason.
//!
//! Retried: connection failures, timeouts, 429 and 5xx. Never retried: other 4xx (the
//! request itself is wrong) and answers that do not decode. Every POST the worker makes is
//! idempotent (data item ids are content-derived), so retrying a POST cannot duplicate.

pub mod gateway;
pub mod messenger;
pub mod scheduler;

use std::fmt;
use std::sync::Once;
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;

pub use gateway::GatewayClient;
pub use messenger::MessengerClient;
pub use scheduler::SchedulerClient;

use crate::config::NetworkSection;

/// Which AO unit a request went to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    Scheduler,
    Messenger,
    Gateway,
}

impl fmt::Display for Unit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Unit::Scheduler => "scheduler",
            Unit::Messenger => "messenger",
            Unit::Gateway => "gateway",
        })
    }
}

/// Why a request to a unit failed. Variants are the caller's decisions: `Unavailable` may
/// succeed later; `Rejected` will not until the request changes; `BadAnswer` means the unit
/// is not speaking the protocol.
#[derive(Debug, Clone, thiserror::Error)]
pub enum NetError {
    #[error("{unit} at {url} unavailable after {attempts} attempt(s): {reason}")]
    Unavailable { unit: Unit, url: String, attempts: u32, reason: String },
    #[error("{unit} rejected {method} {url} with {status}: {message}")]
    Rejected { unit: Unit, method: String, url: String, status: u16, message: String },
    #[error("{unit} at {url} answered something that is not the AO protocol: {reason}")]
    BadAnswer { unit: Unit, url: String, reason: String },
    #[error("{unit} has no {what} {id}")]
    NotFound { unit: Unit, what: &'static str, id: String },
}

impl NetError {
    /// True when trying again later may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, NetError::Unavailable { .. })
    }
}

/// Timeouts and retry policy for one client.
#[derive(Debug, Clone)]
pub struct Policy {
    pub request_timeout: Duration,
    pub connect_timeout: Duration,
    pub max_attempts: u32,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
}

impl Policy {
    pub fn from_config(n: &NetworkSection) -> Self {
        Self {
            request_timeout: n.request_timeout,
            connect_timeout: n.connect_timeout,
            max_attempts: n.max_attempts,
            backoff_min: n.backoff_min,
            backoff_max: n.backoff_max,
        }
    }

    /// Full-jitter backoff before attempt `attempt + 1` (attempt counts from 1).
    pub fn backoff(&self, attempt: u32) -> Duration {
        let cap = self.backoff_min.saturating_mul(1u32 << attempt.min(16)).min(self.backoff_max);
        let lo = self.backoff_min.as_millis() as u64;
        let hi = (cap.as_millis() as u64).max(lo);
        Duration::from_millis(fastrand::u64(lo..=hi))
    }
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            request_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
            max_attempts: 5,
            backoff_min: Duration::from_millis(200),
            backoff_max: Duration::from_secs(10),
        }
    }
}

/// Most bytes read from any answer: the units' own body limit is 10 MiB; a gateway serves
/// module binaries, which may be larger.
const MAX_ANSWER_BYTES: usize = 512 * 1024 * 1024;

/// A base URL plus a shared connection pool and policy.
#[derive(Debug, Clone)]
pub struct HttpClient {
    unit: Unit,
    base: String,
    http: reqwest::Client,
    policy: Policy,
}

/// An answer's status, content type and body.
pub struct Answer {
    pub status: StatusCode,
    pub content_type: Option<String>,
    pub body: Vec<u8>,
}

/// Installs rustls's ring provider once (reqwest is built without one); every client needs it.
pub fn install_crypto_provider() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Another part of the process may have installed one already; either is fine.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

impl HttpClient {
    pub fn new(unit: Unit, base: &str, policy: Policy) -> Self {
        install_crypto_provider();
        let http = reqwest::Client::builder()
            .timeout(policy.request_timeout)
            .connect_timeout(policy.connect_timeout)
            .user_agent(concat!("ao-gpu-worker/", env!("CARGO_PKG_VERSION")))
            .build()
            .expect("reqwest client with a crypto provider installed");
        Self { unit, base: base.trim_end_matches('/').to_owned(), http, policy }
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    pub fn unit(&self) -> Unit {
        self.unit
    }

    fn url(&self, path_and_query: &str) -> String {
        format!("{}{}", self.base, path_and_query)
    }

    /// Sends a request with retries; returns any answer that is not retryable (including
    /// 4xx, which the caller maps), or `Unavailable` once attempts run out.
    pub async fn send(&self, method: Method, path_and_query: &str, body: Option<(&'static str, Vec<u8>)>) -> Result<Answer, NetError> {
        let url = self.url(path_and_query);
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut req = self.http.request(method.clone(), &url);
            if let Some((content_type, bytes)) = &body {
                req = req.header(reqwest::header::CONTENT_TYPE, *content_type).body(bytes.clone());
            }
            let reason = match req.send().await {
                Ok(resp) => {
                    let status = resp.status();
                    let content_type = resp.headers().get(reqwest::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).map(str::to_owned);
                    match read_limited(resp).await {
                        Ok(body) if !(status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS) => {
                            return Ok(Answer { status, content_type, body });
                        }
                        Ok(body) => format!("{status}: {}", error_message(&body)),
                        Err(e) => format!("reading the answer failed: {e}"),
                    }
                }
                Err(e) if e.is_timeout() => {
                    format!(
                        "timed out (connect timeout {:?}, request timeout {:?})",
                        self.policy.connect_timeout, self.policy.request_timeout
                    )
                }
                Err(e) => format!("request failed: {}", error_chain(&e)),
            };
            if attempt >= self.policy.max_attempts {
                return Err(NetError::Unavailable { unit: self.unit, url, attempts: attempt, reason });
            }
            let wait = self.policy.backoff(attempt);
            tracing::debug!(unit = %self.unit, %url, attempt, ?wait, %reason, "retrying");
            tokio::time::sleep(wait).await;
        }
    }

    /// Sends and decodes a JSON answer of a 2xx status; maps 4xx to `Rejected`.
    pub async fn json<T: DeserializeOwned>(
        &self,
        method: Method,
        path_and_query: &str,
        body: Option<(&'static str, Vec<u8>)>,
    ) -> Result<T, NetError> {
        let answer = self.expect_success(method, path_and_query, body).await?;
        serde_json::from_slice(&answer.body).map_err(|e| NetError::BadAnswer {
            unit: self.unit,
            url: self.url(path_and_query),
            reason: format!("invalid JSON ({e}): {}", preview(&answer.body)),
        })
    }

    /// Sends and returns the answer of a 2xx status; maps other statuses to `Rejected`.
    pub async fn expect_success(
        &self,
        method: Method,
        path_and_query: &str,
        body: Option<(&'static str, Vec<u8>)>,
    ) -> Result<Answer, NetError> {
        let answer = self.send(method.clone(), path_and_query, body).await?;
        if answer.status.is_success() {
            return Ok(answer);
        }
        Err(NetError::Rejected {
            unit: self.unit,
            method: method.to_string(),
            url: self.url(path_and_query),
            status: answer.status.as_u16(),
            message: error_message(&answer.body),
        })
    }
}

async fn read_limited(mut resp: reqwest::Response) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| error_chain(&e))? {
        if out.len() + chunk.len() > MAX_ANSWER_BYTES {
            return Err(format!("answer larger than {MAX_ANSWER_BYTES} bytes"));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

/// The `error` field of a unit's JSON error body, else a preview of the body.
pub fn error_message(body: &[u8]) -> String {
    serde_json::from_slice::<crate::protocol::su::ErrorBody>(body).map(|b| b.error).unwrap_or_else(|_| preview(body))
}

fn preview(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned();
    if text.is_empty() { "(empty body)".into() } else { text }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_bounded_and_jittered() {
        let p = Policy { backoff_min: Duration::from_millis(100), backoff_max: Duration::from_millis(800), ..Policy::default() };
        for attempt in 1..30 {
            let d = p.backoff(attempt);
            assert!(d >= Duration::from_millis(100) && d <= Duration::from_millis(800), "{d:?}");
        }
        let distinct: std::collections::HashSet<_> = (0..50).map(|_| p.backoff(5)).collect();
        assert!(distinct.len() > 5, "jitter spreads retries");
    }
}

//! Messenger-unit client (docs/ao-protocol.md §4).

use reqwest::Method;

use super::{HttpClient, NetError, Policy, Unit};
use crate::protocol::DataItem;
use crate::protocol::su::MuAccepted;

#[derive(Debug, Clone)]
pub struct MessengerClient {
    http: HttpClient,
}

impl MessengerClient {
    pub fn new(base: &str, policy: Policy) -> Self {
        Self { http: HttpClient::new(Unit::Messenger, base, policy) }
    }

    pub fn base(&self) -> &str {
        self.http.base()
    }

    /// `POST /`: hands a signed Message or Process to the messenger (202 on acceptance).
    /// Checks that the messenger acknowledged the same id it was given.
    pub async fn post_item(&self, item: &DataItem) -> Result<MuAccepted, NetError> {
        let id = item.id();
        let accepted: MuAccepted = self.http.json(Method::POST, "/", Some(("application/octet-stream", item.to_bytes()))).await?;
        if accepted.id != id {
            return Err(NetError::BadAnswer {
                unit: Unit::Messenger,
                url: self.base().to_owned(),
                reason: format!("acknowledged id {} for item {id}", accepted.id),
            });
        }
        Ok(accepted)
    }
}

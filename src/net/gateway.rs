//! Gateway and uploader client: publish signed items (`POST /tx`, as Arweave bundlers take
//! them) and read their data (`GET /raw/{id}`).

use reqwest::Method;
use serde::{Deserialize, Serialize};

use super::{HttpClient, NetError, Policy, Unit};
use crate::protocol::DataItem;

/// Answer of `POST /tx`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Uploaded {
    pub id: String,
    pub timestamp: u64,
}

#[derive(Debug, Clone)]
pub struct GatewayClient {
    http: HttpClient,
}

impl GatewayClient {
    pub fn new(base: &str, policy: Policy) -> Self {
        Self { http: HttpClient::new(Unit::Gateway, base, policy) }
    }

    pub fn base(&self) -> &str {
        self.http.base()
    }

    /// `POST /tx`: publishes a signed item. Idempotent: the same item gives the same id.
    pub async fn upload(&self, item: &DataItem) -> Result<Uploaded, NetError> {
        let id = item.id();
        let up: Uploaded = self.http.json(Method::POST, "/tx", Some(("application/octet-stream", item.to_bytes()))).await?;
        if up.id != id {
            return Err(NetError::BadAnswer {
                unit: Unit::Gateway,
                url: self.base().to_owned(),
                reason: format!("stored id {} for item {id}", up.id),
            });
        }
        Ok(up)
    }

    /// `GET /raw/{id}`: the data of a stored item.
    pub async fn raw(&self, id: &str) -> Result<Vec<u8>, NetError> {
        match self.http.expect_success(Method::GET, &format!("/raw/{id}"), None).await {
            Ok(a) => Ok(a.body),
            Err(NetError::Rejected { status: 404, .. }) => Err(NetError::NotFound { unit: Unit::Gateway, what: "item", id: id.to_owned() }),
            Err(e) => Err(e),
        }
    }

    /// `HEAD /raw/{id}`: whether the gateway holds the item, without downloading it.
    pub async fn exists(&self, id: &str) -> Result<bool, NetError> {
        let a = self.http.send(Method::HEAD, &format!("/raw/{id}"), None).await?;
        match a.status.as_u16() {
            200..=299 => Ok(true),
            404 => Ok(false),
            status => Err(NetError::Rejected {
                unit: Unit::Gateway,
                method: "HEAD".into(),
                url: format!("{}/raw/{id}", self.base()),
                status,
                message: super::error_message(&a.body),
            }),
        }
    }
}

//! Gateway and uploader client: publish signed items (`POST /tx`, as Arweave bundlers take
//! them) and read their data (`GET /raw/{id}`).

use reqwest::Method;
use serde::{Deserialize, Serialize};

use super::{HttpClient, NetError, Policy, Unit};
use crate::protocol::{DataItem, SignatureType, Tag, b64};

/// Answer of `POST /tx`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Uploaded {
    pub id: String,
    pub timestamp: u64,
}

/// `GET /tx/{id}`: an item's signed fields, without its data (binary fields base64url).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ItemMeta {
    pub id: String,
    pub signature_type: u16,
    pub signature: String,
    pub owner: String,
    pub owner_address: String,
    pub target: Option<String>,
    pub anchor: Option<String>,
    pub tags: Vec<Tag>,
    pub data_size: u64,
}

impl ItemMeta {
    pub fn from_item(item: &DataItem) -> Self {
        Self {
            id: item.id(),
            signature_type: item.signature_type.code(),
            signature: b64::encode(&item.signature),
            owner: b64::encode(&item.owner),
            owner_address: item.owner_address(),
            target: item.target_id(),
            anchor: item.anchor.map(|a| b64::encode(&a)),
            tags: item.tags.clone(),
            data_size: item.data.len() as u64,
        }
    }

    /// Rebuilds the signed item from these fields and its data, and verifies it: proof that
    /// the data is what the owner signed under this id.
    pub fn verified_item(&self, data: Vec<u8>) -> Result<DataItem, String> {
        let signature_type =
            SignatureType::from_code(self.signature_type).ok_or_else(|| format!("unknown signature type {}", self.signature_type))?;
        let bad = |what: &str| format!("{what} is not base64url");
        let signature = b64::decode(&self.signature).map_err(|_| bad("signature"))?;
        let owner = b64::decode(&self.owner).map_err(|_| bad("owner"))?;
        let target = self.target.as_deref().map(b64::decode_id).transpose().map_err(|e| e.to_string())?;
        let anchor = self.anchor.as_deref().map(b64::decode_id).transpose().map_err(|e| e.to_string())?;
        let item = DataItem::from_parts(signature_type, signature, owner, target, anchor, self.tags.clone(), data);
        item.verify().map_err(|e| e.to_string())?;
        if item.id() != self.id {
            return Err(format!("item rebuilds to id {}, not {}", item.id(), self.id));
        }
        Ok(item)
    }
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

    /// `GET /tx/{id}`: an item's signed fields.
    pub async fn meta(&self, id: &str) -> Result<ItemMeta, NetError> {
        match self.http.json(Method::GET, &format!("/tx/{id}"), None).await {
            Err(NetError::Rejected { status: 404, .. }) => Err(NetError::NotFound { unit: Unit::Gateway, what: "item", id: id.to_owned() }),
            other => other,
        }
    }

    /// The whole signed item: its fields and data, verified against each other and against the
    /// id asked for (a gateway answering another validly signed item is refused).
    pub async fn item(&self, id: &str) -> Result<DataItem, NetError> {
        let meta = self.meta(id).await?;
        let data = self.raw(id).await?;
        let bad = |reason: String| NetError::BadAnswer { unit: Unit::Gateway, url: format!("{}/tx/{id}", self.base()), reason };
        let item = meta.verified_item(data).map_err(bad)?;
        if item.id() != id {
            return Err(bad(format!("asked for item {id}, the gateway answered item {}", item.id())));
        }
        Ok(item)
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

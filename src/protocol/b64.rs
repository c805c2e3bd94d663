//! Base64url (no padding), the text form of every Arweave/AO id, owner and signature.

use base64::Engine;
use base64::engine::general_purpose::{URL_SAFE, URL_SAFE_NO_PAD};

/// Encodes bytes as unpadded base64url, as Arweave and AO write ids.
pub fn encode(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// Decodes base64url, with or without padding.
pub fn decode(text: &str) -> Result<Vec<u8>, base64::DecodeError> {
    if text.ends_with('=') { URL_SAFE.decode(text) } else { URL_SAFE_NO_PAD.decode(text) }
}

/// Decodes a 43-character id (process, message, wallet address) into its 32 raw bytes.
pub fn decode_id(text: &str) -> Result<[u8; 32], IdError> {
    let raw = decode(text).map_err(|_| IdError::NotBase64Url(text.chars().take(64).collect()))?;
    raw.as_slice().try_into().map_err(|_| IdError::WrongLength(raw.len()))
}

/// Why text is not a valid 32-byte id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("id {0:?} is not base64url")]
    NotBase64Url(String),
    #[error("id decodes to {0} bytes, expected 32")]
    WrongLength(usize),
}

/// True when `text` is a well-formed 43-character id.
pub fn is_id(text: &str) -> bool {
    text.len() == 43 && decode_id(text).is_ok()
}

//! ANS-104 data items: build, sign, serialize, parse and verify.
//!
//! Byte layout, signed message and validation rules follow docs/ao-protocol.md §1, which
//! follows what deployed implementations do (not the ANS-104 prose, which disagrees on the
//! signed structure). Items this module builds satisfy the rules every implementation
//! accepts (§1.6), so they pass arbundles, HyperBEAM and the AO units alike.

use sha2::{Digest, Sha256};

use super::avro::{self, AvroError};
use super::deep_hash::deep_hash_blobs;
use super::{Tag, b64};

/// Most tags an item may carry (ANS-104 spec, HyperBEAM).
pub const MAX_TAGS: usize = 128;
/// Longest tag name in bytes.
pub const MAX_TAG_NAME: usize = 1024;
/// Longest tag value in bytes.
pub const MAX_TAG_VALUE: usize = 3072;
/// Most Avro tag bytes (arbundles `MAX_TAG_BYTES`).
pub const MAX_TAG_BYTES: usize = 4096;
/// Smallest item arbundles accepts (`MIN_BINARY_SIZE`).
pub const MIN_ITEM_SIZE: usize = 80;

/// The signature schemes of ANS-104 (`SignatureConfig`), with their fixed field sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SignatureType {
    /// Arweave RSA-4096, RSA-PSS over the deep hash.
    Arweave,
    /// Raw Ed25519 over the deep hash.
    Ed25519,
    /// secp256k1 with an EIP-191 personal-sign prefix.
    Ethereum,
    /// Ed25519 over the lowercase hex text of the deep hash.
    Solana,
    InjectedAptos,
    MultiAptos,
    TypedEthereum,
}

impl SignatureType {
    /// The type for a wire code, if known.
    pub fn from_code(code: u16) -> Option<Self> {
        Some(match code {
            1 => Self::Arweave,
            2 => Self::Ed25519,
            3 => Self::Ethereum,
            4 => Self::Solana,
            5 => Self::InjectedAptos,
            6 => Self::MultiAptos,
            7 => Self::TypedEthereum,
            _ => return None,
        })
    }

    /// The wire code.
    pub fn code(self) -> u16 {
        match self {
            Self::Arweave => 1,
            Self::Ed25519 => 2,
            Self::Ethereum => 3,
            Self::Solana => 4,
            Self::InjectedAptos => 5,
            Self::MultiAptos => 6,
            Self::TypedEthereum => 7,
        }
    }

    /// Signature length in bytes.
    pub fn signature_len(self) -> usize {
        match self {
            Self::Arweave => 512,
            Self::Ed25519 | Self::Solana | Self::InjectedAptos => 64,
            Self::Ethereum | Self::TypedEthereum => 65,
            Self::MultiAptos => 64 * 32 + 4,
        }
    }

    /// Owner (public key) length in bytes.
    pub fn owner_len(self) -> usize {
        match self {
            Self::Arweave => 512,
            Self::Ed25519 | Self::Solana | Self::InjectedAptos => 32,
            Self::Ethereum => 65,
            Self::TypedEthereum => 42,
            Self::MultiAptos => 32 * 32 + 1,
        }
    }

    /// Lowercase name, for messages.
    pub fn name(self) -> &'static str {
        match self {
            Self::Arweave => "arweave (rsa-4096)",
            Self::Ed25519 => "ed25519",
            Self::Ethereum => "ethereum",
            Self::Solana => "solana",
            Self::InjectedAptos => "injected-aptos",
            Self::MultiAptos => "multi-aptos",
            Self::TypedEthereum => "typed-ethereum",
        }
    }
}

/// Why bytes are not a valid data item, or an item is not valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Ans104Error {
    #[error("data item is {len} bytes, too short to hold a signature type")]
    Empty { len: usize },
    #[error("unknown signature type {0}")]
    UnknownSignatureType(u16),
    #[error("data item ends inside the {field} (needs {need} bytes at offset {offset}, has {len})")]
    Truncated { field: &'static str, offset: usize, need: usize, len: usize },
    #[error("{field} presence byte is {value}, must be 0 or 1")]
    BadPresenceByte { field: &'static str, value: u8 },
    #[error("header says {header} tags but the tag bytes hold {decoded}")]
    TagCountMismatch { header: u64, decoded: usize },
    #[error("malformed tag bytes: {0}")]
    Tags(#[from] AvroError),
    #[error("{count} tags, more than the {MAX_TAGS} allowed")]
    TooManyTags { count: usize },
    #[error("tag {index} {field} is {len} bytes, more than the {max} allowed")]
    TagTooLong { index: usize, field: &'static str, len: usize, max: usize },
    #[error("tag {index} has an empty {field}")]
    EmptyTag { index: usize, field: &'static str },
    #[error("tag bytes are {len} bytes, more than the {MAX_TAG_BYTES} allowed")]
    TagBytesTooLarge { len: usize },
    #[error("data item is {len} bytes, smaller than the {MIN_ITEM_SIZE} bytes every verifier requires")]
    TooSmall { len: usize },
    #[error("unsupported signature type {} ({}): cannot verify", .0.code(), .0.name())]
    UnsupportedSignatureType(SignatureType),
    #[error("owner is not a valid {0} public key")]
    InvalidOwner(&'static str),
    #[error("signature does not verify")]
    BadSignature,
    #[error("cannot sign: {0}")]
    Signing(String),
    #[error("signer produced {got} signature bytes, expected {expected}")]
    SignerLength { got: usize, expected: usize },
}

/// Something that can sign the deep hash of a data item.
pub trait Signer {
    /// The scheme this signer uses.
    fn signature_type(&self) -> SignatureType;
    /// The raw public key, `owner_len` bytes.
    fn owner(&self) -> Vec<u8>;
    /// Signs `message` (the 48-byte deep hash). Ed25519 is deterministic; RSA-PSS (type 1) is
    /// randomized, so a second call gives another signature and the item another id.
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, Ans104Error>;
}

/// A parsed or freshly signed ANS-104 data item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataItem {
    pub signature_type: SignatureType,
    pub signature: Vec<u8>,
    pub owner: Vec<u8>,
    pub target: Option<[u8; 32]>,
    pub anchor: Option<[u8; 32]>,
    pub tags: Vec<Tag>,
    /// The exact Avro bytes of the tag field: what the signature covers.
    raw_tags: Vec<u8>,
    pub data: Vec<u8>,
}

impl DataItem {
    /// An item from its fields, as another representation (JSON) carries them. The tag
    /// bytes are re-encoded in the canonical form; verify the result before trusting it.
    pub fn from_parts(
        signature_type: SignatureType,
        signature: Vec<u8>,
        owner: Vec<u8>,
        target: Option<[u8; 32]>,
        anchor: Option<[u8; 32]>,
        tags: Vec<Tag>,
        data: Vec<u8>,
    ) -> Self {
        let raw_tags = avro::encode_tags(&tags);
        Self { signature_type, signature, owner, target, anchor, tags, raw_tags, data }
    }

    /// The raw 32-byte id: sha256 of the signature.
    pub fn id_raw(&self) -> [u8; 32] {
        Sha256::digest(&self.signature).into()
    }

    /// The id as text (43 characters of base64url).
    pub fn id(&self) -> String {
        b64::encode(&self.id_raw())
    }

    /// The owner's address as the legacy AO units compute it: base64url(sha256(owner)).
    pub fn owner_address(&self) -> String {
        address_of(&self.owner)
    }

    /// Target as text, if present.
    pub fn target_id(&self) -> Option<String> {
        self.target.map(|t| b64::encode(&t))
    }

    /// The first value of a tag, if present (tag names are case-sensitive).
    pub fn tag(&self, name: &str) -> Option<&str> {
        self.tags.iter().find(|t| t.name == name).map(|t| t.value.as_str())
    }

    /// The Avro bytes of the tag field.
    pub fn raw_tags(&self) -> &[u8] {
        &self.raw_tags
    }

    /// The 48-byte deep hash that the signature covers.
    pub fn signature_data(&self) -> [u8; 48] {
        signature_data(self.signature_type, &self.owner, self.target.as_ref(), self.anchor.as_ref(), &self.raw_tags, &self.data)
    }

    /// Serialized length in bytes.
    pub fn len(&self) -> usize {
        2 + self.signature.len()
            + self.owner.len()
            + 1
            + self.target.map_or(0, |_| 32)
            + 1
            + self.anchor.map_or(0, |_| 32)
            + 16
            + self.raw_tags.len()
            + self.data.len()
    }

    /// Never true: an item always has a header.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The binary form.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.len());
        out.extend_from_slice(&self.signature_type.code().to_le_bytes());
        out.extend_from_slice(&self.signature);
        out.extend_from_slice(&self.owner);
        for field in [&self.target, &self.anchor] {
            match field {
                Some(bytes) => {
                    out.push(1);
                    out.extend_from_slice(bytes);
                }
                None => out.push(0),
            }
        }
        out.extend_from_slice(&(self.tags.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.raw_tags.len() as u64).to_le_bytes());
        out.extend_from_slice(&self.raw_tags);
        out.extend_from_slice(&self.data);
        out
    }

    /// Parses the binary form. Checks structure only; call [`DataItem::verify`] for the
    /// signature and the size rules.
    pub fn parse(bytes: &[u8]) -> Result<Self, Ans104Error> {
        let mut r = Cursor { buf: bytes, pos: 0 };
        if bytes.len() < 2 {
            return Err(Ans104Error::Empty { len: bytes.len() });
        }
        let code = u16::from_le_bytes([bytes[0], bytes[1]]);
        r.pos = 2;
        let signature_type = SignatureType::from_code(code).ok_or(Ans104Error::UnknownSignatureType(code))?;
        let signature = r.take("signature", signature_type.signature_len())?.to_vec();
        let owner = r.take("owner", signature_type.owner_len())?.to_vec();
        let target = r.optional_32("target")?;
        let anchor = r.optional_32("anchor")?;
        let tag_count = u64::from_le_bytes(r.take("tag count", 8)?.try_into().expect("8 bytes"));
        let tag_bytes_len = u64::from_le_bytes(r.take("tag byte count", 8)?.try_into().expect("8 bytes"));
        let tag_bytes_len = usize::try_from(tag_bytes_len).unwrap_or(usize::MAX);
        let raw_tags = r.take("tags", tag_bytes_len)?;
        // The limits every verifier enforces, checked on the header before anything is
        // allocated or decoded for the tags.
        if tag_count > MAX_TAGS as u64 {
            return Err(Ans104Error::TooManyTags { count: usize::try_from(tag_count).unwrap_or(usize::MAX) });
        }
        if raw_tags.len() > MAX_TAG_BYTES {
            return Err(Ans104Error::TagBytesTooLarge { len: raw_tags.len() });
        }
        let raw_tags = raw_tags.to_vec();
        let tags = avro::decode_tags(&raw_tags)?;
        if tags.len() as u64 != tag_count {
            return Err(Ans104Error::TagCountMismatch { header: tag_count, decoded: tags.len() });
        }
        let data = bytes[r.pos..].to_vec();
        Ok(Self { signature_type, signature, owner, target, anchor, tags, raw_tags, data })
    }

    /// Parses and verifies in one step: what every unit does with a posted body.
    pub fn parse_verified(bytes: &[u8]) -> Result<Self, Ans104Error> {
        let item = Self::parse(bytes)?;
        item.verify()?;
        Ok(item)
    }

    /// Checks the limits every verifier enforces (§1.6) and the signature.
    pub fn verify(&self) -> Result<(), Ans104Error> {
        check_limits(&self.tags, self.raw_tags.len(), false)?;
        let len = self.len();
        if len < MIN_ITEM_SIZE {
            return Err(Ans104Error::TooSmall { len });
        }
        let message = self.signature_data();
        match self.signature_type {
            SignatureType::Arweave => super::rsa_pss::verify(&self.owner, &self.signature, &message).map_err(|e| match e {
                super::rsa_pss::RsaVerifyError::Owner => Ans104Error::InvalidOwner("arweave (rsa-4096)"),
                super::rsa_pss::RsaVerifyError::Signature => Ans104Error::BadSignature,
            }),
            SignatureType::Ed25519 => verify_ed25519(&self.owner, &self.signature, &message),
            SignatureType::Solana => verify_ed25519(&self.owner, &self.signature, hex::encode(message).as_bytes()),
            other => Err(Ans104Error::UnsupportedSignatureType(other)),
        }
    }
}

/// base64url(sha256(public key)): the address legacy AO units give any owner.
pub fn address_of(owner: &[u8]) -> String {
    b64::encode(&Sha256::digest(owner))
}

fn verify_ed25519(owner: &[u8], signature: &[u8], message: &[u8]) -> Result<(), Ans104Error> {
    let key: [u8; 32] = owner.try_into().map_err(|_| Ans104Error::InvalidOwner("ed25519"))?;
    let key = ed25519_dalek::VerifyingKey::from_bytes(&key).map_err(|_| Ans104Error::InvalidOwner("ed25519"))?;
    let sig: [u8; 64] = signature.try_into().map_err(|_| Ans104Error::BadSignature)?;
    let sig = ed25519_dalek::Signature::from_bytes(&sig);
    key.verify_strict(message, &sig).map_err(|_| Ans104Error::BadSignature)
}

fn signature_data(
    signature_type: SignatureType,
    owner: &[u8],
    target: Option<&[u8; 32]>,
    anchor: Option<&[u8; 32]>,
    raw_tags: &[u8],
    data: &[u8],
) -> [u8; 48] {
    let sig_type = signature_type.code().to_string();
    deep_hash_blobs(&[
        b"dataitem",
        b"1",
        sig_type.as_bytes(),
        owner,
        target.map_or(&[][..], |t| &t[..]),
        anchor.map_or(&[][..], |a| &a[..]),
        raw_tags,
        data,
    ])
}

/// Checks tag limits. `strict` also refuses empty names and values, which some
/// implementations reject: the worker's own items are built strict.
fn check_limits(tags: &[Tag], raw_len: usize, strict: bool) -> Result<(), Ans104Error> {
    if tags.len() > MAX_TAGS {
        return Err(Ans104Error::TooManyTags { count: tags.len() });
    }
    for (index, t) in tags.iter().enumerate() {
        for (field, len, max) in [("name", t.name.len(), MAX_TAG_NAME), ("value", t.value.len(), MAX_TAG_VALUE)] {
            if len > max {
                return Err(Ans104Error::TagTooLong { index, field, len, max });
            }
            if strict && len == 0 {
                return Err(Ans104Error::EmptyTag { index, field });
            }
        }
    }
    if raw_len > MAX_TAG_BYTES {
        return Err(Ans104Error::TagBytesTooLarge { len: raw_len });
    }
    Ok(())
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, field: &'static str, need: usize) -> Result<&'a [u8], Ans104Error> {
        let end = self.pos.checked_add(need).filter(|&e| e <= self.buf.len());
        let end = end.ok_or(Ans104Error::Truncated { field, offset: self.pos, need, len: self.buf.len() })?;
        let out = &self.buf[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    fn optional_32(&mut self, field: &'static str) -> Result<Option<[u8; 32]>, Ans104Error> {
        match self.take(field, 1)?[0] {
            0 => Ok(None),
            1 => Ok(Some(self.take(field, 32)?.try_into().expect("32 bytes"))),
            value => Err(Ans104Error::BadPresenceByte { field, value }),
        }
    }
}

/// Builds and signs a data item. Refuses anything some verifier would reject.
#[derive(Debug, Clone, Default)]
pub struct DataItemBuilder {
    target: Option<[u8; 32]>,
    anchor: Option<[u8; 32]>,
    tags: Vec<Tag>,
    data: Vec<u8>,
}

impl DataItemBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn target(mut self, target: [u8; 32]) -> Self {
        self.target = Some(target);
        self
    }

    pub fn anchor(mut self, anchor: [u8; 32]) -> Self {
        self.anchor = Some(anchor);
        self
    }

    pub fn tag(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.tags.push(Tag::new(name, value));
        self
    }

    pub fn tags(mut self, tags: impl IntoIterator<Item = Tag>) -> Self {
        self.tags.extend(tags);
        self
    }

    pub fn data(mut self, data: impl Into<Vec<u8>>) -> Self {
        self.data = data.into();
        self
    }

    /// Signs the item. Deterministic for ed25519 (the same inputs give the same id), randomized
    /// for RSA: keep the signed bytes and re-post those, never sign the same item again.
    pub fn sign(self, signer: &dyn Signer) -> Result<DataItem, Ans104Error> {
        let raw_tags = avro::encode_tags(&self.tags);
        check_limits(&self.tags, raw_tags.len(), true)?;
        let signature_type = signer.signature_type();
        let owner = signer.owner();
        if owner.len() != signature_type.owner_len() {
            return Err(Ans104Error::InvalidOwner(signature_type.name()));
        }
        let message = signature_data(signature_type, &owner, self.target.as_ref(), self.anchor.as_ref(), &raw_tags, &self.data);
        let signature = signer.sign(&message)?;
        if signature.len() != signature_type.signature_len() {
            return Err(Ans104Error::SignerLength { got: signature.len(), expected: signature_type.signature_len() });
        }
        let item = DataItem {
            signature_type,
            signature,
            owner,
            target: self.target,
            anchor: self.anchor,
            tags: self.tags,
            raw_tags,
            data: self.data,
        };
        let len = item.len();
        if len < MIN_ITEM_SIZE {
            return Err(Ans104Error::TooSmall { len });
        }
        Ok(item)
    }
}

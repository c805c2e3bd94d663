//! The worker's identity: an ed25519 key (a JWK, RFC 8037) or an Arweave RSA-4096 wallet (an
//! RSA JWK as arweave-js writes it); generation, the key file, permission checks, and signing.
//! Both kinds obey the same file rules (created 0600, never overwritten, refused when group or
//! others can read it) and the kind is detected from the JWK's `kty` when loading. The
//! address is base64url(sha256(owner)): the ed25519 public key, or the RSA modulus `n`. The
//! only module (with [`super::arweave`]) that holds secret key bytes.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use ed25519_dalek::{Signer as _, SigningKey};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::arweave::{RsaJwk, RsaKey};
use crate::protocol::ans104::address_of;
use crate::protocol::{Ans104Error, SignatureType, Signer, b64};

/// Why a key could not be created or loaded. Each message says how to fix it.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("key file {path} already exists; refusing to overwrite it (move it away first)")]
    Exists { path: PathBuf },
    #[error("key file {path} is readable by group or others (mode {mode:04o}); fix with: chmod 600 {path}")]
    TooOpen { path: PathBuf, mode: u32 },
    #[error("key file {path} not found; create one with: ao-gpu-worker keygen --out {path} [--type arweave|ed25519]")]
    Missing { path: PathBuf },
    #[error("key file {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("key file {path} is not an Ed25519 JWK nor an Arweave (RSA-4096) JWK wallet: {reason}")]
    Format { path: PathBuf, reason: String },
    #[error("no system randomness: {0}")]
    Random(String),
}

/// The two kinds of identity the worker can hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyType {
    /// Ed25519: ANS-104 signature type 2, deterministic signatures.
    Ed25519,
    /// An Arweave RSA-4096 wallet: ANS-104 signature type 1 (RSA-PSS), randomized signatures.
    /// The deployed legacy scheduler unit accepts only this kind.
    Arweave,
}

impl KeyType {
    pub fn name(self) -> &'static str {
        match self {
            Self::Ed25519 => "ed25519",
            Self::Arweave => "arweave",
        }
    }
}

impl std::fmt::Display for KeyType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for KeyType {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "ed25519" => Ok(Self::Ed25519),
            "arweave" | "rsa" => Ok(Self::Arweave),
            other => Err(format!("unknown key type {other:?}: use arweave or ed25519")),
        }
    }
}

#[derive(Serialize, Deserialize)]
struct Ed25519Jwk {
    kty: String,
    crv: String,
    /// Secret key, base64url.
    d: String,
    /// Public key, base64url.
    x: String,
}

enum Secret {
    Ed25519(Box<SigningKey>),
    Arweave(Box<RsaKey>),
}

/// The worker's key pair, ed25519 or Arweave RSA. Secret bytes are zeroed on drop.
pub struct Keypair {
    key: Secret,
}

impl std::fmt::Debug for Keypair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keypair").field("type", &self.key_type()).field("address", &self.address()).finish_non_exhaustive()
    }
}

impl Keypair {
    /// A fresh ed25519 key from the operating system's randomness.
    pub fn generate() -> Result<Self, KeyError> {
        let mut secret = Zeroizing::new([0u8; 32]);
        getrandom::fill(secret.as_mut()).map_err(|e| KeyError::Random(e.to_string()))?;
        Ok(Self::from_secret(&secret))
    }

    /// A fresh Arweave RSA-4096 wallet. Slow: about a second in a release build, up to a
    /// minute in a debug build.
    pub fn generate_arweave() -> Result<Self, KeyError> {
        Ok(Self { key: Secret::Arweave(Box::new(RsaKey::generate().map_err(KeyError::Random)?)) })
    }

    /// A fresh key of the given type.
    pub fn generate_type(key_type: KeyType) -> Result<Self, KeyError> {
        match key_type {
            KeyType::Ed25519 => Self::generate(),
            KeyType::Arweave => Self::generate_arweave(),
        }
    }

    /// An ed25519 key from its 32 secret bytes (RFC 8032 seed).
    pub fn from_secret(secret: &[u8; 32]) -> Self {
        Self { key: Secret::Ed25519(Box::new(SigningKey::from_bytes(secret))) }
    }

    /// Which kind of key this is.
    pub fn key_type(&self) -> KeyType {
        match self.key {
            Secret::Ed25519(_) => KeyType::Ed25519,
            Secret::Arweave(_) => KeyType::Arweave,
        }
    }

    /// The raw public key as ANS-104 carries it (the owner): 32 bytes for ed25519, the
    /// 512-byte modulus `n` for Arweave.
    pub fn public_key(&self) -> Vec<u8> {
        match &self.key {
            Secret::Ed25519(k) => k.verifying_key().to_bytes().to_vec(),
            Secret::Arweave(k) => k.owner().to_vec(),
        }
    }

    /// base64url(sha256(public key)): the address the AO units give this key (for Arweave
    /// wallets, the wallet's Arweave address).
    pub fn address(&self) -> String {
        address_of(&self.public_key())
    }

    fn to_jwk(&self) -> Zeroizing<String> {
        let text = match &self.key {
            Secret::Ed25519(k) => serde_json::to_string_pretty(&Ed25519Jwk {
                kty: "OKP".into(),
                crv: "Ed25519".into(),
                d: b64::encode(k.as_bytes()),
                x: b64::encode(&self.public_key()),
            }),
            Secret::Arweave(k) => serde_json::to_string_pretty(&k.to_jwk()),
        };
        Zeroizing::new(text.expect("jwk serializes") + "\n")
    }

    /// A key from the text of its JWK; `path` only names it in errors.
    pub fn from_jwk(path: &Path, text: &str) -> Result<Self, KeyError> {
        let format = |reason: String| KeyError::Format { path: path.to_owned(), reason };
        #[derive(Deserialize)]
        struct Kind {
            kty: String,
        }
        let kind: Kind = serde_json::from_str(text).map_err(|e| format(e.to_string()))?;
        match kind.kty.as_str() {
            "OKP" => {}
            "RSA" => {
                let jwk: RsaJwk = serde_json::from_str(text).map_err(|e| format(e.to_string()))?;
                return Ok(Self { key: Secret::Arweave(Box::new(RsaKey::from_jwk(&jwk).map_err(format)?)) });
            }
            other => return Err(format(format!("kty {other:?}, expected OKP (Ed25519) or RSA (Arweave)"))),
        }
        let jwk: Ed25519Jwk = serde_json::from_str(text).map_err(|e| format(e.to_string()))?;
        if jwk.crv != "Ed25519" {
            return Err(format(format!("kty \"OKP\" crv {:?}, expected Ed25519", jwk.crv)));
        }
        let d = Zeroizing::new(b64::decode(&jwk.d).map_err(|_| format("d is not base64url".into()))?);
        let secret: [u8; 32] = d.as_slice().try_into().map_err(|_| format(format!("d is {} bytes, expected 32", d.len())))?;
        let pair = Self::from_secret(&secret);
        if b64::encode(&pair.public_key()) != jwk.x {
            return Err(format("x does not match the public key of d".into()));
        }
        Ok(pair)
    }

    /// Writes a new key file with mode 0600. Refuses to overwrite an existing file.
    pub fn write_new(&self, path: &Path) -> Result<(), KeyError> {
        let io = |source| KeyError::Io { path: path.to_owned(), source };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::create_dir_all(dir).map_err(io)?;
        }
        let mut file = match OpenOptions::new().write(true).create_new(true).mode(0o600).open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Err(KeyError::Exists { path: path.to_owned() }),
            Err(e) => return Err(io(e)),
        };
        // create_new honours the umask; make sure the mode is exactly 0600 whatever it was.
        let written = file
            .set_permissions(fs::Permissions::from_mode(0o600))
            .and_then(|()| file.write_all(self.to_jwk().as_bytes()))
            .and_then(|()| file.sync_all());
        if let Err(e) = written {
            // Leave no empty or partial key behind: it would block the next keygen.
            let _ = fs::remove_file(path);
            return Err(io(e));
        }
        Ok(())
    }

    /// Loads a key file, refusing one that group or others can read.
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let meta = match fs::metadata(path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(KeyError::Missing { path: path.to_owned() }),
            Err(source) => return Err(KeyError::Io { path: path.to_owned(), source }),
        };
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(KeyError::TooOpen { path: path.to_owned(), mode });
        }
        let text = Zeroizing::new(fs::read_to_string(path).map_err(|source| KeyError::Io { path: path.to_owned(), source })?);
        Self::from_jwk(path, &text)
    }

    /// Loads the key file, or creates an ed25519 one when absent (devnet and first start).
    pub fn load_or_create(path: &Path) -> Result<Self, KeyError> {
        Self::load_or_create_type(path, KeyType::Ed25519)
    }

    /// Loads the key file (of whatever type it holds), or creates one of `key_type` when absent.
    pub fn load_or_create_type(path: &Path, key_type: KeyType) -> Result<Self, KeyError> {
        match Self::load(path) {
            Err(KeyError::Missing { .. }) => {
                let pair = Self::generate_type(key_type)?;
                pair.write_new(path)?;
                Ok(pair)
            }
            other => other,
        }
    }
}

impl Signer for Keypair {
    fn signature_type(&self) -> SignatureType {
        match self.key {
            Secret::Ed25519(_) => SignatureType::Ed25519,
            Secret::Arweave(_) => SignatureType::Arweave,
        }
    }

    fn owner(&self) -> Vec<u8> {
        self.public_key()
    }

    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, Ans104Error> {
        match &self.key {
            Secret::Ed25519(k) => Ok(k.sign(message).to_bytes().to_vec()),
            Secret::Arweave(k) => k.sign(message).map_err(Ans104Error::Signing),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::Digest as _;

    #[test]
    fn keygen_writes_0600_and_refuses_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/worker.key");
        let pair = Keypair::generate().unwrap();
        pair.write_new(&path).unwrap();
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let again = Keypair::generate().unwrap().write_new(&path);
        assert!(matches!(again, Err(KeyError::Exists { .. })), "{again:?}");
        let loaded = Keypair::load(&path).unwrap();
        assert_eq!(loaded.public_key(), pair.public_key());
    }

    #[test]
    fn load_refuses_group_or_other_readable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.json");
        Keypair::generate().unwrap().write_new(&path).unwrap();
        for mode in [0o640, 0o604, 0o644] {
            fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
            let err = Keypair::load(&path).unwrap_err();
            let msg = err.to_string();
            assert!(matches!(err, KeyError::TooOpen { .. }), "{msg}");
            assert!(msg.contains("chmod 600"), "{msg}");
        }
        fs::set_permissions(&path, fs::Permissions::from_mode(0o400)).unwrap();
        Keypair::load(&path).unwrap();
    }

    #[test]
    fn rejects_mismatched_public_key_and_junk() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.json");
        let a = Keypair::from_secret(&[1; 32]);
        let b = Keypair::from_secret(&[2; 32]);
        let Secret::Ed25519(a_key) = &a.key else { unreachable!() };
        let text =
            format!(r#"{{"kty":"OKP","crv":"Ed25519","d":"{}","x":"{}"}}"#, b64::encode(a_key.as_bytes()), b64::encode(&b.public_key()));
        fs::write(&path, text).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        assert!(matches!(Keypair::load(&path), Err(KeyError::Format { .. })));
        fs::write(&path, "not json").unwrap();
        assert!(matches!(Keypair::load(&path), Err(KeyError::Format { .. })));
        assert!(matches!(Keypair::load(&dir.path().join("none")), Err(KeyError::Missing { .. })));
    }

    #[test]
    fn rfc8032_test1_address() {
        let secret: [u8; 32] = hex::decode("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60").unwrap().try_into().unwrap();
        let pair = Keypair::from_secret(&secret);
        assert_eq!(hex::encode(pair.public_key()), "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a");
        assert_eq!(pair.address(), address_of(&pair.public_key()));
    }

    const TEST_WALLET: &str = include_str!("../../tests/keys/arweave-test-wallet.json");

    #[test]
    fn arweave_wallet_loads_with_the_same_file_rules() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wallet.json");
        let wallet = Keypair::from_jwk(&path, TEST_WALLET).unwrap();
        assert_eq!(wallet.key_type(), KeyType::Arweave);
        assert_eq!(wallet.signature_type(), SignatureType::Arweave);
        let jwk: serde_json::Value = serde_json::from_str(TEST_WALLET).unwrap();
        let n = b64::decode(jwk["n"].as_str().unwrap()).unwrap();
        assert_eq!(wallet.public_key(), n);
        assert_eq!(wallet.address(), b64::encode(&sha2::Sha256::digest(&n)), "address = base64url(sha256(n))");
        wallet.write_new(&path).unwrap();
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(matches!(wallet.write_new(&path), Err(KeyError::Exists { .. })));
        assert_eq!(Keypair::load(&path).unwrap().address(), wallet.address());
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let err = Keypair::load(&path).unwrap_err();
        assert!(matches!(err, KeyError::TooOpen { .. }) && err.to_string().contains("chmod 600"), "{err}");
        assert!(matches!(Keypair::from_jwk(&path, r#"{"kty":"EC","crv":"P-256"}"#), Err(KeyError::Format { .. })));
        let half = TEST_WALLET.replace("\"qi\"", "\"qj\"");
        assert!(matches!(Keypair::from_jwk(&path, &half), Err(KeyError::Format { .. })));
    }

    #[test]
    fn generated_arweave_key_is_rsa_4096_and_signs_type_1() {
        let key = Keypair::generate_arweave().unwrap();
        assert_eq!(key.public_key().len(), 512);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wallet.json");
        key.write_new(&path).unwrap();
        let loaded = Keypair::load(&path).unwrap();
        assert_eq!(loaded.key_type(), KeyType::Arweave);
        assert_eq!(loaded.public_key(), key.public_key());
        let item = crate::protocol::DataItemBuilder::new().tag("Type", "Message").data("x").sign(&loaded).unwrap();
        assert_eq!(item.signature_type, SignatureType::Arweave);
        item.verify().unwrap();
    }
}

//! The worker's ed25519 identity: generation, the key file (a JWK, RFC 8037), permission
//! checks, and signing. The only module that holds secret key bytes.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use ed25519_dalek::{Signer as _, SigningKey};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::protocol::ans104::address_of;
use crate::protocol::{SignatureType, Signer, b64};

/// Why a key could not be created or loaded. Each message says how to fix it.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("key file {path} already exists; refusing to overwrite it (move it away first)")]
    Exists { path: PathBuf },
    #[error("key file {path} is readable by group or others (mode {mode:04o}); fix with: chmod 600 {path}")]
    TooOpen { path: PathBuf, mode: u32 },
    #[error("key file {path} not found; create one with: ao-gpu-worker keygen --out {path}")]
    Missing { path: PathBuf },
    #[error("key file {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("key file {path} is not an Ed25519 JWK: {reason}")]
    Format { path: PathBuf, reason: String },
    #[error("no system randomness: {0}")]
    Random(String),
}

#[derive(Serialize, Deserialize)]
struct Jwk {
    kty: String,
    crv: String,
    /// Secret key, base64url.
    d: String,
    /// Public key, base64url.
    x: String,
}

/// An ed25519 key pair. Secret bytes are zeroed on drop.
pub struct Keypair {
    key: SigningKey,
}

impl std::fmt::Debug for Keypair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keypair").field("address", &self.address()).finish_non_exhaustive()
    }
}

impl Keypair {
    /// A fresh key from the operating system's randomness.
    pub fn generate() -> Result<Self, KeyError> {
        let mut secret = Zeroizing::new([0u8; 32]);
        getrandom::fill(secret.as_mut()).map_err(|e| KeyError::Random(e.to_string()))?;
        Ok(Self::from_secret(&secret))
    }

    /// A key from its 32 secret bytes (RFC 8032 seed).
    pub fn from_secret(secret: &[u8; 32]) -> Self {
        Self { key: SigningKey::from_bytes(secret) }
    }

    /// The raw 32-byte public key.
    pub fn public_key(&self) -> [u8; 32] {
        self.key.verifying_key().to_bytes()
    }

    /// base64url(sha256(public key)): the address the legacy AO units give this key.
    pub fn address(&self) -> String {
        address_of(&self.public_key())
    }

    fn to_jwk(&self) -> Zeroizing<String> {
        let jwk = Jwk { kty: "OKP".into(), crv: "Ed25519".into(), d: b64::encode(self.key.as_bytes()), x: b64::encode(&self.public_key()) };
        Zeroizing::new(serde_json::to_string_pretty(&jwk).expect("jwk serializes") + "\n")
    }

    fn from_jwk(path: &Path, text: &str) -> Result<Self, KeyError> {
        let format = |reason: String| KeyError::Format { path: path.to_owned(), reason };
        let jwk: Jwk = serde_json::from_str(text).map_err(|e| format(e.to_string()))?;
        if jwk.kty != "OKP" || jwk.crv != "Ed25519" {
            return Err(format(format!("kty {:?} crv {:?}, expected OKP / Ed25519", jwk.kty, jwk.crv)));
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

    /// Loads the key file, or creates it when absent (devnet and first start).
    pub fn load_or_create(path: &Path) -> Result<Self, KeyError> {
        match Self::load(path) {
            Err(KeyError::Missing { .. }) => {
                let pair = Self::generate()?;
                pair.write_new(path)?;
                Ok(pair)
            }
            other => other,
        }
    }
}

impl Signer for Keypair {
    fn signature_type(&self) -> SignatureType {
        SignatureType::Ed25519
    }

    fn owner(&self) -> Vec<u8> {
        self.public_key().to_vec()
    }

    fn sign(&self, message: &[u8]) -> Vec<u8> {
        self.key.sign(message).to_bytes().to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let text =
            format!(r#"{{"kty":"OKP","crv":"Ed25519","d":"{}","x":"{}"}}"#, b64::encode(a.key.as_bytes()), b64::encode(&b.public_key()));
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
}

//! The Arweave half of the worker's identity: an RSA-4096 key kept as an Arweave JWK wallet
//! (RFC 7517 `kty: RSA` with `n, e, d, p, q, dp, dq, qi`, as arweave-js writes it), and
//! ANS-104 signature type 1: RSA-PSS with SHA-256 and MGF1-SHA-256 over the deep hash, salt
//! length 478 (the largest a 4096-bit key allows), which is what arweave-js (and so arbundles'
//! `ArweaveSigner`) and the deployed scheduler unit produce (docs/ao-protocol.md §1.2).
//!
//! Contract: the owner of an item is the 512-byte big-endian modulus `n` (e = 65537 is implied);
//! the address is base64url(sha256(n)). RSA-PSS is randomized: the same message signed twice
//! gives two signatures and therefore two item ids, so callers sign once and keep the bytes.
//! Verification accepts any salt length (auto-detected), as arweave-js does, since other
//! signers (HyperBEAM) use 32.

use rsa::traits::{PrivateKeyParts, PublicKeyParts};
use rsa::{BoxedUint, PrivateKey, pss::Pss};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::protocol::b64;
use crate::protocol::rsa_pss::{MODULUS_BITS, MODULUS_BYTES, PUBLIC_EXPONENT, SALT_LEN};

/// An Arweave JWK wallet as arweave-js writes it. Unknown members (`ext`, `kid`, ...) are ignored.
#[derive(Serialize, Deserialize)]
pub(super) struct RsaJwk {
    pub kty: String,
    pub n: String,
    pub e: String,
    pub d: String,
    pub p: String,
    pub q: String,
    pub dp: String,
    pub dq: String,
    pub qi: String,
}

/// An RSA-4096 private key with its 512-byte owner (modulus) precomputed.
pub(super) struct RsaKey {
    key: PrivateKey,
    owner: Vec<u8>,
}

impl RsaKey {
    /// A fresh 4096-bit key (e = 65537) from the operating system's randomness. Slow: seconds
    /// in a release build, up to a minute in a debug build.
    pub fn generate() -> Result<Self, String> {
        let key = PrivateKey::new(&mut getrandom::SysRng, MODULUS_BITS).map_err(|e| format!("RSA key generation failed: {e}"))?;
        Self::from_key(key)
    }

    fn from_key(key: PrivateKey) -> Result<Self, String> {
        if key.e() != &BoxedUint::from(PUBLIC_EXPONENT) {
            return Err(format!("public exponent is not {PUBLIC_EXPONENT} (Arweave wallets use AQAB)"));
        }
        let n = key.n_bytes();
        if n.len() != MODULUS_BYTES || key.n().bit_width() as usize != MODULUS_BITS {
            return Err(format!("modulus is {} bits; Arweave wallets are RSA-{MODULUS_BITS}", key.n().bit_width()));
        }
        Ok(Self { owner: n.to_vec(), key })
    }

    /// The key of a parsed JWK: checks that the parts are consistent (n = p·q, d, CRT values).
    pub fn from_jwk(jwk: &RsaJwk) -> Result<Self, String> {
        let part = |name: &str, text: &str| -> Result<BoxedUint, String> {
            let bytes = Zeroizing::new(b64::decode(text).map_err(|_| format!("{name} is not base64url"))?);
            if bytes.is_empty() {
                return Err(format!("{name} is empty"));
            }
            Ok(BoxedUint::from_be_slice_vartime(&bytes))
        };
        let (n, e, d) = (part("n", &jwk.n)?, part("e", &jwk.e)?, part("d", &jwk.d)?);
        let (p, q) = (part("p", &jwk.p)?, part("q", &jwk.q)?);
        let key = PrivateKey::from_components(n, e, d, vec![p, q]).map_err(|e| format!("inconsistent RSA key: {e}"))?;
        let this = Self::from_key(key)?;
        // dp, dq and qi are redundant; a wallet whose copies disagree is corrupt.
        let expected = this.to_jwk();
        for (name, got, want) in [("dp", &jwk.dp, &expected.dp), ("dq", &jwk.dq, &expected.dq), ("qi", &jwk.qi, &expected.qi)] {
            let got = b64::decode(got).map_err(|_| format!("{name} is not base64url"))?;
            let want = b64::decode(want).expect("own encoding");
            if strip_zeros(&got) != strip_zeros(&want) {
                return Err(format!("{name} does not match p, q and d"));
            }
        }
        Ok(this)
    }

    /// The JWK arweave-js would write for this key (big-endian values without leading zeros).
    pub fn to_jwk(&self) -> RsaJwk {
        let enc = |v: &BoxedUint| b64::encode(&v.to_be_bytes_trimmed_vartime());
        let primes = self.key.primes();
        let none = || BoxedUint::zero();
        RsaJwk {
            kty: "RSA".into(),
            n: b64::encode(&self.owner),
            e: enc(self.key.e()),
            d: enc(self.key.d()),
            p: enc(primes[0].as_ref()),
            q: enc(primes[1].as_ref()),
            dp: enc(self.key.dp().cloned().as_ref().unwrap_or(&none())),
            dq: enc(self.key.dq().cloned().as_ref().unwrap_or(&none())),
            qi: enc(&self.key.crt_coefficient().unwrap_or_else(none)),
        }
    }

    /// The 512-byte modulus: the ANS-104 owner.
    pub fn owner(&self) -> &[u8] {
        &self.owner
    }

    /// RSA-PSS (SHA-256, MGF1-SHA-256, salt 478) over `message`; 512 bytes.
    pub fn sign(&self, message: &[u8]) -> Result<Vec<u8>, String> {
        let hash = Sha256::digest(message);
        self.key
            .sign_with_rng(&mut getrandom::SysRng, Pss::<Sha256>::new_with_salt(SALT_LEN), &hash)
            .map_err(|e| format!("RSA-PSS signing failed: {e}"))
    }
}

fn strip_zeros(bytes: &[u8]) -> &[u8] {
    let start = bytes.iter().position(|&b| b != 0).unwrap_or(bytes.len());
    &bytes[start..]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::rsa_pss::verify;

    /// The committed throwaway test wallet (tests/keys/README.md).
    const TEST_WALLET: &str = include_str!("../../tests/keys/arweave-test-wallet.json");

    fn test_key() -> RsaKey {
        RsaKey::from_jwk(&serde_json::from_str(TEST_WALLET).unwrap()).unwrap()
    }

    #[test]
    fn signs_pss_salt_478_randomized_and_verifies() {
        let key = test_key();
        assert_eq!(key.owner().len(), 512);
        let message = [7u8; 48];
        let a = key.sign(&message).unwrap();
        let b = key.sign(&message).unwrap();
        assert_eq!((a.len(), b.len()), (512, 512));
        assert_ne!(a, b, "RSA-PSS with a random salt never repeats");
        verify(key.owner(), &a, &message).unwrap();
        verify(key.owner(), &b, &message).unwrap();
        let public = rsa::PublicKey::new(BoxedUint::from_be_slice_vartime(key.owner()), BoxedUint::from(PUBLIC_EXPONENT)).unwrap();
        public.verify(Pss::<Sha256>::new_with_salt(SALT_LEN), &Sha256::digest(message), &a).unwrap();
    }

    #[test]
    fn jwk_round_trips_and_matches_the_wallet() {
        let key = test_key();
        let written = serde_json::to_value(key.to_jwk()).unwrap();
        let original: serde_json::Value = serde_json::from_str(TEST_WALLET).unwrap();
        assert_eq!(written, original, "the JWK written is the wallet read, member for member");
    }

    #[test]
    fn refuses_inconsistent_or_foreign_wallets() {
        let good: serde_json::Value = serde_json::from_str(TEST_WALLET).unwrap();
        let other = b64::encode(&[5u8; 256]);
        for (field, value) in
            [("dp", other.clone()), ("qi", other.clone()), ("p", other.clone()), ("d", other), ("e", "Aw".to_owned()), ("n", "!!".into())]
        {
            let mut jwk = good.clone();
            jwk[field] = serde_json::Value::String(value);
            let parsed: RsaJwk = serde_json::from_value(jwk).unwrap();
            let err = RsaKey::from_jwk(&parsed).err().unwrap_or_else(|| panic!("{field} tampered, still accepted"));
            assert!(!err.is_empty());
        }
    }
}

//! ANS-104 signature type 1 (Arweave): RSA-PSS with SHA-256 and MGF1-SHA-256 over the deep
//! hash, under a 4096-bit modulus carried as the 512-byte owner with e = 65537 implied
//! (docs/ao-protocol.md §1.2). Signers differ on the salt length (arweave-js and the deployed
//! scheduler use 478, HyperBEAM 32), so verification detects it, as arweave-js does.

use rsa::{BoxedUint, PublicKey, pss::Pss};
use sha2::{Digest, Sha256};

/// Modulus size of an Arweave wallet, in bits and in bytes (the ANS-104 owner length).
pub const MODULUS_BITS: usize = 4096;
pub const MODULUS_BYTES: usize = MODULUS_BITS / 8;
/// The only public exponent Arweave uses (the owner field does not carry it).
pub const PUBLIC_EXPONENT: u64 = 65537;
/// Salt length arweave-js signs with: Node's default, the maximum, 512 − 32 − 2.
pub const SALT_LEN: usize = MODULUS_BYTES - 32 - 2;

/// Why an RSA-PSS signature was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RsaVerifyError {
    /// The owner is not a 4096-bit modulus.
    Owner,
    /// The signature does not verify under the owner.
    Signature,
}

/// Verifies a type-1 signature: `owner` is the 512-byte modulus, e = 65537, any salt length.
pub fn verify(owner: &[u8], signature: &[u8], message: &[u8]) -> Result<(), RsaVerifyError> {
    if owner.len() != MODULUS_BYTES || owner[0] == 0 {
        return Err(RsaVerifyError::Owner);
    }
    if signature.len() != MODULUS_BYTES {
        return Err(RsaVerifyError::Signature);
    }
    let n = BoxedUint::from_be_slice_vartime(owner);
    let key = PublicKey::new(n, BoxedUint::from(PUBLIC_EXPONENT)).map_err(|_| RsaVerifyError::Owner)?;
    let scheme = Pss::<Sha256> { blinded: false, digest: Sha256::new(), salt_len: None };
    key.verify(scheme, &Sha256::digest(message), signature).map_err(|_| RsaVerifyError::Signature)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{DataItem, b64};

    fn vector(name: &str) -> Vec<u8> {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/vectors").join(name);
        b64::decode(std::fs::read_to_string(&path).unwrap().trim()).unwrap()
    }

    #[test]
    fn deployed_scheduler_items_verify_with_salt_478() {
        for name in ["su_rsa_message.b64", "su_rsa_assignment.b64", "su_rsa_process.b64"] {
            let item = DataItem::parse(&vector(name)).unwrap();
            let message = item.signature_data();
            verify(&item.owner, &item.signature, &message).unwrap_or_else(|e| panic!("{name}: {e:?}"));
            // The salt is really 478 (a fixed-salt-32 verifier would refuse these items).
            let key = PublicKey::new(BoxedUint::from_be_slice_vartime(&item.owner), BoxedUint::from(PUBLIC_EXPONENT)).unwrap();
            let hash = Sha256::digest(message);
            key.verify(Pss::<Sha256>::new_with_salt(SALT_LEN), &hash, &item.signature).unwrap();
            assert!(key.verify(Pss::<Sha256>::new_with_salt(32), &hash, &item.signature).is_err(), "{name}");
        }
    }

    #[test]
    fn tampered_items_do_not_verify() {
        let item = DataItem::parse(&vector("su_rsa_message.b64")).unwrap();
        let message = item.signature_data();
        let mut sig = item.signature.clone();
        sig[100] ^= 1;
        assert_eq!(verify(&item.owner, &sig, &message), Err(RsaVerifyError::Signature));
        let mut other = message;
        other[0] ^= 1;
        assert_eq!(verify(&item.owner, &item.signature, &other), Err(RsaVerifyError::Signature));
        let mut owner = item.owner.clone();
        owner[511] ^= 2; // still odd, another modulus
        assert_eq!(verify(&owner, &item.signature, &message), Err(RsaVerifyError::Signature));
        assert_eq!(verify(&item.owner[..511], &item.signature, &message), Err(RsaVerifyError::Owner));
        assert_eq!(verify(&[0; 512], &item.signature, &message), Err(RsaVerifyError::Owner));
        assert_eq!(verify(&item.owner, &item.signature[..64], &message), Err(RsaVerifyError::Signature));
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_owners_and_signatures_never_panic(
            owner in proptest::collection::vec(proptest::prelude::any::<u8>(), 512),
            signature in proptest::collection::vec(proptest::prelude::any::<u8>(), 512),
            odd_and_full in proptest::prelude::any::<bool>(),
        ) {
            let mut owner = owner;
            if odd_and_full {
                owner[0] |= 0x80;
                owner[511] |= 1;
            }
            proptest::prop_assert!(verify(&owner, &signature, &[1; 48]).is_err());
        }
    }
}

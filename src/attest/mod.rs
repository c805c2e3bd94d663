//! Identity and signing: the worker's key (ed25519 or an Arweave RSA-4096 wallet) and result
//! attestations.
//!
//! Invariant: only [`keys`] and [`arweave`] hold secret key bytes; everything else signs through
//! [`keys::Keypair`] as a [`crate::protocol::Signer`].

pub mod arweave;
pub mod attestation;
pub mod keys;
pub mod trace;

pub use keys::{KeyError, KeyType, Keypair};

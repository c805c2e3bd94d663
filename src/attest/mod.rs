//! Identity and signing: the worker's ed25519 key and, later, result attestations.
//!
//! Invariant: only [`keys`] holds secret key bytes; everything else signs through
//! [`keys::Keypair`] as a [`crate::protocol::Signer`].

pub mod attestation;
pub mod keys;

pub use keys::{KeyError, Keypair};

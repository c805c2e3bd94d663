//! ao-gpu-worker library.

pub mod attest;
pub mod protocol;

//! ao-gpu-worker library.

pub mod advertise;
pub mod api;
pub mod attest;
pub mod capacity;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod devnet;
pub mod httpd;
pub mod journal;
pub mod logging;
pub mod metrics;
pub mod net;
pub mod protocol;

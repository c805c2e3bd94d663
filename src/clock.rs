//! Wall-clock time as the worker records it: milliseconds since the Unix epoch.
//!
//! One function, used by every subsystem that stamps something (advertisements, manifests, bench
//! reports, the devnet's units); it knows nothing of any of them.

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch; 0 when the system clock is before it.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

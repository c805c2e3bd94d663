//! Wall-clock deadlines for wasm: a thread per engine advances its epoch every [`EPOCH_TICK`];
//! a store's deadline is a number of ticks.

use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::Duration;

use wasmtime::Engine;

/// How often the epoch advances; deadlines are rounded up to whole ticks, plus one.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);

/// The ticks a store may run for `deadline`.
pub fn ticks(deadline: Duration) -> u64 {
    u64::try_from(deadline.as_nanos().div_ceil(EPOCH_TICK.as_nanos())).unwrap_or(u64::MAX).saturating_add(1)
}

/// A thread named `name` that advances the engine's epoch every [`EPOCH_TICK`] until the
/// returned sender is dropped (or the engine is gone).
pub fn start_ticker(engine: &Engine, name: &str) -> Result<mpsc::Sender<()>, String> {
    let (tx, rx) = mpsc::channel::<()>();
    let weak = engine.weak();
    std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            while let Err(RecvTimeoutError::Timeout) = rx.recv_timeout(EPOCH_TICK) {
                match weak.upgrade() {
                    Some(engine) => engine.increment_epoch(),
                    None => break,
                }
            }
        })
        .map_err(|e| format!("cannot start the epoch thread: {e}"))?;
    Ok(tx)
}

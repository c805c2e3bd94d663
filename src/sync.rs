//! Poison-tolerant locking, said once. Imports nothing of the crate (every floor may use it).

use std::sync::{Mutex, MutexGuard, PoisonError};

/// Locks `m`, surviving poisoning. Every critical section in this crate either completes its
/// update or makes none (a panic inside one is a bug that the panicking call already reported),
/// so the next caller can go on rather than turn one failed request into a wedged worker.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

//! The per-evaluation `ao_gpu` state: the handle table (each handle a backend tensor with its
//! meta, or a pinned constant), the device-memory quota and handle limit, the pinned constants,
//! and the deadline bookkeeping. Dropping it frees every tensor still live and releases every
//! constant, whether the evaluation succeeded or failed.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, MutexGuard, TryLockError};
use std::time::{Duration, Instant};

use super::MAX_HANDLES;
use super::abi::{Fail, GpuStatus};
use super::constants::{ConstantCache, ConstantKey, Pin};
use crate::attest::trace::{Leaf, Trace};
use crate::gpu::pool::{SharedDevice, lock};
use crate::gpu::{Backend, Meta, TensorId};
use crate::runtime::fault::Fault;

/// One live handle of an evaluation.
#[derive(Debug)]
pub(super) struct Live {
    pub(super) id: TensorId,
    pub(super) meta: Meta,
    /// Storage bytes: what the quota counts (0 for constants, which are not counted).
    pub(super) bytes: u64,
    /// Set for a constant: the handle is read-only and its tensor belongs to the cache.
    pub(super) pin: Option<Pin>,
}

impl Live {
    pub(super) fn stored(&self) -> u64 {
        match &self.pin {
            Some(p) => p.bytes(),
            None => self.bytes,
        }
    }
}

/// The runtime's side of `ao_gpu`: what every evaluation's [`GpuCtx`] is made from.
#[derive(Debug, Clone)]
pub(crate) struct GpuEnv {
    pub backend: SharedDevice,
    pub max_device_memory: u64,
    pub constants: Option<Arc<ConstantCache>>,
}

/// The per-evaluation `ao_gpu` state: the handle table and the quota. Dropping it frees every tensor
/// still live and releases every constant.
pub struct GpuCtx {
    pub(super) backend: SharedDevice,
    pub(super) constants: Option<Arc<ConstantCache>>,
    pub(super) live: BTreeMap<u32, Live>,
    pub(super) next_handle: u32,
    pub(super) used_bytes: u64,
    pub(super) max_bytes: u64,
    /// Constants this evaluation holds handles to: key -> (handles, bytes).
    pub(super) pinned: HashMap<ConstantKey, (u32, u64)>,
    pub(super) pinned_bytes: u64,
    /// Why the evaluation cannot complete for a reason outside the actor (see `unavailable`).
    pub(super) unavailable: Option<String>,
    /// When the evaluation started, its wall-clock deadline, and the time spent waiting for
    /// constants (which does not count against the deadline).
    pub(super) started: Instant,
    pub(super) deadline: Option<Duration>,
    pub(super) excluded: Duration,
    /// The instance's memory 0, once a call has looked it up.
    pub(super) memory: Option<wasmtime::Memory>,
    /// One leaf per host call so far.
    pub(super) trace: Vec<Leaf>,
    /// The fault injected into this evaluation, until it has struck (read only in test and debug
    /// builds).
    #[cfg_attr(not(debug_assertions), allow(dead_code))]
    fault: Option<Fault>,
}

impl std::fmt::Debug for GpuCtx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuCtx").field("live", &self.live.len()).field("used_bytes", &self.used_bytes).finish_non_exhaustive()
    }
}

impl GpuCtx {
    pub fn new(backend: SharedDevice, max_bytes: u64) -> Self {
        Self {
            backend,
            constants: None,
            live: BTreeMap::new(),
            next_handle: 1,
            used_bytes: 0,
            max_bytes,
            pinned: HashMap::new(),
            pinned_bytes: 0,
            unavailable: None,
            started: Instant::now(),
            deadline: None,
            excluded: Duration::ZERO,
            memory: None,
            trace: Vec::new(),
            fault: None,
        }
    }

    /// A context for one evaluation of a runtime whose deadline is `deadline`.
    /// `fault`: a test's injected fault for this evaluation (`runtime::fault`).
    pub(crate) fn for_evaluation(env: &GpuEnv, deadline: Duration, fault: Option<Fault>) -> Self {
        let mut ctx = Self::new(env.backend.clone(), env.max_device_memory);
        ctx.constants = env.constants.clone();
        ctx.deadline = Some(deadline);
        ctx.fault = fault;
        ctx
    }

    /// The trace of the calls so far (taken: the context keeps none).
    pub fn take_trace(&mut self) -> Trace {
        Trace { leaves: std::mem::take(&mut self.trace) }
    }

    /// Whether the injected fault strikes the current call (the next leaf), running `op`; it
    /// strikes once.
    #[cfg(debug_assertions)]
    pub(super) fn strike(&mut self, op: &str) -> bool {
        let index = self.trace.len();
        if self.fault.as_ref().is_some_and(|f| f.strikes(index, op)) {
            tracing::warn!(index, op, "injected fault: this call returns a wrong value");
            self.fault = None;
            return true;
        }
        false
    }

    /// Set when a call could not complete for a reason outside the actor (a constant's source is
    /// unreachable): the evaluation must not be recorded, only retried.
    pub fn unavailable(&self) -> Option<&str> {
        self.unavailable.as_deref()
    }

    /// Frees every live tensor and releases every constant.
    pub fn release(&mut self) {
        if self.live.is_empty() {
            return;
        }
        let live = std::mem::take(&mut self.live);
        self.used_bytes = 0;
        self.pinned.clear();
        self.pinned_bytes = 0;
        let (owned, constants): (Vec<Live>, Vec<Live>) = live.into_values().partition(|t| t.pin.is_none());
        // Releasing a pin may evict (which locks the backend): never with the backend locked.
        drop(constants);
        let mut backend = lock(&self.backend);
        for t in owned {
            if let Err(e) = backend.free(t.id) {
                tracing::warn!(tensor = %t.id, error = %e, "cannot free an evaluation's tensor");
            }
        }
    }

    pub(super) fn get(&self, handle: i32) -> Result<&Live, Fail> {
        u32::try_from(handle).ok().and_then(|h| self.live.get(&h)).ok_or(Fail::Status(GpuStatus::UnknownHandle))
    }

    /// Whether a new tensor of `bytes` fits the quota and the handle limit.
    pub(super) fn admit(&self, bytes: u64) -> Result<(), Fail> {
        if self.live.len() >= MAX_HANDLES || self.used_bytes.saturating_add(bytes) > self.max_bytes {
            return Err(Fail::Status(GpuStatus::QuotaExceeded));
        }
        Ok(())
    }

    pub(super) fn insert(&mut self, id: TensorId, meta: Meta, bytes: u64, pin: Option<Pin>) -> u32 {
        let handle = self.next_handle;
        self.next_handle += 1;
        match &pin {
            Some(p) => {
                let entry = self.pinned.entry(p.key().clone()).or_insert((0, p.bytes()));
                if entry.0 == 0 {
                    self.pinned_bytes = self.pinned_bytes.saturating_add(p.bytes());
                }
                entry.0 += 1;
            }
            None => self.used_bytes = self.used_bytes.saturating_add(bytes),
        }
        self.live.insert(handle, Live { id, meta, bytes, pin });
        handle
    }

    /// Removes a handle from the table and gives back its quota; the caller frees the tensor (or
    /// drops the pin) outside the backend lock.
    pub(super) fn remove(&mut self, handle: i32) -> Result<Live, Fail> {
        let t = u32::try_from(handle).ok().and_then(|h| self.live.remove(&h)).ok_or(Fail::Status(GpuStatus::UnknownHandle))?;
        match &t.pin {
            Some(p) => {
                if let Some(entry) = self.pinned.get_mut(p.key()) {
                    entry.0 = entry.0.saturating_sub(1);
                    if entry.0 == 0 {
                        self.pinned_bytes = self.pinned_bytes.saturating_sub(entry.1);
                        self.pinned.remove(p.key());
                    }
                }
            }
            None => self.used_bytes = self.used_bytes.saturating_sub(t.bytes),
        }
        Ok(t)
    }

    /// When the deadline passes (moved by the time spent waiting for constants); `None` without one.
    pub(super) fn deadline_at(&self) -> Option<Instant> {
        self.deadline.map(|d| self.started + self.excluded + d)
    }

    /// Whether the deadline has passed.
    pub(super) fn expired(&self) -> bool {
        self.deadline_at().is_some_and(|at| Instant::now() >= at)
    }

    /// The epoch ticks left before the deadline, not counting time spent waiting for constants.
    pub(super) fn ticks_left(&self) -> Option<u64> {
        let deadline = self.deadline?;
        let spent = self.started.elapsed().saturating_sub(self.excluded);
        let left = deadline.saturating_sub(spent);
        Some(left.as_nanos().div_ceil(crate::runtime::EPOCH_TICK.as_nanos()) as u64 + 1)
    }
}

impl Drop for GpuCtx {
    fn drop(&mut self) {
        self.release();
    }
}

/// Locks `device`, waiting at most until `until`: an evaluation never waits for the device (held
/// by another evaluation's command) past its own deadline. A poisoned lock is taken as
/// [`crate::sync::lock`] takes it.
pub(super) fn lock_before(device: &SharedDevice, until: Option<Instant>) -> Result<MutexGuard<'_, Backend>, Fail> {
    let Some(until) = until else { return Ok(lock(device)) };
    loop {
        match device.try_lock() {
            Ok(guard) => return Ok(guard),
            Err(TryLockError::Poisoned(p)) => return Ok(p.into_inner()),
            Err(TryLockError::WouldBlock) if Instant::now() >= until => return Err(Fail::Deadline),
            Err(TryLockError::WouldBlock) => std::thread::sleep(LOCK_RETRY),
        }
    }
}

/// How often a locked device is tried again by [`lock_before`].
const LOCK_RETRY: Duration = Duration::from_micros(250);

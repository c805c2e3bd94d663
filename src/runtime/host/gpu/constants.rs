//! Constants loaded by content for `ao_gpu.constant`: tensors whose bytes are the data of an
//! Arweave item (named by its id and the sha256 of its data), fetched once through a
//! [`ConstantSource`], verified, uploaded once and shared by every evaluation and every actor
//! of the runtimes given the same [`ConstantCache`].
//!
//! Invariants:
//! * an entry is keyed by (item id, sha256, dtype, shape): the same item under another dtype or
//!   shape is another device tensor;
//! * an entry is pinned while some evaluation holds a handle to it and is never evicted then;
//!   unpinned entries are evicted least recently used first whenever the resident bytes would
//!   exceed the cap. When pins of other evaluations leave no room, a new entry is still admitted
//!   (the cap is exceeded until those evaluations end): refusing would make one actor's result
//!   depend on what other actors run at the same time. A single evaluation can never pin more
//!   than the cap (the host refuses with `QUOTA_EXCEEDED`, deterministically);
//! * one fetch per key at a time: concurrent evaluations asking for the same constant wait for
//!   the first one's load instead of fetching again;
//! * locks: the cache's state lock and the backend lock are never held together;
//! * a cache lives on one device: a runtime with several devices has one cache per device, all
//!   fed by the same source and reporting into the same [`ConstantMetrics`] (whose gauges are
//!   the sums over those caches), each under its own cap.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use sha2::{Digest, Sha256};

use crate::gpu::pool::{SharedDevice, lock};
use crate::gpu::{DType, GpuError, RawTensor, TensorId};

/// Default cap on the bytes of cached constants (`gpu.max_constant_memory`).
pub const DEFAULT_MAX_CONSTANT_MEMORY: u64 = 1 << 30;

/// Why a [`ConstantSource`] could not deliver an item's data.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SourceError {
    /// The item does not exist. The actor named it, so the actor gets `AO_GPU_NOT_FOUND`.
    #[error("item not found")]
    NotFound,
    /// Unreachable, too slow, or an answer that does not verify: not the actor's fault. The
    /// evaluation ends without a result and the work loop evaluates the message again later.
    #[error("{0}")]
    Unavailable(String),
}

/// Where constants come from: the worker's gateway client in production.
///
/// Implementations must return only data proven to be the item's (for an ANS-104 item: its
/// signed fields and data rebuild to `id` and the signature verifies), and `Unavailable` for
/// anything they cannot prove: the host blames a digest mismatch on the actor.
pub trait ConstantSource: Send + Sync + 'static {
    /// The data of item `id` (43-character base64url). Called without any lock held; it may
    /// block for as long as the source's own timeouts allow (that time does not count against
    /// the evaluation's deadline).
    fn fetch(&self, id: &str) -> Result<Vec<u8>, SourceError>;
}

/// Prometheus metrics of one or several [`ConstantCache`]s (see [`ConstantCache::with_metrics`]),
/// registered by [`ConstantMetrics::register`].
#[derive(Debug, Clone, Default)]
pub struct ConstantMetrics {
    /// `constant` calls served from the cache (including those that waited for another's load).
    pub hits: Counter,
    /// `constant` calls that fetched the item.
    pub misses: Counter,
    /// Entries evicted to stay under the cap.
    pub evictions: Counter,
    /// Bytes of resident constants.
    pub bytes: Gauge,
    /// Resident constants.
    pub entries: Gauge,
}

/// A snapshot of one cache, for tests and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConstantStats {
    pub entries: u64,
    pub bytes: u64,
    pub hits: u64,
    pub misses: u64,
    pub evictions: u64,
}

/// What identifies a cached constant.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct ConstantKey {
    /// The item id, decoded.
    pub id: [u8; 32],
    pub sha256: [u8; 32],
    pub dtype: DType,
    pub shape: Vec<usize>,
}

#[derive(Debug)]
struct Entry {
    tensor: TensorId,
    bytes: u64,
    pins: u64,
    last_used: u64,
}

#[derive(Debug, Default)]
struct State {
    entries: HashMap<ConstantKey, Entry>,
    loading: HashSet<ConstantKey>,
    /// Resident bytes plus the bytes reserved by loads in flight.
    bytes: u64,
    clock: u64,
    /// This cache's own counts (the metrics may be shared with other caches).
    hits: u64,
    misses: u64,
    evictions: u64,
    /// What this cache has added to the shared `bytes` and `entries` gauges.
    reported_bytes: i64,
    reported_entries: i64,
}

/// Device tensors of verified constants, shared across evaluations, actors and runtimes. All
/// its tensors live on one backend: a runtime may only use a cache made for its own backend.
pub struct ConstantCache {
    backend: SharedDevice,
    source: Arc<dyn ConstantSource>,
    max_bytes: u64,
    state: Mutex<State>,
    loaded: Condvar,
    metrics: ConstantMetrics,
}

impl std::fmt::Debug for ConstantCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConstantCache").field("max_bytes", &self.max_bytes).field("stats", &self.stats()).finish_non_exhaustive()
    }
}

/// Why [`ConstantCache::acquire`] gave no tensor.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum AcquireError {
    /// The item does not exist (the actor named it).
    NotFound,
    /// The item's data does not have the sha256 the actor named.
    Mismatch,
    /// The data does not fit the dtype and shape the actor named, or the device refused it.
    Tensor(GpuError),
    /// The source failed: not the actor's fault; the evaluation must be retried later.
    Unavailable(String),
}

/// A pinned constant: the entry stays resident until every pin is dropped.
pub(crate) struct Pin {
    cache: Arc<ConstantCache>,
    key: ConstantKey,
    tensor: TensorId,
    bytes: u64,
}

impl std::fmt::Debug for Pin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pin").field("tensor", &self.tensor).field("bytes", &self.bytes).finish()
    }
}

impl Pin {
    pub fn tensor(&self) -> TensorId {
        self.tensor
    }

    pub fn key(&self) -> &ConstantKey {
        &self.key
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

impl Drop for Pin {
    fn drop(&mut self) {
        self.cache.unpin(&self.key);
    }
}

/// Clears a key's loading flag however the load ends, and wakes the waiters.
struct Loading<'a> {
    cache: &'a ConstantCache,
    key: &'a ConstantKey,
}

impl Drop for Loading<'_> {
    fn drop(&mut self) {
        let mut state = self.cache.lock_state();
        state.loading.remove(self.key);
        drop(state);
        self.cache.loaded.notify_all();
    }
}

impl ConstantCache {
    /// A cache of at most `max_bytes` (beyond pinned entries, see the module doc) of constants
    /// on `backend`, fetched from `source`.
    pub fn new(backend: SharedDevice, source: Arc<dyn ConstantSource>, max_bytes: u64) -> Arc<Self> {
        Self::with_metrics(backend, source, max_bytes, ConstantMetrics::default())
    }

    /// As [`ConstantCache::new`], reporting into `metrics` (shared with the caches of the other
    /// devices of a pool: counters add up, gauges are sums).
    pub fn with_metrics(backend: SharedDevice, source: Arc<dyn ConstantSource>, max_bytes: u64, metrics: ConstantMetrics) -> Arc<Self> {
        Arc::new(Self { backend, source, max_bytes, state: Mutex::new(State::default()), loaded: Condvar::new(), metrics })
    }

    pub fn backend(&self) -> &SharedDevice {
        &self.backend
    }

    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    /// The metrics to register (clones share the same values; possibly shared with other caches).
    pub fn metrics(&self) -> &ConstantMetrics {
        &self.metrics
    }

    pub fn stats(&self) -> ConstantStats {
        let state = self.lock_state();
        ConstantStats {
            entries: state.entries.len() as u64,
            bytes: state.entries.values().map(|e| e.bytes).sum(),
            hits: state.hits,
            misses: state.misses,
            evictions: state.evictions,
        }
    }

    /// Brings the shared gauges up to date with this cache's state, by difference.
    fn report(&self, state: &mut State) {
        let bytes = i64::try_from(state.bytes).unwrap_or(i64::MAX);
        let entries = i64::try_from(state.entries.len()).unwrap_or(i64::MAX);
        self.metrics.bytes.inc_by(bytes.saturating_sub(state.reported_bytes));
        self.metrics.entries.inc_by(entries.saturating_sub(state.reported_entries));
        (state.reported_bytes, state.reported_entries) = (bytes, entries);
    }

    fn lock_state(&self) -> MutexGuard<'_, State> {
        // Every update of the state is completed before the lock is released.
        crate::sync::lock(&self.state)
    }

    /// The constant `key` (`bytes` long in storage, already checked against its dtype and
    /// shape), pinned; fetched, verified and uploaded when it is not resident. Also returns how
    /// long the call waited on the source or on another evaluation's load.
    pub(crate) fn acquire(self: &Arc<Self>, key: ConstantKey, bytes: u64) -> Result<(Pin, Duration), AcquireError> {
        let started = Instant::now();
        let mut waited = false;
        let mut state = self.lock_state();
        loop {
            state.clock += 1;
            let now = state.clock;
            if let Some(e) = state.entries.get_mut(&key) {
                e.pins += 1;
                e.last_used = now;
                let tensor = e.tensor;
                state.hits += 1;
                drop(state);
                self.metrics.hits.inc();
                let pin = Pin { cache: self.clone(), key, tensor, bytes };
                return Ok((pin, if waited { started.elapsed() } else { Duration::ZERO }));
            }
            if !state.loading.contains(&key) {
                break;
            }
            waited = true;
            state = self.loaded.wait(state).unwrap_or_else(|poisoned| poisoned.into_inner());
        }
        state.loading.insert(key.clone());
        state.misses += 1;
        drop(state);
        let loading = Loading { cache: self, key: &key };
        self.metrics.misses.inc();
        let tensor = self.load(&key, bytes);
        let waited = started.elapsed();
        let tensor = tensor?;
        let mut state = self.lock_state();
        state.clock += 1;
        let last_used = state.clock;
        state.entries.insert(key.clone(), Entry { tensor, bytes, pins: 1, last_used });
        self.report(&mut state);
        drop(state);
        drop(loading);
        Ok((Pin { cache: self.clone(), key, tensor, bytes }, waited))
    }

    /// Fetches, verifies, makes room and uploads. On success the bytes stay reserved in
    /// `state.bytes` for the new entry.
    fn load(&self, key: &ConstantKey, bytes: u64) -> Result<TensorId, AcquireError> {
        let id = crate::protocol::b64::encode(&key.id);
        let data = match self.source.fetch(&id) {
            Ok(data) => data,
            Err(SourceError::NotFound) => return Err(AcquireError::NotFound),
            Err(SourceError::Unavailable(reason)) => return Err(AcquireError::Unavailable(format!("constant {id}: {reason}"))),
        };
        let digest: [u8; 32] = Sha256::digest(&data).into();
        if digest != key.sha256 {
            tracing::info!(item = %id, "constant refused: its data does not have the sha256 the actor named");
            return Err(AcquireError::Mismatch);
        }
        // The right item under a dtype and shape of another size.
        let raw = RawTensor::new(key.dtype, key.shape.clone(), data).map_err(AcquireError::Tensor)?;
        self.reserve(bytes);
        let uploaded = lock(&self.backend).upload_raw(&raw);
        match uploaded {
            Ok(tensor) => Ok(tensor),
            Err(e) => {
                let mut state = self.lock_state();
                state.bytes = state.bytes.saturating_sub(bytes);
                self.report(&mut state);
                Err(AcquireError::Tensor(e))
            }
        }
    }

    /// Evicts unpinned entries until `bytes` more fit under the cap (or nothing unpinned is
    /// left), then reserves them.
    fn reserve(&self, bytes: u64) {
        let mut state = self.lock_state();
        let evicted = self.evict(&mut state, bytes);
        state.bytes = state.bytes.saturating_add(bytes);
        self.report(&mut state);
        drop(state);
        self.free(evicted);
    }

    fn unpin(&self, key: &ConstantKey) {
        let mut state = self.lock_state();
        state.clock += 1;
        let now = state.clock;
        if let Some(e) = state.entries.get_mut(key) {
            e.pins = e.pins.saturating_sub(1);
            e.last_used = now;
        }
        let evicted = if state.bytes > self.max_bytes { self.evict(&mut state, 0) } else { Vec::new() };
        drop(state);
        self.free(evicted);
    }

    /// Removes least recently used unpinned entries until `extra` more bytes fit under the cap.
    fn evict(&self, state: &mut State, extra: u64) -> Vec<TensorId> {
        let mut evicted = Vec::new();
        while state.bytes.saturating_add(extra) > self.max_bytes {
            let victim = state.entries.iter().filter(|(_, e)| e.pins == 0).min_by_key(|(_, e)| e.last_used).map(|(k, _)| k.clone());
            let Some(key) = victim else { break };
            if let Some(e) = state.entries.remove(&key) {
                state.bytes = state.bytes.saturating_sub(e.bytes);
                evicted.push(e.tensor);
            }
        }
        if !evicted.is_empty() {
            state.evictions += evicted.len() as u64;
            self.metrics.evictions.inc_by(evicted.len() as u64);
            self.report(state);
        }
        evicted
    }

    fn free(&self, tensors: Vec<TensorId>) {
        if tensors.is_empty() {
            return;
        }
        let mut backend = lock(&self.backend);
        for t in tensors {
            if let Err(e) = backend.free(t) {
                tracing::warn!(tensor = %t, error = %e, "cannot free an evicted constant");
            }
        }
    }
}

impl Drop for ConstantCache {
    fn drop(&mut self) {
        // No pin can be alive (each holds an Arc of the cache): free every resident tensor, and
        // take this cache's share out of the (possibly shared) gauges.
        let mut state = self.lock_state();
        let entries = std::mem::take(&mut state.entries);
        state.bytes = 0;
        self.report(&mut state);
        drop(state);
        self.free(entries.into_values().map(|e| e.tensor).collect());
    }
}

// ---- metrics registration ----------------------------------------------------------------------

impl ConstantMetrics {
    /// Registers the constant cache's metrics (`gpu_constant_*`).
    pub fn register(&self, registry: &mut prometheus_client::registry::Registry) {
        registry.register("gpu_constant_hits", "ao_gpu.constant calls served from the constant cache", self.hits.clone());
        registry.register("gpu_constant_misses", "ao_gpu.constant calls that fetched the item from the gateway", self.misses.clone());
        registry.register("gpu_constant_evictions", "Constants evicted to stay under gpu.max_constant_memory", self.evictions.clone());
        registry.register("gpu_constant_bytes", "Bytes of constants resident on the tensor devices", self.bytes.clone());
        registry.register(
            "gpu_constant_entries",
            "Constants resident on the tensor devices (one per device holding it)",
            self.entries.clone(),
        );
    }
}

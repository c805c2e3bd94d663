//! Admission control for the evaluations that do not come from the schedule: `POST /dry-run`
//! and `GET /state` (which may rebuild a memory image). The contract:
//!
//! * at most `concurrency` of them run at once; up to `queue` more wait, first come first
//!   served, for at most `queue_timeout`; beyond that a request is refused at once with
//!   [`Refused`] (the API answers 503 with `Retry-After`);
//! * they share a memory budget: each reserves what it will hold (the state image and the
//!   instance's linear memory, see [`estimate`], plus the device quota of an actor that imports
//!   `ao_gpu`) before it starts, and waits (in the queue) while the budget is spent; one larger
//!   than the whole budget runs alone;
//! * a request whose client goes away leaves the queue (its future is dropped) and gives back
//!   what it held; its [`Ticket`] also carries a [`CancellationToken`] that is cancelled then, which
//!   the evaluation checks before it starts;
//! * scheduled evaluations never pass through here: they have their own concurrency
//!   (`jobs.max_concurrent`) and are never queued behind API traffic.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::{CancellationToken, DropGuard};

/// The memory budget is kept in units of this many bytes.
const UNIT: u64 = 1 << 20;

/// The settings (`[overload]` `api_*` keys).
#[derive(Debug, Clone, PartialEq)]
pub struct AdmissionConfig {
    pub concurrency: usize,
    pub queue: usize,
    pub queue_timeout: Duration,
    pub memory_budget: u64,
    pub retry_after: Duration,
}

/// Why a request was not admitted; the API answers 503 with `Retry-After`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("overloaded: {running} evaluations running and {queued} waiting (overload.api_queue = {queued}); retry later")]
    QueueFull { running: usize, queued: usize },
    #[error(
        "overloaded: waited {waited:?} (overload.api_queue_timeout) for a slot or for {needed_mib} MiB of the {budget_mib} MiB budget; retry later"
    )]
    Waited { waited: Duration, needed_mib: u64, budget_mib: u64 },
}

/// The metrics of admission control.
#[derive(Clone, Default)]
pub struct AdmissionMetrics {
    pub running: Gauge,
    pub queued: Gauge,
    pub reserved_bytes: Gauge,
    pub refused: Family<Vec<(&'static str, &'static str)>, Counter>,
}

impl AdmissionMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register("api_evaluations_running", "Dry-runs and state reads running", self.running.clone());
        registry.register("api_evaluations_queued", "Dry-runs and state reads waiting for admission", self.queued.clone());
        registry.register(
            "api_memory_reserved_bytes",
            "Memory reserved by running dry-runs and state reads (state and linear memory)",
            self.reserved_bytes.clone(),
        );
        registry.register("api_refused", "Dry-runs and state reads refused with 503 (reason: queue_full, waited)", self.refused.clone());
    }
}

/// What an admitted request holds until it is dropped.
pub struct Ticket {
    _slot: OwnedSemaphorePermit,
    _memory: OwnedSemaphorePermit,
    bytes: u64,
    metrics: AdmissionMetrics,
    /// Cancelled when the ticket is dropped (the request's future went away).
    cancel: CancellationToken,
    _guard: DropGuard,
}

impl Ticket {
    /// A token cancelled once this ticket is dropped: blocking work started for the request
    /// checks it before it starts, so a request whose client left does not run.
    pub fn cancelled(&self) -> CancellationToken {
        self.cancel.clone()
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.metrics.running.dec();
        self.metrics.reserved_bytes.dec_by(self.bytes as i64);
    }
}

/// Counts a waiting request in the queue until dropped.
struct Waiting<'a>(&'a Admission);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::SeqCst);
        self.0.metrics.queued.dec();
    }
}

/// The admission controller shared by the API's handlers.
pub struct Admission {
    config: AdmissionConfig,
    slots: Arc<Semaphore>,
    memory: Arc<Semaphore>,
    memory_units: u32,
    waiting: AtomicUsize,
    pub metrics: AdmissionMetrics,
}

impl Admission {
    pub fn new(config: AdmissionConfig) -> Self {
        let memory_units = (config.memory_budget / UNIT).clamp(1, u64::from(u32::MAX >> 3)) as u32;
        Self {
            slots: Arc::new(Semaphore::new(config.concurrency.max(1))),
            memory: Arc::new(Semaphore::new(memory_units as usize)),
            memory_units,
            waiting: AtomicUsize::new(0),
            metrics: AdmissionMetrics::default(),
            config,
        }
    }

    pub fn config(&self) -> &AdmissionConfig {
        &self.config
    }

    /// The `Retry-After` of a refusal, in whole seconds (at least 1).
    pub fn retry_after_secs(&self) -> u64 {
        self.config.retry_after.as_secs().max(1)
    }

    /// Admits a request that will hold about `bytes` of memory: at once when a slot and the
    /// memory are free, else after waiting in the queue; refused when the queue is full or the
    /// wait passes `queue_timeout`.
    pub async fn admit(&self, bytes: u64) -> Result<Ticket, Refused> {
        let units = (bytes.div_ceil(UNIT)).clamp(1, u64::from(self.memory_units)) as u32;
        if let (Ok(slot), true) = (self.slots.clone().try_acquire_owned(), self.waiting.load(Ordering::SeqCst) == 0) {
            if let Ok(memory) = self.memory.clone().try_acquire_many_owned(units) {
                return Ok(self.ticket(slot, memory, bytes));
            }
            drop(slot);
        }
        let queued = self.waiting.fetch_add(1, Ordering::SeqCst);
        self.metrics.queued.inc();
        let waiting = Waiting(self);
        if queued >= self.config.queue {
            drop(waiting);
            self.metrics.refused.get_or_create(&vec![("reason", "queue_full")]).inc();
            return Err(Refused::QueueFull { running: self.running(), queued });
        }
        let acquire = async {
            let slot = self.slots.clone().acquire_owned().await.expect("the slots semaphore is never closed");
            let memory = self.memory.clone().acquire_many_owned(units).await.expect("the memory semaphore is never closed");
            (slot, memory)
        };
        let admitted = tokio::time::timeout(self.config.queue_timeout, acquire).await;
        drop(waiting);
        match admitted {
            Ok((slot, memory)) => Ok(self.ticket(slot, memory, bytes)),
            Err(_) => {
                self.metrics.refused.get_or_create(&vec![("reason", "waited")]).inc();
                Err(Refused::Waited {
                    waited: self.config.queue_timeout,
                    needed_mib: u64::from(units),
                    budget_mib: u64::from(self.memory_units),
                })
            }
        }
    }

    /// Requests admitted and running now.
    pub fn running(&self) -> usize {
        self.config.concurrency.max(1) - self.slots.available_permits()
    }

    /// Requests waiting in the queue now.
    pub fn queued(&self) -> usize {
        self.waiting.load(Ordering::SeqCst)
    }

    fn ticket(&self, slot: OwnedSemaphorePermit, memory: OwnedSemaphorePermit, bytes: u64) -> Ticket {
        self.metrics.running.inc();
        self.metrics.reserved_bytes.inc_by(bytes as i64);
        let cancel = CancellationToken::new();
        let guard = cancel.clone().drop_guard();
        Ticket { _slot: slot, _memory: memory, bytes, metrics: self.metrics.clone(), cancel, _guard: guard }
    }
}

/// What a dry-run or a state read of a process whose memory is `state_bytes` holds: the state
/// image read from the journal and the instance's linear memory it is copied into.
pub fn estimate(state_bytes: u64) -> u64 {
    state_bytes.saturating_mul(2)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admission(concurrency: usize, queue: usize, budget_mib: u64) -> Admission {
        Admission::new(AdmissionConfig {
            concurrency,
            queue,
            queue_timeout: Duration::from_millis(300),
            memory_budget: budget_mib << 20,
            retry_after: Duration::from_secs(2),
        })
    }

    #[tokio::test]
    async fn beyond_the_slots_and_the_queue_requests_are_refused() {
        let a = admission(1, 1, 1024);
        let first = a.admit(1 << 20).await.unwrap();
        assert_eq!(a.running(), 1);
        // The second waits in the queue; the third finds the queue full.
        let second = a.admit(1 << 20);
        tokio::pin!(second);
        assert!(futures_poll_once(second.as_mut()).await.is_none(), "the second request waits");
        assert_eq!(a.queued(), 1);
        match a.admit(1 << 20).await {
            Err(Refused::QueueFull { running: 1, queued: 1 }) => {}
            other => panic!("expected a full queue, got {:?}", other.map(|_| ())),
        }
        drop(first);
        let second = second.await.unwrap();
        assert_eq!((a.running(), a.queued()), (1, 0));
        // A queued request that waits too long is refused.
        match a.admit(1 << 20).await {
            Err(Refused::Waited { .. }) => {}
            other => panic!("expected a timeout, got {:?}", other.map(|_| ())),
        }
        drop(second);
        assert_eq!((a.running(), a.queued()), (0, 0));
        assert_eq!(a.retry_after_secs(), 2);
    }

    #[tokio::test]
    async fn the_memory_budget_bounds_what_runs_and_a_huge_request_runs_alone() {
        let a = admission(8, 8, 100);
        let big = a.admit(60 << 20).await.unwrap();
        // 60 + 60 > 100: the second waits, then times out while the first holds its memory.
        assert!(matches!(a.admit(60 << 20).await, Err(Refused::Waited { needed_mib: 60, budget_mib: 100, .. })));
        let small = a.admit(30 << 20).await.unwrap();
        drop((big, small));
        // Larger than the whole budget: admitted when nothing else runs.
        let huge = a.admit(500 << 20).await.unwrap();
        assert!(a.admit(1).await.is_err(), "nothing else runs beside a request that takes the whole budget");
        drop(huge);
        assert!(a.admit(1).await.is_ok());
    }

    #[tokio::test]
    async fn a_dropped_request_leaves_the_queue_and_its_ticket_cancels_its_work() {
        let a = admission(1, 1, 1024);
        let first = a.admit(1).await.unwrap();
        let token = first.cancelled();
        {
            let waiter = a.admit(1);
            tokio::pin!(waiter);
            assert!(futures_poll_once(waiter.as_mut()).await.is_none());
            assert_eq!(a.queued(), 1);
        }
        assert_eq!(a.queued(), 0, "the client went away: its request left the queue");
        assert!(!token.is_cancelled());
        drop(first);
        assert!(token.is_cancelled(), "work of a dropped request is told to stop");
    }

    /// Polls `f` once: `Some` when it completed.
    async fn futures_poll_once<F: std::future::Future + Unpin>(f: F) -> Option<F::Output> {
        let mut f = f;
        std::future::poll_fn(|cx| match std::pin::Pin::new(&mut f).poll(cx) {
            std::task::Poll::Ready(v) => std::task::Poll::Ready(Some(v)),
            std::task::Poll::Pending => std::task::Poll::Ready(None),
        })
        .await
    }
}

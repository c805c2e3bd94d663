//! The state a running worker shares between its tasks and its HTTP API: its address, its
//! metrics, the work loop, and what it is doing ([`Status`]).
//!
//! It sits below both the daemon, which fills it, and the API, which reads it: neither imports
//! the other for it.

use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::watch;

use crate::admission::Admission;
use crate::advertise::Advertisement;
use crate::capacity::CapacityManifest;
use crate::jobs::{self, JobMetrics};
use crate::metrics::{DaemonMetrics, Metrics};

/// What the worker is doing, for the API and for callers that wait on it.
#[derive(Debug, Clone, Default)]
pub struct Status {
    pub ready: bool,
    pub manifest: Option<CapacityManifest>,
    pub last_advertisement: Option<Advertisement>,
    pub last_error: Option<String>,
}

/// The worker's metrics: the registry `/metrics` renders, and the handles of the metrics the
/// daemon and the work loop update.
pub struct WorkerMetrics {
    pub registry: Metrics,
    /// The daemon's advertisement and readiness gauges.
    pub daemon: DaemonMetrics,
    /// The work loop's metrics (shared with [`jobs::Context`]).
    pub jobs: Arc<JobMetrics>,
}

impl WorkerMetrics {
    /// OpenMetrics text exposition.
    pub fn render(&self) -> String {
        self.registry.render()
    }

    /// Prometheus text format 0.0.4.
    pub fn render_text(&self) -> String {
        self.registry.render_text()
    }
}

/// State shared by the daemon's tasks and its API.
pub struct WorkerState {
    pub address: String,
    pub metrics: WorkerMetrics,
    /// The work loop: journal, runtime and served processes, for the compute-unit API.
    pub jobs: Arc<jobs::Context>,
    /// Admission control of the API's dry-runs and state reads.
    pub admission: Arc<Admission>,
    status: Mutex<Status>,
    advertised: watch::Sender<Option<Advertisement>>,
}

impl WorkerState {
    /// The state of a worker that has not advertised yet: its status holds `manifest`;
    /// `advertised` is where accepted advertisements are published.
    pub fn new(
        address: String,
        metrics: WorkerMetrics,
        jobs: Arc<jobs::Context>,
        admission: Arc<Admission>,
        manifest: CapacityManifest,
        advertised: watch::Sender<Option<Advertisement>>,
    ) -> Self {
        Self { address, metrics, jobs, admission, status: Mutex::new(Status { manifest: Some(manifest), ..Status::default() }), advertised }
    }

    pub fn status(&self) -> MutexGuard<'_, Status> {
        crate::sync::lock(&self.status)
    }

    /// Follows the advertisements the messenger accepted.
    pub fn subscribe_advertised(&self) -> watch::Receiver<Option<Advertisement>> {
        self.advertised.subscribe()
    }

    /// Publishes an accepted advertisement to those following them.
    pub fn publish_advertised(&self, ad: Advertisement) {
        self.advertised.send_replace(Some(ad));
    }
}

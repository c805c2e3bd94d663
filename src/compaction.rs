//! The background compaction of the journal: every `retention.interval`, [`Journal::compact`]
//! runs on a blocking thread (never on the async executor), logs what it removed, and updates
//! `ao_worker_journal_bytes` (the journal file's size) and `ao_worker_journal_compacted_total`
//! (results deleted). A failed compaction is logged and retried at the next interval: it loses
//! nothing, since each batch is its own transaction.

use std::path::PathBuf;
use std::sync::Arc;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::RetentionSection;
use crate::journal::Journal;

/// The journal's size and what compaction removed.
#[derive(Clone, Default)]
pub struct CompactionMetrics {
    pub journal_bytes: Gauge,
    pub compacted: Counter,
}

impl CompactionMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register("journal_bytes", "Size of the journal file in bytes", m.journal_bytes.clone());
        registry.register("journal_compacted", "Result records deleted by journal compaction", m.compacted.clone());
        m
    }
}

/// Runs compaction every `retention.interval` (first after one interval) until `shutdown`.
pub fn spawn(
    journal: Journal,
    path: PathBuf,
    retention: RetentionSection,
    metrics: CompactionMetrics,
    shutdown: CancellationToken,
) -> JoinHandle<()> {
    let policy = Arc::new(retention.policy);
    tokio::spawn(async move {
        update_size(&path, &metrics);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(retention.interval) => {}
            }
            let (journal, policy) = (journal.clone(), policy.clone());
            let started = std::time::Instant::now();
            match tokio::task::spawn_blocking(move || journal.compact(crate::clock::now_ms(), &policy)).await {
                Ok(Ok(stats)) => {
                    metrics.compacted.inc_by(stats.results);
                    if stats.results > 0 {
                        tracing::info!(
                            results = stats.results,
                            items = stats.items,
                            processes = stats.processes,
                            batches = stats.batches,
                            ms = started.elapsed().as_millis() as u64,
                            "journal compacted"
                        );
                    }
                }
                Ok(Err(e)) => tracing::warn!(error = %e, "journal compaction failed; retried at the next interval"),
                Err(e) => tracing::error!(error = %e, "journal compaction panicked; retried at the next interval"),
            }
            update_size(&path, &metrics);
        }
    })
}

fn update_size(path: &std::path::Path, metrics: &CompactionMetrics) {
    if let Ok(m) = std::fs::metadata(path) {
        metrics.journal_bytes.set(i64::try_from(m.len()).unwrap_or(i64::MAX));
    }
}

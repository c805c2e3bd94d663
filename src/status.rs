//! What a running worker is doing, as one JSON object (`GET /status`, read by
//! `ao-gpu-worker status`): identity, the units it talks to, readiness and advertisement age,
//! the devices and their load, the processes it serves with how far each is behind its scheduler,
//! and the items the messenger refused for good.
//!
//! Contract: answers within about [`LAG_TIMEOUT`] whatever the scheduler does (a process whose
//! latest nonce cannot be read has `"lag": null` and the reason); reads only.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};

use crate::net::{Policy, SchedulerClient};
use crate::state::WorkerState;

/// How long the lag look-ups may take together.
pub const LAG_TIMEOUT: Duration = Duration::from_secs(3);
/// Most processes whose lag is looked up (the rest are listed without it).
pub const MAX_LAG_LOOKUPS: usize = 64;

/// The status object.
pub async fn snapshot(s: &Arc<WorkerState>) -> Value {
    let jobs = &s.jobs;
    let now = crate::clock::now_ms();
    let (ready, last_error, advertisement, backends) = {
        let st = s.status();
        let ad = st.last_advertisement.as_ref().map(|a| json!({"id": a.id, "at_ms": a.at_ms, "age_s": now.saturating_sub(a.at_ms) / 1000}));
        let backends = st.manifest.as_ref().map(|m| m.backends_summary());
        (st.ready, st.last_error.clone(), ad, backends)
    };
    let pool = jobs.runtime.pool();
    let loads = pool.loads();
    let devices: Vec<Value> = pool
        .infos()
        .iter()
        .map(|d| {
            let load = loads.get(d.index).copied().unwrap_or_default();
            json!({
                "index": d.index, "kind": d.kind.as_str(), "description": d.description,
                "in_flight": load.in_flight, "evaluations": load.evaluations,
                "live_bytes": load.live_bytes, "memory_bytes": d.memory_bytes,
            })
        })
        .collect();
    let halted = jobs.halted();
    let served = jobs.journal.served().unwrap_or_default();
    let su = SchedulerClient::new(
        jobs.scheduler.base(),
        Policy { request_timeout: LAG_TIMEOUT, connect_timeout: LAG_TIMEOUT, max_attempts: 1, ..Policy::default() },
    );
    let mut lookups = tokio::task::JoinSet::new();
    for (i, p) in served.iter().enumerate().take(MAX_LAG_LOOKUPS) {
        let (su, process) = (su.clone(), p.process.clone());
        lookups.spawn(async move { (i, su.latest(&process).await.map(|n| n.assignment.tag("Nonce").and_then(|t| t.parse::<u64>().ok()))) });
    }
    let mut latest: Vec<Option<Result<Option<u64>, String>>> = vec![None; served.len()];
    let _ = tokio::time::timeout(LAG_TIMEOUT + Duration::from_millis(500), async {
        while let Some(Ok((i, r))) = lookups.join_next().await {
            latest[i] = Some(r.map_err(|e| e.to_string()));
        }
    })
    .await;
    let processes: Vec<Value> = served
        .iter()
        .zip(latest)
        .map(|(p, latest)| {
            let done = jobs.journal.progress(&p.process).ok().flatten().map(|g| g.nonce);
            let (scheduler_nonce, lag, lag_error) = match latest {
                Some(Ok(Some(n))) => (Some(n), Some(n.saturating_sub(done.unwrap_or(0))), None),
                Some(Ok(None)) => (None, None, Some("the scheduler's latest assignment has no Nonce".to_owned())),
                Some(Err(e)) => (None, None, Some(e)),
                None => (None, None, Some("not looked up (timed out or too many processes)".to_owned())),
            };
            json!({
                "process": p.process, "assigned_by": p.assigned_by, "evaluated_nonce": done,
                "scheduler_nonce": scheduler_nonce, "lag": lag, "lag_error": lag_error,
                "halted": halted.get(&p.process),
            })
        })
        .collect();
    let m = &s.metrics.jobs;
    json!({
        "worker": {"address": s.address, "version": env!("CARGO_PKG_VERSION"), "backends": backends},
        "units": {
            "scheduler": jobs.scheduler.base(), "messenger": jobs.messenger.base(),
            "gateway": jobs.gateway.base(), "registry": jobs.registry,
        },
        "ready": ready,
        "last_error": last_error,
        "advertisement": advertisement,
        "devices": devices,
        "processes": processes,
        "outbox": {"pending": jobs.journal.pending_count().ok(), "refused": m.refused.get()},
        "at_ms": now,
    })
}

//! Posting from the journal: every pending item goes to the messenger until the messenger
//! accepts it (then it is confirmed) or refuses it for good (then it becomes a dead letter, with
//! the reason: see `journal::dead_letters`). Only the bytes signed once and journaled with the
//! result are ever posted, so a re-post after a crash has the same id and cannot duplicate, even
//! for an RSA worker whose signatures are randomized.
//!
//! No item holds up another process's items: each item that fails for a transient reason (the
//! messenger down, 5xx, 429, a timeout) waits its own exponential backoff (from the poll interval
//! up to `overload.poster_backoff_max`, with jitter) while the others are posted. Within one
//! process, items keep their order: a later item waits while an earlier one backs off. Processes
//! are posted concurrently, each in its own task.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::Context;
use crate::journal::Outgoing;
use crate::net::NetError;
use crate::protocol::DataItem;

/// Items posted per round.
const BATCH: usize = 64;
/// Pending ids scanned per round for the items that are due.
const SCAN: usize = 100_000;

/// An item's transient failures so far and when it may be tried again.
#[derive(Debug, Clone)]
struct Backoff {
    failures: u32,
    next: Instant,
    /// The item's process: its later items wait behind it.
    process: String,
}

/// What posting one item came to.
enum Posted {
    Confirmed,
    DeadLetter,
    Retry(String),
}

pub async fn run(ctx: Arc<Context>, shutdown: CancellationToken) {
    let mut backoffs: HashMap<String, Backoff> = HashMap::new();
    loop {
        let wait = match round(&ctx, &mut backoffs).await {
            Ok(true) => Duration::ZERO,
            Ok(false) => ctx.poll.min(Duration::from_millis(200)),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the outbox from the journal; posting paused");
                ctx.poll
            }
        };
        ctx.heartbeats.beat(super::health::Loop::Poster);
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// One round: the due items (oldest first, at most [`BATCH`]) posted, one task per process.
/// True when more items may be due at once.
async fn round(ctx: &Arc<Context>, backoffs: &mut HashMap<String, Backoff>) -> anyhow::Result<bool> {
    let journal = ctx.journal.clone();
    let (ids, dead) =
        tokio::task::spawn_blocking(move || -> anyhow::Result<_> { Ok((journal.pending_ids(SCAN)?, journal.dead_letter_count()?)) })
            .await??;
    ctx.metrics.dead_letters.set(dead as i64);
    let pending: HashSet<&String> = ids.iter().collect();
    backoffs.retain(|id, _| pending.contains(id));
    let now = Instant::now();
    let due: Vec<String> = ids.iter().filter(|id| backoffs.get(*id).is_none_or(|b| b.next <= now)).take(BATCH).cloned().collect();
    if due.is_empty() {
        return Ok(false);
    }
    let full = due.len() == BATCH;
    let journal = ctx.journal.clone();
    let items = tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<Outgoing>> {
        Ok(due.iter().filter_map(|id| journal.outgoing(id).transpose()).collect::<Result<_, _>>()?)
    })
    .await??;
    // Per process, in order; a process whose earlier item is backing off waits behind it.
    let blocked: HashSet<String> = backoffs.values().filter(|b| b.next > now).map(|b| b.process.clone()).collect();
    let mut by_process: HashMap<String, Vec<Outgoing>> = HashMap::new();
    for item in items {
        if !blocked.contains(&item.process) {
            by_process.entry(item.process.clone()).or_default().push(item);
        }
    }
    let mut tasks = tokio::task::JoinSet::new();
    for (_, items) in by_process {
        let ctx = ctx.clone();
        tasks.spawn(async move {
            let mut outcomes = Vec::new();
            for item in items {
                let outcome = post(&ctx, &item).await;
                let stop = matches!(outcome, Posted::Retry(_));
                outcomes.push((item.id.clone(), item.process.clone(), outcome));
                if stop {
                    break;
                }
            }
            outcomes
        });
    }
    let mut progressed = false;
    while let Some(done) = tasks.join_next().await {
        let Ok(outcomes) = done else { continue };
        for (id, process, outcome) in outcomes {
            match outcome {
                Posted::Confirmed | Posted::DeadLetter => {
                    backoffs.remove(&id);
                    progressed = true;
                }
                Posted::Retry(reason) => {
                    let b = backoffs.entry(id.clone()).or_insert(Backoff { failures: 0, next: now, process });
                    b.failures += 1;
                    let wait = backoff(ctx.poll, ctx.recovery.poster_backoff_max, b.failures);
                    b.next = Instant::now() + wait;
                    tracing::warn!(%id, failures = b.failures, retry_in = ?wait, %reason, "posting failed; this item backs off");
                }
            }
        }
    }
    Ok(full && progressed)
}

/// Posts one item and settles it in the journal.
async fn post(ctx: &Context, out: &Outgoing) -> Posted {
    let item = match DataItem::parse(&out.bytes) {
        Ok(item) => item,
        Err(e) => return dead_letter(ctx, out, format!("the journaled bytes are not a data item: {e}")).await,
    };
    match ctx.messenger.post_item(&item).await {
        Ok(_) => {
            let (journal, id) = (ctx.journal.clone(), out.id.clone());
            match tokio::task::spawn_blocking(move || journal.confirm(&id)).await {
                Ok(Ok(())) => {
                    ctx.metrics.posted.get_or_create(&[("kind", super::kind_label(out.kind))]).inc();
                    tracing::debug!(id = %out.id, kind = ?out.kind, "posted");
                    Posted::Confirmed
                }
                Ok(Err(e)) => Posted::Retry(format!("posted, but cannot confirm it in the journal: {e}")),
                Err(e) => Posted::Retry(format!("confirm task failed: {e}")),
            }
        }
        Err(NetError::Rejected { status, message, .. }) if permanent(status) => dead_letter(ctx, out, format!("{status}: {message}")).await,
        Err(e) => Posted::Retry(e.to_string()),
    }
}

async fn dead_letter(ctx: &Context, out: &Outgoing, reason: String) -> Posted {
    tracing::error!(id = %out.id, kind = ?out.kind, process = %out.process, %reason, "messenger refused an item for good; kept as a dead letter");
    let (journal, id, why) = (ctx.journal.clone(), out.id.clone(), reason.clone());
    match tokio::task::spawn_blocking(move || journal.dead_letter(&id, &why)).await {
        Ok(Ok(())) => {
            ctx.metrics.refused.inc();
            Posted::DeadLetter
        }
        Ok(Err(e)) => Posted::Retry(format!("cannot keep the dead letter ({reason}): {e}")),
        Err(e) => Posted::Retry(format!("dead-letter task failed: {e}")),
    }
}

/// A refusal retrying cannot change: a 4xx other than 408 (timeout), 425 (too early) and 429
/// (too many requests).
fn permanent(status: u16) -> bool {
    (400..500).contains(&status) && !matches!(status, 408 | 425 | 429)
}

/// The wait after an item's `failures`-th transient failure: `base` doubled each time, capped at
/// `max`, then a random 50–100 % of it (so items that failed together do not retry together).
fn backoff(base: Duration, max: Duration, failures: u32) -> Duration {
    let full = base.saturating_mul(1u32 << failures.saturating_sub(1).min(20)).min(max);
    full.mul_f64(0.5 + fastrand::f64() * 0.5)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_its_cap_with_jitter() {
        let (base, max) = (Duration::from_millis(100), Duration::from_secs(5));
        for failures in 1..40 {
            let full = base.saturating_mul(1 << (failures - 1).min(20)).min(max);
            let b = backoff(base, max, failures);
            assert!(b >= full / 2 && b <= full, "{failures}: {b:?} vs {full:?}");
        }
        assert!(permanent(400) && permanent(403) && permanent(413));
        assert!(!permanent(429) && !permanent(408) && !permanent(500) && !permanent(503));
    }
}

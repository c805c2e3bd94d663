//! Posting from the journal: every pending item goes to the messenger, oldest first, until
//! the messenger accepts it (then it is confirmed) or refuses it for good (then it is set
//! aside with the reason). Only the bytes signed once and journaled with the result are ever
//! posted, so a re-post after a crash has the same id and cannot duplicate, even for an RSA
//! worker whose signatures are randomized.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::Context;
use crate::net::NetError;
use crate::protocol::DataItem;

const BATCH: usize = 64;
const BACKOFF_MAX: Duration = Duration::from_secs(30);

pub async fn run(ctx: Arc<Context>, shutdown: CancellationToken) {
    let mut backoff = ctx.poll;
    loop {
        let wait = match drain(&ctx).await {
            Ok(true) => Duration::ZERO,
            Ok(false) => {
                backoff = ctx.poll;
                ctx.poll.min(Duration::from_millis(200))
            }
            Err(e) => {
                tracing::warn!(error = %e, "posting paused");
                backoff = (backoff * 2).min(BACKOFF_MAX);
                backoff
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// Posts one batch; true when there may be more.
async fn drain(ctx: &Context) -> anyhow::Result<bool> {
    let pending = ctx.journal.pending(BATCH)?;
    let more = pending.len() == BATCH;
    for out in pending {
        let item = DataItem::parse(&out.bytes)?;
        match ctx.messenger.post_item(&item).await {
            Ok(_) => {
                ctx.journal.confirm(&out.id)?;
                ctx.metrics.posted.get_or_create(&[("kind", super::kind_label(out.kind))]).inc();
                tracing::debug!(id = %out.id, kind = ?out.kind, "posted");
            }
            Err(NetError::Rejected { status, message, .. }) if (400..500).contains(&status) && status != 429 => {
                tracing::error!(id = %out.id, kind = ?out.kind, status, %message, "messenger refused an item; set aside");
                ctx.journal.refuse(&out.id, &format!("{status}: {message}"))?;
                ctx.metrics.refused.inc();
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(more)
}

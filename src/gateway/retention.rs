//! Retention (`gateway.store.retention`): a background task that removes events older than the
//! configured age, oldest first, in small batches (each one short write through the store's
//! writer, so ingest is never held up for long), and never an event that a webhook endpoint
//! has not yet delivered. `GET /v1/events` answers 410 for a cursor before what is kept.

use std::sync::Arc;
use std::time::Duration;

use super::monitor::{Beat, Liveness};
use super::store::Store;
use super::webhooks::Webhooks;

/// Events removed per write.
pub const BATCH: usize = 2_000;
/// Pause between passes once nothing old is left: a tenth of the retention, at most a minute
/// (configs keep at least an hour, so a minute; tests that keep nothing poll quickly).
pub fn idle(keep: Duration) -> Duration {
    (keep / 10).clamp(Duration::from_millis(100), Duration::from_secs(60))
}

pub fn start(store: Arc<Store>, webhooks: Arc<Webhooks>, keep: Duration, tasks: &Liveness) {
    let beat = tasks.register("retention", idle(keep) * 3 + Duration::from_secs(30));
    log::info!(target: "connection", "event=retention_started keep_s={}", keep.as_secs());
    actix::spawn(async move { run(store, webhooks, keep, beat).await });
}

async fn run(store: Arc<Store>, webhooks: Arc<Webhooks>, keep: Duration, beat: Beat) {
    let pause = idle(keep);
    loop {
        beat.beat();
        let removed = pass(&store, &webhooks, keep).await;
        match removed {
            // A full batch: more may be waiting; yield to other work, then go on.
            Ok(n) if n as usize >= BATCH => tokio::task::yield_now().await,
            Ok(_) => tokio::time::sleep(pause).await,
            Err(e) => {
                log::error!(target: "error", "event=retention_failed error={e}");
                tokio::time::sleep(pause).await;
            }
        }
    }
}

/// One batch: removes what is old enough and delivered everywhere; returns how many.
pub async fn pass(
    store: &Arc<Store>,
    webhooks: &Webhooks,
    keep: Duration,
) -> Result<u64, super::store::StoreError> {
    let now = crate::security::unix_now_ms() as i64;
    let cutoff = super::store::iso_from_millis(now - keep.as_millis() as i64);
    // Keep every event above the lowest webhook cursor (not yet delivered everywhere).
    let below = match webhooks.low_water().await? {
        Some(low) => low.saturating_add(1),
        None => u64::MAX / 2,
    };
    let p = store.prune(&cutoff, below, BATCH).await?;
    if p.events > 0 {
        log::info!(target: "message", "event=retention_pruned events={} pruned_through={} cutoff={cutoff}", p.events, p.pruned_through);
    }
    Ok(p.events)
}

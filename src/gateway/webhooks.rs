//! Webhooks to the main Web API: every durable clinic event (or those of the configured
//! entities) is POSTed to each configured endpoint, signed with HMAC-SHA256 over
//! `"{timestamp}.{body}"`, at least once, in event order per endpoint.
//!
//! One dispatcher task per endpoint reads the store's events after the endpoint's cursor (kept
//! in the store, moved only after a 2xx), retries a failed delivery with exponential backoff,
//! and after `max_attempts` moves the event to the endpoint's dead-letter list and goes on (one
//! poison event must not stop a clinic's stream). Dead letters are listed and replayed over
//! REST; `replay` moves the cursor back to re-deliver from an event id.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rusqlite::params;
use serde::Serialize;

use super::store::{Store, StoreError, StoredEvent};

/// Request headers of every delivery.
pub const SIGNATURE_HEADER: &str = "tether-signature";
pub const TIMESTAMP_HEADER: &str = "tether-timestamp";
pub const EVENT_ID_HEADER: &str = "tether-event-id";

/// One endpoint, as configured (`gateway.webhooks`).
#[derive(Clone)]
pub struct WebhookSettings {
    pub name: String,
    pub url: String,
    pub secret: Vec<u8>,
    /// Only these entities (all when empty).
    pub entities: Vec<String>,
    pub max_attempts: u32,
    pub timeout: Duration,
    /// First retry delay; doubles up to `backoff_max`.
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
}

impl std::fmt::Debug for WebhookSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookSettings")
            .field("name", &self.name)
            .field("url", &self.url)
            .field("secret", &"<hidden>")
            .field("entities", &self.entities)
            .finish()
    }
}

/// `hex(HMAC-SHA256(secret, "{timestamp}.{body}"))`, as sent in `Tether-Signature: v1=…`.
pub fn sign(secret: &[u8], timestamp: u64, body: &[u8]) -> String {
    use openssl::hash::MessageDigest;
    use openssl::pkey::PKey;
    use openssl::sign::Signer;
    let mac = PKey::hmac(secret)
        .and_then(|key| {
            let mut s = Signer::new(MessageDigest::sha256(), &key)?;
            s.update(timestamp.to_string().as_bytes())?;
            s.update(b".")?;
            s.update(body)?;
            s.sign_to_vec()
        })
        .unwrap_or_default();
    mac.iter().map(|b| format!("{b:02x}")).collect()
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS webhook_cursors (
    name TEXT PRIMARY KEY,
    last_event_id INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS webhook_dead_letters (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    event_id INTEGER NOT NULL,
    attempts INTEGER NOT NULL,
    last_error TEXT NOT NULL,
    failed_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    UNIQUE (name, event_id)
);
";

/// A delivery that gave up, waiting for a replay.
#[derive(Debug, Clone, Serialize)]
pub struct DeadLetter {
    pub id: u64,
    pub event_id: u64,
    pub attempts: u32,
    pub last_error: String,
    pub failed_at: String,
}

/// Live counters of one endpoint.
#[derive(Debug, Default)]
pub struct WebhookStats {
    pub delivered: AtomicU64,
    pub failures: AtomicU64,
    pub dead_lettered: AtomicU64,
    pub last_event_id: AtomicU64,
}

/// The dispatchers and their bookkeeping.
pub struct Webhooks {
    store: Arc<Store>,
    /// When this process started: the live counters count from then.
    pub since: String,
    pub endpoints: Vec<(WebhookSettings, Arc<WebhookStats>)>,
    /// Wakes the dispatchers when events were stored (they also poll every second).
    wake: Arc<tokio::sync::Notify>,
}

impl Webhooks {
    pub fn new(store: Arc<Store>, settings: Vec<WebhookSettings>) -> Result<Self, StoreError> {
        store.read(|c| c.execute_batch(SCHEMA))?;
        let endpoints = settings
            .into_iter()
            .map(|s| (s, Arc::new(WebhookStats::default())))
            .collect();
        Ok(Webhooks {
            store,
            since: super::store::iso_from_millis(crate::security::unix_now_ms() as i64),
            endpoints,
            wake: Arc::new(tokio::sync::Notify::new()),
        })
    }

    /// New events are durable: dispatchers look now rather than at their next poll.
    pub fn notify(&self) {
        self.wake.notify_waiters();
    }

    pub fn find(&self, name: &str) -> Option<&(WebhookSettings, Arc<WebhookStats>)> {
        self.endpoints.iter().find(|(s, _)| s.name == name)
    }

    pub fn cursor(&self, name: &str) -> Result<u64, StoreError> {
        cursor(&self.store, name)
    }

    /// Re-deliver everything from `event_id` on (the cursor moves back; at least once). An id
    /// past the newest stored event is refused: moving the cursor there would skip every event
    /// stored before the id is reached.
    pub fn replay_from(&self, name: &str, event_id: u64) -> Result<(), ReplayError> {
        let head: u64 = self
            .store
            .read(|c| {
                c.query_row("SELECT coalesce(max(id), 0) FROM events", [], |r| {
                    r.get::<_, i64>(0)
                })
            })
            .map_err(ReplayError::Store)? as u64;
        if event_id > head.max(1) {
            return Err(ReplayError::PastHead { head });
        }
        set_cursor(&self.store, name, event_id.saturating_sub(1)).map_err(ReplayError::Store)?;
        self.notify();
        Ok(())
    }

    pub fn dead_letters(
        &self,
        name: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, StoreError> {
        let name = name.to_string();
        self.store.read(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT id, event_id, attempts, last_error, failed_at FROM webhook_dead_letters \
                 WHERE name = ?1 AND id > ?2 ORDER BY id LIMIT ?3",
            )?;
            let rows = stmt.query_map(params![name, after as i64, limit as i64], |r| {
                Ok(DeadLetter {
                    id: r.get::<_, i64>(0)? as u64,
                    event_id: r.get::<_, i64>(1)? as u64,
                    attempts: r.get::<_, i64>(2)? as u32,
                    last_error: r.get(3)?,
                    failed_at: r.get(4)?,
                })
            })?;
            rows.collect()
        })
    }

    pub fn dead_letter_count(&self, name: &str) -> Result<u64, StoreError> {
        let name = name.to_string();
        self.store.read(move |c| {
            c.query_row(
                "SELECT count(*) FROM webhook_dead_letters WHERE name = ?1",
                params![name],
                |r| r.get::<_, i64>(0),
            )
            .map(|n| n as u64)
        })
    }

    /// Delivers one dead letter again now; on success it leaves the list.
    pub async fn replay_dead_letter(&self, name: &str, id: u64) -> Result<bool, ReplayError> {
        let (settings, stats) = self.find(name).ok_or(ReplayError::NoWebhook)?.clone();
        let n = name.to_string();
        let event_id: Option<i64> = self
            .store
            .read(move |c| {
                c.query_row(
                    "SELECT event_id FROM webhook_dead_letters WHERE name = ?1 AND id = ?2",
                    params![n, id as i64],
                    |r| r.get(0),
                )
                .map(Some)
                .or_else(|e| match e {
                    rusqlite::Error::QueryReturnedNoRows => Ok(None),
                    e => Err(e),
                })
            })
            .map_err(ReplayError::Store)?;
        let event_id = event_id.ok_or(ReplayError::NoDeadLetter)? as u64;
        let event = self
            .store
            .events_page(None, event_id.saturating_sub(1), 1)
            .map_err(ReplayError::Store)?
            .into_iter()
            .find(|e| e.id == event_id)
            .ok_or(ReplayError::NoDeadLetter)?;
        let client = client(&settings);
        match deliver(&client, &settings, &event).await {
            Ok(()) => {
                stats.delivered.fetch_add(1, Ordering::Relaxed);
                let n = name.to_string();
                self.store
                    .read(move |c| {
                        c.execute(
                            "DELETE FROM webhook_dead_letters WHERE name = ?1 AND id = ?2",
                            params![n, id as i64],
                        )
                    })
                    .map_err(ReplayError::Store)?;
                log::info!(target: "message", "webhook={name} event=dead_letter_replayed event_id={event_id}");
                Ok(true)
            }
            Err(e) => {
                stats.failures.fetch_add(1, Ordering::Relaxed);
                log::warn!(target: "error", "webhook={name} event=dead_letter_replay_failed event_id={event_id} error={e:?}");
                Ok(false)
            }
        }
    }

    /// Starts one dispatcher per endpoint (on the current actix system).
    pub fn start(self: &Arc<Self>) {
        for (settings, stats) in &self.endpoints {
            let me = self.clone();
            let (settings, stats) = (settings.clone(), stats.clone());
            actix::spawn(async move { me.dispatch(settings, stats).await });
        }
    }

    async fn dispatch(self: Arc<Self>, s: WebhookSettings, stats: Arc<WebhookStats>) {
        let client = client(&s);
        log::info!(target: "connection", "webhook={} event=dispatcher_started url={}", s.name, s.url);
        loop {
            let wake = self.wake.notified();
            let after = match cursor(&self.store, &s.name) {
                Ok(c) => c,
                Err(e) => {
                    log::error!(target: "error", "webhook={} event=cursor_unreadable error={e}", s.name);
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            let batch = match self.store.events_page(None, after, 200) {
                Ok(b) => b,
                Err(e) => {
                    log::error!(target: "error", "webhook={} event=store_unreadable error={e}", s.name);
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            if batch.is_empty() {
                // Woken by new events, or a poll every second (events stored by another path).
                let _ = tokio::time::timeout(Duration::from_secs(1), wake).await;
                continue;
            }
            // The cursor moves only from the value this loop read: a replay that moved it
            // meanwhile wins, and the loop starts again from there.
            let mut at = after;
            for event in batch {
                if s.entities.is_empty() || s.entities.contains(&event.entity) {
                    self.deliver_with_retries(&client, &s, &stats, &event).await;
                }
                match advance_cursor(&self.store, &s.name, at, event.id) {
                    Ok(true) => at = event.id,
                    Ok(false) => {
                        log::info!(target: "message", "webhook={} event=cursor_moved_by_replay", s.name);
                        break;
                    }
                    Err(e) => {
                        log::error!(target: "error", "webhook={} event=cursor_not_saved event_id={} error={e}", s.name, event.id);
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        break;
                    }
                }
                stats.last_event_id.store(event.id, Ordering::Relaxed);
            }
        }
    }

    async fn deliver_with_retries(
        &self,
        client: &awc::Client,
        s: &WebhookSettings,
        stats: &WebhookStats,
        event: &StoredEvent,
    ) {
        let mut delay = s.backoff_initial;
        for attempt in 1..=s.max_attempts.max(1) {
            match deliver(client, s, event).await {
                Ok(()) => {
                    stats.delivered.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                Err(e) => {
                    stats.failures.fetch_add(1, Ordering::Relaxed);
                    log::warn!(target: "error", "webhook={} event=delivery_failed event_id={} attempt={attempt} of={} error={e:?}", s.name, event.id, s.max_attempts);
                    if attempt == s.max_attempts.max(1) {
                        stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
                        let (name, id, tries) = (s.name.clone(), event.id, attempt);
                        let saved = self.store.read(move |c| {
                            c.execute(
                                "INSERT INTO webhook_dead_letters (name, event_id, attempts, last_error) VALUES (?1, ?2, ?3, ?4) \
                                 ON CONFLICT (name, event_id) DO UPDATE SET attempts = attempts + excluded.attempts, last_error = excluded.last_error",
                                params![name, id as i64, tries as i64, e],
                            )
                        });
                        match saved {
                            Ok(_) => {
                                log::error!(target: "error", "webhook={} event=dead_lettered event_id={} attempts={attempt}", s.name, event.id)
                            }
                            Err(err) => {
                                log::error!(target: "error", "webhook={} event=dead_letter_not_saved event_id={} error={err}", s.name, event.id)
                            }
                        }
                        return;
                    }
                    // Backoff between attempts (pacing the retries, not synchronisation).
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(s.backoff_max);
                }
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("no such webhook")]
    NoWebhook,
    #[error("no such dead letter")]
    NoDeadLetter,
    #[error("past the newest event ({head})")]
    PastHead { head: u64 },
    #[error(transparent)]
    Store(StoreError),
}

fn client(s: &WebhookSettings) -> awc::Client {
    awc::Client::builder().timeout(s.timeout).finish()
}

fn cursor(store: &Store, name: &str) -> Result<u64, StoreError> {
    let name = name.to_string();
    store.read(move |c| {
        c.query_row(
            "SELECT last_event_id FROM webhook_cursors WHERE name = ?1",
            params![name],
            |r| r.get::<_, i64>(0),
        )
        .map(|v| v as u64)
        .or_else(|e| match e {
            rusqlite::Error::QueryReturnedNoRows => Ok(0),
            e => Err(e),
        })
    })
}

/// Moves the cursor from `from` to `to`; `false` if it no longer is at `from` (a replay).
fn advance_cursor(store: &Store, name: &str, from: u64, to: u64) -> Result<bool, StoreError> {
    let name = name.to_string();
    store.read(move |c| {
        let n = if from == 0 {
            c.execute(
                "INSERT INTO webhook_cursors (name, last_event_id) VALUES (?1, ?2) \
                 ON CONFLICT (name) DO UPDATE SET last_event_id = excluded.last_event_id \
                 WHERE webhook_cursors.last_event_id = 0",
                params![name, to as i64],
            )?
        } else {
            c.execute(
                "UPDATE webhook_cursors SET last_event_id = ?3 WHERE name = ?1 AND last_event_id = ?2",
                params![name, from as i64, to as i64],
            )?
        };
        Ok(n == 1)
    })
}

fn set_cursor(store: &Store, name: &str, id: u64) -> Result<(), StoreError> {
    let name = name.to_string();
    store
        .read(move |c| {
            c.execute(
                "INSERT INTO webhook_cursors (name, last_event_id) VALUES (?1, ?2) \
                 ON CONFLICT (name) DO UPDATE SET last_event_id = excluded.last_event_id",
                params![name, id as i64],
            )
        })
        .map(|_| ())
}

/// One signed POST; `Err` says why it did not count as delivered.
async fn deliver(
    client: &awc::Client,
    s: &WebhookSettings,
    event: &StoredEvent,
) -> Result<(), String> {
    let body = serde_json::to_vec(event).map_err(|e| e.to_string())?;
    let ts = crate::security::unix_now();
    let sig = sign(&s.secret, ts, &body);
    let resp = client
        .post(&s.url)
        .insert_header(("content-type", "application/json"))
        .insert_header((TIMESTAMP_HEADER, ts.to_string()))
        .insert_header((SIGNATURE_HEADER, format!("v1={sig}")))
        .insert_header((EVENT_ID_HEADER, event.id.to_string()))
        .insert_header(("tether-webhook", s.name.clone()))
        .send_body(body)
        .await
        .map_err(|e| e.to_string())?;
    if resp.status().is_success() {
        Ok(())
    } else {
        Err(format!("endpoint answered {}", resp.status().as_u16()))
    }
}

#[cfg(test)]
mod tests {
    use super::sign;

    #[test]
    fn signature_is_hmac_sha256_of_timestamp_dot_body() {
        // Python: hmac.new(b"Jefe", b'1700000000.{"id":1}', hashlib.sha256).hexdigest()
        assert_eq!(
            sign(b"Jefe", 1_700_000_000, br#"{"id":1}"#),
            "05b728475104591e6ba9301ccd86c0f18c79ea7330ef9b9869435607a745d2bf"
        );
        assert_ne!(
            sign(b"Jefe", 1_700_000_001, br#"{"id":1}"#),
            sign(b"Jefe", 1_700_000_000, br#"{"id":1}"#)
        );
    }
}

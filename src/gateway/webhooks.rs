//! Webhooks to the main Web API: every durable clinic event (or those of the configured
//! entities) is POSTed to each configured endpoint, signed with HMAC-SHA256 over
//! `"{timestamp}.{body}"`, at least once, in event order per endpoint.
//!
//! One dispatcher task per endpoint (one in the whole cluster: a node dispatches an endpoint
//! only while it leads it, see `GatewayStore::try_lead`) reads the store's events after the endpoint's cursor (kept
//! in the store, moved only after a 2xx), retries a failed delivery with exponential backoff,
//! and after `max_attempts` moves the event to the endpoint's dead-letter list and goes on (one
//! poison event must not stop a clinic's stream). Dead letters are listed and replayed over
//! REST; `replay` moves the cursor back to re-deliver from an event id.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::monitor::{Beat, Liveness};
pub use super::store::DeadLetter;
use super::store::{Store, StoreError, StoredEvent};

/// Request headers of every delivery.
pub const SIGNATURE_HEADER: &str = "tether-signature";
pub const TIMESTAMP_HEADER: &str = "tether-timestamp";
pub const EVENT_ID_HEADER: &str = "tether-event-id";
/// On a channel message's delivery instead of the event id: the message's id.
pub const MESSAGE_ID_HEADER: &str = "tether-message-id";

/// One endpoint, as configured (`gateway.webhooks`).
#[derive(Clone)]
pub struct WebhookSettings {
    pub name: String,
    pub url: String,
    pub secret: Vec<u8>,
    /// Only these entities (all when empty).
    pub entities: Vec<String>,
    /// Clinic events at all (`false`: channel messages only).
    pub events: bool,
    /// Up channels whose messages this endpoint also receives (their own cursor).
    pub channels: Vec<String>,
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
            .field("events", &self.events)
            .field("channels", &self.channels)
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
    pub fn new(store: Arc<Store>, settings: Vec<WebhookSettings>) -> Self {
        let endpoints = settings
            .into_iter()
            .map(|s| (s, Arc::new(WebhookStats::default())))
            .collect();
        Webhooks {
            store,
            since: super::store::iso_from_millis(crate::security::unix_now_ms() as i64),
            endpoints,
            wake: Arc::new(tokio::sync::Notify::new()),
        }
    }

    /// New events are durable: dispatchers look now rather than at their next poll.
    pub fn notify(&self) {
        self.wake.notify_waiters();
    }

    pub fn find(&self, name: &str) -> Option<&(WebhookSettings, Arc<WebhookStats>)> {
        self.endpoints.iter().find(|(s, _)| s.name == name)
    }

    /// Re-deliver everything from `event_id` on (the cursor moves back; at least once). An id
    /// past the newest stored event is refused: moving the cursor there would skip every event
    /// stored before the id is reached. Checked and moved in one write.
    pub async fn replay_from(&self, name: &str, event_id: u64) -> Result<(), ReplayError> {
        match self.store.replay_webhook(name, event_id).await {
            Ok(Ok(())) => {
                self.notify();
                Ok(())
            }
            Ok(Err(head)) => Err(ReplayError::PastHead { head }),
            Err(e) => Err(ReplayError::Store(e)),
        }
    }

    /// Delivers one dead letter again now; on success it leaves the list.
    pub async fn replay_dead_letter(&self, name: &str, id: u64) -> Result<bool, ReplayError> {
        let (settings, stats) = self.find(name).ok_or(ReplayError::NoWebhook)?.clone();
        let event_id = self
            .store
            .dead_letter_event(name, id)
            .await
            .map_err(ReplayError::Store)?
            .ok_or(ReplayError::NoDeadLetter)?;
        let event = self
            .store
            .events_page(None, event_id.saturating_sub(1), 1)
            .await
            .map_err(ReplayError::Store)?
            .into_iter()
            .find(|e| e.id == event_id)
            .ok_or(ReplayError::NoDeadLetter)?;
        let client = client(&settings);
        match deliver(&client, &settings, &event).await {
            Ok(()) => {
                stats.delivered.fetch_add(1, Ordering::Relaxed);
                self.store
                    .remove_dead_letter(name, id)
                    .await
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

    /// Starts one dispatcher per endpoint (on the current actix system), each reporting to
    /// `tasks` (readiness).
    pub fn start(self: &Arc<Self>, tasks: &Liveness) {
        for (settings, stats) in &self.endpoints {
            if !settings.channels.is_empty() {
                let beat = tasks.register(
                    &format!("webhook:{}:channels", settings.name),
                    settings.timeout + settings.backoff_max + Duration::from_secs(10),
                );
                let (me, settings, stats) = (self.clone(), settings.clone(), stats.clone());
                actix::spawn(async move { me.dispatch_channels(settings, stats, beat).await });
            }
            if !settings.events {
                continue;
            }
            let me = self.clone();
            // A dispatcher beats at every loop and every attempt; it may be silent for one
            // delivery's timeout plus one backoff, plus the idle poll.
            let beat = tasks.register(
                &format!("webhook:{}", settings.name),
                settings.timeout + settings.backoff_max + Duration::from_secs(10),
            );
            let (settings, stats) = (settings.clone(), stats.clone());
            actix::spawn(async move { me.dispatch(settings, stats, beat).await });
        }
    }

    /// The lowest cursor of all endpoints: retention keeps every event above it.
    pub async fn low_water(&self) -> Result<Option<u64>, StoreError> {
        let mut low: Option<u64> = None;
        for (s, _) in self.endpoints.iter().filter(|(s, _)| s.events) {
            let c = self.store.webhook_cursor(&s.name).await?;
            low = Some(low.map_or(c, |l| l.min(c)));
        }
        Ok(low)
    }

    async fn dispatch(self: Arc<Self>, s: WebhookSettings, stats: Arc<WebhookStats>, beat: Beat) {
        let client = client(&s);
        log::info!(target: "connection", "webhook={} event=dispatcher_started url={}", s.name, s.url);
        // Several gateway nodes on one store: exactly one dispatches each endpoint; the others
        // stand by and take over when its node dies.
        let role = format!("webhook:{}", s.name);
        let mut leading: Option<bool> = None;
        loop {
            beat.beat();
            let lead = match self.store.try_lead(&role).await {
                Ok(l) => l,
                Err(e) => {
                    log::error!(target: "error", "webhook={} event=leadership_unknown error={e}", s.name);
                    false
                }
            };
            if leading != Some(lead) {
                if lead {
                    log::info!(target: "connection", "webhook={} event=dispatcher_active node={}", s.name, self.store.node());
                } else {
                    log::info!(target: "connection", "webhook={} event=dispatcher_standby node={} reason=\"another node dispatches this endpoint\"", s.name, self.store.node());
                }
                leading = Some(lead);
            }
            if !lead {
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            let wake = self.wake.notified();
            let after = match self.store.webhook_cursor(&s.name).await {
                Ok(c) => c,
                Err(e) => {
                    log::error!(target: "error", "webhook={} event=cursor_unreadable error={e}", s.name);
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            let batch = match self.store.events_page(None, after, 200).await {
                Ok(b) => b,
                Err(StoreError::Gone { pruned_through, .. }) => {
                    // Only an endpoint added after retention removed events gets here (the
                    // others hold retention back): it starts at the oldest event kept.
                    log::warn!(target: "error", "webhook={} event=cursor_before_retention cursor={after} resumes_after={pruned_through}", s.name);
                    if let Err(e) = self
                        .store
                        .advance_webhook_cursor(&s.name, after, pruned_through)
                        .await
                    {
                        log::error!(target: "error", "webhook={} event=cursor_not_saved error={e}", s.name);
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                    continue;
                }
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
                    self.deliver_with_retries(&client, &s, &stats, &event, &beat)
                        .await;
                }
                match self
                    .store
                    .advance_webhook_cursor(&s.name, at, event.id)
                    .await
                {
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

    /// Up-channel messages of the endpoint's `channels`, in order, with their own cursor
    /// (`<name>.channels` in the store) and leadership, like events. A message that fails every
    /// attempt is counted and logged, and the cursor moves on: it stays readable from
    /// `GET /v1/channels/stream` while the store keeps it (a week).
    async fn dispatch_channels(
        self: Arc<Self>,
        s: WebhookSettings,
        stats: Arc<WebhookStats>,
        beat: Beat,
    ) {
        let client = client(&s);
        let cursor = format!("{}.channels", s.name);
        let role = format!("webhook:{cursor}");
        log::info!(target: "connection", "webhook={} event=channel_dispatcher_started channels={}", s.name, s.channels.join(","));
        loop {
            beat.beat();
            if !self.store.try_lead(&role).await.unwrap_or(false) {
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            let wake = self.wake.notified();
            let after = match self.store.webhook_cursor(&cursor).await {
                Ok(c) => c,
                Err(e) => {
                    log::error!(target: "error", "webhook={} event=cursor_unreadable error={e}", s.name);
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            let page = match self.store.up_channel_page(after as i64, 200).await {
                Ok(p) => p,
                Err(e) => {
                    log::error!(target: "error", "webhook={} event=store_unreadable error={e}", s.name);
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            if page.is_empty() {
                let _ = tokio::time::timeout(Duration::from_secs(1), wake).await;
                continue;
            }
            let mut at = after;
            for m in page {
                let now = crate::security::unix_now_ms();
                let live = m.expires_ms.is_none_or(|e| e > now);
                if live && s.channels.contains(&m.channel) {
                    let body = super::channels::message_json(&m).to_string();
                    let mut delay = s.backoff_initial;
                    for attempt in 1..=s.max_attempts.max(1) {
                        beat.beat();
                        match post_signed(
                            &client,
                            &s,
                            body.as_bytes(),
                            (MESSAGE_ID_HEADER, &m.message_id),
                        )
                        .await
                        {
                            Ok(()) => {
                                stats.delivered.fetch_add(1, Ordering::Relaxed);
                                break;
                            }
                            Err(e) => {
                                stats.failures.fetch_add(1, Ordering::Relaxed);
                                log::warn!(target: "error", "webhook={} event=delivery_failed channel={} message_id={} attempt={attempt} of={} error={e:?}", s.name, m.channel, m.message_id, s.max_attempts);
                                if attempt == s.max_attempts.max(1) {
                                    stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
                                    log::error!(target: "error", "webhook={} event=channel_message_given_up channel={} message_id={} note=\"readable from GET /v1/channels/stream\"", s.name, m.channel, m.message_id);
                                } else {
                                    // Backoff between attempts (pacing the retries).
                                    tokio::time::sleep(delay).await;
                                    delay = (delay * 2).min(s.backoff_max);
                                }
                            }
                        }
                    }
                }
                let to = m.row.max(0) as u64;
                match self.store.advance_webhook_cursor(&cursor, at, to).await {
                    Ok(true) => at = to,
                    Ok(false) => break,
                    Err(e) => {
                        log::error!(target: "error", "webhook={} event=cursor_not_saved error={e}", s.name);
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        break;
                    }
                }
            }
        }
    }

    async fn deliver_with_retries(
        &self,
        client: &awc::Client,
        s: &WebhookSettings,
        stats: &WebhookStats,
        event: &StoredEvent,
        beat: &Beat,
    ) {
        let mut delay = s.backoff_initial;
        for attempt in 1..=s.max_attempts.max(1) {
            beat.beat();
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
                        let saved = self
                            .store
                            .add_dead_letter(&s.name, event.id, attempt, &e)
                            .await;
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

/// One signed POST of an event; `Err` says why it did not count as delivered.
async fn deliver(
    client: &awc::Client,
    s: &WebhookSettings,
    event: &StoredEvent,
) -> Result<(), String> {
    let body = serde_json::to_vec(event).map_err(|e| e.to_string())?;
    post_signed(client, s, &body, (EVENT_ID_HEADER, &event.id.to_string())).await
}

/// One signed POST of `body` with its id header.
async fn post_signed(
    client: &awc::Client,
    s: &WebhookSettings,
    body: &[u8],
    id: (&'static str, &str),
) -> Result<(), String> {
    let ts = crate::security::unix_now();
    let sig = sign(&s.secret, ts, body);
    let resp = client
        .post(&s.url)
        .insert_header(("content-type", "application/json"))
        .insert_header((TIMESTAMP_HEADER, ts.to_string()))
        .insert_header((SIGNATURE_HEADER, format!("v1={sig}")))
        .insert_header((id.0, id.1.to_string()))
        .insert_header(("tether-webhook", s.name.clone()))
        .send_body(body.to_vec())
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

//! The agent's side of channels: messages between the cloud and the clinic's own applications
//! that are not table rows (a call pop from the phone system, a notice, a front-desk check-in).
//!
//! The gateway declares its channels in `welcome.channels` (name, direction, delivery, limits,
//! the payload's JSON Schema); the [`ChannelBoard`] keeps them, the local subscribers (the
//! admin endpoint's WebSocket and SSE clients) and the down messages waiting for a subscriber.
//! The connection actor hands it every `channel` frame and sends the `channel_ack`s it answers.
//!
//! Delivery, per message: handed to every subscriber of its channel at once, and confirmed to
//! the gateway (`delivered`) when at least one took it. With no subscriber it waits here —
//! a transient message until its time to live runs out (then `expired`, never delivered late),
//! a durable one until a subscriber comes or the process ends (the gateway, which has no
//! confirmation, sends it again on the next session). Ids already delivered are remembered
//! (the last [`REMEMBERED`]) so a resend is confirmed again without reaching subscribers twice;
//! subscribers deduplicate by `message_id` across agent restarts.
//!
//! The board is shared (not an actor's state), so a restarted connection actor finds its
//! subscribers and waiting messages where they were. No payload reaches a log.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix::prelude::*;
use serde::{Deserialize, Serialize};
use tether_schemas::{
    ChannelAck, ChannelAckStatus, ChannelDef, ChannelDelivery, ChannelMessage, EntitySchemas,
};

use crate::log_target::MESSAGE;
use crate::ports::{PayloadCipher, SealError};

/// Down messages waiting for a subscriber, at most; past it the oldest transient one expires
/// early, and a durable one is left to the gateway's next resend.
pub const MAX_WAITING: usize = 1000;
/// Delivered message ids remembered for deduplicating resends.
pub const REMEMBERED: usize = 4096;
/// Messages queued for one subscriber that has not read them; past it the subscriber is
/// dropped (it reconnects and gets what is still waiting).
pub const SUBSCRIBER_QUEUE: usize = 256;

/// `channel_ack`s for the gateway, from the board (subscriber arrivals, expiries).
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
pub struct SendAcks(pub Vec<ChannelAck>);

/// Why a local publication or subscription was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ChannelError {
    #[error("no channel `{0}` (the gateway declares: {1})")]
    Unknown(String, String),
    #[error("channel `{0}` goes from the cloud to the clinic; it cannot be published here")]
    NotUp(String),
    #[error("channel `{0}` goes from the clinic to the cloud; it cannot be subscribed to")]
    NotDown(String),
    #[error("payload of {size} bytes exceeds channel `{channel}`'s limit of {limit}")]
    TooLarge {
        channel: String,
        size: usize,
        limit: u64,
    },
    #[error("payload does not match channel `{channel}`'s schema at `{field}`: {message}")]
    Invalid {
        channel: String,
        field: String,
        message: String,
    },
    #[error("channel `{0}`: more than {1} messages per second; slow down")]
    RateLimited(String, f64),
    #[error(
        "the agent has not heard the gateway's channels yet (never connected since it started)"
    )]
    NotKnownYet,
    #[error("channel `{0}` carries encrypted fields, and this agent has no data key (configure agent.encryption)")]
    NoDataKey(String),
    #[error("channel `{channel}`: encrypting field `{field}` failed: {message}")]
    Sealing {
        channel: String,
        field: String,
        message: String,
    },
}

/// Counters of one channel at this agent (all since the process started).
#[derive(Debug, Default, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ChannelCounts {
    /// Down messages received from the gateway (resends of delivered ones not counted).
    pub received: u64,
    /// Down messages handed to at least one subscriber.
    pub delivered: u64,
    /// Transient down messages whose time ran out before any subscriber took them.
    pub expired: u64,
    /// Up messages published by local applications and accepted by the gateway.
    pub published: u64,
    /// Up messages refused (here or at the gateway).
    pub refused: u64,
    /// Subscribers connected now.
    pub subscribers: u64,
    /// Down messages waiting for a subscriber now.
    pub waiting: u64,
}

struct Def {
    def: ChannelDef,
    /// Up publications allowed now (a token bucket refilled at `rate_per_second`).
    tokens: f64,
    refilled: Instant,
}

struct Subscriber {
    id: u64,
    /// Channels it takes (every down channel when empty).
    names: HashSet<String>,
    tx: tokio::sync::mpsc::Sender<Arc<str>>,
}

impl Subscriber {
    fn takes(&self, channel: &str) -> bool {
        self.names.is_empty() || self.names.contains(channel)
    }
}

struct Waiting {
    msg: ChannelMessage,
    /// Transient: when it stops being deliverable (this machine's monotonic clock).
    expires: Option<Instant>,
}

#[derive(Default)]
struct Inner {
    defs: HashMap<String, Def>,
    schemas: EntitySchemas,
    known: bool,
    subscribers: Vec<Subscriber>,
    waiting: VecDeque<Waiting>,
    delivered: HashSet<String>,
    delivered_order: VecDeque<String>,
    counts: HashMap<String, ChannelCounts>,
    acks_to: Option<Recipient<SendAcks>>,
}

/// What a subscriber receives: one JSON text per message.
#[derive(Serialize)]
struct Delivery<'a> {
    message_id: &'a str,
    channel: &'a str,
    payload: &'a tether_schemas::Row,
    published_at: &'a str,
    /// Transient: the time it has left (ms) as it is handed over.
    #[serde(skip_serializing_if = "Option::is_none")]
    ttl_ms: Option<u64>,
}

/// A local subscription: its messages arrive on `rx`; dropping it unsubscribes.
pub struct Subscription {
    pub id: u64,
    pub rx: tokio::sync::mpsc::Receiver<Arc<str>>,
    board: Arc<ChannelBoard>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.board.unsubscribe(self.id);
    }
}

/// See the module docs.
#[derive(Default)]
pub struct ChannelBoard {
    inner: Mutex<Inner>,
    next_id: AtomicU64,
    /// Encrypts and decrypts the fields channels list in `encrypt` (`None`: this agent has no
    /// data key; such channels' messages are refused).
    cipher: Option<Arc<dyn PayloadCipher>>,
}

impl ChannelBoard {
    pub fn new() -> Arc<ChannelBoard> {
        Arc::new(ChannelBoard::default())
    }

    /// A board that encrypts and decrypts channel fields with `cipher`.
    pub fn with_cipher(cipher: Option<Arc<dyn PayloadCipher>>) -> Arc<ChannelBoard> {
        Arc::new(ChannelBoard {
            cipher,
            ..ChannelBoard::default()
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Where acks produced outside a frame's handling go (the current connection actor).
    pub fn attach(&self, to: Recipient<SendAcks>) {
        self.lock().acks_to = Some(to);
    }

    /// The channels the gateway declared at `welcome`. A channel whose schema does not compile
    /// is left out (and logged): its messages are refused rather than let through unchecked.
    pub fn set_channels(&self, defs: Vec<ChannelDef>) {
        let mut inner = self.lock();
        let mut schemas = EntitySchemas::default();
        let mut kept = HashMap::new();
        for def in defs {
            if let Err(e) = schemas.insert(&def.name, &def.schema.to_string()) {
                log::error!(target: MESSAGE, "event=channel_schema_invalid channel={} error={e}", def.name);
                continue;
            }
            if !def.encrypt.is_empty() && self.cipher.is_none() {
                log::warn!(target: MESSAGE, "event=channel_needs_data_key channel={} fields={} reason=\"the channel carries encrypted fields and agent.encryption is not configured: its messages are refused here\"", def.name, def.encrypt.join(","));
            }
            let tokens = def.rate_per_second.max(1.0);
            let prev = inner.defs.remove(&def.name);
            kept.insert(
                def.name.clone(),
                Def {
                    tokens: prev.as_ref().map_or(tokens, |p| p.tokens),
                    refilled: prev.map_or_else(Instant::now, |p| p.refilled),
                    def,
                },
            );
        }
        let names: Vec<&str> = kept.keys().map(String::as_str).collect();
        log::info!(target: MESSAGE, "event=channels_declared count={} names={}", names.len(), names.join(","));
        inner.defs = kept;
        inner.schemas = schemas;
        inner.known = true;
    }

    /// The declared channels (for `/status`).
    pub fn channels(&self) -> Vec<ChannelDef> {
        let inner = self.lock();
        let mut v: Vec<ChannelDef> = inner.defs.values().map(|d| d.def.clone()).collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// Per-channel counters, by name (every declared channel, and any with counts).
    pub fn counts(&self) -> Vec<(String, ChannelCounts)> {
        let inner = self.lock();
        let mut names: Vec<String> = inner.defs.keys().cloned().collect();
        for n in inner.counts.keys() {
            if !names.contains(n) {
                names.push(n.clone());
            }
        }
        names.sort();
        names
            .into_iter()
            .map(|n| {
                let mut c = inner.counts.get(&n).cloned().unwrap_or_default();
                c.subscribers = inner.subscribers.iter().filter(|s| s.takes(&n)).count() as u64;
                c.waiting = inner.waiting.iter().filter(|w| w.msg.channel == n).count() as u64;
                (n, c)
            })
            .collect()
    }

    /// Subscribers connected now.
    pub fn subscriber_count(&self) -> usize {
        self.lock().subscribers.len()
    }

    /// A down message from the gateway: handed to the subscribers now, or kept until one comes
    /// (see the module docs). Answers the ack to send now, if any.
    pub fn on_down(&self, mut msg: ChannelMessage, now: Instant) -> Option<ChannelAck> {
        let mut inner = self.lock();
        let id = msg.message_id.clone();
        if inner.delivered.contains(&id) {
            return Some(ack(&id, ChannelAckStatus::Delivered));
        }
        if inner.waiting.iter().any(|w| w.msg.message_id == id) {
            // Sent again on a new link while it still waits here: it waits once.
            return None;
        }
        if msg.ttl_ms == Some(0) {
            count(&mut inner, &msg.channel).expired += 1;
            return Some(ack(&id, ChannelAckStatus::Expired));
        }
        if let Err(e) = self.open(&inner, &mut msg) {
            count(&mut inner, &msg.channel).refused += 1;
            let field = e.field.as_deref().map(|f| format!("/{f}"));
            log::error!(target: MESSAGE, "event=channel_message_refused channel={} message_id={id} field={} reason=\"{}\"", msg.channel, field.as_deref().unwrap_or("-"), e.message);
            return Some(ChannelAck {
                message_id: id,
                status: ChannelAckStatus::Refused,
                reason: Some(e.message),
                field,
            });
        }
        count(&mut inner, &msg.channel).received += 1;
        let expires = msg.ttl_ms.map(|t| now + Duration::from_millis(t));
        let w = Waiting { msg, expires };
        if hand_over(&mut inner, &w, now) {
            return Some(ack(&id, ChannelAckStatus::Delivered));
        }
        if inner.waiting.len() >= MAX_WAITING {
            // Make room: the oldest transient one goes first (it would expire anyway).
            if let Some(i) = inner.waiting.iter().position(|w| w.expires.is_some()) {
                if let Some(old) = inner.waiting.remove(i) {
                    count(&mut inner, &old.msg.channel).expired += 1;
                    log::warn!(target: MESSAGE, "event=channel_message_expired channel={} message_id={} reason=\"{MAX_WAITING} messages already wait for a subscriber\"", old.msg.channel, old.msg.message_id);
                    let a = ack(&old.msg.message_id, ChannelAckStatus::Expired);
                    send_acks(&inner, vec![a]);
                }
            } else {
                log::warn!(target: MESSAGE, "event=channel_message_not_kept channel={} message_id={id} reason=\"{MAX_WAITING} durable messages already wait; the gateway sends it again on the next session\"", w.msg.channel);
                return None;
            }
        }
        inner.waiting.push_back(w);
        None
    }

    /// A local application subscribes to `names` (every down channel when empty): it gets the
    /// messages waiting for it at once, in order, then each new one.
    pub fn subscribe(
        self: &Arc<Self>,
        names: Vec<String>,
        now: Instant,
    ) -> Result<Subscription, ChannelError> {
        let mut inner = self.lock();
        for n in &names {
            match inner.defs.get(n) {
                Some(d) if !d.def.direction.down() => return Err(ChannelError::NotDown(n.clone())),
                Some(_) => {}
                None if !inner.known => return Err(ChannelError::NotKnownYet),
                None => return Err(ChannelError::Unknown(n.clone(), declared(&inner))),
            }
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let (tx, rx) = tokio::sync::mpsc::channel(SUBSCRIBER_QUEUE);
        inner.subscribers.push(Subscriber {
            id,
            names: names.into_iter().collect(),
            tx,
        });
        // Hand over what waits, oldest first; what this subscriber does not take stays.
        let acks = sweep_waiting(&mut inner, now, true);
        log::info!(target: MESSAGE, "event=channel_subscribed subscriber={id} subscribers={} handed_over={}", inner.subscribers.len(), acks.len());
        send_acks(&inner, acks);
        drop(inner);
        Ok(Subscription {
            id,
            rx,
            board: self.clone(),
        })
    }

    fn unsubscribe(&self, id: u64) {
        let mut inner = self.lock();
        let before = inner.subscribers.len();
        inner.subscribers.retain(|s| s.id != id);
        if inner.subscribers.len() != before {
            log::info!(target: MESSAGE, "event=channel_unsubscribed subscriber={id} subscribers={}", inner.subscribers.len());
        }
    }

    /// Transient messages whose time ran out: dropped, and their `expired` acks sent.
    pub fn expire(&self, now: Instant) {
        let mut inner = self.lock();
        if !inner
            .waiting
            .iter()
            .any(|w| w.expires.is_some_and(|e| e <= now))
        {
            return;
        }
        let acks = sweep_waiting(&mut inner, now, false);
        log::info!(target: MESSAGE, "event=channel_messages_expired count={} reason=\"no subscriber took them in time\"", acks.len());
        send_acks(&inner, acks);
    }

    /// Checks a local application's publication against its channel (direction, size, schema,
    /// rate) and answers the channel's delivery.
    pub fn check_publish(
        &self,
        channel: &str,
        payload: &tether_schemas::Row,
        now: Instant,
    ) -> Result<ChannelDelivery, ChannelError> {
        let mut inner = self.lock();
        let result = check(&mut inner, channel, payload, now);
        if result.is_err() {
            count(&mut inner, channel).refused += 1;
        }
        result
    }

    /// Encrypts the fields `channel` lists in `encrypt` in a publication already checked by
    /// [`Self::check_publish`] (the checks see the plaintext; the gateway gets ciphertext).
    pub fn seal_publish(
        &self,
        channel: &str,
        message_id: &str,
        payload: &mut tether_schemas::Row,
    ) -> Result<(), ChannelError> {
        let fields = match self.lock().defs.get(channel) {
            Some(d) if !d.def.encrypt.is_empty() => d.def.encrypt.clone(),
            _ => return Ok(()),
        };
        let refused = |e: ChannelError| {
            count(&mut self.lock(), channel).refused += 1;
            e
        };
        let Some(cipher) = &self.cipher else {
            return Err(refused(ChannelError::NoDataKey(channel.to_string())));
        };
        cipher
            .seal(channel, message_id, payload, &fields)
            .map_err(|e| {
                refused(ChannelError::Sealing {
                    channel: channel.to_string(),
                    field: e.field.unwrap_or_default(),
                    message: e.message,
                })
            })
    }

    /// Decrypts the fields a down message's channel lists in `encrypt`.
    fn open(&self, inner: &Inner, msg: &mut ChannelMessage) -> Result<(), SealError> {
        let Some(d) = inner.defs.get(&msg.channel) else {
            return Ok(());
        };
        if d.def.encrypt.is_empty() {
            return Ok(());
        }
        let Some(cipher) = &self.cipher else {
            return Err(SealError {
                field: d.def.encrypt.first().cloned(),
                message: format!(
                    "channel `{}` carries encrypted fields and this agent has no data key (agent.encryption)",
                    msg.channel
                ),
            });
        };
        cipher.open(
            &msg.channel,
            &msg.message_id,
            &mut msg.payload,
            &d.def.encrypt,
        )
    }

    /// The gateway's answer to a publication.
    pub fn published(&self, channel: &str, accepted: bool) {
        let mut inner = self.lock();
        let c = count(&mut inner, channel);
        if accepted {
            c.published += 1;
        } else {
            c.refused += 1;
        }
    }
}

fn check(
    inner: &mut Inner,
    channel: &str,
    payload: &tether_schemas::Row,
    now: Instant,
) -> Result<ChannelDelivery, ChannelError> {
    if !inner.known {
        return Err(ChannelError::NotKnownYet);
    }
    let listed = declared(inner);
    let Some(d) = inner.defs.get_mut(channel) else {
        return Err(ChannelError::Unknown(channel.to_string(), listed));
    };
    if !d.def.direction.up() {
        return Err(ChannelError::NotUp(channel.to_string()));
    }
    let size = serde_json::to_string(payload).map_or(0, |t| t.len());
    if size as u64 > d.def.max_bytes {
        return Err(ChannelError::TooLarge {
            channel: channel.to_string(),
            size,
            limit: d.def.max_bytes,
        });
    }
    let rate = d.def.rate_per_second;
    let elapsed = now.saturating_duration_since(d.refilled).as_secs_f64();
    d.tokens = (d.tokens + elapsed * rate).min(rate.max(1.0));
    d.refilled = now;
    if d.tokens < 1.0 {
        return Err(ChannelError::RateLimited(channel.to_string(), rate));
    }
    let delivery = d.def.delivery;
    let value = serde_json::Value::Object(payload.clone());
    if let Err(e) = inner.schemas.validate(channel, &value) {
        let (field, message) = match e {
            tether_schemas::EntitySchemaError::Invalid { field, message, .. } => (field, message),
            other => (String::new(), other.to_string()),
        };
        return Err(ChannelError::Invalid {
            channel: channel.to_string(),
            field,
            message,
        });
    }
    if let Some(d) = inner.defs.get_mut(channel) {
        d.tokens -= 1.0;
    }
    Ok(delivery)
}

/// Goes through the waiting messages, oldest first: an expired one is dropped (`expired`), one a
/// subscriber takes (when `hand`) is `delivered`, the rest keep waiting. Answers the acks.
fn sweep_waiting(inner: &mut Inner, now: Instant, hand: bool) -> Vec<ChannelAck> {
    let waiting = std::mem::take(&mut inner.waiting);
    let mut acks = Vec::new();
    for w in waiting {
        if w.expires.is_some_and(|e| e <= now) {
            count(inner, &w.msg.channel).expired += 1;
            acks.push(ack(&w.msg.message_id, ChannelAckStatus::Expired));
        } else if hand && hand_over(inner, &w, now) {
            acks.push(ack(&w.msg.message_id, ChannelAckStatus::Delivered));
        } else {
            inner.waiting.push_back(w);
        }
    }
    acks
}

fn declared(inner: &Inner) -> String {
    let mut names: Vec<&str> = inner.defs.keys().map(String::as_str).collect();
    names.sort_unstable();
    if names.is_empty() {
        "none".into()
    } else {
        names.join(", ")
    }
}

fn count<'a>(inner: &'a mut Inner, channel: &str) -> &'a mut ChannelCounts {
    inner.counts.entry(channel.to_string()).or_default()
}

fn ack(id: &str, status: ChannelAckStatus) -> ChannelAck {
    ChannelAck {
        message_id: id.to_string(),
        status,
        reason: None,
        field: None,
    }
}

fn send_acks(inner: &Inner, acks: Vec<ChannelAck>) {
    if acks.is_empty() {
        return;
    }
    // No connection now: the gateway, which has no confirmation, sends them again on the next
    // session, and the ids remembered answer at once.
    if let Some(to) = &inner.acks_to {
        to.do_send(SendAcks(acks));
    }
}

/// Hands `w` to every subscriber of its channel; true when at least one took it (it is then
/// remembered as delivered). A subscriber whose queue is full is dropped.
fn hand_over(inner: &mut Inner, w: &Waiting, now: Instant) -> bool {
    let channel = &w.msg.channel;
    if !inner.subscribers.iter().any(|s| s.takes(channel)) {
        return false;
    }
    let delivery = Delivery {
        message_id: &w.msg.message_id,
        channel,
        payload: &w.msg.payload,
        published_at: &w.msg.published_at,
        ttl_ms: w
            .expires
            .map(|e| e.saturating_duration_since(now).as_millis() as u64),
    };
    let Ok(text) = serde_json::to_string(&delivery) else {
        return false;
    };
    let text: Arc<str> = Arc::from(text);
    let mut taken = false;
    let mut slow = Vec::new();
    for s in inner.subscribers.iter().filter(|s| s.takes(channel)) {
        match s.tx.try_send(text.clone()) {
            Ok(()) => taken = true,
            Err(tokio::sync::mpsc::error::TrySendError::Full(_)) => slow.push(s.id),
            Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) => slow.push(s.id),
        }
    }
    if !slow.is_empty() {
        log::warn!(target: MESSAGE, "event=channel_subscribers_dropped count={} reason=\"not reading ({SUBSCRIBER_QUEUE} messages queued) or gone\"", slow.len());
        inner.subscribers.retain(|s| !slow.contains(&s.id));
    }
    if taken {
        count(inner, channel).delivered += 1;
        let id = w.msg.message_id.clone();
        if inner.delivered.insert(id.clone()) {
            inner.delivered_order.push_back(id);
            if inner.delivered_order.len() > REMEMBERED {
                if let Some(old) = inner.delivered_order.pop_front() {
                    inner.delivered.remove(&old);
                }
            }
        }
    }
    taken
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use tether_schemas::ChannelDirection;

    fn def(name: &str, direction: ChannelDirection, delivery: ChannelDelivery) -> ChannelDef {
        ChannelDef {
            name: name.into(),
            direction,
            delivery,
            ttl_ms: (delivery == ChannelDelivery::Transient).then_some(1000),
            max_bytes: 200,
            rate_per_second: 2.0,
            schema: json!({"type": "object", "required": ["n"], "properties": {"n": {"type": "integer"}}}),
            encrypt: Vec::new(),
        }
    }

    fn msg(id: &str, channel: &str, ttl_ms: Option<u64>) -> ChannelMessage {
        let serde_json::Value::Object(payload) = json!({"n": 1}) else {
            unreachable!()
        };
        ChannelMessage {
            message_id: id.into(),
            channel: channel.into(),
            payload,
            ttl_ms,
            published_at: "2026-12-03T00:00:00.000Z".into(),
        }
    }

    fn board() -> Arc<ChannelBoard> {
        let b = ChannelBoard::new();
        b.set_channels(vec![
            def(
                "voip.call",
                ChannelDirection::Down,
                ChannelDelivery::Transient,
            ),
            def("notice", ChannelDirection::Down, ChannelDelivery::Durable),
            def("checkin", ChannelDirection::Up, ChannelDelivery::Durable),
        ]);
        b
    }

    fn ids(sub: &mut Subscription) -> Vec<String> {
        let mut v = Vec::new();
        while let Ok(t) = sub.rx.try_recv() {
            let m: serde_json::Value = serde_json::from_str(&t).expect("json");
            v.push(m["message_id"].as_str().unwrap_or_default().to_string());
        }
        v
    }

    #[test]
    fn a_waiting_message_goes_to_the_first_subscriber_in_order_and_a_resend_only_is_acked() {
        let b = board();
        let t0 = Instant::now();
        assert_eq!(b.on_down(msg("m1", "notice", None), t0), None);
        assert_eq!(b.on_down(msg("m2", "notice", None), t0), None);
        let mut calls = b.subscribe(vec!["voip.call".into()], t0).expect("sub");
        assert!(
            ids(&mut calls).is_empty(),
            "a voip.call subscriber takes no notice"
        );
        let mut all = b.subscribe(vec![], t0).expect("sub");
        assert_eq!(ids(&mut all), ["m1", "m2"]);
        let a = b.on_down(msg("m3", "notice", None), t0).expect("ack");
        assert_eq!(a.status, ChannelAckStatus::Delivered);
        assert_eq!(ids(&mut all), ["m3"]);
        // The gateway resends m1 (its ack was lost): confirmed, not delivered again.
        let a = b.on_down(msg("m1", "notice", None), t0).expect("ack");
        assert_eq!(a.status, ChannelAckStatus::Delivered);
        assert!(ids(&mut all).is_empty());
        let c = b.counts();
        let notice = &c.iter().find(|(n, _)| n == "notice").expect("notice").1;
        assert_eq!((notice.received, notice.delivered), (3, 3));
    }

    #[test]
    fn a_message_sent_again_while_it_waits_is_handed_over_once() {
        let b = board();
        let t0 = Instant::now();
        assert_eq!(b.on_down(msg("w1", "notice", None), t0), None);
        assert_eq!(
            b.on_down(msg("w1", "notice", None), t0),
            None,
            "a resend on a new link"
        );
        let mut sub = b.subscribe(vec![], t0).expect("sub");
        assert_eq!(ids(&mut sub), ["w1"]);
    }

    #[test]
    fn a_transient_message_expires_unseen_and_is_never_delivered_late() {
        let b = board();
        let t0 = Instant::now();
        assert_eq!(b.on_down(msg("c1", "voip.call", Some(1000)), t0), None);
        b.expire(t0 + Duration::from_millis(500));
        let mut sub = b
            .subscribe(vec!["voip.call".into()], t0 + Duration::from_millis(1001))
            .expect("sub");
        assert!(
            ids(&mut sub).is_empty(),
            "expired before the subscriber came"
        );
        let c = b.counts();
        let call = &c.iter().find(|(n, _)| n == "voip.call").expect("call").1;
        assert_eq!((call.received, call.delivered, call.expired), (1, 0, 1));
        assert_eq!(call.subscribers, 1);
        let a = b.on_down(msg("c2", "voip.call", Some(0)), t0).expect("ack");
        assert_eq!(a.status, ChannelAckStatus::Expired);
    }

    #[test]
    fn publications_are_checked_by_direction_size_schema_and_rate() {
        let b = board();
        let now = Instant::now();
        let obj = |v: serde_json::Value| match v {
            serde_json::Value::Object(m) => m,
            _ => tether_schemas::Row::new(),
        };
        let good = obj(json!({"n": 4}));
        assert_eq!(
            b.check_publish("checkin", &good, now),
            Ok(ChannelDelivery::Durable)
        );
        assert_eq!(
            b.check_publish("voip.call", &good, now),
            Err(ChannelError::NotUp("voip.call".into()))
        );
        let err = b
            .check_publish("checkin", &obj(json!({"n": "SECRET"})), now)
            .expect_err("schema");
        let text = err.to_string();
        assert!(text.contains("/n") && !text.contains("SECRET"), "{text}");
        let big = obj(json!({"n": 1, "pad": "x".repeat(300)}));
        assert!(matches!(
            b.check_publish("checkin", &big, now),
            Err(ChannelError::TooLarge { .. })
        ));
        assert!(b.check_publish("checkin", &good, now).is_ok());
        assert_eq!(
            b.check_publish("checkin", &good, now),
            Err(ChannelError::RateLimited("checkin".into(), 2.0))
        );
        assert!(b
            .check_publish("checkin", &good, now + Duration::from_secs(1))
            .is_ok());
        assert!(matches!(
            b.check_publish("nope", &good, now),
            Err(ChannelError::Unknown(..))
        ));
        assert!(matches!(
            b.subscribe(vec!["checkin".into()], now),
            Err(ChannelError::NotDown(_))
        ));
        let fresh = ChannelBoard::new();
        assert_eq!(
            fresh.check_publish("checkin", &good, now),
            Err(ChannelError::NotKnownYet)
        );
    }

    #[test]
    fn a_subscriber_that_stops_reading_is_dropped_and_the_rest_still_get_messages() {
        let b = board();
        let now = Instant::now();
        let slow = b.subscribe(vec![], now).expect("slow");
        let mut quick = b.subscribe(vec![], now).expect("quick");
        for i in 0..SUBSCRIBER_QUEUE + 5 {
            let a = b.on_down(msg(&format!("n{i}"), "notice", None), now);
            assert_eq!(a.map(|a| a.status), Some(ChannelAckStatus::Delivered));
            let _ = ids(&mut quick);
        }
        assert_eq!(b.subscriber_count(), 1, "the slow one was dropped");
        drop(slow);
        drop(quick);
        assert_eq!(b.subscriber_count(), 0);
    }

    /// A stand-in for the data-key cipher: "encrypts" a value as `enc:v1:t:<message id>:<json>`,
    /// so a value moved to another message does not open.
    struct TestCipher;

    impl PayloadCipher for TestCipher {
        fn seal(
            &self,
            _: &str,
            id: &str,
            payload: &mut tether_schemas::Row,
            fields: &[String],
        ) -> Result<(), SealError> {
            for f in fields {
                if let Some(v) = payload.get_mut(f).filter(|v| !v.is_null()) {
                    *v = json!(format!("enc:v1:t:{id}:{v}"));
                }
            }
            Ok(())
        }

        fn open(
            &self,
            _: &str,
            id: &str,
            payload: &mut tether_schemas::Row,
            fields: &[String],
        ) -> Result<(), SealError> {
            let prefix = format!("enc:v1:t:{id}:");
            let mut out = Vec::new();
            for f in fields {
                let Some(v) = payload.get(f).filter(|v| !v.is_null()) else {
                    continue;
                };
                let plain = v
                    .as_str()
                    .and_then(|s| s.strip_prefix(&prefix))
                    .and_then(|s| serde_json::from_str::<serde_json::Value>(s).ok())
                    .ok_or_else(|| SealError {
                        field: Some(f.clone()),
                        message: format!("field {f} does not decrypt"),
                    })?;
                out.push((f.clone(), plain));
            }
            for (f, v) in out {
                payload.insert(f, v);
            }
            Ok(())
        }
    }

    fn sealed_msg(id: &str, channel: &str, n: serde_json::Value) -> ChannelMessage {
        let mut m = msg(id, channel, None);
        m.payload.insert("n".into(), n);
        m
    }

    fn encrypted(name: &str, direction: ChannelDirection) -> ChannelDef {
        ChannelDef {
            encrypt: vec!["n".into()],
            ..def(name, direction, ChannelDelivery::Durable)
        }
    }

    #[test]
    fn encrypted_fields_reach_subscribers_in_clear_and_a_field_that_does_not_decrypt_is_refused() {
        let b = ChannelBoard::with_cipher(Some(Arc::new(TestCipher)));
        b.set_channels(vec![
            encrypted("notice", ChannelDirection::Down),
            encrypted("checkin", ChannelDirection::Up),
        ]);
        let t0 = Instant::now();
        let mut sub = b.subscribe(vec![], t0).expect("sub");
        let a = b
            .on_down(sealed_msg("m1", "notice", json!("enc:v1:t:m1:5")), t0)
            .expect("ack");
        assert_eq!(a.status, ChannelAckStatus::Delivered);
        let t = sub.rx.try_recv().expect("delivered");
        let got: serde_json::Value = serde_json::from_str(&t).expect("json");
        assert_eq!(
            got["payload"]["n"],
            json!(5),
            "the subscriber reads plaintext"
        );
        // Moved from another message, or in clear: refused naming the field, never delivered.
        for (id, n) in [("m2", json!("enc:v1:t:m1:5")), ("m3", json!(7))] {
            let a = b.on_down(sealed_msg(id, "notice", n), t0).expect("ack");
            assert_eq!(a.status, ChannelAckStatus::Refused, "{id}");
            assert_eq!(a.field.as_deref(), Some("/n"));
            assert!(a.reason.is_some_and(|r| r.contains("does not decrypt")));
        }
        assert!(
            sub.rx.try_recv().is_err(),
            "nothing refused reaches a subscriber"
        );
        let c = b.counts();
        let notice = &c.iter().find(|(n, _)| n == "notice").expect("notice").1;
        assert_eq!((notice.delivered, notice.refused), (1, 2));
        // Up: checked on the plaintext, then the listed field encrypted for its message id.
        let mut payload = sealed_msg("u1", "checkin", json!(9)).payload;
        b.check_publish("checkin", &payload, t0).expect("checked");
        b.seal_publish("checkin", "u1", &mut payload)
            .expect("sealed");
        assert_eq!(payload["n"], json!("enc:v1:t:u1:9"));
    }

    #[test]
    fn without_a_data_key_encrypted_channels_are_refused_both_ways() {
        let b = ChannelBoard::new();
        b.set_channels(vec![
            encrypted("notice", ChannelDirection::Down),
            encrypted("checkin", ChannelDirection::Up),
            def("plain", ChannelDirection::Up, ChannelDelivery::Durable),
        ]);
        let t0 = Instant::now();
        let _sub = b.subscribe(vec![], t0).expect("sub");
        let a = b
            .on_down(sealed_msg("m1", "notice", json!("enc:v1:t:m1:5")), t0)
            .expect("ack");
        assert_eq!(
            (a.status, a.field.as_deref()),
            (ChannelAckStatus::Refused, Some("/n"))
        );
        assert!(a.reason.is_some_and(|r| r.contains("agent.encryption")));
        let mut payload = sealed_msg("u1", "checkin", json!(9)).payload;
        assert_eq!(
            b.seal_publish("checkin", "u1", &mut payload),
            Err(ChannelError::NoDataKey("checkin".into()))
        );
        assert_eq!(payload["n"], json!(9), "never sent in clear: refused");
        assert_eq!(b.seal_publish("plain", "u2", &mut payload), Ok(()));
        assert_eq!(
            payload["n"],
            json!(9),
            "a channel without encrypt is left as it is"
        );
    }
}

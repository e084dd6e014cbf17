//! Channels at the gateway: messages between cloud services and the clinics' own applications
//! that are not table rows (see docs/CHANNELS.md).
//!
//! Each channel is declared in `gateway.channels` with one JSON Schema file for its payload.
//! Down messages (`POST /v1/clinics/{id}/channels/{name}`, or `POST /v1/channels/{name}` to
//! many clinics) are checked, kept in the store (`channel_messages`) and sent by the session
//! holding the clinic, on whichever node (the same signal as cloud updates); transient ones
//! expire after their time to live, durable ones wait for the clinic. Up messages from agents
//! are checked again here, kept in the store and read by `GET /v1/channels/stream` (SSE, with
//! `Last-Event-ID` to resume). No payload reaches a log.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use bytes::Bytes;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use tether_schemas::{
    ChannelAckStatus, ChannelDef, ChannelDelivery, ChannelDirection, EntitySchemas,
};

use super::store::{ChannelRecord, NewChannelMessage, StoreError};
use super::GatewayState;
use crate::security::crypto::FieldCipher;
use crate::security::limits::TokenBucket;
use crate::security::log_value;
use tether_actors::log_target::AUDIT;
use tether_actors::registry::UpdatesPending;

/// Down messages one session has sent and the agent has not answered, at most (the agent keeps
/// up to 1000 waiting for a subscriber; transient ones leave the window when they expire).
pub const CHANNEL_WINDOW: usize = 500;
/// Finished messages are removed this long after they were published.
pub const KEEP_FINISHED: Duration = Duration::from_secs(7 * 24 * 3600);
/// How often finished messages are purged when nothing else makes the sweep write.
pub const PURGE_EVERY: Duration = Duration::from_secs(3600);

/// One `gateway.channels` entry, resolved: its definition as agents get it, and who may post.
#[derive(Debug, Clone)]
pub struct ChannelSpec {
    pub def: ChannelDef,
    /// Admin token names allowed to post on it (empty: any token with `write`).
    pub publishers: Vec<String>,
}

/// Counters of one channel on this node.
#[derive(Debug, Default)]
pub struct ChannelCounters {
    /// Down messages accepted by the REST API (one per clinic).
    pub published: AtomicU64,
    /// Down messages handed to a clinic's session (resends included).
    pub sent: AtomicU64,
    /// Down messages a clinic's subscriber took (the agent's `delivered`).
    pub delivered: AtomicU64,
    /// Transient down messages that expired (at the gateway or at the clinic).
    pub expired: AtomicU64,
    /// Messages refused (REST or agent): schema, size, rate, direction, publisher.
    pub refused: AtomicU64,
    /// Up messages accepted from clinics.
    pub received: AtomicU64,
    /// POST → delivered, in seconds: counts per bucket of [`LATENCY_BUCKETS`], then the sum.
    latency: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    latency_sum_us: AtomicU64,
}

/// Upper bounds (seconds) of the delivery-latency histogram's buckets.
pub const LATENCY_BUCKETS: [f64; 10] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0];

impl ChannelCounters {
    fn observe(&self, seconds: f64) {
        let i = LATENCY_BUCKETS
            .iter()
            .position(|b| seconds <= *b)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.latency[i].fetch_add(1, Relaxed);
        self.latency_sum_us
            .fetch_add((seconds * 1e6) as u64, Relaxed);
    }
}

/// The channels this gateway carries, their schemas, counters and limits.
pub struct GatewayChannels {
    specs: BTreeMap<String, ChannelSpec>,
    schemas: EntitySchemas,
    /// Up channels with `encrypt` fields, their schema as it stands while those fields are
    /// ciphertext (each listed property an `enc:v1:` string): checked when this gateway has
    /// no data key to read them.
    sealed_schemas: EntitySchemas,
    /// Data keys (`gateway.decryption_keys`, the active one `gateway.channel_encryption_key`):
    /// encrypts down channels' `encrypt` fields, decrypts up ones. `None`: no keys.
    cipher: Option<FieldCipher>,
    counters: BTreeMap<String, ChannelCounters>,
    /// Down posts per clinic and channel (`rate_per_second`, on this node).
    rates: Mutex<HashMap<(String, String), TokenBucket>>,
    /// Bumped when up messages were stored (here, or on another node by its signal): the
    /// streams read on.
    up_wake: tokio::sync::watch::Sender<u64>,
    /// When this node last purged finished messages (Unix ms).
    last_purge: AtomicU64,
}

/// Why a message was refused: the status, the field at fault and why (never its value).
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    pub status: StatusCode,
    pub field: Option<String>,
    pub message: String,
}

impl Refusal {
    fn new(status: StatusCode, field: Option<&str>, message: impl Into<String>) -> Refusal {
        Refusal {
            status,
            field: field.map(str::to_string),
            message: message.into(),
        }
    }

    fn response(&self) -> HttpResponse {
        super::problem::problem(self.status, self.field.as_deref(), self.message.clone())
    }
}

impl GatewayChannels {
    /// Compiles every channel's schema; a schema that does not compile names its channel, as
    /// does a down channel with `encrypt` fields when `cipher` has no active key.
    pub fn new(
        specs: Vec<ChannelSpec>,
        cipher: Option<FieldCipher>,
    ) -> Result<GatewayChannels, String> {
        let mut schemas = EntitySchemas::default();
        let mut sealed_schemas = EntitySchemas::default();
        let mut by_name = BTreeMap::new();
        let mut counters = BTreeMap::new();
        for s in specs {
            let name = &s.def.name;
            schemas
                .insert(name, &s.def.schema.to_string())
                .map_err(|e| format!("gateway.channels `{name}`: {e}"))?;
            if !s.def.encrypt.is_empty() {
                if s.def.direction.down() && !cipher.as_ref().is_some_and(FieldCipher::can_encrypt)
                {
                    return Err(format!("gateway.channels `{name}` encrypts {}: set gateway.channel_encryption_key to one of gateway.decryption_keys", s.def.encrypt.join(", ")));
                }
                sealed_schemas
                    .insert(name, &sealed_schema(&s.def).to_string())
                    .map_err(|e| format!("gateway.channels `{name}`: {e}"))?;
            }
            counters.insert(s.def.name.clone(), ChannelCounters::default());
            by_name.insert(s.def.name.clone(), s);
        }
        Ok(GatewayChannels {
            specs: by_name,
            schemas,
            sealed_schemas,
            cipher,
            counters,
            rates: Mutex::new(HashMap::new()),
            up_wake: tokio::sync::watch::channel(0).0,
            last_purge: AtomicU64::new(0),
        })
    }

    pub fn is_empty(&self) -> bool {
        self.specs.is_empty()
    }

    /// The definitions agents get in `welcome.channels`: those with `encrypt` fields only to
    /// agents that can `encrypt` (`hello.features`).
    pub fn wire(&self, encrypt: bool) -> Vec<ChannelDef> {
        self.specs
            .values()
            .filter(|s| encrypt || s.def.encrypt.is_empty())
            .map(|s| s.def.clone())
            .collect()
    }

    /// Whether `name`'s messages can go to an agent (that can `encrypt` or not).
    pub fn carried(&self, name: &str, encrypt: bool) -> bool {
        encrypt
            || self
                .specs
                .get(name)
                .is_some_and(|s| s.def.encrypt.is_empty())
    }

    pub fn spec(&self, name: &str) -> Option<&ChannelSpec> {
        self.specs.get(name)
    }

    pub fn counters(&self, name: &str) -> Option<&ChannelCounters> {
        self.counters.get(name)
    }

    fn count(&self, name: &str, f: impl Fn(&ChannelCounters) -> &AtomicU64) {
        if let Some(c) = self.counters.get(name) {
            f(c).fetch_add(1, Relaxed);
        }
    }

    pub fn count_sent(&self, name: &str) {
        self.count(name, |c| &c.sent);
    }

    pub fn count_refused(&self, name: &str) {
        self.count(name, |c| &c.refused);
    }

    pub fn count_received(&self, name: &str) {
        self.count(name, |c| &c.received);
    }

    /// The agent's answer to a down message, with the time since it was published.
    pub fn count_result(
        &self,
        name: &str,
        status: ChannelAckStatus,
        since_publish: Option<Duration>,
    ) {
        let Some(c) = self.counters.get(name) else {
            return;
        };
        match status {
            ChannelAckStatus::Delivered => {
                c.delivered.fetch_add(1, Relaxed);
                if let Some(d) = since_publish {
                    c.observe(d.as_secs_f64());
                }
            }
            ChannelAckStatus::Expired => {
                c.expired.fetch_add(1, Relaxed);
            }
            ChannelAckStatus::Refused => {
                c.refused.fetch_add(1, Relaxed);
            }
            // Not an agent's answer (the session refuses it).
            ChannelAckStatus::Accepted => {}
        }
    }

    pub fn count_expired(&self, name: &str, n: u64) {
        if let Some(c) = self.counters.get(name) {
            c.expired.fetch_add(n, Relaxed);
        }
    }

    /// Up messages were stored somewhere: wake the streams.
    fn wake_streams(&self) {
        self.up_wake.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// Checks a payload posted to channel `name` for clinics: declared, going down, within
    /// its size, matching its schema. Answers the channel's spec. (Up messages: [`Self::check_up`].)
    pub fn check_down(
        &self,
        name: &str,
        payload: &Map<String, Value>,
    ) -> Result<&ChannelSpec, Refusal> {
        let spec = self.lookup(name, true)?;
        self.check_payload(spec, payload, &self.schemas, spec.def.max_bytes)?;
        Ok(spec)
    }

    /// An agent's up message on channel `name` from `clinic`: the fields the channel lists in
    /// `encrypt` must arrive as ciphertext. With a data key they are decrypted (and stored
    /// decrypted, as table rows are) and the plaintext is checked; without one the payload is
    /// checked as it stands (each listed field an `enc:v1:` string, the size with room for
    /// the encryption) and kept encrypted.
    pub fn check_up(
        &self,
        name: &str,
        clinic: &str,
        message_id: &str,
        payload: &mut Map<String, Value>,
    ) -> Result<&ChannelSpec, Refusal> {
        let spec = self.lookup(name, false)?;
        let fields = &spec.def.encrypt;
        if fields.is_empty() {
            self.check_payload(spec, payload, &self.schemas, spec.def.max_bytes)?;
            return Ok(spec);
        }
        let unprocessable = |field: &str, message: String| {
            Refusal::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                Some(&format!("payload/{field}")),
                message,
            )
        };
        for f in fields {
            if payload
                .get(f)
                .is_some_and(|v| !v.is_null() && crate::security::crypto::sealed(v).is_none())
            {
                return Err(unprocessable(
                    f,
                    format!("must arrive encrypted: channel `{name}` lists it in encrypt"),
                ));
            }
        }
        match &self.cipher {
            Some(c) => {
                // Decrypted in place (left as it was if it does not open).
                c.open_channel(clinic, name, message_id, payload, fields)
                    .map_err(|e| {
                        unprocessable(e.field().unwrap_or(""), format!("cannot be decrypted: {e}"))
                    })?;
                self.check_payload(spec, payload, &self.schemas, spec.def.max_bytes)?;
            }
            None => {
                // Each encrypted value grows by a third (base64), the prefix, kid, IV and tag.
                let room = spec.def.max_bytes * 4 / 3 + 128 * fields.len() as u64;
                self.check_payload(spec, payload, &self.sealed_schemas, room)?;
            }
        }
        Ok(spec)
    }

    /// Channel `name`, declared and going `down` (or up).
    fn lookup(&self, name: &str, down: bool) -> Result<&ChannelSpec, Refusal> {
        let Some(spec) = self.specs.get(name) else {
            let names: Vec<&str> = self.specs.keys().map(String::as_str).collect();
            return Err(Refusal::new(
                StatusCode::NOT_FOUND,
                Some("name"),
                format!(
                    "no channel `{}` on this gateway (gateway.channels declares: {})",
                    log_value(name, 64),
                    if names.is_empty() {
                        "none".to_string()
                    } else {
                        names.join(", ")
                    }
                ),
            ));
        };
        let dir = spec.def.direction;
        if down && !dir.down() {
            return Err(Refusal::new(
                StatusCode::CONFLICT,
                Some("name"),
                format!("channel `{name}` goes from the clinics to the cloud; it cannot be posted to clinics"),
            ));
        }
        if !down && !dir.up() {
            return Err(Refusal::new(
                StatusCode::CONFLICT,
                Some("channel"),
                format!("channel `{name}` goes from the cloud to the clinics; clinics cannot publish on it"),
            ));
        }
        Ok(spec)
    }

    /// A payload within `max_bytes` and matching `spec`'s schema in `schemas`.
    fn check_payload(
        &self,
        spec: &ChannelSpec,
        payload: &Map<String, Value>,
        schemas: &EntitySchemas,
        max_bytes: u64,
    ) -> Result<(), Refusal> {
        let name = &spec.def.name;
        let size = serde_json::to_string(payload).map_or(0, |t| t.len());
        if size as u64 > max_bytes {
            return Err(Refusal::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                Some("payload"),
                format!(
                    "payload of {size} bytes exceeds channel `{name}`'s max_bytes ({})",
                    spec.def.max_bytes
                ),
            ));
        }
        if let Err(e) = schemas.validate(name, &Value::Object(payload.clone())) {
            let (field, message) = match e {
                tether_schemas::EntitySchemaError::Invalid { field, message, .. } => {
                    (format!("payload{field}"), message)
                }
                other => ("payload".to_string(), other.to_string()),
            };
            return Err(Refusal::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                Some(&field),
                format!("does not match channel `{name}`'s schema: {message}"),
            ));
        }
        Ok(())
    }

    /// Takes one of `clinic`'s posts on `channel` from its rate (`rate_per_second`, burst of
    /// twice that, at least 1).
    pub fn take_rate(&self, clinic: &str, spec: &ChannelSpec) -> bool {
        let rate = spec.def.rate_per_second;
        let mut rates = self.rates.lock().unwrap_or_else(|p| p.into_inner());
        if rates.len() > 100_000 {
            // Bounded: forgetting every bucket at worst lets one extra burst through.
            rates.clear();
        }
        rates
            .entry((clinic.to_string(), spec.def.name.clone()))
            .or_insert_with(|| TokenBucket::new(rate, (rate * 2.0).max(1.0)))
            .take_at(Instant::now())
    }

    /// The messages for `clinics` on `spec`'s channel, as the store keeps them: the fields
    /// the channel lists in `encrypt` encrypted for each clinic and message id.
    fn new_messages(
        &self,
        spec: &ChannelSpec,
        clinics: &[String],
        payload: &Map<String, Value>,
        ttl: Option<Duration>,
        batch_id: Option<String>,
    ) -> Result<Vec<NewChannelMessage>, Refusal> {
        let now = crate::security::unix_now_ms();
        let durable = spec.def.delivery == ChannelDelivery::Durable;
        let ttl_ms = ttl
            .map(|t| t.as_millis() as u64)
            .or(spec.def.ttl_ms)
            .filter(|_| !durable);
        let fields = &spec.def.encrypt;
        let clear = fields
            .is_empty()
            .then(|| Value::Object(payload.clone()).to_string());
        clinics
            .iter()
            .map(|c| {
                let message_id = super::store::new_message_id();
                let text = match &clear {
                    Some(t) => t.clone(),
                    None => {
                        let cipher = self.cipher.as_ref().ok_or_else(|| {
                            Refusal::new(
                                StatusCode::SERVICE_UNAVAILABLE,
                                None,
                                "this gateway has no data key to encrypt the channel's fields",
                            )
                        })?;
                        let mut sealed = payload.clone();
                        cipher
                            .seal_channel(c, &spec.def.name, &message_id, &mut sealed, fields)
                            .map_err(|e| {
                                log::error!(target: "error", "event=channel_encryption_failed channel={} error={e}", spec.def.name);
                                Refusal::new(
                                    StatusCode::SERVICE_UNAVAILABLE,
                                    None,
                                    format!("encrypting the channel's fields failed: {e}"),
                                )
                            })?;
                        Value::Object(sealed).to_string()
                    }
                };
                Ok(NewChannelMessage {
                    message_id,
                    clinic_id: c.clone(),
                    channel: spec.def.name.clone(),
                    up: false,
                    durable,
                    payload: text,
                    expires_ms: ttl_ms.map(|t| now + t),
                    batch_id: batch_id.clone(),
                })
            })
            .collect()
    }

    /// `/metrics` lines, per channel.
    pub fn metrics_text(&self) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        if self.counters.is_empty() {
            return out;
        }
        type Family = (
            &'static str,
            &'static str,
            fn(&ChannelCounters) -> &AtomicU64,
        );
        let families: [Family; 6] = [
            ("tether_gateway_channel_published_total", "Down messages accepted by the REST API, per channel (one per clinic).", |c| &c.published),
            ("tether_gateway_channel_sent_total", "Down messages handed to a clinic's session, per channel (resends included).", |c| &c.sent),
            ("tether_gateway_channel_delivered_total", "Down messages a clinic's subscriber took, per channel.", |c| &c.delivered),
            ("tether_gateway_channel_expired_total", "Transient down messages whose time to live ran out before a subscriber took them, per channel.", |c| &c.expired),
            ("tether_gateway_channel_refused_total", "Messages refused (schema, size, rate, direction, publisher), per channel.", |c| &c.refused),
            ("tether_gateway_channel_received_total", "Up messages accepted from clinics, per channel.", |c| &c.received),
        ];
        for (name, help, get) in families {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for (ch, c) in &self.counters {
                let _ = writeln!(out, "{name}{{channel=\"{ch}\"}} {}", get(c).load(Relaxed));
            }
        }
        let h = "tether_gateway_channel_delivery_seconds";
        let _ = writeln!(out, "# HELP {h} From the POST to the clinic's subscriber having the message (as the agent reports it), per channel.\n# TYPE {h} histogram");
        for (ch, c) in &self.counters {
            let mut cum = 0;
            for (i, b) in LATENCY_BUCKETS.iter().enumerate() {
                cum += c.latency[i].load(Relaxed);
                let _ = writeln!(out, "{h}_bucket{{channel=\"{ch}\",le=\"{b}\"}} {cum}");
            }
            cum += c.latency[LATENCY_BUCKETS.len()].load(Relaxed);
            let _ = writeln!(out, "{h}_bucket{{channel=\"{ch}\",le=\"+Inf\"}} {cum}");
            let sum = c.latency_sum_us.load(Relaxed) as f64 / 1e6;
            let _ = writeln!(
                out,
                "{h}_sum{{channel=\"{ch}\"}} {sum}\n{h}_count{{channel=\"{ch}\"}} {cum}"
            );
        }
        out
    }
}

/// The payload as JSON text and object, or the 400 naming what is wrong.
fn payload_object(body: &[u8], field: &str) -> Result<Map<String, Value>, Box<HttpResponse>> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(Box::new(super::problem::problem(
            StatusCode::BAD_REQUEST,
            Some(field),
            "must be a JSON object",
        ))),
        Err(e) => Err(Box::new(super::problem::problem(
            StatusCode::BAD_REQUEST,
            Some(field),
            format!("not JSON at line {} column {}", e.line(), e.column()),
        ))),
    }
}

#[derive(Deserialize)]
pub(super) struct PostQuery {
    /// A shorter time to live than the channel's (transient channels), e.g. `10s`.
    ttl: Option<String>,
}

/// The `?ttl=` of a post: at most the channel's own; only on transient channels.
fn ttl_of(q: &PostQuery, spec: &ChannelSpec) -> Result<Option<Duration>, Box<HttpResponse>> {
    let Some(t) = &q.ttl else { return Ok(None) };
    let bad = |why: String| {
        Box::new(super::problem::problem(
            StatusCode::BAD_REQUEST,
            Some("ttl"),
            why,
        ))
    };
    if spec.def.delivery == ChannelDelivery::Durable {
        return Err(bad(format!(
            "channel `{}` is durable: its messages do not expire",
            spec.def.name
        )));
    }
    let d = crate::config::parse_duration(t).ok_or_else(|| {
        bad(format!(
            "`{}` is not a duration like 10s or 500ms",
            log_value(t, 32)
        ))
    })?;
    let max = Duration::from_millis(spec.def.ttl_ms.unwrap_or(0));
    if d.is_zero() || d > max {
        return Err(bad(format!(
            "must be more than 0 and at most the channel's ttl ({} ms)",
            max.as_millis()
        )));
    }
    Ok(Some(d))
}

/// Whether the admin token that made this request may post on `spec`'s channel.
fn publisher_allowed(req: &HttpRequest, spec: &ChannelSpec) -> Result<String, Box<HttpResponse>> {
    let who = actix_web::HttpMessage::extensions(req)
        .get::<super::enrolment::AdminName>()
        .map(|n| n.0.clone())
        .unwrap_or_else(|| "anonymous".into());
    if spec.publishers.is_empty() || spec.publishers.contains(&who) {
        Ok(who)
    } else {
        Err(Box::new(super::problem::problem(
            StatusCode::FORBIDDEN,
            Some("name"),
            format!(
                "token `{who}` may not post on channel `{}` (its publishers: {})",
                spec.def.name,
                spec.publishers.join(", ")
            ),
        )))
    }
}

fn store_error(e: StoreError) -> HttpResponse {
    log::error!(target: "error", "event=api_store_error error={e}");
    super::problem::problem(StatusCode::SERVICE_UNAVAILABLE, None, "store unavailable")
}

/// The checks every down post makes: the channel, the publisher, the payload; or the answer.
fn checked<'a>(
    state: &'a GatewayState,
    req: &HttpRequest,
    name: &str,
    payload: &Map<String, Value>,
) -> Result<(&'a ChannelSpec, String), Box<HttpResponse>> {
    let ch = &state.channels;
    let spec = ch.check_down(name, payload).map_err(|r| {
        ch.count_refused(name);
        Box::new(r.response())
    })?;
    let who = publisher_allowed(req, spec).inspect_err(|_| ch.count_refused(name))?;
    Ok((spec, who))
}

/// `POST /v1/clinics/{id}/channels/{name}`: one message for one clinic (the body is the
/// payload). 202 with its id; its status at `GET /v1/channels/messages/{id}`.
pub(super) async fn post_clinic(
    state: web::Data<GatewayState>,
    req: HttpRequest,
    path: web::Path<(String, String)>,
    query: web::Query<PostQuery>,
    body: web::Bytes,
) -> HttpResponse {
    let (clinic, name) = path.into_inner();
    if !crate::config::valid_id(&clinic) {
        return super::problem::problem(
            StatusCode::BAD_REQUEST,
            Some("id"),
            "not a valid clinic id",
        );
    }
    let payload = match payload_object(&body, "payload") {
        Ok(p) => p,
        Err(resp) => return *resp,
    };
    let (spec, who) = match checked(&state, &req, &name, &payload) {
        Ok(v) => v,
        Err(resp) => return *resp,
    };
    let ttl = match ttl_of(&query, spec) {
        Ok(t) => t,
        Err(resp) => return *resp,
    };
    if let Some(v) = &state.security.verifier {
        if !v.registry().contains(&clinic) {
            return super::problem::problem(
                StatusCode::NOT_FOUND,
                Some("id"),
                format!("clinic {clinic} is not in the registry"),
            );
        }
    }
    if !state.channels.take_rate(&clinic, spec) {
        state.channels.count_refused(&name);
        let mut resp = super::problem::problem(
            StatusCode::TOO_MANY_REQUESTS,
            Some("name"),
            format!(
                "more than {} messages per second for clinic {clinic} on channel `{name}`",
                spec.def.rate_per_second
            ),
        );
        resp.headers_mut().insert(
            actix_web::http::header::RETRY_AFTER,
            actix_web::http::header::HeaderValue::from_static("1"),
        );
        return resp;
    }
    let msgs =
        match state
            .channels
            .new_messages(spec, std::slice::from_ref(&clinic), &payload, ttl, None)
        {
            Ok(m) => m,
            Err(r) => return r.response(),
        };
    let (id, expires_ms) = (msgs[0].message_id.clone(), msgs[0].expires_ms);
    match state.store.enqueue_channel(msgs).await {
        Ok(_) => {
            state.channels.count(&name, |c| &c.published);
            log::info!(target: AUDIT, "action=channel_post actor={who} clinic={clinic} channel={name} message_id={id} result=accepted");
            state.registry.do_send(UpdatesPending {
                clinic_id: clinic.clone(),
            });
            HttpResponse::Accepted().json(json!({
                "message_id": id,
                "clinic_id": clinic,
                "channel": name,
                "delivery": spec.def.delivery.as_str(),
                "status": "pending",
                "expires_at": expires_ms.map(|e| super::store::iso_from_millis(e as i64)),
            }))
        }
        Err(e) => store_error(e),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FanOutBody {
    #[serde(default)]
    clinics: Option<Vec<String>>,
    #[serde(default)]
    all: bool,
    #[serde(default)]
    labels: Option<BTreeMap<String, String>>,
    payload: Map<String, Value>,
}

/// `POST /v1/channels/{name}`: the same message for many clinics — a list, `all`, or the
/// registry's `labels` — kept in one transaction under one batch id; 202 with each clinic's
/// message id.
pub(super) async fn post_fan_out(
    state: web::Data<GatewayState>,
    req: HttpRequest,
    name: web::Path<String>,
    query: web::Query<PostQuery>,
    body: web::Bytes,
) -> HttpResponse {
    let name = name.into_inner();
    let parsed: FanOutBody = match super::api::json_body(&body) {
        Ok(b) => b,
        Err(resp) => return *resp,
    };
    let (spec, who) = match checked(&state, &req, &name, &parsed.payload) {
        Ok(v) => v,
        Err(resp) => return *resp,
    };
    let ttl = match ttl_of(&query, spec) {
        Ok(t) => t,
        Err(resp) => return *resp,
    };
    let clinics = match super::api::fan_out_targets(
        &state,
        parsed.clinics,
        parsed.all,
        parsed.labels,
    )
    .await
    {
        Ok(c) => c,
        Err(resp) => return *resp,
    };
    let batch_id = format!(
        "chb_{:016x}{:016x}",
        rand::random::<u64>(),
        rand::random::<u64>()
    );
    let msgs = match state.channels.new_messages(
        spec,
        &clinics,
        &parsed.payload,
        ttl,
        Some(batch_id.clone()),
    ) {
        Ok(m) => m,
        Err(r) => return r.response(),
    };
    let ids: BTreeMap<String, String> = msgs
        .iter()
        .map(|m| (m.clinic_id.clone(), m.message_id.clone()))
        .collect();
    match state.store.enqueue_channel(msgs).await {
        Ok(_) => {
            if let Some(c) = state.channels.counters(&name) {
                c.published.fetch_add(ids.len() as u64, Relaxed);
            }
            log::info!(target: AUDIT, "action=channel_fan_out actor={who} channel={name} batch_id={batch_id} clinics={} result=accepted", ids.len());
            for c in ids.keys() {
                state.registry.do_send(UpdatesPending {
                    clinic_id: c.clone(),
                });
            }
            HttpResponse::Accepted().json(json!({
                "batch_id": batch_id,
                "channel": name,
                "delivery": spec.def.delivery.as_str(),
                "clinics": ids.len(),
                "message_ids": ids,
            }))
        }
        Err(e) => store_error(e),
    }
}

/// `GET /v1/channels/messages/{id}`: a message's status (never its payload).
pub(super) async fn get_message(
    state: web::Data<GatewayState>,
    id: web::Path<String>,
) -> HttpResponse {
    let id = id.into_inner();
    match state.store.channel_message(&id, None).await {
        Ok(Some(r)) => HttpResponse::Ok().json(r),
        Ok(None) => super::problem::problem(
            StatusCode::NOT_FOUND,
            Some("id"),
            format!("no channel message `{}`", log_value(&id, 80)),
        ),
        Err(e) => store_error(e),
    }
}

/// `GET /v1/channels`: the declared channels and this node's counters.
pub(super) async fn list(state: web::Data<GatewayState>) -> HttpResponse {
    let ch = &state.channels;
    let list: Vec<Value> = ch
        .specs
        .values()
        .map(|s| {
            let c = ch.counters(&s.def.name);
            let n = |f: fn(&ChannelCounters) -> &AtomicU64| c.map_or(0, |c| f(c).load(Relaxed));
            json!({
                "name": s.def.name,
                "direction": s.def.direction.as_str(),
                "delivery": s.def.delivery.as_str(),
                "ttl_ms": s.def.ttl_ms,
                "max_bytes": s.def.max_bytes,
                "rate_per_second": s.def.rate_per_second,
                "publishers": s.publishers,
                "schema": s.def.schema,
                "encrypt": s.def.encrypt,
                "counters": {
                    "published": n(|c| &c.published),
                    "sent": n(|c| &c.sent),
                    "delivered": n(|c| &c.delivered),
                    "expired": n(|c| &c.expired),
                    "refused": n(|c| &c.refused),
                    "received": n(|c| &c.received),
                },
            })
        })
        .collect();
    HttpResponse::Ok().json(json!({ "channels": list }))
}

#[derive(Deserialize)]
pub(super) struct StreamQuery {
    /// Comma-separated channel names (every up channel when absent).
    names: Option<String>,
    /// Resume after this event id (`Last-Event-ID` takes precedence).
    after: Option<i64>,
}

/// Up messages read per store call by a stream.
const STREAM_PAGE: usize = 200;
/// A stream with nothing new looks again this often even without a signal.
const STREAM_POLL: Duration = Duration::from_secs(2);
const KEEPALIVE: Duration = Duration::from_secs(15);

/// `GET /v1/channels/stream?names=&after=`: up messages from every clinic as Server-Sent
/// Events (`id` = their position, `event` = the channel), from the start of what the store keeps
/// or after `Last-Event-ID`; transient ones only while they live.
pub(super) async fn stream(
    state: web::Data<GatewayState>,
    req: HttpRequest,
    query: web::Query<StreamQuery>,
) -> HttpResponse {
    let names = crate::local_channels::name_list(query.names.as_deref());
    for n in &names {
        match state.channels.spec(n) {
            Some(s) if s.def.direction.up() => {}
            Some(_) => {
                return super::problem::problem(
                    StatusCode::BAD_REQUEST,
                    Some("names"),
                    format!("channel `{n}` goes to the clinics; only up channels stream here"),
                )
            }
            None => {
                return super::problem::problem(
                    StatusCode::BAD_REQUEST,
                    Some("names"),
                    format!("no channel `{}`", log_value(n, 64)),
                )
            }
        }
    }
    let last = req
        .headers()
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<i64>().ok());
    let after = last.or(query.after).unwrap_or(0).max(0);
    let wake = state.channels.up_wake.subscribe();
    let st = StreamState {
        state: state.clone(),
        names,
        after,
        wake,
        buffered: Vec::new(),
        failing: false,
    };
    let body = futures_util::stream::unfold(st, |mut st| async move {
        let chunk = st.next().await?;
        Some((Ok::<_, actix_web::Error>(chunk), st))
    });
    HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header(("cache-control", "no-store"))
        .insert_header(("x-accel-buffering", "no"))
        .streaming(body)
}

struct StreamState {
    state: web::Data<GatewayState>,
    names: Vec<String>,
    after: i64,
    wake: tokio::sync::watch::Receiver<u64>,
    buffered: Vec<ChannelRecord>,
    failing: bool,
}

impl StreamState {
    async fn next(&mut self) -> Option<Bytes> {
        let quiet_since = Instant::now();
        loop {
            if let Some(r) = self.buffered.pop() {
                return Some(event(&r));
            }
            match self
                .state
                .store
                .up_channel_page(self.after, STREAM_PAGE)
                .await
            {
                Ok(page) => {
                    self.failing = false;
                    let now = crate::security::unix_now_ms();
                    if let Some(last) = page.last() {
                        self.after = last.row;
                    }
                    let mut keep: Vec<ChannelRecord> = page
                        .into_iter()
                        .filter(|r| self.names.is_empty() || self.names.contains(&r.channel))
                        .filter(|r| r.expires_ms.is_none_or(|e| e > now))
                        .collect();
                    if !keep.is_empty() {
                        keep.reverse();
                        self.buffered = keep;
                        continue;
                    }
                }
                Err(e) => {
                    if !self.failing {
                        log::error!(target: "error", "event=channel_stream_store_error error={e}");
                        self.failing = true;
                    }
                }
            }
            if quiet_since.elapsed() >= KEEPALIVE {
                return Some(Bytes::from_static(b": keep-alive\n\n"));
            }
            // Woken by a new message here or a signal from another node; else look again.
            let _ = tokio::time::timeout(STREAM_POLL, self.wake.changed()).await;
        }
    }
}

/// `def`'s schema with each property it lists in `encrypt` replaced by what stands there while
/// encrypted: an `enc:v1:` string (or null).
fn sealed_schema(def: &ChannelDef) -> Value {
    let mut schema = def.schema.clone();
    if let Some(props) = schema.get_mut("properties").and_then(Value::as_object_mut) {
        for f in &def.encrypt {
            props.insert(
                f.clone(),
                json!({"type": ["string", "null"], "pattern": "^enc:v1:"}),
            );
        }
    }
    schema
}

/// An up message as the main Web API gets it (the stream's `data`, a webhook's body).
pub fn message_json(r: &ChannelRecord) -> Value {
    let payload: Value = r
        .payload
        .as_deref()
        .and_then(|p| serde_json::from_str(p).ok())
        .unwrap_or(Value::Null);
    json!({
        "message_id": r.message_id,
        "clinic_id": r.clinic_id,
        "channel": r.channel,
        "delivery": r.delivery,
        "received_at": r.created_at,
        "payload": payload,
    })
}

fn event(r: &ChannelRecord) -> Bytes {
    let data = message_json(r);
    Bytes::from(format!(
        "id: {}\nevent: {}\ndata: {data}\n\n",
        r.row, r.channel
    ))
}

/// The channel definitions agents get, from `gateway.channels` (schema files read here).
pub fn specs_from_config(c: &crate::config::GatewayConfig) -> Result<Vec<ChannelSpec>, String> {
    let mut out = Vec::new();
    for ch in &c.channels {
        let text = std::fs::read_to_string(&ch.schema).map_err(|e| {
            format!(
                "gateway.channels `{}`: schema {}: {e}",
                ch.name,
                ch.schema.display()
            )
        })?;
        let schema: Value = serde_json::from_str(&text).map_err(|e| {
            format!(
                "gateway.channels `{}`: schema {}: {e}",
                ch.name,
                ch.schema.display()
            )
        })?;
        let delivery = ChannelDelivery::parse(&ch.delivery).unwrap_or(ChannelDelivery::Transient);
        out.push(ChannelSpec {
            def: ChannelDef {
                name: ch.name.clone(),
                direction: ChannelDirection::parse(&ch.direction).unwrap_or(ChannelDirection::Down),
                delivery,
                ttl_ms: (delivery == ChannelDelivery::Transient)
                    .then(|| ch.ttl.get().as_millis() as u64),
                max_bytes: ch.max_bytes,
                rate_per_second: ch.rate_per_second,
                schema,
                encrypt: ch.encrypt.clone(),
            },
            publishers: ch.publishers.clone(),
        });
    }
    Ok(out)
}

/// The sample channels of `config.yaml` with their schemas (built in, for the demo, the fleet
/// tests and `tether bench channels`): `voip.call` (down, transient, 30 s), `notice.broadcast`
/// (down, durable) and `frontdesk.checkin` (up, durable).
pub fn samples() -> Vec<ChannelSpec> {
    let spec = |name: &str, direction, delivery, schema: &str| {
        let schema: Value = serde_json::from_str(schema).unwrap_or(Value::Null);
        ChannelSpec {
            def: ChannelDef {
                name: name.into(),
                direction,
                delivery,
                ttl_ms: (delivery == ChannelDelivery::Transient).then_some(30_000),
                max_bytes: 16 * 1024,
                rate_per_second: 50.0,
                schema,
                encrypt: Vec::new(),
            },
            publishers: Vec::new(),
        }
    };
    vec![
        spec(
            "voip.call",
            ChannelDirection::Down,
            ChannelDelivery::Transient,
            include_str!("../../schemas/channels/voip.call.schema.json"),
        ),
        spec(
            "notice.broadcast",
            ChannelDirection::Down,
            ChannelDelivery::Durable,
            include_str!("../../schemas/channels/notice.broadcast.schema.json"),
        ),
        spec(
            "frontdesk.checkin",
            ChannelDirection::Up,
            ChannelDelivery::Durable,
            include_str!("../../schemas/channels/frontdesk.checkin.schema.json"),
        ),
    ]
}

/// Up messages were stored (here, or on another node by its signal): the streams and the
/// webhook dispatchers that take channels read on.
pub fn up_stored(state: &GatewayState) {
    state.channels.wake_streams();
    state.webhooks.notify();
}

/// The sweep's part for channels (every heartbeat, on every node): nudge the sessions of
/// clinics with down messages open (a lost signal costs at most one heartbeat) and, when there
/// are any, expire transient ones whose time ran out (each counted once, by the node that
/// expired it). Finished messages are purged at most every [`PURGE_EVERY`]. Nothing is
/// written while no message is open.
pub async fn sweep(state: &GatewayState) {
    let ch = &state.channels;
    if ch.is_empty() {
        return;
    }
    let now = crate::security::unix_now_ms();
    let open = match state.store.channel_pending_clinics().await {
        Ok(c) => c,
        Err(e) => {
            log::warn!(target: "error", "event=channel_sweep_failed error={e}");
            return;
        }
    };
    let purge_due =
        now.saturating_sub(ch.last_purge.load(Relaxed)) >= PURGE_EVERY.as_millis() as u64;
    if !open.is_empty() || purge_due {
        let purge = now.saturating_sub(KEEP_FINISHED.as_millis() as u64);
        match state.store.expire_channels(now, purge).await {
            Ok(counts) => {
                ch.last_purge.store(now, Relaxed);
                for (name, n) in counts {
                    ch.count_expired(&name, n);
                    log::info!(target: "message", "event=channel_messages_expired channel={name} count={n} where=gateway");
                }
            }
            Err(e) => log::warn!(target: "error", "event=channel_expiry_failed error={e}"),
        }
    }
    for c in open {
        state.registry.do_send(UpdatesPending { clinic_id: c });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, direction: ChannelDirection) -> ChannelSpec {
        ChannelSpec {
            def: ChannelDef {
                name: name.into(),
                direction,
                delivery: ChannelDelivery::Transient,
                ttl_ms: Some(30_000),
                max_bytes: 100,
                rate_per_second: 1.0,
                schema: json!({"type": "object", "required": ["call_id"], "properties": {"call_id": {"type": "string"}}}),
                encrypt: Vec::new(),
            },
            publishers: vec![],
        }
    }

    fn obj(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => Map::new(),
        }
    }

    #[test]
    fn payloads_are_checked_by_channel_direction_size_and_schema_naming_the_field() {
        let ch = GatewayChannels::new(
            vec![
                spec("voip.call", ChannelDirection::Down),
                spec("desk", ChannelDirection::Up),
            ],
            None,
        )
        .expect("channels");
        assert!(ch
            .check_down("voip.call", &obj(json!({"call_id": "c1"})))
            .is_ok());
        let r = ch
            .check_down("voip.call", &obj(json!({"call_id": 7})))
            .expect_err("schema");
        assert_eq!(
            (r.status, r.field.as_deref()),
            (StatusCode::UNPROCESSABLE_ENTITY, Some("payload/call_id"))
        );
        let r = ch
            .check_down("voip.call", &obj(json!({})))
            .expect_err("missing");
        assert_eq!(r.field.as_deref(), Some("payload/call_id"));
        let r = ch
            .check_down("voip.call", &obj(json!({"call_id": "x".repeat(200)})))
            .expect_err("size");
        assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
        let r = ch
            .check_down("desk", &obj(json!({"call_id": "c"})))
            .expect_err("up only");
        assert_eq!(r.status, StatusCode::CONFLICT);
        assert!(ch
            .check_up("desk", "c1", "m1", &mut obj(json!({"call_id": "c"})))
            .is_ok());
        let r = ch
            .check_up("voip.call", "c1", "m1", &mut obj(json!({"call_id": "c"})))
            .expect_err("down only");
        assert_eq!(r.field.as_deref(), Some("channel"));
        let r = ch.check_down("fax", &obj(json!({}))).expect_err("unknown");
        assert!(r.message.contains("desk, voip.call"), "{}", r.message);
        let s = spec("voip.call", ChannelDirection::Down);
        assert!(
            ch.take_rate("c1", &s) && ch.take_rate("c1", &s),
            "a burst of two"
        );
        assert!(!ch.take_rate("c1", &s), "then one per second");
        assert!(ch.take_rate("c2", &s), "each clinic has its own");
    }

    #[test]
    fn a_schema_that_does_not_compile_names_its_channel() {
        let mut s = spec("bad", ChannelDirection::Down);
        s.def.schema = json!({"type": 12});
        let err = GatewayChannels::new(vec![s], None).err().expect("refused");
        assert!(err.contains("`bad`"), "{err}");
    }

    #[test]
    fn the_metrics_have_every_family_per_channel_and_a_cumulative_histogram() {
        let ch = GatewayChannels::new(vec![spec("voip.call", ChannelDirection::Down)], None)
            .expect("channels");
        ch.count_result(
            "voip.call",
            ChannelAckStatus::Delivered,
            Some(Duration::from_millis(3)),
        );
        ch.count_result(
            "voip.call",
            ChannelAckStatus::Delivered,
            Some(Duration::from_millis(40)),
        );
        ch.count_result("voip.call", ChannelAckStatus::Expired, None);
        let text = ch.metrics_text();
        assert!(
            text.contains("tether_gateway_channel_delivered_total{channel=\"voip.call\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("tether_gateway_channel_expired_total{channel=\"voip.call\"} 1"),
            "{text}"
        );
        assert!(text.contains("tether_gateway_channel_delivery_seconds_bucket{channel=\"voip.call\",le=\"0.005\"} 1"), "{text}");
        assert!(text.contains("tether_gateway_channel_delivery_seconds_bucket{channel=\"voip.call\",le=\"0.05\"} 2"), "{text}");
        assert!(
            text.contains("tether_gateway_channel_delivery_seconds_count{channel=\"voip.call\"} 2"),
            "{text}"
        );
    }

    fn cipher(dir: &std::path::Path, kid: &str, active: bool) -> FieldCipher {
        let path = dir.join(format!("{kid}.key"));
        crate::security::keys::write_data_key(&path).expect("key");
        let mut keys = crate::security::crypto::DataKeys::default();
        keys.add_file(kid, &path).expect("add");
        if active {
            keys.set_active(kid).expect("active");
        }
        FieldCipher::new(keys, HashMap::new())
    }

    fn encrypted(name: &str, direction: ChannelDirection) -> ChannelSpec {
        let mut s = spec(name, direction);
        s.def.encrypt = vec!["caller".into()];
        s.def.schema = json!({"type": "object", "required": ["call_id"], "additionalProperties": false,
            "properties": {"call_id": {"type": "string"}, "caller": {"type": "string", "maxLength": 12}}});
        s
    }

    #[test]
    fn encrypted_fields_are_sealed_per_clinic_going_down_and_must_arrive_sealed_going_up() {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = cipher(dir.path(), "dk1", true);
        // A down channel that encrypts needs a key to encrypt with.
        let err = GatewayChannels::new(
            vec![encrypted("call", ChannelDirection::Down)],
            Some(cipher(dir.path(), "dk2", false)),
        )
        .err()
        .expect("refused");
        assert!(err.contains("channel_encryption_key"), "{err}");
        let ch = GatewayChannels::new(
            vec![
                encrypted("call", ChannelDirection::Down),
                encrypted("desk", ChannelDirection::Up),
                spec("plain", ChannelDirection::Down),
            ],
            Some(key.clone()),
        )
        .expect("channels");
        // Agents that cannot encrypt are not told of the channels that do, nor sent them.
        let names = |v: Vec<ChannelDef>| v.into_iter().map(|d| d.name).collect::<Vec<_>>();
        assert_eq!(names(ch.wire(false)), ["plain"]);
        assert_eq!(names(ch.wire(true)), ["call", "desk", "plain"]);
        assert!(!ch.carried("call", false) && ch.carried("call", true));
        assert!(ch.carried("plain", false));

        // Down: checked in clear, kept encrypted, one ciphertext per clinic and message.
        let payload = obj(json!({"call_id": "c1", "caller": "+15550100"}));
        let spec = ch.check_down("call", &payload).expect("checked");
        let clinics = ["c-1".to_string(), "c-2".to_string()];
        let msgs = ch
            .new_messages(spec, &clinics, &payload, None, None)
            .expect("messages");
        for m in &msgs {
            assert!(!m.payload.contains("5550100"), "{}", m.payload);
            let mut kept: Map<String, Value> = serde_json::from_str(&m.payload).expect("json");
            key.open_channel(
                &m.clinic_id,
                "call",
                &m.message_id,
                &mut kept,
                &["caller".into()],
            )
            .expect("opens for its own clinic and id");
            assert_eq!(kept, payload);
        }
        assert_ne!(msgs[0].payload, msgs[1].payload);

        // Up, with the key: decrypted, then checked and kept in clear.
        let mut up = payload.clone();
        key.seal_channel("c-1", "desk", "u1", &mut up, &["caller".into()])
            .expect("seal");
        let mut got = up.clone();
        ch.check_up("desk", "c-1", "u1", &mut got)
            .expect("accepted");
        assert_eq!(got, payload);
        // ... from another clinic or message id, in clear, or too long once decrypted: refused
        // naming the field, never echoing it.
        for (clinic, id) in [("c-2", "u1"), ("c-1", "u2")] {
            let r = ch
                .check_up("desk", clinic, id, &mut up.clone())
                .expect_err("moved");
            assert_eq!(r.field.as_deref(), Some("payload/caller"), "{clinic} {id}");
            assert!(r.message.contains("cannot be decrypted"), "{}", r.message);
        }
        let r = ch
            .check_up("desk", "c-1", "u1", &mut payload.clone())
            .expect_err("clear");
        assert_eq!(
            (r.status, r.field.as_deref()),
            (StatusCode::UNPROCESSABLE_ENTITY, Some("payload/caller"))
        );
        assert!(!r.message.contains("5550100"));
        let mut long = obj(json!({"call_id": "c1", "caller": "+1555010099999"}));
        key.seal_channel("c-1", "desk", "u3", &mut long, &["caller".into()])
            .expect("seal");
        let r = ch
            .check_up("desk", "c-1", "u3", &mut long)
            .expect_err("schema on the plaintext");
        assert_eq!(r.field.as_deref(), Some("payload/caller"));

        // Up, without a key: kept encrypted, checked as it stands (the field a ciphertext).
        let keyless = GatewayChannels::new(vec![encrypted("desk", ChannelDirection::Up)], None)
            .expect("channels");
        let mut kept = up.clone();
        keyless
            .check_up("desk", "c-1", "u1", &mut kept)
            .expect("accepted");
        assert_eq!(kept, up, "kept as it came");
        let r = keyless
            .check_up("desk", "c-1", "u1", &mut payload.clone())
            .expect_err("clear");
        assert_eq!(r.field.as_deref(), Some("payload/caller"));
        let r = keyless
            .check_up(
                "desk",
                "c-1",
                "u1",
                &mut obj(json!({"caller": up["caller"]})),
            )
            .expect_err("schema");
        assert_eq!(r.field.as_deref(), Some("payload/call_id"));
    }
}

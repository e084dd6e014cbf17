use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

/// The protocol version this build speaks (`v` in every envelope).
pub const PROTOCOL_VERSION: u64 = 1;
/// Default largest accepted frame, in bytes.
pub const DEFAULT_MAX_FRAME_BYTES: usize = 1024 * 1024;

/// A JSON object: a row, or the key columns of a row.
pub type Row = Map<String, Value>;

/// Agent → gateway, first frame on a new connection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hello {
    pub clinic_id: String,
    pub agent_version: String,
    /// The highest sequence the agent knows to be durable at the gateway (its checkpoint).
    pub last_acked_seq: u64,
    /// Identifies the clinic outbox the sequences come from (random, made at install). A new
    /// value means the outbox was re-created and its sequences start again; 0 = unknown.
    #[serde(default)]
    pub source_id: u64,
    /// Actor restarts since the agent process started (for the fleet dashboard). Optional.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restarts: Option<u64>,
    /// The agent's clock (Unix ms) when it sent `hello`: the gateway measures the clinic's
    /// clock offset from it, to read `call_request.deadline`. Optional.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clock_ms: Option<u64>,
    /// What the agent understands beyond the base protocol (`"channels"`: `welcome.channels`
    /// and `channel` frames). Optional; a gateway sends nothing an agent did not list.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub features: Vec<String>,
}

/// The `hello.features` value of agents that take channel messages.
pub const FEATURE_CHANNELS: &str = "channels";
/// The `hello.features` value of agents that encrypt and decrypt the fields a channel lists in
/// `encrypt`; agents without it are not told of such channels and get none of their messages.
pub const FEATURE_CHANNEL_ENCRYPTION: &str = "channel_encryption";

/// Which way a channel's messages go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChannelDirection {
    /// Cloud → clinic applications.
    Down,
    /// Clinic applications → cloud.
    Up,
    Both,
}

impl ChannelDirection {
    pub fn as_str(self) -> &'static str {
        match self {
            ChannelDirection::Down => "down",
            ChannelDirection::Up => "up",
            ChannelDirection::Both => "both",
        }
    }

    pub fn parse(s: &str) -> Option<ChannelDirection> {
        match s {
            "down" => Some(ChannelDirection::Down),
            "up" => Some(ChannelDirection::Up),
            "both" => Some(ChannelDirection::Both),
            _ => None,
        }
    }

    pub fn down(self) -> bool {
        self != ChannelDirection::Up
    }

    pub fn up(self) -> bool {
        self != ChannelDirection::Down
    }
}

/// How a channel's messages are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChannelDelivery {
    /// Delivered while its time to live lasts, then dropped (counted as expired); never late.
    Transient,
    /// Kept until the other side confirms it; delivered in order, at least once (the
    /// receiver deduplicates by `message_id`).
    Durable,
}

impl ChannelDelivery {
    pub fn as_str(self) -> &'static str {
        match self {
            ChannelDelivery::Transient => "transient",
            ChannelDelivery::Durable => "durable",
        }
    }

    pub fn parse(s: &str) -> Option<ChannelDelivery> {
        match s {
            "transient" => Some(ChannelDelivery::Transient),
            "durable" => Some(ChannelDelivery::Durable),
            _ => None,
        }
    }
}

/// One channel as the gateway declares it to an agent (`welcome.channels`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChannelDef {
    pub name: String,
    pub direction: ChannelDirection,
    pub delivery: ChannelDelivery,
    /// Transient channels: how long a message lives (ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_ms: Option<u64>,
    /// Largest payload accepted (bytes of its JSON).
    pub max_bytes: u64,
    /// Messages a clinic may publish per second (up).
    pub rate_per_second: f64,
    /// The JSON Schema every payload must match.
    pub schema: Value,
    /// Top-level payload fields carried encrypted (`enc:v1:…`, AES-256-GCM under a data key,
    /// bound to the clinic, channel and message id): the agent encrypts them in up messages
    /// and decrypts them in down ones. Absent: none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub encrypt: Vec<String>,
}

/// Either way: one message on a channel. Down: its `message_id` is the gateway's; up: the
/// agent's (the gateway keeps one message per clinic and id, so a resend is no duplicate).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChannelMessage {
    pub message_id: String,
    pub channel: String,
    pub payload: Row,
    /// Transient: the time it has left to live when sent (ms); absent for durable messages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_ms: Option<u64>,
    /// When it was published (RFC 3339, the publisher's clock).
    pub published_at: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChannelAckStatus {
    /// Down: handed to at least one subscriber of the clinic.
    Delivered,
    /// Down: its time to live ran out before any subscriber took it.
    Expired,
    /// Up: durable at the gateway.
    Accepted,
    /// Refused (`reason`, `field`); sending it again will not help. Up: by the gateway (schema,
    /// size, rate, an encrypted field); down: by the agent (an encrypted field it cannot
    /// decrypt).
    Refused,
}

impl ChannelAckStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ChannelAckStatus::Delivered => "delivered",
            ChannelAckStatus::Expired => "expired",
            ChannelAckStatus::Accepted => "accepted",
            ChannelAckStatus::Refused => "refused",
        }
    }
}

/// Either way: what became of a `channel` message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChannelAck {
    pub message_id: String,
    pub status: ChannelAckStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// With `refused`: the payload field at fault (a JSON pointer such as `/caller`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

/// Gateway → agent, answer to `hello`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Welcome {
    pub session_id: String,
    /// Every event of this clinic up to and including this sequence is durable at the gateway.
    pub acked_seq: u64,
    pub heartbeat_interval_ms: u64,
    pub max_frame_bytes: u64,
    /// The channels the gateway carries (only to agents whose `hello.features` has
    /// `channels`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub channels: Vec<ChannelDef>,
}

/// What happened to a row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    Insert,
    Update,
    Delete,
}

impl Op {
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Insert => "insert",
            Op::Update => "update",
            Op::Delete => "delete",
        }
    }

    pub fn parse(s: &str) -> Option<Op> {
        match s {
            "insert" => Some(Op::Insert),
            "update" => Some(Op::Update),
            "delete" => Some(Op::Delete),
            _ => None,
        }
    }
}

/// One committed change of one row in the clinic database.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Event {
    /// Position in the clinic's outbox; strictly increasing in commit order.
    pub seq: u64,
    pub entity: String,
    pub op: Op,
    pub key: Row,
    /// The full row after the change; the row before it for `delete`.
    pub row: Option<Row>,
    /// When the clinic database committed the change (RFC 3339, UTC).
    pub committed_at: String,
}

/// Agent → gateway: a batch of events in outbox order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Events {
    /// Sequence of the event just before the first one of this batch (0 at the very start).
    /// The gateway stores the batch only if it already holds everything up to `prev_seq`,
    /// so an acknowledgement can never cover a gap.
    pub prev_seq: u64,
    pub events: Vec<Event>,
    /// The highest outbox sequence the agent has read so far (its view of its backlog's end);
    /// lets the gateway report how far behind a clinic is. Optional.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_seq: Option<u64>,
    /// Actor restarts since the agent process started. Optional.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restarts: Option<u64>,
    /// Commit time (RFC 3339) of the first event the agent has read *after* this batch: once
    /// the batch is acknowledged, that event is the clinic's oldest unacknowledged change, and
    /// its age is the clinic's lag. Absent when the batch ends at `head_seq`. Optional.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_committed_at: Option<String>,
}

/// Gateway → agent: every event up to `seq` is durable (cumulative).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ack {
    pub seq: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UpdateOp {
    Upsert,
    Delete,
}

impl UpdateOp {
    pub fn as_str(self) -> &'static str {
        match self {
            UpdateOp::Upsert => "upsert",
            UpdateOp::Delete => "delete",
        }
    }
}

/// Gateway → agent: a cloud change to apply to the clinic database.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Update {
    pub update_id: String,
    pub entity: String,
    pub op: UpdateOp,
    pub key: Row,
    #[serde(default)]
    pub row: Option<Row>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UpdateStatus {
    Applied,
    Failed,
    /// Not applied: the table's conflict policy kept the clinic's version.
    Conflict,
}

impl UpdateStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            UpdateStatus::Applied => "applied",
            UpdateStatus::Failed => "failed",
            UpdateStatus::Conflict => "conflict",
        }
    }
}

/// Agent → gateway: the outcome of an `update`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateResult {
    pub update_id: String,
    pub status: UpdateStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Gateway → agent: run one of the agent's allow-listed, named queries (`agent.rpc.queries`)
/// with these parameters, for `POST /v1/clinics/{id}/rpc`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RpcRequest {
    pub request_id: String,
    pub name: String,
    #[serde(default)]
    pub params: Row,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RpcStatus {
    Ok,
    /// Not run or failed: `error` says why (unknown name, bad parameter, database error).
    Error,
    /// Not run: the agent already runs as many queries as it allows at once; try again.
    Busy,
}

/// Agent → gateway: the answer to an `rpc_request`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RpcResponse {
    pub request_id: String,
    pub status: RpcStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rows: Option<Vec<Row>>,
    /// More rows matched than the query's `max_rows`; `rows` holds the first ones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub truncated: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// With `error`: the request field at fault (`name`, `params.<p>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

/// Agent → gateway: call one of the gateway's configured endpoints of the main Web API
/// (`gateway.api_bridge.endpoints`) for this clinic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CallRequest {
    pub request_id: String,
    pub endpoint: String,
    /// A JSON body as a value (agents before `body_text`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<Value>,
    /// The JSON body exactly as the clinic software sent it, forwarded byte for byte.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body_text: Option<String>,
    /// The call's deadline on the agent's clock (Unix ms; see `hello.clock_ms`): the gateway
    /// does not forward a call whose deadline has passed, and gives the main Web API only what
    /// is left of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline: Option<u64>,
    /// The clinic software's `Idempotency-Key`, passed to the main Web API.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
}

/// Gateway → agent: the main Web API's answer (`status` 0: it was not reached; see `error`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CallResponse {
    pub request_id: String,
    pub status: u16,
    /// The answer as a JSON value (to a request that sent `body`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<Value>,
    /// The answer's body exactly as the main Web API sent it (to a request with `body_text`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body_text: Option<String>,
    /// The answer's `Content-Type`, with `body_text`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Machine-readable error codes carried by `error` frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadFrame,
    UnknownType,
    UnsupportedVersion,
    FrameTooLarge,
    UnexpectedMessage,
    ClinicMismatch,
    Gap,
    StoreUnavailable,
    RateLimited,
    Unauthorized,
    /// `hello.source_id` names another database than the one this clinic syncs from: refused
    /// until an operator confirms a re-install.
    DuplicateSource,
    Internal,
}

/// Either side: something was wrong with what the peer sent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErrorFrame {
    pub code: ErrorCode,
    pub message: String,
    /// Path of the offending field, e.g. `events[3].seq`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

/// Every message of the protocol.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    Hello(Hello),
    Welcome(Welcome),
    Events(Events),
    Ack(Ack),
    Update(Update),
    UpdateResult(UpdateResult),
    Error(ErrorFrame),
    RpcRequest(RpcRequest),
    RpcResponse(RpcResponse),
    CallRequest(CallRequest),
    CallResponse(CallResponse),
    Channel(ChannelMessage),
    ChannelAck(ChannelAck),
}

/// The `type` values, in the order of [`Message`].
pub const MESSAGE_TYPES: [&str; 13] = [
    "hello",
    "welcome",
    "events",
    "ack",
    "update",
    "update_result",
    "error",
    "rpc_request",
    "rpc_response",
    "call_request",
    "call_response",
    "channel",
    "channel_ack",
];

impl Message {
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Hello(_) => "hello",
            Message::Welcome(_) => "welcome",
            Message::Events(_) => "events",
            Message::Ack(_) => "ack",
            Message::Update(_) => "update",
            Message::UpdateResult(_) => "update_result",
            Message::Error(_) => "error",
            Message::RpcRequest(_) => "rpc_request",
            Message::RpcResponse(_) => "rpc_response",
            Message::CallRequest(_) => "call_request",
            Message::CallResponse(_) => "call_response",
            Message::Channel(_) => "channel",
            Message::ChannelAck(_) => "channel_ack",
        }
    }

    /// Encode as an envelope. Serialising these types cannot fail (string keys only).
    pub fn encode(&self) -> String {
        match self {
            Message::Hello(m) => envelope("hello", m),
            Message::Welcome(m) => envelope("welcome", m),
            Message::Events(m) => envelope("events", m),
            Message::Ack(m) => envelope("ack", m),
            Message::Update(m) => envelope("update", m),
            Message::UpdateResult(m) => envelope("update_result", m),
            Message::Error(m) => envelope("error", m),
            Message::RpcRequest(m) => envelope("rpc_request", m),
            Message::RpcResponse(m) => envelope("rpc_response", m),
            Message::CallRequest(m) => envelope("call_request", m),
            Message::CallResponse(m) => envelope("call_response", m),
            Message::Channel(m) => envelope("channel", m),
            Message::ChannelAck(m) => envelope("channel_ack", m),
        }
    }

    /// Decode one frame, enforcing the size limit, the version and every field.
    pub fn decode(text: &str, max_frame_bytes: usize) -> Result<Message, DecodeError> {
        if text.len() > max_frame_bytes {
            return Err(DecodeError::TooLarge {
                size: text.len(),
                limit: max_frame_bytes,
            });
        }
        let value: Value =
            serde_json::from_str(text).map_err(|e| DecodeError::NotJson(e.to_string()))?;
        let Value::Object(mut obj) = value else {
            return Err(DecodeError::NotAnObject);
        };
        match obj.remove("v") {
            None => return Err(DecodeError::MissingField("v".into())),
            Some(Value::Number(n)) if n.as_u64() == Some(PROTOCOL_VERSION) => {}
            Some(other) => return Err(DecodeError::UnsupportedVersion(other.to_string())),
        }
        let kind = match obj.remove("type") {
            None => return Err(DecodeError::MissingField("type".into())),
            Some(Value::String(s)) => s,
            Some(_) => {
                return Err(DecodeError::Field {
                    kind: "envelope".into(),
                    field: "type".into(),
                    message: "must be a string".into(),
                })
            }
        };
        let body = Value::Object(obj);
        Ok(match kind.as_str() {
            "hello" => Message::Hello(body_as(&kind, body)?),
            "welcome" => Message::Welcome(body_as(&kind, body)?),
            "events" => Message::Events(body_as(&kind, body)?),
            "ack" => Message::Ack(body_as(&kind, body)?),
            "update" => Message::Update(body_as(&kind, body)?),
            "update_result" => Message::UpdateResult(body_as(&kind, body)?),
            "error" => Message::Error(body_as(&kind, body)?),
            "rpc_request" => Message::RpcRequest(body_as(&kind, body)?),
            "rpc_response" => Message::RpcResponse(body_as(&kind, body)?),
            "call_request" => Message::CallRequest(body_as(&kind, body)?),
            "call_response" => Message::CallResponse(body_as(&kind, body)?),
            "channel" => Message::Channel(body_as(&kind, body)?),
            "channel_ack" => Message::ChannelAck(body_as(&kind, body)?),
            _ => return Err(DecodeError::UnknownType(kind)),
        })
    }
}

/// One event as the gateway receives it: the key and the row stay the JSON text that arrived
/// (checked to be objects, never rebuilt into maps), so storing it costs no re-encoding.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawEvent {
    pub seq: u64,
    pub entity: String,
    pub op: Op,
    pub key: Box<RawValue>,
    #[serde(default)]
    pub row: Option<Box<RawValue>>,
    pub committed_at: String,
}

impl RawEvent {
    /// The same event with its key and row encoded (for tools and tests that build [`Event`]s).
    pub fn from_event(e: &Event) -> RawEvent {
        // A map of JSON values always encodes; `null` (the default) is never reached.
        let raw = |m: &Row| serde_json::value::to_raw_value(m).unwrap_or_default();
        RawEvent {
            seq: e.seq,
            entity: e.entity.clone(),
            op: e.op,
            key: raw(&e.key),
            row: e.row.as_ref().map(raw),
            committed_at: e.committed_at.clone(),
        }
    }
}

/// Agent → gateway `events`, as the gateway decodes it (see [`RawEvent`]).
#[derive(Debug, Clone)]
pub struct RawEvents {
    pub prev_seq: u64,
    pub events: Vec<RawEvent>,
    pub head_seq: Option<u64>,
    pub restarts: Option<u64>,
    pub next_committed_at: Option<String>,
}

/// A frame as the gateway reads it: `events` on the fast path, everything else as [`Message`].
#[derive(Debug)]
pub enum Inbound {
    Events(RawEvents),
    Other(Message),
}

impl Inbound {
    pub fn kind(&self) -> &'static str {
        match self {
            Inbound::Events(_) => "events",
            Inbound::Other(m) => m.kind(),
        }
    }
}

/// Decodes one frame the way [`Message::decode`] does, but reads an `events` frame in one pass
/// straight into [`RawEvents`]: no intermediate `Value` tree, rows kept as the text received.
/// A frame that does not pass the fast path is decoded again by [`Message::decode`], so every
/// error names its field exactly as before (the detail is computed only when a frame fails).
pub fn decode_inbound(text: &str, max_frame_bytes: usize) -> Result<Inbound, DecodeError> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct EventsFrame<'a> {
        v: u64,
        #[serde(rename = "type", borrow)]
        kind: std::borrow::Cow<'a, str>,
        prev_seq: u64,
        events: Vec<RawEvent>,
        #[serde(default)]
        head_seq: Option<u64>,
        #[serde(default)]
        restarts: Option<u64>,
        #[serde(default)]
        next_committed_at: Option<String>,
    }
    if text.len() <= max_frame_bytes {
        if let Ok(f) = serde_json::from_str::<EventsFrame<'_>>(text) {
            if f.v == PROTOCOL_VERSION && f.kind == "events" {
                for (i, e) in f.events.iter().enumerate() {
                    let field = if !is_object(&e.key) {
                        Some("key")
                    } else if e.row.as_deref().is_some_and(|r| !is_object(r)) {
                        Some("row")
                    } else {
                        None
                    };
                    if let Some(field) = field {
                        return Err(DecodeError::Field {
                            kind: "events".into(),
                            field: format!("events[{i}].{field}"),
                            message: "invalid type: expected a JSON object".into(),
                        });
                    }
                }
                return Ok(Inbound::Events(RawEvents {
                    prev_seq: f.prev_seq,
                    events: f.events,
                    head_seq: f.head_seq,
                    restarts: f.restarts,
                    next_committed_at: f.next_committed_at,
                }));
            }
        }
    }
    Message::decode(text, max_frame_bytes).map(|m| match m {
        // Reached only by an events frame the fast path did not read (it would not parse the
        // same way twice); kept for completeness.
        Message::Events(e) => Inbound::Events(RawEvents {
            prev_seq: e.prev_seq,
            events: e.events.iter().map(RawEvent::from_event).collect(),
            head_seq: e.head_seq,
            restarts: e.restarts,
            next_committed_at: e.next_committed_at,
        }),
        other => Inbound::Other(other),
    })
}

/// A raw value holds valid JSON with no leading whitespace: an object starts with `{`.
fn is_object(v: &RawValue) -> bool {
    v.get().starts_with('{')
}

/// The optional fields of an `events` frame (see [`Events`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct EventsMeta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub head_seq: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restarts: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_committed_at: Option<&'a str>,
}

/// Encodes an `events` frame from borrowed events (no copy of the rows).
pub fn encode_events<'a>(
    prev_seq: u64,
    meta: EventsMeta<'_>,
    events: impl Iterator<Item = &'a Event>,
) -> String {
    #[derive(Serialize)]
    struct EventsRef<'a, 'm> {
        prev_seq: u64,
        events: Vec<&'a Event>,
        #[serde(flatten)]
        meta: EventsMeta<'m>,
    }
    envelope(
        "events",
        &EventsRef {
            prev_seq,
            events: events.collect(),
            meta,
        },
    )
}

/// Length of an event's JSON encoding, without building the text.
pub fn encoded_len(event: &Event) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0 += b.len();
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut c = Count(0);
    let _ = serde_json::to_writer(&mut c, event);
    c.0
}

#[derive(Serialize)]
struct Envelope<'a, T> {
    v: u64,
    #[serde(rename = "type")]
    kind: &'a str,
    #[serde(flatten)]
    body: &'a T,
}

fn envelope<T: Serialize>(kind: &str, body: &T) -> String {
    let env = Envelope {
        v: PROTOCOL_VERSION,
        kind,
        body,
    };
    // Only string-keyed maps and plain values: serialisation is infallible.
    serde_json::to_string(&env).unwrap_or_else(|e| {
        format!(r#"{{"v":1,"type":"error","code":"internal","message":"encode: {e}"}}"#)
    })
}

fn body_as<T: DeserializeOwned>(kind: &str, body: Value) -> Result<T, DecodeError> {
    serde_path_to_error::deserialize(body).map_err(|e| {
        let path = e.path().to_string();
        let message = e.into_inner().to_string();
        // A missing field's path is its parent: name the field itself.
        let missing = message
            .strip_prefix("missing field `")
            .and_then(|m| m.strip_suffix('`'));
        let field = match missing {
            Some(name) if path == "." => name.to_string(),
            Some(name) => format!("{path}.{name}"),
            None => path,
        };
        DecodeError::Field {
            kind: kind.to_string(),
            field,
            message,
        }
    })
}

/// Why a frame was rejected. Every variant names what is wrong.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DecodeError {
    #[error("frame of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge { size: usize, limit: usize },
    #[error("frame is not valid JSON: {0}")]
    NotJson(String),
    #[error("frame is not a JSON object")]
    NotAnObject,
    #[error("envelope is missing the field `{0}`")]
    MissingField(String),
    #[error("unsupported protocol version {0} (this build speaks v{PROTOCOL_VERSION})")]
    UnsupportedVersion(String),
    #[error("unknown message type `{0}`")]
    UnknownType(String),
    #[error("{kind}: field `{field}`: {message}")]
    Field {
        kind: String,
        field: String,
        message: String,
    },
}

impl DecodeError {
    pub fn code(&self) -> ErrorCode {
        match self {
            DecodeError::TooLarge { .. } => ErrorCode::FrameTooLarge,
            DecodeError::UnsupportedVersion(_) => ErrorCode::UnsupportedVersion,
            DecodeError::UnknownType(_) => ErrorCode::UnknownType,
            _ => ErrorCode::BadFrame,
        }
    }

    pub fn field(&self) -> Option<String> {
        match self {
            DecodeError::MissingField(f) => Some(f.clone()),
            DecodeError::Field { field, .. } => Some(field.clone()),
            DecodeError::UnsupportedVersion(_) => Some("v".into()),
            DecodeError::UnknownType(_) => Some("type".into()),
            _ => None,
        }
    }

    /// The `error` frame that answers this decode failure.
    pub fn to_frame(&self) -> ErrorFrame {
        ErrorFrame {
            code: self.code(),
            message: self.to_string(),
            field: self.field(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: Value) -> Row {
        match v {
            Value::Object(m) => m,
            _ => Row::new(),
        }
    }

    fn samples() -> Vec<Message> {
        vec![
            Message::Hello(Hello {
                clinic_id: "clinic-1".into(),
                agent_version: "0.1.0".into(),
                last_acked_seq: 7,
                source_id: 42,
                restarts: Some(1),
                clock_ms: Some(1_764_580_502_114),
                features: vec![FEATURE_CHANNELS.into()],
            }),
            Message::Welcome(Welcome {
                session_id: "s1".into(),
                acked_seq: 7,
                heartbeat_interval_ms: 10_000,
                max_frame_bytes: 1 << 20,
                channels: vec![ChannelDef {
                    name: "voip.call".into(),
                    direction: ChannelDirection::Down,
                    delivery: ChannelDelivery::Transient,
                    ttl_ms: Some(30_000),
                    max_bytes: 4096,
                    rate_per_second: 20.0,
                    schema: json!({"type": "object"}),
                    encrypt: vec!["caller".into()],
                }],
            }),
            Message::Events(Events {
                prev_seq: 7,
                events: vec![Event {
                    seq: 8,
                    entity: "patient".into(),
                    op: Op::Update,
                    key: obj(json!({"id": 3})),
                    row: Some(obj(json!({"id": 3, "name": "x"}))),
                    committed_at: "2026-01-01T00:00:00.000Z".into(),
                }],
                head_seq: Some(9),
                restarts: Some(2),
                next_committed_at: Some("2026-01-01T00:00:00.250Z".into()),
            }),
            Message::Ack(Ack { seq: 8 }),
            Message::Update(Update {
                update_id: "u1".into(),
                entity: "patient".into(),
                op: UpdateOp::Delete,
                key: obj(json!({"id": 3})),
                row: None,
            }),
            Message::UpdateResult(UpdateResult {
                update_id: "u1".into(),
                status: UpdateStatus::Failed,
                reason: Some("no such table".into()),
            }),
            Message::Error(ErrorFrame {
                code: ErrorCode::Gap,
                message: "m".into(),
                field: Some("prev_seq".into()),
            }),
            Message::Channel(ChannelMessage {
                message_id: "msg_1".into(),
                channel: "voip.call".into(),
                payload: obj(json!({"call_id": "c1", "state": "ringing"})),
                ttl_ms: Some(29_500),
                published_at: "2026-01-01T00:00:00.000Z".into(),
            }),
            Message::ChannelAck(ChannelAck {
                message_id: "msg_1".into(),
                status: ChannelAckStatus::Refused,
                reason: Some("payload does not match the schema".into()),
                field: Some("/state".into()),
            }),
        ]
    }

    #[test]
    fn every_message_type_round_trips() {
        for m in samples() {
            let text = m.encode();
            let back = Message::decode(&text, DEFAULT_MAX_FRAME_BYTES).expect(&text);
            assert_eq!(back, m, "{text}");
            let v: Value = serde_json::from_str(&text).expect("json");
            assert_eq!(v["type"], m.kind());
            assert_eq!(v["v"], 1);
        }
    }

    #[test]
    fn borrowed_events_encode_like_owned_ones() {
        let Message::Events(ev) = samples().remove(2) else {
            panic!("sample 2 is events")
        };
        let owned = Message::Events(ev.clone()).encode();
        assert_eq!(
            encode_events(
                ev.prev_seq,
                EventsMeta {
                    head_seq: ev.head_seq,
                    restarts: ev.restarts,
                    next_committed_at: ev.next_committed_at.as_deref(),
                },
                ev.events.iter()
            ),
            owned
        );
        let one = serde_json::to_string(&ev.events[0]).expect("json");
        assert_eq!(encoded_len(&ev.events[0]), one.len());
    }

    #[test]
    fn oversized_frame_is_rejected_before_parsing() {
        let text = format!(
            r#"{{"v":1,"type":"ack","seq":1,"pad":"{}"}}"#,
            "x".repeat(100)
        );
        let err = Message::decode(&text, 50).unwrap_err();
        assert_eq!(err.code(), ErrorCode::FrameTooLarge);
    }

    #[test]
    fn unknown_type_is_named() {
        let err = Message::decode(r#"{"v":1,"type":"launch"}"#, 1000).unwrap_err();
        assert_eq!(err, DecodeError::UnknownType("launch".into()));
        assert!(err.to_string().contains("launch"));
    }

    #[test]
    fn wrong_version_is_rejected() {
        let err = Message::decode(r#"{"v":2,"type":"ack","seq":1}"#, 1000).unwrap_err();
        assert_eq!(err.code(), ErrorCode::UnsupportedVersion);
        let err = Message::decode(r#"{"type":"ack","seq":1}"#, 1000).unwrap_err();
        assert_eq!(err, DecodeError::MissingField("v".into()));
    }

    #[test]
    fn bad_nested_field_is_named_with_its_path() {
        let text = r#"{"v":1,"type":"events","prev_seq":0,"events":[
            {"seq":1,"entity":"a","op":"insert","key":{},"row":{},"committed_at":"t"},
            {"seq":"two","entity":"a","op":"insert","key":{},"row":{},"committed_at":"t"}]}"#;
        let err = Message::decode(text, 10_000).unwrap_err();
        assert_eq!(err.field().as_deref(), Some("events[1].seq"), "{err}");
        let text = r#"{"v":1,"type":"events","prev_seq":0,"events":[
            {"seq":1,"entity":"a","op":"upsert","key":{},"row":{},"committed_at":"t"}]}"#;
        let err = Message::decode(text, 10_000).unwrap_err();
        assert_eq!(err.field().as_deref(), Some("events[0].op"), "{err}");
    }

    #[test]
    fn unknown_and_missing_fields_are_rejected() {
        let err =
            Message::decode(r#"{"v":1,"type":"ack","seq":1,"extra":true}"#, 1000).unwrap_err();
        assert!(err.to_string().contains("extra"), "{err}");
        let err = Message::decode(r#"{"v":1,"type":"ack"}"#, 1000).unwrap_err();
        assert!(err.to_string().contains("seq"), "{err}");
    }

    #[test]
    fn the_events_fast_path_keeps_rows_as_received_and_agrees_with_the_full_decoder() {
        let Message::Events(ev) = samples().remove(2) else {
            panic!("sample 2 is events")
        };
        let text = Message::Events(ev.clone()).encode();
        let Ok(Inbound::Events(raw)) = decode_inbound(&text, DEFAULT_MAX_FRAME_BYTES) else {
            panic!("events frame on the fast path")
        };
        assert_eq!(raw.prev_seq, ev.prev_seq);
        assert_eq!((raw.head_seq, raw.restarts), (ev.head_seq, ev.restarts));
        assert_eq!(raw.events.len(), ev.events.len());
        for (r, e) in raw.events.iter().zip(&ev.events) {
            assert_eq!(
                (r.seq, r.entity.as_str(), r.op),
                (e.seq, e.entity.as_str(), e.op)
            );
            let key: Row = serde_json::from_str(r.key.get()).expect("key json");
            assert_eq!(key, e.key);
            let row: Option<Row> = r
                .row
                .as_deref()
                .map(|x| serde_json::from_str(x.get()).expect("row json"));
            assert_eq!(row, e.row);
        }
        // The text of a row is kept byte for byte (spacing, order, number spelling).
        let text = r#"{"v":1,"type":"events","prev_seq":0,"events":[
            {"seq":1,"entity":"a","op":"insert","key": {"id":1},"row": {"z":1.50, "a":"x"},"committed_at":"t"},
            {"seq":2,"entity":"a","op":"delete","key":{"id":2},"row":null,"committed_at":"t"}]}"#;
        let Ok(Inbound::Events(raw)) = decode_inbound(text, 10_000) else {
            panic!("fast path")
        };
        assert_eq!(raw.events[0].key.get(), r#"{"id":1}"#);
        assert_eq!(
            raw.events[0].row.as_deref().map(RawValue::get),
            Some(r#"{"z":1.50, "a":"x"}"#)
        );
        assert!(raw.events[1].row.is_none(), "null row is no row");
        // Other frames come through as messages.
        let ack = Message::Ack(Ack { seq: 3 }).encode();
        assert!(matches!(
            decode_inbound(&ack, 1000),
            Ok(Inbound::Other(Message::Ack(Ack { seq: 3 })))
        ));
    }

    #[test]
    fn a_bad_events_frame_gets_the_same_named_error_from_the_fast_path() {
        let bad = [
            // (frame, field the error names)
            (
                r#"{"v":1,"type":"events","prev_seq":0,"events":[{"seq":"two","entity":"a","op":"insert","key":{},"committed_at":"t"}]}"#,
                Some("events[0].seq"),
            ),
            (
                r#"{"v":1,"type":"events","prev_seq":0,"events":[{"seq":1,"entity":"a","op":"upsert","key":{},"committed_at":"t"}]}"#,
                Some("events[0].op"),
            ),
            (
                r#"{"v":1,"type":"events","prev_seq":0,"events":[{"seq":1,"entity":"a","op":"insert","key":{},"committed_at":"t","x":1}]}"#,
                Some("events[0].x"),
            ),
            (r#"{"v":1,"type":"events","events":[]}"#, Some("prev_seq")),
            (
                r#"{"v":2,"type":"events","prev_seq":0,"events":[]}"#,
                Some("v"),
            ),
            (
                r#"{"v":1,"type":"events","prev_seq":0,"events":[{"seq":1,"entity":"a","op":"insert","key":[1],"committed_at":"t"}]}"#,
                Some("events[0].key"),
            ),
            (
                r#"{"v":1,"type":"events","prev_seq":0,"events":[{"seq":1,"entity":"a","op":"insert","key":{},"row":"r","committed_at":"t"}]}"#,
                Some("events[0].row"),
            ),
        ];
        for (text, field) in bad {
            let fast = decode_inbound(text, 10_000).expect_err(text);
            assert_eq!(fast.field().as_deref(), field, "{text}: {fast}");
            // The full decoder refuses the same frames for the same field.
            let full = Message::decode(text, 10_000).expect_err(text);
            assert_eq!(full.field(), fast.field(), "{text}");
        }
        let big = format!(
            r#"{{"v":1,"type":"events","prev_seq":0,"events":[],"head_seq":{}}}"#,
            "1".repeat(5)
        );
        assert_eq!(
            decode_inbound(&big, 20).expect_err("too large").code(),
            ErrorCode::FrameTooLarge
        );
    }

    #[test]
    fn garbage_never_panics() {
        for text in [
            "",
            "[]",
            "null",
            "{",
            "{\"v\":1}",
            "{\"v\":\"1\",\"type\":1}",
            "\u{0}",
        ] {
            assert!(Message::decode(text, 1000).is_err(), "{text:?}");
        }
    }
}

/// RFC 3339 UTC with milliseconds, from Unix milliseconds (civil-from-days, Howard Hinnant).
pub fn iso_from_millis(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let millis = ms.rem_euclid(1000);
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        sod / 3600,
        (sod % 3600) / 60,
        sod % 60
    )
}

/// Milliseconds since the Unix epoch of an RFC 3339 timestamp as the adapters write
/// `committed_at` (`2026-11-27T10:15:02.114Z`, `…+02:00`, fraction optional); `None` if it is
/// not one.
pub fn rfc3339_ms(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let t = s.get(r)?;
        t.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| t.parse().ok())?
    };
    if b.len() < 19 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    let mut i = 19;
    let mut ms = 0i64;
    if b.get(i) == Some(&b'.') {
        let start = i + 1;
        i = start;
        while b.get(i).is_some_and(|c| c.is_ascii_digit()) {
            i += 1;
        }
        let frac = s.get(start..i)?;
        let padded: String = frac.chars().chain("000".chars()).take(3).collect();
        ms = padded.parse().ok()?;
    }
    let offset_min = match s.get(i..)? {
        "" | "Z" | "z" => 0,
        o if o.len() == 6 && (o.starts_with('+') || o.starts_with('-')) => {
            let v = num(i + 1..i + 3)? * 60 + num(i + 4..i + 6)?;
            if o.starts_with('-') {
                -v
            } else {
                v
            }
        }
        _ => return None,
    };
    // Days from the civil date (proleptic Gregorian), Howard Hinnant's algorithm.
    let y2 = if mo <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + h * 3600 + mi * 60 + sec - offset_min * 60;
    u64::try_from(secs * 1000 + ms).ok()
}

#[cfg(test)]
mod time_tests {
    use super::rfc3339_ms;

    #[test]
    fn parses_the_adapters_timestamps() {
        assert_eq!(rfc3339_ms("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(
            rfc3339_ms("2026-11-27T10:15:02.114Z"),
            Some(1_795_774_502_114)
        );
        assert_eq!(
            rfc3339_ms("2026-11-27T12:15:02.114+02:00"),
            Some(1_795_774_502_114)
        );
        assert_eq!(rfc3339_ms("2026-11-27 10:15:02.1"), Some(1_795_774_502_100));
        assert_eq!(
            rfc3339_ms("2000-02-29T00:00:00.123456Z"),
            Some(951_782_400_123)
        );
        for bad in [
            "",
            "yesterday",
            "2026-13-01T00:00:00Z",
            "2026-11-27T10:15",
            "2026-11-27T10:15:02X",
        ] {
            assert_eq!(rfc3339_ms(bad), None, "{bad}");
        }
    }
}

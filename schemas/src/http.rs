//! The HTTP fallback transport: the same protocol messages as over the WebSocket, carried by
//! plain requests that every proxy passes (see `docs/PROTOCOL.md`, "HTTP fallback").
//!
//! - `POST /v1/http/open` (same credentials as the upgrade) → [`Opened`].
//! - `POST /v1/http/{channel}/send?seq=N`, body: protocol messages, one JSON object per line.
//!   `seq` counts the agent's sends from 1; a repeated `seq` is answered and ignored, so a send
//!   whose answer was lost can be retried.
//! - `GET /v1/http/{channel}/poll?after=C` → [`Polled`]: the messages after cursor `C`, waiting
//!   up to `poll_wait_ms` for one. Messages stay at the gateway until a later poll's `after`
//!   passes them, so a lost answer is simply polled again. Each poll is also the heartbeat.
//! - `POST /v1/http/{channel}/close` with [`Closed`]: the agent's close.
//!
//! The JSON Schema files `schemas/json/http_opened.schema.json` and `http_polled.schema.json`
//! describe these answers.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// Answer to `open`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Opened {
    /// The channel's unguessable id; the path of every later request.
    pub channel: String,
    /// How long the gateway holds a poll open when there is nothing to say.
    pub poll_wait_ms: u64,
}

/// Answer to `poll`.
#[derive(Debug, Serialize, Deserialize)]
pub struct Polled {
    /// The cursor of the last message in `messages` (or the `after` asked for when none).
    pub cursor: u64,
    /// Protocol messages, oldest first, each a complete envelope.
    pub messages: Vec<Box<RawValue>>,
    /// Present once the session has ended: no more messages will come.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub closed: Option<Closed>,
}

/// A close, either way: the WebSocket close code and reason it stands for.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Closed {
    pub code: u16,
    #[serde(default)]
    pub reason: String,
}

//! Tether wire protocol.
//!
//! Every WebSocket text frame is one JSON object, the *envelope*: `{"v": 1, "type": "<kind>", ...}`
//! with the fields of that message type beside `v` and `type`. The JSON Schema files under
//! `schemas/json/` describe each message type and the optional per-entity payloads; this crate holds
//! the matching Rust types, a decoder that rejects bad frames with an error naming the field, and an
//! [`EntitySchemas`] registry that validates entity rows against those files at run time.
#![forbid(unsafe_code)]

mod entity;
pub mod http;
mod message;

pub use entity::{EntitySchemaError, EntitySchemas};
pub use message::*;

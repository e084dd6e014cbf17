//! A raw WebSocket client for tests that speak the protocol frame by frame.

use std::time::Duration;

use actix_codec::Framed;
use awc::ws::{self, Frame};
use awc::BoxedSocket;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};

pub type Ws = Framed<BoxedSocket, ws::Codec>;

pub async fn connect(url: &str) -> Ws {
    let (_, framed) = super::client()
        .ws(url)
        .max_frame_size(1 << 20)
        .connect()
        .await
        .expect("ws connect");
    framed
}

pub async fn send(ws: &mut Ws, v: Value) {
    ws.send(ws::Message::Text(v.to_string().into()))
        .await
        .expect("send");
}

/// Next text frame as JSON, answering pings on the way; None if the socket closed.
pub async fn next_json(ws: &mut Ws) -> Option<Value> {
    loop {
        let item = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("a frame within 5 s")?;
        match item.expect("frame") {
            Frame::Text(t) => return Some(serde_json::from_slice(&t).expect("json")),
            Frame::Ping(b) => {
                let _ = ws.send(ws::Message::Pong(b)).await;
            }
            Frame::Close(_) => return None,
            _ => {}
        }
    }
}

/// Waits for the close frame and returns its code.
pub async fn close_code(ws: &mut Ws) -> Option<u16> {
    loop {
        let item = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("close within 5 s")?;
        if let Ok(Frame::Close(reason)) = item {
            return reason.map(|r| u16::from(r.code));
        }
    }
}

pub fn hello(clinic: &str) -> Value {
    json!({"v": 1, "type": "hello", "clinic_id": clinic, "agent_version": "test", "last_acked_seq": 0})
}

pub fn event(seq: u64) -> Value {
    json!({"seq": seq, "entity": "patient", "op": "insert", "key": {"id": seq},
           "row": {"id": seq, "name": "N"}, "committed_at": "2026-11-27T00:00:00.000Z"})
}

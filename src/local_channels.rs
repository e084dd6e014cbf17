//! Channels on the agent's loopback admin endpoint: the clinic's own applications (a front desk
//! app, a phone pop-up) subscribe to down channels and publish on up channels.
//!
//! - `GET /v1/channels?names=voip.call,notice.broadcast` with `Upgrade: websocket`: one JSON
//!   text frame per message (`message_id`, `channel`, `payload`, `published_at`, `ttl_ms` for
//!   transient ones); the client may publish with `{"type":"publish","channel":…,"payload":…,
//!   "message_id":…}` and gets `{"type":"ack","message_id":…,"status":"accepted"|"refused",…}`.
//! - The same `GET` without the upgrade: Server-Sent Events (`id` = message id, `event` = the
//!   channel), for the simplest clients (a browser's `EventSource`).
//! - `POST /v1/channels/{name}`: publish the JSON body; 202 once the gateway has it durably
//!   (`Idempotency-Key`, if given, is the message id: a retry is not a second message).
//!
//! Every request carries the local token (`Authorization: Bearer …`, or `?access_token=` for
//! clients that cannot set headers) from the file `agent.admin.channels_token_file`, which the
//! agent writes at its first start readable by its own account only (administrators can read
//! it; see docs/CHANNELS.md). No payload reaches a log.

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_codec::Framed;
use actix_http::ws;
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::{json, Value};
use tether_actors::channels::{ChannelBoard, ChannelError, Subscription};
use tether_actors::connection::{CallError, Publish};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::admin::{AdminState, Request};

/// How long a publication waits for the gateway's answer.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(10);
/// A quiet stream sends a keep-alive (SSE comment, WebSocket ping) this often.
const KEEPALIVE: Duration = Duration::from_secs(15);
/// Largest frame a local WebSocket client may send.
const MAX_CLIENT_FRAME: usize = 256 * 1024;

/// What the channel endpoints need beside the admin state.
pub struct LocalChannels {
    pub board: Arc<ChannelBoard>,
    /// The local token subscribers and publishers present.
    pub token: String,
}

/// The token in `path` (made, 32 random bytes in hex, and written private the first time).
pub fn load_or_create_token(path: &std::path::Path) -> std::io::Result<String> {
    match std::fs::read_to_string(path) {
        Ok(t) if t.trim().len() >= 32 => return Ok(t.trim().to_string()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let token: String = (0..4)
        .map(|_| format!("{:016x}", rand::random::<u64>()))
        .collect();
    crate::security::keys::write_file(path, format!("{token}\n").as_bytes(), true)
        .map_err(std::io::Error::other)?;
    log::info!(target: "supervisor", "event=channels_token_created file={}", path.display());
    Ok(token)
}

/// Whether the request presents the local token.
fn authorised(ch: &LocalChannels, req: &Request) -> bool {
    let bearer = req
        .header("authorization")
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let query = query_param(&req.query, "access_token");
    let given = bearer.or(query.as_deref()).unwrap_or("");
    given.len() == ch.token.len() && openssl::memcmp::eq(given.as_bytes(), ch.token.as_bytes())
}

/// A comma-separated list of channel names (`?names=`), empty when absent.
pub fn name_list(names: Option<&str>) -> Vec<String> {
    names
        .map(|n| {
            n.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// A query parameter, percent-decoded (`+` as space).
pub fn query_param(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (k == name).then(|| percent_decode(v))
    })
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("zz");
                match u8::from_str_radix(hex, 16) {
                    Ok(v) => {
                        out.push(v);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A refusal as problem+json, with the field at fault when there is one.
fn problem(code: u16, detail: String, field: Option<&str>) -> (u16, String, String) {
    let mut body =
        json!({"type": "about:blank", "title": reason(code), "status": code, "detail": detail});
    if let Some(f) = field {
        body["field"] = Value::from(f);
    }
    (code, "application/problem+json".into(), body.to_string())
}

fn reason(code: u16) -> &'static str {
    match code {
        101 => "Switching Protocols",
        200 => "OK",
        202 => "Accepted",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        413 => "Payload Too Large",
        422 => "Unprocessable Content",
        429 => "Too Many Requests",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Error",
    }
}

async fn write_answer(
    conn: &mut tokio::net::TcpStream,
    (code, ctype, body): (u16, String, String),
) -> std::io::Result<()> {
    let retry = if code == 429 {
        "Retry-After: 1\r\n"
    } else {
        ""
    };
    let auth = if code == 401 {
        "WWW-Authenticate: Bearer realm=\"tether-agent\"\r\n"
    } else {
        ""
    };
    let resp = format!(
        "HTTP/1.1 {code} {}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\n{retry}{auth}Access-Control-Allow-Origin: *\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n{body}",
        reason(code),
        body.len()
    );
    conn.write_all(resp.as_bytes()).await?;
    conn.shutdown().await
}

/// Serves a request under `/v1/channels`; takes the connection (streams keep it).
pub async fn serve(
    mut conn: tokio::net::TcpStream,
    st: Arc<AdminState>,
    req: Request,
) -> std::io::Result<()> {
    let Some(ch) = st.channels.as_ref() else {
        return write_answer(
            &mut conn,
            problem(404, "channels are not served by this agent".into(), None),
        )
        .await;
    };
    if req.method == "OPTIONS" {
        // A browser's preflight for a publication from another origin (the token decides).
        let resp = "HTTP/1.1 204 No Content\r\nAccess-Control-Allow-Origin: *\r\nAccess-Control-Allow-Methods: GET, POST\r\nAccess-Control-Allow-Headers: Authorization, Content-Type, Idempotency-Key\r\nAccess-Control-Max-Age: 600\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
        conn.write_all(resp.as_bytes()).await?;
        return conn.shutdown().await;
    }
    if !authorised(ch, &req) {
        log::warn!(target: "audit", "event=channels_access_denied path={} reason=\"missing or wrong local token\"", crate::security::log_value(&req.path, 64));
        return write_answer(
            &mut conn,
            problem(401, "the local channels token is missing or wrong (see agent.admin.channels_token_file)".into(), Some("Authorization")),
        )
        .await;
    }
    if let Some(name) = req.path.strip_prefix("/v1/channels/") {
        if req.method != "POST" {
            return write_answer(&mut conn, problem(405, "POST only".into(), None)).await;
        }
        let answer = publish_http(&st, ch, name, &req).await;
        return write_answer(&mut conn, answer).await;
    }
    if req.method != "GET" {
        return write_answer(
            &mut conn,
            problem(
                405,
                "GET only (POST /v1/channels/{name} publishes)".into(),
                None,
            ),
        )
        .await;
    }
    let names = name_list(query_param(&req.query, "names").as_deref());
    let sub = match ch.board.subscribe(names, Instant::now()) {
        Ok(s) => s,
        Err(e) => {
            let code = if matches!(e, ChannelError::NotKnownYet) {
                503
            } else {
                400
            };
            return write_answer(&mut conn, problem(code, e.to_string(), Some("names"))).await;
        }
    };
    let upgrade = req
        .header("upgrade")
        .is_some_and(|u| u.eq_ignore_ascii_case("websocket"));
    if upgrade {
        websocket(conn, st.clone(), req, sub).await
    } else {
        sse(conn, sub).await
    }
}

/// Server-Sent Events until the client leaves or the subscription ends (chunked: HTTP/1.1
/// clients read a body of unknown length that way).
async fn sse(conn: tokio::net::TcpStream, mut sub: Subscription) -> std::io::Result<()> {
    let (mut rd, mut wr) = conn.into_split();
    wr.write_all(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-store\r\nAccess-Control-Allow-Origin: *\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n").await?;
    write_chunk(&mut wr, ": subscribed\n\n").await?;
    let mut scratch = [0u8; 256];
    loop {
        tokio::select! {
            m = sub.rx.recv() => {
                let Some(text) = m else { break };
                let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
                let id = v["message_id"].as_str().unwrap_or_default();
                let event = v["channel"].as_str().unwrap_or("message");
                write_chunk(&mut wr, &format!("id: {id}\nevent: {event}\ndata: {text}\n\n")).await?;
            }
            n = rd.read(&mut scratch) => {
                // The client closed (or sent something an event stream never expects).
                if n.unwrap_or(0) == 0 { break }
            }
            _ = tokio::time::sleep(KEEPALIVE) => {
                write_chunk(&mut wr, ": keep-alive\n\n").await?;
            }
        }
    }
    let _ = wr.write_all(b"0\r\n\r\n").await;
    wr.shutdown().await
}

async fn write_chunk(wr: &mut tokio::net::tcp::OwnedWriteHalf, text: &str) -> std::io::Result<()> {
    wr.write_all(format!("{:x}\r\n{text}\r\n", text.len()).as_bytes())
        .await?;
    wr.flush().await
}

/// A publication as a WebSocket client sends it.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WsPublish {
    #[serde(rename = "type")]
    kind: String,
    channel: String,
    payload: serde_json::Map<String, Value>,
    #[serde(default)]
    message_id: Option<String>,
}

async fn websocket(
    mut conn: tokio::net::TcpStream,
    st: Arc<AdminState>,
    req: Request,
    mut sub: Subscription,
) -> std::io::Result<()> {
    let Some(key) = req.header("sec-websocket-key") else {
        return write_answer(
            &mut conn,
            problem(
                400,
                "Sec-WebSocket-Key is missing".into(),
                Some("Sec-WebSocket-Key"),
            ),
        )
        .await;
    };
    let accept = ws::hash_key(key.as_bytes());
    let accept = String::from_utf8_lossy(&accept);
    let head = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
    );
    conn.write_all(head.as_bytes()).await?;
    let mut framed = Framed::new(conn, ws::Codec::new().max_size(MAX_CLIENT_FRAME));
    // Publications run while deliveries go on; their answers come back here.
    let (acks_tx, mut acks) = tokio::sync::mpsc::unbounded_channel::<String>();
    let mut quiet = tokio::time::interval(KEEPALIVE);
    quiet.reset();
    loop {
        tokio::select! {
            m = sub.rx.recv() => {
                let Some(text) = m else { break };
                if framed.send(ws::Message::Text(text.to_string().into())).await.is_err() { break }
            }
            a = acks.recv() => {
                let Some(text) = a else { continue };
                if framed.send(ws::Message::Text(text.into())).await.is_err() { break }
            }
            f = framed.next() => match f {
                None | Some(Err(_)) => break,
                Some(Ok(ws::Frame::Ping(p))) => { let _ = framed.send(ws::Message::Pong(p)).await; }
                Some(Ok(ws::Frame::Close(_))) => {
                    let _ = framed.send(ws::Message::Close(None)).await;
                    break;
                }
                Some(Ok(ws::Frame::Text(t))) => {
                    let answer = match serde_json::from_slice::<WsPublish>(&t) {
                        Err(e) => Some(json!({"type": "ack", "status": "refused", "reason": format!("not a publication: {e}")}).to_string()),
                        Ok(p) if p.kind != "publish" => Some(json!({"type": "ack", "status": "refused", "field": "type", "reason": "the only message a subscriber sends is {\"type\":\"publish\",…}"}).to_string()),
                        Ok(p) => {
                            let (st, tx) = (st.clone(), acks_tx.clone());
                            actix::spawn(async move {
                                let Some(ch) = st.channels.as_ref() else { return };
                                let (id, outcome) = publish(&st, ch, &p.channel, p.payload, p.message_id).await;
                                let mut v = match outcome {
                                    Ok(()) => json!({"type": "ack", "status": "accepted"}),
                                    Err((code, reason, field)) => json!({"type": "ack", "status": "refused", "code": code, "reason": reason, "field": field}),
                                };
                                v["message_id"] = Value::from(id);
                                v["channel"] = Value::from(p.channel);
                                let _ = tx.send(v.to_string());
                            });
                            None
                        }
                    };
                    if let Some(a) = answer {
                        if framed.send(ws::Message::Text(a.into())).await.is_err() { break }
                    }
                }
                Some(Ok(_)) => {}
            },
            _ = quiet.tick() => {
                if framed.send(ws::Message::Ping(bytes::Bytes::new())).await.is_err() { break }
            }
        }
    }
    Ok(())
}

/// A refusal: the HTTP status, why, and the field at fault.
type Refused = (u16, String, Option<String>);

/// Checks and publishes one message; answers its id and the outcome.
async fn publish(
    st: &AdminState,
    ch: &LocalChannels,
    channel: &str,
    mut payload: serde_json::Map<String, Value>,
    message_id: Option<String>,
) -> (String, Result<(), Refused>) {
    let id = message_id.unwrap_or_else(|| {
        format!(
            "up_{:016x}{:016x}",
            rand::random::<u64>(),
            rand::random::<u64>()
        )
    });
    if id.is_empty() || id.len() > 80 || !id.bytes().all(|b| b.is_ascii_graphic()) {
        return (
            id,
            Err((
                400,
                "message_id must be 1-80 visible ASCII characters".into(),
                Some("message_id".into()),
            )),
        );
    }
    let checked = ch
        .board
        .check_publish(channel, &payload, Instant::now())
        .and_then(|_| ch.board.seal_publish(channel, &id, &mut payload));
    if let Err(e) = checked {
        let (code, field) = match &e {
            ChannelError::Unknown(..) => (404, Some("channel".to_string())),
            ChannelError::NotUp(_) | ChannelError::NotDown(_) => (409, Some("channel".into())),
            ChannelError::TooLarge { .. } => (413, Some("payload".into())),
            ChannelError::Invalid { field, .. } => (422, Some(format!("payload{field}"))),
            ChannelError::RateLimited(..) => (429, None),
            ChannelError::NotKnownYet | ChannelError::NoDataKey(_) => (503, None),
            ChannelError::Sealing { field, .. } => (500, Some(format!("payload/{field}"))),
        };
        return (id, Err((code, e.to_string(), field)));
    }
    let Some(conn) = st.slots.as_ref().and_then(|s| s.connection.get()) else {
        return (id, Err((503, "the agent is starting".into(), None)));
    };
    let message = tether_schemas::ChannelMessage {
        message_id: id.clone(),
        channel: channel.to_string(),
        payload,
        ttl_ms: None,
        published_at: tether_schemas::iso_from_millis(crate::security::unix_now_ms() as i64),
    };
    let outcome = match conn
        .send(Publish {
            message,
            timeout: PUBLISH_TIMEOUT,
        })
        .await
    {
        Ok(Ok(a)) if a.status == tether_schemas::ChannelAckStatus::Accepted => Ok(()),
        Ok(Ok(a)) => Err((
            422,
            a.reason.unwrap_or_else(|| "refused by the gateway".into()),
            a.field,
        )),
        Ok(Err(e @ CallError::TooLarge { .. })) => {
            Err((413, e.to_string(), Some("payload".into())))
        }
        Ok(Err(e @ CallError::Timeout(_))) => Err((
            504,
            format!("{e}; publish again with the same message_id"),
            None,
        )),
        Ok(Err(e)) => Err((
            503,
            format!("{e}; publish again with the same message_id"),
            None,
        )),
        Err(_) => Err((
            503,
            "the agent's connection actor is restarting; publish again".into(),
            None,
        )),
    };
    (id, outcome)
}

async fn publish_http(
    st: &AdminState,
    ch: &LocalChannels,
    name: &str,
    req: &Request,
) -> (u16, String, String) {
    let payload = match serde_json::from_slice::<Value>(&req.body) {
        Ok(Value::Object(m)) => m,
        Ok(_) => {
            return problem(
                400,
                "the body must be a JSON object (the payload)".into(),
                Some("payload"),
            )
        }
        Err(e) => {
            return problem(
                400,
                format!(
                    "the body is not JSON: line {} column {}",
                    e.line(),
                    e.column()
                ),
                Some("payload"),
            )
        }
    };
    let key = req.header("idempotency-key").map(str::to_string);
    let (id, outcome) = publish(st, ch, name, payload, key).await;
    match outcome {
        Ok(()) => (
            202,
            "application/json".into(),
            json!({"message_id": id, "channel": name, "status": "accepted"}).to_string(),
        ),
        Err((code, why, field)) => {
            let (c, t, b) = problem(code, why, field.as_deref());
            let mut v: Value = serde_json::from_str(&b).unwrap_or(Value::Null);
            v["message_id"] = Value::from(id);
            (c, t, v.to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_parameters_are_found_and_decoded() {
        let q = "names=voip.call%2Cnotice&access_token=ab+c";
        assert_eq!(query_param(q, "names").as_deref(), Some("voip.call,notice"));
        assert_eq!(query_param(q, "access_token").as_deref(), Some("ab c"));
        assert_eq!(query_param(q, "other"), None);
        assert_eq!(query_param("x=%zz%4", "x").as_deref(), Some("%zz%4"));
    }

    #[test]
    fn the_token_is_made_once_private_and_kept() {
        let dir = std::env::temp_dir().join(format!("tether-token-{:x}", rand::random::<u64>()));
        let path = dir.join("channels.token");
        let t1 = load_or_create_token(&path).expect("made");
        assert_eq!(t1.len(), 64);
        assert_eq!(load_or_create_token(&path).expect("read"), t1);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let _ = std::fs::remove_dir_all(dir);
    }
}

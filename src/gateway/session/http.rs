//! The HTTP fallback transport (`tether_schemas::http`, `docs/PROTOCOL.md`): for clinics whose
//! proxies refuse or break the WebSocket upgrade.
//!
//! `open` admits the clinic exactly like the upgrade (admission, origin, token, certificate)
//! and starts an ordinary [`Session`] whose input is fed from `send` requests and whose output
//! is read by a pump into a per-channel queue that `poll` requests drain. The session cannot
//! tell the difference: the agent's messages become text frames, each poll becomes a ping (the
//! heartbeat), the agent's `close` becomes a close frame. Messages stay queued until a later
//! poll's `after` passes their cursor, so an answer lost on the way is polled again; a `send`
//! retried under the same `seq` is answered and ignored.
//!
//! With several gateway nodes, a channel lives in the node that opened it, and its id ends with
//! that node's id (hex). A `send`, `poll` or `close` that the load balancer hands to another
//! node is passed on to the channel's node (its address from the node table), signed with the
//! key the nodes share through the store and carrying the client certificate's identities, so
//! the channel's node checks exactly what it would have checked itself. A forwarded request is
//! never forwarded again.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use actix_codec::{Decoder, Encoder};
use actix_http::ws::{CloseCode, CloseReason, Codec, Frame, Message as WsMessage};
use actix_web::error::PayloadError;
use actix_web::{web, HttpRequest, HttpResponse};
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use serde::Deserialize;
use tether_actors::log_target::{AUDIT, CONNECTION};
use tether_schemas::http::{Closed, Opened};
use tokio::sync::{mpsc, Notify};

use super::{admit, ws, GatewayState, PeerIdentity, Session};

/// The open channels, by id. Held in [`GatewayState`].
#[derive(Default)]
pub struct Channels {
    map: Mutex<HashMap<String, Arc<Channel>>>,
}

impl Channels {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Arc<Channel>>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn get(&self, id: &str) -> Option<Arc<Channel>> {
        self.lock().get(id).cloned()
    }

    /// Open channels (for status and tests).
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

struct Channel {
    /// The clinic the token named (`None` without tokens configured).
    clinic: Option<String>,
    input: mpsc::UnboundedSender<Result<Bytes, PayloadError>>,
    down: Mutex<Down>,
    /// Wakes polls when a message or the close arrives.
    notify: Notify,
}

#[derive(Default)]
struct Down {
    /// Messages for the agent with their cursors, oldest first.
    queue: VecDeque<(u64, String)>,
    last_cursor: u64,
    closed: Option<Closed>,
    /// The last `send` accepted.
    last_send: u64,
}

impl Channel {
    fn down(&self) -> MutexGuard<'_, Down> {
        self.down.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// One frame into the session, encoded as a client would (masked).
    fn feed(&self, msg: WsMessage) -> bool {
        let mut buf = BytesMut::new();
        if Codec::new().client_mode().encode(msg, &mut buf).is_err() {
            return false;
        }
        self.input.send(Ok(buf.freeze())).is_ok()
    }

    fn push(&self, text: String) {
        let mut d = self.down();
        d.last_cursor += 1;
        let c = d.last_cursor;
        d.queue.push_back((c, text));
        drop(d);
        self.notify.notify_waiters();
    }

    fn finish(&self, closed: Closed) {
        let mut d = self.down();
        if d.closed.is_none() {
            d.closed = Some(closed);
        }
        drop(d);
        self.notify.notify_waiters();
    }
}

fn problem(status: actix_web::http::StatusCode, message: &str) -> HttpResponse {
    crate::gateway::problem::problem(status, None, message)
}

/// `POST /v1/http/open`.
pub async fn open(req: HttpRequest, state: web::Data<GatewayState>) -> HttpResponse {
    let auth = match admit(&req, &state).await {
        Ok(a) => a,
        Err(refused) => return *refused,
    };
    let clinic = auth.as_ref().map(|a| a.clinic.clone());
    let session = Session::new(state.clone(), &req, auth, "http");
    let (tx, rx) = mpsc::unbounded_channel();
    let input = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    let codec = Codec::new().max_size(state.settings.max_frame_bytes);
    let output = ws::WebsocketContext::with_codec(session, input, codec);
    let id = new_channel_id(state.store.node());
    let ch = Arc::new(Channel {
        clinic,
        input: tx,
        down: Mutex::new(Down::default()),
        notify: Notify::new(),
    });
    state.http_channels.lock().insert(id.clone(), ch.clone());
    let hb = state.settings.heartbeat_interval;
    // The channel outlives its session long enough for the agent's last poll to see the close.
    let linger = (hb * 3).max(Duration::from_secs(1));
    let st = state.clone();
    let cid = id.clone();
    actix_web::rt::spawn(async move {
        pump(&ch, output, st.settings.max_frame_bytes).await;
        actix_web::rt::time::sleep(linger).await;
        st.http_channels.lock().remove(&cid);
    });
    log::debug!(target: CONNECTION, "event=http_channel_opened channel={} remote={}", &id[..9], req.peer_addr().map(|a| a.to_string()).unwrap_or_else(|| "-".into()));
    HttpResponse::Created().json(Opened {
        channel: id,
        poll_wait_ms: hb.as_millis() as u64,
    })
}

/// Reads the session's frames into the channel until the session ends.
async fn pump(
    ch: &Channel,
    output: impl futures_util::Stream<Item = Result<Bytes, actix_web::Error>>,
    max: usize,
) {
    let mut output = std::pin::pin!(output);
    let mut codec = Codec::new().client_mode().max_size(max.saturating_mul(2));
    let mut buf = BytesMut::new();
    let mut closed = None;
    'read: while let Some(chunk) = output.next().await {
        match chunk {
            Ok(b) => buf.extend_from_slice(&b),
            Err(_) => break,
        }
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(Frame::Text(t))) => match String::from_utf8(t.to_vec()) {
                    Ok(text) => ch.push(text),
                    Err(_) => {
                        log::error!(target: CONNECTION, "event=http_channel_bad_frame reason=\"text frame is not UTF-8\"")
                    }
                },
                Ok(Some(Frame::Close(r))) => {
                    closed = Some(match r {
                        Some(r) => Closed {
                            code: u16::from(r.code),
                            reason: r.description.unwrap_or_default(),
                        },
                        None => Closed {
                            code: 1005,
                            reason: String::new(),
                        },
                    });
                }
                // The session's pings: the agent's polls are the heartbeat here.
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(e) => {
                    log::error!(target: CONNECTION, "event=http_channel_bad_frame error={:?}", e.to_string());
                    break 'read;
                }
            }
        }
    }
    ch.finish(closed.unwrap_or(Closed {
        code: 1006,
        reason: "session ended".into(),
    }));
}

/// `h<32 hex>-<the opening node's id in hex>`: unguessable, and names where the channel lives.
fn new_channel_id(node: &str) -> String {
    let hex: String = node.bytes().map(|b| format!("{b:02x}")).collect();
    format!(
        "h{:016x}{:016x}-{hex}",
        rand::random::<u64>(),
        rand::random::<u64>()
    )
}

/// The node a channel id names, if it names one.
fn channel_node(id: &str) -> Option<String> {
    let (_, hex) = id.rsplit_once('-')?;
    if hex.is_empty() || hex.len() % 2 == 1 {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect();
    String::from_utf8(bytes?).ok()
}

/// Why a request has no channel here.
enum Missing {
    /// The channel lives in another node: pass the request on.
    Elsewhere(String),
    Refused(Box<HttpResponse>),
}

/// The channel of a request, checked against the client certificate under mutual TLS (the
/// identities a forwarding node vouched for, when `forwarded`).
fn channel(
    req: &HttpRequest,
    state: &GatewayState,
    id: &str,
    forwarded: Option<&[String]>,
) -> Result<Arc<Channel>, Missing> {
    use actix_web::http::StatusCode;
    let Some(ch) = state.http_channels.get(id) else {
        if forwarded.is_none() {
            if let Some(node) = channel_node(id).filter(|n| n != state.store.node()) {
                return Err(Missing::Elsewhere(node));
            }
        }
        return Err(Missing::Refused(Box::new(problem(
            StatusCode::NOT_FOUND,
            "unknown or closed channel",
        ))));
    };
    if super::mutual_tls(state) {
        let direct = req.conn_data::<PeerIdentity>().map(|p| p.0.as_slice());
        let ids = forwarded.or(direct);
        let ok = match (&ch.clinic, ids) {
            (Some(clinic), Some(ids)) => ids.contains(clinic),
            (None, Some(_)) => true,
            _ => false,
        };
        if !ok {
            let peer = req
                .peer_addr()
                .map(|a| a.to_string())
                .unwrap_or_else(|| "-".into());
            log::warn!(target: AUDIT, "event=http_channel_refused peer={peer} reason=certificate_mismatch");
            return Err(Missing::Refused(Box::new(problem(
                StatusCode::FORBIDDEN,
                "certificate does not match the channel",
            ))));
        }
    }
    Ok(ch)
}

const FORWARDED_BY: &str = "tether-forwarded-by";
const FORWARDED_PEER: &str = "tether-forwarded-peer";
const FORWARDED_AT: &str = "tether-forwarded-at";
const FORWARDED_SIG: &str = "tether-forwarded-signature";
/// A forwarded request older (or newer) than this is refused.
const FORWARD_WINDOW_MS: u64 = 60_000;

/// HMAC-SHA256 (hex) of a forwarded request under the nodes' shared key.
fn forward_signature(
    key: &[u8],
    method: &str,
    path: &str,
    by: &str,
    peer: &str,
    at_ms: u64,
    body: &[u8],
) -> String {
    let mut msg = Vec::with_capacity(body.len() + path.len() + 64);
    for part in [method, path, by, peer] {
        msg.extend_from_slice(part.as_bytes());
        msg.push(b'\n');
    }
    msg.extend_from_slice(body);
    crate::gateway::webhooks::sign(key, at_ms, &msg)
}

fn path_and_query(req: &HttpRequest) -> &str {
    req.uri()
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or_else(|| req.path())
}

/// `None` for a request straight from an agent; for one another node passed on, the client
/// certificate identities it vouches for, once its signature checks out.
fn forwarded_from(
    req: &HttpRequest,
    state: &GatewayState,
    body: &[u8],
) -> Result<Option<Vec<String>>, Box<HttpResponse>> {
    use actix_web::http::StatusCode;
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let Some(by) = header(FORWARDED_BY) else {
        return Ok(None);
    };
    let peer = header(FORWARDED_PEER).unwrap_or_default();
    let at: u64 = header(FORWARDED_AT)
        .and_then(|a| a.parse().ok())
        .unwrap_or(0);
    let sig = header(FORWARDED_SIG).unwrap_or_default();
    let now = crate::security::unix_now_ms();
    let want = forward_signature(
        &state.peer_key,
        req.method().as_str(),
        path_and_query(req),
        &by,
        &peer,
        at,
        body,
    );
    let fresh = now.abs_diff(at) <= FORWARD_WINDOW_MS;
    if !fresh || sig.len() != want.len() || !openssl::memcmp::eq(sig.as_bytes(), want.as_bytes()) {
        let from = req
            .peer_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|| "-".into());
        let reason = if fresh { "bad_signature" } else { "stale" };
        log::warn!(target: AUDIT, "event=forwarded_request_refused peer={from} claimed_node={by:?} reason={reason}");
        return Err(Box::new(problem(
            StatusCode::FORBIDDEN,
            "forwarded request not signed by a node of this cluster",
        )));
    }
    Ok(Some(
        peer.split(',')
            .filter(|p| !p.is_empty())
            .map(str::to_string)
            .collect(),
    ))
}

/// An HTTP client for the other nodes, one per worker (awc clients are not `Send`), and the
/// nodes' addresses as last read from the node table (kept for a heartbeat interval, so a busy
/// fallback does not read the table on every request).
pub struct PeerClient {
    client: awc::Client,
    addrs: std::cell::RefCell<HashMap<String, (String, std::time::Instant)>>,
}

impl PeerClient {
    /// `tls`: the nodes serve TLS; their certificates are checked against this connector's
    /// trust anchors.
    pub fn new(tls: Option<openssl::ssl::SslConnector>, heartbeat: Duration) -> PeerClient {
        // A poll is held up to a heartbeat interval.
        let timeout = heartbeat + Duration::from_secs(10);
        let connector = awc::Connector::new()
            .limit(64)
            .timeout(Duration::from_secs(5));
        let connector = match tls {
            Some(t) => connector.openssl(t),
            None => connector,
        };
        PeerClient {
            client: awc::Client::builder()
                .connector(connector)
                .timeout(timeout)
                .disable_redirects()
                .finish(),
            addrs: Default::default(),
        }
    }

    /// Where live node `node` listens (from the node table, at most a heartbeat interval old).
    async fn addr_of(&self, state: &GatewayState, node: &str) -> Option<String> {
        let hb = state.settings.heartbeat_interval;
        if let Some((addr, at)) = self.addrs.borrow().get(node) {
            if at.elapsed() < hb {
                return Some(addr.clone());
            }
        }
        let now = crate::security::unix_now_ms();
        let nodes = state.store.nodes().await.ok()?;
        let mut cache = self.addrs.borrow_mut();
        cache.clear();
        let read = std::time::Instant::now();
        for n in nodes
            .into_iter()
            .filter(|n| crate::gateway::cluster::alive(n, hb, now))
        {
            cache.insert(n.node_id, (n.addr, read));
        }
        cache.get(node).map(|(a, _)| a.clone())
    }
}

/// Passes a channel's request on to `node`, where the channel lives, and relays its answer.
async fn forward(
    req: &HttpRequest,
    state: &GatewayState,
    node: &str,
    body: Bytes,
    client: &PeerClient,
) -> HttpResponse {
    use actix_web::http::{header, StatusCode};
    let Some(addr) = client.addr_of(state, node).await else {
        // Its node is gone, and the channel with it: the agent opens a new one.
        return problem(StatusCode::NOT_FOUND, "unknown or closed channel");
    };
    let now = crate::security::unix_now_ms();
    let scheme = if state.security.tls.is_some() {
        "https"
    } else {
        "http"
    };
    let path = path_and_query(req);
    let ids = req
        .conn_data::<PeerIdentity>()
        .map(|p| p.0.join(","))
        .unwrap_or_default();
    let me = state.store.node();
    let sig = forward_signature(
        &state.peer_key,
        req.method().as_str(),
        path,
        me,
        &ids,
        now,
        &body,
    );
    let mut out = client
        .client
        .request(req.method().clone(), format!("{scheme}://{addr}{path}"))
        .insert_header((FORWARDED_BY, me))
        .insert_header((FORWARDED_PEER, ids))
        .insert_header((FORWARDED_AT, now.to_string()))
        .insert_header((FORWARDED_SIG, sig));
    if let Some(ct) = req.headers().get(header::CONTENT_TYPE) {
        out = out.insert_header((header::CONTENT_TYPE, ct.clone()));
    }
    state.metrics.add(&state.metrics.http_forwarded, 1);
    let answer = match out.send_body(body).await {
        Ok(mut resp) => match resp.body().limit(POLL_MAX_BYTES + (1 << 20)).await {
            Ok(b) => Ok((
                resp.status(),
                resp.headers().get(header::CONTENT_TYPE).cloned(),
                b,
            )),
            Err(e) => Err(e.to_string()),
        },
        Err(e) => Err(e.to_string()),
    };
    match answer {
        Ok((status, ct, b)) => {
            let mut r = HttpResponse::build(status);
            if let Some(ct) = ct {
                r.insert_header((header::CONTENT_TYPE, ct));
            }
            r.insert_header((header::CACHE_CONTROL, "no-store")).body(b)
        }
        Err(e) => {
            log::warn!(target: CONNECTION, "event=http_forward_failed node={node} addr={addr} error={e:?}");
            problem(
                StatusCode::BAD_GATEWAY,
                "the gateway node holding this channel cannot be reached",
            )
        }
    }
}

/// The channel of a request (direct, or forwarded by another node and checked).
fn lookup(
    req: &HttpRequest,
    state: &GatewayState,
    id: &str,
    body: &[u8],
) -> Result<Arc<Channel>, Missing> {
    let forwarded = forwarded_from(req, state, body).map_err(Missing::Refused)?;
    channel(req, state, id, forwarded.as_deref())
}

#[derive(Deserialize)]
pub struct SendQuery {
    seq: Option<u64>,
}

/// `POST /v1/http/{channel}/send?seq=N`: protocol messages, one per line.
pub async fn send(
    req: HttpRequest,
    state: web::Data<GatewayState>,
    peers: web::Data<PeerClient>,
    path: web::Path<String>,
    query: web::Query<SendQuery>,
    body: Bytes,
) -> HttpResponse {
    use actix_web::http::StatusCode;
    let ch = match lookup(&req, &state, &path, &body) {
        Ok(c) => c,
        Err(Missing::Elsewhere(node)) => return forward(&req, &state, &node, body, &peers).await,
        Err(Missing::Refused(r)) => return *r,
    };
    let Some(seq) = query.seq else {
        return problem(StatusCode::BAD_REQUEST, "query parameter `seq` is missing");
    };
    let Ok(text) = std::str::from_utf8(&body) else {
        return problem(StatusCode::BAD_REQUEST, "body is not UTF-8");
    };
    {
        let mut d = ch.down();
        if d.closed.is_some() {
            return problem(StatusCode::GONE, "the session has ended");
        }
        if seq <= d.last_send {
            // A retry of a send that arrived: already fed to the session.
            return HttpResponse::NoContent().finish();
        }
        if seq != d.last_send + 1 {
            return problem(
                StatusCode::CONFLICT,
                &format!("seq {seq} does not follow {}", d.last_send),
            );
        }
        d.last_send = seq;
        // Fed while holding the lock, so two sends cannot interleave their messages.
        for line in text.split('\n').filter(|l| !l.trim().is_empty()) {
            if !ch.feed(WsMessage::Text(line.to_string().into())) {
                return problem(StatusCode::GONE, "the session has ended");
            }
        }
    }
    HttpResponse::NoContent().finish()
}

#[derive(Deserialize)]
pub struct PollQuery {
    #[serde(default)]
    after: u64,
    wait_ms: Option<u64>,
}

/// At most this much message text per poll answer; the rest waits for the next poll.
const POLL_MAX_BYTES: usize = 4 * 1024 * 1024;

/// `GET /v1/http/{channel}/poll?after=C&wait_ms=W`.
pub async fn poll(
    req: HttpRequest,
    state: web::Data<GatewayState>,
    peers: web::Data<PeerClient>,
    path: web::Path<String>,
    query: web::Query<PollQuery>,
) -> HttpResponse {
    let ch = match lookup(&req, &state, &path, &[]) {
        Ok(c) => c,
        Err(Missing::Elsewhere(node)) => {
            return forward(&req, &state, &node, Bytes::new(), &peers).await
        }
        Err(Missing::Refused(r)) => return *r,
    };
    // Each poll is the agent's heartbeat.
    ch.feed(WsMessage::Ping(Bytes::new()));
    let hb = state.settings.heartbeat_interval;
    let wait = query
        .wait_ms
        .map(Duration::from_millis)
        .unwrap_or(hb)
        .min(hb);
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let notified = ch.notify.notified();
        let mut notified = std::pin::pin!(notified);
        notified.as_mut().enable();
        {
            let mut d = ch.down();
            while d.queue.front().is_some_and(|(c, _)| *c <= query.after) {
                d.queue.pop_front();
            }
            let now = tokio::time::Instant::now();
            if !d.queue.is_empty() || d.closed.is_some() || now >= deadline {
                return answer(&d, query.after);
            }
        }
        if tokio::time::timeout_at(deadline, notified).await.is_err() {
            let d = ch.down();
            return answer(&d, query.after);
        }
    }
}

/// `{"cursor": …, "messages": [...], "closed": …}`, with the queued messages spliced in as
/// they are (each is already one JSON envelope).
fn answer(d: &Down, after: u64) -> HttpResponse {
    let mut body = String::from("{\"messages\":[");
    let mut cursor = after;
    let mut complete = true;
    for (i, (c, text)) in d.queue.iter().filter(|(c, _)| *c > after).enumerate() {
        if i > 0 {
            if body.len() + text.len() > POLL_MAX_BYTES {
                complete = false;
                break;
            }
            body.push(',');
        }
        body.push_str(text);
        cursor = *c;
    }
    body.push_str(&format!("],\"cursor\":{cursor}"));
    if let (true, Some(c)) = (complete, &d.closed) {
        let closed = serde_json::to_string(c).unwrap_or_else(|_| "null".into());
        body.push_str(&format!(",\"closed\":{closed}"));
    }
    body.push('}');
    HttpResponse::Ok()
        .content_type("application/json")
        .insert_header(("cache-control", "no-store"))
        .body(body)
}

/// `POST /v1/http/{channel}/close` with `{"code": …, "reason": …}`: the agent is done. Answers
/// once the session has closed (or after a heartbeat interval).
pub async fn close(
    req: HttpRequest,
    state: web::Data<GatewayState>,
    peers: web::Data<PeerClient>,
    path: web::Path<String>,
    raw: Bytes,
) -> HttpResponse {
    let ch = match lookup(&req, &state, &path, &raw) {
        Ok(c) => c,
        Err(Missing::Elsewhere(node)) => return forward(&req, &state, &node, raw, &peers).await,
        Err(Missing::Refused(r)) => return *r,
    };
    let body: Closed = match serde_json::from_slice(&raw) {
        Ok(b) => b,
        Err(e) => {
            return problem(
                actix_web::http::StatusCode::BAD_REQUEST,
                &format!("close body: {e}"),
            )
        }
    };
    let reason = CloseReason {
        code: CloseCode::from(body.code),
        description: Some(body.reason.clone()),
    };
    if ch.feed(WsMessage::Close(Some(reason))) {
        let deadline = tokio::time::Instant::now() + state.settings.heartbeat_interval;
        loop {
            let notified = ch.notify.notified();
            let mut notified = std::pin::pin!(notified);
            notified.as_mut().enable();
            if ch.down().closed.is_some() {
                break;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                break;
            }
        }
    }
    HttpResponse::NoContent().finish()
}

//! The agent's local admin endpoint (`agent.admin.listen`, loopback only): `/healthz` (the
//! event loop answers), `/readyz` (connected and caught up), `/metrics` (Prometheus), `/status`
//! (JSON, read by `tether agent status`) and `POST /call/{endpoint}` (clinic software calling a
//! configured endpoint of the main Web API through the gateway, over the agent's own link). A
//! deliberately small HTTP/1.1 server: one request per connection, no dependencies beyond tokio
//! — it also runs in the agent-only build, which has no web framework.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tether_actors::ports::{Backlog, Checkpoint};
use tether_actors::{AgentStats, ChangeSource};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// What the endpoint reads: the running agent's counters and its own database handles.
pub struct AdminState {
    pub clinic_id: String,
    pub gateway_url: String,
    pub proxy: String,
    pub stats: Arc<AgentStats>,
    pub source: Arc<dyn ChangeSource>,
    pub checkpoint: Arc<dyn Checkpoint>,
    pub started: Instant,
    /// Not ready once the oldest unacknowledged change is older than this
    /// (`agent.admin.ready_lag`, 10 s by default).
    pub ready_lag: Duration,
    /// The running agent's actors (set once it has started).
    pub slots: Option<tether_actors::agent::Slots>,
    /// The clinic's certificate (`agent.gateway.tls.cert`), read at each status, and how long
    /// before its end the agent renews it (`None`: no scheduled renewal).
    pub certificate: Option<(std::path::PathBuf, Option<Duration>)>,
    /// Channels for the clinic's applications (`/v1/channels`), with their local token.
    pub channels: Option<crate::local_channels::LocalChannels>,
}

/// The clinic certificate's life, in `/status`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CertificateStatus {
    /// RFC 3339.
    pub not_after: String,
    /// Negative once it has run out.
    pub seconds_left: i64,
    /// When the agent renews it (seconds from now; 0: due), if it renews on a schedule.
    pub renews_in_s: Option<i64>,
    /// The file could not be read as a certificate.
    pub error: Option<String>,
}

/// The certificate at `path`: its end, time left and when it renews.
pub fn certificate_status(
    path: &std::path::Path,
    renew_before: Option<Duration>,
) -> CertificateStatus {
    match crate::enrol::cert_not_after(path) {
        Ok(end) => {
            let left = end - crate::security::unix_now() as i64;
            CertificateStatus {
                not_after: tether_schemas::iso_from_millis(end.saturating_mul(1000)),
                seconds_left: left,
                renews_in_s: renew_before.map(|b| (left - b.as_secs() as i64).max(0)),
                error: None,
            }
        }
        Err(e) => CertificateStatus {
            not_after: String::new(),
            seconds_left: 0,
            renews_in_s: None,
            error: Some(e.to_string()),
        },
    }
}

/// Largest request body `POST /call/…` accepts.
const MAX_BODY: usize = 1 << 20;

/// `GET /status`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Status {
    pub clinic_id: String,
    pub version: String,
    pub uptime_s: u64,
    pub gateway_url: String,
    pub proxy: String,
    pub connected: bool,
    /// `websocket` or `http` (the fallback).
    pub transport: String,
    pub acked_seq: u64,
    pub backlog_events: u64,
    pub backlog_at_least: bool,
    pub oldest_pending_s: Option<f64>,
    pub ready: bool,
    /// Why not ready, in words.
    pub not_ready: Option<String>,
    pub reconnects: u64,
    pub links_up: u64,
    pub heartbeat_misses: u64,
    pub fallbacks: u64,
    pub events_sent: u64,
    pub updates_applied: u64,
    pub updates_failed: u64,
    pub restarts: std::collections::BTreeMap<String, u64>,
    /// The outbox could not be read (the database is unavailable).
    pub database_error: Option<String>,
    /// PostgreSQL logical capture: the WAL the server keeps for Tether's slot.
    #[serde(default)]
    pub capture_slot_retained_bytes: Option<u64>,
    /// Why the gateway refused the last attempt (cleared once a link is up).
    #[serde(default)]
    pub refused: Option<tether_actors::stats::Refusal>,
    /// The clinic certificate's end and renewal (when the agent has one in files).
    #[serde(default)]
    pub certificate: Option<CertificateStatus>,
    /// Per channel: messages received, delivered, expired, published, refused; subscribers
    /// and messages waiting now.
    #[serde(default)]
    pub channels: std::collections::BTreeMap<String, tether_actors::channels::ChannelCounts>,
}

impl AdminState {
    pub async fn status(self: &Arc<Self>) -> Status {
        let s = &self.stats;
        let me = self.clone();
        let cert = self.certificate.clone();
        let certificate = tokio::task::spawn_blocking(move || {
            cert.map(|(path, before)| certificate_status(&path, before))
        })
        .await
        .ok()
        .flatten();
        let backlog = tokio::task::spawn_blocking(move || -> Result<Backlog, String> {
            let acked = me.checkpoint.load().map_err(|e| e.to_string())?;
            me.source.backlog(acked).map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r);
        let (backlog, database_error) = match backlog {
            Ok(b) => (b, None),
            Err(e) => (Backlog::default(), Some(e)),
        };
        let oldest_pending_s = backlog
            .oldest_committed_at
            .as_deref()
            .and_then(tether_schemas::rfc3339_ms)
            .map(|t| crate::security::unix_now_ms().saturating_sub(t) as f64 / 1000.0);
        let connected = s.connected.load(Ordering::Relaxed);
        let refused = s.refusal();
        let not_ready = if !connected {
            Some(match &refused {
                Some(r) => format!(
                    "not connected: the gateway refused us ({} {}): {}",
                    r.status,
                    r.reason,
                    r.advice()
                ),
                None => "not connected to the gateway".to_string(),
            })
        } else if let Some(e) = &database_error {
            Some(format!("outbox unreadable: {e}"))
        } else if oldest_pending_s.is_some_and(|a| a > self.ready_lag.as_secs_f64()) {
            Some(format!(
                "behind: {} events waiting, the oldest for {:.0} s",
                backlog.events,
                oldest_pending_s.unwrap_or(0.0)
            ))
        } else {
            None
        };
        Status {
            clinic_id: self.clinic_id.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            uptime_s: self.started.elapsed().as_secs(),
            gateway_url: self.gateway_url.clone(),
            proxy: self.proxy.clone(),
            connected,
            transport: if s.on_http.load(Ordering::Relaxed) {
                "http".into()
            } else {
                "websocket".into()
            },
            acked_seq: AgentStats::get(&s.acked_seq),
            backlog_events: backlog.events,
            backlog_at_least: backlog.at_least,
            oldest_pending_s,
            ready: not_ready.is_none(),
            not_ready,
            reconnects: AgentStats::get(&s.reconnects),
            links_up: AgentStats::get(&s.links_up),
            heartbeat_misses: AgentStats::get(&s.heartbeat_misses),
            fallbacks: AgentStats::get(&s.fallbacks),
            events_sent: AgentStats::get(&s.events_sent),
            updates_applied: AgentStats::get(&s.updates_applied),
            updates_failed: AgentStats::get(&s.updates_failed),
            restarts: s.restarts(),
            database_error,
            capture_slot_retained_bytes: backlog.capture_retained_bytes,
            refused,
            certificate,
            channels: self
                .channels
                .as_ref()
                .map(|c| c.board.counts().into_iter().collect())
                .unwrap_or_default(),
        }
    }
}

/// The Prometheus exposition of a status.
pub fn metrics_text(st: &Status) -> String {
    let mut out = String::new();
    let mut one = |name: &str, kind: &str, help: &str, v: f64| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name}{{clinic=\"{}\"}} {v}",
            st.clinic_id
        );
    };
    let b = |x: bool| if x { 1.0 } else { 0.0 };
    if let Some(c) = st.certificate.as_ref().filter(|c| c.error.is_none()) {
        one(
            "tether_agent_certificate_seconds_left",
            "gauge",
            "Seconds until the clinic certificate runs out (alert well before 0; the agent renews it agent.gateway.auth.renew_before ahead).",
            c.seconds_left as f64,
        );
    }
    one(
        "tether_agent_connected",
        "gauge",
        "1 while the link to the gateway is up.",
        b(st.connected),
    );
    one(
        "tether_agent_ready",
        "gauge",
        "1 while connected and caught up (see /readyz).",
        b(st.ready),
    );
    one(
        "tether_agent_on_http_fallback",
        "gauge",
        "1 while the link is the HTTP fallback rather than a WebSocket.",
        b(st.transport == "http"),
    );
    one(
        "tether_agent_outbox_backlog_events",
        "gauge",
        "Events in the outbox not yet acknowledged by the gateway.",
        st.backlog_events as f64,
    );
    one(
        "tether_agent_outbox_oldest_pending_seconds",
        "gauge",
        "Age of the oldest unacknowledged event (0 when none).",
        st.oldest_pending_s.unwrap_or(0.0),
    );
    if let Some(b) = st.capture_slot_retained_bytes {
        one(
            "tether_agent_capture_slot_retained_bytes",
            "gauge",
            "PostgreSQL logical capture: WAL bytes the server keeps for Tether's replication slot.",
            b as f64,
        );
    }
    one(
        "tether_agent_acked_seq",
        "gauge",
        "The durable outbox position the gateway acknowledged.",
        st.acked_seq as f64,
    );
    one(
        "tether_agent_reconnects_total",
        "counter",
        "Reconnect attempts scheduled (failed attempts included).",
        st.reconnects as f64,
    );
    one(
        "tether_agent_links_up_total",
        "counter",
        "Links that completed hello/welcome.",
        st.links_up as f64,
    );
    one(
        "tether_agent_heartbeat_misses_total",
        "counter",
        "Links declared dead after three silent heartbeat intervals.",
        st.heartbeat_misses as f64,
    );
    one(
        "tether_agent_fallbacks_total",
        "counter",
        "Switches to the HTTP fallback after blocked WebSocket upgrades.",
        st.fallbacks as f64,
    );
    one(
        "tether_agent_events_sent_total",
        "counter",
        "Events sent (resends included).",
        st.events_sent as f64,
    );
    one(
        "tether_agent_updates_applied_total",
        "counter",
        "Cloud updates applied to the clinic database.",
        st.updates_applied as f64,
    );
    one(
        "tether_agent_updates_failed_total",
        "counter",
        "Cloud updates refused by the clinic database.",
        st.updates_failed as f64,
    );
    one(
        "tether_agent_uptime_seconds",
        "gauge",
        "Seconds since the agent started.",
        st.uptime_s as f64,
    );
    let name = "tether_agent_actor_restarts_total";
    let _ = writeln!(
        out,
        "# HELP {name} Actor restarts by the supervisor after a crash.\n# TYPE {name} counter"
    );
    for actor in ["connection", "watcher", "outbound", "applier"] {
        let n = st.restarts.get(actor).copied().unwrap_or(0);
        let _ = writeln!(
            out,
            "{name}{{clinic=\"{}\",actor=\"{actor}\"}} {n}",
            st.clinic_id
        );
    }
    if !st.channels.is_empty() {
        type Family = (
            &'static str,
            &'static str,
            &'static str,
            fn(&tether_actors::channels::ChannelCounts) -> u64,
        );
        let families: [Family; 7] = [
            (
                "tether_agent_channel_received_total",
                "counter",
                "Down channel messages received from the gateway.",
                |c| c.received,
            ),
            (
                "tether_agent_channel_delivered_total",
                "counter",
                "Down channel messages handed to at least one local subscriber.",
                |c| c.delivered,
            ),
            (
                "tether_agent_channel_expired_total",
                "counter",
                "Transient down messages whose time ran out before a subscriber took them.",
                |c| c.expired,
            ),
            (
                "tether_agent_channel_published_total",
                "counter",
                "Up channel messages published by local applications and accepted by the gateway.",
                |c| c.published,
            ),
            (
                "tether_agent_channel_refused_total",
                "counter",
                "Up channel messages refused (here or at the gateway).",
                |c| c.refused,
            ),
            (
                "tether_agent_channel_subscribers",
                "gauge",
                "Local subscribers of the channel now.",
                |c| c.subscribers,
            ),
            (
                "tether_agent_channel_waiting",
                "gauge",
                "Down messages waiting for a subscriber now.",
                |c| c.waiting,
            ),
        ];
        for (name, kind, help, get) in families {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (ch, c) in &st.channels {
                let _ = writeln!(
                    out,
                    "{name}{{clinic=\"{}\",channel=\"{ch}\"}} {}",
                    st.clinic_id,
                    get(c)
                );
            }
        }
    }
    out
}

/// Binds the endpoint (loopback only).
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    if !addr.ip().is_loopback() {
        return Err(std::io::Error::other(format!(
            "{addr} is not a loopback address"
        )));
    }
    tokio::net::TcpListener::bind(addr).await
}

/// Serves until the listener fails.
pub async fn serve(listener: tokio::net::TcpListener, state: Arc<AdminState>) {
    loop {
        let (conn, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                log::error!(target: "error", "event=admin_accept_failed error={e}");
                return;
            }
        };
        if !peer.ip().is_loopback() {
            continue;
        }
        let st = state.clone();
        actix::spawn(async move {
            let _ = answer(conn, st).await;
        });
    }
}

/// How long a client may take to send its request (a call's own deadline runs after that).
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest deadline a call may ask for (`Tether-Timeout-Ms`), and the default.
const MAX_CALL_TIMEOUT: Duration = Duration::from_secs(60);
const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// One request as read from the socket.
pub struct Request {
    pub method: String,
    pub path: String,
    /// What followed `?` in the target (raw).
    pub query: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Reads one request; `Err` is the answer to give instead (413), `Ok(None)` a client that left.
async fn read_request(
    conn: &mut tokio::net::TcpStream,
) -> std::io::Result<Result<Option<Request>, Answer>> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = conn.read(&mut chunk).await?;
        if n == 0 || buf.len() > 16 * 1024 {
            return Ok(Ok(None));
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let mut lines = head.lines();
    let mut parts = lines.next().unwrap_or("").split(' ');
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (path, query) = path.split_once('?').unwrap_or((path, ""));
    let (path, query) = (path.to_string(), query.to_string());
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| {
            let (k, v) = l.split_once(':')?;
            Some((k.trim().to_string(), v.trim().to_string()))
        })
        .collect();
    let length: usize = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    if length > MAX_BODY {
        return Ok(Err(problem(
            413,
            format!("the body is {length} bytes; at most {MAX_BODY} are accepted"),
        )));
    }
    let mut body = buf[head_end..].to_vec();
    while body.len() < length {
        let n = conn.read(&mut chunk).await?;
        if n == 0 {
            return Ok(Ok(None));
        }
        body.extend_from_slice(&chunk[..n]);
    }
    body.truncate(length);
    Ok(Ok(Some(Request {
        method: method.to_string(),
        path,
        query,
        headers,
        body,
    })))
}

/// Status, content type, body.
type Answer = (u16, String, String);

async fn answer(mut conn: tokio::net::TcpStream, st: Arc<AdminState>) -> std::io::Result<()> {
    let read = match tokio::time::timeout(READ_TIMEOUT, read_request(&mut conn)).await {
        Ok(r) => r?,
        Err(_) => return Ok(()),
    };
    let (code, ctype, body) = match read {
        // Channels keep the connection (streams) and answer for themselves.
        Ok(Some(req)) if req.path == "/v1/channels" || req.path.starts_with("/v1/channels/") => {
            return crate::local_channels::serve(conn, st, req).await;
        }
        Ok(Some(req)) => route(&st, &req).await,
        Ok(None) => return Ok(()),
        Err(refused) => refused,
    };
    let reason = match code {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        413 => "Payload Too Large",
        429 => "Too Many Requests",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Status",
    };
    let retry = if code == 429 {
        "Retry-After: 1\r\n"
    } else {
        ""
    };
    let resp = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\n{retry}Cache-Control: no-store\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    conn.write_all(resp.as_bytes()).await?;
    conn.shutdown().await
}

fn text(code: u16, body: impl Into<String>) -> Answer {
    (code, "text/plain".into(), body.into())
}

/// An error of the agent's own, as `application/problem+json` (RFC 9457).
fn problem(code: u16, detail: String) -> Answer {
    let title = match code {
        400 => "Bad Request",
        413 => "Payload Too Large",
        429 => "Too Many Requests",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Error",
    };
    (
        code,
        "application/problem+json".into(),
        serde_json::json!({"type": "about:blank", "title": title, "status": code, "detail": detail})
            .to_string(),
    )
}

async fn route(st: &Arc<AdminState>, req: &Request) -> Answer {
    let (method, path) = (req.method.as_str(), req.path.as_str());
    if let Some(endpoint) = path.strip_prefix("/call/") {
        if method != "POST" {
            return text(405, "POST only\n");
        }
        return call(st, endpoint, req).await;
    }
    if method != "GET" {
        return text(405, "GET only\n");
    }
    let (code, ctype, body) = match path {
        "/healthz" => (200, "text/plain", "ok\n".to_string()),
        "/readyz" => {
            let s = st.status().await;
            match &s.not_ready {
                None => (200, "text/plain", "ready\n".to_string()),
                Some(why) => (503, "text/plain", format!("not ready: {why}\n")),
            }
        }
        "/metrics" => {
            let s = st.status().await;
            (200, "text/plain; version=0.0.4", metrics_text(&s))
        }
        "/status" => {
            let s = st.status().await;
            let json = serde_json::to_string_pretty(&s).unwrap_or_else(|_| "{}".into());
            (200, "application/json", json)
        }
        _ => (
            404,
            "text/plain",
            "try /healthz /readyz /metrics /status, or POST /call/{endpoint}\n".into(),
        ),
    };
    (code, ctype.to_string(), body)
}

/// `POST /call/{endpoint}`: relays the JSON body, byte for byte, to the gateway's configured
/// endpoint and answers with the main Web API's status and body as received. The agent's own
/// refusals are problem+json: 400 (no body, not JSON, a bad header), 413 (more than the link
/// carries), 503 (no link), 502 (the main Web API not reached or its answer unusable), 504 (no
/// answer by the call's deadline: `Tether-Timeout-Ms`, 30 s by default, at most 60 s).
/// `Idempotency-Key` is passed on to the main Web API.
async fn call(st: &Arc<AdminState>, endpoint: &str, req: &Request) -> Answer {
    if endpoint.is_empty()
        || !endpoint
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    {
        return problem(400, "the endpoint name is letters, digits, - _ .".into());
    }
    if req.body.iter().all(u8::is_ascii_whitespace) {
        return problem(
            400,
            "the body is empty; send a JSON body ({} for none)".into(),
        );
    }
    if let Err(e) = serde_json::from_slice::<serde::de::IgnoredAny>(&req.body) {
        return problem(400, format!("the body is not JSON: {e}"));
    }
    let Ok(body_text) = String::from_utf8(req.body.clone()) else {
        return problem(400, "the body is not UTF-8".into());
    };
    let timeout = match req.header("tether-timeout-ms").map(str::parse::<u64>) {
        None => DEFAULT_CALL_TIMEOUT,
        Some(Ok(ms)) if (1..=MAX_CALL_TIMEOUT.as_millis() as u64).contains(&ms) => {
            Duration::from_millis(ms)
        }
        Some(_) => {
            return problem(
                400,
                format!(
                    "Tether-Timeout-Ms must be 1 to {}",
                    MAX_CALL_TIMEOUT.as_millis()
                ),
            )
        }
    };
    let idempotency_key = match req.header("idempotency-key") {
        Some(k) if k.is_empty() || k.len() > 255 || k.chars().any(char::is_control) => {
            return problem(
                400,
                "Idempotency-Key must be 1 to 255 visible characters".into(),
            )
        }
        k => k.map(str::to_string),
    };
    let Some(conn) = st.slots.as_ref().and_then(|s| s.connection.get()) else {
        return problem(503, "the agent is starting".into());
    };
    let msg = tether_actors::connection::Call {
        endpoint: endpoint.to_string(),
        body_text,
        timeout,
        idempotency_key,
    };
    use tether_actors::connection::CallError;
    match conn.send(msg).await {
        Ok(Ok(r)) if r.status == 0 || r.error.is_some() && r.body_text.is_none() => {
            let code = if r.status == 0 { 502 } else { r.status };
            problem(code, r.error.unwrap_or_default())
        }
        Ok(Ok(r)) => {
            let ctype = r
                .content_type
                .unwrap_or_else(|| "application/json".to_string());
            let body = r
                .body_text
                .or_else(|| r.body.map(|b| b.to_string()))
                .unwrap_or_default();
            (r.status, ctype, body)
        }
        Ok(Err(e @ CallError::TooLarge { .. })) => problem(413, e.to_string()),
        Ok(Err(e @ CallError::Timeout(_))) => problem(504, e.to_string()),
        Ok(Err(e)) => problem(503, e.to_string()),
        Err(_) => problem(503, "the agent's connection actor is restarting".into()),
    }
}

/// Why `tether agent status` got no status.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error("no agent answers on {0} (is the agent or its service running?)")]
    NotRunning(SocketAddr),
    #[error("the agent on {addr} answered badly: {why}")]
    Bad { addr: SocketAddr, why: String },
}

/// `GET /status` from a running agent (blocking; for the CLI).
pub fn fetch_status(addr: SocketAddr, timeout: Duration) -> Result<Status, StatusError> {
    use std::io::{Read, Write};
    let mut conn = std::net::TcpStream::connect_timeout(&addr, timeout)
        .map_err(|_| StatusError::NotRunning(addr))?;
    let bad = |why: String| StatusError::Bad { addr, why };
    conn.set_read_timeout(Some(timeout))
        .map_err(|e| bad(e.to_string()))?;
    conn.write_all(b"GET /status HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .map_err(|e| bad(e.to_string()))?;
    let mut text = String::new();
    conn.read_to_string(&mut text)
        .map_err(|e| bad(e.to_string()))?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| bad("no HTTP answer".into()))?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(bad(head.lines().next().unwrap_or("").to_string()));
    }
    serde_json::from_str(body).map_err(|e| bad(e.to_string()))
}

/// The human summary `tether agent status` prints.
pub fn describe(s: &Status) -> String {
    let mut o = String::new();
    let age = |secs: u64| match secs {
        0..=59 => format!("{secs}s"),
        60..=3599 => format!("{}m{:02}s", secs / 60, secs % 60),
        _ => format!("{}h{:02}m", secs / 3600, (secs % 3600) / 60),
    };
    let _ = writeln!(
        o,
        "{} — tether agent {}, up {}",
        s.clinic_id,
        s.version,
        age(s.uptime_s)
    );
    let link = if s.connected {
        format!("connected over {} to {}", s.transport, s.gateway_url)
    } else {
        format!(
            "NOT connected (trying {} via {})",
            s.gateway_url, s.transport
        )
    };
    let _ = writeln!(o, "  link:     {link} (proxy: {})", s.proxy);
    if let (false, Some(r)) = (s.connected, &s.refused) {
        let offset = r
            .clock_offset_ms
            .map(|o| {
                let (by, way) = (
                    o.unsigned_abs() as f64 / 1000.0,
                    if o > 0 { "behind" } else { "ahead of" },
                );
                format!("; this PC's clock is {by:.1} s {way} the gateway's")
            })
            .unwrap_or_default();
        let _ = writeln!(
            o,
            "            REFUSED by the gateway: {} {}{offset} — {}",
            r.status,
            r.reason,
            r.advice()
        );
    }
    if let Some(c) = &s.certificate {
        let line = match (&c.error, c.renews_in_s) {
            (Some(e), _) => format!("certificate unreadable: {e}"),
            (None, _) if c.seconds_left <= 0 => {
                format!(
                    "certificate EXPIRED at {} — renew: tether agent renew",
                    c.not_after
                )
            }
            (None, Some(0)) => format!(
                "certificate valid until {} ({} left); renewal due now",
                c.not_after,
                age(c.seconds_left as u64)
            ),
            (None, Some(r)) => format!(
                "certificate valid until {} ({} left); renews in {}",
                c.not_after,
                age(c.seconds_left as u64),
                age(r as u64)
            ),
            (None, None) => format!(
                "certificate valid until {} ({} left); not renewed automatically",
                c.not_after,
                age(c.seconds_left as u64)
            ),
        };
        let _ = writeln!(o, "  identity: {line}");
    }
    if s.transport == "http" {
        let _ = writeln!(o, "            on the HTTP fallback: WebSocket upgrades were blocked on the way (see connection.log, event=transport_changed)");
    }
    let oldest = s
        .oldest_pending_s
        .map(|a| format!("oldest {}", age(a as u64)))
        .unwrap_or_else(|| "none waiting".into());
    let more = if s.backlog_at_least { "+" } else { "" };
    let _ = writeln!(
        o,
        "  outbox:   {}{more} events waiting ({oldest}); acknowledged up to seq {}",
        s.backlog_events, s.acked_seq
    );
    if let Some(b) = s.capture_slot_retained_bytes {
        let _ = writeln!(
            o,
            "  capture:  logical; the server keeps {:.1} MB of WAL for the slot",
            b as f64 / 1_048_576.0
        );
    }
    let _ = writeln!(
        o,
        "  cloud:    {} updates applied, {} refused",
        s.updates_applied, s.updates_failed
    );
    let restarts = if s.restarts.is_empty() {
        "none".to_string()
    } else {
        s.restarts
            .iter()
            .map(|(a, n)| format!("{a} {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let _ = writeln!(
        o,
        "  health:   {} links, {} reconnect attempts, {} heartbeat misses, {} fallbacks; actor restarts: {restarts}",
        s.links_up, s.reconnects, s.heartbeat_misses, s.fallbacks
    );
    if let Some(e) = &s.database_error {
        let _ = writeln!(o, "  database: {e}");
    }
    match &s.not_ready {
        None => {
            let _ = writeln!(o, "  ready:    yes");
        }
        Some(why) => {
            let _ = writeln!(o, "  ready:    no — {why}");
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::security::keys::{self, Leaf, Usage};

    #[test]
    fn the_certificate_s_end_and_renewal_are_shown_and_exported() {
        let dir = tempfile::tempdir().expect("dir");
        let ca = keys::make_ca("t", 30, 2048).expect("ca");
        let now = crate::security::unix_now() as i64;
        let leaf = keys::issue(
            &ca,
            &Leaf {
                valid: Some((now - 60, now + 10 * 86_400)),
                ..Leaf::new("clinic-s", Usage::Client, 2048)
            },
        )
        .expect("leaf");
        keys::save(&leaf, dir.path(), "c").expect("save");
        let path = dir.path().join("c.pem");
        let c = certificate_status(&path, Some(Duration::from_secs(3 * 86_400)));
        assert!(c.error.is_none(), "{c:?}");
        assert!((c.seconds_left - 10 * 86_400).abs() < 120, "{c:?}");
        let renews = c.renews_in_s.expect("scheduled");
        assert!((renews - 7 * 86_400).abs() < 120, "{c:?}");
        assert!(c.not_after.ends_with('Z'), "{c:?}");
        // Renewal due once less than renew_before is left.
        let due = certificate_status(&path, Some(Duration::from_secs(20 * 86_400)));
        assert_eq!(due.renews_in_s, Some(0));
        // Not a certificate: said, not fatal.
        let bad = certificate_status(&dir.path().join("c.key"), None);
        assert!(bad.error.is_some());
        let mut st = Status {
            clinic_id: "clinic-s".into(),
            version: "0".into(),
            uptime_s: 5,
            gateway_url: "wss://g/v1/ws".into(),
            proxy: "none".into(),
            connected: true,
            transport: "websocket".into(),
            acked_seq: 0,
            backlog_events: 0,
            backlog_at_least: false,
            oldest_pending_s: None,
            ready: true,
            not_ready: None,
            reconnects: 0,
            links_up: 1,
            heartbeat_misses: 0,
            fallbacks: 0,
            events_sent: 0,
            updates_applied: 0,
            updates_failed: 0,
            restarts: Default::default(),
            database_error: None,
            capture_slot_retained_bytes: None,
            refused: None,
            certificate: Some(c),
            channels: Default::default(),
        };
        let text = describe(&st);
        assert!(text.contains("identity: certificate valid until"), "{text}");
        assert!(text.contains("renews in 16"), "{text}");
        let metrics = metrics_text(&st);
        assert!(
            metrics.contains("tether_agent_certificate_seconds_left{clinic=\"clinic-s\"} 86"),
            "{metrics}"
        );
        st.certificate = Some(bad);
        assert!(describe(&st).contains("certificate unreadable"));
        assert!(!metrics_text(&st).contains("certificate_seconds_left"));
    }
}

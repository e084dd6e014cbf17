//! Connection actor: the agent's one link to the gateway (awc client) — a WebSocket, or the
//! HTTP fallback (`http_link`) when upgrades are blocked on the way.
//! Connects, sends `hello`, waits for `welcome`; pings every `heartbeat_interval` and declares
//! the link dead when nothing (pong or frame) came back for three intervals; reconnects with
//! exponential backoff and full jitter. Every connect, close, error, unexpected close,
//! heartbeat miss and change of transport is a line on the `connection` log.
//!
//! Transport (`AgentSettings::transport`, `auto` by default): an upgrade refused or stripped
//! on the way, or a socket that dies before `welcome`, counts as *blocked*; after
//! `fallback_after` in a row the agent switches to the HTTP fallback, and while on it probes
//! the WebSocket every `upgrade_retry`, switching back (losslessly: resend from `welcome`) once
//! an upgrade passes. The mode lives in `AgentStats::on_http`, so it survives a restart.
//! Takes: `SendFrame` (outbound queue), `CurrentLink`. Sends: `LinkUp`/`LinkDown`/`Acked` to the
//! outbound queue, `Apply` to the applier (one at a time, in arrival order), `update_result`s.
//! State: the socket and the updates not yet applied. On restart it reloads nothing: it
//! reconnects, and the gateway redelivers every update whose result it did not receive.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::io::{SinkWrite, WriteHandler};
use actix::prelude::*;
use actix_codec::Framed;
use awc::error::WsProtocolError;
use awc::ws;
use awc::BoxedSocket;
use futures_util::stream::{SplitSink, StreamExt};
use tether_schemas::{Hello, Message as Wire, Update, UpdateResult};

use crate::agent::{AgentPorts, AgentSettings, Slots, Transport};
use crate::applier::Apply;
use crate::frames::{GuardedCodec, Item};
use crate::http_link::{self, HttpLinkError, PollItem};
use crate::log_target::{CONNECTION, ERROR};
use crate::outbound::{Acked, LinkDown, LinkUp};
use crate::stats::{AgentStats, Refusal};
use crate::supervisor::ExitGuard;

type WsSink = SplitSink<Framed<BoxedSocket, GuardedCodec>, ws::Message>;

/// The writing half of the current link.
enum LinkOut {
    Ws(SinkWrite<ws::Message, WsSink>),
    Http {
        tx: tokio::sync::mpsc::UnboundedSender<String>,
        ch: http_link::Channel,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Waiting for the backoff delay before the next attempt.
    Idle,
    Connecting,
    /// Socket open, `hello` sent, `welcome` not yet received.
    Handshaking,
    Up,
    /// Leaving this link for a new one (re-authentication, back to WebSocket): our close was
    /// sent and the outbound queue told; waiting briefly for the gateway's close.
    Retiring,
    /// Shutting down: a close frame was sent; no reconnect.
    Closing,
}

/// How long a retiring link waits for the gateway to answer its close.
const RETIRE_WAIT: Duration = Duration::from_secs(2);

/// What the link currently is, for an outbound queue that restarted.
#[derive(Debug, Clone, Copy)]
pub struct LinkInfo {
    pub epoch: u64,
    pub acked_seq: u64,
}

pub struct Connection {
    /// Tells the supervisor when this actor ends (its `Drop`).
    guard: ExitGuard,
    settings: Arc<AgentSettings>,
    ports: AgentPorts,
    stats: Arc<AgentStats>,
    slots: Slots,
    state: State,
    epoch: u64,
    link: Option<LinkOut>,
    stream: Option<SpawnHandle>,
    last_seen: Instant,
    up_since: Option<Instant>,
    backoff: crate::backoff::Backoff,
    acked_seq: u64,
    updates: VecDeque<Update>,
    applying: bool,
    attempt_started: Instant,
    /// The next reconnect is a planned re-authentication: no backoff.
    reauth: bool,
    source_id: u64,
    /// Told when the gateway has answered our close (or the socket ended).
    close_waiters: Vec<tokio::sync::oneshot::Sender<()>>,
    /// WebSocket attempts blocked on the way, in a row (see the module docs).
    blocked: u32,
    /// Failed HTTP fallback attempts in a row.
    http_failures: u32,
    /// `rpc_request`s being run.
    rpc_running: usize,
    /// `call_request`s sent and not answered, by request id.
    calls: std::collections::HashMap<String, CallWaiter>,
    /// Up-channel messages sent and not answered (`channel_ack`), by message id.
    publishing: std::collections::HashMap<String, PublishWaiter>,
    /// The gateway said it is going away (1001): come back after a short jitter.
    going_away: bool,
    /// The backoff was reset for the current link (it carried traffic both ways).
    proven: bool,
    /// A fragmented text message from the gateway being reassembled.
    fragments: Option<Vec<u8>>,
    /// The largest frame the current link carries both ways (ours and the gateway's limit).
    link_max_frame: usize,
    /// Applies of the current update that failed in a row (the database is unavailable).
    apply_failures: u32,
}

type CallWaiter = tokio::sync::oneshot::Sender<Result<tether_schemas::CallResponse, String>>;
type PublishWaiter = (
    String,
    tokio::sync::oneshot::Sender<tether_schemas::ChannelAck>,
);

/// At most this many `rpc_request`s run at once; more are answered "busy".
pub const MAX_RPC_RUNNING: usize = 4;

enum Incoming {
    Frame(u64, Result<ws::Frame, WsProtocolError>),
    Http(u64, PollItem),
    End(u64),
}

/// Whether a failed upgrade means "something on the way blocks WebSockets" rather than "the
/// gateway is down" or "the gateway refused us".
/// The gateway's close code for a hello from another database than the clinic's own.
const DUPLICATE_SOURCE: u16 = 4009;

/// This machine's wall clock, unix ms (a refusal's time and the clock offset).
pub(crate) fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// One parameter of an RFC 6750 challenge (`Bearer realm="x", error_description="y"`): only
/// safe token characters are kept (it ends up in logs).
pub fn auth_param(header: &str, name: &str) -> Option<String> {
    let at = header.find(&format!("{name}=\""))? + name.len() + 2;
    let value: String = header[at..]
        .chars()
        .take_while(|c| *c != '"')
        .filter(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '-')
        .take(64)
        .collect();
    (!value.is_empty()).then_some(value)
}

fn upgrade_blocked(e: &awc::error::WsClientError) -> bool {
    use awc::error::WsClientError as E;
    match e {
        // 401: our credentials; 404: a wrong URL (a configuration error, never hidden behind
        // the fallback); 408/429/503: load; 5xx: the gateway or a balancer is down.
        E::InvalidResponseStatus(s) => {
            let s = s.as_u16();
            (400..500).contains(&s) && ![401, 404, 408, 429].contains(&s) || s == 501
        }
        E::InvalidUpgradeHeader
        | E::InvalidConnectionHeader(_)
        | E::MissingConnectionHeader
        | E::MissingWebSocketAcceptHeader
        | E::InvalidChallengeResponse(..) => true,
        _ => false,
    }
}

impl Connection {
    pub fn new(
        guard: ExitGuard,
        settings: Arc<AgentSettings>,
        ports: AgentPorts,
        stats: Arc<AgentStats>,
        slots: Slots,
    ) -> Self {
        let backoff = settings.backoff();
        let link_max_frame = settings.max_frame_bytes;
        let now = ports.clock.now();
        Connection {
            guard,
            settings,
            ports,
            stats,
            slots,
            state: State::Idle,
            epoch: 0,
            link: None,
            stream: None,
            last_seen: now,
            up_since: None,
            backoff,
            acked_seq: 0,
            updates: VecDeque::new(),
            applying: false,
            attempt_started: now,
            reauth: false,
            source_id: 0,
            close_waiters: Vec::new(),
            blocked: 0,
            http_failures: 0,
            rpc_running: 0,
            calls: std::collections::HashMap::new(),
            publishing: std::collections::HashMap::new(),
            going_away: false,
            proven: false,
            fragments: None,
            link_max_frame,
            apply_failures: 0,
        }
    }

    fn clinic(&self) -> &str {
        &self.settings.clinic_id
    }

    fn on_http(&self) -> bool {
        match self.settings.transport {
            Transport::Http => true,
            Transport::WebSocket => false,
            Transport::Auto => self.stats.on_http.load(Ordering::Relaxed),
        }
    }

    fn transport_name(&self) -> &'static str {
        if self.on_http() {
            "http"
        } else {
            "websocket"
        }
    }

    /// One more WebSocket attempt blocked on the way; fall back after `fallback_after`.
    fn note_blocked(&mut self, why: &str) {
        if self.settings.transport != Transport::Auto || self.on_http() {
            return;
        }
        self.blocked += 1;
        log::warn!(target: CONNECTION, "clinic={} event=upgrade_blocked count={} of={} reason={why:?}", self.clinic(), self.blocked, self.settings.fallback_after);
        if self.blocked >= self.settings.fallback_after {
            self.blocked = 0;
            self.http_failures = 0;
            self.stats.on_http.store(true, Ordering::Relaxed);
            AgentStats::add(&self.stats.fallbacks, 1);
            log::warn!(target: CONNECTION, "clinic={} event=transport_changed transport=http reason=\"websocket upgrade blocked {} times in a row (last: {why})\" upgrade_retry_ms={}", self.clinic(), self.settings.fallback_after, self.settings.upgrade_retry.as_millis());
            // The next attempt is the fallback: no backoff.
            self.reauth = true;
        }
    }

    fn connect(&mut self, ctx: &mut Context<Self>) {
        self.state = State::Connecting;
        // Epochs come from a counter that survives restarts of this actor.
        self.epoch = self.stats.connects.fetch_add(1, Ordering::Relaxed) + 1;
        self.attempt_started = self.ports.clock.now();
        let epoch = self.epoch;
        // Forced transports are reported the same way as `auto`'s choice.
        self.stats.on_http.store(self.on_http(), Ordering::Relaxed);
        let url = if self.on_http() {
            self.settings.http_base()
        } else {
            self.settings.gateway_url.clone()
        };
        log::info!(target: CONNECTION, "clinic={} event=connecting url={url} transport={} attempt={}", self.clinic(), self.transport_name(), self.backoff.attempt() + 1);
        let headers = match self.ports.dialer.headers() {
            Ok(h) => h,
            Err(e) => {
                log::error!(target: CONNECTION, "clinic={} event=credentials_failed error={e}", self.clinic());
                self.schedule_reconnect(ctx);
                return;
            }
        };
        if self.on_http() {
            return self.connect_http(url, headers, ctx);
        }
        let mut req = self
            .ports
            .dialer
            .client()
            .ws(url.as_str())
            .max_frame_size(self.settings.max_frame_bytes);
        for (k, v) in headers {
            req = req.header(k, v);
        }
        let timeout = self.settings.connect_timeout;
        let fut = async move { tokio::time::timeout(timeout, req.connect()).await };
        ctx.spawn(fut.into_actor(self).map(move |res, act, ctx| {
            if act.epoch != epoch || act.state != State::Connecting {
                return;
            }
            match res {
                Ok(Ok((_resp, framed))) => act.opened(framed, ctx),
                Ok(Err(e)) => {
                    log::warn!(target: CONNECTION, "clinic={} event=connect_failed error={:?}", act.clinic(), e.to_string());
                    match &e {
                        awc::error::WsClientError::InvalidResponseStatus(s) if s.as_u16() == 404 => {
                            act.refused(Refusal {
                                status: 404,
                                reason: "not_found".into(),
                                clock_offset_ms: None,
                                at_ms: wall_ms(),
                            });
                        }
                        awc::error::WsClientError::InvalidResponseStatus(s) if s.as_u16() == 401 => {
                            act.explain_refusal(url.clone(), ctx);
                        }
                        _ => {
                            if upgrade_blocked(&e) {
                                act.note_blocked(&format!("upgrade refused: {e}"));
                            }
                        }
                    }
                    act.schedule_reconnect(ctx);
                }
                Err(_) => {
                    log::warn!(target: CONNECTION, "clinic={} event=connect_failed error=\"timed out after {} ms\"", act.clinic(), timeout.as_millis());
                    act.schedule_reconnect(ctx);
                }
            }
        }));
    }

    /// The gateway refused us (or the URL is wrong): say why, once per distinct reason, and
    /// keep it for the status.
    fn refused(&mut self, r: Refusal) {
        let same = self
            .stats
            .refusal()
            .is_some_and(|p| p.reason == r.reason && p.status == r.status);
        let offset = r
            .clock_offset_ms
            .map(|o| format!(" clock_offset_ms={o}"))
            .unwrap_or_default();
        if r.reason == "not_found" {
            log::error!(target: CONNECTION, "clinic={} event=config_error status=404 reason=not_found url={} message=\"{}\"", self.clinic(), self.settings.gateway_url, r.advice());
        } else if same {
            log::debug!(target: CONNECTION, "clinic={} event=connect_refused status={} reason={}{offset} repeated=true", self.clinic(), r.status, r.reason);
        } else {
            log::error!(target: CONNECTION, "clinic={} event=connect_refused status={} reason={}{offset} advice=\"{}\"", self.clinic(), r.status, r.reason, r.advice());
        }
        self.stats.set_refusal(Some(r));
    }

    /// A 401 carries no body through the WebSocket client: ask the same URL once more as a
    /// plain request (fresh credentials) to read the gateway's reason (`WWW-Authenticate`
    /// `error_description`) and clock (`Tether-Time`).
    fn explain_refusal(&mut self, ws_url: String, ctx: &mut Context<Self>) {
        let Ok(headers) = self.ports.dialer.headers() else {
            return;
        };
        let url = if let Some(rest) = ws_url.strip_prefix("wss://") {
            format!("https://{rest}")
        } else if let Some(rest) = ws_url.strip_prefix("ws://") {
            format!("http://{rest}")
        } else {
            ws_url
        };
        let mut req = self.ports.dialer.client().get(url);
        for (k, v) in headers {
            req = req.insert_header((k, v));
        }
        let timeout = self.settings.connect_timeout;
        let fut = async move {
            let sent = wall_ms();
            let resp = tokio::time::timeout(timeout, req.send()).await.ok()?.ok()?;
            let got = wall_ms();
            let header = |name: &str| resp.headers().get(name).and_then(|v| v.to_str().ok());
            Some(Refusal::from_answer(
                resp.status().as_u16(),
                header("www-authenticate"),
                header("tether-time"),
                sent,
                got,
            ))
        };
        ctx.spawn(fut.into_actor(self).map(|r, act, _| {
            // A probe that was not refused (the gateway took the fresh token) explains nothing.
            if let Some(r) = r.filter(|r| r.status == 401) {
                act.refused(r);
            }
        }));
    }

    /// The HTTP fallback: open a channel, then the same handshake as over a WebSocket.
    fn connect_http(
        &mut self,
        base: String,
        headers: Vec<(String, String)>,
        ctx: &mut Context<Self>,
    ) {
        let epoch = self.epoch;
        let client = self.ports.dialer.client();
        let timeout = self.settings.connect_timeout;
        let fut = async move { http_link::open(client, &base, headers, timeout).await };
        ctx.spawn(fut.into_actor(self).map(move |res, act, ctx| {
            if act.epoch != epoch || act.state != State::Connecting {
                return;
            }
            match res {
                Ok(ch) => {
                    act.http_failures = 0;
                    act.opened_http(ch, ctx);
                }
                Err(e) => {
                    log::warn!(target: CONNECTION, "clinic={} event=connect_failed transport=http error={:?}", act.clinic(), e.to_string());
                    if let HttpLinkError::Refused {
                        reason,
                        clock_offset_ms,
                        ..
                    } = &e
                    {
                        act.refused(Refusal {
                            status: 401,
                            reason: reason.clone(),
                            clock_offset_ms: *clock_offset_ms,
                            at_ms: wall_ms(),
                        });
                    }
                    act.http_fallback_failed(&e);
                    act.schedule_reconnect(ctx);
                }
            }
        }));
    }

    /// `auto` gives the WebSocket another go when the fallback does not work either.
    fn http_fallback_failed(&mut self, e: &HttpLinkError) {
        // A refused credential is not the transport's fault: no reason to switch back.
        if self.settings.transport != Transport::Auto || matches!(e, HttpLinkError::Refused { .. })
        {
            return;
        }
        self.http_failures += 1;
        if self.http_failures >= self.settings.fallback_after {
            self.http_failures = 0;
            self.stats.on_http.store(false, Ordering::Relaxed);
            log::warn!(target: CONNECTION, "clinic={} event=transport_changed transport=websocket reason=\"the HTTP fallback failed {} times in a row (last: {e})\"", self.clinic(), self.settings.fallback_after);
        }
    }

    fn opened_http(&mut self, ch: http_link::Channel, ctx: &mut Context<Self>) {
        let epoch = self.epoch;
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let sender = http_link::sender(
            ch.clone(),
            rx,
            self.settings.max_frame_bytes,
            self.settings.heartbeat_interval * 3,
        );
        ctx.spawn(sender.into_actor(self).map(move |res, act, ctx| {
            if let Err(e) = res {
                if act.epoch == epoch {
                    log::warn!(target: CONNECTION, "clinic={} event=send_failed transport=http error={:?}", act.clinic(), e.to_string());
                    act.link_lost(ctx, "send failed");
                }
            }
        }));
        let mut poll_ch = ch.clone();
        poll_ch.poll_wait = poll_ch.poll_wait.min(self.settings.heartbeat_interval);
        let stream = http_link::poller(poll_ch)
            .map(move |item| Incoming::Http(epoch, item))
            .chain(futures_util::stream::once(
                async move { Incoming::End(epoch) },
            ));
        self.stream = Some(ctx.add_stream(stream));
        self.link = Some(LinkOut::Http { tx, ch });
        self.handshake(ctx);
    }

    fn opened(&mut self, framed: Framed<BoxedSocket, ws::Codec>, ctx: &mut Context<Self>) {
        // Same socket and buffers, with the frame limit checked at each header.
        let parts = framed.into_parts();
        let codec = GuardedCodec::new(parts.codec, self.settings.max_frame_bytes);
        let mut guarded = actix_codec::FramedParts::with_read_buf(parts.io, codec, parts.read_buf);
        guarded.write_buf = parts.write_buf;
        let (sink, stream) = Framed::from_parts(guarded).split();
        let epoch = self.epoch;
        let stream =
            stream
                .map(move |item| Incoming::Frame(epoch, item))
                .chain(futures_util::stream::once(
                    async move { Incoming::End(epoch) },
                ));
        self.stream = Some(ctx.add_stream(stream));
        self.link = Some(LinkOut::Ws(SinkWrite::new(sink, ctx)));
        self.handshake(ctx);
    }

    /// The link is open: `hello`, then `welcome` within `connect_timeout`.
    fn handshake(&mut self, ctx: &mut Context<Self>) {
        let epoch = self.epoch;
        self.state = State::Handshaking;
        self.last_seen = self.ports.clock.now();
        let hello = Wire::Hello(Hello {
            clinic_id: self.settings.clinic_id.clone(),
            agent_version: self.settings.agent_version.clone(),
            last_acked_seq: self.stats.acked_seq.load(Ordering::Relaxed),
            source_id: self.source_id,
            restarts: Some(self.stats.total_restarts()),
            clock_ms: Some(unix_ms()),
            features: vec![
                tether_schemas::FEATURE_CHANNELS.into(),
                tether_schemas::FEATURE_CHANNEL_ENCRYPTION.into(),
            ],
        });
        self.write_text(hello.encode());
        // The whole handshake (upgrade + welcome) must finish within connect_timeout.
        let timeout = self.settings.connect_timeout;
        ctx.run_later(timeout, move |act, ctx| {
            if act.epoch == epoch && act.state == State::Handshaking {
                log::warn!(target: CONNECTION, "clinic={} event=handshake_timeout waited_ms={}", act.clinic(), timeout.as_millis());
                act.link_lost(ctx, "no welcome");
            }
        });
    }

    /// A WebSocket control frame (ping, pong); the HTTP fallback has none. Nothing follows our
    /// close frame.
    fn write(&mut self, msg: ws::Message) {
        if matches!(self.state, State::Retiring | State::Closing) {
            return;
        }
        if let Some(LinkOut::Ws(sink)) = self.link.as_mut() {
            if sink.write(msg).is_err() {
                log::warn!(target: CONNECTION, "clinic={} event=write_failed", self.settings.clinic_id);
            }
        }
    }

    /// One protocol message, whichever the transport.
    fn write_text(&mut self, text: String) {
        let failed = match self.link.as_mut() {
            Some(LinkOut::Ws(sink)) => sink.write(ws::Message::Text(text.into())).is_err(),
            Some(LinkOut::Http { tx, .. }) => tx.send(text).is_err(),
            None => false,
        };
        if failed {
            log::warn!(target: CONNECTION, "clinic={} event=write_failed", self.settings.clinic_id);
        }
    }

    /// Our close: a close frame, or `POST …/close` on the HTTP fallback.
    fn send_close(&mut self, ctx: &mut Context<Self>, code: ws::CloseCode, why: &str) {
        match self.link.as_mut() {
            Some(LinkOut::Ws(sink)) => {
                let _ = sink.write(ws::Message::Close(Some(ws::CloseReason {
                    code,
                    description: Some(why.into()),
                })));
            }
            Some(LinkOut::Http { ch, .. }) => {
                let (ch, why) = (ch.clone(), why.to_string());
                let fut = async move { http_link::close(ch, u16::from(code), &why).await };
                ctx.spawn(fut.into_actor(self).map(|res, act, _| {
                    if let Err(e) = res {
                        log::debug!(target: CONNECTION, "clinic={} event=close_not_confirmed transport=http error={:?}", act.clinic(), e.to_string());
                    }
                }));
            }
            None => {}
        }
    }

    /// Leave a working link on purpose (a fresh token, or back to the WebSocket): our close
    /// (1000) first, the outbound queue stops sending on it, then the gateway's close (or
    /// `RETIRE_WAIT`) ends it and the next link is opened at once.
    fn retire(&mut self, ctx: &mut Context<Self>, why: &'static str) {
        let epoch = self.epoch;
        self.send_close(ctx, ws::CloseCode::Normal, why);
        self.reauth = true;
        if self.state == State::Up {
            if let Some(o) = self.slots.outbound.get() {
                o.do_send(LinkDown { epoch });
            }
        }
        self.state = State::Retiring;
        ctx.run_later(RETIRE_WAIT, move |act, ctx| {
            if act.epoch == epoch && act.state == State::Retiring {
                log::info!(target: CONNECTION, "clinic={} event=close_not_answered waited_ms={}", act.clinic(), RETIRE_WAIT.as_millis());
                act.link_lost(ctx, why);
            }
        });
    }

    /// Ends the writer of the current link: a WebSocket's close frame and shutdown are given
    /// `RETIRE_WAIT` to finish, then its task is cancelled whatever state the socket is in, so
    /// no dead socket (or its errors) outlives its link.
    fn drop_writer(&mut self, ctx: &mut Context<Self>) {
        if let Some(LinkOut::Ws(mut sink)) = self.link.take() {
            sink.close();
            let handle = sink.handle();
            ctx.run_later(RETIRE_WAIT, move |_, ctx| {
                ctx.cancel_future(handle);
            });
        }
    }

    /// Tear the current socket down and schedule the next attempt.
    fn link_lost(&mut self, ctx: &mut Context<Self>, why: &str) {
        if self.state == State::Closing {
            self.closed(ctx);
            return;
        }
        if matches!(self.state, State::Idle) {
            return;
        }
        let was_up = self.state == State::Up;
        let retired = self.state == State::Retiring;
        if self.state == State::Handshaking && !self.on_http() {
            self.note_blocked(&format!("the socket failed before welcome: {why}"));
        }
        self.drop_writer(ctx);
        self.link = None;
        if let Some(h) = self.stream.take() {
            ctx.cancel_future(h);
        }
        self.fragments = None;
        self.updates.clear();
        self.applying = false;
        // Publications not answered: their callers hear so (and may publish again with the
        // same id: the gateway keeps one message per id).
        self.publishing.clear();
        for (_, w) in self.calls.drain() {
            let _ = w.send(Err(
                "the link to the gateway was lost before the answer".into()
            ));
        }
        self.stats.connected.store(false, Ordering::Relaxed);
        if was_up {
            let up_ms = self
                .up_since
                .map(|t| {
                    self.ports
                        .clock
                        .now()
                        .saturating_duration_since(t)
                        .as_millis()
                })
                .unwrap_or(0);
            log::warn!(target: CONNECTION, "clinic={} event=disconnected reason={why:?} up_ms={up_ms}", self.clinic());
            if let Some(o) = self.slots.outbound.get() {
                o.do_send(LinkDown { epoch: self.epoch });
            }
        } else if retired {
            log::info!(target: CONNECTION, "clinic={} event=link_retired reason={why:?}", self.clinic());
        } else {
            log::warn!(target: CONNECTION, "clinic={} event=connect_failed reason={why:?}", self.clinic());
        }
        self.schedule_reconnect(ctx);
    }

    /// The close handshake finished (or the socket ended) during shutdown.
    fn closed(&mut self, ctx: &mut Context<Self>) {
        self.drop_writer(ctx);
        self.link = None;
        if let Some(h) = self.stream.take() {
            ctx.cancel_future(h);
        }
        self.stats.connected.store(false, Ordering::Relaxed);
        for w in self.close_waiters.drain(..) {
            let _ = w.send(());
        }
    }

    fn schedule_reconnect(&mut self, ctx: &mut Context<Self>) {
        self.state = State::Idle;
        self.backoff.disconnected(self.ports.clock.now());
        self.up_since = None;
        self.proven = false;
        let delay = if std::mem::take(&mut self.reauth) {
            Duration::ZERO
        } else if std::mem::take(&mut self.going_away) {
            // A restart or a drain: expected back at once (see `backoff`).
            self.backoff.after_going_away(&mut rand::rng())
        } else {
            self.backoff.next_delay(&mut rand::rng())
        };
        AgentStats::add(&self.stats.reconnects, 1);
        log::info!(target: CONNECTION, "clinic={} event=reconnect_scheduled delay_ms={} attempt={}", self.clinic(), delay.as_millis(), self.backoff.attempt());
        ctx.run_later(delay, |act, ctx| {
            if act.state == State::Idle {
                act.connect(ctx);
            }
        });
    }

    fn heartbeat(&mut self, ctx: &mut Context<Self>) {
        if !matches!(self.state, State::Up | State::Handshaking) {
            return;
        }
        let hb = self.settings.heartbeat_interval;
        let silent = self
            .ports
            .clock
            .now()
            .saturating_duration_since(self.last_seen);
        if silent > hb * 3 {
            AgentStats::add(&self.stats.heartbeat_misses, 1);
            log::warn!(target: CONNECTION, "clinic={} event=heartbeat_miss silent_ms={} limit_ms={}", self.clinic(), silent.as_millis(), (hb * 3).as_millis());
            self.link_lost(ctx, "heartbeat timeout");
            return;
        }
        self.write(ws::Message::Ping(bytes::Bytes::new()));
    }

    fn on_text(&mut self, text: &str, ctx: &mut Context<Self>) {
        let msg = match Wire::decode(text, self.settings.max_frame_bytes) {
            Ok(m) => m,
            Err(e) => {
                log::error!(target: ERROR, "clinic={} event=bad_frame_from_gateway error={e}", self.clinic());
                return;
            }
        };
        if self.state == State::Retiring {
            // After our close: acks, updates and requests of this link are redone on the next.
            log::debug!(target: CONNECTION, "clinic={} event=ignored_after_close type={}", self.clinic(), msg.kind());
            return;
        }
        match (self.state, msg) {
            (State::Handshaking, Wire::Welcome(w)) => {
                let now = self.ports.clock.now();
                self.state = State::Up;
                self.up_since = Some(now);
                self.backoff.connected(now);
                self.acked_seq = w.acked_seq;
                self.link_max_frame = self
                    .settings
                    .max_frame_bytes
                    .min(usize::try_from(w.max_frame_bytes).unwrap_or(usize::MAX));
                self.stats.connected.store(true, Ordering::Relaxed);
                AgentStats::add(&self.stats.links_up, 1);
                self.ports.channels.set_channels(w.channels);
                self.stats.set_refusal(None);
                log::info!(target: CONNECTION, "clinic={} event=connected transport={} session={} gateway_acked_seq={} handshake_ms={}", self.clinic(), self.transport_name(), w.session_id, w.acked_seq, now.saturating_duration_since(self.attempt_started).as_millis());
                if self.on_http() {
                    if self.settings.transport == Transport::Auto {
                        self.schedule_upgrade_probe(ctx);
                    }
                } else {
                    self.blocked = 0;
                }
                if let Some(life) = self.ports.dialer.credential_lifetime() {
                    // Reconnect with a fresh token well before this one expires; the resend
                    // protocol makes the switch lossless.
                    // Token times are whole seconds: allow one more second for the rounding.
                    let margin = (life / 5).clamp(Duration::from_secs(1), Duration::from_secs(30))
                        + Duration::from_secs(1);
                    let at = life
                        .saturating_sub(margin)
                        .saturating_sub(now.saturating_duration_since(self.attempt_started));
                    let epoch = self.epoch;
                    ctx.run_later(at, move |act, ctx| {
                        if act.epoch == epoch && act.state == State::Up {
                            log::info!(target: CONNECTION, "clinic={} event=reauthenticating reason=\"token expires soon\"", act.clinic());
                            act.retire(ctx, "re-authenticating");
                        }
                    });
                }
                if let Some(o) = self.slots.outbound.get() {
                    o.do_send(LinkUp {
                        epoch: self.epoch,
                        acked_seq: w.acked_seq,
                    });
                }
            }
            (State::Up, Wire::Ack(a)) => {
                self.link_proven();
                self.acked_seq = self.acked_seq.max(a.seq);
                if let Some(o) = self.slots.outbound.get() {
                    o.do_send(Acked {
                        epoch: self.epoch,
                        seq: a.seq,
                    });
                }
            }
            (State::Up, Wire::Update(u)) => {
                self.updates.push_back(u);
                self.apply_next(ctx);
            }
            (State::Up, Wire::RpcRequest(r)) => self.run_query(r, ctx),
            (State::Up, Wire::Channel(m)) => {
                self.link_proven();
                log::debug!(target: crate::log_target::MESSAGE, "clinic={} event=channel_received channel={} message_id={}", self.clinic(), m.channel, m.message_id);
                let now = self.ports.clock.now();
                if let Some(a) = self.ports.channels.on_down(m, now) {
                    self.write_text(Wire::ChannelAck(a).encode());
                }
            }
            (_, Wire::ChannelAck(a)) => match self.publishing.remove(&a.message_id) {
                Some((channel, w)) => {
                    let accepted = a.status == tether_schemas::ChannelAckStatus::Accepted;
                    self.ports.channels.published(&channel, accepted);
                    let _ = w.send(a);
                }
                None => {
                    log::warn!(target: ERROR, "clinic={} event=channel_ack_unexpected message_id={}", self.clinic(), a.message_id)
                }
            },
            (_, Wire::CallResponse(r)) => match self.calls.remove(&r.request_id) {
                Some(w) => {
                    let _ = w.send(Ok(r));
                }
                None => {
                    log::warn!(target: ERROR, "clinic={} event=call_answer_unexpected request_id={}", self.clinic(), r.request_id)
                }
            },
            (_, Wire::Error(e)) => {
                log::error!(target: ERROR, "clinic={} event=gateway_error code={:?} field={} message={:?}", self.clinic(), e.code, e.field.as_deref().unwrap_or("-"), e.message);
            }
            (state, other) => {
                log::error!(target: ERROR, "clinic={} event=unexpected_message type={} state={state:?}", self.clinic(), other.kind());
            }
        }
    }

    /// On the HTTP fallback under `auto`: every `upgrade_retry`, try a WebSocket upgrade (and
    /// close it straight away); when one passes, move the link back to a WebSocket.
    fn schedule_upgrade_probe(&mut self, ctx: &mut Context<Self>) {
        let epoch = self.epoch;
        ctx.run_later(self.settings.upgrade_retry, move |act, ctx| {
            if act.epoch != epoch || act.state != State::Up || !act.on_http() {
                return;
            }
            let headers = match act.ports.dialer.headers() {
                Ok(h) => h,
                Err(e) => {
                    log::warn!(target: CONNECTION, "clinic={} event=credentials_failed error={e}", act.clinic());
                    return act.schedule_upgrade_probe(ctx);
                }
            };
            let mut req = act
                .ports
                .dialer
                .client()
                .ws(act.settings.gateway_url.as_str())
                .max_frame_size(act.settings.max_frame_bytes);
            for (k, v) in headers {
                req = req.header(k, v);
            }
            let timeout = act.settings.connect_timeout;
            let probe = async move {
                use futures_util::SinkExt;
                match tokio::time::timeout(timeout, req.connect()).await {
                    Ok(Ok((_, mut framed))) => {
                        let bye = ws::Message::Close(Some(ws::CloseReason {
                            code: ws::CloseCode::Normal,
                            description: Some("upgrade probe".into()),
                        }));
                        let _ = tokio::time::timeout(timeout, framed.send(bye)).await;
                        Ok(())
                    }
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err(format!("timed out after {} ms", timeout.as_millis())),
                }
            };
            ctx.spawn(probe.into_actor(act).map(move |res, act, ctx| {
                if act.epoch != epoch || act.state != State::Up {
                    return;
                }
                match res {
                    Ok(()) => {
                        log::info!(target: CONNECTION, "clinic={} event=transport_changed transport=websocket reason=\"a websocket upgrade passed again\"", act.clinic());
                        act.stats.on_http.store(false, Ordering::Relaxed);
                        act.retire(ctx, "moving to websocket");
                    }
                    Err(e) => {
                        log::info!(target: CONNECTION, "clinic={} event=upgrade_still_blocked error={e:?}", act.clinic());
                        act.schedule_upgrade_probe(ctx);
                    }
                }
            }));
        });
    }

    /// Runs an allow-listed query off the event loop and answers on the same link. Only the
    /// query's name, id, row count and time are logged: parameters and rows are patient data.
    fn run_query(&mut self, r: tether_schemas::RpcRequest, ctx: &mut Context<Self>) {
        use tether_schemas::{RpcResponse, RpcStatus};
        if self.rpc_running >= MAX_RPC_RUNNING {
            let busy = Wire::RpcResponse(RpcResponse {
                request_id: r.request_id,
                status: RpcStatus::Busy,
                rows: None,
                truncated: None,
                error: Some(format!("busy: {MAX_RPC_RUNNING} queries already running")),
                field: None,
            });
            return self.write_text(busy.encode());
        }
        self.rpc_running += 1;
        let epoch = self.epoch;
        let queries = self.ports.queries.clone();
        let started = self.ports.clock.now();
        let (id, name) = (r.request_id.clone(), r.name.clone());
        let fut = async move {
            crate::agent::blocking(move || Ok(queries.run(&r.name, &r.params)))
                .await
                .unwrap_or_else(|e| {
                    Err(crate::ports::QueryError {
                        field: None,
                        message: e.to_string(),
                    })
                })
        };
        ctx.spawn(fut.into_actor(self).map(move |res, act, _| {
            act.rpc_running -= 1;
            let ms = act.ports.clock.now().saturating_duration_since(started).as_millis();
            let resp = match res {
                Ok(q) => {
                    log::info!(target: crate::log_target::MESSAGE, "clinic={} event=rpc_answered request_id={id} name={name} rows={} truncated={} ms={ms}", act.clinic(), q.rows.len(), q.truncated);
                    RpcResponse {
                        request_id: id,
                        status: RpcStatus::Ok,
                        rows: Some(q.rows),
                        truncated: Some(q.truncated),
                        error: None,
                        field: None,
                    }
                }
                Err(e) => {
                    log::warn!(target: crate::log_target::MESSAGE, "clinic={} event=rpc_refused request_id={id} name={name} field={} ms={ms}", act.clinic(), e.field.as_deref().unwrap_or("-"));
                    RpcResponse {
                        request_id: id,
                        status: RpcStatus::Error,
                        rows: None,
                        truncated: None,
                        error: Some(e.message),
                        field: e.field,
                    }
                }
            };
            // The link may have changed meanwhile: the gateway's caller has then been told.
            if act.epoch == epoch && act.state == State::Up {
                act.write_text(Wire::RpcResponse(resp).encode());
            }
        }));
    }

    /// Applies the oldest unapplied update; the next waits for its result (per-row order).
    fn apply_next(&mut self, ctx: &mut Context<Self>) {
        if self.applying || self.state != State::Up {
            return;
        }
        let Some(update) = self.updates.front().cloned() else {
            return;
        };
        let Some(applier) = self.slots.applier.get() else {
            ctx.run_later(Duration::from_millis(100), |act, ctx| act.apply_next(ctx));
            return;
        };
        self.applying = true;
        let epoch = self.epoch;
        ctx.spawn(
            applier
                .send(Apply(update))
                .into_actor(self)
                .map(move |res, act, ctx| {
                    if act.epoch != epoch {
                        return; // link changed meanwhile; the gateway will redeliver
                    }
                    act.applying = false;
                    match res {
                        Ok(Ok(_)) if act.state != State::Up => {
                            // Closing: no frame after our close; the gateway redelivers and
                            // the inbox recognises the update as applied.
                        }
                        Ok(Ok(outcome)) => {
                            act.apply_failures = 0;
                            if let Some(u) = act.updates.pop_front() {
                                let result = Wire::UpdateResult(UpdateResult {
                                    update_id: u.update_id,
                                    status: outcome.status,
                                    reason: outcome.reason,
                                });
                                act.write_text(result.encode());
                            }
                            act.apply_next(ctx);
                        }
                        // The database or the applier is unavailable: retry the same update,
                        // 250 ms doubling to 10 s (the database port reconnects meanwhile).
                        Ok(Err(_)) | Err(_) => {
                            let n = act.apply_failures.min(6);
                            act.apply_failures = act.apply_failures.saturating_add(1);
                            let delay = (Duration::from_millis(250) * 2u32.pow(n))
                                .min(Duration::from_secs(10));
                            ctx.run_later(delay, |act, ctx| act.apply_next(ctx));
                        }
                    }
                }),
        );
    }
}

impl Actor for Connection {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.run_interval(self.settings.heartbeat_interval, |act, ctx| {
            act.heartbeat(ctx)
        });
        // Channel acks made outside a frame (a subscriber arrived, a message expired) come here.
        self.ports.channels.attach(ctx.address().recipient());
        ctx.run_interval(CHANNEL_EXPIRY_TICK, |act, _| {
            let now = act.ports.clock.now();
            act.ports.channels.expire(now);
        });
        // Which outbox this agent speaks for (read once, off the arbiter thread).
        let cp = self.ports.checkpoint.clone();
        ctx.wait(
            crate::agent::blocking(move || cp.source_id())
                .into_actor(self)
                .map(|res, act, ctx| {
                    match res {
                        Ok(id) => act.source_id = id,
                        Err(e) => {
                            log::error!(target: ERROR, "clinic={} event=source_id_unreadable error={e}", act.clinic())
                        }
                    }
                    act.connect(ctx);
                }),
        );
    }

    fn stopped(&mut self, _: &mut Self::Context) {
        self.stats.connected.store(false, Ordering::Relaxed);
    }
}

impl StreamHandler<Incoming> for Connection {
    fn handle(&mut self, item: Incoming, ctx: &mut Self::Context) {
        match item {
            Incoming::End(epoch) => {
                if epoch == self.epoch {
                    self.link_lost(ctx, "stream ended");
                }
            }
            Incoming::Frame(epoch, _) | Incoming::Http(epoch, _) if epoch != self.epoch => {}
            Incoming::Http(_, PollItem::Messages(msgs)) => {
                self.last_seen = self.ports.clock.now();
                for text in msgs {
                    self.on_text(&text, ctx);
                }
            }
            Incoming::Http(_, PollItem::Closed(c)) => {
                self.going_away = c.code == 1001;
                self.gateway_closed(c.code, c.reason);
                self.link_lost(ctx, "closed by gateway");
            }
            Incoming::Http(_, PollItem::Failed(e)) => {
                log::warn!(target: CONNECTION, "clinic={} event=poll_failed transport=http error={:?}", self.clinic(), e.to_string());
                self.link_lost(ctx, "poll failed");
            }
            Incoming::Frame(_, Err(crate::frames::ProtocolError::Overflow)) => {
                log::warn!(target: CONNECTION, "clinic={} event=frame_too_large limit={}", self.clinic(), self.settings.max_frame_bytes);
                self.send_close(ctx, ws::CloseCode::Size, "frame too large");
                self.link_lost(ctx, "frame too large");
            }
            Incoming::Frame(_, Err(e)) => {
                log::warn!(target: CONNECTION, "clinic={} event=protocol_error error={:?}", self.clinic(), e.to_string());
                self.link_lost(ctx, "protocol error");
            }
            Incoming::Frame(_, Ok(frame)) => {
                self.last_seen = self.ports.clock.now();
                match frame {
                    ws::Frame::Text(bytes) => match std::str::from_utf8(&bytes) {
                        Ok(text) => self.on_text(text, ctx),
                        Err(_) => {
                            log::error!(target: ERROR, "clinic={} event=bad_frame_from_gateway error=\"text frame is not UTF-8\"", self.clinic())
                        }
                    },
                    ws::Frame::Ping(b) => {
                        self.link_proven();
                        self.write(ws::Message::Pong(b))
                    }
                    ws::Frame::Pong(_) => self.link_proven(),
                    ws::Frame::Close(reason) => {
                        let (code, desc) = reason
                            .map(|r| (u16::from(r.code), r.description.unwrap_or_default()))
                            .unwrap_or((1005, String::new()));
                        self.going_away = code == 1001;
                        self.gateway_closed(code, desc);
                        self.link_lost(ctx, "closed by gateway");
                    }
                    ws::Frame::Continuation(item) => self.on_fragment(item, ctx),
                    ws::Frame::Binary(_) => {
                        log::error!(target: ERROR, "clinic={} event=unexpected_frame kind=binary", self.clinic());
                    }
                }
            }
        }
    }

    fn finished(&mut self, _: &mut Self::Context) {
        // Each stream ends with `Incoming::End`; the actor itself must keep running.
    }
}

impl Connection {
    /// The link has carried traffic both ways since `welcome` (an ack, or a ping or pong):
    /// the reconnect backoff starts from the beginning again.
    fn link_proven(&mut self) {
        if self.state == State::Up && !self.proven {
            self.proven = true;
            self.backoff.reset();
        }
    }

    /// A fragmented text message from the gateway (the codec has limited its total size).
    fn on_fragment(&mut self, item: Item, ctx: &mut Context<Self>) {
        match item {
            Item::FirstText(b) => self.fragments = Some(b.to_vec()),
            Item::FirstBinary(_) => {
                log::error!(target: ERROR, "clinic={} event=unexpected_frame kind=binary", self.clinic());
            }
            Item::Continue(b) => {
                if let Some(f) = self.fragments.as_mut() {
                    f.extend_from_slice(&b);
                }
            }
            Item::Last(b) => {
                if let Some(mut f) = self.fragments.take() {
                    f.extend_from_slice(&b);
                    match String::from_utf8(f) {
                        Ok(text) => self.on_text(&text, ctx),
                        Err(_) => {
                            log::error!(target: ERROR, "clinic={} event=bad_frame_from_gateway error=\"text message is not UTF-8\"", self.clinic())
                        }
                    }
                }
            }
        }
    }

    fn gateway_closed(&mut self, code: u16, desc: String) {
        if matches!(self.state, State::Closing | State::Retiring) {
            log::info!(target: CONNECTION, "clinic={} event=closed code={code} reason={desc:?}", self.clinic());
        } else {
            log::warn!(target: CONNECTION, "clinic={} event=closed_by_gateway code={code} reason={desc:?}", self.clinic());
        }
        if code == DUPLICATE_SOURCE {
            self.refused(Refusal {
                status: code,
                reason: "duplicate_source".into(),
                clock_offset_ms: None,
                at_ms: wall_ms(),
            });
        }
    }
}

impl WriteHandler<WsProtocolError> for Connection {
    /// A socket that failed to write is finished: its writer stops here (it would otherwise
    /// fail again at every later wake-up), and the reader's end or the heartbeat ends the link.
    fn error(&mut self, err: WsProtocolError, _: &mut Self::Context) -> Running {
        log::warn!(target: CONNECTION, "clinic={} event=write_error error={:?}", self.clinic(), err.to_string());
        Running::Stop
    }

    fn finished(&mut self, _: &mut Self::Context) {}
}

/// From the outbound queue: one encoded frame for the link of `epoch`.
#[derive(Message)]
#[rtype(result = "()")]
pub struct SendFrame {
    pub epoch: u64,
    pub text: String,
}

impl Handler<SendFrame> for Connection {
    type Result = ();
    fn handle(&mut self, msg: SendFrame, _: &mut Self::Context) {
        if msg.epoch == self.epoch && self.state == State::Up {
            self.write_text(msg.text);
        }
    }
}

/// From the admin endpoint: call a configured endpoint of the main Web API through the
/// gateway (`call_request`); answers when the gateway does, or with why not.
/// Clinic software calls the main Web API through the link (`POST /call/{endpoint}` on the
/// admin endpoint): one `call_request`, answered by the gateway's `call_response`.
#[derive(Message)]
#[rtype(result = "Result<tether_schemas::CallResponse, CallError>")]
pub struct Call {
    pub endpoint: String,
    /// The JSON body exactly as received (validated as JSON by the caller).
    pub body_text: String,
    /// The caller gets an answer by then, whatever happens on the way.
    pub timeout: Duration,
    pub idempotency_key: Option<String>,
}

/// Why a call got no answer from the main Web API.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    #[error("not connected to the gateway")]
    NotConnected,
    #[error(
        "the body and its envelope take {size} bytes; the link carries at most {limit} per message"
    )]
    TooLarge { size: usize, limit: usize },
    #[error("the link to the gateway was lost before the answer")]
    LinkLost,
    #[error("no answer within {0} ms")]
    Timeout(u128),
}

/// The wall clock in Unix milliseconds (deadlines travel on it; see `hello.clock_ms`).
fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Handler<Call> for Connection {
    type Result = ResponseFuture<Result<tether_schemas::CallResponse, CallError>>;
    fn handle(&mut self, msg: Call, _: &mut Self::Context) -> Self::Result {
        if self.state != State::Up {
            return Box::pin(async { Err(CallError::NotConnected) });
        }
        // Callers that gave up (timed out) no longer wait: forget them.
        self.calls.retain(|_, w| !w.is_closed());
        let id = format!("call_{:016x}", rand::random::<u64>());
        let frame = Wire::CallRequest(tether_schemas::CallRequest {
            request_id: id.clone(),
            endpoint: msg.endpoint.clone(),
            body: None,
            body_text: Some(msg.body_text),
            deadline: Some(unix_ms() + msg.timeout.as_millis() as u64),
            idempotency_key: msg.idempotency_key,
        })
        .encode();
        // What the frame cannot carry is refused here, not by the gateway closing the link.
        if frame.len() > self.link_max_frame {
            let (size, limit) = (frame.len(), self.link_max_frame);
            return Box::pin(async move { Err(CallError::TooLarge { size, limit }) });
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.calls.insert(id.clone(), tx);
        log::info!(target: crate::log_target::MESSAGE, "clinic={} event=call_sent request_id={id} endpoint={}", self.clinic(), msg.endpoint);
        self.write_text(frame);
        let timeout = msg.timeout;
        Box::pin(async move {
            match tokio::time::timeout(timeout, rx).await {
                Ok(Ok(answer)) => answer.map_err(|_| CallError::LinkLost),
                Ok(Err(_)) => Err(CallError::LinkLost),
                Err(_) => Err(CallError::Timeout(timeout.as_millis())),
            }
        })
    }
}

/// How often waiting transient channel messages are checked for expiry (a message is never
/// handed over past its time whatever this is; it bounds how soon `expired` is reported).
const CHANNEL_EXPIRY_TICK: Duration = Duration::from_millis(250);

impl Handler<crate::channels::SendAcks> for Connection {
    type Result = ();
    fn handle(&mut self, msg: crate::channels::SendAcks, _: &mut Self::Context) {
        if self.state != State::Up {
            // The gateway sends the messages again on the next session; the board answers.
            return;
        }
        for a in msg.0 {
            self.write_text(Wire::ChannelAck(a).encode());
        }
    }
}

/// From the admin endpoint: publish a local application's message on an up channel (already
/// checked against the channel by the board). Answers the gateway's `channel_ack`.
#[derive(Message)]
#[rtype(result = "Result<tether_schemas::ChannelAck, CallError>")]
pub struct Publish {
    pub message: tether_schemas::ChannelMessage,
    pub timeout: Duration,
}

impl Handler<Publish> for Connection {
    type Result = ResponseFuture<Result<tether_schemas::ChannelAck, CallError>>;
    fn handle(&mut self, msg: Publish, _: &mut Self::Context) -> Self::Result {
        if self.state != State::Up {
            return Box::pin(async { Err(CallError::NotConnected) });
        }
        self.publishing.retain(|_, (_, w)| !w.is_closed());
        let id = msg.message.message_id.clone();
        let channel = msg.message.channel.clone();
        let frame = Wire::Channel(msg.message).encode();
        if frame.len() > self.link_max_frame {
            let (size, limit) = (frame.len(), self.link_max_frame);
            return Box::pin(async move { Err(CallError::TooLarge { size, limit }) });
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.publishing.insert(id.clone(), (channel.clone(), tx));
        log::info!(target: crate::log_target::MESSAGE, "clinic={} event=channel_published channel={channel} message_id={id}", self.clinic());
        self.write_text(frame);
        let timeout = msg.timeout;
        Box::pin(async move {
            match tokio::time::timeout(timeout, rx).await {
                Ok(Ok(ack)) => Ok(ack),
                Ok(Err(_)) => Err(CallError::LinkLost),
                Err(_) => Err(CallError::Timeout(timeout.as_millis())),
            }
        })
    }
}

#[derive(Message)]
#[rtype(result = "Option<LinkInfo>")]
pub struct CurrentLink;

impl Handler<CurrentLink> for Connection {
    type Result = Option<LinkInfo>;
    fn handle(&mut self, _: CurrentLink, _: &mut Self::Context) -> Option<LinkInfo> {
        (self.state == State::Up).then_some(LinkInfo {
            epoch: self.epoch,
            acked_seq: self.acked_seq,
        })
    }
}

/// Shutdown: send a close frame (1001, going away), stop reconnecting, and answer once the
/// gateway has closed its side or the socket ended. The caller bounds the wait.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Close;

impl Handler<Close> for Connection {
    type Result = ResponseFuture<()>;
    fn handle(&mut self, _: Close, ctx: &mut Self::Context) -> Self::Result {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.close_waiters.push(tx);
        match self.state {
            State::Closing => {}
            // Our close is already on its way: wait for the gateway's like any shutdown.
            State::Retiring => self.state = State::Closing,
            State::Up | State::Handshaking => {
                if self.state == State::Up {
                    log::info!(target: CONNECTION, "clinic={} event=closing reason=\"agent shutting down\"", self.clinic());
                }
                self.send_close(ctx, ws::CloseCode::Away, "agent shutting down");
                self.state = State::Closing;
            }
            State::Idle | State::Connecting => {
                self.state = State::Closing;
                self.closed(ctx);
            }
        }
        Box::pin(async move {
            let _ = rx.await;
        })
    }
}

impl Handler<crate::outbound::Halt> for Connection {
    type Result = ();
    fn handle(&mut self, _: crate::outbound::Halt, ctx: &mut Self::Context) {
        self.state = State::Closing;
        self.closed(ctx);
        self.guard.request_stop("agent shutting down");
        ctx.stop();
    }
}

/// Drops the link as if the network failed (tests and `tether demo --chaos`).
#[derive(Message)]
#[rtype(result = "()")]
pub struct DropLink;

impl Handler<DropLink> for Connection {
    type Result = ();
    fn handle(&mut self, _: DropLink, ctx: &mut Self::Context) {
        self.link_lost(ctx, "dropped on request");
    }
}

#[cfg(feature = "fault-injection")]
impl Handler<crate::InjectPanic> for Connection {
    type Result = ();
    fn handle(&mut self, _: crate::InjectPanic, _: &mut Self::Context) {
        panic!("fault injection: connection");
    }
}

//! Connection actor: the agent's one WebSocket link to the gateway (awc client).
//! Connects, sends `hello`, waits for `welcome`; pings every `heartbeat_interval` and declares
//! the link dead when nothing (pong or frame) came back for three intervals; reconnects with
//! exponential backoff and full jitter. Every connect, close, error, unexpected close and
//! heartbeat miss is a line on the `connection` log.
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

use crate::agent::{AgentPorts, AgentSettings, Slots};
use crate::applier::Apply;
use crate::log_target::{CONNECTION, ERROR};
use crate::outbound::{Acked, LinkDown, LinkUp};
use crate::stats::AgentStats;
use crate::supervisor::ExitGuard;

type WsSink = SplitSink<Framed<BoxedSocket, ws::Codec>, ws::Message>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Waiting for the backoff delay before the next attempt.
    Idle,
    Connecting,
    /// Socket open, `hello` sent, `welcome` not yet received.
    Handshaking,
    Up,
    /// Shutting down: a close frame was sent; no reconnect.
    Closing,
}

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
    sink: Option<SinkWrite<ws::Message, WsSink>>,
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
}

enum Incoming {
    Frame(u64, Result<ws::Frame, WsProtocolError>),
    End(u64),
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
        let now = ports.clock.now();
        Connection {
            guard,
            settings,
            ports,
            stats,
            slots,
            state: State::Idle,
            epoch: 0,
            sink: None,
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
        }
    }

    fn clinic(&self) -> &str {
        &self.settings.clinic_id
    }

    fn connect(&mut self, ctx: &mut Context<Self>) {
        self.state = State::Connecting;
        // Epochs come from a counter that survives restarts of this actor.
        self.epoch = self.stats.connects.fetch_add(1, Ordering::Relaxed) + 1;
        self.attempt_started = self.ports.clock.now();
        let epoch = self.epoch;
        let url = self.settings.gateway_url.clone();
        log::info!(target: CONNECTION, "clinic={} event=connecting url={url} attempt={}", self.clinic(), self.backoff.attempt() + 1);
        let headers = match self.ports.dialer.headers() {
            Ok(h) => h,
            Err(e) => {
                log::error!(target: CONNECTION, "clinic={} event=credentials_failed error={e}", self.clinic());
                self.schedule_reconnect(ctx);
                return;
            }
        };
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
                    act.schedule_reconnect(ctx);
                }
                Err(_) => {
                    log::warn!(target: CONNECTION, "clinic={} event=connect_failed error=\"timed out after {} ms\"", act.clinic(), timeout.as_millis());
                    act.schedule_reconnect(ctx);
                }
            }
        }));
    }

    fn opened(&mut self, framed: Framed<BoxedSocket, ws::Codec>, ctx: &mut Context<Self>) {
        let (sink, stream) = framed.split();
        let epoch = self.epoch;
        let stream =
            stream
                .map(move |item| Incoming::Frame(epoch, item))
                .chain(futures_util::stream::once(
                    async move { Incoming::End(epoch) },
                ));
        self.stream = Some(ctx.add_stream(stream));
        self.sink = Some(SinkWrite::new(sink, ctx));
        self.state = State::Handshaking;
        self.last_seen = self.ports.clock.now();
        let hello = Wire::Hello(Hello {
            clinic_id: self.settings.clinic_id.clone(),
            agent_version: self.settings.agent_version.clone(),
            last_acked_seq: self.stats.acked_seq.load(Ordering::Relaxed),
            source_id: self.source_id,
        });
        self.write(ws::Message::Text(hello.encode().into()));
        // The whole handshake (upgrade + welcome) must finish within connect_timeout.
        let timeout = self.settings.connect_timeout;
        ctx.run_later(timeout, move |act, ctx| {
            if act.epoch == epoch && act.state == State::Handshaking {
                log::warn!(target: CONNECTION, "clinic={} event=handshake_timeout waited_ms={}", act.clinic(), timeout.as_millis());
                act.link_lost(ctx, "no welcome");
            }
        });
    }

    fn write(&mut self, msg: ws::Message) {
        if let Some(sink) = self.sink.as_mut() {
            if sink.write(msg).is_err() {
                log::warn!(target: CONNECTION, "clinic={} event=write_failed", self.settings.clinic_id);
            }
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
        if let Some(mut sink) = self.sink.take() {
            sink.close();
        }
        if let Some(h) = self.stream.take() {
            ctx.cancel_future(h);
        }
        self.updates.clear();
        self.applying = false;
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
        } else {
            log::warn!(target: CONNECTION, "clinic={} event=connect_failed reason={why:?}", self.clinic());
        }
        self.schedule_reconnect(ctx);
    }

    /// The close handshake finished (or the socket ended) during shutdown.
    fn closed(&mut self, ctx: &mut Context<Self>) {
        if let Some(mut sink) = self.sink.take() {
            sink.close();
        }
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
        let delay = if std::mem::take(&mut self.reauth) {
            Duration::ZERO
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
        match (self.state, msg) {
            (State::Handshaking, Wire::Welcome(w)) => {
                let now = self.ports.clock.now();
                self.state = State::Up;
                self.up_since = Some(now);
                self.backoff.connected(now);
                self.acked_seq = w.acked_seq;
                self.stats.connected.store(true, Ordering::Relaxed);
                AgentStats::add(&self.stats.links_up, 1);
                log::info!(target: CONNECTION, "clinic={} event=connected session={} gateway_acked_seq={} handshake_ms={}", self.clinic(), w.session_id, w.acked_seq, now.saturating_duration_since(self.attempt_started).as_millis());
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
                            act.write(ws::Message::Close(Some(ws::CloseReason {
                                code: ws::CloseCode::Normal,
                                description: Some("re-authenticating".into()),
                            })));
                            act.reauth = true;
                            act.link_lost(ctx, "re-authenticating");
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
            (_, Wire::Error(e)) => {
                log::error!(target: ERROR, "clinic={} event=gateway_error code={:?} field={} message={:?}", self.clinic(), e.code, e.field.as_deref().unwrap_or("-"), e.message);
            }
            (state, other) => {
                log::error!(target: ERROR, "clinic={} event=unexpected_message type={} state={state:?}", self.clinic(), other.kind());
            }
        }
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
                            if let Some(u) = act.updates.pop_front() {
                                let result = Wire::UpdateResult(UpdateResult {
                                    update_id: u.update_id,
                                    status: outcome.status,
                                    reason: outcome.reason,
                                });
                                act.write(ws::Message::Text(result.encode().into()));
                            }
                            act.apply_next(ctx);
                        }
                        // The database or the applier is unavailable: retry the same update.
                        Ok(Err(_)) | Err(_) => {
                            ctx.run_later(Duration::from_millis(250), |act, ctx| {
                                act.apply_next(ctx)
                            });
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
            Incoming::Frame(epoch, _) if epoch != self.epoch => {}
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
                    ws::Frame::Ping(b) => self.write(ws::Message::Pong(b)),
                    ws::Frame::Pong(_) => {}
                    ws::Frame::Close(reason) => {
                        let (code, desc) = reason
                            .map(|r| (u16::from(r.code), r.description.unwrap_or_default()))
                            .unwrap_or((1005, String::new()));
                        if self.state == State::Closing {
                            log::info!(target: CONNECTION, "clinic={} event=closed code={code} reason={desc:?}", self.clinic());
                        } else {
                            log::warn!(target: CONNECTION, "clinic={} event=closed_by_gateway code={code} reason={desc:?}", self.clinic());
                        }
                        self.link_lost(ctx, "closed by gateway");
                    }
                    ws::Frame::Binary(_) | ws::Frame::Continuation(_) => {
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

impl WriteHandler<WsProtocolError> for Connection {
    fn error(&mut self, err: WsProtocolError, _: &mut Self::Context) -> Running {
        log::warn!(target: CONNECTION, "clinic={} event=write_error error={:?}", self.clinic(), err.to_string());
        Running::Continue
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
            self.write(ws::Message::Text(msg.text.into()));
        }
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
            State::Up | State::Handshaking => {
                if self.state == State::Up {
                    log::info!(target: CONNECTION, "clinic={} event=closing reason=\"agent shutting down\"", self.clinic());
                }
                self.write(ws::Message::Close(Some(ws::CloseReason {
                    code: ws::CloseCode::Away,
                    description: Some("agent shutting down".into()),
                })));
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

//! One session per agent connection. This is the only module that uses the deprecated
//! `actix-web-actors` crate, so replacing it later touches this module alone.
//!
//! Two transports reach the same [`Session`]: the WebSocket upgrade at `/v1/ws`, and the HTTP
//! fallback under `/v1/http` ([`http`]), which feeds the agent's messages to the session as
//! frames and hands its frames back to long-polls — so acks, ordering, limits and every
//! protocol rule live in one place whichever way the clinic connects.
//!
//! Takes frames from the agent and `SessionCommand`s from the registry; pings every heartbeat
//! interval and closes a session silent for three; appends event batches to the store and
//! acknowledges them once durable; delivers the clinic's open cloud updates in order, at most
//! `update_window` unanswered at a time, and its down channel messages (`channel`, answered
//! `channel_ack`); takes up channel messages, checked and kept before `accepted`. A panic-free
//! zone: every frame is validated and bad input is answered with an `error` frame naming the
//! problem.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use actix::prelude::*;
use actix_web::{web, HttpRequest, HttpResponse};
use actix_web_actors::ws;
use tether_actors::log_target::{CONNECTION, ERROR, MESSAGE};
use tether_actors::registry::{self, SessionCommand};
use tether_schemas::{
    Ack, DecodeError, ErrorCode, ErrorFrame, Inbound, Message as Wire, RawEvents, UpdateResult,
    Welcome,
};

use super::store::{AppendOutcome, IncomingEvent};
use super::{channels, GatewayState, PeerIdentity};
use crate::config::valid_id;
use crate::security::jwt::{AuthError, Verified};
use crate::security::limits::TokenBucket;
use crate::security::log_value;
use tether_actors::log_target::AUDIT;

pub mod guard;
pub mod http;

use guard::{FrameGuard, GuardState};

pub struct Session {
    id: String,
    clinic: Option<String>,
    state: web::Data<GatewayState>,
    remote: Option<String>,
    last_seen: Instant,
    inflight_updates: HashSet<String>,
    last_update_row: i64,
    fetching: bool,
    more_updates: bool,
    closing: bool,
    batches: u64,
    /// Store writes not yet answered (their acks are still to be sent).
    writes_inflight: usize,
    /// The gateway is stopping: close once `writes_inflight` reaches 0.
    shutting_down: bool,
    /// The clinic the connection proved it is (token, and certificate under mutual TLS).
    auth: Option<Verified>,
    rate: TokenBucket,
    /// The clinic outbox this session speaks for (from `hello`).
    source: u64,
    /// This session's claim on the clinic (from the store at `hello`); its appends carry it and
    /// are fenced once another session, on any node, has claimed the clinic.
    epoch: u64,
    /// `websocket` or `http` (the fallback).
    transport: &'static str,
    /// How the session ended: the close code and reason, and who closed it.
    end: Option<End>,
    /// `rpc_request`s relayed to the agent and not answered yet.
    rpc_outstanding: HashSet<String>,
    /// The frame guard of a WebSocket session (`None` on the HTTP fallback, whose request
    /// bodies are limited by the HTTP layer).
    guard: Option<std::rc::Rc<GuardState>>,
    /// A fragmented message being reassembled: its bytes so far, and whether it is text.
    fragments: Option<(bytes::BytesMut, bool)>,
    /// This worker's pooled clients for the main Web API.
    bridge: Option<web::Data<crate::gateway::bridge::BridgeClients>>,
    /// Gateway clock minus the agent's (ms), measured at `hello` (`hello.clock_ms`).
    clock_offset_ms: Option<i64>,
    /// `call_request`s per second (`gateway.limits.calls_per_second`); past it, 429 answers.
    call_rate: TokenBucket,
    /// The agent takes channel messages (`hello.features`).
    channels_ok: bool,
    /// It also encrypts and decrypts channel fields (`channel_encryption`); without it the
    /// channels that list `encrypt` fields are not declared to it, nor their messages sent.
    channel_crypto_ok: bool,
    /// Down channel messages sent on this session and not answered yet (the window).
    inflight_channel: HashSet<String>,
    last_channel_row: i64,
    channel_fetching: bool,
    more_channel: bool,
    /// Up publications per channel (`rate_per_second`).
    up_rate: HashMap<String, TokenBucket>,
}

/// Callers of `POST /v1/clinics/{id}/rpc` waiting for their answer, by request id.
#[derive(Default)]
pub struct RpcWaiters(std::sync::Mutex<std::collections::HashMap<String, RpcWaiter>>);

type RpcWaiter = tokio::sync::oneshot::Sender<tether_schemas::RpcResponse>;

impl RpcWaiters {
    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, RpcWaiter>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn register(
        &self,
        id: &str,
    ) -> tokio::sync::oneshot::Receiver<tether_schemas::RpcResponse> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.lock().insert(id.to_string(), tx);
        rx
    }

    pub fn forget(&self, id: &str) {
        self.lock().remove(id);
    }

    /// Hands the answer to its caller; `false` if nobody waits for it any more.
    fn answer(&self, r: tether_schemas::RpcResponse) -> bool {
        match self.lock().remove(&r.request_id) {
            Some(tx) => tx.send(r).is_ok(),
            None => false,
        }
    }

    fn fail(&self, id: &str, why: &str) {
        self.answer(tether_schemas::RpcResponse {
            request_id: id.to_string(),
            status: tether_schemas::RpcStatus::Error,
            rows: None,
            truncated: None,
            error: Some(why.to_string()),
            field: None,
        });
    }
}

/// Per-clinic limits on the cloud's RPC calls, applied before anything reaches the clinic.
#[derive(Default)]
pub struct RpcLimits(std::sync::Mutex<std::collections::HashMap<String, ClinicRpc>>);

struct ClinicRpc {
    bucket: TokenBucket,
    running: usize,
}

/// Why a call was not let through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RpcLimited {
    Rate,
    Concurrency,
}

/// A call let through; dropping it frees its place.
pub struct RpcSlot<'a> {
    limits: &'a RpcLimits,
    clinic: String,
}

impl Drop for RpcSlot<'_> {
    fn drop(&mut self) {
        let mut m = self.limits.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = m.get_mut(&self.clinic) {
            c.running = c.running.saturating_sub(1);
        }
    }
}

impl RpcLimits {
    pub fn admit(
        &self,
        clinic: &str,
        (per_second, concurrent): (f64, usize),
    ) -> Result<RpcSlot<'_>, RpcLimited> {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let c = m.entry(clinic.to_string()).or_insert_with(|| ClinicRpc {
            bucket: TokenBucket::new(per_second, per_second * 2.0),
            running: 0,
        });
        if c.running >= concurrent {
            return Err(RpcLimited::Concurrency);
        }
        if !c.bucket.take() {
            return Err(RpcLimited::Rate);
        }
        c.running += 1;
        Ok(RpcSlot {
            limits: self,
            clinic: clinic.to_string(),
        })
    }
}

struct End {
    code: u16,
    reason: String,
    by_agent: bool,
}

fn deny(status: actix_web::http::StatusCode) -> HttpResponse {
    // The reason goes to the audit log only.
    crate::gateway::problem::problem(status, None, "connection refused")
}

/// A refused token: 401 with the coarse reason the client can act on (RFC 6750
/// `WWW-Authenticate`, and `reason` in the problem body) and this gateway's clock
/// (`Tether-Time`, unix ms) so the agent can measure its offset. The detail is in the audit log.
fn refuse_token(e: &AuthError) -> HttpResponse {
    use actix_web::http::header::{HeaderName, HeaderValue, WWW_AUTHENTICATE};
    let reason = e.reason();
    let mut resp = crate::gateway::problem::problem_with(
        actix_web::http::StatusCode::UNAUTHORIZED,
        None,
        format!("connection refused: {reason}"),
        serde_json::json!({ "reason": reason }),
    );
    let challenge = if matches!(e, AuthError::Missing) {
        "Bearer realm=\"tether\", error_description=\"missing_token\"".to_string()
    } else {
        format!("Bearer realm=\"tether\", error=\"invalid_token\", error_description=\"{reason}\"")
    };
    if let Ok(v) = HeaderValue::from_str(&challenge) {
        resp.headers_mut().insert(WWW_AUTHENTICATE, v);
    }
    resp.headers_mut().insert(
        HeaderName::from_static("tether-time"),
        HeaderValue::from(crate::security::unix_now_ms()),
    );
    resp
}

/// Clients must present a certificate (and it must name the clinic).
fn mutual_tls(state: &GatewayState) -> bool {
    state
        .security
        .tls
        .as_ref()
        .is_some_and(|t| t.client_ca.is_some())
}

/// Checks the bearer token (and the client certificate under mutual TLS) before the upgrade.
fn authenticate(req: &HttpRequest, state: &GatewayState) -> Result<Option<Verified>, AuthError> {
    let Some(verifier) = &state.security.verifier else {
        return Ok(None);
    };
    let token = req
        .headers()
        .get(actix_web::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(crate::security::bearer_token)
        .ok_or(AuthError::Missing)?;
    let v = verifier.verify(token)?;
    if mutual_tls(state) {
        let ids = req
            .conn_data::<PeerIdentity>()
            .ok_or(AuthError::NoClientCert)?;
        if !ids.0.contains(&v.clinic) {
            return Err(AuthError::CertMismatch {
                cert: ids.0.clone(),
                sub: v.clinic.clone(),
            });
        }
    }
    Ok(Some(v))
}

/// A refused token whose key belongs to a clinic (revoked, expired, wrong audience, …: see
/// [`AuthError::attributable`]): the clinic's tile says so until a session opens.
fn refused_on_tile(req: &HttpRequest, state: &GatewayState, e: &AuthError) {
    if !e.attributable() {
        return;
    }
    let clinic = state.security.verifier.as_ref().and_then(|v| {
        req.headers()
            .get(actix_web::http::header::AUTHORIZATION)
            .and_then(|h| h.to_str().ok())
            .and_then(crate::security::bearer_token)
            .and_then(|t| v.clinic_of_key(t))
    });
    if let Some(clinic_id) = clinic {
        state.registry.do_send(registry::Refused {
            clinic_id,
            reason: e.reason().into(),
        });
    }
}

/// Admission, origin and identity checks shared by both transports: the verified clinic (or
/// `None` without tokens configured), or the refusal to send.
/// 503 with `Retry-After: 1`: come back in a second.
fn busy() -> HttpResponse {
    let mut resp = deny(actix_web::http::StatusCode::SERVICE_UNAVAILABLE);
    resp.headers_mut().insert(
        actix_web::http::header::RETRY_AFTER,
        actix_web::http::header::HeaderValue::from_static("1"),
    );
    resp
}

pub(crate) async fn admit(
    req: &HttpRequest,
    state: &GatewayState,
) -> Result<Option<Verified>, Box<HttpResponse>> {
    use actix_web::http::StatusCode;
    let peer = req
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|| "-".into());
    if !state.security.admission.take() {
        state.metrics.add(&state.metrics.handshakes_refused, 1);
        log::warn!(target: AUDIT, "event=handshake_refused peer={peer} reason=admission_limit");
        return Err(Box::new(busy()));
    }
    if let Some(origin) = req.headers().get(actix_web::http::header::ORIGIN) {
        let origin = origin.to_str().unwrap_or("");
        if !state.security.allowed_origins.iter().any(|o| o == origin) {
            state.metrics.add(&state.metrics.handshakes_refused, 1);
            log::warn!(target: AUDIT, "event=handshake_refused peer={peer} reason=origin_not_allowed origin={}", log_value(origin, 96));
            return Err(Box::new(deny(StatusCode::FORBIDDEN)));
        }
    }
    let auth = match authenticate(req, state) {
        Ok(a) => a,
        Err(e) => {
            state.metrics.add(&state.metrics.auth_failures, 1);
            log::warn!(target: AUDIT, "event=auth_failed peer={peer} reason={}", log_value(&e.to_string(), 160));
            refused_on_tile(req, state, &e);
            return Err(Box::new(refuse_token(&e)));
        }
    };
    if let Some(a) = &auth {
        // The node's own check above catches a replay here; the store's catches one at any
        // node sharing it, and across restarts. Without the store's answer, fail closed.
        match state.store.remember_token(&a.jti, a.exp).await {
            Ok(true) => {}
            Ok(false) => {
                state.metrics.add(&state.metrics.auth_failures, 1);
                log::warn!(target: AUDIT, "event=auth_failed peer={peer} clinic={} reason=\"replayed jti (seen by the store)\"", a.clinic);
                state.registry.do_send(registry::Refused {
                    clinic_id: a.clinic.clone(),
                    reason: AuthError::Replay.reason().into(),
                });
                return Err(Box::new(refuse_token(&AuthError::Replay)));
            }
            Err(e) => {
                log::error!(target: ERROR, "event=handshake_refused peer={peer} reason=store_unavailable error={e}");
                return Err(Box::new(busy()));
            }
        }
        log::info!(target: AUDIT, "event=auth_ok clinic={} kid={} peer={peer} token_exp={}", a.clinic, a.kid, a.exp);
    }
    Ok(auth)
}

impl Session {
    fn new(
        state: web::Data<GatewayState>,
        req: &HttpRequest,
        auth: Option<Verified>,
        transport: &'static str,
    ) -> Self {
        let (rate, burst) = state.security.message_rate;
        let call_rate = state.security.call_rate;
        Session {
            id: format!("s{:016x}", rand::random::<u64>()),
            clinic: None,
            state,
            remote: req.peer_addr().map(|a| a.to_string()),
            last_seen: Instant::now(),
            inflight_updates: HashSet::new(),
            last_update_row: 0,
            fetching: false,
            more_updates: false,
            closing: false,
            batches: 0,
            writes_inflight: 0,
            shutting_down: false,
            auth,
            rate: TokenBucket::new(rate, burst),
            source: 0,
            epoch: 0,
            transport,
            end: None,
            rpc_outstanding: HashSet::new(),
            guard: None,
            fragments: None,
            bridge: req
                .app_data::<web::Data<crate::gateway::bridge::BridgeClients>>()
                .cloned(),
            clock_offset_ms: None,
            call_rate: TokenBucket::new(call_rate, call_rate * 2.0),
            channels_ok: false,
            channel_crypto_ok: false,
            inflight_channel: HashSet::new(),
            last_channel_row: 0,
            channel_fetching: false,
            more_channel: false,
            up_rate: HashMap::new(),
        }
    }
}

/// `GET /v1/ws`: admission, origin and identity checks, then the upgrade to a session.
pub async fn upgrade(
    req: HttpRequest,
    stream: web::Payload,
    state: web::Data<GatewayState>,
) -> Result<HttpResponse, actix_web::Error> {
    let auth = match admit(&req, &state).await {
        Ok(a) => a,
        Err(refused) => return Ok(*refused),
    };
    let max = state.settings.max_frame_bytes;
    let mut session = Session::new(state, &req, auth, "websocket");
    let guard = GuardState::new();
    session.guard = Some(guard.clone());
    ws::WsResponseBuilder::new(session, &req, FrameGuard::new(stream, max, guard))
        .frame_size(max)
        .start()
}

impl Session {
    fn clinic_label(&self) -> &str {
        self.clinic.as_deref().unwrap_or("-")
    }

    fn send(&self, ctx: &mut ws::WebsocketContext<Self>, msg: Wire) {
        ctx.text(msg.encode());
    }

    fn send_error(
        &self,
        ctx: &mut ws::WebsocketContext<Self>,
        code: ErrorCode,
        message: String,
        field: Option<String>,
    ) {
        // Parser messages quote the input: cut and escaped, never the frame itself.
        log::warn!(target: ERROR, "session={} clinic={} event=rejected_frame code={code:?} field={} message={}", self.id, self.clinic_label(), log_value(field.as_deref().unwrap_or("-"), 64), log_value(&message, 96));
        self.send(
            ctx,
            Wire::Error(ErrorFrame {
                code,
                message,
                field,
            }),
        );
    }

    fn close(&mut self, ctx: &mut ws::WebsocketContext<Self>, code: ws::CloseCode, why: &str) {
        if self.closing {
            return;
        }
        self.closing = true;
        self.end = Some(End {
            code: u16::from(code),
            reason: why.to_string(),
            by_agent: false,
        });
        log::info!(target: CONNECTION, "session={} clinic={} event=closing code={} reason={why:?}", self.id, self.clinic_label(), u16::from(code));
        ctx.close(Some(ws::CloseReason {
            code,
            description: Some(why.to_string()),
        }));
        ctx.stop();
    }

    fn before_hello(&mut self, kind: &str, ctx: &mut ws::WebsocketContext<Self>) {
        self.send_error(
            ctx,
            ErrorCode::UnexpectedMessage,
            format!("`{kind}` before `hello`"),
            Some("type".into()),
        );
        self.close(ctx, ws::CloseCode::Policy, "hello expected");
    }

    fn on_text(&mut self, text: &str, ctx: &mut ws::WebsocketContext<Self>) {
        let decoded = tether_schemas::decode_inbound(text, self.state.settings.max_frame_bytes);
        // What the clinic sends of its own accord is charged to its frame rate; answers to the
        // cloud's own requests are paced by the gateway's RPC limits, and calls by the call
        // rate (`on_call`), so neither can get the clinic's link closed.
        let free = match &decoded {
            Ok(Inbound::Other(Wire::RpcResponse(r))) => {
                self.rpc_outstanding.contains(&r.request_id)
            }
            Ok(Inbound::Other(Wire::CallRequest(_))) => self.clinic.is_some(),
            _ => false,
        };
        if !free && !self.charge(ctx) {
            return;
        }
        let msg = match decoded {
            Ok(Inbound::Events(ev)) if self.clinic.is_some() => return self.on_events(ev, ctx),
            Ok(Inbound::Events(_)) => return self.before_hello("events", ctx),
            Ok(Inbound::Other(m)) => m,
            Err(e @ DecodeError::TooLarge { .. }) => {
                self.send_error(ctx, e.code(), e.to_string(), None);
                return self.close(ctx, ws::CloseCode::Size, "frame too large");
            }
            Err(e) => {
                let f = e.to_frame();
                return self.send_error(ctx, f.code, f.message, f.field);
            }
        };
        match (&self.clinic, msg) {
            (None, Wire::Hello(h)) => self.on_hello(h, ctx),
            (Some(_), Wire::Hello(_)) => self.send_error(
                ctx,
                ErrorCode::UnexpectedMessage,
                "hello was already received on this session".into(),
                Some("type".into()),
            ),
            (None, other) => self.before_hello(other.kind(), ctx),
            (Some(_), Wire::UpdateResult(r)) => self.on_update_result(r, ctx),
            (Some(_), Wire::ChannelAck(a)) => self.on_channel_ack(a, ctx),
            (Some(_), Wire::Channel(m)) => self.on_channel_up(m, ctx),
            (Some(_), Wire::CallRequest(c)) => self.on_call(c, ctx),
            (Some(_), Wire::RpcResponse(r)) => {
                if self.rpc_outstanding.remove(&r.request_id) {
                    log::info!(target: MESSAGE, "session={} clinic={} event=rpc_answered request_id={} status={:?} rows={}", self.id, self.clinic_label(), r.request_id, r.status, r.rows.as_ref().map(Vec::len).unwrap_or(0));
                    if !self.state.rpc.answer(r) {
                        log::warn!(target: MESSAGE, "session={} clinic={} event=rpc_answer_late reason=\"the caller stopped waiting\"", self.id, self.clinic_label());
                    }
                } else {
                    self.send_error(
                        ctx,
                        ErrorCode::UnexpectedMessage,
                        format!("no rpc_request `{}` is open on this session", r.request_id),
                        Some("request_id".into()),
                    );
                }
            }
            (Some(_), Wire::Error(e)) => {
                // The agent's free text is its own: a prefix and the length, never all of it.
                log::warn!(target: ERROR, "session={} clinic={} event=agent_error code={:?} message={} message_len={}", self.id, self.clinic_label(), e.code, log_value(&e.message, 48), e.message.len());
            }
            (Some(_), other) => self.send_error(
                ctx,
                ErrorCode::UnexpectedMessage,
                format!("`{}` is not sent by agents", other.kind()),
                Some("type".into()),
            ),
        }
    }

    fn on_hello(&mut self, h: tether_schemas::Hello, ctx: &mut ws::WebsocketContext<Self>) {
        if let Some(a) = &self.auth {
            if a.clinic != h.clinic_id {
                log::warn!(target: AUDIT, "event=clinic_mismatch session={} token_clinic={} hello_clinic={} result=closed", self.id, a.clinic, log_value(&h.clinic_id, 64));
                self.send_error(
                    ctx,
                    ErrorCode::ClinicMismatch,
                    "hello.clinic_id differs from the authenticated clinic".into(),
                    Some("clinic_id".into()),
                );
                return self.close(ctx, ws::CloseCode::Policy, "clinic mismatch");
            }
        }
        if !valid_id(&h.clinic_id) {
            self.send_error(
                ctx,
                ErrorCode::BadFrame,
                "clinic_id must be 1-64 characters of letters, digits, -, _ or .".into(),
                Some("clinic_id".into()),
            );
            return self.close(ctx, ws::CloseCode::Policy, "bad clinic_id");
        }
        let clinic = h.clinic_id.clone();
        self.clinic = Some(clinic.clone());
        self.source = h.source_id;
        let feature = |name: &str| h.features.iter().any(|f| f == name);
        self.channels_ok = feature(tether_schemas::FEATURE_CHANNELS);
        self.channel_crypto_ok = feature(tether_schemas::FEATURE_CHANNEL_ENCRYPTION);
        self.clock_offset_ms = h
            .clock_ms
            .map(|agent| crate::security::unix_now_ms() as i64 - agent as i64);
        let store = self.state.store.clone();
        let c = clinic.clone();
        let source = h.source_id;
        let fut = async move { store.hello(&c, source).await };
        ctx.wait(fut.into_actor(self).map(move |res, act, ctx| {
            let acked = match res {
                Ok(claim) => {
                    act.epoch = claim.epoch;
                    claim.acked
                }
                Err(crate::gateway::store::StoreError::SourceConflict { known, offered, .. }) => {
                    // Another database presents this clinic's identity (a copy, a second
                    // install, a re-install nobody confirmed): nothing of it is stored.
                    log::error!(target: AUDIT, "session={} clinic={clinic} event=duplicate_source known_source={known} offered_source={offered} action=refused remedy=\"POST /v1/clinics/{clinic}/source-reset if this database replaces the old one\"", act.id);
                    act.state.metrics.add(&act.state.metrics.duplicate_sources, 1);
                    act.state.registry.do_send(registry::Refused {
                        clinic_id: clinic.clone(),
                        reason: "duplicate_source".into(),
                    });
                    act.send_error(
                        ctx,
                        ErrorCode::DuplicateSource,
                        "another database already syncs as this clinic; an operator must confirm a re-install".into(),
                        Some("source_id".into()),
                    );
                    return act.close(ctx, ws::CloseCode::Other(4009), "duplicate source");
                }
                Err(e) => {
                    log::error!(target: ERROR, "session={} clinic={clinic} event=store_error error={e}", act.id);
                    act.send_error(ctx, ErrorCode::StoreUnavailable, "store unavailable".into(), None);
                    return act.close(ctx, ws::CloseCode::Error, "store unavailable");
                }
            };
            act.state.metrics.add(&act.state.metrics.sessions_opened, 1);
            act.state.registry.do_send(registry::Register {
                clinic_id: clinic.clone(),
                session_id: act.id.clone(),
                remote_addr: act.remote.clone(),
                acked_seq: acked,
                session: ctx.address().recipient(),
                transport: act.transport,
                restarts: h.restarts,
                // Shown on the dashboard: kept short whatever the agent sent.
                agent_version: h.agent_version.chars().take(40).collect(),
            });
            // A registry reload between this session's handshake and its registration above
            // could not reach it; one after the registration does. Look once more.
            let withdrawn = match (&act.state.security.verifier, &act.auth) {
                (Some(v), Some(a)) => (!v.registry().is_active(&a.kid)).then(|| a.kid.clone()),
                _ => None,
            };
            if let Some(kid) = withdrawn {
                log::warn!(target: AUDIT, "session={} clinic={clinic} event=session_revoked kid={kid} action=closed", act.id);
                act.state.metrics.add(&act.state.metrics.sessions_revoked, 1);
                return act.close(ctx, ws::CloseCode::Policy, "credentials revoked");
            }
            log::info!(target: CONNECTION, "session={} clinic={clinic} event=session_open transport={} remote={} agent_version={} agent_acked_seq={} gateway_acked_seq={acked} node={} epoch={}", act.id, act.transport, act.remote.as_deref().unwrap_or("-"), log_value(&h.agent_version, 32), h.last_acked_seq, act.state.store.node(), act.epoch);
            log::info!(target: AUDIT, "event=session_open session={} clinic={clinic} authenticated={}", act.id, act.auth.is_some());
            let welcome = Wire::Welcome(Welcome {
                session_id: act.id.clone(),
                acked_seq: acked,
                heartbeat_interval_ms: act.state.settings.heartbeat_interval.as_millis() as u64,
                max_frame_bytes: act.state.settings.max_frame_bytes as u64,
                channels: if act.channels_ok {
                    act.state.channels.wire(act.channel_crypto_ok)
                } else {
                    Vec::new()
                },
            });
            if act.channels_ok && !act.channel_crypto_ok {
                let withheld: Vec<String> = act
                    .state
                    .channels
                    .wire(true)
                    .into_iter()
                    .filter(|d| !d.encrypt.is_empty())
                    .map(|d| d.name)
                    .collect();
                if !withheld.is_empty() {
                    log::warn!(target: MESSAGE, "session={} clinic={} event=channels_withheld channels={} reason=\"the agent does not encrypt channel fields (hello.features lacks channel_encryption): upgrade it; their messages wait at the gateway\"", act.id, act.clinic_label(), withheld.join(","));
                }
            }
            act.send(ctx, welcome);
            act.deliver_updates(ctx);
            act.deliver_channels(ctx);
        }));
    }

    fn on_events(&mut self, batch: RawEvents, ctx: &mut ws::WebsocketContext<Self>) {
        if self.shutting_down {
            // Not stored, not acknowledged: the agent resends it to the next gateway.
            return;
        }
        let clinic = self.clinic.clone().unwrap_or_default();
        let mut batch = batch;
        // With the data keys, a value that fails to decrypt is parked with the reason
        // (ciphertext kept, never plaintext, never dropped); decrypt_raw leaves it untouched.
        let mut problems: Vec<Option<String>> = vec![None; batch.events.len()];
        if let Some(cipher) = &self.state.security.decrypt {
            for (e, p) in batch.events.iter_mut().zip(problems.iter_mut()) {
                if let Err(err) = cipher.decrypt_raw(&clinic, e) {
                    *p = Some(format!("decryption failed: {err}"));
                }
            }
        }
        // Sequences must rise strictly from prev_seq.
        let mut last = batch.prev_seq;
        for (i, e) in batch.events.iter().enumerate() {
            if e.seq <= last {
                return self.send_error(
                    ctx,
                    ErrorCode::BadFrame,
                    format!("seq {} does not follow {last}", e.seq),
                    Some(format!("events[{i}].seq")),
                );
            }
            if !valid_id(&e.entity) {
                return self.send_error(
                    ctx,
                    ErrorCode::BadFrame,
                    "entity must be 1-64 characters of letters, digits, -, _ or .".into(),
                    Some(format!("events[{i}].entity")),
                );
            }
            last = e.seq;
        }
        let Some(first) = batch.events.first().map(|e| e.seq) else {
            return;
        };
        let count = batch.events.len();
        let prev_seq = batch.prev_seq;
        let head_seq = batch.head_seq;
        let restarts = batch.restarts;
        // The clinic's oldest unacknowledged change once this batch is stored, on this
        // gateway's clock (the clinic clock's offset measured at hello).
        let offset = self.clock_offset_ms.unwrap_or(0);
        let next_committed = batch
            .next_committed_at
            .as_deref()
            .and_then(tether_schemas::rfc3339_ms)
            .map(|t| (t as i64).saturating_add(offset).max(0) as u64);
        let schemas = &self.state.schemas;
        let incoming: Vec<IncomingEvent> = batch
            .events
            .into_iter()
            .zip(problems)
            .map(|(event, problem)| {
                // Rows are parsed for the check only when their entity has a schema.
                let problem = problem.or_else(|| {
                    let row = event.row.as_deref()?;
                    schemas
                        .validate_text(&event.entity, row.get())
                        .err()
                        .map(|e| e.to_string())
                });
                IncomingEvent { event, problem }
            })
            .collect();
        let flagged = incoming.iter().filter(|e| e.problem.is_some()).count();
        self.batches += 1;
        let faults = self.state.settings.faults.active();
        if faults.ack_before_commit {
            // The deliberately broken build: acknowledge now, store later (or never).
            self.send(ctx, Wire::Ack(Ack { seq: last }));
            if first % 7 == 0 {
                return;
            }
            // The write is queued when `append` is called; its outcome is ignored on purpose.
            drop(self.state.store.append(&clinic, 0, 0, 0, incoming));
            return;
        }
        let fut = self
            .state
            .store
            .append(&clinic, self.source, self.epoch, prev_seq, incoming);
        self.writes_inflight += 1;
        let started = Instant::now();
        ctx.spawn(fut.into_actor(self).map(move |res, act, ctx| {
            act.writes_inflight -= 1;
            if let Ok(AppendOutcome::Stored { inserted, .. }) = &res {
                act.state
                    .metrics
                    .stored(*inserted as u64, started.elapsed());
                if *inserted > 0 {
                    act.state.webhooks.notify();
                }
            }
            act.stored(
                res,
                &clinic,
                (first, last, count, flagged, prev_seq),
                (head_seq, next_committed, restarts),
                ctx,
            );
            if act.shutting_down && act.writes_inflight == 0 {
                act.close(ctx, ws::CloseCode::Away, "gateway shutting down");
            }
        }));
    }

    fn stored(
        &mut self,
        res: Result<AppendOutcome, crate::gateway::store::StoreError>,
        clinic: &str,
        (first, last, count, flagged, prev_seq): (u64, u64, usize, usize, u64),
        (head_seq, next_committed_ms, restarts): (Option<u64>, Option<u64>, Option<u64>),
        ctx: &mut ws::WebsocketContext<Self>,
    ) {
        let act = self;
        match res {
            Ok(AppendOutcome::Stored { acked, inserted }) => {
                log::info!(target: MESSAGE, "session={} clinic={clinic} event=batch_stored first_seq={first} last_seq={last} count={count} inserted={inserted} flagged={flagged} acked_seq={acked}", act.id);
                if !act.closing {
                    act.send(ctx, Wire::Ack(Ack { seq: acked }));
                }
                act.state.registry.do_send(registry::Acked {
                    clinic_id: clinic.to_string(),
                    seq: acked,
                    head_seq,
                    next_committed_ms,
                    restarts,
                });
            }
            Ok(AppendOutcome::Fenced { epoch }) => {
                // A newer session holds the clinic (this node was paused, partitioned or slow,
                // and the agent has moved on): nothing of this batch was stored.
                log::warn!(target: CONNECTION, "session={} clinic={clinic} event=fenced first_seq={first} last_seq={last} held_epoch={} current_epoch={epoch} action=closed_nothing_stored", act.id, act.epoch);
                act.state.metrics.add(&act.state.metrics.sessions_fenced, 1);
                act.close(
                    ctx,
                    ws::CloseCode::Other(4001),
                    "fenced: the clinic was claimed by a newer session",
                );
            }
            Ok(AppendOutcome::Gap { acked }) => {
                act.send_error(
                    ctx,
                    ErrorCode::Gap,
                    format!("prev_seq {prev_seq} is beyond the stored position {acked}; resend from {acked}"),
                    Some("prev_seq".into()),
                );
                act.close(ctx, ws::CloseCode::Policy, "gap");
            }
            Err(e) => {
                log::error!(target: ERROR, "session={} clinic={clinic} event=store_write_failed first_seq={first} last_seq={last} error={e}", act.id);
                act.send_error(
                    ctx,
                    ErrorCode::StoreUnavailable,
                    "store write failed; nothing from this batch was acknowledged".into(),
                    None,
                );
                // A full writer queue or a lost database connection: the agent backs off and
                // resends (1013 Try Again Later); anything else is a server error (1011).
                let code = match e {
                    crate::gateway::store::StoreError::Unavailable {
                        retryable: true, ..
                    } => ws::CloseCode::Again,
                    _ => ws::CloseCode::Error,
                };
                act.close(ctx, code, "store write failed");
            }
        }
    }

    /// `call_request`: the clinic calls a configured endpoint of the main Web API. The gateway
    /// adds who is calling (`Tether-Clinic`, the authenticated clinic) and its own credentials;
    /// bodies are never logged. See [`crate::gateway::bridge`].
    fn on_call(&mut self, c: tether_schemas::CallRequest, ctx: &mut ws::WebsocketContext<Self>) {
        use crate::gateway::bridge;
        let clinic = self.clinic.clone().unwrap_or_default();
        let ep = self
            .state
            .settings
            .bridge
            .endpoints
            .get(&c.endpoint)
            .cloned();
        // What is left of the call's deadline, on this clock.
        let left = match (c.deadline, self.clock_offset_ms) {
            (Some(d), Some(off)) => Some(d as i64 + off - crate::security::unix_now_ms() as i64),
            _ => None,
        };
        let (id, endpoint) = (log_value(&c.request_id, 64), log_value(&c.endpoint, 64));
        let client = self.bridge.as_ref().and_then(|b| b.get(&c.endpoint));
        let refused = bridge::refuse(&c, ep.as_ref(), left).or_else(|| {
            (!self.call_rate.take()).then(|| tether_schemas::CallResponse {
                request_id: c.request_id.clone(),
                status: 429,
                body: None,
                body_text: None,
                content_type: None,
                error: Some(format!(
                    "more than {} calls per second from this clinic (gateway.limits.calls_per_second); retry in a second",
                    self.state.security.call_rate
                )),
            })
        });
        let (ep, client) = match (refused, ep, client) {
            (Some(answer), _, _) => {
                log::warn!(target: MESSAGE, "session={} clinic={clinic} event=call_refused request_id={id} endpoint={endpoint} status={} deadline_left_ms={}", self.id, answer.status, left.map(|l| l.to_string()).unwrap_or_else(|| "-".into()));
                return self.send(ctx, Wire::CallResponse(answer));
            }
            (None, Some(ep), Some(client)) => (ep, client),
            (None, Some(ep), None) => (
                ep.clone(),
                awc::Client::builder().timeout(ep.timeout).finish(),
            ),
            (None, None, _) => return,
        };
        let timeout = match left {
            Some(ms) => ep.timeout.min(std::time::Duration::from_millis(ms as u64)),
            None => ep.timeout,
        };
        let auth = self.state.settings.bridge.authorization.clone();
        let max = self.state.settings.max_frame_bytes;
        let started = Instant::now();
        let fut = bridge::forward(client, ep, auth, clinic, c, timeout, max);
        ctx.spawn(fut.into_actor(self).map(move |answer, act, ctx| {
            let answer = bridge::fit(answer, max);
            log::info!(target: MESSAGE, "session={} clinic={} event=call_answered request_id={id} endpoint={endpoint} status={} ms={}", act.id, act.clinic_label(), answer.status, started.elapsed().as_millis());
            if !act.closing {
                act.send(ctx, Wire::CallResponse(answer));
            }
        }));
    }

    fn on_update_result(&mut self, r: UpdateResult, ctx: &mut ws::WebsocketContext<Self>) {
        let clinic = self.clinic.clone().unwrap_or_default();
        let store = self.state.store.clone();
        self.inflight_updates.remove(&r.update_id);
        let fut = async move {
            let res = store
                .update_result(&clinic, &r.update_id, r.status, r.reason.clone())
                .await;
            (clinic, r, res)
        };
        ctx.spawn(fut.into_actor(self).map(|(clinic, r, res), act, ctx| {
            match res {
                Ok(true) => {
                    log::info!(target: MESSAGE, "session={} clinic={clinic} event=update_result update_id={} status={}", act.id, r.update_id, r.status.as_str());
                }
                Ok(false) => {
                    log::warn!(target: MESSAGE, "session={} clinic={clinic} event=update_result_ignored update_id={} reason=\"not open for this clinic\"", act.id, r.update_id);
                }
                Err(e) => {
                    log::error!(target: ERROR, "session={} clinic={clinic} event=store_write_failed update_id={} error={e}", act.id, r.update_id);
                }
            }
            act.deliver_updates(ctx);
        }));
    }

    /// Sends the clinic's open updates, oldest first, within the window.
    fn deliver_updates(&mut self, ctx: &mut ws::WebsocketContext<Self>) {
        let Some(clinic) = self.clinic.clone() else {
            return;
        };
        if self.closing {
            return;
        }
        if self.fetching {
            self.more_updates = true;
            return;
        }
        let window = self.state.settings.update_window;
        let room = window.saturating_sub(self.inflight_updates.len());
        if room == 0 {
            return;
        }
        self.fetching = true;
        self.more_updates = false;
        let store = self.state.store.clone();
        let after = self.last_update_row;
        // Read the open updates, mark them handed to this session, and send only those the
        // mark found still open: an update cancelled meanwhile is never sent, and a cancel
        // after the mark is refused (409).
        let fut = async move {
            let rows = store.open_updates(&clinic, after, room).await?;
            let ids: Vec<String> = rows.iter().map(|(_, u)| u.update_id.clone()).collect();
            let open: HashSet<String> = if ids.is_empty() {
                HashSet::new()
            } else {
                store.mark_delivered(ids).await?.into_iter().collect()
            };
            Ok::<_, crate::gateway::store::StoreError>((rows, open))
        };
        ctx.spawn(fut.into_actor(self).map(move |res, act, ctx| {
            act.fetching = false;
            let (rows, open) = match res {
                Ok(r) => r,
                Err(e) => {
                    // Nothing was sent; the next nudge (a new update, or the periodic sweep)
                    // tries again.
                    log::error!(target: ERROR, "session={} clinic={} event=update_delivery_failed error={e}", act.id, act.clinic_label());
                    return;
                }
            };
            let full = rows.len() == room;
            for (row, update) in rows {
                act.last_update_row = act.last_update_row.max(row);
                if !open.contains(&update.update_id) {
                    log::info!(target: MESSAGE, "session={} clinic={} event=update_skipped update_id={} reason=cancelled", act.id, act.clinic_label(), update.update_id);
                    continue;
                }
                if act.closing {
                    // Marked delivered but not sent: open updates include delivered ones, so
                    // the clinic's next session sends it.
                    continue;
                }
                act.inflight_updates.insert(update.update_id.clone());
                log::info!(target: MESSAGE, "session={} clinic={} event=update_sent update_id={} entity={}", act.id, act.clinic_label(), update.update_id, update.entity);
                act.send(ctx, Wire::Update(update));
            }
            if full || act.more_updates {
                act.deliver_updates(ctx);
            }
        }));
    }
}

impl Session {
    /// Sends the clinic's open down channel messages, oldest first, within the window (to
    /// agents that take them).
    fn deliver_channels(&mut self, ctx: &mut ws::WebsocketContext<Self>) {
        let Some(clinic) = self.clinic.clone() else {
            return;
        };
        if self.closing || !self.channels_ok || self.state.channels.is_empty() {
            return;
        }
        if self.channel_fetching {
            self.more_channel = true;
            return;
        }
        let room = channels::CHANNEL_WINDOW.saturating_sub(self.inflight_channel.len());
        if room == 0 {
            return;
        }
        self.channel_fetching = true;
        self.more_channel = false;
        let store = self.state.store.clone();
        let after = self.last_channel_row;
        let state = self.state.clone();
        let crypto_ok = self.channel_crypto_ok;
        let fut = async move {
            let now = crate::security::unix_now_ms();
            let rows = store.open_channel(&clinic, after, now, room).await?;
            // Messages of channels this agent was not told of are neither marked sent nor
            // sent: they wait for an agent that takes them.
            let ids: Vec<String> = rows
                .iter()
                .filter(|r| state.channels.carried(&r.channel, crypto_ok))
                .map(|r| r.message_id.clone())
                .collect();
            let open: HashSet<String> = if ids.is_empty() {
                HashSet::new()
            } else {
                store.mark_channel_sent(ids).await?.into_iter().collect()
            };
            Ok::<_, crate::gateway::store::StoreError>((rows, open))
        };
        ctx.spawn(fut.into_actor(self).map(move |res, act, ctx| {
            act.channel_fetching = false;
            let (rows, open) = match res {
                Ok(r) => r,
                Err(e) => {
                    log::error!(target: ERROR, "session={} clinic={} event=channel_delivery_failed error={e}", act.id, act.clinic_label());
                    return;
                }
            };
            let full = rows.len() == room;
            let now = crate::security::unix_now_ms();
            for r in rows {
                act.last_channel_row = act.last_channel_row.max(r.row);
                if !open.contains(&r.message_id) || act.closing {
                    continue;
                }
                let ttl_ms = match r.expires_ms {
                    // Expired between the read and now: never sent late (the sweep counts it).
                    Some(e) if e <= now => continue,
                    Some(e) => Some(e - now),
                    None => None,
                };
                let Some(payload) = r
                    .payload
                    .as_deref()
                    .and_then(|p| serde_json::from_str::<tether_schemas::Row>(p).ok())
                else {
                    log::error!(target: ERROR, "session={} clinic={} event=channel_message_unreadable message_id={}", act.id, act.clinic_label(), r.message_id);
                    continue;
                };
                act.state.channels.count_sent(&r.channel);
                act.inflight_channel.insert(r.message_id.clone());
                log::debug!(target: MESSAGE, "session={} clinic={} event=channel_sent channel={} message_id={}", act.id, act.clinic_label(), r.channel, r.message_id);
                act.send(
                    ctx,
                    Wire::Channel(tether_schemas::ChannelMessage {
                        message_id: r.message_id,
                        channel: r.channel,
                        payload,
                        ttl_ms,
                        published_at: r.created_at,
                    }),
                );
            }
            if full || act.more_channel {
                act.deliver_channels(ctx);
            }
        }));
    }

    /// The agent's answer to a down message: `delivered`, `expired`, or `refused` (a field
    /// it could not decrypt; final).
    fn on_channel_ack(
        &mut self,
        a: tether_schemas::ChannelAck,
        ctx: &mut ws::WebsocketContext<Self>,
    ) {
        use tether_schemas::ChannelAckStatus as S;
        if !matches!(a.status, S::Delivered | S::Expired | S::Refused) {
            return self.send_error(
                ctx,
                ErrorCode::BadFrame,
                format!(
                    "agents answer channel messages `delivered`, `expired` or `refused`, not `{}`",
                    a.status.as_str()
                ),
                Some("status".into()),
            );
        }
        // An answer may come on a later session than the one that sent the message (a resend,
        // or a subscriber that arrived after a reconnect): the store records it once and says
        // which channel and when it was published, so it is counted whichever session hears it.
        self.inflight_channel.remove(&a.message_id);
        let clinic = self.clinic.clone().unwrap_or_default();
        let store = self.state.store.clone();
        let fut = async move {
            let res = store
                .channel_result(&clinic, &a.message_id, a.status.as_str())
                .await;
            (a, res)
        };
        ctx.spawn(fut.into_actor(self).map(move |(a, res), act, ctx| {
            match res {
                Ok(Some((channel, created_ms))) => {
                    let since = crate::security::unix_now_ms().saturating_sub(created_ms);
                    act.state.channels.count_result(
                        &channel,
                        a.status,
                        Some(Duration::from_millis(since)),
                    );
                    if a.status == S::Refused {
                        log::warn!(target: MESSAGE, "session={} clinic={} event=channel_result channel={channel} message_id={} status=refused field={} reason={}", act.id, act.clinic_label(), a.message_id, log_value(a.field.as_deref().unwrap_or("-"), 80), log_value(a.reason.as_deref().unwrap_or("-"), 200));
                    } else {
                        log::info!(target: MESSAGE, "session={} clinic={} event=channel_result channel={channel} message_id={} status={}", act.id, act.clinic_label(), a.message_id, a.status.as_str());
                    }
                }
                // Not this clinic's, or answered already (a resend's second answer).
                Ok(None) => {
                    log::debug!(target: MESSAGE, "session={} clinic={} event=channel_result_ignored message_id={}", act.id, act.clinic_label(), log_value(&a.message_id, 80));
                }
                Err(e) => {
                    log::error!(target: ERROR, "session={} clinic={} event=store_write_failed message_id={} error={e}", act.id, act.clinic_label(), log_value(&a.message_id, 80));
                }
            }
            act.deliver_channels(ctx);
        }));
    }

    /// A clinic application's message on an up channel: checked like a REST post (channel,
    /// direction, size, schema, rate), kept, then `accepted`; or `refused` naming the field.
    fn on_channel_up(
        &mut self,
        mut m: tether_schemas::ChannelMessage,
        ctx: &mut ws::WebsocketContext<Self>,
    ) {
        let refuse = |act: &mut Self,
                      ctx: &mut ws::WebsocketContext<Self>,
                      reason: String,
                      field: Option<String>| {
            act.state.channels.count_refused(&m.channel);
            log::warn!(target: MESSAGE, "session={} clinic={} event=channel_refused channel={} message_id={} field={} reason={}", act.id, act.clinic_label(), log_value(&m.channel, 64), log_value(&m.message_id, 80), field.as_deref().unwrap_or("-"), log_value(&reason, 160));
            act.send(
                ctx,
                Wire::ChannelAck(tether_schemas::ChannelAck {
                    message_id: m.message_id.clone(),
                    status: tether_schemas::ChannelAckStatus::Refused,
                    reason: Some(reason),
                    field,
                }),
            );
        };
        let id_ok = (1..=80).contains(&m.message_id.len())
            && m.message_id.bytes().all(|b| b.is_ascii_graphic());
        if !id_ok {
            return refuse(
                self,
                ctx,
                "message_id must be 1-80 visible ASCII characters".into(),
                Some("message_id".into()),
            );
        }
        let clinic = self.clinic.clone().unwrap_or_default();
        let mut payload = std::mem::take(&mut m.payload);
        let spec =
            match self
                .state
                .channels
                .check_up(&m.channel, &clinic, &m.message_id, &mut payload)
            {
                Ok(s) => s.clone(),
                Err(r) => return refuse(self, ctx, r.message, r.field),
            };
        let rate = spec.def.rate_per_second;
        let bucket = self
            .up_rate
            .entry(spec.def.name.clone())
            .or_insert_with(|| TokenBucket::new(rate, (rate * 2.0).max(1.0)));
        if !bucket.take() {
            return refuse(
                self,
                ctx,
                format!(
                    "more than {rate} messages per second on channel `{}`",
                    spec.def.name
                ),
                Some("channel".into()),
            );
        }
        let durable = spec.def.delivery == tether_schemas::ChannelDelivery::Durable;
        let msg = crate::gateway::store::NewChannelMessage {
            message_id: m.message_id.clone(),
            clinic_id: self.clinic.clone().unwrap_or_default(),
            channel: m.channel.clone(),
            up: true,
            durable,
            payload: serde_json::Value::Object(payload).to_string(),
            expires_ms: spec
                .def
                .ttl_ms
                .filter(|_| !durable)
                .map(|t| crate::security::unix_now_ms() + t),
            batch_id: None,
        };
        let (id, channel) = (m.message_id, m.channel);
        let store = self.state.store.clone();
        self.writes_inflight += 1;
        ctx.spawn(
            async move { store.enqueue_channel(vec![msg]).await }
                .into_actor(self)
                .map(move |res, act, ctx| {
                    act.writes_inflight -= 1;
                    match res {
                        Ok(new) => {
                            let fresh = new.first().copied().unwrap_or(false);
                            if fresh {
                                act.state.channels.count_received(&channel);
                                channels::up_stored(&act.state);
                            }
                            log::info!(target: MESSAGE, "session={} clinic={} event=channel_received channel={channel} message_id={id} duplicate={}", act.id, act.clinic_label(), !fresh);
                            act.send(
                                ctx,
                                Wire::ChannelAck(tether_schemas::ChannelAck {
                                    message_id: id,
                                    status: tether_schemas::ChannelAckStatus::Accepted,
                                    reason: None,
                                    field: None,
                                }),
                            );
                        }
                        Err(e) => {
                            // Not acknowledged: the publisher hears nothing and tries again.
                            log::error!(target: ERROR, "session={} clinic={} event=store_write_failed channel={channel} message_id={id} error={e}", act.id, act.clinic_label());
                        }
                    }
                    if act.shutting_down && act.writes_inflight == 0 {
                        act.close(ctx, ws::CloseCode::Away, "gateway shutting down");
                    }
                }),
        );
    }
}

impl Actor for Session {
    type Context = ws::WebsocketContext<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        let hb = self.state.settings.heartbeat_interval;
        if let Some(a) = &self.auth {
            // The session lives no longer than its token.
            let left = a.close_at.saturating_sub(crate::security::unix_now());
            ctx.run_later(std::time::Duration::from_secs(left), |act, ctx| {
                log::info!(target: AUDIT, "event=token_expired session={} clinic={} result=closed", act.id, act.clinic_label());
                act.send_error(ctx, ErrorCode::Unauthorized, "token expired; reconnect with a fresh one".into(), None);
                act.close(ctx, ws::CloseCode::Policy, "token expired");
            });
        }
        log::debug!(target: CONNECTION, "session={} event=upgraded remote={}", self.id, self.remote.as_deref().unwrap_or("-"));
        ctx.run_interval(hb, move |act, ctx| {
            // Ticks missed while the process was paused fire together: one close is enough.
            if act.closing {
                return;
            }
            // Bytes still arriving (a large frame on a slow link) count as life; a message
            // that takes longer than six heartbeats to arrive does not.
            let mut silent = act.last_seen.elapsed();
            if let Some(g) = &act.guard {
                silent = silent.min(g.last_bytes().elapsed());
                if let Some(since) = g.message_since() {
                    if since.elapsed() > hb * MESSAGE_DEADLINE_HEARTBEATS {
                        log::warn!(target: CONNECTION, "session={} clinic={} event=message_too_slow waited_ms={}", act.id, act.clinic_label(), since.elapsed().as_millis());
                        act.close(ctx, ws::CloseCode::Policy, "message not completed in time");
                        return;
                    }
                }
            }
            if silent > hb * 3 {
                log::warn!(target: CONNECTION, "session={} clinic={} event=evicted reason=heartbeat_timeout silent_ms={}", act.id, act.clinic_label(), silent.as_millis());
                act.close(ctx, ws::CloseCode::Away, "heartbeat timeout");
                return;
            }
            ctx.ping(b"");
        });
        // A session that never says hello is dropped.
        ctx.run_later(hb * 3, |act, ctx| {
            if act.clinic.is_none() {
                act.close(ctx, ws::CloseCode::Policy, "no hello");
            }
        });
    }

    fn stopped(&mut self, _: &mut Self::Context) {
        for id in self.rpc_outstanding.drain() {
            self.state
                .rpc
                .fail(&id, "the clinic disconnected before answering");
        }
        if let Some(clinic) = &self.clinic {
            let (reason, goodbye, evicted) = match &self.end {
                Some(e) => (
                    format!("{} {}", e.code, e.reason),
                    e.by_agent && e.code == 1001,
                    !e.by_agent && e.reason == "heartbeat timeout",
                ),
                None => ("connection lost".to_string(), false, false),
            };
            if evicted {
                self.state.metrics.add(&self.state.metrics.evictions, 1);
            }
            if self.epoch != 0 {
                // The clinic is held by no node now (unless a newer session claimed it).
                let released = self.state.store.release(clinic, self.epoch);
                let (sid, c) = (self.id.clone(), clinic.clone());
                actix::spawn(async move {
                    if let Err(e) = released.await {
                        log::warn!(target: ERROR, "session={sid} clinic={c} event=release_failed error={e}");
                    }
                });
            }
            self.state.registry.do_send(registry::Unregister {
                clinic_id: clinic.clone(),
                session_id: self.id.clone(),
                reason,
                goodbye,
                evicted,
            });
            log::info!(target: CONNECTION, "session={} clinic={clinic} event=session_closed batches={}", self.id, self.batches);
            log::info!(target: AUDIT, "event=session_closed session={} clinic={clinic}", self.id);
        }
    }
}

impl StreamHandler<Result<ws::Message, ws::ProtocolError>> for Session {
    fn handle(&mut self, item: Result<ws::Message, ws::ProtocolError>, ctx: &mut Self::Context) {
        self.last_seen = Instant::now();
        // Text is charged to the session's frame rate once decoded (see `on_text`).
        if matches!(item, Ok(ws::Message::Binary(_))) && !self.charge(ctx) {
            return;
        }
        if self.fragments.is_some()
            && matches!(item, Ok(ws::Message::Text(_)) | Ok(ws::Message::Binary(_)))
        {
            log::warn!(target: CONNECTION, "session={} clinic={} event=protocol_error error=\"new message inside a fragmented one\"", self.id, self.clinic_label());
            return self.close(
                ctx,
                ws::CloseCode::Protocol,
                "new message inside a fragmented one",
            );
        }
        match item {
            Ok(ws::Message::Text(text)) => self.on_text(&text, ctx),
            Ok(ws::Message::Ping(b)) => {
                ctx.pong(&b);
                if let Some(c) = &self.clinic {
                    self.state.registry.do_send(registry::Touch {
                        clinic_id: c.clone(),
                    });
                }
            }
            Ok(ws::Message::Pong(_)) => {
                if let Some(c) = &self.clinic {
                    self.state.registry.do_send(registry::Touch {
                        clinic_id: c.clone(),
                    });
                }
            }
            Ok(ws::Message::Binary(_)) => self.send_error(
                ctx,
                ErrorCode::BadFrame,
                "binary frames are not part of the protocol; send JSON text".into(),
                None,
            ),
            Ok(ws::Message::Close(reason)) => {
                let code = reason.as_ref().map(|r| u16::from(r.code)).unwrap_or(1005);
                log::info!(target: CONNECTION, "session={} clinic={} event=closed_by_agent code={code}", self.id, self.clinic_label());
                self.end = Some(End {
                    code,
                    reason: reason
                        .and_then(|r| r.description)
                        .unwrap_or_else(|| "closed by agent".into()),
                    by_agent: true,
                });
                self.closing = true;
                ctx.close(None);
                ctx.stop();
            }
            Ok(ws::Message::Continuation(item)) => self.on_fragment(item, ctx),
            Ok(ws::Message::Nop) => {}
            Err(_) if self.guard.as_ref().and_then(|g| g.violation()).is_some() => {
                let why = self
                    .guard
                    .as_ref()
                    .and_then(|g| g.violation())
                    .map(|v| v.describe(self.state.settings.max_frame_bytes))
                    .unwrap_or_default();
                log::warn!(target: CONNECTION, "session={} clinic={} event=frame_too_large detail={why:?}", self.id, self.clinic_label());
                self.send_error(ctx, ErrorCode::FrameTooLarge, why, None);
                self.close(ctx, ws::CloseCode::Size, "frame too large");
            }
            Err(ws::ProtocolError::Io(e)) if e.to_string().contains("utf-8") => {
                self.bad_utf8(ctx);
            }
            // The TCP connection ended without a close frame (a PC switched off, a link cut,
            // a process killed): the link was lost, not a protocol error of the agent's.
            Err(ws::ProtocolError::Io(e))
                if e.kind() == std::io::ErrorKind::UnexpectedEof
                    || e.to_string().contains("EOF") =>
            {
                log::warn!(target: CONNECTION, "session={} clinic={} event=connection_lost detail=\"no close frame\"", self.id, self.clinic_label());
                self.closing = true;
                ctx.stop();
            }
            Err(ws::ProtocolError::Overflow) => {
                self.send_error(
                    ctx,
                    ErrorCode::FrameTooLarge,
                    format!(
                        "frame exceeds {} bytes",
                        self.state.settings.max_frame_bytes
                    ),
                    None,
                );
                self.close(ctx, ws::CloseCode::Size, "frame too large");
            }
            Err(e) => {
                log::warn!(target: CONNECTION, "session={} clinic={} event=protocol_error error={}", self.id, self.clinic_label(), log_value(&e.to_string(), 96));
                self.close(ctx, ws::CloseCode::Protocol, "protocol error");
            }
        }
    }

    fn finished(&mut self, ctx: &mut Self::Context) {
        if !self.closing {
            log::warn!(target: CONNECTION, "session={} clinic={} event=unexpected_close", self.id, self.clinic_label());
        }
        ctx.stop();
    }
}

impl Session {
    /// Takes one frame from the session's rate; past it the session is closed (1013) and
    /// `false` returned.
    fn charge(&mut self, ctx: &mut ws::WebsocketContext<Self>) -> bool {
        if self.rate.take() {
            return true;
        }
        self.state.metrics.add(&self.state.metrics.rate_limited, 1);
        log::warn!(target: AUDIT, "event=rate_limited session={} clinic={} result=closed", self.id, self.clinic_label());
        self.send_error(
            ctx,
            ErrorCode::RateLimited,
            "message rate limit exceeded; reconnect later".into(),
            None,
        );
        self.close(ctx, ws::CloseCode::Again, "rate limited");
        false
    }
}

/// A data message still arriving after this many heartbeat intervals closes the session.
const MESSAGE_DEADLINE_HEARTBEATS: u32 = 6;

impl Session {
    /// A text frame (or a reassembled text message) that is not UTF-8: 1007 (RFC 6455 §8.1).
    fn bad_utf8(&mut self, ctx: &mut ws::WebsocketContext<Self>) {
        log::warn!(target: CONNECTION, "session={} clinic={} event=invalid_utf8", self.id, self.clinic_label());
        self.send_error(
            ctx,
            ErrorCode::BadFrame,
            "text message is not valid UTF-8".into(),
            None,
        );
        self.close(ctx, ws::CloseCode::Invalid, "invalid UTF-8");
    }

    /// RFC 6455 fragmentation: the message is reassembled (the frame guard has already
    /// limited its total size) and handled as if it had come in one frame.
    fn on_fragment(&mut self, item: actix_http::ws::Item, ctx: &mut ws::WebsocketContext<Self>) {
        let max = self.state.settings.max_frame_bytes;
        let (part, first, last) = match item {
            actix_http::ws::Item::FirstText(b) => (b, Some(true), false),
            actix_http::ws::Item::FirstBinary(b) => (b, Some(false), false),
            actix_http::ws::Item::Continue(b) => (b, None, false),
            actix_http::ws::Item::Last(b) => (b, None, true),
        };
        match (first, self.fragments.as_mut()) {
            (Some(text), None) => {
                self.fragments = Some((bytes::BytesMut::from(&part[..]), text));
            }
            (None, Some((buf, _))) if buf.len() + part.len() <= max => {
                buf.extend_from_slice(&part);
            }
            (None, Some(_)) => {
                self.send_error(
                    ctx,
                    ErrorCode::FrameTooLarge,
                    format!("fragmented message exceeds {max} bytes"),
                    None,
                );
                return self.close(ctx, ws::CloseCode::Size, "frame too large");
            }
            (Some(_), Some(_)) | (None, None) => {
                log::warn!(target: CONNECTION, "session={} clinic={} event=protocol_error error=\"continuation frame out of sequence\"", self.id, self.clinic_label());
                return self.close(ctx, ws::CloseCode::Protocol, "continuation out of sequence");
            }
        }
        if !last {
            return;
        }
        let Some((buf, text)) = self.fragments.take() else {
            return;
        };
        if !text {
            return self.send_error(
                ctx,
                ErrorCode::BadFrame,
                "binary frames are not part of the protocol; send JSON text".into(),
                None,
            );
        }
        match std::str::from_utf8(&buf) {
            Ok(t) => self.on_text(t, ctx),
            Err(_) => self.bad_utf8(ctx),
        }
    }
}

impl Handler<SessionCommand> for Session {
    type Result = ();
    fn handle(&mut self, cmd: SessionCommand, ctx: &mut Self::Context) {
        match cmd {
            SessionCommand::Replaced { by_session } => {
                let why = format!("replaced by newer session {by_session}");
                self.close(ctx, ws::CloseCode::Other(4001), &why);
            }
            SessionCommand::DeliverUpdates => {
                self.deliver_updates(ctx);
                self.deliver_channels(ctx);
            }
            SessionCommand::Revoked { kids } => {
                let Some(kid) = self.auth.as_ref().map(|a| a.kid.clone()) else {
                    return;
                };
                if kids.contains(&kid) {
                    log::warn!(target: AUDIT, "session={} clinic={} event=session_revoked kid={kid} action=closed", self.id, self.clinic_label());
                    self.state
                        .metrics
                        .add(&self.state.metrics.sessions_revoked, 1);
                    self.close(ctx, ws::CloseCode::Policy, "credentials revoked");
                }
            }
            SessionCommand::Rpc {
                request_id,
                name,
                params,
            } => {
                if self.closing || self.shutting_down {
                    return self
                        .state
                        .rpc
                        .fail(&request_id, "the clinic's session is closing");
                }
                log::info!(target: MESSAGE, "session={} clinic={} event=rpc_sent request_id={request_id} name={name}", self.id, self.clinic_label());
                self.rpc_outstanding.insert(request_id.clone());
                self.send(
                    ctx,
                    Wire::RpcRequest(tether_schemas::RpcRequest {
                        request_id,
                        name,
                        params,
                    }),
                );
            }
            SessionCommand::Shutdown => {
                self.shutting_down = true;
                if self.writes_inflight == 0 {
                    self.close(ctx, ws::CloseCode::Away, "gateway shutting down");
                }
            }
        }
    }
}

//! REST API (JSON) for the main Web API and operators.
//!
//! - `GET /healthz` (liveness), `GET /readyz` (the store's writer commits, background tasks run)
//! - `GET /v1/clinics?state=&transport=&after=&limit=` (cursor on the clinic id), `GET /v1/clinics/{id}`
//! - `GET /v1/events?clinic_id=&after=&limit=&flagged=` (cursor pagination on the event id;
//!   `flagged=true`: only events stored with a problem, e.g. a row failing its schema)
//! - `POST /v1/clinics/{id}/updates` → 202 `{"update_id": …}`
//! - `GET /v1/updates/{id}`
//! - `POST /v1/clinics/{id}/rpc` → the rows of one of the clinic's allow-listed queries
//!
//! The whole API (monitoring, agent transports) is described in `schemas/openapi.json`, served at
//! `/v1/openapi.json`; `routes.rs` holds the table of routes.
//!
//! Errors are `application/problem+json` (RFC 9457) with `field` naming the input at fault.

use std::collections::BTreeMap;

use actix_web::body::{EitherBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::middleware::Next;
use actix_web::{http::StatusCode, web, HttpResponse};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use tether_actors::log_target::AUDIT;
use tether_actors::registry::{ClinicLive, Snapshot, UpdatesPending};
use tether_schemas::UpdateOp;

use super::store::{CancelOutcome, ClinicRecord, NewUpdate, StoreError};
use super::GatewayState;
use crate::config::valid_id;
use crate::security::log_value;

/// Requires an admin bearer token on `/v1/*` (not on `/v1/ws`, which has clinic tokens):
/// `read` for GET, `write` otherwise. Every REST call is an audit line: who, what, result.
pub async fn admin_auth(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<EitherBody<impl MessageBody>>, actix_web::Error> {
    let path = req.path().to_string();
    // Agent transports authenticate clinics themselves (token, certificate, channel id).
    let guarded = path.starts_with("/v1/") || path == "/metrics";
    // Enrolment: the one-time code (or the clinic's token, to renew) is the credential.
    let public = path == "/v1/ws"
        || path == "/v1/openapi.json"
        || path.starts_with("/v1/http/")
        || path == "/v1/enrol"
        || path.starts_with("/v1/enrol/");
    // A path that is no route is a 404 for everyone (the routes are public in the OpenAPI
    // file): an agent with a wrong URL must hear "not found", not "unauthorized".
    let no_route = req.match_pattern().is_none();
    if !guarded || public || no_route {
        return next.call(req).await.map(|r| r.map_into_left_body());
    }
    let method = req.method().clone();
    let need = if method == actix_web::http::Method::GET {
        crate::security::admin::Scope::Read
    } else {
        crate::security::admin::Scope::Write
    };
    let peer = req
        .peer_addr()
        .map(|a| a.ip().to_string())
        .unwrap_or_else(|| "-".into());
    let who = match req
        .app_data::<web::Data<GatewayState>>()
        .and_then(|s| s.security.admin.as_ref())
    {
        None => Ok("anonymous".to_string()),
        Some(tokens) => tokens.check(
            req.headers()
                .get(actix_web::http::header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok()),
            need,
        ),
    };
    match who {
        Err(e) => {
            log::warn!(target: AUDIT, "actor=- peer={peer} action={} result=denied reason={:?}", crate::security::log_value(&format!("{method} {path}"), 160), e.to_string());
            let status = match e {
                crate::security::admin::AdminAuthError::Scope(..) => StatusCode::FORBIDDEN,
                _ => StatusCode::UNAUTHORIZED,
            };
            let resp = error(status, None, "missing or insufficient admin token");
            Ok(req.into_response(resp).map_into_right_body())
        }
        Ok(name) => {
            actix_web::HttpMessage::extensions_mut(&req)
                .insert(super::enrolment::AdminName(name.clone()));
            let res = next.call(req).await?;
            log::info!(target: AUDIT, "actor={name} peer={peer} action={} result={}", crate::security::log_value(&format!("{method} {path}"), 160), res.status().as_u16());
            Ok(res.map_into_left_body())
        }
    }
}

/// A refusal the caller should retry after a second (`Retry-After: 1`).
fn retry_later(status: StatusCode, detail: String) -> HttpResponse {
    let mut resp = error(status, None, detail);
    resp.headers_mut().insert(
        actix_web::http::header::RETRY_AFTER,
        actix_web::http::header::HeaderValue::from_static("1"),
    );
    resp
}

fn error(status: StatusCode, field: Option<&str>, message: impl Into<String>) -> HttpResponse {
    super::problem::problem(status, field, message)
}

fn store_error(e: impl std::fmt::Display) -> HttpResponse {
    log::error!(target: "error", "event=api_store_error error={e}");
    error(StatusCode::SERVICE_UNAVAILABLE, None, "store unavailable")
}

/// Awaits a store call; a store that cannot answer is a 503 (logged, never the details).
pub(super) async fn call<T>(f: super::store::StoreFuture<T>) -> Result<T, HttpResponse> {
    f.await.map_err(store_error)
}

/// Liveness: the process answers (a load balancer restarts it when this fails).
pub(super) async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(json!({"status": "ok"}))
}

/// Readiness: the store's writer commits (a round trip through it) and every background task
/// (webhook dispatchers, retention) has reported within its limit. A load balancer sends no
/// clinics to a node that is not ready.
pub(super) async fn readyz(state: web::Data<GatewayState>) -> HttpResponse {
    let started = std::time::Instant::now();
    let writer = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        state.store.check_writer(),
    )
    .await;
    let writer = match writer {
        Ok(Ok(())) => json!({"ok": true, "ms": started.elapsed().as_millis() as u64}),
        Ok(Err(e)) => {
            log::warn!(target: "error", "event=not_ready reason=store_writer error={e}");
            json!({"ok": false, "error": e.to_string()})
        }
        Err(_) => {
            log::warn!(target: "error", "event=not_ready reason=store_writer error=timeout");
            json!({"ok": false, "error": "no commit within 5 s"})
        }
    };
    let stale: Vec<Value> = state
        .tasks
        .stale()
        .into_iter()
        .map(|(task, ms)| json!({"task": task, "silent_ms": ms}))
        .collect();
    let ready = writer["ok"] == json!(true) && stale.is_empty();
    let mut body = json!({
        "state": if ready { "ready" } else { "not_ready" },
        "store": state.store.kind(),
        "writer": writer,
        "stalled_tasks": stale,
    });
    if ready {
        return HttpResponse::Ok().json(body);
    }
    // A problem (RFC 9457) whose extension members say which part failed.
    let detail = if body["writer"]["ok"] != json!(true) {
        "not ready: the store's writer does not commit"
    } else {
        "not ready: a background task has stalled"
    };
    let status = StatusCode::SERVICE_UNAVAILABLE;
    body["type"] = json!("https://tether.example/problems/service-unavailable");
    body["title"] = json!("Service Unavailable");
    body["status"] = json!(status.as_u16());
    body["detail"] = json!(detail);
    HttpResponse::build(status)
        .content_type(super::problem::CONTENT_TYPE)
        .body(body.to_string())
}

/// Which nodes are alive now, and this node's id, for the clinic views: a clinic whose session
/// is on another live node is `connected` there.
pub(super) struct NodeView {
    pub me: String,
    pub alive: std::collections::BTreeSet<String>,
}

impl NodeView {
    pub(super) async fn load(state: &GatewayState) -> NodeView {
        let me = state.store.node().to_string();
        let now = crate::security::unix_now_ms();
        let alive = state
            .store
            .nodes()
            .await
            .unwrap_or_default()
            .into_iter()
            .filter(|n| super::cluster::alive(n, state.settings.heartbeat_interval, now))
            .map(|n| n.node_id)
            .collect();
        NodeView { me, alive }
    }

    /// The node that holds the clinic's session now, if it is another live one.
    pub(super) fn elsewhere<'a>(&self, r: Option<&'a ClinicRecord>) -> Option<&'a str> {
        r.and_then(|r| r.node.as_deref())
            .filter(|n| *n != self.me && self.alive.contains(*n))
    }
}

/// One clinic as the REST API shows it: its stored counters and its live state (from this node,
/// or the node that holds its session).
fn clinic_view(r: Option<&ClinicRecord>, l: Option<&ClinicLive>, nodes: &NodeView) -> Value {
    let here = l.is_some_and(|l| l.connected);
    let elsewhere = if here { None } else { nodes.elsewhere(r) };
    let node = if here {
        Some(nodes.me.as_str())
    } else {
        elsewhere
    };
    let state = match (l, elsewhere) {
        (Some(l), _) if l.connected => l.state,
        (_, Some(_)) => "connected",
        (Some(l), None) => l.state,
        (None, None) => "offline",
    };
    json!({
        "node": node,
        "epoch": r.map(|r| r.epoch).unwrap_or(0),
        "clinic_id": r.map(|r| r.clinic_id.as_str()).or(l.map(|l| l.clinic_id.as_str())),
        "connected": here || elsewhere.is_some(),
        "session_id": l.and_then(|l| l.session_id.clone()),
        "remote_addr": l.and_then(|l| l.remote_addr.clone()),
        "last_heartbeat_ms": l.and_then(|l| l.last_heartbeat_ms),
        "sessions_total": l.map(|l| l.sessions_total).unwrap_or(0),
        "transport": l.and_then(|l| l.transport.clone()),
        "state": state,
        "lag_events": l.map(|l| l.lag_events).unwrap_or(0),
        "lag_ms": l.and_then(|l| l.lag_ms),
        "agent_restarts": l.map(|l| l.agent_restarts).unwrap_or(0),
        "acked_seq": r.map(|r| r.acked_seq).or(l.map(|l| l.acked_seq)).unwrap_or(0),
        "events": r.map(|r| r.events).unwrap_or(0),
        "pending_updates": r.map(|r| r.pending_updates).unwrap_or(0),
        "failed_updates": r.map(|r| r.failed_updates).unwrap_or(0),
        "flagged_events": r.map(|r| r.flagged_events).unwrap_or(0),
        "agent_version": l.and_then(|l| l.agent_version.clone()),
        "first_seen": r.map(|r| r.first_seen.clone()),
        "last_event_at": r.and_then(|r| r.last_event_at.clone()),
        "refused": l.and_then(|l| l.refused.clone()),
    })
}

async fn clinic_views(state: &GatewayState) -> Result<Vec<Value>, HttpResponse> {
    let records = call(state.store.clinics()).await?;
    let live: Vec<ClinicLive> = state.registry.send(Snapshot).await.unwrap_or_default();
    let mut live: BTreeMap<String, ClinicLive> =
        live.into_iter().map(|l| (l.clinic_id.clone(), l)).collect();
    let nodes = NodeView::load(state).await;
    let mut out = Vec::with_capacity(records.len() + live.len());
    for r in &records {
        let l = live.remove(&r.clinic_id);
        out.push(clinic_view(Some(r), l.as_ref(), &nodes));
    }
    // Connected clinics that have not stored anything yet.
    for (_, l) in live {
        out.push(clinic_view(None, Some(&l), &nodes));
    }
    Ok(out)
}

/// `limit` of a page: 1 to 1000, `default` when absent.
fn page_limit(raw: Option<&str>, default: usize) -> Result<usize, Box<HttpResponse>> {
    match raw.map(str::parse::<usize>) {
        None => Ok(default),
        Some(Ok(v)) if (1..=1000).contains(&v) => Ok(v),
        Some(_) => Err(Box::new(error(
            StatusCode::BAD_REQUEST,
            Some("limit"),
            "must be an integer from 1 to 1000",
        ))),
    }
}

/// Refuses a query parameter the route does not know, naming it.
fn known_params(q: &BTreeMap<String, String>, known: &[&str]) -> Option<HttpResponse> {
    let k = q.keys().find(|k| !known.contains(&k.as_str()))?;
    Some(error(
        StatusCode::BAD_REQUEST,
        Some(k),
        format!("unknown query parameter `{k}`"),
    ))
}

pub(super) async fn list_clinics(
    state: web::Data<GatewayState>,
    q: web::Query<BTreeMap<String, String>>,
) -> HttpResponse {
    let q = q.into_inner();
    if let Some(resp) = known_params(&q, &["state", "transport", "after", "limit"]) {
        return resp;
    }
    let want_state = q.get("state").map(String::as_str);
    if let Some(s) = want_state {
        if !["connected", "reconnecting", "offline"].contains(&s) {
            return error(
                StatusCode::BAD_REQUEST,
                Some("state"),
                "must be connected, reconnecting or offline",
            );
        }
    }
    let want_transport = q.get("transport").map(String::as_str);
    if let Some(t) = want_transport {
        if !["websocket", "http"].contains(&t) {
            return error(
                StatusCode::BAD_REQUEST,
                Some("transport"),
                "must be websocket or http",
            );
        }
    }
    let limit = match page_limit(q.get("limit").map(String::as_str), 500) {
        Ok(l) => l,
        Err(resp) => return *resp,
    };
    let after = q.get("after").cloned().unwrap_or_default();
    match clinic_views(&state).await {
        Ok(mut v) => {
            v.sort_by(|a, b| a["clinic_id"].as_str().cmp(&b["clinic_id"].as_str()));
            let page: Vec<Value> = v
                .into_iter()
                .filter(|c| c["clinic_id"].as_str().unwrap_or("") > after.as_str())
                .filter(|c| want_state.is_none_or(|s| c["state"] == s))
                .filter(|c| want_transport.is_none_or(|t| c["transport"] == t))
                .take(limit + 1)
                .collect();
            let more = page.len() > limit;
            let page: Vec<Value> = page.into_iter().take(limit).collect();
            let next = if more {
                page.last().map(|c| c["clinic_id"].clone())
            } else {
                None
            };
            HttpResponse::Ok().json(json!({ "clinics": page, "next_after": next }))
        }
        Err(resp) => resp,
    }
}

pub(super) async fn get_clinic(
    state: web::Data<GatewayState>,
    id: web::Path<String>,
) -> HttpResponse {
    let id = id.into_inner();
    let record = match call(state.store.clinic(&id)).await {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    let live: Vec<ClinicLive> = state.registry.send(Snapshot).await.unwrap_or_default();
    let live = live.into_iter().find(|l| l.clinic_id == id);
    if record.is_none() && live.is_none() {
        return error(
            StatusCode::NOT_FOUND,
            Some("id"),
            format!("no clinic `{id}`"),
        );
    }
    let nodes = NodeView::load(&state).await;
    HttpResponse::Ok().json(clinic_view(record.as_ref(), live.as_ref(), &nodes))
}

/// `GET /v1/nodes`: every gateway node that beats on this store, whether it is alive (beat
/// within three heartbeat intervals), and which one answered.
pub(super) async fn list_nodes(state: web::Data<GatewayState>) -> HttpResponse {
    let nodes = match call(state.store.nodes()).await {
        Ok(n) => n,
        Err(resp) => return resp,
    };
    let now = crate::security::unix_now_ms();
    let interval = state.settings.heartbeat_interval;
    let me = state.store.node();
    let list: Vec<Value> = nodes
        .iter()
        .map(|n| {
            json!({
                "node_id": n.node_id,
                "addr": n.addr,
                "started_at": n.started_at,
                "last_beat_ms": n.last_beat_ms,
                "silent_ms": now.saturating_sub(n.last_beat_ms),
                "alive": super::cluster::alive(n, interval, now),
                "sessions": n.sessions,
                "this_node": n.node_id == me,
            })
        })
        .collect();
    HttpResponse::Ok().json(json!({ "node": me, "nodes": list }))
}

#[derive(Deserialize)]
struct EventsQuery {
    clinic_id: Option<String>,
    after: Option<String>,
    limit: Option<String>,
}

pub(super) async fn list_events(
    state: web::Data<GatewayState>,
    q: web::Query<BTreeMap<String, String>>,
) -> HttpResponse {
    let q = q.into_inner();
    if let Some(resp) = known_params(&q, &["clinic_id", "after", "limit", "flagged"]) {
        return resp;
    }
    let flagged = match q.get("flagged").map(String::as_str) {
        None | Some("false") => false,
        Some("true") => true,
        Some(_) => {
            return error(
                StatusCode::BAD_REQUEST,
                Some("flagged"),
                "must be true or false",
            )
        }
    };
    let q = EventsQuery {
        clinic_id: q.get("clinic_id").cloned(),
        after: q.get("after").cloned(),
        limit: q.get("limit").cloned(),
    };
    let after = match q.after.as_deref().map(str::parse::<u64>) {
        None => 0,
        Some(Ok(v)) => v,
        Some(Err(_)) => {
            return error(
                StatusCode::BAD_REQUEST,
                Some("after"),
                "must be a non-negative integer (an event id)",
            )
        }
    };
    let limit = match page_limit(q.limit.as_deref(), 100) {
        Ok(l) => l,
        Err(resp) => return *resp,
    };
    if let Some(c) = &q.clinic_id {
        if !valid_id(c) {
            return error(
                StatusCode::BAD_REQUEST,
                Some("clinic_id"),
                "not a valid clinic id",
            );
        }
    }
    let clinic = q.clinic_id.as_deref();
    // Without `after`, the page starts at the oldest event retention kept; an explicit `after`
    // before it is a 410 naming the oldest id (the caller has missed events).
    let page = |after| match flagged {
        true => state.store.flagged_events_page(clinic, after, limit),
        false => state.store.events_page(clinic, after, limit),
    };
    let mut res = page(after).await;
    if let (None, Err(StoreError::Gone { pruned_through, .. })) = (&q.after, &res) {
        res = page(*pruned_through).await;
    }
    match res {
        Ok(events) => {
            let next = (events.len() == limit)
                .then(|| events.last().map(|e| e.id))
                .flatten();
            HttpResponse::Ok().json(json!({ "events": events, "next_after": next }))
        }
        Err(StoreError::Gone {
            pruned_through,
            oldest,
        }) => {
            let mut resp = error(
                StatusCode::GONE,
                Some("after"),
                format!("events up to id {pruned_through} were removed by retention (gateway.store.retention); the oldest kept is {oldest}: continue with after={}", oldest - 1),
            );
            if let Ok(v) = actix_web::http::header::HeaderValue::from_str(&oldest.to_string()) {
                resp.headers_mut().insert(
                    actix_web::http::header::HeaderName::from_static("tether-oldest-event-id"),
                    v,
                );
            }
            resp
        }
        Err(e) => store_error(e),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UpdateBody {
    entity: String,
    op: UpdateOp,
    key: Map<String, Value>,
    #[serde(default)]
    row: Option<Map<String, Value>>,
}

/// The `{id}` path segment if it is a valid clinic id, or the 400 naming it.
pub(super) fn clinic_id(id: web::Path<String>) -> Result<String, Box<HttpResponse>> {
    let clinic = id.into_inner();
    if !valid_id(&clinic) {
        return Err(Box::new(error(
            StatusCode::BAD_REQUEST,
            Some("id"),
            "not a valid clinic id",
        )));
    }
    Ok(clinic)
}

/// The `{id}` path segment (a valid clinic id) and the JSON body, or the 400 naming what is
/// wrong (the body's field path included).
fn clinic_and_body<T: serde::de::DeserializeOwned>(
    id: web::Path<String>,
    body: &[u8],
) -> Result<(String, T), Box<HttpResponse>> {
    Ok((clinic_id(id)?, json_body(body)?))
}

/// The JSON body, or the 400 naming the field at fault.
pub(super) fn json_body<T: serde::de::DeserializeOwned>(
    body: &[u8],
) -> Result<T, Box<HttpResponse>> {
    let mut de = serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let field = e.path().to_string();
        let field = if field == "." { None } else { Some(field) };
        Box::new(error(
            StatusCode::BAD_REQUEST,
            field.as_deref(),
            e.into_inner().to_string(),
        ))
    })
}

/// The `Idempotency-Key` header, if any, or the 400 naming it.
fn idempotency_key(req: &actix_web::HttpRequest) -> Result<Option<String>, Box<HttpResponse>> {
    match req.headers().get("idempotency-key") {
        None => Ok(None),
        Some(v) => match v.to_str() {
            Ok(k) if (1..=255).contains(&k.len()) && k.bytes().all(|b| b.is_ascii_graphic()) => {
                Ok(Some(k.to_string()))
            }
            _ => Err(Box::new(error(
                StatusCode::BAD_REQUEST,
                Some("Idempotency-Key"),
                "must be 1-255 visible ASCII characters",
            ))),
        },
    }
}

/// An update's entity, key, op and row hold together and the row passes the entity's schema;
/// or the 400/422 naming the field.
fn check_update(state: &GatewayState, u: &UpdateBody) -> Result<(), Box<HttpResponse>> {
    let bad =
        |field: &str, why: &str| Err(Box::new(error(StatusCode::BAD_REQUEST, Some(field), why)));
    if !valid_id(&u.entity) {
        return bad(
            "entity",
            "must be 1-64 characters of letters, digits, -, _ or .",
        );
    }
    if u.key.is_empty() {
        return bad("key", "must name at least one key column");
    }
    // With entity schemas, an entity none describes cannot be applied anywhere: refused now,
    // not later at every clinic.
    if !state.schemas.is_empty() && !state.schemas.covers(&u.entity) {
        return Err(Box::new(error(
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("entity"),
            format!(
                "no entity `{}` on this gateway (gateway.entity_schemas has no schema for it)",
                log_value(&u.entity, 64)
            ),
        )));
    }
    match (u.op, &u.row) {
        (UpdateOp::Upsert, None) => return bad("row", "required for op upsert"),
        (UpdateOp::Delete, Some(_)) => return bad("row", "must be absent for op delete"),
        _ => {}
    }
    if let Some(row) = &u.row {
        if let Err(e) = state
            .schemas
            .validate(&u.entity, &Value::Object(row.clone()))
        {
            return Err(Box::new(error(
                StatusCode::UNPROCESSABLE_ENTITY,
                Some("row"),
                e.to_string(),
            )));
        }
    }
    Ok(())
}

pub(super) async fn post_update(
    state: web::Data<GatewayState>,
    req: actix_web::HttpRequest,
    id: web::Path<String>,
    body: web::Bytes,
) -> HttpResponse {
    let (clinic, parsed) = match clinic_and_body::<UpdateBody>(id, &body) {
        Ok(v) => v,
        Err(resp) => return *resp,
    };
    // A retried POST (the answer was lost) with the same key gets the first update back.
    let idempotency_key = match idempotency_key(&req) {
        Ok(k) => k,
        Err(resp) => return *resp,
    };
    if let Err(resp) = check_update(&state, &parsed) {
        return *resp;
    }
    // With a clinic registry, an update for a clinic it does not know would wait forever.
    if let Some(v) = &state.security.verifier {
        if !v.registry().contains(&clinic) {
            return error(
                StatusCode::NOT_FOUND,
                Some("id"),
                format!("clinic {clinic} is not in the registry"),
            );
        }
    }
    let entity = parsed.entity.clone();
    let op = parsed.op;
    let update = NewUpdate {
        clinic_id: clinic.clone(),
        entity: parsed.entity,
        op: parsed.op,
        key: parsed.key,
        row: parsed.row,
        idempotency_key: idempotency_key.clone(),
        batch_id: None,
    };
    match state.store.enqueue_update(update).await {
        Ok(update_id) => {
            log::info!(target: AUDIT, "action=enqueue_update clinic={clinic} update_id={update_id} entity={entity} op={} idempotency_key={} result=accepted", op.as_str(), idempotency_key.is_some());
            // With a key this may be the first update again: answer its status as it is now.
            let status = match idempotency_key {
                Some(_) => match state.store.update(&update_id).await {
                    Ok(Some(r)) => r.status,
                    _ => "pending".to_string(),
                },
                None => "pending".to_string(),
            };
            state.registry.do_send(UpdatesPending { clinic_id: clinic });
            HttpResponse::Accepted().json(json!({ "update_id": update_id, "status": status }))
        }
        Err(StoreError::Conflict(m)) => error(StatusCode::CONFLICT, Some("Idempotency-Key"), m),
        Err(e) => store_error(e),
    }
}

/// The statuses an update goes through.
const UPDATE_STATUSES: [&str; 6] = [
    "pending",
    "delivered",
    "applied",
    "failed",
    "conflict",
    "cancelled",
];

#[derive(Deserialize)]
struct UpdatesQuery {
    status: Option<String>,
    after: Option<String>,
    limit: Option<String>,
}

/// `GET /v1/clinics/{id}/updates?status=&after=&limit=`: the clinic's cloud updates, oldest
/// first, one status or all; `after` is the `next_after` of the previous page.
pub(super) async fn list_updates(
    state: web::Data<GatewayState>,
    id: web::Path<String>,
    q: web::Query<BTreeMap<String, String>>,
) -> HttpResponse {
    if let Some(resp) = known_params(&q, &["status", "after", "limit"]) {
        return resp;
    }
    let clinic = match clinic_id(id) {
        Ok(c) => c,
        Err(resp) => return *resp,
    };
    let q = UpdatesQuery {
        status: q.get("status").cloned(),
        after: q.get("after").cloned(),
        limit: q.get("limit").cloned(),
    };
    if let Some(s) = &q.status {
        if !UPDATE_STATUSES.contains(&s.as_str()) {
            return error(
                StatusCode::BAD_REQUEST,
                Some("status"),
                format!("one of {}", UPDATE_STATUSES.join(", ")),
            );
        }
    }
    let after = match q.after.as_deref().map(str::parse::<i64>) {
        None => 0,
        Some(Ok(a)) if a >= 0 => a,
        _ => {
            return error(
                StatusCode::BAD_REQUEST,
                Some("after"),
                "a non-negative integer (next_after of the previous page)",
            )
        }
    };
    let limit = match page_limit(q.limit.as_deref(), 100) {
        Ok(l) => l,
        Err(resp) => return *resp,
    };
    let rows = match call(state.store.updates_page(&clinic, q.status, after, limit)).await {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    let next_after = (rows.len() == limit)
        .then(|| rows.last().map(|(row, _)| *row))
        .flatten();
    let updates: Vec<&super::store::UpdateRecord> = rows.iter().map(|(_, u)| u).collect();
    HttpResponse::Ok().json(json!({ "updates": updates, "next_after": next_after }))
}

/// `DELETE /v1/updates/{id}`: cancels an update no session has been handed yet (204); 409 once
/// it was delivered (or ended); 404 if unknown.
pub(super) async fn cancel_update(
    state: web::Data<GatewayState>,
    id: web::Path<String>,
) -> HttpResponse {
    let update_id = id.into_inner();
    match call(state.store.cancel_update(&update_id)).await {
        Ok(CancelOutcome::Cancelled) => {
            log::info!(target: AUDIT, "action=cancel_update update_id={} result=cancelled", log_value(&update_id, 64));
            HttpResponse::NoContent().finish()
        }
        Ok(CancelOutcome::NotFound) => error(
            StatusCode::NOT_FOUND,
            Some("id"),
            format!("no update `{}`", log_value(&update_id, 64)),
        ),
        Ok(CancelOutcome::NotPending(s)) => error(
            StatusCode::CONFLICT,
            Some("id"),
            format!(
                "the update is {s}: only a pending update (not yet delivered) can be cancelled"
            ),
        ),
        Err(resp) => resp,
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RpcBody {
    name: String,
    #[serde(default)]
    params: Map<String, Value>,
    #[serde(default)]
    timeout_ms: Option<u64>,
}

/// `POST /v1/clinics/{id}/rpc`: runs one of the clinic's allow-listed queries through its
/// session and answers with the rows. Parameters and rows are never logged.
pub(super) async fn post_rpc(
    state: web::Data<GatewayState>,
    id: web::Path<String>,
    body: web::Bytes,
) -> HttpResponse {
    let (clinic, parsed) = match clinic_and_body::<RpcBody>(id, &body) {
        Ok(v) => v,
        Err(resp) => return *resp,
    };
    if !valid_id(&parsed.name) {
        return error(
            StatusCode::BAD_REQUEST,
            Some("name"),
            "must be 1-64 characters of letters, digits, -, _ or .",
        );
    }
    let timeout = match parsed.timeout_ms.unwrap_or(10_000) {
        t @ 1..=60_000 => std::time::Duration::from_millis(t),
        _ => {
            return error(
                StatusCode::BAD_REQUEST,
                Some("timeout_ms"),
                "must be from 1 to 60000",
            )
        }
    };
    // The cloud side is limited here, per clinic, before anything reaches the clinic: a burst
    // of calls gets 429s, never the clinic's link closed.
    let _slot = match state.rpc_limits.admit(&clinic, state.security.rpc_rate) {
        Ok(slot) => slot,
        Err(why) => {
            let (per_second, concurrent) = state.security.rpc_rate;
            let detail = match why {
                crate::gateway::session::RpcLimited::Rate => format!(
                    "more than {per_second} calls per second for clinic `{clinic}` (gateway.limits.rpc_per_second)"
                ),
                crate::gateway::session::RpcLimited::Concurrency => format!(
                    "{concurrent} calls for clinic `{clinic}` are already running (gateway.limits.rpc_concurrent)"
                ),
            };
            return retry_later(StatusCode::TOO_MANY_REQUESTS, detail);
        }
    };
    let request_id = format!("rpc_{:016x}", rand::random::<u64>());
    let outcome = match call_here(
        &state,
        &request_id,
        &clinic,
        &parsed.name,
        parsed.params.clone(),
        timeout,
    )
    .await
    {
        // Another live node holds the clinic's session: the call goes through the store to it.
        CallOutcome::NotConnected => match owner_elsewhere(&state, &clinic).await {
            Some(node) => {
                super::cluster::forward_call(
                    &state,
                    &request_id,
                    &clinic,
                    node,
                    parsed.name,
                    parsed.params,
                    timeout,
                )
                .await
            }
            None => CallOutcome::NotConnected,
        },
        o => o,
    };
    rpc_reply(&request_id, &clinic, timeout, outcome)
}

/// The node holding `clinic`'s session, when it is another live node.
async fn owner_elsewhere(state: &GatewayState, clinic: &str) -> Option<String> {
    let record = state.store.clinic(clinic).await.ok().flatten()?;
    let nodes = NodeView::load(state).await;
    nodes.elsewhere(Some(&record)).map(str::to_string)
}

/// How a call to a clinic ended, wherever it ran (stored as the answer of a call forwarded to
/// another node).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub(super) enum CallOutcome {
    Answered {
        response: tether_schemas::RpcResponse,
    },
    /// No session of the clinic on the node that tried.
    NotConnected,
    /// The session ended before the clinic answered.
    SessionEnded,
    TimedOut,
    /// The call could not be passed on (the store refused it).
    Failed {
        message: String,
    },
}

/// Runs a call through the clinic's session on this node, if this node holds it.
pub(super) async fn call_here(
    state: &GatewayState,
    request_id: &str,
    clinic: &str,
    name: &str,
    params: Map<String, Value>,
    timeout: std::time::Duration,
) -> CallOutcome {
    let answer = state.rpc.register(request_id);
    let cmd = tether_actors::registry::SessionCommand::Rpc {
        request_id: request_id.to_string(),
        name: name.to_string(),
        params,
    };
    let delivered = state
        .registry
        .send(tether_actors::registry::ToClinic {
            clinic_id: clinic.to_string(),
            cmd,
        })
        .await
        .unwrap_or(false);
    if !delivered {
        state.rpc.forget(request_id);
        return CallOutcome::NotConnected;
    }
    match tokio::time::timeout(timeout, answer).await {
        Err(_) => {
            state.rpc.forget(request_id);
            CallOutcome::TimedOut
        }
        Ok(Err(_)) => CallOutcome::SessionEnded,
        Ok(Ok(response)) => CallOutcome::Answered { response },
    }
}

fn rpc_reply(
    request_id: &str,
    clinic: &str,
    timeout: std::time::Duration,
    outcome: CallOutcome,
) -> HttpResponse {
    use tether_schemas::RpcStatus;
    match outcome {
        CallOutcome::NotConnected => error(
            StatusCode::SERVICE_UNAVAILABLE,
            Some("id"),
            format!("clinic `{clinic}` is not connected; try again when it is (GET /v1/clinics/{clinic} shows its state)"),
        ),
        CallOutcome::TimedOut => error(
            StatusCode::GATEWAY_TIMEOUT,
            Some("timeout_ms"),
            format!(
                "clinic `{clinic}` did not answer within {} ms",
                timeout.as_millis()
            ),
        ),
        CallOutcome::SessionEnded => error(
            StatusCode::SERVICE_UNAVAILABLE,
            None,
            "the clinic's session ended before it answered",
        ),
        CallOutcome::Failed { message } => retry_later(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the call could not reach the node holding clinic `{clinic}`: {message}"),
        ),
        CallOutcome::Answered { response: r } if r.status == RpcStatus::Ok => {
            HttpResponse::Ok().json(json!({
                "request_id": request_id,
                "rows": r.rows.unwrap_or_default(),
                "truncated": r.truncated.unwrap_or(false),
            }))
        }
        CallOutcome::Answered { response: r } if r.status == RpcStatus::Busy => retry_later(
            StatusCode::SERVICE_UNAVAILABLE,
            r.error
                .unwrap_or_else(|| "the clinic runs as many queries as it allows".into()),
        ),
        CallOutcome::Answered { response: r } => {
            let detail = r.error.unwrap_or_else(|| "refused by the clinic".into());
            // Refused before running (unknown name, bad parameter) vs failed while running.
            let status = if r.field.is_some() {
                StatusCode::UNPROCESSABLE_ENTITY
            } else {
                StatusCode::BAD_GATEWAY
            };
            error(status, r.field.as_deref(), detail)
        }
    }
}

pub(super) async fn get_update(
    state: web::Data<GatewayState>,
    id: web::Path<String>,
) -> HttpResponse {
    let id = id.into_inner();
    match call(state.store.update(&id)).await {
        Ok(Some(u)) => HttpResponse::Ok().json(u),
        Ok(None) => error(
            StatusCode::NOT_FOUND,
            Some("id"),
            format!("no update `{id}`"),
        ),
        Err(resp) => resp,
    }
}

fn no_webhook(name: &str) -> HttpResponse {
    error(
        StatusCode::NOT_FOUND,
        Some("name"),
        format!("no webhook `{name}` (gateway.webhooks)"),
    )
}

/// `GET /v1/webhooks`: each endpoint with its cursor, counters and dead letters.
pub(super) async fn list_webhooks(state: web::Data<GatewayState>) -> HttpResponse {
    use std::sync::atomic::Ordering::Relaxed;
    let mut out = Vec::new();
    for (s, stats) in &state.webhooks.endpoints {
        let cursor = match call(state.store.webhook_cursor(&s.name)).await {
            Ok(v) => v,
            Err(resp) => return resp,
        };
        let dead = match call(state.store.dead_letter_count(&s.name)).await {
            Ok(v) => v,
            Err(resp) => return resp,
        };
        out.push(json!({
            "name": s.name,
            "url": s.url,
            "entities": s.entities,
            "cursor": cursor,
            "delivered_since_start": stats.delivered.load(Relaxed),
            "failures_since_start": stats.failures.load(Relaxed),
            "since": state.webhooks.since,
            "dead_letters": dead,
        }));
    }
    HttpResponse::Ok().json(json!({ "webhooks": out }))
}

/// `GET /v1/webhooks/{name}/dead-letters?after=&limit=`.
pub(super) async fn list_dead_letters(
    state: web::Data<GatewayState>,
    name: web::Path<String>,
    q: web::Query<BTreeMap<String, String>>,
) -> HttpResponse {
    let name = name.into_inner();
    if state.webhooks.find(&name).is_none() {
        return no_webhook(&name);
    }
    let q = q.into_inner();
    if let Some(resp) = known_params(&q, &["after", "limit"]) {
        return resp;
    }
    let Ok(after) = q.get("after").map_or(Ok(0), |a| a.parse::<u64>()) else {
        return error(
            StatusCode::BAD_REQUEST,
            Some("after"),
            "must be a dead-letter id",
        );
    };
    let limit = match page_limit(q.get("limit").map(String::as_str), 100) {
        Ok(l) => l,
        Err(resp) => return *resp,
    };
    match state.store.dead_letters(&name, after, limit).await {
        Ok(list) => {
            let next = (list.len() == limit)
                .then(|| list.last().map(|d| d.id))
                .flatten();
            HttpResponse::Ok().json(json!({ "dead_letters": list, "next_after": next }))
        }
        Err(e) => store_error(e),
    }
}

/// `POST /v1/webhooks/{name}/dead-letters/{id}/replay`: one more delivery, now.
pub(super) async fn replay_dead_letter(
    state: web::Data<GatewayState>,
    path: web::Path<(String, String)>,
) -> HttpResponse {
    use super::webhooks::ReplayError;
    let (name, id) = path.into_inner();
    let Ok(id) = id.parse::<u64>() else {
        return error(
            StatusCode::NOT_FOUND,
            Some("id"),
            format!("no dead letter `{id}`: ids are integers"),
        );
    };
    match state.webhooks.replay_dead_letter(&name, id).await {
        Ok(delivered) => HttpResponse::Ok().json(json!({ "delivered": delivered })),
        Err(ReplayError::NoWebhook) => no_webhook(&name),
        Err(ReplayError::NoDeadLetter) => error(
            StatusCode::NOT_FOUND,
            Some("id"),
            format!("no dead letter {id} for webhook `{name}`"),
        ),
        Err(ReplayError::Store(e)) => store_error(e),
        Err(e @ ReplayError::PastHead { .. }) => error(StatusCode::NOT_FOUND, None, e.to_string()),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReplayBody {
    from_event_id: u64,
}

/// `POST /v1/webhooks/{name}/replay` `{"from_event_id": N}`: re-deliver from an event on.
pub(super) async fn replay_webhook(
    state: web::Data<GatewayState>,
    name: web::Path<String>,
    body: web::Bytes,
) -> HttpResponse {
    let name = name.into_inner();
    if state.webhooks.find(&name).is_none() {
        return no_webhook(&name);
    }
    let parsed: ReplayBody = match json_body(&body) {
        Ok(b) => b,
        Err(resp) => return *resp,
    };
    match state.webhooks.replay_from(&name, parsed.from_event_id).await {
        Ok(()) => {
            log::info!(target: AUDIT, "action=webhook_replay webhook={name} from_event_id={}", parsed.from_event_id);
            HttpResponse::Accepted()
                .json(json!({ "webhook": name, "from_event_id": parsed.from_event_id }))
        }
        Err(super::webhooks::ReplayError::PastHead { head }) => error(
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("from_event_id"),
            format!(
                "from_event_id {} is past the newest event ({head}); replaying from there would skip the events stored next",
                parsed.from_event_id
            ),
        ),
        Err(super::webhooks::ReplayError::Store(e)) => store_error(e),
        Err(e) => error(StatusCode::NOT_FOUND, None, e.to_string()),
    }
}

/// `GET /v1/registry/clinics`: every clinic of the registry in force, its keys (ids,
/// algorithms, revoked or not, never the key itself), labels and file.
pub(super) async fn list_registry(state: web::Data<GatewayState>) -> HttpResponse {
    let Some(verifier) = &state.security.verifier else {
        return error(
            StatusCode::NOT_FOUND,
            None,
            "the gateway has no clinic registry (gateway.auth is not configured)",
        );
    };
    let reg = verifier.registry();
    let clinics: Vec<Value> = reg
        .clinics()
        .values()
        .map(|c| {
            json!({
                "clinic_id": c.clinic_id,
                "status": if c.revoked { "revoked" } else { "active" },
                "labels": c.labels,
                "keys": c.keys.iter().map(|k| json!({
                    "kid": k.kid,
                    "algorithms": k.algorithms,
                    "status": if k.revoked { "revoked" } else { "active" },
                })).collect::<Vec<_>>(),
                "file": c.file,
            })
        })
        .collect();
    HttpResponse::Ok().json(json!({
        "dir": state.security.registry_source.as_ref().map(|s| s.dir.display().to_string()),
        "source": state.security.registry_source.as_ref().map(|s| if s.store { "store" } else { "dir" }),
        "clinics": clinics,
    }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RegistryBody {
    #[serde(default)]
    clinic_id: Option<String>,
    keys: Vec<crate::security::jwt::RegistryKey>,
    #[serde(default)]
    revoked: bool,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

fn registry_write_error(e: super::clinic_registry::WriteError) -> HttpResponse {
    use super::clinic_registry::WriteError as W;
    match e {
        W::NoRegistry => error(StatusCode::NOT_FOUND, None, e.to_string()),
        W::NotFound(_) => error(StatusCode::NOT_FOUND, Some("id"), e.to_string()),
        W::Invalid { field, message } => {
            error(StatusCode::UNPROCESSABLE_ENTITY, Some(&field), message)
        }
        W::Io(m) => {
            log::error!(target: "error", "event=registry_write_failed error={m:?}");
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                None,
                "the registry file could not be written (see the gateway's error log)",
            )
        }
    }
}

/// `PUT /v1/registry/clinics/{id}`: adds or replaces a clinic's entry; in force at once.
pub(super) async fn put_registry_clinic(
    state: web::Data<GatewayState>,
    id: web::Path<String>,
    body: web::Bytes,
) -> HttpResponse {
    let (clinic, parsed) = match clinic_and_body::<RegistryBody>(id, &body) {
        Ok(v) => v,
        Err(resp) => return *resp,
    };
    if parsed.clinic_id.as_ref().is_some_and(|c| *c != clinic) {
        return error(
            StatusCode::BAD_REQUEST,
            Some("clinic_id"),
            "differs from the clinic id in the path",
        );
    }
    if parsed.keys.is_empty() {
        return error(StatusCode::BAD_REQUEST, Some("keys"), "at least one key");
    }
    let entry = crate::security::jwt::RegistryEntry {
        clinic_id: clinic.clone(),
        keys: parsed.keys,
        revoked: parsed.revoked,
        labels: parsed.labels,
    };
    let st = state.clone();
    match web::block(move || super::clinic_registry::put(&st, entry)).await {
        Ok(Ok(created)) => {
            let status = if created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            HttpResponse::build(status).json(json!({ "clinic_id": clinic, "created": created }))
        }
        Ok(Err(e)) => registry_write_error(e),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, None, e.to_string()),
    }
}

/// `DELETE /v1/registry/clinics/{id}`: removes the clinic; its sessions close (1008) and its
/// next handshake is refused.
pub(super) async fn delete_registry_clinic(
    state: web::Data<GatewayState>,
    id: web::Path<String>,
) -> HttpResponse {
    let clinic = match clinic_id(id) {
        Ok(c) => c,
        Err(resp) => return *resp,
    };
    let st = state.clone();
    match web::block(move || super::clinic_registry::delete(&st, &clinic)).await {
        Ok(Ok(())) => HttpResponse::NoContent().finish(),
        Ok(Err(e)) => registry_write_error(e),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, None, e.to_string()),
    }
}

/// `POST /v1/clinics/{id}/source-reset`: an operator confirms that the clinic's database was
/// re-installed; the next hello from a new database (source) is taken once, its positions
/// starting at 0 (the old events stay). Until then another database presenting the clinic's
/// identity is refused (4009 `duplicate source`).
pub(super) async fn source_reset(
    state: web::Data<GatewayState>,
    id: web::Path<String>,
) -> HttpResponse {
    let clinic = match clinic_id(id) {
        Ok(c) => c,
        Err(resp) => return *resp,
    };
    match call(state.store.allow_source_reset(&clinic)).await {
        Ok(true) => {
            log::warn!(target: AUDIT, "event=source_reset_allowed clinic={clinic}");
            HttpResponse::Accepted().json(json!({
                "clinic_id": clinic,
                "armed": true,
                "detail": "the next hello from a new database is taken once; its positions start at 0"
            }))
        }
        Ok(false) => error(
            StatusCode::NOT_FOUND,
            Some("id"),
            format!("clinic {clinic} has never connected"),
        ),
        Err(resp) => resp,
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FanOutBody {
    /// Exactly one of `clinics`, `all`, `labels` chooses the clinics.
    #[serde(default)]
    clinics: Option<Vec<String>>,
    #[serde(default)]
    all: bool,
    #[serde(default)]
    labels: Option<BTreeMap<String, String>>,
    entity: String,
    op: UpdateOp,
    key: Map<String, Value>,
    #[serde(default)]
    row: Option<Map<String, Value>>,
}

/// `POST /v1/updates`: one update per clinic — a list, `all` (every active clinic of the
/// registry, or every clinic the store knows without one), or the registry's `labels` — queued
/// in one transaction under one batch id. Offline clinics get theirs when they return. With
/// `Idempotency-Key`, a retried POST answers the same batch and queues nothing more.
pub(super) async fn post_fan_out(
    state: web::Data<GatewayState>,
    req: actix_web::HttpRequest,
    body: web::Bytes,
) -> HttpResponse {
    let parsed: FanOutBody = match json_body(&body) {
        Ok(b) => b,
        Err(resp) => return *resp,
    };
    let key = match idempotency_key(&req) {
        Ok(k) => k,
        Err(resp) => return *resp,
    };
    let u = UpdateBody {
        entity: parsed.entity,
        op: parsed.op,
        key: parsed.key,
        row: parsed.row,
    };
    if let Err(resp) = check_update(&state, &u) {
        return *resp;
    }
    let clinics = match fan_out_targets(&state, parsed.clinics, parsed.all, parsed.labels).await {
        Ok(c) => c,
        Err(resp) => return *resp,
    };
    // With a key the batch id is derived from it: a retry lands on the same batch, and each
    // clinic's update on the first one (the key is kept per clinic).
    let batch_id = match &key {
        Some(k) => format!("bat_{}", &crate::security::admin::sha256_hex(k)[..32]),
        None => format!(
            "bat_{:016x}{:016x}",
            rand::random::<u64>(),
            rand::random::<u64>()
        ),
    };
    let updates: Vec<NewUpdate> = clinics
        .iter()
        .map(|c| NewUpdate {
            clinic_id: c.clone(),
            entity: u.entity.clone(),
            op: u.op,
            key: u.key.clone(),
            row: u.row.clone(),
            idempotency_key: key.clone(),
            batch_id: Some(batch_id.clone()),
        })
        .collect();
    match state.store.enqueue_batch(updates).await {
        Ok(ids) => {
            log::info!(target: AUDIT, "action=enqueue_batch batch_id={batch_id} clinics={} entity={} op={} result=accepted", ids.len(), u.entity, u.op.as_str());
            for c in &clinics {
                state.registry.do_send(UpdatesPending {
                    clinic_id: c.clone(),
                });
            }
            let by_clinic: BTreeMap<&String, &String> = clinics.iter().zip(ids.iter()).collect();
            HttpResponse::Accepted().json(json!({
                "batch_id": batch_id,
                "clinics": ids.len(),
                "update_ids": by_clinic,
            }))
        }
        Err(StoreError::Conflict(m)) => error(StatusCode::CONFLICT, Some("Idempotency-Key"), m),
        Err(e) => store_error(e),
    }
}

/// The clinics a fan-out names: exactly one of a list (each in the registry), `all` (every
/// active clinic of the registry, or every clinic the store knows without one), or the
/// registry's `labels`; or the answer naming what is wrong.
pub(super) async fn fan_out_targets(
    state: &GatewayState,
    clinics: Option<Vec<String>>,
    all: bool,
    labels: Option<BTreeMap<String, String>>,
) -> Result<Vec<String>, Box<HttpResponse>> {
    let registry = state.security.verifier.as_ref().map(|v| v.registry());
    let chosen = [clinics.is_some(), all, labels.is_some()];
    if chosen.iter().filter(|c| **c).count() != 1 {
        return Err(Box::new(error(
            StatusCode::BAD_REQUEST,
            Some("clinics"),
            "exactly one of `clinics`, `all` or `labels`",
        )));
    }
    let chosen_clinics: Vec<String> = if let Some(list) = clinics {
        for (i, c) in list.iter().enumerate() {
            let known = registry.as_ref().is_none_or(|r| r.contains(c));
            if !valid_id(c) || !known {
                return Err(Box::new(error(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    Some(&format!("clinics[{i}]")),
                    format!("{} is not a clinic of the registry", log_value(c, 64)),
                )));
            }
        }
        let mut l = list;
        l.sort();
        l.dedup();
        l
    } else if let Some(want) = labels {
        let Some(r) = &registry else {
            return Err(Box::new(error(
                StatusCode::BAD_REQUEST,
                Some("labels"),
                "labels come from the clinic registry (gateway.auth), which this gateway has not",
            )));
        };
        r.clinics()
            .values()
            .filter(|c| !c.revoked && want.iter().all(|(k, v)| c.labels.get(k) == Some(v)))
            .map(|c| c.clinic_id.clone())
            .collect()
    } else {
        match &registry {
            Some(r) => r
                .clinics()
                .values()
                .filter(|c| !c.revoked)
                .map(|c| c.clinic_id.clone())
                .collect(),
            None => match call(state.store.clinics()).await {
                Ok(rs) => rs.into_iter().map(|r| r.clinic_id).collect(),
                Err(resp) => return Err(Box::new(resp)),
            },
        }
    };
    if chosen_clinics.is_empty() {
        return Err(Box::new(error(
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("labels"),
            "no clinic matches",
        )));
    }
    Ok(chosen_clinics)
}

/// `GET /v1/update-batches/{id}`: how many of a fan-out's updates are in each status.
pub(super) async fn get_batch(
    state: web::Data<GatewayState>,
    id: web::Path<String>,
) -> HttpResponse {
    let batch_id = id.into_inner();
    let counts = match call(state.store.batch_counts(&batch_id)).await {
        Ok(c) => c,
        Err(resp) => return resp,
    };
    if counts.is_empty() {
        return error(
            StatusCode::NOT_FOUND,
            Some("id"),
            format!("no batch `{}`", log_value(&batch_id, 64)),
        );
    }
    let total: u64 = counts.iter().map(|(_, n)| n).sum();
    let by_status: BTreeMap<String, u64> = counts.into_iter().collect();
    HttpResponse::Ok().json(json!({ "batch_id": batch_id, "total": total, "by_status": by_status }))
}

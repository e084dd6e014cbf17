//! Fleet monitoring: `GET /metrics` (Prometheus), `GET /v1/stream/lifecycle` (SSE of clinic
//! lifecycle events for the Web API), `GET /v1/stream/fleet` (SSE of clinic tiles for the
//! dashboard) and the dashboard page itself at `/`. The streams and metrics sit behind the
//! admin `read` token like the rest of the REST API; the page carries no data of its own.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix_web::{web, HttpResponse};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tether_actors::registry::{ClinicLive, Snapshot, Subscribe};

use super::api::{call, NodeView};
use super::store::ClinicRecord;
use super::GatewayState;

/// The dashboard: one static page, no build step, no external assets.
const DASHBOARD: &str = include_str!("dashboard.html");

/// Background tasks that say they are alive: `/readyz` fails while one has been silent for
/// longer than it said it may be.
#[derive(Clone, Default)]
pub struct Liveness(Arc<Mutex<BTreeMap<String, TaskClock>>>);

/// When a task last beat (ms since the epoch), and how long it may stay silent.
type TaskClock = (Arc<AtomicU64>, Duration);

/// A task's side of [`Liveness`]: call `beat` at least every `stale_after`.
#[derive(Clone)]
pub struct Beat(Arc<AtomicU64>);

impl Beat {
    pub fn beat(&self) {
        self.0.store(
            crate::security::unix_now_ms(),
            std::sync::atomic::Ordering::Relaxed,
        );
    }
}

impl Liveness {
    pub fn register(&self, name: &str, stale_after: Duration) -> Beat {
        let at = Arc::new(AtomicU64::new(crate::security::unix_now_ms()));
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_string(), (at.clone(), stale_after));
        Beat(at)
    }

    /// The tasks silent for too long, with how long (ms).
    pub fn stale(&self) -> Vec<(String, u64)> {
        let now = crate::security::unix_now_ms();
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter_map(|(name, (at, limit))| {
                let silent = now.saturating_sub(at.load(std::sync::atomic::Ordering::Relaxed));
                (silent > limit.as_millis() as u64).then(|| (name.clone(), silent))
            })
            .collect()
    }
}

/// A comment line every so often keeps proxies from closing an idle stream.
const KEEPALIVE: Duration = Duration::from_secs(15);

pub(super) async fn dashboard() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/html; charset=utf-8")
        .insert_header(("cache-control", "no-store"))
        .insert_header((
            "content-security-policy",
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src data:",
        ))
        .body(DASHBOARD)
}

async fn live_and_records(
    state: &GatewayState,
) -> Result<(Vec<ClinicLive>, Vec<ClinicRecord>), HttpResponse> {
    let records = call(state.store.clinics()).await?;
    let live = state.registry.send(Snapshot).await.unwrap_or_default();
    Ok((live, records))
}

pub(super) async fn metrics(state: web::Data<GatewayState>) -> HttpResponse {
    // Flagged events since the last scrape (O(new ones), through a partial index); a store
    // that does not answer leaves the count where it was.
    let (_, from) = state.metrics.flagged_position();
    if let Ok((found, through)) = state.store.flagged_since(from).await {
        state.metrics.count_flagged(from, found, through);
    }
    match live_and_records(&state).await {
        Ok((live, records)) => {
            let mut text = state
                .metrics
                .render(&live, &records, crate::security::unix_now_ms());
            text.push_str(&webhook_metrics(&state));
            text.push_str(&state.channels.metrics_text());
            HttpResponse::Ok()
                .content_type("text/plain; version=0.0.4; charset=utf-8")
                .body(text)
        }
        Err(resp) => resp,
    }
}

fn webhook_metrics(state: &GatewayState) -> String {
    use std::fmt::Write as _;
    use std::sync::atomic::Ordering::Relaxed;
    let mut out = String::new();
    let families: [(&str, &str, &str); 4] = [
        (
            "tether_gateway_webhook_deliveries_total",
            "counter",
            "Events delivered (2xx) per webhook.",
        ),
        (
            "tether_gateway_webhook_failures_total",
            "counter",
            "Failed delivery attempts per webhook.",
        ),
        (
            "tether_gateway_webhook_dead_lettered_total",
            "counter",
            "Events moved to the dead-letter list after max_attempts.",
        ),
        (
            "tether_gateway_webhook_last_event_id",
            "gauge",
            "The last event id the webhook's dispatcher has passed.",
        ),
    ];
    for (i, (name, kind, help)) in families.iter().enumerate() {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (s, st) in &state.webhooks.endpoints {
            let v = match i {
                0 => st.delivered.load(Relaxed),
                1 => st.failures.load(Relaxed),
                2 => st.dead_lettered.load(Relaxed),
                _ => st.last_event_id.load(Relaxed),
            };
            let _ = writeln!(out, "{name}{{webhook=\"{}\"}} {v}", s.name);
        }
    }
    out
}

fn sse(event: &str, id: Option<u64>, data: &impl Serialize) -> Bytes {
    let json = serde_json::to_string(data).unwrap_or_else(|_| "null".into());
    let id = id.map(|i| format!("id: {i}\n")).unwrap_or_default();
    Bytes::from(format!("{id}event: {event}\ndata: {json}\n\n"))
}

fn stream_response(
    body: impl futures_util::Stream<Item = Result<Bytes, actix_web::Error>> + 'static,
) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header(("cache-control", "no-store"))
        .insert_header(("x-accel-buffering", "no"))
        .streaming(body)
}

/// `GET /v1/stream/lifecycle`: `connected`, `disconnected`, `evicted`, `offline`, `lagging`,
/// `caught_up` events as they happen (from the moment of subscribing).
pub(super) async fn lifecycle(state: web::Data<GatewayState>) -> HttpResponse {
    let Ok(rx) = state.registry.send(Subscribe).await else {
        return HttpResponse::ServiceUnavailable().finish();
    };
    let body = futures_util::stream::unfold(rx, |mut rx| async move {
        let next = tokio::time::timeout(KEEPALIVE, rx.recv()).await;
        let chunk = match next {
            Err(_) => Bytes::from_static(b": keep-alive\n\n"),
            Ok(Ok(ev)) => sse(ev.kind, Some(ev.id), &ev),
            Ok(Err(tokio::sync::broadcast::error::RecvError::Lagged(n))) => {
                sse("missed", None, &serde_json::json!({"events": n}))
            }
            Ok(Err(tokio::sync::broadcast::error::RecvError::Closed)) => return None,
        };
        Some((Ok::<_, actix_web::Error>(chunk), rx))
    });
    stream_response(body)
}

/// One dashboard tile.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Tile {
    pub clinic_id: String,
    pub state: &'static str,
    pub transport: Option<String>,
    pub acked_seq: u64,
    pub lag_events: u64,
    /// Age of the clinic's oldest unacknowledged change (0: caught up).
    pub lag_ms: Option<u64>,
    pub lagging: bool,
    pub backlog_updates: u64,
    /// Cloud updates the clinic answered `failed` (all time).
    pub failed_updates: u64,
    /// Events stored with a schema problem (all time; listed by `GET /v1/events?flagged=true`).
    pub flagged_events: u64,
    /// The agent's version (its last `hello` to this node).
    pub agent_version: Option<String>,
    pub last_heartbeat_ms: Option<u64>,
    pub sessions_total: u64,
    pub evictions: u64,
    pub agent_restarts: u64,
    pub last_close: Option<String>,
    /// When the link was lost (a clinic not connected), for "offline 12m" on its tile.
    pub disconnected_at_ms: Option<u64>,
    /// The newest stored event's commit time (RFC 3339), from the store.
    pub last_event_at: Option<String>,
    /// The gateway node holding the clinic's session (this one, or another live one).
    pub node: Option<String>,
    /// Why the clinic is refused (state `refused`): `duplicate_source`.
    pub refused: Option<String>,
}

/// The tiles of every clinic: live from this node's sessions; a clinic whose session is on
/// another live node is `connected` there (its counters from the store).
fn tiles(live: Vec<ClinicLive>, records: &[ClinicRecord], nodes: &NodeView) -> Vec<Tile> {
    let by_id: HashMap<&str, &ClinicRecord> =
        records.iter().map(|r| (r.clinic_id.as_str(), r)).collect();
    let mut seen: Vec<Tile> = live
        .into_iter()
        .map(|l| {
            let r = by_id.get(l.clinic_id.as_str()).copied();
            let elsewhere = if l.connected {
                None
            } else {
                nodes.elsewhere(r)
            };
            let node = match (l.connected, elsewhere) {
                (true, _) => Some(nodes.me.clone()),
                (false, e) => e.map(str::to_string),
            };
            Tile {
                backlog_updates: r.map_or(0, |r| r.pending_updates),
                failed_updates: r.map_or(0, |r| r.failed_updates),
                flagged_events: r.map_or(0, |r| r.flagged_events),
                agent_version: l.agent_version,
                node,
                clinic_id: l.clinic_id,
                state: if elsewhere.is_some() {
                    "connected"
                } else if !l.connected && l.refused.is_some() {
                    "refused"
                } else {
                    l.state
                },
                transport: l.transport,
                acked_seq: l.acked_seq,
                lag_events: l.lag_events,
                lag_ms: l.lag_ms,
                lagging: l.lagging,
                last_heartbeat_ms: l.last_heartbeat_ms,
                sessions_total: l.sessions_total,
                evictions: l.evictions,
                agent_restarts: l.agent_restarts,
                last_close: l.last_close,
                disconnected_at_ms: if l.connected {
                    None
                } else {
                    l.disconnected_at_ms
                },
                last_event_at: r.and_then(|r| r.last_event_at.clone()),
                refused: l.refused,
            }
        })
        .collect();
    // Clinics the store knows that have not connected to this node since it started.
    for r in records {
        if !seen.iter().any(|t| t.clinic_id == r.clinic_id) {
            let elsewhere = nodes.elsewhere(Some(r));
            seen.push(Tile {
                clinic_id: r.clinic_id.clone(),
                state: if elsewhere.is_some() {
                    "connected"
                } else {
                    "offline"
                },
                node: elsewhere.map(str::to_string),
                transport: None,
                acked_seq: r.acked_seq,
                lag_events: 0,
                lag_ms: None,
                lagging: false,
                backlog_updates: r.pending_updates,
                failed_updates: r.failed_updates,
                flagged_events: r.flagged_events,
                agent_version: None,
                last_heartbeat_ms: None,
                sessions_total: 0,
                evictions: 0,
                agent_restarts: 0,
                last_close: None,
                disconnected_at_ms: None,
                last_event_at: r.last_event_at.clone(),
                refused: None,
            });
        }
    }
    seen.sort_by(|a, b| a.clinic_id.cmp(&b.clinic_id));
    seen
}

#[derive(Deserialize)]
pub struct FleetQuery {
    interval_ms: Option<u64>,
}

struct FleetStream {
    state: web::Data<GatewayState>,
    sent: HashMap<String, Tile>,
    interval: Duration,
    first: bool,
}

/// `GET /v1/stream/fleet?interval_ms=1000`: a `snapshot` of every tile, then every interval a
/// `tiles` event with the tiles that changed (`now_ms` included for ages).
pub(super) async fn fleet(
    state: web::Data<GatewayState>,
    q: web::Query<FleetQuery>,
) -> HttpResponse {
    let interval = Duration::from_millis(q.interval_ms.unwrap_or(1000).clamp(100, 10_000));
    let st = FleetStream {
        state,
        sent: HashMap::new(),
        interval,
        first: true,
    };
    let body = futures_util::stream::unfold(st, |mut st| async move {
        if !st.first {
            tokio::time::sleep(st.interval).await;
        }
        let (live, records) = match live_and_records(&st.state).await {
            Ok(v) => v,
            Err(_) => {
                let chunk = sse(
                    "error",
                    None,
                    &serde_json::json!({"message": "store unavailable"}),
                );
                return Some((Ok::<_, actix_web::Error>(chunk), st));
            }
        };
        let nodes = NodeView::load(&st.state).await;
        let all = tiles(live, &records, &nodes);
        let changed: Vec<&Tile> = all
            .iter()
            .filter(|t| st.sent.get(&t.clinic_id) != Some(*t))
            .collect();
        let kind = if st.first { "snapshot" } else { "tiles" };
        let chunk = sse(
            kind,
            None,
            &serde_json::json!({"now_ms": crate::security::unix_now_ms(), "tiles": changed}),
        );
        for t in all {
            st.sent.insert(t.clinic_id.clone(), t);
        }
        st.first = false;
        Some((Ok(chunk), st))
    });
    stream_response(body)
}

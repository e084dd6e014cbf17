//! Fleet monitoring over real connections: the Prometheus exposition at `/metrics`, the SSE
//! lifecycle stream (connected, disconnected, offline, evicted, lagging), the dashboard page,
//! and that all of it needs the admin token where tokens are configured.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use awc::ws;
use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tether::fleet::Fleet;

const HB: Duration = Duration::from_millis(500);

/// `name{labels}` → value, from the text exposition; checks every sample has HELP and TYPE.
fn parse_metrics(text: &str) -> HashMap<String, f64> {
    let mut typed = std::collections::HashSet::new();
    let mut helped = std::collections::HashSet::new();
    let mut out = HashMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut it = rest.split(' ');
            typed.insert(it.next().expect("name").to_string());
            let kind = it.next().expect("type");
            assert!(
                ["counter", "gauge", "histogram"].contains(&kind),
                "type {kind}"
            );
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            helped.insert(rest.split(' ').next().expect("name").to_string());
            continue;
        }
        if line.is_empty() {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("sample: series value");
        let v: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("value in {line:?}"));
        let name = series.split('{').next().expect("name");
        assert!(
            name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "metric name {name:?}"
        );
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s).filter(|f| typed.contains(*f)))
            .unwrap_or(name);
        assert!(typed.contains(family), "no TYPE for {family}");
        assert!(helped.contains(family), "no HELP for {family}");
        out.insert(series.to_string(), v);
    }
    out
}

async fn get_text(fleet: &Fleet, path: &str, token: bool) -> (u16, String) {
    let client = fleet.rest_client().expect("client");
    let mut req = client.get(format!("{}{path}", fleet.http_url()));
    if token {
        req = fleet.authorize(req);
    }
    let mut resp = req.send().await.expect("request");
    let body = resp.body().limit(8 << 20).await.expect("body");
    (
        resp.status().as_u16(),
        String::from_utf8_lossy(&body).to_string(),
    )
}

#[actix_rt::test]
async fn metrics_report_connections_lag_ingest_latency_and_auth_failures() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut fleet = Fleet::new(dir.path(), 2, HB).expect("fleet");
    fleet.start_agents().await.expect("agents");
    let mut written = 0;
    for c in &fleet.clinics {
        write_activity(&c.db, 50);
        written += Fleet::outbox_head(&c.db).expect("head");
    }
    wait_drained(&fleet, Duration::from_secs(30)).await;
    // One connection attempt with a forged token (the fallback's open, same checks).
    let client = fleet.rest_client().expect("client");
    let resp = client
        .post(format!("{}/v1/http/open", fleet.http_url()))
        .bearer_auth("not-a-token")
        .send()
        .await
        .expect("open");
    assert_eq!(resp.status().as_u16(), 401);

    let (status, _) = get_text(&fleet, "/metrics", false).await;
    assert_eq!(status, 401, "metrics need the admin token");
    let (status, text) = get_text(&fleet, "/metrics", true).await;
    assert_eq!(status, 200, "{text}");
    let m = parse_metrics(&text);
    let get = |k: &str| *m.get(k).unwrap_or_else(|| panic!("{k} missing in\n{text}"));
    assert_eq!(
        get("tether_gateway_connections{transport=\"websocket\"}"),
        2.0
    );
    assert_eq!(get("tether_gateway_connections{transport=\"http\"}"), 0.0);
    for c in &fleet.clinics {
        assert_eq!(
            get(&format!("tether_clinic_connected{{clinic=\"{}\"}}", c.id)),
            1.0
        );
        assert_eq!(
            get(&format!("tether_clinic_lag_events{{clinic=\"{}\"}}", c.id)),
            0.0
        );
        let head = Fleet::outbox_head(&c.db).expect("head") as f64;
        assert_eq!(
            get(&format!("tether_clinic_acked_seq{{clinic=\"{}\"}}", c.id)),
            head
        );
        assert!(get(&format!("tether_clinic_lag_seconds{{clinic=\"{}\"}}", c.id)) >= 0.0);
        assert_eq!(
            get(&format!(
                "tether_clinic_info{{clinic=\"{}\",state=\"connected\",transport=\"websocket\"}}",
                c.id
            )),
            1.0
        );
    }
    assert_eq!(get("tether_gateway_events_ingested_total"), written as f64);
    let batches = get("tether_gateway_batches_stored_total");
    assert!(batches >= 1.0);
    assert_eq!(get("tether_gateway_ack_latency_seconds_count"), batches);
    assert_eq!(
        get("tether_gateway_ack_latency_seconds_bucket{le=\"+Inf\"}"),
        batches
    );
    assert_eq!(get("tether_gateway_auth_failures_total"), 1.0);
    assert_eq!(get("tether_gateway_sessions_opened_total"), 2.0);
    fleet.stop().await;
}

/// Reads `event:`/`data:` blocks from an SSE response.
struct Sse<S> {
    body: S,
    buf: String,
    /// Parsed events not asked for yet, in arrival order.
    seen: Vec<(String, Value)>,
}

impl<S> Sse<S>
where
    S: futures_util::Stream<Item = Result<bytes::Bytes, awc::error::PayloadError>> + Unpin,
{
    /// The next event of `kind` for `clinic` (others are skipped), within `limit`.
    async fn expect(&mut self, kind: &str, clinic: &str, limit: Duration) -> Value {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(i) = self
                .seen
                .iter()
                .position(|(k, v)| k == kind && v["clinic_id"] == clinic)
            {
                return self.seen.remove(i).1;
            }
            while let Some(i) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..i + 2).collect();
                let mut event = "";
                let mut data = String::new();
                for line in block.lines() {
                    if let Some(e) = line.strip_prefix("event: ") {
                        event = e;
                    } else if let Some(d) = line.strip_prefix("data: ") {
                        data.push_str(d);
                    }
                }
                if !event.is_empty() {
                    let v: Value = serde_json::from_str(&data).expect("event json");
                    self.seen.push((event.to_string(), v));
                }
            }
            if self
                .seen
                .iter()
                .any(|(k, v)| k == kind && v["clinic_id"] == clinic)
            {
                continue;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.body.next()).await {
                Ok(Some(Ok(chunk))) => self.buf.push_str(&String::from_utf8_lossy(&chunk)),
                Ok(other) => panic!("stream ended waiting for {kind} of {clinic}: {other:?}"),
                Err(_) => panic!("no {kind} for {clinic} within {limit:?}"),
            }
        }
    }
}

#[actix_rt::test]
async fn lifecycle_stream_reports_connects_disconnects_offline_evictions_and_lag() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut fleet = Fleet::insecure(dir.path(), 2, HB).expect("fleet");
    let resp = client()
        .get(format!("{}/v1/stream/lifecycle", fleet.http_url()))
        .send()
        .await
        .expect("stream");
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(
        resp.headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("text/event-stream")
    );
    let mut sse = Sse {
        body: resp,
        buf: String::new(),
        seen: Vec::new(),
    };
    fleet.start_agents().await.expect("agents");
    let (a, b) = (fleet.clinics[0].id.clone(), fleet.clinics[1].id.clone());
    let limit = Duration::from_secs(10);
    let ev = sse.expect("connected", &a, limit).await;
    assert_eq!(ev["detail"], "transport=websocket");
    sse.expect("connected", &b, limit).await;

    // A clinic whose link drops: disconnected, then offline three heartbeats later.
    let t0 = Instant::now();
    fleet.clinics[0].agent.take().expect("agent").stop();
    sse.expect("disconnected", &a, limit).await;
    sse.expect("offline", &a, limit).await;
    assert!(
        t0.elapsed() >= HB * 3 - Duration::from_millis(100),
        "{:?}",
        t0.elapsed()
    );

    // A clinic that says goodbye (graceful stop): offline at once.
    let report = fleet.clinics[1]
        .agent
        .as_ref()
        .expect("agent")
        .handle
        .drain(Duration::from_secs(5))
        .await;
    assert!(report.clean(), "{report:?}");
    let gone = sse.expect("disconnected", &b, limit).await;
    assert!(
        gone["detail"].as_str().unwrap_or("").starts_with("1001"),
        "{gone}"
    );
    let off = sse.expect("offline", &b, limit).await;
    assert_eq!(off["detail"], "agent stopped");

    // A client far behind its outbox is lagging; one that goes silent is evicted.
    let url = fleet.gateway.as_ref().expect("gateway").ws_url();
    let (_, mut ws) = client().ws(url).connect().await.expect("ws");
    let hello = json!({"v": 1, "type": "hello", "clinic_id": "clinic-raw", "agent_version": "t", "last_acked_seq": 0, "source_id": 1, "restarts": 3});
    ws.send(ws::Message::Text(hello.to_string().into()))
        .await
        .expect("hello");
    sse.expect("connected", "clinic-raw", limit).await;
    let events = json!({"v": 1, "type": "events", "prev_seq": 0, "head_seq": 50_000, "events": [
        {"seq": 1, "entity": "patient", "op": "insert", "key": {"id": 1}, "row": {"id": 1, "name": "x"}, "committed_at": "2026-11-28T00:00:00Z"}]});
    ws.send(ws::Message::Text(events.to_string().into()))
        .await
        .expect("events");
    let lag = sse.expect("lagging", "clinic-raw", limit).await;
    let (_, view) = get_json(&format!("{}/v1/clinics/clinic-raw", fleet.http_url())).await;
    assert_eq!(view["agent_restarts"], 3, "{view}");
    assert_eq!(view["lag_events"], 49_999, "{view}");
    assert!(
        lag["detail"]
            .as_str()
            .unwrap_or("")
            .contains("lag_events=49999"),
        "{lag}"
    );
    assert_eq!(view["agent_version"], "t", "{view}");
    // Behind, and the agent did not say when its oldest waiting change was committed.
    assert_eq!(view["lag_ms"], Value::Null, "{view}");
    // The next batch says it: the first change read after it was committed days ago (the
    // clinic is still lagging, now by age); then everything read is acknowledged.
    let events = json!({"v": 1, "type": "events", "prev_seq": 1, "head_seq": 3, "next_committed_at": "2026-11-28T00:00:02Z", "events": [
        {"seq": 2, "entity": "patient", "op": "insert", "key": {"id": 2}, "row": {"id": 2, "name": "y"}, "committed_at": "2026-11-28T00:00:01Z"}]});
    ws.send(ws::Message::Text(events.to_string().into()))
        .await
        .expect("events");
    let url = format!("{}/v1/clinics/clinic-raw", fleet.http_url());
    wait_until("the second batch acknowledged", limit, || async {
        get_json(&url).await.1["lag_events"] == 1
    })
    .await;
    let (_, view) = get_json(&url).await;
    let lag_ms = view["lag_ms"].as_u64().unwrap_or(0);
    assert!(
        lag_ms > 3_600_000,
        "the oldest unacknowledged change is days old: {view}"
    );
    assert_eq!(view["state"], "connected", "{view}");
    let events = json!({"v": 1, "type": "events", "prev_seq": 2, "head_seq": 3, "events": [
        {"seq": 3, "entity": "patient", "op": "insert", "key": {"id": 3}, "row": {"id": 3, "name": "z"}, "committed_at": "2026-11-28T00:00:02Z"}]});
    ws.send(ws::Message::Text(events.to_string().into()))
        .await
        .expect("events");
    sse.expect("caught_up", "clinic-raw", limit).await;
    let (_, view) = get_json(&format!("{}/v1/clinics/clinic-raw", fleet.http_url())).await;
    assert_eq!(
        (&view["lag_events"], &view["lag_ms"]),
        (&json!(0), &json!(0)),
        "{view}"
    );
    // Silence: no pongs, no frames. The socket stays open on our side.
    let t0 = Instant::now();
    sse.expect("evicted", "clinic-raw", limit).await;
    assert!(t0.elapsed() <= HB * 5, "evicted after {:?}", t0.elapsed());
    drop(ws);
    fleet.stop().await;
}

#[actix_rt::test]
async fn the_dashboard_page_is_served_and_its_stream_needs_the_admin_token() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut fleet = Fleet::new(dir.path(), 1, HB).expect("fleet");
    fleet.start_agents().await.expect("agents");
    let (status, page) = get_text(&fleet, "/", false).await;
    assert_eq!(status, 200);
    assert!(page.contains("Tether fleet") && page.contains("/v1/stream/fleet"));
    let (status, _) = get_text(&fleet, "/v1/stream/lifecycle", false).await;
    assert_eq!(status, 401);
    let client = fleet.rest_client().expect("client");
    let resp = fleet
        .authorize(client.get(format!(
            "{}/v1/stream/fleet?interval_ms=100",
            fleet.http_url()
        )))
        .send()
        .await
        .expect("fleet stream");
    assert_eq!(resp.status().as_u16(), 200);
    let mut body = resp;
    let mut text = String::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !text.contains("\"state\":\"connected\"") {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, body.next()).await {
            Ok(Some(Ok(chunk))) => text.push_str(&String::from_utf8_lossy(&chunk)),
            other => panic!("no connected tile: {other:?} {text}"),
        }
    }
    assert!(text.starts_with("event: snapshot\n"), "{text}");
    fleet.stop().await;
}

#[actix_rt::test]
async fn a_clinic_behind_shows_the_age_of_its_oldest_unacknowledged_change_then_zero() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut fleet = Fleet::new(dir.path(), 1, HB).expect("fleet");
    // Small batches, one at a time: the agent stays behind for a few hundred round trips.
    let c = &mut fleet.clinics[0];
    c.config.outbox.batch_max_events = 10;
    c.config.outbox.max_inflight_batches = 1;
    let written = write_activity(&c.db, 1_500);
    assert!(written > 1_000, "{written}");
    let url = format!("{}/v1/clinics/{}", fleet.http_url(), fleet.clinics[0].id);
    fleet.start_agents().await.expect("agents");
    // While behind, the lag has a time: the agent said when its oldest waiting change was
    // committed (`next_committed_at`); without it the gateway could not know (null).
    let deadline = Instant::now() + Duration::from_secs(60);
    let behind = loop {
        let (_, v) = get_as(Some(&fleet), &url).await;
        if v["lag_events"].as_u64().unwrap_or(0) > 0 && v["lag_ms"].is_u64() {
            break v;
        }
        assert!(
            Instant::now() < deadline,
            "never seen behind with a lag time: {v}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    // Written just now on this machine's clock: seconds old, not hours.
    let lag_ms = behind["lag_ms"].as_u64().unwrap_or(u64::MAX);
    assert!(lag_ms < 120_000, "{behind}");
    wait_drained(&fleet, Duration::from_secs(60)).await;
    wait_until("the lag back to zero", Duration::from_secs(10), || async {
        let (_, v) = get_as(Some(&fleet), &url).await;
        v["lag_events"] == 0 && v["lag_ms"] == 0
    })
    .await;
    fleet.stop().await;
}

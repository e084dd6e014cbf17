//! The gateway against raw WebSocket clients and bad REST requests: every bad input gets an
//! answer naming what is wrong, nothing panics, and session rules hold (hello first, one
//! session per clinic, silent sessions evicted, gaps refused).

mod common;

use std::path::Path;
use std::time::Duration;

use awc::ws::{self, Frame};
use common::ws::{close_code, event, hello, next_json, send, Ws};
use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tether::gateway::{self, GatewayHandle, GatewaySecurity};

fn start(dir: &Path, heartbeat: Duration) -> GatewayHandle {
    gateway::start(
        gateway_settings(dir, heartbeat),
        GatewaySecurity::insecure(),
    )
    .expect("gateway")
}

async fn connect(gw: &GatewayHandle) -> Ws {
    common::ws::connect(&gw.ws_url()).await
}

#[actix_rt::test]
async fn bad_frames_are_answered_with_errors_naming_the_field_and_the_session_survives() {
    let dir = tempfile::tempdir().expect("tempdir");
    let gw = start(dir.path(), Duration::from_secs(5));
    let mut ws = connect(&gw).await;
    send(&mut ws, hello("clinic-a")).await;
    let w = next_json(&mut ws).await.expect("welcome");
    assert_eq!(w["type"], "welcome");
    assert_eq!(w["acked_seq"], 0);

    let cases = [
        (
            json!({"v": 1, "type": "teleport"}),
            "unknown_type",
            Some("type"),
        ),
        (
            json!({"v": 9, "type": "ack", "seq": 1}),
            "unsupported_version",
            Some("v"),
        ),
        (
            json!({"v": 1, "type": "events", "prev_seq": 0, "events": [event(1), {"seq": "x"}]}),
            "bad_frame",
            Some("events[1].seq"),
        ),
        (
            json!({"v": 1, "type": "events", "prev_seq": 0, "events": [event(2), event(1)]}),
            "bad_frame",
            Some("events[1].seq"),
        ),
        (
            json!({"v": 1, "type": "update_result", "update_id": "u", "status": "maybe"}),
            "bad_frame",
            Some("status"),
        ),
        (
            json!({"v": 1, "type": "ack", "seq": 3}),
            "unexpected_message",
            Some("type"),
        ),
    ];
    for (frame, code, field) in cases {
        send(&mut ws, frame.clone()).await;
        let e = next_json(&mut ws).await.expect("error frame");
        assert_eq!(e["type"], "error", "{frame}");
        assert_eq!(e["code"], code, "{frame} -> {e}");
        assert_eq!(e["field"].as_str(), field, "{frame} -> {e}");
    }
    ws.send(ws::Message::Text("not json".into()))
        .await
        .expect("send");
    let e = next_json(&mut ws).await.expect("error frame");
    assert_eq!(e["code"], "bad_frame");

    // Still usable: a good batch is stored and acknowledged.
    send(
        &mut ws,
        json!({"v": 1, "type": "events", "prev_seq": 0, "events": [event(1), event(2)]}),
    )
    .await;
    let a = next_json(&mut ws).await.expect("ack");
    assert_eq!(a, json!({"v": 1, "type": "ack", "seq": 2}));
    // The same batch again: acknowledged, not stored twice.
    send(
        &mut ws,
        json!({"v": 1, "type": "events", "prev_seq": 0, "events": [event(1), event(2)]}),
    )
    .await;
    assert_eq!(next_json(&mut ws).await.expect("ack")["seq"], 2);
    assert_eq!(
        tether::gateway::store::wait(gw.store.events_page(Some("clinic-a"), 0, 100))
            .expect("page")
            .len(),
        2
    );
    gw.stop().await;
}

#[actix_rt::test]
async fn a_row_violating_its_entity_schema_is_stored_flagged_not_dropped() {
    let dir = tempfile::tempdir().expect("tempdir");
    let gw = start(dir.path(), Duration::from_secs(5));
    let mut ws = connect(&gw).await;
    send(&mut ws, hello("clinic-s")).await;
    next_json(&mut ws).await.expect("welcome");
    let mut bad = event(1);
    bad["row"] = json!({"id": 1, "name": ""});
    // A column added to the clinic's table that the entity schema does not declare (the
    // sample schemas say `additionalProperties: false`): stored, and reported by name.
    let mut added = event(3);
    added["row"]["colour"] = json!("red");
    send(
        &mut ws,
        json!({"v": 1, "type": "events", "prev_seq": 0, "events": [bad, event(2), added]}),
    )
    .await;
    assert_eq!(next_json(&mut ws).await.expect("ack")["seq"], 3);
    let page =
        tether::gateway::store::wait(gw.store.events_page(Some("clinic-s"), 0, 10)).expect("page");
    assert_eq!(page.len(), 3);
    let problem = page[0].problem.as_deref().expect("flagged");
    assert!(problem.contains("/name"), "{problem}");
    assert!(page[1].problem.is_none());
    let problem = page[2].problem.as_deref().expect("flagged");
    assert!(
        problem.contains("has fields the schema does not allow: colour"),
        "{problem}"
    );
    assert_eq!(page[2].row.as_ref().expect("row")["colour"], "red", "kept");
    // Listed through REST on their own, and counted in /metrics.
    let base = gw.http_url();
    let (status, v) = get_json(&format!("{base}/v1/events?flagged=true")).await;
    assert_eq!(status, 200, "{v}");
    let listed = v["events"].as_array().expect("events");
    assert_eq!(listed.len(), 2, "{v}");
    assert_eq!(
        (&listed[0]["seq"], &listed[1]["seq"]),
        (&json!(1), &json!(3))
    );
    let (status, v) = get_json(&format!("{base}/v1/events?flagged=maybe")).await;
    assert_eq!(status, 400, "{v}");
    assert!(v.to_string().contains("flagged"), "{v}");
    let metrics = common::client()
        .get(format!("{base}/metrics"))
        .send()
        .await
        .expect("metrics")
        .body()
        .await
        .expect("body");
    let metrics = String::from_utf8_lossy(&metrics);
    assert!(
        metrics.contains("\ntether_gateway_events_flagged_total 2\n"),
        "{metrics}"
    );
    gw.stop().await;
}

#[actix_rt::test]
async fn oversized_frame_closes_with_1009_and_events_before_hello_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let gw = start(dir.path(), Duration::from_secs(5));
    let mut ws = connect(&gw).await;
    send(&mut ws, hello("clinic-b")).await;
    next_json(&mut ws).await.expect("welcome");
    let big = "x".repeat(100 * 1024);
    send(
        &mut ws,
        json!({"v": 1, "type": "ack", "seq": 1, "pad": big}),
    )
    .await;
    assert_eq!(close_code(&mut ws).await, Some(1009));

    let mut ws = connect(&gw).await;
    send(
        &mut ws,
        json!({"v": 1, "type": "events", "prev_seq": 0, "events": [event(1)]}),
    )
    .await;
    let e = next_json(&mut ws).await.expect("error");
    assert_eq!(e["code"], "unexpected_message");
    assert_eq!(close_code(&mut ws).await, Some(1008));
    assert!(
        tether::gateway::store::wait(gw.store.events_page(None, 0, 10))
            .expect("page")
            .is_empty()
    );
    gw.stop().await;
}

#[actix_rt::test]
async fn a_batch_after_a_gap_is_refused_and_nothing_is_stored() {
    let dir = tempfile::tempdir().expect("tempdir");
    let gw = start(dir.path(), Duration::from_secs(5));
    let mut ws = connect(&gw).await;
    send(&mut ws, hello("clinic-g")).await;
    next_json(&mut ws).await.expect("welcome");
    send(
        &mut ws,
        json!({"v": 1, "type": "events", "prev_seq": 5, "events": [event(6)]}),
    )
    .await;
    let e = next_json(&mut ws).await.expect("error");
    assert_eq!(e["code"], "gap");
    assert_eq!(e["field"], "prev_seq");
    assert!(
        tether::gateway::store::wait(gw.store.events_page(None, 0, 10))
            .expect("page")
            .is_empty()
    );
    gw.stop().await;
}

#[actix_rt::test]
async fn second_connection_replaces_the_first_with_close_code_4001() {
    let dir = tempfile::tempdir().expect("tempdir");
    let gw = start(dir.path(), Duration::from_secs(5));
    let mut first = connect(&gw).await;
    send(&mut first, hello("clinic-r")).await;
    next_json(&mut first).await.expect("welcome");
    let mut second = connect(&gw).await;
    send(&mut second, hello("clinic-r")).await;
    next_json(&mut second).await.expect("welcome");
    assert_eq!(close_code(&mut first).await, Some(4001));
    let (_, c) = get_json(&format!("{}/v1/clinics/clinic-r", gw.http_url())).await;
    assert_eq!(c["connected"], true, "{c}");
    assert_eq!(c["sessions_total"], 2, "{c}");
    gw.stop().await;
}

#[actix_rt::test]
async fn silent_session_is_evicted_within_three_heartbeats() {
    let dir = tempfile::tempdir().expect("tempdir");
    let hb = Duration::from_millis(200);
    let gw = start(dir.path(), hb);
    let mut ws = connect(&gw).await;
    send(&mut ws, hello("clinic-quiet")).await;
    // Read the welcome but never answer the gateway's pings.
    let started = std::time::Instant::now();
    let mut closed = None;
    while let Ok(Some(Ok(frame))) = tokio::time::timeout(Duration::from_secs(3), ws.next()).await {
        if let Frame::Close(r) = frame {
            closed = r.map(|r| u16::from(r.code));
            break;
        }
    }
    assert_eq!(closed, Some(1001), "evicted with 'going away'");
    assert!(
        started.elapsed() < hb * 6,
        "evicted after {:?}",
        started.elapsed()
    );
    let url = format!("{}/v1/clinics/clinic-quiet", gw.http_url());
    wait_until(
        "the registry to show the clinic offline",
        Duration::from_secs(2),
        || {
            let url = url.clone();
            async move { get_json(&url).await.1["connected"] == false }
        },
    )
    .await;
    gw.stop().await;
}

#[actix_rt::test]
async fn rest_errors_name_the_field_and_events_paginate_by_cursor() {
    let dir = tempfile::tempdir().expect("tempdir");
    let gw = start(dir.path(), Duration::from_secs(5));
    let base = gw.http_url();
    let mut ws = connect(&gw).await;
    send(&mut ws, hello("clinic-p")).await;
    next_json(&mut ws).await.expect("welcome");
    let events: Vec<Value> = (1..=25).map(event).collect();
    send(
        &mut ws,
        json!({"v": 1, "type": "events", "prev_seq": 0, "events": events}),
    )
    .await;
    assert_eq!(next_json(&mut ws).await.expect("ack")["seq"], 25);

    let cases = [
        ("/v1/events?limit=0", "limit"),
        ("/v1/events?limit=abc", "limit"),
        ("/v1/events?after=-1", "after"),
        ("/v1/events?clinic=x", "clinic"),
        ("/v1/events?clinic_id=a%20b", "clinic_id"),
    ];
    for (path, field) in cases {
        let (status, v) = get_json(&format!("{base}{path}")).await;
        assert_eq!(status, 400, "{path}");
        assert_eq!(v["field"], field, "{path}: {v}");
    }
    let posts = [
        (
            json!({"entity": "patient", "op": "upsert", "key": {"id": 1}}),
            "row",
        ),
        (
            json!({"entity": "patient", "op": "merge", "key": {"id": 1}, "row": {}}),
            "op",
        ),
        (
            json!({"entity": "patient", "op": "delete", "key": {}}),
            "key",
        ),
        (
            json!({"entity": "patient", "op": "delete", "key": {"id": 1}, "extra": 1}),
            "extra",
        ),
        (
            json!({"entity": "patient", "op": "upsert", "key": {"id": 1}, "row": {"id": "one"}}),
            "row",
        ),
    ];
    for (body, field) in posts {
        let (status, v) = post_json(&format!("{base}/v1/clinics/clinic-p/updates"), &body).await;
        assert!(status == 400 || status == 422, "{body}: {status}");
        let got = v["field"].as_str().unwrap_or(".");
        assert_eq!(got, field, "{body}: {v}");
    }
    let (status, _) = get_json(&format!("{base}/v1/updates/upd_nope")).await;
    assert_eq!(status, 404);
    let (status, _) = get_json(&format!("{base}/v1/clinics/nobody")).await;
    assert_eq!(status, 404);

    let mut seqs = Vec::new();
    let mut after = 0;
    loop {
        let (status, page) = get_json(&format!(
            "{base}/v1/events?clinic_id=clinic-p&after={after}&limit=10"
        ))
        .await;
        assert_eq!(status, 200);
        for e in page["events"].as_array().expect("events") {
            seqs.push(e["seq"].as_u64().expect("seq"));
        }
        match page["next_after"].as_u64() {
            Some(n) => after = n,
            None => break,
        }
    }
    assert_eq!(seqs, (1..=25).collect::<Vec<u64>>());
    // Retention removed the 10 oldest: a cursor before them is told so, with the oldest kept;
    // a reader without a cursor starts at the oldest kept.
    let pruned = gw
        .store
        .prune("2999-01-01T00:00:00.000Z", u64::MAX / 2, 10)
        .await
        .expect("prune");
    assert_eq!(pruned.events, 10);
    let resp = client()
        .get(format!("{base}/v1/events?after=3"))
        .send()
        .await
        .expect("get");
    assert_eq!(resp.status().as_u16(), 410);
    let oldest = resp
        .headers()
        .get("tether-oldest-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .expect("oldest id header");
    assert_eq!(oldest, pruned.pruned_through + 1);
    let (status, page) = get_json(&format!("{base}/v1/events?limit=100")).await;
    assert_eq!(status, 200);
    let first = &page["events"][0];
    assert_eq!(
        (first["id"].as_u64(), first["seq"].as_u64()),
        (Some(oldest), Some(11))
    );
    let (status, h) = get_json(&format!("{base}/healthz")).await;
    assert_eq!((status, h["status"].as_str()), (200, Some("ok")));
    let (status, r) = get_json(&format!("{base}/readyz")).await;
    assert_eq!((status, r["state"].as_str()), (200, Some("ready")), "{r}");
    assert_eq!(r["writer"]["ok"], true);
    // A writer that no longer commits makes the node not ready (and still alive).
    gw.store.close();
    let (status, r) = get_json(&format!("{base}/readyz")).await;
    assert_eq!(
        (status, r["state"].as_str()),
        (503, Some("not_ready")),
        "{r}"
    );
    assert!(
        r["detail"].as_str().is_some_and(|d| d.contains("writer")),
        "{r}"
    );
    assert_eq!(r["writer"]["ok"], false);
    let (status, _) = get_json(&format!("{base}/healthz")).await;
    assert_eq!(status, 200);
    gw.stop().await;
}

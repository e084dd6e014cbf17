//! Webhooks to the main Web API against a real HTTP receiver on 127.0.0.1:0 that checks every
//! signature: every durable event arrives, in order, at least once, through transient failures;
//! an event the receiver keeps refusing goes to the dead-letter list after `max_attempts`
//! without holding the others back, and is delivered when replayed over REST; a replay from an
//! event id re-delivers; an entity filter holds.

mod common;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use awc::ws;
use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tether::gateway::webhooks::{sign, WebhookSettings};
use tether::gateway::{self, GatewaySecurity, GatewaySettings};

const SECRET: &[u8] = b"test-secret-generated-per-run";

#[derive(Default)]
struct Receiver {
    /// Event ids in arrival order (with repeats).
    got: Mutex<Vec<(String, u64, String)>>,
    bad_signatures: AtomicUsize,
    /// Answer 500 to this many requests first.
    fail_first: AtomicUsize,
    /// Always answer 500 for this event id (0: none).
    poison: AtomicU64,
}

/// A request header as text ("" when absent).
fn header(req: &HttpRequest, name: &str) -> String {
    req.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string()
}

/// The delivery carries the signature of its timestamp and body.
fn signed(req: &HttpRequest, body: &[u8]) -> bool {
    let ts: u64 = header(req, "tether-timestamp").parse().unwrap_or(0);
    header(req, "tether-signature") == format!("v1={}", sign(SECRET, ts, body))
}

async fn receive(req: HttpRequest, body: web::Bytes, r: web::Data<Receiver>) -> HttpResponse {
    let h = |n: &str| header(&req, n);
    if !signed(&req, &body) {
        r.bad_signatures.fetch_add(1, Ordering::SeqCst);
        return HttpResponse::Unauthorized().finish();
    }
    let event: Value = serde_json::from_slice(&body).unwrap_or_default();
    let id = event["id"].as_u64().unwrap_or(0);
    assert_eq!(h("tether-event-id"), id.to_string());
    if r.fail_first
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
        || r.poison.load(Ordering::SeqCst) == id
    {
        return HttpResponse::InternalServerError().finish();
    }
    let entity = event["entity"].as_str().unwrap_or("").to_string();
    r.got
        .lock()
        .expect("lock")
        .push((h("tether-webhook"), id, entity));
    HttpResponse::NoContent().finish()
}

fn webhook(name: &str, url: &str, entities: &[&str]) -> WebhookSettings {
    WebhookSettings {
        name: name.into(),
        url: url.into(),
        secret: SECRET.to_vec(),
        entities: entities.iter().map(|e| e.to_string()).collect(),
        events: true,
        channels: Vec::new(),
        max_attempts: 3,
        timeout: Duration::from_secs(5),
        backoff_initial: Duration::from_millis(10),
        backoff_max: Duration::from_millis(50),
    }
}

fn ids(r: &Receiver, hook: &str) -> Vec<u64> {
    r.got
        .lock()
        .expect("lock")
        .iter()
        .filter(|(h, _, _)| h == hook)
        .map(|(_, id, _)| *id)
        .collect()
}

#[actix_rt::test]
async fn every_event_is_delivered_signed_in_order_with_retries_dead_letters_and_replay() {
    let receiver = web::Data::new(Receiver::default());
    receiver.fail_first.store(4, Ordering::SeqCst);
    receiver.poison.store(17, Ordering::SeqCst);
    let (url, server_handle) = serve(receiver.clone());

    let dir = tempfile::tempdir().expect("tempdir");
    let gw = gateway::start(
        GatewaySettings {
            webhooks: vec![
                webhook("main-api", &url, &[]),
                webhook("payments-only", &url, &["payment"]),
            ],
            ..gateway_settings(dir.path(), Duration::from_secs(5))
        },
        GatewaySecurity::insecure(),
    )
    .expect("gateway");

    // 30 events from one clinic, in three batches; every third is a payment.
    let (_, mut sock) = client().ws(gw.ws_url()).connect().await.expect("ws");
    let hello = json!({"v": 1, "type": "hello", "clinic_id": "clinic-w", "agent_version": "t", "last_acked_seq": 0, "source_id": 1});
    sock.send(ws::Message::Text(hello.to_string().into()))
        .await
        .expect("hello");
    let event = |seq: u64| {
        if seq.is_multiple_of(3) {
            json!({"seq": seq, "entity": "payment", "op": "insert", "key": {"id": seq},
                   "row": {"id": seq, "patient_id": 1, "amount_cents": 100, "method": "cash"},
                   "committed_at": "2026-11-28T00:00:00.000Z"})
        } else {
            json!({"seq": seq, "entity": "patient", "op": "insert", "key": {"id": seq},
                   "row": {"id": seq, "name": "N"}, "committed_at": "2026-11-28T00:00:00.000Z"})
        }
    };
    for b in 0..3u64 {
        let evs: Vec<Value> = (b * 10 + 1..=b * 10 + 10).map(event).collect();
        let batch = json!({"v": 1, "type": "events", "prev_seq": b * 10, "events": evs});
        sock.send(ws::Message::Text(batch.to_string().into()))
            .await
            .expect("events");
    }
    let mut acked = 0;
    while acked < 30 {
        let frame = tokio::time::timeout(Duration::from_secs(10), sock.next())
            .await
            .expect("ack within 10 s")
            .expect("open")
            .expect("frame");
        if let ws::Frame::Text(t) = frame {
            let v: Value = serde_json::from_slice(&t).expect("json");
            if v["type"] == "ack" {
                acked = v["seq"].as_u64().unwrap_or(0);
            }
        }
    }
    let store = gw.store.clone();
    let event_ids: Vec<u64> =
        tether::gateway::store::wait(store.events_page(Some("clinic-w"), 0, 100))
            .expect("events")
            .iter()
            .map(|e| e.id)
            .collect();
    assert_eq!(event_ids.len(), 30);
    let poison = event_ids[16];
    receiver.poison.store(poison, Ordering::SeqCst);

    // Everything but the poison arrives, each first arrival in event order.
    let r = receiver.clone();
    let want: Vec<u64> = event_ids.iter().copied().filter(|i| *i != poison).collect();
    wait_until(
        "all but the poison delivered",
        Duration::from_secs(30),
        || {
            let mut got = ids(&r, "main-api");
            got.dedup();
            let done = want.iter().all(|i| got.contains(i));
            async move { done }
        },
    )
    .await;
    let mut first_seen = Vec::new();
    for id in ids(&receiver, "main-api") {
        if !first_seen.contains(&id) {
            first_seen.push(id);
        }
    }
    assert_eq!(first_seen, want, "per-endpoint order");
    assert_eq!(receiver.bad_signatures.load(Ordering::SeqCst), 0);

    // The poison is on the dead-letter list, after max_attempts.
    let base = gw.http_url();
    let dl = loop_until_dead_letter(&base, "main-api").await;
    assert_eq!(dl["event_id"], poison, "{dl}");
    assert_eq!(dl["attempts"], 3, "{dl}");
    // The receiver is fixed; the replay delivers it and empties the list.
    receiver.poison.store(0, Ordering::SeqCst);
    let (status, v) = post_json(
        &format!(
            "{base}/v1/webhooks/main-api/dead-letters/{}/replay",
            dl["id"]
        ),
        &json!({}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["delivered"], true);
    assert!(ids(&receiver, "main-api").contains(&poison));
    let (_, list) = get_json(&format!("{base}/v1/webhooks/main-api/dead-letters")).await;
    assert_eq!(list["dead_letters"], json!([]));

    // Replay from an event id: the last five come again.
    let before = ids(&receiver, "main-api").len();
    let (status, v) = post_json(
        &format!("{base}/v1/webhooks/main-api/replay"),
        &json!({"from_event_id": event_ids[25]}),
    )
    .await;
    assert_eq!(status, 202, "{v}");
    let r = receiver.clone();
    wait_until("the replay", Duration::from_secs(10), || {
        let n = ids(&r, "main-api").len();
        async move { n >= before + 5 }
    })
    .await;
    assert_eq!(ids(&receiver, "main-api")[before..], event_ids[25..]);

    // The filtered endpoint got exactly the payments, once each, in order.
    let payments: Vec<u64> = event_ids
        .iter()
        .enumerate()
        .filter(|(i, _)| (i + 1).is_multiple_of(3))
        .map(|(_, id)| *id)
        .collect();
    let r = receiver.clone();
    let n_payments = payments.len();
    wait_until(
        "the payments-only endpoint",
        Duration::from_secs(10),
        || {
            let got = ids(&r, "payments-only");
            async move { got.len() >= n_payments }
        },
    )
    .await;
    let mut got = ids(&receiver, "payments-only");
    got.dedup();
    assert_eq!(got, payments);

    // A replay past the newest event is refused (it would skip what is stored next), and the
    // next events are all delivered.
    let head = *event_ids.last().expect("events");
    let (status, v) = post_json(
        &format!("{base}/v1/webhooks/main-api/replay"),
        &json!({"from_event_id": head + 5}),
    )
    .await;
    assert_eq!(status, 422, "{v}");
    assert_eq!(v["field"], "from_event_id", "{v}");
    assert!(
        v["detail"]
            .as_str()
            .unwrap_or("")
            .contains(&head.to_string()),
        "{v}"
    );
    let evs: Vec<Value> = (31..=35).map(event).collect();
    let batch = json!({"v": 1, "type": "events", "prev_seq": 30, "events": evs});
    sock.send(ws::Message::Text(batch.to_string().into()))
        .await
        .expect("events");
    let r = receiver.clone();
    wait_until("the five new events", Duration::from_secs(10), || {
        let got = ids(&r, "main-api");
        async move { (head + 1..=head + 5).all(|i| got.contains(&i)) }
    })
    .await;
    let (_, hooks) = get_json(&format!("{base}/v1/webhooks")).await;
    let h = &hooks["webhooks"][0];
    assert!(
        h["delivered_since_start"].as_u64().unwrap_or(0) >= 35,
        "{h}"
    );
    assert!(h["since"].as_str().is_some_and(|s| s.ends_with('Z')), "{h}");

    // Bad requests name what is wrong; metrics count the failures.
    let (status, v) = post_json(
        &format!("{base}/v1/webhooks/nope/replay"),
        &json!({"from_event_id": 1}),
    )
    .await;
    assert_eq!(status, 404, "{v}");
    let (status, v) = post_json(
        &format!("{base}/v1/webhooks/main-api/replay"),
        &json!({"from": 1}),
    )
    .await;
    assert_eq!(status, 400, "{v}");
    assert_eq!(v["field"], "from", "{v}");
    let (_, hooks) = get_json(&format!("{base}/v1/webhooks")).await;
    assert_eq!(hooks["webhooks"][0]["name"], "main-api");
    let mut resp = client()
        .get(format!("{base}/metrics"))
        .send()
        .await
        .expect("metrics");
    let text = String::from_utf8_lossy(&resp.body().await.expect("body")).to_string();
    let failures: u64 = text
        .lines()
        .find_map(|l| {
            l.strip_prefix("tether_gateway_webhook_failures_total{webhook=\"main-api\"} ")
        })
        .and_then(|v| v.parse().ok())
        .expect("failure counter");
    assert!(failures >= 3, "{text}");
    assert!(text.contains("tether_gateway_webhook_dead_lettered_total{webhook=\"main-api\"} 1"));
    server_handle.stop(true).await;
    gw.stop().await;
}

async fn loop_until_dead_letter(base: &str, hook: &str) -> Value {
    let url = format!("{base}/v1/webhooks/{hook}/dead-letters");
    wait_until("a dead letter", Duration::from_secs(20), || {
        let url = url.clone();
        async move { !get_json(&url).await.1["dead_letters"][0].is_null() }
    })
    .await;
    get_json(&url).await.1["dead_letters"][0].clone()
}

/// A receiver on 127.0.0.1:0: its URL and its server's handle.
fn serve(r: web::Data<Receiver>) -> (String, actix_web::dev::ServerHandle) {
    let server = HttpServer::new(move || {
        App::new()
            .app_data(r.clone())
            .route("/hook", web::post().to(receive))
    })
    .workers(1)
    .bind("127.0.0.1:0")
    .expect("bind receiver");
    let url = format!("http://{}/hook", server.addrs()[0]);
    let server = server.run();
    let handle = server.handle();
    actix_rt::spawn(server);
    (url, handle)
}

/// Retention removes old events in the background, but never one that a webhook endpoint has
/// not delivered: an endpoint stuck on event 11 holds back everything from 11 on, while the
/// events every endpoint has delivered go, and a cursor before them is answered 410.
#[actix_rt::test]
async fn retention_never_removes_what_a_webhook_has_not_delivered() {
    let good = web::Data::new(Receiver::default());
    let stuck = web::Data::new(Receiver::default());
    stuck.poison.store(11, Ordering::SeqCst);
    let (good_url, good_server) = serve(good.clone());
    let (stuck_url, stuck_server) = serve(stuck.clone());
    let dir = tempfile::tempdir().expect("tempdir");
    let mut holding = webhook("stuck", &stuck_url, &[]);
    holding.max_attempts = 100_000;
    let gw = gateway::start(
        GatewaySettings {
            webhooks: vec![webhook("main-api", &good_url, &[]), holding],
            // Keep nothing: every event is old enough at once.
            retention: Some(Duration::ZERO),
            ..gateway_settings(dir.path(), Duration::from_secs(5))
        },
        GatewaySecurity::insecure(),
    )
    .expect("gateway");
    let (_, mut sock) = client().ws(gw.ws_url()).connect().await.expect("ws");
    let hello = json!({"v": 1, "type": "hello", "clinic_id": "clinic-r", "agent_version": "t", "last_acked_seq": 0, "source_id": 1});
    sock.send(ws::Message::Text(hello.to_string().into()))
        .await
        .expect("hello");
    let evs: Vec<Value> = (1..=30u64)
        .map(|seq| {
            json!({"seq": seq, "entity": "patient", "op": "insert", "key": {"id": seq},
                   "row": {"id": seq, "name": "N"}, "committed_at": "2026-11-28T00:00:00.000Z"})
        })
        .collect();
    let batch = json!({"v": 1, "type": "events", "prev_seq": 0, "events": evs});
    sock.send(ws::Message::Text(batch.to_string().into()))
        .await
        .expect("events");
    let base = gw.http_url();
    let g = good.clone();
    wait_until("main-api to have all 30", Duration::from_secs(20), || {
        let n = ids(&g, "main-api").len();
        async move { n >= 30 }
    })
    .await;
    // Retention catches up with the stuck endpoint's cursor (10) and stops there. The cursor
    // itself climbs to 10 while the endpoint takes events 1-10, so retention may first remove
    // fewer: wait until the oldest event kept is 11 (the equality below checks it stops there).
    wait_until("events 1-10 removed", Duration::from_secs(20), || {
        let base = base.clone();
        async move {
            let (status, page) = get_json(&format!("{base}/v1/events?limit=1")).await;
            status == 200 && page["events"][0]["seq"].as_u64() == Some(11)
        }
    })
    .await;
    let (status, page) = get_json(&format!("{base}/v1/events?limit=100")).await;
    assert_eq!(status, 200, "{page}");
    let kept: Vec<u64> = page["events"]
        .as_array()
        .expect("events")
        .iter()
        .filter_map(|e| e["seq"].as_u64())
        .collect();
    assert_eq!(
        kept,
        (11..=30).collect::<Vec<u64>>(),
        "nothing past the stuck cursor goes"
    );
    let (_, clinic) = get_json(&format!("{base}/v1/clinics/clinic-r")).await;
    assert_eq!(
        (clinic["events"].as_u64(), clinic["acked_seq"].as_u64()),
        (Some(20), Some(30))
    );
    // Once the endpoint recovers, its cursor moves on and retention follows it.
    stuck.poison.store(0, Ordering::SeqCst);
    wait_until("the rest removed", Duration::from_secs(30), || {
        let base = base.clone();
        async move {
            let (_, page) = get_json(&format!("{base}/v1/events?limit=100")).await;
            page["events"].as_array().is_some_and(|e| e.is_empty())
        }
    })
    .await;
    assert_eq!(stuck.bad_signatures.load(Ordering::SeqCst), 0);
    gw.stop().await;
    good_server.stop(true).await;
    stuck_server.stop(true).await;
}

/// Up-channel messages pushed to an endpoint that takes them (`channels`, here without events):
/// signed, with `Tether-Message-Id`, in order, once per clinic and message id (a resend after a
/// lost ack is not pushed again), retried after failures; a refused message is never pushed.
#[actix_rt::test]
async fn up_channel_messages_are_pushed_signed_in_order_once_each() {
    #[derive(Default)]
    struct Got {
        messages: Mutex<Vec<(String, Value)>>,
        fail_first: AtomicUsize,
        bad_signatures: AtomicUsize,
    }
    async fn take(req: HttpRequest, body: web::Bytes, g: web::Data<Got>) -> HttpResponse {
        if !signed(&req, &body) {
            g.bad_signatures.fetch_add(1, Ordering::SeqCst);
            return HttpResponse::Unauthorized().finish();
        }
        if g.fail_first
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return HttpResponse::ServiceUnavailable().finish();
        }
        let v: Value = serde_json::from_slice(&body).unwrap_or_default();
        g.messages
            .lock()
            .expect("lock")
            .push((header(&req, "tether-message-id"), v));
        HttpResponse::NoContent().finish()
    }
    let got = web::Data::new(Got::default());
    got.fail_first.store(2, Ordering::SeqCst);
    let g = got.clone();
    let server = HttpServer::new(move || {
        App::new()
            .app_data(g.clone())
            .route("/desk", web::post().to(take))
    })
    .workers(1)
    .bind("127.0.0.1:0")
    .expect("bind");
    let url = format!("http://{}/desk", server.addrs()[0]);
    let server = server.run();
    let server_handle = server.handle();
    actix_rt::spawn(server);

    let dir = tempfile::tempdir().expect("tempdir");
    let mut hook = webhook("desk-api", &url, &[]);
    hook.events = false;
    hook.channels = vec!["frontdesk.checkin".into()];
    let gw = gateway::start(
        GatewaySettings {
            webhooks: vec![hook],
            channels: tether::gateway::channels::samples(),
            ..gateway_settings(dir.path(), Duration::from_secs(5))
        },
        GatewaySecurity::insecure(),
    )
    .expect("gateway");
    let (_, mut sock) = client().ws(gw.ws_url()).connect().await.expect("ws");
    let hello = json!({"v": 1, "type": "hello", "clinic_id": "clinic-w", "agent_version": "t",
                       "last_acked_seq": 0, "source_id": 1, "features": ["channels"]});
    sock.send(ws::Message::Text(hello.to_string().into()))
        .await
        .expect("hello");
    let checkin = |id: &str, appointment: Value| {
        json!({"v": 1, "type": "channel", "message_id": id, "channel": "frontdesk.checkin",
               "payload": {"appointment_id": appointment, "arrived_at": "2026-12-03T09:00:00Z"},
               "published_at": "2026-12-03T09:00:00.000Z"})
    };
    for frame in [
        checkin("c-1", json!(1)),
        checkin("c-bad", json!("one")),
        checkin("c-2", json!(2)),
        checkin("c-1", json!(1)),
    ] {
        sock.send(ws::Message::Text(frame.to_string().into()))
            .await
            .expect("channel");
    }
    // Every message is answered: accepted (the resend too), or refused naming the field.
    let mut answers = Vec::new();
    while answers.len() < 4 {
        let frame = tokio::time::timeout(Duration::from_secs(10), sock.next())
            .await
            .expect("an answer within 10 s")
            .expect("open")
            .expect("frame");
        if let ws::Frame::Text(t) = frame {
            let v: Value = serde_json::from_slice(&t).expect("json");
            if v["type"] == "channel_ack" {
                answers.push((
                    v["message_id"].as_str().unwrap_or("").to_string(),
                    v["status"].as_str().unwrap_or("").to_string(),
                    v["field"].as_str().unwrap_or("").to_string(),
                ));
            }
        }
    }
    assert!(
        answers.contains(&(
            "c-bad".into(),
            "refused".into(),
            "payload/appointment_id".into()
        )),
        "{answers:?}"
    );
    assert_eq!(
        answers.iter().filter(|a| a.1 == "accepted").count(),
        3,
        "{answers:?}"
    );
    wait_until("both check-ins pushed", Duration::from_secs(15), || {
        let n = got.messages.lock().expect("lock").len();
        async move { n >= 2 }
    })
    .await;
    let pushed = got.messages.lock().expect("lock").clone();
    let ids: Vec<&str> = pushed.iter().map(|(h, _)| h.as_str()).collect();
    assert_eq!(
        ids,
        ["c-1", "c-2"],
        "in order, once each, never the refused one"
    );
    assert_eq!(pushed[0].1["clinic_id"], "clinic-w");
    assert_eq!(pushed[0].1["payload"]["appointment_id"], 1);
    assert_eq!(got.bad_signatures.load(Ordering::SeqCst), 0);
    assert_eq!(
        got.fail_first.load(Ordering::SeqCst),
        0,
        "the failures were retried"
    );
    gw.stop().await;
    server_handle.stop(true).await;
}

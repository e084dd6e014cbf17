//! Channels end to end, through real sessions (mutual TLS and tokens): a phone system posts call
//! events for every clinic and each clinic's own subscribers (SSE and WebSocket, on the agent's
//! loopback endpoint with its local token) get exactly theirs, in order; bad messages are
//! refused naming the field; transient messages to an offline clinic expire and are counted,
//! durable ones arrive after it reconnects, once; clinic applications publish up-channel
//! messages that the main Web API reads from the gateway's stream, once per message id.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use futures_util::{FutureExt, StreamExt};
use serde_json::{json, Value};
use tether::fleet::{serve_local_endpoint, start_agent, Fleet, Inbox};

const HB: Duration = Duration::from_millis(500);
const TOKEN: &str = "0123456789abcdef0123456789abcdef-local-test-token";

/// A front desk on an agent's endpoint (SSE), as the fleet helper opens it.
async fn subscribe_sse(addr: std::net::SocketAddr, names: &str) -> Inbox {
    tether::fleet::subscribe_sse(addr, TOKEN, names)
        .await
        .expect("subscribe")
}

fn received_ids(inbox: &Inbox) -> Vec<String> {
    inbox
        .lock()
        .expect("inbox")
        .iter()
        .map(|(v, _)| {
            v["payload"]["call_id"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect()
}

async fn post_channel(fleet: &Fleet, path: &str, body: &Value) -> (u16, Value) {
    post_as(Some(fleet), &format!("{}{path}", fleet.http_url()), body).await
}

/// The gateway's REST API as the main Web API sees it (without borrowing the fleet).
struct Api {
    base: String,
    client: awc::Client,
    token: String,
}

impl Api {
    fn of(fleet: &Fleet) -> Api {
        Api {
            base: fleet.http_url(),
            client: fleet.rest_client().expect("client"),
            token: fleet.admin_token.clone().expect("token"),
        }
    }

    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        let mut resp = self
            .client
            .post(format!("{}{path}", self.base))
            .insert_header(("Authorization", format!("Bearer {}", self.token)))
            .send_json(&body)
            .await
            .expect("POST");
        let v: Value = resp.json().await.unwrap_or(Value::Null);
        (resp.status().as_u16(), v)
    }

    async fn metrics(&self) -> String {
        let mut resp = self
            .client
            .get(format!("{}/metrics", self.base))
            .insert_header(("Authorization", format!("Bearer {}", self.token)))
            .send()
            .await
            .expect("GET /metrics");
        let body = resp.body().limit(1 << 22).await.expect("metrics body");
        String::from_utf8_lossy(&body).to_string()
    }

    async fn status(&self, id: &str) -> String {
        let mut resp = self
            .client
            .get(format!("{}/v1/channels/messages/{id}", self.base))
            .insert_header(("Authorization", format!("Bearer {}", self.token)))
            .send()
            .await
            .expect("GET");
        let v: Value = resp.json().await.unwrap_or(Value::Null);
        v["status"].as_str().unwrap_or_default().to_string()
    }
}

fn p99(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[(v.len() * 99 / 100).min(v.len() - 1)]
}

#[actix_rt::test]
async fn call_pops_reach_each_clinics_own_subscribers_in_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    init_logs(dir.path());
    let mut fleet = Fleet::new(dir.path(), 3, HB).expect("fleet");
    fleet.start_agents().await.expect("agents");
    let mut endpoints = Vec::new();
    for c in &fleet.clinics {
        endpoints.push(serve_local_endpoint(c, TOKEN).await.expect("endpoint"));
    }
    // Two front desks at clinic 1 (SSE and WebSocket), one at each other clinic.
    let mut inboxes = Vec::new();
    for addr in &endpoints {
        inboxes.push(subscribe_sse(*addr, "voip.call").await);
    }
    let mut desk = common::ws::connect(&format!(
        "ws://{}/v1/channels?names=voip.call,notice.broadcast&access_token={TOKEN}",
        endpoints[0]
    ))
    .await;

    // Refusals name what is wrong and queue nothing.
    let (s, v) = post_channel(
        &fleet,
        "/v1/clinics/clinic-001/channels/voip.call",
        &json!({"state": "ringing"}),
    )
    .await;
    assert_eq!(
        (s, v["field"].as_str()),
        (422, Some("payload/call_id")),
        "{v}"
    );
    let (s, v) = post_channel(
        &fleet,
        "/v1/clinics/clinic-001/channels/voip.call",
        &json!({"call_id": "x", "state": "SECRET-STATE"}),
    )
    .await;
    assert_eq!(
        (s, v["field"].as_str()),
        (422, Some("payload/state")),
        "{v}"
    );
    assert!(
        !v.to_string().contains("SECRET-STATE"),
        "no value in an error: {v}"
    );
    let (s, v) = post_channel(
        &fleet,
        "/v1/clinics/clinic-001/channels/fax.incoming",
        &json!({}),
    )
    .await;
    assert_eq!((s, v["field"].as_str()), (404, Some("name")), "{v}");
    let (s, v) = post_channel(
        &fleet,
        "/v1/clinics/clinic-001/channels/frontdesk.checkin",
        &json!({"appointment_id": 1, "arrived_at": "t"}),
    )
    .await;
    assert_eq!(s, 409, "an up channel takes no posts: {v}");
    let (s, v) = post_channel(
        &fleet,
        "/v1/clinics/clinic-404/channels/voip.call",
        &json!({"call_id": "x", "state": "ringing"}),
    )
    .await;
    assert_eq!((s, v["field"].as_str()), (404, Some("id")), "{v}");

    // The phone system (one client, kept): 20 calls per clinic, interleaved across clinics.
    let api = Api::of(&fleet);
    let posted: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let mut message_ids = Vec::new();
    for i in 0..20 {
        for c in ["clinic-001", "clinic-002", "clinic-003"] {
            let call_id = format!("{c}-call-{i:02}");
            posted
                .lock()
                .expect("posted")
                .insert(call_id.clone(), Instant::now());
            let (s, v) = api
                .post(
                    &format!("/v1/clinics/{c}/channels/voip.call"),
                    json!({"call_id": call_id, "state": "ringing", "caller": "+1-555-0100", "patient_id": -1}),
                )
                .await;
            assert_eq!(s, 202, "{v}");
            assert_eq!(v["delivery"], "transient");
            assert!(v["expires_at"].is_string(), "{v}");
            message_ids.push(v["message_id"].as_str().expect("message_id").to_string());
        }
    }
    for (i, inbox) in inboxes.iter().enumerate() {
        let clinic = format!("clinic-{:03}", i + 1);
        let want: Vec<String> = (0..20).map(|n| format!("{clinic}-call-{n:02}")).collect();
        wait_until(
            &format!("{clinic}'s 20 calls"),
            Duration::from_secs(20),
            || {
                let n = received_ids(inbox).len();
                async move { n >= 20 }
            },
        )
        .await;
        assert_eq!(received_ids(inbox), want, "exactly its own, in order");
        // The caller and patient travel encrypted (the fleet's channels list them in
        // `encrypt`); the agent hands the desk plaintext.
        for (m, _) in inbox.lock().expect("inbox").iter() {
            assert_eq!(
                (&m["payload"]["caller"], &m["payload"]["patient_id"]),
                (&json!("+1-555-0100"), &json!(-1)),
                "{m}"
            );
        }
    }
    // The WebSocket desk at clinic 1 got the same 20, in order.
    let mut ws_got = Vec::new();
    while ws_got.len() < 20 {
        let m = common::ws::next_json(&mut desk).await.expect("a message");
        assert_eq!(m["channel"], "voip.call");
        assert!(m["ttl_ms"].as_u64().is_some_and(|t| t <= 30_000), "{m}");
        ws_got.push(
            m["payload"]["call_id"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        );
    }
    assert_eq!(ws_got, received_ids(&inboxes[0]));

    // Latency from the POST to the subscriber (loopback, 3 clinics; the target is measured
    // with 500 clinics by `tether bench channels`).
    let posted = posted.lock().expect("posted").clone();
    let latencies: Vec<Duration> = inboxes
        .iter()
        .flat_map(|i| i.lock().expect("inbox").clone())
        .map(|(v, at)| at - posted[v["payload"]["call_id"].as_str().unwrap_or_default()])
        .collect();
    eprintln!(
        "channels: {} call pops, POST → subscriber p99 {:?}",
        latencies.len(),
        p99(latencies)
    );

    // Every message ends `delivered` at the gateway, which counts them per channel.
    for id in &message_ids {
        wait_until("delivered status", Duration::from_secs(10), || {
            let (api, id) = (&api, id.clone());
            async move { api.status(&id).await == "delivered" }
        })
        .await;
    }
    let metrics_url = format!("{}/metrics", fleet.http_url());
    let resp = fleet
        .authorize(fleet.rest_client().expect("client").get(&metrics_url))
        .send()
        .await
        .expect("metrics");
    let mut resp = resp;
    let text =
        String::from_utf8_lossy(&resp.body().limit(1 << 22).await.expect("body")).to_string();
    assert!(
        text.contains("tether_gateway_channel_delivered_total{channel=\"voip.call\"} 60"),
        "{text}"
    );
    assert!(
        text.contains("tether_gateway_channel_refused_total{channel=\"voip.call\"} 2"),
        "{text}"
    );

    // A fan-out of a durable notice to every clinic: one message each, on the desk in order
    // after the calls.
    let (s, v) = post_channel(
        &fleet,
        "/v1/channels/notice.broadcast",
        &json!({"all": true, "payload": {"notice_id": "n-1", "title": "Maintenance tonight", "severity": "info"}}),
    )
    .await;
    assert_eq!((s, v["clinics"].as_u64()), (202, Some(3)), "{v}");
    let m = common::ws::next_json(&mut desk).await.expect("the notice");
    assert_eq!(
        (m["channel"].as_str(), m["payload"]["notice_id"].as_str()),
        (Some("notice.broadcast"), Some("n-1"))
    );
    assert_eq!(m["message_id"], v["message_ids"]["clinic-001"]);
    assert!(
        m.get("ttl_ms").is_none(),
        "durable messages do not expire: {m}"
    );

    // The local endpoint wants its token.
    let (s, _) = get_json(&format!(
        "http://{}/v1/channels?names=voip.call",
        endpoints[1]
    ))
    .await;
    assert_eq!(s, 401);
    let (s, _) = get_json(&format!(
        "http://{}/v1/channels?access_token=wrong{TOKEN}",
        endpoints[1]
    ))
    .await;
    assert_eq!(s, 401);
    // The agent's /status counts per channel.
    let (s, st) = get_json(&format!("http://{}/status", endpoints[0])).await;
    assert_eq!(s, 200);
    assert_eq!(st["channels"]["voip.call"]["delivered"], 20, "{st}");
    assert_eq!(st["channels"]["voip.call"]["subscribers"], 2, "{st}");
    // No payload in any log.
    for category in ["message", "connection", "error", "audit"] {
        let log = log_text(&dir.path().join("logs"), category);
        assert!(
            !log.contains("+1-555-0100"),
            "{category} log holds a payload"
        );
    }
    fleet.stop().await;
}

#[actix_rt::test]
async fn offline_clinics_lose_expired_calls_and_get_durable_notices_once_after_reconnecting() {
    let dir = tempfile::tempdir().expect("tempdir");
    init_logs(dir.path());
    let mut fleet = Fleet::new(dir.path(), 1, HB).expect("fleet");
    fleet.start_agents().await.expect("agent");
    let addr = serve_local_endpoint(&fleet.clinics[0], TOKEN)
        .await
        .expect("endpoint");
    let stats = fleet.clinics[0]
        .agent
        .as_ref()
        .expect("agent")
        .handle
        .stats
        .clone();
    wait_until("connected", Duration::from_secs(15), || {
        let up = stats.connected.load(std::sync::atomic::Ordering::Relaxed);
        async move { up }
    })
    .await;
    let board = fleet.clinics[0]
        .agent
        .as_ref()
        .expect("agent")
        .channels
        .clone();
    wait_until("channels declared", Duration::from_secs(10), || {
        let n = board.channels().len();
        async move { n == 3 }
    })
    .await;

    let notice = |id: &str| json!({"notice_id": id, "title": "t", "severity": "warning"});
    let api = Api::of(&fleet);
    let post = |path: &'static str, body: Value| api.post(path, body);
    // Online, nobody subscribed: the agent holds n1 (the gateway has no confirmation).
    let (s, v) = post(
        "/v1/clinics/clinic-001/channels/notice.broadcast",
        notice("n1"),
    )
    .await;
    assert_eq!(s, 202, "{v}");
    let n1 = v["message_id"].as_str().expect("id").to_string();
    let status = |id: String| {
        let api = &api;
        async move { api.status(&id).await }
    };
    wait_until("n1 sent", Duration::from_secs(10), || {
        let s = status(n1.clone());
        async move { s.await == "sent" }
    })
    .await;
    // The clinic goes offline (its agent process ends: what it held is gone with it).
    let agent = fleet.clinics[0].agent.take().expect("agent");
    agent.stop();
    let (s, v) = post(
        "/v1/clinics/clinic-001/channels/voip.call?ttl=1s",
        json!({"call_id": "missed-1", "state": "ringing", "caller": "+1-555-0142", "patient_id": 42}),
    )
    .await;
    assert_eq!(s, 202, "{v}");
    let call = v["message_id"].as_str().expect("id").to_string();
    // Kept encrypted for this clinic and message while it waits.
    let open = fleet
        .store()
        .expect("store")
        .open_channel("clinic-001", 0, 0, 100)
        .await
        .expect("open messages");
    let kept = open
        .iter()
        .find(|r| r.message_id == call)
        .and_then(|r| r.payload.clone())
        .expect("the call waits in the store");
    let kept: Value = serde_json::from_str(&kept).expect("json");
    assert!(
        ["caller", "patient_id"].iter().all(|f| kept[f]
            .as_str()
            .is_some_and(|s| s.starts_with("enc:v1:dk1:"))),
        "{kept}"
    );
    assert_eq!(kept["call_id"], "missed-1", "unlisted fields stay clear");
    let mut notices = vec![n1.clone()];
    for n in ["n2", "n3"] {
        let (s, v) = post(
            "/v1/clinics/clinic-001/channels/notice.broadcast",
            notice(n),
        )
        .await;
        assert_eq!(s, 202, "{v}");
        notices.push(v["message_id"].as_str().expect("id").to_string());
    }
    let (s, v) = post(
        "/v1/clinics/clinic-001/channels/notice.broadcast?ttl=1s",
        notice("n4"),
    )
    .await;
    assert_eq!(
        (s, v["field"].as_str()),
        (400, Some("ttl")),
        "durable messages have no ttl: {v}"
    );
    // The call expires unseen, and is counted.
    wait_until("the call expired", Duration::from_secs(15), || {
        let s = status(call.clone());
        async move { s.await == "expired" }
    })
    .await;
    let text = api.metrics().await;
    assert!(
        text.contains("tether_gateway_channel_expired_total{channel=\"voip.call\"} 1"),
        "the expiry is counted once: {text}"
    );
    // Back online, with a new process: n1 again (never confirmed), then n2 and n3; not the call.
    fleet.clinics[0].agent = Some(
        start_agent(&fleet.clinics[0].config)
            .await
            .expect("restart"),
    );
    let addr2 = serve_local_endpoint(&fleet.clinics[0], TOKEN)
        .await
        .expect("endpoint");
    assert_ne!(addr, addr2);
    let inbox = subscribe_sse(addr2, "").await;
    wait_until("three notices", Duration::from_secs(20), || {
        let n = inbox.lock().expect("inbox").len();
        async move { n >= 3 }
    })
    .await;
    let got: Vec<(String, String)> = inbox
        .lock()
        .expect("inbox")
        .iter()
        .map(|(v, _)| {
            (
                v["message_id"].as_str().unwrap_or_default().to_string(),
                v["payload"]["notice_id"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            )
        })
        .collect();
    let want: Vec<(String, String)> = notices
        .iter()
        .zip(["n1", "n2", "n3"])
        .map(|(id, n)| (id.clone(), n.to_string()))
        .collect();
    assert_eq!(got, want, "in order, each once, no expired call");
    for id in &notices {
        wait_until("delivered", Duration::from_secs(10), || {
            let s = status(id.clone());
            async move { s.await == "delivered" }
        })
        .await;
    }
    assert_eq!(
        status(call.clone()).await,
        "expired",
        "never delivered late"
    );
    let text = api.metrics().await;
    assert!(
        text.contains("tether_gateway_channel_delivered_total{channel=\"notice.broadcast\"} 3"),
        "each notice counted once: {text}"
    );

    // Up: the front desk reports a check-in; the main Web API reads it from the stream once,
    // however often the desk retried with the same Idempotency-Key.
    let desk = common::client();
    let publish_on = |channel: &str, key: &str, body: Value| {
        let (desk, key, channel) = (&desk, key.to_string(), channel.to_string());
        async move {
            let mut resp = desk
                .post(format!("http://{addr2}/v1/channels/{channel}"))
                .insert_header(("Authorization", format!("Bearer {TOKEN}")))
                .insert_header(("Idempotency-Key", key))
                .send_json(&body)
                .await
                .expect("publish");
            let v: Value = resp.json().await.unwrap_or(Value::Null);
            (resp.status().as_u16(), v)
        }
    };
    let publish = |key: &str, body: Value| publish_on("frontdesk.checkin", key, body);
    let checkin =
        json!({"appointment_id": 77, "arrived_at": "2026-12-03T09:00:00Z", "desk": "front"});
    let (s, v) = publish("checkin-77", checkin.clone()).await;
    assert_eq!((s, v["status"].as_str()), (202, Some("accepted")), "{v}");
    let (s, _) = publish("checkin-77", checkin.clone()).await;
    assert_eq!(s, 202, "a retry is accepted again");
    let (s, v) = publish("checkin-78", json!({"arrived_at": "t"})).await;
    assert_eq!(
        (s, v["field"].as_str()),
        (422, Some("payload/appointment_id")),
        "{v}"
    );
    let (s, v) = publish_on(
        "voip.call",
        "call-x",
        json!({"call_id": "x", "state": "ringing"}),
    )
    .await;
    assert_eq!(s, 409, "voip.call is a down channel: {v}");
    let stream_url = format!(
        "{}/v1/channels/stream?names=frontdesk.checkin",
        fleet.http_url()
    );
    let mut resp = fleet
        .authorize(
            fleet
                .rest_client()
                .expect("client")
                .get(&stream_url)
                .timeout(Duration::from_secs(3600)),
        )
        .send()
        .await
        .expect("stream");
    assert_eq!(resp.status().as_u16(), 200);
    let mut buf = String::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !buf.contains("\n\n") {
        let chunk = tokio::time::timeout_at(deadline.into(), resp.next())
            .await
            .expect("an event within 10 s")
            .expect("stream open")
            .expect("chunk");
        buf.push_str(&String::from_utf8_lossy(&chunk));
    }
    let data: Value = serde_json::from_str(
        buf.lines()
            .find_map(|l| l.strip_prefix("data: "))
            .expect("data line"),
    )
    .expect("json");
    assert_eq!(data["clinic_id"], "clinic-001");
    assert_eq!(data["message_id"], "checkin-77");
    assert_eq!(data["payload"], checkin);
    // Resuming after that event: nothing more (the retry was no second message).
    let id: i64 = buf
        .lines()
        .find_map(|l| l.strip_prefix("id: "))
        .and_then(|i| i.parse().ok())
        .expect("event id");
    let page = fleet
        .store()
        .expect("store")
        .up_channel_page(id, 10)
        .await
        .expect("page");
    assert!(page.is_empty(), "one message per id: {page:?}");
    fleet.stop().await;
}

/// Two gateway nodes on one PostgreSQL store: the clinic holds its session on node A; a call
/// posted at node B reaches its front desk (B's store signal wakes A's session), and a check-in
/// the desk publishes through A streams from B.
#[cfg(feature = "postgres")]
#[actix_rt::test]
async fn across_nodes_calls_reach_the_clinic_and_check_ins_stream_from_every_node() {
    use tether::gateway::store::StoreLocation;
    let dir = tempfile::tempdir().expect("tempdir");
    init_logs(dir.path());
    let url = std::env::var("TETHER_TEST_PG")
        .unwrap_or_else(|_| "host=127.0.0.1 port=5432 user=postgres dbname=test".into());
    let schema = format!(
        "channels_{}_{:x}",
        std::process::id(),
        rand::random::<u32>()
    );
    let mut fleet = Fleet::build_on(
        dir.path(),
        1,
        HB,
        Some(2048),
        Some(StoreLocation::Postgres {
            url: url.clone(),
            schema: schema.clone(),
        }),
        Some("gw-a"),
    )
    .expect("fleet (is PostgreSQL running?)");
    let b = fleet.start_peer("gw-b").expect("node b");
    fleet.start_agents().await.expect("agent on node a");
    let addr = serve_local_endpoint(&fleet.clinics[0], TOKEN)
        .await
        .expect("endpoint");
    let desk = subscribe_sse(addr, "voip.call").await;
    let api_b = Api {
        base: b.http_url(),
        client: fleet.rest_client().expect("client"),
        token: fleet.admin_token.clone().expect("token"),
    };
    let t = Instant::now();
    let (s, v) = api_b
        .post(
            "/v1/clinics/clinic-001/channels/voip.call",
            json!({"call_id": "via-b", "state": "ringing"}),
        )
        .await;
    assert_eq!(s, 202, "{v}");
    wait_until("the call posted at node B", Duration::from_secs(15), || {
        let n = received_ids(&desk);
        async move { n == ["via-b"] }
    })
    .await;
    eprintln!(
        "channels: posted at node B, at the desk behind node A in {:?}",
        t.elapsed()
    );
    let id = v["message_id"].as_str().expect("id").to_string();
    wait_until(
        "delivered, as node B reads it",
        Duration::from_secs(10),
        || {
            let (api, id) = (&api_b, id.clone());
            async move { api.status(&id).await == "delivered" }
        },
    )
    .await;
    // Up: published through node A, read from node B's stream.
    let mut resp = common::client()
        .post(format!("http://{addr}/v1/channels/frontdesk.checkin"))
        .insert_header(("Authorization", format!("Bearer {TOKEN}")))
        .insert_header(("Idempotency-Key", "checkin-9"))
        .send_json(&json!({"appointment_id": 9, "arrived_at": "2026-12-03T10:00:00Z"}))
        .await
        .expect("publish");
    assert_eq!(resp.status().as_u16(), 202, "{:?}", resp.body().await);
    let mut stream = api_b
        .client
        .get(format!("{}/v1/channels/stream", api_b.base))
        .insert_header(("Authorization", format!("Bearer {}", api_b.token)))
        .timeout(Duration::from_secs(3600))
        .send()
        .await
        .expect("stream at node b");
    let mut buf = String::new();
    let deadline = Instant::now() + Duration::from_secs(15);
    while !buf.contains("checkin-9") {
        let chunk = tokio::time::timeout_at(deadline.into(), stream.next())
            .await
            .expect("the check-in within 15 s")
            .expect("stream open")
            .expect("chunk");
        buf.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(buf.contains("\"clinic_id\":\"clinic-001\""), "{buf}");
    drop(stream);
    b.stop().await;
    fleet.stop().await;
    // The driver blocks on its own runtime: a plain thread.
    let _ = std::thread::spawn(move || {
        if let Ok(mut c) = ::postgres::Client::connect(&url, ::postgres::NoTls) {
            let _ = c.batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"));
        }
    })
    .join();
}

/// A clinic whose agent has a different data key than the gateway (a key not rolled out there
/// yet): its call pops are refused at the agent, by field, and end `refused` at the gateway
/// (never shown to the desk, never retried); its check-ins are refused by the gateway, by field;
/// the clinic with the right key is unaffected. Nothing of the payloads reaches a log.
#[actix_rt::test]
async fn a_clinic_with_another_data_key_refuses_encrypted_messages_by_field_both_ways() {
    let dir = tempfile::tempdir().expect("tempdir");
    init_logs(dir.path());
    let mut fleet = Fleet::new(dir.path(), 2, HB).expect("fleet");
    let other = dir.path().join("other-dk1.key");
    tether::security::keys::write_data_key(&other).expect("key");
    fleet.clinics[1]
        .config
        .encryption
        .as_mut()
        .expect("the fleet's agents encrypt")
        .keys[0]
        .file = other;
    fleet.start_agents().await.expect("agents");
    let mut desks = Vec::new();
    for c in &fleet.clinics {
        let board = c.agent.as_ref().expect("agent").channels.clone();
        wait_until("channels declared", Duration::from_secs(15), || {
            let n = board.channels().len();
            async move { n == 3 }
        })
        .await;
        let addr = serve_local_endpoint(c, TOKEN).await.expect("endpoint");
        desks.push((addr, subscribe_sse(addr, "voip.call").await));
    }
    let api = Api::of(&fleet);
    let mut ids = Vec::new();
    for c in ["clinic-001", "clinic-002"] {
        let (s, v) = api
            .post(
                &format!("/v1/clinics/{c}/channels/voip.call"),
                json!({"call_id": format!("{c}-k"), "state": "ringing", "caller": "+1-555-0177"}),
            )
            .await;
        assert_eq!(s, 202, "{v}");
        ids.push(v["message_id"].as_str().expect("id").to_string());
    }
    for (id, want) in ids.iter().zip(["delivered", "refused"]) {
        wait_until(want, Duration::from_secs(15), || {
            let (api, id) = (&api, id.clone());
            async move { api.status(&id).await == want }
        })
        .await;
    }
    assert_eq!(received_ids(&desks[0].1), ["clinic-001-k"]);
    assert_eq!(
        desks[0].1.lock().expect("inbox")[0].0["payload"]["caller"],
        "+1-555-0177"
    );
    assert!(
        received_ids(&desks[1].1).is_empty(),
        "what cannot be decrypted is never shown"
    );
    let text = api.metrics().await;
    assert!(
        text.contains("tether_gateway_channel_refused_total{channel=\"voip.call\"} 1"),
        "{text}"
    );
    // Up: the gateway cannot open clinic 2's check-in; clinic 1's is accepted.
    let checkin = json!({"appointment_id": 5, "arrived_at": "2026-12-03T09:00:00Z"});
    let mut answers = Vec::new();
    for (addr, _) in &desks {
        let mut resp = common::client()
            .post(format!("http://{addr}/v1/channels/frontdesk.checkin"))
            .insert_header(("Authorization", format!("Bearer {TOKEN}")))
            .send_json(&checkin)
            .await
            .expect("publish");
        let v: Value = resp.json().await.unwrap_or(Value::Null);
        answers.push((resp.status().as_u16(), v));
    }
    assert_eq!(answers[0].0, 202, "{:?}", answers[0]);
    assert_eq!(
        (answers[1].0, answers[1].1["field"].as_str()),
        (422, Some("payload/appointment_id")),
        "{:?}",
        answers[1]
    );
    let counts = fleet.clinics[1]
        .agent
        .as_ref()
        .expect("agent")
        .channels
        .counts();
    let refused = |name: &str| {
        counts
            .iter()
            .find(|(n, _)| n == name)
            .map_or(0, |(_, c)| c.refused)
    };
    assert_eq!((refused("voip.call"), refused("frontdesk.checkin")), (1, 1));
    let agent_log = read_log(dir.path(), "message");
    assert!(
        agent_log.contains("event=channel_message_refused channel=voip.call")
            && agent_log.contains("field=/caller"),
        "the agent says which field it could not decrypt"
    );
    for log in ["message", "error", "audit", "connection"] {
        assert!(
            !read_log(dir.path(), log).contains("555-0177"),
            "no payload in {log}.log"
        );
    }
    fleet.stop().await;
}

/// Channels that list `encrypt` fields, frame by frame: an agent that does not say
/// `channel_encryption` is not told of them and gets none of their messages (they wait, in
/// order, for one that does); what it publishes on them in clear is refused by field. An agent
/// that does gets the fields as ciphertext only its data key opens, for its clinic and that
/// message; the gateway decrypts what it publishes, refuses a ciphertext moved to another
/// message, and records the agent's `refused` (a field it cannot decrypt) as final.
#[actix_rt::test]
async fn encrypted_channels_are_withheld_from_older_agents_sealed_per_message_and_refusals_are_final(
) {
    use tether::security::crypto::{DataKeys, FieldCipher};
    use tether::security::keys::write_data_key;
    let dir = tempfile::tempdir().expect("tempdir");
    init_logs(dir.path());
    let key_file = dir.path().join("dk1.key");
    write_data_key(&key_file).expect("key");
    let mut keys = DataKeys::default();
    keys.add_file("dk1", &key_file).expect("add");
    keys.set_active("dk1").expect("active");
    let cipher = FieldCipher::new(keys, HashMap::new());
    let gw = tether::gateway::start(
        tether::gateway::GatewaySettings {
            channels: tether::fleet::encrypted_samples(),
            ..gateway_settings(dir.path(), Duration::from_secs(5))
        },
        tether::gateway::GatewaySecurity {
            decrypt: Some(cipher.clone()),
            ..tether::gateway::GatewaySecurity::insecure()
        },
    )
    .expect("gateway");
    let base = gw.http_url();
    let clinic = "clinic-e";
    let hello = |features: Value| {
        json!({"v": 1, "type": "hello", "clinic_id": clinic, "agent_version": "t",
               "last_acked_seq": 0, "source_id": 1, "features": features})
    };
    /// The next frame of `kind`, answering pings (others are skipped).
    async fn next_of(ws: &mut common::ws::Ws, kind: &str) -> Value {
        loop {
            let v = common::ws::next_json(ws).await.expect("open");
            if v["type"] == kind {
                return v;
            }
        }
    }
    let names = |w: &Value| -> Vec<String> {
        w["channels"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|c| c["name"].as_str().unwrap_or_default().to_string())
                    .collect()
            })
            .unwrap_or_default()
    };

    // An older agent: told of notice.broadcast only.
    let mut old = common::ws::connect(&gw.ws_url()).await;
    common::ws::send(&mut old, hello(json!(["channels"]))).await;
    let welcome = next_of(&mut old, "welcome").await;
    assert_eq!(names(&welcome), ["notice.broadcast"], "{welcome}");
    let call_body =
        json!({"call_id": "c-1", "state": "ringing", "caller": "+1-555-0199", "patient_id": 1234});
    let (s, v) = post_json(
        &format!("{base}/v1/clinics/{clinic}/channels/voip.call"),
        &call_body,
    )
    .await;
    assert_eq!(s, 202, "{v}");
    let call_id = v["message_id"].as_str().expect("id").to_string();
    let (s, v) = post_json(
        &format!("{base}/v1/clinics/{clinic}/channels/notice.broadcast"),
        &json!({"notice_id": "n1", "title": "t", "severity": "info"}),
    )
    .await;
    assert_eq!(s, 202, "{v}");
    let notice_id = v["message_id"].as_str().expect("id").to_string();
    // The notice, posted after the call, arrives; the call is passed over and waits.
    let m = next_of(&mut old, "channel").await;
    assert_eq!(m["message_id"], notice_id.as_str(), "{m}");
    common::ws::send(
        &mut old,
        json!({"v": 1, "type": "channel_ack", "message_id": notice_id, "status": "delivered"}),
    )
    .await;
    let status = |id: String| {
        let base = base.clone();
        async move {
            let (_, v) = get_json(&format!("{base}/v1/channels/messages/{id}")).await;
            v["status"].as_str().unwrap_or_default().to_string()
        }
    };
    wait_until("the notice delivered", Duration::from_secs(10), || {
        status(notice_id.clone()).map(|s| s == "delivered")
    })
    .await;
    assert_eq!(status(call_id.clone()).await, "pending", "never sent to it");
    // What it publishes in clear on an encrypted channel is refused by field.
    let checkin = |id: &str, payload: Value| {
        json!({"v": 1, "type": "channel", "message_id": id, "channel": "frontdesk.checkin",
               "payload": payload, "published_at": "2026-12-03T09:00:00.000Z"})
    };
    let plain = json!({"appointment_id": 77, "arrived_at": "2026-12-03T09:00:00Z"});
    common::ws::send(&mut old, checkin("ci-0", plain.clone())).await;
    let a = next_of(&mut old, "channel_ack").await;
    assert_eq!(
        (a["status"].as_str(), a["field"].as_str()),
        (Some("refused"), Some("payload/appointment_id")),
        "{a}"
    );
    assert!(
        a["reason"]
            .as_str()
            .is_some_and(|r| r.contains("encrypted")),
        "{a}"
    );
    drop(old);

    // The upgraded agent: told of all three, with the fields they encrypt.
    let mut new = common::ws::connect(&gw.ws_url()).await;
    common::ws::send(&mut new, hello(json!(["channels", "channel_encryption"]))).await;
    let welcome = next_of(&mut new, "welcome").await;
    assert_eq!(
        names(&welcome),
        ["frontdesk.checkin", "notice.broadcast", "voip.call"]
    );
    let call = next_of(&mut new, "channel").await;
    assert_eq!(call["message_id"], call_id.as_str(), "{call}");
    let text = call.to_string();
    assert!(
        !text.contains("555-0199") && !text.contains("1234"),
        "ciphertext on the wire: {text}"
    );
    let fields = ["caller".to_string(), "patient_id".to_string()];
    let mut payload = call["payload"].as_object().cloned().expect("payload");
    assert!(
        payload["caller"]
            .as_str()
            .is_some_and(|s| s.starts_with("enc:v1:dk1:")),
        "{payload:?}"
    );
    cipher
        .open_channel(clinic, "voip.call", &call_id, &mut payload, &fields)
        .expect("opens for this clinic and message");
    assert_eq!(Value::Object(payload), call_body);
    // It could not be decrypted at the clinic: refused, final, counted.
    common::ws::send(
        &mut new,
        json!({"v": 1, "type": "channel_ack", "message_id": call_id, "status": "refused",
               "reason": "data key dk1 is not configured here", "field": "/caller"}),
    )
    .await;
    wait_until("the call refused", Duration::from_secs(10), || {
        status(call_id.clone()).map(|s| s == "refused")
    })
    .await;
    let (_, metrics) = {
        let mut resp = common::client()
            .get(format!("{base}/metrics"))
            .send()
            .await
            .expect("metrics");
        let body = resp.body().limit(1 << 22).await.expect("body");
        (200, String::from_utf8_lossy(&body).to_string())
    };
    assert!(
        metrics.contains("tether_gateway_channel_refused_total{channel=\"voip.call\"} 1"),
        "{metrics}"
    );

    // Up: sealed for its message, accepted and kept decrypted; moved to another id, refused.
    let mut sealed = plain.as_object().cloned().expect("object");
    cipher
        .seal_channel(
            clinic,
            "frontdesk.checkin",
            "ci-1",
            &mut sealed,
            &["appointment_id".to_string()],
        )
        .expect("seal");
    common::ws::send(&mut new, checkin("ci-1", Value::Object(sealed.clone()))).await;
    let a = next_of(&mut new, "channel_ack").await;
    assert_eq!(
        (a["message_id"].as_str(), a["status"].as_str()),
        (Some("ci-1"), Some("accepted")),
        "{a}"
    );
    common::ws::send(&mut new, checkin("ci-2", Value::Object(sealed))).await;
    let a = next_of(&mut new, "channel_ack").await;
    assert_eq!(
        (a["status"].as_str(), a["field"].as_str()),
        (Some("refused"), Some("payload/appointment_id")),
        "{a}"
    );
    let page = gw.store.up_channel_page(0, 10).await.expect("page");
    assert_eq!(page.len(), 1, "{page:?}");
    let kept: Value =
        serde_json::from_str(page[0].payload.as_deref().unwrap_or("null")).expect("json");
    assert_eq!(
        kept, plain,
        "the gateway holds the key: kept decrypted, as rows are"
    );
    for log in ["message", "error", "audit", "connection"] {
        let text = read_log(dir.path(), log);
        assert!(
            !text.contains("555-0199") && !text.contains("+1-555"),
            "no payload in {log}.log"
        );
    }
    gw.server.stop(true).await;
}

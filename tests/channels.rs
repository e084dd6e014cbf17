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
use futures_util::StreamExt;
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
        json!({"call_id": "missed-1", "state": "ringing"}),
    )
    .await;
    assert_eq!(s, 202, "{v}");
    let call = v["message_id"].as_str().expect("id").to_string();
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

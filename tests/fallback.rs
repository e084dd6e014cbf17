//! The HTTP fallback transport: clinics whose proxies refuse or strip the WebSocket upgrade.
//! A real gateway and real agents in one process; between them, where a test needs one, a
//! small HTTP-aware proxy that passes, strips or refuses `Upgrade` on command. Every test ends
//! with the history check (0 lost, 0 duplicated) and checks the cloud updates landed once.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use serde_json::json;
use tether::fleet::{cloud_id, Fleet};
use tether_actors::AgentStats;

const HB: Duration = Duration::from_millis(500);

/// What the proxy does with a request carrying `Upgrade`.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u8)]
enum Upgrades {
    Pass = 0,
    /// Forward the request without `Upgrade` (the gateway then answers it as plain HTTP).
    Strip = 1,
    /// Answer `403 Forbidden` itself.
    Refuse = 2,
}

/// A reverse proxy on 127.0.0.1:0 that reads each HTTP/1.1 request on a connection (head and
/// `Content-Length` body) and treats upgrades as told; everything else is forwarded as is.
struct UpgradeProxy {
    addr: SocketAddr,
    mode: Arc<AtomicU8>,
    /// Upgrades stripped or refused so far.
    blocked: Arc<AtomicUsize>,
    /// Upgrades passed so far.
    passed: Arc<AtomicUsize>,
}

impl UpgradeProxy {
    fn start(upstream: SocketAddr, mode: Upgrades) -> UpgradeProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let p = UpgradeProxy {
            addr,
            mode: Arc::new(AtomicU8::new(mode as u8)),
            blocked: Arc::new(AtomicUsize::new(0)),
            passed: Arc::new(AtomicUsize::new(0)),
        };
        let (m, b, ps) = (p.mode.clone(), p.blocked.clone(), p.passed.clone());
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let (m, b, ps) = (m.clone(), b.clone(), ps.clone());
                std::thread::spawn(move || {
                    let _ = relay(client, upstream, &m, &b, &ps);
                });
            }
        });
        p
    }

    fn set(&self, mode: Upgrades) {
        self.mode.store(mode as u8, Ordering::SeqCst);
    }
}

fn relay(
    client: TcpStream,
    upstream: SocketAddr,
    mode: &AtomicU8,
    blocked: &AtomicUsize,
    passed: &AtomicUsize,
) -> std::io::Result<()> {
    let mut server = TcpStream::connect(upstream)?;
    let mut back_from = server.try_clone()?;
    let mut back_to = client.try_clone()?;
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut back_from, &mut back_to);
        let _ = back_to.shutdown(std::net::Shutdown::Both);
    });
    let mut reader = BufReader::new(client);
    loop {
        let mut head = Vec::new();
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line)? == 0 {
                return Ok(());
            }
            let end = line == "\r\n";
            head.push(line);
            if end {
                break;
            }
        }
        let header = |name: &str| {
            head.iter().find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.trim()
                    .eq_ignore_ascii_case(name)
                    .then(|| v.trim().to_string())
            })
        };
        let upgrade = header("upgrade").is_some();
        let length: usize = header("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let mode = mode.load(Ordering::SeqCst);
        if upgrade && mode == Upgrades::Refuse as u8 {
            blocked.fetch_add(1, Ordering::SeqCst);
            let client = reader.get_mut();
            client.write_all(
                b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            )?;
            let _ = server.shutdown(std::net::Shutdown::Both);
            return client.shutdown(std::net::Shutdown::Both);
        }
        if upgrade && mode == Upgrades::Strip as u8 {
            blocked.fetch_add(1, Ordering::SeqCst);
            head.retain(|l| {
                let k = l
                    .split(':')
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_ascii_lowercase();
                k != "upgrade" && k != "connection" && !k.starts_with("sec-websocket")
            });
        }
        for l in &head {
            server.write_all(l.as_bytes())?;
        }
        if upgrade && mode == Upgrades::Pass as u8 {
            passed.fetch_add(1, Ordering::SeqCst);
            // From here on it is a WebSocket: bytes both ways.
            std::io::copy(&mut reader, &mut server)?;
            return Ok(());
        }
        let mut body = vec![0u8; length];
        reader.read_exact(&mut body)?;
        server.write_all(&body)?;
    }
}

fn transport_of(fleet: &Fleet, clinic: &str) -> impl std::future::Future<Output = String> {
    let url = format!("{}/v1/clinics/{clinic}", fleet.http_url());
    let token = fleet.admin_token.clone();
    let client = fleet.rest_client().expect("client");
    async move {
        let mut req = client.get(url);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let Ok(mut resp) = req.send().await else {
            return String::new();
        };
        let v: serde_json::Value = resp.json().await.unwrap_or_default();
        if v["connected"] != true {
            return String::new();
        }
        v["transport"].as_str().unwrap_or("").to_string()
    }
}

/// Queues `n` cloud updates per clinic and returns their ids with (clinic index, n).
async fn post_updates(fleet: &Fleet, from: u64, n: u64) -> Vec<(usize, u64, String)> {
    let base = fleet.http_url();
    let mut sent = Vec::new();
    for k in from..from + n * fleet.clinics.len() as u64 {
        let ci = (k % fleet.clinics.len() as u64) as usize;
        let clinic = &fleet.clinics[ci].id;
        let id = cloud_id(k);
        let body = json!({"entity": "patient", "op": "upsert", "key": {"id": id}, "row": {"id": id, "name": format!("Cloud {k}")}});
        let (status, v) = post_as(
            Some(fleet),
            &format!("{base}/v1/clinics/{clinic}/updates"),
            &body,
        )
        .await;
        assert_eq!(status, 202, "{v}");
        let uid = v["update_id"].as_str().expect("update_id").to_string();
        sent.push((ci, k, uid));
    }
    sent
}

async fn wait_applied(fleet: &Fleet, sent: &[(usize, u64, String)]) {
    let store = fleet.store().expect("store");
    wait_until(
        "every update to be applied",
        Duration::from_secs(30),
        || {
            let done = sent.iter().all(|(_, _, id)| {
                tether::gateway::store::wait(store.update(id))
                    .ok()
                    .flatten()
                    .map(|u| u.status)
                    .as_deref()
                    == Some("applied")
            });
            async move { done }
        },
    )
    .await;
    for (ci, k, id) in sent {
        let (rows, inbox) = applied_counts(&fleet.clinics[*ci].db, cloud_id(*k), id);
        assert_eq!(inbox, 1, "update {id} applied once");
        assert_eq!(rows, 1, "update {id} row present");
    }
}

fn echoes(sent: &[(usize, u64, String)]) -> Vec<(usize, String, serde_json::Value)> {
    sent.iter()
        .map(|(ci, k, _)| (*ci, "patient".to_string(), json!({"id": cloud_id(*k)})))
        .collect()
}

fn stats(fleet: &Fleet, i: usize) -> Arc<AgentStats> {
    fleet.clinics[i]
        .agent
        .as_ref()
        .expect("agent running")
        .handle
        .stats
        .clone()
}

/// `transport: http` under the full security stack (mutual TLS, clinic tokens, encrypted
/// fields): sync both ways while the links are dropped again and again.
#[actix_rt::test]
async fn http_transport_syncs_both_ways_through_link_drops_under_mutual_tls() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut fleet = Fleet::new(dir.path(), 2, HB).expect("fleet");
    for c in &mut fleet.clinics {
        c.config.gateway.transport = "http".into();
    }
    fleet.start_agents().await.expect("agents");
    for c in &fleet.clinics {
        let id = c.id.clone();
        wait_until("an http session", Duration::from_secs(20), || {
            let t = transport_of(&fleet, &id);
            async move { t.await == "http" }
        })
        .await;
    }
    let dbs: Vec<_> = fleet.clinics.iter().map(|c| c.db.clone()).collect();
    let writer = std::thread::spawn(move || {
        for db in &dbs {
            write_activity(db, 400);
        }
    });
    let sent = post_updates(&fleet, 0, 10).await;
    // Drop both links, wait until both are back over HTTP, again, while batches are in flight.
    let links = |i: usize| AgentStats::get(&stats(&fleet, i).links_up);
    while !writer.is_finished() || (0..2).any(|i| links(i) < 3) {
        let before: Vec<u64> = (0..2).map(links).collect();
        for c in &fleet.clinics {
            if let Some(conn) = c
                .agent
                .as_ref()
                .and_then(|a| a.handle.slots.connection.get())
            {
                conn.do_send(tether_actors::connection::DropLink);
            }
        }
        wait_until("both links back", Duration::from_secs(20), || {
            let back = (0..2).all(|i| links(i) > before[i]);
            async move { back }
        })
        .await;
    }
    writer.join().expect("writer");
    wait_applied(&fleet, &sent).await;
    wait_drained(&fleet, Duration::from_secs(60)).await;
    assert_history_clean(&fleet, &echoes(&sent));
    for i in 0..2 {
        let s = stats(&fleet, i);
        assert!(s.on_http.load(Ordering::Relaxed));
        assert_eq!(AgentStats::get(&s.fallbacks), 0, "forced, not a fallback");
    }
    // A graceful stop over HTTP: the close is answered, nothing is left unacknowledged.
    for c in &fleet.clinics {
        let a = c.agent.as_ref().expect("agent");
        let report = a.handle.drain(Duration::from_secs(5)).await;
        assert!(report.clean(), "{report:?}");
        assert!(!report.close_timed_out, "{report:?}");
    }
    fleet.stop().await;
}

/// The gateway's side of the fallback, request by request: the session behaves exactly as over
/// a WebSocket, retries are idempotent, and bad requests get answers that name the problem.
#[actix_rt::test]
async fn http_endpoints_speak_the_protocol_and_refuse_what_is_wrong() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fleet = Fleet::insecure(dir.path(), 1, HB).expect("fleet");
    let base = format!("{}/v1/http", fleet.http_url());
    let c = client();
    let mut resp = c.post(format!("{base}/open")).send().await.expect("open");
    assert_eq!(resp.status().as_u16(), 201);
    let opened: tether_schemas::http::Opened = resp.json().await.expect("opened");
    assert!(
        opened.channel.len() >= 32,
        "unguessable id: {}",
        opened.channel
    );
    let ch = format!("{base}/{}", opened.channel);
    let send = |seq: u64, body: String| {
        let c = client();
        let url = format!("{ch}/send?seq={seq}");
        async move {
            let mut r = c.post(url).send_body(body).await.expect("send");
            let status = r.status().as_u16();
            let text = String::from_utf8_lossy(&r.body().await.unwrap_or_default()).to_string();
            (status, text)
        }
    };
    let poll = |after: u64| {
        let c = client();
        let url = format!("{ch}/poll?after={after}&wait_ms=2000");
        async move {
            let mut r = c.get(url).send().await.expect("poll");
            assert_eq!(r.status().as_u16(), 200);
            let v: serde_json::Value = r.json().limit(1 << 20).await.expect("polled");
            v
        }
    };
    let hello = json!({"v": 1, "type": "hello", "clinic_id": "clinic-001", "agent_version": "test", "last_acked_seq": 0, "source_id": 7});
    assert_eq!(send(1, hello.to_string()).await.0, 204);
    let v = poll(0).await;
    assert_eq!(v["messages"][0]["type"], "welcome", "{v}");
    let cursor = v["cursor"].as_u64().expect("cursor");
    // A lost answer: the same poll again gets the same welcome.
    let again = poll(0).await;
    assert_eq!(again["messages"][0]["type"], "welcome", "{again}");
    // A retried send (same seq) is ignored: no second hello reaches the session.
    assert_eq!(send(1, hello.to_string()).await.0, 204);
    // Two events in one body, one per line.
    let ev = |seq: u64, prev: u64| json!({"v": 1, "type": "events", "prev_seq": prev, "events": [{"seq": seq, "entity": "patient", "op": "insert", "key": {"id": seq}, "row": {"id": seq, "name": "x"}, "committed_at": "2026-11-28T00:00:00Z"}]});
    let body = format!("{}\n{}", ev(1, 0), ev(2, 1));
    assert_eq!(send(2, body).await.0, 204);
    let mut acked = 0;
    let mut after = cursor;
    let mut seen = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while acked < 2 {
        assert!(std::time::Instant::now() < deadline, "no ack: {seen:?}");
        let v = poll(after).await;
        after = v["cursor"].as_u64().expect("cursor");
        for m in v["messages"].as_array().expect("messages") {
            seen.push(m.clone());
            if m["type"] == "ack" {
                acked = m["seq"].as_u64().unwrap_or(0);
            }
        }
    }
    assert!(
        seen.iter().all(|m| m["type"] != "error"),
        "the retried hello reached the session: {seen:?}"
    );
    // A gap in the send sequence names both numbers.
    let (status, text) = send(5, ev(3, 2).to_string()).await;
    assert_eq!(status, 409);
    assert!(text.contains("seq 5 does not follow 2"), "{text}");
    // No seq at all.
    let mut r = c
        .post(format!("{ch}/send"))
        .send_body("{}")
        .await
        .expect("send");
    assert_eq!(r.status().as_u16(), 400);
    let text = String::from_utf8_lossy(&r.body().await.unwrap_or_default()).to_string();
    assert!(text.contains("seq"), "{text}");
    // A channel that does not exist.
    let r = c
        .get(format!("{base}/hdeadbeef/poll?after=0"))
        .send()
        .await
        .expect("poll");
    assert_eq!(r.status().as_u16(), 404);
    // The agent's close ends the session; the next poll says so.
    let r = c
        .post(format!("{ch}/close"))
        .send_json(&json!({"code": 1001, "reason": "agent shutting down"}))
        .await
        .expect("close");
    assert_eq!(r.status().as_u16(), 204);
    let v = poll(after).await;
    assert!(v["closed"].is_object(), "{v}");
    let (status, _) = send(3, ev(3, 2).to_string()).await;
    assert_eq!(status, 410, "sends after the close are refused");
    let store = fleet.store().expect("store");
    assert_eq!(
        tether::gateway::store::wait(store.clinics()).expect("clinics")[0].acked_seq,
        2
    );
    fleet.stop().await;
}

/// `auto` behind a proxy that strips the upgrade: falls back to HTTP after `fallback_after`
/// blocked attempts, syncs both ways, and returns to the WebSocket once upgrades pass again.
#[actix_rt::test]
async fn auto_falls_back_when_the_upgrade_is_stripped_and_returns_when_it_passes() {
    run_fallback(Upgrades::Strip).await;
}

/// The same behind a proxy that refuses upgrades with its own 403.
#[actix_rt::test]
async fn auto_falls_back_when_a_proxy_refuses_the_upgrade() {
    run_fallback(Upgrades::Refuse).await;
}

async fn run_fallback(block: Upgrades) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut fleet = Fleet::insecure(dir.path(), 1, HB).expect("fleet");
    let gw = fleet.gateway.as_ref().expect("gateway").addr;
    let proxy = UpgradeProxy::start(gw, block);
    for c in &mut fleet.clinics {
        c.config.gateway.url = format!("ws://{}/v1/ws", proxy.addr);
        c.config.gateway.fallback_after = 2;
        c.config.gateway.upgrade_retry = tether::config::Dur::millis(300);
    }
    fleet.start_agents().await.expect("agents");
    let id = fleet.clinics[0].id.clone();
    wait_until("the fallback to HTTP", Duration::from_secs(20), || {
        let t = transport_of(&fleet, &id);
        async move { t.await == "http" }
    })
    .await;
    let s = stats(&fleet, 0);
    assert_eq!(AgentStats::get(&s.fallbacks), 1);
    assert!(proxy.blocked.load(Ordering::SeqCst) >= 2);
    let db = fleet.clinics[0].db.clone();
    let w = db.clone();
    let writer = std::thread::spawn(move || write_activity(&w, 300));
    let sent = post_updates(&fleet, 100, 10).await;
    wait_applied(&fleet, &sent).await;
    writer.join().expect("writer");
    wait_drained(&fleet, Duration::from_secs(30)).await;
    // Still blocked: the probes keep failing, the clinic stays on HTTP.
    let probes_before = proxy.blocked.load(Ordering::SeqCst);
    wait_until("a failed upgrade probe", Duration::from_secs(10), || {
        let n = proxy.blocked.load(Ordering::SeqCst);
        async move { n > probes_before }
    })
    .await;
    assert_eq!(transport_of(&fleet, &id).await, "http");
    // The block is lifted: back to a WebSocket while clinic writes and cloud updates flow.
    let w = db.clone();
    let writer = std::thread::spawn(move || write_activity(&w, 300));
    proxy.set(Upgrades::Pass);
    wait_until("the return to WebSocket", Duration::from_secs(20), || {
        let t = transport_of(&fleet, &id);
        async move { t.await == "websocket" }
    })
    .await;
    assert!(!s.on_http.load(Ordering::Relaxed));
    assert!(proxy.passed.load(Ordering::SeqCst) >= 1);
    let more = post_updates(&fleet, 200, 10).await;
    writer.join().expect("writer");
    wait_applied(&fleet, &more).await;
    wait_drained(&fleet, Duration::from_secs(30)).await;
    let all: Vec<_> = sent.iter().chain(&more).cloned().collect();
    assert_history_clean(&fleet, &echoes(&all));
    fleet.stop().await;
}

//! Lightweight protocol clients (hello, welcome, pings, events) for storm tests and
//! benchmarks: thousands in one process, each with the agent's full-jitter backoff. They speak
//! the real protocol to a real gateway but keep no database.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use awc::error::WsClientError;
use awc::ws::{self, Frame};
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tether_actors::backoff::Backoff;

/// Shared counters of a swarm of clients.
#[derive(Debug, Default)]
pub struct Swarm {
    /// Clients with a live session (welcome received, not closed since).
    pub up: AtomicU64,
    pub sessions: AtomicU64,
    /// Upgrades answered 503 by the gateway's admission limit.
    pub refused: AtomicU64,
    pub failures: AtomicU64,
    pub acked_events: AtomicU64,
    pub stop: AtomicBool,
    /// Send→ack latencies in microseconds (latency scenario).
    pub latencies_us: Mutex<Vec<u64>>,
    /// When each cloud update arrived (update id → instant); every one is answered `applied`.
    pub updates: Mutex<std::collections::HashMap<String, Instant>>,
    /// Channel messages received, as (clinic, message id, payload's `call_id`, when); every
    /// one is answered `delivered`, as an agent does once a subscriber has it.
    pub channel_messages: Mutex<Vec<(String, String, String, Instant)>>,
    /// The highest position each clinic has seen acknowledged (the loss check compares the
    /// store with it).
    pub positions: Mutex<std::collections::HashMap<String, u64>>,
}

impl Swarm {
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }

    /// Forgets the latencies so far (a measurement window starts).
    pub fn clear_latencies(&self) {
        if let Ok(mut l) = self.latencies_us.lock() {
            l.clear();
        }
    }

    /// Stops every client and answers the latencies of the window, sorted.
    pub fn stop_with_latencies(&self) -> Vec<u64> {
        self.stop.store(true, Ordering::Relaxed);
        let mut l = self
            .latencies_us
            .lock()
            .map(|l| l.clone())
            .unwrap_or_default();
        l.sort_unstable();
        l
    }
}

#[derive(Clone)]
pub struct ClientSpec {
    pub url: String,
    pub clinic_id: String,
    /// TLS connector (wss) and extra headers (a token).
    pub tls: Option<openssl::ssl::SslConnector>,
    pub headers: Vec<(String, String)>,
    pub backoff_base: Duration,
    pub backoff_cap: Duration,
    /// Events per second to send once connected (0: idle).
    pub events_per_s: f64,
    /// The reconnect policy before December 2026, for comparison in `bench storm`: the backoff
    /// reset only after `stable_after` of link, a 1001 treated like any loss.
    pub legacy_backoff: bool,
    /// A session that hears nothing (not even a ping) for this long is taken for dead and
    /// dropped, as the agent does after three missed heartbeats; `None`: wait for the socket.
    pub silence_limit: Option<Duration>,
}

/// One HTTP client for a whole swarm on this thread (awc clients are cheap to clone and
/// costly to create: each owns a connector).
pub fn http_client(tls: Option<&openssl::ssl::SslConnector>) -> awc::Client {
    // No cap on simultaneous connections (awc's default is 100): every client holds one.
    let connector = awc::Connector::new()
        .limit(0)
        .timeout(Duration::from_secs(30));
    let b = awc::Client::builder().timeout(Duration::from_secs(30));
    match tls {
        Some(c) => b.connector(connector.openssl(c.clone())).finish(),
        None => b.connector(connector).finish(),
    }
}

/// Runs one client until `swarm.stop`: connect, hello, wait for welcome, keep the session
/// (answering pings, optionally sending events), reconnect with full jitter when it ends.
pub async fn run_client(spec: ClientSpec, http: awc::Client, swarm: Arc<Swarm>) {
    let mut backoff = Backoff::new(spec.backoff_base, spec.backoff_cap, Duration::from_secs(60));
    let mut seq = 0u64;
    while !swarm.stop.load(Ordering::Relaxed) {
        let mut req = http.ws(spec.url.as_str());
        for (k, v) in &spec.headers {
            req = req.header(k.as_str(), v.as_str());
        }
        let framed = match req.connect().await {
            Ok((_, f)) => f,
            Err(WsClientError::InvalidResponseStatus(s)) if s.as_u16() == 503 => {
                swarm.refused.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(backoff.next_delay(&mut rand::rng())).await;
                continue;
            }
            Err(_) => {
                swarm.failures.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(backoff.next_delay(&mut rand::rng())).await;
                continue;
            }
        };
        let mut ws = framed;
        let hello = json!({"v": 1, "type": "hello", "clinic_id": spec.clinic_id, "agent_version": "loadgen", "last_acked_seq": seq, "features": ["channels", "channel_encryption"]});
        if ws
            .send(ws::Message::Text(hello.to_string().into()))
            .await
            .is_err()
        {
            continue;
        }
        let mut up = false;
        let mut going_away = false;
        let mut sent_at: std::collections::VecDeque<(u64, Instant)> = Default::default();
        let period =
            (spec.events_per_s > 0.0).then(|| Duration::from_secs_f64(1.0 / spec.events_per_s));
        let mut tick = tokio::time::interval(period.unwrap_or(Duration::from_secs(3600)));
        tick.tick().await;
        let silence = spec.silence_limit.unwrap_or(Duration::from_secs(86_400));
        let mut heard = Instant::now();
        loop {
            if swarm.stop.load(Ordering::Relaxed) {
                let _ = ws.close().await;
                break;
            }
            tokio::select! {
                item = ws.next() => {
                    let Some(Ok(frame)) = item else { break };
                    heard = Instant::now();
                    match frame {
                        Frame::Ping(b) if ws.send(ws::Message::Pong(b.clone())).await.is_err() => break,
                        // Traffic answered on a welcomed link: the agent's policy resets the backoff.
                        Frame::Ping(_) if up && !spec.legacy_backoff => backoff.reset(),
                        Frame::Text(t) => {
                            let Ok(v) = serde_json::from_slice::<serde_json::Value>(&t) else { continue };
                            match v["type"].as_str() {
                                Some("welcome") => {
                                    up = true;
                                    // The gateway's position is the truth: what it has not
                                    // acknowledged is sent again (events are regenerated from
                                    // their sequence, so a resend is the same event).
                                    seq = v["acked_seq"].as_u64().unwrap_or(0);
                                    sent_at.clear();
                                    swarm.up.fetch_add(1, Ordering::Relaxed);
                                    swarm.sessions.fetch_add(1, Ordering::Relaxed);
                                    backoff.connected(Instant::now());
                                }
                                Some("ack") => {
                                    if !spec.legacy_backoff {
                                        backoff.reset();
                                    }
                                    let acked = v["seq"].as_u64().unwrap_or(0);
                                    let now = Instant::now();
                                    let mut lat = Vec::new();
                                    while sent_at.front().is_some_and(|(s, _)| *s <= acked) {
                                        if let Some((_, t)) = sent_at.pop_front() {
                                            lat.push(now.duration_since(t).as_micros() as u64);
                                        }
                                    }
                                    swarm.acked_events.fetch_add(lat.len() as u64, Ordering::Relaxed);
                                    if let Ok(mut p) = swarm.positions.lock() {
                                        let at = p.entry(spec.clinic_id.clone()).or_default();
                                        *at = (*at).max(acked);
                                    }
                                    if let Ok(mut l) = swarm.latencies_us.lock() {
                                        l.extend(lat);
                                    }
                                }
                                Some("update") => {
                                    let id = v["update_id"].as_str().unwrap_or_default().to_string();
                                    if let Ok(mut u) = swarm.updates.lock() {
                                        u.entry(id.clone()).or_insert_with(Instant::now);
                                    }
                                    let answer = json!({"v": 1, "type": "update_result", "update_id": id, "status": "applied"});
                                    if ws.send(ws::Message::Text(answer.to_string().into())).await.is_err() {
                                        break;
                                    }
                                }
                                Some("channel") => {
                                    let id = v["message_id"].as_str().unwrap_or_default().to_string();
                                    let call = v["payload"]["call_id"].as_str().unwrap_or_default().to_string();
                                    if let Ok(mut m) = swarm.channel_messages.lock() {
                                        m.push((spec.clinic_id.clone(), id.clone(), call, Instant::now()));
                                    }
                                    let answer = json!({"v": 1, "type": "channel_ack", "message_id": id, "status": "delivered"});
                                    if ws.send(ws::Message::Text(answer.to_string().into())).await.is_err() {
                                        break;
                                    }
                                }
                                // A call from the cloud: answered at once with no rows (the
                                // bench measures the path, not a database).
                                Some("rpc_request") => {
                                    let id = v["request_id"].as_str().unwrap_or_default();
                                    let answer = json!({"v": 1, "type": "rpc_response", "request_id": id, "status": "ok", "rows": []});
                                    if ws.send(ws::Message::Text(answer.to_string().into())).await.is_err() {
                                        break;
                                    }
                                }
                                _ => {}
                            }
                        }
                        Frame::Close(reason) => {
                            going_away = reason.is_some_and(|r| u16::from(r.code) == 1001);
                            break;
                        }
                        _ => {}
                    }
                }
                _ = tokio::time::sleep_until((heard + silence).into()) => {
                    // The gateway went silent (paused, or its host gone): drop the link.
                    break;
                }
                _ = tick.tick(), if up && period.is_some() => {
                    seq += 1;
                    let frame = json!({"v": 1, "type": "events", "prev_seq": seq - 1, "events": [
                        {"seq": seq, "entity": "payment", "op": "insert", "key": {"id": seq},
                         "row": {"id": seq, "amount_cents": 100}, "committed_at": "2026-01-01T00:00:00.000Z"}]});
                    sent_at.push_back((seq, Instant::now()));
                    if ws.send(ws::Message::Text(frame.to_string().into())).await.is_err() {
                        break;
                    }
                }
            }
        }
        if up {
            swarm.up.fetch_sub(1, Ordering::Relaxed);
            backoff.disconnected(Instant::now());
        }
        if !swarm.stop.load(Ordering::Relaxed) {
            let delay = if going_away && !spec.legacy_backoff {
                backoff.after_going_away(&mut rand::rng())
            } else {
                backoff.next_delay(&mut rand::rng())
            };
            tokio::time::sleep(delay).await;
        }
    }
}

/// Resident set size of this process, in KiB (Linux; 0 elsewhere).
pub fn rss_kb() -> u64 {
    rss_kb_of("self")
}

/// Resident set size of a process by pid (`"self"` for this one), in KiB.
pub fn rss_kb_of(pid: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// A TCP port nothing listens on right now on 127.0.0.1.
pub fn free_port() -> std::io::Result<u16> {
    std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()
        .map(|a| a.port())
}

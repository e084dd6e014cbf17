//! Findings of the independent chaos and attack run, each reproduced against a real gateway
//! (or real agent processes): frame limits at the header, fragmented messages, invalid UTF-8,
//! slow senders, dead sockets kept by the agent, and the reconnect delay after short outages.

mod common;

use std::time::{Duration, Instant};

use actix_codec::Framed;
use awc::ws::{self, Frame};
use awc::BoxedSocket;
use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tether::gateway::{self, GatewayHandle, GatewaySecurity};
use tokio::io::AsyncWriteExt;

type Ws = Framed<BoxedSocket, ws::Codec>;

const MAX: usize = 64 * 1024;

fn start(dir: &std::path::Path, hb: Duration) -> GatewayHandle {
    gateway::start(gateway_settings(dir, hb), GatewaySecurity::insecure()).expect("gateway")
}

async fn connect(gw: &GatewayHandle) -> Ws {
    let (_, ws) = client()
        .ws(gw.ws_url())
        .max_frame_size(4 * MAX)
        .connect()
        .await
        .expect("upgrade");
    ws
}

/// A session past `hello` and `welcome`.
async fn welcomed(gw: &GatewayHandle, clinic: &str) -> Ws {
    let mut ws = connect(gw).await;
    ws.send(ws::Message::Text(hello(clinic).into()))
        .await
        .expect("hello");
    let w = next(&mut ws, Duration::from_secs(5))
        .await
        .expect("welcome");
    assert_eq!(w["type"], "welcome", "{w}");
    ws
}

fn hello(clinic: &str) -> String {
    json!({"v": 1, "type": "hello", "clinic_id": clinic, "agent_version": "t", "last_acked_seq": 0})
        .to_string()
}

/// A masked client frame with a zero mask key (so the payload goes as is).
fn raw_frame(fin: bool, opcode: u8, announced: u64, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![if fin { 0x80 } else { 0 } | opcode];
    if announced < 126 {
        f.push(0x80 | announced as u8);
    } else if announced <= u64::from(u16::MAX) {
        f.push(0x80 | 126);
        f.extend_from_slice(&(announced as u16).to_be_bytes());
    } else {
        f.push(0x80 | 127);
        f.extend_from_slice(&announced.to_be_bytes());
    }
    f.extend_from_slice(&[0, 0, 0, 0]);
    f.extend_from_slice(payload);
    f
}

async fn write_raw(ws: &mut Ws, bytes: &[u8]) {
    ws.io_mut().write_all(bytes).await.expect("raw write");
    ws.io_mut().flush().await.expect("flush");
}

/// The next text message as JSON, or the close code (`Err`) once the gateway closes.
async fn next(ws: &mut Ws, limit: Duration) -> Result<Value, Option<u16>> {
    loop {
        let item = tokio::time::timeout(limit, ws.next())
            .await
            .unwrap_or_else(|_| panic!("nothing from the gateway within {limit:?}"));
        match item {
            Some(Ok(Frame::Text(t))) => {
                return Ok(serde_json::from_slice(&t).expect("JSON from the gateway"))
            }
            Some(Ok(Frame::Close(r))) => return Err(r.map(|r| u16::from(r.code))),
            Some(Ok(_)) => {}
            Some(Err(_)) | None => return Err(None),
        }
    }
}

/// Reads until the close frame; the JSON messages before it are returned with the code.
async fn until_close(ws: &mut Ws, limit: Duration) -> (Vec<Value>, Option<u16>) {
    let mut seen = Vec::new();
    loop {
        match next(ws, limit).await {
            Ok(v) => seen.push(v),
            Err(code) => return (seen, code),
        }
    }
}

#[actix_rt::test]
async fn a_header_announcing_2_pow_62_bytes_is_refused_at_the_header_with_1009() {
    let dir = tempfile::tempdir().expect("tempdir");
    // A long heartbeat: the close must come from the header check, not from eviction.
    let gw = start(dir.path(), Duration::from_secs(30));
    let mut ws = welcomed(&gw, "clinic-h").await;
    // The header alone, and a few payload bytes: nothing close to the announced length.
    write_raw(&mut ws, &raw_frame(true, 0x1, 1 << 62, b"{\"v\":1")).await;
    let started = Instant::now();
    let (seen, code) = until_close(&mut ws, Duration::from_secs(5)).await;
    assert_eq!(code, Some(1009), "close code; messages before it: {seen:?}");
    assert!(
        seen.iter().any(|m| m["code"] == "frame_too_large"),
        "an error frame names the problem: {seen:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));

    // A header just over the limit on a second connection, with the whole payload sent.
    let mut ws = welcomed(&gw, "clinic-i").await;
    write_raw(
        &mut ws,
        &raw_frame(true, 0x1, MAX as u64 + 1, &vec![b' '; MAX + 1]),
    )
    .await;
    let (_, code) = until_close(&mut ws, Duration::from_secs(5)).await;
    assert_eq!(code, Some(1009));
    gw.stop().await;
}

#[actix_rt::test]
async fn fragmented_messages_are_reassembled_and_limited_by_their_sum() {
    let dir = tempfile::tempdir().expect("tempdir");
    let gw = start(dir.path(), Duration::from_secs(30));
    let mut ws = connect(&gw).await;
    // hello in three fragments, with a ping between two of them (RFC 6455 §5.4).
    let h = hello("clinic-f");
    let (a, rest) = h.as_bytes().split_at(10);
    let (b, c) = rest.split_at(20);
    let mut bytes = raw_frame(false, 0x1, a.len() as u64, a);
    bytes.extend(raw_frame(false, 0x0, b.len() as u64, b));
    bytes.extend(raw_frame(true, 0x9, 0, b""));
    bytes.extend(raw_frame(true, 0x0, c.len() as u64, c));
    write_raw(&mut ws, &bytes).await;
    let welcome = next(&mut ws, Duration::from_secs(5))
        .await
        .expect("a fragmented hello is answered, not dropped");
    assert_eq!(welcome["type"], "welcome", "{welcome}");

    // An events message in fragments is stored and acknowledged.
    let events = json!({"v": 1, "type": "events", "prev_seq": 0, "events": [
        {"seq": 1, "entity": "payment", "op": "insert", "key": {"id": 1},
         "row": {"id": 1, "amount_cents": 100}, "committed_at": "2026-01-01T00:00:00.000Z"}]})
    .to_string();
    let (a, b) = events.as_bytes().split_at(events.len() / 2);
    let mut bytes = raw_frame(false, 0x1, a.len() as u64, a);
    bytes.extend(raw_frame(true, 0x0, b.len() as u64, b));
    write_raw(&mut ws, &bytes).await;
    let ack = next(&mut ws, Duration::from_secs(5)).await.expect("ack");
    assert_eq!(
        (ack["type"].as_str(), ack["seq"].as_u64()),
        (Some("ack"), Some(1)),
        "{ack}"
    );

    // Fragments each within the limit whose sum is not: 1009 at the fragment that passes it.
    let part = vec![b' '; MAX / 2];
    let mut bytes = raw_frame(false, 0x1, part.len() as u64, &part);
    bytes.extend(raw_frame(false, 0x0, part.len() as u64, &part));
    bytes.extend(raw_frame(true, 0x0, part.len() as u64, &part));
    write_raw(&mut ws, &bytes).await;
    let (_, code) = until_close(&mut ws, Duration::from_secs(5)).await;
    assert_eq!(code, Some(1009));
    gw.stop().await;
}

#[actix_rt::test]
async fn invalid_utf8_closes_with_1007_in_one_frame_or_in_fragments() {
    let dir = tempfile::tempdir().expect("tempdir");
    let gw = start(dir.path(), Duration::from_secs(30));
    for fragmented in [false, true] {
        let mut ws = welcomed(&gw, "clinic-u").await;
        let bad: &[u8] = b"{\"v\":1,\"type\":\"\xff\xfe\"}";
        let bytes = if fragmented {
            let mut b = raw_frame(false, 0x1, 5, &bad[..5]);
            b.extend(raw_frame(true, 0x0, (bad.len() - 5) as u64, &bad[5..]));
            b
        } else {
            raw_frame(true, 0x1, bad.len() as u64, bad)
        };
        write_raw(&mut ws, &bytes).await;
        let (_, code) = until_close(&mut ws, Duration::from_secs(5)).await;
        assert_eq!(code, Some(1007), "fragmented={fragmented}");
    }
    gw.stop().await;
}

#[actix_rt::test]
async fn a_slow_sender_of_a_large_frame_is_closed_in_bounded_time() {
    let dir = tempfile::tempdir().expect("tempdir");
    let hb = Duration::from_millis(200);
    let gw = start(dir.path(), hb);
    let mut ws = welcomed(&gw, "clinic-s").await;
    // A legal size, trickled a byte at a time: the bytes keep the link alive, but the message
    // must be complete within six heartbeat intervals.
    write_raw(&mut ws, &raw_frame(true, 0x1, 10_000, b"")).await;
    let started = Instant::now();
    let mut closed = None;
    while started.elapsed() < Duration::from_secs(10) {
        // Pacing the attack (one byte per 50 ms), not waiting for a result.
        if ws.io_mut().write_all(b" ").await.is_err() {
            break;
        }
        match tokio::time::timeout(Duration::from_millis(50), ws.next()).await {
            Ok(Some(Ok(Frame::Close(r)))) => {
                closed = Some(r.map(|r| u16::from(r.code)));
                break;
            }
            Ok(None) | Ok(Some(Err(_))) => break,
            _ => {}
        }
    }
    let took = started.elapsed();
    assert_eq!(closed, Some(Some(1008)), "after {took:?}");
    assert!(
        took >= hb * 5 && took < hb * 20,
        "closed after {took:?}, expected about six heartbeats ({:?})",
        hb * 6
    );
    gw.stop().await;
}

#[test]
fn a_gateway_restarted_three_times_in_a_minute_costs_seconds_not_minutes() {
    use common::procs::*;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("clinic.db");
    tether::fleet::create_sample_clinic(&db).expect("clinic");
    let listen = format!("127.0.0.1:{}", free_port());
    let (mut gw, addr) = start_gateway(dir.path(), &listen);
    // The production backoff (1 s doubling to 60 s), not the quick one of the other tests.
    let cfg = write_config(
        dir.path(),
        "agent",
        &format!(
            "agent:\n  clinic_id: clinic-k\n  database:\n    path: clinic.db\n  gateway:\n    url: ws://{addr}/v1/ws\n    insecure_plaintext: true\n    heartbeat_interval: 500ms\n    backoff:\n      initial: 1s\n      max: 60s\n  outbox:\n    poll_interval: 20ms\n  tables:\n    - {{table: patients, entity: patient, key: [id]}}\n    - {{table: appointments, entity: appointment, key: [id]}}\n    - {{table: payments, entity: payment, key: [id], direction: up}}\n  admin:\n    listen: off\n"
        ),
    );
    let mut agent = Proc(
        std::process::Command::new(BIN)
            .args(["agent", "--config"])
            .arg(&cfg)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .expect("agent"),
    );
    let stop = Arc::new(AtomicBool::new(false));
    let w = writer(db.clone(), stop.clone());
    wait_for("first acknowledgements", Duration::from_secs(20), || {
        acked(dir.path()) > 50
    });
    let mut waits = Vec::new();
    for _ in 0..3 {
        // A graceful restart: sessions are told 1001, the process is gone for a moment.
        assert!(terminate(&mut gw, Duration::from_secs(10)).success());
        let before = acked(dir.path());
        let (g, _) = start_gateway(dir.path(), &listen);
        gw = g;
        let back = Instant::now();
        wait_for(
            "the agent to sync again after the restart",
            Duration::from_secs(70),
            || acked(dir.path()) > before,
        );
        waits.push(back.elapsed());
    }
    // Each restart costs the jitter (≤ 1 s) plus the few 1–2 s retries while the gateway starts;
    // with a backoff that kept growing it costs tens of seconds by the third.
    let total: Duration = waits.iter().sum();
    assert!(
        waits.iter().all(|w| *w < Duration::from_secs(10)) && total < Duration::from_secs(15),
        "the agent came back {waits:?} after each restart; the gateway was back at once"
    );
    stop_and_drain(dir.path(), &db, &stop, w);
    agent.kill();
    gw.kill();
    final_check(dir.path());
}

#[actix_rt::test]
async fn strings_from_the_agent_reach_the_logs_cut_and_escaped() {
    let dir = tempfile::tempdir().expect("tempdir");
    init_logs(dir.path());
    let gw = start(dir.path(), Duration::from_secs(30));
    let mut ws = welcomed(&gw, "clinic-l").await;
    let long = format!(
        "\u{1b}[31mFORGED\nevent=auth_ok clinic=other {}",
        "A".repeat(5000)
    );
    // A parser error quoting the input, and an agent's free-text error message.
    for frame in [
        json!({"v": 1, "type": long}),
        json!({"v": 1, "type": "error", "code": "bad_frame", "message": long}),
    ] {
        ws.send(ws::Message::Text(frame.to_string().into()))
            .await
            .expect("send");
    }
    // The gateway answers the first with an error frame; then the log holds both lines.
    let answer = next(&mut ws, Duration::from_secs(5))
        .await
        .expect("error frame");
    assert_eq!(answer["type"], "error", "{answer}");
    wait_until("the agent_error line", Duration::from_secs(5), || {
        let done = read_log(dir.path(), "error").contains("event=agent_error");
        async move { done }
    })
    .await;
    let log = read_log(dir.path(), "error");
    for line in log.lines() {
        assert!(!line.contains('\u{1b}'), "a raw escape character: {line}");
        assert!(line.len() < 600, "an agent string logged in full: {line}");
        assert!(
            !line.starts_with("event=auth_ok"),
            "an injected line: {line}"
        );
    }
    assert!(!log.contains(&"A".repeat(200)), "{log}");
    assert!(log.contains("message_len="), "{log}");
    gw.stop().await;
}

#[actix_rt::test]
async fn the_http_fallback_refuses_an_oversized_body_by_its_announced_length() {
    use tokio::io::AsyncReadExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let gw = start(dir.path(), Duration::from_secs(30));
    let base = format!("http://{}/v1/http", gw.addr);
    let (status, opened) = post_json(&format!("{base}/open"), &json!({})).await;
    assert_eq!(status, 201, "{opened}");
    let channel = opened["channel"].as_str().expect("channel").to_string();
    // A raw request announcing 2^62 bytes and sending none of them.
    let mut tcp = tokio::net::TcpStream::connect(gw.addr)
        .await
        .expect("connect");
    let req = format!(
        "POST /v1/http/{channel}/send?seq=1 HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-ndjson\r\nContent-Length: {}\r\n\r\n",
        1u64 << 62
    );
    tcp.write_all(req.as_bytes()).await.expect("write");
    let mut answer = vec![0u8; 512];
    let n = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut answer))
        .await
        .expect("an answer without the body")
        .expect("read");
    let head = String::from_utf8_lossy(&answer[..n]).to_string();
    assert!(head.starts_with("HTTP/1.1 413"), "{head}");
    gw.stop().await;
}

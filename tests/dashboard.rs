//! The fleet dashboard end to end in Debian's headless Chromium (driven by playwright-core:
//! `tests/browser/dashboard.mjs`): a secure gateway and eight clinics, every tile connected, the
//! channels strip marking the channels that encrypt fields;
//! one agent stops and its tile turns offline within the heartbeat window. Saves a screenshot
//! to `target/test-artifacts/dashboard.png`. Then 500 simulated clinics (raw protocol clients:
//! some offline, lagging, with failed updates or flagged events): the whole fleet on one screen,
//! problems first, each problem said on its tile (`dashboard-500-compact.png`,
//! `dashboard-500-detail.png`). `.ci/run` installs chromium and playwright-core; without them
//! these tests fail and say what is missing.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use tether::fleet::Fleet;

const HB: Duration = Duration::from_millis(500);
const CLINICS: usize = 8;

fn browser_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser")
}

/// Chromium's path, once it and playwright-core are there (a failure says how to get them).
fn chromium() -> String {
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        Path::new(&chromium).exists(),
        "{chromium} is missing: `apt-get install chromium` (.ci/run does)"
    );
    assert!(
        browser_dir().join("node_modules/playwright-core").exists(),
        "playwright-core is missing: `npm ci --prefix tests/browser` (.ci/run does)"
    );
    chromium
}

#[actix_rt::test]
async fn a_stopped_clinic_turns_offline_on_the_dashboard_within_the_heartbeat_window() {
    let chromium = chromium();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut fleet = Fleet::new(dir.path(), CLINICS, HB).expect("fleet");
    fleet.start_agents().await.expect("agents");
    // Clinic activity throughout, for the event-rate sparklines in the screenshot: about 50
    // writes a second each is enough. (At 500, eight clinics' commits beside a parallel cluster
    // test once kept two writers from their database's write lock past the 10 s busy timeout.)
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writers: Vec<_> = fleet
        .clinics
        .iter()
        .map(|c| common::procs::writer_paced(c.db.clone(), stop.clone(), Duration::from_millis(20)))
        .collect();
    let shot = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-artifacts/dashboard.png");
    std::fs::create_dir_all(shot.parent().expect("parent")).expect("artifacts dir");
    let _ = std::fs::remove_file(&shot);
    let watch = fleet.clinics[2].id.clone();
    let mut node = Command::new("node")
        .arg(browser_dir().join("dashboard.mjs"))
        .arg(fleet.http_url())
        .arg(fleet.admin_token.clone().expect("admin token"))
        .arg(CLINICS.to_string())
        .arg(&watch)
        .arg(&shot)
        .env("CHROMIUM", &chromium)
        .current_dir(browser_dir())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("node (Node.js) drives Chromium here: {e}; `apt-get install nodejs npm` (.ci/run checks)")
        });
    let mut stdin = node.stdin.take().expect("stdin");
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let out = node.stdout.take().expect("stdout");
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // The browser's answers come over a channel, waited for (with a deadline) on a blocking
    // thread so the gateway and agents keep running meanwhile.
    let wait = |rx: Receiver<String>, what: &'static str| {
        actix_web::rt::task::spawn_blocking(move || {
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                match rx.recv_timeout(left) {
                    Ok(line) if line.starts_with("FAIL") => panic!("dashboard: {line}"),
                    Ok(line) if line.starts_with(what) => return (line, rx),
                    Ok(_) => continue,
                    Err(_) => panic!("dashboard: no {what} within 60 s"),
                }
            }
        })
    };
    let (_, rx) = wait(rx, "READY").await.expect("ready");
    let agent = fleet.clinics[2].agent.take().expect("agent");
    agent.stop();
    writeln!(stdin, "STOPPED").expect("tell the browser");
    let (offline, rx) = wait(rx, "OFFLINE").await.expect("offline");
    let ms: u64 = offline
        .trim_start_matches("OFFLINE ")
        .parse()
        .expect("milliseconds");
    // The gateway evicts a session silent for more than three heartbeats, checked once per
    // heartbeat: at most four heartbeats after the agent's last frame (sent before the stop).
    // Plus the dashboard's 250 ms refresh and the page's own time on a loaded 2-core machine.
    let window = HB * 4 + Duration::from_millis(250 + 1500);
    assert!(
        Duration::from_millis(ms) <= window,
        "offline after {ms} ms, window {window:?}"
    );
    wait(rx, "DONE").await.expect("done");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in writers {
        w.join().expect("writer");
    }
    let status = node.wait().expect("node exit");
    assert!(status.success(), "node exited with {status}");
    let png = std::fs::read(&shot).expect("screenshot saved");
    assert!(png.starts_with(b"\x89PNG"), "a PNG screenshot");
    fleet.stop().await;
}

/// The simulated fleet: which clinics have which problem (disjoint sets).
const SIM_CLINICS: usize = 500;
fn sim_offline(i: usize) -> bool {
    i % 71 == 3
}
fn sim_lagging(i: usize) -> bool {
    i % 50 == 10
}
fn sim_flagged(i: usize) -> bool {
    i % 100 == 25
}
fn sim_failing(i: usize) -> bool {
    i % 125 == 40
}

/// One simulated clinic: hello, three events (one against its entity schema when `flagged`,
/// far behind its outbox when `lagging`), acknowledged; then it leaves (`offline`) or stays,
/// answering pings, and answers cloud updates (`failed` when `failing`) until `stop`.
async fn sim_clinic(
    client: awc::Client,
    url: String,
    i: usize,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    use awc::ws::{Frame, Message};
    use common::ws::{event, hello, next_json, send};
    use futures_util::{SinkExt, StreamExt};
    use serde_json::json;
    let id = format!("sim-{i:03}");
    // One client for all (each new client builds its own TLS context: 500 of them keep this
    // thread busy past the gateway's request timeout).
    let (_, mut ws) = client
        .ws(url.as_str())
        .max_frame_size(1 << 20)
        .connect()
        .await
        .unwrap_or_else(|e| panic!("{id}: ws connect: {e}"));
    let mut h = hello(&id);
    h["agent_version"] = json!(if i.is_multiple_of(7) {
        "2.3.9"
    } else {
        "2.4.1"
    });
    h["source_id"] = json!(1);
    send(&mut ws, h).await;
    let welcome = next_json(&mut ws).await.expect("welcome");
    assert_eq!(welcome["type"], "welcome", "{id}: {welcome}");
    let mut events: Vec<_> = (1..=3).map(event).collect();
    if sim_flagged(i) {
        events[1]["row"] = json!({"id": 2});
    }
    let mut frame =
        json!({"v": 1, "type": "events", "prev_seq": 0, "head_seq": 3, "events": events});
    if sim_lagging(i) {
        frame["head_seq"] = json!(20_000);
        frame["next_committed_at"] = json!("2026-11-28T00:00:00Z");
    }
    send(&mut ws, frame).await;
    if sim_offline(i) {
        // Stored first, then gone without a word (a PC switched off): the TCP connection ends.
        let ack = next_json(&mut ws).await.expect("ack");
        assert_eq!(ack["seq"], 3, "{id}: {ack}");
        drop(ws);
        return;
    }
    // Cloud updates may come before the acknowledgement (the clinic is registered at hello):
    // every frame is answered as it comes.
    let mut acked = false;
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            item = ws.next() => match item {
                Some(Ok(Frame::Ping(b))) => {
                    let _ = ws.send(Message::Pong(b)).await;
                }
                Some(Ok(Frame::Text(t))) => {
                    let v: serde_json::Value = serde_json::from_slice(&t).expect("json");
                    if v["type"] == "ack" {
                        assert_eq!(v["seq"], 3, "{id}: {v}");
                        acked = true;
                    } else if v["type"] == "update" {
                        let status = if sim_failing(i) { "failed" } else { "applied" };
                        send(&mut ws, json!({"v": 1, "type": "update_result",
                            "update_id": v["update_id"], "status": status, "reason": "simulated"})).await;
                    } else {
                        panic!("{id}: unexpected frame {v}");
                    }
                }
                Some(Ok(Frame::Close(reason))) => panic!("{id}: closed by the gateway: {reason:?}"),
                Some(Err(e)) => panic!("{id}: {e}"),
                None => panic!("{id}: connection ended"),
                Some(Ok(_)) => {}
            },
        }
    }
    assert!(acked, "{id}: its events were never acknowledged");
}

#[actix_rt::test]
async fn five_hundred_clinics_fit_one_screen_problems_first_each_problem_on_its_tile() {
    let chromium = chromium();
    let dir = tempfile::tempdir().expect("tempdir");
    // A 2 s heartbeat: 500 clients in this test's one thread answer pings in time (evicted
    // after 6 s of silence) even on a loaded machine.
    let fleet = Fleet::insecure(dir.path(), 0, Duration::from_secs(2)).expect("fleet");
    let ws_url = fleet.gateway.as_ref().expect("gateway").ws_url();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    // One client, without awc's default limit of 100 connections (0: none).
    let client = awc::Client::builder()
        .connector(awc::Connector::new().limit(0))
        .timeout(Duration::from_secs(10))
        .finish();
    let sims: Vec<_> = (0..SIM_CLINICS)
        .map(|i| {
            actix_web::rt::spawn(sim_clinic(
                client.clone(),
                ws_url.clone(),
                i,
                stop_rx.clone(),
            ))
        })
        .collect();
    // Two cloud updates to each failing clinic, answered `failed`.
    let base = fleet.http_url();
    let failing: Vec<usize> = (0..SIM_CLINICS).filter(|&i| sim_failing(i)).collect();
    for &i in &failing {
        let url = format!("{base}/v1/clinics/sim-{i:03}");
        common::wait_until("the clinic connected", Duration::from_secs(60), || async {
            common::get_json(&url).await.1["connected"] == true
        })
        .await;
        for n in 0..2 {
            let body = serde_json::json!({"entity": "patient", "op": "upsert",
                "key": {"id": 100 + n}, "row": {"id": 100 + n, "name": "Cloud"}});
            let (status, v) = common::post_json(&format!("{url}/updates"), &body).await;
            assert_eq!(status, 202, "{v}");
        }
    }
    let count = |f: fn(usize) -> bool| (0..SIM_CLINICS).filter(|&i| f(i)).count();
    let offline = count(sim_offline);
    let want = serde_json::json!({
        "tiles": SIM_CLINICS,
        "connected": SIM_CLINICS - offline,
        "offline": offline,
        "lagging": count(sim_lagging),
        "failed": 2 * failing.len(),
        "flagged": count(sim_flagged),
        "trouble": failing.len() + count(sim_flagged),
    });
    let first = |f: fn(usize) -> bool| {
        let i = (0..SIM_CLINICS).find(|&i| f(i)).expect("one");
        format!("sim-{i:03}")
    };
    let shot = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-artifacts/dashboard-500");
    std::fs::create_dir_all(shot.parent().expect("parent")).expect("artifacts dir");
    let mut node = Command::new("node")
        .arg(browser_dir().join("fleet.mjs"))
        .arg(fleet.http_url())
        .arg(want.to_string())
        .arg(first(sim_failing))
        .arg(first(sim_flagged))
        .arg(first(sim_lagging))
        .arg(first(sim_offline))
        .arg(&shot)
        .env("CHROMIUM", &chromium)
        .current_dir(browser_dir())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("node (Node.js) drives Chromium here: {e}"));
    let out = node.stdout.take().expect("stdout");
    // The browser's lines, read on a blocking thread while the clinics keep answering here.
    let lines = actix_web::rt::task::spawn_blocking(move || {
        BufReader::new(out)
            .lines()
            .map_while(Result::ok)
            .collect::<Vec<_>>()
    })
    .await
    .expect("browser output");
    let status = actix_web::rt::task::spawn_blocking(move || node.wait())
        .await
        .expect("join")
        .expect("node exit");
    assert!(
        lines.iter().any(|l| l == "DONE") && status.success(),
        "dashboard at 500 clinics: {lines:?} ({status})"
    );
    for name in ["compact", "detail"] {
        let png = std::fs::read(format!("{}-{name}.png", shot.display())).expect("screenshot");
        assert!(png.starts_with(b"\x89PNG"), "{name}: a PNG screenshot");
    }
    let _ = stop_tx.send(true);
    for s in sims {
        s.await.expect("simulated clinic");
    }
    fleet.stop().await;
}

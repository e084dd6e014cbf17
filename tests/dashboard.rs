//! The fleet dashboard end to end in Debian's headless Chromium (driven by playwright-core:
//! `tests/browser/dashboard.mjs`): a secure gateway and eight clinics, every tile connected;
//! one agent stops and its tile turns offline within the heartbeat window. Saves a screenshot
//! to `target/test-artifacts/dashboard.png`. `.ci/run` installs chromium and playwright-core;
//! without them this test fails and says what is missing.

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

#[actix_rt::test]
async fn a_stopped_clinic_turns_offline_on_the_dashboard_within_the_heartbeat_window() {
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        Path::new(&chromium).exists(),
        "{chromium} is missing: `apt-get install chromium` (.ci/run does)"
    );
    assert!(
        browser_dir().join("node_modules/playwright-core").exists(),
        "playwright-core is missing: `npm ci --prefix tests/browser` (.ci/run does)"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let mut fleet = Fleet::new(dir.path(), CLINICS, HB).expect("fleet");
    fleet.start_agents().await.expect("agents");
    // Clinic activity throughout, for the event-rate sparklines in the screenshot.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writers: Vec<_> = fleet
        .clinics
        .iter()
        .map(|c| common::procs::writer(c.db.clone(), stop.clone()))
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

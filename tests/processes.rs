//! Real `tether` processes killed with SIGKILL mid-stream: the agent, then the gateway.
//! Each test ends with the history check between the clinic database and the gateway store.

mod common;

use common::procs::*;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tether::fleet::{create_sample_clinic, Fleet};

#[test]
fn agent_killed_with_sigkill_mid_stream_resumes_without_loss_or_duplicates() {
    let Site {
        dir,
        db,
        mut gw,
        addr,
    } = site();
    let mut agent = start_agent(dir.path(), &addr);
    let stop = Arc::new(AtomicBool::new(false));
    let w = writer(db.clone(), stop.clone());

    wait_for("first acknowledgements", Duration::from_secs(20), || {
        acked(dir.path()) > 100
    });
    agent.kill();
    let at_kill = acked(dir.path());
    // Changes keep being committed while the agent is dead.
    wait_for("a backlog to build up", Duration::from_secs(20), || {
        Fleet::outbox_head(&db).unwrap_or(0) > at_kill + 200
    });
    let mut agent = start_agent(dir.path(), &addr);
    wait_for(
        "the restarted agent to make progress",
        Duration::from_secs(20),
        || acked(dir.path()) > at_kill + 200,
    );
    stop_and_drain(dir.path(), &db, &stop, w);
    agent.kill();
    gw.kill();
    final_check(dir.path());
}

/// Receives sd_notify datagrams until one contains `want` (or the deadline passes).
fn expect_notify(sock: &std::os::unix::net::UnixDatagram, want: &str, limit: Duration) -> String {
    let deadline = Instant::now() + limit;
    let mut seen = Vec::new();
    let mut buf = [0u8; 512];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "no {want:?} from the agent within {limit:?}; got {seen:?}"
        );
        sock.set_read_timeout(Some(left)).expect("timeout");
        if let Ok(n) = sock.recv(&mut buf) {
            let msg = String::from_utf8_lossy(&buf[..n]).to_string();
            if msg.contains(want) {
                return msg;
            }
            seen.push(msg);
        }
    }
}

#[test]
fn sigterm_mid_stream_drains_acks_closes_cleanly_and_exits_zero() {
    let Site {
        dir,
        db,
        mut gw,
        addr,
    } = site();
    // Play systemd: a notify socket and a watchdog of 400 ms (pings every 200 ms).
    let notify_path = dir.path().join("notify.sock");
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).expect("bind notify");
    let mut agent = start_agent_with_env(
        dir.path(),
        &addr,
        &[
            ("NOTIFY_SOCKET", notify_path.display().to_string()),
            ("WATCHDOG_USEC", "400000".into()),
        ],
    );
    let ready = expect_notify(&notify, "READY=1", Duration::from_secs(20));
    assert!(ready.contains("STATUS=agent running"), "{ready}");
    expect_notify(&notify, "WATCHDOG=1", Duration::from_secs(5));

    let stop = Arc::new(AtomicBool::new(false));
    let w = writer(db.clone(), stop.clone());
    wait_for("first acknowledgements", Duration::from_secs(20), || {
        acked(dir.path()) > 300
    });
    // SIGTERM while the writer keeps committing and batches are in flight. The drain timeout
    // is 5 s; the exit must come within it (plus the close handshake and process exit).
    let exit = terminate(&mut agent, Duration::from_secs(8));
    assert!(exit.success(), "agent exited with {exit:?}");
    expect_notify(&notify, "STOPPING=1", Duration::from_secs(1));

    // Everything the agent checkpointed is at the gateway, and the gateway acknowledged
    // nothing the agent had not checkpointed (the drain waited for the acks in flight).
    let at_stop = acked(dir.path());
    assert_eq!(checkpoint(&db), at_stop, "checkpoint and gateway agree");
    let log = common::log_text(&dir.path().join("logs-agent"), "supervisor");
    let drained = log
        .lines()
        .find(|l| l.contains("event=drained"))
        .unwrap_or_else(|| panic!("no drain line in\n{log}"));
    assert!(
        drained.contains("timed_out=false") && drained.contains("link_lost=false"),
        "{drained}"
    );
    assert!(log.contains("event=agent_stopping reason=SIGTERM"), "{log}");
    let gw_log = common::log_text(&dir.path().join("logs-gateway"), "connection");
    assert!(
        gw_log.contains("event=closed_by_agent code=1001"),
        "the gateway saw a clean close:\n{gw_log}"
    );

    // The rows committed after the stop are still in the outbox: the next run sends them.
    wait_for(
        "rows committed after the stop",
        Duration::from_secs(20),
        || Fleet::outbox_head(&db).unwrap_or(0) > at_stop + 100,
    );
    let mut agent = start_agent(dir.path(), &addr);
    stop_and_drain(dir.path(), &db, &stop, w);
    agent.kill();
    gw.kill();
    final_check(dir.path());
}

#[test]
fn gateway_sigterm_mid_stream_closes_sessions_with_1001_exits_zero_and_loses_nothing() {
    let Site {
        dir,
        db,
        mut gw,
        addr,
    } = site();
    let mut agent = start_agent(dir.path(), &addr);
    let stop = Arc::new(AtomicBool::new(false));
    let w = writer(db.clone(), stop.clone());
    wait_for("first acknowledgements", Duration::from_secs(20), || {
        acked(dir.path()) > 300
    });
    let exit = terminate(&mut gw, Duration::from_secs(10));
    assert!(exit.success(), "gateway exited with {exit:?}");
    let gw_log = common::log_text(&dir.path().join("logs-gateway"), "connection");
    assert!(
        gw_log.contains("event=closing_sessions sessions=1"),
        "{gw_log}"
    );
    let agent_log = common::log_text(&dir.path().join("logs-agent"), "connection");
    assert!(
        agent_log.contains("event=closed_by_gateway code=1001 reason=\"gateway shutting down\""),
        "the agent was told, not cut off:\n{agent_log}"
    );
    let at_stop = acked(dir.path());
    wait_for("a backlog to build up", Duration::from_secs(20), || {
        Fleet::outbox_head(&db).unwrap_or(0) > at_stop + 200
    });
    let (mut gw, _) = start_gateway(dir.path(), &addr);
    stop_and_drain(dir.path(), &db, &stop, w);
    agent.kill();
    gw.kill();
    final_check(dir.path());
}

#[test]
fn gateway_killed_with_sigkill_mid_stream_and_restarted_loses_nothing() {
    let Site {
        dir,
        db,
        mut gw,
        addr,
    } = site();
    let mut agent = start_agent(dir.path(), &addr);
    let stop = Arc::new(AtomicBool::new(false));
    let w = writer(db.clone(), stop.clone());

    wait_for("first acknowledgements", Duration::from_secs(20), || {
        acked(dir.path()) > 100
    });
    gw.kill();
    let at_kill = acked(dir.path());
    wait_for("a backlog to build up", Duration::from_secs(20), || {
        Fleet::outbox_head(&db).unwrap_or(0) > at_kill + 200
    });
    // Same address: the agent reconnects by itself.
    let (mut gw, _) = start_gateway(dir.path(), &addr);
    wait_for(
        "progress after the restart",
        Duration::from_secs(30),
        || acked(dir.path()) > at_kill + 200,
    );
    stop_and_drain(dir.path(), &db, &stop, w);
    agent.kill();
    gw.kill();
    final_check(dir.path());
    let log = common::log_text(&dir.path().join("logs-agent"), "connection");
    assert!(
        log.contains("event=disconnected"),
        "the agent logged the lost link:\n{log}"
    );
    assert!(
        log.matches("event=connected").count() >= 2,
        "and the reconnection:\n{log}"
    );
}

/// The production path end to end: keys from `tether keys`, configs with TLS, tokens, admin
/// tokens and field encryption, real processes.
#[test]
fn secure_processes_configured_from_yaml_sync_over_mutual_tls() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let out = Command::new(BIN)
        .args(["keys", "dev-setup", "--out"])
        .arg(d.join("certs"))
        .args(["--clinics", "clinic-k", "--bits", "2048"])
        .output()
        .expect("keys");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(BIN)
        .args(["keys", "admin-token", "--name", "webapi"])
        .output()
        .expect("admin token");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let hash = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("sha256: "))
        .expect("hash line")
        .to_string();
    let gw_cfg = write_config(
        d,
        "gateway",
        &format!(
            "gateway:\n  listen: 127.0.0.1:0\n  store:\n    path: gateway.db\n  heartbeat_interval: 500ms\n  tls:\n    cert: certs/gateway.pem\n    key: certs/gateway.key\n    client_ca: certs/ca.pem\n  auth:\n    clinics_dir: certs/clinics\n  admin_tokens:\n    - name: webapi\n      sha256: {hash}\n      scopes: [read, write]\n  decryption_keys:\n    - {{kid: dk1, file: certs/dk1.key}}\n"
        ),
    );
    let out = Command::new(BIN)
        .arg("check-config")
        .arg(&gw_cfg)
        .output()
        .expect("check");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut child = Command::new(BIN)
        .args(["gateway", "--config"])
        .arg(&gw_cfg)
        .stdout(Stdio::piped())
        .spawn()
        .expect("gateway");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("read");
    let _gw = Proc(child);
    let addr = line.trim().rsplit(' ').next().expect("addr").to_string();
    let db = d.join("clinic.db");
    create_sample_clinic(&db).expect("clinic");
    let agent_cfg = write_config(
        d,
        "agent",
        &format!(
            "agent:\n  clinic_id: clinic-k\n  database:\n    path: clinic.db\n  gateway:\n    url: wss://{addr}/v1/ws\n    heartbeat_interval: 500ms\n    tls:\n      ca: certs/ca.pem\n      cert: certs/clinic-k.pem\n      key: certs/clinic-k.key\n    auth:\n      kid: clinic-k-1\n  encryption:\n    keys:\n      - {{kid: dk1, file: certs/dk1.key}}\n    active: dk1\n    fields:\n      patient: [name, national_id]\n  tables:\n    - {{table: patients, entity: patient, key: [id]}}\n    - {{table: appointments, entity: appointment, key: [id]}}\n    - {{table: payments, entity: payment, key: [id], direction: up}}\n"
        ),
    );
    let out = Command::new(BIN)
        .arg("check-config")
        .arg(&agent_cfg)
        .output()
        .expect("check");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // --connect: the database's tables, and the gateway reached with this clinic's TLS and
    // token (accepted); the same with a key id the gateway does not know (refused, and why).
    let out = Command::new(BIN)
        .args(["check-config", "--connect"])
        .arg(&agent_cfg)
        .output()
        .expect("check");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{said}");
    assert!(said.contains("TLS ok, token accepted"), "{said}");
    assert!(said.contains("capture objects installed"), "{said}");
    let wrong_kid = d.join("agent-wrong-kid.yaml");
    std::fs::write(
        &wrong_kid,
        std::fs::read_to_string(&agent_cfg)
            .expect("config")
            .replace("kid: clinic-k-1", "kid: clinic-k-9"),
    )
    .expect("write");
    let out = Command::new(BIN)
        .args(["check-config", "--connect"])
        .arg(&wrong_kid)
        .output()
        .expect("check");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{said}");
    assert!(
        said.contains("FAIL  gateway") && said.contains("refused the token: unknown_key_id"),
        "{said}"
    );
    let _agent = Proc(
        Command::new(BIN)
            .args(["agent", "--config"])
            .arg(&agent_cfg)
            .stdout(Stdio::null())
            .spawn()
            .expect("agent"),
    );
    common::write_activity(&db, 300);
    let head = Fleet::outbox_head(&db).expect("head");
    wait_for(
        "the clinic to sync over mTLS",
        Duration::from_secs(30),
        || acked(d) >= head,
    );
    // The gateway decrypted with dk1: stored rows match the clinic's, field by field.
    final_check(d);
    let audit = common::log_text(&d.join("logs-gateway"), "audit");
    assert!(
        audit.contains("event=auth_ok clinic=clinic-k kid=clinic-k-1"),
        "{audit}"
    );
}

/// The commands a clinic's IT runs, as written in the README.
/// A port already taken: one line naming the address, the config key and what to do — no
/// panic, no backtrace — also written to error.log; a store directory that does not exist yet
/// is created.
#[test]
fn a_taken_port_is_one_line_naming_the_key_and_it_reaches_error_log() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr");
    let cfg = write_config(
        d,
        "gateway",
        &format!("gateway:\n  listen: {addr}\n  insecure_plaintext: true\n  store:\n    path: data/new/gateway.db\n"),
    );
    let out = Command::new(BIN)
        .args(["gateway", "--config"])
        .arg(&cfg)
        .env("RUST_BACKTRACE", "1")
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "gateway.listen {addr}: the address is already in use"
        )),
        "{err}"
    );
    assert!(
        !err.contains("panicked") && !err.contains("backtrace"),
        "{err}"
    );
    let log = common::log_text(&d.join("logs-gateway"), "error");
    assert!(
        log.contains("event=exit_on_error") && log.contains("already in use"),
        "{log}"
    );
    drop(taken);
    // The same config with the port free: the store's directory is created.
    let mut gw = Proc(
        Command::new(BIN)
            .args(["gateway", "--config"])
            .arg(&cfg)
            .stdout(Stdio::piped())
            .spawn()
            .expect("gateway"),
    );
    let mut line = String::new();
    BufReader::new(gw.0.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("read");
    assert!(line.contains("gateway listening on"), "{line}");
    assert!(d.join("data/new/gateway.db").is_file());
}

#[test]
fn install_snapshot_and_uninstall_from_the_command_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let db = d.join("clinic.db");
    {
        let conn = tether::db::sqlite::open(&db).expect("open");
        conn.execute_batch(tether::fleet::SAMPLE_SCHEMA)
            .expect("schema");
        for i in 0..120 {
            conn.execute("INSERT INTO patients (name) VALUES (?1)", [format!("p{i}")])
                .expect("row");
        }
    }
    let cfg = agent_config(d, "ws://127.0.0.1:9/v1/ws");
    let run = |args: &[&str]| {
        let out = Command::new(BIN)
            .args(args)
            .arg("--config")
            .arg(&cfg)
            .output()
            .expect("run");
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    assert!(run(&["agent", "install"]).contains("9 triggers"));
    assert!(
        run(&["agent", "install"]).contains("9 triggers"),
        "idempotent"
    );
    assert!(
        run(&["agent", "snapshot", "--table", "patients", "--chunk", "50"]).contains("120 rows")
    );
    assert_eq!(Fleet::outbox_head(&db).expect("head"), 120);
    // 120 changes were never sent: uninstall refuses to drop them without --force.
    let refused = Command::new(BIN)
        .args(["agent", "uninstall", "--config"])
        .arg(&cfg)
        .output()
        .expect("run");
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains("120 changes the gateway has not acknowledged"),
        "{err}"
    );
    assert_eq!(
        Fleet::outbox_head(&db).expect("head"),
        120,
        "nothing removed"
    );
    assert!(run(&["agent", "uninstall", "--force"]).contains("removed"));
    let conn = tether::db::sqlite::open(&db).expect("open");
    let left: i64 = conn
        .query_row(
            "SELECT count(*) FROM sqlite_master WHERE name LIKE '\\_tether%' ESCAPE '\\'",
            [],
            |r| r.get(0),
        )
        .expect("count");
    assert_eq!(left, 0);
    let out = Command::new(BIN)
        .args(["check-config"])
        .arg(d.join("nope.yaml"))
        .output()
        .expect("run");
    assert!(!out.status.success());
}

/// The gateway dies right after a group commit, before sending its acknowledgements (a
/// fault-injection build honours TETHER_FAULT_ABORT_AFTER_COMMITS). The agent resends what was
/// not acknowledged; the store already has it and must not store it twice.
#[cfg(feature = "fault-injection")]
#[test]
fn gateway_killed_after_commit_before_ack_stores_nothing_twice() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("clinic.db");
    create_sample_clinic(&db).expect("clinic");
    let cfg = gateway_config(dir.path(), "127.0.0.1:0");
    let mut child = Command::new(BIN)
        .args(["gateway", "--config"])
        .arg(&cfg)
        .env("TETHER_FAULT_ABORT_AFTER_COMMITS", "20")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("gateway");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("read");
    let addr = line.trim().rsplit(' ').next().expect("addr").to_string();
    let mut crashing = Proc(child);
    let mut agent = start_agent(dir.path(), &addr);
    let stop = Arc::new(AtomicBool::new(false));
    let w = writer(db.clone(), stop.clone());
    // The 20th commit aborts the process.
    wait_for("the gateway to abort", Duration::from_secs(30), || {
        matches!(crashing.0.try_wait(), Ok(Some(_)))
    });
    let stored_at_crash = acked(dir.path());
    let (mut gw, _) = start_gateway(dir.path(), &addr);
    // Progress after the restart, and past the final check's floor of 200 changes (the crash
    // can come early: 20 group commits may hold few changes).
    wait_for(
        "progress after the restart",
        Duration::from_secs(30),
        || acked(dir.path()) > (stored_at_crash + 100).max(250),
    );
    stop_and_drain(dir.path(), &db, &stop, w);
    agent.kill();
    gw.kill();
    crashing.kill();
    final_check(dir.path());
}

/// `GET path` on the agent's admin endpoint: (status code, body); `None` if nothing answers.
fn admin_get(port: u16, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    write!(c, "GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").ok()?;
    let mut text = String::new();
    c.read_to_string(&mut text).ok()?;
    let code = text.get(9..12)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n")?.1.to_string();
    Some((code, body))
}

/// An agent process with its admin endpoint on a free port: (port, its config, the process).
fn agent_with_admin(dir: &std::path::Path, addr: &str) -> (u16, std::path::PathBuf, Proc) {
    let port = free_port();
    let cfg = agent_config_admin(
        dir,
        &format!("ws://{addr}/v1/ws"),
        "",
        &format!("127.0.0.1:{port}"),
    );
    let agent = Proc(
        Command::new(BIN)
            .args(["agent", "--config"])
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("agent"),
    );
    (port, cfg, agent)
}

fn status_cmd(cfg: &std::path::Path) -> (i32, String) {
    let out = Command::new(BIN)
        .args(["agent", "--config"])
        .arg(cfg)
        .arg("status")
        .output()
        .expect("tether agent status");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string(),
    )
}

#[test]
fn the_admin_endpoint_and_agent_status_tell_health_readiness_and_backlog() {
    let Site {
        dir,
        db,
        mut gw,
        addr,
    } = site();
    let (port, cfg, mut agent) = agent_with_admin(dir.path(), &addr);
    wait_for("/healthz", Duration::from_secs(20), || {
        admin_get(port, "/healthz").is_some_and(|(c, _)| c == 200)
    });
    common::write_activity(&db, 30);
    let stop = Arc::new(AtomicBool::new(false));
    let w = writer(db.clone(), stop.clone());
    stop_and_drain(dir.path(), &db, &stop, w);
    assert!(acked(dir.path()) > 0, "something was synced");
    wait_for("/readyz", Duration::from_secs(20), || {
        admin_get(port, "/readyz").is_some_and(|(c, _)| c == 200)
    });
    // The agent writes its checkpoint to the database just after the ack it counts: poll
    // until the outbox it reads back is empty too.
    wait_for(
        "the outbox backlog to read 0",
        Duration::from_secs(20),
        || {
            admin_get(port, "/metrics").is_some_and(|(c, m)| {
                c == 200 && m.contains("tether_agent_outbox_backlog_events{clinic=\"clinic-k\"} 0")
            })
        },
    );
    let (code, metrics) = admin_get(port, "/metrics").expect("metrics");
    assert_eq!(code, 200);
    let head = Fleet::outbox_head(&db).expect("head");
    for want in [
        "tether_agent_connected{clinic=\"clinic-k\"} 1".to_string(),
        "tether_agent_outbox_backlog_events{clinic=\"clinic-k\"} 0".to_string(),
        format!("tether_agent_acked_seq{{clinic=\"clinic-k\"}} {head}"),
        "tether_agent_actor_restarts_total{clinic=\"clinic-k\",actor=\"watcher\"} 0".to_string(),
    ] {
        assert!(metrics.contains(&want), "{want} missing in\n{metrics}");
    }
    let (code, text) = status_cmd(&cfg);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("connected over websocket"), "{text}");
    assert!(text.contains("0 events waiting"), "{text}");
    assert!(text.contains("ready:    yes"), "{text}");

    // The gateway goes away: still alive, no longer ready, and the backlog shows.
    gw.kill();
    // One change the gateway cannot take now.
    tether::db::sqlite::open(&db)
        .expect("open")
        .execute("INSERT INTO patients (name) VALUES ('Offline Write')", [])
        .expect("write");
    wait_for("/readyz to say not ready", Duration::from_secs(20), || {
        admin_get(port, "/readyz").is_some_and(|(c, b)| c == 503 && b.contains("not connected"))
    });
    assert_eq!(admin_get(port, "/healthz").map(|(c, _)| c), Some(200));
    let (code, text) = status_cmd(&cfg);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("NOT connected"), "{text}");
    assert!(text.contains("1 events waiting"), "{text}");

    // No agent at all: exit code 3, and the unsent count read from the database.
    agent.kill();
    let (code, text) = status_cmd(&cfg);
    assert_eq!(code, 3, "{text}");
    assert!(text.contains("no agent answers"), "{text}");
    assert!(text.contains("changes not yet acknowledged"), "{text}");
}

/// One HTTP/1.1 request from `c` (what is already in `buf` first; what follows the request
/// stays there): its head and its body, or `None` once the client has gone.
fn read_http_request(c: &mut std::net::TcpStream, buf: &mut Vec<u8>) -> Option<(String, Vec<u8>)> {
    use std::io::Read;
    let mut chunk = [0u8; 65536];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        match c.read(&mut chunk) {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let len: usize = header_of(&head, "content-length").parse().unwrap_or(0);
    while buf.len() < head_end + len {
        match c.read(&mut chunk) {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let body = buf[head_end..head_end + len].to_vec();
    buf.drain(..head_end + len);
    Some((head, body))
}

fn header_of(head: &str, name: &str) -> String {
    head.lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
        .unwrap_or_default()
}

/// A one-request-per-connection HTTP server standing in for the main Web API: answers every
/// request with what it saw (method, path, the clinic and authorization headers, the body).
fn fake_web_api() -> (String, std::thread::JoinHandle<()>) {
    use std::io::Write;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let h = std::thread::spawn(move || {
        for mut c in listener.incoming().flatten() {
            let mut buf = Vec::new();
            let Some((head, raw)) = read_http_request(&mut c, &mut buf) else {
                continue;
            };
            let header = |name: &str| header_of(&head, name);
            let body: serde_json::Value =
                serde_json::from_slice(&raw).unwrap_or(serde_json::Value::Null);
            let first = head.lines().next().unwrap_or("").to_string();
            let answer = serde_json::json!({
                "request": first,
                "clinic": header("tether-clinic"),
                "authorization": header("authorization"),
                "got": body,
            })
            .to_string();
            let _ = write!(
                c,
                "HTTP/1.1 201 Created\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{answer}",
                answer.len()
            );
        }
    });
    (format!("http://{addr}"), h)
}

fn admin_post(port: u16, path: &str, body: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    write!(
        c,
        "POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .ok()?;
    let mut text = String::new();
    c.read_to_string(&mut text).ok()?;
    let code = text.get(9..12)?.parse().ok()?;
    Some((code, text.split_once("\r\n\r\n")?.1.to_string()))
}

#[test]
fn clinic_software_calls_the_main_web_api_through_the_agents_link() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("clinic.db");
    create_sample_clinic(&db).expect("clinic");
    let (api, _api) = fake_web_api();
    let bridge = format!(
        "  api_bridge:\n    authorization_env: TEST_WEBAPI_TOKEN\n    endpoints:\n      eligibility:\n        url: {api}/v1/eligibility\n        method: POST\n        timeout: 5s\n"
    );
    let (mut gw, addr) = start_gateway_with(
        dir.path(),
        "127.0.0.1:0",
        &bridge,
        &[("TEST_WEBAPI_TOKEN", "generated-for-this-test")],
    );
    let (port, _cfg, mut agent) = agent_with_admin(dir.path(), &addr);
    wait_for("the agent to connect", Duration::from_secs(20), || {
        admin_get(port, "/readyz").is_some_and(|(c, _)| c == 200)
    });
    // The call goes agent → gateway → main Web API, which sees who is calling.
    let (code, body) =
        admin_post(port, "/call/eligibility", r#"{"patient_ref": "p-7"}"#).expect("call");
    assert_eq!(code, 201, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(v["request"], "POST /v1/eligibility HTTP/1.1", "{v}");
    assert_eq!(v["clinic"], "clinic-k", "{v}");
    assert_eq!(v["authorization"], "Bearer generated-for-this-test", "{v}");
    assert_eq!(v["got"], serde_json::json!({"patient_ref": "p-7"}));
    // Only configured endpoints; bad input named; no link, no call.
    let (code, body) = admin_post(port, "/call/delete_everything", "{}").expect("call");
    assert_eq!(code, 404, "{body}");
    assert!(body.contains("delete_everything"), "{body}");
    let (code, body) = admin_post(port, "/call/eligibility", "not json").expect("call");
    assert_eq!(code, 400, "{body}");
    gw.kill();
    wait_for("the link to drop", Duration::from_secs(20), || {
        admin_get(port, "/readyz").is_some_and(|(c, _)| c == 503)
    });
    let (code, body) = admin_post(port, "/call/eligibility", "{}").expect("call");
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("not connected"), "{body}");
    agent.kill();
}

/// What the keep-alive stand-in for the main Web API saw.
#[derive(Default)]
struct ApiSeen {
    connections: std::sync::atomic::AtomicU64,
    requests: std::sync::atomic::AtomicU64,
}

/// A keep-alive HTTP/1.1 stand-in for the main Web API. `/echo` answers 201 with the raw body it
/// received, its `Idempotency-Key` and `Tether-Clinic`; `/big` answers 200 with 1.2 MB of JSON.
fn keepalive_web_api() -> (String, std::sync::Arc<ApiSeen>) {
    use std::io::Write;
    use std::sync::atomic::Ordering::Relaxed;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let seen = std::sync::Arc::new(ApiSeen::default());
    let s = seen.clone();
    std::thread::spawn(move || {
        for c in listener.incoming().flatten() {
            s.connections.fetch_add(1, Relaxed);
            let s = s.clone();
            std::thread::spawn(move || {
                let mut c = c;
                let mut buf: Vec<u8> = Vec::new();
                while let Some((head, raw)) = read_http_request(&mut c, &mut buf) {
                    let header = |name: &str| header_of(&head, name);
                    let body = String::from_utf8_lossy(&raw).to_string();
                    s.requests.fetch_add(1, Relaxed);
                    let path = head.split(' ').nth(1).unwrap_or("").to_string();
                    let (status, answer) = if path == "/big" {
                        (200, format!("{{\"pad\":\"{}\"}}", "x".repeat(1_200_000)))
                    } else {
                        (
                            201,
                            serde_json::json!({
                                "raw": body,
                                "idempotency_key": header("idempotency-key"),
                                "clinic": header("tether-clinic"),
                            })
                            .to_string(),
                        )
                    };
                    let _ = write!(
                        c,
                        "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{answer}",
                        answer.len()
                    );
                }
            });
        }
    });
    (format!("http://{addr}"), seen)
}

/// `POST path` with extra headers on the agent's admin endpoint: (status, content type, body).
fn admin_call(port: u16, path: &str, body: &str, headers: &str) -> (u16, String, String) {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).expect("admin port");
    write!(
        c,
        "POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n{headers}Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .expect("write");
    let mut text = String::new();
    c.read_to_string(&mut text).expect("read");
    let code = text.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let ctype = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Type: "))
        .unwrap_or("")
        .to_string();
    (code, ctype, body.to_string())
}

fn signal(p: &Proc, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &p.0.id().to_string()])
        .status()
        .expect("kill");
    assert!(ok.success());
}

#[test]
fn bridged_calls_travel_as_sent_reuse_connections_have_deadlines_and_honest_limits() {
    use std::sync::atomic::Ordering::Relaxed;
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("clinic.db");
    create_sample_clinic(&db).expect("clinic");
    let (api, seen) = keepalive_web_api();
    let bridge = format!(
        "  api_bridge:\n    endpoints:\n      echo:\n        url: {api}/echo\n        method: POST\n        timeout: 5s\n      big:\n        url: {api}/big\n        method: POST\n        timeout: 5s\n"
    );
    let (gw, addr) = start_gateway_with(dir.path(), "127.0.0.1:0", &bridge, &[]);
    let (port, _cfg, mut agent) = agent_with_admin(dir.path(), &addr);
    wait_for("the agent to connect", Duration::from_secs(20), || {
        admin_get(port, "/readyz").is_some_and(|(c, _)| c == 200)
    });
    // The body arrives byte for byte (numbers are not re-encoded), with the Idempotency-Key.
    let sent = r#"{"n": 1e5, "x": [1.50, 2], "s": "\u00e9"}"#;
    let (code, ctype, body) = admin_call(port, "/call/echo", sent, "Idempotency-Key: k-1\r\n");
    assert_eq!(code, 201, "{body}");
    assert_eq!(ctype, "application/json");
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(v["raw"], sent, "{v}");
    assert_eq!(v["idempotency_key"], "k-1", "{v}");
    assert_eq!(v["clinic"], "clinic-k", "{v}");
    // Calls reuse the gateway's kept-alive connections.
    for i in 0..50 {
        let (code, _, body) = admin_call(port, "/call/echo", &format!("{{\"i\":{i}}}"), "");
        assert_eq!(code, 201, "{body}");
    }
    let (conns, reqs) = (seen.connections.load(Relaxed), seen.requests.load(Relaxed));
    assert_eq!(reqs, 51);
    assert!(conns <= 4, "{conns} upstream connections for {reqs} calls");
    // A burst past the clinic's call rate (100/s, burst 200) gets 429s with Retry-After;
    // the link is never closed for it.
    let before = seen.requests.load(Relaxed);
    let callers: Vec<_> = (0..20)
        .map(|_| {
            std::thread::spawn(move || {
                (0..40)
                    .map(|_| admin_call(port, "/call/echo", "{}", "").0)
                    .collect::<Vec<u16>>()
            })
        })
        .collect();
    let mut statuses = std::collections::BTreeMap::new();
    for c in callers {
        for s in c.join().expect("caller") {
            *statuses.entry(s).or_insert(0u32) += 1;
        }
    }
    assert!(statuses.contains_key(&429), "{statuses:?}");
    assert!(
        statuses.keys().all(|s| *s == 201 || *s == 429),
        "{statuses:?}"
    );
    assert_eq!(
        seen.requests.load(Relaxed) - before,
        u64::from(statuses.get(&201).copied().unwrap_or(0)),
        "only the accepted calls reached the main Web API"
    );
    let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).expect("admin");
    {
        use std::io::{Read, Write};
        write!(
            c,
            "POST /call/echo HTTP/1.1\r\nContent-Length: 2\r\n\r\n{{}}"
        )
        .expect("write");
        let mut text = String::new();
        c.read_to_string(&mut text).expect("read");
        assert!(
            text.starts_with("HTTP/1.1 201") || text.contains("Retry-After: 1"),
            "{text}"
        );
    }
    let accepted = seen.requests.load(Relaxed);
    // An empty body is refused at the agent (problem+json), never forwarded.
    let (code, ctype, body) = admin_call(port, "/call/echo", "", "");
    assert_eq!(
        (code, ctype.as_str()),
        (400, "application/problem+json"),
        "{body}"
    );
    // A body the link cannot carry is refused by the agent with 413; the link stays up.
    let huge = format!("\"{}\"", "y".repeat(1_048_500 - 2));
    let (code, _, body) = admin_call(port, "/call/echo", &huge, "");
    assert_eq!(code, 413, "{body}");
    assert!(body.contains("link carries"), "{body}");
    // An answer over the link's limit: 502 saying so, never a 200.
    let (code, ctype, body) = admin_call(port, "/call/big", "{}", "");
    assert_eq!(
        (code, ctype.as_str()),
        (502, "application/problem+json"),
        "{body}"
    );
    assert!(body.contains("bytes"), "{body}");
    let mut code = 0;
    for _ in 0..50 {
        code = admin_call(port, "/call/echo", "{}", "").0;
        if code != 429 {
            break;
        }
        // The call rate refills within a second (pacing the retry, as Retry-After says).
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(code, 201, "the link survived all of it");
    let accepted = seen.requests.load(Relaxed) - accepted;
    // `/big` and the last echo went upstream; the empty and the oversized body did not.
    assert_eq!(accepted, 2, "the refused calls never left");
    let settled = seen.requests.load(Relaxed);
    // With the gateway frozen (shorter than its heartbeat eviction), the caller gets 504 at its
    // deadline; once the gateway resumes and reads the call, it does not perform it.
    signal(&gw, "-STOP");
    let t = std::time::Instant::now();
    let (code, _, body) = admin_call(port, "/call/echo", "{}", "Tether-Timeout-Ms: 300\r\n");
    assert_eq!(code, 504, "{body}");
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    // Pacing the fault (the gateway stays frozen 0.9 s in all), not waiting for a result.
    std::thread::sleep(Duration::from_millis(900).saturating_sub(t.elapsed()));
    assert!(admin_get(port, "/readyz").is_some(), "the agent answers");
    signal(&gw, "-CONT");
    // A fresh call after it: on the same session it is read after the stale one, so once it is
    // answered the stale one has been dealt with (refused at its deadline); if the freeze cost
    // the session instead, the stale frame went with it.
    let mut code = 0;
    for _ in 0..100 {
        code = admin_call(port, "/call/echo", "{}", "").0;
        if code == 201 {
            break;
        }
        // Waiting for the link to come back (pacing the retries).
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(code, 201, "calls work again after the freeze");
    assert_eq!(
        seen.requests.load(Relaxed),
        settled + 1,
        "a stale call reached the main Web API"
    );
    let gw_log = |category: &str| common::log_text(&dir.path().join("logs-gateway"), category);
    let refused = gw_log("message")
        .lines()
        .any(|l| l.contains("event=call_refused") && l.contains("status=504"));
    let session_lost = gw_log("connection").contains("event=evicted")
        || gw_log("connection").contains("event=closed_by_agent");
    assert!(
        refused || session_lost,
        "the stale call was neither refused at its deadline nor dropped with its session"
    );
    // Nothing of the bodies in any log.
    for f in ["logs-gateway", "logs-agent"] {
        for e in std::fs::read_dir(dir.path().join(f))
            .expect("logs")
            .flatten()
        {
            let text = std::fs::read_to_string(e.path()).unwrap_or_default();
            let leak = text
                .lines()
                .find(|l| l.contains("[1.50, 2]") || l.contains("yyyyyyyy"));
            assert!(leak.is_none(), "{}: {leak:?}", e.path().display());
        }
    }
    agent.kill();
    drop(gw);
}

/// Zero-touch enrolment from the command line, as an operator and a clinic's installer would
/// run it: a gateway with `gateway.enrolment` from YAML; `tether keys enrol-code` (admin token
/// in the environment); on the "PC", `tether agent enrol` writes the config and identity,
/// `check-config --connect` is accepted, `tether agent renew` replaces the key and retires the
/// old one (the new one accepted, the old one refused), and the agent process syncs.
#[test]
fn a_clinic_enrols_and_renews_its_key_from_the_command_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let run = |args: &[&str], env: &[(&str, &str)]| {
        let mut cmd = Command::new(BIN);
        cmd.args(args).current_dir(d);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = cmd.output().expect("tether");
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };
    let (ok, said) = run(
        &[
            "keys",
            "dev-setup",
            "--out",
            "certs",
            "--clinics",
            "clinic-k",
            "--bits",
            "2048",
        ],
        &[],
    );
    assert!(ok, "{said}");
    let (_, said) = run(&["keys", "admin-token", "--name", "ops"], &[]);
    let token = said
        .lines()
        .find_map(|l| l.split(": ").nth(1).filter(|_| l.starts_with("token")))
        .expect("token line")
        .trim()
        .to_string();
    let hash = said
        .lines()
        .find_map(|l| l.trim().strip_prefix("sha256: "))
        .expect("hash line")
        .to_string();
    std::fs::write(
        d.join("agent-template.yaml"),
        "logging:\n  dir: logs\n  console: false\nagent:\n  clinic_id: {{clinic_id}}\n  database:\n    path: clinic.db\n  gateway:\n    url: {{gateway_url}}\n    gateway_id: {{gateway_id}}\n    heartbeat_interval: 500ms\n    tls:\n      ca: identity/gateway-ca.pem\n      cert: identity/clinic.pem\n      key: identity/clinic.key\n    auth: {}\n  admin:\n    listen: \"off\"\n  tables:\n    - {table: patients, entity: patient, key: [id]}\n    - {table: appointments, entity: appointment, key: [id]}\n    - {table: payments, entity: payment, key: [id], direction: up}\n",
    )
    .expect("template");
    let gw_cfg = write_config(
        d,
        "gateway",
        &format!(
            "gateway:\n  listen: 127.0.0.1:0\n  id: gw-test\n  store:\n    path: gateway.db\n  heartbeat_interval: 500ms\n  tls:\n    cert: certs/gateway.pem\n    key: certs/gateway.key\n    client_ca: certs/ca.pem\n  auth:\n    clinics_dir: certs/clinics\n  admin_tokens:\n    - name: ops\n      sha256: {hash}\n      scopes: [read, write]\n  enrolment:\n    ca_cert: certs/ca.pem\n    ca_key: certs/ca.key\n    code_ttl: 1h\n    agent_template: agent-template.yaml\n    server_ca: certs/ca.pem\n"
        ),
    );
    let (ok, said) = run(&["check-config", gw_cfg.to_str().expect("path")], &[]);
    assert!(ok, "{said}");
    let mut child = Command::new(BIN)
        .args(["gateway", "--config"])
        .arg(&gw_cfg)
        .stdout(Stdio::piped())
        .spawn()
        .expect("gateway");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("read");
    let _gw = Proc(child);
    let addr = line.trim().rsplit(' ').next().expect("addr").to_string();

    // The operator.
    let https = format!("https://{addr}");
    let (ok, said) = run(
        &[
            "keys",
            "enrol-code",
            "--gateway",
            &https,
            "--clinic",
            "clinic-new",
            "--ca",
            "certs/ca.pem",
            "--label",
            "region=north",
        ],
        &[("TETHER_ADMIN_TOKEN", &token)],
    );
    assert!(ok, "{said}");
    let code = said
        .lines()
        .find_map(|l| l.strip_prefix("code for clinic-new: "))
        .expect("code line")
        .to_string();
    // Without the token variable: a clear error, nothing issued.
    let (ok, said) = run(
        &[
            "keys",
            "enrol-code",
            "--gateway",
            &https,
            "--clinic",
            "clinic-x",
            "--ca",
            "certs/ca.pem",
        ],
        &[],
    );
    assert!(!ok && said.contains("TETHER_ADMIN_TOKEN"), "{said}");

    // The clinic PC: a database, the binary and the code.
    std::fs::create_dir_all(d.join("pc")).expect("pc");
    create_sample_clinic(&d.join("pc/clinic.db")).expect("clinic db");
    let wss = format!("wss://{addr}/v1/ws");
    let (ok, said) = run(
        &[
            "agent",
            "enrol",
            "-c",
            "pc/config.yaml",
            "--gateway",
            &wss,
            "--code",
            &code,
            "--ca",
            "certs/ca.pem",
            "--bits",
            "2048",
        ],
        &[],
    );
    assert!(ok, "{said}");
    assert!(said.contains("enrolled as clinic clinic-new"), "{said}");
    assert!(said.contains("next: tether agent install"), "{said}");
    // Twice: this PC is enrolled already, and the code is spent anyway.
    let (ok, said) = run(
        &[
            "agent",
            "enrol",
            "-c",
            "pc/config.yaml",
            "--gateway",
            &wss,
            "--code",
            &code,
            "--ca",
            "certs/ca.pem",
        ],
        &[],
    );
    assert!(!ok && said.contains("enrolled already"), "{said}");
    let (ok, said) = run(&["agent", "install", "-c", "pc/config.yaml"], &[]);
    assert!(ok, "{said}");
    let (ok, said) = run(&["check-config", "--connect", "pc/config.yaml"], &[]);
    assert!(ok && said.contains("token accepted"), "{said}");
    std::fs::copy(d.join("pc/identity/clinic.key"), d.join("old.key")).expect("old key");
    std::fs::copy(d.join("pc/identity/clinic.pem"), d.join("old.pem")).expect("old cert");

    let (ok, said) = run(
        &["agent", "renew", "-c", "pc/config.yaml", "--bits", "2048"],
        &[],
    );
    assert!(ok, "{said}");
    assert!(said.contains("retired at the gateway"), "{said}");
    let (ok, said) = run(&["check-config", "--connect", "pc/config.yaml"], &[]);
    assert!(ok && said.contains("token accepted"), "{said}");
    // The old key and certificate, put back: refused, and why.
    let stale = d.join("pc/stale.yaml");
    std::fs::write(
        &stale,
        std::fs::read_to_string(d.join("pc/config.yaml"))
            .expect("config")
            .replace("key: identity/clinic.key", "key: ../old.key")
            .replace("cert: identity/clinic.pem", "cert: ../old.pem"),
    )
    .expect("stale config");
    let (ok, said) = run(&["check-config", "--connect", "pc/stale.yaml"], &[]);
    assert!(!ok && said.contains("unknown_key_id"), "{said}");

    let _agent = Proc(
        Command::new(BIN)
            .args(["agent", "--config"])
            .arg(d.join("pc/config.yaml"))
            .stdout(Stdio::null())
            .spawn()
            .expect("agent"),
    );
    common::write_activity(&d.join("pc/clinic.db"), 50);
    let head = Fleet::outbox_head(&d.join("pc/clinic.db")).expect("head");
    let acked_new = || {
        rusqlite::Connection::open(d.join("gateway.db"))
            .and_then(|c| {
                c.query_row(
                    "SELECT acked_seq FROM clinics WHERE clinic_id = 'clinic-new'",
                    [],
                    |r| r.get::<_, i64>(0),
                )
            })
            .map(|v| v as u64)
            .unwrap_or(0)
    };
    wait_for("clinic-new to sync", Duration::from_secs(30), || {
        acked_new() >= head
    });
}

//! Real `tether` processes for the integration tests: configs, a gateway and agents as child
//! processes (killed when dropped), the clinic writer, and the final history check.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tether::fleet::{clinic_step, Fleet};

pub const BIN: &str = env!("CARGO_BIN_EXE_tether");

/// A child process killed (SIGKILL) when dropped.
pub struct Proc(pub Child);

impl Proc {
    pub fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn write_config(dir: &Path, name: &str, body: &str) -> PathBuf {
    let path = dir.join(format!("{name}.yaml"));
    let text = format!("logging:\n  dir: logs-{name}\n  console: false\n{body}");
    std::fs::write(&path, text).expect("write config");
    path
}

pub fn gateway_config(dir: &Path, listen: &str) -> PathBuf {
    gateway_config_with(dir, listen, "")
}

/// `extra`: YAML lines added under `gateway:` (2-space indent).
pub fn gateway_config_with(dir: &Path, listen: &str, extra: &str) -> PathBuf {
    write_config(
        dir,
        "gateway",
        &format!("gateway:\n  listen: {listen}\n  insecure_plaintext: true\n  store:\n    path: gateway.db\n  heartbeat_interval: 500ms\n{extra}"),
    )
}

pub fn agent_config(dir: &Path, url: &str) -> PathBuf {
    agent_config_with(dir, url, "")
}

/// `gateway_extra`: YAML lines added under `agent.gateway` (4-space indent). The admin
/// endpoint is off (parallel tests would share its port); see [`agent_config_admin`].
pub fn agent_config_with(dir: &Path, url: &str, gateway_extra: &str) -> PathBuf {
    agent_config_admin(dir, url, gateway_extra, "off")
}

/// The same with `agent.admin.listen: admin`.
pub fn agent_config_admin(dir: &Path, url: &str, gateway_extra: &str, admin: &str) -> PathBuf {
    write_config(
        dir,
        "agent",
        &format!(
            "agent:\n  clinic_id: clinic-k\n  database:\n    path: clinic.db\n  gateway:\n    url: {url}\n    insecure_plaintext: true\n{gateway_extra}    heartbeat_interval: 500ms\n    backoff:\n      initial: 50ms\n      max: 500ms\n  outbox:\n    poll_interval: 20ms\n  tables:\n    - {{table: patients, entity: patient, key: [id]}}\n    - {{table: appointments, entity: appointment, key: [id]}}\n    - {{table: payments, entity: payment, key: [id], direction: up}}\n  shutdown:\n    drain_timeout: 5s\n  admin:\n    listen: {admin}\n"
        ),
    )
}

/// Starts a gateway and returns it with the address it printed.
pub fn start_gateway(dir: &Path, listen: &str) -> (Proc, String) {
    start_gateway_with(dir, listen, "", &[])
}

/// The same with extra `gateway:` YAML and environment variables.
pub fn start_gateway_with(
    dir: &Path,
    listen: &str,
    extra: &str,
    env: &[(&str, &str)],
) -> (Proc, String) {
    let cfg = gateway_config_with(dir, listen, extra);
    let mut cmd = Command::new(BIN);
    cmd.args(["gateway", "--config"])
        .arg(&cfg)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn gateway");
    let stdout = child.stdout.take().expect("stdout");
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("read gateway stdout");
    let addr = line
        .trim()
        .strip_prefix("gateway listening on ")
        .unwrap_or_else(|| panic!("unexpected gateway output: {line:?}"))
        .to_string();
    (Proc(child), addr)
}

pub fn start_agent(dir: &Path, addr: &str) -> Proc {
    start_agent_with_env(dir, addr, &[])
}

pub fn start_agent_with_env(dir: &Path, addr: &str, env: &[(&str, String)]) -> Proc {
    let cfg = agent_config(dir, &format!("ws://{addr}/v1/ws"));
    let mut cmd = Command::new(BIN);
    cmd.args(["agent", "--config"])
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    for (k, v) in env {
        cmd.env(k, v);
    }
    Proc(cmd.spawn().expect("spawn agent"))
}

/// The agent's own checkpoint (what it believes the gateway holds), read from the clinic file.
pub fn checkpoint(db: &Path) -> u64 {
    let conn = rusqlite::Connection::open(db).expect("open clinic db");
    conn.query_row(
        "SELECT value FROM _tether_state WHERE name = 'acked_seq'",
        [],
        |r| r.get::<_, i64>(0),
    )
    .map(|v| v as u64)
    .unwrap_or(0)
}

/// The gateway's acknowledged position for the clinic, read from its store file.
pub fn acked(dir: &Path) -> u64 {
    let Ok(conn) = rusqlite::Connection::open(dir.join("gateway.db")) else {
        return 0;
    };
    conn.query_row(
        "SELECT acked_seq FROM clinics WHERE clinic_id = 'clinic-k'",
        [],
        |r| r.get::<_, i64>(0),
    )
    .map(|v| v as u64)
    .unwrap_or(0)
}

pub use super::poll_blocking as wait_for;

/// A port nothing listens on right now (for services the test starts).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A fresh directory with a clinic database (sample schema) and a gateway process.
pub struct Site {
    pub dir: tempfile::TempDir,
    pub db: PathBuf,
    pub gw: Proc,
    pub addr: String,
}

pub fn site() -> Site {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("clinic.db");
    tether::fleet::create_sample_clinic(&db).expect("clinic");
    let (gw, addr) = start_gateway(dir.path(), "127.0.0.1:0");
    Site { dir, db, gw, addr }
}

/// Sends SIGTERM and waits (with a deadline) for the process to exit.
pub fn terminate(p: &mut Proc, limit: Duration) -> std::process::ExitStatus {
    let status = Command::new("kill")
        .args(["-TERM", &p.0.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let mut exit = None;
    wait_for("the process to exit after SIGTERM", limit, || {
        exit = p.0.try_wait().expect("wait");
        exit.is_some()
    });
    exit.expect("exited")
}

/// Writes clinic activity until stopped (about 500 writes a second).
pub fn writer(db: PathBuf, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<u64> {
    writer_paced(db, stop, Duration::from_millis(2))
}

/// Writes clinic activity until stopped, `pause` between writes.
pub fn writer_paced(
    db: PathBuf,
    stop: Arc<AtomicBool>,
    pause: Duration,
) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let mut conn = tether::db::sqlite::open(&db).expect("open");
        let mut rng = rand::rng();
        let mut n = 0;
        while !stop.load(Ordering::Relaxed) {
            n += clinic_step(&mut conn, &mut rng).expect("write");
            // Pacing the load, not synchronisation.
            std::thread::sleep(pause);
        }
        n
    })
}

/// Stops the writer and waits until the gateway holds everything the clinic committed.
pub fn stop_and_drain(dir: &Path, db: &Path, stop: &AtomicBool, w: std::thread::JoinHandle<u64>) {
    stop.store(true, Ordering::Relaxed);
    w.join().expect("writer");
    let head = Fleet::outbox_head(db).expect("head");
    wait_for("the backlog to drain", Duration::from_secs(30), || {
        acked(dir) >= head
    });
}

pub fn final_check(dir: &Path) {
    let store = tether::gateway::store::open_sqlite(&dir.join("gateway.db")).expect("store");
    let r = super::history_of(&dir.join("clinic.db"), "clinic-k", store.as_ref());
    assert!(r.clean(), "{r:?}");
    assert!(r.written > 200, "{r:?}");
    assert_eq!(r.written, r.at_gateway, "{r:?}");
}

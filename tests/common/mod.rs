//! Helpers shared by the integration tests: deadlines instead of sleeps, drain checks and
//! the history check every sync test ends with.
#![allow(dead_code)]

pub mod pg;
pub mod procs;
pub mod ws;

/// A plaintext gateway's settings on 127.0.0.1:0 with its store in `dir` (small limits, quick
/// shutdown) for tests that start a gateway by hand.
pub fn gateway_settings(dir: &Path, heartbeat: Duration) -> tether::gateway::GatewaySettings {
    tether::gateway::GatewaySettings {
        node_id: None,
        advertise: None,
        listen: "127.0.0.1:0".into(),
        store: tether::gateway::store::StoreLocation::Sqlite(dir.join("gateway.db")),
        retention: None,
        heartbeat_interval: heartbeat,
        max_frame_bytes: 64 * 1024,
        entity_schemas: Some(Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas/entities")),
        update_window: 8,
        group_commit_max_events: 1000,
        workers: 1,
        shutdown_timeout: Duration::from_millis(200),
        faults: Default::default(),
        webhooks: Vec::new(),
        bridge: Default::default(),
        channels: Vec::new(),
    }
}

use std::future::Future;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;
use tether::fleet::Fleet;
use tether::gateway::store::Store;
use tether::history::{check_clinic, HistoryReport};

/// Polls `f` every 20 ms until it returns true; fails the test after `limit`.
pub async fn wait_until<F, Fut>(what: &str, limit: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    loop {
        if f().await {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// True once the gateway holds every change each clinic committed.
pub fn drained(fleet: &Fleet) -> bool {
    let Some(store) = fleet.store() else {
        return false;
    };
    fleet.clinics.iter().all(|c| {
        let head = Fleet::outbox_head(&c.db).unwrap_or(u64::MAX);
        tether::gateway::store::wait(store.acked_seq(&c.id))
            .map(|a| a >= head)
            .unwrap_or(false)
    })
}

pub async fn wait_drained(fleet: &Fleet, limit: Duration) {
    wait_until("every clinic change to be acknowledged", limit, || {
        let done = drained(fleet);
        async move { done }
    })
    .await;
}

/// The history check: every committed change arrived exactly once, in per-key order, and no
/// cloud-only key was echoed. Returns the reports for further assertions.
pub fn assert_history_clean(
    fleet: &Fleet,
    echo_keys: &[(usize, String, Value)],
) -> Vec<HistoryReport> {
    let store = fleet.store().expect("gateway running");
    let mut out = Vec::new();
    for (i, c) in fleet.clinics.iter().enumerate() {
        let keys: Vec<(String, Value)> = echo_keys
            .iter()
            .filter(|(ci, _, _)| *ci == i)
            .map(|(_, e, k)| (e.clone(), k.clone()))
            .collect();
        let r = check_clinic(&c.db, &c.id, store.as_ref(), &keys).expect("history check");
        assert!(r.clean(), "history of {} is not clean: {r:?}", c.id);
        assert_eq!(r.written, r.at_gateway, "{r:?}");
        out.push(r);
    }
    out
}

/// One number from the gateway's SQLite file, read directly (a test's view of the store's
/// tables; the gateway itself goes through the storage port). 0 when the read fails.
pub fn gateway_db_count(db: &Path, sql: &str) -> i64 {
    rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .and_then(|c| c.query_row(sql, [], |r| r.get::<_, i64>(0)))
        .unwrap_or(0)
}

/// Every event the store holds, in id order (through the port).
pub fn all_events(store: &Store) -> Vec<tether::gateway::store::StoredEvent> {
    let mut out: Vec<tether::gateway::store::StoredEvent> = Vec::new();
    loop {
        let after = out.last().map(|e| e.id).unwrap_or(0);
        let page =
            tether::gateway::store::wait(store.events_page(None, after, 1000)).expect("events");
        if page.is_empty() {
            return out;
        }
        out.extend(page);
    }
}

pub fn history_of(db: &Path, clinic: &str, store: &Store) -> HistoryReport {
    check_clinic(db, clinic, store, &[]).expect("history check")
}

pub fn client() -> awc::Client {
    awc::Client::builder()
        .timeout(Duration::from_secs(10))
        .finish()
}

pub async fn post_json(url: &str, body: &Value) -> (u16, Value) {
    post_as(None, url, body).await
}

pub async fn get_json(url: &str) -> (u16, Value) {
    get_as(None, url).await
}

/// POST with the fleet's CA trust and admin token (or plain when `fleet` is None).
pub async fn post_as(fleet: Option<&Fleet>, url: &str, body: &Value) -> (u16, Value) {
    let req = match fleet {
        Some(f) => f.authorize(f.rest_client().expect("rest client").post(url)),
        None => client().post(url),
    };
    let mut resp = req
        .send_json(body)
        .await
        .unwrap_or_else(|e| panic!("POST {url}: {e}"));
    let status = resp.status().as_u16();
    let v: Value = resp.json().await.unwrap_or(Value::Null);
    (status, v)
}

pub async fn get_as(fleet: Option<&Fleet>, url: &str) -> (u16, Value) {
    let req = match fleet {
        Some(f) => f.authorize(f.rest_client().expect("rest client").get(url)),
        None => client().get(url),
    };
    let mut resp = req
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let status = resp.status().as_u16();
    let v: Value = resp.json().limit(16 << 20).await.unwrap_or(Value::Null);
    (status, v)
}

/// Runs `n` steps of realistic clinic activity on a clinic database.
pub fn write_activity(db: &Path, n: usize) -> u64 {
    let mut conn = tether::db::sqlite::open(db).expect("open clinic db");
    let mut rng = rand::rng();
    let mut done = 0;
    for _ in 0..n {
        done += tether::fleet::clinic_step(&mut conn, &mut rng).expect("clinic write");
    }
    done
}

/// A directory whose log4rs files the test reads (one logger per test process).
pub fn init_logs(dir: &Path) {
    let mut cfg = tether::config::LoggingConfig::default();
    cfg.dir = dir.join("logs");
    cfg.console = false;
    cfg.level = "info".into();
    // nextest runs every test in its own process, so this is the only logger here.
    let _ = tether::logging::init(&cfg, "");
}

pub fn read_log(dir: &Path, category: &str) -> String {
    log_text(&dir.join("logs"), category)
}

/// Everything a category's dated files (`connection.2026-12-01.log`, …) in `logs` hold, oldest
/// day first; empty when there are none yet.
pub fn log_text(logs: &Path, category: &str) -> String {
    let prefix = format!("{category}.");
    let mut files: Vec<std::path::PathBuf> = std::fs::read_dir(logs)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .and_then(|n| n.strip_prefix(&prefix))
                        .and_then(|rest| rest.strip_suffix(".log"))
                        .is_some_and(|day| day.len() == 10)
                })
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
        .iter()
        .map(|p| std::fs::read_to_string(p).unwrap_or_default())
        .collect()
}

/// Polls `f` every 20 ms (blocking) until it returns true; fails the test after `limit`.
pub fn poll_blocking(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// (rows with the cloud id in `patients`, inbox entries for the update) in a clinic database.
pub fn applied_counts(db: &Path, cloud_id: i64, update_id: &str) -> (i64, i64) {
    let conn = tether::db::sqlite::open(db).expect("open");
    let count = |sql: &str, p: &dyn rusqlite::ToSql| -> i64 {
        conn.query_row(sql, [p], |r| r.get(0)).expect(sql)
    };
    (
        count("SELECT count(*) FROM patients WHERE id = ?1", &cloud_id),
        count(
            "SELECT count(*) FROM _tether_inbox WHERE update_id = ?1",
            &update_id,
        ),
    )
}

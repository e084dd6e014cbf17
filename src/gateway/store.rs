//! The gateway's durable store (SQLite, WAL, `synchronous=FULL`).
//!
//! All writes go through one writer thread that *group-commits*: it takes every command
//! waiting in its queue (up to `group_commit_max_events` events), runs them in one transaction
//! (each in its own savepoint, so one bad command cannot fail the others), commits — one fsync
//! for the group — and only then answers each caller. A session acknowledges events only after
//! that answer, so an `ack` never covers anything that is not on disk.
//!
//! Per clinic, `clinics.acked_seq` is the highest sequence such that every event up to it is
//! stored. A batch is stored only if its `prev_seq` is not above that position (else it is a
//! gap and refused), and events are unique on `(clinic_id, seq)`: a resent event is
//! acknowledged again without a second row.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use serde::Serialize;
use serde_json::{Map, Value};
use tether_schemas::{Event, UpdateOp, UpdateStatus};
use tokio::sync::oneshot;

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("store {path}: {message}")]
    Open { path: String, message: String },
    #[error("store write failed: {0}")]
    Write(String),
    #[error("store read failed: {0}")]
    Read(String),
    #[error("store writer has stopped")]
    Stopped,
}

fn now_iso() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    iso_from_millis(now.as_millis() as i64)
}

pub use tether_schemas::iso_from_millis;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS clinics (
    clinic_id TEXT PRIMARY KEY,
    acked_seq INTEGER NOT NULL DEFAULT 0,
    source_id INTEGER NOT NULL DEFAULT 0,
    first_seen TEXT NOT NULL,
    last_event_at TEXT
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    clinic_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    entity TEXT NOT NULL,
    op TEXT NOT NULL,
    key_json TEXT NOT NULL,
    row_json TEXT,
    committed_at TEXT NOT NULL,
    received_at TEXT NOT NULL,
    problem TEXT,
    source_id INTEGER NOT NULL DEFAULT 0,
    UNIQUE (clinic_id, source_id, seq)
);
CREATE TABLE IF NOT EXISTS updates (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    update_id TEXT NOT NULL UNIQUE,
    clinic_id TEXT NOT NULL,
    entity TEXT NOT NULL,
    op TEXT NOT NULL,
    key_json TEXT NOT NULL,
    row_json TEXT,
    status TEXT NOT NULL,
    reason TEXT,
    deliveries INTEGER NOT NULL DEFAULT 0,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS updates_open ON updates (clinic_id, status, id);
";

fn open_conn(path: &Path) -> Result<Connection, StoreError> {
    let err = |e: rusqlite::Error| StoreError::Open {
        path: path.display().to_string(),
        message: e.to_string(),
    };
    let conn = Connection::open(path).map_err(err)?;
    conn.busy_timeout(std::time::Duration::from_secs(10))
        .map_err(err)?;
    conn.execute_batch("PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL;")
        .map_err(err)?;
    Ok(conn)
}

/// One event with the problem found in it, if any (stored flagged, never dropped).
pub struct IncomingEvent {
    pub event: Event,
    pub problem: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppendOutcome {
    /// Stored (or already held); everything up to `acked` is durable.
    Stored { acked: u64, inserted: usize },
    /// `prev_seq` is above what the store holds: nothing stored.
    Gap { acked: u64 },
}

/// A cloud → clinic update as posted to the REST API.
#[derive(Debug, Clone)]
pub struct NewUpdate {
    pub clinic_id: String,
    pub entity: String,
    pub op: UpdateOp,
    pub key: Map<String, Value>,
    pub row: Option<Map<String, Value>>,
}

enum Cmd {
    /// `PRAGMA max_page_count`: caps the file size, so writes fail as on a full disk.
    PageLimit(Option<u64>),
    /// A session said hello: returns the position for its outbox (`source`).
    Hello {
        clinic: String,
        source: u64,
        reply: oneshot::Sender<Result<u64, StoreError>>,
    },
    Append {
        clinic: String,
        source: u64,
        prev_seq: u64,
        events: Vec<IncomingEvent>,
        reply: oneshot::Sender<Result<AppendOutcome, StoreError>>,
    },
    EnqueueUpdate {
        update: NewUpdate,
        reply: oneshot::Sender<Result<String, StoreError>>,
    },
    MarkDelivered {
        ids: Vec<String>,
    },
    UpdateResult {
        clinic: String,
        update_id: String,
        status: UpdateStatus,
        reason: Option<String>,
        reply: oneshot::Sender<Result<bool, StoreError>>,
    },
}

impl Cmd {
    fn weight(&self) -> usize {
        match self {
            Cmd::Append { events, .. } => events.len().max(1),
            _ => 1,
        }
    }

    fn is_page_limit(&self) -> bool {
        matches!(self, Cmd::PageLimit(_))
    }
}

pub struct Store {
    path: PathBuf,
    tx: Mutex<Option<mpsc::Sender<Cmd>>>,
    readers: Mutex<Vec<Connection>>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Store {
    pub fn open(path: &Path, group_commit_max_events: usize) -> Result<Arc<Store>, StoreError> {
        Store::open_with(path, group_commit_max_events, None)
    }

    /// `abort_after_commits`: test-only crash point (the process aborts right after that many
    /// group commits, before any of their acknowledgements).
    pub fn open_with(
        path: &Path,
        group_commit_max_events: usize,
        abort_after_commits: Option<u64>,
    ) -> Result<Arc<Store>, StoreError> {
        let conn = open_conn(path)?;
        conn.execute_batch(SCHEMA).map_err(|e| StoreError::Open {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        let (tx, rx) = mpsc::channel();
        let writer = std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || {
                writer_loop(
                    conn,
                    rx,
                    group_commit_max_events.max(1),
                    abort_after_commits,
                )
            })
            .map_err(|e| StoreError::Open {
                path: path.display().to_string(),
                message: e.to_string(),
            })?;
        Ok(Arc::new(Store {
            path: path.to_path_buf(),
            tx: Mutex::new(Some(tx)),
            readers: Mutex::new(Vec::new()),
            writer: Mutex::new(Some(writer)),
        }))
    }

    /// Stops the writer after it has finished what is queued.
    pub fn close(&self) {
        self.tx.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(h) = self.writer.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = h.join();
        }
    }

    fn send(&self, cmd: Cmd) -> Result<(), StoreError> {
        let guard = self.tx.lock().unwrap_or_else(|p| p.into_inner());
        guard
            .as_ref()
            .ok_or(StoreError::Stopped)?
            .send(cmd)
            .map_err(|_| StoreError::Stopped)
    }

    /// Queues a batch for the next group commit; resolves once it is durable (or refused).
    /// Batches are committed in the order this is called.
    pub fn append(
        &self,
        clinic: &str,
        prev_seq: u64,
        events: Vec<IncomingEvent>,
    ) -> impl std::future::Future<Output = Result<AppendOutcome, StoreError>> {
        self.append_from(clinic, 0, prev_seq, events)
    }

    /// Like `append`, for the outbox `source` the session said hello with: a batch from an
    /// outbox that is no longer the clinic's current one is refused (as a gap).
    pub fn append_from(
        &self,
        clinic: &str,
        source: u64,
        prev_seq: u64,
        events: Vec<IncomingEvent>,
    ) -> impl std::future::Future<Output = Result<AppendOutcome, StoreError>> {
        let (reply, rx) = oneshot::channel();
        let sent = self.send(Cmd::Append {
            clinic: clinic.to_string(),
            source,
            prev_seq,
            events,
            reply,
        });
        async move {
            sent?;
            rx.await.map_err(|_| StoreError::Stopped)?
        }
    }

    /// Registers a session's outbox and returns the position to resume from. A different,
    /// non-zero `source` than the one on record means the clinic's outbox was re-created: its
    /// sequences start again, so the position restarts at 0 for it (the old events stay), and
    /// the change is logged loudly instead of its events being taken for duplicates.
    pub async fn hello(&self, clinic: &str, source: u64) -> Result<u64, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.send(Cmd::Hello {
            clinic: clinic.to_string(),
            source,
            reply,
        })?;
        rx.await.map_err(|_| StoreError::Stopped)?
    }

    pub async fn enqueue_update(&self, update: NewUpdate) -> Result<String, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.send(Cmd::EnqueueUpdate { update, reply })?;
        rx.await.map_err(|_| StoreError::Stopped)?
    }

    /// Caps the store file at `pages` pages (SQLite answers writes past it with "database or
    /// disk is full", exactly as on a full disk); `None` lifts the cap. Operators can use it as
    /// a quota; the fault tests use it to fill the disk.
    pub fn set_page_limit(&self, pages: Option<u64>) {
        let _ = self.send(Cmd::PageLimit(pages));
    }

    /// Pages the store file uses now.
    pub fn page_count(&self) -> Result<u64, StoreError> {
        self.read(|c| c.query_row("PRAGMA page_count", [], |r| r.get::<_, i64>(0)))
            .map(|n| n as u64)
    }

    pub fn mark_delivered(&self, ids: Vec<String>) {
        let _ = self.send(Cmd::MarkDelivered { ids });
    }

    /// Records an agent's answer; false if the update is not this clinic's or not open.
    pub async fn update_result(
        &self,
        clinic: &str,
        update_id: &str,
        status: UpdateStatus,
        reason: Option<String>,
    ) -> Result<bool, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.send(Cmd::UpdateResult {
            clinic: clinic.into(),
            update_id: update_id.into(),
            status,
            reason,
            reply,
        })?;
        rx.await.map_err(|_| StoreError::Stopped)?
    }

    /// Runs `f` on a pooled read connection (call from a blocking thread).
    pub fn read<T>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, rusqlite::Error>,
    ) -> Result<T, StoreError> {
        let conn = self.readers.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let conn = match conn {
            Some(c) => c,
            None => open_conn(&self.path)?,
        };
        let out = f(&conn).map_err(|e| StoreError::Read(e.to_string()));
        let mut pool = self.readers.lock().unwrap_or_else(|p| p.into_inner());
        if pool.len() < 8 {
            pool.push(conn);
        }
        out
    }

    pub fn acked_seq(&self, clinic: &str) -> Result<u64, StoreError> {
        self.read(|c| {
            c.query_row(
                "SELECT acked_seq FROM clinics WHERE clinic_id = ?1",
                params![clinic],
                |r| r.get::<_, i64>(0),
            )
            .optional()
            .map(|v| v.unwrap_or(0) as u64)
        })
    }

    pub fn clinics(&self) -> Result<Vec<ClinicRecord>, StoreError> {
        self.read(|c| {
            let mut stmt = c.prepare(
                "SELECT k.clinic_id, k.acked_seq, k.first_seen, k.last_event_at, \
                 (SELECT count(*) FROM events e WHERE e.clinic_id = k.clinic_id), \
                 (SELECT count(*) FROM updates u WHERE u.clinic_id = k.clinic_id AND u.status IN ('pending','delivered')) \
                 FROM clinics k ORDER BY k.clinic_id",
            )?;
            let rows = stmt.query_map([], |r| {
                Ok(ClinicRecord {
                    clinic_id: r.get(0)?,
                    acked_seq: r.get::<_, i64>(1)? as u64,
                    first_seen: r.get(2)?,
                    last_event_at: r.get(3)?,
                    events: r.get::<_, i64>(4)? as u64,
                    pending_updates: r.get::<_, i64>(5)? as u64,
                })
            })?;
            rows.collect()
        })
    }

    pub fn events_page(
        &self,
        clinic: Option<&str>,
        after: u64,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        self.read(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT id, clinic_id, seq, entity, op, key_json, row_json, committed_at, received_at, problem \
                 FROM events WHERE id > ?1 AND (?2 IS NULL OR clinic_id = ?2) ORDER BY id LIMIT ?3",
            )?;
            let rows = stmt.query_map(params![after as i64, clinic, limit as i64], |r| {
                let key: String = r.get(5)?;
                let row: Option<String> = r.get(6)?;
                Ok(StoredEvent {
                    id: r.get::<_, i64>(0)? as u64,
                    clinic_id: r.get(1)?,
                    seq: r.get::<_, i64>(2)? as u64,
                    entity: r.get(3)?,
                    op: r.get(4)?,
                    key: serde_json::from_str(&key).unwrap_or(Value::Null),
                    row: row.and_then(|s| serde_json::from_str(&s).ok()),
                    committed_at: r.get(7)?,
                    received_at: r.get(8)?,
                    problem: r.get(9)?,
                })
            })?;
            rows.collect()
        })
    }

    /// Open updates (pending or delivered) of a clinic after row `after_row`, oldest first.
    pub fn open_updates(
        &self,
        clinic: &str,
        after_row: i64,
        limit: usize,
    ) -> Result<Vec<(i64, tether_schemas::Update)>, StoreError> {
        self.read(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT id, update_id, entity, op, key_json, row_json FROM updates \
                 WHERE clinic_id = ?1 AND status IN ('pending', 'delivered') AND id > ?2 ORDER BY id LIMIT ?3",
            )?;
            let rows = stmt.query_map(params![clinic, after_row, limit as i64], |r| {
                let op: String = r.get(3)?;
                let key: String = r.get(4)?;
                let row: Option<String> = r.get(5)?;
                Ok((
                    r.get::<_, i64>(0)?,
                    tether_schemas::Update {
                        update_id: r.get(1)?,
                        entity: r.get(2)?,
                        op: if op == "delete" {
                            UpdateOp::Delete
                        } else {
                            UpdateOp::Upsert
                        },
                        key: serde_json::from_str(&key).unwrap_or_default(),
                        row: row.and_then(|s| serde_json::from_str(&s).ok()),
                    },
                ))
            })?;
            rows.collect()
        })
    }

    pub fn update(&self, update_id: &str) -> Result<Option<UpdateRecord>, StoreError> {
        self.read(|c| {
            c.query_row(
                "SELECT update_id, clinic_id, entity, op, status, reason, deliveries, created_at, updated_at \
                 FROM updates WHERE update_id = ?1",
                params![update_id],
                |r| {
                    Ok(UpdateRecord {
                        update_id: r.get(0)?,
                        clinic_id: r.get(1)?,
                        entity: r.get(2)?,
                        op: r.get(3)?,
                        status: r.get(4)?,
                        reason: r.get(5)?,
                        deliveries: r.get::<_, i64>(6)? as u64,
                        created_at: r.get(7)?,
                        updated_at: r.get(8)?,
                    })
                },
            )
            .optional()
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        self.close();
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ClinicRecord {
    pub clinic_id: String,
    pub acked_seq: u64,
    pub first_seen: String,
    pub last_event_at: Option<String>,
    pub events: u64,
    pub pending_updates: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct StoredEvent {
    pub id: u64,
    pub clinic_id: String,
    pub seq: u64,
    pub entity: String,
    pub op: String,
    pub key: Value,
    pub row: Option<Value>,
    pub committed_at: String,
    pub received_at: String,
    pub problem: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct UpdateRecord {
    pub update_id: String,
    pub clinic_id: String,
    pub entity: String,
    pub op: String,
    pub status: String,
    pub reason: Option<String>,
    pub deliveries: u64,
    pub created_at: String,
    pub updated_at: String,
}

fn new_update_id() -> String {
    let a: u64 = rand::random();
    let b: u64 = rand::random();
    format!("upd_{a:016x}{b:016x}")
}

enum Reply {
    Hello(
        oneshot::Sender<Result<u64, StoreError>>,
        Result<u64, String>,
    ),
    Append(
        oneshot::Sender<Result<AppendOutcome, StoreError>>,
        Result<AppendOutcome, String>,
    ),
    Update(
        oneshot::Sender<Result<String, StoreError>>,
        Result<String, String>,
    ),
    Result(
        oneshot::Sender<Result<bool, StoreError>>,
        Result<bool, String>,
    ),
}

fn writer_loop(
    mut conn: Connection,
    rx: mpsc::Receiver<Cmd>,
    max_events: usize,
    abort_after_commits: Option<u64>,
) {
    let mut commits = 0u64;
    while let Ok(first) = rx.recv() {
        if let Cmd::PageLimit(pages) = first {
            let n = pages.unwrap_or(4_294_967_294) as i64;
            if let Err(e) = conn.query_row(&format!("PRAGMA max_page_count = {n}"), [], |r| {
                r.get::<_, i64>(0)
            }) {
                log::error!(target: "error", "event=store_page_limit_failed error={e}");
            }
            continue;
        }
        let mut group = vec![first];
        let mut weight = group[0].weight();
        let mut held: Option<Cmd> = None;
        while weight < max_events {
            match rx.try_recv() {
                Ok(cmd) if cmd.is_page_limit() => {
                    held = Some(cmd);
                    break;
                }
                Ok(cmd) => {
                    weight += cmd.weight();
                    group.push(cmd);
                }
                Err(_) => break,
            }
        }
        let mut replies = Vec::with_capacity(group.len());
        let committed = run_group(&mut conn, group, &mut replies);
        commits += 1;
        if committed.is_ok() && abort_after_commits == Some(commits) {
            // Test-only crash point: durable, not yet acknowledged.
            log::error!(target: "error", "event=fault_abort_after_commit commits={commits}");
            std::process::abort();
        }
        for r in replies {
            match (r, &committed) {
                (Reply::Append(tx, res), Ok(())) => {
                    let _ = tx.send(res.map_err(StoreError::Write));
                }
                (Reply::Hello(tx, res), Ok(())) => {
                    let _ = tx.send(res.map_err(StoreError::Write));
                }
                (Reply::Hello(tx, _), Err(e)) => {
                    let _ = tx.send(Err(StoreError::Write(e.clone())));
                }
                (Reply::Update(tx, res), Ok(())) => {
                    let _ = tx.send(res.map_err(StoreError::Write));
                }
                (Reply::Result(tx, res), Ok(())) => {
                    let _ = tx.send(res.map_err(StoreError::Write));
                }
                // The commit failed (disk full, I/O error): nothing in the group is durable.
                (Reply::Append(tx, _), Err(e)) => {
                    let _ = tx.send(Err(StoreError::Write(e.clone())));
                }
                (Reply::Update(tx, _), Err(e)) => {
                    let _ = tx.send(Err(StoreError::Write(e.clone())));
                }
                (Reply::Result(tx, _), Err(e)) => {
                    let _ = tx.send(Err(StoreError::Write(e.clone())));
                }
            }
        }
        if let Some(Cmd::PageLimit(pages)) = held {
            let n = pages.unwrap_or(4_294_967_294) as i64;
            if let Err(e) = conn.query_row(&format!("PRAGMA max_page_count = {n}"), [], |r| {
                r.get::<_, i64>(0)
            }) {
                log::error!(target: "error", "event=store_page_limit_failed error={e}");
            }
        }
    }
}

fn run_group(
    conn: &mut Connection,
    group: Vec<Cmd>,
    replies: &mut Vec<Reply>,
) -> Result<(), String> {
    let tx = match conn.transaction_with_behavior(TransactionBehavior::Immediate) {
        Ok(tx) => tx,
        Err(e) => {
            let msg = e.to_string();
            for cmd in group {
                push_failed(cmd, &msg, replies);
            }
            return Err(msg);
        }
    };
    let now = now_iso();
    let mut pending = group.into_iter();
    while let Some(cmd) = pending.next() {
        if let Err(e) = tx.execute_batch("SAVEPOINT cmd") {
            push_failed(cmd, &e.to_string(), replies);
            continue;
        }
        let reply = match cmd {
            Cmd::Hello {
                clinic,
                source,
                reply,
            } => Reply::Hello(reply, hello(&tx, &clinic, source, &now)),
            Cmd::Append {
                clinic,
                source,
                prev_seq,
                events,
                reply,
            } => Reply::Append(reply, append(&tx, &clinic, source, prev_seq, &events, &now)),
            Cmd::EnqueueUpdate { update, reply } => {
                Reply::Update(reply, enqueue_update(&tx, &update, &now))
            }
            Cmd::PageLimit(_) => {
                let _ = tx.execute_batch("RELEASE cmd");
                continue;
            }
            Cmd::MarkDelivered { ids } => {
                for id in ids {
                    let _ = tx.execute(
                        "UPDATE updates SET status = CASE status WHEN 'pending' THEN 'delivered' ELSE status END, \
                         deliveries = deliveries + 1, updated_at = ?2 WHERE update_id = ?1",
                        params![id, now],
                    );
                }
                let _ = tx.execute_batch("RELEASE cmd");
                continue;
            }
            Cmd::UpdateResult {
                clinic,
                update_id,
                status,
                reason,
                reply,
            } => Reply::Result(
                reply,
                tx.execute(
                    "UPDATE updates SET status = ?3, reason = ?4, updated_at = ?5 \
                     WHERE update_id = ?1 AND clinic_id = ?2 AND status IN ('pending', 'delivered')",
                    params![update_id, clinic, status.as_str(), reason, now],
                )
                .map(|n| n > 0)
                .map_err(|e| e.to_string()),
            ),
        };
        let error = match &reply {
            Reply::Append(_, Err(e))
            | Reply::Update(_, Err(e))
            | Reply::Result(_, Err(e))
            | Reply::Hello(_, Err(e)) => Some(e.clone()),
            _ => None,
        };
        // Some errors (a full disk, I/O) make SQLite roll the whole transaction back: then
        // the group failed as a whole, for that reason.
        if let (Some(root), true) = (&error, tx.is_autocommit()) {
            replies.push(reply);
            for cmd in pending {
                push_failed(cmd, root, replies);
            }
            return Err(root.clone());
        }
        let end = if error.is_some() {
            "ROLLBACK TO cmd; RELEASE cmd"
        } else {
            "RELEASE cmd"
        };
        if let Err(e) = tx.execute_batch(end) {
            replies.push(reply);
            let msg = error.unwrap_or_else(|| e.to_string());
            for cmd in pending {
                push_failed(cmd, &msg, replies);
            }
            return Err(msg);
        }
        replies.push(reply);
    }
    tx.commit().map_err(|e| e.to_string())
}

fn push_failed(cmd: Cmd, msg: &str, replies: &mut Vec<Reply>) {
    match cmd {
        Cmd::Append { reply, .. } => replies.push(Reply::Append(reply, Err(msg.into()))),
        Cmd::Hello { reply, .. } => replies.push(Reply::Hello(reply, Err(msg.into()))),
        Cmd::EnqueueUpdate { reply, .. } => replies.push(Reply::Update(reply, Err(msg.into()))),
        Cmd::UpdateResult { reply, .. } => replies.push(Reply::Result(reply, Err(msg.into()))),
        Cmd::MarkDelivered { .. } | Cmd::PageLimit(_) => {}
    }
}

fn hello(
    tx: &rusqlite::Transaction<'_>,
    clinic: &str,
    source: u64,
    now: &str,
) -> Result<u64, String> {
    let e = |e: rusqlite::Error| e.to_string();
    let row: Option<(i64, i64)> = tx
        .query_row(
            "SELECT acked_seq, source_id FROM clinics WHERE clinic_id = ?1",
            params![clinic],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()
        .map_err(e)?;
    match row {
        None => {
            tx.execute(
                "INSERT INTO clinics (clinic_id, acked_seq, source_id, first_seen) VALUES (?1, 0, ?2, ?3)",
                params![clinic, source as i64, now],
            )
            .map_err(e)?;
            Ok(0)
        }
        Some((acked, known)) if known as u64 == source || source == 0 => Ok(acked as u64),
        Some((acked, 0)) => {
            tx.execute(
                "UPDATE clinics SET source_id = ?2 WHERE clinic_id = ?1",
                params![clinic, source as i64],
            )
            .map_err(e)?;
            Ok(acked as u64)
        }
        Some((acked, known)) => {
            log::error!(target: "error", "clinic={clinic} event=outbox_recreated old_source={known} new_source={source} old_acked_seq={acked} action=position_restarts_at_0");
            log::warn!(target: "audit", "event=outbox_recreated clinic={clinic} old_source={known} new_source={source}");
            tx.execute(
                "UPDATE clinics SET source_id = ?2, acked_seq = 0 WHERE clinic_id = ?1",
                params![clinic, source as i64],
            )
            .map_err(e)?;
            Ok(0)
        }
    }
}

fn append(
    tx: &rusqlite::Transaction<'_>,
    clinic: &str,
    source: u64,
    prev_seq: u64,
    events: &[IncomingEvent],
    now: &str,
) -> Result<AppendOutcome, String> {
    let e = |e: rusqlite::Error| e.to_string();
    let (acked, known): (u64, u64) = tx
        .query_row(
            "SELECT acked_seq, source_id FROM clinics WHERE clinic_id = ?1",
            params![clinic],
            |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64)),
        )
        .optional()
        .map_err(e)?
        .unwrap_or((0, 0));
    if prev_seq > acked || (source != 0 && known != 0 && source != known) {
        return Ok(AppendOutcome::Gap { acked });
    }
    let source = if source == 0 { known } else { source };
    let mut stmt = tx
        .prepare_cached(
            "INSERT OR IGNORE INTO events (clinic_id, seq, entity, op, key_json, row_json, committed_at, received_at, problem, source_id) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
        )
        .map_err(e)?;
    let mut inserted = 0;
    let mut last = acked;
    for ie in events {
        let ev = &ie.event;
        let key = serde_json::to_string(&ev.key).map_err(|x| x.to_string())?;
        let row = ev
            .row
            .as_ref()
            .map(serde_json::to_string)
            .transpose()
            .map_err(|x| x.to_string())?;
        inserted += stmt
            .execute(params![
                clinic,
                ev.seq as i64,
                ev.entity,
                ev.op.as_str(),
                key,
                row,
                ev.committed_at,
                now,
                ie.problem,
                source as i64
            ])
            .map_err(e)?;
        last = last.max(ev.seq);
    }
    tx.execute(
        "INSERT INTO clinics (clinic_id, acked_seq, first_seen, last_event_at) VALUES (?1, ?2, ?3, ?3) \
         ON CONFLICT (clinic_id) DO UPDATE SET acked_seq = max(acked_seq, excluded.acked_seq), last_event_at = excluded.last_event_at",
        params![clinic, last as i64, now],
    )
    .map_err(e)?;
    Ok(AppendOutcome::Stored {
        acked: last,
        inserted,
    })
}

fn enqueue_update(
    tx: &rusqlite::Transaction<'_>,
    u: &NewUpdate,
    now: &str,
) -> Result<String, String> {
    let id = new_update_id();
    let key = serde_json::to_string(&u.key).map_err(|e| e.to_string())?;
    let row = u
        .row
        .as_ref()
        .map(serde_json::to_string)
        .transpose()
        .map_err(|e| e.to_string())?;
    tx.execute(
        "INSERT INTO updates (update_id, clinic_id, entity, op, key_json, row_json, status, created_at, updated_at) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'pending', ?7, ?7)",
        params![id, u.clinic_id, u.entity, u.op.as_str(), key, row, now],
    )
    .map_err(|e| e.to_string())?;
    tx.execute(
        "INSERT INTO clinics (clinic_id, acked_seq, first_seen) VALUES (?1, 0, ?2) ON CONFLICT (clinic_id) DO NOTHING",
        params![u.clinic_id, now],
    )
    .map_err(|e| e.to_string())?;
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tether_schemas::Op;

    fn ev(seq: u64) -> IncomingEvent {
        IncomingEvent {
            event: Event {
                seq,
                entity: "patient".into(),
                op: Op::Insert,
                key: Map::new(),
                row: Some(Map::new()),
                committed_at: now_iso(),
            },
            problem: None,
        }
    }

    fn block<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
            .block_on(f)
    }

    #[test]
    fn duplicates_are_acked_without_a_second_row_and_gaps_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&dir.path().join("g.db"), 100).expect("store");
        let out = block(store.append("c1", 0, vec![ev(1), ev(2), ev(3)])).expect("append");
        assert_eq!(
            out,
            AppendOutcome::Stored {
                acked: 3,
                inserted: 3
            }
        );
        let out = block(store.append("c1", 1, vec![ev(2), ev(3), ev(4)])).expect("append");
        assert_eq!(
            out,
            AppendOutcome::Stored {
                acked: 4,
                inserted: 1
            }
        );
        let out = block(store.append("c1", 10, vec![ev(11)])).expect("append");
        assert_eq!(out, AppendOutcome::Gap { acked: 4 });
        let events = store.events_page(Some("c1"), 0, 100).expect("page");
        assert_eq!(
            events.iter().map(|e| e.seq).collect::<Vec<_>>(),
            vec![1, 2, 3, 4]
        );
        assert_eq!(store.acked_seq("c1").expect("acked"), 4);
        assert_eq!(store.acked_seq("other").expect("acked"), 0);
    }

    #[test]
    fn iso_dates_are_correct() {
        assert_eq!(iso_from_millis(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(iso_from_millis(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(
            iso_from_millis(1_798_675_200_000),
            "2026-12-31T00:00:00.000Z"
        );
    }
}

#[cfg(test)]
mod page_limit_tests {
    use super::*;
    use tether_schemas::Op;

    #[test]
    fn a_full_disk_fails_the_commit_and_lifting_the_limit_recovers() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&dir.path().join("g.db"), 100).expect("store");
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("rt");
        let big = |seq: u64| IncomingEvent {
            event: Event {
                seq,
                entity: "e".into(),
                op: Op::Insert,
                key: Map::new(),
                row: serde_json::json!({"pad": "x".repeat(20_000)})
                    .as_object()
                    .cloned(),
                committed_at: "t".into(),
            },
            problem: None,
        };
        rt.block_on(store.append("c", 0, vec![big(1)]))
            .expect("first");
        let pages = store.page_count().expect("pages");
        store.set_page_limit(Some(pages));
        let err = rt.block_on(store.append("c", 1, vec![big(2), big(3)]));
        assert!(
            matches!(&err, Err(StoreError::Write(m)) if m.contains("full")),
            "{err:?}"
        );
        assert_eq!(
            store.acked_seq("c").expect("acked"),
            1,
            "nothing of the failed group is acknowledged"
        );
        store.set_page_limit(None);
        let ok = rt
            .block_on(store.append("c", 1, vec![big(2), big(3)]))
            .expect("after");
        assert_eq!(
            ok,
            AppendOutcome::Stored {
                acked: 3,
                inserted: 2
            }
        );
    }
}

#[cfg(test)]
mod source_tests {
    use super::*;
    use tether_schemas::Op;

    fn ev(seq: u64) -> IncomingEvent {
        IncomingEvent {
            event: Event {
                seq,
                entity: "e".into(),
                op: Op::Insert,
                key: Map::new(),
                row: None,
                committed_at: "t".into(),
            },
            problem: None,
        }
    }

    #[test]
    fn a_recreated_outbox_starts_a_new_position_instead_of_being_taken_for_duplicates() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&dir.path().join("g.db"), 100).expect("store");
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("rt");
        assert_eq!(rt.block_on(store.hello("c", 111)).expect("hello"), 0);
        rt.block_on(store.append_from("c", 111, 0, vec![ev(1), ev(2), ev(3)]))
            .expect("a");
        assert_eq!(rt.block_on(store.hello("c", 111)).expect("same outbox"), 3);
        // The clinic's database was re-created: sequences start again at 1.
        assert_eq!(rt.block_on(store.hello("c", 222)).expect("new outbox"), 0);
        let out = rt
            .block_on(store.append_from("c", 222, 0, vec![ev(1), ev(2)]))
            .expect("b");
        assert_eq!(
            out,
            AppendOutcome::Stored {
                acked: 2,
                inserted: 2
            },
            "stored, not ignored"
        );
        // A late batch from the old outbox is refused.
        let stale = rt
            .block_on(store.append_from("c", 111, 3, vec![ev(4)]))
            .expect("stale");
        assert_eq!(stale, AppendOutcome::Gap { acked: 2 });
        assert_eq!(store.events_page(Some("c"), 0, 100).expect("page").len(), 5);
    }
}

//! The SQLite adapter (embedded default): WAL, `synchronous=FULL`.
//!
//! All writes go through the shared writer thread (`super::Writer`), which *group-commits*:
//! every write waiting in its queue (up to `group_commit_max_events` events) runs in one
//! transaction, each in its own savepoint so one bad write cannot fail the others; one fsync
//! for the group, and only then is each caller answered.
//!
//! Event ids are SQLite's rowids under one writer, so they are visible in id order.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use serde_json::value::RawValue;
use serde_json::Value;
use tether_schemas::{UpdateOp, UpdateStatus};

use super::{
    check_version, new_update_id, now_iso, AppendOutcome, Backend, CancelOutcome, ChannelRecord,
    Claim, ClinicRecord, CodeTake, DeadLetter, Done, ForwardedCall, GatewayStore, IncomingEvent,
    NewChannelMessage, NewUpdate, NodeRecord, Op, Pruned, ReadPool, StoreError, StoreFuture,
    StoreSettings, StoredEvent, UpdateRecord, Writer, CHANNEL_COLUMNS,
};

/// `MIGRATIONS[i]` takes the schema from `PRAGMA user_version = i` to `i + 1`.
const MIGRATIONS: &[&str] = &[
    // 1: the schema of the first releases (kept as it was: stores made by them pass through).
    "
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
CREATE TABLE IF NOT EXISTS webhook_cursors (
    name TEXT PRIMARY KEY,
    last_event_id INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS webhook_dead_letters (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    event_id INTEGER NOT NULL,
    attempts INTEGER NOT NULL,
    last_error TEXT NOT NULL,
    failed_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    UNIQUE (name, event_id)
);
",
    // 2: per-clinic counters kept with each write (fleet views stop counting events) and the
    // retention watermark. (No index for one clinic's events by id: it cost ~8 % of ingest in
    // an interleaved run; per-clinic pages read through the UNIQUE (clinic, source, seq) one.)
    "
ALTER TABLE clinics ADD COLUMN events_stored INTEGER NOT NULL DEFAULT 0;
ALTER TABLE clinics ADD COLUMN pending_updates INTEGER NOT NULL DEFAULT 0;
UPDATE clinics SET
    events_stored = (SELECT count(*) FROM events e WHERE e.clinic_id = clinics.clinic_id),
    pending_updates = (SELECT count(*) FROM updates u WHERE u.clinic_id = clinics.clinic_id
                       AND u.status IN ('pending', 'delivered'));
CREATE TABLE IF NOT EXISTS store_meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO store_meta (key, value) VALUES ('pruned_through', 0);
",
    // 3: connection-token ids seen (the replay guard every node shares).
    "
CREATE TABLE IF NOT EXISTS token_ids (jti TEXT PRIMARY KEY, expires_at INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS token_ids_expiry ON token_ids (expires_at);
",
    // 4: one owner per clinic, fenced (each hello's claim) and the nodes that beat on the store.
    "
ALTER TABLE clinics ADD COLUMN epoch INTEGER NOT NULL DEFAULT 0;
ALTER TABLE clinics ADD COLUMN owner_node TEXT;
CREATE TABLE IF NOT EXISTS gateway_nodes (
    node_id TEXT PRIMARY KEY,
    addr TEXT NOT NULL,
    started_at TEXT NOT NULL,
    last_beat_ms INTEGER NOT NULL,
    sessions INTEGER NOT NULL
);
",
    "
CREATE TABLE IF NOT EXISTS rpc_calls (
    id TEXT PRIMARY KEY,
    clinic_id TEXT NOT NULL,
    from_node TEXT NOT NULL,
    to_node TEXT NOT NULL,
    name TEXT NOT NULL,
    params_json TEXT NOT NULL,
    deadline_ms INTEGER NOT NULL,
    taken INTEGER NOT NULL DEFAULT 0,
    answer_json TEXT
);
CREATE INDEX IF NOT EXISTS rpc_calls_deadline ON rpc_calls (deadline_ms);
CREATE TABLE IF NOT EXISTS cluster_keys (name TEXT PRIMARY KEY, secret TEXT NOT NULL);
",
    // 6: one identity per database: a new source is taken only after an operator's confirmation.
    "
ALTER TABLE clinics ADD COLUMN source_reset INTEGER NOT NULL DEFAULT 0;
ALTER TABLE updates ADD COLUMN idempotency_key TEXT;
ALTER TABLE updates ADD COLUMN batch_id TEXT;
CREATE INDEX IF NOT EXISTS updates_batch ON updates (batch_id) WHERE batch_id IS NOT NULL;
CREATE UNIQUE INDEX IF NOT EXISTS updates_idempotency ON updates (clinic_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
", // 7: flagged events (stored with a problem) listed and counted without a scan.
    "
CREATE INDEX IF NOT EXISTS events_flagged ON events (id) WHERE problem IS NOT NULL;
",
    // 8: per-clinic counters of failed cloud updates and schema-flagged events (dashboard
    // tiles), kept with each write like the others.
    "
ALTER TABLE clinics ADD COLUMN failed_updates INTEGER NOT NULL DEFAULT 0;
ALTER TABLE clinics ADD COLUMN flagged_events INTEGER NOT NULL DEFAULT 0;
UPDATE clinics SET failed_updates = f.n FROM
    (SELECT clinic_id, count(*) AS n FROM updates WHERE status = 'failed' GROUP BY clinic_id) f
    WHERE f.clinic_id = clinics.clinic_id;
UPDATE clinics SET flagged_events = f.n FROM
    (SELECT clinic_id, count(*) AS n FROM events WHERE problem IS NOT NULL GROUP BY clinic_id) f
    WHERE f.clinic_id = clinics.clinic_id;
",
    // 9: one-time enrolment codes (their SHA-256, never the code), shared by every node.
    "
CREATE TABLE IF NOT EXISTS enrolment_codes (
    code_hash TEXT PRIMARY KEY,
    clinic_id TEXT NOT NULL,
    labels_json TEXT NOT NULL,
    expires_at INTEGER NOT NULL,
    created_at TEXT NOT NULL,
    created_by TEXT NOT NULL,
    used_at TEXT,
    used_by TEXT
);
CREATE INDEX IF NOT EXISTS enrolment_codes_expiry ON enrolment_codes (expires_at);
",
    // 10: the clinic registry kept in the store (gateway.auth.registry: store), versioned.
    "
CREATE TABLE IF NOT EXISTS clinic_registry (
    clinic_id TEXT PRIMARY KEY,
    entry_json TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
INSERT OR IGNORE INTO store_meta (key, value) VALUES ('registry_version', 0);
",
    // 11: channel messages, both ways (down: queued for a clinic; up: from its applications).
    "
CREATE TABLE IF NOT EXISTS channel_messages (
    row_id INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id TEXT NOT NULL,
    clinic_id TEXT NOT NULL,
    channel TEXT NOT NULL,
    direction TEXT NOT NULL,
    delivery TEXT NOT NULL,
    payload TEXT NOT NULL,
    status TEXT NOT NULL,
    deliveries INTEGER NOT NULL DEFAULT 0,
    created_ms INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL,
    expires_ms INTEGER,
    batch_id TEXT,
    UNIQUE (clinic_id, message_id)
);
CREATE INDEX IF NOT EXISTS channel_messages_open ON channel_messages (clinic_id, row_id)
    WHERE status IN ('pending', 'sent');
CREATE INDEX IF NOT EXISTS channel_messages_up ON channel_messages (row_id) WHERE direction = 'up';
CREATE INDEX IF NOT EXISTS channel_messages_created ON channel_messages (created_ms);
",
];

pub const SCHEMA_VERSION: usize = MIGRATIONS.len();

fn open_conn(path: &Path) -> Result<Connection, StoreError> {
    let err = |e: rusqlite::Error| StoreError::Open {
        store: path.display().to_string(),
        message: e.to_string(),
    };
    // A store directory that does not exist yet is created (a fresh install's `data/`).
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| StoreError::Open {
            store: path.display().to_string(),
            message: format!("cannot create its directory {}: {e}", dir.display()),
        })?;
    }
    let conn = Connection::open(path).map_err(err)?;
    conn.busy_timeout(std::time::Duration::from_secs(10))
        .map_err(err)?;
    conn.execute_batch("PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL;")
        .map_err(err)?;
    Ok(conn)
}

/// Applies the migrations this store lacks, each in its own transaction.
fn migrate(conn: &mut Connection, path: &Path) -> Result<(), StoreError> {
    let err = |e: rusqlite::Error| StoreError::Open {
        store: path.display().to_string(),
        message: format!("migration: {e}"),
    };
    let found: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(err)?;
    check_version(&path.display().to_string(), found, SCHEMA_VERSION)?;
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(found.max(0) as usize) {
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(err)?;
        tx.execute_batch(sql).map_err(err)?;
        tx.execute_batch(&format!("PRAGMA user_version = {}", i + 1))
            .map_err(err)?;
        tx.commit().map_err(err)?;
        log::info!(target: "connection", "event=store_migrated store=sqlite version={}", i + 1);
    }
    Ok(())
}

fn read_err(e: rusqlite::Error) -> StoreError {
    StoreError::Unavailable {
        retryable: true,
        message: format!("read: {e}"),
    }
}

/// SQLite errors that leave the group unusable (full disk, I/O) are "needs attention" until
/// the condition clears; both retry on their own once it does.
fn registry_version(c: &Connection) -> Result<u64, rusqlite::Error> {
    c.query_row(
        "SELECT value FROM store_meta WHERE key = 'registry_version'",
        [],
        |r| r.get::<_, i64>(0),
    )
    .optional()
    .map(|v| v.unwrap_or(0).max(0) as u64)
}

/// Bumps the registry's version; answers the new one.
fn bump_registry(tx: &rusqlite::Transaction<'_>) -> Result<u64, StoreError> {
    tx.query_row(
        "UPDATE store_meta SET value = value + 1 WHERE key = 'registry_version' RETURNING value",
        [],
        |r| r.get::<_, i64>(0),
    )
    .map(|v| v.max(0) as u64)
    .map_err(write_err)
}

fn write_err(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable {
        retryable: true,
        message: format!("write: {e}"),
    }
}

pub struct SqliteStore {
    path: PathBuf,
    node: String,
    writer: Writer,
    readers: Arc<ReadPool<Connection>>,
}

impl SqliteStore {
    /// Opens with defaults (tests and tools).
    pub fn open(path: &Path) -> Result<Arc<SqliteStore>, StoreError> {
        SqliteStore::open_with(path, &StoreSettings::sqlite(path))
    }

    pub fn open_with(path: &Path, s: &StoreSettings) -> Result<Arc<SqliteStore>, StoreError> {
        let mut conn = open_conn(path)?;
        migrate(&mut conn, path)?;
        let writer = Writer::spawn("sqlite", SqliteBackend { conn }, s)?;
        Ok(Arc::new(SqliteStore {
            path: path.to_path_buf(),
            node: s.node.clone(),
            writer,
            readers: Arc::new(ReadPool::new(8)),
        }))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, rusqlite::Error> + Send + 'static,
    ) -> StoreFuture<T> {
        let path = self.path.clone();
        self.readers
            .run(move || open_conn(&path), move |c| f(c).map_err(read_err))
    }

    /// Caps the store file at `pages` pages (SQLite answers writes past it with "database or
    /// disk is full", exactly as on a full disk); `None` lifts the cap. The fault tests use it
    /// to fill the disk.
    pub fn set_page_limit(&self, pages: Option<u64>) -> StoreFuture<()> {
        self.writer.unit(Op::PageLimit(pages))
    }

    /// Pages the store file uses now.
    pub fn page_count(&self) -> StoreFuture<u64> {
        self.read(|c| {
            c.query_row("PRAGMA page_count", [], |r| r.get::<_, i64>(0))
                .map(|n| n as u64)
        })
    }
}

impl Drop for SqliteStore {
    fn drop(&mut self) {
        self.writer.close();
    }
}

pub(crate) fn event_from_row(r: &rusqlite::Row<'_>) -> Result<StoredEvent, rusqlite::Error> {
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
}

const EVENT_COLUMNS: &str =
    "id, clinic_id, seq, entity, op, key_json, row_json, committed_at, received_at, problem";

fn clinic_from_row(r: &rusqlite::Row<'_>) -> Result<ClinicRecord, rusqlite::Error> {
    Ok(ClinicRecord {
        clinic_id: r.get(0)?,
        acked_seq: r.get::<_, i64>(1)? as u64,
        first_seen: r.get(2)?,
        last_event_at: r.get(3)?,
        events: r.get::<_, i64>(4)?.max(0) as u64,
        pending_updates: r.get::<_, i64>(5)?.max(0) as u64,
        node: r.get(6)?,
        epoch: r.get::<_, i64>(7)?.max(0) as u64,
        failed_updates: r.get::<_, i64>(8)?.max(0) as u64,
        flagged_events: r.get::<_, i64>(9)?.max(0) as u64,
    })
}

const CLINIC_COLUMNS: &str =
    "clinic_id, acked_seq, first_seen, last_event_at, events_stored, pending_updates, owner_node, epoch, failed_updates, flagged_events";

fn meta(c: &Connection, key: &str) -> Result<u64, rusqlite::Error> {
    c.query_row(
        "SELECT value FROM store_meta WHERE key = ?1",
        params![key],
        |r| r.get::<_, i64>(0),
    )
    .optional()
    .map(|v| v.unwrap_or(0).max(0) as u64)
}

fn op_from(s: &str) -> UpdateOp {
    if s == "delete" {
        UpdateOp::Delete
    } else {
        UpdateOp::Upsert
    }
}

impl GatewayStore for SqliteStore {
    super::write_methods!();

    fn kind(&self) -> &'static str {
        "sqlite"
    }

    fn acked_seq(&self, clinic: &str) -> StoreFuture<u64> {
        let clinic = clinic.to_string();
        self.read(move |c| {
            c.query_row(
                "SELECT acked_seq FROM clinics WHERE clinic_id = ?1",
                params![clinic],
                |r| r.get::<_, i64>(0),
            )
            .optional()
            .map(|v| v.unwrap_or(0) as u64)
        })
    }

    fn clinics(&self) -> StoreFuture<Vec<ClinicRecord>> {
        self.read(|c| {
            let mut stmt = c.prepare_cached(&format!(
                "SELECT {CLINIC_COLUMNS} FROM clinics ORDER BY clinic_id"
            ))?;
            let rows = stmt.query_map([], clinic_from_row)?;
            rows.collect()
        })
    }

    fn try_lead(&self, _role: &str) -> StoreFuture<bool> {
        // One process per SQLite store: it leads everything.
        Box::pin(async { Ok(true) })
    }

    fn watch(&self, _on_signal: super::SignalWatcher) -> bool {
        // One process per SQLite store: the REST handler tells its own registry.
        false
    }

    fn nodes(&self) -> StoreFuture<Vec<NodeRecord>> {
        self.read(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT node_id, addr, started_at, last_beat_ms, sessions FROM gateway_nodes ORDER BY node_id",
            )?;
            let rows = stmt.query_map([], |r| {
                Ok(NodeRecord {
                    node_id: r.get(0)?,
                    addr: r.get(1)?,
                    started_at: r.get(2)?,
                    last_beat_ms: r.get::<_, i64>(3)?.max(0) as u64,
                    sessions: r.get::<_, i64>(4)?.max(0) as u64,
                })
            })?;
            rows.collect()
        })
    }

    fn clinic(&self, clinic: &str) -> StoreFuture<Option<ClinicRecord>> {
        let clinic = clinic.to_string();
        self.read(move |c| {
            c.prepare_cached(&format!(
                "SELECT {CLINIC_COLUMNS} FROM clinics WHERE clinic_id = ?1"
            ))?
            .query_row(params![clinic], clinic_from_row)
            .optional()
        })
    }

    fn events_page(
        &self,
        clinic: Option<&str>,
        after: u64,
        limit: usize,
    ) -> StoreFuture<Vec<StoredEvent>> {
        self.page(clinic, after, limit, false)
    }

    fn flagged_events_page(
        &self,
        clinic: Option<&str>,
        after: u64,
        limit: usize,
    ) -> StoreFuture<Vec<StoredEvent>> {
        self.page(clinic, after, limit, true)
    }

    fn flagged_since(&self, after_id: u64) -> StoreFuture<(u64, u64)> {
        let path = self.path.clone();
        self.readers.run(
            move || open_conn(&path),
            move |c| {
                let (n, max): (i64, Option<i64>) = c
                    .query_row(
                        "SELECT count(*), max(id) FROM events WHERE problem IS NOT NULL AND id > ?1",
                        [after_id as i64],
                        |r| Ok((r.get(0)?, r.get(1)?)),
                    )
                    .map_err(read_err)?;
                Ok((n as u64, max.map_or(after_id, |m| m as u64)))
            },
        )
    }

    fn clinic_events(
        &self,
        clinic: &str,
        after_id: u64,
        limit: usize,
    ) -> StoreFuture<Vec<StoredEvent>> {
        let clinic = clinic.to_string();
        self.read(move |c| {
            let mut stmt = c.prepare_cached(&format!(
                "SELECT {EVENT_COLUMNS} FROM events WHERE clinic_id = ?1 \
                 AND source_id = coalesce((SELECT source_id FROM clinics WHERE clinic_id = ?1), 0) \
                 AND id > ?2 ORDER BY id LIMIT ?3"
            ))?;
            let rows = stmt.query_map(
                params![clinic, after_id as i64, limit as i64],
                event_from_row,
            )?;
            rows.collect()
        })
    }

    fn head(&self) -> StoreFuture<u64> {
        self.read(|c| {
            c.query_row("SELECT coalesce(max(id), 0) FROM events", [], |r| {
                r.get::<_, i64>(0)
            })
            .map(|n| n as u64)
        })
    }

    fn open_updates(
        &self,
        clinic: &str,
        after_row: i64,
        limit: usize,
    ) -> StoreFuture<Vec<(i64, tether_schemas::Update)>> {
        let clinic = clinic.to_string();
        self.read(move |c| {
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
                        op: op_from(&op),
                        key: serde_json::from_str(&key).unwrap_or_default(),
                        row: row.and_then(|s| serde_json::from_str(&s).ok()),
                    },
                ))
            })?;
            rows.collect()
        })
    }

    fn batch_counts(&self, batch_id: &str) -> StoreFuture<Vec<(String, u64)>> {
        let id = batch_id.to_string();
        self.read(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT status, count(*) FROM updates WHERE batch_id = ?1 GROUP BY status ORDER BY status",
            )?;
            let rows = stmt.query_map(params![id], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?.max(0) as u64))
            })?;
            rows.collect()
        })
    }

    fn updates_page(
        &self,
        clinic: &str,
        status: Option<String>,
        after_row: i64,
        limit: usize,
    ) -> StoreFuture<Vec<(i64, UpdateRecord)>> {
        let clinic = clinic.to_string();
        self.read(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT id, update_id, clinic_id, entity, op, status, reason, deliveries, created_at, updated_at \
                 FROM updates WHERE clinic_id = ?1 AND (?2 IS NULL OR status = ?2) AND id > ?3 ORDER BY id LIMIT ?4",
            )?;
            let rows = stmt.query_map(params![clinic, status, after_row, limit as i64], |r| {
                Ok((r.get::<_, i64>(0)?, update_record(r, 1)?))
            })?;
            rows.collect()
        })
    }

    fn open_channel(
        &self,
        clinic: &str,
        after_row: i64,
        now_ms: u64,
        limit: usize,
    ) -> StoreFuture<Vec<ChannelRecord>> {
        let clinic = clinic.to_string();
        self.read(move |c| {
            let mut stmt = c.prepare_cached(&format!(
                "SELECT {CHANNEL_COLUMNS}, payload FROM channel_messages \
                 WHERE clinic_id = ?1 AND status IN ('pending', 'sent') AND direction = 'down' \
                 AND row_id > ?2 AND (expires_ms IS NULL OR expires_ms > ?3) ORDER BY row_id LIMIT ?4"
            ))?;
            let rows = stmt.query_map(
                params![clinic, after_row, now_ms as i64, limit as i64],
                |r| channel_record(r, true),
            )?;
            rows.collect()
        })
    }

    fn channel_message(
        &self,
        message_id: &str,
        clinic: Option<&str>,
    ) -> StoreFuture<Option<ChannelRecord>> {
        let (id, clinic) = (message_id.to_string(), clinic.map(str::to_string));
        self.read(move |c| {
            c.query_row(
                &format!(
                    "SELECT {CHANNEL_COLUMNS} FROM channel_messages \
                     WHERE message_id = ?1 AND (?2 IS NULL OR clinic_id = ?2) ORDER BY row_id LIMIT 1"
                ),
                params![id, clinic],
                |r| channel_record(r, false),
            )
            .optional()
        })
    }

    fn channel_pending_clinics(&self) -> StoreFuture<Vec<String>> {
        self.read(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT DISTINCT clinic_id FROM channel_messages WHERE status IN ('pending', 'sent') \
                 AND direction = 'down' ORDER BY clinic_id",
            )?;
            let rows = stmt.query_map([], |r| r.get(0))?;
            rows.collect()
        })
    }

    fn up_channel_page(&self, after_row: i64, limit: usize) -> StoreFuture<Vec<ChannelRecord>> {
        self.read(move |c| {
            let mut stmt = c.prepare_cached(&format!(
                "SELECT {CHANNEL_COLUMNS}, payload FROM channel_messages \
                 WHERE direction = 'up' AND row_id > ?1 ORDER BY row_id LIMIT ?2"
            ))?;
            let rows = stmt.query_map(params![after_row, limit as i64], |r| {
                channel_record(r, true)
            })?;
            rows.collect()
        })
    }

    fn update(&self, update_id: &str) -> StoreFuture<Option<UpdateRecord>> {
        let id = update_id.to_string();
        self.read(move |c| {
            c.query_row(
                "SELECT update_id, clinic_id, entity, op, status, reason, deliveries, created_at, updated_at \
                 FROM updates WHERE update_id = ?1",
                params![id],
                |r| update_record(r, 0),
            )
            .optional()
        })
    }

    fn registry_entries(&self) -> StoreFuture<(u64, Vec<(String, String)>)> {
        self.read(|c| {
            let tx = c.unchecked_transaction()?;
            let version = registry_version(&tx)?;
            let mut st =
                tx.prepare("SELECT clinic_id, entry_json FROM clinic_registry ORDER BY clinic_id")?;
            let rows = st
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<Result<Vec<_>, _>>()?;
            Ok((version, rows))
        })
    }

    fn enrolment_codes(&self, clinic: &str) -> StoreFuture<Vec<super::CodeRecord>> {
        let clinic = clinic.to_string();
        self.read(move |c| {
            let mut st = c.prepare(&super::CODES_SQL.replace("$1", "?1"))?;
            let rows = st
                .query_map(params![clinic], |r| {
                    Ok((
                        r.get(0)?,
                        r.get(1)?,
                        r.get(2)?,
                        r.get(3)?,
                        r.get(4)?,
                        r.get(5)?,
                    ))
                })?
                .collect::<Result<Vec<super::CodeRow>, _>>()?;
            Ok(rows.into_iter().map(super::code_record).collect())
        })
    }

    fn registry_version(&self) -> StoreFuture<u64> {
        self.read(registry_version)
    }

    fn webhook_cursor(&self, name: &str) -> StoreFuture<u64> {
        let name = name.to_string();
        self.read(move |c| {
            c.query_row(
                "SELECT last_event_id FROM webhook_cursors WHERE name = ?1",
                params![name],
                |r| r.get::<_, i64>(0),
            )
            .optional()
            .map(|v| v.unwrap_or(0).max(0) as u64)
        })
    }

    fn dead_letters(&self, name: &str, after: u64, limit: usize) -> StoreFuture<Vec<DeadLetter>> {
        let name = name.to_string();
        self.read(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT id, event_id, attempts, last_error, failed_at FROM webhook_dead_letters \
                 WHERE name = ?1 AND id > ?2 ORDER BY id LIMIT ?3",
            )?;
            let rows = stmt.query_map(params![name, after as i64, limit as i64], |r| {
                Ok(DeadLetter {
                    id: r.get::<_, i64>(0)? as u64,
                    event_id: r.get::<_, i64>(1)? as u64,
                    attempts: r.get::<_, i64>(2)? as u32,
                    last_error: r.get(3)?,
                    failed_at: r.get(4)?,
                })
            })?;
            rows.collect()
        })
    }

    fn dead_letter_count(&self, name: &str) -> StoreFuture<u64> {
        let name = name.to_string();
        self.read(move |c| {
            c.query_row(
                "SELECT count(*) FROM webhook_dead_letters WHERE name = ?1",
                params![name],
                |r| r.get::<_, i64>(0),
            )
            .map(|n| n as u64)
        })
    }

    fn dead_letter_event(&self, name: &str, id: u64) -> StoreFuture<Option<u64>> {
        let name = name.to_string();
        self.read(move |c| {
            c.query_row(
                "SELECT event_id FROM webhook_dead_letters WHERE name = ?1 AND id = ?2",
                params![name, id as i64],
                |r| r.get::<_, i64>(0),
            )
            .optional()
            .map(|v| v.map(|n| n as u64))
        })
    }
}

struct SqliteBackend {
    conn: Connection,
}

impl Backend for SqliteBackend {
    fn run_alone(&mut self, op: &Op) {
        if let Op::PageLimit(pages) = op {
            let n = pages.unwrap_or(4_294_967_294) as i64;
            if let Err(e) = self
                .conn
                .query_row(&format!("PRAGMA max_page_count = {n}"), [], |r| {
                    r.get::<_, i64>(0)
                })
            {
                log::error!(target: "error", "event=store_page_limit_failed error={e}");
            }
        }
    }

    fn run_group(&mut self, ops: &[Op]) -> Result<Vec<Result<Done, StoreError>>, StoreError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(write_err)?;
        let now = now_iso();
        let mut out = Vec::with_capacity(ops.len());
        for op in ops {
            tx.execute_batch("SAVEPOINT op").map_err(write_err)?;
            let res = run_op(&tx, op, &now);
            // Some errors (a full disk, I/O) make SQLite roll the whole transaction back:
            // then the group failed as a whole, for that reason.
            if let (Err(e), true) = (&res, tx.is_autocommit()) {
                return Err(e.clone());
            }
            let end = if res.is_err() {
                "ROLLBACK TO op; RELEASE op"
            } else {
                "RELEASE op"
            };
            tx.execute_batch(end).map_err(|e| match &res {
                Err(first) => first.clone(),
                Ok(_) => write_err(e),
            })?;
            out.push(res);
        }
        tx.commit().map_err(write_err)?;
        Ok(out)
    }
}

fn run_op(tx: &rusqlite::Transaction<'_>, op: &Op, now: &str) -> Result<Done, StoreError> {
    match op {
        Op::Hello {
            clinic,
            source,
            node,
        } => hello(tx, clinic, *source, node, now).map(Done::Claim),
        Op::AllowSourceReset { clinic } => tx
            .execute(
                "UPDATE clinics SET source_reset = 1 WHERE clinic_id = ?1",
                params![clinic],
            )
            .map(|n| Done::Bool(n > 0))
            .map_err(write_err),
        Op::Append {
            clinic,
            source,
            epoch,
            prev_seq,
            events,
        } => append(tx, clinic, (*source, *epoch), *prev_seq, events, now).map(Done::Append),
        Op::Release { clinic, epoch } => {
            tx.prepare_cached(
                "UPDATE clinics SET owner_node = NULL WHERE clinic_id = ?1 AND epoch = ?2",
            )
            .and_then(|mut st| st.execute(params![clinic, *epoch as i64]))
            .map_err(write_err)?;
            Ok(Done::Unit)
        }
        Op::NodeBeat {
            node,
            addr,
            started_at,
            sessions,
            at_ms,
        } => {
            tx.prepare_cached(
                "INSERT INTO gateway_nodes (node_id, addr, started_at, last_beat_ms, sessions) VALUES (?1, ?2, ?3, ?4, ?5) \
                 ON CONFLICT (node_id) DO UPDATE SET addr = excluded.addr, started_at = excluded.started_at, \
                 last_beat_ms = excluded.last_beat_ms, sessions = excluded.sessions",
            )
            .and_then(|mut st| {
                st.execute(params![node, addr, started_at, *at_ms as i64, *sessions as i64])
            })
            .map_err(write_err)?;
            Ok(Done::Unit)
        }
        Op::EnqueueChannel(msgs) => msgs
            .iter()
            .map(|m| enqueue_channel(tx, m))
            .collect::<Result<Vec<_>, _>>()
            .map(Done::Flags),
        Op::MarkChannelSent(ids) => {
            let mut stmt = tx
                .prepare_cached(
                    "UPDATE channel_messages SET status = 'sent', deliveries = deliveries + 1, updated_ms = ?2 \
                     WHERE message_id = ?1 AND direction = 'down' AND status IN ('pending', 'sent')",
                )
                .map_err(write_err)?;
            let at = now_ms() as i64;
            let mut open = Vec::with_capacity(ids.len());
            for id in ids {
                if stmt.execute(params![id, at]).map_err(write_err)? > 0 {
                    open.push(id.clone());
                }
            }
            Ok(Done::Ids(open))
        }
        Op::ChannelResult {
            clinic,
            message_id,
            status,
        } => tx
            .query_row(
                "UPDATE channel_messages SET status = ?3, updated_ms = ?4 \
                 WHERE message_id = ?1 AND clinic_id = ?2 AND direction = 'down' AND status IN ('pending', 'sent') \
                 RETURNING channel, created_ms",
                params![message_id, clinic, status, now_ms() as i64],
                |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?.max(0) as u64)),
            )
            .optional()
            .map(Done::Recorded)
            .map_err(write_err),
        Op::ExpireChannels {
            now_ms: at,
            purge_before_ms,
        } => {
            let mut counts: Vec<(String, u64)> = Vec::new();
            {
                let mut stmt = tx
                    .prepare_cached(
                        "UPDATE channel_messages SET status = 'expired', updated_ms = ?1 \
                         WHERE status IN ('pending', 'sent') AND expires_ms IS NOT NULL AND expires_ms <= ?1 \
                         RETURNING channel",
                    )
                    .map_err(write_err)?;
                let rows = stmt
                    .query_map(params![*at as i64], |r| r.get::<_, String>(0))
                    .map_err(write_err)?;
                for ch in rows {
                    super::count_channel(&mut counts, ch.map_err(write_err)?);
                }
            }
            tx.execute(
                "DELETE FROM channel_messages WHERE created_ms < ?1 \
                 AND status IN ('delivered', 'expired', 'accepted', 'refused')",
                params![*purge_before_ms as i64],
            )
            .map_err(write_err)?;
            Ok(Done::Counts(counts))
        }
        Op::EnqueueUpdate(u) => enqueue_update(tx, u, now).map(Done::Id),
        Op::EnqueueBatch(us) => us
            .iter()
            .map(|u| enqueue_update(tx, u, now))
            .collect::<Result<Vec<_>, _>>()
            .map(Done::Ids),
        Op::MarkDelivered(ids) => {
            let mut stmt = tx
                .prepare_cached(
                    "UPDATE updates SET status = CASE status WHEN 'pending' THEN 'delivered' ELSE status END, \
                     deliveries = deliveries + 1, updated_at = ?2 \
                     WHERE update_id = ?1 AND status IN ('pending', 'delivered')",
                )
                .map_err(write_err)?;
            let mut open = Vec::with_capacity(ids.len());
            for id in ids {
                if stmt.execute(params![id, now]).map_err(write_err)? > 0 {
                    open.push(id.clone());
                }
            }
            Ok(Done::Ids(open))
        }
        Op::CancelUpdate { update_id } => {
            let clinic: Option<String> = tx
                .query_row(
                    "UPDATE updates SET status = 'cancelled', updated_at = ?2 \
                     WHERE update_id = ?1 AND status = 'pending' RETURNING clinic_id",
                    params![update_id, now],
                    |r| r.get(0),
                )
                .optional()
                .map_err(write_err)?;
            if let Some(c) = clinic {
                tx.execute(
                    "UPDATE clinics SET pending_updates = pending_updates - 1 WHERE clinic_id = ?1",
                    params![c],
                )
                .map_err(write_err)?;
                return Ok(Done::Cancel(CancelOutcome::Cancelled));
            }
            let status: Option<String> = tx
                .query_row(
                    "SELECT status FROM updates WHERE update_id = ?1",
                    params![update_id],
                    |r| r.get(0),
                )
                .optional()
                .map_err(write_err)?;
            Ok(Done::Cancel(match status {
                None => CancelOutcome::NotFound,
                Some(s) => CancelOutcome::NotPending(s),
            }))
        }
        Op::UpdateResult {
            clinic,
            update_id,
            status,
            reason,
        } => {
            let n = tx
                .execute(
                    "UPDATE updates SET status = ?3, reason = ?4, updated_at = ?5 \
                     WHERE update_id = ?1 AND clinic_id = ?2 AND status IN ('pending', 'delivered')",
                    params![update_id, clinic, status.as_str(), reason, now],
                )
                .map_err(write_err)?;
            if n > 0 {
                tx.execute(
                    "UPDATE clinics SET pending_updates = pending_updates - 1, \
                     failed_updates = failed_updates + ?2 WHERE clinic_id = ?1",
                    params![clinic, i64::from(*status == UpdateStatus::Failed)],
                )
                .map_err(write_err)?;
            }
            Ok(Done::Bool(n > 0))
        }
        Op::AdvanceCursor { name, from, to } => {
            let n = if *from == 0 {
                tx.execute(
                    "INSERT INTO webhook_cursors (name, last_event_id) VALUES (?1, ?2) \
                     ON CONFLICT (name) DO UPDATE SET last_event_id = excluded.last_event_id \
                     WHERE webhook_cursors.last_event_id = 0",
                    params![name, *to as i64],
                )
            } else {
                tx.execute(
                    "UPDATE webhook_cursors SET last_event_id = ?3 WHERE name = ?1 AND last_event_id = ?2",
                    params![name, *from as i64, *to as i64],
                )
            }
            .map_err(write_err)?;
            Ok(Done::Bool(n == 1))
        }
        Op::Replay { name, event_id } => {
            let head: i64 = tx
                .query_row("SELECT coalesce(max(id), 0) FROM events", [], |r| r.get(0))
                .map_err(write_err)?;
            let head = head as u64;
            if *event_id > head.max(1) {
                return Ok(Done::Replay(Err(head)));
            }
            tx.execute(
                "INSERT INTO webhook_cursors (name, last_event_id) VALUES (?1, ?2) \
                 ON CONFLICT (name) DO UPDATE SET last_event_id = excluded.last_event_id",
                params![name, event_id.saturating_sub(1) as i64],
            )
            .map_err(write_err)?;
            Ok(Done::Replay(Ok(())))
        }
        Op::AddDeadLetter {
            name,
            event_id,
            attempts,
            error,
        } => {
            tx.execute(
                "INSERT INTO webhook_dead_letters (name, event_id, attempts, last_error, failed_at) VALUES (?1, ?2, ?3, ?4, ?5) \
                 ON CONFLICT (name, event_id) DO UPDATE SET attempts = attempts + excluded.attempts, \
                 last_error = excluded.last_error, failed_at = excluded.failed_at",
                params![name, *event_id as i64, *attempts as i64, error, now],
            )
            .map_err(write_err)?;
            Ok(Done::Unit)
        }
        Op::RemoveDeadLetter { name, id } => {
            let n = tx
                .execute(
                    "DELETE FROM webhook_dead_letters WHERE name = ?1 AND id = ?2",
                    params![name, *id as i64],
                )
                .map_err(write_err)?;
            Ok(Done::Bool(n > 0))
        }
        Op::Prune {
            cutoff,
            below_id,
            batch,
        } => prune(tx, cutoff, *below_id, *batch).map(Done::Pruned),
        Op::PutRegistryEntry { clinic, entry_json } => {
            tx.execute(
                "INSERT INTO clinic_registry (clinic_id, entry_json, updated_at) VALUES (?1, ?2, ?3) \
                 ON CONFLICT (clinic_id) DO UPDATE SET entry_json = excluded.entry_json, updated_at = excluded.updated_at",
                params![clinic, entry_json, now_iso()],
            )
            .map_err(write_err)?;
            Ok(Done::Version(Some(bump_registry(tx)?)))
        }
        Op::DeleteRegistryEntry { clinic } => {
            let n = tx
                .execute(
                    "DELETE FROM clinic_registry WHERE clinic_id = ?1",
                    params![clinic],
                )
                .map_err(write_err)?;
            Ok(Done::Version(if n == 0 {
                None
            } else {
                Some(bump_registry(tx)?)
            }))
        }
        Op::AddEnrolmentCode(c) => {
            let horizon = crate::security::unix_now().saturating_sub(super::ENROLMENT_CODE_KEEP_S);
            tx.execute(
                "DELETE FROM enrolment_codes WHERE expires_at < ?1",
                params![horizon as i64],
            )
            .map_err(write_err)?;
            tx.execute(
                "INSERT INTO enrolment_codes (code_hash, clinic_id, labels_json, expires_at, created_at, created_by) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![c.code_hash, c.clinic_id, c.labels_json, c.expires_at as i64, now_iso(), c.created_by],
            )
            .map_err(write_err)?;
            Ok(Done::Unit)
        }
        Op::TakeEnrolmentCode { code_hash, by } => {
            type Row = (String, String, i64, Option<String>, Option<String>);
            let row: Option<Row> = tx
                .query_row(
                    "SELECT clinic_id, labels_json, expires_at, used_at, used_by \
                     FROM enrolment_codes WHERE code_hash = ?1",
                    params![code_hash],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
                )
                .optional()
                .map_err(write_err)?;
            let Some((clinic, labels, expires_at, used_at, used_by)) = row else {
                return Ok(Done::Code(CodeTake::Unknown));
            };
            let used = used_at.map(|at| (at, used_by.unwrap_or_default()));
            let verdict = super::judge_code(clinic, labels, expires_at, used, crate::security::unix_now());
            if matches!(verdict, CodeTake::Taken { .. }) {
                tx.execute(
                    "UPDATE enrolment_codes SET used_at = ?2, used_by = ?3 WHERE code_hash = ?1 AND used_at IS NULL",
                    params![code_hash, now_iso(), by],
                )
                .map_err(write_err)?;
            }
            Ok(Done::Code(verdict))
        }
        Op::WithdrawEnrolmentCodes { clinic } => {
            let n = tx
                .execute(
                    "DELETE FROM enrolment_codes WHERE clinic_id = ?1 AND used_at IS NULL",
                    params![clinic],
                )
                .map_err(write_err)?;
            Ok(Done::Version(Some(n as u64)))
        }
        Op::ReturnEnrolmentCode { code_hash } => {
            tx.execute(
                "UPDATE enrolment_codes SET used_at = NULL, used_by = NULL WHERE code_hash = ?1",
                params![code_hash],
            )
            .map_err(write_err)?;
            Ok(Done::Unit)
        }
        Op::RememberToken { jti, expires_at } => {
            let now = crate::security::unix_now();
            tx.execute(
                "DELETE FROM token_ids WHERE jti IN \
                 (SELECT jti FROM token_ids WHERE expires_at < ?1 LIMIT 100)",
                params![now.saturating_sub(super::TOKEN_ID_MARGIN_S) as i64],
            )
            .map_err(write_err)?;
            let n = tx
                .execute(
                    "INSERT OR IGNORE INTO token_ids (jti, expires_at) VALUES (?1, ?2)",
                    params![jti, *expires_at as i64],
                )
                .map_err(write_err)?;
            Ok(Done::Bool(n == 1))
        }
        Op::ForwardCall(c) => {
            let horizon = crate::security::unix_now_ms().saturating_sub(super::CALL_MARGIN_MS);
            tx.execute(
                "DELETE FROM rpc_calls WHERE deadline_ms < ?1",
                params![horizon as i64],
            )
            .map_err(write_err)?;
            let params = serde_json::to_string(&c.params).unwrap_or_else(|_| "{}".into());
            tx.execute(
                "INSERT INTO rpc_calls (id, clinic_id, from_node, to_node, name, params_json, deadline_ms) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![c.id, c.clinic_id, c.from_node, c.to_node, c.name, params, c.deadline_ms as i64],
            )
            .map_err(write_err)?;
            Ok(Done::Unit)
        }
        Op::TakeCall { id, node } => {
            let row = tx
                .query_row(
                    "UPDATE rpc_calls SET taken = 1 WHERE id = ?1 AND to_node = ?2 AND taken = 0 \
                     RETURNING clinic_id, from_node, to_node, name, params_json, deadline_ms",
                    params![id, node],
                    |r| {
                        Ok((
                            r.get::<_, String>(0)?,
                            r.get::<_, String>(1)?,
                            r.get::<_, String>(2)?,
                            r.get::<_, String>(3)?,
                            r.get::<_, String>(4)?,
                            r.get::<_, i64>(5)?,
                        ))
                    },
                )
                .optional()
                .map_err(write_err)?;
            match row {
                None => Ok(Done::Call(None)),
                Some((clinic_id, from_node, to_node, name, params, deadline)) => {
                    Ok(Done::Call(Some(ForwardedCall {
                        id: id.clone(),
                        clinic_id,
                        from_node,
                        to_node,
                        name,
                        params: super::call_params(id, &params)?,
                        deadline_ms: deadline.max(0) as u64,
                    })))
                }
            }
        }
        Op::AnswerCall { id, answer } => tx
            .query_row(
                "UPDATE rpc_calls SET answer_json = ?2 WHERE id = ?1 RETURNING from_node",
                params![id, answer],
                |r| r.get::<_, String>(0),
            )
            .optional()
            .map(Done::Text)
            .map_err(write_err),
        Op::CallAnswer { id } => tx
            .query_row(
                "DELETE FROM rpc_calls WHERE id = ?1 AND answer_json IS NOT NULL RETURNING answer_json",
                params![id],
                |r| r.get::<_, String>(0),
            )
            .optional()
            .map(Done::Text)
            .map_err(write_err),
        Op::DropCall { id } => {
            tx.execute("DELETE FROM rpc_calls WHERE id = ?1", params![id])
                .map_err(write_err)?;
            Ok(Done::Unit)
        }
        Op::ClusterKey { candidate } => {
            tx.execute(
                "INSERT OR IGNORE INTO cluster_keys (name, secret) VALUES ('forwarding', ?1)",
                params![candidate],
            )
            .map_err(write_err)?;
            tx.query_row(
                "SELECT secret FROM cluster_keys WHERE name = 'forwarding'",
                [],
                |r| r.get::<_, String>(0),
            )
            .map(|k| Done::Text(Some(k)))
            .map_err(write_err)
        }
        Op::Ping => Ok(Done::Unit),
        Op::PageLimit(_) => Ok(Done::Unit),
    }
}

fn prune(
    tx: &rusqlite::Transaction<'_>,
    cutoff: &str,
    below_id: u64,
    batch: usize,
) -> Result<Pruned, StoreError> {
    let through = meta(tx, "pruned_through").map_err(write_err)?;
    // The oldest events, in id order, while they are old enough: a contiguous range, so
    // "everything up to `pruned_through` is gone" stays exact.
    let mut stmt = tx
        .prepare_cached(
            "SELECT id, received_at < ?3 FROM events WHERE id > ?1 AND id < ?2 ORDER BY id LIMIT ?4",
        )
        .map_err(write_err)?;
    let rows: Vec<(i64, bool)> = stmt
        .query_map(
            params![through as i64, below_id as i64, cutoff, batch as i64],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .map_err(write_err)?
        .collect::<Result<_, _>>()
        .map_err(write_err)?;
    let last = rows
        .iter()
        .take_while(|(_, old)| *old)
        .last()
        .map(|(id, _)| *id);
    let Some(last) = last else {
        return Ok(Pruned {
            events: 0,
            pruned_through: through,
        });
    };
    let per_clinic: Vec<(String, i64)> = tx
        .prepare_cached(
            "SELECT clinic_id, count(*) FROM events WHERE id > ?1 AND id <= ?2 GROUP BY clinic_id",
        )
        .map_err(write_err)?
        .query_map(params![through as i64, last], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .map_err(write_err)?
        .collect::<Result<_, _>>()
        .map_err(write_err)?;
    let n = tx
        .execute(
            "DELETE FROM events WHERE id > ?1 AND id <= ?2",
            params![through as i64, last],
        )
        .map_err(write_err)?;
    for (clinic, k) in per_clinic {
        tx.execute(
            "UPDATE clinics SET events_stored = max(events_stored - ?2, 0) WHERE clinic_id = ?1",
            params![clinic, k],
        )
        .map_err(write_err)?;
    }
    tx.execute(
        "UPDATE store_meta SET value = ?1 WHERE key = 'pruned_through'",
        params![last],
    )
    .map_err(write_err)?;
    Ok(Pruned {
        events: n as u64,
        pruned_through: last as u64,
    })
}

fn hello(
    tx: &rusqlite::Transaction<'_>,
    clinic: &str,
    source: u64,
    node: &str,
    now: &str,
) -> Result<Claim, StoreError> {
    let row: Option<(i64, i64, bool)> = tx
        .query_row(
            "SELECT acked_seq, source_id, source_reset FROM clinics WHERE clinic_id = ?1",
            params![clinic],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .optional()
        .map_err(write_err)?;
    let acked = match row {
        None => {
            tx.execute(
                "INSERT INTO clinics (clinic_id, acked_seq, source_id, first_seen) VALUES (?1, 0, ?2, ?3)",
                params![clinic, source as i64, now],
            )
            .map_err(write_err)?;
            0
        }
        Some((acked, known, _)) if known as u64 == source || source == 0 => acked as u64,
        Some((acked, 0, _)) => {
            tx.execute(
                "UPDATE clinics SET source_id = ?2 WHERE clinic_id = ?1",
                params![clinic, source as i64],
            )
            .map_err(write_err)?;
            acked as u64
        }
        Some((acked, known, true)) => {
            super::log_outbox_recreated(clinic, known as u64, source, acked as u64);
            tx.execute(
                "UPDATE clinics SET source_id = ?2, acked_seq = 0, source_reset = 0 WHERE clinic_id = ?1",
                params![clinic, source as i64],
            )
            .map_err(write_err)?;
            0
        }
        Some((_, known, false)) => {
            return Err(StoreError::SourceConflict {
                clinic: clinic.to_string(),
                known: known as u64,
                offered: source,
            })
        }
    };
    let epoch: i64 = tx
        .query_row(
            "UPDATE clinics SET epoch = epoch + 1, owner_node = ?2 WHERE clinic_id = ?1 RETURNING epoch",
            params![clinic, node],
            |r| r.get(0),
        )
        .map_err(write_err)?;
    Ok(Claim {
        acked,
        epoch: epoch as u64,
    })
}

/// SQLite's own insert rate on this disk, the ceiling for the gateway's ingest (`tether bench
/// sqlite-ceiling`): `rows` pre-encoded events of 50 clinics into a fresh store at `path` through
/// the writer's own insert ([`insert_events`]; WAL, `synchronous=FULL`), `per_commit` rows per
/// transaction, on this thread, without the sessions, the checks and the counters. Answers (rows/s, CPU-seconds of this thread per 100,000 rows).
pub fn insert_ceiling(path: &Path, rows: u64, per_commit: u64) -> Result<(f64, f64), StoreError> {
    let mut conn = open_conn(path)?;
    migrate(&mut conn, path)?;
    let row = |seq: u64| {
        format!(
            r#"{{"id":{seq},"patient_id":{},"practitioner_id":7,"status":"booked","starts_at":"2026-12-01T09:30:00Z","ends_at":"2026-12-01T10:00:00Z","room":"R-03","notes":"follow-up, bring results"}}"#,
            100_000 + seq % 90_000
        )
    };
    // Per clinic, its events pre-encoded as a session hands them to the writer.
    let raw = |text: String| RawValue::from_string(text).map_err(write_err);
    let per_clinic = rows.div_ceil(50);
    let mut clinics = Vec::with_capacity(50);
    for clinic in 0..50u64 {
        // `rows` in all: the first `rows % 50` clinics take one more.
        let n = rows / 50 + u64::from(clinic < rows % 50);
        let mut evs = Vec::with_capacity(n as usize);
        for seq in 1..=n {
            evs.push(IncomingEvent {
                event: tether_schemas::RawEvent {
                    seq,
                    entity: "appointment".into(),
                    op: tether_schemas::Op::Insert,
                    key: raw(format!(r#"{{"id":{seq}}}"#))?,
                    row: Some(raw(row(seq))?),
                    committed_at: "2026-12-01T09:00:00.000Z".into(),
                },
                problem: None,
            });
        }
        clinics.push((format!("clinic-{clinic:03}"), clinic as i64 + 1, evs));
    }
    let cpu = || {
        std::fs::read_to_string("/proc/thread-self/stat")
            .ok()
            .and_then(|s| {
                let rest = s.rsplit_once(") ")?.1.to_string();
                let f: Vec<f64> = rest
                    .split_whitespace()
                    .map(|x| x.parse().unwrap_or(0.0))
                    .collect();
                Some((f.get(11)? + f.get(12)?) / 100.0)
            })
            .unwrap_or(0.0)
    };
    let (t0, c0) = (std::time::Instant::now(), cpu());
    // Each commit takes the next per_commit / 50 events of every clinic.
    let step = (per_commit / 50).max(1) as usize;
    for at in (0..per_clinic as usize).step_by(step) {
        let tx = conn.transaction().map_err(write_err)?;
        for (clinic, source, evs) in &clinics {
            let part = evs.get(at..(at + step).min(evs.len())).unwrap_or_default();
            insert_events(&tx, clinic, *source, "2026-12-01T09:00:01.000Z", part)?;
        }
        tx.commit().map_err(write_err)?;
    }
    let secs = t0.elapsed().as_secs_f64();
    Ok((
        rows as f64 / secs,
        (cpu() - c0) * 100_000.0 / rows.max(1) as f64,
    ))
}

/// Rows per multi-row INSERT (10 parameters each, far below SQLite's 32,766).
const ROWS_PER_INSERT: usize = 64;

/// The next chunk of `left` rows: 64, 16, 4 or 1, so four cached statements cover any batch.
fn chunk_len(left: usize) -> usize {
    [ROWS_PER_INSERT, 16, 4, 1]
        .into_iter()
        .find(|&n| n <= left)
        .unwrap_or(1)
}

/// `INSERT OR IGNORE INTO events … VALUES (…), (…)` for `rows` rows.
fn insert_sql(rows: usize) -> String {
    let mut sql = String::from(
        "INSERT OR IGNORE INTO events (clinic_id, seq, entity, op, key_json, row_json, committed_at, received_at, problem, source_id) VALUES ",
    );
    for r in 0..rows {
        if r > 0 {
            sql.push(',');
        }
        sql.push_str("(?,?,?,?,?,?,?,?,?,?)");
    }
    sql
}

/// Inserts a clinic's events by INSERT statements of up to ROWS_PER_INSERT rows each (one
/// statement execution per chunk instead of per row), each key and row bound as the text
/// received; a row already held is ignored. Answers how many rows were new.
fn insert_events(
    tx: &rusqlite::Transaction<'_>,
    clinic: &str,
    source: i64,
    now: &str,
    events: &[IncomingEvent],
) -> Result<usize, StoreError> {
    let mut inserted = 0;
    let mut rest = events;
    while !rest.is_empty() {
        let (chunk, tail) = rest.split_at(chunk_len(rest.len()));
        rest = tail;
        let mut stmt = tx
            .prepare_cached(&insert_sql(chunk.len()))
            .map_err(write_err)?;
        let mut i = 0;
        let mut bind = |v: &dyn rusqlite::ToSql| -> Result<(), StoreError> {
            i += 1;
            stmt.raw_bind_parameter(i, v).map_err(write_err)
        };
        for ie in chunk {
            let ev = &ie.event;
            bind(&clinic)?;
            bind(&(ev.seq as i64))?;
            bind(&ev.entity)?;
            bind(&ev.op.as_str())?;
            bind(&ev.key.get())?;
            bind(&ev.row.as_deref().map(RawValue::get))?;
            bind(&ev.committed_at)?;
            bind(&now)?;
            bind(&ie.problem)?;
            bind(&source)?;
        }
        inserted += stmt.raw_execute().map_err(write_err)?;
    }
    Ok(inserted)
}

fn append(
    tx: &rusqlite::Transaction<'_>,
    clinic: &str,
    (source, epoch): (u64, u64),
    prev_seq: u64,
    events: &[IncomingEvent],
    now: &str,
) -> Result<AppendOutcome, StoreError> {
    let (acked, known, current): (u64, u64, u64) = tx
        .prepare_cached("SELECT acked_seq, source_id, epoch FROM clinics WHERE clinic_id = ?1")
        .and_then(|mut st| {
            st.query_row(params![clinic], |r| {
                Ok((
                    r.get::<_, i64>(0)? as u64,
                    r.get::<_, i64>(1)? as u64,
                    r.get::<_, i64>(2)?.max(0) as u64,
                ))
            })
            .optional()
        })
        .map_err(write_err)?
        .unwrap_or((0, 0, 0));
    if epoch != super::UNFENCED && epoch != current {
        return Ok(AppendOutcome::Fenced { epoch: current });
    }
    if prev_seq > acked || (source != 0 && known != 0 && source != known) {
        return Ok(AppendOutcome::Gap { acked });
    }
    let source = if source == 0 { known } else { source };
    let inserted = insert_events(tx, clinic, source as i64, now, events)?;
    let last = events.iter().map(|ie| ie.event.seq).fold(acked, u64::max);
    let flagged = super::newly_flagged(events, acked);
    tx.execute(
        "INSERT INTO clinics (clinic_id, acked_seq, first_seen, last_event_at, events_stored, flagged_events) VALUES (?1, ?2, ?3, ?3, ?4, ?5) \
         ON CONFLICT (clinic_id) DO UPDATE SET acked_seq = max(acked_seq, excluded.acked_seq), \
         last_event_at = excluded.last_event_at, events_stored = events_stored + excluded.events_stored, \
         flagged_events = flagged_events + excluded.flagged_events",
        params![clinic, last as i64, now, inserted as i64, flagged as i64],
    )
    .map_err(write_err)?;
    Ok(AppendOutcome::Stored {
        acked: last,
        inserted,
    })
}

/// An update's columns `update_id, clinic_id, entity, op, status, reason, deliveries,
/// created_at, updated_at`, starting at column `at`.
fn update_record(r: &rusqlite::Row<'_>, at: usize) -> rusqlite::Result<UpdateRecord> {
    Ok(UpdateRecord {
        update_id: r.get(at)?,
        clinic_id: r.get(at + 1)?,
        entity: r.get(at + 2)?,
        op: r.get(at + 3)?,
        status: r.get(at + 4)?,
        reason: r.get(at + 5)?,
        deliveries: r.get::<_, i64>(at + 6)? as u64,
        created_at: r.get(at + 7)?,
        updated_at: r.get(at + 8)?,
    })
}

fn now_ms() -> u64 {
    crate::security::unix_now_ms()
}

/// Keeps one channel message; `false` when the clinic already has one with its id.
fn enqueue_channel(
    tx: &rusqlite::Transaction<'_>,
    m: &NewChannelMessage,
) -> Result<bool, StoreError> {
    let at = now_ms() as i64;
    let n = tx
        .prepare_cached(
            "INSERT INTO channel_messages (message_id, clinic_id, channel, direction, delivery, payload, status, created_ms, updated_ms, expires_ms, batch_id) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?8, ?9, ?10) ON CONFLICT (clinic_id, message_id) DO NOTHING",
        )
        .and_then(|mut st| {
            st.execute(params![
                m.message_id,
                m.clinic_id,
                m.channel,
                if m.up { "up" } else { "down" },
                if m.durable { "durable" } else { "transient" },
                m.payload,
                if m.up { "accepted" } else { "pending" },
                at,
                m.expires_ms.map(|e| e as i64),
                m.batch_id,
            ])
        })
        .map_err(write_err)?;
    Ok(n > 0)
}

/// A [`ChannelRecord`] from a row of [`CHANNEL_COLUMNS`] (and `payload` after them).
fn channel_record(r: &rusqlite::Row<'_>, payload: bool) -> Result<ChannelRecord, rusqlite::Error> {
    let ms = |i: usize| r.get::<_, i64>(i).map(|v| v.max(0) as u64);
    let created_ms = ms(8)?;
    let expires_ms = r.get::<_, Option<i64>>(10)?.map(|v| v.max(0) as u64);
    Ok(ChannelRecord {
        row: r.get(0)?,
        message_id: r.get(1)?,
        clinic_id: r.get(2)?,
        channel: r.get(3)?,
        direction: r.get(4)?,
        delivery: r.get(5)?,
        status: r.get(6)?,
        deliveries: ms(7)?,
        created_at: super::iso_from_millis(created_ms as i64),
        updated_at: super::iso_from_millis(ms(9)? as i64),
        expires_at: expires_ms.map(|e| super::iso_from_millis(e as i64)),
        batch_id: r.get(11)?,
        payload: if payload { Some(r.get(12)?) } else { None },
        created_ms,
        expires_ms,
    })
}

fn enqueue_update(
    tx: &rusqlite::Transaction<'_>,
    u: &NewUpdate,
    now: &str,
) -> Result<String, StoreError> {
    let (key, row) = super::update_json(u)?;
    if let Some(k) = &u.idempotency_key {
        let first: Option<(String, String, String, String, Option<String>)> = tx
            .query_row(
                "SELECT update_id, entity, op, key_json, row_json FROM updates \
                 WHERE clinic_id = ?1 AND idempotency_key = ?2",
                params![u.clinic_id, k],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
            )
            .optional()
            .map_err(write_err)?;
        if let Some((id, entity, op, k_json, r_json)) = first {
            return super::same_update(u, &key, &row, id, (&entity, &op, &k_json, &r_json));
        }
    }
    let id = new_update_id();
    tx.execute(
        "INSERT INTO updates (update_id, clinic_id, entity, op, key_json, row_json, status, created_at, updated_at, idempotency_key, batch_id) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'pending', ?7, ?7, ?8, ?9)",
        params![id, u.clinic_id, u.entity, u.op.as_str(), key, row, now, u.idempotency_key, u.batch_id],
    )
    .map_err(write_err)?;
    tx.execute(
        "INSERT INTO clinics (clinic_id, acked_seq, first_seen, pending_updates) VALUES (?1, 0, ?2, 1) \
         ON CONFLICT (clinic_id) DO UPDATE SET pending_updates = pending_updates + 1",
        params![u.clinic_id, now],
    )
    .map_err(write_err)?;
    Ok(id)
}

impl SqliteStore {
    /// Events after `after` (of one clinic, or all; only flagged ones when `flagged`).
    fn page(
        &self,
        clinic: Option<&str>,
        after: u64,
        limit: usize,
        flagged: bool,
    ) -> StoreFuture<Vec<StoredEvent>> {
        let only = if flagged {
            " AND problem IS NOT NULL"
        } else {
            ""
        };
        let clinic = clinic.map(str::to_string);
        let path = self.path.clone();
        self.readers.run(
            move || open_conn(&path),
            move |c| {
                let pruned = meta(c, "pruned_through").map_err(read_err)?;
                if after < pruned {
                    let oldest: i64 = c
                        .query_row("SELECT coalesce(min(id), 0) FROM events", [], |r| r.get(0))
                        .map_err(read_err)?;
                    return Err(StoreError::Gone {
                        pruned_through: pruned,
                        oldest: (oldest as u64).max(pruned + 1),
                    });
                }
                let sql = match clinic {
                    Some(_) => format!(
                        "SELECT {EVENT_COLUMNS} FROM events WHERE clinic_id = ?2 AND id > ?1{only} ORDER BY id LIMIT ?3"
                    ),
                    None => format!(
                        "SELECT {EVENT_COLUMNS} FROM events WHERE id > ?1 AND ?2 IS NULL{only} ORDER BY id LIMIT ?3"
                    ),
                };
                let mut stmt = c.prepare_cached(&sql).map_err(read_err)?;
                let rows = stmt
                    .query_map(params![after as i64, clinic, limit as i64], event_from_row)
                    .map_err(read_err)?;
                rows.collect::<Result<_, _>>().map_err(read_err)
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Map;
    use tether_schemas::{Event, Op as EventOp};

    #[test]
    fn the_insert_ceiling_really_inserts_every_row() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("ceiling.db");
        let (rate, _) = insert_ceiling(&path, 1_003, 300).expect("ceiling");
        assert!(rate > 0.0);
        let c = Connection::open(&path).expect("open");
        let (n, clinics): (i64, i64) = c
            .query_row(
                "SELECT count(*), count(DISTINCT clinic_id) FROM events",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .expect("count");
        assert_eq!((n, clinics), (1_003, 50));
    }

    #[test]
    fn a_full_disk_fails_the_commit_and_lifting_the_limit_recovers() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SqliteStore::open(&dir.path().join("g.db")).expect("store");
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("rt");
        let big = |seq: u64| {
            IncomingEvent::from_event(
                &Event {
                    seq,
                    entity: "e".into(),
                    op: EventOp::Insert,
                    key: Map::new(),
                    row: serde_json::json!({"pad": "x".repeat(20_000)})
                        .as_object()
                        .cloned(),
                    committed_at: "t".into(),
                },
                None,
            )
        };
        rt.block_on(store.append("c", 0, 0, 0, vec![big(1)]))
            .expect("first");
        let pages = rt.block_on(store.page_count()).expect("pages");
        rt.block_on(store.set_page_limit(Some(pages)))
            .expect("limit");
        let err = rt.block_on(store.append("c", 0, 0, 1, vec![big(2), big(3)]));
        assert!(
            matches!(&err, Err(StoreError::Unavailable { message, .. }) if message.contains("full")),
            "{err:?}"
        );
        assert_eq!(
            rt.block_on(store.acked_seq("c")).expect("acked"),
            1,
            "nothing of the failed group is acknowledged"
        );
        rt.block_on(store.set_page_limit(None)).expect("lift");
        let ok = rt
            .block_on(store.append("c", 0, 0, 1, vec![big(2), big(3)]))
            .expect("after");
        assert_eq!(
            ok,
            AppendOutcome::Stored {
                acked: 3,
                inserted: 2
            }
        );
    }

    #[test]
    fn a_store_made_by_an_older_release_is_migrated_and_its_counters_filled() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("old.db");
        {
            // The first release's schema, with data, and no user_version.
            let c = Connection::open(&path).expect("open");
            c.execute_batch(MIGRATIONS[0]).expect("v1");
            c.execute_batch(
                "INSERT INTO clinics (clinic_id, acked_seq, first_seen) VALUES ('a', 2, 't');
                 INSERT INTO events (clinic_id, seq, entity, op, key_json, committed_at, received_at, problem)
                 VALUES ('a', 1, 'e', 'insert', '{}', 't', 't', NULL), ('a', 2, 'e', 'insert', '{}', 't', 't', 'row.x: missing');
                 INSERT INTO updates (update_id, clinic_id, entity, op, key_json, status, created_at, updated_at)
                 VALUES ('u1', 'a', 'e', 'upsert', '{}', 'pending', 't', 't'),
                        ('u2', 'a', 'e', 'upsert', '{}', 'failed', 't', 't');",
            )
            .expect("data");
        }
        let store = SqliteStore::open(&path).expect("migrated");
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("rt");
        let a = rt
            .block_on(store.clinic("a"))
            .expect("read")
            .expect("clinic a");
        assert_eq!((a.events, a.pending_updates, a.acked_seq), (2, 1, 2));
        assert_eq!((a.failed_updates, a.flagged_events), (1, 1));
        drop(store);
        // A newer binary's store is refused, by name.
        let c = Connection::open(&path).expect("open");
        c.execute_batch("PRAGMA user_version = 99").expect("bump");
        drop(c);
        match SqliteStore::open(&path) {
            Err(StoreError::TooNew {
                found, supported, ..
            }) => assert_eq!((found, supported), (99, SCHEMA_VERSION as i64)),
            Err(e) => panic!("wrong error: {e}"),
            Ok(_) => panic!("a newer store was opened"),
        }
    }
}

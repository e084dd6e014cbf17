//! SQLite adapter (the embedded default): capture by triggers into an outbox table, the
//! checkpoint, and the applier with its inbox and echo suppression.
//!
//! Installed objects (all prefixed `_tether_`):
//! - `_tether_outbox(seq AUTOINCREMENT, entity, op, key_json, row_json, committed_at)`
//! - `_tether_state(name, value)`: the acknowledged position (`acked_seq`)
//! - `_tether_inbox(update_id, status, reason, applied_at)`: every cloud update applied
//! - `_tether_apply_guard(active)`: 1 only inside the applier's own transaction; the capture
//!   triggers skip rows while it is 1, so applied updates are not echoed back up. SQLite has a
//!   single writer, so no other connection's writes can happen while it is 1.
//! - per synced table, `AFTER INSERT/UPDATE/DELETE` triggers `_tether_<table>_{ins,upd,del}`.
//!
//! SQLite commits one writer at a time and `AUTOINCREMENT` never reuses a value, so outbox
//! order is commit order and a reader never sees a later `seq` before an earlier one.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::types::Value as SqlValue;
use rusqlite::{params, Connection, OpenFlags, OptionalExtension, TransactionBehavior};
use serde_json::{Map, Value};
use tether_actors::ports::{ApplyOutcome, ChangeSink, ChangeSource, Checkpoint, PortError};
use tether_schemas::{Event, Op, Update, UpdateOp, UpdateStatus};

use super::values::{self, BinaryForm, ColumnTypes, EntityTypes, ValueType};
use super::{quote_ident as qi, quote_literal as ql};
use crate::config::TableConfig;

#[derive(Debug, thiserror::Error)]
pub enum SqliteError {
    #[error("opening {path}: {source}")]
    Open {
        path: String,
        source: rusqlite::Error,
    },
    #[error("table `{table}` (agent.tables) does not exist in {path}")]
    NoTable { table: String, path: String },
    #[error("table `{table}`: key column `{column}` does not exist")]
    NoColumn { table: String, column: String },
    #[error("table `{table}`: key [{key}] is not the primary key or a unique index; updates need it to be unique")]
    KeyNotUnique { table: String, key: String },
    #[error("{context}: {source}")]
    Sql {
        context: String,
        source: rusqlite::Error,
    },
    #[error("agent.rpc.queries.{query}: not a read-only query ({why}); only one SELECT (or WITH … SELECT, VALUES) is allowed")]
    NotReadOnly { query: String, why: String },
}

fn sql(context: &str) -> impl FnOnce(rusqlite::Error) -> SqliteError + '_ {
    move |source| SqliteError::Sql {
        context: context.to_string(),
        source,
    }
}

fn port(context: &str) -> impl FnOnce(rusqlite::Error) -> PortError + '_ {
    move |e| PortError::new(format!("{context}: {e}"))
}

/// Opens a connection with the settings every Tether connection uses.
pub fn open(path: &Path) -> Result<Connection, SqliteError> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|source| SqliteError::Open {
        path: path.display().to_string(),
        source,
    })?;
    conn.busy_timeout(Duration::from_secs(10))
        .map_err(sql("busy_timeout"))?;
    // The agent reads a few recent pages at a time: a small page cache per connection keeps
    // its footprint low on clinic PCs (SQLite's default is 2 MB per connection).
    conn.execute_batch("PRAGMA cache_size = -256")
        .map_err(sql("cache_size"))?;
    Ok(conn)
}

const BASE_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS _tether_outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    entity TEXT NOT NULL,
    op TEXT NOT NULL,
    key_json TEXT NOT NULL,
    row_json TEXT,
    committed_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
CREATE TABLE IF NOT EXISTS _tether_state (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS _tether_inbox (
    update_id TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    reason TEXT,
    applied_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
CREATE TABLE IF NOT EXISTS _tether_apply_guard (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    active INTEGER NOT NULL DEFAULT 0
);
INSERT OR IGNORE INTO _tether_apply_guard (id, active) VALUES (1, 0);
INSERT OR IGNORE INTO _tether_state (name, value) VALUES ('source_id', abs(random() % 9007199254740991) + 1);
CREATE TABLE IF NOT EXISTS _tether_conflicts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    update_id TEXT NOT NULL,
    entity TEXT NOT NULL,
    key_json TEXT NOT NULL,
    policy TEXT NOT NULL,
    reason TEXT NOT NULL,
    cloud_row TEXT,
    at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
CREATE TABLE IF NOT EXISTS _tether_snapshot (
    table_name TEXT PRIMARY KEY,
    last_key TEXT,
    rows INTEGER NOT NULL DEFAULT 0,
    done INTEGER NOT NULL DEFAULT 0
);
";

/// Columns of a table, in order, with their declared types.
pub fn columns(conn: &Connection, table: &str) -> Result<Vec<(String, String)>, rusqlite::Error> {
    let mut stmt = conn.prepare(&format!("PRAGMA table_info({})", qi(table)))?;
    let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(1)?, r.get::<_, String>(2)?)))?;
    rows.collect()
}

/// True if `key` is the primary key or matches a unique index.
fn key_is_unique(conn: &Connection, table: &str, key: &[String]) -> Result<bool, rusqlite::Error> {
    let mut want: Vec<&str> = key.iter().map(|s| s.as_str()).collect();
    want.sort();
    let mut pk: Vec<(i64, String)> = Vec::new();
    let mut stmt = conn.prepare(&format!("PRAGMA table_info({})", qi(table)))?;
    for r in stmt.query_map([], |r| Ok((r.get::<_, i64>(5)?, r.get::<_, String>(1)?)))? {
        let (n, name) = r?;
        if n > 0 {
            pk.push((n, name));
        }
    }
    let mut pk_names: Vec<&str> = pk.iter().map(|(_, n)| n.as_str()).collect();
    pk_names.sort();
    if pk_names == want {
        return Ok(true);
    }
    let mut idx = conn.prepare(&format!("PRAGMA index_list({})", qi(table)))?;
    let indexes: Vec<(String, bool)> = idx
        .query_map([], |r| Ok((r.get::<_, String>(1)?, r.get::<_, bool>(2)?)))?
        .collect::<Result<_, _>>()?;
    for (name, unique) in indexes {
        if !unique {
            continue;
        }
        let mut info = conn.prepare(&format!("PRAGMA index_info({})", qi(&name)))?;
        let mut cols: Vec<String> = info
            .query_map([], |r| r.get::<_, String>(2))?
            .collect::<Result<_, _>>()?;
        cols.sort();
        if cols.iter().map(|s| s.as_str()).collect::<Vec<_>>() == want {
            return Ok(true);
        }
    }
    Ok(false)
}

fn json_object_expr(prefix: &str, cols: &[(String, String)]) -> String {
    let parts: Vec<String> = cols
        .iter()
        .map(|(name, ty)| {
            let col = format!("{prefix}.{}", qi(name));
            // JSON cannot hold BLOBs: the trigger writes hex (NULL kept NULL: `hex(NULL)` is
            // ''), the reader turns it into base64 (`values`).
            let expr = if ValueType::of_sqlite(ty) == ValueType::Binary {
                format!("CASE WHEN {col} IS NULL THEN NULL ELSE hex({col}) END")
            } else {
                col
            };
            format!("{}, {expr}", ql(name))
        })
        .collect();
    format!("json_object({})", parts.join(", "))
}

/// The trigger DDL for one table (exposed for tests and `--dry-run`).
pub fn trigger_sql(t: &TableConfig, cols: &[(String, String)]) -> Vec<String> {
    let key_cols: Vec<(String, String)> = t
        .key
        .iter()
        .map(|k| {
            let ty = cols
                .iter()
                .find(|(n, _)| n == k)
                .map(|(_, ty)| ty.clone())
                .unwrap_or_default();
            (k.clone(), ty)
        })
        .collect();
    let guard = "(SELECT active FROM _tether_apply_guard WHERE id = 1) = 0";
    let insert = |op: &str, prefix: &str| {
        format!(
            "INSERT INTO _tether_outbox (entity, op, key_json, row_json) VALUES ({}, {}, {}, {});",
            ql(&t.entity),
            ql(op),
            json_object_expr(prefix, &key_cols),
            json_object_expr(prefix, cols)
        )
    };
    let name = |suffix: &str| qi(&format!("_tether_{}_{suffix}", t.table));
    let key_changed = t
        .key
        .iter()
        .map(|k| format!("OLD.{c} IS NOT NEW.{c}", c = qi(k)))
        .collect::<Vec<_>>()
        .join(" OR ");
    vec![
        format!(
            "CREATE TRIGGER {} AFTER INSERT ON {} WHEN {guard} BEGIN {} END",
            name("ins"),
            qi(&t.table),
            insert("insert", "NEW")
        ),
        // A key change is a delete of the old key followed by the new row.
        format!(
            "CREATE TRIGGER {} AFTER UPDATE ON {} WHEN {guard} BEGIN \
             INSERT INTO _tether_outbox (entity, op, key_json, row_json) SELECT {}, 'delete', {}, {} WHERE {key_changed}; \
             {} END",
            name("upd"),
            qi(&t.table),
            ql(&t.entity),
            json_object_expr("OLD", &key_cols),
            json_object_expr("OLD", cols),
            insert("update", "NEW")
        ),
        format!(
            "CREATE TRIGGER {} AFTER DELETE ON {} WHEN {guard} BEGIN {} END",
            name("del"),
            qi(&t.table),
            insert("delete", "OLD")
        ),
    ]
}

/// What `install` did, for the CLI to print.
#[derive(Debug, Default)]
pub struct InstallReport {
    pub tables: Vec<String>,
    pub triggers: usize,
}

/// Creates (idempotently) the Tether tables and the capture triggers of every `up` table.
pub fn install(path: &Path, tables: &[TableConfig]) -> Result<InstallReport, SqliteError> {
    let mut conn = open(path)?;
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(sql("begin"))?;
    tx.execute_batch(BASE_SCHEMA)
        .map_err(sql("creating _tether tables"))?;
    let mut report = InstallReport::default();
    for t in tables {
        let cols = checked_columns(&tx, path, t)?;
        drop_triggers(&tx, &t.table)?;
        if t.direction.up() {
            for ddl in trigger_sql(t, &cols) {
                tx.execute_batch(&ddl).map_err(sql("creating trigger"))?;
                report.triggers += 1;
            }
        }
        report.tables.push(t.table.clone());
    }
    tx.commit().map_err(sql("commit"))?;
    Ok(report)
}

/// A mapped table's columns, once it passes what `install` requires: it exists, has the key
/// columns, and — when cloud updates are applied to it — the key is its primary key or a
/// unique index.
fn checked_columns(
    conn: &Connection,
    path: &Path,
    t: &TableConfig,
) -> Result<Vec<(String, String)>, SqliteError> {
    let cols = columns(conn, &t.table).map_err(sql("reading table columns"))?;
    if cols.is_empty() {
        return Err(SqliteError::NoTable {
            table: t.table.clone(),
            path: path.display().to_string(),
        });
    }
    if let Some(k) = t.key.iter().find(|k| !cols.iter().any(|(c, _)| c == *k)) {
        return Err(SqliteError::NoColumn {
            table: t.table.clone(),
            column: k.clone(),
        });
    }
    if t.direction.down()
        && !key_is_unique(conn, &t.table, &t.key).map_err(sql("reading indexes"))?
    {
        return Err(SqliteError::KeyNotUnique {
            table: t.table.clone(),
            key: t.key.join(", "),
        });
    }
    Ok(cols)
}

/// Tables whose capture triggers no longer match their columns: a column added after
/// `install` is not captured (SQLite triggers name their columns), a renamed one still travels
/// under its old name. One line per table, saying what to do; empty when nothing is installed
/// yet (`check` says that) or everything matches.
pub fn capture_drift(conn: &Connection, path: &Path, tables: &[TableConfig]) -> Vec<String> {
    let installed = conn
        .query_row(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = '_tether_outbox'",
            [],
            |r| r.get::<_, i64>(0),
        )
        .unwrap_or(0)
        > 0;
    if !installed {
        return Vec::new();
    }
    let rerun = "re-run `tether agent install` (it keeps the outbox and the acknowledged position)";
    let mut drift = Vec::new();
    for t in tables.iter().filter(|t| t.direction.up()) {
        // A table `install` would refuse is reported by `check` and by the start itself.
        let Ok(cols) = checked_columns(conn, path, t) else {
            continue;
        };
        let have: Option<String> = conn
            .query_row(
                "SELECT sql FROM sqlite_master WHERE type = 'trigger' AND name = ?1",
                params![format!("_tether_{}_ins", t.table)],
                |r| r.get(0),
            )
            .optional()
            .ok()
            .flatten();
        let want = trigger_sql(t, &cols);
        match have {
            None => drift.push(format!(
                "table {}: no capture trigger: its changes are not sent; {rerun}",
                t.table
            )),
            Some(sql) if want.first() != Some(&sql) => {
                let added: Vec<&str> = cols
                    .iter()
                    .filter(|(n, _)| !sql.contains(&format!("{}, ", ql(n))))
                    .map(|(n, _)| n.as_str())
                    .collect();
                drift.push(if added.is_empty() {
                    format!(
                        "table {}: its capture triggers do not match its columns (a column renamed or retyped since install, or triggers made by an older Tether); {rerun}",
                        t.table
                    )
                } else {
                    format!(
                        "table {}: column(s) {} added or renamed since install are not captured under their names; {rerun}",
                        t.table,
                        added.join(", ")
                    )
                });
            }
            Some(_) => {}
        }
    }
    drift
}

/// `tether check-config --connect`: the database opened read-only (never created), every
/// mapped table checked as `install` would, each problem on its own; and whether the capture
/// objects are installed.
pub fn check(path: &Path, tables: &[TableConfig]) -> Result<(Vec<String>, bool), SqliteError> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|source| SqliteError::Open {
        path: path.display().to_string(),
        source,
    })?;
    let mut problems = Vec::new();
    for t in tables {
        match checked_columns(&conn, path, t) {
            Err(e) => problems.push(e.to_string()),
            Ok(cols) => problems.extend(values::unknown_typed_columns(
                t,
                cols.iter().map(|(n, _)| n),
            )),
        }
    }
    let installed = conn
        .query_row(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = '_tether_outbox'",
            [],
            |r| r.get::<_, i64>(0),
        )
        .map_err(sql("reading the schema"))?
        > 0;
    problems.extend(capture_drift(&conn, path, tables));
    Ok((problems, installed))
}

fn drop_triggers(conn: &Connection, table: &str) -> Result<(), SqliteError> {
    for suffix in ["ins", "upd", "del"] {
        conn.execute_batch(&format!(
            "DROP TRIGGER IF EXISTS {}",
            qi(&format!("_tether_{table}_{suffix}"))
        ))
        .map_err(sql("dropping trigger"))?;
    }
    Ok(())
}

/// Removes every trigger and table `install` created. The clinic's own tables are untouched.
pub fn uninstall(path: &Path) -> Result<usize, SqliteError> {
    let mut conn = open(path)?;
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(sql("begin"))?;
    let objects: Vec<(String, String)> = {
        let mut stmt = tx
            .prepare("SELECT type, name FROM sqlite_master WHERE name LIKE '\\_tether\\_%' ESCAPE '\\' AND type IN ('trigger', 'table')")
            .map_err(sql("listing objects"))?;
        let rows = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(sql("listing objects"))?;
        rows.collect::<Result<_, _>>()
            .map_err(sql("listing objects"))?
    };
    for (kind, name) in objects.iter().filter(|(k, _)| k == "trigger") {
        tx.execute_batch(&format!(
            "DROP {} IF EXISTS {}",
            kind.to_uppercase(),
            qi(name)
        ))
        .map_err(sql("dropping"))?;
    }
    for (kind, name) in objects.iter().filter(|(k, _)| k == "table") {
        tx.execute_batch(&format!(
            "DROP {} IF EXISTS {}",
            kind.to_uppercase(),
            qi(name)
        ))
        .map_err(sql("dropping"))?;
    }
    tx.commit().map_err(sql("commit"))?;
    Ok(objects.len())
}

fn parse_obj(text: &str, what: &str, seq: u64) -> Result<Map<String, Value>, PortError> {
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(m)) => Ok(m),
        _ => Err(PortError::new(format!(
            "outbox row seq={seq}: {what} is not a JSON object"
        ))),
    }
}

/// Reads the outbox ([`ChangeSource`]) on a dedicated connection, so `PRAGMA data_version`
/// sees every other connection's commits.
pub struct SqliteSource {
    conn: Mutex<Connection>,
    types: EntityTypes,
}

impl SqliteSource {
    pub fn open(path: &Path, tables: &[TableConfig]) -> Result<Self, SqliteError> {
        Ok(SqliteSource {
            conn: Mutex::new(open(path)?),
            types: EntityTypes::new(tables),
        })
    }
}

/// A mapped table's wire types: its declared column types, then `types:` from its config.
fn wire_types(cfg: &TableConfig, cols: &[(String, String)]) -> ColumnTypes {
    ColumnTypes::new(
        cols.iter()
            .map(|(n, ty)| (n.clone(), ValueType::of_sqlite(ty))),
        &cfg.types,
    )
}

impl ChangeSource for SqliteSource {
    fn backlog(&self, after: u64) -> Result<tether_actors::ports::Backlog, PortError> {
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let (events, oldest) = conn
            .query_row(
                "SELECT count(*), min(committed_at) FROM _tether_outbox WHERE seq > ?1",
                params![after as i64],
                |r| Ok((r.get::<_, i64>(0)?, r.get::<_, Option<String>>(1)?)),
            )
            .map_err(port("counting the outbox"))?;
        Ok(tether_actors::ports::Backlog {
            events: events.max(0) as u64,
            at_least: false,
            oldest_committed_at: oldest,
            capture_retained_bytes: None,
        })
    }

    fn change_token(&self) -> Result<u64, PortError> {
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        conn.query_row("PRAGMA data_version", [], |r| r.get::<_, i64>(0))
            .map(|v| v as u64)
            .map_err(port("PRAGMA data_version"))
    }

    fn read_after(&self, after: u64, limit: usize) -> Result<Vec<Event>, PortError> {
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let mut stmt = conn
            .prepare_cached(
                "SELECT seq, entity, op, key_json, row_json, committed_at FROM _tether_outbox \
                 WHERE seq > ?1 ORDER BY seq LIMIT ?2",
            )
            .map_err(port("reading outbox"))?;
        let rows = stmt
            .query_map(params![after as i64, limit as i64], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, Option<String>>(4)?,
                    r.get::<_, String>(5)?,
                ))
            })
            .map_err(port("reading outbox"))?;
        let mut out = Vec::new();
        for row in rows {
            let (seq, entity, op, key, row, committed_at) = row.map_err(port("reading outbox"))?;
            let seq = seq as u64;
            let op = Op::parse(&op).ok_or_else(|| {
                PortError::new(format!("outbox row seq={seq}: unknown op `{op}`"))
            })?;
            let types = self.types.of(&entity, |cfg| {
                columns(&conn, &cfg.table)
                    .map(|cols| wire_types(cfg, &cols))
                    .map_err(port("reading table columns"))
            })?;
            let mut key = parse_obj(&key, "key_json", seq)?;
            let mut row = row.map(|r| parse_obj(&r, "row_json", seq)).transpose()?;
            types.to_wire(&mut key, BinaryForm::Hex);
            if let Some(row) = row.as_mut() {
                types.to_wire(row, BinaryForm::Hex);
            }
            out.push(Event {
                seq,
                entity,
                op,
                key,
                row,
                committed_at,
            });
        }
        Ok(out)
    }
}

/// The acknowledged position and the outbox purge ([`Checkpoint`]).
pub struct SqliteCheckpoint {
    conn: Mutex<Connection>,
}

impl SqliteCheckpoint {
    pub fn open(path: &Path) -> Result<Self, SqliteError> {
        Ok(SqliteCheckpoint {
            conn: Mutex::new(open(path)?),
        })
    }
}

impl Checkpoint for SqliteCheckpoint {
    fn load(&self) -> Result<u64, PortError> {
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        conn.query_row(
            "SELECT value FROM _tether_state WHERE name = 'acked_seq'",
            [],
            |r| r.get::<_, i64>(0),
        )
        .optional()
        .map(|v| v.unwrap_or(0) as u64)
        .map_err(port("loading checkpoint (is `tether agent install` done?)"))
    }

    fn save(&self, acked: u64) -> Result<(), PortError> {
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        conn.execute(
            "INSERT INTO _tether_state (name, value) VALUES ('acked_seq', ?1) \
             ON CONFLICT (name) DO UPDATE SET value = max(value, excluded.value)",
            params![acked as i64],
        )
        .map(|_| ())
        .map_err(port("saving checkpoint"))
    }

    fn source_id(&self) -> Result<u64, PortError> {
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        conn.query_row(
            "SELECT value FROM _tether_state WHERE name = 'source_id'",
            [],
            |r| r.get::<_, i64>(0),
        )
        .optional()
        .map(|v| v.unwrap_or(0) as u64)
        .map_err(port("reading source id"))
    }

    fn purge(&self, acked: u64, retention: Duration) -> Result<usize, PortError> {
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        conn.execute(
            "DELETE FROM _tether_outbox WHERE seq <= ?1 \
             AND committed_at < strftime('%Y-%m-%dT%H:%M:%fZ', 'now', ?2)",
            params![acked as i64, format!("-{} seconds", retention.as_secs())],
        )
        .map_err(port("purging outbox"))
    }
}

struct DownTable {
    table: String,
    key: Vec<String>,
    columns: Vec<String>,
    types: ColumnTypes,
    policy: crate::config::ConflictPolicy,
    version_column: Option<String>,
}

/// Applies cloud updates ([`ChangeSink`]).
pub struct SqliteSink {
    conn: Mutex<Connection>,
    path: PathBuf,
    tables: Vec<TableConfig>,
    cache: Mutex<HashMap<String, Arc<DownTable>>>,
}

impl SqliteSink {
    pub fn open(path: &Path, tables: &[TableConfig]) -> Result<Self, SqliteError> {
        Ok(SqliteSink {
            conn: Mutex::new(open(path)?),
            path: path.to_path_buf(),
            tables: tables.to_vec(),
            cache: Mutex::new(HashMap::new()),
        })
    }

    fn table_for(&self, conn: &Connection, entity: &str) -> Result<Arc<DownTable>, String> {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = cache.get(entity) {
            return Ok(t.clone());
        }
        let cfg = self
            .tables
            .iter()
            .find(|t| t.entity == entity)
            .ok_or_else(|| format!("entity `{entity}` is not mapped in agent.tables"))?;
        if !cfg.direction.down() {
            return Err(format!(
                "entity `{entity}` is mapped with direction up; cloud updates are not accepted"
            ));
        }
        let cols = columns(conn, &cfg.table).map_err(|e| e.to_string())?;
        if cols.is_empty() {
            return Err(format!(
                "table `{}` does not exist in {}",
                cfg.table,
                self.path.display()
            ));
        }
        let types = wire_types(cfg, &cols);
        let t = Arc::new(DownTable {
            table: cfg.table.clone(),
            key: cfg.key.clone(),
            columns: cols.into_iter().map(|(n, _)| n).collect(),
            types,
            policy: cfg.conflict,
            version_column: cfg.version_column.clone(),
        });
        cache.insert(entity.to_string(), t.clone());
        Ok(t)
    }
}

/// A wire-form value as what SQLite stores in a column of that type: base64 binary as a
/// BLOB, a timestamp in SQLite's own text form, a boolean as 0/1 (errors name the column).
fn to_sql_typed(t: &DownTable, col: &str, v: &Value) -> Result<SqlValue, String> {
    Ok(match (t.types.get(col), v) {
        (Some(ValueType::Binary), Value::String(s)) => {
            SqlValue::Blob(values::binary_from_wire(col, s)?)
        }
        (Some(ValueType::Timestamp), Value::String(s)) => match values::sqlite_timestamp(s) {
            Some(local) => SqlValue::Text(local),
            None => SqlValue::Text(s.clone()),
        },
        _ => to_sql(v),
    })
}

fn to_sql(v: &Value) -> SqlValue {
    match v {
        Value::Null => SqlValue::Null,
        Value::Bool(b) => SqlValue::Integer(*b as i64),
        Value::Number(n) => match n.as_i64() {
            Some(i) => SqlValue::Integer(i),
            None => SqlValue::Real(n.as_f64().unwrap_or(0.0)),
        },
        Value::String(s) => SqlValue::Text(s.clone()),
        other => SqlValue::Text(other.to_string()),
    }
}

fn from_sql(v: SqlValue) -> Value {
    match v {
        SqlValue::Null => Value::Null,
        SqlValue::Integer(i) => Value::from(i),
        SqlValue::Real(f) => serde_json::Number::from_f64(f)
            .map(Value::Number)
            .unwrap_or(Value::Null),
        SqlValue::Text(t) => Value::String(t),
        SqlValue::Blob(_) => Value::Null,
    }
}

/// Whether the table's conflict policy lets the update through.
fn conflict_check(
    conn: &Connection,
    t: &DownTable,
    u: &Update,
) -> Result<Option<&'static str>, String> {
    use crate::config::ConflictPolicy;
    let key_where = t
        .key
        .iter()
        .enumerate()
        .map(|(i, k)| format!("{} = ?{}", qi(k), i + 1))
        .collect::<Vec<_>>()
        .join(" AND ");
    let key_vals: Vec<SqlValue> = t
        .key
        .iter()
        .map(|k| to_sql_typed(t, k, &u.key[k]))
        .collect::<Result<_, _>>()?;
    match t.policy {
        ConflictPolicy::CloudWins => Ok(None),
        ConflictPolicy::ClinicWins => {
            // An outbox row for this key that the gateway has not acknowledged yet.
            let mut cond = t
                .key
                .iter()
                .enumerate()
                .map(|(i, k)| {
                    format!(
                        "json_extract(key_json, {}) = ?{}",
                        ql(&format!("$.\"{}\"", k.replace('"', "\\\""))),
                        i + 2
                    )
                })
                .collect::<Vec<_>>();
            cond.insert(0, "entity = ?1".into());
            let sql = format!(
                "SELECT EXISTS (SELECT 1 FROM _tether_outbox WHERE {} AND seq > coalesce((SELECT value FROM _tether_state WHERE name = 'acked_seq'), 0))",
                cond.join(" AND ")
            );
            let mut params: Vec<SqlValue> = vec![SqlValue::Text(u.entity.clone())];
            params.extend(key_vals);
            let pending: bool = conn
                .query_row(&sql, rusqlite::params_from_iter(params.iter()), |r| {
                    r.get(0)
                })
                .map_err(|e| e.to_string())?;
            Ok(pending.then_some(super::CLINIC_CHANGE_PENDING))
        }
        ConflictPolicy::NewestWins => {
            let (UpdateOp::Upsert, Some(vc)) = (u.op, t.version_column.as_deref()) else {
                return Ok(None);
            };
            let cloud = u
                .row
                .as_ref()
                .and_then(|r| r.get(vc))
                .ok_or_else(|| format!("newest_wins needs `{vc}` in the update's row"))?;
            let local: Option<SqlValue> = conn
                .query_row(
                    &format!("SELECT {} FROM {} WHERE {key_where}", qi(vc), qi(&t.table)),
                    rusqlite::params_from_iter(key_vals.iter()),
                    |r| r.get(0),
                )
                .optional()
                .map_err(|e| e.to_string())?;
            Ok(local.and_then(|l| {
                (super::compare_versions(&from_sql(l), cloud) == Some(std::cmp::Ordering::Greater))
                    .then_some(super::LOCAL_NEWER)
            }))
        }
    }
}

enum Applied {
    Done,
    Conflict(&'static str),
}

/// Applies one update inside the caller's transaction. `Err` is the reason it failed.
fn apply_one(conn: &Connection, t: &DownTable, u: &Update) -> Result<Applied, String> {
    for k in &t.key {
        if !u.key.contains_key(k) {
            return Err(format!("key column `{k}` is missing from the update's key"));
        }
    }
    if let Some(extra) = u.key.keys().find(|k| !t.key.contains(k)) {
        return Err(format!("`{extra}` is not a key column of `{}`", t.table));
    }
    let where_clause = t
        .key
        .iter()
        .enumerate()
        .map(|(i, k)| format!("{} = ?{}", qi(k), i + 1))
        .collect::<Vec<_>>()
        .join(" AND ");
    if let Some(why) = conflict_check(conn, t, u)? {
        return Ok(Applied::Conflict(why));
    }
    let key_vals: Vec<SqlValue> = t
        .key
        .iter()
        .map(|k| to_sql_typed(t, k, &u.key[k]))
        .collect::<Result<_, _>>()?;
    match u.op {
        UpdateOp::Delete => {
            conn.execute(
                &format!("DELETE FROM {} WHERE {where_clause}", qi(&t.table)),
                rusqlite::params_from_iter(key_vals.iter()),
            )
            .map_err(|e| e.to_string())?;
        }
        UpdateOp::Upsert => {
            let row = u
                .row
                .as_ref()
                .ok_or_else(|| "upsert without a `row`".to_string())?;
            let mut cols: Vec<&str> = Vec::new();
            let mut vals: Vec<SqlValue> = Vec::new();
            for (k, v) in &u.key {
                if let Some(rv) = row.get(k) {
                    if rv != v {
                        return Err(format!("`row.{k}` differs from `key.{k}`"));
                    }
                }
                cols.push(k);
                vals.push(to_sql_typed(t, k, v)?);
            }
            for (c, v) in row {
                if u.key.contains_key(c) {
                    continue;
                }
                if !t.columns.iter().any(|x| x == c) {
                    return Err(format!("`{c}` is not a column of `{}`", t.table));
                }
                cols.push(c);
                vals.push(to_sql_typed(t, c, v)?);
            }
            let placeholders = (1..=cols.len())
                .map(|i| format!("?{i}"))
                .collect::<Vec<_>>();
            let non_key: Vec<String> = cols
                .iter()
                .filter(|c| !t.key.iter().any(|k| k == *c))
                .map(|c| format!("{q} = excluded.{q}", q = qi(c)))
                .collect();
            let conflict = if non_key.is_empty() {
                "DO NOTHING".to_string()
            } else {
                format!("DO UPDATE SET {}", non_key.join(", "))
            };
            let stmt = format!(
                "INSERT INTO {} ({}) VALUES ({}) ON CONFLICT ({}) {conflict}",
                qi(&t.table),
                cols.iter().map(|c| qi(c)).collect::<Vec<_>>().join(", "),
                placeholders.join(", "),
                t.key.iter().map(|k| qi(k)).collect::<Vec<_>>().join(", "),
            );
            conn.execute(&stmt, rusqlite::params_from_iter(vals.iter()))
                .map_err(|e| e.to_string())?;
        }
    }
    Ok(Applied::Done)
}

impl ChangeSink for SqliteSink {
    fn apply(&self, u: &Update) -> Result<ApplyOutcome, PortError> {
        let mut conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(port("begin"))?;
        let seen: Option<(String, Option<String>)> = tx
            .query_row(
                "SELECT status, reason FROM _tether_inbox WHERE update_id = ?1",
                params![u.update_id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(port("reading inbox"))?;
        if let Some((status, reason)) = seen {
            let status = match status.as_str() {
                "applied" => UpdateStatus::Applied,
                "conflict" => UpdateStatus::Conflict,
                _ => UpdateStatus::Failed,
            };
            return Ok(ApplyOutcome {
                status,
                reason,
                duplicate: true,
            });
        }
        tx.execute("UPDATE _tether_apply_guard SET active = 1 WHERE id = 1", [])
            .map_err(port("setting apply guard"))?;
        tx.execute_batch("SAVEPOINT tether_apply")
            .map_err(port("savepoint"))?;
        let result = self
            .table_for(&tx, &u.entity)
            .and_then(|t| apply_one(&tx, &t, u).map(|a| (a, t.policy)));
        let (status, reason) = match result {
            Ok((Applied::Done, _)) => {
                tx.execute_batch("RELEASE tether_apply")
                    .map_err(port("release"))?;
                (UpdateStatus::Applied, None)
            }
            Ok((Applied::Conflict(why), policy)) => {
                tx.execute_batch("ROLLBACK TO tether_apply; RELEASE tether_apply")
                    .map_err(port("rollback to savepoint"))?;
                tx.execute(
                    "INSERT INTO _tether_conflicts (update_id, entity, key_json, policy, reason, cloud_row) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                    params![
                        u.update_id,
                        u.entity,
                        serde_json::to_string(&u.key).unwrap_or_default(),
                        policy.as_str(),
                        why,
                        u.row.as_ref().map(|r| serde_json::to_string(r).unwrap_or_default())
                    ],
                )
                .map_err(port("recording conflict"))?;
                (UpdateStatus::Conflict, Some(why.to_string()))
            }
            Err(reason) => {
                tx.execute_batch("ROLLBACK TO tether_apply; RELEASE tether_apply")
                    .map_err(port("rollback to savepoint"))?;
                (UpdateStatus::Failed, Some(reason))
            }
        };
        tx.execute("UPDATE _tether_apply_guard SET active = 0 WHERE id = 1", [])
            .map_err(port("clearing apply guard"))?;
        tx.execute(
            "INSERT INTO _tether_inbox (update_id, status, reason) VALUES (?1, ?2, ?3)",
            params![u.update_id, status.as_str(), reason],
        )
        .map_err(port("writing inbox"))?;
        tx.commit().map_err(port("commit"))?;
        Ok(ApplyOutcome {
            status,
            reason,
            duplicate: false,
        })
    }
}

/// Progress of a snapshot.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SnapshotProgress {
    pub done: u64,
    pub total: u64,
}

/// Sends every current row of `t` as an `update` event, in key order, `chunk` rows per
/// transaction; the position is saved with each chunk, so a crash resumes where it stopped.
/// Live changes made meanwhile are appended after the snapshot row of their key.
pub fn snapshot(
    path: &Path,
    t: &TableConfig,
    chunk: usize,
    progress: &mut dyn FnMut(SnapshotProgress),
) -> Result<SnapshotProgress, SqliteError> {
    let mut conn = open(path)?;
    let cols = columns(&conn, &t.table).map_err(sql("reading table columns"))?;
    if cols.is_empty() {
        return Err(SqliteError::NoTable {
            table: t.table.clone(),
            path: path.display().to_string(),
        });
    }
    let key_cols: Vec<(String, String)> =
        t.key.iter().map(|k| (k.clone(), String::new())).collect();
    let key_list = t.key.iter().map(|k| qi(k)).collect::<Vec<_>>().join(", ");
    let total: i64 = conn
        .query_row(&format!("SELECT count(*) FROM {}", qi(&t.table)), [], |r| {
            r.get(0)
        })
        .map_err(sql("counting rows"))?;
    let mut p = SnapshotProgress {
        done: 0,
        total: total as u64,
    };
    loop {
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql("begin"))?;
        let (last, rows, done): (Option<String>, i64, bool) = tx
            .query_row(
                "SELECT last_key, rows, done FROM _tether_snapshot WHERE table_name = ?1",
                params![t.table],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()
            .map_err(sql("reading snapshot position"))?
            .unwrap_or((None, 0, false));
        if done {
            p.done = rows as u64;
            return Ok(p);
        }
        // Rows after the last key sent, in key order.
        let (filter, args): (String, Vec<SqlValue>) = match &last {
            None => (String::new(), Vec::new()),
            Some(k) => {
                let key: Map<String, Value> = serde_json::from_str(k).unwrap_or_default();
                let marks = (1..=t.key.len())
                    .map(|i| format!("?{i}"))
                    .collect::<Vec<_>>()
                    .join(", ");
                (
                    format!("WHERE ({key_list}) > ({marks})"),
                    t.key
                        .iter()
                        .map(|c| to_sql(key.get(c).unwrap_or(&Value::Null)))
                        .collect(),
                )
            }
        };
        let select = format!(
            "SELECT {}, {} FROM {} AS NEW {filter} ORDER BY {key_list} LIMIT {chunk}",
            json_object_expr("NEW", &key_cols),
            json_object_expr("NEW", &cols),
            qi(&t.table)
        );
        let batch: Vec<(String, String)> = {
            let mut stmt = tx.prepare(&select).map_err(sql("snapshot read"))?;
            let rows = stmt
                .query_map(rusqlite::params_from_iter(args.iter()), |r| {
                    Ok((r.get(0)?, r.get(1)?))
                })
                .map_err(sql("snapshot read"))?;
            rows.collect::<Result<_, _>>()
                .map_err(sql("snapshot read"))?
        };
        for (key, row) in &batch {
            tx.execute(
                "INSERT INTO _tether_outbox (entity, op, key_json, row_json) VALUES (?1, 'update', ?2, ?3)",
                params![t.entity, key, row],
            )
            .map_err(sql("snapshot write"))?;
        }
        let n = batch.len();
        let finished = n < chunk;
        tx.execute(
            "INSERT INTO _tether_snapshot (table_name, last_key, rows, done) VALUES (?1, ?2, ?3, ?4) \
             ON CONFLICT (table_name) DO UPDATE SET last_key = excluded.last_key, rows = excluded.rows, done = excluded.done",
            params![t.table, batch.last().map(|b| b.0.clone()).or(last), rows + n as i64, finished],
        )
        .map_err(sql("saving snapshot position"))?;
        tx.commit().map_err(sql("commit"))?;
        p.done = (rows + n as i64) as u64;
        progress(p);
        if finished {
            return Ok(p);
        }
    }
}

/// Forgets a finished snapshot so that `snapshot` runs again.
pub fn reset_snapshot(path: &Path, table: &str) -> Result<(), SqliteError> {
    let conn = open(path)?;
    conn.execute(
        "DELETE FROM _tether_snapshot WHERE table_name = ?1",
        params![table],
    )
    .map(|_| ())
    .map_err(sql("resetting snapshot"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Direction;
    use serde_json::json;

    fn setup(ddl: &str, tables: &[TableConfig]) -> (tempfile::TempDir, PathBuf, Connection) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("c.db");
        let conn = open(&path).expect("open");
        conn.execute_batch(ddl).expect("ddl");
        install(&path, tables).expect("install");
        (dir, path, conn)
    }

    fn obj(v: serde_json::Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap_or_default()
    }

    fn outbox(path: &Path) -> Vec<Event> {
        SqliteSource::open(path, &[])
            .expect("source")
            .read_after(0, 10_000)
            .expect("read")
    }

    #[test]
    fn a_column_added_after_install_is_reported_until_install_is_run_again() {
        let t = TableConfig::new("p", "patient", &["id"], Direction::Both);
        let (_d, path, conn) = setup(
            "CREATE TABLE p (id INTEGER PRIMARY KEY, name TEXT)",
            std::slice::from_ref(&t),
        );
        let tables = std::slice::from_ref(&t);
        assert!(capture_drift(&conn, &path, tables).is_empty());
        conn.execute_batch(
            "INSERT INTO p (id, name) VALUES (1, 'a');
             ALTER TABLE p ADD COLUMN colour TEXT;
             INSERT INTO p (id, name, colour) VALUES (2, 'b', 'red');",
        )
        .expect("writes");
        // The triggers name their columns: the new one is not captured, and said so (also by
        // check-config --connect).
        let drift = capture_drift(&conn, &path, tables);
        assert_eq!(drift.len(), 1, "{drift:?}");
        assert!(
            drift[0].contains(
                "table p: column(s) colour added or renamed since install are not captured"
            ) && drift[0].contains("tether agent install"),
            "{drift:?}"
        );
        let (problems, installed) = check(&path, tables).expect("check");
        assert!(installed && problems == drift, "{problems:?}");
        assert!(outbox(&path)[1]
            .row
            .as_ref()
            .expect("row")
            .get("colour")
            .is_none());
        // Install again: captured from now on; the outbox and its order are kept.
        install(&path, tables).expect("install again");
        assert!(capture_drift(&conn, &path, tables).is_empty());
        conn.execute_batch("UPDATE p SET colour = 'blue' WHERE id = 1")
            .expect("update");
        let ev = outbox(&path);
        assert_eq!(ev.len(), 3, "nothing of the outbox lost");
        assert!(ev.windows(2).all(|w| w[0].seq < w[1].seq));
        assert_eq!(ev[2].row.as_ref().expect("row")["colour"], json!("blue"));
        // A renamed column still travels under its old name until install runs again.
        conn.execute_batch("ALTER TABLE p RENAME COLUMN name TO full_name")
            .expect("rename");
        let drift = capture_drift(&conn, &path, tables);
        assert!(
            drift.len() == 1 && drift[0].contains("full_name"),
            "{drift:?}"
        );
    }

    #[test]
    fn triggers_capture_multi_row_statements_key_changes_and_deletes() {
        let t = TableConfig::new("p", "patient", &["id"], Direction::Both);
        let (_d, path, conn) = setup(
            "CREATE TABLE p (id INTEGER PRIMARY KEY, name TEXT, pic BLOB)",
            std::slice::from_ref(&t),
        );
        // Install is idempotent.
        install(&path, std::slice::from_ref(&t)).expect("second install");
        conn.execute_batch(
            "INSERT INTO p (id, name, pic) VALUES (1, 'a', x'00ff'), (2, 'b', NULL), (3, 'c', NULL);
             UPDATE p SET name = upper(name);
             UPDATE p SET id = 10 WHERE id = 1;
             DELETE FROM p WHERE id IN (2, 3);",
        )
        .expect("writes");
        let ev = SqliteSource::open(&path, std::slice::from_ref(&t))
            .expect("source")
            .read_after(0, 10_000)
            .expect("read");
        let ops: Vec<(&str, i64)> = ev
            .iter()
            .map(|e| (e.op.as_str(), e.key["id"].as_i64().unwrap_or(-1)))
            .collect();
        assert_eq!(
            ops,
            vec![
                ("insert", 1),
                ("insert", 2),
                ("insert", 3),
                ("update", 1),
                ("update", 2),
                ("update", 3),
                ("delete", 1),
                ("update", 10),
                ("delete", 2),
                ("delete", 3),
            ]
        );
        let first = ev[0].row.as_ref().expect("row");
        assert_eq!(first["pic"], json!("AP8="), "BLOBs travel as base64");
        assert_eq!(
            ev[1].row.as_ref().expect("row")["pic"],
            Value::Null,
            "a NULL BLOB stays null (hex(NULL) is '')"
        );
        assert_eq!(ev[3].row.as_ref().expect("row")["name"], json!("A"));
        assert!(ev.windows(2).all(|w| w[0].seq < w[1].seq));
    }

    /// The shared table of values (`values::fixture`): applied as cloud updates, then captured
    /// again by a local write, every value comes back in the same wire form; and the values an
    /// application writes in SQLite's own ways are captured in that form too.
    #[test]
    fn values_round_trip_in_one_wire_form() {
        let mut t = TableConfig::new("kinds", "kind", &["id"], Direction::Both);
        // SQLite has no boolean storage: an INTEGER 0/1 column is one by config.
        t.types
            .insert("flag".into(), crate::db::values::ValueType::Boolean);
        let (_d, path, conn) = setup(
            "CREATE TABLE kinds (id INTEGER PRIMARY KEY, flag INTEGER, at DATETIME, day DATE, \
             amount DECIMAL(12,4), data BLOB, note TEXT)",
            std::slice::from_ref(&t),
        );
        let sink = SqliteSink::open(&path, std::slice::from_ref(&t)).expect("sink");
        let rows = crate::db::values::fixture::rows();
        for (i, row) in rows.iter().enumerate() {
            let out = sink
                .apply(&Update {
                    update_id: format!("u{i}"),
                    entity: "kind".into(),
                    op: UpdateOp::Upsert,
                    key: obj(json!({"id": row["id"]})),
                    row: Some(obj(row.clone())),
                })
                .expect("apply");
            assert_eq!(out.status, UpdateStatus::Applied, "{:?}", out.reason);
        }
        // Stored the way SQLite stores them.
        let (flag, at, data): (i64, String, Vec<u8>) = conn
            .query_row("SELECT flag, at, data FROM kinds WHERE id = 1", [], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .expect("stored");
        assert_eq!(
            (flag, at.as_str(), data),
            (1, "2026-12-01 10:00:00", vec![0u8, 255])
        );
        // Applied updates are not captured; a local touch captures every row as it is now.
        conn.execute("UPDATE kinds SET id = id", []).expect("touch");
        let source = SqliteSource::open(&path, std::slice::from_ref(&t)).expect("source");
        let captured: Vec<Value> = source
            .read_after(0, 100)
            .expect("read")
            .into_iter()
            .map(|e| Value::Object(e.row.expect("row")))
            .collect();
        assert_eq!(
            captured, rows,
            "every value comes back in the same wire form"
        );

        // What an application writes: 0/1, CURRENT_TIMESTAMP-style text, a REAL amount, x'…'.
        conn.execute_batch(
            "INSERT INTO kinds VALUES (10, 1, '2026-12-01 12:00:00+02:00', '2026-12-01', 12.50, x'00ff', 'app');
             INSERT INTO kinds VALUES (11, 0, '2026-12-01T10:00:00.250', NULL, 1e3, x'', NULL);
             INSERT INTO kinds VALUES (12, 'yes', 'next tuesday', 'soon', 'lots', 'text in a blob', NULL);",
        )
        .expect("app writes");
        let after: Vec<Value> = source
            .read_after(rows.len() as u64, 100)
            .expect("read")
            .into_iter()
            .map(|e| Value::Object(e.row.expect("row")))
            .collect();
        assert_eq!(
            after,
            vec![
                json!({"id": 10, "flag": true, "at": "2026-12-01T10:00:00Z", "day": "2026-12-01",
                       "amount": "12.5", "data": "AP8=", "note": "app"}),
                json!({"id": 11, "flag": false, "at": "2026-12-01T10:00:00.25Z", "day": null,
                       "amount": "1000", "data": "", "note": null}),
                // What does not read as its type is passed on unchanged (the gateway's entity
                // schema can flag it); the bytes of text in a BLOB column are binary.
                json!({"id": 12, "flag": "yes", "at": "next tuesday", "day": "soon",
                       "amount": "lots", "data": "dGV4dCBpbiBhIGJsb2I=", "note": null}),
            ]
        );

        // A binary value that is not base64 fails the update, naming the column; nothing
        // changes.
        let out = sink
            .apply(&Update {
                update_id: "bad".into(),
                entity: "kind".into(),
                op: UpdateOp::Upsert,
                key: obj(json!({"id": 1})),
                row: Some(obj(json!({"id": 1, "data": "00FF!"}))),
            })
            .expect("apply");
        assert_eq!(out.status, UpdateStatus::Failed);
        let reason = out.reason.unwrap_or_default();
        assert!(
            reason.contains("`data`") && reason.contains("base64"),
            "{reason}"
        );
        let data: Vec<u8> = conn
            .query_row("SELECT data FROM kinds WHERE id = 1", [], |r| r.get(0))
            .expect("kept");
        assert_eq!(data, vec![0u8, 255]);
    }

    #[test]
    fn awkward_identifiers_are_quoted() {
        let t = TableConfig::new("my \"odd\" table", "odd", &["the key"], Direction::Both);
        let (_d, path, conn) = setup(
            "CREATE TABLE \"my \"\"odd\"\" table\" (\"the key\" INTEGER PRIMARY KEY, \"it's\" TEXT)",
            std::slice::from_ref(&t),
        );
        conn.execute("INSERT INTO \"my \"\"odd\"\" table\" VALUES (1, 'x')", [])
            .expect("insert");
        let ev = outbox(&path);
        assert_eq!(ev.len(), 1);
        assert_eq!(ev[0].row.as_ref().expect("row")["it's"], json!("x"));
        let sink = SqliteSink::open(&path, &[t]).expect("sink");
        let out = sink
            .apply(&Update {
                update_id: "u1".into(),
                entity: "odd".into(),
                op: UpdateOp::Upsert,
                key: obj(json!({"the key": 2})),
                row: Some(obj(json!({"the key": 2, "it's": "y"}))),
            })
            .expect("apply");
        assert_eq!(out.status, UpdateStatus::Applied, "{out:?}");
    }

    #[test]
    fn update_applied_twice_changes_row_once_and_is_not_echoed() {
        let t = TableConfig::new("p", "patient", &["id"], Direction::Both);
        let (_d, path, conn) = setup(
            "CREATE TABLE p (id INTEGER PRIMARY KEY, name TEXT)",
            std::slice::from_ref(&t),
        );
        let sink = SqliteSink::open(&path, &[t]).expect("sink");
        let u1 = Update {
            update_id: "u1".into(),
            entity: "patient".into(),
            op: UpdateOp::Upsert,
            key: obj(json!({"id": 5})),
            row: Some(obj(json!({"id": 5, "name": "first"}))),
        };
        let u2 = Update {
            update_id: "u2".into(),
            row: Some(obj(json!({"id": 5, "name": "second"}))),
            ..u1.clone()
        };
        assert!(!sink.apply(&u1).expect("u1").duplicate);
        assert!(!sink.apply(&u2).expect("u2").duplicate);
        // A late redelivery of u1 must not undo u2.
        let again = sink.apply(&u1).expect("u1 again");
        assert!(again.duplicate);
        assert_eq!(again.status, UpdateStatus::Applied);
        let name: String = conn
            .query_row("SELECT name FROM p WHERE id = 5", [], |r| r.get(0))
            .expect("row");
        assert_eq!(name, "second");
        assert!(outbox(&path).is_empty(), "applied updates are not captured");
        // The guard is back to 0: the clinic's own writes are captured again.
        conn.execute("UPDATE p SET name = 'local' WHERE id = 5", [])
            .expect("local");
        assert_eq!(outbox(&path).len(), 1);
        let del = Update {
            update_id: "u3".into(),
            op: UpdateOp::Delete,
            row: None,
            ..u1
        };
        sink.apply(&del).expect("delete");
        let n: i64 = conn
            .query_row("SELECT count(*) FROM p", [], |r| r.get(0))
            .expect("count");
        assert_eq!(n, 0);
        assert_eq!(outbox(&path).len(), 1);
    }

    #[test]
    fn bad_updates_fail_with_a_reason_and_change_nothing() {
        let tables = [
            TableConfig::new("p", "patient", &["id"], Direction::Both),
            TableConfig::new("pay", "payment", &["id"], Direction::Up),
        ];
        let (_d, path, conn) = setup(
            "CREATE TABLE p (id INTEGER PRIMARY KEY, name TEXT NOT NULL); CREATE TABLE pay (id INTEGER PRIMARY KEY)",
            &tables,
        );
        let sink = SqliteSink::open(&path, &tables).expect("sink");
        let cases = [
            (
                "u1",
                "patient",
                json!({"id": 1}),
                json!({"id": 1, "colour": "x"}),
                "colour",
            ),
            (
                "u2",
                "patient",
                json!({"id": 1}),
                json!({"id": 1}),
                "NOT NULL",
            ),
            (
                "u3",
                "payment",
                json!({"id": 1}),
                json!({"id": 1}),
                "direction up",
            ),
            (
                "u4",
                "nothing",
                json!({"id": 1}),
                json!({"id": 1}),
                "not mapped",
            ),
            (
                "u5",
                "patient",
                json!({"uuid": 1}),
                json!({"id": 1, "name": "n"}),
                "key",
            ),
        ];
        for (id, entity, key, row, needle) in cases {
            let out = sink
                .apply(&Update {
                    update_id: id.into(),
                    entity: entity.into(),
                    op: UpdateOp::Upsert,
                    key: obj(key),
                    row: Some(obj(row)),
                })
                .expect("apply");
            assert_eq!(out.status, UpdateStatus::Failed, "{id}");
            let reason = out.reason.unwrap_or_default();
            assert!(reason.contains(needle), "{id}: {reason}");
        }
        let n: i64 = conn
            .query_row("SELECT count(*) FROM p", [], |r| r.get(0))
            .expect("count");
        assert_eq!(n, 0);
        let inbox: i64 = conn
            .query_row(
                "SELECT count(*) FROM _tether_inbox WHERE status = 'failed'",
                [],
                |r| r.get(0),
            )
            .expect("inbox");
        assert_eq!(inbox, 5);
    }

    #[test]
    fn check_lists_every_table_problem_without_writing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("c.db");
        let conn = open(&path).expect("open");
        conn.execute_batch(
            "CREATE TABLE a (id INTEGER, code TEXT); CREATE TABLE b (id INTEGER PRIMARY KEY)",
        )
        .expect("ddl");
        let tables = vec![
            TableConfig::new("a", "a", &["id"], Direction::Both),
            TableConfig::new("nope", "nope", &["id"], Direction::Both),
            TableConfig::new("b", "b", &["id", "x"], Direction::Up),
            TableConfig::new("b", "b2", &["id"], Direction::Both),
        ];
        let mut tables = tables;
        tables[3]
            .types
            .insert("flagg".into(), crate::db::values::ValueType::Boolean);
        tables[3]
            .types
            .insert("id".into(), crate::db::values::ValueType::Plain);
        let (problems, installed) = check(&path, &tables).expect("check");
        assert!(!installed);
        assert_eq!(problems.len(), 4, "{problems:#?}");
        assert!(
            problems[3].contains("table b: `types` names column `flagg`"),
            "{problems:?}"
        );
        assert!(
            problems[0].contains("`a`: key [id] is not the primary key"),
            "{problems:?}"
        );
        assert!(
            problems[1].contains("`nope` (agent.tables) does not exist"),
            "{problems:?}"
        );
        assert!(
            problems[2].contains("key column `x` does not exist"),
            "{problems:?}"
        );
        // Read-only: nothing was created, and a missing file is not created either.
        let objects: i64 = conn
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE name LIKE '\\_tether%' ESCAPE '\\'",
                [],
                |r| r.get(0),
            )
            .expect("count");
        assert_eq!(objects, 0);
        let ghost = dir.path().join("ghost.db");
        assert!(check(&ghost, &tables).is_err());
        assert!(!ghost.exists());
    }

    #[test]
    fn install_refuses_missing_tables_and_non_unique_keys_and_uninstall_removes_everything() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("c.db");
        let conn = open(&path).expect("open");
        conn.execute_batch("CREATE TABLE a (id INTEGER, code TEXT)")
            .expect("ddl");
        let err = install(
            &path,
            &[TableConfig::new("zzz", "z", &["id"], Direction::Up)],
        )
        .unwrap_err();
        assert!(err.to_string().contains("zzz"), "{err}");
        let err = install(
            &path,
            &[TableConfig::new("a", "a", &["code"], Direction::Both)],
        )
        .unwrap_err();
        assert!(matches!(err, SqliteError::KeyNotUnique { .. }), "{err}");
        conn.execute_batch("CREATE UNIQUE INDEX a_code ON a (code)")
            .expect("index");
        install(
            &path,
            &[TableConfig::new("a", "a", &["code"], Direction::Both)],
        )
        .expect("install");
        let removed = uninstall(&path).expect("uninstall");
        assert!(removed >= 7, "{removed}");
        let left: i64 = conn
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE name LIKE '%tether%'",
                [],
                |r| r.get(0),
            )
            .expect("count");
        assert_eq!(left, 0);
        conn.execute("INSERT INTO a VALUES (1, 'x')", [])
            .expect("the clinic table still works");
    }

    #[test]
    fn checkpoint_never_moves_back_and_purge_keeps_unacknowledged_rows() {
        let t = TableConfig::new("p", "patient", &["id"], Direction::Up);
        let (_d, path, conn) = setup("CREATE TABLE p (id INTEGER PRIMARY KEY)", &[t]);
        for i in 0..10 {
            conn.execute("INSERT INTO p VALUES (?1)", [i])
                .expect("insert");
        }
        let cp = SqliteCheckpoint::open(&path).expect("cp");
        assert_eq!(cp.load().expect("load"), 0);
        cp.save(6).expect("save");
        cp.save(4).expect("save lower");
        assert_eq!(cp.load().expect("load"), 6);
        assert_eq!(
            cp.purge(6, Duration::from_secs(3600)).expect("purge"),
            0,
            "retention keeps young rows"
        );
        assert_eq!(cp.purge(6, Duration::ZERO).expect("purge"), 6);
        let seqs: Vec<u64> = outbox(&path).iter().map(|e| e.seq).collect();
        assert_eq!(seqs, vec![7, 8, 9, 10]);
    }
}

#[cfg(test)]
mod policy_tests {
    use super::*;
    use crate::config::{ConflictPolicy, Direction};
    use serde_json::json;

    fn setup(policy: ConflictPolicy) -> (tempfile::TempDir, PathBuf, Connection, SqliteSink) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("c.db");
        let conn = open(&path).expect("open");
        conn.execute_batch("CREATE TABLE p (id INTEGER PRIMARY KEY, name TEXT, version INTEGER)")
            .expect("ddl");
        let mut t = TableConfig::new("p", "patient", &["id"], Direction::Both);
        t.conflict = policy;
        t.version_column = Some("version".into());
        install(&path, std::slice::from_ref(&t)).expect("install");
        let sink = SqliteSink::open(&path, &[t]).expect("sink");
        (dir, path, conn, sink)
    }

    fn upsert(id: &str, version: i64) -> Update {
        Update {
            update_id: id.into(),
            entity: "patient".into(),
            op: UpdateOp::Upsert,
            key: json!({"id": 1}).as_object().cloned().unwrap_or_default(),
            row: json!({"id": 1, "name": "cloud", "version": version})
                .as_object()
                .cloned(),
        }
    }

    fn name(conn: &Connection) -> String {
        conn.query_row("SELECT name FROM p WHERE id = 1", [], |r| r.get(0))
            .expect("row")
    }

    fn conflicts(conn: &Connection) -> i64 {
        conn.query_row("SELECT count(*) FROM _tether_conflicts", [], |r| r.get(0))
            .expect("count")
    }

    #[test]
    fn cloud_wins_overwrites_a_pending_clinic_change() {
        let (_d, _p, conn, sink) = setup(ConflictPolicy::CloudWins);
        conn.execute("INSERT INTO p VALUES (1, 'clinic', 5)", [])
            .expect("insert");
        let out = sink.apply(&upsert("u1", 1)).expect("apply");
        assert_eq!(out.status, UpdateStatus::Applied);
        assert_eq!(name(&conn), "cloud");
        assert_eq!(conflicts(&conn), 0);
    }

    #[test]
    fn clinic_wins_keeps_an_unacknowledged_clinic_change_and_records_the_conflict() {
        let (_d, path, conn, sink) = setup(ConflictPolicy::ClinicWins);
        conn.execute("INSERT INTO p VALUES (1, 'clinic', 5)", [])
            .expect("insert");
        let out = sink.apply(&upsert("u1", 1)).expect("apply");
        assert_eq!(out.status, UpdateStatus::Conflict, "{out:?}");
        assert!(out.reason.unwrap_or_default().contains("clinic_wins"));
        assert_eq!(name(&conn), "clinic");
        assert_eq!(conflicts(&conn), 1);
        // Once the gateway has acknowledged the clinic's change, the cloud may write.
        SqliteCheckpoint::open(&path)
            .expect("cp")
            .save(1)
            .expect("save");
        let out = sink.apply(&upsert("u2", 1)).expect("apply");
        assert_eq!(out.status, UpdateStatus::Applied);
        assert_eq!(name(&conn), "cloud");
        // The conflicted update redelivered keeps its recorded outcome.
        assert_eq!(
            sink.apply(&upsert("u1", 1)).expect("again").status,
            UpdateStatus::Conflict
        );
    }

    #[test]
    fn newest_wins_compares_the_version_column() {
        let (_d, _p, conn, sink) = setup(ConflictPolicy::NewestWins);
        conn.execute("INSERT INTO p VALUES (1, 'clinic', 5)", [])
            .expect("insert");
        let older = sink.apply(&upsert("u1", 4)).expect("apply");
        assert_eq!(older.status, UpdateStatus::Conflict);
        assert_eq!(name(&conn), "clinic");
        let newer = sink.apply(&upsert("u2", 6)).expect("apply");
        assert_eq!(newer.status, UpdateStatus::Applied);
        assert_eq!(name(&conn), "cloud");
        let mut no_version = upsert("u3", 0);
        no_version.row.as_mut().expect("row").remove("version");
        assert_eq!(
            sink.apply(&no_version).expect("apply").status,
            UpdateStatus::Failed
        );
        assert_eq!(conflicts(&conn), 1);
    }

    #[test]
    fn snapshot_is_ordered_resumable_and_interleaves_with_live_changes() {
        let (_d, path, conn, _sink) = setup(ConflictPolicy::CloudWins);
        for i in 1..=25 {
            conn.execute("INSERT INTO p VALUES (?1, 'n', 1)", [i])
                .expect("insert");
        }
        let before = SqliteSource::open(&path, &[])
            .expect("src")
            .read_after(0, 1000)
            .expect("read")
            .len();
        let t = TableConfig::new("p", "patient", &["id"], Direction::Both);
        let mut seen = Vec::new();
        snapshot(&path, &t, 10, &mut |p| seen.push(p.done)).expect("snapshot");
        assert_eq!(seen, vec![10, 20, 25], "progress per chunk");
        // Done: a second run queues nothing.
        let again = snapshot(&path, &t, 10, &mut |_| {}).expect("again");
        assert_eq!(again.done, 25);
        conn.execute("UPDATE p SET name = 'live' WHERE id = 25", [])
            .expect("live");
        let events = SqliteSource::open(&path, &[])
            .expect("src")
            .read_after(0, 1000)
            .expect("read");
        let snap: Vec<i64> = events[before..]
            .iter()
            .filter(|e| e.op == Op::Update)
            .map(|e| e.key["id"].as_i64().unwrap_or(-1))
            .collect();
        assert_eq!(&snap[..25], &(1..=25).collect::<Vec<_>>()[..], "key order");
        let last = events.last().expect("live event");
        assert_eq!(
            last.row.as_ref().expect("row")["name"],
            json!("live"),
            "the live change comes after the snapshot row"
        );
    }

    #[test]
    fn snapshot_resumes_after_an_interrupted_run() {
        let (_d, path, conn, _sink) = setup(ConflictPolicy::CloudWins);
        for i in 1..=30 {
            conn.execute("INSERT INTO p VALUES (?1, 'n', 1)", [i])
                .expect("insert");
        }
        let t = TableConfig::new("p", "patient", &["id"], Direction::Both);
        // Pretend a run stopped after key 12.
        conn.execute(
            "INSERT INTO _tether_snapshot (table_name, last_key, rows, done) VALUES ('p', '{\"id\":12}', 12, 0)",
            [],
        )
        .expect("position");
        let p = snapshot(&path, &t, 100, &mut |_| {}).expect("resume");
        assert_eq!(p.done, 30);
        let keys: Vec<i64> = SqliteSource::open(&path, &[])
            .expect("src")
            .read_after(30, 1000)
            .expect("read")
            .iter()
            .map(|e| e.key["id"].as_i64().unwrap_or(-1))
            .collect();
        assert_eq!(
            keys,
            (13..=30).collect::<Vec<_>>(),
            "only the rows after the saved key"
        );
    }
}

#[cfg(test)]
mod concurrency_tests {
    use super::*;
    use crate::config::Direction;

    /// SQLite has one writer at a time, so commit order is AUTOINCREMENT order; this checks it
    /// under several writers holding transactions open while a reader polls, as the watcher
    /// does: every committed row read exactly once, in order, rolled-back ones never.
    #[test]
    fn concurrent_writers_with_open_transactions_lose_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("c.db");
        let conn = open(&path).expect("open");
        conn.execute_batch("PRAGMA journal_mode = WAL; CREATE TABLE p (id INTEGER PRIMARY KEY, w INTEGER, i INTEGER)")
            .expect("ddl");
        install(
            &path,
            &[TableConfig::new("p", "patient", &["id"], Direction::Up)],
        )
        .expect("install");
        let mut writers = Vec::new();
        for w in 0..4i64 {
            let path = path.clone();
            writers.push(std::thread::spawn(move || {
                let mut c = open(&path).expect("open");
                for i in 0..60i64 {
                    let tx = c
                        .transaction_with_behavior(TransactionBehavior::Immediate)
                        .expect("begin");
                    tx.execute("INSERT INTO p (w, i) VALUES (?1, ?2)", params![w, i])
                        .expect("insert");
                    tx.execute("INSERT INTO p (w, i) VALUES (?1, ?2)", params![w, -i])
                        .expect("insert");
                    if i % 7 == 3 {
                        tx.rollback().expect("rollback");
                    } else {
                        tx.commit().expect("commit");
                    }
                }
            }));
        }
        let src = SqliteSource::open(&path, &[]).expect("source");
        let mut got = Vec::new();
        let mut after = 0;
        loop {
            let done = writers.iter().all(|h| h.is_finished());
            let batch = src.read_after(after, 17).expect("read");
            if let Some(l) = batch.last() {
                after = l.seq;
            }
            let empty = batch.is_empty();
            got.extend(batch.into_iter().map(|e| e.seq));
            if done && empty {
                break;
            }
        }
        for h in writers {
            h.join().expect("writer");
        }
        let committed: Vec<u64> = {
            let mut s = conn
                .prepare("SELECT seq FROM _tether_outbox ORDER BY seq")
                .expect("prep");
            let rows = s.query_map([], |r| r.get::<_, i64>(0)).expect("q");
            rows.map(|r| r.expect("row") as u64).collect()
        };
        let rows: i64 = conn
            .query_row("SELECT count(*) FROM p", [], |r| r.get(0))
            .expect("count");
        assert_eq!(got, committed, "read exactly the committed rows, in order");
        assert_eq!(
            committed.len() as i64,
            rows,
            "one outbox row per committed row, none for rolled-back ones"
        );
    }
}

/// The allow-listed queries of `agent.rpc`, read-only three times over: each must be one
/// statement that SQLite itself reports as read-only (`sqlite3_stmt_readonly`) and that is not a
/// PRAGMA, ATTACH/DETACH or transaction statement — checked for every query when the agent
/// starts (it refuses to start, naming the query) and again before every run — on connections
/// of their own with `PRAGMA query_only`. Up to [`QUERY_CONNECTIONS`] run at once, each on its
/// own connection, interrupted once it passes `agent.rpc.timeout`.
pub struct SqliteQueries {
    path: std::path::PathBuf,
    /// Idle connections; more are opened (up to `QUERY_CONNECTIONS`) when all are busy.
    idle: Mutex<Vec<Connection>>,
    queries: HashMap<String, crate::config::RpcQueryConfig>,
    timeout: Duration,
}

/// Queries that may run at once (the agent's connection actor runs at most this many).
pub const QUERY_CONNECTIONS: usize = tether_actors::connection::MAX_RPC_RUNNING;

/// Why a query text is not a read-only query, or `None` if the engine confirms it is.
pub fn not_read_only(conn: &Connection, sql: &str) -> Option<String> {
    if let Some(why) = crate::config::read_only_sql_problem(sql) {
        return Some(why);
    }
    match conn.prepare_cached(sql) {
        Ok(stmt) if stmt.readonly() => None,
        Ok(_) => Some("SQLite reports that this statement can write".into()),
        Err(rusqlite::Error::MultipleStatement) => Some("more than one statement".into()),
        Err(e) => Some(format!("does not prepare: {e}")),
    }
}

fn query_connection(path: &Path) -> Result<Connection, SqliteError> {
    let conn = open(path)?;
    conn.execute_batch("PRAGMA query_only = ON;")
        .map_err(|source| SqliteError::Open {
            path: path.display().to_string(),
            source,
        })?;
    Ok(conn)
}

/// Rows returned when a query sets no `max_rows`.
const DEFAULT_MAX_ROWS: usize = 1000;

impl SqliteQueries {
    pub fn open(path: &Path, rpc: &crate::config::RpcConfig) -> Result<Self, SqliteError> {
        let conn = query_connection(path)?;
        for (name, q) in &rpc.queries {
            if let Some(why) = not_read_only(&conn, &q.sql) {
                return Err(SqliteError::NotReadOnly {
                    query: name.clone(),
                    why,
                });
            }
        }
        Ok(SqliteQueries {
            path: path.to_path_buf(),
            idle: Mutex::new(vec![conn]),
            queries: rpc.queries.clone().into_iter().collect(),
            timeout: rpc.timeout.get(),
        })
    }

    /// An idle connection, or a new one.
    fn take(&self) -> Result<Connection, SqliteError> {
        let idle = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
        match idle {
            Some(c) => Ok(c),
            None => query_connection(&self.path),
        }
    }

    fn give_back(&self, conn: Connection) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < QUERY_CONNECTIONS {
            idle.push(conn);
        }
    }
}

fn json_to_sql(v: &Value) -> Option<SqlValue> {
    Some(match v {
        Value::Null => SqlValue::Null,
        Value::Bool(b) => SqlValue::Integer(i64::from(*b)),
        Value::Number(n) => match n.as_i64() {
            Some(i) => SqlValue::Integer(i),
            None => SqlValue::Real(n.as_f64()?),
        },
        Value::String(s) => SqlValue::Text(s.clone()),
        Value::Array(_) | Value::Object(_) => return None,
    })
}

fn sql_to_json(v: rusqlite::types::ValueRef<'_>) -> Value {
    use rusqlite::types::ValueRef as V;
    match v {
        V::Null => Value::Null,
        V::Integer(i) => Value::from(i),
        V::Real(f) => serde_json::Number::from_f64(f)
            .map(Value::Number)
            .unwrap_or(Value::Null),
        V::Text(t) => Value::String(String::from_utf8_lossy(t).into_owned()),
        V::Blob(b) => Value::String(values::base64_encode(b)),
    }
}

impl tether_actors::ports::QueryRunner for SqliteQueries {
    fn run(
        &self,
        name: &str,
        params: &Map<String, Value>,
    ) -> Result<tether_actors::ports::QueryRows, tether_actors::ports::QueryError> {
        use tether_actors::ports::{QueryError, QueryRows};
        let bad = |field: String, message: String| QueryError {
            field: Some(field),
            message,
        };
        let Some(q) = self.queries.get(name) else {
            return Err(bad(
                "name".into(),
                format!("no query `{name}` is configured on this agent (agent.rpc.queries)"),
            ));
        };
        if let Some(extra) = params.keys().find(|k| !q.params.contains(k)) {
            return Err(bad(
                format!("params.{extra}"),
                format!("query `{name}` takes no parameter `{extra}`"),
            ));
        }
        let mut bound = Vec::with_capacity(q.params.len());
        for p in &q.params {
            let v = params
                .get(p)
                .ok_or_else(|| bad(format!("params.{p}"), format!("query `{name}` needs `{p}`")))?;
            let v = json_to_sql(v).ok_or_else(|| {
                bad(
                    format!("params.{p}"),
                    "must be a string, number, boolean or null".into(),
                )
            })?;
            bound.push((format!(":{p}"), v));
        }
        let max = match q.max_rows {
            0 => DEFAULT_MAX_ROWS,
            n => n as usize,
        };
        let db = |e: rusqlite::Error| QueryError {
            field: None,
            message: format!("query `{name}` failed: {e}"),
        };
        let conn = self.take().map_err(|e| QueryError {
            field: None,
            message: format!("query `{name}`: {e}"),
        })?;
        // Checked again at every run: nothing that can write reaches `query`.
        if let Some(why) = not_read_only(&conn, &q.sql) {
            self.give_back(conn);
            return Err(QueryError {
                field: None,
                message: format!("query `{name}` is not read-only ({why}); it is not run"),
            });
        }
        let deadline = std::time::Instant::now() + self.timeout;
        conn.progress_handler(10_000, Some(move || std::time::Instant::now() > deadline));
        let result = (|| {
            let mut stmt = conn.prepare_cached(&q.sql).map_err(db)?;
            let names: Vec<String> = stmt.column_names().iter().map(|c| c.to_string()).collect();
            let refs: Vec<(&str, &dyn rusqlite::ToSql)> = bound
                .iter()
                .map(|(k, v)| (k.as_str(), v as &dyn rusqlite::ToSql))
                .collect();
            let mut rows = stmt.query(refs.as_slice()).map_err(db)?;
            let mut out = QueryRows::default();
            while let Some(r) = rows.next().map_err(db)? {
                if out.rows.len() == max {
                    out.truncated = true;
                    break;
                }
                let mut m = Map::new();
                for (i, n) in names.iter().enumerate() {
                    m.insert(n.clone(), sql_to_json(r.get_ref(i).map_err(db)?));
                }
                out.rows.push(m);
            }
            Ok(out)
        })();
        conn.progress_handler(0, None::<fn() -> bool>);
        self.give_back(conn);
        result.map_err(|e: QueryError| {
            if std::time::Instant::now() > deadline {
                QueryError {
                    field: None,
                    message: format!(
                        "query `{name}` interrupted after {} ms (agent.rpc.timeout)",
                        self.timeout.as_millis()
                    ),
                }
            } else {
                e
            }
        })
    }
}

//! Logical-decoding capture (`agent.database.capture: logical`): no triggers on the clinic's
//! tables; changes are read from a replication slot (`pgoutput`, through
//! `pg_logical_slot_peek_binary_changes`) in commit order, whole transactions only, so there are
//! no holes to wait for and a long transaction holds back only itself.
//!
//! ## The pump
//! Each read first moves what the slot has decoded into `tether.outbox`, in one transaction
//! that also records the last commit LSN moved (`tether.state` `logical_lsn`); only after that
//! commit is the slot advanced. A crash between the two re-reads those transactions and skips
//! them by LSN: nothing lost, nothing twice. Every writer of the outbox in this mode (the pump,
//! snapshot chunks) holds one transaction-level advisory lock, so sequence numbers become
//! visible in order and the outbox is read without the trigger mode's hole rule.
//!
//! The slot is advanced once its changes are durable in the outbox, not when the gateway
//! acknowledges them: a clinic offline for a weekend would otherwise make the server keep every
//! byte of WAL (of every database) for the whole weekend, and a slot dropped to save the disk
//! loses changes; the outbox keeps only Tether's rows and is purged by its retention.
//!
//! Values are converted by the server (`to_jsonb(jsonb_populate_record(NULL::table, …))` of the
//! decoded text values), so an event's row is the same JSON as the trigger mode's `to_jsonb(NEW)`.
//! Tables are set to `REPLICA IDENTITY FULL` at install so deletes carry the whole old row, key
//! changes can be seen, and unchanged TOASTed values can be filled in from the old row.
//! Echo suppression: the applier emits a transactional logical message `tether.apply`, and the
//! pump drops every transaction that carries it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use postgres::Client;
use serde_json::{Map, Value};
use tether_actors::ports::PortError;

use super::pgoutput::{self, Cell, Message, Tuple};
use super::{check_table, connect, port, split, sql, trigger_sql, PgError, BASE_SCHEMA};
use crate::config::TableConfig;
use crate::db::{quote_ident as qi, quote_literal as ql, quote_qualified as qq};

/// The publication naming the synced tables (one per database).
pub const PUBLICATION: &str = "tether";
/// The logical message the applier emits in its transactions.
pub const APPLY_MARKER: &str = "tether.apply";
/// Held (transaction-level) by every writer of the outbox in logical mode.
pub const OUTBOX_WRITER_LOCK: i64 = 0x7465_7468_6572_6f62;
/// Changes decoded per pump (whole transactions: a larger one is taken whole).
const BATCH: i32 = 10_000;
/// How often the slot's retained WAL is measured.
const LAG_EVERY: Duration = Duration::from_secs(10);
/// How often the slot is advanced while changes trickle in. Each advance decodes the WAL once
/// more in a session of its own, whose set-up dominates at clinic rates; between advances the
/// slot gives the moved transactions again and they are skipped by LSN.
const ADVANCE_EVERY: Duration = Duration::from_secs(1);
/// …or sooner once this many events were moved since the last advance.
const ADVANCE_AFTER_EVENTS: usize = 1_000;

const JSON_OID: u32 = 114;
const JSONB_OID: u32 = 3802;

/// The replication slot's name for an outbox.
pub fn slot_name(source_id: i64) -> String {
    format!("tether_{source_id}")
}

/// Shared with status: the WAL bytes the slot keeps on the server (`None` until measured).
#[derive(Debug, Default)]
pub struct SlotGauge {
    retained: AtomicU64,
    measured: AtomicU64,
}

impl SlotGauge {
    pub fn retained_bytes(&self) -> Option<u64> {
        (self.measured.load(Ordering::Relaxed) == 1).then(|| self.retained.load(Ordering::Relaxed))
    }
}

struct Rel {
    table: String,
    entity: String,
    key: Vec<String>,
    columns: Vec<pgoutput::Column>,
}

struct Change {
    rel: u32,
    op: &'static str,
    /// The row whose values the event carries (new for insert/update, old for delete).
    row: Tuple,
    /// For an update whose key changed: the old row (a delete of the old key goes first).
    moved_from: Option<Tuple>,
}

struct Txn {
    final_lsn: u64,
    end_lsn: u64,
    commit_us: i64,
    changes: Vec<Change>,
    applied_by_tether: bool,
}

/// What one pump did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Pumped {
    pub transactions: usize,
    pub events: usize,
    /// Transactions of Tether's own applier, dropped.
    pub echoes: usize,
}

/// Moves decoded changes from the slot into the outbox.
pub struct Pump {
    slot: String,
    /// (schema, table) → the synced table (direction up).
    tables: HashMap<(String, String), TableConfig>,
    warn_bytes: u64,
    gauge: Arc<SlotGauge>,
    last_lag: Option<Instant>,
    high: bool,
    truncates_seen: bool,
    last_advance: Option<Instant>,
    moved_since_advance: usize,
}

impl Pump {
    pub fn new(slot: String, tables: &[TableConfig], warn_bytes: u64) -> Pump {
        Pump {
            slot,
            tables: tables
                .iter()
                .filter(|t| t.direction.up())
                .map(|t| (split(&t.table), t.clone()))
                .collect(),
            warn_bytes,
            gauge: Arc::new(SlotGauge::default()),
            last_lag: None,
            high: false,
            truncates_seen: false,
            last_advance: None,
            moved_since_advance: 0,
        }
    }

    pub fn gauge(&self) -> Arc<SlotGauge> {
        self.gauge.clone()
    }

    /// One pump: decodes what committed up to the server's flushed WAL (or `upto`), stores it
    /// in the outbox and advances the slot.
    pub fn pump(&mut self, c: &mut Client, upto: Option<u64>) -> Result<Pumped, PortError> {
        self.measure(c, true)?;
        let mut tx = c.transaction().map_err(port("begin"))?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&OUTBOX_WRITER_LOCK])
            .map_err(port("locking the outbox"))?;
        let done: i64 = tx
            .query_opt(
                "SELECT value FROM tether.state WHERE name = 'logical_lsn'",
                &[],
            )
            .map_err(port("reading the capture position"))?
            .ok_or_else(|| {
                PortError::new(
                    "logical capture is not installed in this database (run `tether agent install`)",
                )
            })?
            .get(0);
        let flushed: String = tx
            .query_one("SELECT pg_current_wal_flush_lsn()::text", &[])
            .map_err(port("reading the WAL position"))?
            .get(0);
        let flushed = pgoutput::parse_lsn(&flushed)
            .ok_or_else(|| PortError::new(format!("unreadable WAL position `{flushed}`")))?;
        let until = upto.map_or(flushed, |u| u.min(flushed));
        let rows = tx
            .query(
                "SELECT data FROM pg_logical_slot_peek_binary_changes($1, $2::text::pg_lsn, $3, \
                 'proto_version', '1', 'publication_names', $4, 'messages', 'true')",
                &[&self.slot, &pgoutput::lsn_text(until), &BATCH, &PUBLICATION],
            )
            .map_err(|e| {
                let msg = super::pg_error_text(&e);
                if msg.contains("does not exist") {
                    slot_lost(&self.slot, &format!("{GONE}: {msg}"))
                } else {
                    PortError::new(format!(
                        "reading the replication slot `{}`: {msg}",
                        self.slot
                    ))
                }
            })?;
        let full = rows.len() >= BATCH as usize;
        let (rels, txns) = self.decode(&rows)?;
        let mut out = Pumped::default();
        let mut last_final = done as u64;
        let mut last_end = None;
        let mut entity = Vec::new();
        let mut op = Vec::new();
        let mut keys = Vec::new();
        let mut rows_json = Vec::new();
        let mut at = Vec::new();
        for t in &txns {
            last_end = Some(t.end_lsn);
            if t.final_lsn <= done as u64 {
                continue;
            }
            last_final = last_final.max(t.final_lsn);
            out.transactions += 1;
            if t.applied_by_tether {
                out.echoes += 1;
                continue;
            }
            let converted = convert(&mut tx, &rels, &t.changes)?;
            for (ch, (row, old)) in t.changes.iter().zip(converted) {
                let rel = &rels[&ch.rel];
                let key = key_of(rel, &row);
                if let Some(old) = old {
                    entity.push(rel.entity.clone());
                    op.push("delete".to_string());
                    keys.push(key_of(rel, &old));
                    rows_json.push(old);
                    at.push(t.commit_us);
                }
                entity.push(rel.entity.clone());
                op.push(ch.op.to_string());
                keys.push(key);
                rows_json.push(row);
                at.push(t.commit_us);
            }
        }
        out.events = entity.len();
        if !entity.is_empty() {
            tx.execute(
                "INSERT INTO tether.outbox (entity, op, key_json, row_json, committed_at) \
                 SELECT e, o, k, r, timestamptz '2000-01-01 00:00:00+00' + make_interval(secs => t::float8 / 1e6) \
                 FROM unnest($1::text[], $2::text[], $3::jsonb[], $4::jsonb[], $5::int8[]) WITH ORDINALITY AS u(e, o, k, r, t, n) \
                 ORDER BY n",
                &[&entity, &op, &keys, &rows_json, &at],
            )
            .map_err(port("writing the outbox"))?;
        }
        if last_final > done as u64 {
            tx.execute(
                "UPDATE tether.state SET value = $1 WHERE name = 'logical_lsn'",
                &[&(last_final as i64)],
            )
            .map_err(port("saving the capture position"))?;
        }
        tx.commit().map_err(port("commit"))?;
        // Everything that committed before `until` has been read unless the batch was full.
        let to = if full {
            last_end
        } else {
            Some(last_end.map_or(until, |e| e.max(until)))
        };
        self.moved_since_advance += out.events;
        let due = upto.is_some()
            || full
            || self.moved_since_advance >= ADVANCE_AFTER_EVENTS
            || self
                .last_advance
                .is_none_or(|t| t.elapsed() >= ADVANCE_EVERY);
        if let (Some(to), true) = (to, due) {
            self.last_advance = Some(Instant::now());
            self.moved_since_advance = 0;
            c.execute(
                "SELECT pg_replication_slot_advance(slot_name, $2::text::pg_lsn) FROM pg_replication_slots \
                 WHERE slot_name = $1 AND confirmed_flush_lsn < $2::text::pg_lsn",
                &[&self.slot, &pgoutput::lsn_text(to)],
            )
            .map_err(port("advancing the replication slot"))?;
        }
        Ok(out)
    }

    fn decode(
        &mut self,
        rows: &[postgres::Row],
    ) -> Result<(HashMap<u32, Rel>, Vec<Txn>), PortError> {
        let mut rels: HashMap<u32, Rel> = HashMap::new();
        let mut ignored: HashMap<u32, String> = HashMap::new();
        let mut txns = Vec::new();
        let mut cur: Option<Txn> = None;
        for r in rows {
            let data: &[u8] = r.get(0);
            let m = pgoutput::decode(data)
                .map_err(|e| PortError::new(format!("logical capture: {e}")))?;
            let change =
                |rel: u32, op: &'static str, row: Tuple, moved_from: Option<Tuple>| Change {
                    rel,
                    op,
                    row,
                    moved_from,
                };
            match m {
                Message::Begin {
                    final_lsn,
                    commit_us,
                    ..
                } => {
                    cur = Some(Txn {
                        final_lsn,
                        end_lsn: final_lsn,
                        commit_us,
                        changes: Vec::new(),
                        applied_by_tether: false,
                    })
                }
                Message::Commit {
                    end_lsn, commit_us, ..
                } => {
                    let mut t = cur.take().ok_or_else(|| {
                        PortError::new("logical capture: a commit without its begin")
                    })?;
                    t.end_lsn = end_lsn;
                    t.commit_us = commit_us;
                    txns.push(t);
                }
                Message::Relation {
                    oid,
                    namespace,
                    name,
                    columns,
                } => match self.tables.get(&(namespace.clone(), name.clone())) {
                    Some(t) => {
                        rels.insert(
                            oid,
                            Rel {
                                table: t.table.clone(),
                                entity: t.entity.clone(),
                                key: t.key.clone(),
                                columns,
                            },
                        );
                    }
                    None => {
                        ignored.insert(oid, format!("{namespace}.{name}"));
                    }
                },
                Message::Insert { rel, new } => {
                    if rels.contains_key(&rel) {
                        open(&mut cur)?
                            .changes
                            .push(change(rel, "insert", new, None));
                    }
                }
                Message::Update { rel, old, new } => {
                    if let Some(r) = rels.get(&rel) {
                        let new = fill_unchanged(r, new, old.as_ref())?;
                        let moved = old.filter(|o| key_changed(r, o, &new));
                        open(&mut cur)?
                            .changes
                            .push(change(rel, "update", new, moved));
                    }
                }
                Message::Delete { rel, old } => {
                    if rels.contains_key(&rel) {
                        open(&mut cur)?
                            .changes
                            .push(change(rel, "delete", old, None));
                    }
                }
                Message::Truncate { .. } => {
                    if !self.truncates_seen {
                        self.truncates_seen = true;
                        log::warn!(target: "error", "event=capture_truncate_ignored engine=postgres capture=logical note=\"TRUNCATE is not captured (as with triggers); run `tether agent snapshot` if the cloud must follow\"");
                    }
                }
                Message::Logical { prefix, .. } => {
                    if prefix == APPLY_MARKER {
                        open(&mut cur)?.applied_by_tether = true;
                    }
                }
                Message::Other(_) => {}
            }
        }
        if !ignored.is_empty() {
            let mut names: Vec<&String> = ignored.values().collect();
            names.sort();
            log::warn!(target: "error", "event=capture_unmapped_tables engine=postgres tables={names:?} note=\"in publication `{PUBLICATION}` but not in agent.tables: run `tether agent install`\"");
        }
        Ok((rels, txns))
    }

    /// Measures the WAL the slot keeps (at most every [`LAG_EVERY`]); with `warn`, warns past
    /// the threshold, once per crossing (the pump warns; a status reader only measures).
    pub fn measure(&mut self, c: &mut Client, warn: bool) -> Result<(), PortError> {
        if self.last_lag.is_some_and(|t| t.elapsed() < LAG_EVERY) {
            return Ok(());
        }
        self.last_lag = Some(Instant::now());
        let row = c
            .query_opt(
                "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::int8, wal_status \
                 FROM pg_replication_slots WHERE slot_name = $1",
                &[&self.slot],
            )
            .map_err(port("reading the replication slot"))?
            .ok_or_else(|| slot_lost(&self.slot, GONE))?;
        let (retained, status): (Option<i64>, Option<String>) = (row.get(0), row.get(1));
        if status.as_deref() == Some("lost") {
            return Err(slot_lost(
                &self.slot,
                "lost the WAL it needed (max_slot_wal_keep_size)",
            ));
        }
        let retained = retained.unwrap_or(0).max(0) as u64;
        self.gauge.retained.store(retained, Ordering::Relaxed);
        self.gauge.measured.store(1, Ordering::Relaxed);
        if !warn {
            return Ok(());
        }
        let high = retained > self.warn_bytes;
        if high && !self.high {
            log::warn!(target: "error", "event=capture_slot_wal_high slot={} retained_mb={} threshold_mb={} note=\"the server keeps this much WAL for Tether's slot; it is released as the agent reads it\"", self.slot, retained >> 20, self.warn_bytes >> 20);
        } else if !high && self.high {
            log::info!(target: "supervisor", "event=capture_slot_wal_normal slot={} retained_mb={}", self.slot, retained >> 20);
        }
        self.high = high;
        Ok(())
    }
}

const GONE: &str = "is gone (dropped, or invalidated by max_slot_wal_keep_size)";

/// The slot can no longer give every change: say so, and what to do.
fn slot_lost(slot: &str, what: &str) -> PortError {
    PortError::new(format!(
        "replication slot `{slot}` {what}: changes may have been lost; run `tether agent install` and `tether agent snapshot`"
    ))
}

fn open(cur: &mut Option<Txn>) -> Result<&mut Txn, PortError> {
    cur.as_mut()
        .ok_or_else(|| PortError::new("logical capture: a change outside a transaction"))
}

fn cell_text(c: &Cell) -> Option<&str> {
    match c {
        Cell::Text(s) => Some(s),
        _ => None,
    }
}

/// Replaces unchanged TOASTed values of `new` with the old row's (present with
/// `REPLICA IDENTITY FULL`).
fn fill_unchanged(r: &Rel, mut new: Tuple, old: Option<&Tuple>) -> Result<Tuple, PortError> {
    for (i, cell) in new.iter_mut().enumerate() {
        if *cell == Cell::Unchanged {
            match old.and_then(|o| o.get(i)) {
                Some(Cell::Text(v)) => *cell = Cell::Text(v.clone()),
                Some(Cell::Null) => *cell = Cell::Null,
                _ => {
                    let col = r.columns.get(i).map_or("?", |c| c.name.as_str());
                    return Err(PortError::new(format!(
                        "logical capture: table `{}` column `{col}`: an unchanged large value came without the old row; the table needs REPLICA IDENTITY FULL (`tether agent install` sets it)",
                        r.table
                    )));
                }
            }
        }
    }
    Ok(new)
}

/// Whether an update moved the row to another key (compared in text form).
fn key_changed(r: &Rel, old: &Tuple, new: &Tuple) -> bool {
    r.key.iter().any(|k| {
        r.columns
            .iter()
            .position(|c| &c.name == k)
            .is_some_and(|i| old.get(i).map(cell_text) != new.get(i).map(cell_text))
    })
}

/// A tuple as a JSON object of text values (json and jsonb parsed), for
/// `jsonb_populate_record`.
fn text_object(r: &Rel, t: &Tuple) -> Result<Value, PortError> {
    let mut m = Map::new();
    for (col, cell) in r.columns.iter().zip(t) {
        let v = match cell {
            Cell::Null | Cell::Unchanged => Value::Null,
            Cell::Text(s) if col.type_oid == JSON_OID || col.type_oid == JSONB_OID => {
                serde_json::from_str(s).map_err(|e| {
                    PortError::new(format!(
                        "logical capture: table `{}` column `{}`: unreadable JSON value: {e}",
                        r.table, col.name
                    ))
                })?
            }
            Cell::Text(s) => Value::String(s.clone()),
        };
        m.insert(col.name.clone(), v);
    }
    Ok(Value::Object(m))
}

/// Converts each change's row (and moved-from row) to the table's JSON, one statement per run
/// of changes to the same table.
fn convert(
    tx: &mut postgres::Transaction<'_>,
    rels: &HashMap<u32, Rel>,
    changes: &[Change],
) -> Result<Vec<(Value, Option<Value>)>, PortError> {
    // Flatten: each change's row, then its moved-from row if any.
    let mut out: Vec<(Value, Option<Value>)> = Vec::with_capacity(changes.len());
    let mut i = 0;
    while i < changes.len() {
        let rel_id = changes[i].rel;
        let mut j = i;
        while j < changes.len() && changes[j].rel == rel_id {
            j += 1;
        }
        let rel = &rels[&rel_id];
        let mut objs = Vec::new();
        for ch in &changes[i..j] {
            objs.push(text_object(rel, &ch.row)?);
            if let Some(o) = &ch.moved_from {
                objs.push(text_object(rel, o)?);
            }
        }
        let converted: Vec<Value> = tx
            .query(
                &format!(
                    "SELECT to_jsonb(jsonb_populate_record(NULL::{}, x)) \
                     FROM unnest($1::jsonb[]) WITH ORDINALITY AS u(x, n) ORDER BY n",
                    qq(&rel.table)
                ),
                &[&objs],
            )
            .map_err(|e| {
                PortError::new(format!(
                    "logical capture: converting rows of `{}`: {}",
                    rel.table,
                    super::pg_error_text(&e)
                ))
            })?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let mut it = converted.into_iter();
        for ch in &changes[i..j] {
            let row = it
                .next()
                .ok_or_else(|| PortError::new("logical capture: a converted row is missing"))?;
            let old = match &ch.moved_from {
                Some(_) => Some(it.next().ok_or_else(|| {
                    PortError::new("logical capture: a converted row is missing")
                })?),
                None => None,
            };
            out.push((row, old));
        }
        i = j;
    }
    Ok(out)
}

fn key_of(r: &Rel, row: &Value) -> Value {
    let mut m = Map::new();
    for k in &r.key {
        m.insert(k.clone(), row.get(k).cloned().unwrap_or(Value::Null));
    }
    Value::Object(m)
}

/// What `install` needs of the server, checked before anything is changed.
fn check_server(c: &mut Client) -> Result<(), PgError> {
    let level: String = c
        .query_one("SHOW wal_level", &[])
        .map_err(sql("reading wal_level"))?
        .get(0);
    if level != "logical" {
        return Err(PgError::Setup(format!(
            "capture: logical needs wal_level = logical, and this server has `{level}`. As a superuser: ALTER SYSTEM SET wal_level = logical; then restart PostgreSQL (or use capture: triggers)"
        )));
    }
    let (user, allowed): (String, bool) = {
        let r = c
            .query_one(
                "SELECT current_user::text, rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user",
                &[],
            )
            .map_err(sql("reading the role"))?;
        (r.get(0), r.get(1))
    };
    if !allowed {
        return Err(PgError::Setup(format!(
            "capture: logical needs a role with REPLICATION; as a superuser: ALTER ROLE {} REPLICATION",
            qi(&user)
        )));
    }
    Ok(())
}

/// `tether agent install` with `capture: logical`: the tether schema, `REPLICA IDENTITY FULL`
/// on the synced tables, the publication and the slot; capture triggers (of an earlier trigger
/// mode install) are dropped with the tables locked, and the changes they already wrote are not
/// taken twice. Returns the number of captured tables.
pub fn install(conn: &str, tables: &[TableConfig]) -> Result<usize, PgError> {
    let mut c = connect(conn)?;
    check_server(&mut c)?;
    let up: Vec<&TableConfig> = tables.iter().filter(|t| t.direction.up()).collect();
    let mut tx = c.transaction().map_err(sql("begin"))?;
    tx.batch_execute(BASE_SCHEMA)
        .map_err(sql("creating tether schema"))?;
    for t in tables {
        check_table(&mut tx, t)?;
    }
    for t in &up {
        tx.batch_execute(&format!(
            "ALTER TABLE {} REPLICA IDENTITY FULL",
            qq(&t.table)
        ))
        .map_err(sql("setting REPLICA IDENTITY FULL"))?;
    }
    let list = up
        .iter()
        .map(|t| qq(&t.table))
        .collect::<Vec<_>>()
        .join(", ");
    let exists: bool = tx
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = $1)",
            &[&PUBLICATION],
        )
        .map_err(sql("reading publications"))?
        .get(0);
    let stmt = match (exists, list.is_empty()) {
        (true, false) => format!("ALTER PUBLICATION {} SET TABLE {list}", qi(PUBLICATION)),
        (true, true) => format!(
            "DROP PUBLICATION {p}; CREATE PUBLICATION {p}",
            p = qi(PUBLICATION)
        ),
        (false, false) => format!("CREATE PUBLICATION {} FOR TABLE {list}", qi(PUBLICATION)),
        (false, true) => format!("CREATE PUBLICATION {}", qi(PUBLICATION)),
    };
    tx.batch_execute(&stmt)
        .map_err(sql("creating the publication"))?;
    let source_id: i64 = tx
        .query_one(
            "SELECT value FROM tether.state WHERE name = 'source_id'",
            &[],
        )
        .map_err(sql("reading source id"))?
        .get(0);
    let had_position: bool = tx
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM tether.state WHERE name = 'logical_lsn')",
            &[],
        )
        .map_err(sql("reading the capture position"))?
        .get(0);
    tx.commit().map_err(sql("commit"))?;

    // A slot cannot be created in a transaction that has written.
    let slot = slot_name(source_id);
    let slot_existed: bool = c
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = $1)",
            &[&slot],
        )
        .map_err(sql("reading replication slots"))?
        .get(0);
    if !slot_existed {
        c.execute(
            "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
            &[&slot],
        )
        .map_err(sql("creating the replication slot"))?;
    }

    let mut tx = c.transaction().map_err(sql("begin"))?;
    tx.batch_execute("SET LOCAL lock_timeout = '30s'")
        .map_err(sql("lock_timeout"))?;
    if !list.is_empty() {
        tx.batch_execute(&format!("LOCK TABLE {list} IN SHARE ROW EXCLUSIVE MODE"))
            .map_err(sql(
                "locking the synced tables (a transaction held them for 30 s; retry when it ends)",
            ))?;
    }
    for t in tables {
        tx.batch_execute(&trigger_sql(t)[0])
            .map_err(sql("dropping trigger"))?;
    }
    tx.execute(
        "INSERT INTO tether.state (name, value, text_value) VALUES ('logical_slot', 0, $1) \
         ON CONFLICT (name) DO UPDATE SET text_value = EXCLUDED.text_value",
        &[&slot],
    )
    .map_err(sql("saving the slot name"))?;
    // Everything that committed before this point was written by the triggers (or is older
    // than the slot): the pump starts after it. A re-install over a live slot keeps its place.
    if !(had_position && slot_existed) {
        if had_position {
            log::warn!(target: "error", "event=capture_slot_recreated slot={slot} note=\"the replication slot was missing: changes committed while it was gone are not captured; run `tether agent snapshot`\"");
        }
        tx.execute(
            "INSERT INTO tether.state (name, value) VALUES ('logical_lsn', (pg_current_wal_insert_lsn() - '0/0')::int8) \
             ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value",
            &[],
        )
        .map_err(sql("saving the capture position"))?;
    }
    tx.commit().map_err(sql("commit"))?;
    Ok(up.len())
}

/// The slot of a logical install in this database, if any.
pub fn installed_slot(c: &mut impl postgres::GenericClient) -> Result<Option<String>, PgError> {
    let has_state: bool = c
        .query_one("SELECT to_regclass('tether.state') IS NOT NULL", &[])
        .map_err(sql("reading the tether schema"))?
        .get(0);
    if !has_state {
        return Ok(None);
    }
    let slot: Option<String> = c
        .query_opt(
            "SELECT s.text_value FROM tether.state s JOIN pg_replication_slots r ON r.slot_name = s.text_value \
             WHERE s.name = 'logical_slot'",
            &[],
        )
        .map_err(sql("reading the slot"))?
        .and_then(|r| r.get(0));
    Ok(slot)
}

/// After the capture triggers are back (`upto`: a WAL position taken with the tables locked,
/// after the triggers were created), moves what the slot still holds into the outbox and drops
/// the slot and the publication.
pub fn retire(conn: &str, tables: &[TableConfig], upto: u64) -> Result<(), PgError> {
    let mut c = connect(conn)?;
    if let Some(slot) = installed_slot(&mut c)? {
        let mut pump = Pump::new(slot.clone(), tables, u64::MAX);
        loop {
            let p = pump.pump(&mut c, Some(upto)).map_err(|e| PgError::Sql {
                context: "moving the slot's last changes to the outbox".into(),
                message: e.to_string(),
            })?;
            if p.transactions == 0 {
                break;
            }
        }
        drop_slot(&mut c, &slot)?;
    }
    drop_publication(&mut c)?;
    c.batch_execute("DELETE FROM tether.state WHERE name IN ('logical_lsn', 'logical_slot')")
        .map_err(sql("clearing the capture position"))?;
    Ok(())
}

pub fn drop_slot(c: &mut Client, slot: &str) -> Result<(), PgError> {
    c.execute(
        "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1",
        &[&slot],
    )
    .map(|_| ())
    .map_err(sql("dropping the replication slot"))
}

pub fn drop_publication(c: &mut Client) -> Result<(), PgError> {
    c.batch_execute(&format!("DROP PUBLICATION IF EXISTS {}", qi(PUBLICATION)))
        .map_err(sql("dropping the publication"))
}

/// The statement the applier runs in each transaction in logical mode.
pub fn apply_marker_sql() -> String {
    format!(
        "SELECT pg_logical_emit_message(true, {}, '')",
        ql(APPLY_MARKER)
    )
}

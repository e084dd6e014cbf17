//! PostgreSQL adapter (`postgres` crate, called from the blocking pool).
//!
//! Installed in schema `tether`: `outbox` (bigserial `seq`, the writing transaction's
//! `txid`), `state` (checkpoint, snapshot cursors), `inbox`, `conflicts`, and the PL/pgSQL
//! trigger function `tether.capture()` attached to each synced table. The applier sets
//! `set_config('tether.apply', '1', true)` (transaction-local) and the trigger skips its rows.
//!
//! ## Commit-order safety
//! Sequence values are handed out in insert order, not commit order: a transaction can hold
//! seq 5 uncommitted while seq 6 is already visible. Reading `seq > cursor` naively would skip 5
//! for ever. Filtering on `txid < xmin` of the snapshot is not enough either: a snapshot's
//! `xmin`/`xmax` only bound transactions up to the latest *completed* one, so a transaction that
//! took its txid after the last completion is invisible to both. So the reader takes rows in
//! seq order and stops at the first hole. When it first sees a hole it draws a fresh txid `N`
//! (`pg_current_xact_id()` in its own tiny transaction): the hole's owner took its txid before
//! the hole's seq, hence before `N`. The hole is passed over only once no transaction older
//! than `N` that may belong to this database is still running ([`OUR_XMIN`]: transactions of
//! other databases on the same server do not hold a clinic back). Holes left by rolled-back
//! transactions are thus skipped after a short delay, and no committed row is ever skipped.
//! Every hole in a read gets its `N` when it is first seen, so a change waits at most as long
//! as the transactions that were open when it committed, however many holes come before it.

use std::collections::HashMap;
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use postgres::{Client, IsolationLevel, NoTls};
use serde_json::{Map, Value};
use tether_actors::ports::{ApplyOutcome, ChangeSink, ChangeSource, Checkpoint, PortError};
use tether_schemas::{Event, Op, Update, UpdateOp, UpdateStatus};

use super::values::{self, BinaryForm, ColumnTypes, EntityTypes, ValueType};
use super::{compare_versions, quote_ident as qi, quote_literal as ql, quote_qualified as qq};
use crate::config::{ConflictPolicy, TableConfig};

pub mod logical;
pub mod pgoutput;
pub mod queries;

#[derive(Debug, thiserror::Error)]
pub enum PgError {
    #[error("connecting to PostgreSQL: {0}")]
    Connect(String),
    #[error("table `{0}` (agent.tables) does not exist")]
    NoTable(String),
    #[error("table `{table}`: key column `{column}` does not exist")]
    NoColumn { table: String, column: String },
    #[error("table `{table}`: key [{key}] is not the primary key or a unique index; updates need it to be unique")]
    KeyNotUnique { table: String, key: String },
    #[error("{context}: {message}")]
    Sql { context: String, message: String },
    /// The server is not set up for what the configuration asks (with what to do).
    #[error("{0}")]
    Setup(String),
}

/// A driver error in words: the server's SQLSTATE, message and hint (the driver's own text is
/// "db error"); DETAIL is left out, as it can quote row values.
pub fn pg_error_text(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(d) => {
            let mut s = format!("{} (SQLSTATE {})", d.message(), d.code().code());
            if let Some(h) = d.hint() {
                s.push_str(&format!("; hint: {h}"));
            }
            s
        }
        None => {
            // A connection error: the driver's text and its causes (refused, TLS, auth).
            let mut s = e.to_string();
            let mut cause = std::error::Error::source(e);
            while let Some(c) = cause {
                s.push_str(&format!(": {c}"));
                cause = c.source();
            }
            s
        }
    }
}

fn sql(context: &str) -> impl FnOnce(postgres::Error) -> PgError + '_ {
    move |e| PgError::Sql {
        context: context.to_string(),
        message: pg_error_text(&e),
    }
}

fn port(context: &str) -> impl FnOnce(postgres::Error) -> PortError + '_ {
    move |e| PortError::new(format!("{context}: {}", pg_error_text(&e)))
}

/// The one-agent lock on a PostgreSQL clinic database: a session advisory lock held by a
/// connection of its own for as long as the agent runs (see [`crate::db::instance`]). The
/// server releases it when that session ends, however the agent ends. (A lost connection loses
/// the lock too; it is not taken again until the agent restarts.)
pub struct PgInstanceLock {
    _conn: PgConn,
}

/// The lock's key: the two-int form, apart from the outbox writer's one-bigint locks.
const INSTANCE_LOCK: (i32, i32) = (7474, 1);

/// Takes the clinic database's one-agent lock, waiting up to `wait` for a holder to let go;
/// refuses naming the holder (its `application_name`: host and pid, address, since when).
pub fn lock_instance(
    conn: &str,
    wait: Duration,
) -> Result<PgInstanceLock, crate::db::instance::InstanceError> {
    use crate::db::instance::InstanceError;
    let db_err = |e: PortError| InstanceError::Database(e.to_string());
    let c = PgConn::open(conn).map_err(|e| InstanceError::Database(e.to_string()))?;
    let me = crate::db::instance::short_holder();
    c.with(move |cl| {
        cl.execute("SELECT set_config('application_name', $1, false)", &[&me])
            .map(|_| ())
            .map_err(port("naming the lock's session"))
    })
    .map_err(db_err)?;
    let deadline = std::time::Instant::now() + wait;
    loop {
        let got = c
            .with(|cl| {
                cl.query_one(
                    "SELECT pg_try_advisory_lock($1, $2)",
                    &[&INSTANCE_LOCK.0, &INSTANCE_LOCK.1],
                )
                .map(|r| r.get::<_, bool>(0))
                .map_err(port("taking the one-agent lock"))
            })
            .map_err(db_err)?;
        if got {
            return Ok(PgInstanceLock { _conn: c });
        }
        if std::time::Instant::now() >= deadline {
            let holder = c
                .with(|cl| {
                    cl.query_opt(
                        "SELECT a.application_name, coalesce(host(a.client_addr), 'local socket'), \
                         to_char(a.backend_start AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"') \
                         FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
                         WHERE l.locktype = 'advisory' AND l.classid = $1::int::oid AND l.objid = $2::int::oid \
                         AND l.objsubid = 2 AND l.granted \
                         AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())",
                        &[&INSTANCE_LOCK.0, &INSTANCE_LOCK.1],
                    )
                    .map(|r| {
                        r.map(|r| {
                            format!(
                                "{} from {}, since {}",
                                r.get::<_, Option<String>>(0).unwrap_or_default(),
                                r.get::<_, String>(1),
                                r.get::<_, String>(2)
                            )
                        })
                    })
                    .map_err(port("naming the lock's holder"))
                })
                .map_err(db_err)?;
            return Err(InstanceError::Held {
                holder: holder.unwrap_or_else(|| "holder gone meanwhile: try again".into()),
            });
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub fn connect(conn: &str) -> Result<Client, PgError> {
    Client::connect(conn, NoTls).map_err(|e| PgError::Connect(e.to_string()))
}

type Job = Box<dyn FnOnce(Result<&mut Client, PortError>) + Send>;

/// Reconnect delays after a lost connection: from this…
const RECONNECT_INITIAL: Duration = Duration::from_millis(100);
/// …doubling up to this.
const RECONNECT_MAX: Duration = Duration::from_secs(5);

/// A connection owned by its own thread. `postgres::Client` drives a private runtime and
/// blocks inside it, which tokio forbids on any runtime thread (spawn_blocking included); so
/// each port's client lives on a plain thread and calls are shipped to it. Dropping the
/// handle ends the thread, which closes the connection.
///
/// A lost connection (server restart, `pg_terminate_backend`, network) heals: the call that
/// met the loss fails, and the next call reconnects — at most once per backoff delay (0.1 s
/// doubling to 5 s), failing fast in between — so callers keep their own retry pace. The outage
/// is logged once when it starts and once when it ends.
pub struct PgConn {
    tx: Mutex<mpsc::Sender<Job>>,
    conn: String,
}

/// The connection thread's state.
struct Link {
    conn: String,
    client: Option<Client>,
    /// When the connection was found lost (for the log line at its end).
    down_since: Option<std::time::Instant>,
    next_try: std::time::Instant,
    delay: Duration,
}

impl Link {
    /// The live client, reconnecting first if the last one was lost and a try is due.
    fn client(&mut self) -> Result<&mut Client, PortError> {
        let now = std::time::Instant::now();
        if self.client.as_ref().is_some_and(|c| c.is_closed()) {
            self.client = None;
            self.down_since = Some(now);
            self.next_try = now;
            self.delay = RECONNECT_INITIAL;
            log::warn!(target: "error", "event=database_connection_lost engine=postgres action=reconnecting");
        }
        if self.client.is_none() {
            if now < self.next_try {
                return Err(PortError::new(format!(
                    "PostgreSQL connection lost; reconnecting (next try in {} ms)",
                    self.next_try.saturating_duration_since(now).as_millis()
                )));
            }
            match connect(&self.conn) {
                Ok(c) => {
                    let outage = self.down_since.take().map(|t| t.elapsed().as_millis());
                    log::warn!(target: "error", "event=database_reconnected engine=postgres outage_ms={}", outage.unwrap_or(0));
                    self.delay = RECONNECT_INITIAL;
                    self.client = Some(c);
                }
                Err(e) => {
                    self.next_try = now + self.delay;
                    self.delay = (self.delay * 2).min(RECONNECT_MAX);
                    return Err(PortError::new(format!(
                        "PostgreSQL unreachable (reconnecting): {e}"
                    )));
                }
            }
        }
        self.client
            .as_mut()
            .ok_or_else(|| PortError::new("PostgreSQL connection lost"))
    }
}

impl PgConn {
    pub fn open(conn: &str) -> Result<Self, PgError> {
        let client = connect(conn)?;
        Ok(PgConn {
            tx: Mutex::new(Self::spawn(conn, Some(client))?),
            conn: conn.to_string(),
        })
    }

    /// The connection's thread (with `client`, or connecting on its first call).
    fn spawn(conn: &str, client: Option<Client>) -> Result<mpsc::Sender<Job>, PgError> {
        let (tx, rx) = mpsc::channel::<Job>();
        let mut link = Link {
            conn: conn.to_string(),
            down_since: None,
            next_try: std::time::Instant::now(),
            delay: RECONNECT_INITIAL,
            client,
        };
        std::thread::Builder::new()
            .name("pg-conn".into())
            .spawn(move || {
                while let Ok(job) = rx.recv() {
                    job(link.client());
                }
            })
            .map_err(|e| PgError::Connect(e.to_string()))?;
        Ok(tx)
    }

    /// Runs `f` with the client on the connection's thread and waits for the result. A thread
    /// that died (a panic in a call) is replaced at once — the call that met it fails — and the
    /// restart is logged.
    pub fn with<T, F>(&self, f: F) -> Result<T, PortError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Client) -> Result<T, PortError> + Send + 'static,
    {
        let (rtx, rrx) = mpsc::channel();
        let job: Job = Box::new(move |c: Result<&mut Client, PortError>| {
            let _ = rtx.send(c.and_then(f));
        });
        let mut tx = self.tx.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(mpsc::SendError(job)) = tx.send(job) {
            log::error!(target: "error", "event=database_port_restarted engine=postgres reason=\"its connection thread had stopped\"");
            *tx = Self::spawn(&self.conn, None)
                .map_err(|e| PortError::new(format!("restarting the PostgreSQL port: {e}")))?;
            tx.send(job)
                .map_err(|_| PortError::new("PostgreSQL connection thread stopped"))?;
        }
        drop(tx);
        match rrx.recv() {
            Ok(r) => r,
            Err(_) => {
                // The thread died in this call (it may still be unwinding, its queue open):
                // replace it now, so that the next call reaches a live one.
                log::error!(target: "error", "event=database_port_restarted engine=postgres reason=\"its connection thread stopped during a call\"");
                let fresh = Self::spawn(&self.conn, None)
                    .map_err(|e| PortError::new(format!("restarting the PostgreSQL port: {e}")))?;
                *self.tx.lock().unwrap_or_else(|p| p.into_inner()) = fresh;
                Err(PortError::new(
                    "PostgreSQL connection thread stopped during the call; it has been restarted",
                ))
            }
        }
    }
}

pub const BASE_SCHEMA: &str = r#"
CREATE SCHEMA IF NOT EXISTS tether;
CREATE TABLE IF NOT EXISTS tether.outbox (
    seq bigserial PRIMARY KEY,
    txid xid8 NOT NULL DEFAULT pg_current_xact_id(),
    entity text NOT NULL,
    op text NOT NULL,
    key_json jsonb NOT NULL,
    row_json jsonb,
    committed_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE TABLE IF NOT EXISTS tether.state (name text PRIMARY KEY, value bigint NOT NULL, text_value text);
INSERT INTO tether.state (name, value) VALUES ('source_id', 1 + floor(random() * 9007199254740990)::bigint) ON CONFLICT (name) DO NOTHING;
CREATE TABLE IF NOT EXISTS tether.inbox (
    update_id text PRIMARY KEY,
    status text NOT NULL,
    reason text,
    applied_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS tether.conflicts (
    id bigserial PRIMARY KEY,
    update_id text NOT NULL,
    entity text NOT NULL,
    key_json jsonb NOT NULL,
    policy text NOT NULL,
    reason text NOT NULL,
    cloud_row jsonb,
    at timestamptz NOT NULL DEFAULT now()
);
CREATE OR REPLACE FUNCTION tether.capture() RETURNS trigger LANGUAGE plpgsql AS $fn$
DECLARE
    ent text := TG_ARGV[0];
    k text;
    newkey jsonb := '{}'::jsonb;
    oldkey jsonb := '{}'::jsonb;
    newrow jsonb;
    oldrow jsonb;
BEGIN
    IF current_setting('tether.apply', true) = '1' THEN
        RETURN NULL;
    END IF;
    IF TG_OP <> 'DELETE' THEN
        newrow := to_jsonb(NEW);
        FOR k IN SELECT jsonb_array_elements_text(TG_ARGV[1]::jsonb) LOOP
            newkey := newkey || jsonb_build_object(k, newrow -> k);
        END LOOP;
    END IF;
    IF TG_OP <> 'INSERT' THEN
        oldrow := to_jsonb(OLD);
        FOR k IN SELECT jsonb_array_elements_text(TG_ARGV[1]::jsonb) LOOP
            oldkey := oldkey || jsonb_build_object(k, oldrow -> k);
        END LOOP;
    END IF;
    IF TG_OP = 'INSERT' THEN
        INSERT INTO tether.outbox (entity, op, key_json, row_json) VALUES (ent, 'insert', newkey, newrow);
    ELSIF TG_OP = 'UPDATE' THEN
        IF oldkey IS DISTINCT FROM newkey THEN
            INSERT INTO tether.outbox (entity, op, key_json, row_json) VALUES (ent, 'delete', oldkey, oldrow);
        END IF;
        INSERT INTO tether.outbox (entity, op, key_json, row_json) VALUES (ent, 'update', newkey, newrow);
    ELSE
        INSERT INTO tether.outbox (entity, op, key_json, row_json) VALUES (ent, 'delete', oldkey, oldrow);
    END IF;
    RETURN NULL;
END
$fn$;
"#;

/// The trigger DDL for one table (also printed by `tether agent install --dry-run`).
pub fn trigger_sql(t: &TableConfig) -> Vec<String> {
    let keys = serde_json::to_string(&t.key).unwrap_or_else(|_| "[]".into());
    vec![
        format!("DROP TRIGGER IF EXISTS tether_capture ON {}", qq(&t.table)),
        format!(
            "CREATE TRIGGER tether_capture AFTER INSERT OR UPDATE OR DELETE ON {} FOR EACH ROW EXECUTE FUNCTION tether.capture({}, {})",
            qq(&t.table),
            ql(&t.entity),
            ql(&keys)
        ),
    ]
}

fn split(table: &str) -> (String, String) {
    match table.split_once('.') {
        Some((s, t)) => (s.to_string(), t.to_string()),
        None => ("public".to_string(), table.to_string()),
    }
}

/// A table's columns in order, with their `information_schema` data types.
fn typed_columns(
    c: &mut impl postgres::GenericClient,
    table: &str,
) -> Result<Vec<(String, String)>, postgres::Error> {
    let (schema, name) = split(table);
    let rows = c.query(
        "SELECT column_name::text, data_type::text FROM information_schema.columns WHERE table_schema = $1 AND table_name = $2 ORDER BY ordinal_position",
        &[&schema, &name],
    )?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

fn columns(
    c: &mut impl postgres::GenericClient,
    table: &str,
) -> Result<Vec<String>, postgres::Error> {
    Ok(typed_columns(c, table)?
        .into_iter()
        .map(|(n, _)| n)
        .collect())
}

/// A mapped table's wire types (`values`): declared types, config overrides on top.
fn wire_types(cfg: &TableConfig, cols: &[(String, String)]) -> ColumnTypes {
    ColumnTypes::new(
        cols.iter()
            .map(|(n, ty)| (n.clone(), ValueType::of_postgres(ty))),
        &cfg.types,
    )
}

/// The table exists, has the configured key columns, and — for a table cloud updates are
/// applied to — the key is its primary key or a unique index (else an upsert could touch two
/// rows, or none it should).
fn check_table(c: &mut impl postgres::GenericClient, t: &TableConfig) -> Result<(), PgError> {
    let cols = columns(c, &t.table).map_err(sql("reading columns"))?;
    if cols.is_empty() {
        return Err(PgError::NoTable(t.table.clone()));
    }
    if let Some(k) = t.key.iter().find(|k| !cols.contains(k)) {
        return Err(PgError::NoColumn {
            table: t.table.clone(),
            column: k.clone(),
        });
    }
    if t.direction.down() && !key_is_unique(c, t)? {
        return Err(PgError::KeyNotUnique {
            table: t.table.clone(),
            key: t.key.join(", "),
        });
    }
    Ok(())
}

/// A unique index (the primary key's included) whose key columns are exactly `t.key`.
fn key_is_unique(c: &mut impl postgres::GenericClient, t: &TableConfig) -> Result<bool, PgError> {
    let (schema, name) = split(&t.table);
    let mut want: Vec<String> = t.key.clone();
    want.sort();
    let row = c
        .query_one(
            "SELECT EXISTS (
               SELECT 1 FROM pg_index i
               JOIN pg_class r ON r.oid = i.indrelid
               JOIN pg_namespace n ON n.oid = r.relnamespace
               WHERE n.nspname = $1 AND r.relname = $2 AND i.indisunique AND i.indpred IS NULL
                 AND (SELECT array_agg(a.attname::text ORDER BY a.attname::text)
                      FROM pg_attribute a
                      WHERE a.attrelid = i.indrelid
                        AND a.attnum = ANY ((i.indkey::int2[])[0:i.indnkeyatts - 1])) = $3::text[])",
            &[&schema, &name, &want],
        )
        .map_err(sql("reading indexes"))?;
    Ok(row.get(0))
}

/// `tether check-config --connect`: every mapped table checked as `install` would, each
/// problem on its own; and whether the capture objects are installed.
pub fn check(conn: &str, tables: &[TableConfig]) -> Result<(Vec<String>, bool), PgError> {
    let mut c = connect(conn)?;
    let mut tx = c
        .build_transaction()
        .read_only(true)
        .start()
        .map_err(sql("begin"))?;
    let mut problems = Vec::new();
    for t in tables {
        if let Err(e) = check_table(&mut tx, t) {
            problems.push(e.to_string());
        } else if !t.types.is_empty() {
            let cols = columns(&mut tx, &t.table).map_err(sql("reading columns"))?;
            problems.extend(values::unknown_typed_columns(t, cols.iter()));
        }
    }
    let installed: bool = tx
        .query_one("SELECT to_regclass('tether.outbox') IS NOT NULL", &[])
        .map_err(sql("looking for the tether schema"))?
        .get(0);
    Ok((problems, installed))
}

/// Creates (idempotently) the tether schema and the capture trigger of every `up` table.
pub fn install(conn: &str, tables: &[TableConfig]) -> Result<usize, PgError> {
    let mut c = connect(conn)?;
    let mut tx = c.transaction().map_err(sql("begin"))?;
    tx.batch_execute(BASE_SCHEMA)
        .map_err(sql("creating tether schema"))?;
    let mut triggers = 0;
    for t in tables {
        check_table(&mut tx, t)?;
        let ddl = trigger_sql(t);
        tx.batch_execute(&ddl[0]).map_err(sql("dropping trigger"))?;
        if t.direction.up() {
            tx.batch_execute(&ddl[1]).map_err(sql("creating trigger"))?;
            triggers += 1;
        }
    }
    // Back from logical capture: what committed before the triggers (whose tables they keep
    // locked until this commits) is still in the slot, and is moved to the outbox before the
    // slot goes.
    let slot = logical::installed_slot(&mut tx)?;
    let upto: Option<i64> = match slot {
        Some(_) => Some(
            tx.query_one("SELECT (pg_current_wal_insert_lsn() - '0/0')::int8", &[])
                .map_err(sql("reading the WAL position"))?
                .get(0),
        ),
        None => None,
    };
    tx.commit().map_err(sql("commit"))?;
    if let Some(upto) = upto {
        logical::retire(conn, tables, upto as u64)?;
    }
    Ok(triggers)
}

/// Drops the tether schema (outbox, state, inbox, conflicts, function) and every trigger.
pub fn uninstall(conn: &str, tables: &[TableConfig]) -> Result<(), PgError> {
    let mut c = connect(conn)?;
    if let Some(slot) = logical::installed_slot(&mut c)? {
        logical::drop_slot(&mut c, &slot)?;
    }
    logical::drop_publication(&mut c)?;
    let mut tx = c.transaction().map_err(sql("begin"))?;
    for t in tables {
        let (schema, name) = split(&t.table);
        let exists: bool = tx
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM information_schema.tables WHERE table_schema = $1 AND table_name = $2)",
                &[&schema, &name],
            )
            .map_err(sql("checking table"))?
            .get(0);
        if exists {
            tx.batch_execute(&trigger_sql(t)[0])
                .map_err(sql("dropping trigger"))?;
        }
    }
    tx.batch_execute("DROP SCHEMA IF EXISTS tether CASCADE")
        .map_err(sql("dropping schema"))?;
    tx.commit().map_err(sql("commit"))
}

const READ: &str = "SELECT seq, entity, op, key_json::text, row_json::text, \
    to_char(committed_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"') \
    FROM tether.outbox WHERE seq > $1 ORDER BY seq LIMIT $2";

/// The oldest transaction still running in this snapshot that may belong to this database:
/// the snapshot's in-progress transactions, less those positively seen in another database
/// (a backend of another database, or a transaction prepared there), or the snapshot's `xmax`
/// when none is left. A transaction whose database cannot be seen (statistics not visible to
/// this role, or the transaction ended meanwhile) counts as ours: the rule can only wait
/// longer, never skip a row.
const OUR_XMIN: &str = "SELECT coalesce(
    (SELECT min(x::text::bigint) FROM pg_snapshot_xip(pg_current_snapshot()) AS x
      WHERE (x::text::bigint % 4294967296) NOT IN (
        SELECT backend_xid::text::bigint FROM pg_stat_activity
         WHERE backend_xid IS NOT NULL AND datname IS DISTINCT FROM current_database()
        UNION ALL
        SELECT transaction::text::bigint FROM pg_prepared_xacts
         WHERE database <> current_database())),
    pg_snapshot_xmax(pg_current_snapshot())::text::bigint)";

/// Reads the outbox ([`ChangeSource`]) in commit-safe order (see the module doc).
pub struct PgSource {
    client: PgConn,
    /// Missing seqs, with the txid drawn when each was first seen.
    holes: Arc<Mutex<Holes>>,
    /// Logical capture: the pump that fills the outbox from the slot before each read.
    logical: Option<Arc<Mutex<logical::Pump>>>,
    slot_gauge: Option<Arc<logical::SlotGauge>>,
    types: Arc<EntityTypes>,
}

impl PgSource {
    /// The trigger mode's reader.
    pub fn open(conn: &str, tables: &[TableConfig]) -> Result<Self, PgError> {
        Ok(PgSource {
            client: PgConn::open(conn)?,
            holes: Arc::new(Mutex::new(Holes::default())),
            logical: None,
            slot_gauge: None,
            types: Arc::new(EntityTypes::new(tables)),
        })
    }

    /// The logical mode's reader (`capture: logical`); `warn_bytes`: the slot's retained WAL
    /// that is worth a warning.
    pub fn open_logical(
        conn: &str,
        tables: &[TableConfig],
        warn_bytes: u64,
    ) -> Result<Self, PgError> {
        let mut c = connect(conn)?;
        let slot = logical::installed_slot(&mut c)?.ok_or_else(|| {
            PgError::Setup(
                "capture: logical, but this database has no Tether replication slot: run `tether agent install`"
                    .into(),
            )
        })?;
        drop(c);
        let pump = logical::Pump::new(slot, tables, warn_bytes);
        let gauge = pump.gauge();
        Ok(PgSource {
            client: PgConn::open(conn)?,
            holes: Arc::new(Mutex::new(Holes::default())),
            logical: Some(Arc::new(Mutex::new(pump))),
            slot_gauge: Some(gauge),
            types: Arc::new(EntityTypes::new(tables)),
        })
    }
}

/// An outbox column's JSON text as an object in the wire form (`values`).
fn obj(
    text: &str,
    types: &ColumnTypes,
    what: &str,
    seq: i64,
) -> Result<Map<String, Value>, PortError> {
    types
        .parse_wire(text, BinaryForm::PgHex)
        .map_err(|e| PortError::new(format!("outbox seq={seq}: {what} is not an object: {e}")))
}

impl ChangeSource for PgSource {
    fn change_token(&self) -> Result<u64, PortError> {
        if self.logical.is_some() {
            // Anything flushed to the WAL may be a change to pump.
            let row = self.client.with(|c| {
                c.query_one(
                    "SELECT (SELECT last_value FROM tether.outbox_seq_seq), (pg_current_wal_flush_lsn() - '0/0')::int8",
                    &[],
                )
                .map_err(port("reading change token"))
            })?;
            let (a, b): (i64, i64) = (row.get(0), row.get(1));
            return Ok((a as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ b as u64);
        }
        // New seqs, or a finished transaction of this database ([`OUR_XMIN`] moves): either
        // can make rows readable.
        let row = self.client.with(|c| {
            c.query_one(
                &format!("SELECT (SELECT last_value FROM tether.outbox_seq_seq), ({OUR_XMIN})"),
                &[],
            )
            .map_err(port("reading change token"))
        })?;
        let (a, b): (i64, i64) = (row.get(0), row.get(1));
        Ok((a as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ b as u64)
    }

    /// Everything committed after `after`, counted in the table — not what the reader may pass
    /// yet: a change held back behind a hole is still waiting, and `status` must say so.
    fn backlog(&self, after: u64) -> Result<tether_actors::ports::Backlog, PortError> {
        if let Some(pump) = self.logical.clone() {
            // The status reader has its own source: it measures the slot without pumping.
            self.client.with(move |c| {
                pump.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .measure(c, false)
            })?;
        }
        let row = self.client.with(move |c| {
            c.query_one(
                "SELECT count(*), to_char(min(committed_at) AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"') \
                 FROM tether.outbox WHERE seq > $1",
                &[&(after as i64)],
            )
            .map_err(port("counting the outbox"))
        })?;
        let (events, oldest): (i64, Option<String>) = (row.get(0), row.get(1));
        Ok(tether_actors::ports::Backlog {
            events: events.max(0) as u64,
            at_least: false,
            oldest_committed_at: oldest,
            capture_retained_bytes: self.slot_gauge.as_ref().and_then(|g| g.retained_bytes()),
        })
    }

    fn read_after(&self, after: u64, limit: usize) -> Result<Vec<Event>, PortError> {
        let types = self.types.clone();
        if let Some(pump) = self.logical.clone() {
            return self.client.with(move |c| {
                pump.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .pump(c, None)?;
                // One writer at a time (the pump, snapshot chunks): no holes to wait for.
                let rows = c
                    .query(READ, &[&(after as i64), &(limit as i64)])
                    .map_err(port("reading outbox"))?;
                rows.into_iter().map(|r| event_of(c, &types, r)).collect()
            });
        }
        let holes = self.holes.clone();
        self.client.with(move |c| {
            let (xmin, rows) = Self::read_raw(c, after, limit)?;
            Self::sequence(c, &holes, &types, after, xmin, rows)
        })
    }
}

type RawRows = Vec<postgres::Row>;

/// An outbox row (as [`READ`] selects it) as an event, its values in the wire form.
fn event_of(c: &mut Client, types: &EntityTypes, r: postgres::Row) -> Result<Event, PortError> {
    let seq: i64 = r.get(0);
    let op: String = r.get(2);
    let entity: String = r.get(1);
    let t = types.of(&entity, |cfg| {
        typed_columns(c, &cfg.table)
            .map(|cols| wire_types(cfg, &cols))
            .map_err(port("reading column types"))
    })?;
    Ok(Event {
        seq: seq as u64,
        entity,
        op: Op::parse(&op)
            .ok_or_else(|| PortError::new(format!("outbox seq={seq}: unknown op `{op}`")))?,
        key: obj(r.get(3), &t, "key_json", seq)?,
        row: r
            .get::<_, Option<&str>>(4)
            .map(|v| obj(v, &t, "row_json", seq))
            .transpose()?,
        committed_at: r.get(5),
    })
}

impl PgSource {
    fn read_raw(c: &mut Client, after: u64, limit: usize) -> Result<(i64, RawRows), PortError> {
        let mut tx = c
            .build_transaction()
            .isolation_level(IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .map_err(port("begin"))?;
        let xmin: i64 = tx
            .query_one(OUR_XMIN, &[])
            .map_err(port("reading snapshot"))?
            .get(0);
        let rows = tx
            .query(READ, &[&(after as i64), &(limit as i64)])
            .map_err(port("reading outbox"))?;
        tx.commit().map_err(port("commit"))?;
        Ok((xmin, rows))
    }

    /// Keeps the rows up to the first hole that a running transaction may still fill.
    fn sequence(
        c: &mut Client,
        holes: &Mutex<Holes>,
        types: &EntityTypes,
        after: u64,
        xmin: i64,
        rows: RawRows,
    ) -> Result<Vec<Event>, PortError> {
        let mut holes = holes.lock().unwrap_or_else(|p| p.into_inner());
        holes.forget_through(after as i64);
        // Every missing seq in this window gets its txid now, when it is first seen — not when
        // the reader reaches it, and not when the seqs before it fill: a missing seq waits only
        // for the transactions that were running when it appeared, so overlapping long
        // transactions do not add up one hole after another.
        let mut gaps = Vec::new();
        let mut expected = after as i64 + 1;
        for r in &rows {
            let seq: i64 = r.get(0);
            if seq != expected {
                gaps.push((expected, seq - 1));
            }
            expected = seq + 1;
        }
        let fresh: Vec<(i64, i64)> = gaps
            .iter()
            .flat_map(|(a, b)| holes.uncovered(*a, *b))
            .collect();
        if !fresh.is_empty() {
            let n: i64 = c
                .query_one("SELECT pg_current_xact_id()::text::bigint", &[])
                .map_err(port("drawing a txid"))?
                .get(0);
            for (a, b) in fresh {
                holes.insert(a, b, n);
            }
        }
        let mut expected = after as i64 + 1;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            let seq: i64 = r.get(0);
            if seq != expected {
                // A transaction of this database older than any missing seq may still fill it.
                match holes.watermark(expected, seq - 1) {
                    Some(w) if xmin >= w => {}
                    _ => break,
                }
            }
            out.push(event_of(c, types, r)?);
            expected = seq + 1;
        }
        Ok(out)
    }
}

/// Missing outbox seqs, as ranges, each with the txid drawn when it was first seen missing.
#[derive(Debug, Default)]
pub struct Holes {
    /// start → (end, txid), non-overlapping.
    ranges: std::collections::BTreeMap<i64, (i64, i64)>,
}

impl Holes {
    /// Forgets the seqs up to `after` (read past).
    pub fn forget_through(&mut self, after: i64) {
        self.ranges.retain(|_, (end, _)| *end > after);
    }

    /// The ranges overlapping `a..=b`, in order.
    fn overlapping(&self, a: i64, b: i64) -> impl Iterator<Item = (i64, i64, i64)> + '_ {
        self.ranges
            .range(..=b)
            .filter(move |(_, (end, _))| *end >= a)
            .map(|(s, (e, n))| (*s, *e, *n))
    }

    /// The parts of `a..=b` not seen missing before.
    pub fn uncovered(&self, a: i64, b: i64) -> Vec<(i64, i64)> {
        let mut out = Vec::new();
        let mut x = a;
        for (s, e, _) in self.overlapping(a, b) {
            if s > x {
                out.push((x, s - 1));
            }
            x = x.max(e + 1);
        }
        if x <= b {
            out.push((x, b));
        }
        out
    }

    /// Records `a..=b` (not overlapping what is recorded) as first seen missing at txid `n`.
    pub fn insert(&mut self, a: i64, b: i64, n: i64) {
        self.ranges.insert(a, (b, n));
    }

    /// The newest txid among the missing seqs of `a..=b`; `None` if some were never recorded.
    pub fn watermark(&self, a: i64, b: i64) -> Option<i64> {
        if !self.uncovered(a, b).is_empty() {
            return None;
        }
        self.overlapping(a, b).map(|(_, _, n)| n).max()
    }
}

/// Checkpoint and purge ([`Checkpoint`]).
pub struct PgCheckpoint {
    client: PgConn,
}

impl PgCheckpoint {
    pub fn open(conn: &str) -> Result<Self, PgError> {
        Ok(PgCheckpoint {
            client: PgConn::open(conn)?,
        })
    }
}

impl Checkpoint for PgCheckpoint {
    fn load(&self) -> Result<u64, PortError> {
        let row = self.client.with(|c| {
            c.query_opt(
                "SELECT value FROM tether.state WHERE name = 'acked_seq'",
                &[],
            )
            .map_err(port("loading checkpoint (is `tether agent install` done?)"))
        })?;
        Ok(row.map(|r| r.get::<_, i64>(0)).unwrap_or(0) as u64)
    }

    fn save(&self, acked: u64) -> Result<(), PortError> {
        self.client.with(move |c| {
            c.execute(
                "INSERT INTO tether.state (name, value) VALUES ('acked_seq', $1) \
             ON CONFLICT (name) DO UPDATE SET value = GREATEST(tether.state.value, EXCLUDED.value)",
                &[&(acked as i64)],
            )
            .map(|_| ())
            .map_err(port("saving checkpoint"))
        })
    }

    fn purge(&self, acked: u64, retention: Duration) -> Result<usize, PortError> {
        self.client.with(move |c| c.execute(
            "DELETE FROM tether.outbox WHERE seq <= $1 AND committed_at < now() - make_interval(secs => $2)",
            &[&(acked as i64), &(retention.as_secs_f64())],
        )
        .map(|n| n as usize)
        .map_err(port("purging outbox")))
    }
}

struct DownTable {
    cfg: TableConfig,
    columns: Vec<String>,
    types: ColumnTypes,
}

/// Applies cloud updates ([`ChangeSink`]).
pub struct PgSink {
    client: PgConn,
    inner: Arc<SinkInner>,
}

struct SinkInner {
    tables: Vec<TableConfig>,
    cache: Mutex<HashMap<String, Arc<DownTable>>>,
    /// Logical capture: mark each apply transaction so the capture drops it.
    logical: bool,
}

impl PgSink {
    pub fn open(conn: &str, tables: &[TableConfig]) -> Result<Self, PgError> {
        Self::open_with(conn, tables, false)
    }

    /// `logical`: the database is captured by logical decoding (`capture: logical`).
    pub fn open_with(conn: &str, tables: &[TableConfig], logical: bool) -> Result<Self, PgError> {
        Ok(PgSink {
            client: PgConn::open(conn)?,
            inner: Arc::new(SinkInner {
                tables: tables.to_vec(),
                cache: Mutex::new(HashMap::new()),
                logical,
            }),
        })
    }
}

impl SinkInner {
    fn table_for(
        &self,
        c: &mut impl postgres::GenericClient,
        entity: &str,
    ) -> Result<Arc<DownTable>, String> {
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
        let cols = typed_columns(c, &cfg.table).map_err(|e| e.to_string())?;
        if cols.is_empty() {
            return Err(format!("table `{}` does not exist", cfg.table));
        }
        let t = Arc::new(DownTable {
            cfg: cfg.clone(),
            types: wire_types(cfg, &cols),
            columns: cols.into_iter().map(|(n, _)| n).collect(),
        });
        cache.insert(entity.to_string(), t.clone());
        Ok(t)
    }
}

enum Outcome {
    Applied,
    Conflict(&'static str),
}

fn key_json(t: &DownTable, u: &Update) -> Result<Value, String> {
    for k in &t.cfg.key {
        if !u.key.contains_key(k) {
            return Err(format!("key column `{k}` is missing from the update's key"));
        }
    }
    if let Some(extra) = u.key.keys().find(|k| !t.cfg.key.contains(k)) {
        return Err(format!(
            "`{extra}` is not a key column of `{}`",
            t.cfg.table
        ));
    }
    let mut key = u.key.clone();
    to_pg(t, &mut key)?;
    Ok(Value::Object(key))
}

/// Wire-form values as `jsonb_populate_record` reads them: base64 binary as `\x` hex (the
/// rest — booleans, `…Z` timestamps, decimal strings, dates — it reads as they are).
fn to_pg(t: &DownTable, row: &mut Map<String, Value>) -> Result<(), String> {
    for (col, v) in row.iter_mut() {
        if let (Some(ValueType::Binary), Value::String(s)) = (t.types.get(col), &*v) {
            let bytes = values::binary_from_wire(col, s)?;
            *v = Value::String(format!("\\x{}", values::hex_encode(&bytes)));
        }
    }
    Ok(())
}

fn apply_one(
    tx: &mut postgres::Transaction<'_>,
    t: &DownTable,
    u: &Update,
) -> Result<Outcome, String> {
    let e = |e: postgres::Error| e.to_string();
    let key = key_json(t, u)?;
    let table = qq(&t.cfg.table);
    let key_cols: Vec<String> = t.cfg.key.iter().map(|k| qi(k)).collect();
    let key_list = key_cols.join(", ");
    let key_match = format!(
        "({key_list}) = (SELECT {key_list} FROM jsonb_populate_record(NULL::{table}, $1::jsonb))"
    );
    match t.cfg.conflict {
        ConflictPolicy::CloudWins => {}
        ConflictPolicy::ClinicWins => {
            let pending: bool = tx
                .query_one(
                    "SELECT EXISTS (SELECT 1 FROM tether.outbox WHERE entity = $1 AND key_json = $2::jsonb \
                     AND seq > COALESCE((SELECT value FROM tether.state WHERE name = 'acked_seq'), 0))",
                    &[&u.entity, &key],
                )
                .map_err(e)?
                .get(0);
            if pending {
                return Ok(Outcome::Conflict(super::CLINIC_CHANGE_PENDING));
            }
        }
        ConflictPolicy::NewestWins => {
            if let (UpdateOp::Upsert, Some(vc)) = (u.op, t.cfg.version_column.as_deref()) {
                let cloud = u
                    .row
                    .as_ref()
                    .and_then(|r| r.get(vc))
                    .ok_or_else(|| format!("newest_wins needs `{vc}` in the update's row"))?;
                let local: Option<Value> = tx
                    .query_opt(
                        &format!("SELECT to_jsonb({}) FROM {table} WHERE {key_match}", qi(vc)),
                        &[&key],
                    )
                    .map_err(e)?
                    .map(|r| r.get(0));
                if let Some(local) = local {
                    if compare_versions(&local, cloud) == Some(std::cmp::Ordering::Greater) {
                        return Ok(Outcome::Conflict(super::LOCAL_NEWER));
                    }
                }
            }
        }
    }
    match u.op {
        UpdateOp::Delete => {
            tx.execute(&format!("DELETE FROM {table} WHERE {key_match}"), &[&key])
                .map_err(e)?;
        }
        UpdateOp::Upsert => {
            let mut row = u
                .row
                .clone()
                .ok_or_else(|| "upsert without a `row`".to_string())?;
            for (k, v) in &u.key {
                if let Some(rv) = row.get(k) {
                    if rv != v {
                        return Err(format!("`row.{k}` differs from `key.{k}`"));
                    }
                }
                row.insert(k.clone(), v.clone());
            }
            if let Some(bad) = row.keys().find(|c| !t.columns.contains(c)) {
                return Err(format!("`{bad}` is not a column of `{}`", t.cfg.table));
            }
            to_pg(t, &mut row)?;
            let cols: Vec<String> = row.keys().map(|c| qi(c)).collect();
            let sets: Vec<String> = row
                .keys()
                .filter(|c| !t.cfg.key.contains(c))
                .map(|c| format!("{q} = EXCLUDED.{q}", q = qi(c)))
                .collect();
            let action = if sets.is_empty() {
                "DO NOTHING".to_string()
            } else {
                format!("DO UPDATE SET {}", sets.join(", "))
            };
            let stmt = format!(
                "INSERT INTO {table} ({cols}) SELECT {cols} FROM jsonb_populate_record(NULL::{table}, $1::jsonb) ON CONFLICT ({key_list}) {action}",
                cols = cols.join(", ")
            );
            tx.execute(&stmt, &[&Value::Object(row)]).map_err(e)?;
        }
    }
    Ok(Outcome::Applied)
}

impl ChangeSink for PgSink {
    fn apply(&self, u: &Update) -> Result<ApplyOutcome, PortError> {
        let inner = self.inner.clone();
        let u = u.clone();
        self.client.with(move |c| inner.apply_on(c, &u))
    }
}

impl SinkInner {
    fn apply_on(&self, c: &mut Client, u: &Update) -> Result<ApplyOutcome, PortError> {
        let mut tx = c.transaction().map_err(port("begin"))?;
        if let Some(r) = tx
            .query_opt(
                "SELECT status, reason FROM tether.inbox WHERE update_id = $1",
                &[&u.update_id],
            )
            .map_err(port("reading inbox"))?
        {
            let status: String = r.get(0);
            return Ok(ApplyOutcome {
                status: match status.as_str() {
                    "applied" => UpdateStatus::Applied,
                    "conflict" => UpdateStatus::Conflict,
                    _ => UpdateStatus::Failed,
                },
                reason: r.get(1),
                duplicate: true,
            });
        }
        tx.execute("SELECT set_config('tether.apply', '1', true)", &[])
            .map_err(port("setting tether.apply"))?;
        if self.logical {
            tx.execute(&logical::apply_marker_sql(), &[])
                .map_err(port("marking the transaction as Tether's"))?;
        }
        tx.batch_execute("SAVEPOINT tether_apply")
            .map_err(port("savepoint"))?;
        let result = self
            .table_for(&mut tx, &u.entity)
            .and_then(|t| apply_one(&mut tx, &t, u).map(|o| (o, t.cfg.conflict)));
        let (status, reason) = match result {
            Ok((Outcome::Applied, _)) => {
                tx.batch_execute("RELEASE SAVEPOINT tether_apply")
                    .map_err(port("release"))?;
                (UpdateStatus::Applied, None)
            }
            Ok((Outcome::Conflict(why), policy)) => {
                tx.batch_execute("ROLLBACK TO SAVEPOINT tether_apply")
                    .map_err(port("rollback"))?;
                tx.execute(
                    "INSERT INTO tether.conflicts (update_id, entity, key_json, policy, reason, cloud_row) VALUES ($1, $2, $3, $4, $5, $6)",
                    &[&u.update_id, &u.entity, &Value::Object(u.key.clone()), &policy.as_str(), &why, &u.row.clone().map(Value::Object)],
                )
                .map_err(port("recording conflict"))?;
                (UpdateStatus::Conflict, Some(why.to_string()))
            }
            Err(reason) => {
                tx.batch_execute("ROLLBACK TO SAVEPOINT tether_apply")
                    .map_err(port("rollback"))?;
                (UpdateStatus::Failed, Some(reason))
            }
        };
        tx.execute(
            "INSERT INTO tether.inbox (update_id, status, reason) VALUES ($1, $2, $3)",
            &[&u.update_id, &status.as_str(), &reason],
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
/// Each chunk takes `FOR SHARE` locks on the rows it sends: a live update of such a row either
/// committed before (and the chunk sends its new version, after the live event) or waits for the
/// chunk (and its event comes after the snapshot row). Either way the last event of every key
/// is the row as it is.
pub fn snapshot(
    conn: &str,
    t: &TableConfig,
    chunk: i64,
    progress: &mut dyn FnMut(SnapshotProgress),
) -> Result<SnapshotProgress, PgError> {
    let mut c = connect(conn)?;
    let table = qq(&t.table);
    let key_list = t.key.iter().map(|k| qi(k)).collect::<Vec<_>>().join(", ");
    let state_name = format!("snapshot:{}", t.table);
    let keys = serde_json::to_string(&t.key).unwrap_or_else(|_| "[]".into());
    let total: i64 = c
        .query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .map_err(sql("counting rows"))?
        .get(0);
    let mut p = SnapshotProgress {
        done: 0,
        total: total as u64,
    };
    loop {
        let mut tx = c.transaction().map_err(sql("begin"))?;
        // One outbox writer at a time with logical capture (see `logical`).
        tx.execute(
            "SELECT pg_advisory_xact_lock($1)",
            &[&logical::OUTBOX_WRITER_LOCK],
        )
        .map_err(sql("locking the outbox"))?;
        let (cursor, done): (Option<String>, i64) = tx
            .query_opt(
                "SELECT text_value, value FROM tether.state WHERE name = $1",
                &[&state_name],
            )
            .map_err(sql("reading snapshot position"))?
            .map(|r| (r.get(0), r.get(1)))
            .unwrap_or((None, 0));
        if cursor.as_deref() == Some("done") {
            p.done = done as u64;
            tx.commit().map_err(sql("commit"))?;
            return Ok(p);
        }
        let after = match &cursor {
            Some(k) => format!(
                "WHERE ({key_list}) > (SELECT {key_list} FROM jsonb_populate_record(NULL::{table}, {}::jsonb))",
                ql(k)
            ),
            None => String::new(),
        };
        let key_of = format!(
            "(SELECT jsonb_object_agg(k, r -> k) FROM jsonb_array_elements_text({}::jsonb) k)",
            ql(&keys)
        );
        let stmt = format!(
            "WITH locked AS (SELECT t.* FROM {table} t {after} ORDER BY {key_list} LIMIT {chunk} FOR SHARE), \
             chunk AS (SELECT to_jsonb(l) AS r, row_number() OVER (ORDER BY {key_list}) AS rn FROM locked l), \
             ins AS (INSERT INTO tether.outbox (entity, op, key_json, row_json) \
                 SELECT {ent}, 'update', {key_of}, r FROM chunk ORDER BY rn RETURNING 1) \
             SELECT (SELECT count(*) FROM ins), (SELECT {key_of}::text FROM chunk ORDER BY rn DESC LIMIT 1)",
            ent = ql(&t.entity),
        );
        let row = tx.query_one(&stmt, &[]).map_err(sql("snapshot chunk"))?;
        let n: i64 = row.get(0);
        let last: Option<String> = row.get(1);
        let done = done + n;
        let next = if n < chunk {
            Some("done".to_string())
        } else {
            last
        };
        tx.execute(
            "INSERT INTO tether.state (name, value, text_value) VALUES ($1, $2, $3) \
             ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value, text_value = EXCLUDED.text_value",
            &[&state_name, &done, &next],
        )
        .map_err(sql("saving snapshot position"))?;
        tx.commit().map_err(sql("commit"))?;
        p.done = done as u64;
        progress(p);
        if n < chunk {
            return Ok(p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Holes;

    #[test]
    fn a_missing_seq_keeps_the_txid_it_was_first_seen_with() {
        let mut h = Holes::default();
        assert_eq!(h.uncovered(1, 2), vec![(1, 2)]);
        h.insert(1, 2, 100);
        // Seq 1 fills: seq 2 is still the hole first seen at txid 100, not a new one.
        assert_eq!(h.uncovered(2, 2), Vec::<(i64, i64)>::new());
        assert_eq!(h.watermark(2, 2), Some(100));
        // A wider gap later: only the new part is new.
        assert_eq!(h.uncovered(2, 5), vec![(3, 5)]);
        h.insert(3, 5, 200);
        assert_eq!(h.watermark(2, 5), Some(200));
        assert_eq!(h.watermark(2, 2), Some(100));
        assert_eq!(h.watermark(6, 6), None, "never seen: no watermark");
        // Pieces between recorded ranges.
        h.insert(10, 10, 300);
        assert_eq!(h.uncovered(4, 12), vec![(6, 9), (11, 12)]);
        h.forget_through(5);
        assert_eq!(h.uncovered(2, 5), vec![(2, 5)]);
        assert_eq!(h.watermark(10, 10), Some(300));
    }
}

//! The PostgreSQL adapter (production): `gateway.store.kind: postgres`, `url:`, `schema:`.
//!
//! Writes run on the shared group-committing writer thread: one transaction per group, each
//! batch inserted with one multi-row `INSERT … SELECT FROM unnest(…) ON CONFLICT DO NOTHING`,
//! the gap check in the same transaction, and callers answered only after `COMMIT` returned
//! (`synchronous_commit` is left as the server has it: on).
//!
//! Event ids in id order: an identity column hands out ids when rows are inserted, not when
//! they commit, so two writers (two gateway nodes on one database) could commit id 11 before
//! id 10, and a reader paging by `after=` would skip 10. Every transaction that inserts events
//! therefore takes one transaction-scoped advisory lock first (`EVENTS_LOCK`): ids are handed
//! out and committed by one transaction at a time, so a reader never sees a later id before an
//! earlier one. On one node this costs nothing (its writer is serial anyway); across nodes it
//! serialises the commits of event groups — the price of gap-free cursors, measured in
//! docs/BENCHMARKS.md. A node paused while it holds the lock would stall every node: the
//! server ends any transaction idle for `IDLE_IN_TRANSACTION_MS`, which releases it.
//!
//! A lost connection fails the group in flight with `Unavailable { retryable: true }` (nothing
//! acknowledged; agents resend) and the next group reconnects.

use std::collections::HashMap;
use std::sync::Arc;

use postgres::{Client, NoTls, Statement, Transaction};
use serde_json::value::RawValue;
use serde_json::Value;
use tether_schemas::{UpdateOp, UpdateStatus};

use super::{
    check_version, new_update_id, now_iso, redact_url, AppendOutcome, Backend, ChannelRecord,
    ClinicRecord, DeadLetter, Done, ForwardedCall, GatewayStore, IncomingEvent, NewUpdate,
    NodeRecord, Op, Pruned, ReadPool, Signal, StoreError, StoreFuture, StoreSettings, StoredEvent,
    UpdateRecord, Writer, CHANNEL_COLUMNS,
};

/// The advisory lock every event-inserting transaction holds (see the module docs).
pub const EVENTS_LOCK: i64 = 0x7465_7468_6576_0001;
/// A transaction of this node's that stops moving for this long (the node paused by SIGSTOP or
/// a hypervisor, or its host gone silent) is ended by the server, which releases its locks —
/// `EVENTS_LOCK` above all, which would otherwise stall every node's appends. The writer never
/// waits inside a transaction; it runs its statements back to back.
pub const IDLE_IN_TRANSACTION_MS: u64 = 1_000;
/// Held (session-scoped) while migrations run, so two nodes starting together migrate once.
const MIGRATION_LOCK: i64 = 0x7465_7468_6d69_0001;

/// `MIGRATIONS[i]` takes the schema from version `i` to `i + 1`.
const MIGRATIONS: &[&str] = &[
    "
CREATE TABLE clinics (
    clinic_id TEXT PRIMARY KEY,
    acked_seq BIGINT NOT NULL DEFAULT 0,
    source_id BIGINT NOT NULL DEFAULT 0,
    first_seen TEXT NOT NULL,
    last_event_at TEXT,
    events_stored BIGINT NOT NULL DEFAULT 0,
    pending_updates BIGINT NOT NULL DEFAULT 0
);
CREATE TABLE events (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    clinic_id TEXT NOT NULL,
    seq BIGINT NOT NULL,
    entity TEXT NOT NULL,
    op TEXT NOT NULL,
    key_json TEXT NOT NULL,
    row_json TEXT,
    committed_at TEXT NOT NULL,
    received_at TEXT NOT NULL,
    problem TEXT,
    source_id BIGINT NOT NULL DEFAULT 0,
    UNIQUE (clinic_id, source_id, seq)
);
CREATE TABLE updates (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    update_id TEXT NOT NULL UNIQUE,
    clinic_id TEXT NOT NULL,
    entity TEXT NOT NULL,
    op TEXT NOT NULL,
    key_json TEXT NOT NULL,
    row_json TEXT,
    status TEXT NOT NULL,
    reason TEXT,
    deliveries BIGINT NOT NULL DEFAULT 0,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE INDEX updates_open ON updates (clinic_id, status, id);
CREATE TABLE webhook_cursors (
    name TEXT PRIMARY KEY,
    last_event_id BIGINT NOT NULL
);
CREATE TABLE webhook_dead_letters (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name TEXT NOT NULL,
    event_id BIGINT NOT NULL,
    attempts BIGINT NOT NULL,
    last_error TEXT NOT NULL,
    failed_at TEXT NOT NULL,
    UNIQUE (name, event_id)
);
CREATE TABLE store_meta (key TEXT PRIMARY KEY, value BIGINT NOT NULL);
INSERT INTO store_meta (key, value) VALUES ('pruned_through', 0);
",
    "
CREATE TABLE token_ids (jti TEXT PRIMARY KEY, expires_at BIGINT NOT NULL);
CREATE INDEX token_ids_expiry ON token_ids (expires_at);
",
    "
ALTER TABLE clinics ADD COLUMN epoch BIGINT NOT NULL DEFAULT 0;
ALTER TABLE clinics ADD COLUMN owner_node TEXT;
CREATE TABLE gateway_nodes (
    node_id TEXT PRIMARY KEY,
    addr TEXT NOT NULL,
    started_at TEXT NOT NULL,
    last_beat_ms BIGINT NOT NULL,
    sessions BIGINT NOT NULL
);
",
    "
CREATE TABLE rpc_calls (
    id TEXT PRIMARY KEY,
    clinic_id TEXT NOT NULL,
    from_node TEXT NOT NULL,
    to_node TEXT NOT NULL,
    name TEXT NOT NULL,
    params_json TEXT NOT NULL,
    deadline_ms BIGINT NOT NULL,
    taken BOOLEAN NOT NULL DEFAULT FALSE,
    answer_json TEXT
);
CREATE INDEX rpc_calls_deadline ON rpc_calls (deadline_ms);
CREATE TABLE cluster_keys (name TEXT PRIMARY KEY, secret TEXT NOT NULL);
",
    // 6: one identity per database: a new source is taken only after an operator's confirmation.
    "
ALTER TABLE clinics ADD COLUMN source_reset BOOLEAN NOT NULL DEFAULT FALSE;
ALTER TABLE updates ADD COLUMN idempotency_key TEXT;
ALTER TABLE updates ADD COLUMN batch_id TEXT;
CREATE INDEX updates_batch ON updates (batch_id) WHERE batch_id IS NOT NULL;
CREATE UNIQUE INDEX updates_idempotency ON updates (clinic_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
", // 7: flagged events (stored with a problem) listed and counted without a scan.
    "
CREATE INDEX events_flagged ON events (id) WHERE problem IS NOT NULL;
",
    // 8: per-clinic counters of failed cloud updates and schema-flagged events (dashboard
    // tiles), kept with each write like the others.
    "
ALTER TABLE clinics ADD COLUMN failed_updates BIGINT NOT NULL DEFAULT 0;
ALTER TABLE clinics ADD COLUMN flagged_events BIGINT NOT NULL DEFAULT 0;
UPDATE clinics SET failed_updates = f.n FROM
    (SELECT clinic_id, count(*) AS n FROM updates WHERE status = 'failed' GROUP BY clinic_id) f
    WHERE f.clinic_id = clinics.clinic_id;
UPDATE clinics SET flagged_events = f.n FROM
    (SELECT clinic_id, count(*) AS n FROM events WHERE problem IS NOT NULL GROUP BY clinic_id) f
    WHERE f.clinic_id = clinics.clinic_id;
",
    // 9: one-time enrolment codes (their SHA-256, never the code), shared by every node.
    "
CREATE TABLE enrolment_codes (
    code_hash TEXT PRIMARY KEY,
    clinic_id TEXT NOT NULL,
    labels_json TEXT NOT NULL,
    expires_at BIGINT NOT NULL,
    created_at TEXT NOT NULL,
    created_by TEXT NOT NULL,
    used_at TEXT,
    used_by TEXT
);
CREATE INDEX enrolment_codes_expiry ON enrolment_codes (expires_at);
",
    // 10: the clinic registry kept in the store (gateway.auth.registry: store), versioned.
    "
CREATE TABLE clinic_registry (
    clinic_id TEXT PRIMARY KEY,
    entry_json TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
INSERT INTO store_meta (key, value) VALUES ('registry_version', 0) ON CONFLICT (key) DO NOTHING;
",
    // 11: channel messages, both ways (down: queued for a clinic; up: from its applications).
    "
CREATE TABLE channel_messages (
    row_id BIGSERIAL PRIMARY KEY,
    message_id TEXT NOT NULL,
    clinic_id TEXT NOT NULL,
    channel TEXT NOT NULL,
    direction TEXT NOT NULL,
    delivery TEXT NOT NULL,
    payload TEXT NOT NULL,
    status TEXT NOT NULL,
    deliveries BIGINT NOT NULL DEFAULT 0,
    created_ms BIGINT NOT NULL,
    updated_ms BIGINT NOT NULL,
    expires_ms BIGINT,
    batch_id TEXT,
    UNIQUE (clinic_id, message_id)
);
CREATE INDEX channel_messages_open ON channel_messages (clinic_id, row_id)
    WHERE status IN ('pending', 'sent');
CREATE INDEX channel_messages_up ON channel_messages (row_id) WHERE direction = 'up';
CREATE INDEX channel_messages_created ON channel_messages (created_ms);
",
];

pub const SCHEMA_VERSION: usize = MIGRATIONS.len();

use super::valid_schema;

/// The NOTIFY channel on which a committed update names its clinic (one per store schema, so
/// stores sharing a database do not hear each other).
pub fn updates_channel(schema: &str) -> String {
    format!("tether_updates_{schema}")
}

/// The NOTIFY channel on which nodes hand each other forwarded calls and their answers; the
/// payload names the node it is for (see [`call_signal`]).
pub fn calls_channel(schema: &str) -> String {
    format!("tether_calls_{schema}")
}

/// A notification on the calls channel: `call <id> <node>` or `answer <id> <node>` (ids have no
/// spaces; node ids may).
fn call_signal(kind: &str, id: &str, node: &str) -> String {
    format!("{kind} {id} {node}")
}

/// The signal in a calls-channel payload, if it is for `me`.
fn parse_call_signal(payload: &str, me: &str) -> Option<Signal> {
    let mut parts = payload.splitn(3, ' ');
    let (kind, id, node) = (parts.next()?, parts.next()?, parts.next()?);
    if kind == "registry" {
        return id.parse().ok().map(Signal::Registry);
    }
    if kind == "upchannel" {
        return Some(Signal::UpChannel);
    }
    if node != me {
        return None;
    }
    match kind {
        "call" => Some(Signal::Call(id.to_string())),
        "answer" => Some(Signal::Answer(id.to_string())),
        _ => None,
    }
}

/// A driver error as an operator needs it: the server's SQLSTATE, message and hint (the
/// driver's own text is only "db error"), or the connection error and its causes. The server's
/// DETAIL is left out: it can quote row values.
struct Pg<'a>(&'a postgres::Error);

impl std::fmt::Display for Pg<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&crate::db::postgres::pg_error_text(self.0))
    }
}

fn unavailable(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable {
        retryable: true,
        message: format!("{what}: {e}"),
    }
}

fn connect(url: &str, schema: &str) -> Result<Client, StoreError> {
    if !valid_schema(schema) {
        return Err(StoreError::Open {
            store: format!("postgres:{}", redact_url(url)),
            message: format!("schema `{schema}` is not [a-z_][a-z0-9_]*"),
        });
    }
    let mut c = Client::connect(url, NoTls).map_err(|e| unavailable("connect", Pg(&e)))?;
    // Nodes starting together on a new database race to create the schema: the loser's
    // "already exists" (unique_violation on the catalog, or duplicate_schema) is its success.
    if let Err(e) = c.batch_execute(&format!("CREATE SCHEMA IF NOT EXISTS {schema}")) {
        let raced = e.code().is_some_and(|c| {
            *c == postgres::error::SqlState::UNIQUE_VIOLATION
                || *c == postgres::error::SqlState::DUPLICATE_SCHEMA
        });
        if !raced {
            return Err(unavailable("create schema", Pg(&e)));
        }
    }
    c.batch_execute(&format!(
        "SET search_path TO {schema}; \
         SET idle_in_transaction_session_timeout = {IDLE_IN_TRANSACTION_MS}"
    ))
    .map_err(|e| unavailable("connect", Pg(&e)))?;
    Ok(c)
}

fn migrate(c: &mut Client, store: &str) -> Result<(), StoreError> {
    let err = |e: postgres::Error| StoreError::Open {
        store: store.to_string(),
        message: format!("migration: {}", Pg(&e)),
    };
    c.execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
        .map_err(err)?;
    let res = (|| {
        c.batch_execute(
            "CREATE TABLE IF NOT EXISTS tether_schema_migrations (version INT PRIMARY KEY, applied_at TEXT NOT NULL)",
        )
        .map_err(err)?;
        let found: i32 = c
            .query_one(
                "SELECT coalesce(max(version), 0) FROM tether_schema_migrations",
                &[],
            )
            .map_err(err)?
            .get(0);
        check_version(store, found as i64, SCHEMA_VERSION)?;
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(found.max(0) as usize) {
            let mut tx = c.transaction().map_err(err)?;
            tx.batch_execute(sql).map_err(err)?;
            let v = (i + 1) as i32;
            tx.execute(
                "INSERT INTO tether_schema_migrations (version, applied_at) VALUES ($1, $2)",
                &[&v, &now_iso()],
            )
            .map_err(err)?;
            tx.commit().map_err(err)?;
            log::info!(target: "connection", "event=store_migrated store=postgres version={v}");
        }
        Ok(())
    })();
    let _ = c.execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK]);
    res
}

pub struct PgStore {
    node: String,
    /// The connection whose session-level advisory locks make this node a leader.
    leader: Arc<std::sync::Mutex<Leader>>,
    /// Set when the store is dropped: the update listener's thread ends.
    stop: Arc<std::sync::atomic::AtomicBool>,
    url: String,
    schema: String,
    writer: Writer,
    readers: Arc<ReadPool<Client>>,
}

impl PgStore {
    pub fn open(url: &str, schema: &str, s: &StoreSettings) -> Result<Arc<PgStore>, StoreError> {
        let name = format!("postgres:{} schema={schema}", redact_url(url));
        // The driver runs its own runtime: connect and migrate on a plain thread, never on the
        // caller's (the gateway starts inside actix's runtime).
        let client = std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    let mut client = connect(url, schema).map_err(|e| match e {
                        StoreError::Unavailable { message, .. } => StoreError::Open {
                            store: name.clone(),
                            message,
                        },
                        e => e,
                    })?;
                    migrate(&mut client, &name)?;
                    Ok::<_, StoreError>(client)
                })
                .join()
                .unwrap_or_else(|_| {
                    Err(StoreError::Open {
                        store: name.clone(),
                        message: "store open thread panicked".into(),
                    })
                })
        })?;
        let backend = PgBackend {
            url: url.to_string(),
            schema: schema.to_string(),
            updates_channel: updates_channel(schema),
            calls_channel: calls_channel(schema),
            client: Some(client),
            stmts: HashMap::new(),
            lost_logged: false,
        };
        let writer = Writer::spawn("postgres", backend, s)?;
        Ok(Arc::new(PgStore {
            node: s.node.clone(),
            leader: Default::default(),
            stop: Default::default(),
            url: url.to_string(),
            schema: schema.to_string(),
            writer,
            readers: Arc::new(ReadPool::new(8)),
        }))
    }

    fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Client) -> Result<T, postgres::Error> + Send + 'static,
    ) -> StoreFuture<T> {
        let (url, schema) = (self.url.clone(), self.schema.clone());
        self.readers.run(
            move || connect(&url, &schema),
            move |c| f(c).map_err(|e| unavailable("read", Pg(&e))),
        )
    }
}

impl Drop for PgStore {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        // Ends the leadership session (its roles pass on) off any runtime thread.
        let leader = self
            .leader
            .lock()
            .map(|mut l| l.client.take())
            .unwrap_or(None);
        if let Some(c) = leader {
            let _ = std::thread::spawn(move || drop(c)).join();
        }
        self.writer.close();
        // The driver closes a connection by blocking on its own runtime, which must not happen
        // on a runtime thread (where the last holder of the store may well be).
        let idle = self.readers.drain();
        if !idle.is_empty() {
            let _ = std::thread::spawn(move || drop(idle)).join();
        }
    }
}

/// A connection held for leadership: each role is a session-level advisory lock on it, so a
/// role passes to another node when this connection ends — the process died, or it stayed idle
/// past `LEADER_IDLE_MS` (a paused node; the server ends its session and the locks go).
#[derive(Default)]
struct Leader {
    client: Option<Client>,
    held: std::collections::HashSet<String>,
}

/// How long a leader's connection may stay silent before the server ends it and its roles
/// pass on. A leader checks in at least every second while it works.
pub const LEADER_IDLE_MS: u64 = 10_000;

impl Leader {
    fn try_lead(&mut self, url: &str, schema: &str, role: &str) -> Result<bool, StoreError> {
        if self.client.as_ref().is_none_or(|c| c.is_closed()) {
            if !self.held.is_empty() {
                log::warn!(target: "connection", "event=leadership_lost roles={} reason=connection_ended", self.held.len());
            }
            self.held.clear();
            let mut c = connect(url, schema)?;
            c.batch_execute(&format!("SET idle_session_timeout = {LEADER_IDLE_MS}"))
                .map_err(|e| unavailable("lead", Pg(&e)))?;
            self.client = Some(c);
        }
        let Some(c) = self.client.as_mut() else {
            return Err(unavailable("lead", "no connection"));
        };
        let key = format!("{schema}:{role}");
        if self.held.contains(&key) {
            // Still ours while the session lives: one round trip proves it (and keeps it busy).
            return match c.execute("SELECT 1", &[]) {
                Ok(_) => Ok(true),
                Err(e) => {
                    self.client = None;
                    self.held.clear();
                    log::warn!(target: "connection", "event=leadership_lost role={role} reason=\"{e}\"");
                    Ok(false)
                }
            };
        }
        let won: bool = c
            .query_one("SELECT pg_try_advisory_lock(hashtext($1))", &[&key])
            .map_err(|e| {
                self.client = None;
                unavailable("lead", Pg(&e))
            })?
            .get(0);
        if won {
            self.held.insert(key);
            log::info!(target: "connection", "event=leadership_taken role={role}");
        }
        Ok(won)
    }
}

/// The listener: `LISTEN` on its own connection to the updates channel (every notification's
/// clinic to `on_signal`) and the calls channel (the calls and answers for node `me`). A lost
/// connection is logged once, retried with backoff, and logged when back (the nodes' periodic
/// sweep covers update notifications sent meanwhile; a call sent meanwhile times out).
fn listen(
    url: &str,
    schema: &str,
    me: &str,
    stop: &std::sync::atomic::AtomicBool,
    on_signal: super::SignalWatcher,
) {
    use postgres::fallible_iterator::FallibleIterator;
    use std::sync::atomic::Ordering;
    use std::time::Duration;
    let (updates, calls) = (updates_channel(schema), calls_channel(schema));
    let mut backoff = Duration::from_millis(250);
    let mut lost = false;
    while !stop.load(Ordering::Relaxed) {
        let mut client = match connect(url, schema).and_then(|mut c| {
            c.batch_execute(&format!("LISTEN {updates}; LISTEN {calls}"))
                .map(|_| c)
                .map_err(|e| unavailable("listen", Pg(&e)))
        }) {
            Ok(c) => c,
            Err(e) => {
                if !lost {
                    log::error!(target: "error", "event=store_listener_lost store=postgres error={e}");
                    lost = true;
                }
                std::thread::park_timeout(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        if lost {
            log::warn!(target: "connection", "event=store_listener_back store=postgres");
            lost = false;
        }
        backoff = Duration::from_millis(250);
        loop {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            let next = client
                .notifications()
                .timeout_iter(Duration::from_secs(1))
                .next();
            match next {
                Ok(Some(note)) => {
                    let signal = if note.channel() == updates {
                        Some(Signal::Updates(note.payload().to_string()))
                    } else {
                        parse_call_signal(note.payload(), me)
                    };
                    if let Some(signal) = signal {
                        if !on_signal(signal) {
                            return;
                        }
                    }
                }
                Ok(None) => {
                    if client.is_closed() {
                        break;
                    }
                }
                Err(e) => {
                    log::error!(target: "error", "event=store_listener_lost store=postgres error={}", Pg(&e));
                    lost = true;
                    break;
                }
            }
        }
    }
}

const EVENT_COLUMNS: &str =
    "id, clinic_id, seq, entity, op, key_json, row_json, committed_at, received_at, problem";
const CLINIC_COLUMNS: &str =
    "clinic_id, acked_seq, first_seen, last_event_at, events_stored, pending_updates, owner_node, epoch, failed_updates, flagged_events";

fn event_from_row(r: &postgres::Row) -> StoredEvent {
    let key: String = r.get(5);
    let row: Option<String> = r.get(6);
    StoredEvent {
        id: r.get::<_, i64>(0) as u64,
        clinic_id: r.get(1),
        seq: r.get::<_, i64>(2) as u64,
        entity: r.get(3),
        op: r.get(4),
        key: serde_json::from_str(&key).unwrap_or(Value::Null),
        row: row.and_then(|s| serde_json::from_str(&s).ok()),
        committed_at: r.get(7),
        received_at: r.get(8),
        problem: r.get(9),
    }
}

fn clinic_from_row(r: &postgres::Row) -> ClinicRecord {
    ClinicRecord {
        clinic_id: r.get(0),
        acked_seq: r.get::<_, i64>(1) as u64,
        first_seen: r.get(2),
        last_event_at: r.get(3),
        events: r.get::<_, i64>(4).max(0) as u64,
        pending_updates: r.get::<_, i64>(5).max(0) as u64,
        node: r.get(6),
        epoch: r.get::<_, i64>(7).max(0) as u64,
        failed_updates: r.get::<_, i64>(8).max(0) as u64,
        flagged_events: r.get::<_, i64>(9).max(0) as u64,
    }
}

impl GatewayStore for PgStore {
    super::write_methods!();

    fn kind(&self) -> &'static str {
        "postgres"
    }

    fn acked_seq(&self, clinic: &str) -> StoreFuture<u64> {
        let clinic = clinic.to_string();
        self.read(move |c| {
            Ok(c.query_opt(
                "SELECT acked_seq FROM clinics WHERE clinic_id = $1",
                &[&clinic],
            )?
            .map(|r| r.get::<_, i64>(0) as u64)
            .unwrap_or(0))
        })
    }

    fn clinics(&self) -> StoreFuture<Vec<ClinicRecord>> {
        self.read(|c| {
            Ok(c.query(
                &format!("SELECT {CLINIC_COLUMNS} FROM clinics ORDER BY clinic_id"),
                &[],
            )?
            .iter()
            .map(clinic_from_row)
            .collect())
        })
    }

    fn try_lead(&self, role: &str) -> StoreFuture<bool> {
        let (leader, url, schema) = (self.leader.clone(), self.url.clone(), self.schema.clone());
        let role = role.to_string();
        let job = move || -> Result<bool, StoreError> {
            let mut l = leader.lock().unwrap_or_else(|p| p.into_inner());
            l.try_lead(&url, &schema, &role)
        };
        Box::pin(async move {
            if tokio::runtime::Handle::try_current().is_err() {
                return job();
            }
            tokio::task::spawn_blocking(job)
                .await
                .map_err(|e| unavailable("lead", e))?
        })
    }

    fn watch(&self, on_signal: super::SignalWatcher) -> bool {
        let (url, schema, stop) = (self.url.clone(), self.schema.clone(), self.stop.clone());
        let me = self.node.clone();
        let spawned = std::thread::Builder::new()
            .name("store-listen".into())
            .spawn(move || listen(&url, &schema, &me, &stop, on_signal));
        if let Err(e) = spawned {
            log::error!(target: "error", "event=update_listener_failed store=postgres error={e}");
            return false;
        }
        true
    }

    fn nodes(&self) -> StoreFuture<Vec<NodeRecord>> {
        self.read(|c| {
            Ok(c
                .query(
                    "SELECT node_id, addr, started_at, last_beat_ms, sessions FROM gateway_nodes ORDER BY node_id",
                    &[],
                )?
                .iter()
                .map(|r| NodeRecord {
                    node_id: r.get(0),
                    addr: r.get(1),
                    started_at: r.get(2),
                    last_beat_ms: r.get::<_, i64>(3).max(0) as u64,
                    sessions: r.get::<_, i64>(4).max(0) as u64,
                })
                .collect())
        })
    }

    fn clinic(&self, clinic: &str) -> StoreFuture<Option<ClinicRecord>> {
        let clinic = clinic.to_string();
        self.read(move |c| {
            Ok(c.query_opt(
                &format!("SELECT {CLINIC_COLUMNS} FROM clinics WHERE clinic_id = $1"),
                &[&clinic],
            )?
            .as_ref()
            .map(clinic_from_row))
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
        let (url, schema) = (self.url.clone(), self.schema.clone());
        self.readers.run(
            move || connect(&url, &schema),
            move |c| {
                let row = c
                    .query_one(
                        "SELECT count(*), max(id) FROM events WHERE problem IS NOT NULL AND id > $1",
                        &[&(after_id as i64)],
                    )
                    .map_err(|e| unavailable("read", Pg(&e)))?;
                let (n, max): (i64, Option<i64>) = (row.get(0), row.get(1));
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
            Ok(c.query(
                &format!(
                    "SELECT {EVENT_COLUMNS} FROM events WHERE clinic_id = $1 \
                     AND source_id = coalesce((SELECT source_id FROM clinics WHERE clinic_id = $1), 0) \
                     AND id > $2 ORDER BY id LIMIT $3"
                ),
                &[&clinic, &(after_id as i64), &(limit as i64)],
            )?
            .iter()
            .map(event_from_row)
            .collect())
        })
    }

    fn head(&self) -> StoreFuture<u64> {
        self.read(|c| {
            Ok(c.query_one("SELECT coalesce(max(id), 0) FROM events", &[])?
                .get::<_, i64>(0) as u64)
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
            Ok(c.query(
                "SELECT id, update_id, entity, op, key_json, row_json FROM updates \
                 WHERE clinic_id = $1 AND status IN ('pending', 'delivered') AND id > $2 ORDER BY id LIMIT $3",
                &[&clinic, &after_row, &(limit as i64)],
            )?
            .iter()
            .map(|r| {
                let op: String = r.get(3);
                let key: String = r.get(4);
                let row: Option<String> = r.get(5);
                (
                    r.get::<_, i64>(0),
                    tether_schemas::Update {
                        update_id: r.get(1),
                        entity: r.get(2),
                        op: if op == "delete" {
                            UpdateOp::Delete
                        } else {
                            UpdateOp::Upsert
                        },
                        key: serde_json::from_str(&key).unwrap_or_default(),
                        row: row.and_then(|s| serde_json::from_str(&s).ok()),
                    },
                )
            })
            .collect())
        })
    }

    fn batch_counts(&self, batch_id: &str) -> StoreFuture<Vec<(String, u64)>> {
        let id = batch_id.to_string();
        self.read(move |c| {
            Ok(c.query(
                "SELECT status, count(*) FROM updates WHERE batch_id = $1 GROUP BY status ORDER BY status",
                &[&id],
            )?
            .iter()
            .map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1).max(0) as u64))
            .collect())
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
            Ok(c.query(
                "SELECT id, update_id, clinic_id, entity, op, status, reason, deliveries, created_at, updated_at \
                 FROM updates WHERE clinic_id = $1 AND ($2::text IS NULL OR status = $2) AND id > $3 ORDER BY id LIMIT $4",
                &[&clinic, &status, &after_row, &(limit as i64)],
            )?
            .iter()
            .map(|r| (r.get::<_, i64>(0), update_record(r, 1)))
            .collect())
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
            Ok(c.query(
                &format!(
                    "SELECT {CHANNEL_COLUMNS}, payload FROM channel_messages \
                     WHERE clinic_id = $1 AND status IN ('pending', 'sent') AND direction = 'down' \
                     AND row_id > $2 AND (expires_ms IS NULL OR expires_ms > $3) ORDER BY row_id LIMIT $4"
                ),
                &[&clinic, &after_row, &(now_ms as i64), &(limit as i64)],
            )?
            .iter()
            .map(|r| channel_record(r, true))
            .collect())
        })
    }

    fn channel_message(
        &self,
        message_id: &str,
        clinic: Option<&str>,
    ) -> StoreFuture<Option<ChannelRecord>> {
        let (id, clinic) = (message_id.to_string(), clinic.map(str::to_string));
        self.read(move |c| {
            Ok(c.query_opt(
                &format!(
                    "SELECT {CHANNEL_COLUMNS} FROM channel_messages \
                     WHERE message_id = $1 AND ($2::text IS NULL OR clinic_id = $2) ORDER BY row_id LIMIT 1"
                ),
                &[&id, &clinic],
            )?
            .map(|r| channel_record(&r, false)))
        })
    }

    fn channel_pending_clinics(&self) -> StoreFuture<Vec<String>> {
        self.read(|c| {
            Ok(c.query(
                "SELECT DISTINCT clinic_id FROM channel_messages WHERE status IN ('pending', 'sent') \
                 AND direction = 'down' ORDER BY clinic_id",
                &[],
            )?
            .iter()
            .map(|r| r.get(0))
            .collect())
        })
    }

    fn up_channel_page(&self, after_row: i64, limit: usize) -> StoreFuture<Vec<ChannelRecord>> {
        self.read(move |c| {
            Ok(c.query(
                &format!(
                    "SELECT {CHANNEL_COLUMNS}, payload FROM channel_messages \
                     WHERE direction = 'up' AND row_id > $1 ORDER BY row_id LIMIT $2"
                ),
                &[&after_row, &(limit as i64)],
            )?
            .iter()
            .map(|r| channel_record(r, true))
            .collect())
        })
    }

    fn update(&self, update_id: &str) -> StoreFuture<Option<UpdateRecord>> {
        let id = update_id.to_string();
        self.read(move |c| {
            Ok(c.query_opt(
                "SELECT update_id, clinic_id, entity, op, status, reason, deliveries, created_at, updated_at \
                 FROM updates WHERE update_id = $1",
                &[&id],
            )?
            .map(|r| update_record(&r, 0)))
        })
    }

    fn registry_entries(&self) -> StoreFuture<(u64, Vec<(String, String)>)> {
        self.read(|c| {
            let mut tx = c.build_transaction().read_only(true).start()?;
            let version = tx
                .query_opt(
                    "SELECT value FROM store_meta WHERE key = 'registry_version'",
                    &[],
                )?
                .map(|r| r.get::<_, i64>(0).max(0) as u64)
                .unwrap_or(0);
            let rows = tx
                .query(
                    "SELECT clinic_id, entry_json FROM clinic_registry ORDER BY clinic_id",
                    &[],
                )?
                .iter()
                .map(|r| (r.get(0), r.get(1)))
                .collect();
            tx.commit()?;
            Ok((version, rows))
        })
    }

    fn enrolment_codes(&self, clinic: &str) -> StoreFuture<Vec<super::CodeRecord>> {
        let clinic = clinic.to_string();
        self.read(move |c| {
            Ok(c.query(super::CODES_SQL, &[&clinic])?
                .iter()
                .map(|r| {
                    super::code_record((r.get(0), r.get(1), r.get(2), r.get(3), r.get(4), r.get(5)))
                })
                .collect())
        })
    }

    fn registry_version(&self) -> StoreFuture<u64> {
        self.read(|c| {
            Ok(c.query_opt(
                "SELECT value FROM store_meta WHERE key = 'registry_version'",
                &[],
            )?
            .map(|r| r.get::<_, i64>(0).max(0) as u64)
            .unwrap_or(0))
        })
    }

    fn webhook_cursor(&self, name: &str) -> StoreFuture<u64> {
        let name = name.to_string();
        self.read(move |c| {
            Ok(c.query_opt(
                "SELECT last_event_id FROM webhook_cursors WHERE name = $1",
                &[&name],
            )?
            .map(|r| r.get::<_, i64>(0).max(0) as u64)
            .unwrap_or(0))
        })
    }

    fn dead_letters(&self, name: &str, after: u64, limit: usize) -> StoreFuture<Vec<DeadLetter>> {
        let name = name.to_string();
        self.read(move |c| {
            Ok(c.query(
                "SELECT id, event_id, attempts, last_error, failed_at FROM webhook_dead_letters \
                 WHERE name = $1 AND id > $2 ORDER BY id LIMIT $3",
                &[&name, &(after as i64), &(limit as i64)],
            )?
            .iter()
            .map(|r| DeadLetter {
                id: r.get::<_, i64>(0) as u64,
                event_id: r.get::<_, i64>(1) as u64,
                attempts: r.get::<_, i64>(2) as u32,
                last_error: r.get(3),
                failed_at: r.get(4),
            })
            .collect())
        })
    }

    fn dead_letter_count(&self, name: &str) -> StoreFuture<u64> {
        let name = name.to_string();
        self.read(move |c| {
            Ok(c.query_one(
                "SELECT count(*) FROM webhook_dead_letters WHERE name = $1",
                &[&name],
            )?
            .get::<_, i64>(0) as u64)
        })
    }

    fn dead_letter_event(&self, name: &str, id: u64) -> StoreFuture<Option<u64>> {
        let name = name.to_string();
        self.read(move |c| {
            Ok(c.query_opt(
                "SELECT event_id FROM webhook_dead_letters WHERE name = $1 AND id = $2",
                &[&name, &(id as i64)],
            )?
            .map(|r| r.get::<_, i64>(0) as u64))
        })
    }
}

struct PgBackend {
    url: String,
    schema: String,
    /// See [`updates_channel`].
    updates_channel: String,
    /// See [`calls_channel`].
    calls_channel: String,
    client: Option<Client>,
    stmts: HashMap<&'static str, Statement>,
    lost_logged: bool,
}

impl PgBackend {
    fn ensure_client(&mut self) -> Result<(), StoreError> {
        if self.client.as_ref().is_some_and(|c| !c.is_closed()) {
            return Ok(());
        }
        self.stmts.clear();
        match connect(&self.url, &self.schema) {
            Ok(c) => {
                if self.lost_logged {
                    log::warn!(target: "connection", "event=store_reconnected store=postgres");
                }
                self.lost_logged = false;
                self.client = Some(c);
                Ok(())
            }
            Err(e) => {
                if !self.lost_logged {
                    log::error!(target: "error", "event=store_connection_lost store=postgres error={e}");
                    self.lost_logged = true;
                }
                self.client = None;
                Err(e)
            }
        }
    }

    /// All ops in one transaction; `Err` rolls everything back.
    fn try_group(&mut self, ops: &[Op]) -> Result<Vec<Result<Done, StoreError>>, postgres::Error> {
        let now = now_iso();
        let Some(client) = self.client.as_mut() else {
            return Ok(ops
                .iter()
                .map(|_| Err(unavailable("write", "no connection")))
                .collect());
        };
        let mut tx = client.transaction()?;
        if ops.iter().any(|o| matches!(o, Op::Append { .. })) {
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&EVENTS_LOCK])?;
        }
        let mut out = Vec::with_capacity(ops.len());
        for op in ops {
            let done = run_op(&mut tx, &mut self.stmts, op, &now)?;
            // Delivered with the commit (never before it, never for a rolled-back one).
            match (op, &done) {
                // Whichever node holds the clinic's session sends the update at once.
                (Op::EnqueueUpdate(u), Ok(Done::Id(_))) => {
                    tx.execute(
                        "SELECT pg_notify($1, $2)",
                        &[&self.updates_channel, &u.clinic_id],
                    )?;
                }
                (Op::EnqueueBatch(us), Ok(Done::Ids(_))) => {
                    for u in us {
                        tx.execute(
                            "SELECT pg_notify($1, $2)",
                            &[&self.updates_channel, &u.clinic_id],
                        )?;
                    }
                }
                // Down: the node holding each clinic sends at once; up: every node's streams.
                (Op::EnqueueChannel(msgs), Ok(Done::Flags(new))) => {
                    let mut told: Vec<&str> = Vec::new();
                    let mut up = false;
                    for (m, _) in msgs.iter().zip(new).filter(|(_, n)| **n) {
                        if m.up {
                            up = true;
                        } else if !told.contains(&m.clinic_id.as_str()) {
                            told.push(&m.clinic_id);
                            tx.execute(
                                "SELECT pg_notify($1, $2)",
                                &[&self.updates_channel, &m.clinic_id],
                            )?;
                        }
                    }
                    if up {
                        tx.execute(
                            "SELECT pg_notify($1, $2)",
                            &[&self.calls_channel, &"upchannel 0 *"],
                        )?;
                    }
                }
                (Op::ForwardCall(c), Ok(Done::Unit)) => {
                    let note = call_signal("call", &c.id, &c.to_node);
                    tx.execute("SELECT pg_notify($1, $2)", &[&self.calls_channel, &note])?;
                }
                (Op::AnswerCall { id, .. }, Ok(Done::Text(Some(from)))) => {
                    let note = call_signal("answer", id, from);
                    tx.execute("SELECT pg_notify($1, $2)", &[&self.calls_channel, &note])?;
                }
                // Every node loads the registry again (itself included: harmless).
                (
                    Op::PutRegistryEntry { .. } | Op::DeleteRegistryEntry { .. },
                    Ok(Done::Version(Some(v))),
                ) => {
                    let note = format!("registry {v} *");
                    tx.execute("SELECT pg_notify($1, $2)", &[&self.calls_channel, &note])?;
                }
                _ => {}
            }
            out.push(done);
        }
        tx.commit()?;
        Ok(out)
    }
}

impl Backend for PgBackend {
    fn run_group(&mut self, ops: &[Op]) -> Result<Vec<Result<Done, StoreError>>, StoreError> {
        self.ensure_client()?;
        match self.try_group(ops) {
            Ok(out) => Ok(out),
            Err(e) if self.client.as_ref().is_none_or(|c| c.is_closed()) => {
                log::error!(target: "error", "event=store_connection_lost store=postgres error={}", Pg(&e));
                self.lost_logged = true;
                self.client = None;
                Err(unavailable("write", Pg(&e)))
            }
            // One op is bad (the group rolled back): run each alone, so only that one fails.
            Err(e) if ops.len() > 1 => {
                log::warn!(target: "error", "event=store_group_retried_one_by_one ops={} error={}", ops.len(), Pg(&e));
                Ok(ops
                    .iter()
                    .map(|op| match self.try_group(std::slice::from_ref(op)) {
                        Ok(mut v) => v
                            .pop()
                            .unwrap_or_else(|| Err(unavailable("write", "no result"))),
                        Err(e) => Err(StoreError::Unavailable {
                            retryable: false,
                            message: format!("write: {}", Pg(&e)),
                        }),
                    })
                    .collect())
            }
            Err(e) => Ok(vec![Err(StoreError::Unavailable {
                retryable: false,
                message: format!("write: {}", Pg(&e)),
            })]),
        }
    }
}

/// A statement prepared once per connection.
fn stmt(
    tx: &mut Transaction<'_>,
    cache: &mut HashMap<&'static str, Statement>,
    sql: &'static str,
) -> Result<Statement, postgres::Error> {
    if let Some(s) = cache.get(sql) {
        return Ok(s.clone());
    }
    let s = tx.prepare(sql)?;
    cache.insert(sql, s.clone());
    Ok(s)
}

/// New events: above the highest sequence the store holds for the clinic's outbox, so they
/// cannot conflict (event writers are serialised by `EVENTS_LOCK` and the clinic row's lock).
const INSERT_EVENTS: &str = "INSERT INTO events (clinic_id, seq, entity, op, key_json, row_json, committed_at, received_at, problem, source_id) \
     SELECT $1, t.seq, t.entity, t.op, t.k, t.r, t.c, $2, t.p, $3 \
     FROM unnest($4::int8[], $5::text[], $6::text[], $7::text[], $8::text[], $9::text[], $10::text[]) \
     WITH ORDINALITY AS t(seq, entity, op, k, r, c, p, n) ORDER BY t.n";

/// Resent events (at or below that sequence): stored only where missing. `ON CONFLICT` costs
/// ~45 % more server time per row than a plain insert, so only these take it.
const INSERT_RESENT: &str = "INSERT INTO events (clinic_id, seq, entity, op, key_json, row_json, committed_at, received_at, problem, source_id) \
     SELECT $1, t.seq, t.entity, t.op, t.k, t.r, t.c, $2, t.p, $3 \
     FROM unnest($4::int8[], $5::text[], $6::text[], $7::text[], $8::text[], $9::text[], $10::text[]) \
     WITH ORDINALITY AS t(seq, entity, op, k, r, c, p, n) ORDER BY t.n \
     ON CONFLICT (clinic_id, source_id, seq) DO NOTHING";

/// One batch as the insert's column arrays.
#[derive(Default)]
struct Columns<'a> {
    seqs: Vec<i64>,
    ents: Vec<&'a str>,
    ops: Vec<&'static str>,
    keys: Vec<&'a str>,
    rows: Vec<Option<&'a str>>,
    commits: Vec<&'a str>,
    problems: Vec<Option<&'a str>>,
}

impl<'a> Columns<'a> {
    fn push(&mut self, ie: &'a IncomingEvent) -> Result<(), StoreError> {
        let ev = &ie.event;
        let (key, row) = (ev.key.get(), ev.row.as_deref().map(RawValue::get));
        self.seqs.push(ev.seq as i64);
        self.ents.push(ev.entity.as_str());
        self.ops.push(ev.op.as_str());
        self.keys.push(key);
        self.rows.push(row);
        self.commits.push(ev.committed_at.as_str());
        self.problems.push(ie.problem.as_deref());
        Ok(())
    }

    fn insert(
        &self,
        tx: &mut Transaction<'_>,
        cache: &mut HashMap<&'static str, Statement>,
        sql: &'static str,
        (clinic, now, source): (&String, &String, i64),
    ) -> Result<usize, postgres::Error> {
        if self.seqs.is_empty() {
            return Ok(0);
        }
        let s = stmt(tx, cache, sql)?;
        let n = tx.execute(
            &s,
            &[
                clinic,
                now,
                &source,
                &self.seqs,
                &self.ents,
                &self.ops,
                &self.keys,
                &self.rows,
                &self.commits,
                &self.problems,
            ],
        )?;
        Ok(n as usize)
    }
}

/// Queues one update (or finds the first one of its `Idempotency-Key`).
fn enqueue(
    tx: &mut Transaction<'_>,
    u: &NewUpdate,
    now: &String,
) -> Result<Result<String, StoreError>, postgres::Error> {
    let (key, row) = match super::update_json(u) {
        Ok(j) => j,
        Err(e) => return Ok(Err(e)),
    };
    if let Some(k) = &u.idempotency_key {
        let first = tx.query_opt(
            "SELECT update_id, entity, op, key_json, row_json FROM updates \
             WHERE clinic_id = $1 AND idempotency_key = $2",
            &[&u.clinic_id, k],
        )?;
        if let Some(r) = first {
            let (entity, op, k_json, r_json): (String, String, String, Option<String>) =
                (r.get(1), r.get(2), r.get(3), r.get(4));
            return Ok(super::same_update(
                u,
                &key,
                &row,
                r.get(0),
                (&entity, &op, &k_json, &r_json),
            ));
        }
    }
    let id = new_update_id();
    tx.execute(
        "INSERT INTO updates (update_id, clinic_id, entity, op, key_json, row_json, status, created_at, updated_at, idempotency_key, batch_id) \
         VALUES ($1, $2, $3, $4, $5, $6, 'pending', $7, $7, $8, $9)",
        &[&id, &u.clinic_id, &u.entity, &u.op.as_str(), &key, &row, now, &u.idempotency_key, &u.batch_id],
    )?;
    tx.execute(
        "INSERT INTO clinics (clinic_id, acked_seq, first_seen, pending_updates) VALUES ($1, 0, $2, 1) \
         ON CONFLICT (clinic_id) DO UPDATE SET pending_updates = clinics.pending_updates + 1",
        &[&u.clinic_id, now],
    )?;
    Ok(Ok(id))
}

/// An update's columns `update_id, clinic_id, entity, op, status, reason, deliveries,
/// created_at, updated_at`, starting at column `at`.
/// A [`ChannelRecord`] from a row of [`CHANNEL_COLUMNS`] (and `payload` after them).
fn channel_record(r: &postgres::Row, payload: bool) -> ChannelRecord {
    let ms = |i: usize| r.get::<_, i64>(i).max(0) as u64;
    let created_ms = ms(8);
    let expires_ms = r.get::<_, Option<i64>>(10).map(|v| v.max(0) as u64);
    ChannelRecord {
        row: r.get(0),
        message_id: r.get(1),
        clinic_id: r.get(2),
        channel: r.get(3),
        direction: r.get(4),
        delivery: r.get(5),
        status: r.get(6),
        deliveries: ms(7),
        created_at: super::iso_from_millis(created_ms as i64),
        updated_at: super::iso_from_millis(ms(9) as i64),
        expires_at: expires_ms.map(|e| super::iso_from_millis(e as i64)),
        batch_id: r.get(11),
        payload: if payload { Some(r.get(12)) } else { None },
        created_ms,
        expires_ms,
    }
}

fn update_record(r: &postgres::Row, at: usize) -> UpdateRecord {
    UpdateRecord {
        update_id: r.get(at),
        clinic_id: r.get(at + 1),
        entity: r.get(at + 2),
        op: r.get(at + 3),
        status: r.get(at + 4),
        reason: r.get(at + 5),
        deliveries: r.get::<_, i64>(at + 6) as u64,
        created_at: r.get(at + 7),
        updated_at: r.get(at + 8),
    }
}

/// Bumps the registry's version (the row lock orders concurrent changes); answers the new one.
fn bump_registry(tx: &mut Transaction<'_>) -> Result<u64, postgres::Error> {
    let row = tx.query_one(
        "UPDATE store_meta SET value = value + 1 WHERE key = 'registry_version' RETURNING value",
        &[],
    )?;
    Ok(row.get::<_, i64>(0).max(0) as u64)
}

fn run_op(
    tx: &mut Transaction<'_>,
    cache: &mut HashMap<&'static str, Statement>,
    op: &Op,
    now: &String,
) -> Result<Result<Done, StoreError>, postgres::Error> {
    Ok(Ok(match op {
        Op::Hello {
            clinic,
            source,
            node,
        } => {
            let source = *source as i64;
            // Insert first, then lock: two nodes claiming a new clinic at once serialise on
            // the row (the second waits for the first's insert) and get distinct epochs.
            tx.execute(
                "INSERT INTO clinics (clinic_id, acked_seq, source_id, first_seen) VALUES ($1, 0, $2, $3) \
                 ON CONFLICT (clinic_id) DO NOTHING",
                &[clinic, &source, now],
            )?;
            let s = stmt(
                tx,
                cache,
                "SELECT acked_seq, source_id, source_reset FROM clinics WHERE clinic_id = $1 FOR UPDATE",
            )?;
            let (acked, known, reset) = tx
                .query_opt(&s, &[clinic])?
                .map(|r| (r.get::<_, i64>(0), r.get::<_, i64>(1), r.get::<_, bool>(2)))
                .unwrap_or((0, source, false));
            let acked = if known == source || source == 0 {
                acked
            } else if known == 0 {
                tx.execute(
                    "UPDATE clinics SET source_id = $2 WHERE clinic_id = $1",
                    &[clinic, &source],
                )?;
                acked
            } else if reset {
                super::log_outbox_recreated(clinic, known as u64, source as u64, acked as u64);
                tx.execute(
                    "UPDATE clinics SET source_id = $2, acked_seq = 0, source_reset = FALSE WHERE clinic_id = $1",
                    &[clinic, &source],
                )?;
                0
            } else {
                return Ok(Err(StoreError::SourceConflict {
                    clinic: clinic.clone(),
                    known: known as u64,
                    offered: source as u64,
                }));
            };
            let epoch: i64 = tx
                .query_one(
                    "UPDATE clinics SET epoch = epoch + 1, owner_node = $2 WHERE clinic_id = $1 RETURNING epoch",
                    &[clinic, node],
                )?
                .get(0);
            Done::Claim(super::Claim {
                acked: acked as u64,
                epoch: epoch as u64,
            })
        }
        Op::AllowSourceReset { clinic } => Done::Bool(
            tx.execute(
                "UPDATE clinics SET source_reset = TRUE WHERE clinic_id = $1",
                &[clinic],
            )? > 0,
        ),
        Op::Append {
            clinic,
            source,
            epoch,
            prev_seq,
            events,
        } => {
            let s = stmt(
                tx,
                cache,
                "SELECT acked_seq, source_id, epoch FROM clinics WHERE clinic_id = $1 FOR UPDATE",
            )?;
            let (acked, known, current) = tx
                .query_opt(&s, &[clinic])?
                .map(|r| {
                    (
                        r.get::<_, i64>(0) as u64,
                        r.get::<_, i64>(1) as u64,
                        r.get::<_, i64>(2).max(0) as u64,
                    )
                })
                .unwrap_or((0, 0, 0));
            if *epoch != super::UNFENCED && *epoch != current {
                return Ok(Ok(Done::Append(AppendOutcome::Fenced { epoch: current })));
            }
            if *prev_seq > acked || (*source != 0 && known != 0 && *source != known) {
                return Ok(Ok(Done::Append(AppendOutcome::Gap { acked })));
            }
            let source = if *source == 0 { known } else { *source } as i64;
            let s = stmt(
                tx,
                cache,
                "SELECT coalesce(max(seq), 0) FROM events WHERE clinic_id = $1 AND source_id = $2",
            )?;
            let held = tx
                .query_one(&s, &[clinic, &source])?
                .get::<_, i64>(0)
                .max(0) as u64;
            let (mut fresh, mut resent) = (Columns::default(), Columns::default());
            let mut last = acked;
            for ie in events {
                let into = if ie.event.seq > held {
                    &mut fresh
                } else {
                    &mut resent
                };
                if let Err(e) = into.push(ie) {
                    return Ok(Err(e));
                }
                last = last.max(ie.event.seq);
            }
            let keys = (clinic, now, source);
            let inserted = resent.insert(tx, cache, INSERT_RESENT, keys)?
                + fresh.insert(tx, cache, INSERT_EVENTS, keys)?;
            let flagged = super::newly_flagged(events, acked) as i64;
            let s = stmt(
                tx,
                cache,
                "INSERT INTO clinics (clinic_id, acked_seq, first_seen, last_event_at, events_stored, flagged_events) VALUES ($1, $2, $3, $3, $4, $5) \
                 ON CONFLICT (clinic_id) DO UPDATE SET acked_seq = greatest(clinics.acked_seq, excluded.acked_seq), \
                 last_event_at = excluded.last_event_at, events_stored = clinics.events_stored + excluded.events_stored, \
                 flagged_events = clinics.flagged_events + excluded.flagged_events",
            )?;
            tx.execute(
                &s,
                &[clinic, &(last as i64), now, &(inserted as i64), &flagged],
            )?;
            Done::Append(AppendOutcome::Stored {
                acked: last,
                inserted,
            })
        }
        Op::Release { clinic, epoch } => {
            let s = stmt(
                tx,
                cache,
                "UPDATE clinics SET owner_node = NULL WHERE clinic_id = $1 AND epoch = $2",
            )?;
            tx.execute(&s, &[clinic, &(*epoch as i64)])?;
            Done::Unit
        }
        Op::NodeBeat {
            node,
            addr,
            started_at,
            sessions,
            at_ms,
        } => {
            tx.execute(
                "INSERT INTO gateway_nodes (node_id, addr, started_at, last_beat_ms, sessions) VALUES ($1, $2, $3, $4, $5) \
                 ON CONFLICT (node_id) DO UPDATE SET addr = excluded.addr, started_at = excluded.started_at, \
                 last_beat_ms = excluded.last_beat_ms, sessions = excluded.sessions",
                &[node, addr, started_at, &(*at_ms as i64), &(*sessions as i64)],
            )?;
            Done::Unit
        }
        Op::EnqueueChannel(msgs) => {
            let at = crate::security::unix_now_ms() as i64;
            let mut new = Vec::with_capacity(msgs.len());
            for m in msgs {
                let n = tx.execute(
                    "INSERT INTO channel_messages (message_id, clinic_id, channel, direction, delivery, payload, status, created_ms, updated_ms, expires_ms, batch_id) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8, $9, $10) ON CONFLICT (clinic_id, message_id) DO NOTHING",
                    &[
                        &m.message_id,
                        &m.clinic_id,
                        &m.channel,
                        &if m.up { "up" } else { "down" },
                        &if m.durable { "durable" } else { "transient" },
                        &m.payload,
                        &if m.up { "accepted" } else { "pending" },
                        &at,
                        &m.expires_ms.map(|e| e as i64),
                        &m.batch_id,
                    ],
                )?;
                new.push(n > 0);
            }
            Done::Flags(new)
        }
        Op::MarkChannelSent(ids) => {
            let open: std::collections::HashSet<String> = tx
                .query(
                    "UPDATE channel_messages SET status = 'sent', deliveries = deliveries + 1, updated_ms = $2 \
                     WHERE message_id = ANY($1) AND direction = 'down' AND status IN ('pending', 'sent') RETURNING message_id",
                    &[ids, &(crate::security::unix_now_ms() as i64)],
                )?
                .iter()
                .map(|r| r.get(0))
                .collect();
            Done::Ids(ids.iter().filter(|i| open.contains(*i)).cloned().collect())
        }
        Op::ChannelResult {
            clinic,
            message_id,
            status,
        } => {
            let row = tx.query_opt(
                "UPDATE channel_messages SET status = $3, updated_ms = $4 \
                 WHERE message_id = $1 AND clinic_id = $2 AND direction = 'down' AND status IN ('pending', 'sent') \
                 RETURNING channel, created_ms",
                &[message_id, clinic, status, &(crate::security::unix_now_ms() as i64)],
            )?;
            Done::Recorded(row.map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1).max(0) as u64)))
        }
        Op::ExpireChannels {
            now_ms,
            purge_before_ms,
        } => {
            let mut counts: Vec<(String, u64)> = Vec::new();
            for r in tx.query(
                "UPDATE channel_messages SET status = 'expired', updated_ms = $1 \
                 WHERE status IN ('pending', 'sent') AND expires_ms IS NOT NULL AND expires_ms <= $1 \
                 RETURNING channel",
                &[&(*now_ms as i64)],
            )? {
                super::count_channel(&mut counts, r.get(0));
            }
            tx.execute(
                "DELETE FROM channel_messages WHERE created_ms < $1 \
                 AND status IN ('delivered', 'expired', 'accepted', 'refused')",
                &[&(*purge_before_ms as i64)],
            )?;
            Done::Counts(counts)
        }
        Op::EnqueueUpdate(u) => match enqueue(tx, u, now)? {
            Ok(id) => Done::Id(id),
            Err(e) => return Ok(Err(e)),
        },
        Op::EnqueueBatch(updates) => {
            // All or none: a refused update (a reused key) undoes the ones before it.
            let mut sp = tx.savepoint("batch")?;
            let mut ids = Vec::with_capacity(updates.len());
            for u in updates {
                match enqueue(&mut sp, u, now)? {
                    Ok(id) => ids.push(id),
                    Err(e) => return Ok(Err(e)),
                }
            }
            sp.commit()?;
            Done::Ids(ids)
        }
        Op::MarkDelivered(ids) => {
            let open: std::collections::HashSet<String> = tx
                .query(
                    "UPDATE updates SET status = CASE status WHEN 'pending' THEN 'delivered' ELSE status END, \
                     deliveries = deliveries + 1, updated_at = $2 \
                     WHERE update_id = ANY($1) AND status IN ('pending', 'delivered') RETURNING update_id",
                    &[ids, now],
                )?
                .iter()
                .map(|r| r.get(0))
                .collect();
            Done::Ids(ids.iter().filter(|i| open.contains(*i)).cloned().collect())
        }
        Op::CancelUpdate { update_id } => {
            let cancelled = tx.query_opt(
                "UPDATE updates SET status = 'cancelled', updated_at = $2 \
                 WHERE update_id = $1 AND status = 'pending' RETURNING clinic_id",
                &[update_id, now],
            )?;
            if let Some(r) = cancelled {
                let clinic: String = r.get(0);
                tx.execute(
                    "UPDATE clinics SET pending_updates = pending_updates - 1 WHERE clinic_id = $1",
                    &[&clinic],
                )?;
                Done::Cancel(super::CancelOutcome::Cancelled)
            } else {
                let status = tx
                    .query_opt(
                        "SELECT status FROM updates WHERE update_id = $1",
                        &[update_id],
                    )?
                    .map(|r| r.get::<_, String>(0));
                Done::Cancel(match status {
                    None => super::CancelOutcome::NotFound,
                    Some(s) => super::CancelOutcome::NotPending(s),
                })
            }
        }
        Op::UpdateResult {
            clinic,
            update_id,
            status,
            reason,
        } => {
            let n = tx.execute(
                "UPDATE updates SET status = $3, reason = $4, updated_at = $5 \
                 WHERE update_id = $1 AND clinic_id = $2 AND status IN ('pending', 'delivered')",
                &[update_id, clinic, &status.as_str(), reason, now],
            )?;
            if n > 0 {
                tx.execute(
                    "UPDATE clinics SET pending_updates = pending_updates - 1, \
                     failed_updates = failed_updates + $2 WHERE clinic_id = $1",
                    &[clinic, &i64::from(*status == UpdateStatus::Failed)],
                )?;
            }
            Done::Bool(n > 0)
        }
        Op::AdvanceCursor { name, from, to } => {
            let n = if *from == 0 {
                tx.execute(
                    "INSERT INTO webhook_cursors (name, last_event_id) VALUES ($1, $2) \
                     ON CONFLICT (name) DO UPDATE SET last_event_id = excluded.last_event_id \
                     WHERE webhook_cursors.last_event_id = 0",
                    &[name, &(*to as i64)],
                )?
            } else {
                tx.execute(
                    "UPDATE webhook_cursors SET last_event_id = $3 WHERE name = $1 AND last_event_id = $2",
                    &[name, &(*from as i64), &(*to as i64)],
                )?
            };
            Done::Bool(n == 1)
        }
        Op::Replay { name, event_id } => {
            let head = tx
                .query_one("SELECT coalesce(max(id), 0) FROM events", &[])?
                .get::<_, i64>(0) as u64;
            if *event_id > head.max(1) {
                return Ok(Ok(Done::Replay(Err(head))));
            }
            tx.execute(
                "INSERT INTO webhook_cursors (name, last_event_id) VALUES ($1, $2) \
                 ON CONFLICT (name) DO UPDATE SET last_event_id = excluded.last_event_id",
                &[name, &(event_id.saturating_sub(1) as i64)],
            )?;
            Done::Replay(Ok(()))
        }
        Op::AddDeadLetter {
            name,
            event_id,
            attempts,
            error,
        } => {
            tx.execute(
                "INSERT INTO webhook_dead_letters (name, event_id, attempts, last_error, failed_at) VALUES ($1, $2, $3, $4, $5) \
                 ON CONFLICT (name, event_id) DO UPDATE SET attempts = webhook_dead_letters.attempts + excluded.attempts, \
                 last_error = excluded.last_error, failed_at = excluded.failed_at",
                &[name, &(*event_id as i64), &(*attempts as i64), error, now],
            )?;
            Done::Unit
        }
        Op::RemoveDeadLetter { name, id } => {
            let n = tx.execute(
                "DELETE FROM webhook_dead_letters WHERE name = $1 AND id = $2",
                &[name, &(*id as i64)],
            )?;
            Done::Bool(n > 0)
        }
        Op::Prune {
            cutoff,
            below_id,
            batch,
        } => Done::Pruned(prune(tx, cutoff, *below_id, *batch)?),
        Op::PutRegistryEntry { clinic, entry_json } => {
            tx.execute(
                "INSERT INTO clinic_registry (clinic_id, entry_json, updated_at) VALUES ($1, $2, $3) \
                 ON CONFLICT (clinic_id) DO UPDATE SET entry_json = excluded.entry_json, updated_at = excluded.updated_at",
                &[clinic, entry_json, now],
            )?;
            Done::Version(Some(bump_registry(tx)?))
        }
        Op::DeleteRegistryEntry { clinic } => {
            let n = tx.execute(
                "DELETE FROM clinic_registry WHERE clinic_id = $1",
                &[clinic],
            )?;
            Done::Version(if n == 0 {
                None
            } else {
                Some(bump_registry(tx)?)
            })
        }
        Op::AddEnrolmentCode(c) => {
            let horizon = crate::security::unix_now().saturating_sub(super::ENROLMENT_CODE_KEEP_S);
            tx.execute(
                "DELETE FROM enrolment_codes WHERE expires_at < $1",
                &[&(horizon as i64)],
            )?;
            tx.execute(
                "INSERT INTO enrolment_codes (code_hash, clinic_id, labels_json, expires_at, created_at, created_by) \
                 VALUES ($1, $2, $3, $4, $5, $6)",
                &[&c.code_hash, &c.clinic_id, &c.labels_json, &(c.expires_at as i64), &now_iso(), &c.created_by],
            )?;
            Done::Unit
        }
        Op::TakeEnrolmentCode { code_hash, by } => {
            // FOR UPDATE: a second node taking the same code waits here, then reads it used.
            let row = tx.query_opt(
                "SELECT clinic_id, labels_json, expires_at, used_at, used_by \
                 FROM enrolment_codes WHERE code_hash = $1 FOR UPDATE",
                &[code_hash],
            )?;
            match row {
                None => Done::Code(super::CodeTake::Unknown),
                Some(r) => {
                    let used = r
                        .get::<_, Option<String>>(3)
                        .map(|at| (at, r.get::<_, Option<String>>(4).unwrap_or_default()));
                    let verdict = super::judge_code(
                        r.get(0),
                        r.get(1),
                        r.get(2),
                        used,
                        crate::security::unix_now(),
                    );
                    if matches!(verdict, super::CodeTake::Taken { .. }) {
                        tx.execute(
                            "UPDATE enrolment_codes SET used_at = $2, used_by = $3 WHERE code_hash = $1 AND used_at IS NULL",
                            &[code_hash, &now_iso(), by],
                        )?;
                    }
                    Done::Code(verdict)
                }
            }
        }
        Op::WithdrawEnrolmentCodes { clinic } => {
            let n = tx.execute(
                "DELETE FROM enrolment_codes WHERE clinic_id = $1 AND used_at IS NULL",
                &[clinic],
            )?;
            Done::Version(Some(n))
        }
        Op::ReturnEnrolmentCode { code_hash } => {
            tx.execute(
                "UPDATE enrolment_codes SET used_at = NULL, used_by = NULL WHERE code_hash = $1",
                &[code_hash],
            )?;
            Done::Unit
        }
        Op::RememberToken { jti, expires_at } => {
            let now = crate::security::unix_now().saturating_sub(super::TOKEN_ID_MARGIN_S);
            tx.execute(
                "DELETE FROM token_ids WHERE jti IN \
                 (SELECT jti FROM token_ids WHERE expires_at < $1 LIMIT 100)",
                &[&(now as i64)],
            )?;
            let n = tx.execute(
                "INSERT INTO token_ids (jti, expires_at) VALUES ($1, $2) ON CONFLICT (jti) DO NOTHING",
                &[jti, &(*expires_at as i64)],
            )?;
            Done::Bool(n == 1)
        }
        Op::ForwardCall(c) => {
            let horizon = crate::security::unix_now_ms().saturating_sub(super::CALL_MARGIN_MS);
            tx.execute(
                "DELETE FROM rpc_calls WHERE deadline_ms < $1",
                &[&(horizon as i64)],
            )?;
            let params = serde_json::to_string(&c.params).unwrap_or_else(|_| "{}".into());
            tx.execute(
                "INSERT INTO rpc_calls (id, clinic_id, from_node, to_node, name, params_json, deadline_ms) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
                &[&c.id, &c.clinic_id, &c.from_node, &c.to_node, &c.name, &params, &(c.deadline_ms as i64)],
            )?;
            Done::Unit
        }
        Op::TakeCall { id, node } => {
            let row = tx.query_opt(
                "UPDATE rpc_calls SET taken = TRUE WHERE id = $1 AND to_node = $2 AND NOT taken \
                 RETURNING clinic_id, from_node, to_node, name, params_json, deadline_ms",
                &[id, node],
            )?;
            match row {
                None => Done::Call(None),
                Some(r) => match super::call_params(id, r.get::<_, &str>(4)) {
                    Err(e) => return Ok(Err(e)),
                    Ok(params) => Done::Call(Some(ForwardedCall {
                        id: id.clone(),
                        clinic_id: r.get(0),
                        from_node: r.get(1),
                        to_node: r.get(2),
                        name: r.get(3),
                        params,
                        deadline_ms: r.get::<_, i64>(5).max(0) as u64,
                    })),
                },
            }
        }
        Op::AnswerCall { id, answer } => {
            let row = tx.query_opt(
                "UPDATE rpc_calls SET answer_json = $2 WHERE id = $1 RETURNING from_node",
                &[id, answer],
            )?;
            Done::Text(row.map(|r| r.get(0)))
        }
        Op::CallAnswer { id } => {
            let row = tx.query_opt(
                "DELETE FROM rpc_calls WHERE id = $1 AND answer_json IS NOT NULL RETURNING answer_json",
                &[id],
            )?;
            Done::Text(row.map(|r| r.get(0)))
        }
        Op::DropCall { id } => {
            tx.execute("DELETE FROM rpc_calls WHERE id = $1", &[id])?;
            Done::Unit
        }
        Op::ClusterKey { candidate } => {
            tx.execute(
                "INSERT INTO cluster_keys (name, secret) VALUES ('forwarding', $1) ON CONFLICT (name) DO NOTHING",
                &[candidate],
            )?;
            let row = tx.query_one(
                "SELECT secret FROM cluster_keys WHERE name = 'forwarding'",
                &[],
            )?;
            Done::Text(Some(row.get(0)))
        }
        Op::Ping => {
            tx.execute("SELECT 1", &[])?;
            Done::Unit
        }
        Op::PageLimit(_) => Done::Unit,
    }))
}

fn prune(
    tx: &mut Transaction<'_>,
    cutoff: &str,
    below_id: u64,
    batch: usize,
) -> Result<Pruned, postgres::Error> {
    let through = tx
        .query_one(
            "SELECT value FROM store_meta WHERE key = 'pruned_through' FOR UPDATE",
            &[],
        )?
        .get::<_, i64>(0);
    let rows = tx.query(
        "SELECT id, received_at < $3 FROM events WHERE id > $1 AND id < $2 ORDER BY id LIMIT $4",
        &[&through, &(below_id as i64), &cutoff, &(batch as i64)],
    )?;
    let last = rows
        .iter()
        .map(|r| (r.get::<_, i64>(0), r.get::<_, bool>(1)))
        .take_while(|(_, old)| *old)
        .last()
        .map(|(id, _)| id);
    let Some(last) = last else {
        return Ok(Pruned {
            events: 0,
            pruned_through: through.max(0) as u64,
        });
    };
    let per_clinic = tx.query(
        "SELECT clinic_id, count(*) FROM events WHERE id > $1 AND id <= $2 GROUP BY clinic_id",
        &[&through, &last],
    )?;
    let n = tx.execute(
        "DELETE FROM events WHERE id > $1 AND id <= $2",
        &[&through, &last],
    )?;
    for r in per_clinic {
        let (clinic, k): (String, i64) = (r.get(0), r.get(1));
        tx.execute(
            "UPDATE clinics SET events_stored = greatest(events_stored - $2, 0) WHERE clinic_id = $1",
            &[&clinic, &k],
        )?;
    }
    tx.execute(
        "UPDATE store_meta SET value = $1 WHERE key = 'pruned_through'",
        &[&last],
    )?;
    Ok(Pruned {
        events: n,
        pruned_through: last as u64,
    })
}

impl PgStore {
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
        let (url, schema) = (self.url.clone(), self.schema.clone());
        self.readers.run(
            move || connect(&url, &schema),
            move |c| {
                let e = |e: postgres::Error| unavailable("read", Pg(&e));
                let pruned: i64 = c
                    .query_one(
                        "SELECT value FROM store_meta WHERE key = 'pruned_through'",
                        &[],
                    )
                    .map_err(e)?
                    .get(0);
                let pruned = pruned.max(0) as u64;
                if after < pruned {
                    let oldest: i64 = c
                        .query_one("SELECT coalesce(min(id), 0) FROM events", &[])
                        .map_err(e)?
                        .get(0);
                    return Err(StoreError::Gone {
                        pruned_through: pruned,
                        oldest: (oldest as u64).max(pruned + 1),
                    });
                }
                let (after, limit) = (after as i64, limit as i64);
                let rows = match &clinic {
                    Some(k) => c.query(
                        &format!("SELECT {EVENT_COLUMNS} FROM events WHERE clinic_id = $1 AND id > $2{only} ORDER BY id LIMIT $3"),
                        &[k, &after, &limit],
                    ),
                    None => c.query(
                        &format!("SELECT {EVENT_COLUMNS} FROM events WHERE id > $1{only} ORDER BY id LIMIT $2"),
                        &[&after, &limit],
                    ),
                }
                .map_err(e)?;
                Ok(rows.iter().map(event_from_row).collect())
            },
        )
    }
}

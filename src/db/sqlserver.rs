//! SQL Server adapter (tiberius 0.12 through a bb8-tiberius 0.16 pool). Works on Express
//! (2016+): no CDC, no SQL Agent.
//!
//! Installed in schema `tether`: `outbox` (identity `seq` + `rowversion` `rv`), `state`,
//! `inbox`, `conflicts`, and one `AFTER INSERT, UPDATE, DELETE` trigger per synced table that
//! writes set-based from `inserted`/`deleted` (multi-row statements) with the row as JSON
//! (`FOR JSON PATH, WITHOUT_ARRAY_WRAPPER, INCLUDE_NULL_VALUES`), skipping rows written by the
//! applier (`SESSION_CONTEXT(N'tether.apply') = 1`).
//!
//! ## Commit-order safety
//! Events are read and numbered by `rowversion`, not by the identity: only rows with
//! `rv < MIN_ACTIVE_ROWVERSION()` are read. Every row a still-open or future transaction will
//! make visible has `rv >= MIN_ACTIVE_ROWVERSION()`, so the set read is closed and a cursor on
//! `rv` never skips a row. A second writer to the same row waits for the first's lock and gets
//! a higher `rv`, so per-row order holds. The event `seq` on the wire is `CAST(rv AS bigint)`.
//!
//! Every call runs under `agent.database.timeout` (tiberius has no timeout of its own).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Map, Value};
use tether_actors::ports::{ApplyOutcome, ChangeSink, ChangeSource, Checkpoint, PortError};
use tether_schemas::{Event, Op, Update, UpdateOp, UpdateStatus};

use super::values::{self, BinaryForm, ColumnTypes, EntityTypes, ValueType};
use crate::config::{ConflictPolicy, TableConfig};

pub mod queries;

/// `[name]` with `]` doubled.
pub fn bracket(name: &str) -> String {
    format!("[{}]", name.replace(']', "]]"))
}

/// `[schema].[table]`; `dbo` when the name has no schema.
pub fn bracket_qualified(name: &str) -> String {
    match name.split_once('.') {
        Some((s, t)) => format!("{}.{}", bracket(s), bracket(t)),
        None => format!("[dbo].{}", bracket(name)),
    }
}

/// `N'…'` with quotes doubled.
pub fn nliteral(s: &str) -> String {
    format!("N'{}'", s.replace('\'', "''"))
}

pub const BASE_SCHEMA: &str = "\
IF SCHEMA_ID(N'tether') IS NULL EXEC(N'CREATE SCHEMA tether');
IF OBJECT_ID(N'tether.outbox', N'U') IS NULL
BEGIN
    CREATE TABLE tether.outbox (
        seq bigint IDENTITY(1,1) NOT NULL PRIMARY KEY,
        rv rowversion NOT NULL,
        entity nvarchar(128) NOT NULL,
        op varchar(10) NOT NULL,
        key_json nvarchar(max) NOT NULL,
        row_json nvarchar(max) NULL,
        committed_at datetime2(3) NOT NULL DEFAULT SYSUTCDATETIME()
    );
    CREATE UNIQUE INDEX outbox_rv ON tether.outbox (rv);
END;
IF OBJECT_ID(N'tether.state', N'U') IS NULL
    CREATE TABLE tether.state (name nvarchar(400) NOT NULL PRIMARY KEY, value bigint NOT NULL, text_value nvarchar(max) NULL);
IF NOT EXISTS (SELECT 1 FROM tether.state WHERE name = N'source_id')
    INSERT INTO tether.state (name, value) VALUES (N'source_id', ABS(CAST(CAST(NEWID() AS binary(6)) AS bigint)) + 1);
IF OBJECT_ID(N'tether.inbox', N'U') IS NULL
    CREATE TABLE tether.inbox (update_id nvarchar(100) NOT NULL PRIMARY KEY, status varchar(10) NOT NULL, reason nvarchar(max) NULL, applied_at datetime2(3) NOT NULL DEFAULT SYSUTCDATETIME());
IF OBJECT_ID(N'tether.conflicts', N'U') IS NULL
    CREATE TABLE tether.conflicts (id bigint IDENTITY(1,1) PRIMARY KEY, update_id nvarchar(100) NOT NULL, entity nvarchar(128) NOT NULL, key_json nvarchar(max) NOT NULL, policy varchar(20) NOT NULL, reason nvarchar(400) NOT NULL, cloud_row nvarchar(max) NULL, at datetime2(3) NOT NULL DEFAULT SYSUTCDATETIME());
";

fn trigger_name(t: &TableConfig) -> String {
    format!(
        "[tether].{}",
        bracket(&format!("capture_{}", t.table.replace('.', "_")))
    )
}

/// The capture trigger of one table (T-SQL; one batch).
pub fn trigger_sql(t: &TableConfig) -> String {
    let key_json = |alias: &str| {
        let cols: Vec<String> = t
            .key
            .iter()
            .map(|k| format!("{alias}.{} AS {}", bracket(k), bracket(k)))
            .collect();
        format!(
            "(SELECT {} FOR JSON PATH, WITHOUT_ARRAY_WRAPPER, INCLUDE_NULL_VALUES)",
            cols.join(", ")
        )
    };
    let row_json = |alias: &str| {
        format!("(SELECT {alias}.* FOR JSON PATH, WITHOUT_ARRAY_WRAPPER, INCLUDE_NULL_VALUES)")
    };
    let same_key = |a: &str, b: &str| {
        t.key
            .iter()
            .map(|k| format!("{a}.{c} = {b}.{c}", c = bracket(k)))
            .collect::<Vec<_>>()
            .join(" AND ")
    };
    let ent = nliteral(&t.entity);
    format!(
        "CREATE OR ALTER TRIGGER {name} ON {table} AFTER INSERT, UPDATE, DELETE AS\n\
         BEGIN\n\
         \x20   SET NOCOUNT ON;\n\
         \x20   IF CAST(SESSION_CONTEXT(N'tether.apply') AS int) = 1 RETURN;\n\
         \x20   INSERT INTO tether.outbox (entity, op, key_json, row_json)\n\
         \x20       SELECT {ent}, 'delete', {dkey}, {drow} FROM deleted d\n\
         \x20       WHERE NOT EXISTS (SELECT 1 FROM inserted i WHERE {di});\n\
         \x20   INSERT INTO tether.outbox (entity, op, key_json, row_json)\n\
         \x20       SELECT {ent}, CASE WHEN EXISTS (SELECT 1 FROM deleted d WHERE {di}) THEN 'update' ELSE 'insert' END, {ikey}, {irow}\n\
         \x20       FROM inserted i;\n\
         END",
        name = trigger_name(t),
        table = bracket_qualified(&t.table),
        dkey = key_json("d"),
        drow = row_json("d"),
        ikey = key_json("i"),
        irow = row_json("i"),
        di = same_key("d", "i"),
    )
}

/// The whole install script (what `tether agent install` runs), as separate batches.
pub fn install_script(tables: &[TableConfig]) -> Vec<String> {
    let mut batches = vec![BASE_SCHEMA.to_string()];
    for t in tables {
        batches.push(format!(
            "IF OBJECT_ID(N'{}', N'TR') IS NOT NULL DROP TRIGGER {}",
            trigger_name(t).replace('\'', "''"),
            trigger_name(t)
        ));
        if t.direction.up() {
            batches.push(trigger_sql(t));
        }
    }
    batches
}

/// Capture mode `change_tracking`: enables Change Tracking on the database and each `up`
/// table instead of creating triggers (the tether tables are still created: the pump copies
/// tracked changes into the outbox, which the rowversion reader then sends).
pub fn change_tracking_install_script(tables: &[TableConfig], retention_days: u32) -> Vec<String> {
    let mut batches = vec![
        BASE_SCHEMA.to_string(),
        format!(
            "IF NOT EXISTS (SELECT 1 FROM sys.change_tracking_databases WHERE database_id = DB_ID()) \
             ALTER DATABASE CURRENT SET CHANGE_TRACKING = ON (CHANGE_RETENTION = {retention_days} DAYS, AUTO_CLEANUP = ON)"
        ),
    ];
    for t in tables.iter().filter(|t| t.direction.up()) {
        let q = bracket_qualified(&t.table);
        batches.push(format!(
            "IF NOT EXISTS (SELECT 1 FROM sys.change_tracking_tables WHERE object_id = OBJECT_ID({obj})) ALTER TABLE {q} ENABLE CHANGE_TRACKING",
            obj = nliteral(&q)
        ));
    }
    batches
}

/// The context the applier writes under in `change_tracking` mode; the pump skips it.
pub const CT_CONTEXT: &str = "CAST(N'tether.apply' AS varbinary(128))";

/// One pump step for a change-tracked table: copies the committed changes since the saved
/// version into the outbox, in version order, and saves the new version — one transaction.
/// Falling behind the retention (`CHANGE_TRACKING_MIN_VALID_VERSION`) raises error 50001,
/// never a silent gap: the caller logs it loudly and starts a snapshot of the table.
pub fn change_tracking_pump_sql(t: &TableConfig) -> String {
    let q = bracket_qualified(&t.table);
    let state = nliteral(&format!("ct:{}", t.table));
    let key_json = t
        .key
        .iter()
        .map(|k| format!("ct.{c} AS {c}", c = bracket(k)))
        .collect::<Vec<_>>()
        .join(", ");
    let join = t
        .key
        .iter()
        .map(|k| format!("src.{c} = ct.{c}", c = bracket(k)))
        .collect::<Vec<_>>()
        .join(" AND ");
    format!(
        "SET XACT_ABORT ON; BEGIN TRAN; \
         DECLARE @from bigint = (SELECT value FROM tether.state WITH (UPDLOCK, HOLDLOCK) WHERE name = {state}); \
         DECLARE @to bigint = CHANGE_TRACKING_CURRENT_VERSION(); \
         IF @from IS NULL BEGIN \
           INSERT INTO tether.state (name, value) VALUES ({state}, @to); COMMIT; SELECT 0; RETURN; END; \
         IF @from < CHANGE_TRACKING_MIN_VALID_VERSION(OBJECT_ID({obj})) BEGIN \
           ROLLBACK; THROW 50001, N'change tracking fell behind its retention for {table_text}: a snapshot is needed', 1; END; \
         INSERT INTO tether.outbox (entity, op, key_json, row_json) \
           SELECT {ent}, CASE ct.SYS_CHANGE_OPERATION WHEN 'I' THEN 'insert' WHEN 'U' THEN 'update' ELSE 'delete' END, \
             (SELECT {key_json} FOR JSON PATH, WITHOUT_ARRAY_WRAPPER, INCLUDE_NULL_VALUES), \
             CASE WHEN ct.SYS_CHANGE_OPERATION = 'D' THEN NULL ELSE (SELECT src.* FOR JSON PATH, WITHOUT_ARRAY_WRAPPER, INCLUDE_NULL_VALUES) END \
           FROM CHANGETABLE(CHANGES {q}, @from) AS ct LEFT JOIN {q} AS src ON {join} \
           WHERE ct.SYS_CHANGE_VERSION <= @to AND (ct.SYS_CHANGE_CONTEXT IS NULL OR ct.SYS_CHANGE_CONTEXT <> {ctx}) \
           ORDER BY ct.SYS_CHANGE_VERSION; \
         UPDATE tether.state SET value = @to WHERE name = {state}; \
         COMMIT; SELECT @@ROWCOUNT;",
        obj = nliteral(&q),
        table_text = t.table.replace('\'', "''"),
        ent = nliteral(&t.entity),
        ctx = CT_CONTEXT,
    )
}

/// One snapshot chunk: the next `chunk` rows after the saved key, in key order, copied into
/// the outbox as `update` events under shared locks held to the end of the transaction (a live
/// update of a sent row waits and is captured after it), and the position saved — one
/// transaction, so a crash resumes at the last saved key. Returns the rows copied.
pub fn snapshot_chunk_sql(t: &TableConfig, types: &HashMap<String, String>, chunk: u32) -> String {
    let q = bracket_qualified(&t.table);
    let state = nliteral(&format!("snapshot:{}", t.table));
    let with = openjson_with(&t.key, types);
    // (k1, k2, …) > (last…) spelled out: k1 > a OR (k1 = a AND k2 > b) OR …
    let mut ors = Vec::new();
    for i in 0..t.key.len() {
        let mut ands: Vec<String> = t.key[..i]
            .iter()
            .map(|k| format!("t.{c} = last.{c}", c = bracket(k)))
            .collect();
        ands.push(format!("t.{c} > last.{c}", c = bracket(&t.key[i])));
        ors.push(format!("({})", ands.join(" AND ")));
    }
    let order = t
        .key
        .iter()
        .map(|k| format!("t.{}", bracket(k)))
        .collect::<Vec<_>>()
        .join(", ");
    let key_json = t
        .key
        .iter()
        .map(|k| format!("t.{c} AS {c}", c = bracket(k)))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "SET XACT_ABORT ON; BEGIN TRAN; \
         DECLARE @last nvarchar(max) = (SELECT text_value FROM tether.state WITH (UPDLOCK, HOLDLOCK) WHERE name = {state}); \
         IF @last = N'done' BEGIN COMMIT; SELECT -1; RETURN; END; \
         DECLARE @rows TABLE (n int IDENTITY(1,1) PRIMARY KEY, k nvarchar(max), r nvarchar(max)); \
         INSERT INTO @rows (k, r) SELECT TOP ({chunk}) \
             (SELECT {key_json} FOR JSON PATH, WITHOUT_ARRAY_WRAPPER, INCLUDE_NULL_VALUES), \
             (SELECT t.* FOR JSON PATH, WITHOUT_ARRAY_WRAPPER, INCLUDE_NULL_VALUES) \
           FROM {q} AS t WITH (HOLDLOCK, ROWLOCK) \
           WHERE @last IS NULL OR EXISTS (SELECT 1 FROM OPENJSON(@last) WITH ({with}) AS last WHERE {pred}) \
           ORDER BY {order}; \
         INSERT INTO tether.outbox (entity, op, key_json, row_json) SELECT {ent}, 'update', k, r FROM @rows ORDER BY n; \
         DECLARE @count int = (SELECT COUNT(*) FROM @rows); \
         DECLARE @next nvarchar(max) = CASE WHEN @count < {chunk} THEN N'done' ELSE (SELECT TOP (1) k FROM @rows ORDER BY n DESC) END; \
         MERGE tether.state AS s USING (SELECT {state} AS name) AS v ON s.name = v.name \
           WHEN MATCHED THEN UPDATE SET value = s.value + @count, text_value = @next \
           WHEN NOT MATCHED THEN INSERT (name, value, text_value) VALUES ({state}, @count, @next); \
         COMMIT; SELECT @count;",
        pred = ors.join(" OR "),
        ent = nliteral(&t.entity),
    )
}

/// Removes every trigger and table `install_script` created.
/// `tether check-config --connect`: one batch per mapped table that fails (THROW) naming what
/// `install` would refuse — a missing table, a missing key column, a key of a table cloud
/// updates go to that is neither the primary key nor a unique index; run one by one, so every
/// problem is reported.
pub fn check_script(tables: &[TableConfig]) -> Vec<String> {
    tables
        .iter()
        .map(|t| {
            let name = nliteral(&bracket_qualified(&t.table));
            let mut b = format!(
                "IF OBJECT_ID({name}, N'U') IS NULL THROW 50000, {}, 1;\n",
                nliteral(&format!("table `{}` (agent.tables) does not exist", t.table))
            );
            for k in &t.key {
                b.push_str(&format!(
                    "IF COL_LENGTH({name}, {}) IS NULL THROW 50000, {}, 1;\n",
                    nliteral(k),
                    nliteral(&format!("table `{}`: key column `{k}` does not exist", t.table))
                ));
            }
            if t.direction.down() {
                let mut key: Vec<&str> = t.key.iter().map(String::as_str).collect();
                key.sort();
                let want = key.join(",");
                b.push_str(&format!(
                    "IF NOT EXISTS (SELECT 1 FROM sys.indexes i WHERE i.object_id = OBJECT_ID({name}) AND i.is_unique = 1 AND i.has_filter = 0 \
AND (SELECT STRING_AGG(c.name, ',') WITHIN GROUP (ORDER BY c.name) FROM sys.index_columns ic \
JOIN sys.columns c ON c.object_id = ic.object_id AND c.column_id = ic.column_id \
WHERE ic.object_id = i.object_id AND ic.index_id = i.index_id AND ic.is_included_column = 0) = {}) \
THROW 50000, {}, 1;\n",
                    nliteral(&want),
                    nliteral(&format!(
                        "table `{}`: key [{}] is not the primary key or a unique index; updates need it to be unique",
                        t.table,
                        t.key.join(", ")
                    ))
                ));
            }
            b
        })
        .collect()
}

/// Whether `install` has run (the outbox exists).
pub const INSTALLED_SQL: &str =
    "IF OBJECT_ID(N'tether.outbox', N'U') IS NULL THROW 50001, N'not installed', 1;";

pub fn uninstall_script(tables: &[TableConfig]) -> Vec<String> {
    let mut batches: Vec<String> = tables
        .iter()
        .map(|t| {
            format!(
                "IF OBJECT_ID(N'{}', N'TR') IS NOT NULL DROP TRIGGER {}",
                trigger_name(t).replace('\'', "''"),
                trigger_name(t)
            )
        })
        .collect();
    for t in tables {
        let q = bracket_qualified(&t.table);
        batches.push(format!(
            "IF EXISTS (SELECT 1 FROM sys.change_tracking_tables WHERE object_id = OBJECT_ID({})) ALTER TABLE {q} DISABLE CHANGE_TRACKING",
            nliteral(&q)
        ));
    }
    for table in ["outbox", "state", "inbox", "conflicts"] {
        batches.push(format!("DROP TABLE IF EXISTS tether.{table}"));
    }
    batches.push("IF SCHEMA_ID(N'tether') IS NOT NULL EXEC(N'DROP SCHEMA tether')".into());
    batches
}

/// Reads committed rows after a rowversion cursor, in rowversion order.
pub const READ_SQL: &str =
    "SELECT TOP (@P2) CAST(rv AS bigint) AS seq, entity, op, key_json, row_json, \
    CONVERT(varchar(30), committed_at, 127) + 'Z' AS committed_at \
    FROM tether.outbox WITH (READCOMMITTEDLOCK) \
    WHERE rv > CAST(@P1 AS binary(8)) AND rv < MIN_ACTIVE_ROWVERSION() ORDER BY rv";

/// Whether a declared type holds binary (its JSON value is hex, see [`wire_to_sqlserver`]).
fn is_binary(declared: &str) -> bool {
    ValueType::of_sqlserver(declared) == ValueType::Binary
}

/// `OPENJSON … WITH (…)` column list: each column with its declared type and JSON path
/// (binary columns read as hex text, converted by [`openjson_src`]).
fn openjson_with(cols: &[String], types: &HashMap<String, String>) -> String {
    cols.iter()
        .map(|c| {
            let ty = types
                .get(c)
                .cloned()
                .unwrap_or_else(|| "nvarchar(max)".into());
            let ty = if is_binary(&ty) {
                "varchar(max)".to_string()
            } else {
                ty
            };
            format!(
                "{} {ty} {}",
                bracket(c),
                nliteral(&format!("$.\"{}\"", c.replace('"', "\\\"")))
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// `(SELECT … FROM OPENJSON(@P1) WITH (…) AS j)`: the columns of the JSON in `param` typed as
/// declared, binary ones decoded from hex (`CONVERT(…, 2)`: hex digits without `0x`).
fn openjson_src(param: &str, cols: &[String], types: &HashMap<String, String>) -> String {
    let proj: Vec<String> = cols
        .iter()
        .map(|c| match types.get(c) {
            Some(ty) if is_binary(ty) => {
                format!("CONVERT(varbinary(max), j.{q}, 2) AS {q}", q = bracket(c))
            }
            _ => format!("j.{}", bracket(c)),
        })
        .collect();
    format!(
        "(SELECT {} FROM OPENJSON({param}) WITH ({}) AS j)",
        proj.join(", "),
        openjson_with(cols, types)
    )
}

/// Wire-form values (docs/PROTOCOL.md "Values") as the apply SQL reads them: base64 binary as
/// hex digits, a timestamp for a column without a zone as UTC without the `Z` (its fraction cut
/// to what `datetime`/`smalldatetime` hold). Booleans, decimal strings, dates and `…Z` for
/// `datetimeoffset` are read by `OPENJSON … WITH` as they are. Errors name the column.
pub fn wire_to_sqlserver(
    row: &mut Map<String, Value>,
    types: &HashMap<String, String>,
    overrides: &std::collections::BTreeMap<String, ValueType>,
) -> Result<(), String> {
    for (col, v) in row.iter_mut() {
        let Some(declared) = types.get(col) else {
            continue;
        };
        let Value::String(s) = &*v else {
            continue;
        };
        if overrides.get(col) == Some(&ValueType::Plain) {
            continue;
        }
        let base = declared.split('(').next().unwrap_or("").trim();
        if is_binary(declared) {
            let bytes = values::binary_from_wire(col, s)?;
            *v = Value::String(values::hex_encode(&bytes));
        } else if matches!(base, "datetime" | "datetime2" | "smalldatetime") {
            if let Some(naive) = values::sqlserver_naive_timestamp(s, declared) {
                *v = Value::String(naive);
            }
        }
    }
    Ok(())
}

/// `target.[k1] = src.[k1] AND …` over the key columns.
fn key_match(t: &TableConfig) -> String {
    t.key
        .iter()
        .map(|k| format!("target.{c} = src.{c}", c = bracket(k)))
        .collect::<Vec<_>>()
        .join(" AND ")
}

/// The MERGE that applies an upsert; `types` maps each column to its declared SQL type.
pub fn merge_sql(t: &TableConfig, cols: &[String], types: &HashMap<String, String>) -> String {
    let sets: Vec<String> = cols
        .iter()
        .filter(|c| !t.key.contains(c))
        .map(|c| format!("target.{q} = src.{q}", q = bracket(c)))
        .collect();
    let list: Vec<String> = cols.iter().map(|c| bracket(c)).collect();
    let src_list: Vec<String> = cols.iter().map(|c| format!("src.{}", bracket(c))).collect();
    let matched = if sets.is_empty() {
        String::new()
    } else {
        format!(" WHEN MATCHED THEN UPDATE SET {}", sets.join(", "))
    };
    format!(
        "MERGE {table} WITH (HOLDLOCK) AS target USING {src} AS src ON {on}{matched} \
         WHEN NOT MATCHED THEN INSERT ({list}) VALUES ({src_list});",
        table = bracket_qualified(&t.table),
        src = openjson_src("@P1", cols, types),
        on = key_match(t),
        list = list.join(", "),
        src_list = src_list.join(", "),
    )
}

/// The DELETE that applies a delete (key values from JSON in @P1).
pub fn delete_sql(t: &TableConfig, types: &HashMap<String, String>) -> String {
    format!(
        "DELETE target FROM {table} AS target JOIN {src} AS src ON {on};",
        table = bracket_qualified(&t.table),
        src = openjson_src("@P1", &t.key, types),
        on = key_match(t)
    )
}

/// A column's declared type, as OPENJSON `WITH` needs it.
pub fn declared_type(
    data_type: &str,
    max_len: Option<i32>,
    precision: Option<u8>,
    scale: Option<i32>,
) -> String {
    let dt = data_type.to_ascii_lowercase();
    match dt.as_str() {
        "nvarchar" | "varchar" | "nchar" | "char" | "varbinary" | "binary" => match max_len {
            Some(-1) | None => format!("{dt}(max)"),
            Some(n) => format!("{dt}({n})"),
        },
        "decimal" | "numeric" => {
            format!("{dt}({},{})", precision.unwrap_or(18), scale.unwrap_or(0))
        }
        "datetime2" | "datetimeoffset" | "time" => match scale {
            Some(s) => format!("{dt}({s})"),
            None => dt,
        },
        "text" | "ntext" => "nvarchar(max)".into(),
        _ => dt,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MssqlError {
    #[error("agent.database.connection: {0}")]
    Config(String),
    #[error("SQL Server: {0}")]
    Sql(String),
    #[error("SQL Server call timed out after {0:?}")]
    Timeout(Duration),
}

type Pool = bb8::Pool<bb8_tiberius::ConnectionManager>;

/// A pooled connection with its own small runtime; ports call it from the blocking pool.
pub struct MssqlDb {
    /// Always `Some` until dropped (taken out so an async thread can drop us safely).
    rt: Option<tokio::runtime::Runtime>,
    pool: Pool,
    timeout: Duration,
    /// Since when the server has been unreachable (the outage is logged once, and its end).
    down_since: std::sync::Mutex<Option<std::time::Instant>>,
}

impl MssqlDb {
    /// `connection` is an ADO string; `ca` a PEM CA for the server certificate.
    pub fn connect(
        connection: &str,
        ca: Option<&std::path::Path>,
        timeout: Duration,
    ) -> Result<Arc<Self>, MssqlError> {
        Self::connect_with(connection, ca, timeout, None)
    }

    /// `session`: one connection kept for as long as this lives (no idle or lifetime limit),
    /// named `session` on the server (`program_name`): what holds a session-owned lock.
    fn connect_with(
        connection: &str,
        ca: Option<&std::path::Path>,
        timeout: Duration,
        session: Option<&str>,
    ) -> Result<Arc<Self>, MssqlError> {
        let mut config = tiberius::Config::from_ado_string(connection)
            .map_err(|e| MssqlError::Config(e.to_string()))?;
        if let Some(ca) = ca {
            config.trust_cert_ca(ca.display().to_string());
        }
        if let Some(name) = session {
            config.application_name(name);
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| MssqlError::Sql(e.to_string()))?;
        let mgr = bb8_tiberius::ConnectionManager::new(config);
        let pool = rt
            .block_on(async {
                tokio::time::timeout(
                    timeout,
                    bb8::Pool::builder()
                        .max_size(if session.is_some() { 1 } else { 4 })
                        .idle_timeout(session.is_none().then_some(Duration::from_secs(600)))
                        .max_lifetime(session.is_none().then_some(Duration::from_secs(1800)))
                        .connection_timeout(timeout)
                        .build(mgr),
                )
                .await
            })
            .map_err(|_| MssqlError::Timeout(timeout))?
            .map_err(|e| MssqlError::Sql(e.to_string()))?;
        // bb8 connects lazily: log in once now so a wrong address or password fails here.
        rt.block_on(async {
            tokio::time::timeout(timeout, pool.get())
                .await
                .map_err(|_| MssqlError::Timeout(timeout))?
                .map(|_| ())
                .map_err(|e| MssqlError::Sql(e.to_string()))
        })?;
        Ok(Arc::new(MssqlDb {
            rt: Some(rt),
            pool,
            timeout,
            down_since: std::sync::Mutex::new(None),
        }))
    }

    /// Runs `f` on a pooled connection under the timeout.
    pub fn run<T, F>(&self, f: F) -> Result<T, MssqlError>
    where
        F: for<'c> FnOnce(
            &'c mut bb8::PooledConnection<'_, bb8_tiberius::ConnectionManager>,
        ) -> std::pin::Pin<
            Box<dyn std::future::Future<Output = Result<T, tiberius::error::Error>> + 'c>,
        >,
    {
        self.run_within(self.timeout, f)
    }

    /// [`Self::run`] with its own time limit (an RPC query's `agent.rpc.timeout`).
    pub fn run_within<T, F>(&self, timeout: Duration, f: F) -> Result<T, MssqlError>
    where
        F: for<'c> FnOnce(
            &'c mut bb8::PooledConnection<'_, bb8_tiberius::ConnectionManager>,
        ) -> std::pin::Pin<
            Box<dyn std::future::Future<Output = Result<T, tiberius::error::Error>> + 'c>,
        >,
    {
        let rt = self
            .rt
            .as_ref()
            .ok_or_else(|| MssqlError::Sql("runtime stopped".into()))?;
        // bb8 checks a connection before handing it out and replaces a broken one, so a lost
        // connection heals on the next call; what is logged is the outage, once, and its end.
        let result = rt.block_on(async {
            tokio::time::timeout(timeout, async {
                let mut conn = self
                    .pool
                    .get()
                    .await
                    .map_err(|e| (true, MssqlError::Sql(e.to_string())))?;
                f(&mut conn).await.map_err(|e| {
                    let lost = matches!(e, tiberius::error::Error::Io { .. });
                    (lost, MssqlError::Sql(e.to_string()))
                })
            })
            .await
            .map_err(|_| (true, MssqlError::Timeout(timeout)))?
        });
        let mut down = self.down_since.lock().unwrap_or_else(|p| p.into_inner());
        match result {
            Ok(v) => {
                if let Some(since) = down.take() {
                    log::warn!(target: "error", "event=database_reconnected engine=sqlserver outage_ms={}", since.elapsed().as_millis());
                }
                Ok(v)
            }
            Err((lost, e)) => {
                if lost && down.is_none() {
                    *down = Some(std::time::Instant::now());
                    log::warn!(target: "error", "event=database_connection_lost engine=sqlserver action=reconnecting error={e}");
                }
                Err(e)
            }
        }
    }

    /// Runs a script of batches (install/uninstall).
    pub fn batches(&self, batches: &[String]) -> Result<(), MssqlError> {
        for b in batches {
            let b = b.clone();
            self.run(move |c| {
                Box::pin(async move { c.simple_query(b).await?.into_results().await.map(|_| ()) })
            })?;
        }
        Ok(())
    }
}

/// The one-agent lock: a session-owned application lock, `sp_getapplock` with no wait (the
/// caller retries until its deadline). 0 or 1: granted; -1: another session holds it.
pub const INSTANCE_LOCK_SQL: &str = "DECLARE @r int; \
EXEC @r = sp_getapplock @Resource = N'tether-agent', @LockMode = 'Exclusive', @LockOwner = 'Session', @LockTimeout = 0; \
SELECT @r;";

/// Who holds the one-agent lock of this database: the holding session's `program_name` (the
/// agent's host and pid), its client host and login time. Needs VIEW SERVER STATE.
pub const INSTANCE_HOLDER_SQL: &str = "SELECT TOP (1) s.program_name, s.host_name, CONVERT(varchar(19), s.login_time, 126) \
FROM sys.dm_tran_locks l JOIN sys.dm_exec_sessions s ON s.session_id = l.request_session_id \
WHERE l.resource_type = N'APPLICATION' AND l.resource_database_id = DB_ID() AND l.request_status = N'GRANT' \
AND l.request_owner_type = N'SESSION' AND l.resource_description LIKE N'%[[]tether-agent]%'";

/// Holds the one-agent lock of a SQL Server database for as long as it lives: a connection of
/// its own whose session owns the application lock; the server releases it when that session
/// ends, however the agent ends.
pub struct MssqlInstanceLock {
    _session: Arc<MssqlDb>,
}

/// Takes the one-agent lock, waiting up to `wait` for a previous holder to let go; refused with
/// the holder's name (see [`crate::db::instance`]).
pub fn lock_instance(
    connection: &str,
    ca: Option<&std::path::Path>,
    timeout: Duration,
    wait: Duration,
) -> Result<MssqlInstanceLock, crate::db::instance::InstanceError> {
    use crate::db::instance::{short_holder, InstanceError};
    let db_err = |e: MssqlError| InstanceError::Database(e.to_string());
    let db =
        MssqlDb::connect_with(connection, ca, timeout, Some(&short_holder())).map_err(db_err)?;
    let deadline = std::time::Instant::now() + wait;
    loop {
        let got = db
            .run(|c| {
                Box::pin(async move {
                    let row = c.simple_query(INSTANCE_LOCK_SQL).await?.into_row().await?;
                    Ok(row.and_then(|r| r.get::<i32, _>(0)))
                })
            })
            .map_err(db_err)?;
        match got {
            Some(r) if r >= 0 => return Ok(MssqlInstanceLock { _session: db }),
            Some(-1) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(100));
            }
            Some(-1) => {
                let holder = db
                    .run(|c| {
                        Box::pin(async move {
                            let row = c
                                .simple_query(INSTANCE_HOLDER_SQL)
                                .await?
                                .into_row()
                                .await?;
                            Ok(row.map(|r| {
                                format!(
                                    "{} from {}, since {}",
                                    r.get::<&str, _>(0).unwrap_or("?"),
                                    r.get::<&str, _>(1).unwrap_or("?"),
                                    r.get::<&str, _>(2).unwrap_or("?")
                                )
                            }))
                        })
                    })
                    .unwrap_or_else(|e| {
                        Some(format!(
                            "holder not named: {e} (naming it needs VIEW SERVER STATE)"
                        ))
                    });
                return Err(InstanceError::Held {
                    holder: holder.unwrap_or_else(|| "holder gone meanwhile: try again".into()),
                });
            }
            other => {
                return Err(InstanceError::Database(format!(
                    "sp_getapplock answered {other:?} (-2 cancelled, -3 deadlock, -999 bad call)"
                )))
            }
        }
    }
}

impl Drop for MssqlDb {
    fn drop(&mut self) {
        // Dropping a runtime blocks; the last owner may be an actor on an async thread.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

fn port(e: MssqlError) -> PortError {
    PortError::new(e.to_string())
}

/// An outbox column's `FOR JSON` text as an object in the wire form (`values`).
pub fn parse_obj(
    text: Option<&str>,
    types: &ColumnTypes,
    what: &str,
    seq: i64,
) -> Result<Option<Map<String, Value>>, PortError> {
    match text {
        None => Ok(None),
        Some(t) => types
            .parse_wire(t, BinaryForm::Base64)
            .map(Some)
            .map_err(|e| {
                PortError::new(format!(
                    "outbox seq={seq}: {what} is not a JSON object: {e}"
                ))
            }),
    }
}

/// Runs snapshot chunks until the table is done; resumable (the position is in tether.state).
pub fn snapshot(
    db: &MssqlDb,
    t: &TableConfig,
    types: &HashMap<String, String>,
    chunk: u32,
    progress: &mut dyn FnMut(u64),
) -> Result<u64, MssqlError> {
    let sql = snapshot_chunk_sql(t, types, chunk);
    let mut total = 0u64;
    loop {
        let sql = sql.clone();
        let n: i32 = db.run(move |c| {
            Box::pin(async move {
                let row = c.simple_query(sql).await?.into_row().await?;
                Ok(row.and_then(|r| r.get::<i32, _>(0)).unwrap_or(0))
            })
        })?;
        if n < 0 {
            return Ok(total);
        }
        total += n as u64;
        progress(total);
        if (n as u32) < chunk {
            return Ok(total);
        }
    }
}

/// Clears a table's snapshot position so the next `snapshot` starts from the first key.
pub fn reset_snapshot_sql(t: &TableConfig) -> String {
    format!(
        "DELETE FROM tether.state WHERE name = {}",
        nliteral(&format!("snapshot:{}", t.table))
    )
}

/// Reads the outbox; in `change_tracking` mode it first pumps tracked changes into it.
pub struct MssqlSource {
    pub db: Arc<MssqlDb>,
    /// Tables captured by Change Tracking (empty in `triggers` mode).
    pub change_tracked: Vec<TableConfig>,
    pub sink_types: Arc<MssqlSink>,
}

impl MssqlSource {
    pub fn triggers(db: Arc<MssqlDb>, tables: &[TableConfig]) -> Self {
        let sink = Arc::new(MssqlSink::new(db.clone(), tables));
        MssqlSource {
            db,
            change_tracked: Vec::new(),
            sink_types: sink,
        }
    }

    fn pump(&self) -> Result<(), PortError> {
        for t in &self.change_tracked {
            let sql = change_tracking_pump_sql(t);
            let res = self.db.run(move |c| {
                Box::pin(async move { c.simple_query(sql).await?.into_results().await.map(|_| ()) })
            });
            if let Err(e) = res {
                if !e.to_string().contains("50001") {
                    return Err(port(e));
                }
                // Fell behind the retention: loud, then a fresh start plus a full snapshot.
                log::error!(target: "error", "event=change_tracking_behind table={} action=snapshot error={:?}", t.table, e.to_string());
                let types = self.sink_types.column_types(&t.table)?;
                let restart = format!(
                    "DELETE FROM tether.state WHERE name = {}; {}",
                    nliteral(&format!("ct:{}", t.table)),
                    reset_snapshot_sql(t)
                );
                self.db.batches(&[restart]).map_err(port)?;
                let sql = change_tracking_pump_sql(t);
                self.db
                    .run(move |c| {
                        Box::pin(async move {
                            c.simple_query(sql).await?.into_results().await.map(|_| ())
                        })
                    })
                    .map_err(port)?;
                let n = snapshot(&self.db, t, &types, 1000, &mut |_| {}).map_err(port)?;
                log::warn!(target: "error", "event=change_tracking_resnapshot table={} rows={n}", t.table);
            }
        }
        Ok(())
    }
}

impl ChangeSource for MssqlSource {
    fn change_token(&self) -> Result<u64, PortError> {
        self.pump()?;
        // Any commit moves MIN_ACTIVE_ROWVERSION or @@DBTS.
        self.db
            .run(|c| {
                Box::pin(async move {
                    let row = c
                        .simple_query("SELECT CAST(@@DBTS AS bigint) ^ CAST(MIN_ACTIVE_ROWVERSION() AS bigint)")
                        .await?
                        .into_row()
                        .await?;
                    Ok(row.and_then(|r| r.get::<i64, _>(0)).unwrap_or(0) as u64)
                })
            })
            .map_err(port)
    }

    fn read_after(&self, after: u64, limit: usize) -> Result<Vec<Event>, PortError> {
        type RawRow = (i64, String, String, String, Option<String>, String);
        let rows: Vec<RawRow> = self
            .db
            .run(move |c| {
                Box::pin(async move {
                    let rows = c
                        .query(READ_SQL, &[&(after as i64), &(limit as i64)])
                        .await?
                        .into_first_result()
                        .await?;
                    Ok(rows
                        .iter()
                        .map(|r| {
                            (
                                r.get::<i64, _>(0).unwrap_or(0),
                                r.get::<&str, _>(1).unwrap_or("").to_string(),
                                r.get::<&str, _>(2).unwrap_or("").to_string(),
                                r.get::<&str, _>(3).unwrap_or("{}").to_string(),
                                r.get::<&str, _>(4).map(str::to_string),
                                r.get::<&str, _>(5).unwrap_or("").to_string(),
                            )
                        })
                        .collect())
                })
            })
            .map_err(port)?;
        rows.into_iter()
            .map(|(seq, entity, op, key, row, committed_at)| {
                let types = self.sink_types.wire_types(&entity)?;
                Ok(Event {
                    seq: seq as u64,
                    op: Op::parse(&op).ok_or_else(|| {
                        PortError::new(format!("outbox seq={seq}: unknown op `{op}`"))
                    })?,
                    key: parse_obj(Some(&key), &types, "key_json", seq)?.unwrap_or_default(),
                    row: parse_obj(row.as_deref(), &types, "row_json", seq)?,
                    entity,
                    committed_at,
                })
            })
            .collect()
    }
}

pub struct MssqlCheckpoint(pub Arc<MssqlDb>);

impl MssqlCheckpoint {
    /// A value of `tether.state` (0 when absent).
    fn state(&self, name: &'static str) -> Result<u64, PortError> {
        let sql = format!(
            "SELECT value FROM tether.state WHERE name = {}",
            nliteral(name)
        );
        self.0
            .run(move |c| {
                Box::pin(async move {
                    let row = c.simple_query(sql).await?.into_row().await?;
                    Ok(row.and_then(|r| r.get::<i64, _>(0)).unwrap_or(0) as u64)
                })
            })
            .map_err(port)
    }
}

impl Checkpoint for MssqlCheckpoint {
    fn source_id(&self) -> Result<u64, PortError> {
        self.state("source_id")
    }

    fn load(&self) -> Result<u64, PortError> {
        self.state("acked_seq")
    }

    fn save(&self, acked: u64) -> Result<(), PortError> {
        self.0
            .run(move |c| {
                Box::pin(async move {
                    c.execute(
                        "MERGE tether.state WITH (HOLDLOCK) AS t USING (SELECT N'acked_seq' AS name, @P1 AS value) AS s ON t.name = s.name \
                         WHEN MATCHED AND t.value < s.value THEN UPDATE SET value = s.value \
                         WHEN NOT MATCHED THEN INSERT (name, value) VALUES (s.name, s.value);",
                        &[&(acked as i64)],
                    )
                    .await
                    .map(|_| ())
                })
            })
            .map_err(port)
    }

    fn purge(&self, acked: u64, retention: Duration) -> Result<usize, PortError> {
        let secs = retention.as_secs() as i64;
        self.0
            .run(move |c| {
                Box::pin(async move {
                    c.execute(
                        "DELETE FROM tether.outbox WHERE rv <= CAST(@P1 AS binary(8)) AND committed_at < DATEADD(second, -@P2, SYSUTCDATETIME())",
                        &[&(acked as i64), &secs],
                    )
                    .await
                    .map(|r| r.total() as usize)
                })
            })
            .map_err(port)
    }
}

pub struct MssqlSink {
    db: Arc<MssqlDb>,
    tables: Vec<TableConfig>,
    types: Mutex<HashMap<String, Arc<HashMap<String, String>>>>,
    /// entity → the wire types of its columns (capture side).
    wire: EntityTypes,
    /// `change_tracking` mode: writes carry the tether context so the pump skips them.
    pub change_tracking: bool,
}

impl MssqlSink {
    pub fn new(db: Arc<MssqlDb>, tables: &[TableConfig]) -> Self {
        MssqlSink {
            db,
            tables: tables.to_vec(),
            types: Mutex::new(HashMap::new()),
            wire: EntityTypes::new(tables),
            change_tracking: false,
        }
    }

    /// The wire types of an entity's columns: declared types, then `types:` from config (none
    /// for an entity that is not mapped).
    pub fn wire_types(&self, entity: &str) -> Result<Arc<ColumnTypes>, PortError> {
        self.wire.of(entity, |cfg| {
            let declared = self.column_types(&cfg.table)?;
            Ok(ColumnTypes::new(
                declared
                    .iter()
                    .map(|(c, ty)| (c.clone(), ValueType::of_sqlserver(ty))),
                &cfg.types,
            ))
        })
    }

    pub fn column_types(&self, table: &str) -> Result<Arc<HashMap<String, String>>, PortError> {
        if let Some(t) = self
            .types
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(table)
        {
            return Ok(t.clone());
        }
        let (schema, name) = table.split_once('.').unwrap_or(("dbo", table));
        let (schema, name) = (schema.to_string(), name.to_string());
        let types: HashMap<String, String> = self
            .db
            .run(move |c| {
                Box::pin(async move {
                    let rows = c
                        .query(
                            "SELECT COLUMN_NAME, DATA_TYPE, CHARACTER_MAXIMUM_LENGTH, CAST(NUMERIC_PRECISION AS int), \
                             COALESCE(NUMERIC_SCALE, DATETIME_PRECISION) FROM INFORMATION_SCHEMA.COLUMNS \
                             WHERE TABLE_SCHEMA = @P1 AND TABLE_NAME = @P2",
                            &[&schema.as_str(), &name.as_str()],
                        )
                        .await?
                        .into_first_result()
                        .await?;
                    Ok(rows
                        .iter()
                        .map(|r| {
                            let col = r.get::<&str, _>(0).unwrap_or("").to_string();
                            let ty = declared_type(
                                r.get::<&str, _>(1).unwrap_or("nvarchar"),
                                r.get::<i32, _>(2),
                                r.get::<i32, _>(3).map(|p| p as u8),
                                r.get::<i32, _>(4),
                            );
                            (col, ty)
                        })
                        .collect())
                })
            })
            .map_err(port)?;
        let types = Arc::new(types);
        self.types
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(table.to_string(), types.clone());
        Ok(types)
    }
}

impl ChangeSink for MssqlSink {
    fn apply(&self, u: &Update) -> Result<ApplyOutcome, PortError> {
        let Some(t) = self.tables.iter().find(|t| t.entity == u.entity).cloned() else {
            return Ok(ApplyOutcome {
                status: UpdateStatus::Failed,
                reason: Some(format!(
                    "entity `{}` is not mapped in agent.tables",
                    u.entity
                )),
                duplicate: false,
            });
        };
        if !t.direction.down() {
            return Ok(ApplyOutcome {
                status: UpdateStatus::Failed,
                reason: Some(format!("entity `{}` is mapped with direction up", u.entity)),
                duplicate: false,
            });
        }
        let types = self.column_types(&t.table)?;
        let mut row = u.row.clone().unwrap_or_default();
        for (k, v) in &u.key {
            row.insert(k.clone(), v.clone());
        }
        if let Some(bad) = row.keys().find(|c| !types.contains_key(*c)) {
            return Ok(ApplyOutcome {
                status: UpdateStatus::Failed,
                reason: Some(format!("`{bad}` is not a column of `{}`", t.table)),
                duplicate: false,
            });
        }
        if let Err(reason) = wire_to_sqlserver(&mut row, &types, &t.types) {
            return Ok(ApplyOutcome {
                status: UpdateStatus::Failed,
                reason: Some(reason),
                duplicate: false,
            });
        }
        let cols: Vec<String> = row.keys().cloned().collect();
        let stmt = match u.op {
            UpdateOp::Upsert => merge_sql(&t, &cols, &types),
            UpdateOp::Delete => delete_sql(&t, &types),
        };
        let stmt = if self.change_tracking {
            format!("WITH CHANGE_TRACKING_CONTEXT ({CT_CONTEXT}) {stmt}")
        } else {
            stmt
        };
        let conflict = |policy: &str, why: &str| {
            let why = why.replace('\'', "''");
            format!(
                "BEGIN INSERT INTO tether.conflicts (update_id, entity, key_json, policy, reason, cloud_row) VALUES (@P2, @P3, @P4, '{policy}', N'{why}', @P1); \
                 INSERT INTO tether.inbox (update_id, status, reason) VALUES (@P2, 'conflict', N'{why}'); COMMIT; \
                 EXEC sp_set_session_context N'tether.apply', 0; SELECT 'conflict', N'{why}', 0; RETURN; END;"
            )
        };
        let guard = match (t.conflict, t.version_column.as_deref(), u.op) {
            (ConflictPolicy::ClinicWins, _, _) => format!(
                "IF EXISTS (SELECT 1 FROM tether.outbox WHERE entity = @P3 AND key_json = @P4 AND rv > CAST(COALESCE((SELECT value FROM tether.state WHERE name = N'acked_seq'), 0) AS binary(8))) {}",
                conflict("clinic_wins", super::CLINIC_CHANGE_PENDING)
            ),
            (ConflictPolicy::NewestWins, Some(vc), UpdateOp::Upsert) => {
                let mut with_cols: Vec<String> = t.key.clone();
                with_cols.push(vc.to_string());
                format!(
                    "IF EXISTS (SELECT 1 FROM {table} AS target JOIN {src} AS src ON {on} WHERE target.{v} > src.{v}) {c}",
                    table = bracket_qualified(&t.table),
                    src = openjson_src("@P1", &with_cols, &types),
                    on = key_match(&t),
                    v = bracket(vc),
                    c = conflict("newest_wins", super::LOCAL_NEWER)
                )
            }
            _ => String::new(),
        };
        let payload = serde_json::to_string(&row).map_err(|e| PortError::new(e.to_string()))?;
        let key_text = serde_json::to_string(&u.key).map_err(|e| PortError::new(e.to_string()))?;
        let id = u.update_id.clone();
        let entity = u.entity.clone();
        let batch = format!(
            "SET XACT_ABORT OFF; EXEC sp_set_session_context N'tether.apply', 1; \
             BEGIN TRY BEGIN TRAN; \
               IF EXISTS (SELECT 1 FROM tether.inbox WHERE update_id = @P2) BEGIN SELECT status, reason, 1 FROM tether.inbox WHERE update_id = @P2; COMMIT; EXEC sp_set_session_context N'tether.apply', 0; RETURN; END; \
               {guard} \
               {stmt} \
               INSERT INTO tether.inbox (update_id, status) VALUES (@P2, 'applied'); \
               COMMIT; SELECT 'applied', NULL, 0; \
             END TRY BEGIN CATCH \
               IF @@TRANCOUNT > 0 ROLLBACK; \
               INSERT INTO tether.inbox (update_id, status, reason) VALUES (@P2, 'failed', ERROR_MESSAGE()); \
               SELECT 'failed', ERROR_MESSAGE(), 0; \
             END CATCH; EXEC sp_set_session_context N'tether.apply', 0;"
        );
        let (status, reason, dup): (String, Option<String>, bool) = self
            .db
            .run(move |c| {
                Box::pin(async move {
                    let row = c
                        .query(
                            batch,
                            &[
                                &payload.as_str(),
                                &id.as_str(),
                                &entity.as_str(),
                                &key_text.as_str(),
                            ],
                        )
                        .await?
                        .into_row()
                        .await?;
                    Ok(row
                        .map(|r| {
                            (
                                r.get::<&str, _>(0).unwrap_or("failed").to_string(),
                                r.get::<&str, _>(1).map(str::to_string),
                                r.get::<i32, _>(2).unwrap_or(0) == 1,
                            )
                        })
                        .unwrap_or(("failed".into(), Some("no result".into()), false)))
                })
            })
            .map_err(port)?;
        Ok(ApplyOutcome {
            status: match status.as_str() {
                "applied" => UpdateStatus::Applied,
                "conflict" => UpdateStatus::Conflict,
                _ => UpdateStatus::Failed,
            },
            reason,
            duplicate: dup,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Direction;

    #[test]
    fn the_one_agent_lock_is_owned_by_the_session_and_never_waits_on_the_server() {
        // Session-owned: released by the server when the holder's connection ends (a killed
        // agent frees it); no server-side wait: the caller's own deadline and retries decide.
        for part in [
            "sp_getapplock @Resource = N'tether-agent'",
            "@LockMode = 'Exclusive'",
            "@LockOwner = 'Session'",
            "@LockTimeout = 0",
            "SELECT @r",
        ] {
            assert!(INSTANCE_LOCK_SQL.contains(part), "{part}");
        }
        // The holder query looks only at this database's granted session lock of that name
        // (`[` escaped in LIKE: the description reads `0:[tether-agent]:(…)`).
        for part in [
            "resource_type = N'APPLICATION'",
            "resource_database_id = DB_ID()",
            "request_status = N'GRANT'",
            "request_owner_type = N'SESSION'",
            "LIKE N'%[[]tether-agent]%'",
            "s.program_name",
        ] {
            assert!(INSTANCE_HOLDER_SQL.contains(part), "{part}");
        }
        // The lock session's name fits the 128-character program_name and names host and pid.
        let me = crate::db::instance::short_holder();
        assert!(me.len() <= 128 && me.contains(&format!("pid {}", std::process::id())));
    }

    #[test]
    fn the_check_script_names_each_problem_install_would_refuse() {
        let tables = vec![
            TableConfig::new("sales.o'rders", "order", &["id", "line"], Direction::Both),
            TableConfig::new("payments", "payment", &["id"], Direction::Up),
        ];
        let b = check_script(&tables);
        assert_eq!(b.len(), 2);
        // Names quoted as identifiers inside N'' literals.
        assert!(b[0].contains("OBJECT_ID(N'[sales].[o''rders]', N'U') IS NULL THROW 50000, N'table `sales.o''rders` (agent.tables) does not exist'"), "{}", b[0]);
        assert!(
            b[0].contains("COL_LENGTH(N'[sales].[o''rders]', N'line') IS NULL THROW 50000"),
            "{}",
            b[0]
        );
        // A table cloud updates go to needs its key unique; the key's columns compared sorted.
        assert!(
            b[0].contains("is_unique = 1") && b[0].contains("= N'id,line')"),
            "{}",
            b[0]
        );
        assert!(b[0].contains("key [id, line] is not the primary key or a unique index"));
        // An up-only table is not held to that.
        assert!(!b[1].contains("is_unique"), "{}", b[1]);
        assert!(INSTALLED_SQL.contains("tether.outbox"));
    }

    fn odd() -> TableConfig {
        TableConfig::new(
            "clinic.My ]Table",
            "odd",
            &["the key", "k]2"],
            Direction::Both,
        )
    }

    #[test]
    fn identifiers_and_literals_are_quoted() {
        assert_eq!(bracket("a]b"), "[a]]b]");
        assert_eq!(bracket_qualified("patients"), "[dbo].[patients]");
        assert_eq!(bracket_qualified("s.t t"), "[s].[t t]");
        assert_eq!(nliteral("it's"), "N'it''s'");
    }

    #[test]
    fn trigger_is_set_based_quoted_and_skips_the_applier() {
        let sql = trigger_sql(&odd());
        assert!(sql.starts_with("CREATE OR ALTER TRIGGER [tether].[capture_clinic_My ]]Table] ON [clinic].[My ]]Table] AFTER INSERT, UPDATE, DELETE"), "{sql}");
        assert!(sql.contains("IF CAST(SESSION_CONTEXT(N'tether.apply') AS int) = 1 RETURN;"));
        // Set-based over inserted/deleted: no cursor, no per-row variables.
        assert!(sql.contains("FROM deleted d") && sql.contains("FROM inserted i"));
        assert!(!sql.to_ascii_uppercase().contains("CURSOR"));
        assert!(sql.contains("FOR JSON PATH, WITHOUT_ARRAY_WRAPPER, INCLUDE_NULL_VALUES"));
        assert!(
            sql.contains("d.[the key] = i.[the key] AND d.[k]]2] = i.[k]]2]"),
            "{sql}"
        );
        assert!(
            sql.contains("(SELECT i.[the key] AS [the key], i.[k]]2] AS [k]]2] FOR JSON PATH"),
            "{sql}"
        );
        assert_eq!(sql.matches("INSERT INTO tether.outbox").count(), 2);
    }

    #[test]
    fn install_and_uninstall_scripts_cover_every_object() {
        let up = TableConfig::new("payments", "payment", &["id"], Direction::Up);
        let down = TableConfig::new("fees", "fee", &["id"], Direction::Down);
        let install = install_script(&[up.clone(), down.clone()]);
        assert!(
            install[0].contains("CREATE TABLE tether.outbox")
                && install[0].contains("rv rowversion")
        );
        assert!(install
            .iter()
            .any(|b| b.contains("CREATE OR ALTER TRIGGER [tether].[capture_payments]")));
        assert!(
            !install
                .iter()
                .any(|b| b.contains("CREATE OR ALTER TRIGGER [tether].[capture_fees]")),
            "down-only tables are not captured"
        );
        let un = uninstall_script(&[up, down]).join("\n");
        for obj in [
            "DROP TRIGGER [tether].[capture_payments]",
            "tether.outbox",
            "tether.state",
            "tether.inbox",
            "tether.conflicts",
            "DROP SCHEMA tether",
        ] {
            assert!(un.contains(obj), "{obj} not dropped:\n{un}");
        }
    }

    #[test]
    fn change_tracking_pump_is_commit_ordered_skips_the_applier_and_refuses_silent_gaps() {
        let t = TableConfig::new("dbo.visits", "visit", &["id"], Direction::Up);
        let install = change_tracking_install_script(std::slice::from_ref(&t), 7).join("\n");
        assert!(
            install.contains("SET CHANGE_TRACKING = ON (CHANGE_RETENTION = 7 DAYS"),
            "{install}"
        );
        assert!(
            install.contains("ALTER TABLE [dbo].[visits] ENABLE CHANGE_TRACKING"),
            "{install}"
        );
        assert!(
            !install.contains("CREATE OR ALTER TRIGGER"),
            "no triggers in change_tracking mode"
        );
        let pump = change_tracking_pump_sql(&t);
        assert!(
            pump.contains("CHANGE_TRACKING_MIN_VALID_VERSION(OBJECT_ID(N'[dbo].[visits]'))"),
            "{pump}"
        );
        assert!(
            pump.contains("THROW 50001"),
            "falling behind is an error: {pump}"
        );
        assert!(pump.contains("CHANGETABLE(CHANGES [dbo].[visits], @from)"));
        assert!(
            pump.contains("ct.SYS_CHANGE_VERSION <= @to")
                && pump.contains("ORDER BY ct.SYS_CHANGE_VERSION")
        );
        assert!(
            pump.contains(&format!("ct.SYS_CHANGE_CONTEXT <> {CT_CONTEXT}")),
            "echo suppression"
        );
        assert!(pump.contains("UPDATE tether.state SET value = @to"));
    }

    #[test]
    fn snapshot_chunk_is_keyed_locked_and_resumable() {
        let t = TableConfig::new(
            "clinic.appts",
            "appointment",
            &["clinic_no", "id"],
            Direction::Both,
        );
        let types: HashMap<String, String> = [
            ("clinic_no".to_string(), "int".to_string()),
            ("id".to_string(), "bigint".to_string()),
        ]
        .into();
        let sql = snapshot_chunk_sql(&t, &types, 500);
        assert!(sql.contains("SELECT TOP (500)"), "{sql}");
        assert!(
            sql.contains("WITH (HOLDLOCK, ROWLOCK)"),
            "live updates wait for the chunk: {sql}"
        );
        assert!(sql.contains("(t.[clinic_no] > last.[clinic_no]) OR (t.[clinic_no] = last.[clinic_no] AND t.[id] > last.[id])"), "{sql}");
        assert!(sql.contains("ORDER BY t.[clinic_no], t.[id]"), "{sql}");
        assert!(sql.contains("OPENJSON(@last) WITH ([clinic_no] int N'$.\"clinic_no\"', [id] bigint N'$.\"id\"')"), "{sql}");
        assert!(sql.contains("N'snapshot:clinic.appts'"), "{sql}");
        assert!(sql.contains("N'done'"));
    }

    #[test]
    fn reads_are_bounded_by_min_active_rowversion() {
        assert!(READ_SQL.contains("rv < MIN_ACTIVE_ROWVERSION()"));
        assert!(READ_SQL.contains("ORDER BY rv"));
        assert!(READ_SQL.contains("CAST(rv AS bigint) AS seq"));
    }

    #[test]
    fn merge_and_delete_use_declared_types() {
        let t = odd();
        let types: HashMap<String, String> = [
            ("the key".to_string(), "int".to_string()),
            ("k]2".to_string(), "nvarchar(20)".to_string()),
            (
                "amount".to_string(),
                declared_type("decimal", None, Some(10), Some(2)),
            ),
        ]
        .into();
        let cols = vec![
            "the key".to_string(),
            "k]2".to_string(),
            "amount".to_string(),
        ];
        let m = merge_sql(&t, &cols, &types);
        assert!(
            m.starts_with("MERGE [clinic].[My ]]Table] WITH (HOLDLOCK)"),
            "{m}"
        );
        assert!(m.contains("[amount] decimal(10,2) N'$.\"amount\"'"), "{m}");
        assert!(
            m.contains("ON target.[the key] = src.[the key] AND target.[k]]2] = src.[k]]2]"),
            "{m}"
        );
        assert!(
            m.contains("WHEN MATCHED THEN UPDATE SET target.[amount] = src.[amount]"),
            "{m}"
        );
        let d = delete_sql(&t, &types);
        assert!(
            d.starts_with(
                "DELETE target FROM [clinic].[My ]]Table] AS target JOIN (SELECT j.[the key], j.[k]]2] FROM OPENJSON(@P1)"
            ),
            "{d}"
        );
        assert_eq!(
            declared_type("nvarchar", Some(-1), None, None),
            "nvarchar(max)"
        );
        assert_eq!(
            declared_type("datetime2", None, None, Some(7)),
            "datetime2(7)"
        );
        assert_eq!(
            declared_type("uniqueidentifier", None, None, None),
            "uniqueidentifier"
        );
    }

    /// The shared table of values (`values::fixture`) through SQL Server's SQL text: rows as
    /// `FOR JSON` writes them for the declared types read back in the wire form, and the wire
    /// form turned into what the apply SQL (`OPENJSON … WITH`, `CONVERT(…, 2)`) reads. Run
    /// live with TETHER_TEST_MSSQL (tests/sqlserver.rs).
    #[test]
    fn values_round_trip_through_the_sql_text() {
        use crate::db::values::{fixture, ColumnTypes, ValueType};
        use serde_json::json;
        let declared: HashMap<String, String> = [
            ("id", "int"),
            ("flag", "bit"),
            ("at", "datetime2(7)"),
            ("day", "date"),
            ("amount", "decimal(12,4)"),
            ("data", "varbinary(max)"),
            ("note", "nvarchar(100)"),
        ]
        .iter()
        .map(|(c, t)| (c.to_string(), t.to_string()))
        .collect();
        let wire = ColumnTypes::new(
            declared
                .iter()
                .map(|(c, t)| (c.clone(), ValueType::of_sqlserver(t))),
            &Default::default(),
        );
        // Nanoseconds cut to datetime2(7)'s 100 ns.
        let seven = |s: &str| s[..s.len() - 2].to_string();
        // FOR JSON's spelling: bit as true/false, datetime2(7) with seven fraction digits and
        // no zone, decimal(12,4) as a number with four decimals, varbinary as base64.
        let for_json = |row: &Value, at_offset: bool| -> String {
            let mut out = Vec::new();
            for col in ["id", "flag", "at", "day", "amount", "data", "note"] {
                let v = &row[col];
                let text = match (col, v) {
                    (_, Value::Null) => "null".to_string(),
                    ("at", Value::String(s)) => {
                        let t = crate::db::values::parse_timestamp(s).expect("fixture time");
                        if at_offset {
                            // datetimeoffset, written in a +01:00 session.
                            let local = t + chrono::TimeDelta::hours(1);
                            format!(
                                "\"{}+01:00\"",
                                seven(&local.format("%Y-%m-%dT%H:%M:%S%.9f").to_string())
                            )
                        } else {
                            format!(
                                "\"{}\"",
                                seven(&t.format("%Y-%m-%dT%H:%M:%S%.9f").to_string())
                            )
                        }
                    }
                    ("amount", Value::String(d)) => {
                        let (i, f) = d.split_once('.').unwrap_or((d, ""));
                        format!("{i}.{f:0<4}")
                    }
                    _ => v.to_string(),
                };
                out.push(format!("\"{col}\":{text}"));
            }
            format!("{{{}}}", out.join(","))
        };
        for row in fixture::rows() {
            let text = for_json(&row, false);
            let got = parse_obj(Some(&text), &wire, "row_json", 1)
                .expect("parse")
                .map(Value::Object);
            assert_eq!(got.as_ref(), Some(&row), "{text}");
            let text = for_json(&row, true);
            let got = parse_obj(Some(&text), &wire, "row_json", 1)
                .expect("parse")
                .map(Value::Object);
            assert_eq!(got.as_ref(), Some(&row), "{text}");
        }

        // Apply: what OPENJSON reads for each wire row.
        let rows = fixture::rows();
        let mut first = rows[0].as_object().cloned().unwrap_or_default();
        wire_to_sqlserver(&mut first, &declared, &Default::default()).expect("convert");
        assert_eq!(
            Value::Object(first),
            json!({"id": 1, "flag": true, "at": "2026-12-01T10:00:00", "day": "2026-12-01",
                   "amount": "12.5", "data": "00ff", "note": "plain"})
        );
        let mut fourth = rows[3].as_object().cloned().unwrap_or_default();
        wire_to_sqlserver(&mut fourth, &declared, &Default::default()).expect("convert");
        assert_eq!(fourth["at"], json!("2026-06-30T22:30:00.123456"));
        assert_eq!(fourth["data"], json!("deadbeef00010203"));
        // `datetime` holds milliseconds; datetimeoffset takes the `Z` as it is.
        let mut d = declared.clone();
        d.insert("at".into(), "datetime".into());
        let mut r = rows[3].as_object().cloned().unwrap_or_default();
        wire_to_sqlserver(&mut r, &d, &Default::default()).expect("convert");
        assert_eq!(r["at"], json!("2026-06-30T22:30:00.123"));
        d.insert("at".into(), "datetimeoffset(7)".into());
        let mut r = rows[3].as_object().cloned().unwrap_or_default();
        wire_to_sqlserver(&mut r, &d, &Default::default()).expect("convert");
        assert_eq!(r["at"], json!("2026-06-30T22:30:00.123456Z"));
        // Not base64: refused, naming the column.
        let mut bad = json!({"id": 1, "data": "0x00FF"})
            .as_object()
            .cloned()
            .unwrap_or_default();
        let err = wire_to_sqlserver(&mut bad, &declared, &Default::default()).unwrap_err();
        assert!(err.contains("`data`") && err.contains("base64"), "{err}");

        let t = TableConfig::new("kinds", "kind", &["id"], Direction::Both);
        let cols: Vec<String> = ["id", "flag", "at", "day", "amount", "data", "note"]
            .iter()
            .map(|c| c.to_string())
            .collect();
        let m = merge_sql(&t, &cols, &declared);
        for part in [
            "USING (SELECT j.[id], j.[flag], j.[at], j.[day], j.[amount], CONVERT(varbinary(max), j.[data], 2) AS [data], j.[note] FROM OPENJSON(@P1) WITH (",
            "[flag] bit N'$.\"flag\"'",
            "[at] datetime2(7) N'$.\"at\"'",
            "[amount] decimal(12,4) N'$.\"amount\"'",
            "[data] varchar(max) N'$.\"data\"'",
            ") AS j) AS src ON target.[id] = src.[id]",
            "target.[data] = src.[data]",
        ] {
            assert!(m.contains(part), "{part}\n{m}");
        }
    }
}

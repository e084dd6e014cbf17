//! `agent.rpc.queries` on SQL Server: the allow-listed, named queries the gateway may ask for
//! (`POST /v1/clinics/{id}/rpc`).
//!
//! A query names its parameters as on the other engines (`:patient_id`); each becomes a real
//! parameter (`@P1`, …) bound through tiberius (`sp_executesql`), typed from the JSON value
//! (string → `nvarchar`, integer → `bigint`, number → `float`, boolean → `bit`), so a value is
//! never SQL text. Each run is one batch: `SET ROWCOUNT` (max_rows + 1), `SET LOCK_TIMEOUT`
//! (= `agent.rpc.timeout`), `SET TRANSACTION ISOLATION LEVEL SNAPSHOT` when the database allows
//! it (else `READ COMMITTED`, said once at start), `BEGIN TRAN`, the query, `ROLLBACK`: SQL
//! Server has no read-only transaction, so the text is checked (one `SELECT`/`WITH` statement,
//! no write, `INTO`, `EXEC` or remote rowset) and anything it could still change is rolled back.
//! Rows come back in the wire form of every value (docs/PROTOCOL.md "Values": booleans, UTC
//! timestamps, exact decimal strings, base64 binary).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Map, Value};
use tether_actors::ports::{QueryError, QueryRows, QueryRunner};
use tiberius::ColumnData;

use super::{nliteral, MssqlDb, MssqlError};
use crate::config::RpcConfig;
use crate::db::named_params::{pieces, Dialect, Piece};
use crate::db::values;

/// Rows returned when a query sets no `max_rows`.
const DEFAULT_MAX_ROWS: usize = 1000;

/// T-SQL words that write, run other code or reach other servers, refused in a query's text
/// (besides the common list of `check-config`).
const TSQL_REFUSED: [&str; 13] = [
    "MERGE",
    "INTO",
    "EXEC",
    "EXECUTE",
    "TRUNCATE",
    "OPENROWSET",
    "OPENQUERY",
    "OPENDATASOURCE",
    "GRANT",
    "DENY",
    "REVOKE",
    "DBCC",
    "WAITFOR",
];

/// Why a query's text may not run on SQL Server (`None`: it may).
pub fn tsql_problem(sql: &str) -> Option<String> {
    if let Some(why) = crate::config::read_only_sql_problem(sql) {
        return Some(why);
    }
    // The words outside literals, bracketed/quoted identifiers and comments.
    let words: Vec<String> = pieces(sql, Dialect::TSql)
        .iter()
        .filter_map(|p| match p {
            Piece::Text(t) => Some(t.clone()),
            Piece::Param(_) => None,
        })
        .flat_map(|t| {
            strip_quoted(&t)
                .split(|c: char| !(c.is_alphanumeric() || c == '_'))
                .map(str::to_ascii_uppercase)
                .collect::<Vec<_>>()
        })
        .collect();
    words
        .iter()
        .find(|w| TSQL_REFUSED.contains(&w.as_str()))
        .map(|w| format!("it contains {w}"))
}

/// `text` without its string literals, quoted and bracketed identifiers and comments.
fn strip_quoted(text: &str) -> String {
    let mut out = String::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\'' | '"' | '[' => {
                let end = if c == '[' { ']' } else { c };
                for d in chars.by_ref() {
                    if d == end {
                        break;
                    }
                }
                out.push(' ');
            }
            '-' if chars.peek() == Some(&'-') => {
                for d in chars.by_ref() {
                    if d == '\n' {
                        break;
                    }
                }
                out.push(' ');
            }
            '/' if chars.peek() == Some(&'*') => {
                chars.next();
                let mut prev = ' ';
                for d in chars.by_ref() {
                    if prev == '*' && d == '/' {
                        break;
                    }
                    prev = d;
                }
                out.push(' ');
            }
            _ => out.push(c),
        }
    }
    out
}

/// A query's text with each `:name` as `@P<n>` (one number per name) and the names in
/// parameter order.
pub fn render(sql: &str) -> (String, Vec<String>) {
    let mut text = String::new();
    let mut order: Vec<String> = Vec::new();
    for p in pieces(sql.trim_end().trim_end_matches(';'), Dialect::TSql) {
        match p {
            Piece::Text(t) => text.push_str(&t),
            Piece::Param(n) => {
                let i = match order.iter().position(|x| *x == n) {
                    Some(i) => i,
                    None => {
                        order.push(n);
                        order.len() - 1
                    }
                };
                text.push_str(&format!("@P{}", i + 1));
            }
        }
    }
    (text, order)
}

/// The batch one run sends: limits, isolation, the query inside a transaction that is rolled
/// back.
pub fn batch(body: &str, max_rows: usize, timeout: Duration, snapshot: bool) -> String {
    format!(
        "SET NOCOUNT ON; SET XACT_ABORT ON; SET ROWCOUNT {rows}; SET LOCK_TIMEOUT {ms}; \
         SET TRANSACTION ISOLATION LEVEL {iso}; BEGIN TRAN;\n{body}\n;\nROLLBACK; SET ROWCOUNT 0;",
        rows = max_rows + 1,
        ms = timeout.as_millis().min(i32::MAX as u128),
        iso = if snapshot {
            "SNAPSHOT"
        } else {
            "READ COMMITTED"
        },
    )
}

/// `sp_describe_first_result_set` on the query: SQL Server parses and binds it (names, types)
/// without running it; every parameter declared `nvarchar(4000)`.
pub fn probe_sql(body: &str, params: usize) -> String {
    let decl: Vec<String> = (1..=params)
        .map(|i| format!("@P{i} nvarchar(4000)"))
        .collect();
    format!(
        "EXEC sp_describe_first_result_set @tsql = {}, @params = {}",
        nliteral(body),
        nliteral(&decl.join(", "))
    )
}

/// Whether the database lets a transaction read at SNAPSHOT isolation.
pub const SNAPSHOT_STATE_SQL: &str = "SELECT CAST(snapshot_isolation_state AS int) AS state FROM sys.databases WHERE database_id = DB_ID()";

/// A JSON parameter as a value tiberius binds.
#[derive(Debug, Clone, PartialEq)]
pub enum Param {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Text(String),
}

impl Param {
    pub fn of(v: &Value) -> Option<Param> {
        Some(match v {
            Value::Null => Param::Null,
            Value::Bool(b) => Param::Bool(*b),
            Value::Number(n) => match n.as_i64() {
                Some(i) => Param::Int(i),
                None => Param::Float(n.as_f64()?),
            },
            Value::String(s) => Param::Text(s.clone()),
            Value::Array(_) | Value::Object(_) => return None,
        })
    }

    fn as_sql(&self) -> &dyn tiberius::ToSql {
        const NULL: Option<&str> = None;
        match self {
            Param::Null => &NULL,
            Param::Bool(b) => b,
            Param::Int(i) => i,
            Param::Float(f) => f,
            Param::Text(s) => s,
        }
    }
}

/// One cell in the wire form.
pub fn cell_json(d: &ColumnData<'static>) -> Value {
    use chrono::{NaiveDate, NaiveDateTime, NaiveTime, TimeDelta};
    let midnight = |secs: i64, nanos: i64| {
        NaiveTime::MIN + TimeDelta::seconds(secs) + TimeDelta::nanoseconds(nanos)
    };
    let day = |base: NaiveDate, days: i64| base.checked_add_signed(TimeDelta::days(days));
    let y1900 = NaiveDate::from_ymd_opt(1900, 1, 1);
    let y1 = NaiveDate::from_ymd_opt(1, 1, 1);
    let time_of = |t: tiberius::time::Time| {
        let per_sec = 10u64.pow(u32::from(t.scale()));
        let secs = t.increments() / per_sec;
        let nanos = (t.increments() % per_sec) * (1_000_000_000 / per_sec);
        midnight(secs as i64, nanos as i64)
    };
    let stamp = |dt: Option<NaiveDateTime>| match dt {
        Some(dt) => Value::String(values::format_timestamp(&dt.and_utc())),
        None => Value::Null,
    };
    match d {
        ColumnData::U8(v) => v.map_or(Value::Null, Value::from),
        ColumnData::I16(v) => v.map_or(Value::Null, Value::from),
        ColumnData::I32(v) => v.map_or(Value::Null, Value::from),
        ColumnData::I64(v) => v.map_or(Value::Null, Value::from),
        ColumnData::F32(v) => v
            .and_then(|f| serde_json::Number::from_f64(f64::from(f)))
            .map_or(Value::Null, Value::Number),
        ColumnData::F64(v) => v
            .and_then(serde_json::Number::from_f64)
            .map_or(Value::Null, Value::Number),
        ColumnData::Bit(v) => v.map_or(Value::Null, Value::Bool),
        ColumnData::String(v) => v
            .as_ref()
            .map_or(Value::Null, |s| Value::String(s.to_string())),
        ColumnData::Guid(v) => v.map_or(Value::Null, |g| {
            Value::String(g.to_string().to_ascii_uppercase())
        }),
        ColumnData::Binary(v) => v
            .as_ref()
            .map_or(Value::Null, |b| Value::String(values::base64_encode(b))),
        ColumnData::Numeric(v) => v.map_or(Value::Null, |n| {
            let text = n.to_string();
            Value::String(values::canonical_decimal(&text).unwrap_or(text))
        }),
        ColumnData::Xml(v) => v
            .as_ref()
            .map_or(Value::Null, |x| Value::String(x.to_string())),
        ColumnData::DateTime(v) => stamp(v.and_then(|v| {
            // Days since 1900-01-01 and 1/300 s since midnight.
            let frag = i64::from(v.seconds_fragments());
            let t = midnight(frag / 300, (frag % 300) * 1_000_000_000 / 300);
            day(y1900?, i64::from(v.days())).map(|d| d.and_time(t))
        })),
        ColumnData::SmallDateTime(v) => stamp(v.and_then(|v| {
            let t = midnight(i64::from(v.seconds_fragments()) * 60, 0);
            day(y1900?, i64::from(v.days())).map(|d| d.and_time(t))
        })),
        ColumnData::Date(v) => v
            .and_then(|v| day(y1?, i64::from(v.days())))
            .map_or(Value::Null, |d| {
                Value::String(d.format("%Y-%m-%d").to_string())
            }),
        ColumnData::Time(v) => v.map_or(Value::Null, |t| {
            let t = time_of(t);
            let frac = format!("{:09}", chrono::Timelike::nanosecond(&t));
            let frac = frac.trim_end_matches('0');
            let dot = if frac.is_empty() { "" } else { "." };
            Value::String(format!("{}{dot}{frac}", t.format("%H:%M:%S")))
        }),
        ColumnData::DateTime2(v) => stamp(v.and_then(|v| {
            day(y1?, i64::from(v.date().days())).map(|d| d.and_time(time_of(v.time())))
        })),
        // The date and time of a datetimeoffset are in UTC on the wire; the offset is only
        // how it was written.
        ColumnData::DateTimeOffset(v) => stamp(v.and_then(|v| {
            let dt2 = v.datetime2();
            day(y1?, i64::from(dt2.date().days())).map(|d| d.and_time(time_of(dt2.time())))
        })),
    }
}

struct Query {
    body: String,
    params: Vec<String>,
    order: Vec<String>,
    max_rows: usize,
}

/// The allow-listed queries of a SQL Server clinic database.
pub struct MssqlQueries {
    db: Arc<MssqlDb>,
    queries: HashMap<String, Query>,
    timeout: Duration,
    snapshot: bool,
}

impl MssqlQueries {
    /// Checks every query (read-only text, parameters declared and used, SQL Server parses and
    /// binds it) and whether SNAPSHOT isolation is allowed, before the agent starts.
    pub fn open(db: Arc<MssqlDb>, rpc: &RpcConfig) -> Result<Self, MssqlError> {
        let mut queries = HashMap::new();
        for (name, q) in &rpc.queries {
            let setup = |m: String| MssqlError::Config(format!("agent.rpc.queries.{name}: {m}"));
            if let Some(why) = tsql_problem(&q.sql) {
                return Err(setup(format!("not a read-only query: {why}")));
            }
            let (body, order) = render(&q.sql);
            if let Some(n) = order.iter().find(|n| !q.params.contains(n)) {
                return Err(setup(format!(
                    "uses :{n}, which is not in its params {:?}",
                    q.params
                )));
            }
            let probe = probe_sql(&body, order.len());
            db.run(move |c| {
                Box::pin(async move { c.simple_query(probe).await?.into_results().await })
            })
            .map_err(|e| setup(format!("SQL Server does not accept it: {e}")))?;
            queries.insert(
                name.clone(),
                Query {
                    body,
                    params: q.params.clone(),
                    order,
                    max_rows: match q.max_rows {
                        0 => DEFAULT_MAX_ROWS,
                        n => n as usize,
                    },
                },
            );
        }
        let snapshot = if queries.is_empty() {
            false
        } else {
            let state: i32 = db.run(|c| {
                Box::pin(async move {
                    let row = c.simple_query(SNAPSHOT_STATE_SQL).await?.into_row().await?;
                    Ok(row.and_then(|r| r.get::<i32, _>(0)).unwrap_or(0))
                })
            })?;
            if state != 1 {
                log::warn!(target: tether_actors::log_target::ERROR, "event=rpc_isolation isolation=read_committed detail=\"snapshot isolation is off on this database: agent.rpc.queries run at READ COMMITTED (they take shared locks while they read); ALTER DATABASE … SET ALLOW_SNAPSHOT_ISOLATION ON lets them read without blocking writers\"");
            }
            state == 1
        };
        Ok(MssqlQueries {
            db,
            queries,
            timeout: rpc.timeout.get(),
            snapshot,
        })
    }
}

impl QueryRunner for MssqlQueries {
    fn run(&self, name: &str, params: &tether_schemas::Row) -> Result<QueryRows, QueryError> {
        let q = crate::db::named_params::lookup(&self.queries, name, params, |q| &q.params)?;
        let mut bound = Vec::with_capacity(q.order.len());
        for n in &q.order {
            let v = params.get(n).ok_or_else(|| QueryError {
                field: Some(format!("params.{n}")),
                message: format!("query `{name}` needs `{n}`"),
            })?;
            bound.push(Param::of(v).ok_or_else(|| QueryError {
                field: Some(format!("params.{n}")),
                message: "must be a string, number, boolean or null".into(),
            })?);
        }
        let sql = batch(&q.body, q.max_rows, self.timeout, self.snapshot);
        let label = name.to_string();
        let rows: Vec<Map<String, Value>> = self
            .db
            .run_within(self.timeout, move |c| {
                Box::pin(async move {
                    let refs: Vec<&dyn tiberius::ToSql> = bound.iter().map(Param::as_sql).collect();
                    let rows = c.query(sql, &refs).await?.into_first_result().await?;
                    Ok(rows
                        .iter()
                        .map(|r| {
                            r.cells()
                                .map(|(col, d)| (col.name().to_string(), cell_json(d)))
                                .collect()
                        })
                        .collect())
                })
            })
            .map_err(|e| QueryError {
                field: None,
                message: format!("query `{label}` failed: {e}"),
            })?;
        let truncated = rows.len() > q.max_rows;
        Ok(QueryRows {
            rows: rows.into_iter().take(q.max_rows).collect(),
            truncated,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parameters_become_numbered_and_each_name_binds_once() {
        let (body, order) =
            render("SELECT [a:b], N':no' FROM p WHERE id = :id OR parent = :id AND name = :name; ");
        assert_eq!(
            body,
            "SELECT [a:b], N':no' FROM p WHERE id = @P1 OR parent = @P1 AND name = @P2"
        );
        assert_eq!(order, vec!["id", "name"]);
        let b = batch(&body, 10, Duration::from_secs(5), true);
        for part in [
            "SET ROWCOUNT 11;",
            "SET LOCK_TIMEOUT 5000;",
            "SET TRANSACTION ISOLATION LEVEL SNAPSHOT; BEGIN TRAN;\nSELECT",
            "\n;\nROLLBACK;",
        ] {
            assert!(b.contains(part), "{part}\n{b}");
        }
        assert!(batch(&body, 10, Duration::from_secs(5), false).contains("READ COMMITTED"));
        assert_eq!(
            probe_sql("SELECT * FROM p WHERE n = @P1 AND x = 'it''s'", 1),
            "EXEC sp_describe_first_result_set @tsql = N'SELECT * FROM p WHERE n = @P1 AND x = ''it''''s''', @params = N'@P1 nvarchar(4000)'"
        );
    }

    #[test]
    fn texts_that_write_run_code_or_reach_out_are_refused() {
        for sql in [
            "SELECT * INTO copy FROM patients",
            "WITH x AS (SELECT 1 AS a) MERGE p USING x ON 1=0 WHEN NOT MATCHED THEN INSERT (a) VALUES (1)",
            "SELECT * FROM OPENROWSET('SQLNCLI', 'Server=x;', 'SELECT 1')",
            "SELECT 1; EXEC xp_cmdshell 'dir'",
            "SELECT 1 WAITFOR DELAY '00:10'",
            "DELETE FROM patients",
        ] {
            assert!(tsql_problem(sql).is_some(), "{sql:?} passed");
        }
        for sql in [
            "SELECT id, [into], 'EXEC' AS word FROM p WHERE n = :n -- merge\n",
            "WITH t AS (SELECT 1 AS a) SELECT a FROM t /* INTO */",
        ] {
            assert_eq!(tsql_problem(sql), None, "{sql:?} refused");
        }
    }

    #[test]
    fn check_config_refuses_a_t_sql_write_for_a_sql_server_clinic() {
        let text = |kind: &str| {
            format!(
                "agent:\n  clinic_id: c1\n  database:\n    kind: {kind}\n    connection: \"server=tcp:db,1433;user=sa;password=x\"\n    path: x.db\n  gateway:\n    url: ws://unused/v1/ws\n    insecure_plaintext: true\n  tables:\n    - {{table: patients, entity: patient, key: [id]}}\n  rpc:\n    queries:\n      copy:\n        sql: \"SELECT * INTO backup FROM patients\"\n"
            )
        };
        let err = match crate::config::Config::parse(&text("sqlserver"), "t") {
            Ok(_) => panic!("check-config accepted SELECT … INTO on SQL Server"),
            Err(e) => e.to_string(),
        };
        assert!(
            err.contains("agent.rpc.queries.copy.sql") && err.contains("it contains INTO"),
            "{err}"
        );
    }

    #[test]
    fn cells_take_the_wire_form() {
        use std::borrow::Cow;
        use tiberius::time::{Date, DateTime, DateTime2, DateTimeOffset, SmallDateTime, Time};
        let c = |d: ColumnData<'static>| cell_json(&d);
        assert_eq!(c(ColumnData::Bit(Some(true))), json!(true));
        assert_eq!(c(ColumnData::I32(None)), Value::Null);
        assert_eq!(c(ColumnData::String(None)), Value::Null);
        assert_eq!(c(ColumnData::Binary(None)), Value::Null);
        assert_eq!(c(ColumnData::DateTime2(None)), Value::Null);
        assert_eq!(
            c(ColumnData::Binary(Some(Cow::Owned(vec![0, 255])))),
            json!("AP8=")
        );
        assert_eq!(
            c(ColumnData::Numeric(Some(
                tiberius::numeric::Numeric::new_with_scale(1250, 2)
            ))),
            json!("12.5")
        );
        // 2026-12-01 is day 46,355 since 1900-01-01 and day 739,950 since 0001-01-01.
        assert_eq!(
            c(ColumnData::DateTime(Some(DateTime::new(
                46_355,
                300 * 36_000 + 75
            )))),
            json!("2026-12-01T10:00:00.25Z")
        );
        assert_eq!(
            c(ColumnData::SmallDateTime(Some(SmallDateTime::new(
                46_355, 601
            )))),
            json!("2026-12-01T10:01:00Z")
        );
        assert_eq!(
            c(ColumnData::Date(Some(Date::new(739_950)))),
            json!("2026-12-01")
        );
        let ten = Time::new(36_000 * 10_000_000 + 1_234_567, 7);
        assert_eq!(
            c(ColumnData::DateTime2(Some(DateTime2::new(
                Date::new(739_950),
                ten
            )))),
            json!("2026-12-01T10:00:00.1234567Z")
        );
        // Stored in UTC with the writer's offset (+02:00): read as the UTC instant.
        assert_eq!(
            c(ColumnData::DateTimeOffset(Some(DateTimeOffset::new(
                DateTime2::new(Date::new(739_950), ten),
                120
            )))),
            json!("2026-12-01T10:00:00.1234567Z")
        );
        assert_eq!(c(ColumnData::Time(Some(ten))), json!("10:00:00.1234567"));
        assert_eq!(
            Param::of(&json!({"a": 1})),
            None,
            "objects are not parameters"
        );
        assert_eq!(Param::of(&json!(7)), Some(Param::Int(7)));
    }
}

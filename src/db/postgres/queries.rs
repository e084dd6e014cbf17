//! `agent.rpc.queries` on PostgreSQL: the allow-listed, named queries the gateway may ask for
//! (`POST /v1/clinics/{id}/rpc`), run in a `READ ONLY` transaction with `statement_timeout` on a
//! connection of their own.
//!
//! A query names its parameters as on SQLite (`:patient_id`). Each is replaced by a quoted SQL
//! literal (never pasted as text: strings are quoted with every `'` doubled, under
//! `standard_conforming_strings = on`; numbers and booleans come from JSON as such), so PostgreSQL
//! types it from its context exactly as it would a literal typed into the query. Rows come back
//! as PostgreSQL's own JSON of each row (`row_to_json`): numbers as numbers, booleans as
//! booleans, timestamps in ISO 8601.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::{Map, Value};
use tether_actors::ports::{QueryError, QueryRows, QueryRunner};

use super::{PgConn, PgError};
use crate::config::RpcConfig;
use crate::db::named_params::{pieces, Dialect, Piece};

/// Rows returned when a query sets no `max_rows`.
const DEFAULT_MAX_ROWS: usize = 1000;

/// A JSON scalar as a SQL literal, or why it cannot be one.
fn literal(v: &Value) -> Result<String, &'static str> {
    Ok(match v {
        Value::Null => "NULL".into(),
        Value::Bool(b) => if *b { "TRUE" } else { "FALSE" }.into(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => {
            if s.contains('\0') {
                return Err("must not contain a NUL character");
            }
            format!("'{}'", s.replace('\'', "''"))
        }
        Value::Array(_) | Value::Object(_) => {
            return Err("must be a string, number, boolean or null")
        }
    })
}

struct Query {
    pieces: Vec<Piece>,
    params: Vec<String>,
    max_rows: usize,
}

/// The allow-listed queries of a PostgreSQL clinic database.
pub struct PgQueries {
    conn: PgConn,
    queries: HashMap<String, Query>,
    timeout: Duration,
}

impl PgQueries {
    /// Checks every query (read-only text, parameters declared and used, and PostgreSQL
    /// parses it with NULLs for the parameters) before the agent starts.
    pub fn open(conn: &str, rpc: &RpcConfig) -> Result<Self, PgError> {
        let c = PgConn::open(conn)?;
        let mut queries = HashMap::new();
        for (name, q) in &rpc.queries {
            let setup = |m: String| PgError::Setup(format!("agent.rpc.queries.{name}: {m}"));
            if let Some(why) = crate::config::read_only_sql_problem(&q.sql) {
                return Err(setup(format!("not a read-only query: {why}")));
            }
            // A trailing `;` would end the statement inside the wrapper.
            let pieces = pieces(q.sql.trim_end().trim_end_matches(';'), Dialect::Postgres);
            for p in &pieces {
                if let Piece::Param(n) = p {
                    if !q.params.contains(n) {
                        return Err(setup(format!(
                            "uses :{n}, which is not in its params {:?}",
                            q.params
                        )));
                    }
                }
            }
            let probe = render(&pieces, &Map::new(), true).map_err(|e| setup(e.message))?;
            let sql = format!("SELECT row_to_json(t)::text FROM (\n{probe}\n) t LIMIT 0");
            c.with(move |cl| {
                let mut tx = cl
                    .build_transaction()
                    .read_only(true)
                    .start()
                    .map_err(super::port("begin"))?;
                tx.simple_query(&sql)
                    .map_err(super::port("checking the query"))?;
                Ok(())
            })
            .map_err(|e| setup(e.to_string()))?;
            queries.insert(
                name.clone(),
                Query {
                    pieces,
                    params: q.params.clone(),
                    max_rows: match q.max_rows {
                        0 => DEFAULT_MAX_ROWS,
                        n => n as usize,
                    },
                },
            );
        }
        Ok(PgQueries {
            conn: c,
            queries,
            timeout: rpc.timeout.get(),
        })
    }
}

/// The query with every parameter as a literal (`nulls`: every one NULL, for checking).
fn render(
    pieces: &[Piece],
    params: &Map<String, Value>,
    nulls: bool,
) -> Result<String, QueryError> {
    let mut sql = String::new();
    for p in pieces {
        match p {
            Piece::Text(t) => sql.push_str(t),
            Piece::Param(n) if nulls => {
                let _ = n;
                sql.push_str("NULL");
            }
            Piece::Param(n) => {
                let v = params.get(n).ok_or_else(|| QueryError {
                    field: Some(format!("params.{n}")),
                    message: format!("the query needs `{n}`"),
                })?;
                let lit = literal(v).map_err(|m| QueryError {
                    field: Some(format!("params.{n}")),
                    message: m.into(),
                })?;
                sql.push_str(&lit);
            }
        }
    }
    Ok(sql)
}

impl QueryRunner for PgQueries {
    fn run(&self, name: &str, params: &tether_schemas::Row) -> Result<QueryRows, QueryError> {
        let q = crate::db::named_params::lookup(&self.queries, name, params, |q| &q.params)?;
        let body = render(&q.pieces, params, false)?;
        let sql = format!(
            "SELECT row_to_json(t)::text FROM (\n{body}\n) t LIMIT {}",
            q.max_rows + 1
        );
        let (max, timeout_ms, label) = (q.max_rows, self.timeout.as_millis(), name.to_string());
        let texts = self
            .conn
            .with(move |cl| {
                let mut tx = cl
                    .build_transaction()
                    .read_only(true)
                    .start()
                    .map_err(super::port("begin"))?;
                tx.batch_execute(&format!(
                    "SET LOCAL statement_timeout = {timeout_ms}; SET LOCAL standard_conforming_strings = on"
                ))
                .map_err(super::port("setting the query's limits"))?;
                let msgs = tx
                    .simple_query(&sql)
                    .map_err(super::port(&format!("query `{label}`")))?;
                Ok(msgs
                    .into_iter()
                    .filter_map(|m| match m {
                        postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
                        _ => None,
                    })
                    .collect::<Vec<String>>())
            })
            .map_err(|e| QueryError {
                field: None,
                message: e.to_string(),
            })?;
        let mut out = QueryRows::default();
        for t in texts {
            if out.rows.len() == max {
                out.truncated = true;
                break;
            }
            match serde_json::from_str::<Value>(&t) {
                Ok(Value::Object(m)) => out.rows.push(m),
                _ => {
                    return Err(QueryError {
                        field: None,
                        message: format!("query `{name}`: a row did not convert to JSON"),
                    })
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_are_found_outside_quotes_comments_and_casts() {
        let p = pieces(
            "SELECT ':nope', \"a:b\", x::text, $$ :no $$, $t$ :no $t$ -- :no\n FROM p WHERE id = :id /* :no */ AND n = :name_1",
            Dialect::Postgres,
        );
        let params: Vec<&str> = p
            .iter()
            .filter_map(|x| match x {
                Piece::Param(n) => Some(n.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(params, vec!["id", "name_1"]);
        let text: String = p
            .iter()
            .map(|x| match x {
                Piece::Text(t) => t.clone(),
                Piece::Param(n) => format!("<{n}>"),
            })
            .collect();
        assert!(
            text.contains("x::text") && text.contains("$$ :no $$"),
            "{text}"
        );
    }

    #[test]
    fn literals_quote_strings_and_refuse_what_is_not_a_scalar() {
        assert_eq!(
            literal(&Value::from("O'Brien")).as_deref(),
            Ok("'O''Brien'")
        );
        assert_eq!(literal(&Value::from(42)).as_deref(), Ok("42"));
        assert_eq!(literal(&Value::Bool(true)).as_deref(), Ok("TRUE"));
        assert_eq!(literal(&Value::Null).as_deref(), Ok("NULL"));
        assert!(literal(&serde_json::json!([1])).is_err());
        assert!(literal(&Value::from("a\0b")).is_err());
    }
}

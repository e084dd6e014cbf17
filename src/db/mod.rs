//! Database adapters for the runtime's ports: SQLite (embedded default), PostgreSQL and
//! SQL Server. Each one installs an outbox, a checkpoint, an inbox and a conflict table plus
//! capture triggers, reads the outbox in commit-safe order, and applies cloud updates with
//! echo suppression and the table's conflict policy.

pub mod instance;
#[cfg(any(feature = "postgres", feature = "sqlserver"))]
pub mod named_params;
#[cfg(feature = "postgres")]
pub mod postgres;
pub mod sqlite;
#[cfg(feature = "sqlserver")]
pub mod sqlserver;
pub mod values;

use std::cmp::Ordering;

use serde_json::Value;

/// Quotes an SQL identifier (`"name"`, with embedded quotes doubled).
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Quotes a possibly schema-qualified name (`schema.table` → `"schema"."table"`).
pub fn quote_qualified(name: &str) -> String {
    match name.split_once('.') {
        Some((schema, table)) => format!("{}.{}", quote_ident(schema), quote_ident(table)),
        None => quote_ident(name),
    }
}

/// Quotes an SQL string literal.
pub fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// Orders two version values for `newest_wins`: numbers numerically, timestamps as instants
/// (whatever their zone), other strings lexicographically; anything else is incomparable.
pub fn compare_versions(local: &Value, cloud: &Value) -> Option<Ordering> {
    match (local, cloud) {
        (Value::Number(a), Value::Number(b)) => a.as_f64()?.partial_cmp(&b.as_f64()?),
        (Value::String(a), Value::String(b)) => {
            // Two timestamps compare as instants (`…+02:00` from one engine, `…Z` from the
            // wire), other strings lexicographically.
            match (values::parse_timestamp(a), values::parse_timestamp(b)) {
                (Some(x), Some(y)) => Some(x.cmp(&y)),
                _ => Some(a.cmp(b)),
            }
        }
        _ => None,
    }
}

/// Reasons sent back in `update_result` for conflicts (never row values).
pub const CLINIC_CHANGE_PENDING: &str =
    "conflict (clinic_wins): the clinic has an unacknowledged change to this row";
pub const LOCAL_NEWER: &str = "conflict (newest_wins): the clinic's version is newer";

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn versions_compare_by_type() {
        assert_eq!(
            compare_versions(&json!(3), &json!(2.5)),
            Some(Ordering::Greater)
        );
        assert_eq!(
            compare_versions(
                &json!("2026-01-02T00:00:00Z"),
                &json!("2026-01-10T00:00:00Z")
            ),
            Some(Ordering::Less)
        );
        // The same instant in two spellings, and a later one with an earlier wall clock.
        assert_eq!(
            compare_versions(
                &json!("2026-01-02T02:00:00+02:00"),
                &json!("2026-01-02T00:00:00Z")
            ),
            Some(Ordering::Equal)
        );
        assert_eq!(
            compare_versions(
                &json!("2026-01-02T01:00:00-05:00"),
                &json!("2026-01-02T03:00:00Z")
            ),
            Some(Ordering::Greater)
        );
        assert_eq!(compare_versions(&json!(1), &json!("1")), None);
    }

    #[test]
    fn identifiers_are_quoted() {
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(quote_qualified("dbo.my table"), "\"dbo\".\"my table\"");
        assert_eq!(quote_literal("it's"), "'it''s'");
    }
}

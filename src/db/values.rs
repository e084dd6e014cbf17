//! Values that mean the same on every engine.
//!
//! Each engine writes a row's values in its own way: a boolean is `1` in SQLite, `true` in
//! PostgreSQL and SQL Server; a timestamp is `2026-12-01 10:00:00` in SQLite,
//! `2026-12-01T12:00:00+02:00` from PostgreSQL, `2026-12-01T10:00:00.5000000` from SQL Server;
//! a decimal is a JSON number that loses digits once parsed as a float; binary is hex text in
//! SQLite's triggers, `\x00ff` from PostgreSQL and base64 from SQL Server. The agent puts every
//! captured value in one **wire form** (docs/PROTOCOL.md "Values") by the column's type, and
//! turns the wire form back into what its engine stores when it applies a cloud update:
//!
//! | type        | wire form                                                          |
//! |-------------|--------------------------------------------------------------------|
//! | `boolean`   | JSON `true` / `false`                                              |
//! | `timestamp` | RFC 3339 in UTC: `2026-12-01T10:00:00Z`, `…:00.25Z` (fraction only when not zero, no trailing zeros); a timestamp without a zone is UTC |
//! | `date`      | `2026-12-01`                                                       |
//! | `decimal`   | a string of plain digits, exact: `"12.5"`, `"-0.0001"`, `"100"` (no exponent, no trailing fractional zeros) |
//! | `binary`    | standard base64 with padding: `"AP8="`                             |
//!
//! Other columns (integers, floats, text, JSON) travel as the engine gives them. A value that
//! does not read as its column's type (a SQLite `DATETIME` column holding free text) is passed
//! on unchanged: nothing is lost, and the gateway's entity schema can flag it.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use chrono::{DateTime, FixedOffset, NaiveDate, NaiveDateTime, TimeDelta, Utc};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::config::TableConfig;

/// A column's type, as far as the wire form cares (`agent.tables[].types` names these).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ValueType {
    Boolean,
    Timestamp,
    Date,
    Decimal,
    Binary,
    /// Passed as the engine gives it (turns off what the declared type would choose).
    Plain,
}

impl ValueType {
    pub fn as_str(self) -> &'static str {
        match self {
            ValueType::Boolean => "boolean",
            ValueType::Timestamp => "timestamp",
            ValueType::Date => "date",
            ValueType::Decimal => "decimal",
            ValueType::Binary => "binary",
            ValueType::Plain => "plain",
        }
    }

    /// A SQLite declared type (`PRAGMA table_info`): SQLite has no boolean, date or decimal
    /// storage class, so the declared name is what says it.
    pub fn of_sqlite(declared: &str) -> ValueType {
        let d = declared.to_ascii_uppercase();
        if d.contains("BOOL") {
            ValueType::Boolean
        } else if d.contains("DATETIME") || d.contains("TIMESTAMP") {
            ValueType::Timestamp
        } else if d == "DATE" {
            ValueType::Date
        } else if d.contains("DECIMAL") || d.contains("NUMERIC") || d.contains("MONEY") {
            ValueType::Decimal
        } else if d.contains("BLOB") || d.contains("BINARY") {
            ValueType::Binary
        } else {
            ValueType::Plain
        }
    }

    /// A PostgreSQL `information_schema.columns.data_type` (a domain reports its base type).
    pub fn of_postgres(data_type: &str) -> ValueType {
        match data_type {
            "boolean" => ValueType::Boolean,
            "timestamp with time zone" | "timestamp without time zone" => ValueType::Timestamp,
            "date" => ValueType::Date,
            "numeric" => ValueType::Decimal,
            "bytea" => ValueType::Binary,
            _ => ValueType::Plain,
        }
    }

    /// A SQL Server `INFORMATION_SCHEMA.COLUMNS.DATA_TYPE` (or a declared type such as
    /// `varbinary(max)`).
    pub fn of_sqlserver(data_type: &str) -> ValueType {
        let base = data_type
            .split('(')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        match base.as_str() {
            "bit" => ValueType::Boolean,
            "datetime" | "datetime2" | "smalldatetime" | "datetimeoffset" => ValueType::Timestamp,
            "date" => ValueType::Date,
            "decimal" | "numeric" | "money" | "smallmoney" => ValueType::Decimal,
            "binary" | "varbinary" | "image" | "rowversion" | "timestamp" => ValueType::Binary,
            _ => ValueType::Plain,
        }
    }
}

/// How an engine's captured JSON spells binary values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BinaryForm {
    /// Hex digits (SQLite's `hex()` in the capture triggers).
    Hex,
    /// `\x` and hex digits (PostgreSQL's `to_jsonb(bytea)`).
    PgHex,
    /// Base64 (SQL Server's `FOR JSON`): already the wire form.
    Base64,
}

/// The columns of one table whose values need the wire form (the others are not listed).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ColumnTypes {
    cols: HashMap<String, ValueType>,
}

impl ColumnTypes {
    /// From `(column, type)` pairs, then `overrides` (config) on top.
    pub fn new(
        cols: impl IntoIterator<Item = (String, ValueType)>,
        overrides: &BTreeMap<String, ValueType>,
    ) -> Self {
        let mut map: HashMap<String, ValueType> = cols.into_iter().collect();
        for (c, t) in overrides {
            map.insert(c.clone(), *t);
        }
        map.retain(|_, t| *t != ValueType::Plain);
        ColumnTypes { cols: map }
    }

    pub fn is_empty(&self) -> bool {
        self.cols.is_empty()
    }

    pub fn get(&self, col: &str) -> Option<ValueType> {
        self.cols.get(col).copied()
    }

    fn has(&self, t: ValueType) -> bool {
        self.cols.values().any(|x| *x == t)
    }

    /// Puts a captured row (or key) in the wire form, in place.
    pub fn to_wire(&self, row: &mut Map<String, Value>, bin: BinaryForm) {
        if self.is_empty() {
            return;
        }
        for (col, v) in row.iter_mut() {
            if let Some(t) = self.get(col) {
                to_wire(v, t, bin);
            }
        }
    }

    /// Parses a captured row (or key) given as JSON text — keeping decimals' digits exact,
    /// which parsing them as numbers would not — and puts it in the wire form.
    pub fn parse_wire(&self, text: &str, bin: BinaryForm) -> Result<Map<String, Value>, String> {
        let mut row: Map<String, Value> = if self.has(ValueType::Decimal) {
            let raw: BTreeMap<String, &RawValue> =
                serde_json::from_str(text).map_err(|e| e.to_string())?;
            let mut row = Map::new();
            for (col, r) in raw {
                let v = match self.get(&col) {
                    Some(ValueType::Decimal)
                        if r.get()
                            .starts_with(|c: char| c == '-' || c.is_ascii_digit()) =>
                    {
                        match canonical_decimal(r.get()) {
                            Some(d) => Value::String(d),
                            None => serde_json::from_str(r.get()).map_err(|e| e.to_string())?,
                        }
                    }
                    _ => serde_json::from_str(r.get()).map_err(|e| e.to_string())?,
                };
                row.insert(col, v);
            }
            row
        } else {
            serde_json::from_str(text).map_err(|e| e.to_string())?
        };
        self.to_wire(&mut row, bin);
        Ok(row)
    }
}

/// entity → the wire types of its mapped table's columns, read once per entity (every engine's
/// reader keeps one; an entity no longer mapped has no typed columns).
pub struct EntityTypes {
    tables: Vec<TableConfig>,
    map: Mutex<HashMap<String, Arc<ColumnTypes>>>,
}

impl EntityTypes {
    pub fn new(tables: &[TableConfig]) -> Self {
        EntityTypes {
            tables: tables.to_vec(),
            map: Mutex::new(HashMap::new()),
        }
    }

    /// The entity's types, from `load` (the table's declared types, `types:` on top) the first
    /// time.
    pub fn of<E>(
        &self,
        entity: &str,
        load: impl FnOnce(&TableConfig) -> Result<ColumnTypes, E>,
    ) -> Result<Arc<ColumnTypes>, E> {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = map.get(entity) {
            return Ok(t.clone());
        }
        let t = match self.tables.iter().find(|t| t.entity == entity) {
            Some(cfg) => Arc::new(load(cfg)?),
            None => Arc::new(ColumnTypes::default()),
        };
        map.insert(entity.to_string(), t.clone());
        Ok(t)
    }
}

/// `types:` entries naming a column the table does not have (a typo would silently change
/// nothing): one line each, for `check-config --connect` and the agent's start.
pub fn unknown_typed_columns<'a>(
    t: &TableConfig,
    cols: impl Iterator<Item = &'a String> + Clone,
) -> Vec<String> {
    t.types
        .keys()
        .filter(|c| !cols.clone().any(|x| x == *c))
        .map(|c| {
            format!(
                "table {}: `types` names column `{c}`, which the table does not have",
                t.table
            )
        })
        .collect()
}

/// One captured value in the wire form (unchanged when it does not read as `t`).
pub fn to_wire(v: &mut Value, t: ValueType, bin: BinaryForm) {
    let new = match (t, &*v) {
        (_, Value::Null) => None,
        (ValueType::Boolean, Value::Number(n)) => n.as_f64().map(|x| Value::Bool(x != 0.0)),
        (ValueType::Boolean, Value::String(s)) => match s.trim().to_ascii_lowercase().as_str() {
            "1" | "true" | "t" => Some(Value::Bool(true)),
            "0" | "false" | "f" => Some(Value::Bool(false)),
            _ => None,
        },
        (ValueType::Timestamp, Value::String(s)) => canonical_timestamp(s).map(Value::String),
        (ValueType::Date, Value::String(s)) => canonical_date(s).map(Value::String),
        (ValueType::Decimal, Value::Number(n)) => {
            canonical_decimal(&n.to_string()).map(Value::String)
        }
        (ValueType::Decimal, Value::String(s)) => canonical_decimal(s).map(Value::String),
        (ValueType::Binary, Value::String(s)) => {
            let bytes = match bin {
                BinaryForm::Hex => hex_decode(s),
                BinaryForm::PgHex => s.strip_prefix("\\x").and_then(hex_decode),
                BinaryForm::Base64 => base64_decode(s),
            };
            bytes.map(|b| Value::String(base64_encode(&b)))
        }
        _ => None,
    };
    if let Some(new) = new {
        *v = new;
    }
}

/// A wire-form binary value as bytes; the error names the column.
pub fn binary_from_wire(col: &str, v: &str) -> Result<Vec<u8>, String> {
    base64_decode(v).ok_or_else(|| {
        format!(
            "`{col}` is a binary column: its value must be base64 (docs/PROTOCOL.md \"Values\")"
        )
    })
}

/// A wire-form (or any readable) timestamp as an instant; a timestamp without a zone is UTC.
pub fn parse_timestamp(s: &str) -> Option<DateTime<Utc>> {
    let s = s.trim();
    if s.len() < 16 || !s.is_char_boundary(10) || !s.is_char_boundary(11) {
        return None;
    }
    let sep = &s[10..11];
    if sep != " " && sep != "T" && sep != "t" {
        return None;
    }
    let (date, rest) = (&s[..10], &s[11..]);
    // The zone: `Z`, `±HH:MM`, `±HHMM` or `±HH` after the time.
    let (time, offset) = if let Some(t) = rest.strip_suffix(['Z', 'z']) {
        (t, 0)
    } else if let Some(i) = rest.rfind(['+', '-']) {
        let (t, z) = rest.split_at(i);
        let sign = if z.starts_with('-') { -1 } else { 1 };
        let digits: String = z[1..].chars().filter(|c| *c != ':').collect();
        if !digits.bytes().all(|b| b.is_ascii_digit()) || !(digits.len() == 2 || digits.len() == 4)
        {
            return None;
        }
        let h: i32 = digits[..2].parse().ok()?;
        let m: i32 = if digits.len() == 4 {
            digits[2..].parse().ok()?
        } else {
            0
        };
        (t.trim_end(), sign * (h * 3600 + m * 60))
    } else {
        (rest, 0)
    };
    let naive = format!("{date}T{time}");
    let dt = NaiveDateTime::parse_from_str(&naive, "%Y-%m-%dT%H:%M:%S%.f")
        .or_else(|_| NaiveDateTime::parse_from_str(&naive, "%Y-%m-%dT%H:%M"))
        .ok()?;
    let offset = FixedOffset::east_opt(offset)?;
    Some((dt - TimeDelta::seconds(i64::from(offset.local_minus_utc()))).and_utc())
}

/// The wire form of a timestamp: `YYYY-MM-DDTHH:MM:SS[.fraction]Z`.
pub fn format_timestamp(t: &DateTime<Utc>) -> String {
    let mut s = t.format("%Y-%m-%dT%H:%M:%S").to_string();
    push_fraction(&mut s, t.timestamp_subsec_nanos());
    s.push('Z');
    s
}

fn push_fraction(s: &mut String, nanos: u32) {
    if nanos != 0 {
        let f = format!("{nanos:09}");
        s.push('.');
        s.push_str(f.trim_end_matches('0'));
    }
}

pub fn canonical_timestamp(s: &str) -> Option<String> {
    parse_timestamp(s).map(|t| format_timestamp(&t))
}

/// A wire-form timestamp as SQLite's own text form (`YYYY-MM-DD HH:MM:SS[.fraction]`, UTC),
/// the one `CURRENT_TIMESTAMP` and `datetime()` write, so local comparisons keep working.
pub fn sqlite_timestamp(s: &str) -> Option<String> {
    let t = parse_timestamp(s)?;
    let mut out = t.format("%Y-%m-%d %H:%M:%S").to_string();
    push_fraction(&mut out, t.timestamp_subsec_nanos());
    Some(out)
}

/// A wire-form timestamp for a SQL Server column without a zone (`datetime`, `datetime2`,
/// `smalldatetime`): UTC without the `Z`, the fraction cut to what the type holds.
pub fn sqlserver_naive_timestamp(s: &str, declared: &str) -> Option<String> {
    let t = parse_timestamp(s)?;
    let digits = match declared.split('(').next().unwrap_or("").trim() {
        "datetime" => 3,
        "smalldatetime" => 0,
        _ => 7,
    };
    let mut out = t.format("%Y-%m-%dT%H:%M:%S").to_string();
    let f = format!("{:09}", t.timestamp_subsec_nanos());
    let f = f[..digits].trim_end_matches('0');
    if !f.is_empty() {
        out.push('.');
        out.push_str(f);
    }
    Some(out)
}

fn canonical_date(s: &str) -> Option<String> {
    NaiveDate::parse_from_str(s.trim(), "%Y-%m-%d")
        .ok()
        .map(|d| d.format("%Y-%m-%d").to_string())
}

/// A decimal number (JSON number text, or a string of one) in plain digits: no exponent, no
/// leading zeros, no trailing fractional zeros, no `-0`. `None` for anything else.
pub fn canonical_decimal(s: &str) -> Option<String> {
    let s = s.trim();
    let (neg, s) = match s.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, s.strip_prefix('+').unwrap_or(s)),
    };
    let (mantissa, exp) = match s.find(['e', 'E']) {
        Some(i) => (&s[..i], s[i + 1..].parse::<i32>().ok()?),
        None => (s, 0),
    };
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    if int.is_empty() && frac.is_empty()
        || !int.bytes().all(|b| b.is_ascii_digit())
        || !frac.bytes().all(|b| b.is_ascii_digit())
        || !(-400..=400).contains(&exp)
    {
        return None;
    }
    // digits × 10^(point - len): the decimal point sits `point` digits from the left.
    let digits: String = format!("{int}{frac}");
    let point = int.len() as i64 + i64::from(exp);
    let (mut ip, mut fp) = if point <= 0 {
        (
            String::new(),
            format!("{}{digits}", "0".repeat((-point) as usize)),
        )
    } else if point as usize >= digits.len() {
        (
            format!("{digits}{}", "0".repeat(point as usize - digits.len())),
            String::new(),
        )
    } else {
        (
            digits[..point as usize].to_string(),
            digits[point as usize..].to_string(),
        )
    };
    ip = ip.trim_start_matches('0').to_string();
    fp = fp.trim_end_matches('0').to_string();
    if ip.is_empty() {
        ip.push('0');
    }
    let zero = ip == "0" && fp.is_empty();
    let mut out = String::with_capacity(ip.len() + fp.len() + 2);
    if neg && !zero {
        out.push('-');
    }
    out.push_str(&ip);
    if !fp.is_empty() {
        out.push('.');
        out.push_str(&fp);
    }
    Some(out)
}

pub fn base64_encode(b: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(b)
}

pub fn base64_decode(s: &str) -> Option<Vec<u8>> {
    base64::engine::general_purpose::STANDARD.decode(s).ok()
}

pub fn hex_encode(b: &[u8]) -> String {
    let mut s = String::with_capacity(b.len() * 2);
    for x in b {
        s.push_str(&format!("{x:02x}"));
    }
    s
}

pub fn hex_decode(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| s.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()))
        .collect()
}

/// The test table every engine's round-trip test uses (unit and integration tests): each row
/// in the wire form; the SQL types per engine are in each test.
#[doc(hidden)]
pub mod fixture {
    use serde_json::{json, Value};

    pub fn rows() -> Vec<Value> {
        vec![
            json!({"id": 1, "flag": true, "at": "2026-12-01T10:00:00Z", "day": "2026-12-01",
                   "amount": "12.5", "data": "AP8=", "note": "plain"}),
            json!({"id": 2, "flag": false, "at": "1999-12-31T23:59:59.25Z", "day": "2000-02-29",
                   "amount": "-0.0001", "data": "", "note": "Zoë, 東京"}),
            json!({"id": 3, "flag": null, "at": null, "day": null, "amount": null, "data": null,
                   "note": null}),
            json!({"id": 4, "flag": true, "at": "2026-06-30T22:30:00.123456Z", "day": "1970-01-01",
                   "amount": "99999999.9999", "data": "3q2+7wABAgM=", "note": ""}),
            json!({"id": 5, "flag": false, "at": "2026-03-29T01:00:00Z", "day": "2026-03-29",
                   "amount": "100", "data": "/w==", "note": "a \"quoted\" line\nand another"}),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn decimals_are_plain_exact_digits() {
        for (input, want) in [
            ("12.50", "12.5"),
            ("12.00", "12"),
            ("0012.5", "12.5"),
            ("-0.000100", "-0.0001"),
            ("-0.0", "0"),
            ("0", "0"),
            (".5", "0.5"),
            ("1e3", "1000"),
            ("1.25E-3", "0.00125"),
            ("1.0e+20", "100000000000000000000"),
            (
                "123456789012345678901234567890.123456789",
                "123456789012345678901234567890.123456789",
            ),
            ("+7", "7"),
        ] {
            assert_eq!(canonical_decimal(input).as_deref(), Some(want), "{input}");
        }
        for bad in ["", "-", ".", "1.2.3", "abc", "1e", "1e999", "12,5", "NaN"] {
            assert_eq!(canonical_decimal(bad), None, "{bad}");
        }
    }

    #[test]
    fn timestamps_of_every_engine_read_as_one_utc_form() {
        for (input, want) in [
            // SQLite's CURRENT_TIMESTAMP, and with a fraction.
            ("2026-12-01 10:00:00", "2026-12-01T10:00:00Z"),
            ("2026-12-01 10:00:00.250", "2026-12-01T10:00:00.25Z"),
            ("2026-12-01 10:00", "2026-12-01T10:00:00Z"),
            // PostgreSQL to_jsonb: timestamptz (session zone), timestamp.
            ("2026-12-01T12:00:00+02:00", "2026-12-01T10:00:00Z"),
            (
                "2026-12-01T05:30:00.123456-04:30",
                "2026-12-01T10:00:00.123456Z",
            ),
            ("2026-12-01T10:00:00", "2026-12-01T10:00:00Z"),
            ("2026-12-01 12:00:00+02", "2026-12-01T10:00:00Z"),
            // SQL Server FOR JSON: datetime2(7), datetimeoffset.
            ("2026-12-01T10:00:00.5000000", "2026-12-01T10:00:00.5Z"),
            ("2026-12-01T11:00:00.0000000+01:00", "2026-12-01T10:00:00Z"),
            // Across midnight and a year.
            ("2027-01-01T01:00:00+02:00", "2026-12-31T23:00:00Z"),
            ("2026-12-01T10:00:00Z", "2026-12-01T10:00:00Z"),
        ] {
            assert_eq!(canonical_timestamp(input).as_deref(), Some(want), "{input}");
        }
        for bad in [
            "",
            "yesterday",
            "2026-12-01",
            "2026-13-01 10:00:00",
            "2026-12-01 25:00:00",
            "2026-12-01X10:00:00",
        ] {
            assert_eq!(canonical_timestamp(bad), None, "{bad}");
        }
        assert_eq!(
            sqlite_timestamp("2026-12-01T10:00:00.25Z").as_deref(),
            Some("2026-12-01 10:00:00.25")
        );
        assert_eq!(
            sqlserver_naive_timestamp("2026-12-01T10:00:00.123456Z", "datetime").as_deref(),
            Some("2026-12-01T10:00:00.123")
        );
        assert_eq!(
            sqlserver_naive_timestamp("2026-12-01T10:00:00.1234567Z", "datetime2(7)").as_deref(),
            Some("2026-12-01T10:00:00.1234567")
        );
        assert_eq!(
            sqlserver_naive_timestamp("2026-12-01T10:00:00Z", "smalldatetime").as_deref(),
            Some("2026-12-01T10:00:00")
        );
    }

    #[test]
    fn captured_values_take_the_wire_form_and_odd_ones_pass_unchanged() {
        let types = ColumnTypes::new(
            [
                ("flag".to_string(), ValueType::Boolean),
                ("at".to_string(), ValueType::Timestamp),
                ("day".to_string(), ValueType::Date),
                ("amount".to_string(), ValueType::Decimal),
                ("data".to_string(), ValueType::Binary),
                ("id".to_string(), ValueType::Plain),
            ],
            &BTreeMap::new(),
        );
        assert_eq!(types.get("id"), None, "plain columns are not listed");
        let mut row = json!({"id": 1, "flag": 1, "at": "2026-12-01 10:00:00", "day": "2026-12-01",
                             "amount": 12.5, "data": "00FF", "note": "x"})
        .as_object()
        .cloned()
        .unwrap_or_default();
        types.to_wire(&mut row, BinaryForm::Hex);
        assert_eq!(
            Value::Object(row),
            json!({"id": 1, "flag": true, "at": "2026-12-01T10:00:00Z", "day": "2026-12-01",
                   "amount": "12.5", "data": "AP8=", "note": "x"})
        );
        // Free text in a typed column is kept, not lost or replaced.
        let mut odd = json!({"flag": "maybe", "at": "soon", "day": "someday", "amount": "lots", "data": "zz"})
            .as_object()
            .cloned()
            .unwrap_or_default();
        let before = odd.clone();
        types.to_wire(&mut odd, BinaryForm::Hex);
        assert_eq!(odd, before);
        // Decimals keep every digit when parsed from text (a float would not).
        let exact = types
            .parse_wire(
                r#"{"amount": 123456789012345678.000000001, "data": "\\x00ff", "id": 7}"#,
                BinaryForm::PgHex,
            )
            .expect("parse");
        assert_eq!(exact["amount"], json!("123456789012345678.000000001"));
        assert_eq!(exact["data"], json!("AP8="));
        assert_eq!(exact["id"], json!(7));
        // Overrides from config: a SQLite INTEGER column holding 0/1 as a boolean.
        let mut over = BTreeMap::new();
        over.insert("active".to_string(), ValueType::Boolean);
        over.insert("amount".to_string(), ValueType::Plain);
        let t = ColumnTypes::new([("amount".to_string(), ValueType::Decimal)], &over);
        assert_eq!(
            (t.get("active"), t.get("amount")),
            (Some(ValueType::Boolean), None)
        );
    }

    #[test]
    fn engine_type_names_map_to_wire_types() {
        use ValueType::*;
        for (d, t) in [
            ("BOOLEAN", Boolean),
            ("DATETIME", Timestamp),
            ("timestamp", Timestamp),
            ("DATE", Date),
            ("DECIMAL(10,2)", Decimal),
            ("NUMERIC", Decimal),
            ("BLOB", Binary),
            ("INTEGER", Plain),
            ("TEXT", Plain),
            ("", Plain),
        ] {
            assert_eq!(ValueType::of_sqlite(d), t, "{d}");
        }
        for (d, t) in [
            ("boolean", Boolean),
            ("timestamp with time zone", Timestamp),
            ("timestamp without time zone", Timestamp),
            ("date", Date),
            ("numeric", Decimal),
            ("bytea", Binary),
            ("double precision", Plain),
            ("text", Plain),
        ] {
            assert_eq!(ValueType::of_postgres(d), t, "{d}");
        }
        for (d, t) in [
            ("bit", Boolean),
            ("datetime2(7)", Timestamp),
            ("datetimeoffset", Timestamp),
            ("date", Date),
            ("decimal(10,2)", Decimal),
            ("money", Decimal),
            ("varbinary(max)", Binary),
            ("nvarchar(max)", Plain),
            ("float", Plain),
        ] {
            assert_eq!(ValueType::of_sqlserver(d), t, "{d}");
        }
    }

    #[test]
    fn binary_round_trips_through_every_spelling() {
        let bytes = [0u8, 255, 16, 1];
        let b64 = base64_encode(&bytes);
        assert_eq!(hex_decode("00FF1001").as_deref(), Some(&bytes[..]));
        assert_eq!(hex_decode(&hex_encode(&bytes)).as_deref(), Some(&bytes[..]));
        assert_eq!(binary_from_wire("data", &b64).as_deref(), Ok(&bytes[..]));
        let err = binary_from_wire("data", "not base64!").unwrap_err();
        assert!(err.contains("`data`") && err.contains("base64"), "{err}");
        assert_eq!(hex_decode("0"), None);
        assert_eq!(hex_decode("zz"), None);
    }
}

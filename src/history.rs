//! History checker: compares what a clinic database committed with what the gateway stored,
//! row by row — not counters that agree by construction.
//!
//! For one clinic: every outbox row (the trigger-captured record of each committed change) must
//! be at the gateway exactly once with the same entity, op, key, row and commit time; nothing may
//! be at the gateway that the clinic did not commit; per key, the gateway must have stored the
//! changes in commit order; and no applied cloud update may have been captured again (echo).
//! Requires the outbox retention to be longer than the run (purged rows cannot be compared).
//! Only the events of the clinic's current outbox (`source_id`) are compared.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use serde::Serialize;
use serde_json::Value;

use crate::db::sqlite;
use crate::gateway::store::{wait, Store, StoreError, StoredEvent};

#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    #[error(transparent)]
    Sqlite(#[from] sqlite::SqliteError),
    #[error("reading clinic outbox: {0}")]
    Clinic(#[from] rusqlite::Error),
    #[error(transparent)]
    Store(#[from] StoreError),
}

#[derive(Debug, Default, Clone, Serialize, PartialEq, Eq)]
pub struct HistoryReport {
    pub clinic_id: String,
    /// Changes the clinic committed (outbox rows).
    pub written: u64,
    /// Events the gateway stored for the clinic.
    pub at_gateway: u64,
    /// Committed at the clinic, absent at the gateway.
    pub missing: u64,
    /// Stored at the gateway more often than committed.
    pub duplicates: u64,
    /// At the gateway with no matching commit at the clinic.
    pub unexpected: u64,
    /// Same position, different content.
    pub mismatched: u64,
    /// Keys whose changes the gateway stored out of commit order.
    pub order_violations: u64,
    /// Applied cloud updates that were captured back as clinic changes.
    pub echoed: u64,
}

impl HistoryReport {
    pub fn clean(&self) -> bool {
        self.missing == 0
            && self.duplicates == 0
            && self.unexpected == 0
            && self.mismatched == 0
            && self.order_violations == 0
            && self.echoed == 0
    }
}

#[derive(Debug, Clone, PartialEq)]
struct Change {
    seq: u64,
    entity: String,
    op: String,
    key: Value,
    row: Value,
    committed_at: String,
}

impl Change {
    fn fingerprint(&self) -> String {
        format!(
            "{}|{}|{}|{}|{}",
            self.entity, self.op, self.key, self.row, self.committed_at
        )
    }
}

fn json(text: Option<String>) -> Value {
    text.and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or(Value::Null)
}

/// Every event the gateway holds for the clinic's current outbox, in storage order.
fn gateway_events(store: &Store, clinic: &str) -> Result<Vec<StoredEvent>, StoreError> {
    let mut out: Vec<StoredEvent> = Vec::new();
    loop {
        let after = out.last().map(|e| e.id).unwrap_or(0);
        let page = wait(store.clinic_events(clinic, after, 5_000))?;
        let done = page.len() < 5_000;
        out.extend(page);
        if done {
            return Ok(out);
        }
    }
}

/// Checks one clinic. `echo_keys` are (entity, key) pairs written only by cloud updates: any
/// clinic change captured for them is an echo.
pub fn check_clinic(
    clinic_db: &Path,
    clinic_id: &str,
    store: &Store,
    echo_keys: &[(String, Value)],
) -> Result<HistoryReport, HistoryError> {
    let conn = sqlite::open(clinic_db)?;
    let mut stmt = conn.prepare(
        "SELECT seq, entity, op, key_json, row_json, committed_at FROM _tether_outbox ORDER BY seq",
    )?;
    let clinic: Vec<Change> = stmt
        .query_map([], |r| {
            Ok(Change {
                seq: r.get::<_, i64>(0)? as u64,
                entity: r.get(1)?,
                op: r.get(2)?,
                key: json(r.get(3)?),
                row: json(r.get(4)?),
                committed_at: r.get(5)?,
            })
        })?
        .collect::<Result<_, _>>()?;
    let gateway: Vec<(u64, Change)> = gateway_events(store, clinic_id)?
        .into_iter()
        .map(|e| {
            (
                e.id,
                Change {
                    seq: e.seq,
                    entity: e.entity,
                    op: e.op,
                    key: e.key,
                    row: e.row.unwrap_or(Value::Null),
                    committed_at: e.committed_at,
                },
            )
        })
        .collect();

    let mut report = HistoryReport {
        clinic_id: clinic_id.to_string(),
        written: clinic.len() as u64,
        at_gateway: gateway.len() as u64,
        ..Default::default()
    };
    let by_seq: HashMap<u64, &Change> = clinic.iter().map(|c| (c.seq, c)).collect();
    let mut committed: HashMap<String, u64> = HashMap::new();
    for c in &clinic {
        *committed.entry(c.fingerprint()).or_default() += 1;
    }
    let mut stored: HashMap<String, u64> = HashMap::new();
    let mut seen_seq: HashMap<u64, u64> = HashMap::new();
    for (_, g) in &gateway {
        *seen_seq.entry(g.seq).or_default() += 1;
        match by_seq.get(&g.seq) {
            None => report.unexpected += 1,
            Some(c) if **c != *g => report.mismatched += 1,
            Some(_) => {}
        }
        *stored.entry(g.fingerprint()).or_default() += 1;
    }
    for (fp, n) in &stored {
        let want = committed.get(fp).copied().unwrap_or(0);
        if *n > want && want > 0 {
            report.duplicates += n - want;
        }
    }
    for n in seen_seq.values() {
        report.duplicates += n.saturating_sub(1);
    }
    report.missing = clinic
        .iter()
        .filter(|c| !seen_seq.contains_key(&c.seq))
        .count() as u64;
    // Per key, gateway storage order (id) must follow commit order (seq).
    let mut last_per_key: BTreeMap<String, u64> = BTreeMap::new();
    for (_, g) in &gateway {
        let k = format!("{}|{}", g.entity, g.key);
        if let Some(prev) = last_per_key.insert(k, g.seq) {
            if prev > g.seq {
                report.order_violations += 1;
            }
        }
    }
    report.echoed = clinic
        .iter()
        .filter(|c| echo_keys.iter().any(|(e, k)| *e == c.entity && *k == c.key))
        .count() as u64;
    Ok(report)
}

/// Installs an independent journal of every committed clinic change: table `_journal` filled
/// by its own triggers in the same transactions as the changes, never purged. A checker that
/// reads it can see losses the outbox can no longer show (after a purge). Test support.
pub fn install_journal(
    db: &Path,
    tables: &[crate::config::TableConfig],
) -> Result<(), HistoryError> {
    let conn = sqlite::open(db)?;
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS _journal (
            seq INTEGER PRIMARY KEY AUTOINCREMENT, entity TEXT NOT NULL, op TEXT NOT NULL,
            key_json TEXT NOT NULL, row_json TEXT,
            committed_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')))",
    )?;
    for t in tables.iter().filter(|t| t.direction.up()) {
        let cols = sqlite::columns(&conn, &t.table)?;
        for ddl in sqlite::trigger_sql(t, &cols) {
            let ddl = ddl
                .replace("_tether_outbox", "_journal")
                .replace("\"_tether_", "\"_journal_");
            conn.execute_batch(&ddl)?;
        }
    }
    Ok(())
}

/// Compares the journal with the gateway store, key by key: every journaled change must be
/// stored once, in the journal's order; anything else is counted.
pub fn check_journal(
    db: &Path,
    clinic_id: &str,
    store: &Store,
) -> Result<HistoryReport, HistoryError> {
    type Change = (String, Value);
    let conn = sqlite::open(db)?;
    let mut stmt =
        conn.prepare("SELECT entity, op, key_json, row_json FROM _journal ORDER BY seq")?;
    let journal: Vec<(String, Change)> = stmt
        .query_map([], |r| {
            let entity: String = r.get(0)?;
            let key = json(r.get(2)?);
            Ok((
                format!("{entity}|{key}"),
                (r.get::<_, String>(1)?, json(r.get(3)?)),
            ))
        })?
        .collect::<Result<_, _>>()?;
    let mut events = gateway_events(store, clinic_id)?;
    events.sort_by_key(|e| e.seq);
    let stored: Vec<(String, Change)> = events
        .into_iter()
        .map(|e| {
            (
                format!("{}|{}", e.entity, e.key),
                (e.op, e.row.unwrap_or(Value::Null)),
            )
        })
        .collect();
    let mut report = HistoryReport {
        clinic_id: clinic_id.to_string(),
        written: journal.len() as u64,
        at_gateway: stored.len() as u64,
        ..Default::default()
    };
    let mut by_key_j: BTreeMap<String, Vec<Change>> = BTreeMap::new();
    for (k, c) in journal {
        by_key_j.entry(k).or_default().push(c);
    }
    let mut by_key_g: BTreeMap<String, Vec<Change>> = BTreeMap::new();
    for (k, c) in stored {
        by_key_g.entry(k).or_default().push(c);
    }
    for (k, g) in &by_key_g {
        if !by_key_j.contains_key(k) {
            report.unexpected += g.len() as u64;
        }
    }
    for (k, j) in &by_key_j {
        let g = by_key_g.get(k).cloned().unwrap_or_default();
        if &g == j {
            continue;
        }
        // Multiset difference: missing and extra changes of this key.
        let mut pool: Vec<Option<&Change>> = g.iter().map(Some).collect();
        let mut matched = 0u64;
        for c in j {
            if let Some(slot) = pool.iter_mut().find(|s| s.is_some_and(|x| x == c)) {
                *slot = None;
                matched += 1;
            }
        }
        report.missing += j.len() as u64 - matched;
        report.duplicates += g.len() as u64 - matched;
        if matched == j.len() as u64 && matched == g.len() as u64 {
            report.order_violations += 1; // same changes, different order
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Direction, TableConfig};
    use crate::gateway::store::IncomingEvent;
    use rusqlite::params;
    use tether_actors::ports::ChangeSource;

    fn block<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
            .block_on(f)
    }

    /// The checker must see a loss, a duplicate and an echo when there is one.
    #[test]
    fn checker_catches_loss_duplicate_and_echo() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = dir.path().join("c.db");
        let conn = sqlite::open(&db).expect("open");
        conn.execute_batch("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
            .expect("schema");
        sqlite::install(
            &db,
            &[TableConfig::new("t", "thing", &["id"], Direction::Both)],
        )
        .expect("install");
        for i in 1..=5 {
            conn.execute("INSERT INTO t (id, v) VALUES (?1, 'x')", params![i])
                .expect("insert");
        }
        let store = crate::gateway::store::open_sqlite(&dir.path().join("g.db")).expect("store");
        let source = sqlite::SqliteSource::open(&db, &[]).expect("source");
        let events = source.read_after(0, 100).expect("read");
        assert_eq!(events.len(), 5);
        let incoming = |evs: Vec<tether_schemas::Event>| {
            evs.into_iter()
                .map(|event| IncomingEvent::from_event(&event, None))
                .collect::<Vec<_>>()
        };
        // Store all but seq 3: a loss.
        let mut partial = events.clone();
        partial.remove(2);
        block(store.append("c", 0, 0, 0, incoming(partial))).expect("append");
        let r = check_clinic(&db, "c", store.as_ref(), &[]).expect("check");
        assert_eq!((r.written, r.at_gateway, r.missing), (5, 4, 1));
        assert!(!r.clean());

        // The same change stored again under a new position: a duplicate.
        let mut dup = events[0].clone();
        dup.seq = 6;
        block(store.append("c", 0, 0, 5, incoming(vec![dup]))).expect("append");
        let r = check_clinic(&db, "c", store.as_ref(), &[]).expect("check");
        assert_eq!(r.duplicates, 1, "{r:?}");

        // A row that only the cloud writes appears in the outbox: an echo.
        let r = check_clinic(
            &db,
            "c",
            store.as_ref(),
            &[("thing".into(), serde_json::json!({"id": 2}))],
        )
        .expect("check");
        assert_eq!(r.echoed, 1);
    }
}
